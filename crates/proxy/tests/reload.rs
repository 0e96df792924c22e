//! Live reloads of listeners: added, removed and changed with no restart, no dropped
//! connection and no refused one.

mod common;

use common::*;
use drover_proxy::Proxy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

fn config(listeners: &[(&str, &str, &str)], backend: SocketAddr) -> String {
    let mut t = String::from("drain_timeout_secs = 5\n");
    for (name, bind, protocol) in listeners {
        t += &format!("[[listeners]]\nname = \"{name}\"\nbind = \"{bind}\"\nprotocol = \"{protocol}\"\n");
        if *protocol == "tcp" {
            t += "service = \"app\"\n";
        }
    }
    for (name, _, _) in listeners.iter().filter(|l| l.2 == "http") {
        t += &format!("[[routes]]\nlistener = \"{name}\"\nservice = \"app\"\n");
    }
    t + &format!("[services.app]\nbackends = {}\n", backends_toml(&[backend]))
}

/// A backend that answers every request after `delay`: one request per connection.
async fn slow_backend(delay: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(delay).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nslow").await;
            });
        }
    });
    addr
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", drover_testkit::free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_listener_and_a_removed_one_finishes_its_slow_request() {
    let b = slow_backend(Duration::from_millis(800)).await;
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let p = Proxy::start(parse(&config(&[("one", &a_addr, "http")], b))).await.unwrap();
    let c = client();
    assert_eq!(get(&c, &format!("http://{a_addr}/x")).await.unwrap().status, 200);

    p.reload(parse(&config(&[("one", &a_addr, "http"), ("two", &b_addr, "http")], b))).unwrap();
    assert_eq!(p.local_addr("two").unwrap().to_string(), b_addr);
    assert_eq!(get(&c, &format!("http://{b_addr}/x")).await.unwrap().status, 200, "the added listener serves");

    // A slow request is in flight on `one` when `one` is removed.
    let slow = {
        let (c, url) = (c.clone(), format!("http://{a_addr}/slow"));
        tokio::spawn(async move { get(&c, &url).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.reload(parse(&config(&[("two", &b_addr, "http")], b))).unwrap();
    assert!(p.local_addr("one").is_none());
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "slow"), "the removed listener's request finished");
    assert!(
        tokio::net::TcpStream::connect(&a_addr).await.is_err(),
        "the removed listener no longer accepts connections"
    );
    assert_eq!(get(&c, &format!("http://{b_addr}/x")).await.unwrap().status, 200);
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_listener_in_place_refuses_no_connection() {
    let b = TestBackend::start("b").await;
    let addr = free_addr();
    let p = Proxy::start(parse(&config(&[("web", &addr, "http")], b.addr))).await.unwrap();
    // Clients connect without pause while the listener is renamed and turned into a
    // TCP listener and back: the socket is handed over, never closed.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (stop, ok, refused, addr) = (stop.clone(), ok.clone(), refused.clone(), addr.clone());
        clients.spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match tokio::net::TcpStream::connect(&addr).await {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(_) => refused.fetch_add(1, Ordering::SeqCst),
                };
            }
        });
    }
    for round in 0..10 {
        let (name, protocol) = if round % 2 == 0 { ("l4", "tcp") } else { ("web", "http") };
        tokio::time::sleep(Duration::from_millis(30)).await;
        p.reload(parse(&config(&[(name, &addr, protocol)], b.addr))).unwrap();
        assert_eq!(p.local_addrs().len(), 1, "the old listener was replaced, not kept beside");
    }
    stop.store(true, Ordering::SeqCst);
    while clients.join_next().await.is_some() {}
    assert!(ok.load(Ordering::SeqCst) > 100, "clients kept connecting ({})", ok.load(Ordering::SeqCst));
    assert_eq!(refused.load(Ordering::SeqCst), 0, "connections refused during the reloads");
    let c = client();
    assert_eq!(get(&c, &format!("http://{addr}/x")).await.unwrap().status, 200, "ends as an http listener");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_new_listener_cannot_bind_changes_nothing() {
    let b = TestBackend::start("b").await;
    let addr = free_addr();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let p = Proxy::start(parse(&config(&[("web", &addr, "http")], b.addr))).await.unwrap();
    let before = p.config();
    let e = p.reload(parse(&config(&[("web", &addr, "http"), ("two", &taken_addr, "http")], b.addr))).unwrap_err();
    assert!(e.to_string().contains("two"), "{e}");
    assert_eq!(p.config(), before);
    assert_eq!(p.local_addrs().len(), 1);
    assert_eq!(get(&client(), &format!("http://{addr}/x")).await.unwrap().status, 200);
    p.shutdown(Duration::from_secs(1)).await;
}
