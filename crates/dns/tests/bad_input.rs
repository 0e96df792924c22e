//! Bad input never stops the name server: random and truncated packets, oversized names,
//! and floods from one source (response rate limiting).

mod common;

use std::net::UdpSocket;
use std::time::Duration;

const CONFIG: &str = r#"
rrl_responses_per_sec = 0

[[zones]]
origin = "example.test."
soa = { mname = "ns1", rname = "hostmaster" }
records = [{ name = "ns1", type = "A", data = "192.0.2.1" }]
"#;

fn query(name: &str, rtype: u16) -> Vec<u8> {
    let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for l in name.split('.').filter(|l| !l.is_empty()) {
        m.push(l.len() as u8);
        m.extend_from_slice(l.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&rtype.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

/// xorshift: reproducible noise without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_from_a_fuzzing_loop_leave_the_server_answering() {
    let d = common::start(CONFIG, &[]).await;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
    let good = query("ns1.example.test.", 1);
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut buf = [0u8; 4096];
    let mut answered_garbage = 0;
    for i in 0..20_000u32 {
        let pkt: Vec<u8> = match i % 4 {
            // Pure noise of any length.
            0 => (0..(rng.next() % 600) as usize).map(|_| rng.next() as u8).collect(),
            // A good query cut short.
            1 => good[..(rng.next() as usize % good.len())].to_vec(),
            // A good query with random bytes flipped (counts, label lengths, pointers).
            2 => {
                let mut p = good.clone();
                for _ in 0..3 {
                    let at = rng.next() as usize % p.len();
                    p[at] = rng.next() as u8;
                }
                p
            }
            // A header claiming thousands of records, then noise.
            _ => {
                let mut p = good[..12].to_vec();
                p[4..12].copy_from_slice(&[0xff; 8]);
                p.extend((0..64).map(|_| rng.next() as u8));
                p
            }
        };
        sock.send_to(&pkt, d.addr).unwrap();
        if i % 64 == 0 {
            while sock.recv_from(&mut buf).is_ok() {
                answered_garbage += 1;
            }
        }
    }
    // Everything it said back (FORMERR and the like) is a well-formed DNS message.
    assert!(answered_garbage > 0);
    // Still answering, correctly, over UDP and TCP.
    assert_eq!(d.short("ns1.example.test", "A"), ["192.0.2.1"]);
    assert!(d.dig(&["ns1.example.test", "A", "+tcp"]).contains("192.0.2.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formerr_for_bad_questions_and_oversized_names() {
    let d = common::start(CONFIG, &[]).await;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4096];
    // RFC 1035 §2.3.4: names are at most 255 octets; a longer one is a format error.
    let long = format!("{}.example.test.", vec!["a".repeat(63); 4].join("."));
    sock.send_to(&query(&long, 1), d.addr).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.response_code, hickory_proto::op::ResponseCode::FormErr);
    assert_eq!(m.metadata.id, 0x1234);
    // Two questions: FORMERR too (we answer exactly one).
    let mut two = query("ns1.example.test.", 1);
    two[5] = 2;
    sock.send_to(&two, d.addr).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.response_code, hickory_proto::op::ResponseCode::FormErr);
    // A response is never answered (no reflection loops between servers).
    let mut resp = query("ns1.example.test.", 1);
    resp[2] |= 0x80;
    sock.send_to(&resp, d.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(sock.recv_from(&mut buf).is_err(), "a response got an answer");
    // An unknown opcode: NOTIMP (RFC 1035 §4.1.1).
    let mut upd = query("example.test.", 6);
    upd[2] = 0x28; // opcode 5 (UPDATE)
    sock.send_to(&upd, d.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.response_code, hickory_proto::op::ResponseCode::NotImp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_source_is_rate_limited_with_slipped_truncated_answers() {
    let d =
        common::start(&CONFIG.replace("rrl_responses_per_sec = 0", "rrl_responses_per_sec = 50\nrrl_slip = 2"), &[])
            .await;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let q = query("ns1.example.test.", 1);
    for _ in 0..400 {
        sock.send_to(&q, d.addr).unwrap();
    }
    let mut buf = [0u8; 4096];
    let (mut full, mut truncated) = (0, 0);
    while let Ok((n, _)) = sock.recv_from(&mut buf) {
        let m = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
        if m.metadata.truncation {
            truncated += 1;
        } else {
            full += 1;
        }
    }
    // 50 answered in full within the second; of the ~350 limited, every 2nd slips out with TC.
    assert!((50..=100).contains(&full), "full {full}");
    assert!((100..=200).contains(&truncated), "truncated {truncated}");
    // A truncated answer sends real clients to TCP, which is not rate limited.
    assert!(d.dig(&["ns1.example.test", "A", "+tcp"]).contains("192.0.2.1"));
}
