//! Database failover end to end: real PostgreSQL 15 (a primary and two synchronous
//! replicas), a drover agent beside each with `[postgres]`, a real server with
//! `[databases.main]`, and a proxy fed by the server whose write endpoint follows
//! `db-primary` (`close_on_leave`), driven by `psql` as an application would be.

mod common;

use common::{Proc, Server, free_port, wait_for};
use drover_db::testing::{PgCluster, PgClusterOptions};
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
"#;

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

fn proxy_config(port: u16) -> String {
    format!(
        "[[listeners]]\nname = \"write\"\nbind = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\nservice = \"primary\"\n\n\
         [services.primary]\nmembers = {{ subscription = \"pg\", port = 5432, checks = [\"db-primary\"], port_label = \"pg_port\" }}\n\
         close_on_leave = true\nretries = 0\n"
    )
}

/// A cluster under drover: PostgreSQL, an agent per member, a server, a fed proxy.
struct Fixture {
    c: PgCluster,
    srv: Server,
    _agents: Vec<Proc>,
    _proxy: Proc,
    write_port: u16,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let c = PgCluster::start(PgClusterOptions {
        synchronous_standby_names: Some("FIRST 1 (pg1, pg2)".into()),
        ..Default::default()
    })
    .expect("a PostgreSQL 15 cluster (scripts/test.sh installs postgresql-15)");
    let srv = Server::start(&[("db.toml", DB_CONFIG)]);
    let ka = ["--keepalive-interval-secs", "1", "--keepalive-warning-secs", "3", "--keepalive-critical-secs", "5"];
    let mut agents = Vec::new();
    for m in c.members() {
        let cfg = srv.dir.path().join(format!("{}.toml", m.name));
        std::fs::write(
            &cfg,
            format!(
                "[postgres]\ncluster = \"main\"\nport = {}\ndata_dir = {:?}\nrun_as = \"postgres\"\nstart_options = {:?}\nlog_file = {:?}\nprobe_interval_ms = 200\n",
                m.port,
                m.data_dir.display().to_string(),
                m.start_options(),
                m.log_file.display().to_string(),
            ),
        )
        .unwrap();
        let label = format!("pg_port={}", m.port);
        let mut extra = vec!["--config", cfg.to_str().unwrap(), "--address", "127.0.0.1", "--label", &label];
        extra.extend(ka);
        agents.push(srv.agent(&m.name, "pg", &extra));
    }
    let write_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let pcfg = dir.path().join("proxy.toml");
    std::fs::write(&pcfg, proxy_config(write_port)).unwrap();
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
    wait_for(Duration::from_secs(30), "pg0 leads and the write endpoint reaches it", || {
        let (_, v) = srv.get("/api/v1/databases/main");
        (v["leader"]["member"] == "pg0" && psql(write_port, "SELECT 1").ok()? == "1").then_some(())
    });
    psql(write_port, "CREATE TABLE t (id bigint PRIMARY KEY)").unwrap();
    Fixture { c, srv, _agents: agents, _proxy: proxy, write_port, _dir: dir }
}

/// An application writing through the endpoint, recording each acknowledged id.
struct Writer {
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(write_port: u16) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::<(u64, Instant)>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acked, stop) = (acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut id = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    if psql(write_port, &format!("INSERT INTO t VALUES ({id})")).is_ok() {
                        acked.lock().unwrap().push((id, Instant::now()));
                    } else {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            })
        };
        Writer { acked, stop, thread: Some(thread) }
    }

    fn acked_since(&self, t: Instant) -> usize {
        self.acked.lock().unwrap().iter().filter(|(_, at)| *at > t).count()
    }

    /// Stops writing; every acknowledged id.
    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.acked.lock().unwrap().iter().map(|(id, _)| *id).collect()
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
    let t = Duration::from_secs(30);
    let writer = Writer::start(*write_port);
    wait_for(t, "writes flowing", || {
        (writer.acked_since(Instant::now() - Duration::from_secs(3600)) >= 20).then_some(())
    });

    let killed = Instant::now();
    c.kill9("pg0").unwrap();
    let resumed = wait_for(Duration::from_secs(60), "writes acknowledged again after the kill", || {
        writer.acked.lock().unwrap().iter().find(|(_, at)| *at > killed).map(|(_, at)| *at)
    });
    let outage = resumed.duration_since(killed);
    wait_for(t, "a few writes on the new primary", || (writer.acked_since(killed) >= 10).then_some(()));
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
fn switchover_moves_the_primary_to_the_named_replica_with_no_lost_write() {
    let Fixture { c, srv, write_port, .. } = &fixture();
    let writer = Writer::start(*write_port);
    let begun = Instant::now();
    wait_for(Duration::from_secs(30), "writes flowing", || (writer.acked_since(begun) >= 20).then_some(()));
    let token = common::ADMIN;
    let url = srv.url();
    let out = Command::new(common::drover_bin())
        .args(["ctl", "--server", &url, "--token", token, "db", "switchover", "main", "--to", "pg2"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("switchover done: pg2"), "{said}");
    let switched = Instant::now();
    wait_for(Duration::from_secs(30), "writes on pg2", || (writer.acked_since(switched) >= 10).then_some(()));
    let acked = writer.finish();
    let (_, v) = srv.get("/api/v1/databases/main");
    assert_eq!(v["leader"]["member"], "pg2", "{v}");
    let lost = lost_writes(c, "pg2", &acked);
    assert!(lost.is_empty(), "a switchover lost acknowledged writes: {lost:?}");
    c.wait_streaming("pg0", "pg2", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("pg0 does not follow pg2: {e}\n{}", c.log_tail("pg0", 20)));
}
