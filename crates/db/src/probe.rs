//! What a PostgreSQL server says about itself: [`probe`] → [`DbStatus`].
//!
//! The agent probes its local server every interval and sends the [`DbStatus`] over its
//! WebSocket; the server probes each member directly too (one of the failover signals),
//! so a probe must never hang: the whole probe — connect and queries — runs under one
//! deadline, and a server that is down, refusing or silent is a [`ProbeError`].
//!
//! LSNs are `u64` byte positions (`16/B374D848` → `0x16_B374D848`), so lag is a
//! subtraction and the decision logic never parses text.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio_postgres::NoTls;

/// How to reach one PostgreSQL server (loopback or a private network; no TLS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    #[serde(default = "default_dbname")]
    pub dbname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

fn default_dbname() -> String {
    "postgres".into()
}

impl PgTarget {
    pub fn new(host: impl Into<String>, port: u16, user: impl Into<String>) -> Self {
        PgTarget { host: host.into(), port, user: user.into(), dbname: default_dbname(), password: None }
    }

    /// `host:port`, for messages.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// libpq-style connection string (as `pg_rewind --source-server` takes it).
    pub fn conninfo(&self) -> String {
        let mut s = format!(
            "host={} port={} user={} dbname={}",
            conninfo_value(&self.host),
            self.port,
            conninfo_value(&self.user),
            conninfo_value(&self.dbname)
        );
        if let Some(p) = &self.password {
            s.push_str(&format!(" password={}", conninfo_value(p)));
        }
        s
    }

    /// Connects within `timeout` and drives the connection on a spawned task, which ends
    /// when the returned client is dropped.
    pub async fn connect(&self, timeout: Duration) -> Result<tokio_postgres::Client, ProbeError> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name("drover")
            .connect_timeout(timeout);
        if let Some(p) = &self.password {
            cfg.password(p);
        }
        let connecting = cfg.connect(NoTls);
        let (client, connection) = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => return Err(ProbeError::Timeout { target: self.addr(), timeout_ms: timeout.as_millis() as u64 }),
            Ok(Err(e)) => return Err(ProbeError::Connect { target: self.addr(), detail: e.to_string() }),
            Ok(Ok(pair)) => pair,
        };
        tokio::spawn(async move {
            // The connection ends with an error when the server goes away; the client sees that too.
            let _ = connection.await;
        });
        Ok(client)
    }
}

/// Quotes a libpq conninfo value (single quotes; `\` and `'` escaped).
pub fn conninfo_value(v: &str) -> String {
    if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c)) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// What role a server plays, as it says itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
    #[default]
    Unknown,
}

/// One standby as the primary sees it (`pg_stat_replication`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StandbyStatus {
    /// The standby's `application_name` (its `cluster_name` / member name).
    pub name: String,
    pub client_addr: Option<String>,
    /// `startup`, `catchup`, `streaming`, `backup`, `stopping`.
    pub state: String,
    /// `async`, `potential`, `sync`, `quorum`.
    pub sync_state: String,
    pub sent_lsn: Option<u64>,
    pub flush_lsn: Option<u64>,
    pub replay_lsn: Option<u64>,
    /// The primary's current LSN minus the standby's replay LSN.
    pub lag_bytes: Option<u64>,
}

/// A server's state in one probe; serialized over the agent's WebSocket.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DbStatus {
    pub role: Role,
    pub in_recovery: bool,
    /// A primary whose new transactions may write (not fenced by `default_transaction_read_only`).
    pub accepting_writes: bool,
    /// Primary: the timeline it writes; replica: the timeline it receives (its last
    /// checkpoint's when no WAL receiver runs).
    pub timeline: Option<u32>,
    /// Primary only: `pg_current_wal_lsn()`.
    pub current_lsn: Option<u64>,
    /// Replica only: WAL received and flushed (`pg_last_wal_receive_lsn()`).
    pub received_lsn: Option<u64>,
    /// Replica only: WAL replayed (`pg_last_wal_replay_lsn()`).
    pub replayed_lsn: Option<u64>,
    /// Replica: received − replayed. Primary: the largest lag among its standbys.
    pub lag_bytes: Option<u64>,
    /// Replica: its WAL receiver is connected and streaming.
    pub wal_receiver_streaming: bool,
    /// Replica: `host:port` its WAL receiver streams from.
    pub upstream: Option<String>,
    /// Replica: milliseconds since its WAL receiver last heard from the primary.
    pub last_msg_age_ms: Option<u64>,
    /// Primary: every connected standby.
    pub standbys: Vec<StandbyStatus>,
    /// Primary: names of standbys that are `sync` or `quorum` right now.
    pub sync_standbys: Vec<String>,
    pub synchronous_standby_names: String,
    pub server_version_num: u32,
    /// `pg_conf_load_time()` in ms since the Unix epoch: it moves on every start and
    /// configuration reload, either of which may have changed a setting the agent keeps.
    #[serde(default)]
    pub conf_loaded_ms: Option<u64>,
}

impl DbStatus {
    /// The furthest WAL position this server is known to hold (current, received or replayed).
    pub fn wal_position(&self) -> Option<u64> {
        [self.current_lsn, self.received_lsn, self.replayed_lsn].into_iter().flatten().max()
    }
}

/// Why a probe produced no status. Every variant means "this server did not answer
/// usefully now"; none of them is retried inside the probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProbeError {
    #[error("cannot connect to PostgreSQL at {target}: {detail}")]
    Connect { target: String, detail: String },
    #[error("PostgreSQL at {target} did not answer within {timeout_ms} ms")]
    Timeout { target: String, timeout_ms: u64 },
    #[error("query on PostgreSQL at {target} failed: {detail}")]
    Query { target: String, detail: String },
    #[error("unexpected answer from PostgreSQL at {target}: {detail}")]
    Unexpected { target: String, detail: String },
}

/// Probes `target` within `timeout` (connect and queries together).
pub async fn probe(target: &PgTarget, timeout: Duration) -> Result<DbStatus, ProbeError> {
    let timed_out = || ProbeError::Timeout { target: target.addr(), timeout_ms: timeout.as_millis() as u64 };
    tokio::time::timeout(timeout, async {
        let client = target.connect(timeout).await?;
        probe_client(&client, &target.addr()).await
    })
    .await
    .unwrap_or_else(|_| Err(timed_out()))
}

const SELF_SQL: &str = "SELECT pg_is_in_recovery(),
    current_setting('default_transaction_read_only') = 'on',
    current_setting('server_version_num')::int,
    current_setting('synchronous_standby_names'),
    CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
    CASE WHEN pg_is_in_recovery() THEN NULL
         ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END,
    pg_last_wal_receive_lsn()::text,
    pg_last_wal_replay_lsn()::text,
    (SELECT timeline_id FROM pg_control_checkpoint()),
    (extract(epoch FROM pg_conf_load_time()) * 1000)::bigint";

const RECEIVER_SQL: &str = "SELECT status, received_tli, sender_host, sender_port,
    (extract(epoch FROM (now() - last_msg_receipt_time)) * 1000)::bigint
    FROM pg_stat_wal_receiver";

const STANDBYS_SQL: &str = "SELECT application_name, client_addr::text, state, sync_state,
    sent_lsn::text, flush_lsn::text, replay_lsn::text
    FROM pg_stat_replication ORDER BY application_name";

/// The probe's queries on an open connection (also used by operations that already hold one).
pub async fn probe_client(client: &tokio_postgres::Client, addr: &str) -> Result<DbStatus, ProbeError> {
    let query_err = |e: tokio_postgres::Error| ProbeError::Query { target: addr.to_string(), detail: e.to_string() };
    let row = client.query_one(SELF_SQL, &[]).await.map_err(query_err)?;
    let in_recovery: bool = row.get(0);
    let read_only: bool = row.get(1);
    let mut st = DbStatus {
        role: if in_recovery { Role::Replica } else { Role::Primary },
        in_recovery,
        accepting_writes: !in_recovery && !read_only,
        server_version_num: row.get::<_, i32>(2) as u32,
        synchronous_standby_names: row.get(3),
        conf_loaded_ms: row.get::<_, Option<i64>>(9).map(|ms| ms.max(0) as u64),
        ..DbStatus::default()
    };
    let checkpoint_tli: Option<i32> = row.get(8);
    if in_recovery {
        st.received_lsn = row.get::<_, Option<String>>(6).as_deref().and_then(parse_lsn);
        st.replayed_lsn = row.get::<_, Option<String>>(7).as_deref().and_then(parse_lsn);
        st.lag_bytes = st.received_lsn.zip(st.replayed_lsn).map(|(r, p)| r.saturating_sub(p));
        st.timeline = checkpoint_tli.map(|t| t as u32);
        if let Some(rx) = client.query_opt(RECEIVER_SQL, &[]).await.map_err(query_err)? {
            let status: Option<String> = rx.get(0);
            st.wal_receiver_streaming = status.as_deref() == Some("streaming");
            if let Some(tli) = rx.get::<_, Option<i32>>(1).filter(|t| *t > 0) {
                st.timeline = Some(tli as u32);
            }
            let host: Option<String> = rx.get(2);
            let port: Option<i32> = rx.get(3);
            st.upstream = host.zip(port).map(|(h, p)| format!("{h}:{p}"));
            st.last_msg_age_ms = rx.get::<_, Option<i64>>(4).map(|ms| ms.max(0) as u64);
        }
    } else {
        let current = row.get::<_, Option<String>>(4).as_deref().and_then(parse_lsn);
        st.current_lsn = current;
        st.timeline = row.get::<_, Option<i32>>(5).map(|t| t as u32);
        for r in client.query(STANDBYS_SQL, &[]).await.map_err(query_err)? {
            let lsn = |i: usize| r.get::<_, Option<String>>(i).as_deref().and_then(parse_lsn);
            let replay_lsn = lsn(6);
            let standby = StandbyStatus {
                name: r.get::<_, Option<String>>(0).unwrap_or_default(),
                client_addr: r.get(1),
                state: r.get::<_, Option<String>>(2).unwrap_or_default(),
                sync_state: r.get::<_, Option<String>>(3).unwrap_or_default(),
                sent_lsn: lsn(4),
                flush_lsn: lsn(5),
                replay_lsn,
                lag_bytes: current.zip(replay_lsn).map(|(c, p)| c.saturating_sub(p)),
            };
            if standby.sync_state == "sync" || standby.sync_state == "quorum" {
                st.sync_standbys.push(standby.name.clone());
            }
            st.standbys.push(standby);
        }
        st.lag_bytes = st.standbys.iter().filter_map(|s| s.lag_bytes).max();
    }
    if st.current_lsn.is_none() && !in_recovery {
        return Err(ProbeError::Unexpected {
            target: addr.to_string(),
            detail: "primary without a WAL position".into(),
        });
    }
    Ok(st)
}

/// Parses PostgreSQL's `pg_lsn` text form `HI/LO` (hex halves).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()? as u64;
    let lo = u32::from_str_radix(lo, 16).ok()? as u64;
    Some(hi << 32 | lo)
}

/// Formats a byte position as PostgreSQL's `pg_lsn` text.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips_through_u64() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn(&format_lsn(u64::MAX)), Some(u64::MAX));
    }

    #[test]
    fn malformed_lsn_text_is_none() {
        assert_eq!(parse_lsn("16B374D848"), None);
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(parse_lsn("1/100000000"), None, "a half wider than 32 bits is not an LSN");
    }

    #[test]
    fn conninfo_values_are_quoted_only_when_needed() {
        assert_eq!(conninfo_value("127.0.0.1"), "127.0.0.1");
        assert_eq!(conninfo_value("it's a\\b"), "'it\\'s a\\\\b'");
        assert_eq!(conninfo_value(""), "''");
    }

    #[test]
    fn wal_position_is_the_furthest_known_lsn() {
        let st = DbStatus { received_lsn: Some(10), replayed_lsn: Some(7), ..Default::default() };
        assert_eq!(st.wal_position(), Some(10));
        assert_eq!(DbStatus::default().wal_position(), None);
    }

    #[test]
    fn status_serializes_roles_in_snake_case() {
        let st = DbStatus { role: Role::Primary, ..Default::default() };
        let json = serde_json::to_value(&st).unwrap();
        assert_eq!(json["role"], "primary");
        let back: DbStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, st);
    }

    #[tokio::test]
    async fn probe_of_a_closed_port_is_a_connect_error_not_a_hang() {
        let port = drover_testkit::free_port();
        let started = std::time::Instant::now();
        let err = probe(&PgTarget::new("127.0.0.1", port, "postgres"), Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn probe_of_a_silent_server_times_out() {
        // Accepts TCP but never speaks: the startup handshake would wait forever.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let started = std::time::Instant::now();
        let err = probe(&PgTarget::new("127.0.0.1", port, "postgres"), Duration::from_millis(500)).await.unwrap_err();
        assert!(matches!(err, ProbeError::Timeout { .. } | ProbeError::Connect { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}
