//! The HTTP data plane against real backends in this process.

mod common;

use common::*;
use drover_proxy::Proxy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// One http listener, one service `app` over `addrs`, fast active checks.
fn one_service(addrs: &[SocketAddr], extra: &str) -> String {
    let service = format!(
        r#"connect_timeout_ms = 200
request_timeout_ms = 3000
{extra}

[services.app.health]
kind = "http"
path = "/healthz"
interval_ms = 50
timeout_ms = 50
rise = 2
fall = 2"#
    );
    web_to_app("drain_timeout_secs = 5", addrs, &service)
}

async fn all_healthy(p: &drover_proxy::RunningProxy, service: &str, addrs: &[SocketAddr]) {
    wait_until(Duration::from_secs(5), "every backend healthy", || {
        addrs.iter().all(|a| state_of(p, service, *a).is_some_and(|s| s["state"] == "healthy"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_gets_no_traffic_and_no_get_fails() {
    let bs = [TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let p = Proxy::start(parse(&one_service(&addrs, ""))).await.unwrap();
    all_healthy(&p, "app", &addrs).await;
    let url = format!("http://{}/x", p.local_addr("web").unwrap());
    let c = client();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (c, url, done) = (c.clone(), url.clone(), done.clone());
        workers.spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..100 {
                match get(&c, &url).await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures.push(format!("{} {}", r.status, r.body)),
                    Err(e) => failures.push(e),
                }
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            failures
        });
    }
    wait_until(Duration::from_secs(10), "a quarter of the load", || done.load(Ordering::SeqCst) >= 500).await;
    bs[1].kill();
    let hits_at_kill = bs[1].hits();
    let mut failures = Vec::new();
    while let Some(r) = workers.join_next().await {
        failures.extend(r.unwrap());
    }
    assert!(
        failures.is_empty(),
        "{} of 2000 GETs failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(hits_at_kill > 0);
    let total: usize = bs.iter().map(|b| b.hits()).sum();
    assert!(total >= 2000, "every request reached some backend ({total})");
    let s = state_of(&p, "app", bs[1].addr).unwrap();
    assert_ne!(s["state"], "healthy", "{s}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_never_replayed_after_the_backend_read_it() {
    let bad = TestBackend::start("bad").await;
    let good = TestBackend::start("good").await;
    bad.c.reset_posts.store(true, Ordering::SeqCst);
    // `bad` first: smooth round robin with equal weights starts at the first member.
    let p = Proxy::start(parse(&one_service(&[bad.addr, good.addr], "passive_failures = 0"))).await.unwrap();
    all_healthy(&p, "app", &[bad.addr, good.addr]).await;
    let c = client();
    let r =
        send(&c, "POST", &format!("http://{}/orders", p.local_addr("web").unwrap()), None, "{\"n\":1}").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(bad.c.posts.load(Ordering::SeqCst), 1);
    assert_eq!(good.c.posts.load(Ordering::SeqCst), 0, "the POST was replayed");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_retried_on_another_backend_after_a_reset() {
    let bad = TestBackend::start("bad").await;
    let good = TestBackend::start("good").await;
    bad.c.reset_all.store(true, Ordering::SeqCst);
    let p = Proxy::start(parse(&one_service(&[bad.addr, good.addr], "passive_failures = 0"))).await.unwrap();
    all_healthy(&p, "app", &[bad.addr, good.addr]).await;
    let c = client();
    let url = format!("http://{}/r", p.local_addr("web").unwrap());
    for _ in 0..4 {
        let r = get(&c, &url).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.starts_with("good "), "{}", r.body);
    }
    assert!(bad.hits() >= 2, "the bad backend was tried");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_backend_gets_no_request_before_it_passes_rise_checks() {
    let old = TestBackend::start("old").await;
    let new = TestBackend::start("new").await;
    new.c.healthy.store(false, Ordering::SeqCst);
    let p = Proxy::start(parse(&one_service(&[old.addr], ""))).await.unwrap();
    all_healthy(&p, "app", &[old.addr]).await;
    p.reload(parse(&one_service(&[old.addr, new.addr], ""))).unwrap();
    let c = client();
    let url = format!("http://{}/", p.local_addr("web").unwrap());
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert_eq!(get(&c, &url).await.unwrap().status, 200);
    }
    assert!(new.c.health_checks.load(Ordering::SeqCst) >= 3, "it is being checked");
    assert_eq!(new.hits(), 0, "an unchecked backend got traffic");
    let s = state_of(&p, "app", new.addr).unwrap();
    assert_eq!(s["state"], "unhealthy", "{s}");
    assert_eq!(state_of(&p, "app", old.addr).unwrap()["state"], "healthy", "kept its health across the reload");
    new.c.healthy.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while new.hits() == 0 {
        assert!(Instant::now() < deadline, "the new backend never entered rotation");
        assert_eq!(get(&c, &url).await.unwrap().status, 200);
    }
    assert!(new.c.ok_checks_before_first_hit.load(Ordering::SeqCst) >= 2, "entered before `rise` passes");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_backend_finishes_its_slow_request_and_gets_no_new_ones() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let p = Proxy::start(parse(&one_service(&[a.addr, b.addr], ""))).await.unwrap();
    all_healthy(&p, "app", &[a.addr, b.addr]).await;
    let base = format!("http://{}", p.local_addr("web").unwrap());
    let c = client();
    // Round robin starts at `a`.
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), format!("{base}/slow?sleep_ms=1200"));
        async move { get(&c, &url).await }
    });
    wait_until(Duration::from_secs(2), "the slow request reached a", || a.hits() == 1).await;
    p.reload(parse(&one_service(&[b.addr], ""))).unwrap();
    let s = state_of(&p, "app", a.addr).unwrap();
    assert_eq!((s["state"].as_str(), s["in_flight"].as_u64()), (Some("draining"), Some(1)), "{s}");
    assert_eq!(s["reason"], "removed, draining 1 in flight");
    for _ in 0..10 {
        let r = get(&c, &format!("{base}/fast")).await.unwrap();
        assert!(r.body.starts_with("b "), "{}", r.body);
    }
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status, r.body.split(' ').next()), (200, Some("a")));
    assert_eq!(a.hits(), 1);
    assert!(state_of(&p, "app", a.addr).is_none(), "drained backends leave the list");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_prefix_and_sets_forwarding_headers() {
    let api = TestBackend::start("api").await;
    let stat = TestBackend::start("static").await;
    let tenant = TestBackend::start("tenant").await;
    let cfg = format!(
        r#"
{WEB_LISTENER}[[routes]]
listener = "web"
host = "api.example.com"
service = "api"
[[routes]]
listener = "web"
path_prefix = "/static/"
service = "static"
[[routes]]
listener = "web"
host = "*.example.com"
header = {{ name = "x-tenant", value = "t1" }}
service = "tenant"
[services.api]
backends = [{{ address = "{}" }}]
[services.static]
backends = [{{ address = "{}" }}]
[services.tenant]
backends = [{{ address = "{}" }}]
"#,
        api.addr, stat.addr, tenant.addr
    );
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let base = format!("http://{}", p.local_addr("web").unwrap());
    let c = client();
    let r = send(&c, "GET", &format!("{base}/v1"), Some("API.example.com:8080"), "").await.unwrap();
    assert!(r.body.starts_with("api /v1 xff=127.0.0.1 proto=http xhost=API.example.com:8080"), "{}", r.body);
    assert!(r.body.contains("fwd=for=127.0.0.1;proto=http;host=\"API.example.com:8080\""), "{}", r.body);
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(r.body.ends_with(&format!("id={id}")), "{}", r.body);
    assert!(
        send(&c, "GET", &format!("{base}/static/a.css"), Some("x.org"), "").await.unwrap().body.starts_with("static ")
    );
    let mut req = hyper::Request::get(format!("{base}/t")).header("host", "shop.example.com").header("x-tenant", "t1");
    req = req.header("x-request-id", "keep-me");
    let resp = c.request(req.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap()).await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "keep-me");
    let r = send(&c, "GET", &format!("{base}/t"), Some("shop.example.com"), "").await.unwrap();
    assert_eq!(r.status, 404, "no header, no tenant route: {}", r.body);
    assert_eq!(tenant.hits(), 1);
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_backend_is_503_and_a_slow_one_is_504() {
    let slow = TestBackend::start("slow").await;
    let cfg = format!(
        r#"
{WEB_LISTENER}[[routes]]
listener = "web"
path_prefix = "/down"
service = "down"
[[routes]]
listener = "web"
service = "slow"
[services.down]
backends = [{{ address = "{}" }}]
[services.down.health]
kind = "tcp"
interval_ms = 50
timeout_ms = 50
[services.slow]
backends = [{{ address = "{}" }}]
request_timeout_ms = 200
"#,
        dead_addr(),
        slow.addr
    );
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let base = format!("http://{}", p.local_addr("web").unwrap());
    let c = client();
    let r = get(&c, &format!("{base}/down")).await.unwrap();
    assert_eq!(r.status, 503);
    assert!(r.body.contains("no healthy backend for service `down`"), "{}", r.body);
    let r = get(&c, &format!("{base}/x?sleep_ms=1000")).await.unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_failures_eject_a_backend_and_admin_says_why() {
    let dead = dead_addr();
    let cfg = web_to_app(
        r#"admin_listen = "127.0.0.1:0""#,
        &[dead],
        "passive_failures = 2\neject_base_ms = 60000\nretries = 0",
    );
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let base = format!("http://{}", p.local_addr("web").unwrap());
    let c = client();
    assert_eq!(state_of(&p, "app", dead).unwrap()["state"], "healthy", "no active check: trusted until it fails");
    for _ in 0..2 {
        let r = get(&c, &base).await.unwrap();
        assert_eq!(r.status, 502, "{}", r.body);
        assert!(r.body.contains("connect failed: connect refused"), "{}", r.body);
    }
    let r = get(&c, &base).await.unwrap();
    assert_eq!(r.status, 503, "ejected: {}", r.body);
    let admin = format!("http://{}", p.admin_addr().unwrap());
    let r = get(&c, &format!("{admin}/backends")).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let b = &v["services"]["app"][0];
    assert_eq!(b["state"], "ejected", "{v}");
    assert!(b["reason"].as_str().unwrap().starts_with("connect refused; back in "), "{v}");
    assert_eq!(get(&c, &format!("{admin}/health")).await.unwrap().body, r#"{"status":"ok"}"#);
    let m = get(&c, &format!("{admin}/metrics")).await.unwrap().body;
    assert!(
        m.contains(&format!("drover_proxy_backend_up{{service=\"app\",backend=\"{dead}\",state=\"ejected\"}} 0")),
        "{m}"
    );
    assert!(m.contains("drover_proxy_responses_total{listener=\"web\",service=\"app\",code=\"502\"} 2"), "{m}");
    assert!(m.contains("drover_proxy_responses_total{listener=\"web\",service=\"app\",code=\"503\"} 1"), "{m}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_are_tunnelled_and_count_as_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = TestBackend::start("ws").await;
    let p = Proxy::start(parse(&one_service(&[b.addr], ""))).await.unwrap();
    all_healthy(&p, "app", &[b.addr]).await;
    let mut s = tokio::net::TcpStream::connect(p.local_addr("web").unwrap()).await.unwrap();
    s.write_all(b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed before the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    assert_eq!(state_of(&p, "app", b.addr).unwrap()["in_flight"], 1);
    drop(s);
    wait_until(Duration::from_secs(2), "tunnel closed", || {
        state_of(&p, "app", b.addr).is_some_and(|v| v["in_flight"] == 0)
    })
    .await;
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_clients_are_served_over_http1_backends() {
    let b = TestBackend::start("h1").await;
    let p = Proxy::start(parse(&one_service(&[b.addr], ""))).await.unwrap();
    all_healthy(&p, "app", &[b.addr]).await;
    let h2: TestClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let url = format!("http://{}/h2", p.local_addr("web").unwrap());
    let req = hyper::Request::get(&url).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap();
    let resp = h2.request(req).await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_2));
    use http_body_util::BodyExt;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("h1 /h2 "), "{body}");
    assert!(body.contains(&format!("xhost={}", p.local_addr("web").unwrap())), "{body}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_limit_queues_requests_then_sheds_them() {
    let b = TestBackend::start("one").await;
    let p = Proxy::start(parse(&one_service(&[b.addr], "max_in_flight_per_backend = 1\nqueue_timeout_ms = 3000")))
        .await
        .unwrap();
    all_healthy(&p, "app", &[b.addr]).await;
    let url = format!("http://{}/q?sleep_ms=200", p.local_addr("web").unwrap());
    let c = client();
    let started = Instant::now();
    let all: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn({
                let (c, url) = (c.clone(), url.clone());
                async move { get(&c, &url).await.unwrap().status }
            })
        })
        .collect();
    for t in all {
        assert_eq!(t.await.unwrap(), 200, "queued, not refused");
    }
    assert_eq!(b.c.max_active.load(Ordering::SeqCst), 1, "the limit was overshot");
    assert!(started.elapsed() >= Duration::from_millis(600), "they ran one after another");

    p.reload(parse(&one_service(&[b.addr], "max_in_flight_per_backend = 1\nqueue_timeout_ms = 50"))).unwrap();
    let slow = tokio::spawn({
        let (c, url) = (c.clone(), format!("http://{}/q?sleep_ms=500", p.local_addr("web").unwrap()));
        async move { get(&c, &url).await.unwrap().status }
    });
    wait_until(Duration::from_secs(2), "the slow request holds the slot", || b.c.active.load(Ordering::SeqCst) == 1)
        .await;
    let r = get(&c, &url).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("is at its in-flight limit"), "{}", r.body);
    assert_eq!(slow.await.unwrap(), 200);
    p.shutdown(Duration::from_secs(1)).await;
}

/// An h2c (prior knowledge) connection to `addr`, and when it ended.
async fn h2c(
    addr: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>, tokio::task::JoinHandle<Instant>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    (
        send,
        tokio::spawn(async move {
            let _ = conn.await;
            Instant::now()
        }),
    )
}

fn h2_get(addr: SocketAddr, path: &str) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    hyper::Request::get(format!("http://{addr}{path}")).body(http_body_util::Full::new(bytes::Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2_connection_is_closed_after_the_head_timeout_but_busy_and_slow_ones_are_not() {
    let b = TestBackend::start("h1").await;
    let cfg =
        one_service(&[b.addr], "").replace("protocol = \"http\"", "protocol = \"http\"\nrequest_head_timeout_secs = 1");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    all_healthy(&p, "app", &[b.addr]).await;
    let addr = p.local_addr("web").unwrap();

    // Idle after one answer: closed a second after it, not before.
    let (mut idle, idle_ended) = h2c(addr).await;
    let asked = Instant::now();
    let resp = idle.send_request(h2_get(addr, "/idle")).await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_2));
    // Open past the limit: the answer takes 1.5 s.
    let (mut slow, _) = h2c(addr).await;
    let slow_answer = tokio::spawn(slow.send_request(h2_get(addr, "/slow?sleep_ms=1500")));
    // Busy: a request every 400 ms for 2.4 s, each within the limit of the one before.
    let (mut busy, busy_ended) = h2c(addr).await;
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let resp = busy.send_request(h2_get(addr, &format!("/busy{i}"))).await.expect("the same connection answers");
        assert_eq!(resp.status().as_u16(), 200);
    }
    assert!(!busy_ended.is_finished(), "a busy connection was closed");
    let ended = tokio::time::timeout(Duration::from_secs(3), idle_ended).await.expect("idle closed").unwrap();
    let took = ended - asked;
    assert!(took >= Duration::from_secs(1) && took < Duration::from_millis(2400), "idle closed after {took:?}");
    let resp = slow_answer.await.unwrap().expect("the slow answer arrives");
    assert_eq!(resp.status().as_u16(), 200);
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_grants_no_more_window_is_cut_after_stall_timeout_and_one_that_reads_is_not() {
    use http_body_util::BodyExt;
    // 32 MiB: more than the client's stream window and the proxy's send buffer hold.
    const BIG: usize = 32 << 20;
    let (baddr, served) = head_only_backend(big_answer(BIG)).await;
    // 2 s: the client that reads at once must not be cut by a pause of the test's own.
    let p =
        Proxy::start(parse(&web_to_app("drain_timeout_secs = 5", &[baddr], "stall_timeout_ms = 2000"))).await.unwrap();
    let addr = p.local_addr("web").unwrap();

    // Takes the head and none of the body, so its stream window runs out and is never
    // granted again, while its connection still answers PINGs: no write of the proxy's
    // ever waits, so only the wait for the client to take data can tell. 2 s after the
    // last frame went out the proxy sends GOAWAY, and 2 s later (the stream never ends)
    // it closes the connection.
    let (mut stalled, stalled_ended) = h2c(addr).await;
    let asked = Instant::now();
    let resp = stalled.send_request(h2_get(addr, "/big")).await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.version()), (200, http::Version::HTTP_2));
    let ended = tokio::time::timeout(Duration::from_secs(20), stalled_ended)
        .await
        .expect("a client that took no data was still connected after 20 s")
        .unwrap();
    let took = ended - asked;
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(12), "closed after {took:?}");
    drop(resp);

    // Reads at once: all of it (the limit is on each wait for the client).
    let (mut reader, _) = h2c(addr).await;
    let resp = reader.send_request(h2_get(addr, "/big")).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("served within 20 s")
        .expect("the whole body")
        .to_bytes();
    assert_eq!(body.len(), BIG);
    p.shutdown(Duration::from_secs(1)).await;
    served.abort();
}
