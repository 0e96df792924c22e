//! What ties a request to a backend: the key of `balance = "hash"` and the sticky
//! cookie. Only called for services that use them, so other requests never parse a
//! cookie or hash a header.
//!
//! Hashes here must be the same on every proxy and every build (several proxies in
//! front of one service should agree on where a key goes, and a sticky cookie set by
//! one must be understood by another), so they are FNV-1a followed by a 64-bit
//! finalizer rather than std's `DefaultHasher`, whose algorithm may change.

use crate::config::{HashOn, StickyCookieConfig};
use http::HeaderValue;
use http::header::{self, HeaderMap};
use std::net::{IpAddr, SocketAddr};

/// FNV-1a over `bytes`, then MurmurHash3's fmix64 so nearby inputs spread over all bits.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

/// Combines two hashes into one that is uniform in both (for rendezvous scores).
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    fmix64(a ^ b.rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The IP without IPv4-mapped IPv6 disguise, so one client hashes the same on a
/// dual-stack listener as on an IPv4 one.
fn ip_bytes(ip: IpAddr, out: &mut [u8; 16]) -> &[u8] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            &out[..4]
        }
        IpAddr::V6(v6) => {
            *out = v6.octets();
            &out[..]
        }
    }
}

/// A backend's identity for hashing and for the sticky cookie.
pub(crate) fn backend_token(addr: SocketAddr) -> u64 {
    let mut buf = [0u8; 16];
    let mut bytes = ip_bytes(addr.ip(), &mut buf).to_vec();
    bytes.extend_from_slice(&addr.port().to_be_bytes());
    stable_hash(&bytes)
}

/// The value of cookie `name` from the request's `Cookie` headers (h2 may send several).
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The hash of this request's key, or None when it lacks one (then it goes round robin).
pub(crate) fn hash_key(on: &HashOn, headers: &HeaderMap, client: IpAddr) -> Option<u64> {
    match on {
        HashOn::ClientIp => {
            let mut buf = [0u8; 16];
            Some(stable_hash(ip_bytes(client, &mut buf)))
        }
        HashOn::Header(name) => headers.get(name.as_str()).map(|v| stable_hash(v.as_bytes())),
        HashOn::Cookie(name) => cookie(headers, name).map(|v| stable_hash(v.as_bytes())),
    }
}

/// The backend token a sticky cookie carries, if it is well formed.
pub(crate) fn sticky_pin(cfg: &StickyCookieConfig, headers: &HeaderMap) -> Option<u64> {
    let v = cookie(headers, &cfg.name)?;
    if v.len() != 16 {
        return None;
    }
    u64::from_str_radix(v, 16).ok()
}

/// The `Set-Cookie` that pins a client to the backend with `token`.
pub(crate) fn set_cookie(cfg: &StickyCookieConfig, token: u64, secure: bool) -> HeaderValue {
    let mut s = format!("{}={token:016x}; Path=/; HttpOnly; SameSite=Lax", cfg.name);
    if let Some(age) = cfg.max_age_secs {
        s.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        s.push_str("; Secure");
    }
    // The name was validated as a cookie token and the rest is ASCII we wrote.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_fixed_across_builds() {
        // Pinned values (FNV-1a's published vectors, then fmix64): a change here would
        // re-shuffle every hashed key and invalidate every sticky cookie in the field.
        assert_eq!(stable_hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(stable_hash(b"a"), 0x82a2_a958_a9be_ce5b);
        assert_eq!(stable_hash(b"foobar"), 0x2c22_1949_22d1_672b);
        assert_eq!(stable_hash(b"alice"), 0x3507_d047_a67c_08f4);
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(backend_token(a), backend_token(mapped), "IPv4-mapped addresses are the same backend");
    }

    #[test]
    fn cookies_are_found_among_several_headers_and_pairs() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; session=xyz"));
        h.append(header::COOKIE, HeaderValue::from_static("drover_sticky=\"00000000000000ff\""));
        assert_eq!(cookie(&h, "session"), Some("xyz"));
        assert_eq!(cookie(&h, "sess"), None);
        let cfg = StickyCookieConfig { name: "drover_sticky".into(), max_age_secs: None };
        assert_eq!(sticky_pin(&cfg, &h), Some(255));
        h.insert(header::COOKIE, HeaderValue::from_static("drover_sticky=10.0.0.1:80"));
        assert_eq!(sticky_pin(&cfg, &h), None, "only a token is accepted");
    }

    #[test]
    fn sticky_cookie_round_trips_a_backend_token_without_revealing_the_address() {
        let addr: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let cfg = StickyCookieConfig { name: "s".into(), max_age_secs: Some(60) };
        let set = set_cookie(&cfg, backend_token(addr), true);
        let set = set.to_str().unwrap();
        assert!(set.ends_with("; Path=/; HttpOnly; SameSite=Lax; Max-Age=60; Secure"), "{set}");
        assert!(!set.contains("10.1.2.3") && !set.contains("8080"), "{set}");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(set.split(';').next().unwrap()).unwrap());
        assert_eq!(sticky_pin(&cfg, &h), Some(backend_token(addr)));
    }

    #[test]
    fn hash_keys_come_from_the_configured_source_only() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("alice"));
        h.insert(header::COOKIE, HeaderValue::from_static("session=alice"));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let by_header = hash_key(&HashOn::Header("x-user".into()), &h, ip);
        assert_eq!(by_header, Some(stable_hash(b"alice")));
        assert_eq!(hash_key(&HashOn::Cookie("session".into()), &h, ip), by_header);
        assert_eq!(hash_key(&HashOn::Header("x-other".into()), &h, ip), None);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(hash_key(&HashOn::ClientIp, &h, ip), hash_key(&HashOn::ClientIp, &h, mapped));
    }
}
