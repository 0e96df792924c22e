//! The response cache between a real client and a real backend.

mod common;

use common::*;
use drover_proxy::Proxy;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_serves_hits_without_the_backend_until_max_age_expires() {
    let b = TestBackend::start("b").await;
    let p =
        Proxy::start(parse(&web_to_app_routed("", "", &[b.addr], "cache = { max_bytes = 1048576 }"))).await.unwrap();
    let base = format!("http://{}", p.local_addr("web").unwrap());
    let c = client();
    let url = format!("{base}/page?cc=max-age=1");

    let miss = get(&c, &url).await.unwrap();
    assert_eq!((miss.status, &miss.headers["x-cache"]), (200, &"MISS".parse::<http::HeaderValue>().unwrap()));
    assert_eq!(b.hits(), 1);
    let hit = get(&c, &url).await.unwrap();
    assert_eq!(hit.headers["x-cache"], "HIT");
    assert_eq!(hit.body, miss.body, "the stored body");
    assert_eq!(hit.headers["age"], "0");
    assert_eq!(hit.headers["cache-control"], "max-age=1");
    let head = send(&c, "HEAD", &url, None, "").await.unwrap();
    assert_eq!((head.headers["x-cache"].to_str().unwrap(), head.body.as_str()), ("HIT", ""));
    assert_eq!(b.hits(), 1, "hits never reached the backend");

    // A different query string is a different URL.
    let other = get(&c, &format!("{base}/page?cc=max-age=1&x=2")).await.unwrap();
    assert_eq!(other.headers["x-cache"], "MISS");
    assert_eq!(b.hits(), 2);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = get(&c, &url).await.unwrap();
    assert_eq!(expired.headers["x-cache"], "MISS", "max-age=1 is over");
    assert_eq!(b.hits(), 3);
    assert_eq!(get(&c, &url).await.unwrap().headers["x-cache"], "HIT", "and stored again");
    assert_eq!(b.hits(), 3);
    let m = p.metrics();
    assert!(m.contains("drover_proxy_cache_lookups_total{service=\"app\",outcome=\"hit\"} 3"), "{m}");
    assert!(m.contains("drover_proxy_cache_lookups_total{service=\"app\",outcome=\"miss\"} 3"), "{m}");
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_respects_no_store_authorization_and_client_no_cache() {
    let b = TestBackend::start("b").await;
    // A route cache with a default lifetime: even responses without freshness are stored.
    let p =
        Proxy::start(parse(&web_to_app_routed("", "cache = { default_ttl_secs = 60 }", &[b.addr], ""))).await.unwrap();
    let base = format!("http://{}", p.local_addr("web").unwrap());
    let c = client();

    for _ in 0..3 {
        let r = get(&c, &format!("{base}/secret?cc=no-store")).await.unwrap();
        assert_eq!(r.headers["x-cache"], "MISS");
    }
    assert_eq!(b.hits(), 3, "no-store is never stored");

    let r = get(&c, &format!("{base}/private?cc=private")).await.unwrap();
    assert_eq!(r.headers["x-cache"], "MISS");
    get(&c, &format!("{base}/private?cc=private")).await.unwrap();
    assert_eq!(b.hits(), 5, "private is never stored");

    let me = [("authorization", "Bearer t")];
    send_with(&c, "GET", &format!("{base}/mine"), &me).await.unwrap();
    send_with(&c, "GET", &format!("{base}/mine"), &me).await.unwrap();
    assert_eq!(get(&c, &format!("{base}/mine")).await.unwrap().headers["x-cache"], "MISS");
    assert_eq!(b.hits(), 8, "a response to an authorized request is not stored without `public`");

    get(&c, &format!("{base}/plain")).await.unwrap();
    assert_eq!(get(&c, &format!("{base}/plain")).await.unwrap().headers["x-cache"], "HIT", "default_ttl_secs");
    let fresh = send_with(&c, "GET", &format!("{base}/plain"), &[("cache-control", "no-cache")]).await.unwrap();
    assert_eq!(fresh.headers["x-cache"], "MISS", "the client asked for a fresh answer");
    assert_eq!(b.hits(), 10);

    assert_eq!(get(&c, &format!("{base}/plain")).await.unwrap().headers["x-cache"], "HIT");
    let post = send(&c, "POST", &format!("{base}/plain"), None, "x").await.unwrap();
    assert!(post.headers.get("x-cache").is_none(), "POST is not answered from the cache");
    assert_eq!(b.hits(), 11);
    let after = get(&c, &format!("{base}/plain")).await.unwrap();
    assert_eq!(after.headers["x-cache"], "MISS", "a successful POST makes the stored response stale");
    assert_eq!(b.hits(), 12);
    p.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_responses_survive_a_reload_unless_the_cache_settings_change() {
    let b = TestBackend::start("b").await;
    let other = TestBackend::start("other").await;
    let cfg =
        |backend: std::net::SocketAddr, cache: &str| web_to_app_routed("", &format!("cache = {cache}"), &[backend], "");
    let p = Proxy::start(parse(&cfg(b.addr, "{ max_bytes = 100000 }"))).await.unwrap();
    let url = format!("http://{}/doc?cc=max-age=60", p.local_addr("web").unwrap());
    let c = client();
    assert_eq!(get(&c, &url).await.unwrap().headers["x-cache"], "MISS");

    let mut reloaded = parse(&cfg(other.addr, "{ max_bytes = 100000 }"));
    reloaded.listeners = p.config().listeners;
    p.reload(reloaded.clone()).unwrap();
    let r = get(&c, &url).await.unwrap();
    assert_eq!((r.headers["x-cache"].to_str().unwrap(), r.backend()), ("HIT", "b"), "kept across the reload");
    assert_eq!(other.hits(), 0);

    let mut resized = parse(&cfg(other.addr, "{ max_bytes = 200000 }"));
    resized.listeners = reloaded.listeners;
    p.reload(resized).unwrap();
    let r = get(&c, &url).await.unwrap();
    assert_eq!((r.headers["x-cache"].to_str().unwrap(), r.backend()), ("MISS", "other"), "new settings, new cache");
    p.shutdown(Duration::from_secs(1)).await;
}
