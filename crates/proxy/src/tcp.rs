//! The L4 listener: each connection goes to one backend in rotation and bytes are
//! copied both ways until either side closes.
//!
//! Only the connect can be retried (on another backend, up to `retries`): once bytes
//! flow, the proxy cannot know what the backend did with them.
//!
//! With `send_proxy_protocol` the backend connection starts with a PROXY protocol v1
//! line carrying the client's address.

use crate::{Shared, StopRx};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// `PROXY TCP4 client proxy cport pport`, or `PROXY UNKNOWN` when the families differ
/// (the spec's answer for addresses it cannot express).
fn proxy_v1_line(inbound: &TcpStream) -> String {
    match (inbound.peer_addr(), inbound.local_addr()) {
        (Ok(src), Ok(dst)) if src.is_ipv4() == dst.is_ipv4() => {
            let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {fam} {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port())
        }
        _ => "PROXY UNKNOWN\r\n".to_string(),
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
    let Some(svc) = snap
        .cfg
        .listeners
        .iter()
        .find(|l| *l.name == *listener)
        .and_then(|l| l.service.as_ref())
        .and_then(|s| snap.services.get(s))
    else {
        return;
    };
    let mut tried = HashSet::new();
    let queue_deadline = tokio::time::Instant::now() + Duration::from_millis(svc.cfg.queue_timeout_ms);
    for _ in 0..=svc.cfg.retries {
        let Ok((b, _guard)) = svc.acquire_queued(&tried, queue_deadline).await else { break };
        tried.insert(b.addr);
        let connect = TcpStream::connect(b.addr);
        match tokio::time::timeout(Duration::from_millis(svc.cfg.connect_timeout_ms), connect).await {
            Ok(Ok(mut out)) => {
                let _ = out.set_nodelay(true);
                if svc.cfg.send_proxy_protocol
                    && let Err(e) = out.write_all(proxy_v1_line(&inbound).as_bytes()).await
                {
                    b.record_failure(&format!("writing the PROXY line: {e}"));
                    continue;
                }
                b.record_success();
                if let Err(e) = tokio::io::copy_bidirectional(&mut inbound, &mut out).await {
                    tracing::debug!(backend = %b.addr, "tcp copy ended: {e}");
                }
                return;
            }
            Ok(Err(e)) => b.record_failure(&crate::backend::connect_reason(&e)),
            Err(_) => b.record_failure("connect timeout"),
        }
    }
    tracing::debug!(listener = %listener, service = %svc.name, "no healthy backend; closing the connection");
}
