//! `drover`: one binary for the server, the agent and the tools around them.

use clap::Parser;
use drover::cli::{Cli, Command, ImportSource, LogFormat};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_tracing(cli.log_format, &cli.log_level) {
        eprintln!("error: --log-level: {e}");
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Command::Server(a) => block_on(true, drover::run::server(a)),
        // The agent runs on every monitored node: one thread keeps its footprint small.
        Command::Agent(a) => block_on(false, drover::run::agent(a)),
        Command::Up(a) => block_on(true, drover::run::up(a)),
        Command::CheckConfig(a) => drover::check_config::run(a).map(|summary| println!("{summary}")),
        Command::Import(a) => match &a.source {
            ImportSource::Sensu(a) => drover::import::run(a).map(|report| {
                for w in &report.warnings {
                    eprintln!("{w}");
                }
                for p in &report.written {
                    println!("wrote {}", p.display());
                }
                println!("{}", report.summary());
            }),
        },
        Command::Ctl(a) => drover::ctl::run(a),
        // One worker (TOKIO_WORKER_THREADS=1, or one CPU): one thread that accepts and serves, as nginx's `worker_processes 1`
        // (drover_proxy::Proxy::start_single_threaded).
        Command::Proxy(a) => block_on(worker_threads() != 1, drover::run::proxy(a)),
        Command::Dns(a) => block_on(true, drover::run::dns(a)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("`{filter}`: {e}"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

/// The worker count tokio's multi-threaded runtime would take: `TOKIO_WORKER_THREADS`,
/// else one per CPU.
fn worker_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn block_on(multi_thread: bool, fut: impl std::future::Future<Output = anyhow::Result<()>>) -> Result<(), String> {
    let rt = if multi_thread {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    };
    let rt = rt.map_err(|e| format!("cannot start the async runtime: {e}"))?;
    // `{:#}` prints anyhow's whole context chain on one line.
    rt.block_on(fut).map_err(|e| format!("{e:#}"))
}
