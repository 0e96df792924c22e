//! Bodies on hyper's path that give up on a peer which stops sending (`stall_timeout_ms`).
//!
//! A response body from a backend, or a request body streamed from a client, fails
//! once its reader has waited `limit` for the next frame; hyper then cuts the
//! connection it was writing to (the client's, or the backend's). The fast path bounds
//! its own reads and writes (`fast::bounded`). A client that stops reading its
//! response makes hyper stop asking the body for frames, so that wait is bounded at
//! the client's socket instead (`fast::Prefixed`, with the same [`WaitTimer`]), and on
//! HTTP/2, whose flow control can hold data without a write waiting, by the wait for
//! hyper to ask for the next frame (`lifetime`).

use crate::BoxError;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?} (stall_timeout_ms)")]
pub(crate) struct Stalled(pub(crate) Duration);

/// The [`Stalled`] somewhere in `e`'s chain of causes.
pub(crate) fn cause<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e Stalled> {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(s) = e.downcast_ref::<Stalled>() {
            return Some(s);
        }
        at = e.source();
    }
    None
}

/// A timer for waits that may last at most some limit: armed when a wait begins,
/// disarmed when it ends; its `Sleep` is made at the first wait and reused.
#[derive(Default)]
pub(crate) struct WaitTimer {
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl WaitTimer {
    /// The wait ended.
    pub(crate) fn done(&mut self) {
        self.armed = false;
    }

    /// Called while a wait goes on: `true` once it has lasted `limit` (else the task is
    /// woken when it will have).
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>, limit: Duration) -> bool {
        if !self.armed {
            let due = tokio::time::Instant::now() + limit;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(due),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(due))),
            }
            self.armed = true;
        }
        self.timer.as_mut().expect("armed above").as_mut().poll(cx).is_ready()
    }
}

/// `inner`, failing with [`Stalled`] after `limit` without a frame (`None`: never).
pub(crate) struct StallLimited<B> {
    inner: B,
    limit: Option<Duration>,
    wait: WaitTimer,
    /// Dropped once the body has ended or failed (see [`StallLimited::signal_end`]).
    end: Option<tokio::sync::oneshot::Sender<()>>,
    /// Stamped at each request for a frame (see [`StallLimited::signal_end`]).
    polled: Option<Arc<Polled>>,
}

impl<B> StallLimited<B> {
    pub(crate) fn new(inner: B, limit: Option<Duration>) -> StallLimited<B> {
        StallLimited { inner, limit, wait: WaitTimer::default(), end: None, polled: None }
    }

    /// Also returns an [`UploadEnd`]: where an upload is streamed, the backend's time to
    /// answer starts once it is in, or once the backend has stopped taking it.
    pub(crate) fn signal_end(mut self) -> (StallLimited<B>, UploadEnd) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.end = Some(tx);
        let polled = Arc::new(Polled { base: tokio::time::Instant::now(), ms: AtomicU64::new(0) });
        self.polled = Some(polled.clone());
        (self, UploadEnd { ended: rx, polled })
    }
}

/// When a streamed upload was last asked for data.
pub(crate) struct Polled {
    base: tokio::time::Instant,
    ms: AtomicU64,
}

impl Polled {
    fn stamp(&self) {
        self.ms.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.base + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }
}

/// The end of a streamed upload, from [`StallLimited::signal_end`].
pub(crate) struct UploadEnd {
    /// Completes (with an error: nothing is sent) once the body has yielded its last
    /// frame or an error, or was dropped unfinished.
    ended: tokio::sync::oneshot::Receiver<()>,
    polled: Arc<Polled>,
}

impl UploadEnd {
    /// Resolves once the upload is in, failed, or has not been asked for data for
    /// `quiet` (the backend stopped reading it: its socket is full and hyper waits).
    pub(crate) async fn wait(mut self, quiet: Option<Duration>) {
        let Some(quiet) = quiet else {
            let _ = self.ended.await;
            return;
        };
        loop {
            let at = self.polled.last() + quiet;
            if tokio::time::Instant::now() >= at {
                return;
            }
            tokio::select! {
                _ = &mut self.ended => return,
                () = tokio::time::sleep_until(at) => {}
            }
        }
    }
}

impl<B> Body for StallLimited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(p) = &this.polled {
            p.stamp();
        }
        if let Poll::Ready(r) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.wait.done();
            if !matches!(r, Some(Ok(_))) || this.inner.is_end_stream() {
                this.end = None;
            }
            return Poll::Ready(r.map(|r| r.map_err(Into::into)));
        }
        let Some(limit) = this.limit else { return Poll::Pending };
        if !this.wait.expired(cx, limit) {
            return Poll::Pending;
        }
        this.end = None;
        Poll::Ready(Some(Err(Stalled(limit).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that yields `frames` then never ends.
    struct Then {
        frames: Vec<Bytes>,
    }

    impl Body for Then {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.frames.pop() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Poll::Pending,
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_fails_after_its_limit_and_not_before() {
        let mut body = StallLimited::new(
            Then { frames: vec![Bytes::from_static(b"b"), Bytes::from_static(b"a")] },
            Some(Duration::from_secs(5)),
        );
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "a");
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "b");
        let started = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(err.to_string().contains("stall_timeout_ms"), "{err}");
        assert!(cause(&*err).is_some(), "found in a chain of causes");
        assert!(cause(&std::io::Error::other("unrelated")).is_none());
    }

    #[tokio::test]
    async fn the_end_signal_comes_with_the_last_frame_or_a_failure_not_before() {
        let (mut body, end) =
            StallLimited::new(http_body_util::Full::new(Bytes::from_static(b"all")), Some(Duration::from_secs(5)))
                .signal_end();
        let mut ended = end.ended;
        assert!(matches!(ended.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)));
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "all");
        assert!(matches!(ended.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Closed)));

        let (mut body, end) =
            StallLimited::new(Then { frames: vec![Bytes::from_static(b"a")] }, Some(Duration::from_millis(10)))
                .signal_end();
        let mut ended = end.ended;
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "a");
        assert!(matches!(ended.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Empty)), "more may come");
        assert!(body.frame().await.unwrap().is_err());
        assert!(matches!(ended.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Closed)), "stalled");
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_nobody_asks_for_ends_its_wait_after_the_quiet_limit() {
        let (mut body, end) = StallLimited::new(Then { frames: vec![Bytes::from_static(b"a")] }, None).signal_end();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "a");
        // Last asked at 3 s; nobody asks again (a backend that stopped reading).
        let started = tokio::time::Instant::now();
        end.wait(Some(Duration::from_secs(5))).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
