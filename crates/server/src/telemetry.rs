//! drover's own metrics, served as Prometheus text on `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    pub results_received: Counter,
    pub results_duplicate: Counter,
    pub keepalives_received: Counter,
    pub agents_connected: Gauge,
    pub agent_frames_rejected: Counter,
    pub auth_failures: Counter,
    pub checks_published: Counter,
    pub check_requests_sent: Counter,
    pub check_requests_dropped: Counter,
    pub store_keys_written: Counter,
    pub store_write_errors: Counter,
    pub store_flush_seconds: Histogram,
    pub events_failing: Gauge,
    pub api_requests_rejected: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("drover");
        let m = Metrics {
            results_received: Counter::default(),
            results_duplicate: Counter::default(),
            keepalives_received: Counter::default(),
            agents_connected: Gauge::default(),
            agent_frames_rejected: Counter::default(),
            auth_failures: Counter::default(),
            checks_published: Counter::default(),
            check_requests_sent: Counter::default(),
            check_requests_dropped: Counter::default(),
            store_keys_written: Counter::default(),
            store_write_errors: Counter::default(),
            store_flush_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            events_failing: Gauge::default(),
            api_requests_rejected: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("results_received", "Check results ingested", m.results_received.clone());
        registry.register(
            "results_duplicate",
            "Re-sent check results already stored (dropped)",
            m.results_duplicate.clone(),
        );
        registry.register("keepalives_received", "Agent keepalives received", m.keepalives_received.clone());
        registry.register("agents_connected", "Agents holding a connection now", m.agents_connected.clone());
        registry.register(
            "agent_frames_rejected",
            "Malformed agent frames (connection closed)",
            m.agent_frames_rejected.clone(),
        );
        registry.register("auth_failures", "Requests refused for a missing or wrong token", m.auth_failures.clone());
        registry.register("checks_published", "Scheduled check executions published", m.checks_published.clone());
        registry.register("check_requests_sent", "Check requests sent to agents", m.check_requests_sent.clone());
        registry.register(
            "check_requests_dropped",
            "Check requests dropped because an agent's queue was full",
            m.check_requests_dropped.clone(),
        );
        registry.register(
            "store_keys_written",
            "Keys written to the store by group commit",
            m.store_keys_written.clone(),
        );
        registry.register("store_write_errors", "Failed store commits (retried)", m.store_write_errors.clone());
        registry.register("store_flush_seconds", "Duration of one group commit", m.store_flush_seconds.clone());
        registry.register("events_failing", "Events whose status is not OK", m.events_failing.clone());
        registry.register("api_requests_rejected", "API requests answered 4xx", m.api_requests_rejected.clone());
        Metrics { registry, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
