//! Group commit: many in-memory changes, one store transaction.
//!
//! Ingesting a result changes an event in memory and marks its key dirty. The flusher
//! wakes every `FLUSH_INTERVAL` (or when enough keys are dirty), renders the *current*
//! value of each dirty key (so ten results for one event cost one write), commits them
//! in one transaction, and then publishes the highest change sequence it made durable.
//! Agents are acknowledged only up to that sequence, which is what makes delivery
//! at-least-once across a server crash.

use drover_store::{Op, Store};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};

const FLUSH_INTERVAL: Duration = Duration::from_millis(10);
const EAGER_FLUSH_KEYS: usize = 4096;

/// Renders the value a dirty key should have now; `None` deletes it.
pub trait Render: Send + Sync + 'static {
    fn render(&self, key: &str) -> Option<Vec<u8>>;
}

pub struct Persister {
    dirty: Mutex<HashSet<String>>,
    /// Sequence of the latest change marked dirty.
    seq: AtomicU64,
    wake: Notify,
    /// Serializes flushes (the loop and the one at shutdown), which the empty-set
    /// shortcut in `flush_once` relies on.
    flush_lock: tokio::sync::Mutex<()>,
    flushed_tx: watch::Sender<u64>,
    pub flushed: watch::Receiver<u64>,
}

impl Persister {
    pub fn new() -> Arc<Persister> {
        let (flushed_tx, flushed) = watch::channel(0);
        Arc::new(Persister {
            dirty: Mutex::new(HashSet::new()),
            seq: AtomicU64::new(0),
            wake: Notify::new(),
            flush_lock: tokio::sync::Mutex::new(()),
            flushed_tx,
            flushed,
        })
    }

    /// Marks `key` dirty; returns the sequence that will be durable once flushed.
    pub fn mark(&self, key: String) -> u64 {
        let mut dirty = self.dirty.lock().expect("dirty set lock");
        dirty.insert(key);
        // Taken under the lock so a flush that swaps the set out also covers this seq.
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let eager = dirty.len() >= EAGER_FLUSH_KEYS;
        drop(dirty);
        if eager {
            self.wake.notify_one();
        }
        seq
    }

    /// Runs the flush loop until the store fails permanently; `render` supplies values.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn Store>,
        render: Arc<dyn Render>,
        metrics: Arc<crate::telemetry::Metrics>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_INTERVAL) => {}
                _ = self.wake.notified() => {}
            }
            self.flush_once(&*store, &*render, &metrics).await;
        }
    }

    /// Commits everything dirty now. Used by the loop and on shutdown.
    pub async fn flush_once(&self, store: &dyn Store, render: &dyn Render, metrics: &crate::telemetry::Metrics) {
        let _one_at_a_time = self.flush_lock.lock().await;
        let (keys, upto) = {
            let mut dirty = self.dirty.lock().expect("dirty set lock");
            if dirty.is_empty() {
                // Flushes run one at a time, so with nothing dirty every sequence handed
                // out so far is durable (this releases acks that marked nothing).
                let seq = self.seq.load(Ordering::SeqCst);
                drop(dirty);
                self.publish(seq);
                return;
            }
            (std::mem::take(&mut *dirty), self.seq.load(Ordering::SeqCst))
        };
        let ops: Vec<Op> = keys
            .iter()
            .map(|k| match render.render(k) {
                Some(v) => Op::put(k.clone(), v),
                None => Op::delete(k.clone()),
            })
            .collect();
        let n = ops.len() as u64;
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            match store.txn(vec![], ops.clone(), vec![]).await {
                Ok(_) => break,
                Err(e) => {
                    // Never drop state: keep retrying; agents stay unacknowledged meanwhile
                    // and will re-send if we die.
                    tracing::error!(error = %e, keys = n, "store write failed; retrying");
                    metrics.store_write_errors.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        metrics.store_keys_written.inc_by(n);
        metrics.store_flush_seconds.observe(started.elapsed().as_secs_f64());
        self.publish(upto);
    }

    fn publish(&self, upto: u64) {
        self.flushed_tx.send_if_modified(|v| {
            if upto > *v {
                *v = upto;
                true
            } else {
                false
            }
        });
    }
}

impl Persister {
    /// The sequence that covers every change made so far, without dirtying anything:
    /// acknowledging a duplicate must still wait for the original to be durable.
    pub fn mark_nothing(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }
}
