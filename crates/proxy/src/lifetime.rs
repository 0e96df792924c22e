//! When a downstream connection on hyper's path stops taking requests: its listener
//! drains, or no request has been open on it for `request_head_timeout_secs`.
//!
//! hyper keeps no idle timer for HTTP/2 (its HTTP/1 has `header_read_timeout`, which
//! the listener sets too), so an h2 client that opened a connection and went quiet held
//! a socket and a task forever. nginx closes such a connection after `keepalive_timeout`,
//! HAProxy after `timeout http-keep-alive`. Here both cases end in hyper's graceful
//! shutdown: HTTP/2 sends GOAWAY and lets open streams finish, HTTP/1 finishes the
//! response under way and closes. Once an HTTP/1 request came, the idle limit is left
//! to hyper's `header_read_timeout`. A request counts as open until hyper drops its
//! response body ([`Open::deliver`]), so an HTTP/2 connection streaming a long answer
//! is not idle. HTTP/2 keep-alive PINGs (`http::serve`) close a connection whose peer
//! stops answering, which a graceful shutdown would otherwise wait on.
//!
//! [`Activity`] also carries the `stall_timeout_ms` that bounds writes to the client
//! (`fast::Prefixed`), the answering service's.
//!
//! A client can also stop taking a response without any write waiting: HTTP/2 sends
//! only what the client's flow-control window allows, and a client that grants no more
//! credit (yet answers PINGs) leaves hyper holding the rest, not asking the response
//! body for more and so never running that body's own timer; the backend connection
//! stays held as long. So each HTTP/2 response body is wrapped ([`Open::deliver`]): a
//! frame handed to hyper (at most [`MAX_FRAME`], so the wait is for the client to take
//! 64 KiB, not whatever one backend read returned) and not followed by a request for
//! the next within the service's `stall_timeout_ms` means the client stopped taking
//! data. One stream cannot be reset from here (hyper asks nothing more of it), so
//! [`drive`] sends GOAWAY, gives the other streams the same time again to finish,
//! and then closes the connection; nginx's `send_timeout` ends the stream. HTTP/1
//! needs none of this: a client that stops reading blocks a write, which
//! `fast::Prefixed` bounds.

use crate::{Body, BoxError};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
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
    /// (`stall`) never runs out then; the socket's writes are where it shows, or on
    /// HTTP/2 the wait for hyper to ask for the next frame ([`Delivered`]).
    send_stall_ms: AtomicU64,
    /// Response bodies waiting for hyper to ask for their next frame (see [`Delivered`]).
    handed: Mutex<Handed>,
    /// Told when a body starts waiting with a deadline earlier than [`stuck`] watches.
    handed_changed: tokio::sync::Notify,
    next_body: AtomicU64,
}

/// Bodies that handed out a frame, by id, with the time by which the next one must be
/// asked for and their limit.
#[derive(Debug, Default)]
struct Handed {
    out: Vec<(u64, Instant, Duration)>,
    /// The deadline [`stuck`] sleeps toward: a later one needs no wake-up (with one
    /// stream, nearly every frame's), so it wakes about once per limit, not per frame.
    armed: Option<Instant>,
}

/// The largest data frame a [`Delivered`] body hands out; larger ones are split.
pub(crate) const MAX_FRAME: usize = 64 * 1024;

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            open: AtomicUsize::new(0),
            created: Instant::now(),
            last_end_ms: AtomicU64::new(0),
            quiet: tokio::sync::Notify::new(),
            http1: std::sync::atomic::AtomicBool::new(false),
            send_stall_ms: AtomicU64::new(crate::config::DEFAULT_STALL_TIMEOUT_MS),
            handed: Mutex::new(Handed::default()),
            handed_changed: tokio::sync::Notify::new(),
            next_body: AtomicU64::new(0),
        })
    }

    fn hand_out(&self, id: u64, limit: Duration) {
        let due = Instant::now() + limit;
        let mut h = self.handed.lock().expect("never held across a panic");
        h.out.push((id, due, limit));
        let wake = h.armed.is_none_or(|armed| due < armed);
        drop(h);
        if wake {
            self.handed_changed.notify_one();
        }
    }

    fn take_back(&self, id: u64) {
        let mut h = self.handed.lock().expect("never held across a panic");
        if let Some(i) = h.out.iter().position(|&(i, _, _)| i == id) {
            h.out.swap_remove(i);
        }
    }

    /// The earliest time by which a waiting body must be asked for its next frame, with
    /// its limit, now watched by [`stuck`].
    fn arm(&self) -> Option<(Instant, Duration)> {
        let mut h = self.handed.lock().expect("never held across a panic");
        let first = h.out.iter().min_by_key(|&&(_, d, _)| d).map(|&(_, d, l)| (d, l));
        h.armed = first.map(|(d, _)| d);
        first
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
    /// `body` as this request's response. `stall_timeout_ms`: the answering service's
    /// (`None`: no service answered), which then bounds writes to the client and, on
    /// HTTP/2, the client's taking of each frame (see the module's doc). An HTTP/2
    /// request stays open until hyper is done with the body (a connection streaming a
    /// long answer is not idle); HTTP/1's body goes as it is, with no wrapper to pay
    /// for per request, as hyper bounds HTTP/1's idle time itself.
    pub(crate) fn deliver(self, body: Body, stall_timeout_ms: Option<u64>, http2: bool) -> Body {
        if let Some(ms) = stall_timeout_ms {
            self.0.send_stall_ms.store(ms, Ordering::Relaxed);
        }
        if !http2 {
            return body;
        }
        let limit = stall_timeout_ms.filter(|&ms| ms > 0).map(Duration::from_millis);
        let id = self.0.next_body.fetch_add(1, Ordering::Relaxed);
        Delivered { inner: body, rest: Bytes::new(), open: self, limit, id, out: false }.boxed()
    }
}

/// A response body that tells its connection's [`Activity`] when it has handed out a
/// frame and waits to be asked for the next (see the module's doc).
struct Delivered {
    inner: Body,
    /// What is left of a data frame larger than [`MAX_FRAME`].
    rest: Bytes,
    /// The request, open until this body is dropped.
    open: Open,
    limit: Option<Duration>,
    id: u64,
    /// A frame is out and the next not yet asked for.
    out: bool,
}

impl hyper::body::Body for Delivered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.out {
            this.out = false;
            this.open.0.take_back(this.id);
        }
        let frame = if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) if data.len() > MAX_FRAME => {
                        this.rest = data.split_off(MAX_FRAME);
                        Frame::data(data)
                    }
                    Ok(data) => Frame::data(data),
                    Err(frame) => frame,
                },
                other => return Poll::Ready(other),
            }
        } else {
            let n = this.rest.len().min(MAX_FRAME);
            Frame::data(this.rest.split_to(n))
        };
        // The last frame too: HTTP/2 holds it until the client grants credit, and
        // drops the body only then.
        if let Some(limit) = this.limit {
            this.out = true;
            this.open.0.hand_out(this.id, limit);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl Drop for Delivered {
    fn drop(&mut self) {
        if self.out {
            self.open.0.take_back(self.id);
        }
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
    let stuck_first = tokio::select! {
        r = conn.as_mut() => return r,
        () = due(&mut stop, &activity, idle) => None,
        limit = stuck(&activity) => Some(limit),
    };
    shutdown(conn.as_mut());
    let limit = match stuck_first {
        Some(limit) => limit,
        None => tokio::select! {
            r = conn.as_mut() => return r,
            limit = stuck(&activity) => limit,
        },
    };
    // A stuck stream never ends: the others get the same time again to finish (after
    // GOAWAY, if not sent already), then the connection is cut.
    tracing::debug!(?limit, "the client took no response data for stall_timeout_ms; closing the connection");
    tokio::time::timeout(limit, conn).await.unwrap_or(Ok(()))
}

/// Resolves once a response body has waited past its limit for hyper to ask for more
/// (the client stopped taking data), with that limit.
async fn stuck(activity: &Activity) -> Duration {
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
    loop {
        let changed = activity.handed_changed.notified();
        match activity.arm() {
            Some((at, limit)) if Instant::now() >= at => return limit,
            Some((at, _)) => {
                sleep.as_mut().reset(at);
                tokio::select! {
                    () = sleep.as_mut() => {}
                    () = changed => {}
                }
            }
            None => changed.await,
        }
    }
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

    /// A response body of `n` one-byte frames, each ready at once.
    struct Frames(usize);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.0 == 0 {
                return Poll::Ready(None);
            }
            self.0 -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }

        fn is_end_stream(&self) -> bool {
            self.0 == 0
        }
    }

    /// A response body of `n` one-byte frames, each `every` after the last (a slow
    /// backend: the body is asked, and has nothing yet).
    struct Paced {
        left: usize,
        every: Duration,
        sleep: Pin<Box<tokio::time::Sleep>>,
    }

    impl hyper::body::Body for Paced {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            ready!(self.sleep.as_mut().poll(cx));
            let next = Instant::now() + self.every;
            self.sleep.as_mut().reset(next);
            self.left -= 1;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    /// A connection that never ends once its graceful shutdown began (a stream stuck).
    fn stuck_conn() -> Conn {
        Conn { shut_at: None, after: Duration::from_secs(3600) }
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_frame_left_untaken_past_the_limit_shuts_down_then_cuts_the_connection() {
        let (_tx, rx) = watch::channel(false);
        let a = Activity::new();
        let mut body = a.begin(false).deliver(Frames(100).boxed(), Some(1000), true);
        let started = Instant::now();
        let client = tokio::spawn(async move {
            // Takes a frame every 900 ms (within the limit each time), five times, then
            // stops taking them and keeps the body.
            for _ in 0..5 {
                body.frame().await.unwrap().unwrap();
                tokio::time::sleep(Duration::from_millis(900)).await;
            }
            body
        });
        drive(stuck_conn(), shut, rx, a, None).await.unwrap();
        // The last frame went out at 3.6 s; GOAWAY 1 s later, the cut 1 s after that.
        assert_eq!(started.elapsed(), Duration::from_millis(5600));
        drop(client.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn a_last_frame_the_client_never_takes_counts_too() {
        let (_tx, rx) = watch::channel(false);
        let a = Activity::new();
        // One frame, the whole answer: HTTP/2 holds it (and the body) until credit comes.
        let mut body = a.begin(false).deliver(Frames(1).boxed(), Some(1000), true);
        body.frame().await.unwrap().unwrap();
        let started = Instant::now();
        drive(conn(), shut, rx, a, None).await.unwrap();
        // GOAWAY at 1 s; this connection then ends on its own 100 ms later.
        assert_eq!(started.elapsed(), Duration::from_millis(1100));
        drop(body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_taken_to_its_end_a_dropped_one_and_a_slow_backend_leave_the_connection_alone() {
        let (tx, rx) = watch::channel(false);
        let a = Activity::new();
        let mut ended = a.begin(false).deliver(Frames(3).boxed(), Some(1000), true);
        let mut dropped = a.begin(false).deliver(Frames(5).boxed(), Some(1000), true);
        // A frame every 3 s, three times the limit, each asked for at once.
        let paced =
            Paced { left: 4, every: Duration::from_secs(3), sleep: Box::pin(tokio::time::sleep(Duration::ZERO)) };
        let mut paced = a.begin(false).deliver(paced.boxed(), Some(1000), true);
        // Taken to its end (hyper asks once more and gets None), and kept.
        while ended.frame().await.is_some() {}
        dropped.frame().await.unwrap().unwrap();
        drop(dropped);
        let slow = tokio::spawn(async move {
            while paced.frame().await.is_some() {}
            paced
        });
        // HTTP/1: writes are bounded at the socket; its frames are not watched.
        let mut http1 = a.begin(true).deliver(Frames(5).boxed(), Some(1000), false);
        http1.frame().await.unwrap().unwrap();
        let started = Instant::now();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(20)).await;
            tx.send(true).unwrap();
            tx
        });
        drive(conn(), shut, rx, a, None).await.unwrap();
        // Only the drain at 20 s ended it, gracefully.
        assert_eq!(started.elapsed(), Duration::from_millis(20_100));
        drop((ended, http1, slow.await.unwrap(), stopper.await.unwrap()));
    }

    #[tokio::test]
    async fn a_large_data_frame_is_handed_out_in_pieces_of_at_most_max_frame() {
        let a = Activity::new();
        let big = Bytes::from(vec![7u8; 3 * MAX_FRAME + 100]);
        let full = http_body_util::Full::new(big.clone()).map_err(|n: std::convert::Infallible| match n {}).boxed();
        let mut body = a.begin(false).deliver(full, Some(1000), true);
        assert_eq!(hyper::body::Body::size_hint(&body).exact(), Some(big.len() as u64));
        let mut got = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            assert!(data.len() <= MAX_FRAME, "{}", data.len());
            got.push(data);
            let left = big.len() - got.iter().map(Bytes::len).sum::<usize>();
            assert_eq!(hyper::body::Body::size_hint(&body).exact(), Some(left as u64));
            assert_eq!(hyper::body::Body::is_end_stream(&body), left == 0);
        }
        assert_eq!(got.iter().map(Bytes::len).collect::<Vec<_>>(), [MAX_FRAME, MAX_FRAME, MAX_FRAME, 100]);
        assert_eq!(got.concat(), big);
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_still_streaming_keeps_its_request_open_past_the_idle_limit() {
        let (_tx, rx) = watch::channel(false);
        let a = Activity::new();
        // No stall limit: only the idle limit (5 s) is at work.
        let mut body = a.begin(false).deliver(Frames(100).boxed(), None, true);
        let started = Instant::now();
        let client = tokio::spawn(async move {
            // A frame every 2 s for 12 s, then the body is done with.
            for _ in 0..6 {
                body.frame().await.unwrap().unwrap();
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        drive(conn(), shut, rx, a, Some(Duration::from_secs(5))).await.unwrap();
        client.await.unwrap();
        // Open until 12 s, then 5 s idle, then the graceful 100 ms.
        assert_eq!(started.elapsed(), Duration::from_millis(17_100));
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
