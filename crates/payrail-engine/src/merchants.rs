//! Merchants and their apps (operator side).

use crate::{Engine, EngineError};
use payrail_domain::input::MerchantName;
use payrail_domain::{AppId, MerchantId, Secret};
use payrail_store::{AppRecord, MerchantRecord, MerchantStatus};

/// A new app's credentials. The secret is shown once and never again: only its ciphertext is
/// stored.
#[derive(Debug)]
pub struct NewAppCredentials {
    pub app: AppRecord,
    pub secret: Secret<String>,
}

/// Longest page of a list endpoint.
pub const PAGE_LIMIT_MAX: u32 = 100;

impl Engine {
    pub async fn create_merchant(&self, name: MerchantName) -> Result<MerchantRecord, EngineError> {
        let now = self.now_ms();
        let m = MerchantRecord {
            id: self.ids.next(),
            name: name.into_string(),
            status: MerchantStatus::Active,
            version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.store.insert_merchant(&m).await?;
        tracing::info!(merchant_id = %m.id, "merchant created");
        Ok(m)
    }

    pub async fn get_merchant(&self, id: MerchantId) -> Result<MerchantRecord, EngineError> {
        self.store
            .get_merchant(id)
            .await?
            .ok_or(EngineError::NotFound("merchant"))
    }

    pub async fn set_merchant_status(
        &self,
        id: MerchantId,
        status: MerchantStatus,
    ) -> Result<MerchantRecord, EngineError> {
        let m = self
            .store
            .set_merchant_status(id, status, self.now_ms())
            .await?
            .ok_or(EngineError::NotFound("merchant"))?;
        self.invalidate_merchant(id);
        tracing::info!(merchant_id = %id, status = status.as_str(), "merchant status set");
        Ok(m)
    }

    pub async fn create_app(
        &self,
        merchant_id: MerchantId,
        name: MerchantName,
    ) -> Result<NewAppCredentials, EngineError> {
        self.get_merchant(merchant_id).await?;
        let id: AppId = self.ids.next();
        let key_id = self.ids.next::<payrail_domain::id::Key>().to_string();
        let secret = Secret::new(self.ids.token("sk_"));
        let app = AppRecord {
            id,
            merchant_id,
            name: name.into_string(),
            secret_ciphertext: self.master_key.encrypt(secret.expose().as_bytes(), &key_id),
            key_id,
            created_at_ms: self.now_ms(),
        };
        self.store.insert_app(&app).await?;
        tracing::info!(merchant_id = %merchant_id, app_id = %app.id, key_id = %app.key_id, "app created");
        Ok(NewAppCredentials { app, secret })
    }
}
