//! Latency-aware, hashed and sticky balancing against real backends in this process.

mod common;

use common::*;
use drover_proxy::{Proxy, RunningProxy};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// One http listener, one service `app` over `addrs` with `extra` settings, fast checks.
fn service(addrs: &[SocketAddr], extra: &str) -> String {
    let service = format!(
        r#"connect_timeout_ms = 200
{extra}

[services.app.health]
kind = "http"
path = "/healthz"
# Not tighter: on a loaded 2-core CI machine 50 ms timeouts with fall = 1 once ejected
# all three backends at the same moment (503). Dead backends refuse at once anyway.
interval_ms = 200
timeout_ms = 200
rise = 1
fall = 2"#
    );
    web_to_app("", addrs, &service)
}

async fn healthy(p: &RunningProxy, addrs: &[SocketAddr]) {
    wait_until(Duration::from_secs(5), "backends healthy", || {
        addrs.iter().all(|a| state_of(p, "app", *a).is_some_and(|s| s["state"] == "healthy"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_ewma_sends_most_traffic_to_the_fast_backend() {
    let bs = [TestBackend::start("slow1").await, TestBackend::start("fast").await, TestBackend::start("slow2").await];
    bs[0].c.delay_ms.store(25, Ordering::SeqCst);
    bs[2].c.delay_ms.store(25, Ordering::SeqCst);
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let p = Proxy::start(parse(&service(&addrs, "balance = \"p2c_ewma\""))).await.unwrap();
    healthy(&p, &addrs).await;
    let url = format!("http://{}/work", p.local_addr("web").unwrap());
    let c = client();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (c, url) = (c.clone(), url.clone());
        workers.spawn(async move {
            for _ in 0..75 {
                let r = get(&c, &url).await.unwrap();
                assert_eq!(r.status, 200, "{}", r.body);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.unwrap();
    }
    let hits: Vec<usize> = bs.iter().map(|b| b.hits()).collect();
    assert_eq!(hits.iter().sum::<usize>(), 300);
    // Round robin would give each a third; p2c picks the fast one whenever it is drawn (2 of 3 pairs).
    assert!(hits[1] >= 165, "the fast backend got {} of 300: {hits:?}", hits[1]);
    assert!(hits[0] > 0 && hits[2] > 0, "slow backends are still tried: {hits:?}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashing_on_a_header_keeps_a_key_on_one_backend_and_moves_only_the_dead_ones_keys() {
    let bs = [TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let p =
        Proxy::start(parse(&service(&addrs, "balance = \"hash\"\nhash_on = { header = \"x-user\" }"))).await.unwrap();
    healthy(&p, &addrs).await;
    let url = format!("http://{}/profile", p.local_addr("web").unwrap());
    let c = client();
    let users: Vec<String> = (0..30).map(|i| format!("user{i}")).collect();
    let mut home = BTreeMap::new();
    for u in &users {
        for _ in 0..3 {
            let r = send_with(&c, "GET", &url, &[("x-user", u)]).await.unwrap();
            assert_eq!(r.status, 200);
            let prev = home.insert(u.clone(), r.backend().to_string());
            assert!(prev.as_deref().is_none_or(|p| p == r.backend()), "{u} moved from {prev:?} to {}", r.backend());
        }
    }
    let per_backend = home.values().fold(HashMap::new(), |mut m, b| {
        *m.entry(b.clone()).or_insert(0) += 1;
        m
    });
    assert_eq!(per_backend.len(), 3, "keys spread over every backend: {per_backend:?}");

    let victim = home["user0"].clone();
    let dead = bs.iter().find(|b| b.name == victim).unwrap();
    dead.kill();
    // Before the checks notice, a key of the dead backend is retried on its next-best.
    let r = send_with(&c, "GET", &url, &[("x-user", "user0")]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let new_home = r.backend().to_string();
    assert_ne!(new_home, victim);
    wait_until(Duration::from_secs(5), "dead backend out of rotation", || {
        state_of(&p, "app", dead.addr).is_some_and(|s| s["state"] != "healthy")
    })
    .await;
    for u in &users {
        let r = send_with(&c, "GET", &url, &[("x-user", u)]).await.unwrap();
        assert_eq!(r.status, 200);
        if home[u] == victim {
            assert_ne!(r.backend(), victim);
            if u == "user0" {
                assert_eq!(r.backend(), new_home, "the retry and the re-hash agree on the next-best backend");
            }
        } else {
            assert_eq!(r.backend(), home[u], "{u} was not on the dead backend and stays put");
        }
    }
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookie_pins_a_client_until_its_backend_leaves_rotation() {
    let bs = [TestBackend::start("a").await, TestBackend::start("b").await, TestBackend::start("c").await];
    let addrs: Vec<_> = bs.iter().map(|b| b.addr).collect();
    let cfg = service(&addrs, "sticky_cookie = { name = \"pin\", max_age_secs = 600 }");
    let p = Proxy::start(parse(&cfg)).await.unwrap();
    healthy(&p, &addrs).await;
    let url = format!("http://{}/cart", p.local_addr("web").unwrap());
    let c = client();

    let first = get(&c, &url).await.unwrap();
    let set = first.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("pin=") && set.contains("Max-Age=600"), "{set}");
    assert!(!set.contains("127.0.0.1"), "the cookie does not reveal the address: {set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let pinned = first.backend().to_string();
    for _ in 0..9 {
        let r = send_with(&c, "GET", &url, &[("cookie", &cookie)]).await.unwrap();
        assert_eq!(r.backend(), pinned, "round robin would have moved on");
        assert!(r.headers.get("set-cookie").is_none(), "a valid pin is not set again");
    }
    let others: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(get(&c, &url).await.unwrap().backend().to_string());
        }
        v
    };
    assert!(others.iter().any(|b| *b != pinned), "clients without the cookie are balanced: {others:?}");

    let b = bs.iter().find(|b| b.name == pinned).unwrap();
    b.c.healthy.store(false, Ordering::SeqCst);
    wait_until(Duration::from_secs(5), "pinned backend out of rotation", || {
        state_of(&p, "app", b.addr).is_some_and(|s| s["state"] != "healthy")
    })
    .await;
    let moved = send_with(&c, "GET", &url, &[("cookie", &cookie)]).await.unwrap();
    assert_ne!(moved.backend(), pinned);
    let reset = moved.headers["set-cookie"].to_str().unwrap();
    let new_cookie = reset.split(';').next().unwrap().to_string();
    assert_ne!(new_cookie, cookie, "the client is re-pinned");
    for _ in 0..5 {
        let r = send_with(&c, "GET", &url, &[("cookie", &new_cookie)]).await.unwrap();
        assert_eq!(r.backend(), moved.backend());
    }
    p.shutdown(Duration::from_secs(1)).await;
}
