//! The whole failover by hand on real PostgreSQL 15: primary + 2 replicas in sync mode,
//! a write load, `kill -9` of the primary, then what the server and agents will do —
//! observe, `decide`, execute the steps with `ops` — and what must hold afterwards.

use drover_db::decide::{ClusterSpec, Decision, LeaderRecord, MemberSpec, Mode, Observer, Step, decide, reconcile};
use drover_db::ops;
use drover_db::probe::{Role, probe};
use drover_db::testing::{PgCluster, PgClusterOptions, acked_writer};
use std::time::{Duration, Instant};

const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const OP_TIMEOUT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(100);

/// One observation round: every member's agent probes its own server (the killed
/// primary's agent died with it) and the server probes every member directly.
async fn observe(c: &PgCluster, o: &mut Observer, agents_gone: &[&str], now_ms: u64) {
    for m in c.members() {
        let result = probe(&m.target(), PROBE_TIMEOUT).await.map_err(|e| e.to_string());
        o.direct_probe(&m.name, result.clone(), now_ms);
        if agents_gone.contains(&m.name.as_str()) {
            o.agent_gone(&m.name, now_ms);
        } else {
            o.agent_report(&m.name, result, now_ms);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_the_sync_primary_fails_over_without_losing_an_acknowledged_write_and_the_old_primary_rejoins() {
    let c = PgCluster::start(PgClusterOptions {
        synchronous_standby_names: Some("FIRST 1 (pg1, pg2)".into()),
        ..Default::default()
    })
    .unwrap();
    let spec = ClusterSpec {
        name: "orders".into(),
        mode: Mode::Sync,
        max_lag_on_failover_bytes: 1 << 20,
        max_replica_lag_bytes: 1 << 20,
        read_fallback_to_primary: false,
        members: c
            .members()
            .iter()
            .map(|m| MemberSpec { name: m.name.clone(), addr: format!("127.0.0.1:{}", m.port) })
            .collect(),
        dead_grace_ms: 1_000,
        status_max_age_ms: 3_000,
        catch_up_timeout_ms: 10_000,
    };
    // Both names in synchronous_standby_names may acknowledge, so both are recorded.
    let mut leader = LeaderRecord { member: "pg0".into(), term: 1, sync_standbys: vec!["pg1".into(), "pg2".into()] };
    let epoch = Instant::now();
    let now_ms = || epoch.elapsed().as_millis() as u64;
    let mut observer = Observer::new(c.members().iter().map(|m| m.name.as_str()), now_ms());

    c.psql("pg0", "CREATE TABLE t (id bigint primary key, at timestamptz default now())").unwrap();
    observe(&c, &mut observer, &[], now_ms()).await;
    assert_eq!(decide(&spec, observer.observations(), &leader, now_ms()), Decision::Healthy);

    // A writer that records every id whose commit was acknowledged.
    let writer = acked_writer(&c.member("pg0").target(), "t", OP_TIMEOUT).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    observe(&c, &mut observer, &[], now_ms()).await;

    let killed_at = Instant::now();
    c.kill9("pg0").unwrap();
    let acked = writer.await.unwrap();
    assert!(acked.len() > 10, "the load wrote before the kill: {}", acked.len());

    // The server's loop: observe every tick until the decision is a failover.
    let (to, term, steps) = loop {
        observe(&c, &mut observer, &["pg0"], now_ms()).await;
        match decide(&spec, observer.observations(), &leader, now_ms()) {
            Decision::Failover { from, to, term, steps } => {
                assert_eq!(from, "pg0");
                break (to, term, steps);
            }
            Decision::Refuse { reason } => panic!("refused: {reason}"),
            Decision::Healthy => {
                assert!(killed_at.elapsed() < Duration::from_secs(3), "still healthy long after the kill")
            }
            Decision::Wait { .. } => {}
        }
        assert!(killed_at.elapsed() < Duration::from_secs(30), "no failover decision within 30 s");
        tokio::time::sleep(TICK).await;
    };
    let decided_after = killed_at.elapsed();
    assert_eq!(term, 2);
    assert!(to == "pg1" || to == "pg2", "only a recorded synchronous standby is promoted: {to}");
    let other = if to == "pg1" { "pg2" } else { "pg1" };

    // Execute the steps in order, as the server will.
    let mut promoted_after = None;
    for step in &steps {
        match step {
            Step::CompareAndSwapLeader { expected_term, new } => {
                assert_eq!(*expected_term, leader.term, "the swap expects the current term");
                assert!(new.term > leader.term, "terms only increase");
                leader = new.clone();
            }
            // No proxy in this test; the fence that matters here is the agent's (best effort: pg0 is dead).
            Step::FenceProxy { .. } => {}
            Step::FenceAgent { member } => {
                let report = ops::fence(&c.local(member), OP_TIMEOUT).await.unwrap();
                assert_eq!(report.stop, ops::StopOutcome::AlreadyStopped);
            }
            Step::Promote { member, synchronous_standby_names } => {
                ops::promote(&c.member(member).target(), Some(synchronous_standby_names), OP_TIMEOUT).await.unwrap();
                promoted_after = Some(killed_at.elapsed());
            }
            Step::Repoint { member, primary } => {
                ops::repoint(&c.member(member).target(), &c.member(primary).upstream(), member, OP_TIMEOUT)
                    .await
                    .unwrap();
            }
            Step::PublishRoles { primary, replicas } => {
                assert_eq!((primary.as_str(), replicas.as_slice()), (to.as_str(), [other.to_string()].as_slice()));
            }
            Step::RecordEvent { message } => println!("event: {message}"),
            other => panic!("unexpected failover step {other:?}"),
        }
    }
    observer.new_term();

    // First acknowledged write on the new primary (sync: it waits for the repointed standby).
    let new_primary = c.member(&to).target();
    let first_write = loop {
        let attempt = async {
            let client = new_primary.connect(PROBE_TIMEOUT).await.map_err(|e| e.to_string())?;
            client.execute("INSERT INTO t (id) VALUES (-1)", &[]).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(_)) => break killed_at.elapsed(),
            other => assert!(killed_at.elapsed() < Duration::from_secs(60), "no write on {to}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "kill -9 -> decision {:.2} s, promoted {:.2} s, first write on {to} {:.2} s ({} acknowledged writes before the kill)",
        decided_after.as_secs_f64(),
        promoted_after.unwrap().as_secs_f64(),
        first_write.as_secs_f64(),
        acked.len()
    );

    // No acknowledged write is lost.
    let check = new_primary.connect(OP_TIMEOUT).await.unwrap();
    let present: i64 = check.query_one("SELECT count(*) FROM t WHERE id = ANY($1)", &[&acked]).await.unwrap().get(0);
    assert_eq!(present as usize, acked.len(), "every write acknowledged in sync mode survives the failover");

    // The other replica streams from the new primary.
    c.wait_streaming(other, &to, OP_TIMEOUT).unwrap();

    // The old primary rejoins via pg_rewind and streams too.
    let report =
        ops::rejoin_as_replica(&c.local("pg0"), &c.member(&to).target(), &c.member(&to).upstream(), OP_TIMEOUT)
            .await
            .unwrap();
    println!("pg0 rejoined (rewound: {})", report.rewound);
    c.wait_streaming("pg0", &to, OP_TIMEOUT).unwrap();
    let st = probe(&c.member("pg0").target(), PROBE_TIMEOUT).await.unwrap();
    assert_eq!(st.role, Role::Replica);
    assert_eq!(st.timeline, Some(2), "the rejoined member follows the new timeline");
    check.execute("INSERT INTO t (id) VALUES (-2)", &[]).await.unwrap();
    let deadline = Instant::now() + OP_TIMEOUT;
    while c.psql("pg0", "SELECT count(*) FROM t WHERE id = -2").ok().as_deref() != Some("1") {
        assert!(Instant::now() < deadline, "pg0 does not replay the new primary's writes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // With everyone back, the decision logic sees a healthy cluster with nothing to fix.
    let settle = Instant::now() + Duration::from_secs(10);
    loop {
        observe(&c, &mut observer, &[], now_ms()).await;
        let d = decide(&spec, observer.observations(), &leader, now_ms());
        let fixes = reconcile(&spec, observer.observations(), &leader, now_ms());
        if d == Decision::Healthy && fixes.is_empty() {
            break;
        }
        assert!(Instant::now() < settle, "after the rejoin: {d:?}, fixes {fixes:?}");
        tokio::time::sleep(TICK).await;
    }
}
