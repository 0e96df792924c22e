//! The L4 listener: each connection goes to one backend in rotation and bytes are
//! copied both ways until either side closes, or, with `idle_timeout_secs`, until
//! neither side has sent a byte for that long.
//!
//! Only the connect can be retried (on another backend, up to `retries`): once bytes
//! flow, the proxy cannot know what the backend did with them.
//!
//! With `send_proxy_protocol` the backend connection starts with a PROXY protocol v1
//! line carrying the client's address; with `accept_proxy_protocol` on the listener
//! that is the address the incoming PROXY header carried.

use crate::backend::{Affinity, EWMA_FAILURE_PENALTY};
use crate::config::{Balance, HashOn};
use crate::{Shared, StopRx};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// `PROXY TCP4 client proxy cport pport`, or `PROXY UNKNOWN` when the families differ
/// (the spec's answer for addresses it cannot express).
fn proxy_v1_line(src: SocketAddr, dst: SocketAddr) -> String {
    if src.is_ipv4() == dst.is_ipv4() {
        let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
        format!("PROXY {fam} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port())
    } else {
        "PROXY UNKNOWN\r\n".to_string()
    }
}

pub(crate) async fn serve(listener: TcpListener, name: Arc<str>, shared: Arc<Shared>, mut stop: StopRx) {
    let mut conns = JoinSet::new();
    let drain = loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    conns.spawn(handle(shared.clone(), name.clone(), stream));
                }
                Err(e) => {
                    tracing::warn!(listener = %name, "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break stop.borrow().unwrap_or_default(),
        }
    };
    drop(listener);
    let all_done = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(drain, all_done).await.is_err() {
        tracing::warn!(listener = %name, ?drain, open = conns.len(), "drain timeout: cutting the remaining connections");
        conns.abort_all();
    }
}

async fn handle(shared: Arc<Shared>, listener: Arc<str>, mut inbound: TcpStream) {
    let _ = inbound.set_nodelay(true);
    let snap = shared.snapshot();
    let Some(l) = snap.cfg.listeners.iter().find(|l| *l.name == *listener) else { return };
    let Some(svc) = l.service.as_ref().and_then(|s| snap.services.get(s)) else { return };
    let (Ok(peer), Ok(local)) = (inbound.peer_addr(), inbound.local_addr()) else { return };
    let idle_timeout = l.idle_timeout();
    let (src, dst) = if l.accept_proxy_protocol {
        match crate::proxy_protocol::read_header(&mut inbound, crate::proxy_protocol::HEADER_TIMEOUT).await {
            Ok(Some(c)) => (c.src, c.dst),
            Ok(None) => (peer, local),
            Err(e) => return tracing::debug!(listener = %listener, %peer, "{e}; closing the connection"),
        }
    } else {
        (peer, local)
    };
    let aff = match (svc.cfg.balance, &svc.cfg.hash_on) {
        (Balance::Hash, Some(on @ HashOn::ClientIp)) => {
            Affinity { key: crate::affinity::hash_key(on, &http::HeaderMap::new(), src.ip()), pin: None }
        }
        _ => Affinity::default(),
    };
    // For p2c_ewma a TCP backend's latency is its connect time.
    let ewma = svc.cfg.balance == Balance::P2cEwma;
    let mut tried = HashSet::new();
    let queue_deadline = tokio::time::Instant::now() + Duration::from_millis(svc.cfg.queue_timeout_ms);
    for _ in 0..=svc.cfg.retries {
        let Ok((b, _guard)) = svc.acquire_queued(&tried, queue_deadline, aff, Instant::now()).await else { break };
        tried.insert(b.addr);
        let started = Instant::now();
        let connect = TcpStream::connect(b.addr);
        let result = tokio::time::timeout(Duration::from_millis(svc.cfg.connect_timeout_ms), connect).await;
        if ewma {
            let ok = matches!(result, Ok(Ok(_)));
            b.observe_latency(if ok { started.elapsed() } else { started.elapsed().max(EWMA_FAILURE_PENALTY) });
        }
        match result {
            Ok(Ok(mut out)) => {
                let _ = out.set_nodelay(true);
                if svc.cfg.send_proxy_protocol
                    && let Err(e) = out.write_all(proxy_v1_line(src, dst).as_bytes()).await
                {
                    b.record_failure(&format!("writing the PROXY line: {e}"));
                    continue;
                }
                b.record_success();
                let mut left = b.left_rotation();
                let leaves = async {
                    match svc.cfg.close_on_leave {
                        true => left.changed().await.is_ok(),
                        false => std::future::pending().await,
                    }
                };
                let reads = AtomicU64::new(0);
                // Counted only when something reads the count.
                let counted = idle_timeout.map(|_| &reads);
                let (mut down, mut up) =
                    (Activity { io: &mut inbound, reads: counted }, Activity { io: &mut out, reads: counted });
                let idle = async {
                    match idle_timeout {
                        Some(limit) => quiet_for(limit, &reads).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut down, &mut up) => if let Err(e) = r {
                        tracing::debug!(backend = %b.addr, "tcp copy ended: {e}");
                    },
                    true = leaves => {
                        tracing::info!(backend = %b.addr, client = %src, "backend left rotation; closing its connection");
                    }
                    () = idle => {
                        tracing::debug!(backend = %b.addr, client = %src, "idle timeout; closing the connection");
                    }
                }
                return;
            }
            Ok(Err(e)) => b.record_failure(&crate::backend::connect_reason(&e)),
            Err(_) => b.record_failure("connect timeout"),
        }
    }
    tracing::debug!(listener = %listener, service = %svc.name, "no healthy backend; closing the connection");
}

/// One side of a proxied connection, counting the reads that brought bytes (either
/// side's, into one counter) so [`quiet_for`] can tell an idle connection; without a
/// counter (no `idle_timeout_secs`) it only passes through.
struct Activity<'a, S> {
    io: &'a mut S,
    reads: Option<&'a AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Activity<'_, S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let Some(reads) = self.reads else { return Pin::new(&mut *self.io).poll_read(cx, buf) };
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Activity<'_, S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// Ends once `reads` has not moved for `limit` (give or take an eighth of it): the
/// counter is looked at eight times per `limit` rather than a clock read per read.
async fn quiet_for(limit: Duration, reads: &AtomicU64) {
    let step = (limit / 8).max(Duration::from_millis(100));
    let (mut seen, mut quiet_since) = (reads.load(Ordering::Relaxed), tokio::time::Instant::now());
    loop {
        tokio::time::sleep(step).await;
        let now = reads.load(Ordering::Relaxed);
        if now != seen {
            (seen, quiet_since) = (now, tokio::time::Instant::now());
        } else if quiet_since.elapsed() >= limit {
            return;
        }
    }
}
