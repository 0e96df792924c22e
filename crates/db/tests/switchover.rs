//! A planned switchover on real PostgreSQL 15, executed step by step as the server will:
//! no acknowledged write is lost and every member ends up streaming from the target.

use drover_db::decide::{ClusterSpec, LeaderRecord, MemberSpec, Mode, Observer, Step, plan_switchover};
use drover_db::ops;
use drover_db::probe::{Role, probe};
use drover_db::testing::{PgCluster, PgClusterOptions, acked_writer};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_load_loses_no_acknowledged_write_and_everyone_follows_the_target() {
    let c = PgCluster::start(PgClusterOptions::default()).unwrap();
    let spec = ClusterSpec {
        name: "orders".into(),
        mode: Mode::Async,
        max_lag_on_failover_bytes: 16 << 20,
        max_replica_lag_bytes: 16 << 20,
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
    let mut leader = LeaderRecord { member: "pg0".into(), term: 1, sync_standbys: vec![] };
    c.psql("pg0", "CREATE TABLE t (id bigint primary key)").unwrap();

    let writer = acked_writer(&c.member("pg0").target(), "t", T).await;
    tokio::time::sleep(Duration::from_millis(800)).await;

    let mut observer = Observer::new(c.members().iter().map(|m| m.name.as_str()), 0);
    for m in c.members() {
        observer.agent_report(&m.name, probe(&m.target(), T).await.map_err(|e| e.to_string()), 1_000);
    }
    let plan = plan_switchover(&spec, observer.observations(), &leader, Some("pg2"), 1_000).unwrap();
    let started = Instant::now();
    for step in &plan.steps {
        match step {
            Step::FenceProxy { .. } | Step::PublishRoles { .. } => {}
            Step::MakeReadOnly { member } => {
                ops::set_read_only(&c.member(member).target(), true, T).await.unwrap();
            }
            Step::WaitCatchUp { member, primary, timeout_ms } => {
                let timeout = Duration::from_millis(*timeout_ms);
                ops::wait_caught_up(&c.member(primary).target(), &c.member(member).target(), timeout).await.unwrap();
            }
            Step::CompareAndSwapLeader { expected_term, new } => {
                assert_eq!(*expected_term, leader.term);
                leader = new.clone();
            }
            Step::FenceAgent { member } => {
                let report = ops::fence(&c.local(member), T).await.unwrap();
                assert_eq!(report.stop, ops::StopOutcome::Fast, "a switchover stops the old primary cleanly");
            }
            Step::Promote { member, synchronous_standby_names } => {
                ops::promote(&c.member(member).target(), Some(synchronous_standby_names), T).await.unwrap();
            }
            Step::Repoint { member, primary } => {
                ops::repoint(&c.member(member).target(), &c.member(primary).upstream(), member, T).await.unwrap();
            }
            Step::Rejoin { member, primary } => {
                let r = ops::rejoin_as_replica(
                    &c.local(member),
                    &c.member(primary).target(),
                    &c.member(primary).upstream(),
                    T,
                )
                .await
                .unwrap();
                println!("old primary rejoined (rewound: {})", r.rewound);
            }
            Step::RecordEvent { message } => println!("event: {message}"),
            other => panic!("unexpected switchover step {other:?}"),
        }
    }
    println!("switchover took {:.2} s", started.elapsed().as_secs_f64());
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty());
    assert_eq!((leader.member.as_str(), leader.term), ("pg2", 2));

    let new_primary = c.member("pg2").target();
    let client = new_primary.connect(T).await.unwrap();
    let present: i64 = client.query_one("SELECT count(*) FROM t WHERE id = ANY($1)", &[&acked]).await.unwrap().get(0);
    assert_eq!(present as usize, acked.len(), "a switchover loses no acknowledged write, even in async mode");
    assert_eq!(probe(&new_primary, T).await.unwrap().role, Role::Primary);
    assert!(probe(&new_primary, T).await.unwrap().accepting_writes);
    for m in ["pg0", "pg1"] {
        c.wait_streaming(m, "pg2", T).unwrap();
    }
}
