//! `GET /api/v1/watch`: member health for data planes (proxies, name servers), as a
//! snapshot followed by changes, over a WebSocket — the shape of Envoy's xDS, small.
//!
//! A watcher that falls more than the backlog behind is sent a fresh snapshot rather
//! than dropped, so a consumer only ever has to handle "replace everything" and
//! "change one".

use crate::state::State;
use axum::extract::ws::{Message, WebSocket};
use drover_core::health::WatchMessage;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

fn frame(m: &WatchMessage) -> Message {
    Message::Text(serde_json::to_string(m).expect("watch messages always serialize").into())
}

pub async fn serve(mut socket: WebSocket, state: Arc<State>, peer: String) {
    let (snapshot, mut rx) = state.watch();
    if let WatchMessage::Snapshot { members, .. } = &snapshot {
        tracing::info!(%peer, members = members.len(), "watcher connected");
    }
    if socket.send(frame(&snapshot)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            change = rx.recv() => {
                let msg = match change {
                    Ok(m) => m,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(%peer, missed = n, "watcher fell behind; sending a fresh snapshot");
                        let (snapshot, fresh) = state.watch();
                        rx = fresh;
                        snapshot
                    }
                    Err(RecvError::Closed) => break,
                };
                if socket.send(frame(&msg)).await.is_err() {
                    break;
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                // Watchers have nothing to say; pings are answered by the library.
                Some(Ok(_)) => {}
            },
        }
    }
    tracing::info!(%peer, "watcher disconnected");
}
