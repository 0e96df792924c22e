//! The HTTP reverse proxy.
//!
//! Routing: the first `[[routes]]` entry (in file order) whose listener, host, path
//! prefix and header all match. Downstream speaks HTTP/1.1 or h2c; upstream is pooled
//! HTTP/1.1.
//!
//! A plain (non-TLS) connection starts on the fast path in `crate::fast`, which handles
//! ordinary HTTP/1.1 requests itself by the rules below, and hands the connection to
//! the hyper server here, at a request boundary, for anything else (its module doc
//! lists what). TLS connections and `redirect_https` listeners are hyper's from the
//! start. Everything below holds on both paths.
//!
//! # When a request is sent again
//!
//! A request is sent to at most `1 + retries` backends, never the same one twice, and
//! each resend spends one token of the service's retry budget (every request adds
//! `retry_budget_percent`/100 of a token). Whether it may be resent depends on how far
//! the failed attempt got:
//!
//! - **Connect failure** (refused, timeout): nothing reached the backend, so any method
//!   may be resent, provided the body can be replayed: it is empty, or it declared a
//!   `Content-Length` of at most 64 KiB and was buffered before the first attempt.
//!   A larger or streamed body is not buffered and never resent.
//! - **Connection lost after the request was written, before any response byte**
//!   (reset, close): resent only for idempotent methods (GET, HEAD, OPTIONS, PUT,
//!   DELETE, TRACE) with an empty body. POST and PATCH are never replayed once sent:
//!   the backend may have acted on them; the client gets 502.
//! - **A response head arrived**: never resent, whatever the status. A 5xx counts as a
//!   passive failure of that backend but is passed through.
//! - **No response head within `request_timeout_ms`** of the request being sent (a
//!   streamed upload's time is the client's: the timer starts at its end): 504, not
//!   resent (the backend may still be working on it), and not counted as a passive
//!   failure (slow is not dead).
//!
//! With no backend in rotation the answer is 503 with the reason in the body. With
//! `max_in_flight_per_backend` set and every backend at it, a request waits up to
//! `queue_timeout_ms` for a slot (woken as soon as one frees), then gets 503.
//!
//! # Upgrades (WebSocket)
//!
//! A request with `Connection: upgrade` keeps its `Upgrade` header; when the backend
//! answers 101 the two upgraded connections are joined and bytes copied both ways, and
//! the backend counts the tunnel as in flight until it closes (so draining waits for it,
//! up to the drain timeout).
//!
//! # Headers to the backend
//!
//! `X-Forwarded-For` (appended to), `X-Forwarded-Proto`, `X-Forwarded-Host`, RFC 7239
//! `Forwarded` (appended to) and `x-request-id` (the client's, or a new one; also on the
//! response). The client address in them is the one a PROXY header carried when the
//! listener accepts the PROXY protocol.
//!
//! # Per-service extras, paid for only when configured
//!
//! The hash key (`balance = "hash"`), the sticky cookie (`sticky_cookie`: pinned
//! backend in, `Set-Cookie` out when the pin was missing or moved), the response cache
//! (looked up before a backend is chosen; a hit never reaches one) and latency samples
//! (`p2c_ewma`: time to the response head, or a penalty for a failure).

use crate::backend::{Affinity, Backend, EWMA_FAILURE_PENALTY, InFlight, Service, Unavailable};
use crate::cache::{self, Cache, RequestRules, Scope};
use crate::config::{Balance, RouteConfig, StickyCookieConfig};
use crate::error::ForwardError;
use crate::pool::{self, PooledBody, SendError};
use crate::{Body, Shared, StopRx};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::UpgradeableConnection;
use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest declared body buffered so a request can be resent after a connect failure.
pub(crate) const REPLAY_BODY_LIMIT: u64 = 64 * 1024;

/// How often an HTTP/2 connection is PINGed, and how long an answer may take.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    name: Arc<str>,
    shared: Arc<Shared>,
    mut stop: StopRx,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // Read once: a reload that changes this listener's settings starts a new task for it.
    let flags = {
        let snap = shared.snapshot();
        let l = snap.cfg.listeners.iter().find(|l| *l.name == *name);
        ConnFlags {
            https: tls.is_some(),
            redirect_https: l.is_some_and(|l| l.redirect_https),
            accept_proxy_protocol: l.is_some_and(|l| l.accept_proxy_protocol),
            head_timeout: l.and_then(|l| l.request_head_timeout()),
        }
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // hyper starts this timer whenever it waits for a head, after a response or once
    // its first bytes told HTTP/1 from HTTP/2 (`fast::Prefixed` bounds that wait): the
    // fast path's rule (`fast::Conn::read_head`).
    builder.http1().timer(TokioTimer::new()).header_read_timeout(flags.head_timeout);
    // A peer that stops answering PINGs is closed: h2's graceful shutdown (drain, idle)
    // waits for a PING's answer before its last GOAWAY, and would wait forever.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let builder = Arc::new(builder);
    // Every connection holds a receiver; the sender's `closed` says they have all ended.
    let (fast_stop, _) = tokio::sync::watch::channel(false);
    let drain = loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(listener = %name, "accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                // Re-registered on the worker that will own the connection.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, "accepted connection: {e}");
                        continue;
                    }
                };
                let (conn_shared, name) = (shared.clone(), name.clone());
                let activity = crate::lifetime::Activity::new();
                let service = {
                    let activity = activity.clone();
                    move |client: SocketAddr, shared: Arc<Shared>, name: Arc<str>| {
                        hyper::service::service_fn(move |req| {
                            let open = activity.begin(req.version() < http::Version::HTTP_2);
                            handle(shared.clone(), name.clone(), client, flags, req, open)
                        })
                    }
                };
                // The PROXY header and the TLS handshake are read in the connection's task
                // so a slow client cannot stall accepts.
                let (builder, tls) = (builder.clone(), tls.clone());
                let fast_stop = fast_stop.subscribe();
                shared.workers.spawn(async move {
                    let shared = conn_shared;
                    let mut stream = match tokio::net::TcpStream::from_std(stream) {
                        Ok(s) => s,
                        Err(e) => return tracing::debug!(%peer, "accepted connection: {e}"),
                    };
                    let mut client = peer;
                    if flags.accept_proxy_protocol {
                        let limit = crate::proxy_protocol::HEADER_TIMEOUT;
                        match crate::proxy_protocol::read_header(&mut stream, limit).await {
                            Ok(Some(c)) => client = c.src,
                            Ok(None) => {}
                            Err(e) => return tracing::debug!(%peer, "{e}; closing the connection"),
                        }
                    }
                    let Some(acceptor) = tls else {
                        // Plain HTTP: the fast path, unless every request is redirected.
                        let io = if flags.redirect_https {
                            crate::fast::Prefixed::new(stream, flags.head_timeout)
                        } else {
                            match crate::fast::serve(stream, client, flags, &shared, &name, fast_stop.clone()).await {
                                crate::fast::Ended::Closed => return,
                                crate::fast::Ended::Fallback(io) => io,
                            }
                        };
                        let io = TokioIo::new(io.bound_writes(activity.clone()));
                        let conn = builder.serve_connection_with_upgrades(io, service(client, shared, name));
                        // Shut down gracefully on drain or after `head_timeout` idle (`lifetime`).
                        let shutdown = UpgradeableConnection::graceful_shutdown;
                        let idle = flags.head_timeout;
                        if let Err(e) = crate::lifetime::drive(conn, shutdown, fast_stop, activity, idle).await {
                            tracing::debug!(%peer, "downstream connection: {e}");
                        }
                        return;
                    };
                    let stream = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return tracing::debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    let stream = crate::fast::Prefixed::new(stream, flags.head_timeout).bound_writes(activity.clone());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service(client, shared, name));
                    let (shutdown, idle) = (UpgradeableConnection::graceful_shutdown, flags.head_timeout);
                    if let Err(e) = crate::lifetime::drive(conn, shutdown, fast_stop, activity, idle).await {
                        tracing::debug!(%peer, "downstream connection: {e}");
                    }
                });
            }
            _ = stop.changed() => break stop.borrow().unwrap_or_default(),
        }
    };
    drop(listener);
    let _ = fast_stop.send(true);
    if tokio::time::timeout(drain, fast_stop.closed()).await.is_err() {
        tracing::warn!(listener = %name, ?drain, "drain timeout: cutting the remaining connections");
    }
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg + "\n")).map_err(|n: Infallible| match n {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// What a connection's listener asks of each of its requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnFlags {
    pub(crate) https: bool,
    redirect_https: bool,
    accept_proxy_protocol: bool,
    /// `request_head_timeout_secs`.
    pub(crate) head_timeout: Option<Duration>,
}

/// 308 to the same host (default port) and path over https.
fn redirect_to_https(req: &Request<Incoming>) -> Response<Body> {
    let host = request_host(req);
    if host.is_empty() {
        return text(StatusCode::BAD_REQUEST, "400 no Host to redirect to https".into());
    }
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut r = text(StatusCode::PERMANENT_REDIRECT, format!("308 https://{host}{pq}"));
    match HeaderValue::from_str(&format!("https://{host}{pq}")) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            r
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "400 the host cannot be redirected".into()),
    }
}

/// `body` as a [`Body`], failing after `limit` without a frame (see `stall`).
fn stall_limited<B>(body: B, limit: Option<Duration>) -> Body
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin + Send + Sync + 'static,
{
    crate::stall::StallLimited::new(body, limit).boxed()
}

/// A request body declared at most [`REPLAY_BODY_LIMIT`] long, read whole so it can be
/// resent; each wait for it bounded by `limit`.
async fn read_small_body(body: Incoming, limit: Option<Duration>) -> Result<Bytes, ForwardError> {
    let mut body = crate::stall::StallLimited::new(body, limit);
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match crate::stall::cause(&*e) {
            Some(stalled) => ForwardError::ClientStalled(stalled.to_string()),
            None => ForwardError::ClientBody(e.to_string()),
        })?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() + data.len()) as u64 > REPLAY_BODY_LIMIT {
                return Err(ForwardError::ClientBody("longer than its content-length".into()));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn empty_body() -> Body {
    Empty::new().map_err(|n: Infallible| match n {}).boxed()
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Appends `v` in lowercase hex, at least `width` digits (like `{:0width$x}`).
fn push_hex(out: &mut [u8; 48], len: &mut usize, mut v: u64, width: usize) {
    /// The two hex digits of each byte value.
    const PAIRS: [[u8; 2]; 256] = {
        let hex = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [hex[i >> 4], hex[i & 0xf]];
            i += 1;
        }
        t
    };
    let digits = (16 - (v.leading_zeros() as usize) / 4).max(width).max(1);
    // Last digits first, a byte (two digits) per table look-up.
    let mut rest = &mut out[*len..*len + digits];
    while let [head @ .., a, b] = rest {
        [*a, *b] = PAIRS[(v & 0xff) as usize];
        v >>= 8;
        rest = head;
    }
    if let [a] = rest {
        *a = PAIRS[(v & 0xf) as usize][1];
    }
    *len += digits;
}

/// `{:012x}{:04x}{:08x}` of the time in ms, the low 16 bits of the pid and a counter,
/// written without a format string or a `getpid` per request.
fn request_id() -> HeaderValue {
    let (mut buf, mut len) = ([0u8; 48], 0);
    request_id_into(&mut buf, &mut len, Instant::now());
    HeaderValue::from_bytes(&buf[..len]).expect("hex digits are a valid header value")
}

/// The time part is the wall clock at the first id plus the monotonic time since, so a
/// caller that has read the clock for the request already (`now`) costs no second
/// reading; it only has to differ between runs of the process, which it does.
fn request_id_into(buf: &mut [u8; 48], len: &mut usize, now: Instant) {
    static BASE: std::sync::OnceLock<(u32, u64, Instant)> = std::sync::OnceLock::new();
    let (pid, wall_ms, at) = *BASE.get_or_init(|| {
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        (std::process::id() & 0xffff, wall.as_millis() as u64, Instant::now())
    });
    let ms = wall_ms + now.saturating_duration_since(at).as_millis() as u64;
    push_hex(buf, len, ms, 12);
    push_hex(buf, len, u64::from(pid), 4);
    push_hex(buf, len, next_id_number(), 8);
}

/// A process-unique number: each thread takes a block of them from one counter at a
/// time, so workers do not write the counter's cache line per request.
fn next_id_number() -> u64 {
    const BLOCK: u64 = 1024;
    static N: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        /// The next number and the end of this thread's block.
        static BLOCK_LEFT: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    BLOCK_LEFT.with(|c| {
        let (mut next, mut end) = c.get();
        if next == end {
            next = N.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        c.set((next + 1, end));
        next
    })
}

/// [`request_id`] appended to `out`; `now` is the request's arrival.
pub(crate) fn write_request_id(out: &mut Vec<u8>, now: Instant) {
    let (mut buf, mut len) = ([0u8; 48], 0);
    request_id_into(&mut buf, &mut len, now);
    out.extend_from_slice(&buf[..len]);
}

/// Host without port, lowercased; from the URI (h2, absolute-form) or the Host header.
fn request_host(req: &Request<Incoming>) -> String {
    let raw =
        req.uri().host().or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok())).unwrap_or_default();
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => raw.split(':').next().unwrap_or_default(),
    };
    host.to_ascii_lowercase()
}

fn host_matches(pattern: &str, host: &[u8]) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
                && host[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern.as_bytes().eq_ignore_ascii_case(host),
    }
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Drops hop-by-hop headers, including any the Connection header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<String> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
            .filter(|s| !s.is_empty())
            .collect();
        for n in &named {
            h.remove(n.as_str());
        }
        h.remove(header::CONNECTION);
    }
    if h.is_empty() {
        return;
    }
    for n in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
    ] {
        h.remove(n);
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// [`is_idempotent`] of a method token as it came off the wire.
pub(crate) fn is_idempotent_method(m: &[u8]) -> bool {
    matches!(m, b"GET" | b"HEAD" | b"OPTIONS" | b"PUT" | b"DELETE" | b"TRACE")
}

/// The first route (in file order) of `listener` whose host, path prefix and header
/// match; `has_header(name, value)` says whether the request carries that header value.
pub(crate) fn find_route<'a>(
    routes: &'a [RouteConfig],
    listener: &str,
    host: &[u8],
    path: &[u8],
    has_header: impl Fn(&str, &str) -> bool,
) -> Option<&'a RouteConfig> {
    routes.iter().find(|r| {
        r.listener == listener
            && r.host.as_deref().is_none_or(|p| host_matches(p, host))
            && path.starts_with(r.path_prefix.as_bytes())
            && r.header.as_ref().is_none_or(|hm| has_header(&hm.name, &hm.value))
    })
}

enum ReqBody {
    /// Can be sent any number of times.
    Replay(Bytes),
    /// Streamed once; taken by the first attempt.
    Stream(Option<Incoming>),
}

/// `peer` is the client: the socket's peer, or the address its PROXY header carried.
async fn handle(
    shared: Arc<Shared>,
    listener: Arc<str>,
    peer: SocketAddr,
    flags: ConnFlags,
    mut req: Request<Incoming>,
    open: crate::lifetime::Open,
) -> Result<Response<Body>, Infallible> {
    // The client's id when it is a non-empty visible-ASCII value, else a new one.
    let id = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(request_id);
    let upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let http2 = req.version() >= http::Version::HTTP_2;
    let start = std::time::Instant::now();
    // Copied for the access log only when it is written.
    let logged = tracing::enabled!(target: "drover_proxy::access", tracing::Level::INFO)
        .then(|| (req.method().clone(), req.uri().path().to_string()));
    let mut trace = Trace { https: flags.https, ..Trace::default() };
    let mut error = None;
    let result = if flags.redirect_https {
        Ok(redirect_to_https(&req))
    } else {
        route_and_forward(&shared, &listener, peer, req, &id, upgrade, &mut trace).await
    };
    let mut resp = result.unwrap_or_else(|e| {
        let r = text(e.status(), format!("{} {e}", e.status().as_u16()));
        error = Some(format!("{:?}: {e}", e.side()));
        r
    });
    shared.count_response(
        &listener,
        trace.service.as_deref().unwrap_or("-"),
        resp.status().as_u16(),
        trace.tries,
        trace.cache,
    );
    // One line per request; `--log-format json` makes it a JSON access log.
    if let Some((method, path)) = logged {
        tracing::info!(
            target: "drover_proxy::access",
            request_id = %id.to_str().unwrap_or_default(),
            listener = %listener,
            %peer,
            %method,
            %path,
            status = resp.status().as_u16(),
            service = trace.service.as_deref().unwrap_or("-"),
            backend = %trace.backend.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
            tries = trace.tries,
            cache = trace.cache.unwrap_or("-"),
            ms = start.elapsed().as_millis() as u64,
            error = error.as_deref().unwrap_or(""),
            "access"
        );
    }
    resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
    Ok(resp.map(|b| open.deliver(b, trace.stall_timeout_ms, http2)))
}

/// What the access log and metrics need to know about how a request was forwarded.
#[derive(Default)]
struct Trace {
    /// Set by the caller: the client came over TLS.
    https: bool,
    service: Option<Arc<str>>,
    backend: Option<SocketAddr>,
    tries: u32,
    /// `HIT` or `MISS` when the route or service caches.
    cache: Option<&'static str>,
    /// The service's `stall_timeout_ms`.
    stall_timeout_ms: Option<u64>,
}

async fn route_and_forward(
    shared: &Shared,
    listener: &str,
    peer: SocketAddr,
    req: Request<Incoming>,
    id: &HeaderValue,
    mut upgrade: Option<OnUpgrade>,
    trace: &mut Trace,
) -> Result<Response<Body>, ForwardError> {
    let snap = shared.snapshot();
    let host = request_host(&req);
    let path = req.uri().path();
    let route = find_route(&snap.cfg.routes, listener, host.as_bytes(), path.as_bytes(), |name, value| {
        req.headers().get_all(name).iter().any(|v| v.as_bytes() == value.as_bytes())
    });
    let Some(route) = route else { return Err(ForwardError::NoRoute { host, path: path.to_string() }) };
    let Some(svc) = snap.services.get(&route.service) else {
        trace.service = Some(Arc::from(route.service.as_str()));
        return Err(ForwardError::NoHealthyBackend(route.service.clone()));
    };
    trace.service = Some(svc.label.clone());
    trace.stall_timeout_ms = Some(svc.cfg.stall_timeout_ms);

    let cache_scope = match (&route.cache, &svc.cfg.cache) {
        (Some(c), _) => Some((Scope::Route(cache::route_scope(route)), c)),
        (None, Some(c)) => Some((Scope::Service(&svc.name), c)),
        (None, None) => None,
    };
    let mut caching: Option<(Arc<Cache>, String, CacheStep)> = None;
    if let Some((scope, cfg)) = cache_scope
        && upgrade.is_none()
    {
        let c = shared.caches.get(&snap, scope, cfg);
        let key = cache::key(&host, req.uri().path_and_query().map_or("/", |p| p.as_str()));
        match cache::request_rules(req.method(), req.headers()) {
            Some(rules) => {
                if rules.lookup
                    && let Some(hit) = c.lookup(&key, req.headers(), Instant::now())
                {
                    trace.cache = Some("HIT");
                    return Ok(cache::hit_response(&hit, Instant::now(), req.method() == Method::HEAD));
                }
                trace.cache = Some("MISS");
                caching = Some((c, key, CacheStep::Store(rules)));
            }
            None if !req.method().is_safe() => caching = Some((c, key, CacheStep::Invalidate)),
            None => {}
        }
    }
    let sticky = svc.cfg.sticky_cookie.as_ref();
    let aff = Affinity {
        key: match (svc.cfg.balance, &svc.cfg.hash_on) {
            (Balance::Hash, Some(on)) => crate::affinity::hash_key(on, req.headers(), peer.ip()),
            _ => None,
        },
        pin: sticky.and_then(|sc| crate::affinity::sticky_pin(sc, req.headers())),
    };

    let (mut parts, body) = req.into_parts();
    let declared: Option<u64> =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    let mut body = if body.is_end_stream() {
        ReqBody::Replay(Bytes::new())
    } else if declared.is_some_and(|n| n <= REPLAY_BODY_LIMIT) {
        ReqBody::Replay(read_small_body(body, svc.cfg.stall_timeout()).await?)
    } else {
        ReqBody::Stream(Some(body))
    };

    // The cache compares the request's own headers (Vary) when it stores a response.
    let req_headers =
        if matches!(caching, Some((_, _, CacheStep::Store(_)))) { parts.headers.clone() } else { HeaderMap::new() };
    let upgrade_proto = if upgrade.is_some() { parts.headers.get(header::UPGRADE).cloned() } else { None };
    let original_host = parts
        .headers
        .get(header::HOST)
        .cloned()
        .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()));
    let mut headers = std::mem::take(&mut parts.headers);
    strip_hop_by_hop(&mut headers);
    if let Some(proto) = upgrade_proto {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
    if let Some(h) = &original_host {
        headers.insert(header::HOST, h.clone());
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
    let ip = peer.ip();
    let mut buf = String::with_capacity(64);
    if let Some(prev) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        buf.push_str(prev);
        buf.push_str(", ");
    }
    let _ = write!(buf, "{ip}");
    if let Ok(v) = HeaderValue::from_str(&buf) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    let proto = if trace.https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    buf.clear();
    if let Some(prev) = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        buf.push_str(prev);
        buf.push_str(", ");
    }
    let _ = if peer.is_ipv6() { write!(buf, "for=\"[{ip}]\"") } else { write!(buf, "for={ip}") };
    buf.push_str(";proto=");
    buf.push_str(proto);
    if let Some(h) = original_host.as_ref().and_then(|h| h.to_str().ok()) {
        buf.push_str(";host=\"");
        buf.push_str(h);
        buf.push('"');
    }
    if let Ok(v) = HeaderValue::from_str(&buf) {
        headers.insert(header::FORWARDED, v);
    }
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    let path_and_query = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));

    let idempotent = is_idempotent(&parts.method);
    svc.note_request();
    let queue_deadline = tokio::time::Instant::now() + Duration::from_millis(svc.cfg.queue_timeout_ms);
    // Filled only when a request is resent, so the first try allocates nothing here.
    let mut tried = HashSet::new();
    let mut resends = 0;
    let mut last: Option<ForwardError> = None;
    // Moved into the last try; copied for a try after which a resend is still possible.
    let mut headers = Some(headers);
    loop {
        let (b, guard) = match svc.acquire_queued(&tried, queue_deadline, aff, std::time::Instant::now()).await {
            Ok(x) => x,
            Err(Unavailable::Saturated) => return Err(ForwardError::Saturated(svc.name.clone())),
            Err(Unavailable::NoneHealthy) => {
                return Err(last.unwrap_or_else(|| ForwardError::NoHealthyBackend(svc.name.clone())));
            }
        };
        trace.backend = Some(b.addr);
        trace.tries += 1;
        // A try that fails to connect gives its request back; one that is lost after
        // sending does not, so the headers are copied when such a loss could be resent.
        let may_resend = resends < svc.cfg.retries && idempotent && matches!(&body, ReqBody::Replay(b) if b.is_empty());
        let mut upload_end = None;
        let send_body = match &mut body {
            ReqBody::Replay(bytes) if bytes.is_empty() => empty_body(),
            ReqBody::Replay(bytes) => Full::new(bytes.clone()).map_err(|n: Infallible| match n {}).boxed(),
            ReqBody::Stream(s) => match s.take() {
                Some(b) => {
                    let (b, end) = crate::stall::StallLimited::new(b, svc.cfg.stall_timeout()).signal_end();
                    upload_end = Some(end);
                    b.boxed()
                }
                None => empty_body(),
            },
        };
        // Origin form (authority form for CONNECT), as a pooled HTTP/1.1 client sends it.
        let uri = if parts.method == Method::CONNECT {
            Uri::try_from(b.addr.to_string()).map_err(|e| ForwardError::ClientBody(e.to_string()))?
        } else {
            Uri::from(path_and_query.clone())
        };
        let mut up = Request::new(send_body);
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = if may_resend {
            headers.clone().expect("kept until the last try")
        } else {
            headers.take().expect("kept until the last try")
        };
        if original_host.is_none() {
            up.headers_mut().insert(header::HOST, b.host.clone());
        }
        let err = match attempt(svc, &b, guard, up, &mut upgrade, upload_end).await {
            Ok(resp) => return Ok(finish_response(resp, &b, caching.take(), &req_headers, sticky, aff, trace.https)),
            Err((e, back)) => {
                if let Some(mut r) = back
                    && headers.is_none()
                {
                    let mut h = std::mem::take(r.headers_mut());
                    if original_host.is_none() {
                        h.remove(header::HOST);
                    }
                    headers = Some(h);
                }
                e
            }
        };
        let replayable = matches!(&body, ReqBody::Replay(_));
        let resend = match &err {
            ForwardError::Connect { .. } => replayable,
            ForwardError::Reset { .. } => idempotent && matches!(&body, ReqBody::Replay(b) if b.is_empty()),
            _ => false,
        };
        tracing::debug!(request_id = %id.to_str().unwrap_or_default(), backend = %b.addr, resend, "{err}");
        if !resend || resends >= svc.cfg.retries || !svc.take_retry() {
            return Err(err);
        }
        tried.insert(b.addr);
        resends += 1;
        last = Some(err);
    }
}

/// What the cache does once a forwarded request has its response.
enum CacheStep {
    /// GET or HEAD: store the response if the rules allow (and say MISS).
    Store(RequestRules),
    /// An unsafe method: a successful answer makes the stored one stale (RFC 9111 4.4).
    Invalidate,
}

/// Stores a cacheable response as it streams by, and (re-)sets a sticky cookie that
/// was missing or named another backend.
fn finish_response(
    mut resp: Response<Body>,
    b: &Backend,
    caching: Option<(Arc<Cache>, String, CacheStep)>,
    req_headers: &HeaderMap,
    sticky: Option<&StickyCookieConfig>,
    aff: Affinity,
    https: bool,
) -> Response<Body> {
    match caching {
        Some((c, key, CacheStep::Store(rules))) => {
            let now = std::time::SystemTime::now();
            if let Some(plan) = cache::storable(rules, resp.status(), resp.headers(), c.config(), now) {
                resp = cache::store_on_completion(resp, c, key, plan, req_headers);
            }
            resp.headers_mut().insert(HeaderName::from_static("x-cache"), HeaderValue::from_static("MISS"));
        }
        Some((c, key, CacheStep::Invalidate)) if resp.status().is_success() || resp.status().is_redirection() => {
            c.invalidate(&key);
        }
        _ => {}
    }
    if let Some(sc) = sticky
        && aff.pin != Some(b.token())
    {
        resp.headers_mut().append(header::SET_COOKIE, crate::affinity::set_cookie(sc, b.token(), https));
    }
    resp
}

/// One try against one backend; the response body keeps the backend's in-flight
/// count up until it has been sent on.
/// A try that made no connection gives the request back.
///
/// `request_timeout_ms` runs from the start of the try, or, for a streamed upload, from
/// its end (`upload_end`): the client decides how long an upload takes (each of its
/// waits bounded by `stall_timeout_ms`), as the fast path does for the bodies it buffers.
/// A backend that stops taking the upload for `stall_timeout_ms` starts it too.
async fn attempt(
    svc: &Service,
    b: &Arc<Backend>,
    guard: InFlight,
    req: Request<Body>,
    downstream: &mut Option<OnUpgrade>,
    upload_end: Option<crate::stall::UploadEnd>,
) -> Result<Response<Body>, (ForwardError, Option<Box<Request<Body>>>)> {
    let ms = svc.cfg.request_timeout_ms;
    let started = (svc.cfg.balance == Balance::P2cEwma).then(Instant::now);
    let connect_timeout = Duration::from_millis(svc.cfg.connect_timeout_ms);
    let deadline = async {
        if let Some(end) = upload_end {
            end.wait(svc.cfg.stall_timeout()).await;
        }
        tokio::time::sleep(Duration::from_millis(ms)).await;
    };
    let result = tokio::select! {
        r = pool::send(b, connect_timeout, req) => Ok(r),
        () = deadline => Err(()),
    };
    // A streamed upload the client stopped sending: the backend is neither failed nor slow.
    let client_stalled = matches!(&result, Ok(Err(SendError::Lost(e))) if crate::stall::cause(e).is_some());
    if let Some(started) = started.filter(|_| !client_stalled) {
        let ok = matches!(&result, Ok(Ok((r, _))) if !r.status().is_server_error());
        b.observe_latency(if ok { started.elapsed() } else { started.elapsed().max(EWMA_FAILURE_PENALTY) });
    }
    match result {
        Ok(Ok((mut resp, conn))) => {
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(down) = downstream.take()
            {
                // The connection now belongs to the tunnel.
                drop(conn);
                b.record_success();
                let up = hyper::upgrade::on(&mut resp);
                tokio::spawn(tunnel(down, up, guard));
                let (parts, _) = resp.into_parts();
                return Ok(Response::from_parts(parts, empty_body()));
            }
            if resp.status().is_server_error() {
                b.record_failure(&format!("HTTP {}", resp.status().as_u16()));
            } else {
                b.record_success();
            }
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let body = stall_limited(PooledBody::new(body, conn, b.clone(), guard), svc.cfg.stall_timeout());
            Ok(Response::from_parts(parts, body))
        }
        Ok(Err(SendError::Connect(e, req))) => {
            let reason = crate::backend::connect_reason(&e);
            b.record_failure(&reason);
            Err((ForwardError::Connect { addr: b.addr, reason }, Some(req)))
        }
        Ok(Err(SendError::Lost(e))) => {
            if let Some(stalled) = crate::stall::cause(&e) {
                return Err((ForwardError::ClientStalled(stalled.to_string()), None));
            }
            b.record_failure("connection lost");
            Err((ForwardError::Reset { addr: b.addr, reason: chain(&e) }, None))
        }
        Err(_) => Err((ForwardError::Timeout { addr: b.addr, ms }, None)),
    }
}

fn wants_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Joins an upgraded client connection to the upgraded backend connection.
async fn tunnel(down: OnUpgrade, up: OnUpgrade, _in_flight: crate::backend::InFlight) {
    match tokio::try_join!(down, up) {
        Ok((down, up)) => {
            let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
            if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
                tracing::debug!("upgraded connection ended: {e}");
            }
        }
        Err(e) => tracing::debug!("upgrade failed: {e}"),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_host_matches_subdomains_only() {
        assert!(host_matches("*.example.com", b"api.example.com"));
        assert!(host_matches("*.example.com", b"a.b.example.com"));
        assert!(!host_matches("*.example.com", b"example.com"));
        assert!(!host_matches("*.example.com", b"badexample.com"));
        assert!(host_matches("Example.com", b"example.com"));
    }

    #[test]
    fn request_ids_are_unique_across_threads_and_carry_the_time() {
        let threads: Vec<_> =
            (0..4).map(|_| std::thread::spawn(|| (0..3000).map(|_| request_id()).collect::<Vec<_>>())).collect();
        let ids: Vec<HeaderValue> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let unique: std::collections::HashSet<&HeaderValue> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let id = ids[0].to_str().unwrap();
        let ms = u64::from_str_radix(&id[..12], 16).unwrap();
        assert!(ms.abs_diff(now_ms) < 60_000, "{id}: time part {ms} vs now {now_ms}");
    }

    #[test]
    fn request_ids_are_written_like_the_format_string() {
        let cases = [(0u64, 4), (0, 0), (0x5, 1), (0xabc, 3), (0x1f, 4), (0x1_0000, 1), (0x1_2345_6789, 8)];
        for (v, w) in cases.into_iter().chain([(u64::MAX, 12), (0x19a_bcde_f012, 12)]) {
            let (mut buf, mut len) = ([0u8; 48], 0);
            push_hex(&mut buf, &mut len, v, w);
            assert_eq!(&buf[..len], format!("{v:0w$x}").as_bytes());
        }
        let (a, b) = (request_id(), request_id());
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
    }

    #[test]
    fn connection_named_headers_are_stripped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-secret").is_none() && h.get(header::CONNECTION).is_none());
        assert!(h.get("x-kept").is_some());
    }
}
