//! Incoming PROXY protocol (HAProxy's spec, versions 1 and 2): a load balancer in front
//! of drover prefixes each connection with the client's address.
//!
//! Parsed by hand rather than with the `ppp` crate: only the addresses are needed, and
//! the part that takes care (consuming exactly the header from the socket, never the
//! client's first bytes after it, within a time and size limit) would be ours anyway.
//!
//! The header is required on a listener with `accept_proxy_protocol`: a connection
//! without one, with a malformed one, or that sends it too slowly is closed (the spec
//! forbids guessing, since then any client could claim any address).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How long a connection may take to send its header.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Spec 2.1: a v1 line is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;
/// The largest v2 address block plus TLVs accepted (the spec allows 65535; nothing we
/// need lives in TLVs, so a sender that pads beyond this is refused).
const V2_MAX_PAYLOAD: usize = 2048;
/// Spec 2.2: the 12-byte v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The connection's real endpoints, as the sender of the header saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Carried {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HeaderError {
    #[error("reading the PROXY header: {0}")]
    Io(String),
    #[error("no complete PROXY header in time")]
    Timeout,
    #[error("connection closed inside the PROXY header")]
    Closed,
    #[error("the connection does not start with a PROXY header")]
    Missing,
    #[error("PROXY v1 line: {0}")]
    V1(&'static str),
    #[error("PROXY v2 header: {0}")]
    V2(&'static str),
}

/// Reads exactly one header off `s` and returns what it carries: `None` when it says to
/// use the socket's own addresses (v1 `UNKNOWN`, v2 `LOCAL`, `UNSPEC` or unix sockets).
pub(crate) async fn read_header(s: &mut TcpStream, limit: Duration) -> Result<Option<Carried>, HeaderError> {
    match tokio::time::timeout(limit, read_header_inner(s)).await {
        Ok(r) => r,
        Err(_) => Err(HeaderError::Timeout),
    }
}

async fn read_header_inner(s: &mut TcpStream) -> Result<Option<Carried>, HeaderError> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => HeaderError::Closed,
        _ => HeaderError::Io(e.to_string()),
    };
    let mut first = [0u8; 1];
    if s.peek(&mut first).await.map_err(io)? == 0 {
        return Err(HeaderError::Closed);
    }
    match first[0] {
        b'P' => {
            // Peek what has arrived and consume only up to the LF; everything before
            // the LF is header, so consuming a partial line is safe and the next peek
            // waits for more instead of spinning.
            let mut line = Vec::with_capacity(V1_MAX);
            let mut buf = [0u8; V1_MAX];
            loop {
                let want = V1_MAX - line.len();
                let n = s.peek(&mut buf[..want]).await.map_err(io)?;
                if n == 0 {
                    return Err(HeaderError::Closed);
                }
                let end = buf[..n].iter().position(|&b| b == b'\n').map(|i| i + 1);
                let take = end.unwrap_or(n);
                s.read_exact(&mut buf[..take]).await.map_err(io)?;
                line.extend_from_slice(&buf[..take]);
                if end.is_some() {
                    return parse_v1(&line);
                }
                if line.len() >= V1_MAX {
                    return Err(HeaderError::V1("longer than 107 bytes"));
                }
            }
        }
        b'\r' => {
            let mut head = [0u8; 16];
            s.read_exact(&mut head).await.map_err(io)?;
            let len = v2_payload_len(&head)?;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.map_err(io)?;
            parse_v2(&head, &payload)
        }
        _ => Err(HeaderError::Missing),
    }
}

/// Spec 2.1: `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n` or `PROXY UNKNOWN ...\r\n`,
/// single spaces, `line` ending in CRLF.
pub(crate) fn parse_v1(line: &[u8]) -> Result<Option<Carried>, HeaderError> {
    let bad = HeaderError::V1;
    if line.len() > V1_MAX {
        return Err(bad("longer than 107 bytes"));
    }
    let text = line.strip_suffix(b"\r\n").ok_or(bad("does not end in CRLF"))?;
    let text = std::str::from_utf8(text).map_err(|_| bad("not ASCII"))?;
    let rest = text.strip_prefix("PROXY ").ok_or(bad("does not start with `PROXY `"))?;
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        return Ok(None);
    }
    let parts: Vec<&str> = rest.split(' ').collect();
    let [proto, src, dst, sport, dport] = parts[..] else {
        return Err(bad("expected protocol, two addresses and two ports"));
    };
    let ip = |s: &str| -> Result<IpAddr, HeaderError> {
        match proto {
            "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad("bad IPv4 address")),
            "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad("bad IPv6 address")),
            _ => Err(bad("protocol is not TCP4, TCP6 or UNKNOWN")),
        }
    };
    let port = |s: &str| -> Result<u16, HeaderError> {
        // Decimal digits only, no leading zero (Rust's parser would also take `+80`).
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
            return Err(bad("bad port"));
        }
        s.parse().map_err(|_| bad("bad port"))
    };
    Ok(Some(Carried { src: SocketAddr::new(ip(src)?, port(sport)?), dst: SocketAddr::new(ip(dst)?, port(dport)?) }))
}

/// Spec 2.2: signature, version 2, and the length of what follows (bounded by us).
fn v2_payload_len(head: &[u8; 16]) -> Result<usize, HeaderError> {
    if head[..12] != V2_SIGNATURE {
        return Err(HeaderError::V2("bad signature"));
    }
    if head[12] >> 4 != 2 {
        return Err(HeaderError::V2("version is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(HeaderError::V2("longer than 2048 bytes"));
    }
    Ok(len)
}

/// Spec 2.2: command (LOCAL/PROXY), family and transport, then the address block;
/// anything after the addresses is TLVs, which are skipped.
pub(crate) fn parse_v2(head: &[u8; 16], payload: &[u8]) -> Result<Option<Carried>, HeaderError> {
    let bad = HeaderError::V2;
    if v2_payload_len(head)? != payload.len() {
        return Err(bad("length does not match"));
    }
    match head[12] & 0x0f {
        // LOCAL: the sender's own connection (a health check); use the socket's addresses.
        0x0 => return Ok(None),
        0x1 => {}
        _ => return Err(bad("unknown command")),
    }
    let (family, transport) = (head[13] >> 4, head[13] & 0x0f);
    if transport > 2 {
        return Err(bad("unknown transport"));
    }
    let port = |at: usize| u16::from_be_bytes([payload[at], payload[at + 1]]);
    match family {
        // UNSPEC, or AF_UNIX paths we cannot express: the spec says use the real addresses.
        0x0 | 0x3 => Ok(None),
        0x1 => {
            if payload.len() < 12 {
                return Err(bad("too short for IPv4 addresses"));
            }
            let ip =
                |at: usize| IpAddr::V4(Ipv4Addr::new(payload[at], payload[at + 1], payload[at + 2], payload[at + 3]));
            Ok(Some(Carried { src: SocketAddr::new(ip(0), port(8)), dst: SocketAddr::new(ip(4), port(10)) }))
        }
        0x2 => {
            if payload.len() < 36 {
                return Err(bad("too short for IPv6 addresses"));
            }
            let ip = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&payload[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Ok(Some(Carried { src: SocketAddr::new(ip(0), port(32)), dst: SocketAddr::new(ip(16), port(34)) }))
        }
        _ => Err(bad("unknown address family")),
    }
}

/// A v2 PROXY header for `c` (TCP over IPv4 or IPv6); tests and clients use it.
#[cfg(test)]
pub(crate) fn encode_v2(c: &Carried) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    let mut addrs = Vec::new();
    match (c.src.ip(), c.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(0x11);
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
        }
        (s, d) => {
            out.push(0x21);
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            addrs.extend_from_slice(&v6(s));
            addrs.extend_from_slice(&v6(d));
        }
    }
    addrs.extend_from_slice(&c.src.port().to_be_bytes());
    addrs.extend_from_slice(&c.dst.port().to_be_bytes());
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&addrs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn carried(src: &str, dst: &str) -> Option<Carried> {
        Some(Carried { src: src.parse().unwrap(), dst: dst.parse().unwrap() })
    }

    #[test]
    fn v1_section_2_1_examples_and_limits() {
        let ok = [
            ("PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", carried("192.0.2.1:56324", "198.51.100.2:443")),
            ("PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", carried("[2001:db8::1]:1", "[2001:db8::2]:65535")),
            ("PROXY UNKNOWN\r\n", None),
            ("PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
        ];
        for (line, want) in ok {
            assert_eq!(parse_v1(line.as_bytes()), Ok(want), "{line:?}");
        }
        let bad = [
            ("PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\n", "does not end in CRLF"),
            ("PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n", "expected protocol, two addresses and two ports"),
            ("PROXY TCP4  192.0.2.1 198.51.100.2 56324 443\r\n", "expected protocol, two addresses and two ports"),
            ("PROXY TCP4 2001:db8::1 198.51.100.2 56324 443\r\n", "bad IPv4 address"),
            ("PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", "bad IPv6 address"),
            ("PROXY TCP4 192.0.2.1 198.51.100.2 65536 443\r\n", "bad port"),
            ("PROXY TCP4 192.0.2.1 198.51.100.2 +80 443\r\n", "bad port"),
            ("PROXY TCP4 192.0.2.1 198.51.100.2 080 443\r\n", "bad port"),
            ("PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n", "protocol is not TCP4, TCP6 or UNKNOWN"),
            ("proxy TCP4 192.0.2.1 198.51.100.2 1 2\r\n", "does not start with `PROXY `"),
        ];
        for (line, why) in bad {
            assert_eq!(parse_v1(line.as_bytes()), Err(HeaderError::V1(why)), "{line:?}");
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert_eq!(parse_v1(long.as_bytes()), Err(HeaderError::V1("longer than 107 bytes")));
    }

    #[test]
    fn v2_section_2_2_families_commands_and_tlvs() {
        let c4 = Carried { src: "192.0.2.1:56324".parse().unwrap(), dst: "198.51.100.2:443".parse().unwrap() };
        let c6 = Carried { src: "[2001:db8::1]:1".parse().unwrap(), dst: "[2001:db8::2]:2".parse().unwrap() };
        for c in [c4, c6] {
            let raw = encode_v2(&c);
            let head: [u8; 16] = raw[..16].try_into().unwrap();
            assert_eq!(parse_v2(&head, &raw[16..]), Ok(Some(c)));
        }
        // TLVs after the addresses (here a PP2_TYPE_AUTHORITY) are skipped.
        let mut raw = encode_v2(&c4);
        raw.extend_from_slice(&[0x02, 0x00, 0x03, b'a', b'.', b'b']);
        let len = (raw.len() - 16) as u16;
        raw[14..16].copy_from_slice(&len.to_be_bytes());
        let head: [u8; 16] = raw[..16].try_into().unwrap();
        assert_eq!(parse_v2(&head, &raw[16..]), Ok(Some(c4)));
        // LOCAL (0x20), and PROXY over UNSPEC or AF_UNIX: the socket's addresses stand.
        let mut local = encode_v2(&c4);
        local[12] = 0x20;
        let head: [u8; 16] = local[..16].try_into().unwrap();
        assert_eq!(parse_v2(&head, &local[16..]), Ok(None));
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 0xd8]);
        let head: [u8; 16] = unix[..16].try_into().unwrap();
        assert_eq!(parse_v2(&head, &[0u8; 216]), Ok(None));
    }

    #[test]
    fn v2_malformed_headers_are_refused() {
        let c4 = Carried { src: "192.0.2.1:1".parse().unwrap(), dst: "198.51.100.2:2".parse().unwrap() };
        let good = encode_v2(&c4);
        let case = |f: &dyn Fn(&mut Vec<u8>), why: &'static str| {
            let mut raw = good.clone();
            f(&mut raw);
            let head: [u8; 16] = raw[..16].try_into().unwrap();
            assert_eq!(parse_v2(&head, &raw[16..]), Err(HeaderError::V2(why)), "{why}");
        };
        case(&|r| r[11] = b'X', "bad signature");
        case(&|r| r[12] = 0x11, "version is not 2");
        case(&|r| r[12] = 0x22, "unknown command");
        case(&|r| r[13] = 0x13, "unknown transport");
        case(&|r| r[13] = 0x41, "unknown address family");
        case(
            &|r| {
                r.truncate(16 + 8);
                r[14..16].copy_from_slice(&8u16.to_be_bytes());
            },
            "too short for IPv4 addresses",
        );
        case(
            &|r| {
                r[13] = 0x21;
            },
            "too short for IPv6 addresses",
        );
        let mut huge = good.clone();
        huge[14..16].copy_from_slice(&4000u16.to_be_bytes());
        let head: [u8; 16] = huge[..16].try_into().unwrap();
        assert_eq!(v2_payload_len(&head), Err(HeaderError::V2("longer than 2048 bytes")));
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn reading_consumes_exactly_the_header_even_when_it_arrives_in_pieces() {
        let (mut client, mut server) = pair().await;
        let reader = tokio::spawn(async move {
            let got = read_header(&mut server, HEADER_TIMEOUT).await;
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            (got, rest)
        });
        for piece in [&b"PROXY TCP4 192.0.2.1 "[..], b"198.51.100.2 5", b"6324 443\r", b"\nGET / HTTP/1.1\r\n"] {
            client.write_all(piece).await.unwrap();
            client.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(client);
        let (got, rest) = reader.await.unwrap();
        assert_eq!(got, Ok(carried("192.0.2.1:56324", "198.51.100.2:443")));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n", "the client's own bytes are left for the protocol");

        let (mut client, mut server) = pair().await;
        let c = Carried { src: "[2001:db8::7]:9".parse().unwrap(), dst: "127.0.0.1:80".parse().unwrap() };
        let mut raw = encode_v2(&c);
        raw.extend_from_slice(b"hello");
        client.write_all(&raw).await.unwrap();
        drop(client);
        assert_eq!(read_header(&mut server, HEADER_TIMEOUT).await.unwrap().unwrap().src, c.src);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"hello");
    }

    #[tokio::test]
    async fn a_connection_without_a_header_or_with_an_endless_line_is_refused() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(read_header(&mut server, HEADER_TIMEOUT).await, Err(HeaderError::Missing));

        let (mut client, mut server) = pair().await;
        client.write_all(format!("PROXY TCP4 {}", "1".repeat(200)).as_bytes()).await.unwrap();
        assert_eq!(read_header(&mut server, HEADER_TIMEOUT).await, Err(HeaderError::V1("longer than 107 bytes")));

        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        let limit = Duration::from_millis(50);
        assert_eq!(read_header(&mut server, limit).await, Err(HeaderError::Timeout), "a stalled sender");
        drop(client);

        let (mut client, mut server) = pair().await;
        client.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
        drop(client);
        assert_eq!(read_header(&mut server, HEADER_TIMEOUT).await, Err(HeaderError::Closed));
    }
}
