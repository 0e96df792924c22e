//! Helpers shared by the workspace's tests and test harnesses.
//!
//! | item | what |
//! |---|---|
//! | [`free_port`] | a loopback port free on TCP and UDP, never handed out twice in one process |
//!
//! Tests start real processes that must be told their port before they bind it, so a
//! port is chosen, released and bound again later by someone else. Two things can take
//! it in between, and both made tests fail at random: another test of the same process
//! that was given the same port (the kernel hands a just-released ephemeral port out
//! again), and an outgoing connection of any test, whose local port the kernel also
//! takes from the ephemeral range. So ports come from below that range, and one
//! process-wide record keeps every port given; all the crates' tests share it by
//! calling this one function.
#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::Mutex;

/// Lowest port handed out: clear of the well-known and common service ports.
const LOWEST: u16 = 10_000;
/// Used when the kernel's ephemeral range cannot be read (its Linux default start).
const DEFAULT_EPHEMERAL_START: u16 = 32_768;

/// A port on 127.0.0.1 that was free on both TCP and UDP when chosen, lies below the
/// kernel's ephemeral range (so no outgoing connection takes it meanwhile), and is
/// never returned twice by one process.
///
/// # Panics
/// When every port of the range has been handed out or is taken (a test leak).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // Below the ephemeral range when there is room there; on a machine whose range starts
    // low, the ports above LOWEST, where an outgoing connection may take one meanwhile.
    let top = ephemeral_start();
    let range = if top > LOWEST + 1_000 { LOWEST..top } else { LOWEST..u16::MAX };
    // Start at a place that differs between processes, so test binaries that overlap
    // (or a test's leftover child) do not walk the same ports in the same order.
    let start = std::process::id().wrapping_mul(7_919).wrapping_add(given.len() as u32);
    let port = pick(&given, range.clone(), start, bindable)
        .unwrap_or_else(|| panic!("no free port left in {range:?}: {} handed out already", given.len()));
    given.push(port);
    port
}

/// The first port of `range`, walking from `start` (wrapping), that is not in `given`
/// and that `free` accepts.
fn pick(given: &[u16], range: std::ops::Range<u16>, start: u32, free: impl Fn(u16) -> bool) -> Option<u16> {
    let span = u32::from(range.end - range.start);
    (0..span).map(|i| range.start + ((start.wrapping_add(i)) % span) as u16).find(|p| !given.contains(p) && free(*p))
}

/// Free on both TCP and UDP on 127.0.0.1 (name servers need both).
fn bindable(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() && UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(DEFAULT_EPHEMERAL_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_repeated_and_stay_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let top = ephemeral_start();
        if top > LOWEST + 1_000 {
            assert!(ports.iter().all(|&p| (LOWEST..top).contains(&p)), "{ports:?} not all in {LOWEST}..{top}");
        }
    }

    #[test]
    fn ports_given_or_in_use_are_skipped_and_the_walk_wraps() {
        // 20..25 from 23: 23 given, 24 in use, so 20 after wrapping.
        assert_eq!(pick(&[23], 20..25, 3, |p| p != 24), Some(20));
        assert_eq!(pick(&[20, 21], 20..23, 0, |p| p != 22), None);
    }

    #[test]
    fn a_handed_out_port_is_free_to_bind_on_tcp_and_udp() {
        let p = free_port();
        TcpListener::bind((Ipv4Addr::LOCALHOST, p)).expect("tcp");
        UdpSocket::bind((Ipv4Addr::LOCALHOST, p)).expect("udp");
    }
}
