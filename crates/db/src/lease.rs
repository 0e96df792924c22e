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
//! the agent counts its lease from when it reads the grant, so a grant delayed on the way
//! outlasts the server's view by that delay, which the fence budget has to cover.

use crate::decide::ClusterSpec;
use crate::probe::{DbStatus, Role};
use serde::{Deserialize, Serialize};

/// A lease the server granted to the primary's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The leader term it belongs to.
    pub term: u64,
    /// In the agent's monotonic clock: when the grant was read + TTL.
    pub expires_at_ms: u64,
    /// The TTL it was granted for.
    #[serde(default)]
    pub ttl_ms: u64,
}

impl Lease {
    /// A lease read at `requested_at_ms` (agent clock) and granted for `ttl_ms`.
    pub fn granted(term: u64, requested_at_ms: u64, ttl_ms: u64) -> Self {
        Lease { term, expires_at_ms: requested_at_ms.saturating_add(ttl_ms), ttl_ms }
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

/// What an agent keeps on disk so that its own restart neither disarms self-demotion
/// (restarted beside a partitioned primary, it would otherwise wait for a first lease
/// that cannot come, and the primary would stay writable beside the one the server
/// promotes) nor lowers the term it refuses older orders below.
///
/// Not the lease's expiry: a restarted agent that was armed re-arms with a lease of one
/// TTL from its own start. A dead agent fences nothing, so its restart can only shorten
/// the time a cut-off primary stays writable; and a restart with the server in reach
/// (an upgrade, a reboot, maintenance) is leased again within that TTL instead of
/// fencing a healthy primary. No field is refused: a file written by a later version
/// still loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTerms {
    pub cluster: String,
    pub known_term: u64,
    /// `None` while self-demotion is not armed (no lease yet, or disarmed by a promotion).
    pub lease: Option<SavedLease>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLease {
    pub term: u64,
    pub ttl_ms: u64,
}

impl SavedTerms {
    /// What to keep for `known_term` and `lease`. Renewals of one lease capture alike,
    /// so only a new term, arming or disarming calls for a write.
    pub fn capture(cluster: &str, known_term: u64, lease: Option<&Lease>) -> SavedTerms {
        SavedTerms {
            cluster: cluster.to_string(),
            known_term,
            lease: lease.map(|l| SavedLease { term: l.term, ttl_ms: l.ttl_ms }),
        }
    }

    /// The known term and lease an agent of `cluster` started at `agent_now_ms` (its
    /// clock) begins with; `None` for another cluster's file (the agent was re-pointed).
    pub fn restore(&self, cluster: &str, agent_now_ms: u64) -> Option<(u64, Option<Lease>)> {
        (self.cluster == cluster)
            .then(|| (self.known_term, self.lease.map(|l| Lease::granted(l.term, agent_now_ms, l.ttl_ms))))
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
    fn a_restarted_agent_keeps_its_term_and_re_arms_for_one_ttl_from_its_start() {
        let lease = Lease::granted(4, 1_000, 2_000);
        let saved = SavedTerms::capture("main", 6, Some(&lease));
        // A renewal of the same lease saves nothing new.
        assert_eq!(SavedTerms::capture("main", 6, Some(&Lease::granted(4, 1_500, 2_000))), saved);
        let (known, restored) = saved.restore("main", 5).unwrap();
        assert_eq!(known, 6, "the known term survives");
        let restored = restored.expect("armed again");
        assert_eq!((restored.term, restored.expires_at_ms), (4, 5 + 2_000));
        assert_eq!(lease_verdict(&writable(), Some(&restored), 5 + 1_999), LeaseVerdict::Keep);
        // Not leased again within that TTL (cut off from the server): it fences.
        assert!(matches!(lease_verdict(&writable(), Some(&restored), 5 + 2_000), LeaseVerdict::Demote { .. }));
    }

    #[test]
    fn an_unarmed_or_other_clusters_file_leaves_the_watchdog_unarmed() {
        let unarmed = SavedTerms::capture("main", 9, None);
        assert_eq!(unarmed.restore("main", 0), Some((9, None)));
        let other = SavedTerms::capture("main", 9, Some(&Lease::granted(9, 0, 1_000)));
        assert_eq!(other.restore("orders", 0), None);
    }

    #[test]
    fn a_file_with_fields_from_a_later_version_still_loads() {
        let text = r#"{"cluster":"main","known_term":3,"lease":{"term":3,"ttl_ms":1000,"new":1},"more":true}"#;
        let saved: SavedTerms = serde_json::from_str(text).unwrap();
        assert_eq!(saved.restore("main", 0), Some((3, Some(Lease::granted(3, 0, 1_000)))));
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
