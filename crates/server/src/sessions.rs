//! Agent connections: the WebSocket endpoint, one task per agent.
//!
//! Protocol (see `drover_core::protocol`): the upgrade is authenticated by the agent
//! token; the first frame must be `hello` within [`HELLO_TIMEOUT`]. Results are
//! acknowledged cumulatively once the persister reports them durable. A frame that
//! does not parse closes this connection only; the agent reconnects and re-sends.

use crate::state::State;
use axum::extract::ws::{Message, WebSocket};
use drover_core::protocol::{AgentMessage, PROTOCOL_VERSION, ServerMessage};
use futures_util::{SinkExt, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing frames queued per agent; beyond this, check requests are dropped (and
/// counted) rather than letting one stuck agent grow server memory.
const OUTBOX: usize = 1024;
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

struct Conn {
    id: u64,
    tx: mpsc::Sender<String>,
}

/// Who is connected, and what each agent session already had acknowledged.
#[derive(Default)]
pub struct Sessions {
    conns: RwLock<HashMap<String, Conn>>,
    /// entity -> (session, highest seq stored), to drop re-sent results.
    acked: Mutex<HashMap<String, (String, u64)>>,
    next_id: AtomicU64,
}

impl Sessions {
    /// Queues a frame for an agent; false if it is not connected or its queue is full.
    pub fn send(&self, entity: &str, frame: String) -> bool {
        match self.conns.read().expect("conns lock").get(entity) {
            Some(c) => c.tx.try_send(frame).is_ok(),
            None => false,
        }
    }

    pub fn connected(&self) -> usize {
        self.conns.read().expect("conns lock").len()
    }
}

fn frame(m: &ServerMessage) -> String {
    serde_json::to_string(m).expect("server messages always serialize")
}

/// Serves one agent connection until it closes.
pub async fn serve(socket: WebSocket, state: Arc<State>, sessions: Arc<Sessions>, peer: String) {
    let (mut sink, mut stream) = socket.split();

    // 1. hello
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, stream.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<AgentMessage>(&t).map_err(|e| e.to_string()),
        Ok(Some(Ok(_))) => Err("first frame must be a text hello".to_string()),
        Ok(Some(Err(e))) => Err(e.to_string()),
        Ok(None) => return,
        Err(_) => Err("no hello within 10 s".to_string()),
    };
    let hello = match hello {
        Ok(AgentMessage::Hello(h)) => h,
        Ok(_) => {
            reject(&mut sink, &state, &peer, "first frame must be a hello").await;
            return;
        }
        Err(e) => {
            reject(&mut sink, &state, &peer, &format!("bad hello: {e}")).await;
            return;
        }
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let msg =
            format!("protocol version {} not supported (server speaks {PROTOCOL_VERSION})", hello.protocol_version);
        reject(&mut sink, &state, &peer, &msg).await;
        return;
    }
    if let Err(e) = hello.entity.validate() {
        reject(&mut sink, &state, &peer, &format!("bad hello: {e}")).await;
        return;
    }
    let name = hello.entity.name.clone();
    let session = hello.session.clone();

    // 2. register (replacing any older connection of the same agent)
    let (tx, mut rx) = mpsc::channel::<String>(OUTBOX);
    let id = sessions.next_id.fetch_add(1, Ordering::Relaxed);
    if sessions.conns.write().expect("conns lock").insert(name.clone(), Conn { id, tx: tx.clone() }).is_none() {
        state.metrics.agents_connected.inc();
    }
    state.agent_connected(hello.entity);
    let acked_up_to = match sessions.acked.lock().expect("acked lock").get(&name) {
        Some((s, seq)) if *s == session => *seq,
        _ => 0,
    };
    tracing::info!(agent = %name, %peer, %session, "agent connected");
    if sink.send(Message::Text(frame(&ServerMessage::Welcome { acked_up_to }).into())).await.is_err() {
        cleanup(&state, &sessions, &name, id);
        return;
    }
    // The agent's first keepalive follows at once; count this as one too so an agent
    // that reconnects is not reported stale in between.
    state.keepalive(&name, Vec::new());

    // 3. loop: frames in, frames out, acks when durable
    let mut flushed = state.persister.flushed.clone();
    let mut pending: VecDeque<(u64, u64)> = VecDeque::new(); // (durable seq, agent seq)
    let mut last_seq = acked_up_to;
    let mut deregistered = false;
    let close_reason: Option<String> = loop {
        // Acknowledge whatever is durable now; this also covers results whose covering
        // change was durable before they arrived (duplicates), when no flush will come.
        let durable = *flushed.borrow_and_update();
        let mut up_to = None;
        while let Some(&(d, s)) = pending.front() {
            if d > durable {
                break;
            }
            up_to = Some(s);
            pending.pop_front();
        }
        if let Some(up_to) = up_to {
            sessions.acked.lock().expect("acked lock").insert(name.clone(), (session.clone(), up_to));
            if sink.send(Message::Text(frame(&ServerMessage::Ack { up_to }).into())).await.is_err() {
                break None;
            }
        }
        tokio::select! {
            out = rx.recv() => {
                let Some(out) = out else { break None };
                if sink.send(Message::Text(out.into())).await.is_err() {
                    break None;
                }
            }
            _ = flushed.changed(), if !pending.is_empty() => {}
            msg = stream.next() => {
                let text = match msg {
                    None => break None,
                    Some(Err(e)) => break Some(format!("read error: {e}")),
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) => break None,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Binary(_))) => break Some("binary frames are not part of the protocol".into()),
                };
                match AgentMessage::parse(&text) {
                    Ok(AgentMessage::Keepalive(k)) => {
                        state.metrics.keepalives_received.inc();
                        state.keepalive(&name, k.metrics);
                    }
                    Ok(AgentMessage::Result { seq, result }) => {
                        if seq <= last_seq {
                            // Re-sent after a reconnect, already stored: acknowledge again.
                            state.metrics.results_duplicate.inc();
                            let durable = state.persister.mark_nothing();
                            pending.push_back((durable, seq));
                            continue;
                        }
                        last_seq = seq;
                        match state.ingest(Some(&name), result) {
                            Ok(durable) => pending.push_back((durable, seq)),
                            Err(e) => {
                                // A result we can never store: acknowledge so the agent
                                // does not re-send it forever, and say why.
                                tracing::warn!(agent = %name, error = %e, "result refused");
                                let durable = state.persister.mark_nothing();
                                pending.push_back((durable, seq));
                            }
                        }
                    }
                    Ok(AgentMessage::Deregister) => {
                        tracing::info!(agent = %name, "agent deregistered on clean stop");
                        deregistered = true;
                        break None;
                    }
                    Ok(AgentMessage::DbReport { cluster, status, error }) => {
                        state.databases.report(&name, cluster, status, error);
                    }
                    Ok(AgentMessage::DbOrderDone { id, ok, detail }) => state.databases.order_done(id, ok, detail),
                    Ok(AgentMessage::Hello(_)) => break Some("hello sent twice".into()),
                    Err(e) => break Some(format!("malformed frame: {e}")),
                }
            }
        }
    };
    if let Some(reason) = close_reason {
        state.metrics.agent_frames_rejected.inc();
        tracing::warn!(agent = %name, %peer, %reason, "closing agent connection");
        let _ = sink.send(Message::Text(frame(&ServerMessage::Error { message: reason }).into())).await;
    }
    let _ = sink.close().await;
    cleanup(&state, &sessions, &name, id);
    if deregistered {
        state.delete_entity(&name);
        sessions.acked.lock().expect("acked lock").remove(&name);
    }
}

async fn reject(
    sink: &mut futures_util::stream::SplitSink<WebSocket, Message>,
    state: &State,
    peer: &str,
    reason: &str,
) {
    state.metrics.agent_frames_rejected.inc();
    tracing::warn!(%peer, %reason, "refusing agent connection");
    let _ = sink.send(Message::Text(frame(&ServerMessage::Error { message: reason.to_string() }).into())).await;
    let _ = sink.close().await;
}

fn cleanup(state: &State, sessions: &Sessions, name: &str, id: u64) {
    let mut conns = sessions.conns.write().expect("conns lock");
    // Only the newest connection of an agent owns its registration.
    if conns.get(name).is_some_and(|c| c.id == id) {
        conns.remove(name);
        drop(conns);
        state.metrics.agents_connected.dec();
        state.agent_disconnected(name);
        tracing::info!(agent = %name, "agent disconnected");
    }
}
