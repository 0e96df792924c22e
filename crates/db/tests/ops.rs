//! `ops` against real PostgreSQL 15: promote, read-only, fence, repoint, rejoin via pg_rewind.

use drover_db::ops::{
    self, OpErrorKind, StopOutcome, fence, promote, rejoin_as_replica, repoint, set_read_only,
    set_synchronous_standby_names, synchronous_standby_names_value,
};
use drover_db::probe::{PgTarget, Role, probe};
use drover_db::testing::{PgCluster, PgClusterOptions};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

async fn wait_rows(c: &PgCluster, member: &str, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = c.psql(member, sql);
        if got.as_deref().ok() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{member}: `{sql}` gave {got:?}, want {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_repoint_and_rejoin_turn_a_split_brain_back_into_one_primary() {
    let c = PgCluster::start(PgClusterOptions::default()).unwrap();
    c.psql("pg0", "CREATE TABLE t (id int primary key); INSERT INTO t SELECT generate_series(1, 100)").unwrap();
    for r in ["pg1", "pg2"] {
        wait_rows(&c, r, "SELECT count(*) FROM t", "100").await;
    }

    // A fence left on a replica must not survive its promotion.
    set_read_only(&c.member("pg1").target(), true, T).await.unwrap();
    promote(&c.member("pg1").target(), Some(""), T).await.unwrap();
    let st = probe(&c.member("pg1").target(), T).await.unwrap();
    assert_eq!(st.role, Role::Primary);
    assert!(st.accepting_writes, "promotion clears default_transaction_read_only");
    assert_eq!(st.timeline, Some(2));
    promote(&c.member("pg1").target(), None, T).await.expect("promoting a primary again succeeds");

    repoint(&c.member("pg2").target(), &c.member("pg1").upstream(), "pg2", T).await.unwrap();
    c.wait_streaming("pg2", "pg1", T).unwrap();
    c.psql("pg1", "INSERT INTO t SELECT generate_series(1000, 1009)").unwrap();
    wait_rows(&c, "pg2", "SELECT count(*) FROM t", "110").await;

    let err = repoint(&c.member("pg1").target(), &c.member("pg0").upstream(), "pg1", T).await.unwrap_err();
    assert!(matches!(err.kind, OpErrorKind::WrongState(_)) && !err.retryable(), "a primary is never repointed: {err}");

    set_synchronous_standby_names(&c.member("pg1").target(), &synchronous_standby_names_value(1, &["pg2".into()]), T)
        .await
        .unwrap();
    let deadline = Instant::now() + T;
    while probe(&c.member("pg1").target(), T).await.unwrap().sync_standbys != ["pg2"] {
        assert!(Instant::now() < deadline, "pg2 never became the synchronous standby");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The old primary diverges (writes nobody else has), then dies.
    c.psql("pg0", "INSERT INTO t VALUES (5000)").unwrap();
    c.kill9("pg0").unwrap();
    let report =
        rejoin_as_replica(&c.local("pg0"), &c.member("pg1").target(), &c.member("pg1").upstream(), T).await.unwrap();
    assert!(report.rewound, "diverged history needs a rewind: {}", report.rewind_output);
    assert_eq!(report.stopped, StopOutcome::AlreadyStopped);
    c.wait_streaming("pg0", "pg1", T).unwrap();
    let st = probe(&c.member("pg0").target(), T).await.unwrap();
    assert_eq!(st.role, Role::Replica);
    assert_eq!(c.psql("pg0", "SELECT count(*) FROM t WHERE id = 5000").unwrap(), "0", "the diverged write is gone");
    wait_rows(&c, "pg0", "SELECT count(*) FROM t", "110").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_then_fence_stop_writes_and_cut_open_sessions() {
    let c = PgCluster::start(PgClusterOptions { replicas: 0, ..Default::default() }).unwrap();
    let target = c.member("pg0").target();
    c.psql("pg0", "CREATE TABLE t (id int)").unwrap();

    set_read_only(&target, true, T).await.unwrap();
    let err = c.psql("pg0", "INSERT INTO t VALUES (1)").unwrap_err();
    assert!(err.detail.contains("read-only transaction"), "{err}");
    assert!(!probe(&target, T).await.unwrap().accepting_writes);
    set_read_only(&target, false, T).await.unwrap();
    c.psql("pg0", "INSERT INTO t VALUES (1)").unwrap();

    let session = target.connect(T).await.unwrap();
    session.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    let report = fence(&c.local("pg0"), T).await.unwrap();
    assert!(report.made_read_only);
    assert!(report.sessions_terminated >= 1, "{report:?}");
    assert_eq!(report.stop, StopOutcome::Fast);
    assert!(
        session.batch_execute("INSERT INTO t VALUES (3)").await.is_err(),
        "an open session cannot write after a fence"
    );
    assert!(!c.is_running("pg0"));

    let again = fence(&c.local("pg0"), T).await.unwrap();
    assert_eq!(
        again,
        ops::FenceReport { made_read_only: false, sessions_terminated: 0, stop: StopOutcome::AlreadyStopped }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejoin_refuses_typed_and_leaves_the_member_stopped_when_rewind_cannot_work() {
    let c = PgCluster::start(PgClusterOptions { replicas: 0, ..Default::default() }).unwrap();
    let stranger = PgCluster::start(PgClusterOptions { replicas: 0, ..Default::default() }).unwrap();
    c.kill9("pg0").unwrap();

    // Never bound by this process (see drover_testkit).
    let closed = drover_testkit::free_port();
    let nowhere = PgTarget::new("127.0.0.1", closed, "postgres");
    let err = rejoin_as_replica(&c.local("pg0"), &nowhere, &c.member("pg0").upstream(), T).await.unwrap_err();
    assert!(matches!(err.kind, OpErrorKind::Unreachable(_)), "{err}");
    assert!(err.retryable(), "an unreachable new primary may come back: {err}");
    assert!(!c.is_running("pg0"));

    // Another cluster's primary shares no history with pg0: pg_rewind itself refuses.
    let source = stranger.member("pg0");
    let err = rejoin_as_replica(&c.local("pg0"), &source.target(), &source.upstream(), T).await.unwrap_err();
    assert!(matches!(&err.kind, OpErrorKind::RewindFailed { output } if output.contains("different systems")), "{err}");
    assert!(!err.retryable(), "the server keeps it fenced instead of retrying");
    assert!(err.to_string().contains("must stay fenced"), "{err}");
    assert!(!c.is_running("pg0"), "a member whose rewind failed is not started");
}
