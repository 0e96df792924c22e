//! Errors, classified the way pingora does: which side failed and whether another
//! backend may be tried.

use drover_core::config::ConfigError;
use std::net::SocketAddr;

/// Starting, reloading or stopping the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind { name: String, addr: SocketAddr, source: std::io::Error },
    #[error("listener `{name}`: TLS: {message}")]
    Tls { name: String, message: String },
    #[error("cannot start the connection worker threads: {0}")]
    Workers(std::io::Error),
    /// Listeners are bound once; changing them needs a restart.
    #[error("reload: {0}")]
    Reload(String),
}

/// Who is to blame for a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
    Config,
}

/// Why one forwarded request or connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no route for host `{host}` path `{path}`")]
    NoRoute { host: String, path: String },
    #[error("no healthy backend for service `{0}`")]
    NoHealthyBackend(String),
    /// Every backend stayed at `max_in_flight_per_backend` for `queue_timeout_ms`.
    #[error("every backend of service `{0}` is at its in-flight limit")]
    Saturated(String),
    #[error("backend {addr}: connect failed: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The connection broke after the request (or part of it) was written and before
    /// any response byte.
    #[error("backend {addr}: connection lost before the response: {reason}")]
    Reset { addr: SocketAddr, reason: String },
    #[error("backend {addr}: no response head within {ms} ms")]
    Timeout { addr: SocketAddr, ms: u64 },
    #[error("reading the request body: {0}")]
    ClientBody(String),
    /// The client stopped sending a request body that was being streamed.
    #[error("reading the request body: {0}")]
    ClientStalled(String),
}

impl ForwardError {
    pub fn side(&self) -> Side {
        match self {
            ForwardError::NoRoute { .. } => Side::Config,
            ForwardError::ClientBody(_) | ForwardError::ClientStalled(_) => Side::Client,
            _ => Side::Backend,
        }
    }

    /// Whether another backend may be tried, given whether the request may be sent twice.
    pub fn retryable(&self, replayable: bool) -> bool {
        match self {
            // Nothing reached the backend.
            ForwardError::Connect { .. } => true,
            ForwardError::Reset { .. } => replayable,
            _ => false,
        }
    }

    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ForwardError::NoRoute { .. } => S::NOT_FOUND,
            ForwardError::NoHealthyBackend(_) | ForwardError::Saturated(_) => S::SERVICE_UNAVAILABLE,
            ForwardError::Connect { .. } | ForwardError::Reset { .. } => S::BAD_GATEWAY,
            ForwardError::Timeout { .. } => S::GATEWAY_TIMEOUT,
            ForwardError::ClientBody(_) => S::BAD_REQUEST,
            ForwardError::ClientStalled(_) => S::REQUEST_TIMEOUT,
        }
    }
}
