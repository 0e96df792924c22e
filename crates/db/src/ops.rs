//! What an agent does to its local PostgreSQL when the server orders it.
//!
//! | operation | how |
//! |---|---|
//! | [`promote`] | clears any fence, sets `synchronous_standby_names`, `pg_promote(wait => true)` |
//! | [`fence`] | if reachable: read-only at once + cut client sessions; then `pg_ctl stop` (fast, else immediate) |
//! | [`set_read_only`] | `default_transaction_read_only` on/off + reload (+ cut sessions when on) |
//! | [`repoint`] | `ALTER SYSTEM SET primary_conninfo` + reload (PostgreSQL ≥ 13 applies it without restart) |
//! | [`rejoin_as_replica`] | stop, `pg_rewind` from the new primary, `standby.signal` + `primary_conninfo`, start |
//! | [`set_synchronous_standby_names`] | `ALTER SYSTEM` + reload |
//! | [`wait_caught_up`] | polls until a replica has replayed the (read-only) primary's current LSN (switchover) |
//! | [`start`], [`stop`] | `pg_ctl` |
//! | [`Hooks`] | operator command lines instead of the above, for engines other than PostgreSQL |
//!
//! Every operation is idempotent where it can be (promoting a primary, stopping a
//! stopped server and fencing twice succeed), because the server retries after a lost
//! reply. Failures are [`OpError`]s naming the operation and step, and
//! [`OpError::retryable`] says whether trying again can help.
//!
//! `default_transaction_read_only` is the fast first half of a fence, not the fence:
//! a client can still `SET` it back. Stopping the server is what guarantees no write.

use crate::probe::{PgTarget, ProbeError, conninfo_value};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// Where a replica streams from (what goes into `primary_conninfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    /// A role with REPLICATION LOGIN.
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

impl Upstream {
    /// `primary_conninfo` naming this replica `application_name` (what
    /// `synchronous_standby_names` and `pg_stat_replication` know it by).
    pub fn conninfo(&self, application_name: &str) -> String {
        let mut s = format!(
            "host={} port={} user={} application_name={}",
            conninfo_value(&self.host),
            self.port,
            conninfo_value(&self.user),
            conninfo_value(application_name)
        );
        if let Some(p) = &self.password {
            s.push_str(&format!(" password={}", conninfo_value(p)));
        }
        s
    }
}

/// A PostgreSQL server on this machine, as the agent controls it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalPg {
    /// Member name; also its `application_name` as a standby.
    pub name: String,
    /// Directory of `pg_ctl`, `pg_rewind` (Debian: `/usr/lib/postgresql/15/bin`).
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    /// OS user to run the server tools as when the agent runs as root (`postgres`).
    pub run_as: Option<String>,
    /// `pg_ctl -o` options (settings that must not live in copied config files).
    pub start_options: Option<String>,
    /// `pg_ctl -l` server log.
    pub log_file: Option<PathBuf>,
    /// How to connect to it as a superuser.
    pub target: PgTarget,
}

/// Which operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Promote,
    Fence,
    SetReadOnly,
    Repoint,
    Rejoin,
    SetSynchronousStandbyNames,
    CatchUp,
    TuneTimeouts,
    Start,
    Stop,
    Hook,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Op::Promote => "promote",
            Op::Fence => "fence",
            Op::SetReadOnly => "set read-only",
            Op::Repoint => "repoint",
            Op::Rejoin => "rejoin as replica",
            Op::SetSynchronousStandbyNames => "set synchronous_standby_names",
            Op::CatchUp => "wait for catch-up",
            Op::TuneTimeouts => "set replication timeouts",
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Hook => "hook",
        };
        f.write_str(s)
    }
}

/// An operation that failed: which one, at which step, and why.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed at step `{step}`: {kind}")]
pub struct OpError {
    pub op: Op,
    pub step: &'static str,
    pub kind: OpErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum OpErrorKind {
    #[error("PostgreSQL unreachable: {0}")]
    Unreachable(#[source] ProbeError),
    #[error("SQL error: {detail}")]
    Sql { detail: String, connection_lost: bool },
    #[error("no result within {0:?}")]
    Timeout(Duration),
    #[error("`{command}` exited with {status}: {output}")]
    Command { command: String, status: String, output: String },
    #[error("cannot run `{command}`: {error}")]
    Spawn { command: String, error: String },
    #[error("pg_rewind failed, so this member must stay fenced until it is rebuilt (pg_basebackup): {output}")]
    RewindFailed { output: String },
    #[error("{0}")]
    WrongState(String),
    #[error("missing value(s) for {}", .0.join(", "))]
    MissingVars(Vec<String>),
    #[error("cannot write {path}: {error}")]
    File { path: String, error: String },
}

impl OpError {
    fn new(op: Op, step: &'static str, kind: OpErrorKind) -> Self {
        OpError { op, step, kind }
    }

    /// Whether the same call can succeed later without someone changing something:
    /// unreachable servers, timeouts, dropped connections and failed commands can;
    /// a failed rewind, a wrong role, a missing binary or hook variable cannot.
    pub fn retryable(&self) -> bool {
        match &self.kind {
            OpErrorKind::Unreachable(_) | OpErrorKind::Timeout(_) | OpErrorKind::Command { .. } => true,
            OpErrorKind::Sql { connection_lost, .. } => *connection_lost,
            OpErrorKind::Spawn { .. }
            | OpErrorKind::RewindFailed { .. }
            | OpErrorKind::WrongState(_)
            | OpErrorKind::MissingVars(_)
            | OpErrorKind::File { .. } => false,
        }
    }
}

fn sql_err(op: Op, step: &'static str) -> impl Fn(tokio_postgres::Error) -> OpError {
    move |e| {
        let connection_lost = e.is_closed() || e.as_db_error().is_none();
        OpError::new(op, step, OpErrorKind::Sql { detail: e.to_string(), connection_lost })
    }
}

async fn connect(op: Op, target: &PgTarget, timeout: Duration) -> Result<tokio_postgres::Client, OpError> {
    target.connect(timeout).await.map_err(|e| OpError::new(op, "connect", OpErrorKind::Unreachable(e)))
}

async fn within<T>(
    op: Op,
    step: &'static str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, OpError>>,
) -> Result<T, OpError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(OpError::new(op, step, OpErrorKind::Timeout(timeout))))
}

/// A SQL string literal; E'' form when backslashes are present so the value means
/// the same whatever `standard_conforming_strings` is.
pub fn quote_literal(v: &str) -> String {
    if v.contains('\\') {
        format!("E'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", v.replace('\'', "''"))
    }
}

/// A SQL identifier, always double-quoted (member names may have dashes).
pub fn quote_ident(v: &str) -> String {
    format!("\"{}\"", v.replace('"', "\"\""))
}

/// `synchronous_standby_names` value requiring `count` of `names` (priority order) to
/// confirm each commit: `FIRST 1 ("pg1", "pg2")`; empty `names` → `''` (asynchronous).
pub fn synchronous_standby_names_value(count: usize, names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let list = names.iter().map(|n| quote_ident(n)).collect::<Vec<_>>().join(", ");
    format!("FIRST {} ({list})", count.clamp(1, names.len()))
}

async fn alter_and_reload(
    client: &tokio_postgres::Client,
    op: Op,
    settings: &[(&str, Option<&str>)],
) -> Result<(), OpError> {
    for (name, value) in settings {
        // ALTER SYSTEM refuses transaction blocks, so one statement per simple query.
        let sql = match value {
            Some(v) => format!("ALTER SYSTEM SET {name} = {}", quote_literal(v)),
            None => format!("ALTER SYSTEM RESET {name}"),
        };
        client.batch_execute(&sql).await.map_err(sql_err(op, "alter system"))?;
    }
    client.batch_execute("SELECT pg_reload_conf()").await.map_err(sql_err(op, "reload"))
}

async fn in_recovery(client: &tokio_postgres::Client, op: Op) -> Result<bool, OpError> {
    let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(sql_err(op, "check role"))?;
    Ok(row.get(0))
}

/// Promotes a replica: clears a fence left by [`set_read_only`], sets
/// `synchronous_standby_names` (when given) so the new primary's commit rule is in force
/// from its first write, then `pg_promote(wait => true)`. A server that is already a
/// primary succeeds (a retried promote).
pub async fn promote(
    target: &PgTarget,
    synchronous_standby_names: Option<&str>,
    timeout: Duration,
) -> Result<(), OpError> {
    let op = Op::Promote;
    within(op, "pg_promote", timeout, async {
        let client = connect(op, target, timeout).await?;
        if !in_recovery(&client, op).await? {
            return Ok(());
        }
        let mut settings = vec![("default_transaction_read_only", None)];
        if let Some(names) = synchronous_standby_names {
            settings.push(("synchronous_standby_names", Some(names)));
        }
        alter_and_reload(&client, op, &settings).await?;
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let row = client.query_one("SELECT pg_promote(true, $1)", &[&secs]).await.map_err(sql_err(op, "pg_promote"))?;
        if row.get::<_, bool>(0) { Ok(()) } else { Err(OpError::new(op, "pg_promote", OpErrorKind::Timeout(timeout))) }
    })
    .await
}

/// Turns `default_transaction_read_only` on or off (persisted, reloaded). Turning it on
/// also terminates every other client session, whose open transactions could still
/// write; returns how many were cut.
pub async fn set_read_only(target: &PgTarget, on: bool, timeout: Duration) -> Result<u64, OpError> {
    let op = Op::SetReadOnly;
    within(op, "default_transaction_read_only", timeout, async {
        let client = connect(op, target, timeout).await?;
        alter_and_reload(&client, op, &[("default_transaction_read_only", on.then_some("on"))]).await?;
        if !on {
            return Ok(0);
        }
        let row = client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .map_err(sql_err(op, "terminate sessions"))?;
        Ok(row.get::<_, i64>(0) as u64)
    })
    .await
}

/// What [`fence`] managed to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceReport {
    /// The server answered and was made read-only before it stopped.
    pub made_read_only: bool,
    pub sessions_terminated: u64,
    pub stop: StopOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    AlreadyStopped,
    /// Clean shutdown: connected standbys received all WAL first.
    Fast,
    /// Fast did not finish in time; killed without a shutdown checkpoint.
    Immediate,
}

/// Fences the local server: if it answers, read-only at once and sessions cut, so
/// writes stop before the slower shutdown; then stops it (fast, then immediate if fast
/// does not finish in half the `timeout`).
pub async fn fence(local: &LocalPg, timeout: Duration) -> Result<FenceReport, OpError> {
    let quick = timeout.min(Duration::from_secs(2));
    let (made_read_only, sessions_terminated) = match set_read_only(&local.target, true, quick).await {
        Ok(n) => (true, n),
        Err(e) => {
            tracing::info!(member = %local.name, error = %e, "fence: not reachable for read-only, stopping anyway");
            (false, 0)
        }
    };
    let stop = stop(local, timeout).await.map_err(|e| OpError { op: Op::Fence, ..e })?;
    Ok(FenceReport { made_read_only, sessions_terminated, stop })
}

/// Stops the server: fast shutdown, immediate when fast has not finished in half of `timeout`.
pub async fn stop(local: &LocalPg, timeout: Duration) -> Result<StopOutcome, OpError> {
    if !is_running(local, Op::Stop).await? {
        return Ok(StopOutcome::AlreadyStopped);
    }
    let half = (timeout / 2).max(Duration::from_secs(1));
    let fast = pg_ctl(local, Op::Stop, "pg_ctl stop -m fast", &["-m", "fast", "stop"], half).await;
    if fast.is_ok() || !is_running(local, Op::Stop).await? {
        return Ok(StopOutcome::Fast);
    }
    pg_ctl(local, Op::Stop, "pg_ctl stop -m immediate", &["-m", "immediate", "stop"], half).await?;
    Ok(StopOutcome::Immediate)
}

/// Starts the server and waits until it accepts connections.
pub async fn start(local: &LocalPg, timeout: Duration) -> Result<(), OpError> {
    if is_running(local, Op::Start).await? {
        return Ok(());
    }
    let mut args: Vec<String> = Vec::new();
    if let Some(log) = &local.log_file {
        args.extend(["-l".into(), log.display().to_string()]);
    }
    if let Some(o) = &local.start_options {
        args.extend(["-o".into(), o.clone()]);
    }
    args.push("start".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pg_ctl(local, Op::Start, "pg_ctl start", &args, timeout).await.map(|_| ())
}

async fn is_running(local: &LocalPg, op: Op) -> Result<bool, OpError> {
    let args = vec!["-D".into(), local.data_dir.clone().into_os_string(), "status".into()];
    let out = run_tool(local, op, "pg_ctl status", "pg_ctl", args, None).await?;
    // pg_ctl status: 0 running, 3 not running, 4 no data directory.
    match out.status.code() {
        Some(0) => Ok(true),
        Some(3) => Ok(false),
        _ => Err(command_failed("pg_ctl status", &out)),
    }
    .map_err(|kind| OpError::new(op, "pg_ctl status", kind))
}

async fn pg_ctl(
    local: &LocalPg,
    op: Op,
    step: &'static str,
    args: &[&str],
    timeout: Duration,
) -> Result<Output, OpError> {
    let mut all: Vec<OsString> = vec!["-D".into(), local.data_dir.clone().into_os_string(), "-w".into(), "-t".into()];
    all.push(timeout.as_secs().max(1).to_string().into());
    all.extend(args.iter().map(OsString::from));
    let out = run_tool(local, op, step, "pg_ctl", all, Some(timeout + Duration::from_secs(5))).await?;
    if out.status.success() { Ok(out) } else { Err(OpError::new(op, step, command_failed(step, &out))) }
}

fn command_failed(command: &str, out: &Output) -> OpErrorKind {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    OpErrorKind::Command {
        command: command.to_string(),
        status: out.status.to_string(),
        output: text.trim().to_string(),
    }
}

/// Runs a PostgreSQL tool from `bin_dir` as `run_as`, in the data dir's parent (the
/// tools check that they can read their working directory).
async fn run_tool(
    local: &LocalPg,
    op: Op,
    step: &'static str,
    tool: &str,
    args: Vec<OsString>,
    timeout: Option<Duration>,
) -> Result<Output, OpError> {
    let mut cmd = tokio::process::Command::from(run_as_command(local.run_as.as_deref(), &local.bin_dir.join(tool)));
    cmd.args(args).kill_on_drop(true);
    if let Some(parent) = local.data_dir.parent() {
        cmd.current_dir(parent);
    }
    let fut = cmd.output();
    let res = match timeout {
        Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| OpError::new(op, step, OpErrorKind::Timeout(t)))?,
        None => fut.await,
    };
    res.map_err(|e| OpError::new(op, step, OpErrorKind::Spawn { command: tool.to_string(), error: e.to_string() }))
}

/// `tool` run as `user` through `runuser` (when given), else directly.
pub(crate) fn run_as_command(user: Option<&str>, tool: &Path) -> std::process::Command {
    match user {
        Some(user) => {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", user, "--"]).arg(tool);
            cmd
        }
        None => std::process::Command::new(tool),
    }
}

/// Points a replica at another upstream without a restart. A primary is refused: it is
/// never repointed, it [rejoins](rejoin_as_replica).
pub async fn repoint(
    target: &PgTarget,
    upstream: &Upstream,
    application_name: &str,
    timeout: Duration,
) -> Result<(), OpError> {
    let op = Op::Repoint;
    within(op, "primary_conninfo", timeout, async {
        let client = connect(op, target, timeout).await?;
        if !in_recovery(&client, op).await? {
            return Err(OpError::new(
                op,
                "check role",
                OpErrorKind::WrongState("is a primary; only a replica is repointed (a primary rejoins)".into()),
            ));
        }
        alter_and_reload(&client, op, &[("primary_conninfo", Some(&upstream.conninfo(application_name)))]).await
    })
    .await
}

/// Sets `synchronous_standby_names` on a primary (see [`synchronous_standby_names_value`]).
pub async fn set_synchronous_standby_names(target: &PgTarget, value: &str, timeout: Duration) -> Result<(), OpError> {
    let op = Op::SetSynchronousStandbyNames;
    within(op, "synchronous_standby_names", timeout, async {
        let client = connect(op, target, timeout).await?;
        alter_and_reload(&client, op, &[("synchronous_standby_names", Some(value))]).await
    })
    .await
}

/// Sets `wal_receiver_timeout` and `wal_sender_timeout` to `ms` (ALTER SYSTEM, reload)
/// unless both already have it; true when something changed.
///
/// Why drover manages them: failover rule 1 waits for the replicas to say their WAL
/// receiver stopped, and a primary that is partitioned away or frozen (not crashed)
/// sends no reset, so at PostgreSQL's 60 s default its replicas report "streaming" for
/// a minute. A receiver also pings its primary after half the timeout of silence, so a
/// short value costs a little traffic on an idle cluster and nothing on a busy one. The
/// sender side bounds how long a sync primary waits on a standby that vanished.
pub async fn ensure_replication_timeouts(target: &PgTarget, ms: u64, timeout: Duration) -> Result<bool, OpError> {
    let op = Op::TuneTimeouts;
    within(op, "wal_receiver_timeout", timeout, async {
        let client = connect(op, target, timeout).await?;
        let rows = client
            .query("SELECT setting FROM pg_settings WHERE name IN ('wal_receiver_timeout', 'wal_sender_timeout')", &[])
            .await
            .map_err(sql_err(op, "read settings"))?;
        let want = ms.to_string();
        if rows.len() == 2 && rows.iter().all(|r| r.get::<_, &str>(0) == want) {
            return Ok(false);
        }
        let value = format!("{ms}ms");
        alter_and_reload(
            &client,
            op,
            &[("wal_receiver_timeout", Some(value.as_str())), ("wal_sender_timeout", Some(value.as_str()))],
        )
        .await?;
        Ok(true)
    })
    .await
}

/// Waits until `replica` has replayed everything `primary` has written, re-reading the
/// primary's position each round (a read-only primary still writes a little WAL of its
/// own, such as running-transactions records). Returns the LSN both reached.
pub async fn wait_caught_up(primary: &PgTarget, replica: &PgTarget, timeout: Duration) -> Result<u64, OpError> {
    let op = Op::CatchUp;
    within(op, "replay position", timeout, async {
        let p = connect(op, primary, timeout).await?;
        let r = connect(op, replica, timeout).await?;
        loop {
            let row =
                p.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.map_err(sql_err(op, "primary position"))?;
            let target = crate::probe::parse_lsn(row.get(0)).unwrap_or(u64::MAX);
            let row = r
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await
                .map_err(sql_err(op, "replica position"))?;
            let replayed = row.get::<_, Option<&str>>(0).and_then(crate::probe::parse_lsn).unwrap_or(0);
            if replayed >= target {
                return Ok(target);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// What [`rejoin_as_replica`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejoinReport {
    /// How the running server was stopped first.
    pub stopped: StopOutcome,
    /// False when pg_rewind found the histories had not diverged.
    pub rewound: bool,
    pub rewind_output: String,
}

/// Turns this member (a fenced or returning old primary) into a replica of `source`:
/// stop it, checkpoint `source`, `pg_rewind` its data dir to `source` (a superuser connection to the new
/// primary), write `standby.signal` and `primary_conninfo` (streaming from `upstream`),
/// start it. A failed rewind is [`OpErrorKind::RewindFailed`]: the member stays stopped,
/// which is what keeps it fenced.
pub async fn rejoin_as_replica(
    local: &LocalPg,
    source: &PgTarget,
    upstream: &Upstream,
    timeout: Duration,
) -> Result<RejoinReport, OpError> {
    let op = Op::Rejoin;
    let stopped = stop(local, timeout).await.map_err(|e| OpError { op, ..e })?;
    // pg_rewind reads the source's timeline from its control file, which a freshly
    // promoted primary updates only at its next checkpoint; without one it sees "the
    // same timeline" and skips a rewind that is needed.
    within(op, "checkpoint on the source", timeout, async {
        let client = connect(op, source, timeout).await?;
        client.batch_execute("CHECKPOINT").await.map_err(sql_err(op, "checkpoint on the source"))
    })
    .await?;
    // pg_rewind finishes a crashed target's recovery in single-user mode first, which
    // refuses standby mode: a replica that crashed is rewound as a plain data dir (as
    // repmgr does). It still needs the check: an asynchronous replica may hold WAL of the
    // old primary past the point where the new primary's history forked.
    // `write_standby_config` puts the file back.
    let signal = local.data_dir.join("standby.signal");
    if let Err(e) = std::fs::remove_file(&signal)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        let kind = OpErrorKind::File { path: signal.display().to_string(), error: e.to_string() };
        return Err(OpError::new(op, "remove standby.signal", kind));
    }
    let args = vec![
        "--target-pgdata".into(),
        local.data_dir.clone().into_os_string(),
        format!("--source-server={}", source.conninfo()).into(),
    ];
    let out = run_tool(local, op, "pg_rewind", "pg_rewind", args, Some(timeout)).await?;
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(OpError::new(op, "pg_rewind", OpErrorKind::RewindFailed { output: output.trim().to_string() }));
    }
    let rewound = !output.contains("no rewind required");
    write_standby_config(local, upstream).map_err(|kind| OpError::new(op, "write standby config", kind))?;
    start(local, timeout).await.map_err(|e| OpError { op, ..e })?;
    Ok(RejoinReport { stopped, rewound, rewind_output: output.trim().to_string() })
}

/// `standby.signal` plus `primary_conninfo` in `postgresql.auto.conf` (where
/// `ALTER SYSTEM` would put it; the server is stopped so it cannot be asked to).
fn write_standby_config(local: &LocalPg, upstream: &Upstream) -> Result<(), OpErrorKind> {
    let file_err =
        |p: &Path, e: std::io::Error| OpErrorKind::File { path: p.display().to_string(), error: e.to_string() };
    let auto = local.data_dir.join("postgresql.auto.conf");
    let old = std::fs::read_to_string(&auto).unwrap_or_default();
    let mut text: String = old
        .lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            // The source's own settings came along with the rewind; these belong to this member.
            key != "primary_conninfo" && key != "default_transaction_read_only"
        })
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&format!("primary_conninfo = {}\n", quote_literal(&upstream.conninfo(&local.name))));
    std::fs::write(&auto, text).map_err(|e| file_err(&auto, e))?;
    let signal = local.data_dir.join("standby.signal");
    std::fs::write(&signal, "").map_err(|e| file_err(&signal, e))?;
    if let Some(user) = &local.run_as
        && let Ok(Some(u)) = nix::unistd::User::from_name(user)
    {
        for p in [&auto, &signal] {
            nix::unistd::chown(p.as_path(), Some(u.uid), Some(u.gid))
                .map_err(|e| OpErrorKind::File { path: p.display().to_string(), error: e.to_string() })?;
        }
    }
    Ok(())
}

/// Operator command lines that replace the PostgreSQL operations (MySQL/MariaDB, or a
/// PostgreSQL managed by other tools). Tokens `{{ .primary_host }}` (with an optional
/// `| default "x"`) are replaced from the variables given to [`Hooks::run`]; each
/// variable is also in the environment as `DROVER_<NAME>` (upper case).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promote: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demote: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<String>,
    /// Per hook run; 0 means [`Hooks::DEFAULT_TIMEOUT`].
    #[serde(default)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    Promote,
    Demote,
    Repoint,
    Fence,
}

/// A hook that ran and exited 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookOutput {
    pub command: String,
    pub stdout: String,
    pub stderr: String,
}

impl Hooks {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

    pub fn command(&self, kind: HookKind) -> Option<&str> {
        match kind {
            HookKind::Promote => self.promote.as_deref(),
            HookKind::Demote => self.demote.as_deref(),
            HookKind::Repoint => self.repoint.as_deref(),
            HookKind::Fence => self.fence.as_deref(),
        }
        .filter(|c| !c.trim().is_empty())
    }

    fn timeout(&self) -> Duration {
        if self.timeout_secs == 0 { Self::DEFAULT_TIMEOUT } else { Duration::from_secs(self.timeout_secs) }
    }

    /// Runs the `kind` hook through `sh -c` in its own process group; on timeout the
    /// whole group is killed (a hook's children must not outlive it). A missing token
    /// refuses to run at all: a blank host in a repoint command could do harm.
    pub async fn run(&self, kind: HookKind, vars: &BTreeMap<String, String>) -> Result<HookOutput, OpError> {
        let op = Op::Hook;
        let template = self.command(kind).ok_or_else(|| {
            OpError::new(op, "configuration", OpErrorKind::WrongState(format!("no {kind:?} hook is configured")))
        })?;
        let command =
            render(template, vars).map_err(|m| OpError::new(op, "substitute", OpErrorKind::MissingVars(m)))?;
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(&command).process_group(0).kill_on_drop(true).stdin(std::process::Stdio::null());
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
        for (k, v) in vars {
            cmd.env(format!("DROVER_{}", k.to_ascii_uppercase()), v);
        }
        let child = cmd.spawn().map_err(|e| {
            OpError::new(op, "spawn", OpErrorKind::Spawn { command: command.clone(), error: e.to_string() })
        })?;
        let pid = child.id();
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Err(_) => {
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
                }
                Err(OpError::new(op, "run", OpErrorKind::Timeout(timeout)))
            }
            Ok(Err(e)) => Err(OpError::new(op, "run", OpErrorKind::Spawn { command, error: e.to_string() })),
            Ok(Ok(out)) if !out.status.success() => Err(OpError::new(op, "run", command_failed(&command, &out))),
            Ok(Ok(out)) => Ok(HookOutput {
                command,
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }),
        }
    }
}

/// Replaces `{{ .name }}` / `{{ .name | default "x" }}` tokens (the Sensu Go syntax of
/// `drover_core::tokens`) from `vars`. Values are shell-quoted unless they are plainly
/// safe (hosts, ports, names), since the result runs through `sh -c`. Returns the
/// names that had neither a value nor a default.
pub fn render(template: &str, vars: &BTreeMap<String, String>) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(template.len());
    let mut missing = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push_str(&rest[..start]);
        let inner = &after[..end];
        let (name, default) = match inner.split_once('|') {
            Some((n, d)) => (n.trim(), parse_default(d)),
            None => (inner.trim(), None),
        };
        let name = name.trim_start_matches('.');
        match vars.get(name).cloned().or(default) {
            Some(v) => out.push_str(&shell_quote(&v)),
            None => missing.push(name.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if missing.is_empty() { Ok(out) } else { Err(missing) }
}

fn parse_default(s: &str) -> Option<String> {
    let s = s.trim().strip_prefix("default")?.trim();
    Some(s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s).to_string())
}

fn shell_quote(v: &str) -> String {
    if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "._-:/@=,+".contains(c)) {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn tokens_are_replaced_and_defaults_apply() {
        let v = vars(&[("primary_host", "10.0.0.5"), ("primary_port", "3306")]);
        let out =
            render("repoint --host {{ .primary_host }} --port {{.primary_port}} --x {{ .x | default \"7\" }}", &v);
        assert_eq!(out.unwrap(), "repoint --host 10.0.0.5 --port 3306 --x 7");
    }

    #[test]
    fn a_missing_token_without_default_refuses_to_render() {
        assert_eq!(
            render("a {{ .primary_host }} {{ .term }}", &vars(&[])),
            Err(vec!["primary_host".into(), "term".into()])
        );
    }

    #[test]
    fn values_with_shell_metacharacters_are_quoted() {
        let out = render("echo {{ .m }}", &vars(&[("m", "a; rm -rf / 'x'")])).unwrap();
        assert_eq!(out, "echo 'a; rm -rf / '\\''x'\\'''");
    }

    #[test]
    fn sql_literals_escape_quotes_and_backslashes() {
        assert_eq!(quote_literal("host=a user='b'"), "'host=a user=''b'''");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_ident("pg-1"), "\"pg-1\"");
    }

    #[test]
    fn synchronous_standby_names_lists_members_in_priority_order() {
        let names = vec!["pg1".to_string(), "pg2".to_string()];
        assert_eq!(synchronous_standby_names_value(1, &names), "FIRST 1 (\"pg1\", \"pg2\")");
        assert_eq!(synchronous_standby_names_value(5, &names), "FIRST 2 (\"pg1\", \"pg2\")", "count is capped");
        assert_eq!(synchronous_standby_names_value(1, &[]), "", "no standbys means asynchronous");
    }

    #[test]
    fn primary_conninfo_names_the_replica_for_synchronous_replication() {
        let up = Upstream { host: "10.0.0.1".into(), port: 5432, user: "replicator".into(), password: None };
        assert_eq!(up.conninfo("pg2"), "host=10.0.0.1 port=5432 user=replicator application_name=pg2");
    }

    #[test]
    fn errors_say_whether_a_retry_can_help() {
        let e = OpError::new(Op::Rejoin, "pg_rewind", OpErrorKind::RewindFailed { output: "x".into() });
        assert!(!e.retryable());
        assert!(e.to_string().contains("must stay fenced"), "{e}");
        let e = OpError::new(Op::Promote, "connect", OpErrorKind::Timeout(Duration::from_secs(1)));
        assert!(e.retryable());
        assert!(e.to_string().starts_with("promote failed at step `connect`"), "{e}");
    }

    #[tokio::test]
    async fn hook_runs_with_substituted_tokens_and_environment() {
        let hooks = Hooks { promote: Some("echo promote {{ .member }} $DROVER_TERM".into()), ..Default::default() };
        let out = hooks.run(HookKind::Promote, &vars(&[("member", "db2"), ("term", "7")])).await.unwrap();
        assert_eq!(out.stdout.trim(), "promote db2 7");
    }

    #[tokio::test]
    async fn failing_hook_is_a_retryable_command_error_with_its_output() {
        let hooks = Hooks { fence: Some("echo nope >&2; exit 3".into()), ..Default::default() };
        let err = hooks.run(HookKind::Fence, &vars(&[])).await.unwrap_err();
        assert!(matches!(&err.kind, OpErrorKind::Command { output, .. } if output.contains("nope")), "{err}");
        assert!(err.retryable());
    }

    #[tokio::test]
    async fn hook_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let hooks = Hooks {
            demote: Some(format!("(sleep 2; touch {}) & sleep 30", marker.display())),
            timeout_secs: 1,
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let err = hooks.run(HookKind::Demote, &vars(&[])).await.unwrap_err();
        assert!(matches!(err.kind, OpErrorKind::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "the hook's background child outlived the timeout");
    }

    #[tokio::test]
    async fn unconfigured_hook_is_refused_not_skipped() {
        let err = Hooks::default().run(HookKind::Repoint, &vars(&[])).await.unwrap_err();
        assert!(matches!(err.kind, OpErrorKind::WrongState(_)));
        assert!(!err.retryable());
    }
}
