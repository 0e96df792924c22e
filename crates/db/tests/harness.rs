//! The test harness itself: real PostgreSQL 15 primary + streaming replicas.

use drover_db::testing::{PgCluster, PgClusterOptions};
use std::time::{Duration, Instant};

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cluster_streams_rows_from_primary_to_every_replica_and_kill9_then_start_recovers() {
    let c = PgCluster::start(PgClusterOptions::default()).unwrap();
    assert_eq!(c.members().len(), 3);
    assert_eq!(c.psql("pg0", "SELECT pg_is_in_recovery()").unwrap(), "f");
    for r in ["pg1", "pg2"] {
        assert_eq!(c.psql(r, "SELECT pg_is_in_recovery()").unwrap(), "t", "{r} is a standby");
    }
    let names = c.psql("pg0", "SELECT string_agg(application_name, ',' ORDER BY 1) FROM pg_stat_replication").unwrap();
    assert_eq!(names, "pg1,pg2", "replicas are named by cluster_name");

    c.psql("pg0", "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 100)").unwrap();
    for r in ["pg1", "pg2"] {
        wait_for("rows on replica", Duration::from_secs(20), || {
            c.psql(r, "SELECT count(*) FROM t").ok().as_deref() == Some("100")
        });
    }

    c.kill9("pg0").unwrap();
    assert!(!c.is_running("pg0"));
    assert!(c.psql("pg0", "SELECT 1").is_err(), "a killed primary does not answer");
    c.start_member("pg0").unwrap();
    assert_eq!(c.psql("pg0", "SELECT count(*) FROM t").unwrap(), "100", "crash recovery kept committed rows");
    c.wait_streaming("pg1", "pg0", Duration::from_secs(30)).unwrap();
}

#[test]
fn dropping_the_cluster_kills_every_server_process_and_removes_its_files() {
    let c = PgCluster::start(PgClusterOptions { replicas: 1, ..Default::default() }).unwrap();
    let root = c.root().to_path_buf();
    let pids: Vec<i32> = c
        .members()
        .iter()
        .map(|m| {
            let pidfile = std::fs::read_to_string(m.data_dir.join("postmaster.pid")).unwrap();
            pidfile.lines().next().unwrap().trim().parse().unwrap()
        })
        .collect();
    assert!(pids.iter().all(|p| std::path::Path::new(&format!("/proc/{p}")).exists()));
    drop(c);
    for p in pids {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.contains(") Z "), "postmaster {p} survived the drop: {stat}");
    }
    assert!(!root.exists(), "temp dir {} was left behind", root.display());
}

#[test]
fn dropping_the_cluster_while_a_test_panics_still_cleans_up() {
    let root = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let c = PgCluster::start(PgClusterOptions { replicas: 0, ..Default::default() }).unwrap();
        *root.lock().unwrap() = Some((c.root().to_path_buf(), c.member("pg0").port));
        panic!("test failure inside the cluster's scope");
    });
    assert!(result.is_err());
    let (root, port) = root.lock().unwrap().clone().unwrap();
    assert!(!root.exists(), "temp dir left behind after a panic");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "a server still listens on {port}");
}
