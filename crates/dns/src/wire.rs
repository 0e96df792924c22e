//! The hot path's view of a query: header, one question and the additional section's OPT
//! and TSIG, read straight from the bytes without allocating. Anything stranger is a FORMERR
//! or is dropped; tests check this reader against hickory-proto's full decoder.

use hickory_proto::rr::Name;
use std::net::IpAddr;

pub const TYPE_OPT: u16 = 41;
pub const TYPE_TSIG: u16 = 250;
pub const TYPE_AXFR: u16 = 252;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;

pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_CD: u16 = 0x0010;

pub const RCODE_FORMERR: u16 = 1;
pub const RCODE_NXDOMAIN: u16 = 3;
pub const RCODE_NOTIMP: u16 = 4;
pub const RCODE_REFUSED: u16 = 5;
pub const RCODE_NOTAUTH: u16 = 9;

/// EDNS Client Subnet (RFC 7871) as the query sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientSubnet {
    pub family: u16,
    pub source_prefix: u8,
    pub addr: IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub payload: u16,
    pub version: u8,
    pub dnssec_ok: bool,
    pub subnet: Option<ClientSubnet>,
}

/// A parsed query; names are at most 255 bytes (RFC 1035 §2.3.4), so they live inline.
#[derive(Clone)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    pub opcode: u8,
    lower: [u8; 255],
    lower_len: usize,
    /// Offset just past QTYPE/QCLASS.
    pub question_end: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
    /// Offset of a TSIG record that ends the message.
    pub tsig_at: Option<usize>,
}

impl Query {
    /// The question's name in wire form, lowercased.
    pub fn name(&self) -> &[u8] {
        &self.lower[..self.lower_len]
    }
    /// Offset just past the question's name.
    pub fn name_end(&self) -> usize {
        12 + self.lower_len
    }
}

/// Why a packet got no normal answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Bad {
    /// Too short for a header, or a response: never answered (no reflection loops).
    Drop,
    /// Answer FORMERR with this header (RFC 1035 §4.1.1).
    FormErr { id: u16, flags: u16 },
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}

/// Reads the header, the question, and the additional section's OPT/TSIG.
pub fn parse_query(pkt: &[u8]) -> Result<Query, Bad> {
    if pkt.len() < 12 {
        return Err(Bad::Drop);
    }
    let id = u16::from_be_bytes([pkt[0], pkt[1]]);
    let flags = u16::from_be_bytes([pkt[2], pkt[3]]);
    if flags & FLAG_QR != 0 {
        return Err(Bad::Drop);
    }
    let form = Bad::FormErr { id, flags };
    let qd = u16::from_be_bytes([pkt[4], pkt[5]]);
    let an = u16::from_be_bytes([pkt[6], pkt[7]]);
    let ns = u16::from_be_bytes([pkt[8], pkt[9]]);
    let ar = u16::from_be_bytes([pkt[10], pkt[11]]);
    if qd != 1 {
        return Err(form);
    }
    let mut q = Query {
        id,
        flags,
        opcode: ((flags >> 11) & 0xf) as u8,
        lower: [0; 255],
        lower_len: 0,
        question_end: 0,
        qtype: 0,
        qclass: 0,
        edns: None,
        tsig_at: None,
    };
    // The question name: plain labels only (a query has nothing earlier to point at).
    let mut p = 12;
    loop {
        let Some(&len) = pkt.get(p) else { return Err(form) };
        if len & 0xc0 != 0 {
            return Err(form);
        }
        let len = len as usize;
        if q.lower_len + 1 + len > 255 {
            return Err(form);
        }
        let label = pkt.get(p + 1..p + 1 + len).ok_or(Bad::FormErr { id, flags })?;
        q.lower[q.lower_len] = len as u8;
        for (i, b) in label.iter().enumerate() {
            q.lower[q.lower_len + 1 + i] = b.to_ascii_lowercase();
        }
        q.lower_len += 1 + len;
        p += 1 + len;
        if len == 0 {
            break;
        }
    }
    q.qtype = u16_at(pkt, p).ok_or(Bad::FormErr { id, flags })?;
    q.qclass = u16_at(pkt, p + 2).ok_or(Bad::FormErr { id, flags })?;
    p += 4;
    q.question_end = p;
    // Skip answer and authority records (IXFR carries an SOA in authority), then read additionals.
    for i in 0..(an as usize + ns as usize + ar as usize) {
        let start = p;
        p = skip_name(pkt, p).ok_or(Bad::FormErr { id, flags })?;
        let rtype = u16_at(pkt, p).ok_or(Bad::FormErr { id, flags })?;
        let class = u16_at(pkt, p + 2).ok_or(Bad::FormErr { id, flags })?;
        let ttl = pkt.get(p + 4..p + 8).ok_or(Bad::FormErr { id, flags })?;
        let rdlen = u16_at(pkt, p + 8).ok_or(Bad::FormErr { id, flags })? as usize;
        let rdata = pkt.get(p + 10..p + 10 + rdlen).ok_or(Bad::FormErr { id, flags })?;
        p += 10 + rdlen;
        if i < an as usize + ns as usize {
            continue;
        }
        match rtype {
            TYPE_OPT => {
                // RFC 6891 §6.1.1: more than one OPT, or an OPT not owned by the root, is a FORMERR.
                if q.edns.is_some() || pkt[start] != 0 {
                    return Err(form);
                }
                q.edns = Some(Edns {
                    payload: class,
                    version: ttl[1],
                    dnssec_ok: ttl[2] & 0x80 != 0,
                    subnet: parse_options(rdata).map_err(|_| Bad::FormErr { id, flags })?,
                });
            }
            TYPE_TSIG => {
                // RFC 8945 §5.1: the TSIG must be the last record.
                if i + 1 != an as usize + ns as usize + ar as usize {
                    return Err(form);
                }
                q.tsig_at = Some(start);
            }
            _ => {}
        }
    }
    Ok(q)
}

/// Finds an EDNS Client Subnet option (RFC 7871 §6) among the OPT options.
fn parse_options(mut rd: &[u8]) -> Result<Option<ClientSubnet>, ()> {
    let mut subnet = None;
    while !rd.is_empty() {
        let code = u16_at(rd, 0).ok_or(())?;
        let len = u16_at(rd, 2).ok_or(())? as usize;
        let data = rd.get(4..4 + len).ok_or(())?;
        if code == 8 {
            let family = u16_at(data, 0).ok_or(())?;
            let source_prefix = *data.get(2).ok_or(())?;
            let addr_bytes = data.get(4..).ok_or(())?;
            // RFC 7871 §6: ADDRESS carries only the bytes the prefix needs.
            let need = (source_prefix as usize).div_ceil(8);
            if addr_bytes.len() != need {
                return Err(());
            }
            let addr = match family {
                1 if source_prefix <= 32 => {
                    let mut b = [0u8; 4];
                    b[..need].copy_from_slice(addr_bytes);
                    IpAddr::from(b)
                }
                2 if source_prefix <= 128 => {
                    let mut b = [0u8; 16];
                    b[..need].copy_from_slice(addr_bytes);
                    IpAddr::from(b)
                }
                _ => return Err(()),
            };
            subnet = Some(ClientSubnet { family, source_prefix, addr });
        }
        rd = &rd[4 + len..];
    }
    Ok(subnet)
}

/// Offset past the (possibly compressed) name at `p`.
pub fn skip_name(msg: &[u8], mut p: usize) -> Option<usize> {
    loop {
        let len = *msg.get(p)?;
        match len & 0xc0 {
            0xc0 => {
                msg.get(p + 1)?;
                return Some(p + 2);
            }
            0x00 if len == 0 => return Some(p + 1),
            0x00 => p += 1 + len as usize,
            _ => return None,
        }
    }
}

/// Reads the name at `p` (following compression pointers, bounded), lowercased, in wire form;
/// returns it and the offset past it in place.
pub fn read_name_lower(msg: &[u8], p: usize) -> Option<(Vec<u8>, usize)> {
    let end = skip_name(msg, p)?;
    let mut out = Vec::with_capacity(32);
    let mut at = p;
    for _ in 0..128 {
        let len = *msg.get(at)?;
        if len & 0xc0 == 0xc0 {
            at = (((len & 0x3f) as usize) << 8) | *msg.get(at + 1)? as usize;
            continue;
        }
        let len = len as usize;
        out.push(len as u8);
        out.extend(msg.get(at + 1..at + 1 + len)?.iter().map(u8::to_ascii_lowercase));
        if out.len() > 255 {
            return None;
        }
        if len == 0 {
            return Some((out, end));
        }
        at += 1 + len;
    }
    None
}

/// A name from its uncompressed wire form.
pub fn name_from_wire(w: &[u8]) -> Result<Name, hickory_proto::ProtoError> {
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
    Ok(Name::read(&mut BinDecoder::new(w))?)
}

/// A name's uncompressed wire form (case kept).
pub fn name_to_wire(n: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    for label in n.iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

/// The OPT record we answer with (RFC 6891 §6.1.2), echoing a Client Subnet option
/// with `scope` (RFC 7871 §7.2.1).
pub fn push_opt(out: &mut Vec<u8>, payload: u16, ext_rcode: u8, subnet: Option<(ClientSubnet, u8)>) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&payload.to_be_bytes());
    out.extend_from_slice(&[ext_rcode, 0, 0, 0]);
    match subnet {
        None => out.extend_from_slice(&0u16.to_be_bytes()),
        Some((s, scope)) => {
            let bytes = match s.addr {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            let need = (s.source_prefix as usize).div_ceil(8);
            let len = 4 + need;
            out.extend_from_slice(&((4 + len) as u16).to_be_bytes());
            out.extend_from_slice(&8u16.to_be_bytes());
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(&s.family.to_be_bytes());
            out.push(s.source_prefix);
            out.push(scope);
            out.extend_from_slice(&bytes[..need]);
        }
    }
}

pub fn set_u16(out: &mut [u8], at: usize, v: u16) {
    out[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

pub fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns as HEdns, Message, Query as HQuery};
    use hickory_proto::rr::RecordType;
    use hickory_proto::rr::rdata::opt::{ClientSubnet as HSubnet, EdnsOption};

    #[test]
    fn reader_agrees_with_hickory_on_a_query_with_edns_and_client_subnet() {
        let mut m = Message::query();
        m.metadata.id = 777;
        m.metadata.recursion_desired = true;
        m.add_query(HQuery::query(Name::from_ascii("WwW.Example.TEST.").unwrap(), RecordType::AAAA));
        let mut e = HEdns::new();
        e.set_max_payload(4096);
        e.set_dnssec_ok(true);
        e.options_mut().insert(EdnsOption::Subnet(HSubnet::new("10.1.2.0".parse().unwrap(), 24, 0)));
        m.set_edns(e);
        let bytes = m.to_vec().unwrap();
        let q = parse_query(&bytes).unwrap();
        assert_eq!((q.id, q.qtype, q.qclass, q.opcode), (777, 28, 1, 0));
        assert_eq!(q.flags & FLAG_RD, FLAG_RD);
        assert_eq!(q.name(), name_to_wire(&Name::from_ascii("www.example.test.").unwrap()).as_slice());
        assert_eq!(q.question_end, bytes.len() - 11 - 11);
        let e = q.edns.unwrap();
        assert_eq!((e.payload, e.version, e.dnssec_ok), (4096, 0, true));
        let s = e.subnet.unwrap();
        assert_eq!((s.family, s.source_prefix, s.addr), (1, 24, "10.1.2.0".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn truncated_and_odd_packets_are_rejected_not_panicking() {
        let mut m = Message::query();
        m.add_query(HQuery::query(Name::from_ascii("a.test.").unwrap(), RecordType::A));
        let bytes = m.to_vec().unwrap();
        for cut in 0..bytes.len() {
            assert!(parse_query(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut resp = bytes.clone();
        resp[2] |= 0x80;
        assert_eq!(parse_query(&resp).err(), Some(Bad::Drop), "responses are never answered");
        let mut two = bytes.clone();
        two[5] = 2;
        assert!(matches!(parse_query(&two), Err(Bad::FormErr { .. })));
    }
}
