//! The emulator's own signing primitives (RSA SHA256withRSA, AES-256-GCM), kept apart from the
//! connectors' so a mistake on one side is not mirrored on the other.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rsa::pkcs1v15::{Signature, SigningKey, VerifyingKey};
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use rsa::signature::{SignatureEncoding, Signer, Verifier};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::Sha256;

pub struct KeyPair {
    signing: SigningKey<Sha256>,
    pub public_pem: String,
}

impl KeyPair {
    pub fn from_pkcs8_pem(pem: &str) -> Result<KeyPair, String> {
        let key = RsaPrivateKey::from_pkcs8_pem(pem.trim())
            .map_err(|_| "channel private key: not PKCS#8 PEM RSA".to_string())?;
        let public_pem = RsaPublicKey::from(&key)
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| e.to_string())?;
        Ok(KeyPair {
            signing: SigningKey::<Sha256>::new(key),
            public_pem,
        })
    }

    pub fn sign(&self, data: &[u8]) -> String {
        let sig: Signature = self.signing.sign(data);
        STANDARD.encode(sig.to_bytes())
    }
}

/// A fresh RSA-2048 key pair as (PKCS#8 private PEM, SPKI public PEM). Slow in debug builds
/// (seconds): the tests use the committed test-only keys instead.
pub fn generate_key_pair() -> Result<(String, String), String> {
    use rsa::pkcs8::EncodePrivateKey;
    let key = RsaPrivateKey::new(&mut rand::thread_rng(), 2048).map_err(|e| e.to_string())?;
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?
        .to_string();
    let public = RsaPublicKey::from(&key)
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| e.to_string())?;
    Ok((private, public))
}

pub struct PublicKey(VerifyingKey<Sha256>);

impl PublicKey {
    pub fn from_pem(pem: &str) -> Result<PublicKey, String> {
        RsaPublicKey::from_public_key_pem(pem.trim())
            .map(|k| PublicKey(VerifyingKey::new(k)))
            .map_err(|_| "merchant public key: not SPKI PEM RSA".to_string())
    }

    pub fn verify(&self, data: &[u8], sig_b64: &str) -> bool {
        STANDARD
            .decode(sig_b64.trim())
            .ok()
            .and_then(|raw| Signature::try_from(raw.as_slice()).ok())
            .is_some_and(|sig| self.0.verify(data, &sig).is_ok())
    }
}

/// AES-256-GCM: ciphertext with the 16-byte tag appended, base64.
pub fn aes_gcm_encrypt_b64(key: &[u8], nonce: &[u8], aad: &[u8], plain: &[u8]) -> Option<String> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    let cipher = aes_gcm::Aes256Gcm::new_from_slice(key).ok()?;
    if nonce.len() != 12 {
        return None;
    }
    cipher
        .encrypt(
            aes_gcm::Nonce::from_slice(nonce),
            Payload { msg: plain, aad },
        )
        .ok()
        .map(|ct| STANDARD.encode(ct))
}

/// Beijing wall-clock strings, written here independently of the connectors.
pub fn beijing_parts(unix_ms: i64) -> (i64, u32, u32, u32, u32, u32) {
    let local_s = unix_ms.div_euclid(1000) + 8 * 3600;
    let days = local_s.div_euclid(86_400);
    let secs = local_s.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m as u32,
        d as u32,
        (secs / 3600) as u32,
        (secs / 60 % 60) as u32,
        (secs % 60) as u32,
    )
}

/// `2026-11-22 10:00:00`
pub fn spaced(unix_ms: i64) -> String {
    let (y, mo, d, h, mi, s) = beijing_parts(unix_ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// `2026-11-22T10:00:00+08:00`
pub fn rfc3339(unix_ms: i64) -> String {
    let (y, mo, d, h, mi, s) = beijing_parts(unix_ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}+08:00")
}

/// `20261122100000`
pub fn compact(unix_ms: i64) -> String {
    let (y, mo, d, h, mi, s) = beijing_parts(unix_ms);
    format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}")
}

/// `20261122100000` (Beijing) as Unix ms; `None` if it is not 14 digits of a real time.
pub fn parse_compact(s: &str) -> Option<i64> {
    if s.len() != 14 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r).and_then(|p| p.parse::<i64>().ok());
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (h, mi, sec) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + h * 3600 + mi * 60 + sec) - 8 * 3600) * 1000;
    (compact(ms) == s).then_some(ms)
}

/// `2026-11-22`
pub fn day(unix_ms: i64) -> String {
    let (y, mo, d, ..) = beijing_parts(unix_ms);
    format!("{y:04}-{mo:02}-{d:02}")
}

/// Fen as yuan: `1234` → `12.34`.
pub fn yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    let a = fen.unsigned_abs();
    format!("{sign}{}.{:02}", a / 100, a % 100)
}

/// Yuan text as fen, exactly: at most two decimals.
pub fn fen(yuan: &str) -> Option<i64> {
    let (int, frac) = yuan.split_once('.').unwrap_or((yuan, ""));
    if int.is_empty()
        || frac.len() > 2
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let int: i64 = int.parse().ok()?;
    let frac: i64 = format!("{frac:0<2}").parse().ok()?;
    int.checked_mul(100)?.checked_add(frac)
}

pub fn random_nonce() -> String {
    use rand::Rng;
    let mut r = rand::thread_rng();
    (0..32)
        .map(|_| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[r.gen_range(0..36)]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beijing_formats() {
        // 2026-11-22T00:30:00Z
        let ms = 1_795_307_400_000;
        assert_eq!(spaced(ms), "2026-11-22 08:30:00");
        assert_eq!(compact(ms), "20261122083000");
        assert_eq!(rfc3339(ms), "2026-11-22T08:30:00+08:00");
        assert_eq!(yuan(1234), "12.34");
        assert_eq!(yuan(-5), "-0.05");
        assert_eq!(fen("12.3"), Some(1230));
        assert_eq!(fen("12.345"), None);
    }
}
