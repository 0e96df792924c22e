//! drover-server: the control plane.
//!
//! Data flow: agents connect to the WebSocket ([`sessions`]) and send keepalives and
//! results; [`state::State`] folds them into entities and events in memory and marks
//! keys dirty; [`persist::Persister`] group-commits dirty keys to the
//! [`drover_store::Store`] and then lets sessions acknowledge. [`scheduler`] publishes
//! check requests to subscribed agents; [`monitor`] raises keepalive and TTL events
//! from the passage of time; [`api`] serves REST, `/health` and `/metrics`.
//!
//! - [`watch`]: `GET /api/v1/watch`, member health streamed to proxies and name servers.
//! - [`databases`]: `[databases.*]` clusters: members' reports and orders (failover).
//! - [`auth`]: admin and agent tokens, created on first start (0600).
//! - [`keys`]: the store key layout.
//! - [`telemetry`]: drover's own Prometheus metrics.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod databases;
pub mod handling;
pub mod keys;
pub mod monitor;
pub mod persist;
pub mod scheduler;
pub mod sessions;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod watch;

use drover_core::config::{ConfigError, ServerConfig, ServerSettings};
use drover_store::Store;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Directory of `*.toml` resource files; missing means none.
    pub config_dir: PathBuf,
    /// Where the store file and token files live.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_token: Option<String>,
    pub agent_token: Option<String>,
    /// Serve HTTPS/WSS with these PEM files; plain HTTP/WS when none.
    pub tls: Option<tls::TlsFiles>,
}

/// Why the server could not start or stopped. Says which part failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("config: {0}")]
    Config(#[from] ConfigError),
    #[error("data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error("store: {0}")]
    Store(#[from] drover_store::StoreError),
    #[error("event pipeline: {0}")]
    Pipeline(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

pub struct Server {
    addr: SocketAddr,
    tokens: auth::Tokens,
    state: Arc<state::State>,
    tasks: JoinSet<()>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Server {
    /// Opens the embedded store in `data_dir` and starts serving.
    pub async fn start(opts: ServerOptions) -> Result<Server, ServerError> {
        let config = ServerConfig::load_dir(&opts.config_dir)?;
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(|source| ServerError::DataDir { path: opts.data_dir.clone(), source })?;
        let store = drover_store::embedded::EmbeddedStore::open(&opts.data_dir.join("drover.redb"))?;
        Self::start_with_store(opts, config, store).await
    }

    /// Starts on any [`Store`] (the embedded one, or etcd).
    pub async fn start_with_store(
        opts: ServerOptions,
        config: ServerConfig,
        store: Arc<dyn Store>,
    ) -> Result<Server, ServerError> {
        let tokens = auth::Tokens::load(&opts.data_dir, opts.admin_token.clone(), opts.agent_token.clone())
            .map_err(|source| ServerError::DataDir { path: opts.data_dir.clone(), source })?;
        let metrics = Arc::new(telemetry::Metrics::new());
        let state = state::State::load(store.clone(), config.server.clone(), metrics.clone()).await?;
        apply_config(&state, &config);
        let pipeline_cfg = drover_pipeline::PipelineConfig::from_server_config(&config);
        let pipeline = drover_pipeline::Pipeline::start(pipeline_cfg, Arc::new(handling::Ctx(Arc::downgrade(&state))))
            .map_err(|e| match e {
                drover_pipeline::PipelineError::Config(c) => ServerError::Config(c),
                other => ServerError::Pipeline(other.to_string()),
            })?;
        let _ = state.pipeline.set(pipeline);

        let tls = opts.tls.as_ref().map(tls::server_config).transpose().map_err(ServerError::Tls)?;
        let listen_err = |source| ServerError::Listen { addr: opts.listen, source };
        let listener = std::net::TcpListener::bind(opts.listen).map_err(listen_err)?;
        let addr = listener.local_addr().map_err(listen_err)?;

        let sessions = Arc::new(sessions::Sessions::default());
        let scheduler = scheduler::Scheduler::new(state.clone(), sessions.clone());
        let (shutdown, mut shutdown_rx) = tokio::sync::watch::channel(false);
        let mut tasks = JoinSet::new();
        tasks.spawn(state.persister.clone().run(store.clone(), state.clone(), metrics.clone()));
        tasks.spawn(scheduler.clone().supervise());
        tasks.spawn(monitor::run(state.clone()));
        if !config.databases.is_empty() {
            tasks.spawn(databases::run(state.clone(), sessions.clone(), config.databases.values().cloned().collect()));
        }
        let app = api::router(api::Api { state: state.clone(), sessions, scheduler, tokens: tokens.clone() });
        let make = app.into_make_service_with_connect_info::<SocketAddr>();
        match tls {
            None => {
                listener.set_nonblocking(true).map_err(listen_err)?;
                let listener = tokio::net::TcpListener::from_std(listener).map_err(listen_err)?;
                // Agent acks and watch frames are small writes: without TCP_NODELAY, Nagle
                // holds each behind the peer's delayed ACK (~40-200 ms on Linux).
                use axum::serve::ListenerExt;
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                tasks.spawn(async move {
                    let serve = axum::serve(listener, make).with_graceful_shutdown(async move {
                        let _ = shutdown_rx.wait_for(|s| *s).await;
                    });
                    if let Err(e) = serve.await {
                        tracing::error!(error = %e, "API server stopped");
                    }
                });
            }
            Some(cfg) => {
                let handle = axum_server::Handle::new();
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(
                    axum_server::tls_rustls::RustlsConfig::from_config(cfg),
                )
                .acceptor(axum_server::accept::NoDelayAcceptor::new());
                let server =
                    axum_server::from_tcp(listener).map_err(listen_err)?.acceptor(acceptor).handle(handle.clone());
                tasks.spawn(async move {
                    let _ = shutdown_rx.wait_for(|s| *s).await;
                    handle.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
                });
                tasks.spawn(async move {
                    if let Err(e) = server.serve(make).await {
                        tracing::error!(error = %e, "API server stopped");
                    }
                });
            }
        }
        tracing::info!(%addr, tls = opts.tls.is_some(), data_dir = %opts.data_dir.display(), checks = config.checks.len(), "drover server listening");
        Ok(Server { addr, tokens, state, tasks, shutdown })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn admin_token(&self) -> &str {
        &self.tokens.admin
    }
    pub fn agent_token(&self) -> &str {
        &self.tokens.agent
    }
    pub fn settings(&self) -> &ServerSettings {
        &self.state.settings
    }

    /// Stops accepting, flushes everything dirty to the store, and returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        // Let connections see the close, then stop the background loops.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        self.tasks.abort_all();
        if let Some(p) = self.state.pipeline.get() {
            p.stop();
        }
        while self.tasks.join_next().await.is_some() {}
        self.state.persister.flush_once(&*self.state.store, &*self.state, &self.state.metrics).await;
        tracing::info!("drover server stopped; state flushed");
    }
}

/// Config-dir resources are upserted on every start: files are the source of truth for
/// what they define; API-made resources with other names are kept.
fn apply_config(state: &state::State, config: &ServerConfig) {
    for c in config.checks.values() {
        if state.check(&c.name).as_ref() != Some(c) {
            state.put_check(c.clone());
        }
    }
    for e in config.entities.values() {
        if state.entity(&e.name).is_none_or(|old| old.class == drover_core::EntityClass::Proxy) {
            state.put_entity(e.clone());
        }
    }
    for s in config.silences.values() {
        let mut s = s.clone();
        if s.begin_unix_secs == 0 {
            s.begin_unix_secs =
                state.silence(&s.name).map(|o| o.begin_unix_secs).unwrap_or_else(drover_core::time::now_secs);
        }
        state.put_silence(s);
    }
}
