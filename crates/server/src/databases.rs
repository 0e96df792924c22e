//! Database clusters (`[databases.NAME]`): what members' agents report about their
//! PostgreSQL, and orders sent to them and their outcomes. The failover loop that
//! decides from these (with `drover_db::decide`) runs over this registry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::oneshot;

/// A member's last report: its `DbStatus` as JSON or the probe's error, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub cluster: String,
    pub status: Result<serde_json::Value, String>,
    pub at_ms: i64,
}

#[derive(Default)]
pub struct Registry {
    reports: Mutex<HashMap<String, Report>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<(bool, String)>>>,
    next_order: AtomicU64,
}

impl Registry {
    pub fn report(&self, member: &str, cluster: String, status: Option<serde_json::Value>, error: Option<String>) {
        let status = match (status, error) {
            (Some(s), _) => Ok(s),
            (None, e) => Err(e.unwrap_or_else(|| "no status".into())),
        };
        let r = Report { cluster, status, at_ms: drover_core::time::now_ms() };
        self.reports.lock().expect("reports lock").insert(member.to_string(), r);
    }

    pub fn last_report(&self, member: &str) -> Option<Report> {
        self.reports.lock().expect("reports lock").get(member).cloned()
    }

    /// A fresh order id and the receiver of its outcome.
    pub fn new_order(&self) -> (u64, oneshot::Receiver<(bool, String)>) {
        let id = self.next_order.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        (id, rx)
    }

    pub fn forget_order(&self, id: u64) {
        self.pending.lock().expect("pending lock").remove(&id);
    }

    pub fn order_done(&self, id: u64, ok: bool, detail: String) {
        if let Some(tx) = self.pending.lock().expect("pending lock").remove(&id) {
            let _ = tx.send((ok, detail));
        }
    }
}
