//! SOA serials that follow content and never go backwards, across restarts too.
//!
//! A zone's serial changes only when its content (every record but the SOA's serial)
//! changes; then it becomes max(previous + 1, clock, the zone file's serial). The clock
//! is the control plane's: the newest `changed_ms` in the member view, in seconds, so
//! name servers fed the same view agree on the serial (the local clock is used only
//! when there is no view). The last serial and a digest of the content are kept in a
//! small JSON file when configured.

use hickory_proto::rr::Record;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    serial: u32,
    digest: String,
}

#[derive(Debug, Default)]
pub struct Serials {
    path: Option<PathBuf>,
    zones: BTreeMap<String, Stored>,
}

/// A digest of a zone's content, the SOA's serial left out.
pub fn digest(soa: &Record, records: &[Record]) -> String {
    let mut soa = soa.clone();
    if let hickory_proto::rr::RData::SOA(s) = &mut soa.data {
        s.serial = 0;
    }
    let mut lines: Vec<String> = std::iter::once(&soa).chain(records).map(|r| r.to_string()).collect();
    lines.sort();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for l in &lines {
        ctx.update(l.as_bytes());
        ctx.update(b"\n");
    }
    data_encoding::HEXLOWER.encode(ctx.finish().as_ref())
}

impl Serials {
    /// Loads `path` if given; an unreadable file starts empty (serials then start from unix time).
    pub fn open(path: Option<PathBuf>) -> Serials {
        let zones = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Serials { path, zones }
    }

    /// The serial for `zone` with content `digest`, and whether it changed; `clock_secs`
    /// is the control plane's time of the content (`None`: this machine's clock).
    pub fn serial(&mut self, zone: &str, digest: &str, floor: u32, clock_secs: Option<u32>) -> (u32, bool) {
        let now = clock_secs.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
        });
        let stored = self.zones.get(zone);
        if let Some(s) = stored
            && s.digest == digest
        {
            return (s.serial, false);
        }
        let serial = stored.map(|s| s.serial.wrapping_add(1)).unwrap_or(0).max(now).max(floor);
        self.zones.insert(zone.to_string(), Stored { serial, digest: digest.to_string() });
        self.save();
        (serial, true)
    }

    fn save(&self) {
        let Some(p) = &self.path else { return };
        let tmp = p.with_extension("tmp");
        let body = serde_json::to_vec_pretty(&self.zones).expect("serializable");
        // Write then rename, so a crash leaves the old file or the new one, never half of one.
        if let Err(e) = std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, p)) {
            tracing::warn!(path = %p.display(), error = %e, "could not save SOA serials");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_moves_only_on_change_and_survives_a_restart_without_going_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serials.json");
        let mut s = Serials::open(Some(path.clone()));
        let (a, changed) = s.serial("z.", "d1", 0, None);
        assert!(changed);
        assert_eq!(s.serial("z.", "d1", 0, None), (a, false), "same content, same serial");
        let (b, changed) = s.serial("z.", "d2", 0, None);
        assert!(changed && b > a, "{a} -> {b}");
        let mut again = Serials::open(Some(path));
        assert_eq!(again.serial("z.", "d2", 0, None), (b, false), "restart keeps the serial");
        let (c, _) = again.serial("z.", "d3", 0, None);
        assert!(c > b);
    }
}
