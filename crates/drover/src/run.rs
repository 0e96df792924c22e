//! The long-running roles: `server`, `agent`, and `up` (all roles in one process).
//! Each runs until SIGINT or SIGTERM, then stops cleanly: the server flushes its
//! state, the agent deregisters if configured to.

use crate::cli::{AgentArgs, ProxyArgs, ServerArgs, UpArgs};
use anyhow::Context;
use drover_core::config::AgentConfig;
use drover_server::{Server, ServerOptions};

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

pub async fn server(args: &ServerArgs) -> anyhow::Result<()> {
    let server = Server::start(ServerOptions {
        config_dir: args.config_dir.clone(),
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        admin_token: args.admin_token.clone(),
        agent_token: args.agent_token.clone(),
        tls: match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some(drover_server::tls::TlsFiles { cert: cert.clone(), key: key.clone() }),
            _ => None,
        },
    })
    .await
    .context("drover server failed to start")?;
    stop_signal().await;
    server.shutdown().await;
    Ok(())
}

async fn run_agent(cfg: AgentConfig) -> anyhow::Result<()> {
    let mut agent = drover_agent::start(cfg).await.context("drover agent failed to start")?;
    tokio::select! {
        r = agent.wait() => r.context("drover agent stopped")?,
        _ = stop_signal() => agent.shutdown().await.context("drover agent did not stop cleanly")?,
    }
    Ok(())
}

pub async fn agent(args: &AgentArgs) -> anyhow::Result<()> {
    let cfg = args.to_config().map_err(anyhow::Error::msg)?;
    if cfg.server.is_none() {
        anyhow::bail!("no server given: pass --server URL or set `server` in the agent config");
    }
    run_agent(cfg).await
}

pub async fn up(args: &UpArgs) -> anyhow::Result<()> {
    let server = Server::start(ServerOptions {
        config_dir: args.config_dir.clone(),
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        admin_token: None,
        agent_token: None,
        tls: None,
    })
    .await
    .context("drover server failed to start")?;
    let addr = server.local_addr();
    let mut cfg = AgentConfig {
        name: Some(args.agent_name()),
        server: Some(format!("ws://{addr}")),
        token: Some(server.agent_token().to_string()),
        subscriptions: args.subscriptions.clone(),
        ..AgentConfig::default()
    };
    cfg.labels.extend(args.labels.iter().cloned());
    cfg.validate().map_err(|e| anyhow::anyhow!("agent settings: {e}"))?;
    let token_file = args.data_dir.join("admin.token");
    eprintln!(
        "drover is up: API http://{addr}  (admin token in {})\n  try: drover ctl --server http://{addr} --token-file {} entities list",
        token_file.display(),
        token_file.display(),
    );
    let mut agent = drover_agent::start(cfg).await.context("local agent failed to start")?;
    tokio::select! {
        r = agent.wait() => { r.context("local agent stopped")?; }
        _ = stop_signal() => { let _ = agent.shutdown().await; }
    }
    server.shutdown().await;
    Ok(())
}

/// `drover proxy`: standalone load balancer from one config file. SIGHUP re-reads the
/// file and applies it live (an invalid file is logged with its location and the old
/// config stays); SIGTERM or SIGINT stop accepting, drain for `drain_timeout_secs`
/// and exit 0.
pub async fn proxy(args: &ProxyArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let cfg = drover_proxy::config::ProxyConfig::load(&args.config)?;
    let proxy = drover_proxy::Proxy::start(cfg).await.context("drover proxy failed to start")?;
    for (name, addr) in proxy.local_addrs() {
        tracing::info!(listener = %name, %addr, "proxy listener ready");
    }
    let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = hup.recv() => match drover_proxy::config::ProxyConfig::load(&args.config) {
                Ok(cfg) => match proxy.reload(cfg) {
                    Ok(()) => tracing::info!(file = %args.config.display(), "SIGHUP: config reloaded"),
                    Err(e) => tracing::error!("SIGHUP: {e}; keeping the running config"),
                },
                Err(e) => tracing::error!("SIGHUP: invalid config, keeping the running one: {e}"),
            },
            _ = &mut stop => break,
        }
    }
    let drain = std::time::Duration::from_secs(proxy.config().drain_timeout_secs);
    proxy.shutdown(drain).await;
    tracing::info!("proxy stopped");
    Ok(())
}
