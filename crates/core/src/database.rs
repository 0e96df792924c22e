//! Database failover resources: the server's `[databases.NAME]` (a PostgreSQL
//! cluster's members and rules) and the agent's `[postgres]` (the local server it
//! probes and operates). The decisions and operations themselves live in `drover-db`.
//!
//! ```toml
//! # server config dir
//! [databases.main]
//! members = ["pg1", "pg2", "pg3"]        # entities running PostgreSQL with an agent; priority order
//! mode = "sync"                          # or "async"
//! port = 5432                            # a member's `pg_port` label overrides it
//! max_lag_on_failover_bytes = 16777216   # async: never promote a replica further behind
//! max_replica_lag_bytes = 16777216       # read endpoint: replicas further behind are out
//! read_fallback_to_primary = false       # read endpoint (`db-read`): the primary when no replica is in
//! dead_grace_ms = 3000                   # every death signal must hold this long
//! lease_ttl_ms = 1000                    # the primary fences itself when its lease lapses
//!
//! # agent config
//! [postgres]
//! cluster = "main"
//! data_dir = "/var/lib/postgresql/15/main"
//! port = 5432
//! run_as = "postgres"                    # when the agent runs as root
//! replication_timeout_ms = 4000          # wal_receiver/sender_timeout kept on the server; 0 = leave
//! state_file = "/var/lib/postgresql/15/main.drover-agent.json"  # term and lease across agent restarts (this default)
//! ```

use crate::resource::FieldError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

fn d_port() -> u16 {
    5432
}
fn d_user() -> String {
    "postgres".into()
}
fn d_lag() -> u64 {
    16 * 1024 * 1024
}
fn d_dead_grace_ms() -> u64 {
    3_000
}
fn d_lease_ttl_ms() -> u64 {
    1_000
}
fn d_catch_up_ms() -> u64 {
    30_000
}
fn d_status_max_age_ms() -> u64 {
    3_000
}
fn d_host() -> String {
    "127.0.0.1".into()
}
fn d_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}
fn d_probe_interval_ms() -> u64 {
    500
}
fn d_replication_timeout_ms() -> u64 {
    4_000
}
fn d_hook_timeout_secs() -> u64 {
    60
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbMode {
    /// Acknowledged writes may be lost up to `max_lag_on_failover_bytes`.
    #[default]
    Async,
    /// Commits wait for a synchronous standby; only such a standby is promoted.
    Sync,
}

/// `[databases.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSpec {
    #[serde(skip)]
    pub name: String,
    pub members: Vec<String>,
    #[serde(default)]
    pub mode: DbMode,
    #[serde(default = "d_port")]
    pub port: u16,
    /// The role the server's own probe connects as.
    #[serde(default = "d_user")]
    pub user: String,
    /// The role replicas stream as (REPLICATION LOGIN).
    #[serde(default = "d_user")]
    pub replication_user: String,
    #[serde(default = "d_lag")]
    pub max_lag_on_failover_bytes: u64,
    #[serde(default = "d_lag")]
    pub max_replica_lag_bytes: u64,
    /// The read endpoint (`db-read`) uses the primary while no replica is in rotation.
    #[serde(default)]
    pub read_fallback_to_primary: bool,
    #[serde(default = "d_dead_grace_ms")]
    pub dead_grace_ms: u64,
    #[serde(default = "d_status_max_age_ms")]
    pub status_max_age_ms: u64,
    #[serde(default = "d_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    #[serde(default = "d_catch_up_ms")]
    pub catch_up_timeout_ms: u64,
}

impl DatabaseSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.members.is_empty() {
            return Err(FieldError::new("members", "at least one member is needed"));
        }
        for (i, m) in self.members.iter().enumerate() {
            crate::resource::validate_name("members", m)?;
            if self.members[..i].contains(m) {
                return Err(FieldError::new("members", format!("`{m}` is listed twice")));
            }
        }
        if self.port == 0 {
            return Err(FieldError::new("port", "must be 1-65535"));
        }
        if self.lease_ttl_ms == 0 {
            return Err(FieldError::new("lease_ttl_ms", "must be at least 1"));
        }
        // The old primary must have fenced itself (lease lapsed, then a fence) before
        // anyone may be promoted; 1 s is the fence's own budget.
        if self.lease_ttl_ms + 1_000 >= self.dead_grace_ms {
            return Err(FieldError::new(
                "dead_grace_ms",
                format!(
                    "must exceed lease_ttl_ms + 1000 ms ({} ms) so a cut-off primary fences itself before a promotion",
                    self.lease_ttl_ms + 1_000
                ),
            ));
        }
        Ok(())
    }
}

/// Operator commands that replace the built-in PostgreSQL operations (other engines).
/// Tokens: `{{ .primary_host }}`, `{{ .primary_port }}`, `{{ .member }}`, `{{ .cluster }}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbHooksConfig {
    #[serde(default)]
    pub promote: Option<String>,
    #[serde(default)]
    pub demote: Option<String>,
    #[serde(default)]
    pub repoint: Option<String>,
    #[serde(default)]
    pub fence: Option<String>,
    #[serde(default = "d_hook_timeout_secs")]
    pub timeout_secs: u64,
}

/// The agent's `[postgres]`: the local server it probes and operates for `cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresAgentConfig {
    pub cluster: String,
    #[serde(default = "d_host")]
    pub host: String,
    #[serde(default = "d_port")]
    pub port: u16,
    /// A superuser the agent connects as.
    #[serde(default = "d_user")]
    pub user: String,
    pub data_dir: PathBuf,
    #[serde(default = "d_bin_dir")]
    pub bin_dir: PathBuf,
    /// OS user for `pg_ctl`/`pg_rewind` when the agent runs as root.
    #[serde(default)]
    pub run_as: Option<String>,
    /// `pg_ctl -o` options.
    #[serde(default)]
    pub start_options: Option<String>,
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default = "d_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// `wal_receiver_timeout` and `wal_sender_timeout` the agent keeps on its server, so
    /// replicas notice a partitioned or frozen primary within this (PostgreSQL's
    /// default, 60 s, would hold a failover that long); 0 leaves them alone.
    #[serde(default = "d_replication_timeout_ms")]
    pub replication_timeout_ms: u64,
    #[serde(default)]
    pub hooks: Option<DbHooksConfig>,
    /// Where the agent keeps its fencing term and lease across its own restarts
    /// (default: [`PostgresAgentConfig::state_file`]).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
}

impl PostgresAgentConfig {
    /// `state_file`, or `<data_dir>.drover-agent.json`: beside the data directory, not in
    /// it, where `pg_basebackup` and `pg_rewind` would copy one member's file to another.
    pub fn state_file(&self) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| {
            // Rebuilt from its components: a trailing `/` would put the file inside.
            let mut name = self.data_dir.components().collect::<PathBuf>().into_os_string();
            name.push(".drover-agent.json");
            PathBuf::from(name)
        })
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        crate::resource::validate_name("postgres.cluster", &self.cluster)?;
        if self.port == 0 {
            return Err(FieldError::new("postgres.port", "must be 1-65535"));
        }
        if self.probe_interval_ms < 50 {
            return Err(FieldError::new("postgres.probe_interval_ms", "must be at least 50"));
        }
        if self.replication_timeout_ms != 0 && self.replication_timeout_ms < 1_000 {
            return Err(FieldError::new(
                "postgres.replication_timeout_ms",
                "must be 0 (leave PostgreSQL's setting) or at least 1000",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<DatabaseSpec, FieldError> {
        let s: DatabaseSpec = toml::from_str(text).unwrap();
        s.validate().map(|_| s)
    }

    #[test]
    fn the_agent_state_file_sits_beside_the_data_dir_never_inside_it() {
        for dir in ["/var/lib/postgresql/15/main", "/var/lib/postgresql/15/main/"] {
            let cfg: PostgresAgentConfig =
                toml::from_str(&format!("cluster = \"main\"\ndata_dir = {dir:?}\n")).unwrap();
            assert_eq!(cfg.state_file(), PathBuf::from("/var/lib/postgresql/15/main.drover-agent.json"), "{dir}");
        }
        let cfg: PostgresAgentConfig =
            toml::from_str("cluster = \"main\"\ndata_dir = \"/d\"\nstate_file = \"/s/x.json\"\n").unwrap();
        assert_eq!(cfg.state_file(), PathBuf::from("/s/x.json"));
    }

    #[test]
    fn defaults_and_the_lease_rule() {
        let s = spec("members = [\"a\", \"b\"]").unwrap();
        assert_eq!((s.mode, s.port, s.dead_grace_ms, s.lease_ttl_ms), (DbMode::Async, 5432, 3000, 1000));
        assert_eq!(spec("members = []").unwrap_err().field, "members");
        assert_eq!(spec("members = [\"a\", \"a\"]").unwrap_err().field, "members");
        let e = spec("members = [\"a\"]\nlease_ttl_ms = 2500").unwrap_err();
        assert_eq!(e.field, "dead_grace_ms", "{e:?}");
    }
}
