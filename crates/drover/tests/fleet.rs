//! The fleet, end to end: a real server, real agents, real Nagios plugins, on loopback.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn check_toml(name: &str, command: &str, subs: &str, extra: &str) -> String {
    format!(
        "[checks.{name}]\ncommand = {command:?}\nsubscriptions = [{subs}]\ninterval_secs = 1\nsplay = false\n{extra}\n"
    )
}

#[test]
fn check_reaches_only_its_subscribers() {
    let cfg = check_toml("who", "echo ran on {{ .name }} in {{ .labels.zone | default \"nowhere\" }}", "\"web\"", "");
    let server = Server::start(&[("checks.toml", &cfg)]);
    let _web1 = server.agent("web1", "web", &["--label", "zone=z1"]);
    let _web2 = server.agent("web2", "web", &[]);
    let _db1 = server.agent("db1", "db", &[]);
    for n in ["web1", "web2", "db1"] {
        server.wait_connected(n);
    }
    let e1 = server.wait_event("web1", "who", T, |e| status(e) == 0);
    assert_eq!(e1["output"].as_str().unwrap().trim(), "ran on web1 in z1", "entity tokens substituted");
    let e2 = server.wait_event("web2", "who", T, |e| status(e) == 0);
    assert_eq!(e2["output"].as_str().unwrap().trim(), "ran on web2 in nowhere", "token default used");
    // Give db1 several intervals in which it must not run the check.
    std::thread::sleep(Duration::from_secs(3));
    assert!(server.event("db1", "who").is_none(), "db1 is not subscribed to web");
    assert!(server.event("db1", "keepalive").is_some(), "db1 itself is monitored");
}

#[test]
fn results_are_visible_through_api_and_cli() {
    let cfg = check_toml("warn", "echo something is off; exit 1", "\"linux\"", "");
    let server = Server::start(&[("checks.toml", &cfg)]);
    let _a = server.agent("node1", "linux", &[]);
    let ev = server.wait_event("node1", "warn", T, |e| status(e) == 1);
    for field in ["entity", "check", "status", "occurrences", "output"] {
        assert!(!ev[field].is_null(), "event carries `{field}`: {ev}");
    }
    assert_eq!(ev["entity"], "node1");
    assert_eq!(ev["check"], "warn");
    assert_eq!(ev["state"], "failing");

    let out = std::process::Command::new(drover_bin())
        .args(["ctl", "--server", &server.url(), "--token", ADMIN, "events", "list", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ctl failed: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).expect("ctl --format json prints a JSON array");
    let arr = listed.as_array().expect("array");
    assert!(arr.iter().any(|e| e["entity"] == "node1" && e["check"] == "warn" && e["status"] == 1), "{listed}");

    for kind in ["entities", "checks", "silences"] {
        let out = std::process::Command::new(drover_bin())
            .args(["ctl", "--server", &server.url(), "--token", ADMIN, kind, "list", "--format", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "ctl {kind} list: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v.is_array(), "ctl {kind} list prints an array");
    }
    // The table format names the entity too.
    let out = std::process::Command::new(drover_bin())
        .args(["ctl", "--server", &server.url(), "--token", ADMIN, "events", "list"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("node1") && table.contains("WARNING"), "{table}");
}

#[test]
fn killed_agent_raises_keepalive_event_and_restart_resolves_it() {
    let server = Server::start(&[]);
    let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "2", "--keepalive-critical-secs", "4"];
    let mut agent = server.agent("victim", "linux", &ka);
    server.wait_connected("victim");
    server.wait_event("victim", "keepalive", T, |e| status(e) == 0);

    agent.kill9();
    let started = std::time::Instant::now();
    let warn = server.wait_event("victim", "keepalive", Duration::from_secs(10), |e| status(e) == 1);
    assert!(warn["output"].as_str().unwrap().contains("No keepalive"), "{warn}");
    server.wait_event("victim", "keepalive", Duration::from_secs(10), |e| status(e) == 2);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "critical within the configured 4 s (+ tick), took {:?}",
        started.elapsed()
    );

    let _again = server.agent("victim", "linux", &ka);
    let ok = server.wait_event("victim", "keepalive", T, |e| status(e) == 0);
    let statuses: Vec<i64> = ok["history"].as_array().unwrap().iter().map(|h| h["status"].as_i64().unwrap()).collect();
    let crit_then_ok = statuses.windows(2).any(|w| w == [2, 0]);
    assert!(crit_then_ok, "history shows CRITICAL resolved by the returning agent: {statuses:?}");
    assert_eq!(ok["state"], "passing");
}

#[test]
fn server_restart_keeps_entities_events_silences_and_checks() {
    let cfg = check_toml("disk", "echo DISK CRITICAL; exit 2", "\"linux\"", "");
    let mut server = Server::start(&[("checks.toml", &cfg)]);
    let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "3", "--keepalive-critical-secs", "5"];
    let mut agent = server.agent("n1", "linux", &ka);
    server.wait_event("n1", "disk", T, |e| status(e) == 2 && e["occurrences"].as_u64().unwrap() >= 2);
    let (st, _) = server.request(
        "POST",
        "/api/v1/silences",
        Some(r#"{"check":"disk","reason":"maintenance window"}"#),
        Some(ADMIN),
    );
    assert_eq!(st, 201);
    let (st, _) = server.request(
        "POST",
        "/api/v1/checks",
        Some(r#"{"name":"api_made","command":"true","subscriptions":["x"],"interval_secs":60}"#),
        Some(ADMIN),
    );
    assert_eq!(st, 201);
    agent.kill9();

    // A crash, not a clean stop: acknowledged state must already be on disk.
    server.restart(true);
    let ev = server.event("n1", "disk").expect("event survives a crash restart");
    assert_eq!(status(&ev), 2);
    assert!(ev["occurrences"].as_u64().unwrap() >= 2);
    assert!(ev["history"].as_array().unwrap().len() >= 2);
    assert!(server.entity("n1").is_some(), "entity survives");
    let (_, sils) = server.get("/api/v1/silences");
    assert!(sils.as_array().unwrap().iter().any(|s| s["reason"] == "maintenance window"), "{sils}");
    let (st, _) = server.get("/api/v1/checks/api_made");
    assert_eq!(st, 200, "API-made check survives");
    // The agent died while the server was down: it is still detected after the restart.
    let ev = server.wait_event("n1", "keepalive", Duration::from_secs(15), |e| status(e) != 0);
    assert!(ev["output"].as_str().unwrap().contains("No keepalive"));
}

#[test]
fn nagios_plugins_run_as_checks_and_perfdata_becomes_metric_points() {
    let p = plugins_dir();
    let p = p.display();
    let cfg = format!(
        "{}{}{}{}",
        check_toml("dummy", &format!("{p}/check_dummy 1 'dummy says warn'"), "\"linux\"", ""),
        check_toml("tcp", &format!("{p}/check_tcp -H 127.0.0.1 -p {{{{ .labels.api_port }}}}"), "\"linux\"", ""),
        check_toml("load", &format!("{p}/check_load -w 1000,1000,1000 -c 2000,2000,2000"), "\"linux\"", ""),
        check_toml("disk", &format!("{p}/check_disk -w 0% -c 0% -p /"), "\"linux\"", ""),
    );
    let server = Server::start(&[("checks.toml", &cfg)]);
    let port = server.port.to_string();
    let _a = server.agent("plug", "linux", &["--label", &format!("api_port={port}")]);

    let dummy = server.wait_event("plug", "dummy", T, |e| status(e) == 1);
    assert!(dummy["output"].as_str().unwrap().contains("dummy says warn"));

    let tcp = server.wait_event("plug", "tcp", T, |e| !e["metrics"].as_array().unwrap().is_empty());
    assert_eq!(status(&tcp), 0, "check_tcp against the server's own port: {tcp}");
    assert!(tcp["metrics"].as_array().unwrap().iter().any(|m| m["name"] == "time"), "{tcp}");

    let load = server.wait_event("plug", "load", T, |e| !e["metrics"].as_array().unwrap().is_empty());
    assert_eq!(status(&load), 0, "{load}");
    let names: Vec<&str> = load["metrics"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"load1") && names.contains(&"load15"), "{names:?}");

    let disk = server.wait_event("plug", "disk", T, |e| !e["metrics"].as_array().unwrap().is_empty());
    assert_eq!(status(&disk), 0, "{disk}");
    assert!(disk["metrics"].as_array().unwrap().iter().any(|m| m["name"] == "/"), "{disk}");
}

#[test]
fn round_robin_spreads_runs_across_agents() {
    let cfg = check_toml("rr", "echo one run", "\"pool\"", "round_robin = true");
    let server = Server::start(&[("checks.toml", &cfg)]);
    let names = ["rr1", "rr2", "rr3"];
    let _agents: Vec<Proc> = names.iter().map(|n| server.agent(n, "pool", &[])).collect();
    for n in names {
        server.wait_connected(n);
    }
    let started = std::time::Instant::now();
    wait_for(T, "every agent ran the round-robin check", || {
        names.iter().all(|n| server.event(n, "rr").is_some()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let elapsed_runs = started.elapsed().as_secs() + 3;
    let total: usize = names.iter().map(|n| server.event(n, "rr").unwrap()["history"].as_array().unwrap().len()).sum();
    // One agent per run: the total across agents tracks the number of runs, not 3x.
    assert!(total as u64 <= elapsed_runs, "{total} results in ~{elapsed_runs} runs: some run went to several agents");
}

#[test]
fn ttl_check_fires_when_results_stop() {
    let server = Server::start(&[]);
    let api_port = free_port();
    let listen = format!("127.0.0.1:{api_port}");
    let _a = server.agent("ttl-node", "", &["--api-listen", &listen]);
    server.wait_connected("ttl-node");
    // A cron script reports through the agent's local endpoint, then stops reporting.
    let url = format!("http://{listen}/results");
    let body = r#"{"check":"nightly_backup","status":0,"output":"backup done","ttl_secs":2}"#;
    wait_for(T, "agent accepts the result", || {
        ureq::post(&url).header("Content-Type", "application/json").send(body).ok().filter(|r| r.status() == 202)
    });
    server.wait_event("ttl-node", "nightly_backup", T, |e| status(e) == 0);
    let late = server.wait_event("ttl-node", "nightly_backup", Duration::from_secs(10), |e| status(e) == 1);
    assert!(late["output"].as_str().unwrap().contains("Last check execution"), "{late}");
}

#[test]
fn alternating_check_is_detected_as_flapping() {
    // Declared on the server (thresholds), run by a script through the agent endpoint.
    let cfg =
        "[checks.flappy]\ncommand = \"true\"\npublish = false\nlow_flap_threshold = 20\nhigh_flap_threshold = 50\n";
    let server = Server::start(&[("checks.toml", cfg)]);
    let listen = format!("127.0.0.1:{}", free_port());
    let _a = server.agent("flap-node", "", &["--api-listen", &listen]);
    server.wait_connected("flap-node");
    let url = format!("http://{listen}/results");
    for i in 0..22 {
        let body = format!(r#"{{"check":"flappy","status":{},"output":"run {i}"}}"#, if i % 2 == 0 { 0 } else { 2 });
        wait_for(T, "agent accepts the result", || {
            ureq::post(&url).header("Content-Type", "application/json").send(&body).ok().filter(|r| r.status() == 202)
        });
    }
    let ev = server.wait_event("flap-node", "flappy", T, |e| {
        e["history"].as_array().unwrap().len() == 21 && e["state"] == "flapping"
    });
    assert!(ev["total_state_change"].as_u64().unwrap() >= 50, "{ev}");
}

#[test]
fn clean_stop_with_deregister_raises_nothing() {
    let server = Server::start(&[]);
    let mut agent = server.agent(
        "elastic-1",
        "web",
        &["--deregister", "--keepalive-interval-secs", "1", "--keepalive-warning-secs", "2"],
    );
    server.wait_connected("elastic-1");
    assert!(agent.term().success(), "agent exits cleanly on SIGTERM:\n{}", agent.log_text());
    wait_for(T, "entity removed", || server.entity("elastic-1").is_none().then_some(()));
    // Well past the warning threshold: no keepalive event may appear.
    std::thread::sleep(Duration::from_secs(3));
    assert!(server.events().iter().all(|e| e["entity"] != "elastic-1"), "deregistered node raised an event");
}

#[test]
fn execute_runs_a_check_now() {
    let cfg = "[checks.ondemand]\ncommand = \"echo on demand\"\nsubscriptions = [\"ops\"]\ninterval_secs = 3600\n";
    let server = Server::start(&[("checks.toml", cfg)]);
    let _a = server.agent("ops1", "ops", &[]);
    server.wait_connected("ops1");
    let (st, v) = server.request("POST", "/api/v1/checks/ondemand/execute", Some("{}"), Some(ADMIN));
    assert_eq!(st, 202, "{v}");
    assert_eq!(v["issued"], 1);
    let ev = server.wait_event("ops1", "ondemand", Duration::from_secs(10), |_| true);
    assert_eq!(ev["output"].as_str().unwrap().trim(), "on demand");
}

#[test]
fn proxy_check_runs_once_per_matching_proxy_entity() {
    let cfg = "[entities.site-a]\naddress = \"a.example\"\nlabels = { role = \"website\" }\n\n\
               [entities.site-b]\naddress = \"b.example\"\nlabels = { role = \"website\" }\n\n\
               [entities.printer]\nlabels = { role = \"printer\" }\n\n\
               [checks.http]\ncommand = \"echo probing {{ .address }}\"\nsubscriptions = [\"prober\"]\ninterval_secs = 1\nround_robin = true\nproxy_requests = { labels = { role = \"website\" } }\n";
    let server = Server::start(&[("proxy.toml", cfg)]);
    let _p1 = server.agent("prober1", "prober", &[]);
    let _p2 = server.agent("prober2", "prober", &[]);
    let a = server.wait_event("site-a", "http", T, |_| true);
    assert_eq!(a["output"].as_str().unwrap().trim(), "probing a.example");
    let b = server.wait_event("site-b", "http", T, |_| true);
    assert_eq!(b["output"].as_str().unwrap().trim(), "probing b.example");
    std::thread::sleep(Duration::from_secs(2));
    assert!(server.event("printer", "http").is_none(), "label selector excludes the printer");
    assert!(
        server.event("prober1", "http").is_none() && server.event("prober2", "http").is_none(),
        "results belong to the proxy entities"
    );
}

#[test]
fn silence_marks_events_and_expire_on_resolve_removes_it() {
    let server = Server::start(&[]);
    let listen = format!("127.0.0.1:{}", free_port());
    let _a = server.agent("s1", "web", &["--api-listen", &listen]);
    server.wait_connected("s1");
    let (st, sil) = server.request(
        "POST",
        "/api/v1/silences",
        Some(r#"{"subscription":"web","check":"app","expire_on_resolve":true,"reason":"deploy"}"#),
        Some(ADMIN),
    );
    assert_eq!(st, 201, "{sil}");
    let name = sil["name"].as_str().unwrap().to_string();
    let url = format!("http://{listen}/results");
    // An event that exists before the silence is marked as soon as the silence is made.
    ureq::post(&url)
        .header("Content-Type", "application/json")
        .send(r#"{"check":"other","status":2,"output":"y"}"#)
        .unwrap();
    server.wait_event("s1", "other", T, |e| status(e) == 2);
    let (st, _) = server.request(
        "POST",
        "/api/v1/silences",
        Some(r#"{"entity":"s1","check":"other","reason":"now"}"#),
        Some(ADMIN),
    );
    assert_eq!(st, 201);
    assert_eq!(server.event("s1", "other").unwrap()["silenced_by"], serde_json::json!(["s1:*:other"]));
    assert_eq!(server.request("DELETE", "/api/v1/silences/s1:*:other", None, Some(ADMIN)).0, 204);
    assert_eq!(server.event("s1", "other").unwrap()["silenced_by"], serde_json::json!([]), "and unmarked when removed");
    let post = |status: u8| {
        let body = format!(r#"{{"check":"app","status":{status},"output":"x"}}"#);
        ureq::post(&url).header("Content-Type", "application/json").send(&body).unwrap();
    };
    post(2);
    let ev = server.wait_event("s1", "app", T, |e| status(e) == 2);
    assert_eq!(ev["silenced_by"], serde_json::json!([name.clone()]), "{ev}");
    post(0);
    server.wait_event("s1", "app", T, |e| status(e) == 0);
    wait_for(T, "silence removed on resolve", || {
        (server.get(&format!("/api/v1/silences/{name}")).0 == 404).then_some(())
    });
}
