//! Merchant request signing: HMAC-SHA256 over a canonical string.
//!
//! ```text
//! Authorization: PAYRAIL-HMAC-SHA256 key_id=<key id>,timestamp=<unix s>,nonce=<nonce>,signature=<hex>
//!
//! canonical string (lines joined by "\n", no trailing newline):
//!   PAYRAIL-HMAC-SHA256
//!   <HTTP method, upper case>
//!   <path with query string, exactly as sent>
//!   <timestamp>
//!   <nonce>
//!   <lower-case hex SHA-256 of the raw body (of the empty string for no body)>
//! ```
//!
//! The HMAC key is the app secret's UTF-8 bytes. docs/signing.md has worked examples.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const SCHEME: &str = "PAYRAIL-HMAC-SHA256";
/// Requests whose timestamp is further than this from the server clock are rejected.
pub const TIMESTAMP_WINDOW_S: i64 = 300;
pub const NONCE_LEN_MIN: usize = 16;
pub const NONCE_LEN_MAX: usize = 64;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    #[error("missing Authorization header")]
    Missing,
    #[error("Authorization header must be `{SCHEME} key_id=…,timestamp=…,nonce=…,signature=…`")]
    Malformed,
    #[error("nonce must be {NONCE_LEN_MIN}-{NONCE_LEN_MAX} characters of [A-Za-z0-9_-]")]
    BadNonce,
    #[error("timestamp is outside the allowed window of ±{TIMESTAMP_WINDOW_S} s")]
    StaleTimestamp,
}

/// The parsed parts of an `Authorization` header. The signature is checked later against the
/// app's secret, in constant time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedRequest {
    pub key_id: String,
    pub timestamp: i64,
    pub nonce: String,
    pub signature: [u8; 32],
}

pub fn parse_authorization(header: &str) -> Result<SignedRequest, SigningError> {
    let rest = header
        .strip_prefix(SCHEME)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or(SigningError::Malformed)?;
    let (mut key_id, mut timestamp, mut nonce, mut signature) = (None, None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or(SigningError::Malformed)?;
        let slot = match k {
            "key_id" => &mut key_id,
            "timestamp" => &mut timestamp,
            "nonce" => &mut nonce,
            "signature" => &mut signature,
            _ => return Err(SigningError::Malformed),
        };
        if slot.replace(v).is_some() {
            return Err(SigningError::Malformed);
        }
    }
    let key_id = key_id
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .ok_or(SigningError::Malformed)?;
    let timestamp: i64 = timestamp
        .filter(|t| !t.is_empty() && t.len() <= 12 && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse().ok())
        .ok_or(SigningError::Malformed)?;
    let nonce = nonce.ok_or(SigningError::Malformed)?;
    if !valid_nonce(nonce) {
        return Err(SigningError::BadNonce);
    }
    let mut sig = [0u8; 32];
    hex::decode_to_slice(signature.ok_or(SigningError::Malformed)?, &mut sig)
        .map_err(|_| SigningError::Malformed)?;
    Ok(SignedRequest {
        key_id: key_id.to_string(),
        timestamp,
        nonce: nonce.to_string(),
        signature: sig,
    })
}

pub fn valid_nonce(nonce: &str) -> bool {
    (NONCE_LEN_MIN..=NONCE_LEN_MAX).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

pub fn check_timestamp(timestamp: i64, now_s: i64) -> Result<(), SigningError> {
    match now_s.checked_sub(timestamp) {
        Some(d) if (-TIMESTAMP_WINDOW_S..=TIMESTAMP_WINDOW_S).contains(&d) => Ok(()),
        _ => Err(SigningError::StaleTimestamp),
    }
}

pub fn body_sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

pub fn canonical_string(
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> String {
    format!(
        "{SCHEME}\n{}\n{path_and_query}\n{timestamp}\n{nonce}\n{}",
        method.to_ascii_uppercase(),
        body_sha256_hex(body)
    )
}

pub fn sign(secret: &[u8], canonical: &str) -> [u8; 32] {
    let mut mac = mac(secret);
    mac.update(canonical.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Constant-time comparison of the expected and the presented signature.
pub fn verify(secret: &[u8], canonical: &str, signature: &[u8; 32]) -> bool {
    let mut mac = mac(secret);
    mac.update(canonical.as_bytes());
    mac.verify_slice(signature).is_ok()
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of every length; the error branch cannot happen, and an empty key
    // would only fail verification.
    HmacSha256::new_from_slice(secret)
        .unwrap_or_else(|_| <HmacSha256 as Mac>::new(&Default::default()))
}

/// Builds the `Authorization` header value for a request (used by the CLI, the demo and tests).
pub fn authorization_header(
    key_id: &str,
    secret: &[u8],
    method: &str,
    path_and_query: &str,
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> String {
    let sig = sign(
        secret,
        &canonical_string(method, path_and_query, timestamp, nonce, body),
    );
    format!(
        "{SCHEME} key_id={key_id},timestamp={timestamp},nonce={nonce},signature={}",
        hex::encode(sig)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_string_is_documented_layout() {
        let c = canonical_string(
            "post",
            "/v1/payments?x=1",
            1700000000,
            "n0nce-0000000000",
            b"{}",
        );
        assert_eq!(
            c,
            "PAYRAIL-HMAC-SHA256\nPOST\n/v1/payments?x=1\n1700000000\nn0nce-0000000000\n\
             44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    /// The worked example in docs/signing.md: if this changes, the docs are wrong.
    #[test]
    fn documented_example_signature() {
        let c = canonical_string(
            "POST",
            "/v1/payments",
            1700000000,
            "2f9c1b7e8d3a4c5f",
            br#"{"amount":100,"currency":"CNY"}"#,
        );
        let sig = hex::encode(sign(b"sk_test_example", &c));
        assert_eq!(
            sig,
            "5b7106d2a473b4a55084a7a9f0c5b5a89cbeb9f24525b6377b7a41d0303e8dea"
        );
        assert!(verify(
            b"sk_test_example",
            &c,
            &sign(b"sk_test_example", &c)
        ));
    }

    #[test]
    fn round_trip_and_tamper_detection() {
        let h = authorization_header(
            "key_a",
            b"s3cret",
            "POST",
            "/v1/payments",
            1700000000,
            "abcdefghijklmnop",
            b"{\"a\":1}",
        );
        let parsed = parse_authorization(&h).unwrap();
        assert_eq!(parsed.key_id, "key_a");
        let good = canonical_string(
            "POST",
            "/v1/payments",
            parsed.timestamp,
            &parsed.nonce,
            b"{\"a\":1}",
        );
        assert!(verify(b"s3cret", &good, &parsed.signature));
        let tampered = [
            canonical_string(
                "POST",
                "/v1/payments",
                parsed.timestamp,
                &parsed.nonce,
                b"{\"a\":2}",
            ),
            canonical_string(
                "GET",
                "/v1/payments",
                parsed.timestamp,
                &parsed.nonce,
                b"{\"a\":1}",
            ),
            canonical_string(
                "POST",
                "/v1/payments?a=1",
                parsed.timestamp,
                &parsed.nonce,
                b"{\"a\":1}",
            ),
            canonical_string(
                "POST",
                "/v1/payments",
                parsed.timestamp + 1,
                &parsed.nonce,
                b"{\"a\":1}",
            ),
            canonical_string(
                "POST",
                "/v1/payments",
                parsed.timestamp,
                "abcdefghijklmnoq",
                b"{\"a\":1}",
            ),
        ];
        for t in tampered {
            assert!(!verify(b"s3cret", &t, &parsed.signature), "{t}");
        }
        assert!(!verify(b"other", &good, &parsed.signature));
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let sig = "0".repeat(64);
        let bad = [
            String::new(),
            "Bearer abc".into(),
            format!("{SCHEME} key_id=k,timestamp=1,nonce=abcdefghijklmnop"),
            format!("{SCHEME} key_id=k,timestamp=x,nonce=abcdefghijklmnop,signature={sig}"),
            format!("{SCHEME} key_id=k,timestamp=-1,nonce=abcdefghijklmnop,signature={sig}"),
            format!("{SCHEME} key_id=k,timestamp=1,nonce=abcdefghijklmnop,signature=zz"),
            format!(
                "{SCHEME} key_id=k,key_id=k,timestamp=1,nonce=abcdefghijklmnop,signature={sig}"
            ),
            format!("{SCHEME} key_id=,timestamp=1,nonce=abcdefghijklmnop,signature={sig}"),
            format!("{SCHEME} key_id=k,timestamp=1,nonce=abcdefghijklmnop,signature={sig},extra=1"),
        ];
        for h in bad {
            assert_eq!(parse_authorization(&h), Err(SigningError::Malformed), "{h}");
        }
        let short_nonce = format!("{SCHEME} key_id=k,timestamp=1,nonce=short,signature={sig}");
        assert_eq!(
            parse_authorization(&short_nonce),
            Err(SigningError::BadNonce)
        );
    }

    #[test]
    fn timestamp_window() {
        assert!(check_timestamp(1000, 1000).is_ok());
        assert!(check_timestamp(700, 1000).is_ok());
        assert!(check_timestamp(1300, 1000).is_ok());
        assert!(check_timestamp(699, 1000).is_err());
        assert!(check_timestamp(1301, 1000).is_err());
        assert!(check_timestamp(i64::MIN, 1000).is_err());
    }
}
