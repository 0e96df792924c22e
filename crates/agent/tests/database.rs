//! The agent's `[postgres]` side against real PostgreSQL 15 clusters
//! (`drover_db::testing::PgCluster`): reports, orders, and lease self-demotion.
//!
//! A minimal WebSocket server in the test stands in for the drover server, only to
//! drive orders and leases deterministically (which order, which term, when a lease
//! stops being renewed); the full path through the real server is the lead's
//! end-to-end test in crates/drover.

use drover_core::config::AgentConfig;
use drover_core::database::PostgresAgentConfig;
use drover_core::protocol::{AgentMessage, ServerMessage};
use drover_core::status::Status;
use drover_db::probe::{DbStatus, Role};
use drover_db::testing::{PgCluster, PgClusterOptions, REPLICATION_USER};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = WebSocketStream<TcpStream>;

const WAIT: Duration = Duration::from_secs(30);
const PROBE_MS: u64 = 100;

/// Accepts agents, reads their hello and welcomes them.
struct StandIn {
    listener: TcpListener,
}

impl StandIn {
    async fn start() -> (StandIn, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (StandIn { listener }, addr)
    }

    /// The next agent's connection, by entity name.
    async fn accept(&self) -> (String, Ws) {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept()).await.expect("agent connects").unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let AgentMessage::Hello(hello) = recv(&mut ws).await else { panic!("hello first") };
        send(&mut ws, &ServerMessage::Welcome { acked_up_to: 0 }).await;
        (hello.entity.name, ws)
    }

    async fn accept_all(&self, n: usize) -> HashMap<String, Ws> {
        let mut out = HashMap::new();
        for _ in 0..n {
            let (name, ws) = self.accept().await;
            out.insert(name, ws);
        }
        out
    }
}

async fn recv(ws: &mut Ws) -> AgentMessage {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("agent frame in time");
        match msg {
            Some(Ok(Message::Text(t))) => return AgentMessage::parse(&t).expect("agent sends valid frames"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("unexpected frame: {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, msg: &ServerMessage) {
    ws.send(Message::text(serde_json::to_string(msg).unwrap())).await.unwrap();
}

/// The next frame `pick` accepts; everything else (keepalives, other reports) is skipped.
async fn wait_for<T>(ws: &mut Ws, mut pick: impl FnMut(AgentMessage) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let msg = tokio::time::timeout_at(deadline, recv(ws)).await.expect("the awaited frame in time");
        if let Some(t) = pick(msg) {
            return t;
        }
    }
}

/// The next successful report's status. Error reports are skipped: a member that was
/// stopped (fenced) has queued one per probe interval for as long as it was down, and a
/// probe can fail now and then on a loaded machine; `WAIT` bounds the whole wait.
async fn next_status(ws: &mut Ws) -> DbStatus {
    wait_for(ws, |m| match m {
        AgentMessage::DbReport { cluster, status, .. } => {
            assert_eq!(cluster, "main");
            status.map(|status| serde_json::from_value(status).expect("status is a DbStatus"))
        }
        _ => None,
    })
    .await
}

/// Sends an order and returns its `(ok, detail)`.
async fn order(ws: &mut Ws, id: u64, term: u64, op: Value) -> (bool, String) {
    send(ws, &ServerMessage::DbOrder { id, cluster: "main".into(), term, op }).await;
    wait_for(ws, |m| match m {
        AgentMessage::DbOrderDone { id: done, ok, detail } if done == id => Some((ok, detail)),
        AgentMessage::DbOrderDone { id: other, .. } => panic!("reply to order {other}, expected {id}"),
        _ => None,
    })
    .await
}

fn lease(term: u64, ttl_ms: u64) -> ServerMessage {
    ServerMessage::DbLease { cluster: "main".into(), term, ttl_ms }
}

async fn start_cluster(replicas: usize) -> Arc<PgCluster> {
    let opts = PgClusterOptions { replicas, ..Default::default() };
    Arc::new(tokio::task::spawn_blocking(move || PgCluster::start(opts)).await.unwrap().expect("PostgreSQL cluster"))
}

/// An agent named after `member` (its `application_name`), operating that member.
async fn start_agent(server: SocketAddr, cluster: &PgCluster, member: &str) -> drover_agent::AgentHandle {
    let local = cluster.local(member);
    let pg = PostgresAgentConfig {
        cluster: "main".into(),
        host: local.target.host.clone(),
        port: local.target.port,
        user: local.target.user.clone(),
        data_dir: local.data_dir.clone(),
        bin_dir: local.bin_dir.clone(),
        run_as: local.run_as.clone(),
        start_options: local.start_options.clone(),
        log_file: local.log_file.clone(),
        probe_interval_ms: PROBE_MS,
        replication_timeout_ms: 4_000,
        hooks: None,
        state_file: None,
    };
    let cfg = AgentConfig {
        name: Some(member.into()),
        server: Some(format!("ws://{server}")),
        api_listen: String::new(),
        postgres: Some(pg),
        ..Default::default()
    };
    drover_agent::start(cfg).await.unwrap()
}

/// A primary with no replica, its agent, and the stand-in server's end of that agent's
/// connection (the stand-in and the agent are returned to be kept alive).
async fn lone_primary() -> (Arc<PgCluster>, StandIn, drover_agent::AgentHandle, Ws) {
    let cluster = start_cluster(0).await;
    let (server, addr) = StandIn::start().await;
    let agent = start_agent(addr, &cluster, "pg0").await;
    let (_, ws) = server.accept().await;
    (cluster, server, agent, ws)
}

/// Runs the harness's blocking psql off the runtime's threads.
async fn psql(cluster: &Arc<PgCluster>, member: &str, sql: &str) -> Result<String, String> {
    let (c, m, s) = (cluster.clone(), member.to_string(), sql.to_string());
    tokio::task::spawn_blocking(move || c.psql(&m, &s).map_err(|e| e.to_string())).await.unwrap()
}

async fn wait_streaming(cluster: &Arc<PgCluster>, replica: &str, upstream: &str) {
    let (c, r, u) = (cluster.clone(), replica.to_string(), upstream.to_string());
    tokio::task::spawn_blocking(move || c.wait_streaming(&r, &u, WAIT)).await.unwrap().expect("streaming");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_agent_reports_its_local_servers_role_every_interval() {
    let cluster = start_cluster(1).await;
    let (server, addr) = StandIn::start().await;
    let _pg0 = start_agent(addr, &cluster, "pg0").await;
    let _pg1 = start_agent(addr, &cluster, "pg1").await;
    let mut agents = server.accept_all(2).await;

    let ws = agents.get_mut("pg0").unwrap();
    let primary = next_status(ws).await;
    assert_eq!(primary.role, Role::Primary, "{primary:?}");
    assert!(primary.accepting_writes && primary.current_lsn.is_some(), "{primary:?}");
    // A primary sees its standby under the name the agent operates it by.
    let mut primary = primary;
    while primary.standbys.is_empty() {
        primary = next_status(ws).await;
    }
    assert_eq!(primary.standbys[0].name, "pg1");

    let ws = agents.get_mut("pg1").unwrap();
    let replica = next_status(ws).await;
    assert_eq!(replica.role, Role::Replica, "{replica:?}");
    assert!(replica.in_recovery && !replica.accepting_writes, "{replica:?}");
    assert_eq!(replica.upstream.as_deref(), Some(format!("127.0.0.1:{}", cluster.member("pg0").port).as_str()));

    // Reports keep coming at the probe interval (10 within ~1 s, generously bounded).
    let started = Instant::now();
    for _ in 0..10 {
        next_status(ws).await;
    }
    assert!(started.elapsed() < Duration::from_secs(5), "10 reports took {:?}", started.elapsed());

    // Both servers run with the agent's replication timeouts (PostgreSQL's default is
    // 60 s, which would keep a partitioned primary's replicas "streaming" for a minute).
    for m in ["pg0", "pg1"] {
        let sql = "SELECT string_agg(setting, ',' ORDER BY name) FROM pg_settings \
                   WHERE name IN ('wal_receiver_timeout', 'wal_sender_timeout')";
        assert_eq!(psql(&cluster, m, sql).await.unwrap(), "4000,4000", "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_fence_the_primary_promote_a_replica_and_repoint_and_rejoin_the_others() {
    let cluster = start_cluster(2).await;
    let (server, addr) = StandIn::start().await;
    let _pg0 = start_agent(addr, &cluster, "pg0").await;
    let _pg1 = start_agent(addr, &cluster, "pg1").await;
    let _pg2 = start_agent(addr, &cluster, "pg2").await;
    let mut agents = server.accept_all(3).await;
    let pg1_addr = format!("127.0.0.1:{}", cluster.member("pg1").port);
    psql(&cluster, "pg0", "CREATE TABLE t (x int); INSERT INTO t VALUES (1)").await.unwrap();

    let (ok, detail) =
        order(agents.get_mut("pg0").unwrap(), 1, 2, json!({"step": "fence_agent", "member": "pg0"})).await;
    assert!(ok, "{detail}");
    assert!(detail.contains("fenced") && detail.contains("stopped"), "{detail}");
    assert!(!cluster.is_running("pg0"), "a fenced primary is stopped");

    let ws = agents.get_mut("pg1").unwrap();
    assert_eq!(next_status(ws).await.role, Role::Replica);
    // pg1 once held a lease (as an earlier leader would have), which lapses while it is a
    // replica: that must not fence it once it is promoted.
    send(ws, &lease(1, 200)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let promote = json!({"step": "promote", "member": "pg1", "synchronous_standby_names": ""});
    let (ok, detail) = order(ws, 2, 2, promote).await;
    assert!(ok, "{detail}");
    let after = next_status(ws).await;
    assert_eq!(after.role, Role::Primary, "the first report after the reply shows the promotion: {after:?}");
    assert!(after.accepting_writes, "{after:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    psql(&cluster, "pg1", "INSERT INTO t VALUES (2)").await.expect("the new primary stays writable");

    // The server adds the new primary's address and the replication role to the step.
    let repoint = json!({"step": "repoint", "member": "pg2", "primary": "pg1",
                         "primary_addr": pg1_addr, "replication_user": REPLICATION_USER});
    let (ok, detail) = order(agents.get_mut("pg2").unwrap(), 3, 2, repoint).await;
    assert!(ok, "{detail}");
    wait_streaming(&cluster, "pg2", "pg1").await;

    let rejoin = json!({"step": "rejoin", "member": "pg0", "primary": "pg1",
                        "primary_addr": pg1_addr, "replication_user": REPLICATION_USER});
    let ws = agents.get_mut("pg0").unwrap();
    let (ok, detail) = order(ws, 4, 2, rejoin).await;
    assert!(ok, "{detail}");
    assert!(detail.contains("rejoined as a replica of pg1"), "{detail}");
    wait_streaming(&cluster, "pg0", "pg1").await;
    let status = next_status(ws).await;
    assert_eq!(status.role, Role::Replica, "{status:?}");
    // The old primary now follows the new one's history.
    let deadline = Instant::now() + WAIT;
    while psql(&cluster, "pg0", "SELECT count(*) FROM t").await.as_deref() != Ok("2") {
        assert!(Instant::now() < deadline, "pg0 never replayed pg1's write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_from_an_older_term_or_not_for_this_agent_are_refused_and_change_nothing() {
    let (cluster, _server, _pg0, mut ws) = lone_primary().await;
    psql(&cluster, "pg0", "CREATE TABLE t (x int)").await.unwrap();

    // Term 5 becomes known through an order that changes nothing on a writable primary.
    let (ok, detail) = order(&mut ws, 1, 5, json!({"step": "make_writable", "member": "pg0"})).await;
    assert!(ok, "{detail}");

    let (ok, detail) = order(&mut ws, 2, 4, json!({"step": "fence_agent", "member": "pg0"})).await;
    assert!(!ok);
    assert!(detail.contains("stale term 4") && detail.contains("term 5"), "{detail}");

    // A lease carries a term too: after term 7's lease, term 6 orders are stale.
    send(&mut ws, &lease(7, 60_000)).await;
    let (ok, detail) = order(&mut ws, 3, 6, json!({"step": "make_read_only", "member": "pg0"})).await;
    assert!(!ok && detail.contains("stale term 6"), "{detail}");

    let refusals = [
        (json!({"step": "publish_roles", "primary": "pg0", "replicas": []}), "not an agent step"),
        (json!({"step": "fence_agent", "member": "pg9"}), "for member `pg9`"),
        (json!({"step": "repoint", "member": "pg0", "primary": "pg1"}), "primary_addr"),
        (json!({"step": "explode", "member": "pg0"}), "not a step"),
    ];
    for (i, (op, why)) in refusals.into_iter().enumerate() {
        let (ok, detail) = order(&mut ws, 10 + i as u64, 7, op).await;
        assert!(!ok && detail.contains(why), "expected {why:?}: {detail}");
    }
    send(&mut ws, &ServerMessage::DbOrder { id: 20, cluster: "other".into(), term: 7, op: json!({}) }).await;
    let (ok, detail) = wait_for(&mut ws, |m| match m {
        AgentMessage::DbOrderDone { id: 20, ok, detail } => Some((ok, detail)),
        _ => None,
    })
    .await;
    assert!(!ok && detail.contains("cluster `main`, not `other`"), "{detail}");

    assert!(cluster.is_running("pg0"));
    psql(&cluster, "pg0", "INSERT INTO t VALUES (1)").await.expect("still writable");
    let status = next_status(&mut ws).await;
    assert!(status.role == Role::Primary && status.accepting_writes, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_without_a_lease_is_left_alone_and_fences_itself_once_a_granted_lease_lapses() {
    let (cluster, _server, _pg0, mut ws) = lone_primary().await;
    psql(&cluster, "pg0", "CREATE TABLE t (x int)").await.unwrap();

    // Never granted a lease: many probes later the primary is untouched.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let s = next_status(&mut ws).await;
        assert!(s.role == Role::Primary && s.accepting_writes, "{s:?}");
    }
    psql(&cluster, "pg0", "INSERT INTO t VALUES (1)").await.expect("writable without a lease");

    // Renewed leases keep it writable well past one TTL.
    const TTL_MS: u64 = 1000;
    let renewing = Instant::now();
    while renewing.elapsed() < Duration::from_millis(2500) {
        send(&mut ws, &lease(1, TTL_MS)).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    send(&mut ws, &lease(1, TTL_MS)).await;
    let last_renewal = Instant::now();
    psql(&cluster, "pg0", "INSERT INTO t VALUES (2)").await.expect("writable under a renewed lease");
    assert!(cluster.is_running("pg0"));

    // No more renewals (the server lost sight of the agent): the agent fences its primary.
    let output = wait_for(&mut ws, |m| match m {
        AgentMessage::Result { result, .. } if result.check == "postgres-lease" => {
            assert_eq!(result.status, Status::Critical);
            assert_eq!(result.entity, "pg0");
            Some(result.output)
        }
        _ => None,
    })
    .await;
    let fenced_after = last_renewal.elapsed();
    assert!(output.contains("lease for term 1 lapsed") && output.contains("fenced"), "{output}");
    assert!(fenced_after >= Duration::from_millis(TTL_MS - 100), "fenced before the lease lapsed: {fenced_after:?}");
    assert!(fenced_after < Duration::from_millis(TTL_MS + 3000), "fenced too late: {fenced_after:?}");
    assert!(!cluster.is_running("pg0"), "the fence stops the server");
    let write = psql(&cluster, "pg0", "INSERT INTO t VALUES (3)").await;
    assert!(write.is_err(), "a fenced primary must not take writes: {write:?}");
    let report = wait_for(&mut ws, |m| match m {
        AgentMessage::DbReport { status: None, error, .. } => error,
        _ => None,
    })
    .await;
    assert!(report.contains("cannot connect"), "{report}");
}

/// `wal_receiver_timeout,wal_sender_timeout` of `member` in ms ("" when it does not answer).
async fn replication_timeouts(cluster: &Arc<PgCluster>, member: &str) -> String {
    let sql = "SELECT string_agg(setting, ',' ORDER BY name) FROM pg_settings \
               WHERE name IN ('wal_receiver_timeout', 'wal_sender_timeout')";
    psql(cluster, member, sql).await.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restarted_with_other_replication_timeouts_gets_the_agents_back() {
    let (cluster, _server, _pg0, mut ws) = lone_primary().await;
    let deadline = Instant::now() + WAIT;
    while replication_timeouts(&cluster, "pg0").await != "4000,4000" {
        assert!(Instant::now() < deadline, "the agent never set its timeouts");
        next_status(&mut ws).await;
    }

    // Someone puts PostgreSQL's own minute back (in postgresql.auto.conf, where the agent
    // keeps its values) and restarts the server: it comes back with 60 s unless the
    // agent, having seen it go away, checks the settings again once it answers.
    psql(&cluster, "pg0", "ALTER SYSTEM SET wal_sender_timeout = '60s'").await.unwrap();
    psql(&cluster, "pg0", "ALTER SYSTEM SET wal_receiver_timeout = '60s'").await.unwrap();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.stop_member("pg0").and_then(|()| c.start_member("pg0")))
        .await
        .unwrap()
        .expect("pg0 restarted");
    let restarted = Instant::now();
    let mut seen = Vec::new();
    loop {
        let now = replication_timeouts(&cluster, "pg0").await;
        if now == "4000,4000" {
            break;
        }
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        assert!(restarted.elapsed() < WAIT, "timeouts read after the restart: {seen:?}");
        next_status(&mut ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_brings_other_replication_timeouts_gets_the_agents_back() {
    let (cluster, _server, _pg0, mut ws) = lone_primary().await;
    let deadline = Instant::now() + WAIT;
    while replication_timeouts(&cluster, "pg0").await != "4000,4000" {
        assert!(Instant::now() < deadline, "the agent never set its timeouts");
        next_status(&mut ws).await;
    }

    // PostgreSQL never stops here, so no probe fails: only the new configuration load
    // time the probe reads tells the agent to look at its settings again. 4000 read
    // after a load later than `before` (ours or the agent's, both after the ALTERs)
    // can only be the agent's doing; 4000 alone might predate our reload.
    let load_time = || psql(&cluster, "pg0", "SELECT pg_conf_load_time()::text");
    let before = load_time().await.unwrap();
    psql(&cluster, "pg0", "ALTER SYSTEM SET wal_sender_timeout = '60s'").await.unwrap();
    psql(&cluster, "pg0", "ALTER SYSTEM SET wal_receiver_timeout = '60s'").await.unwrap();
    psql(&cluster, "pg0", "SELECT pg_reload_conf()").await.unwrap();
    let reloaded = Instant::now();
    let mut seen = Vec::new();
    loop {
        let loaded = load_time().await.unwrap();
        let now = replication_timeouts(&cluster, "pg0").await;
        if now == "4000,4000" && loaded != before {
            break;
        }
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        assert!(reloaded.elapsed() < WAIT, "timeouts read after the reload: {seen:?}");
        next_status(&mut ws).await;
    }
}
