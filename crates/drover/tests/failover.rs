//! Database failover end to end: real PostgreSQL 15 (a primary and two synchronous
//! replicas), a drover agent beside each with `[postgres]`, a real server with
//! `[databases.main]`, and a proxy fed by the server whose write endpoint follows
//! `db-primary` (`close_on_leave`), driven by `psql` as an application would be.
//! A fed name server answers the endpoints' names. The partition test puts each member
//! (its PostgreSQL and its agent) on its own test host, a network namespace on a bridge,
//! and cuts the primary's link.

mod common;

use common::{Proc, Server, dig_short, free_port, ip, wait_for};
use drover_db::testing::{MemberHost, PgCluster, PgClusterOptions};
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DB_CONFIG: &str = r#"
[databases.main]
members = ["pg0", "pg1", "pg2"]
mode = "sync"
user = "postgres"
replication_user = "replicator"
dead_grace_ms = 2000
lease_ttl_ms = 500
status_max_age_ms = 2000
read_fallback_to_primary = true
"#;

const DNS_CONFIG: &str = r#"
[[zones]]
origin = "db.test."
soa = { mname = "ns1", rname = "hostmaster" }
records = [{ name = "ns1", type = "A", data = "192.0.2.1" }]

[[pools]]
name = "write.main.db.test."
subscription = "pg"
checks = ["db-primary"]
when_none_healthy = "none"

[[pools]]
name = "read.main.db.test."
subscription = "pg"
checks = ["db-read"]
when_none_healthy = "none"
"#;

fn dig_a(port: u16, name: &str) -> Vec<String> {
    dig_short("127.0.0.1", port, name, "A")
}

/// Test hosts: a bridge on this side (server, proxy, name server and test) and one
/// network namespace per member with a veth on the bridge. Removed on drop, also when
/// the test fails.
struct Hosts {
    id: u32,
    bridge: String,
    netns: Vec<String>,
    links: Vec<String>,
}

impl Hosts {
    fn build(n: usize) -> Hosts {
        // One id per set of hosts, so two tests of this binary never share a bridge, an
        // address range or a namespace (the first dropped would tear down the other's).
        static BUILT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = (std::process::id() + BUILT.fetch_add(1, Ordering::SeqCst)) % 200 + 20;
        let mut h = Hosts { id, bridge: format!("drb{id}"), netns: vec![], links: vec![] };
        ip(&["link", "add", &h.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", h.gateway()), "dev", &h.bridge]);
        ip(&["link", "set", &h.bridge, "up"]);
        for i in 0..n {
            let ns = format!("drover-pg-{}-{id}-{i}", std::process::id());
            ip(&["netns", "add", &ns]);
            h.netns.push(ns.clone());
            let (host_if, ns_if) = (format!("drv{id}h{i}"), format!("drv{id}n{i}"));
            ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &ns_if]);
            h.links.push(host_if.clone());
            ip(&["link", "set", &ns_if, "netns", &ns]);
            ip(&["link", "set", &host_if, "master", &h.bridge]);
            ip(&["link", "set", &host_if, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", h.addr(i)), "dev", &ns_if]);
            ip(&["-n", &ns, "link", "set", &ns_if, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        h
    }

    /// This side's address on the bridge.
    fn gateway(&self) -> String {
        format!("10.160.{}.1", self.id)
    }

    fn addr(&self, i: usize) -> String {
        format!("10.160.{}.{}", self.id, 10 + i)
    }

    /// Host `i` loses its only link: nothing in or out, and no reset for anyone.
    fn cut(&self, i: usize) {
        ip(&["link", "set", &self.links[i], "down"]);
    }

    fn heal(&self, i: usize) {
        ip(&["link", "set", &self.links[i], "up"]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// One statement through the proxy's write endpoint, as a client would send it.
fn psql(port: u16, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
        .arg(format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2"))
        .args(["-c", sql])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn proxy_config(write_port: u16, read_port: u16) -> String {
    let mut out = String::new();
    for (name, port, check) in [("write", write_port, "db-primary"), ("read", read_port, "db-read")] {
        out += &format!(
            "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\nservice = \"{name}\"\n\n\
             [services.{name}]\nmembers = {{ subscription = \"pg\", port = 5432, checks = [\"{check}\"], port_label = \"pg_port\" }}\n\
             close_on_leave = true\nretries = 0\n\n"
        );
    }
    out
}

/// A cluster under drover: PostgreSQL, an agent per member, a server, a fed proxy
/// (write and read endpoints) and a fed name server (their names). Field order is drop
/// order: drover processes before PostgreSQL, test hosts last.
struct Fixture {
    /// pg0's, pg1's, pg2's.
    agents: Vec<Proc>,
    _proxy: Proc,
    _dns: Proc,
    srv: Server,
    c: PgCluster,
    write_port: u16,
    read_port: u16,
    dns_port: u16,
    _dir: tempfile::TempDir,
    /// Held for the fixture's life, released after everything above is gone.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// One cluster at a time: four of them (twelve PostgreSQL servers with their agents
/// and writers) at once starved a 2-core CI machine into timeouts that are not the
/// behaviour under test.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

fn fixture() -> Fixture {
    fixture_on(None)
}

/// With `hosts`, each member and its agent run in their own namespace and the server
/// listens on the bridge; otherwise everything is on loopback.
fn fixture_on(hosts: Option<&Hosts>) -> Fixture {
    // A failed test poisons the lock; the next one may still run.
    let serial = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = PgCluster::start(PgClusterOptions {
        synchronous_standby_names: Some("FIRST 1 (pg1, pg2)".into()),
        hosts: hosts
            .map(|h| (0..3).map(|i| MemberHost { addr: h.addr(i), netns: Some(h.netns[i].clone()) }).collect())
            .unwrap_or_default(),
        ..Default::default()
    })
    .expect("a PostgreSQL 15 cluster (scripts/test.sh installs postgresql-15)");
    let srv = match hosts {
        Some(h) => Server::start_on(&h.gateway(), &[("db.toml", DB_CONFIG)]),
        None => Server::start(&[("db.toml", DB_CONFIG)]),
    };
    let agents = c.members().iter().map(|m| spawn_agent(&srv, m)).collect();
    let (write_port, read_port) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let pcfg = dir.path().join("proxy.toml");
    std::fs::write(&pcfg, proxy_config(write_port, read_port)).unwrap();
    let url = srv.url();
    let state = dir.path().join("members.json");
    let proxy = Proc::spawn(
        &[
            "proxy",
            "--config",
            pcfg.to_str().unwrap(),
            "--server",
            &url,
            "--token",
            common::AGENT,
            "--state-file",
            state.to_str().unwrap(),
        ],
        dir.path().join("proxy.log"),
    );
    let dns_port = free_port();
    let dcfg = dir.path().join("dns.toml");
    std::fs::write(&dcfg, DNS_CONFIG).unwrap();
    let dns_state = dir.path().join("dns-members.json");
    let dns_listen = format!("127.0.0.1:{dns_port}");
    let dns = Proc::spawn(
        &[
            "dns",
            "--config",
            dcfg.to_str().unwrap(),
            "--listen",
            &dns_listen,
            "--server",
            &url,
            "--token",
            common::AGENT,
            "--state-file",
            dns_state.to_str().unwrap(),
        ],
        dir.path().join("dns.log"),
    );
    wait_for(Duration::from_secs(30), "pg0 leads and the write endpoint reaches it", || {
        let (_, v) = srv.get("/api/v1/databases/main");
        (v["leader"]["member"] == "pg0" && psql(write_port, "SELECT 1").ok()? == "1").then_some(())
    });
    psql(write_port, "CREATE TABLE t (id bigint PRIMARY KEY)").unwrap();
    Fixture { agents, _proxy: proxy, _dns: dns, srv, c, write_port, read_port, dns_port, _dir: dir, _serial: serial }
}

/// The agent beside member `m` (in its namespace when it has one), with `[postgres]`
/// for it; its state file is the default one, beside the member's data dir.
fn spawn_agent(srv: &Server, m: &drover_db::testing::PgMember) -> Proc {
    let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "3", "--keepalive-critical-secs", "5"];
    let cfg = srv.dir.path().join(format!("{}.toml", m.name));
    std::fs::write(
        &cfg,
        format!(
            "[postgres]\ncluster = \"main\"\nhost = {:?}\nport = {}\ndata_dir = {:?}\nrun_as = \"postgres\"\nstart_options = {:?}\nlog_file = {:?}\nprobe_interval_ms = 200\n",
            m.host,
            m.port,
            m.data_dir.display().to_string(),
            m.start_options(),
            m.log_file.display().to_string(),
        ),
    )
    .unwrap();
    let label = format!("pg_port={}", m.port);
    let mut extra = vec!["--config", cfg.to_str().unwrap(), "--address", &m.host, "--label", &label];
    extra.extend(ka);
    match &m.netns {
        None => srv.agent(&m.name, "pg", &extra),
        Some(ns) => {
            let ws = srv.ws_url();
            let mut args = vec!["agent", "--server", &ws, "--name", &m.name, "--token", common::AGENT];
            args.extend(["--api-listen", "", "--subscriptions", "pg"]);
            args.extend(&extra);
            Proc::spawn_in_netns(ns, &args, srv.dir.path().join(format!("agent-{}.log", m.name)))
        }
    }
}

/// An application writing through the endpoint, recording each acknowledged id.
struct Writer {
    /// (id, when its INSERT was sent, when it was acknowledged).
    acked: Arc<Mutex<Vec<(u64, Instant, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Writer {
    fn start(write_port: u16) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::<(u64, Instant, Instant)>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut id = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    let sent = Instant::now();
                    if psql(write_port, &format!("INSERT INTO t VALUES ({id})")).is_ok() {
                        acked.lock().unwrap().push((id, sent, Instant::now()));
                    } else {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        };
        Writer { acked, stop, thread: Some(thread), started: Instant::now() }
    }

    fn acked_since(&self, t: Instant) -> usize {
        self.acked.lock().unwrap().iter().filter(|(_, _, at)| *at > t).count()
    }

    /// Waits (30 s at most) until `n` writes were acknowledged after `t`.
    fn wait_acked_since(&self, t: Instant, n: usize, what: &str) {
        wait_for(Duration::from_secs(30), what, || (self.acked_since(t) >= n).then_some(()));
    }

    /// Waits (60 s at most) for the first acknowledged write sent after `t`; when it was acknowledged.
    fn wait_resumed_after(&self, t: Instant, what: &str) -> Instant {
        wait_for(Duration::from_secs(60), what, || self.first_ack_of_a_write_sent_after(t))
    }

    /// When the first write sent after `t` was acknowledged (one sent before `t` may be
    /// acknowledged just after it, by the server that was about to fail).
    fn first_ack_of_a_write_sent_after(&self, t: Instant) -> Option<Instant> {
        self.acked.lock().unwrap().iter().find(|(_, sent, _)| *sent > t).map(|(_, _, at)| *at)
    }

    /// Stops writing; every acknowledged id.
    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.acked.lock().unwrap().iter().map(|(id, _, _)| *id).collect()
    }
}

impl Drop for Writer {
    // A failed test must not leave the thread writing for the rest of the binary's tests.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Sets the flag when dropped, also while a panic unwinds, so a scoped thread that
/// watches it ends and the scope can report the panic instead of waiting forever.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn lost_writes(c: &PgCluster, member: &str, acked: &[u64]) -> Vec<u64> {
    let stored: BTreeSet<u64> =
        c.psql(member, "SELECT id FROM t").unwrap().lines().filter_map(|l| l.trim().parse().ok()).collect();
    acked.iter().copied().filter(|id| !stored.contains(id)).collect()
}

#[test]
fn kill9_of_the_primary_moves_writes_to_a_replica_loses_no_acknowledged_write_and_the_old_primary_rejoins() {
    let Fixture { c, srv, write_port, .. } = &fixture();
    let writer = Writer::start(*write_port);
    writer.wait_acked_since(writer.started, 20, "writes flowing");

    let killed = Instant::now();
    c.kill9("pg0").unwrap();
    let resumed = writer.wait_resumed_after(killed, "writes acknowledged again after the kill");
    let outage = resumed.duration_since(killed);
    writer.wait_acked_since(killed, 10, "a few writes on the new primary");
    let acked = writer.finish();
    eprintln!("kill -9 of the primary -> writes acknowledged again through the proxy after {outage:?}");

    let (_, v) = srv.get("/api/v1/databases/main");
    let new = v["leader"]["member"].as_str().unwrap().to_string();
    assert!(new == "pg1" || new == "pg2", "a replica leads now: {v}");
    assert!(v["leader"]["term"].as_u64().unwrap() >= 2, "{v}");
    // Sync mode: every acknowledged write is on the new primary.
    let lost = lost_writes(c, &new, &acked);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

    // The other replica follows the new primary.
    let other = if new == "pg1" { "pg2" } else { "pg1" };
    c.wait_streaming(other, &new, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{other} does not stream from {new}: {e}\n{}", c.log_tail(other, 20)));

    // The old primary, down with its agent still up, is brought back only as a replica
    // of the new one (pg_rewind), never writable through drover.
    c.wait_streaming("pg0", &new, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("pg0 did not rejoin as a replica of {new}: {e}\n{}", c.log_tail("pg0", 30)));
    assert_eq!(c.psql("pg0", "SELECT pg_is_in_recovery()").unwrap().trim(), "t");
    let (_, v) = srv.get("/api/v1/events/pg0/db-primary");
    assert_eq!(v["status"], 2, "pg0 is not the write endpoint's member: {v}");
}

#[test]
fn switchover_moves_the_primary_to_the_named_replica_with_no_lost_write_and_reads_fall_back_to_it_alone() {
    let Fixture { c, srv, write_port, read_port, .. } = &fixture();
    let writer = Writer::start(*write_port);
    let begun = Instant::now();
    writer.wait_acked_since(begun, 20, "writes flowing");
    let token = common::ADMIN;
    let url = srv.url();
    let out = Command::new(common::drover_bin())
        .args(["ctl", "--server", &url, "--token", token, "db", "switchover", "main", "--to", "pg2"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("switchover done: pg2"), "{said}");
    let switched = Instant::now();
    writer.wait_acked_since(switched, 10, "writes on pg2");
    let acked = writer.finish();
    let (_, v) = srv.get("/api/v1/databases/main");
    assert_eq!(v["leader"]["member"], "pg2", "{v}");
    let lost = lost_writes(c, "pg2", &acked);
    assert!(lost.is_empty(), "a switchover lost acknowledged writes: {lost:?}");
    c.wait_streaming("pg0", "pg2", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("pg0 does not follow pg2: {e}\n{}", c.log_tail("pg0", 20)));

    // The read endpoint (`db-read`, read_fallback_to_primary = true): on a replica while
    // one is in rotation, on the primary while none is, on a replica again once the
    // server has rejoined one.
    let in_recovery = || psql(*read_port, "SELECT pg_is_in_recovery()").ok();
    wait_for(Duration::from_secs(30), "reads on a replica", || (in_recovery()? == "t").then_some(()));
    for r in ["pg0", "pg1"] {
        c.kill9(r).unwrap();
    }
    wait_for(Duration::from_secs(30), "reads fall back to the primary", || (in_recovery()? == "f").then_some(()));
    wait_for(Duration::from_secs(120), "reads back on a rejoined replica", || (in_recovery()? == "t").then_some(()));
}

#[test]
fn a_frozen_primary_is_replaced_within_seconds_and_never_writable_again_when_it_wakes() {
    let f = fixture();
    let (c, srv) = (&f.c, &f.srv);
    let t = Duration::from_secs(30);
    wait_for(t, "replication timeouts set by the agents", || {
        let sql = "SELECT setting FROM pg_settings WHERE name = 'wal_receiver_timeout'";
        c.members().iter().all(|m| c.psql(&m.name, sql).is_ok_and(|v| v == "4000")).then_some(())
    });
    let writer = Writer::start(f.write_port);
    writer.wait_acked_since(writer.started, 20, "writes flowing");

    // pg0 hangs (its agent does not): connections to it stay open and go silent.
    let frozen = Instant::now();
    c.freeze("pg0").unwrap();
    let resumed = writer.wait_resumed_after(frozen, "writes acknowledged again after the freeze");
    eprintln!("frozen primary -> writes acknowledged again through the proxy after {:?}", resumed - frozen);
    // The replicas' WAL receivers give up after replication_timeout_ms (4 s), then
    // dead_grace_ms (2 s) holds: well under PostgreSQL's own 60 s receiver timeout.
    assert!(resumed - frozen < Duration::from_secs(20), "took {:?}", resumed - frozen);
    let (_, v) = srv.get("/api/v1/databases/main");
    let new = v["leader"]["member"].as_str().unwrap().to_string();
    assert!(new == "pg1" || new == "pg2", "a replica leads now: {v}");
    writer.wait_acked_since(resumed, 10, "a few writes on the new primary");

    // It wakes up: whatever it was doing, it never takes writes again as a primary.
    c.thaw("pg0").unwrap();
    let woke = Instant::now();
    while woke.elapsed() < Duration::from_secs(10) {
        let w = writable_members(c);
        assert_eq!(w, std::slice::from_ref(&new), "only the new primary accepts writes after pg0 wakes");
        std::thread::sleep(Duration::from_millis(100));
    }
    let acked = writer.finish();
    let lost = lost_writes(c, &new, &acked);
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    c.wait_streaming("pg0", &new, Duration::from_secs(90))
        .unwrap_or_else(|e| panic!("pg0 did not rejoin as a replica of {new}: {e}\n{}", c.log_tail("pg0", 30)));
}

/// Which members accept writes right now, asked over each server's unix socket (which no
/// partition cuts), so this is the truth, not what any endpoint shows. A server that does
/// not answer accepts nothing.
fn writable_members(c: &PgCluster) -> Vec<String> {
    let sql = "SELECT NOT pg_is_in_recovery() AND current_setting('default_transaction_read_only') = 'off'";
    c.members().iter().filter(|m| c.psql(&m.name, sql).is_ok_and(|v| v == "t")).map(|m| m.name.clone()).collect()
}

#[test]
fn a_partitioned_primary_fences_itself_its_clients_are_cut_off_and_there_are_never_two_writable_primaries() {
    let hosts = Hosts::build(3);
    let f = fixture_on(Some(&hosts));
    let (c, srv) = (&f.c, &f.srv);
    let t = Duration::from_secs(30);
    let name_of = |addr: &str| (0..3).find(|&i| hosts.addr(i) == addr).map(|i| format!("pg{i}"));

    // Before: the names and endpoints point where they should.
    wait_for(t, "write.main.db.test names pg0", || {
        (dig_a(f.dns_port, "write.main.db.test") == [hosts.addr(0)]).then_some(())
    });
    wait_for(t, "read.main.db.test names both replicas", || {
        (dig_a(f.dns_port, "read.main.db.test") == [hosts.addr(1), hosts.addr(2)]).then_some(())
    });
    assert_eq!(psql(f.read_port, "SELECT pg_is_in_recovery()").unwrap(), "t", "the read endpoint reaches a replica");
    wait_for(t, "replication timeouts set by the agents", || {
        let sql = "SELECT setting FROM pg_settings WHERE name = 'wal_receiver_timeout'";
        c.members().iter().all(|m| c.psql(&m.name, sql).is_ok_and(|v| v == "4000")).then_some(())
    });

    // A client session held open through the write endpoint, on pg0.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let held = drover_db::probe::PgTarget::new("127.0.0.1", f.write_port, "postgres");
    let held = rt.block_on(held.connect(Duration::from_secs(5))).expect("a session through the write endpoint");
    let who = rt.block_on(held.simple_query("SELECT current_setting('cluster_name')")).unwrap();
    assert!(format!("{who:?}").contains("pg0"), "{who:?}");

    let writer = Writer::start(f.write_port);
    writer.wait_acked_since(writer.started, 20, "writes flowing");

    // Watch every server's own answer for the rest of the test.
    let stop = AtomicBool::new(false);
    let (watch, outage) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut worst: Vec<String> = vec![];
            let mut samples = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let w = writable_members(c);
                if w.len() > worst.len() {
                    worst = w;
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (worst, samples)
        });

        let _stop_watcher = SetOnDrop(&stop);
        let cut = Instant::now();
        hosts.cut(0);

        // pg0, alone, loses its lease and fences itself well before anyone is promoted.
        wait_for(Duration::from_secs(15), "pg0 stops accepting writes", || {
            (!writable_members(c).contains(&"pg0".to_string())).then_some(())
        });
        let fenced = cut.elapsed();
        let resumed = writer.wait_resumed_after(cut, "writes acknowledged again through the endpoint");
        eprintln!(
            "partition of the primary: pg0 fenced itself after {fenced:?}, writes back after {:?}",
            resumed - cut
        );
        let (_, v) = srv.get("/api/v1/databases/main");
        let new = v["leader"]["member"].as_str().unwrap().to_string();
        assert!(new == "pg1" || new == "pg2", "a replica leads now: {v}");
        let new_addr = c.member(&new).host.clone();

        // The held session was on pg0: the proxy cut it (an error, not a hang, and never
        // an answer from the cut-off primary).
        let r =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), held.simple_query("SELECT 1")).await });
        assert!(matches!(r, Ok(Err(_))), "the held session was not closed: {r:?}");

        // The names moved: the write name to the new primary, the read name to the replica left.
        wait_for(t, "write.main.db.test names the new primary", || {
            (dig_a(f.dns_port, "write.main.db.test") == [new_addr.clone()]).then_some(())
        });
        let other = if new == "pg1" { "pg2" } else { "pg1" };
        wait_for(t, "read.main.db.test names the other replica", || {
            let a = dig_a(f.dns_port, "read.main.db.test");
            (a.len() == 1 && name_of(&a[0]).as_deref() == Some(other)).then_some(())
        });

        writer.wait_acked_since(resumed, 10, "a few writes on the new primary");
        let acked = writer.finish();
        let lost = lost_writes(c, &new, &acked);
        assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");

        // The partition heals: pg0 comes back only as a replica of the new primary.
        hosts.heal(0);
        c.wait_streaming("pg0", &new, Duration::from_secs(90))
            .unwrap_or_else(|e| panic!("pg0 did not rejoin as a replica of {new}: {e}\n{}", c.log_tail("pg0", 30)));
        stop.store(true, Ordering::SeqCst);
        (watcher.join().unwrap(), resumed - cut)
    });
    let (worst, samples) = watch;
    assert!(samples > 20, "the watcher sampled only {samples} times");
    assert!(worst.len() <= 1, "two writable primaries at once: {worst:?} (outage {outage:?})");
    assert_eq!(c.psql("pg0", "SELECT pg_is_in_recovery()").unwrap(), "t");
}

#[test]
fn an_agent_restarted_beside_a_partitioned_primary_fences_it_from_the_lease_it_saved() {
    let hosts = Hosts::build(3);
    let mut f = fixture_on(Some(&hosts));
    let c = &f.c;
    let pg0 = c.member("pg0").clone();
    let saved = {
        let mut name = pg0.data_dir.clone().into_os_string();
        name.push(".drover-agent.json");
        std::path::PathBuf::from(name)
    };
    wait_for(Duration::from_secs(30), "pg0's agent saved a lease", || {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).ok()?).ok()?;
        v["lease"]["term"].as_u64()
    });

    // The agent dies holding its lease (no fence yet), the link goes, and the agent comes
    // back on the cut-off host: no server to lease it anything, only what it saved.
    f.agents[0].child.kill().unwrap();
    f.agents[0].child.wait().unwrap();
    let cut = Instant::now();
    hosts.cut(0);
    assert!(writable_members(c).contains(&"pg0".to_string()), "pg0 was still writable when its agent died");
    f.agents[0] = spawn_agent(&f.srv, &pg0);

    // Without the saved lease the new agent would wait for a first lease that cannot
    // come, and pg0 would take writes beside the replica the server promotes.
    wait_for(Duration::from_secs(15), "pg0 stops accepting writes", || {
        (!writable_members(c).contains(&"pg0".to_string())).then_some(())
    });
    eprintln!("restarted agent on a partitioned primary: pg0 fenced {:?} after the cut", cut.elapsed());
    let log = f.agents[0].log_text();
    assert!(log.contains("self-demotion armed from the saved state"), "{log}");

    // The server promotes a replica; pg0 stays fenced beside it.
    wait_for(Duration::from_secs(30), "a replica leads", || {
        let (_, v) = f.srv.get("/api/v1/databases/main");
        let leader = v["leader"]["member"].as_str()?.to_string();
        (leader == "pg1" || leader == "pg2").then_some(())
    });
    let writable = writable_members(c);
    assert!(writable.len() == 1 && writable[0] != "pg0", "writable: {writable:?}");
}

#[test]
fn restarting_the_primarys_agent_within_its_lease_leaves_the_primary_writable() {
    let mut f = fixture();
    let c = &f.c;
    let pg0 = c.member("pg0").clone();
    let log = f.agents[0].log.clone();
    wait_for(Duration::from_secs(30), "pg0's agent holds a lease", || {
        std::fs::read_to_string(&log).ok()?.contains("first lease received").then_some(())
    });
    let writer = Writer::start(f.write_port);
    writer.wait_acked_since(writer.started, 10, "writes flowing");

    f.agents[0].child.kill().unwrap();
    f.agents[0].child.wait().unwrap();
    let restarted = Instant::now();
    f.agents[0] = spawn_agent(&f.srv, &pg0);
    f.srv.wait_connected("pg0");
    eprintln!("pg0's agent back and connected {:?} after the kill", restarted.elapsed());

    // Well past the lease (0.5 s) and the server's grace (2 s): pg0 was never fenced.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(writable_members(c), ["pg0"]);
    let (_, v) = f.srv.get("/api/v1/databases/main");
    assert_eq!(v["leader"]["member"], "pg0", "{v}");
    let text = f.agents[0].log_text();
    assert!(!text.contains("fenced"), "{text}");
    // Armed from its state file, not merely left unarmed until a lease came.
    assert!(text.contains("self-demotion armed from the saved state"), "{text}");
    writer.wait_acked_since(restarted + Duration::from_secs(4), 5, "writes still flowing to pg0");
    let acked = writer.finish();
    assert!(lost_writes(c, "pg0", &acked).is_empty());
}
