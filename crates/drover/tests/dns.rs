//! `drover dns` as a real process: fed by a real server and agents over the watch stream,
//! queried with `dig`; and two name servers in two network namespaces answering alike.

mod common;

use common::{Proc, Server, dig_short, free_port, ip, wait_for};
use std::process::Command;
use std::time::{Duration, Instant};

const DNS_CONFIG: &str = r#"
[[zones]]
origin = "example.test."
soa = { mname = "ns1", rname = "hostmaster" }
records = [{ name = "ns1", type = "A", data = "192.0.2.1" }]

[[pools]]
name = "web.example.test."
subscription = "web"
when_none_healthy = "none"
"#;

fn dns_proc(dir: &std::path::Path, extra: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let cfg = dir.join("dns.toml");
    std::fs::write(&cfg, DNS_CONFIG).unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["dns", "--config", cfg.to_str().unwrap(), "--listen", &listen];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args, dir.join(format!("dns-{port}.log")));
    wait_for(Duration::from_secs(10), "drover dns answering", || {
        (!dig_short("127.0.0.1", port, "ns1.example.test", "A").is_empty()).then_some(())
    });
    (p, port)
}

#[test]
fn dead_members_address_leaves_the_answer_and_the_last_view_survives_the_server() {
    let mut server = Server::start(&[]);
    let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "2", "--keepalive-critical-secs", "3"];
    let mut a1 = server.agent("web1", "web", &[&ka[..], &["--address", "10.0.0.1"]].concat());
    let _a2 = server.agent("web2", "web", &[&ka[..], &["--address", "10.0.0.2"]].concat());
    server.wait_connected("web1");
    server.wait_connected("web2");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("members.json");
    let ws = server.ws_url();
    let feed = ["--server", &ws, "--token", common::AGENT, "--state-file", state.to_str().unwrap()];
    let (mut dns, port) = dns_proc(dir.path(), &feed);
    let answer = || dig_short("127.0.0.1", port, "web.example.test", "A");
    wait_for(Duration::from_secs(10), "both members in the answer", || {
        (answer() == ["10.0.0.1", "10.0.0.2"]).then_some(())
    });

    // The agent dies: once its keepalive goes critical its address leaves the answer.
    a1.kill9();
    let killed = Instant::now();
    wait_for(Duration::from_secs(15), "web1 to leave the answer", || (answer() == ["10.0.0.2"]).then_some(()));
    eprintln!(
        "agent killed -> answer changed in {:?} (keepalive warning, which already fails health, after 2 s)",
        killed.elapsed()
    );

    // Static stability: the control plane goes away; the last known view keeps answering,
    // and a restarted name server answers the same from its state file.
    server.stop(true);
    assert_eq!(answer(), ["10.0.0.2"]);
    dns.term();
    let (_dns, port2) = dns_proc(dir.path(), &feed);
    wait_for(Duration::from_secs(5), "answer from disk", || {
        (dig_short("127.0.0.1", port2, "web.example.test", "A") == ["10.0.0.2"]).then_some(())
    });
}

/// The SOA serial of `example.test` that `drover dns` at `addr:port` answers.
fn soa_serial_at(addr: &str, port: u16) -> u32 {
    let soa = dig_short(addr, port, "example.test", "SOA");
    soa.first().and_then(|l| l.split(' ').nth(2)).and_then(|s| s.parse().ok()).expect("a SOA serial")
}

/// The same, of a name server on loopback.
fn soa_serial(port: u16) -> u32 {
    soa_serial_at("127.0.0.1", port)
}

#[test]
fn a_member_removed_while_it_held_the_newest_change_leaves_fed_name_servers_on_one_serial() {
    let mut server = Server::start(&[]);
    let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "3", "--keepalive-critical-secs", "5"];
    let _w1 = server.agent("w1", "web", &[&ka[..], &["--address", "10.0.0.1"]].concat());
    let dir = tempfile::tempdir().unwrap();
    let ws = server.ws_url();
    let feed = ["--server", &ws, "--token", common::AGENT];
    // The first keeps its view on disk.
    let state = dir.path().join("first.members.json");
    let first_feed = [&feed[..], &["--state-file", state.to_str().unwrap()]].concat();
    let (mut first, port1) = dns_proc(dir.path(), &first_feed);
    let answer = |port| dig_short("127.0.0.1", port, "web.example.test", "A");
    wait_for(Duration::from_secs(15), "w1 answered", || (answer(port1) == ["10.0.0.1"]).then_some(()));
    // w2 comes after w1 has settled, so the newest change any member records is w2's.
    let mut w2 = server.agent("w2", "web", &[&ka[..], &["--address", "10.0.0.2"]].concat());
    wait_for(Duration::from_secs(15), "w2 answered too", || (answer(port1) == ["10.0.0.1", "10.0.0.2"]).then_some(()));
    let with_w2 = soa_serial(port1);

    // w2 is deregistered: the view's newest member change is now w1's, older than the
    // serial already out. The first name server saw the removal happen; a second one,
    // started after it, sees only the view that is left. RFC 1982 serials must agree.
    w2.kill9();
    let (status, body) = server.request("DELETE", "/api/v1/entities/w2", None, Some(common::ADMIN));
    assert!(status < 300, "{status} {body}");
    wait_for(Duration::from_secs(15), "w2 gone from the answer", || (answer(port1) == ["10.0.0.1"]).then_some(()));
    let after = soa_serial(port1);
    assert!(drover_dns::serial::serial_gt(after, with_w2), "the serial moved on with the content: {after} {with_w2}");
    let (_second, port2) = dns_proc(dir.path(), &feed);
    wait_for(Duration::from_secs(15), "the second name server fed", || (answer(port2) == ["10.0.0.1"]).then_some(()));
    assert_eq!(soa_serial(port2), after, "a name server that never saw w2 stamps the same serial");

    // The control plane goes away and the first name server restarts from its state
    // file, saved after the removal: w2 stays gone and the serial stays where it was.
    server.stop(true);
    first.term();
    let (_restarted, port3) = dns_proc(dir.path(), &first_feed);
    wait_for(Duration::from_secs(5), "the answer from disk", || (answer(port3) == ["10.0.0.1"]).then_some(()));
    assert_eq!(soa_serial(port3), after, "a restart from disk after a removal keeps the serial");
}

/// Two network namespaces, each joined to this one by a veth pair; removed on drop, even
/// when the test fails.
struct Netns {
    names: Vec<String>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn two_fed_name_servers_in_two_network_namespaces_answer_alike_serial_included() {
    let id = std::process::id() % 200 + 20;
    let mut ns = Netns { names: vec![] };
    let mut addrs = vec![];
    for (i, side) in ["a", "b"].iter().enumerate() {
        let name = format!("drover-dns-{}-{side}", std::process::id());
        ip(&["netns", "add", &name]);
        ns.names.push(name.clone());
        let host_if = format!("dd{id}{side}h");
        let ns_if = format!("dd{id}{side}n");
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        let net = format!("10.{}.{}", 150 + i, id);
        ip(&["addr", "add", &format!("{net}.1/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &name, "addr", "add", &format!("{net}.2/30"), "dev", &ns_if]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        addrs.push((name, format!("{net}.2")));
    }
    // The control plane listens on namespace a's host-side address; b reaches it
    // through its own link to this host.
    let server_ip = format!("10.150.{id}.1");
    ip(&["-n", &addrs[1].0, "route", "add", &format!("10.150.{id}.0/30"), "via", &format!("10.151.{id}.1")]);
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(&server_ip, &[]);
    let ws = server.ws_url();
    let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "2", "--keepalive-critical-secs", "3"];
    let agent = |name: &str, address: &str| {
        let mut args = vec!["agent", "--server", &ws, "--token", common::AGENT, "--name", name];
        args.extend(["--subscriptions", "web", "--address", address, "--api-listen", ""]);
        args.extend(ka);
        Proc::spawn(&args, dir.path().join(format!("agent-{name}.log")))
    };
    let mut workers = vec![];
    let cfg = dir.path().join("dns.toml");
    std::fs::write(&cfg, DNS_CONFIG).unwrap();
    let mut procs = vec![];
    for (name, addr) in &addrs {
        let listen = format!("{addr}:53");
        let state = dir.path().join(format!("{name}.members.json"));
        let args = [
            "dns",
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            &listen,
            "--server",
            &ws,
            "--token",
            common::AGENT,
            "--state-file",
            state.to_str().unwrap(),
        ];
        procs.push(Proc::spawn_in_netns(name, &args, dir.path().join(format!("{name}.log"))));
        // Started seconds apart, so serials from their own clocks could not agree; and
        // the first before any member exists, so it stamps a serial of its own on an
        // empty view before the members come (the path that once made the two disagree).
        std::thread::sleep(Duration::from_millis(2100));
        if workers.is_empty() {
            workers.push(agent("w1", "10.0.0.1"));
            workers.push(agent("w2", "10.0.0.2"));
        }
    }
    let t = Duration::from_secs(20);
    for (_, addr) in &addrs {
        wait_for(t, "both members answered in each namespace", || {
            (dig_short(addr, 53, "web.example.test", "A") == ["10.0.0.1", "10.0.0.2"]).then_some(())
        });
    }
    let queries = [
        ("ns1.example.test", "A"),
        ("web.example.test", "A"),
        ("example.test", "NS"),
        ("nope.example.test", "A"),
        // The serial too: both stamp it from the control plane's clock, not their own.
        ("example.test", "SOA"),
    ];
    for (q, t) in queries {
        assert_eq!(dig_short(&addrs[0].1, 53, q, t), dig_short(&addrs[1].1, 53, q, t), "{q} {t}");
    }
    let serial = |a: &str| soa_serial_at(a, 53);
    let before = serial(&addrs[0].1);

    // A member dies: both answers change, and both serials move to the same new value.
    workers[1].kill9();
    for (_, addr) in &addrs {
        wait_for(t, "w2 gone from each answer", || {
            (dig_short(addr, 53, "web.example.test", "A") == ["10.0.0.1"]).then_some(())
        });
    }
    for (q, t) in queries {
        assert_eq!(dig_short(&addrs[0].1, 53, q, t), dig_short(&addrs[1].1, 53, q, t), "after the change: {q} {t}");
    }
    assert!(drover_dns::serial::serial_gt(serial(&addrs[0].1), before), "the serial moved with the content");
    drop(procs);
}
