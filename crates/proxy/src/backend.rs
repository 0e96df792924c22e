//! Backends and their health: active checks, passive ejection, balancing.
//!
//! A backend is in rotation when it is not removed, its active check (if the service
//! has one) says healthy, and it is not ejected. With an active check a backend starts
//! **out** of rotation and enters only after `rise` consecutive passes, so a member that
//! is added while still booting never sees a request.
//!
//! Choosing among the backends in rotation (see the config reference for the rules):
//! a sticky pin first, then the zone preference, then the service's `balance`.

use crate::config::{Balance, HealthConfig, HealthKind, ServiceConfig};
use crate::workers::{Padded, SHARDS};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
struct Health {
    /// The active check's verdict (true when the service has no active check).
    active_ok: bool,
    ok_streak: u32,
    fail_streak: u32,
    last_check_error: String,
    passive_streak: u32,
    last_passive_error: String,
    ejected_until: Option<Instant>,
    ejections: u32,
    /// When the active check last brought it into rotation (slow start counts from here
    /// or from the end of an ejection, whichever is later).
    healthy_since: Option<Instant>,
}

/// Passive-ejection settings, copied from the service so a reload can change them.
#[derive(Debug, Clone, Copy)]
struct Passive {
    failures: u32,
    base: Duration,
    max: Duration,
}

#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// `addr` as a Host header value, for a request that came without one.
    pub(crate) host: http::HeaderValue,
    /// Idle upstream HTTP connections.
    pub(crate) pool: crate::pool::Pool,
    weight: AtomicU32,
    zone: Mutex<Option<String>>,
    health: Mutex<Health>,
    check: Mutex<Option<HealthConfig>>,
    passive: Mutex<Passive>,
    removed: AtomicBool,
    /// The control plane's verdict for a member from `members` (None for static
    /// backends): in rotation only while true, whatever the active checks say.
    control: Mutex<Option<ControlVerdict>>,
    /// Written per request, one shard per connection worker (summed when read).
    shards: [Padded<Shard>; SHARDS],
    /// `health`'s verdict and ejection end and the control plane's verdict, mirrored
    /// where `available` can read them without taking a lock: a lock is a write, and
    /// with requests on several threads every write moves the cache line between cores.
    active_ok: AtomicBool,
    control_ok: AtomicBool,
    /// Nanoseconds since [`epoch`] until which the backend is ejected; 0 = not ejected.
    ejected_until_ns: AtomicU64,
    /// A passive failure streak is running (so a success has one to reset).
    failing: AtomicBool,
    /// The service limits in-flight requests, so a finished one may wake a queued one.
    limited: AtomicBool,
    /// The current service generation's "a slot was freed" signal.
    released: Mutex<Arc<tokio::sync::Notify>>,
    /// Bumped each time the backend leaves rotation; `close_on_leave` connections end then.
    left: tokio::sync::watch::Sender<u64>,
    /// Stable hash of the address: the sticky cookie's value and the rendezvous identity.
    token: u64,
    /// Response latency for `p2c_ewma` (only touched by services that balance so).
    ewma: Mutex<Ewma>,
}

/// How fast old latency samples fade (linkerd's and Finagle's default).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// What a failed attempt counts as, so a backend that fails fast does not look fast.
pub const EWMA_FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Peak EWMA of response latency, in nanoseconds. Between samples the estimate fades
/// toward zero (read without being written), so a backend that was slow once and then
/// got no traffic is eventually tried again.
#[derive(Debug, Default, Clone, Copy)]
struct Ewma {
    ns: f64,
    /// When the last sample came; None until the first.
    at: Option<Instant>,
}

impl Ewma {
    fn decay(now: Instant, since: Instant) -> f64 {
        (-now.saturating_duration_since(since).as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp()
    }

    fn value(&self, now: Instant) -> Option<f64> {
        self.at.map(|at| self.ns * Self::decay(now, at))
    }

    fn observe(&mut self, sample: Duration, now: Instant) {
        let rtt = sample.as_nanos() as f64;
        self.ns = match self.at {
            None => rtt,
            Some(at) => {
                let w = Self::decay(now, at);
                // Peak sensitivity: a slower sample than the current estimate is taken at once.
                if rtt > self.ns * w { rtt } else { self.ns * w + rtt * (1.0 - w) }
            }
        };
        self.at = Some(now);
    }
}

/// What the control plane says about a member: healthy or not, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlVerdict {
    pub entity: String,
    pub healthy: bool,
    pub reason: String,
}

/// A backend's per-request counters as one worker sees them. With one shared counter
/// every request moved its cache line between the cores of two workers several times;
/// nginx's worker processes keep such state apart too.
#[derive(Debug, Default)]
struct Shard {
    in_flight: AtomicU64,
    served: AtomicU64,
    /// Smooth weighted round robin's running weight, per worker: each worker's picks
    /// are smooth, as each nginx worker's are.
    current_weight: AtomicI64,
}

/// Counts a request or connection as in flight until dropped (on the shard it was
/// counted on, whichever thread drops it).
pub struct InFlight(Arc<Backend>, usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request(self.1);
    }
}

/// [`InFlight`] for a request that cannot outlive its service's config generation
/// (the fast path's): it borrows the backend instead of holding a reference count,
/// whose increment and decrement per request would be writes to a cache line every
/// worker shares.
pub(crate) struct Counted<'a>(&'a Backend, usize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.end_request(self.1);
    }
}

/// The clock origin of [`Backend`]'s atomic ejection deadline.
fn since_epoch_ns(t: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    t.saturating_duration_since(epoch).as_nanos() as u64
}

/// Why no backend was handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// None in rotation (or all already tried).
    NoneHealthy,
    /// Some are in rotation but all are at `max_in_flight_per_backend`.
    Saturated,
}

/// What the admin endpoint shows for one backend.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    pub address: SocketAddr,
    /// The control-plane entity behind a `members` backend.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    pub weight: u32,
    pub zone: Option<String>,
    pub state: &'static str,
    pub reason: String,
    pub in_flight: u64,
    pub requests: u64,
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32, zone: Option<String>, svc: &ServiceConfig) -> Arc<Backend> {
        let b = Arc::new(Backend {
            addr,
            host: host_header(addr),
            pool: crate::pool::Pool::default(),
            weight: AtomicU32::new(weight),
            zone: Mutex::new(zone),
            health: Mutex::new(Health { active_ok: svc.health.is_none(), ..Health::default() }),
            check: Mutex::new(None),
            passive: Mutex::new(passive_of(svc)),
            removed: AtomicBool::new(false),
            control: Mutex::new(None),
            shards: Default::default(),
            active_ok: AtomicBool::new(svc.health.is_none()),
            control_ok: AtomicBool::new(true),
            ejected_until_ns: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            limited: AtomicBool::new(false),
            released: Mutex::new(Arc::new(tokio::sync::Notify::new())),
            left: tokio::sync::watch::Sender::new(0),
            token: crate::affinity::backend_token(addr),
            ewma: Mutex::new(Ewma::default()),
        });
        b.apply(svc);
        b
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The opaque token a sticky cookie carries for this backend.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Records how long a response head took (or [`EWMA_FAILURE_PENALTY`] for a failure).
    pub fn observe_latency(&self, took: Duration) {
        self.ewma.lock().unwrap().observe(took, Instant::now());
    }

    fn latency_ns(&self, now: Instant) -> Option<f64> {
        self.ewma.lock().unwrap().value(now)
    }

    /// Weight ×100 (so a ramp has room below weight 1), reduced during slow start.
    /// Inlined for the usual case (no slow start): it runs for every eligible backend
    /// of every request.
    #[inline]
    fn effective_weight(&self, now: Instant, slow_start: Duration) -> u64 {
        let full = u64::from(self.weight()) * 100;
        if slow_start.is_zero() {
            return full;
        }
        self.ramped_weight(full, now, slow_start)
    }

    #[inline(never)]
    fn ramped_weight(&self, full: u64, now: Instant, slow_start: Duration) -> u64 {
        let h = self.health.lock().unwrap();
        let Some(since) = h.healthy_since.max(h.ejected_until) else { return full };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= slow_start {
            return full;
        }
        let permille = 100 + 900 * elapsed.as_millis() as u64 / slow_start.as_millis().max(1) as u64;
        (full * permille / 1000).max(1)
    }

    /// Takes a reloaded member's weight and zone, keeping its health state.
    pub fn set_member(&self, weight: u32, zone: Option<String>) {
        self.weight.store(weight, Ordering::Relaxed);
        *self.zone.lock().unwrap() = zone;
    }

    /// Takes a (possibly reloaded) service's settings, keeping health state.
    pub fn apply(&self, svc: &ServiceConfig) {
        *self.passive.lock().unwrap() = passive_of(svc);
        self.limited.store(svc.max_in_flight_per_backend > 0, Ordering::Relaxed);
        let mut check = self.check.lock().unwrap();
        if svc.health.is_none() {
            // Nothing will ever mark it healthy again, so trust it.
            self.health.lock().unwrap().active_ok = true;
            self.active_ok.store(true, Ordering::SeqCst);
        }
        *check = svc.health.clone();
    }

    /// Sets the control plane's verdict on a member (kept across config generations).
    pub fn set_control(&self, verdict: ControlVerdict) {
        let mut c = self.control.lock().unwrap();
        if c.as_ref().is_none_or(|old| old.healthy != verdict.healthy) {
            if verdict.healthy {
                // Slow start counts from re-entry, as after an active check's rise.
                self.health.lock().unwrap().healthy_since = Some(Instant::now());
            } else if c.is_some() {
                self.mark_left();
            }
            tracing::info!(backend = %self.addr, entity = %verdict.entity, healthy = verdict.healthy,
                reason = %verdict.reason, "control plane verdict");
        }
        self.control_ok.store(verdict.healthy, Ordering::SeqCst);
        *c = Some(verdict);
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    pub fn remove(&self) {
        self.removed.store(true, Ordering::SeqCst);
        self.mark_left();
    }

    /// Changes each time the backend leaves rotation.
    pub fn left_rotation(&self) -> tokio::sync::watch::Receiver<u64> {
        self.left.subscribe()
    }

    fn mark_left(&self) {
        self.left.send_modify(|n| *n += 1);
    }

    pub fn in_flight(&self) -> u64 {
        self.shards.iter().map(|s| s.in_flight.load(Ordering::SeqCst)).sum()
    }

    pub fn available(&self, now: Instant) -> bool {
        if self.is_removed() || !self.control_ok.load(Ordering::SeqCst) || !self.active_ok.load(Ordering::SeqCst) {
            return false;
        }
        let until = self.ejected_until_ns.load(Ordering::SeqCst);
        until == 0 || since_epoch_ns(now) >= until
    }

    pub fn start_request(self: &Arc<Self>) -> InFlight {
        let shard = crate::workers::shard();
        self.shards[shard].in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone(), shard)
    }

    fn count_request(&self) -> Counted<'_> {
        let shard = crate::workers::shard();
        self.shards[shard].in_flight.fetch_add(1, Ordering::SeqCst);
        Counted(self, shard)
    }

    fn end_request(&self, shard: usize) {
        self.shards[shard].in_flight.fetch_sub(1, Ordering::SeqCst);
        // Wakes one request queued for a backend below its limit (only a limited
        // service queues; a reload that adds a limit is covered by the queue's 50 ms cap).
        if self.limited.load(Ordering::Relaxed) {
            self.released.lock().unwrap().notify_one();
        }
    }

    pub fn record_success(&self) {
        self.shards[crate::workers::shard()].served.fetch_add(1, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            let mut h = self.health.lock().unwrap();
            h.passive_streak = 0;
            self.failing.store(false, Ordering::Relaxed);
        }
    }

    /// A connect failure, a reset or a 5xx; ejects after `passive_failures` in a row.
    pub fn record_failure(&self, reason: &str) {
        let p = *self.passive.lock().unwrap();
        let mut h = self.health.lock().unwrap();
        h.passive_streak += 1;
        self.failing.store(true, Ordering::Relaxed);
        h.last_passive_error = reason.to_string();
        let now = Instant::now();
        let ejected = h.ejected_until.is_some_and(|t| now < t);
        if p.failures > 0 && h.passive_streak >= p.failures && !ejected {
            let factor = 1u32 << h.ejections.min(16);
            let dur = p.base.saturating_mul(factor).min(p.max);
            h.ejections += 1;
            h.ejected_until = Some(now + dur);
            self.ejected_until_ns.store(since_epoch_ns(now + dur).max(1), Ordering::SeqCst);
            self.mark_left();
            h.passive_streak = 0;
            tracing::warn!(backend = %self.addr, ?dur, reason, "ejected after consecutive failures");
        }
    }

    pub fn status(&self) -> BackendStatus {
        let now = Instant::now();
        let h = self.health.lock().unwrap();
        let check = self.check.lock().unwrap().clone();
        let in_flight = self.in_flight();
        let control = self.control.lock().unwrap().clone();
        let (state, reason) = if self.is_removed() {
            ("draining", format!("removed, draining {in_flight} in flight"))
        } else if let Some(c) = control.as_ref().filter(|c| !c.healthy) {
            ("unhealthy", format!("control plane: {} {}", c.entity, c.reason))
        } else if let Some(t) = h.ejected_until.filter(|t| now < *t) {
            ("ejected", format!("{}; back in {} ms", h.last_passive_error, (t - now).as_millis()))
        } else if !h.active_ok {
            let rise = check.as_ref().map_or(1, |c| c.rise);
            if h.last_check_error.is_empty() {
                ("unhealthy", format!("{}/{rise} checks passed", h.ok_streak))
            } else {
                ("unhealthy", format!("{} x{}", h.last_check_error, h.fail_streak.max(1)))
            }
        } else if let Some(c) = &check {
            ("healthy", format!("{0}/{0} checks passed", c.rise))
        } else {
            ("healthy", "no active check".to_string())
        };
        BackendStatus {
            address: self.addr,
            entity: control.map(|c| c.entity),
            weight: self.weight(),
            zone: self.zone.lock().unwrap().clone(),
            state,
            reason,
            in_flight,
            requests: self.shards.iter().map(|s| s.served.load(Ordering::Relaxed)).sum(),
        }
    }

    fn record_check(&self, result: Result<(), String>, cfg: &HealthConfig) {
        let mut h = self.health.lock().unwrap();
        match result {
            Ok(()) => {
                h.ok_streak = h.ok_streak.saturating_add(1);
                h.fail_streak = 0;
                h.last_check_error.clear();
                if !h.active_ok && h.ok_streak >= cfg.rise {
                    h.active_ok = true;
                    self.active_ok.store(true, Ordering::SeqCst);
                    h.healthy_since = Some(Instant::now());
                    tracing::info!(backend = %self.addr, "healthy: {} checks passed", cfg.rise);
                }
            }
            Err(e) => {
                h.fail_streak = h.fail_streak.saturating_add(1);
                h.ok_streak = 0;
                h.last_check_error = e;
                if h.active_ok && h.fail_streak >= cfg.fall {
                    h.active_ok = false;
                    self.active_ok.store(false, Ordering::SeqCst);
                    self.mark_left();
                    tracing::warn!(backend = %self.addr, error = %h.last_check_error, "unhealthy: {} checks failed", cfg.fall);
                }
            }
        }
    }
}

fn passive_of(svc: &ServiceConfig) -> Passive {
    Passive {
        failures: svc.passive_failures,
        base: Duration::from_millis(svc.eject_base_ms),
        max: Duration::from_millis(svc.eject_max_ms),
    }
}

/// Runs the backend's active checks until it is removed or `stop` fires.
pub async fn run_checks(b: Arc<Backend>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if b.is_removed() || *stop.borrow() {
            return;
        }
        let cfg = b.check.lock().unwrap().clone();
        let wait = match &cfg {
            Some(c) => {
                let result = check_once(b.addr, c).await;
                b.record_check(result, c);
                Duration::from_millis(c.interval_ms)
            }
            None => Duration::from_millis(500),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn check_once(addr: SocketAddr, cfg: &HealthConfig) -> Result<(), String> {
    let timeout = Duration::from_millis(cfg.timeout_ms);
    let fut = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| connect_reason(&e))?;
        if cfg.kind == HealthKind::Tcp {
            return Ok(());
        }
        // A fresh connection per check so a pooled connection cannot hide a dead listener.
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        let conn = tokio::spawn(conn);
        let req = http::Request::get(cfg.path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "drover-proxy-health")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string());
        conn.abort();
        let status = resp?.status().as_u16();
        let (lo, hi) = cfg.expect_range();
        if (lo..=hi).contains(&status) { Ok(()) } else { Err(format!("status {status}")) }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timeout after {} ms", cfg.timeout_ms)),
    }
}

/// What an HTTP client puts in `Host` for this address: the port only when not 80.
fn host_header(addr: SocketAddr) -> http::HeaderValue {
    let s = match (addr.port(), addr) {
        (80, SocketAddr::V4(a)) => a.ip().to_string(),
        (80, SocketAddr::V6(a)) => format!("[{}]", a.ip()),
        _ => addr.to_string(),
    };
    http::HeaderValue::try_from(s).expect("a socket address is a header value")
}

pub fn connect_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connect refused".into(),
        std::io::ErrorKind::TimedOut => "connect timeout".into(),
        _ => format!("connect: {e}"),
    }
}

/// One service's members and balancing state for one config generation.
pub struct Service {
    pub name: String,
    /// `name`, shared cheaply with each request's access-log and metrics record on
    /// hyper's path.
    pub(crate) label: Arc<str>,
    pub cfg: ServiceConfig,
    pub backends: Vec<Arc<Backend>>,
    /// The proxy's own zone, preferred when set.
    zone: Option<String>,
    /// Serializes one worker's choices; holds its random state for `p2c_ewma`.
    rr: [Padded<Mutex<u64>>; SHARDS],
    /// Serializes choices across workers, only for a service with
    /// `max_in_flight_per_backend` (whose check and count must be one step).
    serial: Mutex<()>,
    /// Retry tokens in hundredths (`TOKEN`), an atomic so that the common case (the
    /// budget full) is a read and not a write other workers would have to fetch.
    budget: AtomicU64,
    released: Arc<tokio::sync::Notify>,
}

/// Retries always allowed per service before the percentage budget has filled up, so
/// a quiet service can still fail over.
const MIN_RETRY_TOKENS: u64 = 10 * TOKEN;
const MAX_RETRY_TOKENS: u64 = 100 * TOKEN;
/// One retry token in the budget's unit: a request adds `retry_budget_percent` units.
const TOKEN: u64 = 100;

/// Backends a choice is made among; more than this many spill to the heap.
type Peers<'a> = smallvec::SmallVec<[&'a Arc<Backend>; 16]>;

impl Service {
    pub fn new(name: String, cfg: ServiceConfig, backends: Vec<Arc<Backend>>, zone: Option<String>) -> Service {
        let released = Arc::new(tokio::sync::Notify::new());
        for b in &backends {
            *b.released.lock().unwrap() = released.clone();
        }
        // Seeded per service and process so that proxies do not draw in lockstep.
        let seed = crate::affinity::stable_hash(name.as_bytes())
            ^ u64::from(std::process::id())
            ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        let rr =
            std::array::from_fn(|i| Padded(Mutex::new((seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)));
        let label = Arc::from(name.as_str());
        Service {
            name,
            label,
            cfg,
            backends,
            zone,
            rr,
            serial: Mutex::new(()),
            budget: AtomicU64::new(MIN_RETRY_TOKENS),
            released,
        }
    }

    /// Picks an available backend not in `tried` (without counting a request on it).
    pub fn pick(&self, tried: &HashSet<SocketAddr>) -> Option<Arc<Backend>> {
        self.pick_for(tried, Affinity::default())
    }

    /// [`Service::pick`] for a request with a hash key or sticky pin.
    pub fn pick_for(&self, tried: &HashSet<SocketAddr>, aff: Affinity) -> Option<Arc<Backend>> {
        self.choose_then(tried, aff, Instant::now(), Arc::clone).ok()
    }

    /// Picks a backend and counts the request on it in one step, so concurrent
    /// requests cannot overshoot `max_in_flight_per_backend`.
    /// `now` is the caller's clock reading (one per request is enough: availability
    /// changes on a scale of milliseconds).
    pub fn acquire(
        &self,
        tried: &HashSet<SocketAddr>,
        aff: Affinity,
        now: Instant,
    ) -> Result<(Arc<Backend>, InFlight), Unavailable> {
        self.choose_then(tried, aff, now, |b| (b.clone(), b.start_request()))
    }

    /// [`Service::acquire`] with the backend borrowed and counted by a [`Counted`].
    fn acquire_counted(
        &self,
        tried: &HashSet<SocketAddr>,
        aff: Affinity,
        now: Instant,
    ) -> Result<(&Arc<Backend>, Counted<'_>), Unavailable> {
        self.choose_then(tried, aff, now, |b| (b, b.count_request()))
    }

    /// Chooses under this worker's round-robin lock (and, for a service with
    /// `max_in_flight_per_backend`, the service-wide one) and hands the choice to
    /// `then` while they are held, so a request counted there is one step with the
    /// limit check.
    fn choose_then<'s, R>(
        &'s self,
        tried: &HashSet<SocketAddr>,
        aff: Affinity,
        now: Instant,
        then: impl FnOnce(&'s Arc<Backend>) -> R,
    ) -> Result<R, Unavailable> {
        let shard = crate::workers::shard();
        let _serial = self.limited().then(|| self.serial.lock().unwrap());
        let mut rng = self.rr[shard].lock().unwrap();
        self.choose(tried, aff, &mut rng, shard, now).map(then)
    }

    /// [`Service::acquire`], queueing while every backend is at its limit, until `deadline`
    /// (`queue_timeout_ms` from the request's arrival).
    pub async fn acquire_queued(
        &self,
        tried: &HashSet<SocketAddr>,
        deadline: tokio::time::Instant,
        aff: Affinity,
        now: Instant,
    ) -> Result<(Arc<Backend>, InFlight), Unavailable> {
        self.queued(deadline, now, |s, now| s.acquire(tried, aff, now)).await
    }

    /// [`Service::acquire_queued`] for the fast path: see [`Counted`].
    pub(crate) async fn acquire_queued_counted(
        &self,
        tried: &HashSet<SocketAddr>,
        deadline: tokio::time::Instant,
        aff: Affinity,
        now: Instant,
    ) -> Result<(&Arc<Backend>, Counted<'_>), Unavailable> {
        self.queued(deadline, now, |s, now| s.acquire_counted(tried, aff, now)).await
    }

    async fn queued<'s, T>(
        &'s self,
        deadline: tokio::time::Instant,
        mut now: Instant,
        acquire: impl Fn(&'s Self, Instant) -> Result<T, Unavailable>,
    ) -> Result<T, Unavailable> {
        loop {
            let notified = self.released.notified();
            match acquire(self, now) {
                Err(Unavailable::Saturated) if tokio::time::Instant::now() < deadline => {
                    // The short cap bounds the cost of a wake-up lost to a reload swapping
                    // the notifier; normally a freed slot wakes us at once.
                    let cap = tokio::time::Instant::now() + Duration::from_millis(50);
                    let _ = tokio::time::timeout_at(deadline.min(cap), notified).await;
                    now = Instant::now();
                }
                other => return other,
            }
        }
    }

    fn limited(&self) -> bool {
        self.cfg.max_in_flight_per_backend > 0
    }

    /// The choice itself; the caller holds `rr[shard]` and passes its random state.
    fn choose(
        &self,
        tried: &HashSet<SocketAddr>,
        aff: Affinity,
        rng: &mut u64,
        shard: usize,
        now: Instant,
    ) -> Result<&Arc<Backend>, Unavailable> {
        let mut eligible = Peers::new();
        for b in &self.backends {
            if b.available(now) && (tried.is_empty() || !tried.contains(&b.addr)) {
                eligible.push(b);
            }
        }
        if eligible.is_empty() {
            return Err(Unavailable::NoneHealthy);
        }
        let limit = u64::from(self.cfg.max_in_flight_per_backend);
        if limit > 0 {
            eligible.retain(|b| b.in_flight() < limit);
            if eligible.is_empty() {
                return Err(Unavailable::Saturated);
            }
        }
        if let Some(pin) = aff.pin
            && let Some(b) = eligible.iter().find(|b| b.token == pin)
        {
            return Ok(b);
        }
        if let Some(zone) = &self.zone {
            let local: Peers =
                eligible.iter().copied().filter(|b| b.zone.lock().unwrap().as_ref() == Some(zone)).collect();
            if !local.is_empty() {
                eligible = local;
            }
        }
        let slow = Duration::from_millis(self.cfg.slow_start_ms);
        // Each arm picks from `eligible` where it lies: moving the (inline) list costs a copy.
        let chosen = match self.cfg.balance {
            Balance::RoundRobin => smooth_weighted(&eligible, shard, now, slow),
            Balance::P2cEwma => p2c(&eligible, now, slow, rng),
            Balance::Hash => match aff.key {
                Some(key) => rendezvous(&eligible, key, now, slow),
                None => smooth_weighted(&eligible, shard, now, slow),
            },
            Balance::LeastOutstanding => {
                // Compare in_flight/weight without division: a/wa < b/wb  <=>  a*wb < b*wa.
                let w = |b: &Backend| b.effective_weight(now, slow);
                let best = eligible
                    .iter()
                    .map(|b| (b.in_flight(), w(b)))
                    .reduce(|x, y| if y.0 * x.1 < x.0 * y.1 { y } else { x });
                let (bi, bw) = best.unwrap_or((0, 1));
                let least: Peers = eligible.iter().copied().filter(|b| b.in_flight() * bw == bi * w(b)).collect();
                smooth_weighted(&least, shard, now, slow)
            }
        };
        chosen.ok_or(Unavailable::NoneHealthy)
    }

    /// Every request adds `retry_budget_percent`/100 of a token; a retry spends one.
    pub fn note_request(&self) {
        let add = u64::from(self.cfg.retry_budget_percent);
        if add == 0 || self.budget.load(Ordering::Relaxed) >= MAX_RETRY_TOKENS {
            return;
        }
        let _ = self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
            (b < MAX_RETRY_TOKENS).then(|| (b + add).min(MAX_RETRY_TOKENS))
        });
    }

    pub fn take_retry(&self) -> bool {
        self.budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(TOKEN)).is_ok()
    }
}

/// What ties a request to a backend, computed by the caller only for services that
/// hash or stick (the default is "nothing").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Affinity {
    /// The hashed `hash_on` key of a `balance = "hash"` service.
    pub key: Option<u64>,
    /// The backend token from a sticky cookie.
    pub pin: Option<u64>,
}

/// xorshift64*: enough randomness to draw two backends, with no allocation or syscall.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

/// Power of two choices: two distinct random backends, the one with the lower
/// `latency × (in_flight + 1) / weight` wins. A backend with no latency sample yet is
/// given the mean of those that have one, so it is neither avoided nor flooded.
fn p2c<'a>(peers: &[&'a Arc<Backend>], now: Instant, slow: Duration, rng: &mut u64) -> Option<&'a Arc<Backend>> {
    let n = peers.len();
    if n < 2 {
        return peers.first().copied();
    }
    let i = (next_random(rng) % n as u64) as usize;
    let mut j = (next_random(rng) % (n as u64 - 1)) as usize;
    if j >= i {
        j += 1;
    }
    let (a, b) = (peers[i], peers[j]);
    let (la, lb) = (a.latency_ns(now), b.latency_ns(now));
    let prior = || {
        let (sum, n) = peers.iter().filter_map(|p| p.latency_ns(now)).fold((0.0, 0u32), |(s, n), l| (s + l, n + 1));
        if n == 0 { 1.0 } else { sum / f64::from(n) }
    };
    let (la, lb) = match (la, lb) {
        (Some(x), Some(y)) => (x, y),
        (x, y) => {
            let p = prior();
            (x.unwrap_or(p), y.unwrap_or(p))
        }
    };
    let cost = |b: &Backend, l: f64| l * (b.in_flight() + 1) as f64 / b.effective_weight(now, slow) as f64;
    Some(if cost(b, lb) < cost(a, la) { b } else { a })
}

/// Weighted rendezvous hashing: each backend scores `weight / -ln(u)` with `u` uniform
/// in (0, 1) from hash(key, backend); the highest wins. Removing a backend moves only
/// the keys it won; raising a weight only pulls keys toward that backend.
fn rendezvous<'a>(peers: &[&'a Arc<Backend>], key: u64, now: Instant, slow: Duration) -> Option<&'a Arc<Backend>> {
    let score = |b: &Backend| {
        let h = crate::affinity::mix(key, b.token);
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        b.effective_weight(now, slow) as f64 / -u.ln()
    };
    peers.iter().copied().map(|b| (score(b), b)).max_by(|x, y| x.0.total_cmp(&y.0)).map(|(_, b)| b)
}

/// nginx's smooth weighted round robin: each pick adds every weight to its current
/// value, takes the largest and subtracts the total from it, which spreads a heavy
/// member's turns evenly instead of in bursts.
/// `shard`: whose running weights (the caller holds that shard's lock).
fn smooth_weighted<'a>(
    peers: &[&'a Arc<Backend>],
    shard: usize,
    now: Instant,
    slow: Duration,
) -> Option<&'a Arc<Backend>> {
    let mut total = 0i64;
    let mut best: Option<(&'a Arc<Backend>, i64)> = None;
    for p in peers {
        let w = p.effective_weight(now, slow) as i64;
        total += w;
        let cur = p.shards[shard].current_weight.load(Ordering::Relaxed) + w;
        p.shards[shard].current_weight.store(cur, Ordering::Relaxed);
        if best.is_none_or(|(_, b)| cur > b) {
            best = Some((p, cur));
        }
    }
    let (b, _) = best?;
    b.shards[shard].current_weight.fetch_sub(total, Ordering::Relaxed);
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(weights: &[u32]) -> Service {
        let cfg = ServiceConfig::for_tests();
        let bs = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend::new(format!("127.0.0.1:{}", 1000 + i).parse().unwrap(), *w, None, &cfg))
            .collect();
        Service::new("s".into(), cfg, bs, None)
    }

    #[test]
    fn smooth_weighted_round_robin_interleaves_like_nginx() {
        let s = svc(&[5, 1, 1]);
        let picks: Vec<u16> = (0..7).map(|_| s.pick(&HashSet::new()).unwrap().addr.port() - 1000).collect();
        // nginx's documented sequence for weights a=5 b=1 c=1: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn own_zone_is_preferred_until_none_of_it_is_left() {
        let s = svc(&[1, 1, 1]);
        s.backends[1].set_member(1, Some("a".into()));
        s.backends[2].set_member(1, Some("a".into()));
        let s = Service::new("s".into(), s.cfg.clone(), s.backends.clone(), Some("a".into()));
        let picks: HashSet<u16> = (0..6).map(|_| s.pick(&HashSet::new()).unwrap().addr.port()).collect();
        assert_eq!(picks, [1001, 1002].into());
        let tried: HashSet<_> = [s.backends[1].addr, s.backends[2].addr].into();
        assert_eq!(s.pick(&tried).unwrap().addr.port(), 1000, "falls back to another zone");
    }

    #[test]
    fn slow_start_gives_a_returning_backend_a_tenth_of_its_share_at_first() {
        let mut s = svc(&[1, 1]);
        s.cfg.slow_start_ms = 600_000;
        s.backends[1].health.lock().unwrap().healthy_since = Some(Instant::now());
        let mut counts = [0; 2];
        for _ in 0..110 {
            counts[(s.pick(&HashSet::new()).unwrap().addr.port() - 1000) as usize] += 1;
        }
        assert_eq!(counts, [100, 10]);
        s.backends[1].health.lock().unwrap().healthy_since = Some(Instant::now() - Duration::from_secs(600));
        let mut counts = [0; 2];
        for _ in 0..100 {
            counts[(s.pick(&HashSet::new()).unwrap().addr.port() - 1000) as usize] += 1;
        }
        assert_eq!(counts, [50, 50], "full weight once the ramp is over");
    }

    #[test]
    fn least_outstanding_prefers_the_least_loaded_per_weight() {
        let mut s = svc(&[1, 2, 1]);
        s.cfg.balance = Balance::LeastOutstanding;
        let _busy = [s.backends[0].start_request(), s.backends[1].start_request(), s.backends[2].start_request()];
        let _more = s.backends[0].start_request();
        // in flight per weight: 2/1, 1/2, 1/1 -> the weight-2 member.
        assert_eq!(s.pick(&HashSet::new()).unwrap().addr.port(), 1001);
        let tried: HashSet<_> = [s.backends[1].addr].into();
        assert_eq!(s.pick(&tried).unwrap().addr.port(), 1002);
    }

    fn port_of(b: &Backend) -> usize {
        usize::from(b.addr.port() - 1000)
    }

    fn keyed(key: u64) -> Affinity {
        Affinity { key: Some(key), pin: None }
    }

    #[test]
    fn hashing_keeps_keys_in_place_and_moves_only_a_leaving_backends_share() {
        let mut s = svc(&[1, 1, 1, 1, 1]);
        s.cfg.balance = Balance::Hash;
        let none = HashSet::new();
        let keys: Vec<u64> = (0..10_000u32).map(|k| crate::affinity::stable_hash(&k.to_be_bytes())).collect();
        let before: Vec<usize> = keys.iter().map(|k| port_of(&s.pick_for(&none, keyed(*k)).unwrap())).collect();
        let again: Vec<usize> = keys.iter().map(|k| port_of(&s.pick_for(&none, keyed(*k)).unwrap())).collect();
        assert_eq!(before, again, "the same key goes to the same backend");
        let mut share = [0usize; 5];
        for b in &before {
            share[*b] += 1;
        }
        assert!(share.iter().all(|n| (1700..=2300).contains(n)), "equal weights share evenly: {share:?}");

        s.backends[2].remove();
        let after: Vec<usize> = keys.iter().map(|k| port_of(&s.pick_for(&none, keyed(*k)).unwrap())).collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        assert_eq!(moved, share[2], "only the keys of the backend that left moved");
        assert!(after.iter().all(|b| *b != 2));
        // The moved keys spread over the remaining backends rather than piling onto one.
        let mut landed = [0usize; 5];
        for (b, a) in before.iter().zip(&after).filter(|(b, _)| **b == 2) {
            landed[*a] += 1;
            assert_ne!(b, a);
        }
        assert!(landed.iter().enumerate().all(|(i, n)| i == 2 || *n > share[2] / 8), "{landed:?}");
    }

    #[test]
    fn hashing_follows_weights_and_falls_back_to_round_robin_without_a_key() {
        let mut s = svc(&[3, 1]);
        s.cfg.balance = Balance::Hash;
        let none = HashSet::new();
        let mut share = [0usize; 2];
        for k in 0..8_000u32 {
            share[port_of(&s.pick_for(&none, keyed(crate::affinity::stable_hash(&k.to_be_bytes()))).unwrap())] += 1;
        }
        assert!((5700..=6300).contains(&share[0]), "weight 3 of 4 gets ~3/4 of the keys: {share:?}");
        let picks: Vec<usize> = (0..4).map(|_| port_of(&s.pick(&none).unwrap())).collect();
        assert_eq!(picks, vec![0, 0, 1, 0], "no key: smooth weighted round robin");
        let tried: HashSet<_> = [s.backends[0].addr].into();
        for k in 0..100u64 {
            assert_eq!(port_of(&s.pick_for(&tried, keyed(k)).unwrap()), 1, "a retry goes to the next-best backend");
        }
    }

    #[test]
    fn p2c_ewma_sends_most_requests_to_the_fast_backend() {
        let mut s = svc(&[1, 1, 1]);
        s.cfg.balance = Balance::P2cEwma;
        *s.rr[0].lock().unwrap() = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5 {
            s.backends[0].observe_latency(Duration::from_millis(50));
            s.backends[1].observe_latency(Duration::from_millis(5));
            s.backends[2].observe_latency(Duration::from_millis(50));
        }
        let none = HashSet::new();
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[port_of(&s.pick(&none).unwrap())] += 1;
        }
        // The fast one wins every pair it is drawn into: 2 of the 3 possible pairs.
        assert!((1900..=2100).contains(&counts[1]), "{counts:?}");
        // With enough of its requests in flight, the fast one costs more than a slow idle one.
        let _busy: Vec<_> = (0..20).map(|_| s.backends[1].start_request()).collect();
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[port_of(&s.pick(&none).unwrap())] += 1;
        }
        assert_eq!(counts[1], 0, "{counts:?}");
    }

    #[test]
    fn p2c_ewma_gives_a_new_backend_the_mean_latency_not_zero() {
        let mut s = svc(&[1, 1]);
        s.cfg.balance = Balance::P2cEwma;
        s.backends[0].observe_latency(Duration::from_millis(10));
        let none = HashSet::new();
        // The newcomer counts as the mean latency (here backend 0's), so in-flight requests decide.
        let _a = s.backends[0].start_request();
        assert_eq!(port_of(&s.pick(&none).unwrap()), 1);
        let _b = [s.backends[1].start_request(), s.backends[1].start_request()];
        assert_eq!(port_of(&s.pick(&none).unwrap()), 0, "the newcomer is not flooded");
    }

    #[test]
    fn ewma_takes_peaks_at_once_and_fades_between_samples() {
        let t0 = Instant::now();
        let mut e = Ewma::default();
        assert_eq!(e.value(t0), None);
        e.observe(Duration::from_millis(10), t0);
        e.observe(Duration::from_millis(100), t0 + Duration::from_millis(1));
        let v = e.value(t0 + Duration::from_millis(1)).unwrap();
        assert!((v - 100e6).abs() < 1.0, "a slower sample replaces the estimate: {v}");
        e.observe(Duration::from_millis(10), t0 + Duration::from_secs(10));
        let v = e.value(t0 + Duration::from_secs(10)).unwrap();
        let w = (-9.999f64 / 10.0).exp();
        let expect = 100e6 * w + 10e6 * (1.0 - w);
        assert!((v - expect).abs() < 1e3, "one decay period later a faster sample weighs 1-1/e: {v} vs {expect}");
        let later = e.value(t0 + Duration::from_secs(40)).unwrap();
        assert!(later < v / 10.0, "with no samples the estimate fades: {later}");
    }

    #[test]
    fn a_sticky_pin_wins_while_its_backend_is_available() {
        let mut s = svc(&[1, 1, 1]);
        s.cfg.balance = Balance::LeastOutstanding;
        let pin = Affinity { key: None, pin: Some(s.backends[2].token()) };
        let none = HashSet::new();
        let _busy = [s.backends[2].start_request(), s.backends[2].start_request()];
        for _ in 0..5 {
            assert_eq!(port_of(&s.pick_for(&none, pin).unwrap()), 2, "pinned, even when busier");
        }
        s.backends[2].health.lock().unwrap().active_ok = false;
        s.backends[2].active_ok.store(false, Ordering::SeqCst);
        assert_ne!(port_of(&s.pick_for(&none, pin).unwrap()), 2, "out of rotation: balanced as usual");
        let unknown = Affinity { key: None, pin: Some(12345) };
        assert_ne!(port_of(&s.pick_for(&none, unknown).unwrap()), 2);
    }

    #[test]
    fn ejection_doubles_and_is_capped() {
        let s = svc(&[1]);
        let b = &s.backends[0];
        for round in 0..4 {
            for _ in 0..5 {
                b.record_failure("connect refused");
            }
            let until = b.health.lock().unwrap().ejected_until.unwrap();
            let ms = (until - Instant::now()).as_millis() as u64;
            let expect = (10u64 << round).min(40);
            assert!(ms <= expect && ms + 5 >= expect, "round {round}: {ms} ms, expected {expect}");
            b.health.lock().unwrap().ejected_until = None;
        }
    }

    #[test]
    fn each_worker_keeps_its_own_smooth_round_robin() {
        let s = Arc::new(svc(&[5, 1, 1]));
        let on_worker = |i: usize| {
            let s = s.clone();
            std::thread::spawn(move || {
                crate::workers::pretend_worker(i);
                (0..7).map(|_| s.pick(&HashSet::new()).unwrap().addr.port() - 1000).collect::<Vec<u16>>()
            })
            .join()
            .unwrap()
        };
        // Worker 1's picks do not move worker 2's place in nginx's sequence.
        assert_eq!(on_worker(1), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(on_worker(2), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn in_flight_counts_every_workers_requests_and_ends_where_it_began() {
        let s = svc(&[1]);
        let b = s.backends[0].clone();
        let here = b.start_request();
        let b2 = b.clone();
        let there = std::thread::spawn(move || {
            crate::workers::pretend_worker(3);
            b2.start_request()
        })
        .join()
        .unwrap();
        assert_eq!(b.in_flight(), 2);
        // Worker 3's request finishes on another thread: its own shard goes back down.
        std::thread::spawn(move || drop(there)).join().unwrap();
        assert_eq!(b.in_flight(), 1);
        drop(here);
        assert_eq!(b.in_flight(), 0);
        assert!(b.shards.iter().all(|s| s.in_flight.load(Ordering::SeqCst) == 0));
    }

    #[test]
    fn a_backend_limit_holds_across_workers() {
        let mut cfg = ServiceConfig::for_tests();
        cfg.max_in_flight_per_backend = 1;
        let b = Backend::new("127.0.0.1:1000".parse().unwrap(), 1, None, &cfg);
        let s = Arc::new(Service::new("s".into(), cfg, vec![b], None));
        for _ in 0..300 {
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let racers: Vec<_> = (1..=2)
                .map(|i| {
                    let (s, barrier) = (s.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        crate::workers::pretend_worker(i);
                        barrier.wait();
                        s.acquire(&HashSet::new(), Affinity::default(), Instant::now()).ok()
                    })
                })
                .collect();
            let got: Vec<_> = racers.into_iter().filter_map(|t| t.join().unwrap()).collect();
            assert_eq!(got.len(), 1, "exactly one of two racing workers gets the only slot");
        }
    }

    #[test]
    fn retry_budget_is_a_share_of_requests() {
        let s = svc(&[1]);
        let mut granted = 0;
        for _ in 0..1000 {
            s.note_request();
        }
        while s.take_retry() {
            granted += 1;
        }
        assert_eq!(granted, 100, "capped at MAX_RETRY_TOKENS");
    }
}
