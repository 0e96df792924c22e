//! The bridge to the event pipeline (`drover-pipeline`): what the pipeline may ask of
//! the registry, and the Prometheus rendering of its counters.
//!
//! The pipeline holds a weak reference, so the registry and the pipeline do not keep
//! each other alive.

use crate::state::State;
use drover_core::event::CheckResult;
use drover_core::{CheckSpec, Entity, Event};
use drover_pipeline::{Context, PipelineStats};
use std::fmt::Write;
use std::sync::{Arc, Weak};

/// The entity the pipeline's own events (handler failures, aggregates) are recorded on.
pub const SERVER_ENTITY: &str = "drover-server";

pub struct Ctx(pub Weak<State>);

impl Ctx {
    fn state(&self) -> Option<Arc<State>> {
        self.0.upgrade()
    }
}

impl Context for Ctx {
    fn entity(&self, name: &str) -> Option<Entity> {
        self.state()?.entity(name)
    }
    fn event(&self, entity: &str, check: &str) -> Option<Event> {
        self.state()?.event(entity, check)
    }
    fn events_of_check(&self, check: &str) -> Vec<Event> {
        self.state().map(|s| s.events_of_check(check)).unwrap_or_default()
    }
    fn ingest(&self, result: CheckResult) {
        if let Some(s) = self.state()
            && let Err(e) = s.ingest(None, result)
        {
            tracing::error!(error = %e, "pipeline produced a result the registry refused");
        }
    }
    fn server_entity(&self) -> String {
        SERVER_ENTITY.to_string()
    }
    fn check(&self, name: &str) -> Option<CheckSpec> {
        self.state()?.check(name)
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The pipeline's counters in Prometheus text format, appended to `/metrics`.
pub fn render_stats(s: &PipelineStats) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, kind: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP drover_pipeline_{name} {help}\n# TYPE drover_pipeline_{name} {kind}\ndrover_pipeline_{name} {v}"
        );
    };
    gauge("queued", "Events waiting for the dispatcher (backpressure)", "gauge", s.queued as f64);
    gauge("queue_capacity", "Capacity of the intake queue", "gauge", s.queue_capacity as f64);
    gauge("submitted_total", "Events submitted to the pipeline", "counter", s.submitted as f64);
    gauge("dropped_total", "Events refused because the intake queue was full", "counter", s.dropped as f64);
    gauge("suppressed_total", "Events not handled because a dependency is failing", "counter", s.suppressed as f64);
    gauge("filtered_total", "Events stopped by filters", "counter", s.filtered as f64);
    gauge("delivered_total", "Successful deliveries", "counter", s.delivered as f64);
    gauge("failed_total", "Failed delivery attempts", "counter", s.failed as f64);
    gauge("retried_total", "Delivery retries", "counter", s.retried as f64);
    gauge(
        "dead_lettered_total",
        "Deliveries that gave up into the dead-letter list",
        "counter",
        s.dead_lettered as f64,
    );
    gauge("dead_letters", "Dead letters held now", "gauge", s.dead_letters as f64);
    let _ = writeln!(
        out,
        "# HELP drover_handler_delivered_total Successful deliveries per handler\n# TYPE drover_handler_delivered_total counter"
    );
    for (name, h) in &s.handlers {
        let _ = writeln!(out, "drover_handler_delivered_total{{handler=\"{}\"}} {}", esc(name), h.delivered);
    }
    let _ = writeln!(
        out,
        "# HELP drover_handler_failed_total Failed attempts per handler\n# TYPE drover_handler_failed_total counter"
    );
    for (name, h) in &s.handlers {
        let _ = writeln!(out, "drover_handler_failed_total{{handler=\"{}\"}} {}", esc(name), h.failed);
    }
    let _ =
        writeln!(out, "# HELP drover_handler_queued Events waiting per handler\n# TYPE drover_handler_queued gauge");
    for (name, h) in &s.handlers {
        let _ = writeln!(out, "drover_handler_queued{{handler=\"{}\"}} {}", esc(name), h.queued);
    }
    out
}
