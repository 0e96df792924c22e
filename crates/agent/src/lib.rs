//! drover-agent: registers a node with the server, sends keepalives, runs Nagios-style
//! checks and delivers their results at least once.
//!
//! One process holds one long-lived WebSocket to the server (see
//! [`drover_core::protocol`]). Everything else feeds the result buffer that connection
//! drains:
//!
//! - `connection.rs`: URL normalisation, the WebSocket session (hello,
//!   welcome, keepalives, acks, check requests), jittered reconnect, and the shutdown
//!   drain (flush, wait for acks, deregister, close).
//! - `outbox.rs`: the bounded buffer of unacknowledged results and the
//!   per-process sequence numbers that make re-sends idempotent on the server.
//! - `executor.rs`: runs one check: token substitution, `sh -c` in its own
//!   process group, stdin, timeout (kills the whole group), bounded output capture.
//! - `scheduler.rs`: decides when checks run: server requests (after
//!   their splay) and local checks on an interval or cron schedule, under one
//!   concurrency limit.
//! - `api.rs`: the loopback HTTP endpoint scripts POST results to.
//! - `system.rs`: host facts for the hello and metrics for keepalives.
//! - `database.rs`: only with `[postgres]`: probes the local PostgreSQL and reports it
//!   (`DbReport`), runs the server's database orders, and fences a primary whose lease
//!   from the server lapsed (self-demotion).
//!
//! The design is current-thread friendly: a handful of tasks that sleep until a timer,
//! a frame or a result wakes them, and no blocking work beyond short `/proc` reads.
#![forbid(unsafe_code)]

mod api;
mod connection;
mod database;
mod executor;
mod outbox;
mod scheduler;
mod system;

use drover_core::config::AgentConfig;
use drover_core::resource::{CheckSpec, Entity, EntityClass};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

/// Why the agent could not start, or why it stopped by itself.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration cannot work (bad URL, bad token characters, bad schedule…).
    #[error("agent config: {0}")]
    Config(String),
    /// The server answered the WebSocket upgrade with 401/403: the token is wrong or
    /// revoked. The running agent does not stop for this (see [`AgentHandle::wait`]);
    /// the variant names the class for callers that report or map errors.
    #[error("the server refused the agent token (HTTP {status}); check the agent's `token`")]
    AuthRefused { status: u16 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The server spoke something other than the drover agent protocol. Like a
    /// refused token, the running agent logs this and reconnects rather than stopping.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An agent task panicked or was cancelled; a bug, not an environment problem.
    #[error("internal agent error: {0}")]
    Internal(String),
}

/// State every agent task reads; created once in [`start`].
pub(crate) struct Shared {
    pub entity: Entity,
    pub outbox: outbox::Outbox,
    pub connected: AtomicBool,
    /// Bounds concurrently running check commands (server requests and local checks).
    pub check_slots: Semaphore,
    pub output_limit_bytes: usize,
    pub shutdown: watch::Receiver<bool>,
    pub auth_refusals: AtomicU64,
    /// Present only with `[postgres]`; without it no database task runs.
    pub db: Option<Arc<database::Db>>,
}

impl Shared {
    /// Resolves once shutdown is requested, or the handle was dropped (which also
    /// means nobody can ask for a clean stop any more).
    pub async fn stopped(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    pub fn is_stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// A running agent. Dropping it stops the agent's tasks too (without waiting for them).
pub struct AgentHandle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    api_addr: Option<SocketAddr>,
    connection: Option<Task>,
    api: Option<Task>,
    local_checks: Vec<JoinHandle<()>>,
    database: Option<JoinHandle<()>>,
}

/// Upper bound for [`AgentHandle::shutdown`]: ack wait (2 s) plus connect, deregister
/// and close, each with its own smaller limit.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);

/// Validates `cfg`, binds the local API (if enabled) and starts the agent's tasks on the
/// current tokio runtime. Connecting to the server happens in the background: an
/// unreachable server is retried forever, not an error here.
pub async fn start(cfg: AgentConfig) -> Result<AgentHandle, AgentError> {
    cfg.validate().map_err(|e| AgentError::Config(e.to_string()))?;
    let server =
        cfg.server.as_deref().ok_or_else(|| AgentError::Config("`server` is required (ws://host:port)".into()))?;
    let target = connection::Target::with_ca(server, cfg.token.as_deref(), cfg.ca_file.as_deref())?;
    let checks = local_checks(&cfg)?;

    let mut sampler = system::Sampler::new();
    let name = match &cfg.name {
        Some(n) => n.clone(),
        None => system::hostname().ok_or_else(|| {
            AgentError::Config("cannot determine the hostname; set `name` in the agent config".into())
        })?,
    };
    drover_core::resource::validate_name("name", &name)
        .map_err(|e| AgentError::Config(format!("agent name from hostname: {e}")))?;
    let mut entity = Entity::new(&name, EntityClass::Agent);
    entity.address = cfg.address.clone().or_else(|| sampler.primary_address());
    entity.subscriptions = cfg.subscriptions.clone();
    entity.labels = cfg.labels.clone();
    entity.deregister = cfg.deregister;
    entity.keepalive_interval_secs = Some(cfg.keepalive_interval_secs);
    entity.keepalive_warning_secs = cfg.keepalive_warning_secs;
    entity.keepalive_critical_secs = cfg.keepalive_critical_secs;
    entity.system = Some(sampler.facts());

    let (db, db_orders) = match &cfg.postgres {
        Some(pg) => {
            let (db, queue) = database::Db::new(&name, pg);
            (Some(Arc::new(db)), Some(queue))
        }
        None => (None, None),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        entity,
        outbox: outbox::Outbox::new(cfg.buffer_max_results),
        connected: AtomicBool::new(false),
        check_slots: Semaphore::new(cfg.max_concurrent_checks),
        output_limit_bytes: cfg.output_limit_bytes,
        shutdown: shutdown_rx,
        auth_refusals: AtomicU64::new(0),
        db,
    });

    // Bind before spawning anything, so a busy port is reported to the caller instead
    // of surfacing later as a background failure.
    let (api, api_addr) = if cfg.api_listen.is_empty() {
        (None, None)
    } else {
        let listener = api::bind(&cfg.api_listen).await?;
        let addr = listener
            .local_addr()
            .map_err(|source| AgentError::Io { context: format!("local API on `{}`", cfg.api_listen), source })?;
        let task = tokio::spawn(api::serve(listener, shared.clone()));
        (Some(task), Some(addr))
    };

    let settings = connection::Settings {
        target,
        keepalive_interval: Duration::from_secs(cfg.keepalive_interval_secs),
        deregister: cfg.deregister,
    };
    let connection = tokio::spawn(connection::run(shared.clone(), settings, sampler));
    let local_checks = checks
        .into_iter()
        .map(|(check, schedule)| tokio::spawn(scheduler::run_local(shared.clone(), check, schedule)))
        .collect();
    let database = match (shared.db.clone(), db_orders) {
        (Some(db), Some(queue)) => {
            tokio::spawn(database::run_orders(shared.clone(), db.clone(), queue));
            Some(tokio::spawn(database::run(shared.clone(), db)))
        }
        _ => None,
    };

    tracing::info!(entity = %shared.entity.name, server = %server, api = ?api_addr, "agent started");
    Ok(AgentHandle {
        shared,
        shutdown: shutdown_tx,
        api_addr,
        connection: Some(connection),
        api,
        local_checks,
        database,
    })
}

/// Local checks with their names filled in and schedules parsed, so a bad cron
/// expression fails `start` rather than a background task.
fn local_checks(cfg: &AgentConfig) -> Result<Vec<(CheckSpec, scheduler::Schedule)>, AgentError> {
    cfg.checks
        .iter()
        .map(|(key, check)| {
            let mut check = check.clone();
            if check.name.is_empty() {
                check.name = key.clone();
            }
            let bad = |m: String| AgentError::Config(format!("local check `{key}`: {m}"));
            check.validate().map_err(|e| bad(e.to_string()))?;
            let schedule = scheduler::Schedule::of(&check).map_err(bad)?;
            Ok((check, schedule))
        })
        .collect()
}

impl AgentHandle {
    /// The loopback HTTP endpoint actually bound (None if `api_listen` is "").
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// How many connection attempts the server refused with HTTP 401/403 so far.
    pub fn auth_refusals(&self) -> u64 {
        self.shared.auth_refusals.load(Ordering::Relaxed)
    }

    /// Clean stop: stop scheduling (running check commands are killed), stop the local
    /// API, flush buffered results and wait up to ~2 s for their acks, send
    /// `Deregister` if configured, then close the socket.
    pub async fn shutdown(mut self) -> Result<(), AgentError> {
        let _ = self.shutdown.send(true);
        for task in self.local_checks.drain(..) {
            // Local check tasks only wait on timers and child processes; both end at
            // once on shutdown, so a join error here means a panic worth reporting.
            if let Err(e) = task.await {
                tracing::error!("local check task failed: {e}");
            }
        }
        if let Some(db) = self.database.take() {
            // The probe loop ends at once on shutdown (it selects on it, mid-probe too);
            // a self-fence under way is allowed its budget.
            if let Err(e) = db.await {
                tracing::error!("database task failed: {e}");
            }
        }
        let mut outcome = Ok(());
        if let Some(api) = self.api.take() {
            outcome = join_limited(api, Duration::from_secs(2), "local API").await;
        }
        if let Some(conn) = self.connection.take() {
            let conn_outcome = join_limited(conn, SHUTDOWN_LIMIT, "connection").await;
            outcome = outcome.and(conn_outcome);
        }
        tracing::info!("agent stopped");
        outcome
    }

    /// Resolves if the agent stops by itself: a fatal error such as a `wss://` server
    /// with no TLS support built in, or the local API failing. A server refusing the
    /// token is *not* fatal: it is logged as an error on every attempt, counted in
    /// [`AgentHandle::auth_refusals`], and retried, so fixing the token on the server
    /// heals the agent without a restart.
    pub async fn wait(&mut self) -> Result<(), AgentError> {
        if self.connection.is_none() && self.api.is_none() {
            return Ok(());
        }
        tokio::select! {
            r = join_once(&mut self.connection) => flatten(r, "connection"),
            r = join_once(&mut self.api) => flatten(r, "local API"),
        }
    }
}

type Task = JoinHandle<Result<(), AgentError>>;

/// Awaits a task that may already have been collected; a collected (or absent) task
/// never resolves, so `select!` waits on the others.
async fn join_once(task: &mut Option<Task>) -> Result<Result<(), AgentError>, tokio::task::JoinError> {
    match task {
        Some(t) => {
            let r = t.await;
            *task = None;
            r
        }
        None => std::future::pending().await,
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn join_limited(mut task: Task, limit: Duration, what: &str) -> Result<(), AgentError> {
    match tokio::time::timeout(limit, &mut task).await {
        Ok(r) => flatten(r, what),
        Err(_) => {
            tracing::warn!("{what} did not stop within {limit:?}; aborting it");
            task.abort();
            Ok(())
        }
    }
}

fn flatten(r: Result<Result<(), AgentError>, tokio::task::JoinError>, what: &str) -> Result<(), AgentError> {
    r.unwrap_or_else(|e| Err(AgentError::Internal(format!("{what} task: {e}"))))
}
