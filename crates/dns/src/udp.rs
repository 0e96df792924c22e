//! The UDP hot path: one OS thread per SO_REUSEPORT socket, reading and answering in batches.
//!
//! Why batches: with the answer a hash hit on pre-encoded bytes, a worker's time under load
//! went to the two system calls per query (`recvfrom`, `sendto`). `recvmmsg` with
//! MSG_WAITFORONE blocks for the first datagram and then takes whatever else is already
//! queued, up to [`BATCH`], in the same call; the answers leave together through one
//! `sendmmsg`. A lone query is a batch of one and is answered as soon as it arrives, so
//! batching adds no latency at low load.
//!
//! Per batch, not per packet: the stop flag, the table generation check (one atomic load;
//! the lock and `Arc` clone only when the table changed). Per packet: parse, the table's
//! answer, and RRL only when it is configured.

use crate::rrl::{Rrl, Verdict};
use crate::server::{Shared, formerr};
use crate::table::{Picker, Reply, Table};
use crate::wire::{self, Bad};
use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Datagrams per system call at most. Knot 3.2 batches too (10 at a time, as strace shows);
/// under dnsperf (200 queries outstanding) drover's batches averaged about 18 queries.
pub const BATCH: usize = 32;
/// The largest UDP payload: a query is never cut short, as with the single read before.
const SLOT: usize = 65535;
/// Slot spacing: one cache line more than 64 KiB, so the slots' first bytes (where the
/// header and question are read) do not all fall in the same L1 cache set.
const STRIDE: usize = 65536 + 64;

/// Serves `sock` until `stop` is set (checked at least every read timeout of the socket).
pub fn worker(sock: UdpSocket, shared: Arc<Shared>, stop: Arc<AtomicBool>, rate: u32, slip: u32) {
    let fd = sock.as_raw_fd();
    // Zeroed allocations this large are mapped lazily: only the pages datagrams land in are touched.
    let mut rx_bufs = vec![0u8; BATCH * STRIDE];
    let mut rx = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    let mut tx = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
    // (length, source) of each datagram of the batch, in slot order.
    let mut received: Vec<(usize, Option<SockaddrStorage>)> = Vec::with_capacity(BATCH);
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(4096)).collect();
    let mut dests: Vec<Option<SockaddrStorage>> = Vec::with_capacity(BATCH);
    let mut table = shared.load();
    let mut generation = shared.generation();
    let mut picker = Picker::default();
    let mut rrl = (rate > 0).then(|| Rrl::new(rate, slip));
    while !stop.load(Ordering::Relaxed) {
        received.clear();
        {
            let mut slots = rx_bufs.chunks_exact_mut(STRIDE);
            let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] =
                std::array::from_fn(|_| [IoSliceMut::new(&mut slots.next().expect("BATCH slots")[..SLOT])]);
            match recvmmsg(fd, &mut rx, iovs.iter_mut(), MsgFlags::MSG_WAITFORONE, None) {
                Ok(msgs) => received.extend(msgs.map(|m| (m.bytes, m.address))),
                Err(_) => continue, // the read timeout, or an ICMP error from an earlier send
            }
        }
        let g = shared.generation();
        if g != generation {
            table = shared.load();
            generation = g;
        }
        dests.clear();
        for (i, (len, addr)) in received.iter().enumerate() {
            let Some(addr) = addr else { continue };
            let Some(src) = ip_of(addr) else { continue };
            let pkt = &rx_bufs[i * STRIDE..i * STRIDE + len];
            if answer(&table, pkt, src, &mut picker, rrl.as_mut(), &mut outs[dests.len()]) {
                dests.push(Some(*addr));
            }
        }
        send_all(fd, &mut tx, &outs[..dests.len()], &dests);
    }
}

fn ip_of(a: &SockaddrStorage) -> Option<IpAddr> {
    match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
        (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
        (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
        _ => None,
    }
}

/// Writes the answer to `pkt` into `out`; false when nothing is to be sent.
fn answer(
    table: &Table,
    pkt: &[u8],
    src: IpAddr,
    picker: &mut Picker,
    rrl: Option<&mut Rrl>,
    out: &mut Vec<u8>,
) -> bool {
    match wire::parse_query(pkt) {
        Ok(q) => {
            if !matches!(table.respond(pkt, &q, src, true, picker, out), Reply::Send) {
                return false;
            }
            if let Some(r) = rrl {
                match r.check(src) {
                    Verdict::Answer => {}
                    Verdict::Drop => return false,
                    Verdict::Slip => {
                        table.header_only(pkt, &q, 0, out);
                        let f = wire::get_u16(out, 2) | wire::FLAG_TC | wire::FLAG_AA;
                        wire::set_u16(out, 2, f);
                    }
                }
            }
            true
        }
        Err(Bad::Drop) => false,
        Err(Bad::FormErr { id, flags }) => {
            formerr(id, flags, out);
            true
        }
    }
}

/// Sends `outs[i]` to `dests[i]`, all of them, in as few calls as the kernel allows. A
/// message the kernel refuses is skipped, as a failed `sendto` of a lone answer was.
fn send_all(fd: i32, tx: &mut MultiHeaders<SockaddrStorage>, outs: &[Vec<u8>], dests: &[Option<SockaddrStorage>]) {
    const NO_CMSGS: [ControlMessage<'static>; 0] = [];
    let mut sent = 0;
    while sent < outs.len() {
        let rest = &outs[sent..];
        let iovs: [[IoSlice<'_>; 1]; BATCH] =
            std::array::from_fn(|j| [IoSlice::new(rest.get(j).map_or(&[][..], |o| o.as_slice()))]);
        match sendmmsg(fd, tx, &iovs[..rest.len()], &dests[sent..], NO_CMSGS, MsgFlags::empty()) {
            // sendmmsg sends at least one message or fails.
            Ok(done) => sent += done.count().max(1),
            Err(_) => sent += 1,
        }
    }
}
