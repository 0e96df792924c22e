//! The agent's side of database failover (issue #6), alive only with `[postgres]`.
//!
//! **Reports.** Every `probe_interval_ms` the local server is probed
//! ([`drover_db::probe::probe`], bounded by min(interval, 1 s), at least 250 ms) and the outcome goes to
//! the server as `DbReport` (status or error). Reports are fire-and-forget: only the
//! latest unsent one is kept, it is dropped while disconnected and on every (re)connect,
//! and a report probed while an order finished is dropped too (an immediate re-probe
//! follows each order), so the first report after a `DbOrderDone` shows the order's
//! effect. A stale report is worse than none; none of this touches the results outbox.
//!
//! **Orders.** `DbOrder { id, cluster, term, op }` runs `op` (a
//! [`drover_db::decide::Step`] naming this member) against the local server and answers
//! `DbOrderDone { id, ok, detail }`. Orders are checked on receipt and queued to one
//! order task, so they run one at a time in arrival order and the connection loop never
//! waits for PostgreSQL (tasks racing for a mutex would not keep arrival order on a
//! multi-thread runtime). Refused (`ok = false`) without touching PostgreSQL: a term
//! below the highest term seen in an order or lease ([`drover_db::lease::accept_order`],
//! checked on receipt and again when a queued order starts), another cluster or member,
//! a step that is not the agent's, a malformed `op`. A reply goes out only on the connection that carried its
//! order (the server retries on a lost reply; the operations are idempotent), so a reply
//! can never resolve an unrelated order of a restarted server.
//!
//! | step | built-in (`drover_db::ops`) | hook, when `[postgres.hooks]` configures it |
//! |---|---|---|
//! | `fence_agent` | `fence` (read-only at once, then stop) | `fence` |
//! | `make_read_only` | `set_read_only(true)` | `demote` |
//! | `make_writable` | `set_read_only(false)` | `promote` (a promote hook must make an already-primary server writable, as the built-in does) |
//! | `promote` | `promote(synchronous_standby_names)` | `promote` |
//! | `repoint` | `repoint` | `repoint` |
//! | `rejoin` | `rejoin_as_replica` (stop, `pg_rewind`, start as replica) | `demote` (if configured), then `repoint` |
//!
//! A hook replaces only its own built-in; an unconfigured hook leaves the built-in in
//! place. Hook tokens: `member`, `cluster`, `term`, plus `synchronous_standby_names`
//! (promote) and `primary`, `primary_host`, `primary_port` (repoint, rejoin).
//!
//! `Repoint` and `Rejoin` name the new primary only by member, so the order's `op`
//! carries two fields beyond the step, which the server adds:
//! - `primary_addr: "host:port"` (required): where the new primary's PostgreSQL listens;
//!   `[host]:port` for IPv6.
//! - `replication_user` (optional, default this agent's `[postgres].user`): the
//!   REPLICATION role written into `primary_conninfo` (the cluster's `replication_user`).
//!
//! `pg_rewind` connects to the new primary as this agent's `[postgres].user`, which must
//! be a superuser there too.
//!
//! **Lease (self-demotion).** `DbLease { term, ttl_ms }` is granted from the moment the
//! frame is read (the protocol's rule; the agent never asks for a renewal, so a lease
//! can outlast the server's view by the frame's one-way delay, which the cluster's
//! fence budget has to cover). Leases from a term below the highest seen are ignored.
//! The watchdog probes again the moment the lease expires (and on every interval) and,
//! when [`drover_db::lease::lease_verdict`] says a writable primary must demote, fences
//! it at once (the `fence` hook or `ops::fence`), logs it, and enqueues a critical
//! `postgres-lease` result (at-least-once: it reaches the server after the partition
//! heals); an OK result follows once the member answers again as a replica or under a
//! valid lease. `lease_verdict` demotes a writable primary that has no lease at all; the
//! agent applies it only once it has received a first lease for its cluster (or restored
//! one from its state file, below), so an agent started for the first time beside a
//! running primary (bootstrap, server not up yet, a cluster the server does not manage)
//! never fences it. Once armed, the watchdog stays armed for
//! the life of the process: a writable primary whose lease has lapsed is fenced on every
//! probe until the server grants a new lease. The one exception: a `Promote` or
//! `MakeWritable` order disarms it (from the moment it starts) until the next lease, since an earlier lease (which
//! lapsed while the member was a replica or read-only) would otherwise fence the primary
//! the server has just made; the server should lease a new leader as soon as its leader
//! record is written, which closes that unguarded window.
//!
//! **Replication timeouts.** After the first good probe, and again whenever the local
//! PostgreSQL reports a new `pg_conf_load_time()` (a restart or a reload, either of
//! which may bring other values back), the agent keeps `wal_receiver_timeout` and
//! `wal_sender_timeout` at `replication_timeout_ms` ([`drover_db::ops::ensure_replication_timeouts`]), so a
//! replica notices a partitioned or frozen primary in seconds, not PostgreSQL's minute.
//!
//! **Across restarts.** The highest term and whether self-demotion is armed (with the
//! lease's term and TTL) are written to `[postgres] state_file` (default beside the data
//! directory) whenever they change — a renewal of the same lease changes nothing — and
//! read back at start ([`drover_db::lease::SavedTerms`]): a restarted agent refuses the
//! terms it refused before, and one that was armed re-arms with a lease of one TTL from
//! its start, so beside a partitioned primary it fences it one TTL after starting (without
//! the file it would wait for a first lease that cannot come), while a restart with the
//! server in reach is leased again before that. No fsync: a file lost with the machine
//! starts the agent unarmed, as does an unreadable one (logged), as on a first start.
//!

use crate::Shared;
use drover_core::database::PostgresAgentConfig;
use drover_core::event::CheckResult;
use drover_core::protocol::{AgentMessage, ServerMessage};
use drover_core::status::Status;
use drover_db::decide::Step;
use drover_db::lease::{Lease, LeaseVerdict, SavedTerms, accept_order, lease_verdict};
use drover_db::ops::{self, HookKind, Hooks, LocalPg, OpError, Upstream};
use drover_db::probe::{self, DbStatus, PgTarget, ProbeError, Role};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, MissedTickBehavior};

/// The check name of the agent's self-fence events.
pub(crate) const LEASE_CHECK: &str = "postgres-lease";

const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);
const READ_ONLY_TIMEOUT: Duration = Duration::from_secs(10);
const REPOINT_TIMEOUT: Duration = Duration::from_secs(30);
/// Stop, checkpoint the source, `pg_rewind`, start: a large data dir takes a while.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// The read-only half of a fence is bounded by `ops::fence` itself (≤ 2 s); this is
/// the stop's budget (fast, then immediate).
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's database state, shared by the probe task, order tasks and the session.
pub(crate) struct Db {
    cluster: String,
    local: LocalPg,
    hooks: Option<Hooks>,
    probe_interval: Duration,
    /// `[postgres] replication_timeout_ms`; 0 leaves the server's own.
    replication_timeout_ms: u64,
    /// Zero of the agent's monotonic millisecond clock (leases are counted in it).
    epoch: Instant,
    terms: Mutex<Terms>,
    /// `[postgres] state_file`: `terms` as of their last change.
    state_file: PathBuf,
    /// To the order task (see [`run_orders`]).
    orders: mpsc::UnboundedSender<Order>,
    out: Mutex<Outgoing>,
    /// `notify_one` keeps a permit, so a frame queued while the session is busy is not missed.
    pub ready: Notify,
    /// A lease arrived: the probe task re-plans its wake-up for the new expiry.
    lease_changed: Notify,
    /// An order finished (or a fence happened): probe now so the server sees the effect.
    probe_now: Notify,
}

#[derive(Default)]
struct Terms {
    /// The highest term seen in an accepted order or lease (the fencing token).
    known: u64,
    /// `None` until the first lease for this cluster (or one restored from the state
    /// file): the watchdog is not armed.
    lease: Option<Lease>,
    /// What the state file holds, so a renewal that changes none of it writes nothing.
    saved: Option<SavedTerms>,
    /// The last save failed: logged once, then again only after one succeeded.
    save_failing: bool,
}

/// Frames for the current connection only.
#[derive(Default)]
struct Outgoing {
    /// Bumped on every connect and disconnect; a reply tagged with another generation
    /// belongs to a connection that is gone.
    generation: u64,
    connected: bool,
    replies: Vec<String>,
    report: Option<String>,
    /// Orders finished so far; a report probed across a change is stale.
    orders_done: u64,
}

/// An admitted order waiting for the order task.
pub(crate) struct Order {
    id: u64,
    term: u64,
    step: Step,
    extras: OrderExtras,
    /// The connection it came on; its reply goes there or nowhere.
    generation: u64,
}

/// What the server adds to a `Repoint`/`Rejoin` step (see the module docs).
#[derive(Debug, Default, Deserialize)]
struct OrderExtras {
    #[serde(default)]
    primary_addr: Option<String>,
    #[serde(default)]
    replication_user: Option<String>,
}

impl Db {
    /// The state and the receiving end of its order queue, for [`run_orders`].
    pub fn new(member: &str, cfg: &PostgresAgentConfig) -> (Db, mpsc::UnboundedReceiver<Order>) {
        let target = PgTarget::new(cfg.host.clone(), cfg.port, cfg.user.clone());
        let local = LocalPg {
            name: member.to_string(),
            bin_dir: cfg.bin_dir.clone(),
            data_dir: cfg.data_dir.clone(),
            run_as: cfg.run_as.clone(),
            start_options: cfg.start_options.clone(),
            log_file: cfg.log_file.clone(),
            target,
        };
        let hooks = cfg.hooks.as_ref().map(|h| Hooks {
            promote: h.promote.clone(),
            demote: h.demote.clone(),
            repoint: h.repoint.clone(),
            fence: h.fence.clone(),
            timeout_secs: h.timeout_secs,
        });
        let (orders, queue) = mpsc::unbounded_channel();
        let epoch = Instant::now();
        let state_file = cfg.state_file();
        let terms = restore_terms(&state_file, &cfg.cluster);
        let db = Db {
            cluster: cfg.cluster.clone(),
            local,
            hooks,
            probe_interval: Duration::from_millis(cfg.probe_interval_ms),
            replication_timeout_ms: cfg.replication_timeout_ms,
            epoch,
            terms: Mutex::new(terms),
            state_file,
            orders,
            out: Mutex::new(Outgoing::default()),
            ready: Notify::new(),
            lease_changed: Notify::new(),
            probe_now: Notify::new(),
        };
        (db, queue)
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn terms(&self) -> std::sync::MutexGuard<'_, Terms> {
        // Plain field updates only; a poisoned lock still holds consistent values.
        self.terms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn out(&self) -> std::sync::MutexGuard<'_, Outgoing> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection was welcomed: forget whatever was queued before it. Returns the
    /// generation its orders' replies are tagged with.
    pub fn session_started(&self) -> u64 {
        let mut o = self.out();
        o.generation += 1;
        o.connected = true;
        o.replies.clear();
        o.report = None;
        o.generation
    }

    pub fn session_ended(&self) {
        let mut o = self.out();
        o.generation += 1;
        o.connected = false;
        o.replies.clear();
        o.report = None;
    }

    pub fn has_frames(&self) -> bool {
        let o = self.out();
        o.report.is_some() || !o.replies.is_empty()
    }

    /// Frames for connection `generation`, replies before the report.
    pub fn take_frames(&self, generation: u64) -> Vec<String> {
        let mut o = self.out();
        if o.generation != generation {
            return Vec::new();
        }
        let mut frames = std::mem::take(&mut o.replies);
        frames.extend(o.report.take());
        frames
    }

    fn push_report(&self, orders_before: u64, probed: &Result<DbStatus, ProbeError>) {
        let msg = match probed {
            Ok(status) => AgentMessage::DbReport {
                cluster: self.cluster.clone(),
                status: serde_json::to_value(status).ok(),
                error: None,
            },
            Err(e) => {
                AgentMessage::DbReport { cluster: self.cluster.clone(), status: None, error: Some(e.to_string()) }
            }
        };
        let mut o = self.out();
        if !o.connected || o.orders_done != orders_before {
            return;
        }
        o.report = Some(frame(&msg));
        drop(o);
        self.ready.notify_one();
    }

    /// Queues an order's reply; `ran` says the order touched PostgreSQL, which makes
    /// the pending report stale and calls for a fresh probe.
    fn push_reply(&self, generation: u64, id: u64, result: Result<String, String>, ran: bool) {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        let mut o = self.out();
        if ran {
            o.orders_done += 1;
            // Probed before the order's effect: the re-probe below replaces it.
            o.report = None;
        }
        if o.generation == generation && o.connected {
            o.replies.push(frame(&AgentMessage::DbOrderDone { id, ok, detail }));
        } else {
            tracing::info!(id, ok, "database order finished after its connection closed; reply dropped");
        }
        drop(o);
        self.ready.notify_one();
        if ran {
            self.probe_now.notify_one();
        }
    }

    /// Writes `t` to the state file when what it keeps changed. Called with the terms lock held, so saves
    /// land in the order of changes; they are rare (a new term, arming, disarming).
    fn save(&self, t: &mut Terms) {
        let now = SavedTerms::capture(&self.cluster, t.known, t.lease.as_ref());
        if t.saved.as_ref() == Some(&now) {
            return;
        }
        // Not durable: it only has to outlive this process (module docs).
        match drover_core::state_file::write_json(&self.state_file, &now, false) {
            Ok(()) => {
                t.saved = Some(now);
                if std::mem::replace(&mut t.save_failing, false) {
                    tracing::info!(file = %self.state_file.display(), "database term and lease saved again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut t.save_failing, true) {
                    tracing::warn!(
                        file = %self.state_file.display(),
                        "cannot save the database term and lease ({e}); a restart of this agent would forget them"
                    );
                }
            }
        }
    }

    /// When the watchdog must look next: the lease's expiry, if one is armed and still ahead.
    fn lease_deadline(&self) -> Option<Instant> {
        let lease = self.terms().lease?;
        let now = self.now_ms();
        (lease.expires_at_ms > now).then(|| self.epoch + Duration::from_millis(lease.expires_at_ms))
    }

    fn on_lease(&self, cluster: &str, term: u64, ttl_ms: u64) {
        if cluster != self.cluster {
            tracing::warn!(cluster, ours = %self.cluster, "lease for another database cluster; ignored");
            return;
        }
        let now = self.now_ms();
        let mut t = self.terms();
        if !accept_order(t.known, term) {
            tracing::warn!(term, known_term = t.known, "lease from an older term; ignored");
            return;
        }
        if t.lease.is_none() {
            tracing::info!(term, ttl_ms, "first lease received: self-demotion is armed");
        }
        t.known = t.known.max(term);
        t.lease = Some(Lease::granted(term, now, ttl_ms));
        self.save(&mut t);
        drop(t);
        self.lease_changed.notify_one();
    }

    /// The server just made this member a writable primary; a lease from before (one that
    /// lapsed while it was a replica, or during the switchover that made it read-only)
    /// says nothing about that, and the server's failover steps run before it leases the
    /// new leader again. Keeping the old lease would fence the new primary at the next
    /// probe, so the watchdog waits for the next lease, as at startup.
    fn disarm_after_becoming_writable(&self, term: u64) {
        let mut t = self.terms();
        if let Some(old) = t.lease.take() {
            tracing::info!(old_term = old.term, term, "writable by order: self-demotion waits for the next lease");
            self.save(&mut t);
        }
    }

    /// The receipt-time checks; an admitted order's term becomes the known term.
    fn admit(&self, cluster: &str, term: u64, op: serde_json::Value) -> Result<(Step, OrderExtras), String> {
        if cluster != self.cluster {
            return Err(format!("this agent's PostgreSQL belongs to cluster `{}`, not `{cluster}`", self.cluster));
        }
        let step: Step = serde_json::from_value(op.clone()).map_err(|e| format!("`op` is not a step: {e}"))?;
        let extras: OrderExtras = serde_json::from_value(op).unwrap_or_default();
        let member = step_member(&step).ok_or_else(|| format!("not an agent step: {}", step_name(&step)))?;
        if member != self.local.name {
            return Err(format!("the order is for member `{member}`, this agent is `{}`", self.local.name));
        }
        // Last, so an order refused for another reason cannot raise the known term.
        let mut t = self.terms();
        if !accept_order(t.known, term) {
            return Err(stale(term, t.known));
        }
        if term > t.known {
            t.known = term;
            self.save(&mut t);
        }
        Ok((step, extras))
    }

    async fn execute(&self, term: u64, step: &Step, extras: OrderExtras) -> Result<String, String> {
        // Checked again now: a newer term may have arrived while this order waited.
        let known = self.terms().known;
        if !accept_order(known, term) {
            return Err(stale(term, known));
        }
        tracing::info!(step = step_name(step), term, "running database order");
        if matches!(step, Step::Promote { .. } | Step::MakeWritable { .. }) {
            // Disarmed before, not after: the member turns writable part-way through the
            // order, and a probe in that window must not fence it for a lease that lapsed
            // while it was a replica (seen on a loaded machine: the new primary fenced
            // mid-promotion).
            self.disarm_after_becoming_writable(term);
        }
        let mut vars = BTreeMap::from([
            ("member".to_string(), self.local.name.clone()),
            ("cluster".to_string(), self.cluster.clone()),
            ("term".to_string(), term.to_string()),
        ]);
        let outcome = match step {
            Step::FenceAgent { .. } => self.fence(&vars).await,
            Step::MakeReadOnly { .. } => match self.hook(HookKind::Demote) {
                Some(h) => run_hook(h, HookKind::Demote, &vars).await,
                None => ops::set_read_only(&self.local.target, true, READ_ONLY_TIMEOUT)
                    .await
                    .map(|n| format!("read-only; {n} client session(s) cut")),
            },
            Step::MakeWritable { .. } => match self.hook(HookKind::Promote) {
                Some(h) => run_hook(h, HookKind::Promote, &vars).await,
                None => ops::set_read_only(&self.local.target, false, READ_ONLY_TIMEOUT)
                    .await
                    .map(|_| "writable".to_string()),
            },
            Step::Promote { synchronous_standby_names, .. } => {
                vars.insert("synchronous_standby_names".into(), synchronous_standby_names.clone());
                match self.hook(HookKind::Promote) {
                    Some(h) => run_hook(h, HookKind::Promote, &vars).await,
                    None => ops::promote(&self.local.target, Some(synchronous_standby_names), PROMOTE_TIMEOUT)
                        .await
                        .map(|()| format!("promoted (synchronous_standby_names = '{synchronous_standby_names}')")),
                }
            }
            Step::Repoint { primary, .. } | Step::Rejoin { primary, .. } => {
                let (host, port) = primary_addr(primary, extras.primary_addr.as_deref())?;
                vars.insert("primary".into(), primary.clone());
                vars.insert("primary_host".into(), host.clone());
                vars.insert("primary_port".into(), port.to_string());
                let upstream = Upstream {
                    host: host.clone(),
                    port,
                    user: extras.replication_user.clone().unwrap_or_else(|| self.local.target.user.clone()),
                    password: None,
                };
                if let Step::Repoint { .. } = step {
                    self.repoint(primary, &upstream, &vars).await
                } else {
                    self.rejoin(primary, &upstream, &vars).await
                }
            }
            other => Err(OpError {
                op: ops::Op::Hook,
                step: "dispatch",
                kind: ops::OpErrorKind::WrongState(format!("not an agent step: {}", step_name(other))),
            }),
        };
        match &outcome {
            Ok(detail) => tracing::info!(step = step_name(step), term, "database order done: {detail}"),
            Err(e) => tracing::warn!(step = step_name(step), term, "database order failed: {e}"),
        }
        outcome.map_err(|e| describe_error(&e))
    }

    fn hook(&self, kind: HookKind) -> Option<&Hooks> {
        self.hooks.as_ref().filter(|h| h.command(kind).is_some())
    }

    /// The fence: the `fence` hook if configured, else `ops::fence`.
    async fn fence(&self, vars: &BTreeMap<String, String>) -> Result<String, OpError> {
        if let Some(h) = self.hook(HookKind::Fence) {
            return run_hook(h, HookKind::Fence, vars).await;
        }
        let r = ops::fence(&self.local, FENCE_TIMEOUT).await?;
        let first = if r.made_read_only {
            format!("made read-only ({} client session(s) cut), then ", r.sessions_terminated)
        } else {
            "not reachable for read-only, ".to_string()
        };
        let stop = match r.stop {
            ops::StopOutcome::AlreadyStopped => "already stopped",
            ops::StopOutcome::Fast => "stopped (fast)",
            ops::StopOutcome::Immediate => "stopped (immediate)",
        };
        Ok(format!("fenced: {first}{stop}"))
    }

    async fn repoint(
        &self,
        primary: &str,
        upstream: &Upstream,
        vars: &BTreeMap<String, String>,
    ) -> Result<String, OpError> {
        if let Some(h) = self.hook(HookKind::Repoint) {
            return run_hook(h, HookKind::Repoint, vars).await;
        }
        ops::repoint(&self.local.target, upstream, &self.local.name, REPOINT_TIMEOUT).await?;
        Ok(format!("streaming from {primary} at {}:{}", upstream.host, upstream.port))
    }

    async fn rejoin(
        &self,
        primary: &str,
        upstream: &Upstream,
        vars: &BTreeMap<String, String>,
    ) -> Result<String, OpError> {
        if let Some(h) = self.hook(HookKind::Repoint) {
            // Engines behind hooks have no pg_rewind: rejoining is demoting the old
            // primary and pointing it at the new one.
            let mut out = String::new();
            if let Some(d) = self.hook(HookKind::Demote) {
                out = run_hook(d, HookKind::Demote, vars).await? + "; ";
            }
            return Ok(out + &run_hook(h, HookKind::Repoint, vars).await?);
        }
        let source = PgTarget {
            host: upstream.host.clone(),
            port: upstream.port,
            user: self.local.target.user.clone(),
            dbname: self.local.target.dbname.clone(),
            password: None,
        };
        // The server may send a rejoin again before it has seen the first one's effect
        // (its view of this member is a report old); a replica already streaming from
        // the new primary is left running instead of being stopped and rewound twice.
        let want = format!("{}:{}", upstream.host, upstream.port);
        if let Ok(st) = probe::probe(&self.local.target, Duration::from_secs(1)).await
            && st.role == Role::Replica
            && st.wal_receiver_streaming
            && st.upstream.as_deref() == Some(want.as_str())
        {
            return Ok(format!("already a replica streaming from {primary} at {want}"));
        }
        let r = ops::rejoin_as_replica(&self.local, &source, upstream, REJOIN_TIMEOUT).await?;
        let rewind = if r.rewound { "rewound" } else { "no rewind needed" };
        Ok(format!("rejoined as a replica of {primary} at {}:{} ({rewind})", upstream.host, upstream.port))
    }
}

/// Routes a database frame from the session that carried it (`generation`). Orders
/// are checked here and queued; refusals are answered at once.
pub(crate) fn on_message(db: &Db, msg: ServerMessage, generation: u64) {
    match msg {
        ServerMessage::DbLease { cluster, term, ttl_ms } => db.on_lease(&cluster, term, ttl_ms),
        ServerMessage::DbOrder { id, cluster, term, op } => match db.admit(&cluster, term, op) {
            Ok((step, extras)) => {
                if db.orders.send(Order { id, term, step, extras, generation }).is_err() {
                    db.push_reply(generation, id, Err("the agent is stopping".into()), false);
                }
            }
            Err(refused) => {
                tracing::warn!(id, term, "database order refused: {refused}");
                db.push_reply(generation, id, Err(refused), false);
            }
        },
        _ => {}
    }
}

/// The order task: runs queued orders one at a time, in arrival order. Stops taking
/// orders when the agent stops; one under way is not awaited by shutdown.
pub(crate) async fn run_orders(shared: Arc<Shared>, db: Arc<Db>, mut queue: mpsc::UnboundedReceiver<Order>) {
    loop {
        let order = tokio::select! {
            () = shared.stopped() => return,
            order = queue.recv() => match order {
                Some(o) => o,
                None => return,
            },
        };
        let result = db.execute(order.term, &order.step, order.extras).await;
        db.push_reply(order.generation, order.id, result, true);
    }
}

/// The probe loop and lease watchdog; ends when the agent stops.
pub(crate) async fn run(shared: Arc<Shared>, db: Arc<Db>) {
    let timeout = probe_timeout(db.probe_interval);
    let mut tick = tokio::time::interval(db.probe_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stop = shared.stopped();
    tokio::pin!(stop);
    // A self-fence was reported critical and awaits its OK.
    let mut self_fenced = false;
    // The replication timeouts were checked since the server last loaded its
    // configuration; a restart (or a rebuilt data dir) or a reload may bring other
    // values back, and each moves `pg_conf_load_time()`.
    let mut timeouts_checked = db.replication_timeout_ms == 0;
    let mut timeouts_retry_at = Instant::now();
    let mut conf_loaded_ms = None;
    loop {
        let lease_due = db.lease_deadline();
        let probe = tokio::select! {
            () = &mut stop => return,
            _ = tick.tick() => true,
            () = db.probe_now.notified() => true,
            () = tokio::time::sleep_until(lease_due.unwrap_or_else(Instant::now)), if lease_due.is_some() => true,
            // Only re-plans the wake-up: renewals come often and need no probe.
            () = db.lease_changed.notified() => false,
        };
        if !probe {
            continue;
        }
        let orders_before = db.out().orders_done;
        let probed = tokio::select! {
            () = &mut stop => return,
            r = probe::probe(&db.local.target, timeout) => r,
        };
        if let Ok(status) = &probed {
            let lease = db.terms().lease;
            // `lease_verdict` demotes a writable primary without any lease; the agent
            // applies it only once a lease was granted (see the module docs).
            match lease.map(|l| lease_verdict(status, Some(&l), db.now_ms())) {
                Some(LeaseVerdict::Demote { reason }) => {
                    self_fence(&shared, &db, &reason, &mut self_fenced).await;
                    // The status above predates the fence; report what follows it.
                    db.probe_now.notify_one();
                    continue;
                }
                _ if self_fenced && (status.role == Role::Replica || status.accepting_writes) => {
                    self_fenced = false;
                    let role = if status.role == Role::Replica { "replica" } else { "primary under a valid lease" };
                    enqueue_lease_result(&shared, Status::Ok, format!("{} answers again as a {role}", db.local.name));
                }
                _ => {}
            }
        }
        // After the lease verdict, so a check on a server that just came back never
        // delays a self-fence; a failure (say, a user that may not ALTER SYSTEM) is
        // retried after TIMEOUTS_RETRY, not on every probe.
        if let Ok(status) = &probed
            && status.conf_loaded_ms != conf_loaded_ms
        {
            // A restart quicker than a probe interval, or a reload, is seen here; the
            // agent's own reload after setting the values costs one more (unchanged) read.
            conf_loaded_ms = status.conf_loaded_ms;
            timeouts_checked = db.replication_timeout_ms == 0;
            timeouts_retry_at = Instant::now();
        }
        match &probed {
            Ok(_) if !timeouts_checked && Instant::now() >= timeouts_retry_at => {
                let ms = db.replication_timeout_ms;
                match drover_db::ops::ensure_replication_timeouts(&db.local.target, ms, timeout).await {
                    Ok(changed) => {
                        timeouts_checked = true;
                        if changed {
                            tracing::info!(member = %db.local.name, ms, "set wal_receiver_timeout and wal_sender_timeout");
                        }
                    }
                    Err(e) => {
                        timeouts_retry_at = Instant::now() + TIMEOUTS_RETRY;
                        tracing::warn!(member = %db.local.name, "replication timeouts not set (retrying in {TIMEOUTS_RETRY:?}): {e}")
                    }
                }
            }
            _ => {}
        }
        db.push_report(orders_before, &probed);
    }
}

/// How long after a failed attempt the agent tries again to set the replication timeouts.
const TIMEOUTS_RETRY: Duration = Duration::from_secs(30);

/// Fences from the probe task, not through the order queue: self-demotion must never
/// wait behind an order (a rejoin can run for minutes), and every order copes with a
/// stopped server.
/// min(interval, 1 s) keeps a report's view fresh and the lapse check quick (the fence
/// budget is 1 s), but never below 250 ms: on a loaded machine connect plus the probe's
/// queries routinely take over 100 ms, and a probe failing for that reads as a dead server.
fn probe_timeout(interval: Duration) -> Duration {
    interval.min(Duration::from_secs(1)).max(Duration::from_millis(250))
}

async fn self_fence(shared: &Shared, db: &Db, reason: &str, self_fenced: &mut bool) {
    tracing::error!(member = %db.local.name, "{reason}: fencing the local PostgreSQL (self-demotion)");
    let vars = BTreeMap::from([
        ("member".to_string(), db.local.name.clone()),
        ("cluster".to_string(), db.cluster.clone()),
        ("term".to_string(), db.terms().lease.map(|l| l.term).unwrap_or_default().to_string()),
    ]);
    let outcome = db.fence(&vars).await;
    let output = match &outcome {
        Ok(detail) => {
            tracing::error!(member = %db.local.name, "self-demotion: {detail}");
            format!("{reason}; the agent fenced its PostgreSQL: {detail}")
        }
        // Retried on the next probe while the server still answers as a writable primary.
        Err(e) => {
            tracing::error!(member = %db.local.name, "self-demotion failed, retrying at the next probe: {e}");
            format!("{reason}; fencing the PostgreSQL failed (retrying): {e}")
        }
    };
    if !*self_fenced {
        *self_fenced = true;
        enqueue_lease_result(shared, Status::Critical, output);
    }
}

fn enqueue_lease_result(shared: &Shared, status: Status, output: String) {
    let now = drover_core::time::now_ms();
    shared.outbox.enqueue(CheckResult::made_by_drover(&shared.entity.name, LEASE_CHECK, status, output, now));
}

/// The member an agent step is aimed at; `None` for the server's own steps.
fn step_member(step: &Step) -> Option<&str> {
    match step {
        Step::FenceAgent { member }
        | Step::MakeReadOnly { member }
        | Step::MakeWritable { member }
        | Step::Promote { member, .. }
        | Step::Repoint { member, .. }
        | Step::Rejoin { member, .. } => Some(member),
        _ => None,
    }
}

fn step_name(step: &Step) -> &'static str {
    match step {
        Step::CompareAndSwapLeader { .. } => "compare_and_swap_leader",
        Step::FenceProxy { .. } => "fence_proxy",
        Step::FenceAgent { .. } => "fence_agent",
        Step::MakeReadOnly { .. } => "make_read_only",
        Step::WaitCatchUp { .. } => "wait_catch_up",
        Step::Promote { .. } => "promote",
        Step::Repoint { .. } => "repoint",
        Step::Rejoin { .. } => "rejoin",
        Step::MakeWritable { .. } => "make_writable",
        Step::PublishRoles { .. } => "publish_roles",
        Step::RecordEvent { .. } => "record_event",
    }
}

/// `host:port` (or `[v6]:port`) of `primary` from the order's `primary_addr`.
fn primary_addr(primary: &str, addr: Option<&str>) -> Result<(String, u16), String> {
    let addr = addr.ok_or_else(|| {
        format!("the order lacks `primary_addr` (host:port of {primary}'s PostgreSQL), which the server must add")
    })?;
    let bad = || format!("`primary_addr` {addr:?} is not host:port");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

async fn run_hook(hooks: &Hooks, kind: HookKind, vars: &BTreeMap<String, String>) -> Result<String, OpError> {
    let out = hooks.run(kind, vars).await?;
    let said = out.stdout.trim();
    Ok(if said.is_empty() { format!("{kind:?} hook ran") } else { format!("{kind:?} hook ran: {said}") })
}

/// An operation's error for the server, saying whether retrying the order can help.
fn describe_error(e: &OpError) -> String {
    if e.retryable() { format!("{e} (retryable)") } else { e.to_string() }
}

fn stale(term: u64, known: u64) -> String {
    format!("stale term {term}: this agent has already seen term {known}")
}

fn frame(msg: &AgentMessage) -> String {
    // Plain data types serialise infallibly; an empty frame would surface on the server.
    serde_json::to_string(msg).unwrap_or_default()
}

/// The terms saved by the agent before this one, in this process's clock.
fn restore_terms(file: &Path, cluster: &str) -> Terms {
    let saved: SavedTerms = match drover_core::state_file::read_json(file) {
        Ok(Some(s)) => s,
        Ok(None) => return Terms::default(),
        Err(e) => {
            tracing::warn!("saved database term and lease unreadable ({e}); starting unarmed");
            return Terms::default();
        }
    };
    // The new clock's zero is this moment (`Db::epoch` is taken just before).
    let Some((known, lease)) = saved.restore(cluster, 0) else {
        tracing::warn!(file = %file.display(), saved = %saved.cluster, ours = cluster, "saved terms are another cluster's; ignored");
        return Terms::default();
    };
    if let Some(l) = &lease {
        tracing::info!(
            known_term = known,
            lease_term = l.term,
            "self-demotion armed from the saved state: one lease TTL ({} ms) to be leased again",
            l.ttl_ms
        );
    }
    Terms { known, lease, saved: Some(saved), save_failing: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent's state whose data dir (and so state file) is under `dir`.
    fn db_in(dir: &Path) -> Db {
        let cfg: PostgresAgentConfig =
            serde_json::from_value(serde_json::json!({"cluster": "main", "data_dir": dir.join("data")})).unwrap();
        Db::new("pg1", &cfg).0
    }

    fn db() -> (Db, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (db_in(dir.path()), dir)
    }

    #[test]
    fn primary_addr_accepts_host_port_and_bracketed_ipv6() {
        assert_eq!(primary_addr("pg1", Some("10.0.0.2:5433")).unwrap(), ("10.0.0.2".into(), 5433));
        assert_eq!(primary_addr("pg1", Some("[::1]:5432")).unwrap(), ("::1".into(), 5432));
        assert!(primary_addr("pg1", None).unwrap_err().contains("primary_addr"));
        assert!(primary_addr("pg1", Some("db-host")).is_err());
        assert!(primary_addr("pg1", Some(":5432")).is_err());
    }

    #[test]
    fn probes_are_bounded_by_the_interval_within_250_ms_to_1_s() {
        assert_eq!(probe_timeout(Duration::from_millis(500)), Duration::from_millis(500));
        assert_eq!(probe_timeout(Duration::from_millis(50)), Duration::from_millis(250));
        assert_eq!(probe_timeout(Duration::from_secs(5)), Duration::from_secs(1));
    }

    #[test]
    fn only_steps_aimed_at_an_agent_name_a_member() {
        let promote = Step::Promote { member: "pg1".into(), synchronous_standby_names: String::new() };
        assert_eq!(step_member(&promote), Some("pg1"));
        assert_eq!(step_member(&Step::RecordEvent { message: "x".into() }), None);
        assert_eq!(step_member(&Step::FenceProxy { member: "pg1".into() }), None);
    }

    #[test]
    fn replies_go_only_to_the_connection_that_carried_the_order() {
        let (db, _dir) = db();
        let first = db.session_started();
        db.session_ended();
        let second = db.session_started();
        db.push_reply(first, 1, Ok("done".into()), true);
        assert!(db.take_frames(second).is_empty(), "a reply for a closed connection is dropped");
        db.push_reply(second, 2, Ok("done".into()), true);
        let frames = db.take_frames(second);
        assert_eq!(frames.len(), 1);
        assert!(frames[0].contains("\"id\":2"), "{}", frames[0]);
    }

    #[test]
    fn a_report_probed_across_an_order_or_while_disconnected_is_dropped() {
        let (db, _dir) = db();
        let status = Ok(DbStatus::default());
        db.push_report(0, &status);
        assert!(!db.has_frames(), "disconnected: nothing is queued");
        let g = db.session_started();
        db.push_reply(g, 1, Ok("done".into()), true);
        db.push_report(0, &status);
        assert_eq!(db.take_frames(g).len(), 1, "only the reply; the report predates the order");
        db.push_report(1, &status);
        db.push_report(1, &status);
        assert_eq!(db.take_frames(g).len(), 1, "only the latest report is kept");
    }

    #[test]
    fn the_highest_term_from_orders_and_leases_refuses_older_ones() {
        let (db, _dir) = db();
        let fence = || serde_json::json!({"step": "fence_agent", "member": "pg1"});
        assert!(db.admit("main", 3, fence()).is_ok());
        assert!(db.admit("other", 9, fence()).is_err());
        assert!(db.admit("main", 9, serde_json::json!({"step": "nope"})).is_err());
        assert_eq!(db.terms().known, 3, "refused orders do not raise the term");
        db.on_lease("main", 5, 1000);
        assert!(db.admit("main", 4, fence()).unwrap_err().contains("stale term 4"));
        db.on_lease("main", 4, 1000);
        assert_eq!(db.terms().lease.unwrap().term, 5, "an older lease does not replace a newer one");
        db.on_lease("other", 9, 1000);
        assert_eq!(db.terms().known, 5, "another cluster's lease is ignored");
    }

    #[test]
    fn a_restarted_agent_keeps_the_term_it_knew_and_the_lease_it_held() {
        let dir = tempfile::tempdir().unwrap();
        let fence = || serde_json::json!({"step": "fence_agent", "member": "pg1"});
        let before = db_in(dir.path());
        before.on_lease("main", 5, 60_000);
        assert!(before.admit("main", 7, fence()).is_ok());
        drop(before);
        assert!(dir.path().join("data.drover-agent.json").exists(), "saved beside the data dir");

        let after = db_in(dir.path());
        assert_eq!(after.terms().known, 7);
        let lease = after.terms().lease.expect("the watchdog is armed again");
        assert_eq!((lease.term, lease.expires_at_ms), (5, 60_000), "one TTL from the new process's start");
        assert!(after.admit("main", 6, fence()).unwrap_err().contains("stale term 6"));
    }

    #[test]
    fn a_promotion_disarms_the_saved_lease_too() {
        let dir = tempfile::tempdir().unwrap();
        let before = db_in(dir.path());
        before.on_lease("main", 2, 60_000);
        before.disarm_after_becoming_writable(3);
        drop(before);
        let after = db_in(dir.path());
        assert!(after.terms().lease.is_none(), "disarmed stays disarmed across a restart");
        assert_eq!(after.terms().known, 2);
    }

    #[test]
    fn an_unreadable_state_file_starts_the_agent_unarmed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.drover-agent.json"), b"{ not json").unwrap();
        let broken = db_in(dir.path());
        assert!(broken.terms().lease.is_none() && broken.terms().known == 0);
    }
}
