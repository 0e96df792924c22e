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

/// The fencing term and lease as an agent keeps them on disk, so that its own restart
/// neither forgets a lease that has lapsed (a restarted agent beside a partitioned
/// primary would otherwise never fence it: it waits for a first lease that cannot
/// come) nor lowers the term it refuses older orders below.
///
/// The expiry is kept in `CLOCK_BOOTTIME` milliseconds, a clock that runs on across
/// process restarts (and suspends) and never steps, with the boot it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedTerms {
    pub cluster: String,
    /// `/proc/sys/kernel/random/boot_id` when written.
    pub boot_id: String,
    pub known_term: u64,
    /// `None` while self-demotion is not armed (no lease yet, or disarmed by a promotion).
    pub lease: Option<SavedLease>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedLease {
    pub term: u64,
    pub expires_boottime_ms: u64,
}

impl SavedTerms {
    /// What to write for `known_term` and `lease` (agent clock `agent_now_ms`, boot clock
    /// `boottime_now_ms` read at the same moment).
    pub fn capture(
        cluster: &str,
        boot_id: &str,
        known_term: u64,
        lease: Option<&Lease>,
        agent_now_ms: u64,
        boottime_now_ms: u64,
    ) -> SavedTerms {
        SavedTerms {
            cluster: cluster.to_string(),
            boot_id: boot_id.to_string(),
            known_term,
            lease: lease.map(|l| SavedLease {
                term: l.term,
                expires_boottime_ms: boottime_now_ms.saturating_add(l.expires_at_ms.saturating_sub(agent_now_ms)),
            }),
        }
    }

    /// The known term and lease a restarted agent starts from, in its new clock.
    ///
    /// A lease written in another boot counts as lapsed: the machine went down, and
    /// its PostgreSQL may have come back writable with nobody having renewed anything.
    /// Another cluster's file gives nothing (the agent was re-pointed).
    pub fn restore(
        &self,
        cluster: &str,
        boot_id: &str,
        agent_now_ms: u64,
        boottime_now_ms: u64,
    ) -> (u64, Option<Lease>) {
        if self.cluster != cluster {
            return (0, None);
        }
        let lease = self.lease.map(|l| {
            // An unknown boot (empty id) matches none, not even another unknown one.
            let same_boot = !boot_id.is_empty() && self.boot_id == boot_id;
            let left_ms = if same_boot { l.expires_boottime_ms.saturating_sub(boottime_now_ms) } else { 0 };
            Lease { term: l.term, expires_at_ms: agent_now_ms.saturating_add(left_ms) }
        });
        (self.known_term, lease)
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
    fn a_saved_lease_keeps_its_remaining_time_across_an_agent_restart_in_the_same_boot() {
        // Granted at agent ms 1_000 for 2_000 ms; saved at agent ms 1_500 = boot ms 90_000.
        let lease = Lease::granted(4, 1_000, 2_000);
        let saved = SavedTerms::capture("main", "boot-a", 6, Some(&lease), 1_500, 90_000);
        assert_eq!(saved.lease.unwrap().expires_boottime_ms, 91_500);
        // The new process's clock starts near 0; 700 ms of boot time went by.
        let (known, restored) = saved.restore("main", "boot-a", 5, 90_700);
        assert_eq!(known, 6, "the known term survives");
        let restored = restored.expect("still armed");
        assert_eq!((restored.term, restored.expires_at_ms), (4, 5 + 800));
        assert_eq!(lease_verdict(&writable(), Some(&restored), 5 + 799), LeaseVerdict::Keep);
        assert!(matches!(lease_verdict(&writable(), Some(&restored), 5 + 800), LeaseVerdict::Demote { .. }));
    }

    #[test]
    fn a_lease_that_lapsed_while_the_agent_was_down_or_before_a_reboot_is_lapsed_at_once() {
        let lease = Lease::granted(4, 0, 1_000);
        let saved = SavedTerms::capture("main", "boot-a", 4, Some(&lease), 0, 10_000);
        let (_, later) = saved.restore("main", "boot-a", 0, 60_000);
        assert!(matches!(lease_verdict(&writable(), later.as_ref(), 0), LeaseVerdict::Demote { .. }));
        // A reboot: the boot clock starts over, so even "time left" by it means nothing.
        let (known, rebooted) = saved.restore("main", "boot-b", 0, 5);
        assert_eq!(known, 4);
        assert!(matches!(lease_verdict(&writable(), rebooted.as_ref(), 0), LeaseVerdict::Demote { .. }));
        let unknown = SavedTerms::capture("main", "", 4, Some(&lease), 0, 10_000);
        let (_, unknown) = unknown.restore("main", "", 0, 10_000);
        assert!(matches!(lease_verdict(&writable(), unknown.as_ref(), 0), LeaseVerdict::Demote { .. }));
    }

    #[test]
    fn an_unarmed_or_other_clusters_file_leaves_the_watchdog_unarmed() {
        let unarmed = SavedTerms::capture("main", "boot-a", 9, None, 0, 0);
        assert_eq!(unarmed.restore("main", "boot-a", 0, 0), (9, None));
        let lease = Lease::granted(9, 0, 1_000);
        let other = SavedTerms::capture("main", "boot-a", 9, Some(&lease), 0, 0);
        assert_eq!(other.restore("orders", "boot-a", 0, 0), (0, None));
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
