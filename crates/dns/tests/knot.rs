//! A real Knot DNS secondary (`knotd`) mirrors a drover zone: TSIG-signed SOA checks and
//! AXFR, then NOTIFY on every serial change makes it transfer the new content.

mod common;

use common::{kdig_at, member};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "ZHJvdmVyLWRucy10ZXN0LXRzaWcta2V5LTMyYnl0ZXM=";

use drover_testkit::free_port;

struct Knot(Child);
impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn soa_serial(out: &str) -> Option<u32> {
    out.lines().find(|l| l.contains("\tSOA\t"))?.split_whitespace().nth(6)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knot_secondary_transfers_the_zone_with_tsig_and_follows_notify() {
    let knot_port = free_port();
    let primary_port = free_port();
    let config = format!(
        r#"
[[zones]]
origin = "example.test."
soa = {{ mname = "ns1", rname = "hostmaster", refresh_secs = 3600 }}
records = [
  {{ name = "@", type = "NS", data = "ns1" }},
  {{ name = "ns1", type = "A", data = "192.0.2.1" }},
  {{ name = "@", type = "MX", data = "10 ns1" }},
]
notify = ["127.0.0.1:{knot_port}"]
tsig_key = "xfr"

[tsig_keys.xfr]
secret = "{SECRET}"

[[pools]]
name = "api.example.test."
subscription = "api"
when_none_healthy = "none"
"#
    );
    let d = common::start_at(&config, &[], format!("127.0.0.1:{primary_port}").parse().unwrap()).await;
    d.set_members(vec![member("api1", "10.0.1.1", &["api"], None, true)]);

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().display();
    let conf = format!(
        "server:\n    listen: 127.0.0.1@{knot_port}\n    rundir: {p}\n\
         control:\n    listen: {p}/knot.sock\n\
         log:\n  - target: stderr\n    any: info\n\
         database:\n    storage: {p}\n\
         key:\n  - id: xfr\n    algorithm: hmac-sha256\n    secret: {SECRET}\n\
         remote:\n  - id: primary\n    address: 127.0.0.1@{primary_port}\n    key: xfr\n\
         acl:\n  - id: notify\n    address: 127.0.0.1\n    key: xfr\n    action: notify\n\
         template:\n  - id: default\n    storage: {p}\n    zonefile-load: none\n\
         zone:\n  - domain: example.test\n    master: primary\n    acl: notify\n"
    );
    std::fs::write(dir.path().join("knot.conf"), conf).unwrap();
    let log = std::fs::File::create(dir.path().join("knot.log")).unwrap();
    let _knot = Knot(
        Command::new("knotd")
            .arg("-c")
            .arg(dir.path().join("knot.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("knotd is installed (scripts/test.sh)"),
    );
    let knot: SocketAddr = format!("127.0.0.1:{knot_port}").parse().unwrap();
    let primary: SocketAddr = d.addr;
    let knot_log = || std::fs::read_to_string(dir.path().join("knot.log")).unwrap_or_default();

    // The first transfer: Knot serves our serial and our pool's current answer.
    let ours = soa_serial(&kdig_at(primary, &["example.test", "SOA"])).unwrap();
    let t = Instant::now();
    while soa_serial(&kdig_at(knot, &["example.test", "SOA"])) != Some(ours) {
        assert!(t.elapsed() < Duration::from_secs(10), "no transfer; knot log:\n{}", knot_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = kdig_at(knot, &["api.example.test", "A"]);
    assert!(out.contains("10.0.1.1"), "{out}");
    assert!(kdig_at(knot, &["example.test", "MX"]).contains("10 ns1.example.test."));

    // A health change moves the serial; NOTIFY (RFC 1996) makes Knot transfer at once,
    // long before its 3600 s refresh.
    d.set_members(vec![
        member("api1", "10.0.1.1", &["api"], None, false),
        member("api2", "10.0.1.2", &["api"], None, true),
    ]);
    let t = Instant::now();
    loop {
        let out = kdig_at(knot, &["api.example.test", "A"]);
        if out.contains("10.0.1.2") && !out.contains("10.0.1.1") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "NOTIFY not followed: {out}\nknot log:\n{}", knot_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let newer = soa_serial(&kdig_at(knot, &["example.test", "SOA"])).unwrap();
    assert!(drover_dns::serial::serial_gt(newer, ours), "{ours} -> {newer}");

    // RFC 5936 §6 / RFC 8945: a transfer without the key is refused.
    let out = common::dig_at(primary, &["example.test", "AXFR"]);
    assert!(out.contains("Transfer failed") && !out.contains("\tSOA\t"), "{out}");
    // With it (kdig signs with -y), the whole zone comes: SOA first and last.
    let out = kdig_at(primary, &["-y", &format!("hmac-sha256:xfr:{SECRET}"), "example.test", "AXFR"]);
    assert_eq!(out.lines().filter(|l| l.contains("\tSOA\t")).count(), 2, "{out}");
    assert!(out.contains("10.0.1.2"), "{out}");
}
