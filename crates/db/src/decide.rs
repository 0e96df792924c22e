//! Failover, switchover and reconciliation decisions: pure functions of a cluster spec,
//! observations and the leader record, with time passed in as `now_ms` (the server's
//! clock). No I/O: the server feeds an [`Observer`], calls [`decide`] on every tick and
//! executes the returned [`Step`]s in order.
//!
//! The rules, each quoted by the tests that check it:
//!
//! 1. **No single signal promotes.** The primary is dead only when *all* of these have
//!    held for `dead_grace_ms`: its agent is gone (disconnected, silent past
//!    `status_max_age_ms`, or reporting its PostgreSQL down); the server's own direct
//!    probe of its PostgreSQL fails; every reachable replica reports its WAL receiver
//!    not streaming — and at least one replica is reachable to say so.
//! 2. **A primary that answers is healthy.** A fresh status from either channel that
//!    shows the leader as a writable primary means no failover, whatever else is seen.
//! 3. **Sync mode loses no acknowledged commit.** Only a standby recorded in the leader
//!    record's `sync_standbys` (the members that may have acknowledged commits) is a
//!    candidate, and every recorded one must be reachable, so the one with the most WAL
//!    is known; otherwise refuse.
//! 4. **Async mode bounds the loss.** The candidate is the reachable replica with the
//!    most WAL (received, else replayed; ties by spec order); refuse when it is more
//!    than `max_lag_on_failover_bytes` behind the old primary's last known position.
//! 5. **Never two primaries.** A failover's first step is a compare-and-swap of the
//!    leader record from the current term to term + 1; a decider whose swap fails
//!    stops. Then: fence the old primary at the proxy, then through its agent, promote,
//!    repoint the other replicas, publish roles, record the event.
//! 6. **Switchover loses nothing.** The primary is made read-only, the target catches up
//!    to its final position, only then the term moves, the old primary stops cleanly,
//!    the target is promoted and the old primary rejoins.
//! 7. **A returning old primary is never writable through drover.** Any member other
//!    than the leader that reports itself primary is fenced at the proxy and rejoined
//!    via pg_rewind ([`reconcile`]); so is one whose agent reports its PostgreSQL down
//!    for the grace period (a crashed old primary or replica is brought back as a
//!    replica of the leader).

use crate::ops::synchronous_standby_names_value;
use crate::probe::{DbStatus, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `async`: commits wait for the primary only; `sync`: for one synchronous standby too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Async,
    Sync,
}

/// One member of a database cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    pub name: String,
    /// `host:port` as replicas reach its PostgreSQL (compared with their WAL receiver's upstream).
    pub addr: String,
}

/// The `database` resource, as far as decisions need it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSpec {
    pub name: String,
    pub mode: Mode,
    pub max_lag_on_failover_bytes: u64,
    /// Read endpoint: a replica further behind than this is out of rotation (`db-replica` not OK).
    pub max_replica_lag_bytes: u64,
    /// Read endpoint: when no replica is in rotation, `db-read` is OK on the primary.
    pub read_fallback_to_primary: bool,
    /// In priority order: ties between candidates go to the earlier one.
    pub members: Vec<MemberSpec>,
    /// How long every death signal must hold before a failover.
    pub dead_grace_ms: u64,
    /// A status older than this no longer describes the member.
    pub status_max_age_ms: u64,
    /// How long a switchover waits for its target to catch up.
    pub catch_up_timeout_ms: u64,
}

impl ClusterSpec {
    fn addr(&self, member: &str) -> Option<&str> {
        self.members.iter().find(|m| m.name == member).map(|m| m.addr.as_str())
    }

    fn rank(&self, member: &str) -> usize {
        self.members.iter().position(|m| m.name == member).unwrap_or(usize::MAX)
    }
}

/// Who is primary, under which term, and which standbys may have acknowledged its
/// commits. Lives in the store; only ever replaced by compare-and-swap on `term`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub member: String,
    /// Fencing token: strictly increases with every change of primary.
    pub term: u64,
    /// Sync mode: members listed in the primary's `synchronous_standby_names`. To keep
    /// rule 3 sound the server adds a name here *before* listing it in PostgreSQL and
    /// removes it from PostgreSQL *before* removing it here.
    #[serde(default)]
    pub sync_standbys: Vec<String>,
}

/// What a member's agent says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AgentView {
    /// Disconnected (or never connected) since `since_ms`.
    Gone { since_ms: u64 },
    /// Connected, but its local probe has failed since `since_ms`.
    LocalDown { since_ms: u64, error: String },
    /// Connected; its latest local probe, received at `at_ms`.
    Up { status: DbStatus, at_ms: u64 },
}

/// What the server's own probe of a member's PostgreSQL says.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DirectProbe {
    #[default]
    NotYet,
    Ok {
        status: DbStatus,
        at_ms: u64,
    },
    Failed {
        since_ms: u64,
        error: String,
    },
}

/// Everything known about one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberObservation {
    pub agent: AgentView,
    pub direct: DirectProbe,
    /// Since when statuses (from either channel) show a replica whose WAL receiver is
    /// not streaming; `None` while it streams or when unknown.
    pub receiver_lost_since_ms: Option<u64>,
    /// The furthest WAL position ever seen from this member (either channel).
    pub last_wal_position: Option<u64>,
}

pub type Observations = BTreeMap<String, MemberObservation>;

/// Turns the server's raw events into [`Observations`], keeping the "since" times the
/// rules need. Pure state: the caller passes `now_ms` with every event.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Observer {
    members: Observations,
}

impl Observer {
    /// Every member starts as gone since `now_ms` (the server's start), so a member
    /// that never connects is judged one grace period after the server came up.
    pub fn new<'a>(members: impl IntoIterator<Item = &'a str>, now_ms: u64) -> Self {
        let members = members
            .into_iter()
            .map(|m| {
                let obs = MemberObservation {
                    agent: AgentView::Gone { since_ms: now_ms },
                    direct: DirectProbe::NotYet,
                    receiver_lost_since_ms: None,
                    last_wal_position: None,
                };
                (m.to_string(), obs)
            })
            .collect();
        Observer { members }
    }

    pub fn observations(&self) -> &Observations {
        &self.members
    }

    fn member(&mut self, member: &str, now_ms: u64) -> &mut MemberObservation {
        self.members.entry(member.to_string()).or_insert_with(|| MemberObservation {
            agent: AgentView::Gone { since_ms: now_ms },
            direct: DirectProbe::NotYet,
            receiver_lost_since_ms: None,
            last_wal_position: None,
        })
    }

    /// The member's agent disconnected.
    pub fn agent_gone(&mut self, member: &str, now_ms: u64) {
        let m = self.member(member, now_ms);
        if !matches!(m.agent, AgentView::Gone { .. }) {
            m.agent = AgentView::Gone { since_ms: now_ms };
        }
    }

    /// The member's agent reported its local probe.
    pub fn agent_report(&mut self, member: &str, result: Result<DbStatus, String>, now_ms: u64) {
        let m = self.member(member, now_ms);
        match result {
            Ok(status) => {
                note_status(m, &status, now_ms);
                m.agent = AgentView::Up { status, at_ms: now_ms };
            }
            Err(error) => {
                let since_ms = match &m.agent {
                    AgentView::LocalDown { since_ms, .. } => *since_ms,
                    _ => now_ms,
                };
                m.agent = AgentView::LocalDown { since_ms, error };
            }
        }
    }

    /// The server's own probe of the member finished.
    pub fn direct_probe(&mut self, member: &str, result: Result<DbStatus, String>, now_ms: u64) {
        let m = self.member(member, now_ms);
        match result {
            Ok(status) => {
                note_status(m, &status, now_ms);
                m.direct = DirectProbe::Ok { status, at_ms: now_ms };
            }
            Err(error) => {
                let since_ms = match &m.direct {
                    DirectProbe::Failed { since_ms, .. } => *since_ms,
                    _ => now_ms,
                };
                m.direct = DirectProbe::Failed { since_ms, error };
            }
        }
    }

    /// After a change of primary, old positions (on the old timeline) mean nothing.
    pub fn new_term(&mut self) {
        for m in self.members.values_mut() {
            m.last_wal_position = None;
        }
    }
}

fn note_status(m: &mut MemberObservation, status: &DbStatus, now_ms: u64) {
    m.last_wal_position = m.last_wal_position.max(status.wal_position());
    if status.role == Role::Replica && !status.wal_receiver_streaming {
        m.receiver_lost_since_ms.get_or_insert(now_ms);
    } else {
        m.receiver_lost_since_ms = None;
    }
}

/// One thing the server does (itself, or by ordering an agent or publishing to proxies).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Replace the leader record only if its term is still `expected_term`; if the
    /// swap fails another decider won: stop executing.
    CompareAndSwapLeader { expected_term: u64, new: LeaderRecord },
    /// Publish `db-primary` not OK for `member`: the proxy stops routing to it and
    /// closes its client connections. Must complete before any promotion.
    FenceProxy { member: String },
    /// Order the agent to fence (read-only, then stop). Best effort when the agent is
    /// gone: it is delivered if the agent returns, and self-demotion covers a partition.
    FenceAgent { member: String },
    /// Order the agent to make its PostgreSQL read-only (switchover).
    MakeReadOnly { member: String },
    /// Wait until `member` has replayed everything `primary` wrote (switchover);
    /// on timeout run the switchover's `abort` steps instead of the rest.
    WaitCatchUp { member: String, primary: String, timeout_ms: u64 },
    /// Order the agent to promote, with this `synchronous_standby_names` ('' = async).
    Promote { member: String, synchronous_standby_names: String },
    /// Order the agent to stream from `primary`.
    Repoint { member: String, primary: String },
    /// Order the agent to stop, pg_rewind from `primary` and start as its replica; on
    /// failure it stays stopped (fenced) and the server raises an event.
    Rejoin { member: String, primary: String },
    /// Undo [`Step::MakeReadOnly`] (aborted switchover).
    MakeWritable { member: String },
    /// Publish `db-primary` OK on `primary` only, and `db-replica` on `replicas`.
    PublishRoles { primary: String, replicas: Vec<String> },
    /// Record an event so people are told.
    RecordEvent { message: String },
}

/// What [`decide`] concluded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// The leader answers as a writable primary.
    Healthy,
    /// Something is wrong but the evidence does not (yet) justify a failover.
    Wait {
        reason: String,
    },
    Failover {
        from: String,
        to: String,
        term: u64,
        steps: Vec<Step>,
    },
    /// A failover is due but would break a rule (loss or lag); people must act.
    Refuse {
        reason: String,
    },
}

/// A switchover's plan: `steps` in order, `abort` when the target does not catch up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    pub from: String,
    pub to: String,
    pub term: u64,
    pub steps: Vec<Step>,
    pub abort: Vec<Step>,
}

fn fresh(at_ms: u64, spec: &ClusterSpec, now_ms: u64) -> bool {
    now_ms.saturating_sub(at_ms) <= spec.status_max_age_ms
}

/// The member's freshest status from either channel, if any is fresh.
fn current_status<'a>(o: &'a MemberObservation, spec: &ClusterSpec, now_ms: u64) -> Option<&'a DbStatus> {
    let agent = match &o.agent {
        AgentView::Up { status, at_ms } if fresh(*at_ms, spec, now_ms) => Some((status, *at_ms)),
        _ => None,
    };
    let direct = match &o.direct {
        DirectProbe::Ok { status, at_ms } if fresh(*at_ms, spec, now_ms) => Some((status, *at_ms)),
        _ => None,
    };
    // On a tie the agent's wins (max_by_key keeps the last): it also carries its standbys' view.
    [direct, agent].into_iter().flatten().max_by_key(|(_, at)| *at).map(|(s, _)| s)
}

/// The status of a member whose agent is up and fresh (it can carry out orders).
fn agent_status<'a>(o: &'a MemberObservation, spec: &ClusterSpec, now_ms: u64) -> Option<&'a DbStatus> {
    match &o.agent {
        AgentView::Up { status, at_ms } if fresh(*at_ms, spec, now_ms) => Some(status),
        _ => None,
    }
}

/// Since when the member's agent counts as gone (rule 1), if it does.
fn agent_down_since(o: &MemberObservation, spec: &ClusterSpec, now_ms: u64) -> Option<u64> {
    match &o.agent {
        AgentView::Gone { since_ms } | AgentView::LocalDown { since_ms, .. } => Some(*since_ms),
        AgentView::Up { at_ms, .. } if !fresh(*at_ms, spec, now_ms) => Some(at_ms + spec.status_max_age_ms),
        AgentView::Up { .. } => None,
    }
}

/// The member's agent cannot answer an order: gone, or its reports went stale (a
/// partition leaves its connection looking open). One that reports its PostgreSQL
/// down still answers.
pub fn agent_silent(o: &MemberObservation, spec: &ClusterSpec, now_ms: u64) -> bool {
    !matches!(o.agent, AgentView::LocalDown { .. }) && agent_status(o, spec, now_ms).is_none()
}

fn is_writable_primary(s: &DbStatus) -> bool {
    s.role == Role::Primary && s.accepting_writes
}

fn held(since: u64, spec: &ClusterSpec, now_ms: u64) -> bool {
    now_ms.saturating_sub(since) >= spec.dead_grace_ms
}

/// Decides whether the leader is healthy, whether to wait, fail over or refuse.
pub fn decide(spec: &ClusterSpec, obs: &Observations, leader: &LeaderRecord, now_ms: u64) -> Decision {
    let primary = leader.member.as_str();
    let none = MemberObservation {
        agent: AgentView::Gone { since_ms: 0 },
        direct: DirectProbe::NotYet,
        receiver_lost_since_ms: None,
        last_wal_position: None,
    };
    let p = obs.get(primary).unwrap_or(&none);

    // Rule 2.
    if let Some(st) = current_status(p, spec, now_ms) {
        return if is_writable_primary(st) {
            Decision::Healthy
        } else if st.role == Role::Primary {
            Decision::Wait { reason: format!("primary {primary} answers but is read-only (fenced or switching over)") }
        } else {
            Decision::Wait { reason: format!("leader {primary} answers as a replica; the leader record is stale") }
        };
    }

    // Rule 1: gather the three signals.
    let mut missing = Vec::new();
    let mut since = 0u64;
    match agent_down_since(p, spec, now_ms) {
        Some(s) => since = since.max(s),
        None => missing.push(format!("agent of {primary} is connected")),
    }
    match &p.direct {
        DirectProbe::Failed { since_ms, .. } => since = since.max(*since_ms),
        DirectProbe::NotYet => missing.push(format!("server has not probed {primary} yet")),
        DirectProbe::Ok { .. } => missing.push(format!("server's last probe of {primary} succeeded")),
    }
    let replicas: Vec<(&str, &MemberObservation, &DbStatus)> = spec
        .members
        .iter()
        .filter(|m| m.name != primary)
        .filter_map(|m| {
            let o = obs.get(&m.name)?;
            let st = current_status(o, spec, now_ms)?;
            (st.role == Role::Replica).then_some((m.name.as_str(), o, st))
        })
        .collect();
    if replicas.is_empty() {
        missing.push("no replica is reachable to confirm".into());
    }
    for (name, o, st) in &replicas {
        match o.receiver_lost_since_ms {
            Some(s) if !st.wal_receiver_streaming => since = since.max(s),
            _ => missing.push(format!("{name} still streams WAL")),
        }
    }
    if !missing.is_empty() {
        return Decision::Wait { reason: format!("primary {primary} not answering, but {}", missing.join("; ")) };
    }
    if !held(since, spec, now_ms) {
        return Decision::Wait {
            reason: format!(
                "primary {primary} looks dead from every side for {} ms of the {} ms grace",
                now_ms.saturating_sub(since),
                spec.dead_grace_ms
            ),
        };
    }

    let candidate = match choose_candidate(spec, obs, leader, now_ms, None) {
        Ok(c) => c,
        Err(reason) => return Decision::Refuse { reason },
    };
    let others: Vec<String> = replicas
        .iter()
        .filter(|(name, o, _)| *name != candidate && agent_status(o, spec, now_ms).is_some())
        .map(|(name, _, _)| name.to_string())
        .collect();
    let (term, steps) = failover_steps(spec, leader, &candidate, &others);
    Decision::Failover { from: primary.to_string(), to: candidate, term, steps }
}

/// Rules 3 and 4 (and the switchover target check when `target` is given).
fn choose_candidate(
    spec: &ClusterSpec,
    obs: &Observations,
    leader: &LeaderRecord,
    now_ms: u64,
    target: Option<&str>,
) -> Result<String, String> {
    // Only a member whose agent is up can be promoted.
    let reachable: Vec<(&str, u64)> = spec
        .members
        .iter()
        .filter(|m| m.name != leader.member)
        .filter_map(|m| {
            let st = agent_status(obs.get(&m.name)?, spec, now_ms)?;
            (st.role == Role::Replica).then_some((m.name.as_str(), st.wal_position()?))
        })
        .collect();
    let eligible: Vec<(&str, u64)> = match spec.mode {
        Mode::Sync => {
            if leader.sync_standbys.is_empty() {
                return Err("sync mode: no standby is recorded as synchronous, so any promotion could lose \
                            acknowledged commits"
                    .into());
            }
            let unreachable: Vec<&str> = leader
                .sync_standbys
                .iter()
                .map(String::as_str)
                .filter(|s| !reachable.iter().any(|(n, _)| n == s))
                .collect();
            if !unreachable.is_empty() {
                return Err(format!(
                    "sync mode: synchronous standby {} is unreachable and may hold acknowledged commits \
                     the others lack",
                    unreachable.join(", ")
                ));
            }
            reachable.into_iter().filter(|(n, _)| leader.sync_standbys.iter().any(|s| s == n)).collect()
        }
        Mode::Async => reachable,
    };
    let best = eligible
        .iter()
        .copied()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| spec.rank(b.0).cmp(&spec.rank(a.0))))
        .ok_or_else(|| "no reachable replica with a known WAL position to promote".to_string())?;
    let chosen = match target {
        None => best,
        Some(t) => *eligible.iter().find(|(n, _)| *n == t).ok_or_else(|| {
            format!(
                "{t} cannot be promoted: not a reachable replica{}",
                if spec.mode == Mode::Sync { " recorded as synchronous" } else { "" }
            )
        })?,
    };
    if spec.mode == Mode::Async {
        let last_primary = obs.get(&leader.member).and_then(|o| o.last_wal_position);
        // Unknown (e.g. the server restarted after the primary died): nothing to compare with.
        if let Some(lag) = last_primary.map(|p| p.saturating_sub(chosen.1))
            && lag > spec.max_lag_on_failover_bytes
        {
            return Err(format!(
                "{} is {lag} bytes behind the primary's last known position, beyond max_lag_on_failover_bytes {}",
                chosen.0, spec.max_lag_on_failover_bytes
            ));
        }
    }
    Ok(chosen.0.to_string())
}

/// The new leader record and the `synchronous_standby_names` the new primary starts with.
fn next_leader(spec: &ClusterSpec, leader: &LeaderRecord, to: &str, others: &[String]) -> (LeaderRecord, String) {
    let (sync_standbys, names) = match spec.mode {
        // Every repointed replica may acknowledge the new primary's commits, so all are recorded.
        Mode::Sync => (others.to_vec(), synchronous_standby_names_value(1, others)),
        Mode::Async => (Vec::new(), String::new()),
    };
    (LeaderRecord { member: to.to_string(), term: leader.term + 1, sync_standbys }, names)
}

fn failover_steps(spec: &ClusterSpec, leader: &LeaderRecord, to: &str, others: &[String]) -> (u64, Vec<Step>) {
    let from = &leader.member;
    let (new, names) = next_leader(spec, leader, to, others);
    let term = new.term;
    let mut steps = vec![
        Step::CompareAndSwapLeader { expected_term: leader.term, new },
        Step::FenceProxy { member: from.clone() },
        Step::FenceAgent { member: from.clone() },
        Step::Promote { member: to.to_string(), synchronous_standby_names: names },
    ];
    steps.extend(others.iter().map(|m| Step::Repoint { member: m.clone(), primary: to.to_string() }));
    steps.push(Step::PublishRoles { primary: to.to_string(), replicas: others.to_vec() });
    steps.push(Step::RecordEvent {
        message: format!(
            "database {}: failover from {from} to {to} (term {term}); {from} is fenced until it rejoins",
            spec.name
        ),
    });
    (term, steps)
}

/// Plans a switchover to `target` (or the best candidate): refused unless the primary
/// is a healthy writable primary and the target a reachable replica that streams from
/// it within `max_lag_on_failover_bytes`.
pub fn plan_switchover(
    spec: &ClusterSpec,
    obs: &Observations,
    leader: &LeaderRecord,
    target: Option<&str>,
    now_ms: u64,
) -> Result<Switchover, String> {
    let from = leader.member.clone();
    let p = obs.get(&from).ok_or_else(|| format!("no observation of primary {from}"))?;
    let pst = agent_status(p, spec, now_ms)
        .filter(|s| is_writable_primary(s))
        .ok_or_else(|| format!("primary {from} is not a healthy writable primary with its agent up"))?;
    let to = choose_candidate(spec, obs, leader, now_ms, target)?;
    let tst = agent_status(&obs[&to], spec, now_ms).expect("candidate has a fresh agent status");
    if !tst.wal_receiver_streaming || tst.upstream.as_deref() != spec.addr(&from) {
        return Err(format!("{to} does not stream from {from}; it could not catch up"));
    }
    if let (Some(cur), Some(pos)) = (pst.current_lsn, tst.wal_position())
        && cur.saturating_sub(pos) > spec.max_lag_on_failover_bytes
    {
        return Err(format!("{to} is {} bytes behind, beyond max_lag_on_failover_bytes", cur - pos));
    }
    let others: Vec<String> = spec
        .members
        .iter()
        .map(|m| m.name.clone())
        .filter(|m| *m != from && *m != to)
        .filter(|m| obs.get(m).and_then(|o| agent_status(o, spec, now_ms)).is_some_and(|s| s.role == Role::Replica))
        .collect();
    let mut new_others = others.clone();
    // The old primary comes back as a replica of the target, so it can acknowledge too.
    new_others.push(from.clone());
    let (new, names) = next_leader(spec, leader, &to, &new_others);
    let term = new.term;
    let mut steps = vec![
        Step::FenceProxy { member: from.clone() },
        Step::MakeReadOnly { member: from.clone() },
        Step::WaitCatchUp { member: to.clone(), primary: from.clone(), timeout_ms: spec.catch_up_timeout_ms },
        Step::CompareAndSwapLeader { expected_term: leader.term, new },
        Step::FenceAgent { member: from.clone() },
        Step::Promote { member: to.clone(), synchronous_standby_names: names },
    ];
    steps.extend(others.iter().map(|m| Step::Repoint { member: m.clone(), primary: to.clone() }));
    steps.push(Step::Rejoin { member: from.clone(), primary: to.clone() });
    steps.push(Step::PublishRoles { primary: to.clone(), replicas: new_others });
    steps.push(Step::RecordEvent {
        message: format!("database {}: switchover from {from} to {to} (term {term})", spec.name),
    });
    let abort = vec![
        Step::MakeWritable { member: from.clone() },
        Step::PublishRoles { primary: from.clone(), replicas: others.into_iter().chain([to.clone()]).collect() },
        Step::RecordEvent {
            message: format!("database {}: switchover from {from} to {to} aborted: {to} did not catch up", spec.name),
        },
    ];
    Ok(Switchover { from, to, term, steps, abort })
}

/// A member that must not take writes and must follow the leader again: fenced at the
/// proxy, rejoined, and the event that says why.
fn fence_and_rejoin(spec: &ClusterSpec, member: &str, leader: &LeaderRecord, why: String) -> [Step; 3] {
    [
        Step::FenceProxy { member: member.to_string() },
        Step::Rejoin { member: member.to_string(), primary: leader.member.clone() },
        Step::RecordEvent { message: format!("database {}: {member} {why}", spec.name) },
    ]
}

/// Brings members back in line while the leader is healthy (rule 7): a member other
/// than the leader that is a primary is fenced and rejoined; a replica that streams
/// from elsewhere, or has not streamed for `dead_grace_ms`, is repointed.
pub fn reconcile(spec: &ClusterSpec, obs: &Observations, leader: &LeaderRecord, now_ms: u64) -> Vec<Step> {
    reconcile_except(spec, obs, leader, now_ms, |_| false)
}

/// [`reconcile`], leaving alone the members `hold_off` names (the server's: those whose
/// last rejoin failed recently, so they stay fenced until it is time to try again).
pub fn reconcile_except(
    spec: &ClusterSpec,
    obs: &Observations,
    leader: &LeaderRecord,
    now_ms: u64,
    hold_off: impl Fn(&str) -> bool,
) -> Vec<Step> {
    if decide(spec, obs, leader, now_ms) != Decision::Healthy {
        return Vec::new();
    }
    let leader_addr = spec.addr(&leader.member);
    let mut steps = Vec::new();
    for m in spec.members.iter().filter(|m| m.name != leader.member && !hold_off(&m.name)) {
        let Some(o) = obs.get(&m.name) else { continue };
        if let AgentView::LocalDown { since_ms, .. } = &o.agent
            && held(*since_ms, spec, now_ms)
        {
            let why = format!("has been down; rejoining it as a replica of {} via pg_rewind", leader.member);
            steps.extend(fence_and_rejoin(spec, &m.name, leader, why));
            continue;
        }
        let Some(st) = agent_status(o, spec, now_ms) else { continue };
        match st.role {
            Role::Primary => {
                let why = format!("came back as a primary beside {}; fenced, rejoining via pg_rewind", leader.member);
                steps.extend(fence_and_rejoin(spec, &m.name, leader, why));
            }
            Role::Replica => {
                let elsewhere = st.wal_receiver_streaming && st.upstream.as_deref() != leader_addr;
                let stalled = o.receiver_lost_since_ms.is_some_and(|s| held(s, spec, now_ms));
                if elsewhere || stalled {
                    steps.push(Step::Repoint { member: m.name.clone(), primary: leader.member.clone() });
                }
            }
            Role::Unknown => {}
        }
    }
    steps
}

/// A drover-made check result for one member (`db-primary` / `db-replica`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleCheck {
    pub member: String,
    pub check: &'static str,
    pub ok: bool,
    pub output: String,
}

pub const CHECK_PRIMARY: &str = "db-primary";
pub const CHECK_REPLICA: &str = "db-replica";
pub const CHECK_READ: &str = "db-read";
/// Every check the proxy and name server route a member by; fencing at the proxy
/// withdraws them all.
pub const ROLE_CHECKS: [&str; 3] = [CHECK_PRIMARY, CHECK_REPLICA, CHECK_READ];

/// The role checks the proxy and DNS route by: `db-primary` OK only on the leader while
/// it is a writable primary; `db-replica` OK on replicas streaming within
/// `max_replica_lag_bytes` (lag as the primary sees it, else the replica's replay lag);
/// `db-read` (the read endpoint's) OK where `db-replica` is, or — with
/// `read_fallback_to_primary` and no replica in rotation — on the primary alone, so
/// reads go on while every replica is down or too far behind.
pub fn role_checks(spec: &ClusterSpec, obs: &Observations, leader: &LeaderRecord, now_ms: u64) -> Vec<RoleCheck> {
    let primary_status = obs.get(&leader.member).and_then(|o| current_status(o, spec, now_ms));
    let mut out = Vec::new();
    for m in &spec.members {
        let st = obs.get(&m.name).and_then(|o| current_status(o, spec, now_ms));
        let is_leader = m.name == leader.member;
        let (ok, output) = match st {
            Some(s) if is_leader && is_writable_primary(s) => (true, format!("primary (term {})", leader.term)),
            Some(s) if is_leader => {
                (false, format!("leader but {:?}, accepting writes: {}", s.role, s.accepting_writes))
            }
            Some(_) => (false, format!("not the leader ({} is, term {})", leader.member, leader.term)),
            None => (false, "no fresh status".into()),
        };
        out.push(RoleCheck { member: m.name.clone(), check: CHECK_PRIMARY, ok, output });
        let (ok, output) = match st {
            Some(s) if !is_leader && s.role == Role::Replica && s.wal_receiver_streaming => {
                let seen_by_primary = primary_status
                    .and_then(|p| p.standbys.iter().find(|sb| sb.name == m.name))
                    .and_then(|sb| sb.lag_bytes);
                let lag = seen_by_primary.or(s.lag_bytes).unwrap_or(0);
                if lag <= spec.max_replica_lag_bytes {
                    (true, format!("replica, {lag} bytes behind"))
                } else {
                    (false, format!("replica {lag} bytes behind, over the {} byte limit", spec.max_replica_lag_bytes))
                }
            }
            Some(s) if !is_leader && s.role == Role::Replica => (false, "replica not streaming".into()),
            Some(_) if is_leader => (false, "the primary".into()),
            Some(s) => (false, format!("not a replica ({:?})", s.role)),
            None => (false, "no fresh status".into()),
        };
        out.push(RoleCheck { member: m.name.clone(), check: CHECK_REPLICA, ok, output });
    }
    let replica_in_rotation = out.iter().any(|c| c.check == CHECK_REPLICA && c.ok);
    let find = |member: &str, check: &str| out.iter().find(|c| c.member == member && c.check == check);
    let mut reads = Vec::with_capacity(spec.members.len());
    for m in &spec.members {
        let (Some(primary), Some(replica)) = (find(&m.name, CHECK_PRIMARY), find(&m.name, CHECK_REPLICA)) else {
            continue;
        };
        let (ok, output) = if replica.ok {
            (true, replica.output.clone())
        } else if primary.ok && spec.read_fallback_to_primary && !replica_in_rotation {
            (true, "the primary serves reads: no replica is in rotation".to_string())
        } else if primary.ok && spec.read_fallback_to_primary {
            (false, "the primary: replicas serve reads".to_string())
        } else if primary.ok {
            (false, "the primary (read_fallback_to_primary is off)".to_string())
        } else {
            (false, replica.output.clone())
        };
        reads.push(RoleCheck { member: m.name.clone(), check: CHECK_READ, ok, output });
    }
    out.extend(reads);
    out
}

/// The first leader record of a cluster: exactly one member reports itself a writable
/// primary through its agent. Term 1; the caller creates it only if absent.
pub fn bootstrap_leader(spec: &ClusterSpec, obs: &Observations, now_ms: u64) -> Result<LeaderRecord, String> {
    let primaries: Vec<&str> = spec
        .members
        .iter()
        .filter(|m| obs.get(&m.name).and_then(|o| agent_status(o, spec, now_ms)).is_some_and(is_writable_primary))
        .map(|m| m.name.as_str())
        .collect();
    match primaries.as_slice() {
        [one] => Ok(LeaderRecord { member: one.to_string(), term: 1, sync_standbys: Vec::new() }),
        [] => Err("no member reports itself a writable primary".into()),
        many => Err(format!("several members report themselves primary: {}", many.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::StandbyStatus;

    const GRACE: u64 = 3_000;
    const MAX_AGE: u64 = 5_000;
    const MB: u64 = 1 << 20;

    fn spec(mode: Mode) -> ClusterSpec {
        ClusterSpec {
            name: "orders".into(),
            mode,
            max_lag_on_failover_bytes: MB,
            max_replica_lag_bytes: MB,
            read_fallback_to_primary: false,
            members: (0..3).map(|i| MemberSpec { name: format!("pg{i}"), addr: format!("10.0.0.{i}:5432") }).collect(),
            dead_grace_ms: GRACE,
            status_max_age_ms: MAX_AGE,
            catch_up_timeout_ms: 10_000,
        }
    }

    fn leader(sync: &[&str]) -> LeaderRecord {
        LeaderRecord { member: "pg0".into(), term: 7, sync_standbys: sync.iter().map(|s| s.to_string()).collect() }
    }

    fn primary(lsn: u64) -> DbStatus {
        DbStatus {
            role: Role::Primary,
            accepting_writes: true,
            current_lsn: Some(lsn),
            timeline: Some(1),
            ..Default::default()
        }
    }

    fn replica(received: u64, streaming: bool) -> DbStatus {
        DbStatus {
            role: Role::Replica,
            in_recovery: true,
            received_lsn: Some(received),
            replayed_lsn: Some(received),
            lag_bytes: Some(0),
            wal_receiver_streaming: streaming,
            upstream: streaming.then(|| "10.0.0.0:5432".to_string()),
            timeline: Some(1),
            ..Default::default()
        }
    }

    /// Everyone healthy and reporting at t = 1000; pg0 at 5000, replicas at 5000.
    fn healthy() -> Observer {
        let mut o = Observer::new(["pg0", "pg1", "pg2"], 0);
        o.agent_report("pg0", Ok(primary(5_000)), 1_000);
        o.direct_probe("pg0", Ok(primary(5_000)), 1_000);
        for r in ["pg1", "pg2"] {
            o.agent_report(r, Ok(replica(5_000, true)), 1_000);
        }
        o
    }

    /// pg0 dies at t = 2000: agent gone, direct probe failing, both replicas lose their
    /// receivers, and keep reporting (every second) until `until`.
    fn primary_dies(o: &mut Observer, pg1: u64, pg2: u64, until: u64) {
        o.agent_gone("pg0", 2_000);
        let mut t = 2_000;
        while t <= until {
            o.direct_probe("pg0", Err("connection refused".into()), t);
            o.agent_report("pg1", Ok(replica(pg1, false)), t);
            o.agent_report("pg2", Ok(replica(pg2, false)), t);
            t += 1_000;
        }
    }

    #[test]
    fn an_agent_is_silent_when_gone_or_stale_not_when_it_reports_its_postgres_down() {
        let s = spec(Mode::Async);
        let mut o = healthy();
        let silent = |o: &Observer, m: &str, t: u64| agent_silent(&o.observations()[m], &s, t);
        assert!(!silent(&o, "pg1", 1_000 + MAX_AGE), "a report status_max_age_ms old is fresh");
        assert!(silent(&o, "pg1", 1_001 + MAX_AGE), "older is silent: a partition leaves the connection open");
        o.agent_report("pg2", Err("connection refused".into()), 2_000);
        assert!(!silent(&o, "pg2", 2_000), "it answers orders though its PostgreSQL is down");
        o.agent_gone("pg0", 2_000);
        assert!(silent(&o, "pg0", 2_000));
    }

    fn wait_reason(d: Decision) -> String {
        match d {
            Decision::Wait { reason } => reason,
            other => panic!("expected Wait, got {other:?}"),
        }
    }

    fn refuse_reason(d: Decision) -> String {
        match d {
            Decision::Refuse { reason } => reason,
            other => panic!("expected Refuse, got {other:?}"),
        }
    }

    #[test]
    fn a_primary_that_answers_is_healthy() {
        // Rule 2: "A fresh status from either channel that shows the leader as a writable primary means no failover."
        let o = healthy();
        assert_eq!(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 1_500), Decision::Healthy);
    }

    #[test]
    fn primary_answering_the_server_directly_is_healthy_even_with_its_agent_gone_and_replicas_lost() {
        // Rule 2, over rule 1's other signals.
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 9_000);
        o.direct_probe("pg0", Ok(primary(5_000)), 9_000);
        assert_eq!(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 9_000), Decision::Healthy);
    }

    #[test]
    fn agent_gone_alone_does_not_promote() {
        // Rule 1: "No single signal promotes."
        let mut o = healthy();
        o.agent_gone("pg0", 2_000);
        for t in [2_000, 4_000, 6_000] {
            o.direct_probe("pg0", Err("timeout".into()), t);
        }
        for r in ["pg1", "pg2"] {
            o.agent_report(r, Ok(replica(5_000, true)), 6_000);
        }
        let reason = wait_reason(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 6_000));
        assert!(reason.contains("pg1 still streams WAL") && reason.contains("pg2 still streams WAL"), "{reason}");
    }

    #[test]
    fn direct_probe_failing_alone_does_not_promote() {
        // Rule 1: the agent still reports a writable primary, so it is healthy (rule 2).
        let mut o = healthy();
        for t in [2_000, 4_000, 6_000] {
            o.direct_probe("pg0", Err("no route to host".into()), t);
            o.agent_report("pg0", Ok(primary(5_000)), t);
        }
        assert_eq!(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 6_000), Decision::Healthy);
    }

    #[test]
    fn one_replica_still_streaming_blocks_failover() {
        // Rule 1: "every reachable replica reports its WAL receiver not streaming".
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 9_000);
        o.agent_report("pg2", Ok(replica(5_000, true)), 9_000);
        let reason = wait_reason(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 9_000));
        assert!(reason.contains("pg2 still streams WAL") && !reason.contains("pg1"), "{reason}");
    }

    #[test]
    fn all_signals_shorter_than_the_grace_period_wait() {
        // Rule 1: "have held for dead_grace_ms".
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 4_000);
        let reason = wait_reason(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 4_000));
        assert!(reason.contains("2000 ms of the 3000 ms grace"), "{reason}");
    }

    #[test]
    fn grace_counts_from_the_latest_signal_to_appear() {
        // Rule 1: all of them must have held for the grace period, so the youngest counts.
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 5_000);
        // pg2's receiver came back briefly at 4500 and was lost again at 5000.
        o.agent_report("pg2", Ok(replica(5_000, true)), 4_500);
        o.agent_report("pg2", Ok(replica(5_000, false)), 5_000);
        assert!(matches!(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 7_000), Decision::Wait { .. }));
        o.agent_report("pg1", Ok(replica(5_000, false)), 8_000);
        o.agent_report("pg2", Ok(replica(5_000, false)), 8_000);
        o.direct_probe("pg0", Err("refused".into()), 8_000);
        assert!(matches!(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 8_000), Decision::Failover { .. }));
    }

    #[test]
    fn dead_primary_fails_over_to_the_replica_with_most_wal_in_the_documented_order() {
        // Rule 4: "the reachable replica with the most WAL"; rule 5: CAS first, then fence proxy,
        // fence agent, promote, repoint, publish, record.
        let mut o = healthy();
        primary_dies(&mut o, 4_900, 5_000, 5_000);
        let d = decide(&spec(Mode::Async), o.observations(), &leader(&[]), 5_000);
        let Decision::Failover { from, to, term, steps } = d else { panic!("{d:?}") };
        assert_eq!((from.as_str(), to.as_str(), term), ("pg0", "pg2", 8));
        assert_eq!(
            steps[..6],
            [
                Step::CompareAndSwapLeader {
                    expected_term: 7,
                    new: LeaderRecord { member: "pg2".into(), term: 8, sync_standbys: vec![] }
                },
                Step::FenceProxy { member: "pg0".into() },
                Step::FenceAgent { member: "pg0".into() },
                Step::Promote { member: "pg2".into(), synchronous_standby_names: String::new() },
                Step::Repoint { member: "pg1".into(), primary: "pg2".into() },
                Step::PublishRoles { primary: "pg2".into(), replicas: vec!["pg1".into()] },
            ]
        );
        assert!(matches!(&steps[6], Step::RecordEvent { message } if message.contains("failover from pg0 to pg2")));
        assert_eq!(steps.len(), 7);
    }

    #[test]
    fn equal_wal_goes_to_the_earlier_member_in_spec_order() {
        // Rule 4: "ties by spec order".
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 5_000);
        let d = decide(&spec(Mode::Async), o.observations(), &leader(&[]), 5_000);
        assert!(matches!(d, Decision::Failover { ref to, .. } if to == "pg1"), "{d:?}");
    }

    #[test]
    fn without_any_reachable_replica_nothing_confirms_the_death() {
        // Rule 1: "and at least one replica is reachable to say so".
        let mut o = healthy();
        o.agent_gone("pg0", 2_000);
        o.agent_gone("pg1", 2_000);
        o.agent_gone("pg2", 2_000);
        o.direct_probe("pg0", Err("refused".into()), 9_000);
        let reason = wait_reason(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 9_000));
        assert!(reason.contains("no replica is reachable"), "{reason}");
    }

    #[test]
    fn an_agent_that_stops_reporting_counts_as_gone_once_its_status_is_stale() {
        // Rule 1: "its agent is gone (disconnected, silent past status_max_age_ms, ...)".
        let mut o = healthy();
        let mut t = 2_000;
        while t <= 10_000 {
            o.direct_probe("pg0", Err("timeout".into()), t);
            o.agent_report("pg1", Ok(replica(5_000, false)), t);
            o.agent_report("pg2", Ok(replica(5_000, false)), t);
            t += 1_000;
        }
        // pg0's last report is from 1000: stale at 6000, gone for the grace at 9000.
        assert!(matches!(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 8_000), Decision::Wait { .. }));
        assert!(matches!(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 9_000), Decision::Failover { .. }));
    }

    #[test]
    fn an_agent_reporting_its_postgres_down_counts_as_gone() {
        // Rule 1: "... or reporting its PostgreSQL down".
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 6_000);
        o.agent_report("pg0", Err("connection refused".into()), 2_000);
        o.agent_report("pg0", Err("connection refused".into()), 6_000);
        assert!(matches!(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 6_000), Decision::Failover { .. }));
    }

    #[test]
    fn async_refuses_a_candidate_beyond_the_lag_limit() {
        // Rule 4: "refuse when it is more than max_lag_on_failover_bytes behind the old primary's last known position".
        let mut o = healthy();
        o.agent_report("pg0", Ok(primary(5_000 + 3 * MB)), 1_500);
        primary_dies(&mut o, 5_000, 5_000 + MB / 2, 6_000);
        let reason = refuse_reason(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 6_000));
        assert!(reason.contains("pg2 is") && reason.contains("beyond max_lag_on_failover_bytes"), "{reason}");
    }

    #[test]
    fn async_lag_exactly_at_the_limit_is_allowed() {
        // Rule 4: "more than" the limit refuses; at the limit promotes.
        let mut o = healthy();
        o.agent_report("pg0", Ok(primary(5_000 + MB)), 1_500);
        primary_dies(&mut o, 5_000, 4_000, 6_000);
        let d = decide(&spec(Mode::Async), o.observations(), &leader(&[]), 6_000);
        assert!(matches!(d, Decision::Failover { ref to, .. } if to == "pg1"), "{d:?}");
    }

    #[test]
    fn async_with_no_known_primary_position_promotes_the_best_replica() {
        // Rule 4 (documented): an unknown last position has nothing to compare with.
        let mut o = Observer::new(["pg0", "pg1", "pg2"], 0);
        primary_dies(&mut o, 7_000, 5_000, 6_000);
        let d = decide(&spec(Mode::Async), o.observations(), &leader(&[]), 6_000);
        assert!(matches!(d, Decision::Failover { ref to, .. } if to == "pg1"), "{d:?}");
    }

    #[test]
    fn sync_mode_promotes_the_recorded_synchronous_standby_even_with_less_wal() {
        // Rule 3: "Only a standby recorded in the leader record's sync_standbys ... is a candidate."
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 9_000, 6_000);
        let d = decide(&spec(Mode::Sync), o.observations(), &leader(&["pg1"]), 6_000);
        let Decision::Failover { to, steps, .. } = d else { panic!("{d:?}") };
        assert_eq!(to, "pg1");
        // The new primary lists the repointed replica, and records it before it can acknowledge.
        assert_eq!(
            steps[0],
            Step::CompareAndSwapLeader {
                expected_term: 7,
                new: LeaderRecord { member: "pg1".into(), term: 8, sync_standbys: vec!["pg2".into()] }
            }
        );
        assert_eq!(
            steps[3],
            Step::Promote { member: "pg1".into(), synchronous_standby_names: "FIRST 1 (\"pg2\")".into() }
        );
    }

    #[test]
    fn sync_mode_refuses_without_a_recorded_synchronous_standby() {
        // Rule 3: "otherwise refuse".
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 6_000);
        let reason = refuse_reason(decide(&spec(Mode::Sync), o.observations(), &leader(&[]), 6_000));
        assert!(reason.contains("no standby is recorded as synchronous"), "{reason}");
    }

    #[test]
    fn sync_mode_refuses_while_a_recorded_synchronous_standby_is_unreachable() {
        // Rule 3: "every recorded one must be reachable, so the one with the most WAL is known".
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 6_000);
        o.agent_gone("pg2", 5_500);
        let reason = refuse_reason(decide(&spec(Mode::Sync), o.observations(), &leader(&["pg1", "pg2"]), 6_000));
        assert!(reason.contains("pg2 is unreachable"), "{reason}");
    }

    #[test]
    fn sync_mode_with_every_recorded_standby_reachable_takes_the_one_with_most_wal() {
        // Rule 3 + WAL order: the furthest recorded standby holds every acknowledged commit.
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 6_000, 6_000);
        let d = decide(&spec(Mode::Sync), o.observations(), &leader(&["pg1", "pg2"]), 6_000);
        assert!(matches!(d, Decision::Failover { ref to, .. } if to == "pg2"), "{d:?}");
    }

    #[test]
    fn a_replica_seen_only_by_the_server_confirms_but_cannot_be_promoted() {
        // Only a member whose agent is up can carry out a promotion.
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 9_000, 6_000);
        o.agent_gone("pg2", 2_000);
        o.direct_probe("pg2", Ok(replica(9_000, false)), 6_000);
        let d = decide(&spec(Mode::Async), o.observations(), &leader(&[]), 6_000);
        let Decision::Failover { to, steps, .. } = d else { panic!("{d:?}") };
        assert_eq!(to, "pg1");
        assert!(!steps.iter().any(|s| matches!(s, Step::Repoint { .. })), "no agent to repoint pg2: {steps:?}");
    }

    #[test]
    fn a_read_only_primary_or_a_leader_answering_as_replica_waits() {
        // Rule 2's converse: it answers, so it is not dead, but it is not healthy either.
        let mut o = healthy();
        o.agent_report("pg0", Ok(DbStatus { accepting_writes: false, ..primary(5_000) }), 2_000);
        assert!(wait_reason(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 2_000)).contains("read-only"));
        o.agent_report("pg0", Ok(replica(5_000, true)), 3_000);
        assert!(wait_reason(decide(&spec(Mode::Async), o.observations(), &leader(&[]), 3_000)).contains("stale"));
    }

    #[test]
    fn switchover_catches_up_before_the_term_moves_and_the_target_is_promoted() {
        // Rule 6: read-only, catch up, only then CAS, stop old cleanly, promote, rejoin old.
        let o = healthy();
        let plan = plan_switchover(&spec(Mode::Async), o.observations(), &leader(&[]), Some("pg2"), 1_500).unwrap();
        assert_eq!((plan.from.as_str(), plan.to.as_str(), plan.term), ("pg0", "pg2", 8));
        let kinds: Vec<&str> = plan
            .steps
            .iter()
            .map(|s| match s {
                Step::FenceProxy { .. } => "fence_proxy",
                Step::MakeReadOnly { .. } => "read_only",
                Step::WaitCatchUp { .. } => "catch_up",
                Step::CompareAndSwapLeader { .. } => "cas",
                Step::FenceAgent { .. } => "stop_old",
                Step::Promote { .. } => "promote",
                Step::Repoint { .. } => "repoint",
                Step::Rejoin { .. } => "rejoin",
                Step::PublishRoles { .. } => "publish",
                Step::RecordEvent { .. } => "event",
                Step::MakeWritable { .. } => "writable",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "fence_proxy",
                "read_only",
                "catch_up",
                "cas",
                "stop_old",
                "promote",
                "repoint",
                "rejoin",
                "publish",
                "event"
            ]
        );
        assert!(plan.steps.contains(&Step::Rejoin { member: "pg0".into(), primary: "pg2".into() }));
        assert_eq!(plan.abort[0], Step::MakeWritable { member: "pg0".into() });
    }

    #[test]
    fn switchover_without_target_picks_the_best_candidate() {
        let mut o = healthy();
        o.agent_report("pg2", Ok(replica(5_100, true)), 1_200);
        let plan = plan_switchover(&spec(Mode::Async), o.observations(), &leader(&[]), None, 1_500).unwrap();
        assert_eq!(plan.to, "pg2");
    }

    #[test]
    fn switchover_refuses_a_target_that_does_not_stream_from_the_primary() {
        let mut o = healthy();
        o.agent_report("pg2", Ok(replica(5_000, false)), 1_200);
        let err = plan_switchover(&spec(Mode::Async), o.observations(), &leader(&[]), Some("pg2"), 1_500).unwrap_err();
        assert!(err.contains("does not stream from pg0"), "{err}");
    }

    #[test]
    fn switchover_refuses_when_the_primary_is_not_healthy_or_the_target_unknown() {
        let mut o = healthy();
        let err = plan_switchover(&spec(Mode::Async), o.observations(), &leader(&[]), Some("pg9"), 1_500).unwrap_err();
        assert!(err.contains("pg9 cannot be promoted"), "{err}");
        o.agent_gone("pg0", 1_200);
        let err = plan_switchover(&spec(Mode::Async), o.observations(), &leader(&[]), Some("pg1"), 1_500).unwrap_err();
        assert!(err.contains("not a healthy writable primary"), "{err}");
    }

    #[test]
    fn sync_switchover_records_the_old_primary_as_a_future_synchronous_standby() {
        // Rule 3's bookkeeping: it rejoins as a replica that may acknowledge.
        let o = healthy();
        let plan = plan_switchover(&spec(Mode::Sync), o.observations(), &leader(&["pg1"]), Some("pg1"), 1_500).unwrap();
        let cas = plan.steps.iter().find_map(|s| match s {
            Step::CompareAndSwapLeader { new, .. } => Some(new.clone()),
            _ => None,
        });
        assert_eq!(cas.unwrap().sync_standbys, ["pg2", "pg0"]);
    }

    #[test]
    fn a_returning_old_primary_is_fenced_and_rejoined() {
        // Rule 7: "Any member other than the leader that reports itself primary is fenced at the proxy and rejoined."
        let mut o = healthy();
        o.agent_report("pg1", Ok(primary(5_000)), 1_000);
        let lead = LeaderRecord { member: "pg2".into(), term: 8, sync_standbys: vec![] };
        o.agent_report("pg2", Ok(primary(6_000)), 1_000);
        o.agent_report("pg0", Ok(replica(6_000, true)), 1_000);
        let steps = reconcile(&spec(Mode::Async), o.observations(), &lead, 1_500);
        let fence = steps.iter().position(|s| *s == Step::FenceProxy { member: "pg1".into() });
        let rejoin = steps.iter().position(|s| *s == Step::Rejoin { member: "pg1".into(), primary: "pg2".into() });
        assert!(fence.unwrap() < rejoin.unwrap(), "fenced before it rejoins: {steps:?}");
        // pg0 streams from 10.0.0.0 (itself in this fixture's terms), not from pg2: repoint.
        assert!(steps.contains(&Step::Repoint { member: "pg0".into(), primary: "pg2".into() }), "{steps:?}");
    }

    #[test]
    fn replicas_streaming_from_the_leader_are_left_alone_and_stalled_ones_repointed_after_grace() {
        let mut o = healthy();
        assert_eq!(reconcile(&spec(Mode::Async), o.observations(), &leader(&[]), 1_500), []);
        o.agent_report("pg0", Ok(primary(5_000)), 2_000);
        o.agent_report("pg1", Ok(replica(5_000, false)), 2_000);
        o.agent_report("pg2", Ok(replica(5_000, true)), 2_000);
        assert_eq!(reconcile(&spec(Mode::Async), o.observations(), &leader(&[]), 4_000), []);
        o.agent_report("pg0", Ok(primary(5_000)), 5_000);
        o.agent_report("pg1", Ok(replica(5_000, false)), 5_000);
        o.agent_report("pg2", Ok(replica(5_000, true)), 5_000);
        assert_eq!(
            reconcile(&spec(Mode::Async), o.observations(), &leader(&[]), 5_000),
            [Step::Repoint { member: "pg1".into(), primary: "pg0".into() }]
        );
    }

    #[test]
    fn a_member_whose_postgres_stays_down_is_rejoined_after_the_grace_period() {
        // Rule 7: a crashed old primary comes back only as a replica of the leader.
        let mut o = healthy();
        let lead = LeaderRecord { member: "pg1".into(), term: 8, sync_standbys: vec![] };
        o.agent_report("pg1", Ok(primary(6_000)), 1_000);
        o.agent_report("pg2", Ok(replica(6_000, true)), 1_000);
        o.agent_report("pg0", Err("connection refused".into()), 1_000);
        assert!(
            reconcile(&spec(Mode::Async), o.observations(), &lead, 1_500)
                .iter()
                .all(|s| !matches!(s, Step::Rejoin { .. })),
            "not before the grace period"
        );
        o.agent_report("pg1", Ok(primary(6_000)), 4_000);
        o.agent_report("pg2", Ok(replica(6_000, true)), 4_000);
        let steps = reconcile(&spec(Mode::Async), o.observations(), &lead, 4_100);
        let fence = steps.iter().position(|s| *s == Step::FenceProxy { member: "pg0".into() });
        let rejoin = steps.iter().position(|s| *s == Step::Rejoin { member: "pg0".into(), primary: "pg1".into() });
        assert!(fence.unwrap() < rejoin.unwrap(), "{steps:?}");
    }

    #[test]
    fn a_held_off_member_is_left_alone_and_the_others_still_reconciled() {
        let mut o = healthy();
        for m in ["pg1", "pg2"] {
            o.agent_report(m, Err("connection refused".into()), 1_000);
        }
        let all = reconcile(&spec(Mode::Async), o.observations(), &leader(&[]), 1_000 + GRACE);
        let rejoined = |steps: &[Step]| -> Vec<String> {
            steps
                .iter()
                .filter_map(|s| if let Step::Rejoin { member, .. } = s { Some(member.clone()) } else { None })
                .collect()
        };
        assert_eq!(rejoined(&all), ["pg1", "pg2"]);
        let held = reconcile_except(&spec(Mode::Async), o.observations(), &leader(&[]), 1_000 + GRACE, |m| m == "pg1");
        assert_eq!(rejoined(&held), ["pg2"]);
        assert!(held.iter().all(|s| !format!("{s:?}").contains("pg1")), "nothing for pg1: {held:?}");
    }

    #[test]
    fn nothing_is_reconciled_while_the_leader_is_unhealthy() {
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 9_000);
        assert_eq!(reconcile(&spec(Mode::Async), o.observations(), &leader(&[]), 9_000), []);
    }

    fn check<'a>(checks: &'a [RoleCheck], member: &str, check: &str) -> &'a RoleCheck {
        checks.iter().find(|c| c.member == member && c.check == check).unwrap()
    }

    #[test]
    fn db_primary_is_ok_only_on_the_leader_and_db_replica_only_within_the_lag_limit() {
        let mut o = healthy();
        let mut p = primary(10 * MB);
        p.standbys = vec![
            StandbyStatus { name: "pg1".into(), lag_bytes: Some(0), ..Default::default() },
            StandbyStatus { name: "pg2".into(), lag_bytes: Some(2 * MB), ..Default::default() },
        ];
        o.agent_report("pg0", Ok(p), 1_000);
        let checks = role_checks(&spec(Mode::Async), o.observations(), &leader(&[]), 1_500);
        assert!(check(&checks, "pg0", CHECK_PRIMARY).ok);
        assert!(!check(&checks, "pg0", CHECK_REPLICA).ok);
        assert!(!check(&checks, "pg1", CHECK_PRIMARY).ok);
        assert!(check(&checks, "pg1", CHECK_REPLICA).ok);
        let pg2 = check(&checks, "pg2", CHECK_REPLICA);
        assert!(!pg2.ok && pg2.output.contains("over the"), "{pg2:?}");
    }

    #[test]
    fn db_read_follows_db_replica_and_falls_back_to_the_primary_only_when_configured_and_no_replica_is_in() {
        let mut o = healthy();
        let in_rotation = |checks: &[RoleCheck]| -> Vec<String> {
            checks.iter().filter(|c| c.check == CHECK_READ && c.ok).map(|c| c.member.clone()).collect()
        };
        let mut fallback = spec(Mode::Async);
        fallback.read_fallback_to_primary = true;
        assert_eq!(in_rotation(&role_checks(&fallback, o.observations(), &leader(&[]), 1_500)), ["pg1", "pg2"]);
        // Both replicas stop streaming: only the fallback sends reads to the primary.
        for r in ["pg1", "pg2"] {
            o.agent_report(r, Ok(replica(5_000, false)), 1_000);
        }
        assert_eq!(in_rotation(&role_checks(&fallback, o.observations(), &leader(&[]), 1_500)), ["pg0"]);
        let strict = role_checks(&spec(Mode::Async), o.observations(), &leader(&[]), 1_500);
        assert!(in_rotation(&strict).is_empty(), "{strict:?}");
        let pg0 = check(&strict, "pg0", CHECK_READ);
        assert!(pg0.output.contains("read_fallback_to_primary is off"), "{pg0:?}");
    }

    #[test]
    fn a_second_primary_never_gets_db_primary_and_a_stale_member_gets_nothing() {
        let mut o = healthy();
        o.agent_report("pg1", Ok(primary(9_000)), 1_000);
        let checks = role_checks(&spec(Mode::Async), o.observations(), &leader(&[]), 1_500);
        assert!(!check(&checks, "pg1", CHECK_PRIMARY).ok, "not the leader, so not routed writes");
        let later = role_checks(&spec(Mode::Async), o.observations(), &leader(&[]), 1_000 + MAX_AGE + 1);
        assert!(later.iter().all(|c| !c.ok), "stale statuses route nothing: {later:?}");
    }

    #[test]
    fn bootstrap_needs_exactly_one_writable_primary() {
        let mut o = healthy();
        assert_eq!(
            bootstrap_leader(&spec(Mode::Async), o.observations(), 1_500),
            Ok(LeaderRecord { member: "pg0".into(), term: 1, sync_standbys: vec![] })
        );
        o.agent_report("pg2", Ok(primary(1)), 1_000);
        assert!(bootstrap_leader(&spec(Mode::Async), o.observations(), 1_500).unwrap_err().contains("pg0, pg2"));
        let empty = Observer::new(["pg0"], 0);
        assert!(bootstrap_leader(&spec(Mode::Async), empty.observations(), 1_500).is_err());
    }

    #[test]
    fn observer_keeps_the_first_time_each_signal_appeared() {
        let mut o = Observer::new(["pg1"], 0);
        o.agent_report("pg1", Ok(replica(10, false)), 1_000);
        o.agent_report("pg1", Ok(replica(20, false)), 2_000);
        o.direct_probe("pg1", Err("x".into()), 1_500);
        o.direct_probe("pg1", Err("y".into()), 2_500);
        let m = &o.observations()["pg1"];
        assert_eq!(m.receiver_lost_since_ms, Some(1_000));
        assert_eq!(m.direct, DirectProbe::Failed { since_ms: 1_500, error: "y".into() });
        assert_eq!(m.last_wal_position, Some(20));
        o.agent_report("pg1", Ok(replica(15, true)), 3_000);
        let m = &o.observations()["pg1"];
        assert_eq!(m.receiver_lost_since_ms, None, "streaming again resets the signal");
        assert_eq!(m.last_wal_position, Some(20), "the furthest position is kept");
        o.agent_gone("pg1", 4_000);
        o.agent_gone("pg1", 5_000);
        assert_eq!(o.observations()["pg1"].agent, AgentView::Gone { since_ms: 4_000 });
        o.new_term();
        assert_eq!(o.observations()["pg1"].last_wal_position, None);
    }

    #[test]
    fn decisions_and_leader_records_cross_the_wire() {
        let mut o = healthy();
        primary_dies(&mut o, 5_000, 5_000, 6_000);
        let d = decide(&spec(Mode::Async), o.observations(), &leader(&[]), 6_000);
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains("\"decision\":\"failover\"") && json.contains("\"step\":\"compare_and_swap_leader\""));
        assert_eq!(serde_json::from_str::<Decision>(&json).unwrap(), d);
        let obs_json = serde_json::to_string(o.observations()).unwrap();
        assert_eq!(&serde_json::from_str::<Observations>(&obs_json).unwrap(), o.observations());
    }
}
