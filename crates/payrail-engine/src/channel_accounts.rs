//! Channel accounts: operator-configured accounts at WeChat Pay, Alipay and UnionPay, and the
//! routing of a payment method to one of them.
//!
//! An account is stored as its public settings (JSON) plus its private keys, encrypted under
//! the master key and bound to the account id. Each process builds one connector per account
//! from the database (at start, after an operator change, and every `ACCOUNTS_REFRESH_MS` so
//! that changes made through another process arrive). A disabled account takes no new payments
//! but keeps serving its existing ones: queries, closes, cancels, refunds and notifications go
//! to the account an attempt was sent to.

use crate::{Engine, EngineError};
use payrail_channels::{
    alipay::AlipayConfig, connector_from_config, unionpay::UnionPayConfig,
    wechatpay::WechatPayConfig, ChannelConfig, Connector,
};
use payrail_domain::input::{InputError, PaymentMethod};
use payrail_domain::{ChannelAccountId, Secret};
use payrail_store::{AttemptRecord, ChannelAccountRecord, ChannelAccountStatus};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How often a worker re-reads the accounts (changes made by other processes).
pub const ACCOUNTS_REFRESH_MS: u64 = 30_000;
/// Longest account name.
const NAME_MAX_CHARS: usize = 128;
/// Bound on each HTTP call a connector makes, when the operator sets none.
const DEFAULT_CALL_TIMEOUT_MS: u64 = 10_000;

/// Public settings of a WeChat Pay account (no key material).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WechatPayPublic {
    pub base_url: String,
    pub mchid: String,
    pub appid: String,
    pub merchant_serial_no: String,
    /// The WeChat Pay public key (SPKI PEM) that signs answers and notifications.
    pub platform_public_key: String,
    pub platform_serial: String,
    pub timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WechatPaySecrets {
    merchant_private_key: String,
    api_v3_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlipayPublic {
    pub gateway_url: String,
    pub app_id: String,
    pub alipay_public_key: String,
    pub seller_id: Option<String>,
    pub return_url: Option<String>,
    pub timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlipaySecrets {
    app_private_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnionPayPublic {
    pub base_url: String,
    pub mer_id: String,
    pub cert_id: String,
    pub unionpay_public_key: String,
    pub front_url: Option<String>,
    pub timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnionPaySecrets {
    signing_key: String,
}

/// What an operator sends to create an account: the channel, its public settings and its
/// private keys (`secrets`, JSON object; stored encrypted, never shown again).
#[derive(Debug, Clone)]
pub struct NewChannelAccount {
    pub channel: String,
    pub name: String,
    pub priority: i64,
    pub config: serde_json::Value,
    pub secrets: Secret<serde_json::Value>,
}

/// One live account of this process.
#[derive(Clone)]
pub struct AccountEntry {
    pub record: ChannelAccountRecord,
    pub connector: Arc<dyn Connector>,
    /// Who the channel says notifications are for: the channel merchant id and, where the
    /// channel names one, the app id — cross-checked on every notification.
    pub channel_merchant_id: String,
    pub channel_app_id: Option<String>,
}

impl std::fmt::Debug for AccountEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountEntry")
            .field("id", &self.record.id)
            .field("channel", &self.record.channel)
            .finish_non_exhaustive()
    }
}

/// The accounts this process knows, by id.
#[derive(Default)]
pub struct Accounts {
    by_id: BTreeMap<ChannelAccountId, AccountEntry>,
}

fn invalid(param: &'static str, message: impl Into<String>) -> EngineError {
    EngineError::Input(InputError::new(param, "parameter_invalid", message))
}

/// Our notification endpoint for an account, as the channel must call it.
pub fn notify_url(public_url: &str, id: ChannelAccountId) -> String {
    format!(
        "{}/v1/channel-notify/{id}",
        public_url.trim_end_matches('/')
    )
}

/// Builds the connector configuration of an account from its public settings and secrets.
fn channel_config(
    channel: &str,
    config: &serde_json::Value,
    secrets: &serde_json::Value,
    notify_url: String,
) -> Result<(ChannelConfig, String, Option<String>), EngineError> {
    fn parse<T: for<'de> Deserialize<'de>>(
        v: &serde_json::Value,
        param: &'static str,
    ) -> Result<T, EngineError> {
        // serde's message names the field, never its value.
        T::deserialize(v).map_err(|e| invalid(param, format!("{param}: {e}")))
    }
    let timeout = |t: Option<u64>| t.unwrap_or(DEFAULT_CALL_TIMEOUT_MS).clamp(100, 60_000);
    Ok(match channel {
        "wechatpay" => {
            let p: WechatPayPublic = parse(config, "config")?;
            let s: WechatPaySecrets = parse(secrets, "secrets")?;
            let ids = (p.mchid.clone(), Some(p.appid.clone()));
            (
                ChannelConfig::WechatPay(WechatPayConfig {
                    base_url: p.base_url,
                    mchid: p.mchid,
                    appid: p.appid,
                    merchant_serial_no: p.merchant_serial_no,
                    merchant_private_key: Secret::new(s.merchant_private_key),
                    api_v3_key: Secret::new(s.api_v3_key),
                    platform_public_key: p.platform_public_key,
                    platform_serial: p.platform_serial,
                    notify_url,
                    timeout_ms: timeout(p.timeout_ms),
                }),
                ids.0,
                ids.1,
            )
        }
        "alipay" => {
            let p: AlipayPublic = parse(config, "config")?;
            let s: AlipaySecrets = parse(secrets, "secrets")?;
            let ids = (p.app_id.clone(), p.seller_id.clone());
            (
                ChannelConfig::Alipay(AlipayConfig {
                    gateway_url: p.gateway_url,
                    app_id: p.app_id,
                    app_private_key: Secret::new(s.app_private_key),
                    alipay_public_key: p.alipay_public_key,
                    seller_id: p.seller_id,
                    notify_url,
                    return_url: p.return_url,
                    timeout_ms: timeout(p.timeout_ms),
                }),
                ids.0,
                ids.1,
            )
        }
        "unionpay" => {
            let p: UnionPayPublic = parse(config, "config")?;
            let s: UnionPaySecrets = parse(secrets, "secrets")?;
            let mer_id = p.mer_id.clone();
            (
                ChannelConfig::UnionPay(UnionPayConfig {
                    base_url: p.base_url,
                    mer_id: p.mer_id,
                    cert_id: p.cert_id,
                    signing_key: Secret::new(s.signing_key),
                    unionpay_public_key: p.unionpay_public_key,
                    back_url: notify_url,
                    front_url: p.front_url,
                    timeout_ms: timeout(p.timeout_ms),
                }),
                mer_id,
                None,
            )
        }
        other => {
            return Err(EngineError::Input(InputError::new(
                "channel",
                "parameter_invalid",
                format!("unknown channel {other:?}; known: wechatpay, alipay, unionpay"),
            )))
        }
    })
}

impl Engine {
    /// Validates, encrypts and stores a new account, then makes it live in this process.
    pub async fn create_channel_account(
        &self,
        new: NewChannelAccount,
    ) -> Result<ChannelAccountRecord, EngineError> {
        let name = new.name.trim();
        if name.is_empty()
            || name.chars().count() > NAME_MAX_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(invalid(
                "name",
                format!("name must be 1-{NAME_MAX_CHARS} characters without control characters"),
            ));
        }
        if !(-1_000_000..=1_000_000).contains(&new.priority) {
            return Err(invalid(
                "priority",
                "priority must be between -1000000 and 1000000",
            ));
        }
        let id: ChannelAccountId = self.ids.next();
        // Building the connector checks the keys parse; nothing is stored otherwise.
        let (config, _, _) = channel_config(
            &new.channel,
            &new.config,
            new.secrets.expose(),
            notify_url(&self.config.public_url, id),
        )?;
        connector_from_config(config)
            .map_err(|e| invalid("secrets", format!("the account cannot be used: {e}")))?;
        let secrets = serde_json::to_vec(new.secrets.expose())
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let now = self.now_ms();
        let record = ChannelAccountRecord {
            id,
            channel: new.channel.clone(),
            name: name.to_string(),
            status: ChannelAccountStatus::Active,
            priority: new.priority,
            config: new.config.to_string(),
            secrets_ciphertext: self.master_key.encrypt(&secrets, &id.to_string()),
            version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.store.insert_channel_account(&record).await?;
        self.reload_channel_accounts().await?;
        tracing::info!(account = %id, channel = %record.channel, "channel account created");
        Ok(record)
    }

    pub async fn set_channel_account_status(
        &self,
        id: ChannelAccountId,
        status: ChannelAccountStatus,
    ) -> Result<ChannelAccountRecord, EngineError> {
        let record = self
            .store
            .set_channel_account_status(id, status, self.now_ms())
            .await?
            .ok_or(EngineError::NotFound("channel account"))?;
        self.reload_channel_accounts().await?;
        Ok(record)
    }

    /// Re-reads every account and rebuilds its connector. An account that cannot be built (a
    /// key that no longer decrypts, say) is left out and logged; the others stay live.
    pub async fn reload_channel_accounts(&self) -> Result<usize, EngineError> {
        let records = self.store.list_channel_accounts().await?;
        let mut next = Accounts::default();
        for record in records {
            match self.build_account(&record) {
                Ok(entry) => {
                    next.by_id.insert(record.id, entry);
                }
                Err(e) => {
                    tracing::error!(account = %record.id, error = %e, "channel account cannot be used; left out");
                }
            }
        }
        let n = next.by_id.len();
        match self.accounts.write() {
            Ok(mut a) => *a = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
        Ok(n)
    }

    fn build_account(&self, record: &ChannelAccountRecord) -> Result<AccountEntry, EngineError> {
        let secrets = self
            .master_key
            .decrypt(&record.secrets_ciphertext, &record.id.to_string())
            .map_err(|e| EngineError::Internal(format!("secrets do not decrypt: {e}")))?;
        let secrets: serde_json::Value = serde_json::from_slice(secrets.expose())
            .map_err(|_| EngineError::Internal("secrets are not JSON".into()))?;
        let config: serde_json::Value = serde_json::from_str(&record.config)
            .map_err(|_| EngineError::Internal("config is not JSON".into()))?;
        let (cfg, channel_merchant_id, channel_app_id) = channel_config(
            &record.channel,
            &config,
            &secrets,
            notify_url(&self.config.public_url, record.id),
        )?;
        let connector = connector_from_config(cfg)
            .map_err(|e| EngineError::Internal(format!("connector: {e}")))?;
        Ok(AccountEntry {
            record: record.clone(),
            connector,
            channel_merchant_id,
            channel_app_id,
        })
    }

    fn accounts_read(&self) -> std::sync::RwLockReadGuard<'_, Accounts> {
        match self.accounts.read() {
            Ok(a) => a,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// A live account by id (active or disabled).
    pub fn channel_account(&self, id: ChannelAccountId) -> Option<AccountEntry> {
        self.accounts_read().by_id.get(&id).cloned()
    }

    /// The channel for a new payment: the active account of highest priority (then oldest)
    /// that supports the method, else a built-in channel (the sandbox).
    pub fn route(
        &self,
        method: PaymentMethod,
    ) -> Option<(Option<ChannelAccountId>, Arc<dyn Connector>)> {
        let accounts = self.accounts_read();
        let best = accounts
            .by_id
            .values()
            .filter(|e| {
                e.record.status == ChannelAccountStatus::Active && e.connector.supports(method)
            })
            .min_by_key(|e| (std::cmp::Reverse(e.record.priority), e.record.id));
        if let Some(e) = best {
            return Some((Some(e.record.id), e.connector.clone()));
        }
        drop(accounts);
        self.channels.route(method).map(|c| (None, c.clone()))
    }

    /// The connector an attempt was sent to.
    pub fn connector_for(&self, a: &AttemptRecord) -> Result<Arc<dyn Connector>, EngineError> {
        if let Some(id) = a.channel_account_id {
            return self
                .channel_account(id)
                .map(|e| e.connector)
                .ok_or_else(|| {
                    EngineError::Internal(format!("channel account {id} is not available"))
                });
        }
        self.channels.get(&a.channel).cloned().ok_or_else(|| {
            EngineError::Internal(format!("channel {} is not configured", a.channel))
        })
    }

    /// The bulkhead an attempt's calls go through: one per account, else per channel.
    pub fn bulkhead_key(a: &AttemptRecord) -> String {
        a.channel_account_id
            .map_or_else(|| a.channel.clone(), |id| id.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_channels_are_refused_without_echoing_values() {
        let secret = "-----BEGIN PRIVATE KEY-----SECRETMATERIAL";
        let err = channel_config(
            "wechatpay",
            &serde_json::json!({"base_url": "http://x", "mchid": "1", "appid": "a", "merchant_serial_no": "s",
                "platform_public_key": "p", "platform_serial": "ps", "bogus": 1}),
            &serde_json::json!({"merchant_private_key": secret, "api_v3_key": "k"}),
            "http://n".into(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = channel_config(
            "wechatpay",
            &serde_json::json!({"base_url": "http://x", "mchid": "1", "appid": "a", "merchant_serial_no": "s",
                "platform_public_key": "p", "platform_serial": "ps"}),
            &serde_json::json!({"merchant_private_key": secret}),
            "http://n".into(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("api_v3_key"), "{err}");
        assert!(!err.to_string().contains("SECRETMATERIAL"));
        assert!(channel_config(
            "paypal",
            &serde_json::json!({}),
            &serde_json::json!({}),
            "x".into()
        )
        .is_err());
    }

    #[test]
    fn notify_urls_name_the_account() {
        let id: ChannelAccountId = "cha_01M80YAHS123PN3ATC3J1Z1BSW".parse().unwrap();
        assert_eq!(
            notify_url("https://pay.example/", id),
            "https://pay.example/v1/channel-notify/cha_01M80YAHS123PN3ATC3J1Z1BSW"
        );
    }
}
