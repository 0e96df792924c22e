//! The long-running roles: `server`, `agent`, and `up` (all roles in one process).
//! Each runs until SIGINT or SIGTERM, then stops cleanly: the server flushes its
//! state, the agent deregisters if configured to.

use crate::cli::{AgentArgs, DnsArgs, ProxyArgs, ServerArgs, UpArgs};
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
    // The proxy and the name server follow the server as separate `drover proxy` and
    // `drover dns` processes would, over the watch stream, so `up` exercises the same
    // path as a real deployment.
    let feed = start_feed(
        &format!("http://{addr}"),
        Some(server.agent_token().to_string()),
        None,
        args.data_dir.join("members.json"),
    )?;
    let proxy = if args.no_proxy {
        None
    } else {
        let pcfg = drover_proxy::spec::config_from_specs(&args.proxy, Some(args.proxy_admin))
            .map_err(|e| anyhow::anyhow!("--proxy: {e}"))?;
        let proxy = drover_proxy::Proxy::start(pcfg).await.context("the proxy failed to start")?;
        for (i, spec) in args.proxy.iter().enumerate() {
            let bound = proxy.local_addr(&spec.listener_name(i)).unwrap_or(spec.bind);
            eprintln!("  proxy: {bound} -> healthy members of `{}` (port {})", spec.subscription, spec.port);
        }
        eprintln!("  proxy admin: http://{}/backends", args.proxy_admin);
        Some(proxy)
    };
    let _dns = if args.no_dns {
        None
    } else {
        let cfg = up_dns_config(&args.dns_domain, args.dns.ip(), &args.data_dir)?;
        first_view(&feed).await;
        let ns = drover_dns::NameServer::start(cfg, args.dns, feed.members())
            .await
            .context("the name server failed to start")?;
        let d = args.dns_domain.trim_end_matches('.');
        eprintln!(
            "  dns: {} (udp+tcp) -> SUBSCRIPTION.service.{d}. and NODE.node.{d}. answer healthy members",
            ns.local_addr
        );
        Some(ns)
    };
    let mut members = proxy.as_ref().map(|_| feed.members());
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = agent.wait() => { r.context("local agent stopped")?; break; }
            Some(()) = next_members(&mut members) => {
                if let (Some(p), Some(m)) = (&proxy, &mut members) {
                    p.set_members(m.borrow_and_update().clone());
                }
            }
            _ = &mut stop => { let _ = agent.shutdown().await; break; }
        }
    }
    if let Some(p) = proxy {
        p.shutdown(std::time::Duration::from_secs(5)).await;
    }
    server.shutdown().await;
    Ok(())
}

/// Waits (briefly) for the feed's first view, from the server or the state file, so a
/// name server's first SOA serials come from the control plane's clock like every later
/// one (and agree with its peers'); without either, it starts on its own clock.
async fn first_view(feed: &drover_feed::Feed) {
    let mut status = feed.status_watch();
    let known = status.wait_for(|s| s.source != drover_feed::Source::Empty);
    if tokio::time::timeout(std::time::Duration::from_secs(3), known).await.is_err() {
        tracing::warn!("no member view from the server or the state file yet; starting with none");
    }
}

/// `up`'s name server: one zone, `domain`, whose discovery names follow the members.
fn up_dns_config(
    domain: &str,
    ns_ip: std::net::IpAddr,
    data_dir: &std::path::Path,
) -> anyhow::Result<drover_dns::DnsConfig> {
    let origin = format!("{}.", domain.trim_end_matches('.'));
    let ns_type = if ns_ip.is_ipv4() { "A" } else { "AAAA" };
    let serials = data_dir.join("dns-serials.json");
    let text = format!(
        "serial_file = {serials:?}\n\
         [[zones]]\norigin = \"{origin}\"\n\
         soa = {{ mname = \"ns.{origin}\", rname = \"hostmaster.{origin}\" }}\n\
         records = [{{ name = \"@\", type = \"NS\", data = \"ns\" }}, {{ name = \"ns\", type = \"{ns_type}\", data = \"{ns_ip}\" }}]\n\
         [discovery]\ndomain = \"{origin}\"\n",
        serials = serials.display().to_string(),
    );
    drover_dns::DnsConfig::parse(std::path::Path::new("--dns-domain"), &text)
        .map_err(|e| anyhow::anyhow!("--dns-domain: {e}"))
}

/// `drover proxy`: the load balancer, from a config file or `--listen` specs; with
/// `--server`, `members` services follow the control plane's member health (and keep
/// the last known members, on disk too, while it is unreachable). SIGHUP re-reads the
/// file and applies it live (an invalid file is logged with its location and the old
/// config stays); SIGTERM or SIGINT stop accepting, drain for `drain_timeout_secs`
/// and exit 0.
pub async fn proxy(args: &ProxyArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let load = || -> anyhow::Result<drover_proxy::config::ProxyConfig> {
        match &args.config {
            Some(file) => Ok(drover_proxy::config::ProxyConfig::load(file)?),
            None => drover_proxy::spec::config_from_specs(&args.listen, args.admin_listen).map_err(anyhow::Error::msg),
        }
    };
    let cfg = load()?;
    let feed = match &args.server {
        Some(server) => Some(start_feed(server, args.token.clone(), args.ca_file.clone(), args.state_file.clone())?),
        None => {
            if cfg.services.values().any(|s| s.members.is_some()) {
                tracing::warn!("services with `members` get none without --server; only static backends serve");
            }
            None
        }
    };
    let proxy = if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
        drover_proxy::Proxy::start_single_threaded(cfg).await
    } else {
        drover_proxy::Proxy::start(cfg).await
    };
    let proxy = proxy.context("drover proxy failed to start")?;
    for (name, addr) in proxy.local_addrs() {
        tracing::info!(listener = %name, %addr, "proxy listener ready");
    }
    let mut members = feed.as_ref().map(|f| f.members());
    if let Some(m) = &mut members {
        proxy.set_members(m.borrow_and_update().clone());
    }
    let mut hup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = hup.recv() => match (&args.config, load()) {
                (None, _) => tracing::info!("SIGHUP: no config file to re-read"),
                (Some(file), Ok(cfg)) => match proxy.reload(cfg) {
                    Ok(()) => tracing::info!(file = %file.display(), "SIGHUP: config reloaded"),
                    Err(e) => tracing::error!("SIGHUP: {e}; keeping the running config"),
                },
                (Some(_), Err(e)) => tracing::error!("SIGHUP: invalid config, keeping the running one: {e}"),
            },
            Some(()) = next_members(&mut members) => {
                if let Some(m) = &mut members {
                    proxy.set_members(m.borrow_and_update().clone());
                }
            }
            _ = &mut stop => break,
        }
    }
    let drain = std::time::Duration::from_secs(proxy.config().drain_timeout_secs);
    proxy.shutdown(drain).await;
    tracing::info!("proxy stopped");
    Ok(())
}

/// Follows the server's member health for a data plane (proxy or name server).
fn start_feed(
    server: &str,
    token: Option<String>,
    ca_file: Option<std::path::PathBuf>,
    state_file: std::path::PathBuf,
) -> anyhow::Result<drover_feed::Feed> {
    let feed = drover_feed::start(drover_feed::FeedOptions {
        server: server.to_string(),
        token,
        ca_file,
        state_file: Some(state_file),
    })?;
    Ok(feed)
}

/// Resolves when the feed publishes a new version; never, without a feed (or once it
/// has stopped).
async fn next_members(rx: &mut Option<tokio::sync::watch::Receiver<drover_feed::Members>>) -> Option<()> {
    match rx {
        Some(rx) => rx.changed().await.ok(),
        None => std::future::pending().await,
    }
}

/// `drover dns`: an authoritative name server. With `--config` alone it serves the file's
/// zones and static pool members; with `--server` its pools follow the control plane's
/// member health. Runs until SIGINT or SIGTERM.
pub async fn dns(args: &DnsArgs) -> anyhow::Result<()> {
    let cfg = match &args.config {
        Some(f) => drover_dns::DnsConfig::load(f)?,
        None => drover_dns::DnsConfig::empty(),
    };
    let listen = args.listen.unwrap_or(cfg.listen);
    // Standalone, the view never changes: the sender is kept (unused) as long as the server runs.
    let (_static_view, standalone) = tokio::sync::watch::channel(drover_dns::Members::default());
    let feed = match &args.server {
        None => None,
        Some(server) => Some(
            drover_feed::start(drover_feed::FeedOptions {
                server: server.clone(),
                token: args.token.clone(),
                ca_file: args.ca_file.clone(),
                state_file: args.state_file.clone(),
            })
            .context("drover dns --server")?,
        ),
    };
    if let Some(f) = &feed {
        first_view(f).await;
    }
    let members = feed.as_ref().map(|f| f.members()).unwrap_or(standalone);
    let ns = drover_dns::NameServer::start(cfg, listen, members).await.context("drover dns failed to start")?;
    println!("drover dns listening on {}", ns.local_addr);
    stop_signal().await;
    drop(ns);
    drop(feed);
    tracing::info!("name server stopped");
    Ok(())
}
