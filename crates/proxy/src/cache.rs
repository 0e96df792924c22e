//! The optional in-memory response cache (a shared cache in RFC 9111's terms; the rules
//! are in the config reference, `cache` in [`crate::config`]).
//!
//! A small LRU by hand rather than `moka` or `lru`: entries vary in size (the cap is
//! in bytes, not entries), a key holds several `Vary` variants, and one mutex around a
//! hash map plus an ordered index is all the concurrency this needs, since the lock is
//! held only to look up or link an entry (bodies are `Bytes`, shared, not copied).
//!
//! Caches outlive config generations (the [`Registry`] in `Shared` keeps them by route
//! or service), so a reload or a member change does not empty them; one whose settings
//! changed starts empty, and one whose route or service no longer caches is dropped.

use crate::config::{CacheConfig, ProxyConfig, RouteConfig};
use crate::{Body, Snapshot};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Frame, SizeHint};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

/// Variants (by `Vary`) kept per URL; the oldest goes first.
const MAX_VARIANTS: usize = 8;
/// Bookkeeping charged per entry and per header on top of the bytes themselves.
const ENTRY_OVERHEAD: u64 = 128;
const HEADER_OVERHEAD: u64 = 32;

/// Which cache a request uses: its route's, or its service's.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    Route(u64),
    Service(&'a str),
}

/// A route's identity for its cache: everything that decides what it matches, so
/// reordering routes keeps each cache with its route.
pub(crate) fn route_scope(r: &RouteConfig) -> u64 {
    let h = r.header.as_ref().map(|h| format!("{}={}", h.name, h.value)).unwrap_or_default();
    let id = format!("{}\n{}\n{}\n{h}\n{}", r.listener, r.host.as_deref().unwrap_or("*"), r.path_prefix, r.service);
    crate::affinity::stable_hash(id.as_bytes())
}

/// The caches of every route and service that has one, across config generations.
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    routes: HashMap<u64, Arc<Cache>>,
    services: HashMap<String, Arc<Cache>>,
    /// The snapshot last swept against (by address): a new one may have dropped caches.
    swept: usize,
}

impl Registry {
    /// The cache for `scope` under `cfg`, made (or remade, when its settings changed) here.
    pub(crate) fn get(&self, snap: &Snapshot, scope: Scope<'_>, cfg: &CacheConfig) -> Arc<Cache> {
        let mut inner = self.inner.lock().unwrap();
        let at = snap as *const Snapshot as usize;
        if inner.swept != at {
            inner.swept = at;
            inner.sweep(&snap.cfg);
        }
        let slot = match scope {
            Scope::Route(id) => inner.routes.entry(id),
            Scope::Service(name) => {
                if !inner.services.contains_key(name) {
                    inner.services.insert(name.to_string(), Arc::new(Cache::new(cfg.clone())));
                }
                let c = inner.services.get_mut(name).expect("inserted above");
                if c.cfg != *cfg {
                    *c = Arc::new(Cache::new(cfg.clone()));
                }
                return c.clone();
            }
        };
        let c = slot.or_insert_with(|| Arc::new(Cache::new(cfg.clone())));
        if c.cfg != *cfg {
            *c = Arc::new(Cache::new(cfg.clone()));
        }
        c.clone()
    }
}

impl RegistryInner {
    fn sweep(&mut self, cfg: &ProxyConfig) {
        let routes: Vec<u64> = cfg.routes.iter().filter(|r| r.cache.is_some()).map(route_scope).collect();
        self.routes.retain(|id, _| routes.contains(id));
        self.services.retain(|name, _| cfg.services.get(name).is_some_and(|s| s.cache.is_some()));
    }
}

/// One response as stored.
#[derive(Debug)]
pub(crate) struct Stored {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    /// The request's values of each header the response varies on.
    vary: Vec<(HeaderName, Option<Bytes>)>,
    stored_at: Instant,
    expires: Instant,
    /// `Age` the response already had when it arrived.
    initial_age: u64,
    size: u64,
}

/// An LRU bounded by bytes: `order` maps a use counter to the key, so the first entry
/// is the least recently used.
#[derive(Default)]
struct Lru {
    map: HashMap<Arc<str>, Slot>,
    order: BTreeMap<u64, Arc<str>>,
    tick: u64,
    bytes: u64,
}

struct Slot {
    tick: u64,
    variants: Vec<Arc<Stored>>,
}

pub(crate) struct Cache {
    cfg: CacheConfig,
    lru: Mutex<Lru>,
}

impl Cache {
    pub(crate) fn new(cfg: CacheConfig) -> Cache {
        Cache { cfg, lru: Mutex::new(Lru::default()) }
    }

    pub(crate) fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Bytes charged to stored responses now.
    #[cfg(test)]
    fn bytes(&self) -> u64 {
        self.lru.lock().unwrap().bytes
    }

    /// A fresh stored response for this URL whose `Vary` headers match the request's.
    pub(crate) fn lookup(&self, key: &str, req: &HeaderMap, now: Instant) -> Option<Arc<Stored>> {
        let mut lru = self.lru.lock().unwrap();
        let lru = &mut *lru;
        let (k, slot) = lru.map.get_key_value(key)?;
        let k = k.clone();
        let found = slot.variants.iter().find(|s| now < s.expires && vary_matches(&s.vary, req)).cloned();
        match &found {
            Some(_) => lru.touch(&k),
            None => {
                // Drop what has expired while we are here.
                let slot = lru.map.get_mut(key).expect("found above");
                let mut freed = 0;
                slot.variants.retain(|s| {
                    let keep = now < s.expires;
                    if !keep {
                        freed += s.size;
                    }
                    keep
                });
                lru.bytes -= freed;
                if slot.variants.is_empty() {
                    lru.order.remove(&slot.tick);
                    lru.map.remove(key);
                }
            }
        }
        found
    }

    /// Forgets every variant stored for this URL.
    pub(crate) fn invalidate(&self, key: &str) {
        let mut lru = self.lru.lock().unwrap();
        if let Some(slot) = lru.map.remove(key) {
            lru.order.remove(&slot.tick);
            lru.bytes -= slot.variants.iter().map(|v| v.size).sum::<u64>();
        }
    }

    fn insert(&self, key: &str, stored: Stored) {
        if stored.size > self.cfg.max_bytes {
            return;
        }
        let mut lru = self.lru.lock().unwrap();
        let lru = &mut *lru;
        let k: Arc<str> = lru.map.get_key_value(key).map(|(k, _)| k.clone()).unwrap_or_else(|| Arc::from(key));
        let slot = lru.map.entry(k.clone()).or_insert_with(|| Slot { tick: 0, variants: Vec::new() });
        let mut freed = 0;
        slot.variants.retain(|s| {
            let keep = s.vary != stored.vary && stored.stored_at < s.expires;
            if !keep {
                freed += s.size;
            }
            keep
        });
        if slot.variants.len() >= MAX_VARIANTS {
            freed += slot.variants.remove(0).size;
        }
        lru.bytes = lru.bytes - freed + stored.size;
        slot.variants.push(Arc::new(stored));
        lru.touch(&k);
        while lru.bytes > self.cfg.max_bytes {
            let Some((_, oldest)) = lru.order.pop_first() else { break };
            if let Some(s) = lru.map.remove(&oldest) {
                lru.bytes -= s.variants.iter().map(|v| v.size).sum::<u64>();
            }
        }
    }
}

impl Lru {
    fn touch(&mut self, key: &Arc<str>) {
        self.tick += 1;
        if let Some(slot) = self.map.get_mut(key) {
            self.order.remove(&slot.tick);
            slot.tick = self.tick;
            self.order.insert(self.tick, key.clone());
        }
    }
}

fn joined(req: &HeaderMap, name: &HeaderName) -> Option<Bytes> {
    let mut it = req.get_all(name).iter();
    let first = it.next()?;
    let mut out = BytesMut::from(first.as_bytes());
    for v in it {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    Some(out.freeze())
}

fn vary_matches(vary: &[(HeaderName, Option<Bytes>)], req: &HeaderMap) -> bool {
    vary.iter().all(|(name, want)| joined(req, name) == *want)
}

/// The cache key: host and path with query (the method is not part of it: only GET
/// responses are stored, and HEAD is answered from them).
pub(crate) fn key(host: &str, path_and_query: &str) -> String {
    format!("{host}{path_and_query}")
}

/// The `Cache-Control` directives that matter to a shared cache.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct CacheControl {
    no_store: bool,
    no_cache: bool,
    private: bool,
    public: bool,
    must_revalidate: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
}

impl CacheControl {
    fn parse(h: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for v in h.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok()) {
            for d in v.split(',') {
                let (name, arg) = match d.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (d.trim(), None),
                };
                // RFC 9111 4.2.1: an invalid (or repeated) lifetime makes the response stale.
                let secs = || arg.and_then(|a| a.parse().ok()).unwrap_or(0);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    // With a field list these still forbid reuse without revalidation,
                    // which this cache does not do.
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    "max-age" => cc.max_age = Some(if cc.max_age.is_some() { 0 } else { secs() }),
                    "s-maxage" => cc.s_maxage = Some(if cc.s_maxage.is_some() { 0 } else { secs() }),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// What this request may do with the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestRules {
    /// May be answered from the cache.
    pub lookup: bool,
    /// Its response may be stored (subject to the response's own rules).
    pub store: bool,
    /// It carries `Authorization`: stored only if the response explicitly allows it.
    pub authorized: bool,
}

/// None: the cache has nothing to do with this request (not GET or HEAD).
pub(crate) fn request_rules(method: &Method, h: &HeaderMap) -> Option<RequestRules> {
    let (get, head) = (*method == Method::GET, *method == Method::HEAD);
    if !get && !head {
        return None;
    }
    let cc = CacheControl::parse(h);
    let authorized = h.contains_key(header::AUTHORIZATION);
    let pragma_no_cache = !h.contains_key(header::CACHE_CONTROL)
        && h.get_all(header::PRAGMA)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("no-cache")));
    let revalidate = cc.no_cache || cc.max_age == Some(0) || pragma_no_cache;
    Some(RequestRules { lookup: !cc.no_store && !revalidate && !authorized, store: get && !cc.no_store, authorized })
}

/// How a response is to be stored: its lifetime after `Age`, and what it varies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    fresh_for: Duration,
    initial_age: u64,
    vary: Vec<HeaderName>,
}

/// Status codes a cache may store without explicit permission (RFC 9110 15.1), less 206.
fn heuristically_cacheable(s: StatusCode) -> bool {
    matches!(s.as_u16(), 200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

/// Whether and for how long a response to a request with `rules` may be stored.
pub(crate) fn storable(
    rules: RequestRules,
    status: StatusCode,
    h: &HeaderMap,
    cfg: &CacheConfig,
    now: SystemTime,
) -> Option<Plan> {
    if !rules.store || !heuristically_cacheable(status) || h.contains_key(header::SET_COOKIE) {
        return None;
    }
    let cc = CacheControl::parse(h);
    if cc.no_store || cc.no_cache || cc.private {
        return None;
    }
    if rules.authorized && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return None;
    }
    let too_big = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > cfg.object_limit());
    if too_big {
        return None;
    }
    let mut vary = Vec::new();
    for v in h.get_all(header::VARY).iter() {
        for name in v.to_str().ok()?.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            vary.push(HeaderName::from_bytes(name.as_bytes()).ok()?);
        }
    }
    let lifetime = cc.s_maxage.or(cc.max_age).or_else(|| {
        let expires = h.get(header::EXPIRES)?;
        // An invalid Expires (such as "0") means already expired.
        let Some(expires) = expires.to_str().ok().and_then(http_date) else { return Some(0) };
        let date = h.get(header::DATE).and_then(|v| v.to_str().ok()).and_then(http_date).unwrap_or(now);
        Some(expires.duration_since(date).map(|d| d.as_secs()).unwrap_or(0))
    });
    let lifetime = lifetime.unwrap_or(cfg.default_ttl_secs);
    let initial_age: u64 = h.get(header::AGE).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
    (lifetime > initial_age).then(|| Plan { fresh_for: Duration::from_secs(lifetime - initial_age), initial_age, vary })
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only form senders may generate;
/// the obsolete forms count as invalid.
fn http_date(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 29 || &b[3..5] != b", " || &b[25..] != b" GMT" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes().all(|c| c.is_ascii_digit()).then(|| t.parse().ok())?
    };
    let day = num(5..7)?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| s.get(8..11) == Some(m))? as i64
        + 1;
    let year = num(12..16)?;
    let (hh, mm, ss) = (num(17..19)?, num(20..22)?, num(23..25)?);
    if b[7] != b' ' || b[11] != b' ' || b[16] != b' ' || b[19] != b':' || b[22] != b':' {
        return None;
    }
    if !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The answer from a stored response: its headers with `Age` and `x-cache: HIT`.
pub(crate) fn hit_response(s: &Stored, now: Instant, head: bool) -> Response<Body> {
    let body = if head || s.body.is_empty() {
        Empty::new().map_err(|n: Infallible| match n {}).boxed()
    } else {
        Full::new(s.body.clone()).map_err(|n: Infallible| match n {}).boxed()
    };
    let mut r = Response::new(body);
    *r.status_mut() = s.status;
    *r.headers_mut() = s.headers.clone();
    let age = s.initial_age + now.saturating_duration_since(s.stored_at).as_secs();
    r.headers_mut().insert(header::AGE, HeaderValue::from(age));
    r.headers_mut().insert(HeaderName::from_static("x-cache"), HeaderValue::from_static("HIT"));
    r
}

/// Wraps a response so its body is stored once it has been passed on in full; a body
/// that grows past `max_object_bytes`, fails, or is abandoned by the client is not.
pub(crate) fn store_on_completion(
    resp: Response<Body>,
    cache: Arc<Cache>,
    key: String,
    plan: Plan,
    req: &HeaderMap,
) -> Response<Body> {
    let (parts, body) = resp.into_parts();
    let mut headers = parts.headers.clone();
    headers.remove(header::AGE);
    let vary = plan.vary.iter().map(|n| (n.clone(), joined(req, n))).collect();
    let pending = Pending {
        cache,
        key,
        status: parts.status,
        headers,
        vary,
        fresh_for: plan.fresh_for,
        initial_age: plan.initial_age,
        buf: BytesMut::new(),
    };
    let mut tee = Tee { inner: body, pending: Some(pending) };
    if tee.inner.is_end_stream() {
        tee.finish();
    }
    Response::from_parts(parts, tee.boxed())
}

struct Pending {
    cache: Arc<Cache>,
    key: String,
    status: StatusCode,
    headers: HeaderMap,
    vary: Vec<(HeaderName, Option<Bytes>)>,
    fresh_for: Duration,
    initial_age: u64,
    buf: BytesMut,
}

struct Tee {
    inner: Body,
    pending: Option<Pending>,
}

impl Tee {
    fn finish(&mut self) {
        let Some(p) = self.pending.take() else { return };
        let body = p.buf.freeze();
        let size = ENTRY_OVERHEAD
            + p.key.len() as u64
            + body.len() as u64
            + p.headers.iter().map(|(n, v)| (n.as_str().len() + v.len()) as u64 + HEADER_OVERHEAD).sum::<u64>();
        let now = Instant::now();
        let stored = Stored {
            status: p.status,
            headers: p.headers,
            body,
            vary: p.vary,
            stored_at: now,
            expires: now + p.fresh_for,
            initial_age: p.initial_age,
            size,
        };
        p.cache.insert(&p.key, stored);
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(p)) = (frame.data_ref(), this.pending.as_mut()) {
                    if (p.buf.len() + d.len()) as u64 > p.cache.cfg.object_limit() {
                        this.pending = None;
                    } else {
                        p.buf.extend_from_slice(d);
                    }
                }
                // The server stops polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => this.pending = None,
            Poll::Ready(None) => this.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn cfg(default_ttl_secs: u64) -> CacheConfig {
        CacheConfig { max_bytes: 10_000, max_object_bytes: Some(1_000), default_ttl_secs }
    }

    const GET: RequestRules = RequestRules { lookup: true, store: true, authorized: false };

    #[test]
    fn response_rules_decide_storage_and_lifetime() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 06 Nov 1994 08:49:37
        let auth = RequestRules { lookup: false, store: true, authorized: true };
        // (request, status, response headers, default ttl, expected lifetime or None)
        type Case = (RequestRules, u16, &'static [(&'static str, &'static str)], u64, Option<u64>);
        let cases: &[Case] = &[
            (GET, 200, &[("cache-control", "max-age=60")], 0, Some(60)),
            (GET, 200, &[("cache-control", "max-age=60, s-maxage=5")], 0, Some(5)),
            (GET, 200, &[("cache-control", "max-age=60"), ("age", "50")], 0, Some(10)),
            (GET, 200, &[("cache-control", "max-age=60"), ("age", "60")], 0, None),
            (GET, 200, &[("cache-control", "max-age=60, max-age=70")], 0, None),
            (GET, 200, &[("cache-control", "max-age=soon")], 0, None),
            (GET, 200, &[("cache-control", "no-store, max-age=60")], 0, None),
            (GET, 200, &[("cache-control", "private, max-age=60")], 0, None),
            (GET, 200, &[("cache-control", "no-cache, max-age=60")], 0, None),
            (GET, 200, &[("cache-control", "No-Store")], 30, None),
            (GET, 200, &[("cache-control", "public")], 30, Some(30)),
            (GET, 200, &[], 30, Some(30)),
            (GET, 200, &[], 0, None),
            (GET, 301, &[], 30, Some(30)),
            (GET, 404, &[("cache-control", "max-age=5")], 0, Some(5)),
            (GET, 302, &[("cache-control", "max-age=5")], 0, None),
            (GET, 500, &[("cache-control", "max-age=5")], 0, None),
            (GET, 206, &[("cache-control", "max-age=5")], 0, None),
            (GET, 200, &[("cache-control", "max-age=5"), ("set-cookie", "a=b")], 0, None),
            (GET, 200, &[("cache-control", "max-age=5"), ("vary", "*")], 0, None),
            (GET, 200, &[("cache-control", "max-age=5"), ("content-length", "1001")], 0, None),
            (
                GET,
                200,
                &[("expires", "Sun, 06 Nov 1994 08:50:37 GMT"), ("date", "Sun, 06 Nov 1994 08:49:37 GMT")],
                0,
                Some(60),
            ),
            (GET, 200, &[("expires", "Sun, 06 Nov 1994 08:50:37 GMT")], 0, Some(60)),
            (GET, 200, &[("expires", "Sun, 06 Nov 1994 08:50:37 GMT"), ("cache-control", "max-age=5")], 0, Some(5)),
            (GET, 200, &[("expires", "0")], 30, None),
            (GET, 200, &[("expires", "Sun, 06 Nov 1994 08:48:37 GMT")], 30, None),
            (auth, 200, &[("cache-control", "max-age=60")], 0, None),
            (auth, 200, &[("cache-control", "public, max-age=60")], 0, Some(60)),
            (auth, 200, &[("cache-control", "s-maxage=60")], 0, Some(60)),
            (
                RequestRules { lookup: true, store: false, authorized: false },
                200,
                &[("cache-control", "max-age=60")],
                0,
                None,
            ),
        ];
        for (i, (rules, status, h, ttl, want)) in cases.iter().enumerate() {
            let got = storable(*rules, StatusCode::from_u16(*status).unwrap(), &headers(h), &cfg(*ttl), now);
            let age = headers(h).get("age").map(|a| a.to_str().unwrap().parse::<u64>().unwrap()).unwrap_or(0);
            assert_eq!(got.map(|p| p.fresh_for.as_secs() + p.initial_age - age), *want, "case {i}: {status} {h:?}");
        }
    }

    #[test]
    fn request_rules_follow_the_request_directives() {
        let r = |m: Method, h: &[(&str, &str)]| request_rules(&m, &headers(h));
        assert_eq!(r(Method::POST, &[]), None);
        assert_eq!(r(Method::GET, &[]), Some(GET));
        assert_eq!(r(Method::HEAD, &[]), Some(RequestRules { lookup: true, store: false, authorized: false }));
        let bypass = Some(RequestRules { lookup: false, store: true, authorized: false });
        assert_eq!(r(Method::GET, &[("cache-control", "no-cache")]), bypass);
        assert_eq!(r(Method::GET, &[("cache-control", "max-age=0")]), bypass);
        assert_eq!(r(Method::GET, &[("pragma", "no-cache")]), bypass);
        assert_eq!(r(Method::GET, &[("pragma", "no-cache"), ("cache-control", "max-age=10")]), Some(GET));
        assert_eq!(
            r(Method::GET, &[("cache-control", "no-store")]),
            Some(RequestRules { lookup: false, store: false, authorized: false })
        );
        assert_eq!(
            r(Method::GET, &[("authorization", "Bearer x")]),
            Some(RequestRules { lookup: false, store: true, authorized: true })
        );
    }

    #[test]
    fn vary_selects_the_variant_of_the_same_request_headers() {
        let c = Cache::new(cfg(0));
        let plan = Plan { fresh_for: Duration::from_secs(60), initial_age: 0, vary: vec![header::ACCEPT_ENCODING] };
        for enc in ["gzip", "br"] {
            c.insert("k", stored_for(&plan, &headers(&[("accept-encoding", enc)]), enc));
        }
        let now = Instant::now();
        assert_eq!(c.lookup("k", &headers(&[("accept-encoding", "br")]), now).unwrap().body, "br");
        assert_eq!(c.lookup("k", &headers(&[("accept-encoding", "gzip")]), now).unwrap().body, "gzip");
        assert!(c.lookup("k", &headers(&[]), now).is_none(), "no Accept-Encoding is another variant");
        assert!(c.lookup("k", &headers(&[("accept-encoding", "br")]), now + Duration::from_secs(61)).is_none());
        assert_eq!(c.bytes(), 0, "expired variants are dropped on lookup");
    }

    fn stored_for(plan: &Plan, req: &HeaderMap, body: &'static str) -> Stored {
        let now = Instant::now();
        Stored {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
            vary: plan.vary.iter().map(|n| (n.clone(), joined(req, n))).collect(),
            stored_at: now,
            expires: now + plan.fresh_for,
            initial_age: plan.initial_age,
            size: 1000,
        }
    }

    #[test]
    fn least_recently_used_entries_go_first_when_full() {
        let c = Cache::new(CacheConfig { max_bytes: 3000, max_object_bytes: Some(1000), default_ttl_secs: 0 });
        let plan = Plan { fresh_for: Duration::from_secs(60), initial_age: 0, vary: vec![] };
        let none = HeaderMap::new();
        for k in ["a", "b", "c"] {
            c.insert(k, stored_for(&plan, &none, "x"));
        }
        assert!(c.lookup("a", &none, Instant::now()).is_some(), "a is now the most recently used");
        c.insert("d", stored_for(&plan, &none, "x"));
        assert!(c.lookup("b", &none, Instant::now()).is_none(), "b was the least recently used");
        for k in ["a", "c", "d"] {
            assert!(c.lookup(k, &none, Instant::now()).is_some(), "{k} kept");
        }
        assert_eq!(c.bytes(), 3000);
        c.insert("a", stored_for(&plan, &none, "y"));
        assert_eq!(c.bytes(), 3000, "replacing a variant frees the old one");
        assert_eq!(c.lookup("a", &none, Instant::now()).unwrap().body, "y");
    }

    #[tokio::test]
    async fn a_body_is_stored_only_once_passed_on_in_full_and_within_the_object_limit() {
        let cache =
            Arc::new(Cache::new(CacheConfig { max_bytes: 100_000, max_object_bytes: Some(10), default_ttl_secs: 0 }));
        let plan = Plan { fresh_for: Duration::from_secs(60), initial_age: 3, vary: vec![] };
        let none = HeaderMap::new();
        for (key, body) in [("small", "0123456789"), ("big", "0123456789a")] {
            let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|n: Infallible| match n {}).boxed());
            resp.headers_mut().insert(header::AGE, HeaderValue::from_static("3"));
            let resp = store_on_completion(resp, cache.clone(), key.into(), plan.clone(), &none);
            assert!(cache.lookup(key, &none, Instant::now()).is_none(), "{key}: not before the body is sent");
            let sent = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(sent, body, "the client gets the body unchanged");
        }
        let hit = cache.lookup("small", &none, Instant::now()).expect("stored");
        let r = hit_response(&hit, hit.stored_at + Duration::from_secs(2), false);
        assert_eq!(r.headers()["age"], "5", "Age = the Age it arrived with + time in the cache");
        assert_eq!(r.headers()["x-cache"], "HIT");
        assert!(cache.lookup("big", &none, Instant::now()).is_none(), "over max_object_bytes");
    }

    #[test]
    fn http_dates_parse_only_in_imf_fixdate() {
        let t = |s| http_date(s).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs());
        assert_eq!(t("Sun, 06 Nov 1994 08:49:37 GMT"), Some(784_111_777));
        assert_eq!(t("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(t("Tue, 29 Feb 2028 23:59:59 GMT"), Some(1_835_481_599));
        assert_eq!(t("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(t("Sun Nov  6 08:49:37 1994"), None);
        assert_eq!(t("Sun, 06 Foo 1994 08:49:37 GMT"), None);
    }
}
