//! https listeners: SNI picks the certificate, ALPN h2 works, backends see `proto=https`.

mod common;

use common::*;
use drover_proxy::Proxy;
use drover_proxy::config::ProxyConfig;
use http_body_util::{BodyExt, Full};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;
use std::time::Duration;

/// Accepts any certificate (the test checks *which* one came) but still checks the
/// handshake signatures.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client that accepts any certificate, offering `alpn`.
fn client_config(alpn: &[u8]) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

/// A TLS connection to `addr` with SNI `name`, offering only HTTP/1.1.
async fn connect_http1(
    addr: std::net::SocketAddr,
    name: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(client_config(b"http/1.1")))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap()
}

/// Reads from `s` until it ends (close or error); `None` if that takes over `limit`.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(got)
}

/// Connects with SNI `name` (after sending `prefix` in the clear); returns the leaf
/// certificate presented, the ALPN protocol and the body of `GET /tls` sent over the connection.
async fn fetch_after(addr: std::net::SocketAddr, name: &str, prefix: &[u8]) -> (Vec<u8>, Option<Vec<u8>>, String) {
    let cfg = client_config(b"h2");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut tcp, prefix).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    let leaf = conn.peer_certificates().unwrap()[0].to_vec();
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let (mut send, driver) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(driver);
    let req = hyper::Request::get(format!("https://{name}/tls")).body(Full::new(bytes::Bytes::new())).unwrap();
    let resp = send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (leaf, alpn, String::from_utf8_lossy(&body).into_owned())
}

async fn fetch(addr: std::net::SocketAddr, name: &str) -> (Vec<u8>, Option<Vec<u8>>, String) {
    fetch_after(addr, name, b"").await
}

/// Certificate and key for `name` in `dir` as `<file>.pem` and `<file>.key`.
fn write_cert(dir: &std::path::Path, file: &str, name: &str) -> rcgen::CertifiedKey<rcgen::KeyPair> {
    let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), c.cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}.key")), c.signing_key.serialize_pem()).unwrap();
    c
}

/// One https listener `web` (a certificate for `a.test`, written to `dir`, and the
/// `listener` keys) routing everything to service `app` at `backend` (with `service` keys).
fn one_cert(dir: &std::path::Path, listener: &str, backend: std::net::SocketAddr, service: &str) -> ProxyConfig {
    write_cert(dir, "a", "a.test");
    let text = format!(
        r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
protocol = "https"
{listener}
tls = [{{ cert = "a.pem", key = "a.key", server_names = ["a.test"] }}]
[[routes]]
listener = "web"
service = "app"
[services.app]
backends = [{{ address = "{backend}" }}]
{service}
"#
    );
    ProxyConfig::parse(&dir.join("proxy.toml"), &text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_picks_the_certificate_by_sni_and_speaks_h2() {
    let b = TestBackend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
    let w = rcgen::generate_simple_self_signed(vec!["*.b.test".to_string()]).unwrap();
    for (n, c) in [("a", &a), ("w", &w)] {
        std::fs::write(dir.path().join(format!("{n}.pem")), c.cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{n}.key")), c.signing_key.serialize_pem()).unwrap();
    }
    let text = format!(
        r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
protocol = "https"
tls = [
  {{ cert = "a.pem", key = "a.key", server_names = ["a.test"] }},
  {{ cert = "w.pem", key = "w.key", server_names = ["*.b.test"] }},
]
[[routes]]
listener = "web"
service = "app"
[services.app]
backends = [{{ address = "{}" }}]
"#,
        b.addr
    );
    let cfg = ProxyConfig::parse(&dir.path().join("proxy.toml"), &text).unwrap();
    let p = Proxy::start(cfg).await.unwrap();
    let addr = p.local_addr("web").unwrap();

    let (leaf, alpn, body) = fetch(addr, "x.b.test").await;
    assert_eq!(leaf, w.cert.der().to_vec(), "wildcard certificate for x.b.test");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert!(body.starts_with("app /tls ") && body.contains("proto=https"), "{body}");
    assert!(body.contains("fwd=for=127.0.0.1;proto=https;host=\"x.b.test\""), "{body}");
    let (leaf, _, _) = fetch(addr, "a.test").await;
    assert_eq!(leaf, a.cert.der().to_vec());
    let (leaf, _, _) = fetch(addr, "unknown.test").await;
    assert_eq!(leaf, a.cert.der().to_vec(), "the first certificate is the default");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_listener_reads_the_proxy_header_before_the_tls_handshake() {
    let b = TestBackend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(one_cert(dir.path(), "accept_proxy_protocol = true", b.addr, "")).await.unwrap();
    let addr = p.local_addr("web").unwrap();
    let (_, _, body) = fetch_after(addr, "a.test", b"PROXY TCP4 192.0.2.44 192.0.2.1 40000 443\r\n").await;
    assert!(body.contains("xff=192.0.2.44 proto=https"), "{body}");
    assert!(body.contains("fwd=for=192.0.2.44;proto=https"), "{body}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_connection_idle_or_silent_past_the_request_head_timeout_is_closed() {
    use tokio::io::AsyncWriteExt;
    let b = TestBackend::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(one_cert(dir.path(), "request_head_timeout_secs = 1", b.addr, "")).await.unwrap();
    let addr = p.local_addr("web").unwrap();

    // Idle after a response, measured from before the request (hyper starts its timer
    // when it waits for the next head, after answering).
    let mut tls = connect_http1(addr, "a.test").await;
    let asked = std::time::Instant::now();
    tls.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut tls, Duration::from_secs(5)).await.expect("an idle https connection is closed");
    let took = asked.elapsed();
    assert!(String::from_utf8_lossy(&got).contains("app /one"), "{}", String::from_utf8_lossy(&got));
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(3), "closed {took:?} after the request");

    // A client that completes the handshake and never sends a byte.
    let mut silent = connect_http1(addr, "a.test").await;
    let shook = std::time::Instant::now();
    let got = read_until_closed(&mut silent, Duration::from_secs(5)).await.expect("a silent https client is closed");
    assert!(got.is_empty(), "no answer to nothing: {}", String::from_utf8_lossy(&got));
    assert!(shook.elapsed() < Duration::from_secs(3), "closed after {:?}", shook.elapsed());
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_response_or_small_upload_that_stops_is_cut_after_stall_timeout() {
    use tokio::io::AsyncWriteExt;
    // A backend that promises 100 bytes, sends 10 and then holds its socket open.
    let (baddr, held) = head_only_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789".to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let p = Proxy::start(one_cert(dir.path(), "", baddr, "stall_timeout_ms = 300")).await.unwrap();
    let mut tls = connect_http1(p.local_addr("web").unwrap(), "a.test").await;
    let started = std::time::Instant::now();
    tls.write_all(b"GET /stuck HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut tls, Duration::from_secs(5)).await;
    let got = got.expect("a stalled response is cut within 5 s");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("0123456789"), "{text}");
    assert!(took >= Duration::from_millis(280) && took < Duration::from_secs(3), "cut after {took:?}");

    // A small upload (read whole before it is sent on, so it can be resent) that stops.
    let mut tls = connect_http1(p.local_addr("web").unwrap(), "a.test").await;
    let started = std::time::Instant::now();
    tls.write_all(b"POST /up HTTP/1.1\r\nHost: a.test\r\ncontent-length: 100\r\n\r\n0123456789").await.unwrap();
    let answered = tokio::time::timeout(Duration::from_secs(5), read_head(&mut tls)).await;
    let head = answered.expect("no answer to a stalled small upload within 5 s");
    let took = started.elapsed();
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&head));
    assert!(took >= Duration::from_millis(280) && took < Duration::from_secs(3), "answered after {took:?}");
    p.shutdown(Duration::from_secs(1)).await;
    held.abort();
}

#[test]
fn bad_certificate_files_are_config_errors_at_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let a = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
    std::fs::write(dir.path().join("a.pem"), a.cert.pem()).unwrap();
    let text = "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"https\"\n\n[[listeners.tls]]\ncert = \"a.pem\"\nkey = \"missing.key\"\n";
    let e = ProxyConfig::parse(&dir.path().join("p.toml"), text).unwrap_err().to_string();
    assert!(e.contains("p.toml:8:1: listeners.0.tls.0.key: ") && e.contains("missing.key"), "{e}");
    let e = ProxyConfig::parse(&dir.path().join("p.toml"), &text.replace("https", "http")).unwrap_err().to_string();
    assert!(e.contains("p.toml:6:13: listeners.0.tls: only https listeners take certificates"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_client_that_stops_reading_is_cut_after_stall_timeout_and_one_that_reads_is_not() {
    use tokio::io::AsyncWriteExt;
    // 32 MiB per answer: more than the sockets and TLS buffers between proxy and client hold.
    const BIG: usize = 32 << 20;
    let (baddr, served) = head_only_backend(big_answer(BIG)).await;
    let dir = tempfile::tempdir().unwrap();
    // 1 s: the client that reads at once must not be cut by a pause of the test's own.
    let p = Proxy::start(one_cert(dir.path(), "", baddr, "stall_timeout_ms = 1000")).await.unwrap();
    let addr = p.local_addr("web").unwrap();

    // Reads nothing for 3 s: the proxy's write waits past 1 s and the connection is
    // cut, so less than the whole body ever arrives.
    let mut tls = connect_http1(addr, "a.test").await;
    tls.write_all(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    let got = got.expect("a client that stopped reading was still served after 10 s");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..got.len().min(200)]));
    assert!(got.len() < BIG, "the whole body came ({} bytes): the write was never cut", got.len());

    // Reads at once: all of it (the limit is on each wait, not on the whole answer).
    let mut tls = connect_http1(addr, "a.test").await;
    tls.write_all(b"GET /big HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let got = read_until_closed(&mut tls, Duration::from_secs(20)).await.expect("served within 20 s");
    assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..got.len().min(200)]));
    let head_len = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(got.len() - head_len, BIG, "the whole body");
    p.shutdown(Duration::from_secs(1)).await;
    served.abort();
}
