//! Merchant webhooks: the signature a delivery carries, the retry schedule, and which network
//! addresses a delivery may go to. Pure rules; the engine does the sending.
//!
//! ```text
//! Payrail-Signature: t=<unix seconds>,v1=<lower-case hex HMAC-SHA256(app secret, "<t>.<raw body>")>
//! ```
//!
//! The scheme mirrors Stripe's: the timestamp is signed with the body so a captured delivery
//! cannot be replayed later (receivers refuse timestamps older than [`SIGNATURE_TOLERANCE_S`]),
//! and only `v1` values count, so a later scheme can be added beside it. docs/webhooks.md shows
//! how a merchant verifies it.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

type HmacSha256 = Hmac<Sha256>;

/// How old a signature timestamp a receiver should accept (seconds), as documented to merchants.
pub const SIGNATURE_TOLERANCE_S: i64 = 300;

/// Waits after each failed automatic attempt: attempt 1 goes out at once, attempt `n + 1`
/// `RETRY_DELAYS_S[n - 1]` seconds after attempt `n` failed. 11 attempts over 85,875 s (23 h 51 m);
/// after the last one the delivery is given up and an alert is raised.
pub const RETRY_DELAYS_S: [i64; 10] = [
    15, 60, 300, 900, 1_800, 3_600, 7_200, 14_400, 28_800, 28_800,
];

/// Automatic attempts of one delivery: the first plus one per retry delay.
pub const AUTO_ATTEMPTS_MAX: i64 = 1 + RETRY_DELAYS_S.len() as i64;

/// Delay in milliseconds before the next automatic attempt, after `failed` automatic attempts
/// have failed (`failed` ≥ 1), or `None` when the schedule is exhausted and the delivery gives
/// up.
pub fn retry_delay_ms(failed: i64) -> Option<i64> {
    let index = usize::try_from(failed.checked_sub(1)?).ok()?;
    RETRY_DELAYS_S.get(index).map(|s| s.saturating_mul(1000))
}

/// The `Payrail-Signature` header value for `body` sent at `timestamp_s`.
pub fn signature_header(secret: &[u8], timestamp_s: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp_s},v1={}",
        hex::encode(signature(secret, timestamp_s, body))
    )
}

fn signature(secret: &[u8], timestamp_s: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = mac(secret);
    mac.update(timestamp_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; the fallback cannot be reached.
    HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("Payrail-Signature must be t=<unix seconds>,v1=<hex>[,v1=<hex>…]")]
    Malformed,
    #[error("the signature timestamp is outside the tolerance")]
    Stale,
    #[error("no v1 signature matches")]
    Mismatch,
}

/// What a receiver does (docs/webhooks.md has the same in Python and shell): parse `t` and every
/// `v1`, refuse a timestamp more than `tolerance_s` from `now_s`, and accept if any `v1` matches
/// the HMAC of `"<t>.<body>"`, compared in constant time. Unknown schemes are ignored.
pub fn verify_signature(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), SignatureError> {
    let mut timestamp: Option<i64> = None;
    let mut candidates: Vec<[u8; 32]> = Vec::new();
    for part in header.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match k {
            "t" => {
                let t = v
                    .parse::<i64>()
                    .ok()
                    .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or(SignatureError::Malformed)?;
                if timestamp.replace(t).is_some() {
                    return Err(SignatureError::Malformed);
                }
            }
            "v1" => {
                let mut sig = [0u8; 32];
                if hex::decode_to_slice(v, &mut sig).is_ok() {
                    candidates.push(sig);
                }
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    match now_s.checked_sub(t) {
        Some(d) if d.checked_abs().is_some_and(|a| a <= tolerance_s) => {}
        _ => return Err(SignatureError::Stale),
    }
    let matched = candidates.iter().any(|c| {
        let mut m = mac(secret);
        m.update(t.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        m.verify_slice(c).is_ok()
    });
    if matched {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Why an address is not a webhook target (SSRF guard), or `None` if it is a public unicast
/// address. Applied to every address a notify URL resolves to, unless private targets are
/// allowed for local development.
pub fn blocked_address_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = u32::MAX
        .checked_shl(32u32.saturating_sub(prefix))
        .unwrap_or(0);
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

/// IPv4 special-purpose blocks (IANA special-purpose address registry, RFC 6890 and successors).
const V4_BLOCKED: &[([u8; 4], u32, &str)] = &[
    ([0, 0, 0, 0], 8, "an unspecified (\"this network\") address"),
    ([10, 0, 0, 0], 8, "a private (RFC 1918) address"),
    (
        [100, 64, 0, 0],
        10,
        "a carrier-grade NAT (RFC 6598) address",
    ),
    ([127, 0, 0, 0], 8, "a loopback address"),
    ([169, 254, 0, 0], 16, "a link-local address"),
    ([172, 16, 0, 0], 12, "a private (RFC 1918) address"),
    ([192, 0, 0, 0], 24, "an IETF protocol assignment address"),
    ([192, 0, 2, 0], 24, "a documentation address"),
    ([192, 88, 99, 0], 24, "a 6to4 relay anycast address"),
    ([192, 168, 0, 0], 16, "a private (RFC 1918) address"),
    ([198, 18, 0, 0], 15, "a benchmarking address"),
    ([198, 51, 100, 0], 24, "a documentation address"),
    ([203, 0, 113, 0], 24, "a documentation address"),
    ([224, 0, 0, 0], 4, "a multicast address"),
    ([240, 0, 0, 0], 4, "a reserved (or broadcast) address"),
];

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    V4_BLOCKED
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, why)| *why)
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = u128::MAX
        .checked_shl(128u32.saturating_sub(prefix))
        .unwrap_or(0);
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // Addresses that carry an IPv4 address are judged by it.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return blocked_v4(v4);
    }
    let seg = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    // NAT64 well-known prefix 64:ff9b::/96.
    if in_v6(ip, Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96) {
        return blocked_v4(embedded(seg[6], seg[7]));
    }
    // 6to4 2002::/16 embeds the IPv4 address in bits 16..48.
    if seg[0] == 0x2002 {
        return blocked_v4(embedded(seg[1], seg[2]));
    }
    const V6_BLOCKED: &[(Ipv6Addr, u32, &str)] = &[
        (Ipv6Addr::UNSPECIFIED, 128, "an unspecified address"),
        (Ipv6Addr::LOCALHOST, 128, "a loopback address"),
        (
            Ipv6Addr::UNSPECIFIED,
            96,
            "an IPv4-compatible (deprecated) address",
        ),
        (
            Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0),
            64,
            "a discard-only address",
        ),
        (
            Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
            23,
            "an IETF protocol assignment address",
        ),
        (
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
            32,
            "a documentation address",
        ),
        (
            Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
            20,
            "a documentation address",
        ),
        (
            Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
            7,
            "a unique local (private) address",
        ),
        (
            Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
            10,
            "a link-local address",
        ),
        (
            Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0),
            10,
            "a site-local (deprecated) address",
        ),
        (
            Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
            8,
            "a multicast address",
        ),
    ];
    V6_BLOCKED
        .iter()
        .find(|(net, prefix, _)| in_v6(ip, *net, *prefix))
        .map(|(_, _, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_grows_over_about_a_day_then_stops() {
        let delays: Vec<i64> = (1..=10).map(|n| retry_delay_ms(n).unwrap()).collect();
        assert_eq!(delays[0], 15_000);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]), "non-decreasing");
        let total_s: i64 = RETRY_DELAYS_S.iter().sum();
        assert_eq!(total_s, 85_875);
        assert!((20 * 3600..=26 * 3600).contains(&total_s), "about a day");
        assert_eq!(retry_delay_ms(11), None, "gives up after attempt 11");
        assert_eq!(retry_delay_ms(0), None);
        assert_eq!(AUTO_ATTEMPTS_MAX, 11);
    }

    /// Pinned vector: the same bytes verified with `openssl dgst -sha256 -hmac` (docs/webhooks.md).
    #[test]
    fn signature_vector() {
        let h = signature_header(b"sk_test_example", 1700000000, br#"{"id":"evt_1"}"#);
        assert_eq!(
            h,
            "t=1700000000,v1=867593a54d1ee544cc30beb06f3c11bd58ef162bc5b4cc33424867a5d14a7976"
        );
    }

    #[test]
    fn verify_accepts_valid_and_refuses_tampering() {
        let body = br#"{"id":"evt_1","type":"payment.succeeded"}"#;
        let h = signature_header(b"sk_a", 1000, body);
        assert_eq!(verify_signature(b"sk_a", &h, body, 1000, 300), Ok(()));
        assert_eq!(verify_signature(b"sk_a", &h, body, 1300, 300), Ok(()));
        assert_eq!(
            verify_signature(b"sk_a", &h, body, 1301, 300),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify_signature(b"sk_b", &h, body, 1000, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(b"sk_a", &h, b"{}", 1000, 300),
            Err(SignatureError::Mismatch)
        );
        // Another timestamp with the same v1 value: the timestamp is signed.
        let moved = h.replace("t=1000", "t=1001");
        assert_eq!(
            verify_signature(b"sk_a", &moved, body, 1000, 300),
            Err(SignatureError::Mismatch)
        );
        // Several v1 values (secret rolling) and unknown schemes.
        let v1 = h.split("v1=").nth(1).unwrap();
        let rolled = format!("t=1000,v0=abc,v1={},v1={v1}", "0".repeat(64));
        assert_eq!(verify_signature(b"sk_a", &rolled, body, 1000, 300), Ok(()));
        for bad in [
            "",
            "v1=00",
            "t=x,v1=00",
            "t=1,t=1,v1=00",
            "t=-1,v1=00",
            "garbage",
        ] {
            assert_eq!(
                verify_signature(b"sk_a", bad, body, 1000, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn address_guard_table() {
        let blocked = [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "2001:db8::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "100::1",
        ];
        for a in blocked {
            let ip: IpAddr = a.parse().unwrap();
            assert!(blocked_address_reason(ip).is_some(), "{a} must be blocked");
        }
        let allowed = [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001:80b::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ];
        for a in allowed {
            let ip: IpAddr = a.parse().unwrap();
            assert_eq!(blocked_address_reason(ip), None, "{a} must be allowed");
        }
        assert_eq!(
            blocked_address_reason("127.0.0.1".parse().unwrap()),
            Some("a loopback address")
        );
    }
}
