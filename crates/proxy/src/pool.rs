//! Upstream HTTP/1.1 connections: each backend keeps a small stack of idle
//! connections (most recently used first), and a request takes one or opens a new one.
//!
//! A connection goes back on the stack once its response body has been read to the
//! end; one whose response was cut short, or that was upgraded (101), is closed instead.
//! A connection found closed when taken is dropped, and a request that a reused
//! connection refused before writing anything (it closed in the meantime) is tried on
//! another one, so a backend closing idle keep-alive connections costs no error.

use crate::Body;
use crate::backend::{Backend, InFlight};
use crate::workers::{Padded, SHARDS, shard};
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Idle connections kept per backend.
const MAX_IDLE: usize = 64;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A backend's idle connections, oldest first: hyper's for requests hyper serves, plain
/// sockets for the fast path (`crate::fast`), which speaks HTTP/1.1 on them itself. The
/// sockets are kept per connection worker (`crate::workers`): a socket is registered
/// with the event loop of the worker that opened it, so another worker using it would
/// be woken across threads.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Idle<SendRequest<Body>>,
    streams: [Padded<Idle<tokio::net::TcpStream>>; SHARDS],
}

/// A stack of idle connections with the time each expires (put back + `IDLE_TIMEOUT`:
/// a comparison per take instead of a subtraction), oldest first.
struct Idle<T>(Mutex<Vec<(T, Instant)>>);

impl<T> Default for Idle<T> {
    fn default() -> Self {
        Idle(Mutex::new(Vec::new()))
    }
}

impl<T> Idle<T> {
    fn len(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// The most recently used one that `open` accepts and that has not idled too long
    /// at `now`; the others met on the way are dropped.
    fn take(&self, now: Instant, open: impl Fn(&T) -> bool) -> Option<T> {
        let mut idle = self.0.lock().unwrap();
        while let Some((c, expires)) = idle.pop() {
            if now < expires && open(&c) {
                return Some(c);
            }
        }
        None
    }

    fn put(&self, c: T, now: Instant) {
        let mut idle = self.0.lock().unwrap();
        // The oldest are at the front: drop those that expired or overflow the stack.
        let stale = idle.iter().take_while(|(_, expires)| now >= *expires).count();
        let over = (idle.len() + 1).saturating_sub(MAX_IDLE);
        if stale.max(over) > 0 {
            idle.drain(..stale.max(over));
        }
        idle.push((c, now + IDLE_TIMEOUT));
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle.len())
            .field("streams", &self.streams.iter().map(|s| s.len()).sum::<usize>())
            .finish()
    }
}

impl Pool {
    fn take(&self) -> Option<SendRequest<Body>> {
        self.idle.take(Instant::now(), |sr| !sr.is_closed())
    }

    fn put(&self, sr: SendRequest<Body>) {
        if !sr.is_closed() {
            self.idle.put(sr, Instant::now());
        }
    }

    /// This worker's most recently used idle socket that is still open; `now` is the
    /// request's clock reading. A socket the backend closed (or wrote to unasked) shows
    /// as readable; that costs no system call to see, as the runtime already knows the
    /// socket's readiness.
    pub(crate) fn take_stream(&self, now: Instant) -> Option<tokio::net::TcpStream> {
        self.streams[shard()].take(now, |s| {
            let mut probe = [0u8; 1];
            matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
    }

    /// Keeps a socket whose last response was read to its end.
    pub(crate) fn put_stream(&self, s: tokio::net::TcpStream, now: Instant) {
        self.streams[shard()].put(s, now);
    }
}

/// Why a request got no response head from a backend.
pub(crate) enum SendError {
    /// No connection could be made: nothing was sent, and the request comes back.
    Connect(std::io::Error, Box<Request<Body>>),
    /// The connection failed after the request was (or may have been) written.
    Lost(hyper::Error),
}

/// A new upstream socket, within `timeout`, with Nagle off.
pub(crate) async fn connect_stream(
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(s) => s?,
        Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timeout")),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connect(b: &Backend, timeout: Duration) -> std::io::Result<SendRequest<Body>> {
    let stream = connect_stream(b.addr, timeout).await?;
    let (sr, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    let addr = b.addr;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(backend = %addr, "upstream connection: {e}");
        }
    });
    Ok(sr)
}

/// Sends `req` on an idle connection to `b` or a new one (made within `connect_timeout`);
/// the response comes with its connection, to be given back by [`PooledBody`].
pub(crate) async fn send(
    b: &Backend,
    connect_timeout: Duration,
    mut req: Request<Body>,
) -> Result<(Response<Incoming>, SendRequest<Body>), SendError> {
    loop {
        let (mut sr, reused) = match b.pool.take() {
            Some(sr) => (sr, true),
            None => match connect(b, connect_timeout).await {
                Ok(sr) => (sr, false),
                Err(e) => return Err(SendError::Connect(e, Box::new(req))),
            },
        };
        if let Err(e) = sr.ready().await {
            if reused {
                continue;
            }
            return Err(SendError::Lost(e));
        }
        match sr.try_send_request(req).await {
            Ok(resp) => return Ok((resp, sr)),
            Err(mut e) => match e.take_message() {
                // Refused before a byte was written: the idle connection had closed.
                Some(r) if reused => req = r,
                _ => return Err(SendError::Lost(e.into_error())),
            },
        }
    }
}

/// A backend's response body: keeps the backend's in-flight count up until it has been
/// sent on, and gives the connection back to the pool once it was read to the end.
pub(crate) struct PooledBody {
    inner: Incoming,
    conn: Option<(SendRequest<Body>, Arc<Backend>)>,
    done: bool,
    _in_flight: InFlight,
}

impl PooledBody {
    pub(crate) fn new(inner: Incoming, sr: SendRequest<Body>, b: Arc<Backend>, in_flight: InFlight) -> PooledBody {
        PooledBody { inner, conn: Some((sr, b)), done: false, _in_flight: in_flight }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            self.done = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if (self.done || self.inner.is_end_stream())
            && let Some((sr, b)) = self.conn.take()
        {
            b.pool.put(sr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServiceConfig;
    use http_body_util::{BodyExt, Empty, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn cfg() -> ServiceConfig {
        ServiceConfig::for_tests()
    }

    /// A backend answering "ok"; counts the connections it accepted. With `close`, each
    /// response says `Connection: close`.
    async fn backend(close: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                n.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
                        if close {
                            r.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(r)
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                });
            }
        });
        (addr, accepted)
    }

    async fn get(b: &Arc<Backend>) -> Bytes {
        let req = Request::builder()
            .uri("/")
            .header(http::header::HOST, "x")
            .body(Empty::new().map_err(|n| match n {}).boxed())
            .unwrap();
        let (resp, sr) = send(b, Duration::from_secs(1), req).await.ok().expect("response");
        let body = PooledBody::new(resp.into_body(), sr, b.clone(), b.start_request());
        body.collect().await.unwrap().to_bytes()
    }

    #[test]
    fn an_idle_connection_is_reused_until_it_has_idled_too_long_then_dropped() {
        let idle = Idle::default();
        let t0 = Instant::now();
        idle.put(1, t0);
        assert_eq!(idle.take(t0 + IDLE_TIMEOUT - Duration::from_millis(1), |_| true), Some(1));
        idle.put(1, t0);
        assert_eq!(idle.take(t0 + IDLE_TIMEOUT, |_| true), None, "expired at IDLE_TIMEOUT");
        assert_eq!(idle.len(), 0, "an expired one met on the way is dropped");
        // Putting one back drops those at the front that expired meanwhile.
        idle.put(1, t0);
        idle.put(2, t0 + IDLE_TIMEOUT);
        assert_eq!(idle.len(), 1);
        assert_eq!(idle.take(t0 + IDLE_TIMEOUT, |_| true), Some(2));
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_was_read() {
        let (addr, accepted) = backend(false).await;
        let b = Backend::new(addr, 1, None, &cfg());
        for _ in 0..5 {
            assert_eq!(get(&b).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closes_is_not_reused() {
        let (addr, accepted) = backend(true).await;
        let b = Backend::new(addr, 1, None, &cfg());
        for _ in 0..3 {
            assert_eq!(get(&b).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }
}
