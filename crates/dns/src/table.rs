//! The compiled answer table: immutable, rebuilt whole on every change and swapped in.
//!
//! An exact hit (name, type) is a pre-encoded response: the hot path copies it, patches the
//! ID, the RD/CD flags and the question's letter case, and appends OPT. Pools keep several
//! pre-encoded variants (rotations of a shuffled member list, weighted slots, one list per
//! client zone) picked by a per-worker counter. Misses (NXDOMAIN, NODATA, CNAME chains, ANY)
//! are built per query from the record sets, which are kept beside the templates.

use crate::config::Subnet;
use crate::wire::{self, Query};
use crate::zone::soa_data;
use hickory_proto::op::{Message, MessageType, OpCode, Query as HQuery, ResponseCode};
use hickory_proto::rr::rdata::HINFO;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// One pre-encoded response: header (ID 0) + lowercased question + sections, no OPT.
#[derive(Debug, Clone)]
pub struct Template(pub Vec<u8>);

#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub variants: Vec<Template>,
    /// Zone-aware pools: variants for askers in each client zone.
    pub by_zone: Vec<(String, Vec<Template>)>,
}

/// A served zone as compiled.
#[derive(Debug, Clone)]
pub struct ZoneData {
    pub origin: Name,
    pub origin_wire: Vec<u8>,
    /// The SOA with the managed serial.
    pub soa: Record,
    /// Everything a transfer sends between the two SOAs, in a stable order.
    pub records: Vec<Record>,
    pub notify: Vec<std::net::SocketAddr>,
    pub allow_transfer: Vec<Subnet>,
    pub tsig_key: Option<crate::tsig::Key>,
}

impl ZoneData {
    pub fn serial(&self) -> u32 {
        soa_data(&self.soa).serial
    }
    /// RFC 2308 §3: the negative-answer TTL is the smaller of the SOA's TTL and MINIMUM.
    fn negative_soa(&self) -> Record {
        let mut s = self.soa.clone();
        s.ttl = s.ttl.min(soa_data(&self.soa).minimum);
        s
    }
}

#[derive(Debug, Default)]
pub struct Table {
    pub entries: HashMap<Box<[u8]>, Entry>,
    /// Every record set by (lowercased wire name, type).
    pub rrsets: HashMap<(Vec<u8>, u16), Vec<Record>>,
    /// Names that exist (owners and empty non-terminals) → zone index.
    pub names: HashMap<Vec<u8>, usize>,
    pub zones: Vec<ZoneData>,
    pub client_zones: Vec<(Subnet, String)>,
    pub keys: Vec<crate::tsig::Key>,
    pub max_udp_payload: u16,
}

/// The key of an exact hit: lowercased wire name then the type.
pub fn key(name: &[u8], qtype: u16) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 2);
    k.extend_from_slice(name);
    k.extend_from_slice(&qtype.to_be_bytes());
    k
}

/// Encodes a response for `qname`/`qtype` with the given sections.
pub fn encode(
    qname: &Name,
    qtype: RecordType,
    rcode: ResponseCode,
    answers: &[Record],
    authority: &[Record],
    additional: &[Record],
) -> Vec<u8> {
    let mut m = Message::new(0, MessageType::Response, OpCode::Query);
    m.metadata.authoritative = true;
    m.metadata.response_code = rcode;
    m.add_query(HQuery::query(qname.clone(), qtype));
    m.add_answers(answers.iter().cloned());
    m.add_authorities(authority.iter().cloned());
    m.add_additionals(additional.iter().cloned());
    m.to_vec().expect("records we built encode")
}

/// What to do with a packet.
pub enum Reply {
    Send,
    Drop,
    /// A zone transfer request (AXFR/IXFR): only served over TCP by the caller.
    Transfer,
}

/// Per-worker state of the hot path.
#[derive(Default)]
pub struct Picker {
    pub counter: u32,
}

impl Table {
    /// The zone `name` (lowercased wire) falls in: the longest matching origin.
    pub fn zone_of(&self, name: &[u8]) -> Option<usize> {
        let mut p = 0;
        loop {
            let suffix = &name[p..];
            if let Some(i) = self.zones.iter().position(|z| z.origin_wire == suffix) {
                return Some(i);
            }
            let len = *name.get(p)? as usize;
            if len == 0 {
                return None;
            }
            p += 1 + len;
        }
    }

    /// The asker's client zone, by EDNS Client Subnet when sent, else by source address,
    /// and the matched prefix length (the ECS scope of the answer).
    fn client_zone(&self, q: &Query, src: IpAddr) -> Option<(&str, u8)> {
        let ecs = q.edns.and_then(|e| e.subnet).filter(|s| s.source_prefix > 0);
        let addr = ecs.map(|s| s.addr).unwrap_or(src);
        self.client_zones.iter().find(|(s, _)| s.contains(addr)).map(|(s, z)| (z.as_str(), s.prefix))
    }

    /// Writes the answer to `q` (the bytes `pkt`) into `out`. `limit` is the transport's
    /// size limit before EDNS is considered (512 for UDP, 65535 for TCP).
    pub fn respond(
        &self,
        pkt: &[u8],
        q: &Query,
        src: IpAddr,
        udp: bool,
        picker: &mut Picker,
        out: &mut Vec<u8>,
    ) -> Reply {
        out.clear();
        let mut scope = 0u8;
        if q.opcode != 0 {
            // RFC 1035 §4.1.1: an opcode we do not implement is NOTIMP (NOTIFY to a primary included).
            self.header_only(pkt, q, wire::RCODE_NOTIMP, out);
        } else if q.tsig_at.is_some() {
            return self.respond_signed(pkt, q, src, udp, picker, out);
        } else if let Some(e) = q.edns.filter(|e| e.version > 0) {
            // RFC 6891 §6.1.3: a responder that does not implement the version MUST answer BADVERS.
            let _ = e;
            self.header_only(pkt, q, 0, out);
            self.finish(q, out, udp, 1, 0);
            return Reply::Send;
        } else if q.qclass != wire::CLASS_IN {
            self.header_only(pkt, q, wire::RCODE_REFUSED, out);
        } else if q.qtype == wire::TYPE_AXFR || q.qtype == wire::TYPE_IXFR {
            if udp {
                // RFC 5936 §4.2 (AXFR is TCP only); for IXFR a TC answer sends the client to TCP (RFC 1995 §2).
                self.header_only(pkt, q, if q.qtype == wire::TYPE_AXFR { wire::RCODE_FORMERR } else { 0 }, out);
                if q.qtype == wire::TYPE_IXFR {
                    let f = wire::get_u16(out, 2) | wire::FLAG_TC;
                    wire::set_u16(out, 2, f);
                }
            } else {
                return Reply::Transfer;
            }
        } else {
            let mut k = [0u8; 257];
            let n = q.name().len();
            k[..n].copy_from_slice(q.name());
            k[n..n + 2].copy_from_slice(&q.qtype.to_be_bytes());
            if let Some(entry) = self.entries.get(&k[..n + 2]) {
                let mut variants = &entry.variants;
                if !entry.by_zone.is_empty()
                    && let Some((z, prefix)) = self.client_zone(q, src)
                    && let Some((_, v)) = entry.by_zone.iter().find(|(name, _)| name == z)
                {
                    variants = v;
                    scope = prefix;
                }
                picker.counter = picker.counter.wrapping_add(1);
                let t = &variants[picker.counter as usize % variants.len()];
                out.extend_from_slice(&t.0);
            } else {
                self.slow_answer(q, out);
            }
            if out.is_empty() {
                self.header_only(pkt, q, wire::RCODE_REFUSED, out);
            } else {
                wire::set_u16(out, 0, q.id);
                let flags = wire::get_u16(out, 2) | (q.flags & (wire::FLAG_RD | wire::FLAG_CD));
                wire::set_u16(out, 2, flags);
                // Echo the question as asked (letter case included: resolvers using 0x20 compare it).
                out[12..q.name_end()].copy_from_slice(&pkt[12..q.name_end()]);
            }
        }
        self.finish(q, out, udp, 0, scope);
        Reply::Send
    }

    /// A header and the question echoed, no records.
    pub fn header_only(&self, pkt: &[u8], q: &Query, rcode: u16, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&pkt[..q.question_end]);
        let opcode = (q.flags & 0x7800) | (q.flags & (wire::FLAG_RD | wire::FLAG_CD));
        wire::set_u16(out, 2, wire::FLAG_QR | opcode | rcode);
        wire::set_u16(out, 4, 1);
        for at in [6, 8, 10] {
            wire::set_u16(out, at, 0);
        }
    }

    /// Appends OPT when the query had EDNS, and truncates to the transport's limit:
    /// RFC 2181 §9 / RFC 1035 §4.2.1: an answer that does not fit is sent with TC set
    /// and without the partial record sections, never silently cut.
    fn finish(&self, q: &Query, out: &mut Vec<u8>, udp: bool, ext_rcode: u8, scope: u8) {
        let limit = match (udp, q.edns) {
            (false, _) => 65535,
            // RFC 6891 §6.2.5: payload values below 512 are treated as 512.
            (true, Some(e)) => e.payload.clamp(512, self.max_udp_payload.max(512)) as usize,
            (true, None) => 512,
        };
        let opt_len = match q.edns {
            None => 0,
            Some(e) => 11 + e.subnet.map_or(0, |s| 8 + (s.source_prefix as usize).div_ceil(8)),
        };
        if out.len() + opt_len > limit {
            out.truncate(q.question_end);
            let f = wire::get_u16(out, 2) | wire::FLAG_TC;
            wire::set_u16(out, 2, f);
            for at in [6, 8, 10] {
                wire::set_u16(out, at, 0);
            }
        }
        if let Some(e) = q.edns {
            wire::push_opt(out, self.max_udp_payload, ext_rcode, e.subnet.map(|s| (s, scope)));
            let ar = wire::get_u16(out, 10) + 1;
            wire::set_u16(out, 10, ar);
        }
    }

    /// Everything that is not an exact hit: CNAME chains, ANY, NODATA, NXDOMAIN.
    /// Leaves `out` empty when the name is in no zone of ours (the caller answers REFUSED).
    fn slow_answer(&self, q: &Query, out: &mut Vec<u8>) {
        let Some(zi) = self.zone_of(q.name()) else { return };
        let zone = &self.zones[zi];
        let Ok(qname) = wire::name_from_wire(q.name()) else { return };
        let qtype = RecordType::from(q.qtype);
        let exists = self.names.contains_key(q.name());
        let bytes = if !exists {
            // RFC 2308 §2.1: NXDOMAIN carries the zone's SOA in the authority section.
            encode(&qname, qtype, ResponseCode::NXDomain, &[], &[zone.negative_soa()], &[])
        } else if q.qtype == wire::TYPE_ANY {
            // RFC 8482 §4.2: answer ANY with one synthesized HINFO record instead of every set.
            let hinfo =
                Record::from_rdata(qname.clone(), 3600, RData::HINFO(HINFO::new("RFC8482".into(), String::new())));
            encode(&qname, qtype, ResponseCode::NoError, &[hinfo], &[], &[])
        } else if let Some(cname) = self.rrsets.get(&(q.name().to_vec(), u16::from(RecordType::CNAME))) {
            // RFC 1034 §4.3.2 step 3a: answer the CNAME and go on with its target while it is ours.
            let mut answers = cname.clone();
            let mut target = match &cname[0].data {
                RData::CNAME(c) => c.0.to_lowercase(),
                _ => unreachable!(),
            };
            for _ in 0..8 {
                let tw = wire::name_to_wire(&target);
                if let Some(set) = self.rrsets.get(&(tw.clone(), q.qtype)) {
                    answers.extend(set.iter().cloned());
                    break;
                }
                match self.rrsets.get(&(tw, u16::from(RecordType::CNAME))) {
                    Some(next) => {
                        answers.extend(next.iter().cloned());
                        target = match &next[0].data {
                            RData::CNAME(c) => c.0.to_lowercase(),
                            _ => unreachable!(),
                        };
                    }
                    None => break,
                }
            }
            encode(&qname, qtype, ResponseCode::NoError, &answers, &[], &[])
        } else {
            // RFC 2308 §2.2: NODATA is NOERROR, no answers, the SOA in authority.
            encode(&qname, qtype, ResponseCode::NoError, &[], &[zone.negative_soa()], &[])
        };
        out.extend_from_slice(&bytes);
    }

    /// A query signed with TSIG (secondaries' SOA checks): verify, answer, sign the answer.
    fn respond_signed(
        &self,
        pkt: &[u8],
        q: &Query,
        src: IpAddr,
        udp: bool,
        picker: &mut Picker,
        out: &mut Vec<u8>,
    ) -> Reply {
        let Some(at) = q.tsig_at else { return Reply::Drop };
        let now = crate::tsig::now();
        let owner = wire::read_name_lower(pkt, at).map(|(n, _)| n);
        let key = self.keys.iter().find(|k| Some(wire::name_to_wire(&k.name)) == owner);
        let verified = key.map(|k| k.verify(pkt, now));
        match verified {
            Some(Ok(v)) => {
                if (q.qtype == wire::TYPE_AXFR || q.qtype == wire::TYPE_IXFR) && !udp {
                    return Reply::Transfer;
                }
                let mut unsigned = q.clone();
                unsigned.tsig_at = None;
                // The answer is computed as for an unsigned query, then signed (RFC 8945 §5.3).
                let reply = self.respond(pkt, &unsigned, src, udp, picker, out);
                if matches!(reply, Reply::Send) {
                    key.expect("verified").sign(out, Some(&v.mac), now, 0);
                }
                reply
            }
            _ => {
                // RFC 8945 §5.2: a request that fails verification gets NOTAUTH (unsigned).
                self.header_only(pkt, q, wire::RCODE_NOTAUTH, out);
                self.finish(q, out, udp, 0, 0);
                Reply::Send
            }
        }
    }
}

/// Builds a table from zones and dynamic record sets (pools, discovery names).
pub struct Builder {
    pub table: Table,
    /// (name, type) → variants, for sets that are not a single static answer.
    dynamic: BTreeMap<(Vec<u8>, u16), DynamicSet>,
}

/// A pool's answer for one (name, type): every variant, per-zone variants, and the
/// record set a zone transfer carries.
pub struct DynamicSet {
    pub name: Name,
    pub variants: Vec<Vec<Record>>,
    pub by_zone: Vec<(String, Vec<Vec<Record>>)>,
    pub canonical: Vec<Record>,
    pub additional: Vec<Record>,
}

impl Builder {
    pub fn new(max_udp_payload: u16, client_zones: Vec<(Subnet, String)>, keys: Vec<crate::tsig::Key>) -> Builder {
        Builder { table: Table { max_udp_payload, client_zones, keys, ..Default::default() }, dynamic: BTreeMap::new() }
    }

    pub fn add_dynamic(&mut self, rtype: RecordType, set: DynamicSet) {
        self.dynamic.insert((wire::name_to_wire(&set.name.to_lowercase()), u16::from(rtype)), set);
    }

    /// Finishes: zones get their content (static + dynamic canonical sets) and every
    /// (name, type) its templates.
    /// `serial` gives each zone's SOA serial once its full content is known.
    pub fn finish(mut self, zones: Vec<ZoneData>, serial: &mut dyn FnMut(&ZoneData) -> u32) -> Table {
        let t = &mut self.table;
        t.zones = zones;
        for z in t.zones.iter_mut() {
            for set in self.dynamic.values() {
                if z.origin.zone_of(&set.name) {
                    z.records.extend(set.canonical.iter().cloned());
                }
            }
            let n = serial(z);
            if let RData::SOA(s) = &mut z.soa.data {
                s.serial = n;
            }
        }
        // Record sets: static records and the SOA, then dynamic canonical sets.
        for (zi, z) in t.zones.iter().enumerate() {
            let mut all = vec![z.soa.clone()];
            all.extend(z.records.iter().cloned());
            for r in all {
                let w = wire::name_to_wire(&r.name);
                add_name(&mut t.names, &w, &z.origin_wire, zi);
                t.rrsets.entry((w, u16::from(r.record_type()))).or_default().push(r);
            }
            // A pool's name exists even while it has no member to answer with (NODATA, not NXDOMAIN).
            for (name, _) in self.dynamic.keys() {
                if name.ends_with(&z.origin_wire) {
                    add_name(&mut t.names, name, &z.origin_wire, zi);
                }
            }
        }
        // Static templates: one per record set, unless a dynamic set owns the key.
        let mut entries = HashMap::new();
        for ((name, rtype), set) in &t.rrsets {
            if self.dynamic.contains_key(&(name.clone(), *rtype)) {
                continue;
            }
            let Ok(qname) = wire::name_from_wire(name) else { continue };
            let bytes = encode(&qname, RecordType::from(*rtype), ResponseCode::NoError, set, &[], &[]);
            entries.insert(
                key(name, *rtype).into_boxed_slice(),
                Entry { variants: vec![Template(bytes)], by_zone: vec![] },
            );
        }
        for ((name, rtype), set) in &self.dynamic {
            if t.zone_of(name).is_none() {
                continue;
            }
            let qname = set.name.to_lowercase();
            let qtype = RecordType::from(*rtype);
            let negative = || {
                let zone = &t.zones[t.zone_of(name).expect("checked")];
                vec![zone.negative_soa()]
            };
            let enc = |answers: &Vec<Record>| {
                if answers.is_empty() {
                    Template(encode(&qname, qtype, ResponseCode::NoError, &[], &negative(), &[]))
                } else {
                    let add: Vec<Record> = if qtype == RecordType::SRV {
                        let targets: Vec<&Name> = answers
                            .iter()
                            .filter_map(|r| match &r.data {
                                RData::SRV(s) => Some(&s.target),
                                _ => None,
                            })
                            .collect();
                        set.additional.iter().filter(|a| targets.contains(&&a.name)).cloned().collect()
                    } else {
                        vec![]
                    };
                    Template(encode(&qname, qtype, ResponseCode::NoError, answers, &[], &add))
                }
            };
            let variants: Vec<Template> =
                if set.variants.is_empty() { vec![enc(&vec![])] } else { set.variants.iter().map(enc).collect() };
            let by_zone = set
                .by_zone
                .iter()
                .map(|(z, vs)| {
                    (z.clone(), if vs.is_empty() { vec![enc(&vec![])] } else { vs.iter().map(enc).collect() })
                })
                .collect();
            entries.insert(key(name, *rtype).into_boxed_slice(), Entry { variants, by_zone });
        }
        t.entries = entries;
        self.table
    }
}

/// Records `name` and every name between it and the zone's origin as existing
/// (empty non-terminals exist: RFC 8020).
fn add_name(names: &mut HashMap<Vec<u8>, usize>, name: &[u8], origin: &[u8], zi: usize) {
    let mut n = name;
    while n.len() >= origin.len() && !n.is_empty() {
        names.entry(n.to_vec()).or_insert(zi);
        if n == origin || n[0] == 0 {
            break;
        }
        n = &n[1 + n[0] as usize..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_name_then_type() {
        assert_eq!(key(&[1, b'a', 0], 1), vec![1, b'a', 0, 0, 1]);
    }
}
