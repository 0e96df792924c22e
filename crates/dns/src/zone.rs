//! Static zone content: records from the config and from RFC 1035 zone files, both parsed
//! by hickory-proto's zone-file parser (`hickory_proto::serialize::txt::Parser`).

use crate::config::{DnsConfig, Subnet, parse_name};
use hickory_proto::rr::rdata::SOA;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::txt::Parser;

/// A zone's static part, names lowercased.
#[derive(Debug, Clone)]
pub struct StaticZone {
    pub origin: Name,
    /// The SOA record; its serial is replaced by the managed one when answers are compiled.
    pub soa: Record,
    /// Every other record, in file then config order.
    pub records: Vec<Record>,
    pub notify: Vec<std::net::SocketAddr>,
    pub allow_transfer: Vec<Subnet>,
    pub tsig_key: Option<crate::tsig::Key>,
}

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("zones.{zone}.records.{record}: {message}")]
    Record { zone: usize, record: usize, message: String },
    #[error("{file}: {message}")]
    File { file: String, message: String },
    #[error("zone {origin} has no SOA: give `soa = {{ mname, rname }}` or put one in its file")]
    NoSoa { origin: String },
    #[error("zone {origin}: {message}")]
    Other { origin: String, message: String },
}

/// Parses every zone of `cfg` (reading zone files).
pub fn compile_static(cfg: &DnsConfig) -> Result<Vec<StaticZone>, ZoneError> {
    let mut out = Vec::new();
    for (zi, z) in cfg.zones.iter().enumerate() {
        let origin = parse_name(&z.origin, None)
            .ok_or_else(|| ZoneError::Other { origin: z.origin.clone(), message: "bad origin".into() })?
            .to_lowercase();
        let mut records: Vec<Record> = Vec::new();
        let mut soa = None;
        if let Some(f) = &z.file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| ZoneError::File { file: f.display().to_string(), message: e.to_string() })?;
            let (_, sets) = Parser::new(text, Some(f.clone()), Some(origin.clone()))
                .parse()
                .map_err(|e| ZoneError::File { file: f.display().to_string(), message: e.to_string() })?;
            for set in sets.values() {
                records.extend(set.records_without_rrsigs().cloned());
            }
        }
        for (ri, r) in z.records.iter().enumerate() {
            let line = format!("{} {} IN {} {}\n", r.name, r.ttl_secs, r.rtype, r.data);
            let parsed = Parser::new(line, None, Some(origin.clone())).parse().map_err(|e| ZoneError::Record {
                zone: zi,
                record: ri,
                message: e.to_string(),
            })?;
            let rtype: RecordType = r.rtype.to_ascii_uppercase().parse().map_err(|_| ZoneError::Record {
                zone: zi,
                record: ri,
                message: format!("unknown record type `{}`", r.rtype),
            })?;
            for set in parsed.1.values() {
                records.extend(set.records_without_rrsigs().cloned());
            }
            if rtype == RecordType::SOA {
                return Err(ZoneError::Record {
                    zone: zi,
                    record: ri,
                    message: "write the SOA as `soa = {...}`".into(),
                });
            }
        }
        let mut rest = Vec::with_capacity(records.len());
        for mut r in records {
            r.name = r.name.to_lowercase();
            if !origin.zone_of(&r.name) {
                return Err(ZoneError::Other {
                    origin: z.origin.clone(),
                    message: format!("{} is outside the zone", r.name),
                });
            }
            if r.record_type() == RecordType::SOA {
                if r.name == origin {
                    soa = Some(r);
                }
                continue;
            }
            rest.push(r);
        }
        if let Some(s) = &z.soa {
            let name = |v: &str| parse_name(v, Some(&origin)).expect("validated");
            let data = SOA::new(
                name(&s.mname),
                name(&s.rname),
                0,
                s.refresh_secs as i32,
                s.retry_secs as i32,
                s.expire_secs as i32,
                s.minimum_secs,
            );
            soa = Some(Record::from_rdata(origin.clone(), s.ttl_secs, RData::SOA(data)));
        }
        let soa = soa.ok_or_else(|| ZoneError::NoSoa { origin: z.origin.clone() })?;
        let tsig_key = match &z.tsig_key {
            Some(k) => Some(
                crate::tsig::Key::from_config(k, &cfg.tsig_keys[k])
                    .map_err(|m| ZoneError::Other { origin: z.origin.clone(), message: m })?,
            ),
            None => None,
        };
        out.push(StaticZone {
            origin,
            soa,
            records: rest,
            notify: z.notify.clone(),
            allow_transfer: z.allow_transfer.iter().filter_map(|s| Subnet::parse(s)).collect(),
            tsig_key,
        });
    }
    Ok(out)
}

/// The SOA data of a record known to be an SOA.
pub fn soa_data(r: &Record) -> &SOA {
    match &r.data {
        RData::SOA(s) => s,
        _ => unreachable!("zone SOA records are SOA"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn zone_file_and_config_records_both_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("z.zone"),
            "$TTL 300\n@ IN SOA ns1 host 1 3600 600 86400 30\n@ IN NS ns1\nns1 IN A 192.0.2.1\nWWW 60 IN CNAME ns1\n\
             @ IN MX 10 mail\n@ IN TXT \"v=spf1 -all\"\n_sip._tcp IN SRV 0 5 5060 ns1\n@ IN CAA 0 issue \"letsencrypt.org\"\n",
        )
        .unwrap();
        let text = "[[zones]]\norigin = \"Example.TEST.\"\nfile = \"z.zone\"\nrecords = [{ name = \"v6\", type = \"AAAA\", data = \"2001:db8::1\" }]\n";
        let cfg = DnsConfig::parse(&dir.path().join("dns.toml"), text).unwrap();
        let zones = compile_static(&cfg).unwrap();
        let z = &zones[0];
        assert_eq!(z.origin.to_ascii(), "example.test.");
        assert_eq!(soa_data(&z.soa).minimum, 30);
        let types: Vec<_> = z.records.iter().map(|r| (r.name.to_ascii(), r.record_type())).collect();
        assert!(types.contains(&("www.example.test.".into(), RecordType::CNAME)), "names are lowercased: {types:?}");
        assert!(types.contains(&("v6.example.test.".into(), RecordType::AAAA)));
        assert!(types.contains(&("_sip._tcp.example.test.".into(), RecordType::SRV)));
        assert_eq!(z.records.len(), 8);
        let _ = Path::new("");
    }
}
