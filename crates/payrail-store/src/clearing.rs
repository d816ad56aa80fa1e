//! Clearing and settlement storage: fee plans, settlement cycles, the clearing row of every
//! succeeded payment and refund, settlement batches, and the ledger reads the API needs
//! (accounts, an account's postings, the journal, the trial balance). [`ClearingStore`] is a
//! supertrait of [`crate::Store`]; each backend implements it in `sqlite/clearing.rs` and
//! `postgres/clearing.rs`.
//!
//! The writes that move money are not here but inside the status changes they belong to:
//! `apply_transition` posts a payment's entry and inserts its clearing row in the transaction of
//! the status change ([`TransitionLedger`]); `apply_refund_transition` does the same for a refund
//! (computing its split from the rows it reads in that transaction); [`ClearingStore::settle`]
//! creates a batch, marks its payments and posts its entry in one transaction.

use crate::ledger::AccountRecord;
use crate::Result;
use async_trait::async_trait;
use payrail_domain::ledger::{AccountId, Entry, PostingRef, Side};
use payrail_domain::{FeePlanId, MerchantId, PaymentId, RefundId, SettlementId};

/// Most rows one listing returns.
pub const LIST_LIMIT_MAX: u32 = 1_000;
/// Most payments one settlement batch covers. A batch is one transaction (on SQLite it holds the
/// single writer meanwhile: ~50,000 rows is well under a second), so a merchant-day above this
/// is refused with an error (and an alert) rather than stalling every payment behind it.
pub const SETTLEMENT_PAYMENTS_MAX: usize = 50_000;

/// A fee plan as stored. `None` in a key part matches anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeePlanRecord {
    pub id: FeePlanId,
    pub merchant_id: Option<MerchantId>,
    pub channel: Option<String>,
    pub method: Option<String>,
    pub currency: String,
    pub rate_bps: i64,
    pub fixed_minor: i64,
    pub min_minor: i64,
    pub max_minor: Option<i64>,
    pub channel_cost_bps: i64,
    pub channel_cost_fixed_minor: i64,
    /// `keep` or `proportional`.
    pub fee_refund: String,
    pub channel_cost_refund: String,
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A merchant's settlement cycle (`merchant_id: None`: the platform default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementCycleRecord {
    pub merchant_id: Option<MerchantId>,
    pub t_plus_days: i64,
    /// Local time of the day cut-off, `HH:MM:SS`.
    pub cutoff: String,
    pub utc_offset_minutes: i64,
    pub updated_at_ms: i64,
}

/// The clearing of one succeeded payment: its fee snapshot (fixed when it succeeded) and what
/// of it the merchant still holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentClearingRecord {
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub currency: String,
    pub channel: String,
    pub method: String,
    pub wallet_id: Option<String>,
    pub amount_minor: i64,
    pub fee_minor: i64,
    pub channel_cost_minor: i64,
    pub fee_plan_id: Option<FeePlanId>,
    pub fee_refund: String,
    pub channel_cost_refund: String,
    /// The ledger entry that recorded the success.
    pub entry_id: String,
    pub cleared_at_ms: i64,
    /// Succeeded refunds so far.
    pub refunded_minor: i64,
    /// What of the payment the merchant still holds: net − its refunds' merchant shares.
    pub residual_minor: i64,
    pub settlement_id: Option<SettlementId>,
}

/// The clearing of one succeeded refund: its split, as posted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundClearingRecord {
    pub refund_id: RefundId,
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub currency: String,
    pub amount_minor: i64,
    pub fee_refund_minor: i64,
    pub cost_refund_minor: i64,
    pub from_pending_minor: i64,
    pub from_available_minor: i64,
    pub from_suspense_minor: i64,
    pub entry_id: String,
    pub cleared_at_ms: i64,
    /// The batch that netted it (a refund from pending, of a payment settled later).
    pub settlement_id: Option<SettlementId>,
}

/// What a status change posts to the ledger, in its own transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionLedger {
    pub entry: Entry,
    /// Refusal codes (`Reject::code`) that leave the status change standing: cancelling a wallet
    /// freeze that was never made (`pending_not_found`), or was already released. Any other
    /// refusal fails the whole change with [`crate::StoreError::LedgerRefused`].
    pub tolerate: Vec<&'static str>,
    /// For a success: its clearing row, inserted in the same transaction.
    pub clearing: Option<PaymentClearingRecord>,
}

/// A merchant and currency with unsettled payments, and the oldest one's clearing time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsettledGroup {
    pub merchant_id: MerchantId,
    pub currency: String,
    pub oldest_cleared_at_ms: i64,
}

/// A settlement batch to create: the cycle's business day and its window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSettlement {
    pub id: SettlementId,
    pub merchant_id: MerchantId,
    pub currency: String,
    /// `YYYY-MM-DD`.
    pub business_day: String,
    pub t_plus_days: i64,
    pub cutoff: String,
    pub utc_offset_minutes: i64,
    pub window_start_ms: i64,
    /// Payments cleared before this and not settled yet go into the batch (late ones of earlier
    /// days included: a cross-day straggler is carried into the next batch, never lost).
    pub window_end_ms: i64,
    pub due_at_ms: i64,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRecord {
    pub id: SettlementId,
    pub merchant_id: MerchantId,
    pub currency: String,
    pub business_day: String,
    pub t_plus_days: i64,
    pub cutoff: String,
    pub utc_offset_minutes: i64,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    pub due_at_ms: i64,
    pub payment_count: i64,
    pub refund_count: i64,
    pub gross_minor: i64,
    pub fee_minor: i64,
    pub refunded_minor: i64,
    pub fee_refunded_minor: i64,
    pub net_minor: i64,
    /// The ledger entry (pending → available); `None` when the net is zero.
    pub entry_id: Option<String>,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    Created(SettlementRecord),
    /// The batch of this merchant, currency and day exists: nothing new was written.
    Exists(SettlementRecord),
    /// No unsettled payment falls before the window's end: nothing written.
    Nothing,
}

/// One payment line of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementPayment {
    pub clearing: PaymentClearingRecord,
    pub out_trade_no: String,
}

/// One refund line of a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementRefund {
    pub clearing: RefundClearingRecord,
    pub out_refund_no: String,
}

/// One posting of an account, as its history chain holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostingLine {
    pub at: PostingRef,
    pub entry_id: String,
    pub code: String,
    pub reference: Option<String>,
    pub account: AccountId,
    pub side: Side,
    pub amount_minor: i64,
    pub pending: bool,
    pub posted_at_ms: i64,
    /// The account's posted counters after this posting.
    pub debits_posted_after: Option<i64>,
    pub credits_posted_after: Option<i64>,
    /// The account's previous posting.
    pub prev: Option<PostingRef>,
}

/// A page of an account's postings, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostingPage {
    Lines(Vec<PostingLine>),
    /// The cursor names no posting of this account.
    BadCursor,
}

/// One line of the trial balance with unflushed hot-account changes included: the totals of one
/// kind of account in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialLine {
    pub kind: String,
    pub currency: String,
    pub accounts: i64,
    pub debits_posted: i128,
    pub credits_posted: i128,
    pub debits_pending: i128,
    pub credits_pending: i128,
}

#[async_trait]
pub trait ClearingStore: Send + Sync + 'static {
    /// Creates the plan of its key (merchant, channel, method, currency), or replaces the terms
    /// of the existing one (same id, version + 1). Returns the plan as stored.
    async fn put_fee_plan(&self, p: &FeePlanRecord) -> Result<FeePlanRecord>;
    async fn list_fee_plans(&self) -> Result<Vec<FeePlanRecord>>;

    /// Sets a merchant's (or the default) settlement cycle.
    async fn put_settlement_cycle(&self, c: &SettlementCycleRecord) -> Result<()>;
    async fn list_settlement_cycles(&self) -> Result<Vec<SettlementCycleRecord>>;

    async fn get_payment_clearing(&self, id: PaymentId) -> Result<Option<PaymentClearingRecord>>;
    async fn list_refund_clearings(&self, payment: PaymentId) -> Result<Vec<RefundClearingRecord>>;

    /// Merchants and currencies with unsettled payments, by (merchant, currency), after `after`
    /// (keyset pagination: a run pages through all of them), at most `limit`.
    async fn unsettled_groups(
        &self,
        after: Option<(MerchantId, String)>,
        limit: u32,
    ) -> Result<Vec<UnsettledGroup>>;

    /// Creates the batch of `(merchant, currency, business day)` unless it exists — one
    /// transaction: the batch row (unique per merchant, currency and day), the unsettled
    /// payments cleared before the window's end marked with it, their earlier refunds from
    /// pending netted, the totals checked, and the entry pending → available posted.
    async fn settle(&self, s: &NewSettlement) -> Result<SettleOutcome>;
    async fn get_settlement(
        &self,
        merchant: Option<MerchantId>,
        id: SettlementId,
    ) -> Result<Option<SettlementRecord>>;
    /// Newest first, keyset-paginated by id.
    async fn list_settlements(
        &self,
        merchant: Option<MerchantId>,
        limit: u32,
        starting_after: Option<SettlementId>,
    ) -> Result<Vec<SettlementRecord>>;
    /// The lines of a batch, oldest first.
    async fn settlement_lines(
        &self,
        id: SettlementId,
    ) -> Result<(Vec<StatementPayment>, Vec<StatementRefund>)>;

    /// Ledger accounts whose id starts with `prefix`, by id, after `starting_after`.
    async fn list_ledger_accounts(
        &self,
        prefix: &str,
        limit: u32,
        starting_after: Option<&str>,
    ) -> Result<Vec<AccountRecord>>;
    /// An account's postings, newest first: from its latest, or from the one before `before`
    /// (which must be a posting of this account). Walks the account's history chain: one key
    /// lookup per posting, no index on postings by account.
    async fn account_postings(
        &self,
        account: &AccountId,
        before: Option<PostingRef>,
        limit: u32,
    ) -> Result<PostingPage>;
    /// The journal, newest first: entries with `seq < before_seq`.
    async fn list_entries(
        &self,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<crate::ledger::EntryRecord>>;
    /// The trial balance including hot-account changes not yet flushed.
    async fn trial_balance_lines(&self) -> Result<Vec<TrialLine>>;
}

// --- shared by both backends -----------------------------------------------------------------

use crate::ledger::AccountSpec;
use crate::{AlertRecord, StoreError};
use payrail_domain::civil::Date;
use payrail_domain::clearing::{
    refund_entry, settlement_entry, settlement_totals, split_refund, Clearing, RefundFacts,
    RefundSplit, SettledPayment, SettledRefund, SettlementTotals,
};
use payrail_domain::fees::{FeeQuote, FeeRefundPolicy};
use payrail_domain::ledger::{PostOutcome, Reject};
use payrail_domain::{Currency, Money};

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

/// `''` in a key column means "any".
pub(crate) fn key_part(v: Option<&str>) -> String {
    v.unwrap_or("").to_string()
}

pub(crate) fn from_key_part(v: String) -> Option<String> {
    (!v.is_empty()).then_some(v)
}

fn policy(s: &str) -> Result<FeeRefundPolicy> {
    FeeRefundPolicy::parse(s).ok_or_else(|| corrupt(format!("fee refund policy {s}")))
}

/// The domain's view of a stored clearing row.
pub(crate) fn clearing_of(r: &PaymentClearingRecord) -> Result<Clearing> {
    let c = Currency::parse(&r.currency).map_err(corrupt)?;
    let m = |v: i64| Money::new(v, c);
    let net = r
        .amount_minor
        .checked_sub(r.fee_minor)
        .ok_or_else(|| corrupt("fee overflow"))?;
    let margin = r
        .fee_minor
        .checked_sub(r.channel_cost_minor)
        .ok_or_else(|| corrupt("cost overflow"))?;
    Ok(Clearing {
        payment: r.payment_id,
        merchant: r.merchant_id,
        channel: r.channel.clone(),
        wallet: r.wallet_id.clone(),
        quote: FeeQuote {
            amount: m(r.amount_minor),
            fee: m(r.fee_minor),
            net: m(net),
            channel_cost: m(r.channel_cost_minor),
            margin: m(margin),
        },
        fee_refund: policy(&r.fee_refund)?,
        cost_refund: policy(&r.channel_cost_refund)?,
    })
}

/// Everything a succeeded refund writes, computed from what its transaction read.
pub(crate) struct RefundPlan {
    pub split: RefundSplit,
    pub entry: Entry,
    pub record: RefundClearingRecord,
    /// When the merchant's balances could not cover its share.
    pub alert: Option<AlertRecord>,
}

/// The split with `available_minor` of the merchant's available balance. Call first with 0: if
/// the result takes nothing from available or suspense, no balance needs to be read (the common
/// case: a refund of an unsettled payment under the proportional policy).
pub(crate) fn plan_refund(
    row: &PaymentClearingRecord,
    refund_id: RefundId,
    amount_minor: i64,
    available_minor: i64,
    now_ms: i64,
) -> Result<RefundPlan> {
    let c = clearing_of(row)?;
    let cur = c.currency();
    let split = split_refund(
        &c,
        &RefundFacts {
            refunded_before: Money::new(row.refunded_minor, cur),
            refund: Money::new(amount_minor, cur),
            residual: Money::new(row.residual_minor, cur),
            settled: row.settlement_id.is_some(),
            available_minor,
        },
    )
    .map_err(corrupt)?;
    let entry = refund_entry(refund_id, &c, &split).map_err(corrupt)?;
    let alert = (!split.from_suspense.is_zero()).then(|| AlertRecord {
        kind: "merchant_shortfall".into(),
        subject_id: refund_id.to_string(),
        detail: format!(
            "refund of {} {} exceeded merchant {}'s balances by {} minor units, debited to suspense; recover it from the merchant",
            amount_minor,
            row.currency,
            row.merchant_id,
            split.from_suspense.amount_minor()
        ),
        created_at_ms: now_ms,
    });
    let record = RefundClearingRecord {
        refund_id,
        payment_id: row.payment_id,
        merchant_id: row.merchant_id,
        currency: row.currency.clone(),
        amount_minor,
        fee_refund_minor: split.quote.fee_refund.amount_minor(),
        cost_refund_minor: split.quote.cost_refund.amount_minor(),
        from_pending_minor: split.from_pending.amount_minor(),
        from_available_minor: split.from_available.amount_minor(),
        from_suspense_minor: split.from_suspense.amount_minor(),
        entry_id: entry.id().to_string(),
        cleared_at_ms: now_ms,
        settlement_id: None,
    };
    Ok(RefundPlan {
        split,
        entry,
        record,
        alert,
    })
}

impl RefundPlan {
    /// Whether the plan was made without knowing the available balance it needs.
    pub(crate) fn needs_available(&self) -> bool {
        !self.split.from_available.is_zero() || !self.split.from_suspense.is_zero()
    }
}

/// Totals and entry of a batch, from its rows.
pub(crate) fn plan_settlement(
    s: &NewSettlement,
    payments: &[PaymentClearingRecord],
    refunds: &[RefundClearingRecord],
) -> Result<(SettlementTotals, Option<Entry>)> {
    let p: Vec<SettledPayment> = payments
        .iter()
        .map(|r| SettledPayment {
            amount_minor: r.amount_minor,
            fee_minor: r.fee_minor,
            residual_minor: r.residual_minor,
        })
        .collect();
    let r: Vec<SettledRefund> = refunds
        .iter()
        .map(|r| SettledRefund {
            amount_minor: r.amount_minor,
            fee_refund_minor: r.fee_refund_minor,
            from_pending_minor: r.from_pending_minor,
        })
        .collect();
    let totals = settlement_totals(&p, &r).map_err(corrupt)?;
    let day = Date::parse(&s.business_day).map_err(corrupt)?;
    let cur = Currency::parse(&s.currency).map_err(corrupt)?;
    let entry = settlement_entry(s.merchant_id, day, cur, totals.net_minor).map_err(corrupt)?;
    Ok((totals, entry))
}

/// The accounts an entry posts to, to open when the ledger says one is missing. Accounts are
/// opened on first use with their kind's default flags.
pub(crate) fn specs_of(entry: &Entry) -> Vec<AccountSpec> {
    entry
        .postings()
        .iter()
        .map(|p| payment_path_spec(p.account.clone()))
        .collect()
}

/// How the payment path opens an account: with its kind's default flags, except a merchant's
/// pending balance, which is buffered (hot). Every payment of a merchant credits it, and on
/// PostgreSQL a locked balance row would serialise all of a merchant's payments on one lock
/// held through each commit. It needs no limit: the clearing rows keep it equal to the sum of
/// the unsettled payments' residuals, and nothing debits it by more than a residual.
pub fn payment_path_spec(id: AccountId) -> AccountSpec {
    let flags = match id.kind() {
        payrail_domain::ledger::AccountKind::MerchantPending => {
            payrail_domain::ledger::AccountFlags::BUFFERED
        }
        k => k.default_flags(),
    };
    AccountSpec { id, flags }
}

/// The one outcome of a one-entry batch.
pub(crate) fn single(out: Vec<PostOutcome>) -> Result<PostOutcome> {
    out.into_iter()
        .next()
        .ok_or_else(|| corrupt("no outcome for a posted entry"))
}

/// What a transition does with its entry's outcome: `Ok(true)` posted (or replayed),
/// `Ok(false)` refused but tolerated, `Err` refused.
pub(crate) fn judge(l: &TransitionLedger, out: &PostOutcome) -> Result<bool> {
    match out {
        PostOutcome::Posted(_) | PostOutcome::Replayed(_) => Ok(true),
        PostOutcome::Rejected(r) if l.tolerate.contains(&r.code()) => Ok(false),
        PostOutcome::Rejected(r) => Err(refused(&l.entry, r)),
    }
}

pub(crate) fn refused(entry: &Entry, r: &Reject) -> StoreError {
    StoreError::LedgerRefused {
        entry: entry.id().to_string(),
        code: r.code().to_string(),
    }
}

/// `prefix` … `prefix~`: every id starting with `prefix` (ids are ASCII below `~`).
pub(crate) fn prefix_end(prefix: &str) -> String {
    format!("{prefix}~")
}

pub(crate) const FEE_PLAN_COLS: &str = "id, merchant_id, channel, method, currency, rate_bps, \
     fixed_minor, min_minor, max_minor, channel_cost_bps, channel_cost_fixed_minor, fee_refund, \
     channel_cost_refund, version, created_at_ms, updated_at_ms";
pub(crate) const PAYMENT_CLEARING_COLS: &str = "payment_id, merchant_id, currency, channel, \
     method, wallet_id, amount_minor, fee_minor, channel_cost_minor, fee_plan_id, fee_refund, \
     channel_cost_refund, entry_id, cleared_at_ms, refunded_minor, residual_minor, settlement_id";
pub(crate) const REFUND_CLEARING_COLS: &str = "refund_id, payment_id, merchant_id, currency, \
     amount_minor, fee_refund_minor, cost_refund_minor, from_pending_minor, \
     from_available_minor, from_suspense_minor, entry_id, cleared_at_ms, settlement_id";
pub(crate) const SETTLEMENT_COLS: &str = "id, merchant_id, currency, business_day, t_plus_days, \
     cutoff, utc_offset_minutes, window_start_ms, window_end_ms, due_at_ms, payment_count, \
     refund_count, gross_minor, fee_minor, refunded_minor, fee_refunded_minor, net_minor, \
     entry_id, created_at_ms";
pub(crate) const ACCOUNT_COLS: &str = "a.id, a.flags, a.created_at_ms, b.debits_pending, \
     b.debits_posted, b.credits_pending, b.credits_posted, b.version, b.last_posted_at_ms";
pub(crate) const POSTING_LINE_SQL_TAIL: &str = "p.entry_seq, p.leg, e.id, e.code, e.reference, \
     p.account_id, p.side, p.amount_minor, p.pending, p.posted_at_ms, p.debits_posted_after, \
     p.credits_posted_after, p.prev_entry_seq, p.prev_leg \
     FROM ledger_postings p JOIN ledger_entries e ON e.seq = p.entry_seq";
pub(crate) const ENTRY_COLS: &str =
    "seq, id, code, phase, currency, reference, pending_id, timeout_ms, body_hash, posted_at_ms";
pub(crate) const TRIAL_SQL: &str = "SELECT a.kind, a.currency, COUNT(*), \
     CAST(SUM(b.debits_posted) AS BIGINT), CAST(SUM(b.credits_posted) AS BIGINT), \
     CAST(SUM(b.debits_pending) AS BIGINT), CAST(SUM(b.credits_pending) AS BIGINT) \
     FROM ledger_accounts a JOIN ledger_balances b ON b.account_no = a.account_no \
     GROUP BY a.kind, a.currency";
pub(crate) const TRIAL_BUFFERED_SQL: &str = "SELECT a.kind, a.currency, \
     CAST(SUM(x.debits_posted) AS BIGINT), CAST(SUM(x.credits_posted) AS BIGINT), \
     CAST(SUM(x.debits_pending) AS BIGINT), CAST(SUM(x.credits_pending) AS BIGINT) \
     FROM ledger_buffered x JOIN ledger_accounts a ON a.id = x.account_id \
     GROUP BY a.kind, a.currency";

/// Adds buffered sums into the trial lines.
pub(crate) fn merge_trial(
    mut lines: Vec<TrialLine>,
    buffered: Vec<(String, String, [i64; 4])>,
) -> Vec<TrialLine> {
    for (kind, currency, [dpo, cpo, dpe, cpe]) in buffered {
        if let Some(l) = lines
            .iter_mut()
            .find(|l| l.kind == kind && l.currency == currency)
        {
            l.debits_posted = l.debits_posted.saturating_add(i128::from(dpo));
            l.credits_posted = l.credits_posted.saturating_add(i128::from(cpo));
            l.debits_pending = l.debits_pending.saturating_add(i128::from(dpe));
            l.credits_pending = l.credits_pending.saturating_add(i128::from(cpe));
        }
    }
    lines.sort_by(|a, b| (&a.currency, &a.kind).cmp(&(&b.currency, &b.kind)));
    lines
}

/// `a, b` → `t.a, t.b`.
pub(crate) fn prefixed(t: &str, cols: &str) -> String {
    cols.split(',')
        .map(|c| format!("{t}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}
