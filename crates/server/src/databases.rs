//! Database clusters (`[databases.NAME]`): members' reports, orders, and the failover
//! loop.
//!
//! Every 250 ms per cluster: feed `drover_db::decide::Observer` with new agent reports,
//! disconnected agents and the server's own probe of each member; read the leader
//! record (`/drover/databases/NAME/leader`, created by `bootstrap_leader` when exactly
//! one member is a writable primary); `decide`. A failover's steps run in order and stop
//! at the first failure: the leader record is compare-and-swapped first (so two servers
//! can never both promote), then the old primary is fenced at the proxy (`db-primary`
//! and `db-replica` CRITICAL, which `close_on_leave` turns into closed connections) and
//! through its agent, the candidate is promoted, the others repointed, the roles
//! published. The healthy leader's agent gets a lease every tick; an agent whose lease
//! lapses fences its own primary. Each change is an event on `drover-server`, check
//! `database-NAME`, so the pipeline tells people.

use crate::sessions::Sessions;
use crate::state::State;
use drover_core::Status;
use drover_core::database::{DatabaseSpec, DbMode};
use drover_core::event::CheckResult;
use drover_core::protocol::ServerMessage;
use drover_db::decide::{self, ClusterSpec, Decision, LeaderRecord, MemberSpec, Observer, Step};
use drover_db::probe::{DbStatus, PgTarget};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;

/// A member's last report: its `DbStatus` as JSON or the probe's error, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub cluster: String,
    pub status: Result<serde_json::Value, String>,
    pub at_ms: i64,
}

#[derive(Default)]
pub struct Registry {
    reports: Mutex<HashMap<String, Report>>,
    /// Each cluster's latest view for the API: leader, last decision, observations.
    views: Mutex<std::collections::BTreeMap<String, serde_json::Value>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<(bool, String)>>>,
    next_order: AtomicU64,
    /// Switchovers asked for through the API, by cluster: the target (or any) and who waits.
    switchovers: Mutex<HashMap<String, SwitchoverRequest>>,
}

/// A switchover asked for through the API; answered with what happened.
pub struct SwitchoverRequest {
    pub to: Option<String>,
    pub reply: oneshot::Sender<Result<String, String>>,
}

impl Registry {
    pub fn report(&self, member: &str, cluster: String, status: Option<serde_json::Value>, error: Option<String>) {
        let status = match (status, error) {
            (Some(s), _) => Ok(s),
            (None, e) => Err(e.unwrap_or_else(|| "no status".into())),
        };
        let r = Report { cluster, status, at_ms: drover_core::time::now_ms() };
        self.reports.lock().expect("reports lock").insert(member.to_string(), r);
    }

    /// Queues a switchover for the cluster's loop; refused while another is queued.
    pub fn request_switchover(&self, cluster: &str, req: SwitchoverRequest) -> Result<(), String> {
        let mut s = self.switchovers.lock().expect("switchovers lock");
        if s.contains_key(cluster) {
            return Err(format!("a switchover of {cluster} is already under way"));
        }
        s.insert(cluster.to_string(), req);
        Ok(())
    }

    fn switchovers_pending(&self, cluster: &str) -> bool {
        self.switchovers.lock().expect("switchovers lock").contains_key(cluster)
    }

    fn take_switchover(&self, cluster: &str) -> Option<SwitchoverRequest> {
        self.switchovers.lock().expect("switchovers lock").remove(cluster)
    }

    pub fn set_view(&self, cluster: &str, view: serde_json::Value) {
        self.views.lock().expect("views lock").insert(cluster.to_string(), view);
    }

    pub fn views(&self) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.views.lock().expect("views lock").clone()
    }

    pub fn last_report(&self, member: &str) -> Option<Report> {
        self.reports.lock().expect("reports lock").get(member).cloned()
    }

    /// A fresh order id and the receiver of its outcome.
    pub fn new_order(&self) -> (u64, oneshot::Receiver<(bool, String)>) {
        let id = self.next_order.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        (id, rx)
    }

    pub fn forget_order(&self, id: u64) {
        self.pending.lock().expect("pending lock").remove(&id);
    }

    pub fn order_done(&self, id: u64, ok: bool, detail: String) {
        if let Some(tx) = self.pending.lock().expect("pending lock").remove(&id) {
            let _ = tx.send((ok, detail));
        }
    }
}

// ---- the failover loop -------------------------------------------------------------

/// How often each cluster is observed and decided about.
const TICK: Duration = Duration::from_millis(250);
/// The server's own probe of a member; well under the grace period.
const DIRECT_PROBE_TIMEOUT: Duration = Duration::from_millis(800);
const ORDER_TIMEOUT: Duration = Duration::from_secs(15);
const REJOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// After reconcile steps, how long before the next reconciliation may start.
const RECONCILE_SETTLE: Duration = Duration::from_secs(1);
/// How long after a failed rejoin before the member is tried again.
const REJOIN_RETRY: Duration = Duration::from_secs(60);
/// How long a failover waits for the old primary's agent to confirm a fence, when the
/// agent is still reporting; a silent one is not waited for.
const FENCE_WAIT: Duration = Duration::from_secs(3);
/// Re-published even without a change, so a role check never looks stale.
const ROLE_REFRESH_MS: i64 = 30_000;

fn leader_key(cluster: &str) -> String {
    format!("/drover/databases/{cluster}/leader")
}

fn now() -> u64 {
    drover_core::time::now_ms().max(0) as u64
}

/// Runs every configured cluster's loop until the process ends.
pub async fn run(state: Arc<State>, sessions: Arc<Sessions>, specs: Vec<DatabaseSpec>) {
    let mut set = tokio::task::JoinSet::new();
    for spec in specs {
        set.spawn(Cluster::new(state.clone(), sessions.clone(), spec).run());
    }
    while set.join_next().await.is_some() {}
}

/// Sends orders to members' agents and records events; shared with background
/// reconciliation so a long rejoin never holds up the cluster's loop.
struct Orderer {
    state: Arc<State>,
    sessions: Arc<Sessions>,
    spec: DatabaseSpec,
}

impl Orderer {
    /// Where the member's PostgreSQL listens: its entity's address and the cluster's
    /// port, or the entity's `pg_port` label.
    fn member_addr(&self, member: &str) -> Option<(String, u16)> {
        let e = self.state.entity(member)?;
        let host = e.address.clone()?;
        let port = e.labels.get("pg_port").and_then(|p| p.parse().ok()).unwrap_or(self.spec.port);
        Some((host, port))
    }

    /// Sends one order to a member's agent and waits for its outcome.
    async fn order(&self, member: &str, term: u64, step: &Step, timeout: Duration) -> bool {
        let mut op = serde_json::to_value(step).expect("steps serialize");
        // Orders that name a primary carry its address: the agent knows only itself.
        let primary = match step {
            Step::Repoint { primary, .. } | Step::Rejoin { primary, .. } => Some(primary.clone()),
            _ => None,
        };
        if let (Some(p), Some(obj)) = (primary, op.as_object_mut()) {
            if let Some((h, port)) = self.member_addr(&p) {
                obj.insert("primary_addr".into(), serde_json::json!(format!("{h}:{port}")));
            }
            obj.insert("replication_user".into(), serde_json::json!(self.spec.replication_user));
        }
        let (id, rx) = self.state.databases.new_order();
        let frame = serde_json::to_string(&ServerMessage::DbOrder { id, cluster: self.spec.name.clone(), term, op })
            .expect("orders serialize");
        if !self.sessions.send(member, frame) {
            self.state.databases.forget_order(id);
            tracing::warn!(cluster = %self.spec.name, member, "order not sent: the agent is not connected");
            return false;
        }
        if timeout.is_zero() {
            self.state.databases.forget_order(id);
            tracing::info!(cluster = %self.spec.name, member, "order sent; not waiting for an answer");
            return false;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok((ok, detail))) => {
                if ok {
                    tracing::info!(cluster = %self.spec.name, member, %detail, "order done");
                } else {
                    tracing::error!(cluster = %self.spec.name, member, %detail, "order failed");
                }
                ok
            }
            _ => {
                self.state.databases.forget_order(id);
                tracing::error!(cluster = %self.spec.name, member, "no answer to the order in time");
                false
            }
        }
    }

    /// An event on the server's own entity, check `database-NAME`, so people are told.
    fn event(&self, status: Status, message: String) {
        tracing::warn!(cluster = %self.spec.name, %message, "database");
        let check = format!("database-{}", self.spec.name);
        let r = CheckResult::made_by_drover(
            crate::handling::SERVER_ENTITY,
            &check,
            status,
            message,
            drover_core::time::now_ms(),
        );
        let _ = self.state.ingest(None, r);
    }
}

struct Cluster {
    state: Arc<State>,
    sessions: Arc<Sessions>,
    spec: DatabaseSpec,
    orders: Arc<Orderer>,
    /// The leader the lease task renews; `None` while a failover replaces it.
    lease_to: Arc<Mutex<Option<LeaderRecord>>>,
    /// A background reconciliation (rejoin, repoint) is running.
    reconciling: Arc<std::sync::atomic::AtomicBool>,
    /// Members whose last rejoin failed, and when: not retried before
    /// `REJOIN_RETRY` (a failed pg_rewind fails the same way every tick, and each try
    /// stops the server and raises an event).
    rejoin_failed: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    observer: Observer,
    /// The `at_ms` of the last report fed to the observer, per member.
    fed: HashMap<String, i64>,
    /// (member, check) -> (ok, output, when) last published.
    published: HashMap<(String, &'static str), (bool, String, i64)>,
    last_note: String,
}

impl Cluster {
    fn new(state: Arc<State>, sessions: Arc<Sessions>, spec: DatabaseSpec) -> Cluster {
        let observer = Observer::new(spec.members.iter().map(String::as_str), now());
        let orders = Arc::new(Orderer { state: state.clone(), sessions: sessions.clone(), spec: spec.clone() });
        Cluster {
            state,
            sessions,
            spec,
            orders,
            lease_to: Arc::new(Mutex::new(None)),
            reconciling: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            rejoin_failed: Arc::new(Mutex::new(HashMap::new())),
            observer,
            fed: HashMap::new(),
            published: HashMap::new(),
            last_note: String::new(),
        }
    }

    fn member_addr(&self, member: &str) -> Option<(String, u16)> {
        self.orders.member_addr(member)
    }

    fn cluster_spec(&self) -> ClusterSpec {
        ClusterSpec {
            name: self.spec.name.clone(),
            mode: match self.spec.mode {
                DbMode::Async => decide::Mode::Async,
                DbMode::Sync => decide::Mode::Sync,
            },
            max_lag_on_failover_bytes: self.spec.max_lag_on_failover_bytes,
            max_replica_lag_bytes: self.spec.max_replica_lag_bytes,
            read_fallback_to_primary: self.spec.read_fallback_to_primary,
            members: self
                .spec
                .members
                .iter()
                .map(|m| MemberSpec {
                    name: m.clone(),
                    addr: self.member_addr(m).map(|(h, p)| format!("{h}:{p}")).unwrap_or_default(),
                })
                .collect(),
            dead_grace_ms: self.spec.dead_grace_ms,
            status_max_age_ms: self.spec.status_max_age_ms,
            catch_up_timeout_ms: self.spec.catch_up_timeout_ms,
        }
    }

    async fn run(mut self) {
        // Leases go out on their own clock, to whoever leads (whatever the last decision
        // was): a slow round of probes must never let a reachable primary's lease lapse.
        let (sessions, spec, lease_to) = (self.sessions.clone(), self.spec.clone(), self.lease_to.clone());
        let _leases = AbortOnDrop(tokio::spawn(async move {
            let every = Duration::from_millis((spec.lease_ttl_ms / 4).max(50));
            loop {
                tokio::time::sleep(every).await;
                let leader = lease_to.lock().expect("lease lock").clone();
                if let Some(l) = leader {
                    let _ = sessions.send(&l.member, lease_frame(&spec, &l));
                }
            }
        }));
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.observe().await;
            self.step().await;
        }
    }

    /// Feeds the observer: agents' reports (new ones only), disconnected agents, and
    /// the server's own probe of every member.
    async fn observe(&mut self) {
        let t = now();
        for m in self.spec.members.clone() {
            let connected = self.state.entity(&m).is_some_and(|e| e.connected);
            let report = self.state.databases.last_report(&m).filter(|r| r.cluster == self.spec.name);
            match report {
                Some(r) if connected && self.fed.get(&m) != Some(&r.at_ms) => {
                    self.fed.insert(m.clone(), r.at_ms);
                    let status = r.status.and_then(|v| {
                        serde_json::from_value::<DbStatus>(v).map_err(|e| format!("unreadable status: {e}"))
                    });
                    self.observer.agent_report(&m, status, r.at_ms.max(0) as u64);
                }
                _ if !connected => self.observer.agent_gone(&m, t),
                _ => {}
            }
        }
        let user = self.spec.user.clone();
        let probes: Vec<_> = self
            .spec
            .members
            .iter()
            .map(|m| {
                let target = self.member_addr(m).map(|(h, p)| PgTarget::new(h, p, user.clone()));
                let m = m.clone();
                async move {
                    let r = match target {
                        None => Err("no address registered".to_string()),
                        Some(t) => drover_db::probe::probe(&t, DIRECT_PROBE_TIMEOUT).await.map_err(|e| e.to_string()),
                    };
                    (m, r)
                }
            })
            .collect();
        for (m, r) in futures_util::future::join_all(probes).await {
            self.observer.direct_probe(&m, r, now());
        }
    }

    async fn load_leader(&self) -> Option<(LeaderRecord, Vec<u8>)> {
        let kv = self.state.store.get(&leader_key(&self.spec.name)).await.ok()??;
        let rec = serde_json::from_slice(&kv.value).ok()?;
        Some((rec, kv.value))
    }

    async fn step(&mut self) {
        let spec = self.cluster_spec();
        let t = now();
        let (leader, raw) = match self.load_leader().await {
            Some(l) => l,
            None => match decide::bootstrap_leader(&spec, self.observer.observations(), t) {
                Ok(mut rec) => {
                    if self.spec.mode == DbMode::Sync {
                        // The record names the standbys before PostgreSQL lists them, so a
                        // failover never trusts a standby that might have missed a commit.
                        rec.sync_standbys = self.spec.members.iter().filter(|m| **m != rec.member).cloned().collect();
                    }
                    let value = serde_json::to_vec(&rec).expect("leader record serializes");
                    let key = leader_key(&self.spec.name);
                    let put = drover_store::Op::Put { key: key.clone(), value: value.clone(), lease: None };
                    match self.state.store.txn(vec![drover_store::Compare::Missing(key)], vec![put], vec![]).await {
                        Ok(r) if r.succeeded => {
                            self.event(Status::Ok, format!("leader is {} (term 1)", rec.member));
                            if self.spec.mode == DbMode::Sync {
                                self.list_sync_standbys(&rec).await;
                            }
                            (rec, value)
                        }
                        _ => return,
                    }
                }
                Err(why) => return self.note(format!("no leader yet: {why}")),
            },
        };
        *self.lease_to.lock().expect("lease lock") = Some(leader.clone());
        let obs = self.observer.observations().clone();
        match decide::decide(&spec, &obs, &leader, t) {
            Decision::Healthy if self.state.databases.switchovers_pending(&self.spec.name) => {
                let Some(req) = self.state.databases.take_switchover(&self.spec.name) else { return };
                let answer = self.switchover(&spec, &obs, &leader, &raw, req.to.as_deref(), t).await;
                let _ = req.reply.send(answer);
            }
            Decision::Healthy => {
                self.note(String::new());
                let steps = {
                    let mut failed = self.rejoin_failed.lock().expect("rejoin lock");
                    failed.retain(|_, at| at.elapsed() < REJOIN_RETRY);
                    decide::reconcile_except(&spec, &obs, &leader, t, |m| failed.contains_key(m))
                };
                if !steps.is_empty() && !self.reconciling.swap(true, Ordering::SeqCst) {
                    self.reconcile(steps, leader.term);
                }
            }
            Decision::Wait { reason } => self.note(format!("waiting: {reason}")),
            Decision::Refuse { reason } => {
                if self.last_note != reason {
                    self.event(Status::Critical, format!("failover refused: {reason}"));
                }
                self.note(reason);
            }
            Decision::Failover { from, to, term, steps } => {
                self.event(Status::Warning, format!("failing over from {from} to {to} (term {term})"));
                if self.execute(&steps, &leader, &raw).await {
                    self.observer.new_term();
                    self.event(Status::Ok, format!("failover done: {to} is the primary (term {term})"));
                } else {
                    self.event(Status::Critical, format!("failover from {from} to {to} did not complete"));
                }
            }
        }
        if let Some(req) = self.state.databases.take_switchover(&self.spec.name) {
            let why = if self.last_note.is_empty() { "a failover is under way".into() } else { self.last_note.clone() };
            let _ = req.reply.send(Err(format!("the cluster is not healthy: {why}")));
        }
        let leader = self.load_leader().await.map(|(l, _)| l).unwrap_or(leader);
        let obs = self.observer.observations().clone();
        let roles = decide::role_checks(&spec, &obs, &leader, now());
        for rc in &roles {
            self.publish(&rc.member, rc.check, rc.ok, rc.output.clone(), false);
        }
        self.state.databases.set_view(
            &self.spec.name,
            serde_json::json!({
                "name": self.spec.name,
                "leader": leader,
                "note": self.last_note,
                "roles": roles,
                "members": obs,
            }),
        );
    }

    /// Sync mode: the leader's PostgreSQL waits for the recorded standbys (any one of them).
    async fn list_sync_standbys(&self, leader: &LeaderRecord) {
        let Some((host, port)) = self.member_addr(&leader.member) else { return };
        let target = PgTarget::new(host, port, self.spec.user.clone());
        let value = drover_db::ops::synchronous_standby_names_value(1, &leader.sync_standbys);
        if let Err(e) = drover_db::ops::set_synchronous_standby_names(&target, &value, ORDER_TIMEOUT).await {
            self.event(Status::Critical, format!("could not set synchronous_standby_names on {}: {e}", leader.member));
        }
    }

    /// Runs a plan's steps in order; false when one failed (the rest are skipped).
    async fn execute(&mut self, steps: &[Step], leader: &LeaderRecord, raw: &[u8]) -> bool {
        let term = steps
            .iter()
            .find_map(|s| match s {
                Step::CompareAndSwapLeader { new, .. } => Some(new.term),
                _ => None,
            })
            .unwrap_or(leader.term);
        for step in steps {
            tracing::info!(cluster = %self.spec.name, ?step, "failover step");
            let ok = match step {
                Step::CompareAndSwapLeader { new, .. } => {
                    let key = leader_key(&self.spec.name);
                    let value = serde_json::to_vec(new).expect("leader record serializes");
                    let put = drover_store::Op::Put { key: key.clone(), value, lease: None };
                    let cmp = drover_store::Compare::Value(key, raw.to_vec());
                    let swapped =
                        matches!(self.state.store.txn(vec![cmp], vec![put], vec![]).await, Ok(r) if r.succeeded);
                    if swapped {
                        // The new leader is leased from here on; the old one gets no more.
                        *self.lease_to.lock().expect("lease lock") = Some(new.clone());
                    }
                    swapped
                }
                Step::FenceProxy { member } => {
                    self.fence_at_proxy(member, term);
                    true
                }
                Step::FenceAgent { member } => {
                    // Best effort: a gone agent fences itself when its lease lapses. One
                    // that has gone silent (a partition leaves its connection looking
                    // open) cannot answer, so waiting for it would only delay the promotion.
                    let silent = self
                        .observer
                        .observations()
                        .get(member)
                        .is_none_or(|o| decide::agent_silent(o, &self.cluster_spec(), now()));
                    let wait = if silent { Duration::ZERO } else { FENCE_WAIT };
                    let _ = self.order(member, term, step, wait).await;
                    true
                }
                Step::PublishRoles { primary, replicas } => {
                    self.publish(primary, decide::CHECK_PRIMARY, true, format!("primary (term {term})"), true);
                    for r in replicas {
                        self.publish(r, decide::CHECK_PRIMARY, false, format!("replica (term {term})"), true);
                    }
                    true
                }
                Step::RecordEvent { message } => {
                    self.event(Status::Warning, message.clone());
                    true
                }
                Step::WaitCatchUp { member, primary, timeout_ms } => {
                    let target =
                        |m: &str| self.member_addr(m).map(|(h, p)| PgTarget::new(h, p, self.spec.user.clone()));
                    match (target(primary), target(member)) {
                        (Some(p), Some(r)) => {
                            match drover_db::ops::wait_caught_up(&p, &r, Duration::from_millis(*timeout_ms)).await {
                                Ok(lsn) => {
                                    tracing::info!(cluster = %self.spec.name, member, lsn, "caught up");
                                    true
                                }
                                Err(e) => {
                                    tracing::error!(cluster = %self.spec.name, member, error = %e, "did not catch up");
                                    false
                                }
                            }
                        }
                        _ => false,
                    }
                }
                Step::Rejoin { .. } => self.order(step_member(step), term, step, REJOIN_TIMEOUT).await,
                Step::Repoint { .. } => {
                    // A replica that cannot be repointed now is reconciled later; the
                    // new primary is already serving.
                    let _ = self.order(step_member(step), term, step, ORDER_TIMEOUT).await;
                    true
                }
                _ => self.order(step_member(step), term, step, ORDER_TIMEOUT).await,
            };
            if !ok {
                tracing::error!(cluster = %self.spec.name, ?step, "failover step failed; stopping");
                return false;
            }
        }
        true
    }

    async fn order(&self, member: &str, term: u64, step: &Step, timeout: Duration) -> bool {
        self.orders.order(member, term, step, timeout).await
    }

    /// A planned change of primary: the target catches up on the read-only primary
    /// first, so no acknowledged write is lost; if it does not, the abort steps make the
    /// old primary writable again.
    async fn switchover(
        &mut self,
        spec: &ClusterSpec,
        obs: &decide::Observations,
        leader: &LeaderRecord,
        raw: &[u8],
        to: Option<&str>,
        t: u64,
    ) -> Result<String, String> {
        let plan = decide::plan_switchover(spec, obs, leader, to, t)?;
        self.event(Status::Warning, format!("switchover from {} to {} (term {})", plan.from, plan.to, plan.term));
        let started = std::time::Instant::now();
        if self.execute(&plan.steps, leader, raw).await {
            self.observer.new_term();
            let msg = format!(
                "switchover done: {} is the primary (term {}) after {:?}",
                plan.to,
                plan.term,
                started.elapsed()
            );
            self.event(Status::Ok, msg.clone());
            Ok(msg)
        } else {
            let undone = self.execute(&plan.abort, leader, raw).await;
            let msg = format!(
                "switchover from {} to {} did not complete; {}",
                plan.from,
                plan.to,
                if undone { format!("{} stays the primary", plan.from) } else { "the abort steps failed too".into() }
            );
            self.event(Status::Critical, msg.clone());
            Err(msg)
        }
    }

    /// Runs reconciliation steps (a returning old primary fenced and rewound, a
    /// replica repointed) in the background; fencing at the proxy happens at once.
    fn reconcile(&mut self, steps: Vec<Step>, term: u64) {
        for step in &steps {
            if let Step::FenceProxy { member } = step {
                self.fence_at_proxy(member, term);
            }
        }
        let (orders, busy, rejoin_failed) = (self.orders.clone(), self.reconciling.clone(), self.rejoin_failed.clone());
        tokio::spawn(async move {
            for step in steps {
                tracing::info!(cluster = %orders.spec.name, ?step, "reconcile step");
                let ok = match &step {
                    Step::FenceProxy { .. } => true,
                    Step::RecordEvent { message } => {
                        orders.event(Status::Warning, message.clone());
                        true
                    }
                    Step::Rejoin { member, .. } => {
                        let ok = orders.order(member, term, &step, REJOIN_TIMEOUT).await;
                        if !ok {
                            let retry = REJOIN_RETRY.as_secs();
                            orders.event(
                                Status::Critical,
                                format!("{member} could not rejoin; it stays fenced (next try in {retry} s)"),
                            );
                            rejoin_failed
                                .lock()
                                .expect("rejoin lock")
                                .insert(member.clone(), std::time::Instant::now());
                        }
                        ok
                    }
                    other => orders.order(step_member(other), term, other, ORDER_TIMEOUT).await,
                };
                if !ok {
                    break;
                }
            }
            // The observations that asked for these steps predate them; let the agents'
            // next reports (sent right after each order) arrive before judging again.
            tokio::time::sleep(RECONCILE_SETTLE).await;
            busy.store(false, Ordering::SeqCst);
        });
    }

    /// Withdraws every role check of `member` at once (the proxy closes its sessions).
    fn fence_at_proxy(&mut self, member: &str, term: u64) {
        for check in decide::ROLE_CHECKS {
            self.publish(member, check, false, format!("fenced at term {term}"), true);
        }
    }

    /// Publishes a role check as a drover-made result when it changed (or `force`).
    fn publish(&mut self, member: &str, check: &'static str, ok: bool, output: String, force: bool) {
        let t = drover_core::time::now_ms();
        let key = (member.to_string(), check);
        if !force
            && let Some((was, _, at)) = self.published.get(&key)
            && *was == ok
            && t - at < ROLE_REFRESH_MS
        {
            return;
        }
        let status = if ok { Status::Ok } else { Status::Critical };
        let r = CheckResult::made_by_drover(member, check, status, output.clone(), t);
        if let Err(e) = self.state.ingest(None, r) {
            tracing::warn!(member, check, error = %e, "role check not recorded");
        }
        self.published.insert(key, (ok, output, t));
    }

    fn event(&self, status: Status, message: String) {
        self.orders.event(status, message)
    }

    fn note(&mut self, note: String) {
        if note != self.last_note && !note.is_empty() {
            tracing::info!(cluster = %self.spec.name, %note, "database");
        }
        self.last_note = note;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn step_member(step: &Step) -> &str {
    match step {
        Step::FenceProxy { member }
        | Step::FenceAgent { member }
        | Step::MakeReadOnly { member }
        | Step::WaitCatchUp { member, .. }
        | Step::Promote { member, .. }
        | Step::Repoint { member, .. }
        | Step::Rejoin { member, .. }
        | Step::MakeWritable { member } => member,
        Step::CompareAndSwapLeader { new, .. } => &new.member,
        Step::PublishRoles { primary, .. } => primary,
        Step::RecordEvent { .. } => "",
    }
}

fn lease_frame(spec: &DatabaseSpec, leader: &LeaderRecord) -> String {
    serde_json::to_string(&ServerMessage::DbLease {
        cluster: spec.name.clone(),
        term: leader.term,
        ttl_ms: spec.lease_ttl_ms,
    })
    .expect("leases serialize")
}
