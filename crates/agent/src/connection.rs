//! The agent's one WebSocket to the server, kept open forever.
//!
//! A session is: upgrade with the bearer token, `Hello`, wait for `Welcome` (dropping
//! what the server already stored), keepalive at once and then every interval, send
//! buffered results as they appear, apply acks, hand check requests to the scheduler.
//! Anything unexpected (a malformed frame, a server `Error`, silence) ends the session
//! and the loop reconnects with full-jitter exponential backoff; only configuration that
//! can never work ends the loop.
//!
//! On shutdown the session drains: it sends what is unsent, waits up to
//! [`ACK_WAIT`] for acks, sends `Deregister` if configured and closes the socket.

use crate::system::{self, Sampler};
use crate::{AgentError, Shared, database, scheduler};
use drover_core::protocol::{AgentMessage, Hello, Keepalive, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::UrlError;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where the server serves agents when the configured URL names no path.
pub(crate) const AGENT_WS_PATH: &str = "/api/v1/agent/ws";

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// A session that lasted this long proves the server healthy, so the next reconnect
/// starts again from the smallest delay; shorter ones (welcome, then an immediate
/// error) keep backing off so a sick server is not hammered.
const STABLE_SESSION: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the server to acknowledge buffered results.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(2);
/// Connect and handshake limit for the one attempt a stopping agent makes to flush
/// and deregister while it was disconnected.
const FINAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Results per write batch, so a long backlog after an outage is neither cloned at once
/// nor allowed to starve acks and keepalives.
const SEND_BATCH: usize = 64;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The server URL and credentials, checked once at start.
pub(crate) struct Target {
    url: String,
    auth: Option<HeaderValue>,
    /// rustls client config for wss:// (public roots plus any configured CA).
    tls: Option<Arc<rustls::ClientConfig>>,
}

pub(crate) fn client_tls(ca_file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    drover_core::client::tls_config(ca_file).map_err(AgentError::Config)
}

impl Target {
    #[cfg(test)]
    pub fn new(server: &str, token: Option<&str>) -> Result<Target, AgentError> {
        Self::with_ca(server, token, None)
    }

    pub fn with_ca(server: &str, token: Option<&str>, ca_file: Option<&std::path::Path>) -> Result<Target, AgentError> {
        let url = normalize_url(server)?;
        let tls = if url.starts_with("wss://") { Some(client_tls(ca_file)?) } else { None };
        let auth = match token {
            None => None,
            Some(t) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                    AgentError::Config("`token` contains characters that cannot go in an HTTP header".into())
                })?;
                // Keeps the token out of any debug output of the request.
                v.set_sensitive(true);
                Some(v)
            }
        };
        let target = Target { url, auth, tls };
        target.request()?;
        Ok(target)
    }

    fn request(&self) -> Result<Request, AgentError> {
        let mut req = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| AgentError::Config(format!("server URL `{}`: {e}", self.url)))?;
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(header::AUTHORIZATION, auth.clone());
        }
        Ok(req)
    }
}

/// The agent endpoint's URL for `server` (see [`drover_core::client::ws_url`]).
pub(crate) fn normalize_url(server: &str) -> Result<String, AgentError> {
    drover_core::client::ws_url(server, AGENT_WS_PATH).map_err(AgentError::Config)
}

pub(crate) struct Settings {
    pub target: Target,
    pub keepalive_interval: Duration,
    pub deregister: bool,
}

/// How a session ended.
enum End {
    /// Shutdown was requested and the drain ran.
    Stopped,
    /// Shutdown was requested before the session was established.
    Interrupted,
    /// The connection failed or was dropped; reconnect. `stable` resets the backoff.
    Lost { reason: String, stable: bool },
    /// HTTP 401/403 on the upgrade.
    Refused { status: u16, detail: String },
    /// Retrying cannot help.
    Fatal(AgentError),
}

fn lost(reason: impl Into<String>) -> End {
    End::Lost { reason: reason.into(), stable: false }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Serve,
    /// Shutdown arrived while disconnected: connect once, flush, deregister, close.
    Drain,
}

/// The connection loop: runs until shutdown (Ok) or a fatal error (Err).
pub(crate) async fn run(shared: Arc<Shared>, settings: Settings, sampler: Sampler) -> Result<(), AgentError> {
    let sampler = Arc::new(std::sync::Mutex::new(sampler));
    let hello = AgentMessage::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        // Identifies this process's seq numbers to the server across reconnects.
        session: format!("{:032x}", rand::random::<u128>()),
        entity: shared.entity.clone(),
    });
    let hello = to_text(&hello);
    let url = &settings.target.url;
    let mut failures: u32 = 0;
    loop {
        if shared.is_stopping() {
            final_attempt(&shared, &settings, &hello, &sampler).await;
            return Ok(());
        }
        match session(&shared, &settings, &hello, &sampler, Mode::Serve).await {
            End::Stopped => return Ok(()),
            End::Interrupted => continue,
            End::Fatal(e) => {
                tracing::error!(%url, "agent connection stopped: {e}");
                return Err(e);
            }
            End::Refused { status, detail } => {
                let refusals = shared.auth_refusals.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(
                    %url,
                    status,
                    refusals,
                    detail = %detail,
                    "the server refused the agent token (HTTP {status}); check `token`. Retrying"
                );
            }
            End::Lost { reason, stable } => {
                if stable {
                    failures = 0;
                }
                tracing::warn!(%url, "connection to server lost or failed: {reason}; reconnecting");
            }
        }
        let delay = backoff(failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.stopped() => {}
        }
    }
}

/// A stopping agent that is disconnected still tries once to deliver its buffered
/// results and deregister, within a short limit.
async fn final_attempt(shared: &Arc<Shared>, settings: &Settings, hello: &str, sampler: &system::SharedSampler) {
    let buffered = shared.outbox.len();
    if !settings.deregister && buffered == 0 {
        return;
    }
    tracing::info!(
        buffered,
        deregister = settings.deregister,
        "stopping while disconnected; one last connection attempt"
    );
    match session(shared, settings, hello, sampler, Mode::Drain).await {
        End::Stopped => {}
        End::Lost { reason, .. } => tracing::warn!("last connection attempt failed: {reason}"),
        End::Refused { status, .. } => tracing::error!("last connection attempt refused (HTTP {status})"),
        End::Fatal(e) => tracing::error!("last connection attempt failed: {e}"),
        End::Interrupted => {}
    }
}

/// Full jitter: uniformly random in [0, min(cap, start · 2^failures)].
fn backoff(failures: u32) -> Duration {
    let ceiling = BACKOFF_START.saturating_mul(1 << failures.min(16)).min(BACKOFF_CAP);
    rand::rng().random_range(Duration::ZERO..=ceiling)
}

fn ws_config() -> WebSocketConfig {
    // The server sends small control messages; modest buffers keep the agent's
    // resident size low (the defaults are 128 KiB each way and 64 MiB messages).
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

async fn session(
    shared: &Arc<Shared>,
    settings: &Settings,
    hello: &str,
    sampler: &system::SharedSampler,
    mode: Mode,
) -> End {
    let limit = if mode == Mode::Serve { CONNECT_TIMEOUT } else { FINAL_CONNECT_TIMEOUT };
    let open = async {
        let mut ws = connect(&settings.target, limit).await?;
        welcome(&mut ws, shared, hello, limit).await.map_err(lost)?;
        Ok::<_, End>(ws)
    };
    let opened = match mode {
        Mode::Serve => tokio::select! {
            r = open => r,
            () = shared.stopped() => return End::Interrupted,
        },
        Mode::Drain => open.await,
    };
    let ws = match opened {
        Ok(ws) => ws,
        Err(end) => return end,
    };
    tracing::info!(url = %settings.target.url, "connected to server");
    shared.connected.store(true, Ordering::Relaxed);
    let db_generation = shared.db.as_ref().map_or(0, |db| db.session_started());
    let mut s = Session { ws, shared: shared.clone(), sent_up_to: 0, last_rx: Instant::now(), db_generation };
    let end = match mode {
        Mode::Serve => s.serve(settings, sampler).await,
        Mode::Drain => {
            s.drain(settings.deregister).await;
            End::Stopped
        }
    };
    shared.connected.store(false, Ordering::Relaxed);
    if let Some(db) = &shared.db {
        db.session_ended();
    }
    end
}

async fn connect(target: &Target, limit: Duration) -> Result<Ws, End> {
    let request = target.request().map_err(End::Fatal)?;
    let connector = target.tls.clone().map(tokio_tungstenite::Connector::Rustls);
    let attempt = tokio_tungstenite::connect_async_tls_with_config(request, Some(ws_config()), true, connector);
    match tokio::time::timeout(limit, attempt).await {
        Err(_) => Err(lost(format!("no connection within {} s", limit.as_secs()))),
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let detail = response.body().as_deref().map(|b| excerpt(&String::from_utf8_lossy(b))).unwrap_or_default();
            if status == 401 || status == 403 {
                Err(End::Refused { status, detail })
            } else {
                Err(lost(format!("the server answered the WebSocket upgrade with HTTP {status} {detail}")))
            }
        }
        Ok(Err(tungstenite::Error::Url(UrlError::TlsFeatureNotEnabled))) => Err(End::Fatal(AgentError::Config(
            "`server` is a wss:// (or https://) URL but this build has no TLS support; use ws://".into(),
        ))),
        Ok(Err(e)) => Err(lost(e.to_string())),
    }
}

/// Sends the hello and waits for the welcome, then forgets the results the server
/// already stored.
async fn welcome(ws: &mut Ws, shared: &Shared, hello: &str, limit: Duration) -> Result<(), String> {
    ws.send(Message::text(hello)).await.map_err(|e| format!("sending hello: {e}"))?;
    let wait = async {
        loop {
            let text = match ws.next().await {
                None => return Err("the server closed the connection before welcoming".to_string()),
                Some(Err(e)) => return Err(format!("waiting for welcome: {e}")),
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(frame))) => return Err(closed_reason(frame.as_ref())),
                Some(Ok(Message::Binary(_))) => return Err("binary frame instead of welcome".into()),
                Some(Ok(_)) => continue,
            };
            return match serde_json::from_str::<ServerMessage>(&text) {
                Ok(ServerMessage::Welcome { acked_up_to }) => Ok(acked_up_to),
                Ok(ServerMessage::Error { message }) => {
                    tracing::error!("the server refused the hello: {message}");
                    Err(format!("hello refused: {message}"))
                }
                Ok(other) => Err(format!("expected welcome, got {}", message_kind(&other))),
                Err(e) => Err(format!("malformed frame instead of welcome ({e}): {}", excerpt(&text))),
            };
        }
    };
    let acked_up_to =
        tokio::time::timeout(limit, wait).await.map_err(|_| format!("no welcome within {} s", limit.as_secs()))??;
    shared.outbox.ack(acked_up_to);
    Ok(())
}

struct Session {
    ws: Ws,
    shared: Arc<Shared>,
    /// Highest seq sent on this connection; a new connection re-sends from the start
    /// of the buffer because the server may not have stored what the old one carried.
    sent_up_to: u64,
    /// Last frame of any kind from the server (pongs included), to notice a peer that
    /// vanished without closing the TCP connection.
    last_rx: Instant,
    /// Tags database orders received on this connection, so their replies go out on it
    /// or not at all (see `database.rs`).
    db_generation: u64,
}

impl Session {
    async fn serve(&mut self, settings: &Settings, sampler: &system::SharedSampler) -> End {
        let welcomed = Instant::now();
        // The first tick fires at once: the keepalive right after welcome.
        let mut keepalive = tokio::time::interval(settings.keepalive_interval);
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Every keepalive carries a ping, so a live server answers at least that often.
        let silence_limit = settings.keepalive_interval * 3 + Duration::from_secs(30);
        let shared = self.shared.clone();
        let stop = shared.stopped();
        tokio::pin!(stop);
        // Sampling system metrics takes a while (disks, interfaces); it runs beside the
        // loop so results queued meanwhile go out at once, and the keepalive follows
        // when the sample is ready.
        let mut sampling: Option<tokio::task::JoinHandle<Vec<drover_core::MetricPoint>>> = None;
        loop {
            let backlog = self.shared.outbox.has_after(self.sent_up_to);
            let db_frames = self.shared.db.as_ref().is_some_and(|db| db.has_frames());
            let step = tokio::select! {
                () = &mut stop => {
                    self.drain(settings.deregister).await;
                    return End::Stopped;
                }
                frame = self.ws.next() => self.on_frame(frame),
                _ = keepalive.tick(), if sampling.is_none() => {
                    let sampler = sampler.clone();
                    sampling = Some(tokio::spawn(async move { system::sample_bounded(&sampler).await }));
                    Ok(())
                }
                sample = async { sampling.as_mut().expect("guarded by is_some").await }, if sampling.is_some() => {
                    sampling = None;
                    self.keepalive(sample.unwrap_or_default(), silence_limit).await
                }
                () = std::future::ready(()), if backlog => self.send_backlog().await,
                () = self.shared.outbox.ready.notified(), if !backlog => Ok(()),
                () = std::future::ready(()), if db_frames => self.send_db().await,
                () = db_ready(&self.shared), if !db_frames => Ok(()),
            };
            if let Err(reason) = step {
                return End::Lost { reason, stable: welcomed.elapsed() >= STABLE_SESSION };
            }
        }
    }

    fn on_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) -> Result<(), String> {
        let msg = match frame {
            None => return Err("the server closed the connection".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(msg)) => msg,
        };
        self.last_rx = Instant::now();
        let text = match msg {
            Message::Text(text) => text,
            Message::Close(frame) => return Err(closed_reason(frame.as_ref())),
            Message::Binary(_) => {
                tracing::warn!("binary frame from the server; the protocol is JSON text");
                return Err("unexpected binary frame".into());
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(()),
        };
        match serde_json::from_str::<ServerMessage>(&text) {
            Ok(ServerMessage::Ack { up_to }) => self.shared.outbox.ack(up_to),
            Ok(ServerMessage::Request(request)) => {
                tracing::debug!(check = %request.check.name, splay_ms = request.splay_ms, "check request");
                scheduler::spawn_request(self.shared.clone(), *request);
            }
            Ok(m @ (ServerMessage::DbOrder { .. } | ServerMessage::DbLease { .. })) => match &self.shared.db {
                Some(db) => database::on_message(db, m, self.db_generation),
                None => {
                    tracing::warn!(kind = message_kind(&m), "database message but no [postgres] is configured; ignored")
                }
            },
            Ok(ServerMessage::Welcome { .. }) => tracing::warn!("unexpected second welcome from the server; ignored"),
            Ok(ServerMessage::Error { message }) => {
                tracing::error!("the server reported an error: {message}");
                return Err(format!("server error: {message}"));
            }
            Err(e) => {
                tracing::warn!(frame = %excerpt(&text), "malformed frame from the server: {e}");
                return Err(format!("malformed frame: {e}"));
            }
        }
        Ok(())
    }

    async fn keepalive(
        &mut self,
        metrics: Vec<drover_core::MetricPoint>,
        silence_limit: Duration,
    ) -> Result<(), String> {
        if self.last_rx.elapsed() > silence_limit {
            return Err(format!("nothing heard from the server for {} s", silence_limit.as_secs()));
        }
        let msg = AgentMessage::Keepalive(Keepalive { metrics });
        self.ws.feed(Message::text(to_text(&msg))).await.map_err(|e| format!("sending keepalive: {e}"))?;
        self.ws.feed(Message::Ping(Default::default())).await.map_err(|e| format!("sending ping: {e}"))?;
        self.ws.flush().await.map_err(|e| format!("sending keepalive: {e}"))
    }

    /// Database reports and order replies: fire-and-forget, never through the outbox.
    async fn send_db(&mut self) -> Result<(), String> {
        let Some(db) = &self.shared.db else { return Ok(()) };
        for text in db.take_frames(self.db_generation) {
            self.ws.feed(Message::text(text)).await.map_err(|e| format!("sending database frame: {e}"))?;
        }
        self.ws.flush().await.map_err(|e| format!("sending database frames: {e}"))
    }

    async fn send_backlog(&mut self) -> Result<(), String> {
        for (seq, result) in self.shared.outbox.after(self.sent_up_to, SEND_BATCH) {
            let msg = AgentMessage::Result { seq, result };
            self.ws.feed(Message::text(to_text(&msg))).await.map_err(|e| format!("sending result: {e}"))?;
            self.sent_up_to = seq;
        }
        self.ws.flush().await.map_err(|e| format!("sending results: {e}"))
    }

    /// Shutdown: flush, wait for acks, deregister, close. Bounded in time throughout.
    async fn drain(&mut self, deregister: bool) {
        let flushed = tokio::time::timeout(ACK_WAIT, async {
            loop {
                if self.shared.outbox.len() == 0 {
                    return Ok(());
                }
                if self.shared.outbox.has_after(self.sent_up_to) {
                    self.send_backlog().await?;
                    continue;
                }
                // Only acks matter now; requests for a stopping agent are dropped.
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(ServerMessage::Ack { up_to }) = serde_json::from_str(&text) {
                            self.shared.outbox.ack(up_to);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => return Err(closed_reason(frame.as_ref())),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("the server closed the connection".to_string()),
                }
            }
        })
        .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                tracing::warn!(
                    buffered = self.shared.outbox.len(),
                    "connection lost while stopping ({reason}); unacknowledged results are lost"
                );
                return;
            }
            Err(_) => tracing::warn!(
                buffered = self.shared.outbox.len(),
                "results still unacknowledged after {} s; stopping anyway, they are lost",
                ACK_WAIT.as_secs()
            ),
        }
        if deregister {
            let sent =
                tokio::time::timeout(CLOSE_TIMEOUT, self.ws.send(Message::text(to_text(&AgentMessage::Deregister))))
                    .await;
            match sent {
                Ok(Ok(())) => tracing::info!("deregistered from the server"),
                Ok(Err(e)) => tracing::warn!("could not send deregister: {e}"),
                Err(_) => tracing::warn!("could not send deregister within {CLOSE_TIMEOUT:?}"),
            }
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.ws.close(None)).await;
        // Reading until the server's close reply lets our last frames arrive before
        // the TCP connection is torn down.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async { while let Some(Ok(_)) = self.ws.next().await {} }).await;
    }
}

/// Resolves when database frames may be waiting; never without `[postgres]`.
async fn db_ready(shared: &Shared) {
    match &shared.db {
        Some(db) => db.ready.notified().await,
        None => std::future::pending().await,
    }
}

fn to_text(msg: &AgentMessage) -> String {
    // These types serialise infallibly (string keys, finite structure); an empty frame
    // would be refused by the server and so surface rather than vanish.
    serde_json::to_string(msg).unwrap_or_default()
}

fn message_kind(m: &ServerMessage) -> &'static str {
    match m {
        ServerMessage::Welcome { .. } => "welcome",
        ServerMessage::Ack { .. } => "ack",
        ServerMessage::Request(_) => "request",
        ServerMessage::Error { .. } => "error",
        ServerMessage::DbOrder { .. } => "db_order",
        ServerMessage::DbLease { .. } => "db_lease",
    }
}

fn closed_reason(frame: Option<&tungstenite::protocol::CloseFrame>) -> String {
    match frame {
        Some(f) if !f.reason.is_empty() => format!("the server closed the connection ({}: {})", f.code, f.reason),
        Some(f) => format!("the server closed the connection ({})", f.code),
        None => "the server closed the connection".into(),
    }
}

/// The start of a frame or body for a log line; frames can be large.
fn excerpt(s: &str) -> String {
    const MAX: usize = 200;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_to_the_agent_endpoint() {
        assert_eq!(normalize_url("http://srv:8080").unwrap(), "ws://srv:8080/api/v1/agent/ws");
        assert_eq!(normalize_url("wss://srv/custom/ws").unwrap(), "wss://srv/custom/ws");
        assert!(matches!(normalize_url("ftp://srv"), Err(AgentError::Config(_))));
    }

    #[test]
    fn token_goes_in_bearer_header() {
        let t = Target::new("ws://127.0.0.1:9", Some("s3cret")).unwrap();
        let req = t.request().unwrap();
        assert_eq!(req.headers()[header::AUTHORIZATION], "Bearer s3cret");
        assert_eq!(req.uri().path(), AGENT_WS_PATH);
        assert!(matches!(Target::new("ws://h", Some("bad\ntoken")), Err(AgentError::Config(_))));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        for failures in 0..40 {
            let d = backoff(failures);
            let ceiling = BACKOFF_START.saturating_mul(1 << failures.min(16)).min(BACKOFF_CAP);
            assert!(d <= ceiling && d <= BACKOFF_CAP, "{failures}: {d:?}");
        }
        assert!(backoff(0) <= Duration::from_millis(200));
    }
}
