//! The L4 listener.

mod common;

use common::*;
use drover_proxy::Proxy;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_copies_bytes_to_a_healthy_backend_only() {
    let (echo, _t) = echo_server().await;
    let dead = dead_addr();
    let cfg = format!(
        r#"
[[listeners]]
name = "pg"
bind = "127.0.0.1:0"
protocol = "tcp"
service = "db"
[services.db]
backends = [{{ address = "{dead}" }}, {{ address = "{echo}" }}]
[services.db.health]
kind = "tcp"
interval_ms = 50
timeout_ms = 50
rise = 1
fall = 1
"#
    );
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    wait_until(Duration::from_secs(3), "echo healthy", || {
        state_of(&p, "db", echo).is_some_and(|s| s["state"] == "healthy")
    })
    .await;
    let s = state_of(&p, "db", dead).unwrap();
    assert_eq!(s["state"], "unhealthy");
    assert!(s["reason"].as_str().unwrap().starts_with("connect refused x"), "{s}");
    for i in 0..5 {
        let mut conn = tokio::net::TcpStream::connect(p.local_addr("pg").unwrap()).await.unwrap();
        let msg = format!("hello {i}");
        conn.write_all(msg.as_bytes()).await.unwrap();
        conn.shutdown().await.unwrap();
        let mut back = String::new();
        conn.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    assert_eq!(state_of(&p, "db", echo).unwrap()["requests"], 5);
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_can_be_sent_the_client_address_in_a_proxy_v1_line() {
    let (echo, _t) = echo_server().await;
    let cfg = format!(
        r#"
[[listeners]]
name = "pg"
bind = "127.0.0.1:0"
protocol = "tcp"
service = "db"
[services.db]
backends = [{{ address = "{echo}" }}]
send_proxy_protocol = true
"#
    );
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let front = p.local_addr("pg").unwrap();
    let mut conn = tokio::net::TcpStream::connect(front).await.unwrap();
    let me = conn.local_addr().unwrap();
    conn.write_all(b"hi").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = String::new();
    conn.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, format!("PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\nhi", me.port(), front.port()));
    p.shutdown(Duration::from_secs(1)).await;
}
