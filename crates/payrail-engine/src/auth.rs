//! Authentication: signed merchant requests (HMAC-SHA256, docs/signing.md) and the operator
//! bearer token.

use crate::{Engine, EngineError};
use payrail_domain::signing::{self, SignedRequest, SigningError};
use payrail_domain::{AppId, MerchantId, Secret};
use payrail_store::{MerchantStatus, StoreError};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::RwLock;

/// Name of the setting holding the SHA-256 of the operator token.
pub const OPERATOR_TOKEN_SETTING: &str = "operator_token_sha256";

/// How long a nonce claim is kept after its signed timestamp: the ±300 s window, plus a minute
/// of slack for clock differences between processes. Older timestamps are refused before any
/// nonce is looked at, so an older claim can never matter.
pub const NONCE_RETENTION_S: i64 = signing::TIMESTAMP_WINDOW_S + 60;

/// An authenticated merchant app.
#[derive(Debug, Clone)]
pub struct AppAuth {
    pub app_id: AppId,
    pub merchant_id: MerchantId,
    pub key_id: String,
    pub merchant_active: bool,
}

#[derive(Clone)]
struct Cached {
    auth: AppAuth,
    secret: Secret<Vec<u8>>,
    loaded_at_ms: i64,
}

/// Bounded cache of decrypted app secrets; entries expire after `auth_cache_ttl_ms`, which also
/// bounds how long a freeze takes to reach other processes.
#[derive(Default)]
pub struct AuthCache {
    entries: RwLock<HashMap<String, Cached>>,
}

const AUTH_CACHE_MAX: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Signing(#[from] SigningError),
    #[error("unknown key id")]
    UnknownKey,
    #[error("signature does not match")]
    BadSignature,
    #[error("nonce was used before")]
    NonceReused,
    #[error("invalid operator token")]
    BadOperatorToken,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

impl Engine {
    /// Verifies a merchant request's signature and timestamp. Does not claim the nonce: that
    /// happens in [`payrail_store::Store::admit`], after the body has been validated, so a
    /// rejected request writes nothing.
    pub async fn verify_signature(
        &self,
        authorization: Option<&str>,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<(AppAuth, SignedRequest), AuthError> {
        let header = authorization.ok_or(SigningError::Missing)?;
        let signed = signing::parse_authorization(header)?;
        signing::check_timestamp(signed.timestamp, self.clock.now_s())?;
        let cached = self.app_for_key(&signed.key_id).await?;
        let canonical = signing::canonical_string(
            method,
            path_and_query,
            signed.timestamp,
            &signed.nonce,
            body,
        );
        if !signing::verify(cached.secret.expose(), &canonical, &signed.signature) {
            return Err(AuthError::BadSignature);
        }
        Ok((cached.auth, signed))
    }

    async fn app_for_key(&self, key_id: &str) -> Result<Cached, AuthError> {
        let now = self.now_ms();
        if let Ok(map) = self.auth_cache.entries.read() {
            if let Some(c) = map.get(key_id) {
                if now.saturating_sub(c.loaded_at_ms) < self.config.auth_cache_ttl_ms {
                    return Ok(c.clone());
                }
            }
        }
        let app = self
            .store
            .get_app_by_key_id(key_id)
            .await?
            .ok_or(AuthError::UnknownKey)?;
        let merchant = self
            .store
            .get_merchant(app.merchant_id)
            .await?
            .ok_or(AuthError::UnknownKey)?;
        let secret = self
            .master_key
            .decrypt(&app.secret_ciphertext, &app.key_id)
            .map_err(|e| AuthError::Internal(format!("app {}: {e}", app.id)))?;
        let cached = Cached {
            auth: AppAuth {
                app_id: app.id,
                merchant_id: app.merchant_id,
                key_id: app.key_id.clone(),
                merchant_active: merchant.status == MerchantStatus::Active,
            },
            secret,
            loaded_at_ms: now,
        };
        if let Ok(mut map) = self.auth_cache.entries.write() {
            if map.len() >= AUTH_CACHE_MAX {
                map.clear();
            }
            map.insert(key_id.to_string(), cached.clone());
        }
        Ok(cached)
    }

    /// Forget cached apps of a merchant (after a freeze or unfreeze).
    pub fn invalidate_merchant(&self, merchant_id: MerchantId) {
        if let Ok(mut map) = self.auth_cache.entries.write() {
            map.retain(|_, c| c.auth.merchant_id != merchant_id);
        }
    }

    /// Checks the operator's bearer token against the stored hash, in constant time.
    pub async fn verify_operator(&self, authorization: Option<&str>) -> Result<(), AuthError> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or(AuthError::BadOperatorToken)?;
        let stored = self
            .store
            .get_setting(OPERATOR_TOKEN_SETTING)
            .await?
            .ok_or(AuthError::BadOperatorToken)?;
        let presented = hex::encode(Sha256::digest(token.as_bytes()));
        if subtle_eq(presented.as_bytes(), stored.as_bytes()) {
            Ok(())
        } else {
            Err(AuthError::BadOperatorToken)
        }
    }

    /// Makes sure an operator token exists. Returns the new token if this call created it (to
    /// be shown once), `None` if one was set before. `preset` (from configuration) is used
    /// instead of a random token when given.
    pub async fn ensure_operator_token(
        &self,
        preset: Option<&Secret<String>>,
    ) -> Result<Option<Secret<String>>, EngineError> {
        let token = match preset {
            Some(t) => t.expose().clone(),
            None => self.ids.token("op_"),
        };
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        let stored = self
            .store
            .put_setting_if_absent(OPERATOR_TOKEN_SETTING, &hash)
            .await?;
        if stored == hash {
            Ok(Some(Secret::new(token)))
        } else if preset.is_some() {
            Err(EngineError::Internal(
                "PAYRAIL_OPERATOR_TOKEN differs from the token this database was set up with"
                    .into(),
            ))
        } else {
            Ok(None)
        }
    }
}

/// Name of the setting holding a value encrypted under the master key, to detect a wrong key
/// at start instead of at the first request.
pub const MASTER_KEY_CHECK_SETTING: &str = "master_key_check";
const MASTER_KEY_CHECK_PLAINTEXT: &[u8] = b"payrail master key check v1";

impl Engine {
    /// Fails if the master key is not the one this database's secrets were encrypted with.
    pub async fn check_master_key(&self) -> Result<(), EngineError> {
        let sample = self
            .master_key
            .encrypt(MASTER_KEY_CHECK_PLAINTEXT, MASTER_KEY_CHECK_SETTING);
        let stored = self
            .store
            .put_setting_if_absent(MASTER_KEY_CHECK_SETTING, &sample)
            .await?;
        match self.master_key.decrypt(&stored, MASTER_KEY_CHECK_SETTING) {
            Ok(p) if p.expose().as_slice() == MASTER_KEY_CHECK_PLAINTEXT => Ok(()),
            _ => Err(EngineError::Internal(
                "the master key does not match the one this database was set up with; \
                 set PAYRAIL_MASTER_KEY (or restore master.key in the data folder) to the original key"
                    .into(),
            )),
        }
    }
}

fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// SHA-256 over method, path and body: two requests under one idempotency key must match.
pub fn request_hash(method: &str, path_and_query: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b"\n");
    h.update(path_and_query.as_bytes());
    h.update(b"\n");
    h.update(body);
    hex::encode(h.finalize())
}
