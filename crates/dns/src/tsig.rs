//! TSIG (RFC 8945) with hmac-sha256 over raw wire messages: verifies signed transfer
//! requests, signs their answers and our NOTIFYs. Written on the bytes (not on hickory's
//! `Message`) because the MAC covers the exact bytes sent, and our answers are built as bytes.

use crate::config::TsigKeyConfig;
use crate::wire;
use hickory_proto::rr::Name;
use ring::hmac;

const TSIG_TYPE: u16 = 250;
const CLASS_ANY: u16 = 255;
const FUDGE: u16 = 300;
pub const BADSIG: u16 = 16;
pub const BADKEY: u16 = 17;
pub const BADTIME: u16 = 18;

#[derive(Clone)]
pub struct Key {
    /// Lowercased wire form of the key's name.
    name_wire: Vec<u8>,
    pub name: Name,
    key: hmac::Key,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tsig::Key({})", self.name)
    }
}

/// `hmac-sha256.` in wire form.
fn algorithm_wire() -> Vec<u8> {
    wire::name_to_wire(&Name::from_ascii("hmac-sha256.").expect("constant"))
}

/// What a verified request carried: the key and the MAC an answer must chain from.
pub struct Verified {
    pub mac: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TsigError {
    /// No TSIG record where one is required.
    Missing,
    /// Unparseable TSIG record.
    Malformed,
    /// Unknown key or algorithm.
    BadKey,
    BadSig,
    BadTime,
}

impl Key {
    pub fn from_config(name: &str, c: &TsigKeyConfig) -> Result<Key, String> {
        let secret = data_encoding::BASE64.decode(c.secret.as_bytes()).map_err(|e| format!("tsig key {name}: {e}"))?;
        let mut name = Name::from_ascii(name).map_err(|e| format!("tsig key {name}: {e}"))?.to_lowercase();
        name.set_fqdn(true);
        Ok(Key { name_wire: wire::name_to_wire(&name), name, key: hmac::Key::new(hmac::HMAC_SHA256, &secret) })
    }

    fn variables(&self, out: &mut Vec<u8>, time: u64, error: u16, other: &[u8]) {
        out.extend_from_slice(&self.name_wire);
        out.extend_from_slice(&CLASS_ANY.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&algorithm_wire());
        out.extend_from_slice(&time.to_be_bytes()[2..]);
        out.extend_from_slice(&FUDGE.to_be_bytes());
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&(other.len() as u16).to_be_bytes());
        out.extend_from_slice(other);
    }

    /// Appends a TSIG record to `msg` (a complete message without one) and bumps ARCOUNT;
    /// returns the MAC. `prior_mac` is the request's MAC when `msg` answers a signed request.
    pub fn sign(&self, msg: &mut Vec<u8>, prior_mac: Option<&[u8]>, time: u64, error: u16) -> Vec<u8> {
        self.sign_as(msg, prior_mac, time, error, false)
    }

    /// Signs a later message of a multi-message answer (RFC 8945 §5.3.1): the digest covers
    /// the previous message's MAC, this message and only the timers.
    pub fn sign_continuation(&self, msg: &mut Vec<u8>, prior_mac: &[u8], time: u64) -> Vec<u8> {
        self.sign_as(msg, Some(prior_mac), time, 0, true)
    }

    fn sign_as(
        &self,
        msg: &mut Vec<u8>,
        prior_mac: Option<&[u8]>,
        time: u64,
        error: u16,
        timers_only: bool,
    ) -> Vec<u8> {
        let mut ctx = hmac::Context::with_key(&self.key);
        if let Some(m) = prior_mac {
            ctx.update(&(m.len() as u16).to_be_bytes());
            ctx.update(m);
        }
        ctx.update(msg);
        let mut vars = Vec::with_capacity(64);
        if timers_only {
            vars.extend_from_slice(&time.to_be_bytes()[2..]);
            vars.extend_from_slice(&FUDGE.to_be_bytes());
        } else {
            self.variables(&mut vars, time, error, &[]);
        }
        ctx.update(&vars);
        let mac = ctx.sign();
        let mac = mac.as_ref();
        let id = [msg[0], msg[1]];
        let mut rdata = algorithm_wire();
        rdata.extend_from_slice(&time.to_be_bytes()[2..]);
        rdata.extend_from_slice(&FUDGE.to_be_bytes());
        rdata.extend_from_slice(&(mac.len() as u16).to_be_bytes());
        rdata.extend_from_slice(mac);
        rdata.extend_from_slice(&id);
        rdata.extend_from_slice(&error.to_be_bytes());
        rdata.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&self.name_wire);
        msg.extend_from_slice(&TSIG_TYPE.to_be_bytes());
        msg.extend_from_slice(&CLASS_ANY.to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes());
        msg.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        msg.extend_from_slice(&rdata);
        let ar = u16::from_be_bytes([msg[10], msg[11]]) + 1;
        msg[10..12].copy_from_slice(&ar.to_be_bytes());
        mac.to_vec()
    }

    /// Verifies the TSIG record that ends `msg` (RFC 8945 §5.2) against this key.
    pub fn verify(&self, msg: &[u8], now: u64) -> Result<Verified, TsigError> {
        let (start, arcount) = last_record(msg).ok_or(TsigError::Missing)?;
        let mut p = start;
        let (owner, next) = wire::read_name_lower(msg, p).ok_or(TsigError::Malformed)?;
        p = next;
        let field = |at: usize| -> Result<u16, TsigError> {
            msg.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]])).ok_or(TsigError::Malformed)
        };
        if field(p)? != TSIG_TYPE {
            return Err(TsigError::Missing);
        }
        let rdlen = field(p + 8)? as usize;
        let rd = p + 10;
        if rd + rdlen != msg.len() {
            return Err(TsigError::Malformed);
        }
        if owner != self.name_wire {
            return Err(TsigError::BadKey);
        }
        let (alg, q) = wire::read_name_lower(msg, rd).ok_or(TsigError::Malformed)?;
        if alg != algorithm_wire() {
            return Err(TsigError::BadKey);
        }
        let t = msg.get(q..q + 6).ok_or(TsigError::Malformed)?;
        let time = u64::from_be_bytes([0, 0, t[0], t[1], t[2], t[3], t[4], t[5]]);
        let fudge = field(q + 6)? as u64;
        let mac_len = field(q + 8)? as usize;
        let mac = msg.get(q + 10..q + 10 + mac_len).ok_or(TsigError::Malformed)?;
        let o = q + 10 + mac_len;
        let orig_id = field(o)?;
        let error = field(o + 2)?;
        let other_len = field(o + 4)? as usize;
        let other = msg.get(o + 6..o + 6 + other_len).ok_or(TsigError::Malformed)?;
        let mut signed = msg[..start].to_vec();
        signed[0..2].copy_from_slice(&orig_id.to_be_bytes());
        signed[10..12].copy_from_slice(&(arcount - 1).to_be_bytes());
        let mut vars = Vec::with_capacity(64);
        let mut v = Vec::new();
        v.extend_from_slice(&signed);
        self.variables(&mut vars, time, error, other);
        v.extend_from_slice(&vars);
        hmac::verify(&self.key, &v, mac).map_err(|_| TsigError::BadSig)?;
        if now.abs_diff(time) > fudge {
            return Err(TsigError::BadTime);
        }
        Ok(Verified { mac: mac.to_vec() })
    }
}

/// Start offset of the last resource record of `msg` and the ARCOUNT, when ARCOUNT > 0.
fn last_record(msg: &[u8]) -> Option<(usize, u16)> {
    if msg.len() < 12 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]) as usize;
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if ar == 0 {
        return None;
    }
    let mut p = 12;
    for _ in 0..qd {
        p = wire::skip_name(msg, p)? + 4;
    }
    let total = an + ns + ar;
    let mut last = p;
    for _ in 0..total {
        last = p;
        p = wire::skip_name(msg, p)?;
        let rdlen = u16::from_be_bytes([*msg.get(p + 8)?, *msg.get(p + 9)?]) as usize;
        p += 10 + rdlen;
        if p > msg.len() {
            return None;
        }
    }
    Some((last, ar as u16))
}

/// Whether `msg` ends with a TSIG record.
pub fn has_tsig(msg: &[u8]) -> bool {
    last_record(msg).is_some_and(|(s, _)| {
        wire::skip_name(msg, s)
            .and_then(|p| msg.get(p..p + 2))
            .is_some_and(|t| u16::from_be_bytes([t[0], t[1]]) == TSIG_TYPE)
    })
}

/// Seconds since the epoch, as TSIG counts time.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::from_config("xfr", &TsigKeyConfig { algorithm: "hmac-sha256".into(), secret: "c2VjcmV0c2VjcmV0".into() })
            .unwrap()
    }

    #[test]
    fn signed_message_verifies_and_a_changed_byte_does_not() {
        let mut m = hickory_proto::op::Message::query();
        m.metadata.id = 4242;
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("example.test.").unwrap(),
            hickory_proto::rr::RecordType::SOA,
        ));
        let mut bytes = m.to_vec().unwrap();
        key().sign(&mut bytes, None, 1_700_000_000, 0);
        assert!(has_tsig(&bytes));
        assert!(key().verify(&bytes, 1_700_000_010).is_ok());
        assert_eq!(key().verify(&bytes, 1_700_001_000).err(), Some(TsigError::BadTime));
        let mut tampered = bytes.clone();
        tampered[3] ^= 1;
        assert_eq!(key().verify(&tampered, 1_700_000_000).err(), Some(TsigError::BadSig));
        // hickory-proto agrees the signed message is well formed and carries the TSIG.
        let parsed = hickory_proto::op::Message::from_vec(&bytes).unwrap();
        let last = parsed.signature().map(|s| s.record_type()).or(parsed.additionals.last().map(|r| r.record_type()));
        assert_eq!(last, Some(hickory_proto::rr::RecordType::TSIG));
    }
}
