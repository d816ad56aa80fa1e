//! Payout storage (出款): the `payouts` table (migration 8) and the writes that move a payout's
//! money in the ledger in the same transaction as the payout itself. [`PayoutStore`] is a
//! supertrait of [`crate::Store`]; each backend implements it in `sqlite/payouts.rs` and
//! `postgres/payouts.rs`.
//!
//! - [`PayoutStore::create_payout`] claims the request's admission, inserts the payout
//!   (`processing`), posts `po_…:payout` (D merchant available, C payout clearing), schedules
//!   its `payout_send` job and saves the request's answer — one transaction. The available balance's no-overdraft limit refuses
//!   a payout it cannot cover; then nothing but the admission is written. Concurrent payouts of
//!   one merchant are ordered by the ledger (SQLite's single writer; the balance row's lock on
//!   PostgreSQL), so together they never take more than the balance.
//! - [`PayoutStore::apply_payout_transition`] moves a `processing` payout to `paid` or `failed`
//!   if its version still matches, with its event and its job change; a failure posts
//!   `po_…:payout_reversal` (D payout clearing, C merchant available), computed from the row as
//!   updated in that transaction, so the amount given back is exactly the amount taken.

use crate::{
    Admission, AdmissionOutcome, IdempotencyCompletion, JobUpdate, NewEvent, NewJob, Result,
};
use async_trait::async_trait;
use payrail_domain::{AppId, MerchantId, PayoutId, PayoutStatus};

/// A payout as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutRecord {
    pub id: PayoutId,
    pub merchant_id: MerchantId,
    /// The app whose key signed the request; it signs the payout's webhooks.
    pub app_id: AppId,
    pub out_payout_no: String,
    pub amount_minor: i64,
    pub currency: String,
    pub description: Option<String>,
    /// The payout connector that sends it (`sandbox_bank`).
    pub bank: String,
    pub status: PayoutStatus,
    pub version: i64,
    /// The bank's transfer number, once known.
    pub bank_reference: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub notify_url: Option<String>,
    /// As for payments: a retry of the creating request after a crash finds its payout.
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub paid_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A payout to record with its ledger entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPayout {
    /// Recorded as given (`processing`); the store posts its entry from these fields.
    pub payout: PayoutRecord,
    /// Its `payout_send` job.
    pub job: NewJob,
    /// The request's admission, claimed in the same write (as for payments and refunds).
    pub admission: Option<Admission>,
    /// The request's answer (the payout as created), saved in the same write when the payout
    /// is created: no second commit for the idempotency record.
    pub idempotency: Option<IdempotencyCompletion>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatePayoutOutcome {
    /// Recorded, its amount posted to payout clearing, its job scheduled.
    Created,
    /// `(merchant, out_payout_no)` exists already (here it is); nothing was written but the
    /// admission.
    DuplicateOutPayoutNo(Box<PayoutRecord>),
    /// The merchant's available balance in the payout's currency cannot cover it, as of this
    /// write (what it can cover is given); nothing was written but the admission.
    InsufficientBalance { available_minor: i64 },
    /// The merchant is frozen (or gone) as of this write; nothing was written but the admission.
    MerchantNotActive,
    /// The admission in the same write refused the request; nothing was written.
    NotAdmitted(AdmissionOutcome),
}

/// A guarded status change of one payout: `processing` → `paid` | `failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayoutTransition {
    pub payout_id: PayoutId,
    pub payout_version: i64,
    pub status: PayoutStatus,
    pub bank_reference: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub paid_at_ms: Option<i64>,
    pub now_ms: i64,
    pub event: Option<NewEvent>,
    pub job: Option<JobUpdate>,
}

/// What a payout list returns: one merchant's, or (operator) any, optionally of one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PayoutFilter {
    pub merchant_id: Option<MerchantId>,
    pub status: Option<PayoutStatus>,
}

#[async_trait]
pub trait PayoutStore: Send + Sync + 'static {
    /// Records a payout and posts its entry, atomically, if the merchant is active and its
    /// available balance covers it as of this write; claims `new.admission` and inserts
    /// `new.job` in the same transaction.
    async fn create_payout(&self, new: &NewPayout) -> Result<CreatePayoutOutcome>;
    /// A payout, of `merchant` only when given.
    async fn get_payout(
        &self,
        merchant: Option<MerchantId>,
        id: PayoutId,
    ) -> Result<Option<PayoutRecord>>;
    async fn get_payout_by_out_payout_no(
        &self,
        merchant: MerchantId,
        out_payout_no: &str,
    ) -> Result<Option<PayoutRecord>>;
    /// Newest first, keyset-paginated by id.
    async fn list_payouts(
        &self,
        filter: PayoutFilter,
        limit: u32,
        starting_after: Option<PayoutId>,
    ) -> Result<Vec<PayoutRecord>>;
    /// Applies a payout's status change if it is still `processing` at the expected version,
    /// with its event and job change (and, for `failed`, its reversal entry) in the same
    /// transaction. `Ok(false)`: another writer got there first and nothing was written.
    async fn apply_payout_transition(&self, t: &PayoutTransition) -> Result<bool>;
}

pub(crate) const PAYOUT_COLS: &str = "id, merchant_id, app_id, out_payout_no, amount_minor, \
     currency, description, bank, status, version, bank_reference, failure_code, \
     failure_message, notify_url, idempotency_key, request_hash, paid_at_ms, created_at_ms, \
     updated_at_ms";

/// The payout's entry (`po_…:payout`), from its row.
pub(crate) fn payout_entry(p: &PayoutRecord) -> Result<payrail_domain::ledger::Entry> {
    let money = money_of(p.amount_minor, &p.currency)?;
    payrail_domain::posting_rules::payout(&p.id, p.merchant_id, money)
        .map_err(|e| crate::StoreError::Corrupt(e.to_string()))
}

/// A failed payout's reversal (`po_…:payout_reversal`), from the row the transition updated.
pub(crate) fn reversal_entry(
    id: PayoutId,
    merchant: MerchantId,
    amount_minor: i64,
    currency: &str,
) -> Result<payrail_domain::ledger::Entry> {
    let money = money_of(amount_minor, currency)?;
    payrail_domain::posting_rules::payout_reversal(&id, merchant, money)
        .map_err(|e| crate::StoreError::Corrupt(e.to_string()))
}

fn money_of(amount_minor: i64, currency: &str) -> Result<payrail_domain::Money> {
    let c = payrail_domain::Currency::parse(currency)
        .map_err(|e| crate::StoreError::Corrupt(e.to_string()))?;
    Ok(payrail_domain::Money::new(amount_minor, c))
}
