//! The `drover` binary's command-line layer: argument parsing and the tools that run
//! without a server process (config checking, importing, the REST client).
//!
//! - [`cli`]: the clap definitions of every subcommand and flag, and the agent's
//!   flags-over-file config merge ([`cli::AgentArgs::to_config`]).
//! - [`run`]: the long-running roles (`server`, `agent`, `up`), wired to the server and
//!   agent crates.
//! - [`check_config`]: `drover check-config`, loading config exactly as the roles would.
//! - [`import`]: `drover import sensu`, Sensu 1.x JSON config to drover TOML.
//! - [`ctl`]: `drover ctl`, a blocking client for the REST API.
#![forbid(unsafe_code)]

pub mod check_config;
pub mod cli;
pub mod ctl;
pub mod import;
pub mod run;
