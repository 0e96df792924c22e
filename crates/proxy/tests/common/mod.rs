//! Real HTTP and TCP backends on 127.0.0.1:0 inside the test process, and a pooled
//! client to drive the proxy. A backend can be killed abruptly: its acceptor and every
//! connection task are aborted, so sockets close with no goodbye, like `kill -9`.
#![allow(dead_code)]

use bytes::Bytes;
use drover_proxy::config::ProxyConfig;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::task::{JoinHandle, JoinSet};

#[derive(Default)]
pub struct Counters {
    /// Requests other than health checks.
    pub hits: AtomicUsize,
    pub posts: AtomicUsize,
    pub health_checks: AtomicUsize,
    /// Health checks answered 200 before the first real request arrived.
    pub ok_checks_before_first_hit: AtomicUsize,
    ok_checks: AtomicUsize,
    /// When false, `/healthz` answers 503.
    pub healthy: AtomicBool,
    /// Close the connection (no response) after reading the request.
    pub reset_posts: AtomicBool,
    pub reset_all: AtomicBool,
    /// Requests being handled now, and the most at once.
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    /// Added to every request other than health checks (a slow backend).
    pub delay_ms: AtomicU64,
    /// Set by `kill`: aborting tasks takes effect only when each is next scheduled, so
    /// until then a connection task still running drops its request unanswered.
    killed: AtomicBool,
}

struct Active<'a>(&'a Counters);
impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct TestBackend {
    pub addr: SocketAddr,
    pub name: String,
    pub c: Arc<Counters>,
    task: JoinHandle<()>,
}

impl TestBackend {
    pub async fn start(name: &str) -> TestBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let c = Arc::new(Counters { healthy: AtomicBool::new(true), ..Counters::default() });
        let (c2, name2) = (c.clone(), name.to_string());
        let task = tokio::spawn(async move {
            // Owned here so aborting this task drops (aborts) every connection too.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    Ok((s, _)) = listener.accept() => {
                        let (c, name) = (c2.clone(), name2.clone());
                        let svc = hyper::service::service_fn(move |req| serve(c.clone(), name.clone(), req));
                        conns.spawn(async move {
                            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).with_upgrades().await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        TestBackend { addr, name: name.to_string(), c, task }
    }

    pub fn kill(&self) {
        self.c.killed.store(true, Ordering::SeqCst);
        self.task.abort();
    }

    pub fn hits(&self) -> usize {
        self.c.hits.load(Ordering::SeqCst)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    c: Arc<Counters>,
    name: String,
    mut req: hyper::Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::io::Error> {
    if c.killed.load(Ordering::SeqCst) {
        return Err(std::io::Error::other("killed"));
    }
    if req.headers().get("upgrade").is_some_and(|v| v == "echo") {
        c.hits.fetch_add(1, Ordering::SeqCst);
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = hyper::Response::new(Full::new(Bytes::new()));
        *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert("connection", http::HeaderValue::from_static("upgrade"));
        r.headers_mut().insert("upgrade", http::HeaderValue::from_static("echo"));
        return Ok(r);
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if path == "/healthz" {
        c.health_checks.fetch_add(1, Ordering::SeqCst);
        let ok = c.healthy.load(Ordering::SeqCst);
        if ok {
            c.ok_checks.fetch_add(1, Ordering::SeqCst);
        }
        let mut r = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
        if !ok {
            *r.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        }
        return Ok(r);
    }
    let now = c.active.fetch_add(1, Ordering::SeqCst) + 1;
    c.max_active.fetch_max(now, Ordering::SeqCst);
    let _active = Active(&c);
    if c.hits.fetch_add(1, Ordering::SeqCst) == 0 {
        c.ok_checks_before_first_hit.store(c.ok_checks.load(Ordering::SeqCst), Ordering::SeqCst);
    }
    let method = req.method().clone();
    let headers = req.headers().clone();
    let _body = req.into_body().collect().await.map_err(std::io::Error::other)?;
    if method == hyper::Method::POST {
        c.posts.fetch_add(1, Ordering::SeqCst);
        if c.reset_posts.load(Ordering::SeqCst) {
            // A service error makes hyper drop the connection without a response.
            return Err(std::io::Error::other("reset"));
        }
    }
    if c.reset_all.load(Ordering::SeqCst) {
        return Err(std::io::Error::other("reset"));
    }
    // Query parameters: `sleep_ms=N`, and `cc=VALUE` for the response's Cache-Control.
    let param = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=').map(str::to_string));
    let sleep = param("sleep_ms").and_then(|v| v.parse().ok()).unwrap_or(0) + c.delay_ms.load(Ordering::SeqCst);
    if sleep > 0 {
        tokio::time::sleep(Duration::from_millis(sleep)).await;
    }
    let echo = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string();
    let body = format!(
        "{name} {path} xff={} proto={} xhost={} fwd={} id={}",
        echo("x-forwarded-for"),
        echo("x-forwarded-proto"),
        echo("x-forwarded-host"),
        echo("forwarded"),
        echo("x-request-id")
    );
    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
    if let Some(cc) = param("cc").and_then(|v| http::HeaderValue::from_str(&v).ok()) {
        resp.headers_mut().insert("cache-control", cc);
    }
    Ok(resp)
}

/// A TCP echo server.
pub async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let t = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, t)
}

/// An address nothing listens on, and that no backend of this test process will be
/// given later (`drover_testkit` ports lie outside the range `bind(:0)` draws from).
pub fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], drover_testkit::free_port()))
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: http::HeaderMap,
}

pub async fn send(c: &TestClient, method: &str, url: &str, host: Option<&str>, body: &str) -> Result<Reply, String> {
    let mut b = hyper::Request::builder().method(method).uri(url);
    if let Some(h) = host {
        b = b.header("host", h);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let resp = c.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status, body: String::from_utf8_lossy(&body).into_owned(), headers })
}

pub async fn get(c: &TestClient, url: &str) -> Result<Reply, String> {
    send(c, "GET", url, None, "").await
}

/// A request with extra headers.
pub async fn send_with(c: &TestClient, method: &str, url: &str, headers: &[(&str, &str)]) -> Result<Reply, String> {
    let mut b = hyper::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = c.request(b.body(Full::new(Bytes::new())).unwrap()).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status, body: String::from_utf8_lossy(&body).into_owned(), headers })
}

impl Reply {
    /// The name of the test backend that answered (the first word of its body).
    pub fn backend(&self) -> &str {
        self.body.split(' ').next().unwrap_or_default()
    }
}

pub fn parse(text: &str) -> ProxyConfig {
    ProxyConfig::parse(Path::new("test.toml"), text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Polls `f` every 20 ms until it returns true, or panics with `what`.
pub async fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The admin state of `addr` in `service`, from `RunningProxy::backends`.
pub fn state_of(p: &drover_proxy::RunningProxy, service: &str, addr: SocketAddr) -> Option<serde_json::Value> {
    p.backends()["services"][service].as_array()?.iter().find(|b| b["address"] == addr.to_string()).cloned()
}

/// The plain-HTTP listener `web` most tests route from (more of its keys may follow).
pub const WEB_LISTENER: &str = r#"[[listeners]]
name = "web"
bind = "127.0.0.1:0"
protocol = "http"
"#;

/// A config with `top` (top-level keys), one http listener `web` routing everything
/// to service `app` over `addrs`, and `service` inside `[services.app]` (tables such as
/// `[services.app.health]` may follow in it).
pub fn web_to_app(top: &str, addrs: &[SocketAddr], service: &str) -> String {
    web_to_app_routed(top, "", addrs, service)
}

/// [`web_to_app`] with `route` inside the route's table (`cache = { ... }` and the like).
pub fn web_to_app_routed(top: &str, route: &str, addrs: &[SocketAddr], service: &str) -> String {
    format!(
        r#"
{top}
{WEB_LISTENER}
[[routes]]
listener = "web"
service = "app"
{route}

[services.app]
backends = {}
{service}
"#,
        backends_toml(addrs)
    )
}

pub fn backends_toml(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs.iter().map(|a| format!("{{ address = \"{a}\" }}")).collect();
    format!("[{}]", items.join(", "))
}

/// A config with one tcp listener `pg` (plus `listener` keys) in front of service `db`
/// over `addrs` (plus `service` keys; tables such as `[services.db.health]` may follow).
pub fn pg_to_db(listener: &str, addrs: &[SocketAddr], service: &str) -> String {
    format!(
        r#"
[[listeners]]
name = "pg"
bind = "127.0.0.1:0"
protocol = "tcp"
service = "db"
{listener}
[services.db]
backends = {}
{service}
"#,
        backends_toml(addrs)
    )
}

/// Reads from `s` until a blank line ends a message head, or the peer closes or fails;
/// returns what was read (the head, perhaps with bytes after it).
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    head
}

/// A 200 response with a body of `len` bytes, as a backend writes it.
pub fn big_answer(len: usize) -> Vec<u8> {
    let mut answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n").into_bytes();
    answer.resize(answer.len() + len, b'b');
    answer
}

/// A backend that reads each request's head, writes `answer` (if any) and then holds
/// the socket open, reading nothing more: a backend that stalls, or stops taking an
/// upload. Aborting the task closes every connection.
pub async fn head_only_backend(answer: Vec<u8>) -> (SocketAddr, JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            conns.spawn(async move {
                read_head(&mut s).await;
                let _ = s.write_all(&answer).await;
                std::future::pending::<()>().await;
                drop(s);
            });
        }
    });
    (addr, task)
}
