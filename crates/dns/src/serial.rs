//! SOA serials that follow content and never go backwards, across restarts too.
//!
//! A zone's serial changes only when its content (every record but the SOA's serial)
//! changes. Fed by a control plane, it becomes the view's clock — the newest change the
//! server made to the view (a member's `changed_ms`, or a removal's time, carried by the
//! watch stream: [`drover_core::health::View::clock_ms`]), in milliseconds modulo 2^32 —
//! so name servers fed the same view agree on the serial whatever the order and timing in
//! which they saw earlier views; only when that would not be greater (RFC 1982 serial
//! arithmetic) than the previous serial does it become previous + 1.
//!
//! A view with no clock (standalone, or not fed yet) takes this machine's
//! clock in the same unit, set back by [`LOCAL_BACKDATE_MS`]: serials from two clocks
//! that wrap at different rates (unix seconds against milliseconds, as before) compare
//! at random under serial arithmetic, and a name server that stamped a serial on its own
//! before its first view must still take the view's clock once the view comes, or it
//! would disagree with its peers until the next change. The zone file's own serial is
//! not used: "at least the file's serial" has no stable meaning on a clock that wraps.
//!
//! Two cases still part name servers until the zone's content next changes. The clock is
//! the whole view's, so a change that leaves this zone's content alone (a member no pool
//! of it selects) moves the clock but not a running server's serial, while one started
//! after it stamps the later clock; a per-zone clock would need the server to know
//! which members each zone selects. And a name server that stamped its own serial while
//! the view last changed more than [`LOCAL_BACKDATE_MS`] before (no server and no state
//! file at its start) counts on from that serial; a serial once served cannot go back.
//! The last serial and a digest of the content are kept in a small JSON file when
//! configured.

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
    /// Loads `path` if given; an unreadable file starts empty (serials then start from the
    /// view's clock, or this machine's set back, as for a zone never served).
    pub fn open(path: Option<PathBuf>) -> Serials {
        let zones = match path.as_deref().map(drover_core::state_file::read_json) {
            Some(Ok(Some(z))) => z,
            Some(Err(e)) => {
                tracing::warn!("SOA serials unreadable ({e}); starting from the view's clock");
                BTreeMap::new()
            }
            _ => BTreeMap::new(),
        };
        Serials { path, zones }
    }

    /// The serial for `zone` with content `digest`, and whether it changed; `view_clock`
    /// is the control plane's time of the content (see [`view_clock`]; `None`: this
    /// machine's clock).
    pub fn serial(&mut self, zone: &str, digest: &str, view_clock: Option<u32>) -> (u32, bool) {
        self.serial_at(zone, digest, view_clock, drover_core::time::now_ms().max(0) as u64)
    }

    fn serial_at(&mut self, zone: &str, digest: &str, view_clock: Option<u32>, now_ms: u64) -> (u32, bool) {
        let stored = self.zones.get(zone);
        if let Some(s) = stored
            && s.digest == digest
        {
            return (s.serial, false);
        }
        let clock = view_clock.unwrap_or_else(|| local_clock(now_ms));
        let serial = match stored {
            Some(s) if !serial_gt(clock, s.serial) => s.serial.wrapping_add(1),
            _ => clock,
        };
        self.zones.insert(zone.to_string(), Stored { serial, digest: digest.to_string() });
        (serial, true)
    }

    #[cfg(test)]
    fn set(&mut self, zone: &str, serial: u32) {
        self.zones.insert(zone.to_string(), Stored { serial, digest: String::new() });
    }

    /// Writes the serials out (fsync'd): once per view change that moved any, before
    /// the table with them is served.
    pub fn save(&self) {
        let Some(p) = &self.path else { return };
        // A serial may never go back, so it must outlive the machine too.
        if let Err(e) = drover_core::state_file::write_json(p, &self.zones, true) {
            tracing::warn!(path = %p.display(), error = %e, "could not save SOA serials");
        }
    }
}

/// How far a serial stamped from this machine's clock is set back, so that a view the
/// control plane changed a little before it (clock skew, a name server that started
/// just before the feed delivered its first members) still counts as newer.
pub const LOCAL_BACKDATE_MS: u64 = 3_600_000;

/// This machine's clock in the unit of [`view_clock`], set back by [`LOCAL_BACKDATE_MS`].
fn local_clock(now_ms: u64) -> u32 {
    // `as u32` keeps the low 32 bits: the clock modulo 2^32.
    now_ms.saturating_sub(LOCAL_BACKDATE_MS) as u32
}

/// The control plane's clock for a view: its newest `changed_ms`, modulo 2^32
/// (milliseconds, so two changes in one second still get two serials).
pub fn view_clock(changed_ms: i64) -> Option<u32> {
    // `as u32` keeps the low 32 bits: the clock modulo 2^32.
    (changed_ms > 0).then_some(changed_ms as u32)
}

/// RFC 1982 §3.2: `a` is greater than `b` when it is ahead by less than 2^31.
pub fn serial_gt(a: u32, b: u32) -> bool {
    a != b && a.wrapping_sub(b) < (1 << 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_clock_decides_the_serial_whatever_came_before() {
        // RFC 1982: name servers fed the same view must agree; histories differ.
        let mut a = Serials::open(None);
        let mut b = Serials::open(None);
        assert_eq!(a.serial("z.", "v1", Some(1_000)), (1_000, true));
        assert_eq!(a.serial("z.", "v2", Some(1_005)), (1_005, true));
        assert_eq!(b.serial("z.", "v2", Some(1_005)), (1_005, true), "b never saw v1");
        // A clock that does not move forward still moves the serial.
        assert_eq!(a.serial("z.", "v3", Some(1_005)), (1_006, true));
        // Across the 2^32 wrap the clock still counts as ahead.
        let mut c = Serials::open(None);
        c.set("z.", u32::MAX - 5);
        assert_eq!(c.serial("z.", "v", Some(10)), (10, true));
        assert!(serial_gt(10, u32::MAX - 5) && !serial_gt(u32::MAX - 5, 10));
        assert_eq!(view_clock(0), None);
        assert_eq!(view_clock((1i64 << 32) + 7), Some(7));
    }

    #[test]
    fn serial_moves_only_on_change_and_survives_a_restart_without_going_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serials.json");
        let mut s = Serials::open(Some(path.clone()));
        let (a, changed) = s.serial("z.", "d1", None);
        assert!(changed);
        assert_eq!(s.serial("z.", "d1", None), (a, false), "same content, same serial");
        let (b, changed) = s.serial("z.", "d2", None);
        assert!(changed && serial_gt(b, a), "{a} -> {b}");
        s.save();
        let mut again = Serials::open(Some(path));
        assert_eq!(again.serial("z.", "d2", None), (b, false), "restart keeps the serial");
        let (c, _) = again.serial("z.", "d3", None);
        assert!(serial_gt(c, b));
    }

    #[test]
    fn a_serial_stamped_before_the_first_view_yields_to_the_views_clock_at_any_phase() {
        // The CI failure this pins: a name server fed an empty view first stamped unix
        // seconds, which lost to the view's millisecond clock under RFC 1982 arithmetic for
        // half of every 49.7-day cycle, so it kept its own serial while a peer that saw the
        // members first took the view's. Every phase of the wrap must behave alike.
        let ms_2026 = 1_795_405_298_000u64;
        for now_ms in [ms_2026, ms_2026 + (1 << 31), ms_2026 + (1 << 32) - 1, 1 << 31, 5] {
            // The members changed a little before this name server stamped its serial.
            let clock = view_clock((now_ms as i64 - 200).max(1)).unwrap();
            let mut a = Serials::open(None);
            let (own, _) = a.serial_at("z.", "empty", None, now_ms);
            assert_eq!(a.serial_at("z.", "members", Some(clock), now_ms + 50), (clock, true), "at {now_ms}");
            assert!(serial_gt(clock, own), "the view is newer than the own stamp at {now_ms}");
            let mut b = Serials::open(None);
            assert_eq!(
                b.serial_at("z.", "members", Some(clock), now_ms + 2_000),
                (clock, true),
                "b agrees at {now_ms}"
            );
        }
    }

    #[test]
    fn a_view_clock_in_the_upper_half_of_the_serial_space_is_taken_as_it_is() {
        // The zone file's serial (0 when `soa = {..}` is written inline) once acted as a
        // floor that "won" against every clock above 2^31.
        let mut a = Serials::open(None);
        assert_eq!(a.serial("z.", "v1", Some(3_000_000_000)), (3_000_000_000, true));
        assert_eq!(a.serial("z.", "v2", Some(3_000_000_100)), (3_000_000_100, true));
    }
}
