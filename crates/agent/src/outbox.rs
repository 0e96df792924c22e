//! Results waiting for the server's acknowledgement.
//!
//! Every result gets the next sequence number of this process, is kept until the server
//! acknowledges it (`Ack { up_to }` after storing it durably) and is re-sent after a
//! reconnect. The server drops re-sends it already stored, so this buffer only has to
//! err on the side of sending too often.

use drover_core::event::CheckResult;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How often a warning about dropped results may be logged: a long outage with busy
/// checks would otherwise write one line per dropped result.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct ResultBuffer {
    /// Ascending by seq, so acks pop from the front and lookups can binary-search.
    items: VecDeque<(u64, CheckResult)>,
    cap: usize,
    last_seq: u64,
    dropped: u64,
    last_drop_warning: Option<Instant>,
}

impl ResultBuffer {
    pub fn new(cap: usize) -> Self {
        // A zero cap would drop every result before it could be sent once.
        ResultBuffer { items: VecDeque::new(), cap: cap.max(1), last_seq: 0, dropped: 0, last_drop_warning: None }
    }

    /// Stores a result under the next sequence number, dropping the oldest when full.
    pub fn push(&mut self, result: CheckResult) -> u64 {
        self.last_seq += 1;
        if self.items.len() >= self.cap {
            self.items.pop_front();
            self.dropped += 1;
            let due = self.last_drop_warning.is_none_or(|t| t.elapsed() >= DROP_WARNING_EVERY);
            if due {
                self.last_drop_warning = Some(Instant::now());
                tracing::warn!(
                    dropped_total = self.dropped,
                    cap = self.cap,
                    "result buffer full: dropping the oldest unacknowledged results"
                );
            }
        }
        self.items.push_back((self.last_seq, result));
        self.last_seq
    }

    /// Forgets everything the server has stored.
    pub fn ack(&mut self, up_to: u64) {
        while self.items.front().is_some_and(|(seq, _)| *seq <= up_to) {
            self.items.pop_front();
        }
    }

    /// Up to `max` results with seq above `after`, in order.
    pub fn after(&self, after: u64, max: usize) -> Vec<(u64, CheckResult)> {
        let start = self.items.partition_point(|(seq, _)| *seq <= after);
        self.items.range(start..).take(max).cloned().collect()
    }

    pub fn has_after(&self, after: u64) -> bool {
        self.items.back().is_some_and(|(seq, _)| *seq > after)
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    #[cfg(test)]
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// The buffer plus a wake-up for the connection task.
pub(crate) struct Outbox {
    buffer: Mutex<ResultBuffer>,
    /// `notify_one` keeps a permit when the connection task is busy, so a result pushed
    /// while it sends something else is not missed.
    pub ready: Notify,
}

impl Outbox {
    pub fn new(cap: usize) -> Self {
        Outbox { buffer: Mutex::new(ResultBuffer::new(cap)), ready: Notify::new() }
    }

    pub fn enqueue(&self, result: CheckResult) -> u64 {
        let seq = self.lock().push(result);
        self.ready.notify_one();
        seq
    }

    pub fn ack(&self, up_to: u64) {
        self.lock().ack(up_to);
    }

    pub fn after(&self, after: u64, max: usize) -> Vec<(u64, CheckResult)> {
        self.lock().after(after, max)
    }

    pub fn has_after(&self, after: u64) -> bool {
        self.lock().has_after(after)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResultBuffer> {
        // Every critical section is a plain VecDeque operation; a panic inside one
        // leaves the deque consistent, so a poisoned lock is safe to keep using.
        self.buffer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::status::Status;

    fn result(check: &str) -> CheckResult {
        CheckResult::made_by_drover("", check, Status::Ok, String::new(), 0)
    }

    #[test]
    fn sequence_numbers_increase_and_ack_drops_up_to() {
        let mut b = ResultBuffer::new(10);
        assert_eq!(b.push(result("a")), 1);
        assert_eq!(b.push(result("b")), 2);
        assert_eq!(b.push(result("c")), 3);
        b.ack(2);
        assert_eq!(b.len(), 1);
        assert_eq!(b.after(0, 10)[0].0, 3);
        assert_eq!(b.push(result("d")), 4, "acks never reuse sequence numbers");
    }

    #[test]
    fn full_buffer_drops_oldest_and_counts() {
        let mut b = ResultBuffer::new(2);
        for c in ["a", "b", "c"] {
            b.push(result(c));
        }
        let kept: Vec<_> = b.after(0, 10).into_iter().map(|(s, r)| (s, r.check)).collect();
        assert_eq!(kept, [(2, "b".to_string()), (3, "c".to_string())]);
        assert_eq!(b.dropped(), 1);
    }

    #[test]
    fn after_returns_only_unsent_in_order_and_bounded() {
        let mut b = ResultBuffer::new(10);
        for c in ["a", "b", "c", "d"] {
            b.push(result(c));
        }
        let seqs: Vec<_> = b.after(1, 2).into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, [2, 3]);
        assert!(b.has_after(3));
        assert!(!b.has_after(4));
    }
}
