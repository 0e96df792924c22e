//! The name server's answers as real clients (`dig`, `kdig`) see them: every record type,
//! the error cases, EDNS and truncation, and pools following health. Each test quotes the
//! RFC requirement it checks.

mod common;

use common::{flags, member, start, status};
use std::time::{Duration, Instant};

const ZONE: &str = r#"
max_udp_payload_bytes = 4096

[[zones]]
origin = "example.test."
file = "example.test.zone"
records = [
  { name = "v6", type = "AAAA", data = "2001:db8::1" },
  { name = "@", type = "CAA", data = "0 issue \"letsencrypt.org\"" },
  { name = "_sip._tcp", type = "SRV", data = "0 5 5060 ns1" },
  { name = "a.b.deep", type = "A", data = "192.0.2.9" },
]

[[zones]]
origin = "2.0.192.in-addr.arpa."
soa = { mname = "ns1.example.test.", rname = "hostmaster.example.test." }
records = [{ name = "1", type = "PTR", data = "ns1.example.test." }]

[[client_zones]]
subnet = "127.0.0.0/8"
zone = "a"

[[client_zones]]
subnet = "10.9.0.0/16"
zone = "b"

[[pools]]
name = "web.example.test."
members = [
  { name = "w1", address = "192.0.2.11" },
  { name = "w2", address = "192.0.2.12" },
  { name = "w3", address = "192.0.2.13" },
]
max_answers = 2
srv_port = 8080

[[pools]]
name = "db.example.test."
subscription = "db"
secondary_subscription = "db-dr"
policy = "failover"

[[pools]]
name = "app.example.test."
subscription = "app"
policy = "zone-aware"
when_none_healthy = "none"

[[pools]]
name = "api.example.test."
subscription = "api"
when_none_healthy = "all"

[discovery]
domain = "dc1.example.test."
"#;

const ZONE_FILE: &str = "$TTL 3600\n\
@      IN SOA ns1 hostmaster 1 3600 600 604800 30\n\
@      IN NS  ns1\n\
ns1    IN A   192.0.2.1\n\
www    IN CNAME ns1\n\
@      IN MX  10 mail\n\
mail   IN A   192.0.2.2\n\
@      IN TXT \"v=spf1 -all\"\n";

fn big_zone() -> String {
    let mut z = String::from(ZONE_FILE);
    for i in 0..40 {
        z.push_str(&format!("big IN TXT \"record number {i:02} padded to be long enough\"\n"));
    }
    z
}

async fn server() -> common::Dns {
    start(ZONE, &[("example.test.zone", &big_zone())]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_static_record_type_answers_from_config_and_zone_file() {
    let d = server().await;
    assert_eq!(d.short("ns1.example.test", "A"), ["192.0.2.1"]);
    assert_eq!(d.short("v6.example.test", "AAAA"), ["2001:db8::1"]);
    assert_eq!(d.short("example.test", "NS"), ["ns1.example.test."]);
    assert_eq!(d.short("example.test", "MX"), ["10 mail.example.test."]);
    assert_eq!(d.short("example.test", "TXT"), ["\"v=spf1 -all\""]);
    assert_eq!(d.short("_sip._tcp.example.test", "SRV"), ["0 5 5060 ns1.example.test."]);
    assert_eq!(d.short("example.test", "CAA"), ["0 issue \"letsencrypt.org\""]);
    assert_eq!(d.short("1.2.0.192.in-addr.arpa", "PTR"), ["ns1.example.test."]);
    let soa = d.short("example.test", "SOA");
    assert!(soa[0].starts_with("ns1.example.test. hostmaster.example.test. "), "{soa:?}");
    // RFC 1034 §4.3.2 step 3a: a CNAME is answered, then followed to its target in our data.
    assert_eq!(d.short("www.example.test", "A"), ["192.0.2.1", "ns1.example.test."]);
    // RFC 1034 §4.3.2: the AA bit is set on authoritative answers.
    let out = d.dig(&["ns1.example.test", "A"]);
    assert!(flags(&out).contains("aa"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_and_nodata_both_carry_the_soa() {
    let d = server().await;
    // RFC 2308 §2.1: a name error (NXDOMAIN) MUST carry the SOA in the authority section.
    let out = d.dig(&["nope.example.test", "A"]);
    assert_eq!(status(&out), "NXDOMAIN", "{out}");
    assert!(out.contains("AUTHORITY: 1"), "{out}");
    assert!(out.contains("IN\tSOA\tns1.example.test."), "{out}");
    // RFC 2308 §2.2: NODATA is NOERROR with no answers and the SOA in authority.
    let out = d.dig(&["ns1.example.test", "MX"]);
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("ANSWER: 0") && out.contains("AUTHORITY: 1"), "{out}");
    // RFC 2308 §5: the negative TTL is min(SOA TTL, SOA MINIMUM) = 30.
    assert!(out.contains("30\tIN\tSOA"), "{out}");
    // RFC 8020: an empty non-terminal exists; its children make it NODATA, not NXDOMAIN.
    assert_eq!(status(&d.dig(&["b.deep.example.test", "A"])), "NOERROR");
    // A name outside every zone we serve is REFUSED (we are authoritative only).
    assert_eq!(status(&d.dig(&["example.org", "A"])), "REFUSED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_match_without_regard_to_case_and_the_question_is_echoed_as_asked() {
    let d = server().await;
    // RFC 4343 §3: comparisons of names MUST be case-insensitive.
    assert_eq!(d.short("NS1.ExAmPlE.TeSt", "A"), ["192.0.2.1"]);
    // RFC 1035 §7.3 / 0x20: the question comes back as sent.
    let out = d.dig(&["NS1.ExAmPlE.TeSt", "A", "+noall", "+question"]);
    assert!(out.contains("NS1.ExAmPlE.TeSt."), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_is_answered_with_one_hinfo() {
    let d = server().await;
    // RFC 8482 §4.2: respond to ANY with a single synthesized HINFO ("RFC8482").
    let out = d.dig(&["example.test", "ANY", "+noall", "+answer"]);
    assert_eq!(out.lines().filter(|l| !l.is_empty()).count(), 1, "{out}");
    assert!(out.contains("HINFO\t\"RFC8482\""), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_sets_tc_over_udp_and_comes_whole_over_tcp() {
    let d = server().await;
    // RFC 1035 §4.2.1 / RFC 2181 §9: a UDP answer over 512 bytes (no EDNS) is truncated with TC.
    let out = d.dig(&["big.example.test", "TXT", "+noedns", "+ignore"]);
    assert!(flags(&out).contains("tc"), "{out}");
    assert!(out.contains("ANSWER: 0"), "never a silently cut answer set: {out}");
    // Over TCP the whole set arrives.
    let out = d.dig(&["big.example.test", "TXT", "+tcp"]);
    assert!(out.contains("ANSWER: 40"), "{out}");
    // dig retries over TCP by itself after TC and gets everything.
    let out = d.dig(&["big.example.test", "TXT", "+noedns"]);
    assert!(out.contains("ANSWER: 40"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_buffer_size_is_honoured() {
    let d = server().await;
    // RFC 6891 §6.2.5: the requestor's payload size bounds the answer; with 4096 it fits in UDP.
    let out = d.dig(&["big.example.test", "TXT", "+bufsize=4096", "+ignore"]);
    assert!(!flags(&out).contains("tc") && out.contains("ANSWER: 40"), "{out}");
    // RFC 6891 §7: our OPT is in the answer, advertising our own size.
    assert!(out.contains("udp: 4096"), "{out}");
    // With 1232 advertised the 40 TXT records (~2 KB) do not fit: TC.
    let out = d.dig(&["big.example.test", "TXT", "+bufsize=1232", "+ignore"]);
    assert!(flags(&out).contains("tc"), "{out}");
    // RFC 6891 §6.1.3: an EDNS version we do not implement gets BADVERS.
    let out = d.dig(&["ns1.example.test", "A", "+edns=1", "+noednsneg"]);
    assert_eq!(status(&out), "BADVERS", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multivalue_pool_rotates_through_every_member_and_srv_carries_the_port() {
    let d = server().await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let a = d.short("web.example.test", "A");
        assert_eq!(a.len(), 2, "max_answers = 2: {a:?}");
        seen.extend(a);
    }
    assert_eq!(seen.len(), 3, "rotation reaches every member: {seen:?}");
    let out = d.dig(&["web.example.test", "SRV", "+noall", "+answer", "+additional"]);
    // Each SRV target's address comes along in the additional section.
    let targets: Vec<&str> =
        out.lines().filter(|l| l.contains("\tSRV\t0 1 8080 ")).map(|l| l.rsplit(' ').next().unwrap()).collect();
    assert_eq!(targets.len(), 2, "{out}");
    for t in targets {
        assert!(out.lines().any(|l| l.starts_with(t) && l.contains("\tIN\tA\t192.0.2.1")), "{t}: {out}");
    }
    // Pool TTLs are low by default (5 s).
    let out = d.dig(&["web.example.test", "A", "+noall", "+answer"]);
    assert!(out.contains("\t5\tIN\tA\t"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_pool_answers_the_secondary_only_while_no_primary_is_healthy() {
    let d = server().await;
    let set = |p1: bool, p2: bool| {
        d.set_members(vec![
            member("db1", "10.0.0.1", &["db"], None, p1),
            member("db2", "10.0.0.2", &["db"], None, p2),
            member("dr1", "10.1.0.1", &["db-dr"], None, true),
        ])
    };
    set(true, true);
    wait_for(|| d.short("db.example.test", "A") == ["10.0.0.1", "10.0.0.2"]).await;
    set(false, true);
    wait_for(|| d.short("db.example.test", "A") == ["10.0.0.2"]).await;
    set(false, false);
    wait_for(|| d.short("db.example.test", "A") == ["10.1.0.1"]).await;
    set(true, false);
    wait_for(|| d.short("db.example.test", "A") == ["10.0.0.1"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_leaves_the_answer_within_100_ms() {
    let d = server().await;
    d.set_members(vec![
        member("api1", "10.0.1.1", &["api"], None, true),
        member("api2", "10.0.1.2", &["api"], None, true),
    ]);
    wait_for(|| d.short("api.example.test", "A").len() == 2).await;
    let t = Instant::now();
    d.set_members(vec![
        member("api1", "10.0.1.1", &["api"], None, true),
        member("api2", "10.0.1.2", &["api"], None, false),
    ]);
    loop {
        if d.short("api.example.test", "A") == ["10.0.1.1"] {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "answer did not change");
    }
    // The dig round trip is included in the measurement: the rebuild itself is faster.
    assert!(t.elapsed() < Duration::from_millis(100), "{:?}", t.elapsed());
    // when_none_healthy = "all": with every member down, answer them all (like Route 53).
    d.set_members(vec![
        member("api1", "10.0.1.1", &["api"], None, false),
        member("api2", "10.0.1.2", &["api"], None, false),
    ]);
    wait_for(|| d.short("api.example.test", "A") == ["10.0.1.1", "10.0.1.2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_aware_pool_prefers_the_askers_zone_by_source_and_by_client_subnet() {
    let d = server().await;
    d.set_members(vec![
        member("app-a", "10.0.2.1", &["app"], Some("a"), true),
        member("app-b", "10.0.2.2", &["app"], Some("b"), true),
    ]);
    // We ask from 127.0.0.1: client zone "a".
    wait_for(|| d.short("app.example.test", "A") == ["10.0.2.1"]).await;
    // RFC 7871: with a Client Subnet in zone "b", the answer is for that subnet, and the
    // option is echoed with a scope.
    let out = d.dig(&["app.example.test", "A", "+subnet=10.9.8.0/24"]);
    assert!(out.contains("IN\tA\t10.0.2.2") && !out.contains("10.0.2.1"), "{out}");
    assert!(out.contains("CLIENT-SUBNET: 10.9.8.0/24/16"), "{out}");
    // The asker's zone has no healthy member: the others answer.
    d.set_members(vec![
        member("app-a", "10.0.2.1", &["app"], Some("a"), false),
        member("app-b", "10.0.2.2", &["app"], Some("b"), true),
    ]);
    wait_for(|| d.short("app.example.test", "A") == ["10.0.2.2"]).await;
    // when_none_healthy = "none": nothing healthy, NODATA with the SOA.
    d.set_members(vec![member("app-a", "10.0.2.1", &["app"], Some("a"), false)]);
    wait_for(|| d.short("app.example.test", "A").is_empty()).await;
    let out = d.dig(&["app.example.test", "A"]);
    assert_eq!(status(&out), "NOERROR", "the pool name exists: NODATA, not NXDOMAIN: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_style_service_and_node_names_follow_members() {
    let d = server().await;
    d.set_members(vec![
        member("n1", "10.0.3.1", &["cache", "entity:n1"], None, true),
        member("n2", "10.0.3.2", &["cache"], None, false),
    ]);
    wait_for(|| d.short("cache.service.dc1.example.test", "A") == ["10.0.3.1"]).await;
    assert_eq!(d.short("n2.node.dc1.example.test", "A"), ["10.0.3.2"]);
    assert_eq!(status(&d.dig(&["entity:n1.service.dc1.example.test", "A"])), "NXDOMAIN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soa_serial_moves_on_every_change_of_content() {
    let d = server().await;
    let serial = || d.short("example.test", "SOA")[0].split(' ').nth(2).unwrap().parse::<u32>().unwrap();
    let s0 = serial();
    d.set_members(vec![member("api1", "10.0.1.1", &["api"], None, true)]);
    wait_for(|| d.short("api.example.test", "A") == ["10.0.1.1"]).await;
    let s1 = serial();
    assert!(drover_dns::serial::serial_gt(s1, s0), "{s0} -> {s1}");
    // The same view again changes nothing.
    d.set_members(vec![member("api1", "10.0.1.1", &["api"], None, true)]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(serial(), s1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kdig_agrees_over_udp_and_tcp() {
    let d = server().await;
    for transport in ["+notcp", "+tcp"] {
        let out = common::kdig_at(d.addr, &["mail.example.test", "A", transport]);
        assert!(out.contains("status: NOERROR") && out.contains("192.0.2.2"), "{transport}: {out}");
    }
}

async fn wait_for(mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "condition not met in 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
