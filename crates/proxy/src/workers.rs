//! Threads that run HTTP connections, one single-threaded runtime each, as nginx runs
//! one event loop per worker process.
//!
//! On tokio's multi-threaded runtime a connection's task wakes on whichever worker
//! polled the I/O driver and may be stolen by another; with two workers that cost
//! drover 10 % of its requests per CPU-second and a worse p99 than with one
//! (docs/benchmarks.md). Here each accepted connection is handed to one worker (round
//! robin) and stays there: its socket is registered with that worker's own epoll, its
//! wake-ups never cross threads, and the upstream sockets it pools are that worker's
//! (`pool`). Accepting, health checks, reloads and the admin endpoint stay on the
//! runtime that started the proxy.
//!
//! With one worker the binary starts no thread at all ([`Workers::inline`]): connections
//! run on the single-threaded runtime that accepts them, as nginx's one worker process
//! does everything: no hand-off of accepted sockets between threads, and a process
//! that does not share its file table, so the kernel takes no reference on the file
//! for each socket call (`fput` fell from 0.48 % to 0.11 % of the proxy's samples in a
//! `bench/proxy/profile.sh` run: small, but on every call).

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::oneshot;

pub(crate) struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stops: Mutex<Vec<oneshot::Sender<()>>>,
    next: AtomicUsize,
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The connection worker this thread is (0 on any other thread).
pub(crate) fn current() -> usize {
    WORKER.with(|w| w.get())
}

/// Makes this thread count as connection worker `i` (tests of per-worker state).
#[cfg(test)]
pub(crate) fn pretend_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// How many ways state written per request is split (counters, in-flight counts,
/// round-robin positions), so that each worker writes only its own cache lines.
pub(crate) const SHARDS: usize = 8;

/// This thread's shard of such state (threads that are not workers share shard 0).
pub(crate) fn shard() -> usize {
    current() % SHARDS
}

/// One shard of such state, on cache lines of its own (128 bytes: adjacent-line
/// prefetch pairs 64-byte lines), so two workers writing their shards do not share one.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub(crate) T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl Workers {
    /// `n` worker threads (at least one).
    pub(crate) fn start(n: usize) -> std::io::Result<Workers> {
        let n = n.max(1);
        let (mut handles, mut stops) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(rt.handle().clone());
            stops.push(stop);
            std::thread::Builder::new().name(format!("drover-proxy-{i}")).spawn(move || {
                WORKER.with(|w| w.set(i));
                rt.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime ends the connections still running on it.
            })?;
        }
        Ok(Workers { handles, stops: Mutex::new(stops), next: AtomicUsize::new(0) })
    }

    /// One worker that is the calling single-threaded runtime itself: no thread, and
    /// [`Workers::stop`] leaves the connections to end with that runtime.
    pub(crate) fn inline() -> Workers {
        let handle = tokio::runtime::Handle::current();
        debug_assert_eq!(handle.runtime_flavor(), tokio::runtime::RuntimeFlavor::CurrentThread);
        Workers { handles: vec![handle], stops: Mutex::new(Vec::new()), next: AtomicUsize::new(0) }
    }

    /// Runs `f` on the next worker; it should create its sockets there (`from_std`).
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(f);
    }

    /// Stops every worker thread; connections still open on them are cut (an
    /// [`Workers::inline`] worker's end with its runtime).
    pub(crate) fn stop(&self) {
        for s in self.stops.lock().unwrap().drain(..) {
            let _ = s.send(());
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}
