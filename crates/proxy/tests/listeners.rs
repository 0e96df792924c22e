//! Listener options: incoming PROXY protocol (v1 and v2) and the redirect to https.

mod common;

use common::*;
use drover_proxy::Proxy;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A PROXY protocol v2 header (PROXY command, TCP over IPv4), as HAProxy or an AWS NLB sends it.
fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (src, dst) else { panic!("IPv4 only") };
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    out.extend_from_slice(&s.ip().octets());
    out.extend_from_slice(&d.ip().octets());
    out.extend_from_slice(&s.port().to_be_bytes());
    out.extend_from_slice(&d.port().to_be_bytes());
    out
}

/// Sends `prefix` and then one HTTP/1.1 request on a fresh connection; returns all it read.
async fn raw_request(to: SocketAddr, prefix: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    let mut bytes = prefix.to_vec();
    bytes.extend_from_slice(b"GET /who HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
    // A connection the proxy refuses may be closed or reset under our feet: writing and
    // reading may fail, and then nothing was answered.
    let _ = s.write_all(&bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.expect("answer or close");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_speaking_proxy_v2_is_forwarded_with_its_carried_address() {
    let b = TestBackend::start("app").await;
    let cfg = format!(
        r#"
{WEB_LISTENER}accept_proxy_protocol = true

[[routes]]
listener = "web"
service = "app"

[services.app]
backends = [{{ address = "{}" }}]
"#,
        b.addr
    );
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let front = p.local_addr("web").unwrap();
    let client: SocketAddr = "203.0.113.7:4321".parse().unwrap();

    let answer = raw_request(front, &v2_header(client, "198.51.100.2:443".parse().unwrap())).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("xff=203.0.113.7 "), "{answer}");
    assert!(answer.contains("fwd=for=203.0.113.7;proto=http"), "{answer}");

    let answer = raw_request(front, b"PROXY TCP4 192.0.2.9 198.51.100.2 5000 80\r\n").await;
    assert!(answer.contains("xff=192.0.2.9 "), "v1 works on the same listener: {answer}");

    // LOCAL (a load balancer's own health check): the socket's address stands.
    let mut local = v2_header(client, "198.51.100.2:443".parse().unwrap());
    local[12] = 0x20;
    let answer = raw_request(front, &local).await;
    assert!(answer.contains("xff=127.0.0.1 "), "{answer}");

    let hits = b.hits();
    let mut bad_version = v2_header(client, "198.51.100.2:443".parse().unwrap());
    bad_version[12] = 0x11;
    assert_eq!(raw_request(front, &bad_version).await, "", "a malformed header closes the connection");
    assert_eq!(raw_request(front, b"").await, "", "so does a missing one");
    assert_eq!(b.hits(), hits, "neither reached the backend");
    let answer = raw_request(front, &v2_header(client, "198.51.100.2:443".parse().unwrap())).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "the listener still serves others: {answer}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_passes_the_carried_address_on_in_its_own_proxy_line() {
    let (echo, _t) = echo_server().await;
    let cfg = pg_to_db("accept_proxy_protocol = true", &[echo], "send_proxy_protocol = true");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let mut conn = tokio::net::TcpStream::connect(p.local_addr("pg").unwrap()).await.unwrap();
    conn.write_all(&v2_header("203.0.113.7:4321".parse().unwrap(), "198.51.100.2:5432".parse().unwrap()))
        .await
        .unwrap();
    conn.write_all(b"hi").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = String::new();
    conn.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, "PROXY TCP4 203.0.113.7 198.51.100.2 4321 5432\r\nhi");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_https_answers_308_to_the_same_host_and_path() {
    let cfg = r#"
[[listeners]]
name = "plain"
bind = "127.0.0.1:0"
protocol = "http"
redirect_https = true
"#;
    let p = Proxy::start(parse(cfg)).await.unwrap();
    let c = client();
    let url = format!("http://{}/a/b?c=1", p.local_addr("plain").unwrap());
    let r = send(&c, "GET", &url, Some("Example.com:8080"), "").await.unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(r.headers["location"], "https://example.com/a/b?c=1");
    let r = send(&c, "POST", &url, Some("[2001:db8::1]:80"), "x").await.unwrap();
    assert_eq!((r.status, r.headers["location"].to_str().unwrap()), (308, "https://[2001:db8::1]/a/b?c=1"));
    assert!(r.headers.contains_key("x-request-id"));
    p.shutdown(Duration::from_secs(1)).await;
}
