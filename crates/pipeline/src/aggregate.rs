//! Aggregates: one event summarising a check over the entities of a subscription.

use crate::Context;
use drover_core::Status;
use drover_core::event::{CheckResult, EventCheckConfig};
use drover_core::pipeline::AggregateSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub total: u64,
    pub ok: u64,
    pub warning: u64,
    pub critical: u64,
    pub unknown: u64,
}

impl Counts {
    fn non_ok(&self) -> u64 {
        self.total - self.ok
    }
}

fn reached(n: u64, total: u64, count: Option<u64>, percent: Option<u8>) -> bool {
    count.is_some_and(|c| n >= c) || percent.is_some_and(|p| total > 0 && n * 100 >= p as u64 * total)
}

/// The aggregate's status and output for these member counts.
pub fn judge(a: &AggregateSpec, c: &Counts) -> (Status, String) {
    let pct = |n: u64| (n * 100 + c.total / 2).checked_div(c.total).unwrap_or(0);
    let status = if reached(c.critical, c.total, a.critical_count, a.critical_percent) {
        Status::Critical
    } else if reached(c.non_ok(), c.total, a.warning_count, a.warning_percent) {
        Status::Warning
    } else {
        Status::Ok
    };
    let output = format!(
        "{} of {} critical ({}%), {} warning, {} unknown, {} ok; check {} on subscription {}",
        c.critical,
        c.total,
        pct(c.critical),
        c.warning,
        c.unknown,
        c.ok,
        a.check,
        a.subscription
    );
    (status, output)
}

pub fn count(ctx: &dyn Context, a: &AggregateSpec) -> Counts {
    let mut c = Counts::default();
    for ev in ctx.events_of_check(&a.check) {
        if !ctx.entity(&ev.entity).is_some_and(|e| e.is_subscribed(&a.subscription)) {
            continue;
        }
        c.total += 1;
        match ev.status {
            Status::Ok => c.ok += 1,
            Status::Warning => c.warning += 1,
            Status::Critical => c.critical += 1,
            Status::Unknown => c.unknown += 1,
        }
    }
    c
}

/// Evaluates one aggregate and ingests its event when its status or output changed
/// (or it does not exist yet). Returns whether it ingested.
pub fn evaluate(ctx: &dyn Context, a: &AggregateSpec, now_ms: i64) -> bool {
    let (status, output) = judge(a, &count(ctx, a));
    let entity = a.entity_name();
    if ctx.event(&entity, &a.name).is_some_and(|e| e.status == status && e.output == output) {
        return false;
    }
    let mut result = CheckResult::made_by_drover(&entity, &a.name, status, output, now_ms);
    result.check_config = Some(EventCheckConfig {
        handlers: a.handlers.clone(),
        labels: [("aggregate".to_string(), a.name.clone())].into(),
        ..Default::default()
    });
    ctx.ingest(result);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AggregateSpec {
        AggregateSpec {
            name: "web".into(),
            check: "http".into(),
            subscription: "web".into(),
            critical_count: None,
            critical_percent: Some(30),
            warning_count: Some(2),
            warning_percent: None,
            handlers: vec![],
        }
    }

    #[test]
    fn critical_percent_threshold_is_inclusive() {
        let c = Counts { total: 10, ok: 7, warning: 0, critical: 3, unknown: 0 };
        let (s, out) = judge(&spec(), &c);
        assert_eq!(s, Status::Critical);
        assert!(out.starts_with("3 of 10 critical (30%)"), "{out}");
        let c = Counts { total: 10, ok: 8, warning: 0, critical: 2, unknown: 0 };
        assert_eq!(judge(&spec(), &c).0, Status::Warning, "two non-OK reach warning_count");
        let c = Counts { total: 10, ok: 9, warning: 1, critical: 0, unknown: 0 };
        assert_eq!(judge(&spec(), &c).0, Status::Ok);
    }

    #[test]
    fn empty_aggregate_is_ok() {
        assert_eq!(judge(&spec(), &Counts::default()).0, Status::Ok);
    }
}
