//! Which events reach handlers: occurrence throttling, silences, dependencies, the
//! implicit keepalive dependency, handler sets; and aggregates.

mod common;

use common::*;
use drover_core::{CheckSpec, EntityClass, Status};
use std::time::Duration;

fn tcp_handler_config(addr: std::net::SocketAddr, filters: &str, extra: &str) -> drover_pipeline::PipelineConfig {
    config(&format!(
        "[handlers.ops]\ntype = \"tcp\"\naddress = \"{addr}\"\nfilters = [{filters}]\nmax_concurrent = 1\n\n{extra}"
    ))
}

/// Waits until the pipeline has been idle (nothing queued, nothing in progress) for
/// 300 ms in a row, so "not delivered" is final and receivers have read what was sent.
async fn settle(p: &drover_pipeline::Pipeline) {
    let mut idle_since: Option<std::time::Instant> = None;
    let done = wait_for(Duration::from_secs(15), || {
        let s = p.stats();
        let idle = s.queued == 0 && s.handlers.values().all(|h| h.queued == 0 && h.in_progress == 0);
        match (idle, idle_since) {
            (false, _) => idle_since = None,
            (true, None) => idle_since = Some(std::time::Instant::now()),
            (true, Some(t)) if t.elapsed() >= Duration::from_millis(300) => return Some(()),
            _ => {}
        }
        None
    })
    .await;
    assert!(done.is_some(), "pipeline did not settle: {:?}", p.stats());
}

#[tokio::test]
async fn occurrence_filter_alerts_on_third_failure_then_once_per_refresh_and_on_resolution() {
    let (addr, got) = tcp_receiver().await;
    // Results every 10 s, refresh every 30 s: occurrences 3, 6, 9 alert.
    let cfg = tcp_handler_config(
        addr,
        "\"is_incident\", \"fatigue\"",
        "[filters.fatigue]\noccurrences = 3\nrefresh_secs = 30\n",
    );
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    p.submit(ctx.record("web1", "disk", Status::Ok, &["ops"]));
    for _ in 0..10 {
        p.submit(ctx.record("web1", "disk", Status::Critical, &["ops"]));
    }
    p.submit(ctx.record("web1", "disk", Status::Ok, &["ops"]));
    wait_for(Duration::from_secs(10), || (got.lock().unwrap().len() >= 4).then_some(())).await;
    settle(&p).await;
    let mut seen: Vec<(u64, u64)> = json_payloads(&got)
        .iter()
        .map(|v| (v["check"]["status"].as_u64().unwrap(), v["check"]["occurrences"].as_u64().unwrap()))
        .collect();
    seen.sort();
    assert_eq!(seen, vec![(0, 1), (2, 3), (2, 6), (2, 9)], "alerts: (status, occurrences)");

    // An incident that never reached 3 occurrences resolves silently.
    got.lock().unwrap().clear();
    p.submit(ctx.record("web1", "disk", Status::Critical, &["ops"]));
    p.submit(ctx.record("web1", "disk", Status::Critical, &["ops"]));
    p.submit(ctx.record("web1", "disk", Status::Ok, &["ops"]));
    settle(&p).await;
    assert!(got.lock().unwrap().is_empty(), "short incident and its resolution must not alert");
}

#[tokio::test]
async fn silence_suppresses_via_not_silenced_and_its_absence_resumes_handling() {
    let (addr, got) = tcp_receiver().await;
    let ctx = FakeContext::new();
    let p = start(&ctx, tcp_handler_config(addr, "\"not_silenced\"", ""));
    let mut ev = ctx.record("web1", "disk", Status::Critical, &["ops"]);
    ev.silenced_by = vec!["web1:*:disk".into()];
    p.submit(ev);
    settle(&p).await;
    assert!(got.lock().unwrap().is_empty(), "silenced event was handled");
    assert_eq!(p.stats().handlers["ops"].filtered, 1);

    let ev = ctx.record("web1", "disk", Status::Critical, &["ops"]);
    p.submit(ev);
    settle(&p).await;
    let payloads = json_payloads(&got);
    assert_eq!(payloads.len(), 1);
    assert_eq!(payloads[0]["silenced"], false);
}

#[tokio::test]
async fn failing_dependency_suppresses_dependents_until_it_recovers() {
    let (addr, got) = tcp_receiver().await;
    let ctx = FakeContext::new();
    ctx.add_entity("db1", EntityClass::Proxy, &[]);
    ctx.add_entity("web1", EntityClass::Proxy, &[]);
    let mut app = CheckSpec::new("app", "check_app");
    app.dependencies = vec!["db1/postgres".into(), "nginx".into()];
    ctx.add_check(app);
    let p = start(&ctx, tcp_handler_config(addr, "", ""));

    ctx.record("db1", "postgres", Status::Critical, &[]);
    p.submit(ctx.record("web1", "app", Status::Critical, &["ops"]));
    settle(&p).await;
    assert!(got.lock().unwrap().is_empty(), "dependent alerted while its dependency fails");
    assert_eq!(p.stats().suppressed, 1);

    // A same-entity dependency counts too.
    ctx.record("db1", "postgres", Status::Ok, &[]);
    ctx.record("web1", "nginx", Status::Warning, &[]);
    p.submit(ctx.record("web1", "app", Status::Critical, &["ops"]));
    settle(&p).await;
    assert!(got.lock().unwrap().is_empty(), "dependent alerted while its same-entity dependency fails");

    ctx.record("web1", "nginx", Status::Ok, &[]);
    p.submit(ctx.record("web1", "app", Status::Critical, &["ops"]));
    settle(&p).await;
    assert_eq!(json_payloads(&got).len(), 1, "handled again once dependencies pass");
}

#[tokio::test]
async fn failing_keepalive_suppresses_the_agents_other_checks_but_not_itself() {
    let (addr, got) = tcp_receiver().await;
    let ctx = FakeContext::new();
    ctx.add_entity("node1", EntityClass::Agent, &[]);
    ctx.add_entity("site", EntityClass::Proxy, &[]);
    let p = start(&ctx, tcp_handler_config(addr, "", ""));

    p.submit(ctx.record("node1", "keepalive", Status::Critical, &["ops"]));
    p.submit(ctx.record("node1", "disk", Status::Critical, &["ops"]));
    settle(&p).await;
    let checks: Vec<String> =
        json_payloads(&got).iter().map(|v| v["check"]["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(checks, vec!["keepalive"]);

    // Proxy entities have no keepalive to depend on; a recovered node alerts again.
    got.lock().unwrap().clear();
    ctx.record("site", "keepalive", Status::Critical, &[]);
    p.submit(ctx.record("site", "http", Status::Critical, &["ops"]));
    ctx.record("node1", "keepalive", Status::Ok, &[]);
    p.submit(ctx.record("node1", "disk", Status::Critical, &["ops"]));
    settle(&p).await;
    let mut checks: Vec<String> =
        json_payloads(&got).iter().map(|v| v["check"]["name"].as_str().unwrap().to_string()).collect();
    checks.sort();
    assert_eq!(checks, vec!["disk", "http"]);
}

#[tokio::test]
async fn handler_sets_expand_recursively_and_deliver_once_per_member() {
    let (addr_a, got_a) = tcp_receiver().await;
    let (addr_b, got_b) = tcp_receiver().await;
    let cfg = config(&format!(
        "[handlers.a]\ntype = \"tcp\"\naddress = \"{addr_a}\"\n[handlers.b]\ntype = \"tcp\"\naddress = \"{addr_b}\"\n\
         [handlers.inner]\ntype = \"set\"\nhandlers = [\"a\", \"b\"]\n\
         [handlers.outer]\ntype = \"set\"\nhandlers = [\"inner\", \"a\"]\n"
    ));
    let ctx = FakeContext::new();
    let p = start(&ctx, cfg);
    p.submit(ctx.record("web1", "disk", Status::Warning, &["outer", "b"]));
    settle(&p).await;
    assert_eq!(got_a.lock().unwrap().len(), 1);
    assert_eq!(got_b.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_handler_is_counted_not_fatal() {
    let (addr, got) = tcp_receiver().await;
    let ctx = FakeContext::new();
    let p = start(&ctx, tcp_handler_config(addr, "", ""));
    p.submit(ctx.record("web1", "disk", Status::Warning, &["nope", "ops"]));
    settle(&p).await;
    assert_eq!(got.lock().unwrap().len(), 1);
    assert_eq!(p.stats().unknown_handler, 1);
}

#[tokio::test]
async fn aggregate_raises_when_critical_share_crosses_threshold_and_resolves() {
    let (addr, got) = tcp_receiver().await;
    let ctx = FakeContext::new();
    for i in 0..10 {
        ctx.add_entity(&format!("web{i}"), EntityClass::Agent, &["web"]);
        ctx.record(&format!("web{i}"), "http", Status::Ok, &[]);
    }
    // Not subscribed: must not count.
    ctx.add_entity("db1", EntityClass::Agent, &["db"]);
    ctx.record("db1", "http", Status::Critical, &[]);
    let mut cfg = tcp_handler_config(
        addr,
        "",
        "[aggregates.web-http]\ncheck = \"http\"\nsubscription = \"web\"\ncritical_percent = 30\nhandlers = [\"ops\"]\n",
    );
    cfg.aggregate_interval_ms = 50;
    let _pipeline = start(&ctx, cfg);

    let agg = |status: Status| {
        let ctx = ctx.clone();
        move || ctx.event_of("aggregate:web-http", "web-http").filter(|e| e.status == status)
    };
    let ok = wait_for(Duration::from_secs(5), agg(Status::Ok)).await.expect("aggregate event created");
    assert!(ok.output.starts_with("0 of 10 critical (0%)"), "{}", ok.output);

    ctx.record("web1", "http", Status::Critical, &[]);
    ctx.record("web2", "http", Status::Critical, &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ctx.event_of("aggregate:web-http", "web-http").unwrap().status, Status::Ok, "2 of 10 is below 30%");

    ctx.record("web3", "http", Status::Critical, &[]);
    let crit = wait_for(Duration::from_secs(5), agg(Status::Critical)).await.expect("aggregate went critical");
    assert!(crit.output.starts_with("3 of 10 critical (30%)"), "{}", crit.output);
    // The aggregate's own event goes through its handlers like any other.
    let alerted = wait_for(Duration::from_secs(5), || {
        json_payloads(&got)
            .into_iter()
            .find(|v| v["entity"]["name"] == "aggregate:web-http" && v["check"]["status"] == 2)
    })
    .await;
    assert!(alerted.is_some(), "aggregate alert not delivered");

    ctx.record("web3", "http", Status::Ok, &[]);
    let resolved = wait_for(Duration::from_secs(5), agg(Status::Ok)).await.expect("aggregate resolved");
    assert_eq!(resolved.action, drover_core::event::EventAction::Resolve);
}

#[tokio::test]
async fn a_panic_while_routing_one_event_skips_only_that_event() {
    let (addr, got) = tcp_receiver().await;
    let ctx = FakeContext::new();
    *ctx.poisoned_entity.lock().unwrap() = Some("bad".into());
    let p = start(&ctx, tcp_handler_config(addr, "", ""));
    p.submit(ctx.record("bad", "disk", Status::Critical, &["ops"]));
    p.submit(ctx.record("good", "disk", Status::Critical, &["ops"]));
    wait_for(Duration::from_secs(10), || (!got.lock().unwrap().is_empty()).then_some(())).await;
    settle(&p).await;
    let names: Vec<String> =
        json_payloads(&got).iter().map(|v| v["entity"]["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, vec!["good"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_that_cannot_keep_up_is_refused_before_the_event_is_copied() {
    let ctx = FakeContext::new();
    ctx.add_entity("web1", EntityClass::Agent, &["web"]);
    let mut cfg = config(
        "[handlers.slow]\ntype = \"pipe\"\ncommand = \"sleep 30\"\nmax_concurrent = 1\ntimeout_secs = 60\n\n\
         [handlers.everything]\ntype = \"set\"\nhandlers = [\"slow\"]\n",
    );
    cfg.handler_queue_capacity = 2;
    let p = start(&ctx, cfg);
    let names = vec!["everything".to_string()];
    // The worker holds a bounded number of deliveries in progress, the queue holds two
    // more; after that every further event must be refused, and counted.
    let mut accepted = Vec::new();
    for _ in 0..60 {
        let yes = p.would_accept(&names);
        if yes {
            assert!(p.submit(ctx.record("web1", "disk", Status::Critical, &["everything"])));
        }
        accepted.push(yes);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted[..20].iter().any(|a| *a), "an idle handler accepts");
    assert!(accepted[30..].iter().all(|a| !a), "a full handler refuses further events: {accepted:?}");
    let stats = p.stats();
    assert!(stats.handlers["slow"].dropped >= 30, "refusals are counted as drops: {:?}", stats.handlers["slow"]);
    assert!(p.would_accept(&["undefined".to_string()]), "unknown names pass through to be reported by the dispatcher");
    p.stop();
}
