//! Bad input gets a clear error and loses nothing.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const T: Duration = Duration::from_secs(30);

#[test]
fn invalid_config_exits_nonzero_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("checks.toml"),
        "[checks.cpu]\ncommand = \"check_load\"\nsubscriptions = [\"linux\"]\ninterval_secs = 0\n",
    )
    .unwrap();
    let out = std::process::Command::new(drover_bin())
        .args(["server", "--config-dir", conf.to_str().unwrap(), "--data-dir", dir.path().join("d").to_str().unwrap()])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checks.toml:4:"), "names file and line: {err}");
    assert!(err.contains("checks.cpu.interval_secs"), "names the field: {err}");

    // check-config says the same without starting anything.
    let out = std::process::Command::new(drover_bin())
        .args(["check-config", "--config-dir", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checks.toml:4:") && err.contains("interval_secs"), "{err}");

    std::fs::write(
        conf.join("checks.toml"),
        "[checks.cpu]\ncommand = \"check_load\"\nsubscriptions = [\"linux\"]\ninterval_secs = 10\n",
    )
    .unwrap();
    let out = std::process::Command::new(drover_bin())
        .args(["check-config", "--config-dir", conf.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bad_api_bodies_get_400_naming_the_field_and_nothing_is_lost() {
    let server = Server::start(&[]);
    let good = r#"{"name":"c1","command":"true","subscriptions":["a"],"interval_secs":10}"#;
    assert_eq!(server.request("POST", "/api/v1/checks", Some(good), Some(ADMIN)).0, 201);

    let (st, v) =
        server.request("POST", "/api/v1/checks", Some(r#"{"name":"c2","command":"true","intervl":5}"#), Some(ADMIN));
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["field"], "intervl", "{v}");
    let (st, v) = server.request(
        "POST",
        "/api/v1/checks",
        Some(r#"{"name":"c2","command":"true","subscriptions":["a"],"interval_secs":0}"#),
        Some(ADMIN),
    );
    assert_eq!(st, 400);
    assert_eq!(v["field"], "interval_secs", "{v}");
    let (st, v) = server.request("POST", "/api/v1/checks", Some("{not json"), Some(ADMIN));
    assert_eq!(st, 400, "{v}");
    let (st, v) = server.request("PUT", "/api/v1/checks/c1", Some(r#"{"name":"other","command":"true"}"#), Some(ADMIN));
    assert_eq!(st, 400);
    assert_eq!(v["field"], "name");
    let (st, _) = server.request("POST", "/api/v1/silences", Some("{}"), Some(ADMIN));
    assert_eq!(st, 400, "a silence with no selector is refused");
    assert_eq!(server.get("/api/v1/checks/nope").0, 404);

    let (_, checks) = server.get("/api/v1/checks");
    let names: Vec<&str> = checks.as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["c1"], "the good check is intact and no bad one was stored");
}

#[test]
fn tokens_gate_the_api_and_agent_token_cannot_administer() {
    let server = Server::start(&[]);
    assert_eq!(server.request("GET", "/api/v1/entities", None, None).0, 401);
    assert_eq!(server.request("GET", "/api/v1/entities", None, Some("wrong")).0, 401);
    let (st, v) = server.request("GET", "/api/v1/entities", None, Some(AGENT));
    assert_eq!(st, 403, "{v}");
    assert_eq!(server.request("GET", "/api/v1/entities", None, Some(ADMIN)).0, 200);
    assert_eq!(server.request("GET", "/health", None, None).0, 200, "health needs no token");

    // An agent with a wrong token never registers, and the refusal is logged.
    let url = server.ws_url();
    let _bad = Proc::spawn(
        &["agent", "--server", &url, "--name", "intruder", "--token", "wrong", "--api-listen", ""],
        server.dir.path().join("intruder.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(server.entity("intruder").is_none());
    assert!(server.proc.log_text().contains("wrong token"), "refusal is logged");
}

#[test]
fn first_start_writes_tokens_with_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut p = Proc::spawn(
        &[
            "server",
            "--data-dir",
            dir.path().join("d").to_str().unwrap(),
            "--config-dir",
            dir.path().join("none").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        dir.path().join("s.log"),
    );
    let tok = dir.path().join("d/admin.token");
    wait_for(T, "admin.token written", || tok.exists().then_some(()));
    for f in ["admin.token", "agent.token"] {
        let mode = std::fs::metadata(dir.path().join("d").join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let admin = std::fs::read_to_string(&tok).unwrap().trim().to_string();
    wait_for(T, "server up", || {
        ureq::get(&format!("http://127.0.0.1:{port}/api/v1/entities"))
            .header("Authorization", &format!("Bearer {admin}"))
            .call()
            .ok()
            .filter(|r| r.status() == 200)
    });
    assert!(p.term().success());
}

async fn raw_agent(
    url: &str,
    name: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let mut req = format!("{url}/api/v1/agent/ws").into_client_request().unwrap();
    req.headers_mut().insert("Authorization", format!("Bearer {AGENT}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = serde_json::json!({
        "type": "hello", "protocol_version": 1, "session": "s1",
        "entity": { "name": name, "subscriptions": ["x"] }
    });
    ws.send(Message::Text(hello.to_string().into())).await.unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"), "{welcome:?}");
    ws
}

#[test]
fn malformed_frame_closes_only_that_connection() {
    let server = Server::start(&[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let url = server.ws_url();
        let mut good = raw_agent(&url, "good").await;
        let mut bad = raw_agent(&url, "bad").await;
        bad.send(Message::Text("{\"type\":\"result\",\"seq\":\"not a number\"".into())).await.unwrap();
        // The bad connection gets an error frame and is closed.
        let mut closed = false;
        while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), bad.next()).await {
            match msg {
                Ok(Message::Close(_)) | Err(_) => {
                    closed = true;
                    break;
                }
                Ok(_) => continue,
            }
        }
        assert!(closed || bad.next().await.is_none(), "malformed frame closes the connection");
        // The good one still works: a result sent now is acknowledged.
        let result = serde_json::json!({"type":"result","seq":1,"result":{"check":"still","status":0,"output":"fine"}});
        good.send(Message::Text(result.to_string().into())).await.unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let m = good.next().await.unwrap().unwrap();
                if m.to_text().unwrap_or("").contains("\"ack\"") {
                    return m;
                }
            }
        })
        .await
        .expect("ack on the healthy connection");
        assert!(ack.to_text().unwrap().contains("\"up_to\":1"));
    });
    assert!(server.event("good", "still").is_some());
    assert_eq!(server.request("GET", "/health", None, None).0, 200, "server still serving");
    assert!(server.entity("bad").is_some(), "stored entity not lost");
}

#[test]
fn resent_results_after_reconnect_are_stored_once() {
    let server = Server::start(&[]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let url = server.ws_url();
        for _attempt in 0..2 {
            // Same session both times: the second connection re-sends seq 1..=3.
            let mut ws = raw_agent(&url, "resender").await;
            for seq in 1..=3 {
                let r =
                    serde_json::json!({"type":"result","seq":seq,"result":{"check":"once","status":2,"output":"x"}});
                ws.send(Message::Text(r.to_string().into())).await.unwrap();
            }
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let m = ws.next().await.unwrap().unwrap();
                    if m.to_text().unwrap_or("").contains("\"up_to\":3") {
                        return;
                    }
                }
            })
            .await
            .expect("cumulative ack up to 3");
            ws.close(None).await.ok();
        }
    });
    let ev = server.wait_event("resender", "once", T, |_| true);
    assert_eq!(ev["occurrences"], 3, "duplicates dropped: {ev}");
    assert_eq!(ev["history"].as_array().unwrap().len(), 3);
}

#[test]
fn api_crud_for_entities_events_checks_and_silences() {
    let server = Server::start(&[]);
    // A proxy entity (a website, no agent) made through the API.
    let site = r#"{"name":"shop","address":"shop.example","labels":{"role":"website"}}"#;
    let (st, v) = server.request("POST", "/api/v1/entities", Some(site), Some(ADMIN));
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["class"], "proxy", "API-made entities have no agent");
    assert_eq!(server.request("POST", "/api/v1/entities", Some(site), Some(ADMIN)).0, 409);
    let (st, v) = server.request("PUT", "/api/v1/entities/shop", Some(r#"{"address":"shop2.example"}"#), Some(ADMIN));
    assert_eq!(st, 200, "{v}");
    assert_eq!(server.entity("shop").unwrap()["address"], "shop2.example");

    // An external result creates its event; resolve and delete it.
    let result = r#"{"entity":"shop","check":"http","status":2,"output":"HTTP CRITICAL - 503"}"#;
    let (st, ev) = server.request("POST", "/api/v1/events", Some(result), Some(ADMIN));
    assert_eq!(st, 202, "{ev}");
    assert_eq!(status(&ev), 2);
    let (st, missing) = server.request("POST", "/api/v1/events", Some(r#"{"check":"http","status":0}"#), Some(ADMIN));
    assert_eq!((st, missing["field"].as_str()), (400, Some("entity")));
    let (st, ev) = server.request("POST", "/api/v1/events/shop/http/resolve", Some("{}"), Some(ADMIN));
    assert_eq!(st, 200, "{ev}");
    assert_eq!(status(&ev), 0);
    assert_eq!(ev["action"], "resolve");
    let (_, list) = server.get("/api/v1/events/shop");
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(server.request("DELETE", "/api/v1/events/shop/http", None, Some(ADMIN)).0, 204);
    assert!(server.event("shop", "http").is_none());
    assert_eq!(server.request("DELETE", "/api/v1/events/shop/http", None, Some(ADMIN)).0, 404);

    // Checks: create, replace, delete.
    let c = r#"{"name":"web","command":"check_http -H {{ .address }}","subscriptions":["probe"],"interval_secs":30}"#;
    assert_eq!(server.request("POST", "/api/v1/checks", Some(c), Some(ADMIN)).0, 201);
    let c2 = r#"{"command":"check_http -H {{ .address }} -S","subscriptions":["probe"],"interval_secs":60}"#;
    assert_eq!(server.request("PUT", "/api/v1/checks/web", Some(c2), Some(ADMIN)).0, 200);
    assert_eq!(server.get("/api/v1/checks/web").1["interval_secs"], 60);
    assert_eq!(server.request("DELETE", "/api/v1/checks/web", None, Some(ADMIN)).0, 204);
    assert_eq!(server.get("/api/v1/checks/web").0, 404);

    // Silences: the name is derived from the selectors.
    let (st, s) =
        server.request("POST", "/api/v1/silences", Some(r#"{"entity":"shop","expire_secs":60}"#), Some(ADMIN));
    assert_eq!(st, 201, "{s}");
    assert_eq!(s["name"], "shop:*:*");
    assert_eq!(server.request("DELETE", "/api/v1/silences/shop:*:*", None, Some(ADMIN)).0, 204);

    // Deleting the entity removes it (and any events) without an alert.
    assert_eq!(server.request("DELETE", "/api/v1/entities/shop", None, Some(ADMIN)).0, 204);
    assert!(server.entity("shop").is_none());
}
