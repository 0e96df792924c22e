//! Real PostgreSQL 15 clusters for tests (feature `testing`).
//!
//! [`PgCluster::start`] builds one primary and N streaming replicas from Debian's
//! PostgreSQL 15 binaries in a private temp dir, on free loopback ports, and removes
//! every process and file when dropped — also when the test panics, because `Drop` runs
//! while unwinding.
//!
//! Why it looks the way it does:
//! - PostgreSQL refuses to run as root and tests run as root, so every server-side tool
//!   (`initdb`, `pg_ctl`, `pg_basebackup`, `pg_rewind`) runs as the `postgres` user via
//!   `runuser` (directly when the test is not root), inside a temp dir owned by it.
//! - Member-specific settings (port, socket dir, `cluster_name`) go on the `postgres`
//!   command line, not in `postgresql.conf`: `pg_basebackup` and `pg_rewind` copy the
//!   source's config files into the target, so anything in them would follow the copy.
//! - Clusters are made with `--data-checksums` (and `wal_log_hints`), without which
//!   `pg_rewind` refuses to run, so a killed primary can rejoin.
//! - `cluster_name` doubles as the walreceiver's `application_name`, which is what
//!   `synchronous_standby_names` and `pg_stat_replication` name standbys by.
//! - Authentication is `trust` on the unix socket and on `samenet` (the subnets the
//!   server's own interfaces are on: loopback, or a test's network namespace link), for
//!   the superuser `postgres` and the replication user [`REPLICATION_USER`].
//! - A member may live on another address, in a network namespace
//!   ([`PgClusterOptions::hosts`]), so tests can cut it off the network. The harness's
//!   own SQL ([`PgCluster::psql`]) goes over the shared unix socket directory, which no
//!   partition cuts: the test can always see what each server really does.

use crate::ops::{LocalPg, Upstream, run_as_command};
use crate::probe::PgTarget;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where Debian installs PostgreSQL 15's server binaries.
pub const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The role replicas stream as (REPLICATION LOGIN, trust on loopback).
pub const REPLICATION_USER: &str = "replicator";
/// The superuser tests, probes and `pg_rewind` connect as.
pub const SUPERUSER: &str = "postgres";
/// The OS user PostgreSQL runs as when the tests run as root.
pub const OS_USER: &str = "postgres";

/// A harness step that failed, with what PostgreSQL said (log tail included when useful).
#[derive(Debug, thiserror::Error)]
#[error("{step}: {detail}")]
pub struct HarnessError {
    pub step: String,
    pub detail: String,
}

impl HarnessError {
    fn new(step: impl Into<String>, detail: impl Into<String>) -> Self {
        HarnessError { step: step.into(), detail: detail.into() }
    }
}

/// How to build a cluster; `Default` is one primary and two async replicas.
#[derive(Debug, Clone)]
pub struct PgClusterOptions {
    /// Number of streaming replicas (named `pg1`, `pg2`, ...; the primary is `pg0`).
    pub replicas: usize,
    /// Set on the primary (ALTER SYSTEM) once every replica streams, e.g. `FIRST 1 (pg1, pg2)`.
    /// Setting it earlier would block the harness's own writes until a standby exists.
    pub synchronous_standby_names: Option<String>,
    /// `synchronous_commit` on the primary (ALTER SYSTEM), e.g. `remote_apply`.
    pub synchronous_commit: Option<String>,
    /// Extra `postgresql.conf` lines for every member.
    pub extra_conf: Vec<String>,
    pub bin_dir: PathBuf,
    /// Where each member (`pg0` first) listens and runs; empty: all on 127.0.0.1 here.
    pub hosts: Vec<MemberHost>,
}

/// A member's address and, when it runs in a network namespace, the namespace's name
/// (made by the test, with `addr` on one of its interfaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHost {
    pub addr: String,
    pub netns: Option<String>,
}

impl Default for PgClusterOptions {
    fn default() -> Self {
        PgClusterOptions {
            replicas: 2,
            synchronous_standby_names: None,
            synchronous_commit: None,
            extra_conf: Vec::new(),
            bin_dir: PathBuf::from(DEFAULT_BIN_DIR),
            hosts: Vec::new(),
        }
    }
}

/// One PostgreSQL server of a [`PgCluster`].
#[derive(Debug, Clone)]
pub struct PgMember {
    pub name: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
    pub socket_dir: PathBuf,
    /// The address it listens on (TCP).
    pub host: String,
    pub netns: Option<String>,
}

impl PgMember {
    /// Superuser connection over TCP (what probes and operations use).
    pub fn target(&self) -> PgTarget {
        PgTarget::new(self.host.clone(), self.port, SUPERUSER)
    }

    /// What a replica of this member puts in `primary_conninfo`.
    pub fn upstream(&self) -> Upstream {
        Upstream { host: self.host.clone(), port: self.port, user: REPLICATION_USER.into(), password: None }
    }

    /// The `postgres` command-line options that make this member itself (see module docs).
    pub fn start_options(&self) -> String {
        format!(
            "-c port={} -c listen_addresses={} -c unix_socket_directories={} -c cluster_name={}",
            self.port,
            self.host,
            self.socket_dir.display(),
            self.name
        )
    }
}

/// A running primary + replicas; every process is killed and every file removed on drop.
pub struct PgCluster {
    // Dropped last (after `Drop::drop` killed the servers), removing the files.
    root: tempfile::TempDir,
    bin_dir: PathBuf,
    members: Vec<PgMember>,
}

impl PgCluster {
    /// Builds and starts the cluster; returns once every replica streams from `pg0`
    /// (and the synchronous settings, if any, are applied).
    pub fn start(opts: PgClusterOptions) -> Result<PgCluster, HarnessError> {
        let root = tempfile::Builder::new()
            .prefix("drover-pg-")
            .tempdir()
            .map_err(|e| HarnessError::new("create temp dir", e.to_string()))?;
        let socket_dir = root.path().join("sock");
        std::fs::create_dir(&socket_dir).map_err(|e| HarnessError::new("create socket dir", e.to_string()))?;
        if is_root() {
            chown_to_postgres(root.path())?;
            chown_to_postgres(&socket_dir)?;
        }
        if !opts.hosts.is_empty() && opts.hosts.len() != opts.replicas + 1 {
            return Err(HarnessError::new("options", "`hosts` needs one entry per member, pg0 first"));
        }
        let members: Vec<PgMember> = (0..=opts.replicas)
            .map(|i| {
                let name = format!("pg{i}");
                let host = opts.hosts.get(i).cloned();
                Ok(PgMember {
                    host: host.as_ref().map_or_else(|| "127.0.0.1".to_string(), |h| h.addr.clone()),
                    netns: host.and_then(|h| h.netns),
                    port: drover_testkit::free_port(),
                    data_dir: root.path().join(&name),
                    log_file: root.path().join(format!("{name}.log")),
                    socket_dir: socket_dir.clone(),
                    name,
                })
            })
            .collect::<Result<_, HarnessError>>()?;
        let cluster = PgCluster { root, bin_dir: opts.bin_dir.clone(), members };
        cluster.init_primary(&opts)?;
        cluster.start_member("pg0")?;
        cluster.psql("pg0", &format!("CREATE ROLE {REPLICATION_USER} WITH REPLICATION LOGIN"))?;
        for i in 1..=opts.replicas {
            let name = format!("pg{i}");
            cluster.base_backup(&name, "pg0")?;
            cluster.start_member(&name)?;
        }
        for i in 1..=opts.replicas {
            cluster.wait_streaming(&format!("pg{i}"), "pg0", Duration::from_secs(60))?;
        }
        if let Some(names) = &opts.synchronous_standby_names {
            cluster.psql(
                "pg0",
                &format!("ALTER SYSTEM SET synchronous_standby_names = {}", crate::ops::quote_literal(names)),
            )?;
        }
        if let Some(level) = &opts.synchronous_commit {
            cluster
                .psql("pg0", &format!("ALTER SYSTEM SET synchronous_commit = {}", crate::ops::quote_literal(level)))?;
        }
        if opts.synchronous_standby_names.is_some() || opts.synchronous_commit.is_some() {
            cluster.psql("pg0", "SELECT pg_reload_conf()")?;
        }
        Ok(cluster)
    }

    pub fn members(&self) -> &[PgMember] {
        &self.members
    }

    /// The member called `name`; panics on an unknown name (a bug in the test).
    pub fn member(&self, name: &str) -> &PgMember {
        self.members.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no member {name}"))
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The temp dir holding data dirs, logs and sockets.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// What `drover_db::ops` needs to stop, start and rewind this member locally.
    pub fn local(&self, name: &str) -> LocalPg {
        let m = self.member(name);
        LocalPg {
            name: m.name.clone(),
            bin_dir: self.bin_dir.clone(),
            data_dir: m.data_dir.clone(),
            run_as: is_root().then(|| OS_USER.to_string()),
            start_options: Some(m.start_options()),
            log_file: Some(m.log_file.clone()),
            target: m.target(),
        }
    }

    /// `pg_ctl start -w` for a stopped (or killed) member.
    pub fn start_member(&self, name: &str) -> Result<(), HarnessError> {
        let m = self.member(name);
        let out = self
            .as_postgres_in(m.netns.as_deref(), "pg_ctl")
            .arg("-D")
            .arg(&m.data_dir)
            .arg("-l")
            .arg(&m.log_file)
            .args(["-w", "-t", "60", "-o", &m.start_options(), "start"])
            .output()
            .map_err(|e| HarnessError::new(format!("pg_ctl start {name}"), e.to_string()))?;
        if !out.status.success() {
            return Err(HarnessError::new(
                format!("pg_ctl start {name}"),
                format!("{}\n{}", String::from_utf8_lossy(&out.stderr), self.log_tail(name, 30)),
            ));
        }
        Ok(())
    }

    /// Clean (`fast`) shutdown.
    pub fn stop_member(&self, name: &str) -> Result<(), HarnessError> {
        let m = self.member(name);
        let out = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(&m.data_dir)
            .args(["-w", "-t", "60", "-m", "fast", "stop"])
            .output()
            .map_err(|e| HarnessError::new(format!("pg_ctl stop {name}"), e.to_string()))?;
        if !out.status.success() {
            return Err(HarnessError::new(format!("pg_ctl stop {name}"), String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// SIGKILL the postmaster and every process under it at once, as a machine crash
    /// would; returns when all of them are gone. Killing only the postmaster would
    /// leave backends and the walsender running (and still streaming) for a while.
    pub fn kill9(&self, name: &str) -> Result<(), HarnessError> {
        let Some(pid) = postmaster_pid(&self.member(name).data_dir) else { return Ok(()) };
        let pids = signal_tree(pid, nix::sys::signal::Signal::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(15);
        while pids.iter().any(|&p| alive(p)) {
            if Instant::now() > deadline {
                return Err(HarnessError::new(format!("kill -9 {name}"), format!("still alive: {pids:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // A crashed machine comes back without this file. Left in place, it names a pid
        // that may linger as a zombie (nothing reaps it here), which PostgreSQL and
        // pg_ctl take for a live postmaster.
        let m = self.member(name);
        let _ = std::fs::remove_file(m.data_dir.join("postmaster.pid"));
        let _ = std::fs::remove_file(m.socket_dir.join(format!(".s.PGSQL.{}.lock", m.port)));
        let _ = std::fs::remove_file(m.socket_dir.join(format!(".s.PGSQL.{}", m.port)));
        Ok(())
    }

    /// SIGSTOP the postmaster and every process under it: a hung machine, not a dead
    /// one. Its sockets stay open and nothing is reset, so peers notice only by timeouts.
    pub fn freeze(&self, name: &str) -> Result<(), HarnessError> {
        self.signal_all(name, nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self, name: &str) -> Result<(), HarnessError> {
        self.signal_all(name, nix::sys::signal::Signal::SIGCONT)
    }

    fn signal_all(&self, name: &str, sig: nix::sys::signal::Signal) -> Result<(), HarnessError> {
        let pid = postmaster_pid(&self.member(name).data_dir)
            .ok_or_else(|| HarnessError::new(format!("{sig} {name}"), "no postmaster.pid"))?;
        signal_tree(pid, sig);
        Ok(())
    }

    /// Whether the member's postmaster is alive.
    pub fn is_running(&self, name: &str) -> bool {
        postmaster_pid(&self.member(name).data_dir).is_some_and(alive)
    }

    /// Runs SQL as the superuser through `psql` and returns its unaligned, tuples-only
    /// output. It goes over the unix socket, so it reaches a member cut off the network.
    pub fn psql(&self, name: &str, sql: &str) -> Result<String, HarnessError> {
        let m = self.member(name);
        let out = Command::new(self.bin_dir.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-U", SUPERUSER, "-h"])
            .arg(&m.socket_dir)
            .arg("-d")
            .arg("postgres")
            .arg("-p")
            .arg(m.port.to_string())
            .arg("-c")
            .arg(sql)
            .env("PGCONNECT_TIMEOUT", "5")
            .output()
            .map_err(|e| HarnessError::new(format!("psql {name}"), e.to_string()))?;
        if !out.status.success() {
            return Err(HarnessError::new(
                format!("psql {name}: {sql}"),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Waits until `replica`'s WAL receiver streams from `upstream`.
    pub fn wait_streaming(&self, replica: &str, upstream: &str, timeout: Duration) -> Result<(), HarnessError> {
        let port = self.member(upstream).port;
        let sql = "SELECT status || ':' || sender_port FROM pg_stat_wal_receiver";
        let deadline = Instant::now() + timeout;
        let mut last: String;
        loop {
            match self.psql(replica, sql) {
                Ok(s) if s == format!("streaming:{port}") => return Ok(()),
                Ok(s) => last = s,
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(HarnessError::new(
                    format!("wait for {replica} to stream from {upstream}"),
                    format!("last: {last:?}\n{}", self.log_tail(replica, 30)),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `lines` lines of the member's server log (for failure messages).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.member(name).log_file).unwrap_or_default();
        let mut tail: VecDeque<&str> = VecDeque::with_capacity(lines);
        for line in text.lines() {
            if tail.len() == lines {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        format!("--- {name} log ---\n{}", tail.into_iter().collect::<Vec<_>>().join("\n"))
    }

    fn init_primary(&self, opts: &PgClusterOptions) -> Result<(), HarnessError> {
        let m = &self.members[0];
        let out = self
            .as_postgres("initdb")
            .arg("-D")
            .arg(&m.data_dir)
            .args(["-U", SUPERUSER, "--auth=trust", "--data-checksums", "--no-sync", "--no-instructions"])
            .args(["-E", "UTF8", "--locale=C"])
            .output()
            .map_err(|e| HarnessError::new("initdb", e.to_string()))?;
        if !out.status.success() {
            return Err(HarnessError::new("initdb", String::from_utf8_lossy(&out.stderr)));
        }
        let mut conf = vec![
            "wal_level = replica",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "wal_log_hints = on",
            "hot_standby = on",
            "hot_standby_feedback = on",
            // A rewound or repointed member streams from where it forked; keep that WAL.
            "wal_keep_size = '256MB'",
            // Fresh positions in pg_stat_replication and quick reconnects after a repoint.
            "wal_receiver_status_interval = '1s'",
            "wal_retrieve_retry_interval = '500ms'",
            "shared_buffers = '32MB'",
            "max_connections = 40",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        conf.extend(opts.extra_conf.iter().cloned());
        append(&m.data_dir.join("postgresql.conf"), &format!("\n# drover-db test harness\n{}\n", conf.join("\n")))?;
        let hba = "local all all trust\nlocal replication all trust\n\
                   host all all samenet trust\nhost replication all samenet trust\n";
        std::fs::write(m.data_dir.join("pg_hba.conf"), hba).map_err(|e| HarnessError::new("pg_hba.conf", e.to_string()))
    }

    fn base_backup(&self, name: &str, from: &str) -> Result<(), HarnessError> {
        let m = self.member(name);
        let src = self.member(from);
        let out = self
            .as_postgres("pg_basebackup")
            .args(["-h", &src.host, "-U", REPLICATION_USER, "-p", &src.port.to_string(), "-D"])
            .arg(&m.data_dir)
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .output()
            .map_err(|e| HarnessError::new(format!("pg_basebackup {name}"), e.to_string()))?;
        if !out.status.success() {
            return Err(HarnessError::new(format!("pg_basebackup {name}"), String::from_utf8_lossy(&out.stderr)));
        }
        Ok(())
    }

    /// [`Self::as_postgres`], inside the member's network namespace when it has one, so
    /// the server it starts lives there (its children inherit the namespace).
    fn as_postgres_in(&self, netns: Option<&str>, tool: &str) -> Command {
        let inner = self.as_postgres(tool);
        let Some(ns) = netns else { return inner };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(inner.get_program()).args(inner.get_args());
        cmd.current_dir(self.root.path());
        cmd
    }

    fn as_postgres(&self, tool: &str) -> Command {
        let mut cmd = run_as_command(is_root().then_some(OS_USER), &self.bin_dir.join(tool));
        // The tools chdir-check their working directory; the test's may be unreadable to postgres.
        cmd.current_dir(self.root.path());
        cmd
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        for m in &self.members {
            if let Err(e) = self.kill9(&m.name) {
                eprintln!("drover-db harness: {e}");
            }
        }
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chown_to_postgres(path: &Path) -> Result<(), HarnessError> {
    let user = nix::unistd::User::from_name(OS_USER)
        .ok()
        .flatten()
        .ok_or_else(|| HarnessError::new("look up user postgres", "no such user (is postgresql-15 installed?)"))?;
    nix::unistd::chown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| HarnessError::new(format!("chown {}", path.display()), e.to_string()))
}

fn append(path: &Path, text: &str) -> Result<(), HarnessError> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| HarnessError::new(format!("append to {}", path.display()), e.to_string()))
}

/// Sends `sig` to `pid` and every process under it; returns them all.
fn signal_tree(pid: i32, sig: nix::sys::signal::Signal) -> Vec<i32> {
    let mut pids = descendants(pid);
    pids.insert(0, pid);
    for &p in &pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
    pids
}

fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
}

/// (ppid, state) of a process from /proc; the command name may contain spaces and parens.
fn proc_stat(pid: i32) -> Option<(i32, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|(_, state)| state != 'Z' && state != 'X')
}

fn descendants(root: i32) -> Vec<i32> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok())
            && let Some((ppid, _)) = proc_stat(pid)
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut queue = VecDeque::from([root]);
    while let Some(p) = queue.pop_front() {
        for &c in children.get(&p).into_iter().flatten() {
            out.push(c);
            queue.push_back(c);
        }
    }
    out
}

/// A writer that inserts increasing ids into `table (id bigint)` on `target` over one
/// connection until a statement fails, and returns every id whose commit was
/// acknowledged — the ground truth failover tests compare a new primary against.
pub async fn acked_writer(target: &PgTarget, table: &str, timeout: Duration) -> tokio::task::JoinHandle<Vec<i64>> {
    let client = target.connect(timeout).await.expect("the writer connects");
    let sql = format!("INSERT INTO {table} (id) VALUES ($1)");
    tokio::spawn(async move {
        let insert = client.prepare(&sql).await.expect("the insert prepares");
        let mut acked = Vec::new();
        for id in 1i64.. {
            match client.execute(&insert, &[&id]).await {
                Ok(_) => acked.push(id),
                Err(_) => break,
            }
        }
        acked
    })
}
