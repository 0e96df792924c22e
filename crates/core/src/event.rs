//! The state of one check on one entity, and how a new result changes it.
//!
//! The rules follow Sensu so that operators' expectations carry over: a history of the
//! last 21 statuses, `occurrences` counting consecutive results with the same status,
//! and weighted flap detection (older state changes weigh 0.8, the newest 1.2).

use crate::metrics::MetricPoint;
use crate::status::Status;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How many results the history keeps; Sensu's flap detection needs exactly 21.
pub const HISTORY_LEN: usize = 21;

/// One result from a check execution, as an agent (or the API) reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub check: String,
    /// The entity the result is for. Empty means the reporting agent's own entity;
    /// proxy checks set the proxy entity's name.
    #[serde(default)]
    pub entity: String,
    pub status: Status,
    #[serde(default)]
    pub output: String,
    /// When the server asked for this run (ms since epoch); 0 for local checks.
    #[serde(default)]
    pub issued_ms: i64,
    /// When the command started (ms since epoch).
    #[serde(default)]
    pub executed_ms: i64,
    #[serde(default)]
    pub duration_ms: u64,
    #[serde(default)]
    pub metrics: Vec<MetricPoint>,
    /// Check settings carried with results of checks the server does not define
    /// (agent-local checks and results POSTed by scripts): ttl, handlers, thresholds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_config: Option<EventCheckConfig>,
}

impl CheckResult {
    /// A result drover makes itself rather than a check command (keepalive and TTL
    /// monitors, the pipeline's handler and aggregate events, a manual resolve),
    /// stamped as issued and executed at `now_ms`.
    pub fn made_by_drover(entity: &str, check: &str, status: Status, output: String, now_ms: i64) -> CheckResult {
        CheckResult {
            check: check.to_string(),
            entity: entity.to_string(),
            status,
            output,
            issued_ms: now_ms,
            executed_ms: now_ms,
            duration_ms: 0,
            metrics: Vec::new(),
            check_config: None,
        }
    }
}

/// The part of a check's definition that an event needs to be handled on its own.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EventCheckConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[serde(default)]
    pub handlers: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_flap_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_flap_threshold: Option<u32>,
}

impl From<&crate::resource::CheckSpec> for EventCheckConfig {
    fn from(c: &crate::resource::CheckSpec) -> Self {
        EventCheckConfig {
            interval_secs: c.interval_secs,
            ttl_secs: c.ttl_secs,
            handlers: c.handlers.clone(),
            labels: c.labels.clone(),
            low_flap_threshold: c.low_flap_threshold,
            high_flap_threshold: c.high_flap_threshold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    Passing,
    Failing,
    Flapping,
}

/// What a result did to the event, for handlers to decide whether to act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventAction {
    /// First result, or a status change that is not a resolution.
    Create,
    /// Same status as before.
    Update,
    /// A non-OK status returned to OK.
    Resolve,
    /// The check is flapping.
    Flapping,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub status: Status,
    pub executed_ms: i64,
}

/// The latest state of `check` on `entity`. Keyed by `(entity, check)` in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub entity: String,
    pub check: String,
    pub status: Status,
    pub output: String,
    pub state: EventState,
    pub action: EventAction,
    pub occurrences: u64,
    /// Highest `occurrences` reached in the current non-OK run (Sensu's watermark).
    pub occurrences_watermark: u64,
    pub history: Vec<HistoryEntry>,
    /// Weighted percentage of state changes over the history (0..=100).
    pub total_state_change: u32,
    /// When the check last returned OK (ms since epoch); 0 if never.
    pub last_ok_ms: i64,
    pub issued_ms: i64,
    pub executed_ms: i64,
    /// When the server received the latest result (ms since epoch).
    pub received_ms: i64,
    pub duration_ms: u64,
    #[serde(default)]
    pub metrics: Vec<MetricPoint>,
    #[serde(default)]
    pub check_config: EventCheckConfig,
    /// Names of silences covering this event when it was last processed.
    #[serde(default)]
    pub silenced_by: Vec<String>,
}

impl Event {
    /// The event a first result creates.
    pub fn first(entity: &str, result: &CheckResult, cfg: EventCheckConfig, received_ms: i64) -> Event {
        let mut e = Event {
            entity: entity.to_string(),
            check: result.check.clone(),
            status: result.status,
            output: String::new(),
            state: EventState::Passing,
            action: EventAction::Create,
            occurrences: 0,
            occurrences_watermark: 0,
            history: Vec::with_capacity(HISTORY_LEN),
            total_state_change: 0,
            last_ok_ms: 0,
            issued_ms: 0,
            executed_ms: 0,
            received_ms,
            duration_ms: 0,
            metrics: Vec::new(),
            check_config: cfg,
            silenced_by: Vec::new(),
        };
        e.apply(result, received_ms);
        e.action = EventAction::Create;
        e
    }

    pub fn is_silenced(&self) -> bool {
        !self.silenced_by.is_empty()
    }

    /// Folds a new result into the event (Sensu Go's `updateOccurrences`,
    /// `totalStateChange` and `isFlapping`, in that order).
    pub fn apply(&mut self, result: &CheckResult, received_ms: i64) {
        let previous = self.history.last().map(|h| h.status);
        let executed = if result.executed_ms > 0 { result.executed_ms } else { received_ms };
        self.history.push(HistoryEntry { status: result.status, executed_ms: executed });
        if self.history.len() > HISTORY_LEN {
            let excess = self.history.len() - HISTORY_LEN;
            self.history.drain(..excess);
        }

        if previous == Some(result.status) {
            self.occurrences += 1;
        } else {
            self.occurrences = 1;
        }
        if result.status.is_ok() {
            // The resolution keeps the incident's watermark (as Sensu does), so a filter can
            // tell whether the incident was ever alerted before passing its resolution on.
            if previous.is_none() {
                self.occurrences_watermark = 1;
            }
            self.last_ok_ms = executed;
        } else if previous.is_none_or(|p| p.is_ok()) {
            // A new incident starts a new watermark.
            self.occurrences_watermark = self.occurrences;
        } else {
            self.occurrences_watermark = self.occurrences_watermark.max(self.occurrences);
        }

        self.total_state_change = total_state_change(&self.history);
        let flapping = is_flapping(
            self.state,
            self.total_state_change,
            self.check_config.low_flap_threshold,
            self.check_config.high_flap_threshold,
        );
        self.state = if flapping {
            EventState::Flapping
        } else if result.status.is_ok() {
            EventState::Passing
        } else {
            EventState::Failing
        };
        self.action = if flapping {
            EventAction::Flapping
        } else if previous.is_some_and(|p| !p.is_ok()) && result.status.is_ok() {
            EventAction::Resolve
        } else if previous != Some(result.status) {
            EventAction::Create
        } else {
            EventAction::Update
        };

        self.status = result.status;
        self.output = result.output.clone();
        self.issued_ms = result.issued_ms;
        self.executed_ms = executed;
        self.received_ms = received_ms;
        self.duration_ms = result.duration_ms;
        self.metrics = result.metrics.clone();
    }
}

/// Sensu's weighted state change percentage over a full history; 0 until the history
/// holds 21 results.
pub fn total_state_change(history: &[HistoryEntry]) -> u32 {
    if history.len() < HISTORY_LEN {
        return 0;
    }
    let mut changes = 0.0f64;
    let mut weight = 0.8f64;
    for pair in history.windows(2) {
        if pair[1].status != pair[0].status {
            changes += weight;
        }
        weight += 0.02;
    }
    (changes / 20.0 * 100.0) as u32
}

/// Enters flapping at `high`, leaves it only at or below `low` (hysteresis).
pub fn is_flapping(state: EventState, tsc: u32, low: Option<u32>, high: Option<u32>) -> bool {
    let (Some(low), Some(high)) = (low, high) else { return false };
    if state == EventState::Flapping { tsc > low } else { tsc >= high }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Status) -> CheckResult {
        CheckResult::made_by_drover("", "c", status, status.as_str().into(), 0)
    }

    fn flappy_cfg() -> EventCheckConfig {
        EventCheckConfig { low_flap_threshold: Some(20), high_flap_threshold: Some(60), ..Default::default() }
    }

    #[test]
    fn occurrences_count_consecutive_equal_statuses() {
        let mut e = Event::first("n", &result(Status::Critical), Default::default(), 1);
        e.apply(&result(Status::Critical), 2);
        e.apply(&result(Status::Critical), 3);
        assert_eq!(e.occurrences, 3);
        assert_eq!(e.occurrences_watermark, 3);
        assert_eq!(e.action, EventAction::Update);
        e.apply(&result(Status::Ok), 4);
        assert_eq!(e.occurrences, 1);
        assert_eq!(e.occurrences_watermark, 3, "the resolution keeps the incident's watermark");
        assert_eq!(e.action, EventAction::Resolve);
        assert_eq!(e.state, EventState::Passing);
        assert_eq!(e.last_ok_ms, 4);
        e.apply(&result(Status::Warning), 5);
        assert_eq!(e.occurrences_watermark, 1, "a new incident starts a new watermark");
    }

    #[test]
    fn history_is_capped_at_21() {
        let mut e = Event::first("n", &result(Status::Ok), Default::default(), 0);
        for i in 0..50 {
            e.apply(&result(Status::Ok), i);
        }
        assert_eq!(e.history.len(), HISTORY_LEN);
    }

    #[test]
    fn alternating_results_become_flapping_after_full_history() {
        let mut e = Event::first("n", &result(Status::Ok), flappy_cfg(), 0);
        for i in 1..HISTORY_LEN as i64 {
            let s = if i % 2 == 0 { Status::Ok } else { Status::Critical };
            e.apply(&result(s), i);
            if (i as usize) < HISTORY_LEN - 1 {
                assert_ne!(e.state, EventState::Flapping, "no flapping before 21 results");
            }
        }
        // Weights run 0.80, 0.82 … 1.18 over 20 transitions: 19.8 of 20 = 99%.
        assert_eq!(e.total_state_change, 99);
        assert_eq!(e.state, EventState::Flapping);
        assert_eq!(e.action, EventAction::Flapping);
    }

    #[test]
    fn flapping_ends_only_below_low_threshold() {
        assert!(is_flapping(EventState::Flapping, 30, Some(20), Some(60)));
        assert!(!is_flapping(EventState::Flapping, 20, Some(20), Some(60)));
        assert!(!is_flapping(EventState::Failing, 59, Some(20), Some(60)));
        assert!(is_flapping(EventState::Failing, 60, Some(20), Some(60)));
        assert!(!is_flapping(EventState::Failing, 100, None, None));
    }

    #[test]
    fn steady_failure_is_failing_not_flapping() {
        let mut e = Event::first("n", &result(Status::Warning), flappy_cfg(), 0);
        for i in 0..30 {
            e.apply(&result(Status::Warning), i);
        }
        assert_eq!(e.total_state_change, 0);
        assert_eq!(e.state, EventState::Failing);
    }
}
