//! Pieces every HTTP connector shares: RSA keys and SHA256withRSA, AES-256-GCM, the HTTP client
//! with its timeout, random nonces. Nothing here logs or returns key material.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use payrail_domain::Secret;
use rand::RngCore;
use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey};
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;
use std::time::Duration;

/// A channel account configuration that cannot be used. Never contains key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel configuration: {0}")]
pub struct ConfigError(pub String);

/// Default bound of one HTTP call to a channel, connect included.
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;

/// Largest channel response body read (bill files included).
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// A private key for SHA256withRSA (PKCS#1 v1.5). Accepts PKCS#8 or PKCS#1 PEM, or the bare
/// base64 DER Alipay's key tool prints.
pub struct RsaSigner(SigningKey<Sha256>);

impl RsaSigner {
    pub fn from_secret(what: &str, key: &Secret<String>) -> Result<RsaSigner, ConfigError> {
        let text = key.expose().trim();
        let parsed = if text.starts_with("-----BEGIN PRIVATE KEY-----") {
            RsaPrivateKey::from_pkcs8_pem(text).ok()
        } else if text.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
            RsaPrivateKey::from_pkcs1_pem(text).ok()
        } else {
            B64.decode(strip_ws(text)).ok().and_then(|der| {
                RsaPrivateKey::from_pkcs8_der(&der)
                    .or_else(|_| RsaPrivateKey::from_pkcs1_der(&der))
                    .ok()
            })
        };
        // The error names the field only: a parse error could quote the key.
        let key = parsed.ok_or_else(|| {
            ConfigError(format!(
                "{what}: not an RSA private key (PKCS#8 or PKCS#1 PEM, or base64 DER)"
            ))
        })?;
        Ok(RsaSigner(SigningKey::<Sha256>::new(key)))
    }

    /// SHA256withRSA over `data`, base64.
    pub fn sign_b64(&self, data: &[u8]) -> String {
        let sig: Signature = self.0.sign(data);
        B64.encode(sig.to_bytes())
    }
}

impl std::fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RsaSigner([REDACTED])")
    }
}

/// A channel's public key. Accepts SPKI or PKCS#1 PEM, or bare base64 DER.
#[derive(Debug, Clone)]
pub struct RsaVerifier(VerifyingKey<Sha256>);

impl RsaVerifier {
    pub fn parse(what: &str, text: &str) -> Result<RsaVerifier, ConfigError> {
        let text = text.trim();
        let parsed = if text.starts_with("-----BEGIN PUBLIC KEY-----") {
            RsaPublicKey::from_public_key_pem(text).ok()
        } else if text.starts_with("-----BEGIN RSA PUBLIC KEY-----") {
            RsaPublicKey::from_pkcs1_pem(text).ok()
        } else {
            B64.decode(strip_ws(text)).ok().and_then(|der| {
                RsaPublicKey::from_public_key_der(&der)
                    .or_else(|_| RsaPublicKey::from_pkcs1_der(&der))
                    .ok()
            })
        };
        let key = parsed.ok_or_else(|| {
            ConfigError(format!(
                "{what}: not an RSA public key (SPKI or PKCS#1 PEM, or base64 DER)"
            ))
        })?;
        Ok(RsaVerifier(VerifyingKey::<Sha256>::new(key)))
    }

    /// Checks a base64 SHA256withRSA signature over `data`.
    pub fn verify_b64(&self, data: &[u8], signature_b64: &str) -> bool {
        let Ok(raw) = B64.decode(strip_ws(signature_b64)) else {
            return false;
        };
        let Ok(sig) = Signature::try_from(raw.as_slice()) else {
            return false;
        };
        self.0.verify(data, &sig).is_ok()
    }
}

fn strip_ws(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// `len` random characters from `[0-9A-Za-z]`.
pub fn nonce(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut bytes = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}

/// The HTTP client of one connector: bounded connect and total time, no redirects followed
/// (a channel API never redirects; following one could send a signed request elsewhere).
pub fn http_client(timeout_ms: u64) -> Result<reqwest::Client, ConfigError> {
    let timeout = Duration::from_millis(timeout_ms.max(1));
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| ConfigError(format!("HTTP client: {e}")))
}

/// Reads a response body up to [`MAX_RESPONSE_BYTES`].
pub async fn read_body(resp: reqwest::Response) -> Result<Vec<u8>, String> {
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_RESPONSE_BYTES as u64)
    {
        return Err("response too large".into());
    }
    // Read by chunks up to the cap: an answer without a length (chunked) must not be buffered
    // whole before its size is known.
    let mut resp = resp;
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| transport_reason(&e))? {
        if out.len().saturating_add(chunk.len()) > MAX_RESPONSE_BYTES {
            return Err("response too large".into());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// A short reason for a transport error, without the URL's query string.
pub fn transport_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        let mut text = e.to_string();
        if let Some(url) = e.url() {
            text = text.replace(url.as_str(), "<url>");
        }
        format!("transport error: {text}")
    }
}

/// AES-256-GCM decryption (WeChat Pay v3 notification resources).
pub fn aes_256_gcm_decrypt(
    key: &[u8],
    nonce: &[u8],
    aad: &[u8],
    ciphertext_and_tag: &[u8],
) -> Option<Vec<u8>> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    if key.len() != 32 || nonce.len() != 12 {
        return None;
    }
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(key).ok()?;
    cipher
        .decrypt(
            aes_gcm::Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext_and_tag,
                aad,
            },
        )
        .ok()
}

/// Unix ms of a Beijing wall-clock date-time in any of the channels' formats.
pub fn beijing_ms(s: &str) -> Option<i64> {
    use payrail_domain::civil::{DateTime, CHINA_OFFSET_MINUTES};
    let (dt, offset) = DateTime::parse(s.trim()).ok()?;
    Some(dt.to_unix_ms(offset.unwrap_or(CHINA_OFFSET_MINUTES)))
}

/// The Beijing wall-clock time of a Unix time in ms (`None` before 1970 or after 9999).
pub fn beijing(unix_ms: i64) -> Option<payrail_domain::civil::DateTime> {
    use payrail_domain::civil::{DateTime, CHINA_OFFSET_MINUTES};
    DateTime::from_unix_ms(unix_ms, CHINA_OFFSET_MINUTES).ok()
}

/// Parses `att_…` ids that a channel echoes back, also without the underscore (UnionPay order
/// numbers allow only letters and digits).
pub fn parse_attempt(s: &str) -> Option<payrail_domain::AttemptId> {
    parse_id(s)
}

pub fn parse_refund(s: &str) -> Option<payrail_domain::RefundId> {
    parse_id(s)
}

fn parse_id<K: payrail_domain::IdKind>(s: &str) -> Option<payrail_domain::Id<K>> {
    let s = s.trim();
    if let Ok(id) = payrail_domain::Id::<K>::parse(s) {
        return Some(id);
    }
    let rest = s.strip_prefix(K::PREFIX)?;
    payrail_domain::Id::<K>::parse(&format!("{}_{rest}", K::PREFIX)).ok()
}

/// Our id as a letters-and-digits order number (UnionPay `orderId`): the `_` dropped.
pub fn compact_id<K: payrail_domain::IdKind>(id: &payrail_domain::Id<K>) -> String {
    id.to_string().replace('_', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MERCHANT_KEY: &str =
        include_str!("../../payrail-emulator/testdata/test-only-keys/merchant-private.pem");
    const MERCHANT_PUB: &str =
        include_str!("../../payrail-emulator/testdata/test-only-keys/merchant-public.pem");

    #[test]
    fn sign_and_verify_round_trip() {
        let s = RsaSigner::from_secret("k", &Secret::new(MERCHANT_KEY.to_string())).unwrap();
        let v = RsaVerifier::parse("p", MERCHANT_PUB).unwrap();
        let sig = s.sign_b64(b"hello");
        assert!(v.verify_b64(b"hello", &sig));
        assert!(!v.verify_b64(b"hellO", &sig));
        assert!(!v.verify_b64(b"hello", "bm90IGEgc2lnbmF0dXJl"));
        assert!(!v.verify_b64(b"hello", "%%%"));
    }

    /// Regression: the workspace's reqwest had no TLS, so a real `https://` channel endpoint
    /// failed before connecting ("scheme not supported"). With rustls it gets as far as the
    /// (closed) port.
    #[tokio::test]
    async fn https_endpoints_are_reachable() {
        let client = http_client(2_000).unwrap();
        let err = client.get("https://127.0.0.1:9/").send().await.unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        assert_eq!(transport_reason(&err), "connection failed");
    }

    #[test]
    fn bad_keys_are_named_not_quoted() {
        let e = RsaSigner::from_secret(
            "wechatpay.merchant_private_key",
            &Secret::new(
                "-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n-----END PRIVATE KEY-----".into(),
            ),
        )
        .unwrap_err();
        assert!(e.0.contains("wechatpay.merchant_private_key"));
        assert!(!e.0.contains("SECRETSTUFF"));
        assert!(format!(
            "{:?}",
            RsaSigner::from_secret("k", &Secret::new(MERCHANT_KEY.to_string())).unwrap()
        )
        .contains("REDACTED"));
    }
}
