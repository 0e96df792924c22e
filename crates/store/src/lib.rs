//! drover-store: the control plane's storage, shaped like etcd.
//!
//! All server logic talks to [`Store`]: ranges by prefix, revisions, compare-and-swap
//! transactions, watches from a revision, and leases with a TTL. Two implementations
//! are meant to be interchangeable:
//! - [`embedded::EmbeddedStore`]: one machine, on disk in a redb file, crash-safe
//!   (every commit is durable before it returns).
//! - an etcd implementation (a later issue) for several servers.
//!
//! Semantics follow etcd v3 so that code written against the embedded store behaves
//! the same on etcd: one global, monotonically increasing revision; every write
//! transaction bumps it by one; each key records `create_revision`, `mod_revision` and
//! `version`; a watch from revision R first replays every change with revision >= R,
//! then streams live changes, in revision order.
#![forbid(unsafe_code)]

pub mod embedded;

use async_trait::async_trait;
use tokio::sync::mpsc;

/// The store's logical clock. Starts at 1 for an empty store (like etcd).
pub type Revision = i64;
pub type LeaseId = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// Number of writes since creation (1 after the first put).
    pub version: i64,
    /// Lease the key is attached to; the key is deleted when the lease expires.
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction; all must hold for the success branch to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key exists.
    Exists(String),
    /// The key does not exist.
    Missing(String),
    /// The key's mod_revision equals this (0 means missing, like etcd).
    ModRevision(String, Revision),
    /// The key's value equals this.
    Value(String, Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put { key: String, value: Vec<u8>, lease: Option<LeaseId> },
    Delete { key: String },
    DeletePrefix { prefix: String },
}

impl Op {
    pub fn put(key: impl Into<String>, value: Vec<u8>) -> Op {
        Op::Put { key: key.into(), value, lease: None }
    }
    pub fn delete(key: impl Into<String>) -> Op {
        Op::Delete { key: key.into() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the compares held (and the success ops ran).
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    /// `mod_revision` is the revision of the deletion.
    Delete {
        key: String,
        mod_revision: Revision,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Live changes under a prefix. Closed when the store shuts down; an `Err` item
/// (e.g. the watcher fell too far behind) ends the stream and the watcher must re-sync
/// with a fresh `range` and watch from its revision + 1.
pub type WatchStream = mpsc::Receiver<Result<WatchEvent, StoreError>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision was compacted away; re-read with `range` and watch from
    /// the returned revision + 1.
    #[error("revision {requested} is compacted (oldest kept is {compact_revision})")]
    Compacted { requested: Revision, compact_revision: Revision },
    #[error("lease {0} not found or expired")]
    LeaseNotFound(LeaseId),
    /// A watcher did not keep up and was cut off; it must re-sync.
    #[error("watcher fell behind and was cancelled")]
    WatchLagged,
    #[error("store is closed")]
    Closed,
    /// Disk, corruption or backend failure. Retrying may help for a remote backend.
    #[error("storage backend failed: {0}")]
    Backend(String),
}

/// The store every control-plane component is written against.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Every key starting with `prefix`, sorted by key, and the revision they were read at.
    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError>;
    /// Returns whether the key existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;
    /// Atomically: if every compare holds run `success`, else `failure`. All ops of a
    /// branch share one new revision; a branch with no writes does not bump it.
    async fn txn(&self, compares: Vec<Compare>, success: Vec<Op>, failure: Vec<Op>) -> Result<TxnResponse, StoreError>;
    /// The current revision.
    async fn revision(&self) -> Result<Revision, StoreError>;
    /// Changes under `prefix` with revision >= `from_revision` (0 means from now on).
    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream, StoreError>;
    async fn lease_grant(&self, ttl_secs: u64) -> Result<LeaseId, StoreError>;
    /// Renews the lease to its full TTL; returns the TTL in seconds.
    async fn lease_keepalive(&self, lease: LeaseId) -> Result<u64, StoreError>;
    /// Ends the lease now, deleting its keys.
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError>;
}

/// JSON helpers: resources are stored as JSON so `etcdctl get` stays readable.
pub fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("resource types always serialize")
}

pub fn from_json<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(&kv.value).map_err(|e| StoreError::Backend(format!("corrupt value at {}: {e}", kv.key)))
}
