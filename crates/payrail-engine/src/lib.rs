//! The application layer: the payment, refund and payout pipelines, merchant and app management,
//! authentication of signed requests, and the background workers. HTTP lives in `payrail-api`;
//! this crate knows nothing of it, so the same operations serve the API, the CLI and the workers.

pub mod auth;
pub mod barcode;
pub mod bulkhead;
pub mod channel_accounts;
pub mod clearing;
pub mod crypto;
pub mod feed;
pub mod ids;
pub mod merchants;
pub mod metrics;
pub mod notifications;
pub mod payments;
pub mod payouts;
pub mod refunds;
pub mod settlement;
pub mod views;
pub mod wallet;
pub mod webhooks;
pub mod worker;

use payrail_channels::Registry;
use payrail_domain::input::InputError;
use payrail_domain::Clock;
use payrail_store::{DynStore, StoreError};
use std::sync::Arc;

/// Tunables of the engine. Every wait and retry has a bound, named with its unit.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Longest wait for any one channel call; past it the outcome is unknown.
    pub channel_timeout_ms: u64,
    /// First status query of a processing attempt, after submission.
    pub sync_first_delay_ms: i64,
    /// Cap of the doubling delay between status queries.
    pub sync_max_delay_ms: i64,
    /// How long a leased sync job stays invisible to other workers.
    pub sync_lease_ms: i64,
    /// Jobs leased per poll.
    pub sync_batch: u32,
    /// Sleep of an idle worker between polls.
    pub worker_poll_ms: u64,
    /// An in-progress idempotency key older than this belongs to a request that died.
    pub idempotency_stale_ms: i64,
    /// Completed idempotency keys are kept at least this long.
    pub idempotency_retention_ms: i64,
    /// How long an authenticated app (and its merchant's status) stays cached.
    pub auth_cache_ttl_ms: i64,
    /// Calls in flight to any one channel; a hanging channel holds at most this many.
    pub channel_concurrency_max: usize,
    /// Longest wait for a free call slot of a channel before failing fast (503 `channel_busy`).
    pub channel_queue_ms: u64,
    /// An open payment this long past its expiry, still without a definite channel answer,
    /// raises a `payment_unresolved` alert (once): a person must look at it.
    pub unresolved_alert_after_ms: i64,
    /// The URL channels reach this deployment at; channel notification URLs are built on it.
    pub public_url: String,
    /// Payment-code (barcode) payments: status queries this often while the payer confirms.
    pub barcode_poll_ms: i64,
    /// Payment-code payments still unconfirmed this long after submission are cancelled
    /// (reversed/revoked) at the channel.
    pub barcode_window_ms: i64,
    /// Longest wait for one webhook delivery: connect, send, and the answer's status and first
    /// bytes. Past it the attempt failed (`timeout`) and the next one is scheduled.
    pub webhook_timeout_ms: u64,
    /// Deliver webhooks to loopback, private and other special addresses. Off in production
    /// (SSRF guard); on for local development and the tests' loopback receivers.
    pub webhook_allow_private_targets: bool,
    /// Merchant-currency groups a settlement run reads per page (it pages through all).
    pub settle_groups_page: u32,
}

impl EngineConfig {
    /// Derived bounds that other settings imply. An in-progress idempotency key may only be
    /// taken over once its request cannot still be inside a channel call: at least twice the
    /// channel timeout plus 10 s.
    pub fn normalised(mut self) -> EngineConfig {
        let call_ms = i64::try_from(self.channel_timeout_ms).unwrap_or(i64::MAX);
        let floor_ms = call_ms.saturating_mul(2).saturating_add(10_000);
        self.idempotency_stale_ms = self.idempotency_stale_ms.max(floor_ms);
        self
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            channel_timeout_ms: 10_000,
            sync_first_delay_ms: 5_000,
            sync_max_delay_ms: 300_000,
            sync_lease_ms: 30_000,
            sync_batch: 64,
            worker_poll_ms: 500,
            idempotency_stale_ms: 60_000,
            idempotency_retention_ms: 24 * 3600 * 1000,
            auth_cache_ttl_ms: 5_000,
            channel_concurrency_max: 256,
            channel_queue_ms: 200,
            unresolved_alert_after_ms: 3_600_000,
            public_url: "http://127.0.0.1:8080".into(),
            barcode_poll_ms: 5_000,
            barcode_window_ms: 30_000,
            webhook_timeout_ms: 10_000,
            webhook_allow_private_targets: false,
            settle_groups_page: settlement::SETTLE_GROUPS_PAGE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Input(InputError),
    #[error("no such {0}")]
    NotFound(&'static str),
    #[error("merchant is frozen")]
    MerchantFrozen,
    #[error("a payment with this out_trade_no exists already")]
    DuplicateOutTradeNo,
    #[error("a refund with this out_refund_no exists already")]
    DuplicateOutRefundNo,
    #[error("a payout with this out_payout_no exists already")]
    DuplicateOutPayoutNo,
    /// The merchant's available balance cannot cover the payout; nothing was written.
    #[error("the available balance is {available_minor} minor units of {currency}; the payout needs {requested_minor}")]
    InsufficientAvailableBalance {
        available_minor: i64,
        requested_minor: i64,
        currency: payrail_domain::Currency,
    },
    /// The refund request does not fit the payment or its channel's rules; nothing was done.
    #[error(transparent)]
    RefundRefused(#[from] payrail_domain::refund::RefundRefusal),
    #[error("payment is {0} and cannot be closed")]
    NotClosable(String),
    #[error("payment is {0} and cannot be cancelled")]
    NotCancellable(String),
    #[error("the channel cannot cancel {0} payments")]
    CancelNotSupported(String),
    #[error("the channel refused to cancel: {0}")]
    CancelRefused(String),
    #[error("the channel reversed the payment after it had succeeded")]
    ReversedAfterSuccess,
    #[error("no channel serves method {0}")]
    NoChannel(String),
    #[error("the channel did not confirm: {0}")]
    ChannelUnconfirmed(String),
    #[error(transparent)]
    ChannelBusy(#[from] bulkhead::ChannelBusy),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<InputError> for EngineError {
    fn from(e: InputError) -> Self {
        EngineError::Input(e)
    }
}

pub struct Engine {
    pub store: DynStore,
    pub channels: Registry,
    pub clock: Arc<dyn Clock>,
    pub ids: ids::IdGen,
    pub master_key: crypto::MasterKey,
    pub config: EngineConfig,
    pub metrics: metrics::Metrics,
    pub bulkheads: bulkhead::Bulkheads,
    /// The fee plans in force (cached); shared with the wallet connector.
    pub fees: Arc<clearing::FeeCache>,
    /// The bank payouts are sent to (the sandbox bank unless replaced before the engine is
    /// shared).
    pub payout_bank: Arc<dyn payrail_channels::payout::PayoutConnector>,
    accounts: std::sync::RwLock<channel_accounts::Accounts>,
    /// The real-time event feed (SSE) and the in-process "an event was written" signal.
    pub feed: feed::Feed,
    webhooks: webhooks::Webhooks,
    auth_cache: auth::AuthCache,
}

impl Engine {
    pub fn new(
        store: DynStore,
        mut channels: Registry,
        clock: Arc<dyn Clock>,
        master_key: crypto::MasterKey,
        config: EngineConfig,
    ) -> Engine {
        let config = config.normalised();
        let bulkheads =
            bulkhead::Bulkheads::new(config.channel_concurrency_max, config.channel_queue_ms);
        let webhooks = webhooks::Webhooks::new(&config);
        let fees = Arc::new(clearing::FeeCache::new(store.clone(), clock.clone()));
        // The wallet method is built in: it needs the ledger, not an outside channel.
        channels.register(Arc::new(wallet::WalletConnector::new(
            store.clone(),
            fees.clone(),
            clock.clone(),
        )));
        let payout_bank = Arc::new(payrail_channels::payout::SandboxBank::new(clock.clone()));
        Engine {
            fees,
            payout_bank,
            feed: feed::Feed::new(store.clone()),
            webhooks,
            store,
            channels,
            ids: ids::IdGen::new(clock.clone()),
            clock,
            master_key,
            config,
            metrics: metrics::Metrics::new(),
            bulkheads,
            accounts: std::sync::RwLock::default(),
            auth_cache: auth::AuthCache::default(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}

/// Name of the job kind that drives processing attempts to a definite answer.
pub const JOB_PAYMENT_SYNC: &str = "payment_sync";

/// Name of the job kind that drives processing refunds to a definite answer.
pub const JOB_REFUND_SYNC: &str = "refund_sync";

/// Name of the job kind that sends a payout to the bank and drives it to a definite answer.
pub const JOB_PAYOUT_SEND: &str = "payout_send";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_takeover_outlasts_a_channel_call() {
        let c = EngineConfig {
            channel_timeout_ms: 120_000,
            ..EngineConfig::default()
        }
        .normalised();
        assert_eq!(c.idempotency_stale_ms, 250_000);
        let c = EngineConfig::default().normalised();
        assert_eq!(
            c.idempotency_stale_ms, 60_000,
            "the default already exceeds 2 x 10 s + 10 s"
        );
    }
}
