//! Delivery against real receivers: webhooks with retry and dead letters, pipe
//! handlers with mutators, UDP, Graphite, InfluxDB, and a slow handler under load.

mod common;

use axum::http::{HeaderMap, StatusCode};
use common::*;
use drover_core::{EntityClass, MetricPoint, Status};
use drover_testkit::free_port;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Requests = Arc<Mutex<Vec<(String, HeaderMap, String)>>>;

/// A real HTTP server on `port` that records every request (path, headers, body).
async fn http_receiver(port: u16) -> (Requests, tokio::task::JoinHandle<()>) {
    let got: Requests = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
        let sink = sink.clone();
        async move {
            sink.lock().unwrap().push((uri.to_string(), headers, body));
            StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (got, task)
}

#[tokio::test]
async fn webhook_is_delivered_after_the_receiver_was_down_for_a_while() {
    let port = free_port();
    let template =
        r#"'{"text": "{{ .entity.name }}/{{ .check.name }}: {{ .check.output }}", "status": {{ .check.status }}}'"#;
    let cfg = config(&format!(
        "[handlers.hook]\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/alerts\"\n\
         headers = {{ Authorization = \"Bearer s3cret\" }}\nbody_template = {template}\n\
         max_attempts = 8\nretry_initial_ms = 100\n"
    ));
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    let mut r = result("web1", "disk", Status::Critical);
    r.output = "disk \"/\" at 97%\nsecond line".into();
    let ev = ctx
        .record_result(r, drover_core::event::EventCheckConfig { handlers: vec!["hook".into()], ..Default::default() });
    assert!(p.submit(ev));

    // Down for a while: the first attempts are refused.
    let failed = wait_for(Duration::from_secs(10), || (p.stats().failed >= 2).then_some(())).await;
    assert!(failed.is_some(), "no failed attempts while the receiver is down: {:?}", p.stats());
    let (got, _server) = http_receiver(port).await;

    let req = wait_for(Duration::from_secs(20), || got.lock().unwrap().first().cloned()).await;
    let (path, headers, body) = req.expect("webhook never arrived after the receiver came up");
    assert_eq!(path, "/alerts");
    assert_eq!(headers["authorization"], "Bearer s3cret");
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_str(&body).expect("templated body is valid JSON");
    assert_eq!(json["text"], "web1/disk: disk \"/\" at 97%\nsecond line");
    assert_eq!(json["status"], 2);
    // The receiver has the request before the handler has read the answer and counted it.
    let attempt_over = || Some(p.stats()).filter(|st| st.handlers["hook"].in_progress == 0);
    let st = wait_for(Duration::from_secs(5), attempt_over).await.unwrap_or_else(|| p.stats());
    assert_eq!((st.delivered, st.dead_lettered), (1, 0), "{st:?}");
    assert!(st.retried >= 2);
}

#[tokio::test]
async fn exhausted_retries_dead_letter_raise_handler_event_and_retry_resolves_it() {
    let port = free_port();
    let cfg = config(&format!(
        "[handlers.hook]\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/\"\nmax_attempts = 2\nretry_initial_ms = 20\n"
    ));
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    p.submit(ctx.record("web1", "disk", Status::Critical, &["hook"]));
    p.submit(ctx.record("web2", "disk", Status::Critical, &["hook"]));

    let dead = wait_for(Duration::from_secs(10), || {
        let d = p.dead_letters();
        (d.len() == 2).then_some(d)
    })
    .await
    .expect("both events end in dead letters");
    assert_eq!(dead[0].handler, "hook");
    assert_eq!(dead[0].attempts, 2);
    assert!(dead[0].error.contains("127.0.0.1"), "{}", dead[0].error);
    let failure = ctx.event_of(SERVER, "handler-hook").expect("handler failure event raised");
    assert_eq!(failure.status, Status::Critical);
    assert!(p.stats().handlers["hook"].failing);
    // Raised once per failing spell, not once per dead letter.
    assert_eq!(ctx.ingested_for("handler-hook").len(), 1);

    let (got, _server) = http_receiver(port).await;
    let web1 = dead.iter().find(|d| d.entity == "web1").unwrap().id;
    let web2 = dead.iter().find(|d| d.entity == "web2").unwrap().id;
    assert!(p.drop_dead_letter(web2));
    assert!(!p.drop_dead_letter(web2), "already dropped");
    assert!(p.retry_dead_letter(web1));
    assert!(!p.retry_dead_letter(web1), "no longer a dead letter");
    let body = wait_for(Duration::from_secs(10), || got.lock().unwrap().first().map(|r| r.2.clone())).await;
    let json: serde_json::Value = serde_json::from_str(&body.expect("retried dead letter delivered")).unwrap();
    assert_eq!(json["entity"]["name"], "web1");
    assert!(p.dead_letters().is_empty());
    let resolved =
        wait_for(Duration::from_secs(5), || ctx.event_of(SERVER, "handler-hook").filter(|e| e.status == Status::Ok))
            .await;
    assert!(resolved.is_some(), "handler failure event not resolved after a success");
    assert!(!p.stats().handlers["hook"].failing);
}

#[tokio::test]
async fn pipe_handler_gets_command_mutator_output_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = config(&format!(
        "[mutators.upper]\ncommand = \"sed s/web1/WEB1/g\"\n\
         [handlers.file]\ntype = \"pipe\"\ncommand = \"cat > {out}.tmp && mv {out}.tmp {out}\"\nmutator = \"upper\"\n\
         [handlers.short]\ntype = \"pipe\"\ncommand = \"cat > {out}.short.tmp && mv {out}.short.tmp {out}.short\"\n\
         mutator = \"only_check_output\"\n",
        out = out.display()
    ));
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    p.submit(ctx.record("web1", "disk", Status::Warning, &["file", "short"]));
    let text = wait_for(Duration::from_secs(10), || std::fs::read_to_string(&out).ok().filter(|s| !s.is_empty())).await;
    let json: serde_json::Value = serde_json::from_str(&text.expect("pipe handler wrote nothing")).unwrap();
    assert_eq!(json["entity"]["name"], "WEB1", "mutated by the command mutator");
    let short = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(format!("{}.short", out.display())).ok().filter(|s| !s.is_empty())
    })
    .await;
    assert_eq!(short.as_deref(), Some("disk is WARNING"));
}

#[tokio::test]
async fn failing_pipe_command_and_mutator_count_as_failed_attempts() {
    let cfg = config(
        "[mutators.broken]\ncommand = \"exit 4\"\n\
         [handlers.m]\ntype = \"pipe\"\ncommand = \"cat\"\nmutator = \"broken\"\nmax_attempts = 1\n\
         [handlers.c]\ntype = \"pipe\"\ncommand = \"echo nope >&2; exit 1\"\nmax_attempts = 1\n",
    );
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    p.submit(ctx.record("web1", "disk", Status::Warning, &["m", "c"]));
    let dead = wait_for(Duration::from_secs(10), || {
        let d = p.dead_letters();
        (d.len() == 2).then_some(d)
    })
    .await
    .expect("both dead-lettered");
    let err = |h: &str| dead.iter().find(|d| d.handler == h).unwrap().error.clone();
    assert!(err("m").contains("mutator broken"), "{}", err("m"));
    assert!(err("c").contains("nope"), "{}", err("c"));
}

#[tokio::test]
async fn udp_handler_sends_the_event_as_one_datagram() {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let cfg = config(&format!("[handlers.u]\ntype = \"udp\"\naddress = \"{}\"\n", sock.local_addr().unwrap()));
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    p.submit(ctx.record("web1", "disk", Status::Critical, &["u"]));
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf)).await.expect("no datagram").unwrap();
    let json: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
    assert_eq!(json["check"]["name"], "disk");
}

fn point(name: &str, value: f64) -> MetricPoint {
    MetricPoint { name: name.into(), value, timestamp: 1_700_000_000, tags: vec![], unit: None }
}

#[tokio::test]
async fn graphite_and_influxdb_handlers_send_check_and_keepalive_metrics_with_tags() {
    let (graphite, got_g) = tcp_receiver().await;
    let port = free_port();
    let (got_i, _server) = http_receiver(port).await;
    let cfg = config(&format!(
        "[handlers.g]\ntype = \"graphite\"\naddress = \"{graphite}\"\nprefix = \"drover\"\nfilters = [\"has_metrics\"]\n\
         [handlers.i]\ntype = \"influxdb\"\nurl = \"http://127.0.0.1:{port}/api/v2/write?org=o&bucket=b\"\n\
         headers = {{ Authorization = \"Token t\" }}\n\
         [handlers.metrics]\ntype = \"set\"\nhandlers = [\"g\", \"i\"]\n"
    ));
    let ctx = FakeContext::new();
    ctx.add_entity("node1", EntityClass::Agent, &[]);
    ctx.entities.lock().unwrap().get_mut("node1").unwrap().metrics = vec![point("system.load1", 0.25)];
    let p = start(&ctx, cfg);

    let mut r = result("node1", "disk", Status::Ok);
    r.metrics = vec![point("disk.used", 42.0)];
    let cfg = drover_core::event::EventCheckConfig { handlers: vec!["metrics".into()], ..Default::default() };
    p.submit(ctx.record_result(r, cfg.clone()));
    let lines = wait_for(Duration::from_secs(10), || {
        got_i.lock().unwrap().first().map(|(path, h, body)| (path.clone(), h["authorization"].clone(), body.clone()))
    })
    .await
    .expect("influx write");
    assert_eq!(lines.0, "/api/v2/write?org=o&bucket=b");
    assert_eq!(lines.1, "Token t");
    assert_eq!(lines.2, "disk.used,check=disk,entity=node1 value=42 1700000000000000000\n");
    let g = wait_for(Duration::from_secs(10), || got_g.lock().unwrap().first().cloned()).await.expect("graphite");
    assert_eq!(String::from_utf8(g).unwrap(), "drover.disk.used;entity=node1;check=disk 42 1700000000\n");

    // Keepalive events carry no metrics of their own: the entity's system metrics go.
    got_i.lock().unwrap().clear();
    p.submit(ctx.record_result(result("node1", "keepalive", Status::Ok), cfg));
    let body = wait_for(Duration::from_secs(10), || got_i.lock().unwrap().first().map(|r| r.2.clone())).await;
    assert_eq!(body.as_deref(), Some("system.load1,check=keepalive,entity=node1 value=0.25 1700000000000000000\n"));
}

#[tokio::test]
async fn slow_pipe_handler_does_not_slow_submit_or_other_handlers() {
    let (fast, got) = tcp_receiver().await;
    let mut cfg = config(&format!(
        "[handlers.slow]\ntype = \"pipe\"\ncommand = \"sleep 5\"\nmax_concurrent = 2\ntimeout_secs = 30\n\
         [handlers.fast]\ntype = \"tcp\"\naddress = \"{fast}\"\nmax_concurrent = 8\n"
    ));
    cfg.queue_capacity = 20_000;
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    let ev = ctx.record("web1", "disk", Status::Critical, &["slow", "fast"]);

    let started = Instant::now();
    let mut accepted = 0;
    for _ in 0..10_000 {
        if p.submit(ev.clone()) {
            accepted += 1;
        }
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "10,000 submits took {took:?}");
    assert_eq!(accepted, 10_000, "the intake queue had room for all");

    // While both slow attempts sleep, the fast handler keeps delivering.
    let fast_count = wait_for(Duration::from_secs(4), || {
        let n = got.lock().unwrap().len();
        (n >= 200).then_some(n)
    })
    .await;
    assert!(fast_count.is_some(), "fast handler starved by the slow one: {:?}", p.stats());
    let st = p.stats();
    assert_eq!(st.handlers["slow"].in_flight, 2, "{st:?}");
    assert_eq!(st.handlers["slow"].delivered, 0);
    // The slow handler's backlog is bounded and its overflow is visible.
    let drained = wait_for(Duration::from_secs(20), || (p.stats().queued == 0).then(|| p.stats())).await;
    let st = drained.expect("dispatcher drained the intake queue");
    assert!(st.handlers["slow"].dropped > 0, "{st:?}");
    assert!(st.handlers["slow"].queued <= st.handlers["slow"].queue_capacity);
    assert_eq!(st.submitted, 10_000);
}
