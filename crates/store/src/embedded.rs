//! The embedded [`Store`]: one redb file on local disk, crash-safe, with etcd v3
//! semantics (see the crate docs).
//!
//! Layout, all in one redb file:
//! - `kv`: key -> 32-byte header (create_revision, mod_revision, version, lease as
//!   little-endian i64s, lease 0 = none) followed by the raw value.
//! - `meta`: `revision`, `compact_revision` (oldest revision whose history is kept) and
//!   `next_lease`.
//! - `leases`: lease id -> TTL in seconds. Deadlines live only in memory; on open every
//!   lease gets a fresh full TTL, as etcd does on a leader change.
//! - `lease_keys`: big-endian lease id ++ key -> (), so revoking a lease finds its keys
//!   without scanning `kv`.
//! - `history`: revision -> every event of that revision, replayed by watches that start
//!   in the past. Only the last `history_revisions` revisions are kept.
//!
//! Writes are group-committed: callers queue requests, one blocking "leader" drains the
//! queue and applies every queued request in a single redb write transaction (each
//! request still gets its own revision), commits once, publishes the events to watchers
//! and then answers. Under load this turns N fsyncs into one without changing semantics.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::{Compare, KeyValue, LeaseId, Op, Revision, Store, StoreError, TxnResponse, WatchEvent, WatchStream};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");
const LEASE_KEYS: TableDefinition<&[u8], ()> = TableDefinition::new("lease_keys");
const HISTORY: TableDefinition<i64, &[u8]> = TableDefinition::new("history");

const META_REVISION: &str = "revision";
const META_COMPACT: &str = "compact_revision";
const META_NEXT_LEASE: &str = "next_lease";

/// Events a watcher may have queued before it is cut off with `WatchLagged`.
const WATCH_CAPACITY: usize = 4096;
/// Revisions read per read transaction while replaying, so a long replay neither pins
/// one snapshot for its whole duration nor buffers all of history in memory.
const REPLAY_CHUNK: i64 = 256;
/// How late an expired lease may be noticed.
const REAP_INTERVAL: Duration = Duration::from_millis(100);
/// etcd's maximum lease TTL; also keeps `Instant + ttl` far from overflowing.
const MAX_TTL_SECS: u64 = 9_000_000_000;

const HEADER_LEN: usize = 32;
const TAG_PUT: u8 = 0;
const TAG_DELETE: u8 = 1;

/// Tuning for [`EmbeddedStore::open_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// How many recent revisions of history are kept for watches that start in the past.
    /// Older ones are deleted in batches, so slightly more may be kept.
    pub history_revisions: u64,
    /// Bytes of history kept, whichever limit is hit first. History holds whole values,
    /// so a busy control plane (thousands of event writes a second) would otherwise fill
    /// the disk long before the revision limit; watchers that fall further behind get
    /// `Compacted` and re-sync with a range read, as on etcd.
    pub history_max_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { history_revisions: 100_000, history_max_bytes: 64 * 1024 * 1024 }
    }
}

/// Encoded size of each kept history row, oldest first, to enforce the byte budget
/// without reading history back.
#[derive(Default)]
struct HistorySizes {
    rows: std::collections::VecDeque<(Revision, u64)>,
    total: u64,
}

/// The single-machine [`Store`], persisted in a redb file.
///
/// Dropping the last `Arc` closes the file (so it can be reopened), ends every watch
/// stream and stops the lease-expiry task.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

struct Inner {
    path: PathBuf,
    db: Database,
    history_revisions: i64,
    /// History is trimmed once this many revisions beyond `history_revisions` pile up,
    /// so trimming is an occasional range delete rather than one delete per write.
    compact_step: i64,
    history_max_bytes: u64,
    history_sizes: Mutex<HistorySizes>,
    queue: Mutex<WriteQueue>,
    hub: Mutex<Hub>,
    /// Shared with the expiry task, which must not keep `Inner` (and the file) alive.
    leases: Arc<Mutex<HashMap<LeaseId, LeaseState>>>,
}

struct LeaseState {
    ttl: u64,
    deadline: Instant,
}

#[derive(Default)]
struct WriteQueue {
    pending: Vec<Pending>,
    leader_running: bool,
}

struct Pending {
    req: WriteReq,
    reply: oneshot::Sender<Result<WriteOk, StoreError>>,
}

enum WriteReq {
    Txn { compares: Vec<Compare>, success: Vec<Op>, failure: Vec<Op> },
    LeaseGrant { ttl: u64 },
    LeaseRevoke { lease: LeaseId },
}

enum WriteOk {
    Txn { succeeded: bool, revision: Revision, changed: bool },
    LeaseGranted(LeaseId),
    LeaseRevoked,
}

/// What watchers see. Guarded by one mutex so that a watch registering "from now on"
/// and the writer publishing a revision cannot interleave: that is what makes replay +
/// live free of gaps and duplicates.
struct Hub {
    /// The last revision whose events were published (== committed revision).
    revision: Revision,
    compact_revision: Revision,
    watchers: Vec<Watcher>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
    min_revision: Revision,
}

impl Watcher {
    /// Returns whether the watcher stays registered. Never blocks: a full watcher is cut
    /// off instead, using the slot that is always kept free for the error.
    fn deliver(&self, batches: &[(Revision, Vec<WatchEvent>)]) -> bool {
        for (revision, events) in batches {
            if *revision < self.min_revision {
                continue;
            }
            for event in events {
                if !event.key().starts_with(&self.prefix) {
                    continue;
                }
                if self.tx.capacity() <= 1 {
                    let _ = self.tx.try_send(Err(StoreError::WatchLagged));
                    return false;
                }
                if self.tx.try_send(Ok(event.clone())).is_err() {
                    return false;
                }
            }
        }
        !self.tx.is_closed()
    }
}

fn backend(e: impl fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("corrupt {what} record"))
}

// A panic while a lock is held leaves the guarded data consistent enough (every update is
// a single assignment or push), and poisoning would turn one bug into a dead store.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn deadline_after(now: Instant, ttl: u64) -> Instant {
    now + Duration::from_secs(ttl)
}

impl EmbeddedStore {
    /// Opens (creating if missing) the store at `path` with default options. Must be
    /// called inside a tokio runtime: the lease-expiry task is spawned on it.
    pub fn open(path: &Path) -> Result<Arc<EmbeddedStore>, StoreError> {
        Self::open_with(path, StoreOptions::default())
    }

    pub fn open_with(path: &Path, options: StoreOptions) -> Result<Arc<EmbeddedStore>, StoreError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Backend("EmbeddedStore::open must be called inside a tokio runtime".into()))?;
        let db = Database::create(path).map_err(backend)?;

        let wtx = db.begin_write().map_err(backend)?;
        let mut sizes = HistorySizes::default();
        let (revision, compact_revision, persisted_leases) = {
            let mut tables = Tables::open(&wtx)?;
            for row in tables.history.iter().map_err(backend)? {
                let (rev, value) = row.map_err(backend)?;
                let len = value.value().len() as u64;
                sizes.rows.push_back((rev.value(), len));
                sizes.total += len;
            }
            // etcd starts an empty store at revision 1; history of revision 1 is empty.
            let revision = tables.meta_or_init(META_REVISION, 1)?;
            let compact = tables.meta_or_init(META_COMPACT, 1)?;
            tables.meta_or_init(META_NEXT_LEASE, 1)?;
            let mut leases = Vec::new();
            for row in tables.leases.iter().map_err(backend)? {
                let (id, ttl) = row.map_err(backend)?;
                leases.push((id.value(), ttl.value()));
            }
            (revision, compact, leases)
        };
        wtx.commit().map_err(backend)?;

        let now = Instant::now();
        let leases: HashMap<LeaseId, LeaseState> = persisted_leases
            .into_iter()
            .map(|(id, ttl)| (id, LeaseState { ttl, deadline: deadline_after(now, ttl) }))
            .collect();

        let history_revisions = i64::try_from(options.history_revisions.max(1)).unwrap_or(i64::MAX / 2);
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            db,
            history_revisions,
            compact_step: (history_revisions / 16).clamp(1, 1024),
            history_max_bytes: options.history_max_bytes.max(1),
            history_sizes: Mutex::new(sizes),
            queue: Mutex::new(WriteQueue::default()),
            hub: Mutex::new(Hub { revision, compact_revision, watchers: Vec::new() }),
            leases: Arc::new(Mutex::new(leases)),
        });
        runtime.spawn(reap_leases(Arc::downgrade(&inner), Arc::clone(&inner.leases)));
        Ok(Arc::new(EmbeddedStore { inner }))
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend(format!("read task failed: {e}")))?
    }

    async fn write_txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<(bool, Revision, bool), StoreError> {
        match self.inner.submit(WriteReq::Txn { compares, success, failure }).await? {
            WriteOk::Txn { succeeded, revision, changed } => Ok((succeeded, revision, changed)),
            _ => Err(StoreError::Backend("writer answered a txn with a lease result".into())),
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        self.read(move |inner| inner.get(&key)).await
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let prefix = prefix.to_owned();
        self.read(move |inner| inner.range(&prefix)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        let op = Op::Put { key: key.to_owned(), value, lease };
        let (_, revision, _) = self.write_txn(Vec::new(), vec![op], Vec::new()).await?;
        Ok(revision)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let (_, _, changed) = self.write_txn(Vec::new(), vec![Op::delete(key)], Vec::new()).await?;
        Ok(changed)
    }

    async fn txn(&self, compares: Vec<Compare>, success: Vec<Op>, failure: Vec<Op>) -> Result<TxnResponse, StoreError> {
        let (succeeded, revision, _) = self.write_txn(compares, success, failure).await?;
        Ok(TxnResponse { succeeded, revision })
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        Ok(lock(&self.inner.hub).revision)
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchStream, StoreError> {
        let (tx, rx) = mpsc::channel(WATCH_CAPACITY);
        {
            let mut hub = lock(&self.inner.hub);
            if from_revision <= 0 || from_revision > hub.revision {
                hub.watchers.push(Watcher { prefix: prefix.to_owned(), tx, min_revision: from_revision.max(0) });
                return Ok(rx);
            }
            if from_revision < hub.compact_revision {
                return Err(StoreError::Compacted { requested: from_revision, compact_revision: hub.compact_revision });
            }
        }
        tokio::spawn(replay(Arc::downgrade(&self.inner), prefix.to_owned(), from_revision, tx));
        Ok(rx)
    }

    async fn lease_grant(&self, ttl_secs: u64) -> Result<LeaseId, StoreError> {
        let ttl = ttl_secs.clamp(1, MAX_TTL_SECS);
        match self.inner.submit(WriteReq::LeaseGrant { ttl }).await? {
            WriteOk::LeaseGranted(id) => Ok(id),
            _ => Err(StoreError::Backend("writer answered a lease grant with another result".into())),
        }
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut leases = lock(&self.inner.leases);
        match leases.get_mut(&lease) {
            // Past its deadline the lease is dead even if the reaper has not run yet.
            Some(state) if state.deadline > now => {
                state.deadline = deadline_after(now, state.ttl);
                Ok(state.ttl)
            }
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.submit(WriteReq::LeaseRevoke { lease }).await.map(|_| ())
    }
}

impl Inner {
    fn enqueue(self: &Arc<Self>, req: WriteReq) -> oneshot::Receiver<Result<WriteOk, StoreError>> {
        let (reply, rx) = oneshot::channel();
        let start_leader = {
            let mut queue = lock(&self.queue);
            queue.pending.push(Pending { req, reply });
            !std::mem::replace(&mut queue.leader_running, true)
        };
        if start_leader {
            let inner = Arc::clone(self);
            tokio::task::spawn_blocking(move || Inner::lead(inner));
        }
        rx
    }

    async fn submit(self: &Arc<Self>, req: WriteReq) -> Result<WriteOk, StoreError> {
        self.enqueue(req).await.map_err(|_| StoreError::Backend("write abandoned: the writer failed".into()))?
    }

    /// Runs on a blocking thread while the queue has work; at most one leader exists.
    fn lead(inner: Arc<Inner>) {
        let guard = LeaderGuard(&inner);
        loop {
            let batch = std::mem::take(&mut lock(&inner.queue).pending);
            let replies = inner.run_batch(batch);
            let more = {
                let mut queue = lock(&inner.queue);
                queue.leader_running = !queue.pending.is_empty();
                queue.leader_running
            };
            if !more {
                // Let go of the store before answering: a caller that drops its handle
                // and reopens the file right after its write returns must find it closed.
                drop(guard);
                drop(inner);
                send_replies(replies);
                return;
            }
            send_replies(replies);
        }
    }

    fn run_batch(&self, batch: Vec<Pending>) -> Vec<Reply> {
        let (reqs, senders): (Vec<WriteReq>, Vec<_>) = batch.into_iter().map(|p| (p.req, p.reply)).unzip();
        match self.apply_batch(reqs) {
            Ok(results) => senders.into_iter().zip(results).collect(),
            Err(message) => senders.into_iter().map(|s| (s, Err(StoreError::Backend(message.clone())))).collect(),
        }
    }

    /// Applies every request in one redb write transaction. The outer error aborts the
    /// whole batch (nothing is committed); inner errors belong to one request, which then
    /// has written nothing, because requests validate before they write.
    fn apply_batch(&self, reqs: Vec<WriteReq>) -> Result<Vec<Result<WriteOk, StoreError>>, String> {
        let wtx = self.db.begin_write().map_err(|e| e.to_string())?;
        let mut results = Vec::with_capacity(reqs.len());
        let mut published: Vec<(Revision, Vec<WatchEvent>)> = Vec::new();
        let mut granted: Vec<(LeaseId, u64)> = Vec::new();
        let mut revoked: Vec<LeaseId> = Vec::new();
        let mut new_rows: Vec<(Revision, u64)> = Vec::new();
        // Only the write leader runs here, so holding this for the batch costs nothing.
        let mut sizes = lock(&self.history_sizes);

        let outcome: Result<(Revision, Revision, bool), StoreError> = (|| {
            let mut t = Tables::open(&wtx)?;
            let mut revision = t.meta(META_REVISION)?.unwrap_or(1);
            let mut compact = t.meta(META_COMPACT)?.unwrap_or(1);
            let mut dirty = false;
            for req in reqs {
                let next = revision + 1;
                let mut events = Vec::new();
                let result = match req {
                    WriteReq::Txn { compares, success, failure } => {
                        t.txn(next, compares, success, failure, &self.leases, &mut events).map(|succeeded| {
                            let changed = !events.is_empty();
                            let revision = if changed { next } else { revision };
                            WriteOk::Txn { succeeded, revision, changed }
                        })
                    }
                    WriteReq::LeaseGrant { ttl } => t.grant(ttl).map(|id| {
                        granted.push((id, ttl));
                        WriteOk::LeaseGranted(id)
                    }),
                    WriteReq::LeaseRevoke { lease } => t.revoke(next, lease, &mut events).map(|()| {
                        revoked.push(lease);
                        WriteOk::LeaseRevoked
                    }),
                };
                if let Err(StoreError::Backend(e)) = result {
                    return Err(StoreError::Backend(e));
                }
                dirty |= result.is_ok() && !matches!(result, Ok(WriteOk::Txn { changed: false, .. }));
                if !events.is_empty() {
                    revision = next;
                    let encoded = encode_events(&events)?;
                    new_rows.push((revision, encoded.len() as u64));
                    t.history.insert(revision, encoded.as_slice()).map_err(backend)?;
                    published.push((revision, events));
                }
                results.push(result);
            }
            let mut new_compact = compact;
            if revision - compact >= self.history_revisions + self.compact_step {
                new_compact = revision - self.history_revisions + 1;
            }
            let mut total = sizes.total + new_rows.iter().map(|r| r.1).sum::<u64>();
            let max = self.history_max_bytes;
            if new_compact > compact || total > max + max / 16 {
                for &(r, len) in sizes.rows.iter().chain(new_rows.iter()) {
                    // Always keep the newest revision: a compact point past it would be in
                    // the future.
                    if r >= revision || (r >= new_compact && total <= max) {
                        break;
                    }
                    total -= len;
                    new_compact = new_compact.max(r + 1);
                }
            }
            if new_compact > compact {
                compact = new_compact;
                dirty = true;
                t.history.retain_in::<i64, _>(..compact, |_, _| false).map_err(backend)?;
                t.meta.insert(META_COMPACT, compact).map_err(backend)?;
            }
            if dirty {
                t.meta.insert(META_REVISION, revision).map_err(backend)?;
            }
            Ok((revision, compact, dirty))
        })();

        let (revision, compact, dirty) = outcome.map_err(|e| match e {
            StoreError::Backend(message) => message,
            other => other.to_string(),
        })?;
        if dirty {
            wtx.commit().map_err(|e| e.to_string())?;
            sizes.rows.extend(new_rows.iter().copied());
            sizes.total += new_rows.iter().map(|r| r.1).sum::<u64>();
            while let Some(&(r, len)) = sizes.rows.front() {
                if r >= compact {
                    break;
                }
                sizes.total -= len;
                sizes.rows.pop_front();
            }
            drop(sizes);
        } else {
            // Nothing changed (failed CAS with an empty branch, deleting missing keys, ...):
            // skip the fsync.
            wtx.abort().map_err(|e| e.to_string())?;
        }

        if !granted.is_empty() || !revoked.is_empty() {
            let now = Instant::now();
            let mut leases = lock(&self.leases);
            for (id, ttl) in granted {
                leases.insert(id, LeaseState { ttl, deadline: deadline_after(now, ttl) });
            }
            for id in revoked {
                leases.remove(&id);
            }
        }

        let mut hub = lock(&self.hub);
        hub.revision = revision;
        hub.compact_revision = compact;
        if !published.is_empty() {
            hub.watchers.retain(|w| w.deliver(&published));
        }
        Ok(results)
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let kv = rtx.open_table(KV).map_err(backend)?;
        let found = kv.get(key).map_err(backend)?;
        found.map(|g| decode_kv(key, g.value())).transpose()
    }

    fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let revision =
            rtx.open_table(META).map_err(backend)?.get(META_REVISION).map_err(backend)?.map_or(1, |g| g.value());
        let kv = rtx.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for row in kv.range::<&str>(prefix..).map_err(backend)? {
            let (key, value) = row.map_err(backend)?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            out.push(decode_kv(key, value.value())?);
        }
        Ok((out, revision))
    }

    fn read_history(&self, prefix: &str, from: Revision, to: Revision) -> Result<Vec<WatchEvent>, StoreError> {
        let rtx = self.db.begin_read().map_err(backend)?;
        let compact =
            rtx.open_table(META).map_err(backend)?.get(META_COMPACT).map_err(backend)?.map_or(1, |g| g.value());
        // History may have been trimmed since the watch started.
        if from < compact {
            return Err(StoreError::Compacted { requested: from, compact_revision: compact });
        }
        let history = rtx.open_table(HISTORY).map_err(backend)?;
        let mut out = Vec::new();
        for row in history.range(from..=to).map_err(backend)? {
            let (revision, events) = row.map_err(backend)?;
            decode_events(revision.value(), events.value(), prefix, &mut out)?;
        }
        Ok(out)
    }
}

type Reply = (oneshot::Sender<Result<WriteOk, StoreError>>, Result<WriteOk, StoreError>);

fn send_replies(replies: Vec<Reply>) {
    for (tx, result) in replies {
        let _ = tx.send(result);
    }
}

/// If the leader panics, queued callers get an error instead of waiting forever, and the
/// next write starts a new leader.
struct LeaderGuard<'a>(&'a Inner);

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut queue = lock(&self.0.queue);
            queue.leader_running = false;
            queue.pending.clear();
        }
    }
}

/// Streams history from `next` to the current revision, then hands the watcher to the
/// writer. Holds only a `Weak` so a watcher that never reads cannot keep the store open.
async fn replay(
    store: Weak<Inner>,
    prefix: String,
    mut next: Revision,
    tx: mpsc::Sender<Result<WatchEvent, StoreError>>,
) {
    loop {
        let Some(inner) = store.upgrade() else { return };
        let upto = {
            let mut hub = lock(&inner.hub);
            if hub.revision < next {
                // Caught up. Registering under the hub lock means the writer publishes
                // exactly the revisions after the last one replayed.
                hub.watchers.push(Watcher { prefix, tx, min_revision: next });
                return;
            }
            hub.revision.min(next + REPLAY_CHUNK - 1)
        };
        let chunk_prefix = prefix.clone();
        let chunk = tokio::task::spawn_blocking(move || inner.read_history(&chunk_prefix, next, upto)).await;
        let events = match chunk {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(StoreError::Backend(format!("watch replay failed: {e}")))).await;
                return;
            }
        };
        for event in events {
            // Keep one slot free so a later WatchLagged from the writer always fits.
            let Ok(mut permits) = tx.reserve_many(2).await else { return };
            if let Some(permit) = permits.next() {
                permit.send(Ok(event));
            }
        }
        next = upto + 1;
    }
}

/// Revokes expired leases through the normal write path, so their keys' deletions get a
/// revision and reach watchers. Exits once the store is dropped.
async fn reap_leases(store: Weak<Inner>, leases: Arc<Mutex<HashMap<LeaseId, LeaseState>>>) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if store.strong_count() == 0 {
            return;
        }
        let now = Instant::now();
        let expired: Vec<LeaseId> =
            lock(&leases).iter().filter(|(_, s)| s.deadline <= now).map(|(id, _)| *id).collect();
        if expired.is_empty() {
            continue;
        }
        let Some(inner) = store.upgrade() else { return };
        // Queue them all before waiting so they share one commit.
        let replies: Vec<_> =
            expired.iter().map(|&lease| (lease, inner.enqueue(WriteReq::LeaseRevoke { lease }))).collect();
        drop(inner);
        for (lease, reply) in replies {
            match reply.await {
                Ok(Ok(_)) | Ok(Err(StoreError::LeaseNotFound(_))) => {}
                Ok(Err(e)) => tracing::warn!(lease, error = %e, "revoking an expired lease failed; will retry"),
                Err(_) => tracing::warn!(lease, "revoking an expired lease was abandoned; will retry"),
            }
        }
    }
}

struct Tables<'txn> {
    kv: redb::Table<'txn, &'static str, &'static [u8]>,
    meta: redb::Table<'txn, &'static str, i64>,
    leases: redb::Table<'txn, i64, u64>,
    lease_keys: redb::Table<'txn, &'static [u8], ()>,
    history: redb::Table<'txn, i64, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(wtx: &'txn WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            kv: wtx.open_table(KV).map_err(backend)?,
            meta: wtx.open_table(META).map_err(backend)?,
            leases: wtx.open_table(LEASES).map_err(backend)?,
            lease_keys: wtx.open_table(LEASE_KEYS).map_err(backend)?,
            history: wtx.open_table(HISTORY).map_err(backend)?,
        })
    }

    fn meta(&self, name: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.meta.get(name).map_err(backend)?.map(|g| g.value()))
    }

    fn meta_or_init(&mut self, name: &str, initial: i64) -> Result<i64, StoreError> {
        match self.meta(name)? {
            Some(v) => Ok(v),
            None => {
                self.meta.insert(name, initial).map_err(backend)?;
                Ok(initial)
            }
        }
    }

    fn header(&self, key: &str) -> Result<Option<Header>, StoreError> {
        self.kv.get(key).map_err(backend)?.map(|g| Header::decode(g.value())).transpose()
    }

    fn compare(&self, compare: &Compare) -> Result<bool, StoreError> {
        let (Compare::Exists(key) | Compare::Missing(key) | Compare::ModRevision(key, _) | Compare::Value(key, _)) =
            compare;
        let found = self.kv.get(key.as_str()).map_err(backend)?;
        let bytes = found.as_ref().map(|g| g.value());
        Ok(match compare {
            Compare::Exists(_) => bytes.is_some(),
            Compare::Missing(_) => bytes.is_none(),
            Compare::ModRevision(_, want) => match bytes {
                None => *want == 0,
                Some(b) => Header::decode(b)?.mod_revision == *want,
            },
            Compare::Value(_, want) => bytes.and_then(|b| b.get(HEADER_LEN..)) == Some(want.as_slice()),
        })
    }

    /// Runs one txn at revision `next`; returns whether the compares held.
    fn txn(
        &mut self,
        next: Revision,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
        live_leases: &Mutex<HashMap<LeaseId, LeaseState>>,
        events: &mut Vec<WatchEvent>,
    ) -> Result<bool, StoreError> {
        let mut succeeded = true;
        for compare in &compares {
            if !self.compare(compare)? {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { success } else { failure };

        // Validate before writing anything so a bad lease fails the txn cleanly.
        let mut checked = HashSet::new();
        for op in &ops {
            if let Op::Put { lease: Some(lease), .. } = op
                && checked.insert(*lease)
                && !self.lease_alive(*lease, live_leases)?
            {
                return Err(StoreError::LeaseNotFound(*lease));
            }
        }

        for op in ops {
            match op {
                Op::Put { key, value, lease } => self.put(next, key, value, lease, events)?,
                Op::Delete { key } => self.delete(next, key, events)?,
                Op::DeletePrefix { prefix } => {
                    for key in self.keys_with_prefix(&prefix)? {
                        self.delete(next, key, events)?;
                    }
                }
            }
        }
        Ok(succeeded)
    }

    fn lease_alive(&self, lease: LeaseId, live: &Mutex<HashMap<LeaseId, LeaseState>>) -> Result<bool, StoreError> {
        if self.leases.get(lease).map_err(backend)?.is_none() {
            return Ok(false);
        }
        // A lease granted earlier in this batch is persisted but not yet in memory.
        let now = Instant::now();
        Ok(lock(live).get(&lease).is_none_or(|s| s.deadline > now))
    }

    fn put(
        &mut self,
        revision: Revision,
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        events: &mut Vec<WatchEvent>,
    ) -> Result<(), StoreError> {
        let old = self.header(&key)?;
        let header = Header {
            create_revision: old.as_ref().map_or(revision, |h| h.create_revision),
            mod_revision: revision,
            version: old.as_ref().map_or(1, |h| h.version + 1),
            lease,
        };
        let mut buf = Vec::with_capacity(HEADER_LEN + value.len());
        header.encode(&mut buf);
        buf.extend_from_slice(&value);
        self.kv.insert(key.as_str(), buf.as_slice()).map_err(backend)?;

        // Like etcd, a put without a lease detaches the key from its old lease.
        let old_lease = old.and_then(|h| h.lease);
        if old_lease != lease {
            if let Some(old_lease) = old_lease {
                self.lease_keys.remove(lease_key(old_lease, &key).as_slice()).map_err(backend)?;
            }
            if let Some(lease) = lease {
                self.lease_keys.insert(lease_key(lease, &key).as_slice(), ()).map_err(backend)?;
            }
        }
        events.push(WatchEvent::Put(KeyValue {
            key,
            value,
            create_revision: header.create_revision,
            mod_revision: revision,
            version: header.version,
            lease,
        }));
        Ok(())
    }

    fn delete(&mut self, revision: Revision, key: String, events: &mut Vec<WatchEvent>) -> Result<(), StoreError> {
        let removed = self.kv.remove(key.as_str()).map_err(backend)?.map(|g| Header::decode(g.value())).transpose()?;
        let Some(header) = removed else { return Ok(()) };
        if let Some(lease) = header.lease {
            self.lease_keys.remove(lease_key(lease, &key).as_slice()).map_err(backend)?;
        }
        events.push(WatchEvent::Delete { key, mod_revision: revision });
        Ok(())
    }

    fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        for row in self.kv.range::<&str>(prefix..).map_err(backend)? {
            let (key, _) = row.map_err(backend)?;
            let key = key.value();
            if !key.starts_with(prefix) {
                break;
            }
            keys.push(key.to_owned());
        }
        Ok(keys)
    }

    fn grant(&mut self, ttl: u64) -> Result<LeaseId, StoreError> {
        let id = self.meta(META_NEXT_LEASE)?.unwrap_or(1);
        self.meta.insert(META_NEXT_LEASE, id + 1).map_err(backend)?;
        self.leases.insert(id, ttl).map_err(backend)?;
        Ok(id)
    }

    fn revoke(&mut self, revision: Revision, lease: LeaseId, events: &mut Vec<WatchEvent>) -> Result<(), StoreError> {
        if self.leases.remove(lease).map_err(backend)?.is_none() {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let prefix = lease_key(lease, "");
        let mut index_rows = Vec::new();
        for row in self.lease_keys.range::<&[u8]>(prefix.as_slice()..).map_err(backend)? {
            let (row_key, _) = row.map_err(backend)?;
            let row_key = row_key.value();
            if !row_key.starts_with(&prefix) {
                break;
            }
            index_rows.push(row_key.to_vec());
        }
        for row_key in index_rows {
            let key = String::from_utf8(row_key[prefix.len()..].to_vec()).map_err(|_| corrupt("lease index"))?;
            // Remove the index row even if the key is somehow gone or re-leased.
            self.lease_keys.remove(row_key.as_slice()).map_err(backend)?;
            if self.header(&key)?.is_some_and(|h| h.lease == Some(lease)) {
                self.delete(revision, key, events)?;
            }
        }
        Ok(())
    }
}

fn lease_key(lease: LeaseId, key: &str) -> Vec<u8> {
    // Big-endian so one lease's rows are contiguous (ids are always positive).
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&lease.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out
}

struct Header {
    create_revision: Revision,
    mod_revision: Revision,
    version: i64,
    lease: Option<LeaseId>,
}

impl Header {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.create_revision.to_le_bytes());
        out.extend_from_slice(&self.mod_revision.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.lease.unwrap_or(0).to_le_bytes());
    }

    fn decode(bytes: &[u8]) -> Result<Header, StoreError> {
        let mut r = Reader { buf: bytes, what: "kv" };
        Ok(Header {
            create_revision: r.i64()?,
            mod_revision: r.i64()?,
            version: r.i64()?,
            lease: lease_from_raw(r.i64()?),
        })
    }
}

fn lease_from_raw(raw: i64) -> Option<LeaseId> {
    (raw != 0).then_some(raw)
}

fn decode_kv(key: &str, bytes: &[u8]) -> Result<KeyValue, StoreError> {
    let header = Header::decode(bytes)?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: bytes[HEADER_LEN..].to_vec(),
        create_revision: header.create_revision,
        mod_revision: header.mod_revision,
        version: header.version,
        lease: header.lease,
    })
}

/// History row: u32 event count, then per event a tag, a u32-length-prefixed key and,
/// for puts, create_revision, version, lease (i64s) and a u32-length-prefixed value. The
/// mod_revision is the row's key.
fn encode_events(events: &[WatchEvent]) -> Result<Vec<u8>, StoreError> {
    let size: usize = 4 + events
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) => 1 + 4 + kv.key.len() + 24 + 4 + kv.value.len(),
            WatchEvent::Delete { key, .. } => 1 + 4 + key.len(),
        })
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    put_len(&mut out, events.len())?;
    for event in events {
        match event {
            WatchEvent::Put(kv) => {
                out.push(TAG_PUT);
                put_bytes(&mut out, kv.key.as_bytes())?;
                out.extend_from_slice(&kv.create_revision.to_le_bytes());
                out.extend_from_slice(&kv.version.to_le_bytes());
                out.extend_from_slice(&kv.lease.unwrap_or(0).to_le_bytes());
                put_bytes(&mut out, &kv.value)?;
            }
            WatchEvent::Delete { key, .. } => {
                out.push(TAG_DELETE);
                put_bytes(&mut out, key.as_bytes())?;
            }
        }
    }
    Ok(out)
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<(), StoreError> {
    let len = u32::try_from(len).map_err(|_| StoreError::Backend(format!("{len} does not fit a history record")))?;
    out.extend_from_slice(&len.to_le_bytes());
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), StoreError> {
    put_len(out, bytes.len())?;
    out.extend_from_slice(bytes);
    Ok(())
}

/// Appends the events of one history row whose key starts with `prefix`; values of
/// other keys are skipped without copying.
fn decode_events(revision: Revision, bytes: &[u8], prefix: &str, out: &mut Vec<WatchEvent>) -> Result<(), StoreError> {
    let mut r = Reader { buf: bytes, what: "history" };
    let count = r.u32()?;
    for _ in 0..count {
        let tag = r.u8()?;
        let key = r.bytes()?;
        let wanted = key.starts_with(prefix.as_bytes());
        let key_string = || std::str::from_utf8(key).map(str::to_owned).map_err(|_| corrupt("history"));
        match tag {
            TAG_PUT => {
                let create_revision = r.i64()?;
                let version = r.i64()?;
                let lease = lease_from_raw(r.i64()?);
                let value = r.bytes()?;
                if wanted {
                    out.push(WatchEvent::Put(KeyValue {
                        key: key_string()?,
                        value: value.to_vec(),
                        create_revision,
                        mod_revision: revision,
                        version,
                        lease,
                    }));
                }
            }
            TAG_DELETE => {
                if wanted {
                    out.push(WatchEvent::Delete { key: key_string()?, mod_revision: revision });
                }
            }
            _ => return Err(corrupt("history")),
        }
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        let (head, rest) = self.buf.split_first_chunk::<N>().ok_or_else(|| corrupt(self.what))?;
        self.buf = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, StoreError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let len = self.u32()? as usize;
        let (head, rest) = self.buf.split_at_checked(len).ok_or_else(|| corrupt(self.what))?;
        self.buf = rest;
        Ok(head)
    }
}
