//! The HTTP/1.1 fast path: one task per plain-TCP downstream connection does all of
//! a request's work itself.
//!
//! hyper's server and pooled client cost a request three or more task polls and two
//! channel hops (downstream connection task, handler, upstream connection task), a
//! `HeaderMap` built and torn down on each side, and a dozen allocations; that was most
//! of drover's user-space time per request (docs/benchmarks.md). Here the connection's
//! task reads the request head into a buffer it keeps, parses it with `httparse` in
//! place, writes the upstream head (forwarding headers added) to an upstream
//! connection it takes from the backend's idle pool of plain `TcpStream`s, reads the
//! response head the same way and copies head and body back, then loops for the next
//! (possibly already pipelined) request. Nothing is spawned and nothing allocated per
//! request once the buffers have grown to size.
//!
//! The semantics are those of the module doc of `http` (retry rules, 503/504, passive
//! health, queueing, draining, metrics, access log, request id, forwarding headers).
//! The request body is read whole before the first attempt (it is at most
//! [`REPLAY_BODY_LIMIT`], so it may be resent after a connect failure); responses of
//! any length and framing are streamed.
//!
//! A request the fast path does not handle hands the connection, at that request's
//! first byte, to hyper with the bytes already read replayed in front of the socket
//! ([`Prefixed`]): h2c (the preface is not HTTP/1.1), HTTP/1.0, `CONNECT` and
//! absolute-form targets, upgrades (WebSocket), `Expect`, `Transfer-Encoding` on a
//! request or a body larger than [`REPLAY_BODY_LIMIT`] (streamed by hyper), a route or
//! service with a response cache, a sticky cookie or a header/cookie hash key, and
//! anything `httparse` rejects (hyper then answers the error). Responses already sent
//! were complete, so hyper starts at a request boundary.

use crate::backend::{Affinity, Backend, Counted, EWMA_FAILURE_PENALTY, Service, Unavailable};
use crate::config::{Balance, HashOn};
use crate::error::ForwardError;
use crate::http::{ConnFlags, REPLAY_BODY_LIMIT, find_route, is_idempotent_method, write_request_id};
use crate::pool::connect_stream;
use crate::{Shared, Snapshot};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::HashSet;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Sleep;

/// Headers parsed per message; a message with more goes to hyper (request) or is an
/// error (response).
const MAX_HEADERS: usize = 96;
/// A request or response head still incomplete at this size is not ours to handle.
const MAX_HEAD: usize = 64 * 1024;
/// Reads ask for at least this much room.
const READ_CHUNK: usize = 16 * 1024;
/// A response body chunk this small is copied behind its head so both go in one write.
const COALESCE: usize = 16 * 1024;

/// How a fast-path connection ended.
pub(crate) enum Ended {
    Closed,
    /// The rest of the connection is hyper's, starting with these bytes.
    Fallback(Prefixed),
}

/// A connection as hyper's path gets it: bytes the fast path already read put back in
/// front, and optionally a limit on the wait for its first byte. hyper's auto builder
/// reads the first bytes (to tell HTTP/2's preface from HTTP/1) before any timer of its
/// own runs, so a client that connects (and shakes hands) and then sends nothing would
/// otherwise be held forever (`request_head_timeout_secs`).
///
/// Writes can be bounded too ([`Prefixed::bound_writes`]): one that waits longer than
/// the answering service's `stall_timeout_ms` fails, which closes the connection; so
/// does a shutdown (TLS's close_notify is a write).
pub(crate) struct Prefixed<I = TcpStream> {
    prefix: Bytes,
    io: I,
    /// Until the first byte.
    first_byte: Option<Pin<Box<Sleep>>>,
    /// Where the write limit is read, and the timer of the write under way.
    writes: Option<(Arc<crate::lifetime::Activity>, crate::stall::WaitTimer)>,
}

impl<I> Prefixed<I> {
    /// `io` whose first byte must come within `limit`.
    pub(crate) fn new(io: I, limit: Option<Duration>) -> Prefixed<I> {
        Prefixed::with_prefix(Bytes::new(), io, limit.map(|l| Box::pin(tokio::time::sleep(l))))
    }

    fn with_prefix(prefix: Bytes, io: I, first_byte: Option<Pin<Box<Sleep>>>) -> Prefixed<I> {
        Prefixed { prefix, io, first_byte, writes: None }
    }

    /// Each write may wait at most `activity`'s send limit, read when a write waits.
    pub(crate) fn bound_writes(mut self, activity: Arc<crate::lifetime::Activity>) -> Prefixed<I> {
        self.writes = Some((activity, crate::stall::WaitTimer::default()));
        self
    }

    /// `r`, or a timeout once the write it is from has waited past the limit.
    fn bounded<T>(&mut self, cx: &mut Context<'_>, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        let Some((activity, wait)) = self.writes.as_mut() else { return r };
        if r.is_ready() {
            wait.done();
            return r;
        }
        match activity.send_stall() {
            Some(limit) if wait.expired(cx, limit) => {
                let msg = format!("the client took no data for {limit:?} (stall_timeout_ms)");
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg)))
            }
            _ => r,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(timer) = this.first_byte.as_mut() {
            match r {
                Poll::Ready(Ok(())) if buf.filled().len() == before => {}
                Poll::Ready(_) => this.first_byte = None,
                Poll::Pending if timer.as_mut().poll(cx).is_ready() => {
                    let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "no request (request_head_timeout_secs)");
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {}
            }
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.bounded(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.bounded(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.bounded(cx, r)
    }

    // A TLS stream's shutdown writes close_notify: to a client that stopped reading it
    // waits like any write, and without the bound would hold the connection until a
    // drain cut it.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.bounded(cx, r)
    }
}

/// Offsets of a parsed head's parts in the buffer it was parsed from, so the buffer
/// can be borrowed again while they are in use.
#[derive(Default)]
struct Head {
    len: usize,
    /// Request: method. Response: unused.
    method: Range<usize>,
    /// Request: target. Response: reason phrase.
    target: Range<usize>,
    status: u16,
    minor: u8,
    headers: Vec<(Range<usize>, Range<usize>)>,
}

fn offset(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

enum Parsed {
    Complete,
    Partial,
    Invalid,
}

// Uninitialised header slots: the 3 KiB of zeroes `EMPTY_HEADER`s would cost per parse are
// a measurable share of a small request.
fn parse_request(buf: &[u8], head: &mut Head) -> Parsed {
    let mut hs = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(buf, &mut hs) {
        Ok(httparse::Status::Complete(len)) => {
            head.len = len;
            head.method = offset(buf, req.method.unwrap_or_default().as_bytes());
            head.target = offset(buf, req.path.unwrap_or_default().as_bytes());
            head.minor = req.version.unwrap_or(0);
            head.headers.clear();
            head.headers.extend(req.headers.iter().map(|h| (offset(buf, h.name.as_bytes()), offset(buf, h.value))));
            Parsed::Complete
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

fn parse_response(buf: &[u8], head: &mut Head) -> Parsed {
    let mut hs = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut hs) {
        Ok(httparse::Status::Complete(len)) => {
            head.len = len;
            head.status = resp.code.unwrap_or(0);
            head.target = offset(buf, resp.reason.unwrap_or_default().as_bytes());
            head.minor = resp.version.unwrap_or(0);
            head.headers.clear();
            head.headers.extend(resp.headers.iter().map(|h| (offset(buf, h.name.as_bytes()), offset(buf, h.value))));
            Parsed::Complete
        }
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// `a`, a name or value from a parsed head, equals `lit` (lowercase letters, digits and
/// '-') ignoring ASCII case. httparse admits no control character but tab there, and
/// among the other bytes OR-ing 0x20 lowercases a letter and maps nothing else onto a
/// letter, a digit or '-' (`or_0x20_is_ignoring_case_on_parsed_bytes`): one OR per byte
/// instead of two case conversions, in the comparisons every header goes through.
#[inline]
fn eq(a: &[u8], lit: &str) -> bool {
    let lit = lit.as_bytes();
    debug_assert!(lit.iter().all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-')), "{lit:?}");
    a.len() == lit.len() && a.iter().zip(lit).all(|(&c, &l)| c | 0x20 == l)
}

/// Comma-separated tokens of a header value, trimmed.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&c| c == b',').map(|t| t.trim_ascii()).filter(|t| !t.is_empty())
}

/// Hop-by-hop headers that never go on, whatever `Connection` names. Sorted by length
/// first: most names match none of the lengths and cost one comparison.
fn hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => eq(name, "te"),
        7 => eq(name, "trailer") || eq(name, "upgrade"),
        10 => eq(name, "connection") || eq(name, "keep-alive"),
        16 => eq(name, "proxy-connection"),
        17 => eq(name, "transfer-encoding"),
        18 => eq(name, "proxy-authenticate"),
        _ => false,
    }
}

/// 1 when a `Connection` value names a header to strip, i.e. has a token other than
/// `close` and `keep-alive` (a field named `Close` is reserved, RFC 9110 §7.6.1, and
/// `Keep-Alive` is hop-by-hop anyway); then [`named_by_connection`] has to look.
fn names_headers(v: &[u8]) -> u32 {
    // The usual values, without splitting them into tokens.
    if eq(v, "keep-alive") || eq(v, "close") {
        return 0;
    }
    u32::from(tokens(v).any(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive")))
}

/// Writes header lines to an output buffer as `name: value\r\n`. Lines that came in
/// exactly that form and back to back in the input are copied as one run: a line written
/// as four slices costs four `memcpy` calls, a run one.
#[derive(Default)]
struct Lines {
    /// Input bytes not yet written; empty when no run is open.
    run: Range<usize>,
}

impl Lines {
    /// Starts with `line`, a range of `buf` to copy as it is (a start line already in
    /// the form the output wants).
    fn starting_with(line: Range<usize>) -> Lines {
        Lines { run: line }
    }

    #[inline]
    fn push(&mut self, out: &mut Vec<u8>, buf: &[u8], n: &Range<usize>, v: &Range<usize>) {
        let plain = buf.get(n.end..v.start) == Some(&b": "[..]) && buf.get(v.end..v.end + 2) == Some(&b"\r\n"[..]);
        if plain && !self.run.is_empty() && self.run.end == n.start {
            self.run.end = v.end + 2;
            return;
        }
        self.flush(out, buf);
        if plain {
            self.run = n.start..v.end + 2;
        } else {
            out.extend_from_slice(&buf[n.clone()]);
            out.extend_from_slice(b": ");
            out.extend_from_slice(&buf[v.clone()]);
            out.extend_from_slice(b"\r\n");
        }
    }

    /// Writes the open run; call before writing anything else to `out`.
    fn flush(&mut self, out: &mut Vec<u8>, buf: &[u8]) {
        if !self.run.is_empty() {
            out.extend_from_slice(&buf[self.run.clone()]);
        }
        self.run = 0..0;
    }
}

/// Whether a `Connection` header in `headers` of `buf` names `name` (`conn`: how many
/// of them [`names_headers`]).
#[inline]
fn named_by_connection(buf: &[u8], headers: &[(Range<usize>, Range<usize>)], conn: u32, name: &[u8]) -> bool {
    conn != 0
        && headers
            .iter()
            .filter(|(n, _)| eq(&buf[n.clone()], "connection"))
            .any(|(_, v)| tokens(&buf[v.clone()]).any(|t| t.eq_ignore_ascii_case(name)))
}

/// `to_str()` of `http::HeaderValue` (visible ASCII and tabs) for a header value
/// `httparse` accepted: it admits only tab, space to `~` and bytes from 0x80, so ASCII is
/// the whole test, and `is_ascii` checks a word at a time
/// (`visible_ascii_of_a_parsed_value_is_its_ascii_test` pins this on every byte).
fn visible_ascii(v: &[u8]) -> bool {
    v.is_ascii()
}

fn parse_len(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// How a response body is delimited.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Finds the end of a chunked body while its bytes are copied on unchanged.
#[derive(Default)]
struct Chunked {
    state: ChunkState,
    size: u64,
    digits: u8,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    EndLf,
    Done,
}

impl Chunked {
    /// How many bytes of `buf` belong to the body (all unless its end is in `buf`);
    /// `None` when the framing is malformed.
    fn feed(&mut self, buf: &[u8]) -> Option<usize> {
        use ChunkState as S;
        let mut i = 0;
        while i < buf.len() {
            let c = buf[i];
            match self.state {
                S::Size => match c {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.size >> 60 != 0 {
                            return None;
                        }
                        let d = (c as char).to_digit(16).unwrap_or(0);
                        self.size = self.size * 16 + u64::from(d);
                        self.digits = self.digits.saturating_add(1);
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => self.state = S::Ext,
                    b'\r' if self.digits > 0 => self.state = S::SizeLf,
                    b'\n' if self.digits > 0 => self.end_of_size(),
                    _ => return None,
                },
                S::Ext => match c {
                    b'\r' => self.state = S::SizeLf,
                    b'\n' => self.end_of_size(),
                    _ => {}
                },
                S::SizeLf if c == b'\n' => self.end_of_size(),
                S::Data => {
                    let take = (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = S::DataCr;
                    }
                    continue;
                }
                S::DataCr if c == b'\r' => self.state = S::DataLf,
                S::DataCr | S::DataLf if c == b'\n' => {
                    self.state = S::Size;
                    self.digits = 0;
                }
                S::TrailerStart => match c {
                    b'\r' => self.state = S::EndLf,
                    b'\n' => self.state = S::Done,
                    _ => self.state = S::TrailerLine,
                },
                S::TrailerLine if c == b'\n' => self.state = S::TrailerStart,
                S::TrailerLine => {}
                S::EndLf if c == b'\n' => self.state = S::Done,
                S::Done => return Some(i),
                _ => return None,
            }
            i += 1;
            if self.state == S::Done {
                return Some(i);
            }
        }
        Some(i)
    }

    fn end_of_size(&mut self) {
        self.state = if self.size == 0 { ChunkState::TrailerStart } else { ChunkState::Data };
    }

    fn done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

/// `fut`'s output if it finishes by `deadline`, else `None` (and `fut` is dropped).
///
/// A connection keeps one timer and moves it only when it is set later than `deadline`
/// or fires early (it was set for an earlier request): a request nearly always finishes
/// long before its deadline, and arming a fresh timer per request, as
/// `tokio::time::timeout` does, costs two timer-wheel operations under the runtime's
/// timer lock and a clock reading each time. `deadline` is asked for only once `fut`
/// has to wait, so a future ready at once costs no clock reading either.
async fn within<F: Future>(
    timer: &mut Timer,
    deadline: impl FnOnce() -> tokio::time::Instant,
    fut: F,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let (mut deadline, mut due) = (Some(deadline), None);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        let due = *due.get_or_insert_with(|| {
            let due = deadline.take().expect("asked for once")();
            if timer.deadline() > due {
                timer.reset(due);
            }
            due
        });
        timer.poll_due(cx, due).map(|()| None)
    })
    .await
}

/// A connection's one timer (see [`within`]).
struct Timer {
    sleep: Pin<Box<Sleep>>,
    /// Polled since it was last set: its waker (the connection's task, which a `Conn`
    /// never leaves) is in place, so until it fires or moves it needs no poll, which
    /// would look up its entry and register the waker again, twice per request.
    registered: bool,
}

impl Timer {
    fn new(at: tokio::time::Instant) -> Timer {
        Timer { sleep: Box::pin(tokio::time::sleep_until(at)), registered: false }
    }

    fn deadline(&self) -> tokio::time::Instant {
        self.sleep.deadline()
    }

    fn reset(&mut self, at: tokio::time::Instant) {
        self.sleep.as_mut().reset(at);
        self.registered = false;
    }

    /// Ready once the timer fires at or after `due`; firing earlier (it was set for an
    /// earlier request or wait) moves it to `due`.
    fn poll_due(&mut self, cx: &mut Context<'_>, due: tokio::time::Instant) -> Poll<()> {
        loop {
            if self.registered && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            // Outside the task's budget: a Sleep polled with none left answers Pending
            // without registering the waker, and `registered` would then never be cleared.
            let polled = std::pin::pin!(tokio::task::coop::unconstrained(self.sleep.as_mut())).poll(cx);
            if polled.is_pending() {
                self.registered = true;
                return Poll::Pending;
            }
            if self.sleep.deadline() >= due {
                return Poll::Ready(());
            }
            self.reset(due);
        }
    }
}

/// `fut`, failing with `TimedOut` once it has waited `limit` (see `stall_timeout_ms`);
/// unbounded without a limit or without the timer (taken out while an attempt runs,
/// whose own deadline then bounds it).
async fn bounded<T>(
    timer: &mut Option<Timer>,
    limit: Option<Duration>,
    fut: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match (limit, timer.as_mut()) {
        (Some(limit), Some(timer)) => within(timer, || tokio::time::Instant::now() + limit, fut)
            .await
            .unwrap_or_else(|| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "stall_timeout_ms passed"))),
        _ => fut.await,
    }
}

/// `write_all`, trying the write at once first: a socket with room (nearly always, for
/// a head and a small body) takes it in one system call without the write future, the
/// task budget and the readiness registration of a polled write.
/// A write that has to wait is bounded by `limit` (see [`bounded`]).
async fn send(
    s: &mut TcpStream,
    buf: &[u8],
    timer: &mut Option<Timer>,
    limit: Option<Duration>,
) -> std::io::Result<()> {
    match s.try_write(buf) {
        Ok(n) if n == buf.len() => Ok(()),
        Ok(n) => bounded(timer, limit, s.write_all(&buf[n..])).await,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => bounded(timer, limit, s.write_all(buf)).await,
        Err(e) => Err(e),
    }
}

/// Drops the first `n` bytes of `buf`. All of them (the usual case: a request or response
/// read whole) by emptying it in place, which keeps its room at the front; advancing
/// moves the start, and the next `reserve` has to move it back.
fn consume(buf: &mut BytesMut, n: usize) {
    if n == buf.len() {
        buf.clear();
    } else {
        buf.advance(n);
    }
}

/// Why an attempt got no response head.
enum Failed {
    Connect(std::io::Error),
    Lost(String),
    Timeout,
}

/// What the access log and metrics need about one request.
struct Outcome<'s> {
    status: u16,
    service: Option<&'s str>,
    backend: Option<SocketAddr>,
    tries: u32,
    error: Option<String>,
}

/// Buffers kept for the connection's life.
struct Conn<'a> {
    shared: &'a Shared,
    listener: &'a str,
    client: SocketAddr,
    flags: ConnFlags,
    down: TcpStream,
    /// Downstream bytes: the request being handled, then whatever follows it.
    rbuf: BytesMut,
    /// Upstream bytes of the response being relayed.
    ubuf: BytesMut,
    /// A head (and small body) being built for one write.
    out: Vec<u8>,
    req: Head,
    resp: Head,
    /// The request's host as routing sees it: no port, lowercase.
    host: Vec<u8>,
    id: Vec<u8>,
    /// The client's address as `X-Forwarded-For` and `Forwarded` write it, formatted once.
    xff: Vec<u8>,
    forwarded_for: Vec<u8>,
    /// The client asked to close after this response, or the listener is draining.
    closing: bool,
    /// True once the listener drains: no new request, and the one in flight is the last.
    shutdown: watch::Receiver<bool>,
    /// Ends when `shutdown` turns true (or its sender is gone). Made once per connection:
    /// a `changed()` future made and dropped per request registered and unregistered a
    /// waiter under the channel's lock each time.
    drained: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// `drained` has been polled, so its waiter (this task's waker) is registered and
    /// stays so until the channel changes: it is polled again only then, as each poll of
    /// a registered waiter takes the channel's lock.
    drained_armed: bool,
    /// The connection's one timer (see [`within`]); taken out while an attempt runs.
    timer: Option<Timer>,
    /// The current request's service's `stall_timeout_ms` (see [`bounded`]).
    stall: Option<Duration>,
    /// The config generation the last request used, kept while it is current (taken
    /// out for the length of a request).
    snapshot: Option<(u64, Arc<Snapshot>)>,
}

/// Serves `down` until it closes or needs hyper. `client` is the peer, or the address
/// a PROXY header carried.
pub(crate) async fn serve(
    down: TcpStream,
    client: SocketAddr,
    flags: ConnFlags,
    shared: &Shared,
    listener: &str,
    shutdown: watch::Receiver<bool>,
) -> Ended {
    let mut c = Conn {
        shared,
        listener,
        client,
        flags,
        down,
        rbuf: BytesMut::with_capacity(READ_CHUNK),
        ubuf: BytesMut::new(),
        out: Vec::with_capacity(1024),
        req: Head::default(),
        resp: Head::default(),
        host: Vec::new(),
        id: Vec::new(),
        xff: client.ip().to_string().into_bytes(),
        forwarded_for: match client.ip() {
            ip @ std::net::IpAddr::V6(_) => format!("for=\"[{ip}]\""),
            ip => format!("for={ip}"),
        }
        .into_bytes(),
        closing: false,
        drained: {
            let mut rx = shutdown.clone();
            Box::pin(async move {
                let _ = rx.wait_for(|draining| *draining).await;
            })
        },
        drained_armed: false,
        shutdown,
        timer: Some(Timer::new(tokio::time::Instant::now())),
        stall: None,
        snapshot: None,
    };
    loop {
        match c.read_head().await {
            Next::Request => {}
            Next::Close => return Ended::Closed,
            Next::Fallback => return c.fallback(),
        }
        c.closing = false;
        match c.handle().await {
            Next::Request if !c.closing => {}
            Next::Request | Next::Close => {
                let _ = c.down.shutdown().await;
                return Ended::Closed;
            }
            Next::Fallback => return c.fallback(),
        }
    }
}

/// How waiting for a request body ended.
enum Filled {
    /// All there; `true` if any of it had to be waited for.
    Read(bool),
    /// The client closed or failed.
    Gone,
    /// Nothing came for `stall_timeout_ms`.
    Stalled,
}

enum Next {
    Request,
    Close,
    Fallback,
}

impl Conn<'_> {
    fn fallback(self) -> Ended {
        Ended::Fallback(Prefixed::with_prefix(self.rbuf.freeze(), self.down, None))
    }

    /// The listener is draining. Read per request: an atomic load of the channel's
    /// version, and its lock only once it has changed (the receiver was made before the
    /// listener could drain, so a change is the only way to `true`).
    fn draining(&self) -> bool {
        self.shutdown.has_changed().unwrap_or(true) && *self.shutdown.borrow()
    }

    /// Waits for a complete request head in `rbuf`; while none has begun, a shutdown
    /// closes the connection, and a head not complete `request_head_timeout_secs` after
    /// the wait began (accept, or the end of the previous response) closes it too.
    async fn read_head(&mut self) -> Next {
        // Set at the first read that has to wait: a head already buffered or in the
        // socket costs no clock reading.
        let mut deadline = None;
        loop {
            if !self.rbuf.is_empty() {
                match parse_request(&self.rbuf, &mut self.req) {
                    Parsed::Complete => return Next::Request,
                    Parsed::Invalid => return Next::Fallback,
                    Parsed::Partial if self.rbuf.len() > MAX_HEAD => return Next::Fallback,
                    Parsed::Partial => {}
                }
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            let idle = self.rbuf.is_empty();
            if idle && self.draining() {
                return Next::Close;
            }
            let (down, rbuf) = (&mut self.down, &mut self.rbuf);
            let (shutdown, drained, armed) = (&self.shutdown, &mut self.drained, &mut self.drained_armed);
            let mut read = std::pin::pin!(down.read_buf(rbuf));
            let read = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if idle && (!*armed || shutdown.has_changed().unwrap_or(true)) {
                    *armed = true;
                    // Never polled again after it ends: the connection closes.
                    if drained.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                }
                Poll::Pending
            });
            let r = match (self.flags.head_timeout, self.timer.as_mut()) {
                (Some(limit), Some(timer)) => {
                    let due = || *deadline.get_or_insert_with(|| tokio::time::Instant::now() + limit);
                    within(timer, due, read).await.flatten()
                }
                _ => read.await,
            };
            match r {
                Some(Ok(n)) if n > 0 => {}
                _ => return Next::Close,
            }
        }
    }

    /// Reads until `rbuf` holds `n` bytes.
    async fn fill(&mut self, n: usize) -> Filled {
        let mut read = false;
        while self.rbuf.len() < n {
            self.rbuf.reserve(n - self.rbuf.len());
            match bounded(&mut self.timer, self.stall, self.down.read_buf(&mut self.rbuf)).await {
                Ok(0) => return Filled::Gone,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Filled::Stalled,
                Err(_) => return Filled::Gone,
                Ok(_) => read = true,
            }
        }
        Filled::Read(read)
    }

    /// One request whose head is parsed in `rbuf`, from routing to the last byte of
    /// its response.
    async fn handle(&mut self) -> Next {
        let start = Instant::now();
        let buf = &self.rbuf[..];
        let h = &self.req;
        let method = &buf[h.method.clone()];
        let target = &buf[h.target.clone()];
        if h.minor != 1 || !target.starts_with(b"/") || method == b"CONNECT" {
            return Next::Fallback;
        }
        let (mut body_len, mut host_at, mut id_at, mut conn) = (0u64, None, None, 0u32);
        for (i, (n, v)) in h.headers.iter().enumerate() {
            let (n, v) = (&buf[n.clone()], &buf[v.clone()]);
            if eq(n, "host") {
                if host_at.is_some() {
                    return Next::Fallback;
                }
                host_at = Some(i);
            } else if eq(n, "content-length") {
                match parse_len(v) {
                    Some(len) if body_len == 0 || len == body_len => body_len = len,
                    _ => return Next::Fallback,
                }
            } else if eq(n, "transfer-encoding") || eq(n, "upgrade") || eq(n, "expect") {
                return Next::Fallback;
            } else if eq(n, "connection") {
                conn += names_headers(v);
                if tokens(v).any(|t| t.eq_ignore_ascii_case(b"close")) {
                    self.closing = true;
                }
            } else if eq(n, "x-request-id") && id_at.is_none() && !v.is_empty() && visible_ascii(v) {
                id_at = Some(i);
            }
        }
        if body_len > REPLAY_BODY_LIMIT {
            return Next::Fallback;
        }
        // Routing, with hyper's view of the host: no port, lowercase.
        let raw_host = host_at.map(|i| &buf[h.headers[i].1.clone()]).filter(|v| visible_ascii(v)).unwrap_or_default();
        let upto = |v: &'_ [u8], end: u8| v.iter().position(|&c| c == end).unwrap_or(v.len());
        let bare = match raw_host.strip_prefix(b"[") {
            Some(v6) => &v6[..upto(v6, b']')],
            None => &raw_host[..upto(raw_host, b':')],
        };
        self.host.clear();
        self.host.extend_from_slice(bare);
        self.host.make_ascii_lowercase();
        let path_at = h.target.start..h.target.start + target.iter().position(|&c| c == b'?').unwrap_or(target.len());
        let path = &buf[path_at.clone()];
        let generation = self.shared.snapshot_gen();
        let snap = match self.snapshot.take() {
            Some((g, snap)) if g == generation => snap,
            _ => self.shared.snapshot(),
        };
        let route = find_route(&snap.cfg.routes, self.listener, &self.host, path, |name, want| {
            // `name` comes from the config, in any case.
            h.headers.iter().any(|(n, v)| {
                buf[n.clone()].eq_ignore_ascii_case(name.as_bytes()) && buf[v.clone()] == *want.as_bytes()
            })
        });
        let svc = route.and_then(|r| snap.services.get(&r.service));
        if let (Some(r), Some(svc)) = (route, svc)
            && (r.cache.is_some()
                || svc.cfg.cache.is_some()
                || svc.cfg.sticky_cookie.is_some()
                || (svc.cfg.balance == Balance::Hash
                    && matches!(svc.cfg.hash_on, Some(HashOn::Header(_) | HashOn::Cookie(_)))))
        {
            return Next::Fallback;
        }
        // Fallback is no longer possible: the request is ours from here.
        self.id.clear();
        match id_at {
            Some(i) => self.id.extend_from_slice(&buf[h.headers[i].1.clone()]),
            None => write_request_id(&mut self.id, start),
        }
        let end = self.req.len + body_len as usize;
        self.stall =
            svc.map_or(Some(Duration::from_millis(crate::config::DEFAULT_STALL_TIMEOUT_MS)), |s| s.cfg.stall_timeout());
        let (waited, stalled) = match self.fill(end).await {
            Filled::Read(waited) => (waited, false),
            Filled::Gone => return Next::Close,
            // Answered (408) and closed: the rest of the body may still come.
            Filled::Stalled => {
                self.closing = true;
                (false, true)
            }
        };
        // The request timeout runs from the first attempt: `start` is that moment unless
        // the body had to be waited for.
        let sent_at = if waited { Instant::now() } else { start };
        let path = || String::from_utf8_lossy(&self.rbuf[path_at.clone()]).into_owned();
        let logged = tracing::enabled!(target: "drover_proxy::access", tracing::Level::INFO)
            .then(|| (String::from_utf8_lossy(&self.rbuf[self.req.method.clone()]).into_owned(), path()));
        let mut o = Outcome { status: 0, service: None, backend: None, tries: 0, error: None };
        let next = match (route, svc) {
            _ if stalled => {
                o.service = svc.map(|s| s.name.as_str());
                let limit = self.stall.unwrap_or_default();
                self.answer_error(&ForwardError::ClientStalled(crate::stall::Stalled(limit).to_string()), &mut o).await
            }
            (None, _) => {
                let e = ForwardError::NoRoute { host: String::from_utf8_lossy(&self.host).into_owned(), path: path() };
                self.answer_error(&e, &mut o).await
            }
            (Some(r), None) => {
                o.service = Some(r.service.as_str());
                self.answer_error(&ForwardError::NoHealthyBackend(r.service.clone()), &mut o).await
            }
            (Some(_), Some(svc)) => {
                o.service = Some(svc.name.as_str());
                self.forward(svc, body_len as usize, conn, sent_at, &mut o).await
            }
        };
        let taken = end.min(self.rbuf.len());
        consume(&mut self.rbuf, taken);
        self.shared.count_response(self.listener, o.service.unwrap_or("-"), o.status, o.tries, None);
        if let Some((method, path)) = logged {
            tracing::info!(
                target: "drover_proxy::access",
                request_id = %String::from_utf8_lossy(&self.id),
                listener = %self.listener,
                peer = %self.client,
                %method,
                %path,
                status = o.status,
                service = o.service.unwrap_or("-"),
                backend = %o.backend.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
                tries = o.tries,
                cache = "-",
                ms = start.elapsed().as_millis() as u64,
                error = o.error.as_deref().unwrap_or(""),
                "access"
            );
        }
        drop(o);
        self.snapshot = Some((generation, snap));
        next
    }

    /// Writes the upstream head (without its final CRLF, which the attempt adds after
    /// a Host line when the client sent none) into `out`; says whether it has a Host.
    fn upstream_head(&mut self, conn: u32) -> bool {
        let buf = &self.rbuf[..];
        let h = &self.req;
        let out = &mut self.out;
        out.clear();
        // The request line goes on as it came when it is already `METHOD SP target SP
        // HTTP/1.1 CRLF` (the fast path takes only HTTP/1.1), and opens the first run.
        let line_end = h.target.end + b" HTTP/1.1\r\n".len();
        let mut lines = if buf.get(h.method.end) == Some(&b' ')
            && h.target.start == h.method.end + 1
            && buf.get(h.target.end..line_end) == Some(&b" HTTP/1.1\r\n"[..])
        {
            Lines::starting_with(h.method.start..line_end)
        } else {
            out.extend_from_slice(&buf[h.method.clone()]);
            out.push(b' ');
            out.extend_from_slice(&buf[h.target.clone()]);
            out.extend_from_slice(b" HTTP/1.1\r\n");
            Lines::default()
        };
        let (mut host, mut xff, mut fwd) = (None, None, None);
        for (nr, vr) in &h.headers {
            let (n, v) = (&buf[nr.clone()], &buf[vr.clone()]);
            if hop_by_hop(n) || named_by_connection(buf, &h.headers, conn, n) {
                continue;
            }
            if eq(n, "x-forwarded-for") {
                xff = xff.or(Some(v));
                continue;
            }
            if eq(n, "forwarded") {
                fwd = fwd.or(Some(v));
                continue;
            }
            if eq(n, "x-forwarded-host") || eq(n, "x-forwarded-proto") || eq(n, "x-request-id") {
                continue;
            }
            if eq(n, "host") {
                host = Some(v);
            }
            lines.push(out, buf, nr, vr);
        }
        lines.flush(out, buf);
        if let Some(host) = host {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(host);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = xff.filter(|v| visible_ascii(v)) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(&self.xff);
        out.extend_from_slice(b"\r\n");
        let proto: &[u8] = if self.flags.https { b"https" } else { b"http" };
        out.extend_from_slice(b"x-forwarded-proto: ");
        out.extend_from_slice(proto);
        out.extend_from_slice(b"\r\nforwarded: ");
        if let Some(prev) = fwd.filter(|v| visible_ascii(v)) {
            out.extend_from_slice(prev);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(&self.forwarded_for);
        out.extend_from_slice(b";proto=");
        out.extend_from_slice(proto);
        if let Some(host) = host.filter(|v| visible_ascii(v)) {
            out.extend_from_slice(b";host=\"");
            out.extend_from_slice(host);
            out.push(b'"');
        }
        out.extend_from_slice(b"\r\nx-request-id: ");
        out.extend_from_slice(&self.id);
        out.extend_from_slice(b"\r\n");
        host.is_some()
    }

    /// Sends the request to backends by the retry rules until one answers.
    /// `now` is when the request was ready to go: every deadline counts from it.
    async fn forward(&mut self, svc: &Service, body_len: usize, conn: u32, now: Instant, o: &mut Outcome<'_>) -> Next {
        let has_host = self.upstream_head(conn);
        let base = self.out.len();
        let idempotent = is_idempotent_method(&self.rbuf[self.req.method.clone()]);
        let aff = Affinity {
            key: match (svc.cfg.balance, &svc.cfg.hash_on) {
                (Balance::Hash, Some(on)) => crate::affinity::hash_key(on, &http::HeaderMap::new(), self.client.ip()),
                _ => None,
            },
            pin: None,
        };
        svc.note_request();
        let queue_deadline = tokio::time::Instant::from_std(now) + Duration::from_millis(svc.cfg.queue_timeout_ms);
        let mut tried = HashSet::new();
        let mut resends = 0;
        let mut last: Option<ForwardError> = None;
        loop {
            // A resend reads the clock again: an ejection may have begun meanwhile.
            let at = if resends == 0 { now } else { Instant::now() };
            let (b, guard) = match svc.acquire_queued_counted(&tried, queue_deadline, aff, at).await {
                Ok(x) => x,
                Err(Unavailable::Saturated) => {
                    return self.answer_error(&ForwardError::Saturated(svc.name.clone()), o).await;
                }
                Err(Unavailable::NoneHealthy) => {
                    let e = last.take().unwrap_or_else(|| ForwardError::NoHealthyBackend(svc.name.clone()));
                    return self.answer_error(&e, o).await;
                }
            };
            o.backend = Some(b.addr);
            o.tries += 1;
            self.out.truncate(base);
            if !has_host {
                self.out.extend_from_slice(b"host: ");
                self.out.extend_from_slice(b.host.as_bytes());
                self.out.extend_from_slice(b"\r\n");
            }
            self.out.extend_from_slice(b"\r\n");
            let body = self.req.len..self.req.len + body_len;
            self.out.extend_from_slice(&self.rbuf[body]);
            let started = (svc.cfg.balance == Balance::P2cEwma).then(Instant::now);
            let ms = svc.cfg.request_timeout_ms;
            let connect_timeout = Duration::from_millis(svc.cfg.connect_timeout_ms);
            let deadline = tokio::time::Instant::from_std(at) + Duration::from_millis(ms);
            let mut timer = self.timer.take().expect("the timer is put back after each attempt");
            let r = within(&mut timer, || deadline, self.exchange(b, connect_timeout, at)).await;
            self.timer = Some(timer);
            let r = r.unwrap_or(Err(Failed::Timeout));
            if let Some(started) = started {
                let ok = r.is_ok() && self.resp.status < 500;
                b.observe_latency(if ok { started.elapsed() } else { started.elapsed().max(EWMA_FAILURE_PENALTY) });
            }
            let err = match r {
                Ok(up) => return self.relay(up, b, guard, at, o).await,
                Err(Failed::Connect(e)) => {
                    let reason = crate::backend::connect_reason(&e);
                    b.record_failure(&reason);
                    ForwardError::Connect { addr: b.addr, reason }
                }
                Err(Failed::Lost(reason)) => {
                    b.record_failure("connection lost");
                    ForwardError::Reset { addr: b.addr, reason }
                }
                Err(Failed::Timeout) => ForwardError::Timeout { addr: b.addr, ms },
            };
            drop(guard);
            let resend = match &err {
                ForwardError::Connect { .. } => true,
                ForwardError::Reset { .. } => idempotent && body_len == 0,
                _ => false,
            };
            tracing::debug!(request_id = %String::from_utf8_lossy(&self.id), backend = %b.addr, resend, "{err}");
            if !resend || resends >= svc.cfg.retries || !svc.take_retry() {
                return self.answer_error(&err, o).await;
            }
            tried.insert(b.addr);
            resends += 1;
            last = Some(err);
        }
    }

    /// Writes `out` to a pooled or new connection to `b` and reads the response head
    /// into `ubuf` / `resp`. A pooled connection that fails the write had closed while
    /// idle (nothing reached the backend), so a new one is tried.
    /// `now`: the attempt's start, the clock reading the pool judges idle sockets by.
    async fn exchange(&mut self, b: &Backend, connect_timeout: Duration, now: Instant) -> Result<TcpStream, Failed> {
        let mut up = loop {
            let (mut up, reused) = match b.pool.take_stream(now) {
                Some(s) => (s, true),
                None => (connect_stream(b.addr, connect_timeout).await.map_err(Failed::Connect)?, false),
            };
            match send(&mut up, &self.out, &mut None, None).await {
                Ok(()) => break up,
                Err(_) if reused => continue,
                Err(e) => return Err(Failed::Lost(e.to_string())),
            }
        };
        self.ubuf.clear();
        loop {
            if !self.ubuf.is_empty() {
                match parse_response(&self.ubuf, &mut self.resp) {
                    // Informational answers (103 Early Hints, a stray 100) are skipped, as hyper does.
                    Parsed::Complete if (100..200).contains(&self.resp.status) && self.resp.status != 101 => {
                        self.ubuf.advance(self.resp.len);
                        continue;
                    }
                    Parsed::Complete => return Ok(up),
                    Parsed::Invalid => return Err(Failed::Lost("invalid response head".into())),
                    Parsed::Partial if self.ubuf.len() > MAX_HEAD => {
                        return Err(Failed::Lost("response head too large".into()));
                    }
                    Parsed::Partial => {}
                }
            }
            self.ubuf.reserve(READ_CHUNK);
            match up.read_buf(&mut self.ubuf).await {
                Ok(0) => return Err(Failed::Lost("connection closed before message completed".into())),
                Ok(_) => {}
                Err(e) => return Err(Failed::Lost(e.to_string())),
            }
        }
    }

    /// Sends the response whose head is in `ubuf` on to the client, then gives the
    /// upstream connection back when the whole response came and nothing followed it.
    /// `sent_at` (the attempt's start) stamps the upstream socket when it goes back to
    /// the pool: a little early, so it expires a little early, for no clock reading.
    async fn relay(
        &mut self,
        mut up: TcpStream,
        b: &Backend,
        guard: Counted<'_>,
        sent_at: Instant,
        o: &mut Outcome<'_>,
    ) -> Next {
        let status = self.resp.status;
        o.status = status;
        if status == 101 {
            // No Upgrade was sent, so a 101 is a broken backend.
            b.record_failure("connection lost");
            let e = ForwardError::Reset { addr: b.addr, reason: "101 to a request without Upgrade".into() };
            return self.answer_error(&e, o).await;
        }
        if status >= 500 {
            b.record_failure(&format!("HTTP {status}"));
        } else {
            b.record_success();
        }
        let head_req = &self.rbuf[self.req.method.clone()] == b"HEAD";
        self.closing |= self.draining();
        let buf = &self.ubuf[..];
        let h = &self.resp;
        let (mut length, mut chunked, mut te, mut reusable, mut conn) = (None, false, false, h.minor == 1, 0u32);
        for (n, v) in &h.headers {
            let (n, v) = (&buf[n.clone()], &buf[v.clone()]);
            if eq(n, "content-length") {
                match parse_len(v) {
                    Some(len) if length.is_none_or(|l| l == len) => length = Some(len),
                    _ => {
                        b.record_failure("connection lost");
                        let e = ForwardError::Reset { addr: b.addr, reason: "invalid content-length".into() };
                        return self.answer_error(&e, o).await;
                    }
                }
            } else if eq(n, "transfer-encoding") {
                te = true;
                chunked = tokens(v).last().is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
            } else if eq(n, "connection") {
                conn += names_headers(v);
                if tokens(v).any(|t| t.eq_ignore_ascii_case(b"close")) {
                    reusable = false;
                }
            }
        }
        let framing = if head_req || status == 204 || status == 304 {
            Framing::None
        } else if te {
            if chunked { Framing::Chunked } else { Framing::UntilClose }
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        if te && length.is_some() || framing == Framing::UntilClose {
            reusable = false;
        }
        let out = &mut self.out;
        out.clear();
        // httparse took exactly three digits.
        let digits = [b'0' + (status / 100) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8];
        // A status line already `HTTP/1.1 SP code SP reason CRLF` goes on as it came,
        // opening the first run.
        let reason_at = b"HTTP/1.1 200 ".len();
        let mut lines = if buf.starts_with(b"HTTP/1.1 ")
            && buf.get(9..13) == Some(&[digits[0], digits[1], digits[2], b' '][..])
            && h.target.start == reason_at
            && buf.get(h.target.end..h.target.end + 2) == Some(&b"\r\n"[..])
        {
            Lines::starting_with(0..h.target.end + 2)
        } else {
            out.extend_from_slice(b"HTTP/1.1 ");
            out.extend_from_slice(&digits);
            out.push(b' ');
            out.extend_from_slice(&buf[h.target.clone()]);
            out.extend_from_slice(b"\r\n");
            Lines::default()
        };
        for (nr, vr) in &h.headers {
            let n = &buf[nr.clone()];
            if hop_by_hop(n) || eq(n, "x-request-id") || named_by_connection(buf, &h.headers, conn, n) {
                continue;
            }
            lines.push(out, buf, nr, vr);
        }
        lines.flush(out, buf);
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(&self.id);
        out.extend_from_slice(b"\r\n");
        if matches!(framing, Framing::Chunked | Framing::UntilClose) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if self.closing {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let head_len = self.resp.len;
        consume(&mut self.ubuf, head_len);
        // The backend's part ends with the last byte read from it: the in-flight count
        // drops then, before that byte is written on, so that a client that has its
        // answer sees the backend idle (or drained), as with hyper's path.
        let mut guard = Some(guard);
        let complete = match framing {
            Framing::None => {
                guard = None;
                send(&mut self.down, &self.out, &mut self.timer, self.stall).await.ok().map(|()| true)
            }
            Framing::Length(n) => self.relay_length(&mut up, n, &mut guard).await,
            Framing::Chunked => self.relay_chunked(&mut up, &mut guard).await,
            Framing::UntilClose => self.relay_until_close(&mut up, &mut guard).await,
        };
        drop(guard);
        match complete {
            // The whole response went on.
            Some(true) => {
                if reusable && self.ubuf.is_empty() {
                    b.pool.put_stream(up, sent_at);
                }
                Next::Request
            }
            // The backend's side broke mid-body: the client cannot be told but by a close.
            Some(false) => Next::Close,
            // The client went away.
            None => Next::Close,
        }
    }

    /// Sends the response head (in `out`) and the first `n` body bytes buffered in
    /// `ubuf`, consuming them: one write when the body part is small, so a short
    /// response costs one system call. `None` when the client is gone.
    async fn send_head_and_body(&mut self, n: usize) -> Option<()> {
        if n <= COALESCE {
            self.out.extend_from_slice(&self.ubuf[..n]);
            send(&mut self.down, &self.out, &mut self.timer, self.stall).await.ok()?;
        } else {
            send(&mut self.down, &self.out, &mut self.timer, self.stall).await.ok()?;
            send(&mut self.down, &self.ubuf[..n], &mut self.timer, self.stall).await.ok()?;
        }
        consume(&mut self.ubuf, n);
        Some(())
    }

    /// `Some(true)` when done, `Some(false)` when the backend broke off, `None` when
    /// the client did. `out` holds the response head on entry.
    async fn relay_length(&mut self, up: &mut TcpStream, n: u64, guard: &mut Option<Counted<'_>>) -> Option<bool> {
        let mut left = n;
        let first = (self.ubuf.len() as u64).min(left) as usize;
        if first as u64 == left {
            guard.take();
        }
        self.send_head_and_body(first).await?;
        left -= first as u64;
        while left > 0 {
            self.ubuf.clear();
            self.ubuf.reserve(READ_CHUNK);
            match bounded(&mut self.timer, self.stall, up.read_buf(&mut self.ubuf)).await {
                Ok(0) | Err(_) => return Some(false),
                Ok(_) => {}
            }
            let take = (self.ubuf.len() as u64).min(left) as usize;
            if take as u64 == left {
                guard.take();
            }
            send(&mut self.down, &self.ubuf[..take], &mut self.timer, self.stall).await.ok()?;
            consume(&mut self.ubuf, take);
            left -= take as u64;
        }
        Some(true)
    }

    async fn relay_chunked(&mut self, up: &mut TcpStream, guard: &mut Option<Counted<'_>>) -> Option<bool> {
        let mut dec = Chunked::default();
        let Some(n) = dec.feed(&self.ubuf) else { return Some(false) };
        if dec.done() {
            guard.take();
        }
        self.send_head_and_body(n).await?;
        while !dec.done() {
            self.ubuf.clear();
            self.ubuf.reserve(READ_CHUNK);
            match bounded(&mut self.timer, self.stall, up.read_buf(&mut self.ubuf)).await {
                Ok(0) | Err(_) => return Some(false),
                Ok(_) => {}
            }
            let Some(n) = dec.feed(&self.ubuf) else { return Some(false) };
            if dec.done() {
                guard.take();
            }
            send(&mut self.down, &self.ubuf[..n], &mut self.timer, self.stall).await.ok()?;
            consume(&mut self.ubuf, n);
        }
        Some(true)
    }

    /// A body that ends when the backend closes goes on chunked, so the client
    /// connection stays open.
    async fn relay_until_close(&mut self, up: &mut TcpStream, guard: &mut Option<Counted<'_>>) -> Option<bool> {
        loop {
            if !self.ubuf.is_empty() {
                let _ = write!(self.out, "{:x}\r\n", self.ubuf.len());
                self.out.extend_from_slice(&self.ubuf);
                self.out.extend_from_slice(b"\r\n");
                self.ubuf.clear();
            }
            if !self.out.is_empty() {
                send(&mut self.down, &self.out, &mut self.timer, self.stall).await.ok()?;
                self.out.clear();
            }
            self.ubuf.reserve(READ_CHUNK);
            match bounded(&mut self.timer, self.stall, up.read_buf(&mut self.ubuf)).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return Some(false),
            }
        }
        guard.take();
        send(&mut self.down, b"0\r\n\r\n", &mut self.timer, self.stall).await.ok()?;
        Some(true)
    }

    /// The proxy's own answer: `{code} {error}` as text, as the hyper path writes it.
    async fn answer_error(&mut self, e: &ForwardError, o: &mut Outcome<'_>) -> Next {
        let status = e.status();
        o.status = status.as_u16();
        o.error = Some(format!("{:?}: {e}", e.side()));
        self.closing |= self.draining();
        let body = format!("{} {e}\n", status.as_u16());
        let out = &mut self.out;
        out.clear();
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nx-request-id: ",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        );
        out.extend_from_slice(&self.id);
        out.extend_from_slice(b"\r\n");
        if self.closing {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
        match send(&mut self.down, &self.out, &mut self.timer, self.stall).await {
            Ok(()) => Next::Request,
            Err(_) => Next::Close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(chunks: &[&[u8]]) -> (Option<usize>, bool) {
        let mut d = Chunked::default();
        let mut last = Some(0);
        for c in chunks {
            last = d.feed(c);
            if last.is_none() {
                break;
            }
        }
        (last, d.done())
    }

    /// A client socket whose shutdown never finishes: a TLS stream that cannot write its
    /// close_notify to a client that stopped reading.
    struct ShutdownStuck;

    impl AsyncRead for ShutdownStuck {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for ShutdownStuck {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutdown_the_client_does_not_take_is_cut_after_the_stall_limit() {
        let activity = crate::lifetime::Activity::new();
        let limit = activity.send_stall().expect("a default limit");
        let mut io = Prefixed::new(ShutdownStuck, None).bound_writes(activity);
        let began = tokio::time::Instant::now();
        let e = tokio::time::timeout(limit * 10, io.shutdown())
            .await
            .expect("cut by the limit, not left waiting")
            .expect_err("the shutdown cannot finish");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert_eq!(began.elapsed(), limit, "cut when the limit ran out, not before or later");
        // Unbounded writes (hyper's path without a limit) wait on.
        let mut io = Prefixed::new(ShutdownStuck, None);
        let waited = tokio::time::timeout(limit * 10, io.shutdown()).await;
        assert!(waited.is_err(), "an unbounded shutdown waits: {waited:?}");
    }

    #[test]
    fn chunked_framing_ends_after_the_last_chunk_and_trailers() {
        let msg = b"5\r\nhello\r\n1;ext=1\r\n \r\n0\r\nx-t: 1\r\n\r\nGET / HTTP/1.1";
        let mut d = Chunked::default();
        let n = d.feed(msg).unwrap();
        assert!(d.done());
        assert_eq!(&msg[n..], b"GET / HTTP/1.1");
        // Split at every byte: the decoder keeps its place across reads.
        let mut d = Chunked::default();
        let body = &msg[..n];
        for b in body {
            assert_eq!(d.feed(std::slice::from_ref(b)), Some(1));
        }
        assert!(d.done());
    }

    #[test]
    fn malformed_chunk_sizes_are_refused() {
        assert_eq!(body_of(&[b"zz\r\n"]), (None, false));
        assert_eq!(body_of(&[b"\r\n"]), (None, false));
        assert_eq!(body_of(&[b"ffffffffffffffffff\r\n"]), (None, false));
        assert_eq!(body_of(&[b"3\r\nabcX"]), (None, false));
    }

    #[test]
    fn request_heads_are_parsed_in_place() {
        let buf = b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\nrest";
        let mut h = Head::default();
        assert!(matches!(parse_request(buf, &mut h), Parsed::Complete));
        assert_eq!(&buf[h.method.clone()], b"GET");
        assert_eq!(&buf[h.target.clone()], b"/a?b");
        assert_eq!(h.len, buf.len() - 4);
        assert_eq!(&buf[h.headers[1].1.clone()], b"1");
        assert!(matches!(parse_request(b"GET / HTTP/1.1\r\nHo", &mut h), Parsed::Partial));
        assert!(matches!(parse_request(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", &mut h), Parsed::Invalid));
    }

    #[test]
    fn only_connection_tokens_other_than_close_and_keep_alive_name_headers() {
        assert_eq!(names_headers(b"keep-alive"), 0);
        assert_eq!(names_headers(b"Close, Keep-Alive"), 0);
        assert_eq!(names_headers(b"keep-alive, x-secret"), 1);
        let buf = b"connection: close, x-a\r\n";
        let headers = [(0..10, 12..22)];
        assert!(named_by_connection(buf, &headers, 1, b"X-A"));
        assert!(!named_by_connection(buf, &headers, 1, b"x-b"));
        assert!(!named_by_connection(buf, &headers, 0, b"x-a"), "no header named: no scan");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_left_from_an_earlier_request_is_moved_on_not_taken_as_this_ones_expiry() {
        let t0 = tokio::time::Instant::now();
        let mut timer = Timer::new(t0);
        // First request: done long before its deadline.
        let first = within(&mut timer, || t0 + Duration::from_secs(30), async { 1 }).await;
        assert_eq!(first, Some(1));
        // The next one, 40 s later, takes 5 s; the timer still says t0, long past.
        tokio::time::advance(Duration::from_secs(40)).await;
        let start = tokio::time::Instant::now();
        let slow =
            within(&mut timer, || start + Duration::from_secs(30), tokio::time::sleep(Duration::from_secs(5))).await;
        assert_eq!(slow, Some(()));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(timer.deadline(), start + Duration::from_secs(30), "moved to this request's deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_still_waiting_at_its_deadline_times_out_then() {
        let t0 = tokio::time::Instant::now();
        let mut timer = Timer::new(t0 + Duration::from_secs(100));
        let never = within(&mut timer, || t0 + Duration::from_secs(2), std::future::pending::<()>()).await;
        assert_eq!(never, None);
        assert_eq!(t0.elapsed(), Duration::from_secs(2), "a timer set later is brought forward");
        // A later request with a shorter timeout than the timer's leftover deadline.
        let t1 = tokio::time::Instant::now();
        let never = within(&mut timer, || t1 + Duration::from_millis(300), std::future::pending::<()>()).await;
        assert_eq!(never, None);
        assert_eq!(t1.elapsed(), Duration::from_millis(300));
    }

    #[test]
    fn header_lines_are_written_in_one_form_however_they_came_and_whichever_are_left_out() {
        let raw = b"GET /a HTTP/1.1\r\nA: 1\r\nB:2\r\nC:  3\r\nD: 4\r\nX: gone\r\nE: 5\r\nF: 6 \r\n\r\n";
        let mut head = Head::default();
        assert!(matches!(parse_request(raw, &mut head), Parsed::Complete));
        let mut out = Vec::new();
        let mut lines = Lines::starting_with(0..b"GET /a HTTP/1.1\r\n".len());
        for (n, v) in &head.headers {
            if !eq(&raw[n.clone()], "x") {
                lines.push(&mut out, raw, n, v);
            }
        }
        lines.flush(&mut out, raw);
        let want = "GET /a HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\nF: 6\r\n";
        assert_eq!(String::from_utf8_lossy(&out), want);
    }

    #[test]
    fn or_0x20_is_ignoring_case_on_parsed_bytes() {
        // Every byte httparse lets into a header name or value, against every byte a
        // literal of `eq` may hold.
        let parsed = (0x20..=0xffu8).filter(|&c| c != 0x7f).chain([b'\t']);
        for c in parsed {
            for l in (b'a'..=b'z').chain(b'0'..=b'9').chain([b'-']) {
                assert_eq!(c | 0x20 == l, c.eq_ignore_ascii_case(&l), "{c:#04x} against {:?}", l as char);
            }
        }
        assert!(eq(b"Content-Length", "content-length"));
        assert!(!eq(b"Content-Lengths", "content-length"));
    }

    #[test]
    fn visible_ascii_of_a_parsed_value_is_its_ascii_test() {
        let visible = |v: &[u8]| v.iter().all(|&c| c == b'\t' || (0x20..0x7f).contains(&c));
        for c in 0..=255u8 {
            let mut raw = b"GET / HTTP/1.1\r\nx-v: a".to_vec();
            raw.extend_from_slice(&[c, b'b']);
            raw.extend_from_slice(b"\r\n\r\n");
            let mut head = Head::default();
            if let Parsed::Complete = parse_request(&raw, &mut head) {
                let v = &raw[head.headers[0].1.clone()];
                assert_eq!(visible_ascii(v), visible(v), "byte {c:#04x} in {v:?}");
            }
        }
    }

    #[test]
    fn content_lengths_are_plain_digits() {
        assert_eq!(parse_len(b"0"), Some(0));
        assert_eq!(parse_len(b"123"), Some(123));
        assert_eq!(parse_len(b"+1"), None);
        assert_eq!(parse_len(b""), None);
        assert_eq!(parse_len(b"99999999999999999999"), None);
    }
}
