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
    let cfg = pg_to_db(
        "",
        &[dead, echo],
        r#"
[services.db.health]
kind = "tcp"
interval_ms = 50
timeout_ms = 50
rise = 1
fall = 1
"#,
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
    let cfg = pg_to_db("", &[echo], "send_proxy_protocol = true");
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

/// One `db` member at `echo`, healthy or not as the control plane says.
fn member_view(echo: std::net::SocketAddr, healthy: bool) -> drover_proxy::Members {
    use drover_core::{Entity, EntityClass, health::MemberHealth};
    let mut e = Entity::new("pg1", EntityClass::Agent);
    e.address = Some(echo.ip().to_string());
    e.subscriptions = vec!["db".into()];
    let mut m = MemberHealth::new(&e);
    m.healthy = healthy;
    m.reason = if healthy { "keepalive passing".into() } else { "fenced".into() };
    std::sync::Arc::new([("pg1".to_string(), m)].into_iter().collect())
}

async fn echoes(conn: &mut tokio::net::TcpStream) -> bool {
    if conn.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(tokio::time::timeout(Duration::from_secs(2), conn.read_exact(&mut buf)).await, Ok(Ok(_)))
        && &buf == b"ping"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_on_leave_cuts_the_open_connections_of_a_member_the_control_plane_takes_out() {
    let (echo, _t) = echo_server().await;
    let cfg = |close: bool| {
        format!(
            "[[listeners]]\nname = \"w\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"db\"\n\
             [services.db]\nmembers = {{ subscription = \"db\", port = {} }}\nclose_on_leave = {close}\n",
            echo.port()
        )
    };
    for close in [true, false] {
        let p = Proxy::start(parse(&cfg(close))).await.unwrap();
        p.set_members(member_view(echo, true));
        let mut conn = tokio::net::TcpStream::connect(p.local_addr("w").unwrap()).await.unwrap();
        assert!(echoes(&mut conn).await, "a healthy member serves");
        // The control plane fences the member (as failover does to an old primary).
        p.set_members(member_view(echo, false));
        let s = state_of(&p, "db", echo).unwrap();
        assert_eq!(s["state"], "unhealthy", "{s}");
        if close {
            let mut buf = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf)).await;
            assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the open connection was closed: {read:?}");
        } else {
            assert!(echoes(&mut conn).await, "without close_on_leave an open connection runs on");
        }
        let mut fresh = tokio::net::TcpStream::connect(p.local_addr("w").unwrap()).await.unwrap();
        assert!(!echoes(&mut fresh).await, "a new connection never reaches the fenced member");
        p.shutdown(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_idle_both_ways_is_closed_after_idle_timeout_and_a_busy_one_is_not() {
    let (echo, _t) = echo_server().await;
    let cfg = pg_to_db("idle_timeout_secs = 1", &[echo], "");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    let front = p.local_addr("pg").unwrap();
    let mut idle = tokio::net::TcpStream::connect(front).await.unwrap();
    let mut busy = tokio::net::TcpStream::connect(front).await.unwrap();
    let mut back = [0u8; 64];
    for c in [&mut idle, &mut busy] {
        c.write_all(b"ping").await.unwrap();
        c.read_exact(&mut back[..4]).await.unwrap();
    }
    let quiet_from = std::time::Instant::now();
    // The busy one echoes every 300 ms for 2.4 s: never a second without bytes.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.write_all(b"ping").await.unwrap();
        busy.read_exact(&mut back[..4]).await.expect("a connection with traffic stays open");
    }
    // By now the idle one has been closed: its read ends at once, with nothing.
    let n = tokio::time::timeout(Duration::from_secs(1), idle.read(&mut back)).await.expect("closed, not waiting");
    assert_eq!(n.unwrap_or(0), 0, "the idle connection is closed");
    assert!(quiet_from.elapsed() < Duration::from_secs(4));
    // And it was not closed early: a fresh connection is still open half a second into its quiet.
    let mut fresh = tokio::net::TcpStream::connect(front).await.unwrap();
    fresh.write_all(b"ping").await.unwrap();
    fresh.read_exact(&mut back[..4]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fresh.write_all(b"pong").await.unwrap();
    fresh.read_exact(&mut back[..4]).await.expect("open half a second into a one-second idle timeout");
    assert_eq!(&back[..4], b"pong");
    p.shutdown(Duration::from_secs(1)).await;
}
