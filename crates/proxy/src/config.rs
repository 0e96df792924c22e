//! The proxy's config file: TOML, typed, validated once at load.
//!
//! Errors are [`ConfigError`]s, `file:line:col: field: message`, as everywhere in drover.
//! Parse errors come from [`drover_core::config::parse_toml`]; validation errors are
//! located by [`drover_core::config::locate_path`], which steps into the proxy's arrays
//! of tables (`[[listeners]]`, `[[routes]]`) and inline arrays (`backends = [...]`).
//!
//! Backend addresses are `IP:PORT`: the proxy never resolves names, so a DNS outage
//! cannot change the member set behind its back.
//!
//! ```toml
//! drain_timeout_secs = 30
//! zone = "a"                             # prefer backends with zone = "a" while any is in rotation
//! admin_listen = "127.0.0.1:9901"        # loopback only: GET /backends, GET /health
//!
//! [[listeners]]
//! name = "web"
//! bind = "0.0.0.0:8080"
//! protocol = "http"                      # HTTP/1.1 and h2c
//! request_head_timeout_secs = 60         # http/https: a request head must be complete this long
//!                                        # after accept (and TLS) or the previous response, else
//!                                        # the connection closes: idle keep-alive and slowloris
//!                                        # (HTTP/2: GOAWAY after this long with no request open)
//! accept_proxy_protocol = false          # any protocol (https: before TLS): each connection must
//!                                        # start with a PROXY v1 line or v2 header (read within 3 s,
//!                                        # at most 107 / 16+2048 bytes, else that connection is
//!                                        # closed; v1 UNKNOWN and v2 LOCAL keep the socket's address);
//!                                        # its client address is used for X-Forwarded-For,
//!                                        # `Forwarded`, hash_on = "client_ip", the access log and
//!                                        # the PROXY v1 line to backends
//!
//! [[listeners]]
//! name = "web-redirect"
//! bind = "0.0.0.0:8081"
//! protocol = "http"
//! redirect_https = true                  # http only: every request gets 308 to https://host/path?query
//!                                        # (no port: the default 443); no routes needed
//!
//! [[listeners]]
//! name = "web-tls"
//! bind = "0.0.0.0:8443"
//! protocol = "https"                     # TLS here, then as http; ALPN h2 + http/1.1
//! tls = [                                # chosen by SNI; the first is the default
//!   { cert = "certs/example.pem", key = "certs/example.key", server_names = ["example.com", "*.example.com"] },
//! ]
//!
//! [[listeners]]
//! name = "pg"
//! bind = "0.0.0.0:5433"
//! protocol = "tcp"
//! service = "db"
//! idle_timeout_secs = 3600               # tcp: close a connection idle both ways this long (default never)
//!
//! [[routes]]                             # first match in file order wins
//! listener = "web"
//! host = "*.example.com"                 # exact, `*.suffix`, or absent for any host
//! path_prefix = "/api"                   # default "/"
//! header = { name = "x-canary", value = "1" }   # optional
//! service = "api"
//! cache = { max_bytes = 67108864 }       # optional; overrides the service's `cache` (see below)
//!
//! [services.api]
//! balance = "round_robin"                # smooth weighted; "least_outstanding"; "p2c_ewma"; "hash"
//! backends = [{ address = "10.0.0.1:8000", weight = 2, zone = "a" }, { address = "10.0.0.2:8000" }]
//! passive_failures = 5                   # connect failures/resets/5xx in a row; 0 = off
//! eject_base_ms = 10000                  # doubles per repeat ejection
//! eject_max_ms = 300000
//! retries = 2
//! retry_budget_percent = 20
//! connect_timeout_ms = 1000
//! request_timeout_ms = 30000             # from the request's end to the response head
//! stall_timeout_ms = 60000               # then each body read or write may wait this long
//! max_in_flight_per_backend = 100       # 0 = no limit; beyond it requests queue...
//! queue_timeout_ms = 1000                # ...this long, then 503
//! slow_start_ms = 30000                  # weight ramps 10% -> 100% after (re-)entering rotation
//! sticky_cookie = { name = "drover_sticky", max_age_secs = 3600 }   # optional, any balance (below)
//! cache = { max_bytes = 67108864, max_object_bytes = 1048576, default_ttl_secs = 0 }   # optional
//!
//! [services.api.health]                  # new backends wait for `rise` passes
//! kind = "http"                          # or "tcp" (connect only)
//! path = "/healthz"
//! expect_status = "200-399"
//! interval_ms = 2000
//! timeout_ms = 1000
//! rise = 2
//! fall = 3
//!
//! [services.web]                        # members from the control plane (`drover proxy --server`)
//! members = { subscription = "web", port = 8080, checks = ["http"] }   # + zone_label/weight_label/port_label
//!
//! [services.db]
//! backends = [{ address = "10.0.0.5:5432" }]
//! send_proxy_protocol = true             # tcp only: PROXY v1 line before the client's bytes
//! close_on_leave = true                  # tcp only: a backend leaving rotation has its connections closed
//! balance = "hash"
//! hash_on = "client_ip"                  # tcp listeners can hash on the client address only
//!
//! [services.images]
//! backends = [{ address = "10.0.0.7:80" }, { address = "10.0.0.8:80" }]
//! balance = "hash"
//! hash_on = { header = "x-user" }        # or { cookie = "session" }, or "client_ip"
//! ```
//!
//! # Balancing
//!
//! - `round_robin`: nginx's smooth weighted round robin.
//! - `least_outstanding`: fewest requests in flight per unit of weight; ties round robin.
//! - `p2c_ewma`: power of two choices on latency (linkerd's and Finagle's peak EWMA):
//!   each backend keeps an exponentially weighted moving average of the time to the
//!   response head (for TCP, to connect), decaying over 10 s; a slower sample replaces
//!   it at once, and it fades toward zero while the backend gets no traffic, so a
//!   backend that was slow once is tried again. A request draws two distinct backends
//!   at random and takes the lower `ewma × (in_flight + 1) / weight`. A backend with no
//!   sample yet counts as the mean of the others, so a new one is not flooded. Failures
//!   (connect, reset, timeout, 5xx) count as a 1 s sample.
//! - `hash`: consistent hashing on `hash_on`, by weighted rendezvous hashing (highest
//!   random weight): every backend scores `weight / -ln(h(key, backend))` and the
//!   highest in rotation wins. The same key stays on the same backend; when a backend
//!   leaves, only its keys move (to their next-best), and when it returns they move
//!   back. Chosen over a ring because it needs no virtual nodes and no rebuild on
//!   membership changes; a request costs one hash per backend. The hash is stable
//!   (FNV-1a, then a 64-bit mixer), so several proxies agree. A request without the
//!   key (no such header or cookie) is balanced round robin. Slow start ramps the weight,
//!   so keys move onto a returning backend gradually.
//!
//! Before any of these: a valid `sticky_cookie` pin, then the zone preference (`zone`).
//! Services of tcp listeners take neither `sticky_cookie`, `cache` nor a header or
//! cookie `hash_on` (refused at load).
//!
//! # Sticky sessions
//!
//! With `sticky_cookie` (name defaults to `drover_sticky`; without `max_age_secs` it is
//! a session cookie), a request whose cookie names a backend in rotation (and below its
//! in-flight limit) goes there, even across zones. Otherwise the service balances as
//! usual and the response gets `Set-Cookie: NAME=TOKEN; Path=/; HttpOnly; SameSite=Lax`
//! (`; Secure` over https). TOKEN is 16 hex digits of a stable hash of the backend's
//! address: opaque to the client, the same on every proxy, never the address itself.
//!
//! # Response cache
//!
//! `cache` on a route or a service (the route's wins) keeps responses in memory, at most
//! `max_bytes` in all (least recently used go first) and `max_object_bytes` (default
//! 1 MiB, or `max_bytes` if smaller) per response, keyed by host (without port) and path
//! with query. A cache survives reloads and member changes; one whose settings change
//! starts empty. The rules are those of a shared cache (RFC 9111):
//!
//! - Only GET responses are stored; GET and HEAD are answered from them.
//! - Status 200, 203, 204, 300, 301, 308, 404, 405, 410, 414 or 501 only.
//! - Freshness from `s-maxage`, else `max-age`, else `Expires` − `Date`, else
//!   `default_ttl_secs` (0: nothing without explicit freshness is stored), minus `Age`.
//! - Not stored: `Cache-Control: no-store`, `private` or `no-cache` (no revalidation or
//!   304 is done: a stale entry is simply fetched again), `Vary: *`, a `Set-Cookie`, a request with `no-store`, and a request with
//!   `Authorization` unless the response says `public`, `s-maxage` or `must-revalidate`.
//! - Not answered from the cache: requests with `Authorization`, with
//!   `Cache-Control: no-cache`/`max-age=0` or `Pragma: no-cache` (their response may
//!   still be stored), and WebSocket upgrades.
//! - `Vary`: a stored response answers only requests with the same values of the
//!   headers it names.
//! - A successful POST, PUT, DELETE or PATCH forgets what was stored for its URL.
//! - Answers to GET and HEAD carry `x-cache: HIT` (with `Age`) or `x-cache: MISS`.

use drover_core::config::{ConfigError, locate_path, parse_toml};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

fn d_drain() -> u64 {
    30
}
fn d_weight() -> u32 {
    1
}
fn d_passive_failures() -> u32 {
    5
}
fn d_eject_base_ms() -> u64 {
    10_000
}
fn d_eject_max_ms() -> u64 {
    300_000
}
fn d_retries() -> u32 {
    2
}
fn d_budget() -> u32 {
    20
}
fn d_connect_timeout_ms() -> u64 {
    1_000
}
fn d_request_timeout_ms() -> u64 {
    30_000
}
/// `stall_timeout_ms` when absent.
pub const DEFAULT_STALL_TIMEOUT_MS: u64 = 60_000;
fn d_stall_timeout_ms() -> u64 {
    DEFAULT_STALL_TIMEOUT_MS
}
fn d_queue_timeout_ms() -> u64 {
    1_000
}
fn d_path() -> String {
    "/".into()
}
fn d_expect() -> String {
    "200-399".into()
}
fn d_interval_ms() -> u64 {
    2_000
}
fn d_timeout_ms() -> u64 {
    1_000
}
fn d_rise() -> u32 {
    2
}
fn d_fall() -> u32 {
    3
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// How long SIGTERM waits for in-flight requests and connections.
    #[serde(default = "d_drain")]
    pub drain_timeout_secs: u64,
    /// Loopback address of the JSON admin endpoint (`/backends`, `/health`).
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    /// This proxy's zone: backends with the same `zone` get all the traffic while any
    /// of them is in rotation; the others take over only when none is.
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    /// HTTP over TLS terminated here (ALPN `h2` and `http/1.1`); needs `tls`.
    Https,
    Tcp,
}

/// One certificate of an https listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertConfig {
    /// PEM chain, leaf first; relative paths are from the config file's directory.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// SNI names this certificate answers (exact or `*.suffix`); the listener's first
    /// certificate also answers clients that send no or an unknown name.
    #[serde(default)]
    pub server_names: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: Protocol,
    /// TCP listeners only: where connections go. HTTP listeners use `[[routes]]`.
    #[serde(default)]
    pub service: Option<String>,
    /// https listeners only: certificates, chosen by SNI.
    #[serde(default)]
    pub tls: Vec<TlsCertConfig>,
    /// Every connection starts with a PROXY protocol v1 or v2 header (from a load
    /// balancer in front) whose client address replaces the socket's.
    #[serde(default)]
    pub accept_proxy_protocol: bool,
    /// http listeners only: answer every request with 308 to the same URL over https.
    #[serde(default)]
    pub redirect_https: bool,
    /// http and https listeners: the longest a client may take to send a complete
    /// request head, counted from accept (after any PROXY header and TLS handshake) or
    /// from the end of the previous response; the connection is closed then. It bounds
    /// both an idle keep-alive connection and a head trickled in (slowloris). Default 60
    /// (nginx's `client_header_timeout`); 0 = never. An HTTP/2 connection (h2 over TLS,
    /// h2c), whose requests are multiplexed, gets GOAWAY once no request has been open on
    /// it for this long; streams under way finish.
    #[serde(default)]
    pub request_head_timeout_secs: Option<u64>,
    /// tcp listeners: a connection that passes no byte either way for this long is
    /// closed on both sides. Default 0 = never (database pools keep idle connections
    /// open for long).
    #[serde(default)]
    pub idle_timeout_secs: Option<u64>,
}

/// `request_head_timeout_secs` when absent.
pub const DEFAULT_REQUEST_HEAD_TIMEOUT_SECS: u64 = 60;

impl ListenerConfig {
    /// How long a request head may take on this http/https listener (`None`: no limit,
    /// or a tcp listener).
    pub fn request_head_timeout(&self) -> Option<std::time::Duration> {
        let secs = match self.protocol {
            Protocol::Tcp => 0,
            _ => self.request_head_timeout_secs.unwrap_or(DEFAULT_REQUEST_HEAD_TIMEOUT_SECS),
        };
        (secs > 0).then(|| std::time::Duration::from_secs(secs))
    }

    /// How long a connection of this tcp listener may pass nothing (`None`: no limit,
    /// or an http/https listener).
    pub fn idle_timeout(&self) -> Option<std::time::Duration> {
        let secs = if self.protocol == Protocol::Tcp { self.idle_timeout_secs.unwrap_or(0) } else { 0 };
        (secs > 0).then(|| std::time::Duration::from_secs(secs))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub listener: String,
    /// Exact host, or `*.suffix` for any subdomain of `suffix`; absent matches any host.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "d_path")]
    pub path_prefix: String,
    #[serde(default)]
    pub header: Option<HeaderMatch>,
    pub service: String,
    /// A response cache for this route only (instead of the service's).
    #[serde(default)]
    pub cache: Option<CacheConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin (nginx's algorithm).
    #[default]
    RoundRobin,
    /// Fewest in-flight requests per unit of weight; ties go round robin.
    LeastOutstanding,
    /// Power of two choices on peak-EWMA latency × (in flight + 1) / weight.
    P2cEwma,
    /// Weighted rendezvous hashing on `hash_on`; round robin for requests without the key.
    Hash,
}

/// What `balance = "hash"` hashes: `"client_ip"`, `{ header = "x-user" }` or
/// `{ cookie = "session" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    ClientIp,
    Header(String),
    Cookie(String),
}

fn d_sticky_name() -> String {
    "drover_sticky".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickyCookieConfig {
    #[serde(default = "d_sticky_name")]
    pub name: String,
    /// Absent: a session cookie.
    #[serde(default)]
    pub max_age_secs: Option<u64>,
}

fn d_cache_max_bytes() -> u64 {
    64 << 20
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// All stored responses together (bodies, headers and keys).
    #[serde(default = "d_cache_max_bytes")]
    pub max_bytes: u64,
    /// A larger response is passed through and not stored; default 1 MiB (or
    /// `max_bytes` if smaller).
    #[serde(default)]
    pub max_object_bytes: Option<u64>,
    /// Freshness for cacheable responses that state none; 0 stores only those that do.
    #[serde(default)]
    pub default_ttl_secs: u64,
}

impl CacheConfig {
    /// The largest response stored.
    pub fn object_limit(&self) -> u64 {
        self.max_object_bytes.unwrap_or(1 << 20).min(self.max_bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Static members. A service needs these, `members`, or both.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Members from the control plane (with `drover proxy --server`): the entities of a
    /// subscription, at their registered address and this port. They are in rotation
    /// only while the control plane says healthy (keepalive passing, plus `checks`),
    /// and also pass the active checks when the service has them.
    #[serde(default)]
    pub members: Option<MembersConfig>,
    #[serde(default)]
    pub balance: Balance,
    /// The key of `balance = "hash"` (required with it, refused without it).
    #[serde(default)]
    pub hash_on: Option<HashOn>,
    /// Pin each client to a backend with a cookie (HTTP only; works with any `balance`).
    #[serde(default)]
    pub sticky_cookie: Option<StickyCookieConfig>,
    /// Cache responses of this service (HTTP only).
    #[serde(default)]
    pub cache: Option<CacheConfig>,
    /// Active checks; without them backends are in rotation from the start and only
    /// passive ejection takes them out.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Consecutive connect failures, resets or 5xx before ejection; 0 disables.
    #[serde(default = "d_passive_failures")]
    pub passive_failures: u32,
    /// First ejection length; doubles per repeat ejection up to `eject_max_ms`.
    #[serde(default = "d_eject_base_ms")]
    pub eject_base_ms: u64,
    #[serde(default = "d_eject_max_ms")]
    pub eject_max_ms: u64,
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// Retries may add at most this percentage of recent requests.
    #[serde(default = "d_budget")]
    pub retry_budget_percent: u32,
    #[serde(default = "d_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// From the end of the request (its body included: an upload's pace is the
    /// client's, bounded by `stall_timeout_ms`) to the response head.
    #[serde(default = "d_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// HTTP: while a request body is read or a response relayed, the longest one read
    /// from or write to a peer may wait (the client to send or take the next part, the
    /// backend to send it); then both connections close and the client's response is
    /// cut short (a stalled upload gets 408). Default
    /// 60000 (nginx's `proxy_read_timeout`, `send_timeout` and `client_body_timeout`);
    /// 0 = never. On hyper's path (TLS, HTTP/2, uploads over 64 KiB) it bounds the waits
    /// for the backend's response body and a streamed request body, and each write to
    /// the client's socket (the last answering service's limit) and, on HTTP/2, the
    /// client's taking of each response frame (up to 64 KiB), which is how a client that
    /// withholds flow-control credit shows: one stream cannot be reset from outside
    /// hyper, so the connection gets GOAWAY, its other streams this long again to
    /// finish, and is then closed.
    #[serde(default = "d_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
    /// After a backend (re-)enters rotation its weight ramps from 10% to 100% over
    /// this long, so a cold cache or JIT is not hit with a full share at once; 0 = off.
    #[serde(default)]
    pub slow_start_ms: u64,
    /// Requests (or TCP connections) one backend may have at once; 0 = no limit. When
    /// every backend is full, requests queue for up to `queue_timeout_ms`, then get 503.
    #[serde(default)]
    pub max_in_flight_per_backend: u32,
    #[serde(default = "d_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// TCP listeners: start each backend connection with a PROXY protocol v1 line so
    /// the backend (PostgreSQL behind pgbouncer, HAProxy, nginx) sees the client address.
    #[serde(default)]
    pub send_proxy_protocol: bool,
    /// TCP listeners: when a backend leaves rotation (control-plane verdict, failed
    /// active check, ejection, removal) its open connections are closed at once instead
    /// of running on. For a database write endpoint: no client keeps writing to a
    /// fenced primary.
    #[serde(default)]
    pub close_on_leave: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersConfig {
    pub subscription: String,
    pub port: u16,
    /// Checks that must also be passing on the member (a missing result is not passing).
    #[serde(default)]
    pub checks: Vec<String>,
    /// Entity label holding the member's zone (for the proxy's `zone` preference).
    #[serde(default = "d_zone_label")]
    pub zone_label: String,
    /// Entity label holding the member's weight (1-1000; absent or invalid = 1).
    #[serde(default = "d_weight_label")]
    pub weight_label: String,
    /// Entity label that overrides `port` for one member (several members on one host).
    #[serde(default = "d_port_label")]
    pub port_label: String,
}

fn d_port_label() -> String {
    "port".into()
}

fn d_zone_label() -> String {
    "zone".into()
}
fn d_weight_label() -> String {
    "weight".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: SocketAddr,
    #[serde(default = "d_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    Http,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub kind: HealthKind,
    #[serde(default = "d_path")]
    pub path: String,
    /// `200`, or an inclusive range `200-399`.
    #[serde(default = "d_expect")]
    pub expect_status: String,
    #[serde(default = "d_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "d_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive passes to enter rotation (also for a brand-new backend).
    #[serde(default = "d_rise")]
    pub rise: u32,
    /// Consecutive failures to leave rotation.
    #[serde(default = "d_fall")]
    pub fall: u32,
}

impl ServiceConfig {
    /// `stall_timeout_ms` (`None`: never).
    pub fn stall_timeout(&self) -> Option<std::time::Duration> {
        (self.stall_timeout_ms > 0).then(|| std::time::Duration::from_millis(self.stall_timeout_ms))
    }

    /// A service for unit tests: no backends, no active checks, short timeouts and
    /// ejections.
    #[cfg(test)]
    pub(crate) fn for_tests() -> ServiceConfig {
        let mut c: ServiceConfig = parse_toml(Path::new("test"), "backends = []").expect("the defaults parse");
        (c.eject_base_ms, c.eject_max_ms) = (10, 40);
        (c.connect_timeout_ms, c.request_timeout_ms, c.queue_timeout_ms) = (100, 100, 0);
        c
    }
}

impl HealthConfig {
    /// The inclusive status range; valid after [`ProxyConfig::parse`].
    pub fn expect_range(&self) -> (u16, u16) {
        parse_status_range(&self.expect_status).unwrap_or((200, 399))
    }
}

fn parse_status_range(s: &str) -> Option<(u16, u16)> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = s.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&lo) && (100..=599).contains(&hi) && lo <= hi).then_some((lo, hi))
}

/// A validation failure before it is located: the path of keys and array indices.
struct Invalid(Vec<String>, String);

fn bad(path: &[&str], msg: impl Into<String>) -> Invalid {
    Invalid(path.iter().map(|s| s.to_string()).collect(), msg.into())
}

impl ProxyConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<ProxyConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text`; `file` only names the source in errors.
    pub fn parse(file: &Path, text: &str) -> Result<ProxyConfig, ConfigError> {
        let mut cfg: ProxyConfig = parse_toml(file, text)?;
        let base = file.parent().unwrap_or(Path::new(""));
        for t in cfg.listeners.iter_mut().flat_map(|l| l.tls.iter_mut()) {
            t.cert = base.join(&t.cert);
            t.key = base.join(&t.key);
        }
        cfg.validate().map_err(|Invalid(path, message)| locate_path(file, text, &path, message))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), Invalid> {
        if self.listeners.is_empty() {
            return Err(bad(&["listeners"], "at least one [[listeners]] is needed"));
        }
        if self.drain_timeout_secs == 0 {
            return Err(bad(&["drain_timeout_secs"], "must be at least 1"));
        }
        if let Some(a) = self.admin_listen
            && !a.ip().is_loopback()
        {
            return Err(bad(
                &["admin_listen"],
                format!("{a} is not a loopback address (the admin endpoint has no auth)"),
            ));
        }
        let mut names = BTreeSet::new();
        let mut binds = BTreeSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let i = i.to_string();
            if l.name.is_empty() || !names.insert(l.name.as_str()) {
                return Err(bad(&["listeners", &i, "name"], format!("`{}` is empty or already used", l.name)));
            }
            if !binds.insert(l.bind) {
                return Err(bad(&["listeners", &i, "bind"], format!("{} is bound by another listener", l.bind)));
            }
            match (l.protocol, &l.service) {
                (Protocol::Tcp, None) => {
                    return Err(bad(&["listeners", &i, "service"], "a tcp listener needs a service"));
                }
                (Protocol::Tcp, Some(s)) if !self.services.contains_key(s) => {
                    return Err(bad(&["listeners", &i, "service"], format!("unknown service `{s}`")));
                }
                (Protocol::Http | Protocol::Https, Some(_)) => {
                    return Err(bad(
                        &["listeners", &i, "service"],
                        "only tcp listeners name a service; use [[routes]]",
                    ));
                }
                _ => {}
            }
            match (l.protocol, l.tls.is_empty()) {
                (Protocol::Https, true) => {
                    return Err(bad(&["listeners", &i, "protocol"], "an https listener needs `tls` certificates"));
                }
                (Protocol::Http | Protocol::Tcp, false) => {
                    return Err(bad(&["listeners", &i, "tls"], "only https listeners take certificates"));
                }
                _ => {}
            }
            if l.redirect_https && l.protocol != Protocol::Http {
                return Err(bad(&["listeners", &i, "redirect_https"], "only http listeners redirect to https"));
            }
            if l.request_head_timeout_secs.is_some() && l.protocol == Protocol::Tcp {
                return Err(bad(
                    &["listeners", &i, "request_head_timeout_secs"],
                    "only http and https listeners read request heads (tcp listeners take `idle_timeout_secs`)",
                ));
            }
            if l.idle_timeout_secs.is_some() && l.protocol != Protocol::Tcp {
                return Err(bad(
                    &["listeners", &i, "idle_timeout_secs"],
                    "only tcp listeners take it (http and https listeners take `request_head_timeout_secs`)",
                ));
            }
            if l.protocol == Protocol::Tcp
                && let Some(s) = l.service.as_ref().and_then(|s| self.services.get(s))
            {
                let name = l.service.as_deref().unwrap_or_default();
                let http_only = if s.sticky_cookie.is_some() {
                    Some("sticky_cookie")
                } else if s.cache.is_some() {
                    Some("cache")
                } else if matches!(s.hash_on, Some(HashOn::Header(_) | HashOn::Cookie(_))) {
                    Some("hash_on")
                } else {
                    None
                };
                if let Some(f) = http_only {
                    return Err(bad(
                        &["services", name, f],
                        format!("service `{name}` serves tcp listener `{}`, which has no HTTP to do this with", l.name),
                    ));
                }
            }
            for (ti, t) in l.tls.iter().enumerate() {
                let ti = ti.to_string();
                if let Err((field, msg)) = crate::tls::load_cert(t) {
                    return Err(bad(&["listeners", &i, "tls", &ti, field], msg));
                }
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            let i = i.to_string();
            match self.listeners.iter().find(|l| l.name == r.listener) {
                None => return Err(bad(&["routes", &i, "listener"], format!("unknown listener `{}`", r.listener))),
                Some(l) if l.protocol == Protocol::Tcp => {
                    return Err(bad(&["routes", &i, "listener"], format!("`{}` is not an http listener", r.listener)));
                }
                _ => {}
            }
            if !self.services.contains_key(&r.service) {
                return Err(bad(&["routes", &i, "service"], format!("unknown service `{}`", r.service)));
            }
            if let Some(h) = &r.host {
                let rest = h.strip_prefix("*.").unwrap_or(h);
                if rest.is_empty() || rest.contains('*') || rest.contains('/') || rest.contains(':') {
                    return Err(bad(&["routes", &i, "host"], format!("`{h}` is not a host name or `*.suffix`")));
                }
            }
            if !r.path_prefix.starts_with('/') {
                return Err(bad(&["routes", &i, "path_prefix"], "must start with `/`"));
            }
            if let Some(hm) = &r.header
                && http::HeaderName::from_bytes(hm.name.as_bytes()).is_err()
            {
                return Err(bad(&["routes", &i, "header", "name"], format!("`{}` is not a header name", hm.name)));
            }
            if let Some(c) = &r.cache
                && let Err((f, m)) = check_cache(c)
            {
                return Err(bad(&["routes", &i, "cache", f], m));
            }
        }
        for (name, s) in &self.services {
            let at = |f: &str| vec!["services".to_string(), name.clone(), f.to_string()];
            let fail = |f: &str, m: String| Err(Invalid(at(f), m));
            if s.backends.is_empty() && s.members.is_none() {
                return fail("backends", "at least one backend (or a `members` source) is needed".into());
            }
            if let Some(m) = &s.members {
                let at = |f: &str| vec!["services".to_string(), name.clone(), "members".into(), f.to_string()];
                if m.subscription.is_empty() {
                    return Err(Invalid(at("subscription"), "must not be empty".into()));
                }
                if m.port == 0 {
                    return Err(Invalid(at("port"), "must be 1-65535".into()));
                }
            }
            let mut seen = BTreeSet::new();
            for (bi, b) in s.backends.iter().enumerate() {
                let at = |f: &str| vec!["services".into(), name.clone(), "backends".into(), bi.to_string(), f.into()];
                if !seen.insert(b.address) {
                    return Err(Invalid(at("address"), format!("{} is listed twice", b.address)));
                }
                if !(1..=1000).contains(&b.weight) {
                    return Err(Invalid(at("weight"), "must be 1 to 1000".into()));
                }
            }
            match (&s.balance, &s.hash_on) {
                (Balance::Hash, None) => {
                    return fail("balance", "balance = \"hash\" needs `hash_on`".into());
                }
                (Balance::Hash, Some(_)) | (_, None) => {}
                (_, Some(_)) => return fail("hash_on", "only used with balance = \"hash\"".into()),
            }
            match &s.hash_on {
                Some(HashOn::Header(h)) if http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
                    return fail("hash_on", format!("`{h}` is not a header name"));
                }
                Some(HashOn::Cookie(c)) if !is_cookie_name(c) => {
                    return fail("hash_on", format!("`{c}` is not a cookie name"));
                }
                _ => {}
            }
            if let Some(sc) = &s.sticky_cookie
                && !is_cookie_name(&sc.name)
            {
                let at = vec!["services".to_string(), name.clone(), "sticky_cookie".into(), "name".into()];
                return Err(Invalid(at, format!("`{}` is not a cookie name", sc.name)));
            }
            if let Some(c) = &s.cache
                && let Err((f, m)) = check_cache(c)
            {
                return Err(Invalid(vec!["services".into(), name.clone(), "cache".into(), f.into()], m));
            }
            if s.retry_budget_percent > 100 {
                return fail("retry_budget_percent", "must be 0 to 100".into());
            }
            if s.connect_timeout_ms == 0 {
                return fail("connect_timeout_ms", "must be at least 1".into());
            }
            if s.request_timeout_ms == 0 {
                return fail("request_timeout_ms", "must be at least 1".into());
            }
            if s.eject_base_ms == 0 || s.eject_max_ms < s.eject_base_ms {
                return fail("eject_base_ms", "must be at least 1 and not above eject_max_ms".into());
            }
            if let Some(h) = &s.health {
                let at = |f: &str| vec!["services".to_string(), name.clone(), "health".into(), f.to_string()];
                let fail = |f: &str, m: &str| Err(Invalid(at(f), m.to_string()));
                if h.interval_ms < 10 {
                    return fail("interval_ms", "must be at least 10");
                }
                if h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
                    return fail("timeout_ms", "must be at least 1 and not above interval_ms");
                }
                if h.rise == 0 {
                    return fail("rise", "must be at least 1");
                }
                if h.fall == 0 {
                    return fail("fall", "must be at least 1");
                }
                if !h.path.starts_with('/') {
                    return fail("path", "must start with `/`");
                }
                if parse_status_range(&h.expect_status).is_none() {
                    return fail("expect_status", "must be a status (`200`) or a range (`200-399`) within 100-599");
                }
            }
        }
        Ok(())
    }
}

/// A cookie name is an RFC 6265 token: visible ASCII without separators.
fn is_cookie_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

fn check_cache(c: &CacheConfig) -> Result<(), (&'static str, String)> {
    if c.max_bytes == 0 {
        return Err(("max_bytes", "must be at least 1".into()));
    }
    if c.max_object_bytes.is_some_and(|m| m == 0 || m > c.max_bytes) {
        return Err(("max_object_bytes", "must be at least 1 and not above max_bytes".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"[[listeners]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"

[[listeners]]
name = "pg"
bind = "127.0.0.1:5433"
protocol = "tcp"
service = "db"

[[routes]]
listener = "web"
host = "*.example.com"
path_prefix = "/api"
service = "app"

[services.app]
balance = "least_outstanding"
backends = [
  { address = "10.0.0.1:80", weight = 3, zone = "a" },
  { address = "10.0.0.2:80" },
]

[services.app.health]
kind = "http"
path = "/healthz"

[services.db]
backends = [{ address = "10.0.0.3:5432" }]
"#;

    fn err(text: &str) -> String {
        ProxyConfig::parse(Path::new("p.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = ProxyConfig::parse(Path::new("p.toml"), BASE).unwrap();
        let app = &c.services["app"];
        assert_eq!(app.balance, Balance::LeastOutstanding);
        assert_eq!((app.retries, app.retry_budget_percent, app.passive_failures), (2, 20, 5));
        let h = app.health.as_ref().unwrap();
        assert_eq!((h.rise, h.fall, h.expect_range()), (2, 3, (200, 399)));
        assert_eq!(app.backends[1].weight, 1);
        assert_eq!(c.drain_timeout_secs, 30);
    }

    #[test]
    fn errors_inside_arrays_name_the_element_line() {
        let e = err(&BASE.replace("{ address = \"10.0.0.2:80\" }", "{ address = \"10.0.0.1:80\" }"));
        assert_eq!(e, "p.toml:22:5: services.app.backends.1.address: 10.0.0.1:80 is listed twice");
        let e = err(&BASE.replace("weight = 3", "weight = 0"));
        assert!(e.starts_with("p.toml:21:30: services.app.backends.0.weight: "), "{e}");
        let e = err(&BASE.replace("service = \"db\"", "service = \"nope\""));
        assert_eq!(e, "p.toml:10:1: listeners.1.service: unknown service `nope`");
        let e = err(&BASE.replace("path_prefix = \"/api\"", "path_prefix = \"api\""));
        assert_eq!(e, "p.toml:15:1: routes.0.path_prefix: must start with `/`");
    }

    #[test]
    fn balancing_stickiness_cache_and_listener_options_parse() {
        let text = BASE
            .replace(
                "balance = \"least_outstanding\"",
                "balance = \"hash\"\nhash_on = { cookie = \"session\" }\nsticky_cookie = {}\ncache = { max_bytes = 4096 }",
            )
            .replace("backends = [{ address = \"10.0.0.3:5432\" }]", "backends = [{ address = \"10.0.0.3:5432\" }]\nbalance = \"hash\"\nhash_on = \"client_ip\"")
            .replace("protocol = \"tcp\"", "protocol = \"tcp\"\naccept_proxy_protocol = true")
            .replace("protocol = \"http\"", "protocol = \"http\"\nredirect_https = true");
        let c = ProxyConfig::parse(Path::new("p.toml"), &text).unwrap();
        let app = &c.services["app"];
        assert_eq!((app.balance, app.hash_on.clone()), (Balance::Hash, Some(HashOn::Cookie("session".into()))));
        assert_eq!(app.sticky_cookie, Some(StickyCookieConfig { name: "drover_sticky".into(), max_age_secs: None }));
        let cache = app.cache.clone().unwrap();
        assert_eq!((cache.max_bytes, cache.object_limit(), cache.default_ttl_secs), (4096, 4096, 0));
        assert_eq!(c.services["db"].hash_on, Some(HashOn::ClientIp));
        assert!(c.listeners[1].accept_proxy_protocol && c.listeners[0].redirect_https);
        // Timeouts: http listeners wait 60 s for a request head unless told, tcp ones never time out unless told.
        let defaults = ProxyConfig::parse(Path::new("p.toml"), BASE).unwrap();
        assert_eq!(defaults.listeners[0].request_head_timeout(), Some(std::time::Duration::from_secs(60)));
        assert_eq!((defaults.listeners[1].request_head_timeout(), defaults.listeners[1].idle_timeout()), (None, None));
        let set = BASE
            .replace("protocol = \"http\"", "protocol = \"http\"\nrequest_head_timeout_secs = 0")
            .replace("protocol = \"tcp\"", "protocol = \"tcp\"\nidle_timeout_secs = 600");
        let set = ProxyConfig::parse(Path::new("p.toml"), &set).unwrap();
        assert_eq!(set.listeners[0].request_head_timeout(), None, "0 = never");
        assert_eq!(set.listeners[1].idle_timeout(), Some(std::time::Duration::from_secs(600)));
        let p2c = BASE.replace("least_outstanding", "p2c_ewma");
        assert_eq!(ProxyConfig::parse(Path::new("p.toml"), &p2c).unwrap().services["app"].balance, Balance::P2cEwma);
    }

    #[test]
    fn inconsistent_balancing_cache_and_listener_options_are_refused() {
        let app = |extra: &str| BASE.replace("balance = \"least_outstanding\"", extra);
        let db = |extra: &str| {
            BASE.replace(
                "backends = [{ address = \"10.0.0.3:5432\" }]",
                &format!("backends = [{{ address = \"10.0.0.3:5432\" }}]\n{extra}"),
            )
        };
        let cases = [
            (app("balance = \"hash\""), "services.app.balance: balance = \"hash\" needs `hash_on`"),
            (app("hash_on = \"client_ip\""), "services.app.hash_on: only used with balance = \"hash\""),
            (
                app("balance = \"hash\"\nhash_on = { header = \"x user\" }"),
                "services.app.hash_on: `x user` is not a header name",
            ),
            (app("sticky_cookie = { name = \"a;b\" }"), "services.app.sticky_cookie.name: `a;b` is not a cookie name"),
            (
                app("cache = { max_bytes = 10, max_object_bytes = 11 }"),
                "services.app.cache.max_object_bytes: must be at least 1 and not above max_bytes",
            ),
            (db("sticky_cookie = {}"), "services.db.sticky_cookie: service `db` serves tcp listener `pg`"),
            (
                db("balance = \"hash\"\nhash_on = { header = \"x-user\" }"),
                "services.db.hash_on: service `db` serves tcp listener `pg`",
            ),
            (
                BASE.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nredirect_https = true"),
                "listeners.1.redirect_https: only http listeners redirect to https",
            ),
            (
                BASE.replace("protocol = \"tcp\"", "protocol = \"tcp\"\nrequest_head_timeout_secs = 5"),
                "listeners.1.request_head_timeout_secs: only http and https listeners read request heads",
            ),
            (
                BASE.replace("protocol = \"http\"", "protocol = \"http\"\nidle_timeout_secs = 5"),
                "listeners.0.idle_timeout_secs: only tcp listeners take it",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "{e}\n  wanted: {want}");
        }
    }

    #[test]
    fn bad_values_are_located() {
        let e = err(&BASE.replace("path = \"/healthz\"", "path = \"/healthz\"\nexpect_status = \"500-200\""));
        assert_eq!(
            e,
            "p.toml:28:1: services.app.health.expect_status: must be a status (`200`) or a range (`200-399`) within 100-599"
        );
        let e = err(&format!("admin_listen = \"0.0.0.0:9000\"\n{BASE}"));
        assert!(e.starts_with("p.toml:1:1: admin_listen: 0.0.0.0:9000 is not a loopback address"), "{e}");
        let e = err(&BASE.replace("protocol = \"http\"", "protocol = \"http\"\nretries = 1"));
        assert!(e.starts_with("p.toml:5:1: ") && e.contains("unknown field `retries`"), "{e}");
        let e = err(&BASE.replace("host = \"*.example.com\"", "host = \"a.*.com\""));
        assert!(e.starts_with("p.toml:14:1: routes.0.host: "), "{e}");
    }
}
