//! Response rate limiting per source prefix (a /24 for IPv4, a /56 for IPv6), after Knot's
//! and BIND's RRL: past the rate in one second, answers are dropped, except every
//! `slip`-th, which goes out truncated (TC) so a real client behind a spoofed flood can
//! still get its answer over TCP. Each UDP worker keeps its own table: no shared lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

pub enum Verdict {
    Answer,
    Drop,
    Slip,
}

pub struct Rrl {
    rate: u32,
    slip: u32,
    start: Instant,
    buckets: HashMap<u64, (u32, u32)>,
    limited: u32,
}

fn prefix(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => (u32::from(a) >> 8) as u64,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => (u32::from(v4) >> 8) as u64,
            None => (u128::from(a) >> 72) as u64 | (1 << 63),
        },
    }
}

impl Rrl {
    pub fn new(rate: u32, slip: u32) -> Rrl {
        Rrl { rate, slip, start: Instant::now(), buckets: HashMap::new(), limited: 0 }
    }

    pub fn check(&mut self, src: IpAddr) -> Verdict {
        let sec = self.start.elapsed().as_secs() as u32;
        if self.buckets.len() > 100_000 {
            // A flood from many prefixes: forget old windows rather than grow without bound.
            self.buckets.retain(|_, (s, _)| *s == sec);
        }
        let b = self.buckets.entry(prefix(src)).or_insert((sec, 0));
        if b.0 != sec {
            *b = (sec, 0);
        }
        b.1 += 1;
        if b.1 <= self.rate {
            return Verdict::Answer;
        }
        self.limited = self.limited.wrapping_add(1);
        if self.slip > 0 && self.limited.is_multiple_of(self.slip) { Verdict::Slip } else { Verdict::Drop }
    }
}
