//! When a downstream connection on hyper's path stops taking requests: its listener
//! drains, or no request has been open on it for `request_head_timeout_secs`.
//!
//! hyper keeps no idle timer for HTTP/2 (its HTTP/1 has `header_read_timeout`, which
//! the listener sets too), so an h2 client that opened a connection and went quiet held
//! a socket and a task forever. nginx closes such a connection after `keepalive_timeout`,
//! HAProxy after `timeout http-keep-alive`. Here both cases end in hyper's graceful
//! shutdown: HTTP/2 sends GOAWAY and lets open streams finish, HTTP/1 finishes the
//! response under way and closes. Once an HTTP/1 request came, the idle limit is left
//! to hyper's `header_read_timeout`. A request counts as open until its response head
//! is handed to hyper, so an HTTP/2 connection still streaming a long body may be told
//! to take no more requests after it; the body is not cut (`stall_timeout_ms` bounds
//! that). HTTP/2 keep-alive PINGs (`http::serve`) close a connection whose peer stops
//! answering, which a graceful shutdown would otherwise wait on.
//!
//! [`Activity`] also carries the `stall_timeout_ms` that bounds writes to the client
//! (`fast::Prefixed`), the answering service's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Requests open on one connection, and when the last one ended.
#[derive(Debug)]
pub(crate) struct Activity {
    open: AtomicUsize,
    created: Instant,
    /// Milliseconds from `created` to the end of the last request.
    last_end_ms: AtomicU64,
    /// Told when the count falls to 0, so the idle time is counted from then.
    quiet: tokio::sync::Notify,
    /// An HTTP/1 request came (see [`Activity::begin`]).
    http1: std::sync::atomic::AtomicBool,
    /// `stall_timeout_ms` of the service that answered last here (0: never): how long
    /// one write to the client may wait (`fast::Prefixed`). hyper stops asking a
    /// response body for data while the client does not read, so the body's own limit
    /// (`stall`) never runs out then; the socket's writes are where it shows.
    send_stall_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            open: AtomicUsize::new(0),
            created: Instant::now(),
            last_end_ms: AtomicU64::new(0),
            quiet: tokio::sync::Notify::new(),
            http1: std::sync::atomic::AtomicBool::new(false),
            send_stall_ms: AtomicU64::new(crate::config::DEFAULT_STALL_TIMEOUT_MS),
        })
    }

    /// How long one write to the client may wait (`None`: forever).
    pub(crate) fn send_stall(&self) -> Option<Duration> {
        let ms = self.send_stall_ms.load(Ordering::Relaxed);
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// Counts a request as open until the guard drops.
    /// `http1`: the request came over HTTP/1, whose idle time hyper bounds itself
    /// (`header_read_timeout`, counted from the end of the previous response, which is
    /// later than the point a request counts as ended here), so the idle limit here
    /// then no longer applies.
    pub(crate) fn begin(self: &Arc<Self>, http1: bool) -> Open {
        if http1 {
            self.http1.store(true, Ordering::Relaxed);
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Open(self.clone())
    }

    /// Counts the idle time from now (hyper's path took the connection over).
    fn touch(&self) {
        self.last_end_ms.fetch_max(self.created.elapsed().as_millis() as u64, Ordering::AcqRel);
    }

    /// Since when nothing has been open (`None`: something is).
    fn idle_since(&self) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.created + Duration::from_millis(self.last_end_ms.load(Ordering::Acquire)))
    }
}

/// An open request (see [`Activity::begin`]).
pub(crate) struct Open(Arc<Activity>);

impl Open {
    /// The answering service's `stall_timeout_ms` (0: never) now bounds writes to the client.
    pub(crate) fn answered_by(&self, stall_timeout_ms: u64) {
        self.0.send_stall_ms.store(stall_timeout_ms, Ordering::Relaxed);
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let a = &self.0;
        // Stamped before the count drops, so whoever reads 0 reads this end too.
        a.last_end_ms.fetch_max(a.created.elapsed().as_millis() as u64, Ordering::AcqRel);
        if a.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            a.quiet.notify_one();
        }
    }
}

/// Drives `conn` to its end, calling `shutdown` on it once (hyper's graceful shutdown)
/// when the listener drains (`stop` becomes `true` or its sender goes) or the
/// connection has been idle for `idle` (`None`: never).
pub(crate) async fn drive<C, E>(
    conn: C,
    shutdown: impl FnOnce(Pin<&mut C>),
    mut stop: watch::Receiver<bool>,
    activity: Arc<Activity>,
    idle: Option<Duration>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    // The fast path may have served this connection for long before handing it over.
    activity.touch();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        () = due(&mut stop, &activity, idle) => {}
    }
    shutdown(conn.as_mut());
    conn.await
}

/// Resolves once the connection should take no more requests.
async fn due(stop: &mut watch::Receiver<bool>, activity: &Activity, idle: Option<Duration>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        // Checked again when this fires (a request may have begun and ended meanwhile)
        // or when the last open request ends.
        let check_at = match idle.filter(|_| !activity.http1.load(Ordering::Relaxed)) {
            None => None,
            Some(limit) => match activity.idle_since() {
                Some(since) if Instant::now() >= since + limit => return,
                Some(since) => Some(since + limit),
                None => Some(Instant::now() + limit),
            },
        };
        let wait = async {
            match check_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = stop.changed() => if r.is_err() {
                return;
            },
            () = wait => {}
            () = activity.quiet.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that ends `after` its graceful shutdown began, and records when.
    struct Conn {
        shut_at: Option<Instant>,
        after: Duration,
    }

    impl Future for Conn {
        type Output = Result<(), ()>;

        fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), ()>> {
            match self.shut_at {
                Some(at) if Instant::now() >= at + self.after => std::task::Poll::Ready(Ok(())),
                Some(at) => {
                    let waker = cx.waker().clone();
                    let due = at + self.after;
                    tokio::spawn(async move {
                        tokio::time::sleep_until(due).await;
                        waker.wake();
                    });
                    std::task::Poll::Pending
                }
                None => std::task::Poll::Pending,
            }
        }
    }

    fn conn() -> Conn {
        Conn { shut_at: None, after: Duration::from_millis(100) }
    }

    fn shut(c: Pin<&mut Conn>) {
        c.get_mut().shut_at = Some(Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_shut_down_after_the_limit_counted_from_the_last_request() {
        let (_tx, rx) = watch::channel(false);
        let a = Activity::new();
        let started = Instant::now();
        let busy = {
            let a = a.clone();
            tokio::spawn(async move {
                // Open for 2 s from 1 s in: the 5 s limit counts from its end.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let open = a.begin(false);
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(open);
            })
        };
        drive(conn(), shut, rx, a, Some(Duration::from_secs(5))).await.unwrap();
        busy.await.unwrap();
        // 3 s (the request's end) + 5 s idle + 100 ms to close.
        assert_eq!(started.elapsed(), Duration::from_millis(8100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_shuts_down_at_once_and_no_limit_waits_forever_otherwise() {
        let (tx, rx) = watch::channel(false);
        let started = Instant::now();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(600)).await;
            tx.send(true).unwrap();
            tx
        });
        drive(conn(), shut, rx, Activity::new(), None).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(600_100));
        // A receiver made after the drain began (a connection accepted just before).
        let tx = stopper.await.unwrap();
        let started = Instant::now();
        drive(conn(), shut, tx.subscribe(), Activity::new(), Some(Duration::from_secs(60))).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_open_past_the_limit_keeps_the_connection() {
        let (_tx, rx) = watch::channel(false);
        let a = Activity::new();
        let open = a.begin(false);
        let started = Instant::now();
        let ender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(open);
        });
        drive(conn(), shut, rx, a, Some(Duration::from_secs(5))).await.unwrap();
        ender.await.unwrap();
        // Open until 30 s, then 5 s idle (seen at the next check, 5 s after 30), then 100 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(35_100));
    }
}
