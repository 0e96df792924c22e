//! The HTTP/1.1 fast path over real sockets: framing, keep-alive and pipelining,
//! the pool of upstream sockets, the retry rules, fallback to hyper at a request
//! boundary, and draining. Clients and backends here write raw bytes, so the proxy's
//! exact wire behaviour is what is checked.

mod common;

use common::*;
use drover_proxy::Proxy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(backends: &[SocketAddr], extra: &str) -> String {
    web_to_app("drain_timeout_secs = 5", backends, &format!("passive_failures = 0\n{extra}"))
}

/// One request as a raw backend saw it.
#[derive(Clone, Debug)]
struct Seen {
    head: String,
    body: Vec<u8>,
}

/// What a raw backend does with a request.
enum Reply {
    /// Write these bytes, keep the connection.
    Bytes(Vec<u8>),
    /// Write these bytes, then close.
    Close(Vec<u8>),
    /// Close without answering.
    Reset,
}

/// A backend speaking HTTP/1.1 by hand: reads a head and a Content-Length or chunked
/// body, asks `reply`; counts connections and keeps what it saw.
struct RawBackend {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads one chunked body from `buf` + `s`; returns it decoded and what follows it.
async fn read_chunked(s: &mut TcpStream, mut buf: Vec<u8>) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut body = Vec::new();
    loop {
        while find(&buf, b"\r\n").is_none() {
            let mut more = [0u8; 4096];
            let n = s.read(&mut more).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&more[..n]);
        }
        let line_end = find(&buf, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            // No trailers in these tests: the final CRLF follows.
            while buf.len() < line_end + 4 {
                let mut more = [0u8; 64];
                let n = s.read(&mut more).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&more[..n]);
            }
            return Some((body, buf[line_end + 4..].to_vec()));
        }
        while buf.len() < line_end + 2 + size + 2 {
            let mut more = [0u8; 65536];
            let n = s.read(&mut more).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&more[..n]);
        }
        body.extend_from_slice(&buf[line_end + 2..line_end + 2 + size]);
        buf.drain(..line_end + 2 + size + 2);
    }
}

/// Reads one message (head and body) from `s` with `buf` already read; returns the
/// head, the body and the bytes after it. `no_body` for answers to HEAD.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>, no_body: bool) -> Option<(String, Vec<u8>)> {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut more = [0u8; 65536];
        let n = s.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&more[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let rest = buf.split_off(end);
    buf.clear();
    if no_body {
        *buf = rest;
        return Some((head, Vec::new()));
    }
    if header(&head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let (body, after) = read_chunked(s, rest).await?;
        *buf = after;
        return Some((head, body));
    }
    let len: usize = header(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut rest = rest;
    while rest.len() < len {
        let mut more = [0u8; 65536];
        let n = s.read(&mut more).await.ok()?;
        if n == 0 {
            return None;
        }
        rest.extend_from_slice(&more[..n]);
    }
    *buf = rest.split_off(len);
    Some((head, rest))
}

impl RawBackend {
    async fn start(reply: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) -> RawBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let reply = Arc::new(reply);
        let (c2, s2) = (conns.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let mut tasks = tokio::task::JoinSet::new();
            while let Ok((mut s, _)) = l.accept().await {
                c2.fetch_add(1, Ordering::SeqCst);
                let (seen, reply) = (s2.clone(), reply.clone());
                tasks.spawn(async move {
                    let mut buf = Vec::new();
                    while let Some((head, body)) = read_message(&mut s, &mut buf, false).await {
                        let req = Seen { head, body };
                        let n = {
                            let mut all = seen.lock().unwrap();
                            all.push(req.clone());
                            all.len()
                        };
                        match reply(&req, n) {
                            Reply::Bytes(b) => {
                                if s.write_all(&b).await.is_err() {
                                    return;
                                }
                            }
                            Reply::Close(b) => {
                                let _ = s.write_all(&b).await;
                                return;
                            }
                            Reply::Reset => return,
                        }
                    }
                });
            }
        });
        RawBackend { addr, conns, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn ok(body: &str) -> Reply {
    Reply::Bytes(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes())
}

async fn proxy_for(backend: SocketAddr, extra: &str) -> (drover_proxy::RunningProxy, SocketAddr) {
    let p = Proxy::start(parse(&config(&[backend], extra))).await.unwrap();
    let addr = p.local_addr("web").unwrap();
    (p, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_on_one_upstream_connection() {
    let b = RawBackend::start(|req, _| ok(req.head.lines().next().unwrap_or_default().split(' ').nth(1).unwrap_or("")))
        .await;
    let (p, addr) = proxy_for(b.addr, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    for want in ["/1", "/2", "/3"] {
        let (head, body) = read_message(&mut s, &mut buf, false).await.expect("a response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(header(&head, "x-request-id").is_some(), "{head}");
        assert_eq!(String::from_utf8_lossy(&body), want);
    }
    assert_eq!(b.conns.load(Ordering::SeqCst), 1, "the upstream connection was reused");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_close_delimited_responses_reach_the_client_whole_and_keep_it_alive() {
    let big: String = (0..20_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let big2 = big.clone();
    let b = RawBackend::start(move |req, _| {
        if req.head.starts_with("GET /chunked") {
            let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for part in [&big2[..7], &big2[7..20_000]] {
                r.extend_from_slice(format!("{:x};ext=1\r\n{part}\r\n", part.len()).as_bytes());
            }
            r.extend_from_slice(b"0\r\n\r\n");
            Reply::Bytes(r)
        } else {
            // No length: the body ends when the backend closes.
            Reply::Close(format!("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{big2}").into_bytes())
        }
    })
    .await;
    let (p, addr) = proxy_for(b.addr, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for path in ["/chunked", "/until-close", "/chunked"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).await.unwrap();
        let (head, body) = read_message(&mut s, &mut buf, false).await.expect("a response on the same connection");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(header(&head, "transfer-encoding"), Some("chunked"), "{head}");
        assert!(header(&head, "connection").is_none(), "the client connection stays open: {head}");
        assert_eq!(body.len(), big.len(), "{path}");
        assert!(body == big.as_bytes(), "{path}: body changed");
    }
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_pass_both_ways_and_large_uploads_are_streamed_by_hyper() {
    let b = RawBackend::start(|req, _| {
        let body = vec![b'x'; 3 << 20];
        let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-got: {}\r\n\r\n", body.len(), req.body.len())
            .into_bytes();
        r.extend_from_slice(&body);
        Reply::Bytes(r)
    })
    .await;
    let (p, addr) = proxy_for(b.addr, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    // 60 KiB: read whole by the fast path (replayable); 300 KiB: over the replay
    // limit, so hyper streams it; both on one client connection.
    for (n, chunked) in [(60 << 10, false), (300 << 10, false), (200 << 10, true)] {
        let payload = vec![b'p'; n];
        let mut req = if chunked {
            b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec()
        } else {
            format!("POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\n\r\n").into_bytes()
        };
        if chunked {
            for part in payload.chunks(50_000) {
                req.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                req.extend_from_slice(part);
                req.extend_from_slice(b"\r\n");
            }
            req.extend_from_slice(b"0\r\n\r\n");
        } else {
            req.extend_from_slice(&payload);
        }
        s.write_all(&req).await.unwrap();
        let (head, body) = read_message(&mut s, &mut buf, false).await.expect("a response");
        assert!(head.to_ascii_lowercase().starts_with("http/1.1 200"), "{head}");
        assert_eq!(header(&head, "x-got"), Some(n.to_string().as_str()), "{head}");
        assert_eq!(body.len(), 3 << 20);
    }
    assert!(b.seen().iter().all(|r| r.body.iter().all(|&c| c == b'p')));
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_late_gets_a_large_response_whole_and_in_order() {
    // More than loopback's socket buffers hold while the client is not reading: the
    // proxy's writes find them full, wait, and must resume exactly where they stopped.
    const LEN: usize = 16 << 20;
    let b = RawBackend::start(|_, _| {
        let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n").into_bytes();
        r.extend((0..LEN).map(|i| (i % 251) as u8));
        Reply::Bytes(r)
    })
    .await;
    let (p, addr) = proxy_for(b.addr, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for path in ["/big", "/again"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (head, body) = read_message(&mut s, &mut buf, false).await.expect("the whole response");
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        assert_eq!(body.len(), LEN, "{path}");
        assert!(body.iter().enumerate().all(|(i, &c)| c == (i % 251) as u8), "{path}: bytes lost, repeated or moved");
    }
    assert_eq!(b.conns.load(Ordering::SeqCst), 1, "one upstream connection, kept alive across both");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_replace_hop_by_hop_ones_and_head_answers_have_no_body() {
    let b = RawBackend::start(|req, _| {
        if req.head.starts_with("HEAD") {
            Reply::Bytes(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nKeep-Alive: timeout=5\r\n\r\n".to_vec())
        } else {
            ok("fine")
        }
    })
    .await;
    let (p, addr) = proxy_for(b.addr, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"HEAD /h HTTP/1.1\r\nHost: Shop.example:81\r\nConnection: keep-alive, x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\
          X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: gopher\r\nForwarded: for=192.0.2.7\r\nX-Request-Id: abc\r\n\r\n\
          GET /g HTTP/1.1\r\nHost: s\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_message(&mut s, &mut buf, true).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(header(&head, "content-length"), Some("5"), "{head} {:?}", b.seen());
    assert!(header(&head, "keep-alive").is_none(), "{head}");
    assert_eq!(header(&head, "x-request-id"), Some("abc"));
    assert!(body.is_empty());
    let (head, body) = read_message(&mut s, &mut buf, false).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200") && body == b"fine", "{head}");
    let seen = b.seen();
    let up = &seen[0].head;
    assert!(up.starts_with("HEAD /h HTTP/1.1\r\n"), "{up}");
    assert_eq!(header(up, "host"), Some("Shop.example:81"));
    assert_eq!(header(up, "x-forwarded-host"), Some("Shop.example:81"));
    assert_eq!(header(up, "x-forwarded-for"), Some("192.0.2.7, 127.0.0.1"));
    assert_eq!(header(up, "x-forwarded-proto"), Some("http"));
    assert_eq!(header(up, "forwarded"), Some("for=192.0.2.7, for=127.0.0.1;proto=http;host=\"Shop.example:81\""));
    assert_eq!(header(up, "x-request-id"), Some("abc"));
    for gone in ["connection", "x-secret", "keep-alive"] {
        assert!(header(up, gone).is_none(), "{gone} was forwarded: {up}");
    }
    let id = header(&seen[1].head, "x-request-id").unwrap();
    assert_eq!(id.len(), 24, "a new id for the request without one: {id}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_while_idle_costs_no_error_and_no_replay() {
    // Every response says keep-alive, but the backend closes each connection 50 ms
    // after answering: the proxy must not send the next request into a dead socket.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let posts = Arc::new(AtomicUsize::new(0));
    let posts2 = posts.clone();
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let posts = posts2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if let Some((head, _)) = read_message(&mut s, &mut buf, false).await {
                    if head.starts_with("POST") {
                        posts.fetch_add(1, Ordering::SeqCst);
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            });
        }
    });
    let (p, paddr) = proxy_for(addr, "").await;
    let c = client();
    for _ in 0..5 {
        let r = send(&c, "POST", &format!("http://{paddr}/p"), None, "{}").await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(posts.load(Ordering::SeqCst), 5, "each POST reached the backend exactly once");
    server.abort();
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_backend_reset_mid_request_is_502_and_never_replayed() {
    let bad = RawBackend::start(|_, _| Reply::Reset).await;
    let good = RawBackend::start(|_, _| ok("good")).await;
    let p = Proxy::start(parse(&config(&[bad.addr, good.addr], ""))).await.unwrap();
    let addr = p.local_addr("web").unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"POST /o HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello").await.unwrap();
    let (head, body) = read_message(&mut s, &mut buf, false).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("connection lost before the response"), "{head}");
    assert_eq!(bad.seen().len(), 1);
    assert!(good.seen().is_empty(), "the POST was replayed");
    // The same client connection goes on; a GET that meets the reset is resent.
    s.write_all(b"GET /g HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let (head, body) = read_message(&mut s, &mut buf, false).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200") && body == b"good", "{head}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_falls_back_to_hyper_for_an_upgrade_after_fast_requests() {
    let b = TestBackend::start("ws").await;
    let (p, addr) = proxy_for(b.addr, "").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let (head, body) = read_message(&mut s, &mut buf, false).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.starts_with(b"ws /plain "));
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").await.unwrap();
    let (head, _) = read_message(&mut s, &mut buf, true).await.unwrap();
    assert!(head.to_ascii_lowercase().starts_with("http/1.1 101"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_closes_idle_keep_alive_connections_and_finishes_the_request_in_flight() {
    let b = TestBackend::start("slow").await;
    let (p, addr) = proxy_for(b.addr, "").await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    idle.write_all(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_message(&mut idle, &mut buf, false).await.unwrap();
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /slow?sleep_ms=600 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    wait_until(Duration::from_secs(2), "the slow request reached the backend", || b.hits() == 2).await;
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(p.shutdown(Duration::from_secs(5)));
    let mut rest = Vec::new();
    assert_eq!(idle.read_to_end(&mut rest).await.unwrap(), 0, "the idle connection is closed at once");
    let mut buf = Vec::new();
    let (head, body) = read_message(&mut busy, &mut buf, false).await.expect("the slow response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(header(&head, "connection"), Some("close"), "{head}");
    assert!(body.starts_with(b"slow /slow"));
    stopping.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown waited for no idle connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_kept_alive_connection_gets_its_own_whole_timeout() {
    let b = TestBackend::start("b").await;
    let (p, addr) = proxy_for(b.addr, "request_timeout_ms = 400").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let mut get = async |path: &str| {
        let started = std::time::Instant::now();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let (head, _) = read_message(&mut s, &mut buf, false).await.expect("an answer on the same connection");
        (head, started.elapsed())
    };
    let (head, _) = get("/quick").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The connection's timer still points at the quick request's deadline, which falls
    // 200 ms into this 300 ms request: it must be moved on, not taken as a timeout.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (head, took) = get("/slow?sleep_ms=300").await;
    assert!(head.starts_with("HTTP/1.1 200"), "a request within its own 400 ms: {head} after {took:?}");
    let (head, took) = get("/stuck?sleep_ms=3000").await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(took >= Duration::from_millis(390) && took < Duration::from_millis(1500), "504 after {took:?}");
    let (head, _) = get("/after").await;
    assert!(head.starts_with("HTTP/1.1 200"), "the connection is still served: {head}");
    p.shutdown(Duration::from_secs(1)).await;
}

/// Reads until the proxy closes `s` (or `limit` passes): how long that took, or `None`
/// if it never closed. Bytes the proxy sends first are read and dropped.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    let mut sink = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut sink)).await {
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_not_complete_in_time_closes_idle_and_trickling_clients_but_not_busy_ones() {
    let b = RawBackend::start(|_, _| ok("fine")).await;
    let cfg =
        config(&[b.addr], "").replace("protocol = \"http\"", "protocol = \"http\"\nrequest_head_timeout_secs = 1");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let addr = p.local_addr("web").unwrap();

    // Idle after a response: closed one second after it, not before.
    // Measured from before the request: the proxy's wait begins after its answer.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let asked = std::time::Instant::now();
    idle.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    read_message(&mut idle, &mut buf, false).await.expect("an answer");
    closed_within(&mut idle, Duration::from_secs(5)).await.expect("an idle keep-alive connection is closed");
    let took = asked.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "closed {took:?} after the request");

    // Never a request: closed one second after accept.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5)).await.expect("a silent connection is closed");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");

    // Slowloris: bytes keep coming, the head never completes; the bytes do not buy time.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let trickle = async {
        slow.write_all(b"GET /slow HTTP/1.1\r\n").await.unwrap();
        for i in 0..20 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(format!("X-Pad-{i}: 1\r\n").as_bytes()).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "the trickling client was closed only after {took:?}");
    assert!(rest.is_empty(), "no answer to a head that never completed: {}", String::from_utf8_lossy(&rest));

    // Busy: a request every 400 ms for 2.4 s on one connection, each within its own second.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        busy.write_all(format!("GET /busy{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let (head, _) = read_message(&mut busy, &mut buf, false).await.expect("the same connection answers");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    assert_eq!(b.seen().len(), 7, "the trickled head never reached the backend");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_moving_is_cut_after_stall_timeout_on_either_side() {
    // The backend promises 100 bytes, sends 10 and then nothing, keeping its socket open;
    // `/big` gets 32 MiB whole, more than the sockets between proxy and client hold.
    const BIG: usize = 32 << 20;
    let b = RawBackend::start(|req, _| {
        if req.head.starts_with("GET /big ") {
            let mut r = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
            r.resize(r.len() + BIG, b'b');
            Reply::Bytes(r)
        } else {
            Reply::Bytes(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789".to_vec())
        }
    })
    .await;
    let (p, addr) = proxy_for(b.addr, "stall_timeout_ms = 300").await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"GET /stuck HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "a stalled response body was still open after 5 s");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("0123456789"), "{text}");
    assert!(took >= Duration::from_millis(280) && took < Duration::from_secs(3), "cut after {took:?}");

    // The client promises 100 bytes of body, sends 10 and then nothing: 408, then closed.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n0123456789").await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "a stalled request body was still open after 5 s");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408") && text.contains("connection: close"), "{text}");
    assert!(text.contains("stall_timeout_ms"), "{text}");
    assert!(took >= Duration::from_millis(280) && took < Duration::from_secs(3), "cut after {took:?}");
    assert_eq!(b.seen().len(), 1, "the unfinished POST never reached the backend");

    // The client asks for 32 MiB and reads nothing for 1.5 s: the proxy's write waits
    // past 300 ms and the connection is cut, so less than the whole body ever arrives.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "a client that stopped reading was still served after 10 s");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..got.len().min(200)]));
    assert!(got.len() < BIG, "the whole body came ({} bytes): the write was never cut", got.len());
    p.shutdown(Duration::from_secs(1)).await;
}

/// Sends a 200,000-byte upload's head and half its body (over the 64 KiB the fast path
/// buffers, so hyper streams it), then nothing; the answer's head and body, and how
/// long it took from the first byte sent.
async fn upload_half_and_stop(addr: SocketAddr) -> (String, Vec<u8>, Duration) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-length: 200000\r\n\r\n").await.unwrap();
    s.write_all(&vec![b'u'; 100_000]).await.unwrap();
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_message(&mut s, &mut buf, false)).await;
    let (head, body) = answer.expect("an answer within 5 s").expect("an answer, not a bare close");
    (head, body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_upload_that_stops_gets_408_and_counts_against_the_client_not_the_backend() {
    let b = RawBackend::start(|_, _| ok("stored")).await;
    // passive_failures = 1: one failure blamed on the backend would take it out.
    let cfg = web_to_app("", &[b.addr], "passive_failures = 1\nstall_timeout_ms = 300");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let addr = p.local_addr("web").unwrap();
    let (head, body, took) = upload_half_and_stop(addr).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("stall_timeout_ms"), "{}", String::from_utf8_lossy(&body));
    assert!(took >= Duration::from_millis(280) && took < Duration::from_secs(3), "answered after {took:?}");
    assert_eq!(state_of(&p, "app", b.addr).unwrap()["state"], "healthy", "the backend is not blamed");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_streamed_upload_outlasts_request_timeout_and_a_stopped_one_gets_408_not_504() {
    let b = RawBackend::start(|req, _| ok(&req.body.len().to_string())).await;
    // request_timeout_ms is the backend's time to answer, counted once the upload is in.
    let cfg = web_to_app("", &[b.addr], "request_timeout_ms = 300\nstall_timeout_ms = 800");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let addr = p.local_addr("web").unwrap();

    // 200,000 bytes (streamed by hyper) in 8 pieces 150 ms apart: four request timeouts long.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-length: 200000\r\n\r\n").await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(&vec![b'u'; 25_000]).await.unwrap();
    }
    let mut buf = Vec::new();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_message(&mut s, &mut buf, false)).await;
    let (head, body) = answer.expect("an answer within 5 s").expect("an answer, not a bare close");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(String::from_utf8_lossy(&body), "200000", "the whole upload reached the backend");

    // Stopped half-way: the client's stall (408, after stall_timeout_ms), not the backend's
    // timeout (504, after request_timeout_ms).
    let (head, _, took) = upload_half_and_stop(addr).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(took >= Duration::from_millis(780) && took < Duration::from_secs(4), "answered after {took:?}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_stops_taking_a_streamed_upload_gets_504_after_stall_then_request_timeout() {
    // The backend reads the head and then nothing: its socket fills and hyper stops
    // asking the client's body for data, so neither the upload's end nor a client stall
    // ever comes.
    let (baddr, held) = head_only_backend(Vec::new()).await;
    let cfg = web_to_app("", &[baddr], "request_timeout_ms = 300\nstall_timeout_ms = 300");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let (mut rd, mut wr) = TcpStream::connect(p.local_addr("web").unwrap()).await.unwrap().into_split();
    const LEN: usize = 64 << 20;
    let upload = tokio::spawn(async move {
        let _ = wr.write_all(format!("POST /up HTTP/1.1\r\nHost: x\r\ncontent-length: {LEN}\r\n\r\n").as_bytes()).await;
        let chunk = vec![b'u'; 1 << 20];
        for _ in 0..LEN >> 20 {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let answered = tokio::time::timeout(Duration::from_secs(10), read_head(&mut rd)).await;
    let head = answered.expect("no answer within 10 s to an upload the backend stopped taking");
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 504"), "{}", String::from_utf8_lossy(&head));
    upload.abort();
    held.abort();
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_handed_to_hyper_late_is_not_counted_idle_from_its_accept() {
    let b = RawBackend::start(|req, _| ok(&req.body.len().to_string())).await;
    let cfg =
        config(&[b.addr], "").replace("protocol = \"http\"", "protocol = \"http\"\nrequest_head_timeout_secs = 1");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let mut s = TcpStream::connect(p.local_addr("web").unwrap()).await.unwrap();
    let mut buf = Vec::new();
    // 1.6 s on the fast path, a request every 400 ms...
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(format!("GET /fast{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let (head, _) = read_message(&mut s, &mut buf, false).await.expect("answered on the fast path");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    // ...then chunked uploads, which hyper's path takes: answered, and the connection kept.
    for _ in 0..2 {
        s.write_all(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_message(&mut s, &mut buf, false)).await;
        let (head, body) = answer.expect("an answer within 5 s").expect("an answer, not a close");
        assert!(head.starts_with("HTTP/1.1 200") && !head.contains("connection: close"), "{head}");
        assert_eq!(String::from_utf8_lossy(&body), "3");
    }
    p.shutdown(Duration::from_secs(1)).await;
}
