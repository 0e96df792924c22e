//! `drover-proxy`: the front door, an HTTP and TCP load balancer that sends traffic only
//! to healthy backends (standalone mode: one TOML file, reloaded on SIGHUP by the binary).
//!
//! | module | what lives there |
//! |---|---|
//! | [`config`] | the TOML file, validated once at load with `file:line:col: field` errors |
//! | [`backend`] | backend state: active checks (`rise`/`fall`), passive ejection, balancing, retry budget |
//! | `http` | the HTTP reverse proxy (HTTP/1.1 and h2c downstream, pooled HTTP/1.1 upstream) and its retry rule |
//! | `fast` | the HTTP/1.1 fast path: one task per plain connection, heads parsed in place, pooled upstream sockets; hands anything else to `http` |
//! | `workers` | threads with a single-threaded runtime each that HTTP connections are handed to and stay on (or, with one worker, the runtime that accepts them) |
//! | `pool` | upstream HTTP/1.1 connections (hyper's, and plain sockets for `fast`): a stack of idle ones per backend, given back once a response was read |
//! | `tls` | TLS termination for https listeners: rustls (ring), SNI certificate choice, ALPN h2/http1.1 |
//! | `lifetime` | when a connection on hyper's path stops taking requests: drain, or idle for `request_head_timeout_secs` (HTTP/2 too) |
//! | `stall` | bodies on hyper's path that fail once a peer stops sending (`stall_timeout_ms`) |
//! | `tcp` | the L4 listener: one backend per connection, bytes copied both ways |
//! | `admin` | the loopback endpoint: `GET /backends` and `GET /health` (JSON), `GET /metrics` (Prometheus text) |
//! | [`error`] | errors classified by side (client, backend, config) and retryability |
//! | [`spec`] | the `--listen BIND=SUBSCRIPTION:PORT` shorthand for control-plane-fed proxies |
//!
//! Control-plane members: a service with `members` takes its backends from the member
//! view passed to [`RunningProxy::set_members`] (by the binary, from `drover-feed`);
//! each update is a new generation like a reload, and the control plane's verdict
//! gates each member (see [`backend::ControlVerdict`]).
//!
//! Config generations: the live routes and services are one immutable [`Snapshot`]
//! behind a lock, swapped whole on [`RunningProxy::reload`]. A request takes the
//! snapshot once, so it never sees half of a reload. Backends are shared between
//! generations by address, which is how their health survives a reload.

#![forbid(unsafe_code)]

mod admin;
mod affinity;
pub mod backend;
mod cache;
pub mod config;
pub mod error;
mod fast;
mod http;
mod lifetime;
mod pool;
mod proxy_protocol;
pub mod spec;
mod stall;
mod tcp;
mod tls;
mod workers;

use crate::backend::{Backend, ControlVerdict, Service};
use crate::config::{ListenerConfig, MembersConfig, Protocol, ProxyConfig};
pub use crate::error::{ForwardError, ProxyError, Side};
pub use drover_core::health::Members;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Errors of the bodies the proxy passes on (hyper's, or a [`stall::Stalled`]).
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type Body = http_body_util::combinators::BoxBody<bytes::Bytes, BoxError>;

/// HTTP counters for `/metrics`: responses by listener, service and status; resends
/// and cache outcomes by service.
#[derive(Default)]
pub(crate) struct Counters {
    responses: BTreeMap<String, BTreeMap<String, BTreeMap<u16, u64>>>,
    resends: BTreeMap<String, u64>,
    cache: BTreeMap<String, BTreeMap<&'static str, u64>>,
}

/// One config generation, immutable once built.
pub struct Snapshot {
    pub cfg: ProxyConfig,
    pub services: BTreeMap<String, Arc<Service>>,
}

/// `None` while running; `Some(drain)` once shutdown has begun.
pub(crate) type StopRx = watch::Receiver<Option<Duration>>;

pub(crate) struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Serializes generation changes (reloads and member updates), which read the
    /// current snapshot and swap in the next.
    generation: Mutex<()>,
    /// The control plane's member view; `members` services draw their backends from it.
    members: RwLock<Members>,
    /// Removed backends still finishing requests, with their service's name.
    draining: Mutex<Vec<(String, Arc<Backend>)>>,
    /// Stops health-check tasks.
    checks_stop: watch::Sender<bool>,
    /// HTTP traffic counters, kept across reloads; one shard per connection worker
    /// (`workers`), summed when read, so workers do not write to one lock.
    counters: [workers::Padded<Mutex<Counters>>; workers::SHARDS],
    /// Bumped after each swap of `snapshot`, so a connection can keep its copy of the
    /// snapshot until it changes instead of taking the lock per request.
    snapshot_gen: std::sync::atomic::AtomicU64,
    /// Response caches by route or service, kept across generations.
    pub(crate) caches: cache::Registry,
    /// Where health checks of backends added by a reload run, so `reload` may be
    /// called from any thread.
    runtime: tokio::runtime::Handle,
    /// Where HTTP connections run.
    pub(crate) workers: workers::Workers,
}

impl Shared {
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap().clone()
    }

    /// Builds the next generation, reusing backends (and their health) by address and
    /// starting checks for new ones.
    fn build(&self, cfg: ProxyConfig, old: Option<&Snapshot>) -> Snapshot {
        let mut services = BTreeMap::new();
        let members = self.members.read().unwrap().clone();
        for (name, scfg) in &cfg.services {
            let old_svc = old.and_then(|o| o.services.get(name));
            let mut wanted: Vec<(SocketAddr, u32, Option<String>, Option<ControlVerdict>)> =
                scfg.backends.iter().map(|bc| (bc.address, bc.weight, bc.zone.clone(), None)).collect();
            if let Some(mc) = &scfg.members {
                for m in member_backends(mc, &members) {
                    // A static backend at the same address wins: the operator said so explicitly.
                    if !wanted.iter().any(|w| w.0 == m.0) {
                        wanted.push(m);
                    }
                }
            }
            let backends = wanted
                .into_iter()
                .map(|(addr, weight, zone, verdict)| {
                    let b = match old_svc.and_then(|s| s.backends.iter().find(|b| b.addr == addr)) {
                        Some(b) => {
                            b.set_member(weight, zone);
                            b.apply(scfg);
                            b.clone()
                        }
                        None => {
                            let b = Backend::new(addr, weight, zone, scfg);
                            self.runtime.spawn(backend::run_checks(b.clone(), self.checks_stop.subscribe()));
                            b
                        }
                    };
                    if let Some(v) = verdict {
                        b.set_control(v);
                    }
                    b
                })
                .collect();
            services
                .insert(name.clone(), Arc::new(Service::new(name.clone(), scfg.clone(), backends, cfg.zone.clone())));
        }
        Snapshot { cfg, services }
    }

    /// Builds the next generation from `cfg` and the current members and swaps it in;
    /// backends no longer wanted get no new requests and drain what they have.
    fn advance(&self, cfg: Option<ProxyConfig>) {
        let _g = self.generation.lock().unwrap();
        let old = self.snapshot();
        let next = self.build(cfg.unwrap_or_else(|| old.cfg.clone()), Some(&old));
        let mut draining = self.draining.lock().unwrap();
        for (name, svc) in &old.services {
            for b in &svc.backends {
                let kept = next.services.get(name).is_some_and(|s| s.backends.iter().any(|n| Arc::ptr_eq(n, b)));
                if !kept {
                    b.remove();
                    tracing::info!(service = %name, backend = %b.addr, in_flight = b.in_flight(), "removed; draining");
                    draining.push((name.clone(), b.clone()));
                }
            }
        }
        drop(draining);
        *self.snapshot.write().unwrap() = Arc::new(next);
        self.snapshot_gen.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The current snapshot's generation, to compare with a kept copy's.
    pub(crate) fn snapshot_gen(&self) -> u64 {
        self.snapshot_gen.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Counts one HTTP response; the maps are keyed by name so the common case (a
    /// name seen before) allocates nothing.
    pub(crate) fn count_response(
        &self,
        listener: &str,
        service: &str,
        status: u16,
        tries: u32,
        cache: Option<&'static str>,
    ) {
        fn slot<'a, V: Default>(m: &'a mut BTreeMap<String, V>, k: &str) -> &'a mut V {
            if !m.contains_key(k) {
                m.insert(k.to_string(), V::default());
            }
            m.get_mut(k).expect("just inserted")
        }
        let mut c = self.counters[workers::shard()].lock().unwrap();
        // One lookup per level for names seen before, which is every request but the first.
        match c.responses.get_mut(listener).and_then(|m| m.get_mut(service)) {
            Some(by_code) => *by_code.entry(status).or_default() += 1,
            None => *slot(slot(&mut c.responses, listener), service).entry(status).or_default() += 1,
        }
        if tries > 1 {
            *slot(&mut c.resends, service) += u64::from(tries - 1);
        }
        if let Some(outcome) = cache {
            *slot(&mut c.cache, service).entry(outcome).or_default() += 1;
        }
    }

    /// Prometheus text exposition for the admin endpoint's `/metrics`.
    pub(crate) fn metrics_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let doc = self.backends_json();
        let backends: Vec<(String, &serde_json::Value)> = doc["services"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(svc, list)| list.as_array().into_iter().flatten().map(move |b| (svc.clone(), b)))
            .collect();
        let families: [(&str, &str, &str); 3] = [
            ("drover_proxy_backend_up", "gauge", "1 when the backend is in rotation"),
            ("drover_proxy_backend_in_flight", "gauge", "requests and connections in flight"),
            ("drover_proxy_backend_requests_total", "counter", "requests and connections served"),
        ];
        for (name, kind, help) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (svc, b) in &backends {
                let v = match name {
                    "drover_proxy_backend_up" => u64::from(b["state"] == "healthy"),
                    "drover_proxy_backend_in_flight" => b["in_flight"].as_u64().unwrap_or(0),
                    _ => b["requests"].as_u64().unwrap_or(0),
                };
                let addr = b["address"].as_str().unwrap_or("");
                let state = b["state"].as_str().unwrap_or("");
                let _ = writeln!(out, "{name}{{service=\"{svc}\",backend=\"{addr}\",state=\"{state}\"}} {v}");
            }
        }
        let mut c = Counters::default();
        for shard in &self.counters {
            let s = shard.lock().unwrap();
            for (l, by_service) in &s.responses {
                for (svc, by_code) in by_service {
                    let to = c.responses.entry(l.clone()).or_default().entry(svc.clone()).or_default();
                    for (code, n) in by_code {
                        *to.entry(*code).or_default() += n;
                    }
                }
            }
            for (svc, n) in &s.resends {
                *c.resends.entry(svc.clone()).or_default() += n;
            }
            for (svc, by_outcome) in &s.cache {
                for (outcome, n) in by_outcome {
                    *c.cache.entry(svc.clone()).or_default().entry(outcome).or_default() += n;
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP drover_proxy_responses_total HTTP responses sent, by listener, service and status\n# TYPE drover_proxy_responses_total counter"
        );
        for (listener, by_service) in &c.responses {
            for (svc, by_code) in by_service {
                for (code, n) in by_code {
                    let _ = writeln!(
                        out,
                        "drover_proxy_responses_total{{listener=\"{listener}\",service=\"{svc}\",code=\"{code}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP drover_proxy_resends_total requests sent again to another backend\n# TYPE drover_proxy_resends_total counter"
        );
        for (svc, n) in &c.resends {
            let _ = writeln!(out, "drover_proxy_resends_total{{service=\"{svc}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP drover_proxy_cache_lookups_total cacheable requests, by outcome\n# TYPE drover_proxy_cache_lookups_total counter"
        );
        for (svc, by_outcome) in &c.cache {
            for (outcome, n) in by_outcome {
                let outcome = outcome.to_ascii_lowercase();
                let _ =
                    writeln!(out, "drover_proxy_cache_lookups_total{{service=\"{svc}\",outcome=\"{outcome}\"}} {n}");
            }
        }
        out
    }

    /// Admin view: every service's members, plus removed ones still draining.
    pub(crate) fn backends_json(&self) -> serde_json::Value {
        let snap = self.snapshot();
        let mut draining = self.draining.lock().unwrap();
        draining.retain(|(_, b)| b.in_flight() > 0);
        let mut out = serde_json::Map::new();
        for (name, svc) in &snap.services {
            let mut list: Vec<_> = svc.backends.iter().map(|b| b.status()).collect();
            list.extend(draining.iter().filter(|(s, _)| s == name).map(|(_, b)| b.status()));
            out.insert(name.clone(), serde_json::json!(list));
        }
        for (name, b) in draining.iter().filter(|(s, _)| !snap.services.contains_key(s)) {
            let entry = out.entry(name.clone()).or_insert_with(|| serde_json::json!([]));
            if let Some(a) = entry.as_array_mut() {
                a.push(serde_json::json!(b.status()));
            }
        }
        serde_json::json!({ "services": out })
    }
}

/// The backends a `members` source yields: subscribed entities with an IP address,
/// each with the control plane's verdict.
fn member_backends(
    mc: &MembersConfig,
    members: &Members,
) -> Vec<(SocketAddr, u32, Option<String>, Option<ControlVerdict>)> {
    let mut out = Vec::new();
    for m in members.values().filter(|m| m.subscriptions.iter().any(|s| s == &mc.subscription)) {
        let Some(ip) = m.address.as_deref().and_then(|a| a.parse::<std::net::IpAddr>().ok()) else {
            tracing::warn!(entity = %m.entity, address = ?m.address, "member has no IP address; not a backend");
            continue;
        };
        let weight = m.labels.get(&mc.weight_label).and_then(|w| w.parse().ok()).filter(|w| (1..=1000).contains(w));
        let failing = m.failing_reason(&mc.checks);
        let verdict = ControlVerdict {
            entity: m.entity.clone(),
            healthy: failing.is_none(),
            reason: failing.unwrap_or_else(|| m.reason.clone()),
        };
        let port = m.labels.get(&mc.port_label).and_then(|p| p.parse().ok()).filter(|p| *p != 0).unwrap_or(mc.port);
        out.push((
            SocketAddr::new(ip, port),
            weight.unwrap_or(1),
            m.labels.get(&mc.zone_label).cloned(),
            Some(verdict),
        ));
    }
    out
}

/// Entry point.
pub struct Proxy;

impl Proxy {
    /// Binds every listener (and the admin endpoint) and starts serving, with HTTP
    /// connections on as many worker threads as the calling runtime has
    /// (TOKIO_WORKER_THREADS for the binary).
    pub async fn start(cfg: ProxyConfig) -> Result<RunningProxy, ProxyError> {
        let n = tokio::runtime::Handle::current().metrics().num_workers();
        Proxy::start_with(cfg, workers::Workers::start(n).map_err(ProxyError::Workers)?).await
    }

    /// Like [`Proxy::start`], but every connection runs on the calling runtime, which
    /// must be tokio's single-threaded one: the process needs no thread of its own for
    /// the proxy. Whoever calls it must not block that thread (tests that call blocking
    /// clients want [`Proxy::start`]). Still-open connections end with the runtime, not
    /// with [`RunningProxy::shutdown`].
    pub async fn start_single_threaded(cfg: ProxyConfig) -> Result<RunningProxy, ProxyError> {
        if tokio::runtime::Handle::current().runtime_flavor() != tokio::runtime::RuntimeFlavor::CurrentThread {
            return Err(ProxyError::Workers(std::io::Error::other(
                "start_single_threaded needs tokio's current-thread runtime",
            )));
        }
        Proxy::start_with(cfg, workers::Workers::inline()).await
    }

    async fn start_with(cfg: ProxyConfig, workers: workers::Workers) -> Result<RunningProxy, ProxyError> {
        let (checks_stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            snapshot: RwLock::new(Arc::new(Snapshot { cfg: cfg.clone(), services: BTreeMap::new() })),
            draining: Mutex::new(Vec::new()),
            generation: Mutex::new(()),
            members: RwLock::new(Members::default()),
            counters: Default::default(),
            snapshot_gen: Default::default(),
            caches: cache::Registry::default(),
            checks_stop,
            runtime: tokio::runtime::Handle::current(),
            workers,
        });
        let snap = shared.build(cfg.clone(), None);
        *shared.snapshot.write().unwrap() = Arc::new(snap);
        let mut listeners = BTreeMap::new();
        for l in &cfg.listeners {
            let socket = bind(l)?;
            let acceptor = acceptor_for(l)?;
            listeners.insert(l.name.clone(), Live::spawn(&shared, l.clone(), socket, acceptor)?);
        }
        let (stop_tx, stop_rx) = watch::channel(None);
        let admin = match cfg.admin_listen {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await.map_err(|source| ProxyError::Bind {
                name: "admin".into(),
                addr: a,
                source,
            })?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let mut tasks = Vec::new();
        if let Some(l) = admin {
            tasks.push(tokio::spawn(admin::serve(l, shared.clone(), stop_rx)));
        }
        Ok(RunningProxy {
            shared,
            listeners: Mutex::new(listeners),
            retired: Mutex::new(Vec::new()),
            admin_addr,
            tasks,
            stop: stop_tx,
        })
    }
}

/// Binds a listener's socket (backlog 1024, like nginx on Linux) without serving it yet.
fn bind(l: &ListenerConfig) -> Result<std::net::TcpListener, ProxyError> {
    let err = |source| ProxyError::Bind { name: l.name.clone(), addr: l.bind, source };
    let socket = if l.bind.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() };
    let socket = socket.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(l.bind).map_err(err)?;
    let listener = socket.listen(1024).map_err(err)?;
    listener.into_std().map_err(err)
}

fn acceptor_for(l: &ListenerConfig) -> Result<Option<tokio_rustls::TlsAcceptor>, ProxyError> {
    match l.protocol {
        Protocol::Https => {
            Ok(Some(tls::acceptor(&l.tls).map_err(|message| ProxyError::Tls { name: l.name.clone(), message })?))
        }
        _ => Ok(None),
    }
}

/// One bound listener and the task serving it.
struct Live {
    cfg: ListenerConfig,
    addr: SocketAddr,
    /// A duplicate of the listening socket: a reload that keeps the address hands the
    /// same socket to the next serving task, so no connection is refused in between
    /// and none waiting in the accept queue is lost.
    socket: std::net::TcpListener,
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

impl Live {
    /// Starts serving `socket` (within the proxy's runtime, so callable from any thread).
    fn spawn(
        shared: &Arc<Shared>,
        cfg: ListenerConfig,
        socket: std::net::TcpListener,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Live, ProxyError> {
        let err = |source| ProxyError::Bind { name: cfg.name.clone(), addr: cfg.bind, source };
        let addr = socket.local_addr().map_err(err)?;
        let serving = socket.try_clone().map_err(err)?;
        serving.set_nonblocking(true).map_err(err)?;
        let _rt = shared.runtime.enter();
        let listener = tokio::net::TcpListener::from_std(serving).map_err(err)?;
        let (stop, stop_rx) = watch::channel(None);
        let name: Arc<str> = Arc::from(cfg.name.as_str());
        tracing::info!(listener = %cfg.name, %addr, protocol = ?cfg.protocol, "listening");
        let task = match cfg.protocol {
            Protocol::Http | Protocol::Https => {
                shared.runtime.spawn(http::serve(listener, name, shared.clone(), stop_rx, acceptor))
            }
            Protocol::Tcp => shared.runtime.spawn(tcp::serve(listener, name, shared.clone(), stop_rx)),
        };
        Ok(Live { cfg, addr, socket, stop, task })
    }

    /// Stops accepting; connections in flight get `drain` to finish.
    fn retire(self, drain: Duration) -> JoinHandle<()> {
        let _ = self.stop.send(Some(drain));
        self.task
    }
}

/// A started proxy. Dropping it without [`RunningProxy::shutdown`] leaves the tasks
/// running until the runtime ends.
pub struct RunningProxy {
    shared: Arc<Shared>,
    listeners: Mutex<BTreeMap<String, Live>>,
    /// Serving tasks of listeners removed or replaced by a reload, still draining.
    retired: Mutex<Vec<JoinHandle<()>>>,
    admin_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    stop: watch::Sender<Option<Duration>>,
}

impl RunningProxy {
    /// Bound address of each listener, by name (useful with port 0).
    pub fn local_addrs(&self) -> BTreeMap<String, SocketAddr> {
        self.listeners.lock().unwrap().iter().map(|(n, l)| (n.clone(), l.addr)).collect()
    }

    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners.lock().unwrap().get(listener).map(|l| l.addr)
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The admin endpoint's `/backends` document.
    pub fn backends(&self) -> serde_json::Value {
        self.shared.backends_json()
    }

    /// The admin endpoint's `/metrics` text.
    pub fn metrics(&self) -> String {
        self.shared.metrics_text()
    }

    /// The config in force.
    pub fn config(&self) -> ProxyConfig {
        self.shared.snapshot().cfg.clone()
    }

    /// Applies new listeners, routes, services and backends without dropping a
    /// connection. Backends kept (same service, same address) keep their health; new
    /// ones start out of rotation when the service has active checks; removed ones get
    /// no new requests and finish the ones they have. New listeners are bound before
    /// anything changes (a bind failure applies nothing); a listener whose address is
    /// kept keeps its socket even when its protocol or certificates change; a removed
    /// one stops accepting and drains for `drain_timeout_secs`. `admin_listen` is bound
    /// once: changing it is refused.
    pub fn reload(&self, cfg: ProxyConfig) -> Result<(), ProxyError> {
        let old = self.shared.snapshot();
        if old.cfg.admin_listen != cfg.admin_listen {
            return Err(ProxyError::Reload("admin_listen changed; restart the proxy to apply that".into()));
        }
        let mut live = self.listeners.lock().unwrap();
        // Everything that can fail happens before anything changes.
        let mut next: Vec<(ListenerConfig, std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)> = Vec::new();
        for l in &cfg.listeners {
            if live.get(&l.name).is_some_and(|cur| cur.cfg == *l) {
                continue;
            }
            let same_socket = live.values().find(|cur| cur.cfg.bind == l.bind || cur.addr == l.bind);
            let socket = match same_socket {
                Some(cur) => cur.socket.try_clone().map_err(|source| ProxyError::Bind {
                    name: l.name.clone(),
                    addr: l.bind,
                    source,
                })?,
                None => bind(l)?,
            };
            next.push((l.clone(), socket, acceptor_for(l)?));
        }
        self.shared.advance(Some(cfg.clone()));
        let drain = Duration::from_secs(cfg.drain_timeout_secs);
        let mut retired = self.retired.lock().unwrap();
        retired.retain(|t| !t.is_finished());
        for (l, socket, acceptor) in next {
            let name = l.name.clone();
            // Serve the new one first, then stop the one it replaces (by name, or the
            // one that had its address under another name).
            let started = Live::spawn(&self.shared, l, socket, acceptor)?;
            let replaced: Vec<String> = live
                .iter()
                .filter(|(n, cur)| **n == name || cur.addr == started.addr || cur.cfg.bind == started.cfg.bind)
                .map(|(n, _)| n.clone())
                .collect();
            for n in replaced {
                if let Some(old) = live.remove(&n) {
                    tracing::info!(listener = %n, addr = %old.addr, "listener replaced by a reload; draining");
                    retired.push(old.retire(drain));
                }
            }
            live.insert(name, started);
        }
        let gone: Vec<String> = live.keys().filter(|n| !cfg.listeners.iter().any(|l| &l.name == *n)).cloned().collect();
        for n in gone {
            if let Some(old) = live.remove(&n) {
                tracing::info!(listener = %n, addr = %old.addr, "listener removed by a reload; draining");
                retired.push(old.retire(drain));
            }
        }
        tracing::info!("config reloaded");
        Ok(())
    }

    /// Takes the control plane's member view: `members` services gain, lose and gate
    /// backends accordingly (a member that left drains like a removed backend).
    pub fn set_members(&self, members: Members) {
        *self.shared.members.write().unwrap() = members;
        self.shared.advance(None);
    }

    /// Stops accepting, lets in-flight requests and connections finish for up to
    /// `drain`, then returns (whatever is still running is cut; with
    /// [`Proxy::start_single_threaded`], when the runtime it runs on ends).
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.stop.send(Some(drain));
        let mut tasks = self.tasks;
        tasks.extend(std::mem::take(&mut *self.listeners.lock().unwrap()).into_values().map(|l| l.retire(drain)));
        tasks.append(&mut self.retired.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.shared.checks_stop.send(true);
        self.shared.workers.stop();
    }
}
