//! drover-core: the vocabulary every drover role shares.
//!
//! Nothing here does I/O beyond reading config files and writing small state files;
//! the server, agent, proxy and name server all depend on these types so that "a
//! check", "an entity" and "healthy" mean one thing across the system.
//!
//! - [`status`]: Nagios plugin exit codes (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).
//! - [`resource`]: declared resources: [`resource::CheckSpec`], [`resource::Entity`],
//!   [`resource::Silence`], with validation.
//! - [`event`]: per (entity, check) state: history, occurrences, Sensu's weighted flap
//!   detection ([`event::Event::apply`]).
//! - [`health`]: member health as published to proxies and name servers
//!   ([`health::MemberHealth`], [`health::WatchMessage`]).
//! - [`metrics`]: perfdata and the other output metric formats (Graphite, InfluxDB line,
//!   Prometheus text) parsed into [`metrics::MetricPoint`]s.
//! - [`pipeline`]: event pipeline resources: handlers, filters, mutators, aggregates,
//!   check dependencies (run by the `drover-pipeline` crate).
//! - [`tokens`]: entity attribute substitution into check commands.
//! - [`protocol`]: the JSON messages agents and servers exchange over the WebSocket.
//! - [`client`]: a `--server` URL and the TLS roots a client of the server trusts.
//! - [`database`]: failover resources: the server's `[databases.NAME]`, the agent's `[postgres]`.
//! - [`config`]: TOML config files, loaded with errors that name file, line and field.
//! - [`time`]: wall-clock helpers (milliseconds since the Unix epoch).
//! - [`state_file`]: small JSON files written whole (temp file, rename) for state kept
//!   across restarts.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod database;
pub mod event;
pub mod health;
pub mod metrics;
pub mod pipeline;
pub mod protocol;
pub mod resource;
pub mod state_file;
pub mod status;
pub mod time;
pub mod tokens;

pub use event::{Event, EventState};
pub use metrics::{MetricFormat, MetricPoint};
pub use resource::{CheckSpec, Entity, EntityClass, Silence};
pub use status::Status;
