//! `drover-feed`: how a data plane (the proxy, the name server) learns member health
//! from the control plane, and keeps serving when the control plane is gone.
//!
//! [`start`] connects to the server's `GET /api/v1/watch` WebSocket (a snapshot, then
//! one frame per change), applies the stream to one map, and publishes every version
//! on a `tokio::sync::watch` channel ([`Feed::members`]). It is *statically stable*,
//! the property AWS builds its data planes around:
//!
//! - when the server is unreachable, the last known members stay published — nothing
//!   is cleared on a disconnect, and reconnects back off with jitter up to 5 s;
//! - each version is written to `state_file` (temp file, fsync, rename, so a crash
//!   mid-write leaves the previous version) and read back by [`start`], so a data plane
//!   restarted during a control-plane outage serves what it served before;
//! - a silent connection (a partition rather than a closed socket) is noticed by pings:
//!   nothing heard for [`SILENCE_LIMIT`] means reconnect.
//!
//! | item | what it is |
//! |---|---|
//! | [`FeedOptions`] | server URL, token, CA file, state file |
//! | [`Feed`] | the running feed: [`Feed::members`], [`Feed::status`] |
//! | [`FeedStatus`] | connected or not, where the current view came from, last error |
//! | [`load_state`] | reads a state file (also used by tests and `check-config`) |

#![forbid(unsafe_code)]

use drover_core::health::{MemberHealth, WatchMessage};
pub use drover_core::health::{Members, View};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue};

/// The watch endpoint's path, used when `server` has none.
pub const WATCH_PATH: &str = "/api/v1/watch";
/// A connection with nothing received for this long is presumed cut and replaced.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(15);
const PING_EVERY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Changes arriving within this window are written to disk once.
const PERSIST_DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// `http(s)://host:port`, `ws(s)://…`, or `host:port`.
    pub server: String,
    /// Any token the server accepts (the agent token is enough).
    pub token: Option<String>,
    /// PEM CA certificate(s) for a wss:// server.
    pub ca_file: Option<PathBuf>,
    /// Where the last known members are kept; `None` keeps them in memory only.
    pub state_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("feed: {0}")]
    Config(String),
}

/// Where the published members came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Nothing known yet.
    Empty,
    /// The state file, read at start; the server has not answered since.
    Disk,
    /// The server's watch stream (possibly no longer connected: see `connected`).
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeedStatus {
    pub connected: bool,
    pub source: Source,
    pub members: usize,
    /// Why the last connection attempt failed or ended.
    pub last_error: Option<String>,
}

/// The state file's content.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    saved_at_ms: i64,
    server: String,
    members: Vec<MemberHealth>,
    /// The view's clock ([`View::changed_ms`]); absent from older files.
    #[serde(default)]
    changed_ms: i64,
}

/// A running feed; dropping it stops the connection task.
pub struct Feed {
    members: watch::Receiver<Members>,
    status: watch::Receiver<FeedStatus>,
    tasks: Vec<JoinHandle<()>>,
    /// (state file, server) for the final write when the feed is dropped.
    persist_to: Option<(PathBuf, String)>,
}

impl Feed {
    /// The current members, and a way to wait for the next version.
    pub fn members(&self) -> watch::Receiver<Members> {
        self.members.clone()
    }

    pub fn status(&self) -> FeedStatus {
        self.status.borrow().clone()
    }

    pub fn status_watch(&self) -> watch::Receiver<FeedStatus> {
        self.status.clone()
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // A change inside the write debounce window would otherwise be lost on a clean
        // stop, and the next start would serve an older view than this one did.
        if let Some((path, server)) = &self.persist_to {
            let members = self.members.borrow().clone();
            if let Err(e) = write_state(path, server, &members) {
                tracing::error!(error = %e, "could not save the members to the state file on stop");
            }
        }
    }
}

/// Reads a state file: `Ok(None)` when it does not exist.
pub fn load_state(path: &Path) -> Result<Option<Members>, String> {
    let Some(state) = drover_core::state_file::read_json::<StateFile>(path)? else { return Ok(None) };
    let members = state.members.into_iter().map(|m| (m.entity.clone(), m)).collect();
    Ok(Some(Arc::new(View::new(members, state.changed_ms))))
}

/// Checks the options, publishes the state file's members (if any), and starts
/// following the server. Must be called within a tokio runtime.
pub fn start(opts: FeedOptions) -> Result<Feed, FeedError> {
    let url = drover_core::client::ws_url(&opts.server, WATCH_PATH).map_err(FeedError::Config)?;
    let tls = if url.starts_with("wss://") {
        Some(drover_core::client::tls_config(opts.ca_file.as_deref()).map_err(FeedError::Config)?)
    } else {
        None
    };
    let auth = match &opts.token {
        None => None,
        Some(t) => {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|_| FeedError::Config("the token contains characters that cannot go in a header".into()))?;
            v.set_sensitive(true);
            Some(v)
        }
    };
    url.as_str().into_client_request().map_err(|e| FeedError::Config(format!("server URL `{url}`: {e}")))?;

    let (initial, source) = match opts.state_file.as_deref().map(load_state) {
        Some(Ok(Some(m))) => {
            tracing::info!(members = m.len(), file = %opts.state_file.as_ref().unwrap().display(),
                "serving the last known members from disk until the server answers");
            (m, Source::Disk)
        }
        Some(Err(e)) => {
            // Keep the unreadable file for a person to look at, and start empty rather
            // than refuse to start: the server will send a snapshot.
            let path = opts.state_file.as_ref().unwrap();
            let aside = path.with_extension("corrupt");
            let _ = std::fs::rename(path, &aside);
            tracing::error!(error = %e, moved_to = %aside.display(), "state file unreadable; starting empty");
            (Members::default(), Source::Empty)
        }
        _ => (Members::default(), Source::Empty),
    };
    let (members_tx, members_rx) = watch::channel(initial.clone());
    let (status_tx, status_rx) =
        watch::channel(FeedStatus { connected: false, source, members: initial.len(), last_error: None });
    let mut tasks = Vec::new();
    if let Some(path) = opts.state_file.clone() {
        tasks.push(tokio::spawn(persist(path, opts.server.clone(), members_rx.clone())));
    }
    let link = Link { url, auth, tls };
    tasks.push(tokio::spawn(follow(link, (*initial).clone(), members_tx, status_tx)));
    let persist_to = opts.state_file.clone().map(|p| (p, opts.server.clone()));
    Ok(Feed { members: members_rx, status: status_rx, tasks, persist_to })
}

struct Link {
    url: String,
    auth: Option<HeaderValue>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

impl Link {
    async fn connect(&self) -> Result<Ws, String> {
        let mut req = self.url.as_str().into_client_request().map_err(|e| e.to_string())?;
        if let Some(a) = &self.auth {
            req.headers_mut().insert(tungstenite::http::header::AUTHORIZATION, a.clone());
        }
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let attempt = tokio_tungstenite::connect_async_tls_with_config(req, None, true, connector);
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Err(_) => Err(format!("no connection within {} s", CONNECT_TIMEOUT.as_secs())),
            Ok(Ok((ws, _))) => Ok(ws),
            Ok(Err(tungstenite::Error::Http(resp))) => {
                Err(format!("the server refused the watch with HTTP {}", resp.status().as_u16()))
            }
            Ok(Err(e)) => Err(e.to_string()),
        }
    }
}

fn backoff(failures: u32) -> Duration {
    let ceiling = BACKOFF_START.saturating_mul(1 << failures.min(16)).min(BACKOFF_CAP);
    // Full jitter, so data planes restarted together do not reconnect in step.
    ceiling.mul_f64(rand::random::<f64>().max(0.1))
}

/// Connects, follows, and reconnects, forever; the last known members stay published
/// in between.
async fn follow(link: Link, mut map: View, members: watch::Sender<Members>, status: watch::Sender<FeedStatus>) {
    let mut failures = 0u32;
    loop {
        let ended = match link.connect().await {
            Err(e) => e,
            Ok(ws) => {
                failures = 0;
                tracing::info!(url = %link.url, "watching the control plane");
                status.send_modify(|s| s.connected = true);
                let why = session(ws, &mut map, &members, &status).await;
                status.send_modify(|s| s.connected = false);
                why
            }
        };
        if failures == 0 {
            tracing::warn!(url = %link.url, reason = %ended, members = map.len(),
                "control plane unreachable; serving the last known members");
        }
        status.send_modify(|s| s.last_error = Some(ended));
        tokio::time::sleep(backoff(failures)).await;
        failures = failures.saturating_add(1);
    }
}

/// One connection's life; returns why it ended.
async fn session(
    mut ws: Ws,
    map: &mut View,
    members: &watch::Sender<Members>,
    status: &watch::Sender<FeedStatus>,
) -> String {
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if heard.elapsed() > SILENCE_LIMIT {
                    return format!("nothing heard for {} s", SILENCE_LIMIT.as_secs());
                }
                if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                    return e.to_string();
                }
            }
            frame = ws.next() => {
                heard = tokio::time::Instant::now();
                let text = match frame {
                    None => return "the server closed the stream".into(),
                    Some(Err(e)) => return e.to_string(),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) => return "the server closed the stream".into(),
                    Some(Ok(_)) => continue,
                };
                let msg: WatchMessage = match serde_json::from_str(&text) {
                    Ok(m) => m,
                    // A fresh connection starts with a snapshot, which resynchronises us.
                    Err(e) => return format!("unreadable watch frame: {e}"),
                };
                apply(map, msg);
                members.send_replace(Arc::new(map.clone()));
                status.send_modify(|s| {
                    s.source = Source::Server;
                    s.members = map.len();
                });
            }
        }
    }
}

fn apply(view: &mut View, msg: WatchMessage) {
    match msg {
        WatchMessage::Snapshot { members, changed_ms } => {
            *view = View::new(members.into_iter().map(|m| (m.entity.clone(), m)).collect(), changed_ms);
        }
        // A member's own `changed_ms` counts in `View::clock_ms`; only a removal, which
        // leaves no member to carry it, moves the view's clock itself.
        WatchMessage::Upsert { member } => {
            view.members.insert(member.entity.clone(), member);
        }
        WatchMessage::Remove { entity, changed_ms } => {
            view.changed_ms = view.changed_ms.max(changed_ms);
            view.members.remove(&entity);
        }
    }
}

/// Writes each new version to `path`, at most once per debounce window.
async fn persist(path: PathBuf, server: String, mut rx: watch::Receiver<Members>) {
    // The version read from disk at start is already there.
    rx.mark_unchanged();
    while rx.changed().await.is_ok() {
        tokio::time::sleep(PERSIST_DEBOUNCE).await;
        let members = rx.borrow_and_update().clone();
        let (path, server) = (path.clone(), server.clone());
        let written = tokio::task::spawn_blocking(move || write_state(&path, &server, &members)).await;
        if let Ok(Err(e)) = written {
            tracing::error!(error = %e, "could not save the members to the state file");
        }
    }
}

fn write_state(path: &Path, server: &str, members: &Members) -> std::io::Result<()> {
    let state = StateFile {
        saved_at_ms: drover_core::time::now_ms(),
        server: server.to_string(),
        members: members.values().cloned().collect(),
        changed_ms: members.changed_ms,
    };
    drover_core::state_file::write_json(path, &state, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::{Entity, EntityClass};

    fn member(name: &str, healthy: bool) -> MemberHealth {
        let mut m = MemberHealth::new(&Entity::new(name, EntityClass::Agent));
        m.healthy = healthy;
        m
    }

    #[test]
    fn snapshot_replaces_and_changes_apply() {
        let mut view = View::default();
        let snapshot = vec![member("a", true), member("b", false)];
        apply(&mut view, WatchMessage::Snapshot { members: snapshot, changed_ms: 0 });
        apply(&mut view, WatchMessage::Upsert { member: member("b", true) });
        apply(&mut view, WatchMessage::Remove { entity: "a".into(), changed_ms: 0 });
        assert_eq!(view.keys().collect::<Vec<_>>(), ["b"]);
        assert!(view["b"].healthy);
        apply(&mut view, WatchMessage::Snapshot { members: vec![member("c", false)], changed_ms: 0 });
        assert_eq!(view.keys().collect::<Vec<_>>(), ["c"], "a snapshot drops members it does not name");
    }

    #[test]
    fn the_views_clock_moves_on_every_change_a_removal_included_and_a_snapshot_sets_it() {
        let at = |name: &str, ms: i64| MemberHealth { changed_ms: ms, ..member(name, true) };
        let mut view = View::default();
        apply(&mut view, WatchMessage::Snapshot { members: vec![at("a", 100), at("b", 200)], changed_ms: 250 });
        assert_eq!(view.clock_ms(), 250);
        apply(&mut view, WatchMessage::Upsert { member: at("a", 300) });
        assert_eq!(view.clock_ms(), 300);
        // "a" held the newest change; its removal still moves the clock on, not back.
        apply(&mut view, WatchMessage::Remove { entity: "a".into(), changed_ms: 400 });
        assert_eq!(view.clock_ms(), 400);
        // A watcher that connects now learns the same clock from the server's snapshot.
        let mut late = View::default();
        apply(&mut late, WatchMessage::Snapshot { members: vec![at("b", 200)], changed_ms: 400 });
        assert_eq!(late.clock_ms(), view.clock_ms());
    }

    #[test]
    fn state_file_round_trips_and_a_missing_one_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/members.json");
        assert_eq!(load_state(&path).unwrap(), None);
        let members: Members = Arc::new(View::new([("a".to_string(), member("a", true))].into(), 777));
        write_state(&path, "http://srv", &members).unwrap();
        assert_eq!(load_state(&path).unwrap().unwrap(), members, "the view's clock included");
        // A file written before the view had a clock still loads.
        let old = r#"{"saved_at_ms": 1, "server": "http://srv", "members": []}"#;
        std::fs::write(&path, old).unwrap();
        assert_eq!(load_state(&path).unwrap().unwrap().changed_ms, 0);
        std::fs::write(&path, "{ not json").unwrap();
        assert!(load_state(&path).unwrap_err().contains("members.json"));
    }

    /// Port 9 on loopback: nothing listens, so every connection attempt fails.
    fn unreachable_server(state_file: &std::path::Path) -> FeedOptions {
        FeedOptions {
            server: "http://127.0.0.1:9".into(),
            token: None,
            ca_file: None,
            state_file: Some(state_file.to_path_buf()),
        }
    }

    #[tokio::test]
    async fn unreachable_server_keeps_the_members_read_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members.json");
        let members: Members = Arc::new([("a".to_string(), member("a", true))].into_iter().collect());
        write_state(&path, "http://srv", &members).unwrap();
        let feed = start(unreachable_server(&path)).unwrap();
        let mut status = feed.status_watch();
        tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.last_error.is_some()))
            .await
            .unwrap()
            .unwrap();
        let s = feed.status();
        assert!(!s.connected);
        assert_eq!((s.source, s.members), (Source::Disk, 1));
        assert_eq!(*feed.members().borrow(), members, "a failed connection clears nothing");
    }

    #[tokio::test]
    async fn a_corrupt_state_file_is_set_aside_and_the_feed_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members.json");
        std::fs::write(&path, "{ not json").unwrap();
        let feed = start(unreachable_server(&path)).unwrap();
        assert!(feed.members().borrow().is_empty());
        assert!(path.with_extension("corrupt").exists(), "the unreadable file is kept for a person");
    }

    #[tokio::test]
    async fn dropping_the_feed_saves_the_latest_view_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("members.json");
        let feed = start(unreachable_server(&path)).unwrap();
        assert_eq!(load_state(&path).unwrap(), None, "nothing to save yet");
        drop(feed);
        assert_eq!(load_state(&path).unwrap(), Some(Members::default()), "written on drop, not after a debounce");
    }

    #[test]
    fn bad_options_are_refused_at_start() {
        let opts = |server: &str, token: Option<&str>| FeedOptions {
            server: server.into(),
            token: token.map(String::from),
            ca_file: None,
            state_file: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _g = rt.enter();
        assert!(start(opts("ftp://srv", None)).err().unwrap().to_string().contains("scheme `ftp`"));
        assert!(start(opts("srv:1", Some("a\nb"))).err().unwrap().to_string().contains("token"));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        for f in 0..40 {
            assert!(backoff(f) <= BACKOFF_CAP);
        }
    }
}
