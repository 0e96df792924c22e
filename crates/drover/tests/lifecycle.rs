//! Agents and servers coming and going: buffering, local checks, `up`, import.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn history_times(ev: &Value) -> Vec<i64> {
    ev["history"].as_array().unwrap().iter().map(|h| h["executed_ms"].as_i64().unwrap()).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[test]
fn results_made_while_the_server_is_down_are_delivered_after_it_returns() {
    let mut server = Server::start(&[]);
    let cfg = server.dir.path().join("agent.toml");
    std::fs::write(&cfg, "[checks.heartbeat]\ncommand = \"echo beat\"\ninterval_secs = 1\n").unwrap();
    let _agent = server.agent("buffered", "", &["--config", cfg.to_str().unwrap()]);
    server.wait_event("buffered", "heartbeat", T, |_| true);

    server.stop(true);
    let down_from = now_ms();
    std::thread::sleep(Duration::from_secs(4));
    let down_to = now_ms();
    server.start_again();

    // The runs made during the outage arrive once the agent reconnects.
    let ev = server.wait_event("buffered", "heartbeat", T, |e| {
        history_times(e).iter().filter(|t| **t > down_from + 500 && **t < down_to - 500).count() >= 2
    });
    let times = history_times(&ev);
    let mut sorted = times.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), times.len(), "no result stored twice: {times:?}");
}

#[test]
fn agent_config_file_runs_local_checks_with_their_settings() {
    let server = Server::start(&[]);
    let cfg = server.dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "subscriptions = [\"local\"]\nlabels = { zone = \"z9\" }\n\n\
         [checks.local_disk]\ncommand = \"echo 'DISK WARNING - zone {{ .labels.zone }} | used=91%;80;90'; exit 1\"\n\
         interval_secs = 1\nttl_secs = 5\nhandlers = [\"ops\"]\n",
    )
    .unwrap();
    let _agent = server.agent("cfg-node", "", &["--config", cfg.to_str().unwrap()]);
    let ev = server.wait_event("cfg-node", "local_disk", T, |e| status(e) == 1);
    assert!(ev["output"].as_str().unwrap().contains("zone z9"), "{ev}");
    assert_eq!(ev["check_config"]["ttl_secs"], 5, "local check settings travel with the result");
    assert_eq!(ev["check_config"]["handlers"], serde_json::json!(["ops"]));
    assert_eq!(ev["metrics"][0]["name"], "used");
    assert_eq!(ev["metrics"][0]["unit"], "%");
    let ent = server.entity("cfg-node").unwrap();
    assert_eq!(ent["labels"]["zone"], "z9");
    assert_eq!(ent["subscriptions"], serde_json::json!(["local"]));
}

#[test]
fn keepalives_carry_system_metrics_and_facts() {
    let server = Server::start(&[]);
    let _a = server.agent("facts", "linux", &[]);
    let ent = wait_for(T, "keepalive metrics on the entity", || {
        server.entity("facts").filter(|e| e["metrics"].as_array().is_some_and(|m| !m.is_empty()))
    });
    let names: Vec<&str> = ent["metrics"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    for want in ["cpu.usage_percent", "memory.used_bytes", "load.load1", "disk.used_bytes", "net.rx_bytes"] {
        assert!(names.contains(&want), "missing {want} in {names:?}");
    }
    assert!(ent["system"]["cpus"].as_u64().unwrap() >= 1, "{ent}");
    assert!(!ent["system"]["hostname"].as_str().unwrap().is_empty());
}

#[test]
fn cron_check_runs_on_its_schedule() {
    let cfg = "[checks.every_second]\ncommand = \"echo tick\"\nsubscriptions = [\"c\"]\ncron = \"* * * * * *\"\n";
    let server = Server::start(&[("cron.toml", cfg)]);
    let _a = server.agent("cron-node", "c", &[]);
    let ev = server.wait_event("cron-node", "every_second", T, |e| e["history"].as_array().unwrap().len() >= 3);
    let t = history_times(&ev);
    let gaps: Vec<i64> = t.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g >= 500 && *g <= 2500), "runs about a second apart: {gaps:?}");
}

#[test]
fn prometheus_metrics_describe_drover_itself() {
    let server = Server::start(&[]);
    let _a = server.agent("m1", "x", &[]);
    server.wait_connected("m1");
    let body = ureq::get(&format!("{}/metrics", server.url())).call().unwrap().body_mut().read_to_string().unwrap();
    for name in ["drover_agents_connected 1", "drover_keepalives_received_total", "drover_results_received_total"] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
}

#[test]
fn drover_up_runs_a_server_its_agent_a_proxy_and_a_name_server_that_follow_members() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("drover.d");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("c.toml"),
        "[checks.hello]\ncommand = \"echo hello from up\"\nsubscriptions = [\"default\"]\ninterval_secs = 1\n",
    )
    .unwrap();
    let (port, proxy_port, proxy_admin, dns_port) = (free_port(), free_port(), free_port(), free_port());
    let mut up = Proc::spawn(
        &[
            "up",
            "--config-dir",
            conf.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--name",
            "solo",
            "--proxy",
            &format!("127.0.0.1:{proxy_port}=web:8000"),
            "--proxy-admin",
            &format!("127.0.0.1:{proxy_admin}"),
            "--dns",
            &format!("127.0.0.1:{dns_port}"),
        ],
        dir.path().join("up.log"),
    );
    let token_file = dir.path().join("data/admin.token");
    wait_for(T, "admin token", || token_file.exists().then_some(()));
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let ev = wait_for(T, "the local agent's check result", || {
        ureq::get(&format!("http://127.0.0.1:{port}/api/v1/events/solo/hello"))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
    });
    assert_eq!(ev["output"].as_str().unwrap().trim(), "hello from up");

    // up's proxy sends traffic to a `web` member as soon as its agent says it is there.
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(site.join("index.html"), "served by web1\n").unwrap();
    let web_port = free_port();
    let mut backend = std::process::Command::new("python3")
        .args(["-m", "http.server", &web_port.to_string(), "--bind", "127.0.0.1", "--directory"])
        .arg(&site)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent_token = std::fs::read_to_string(dir.path().join("data/agent.token")).unwrap();
    let label = format!("port={web_port}");
    let server = format!("ws://127.0.0.1:{port}");
    let _web1 = Proc::spawn(
        &[
            "agent",
            "--server",
            &server,
            "--token",
            agent_token.trim(),
            "--name",
            "web1",
            "--subscriptions",
            "web",
            "--address",
            "127.0.0.1",
            "--label",
            &label,
            "--api-listen",
            "",
        ],
        dir.path().join("web1.log"),
    );
    let body = wait_for(T, "a GET through up's proxy reaching web1", || {
        ureq::get(&format!("http://127.0.0.1:{proxy_port}/")).call().ok()?.body_mut().read_to_string().ok()
    });
    assert_eq!(body, "served by web1\n");
    let backends = ureq::get(&format!("http://127.0.0.1:{proxy_admin}/backends"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    assert!(backends.contains("\"entity\":\"web1\""), "{backends}");
    // And up's name server answers the subscription's and the node's discovery names.
    let dig = |name: &str| {
        let out = std::process::Command::new("dig")
            .args(["@127.0.0.1", "-p", &dns_port.to_string(), "+short", "+time=2", "+tries=1", name, "A"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_for(T, "web.service.drover. answering web1", || (dig("web.service.drover.") == "127.0.0.1").then_some(()));
    assert_eq!(dig("web1.node.drover."), "127.0.0.1");
    let _ = backend.kill();
    let _ = backend.wait();
    assert!(up.term().success(), "up stops cleanly:\n{}", up.log_text());
}

#[test]
fn imported_sensu_config_loads_into_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let sensu = dir.path().join("sensu");
    std::fs::create_dir_all(&sensu).unwrap();
    std::fs::write(
        sensu.join("checks.json"),
        r#"{"checks":{"check_echo":{"command":"echo sensu check :::name:::","subscribers":["base"],"interval":1,"handlers":["mail"]},
             "check_rr":{"command":"true","subscribers":["roundrobin:base"],"interval":60}}}"#,
    )
    .unwrap();
    let out_dir = dir.path().join("drover.d");
    let out = std::process::Command::new(drover_bin())
        .args(["import", "sensu", sensu.to_str().unwrap(), "--out", out_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<(String, String)> = std::fs::read_dir(&out_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read_to_string(e.path()).unwrap()))
        .collect();
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let server = Server::start(&refs);
    let (_, rr) = server.get("/api/v1/checks/check_rr");
    assert_eq!(rr["round_robin"], true);
    assert_eq!(rr["subscriptions"], serde_json::json!(["base"]));
    let _a = server.agent("sensu-node", "base", &[]);
    let ev = server.wait_event("sensu-node", "check_echo", T, |_| true);
    assert_eq!(ev["output"].as_str().unwrap().trim(), "sensu check sensu-node");
}

#[test]
fn an_idle_agent_keeps_the_binarys_pages_shared_not_relocated_into_private_memory() {
    // crates/drover/build.rs links drover at a fixed address: a PIE's loader writes every
    // page of `.data.rel.ro` while relocating it, which made 1.9 MiB of each agent private.
    let pie = option_env!("DROVER_PIE").is_some();
    let header = std::fs::read(drover_bin()).unwrap();
    let e_type = u16::from_le_bytes([header[16], header[17]]);
    assert_eq!(e_type, if pie { 3 } else { 2 }, "ELF type (2: fixed-address executable, 3: PIE)");
    if pie {
        // A PIE's relocated pages are private by design; nothing more to pin.
        return;
    }

    let server = Server::start(&[]);
    let agent = server.agent("footprint", "", &[]);
    server.wait_connected("footprint");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", agent.pid())).unwrap();
    let exe = std::fs::canonicalize(drover_bin()).unwrap();
    let (mut in_binary, mut private_kib) = (false, 0u64);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(range), Some(_))
                if range.contains('-') && range.chars().all(|c| c.is_ascii_hexdigit() || c == '-') =>
            {
                // The path is the sixth field: four more after the two already read.
                in_binary = words.nth(3).is_some_and(|p| std::path::Path::new(p) == exe);
            }
            (Some("Anonymous:"), Some(kib)) if in_binary => private_kib += kib.parse::<u64>().unwrap(),
            _ => {}
        }
    }
    // .data, .bss and the few pages the loader must still write (GOT): well under 1 MiB.
    assert!(private_kib < 512, "{private_kib} KiB of the binary's mappings became private");
}
