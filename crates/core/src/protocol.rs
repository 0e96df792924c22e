//! The agent ↔ server protocol: JSON text frames over one WebSocket.
//!
//! The agent opens `GET /api/v1/agent/ws` with `Authorization: Bearer <agent token>`,
//! sends [`AgentMessage::Hello`], and the server answers [`ServerMessage::Welcome`].
//! Results carry a per-session sequence number; the server acknowledges cumulatively
//! (`Ack { up_to }`) only once the result is durably stored, and the agent re-sends
//! everything unacknowledged after a reconnect. The server drops re-sent results it
//! already stored (same `session`, `seq <= last acknowledged`), so delivery is
//! at-least-once on the wire and exactly-once in the event history.

use crate::event::CheckResult;
use crate::metrics::MetricPoint;
use crate::resource::{CheckSpec, Entity};
use serde::{Deserialize, Serialize};

/// Bumped on incompatible changes; the server refuses other versions with a clear error.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello(Hello),
    Keepalive(Keepalive),
    Result {
        seq: u64,
        result: CheckResult,
    },
    /// Sent on a clean stop when the agent is configured to deregister.
    Deregister,
    /// The local database's state, every probe interval: `status` is a
    /// `drover_db::probe::DbStatus` as JSON, or `error` says why the probe failed
    /// (typed at the edges so this crate does not depend on the database driver).
    DbReport {
        cluster: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<serde_json::Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The outcome of a [`ServerMessage::DbOrder`].
    DbOrderDone {
        id: u64,
        ok: bool,
        detail: String,
    },
}

impl AgentMessage {
    /// Parses a frame. Results are nearly every frame, and serde's internally tagged
    /// enums buffer the whole object before choosing a variant; a frame that starts
    /// with the `result` tag (as drover agents write it) is parsed straight into its
    /// fields instead. Anything else takes the general path, so field order is still
    /// free for other clients.
    pub fn parse(text: &str) -> Result<AgentMessage, serde_json::Error> {
        #[derive(Deserialize)]
        struct ResultFrame {
            seq: u64,
            result: CheckResult,
        }
        if text.starts_with(r#"{"type":"result","#)
            && let Ok(f) = serde_json::from_str::<ResultFrame>(text)
        {
            return Ok(AgentMessage::Result { seq: f.seq, result: f.result });
        }
        serde_json::from_str(text)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Random per agent process; lets the server recognise re-sent results.
    pub session: String,
    pub entity: Entity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keepalive {
    #[serde(default)]
    pub metrics: Vec<MetricPoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        /// The highest seq of this session the server already stored, so a reconnecting
        /// agent can drop those from its buffer at once.
        acked_up_to: u64,
    },
    Ack {
        up_to: u64,
    },
    Request(Box<CheckRequest>),
    /// A fatal problem with this connection (bad hello, bad frame); the server closes it next.
    Error {
        message: String,
    },
    /// Do one database operation: `op` is a `drover_db::decide::Step` aimed at this
    /// agent's member. `term` is the fencing token: an agent refuses an order whose term
    /// is below one it has already seen (`drover_db::lease::accept_order`).
    DbOrder {
        id: u64,
        cluster: String,
        term: u64,
        op: serde_json::Value,
    },
    /// The primary's lease for `term`, valid `ttl_ms` from when the agent receives it;
    /// a primary whose lease lapses fences itself (`drover_db::lease::lease_verdict`).
    DbLease {
        cluster: String,
        term: u64,
        ttl_ms: u64,
    },
}

/// "Run this check now." The agent substitutes tokens from `proxy_entity` if set, else
/// from its own entity, and reports the result for that entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub check: CheckSpec,
    pub issued_ms: i64,
    /// Wait this long before starting, so a subscription's agents spread their runs.
    #[serde(default)]
    pub splay_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_entity: Option<Entity>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Status;

    #[test]
    fn messages_round_trip_with_type_tags() {
        let m = AgentMessage::Result {
            seq: 7,
            result: CheckResult {
                check: "c".into(),
                entity: String::new(),
                status: Status::Warning,
                output: "W".into(),
                issued_ms: 1,
                executed_ms: 2,
                duration_ms: 3,
                metrics: vec![],
                check_config: None,
            },
        };
        let s = serde_json::to_string(&m).unwrap();
        assert!(s.starts_with("{\"type\":\"result\""), "{s}");
        assert_eq!(serde_json::from_str::<AgentMessage>(&s).unwrap(), m);
        let ack: ServerMessage = serde_json::from_str(r#"{"type":"ack","up_to":5}"#).unwrap();
        assert_eq!(ack, ServerMessage::Ack { up_to: 5 });
    }

    #[test]
    fn result_frames_parse_the_same_on_the_fast_and_general_paths() {
        let fast = r#"{"type":"result","seq":3,"result":{"check":"c","status":2,"output":"x"}}"#;
        let reordered = r#"{"seq":3,"result":{"check":"c","status":2,"output":"x"},"type":"result"}"#;
        let a = AgentMessage::parse(fast).unwrap();
        assert_eq!(a, AgentMessage::parse(reordered).unwrap());
        assert_eq!(a, serde_json::from_str::<AgentMessage>(fast).unwrap());
        // A malformed result on the fast path still fails, with serde's message.
        assert!(AgentMessage::parse(r#"{"type":"result","seq":"x"}"#).is_err());
        assert!(matches!(AgentMessage::parse(r#"{"type":"keepalive","metrics":[]}"#), Ok(AgentMessage::Keepalive(_))));
    }

    #[test]
    fn unknown_message_type_is_an_error() {
        assert!(serde_json::from_str::<AgentMessage>(r#"{"type":"bogus"}"#).is_err());
    }
}
