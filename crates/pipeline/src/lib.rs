//! drover-pipeline: what happens to an event after the server recorded it.
//!
//! The server calls [`Pipeline::submit`] for every event it records (never for
//! deregistrations); `submit` never waits. Each event goes to the handlers its
//! `check_config.handlers` names (sets expanded), unless a check it depends on, or its
//! agent's keepalive, is failing. Each handler's filters decide, its mutator shapes the
//! payload, and delivery is retried with exponential backoff into a dead-letter list.
//! The pipeline raises events of its own through [`Context::ingest`]: `handler-NAME`
//! on the server's entity when a handler keeps failing, and one per aggregate.
//!
//! Modules:
//! - [`config`]: [`PipelineConfig`] (from the `[handlers]`, `[filters]`, `[mutators]`,
//!   `[aggregates]` tables of `drover_core::config::ServerConfig`) and its compilation,
//!   with errors located in the config files.
//! - [`engine`]: [`Pipeline`]: queues, dispatcher, workers, retries, dead letters, stats.
//! - [`view`]: the event as JSON for filters, templates and handlers (its shape is
//!   documented there).
//! - [`filter`]: built-in filters, occurrence throttling, CEL expressions, time windows.
//! - [`template`]: `{{ .check.output }}` templates for mail and webhook bodies.
//! - [`deliver`]: one delivery attempt per handler type, and mutators.
//! - [`process`]: handler and mutator commands in their own process group.
//! - [`deps`]: check dependencies and the implicit dependency on the keepalive.
//! - [`aggregate`]: aggregate evaluation.
//! - [`metrics_out`]: Graphite, InfluxDB line and Prometheus text renderings.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod config;
pub mod deliver;
pub mod deps;
pub mod engine;
pub mod filter;
pub mod metrics_out;
pub mod process;
pub mod template;
pub mod view;

pub use config::{PipelineConfig, PipelineError};
pub use engine::{DeadLetter, HandlerStats, Pipeline, PipelineStats};
pub use metrics_out::prometheus_text;

/// The check name of keepalive events (the server's `state::KEEPALIVE`).
pub const KEEPALIVE: &str = "keepalive";

/// What the pipeline needs from the server. Implementations must be cheap and must not
/// block: they are called from the dispatcher for every event.
pub trait Context: Send + Sync + 'static {
    fn entity(&self, name: &str) -> Option<drover_core::Entity>;
    fn event(&self, entity: &str, check: &str) -> Option<drover_core::Event>;
    /// The events of `check` on every entity (aggregates filter them by subscription).
    fn events_of_check(&self, check: &str) -> Vec<drover_core::Event>;
    /// Records a result the pipeline produced (handler failures, aggregates); the server
    /// folds it into an event and submits that like any other.
    fn ingest(&self, result: drover_core::event::CheckResult);
    /// The entity the pipeline's own events are recorded on.
    fn server_entity(&self) -> String;
    /// A check definition, for its dependencies.
    fn check(&self, name: &str) -> Option<drover_core::CheckSpec>;
}
