//! `probe` against real PostgreSQL 15: what a primary, a replica and a dead server report.

use drover_db::probe::{ProbeError, Role, probe};
use drover_db::testing::{PgCluster, PgClusterOptions};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_and_replicas_report_roles_positions_and_the_synchronous_standby() {
    let c = PgCluster::start(PgClusterOptions {
        synchronous_standby_names: Some("FIRST 1 (pg1, pg2)".into()),
        ..Default::default()
    })
    .unwrap();
    c.psql("pg0", "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 1000)").unwrap();

    // pg_stat_replication's positions arrive with the standbys' next status message.
    let deadline = Instant::now() + Duration::from_secs(20);
    let p = loop {
        let p = probe(&c.member("pg0").target(), T).await.unwrap();
        if p.standbys.len() == 2 && p.lag_bytes == Some(0) && p.sync_standbys == ["pg1"] {
            break p;
        }
        assert!(Instant::now() < deadline, "primary never showed both standbys caught up: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(p.role, Role::Primary);
    assert!(!p.in_recovery && p.accepting_writes);
    assert_eq!(p.timeline, Some(1));
    let current = p.current_lsn.expect("a primary reports its current LSN");
    assert!(current > 0);
    assert_eq!(p.synchronous_standby_names, "FIRST 1 (pg1, pg2)");
    let names: Vec<_> = p.standbys.iter().map(|s| (s.name.as_str(), s.sync_state.as_str())).collect();
    assert_eq!(names, [("pg1", "sync"), ("pg2", "potential")]);

    let r = probe(&c.member("pg2").target(), T).await.unwrap();
    assert_eq!(r.role, Role::Replica);
    assert!(r.in_recovery && !r.accepting_writes);
    assert!(r.wal_receiver_streaming);
    assert_eq!(r.upstream, Some(format!("127.0.0.1:{}", c.member("pg0").port)));
    assert_eq!(r.timeline, Some(1));
    assert!(r.received_lsn.unwrap() >= current, "replica received what the primary had written");
    assert!(r.replayed_lsn.unwrap() <= r.received_lsn.unwrap());
    assert_eq!(r.current_lsn, None);

    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<drover_db::probe::DbStatus>(&json).unwrap(), r, "status crosses the wire intact");

    c.kill9("pg0").unwrap();
    let err = probe(&c.member("pg0").target(), T).await.unwrap_err();
    assert!(matches!(err, ProbeError::Connect { .. }), "a dead server is a connect error: {err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = probe(&c.member("pg1").target(), T).await.unwrap();
        if !r.wal_receiver_streaming {
            assert_eq!(r.role, Role::Replica, "losing the primary does not change a replica's role");
            break;
        }
        assert!(Instant::now() < deadline, "replica kept reporting a streaming WAL receiver");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
