//! The name server's config file: TOML, typed, validated once at load.
//!
//! Errors are [`ConfigError`]s, `file:line:col: field: message`, as everywhere in drover.
//! Record data is written as in a zone file (`data = "10 mail.example.com."`) and parsed by
//! hickory-proto's RFC 1035 parser, so a record means the same in the config and in a zone file.
//! Names are relative to the zone's origin unless they end with a dot; `@` is the origin.
//!
//! ```toml
//! listen = "0.0.0.0:53"                  # UDP and TCP; `drover dns --listen` overrides it
//! udp_workers = 1                        # UDP sockets (SO_REUSEPORT), one thread each
//! max_udp_payload_bytes = 1232           # largest UDP answer with EDNS(0) (RFC 9715's safe size)
//! serial_file = "dns-serials.json"       # SOA serials survive restarts and never go backwards
//! rrl_responses_per_sec = 0              # per source /24 (v4) or /56 (v6); 0 = off
//! rrl_slip = 2                           # every Nth limited answer is sent truncated (TC) instead of dropped
//!
//! [[zones]]
//! origin = "example.com."
//! file = "example.com.zone"              # optional RFC 1035 zone file (relative to this file)
//! soa = { mname = "ns1.example.com.", rname = "hostmaster.example.com." }  # when the file has none
//! records = [
//!   { name = "@", type = "NS", data = "ns1" },
//!   { name = "ns1", type = "A", data = "192.0.2.1" },
//!   { name = "@", type = "MX", data = "10 mail", ttl_secs = 600 },
//! ]
//! notify = ["192.0.2.53:53"]             # secondaries told of every serial change
//! allow_transfer = ["192.0.2.53/32"]     # AXFR/IXFR from these sources (with the TSIG key, if set)
//! tsig_key = "xfr"                       # required on transfers and signs NOTIFY
//!
//! [tsig_keys.xfr]
//! algorithm = "hmac-sha256"
//! secret = "base64=="
//!
//! [[pools]]
//! name = "web.example.com."              # answers A/AAAA (and SRV with `srv_port`) from healthy members
//! subscription = "web"                   # members: entities with this subscription (from the watch stream)
//! checks = ["http"]                      # each must also pass
//! policy = "multivalue"                  # multivalue | failover | weighted | zone-aware
//! max_answers = 8
//! ttl_secs = 5
//! when_none_healthy = "all"              # "all" answers every member (like Route 53); "none" answers none
//! secondary_subscription = "web-dr"      # failover: used only while no primary member is healthy
//! srv_port = 8080
//! members = [{ name = "web1", address = "10.0.0.1", weight = 2, zone = "a", secondary = false }]  # static
//!
//! [[client_zones]]                       # zone-aware pools: which asker is in which zone
//! subnet = "10.1.0.0/16"                 # by source address, or the EDNS Client Subnet when sent
//! zone = "a"
//!
//! [discovery]                            # Consul-style names under a served zone
//! domain = "dc1.example.com."            # <subscription>.service.dc1.example.com., <entity>.node.dc1.example.com.
//! ttl_secs = 5
//! ```

use drover_core::config::{ConfigError, locate_path, parse_toml};
use hickory_proto::rr::Name;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

fn d_listen() -> SocketAddr {
    "0.0.0.0:53".parse().unwrap()
}
fn d_workers() -> usize {
    1
}
fn d_payload() -> u16 {
    1232
}
fn d_slip() -> u32 {
    2
}
fn d_record_ttl() -> u32 {
    3600
}
fn d_pool_ttl() -> u32 {
    5
}
fn d_max_answers() -> usize {
    8
}
fn d_weight() -> u32 {
    1
}
fn d_refresh() -> u32 {
    3600
}
fn d_retry() -> u32 {
    600
}
fn d_expire() -> u32 {
    604_800
}
fn d_minimum() -> u32 {
    30
}
fn d_algorithm() -> String {
    "hmac-sha256".into()
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    #[serde(default = "d_listen")]
    pub listen: SocketAddr,
    #[serde(default = "d_workers")]
    pub udp_workers: usize,
    #[serde(default = "d_payload")]
    pub max_udp_payload_bytes: u16,
    #[serde(default)]
    pub serial_file: Option<PathBuf>,
    #[serde(default)]
    pub rrl_responses_per_sec: u32,
    #[serde(default = "d_slip")]
    pub rrl_slip: u32,
    #[serde(default)]
    pub zones: Vec<ZoneConfig>,
    #[serde(default)]
    pub tsig_keys: BTreeMap<String, TsigKeyConfig>,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    #[serde(default)]
    pub client_zones: Vec<ClientZone>,
    #[serde(default)]
    pub discovery: Option<Discovery>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    pub origin: String,
    #[serde(default)]
    pub file: Option<PathBuf>,
    #[serde(default)]
    pub soa: Option<SoaConfig>,
    #[serde(default)]
    pub records: Vec<RecordConfig>,
    #[serde(default)]
    pub notify: Vec<SocketAddr>,
    #[serde(default)]
    pub allow_transfer: Vec<String>,
    #[serde(default)]
    pub tsig_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoaConfig {
    pub mname: String,
    pub rname: String,
    #[serde(default = "d_refresh")]
    pub refresh_secs: u32,
    #[serde(default = "d_retry")]
    pub retry_secs: u32,
    #[serde(default = "d_expire")]
    pub expire_secs: u32,
    /// Negative-answer TTL (RFC 2308).
    #[serde(default = "d_minimum")]
    pub minimum_secs: u32,
    #[serde(default = "d_record_ttl")]
    pub ttl_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub data: String,
    #[serde(default = "d_record_ttl")]
    pub ttl_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TsigKeyConfig {
    #[serde(default = "d_algorithm")]
    pub algorithm: String,
    /// Base64, as `tsig-keygen`/`keymgr` print it.
    pub secret: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    Multivalue,
    Failover,
    Weighted,
    ZoneAware,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoneHealthy {
    All,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    #[serde(default)]
    pub subscription: Option<String>,
    #[serde(default)]
    pub secondary_subscription: Option<String>,
    #[serde(default)]
    pub checks: Vec<String>,
    #[serde(default = "d_policy")]
    pub policy: Policy,
    #[serde(default = "d_max_answers")]
    pub max_answers: usize,
    #[serde(default = "d_pool_ttl")]
    pub ttl_secs: u32,
    #[serde(default = "d_none_healthy")]
    pub when_none_healthy: NoneHealthy,
    #[serde(default)]
    pub srv_port: Option<u16>,
    #[serde(default)]
    pub members: Vec<StaticMember>,
}

fn d_policy() -> Policy {
    Policy::Multivalue
}
fn d_none_healthy() -> NoneHealthy {
    NoneHealthy::All
}

/// A pool member written in the config: always healthy (standalone mode has no health source).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticMember {
    pub name: String,
    pub address: IpAddr,
    #[serde(default = "d_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub secondary: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientZone {
    pub subnet: String,
    pub zone: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    pub domain: String,
    #[serde(default = "d_pool_ttl")]
    pub ttl_secs: u32,
}

/// An address prefix (`10.1.0.0/16`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Option<Subnet> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() { max } else { p.parse().ok().filter(|p| *p <= max)? };
        Some(Subnet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // A v4-mapped v6 source (dual-stack socket) is matched as v4.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

/// A validation failure before it is located: the path of keys and array indices.
struct Invalid(Vec<String>, String);

fn bad(path: &[&str], msg: impl Into<String>) -> Invalid {
    Invalid(path.iter().map(|s| s.to_string()).collect(), msg.into())
}

/// Parses a name written in the config: absolute with a trailing dot, else under `origin`.
pub fn parse_name(s: &str, origin: Option<&Name>) -> Option<Name> {
    if s == "@" {
        return origin.cloned();
    }
    let n = Name::parse(s, origin).ok()?;
    n.is_fqdn().then_some(n)
}

impl DnsConfig {
    /// Reads and validates `path`; relative zone files and the serial file are taken from its folder.
    pub fn load(path: &Path) -> Result<DnsConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            field: String::new(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text`; `file` names the source in errors and anchors relative paths.
    pub fn parse(file: &Path, text: &str) -> Result<DnsConfig, ConfigError> {
        let mut cfg: DnsConfig = parse_toml(file, text)?;
        let base = file.parent().unwrap_or(Path::new(""));
        for z in &mut cfg.zones {
            if let Some(f) = &mut z.file {
                *f = base.join(&*f);
            }
        }
        if let Some(s) = &mut cfg.serial_file {
            *s = base.join(&*s);
        }
        cfg.validate().map_err(|Invalid(path, message)| locate_path(file, text, &path, message))?;
        // Records and zone files are parsed here too, so `check-config` reports their errors.
        crate::zone::compile_static(&cfg).map_err(|e| match e {
            crate::zone::ZoneError::Record { zone, record, message } => locate_path(
                file,
                text,
                &["zones".into(), zone.to_string(), "records".into(), record.to_string()],
                message,
            ),
            other => locate_path(file, text, &["zones".into()], other.to_string()),
        })?;
        Ok(cfg)
    }

    /// A config with no file: what `drover dns --server URL` serves before it has any zone.
    pub fn empty() -> DnsConfig {
        parse_toml(Path::new("(none)"), "").expect("the empty config is valid")
    }

    fn validate(&self) -> Result<(), Invalid> {
        if !(1..=64).contains(&self.udp_workers) {
            return Err(bad(&["udp_workers"], "must be 1 to 64"));
        }
        if self.max_udp_payload_bytes < 512 {
            return Err(bad(&["max_udp_payload_bytes"], "must be at least 512"));
        }
        if self.rrl_slip > 10 {
            return Err(bad(&["rrl_slip"], "must be 0 (never slip) to 10"));
        }
        let mut origins = BTreeSet::new();
        for (i, z) in self.zones.iter().enumerate() {
            let i = i.to_string();
            let Some(origin) = parse_name(&z.origin, None) else {
                return Err(bad(
                    &["zones", &i, "origin"],
                    format!("`{}` is not an absolute name (end it with `.`)", z.origin),
                ));
            };
            if !origins.insert(origin.to_lowercase()) {
                return Err(bad(&["zones", &i, "origin"], format!("zone `{}` is defined twice", z.origin)));
            }
            if let Some(s) = &z.soa {
                for (f, v) in [("mname", &s.mname), ("rname", &s.rname)] {
                    if parse_name(v, Some(&origin)).is_none() {
                        return Err(bad(&["zones", &i, "soa", f], format!("`{v}` is not a domain name")));
                    }
                }
            }
            for (ai, a) in z.allow_transfer.iter().enumerate() {
                if Subnet::parse(a).is_none() {
                    return Err(bad(
                        &["zones", &i, "allow_transfer", &ai.to_string()],
                        format!("`{a}` is not an address or subnet"),
                    ));
                }
            }
            if let Some(k) = &z.tsig_key
                && !self.tsig_keys.contains_key(k)
            {
                return Err(bad(&["zones", &i, "tsig_key"], format!("unknown key `{k}` (define [tsig_keys.{k}])")));
            }
            for (ri, r) in z.records.iter().enumerate() {
                if parse_name(&r.name, Some(&origin)).is_none_or(|n| !origin.zone_of(&n)) {
                    return Err(bad(
                        &["zones", &i, "records", &ri.to_string(), "name"],
                        format!("`{}` is not a name inside {}", r.name, z.origin),
                    ));
                }
            }
        }
        for (name, k) in &self.tsig_keys {
            if !k.algorithm.eq_ignore_ascii_case("hmac-sha256") {
                return Err(bad(&["tsig_keys", name, "algorithm"], "only hmac-sha256 is supported"));
            }
            if data_encoding::BASE64.decode(k.secret.as_bytes()).map_or(true, |s| s.is_empty()) {
                return Err(bad(&["tsig_keys", name, "secret"], "must be non-empty base64"));
            }
            if Name::from_ascii(name).is_err() {
                return Err(bad(&["tsig_keys", name], "a key's name must be a domain name"));
            }
        }
        let zone_of = |n: &Name| self.zones.iter().any(|z| parse_name(&z.origin, None).is_some_and(|o| o.zone_of(n)));
        let mut pool_names = BTreeSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            let i = i.to_string();
            let at = |f: &str| vec!["pools".to_string(), i.clone(), f.to_string()];
            let Some(name) = parse_name(&p.name, None) else {
                return Err(Invalid(at("name"), format!("`{}` is not an absolute name (end it with `.`)", p.name)));
            };
            if !zone_of(&name) {
                return Err(Invalid(at("name"), format!("{} is in no configured zone", p.name)));
            }
            if !pool_names.insert(name.to_lowercase()) {
                return Err(Invalid(at("name"), format!("pool {} is defined twice", p.name)));
            }
            if p.subscription.is_none() && p.members.is_empty() {
                return Err(Invalid(at("subscription"), "a pool needs a subscription or static members".into()));
            }
            if p.secondary_subscription.is_some() && p.policy != Policy::Failover {
                return Err(Invalid(at("secondary_subscription"), "only a failover pool has a secondary".into()));
            }
            if p.max_answers == 0 {
                return Err(Invalid(at("max_answers"), "must be at least 1".into()));
            }
            for (mi, m) in p.members.iter().enumerate() {
                let at = |f: &str| vec!["pools".into(), i.clone(), "members".into(), mi.to_string(), f.into()];
                if Name::from_ascii(&m.name).is_err() || m.name.contains('.') {
                    return Err(Invalid(at("name"), format!("`{}` must be one DNS label", m.name)));
                }
                if !(1..=1000).contains(&m.weight) {
                    return Err(Invalid(at("weight"), "must be 1 to 1000".into()));
                }
            }
        }
        for (i, c) in self.client_zones.iter().enumerate() {
            if Subnet::parse(&c.subnet).is_none() {
                return Err(bad(
                    &["client_zones", &i.to_string(), "subnet"],
                    format!("`{}` is not a subnet", c.subnet),
                ));
            }
        }
        if let Some(d) = &self.discovery {
            match parse_name(&d.domain, None) {
                Some(n) if zone_of(&n) => {}
                _ => {
                    return Err(bad(
                        &["discovery", "domain"],
                        format!("`{}` must be an absolute name inside a configured zone", d.domain),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        DnsConfig::parse(Path::new("dns.toml"), text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = DnsConfig::parse(Path::new("dns.toml"), "").unwrap();
        assert_eq!(c.listen, "0.0.0.0:53".parse().unwrap());
        assert_eq!((c.udp_workers, c.max_udp_payload_bytes, c.rrl_responses_per_sec), (1, 1232, 0));
        let c = DnsConfig::parse(
            Path::new("dns.toml"),
            "[[zones]]\norigin = \"a.test.\"\nsoa = { mname = \"ns\", rname = \"h\" }\n[[pools]]\nname = \"w.a.test.\"\nsubscription = \"web\"\n",
        )
        .unwrap();
        assert_eq!(
            (c.pools[0].ttl_secs, c.pools[0].policy, c.pools[0].when_none_healthy),
            (5, Policy::Multivalue, NoneHealthy::All)
        );
    }

    #[test]
    fn bad_record_data_names_the_record_line() {
        let e = err(
            "[[zones]]\norigin = \"a.test.\"\nsoa = { mname = \"ns\", rname = \"h\" }\nrecords = [\n  { name = \"www\", type = \"A\", data = \"192.0.2.1\" },\n  { name = \"x\", type = \"A\", data = \"not-an-ip\" },\n]\n",
        );
        assert!(e.starts_with("dns.toml:6:"), "{e}");
        assert!(e.contains("zones.0.records.1"), "{e}");
    }

    #[test]
    fn validation_errors_are_located() {
        let e = err("[[pools]]\nname = \"w.nowhere.\"\nsubscription = \"web\"\n");
        assert!(e.starts_with("dns.toml:2:1: pools.0.name:"), "{e}");
        let e = err("[[zones]]\norigin = \"relative\"\n");
        assert!(e.contains("zones.0.origin: `relative` is not an absolute name"), "{e}");
        let e = err("udp_workers = 0\n");
        assert_eq!(e, "dns.toml:1:1: udp_workers: must be 1 to 64");
        let e = err("bogus = 1\n");
        assert!(e.contains("unknown field"), "{e}");
    }
}
