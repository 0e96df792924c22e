//! The primary's side of split-brain safety: a lease from the server and the fencing
//! term, as pure functions for the agent (time passed in, the agent's monotonic clock).
//!
//! Patroni-style self-demotion: the server renews the primary's lease while it sees
//! the primary's agent; when a partition cuts the agent off, the lease lapses and the
//! agent fences its own PostgreSQL (read-only at once, then stop) *before* the server
//! can promote anyone. That ordering holds only when the timing does, which
//! [`check_timing`] verifies:
//!
//! ```text
//!   lease_ttl_ms + fence_budget_ms  <  dead_grace_ms
//! ```
//!
//! The server starts counting the agent as gone at most when the last renewal was sent;
//! the agent counts its lease from when it *asked* for the renewal (not when the answer
//! arrived), so a delayed answer can only shorten the lease, never stretch it past the
//! server's view.

use crate::decide::ClusterSpec;
use crate::probe::{DbStatus, Role};
use serde::{Deserialize, Serialize};

/// A lease the server granted to the primary's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The leader term it belongs to.
    pub term: u64,
    /// In the agent's monotonic clock: renewal request time + TTL.
    pub expires_at_ms: u64,
}

impl Lease {
    /// A lease asked for at `requested_at_ms` (agent clock) and granted for `ttl_ms`.
    pub fn granted(term: u64, requested_at_ms: u64, ttl_ms: u64) -> Self {
        Lease { term, expires_at_ms: requested_at_ms.saturating_add(ttl_ms) }
    }
}

/// What the primary's agent must do now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum LeaseVerdict {
    /// Not a writable primary, or the lease is valid.
    Keep,
    /// Fence the local PostgreSQL (`ops::fence`).
    Demote { reason: String },
}

/// Whether a local server in `status` may keep accepting writes under `lease`.
pub fn lease_verdict(status: &DbStatus, lease: Option<&Lease>, now_ms: u64) -> LeaseVerdict {
    if status.role != Role::Primary || !status.accepting_writes {
        return LeaseVerdict::Keep;
    }
    match lease {
        None => LeaseVerdict::Demote { reason: "writable primary without a lease from the server".into() },
        Some(l) if now_ms >= l.expires_at_ms => LeaseVerdict::Demote {
            reason: format!("lease for term {} lapsed {} ms ago", l.term, now_ms - l.expires_at_ms),
        },
        Some(_) => LeaseVerdict::Keep,
    }
}

/// Fencing token check for an order (promote, fence, repoint, rejoin) carrying
/// `order_term`: an agent that has seen `known_term` rejects anything older, so a
/// deposed decider's late orders do nothing.
pub fn accept_order(known_term: u64, order_term: u64) -> bool {
    order_term >= known_term
}

/// Refuses timings under which a partitioned primary could still be writable when
/// the server promotes another member.
pub fn check_timing(spec: &ClusterSpec, lease_ttl_ms: u64, fence_budget_ms: u64) -> Result<(), String> {
    let needed = lease_ttl_ms.saturating_add(fence_budget_ms);
    if needed < spec.dead_grace_ms {
        Ok(())
    } else {
        Err(format!(
            "database {}: lease TTL {lease_ttl_ms} ms + fence budget {fence_budget_ms} ms must be below \
             dead_grace_ms {} ms, or a partitioned primary may still take writes when another is promoted",
            spec.name, spec.dead_grace_ms
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Mode;

    fn writable() -> DbStatus {
        DbStatus { role: Role::Primary, accepting_writes: true, ..Default::default() }
    }

    #[test]
    fn a_primary_demotes_itself_once_its_lease_lapses() {
        let lease = Lease::granted(3, 1_000, 2_000);
        assert_eq!(lease_verdict(&writable(), Some(&lease), 2_999), LeaseVerdict::Keep);
        let v = lease_verdict(&writable(), Some(&lease), 3_000);
        assert!(matches!(&v, LeaseVerdict::Demote { reason } if reason.contains("term 3")), "{v:?}");
    }

    #[test]
    fn a_writable_primary_without_any_lease_demotes() {
        assert!(matches!(lease_verdict(&writable(), None, 0), LeaseVerdict::Demote { .. }));
    }

    #[test]
    fn replicas_and_already_fenced_primaries_need_no_lease() {
        let replica = DbStatus { role: Role::Replica, ..Default::default() };
        assert_eq!(lease_verdict(&replica, None, 10), LeaseVerdict::Keep);
        let fenced = DbStatus { accepting_writes: false, ..writable() };
        assert_eq!(lease_verdict(&fenced, None, 10), LeaseVerdict::Keep);
    }

    #[test]
    fn orders_from_an_older_term_are_rejected() {
        assert!(accept_order(4, 4));
        assert!(accept_order(4, 5));
        assert!(!accept_order(4, 3));
    }

    #[test]
    fn timing_must_let_the_old_primary_fence_itself_before_a_promotion() {
        let spec = ClusterSpec {
            name: "orders".into(),
            mode: Mode::Sync,
            max_lag_on_failover_bytes: 0,
            max_replica_lag_bytes: 0,
            read_fallback_to_primary: false,
            members: vec![],
            dead_grace_ms: 5_000,
            status_max_age_ms: 3_000,
            catch_up_timeout_ms: 0,
        };
        assert!(check_timing(&spec, 3_000, 1_000).is_ok());
        assert!(check_timing(&spec, 4_000, 1_000).unwrap_err().contains("must be below"));
    }
}
