//! Helpers for the name server's tests: an in-process `NameServer` fed by a watch channel
//! the test controls, queried with the real `dig` and `kdig`.
#![allow(dead_code)]

use drover_core::health::MemberHealth;
use drover_core::status::Status;
use drover_dns::{DnsConfig, Members, NameServer};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use tokio::sync::watch;

pub struct Dns {
    pub ns: NameServer,
    pub addr: SocketAddr,
    pub members: watch::Sender<Members>,
    pub dir: tempfile::TempDir,
}

/// Starts a name server on 127.0.0.1 (a free port) with `config` (TOML), zone files
/// written beside it from `files`.
pub async fn start(config: &str, files: &[(&str, &str)]) -> Dns {
    start_at(config, files, "127.0.0.1:0".parse().unwrap()).await
}

pub async fn start_at(config: &str, files: &[(&str, &str)], listen: SocketAddr) -> Dns {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("dns.toml");
    std::fs::write(&path, config).unwrap();
    let cfg = DnsConfig::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
    let (tx, rx) = watch::channel(Members::default());
    let ns = NameServer::start(cfg, listen, rx).await.unwrap();
    let addr = ns.local_addr;
    Dns { ns, addr, members: tx, dir }
}

impl Dns {
    /// `dig` with the given extra arguments; returns stdout.
    pub fn dig(&self, args: &[&str]) -> String {
        dig_at(self.addr, args)
    }

    /// The answer section's data fields (`+short`), sorted.
    pub fn short(&self, name: &str, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self.dig(&[name, rtype, "+short"]).lines().map(str::to_string).collect();
        v.sort();
        v
    }

    pub fn set_members(&self, members: Vec<MemberHealth>) {
        let view: drover_dns::View = members.into_iter().map(|m| (m.entity.clone(), m)).collect();
        self.members.send_replace(Arc::new(view));
    }
}

pub fn dig_at(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["+norec", "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig is installed (scripts/test.sh)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn kdig_at(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("kdig")
        .arg(format!("@{}", addr.ip()))
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["+norec", "+time=2", "+retry=0"])
        .args(args)
        .output()
        .expect("kdig is installed (scripts/test.sh)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `status:` of a dig answer (NOERROR, NXDOMAIN, ...).
pub fn status(dig_out: &str) -> String {
    dig_out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("(no header)").to_string()
}

/// The header's flags (`qr aa tc ...`).
pub fn flags(dig_out: &str) -> String {
    dig_out.split("flags: ").nth(1).and_then(|s| s.split(';').next()).unwrap_or("").to_string()
}

/// An agent member as the control plane reports it.
pub fn member(name: &str, addr: &str, subs: &[&str], zone: Option<&str>, healthy: bool) -> MemberHealth {
    let mut labels = BTreeMap::new();
    if let Some(z) = zone {
        labels.insert("zone".to_string(), z.to_string());
    }
    let mut checks = BTreeMap::new();
    checks.insert("keepalive".to_string(), if healthy { Status::Ok } else { Status::Critical });
    MemberHealth {
        entity: name.to_string(),
        class: Default::default(),
        address: Some(addr.to_string()),
        subscriptions: subs.iter().map(|s| s.to_string()).collect(),
        labels,
        healthy,
        reason: String::new(),
        checks,
        changed_ms: 0,
    }
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}
