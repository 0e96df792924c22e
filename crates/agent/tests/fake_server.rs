//! The agent against a scripted stand-in for the server: each accepted WebSocket is
//! handed to the test, which plays the server's side of the protocol frame by frame.

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use drover_core::config::AgentConfig;
use drover_core::protocol::{AgentMessage, CheckRequest, ServerMessage};
use drover_core::resource::CheckSpec;
use drover_core::status::Status;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const TOKEN: &str = "agent-token";
const WAIT: Duration = Duration::from_secs(10);

struct FakeServer {
    addr: SocketAddr,
    sockets: mpsc::UnboundedReceiver<WebSocket>,
}

#[derive(Clone)]
struct ServerState {
    sockets: mpsc::UnboundedSender<WebSocket>,
    accept_token: &'static str,
}

async fn upgrade(State(st): State<ServerState>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let expected = format!("Bearer {}", st.accept_token);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, "bad token").into_response();
    }
    ws.on_upgrade(move |socket| async move {
        let _ = st.sockets.send(socket);
    })
}

impl FakeServer {
    async fn start(accept_token: &'static str) -> FakeServer {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = axum::Router::new()
            .route("/api/v1/agent/ws", axum::routing::get(upgrade))
            .with_state(ServerState { sockets: tx, accept_token });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeServer { addr, sockets: rx }
    }

    async fn accept(&mut self) -> WebSocket {
        tokio::time::timeout(WAIT, self.sockets.recv()).await.expect("agent connects").unwrap()
    }
}

async fn recv(ws: &mut WebSocket) -> AgentMessage {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.recv()).await.expect("agent message in time");
        match msg {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("agent sends valid messages"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("unexpected frame: {other:?}"),
        }
    }
}

/// The next message that is not a keepalive.
async fn recv_non_keepalive(ws: &mut WebSocket) -> AgentMessage {
    loop {
        match recv(ws).await {
            AgentMessage::Keepalive(_) => continue,
            m => return m,
        }
    }
}

async fn send(ws: &mut WebSocket, msg: &ServerMessage) {
    ws.send(Message::Text(serde_json::to_string(msg).unwrap().into())).await.unwrap();
}

fn config(server: SocketAddr) -> AgentConfig {
    AgentConfig {
        name: Some("node1".into()),
        server: Some(format!("http://{server}")),
        token: Some(TOKEN.into()),
        subscriptions: vec!["linux".into()],
        api_listen: "127.0.0.1:0".into(),
        ..Default::default()
    }
}

/// A minimal HTTP/1.1 client; returns (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    (status, serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn results_are_resent_after_reconnect_until_acked_and_deregister_on_shutdown() {
    let mut server = FakeServer::start(TOKEN).await;
    let mut cfg = config(server.addr);
    cfg.deregister = true;
    let agent = drover_agent::start(cfg).await.unwrap();
    let api = agent.api_addr().expect("api bound");
    assert_ne!(api.port(), 0);

    let mut ws = server.accept().await;
    let AgentMessage::Hello(hello) = recv(&mut ws).await else { panic!("hello first") };
    assert_eq!(hello.protocol_version, drover_core::protocol::PROTOCOL_VERSION);
    assert_eq!(hello.entity.name, "node1");
    assert_eq!(hello.entity.subscriptions, ["linux"]);
    assert!(hello.entity.deregister);
    assert!(hello.entity.system.as_ref().is_some_and(|s| s.cpus > 0));
    send(&mut ws, &ServerMessage::Welcome { acked_up_to: 0 }).await;
    let AgentMessage::Keepalive(ka) = recv(&mut ws).await else { panic!("keepalive right after welcome") };
    assert!(ka.metrics.iter().any(|m| m.name == "memory.total_bytes"));

    let (status, body) =
        http(api, "POST", "/results", r#"{"check":"backup","status":2,"output":"failed","ttl_secs":90}"#).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, serde_json::json!({"accepted": true, "seq": 1}));
    let AgentMessage::Result { seq: 1, result } = recv_non_keepalive(&mut ws).await else { panic!("result 1") };
    assert_eq!(result.check, "backup");
    assert_eq!(result.status, Status::Critical);
    assert_eq!(result.check_config.unwrap().ttl_secs, Some(90));

    let (status, body) = http(api, "POST", "/results", r#"{"check":"backup","status":9}"#).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("status"), "{body}");

    // Drop the connection without acking: the agent must reconnect and re-send.
    drop(ws);
    let mut ws = server.accept().await;
    let AgentMessage::Hello(hello2) = recv(&mut ws).await else { panic!("hello again") };
    assert_eq!(hello2.session, hello.session, "same process, same session");
    send(&mut ws, &ServerMessage::Welcome { acked_up_to: 0 }).await;
    let AgentMessage::Result { seq: 1, .. } = recv_non_keepalive(&mut ws).await else { panic!("result 1 re-sent") };
    send(&mut ws, &ServerMessage::Ack { up_to: 1 }).await;

    // A check request runs and reports with the next seq.
    let request = CheckRequest {
        check: CheckSpec::new("disk", "echo 'DISK WARNING | used=91%'; exit 1"),
        issued_ms: 42,
        splay_ms: 0,
        proxy_entity: None,
    };
    send(&mut ws, &ServerMessage::Request(Box::new(request))).await;
    let AgentMessage::Result { seq: 2, result } = recv_non_keepalive(&mut ws).await else { panic!("result 2") };
    assert_eq!(result.status, Status::Warning);
    assert_eq!(result.issued_ms, 42);
    assert_eq!(result.metrics[0].name, "used");
    send(&mut ws, &ServerMessage::Ack { up_to: 2 }).await;

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, health) = http(api, "GET", "/healthz", "").await;
        if health == serde_json::json!({"connected": true, "buffered": 0}) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A result still unacked at shutdown is flushed before the deregister.
    let (status, _) = http(api, "POST", "/results", r#"{"check":"late","status":0}"#).await;
    assert_eq!(status, 202);
    let stop = tokio::spawn(agent.shutdown());
    let AgentMessage::Result { seq: 3, .. } = recv_non_keepalive(&mut ws).await else { panic!("result 3") };
    send(&mut ws, &ServerMessage::Ack { up_to: 3 }).await;
    assert_eq!(recv_non_keepalive(&mut ws).await, AgentMessage::Deregister);
    stop.await.unwrap().unwrap();
}

#[tokio::test]
async fn welcome_drops_results_the_server_already_stored() {
    let mut server = FakeServer::start(TOKEN).await;
    let mut cfg = config(server.addr);
    cfg.server = Some(format!("ws://{}", server.addr));
    let agent = drover_agent::start(cfg).await.unwrap();
    let api = agent.api_addr().unwrap();
    for check in ["a", "b", "c"] {
        let (status, _) = http(api, "POST", "/results", &format!(r#"{{"check":"{check}","status":0}}"#)).await;
        assert_eq!(status, 202);
    }
    let mut ws = server.accept().await;
    let AgentMessage::Hello(_) = recv(&mut ws).await else { panic!() };
    send(&mut ws, &ServerMessage::Welcome { acked_up_to: 2 }).await;
    let AgentMessage::Result { seq, result } = recv_non_keepalive(&mut ws).await else { panic!() };
    assert_eq!((seq, result.check.as_str()), (3, "c"));
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_frame_drops_the_connection_and_agent_reconnects() {
    let mut server = FakeServer::start(TOKEN).await;
    let agent = drover_agent::start(config(server.addr)).await.unwrap();
    let mut ws = server.accept().await;
    let AgentMessage::Hello(_) = recv(&mut ws).await else { panic!() };
    send(&mut ws, &ServerMessage::Welcome { acked_up_to: 0 }).await;
    ws.send(Message::Text("{\"type\":\"nonsense\"}".into())).await.unwrap();
    let mut ws = server.accept().await;
    let AgentMessage::Hello(_) = recv(&mut ws).await else { panic!("reconnected") };
    send(&mut ws, &ServerMessage::Error { message: "go away".into() }).await;
    let mut ws = server.accept().await;
    let AgentMessage::Hello(_) = recv(&mut ws).await else { panic!("reconnected after server error") };
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn refused_token_is_counted_and_retried_without_stopping() {
    let server = FakeServer::start("another-token").await;
    let mut agent = drover_agent::start(config(server.addr)).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while agent.auth_refusals() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "agent retries after a refusal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let still_running = tokio::time::timeout(Duration::from_millis(300), agent.wait()).await;
    assert!(still_running.is_err(), "a refused token does not stop the agent");
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn local_checks_run_on_their_interval_with_check_config() {
    let mut server = FakeServer::start(TOKEN).await;
    let mut cfg = config(server.addr);
    cfg.api_listen = String::new();
    let mut check = CheckSpec::new("", "echo local; exit 2");
    check.interval_secs = Some(1);
    check.ttl_secs = Some(5);
    check.handlers = vec!["pager".into()];
    cfg.checks.insert("local".into(), check);
    let agent = drover_agent::start(cfg).await.unwrap();
    assert_eq!(agent.api_addr(), None);
    let mut ws = server.accept().await;
    let AgentMessage::Hello(_) = recv(&mut ws).await else { panic!() };
    send(&mut ws, &ServerMessage::Welcome { acked_up_to: 0 }).await;
    for want_seq in 1..=2 {
        let AgentMessage::Result { seq, result } = recv_non_keepalive(&mut ws).await else { panic!() };
        assert_eq!(seq, want_seq);
        assert_eq!(result.check, "local");
        assert_eq!(result.status, Status::Critical);
        assert_eq!(result.output, "local\n");
        let cfg = result.check_config.expect("local results carry their config");
        assert_eq!((cfg.ttl_secs, cfg.handlers), (Some(5), vec!["pager".to_string()]));
    }
    agent.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_config_is_refused_at_start() {
    let mut cfg = AgentConfig::default();
    assert!(matches!(drover_agent::start(cfg.clone()).await, Err(drover_agent::AgentError::Config(_))));
    cfg.server = Some("ftp://x".into());
    assert!(matches!(drover_agent::start(cfg.clone()).await, Err(drover_agent::AgentError::Config(_))));
    cfg.server = Some("ws://127.0.0.1:9".into());
    cfg.api_listen = "not an address".into();
    assert!(drover_agent::start(cfg).await.is_err());
}
