//! Time-driven events: keepalives that stopped, TTL checks whose results are late,
//! and silences that expired.
//!
//! Ages are measured from `max(last seen, server start)`: after a server restart every
//! agent gets a full warning window to reconnect (no false alarms), and an agent that
//! died while the server was down is still reported one window after the restart
//! (Sensu 1.x lost this state across restarts).

use crate::state::{KEEPALIVE, State};
use drover_core::Status;
use drover_core::event::CheckResult;
use drover_core::time::{now_ms, now_secs};
use std::sync::Arc;
use std::time::Duration;

const TICK: Duration = Duration::from_millis(250);

pub async fn run(state: Arc<State>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        keepalives(&state);
        ttls(&state);
        state.expire_silences(now_secs());
    }
}

/// Raises (and repeats once per keepalive interval) keepalive events for silent agents.
pub fn keepalives(state: &State) {
    let now = now_ms();
    let mut due = Vec::new();
    for a in state.overdue_agents(now) {
        let (status, threshold) = if a.age_ms >= a.critical_secs as i64 * 1000 {
            (Status::Critical, a.critical_secs)
        } else {
            (Status::Warning, a.warning_secs)
        };
        let current = state.event(&a.name, KEEPALIVE);
        let repeat = current.as_ref().is_none_or(|ev| ev.status != status || now - ev.received_ms >= a.interval_ms);
        if repeat {
            let output = format!("No keepalive sent from {} for {} seconds (>= {threshold})", a.name, a.age_ms / 1000);
            due.push(CheckResult::made_by_drover(&a.name, KEEPALIVE, status, output, now));
        }
    }
    for r in due {
        tracing::warn!(entity = %r.entity, status = %r.status, "keepalive overdue");
        let _ = state.ingest(None, r);
    }
}

/// Raises a WARNING for every TTL check whose latest result is older than its TTL,
/// repeating once per TTL while it stays late.
pub fn ttls(state: &State) {
    let now = now_ms();
    let due: Vec<CheckResult> = state.with_events(|evs| {
        evs.values()
            .filter_map(|ev| {
                let ttl_ms = ev.check_config.ttl_secs? as i64 * 1000;
                let age = now - ev.received_ms.max(state.started_ms);
                (age >= ttl_ms).then(|| {
                    CheckResult::made_by_drover(
                        &ev.entity,
                        &ev.check,
                        Status::Warning,
                        format!(
                            "Last check execution was {} seconds ago (ttl {} s)",
                            (now - ev.received_ms) / 1000,
                            ttl_ms / 1000
                        ),
                        now,
                    )
                })
            })
            .collect()
    });
    for r in due {
        tracing::warn!(entity = %r.entity, check = %r.check, "check result overdue (ttl)");
        let _ = state.ingest(None, r);
    }
}
