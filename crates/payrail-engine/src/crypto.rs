//! Secrets at rest: XChaCha20-Poly1305 under a 32-byte master key from the environment or the
//! data folder. The ciphertext names its key version, so the master key can be rotated later
//! without guessing; the associated data binds a ciphertext to the record it belongs to, so a
//! secret copied onto another app's row does not decrypt.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use payrail_domain::Secret;
use rand::RngCore;

const VERSION: &str = "v1";

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key must be 32 bytes, given as 64 hex characters or 43 base64url characters")]
    BadKey,
    #[error("ciphertext is malformed or was encrypted under another master key")]
    Decrypt,
}

pub struct MasterKey {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey([REDACTED])")
    }
}

impl MasterKey {
    /// Parses 64 hex characters or 43 characters of unpadded base64url.
    pub fn parse(text: &Secret<String>) -> Result<MasterKey, CryptoError> {
        let t = text.expose().trim();
        let bytes = if t.len() == 64 {
            hex::decode(t).map_err(|_| CryptoError::BadKey)?
        } else {
            B64.decode(t).map_err(|_| CryptoError::BadKey)?
        };
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadKey)?;
        Ok(MasterKey {
            cipher: XChaCha20Poly1305::new(&key.into()),
        })
    }

    /// A fresh random key, hex-encoded, for first start.
    pub fn generate_hex() -> Secret<String> {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Secret::new(hex::encode(key))
    }

    pub fn encrypt(&self, plaintext: &[u8], associated: &str) -> String {
        let mut nonce = [0u8; 24];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let payload = Payload {
            msg: plaintext,
            aad: associated.as_bytes(),
        };
        // Encryption only fails for plaintexts beyond the cipher's ~256 GiB limit.
        let ct = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), payload)
            .unwrap_or_default();
        format!("{VERSION}.{}.{}", B64.encode(nonce), B64.encode(ct))
    }

    pub fn decrypt(&self, stored: &str, associated: &str) -> Result<Secret<Vec<u8>>, CryptoError> {
        let mut parts = stored.split('.');
        let (Some(VERSION), Some(n), Some(c), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CryptoError::Decrypt);
        };
        let nonce = B64.decode(n).map_err(|_| CryptoError::Decrypt)?;
        let ct = B64.decode(c).map_err(|_| CryptoError::Decrypt)?;
        if nonce.len() != 24 {
            return Err(CryptoError::Decrypt);
        }
        let payload = Payload {
            msg: &ct,
            aad: associated.as_bytes(),
        };
        self.cipher
            .decrypt(XNonce::from_slice(&nonce), payload)
            .map(Secret::new)
            .map_err(|_| CryptoError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let k = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
        let ct = k.encrypt(b"sk_secret", "key_1");
        assert!(!ct.contains("sk_secret"));
        assert_eq!(k.decrypt(&ct, "key_1").unwrap().expose(), b"sk_secret");
        assert!(k.decrypt(&ct, "key_2").is_err(), "bound to its record");
        let other = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
        assert!(
            other.decrypt(&ct, "key_1").is_err(),
            "needs the same master key"
        );
        let mut tampered = ct.clone();
        tampered.pop();
        assert!(k.decrypt(&tampered, "key_1").is_err());
        assert!(k.decrypt("v2.a.b", "key_1").is_err());
    }

    #[test]
    fn key_formats() {
        assert!(MasterKey::parse(&Secret::new("00".repeat(32))).is_ok());
        assert!(MasterKey::parse(&Secret::new(B64.encode([7u8; 32]))).is_ok());
        assert!(MasterKey::parse(&Secret::new("00".repeat(31))).is_err());
        assert!(MasterKey::parse(&Secret::new("zz".repeat(32))).is_err());
        assert!(!format!(
            "{:?}",
            MasterKey::parse(&Secret::new("00".repeat(32))).unwrap()
        )
        .contains("00"));
    }
}
