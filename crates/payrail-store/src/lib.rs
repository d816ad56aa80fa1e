//! Storage for payrail: one [`Store`] trait, two implementations.
//!
//! - [`sqlite::SqliteStore`], the embedded default: WAL, `synchronous=FULL`, and one writer thread
//!   that commits the writes of all concurrent requests together (group commit), so a durable
//!   commit costs one fsync per batch instead of one per request.
//! - [`postgres::PgStore`] for scale-out: a connection pool; jobs are leased with
//!   `FOR UPDATE SKIP LOCKED` so workers in several processes share them.
//!
//! Both run the same conformance suite (`tests/conformance.rs`). Every write that changes a
//! status is guarded by the row's version (optimistic lock) and writes its outbox event in the
//! same transaction.

pub mod clearing;
mod common;
pub mod ledger;
pub mod payouts;
pub mod postgres;
pub mod postgres_ledger;
mod records;
mod schema;
pub mod sqlite;
pub mod sqlite_ledger;
pub mod webhooks;

pub use clearing::*;
pub use payouts::*;
pub use records::*;
pub use webhooks::*;

use async_trait::async_trait;
use payrail_domain::{AttemptId, ChannelAccountId, MerchantId, PaymentId, RefundId};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("store is shutting down")]
    Closed,
    #[error("configuration error: {0}")]
    Config(String),
    /// The ledger refused an entry a status change must post (`code` is `Reject::code`);
    /// nothing of the change was written.
    #[error("the ledger refused entry {entry}: {code}")]
    LedgerRefused { entry: String, code: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Every store also implements [`WebhookStore`] (webhook deliveries, the event feed),
/// [`ledger::LedgerStore`] (the double-entry ledger), [`ClearingStore`] (fee plans,
/// settlement, ledger reads) and [`PayoutStore`] (payouts).
#[async_trait]
pub trait Store:
    WebhookStore + ledger::LedgerStore + ClearingStore + PayoutStore + Send + Sync + 'static
{
    /// Which backend this is (`sqlite` or `postgres`), for logs and benchmarks.
    fn backend(&self) -> &'static str;

    /// Whether a write would be accepted and made durable now (readiness). SQLite: the writer
    /// runs and no disk sync has failed; PostgreSQL: a connection answers.
    async fn check_writable(&self) -> Result<()>;

    // --- settings -------------------------------------------------------------------------
    async fn get_setting(&self, name: &str) -> Result<Option<String>>;
    /// Stores `value` under `name` unless a value is there already; returns the value in force.
    async fn put_setting_if_absent(&self, name: &str, value: &str) -> Result<String>;

    // --- merchants and apps ---------------------------------------------------------------
    async fn insert_merchant(&self, m: &MerchantRecord) -> Result<()>;
    async fn get_merchant(&self, id: MerchantId) -> Result<Option<MerchantRecord>>;
    /// Newest first; `starting_after` is the last id of the previous page.
    async fn list_merchants(
        &self,
        limit: u32,
        starting_after: Option<MerchantId>,
    ) -> Result<Vec<MerchantRecord>>;
    async fn set_merchant_status(
        &self,
        id: MerchantId,
        status: MerchantStatus,
        now_ms: i64,
    ) -> Result<Option<MerchantRecord>>;
    async fn insert_app(&self, app: &AppRecord) -> Result<()>;
    async fn get_app_by_key_id(&self, key_id: &str) -> Result<Option<AppRecord>>;
    async fn list_apps(&self, merchant_id: MerchantId) -> Result<Vec<AppRecord>>;

    // --- request admission: replay nonces and idempotency keys ----------------------------
    /// Claims the nonce (if any) and the idempotency key (if any) in one transaction.
    async fn admit(&self, req: &Admission) -> Result<AdmissionOutcome>;
    /// Saves the final response of an idempotent request, if its claim (`done.token`) is still
    /// the current one. `Ok(false)`: the claim was taken over by a retry; nothing was written.
    async fn complete_idempotency(&self, done: &IdempotencyCompletion) -> Result<bool>;
    /// Forgets an in-progress key (the request failed internally and may be retried), if the
    /// claim `token` is still the current one.
    async fn release_idempotency(&self, scope: &str, key: &str, token: &str) -> Result<()>;

    // --- payments -------------------------------------------------------------------------
    /// Inserts a payment, its first attempt and its status-sync job atomically, after claiming
    /// `new.admission` in the same transaction.
    async fn create_payment(&self, new: &NewPayment) -> Result<CreatePaymentOutcome>;
    async fn get_payment(
        &self,
        merchant_id: MerchantId,
        id: PaymentId,
    ) -> Result<Option<PaymentRecord>>;
    async fn get_payment_by_out_trade_no(
        &self,
        merchant_id: MerchantId,
        out_trade_no: &str,
    ) -> Result<Option<PaymentRecord>>;
    /// Any merchant's payment, for workers and operators.
    async fn get_payment_any(&self, id: PaymentId) -> Result<Option<PaymentRecord>>;
    /// Newest first, keyset-paginated by id.
    async fn list_payments(
        &self,
        merchant_id: MerchantId,
        limit: u32,
        starting_after: Option<PaymentId>,
    ) -> Result<Vec<PaymentRecord>>;
    async fn get_attempts(&self, payment_id: PaymentId) -> Result<Vec<AttemptRecord>>;
    /// One attempt by its id (a channel notification names the attempt).
    async fn get_attempt(&self, id: AttemptId) -> Result<Option<AttemptRecord>>;
    /// Applies a status change to an attempt and its payment if both still have the expected
    /// versions; writes the event and adjusts the job in the same transaction. `Ok(false)` means
    /// another writer got there first: nothing was written; reload and decide again.
    async fn apply_transition(&self, t: &Transition) -> Result<bool>;
    /// Counts payments per status for one merchant (benchmark verification, reports).
    async fn count_payments_by_status(&self, merchant_id: MerchantId)
        -> Result<Vec<(String, i64)>>;

    // --- channel accounts -----------------------------------------------------------------
    async fn insert_channel_account(&self, a: &ChannelAccountRecord) -> Result<()>;
    async fn get_channel_account(
        &self,
        id: ChannelAccountId,
    ) -> Result<Option<ChannelAccountRecord>>;
    /// All accounts, active and disabled, by id.
    async fn list_channel_accounts(&self) -> Result<Vec<ChannelAccountRecord>>;
    async fn set_channel_account_status(
        &self,
        id: ChannelAccountId,
        status: ChannelAccountStatus,
        now_ms: i64,
    ) -> Result<Option<ChannelAccountRecord>>;

    // --- refunds ----------------------------------------------------------------------------
    /// Records a refund and reserves its amount against its payment, atomically: the payment
    /// must be the merchant's, `succeeded`, in the refund's currency, with room under its
    /// ceiling (`refund_reserved_minor + amount ≤ amount_minor`) and under `max_refunds`, as of
    /// this write — so concurrent refunds of one payment can never together exceed it. Claims
    /// `new.admission` and inserts `new.job` in the same transaction.
    async fn create_refund(&self, new: &NewRefund) -> Result<CreateRefundOutcome>;
    async fn get_refund(
        &self,
        merchant_id: MerchantId,
        id: RefundId,
    ) -> Result<Option<RefundRecord>>;
    async fn get_refund_by_out_refund_no(
        &self,
        merchant_id: MerchantId,
        out_refund_no: &str,
    ) -> Result<Option<RefundRecord>>;
    /// Any merchant's refund, for workers, notifications and operators.
    async fn get_refund_any(&self, id: RefundId) -> Result<Option<RefundRecord>>;
    /// Newest first, keyset-paginated by id; only those of `payment_id` when given.
    async fn list_refunds(
        &self,
        merchant_id: MerchantId,
        payment_id: Option<PaymentId>,
        limit: u32,
        starting_after: Option<RefundId>,
    ) -> Result<Vec<RefundRecord>>;
    /// Applies a refund's status change if it still has the expected version, moving the
    /// payment's refund totals, writing the event, adjusting the job and saving the idempotent
    /// response in the same transaction. `Ok(false)`: another writer got there first and
    /// nothing was written.
    async fn apply_refund_transition(&self, t: &RefundTransition) -> Result<bool>;

    // --- jobs -----------------------------------------------------------------------------
    /// Leases up to `limit` due jobs of `kind`: each becomes invisible to other workers for
    /// `lease_ms` (its `run_at_ms` moves forward), so a crashed worker's jobs come back.
    async fn lease_jobs(
        &self,
        kind: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<JobRecord>>;
    async fn update_job(&self, update: &JobUpdate) -> Result<()>;
    async fn count_jobs(&self, kind: &str) -> Result<i64>;
    /// Subjects of up to `limit` jobs of `kind`, soonest due first (for example the open
    /// payments, each of which has a status-sync job). Read-only: leases nothing.
    async fn list_job_subjects(&self, kind: &str, limit: u32) -> Result<Vec<String>>;

    // --- events and alerts ----------------------------------------------------------------
    async fn list_events(
        &self,
        merchant_id: MerchantId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>>;
    async fn insert_alert(&self, alert: &AlertRecord) -> Result<()>;
    /// Inserts the alert unless one of the same kind for the same subject exists; returns
    /// whether it did. (Two processes racing may both insert: an alert twice, never none.)
    async fn insert_alert_once(&self, alert: &AlertRecord) -> Result<bool>;
    async fn list_alerts(&self, limit: u32) -> Result<Vec<AlertRecord>>;

    // --- housekeeping ---------------------------------------------------------------------
    /// Deletes old nonce claims and idempotency keys (completed or abandoned in progress: a
    /// request that died and was never retried), at most `p.limit` of each; returns how many.
    async fn prune(&self, p: &Prune) -> Result<u64>;
}

pub type DynStore = Arc<dyn Store>;

/// Opens the store named by a URL: `sqlite://PATH` (or a plain path) or `postgres://…`.
/// Migrations are applied before it returns.
pub async fn open(url: &str) -> Result<DynStore> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::connect(url).await?))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        Ok(Arc::new(sqlite::SqliteStore::open(std::path::Path::new(
            path,
        ))?))
    }
}

/// Redacts credentials from a database URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}
