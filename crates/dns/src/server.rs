//! The running name server: UDP workers (OS threads on SO_REUSEPORT sockets), the TCP
//! listener (tokio, also zone transfers), the builder that recompiles the table on every
//! member change, and NOTIFY to secondaries when a zone's serial moves.

use crate::config::DnsConfig;
use crate::pool::{self, Members};
use crate::serial::{self, Serials};
use crate::table::{Builder, Picker, Reply, Table, ZoneData};
use crate::wire::{self, Bad};
use crate::zone::{StaticZone, compile_static};
use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Zone(#[from] crate::zone::ZoneError),
}

/// The current table; UDP workers check `generation` per batch (one atomic load) and take
/// the lock only when it moved.
pub struct Shared {
    current: Mutex<Arc<Table>>,
    generation: AtomicU64,
}

impl Shared {
    pub(crate) fn load(&self) -> Arc<Table> {
        self.current.lock().expect("never poisoned: no panics under it").clone()
    }
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
    fn store(&self, t: Table) {
        *self.current.lock().expect("never poisoned") = Arc::new(t);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// A running name server; dropping it stops the UDP workers.
pub struct NameServer {
    pub local_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds the UDP sockets and the TCP listener on one address. With port 0 the kernel
/// picks the UDP port, which another program may hold for TCP: then it tries again.
fn bind_all(listen: SocketAddr, workers: usize) -> Result<(Vec<UdpSocket>, tokio::net::TcpListener), DnsError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match bind_once(listen, workers) {
            Err(DnsError::Bind { source, .. })
                if listen.port() == 0 && source.kind() == std::io::ErrorKind::AddrInUse && attempt < 20 => {}
            other => return other,
        }
    }
}

fn bind_once(listen: SocketAddr, workers: usize) -> Result<(Vec<UdpSocket>, tokio::net::TcpListener), DnsError> {
    let first = bind_udp(listen).map_err(|source| DnsError::Bind { addr: listen, source })?;
    let local_addr = first.local_addr().map_err(|source| DnsError::Bind { addr: listen, source })?;
    let mut sockets = vec![first];
    for _ in 1..workers {
        sockets.push(bind_udp(local_addr).map_err(|source| DnsError::Bind { addr: local_addr, source })?);
    }
    let tcp = {
        use socket2::{Domain, Protocol, Socket, Type};
        let s = Socket::new(Domain::for_address(local_addr), Type::STREAM, Some(Protocol::TCP))
            .and_then(|s| {
                s.set_reuse_address(true)?;
                s.bind(&local_addr.into())?;
                s.listen(1024)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .map_err(|source| DnsError::Bind { addr: local_addr, source })?;
        tokio::net::TcpListener::from_std(s.into()).map_err(|source| DnsError::Bind { addr: local_addr, source })?
    };
    Ok((sockets, tcp))
}

/// Compiles the table for `members`, assigning serials; returns the zones whose serial moved.
fn compile(
    cfg: &DnsConfig,
    statics: &[StaticZone],
    members: &Members,
    serials: &mut Serials,
) -> (Table, Vec<ZoneData>) {
    let client_zones = cfg
        .client_zones
        .iter()
        .filter_map(|c| crate::config::Subnet::parse(&c.subnet).map(|s| (s, c.zone.clone())))
        .collect();
    let keys = cfg.tsig_keys.iter().filter_map(|(n, k)| crate::tsig::Key::from_config(n, k).ok()).collect();
    let mut b = Builder::new(cfg.max_udp_payload_bytes, client_zones, keys);
    pool::add_pools(&mut b, cfg, members);
    let zones = statics
        .iter()
        .map(|z| ZoneData {
            origin: z.origin.clone(),
            origin_wire: wire::name_to_wire(&z.origin),
            soa: z.soa.clone(),
            records: z.records.clone(),
            notify: z.notify.clone(),
            allow_transfer: z.allow_transfer.clone(),
            tsig_key: z.tsig_key.clone(),
        })
        .collect();
    let mut changed = Vec::new();
    // The control plane's clock, so every name server fed this view stamps the same serial.
    // The view's own clock too: a member's removal changes the content and no member
    // left in the view records when it happened.
    let clock = serial::view_clock(members.clock_ms());
    let table = b.finish(zones, &mut |z: &ZoneData| {
        let d = serial::digest(&z.soa, &z.records);
        let (s, moved) = serials.serial(&z.origin.to_ascii(), &d, clock);
        if moved {
            changed.push(z.origin.to_ascii());
        }
        s
    });
    if !changed.is_empty() {
        serials.save();
    }
    let changed = table.zones.iter().filter(|z| changed.contains(&z.origin.to_ascii())).cloned().collect();
    (table, changed)
}

fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Several workers share the port; the kernel spreads sources across them by hash.
    s.set_reuse_port(true)?;
    // Bursts (dnsperf, floods) queue in the kernel rather than being dropped at once.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s.into())
}

impl NameServer {
    /// Loads zones, compiles the first table, binds `listen` (UDP and TCP) and serves until dropped.
    /// `members` is the control plane's view; in standalone mode it never changes.
    pub async fn start(
        cfg: DnsConfig,
        listen: SocketAddr,
        mut members: watch::Receiver<Members>,
    ) -> Result<NameServer, DnsError> {
        let statics = compile_static(&cfg)?;
        let mut serials = Serials::open(cfg.serial_file.clone());
        let (table, _) = compile(&cfg, &statics, &members.borrow_and_update().clone(), &mut serials);
        let shared = Arc::new(Shared { current: Mutex::new(Arc::new(table)), generation: AtomicU64::new(0) });
        let stop = Arc::new(AtomicBool::new(false));

        let (sockets, tcp) = bind_all(listen, cfg.udp_workers)?;
        let local_addr = tcp.local_addr().map_err(|source| DnsError::Bind { addr: listen, source })?;
        for (i, sock) in sockets.into_iter().enumerate() {
            let shared = shared.clone();
            let stop = stop.clone();
            let (rate, slip) = (cfg.rrl_responses_per_sec, cfg.rrl_slip);
            std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || crate::udp::worker(sock, shared, stop, rate, slip))
                .expect("spawning a thread");
        }
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(tcp_accept(tcp, shared.clone())));
        let workers = cfg.udp_workers;
        let builder_shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            while members.changed().await.is_ok() {
                let m = members.borrow_and_update().clone();
                let (table, changed) = compile(&cfg, &statics, &m, &mut serials);
                builder_shared.store(table);
                for z in changed {
                    tokio::spawn(notify_zone(z));
                }
            }
        }));
        tracing::info!(%local_addr, workers, "drover dns serving");
        Ok(NameServer { local_addr, shared, stop, tasks })
    }

    /// The table being served now.
    pub fn table(&self) -> Arc<Table> {
        self.shared.load()
    }
}

/// RFC 1035 §4.1.1 FORMERR: the header alone (the question could not be read).
pub(crate) fn formerr(id: u16, flags: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(
        &(wire::FLAG_QR | (flags & 0x7800) | (flags & wire::FLAG_RD) | wire::RCODE_FORMERR).to_be_bytes(),
    );
    out.extend_from_slice(&[0; 8]);
}

async fn tcp_accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // RFC 7766 §6.2.3: bound concurrent connections; each idles out after 10 s.
    let slots = Arc::new(tokio::sync::Semaphore::new(512));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let _ = tcp_conn(stream, peer, shared).await;
            drop(permit);
        });
    }
}

async fn tcp_conn(mut s: tokio::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) -> std::io::Result<()> {
    let mut picker = Picker::default();
    let mut out = Vec::with_capacity(4096);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut pkt = vec![0u8; u16::from_be_bytes(len) as usize];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut pkt))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let table = shared.load();
        let mut frames: Vec<Vec<u8>> = Vec::new();
        match wire::parse_query(&pkt) {
            Ok(q) => match table.respond(&pkt, &q, peer.ip(), false, &mut picker, &mut out) {
                Reply::Send => frames.push(out.clone()),
                Reply::Drop => {}
                Reply::Transfer => frames = transfer(&table, &pkt, &q, peer.ip()),
            },
            Err(Bad::Drop) => return Ok(()),
            Err(Bad::FormErr { id, flags }) => {
                formerr(id, flags, &mut out);
                frames.push(out.clone());
            }
        }
        for f in frames {
            let mut framed = Vec::with_capacity(f.len() + 2);
            framed.extend_from_slice(&(f.len() as u16).to_be_bytes());
            framed.extend_from_slice(&f);
            s.write_all(&framed).await?;
        }
    }
}

/// AXFR (RFC 5936), and IXFR answered as a full transfer (RFC 1995 §4 allows it) unless the
/// client is already current. Access: a source in `allow_transfer` and, when the zone has a
/// key, a request signed with it; each answer message is signed in turn (RFC 8945 §5.3.1).
fn transfer(table: &Table, pkt: &[u8], q: &wire::Query, src: IpAddr) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let refuse = |rcode: u16| {
        let mut o = Vec::new();
        table.header_only(pkt, q, rcode, &mut o);
        vec![o]
    };
    let Some(zone) = table.zones.iter().find(|z| z.origin_wire == q.name()) else {
        return refuse(wire::RCODE_NOTAUTH);
    };
    let allowed_src = zone.allow_transfer.iter().any(|s| s.contains(src));
    let now = crate::tsig::now();
    let signed = match (&zone.tsig_key, q.tsig_at) {
        (Some(k), Some(_)) => match k.verify(pkt, now) {
            Ok(v) => Some((k, v.mac)),
            Err(_) => return refuse(wire::RCODE_NOTAUTH),
        },
        (Some(_), None) => return refuse(wire::RCODE_REFUSED),
        (None, _) => None,
    };
    // A listed source, or (with no list) any source that signed with the zone's key.
    if !(allowed_src || signed.is_some() && zone.allow_transfer.is_empty()) {
        return refuse(wire::RCODE_REFUSED);
    }
    let qname = zone.origin.clone();
    let qtype = RecordType::from(q.qtype);
    let mut records: Vec<Record> = vec![zone.soa.clone()];
    let current = q.qtype == wire::TYPE_IXFR
        && Message::from_vec(pkt)
            .ok()
            .and_then(|m| {
                m.authorities.iter().find_map(|r| match &r.data {
                    RData::SOA(s) => Some(s.serial),
                    _ => None,
                })
            })
            .is_some_and(|theirs| {
                // RFC 1982 serial arithmetic: theirs >= ours.
                let ours = zone.serial();
                theirs == ours || (theirs.wrapping_sub(ours) as i32) > 0
            });
    if !current {
        records.extend(zone.records.iter().cloned());
        records.push(zone.soa.clone());
    }
    let mut prior = signed.as_ref().map(|(_, m)| m.clone());
    for (i, chunk) in records.chunks(200).enumerate() {
        let mut m = Message::new(q.id, MessageType::Response, OpCode::Query);
        m.metadata.authoritative = true;
        m.add_query(HQuery::query(qname.clone(), qtype));
        m.add_answers(chunk.iter().cloned());
        let Ok(mut bytes) = m.to_vec() else { return refuse(2) };
        if let Some((k, _)) = &signed {
            let p = prior.take().unwrap_or_default();
            let mac =
                if i == 0 { k.sign(&mut bytes, Some(&p), now, 0) } else { k.sign_continuation(&mut bytes, &p, now) };
            prior = Some(mac);
        }
        out.push(bytes);
    }
    out
}

/// NOTIFY (RFC 1996) to every configured secondary, signed with the zone's key; retried
/// until answered, five times at most.
async fn notify_zone(zone: ZoneData) {
    for target in zone.notify.clone() {
        let zone = zone.clone();
        tokio::spawn(async move {
            let bind: SocketAddr = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("constant");
            let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else { return };
            let id: u16 = rand::random();
            let mut m = Message::new(id, MessageType::Query, OpCode::Notify);
            m.metadata.authoritative = true;
            let mut query = HQuery::query(zone.origin.clone(), RecordType::SOA);
            query.set_query_class(DNSClass::IN);
            m.add_query(query);
            m.add_answer(zone.soa.clone());
            let Ok(mut bytes) = m.to_vec() else { return };
            if let Some(k) = &zone.tsig_key {
                k.sign(&mut bytes, None, crate::tsig::now(), 0);
            }
            let mut buf = [0u8; 4096];
            for _ in 0..5 {
                let _ = sock.send_to(&bytes, target).await;
                if let Ok(Ok((n, _))) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await
                    && n >= 2
                    && buf[..2] == id.to_be_bytes()
                {
                    tracing::debug!(zone = %zone.origin, %target, serial = zone.serial(), "NOTIFY acknowledged");
                    return;
                }
            }
            tracing::warn!(zone = %zone.origin, %target, "NOTIFY not acknowledged after 5 tries");
        });
    }
}
