//! `GET /api/v1/watch`: member health streamed to data planes, snapshot then changes.

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn watcher(server: &Server) -> Ws {
    let mut req = format!("{}/api/v1/watch", server.ws_url()).into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {AGENT}").parse().unwrap());
    tokio_tungstenite::connect_async(req).await.expect("watch connects").0
}

/// Reads frames until one satisfies `pred`, or panics after `within`.
async fn next_matching(ws: &mut Ws, within: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("timed out after {within:?} waiting for {what}"))
            .expect("stream open")
            .expect("frame");
        let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        if pred(&v) {
            return v;
        }
    }
}

fn member_is(v: &Value, name: &str) -> bool {
    v["type"] == "upsert" && v["member"]["entity"] == name
}

#[test]
fn watch_streams_member_health_changes_as_they_happen() {
    let server = Server::start(&[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut ws = watcher(&server).await;
        let snap = next_matching(&mut ws, Duration::from_secs(5), "snapshot", |v| v["type"] == "snapshot").await;
        assert_eq!(snap["members"], serde_json::json!([]));

        let listen = format!("127.0.0.1:{}", free_port());
        let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "2", "--keepalive-critical-secs", "3"];
        let mut args = vec!["--api-listen", listen.as_str(), "--label", "zone=z1"];
        args.extend(ka);
        let mut agent = server.agent("web1", "web", &args);

        // New members start out of rotation until their first keepalive proves them.
        let first = next_matching(&mut ws, Duration::from_secs(20), "web1 appears", |v| member_is(v, "web1")).await;
        assert_eq!(first["member"]["healthy"], false, "{first}");
        assert_eq!(first["member"]["labels"]["zone"], "z1");
        assert_eq!(first["member"]["subscriptions"], serde_json::json!(["web"]));
        next_matching(&mut ws, Duration::from_secs(10), "web1 healthy", |v| {
            member_is(v, "web1") && v["member"]["healthy"] == true
        })
        .await;

        // A failing check reaches watchers as soon as the server records it.
        let url = format!("http://{listen}/results");
        let posted = Instant::now();
        ureq::post(&url)
            .header("Content-Type", "application/json")
            .send(r#"{"check":"http","status":2,"output":"HTTP CRITICAL"}"#)
            .unwrap();
        let v = next_matching(&mut ws, Duration::from_secs(5), "http failing", |v| {
            member_is(v, "web1") && v["member"]["checks"]["http"] == 2
        })
        .await;
        let latency = posted.elapsed();
        eprintln!("result POSTed to the agent -> watch frame: {latency:?}");
        // ~5 ms here; it was ~200 ms while the agent sampled system metrics in the same
        // loop that sends results.
        assert!(latency < Duration::from_millis(500), "{latency:?}");
        assert_eq!(
            v["member"]["healthy"], true,
            "named checks are the consumer's policy; keepalive decides base health"
        );

        // The node dies: it leaves rotation when its keepalive goes critical.
        agent.kill9();
        let dead = next_matching(&mut ws, Duration::from_secs(15), "web1 unhealthy", |v| {
            member_is(v, "web1") && v["member"]["healthy"] == false
        })
        .await;
        assert!(dead["member"]["reason"].as_str().unwrap().starts_with("keepalive"), "{dead}");

        // A watcher that connects now starts from a snapshot that agrees.
        let mut late = watcher(&server).await;
        let snap = next_matching(&mut late, Duration::from_secs(5), "snapshot", |v| v["type"] == "snapshot").await;
        let m = &snap["members"][0];
        assert_eq!((m["entity"].as_str(), m["healthy"].as_bool()), (Some("web1"), Some(false)), "{snap}");
    });
    // Deregistration is a removal.
    let mut gone = server.agent("elastic", "web", &["--deregister"]);
    server.wait_connected("elastic");
    rt.block_on(async {
        let mut ws = watcher(&server).await;
        next_matching(&mut ws, Duration::from_secs(5), "snapshot", |v| v["type"] == "snapshot").await;
        assert!(gone.term().success());
        next_matching(&mut ws, Duration::from_secs(10), "removal", |v| {
            v["type"] == "remove" && v["entity"] == "elastic"
        })
        .await;
    });
    let (st, _) = server.request("GET", "/api/v1/watch", None, Some("wrong"));
    assert_eq!(st, 401, "a watcher needs a token");
}
