//! Check scheduling: publishes check requests to the agents of a check's subscriptions.
//!
//! - Interval checks fire at instants aligned to the interval and offset by a hash of
//!   the check's name, so the schedule is the same after a restart and on every server,
//!   and different checks do not all fire on the same second.
//! - Each agent delays its run by a splay derived from its name (within
//!   `splay_coverage_percent` of the interval), so a subscription of thousands of
//!   agents does not fire at once.
//! - Cron checks fire on their cron expression, in UTC.
//! - Round-robin checks go to one connected agent per run, rotating.
//! - Proxy checks run once per matching proxy entity.
//!
//! Sensu's known failure is checks that silently stop being scheduled. Here each
//! check's task is supervised: the supervisor re-spawns any task that ends, and
//! reconciles tasks against the check set whenever it changes.

use crate::sessions::Sessions;
use crate::state::State;
use drover_core::protocol::{CheckRequest, ServerMessage};
use drover_core::resource::CheckSpec;
use drover_core::time::now_ms;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

fn stable_hash(parts: &[&str]) -> u64 {
    // FNV-1a: stable across processes and versions, unlike std's RandomState.
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Milliseconds until the next fire of `check` after `now_ms`, or None if unscheduled.
pub fn next_delay_ms(check: &CheckSpec, now_ms: i64) -> Option<u64> {
    if let Some(interval) = check.interval_secs {
        let interval_ms = (interval * 1000) as i64;
        let offset = (stable_hash(&[&check.name]) % interval_ms as u64) as i64;
        let next = ((now_ms - offset) / interval_ms + 1) * interval_ms + offset;
        return Some((next - now_ms) as u64);
    }
    let cron = drover_core::resource::parse_cron(check.cron.as_deref()?).ok()?;
    let now = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now_ms)?;
    let next = cron.find_next_occurrence(&now, false).ok()?;
    Some((next.timestamp_millis() - now_ms).max(0) as u64)
}

/// Per-agent delay within the interval, stable for a given (agent, check).
fn splay_ms(check: &CheckSpec, agent: &str) -> u64 {
    match (check.splay, check.interval_secs) {
        (true, Some(interval)) => {
            let window = interval * 1000 * check.splay_coverage_percent as u64 / 100;
            if window == 0 { 0 } else { stable_hash(&[agent, &check.name]) % window }
        }
        _ => 0,
    }
}

pub struct Scheduler {
    state: Arc<State>,
    sessions: Arc<Sessions>,
}

impl Scheduler {
    pub fn new(state: Arc<State>, sessions: Arc<Sessions>) -> Arc<Scheduler> {
        Arc::new(Scheduler { state, sessions })
    }

    /// Publishes one execution of `check` now. Returns the number of requests sent.
    /// `rr` is the round-robin cursor; `splay` is off for on-demand runs.
    pub fn publish(&self, check: &CheckSpec, rr: &mut usize, splay: bool) -> usize {
        self.state.metrics.checks_published.inc();
        let agents = self.state.subscribed_agents(&check.subscriptions);
        if agents.is_empty() {
            tracing::debug!(check = %check.name, "no connected agent subscribed; nothing to run");
            return 0;
        }
        let issued_ms = now_ms();
        let proxies = if check.proxy_entity_name.is_some() || check.proxy_requests.is_some() {
            Some(self.state.proxy_targets(check))
        } else {
            None
        };
        let mut sent = 0;
        let mut send = |agent: &str, proxy_entity: Option<drover_core::Entity>, splay_ms: u64| {
            let req = ServerMessage::Request(Box::new(CheckRequest {
                check: check.clone(),
                issued_ms,
                splay_ms,
                proxy_entity,
            }));
            let frame = serde_json::to_string(&req).expect("requests always serialize");
            if self.sessions.send(agent, frame) {
                self.state.metrics.check_requests_sent.inc();
                sent += 1;
            } else {
                self.state.metrics.check_requests_dropped.inc();
                tracing::warn!(check = %check.name, agent, "agent queue full or gone; request dropped");
            }
        };
        let pick = |rr: &mut usize| {
            let a = agents[*rr % agents.len()].clone();
            *rr = rr.wrapping_add(1);
            a
        };
        match proxies {
            Some(targets) => {
                for target in targets {
                    if check.round_robin {
                        send(&pick(rr), Some(target), 0);
                    } else {
                        for a in &agents {
                            send(a, Some(target.clone()), 0);
                        }
                    }
                }
            }
            None if check.round_robin => send(&pick(rr), None, 0),
            None => {
                for a in &agents {
                    let s = if splay { splay_ms(check, a) } else { 0 };
                    send(a, None, s);
                }
            }
        }
        sent
    }

    async fn run_check(self: Arc<Self>, check: CheckSpec) {
        let mut rr = (stable_hash(&[&check.name]) % 1024) as usize;
        loop {
            let Some(delay) = next_delay_ms(&check, now_ms()) else {
                tracing::error!(check = %check.name, "check has no usable schedule");
                return;
            };
            // A delay of 0 (a cron second that matched now) must not spin.
            tokio::time::sleep(Duration::from_millis(delay.max(1))).await;
            self.publish(&check, &mut rr, true);
        }
    }

    /// Keeps exactly one task per published check, re-spawning any that ends.
    pub async fn supervise(self: Arc<Self>) {
        let mut generation = self.state.watch_checks();
        let mut tasks: HashMap<String, (CheckSpec, JoinHandle<()>)> = HashMap::new();
        let mut audit = tokio::time::interval(Duration::from_secs(5));
        loop {
            let wanted: HashMap<String, CheckSpec> = self
                .state
                .checks()
                .into_iter()
                .filter(|c| c.publish && !c.subscriptions.is_empty())
                .map(|c| (c.name.clone(), c))
                .collect();
            tasks.retain(|name, (spec, handle)| {
                let keep = wanted.get(name) == Some(spec) && !handle.is_finished();
                if !keep {
                    if handle.is_finished() && wanted.get(name) == Some(spec) {
                        tracing::error!(check = %name, "scheduler task ended unexpectedly; restarting it");
                    }
                    handle.abort();
                }
                keep
            });
            for (name, spec) in wanted {
                tasks.entry(name).or_insert_with(|| {
                    let h = tokio::spawn(self.clone().run_check(spec.clone()));
                    (spec, h)
                });
            }
            tokio::select! {
                r = generation.changed() => if r.is_err() { return },
                _ = audit.tick() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(interval: u64) -> CheckSpec {
        let mut c = CheckSpec::new("cpu", "true");
        c.subscriptions = vec!["a".into()];
        c.interval_secs = Some(interval);
        c
    }

    #[test]
    fn interval_fires_are_aligned_and_stable_across_restarts() {
        let c = check(10);
        let now = 1_700_000_000_123;
        let d1 = next_delay_ms(&c, now).unwrap();
        assert!(d1 > 0 && d1 <= 10_000);
        // Asking again from a later instant before the fire gives the same fire time.
        let d2 = next_delay_ms(&c, now + 1).unwrap();
        assert_eq!(now + d1 as i64, now + 1 + d2 as i64);
        // The fire after that is exactly one interval later.
        let fire = now + d1 as i64;
        assert_eq!(next_delay_ms(&c, fire).unwrap(), 10_000);
    }

    #[test]
    fn cron_next_fire_is_computed() {
        let mut c = check(1);
        c.interval_secs = None;
        c.cron = Some("*/2 * * * * *".into());
        let d = next_delay_ms(&c, 1_700_000_000_500).unwrap();
        assert!(d <= 2_000, "{d}");
    }

    #[test]
    fn splay_spreads_agents_within_coverage() {
        let c = check(10);
        let delays: Vec<u64> = (0..100).map(|i| splay_ms(&c, &format!("agent{i}"))).collect();
        assert!(delays.iter().all(|d| *d < 9_000));
        let distinct: std::collections::HashSet<_> = delays.iter().map(|d| d / 1000).collect();
        assert!(distinct.len() >= 8, "splay should cover the window, got {distinct:?}");
        let mut no_splay = c.clone();
        no_splay.splay = false;
        assert_eq!(splay_ms(&no_splay, "agent1"), 0);
    }
}
