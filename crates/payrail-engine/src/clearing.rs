//! Clearing (清分) on the payment path: fee plans (operator-configured, cached), the fee fixed
//! when a payment succeeds, the ledger part of a payment's status change, and the ledger reads
//! behind the balance, entries, accounts, journal and trial-balance routes.
//!
//! The fee of a payment is computed here, from the plans in force, when its success is applied;
//! its snapshot (fee, channel cost, refund policies, plan id) goes into the payment's clearing
//! row in the same transaction as the status change and the posting set, so a later change of
//! plans never alters a payment's history or how it is refunded.

use crate::{Engine, EngineError};
use payrail_domain::clearing::{Clearing, WALLET_CHANNEL};
use payrail_domain::fees::{
    FeeError, FeePlan, FeePlanKey, FeePlanSpec, FeeQuote, FeeRefundPolicy, FeeSchedule,
};
use payrail_domain::ledger::{AccountId, AccountKind, EntryId, PostingRef, Side};
use payrail_domain::{Clock, Currency, FeePlanId, MerchantId, Money, PaymentId, PaymentStatus};
use payrail_store::ledger::AccountRecord;
use payrail_store::{
    DynStore, FeePlanRecord, PaymentClearingRecord, PaymentRecord, PostingLine, PostingPage,
    TransitionLedger,
};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// How long fee plans are cached. A plan changed through this process applies at once; one
/// changed through another process applies within this time.
pub const FEE_CACHE_TTL_MS: i64 = 30_000;
/// Most fee plans. The whole set is cached in memory and scanned per succeeded payment.
pub const FEE_PLANS_MAX: usize = 10_000;

/// The fee plans in force, as loaded.
#[derive(Default)]
pub struct LoadedPlans {
    schedule: FeeSchedule,
    ids: HashMap<(FeePlanKey, Currency), FeePlanId>,
}

/// A page of [`Engine::merged_postings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedPage {
    pub lines: Vec<PostingLine>,
    pub next: Vec<Option<Option<PostingRef>>>,
    pub has_more: bool,
}

/// What a payment is charged, fixed when it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedFee {
    pub quote: FeeQuote,
    pub plan: Option<FeePlanId>,
    pub fee_refund: FeeRefundPolicy,
    pub cost_refund: FeeRefundPolicy,
}

/// The fee plans, cached for [`FEE_CACHE_TTL_MS`]; shared by the engine and the wallet
/// connector.
pub struct FeeCache {
    store: DynStore,
    clock: Arc<dyn Clock>,
    state: RwLock<Option<(i64, Arc<LoadedPlans>)>>,
}

fn plan_of(r: &FeePlanRecord) -> Result<(FeePlanKey, FeePlan), EngineError> {
    let bad = |e: String| EngineError::Internal(format!("stored fee plan {}: {e}", r.id));
    let policy = |s: &str| FeeRefundPolicy::parse(s).ok_or_else(|| bad(format!("policy {s}")));
    let key = FeePlanKey::new(r.merchant_id, r.channel.as_deref(), r.method.as_deref())
        .map_err(|e| bad(e.to_string()))?;
    let plan = FeePlan::new(FeePlanSpec {
        currency: Currency::parse(&r.currency).map_err(|e| bad(e.to_string()))?,
        rate_bps: u32::try_from(r.rate_bps).map_err(|e| bad(e.to_string()))?,
        fixed_minor: r.fixed_minor,
        min_minor: r.min_minor,
        max_minor: r.max_minor,
        channel_cost_bps: u32::try_from(r.channel_cost_bps).map_err(|e| bad(e.to_string()))?,
        channel_cost_fixed_minor: r.channel_cost_fixed_minor,
        fee_refund: policy(&r.fee_refund)?,
        channel_cost_refund: policy(&r.channel_cost_refund)?,
    })
    .map_err(|e| bad(e.to_string()))?;
    Ok((key, plan))
}

impl FeeCache {
    pub fn new(store: DynStore, clock: Arc<dyn Clock>) -> FeeCache {
        FeeCache {
            store,
            clock,
            state: RwLock::new(None),
        }
    }

    /// Reads every plan from the store.
    pub async fn reload(&self) -> Result<Arc<LoadedPlans>, EngineError> {
        let rows = self.store.list_fee_plans().await?;
        let mut loaded = LoadedPlans::default();
        for r in rows.iter().take(FEE_PLANS_MAX) {
            let (key, plan) = plan_of(r)?;
            loaded.ids.insert((key.clone(), plan.currency()), r.id);
            loaded.schedule.set(key, plan);
        }
        let loaded = Arc::new(loaded);
        if let Ok(mut s) = self.state.write() {
            *s = Some((self.clock.now_ms(), loaded.clone()));
        }
        Ok(loaded)
    }

    /// The plans, reloaded when older than [`FEE_CACHE_TTL_MS`].
    pub async fn current(&self) -> Result<Arc<LoadedPlans>, EngineError> {
        let now = self.clock.now_ms();
        let cached = self.state.read().ok().and_then(|s| s.clone());
        match cached {
            Some((at, plans)) if now.saturating_sub(at) < FEE_CACHE_TTL_MS && now >= at => {
                Ok(plans)
            }
            _ => self.reload().await,
        }
    }

    /// The fee of a payment of `amount` by `merchant` on `channel` with `method`: the most
    /// specific plan in the amount's currency (merchant + channel + method, …, the platform
    /// default); no plan at all charges nothing. A wallet has no channel cost.
    pub async fn fee_for(
        &self,
        merchant: MerchantId,
        channel: &str,
        method: &str,
        amount: Money,
    ) -> Result<FixedFee, EngineError> {
        let plans = self.current().await?;
        let err = |e: FeeError| EngineError::Internal(format!("fee: {e}"));
        let Some((key, plan)) =
            plans
                .schedule
                .select_key(merchant, channel, method, amount.currency())
        else {
            let zero = Money::zero(amount.currency());
            return Ok(FixedFee {
                quote: FeeQuote {
                    amount,
                    fee: zero,
                    net: amount,
                    channel_cost: zero,
                    margin: zero,
                },
                plan: None,
                fee_refund: FeeRefundPolicy::Proportional,
                cost_refund: FeeRefundPolicy::Proportional,
            });
        };
        let mut quote = plan.quote(amount).map_err(err)?;
        if channel == WALLET_CHANNEL {
            quote.channel_cost = Money::zero(amount.currency());
            quote.margin = quote.fee;
        }
        Ok(FixedFee {
            quote,
            plan: plans.ids.get(&(key.clone(), amount.currency())).copied(),
            fee_refund: plan.spec().fee_refund,
            cost_refund: plan.spec().channel_cost_refund,
        })
    }
}

/// An operator's fee plan, validated.
#[derive(Debug, Clone)]
pub struct FeePlanInput {
    pub key: FeePlanKey,
    pub plan: FeePlan,
}

fn currency_of(code: &str) -> Result<Currency, EngineError> {
    Currency::parse(code).map_err(|e| EngineError::Internal(e.to_string()))
}

/// The row every succeeded payment gets.
fn clearing_record(
    p: &PaymentRecord,
    wallet: Option<String>,
    fixed: &FixedFee,
    entry_id: &EntryId,
    now_ms: i64,
) -> PaymentClearingRecord {
    PaymentClearingRecord {
        payment_id: p.id,
        merchant_id: p.merchant_id,
        currency: p.currency.clone(),
        channel: p.channel.clone(),
        method: p.method.clone(),
        wallet_id: wallet,
        amount_minor: p.amount_minor,
        fee_minor: fixed.quote.fee.amount_minor(),
        channel_cost_minor: fixed.quote.channel_cost.amount_minor(),
        fee_plan_id: fixed.plan,
        fee_refund: fixed.fee_refund.as_str().into(),
        channel_cost_refund: fixed.cost_refund.as_str().into(),
        entry_id: entry_id.to_string(),
        cleared_at_ms: now_ms,
        refunded_minor: 0,
        residual_minor: fixed.quote.net.amount_minor(),
        settlement_id: None,
    }
}

/// Releases of a wallet freeze that leave a failing payment's change standing: there was no
/// freeze (the Try never happened, 空回滚), or it is already gone.
const CANCEL_TOLERATES: &[&str] = &[
    "pending_not_found",
    "pending_already_voided",
    "pending_expired",
];

impl Engine {
    /// The ledger part of a payment's change to `next`: on success its posting set and clearing
    /// row; when a wallet payment ends otherwise, the release of its freeze.
    pub async fn transition_ledger(
        &self,
        p: &PaymentRecord,
        next: PaymentStatus,
        now_ms: i64,
    ) -> Result<Option<TransitionLedger>, EngineError> {
        let wallet = p.channel == WALLET_CHANNEL;
        if next == PaymentStatus::Succeeded {
            let (fixed, holder) = if wallet {
                self.wallet_freeze_terms(p).await?
            } else {
                let amount = Money::new(p.amount_minor, currency_of(&p.currency)?);
                let fixed = self
                    .fees
                    .fee_for(p.merchant_id, &p.channel, &p.method, amount)
                    .await?;
                (fixed, None)
            };
            let clearing = Clearing {
                payment: p.id,
                merchant: p.merchant_id,
                channel: p.channel.clone(),
                wallet: holder.clone(),
                quote: fixed.quote,
                fee_refund: fixed.fee_refund,
                cost_refund: fixed.cost_refund,
            };
            let entry = clearing
                .success_entry()
                .map_err(|e| EngineError::Internal(format!("posting rule: {e}")))?;
            let record = clearing_record(p, holder, &fixed, entry.id(), now_ms);
            return Ok(Some(TransitionLedger {
                entry,
                tolerate: Vec::new(),
                clearing: Some(record),
            }));
        }
        if wallet && next.is_terminal() {
            let entry = payrail_domain::posting_rules::wallet_cancel(p.id)
                .map_err(|e| EngineError::Internal(format!("posting rule: {e}")))?;
            return Ok(Some(TransitionLedger {
                entry,
                tolerate: CANCEL_TOLERATES.to_vec(),
                clearing: None,
            }));
        }
        Ok(None)
    }

    /// A wallet payment's fee as its freeze fixed it (the amounts frozen for the merchant and
    /// the platform), the refund policies of the plan in force, and the wallet.
    async fn wallet_freeze_terms(
        &self,
        p: &PaymentRecord,
    ) -> Result<(FixedFee, Option<String>), EngineError> {
        let id = crate::wallet::freeze_id(p.id)?;
        let entry = self.store.get_entry(&id).await?.ok_or_else(|| {
            EngineError::Internal(format!("wallet payment {} has no freeze", p.id))
        })?;
        let cur = currency_of(&p.currency)?;
        let (mut fee, mut net, mut holder) = (0i64, 0i64, None);
        for posting in &entry.postings {
            match (posting.account.kind(), posting.side) {
                (AccountKind::PlatformFee, Side::Credit) => fee = posting.amount_minor,
                (AccountKind::MerchantPending, Side::Credit) => net = posting.amount_minor,
                (AccountKind::Wallet, Side::Debit) => {
                    holder = posting.account.wallet_holder().map(str::to_string)
                }
                _ => {}
            }
        }
        if fee.checked_add(net) != Some(p.amount_minor) || holder.is_none() {
            return Err(EngineError::Internal(format!(
                "freeze of wallet payment {} does not match the payment",
                p.id
            )));
        }
        let current = self
            .fees
            .fee_for(
                p.merchant_id,
                WALLET_CHANNEL,
                &p.method,
                Money::new(p.amount_minor, cur),
            )
            .await?;
        let zero = Money::zero(cur);
        Ok((
            FixedFee {
                quote: FeeQuote {
                    amount: Money::new(p.amount_minor, cur),
                    fee: Money::new(fee, cur),
                    net: Money::new(net, cur),
                    channel_cost: zero,
                    margin: Money::new(fee, cur),
                },
                plan: current.plan,
                fee_refund: current.fee_refund,
                cost_refund: current.cost_refund,
            },
            holder,
        ))
    }

    // --- fee plans ------------------------------------------------------------------------

    pub async fn put_fee_plan(&self, input: FeePlanInput) -> Result<FeePlanRecord, EngineError> {
        let now = self.now_ms();
        let s = input.plan.spec();
        let existing = self.store.list_fee_plans().await?;
        if existing.len() >= FEE_PLANS_MAX {
            return Err(EngineError::Internal(format!(
                "at most {FEE_PLANS_MAX} fee plans"
            )));
        }
        let record = FeePlanRecord {
            id: self.ids.next(),
            merchant_id: input.key.merchant,
            channel: input.key.channel.clone(),
            method: input.key.method.clone(),
            currency: s.currency.code().to_string(),
            rate_bps: i64::from(s.rate_bps),
            fixed_minor: s.fixed_minor,
            min_minor: s.min_minor,
            max_minor: s.max_minor,
            channel_cost_bps: i64::from(s.channel_cost_bps),
            channel_cost_fixed_minor: s.channel_cost_fixed_minor,
            fee_refund: s.fee_refund.as_str().into(),
            channel_cost_refund: s.channel_cost_refund.as_str().into(),
            version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let stored = self.store.put_fee_plan(&record).await?;
        self.fees.reload().await?;
        Ok(stored)
    }

    pub async fn list_fee_plans(&self) -> Result<Vec<FeePlanRecord>, EngineError> {
        Ok(self.store.list_fee_plans().await?)
    }

    /// Reloads the cached fee plans (the refresher does this periodically).
    pub async fn reload_fee_plans(&self) -> Result<(), EngineError> {
        self.fees.reload().await.map(|_| ())
    }

    // --- balances and postings --------------------------------------------------------------

    /// A merchant's accounts of one kind, by currency.
    pub async fn merchant_accounts(
        &self,
        merchant: MerchantId,
        kind: AccountKind,
    ) -> Result<Vec<AccountRecord>, EngineError> {
        let prefix = format!("{kind}:{merchant}:");
        Ok(self
            .store
            .list_ledger_accounts(&prefix, payrail_store::LIST_LIMIT_MAX, None)
            .await?)
    }

    /// A page of postings of several accounts merged newest first (a merchant's pending and
    /// available accounts of one currency). `cursors[i]` is where account `i` resumes: `None`
    /// from its latest posting, `Some(Some(at))` after posting `at`, `Some(None)` nothing left.
    /// Returns the page, the cursors of the next page and whether there is one.
    /// `Err(NotFound("cursor"))` when a cursor names a posting of another account.
    pub async fn merged_postings(
        &self,
        accounts: &[AccountId],
        cursors: &[Option<Option<PostingRef>>],
        limit: u32,
    ) -> Result<MergedPage, EngineError> {
        let limit = limit.clamp(1, crate::merchants::PAGE_LIMIT_MAX);
        let mut chains: Vec<std::collections::VecDeque<PostingLine>> = Vec::new();
        let mut next: Vec<Option<Option<PostingRef>>> = Vec::with_capacity(accounts.len());
        for (i, account) in accounts.iter().enumerate() {
            let cursor = cursors.get(i).copied().unwrap_or(None);
            let lines = match cursor {
                Some(None) => Vec::new(),
                before => match self
                    .store
                    .account_postings(account, before.flatten(), limit.saturating_add(1))
                    .await?
                {
                    PostingPage::Lines(l) => l,
                    PostingPage::BadCursor => return Err(EngineError::NotFound("cursor")),
                },
            };
            next.push(if lines.is_empty() { Some(None) } else { cursor });
            chains.push(lines.into());
        }
        let mut lines = Vec::new();
        while lines.len() < limit as usize {
            let best = chains
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.front().map(|l| (l.at, i)))
                .max();
            let Some((_, i)) = best else { break };
            if let Some(line) = chains.get_mut(i).and_then(|c| c.pop_front()) {
                if let Some(slot) = next.get_mut(i) {
                    // After the chain's oldest posting there is nothing left.
                    *slot = Some(line.prev.map(|_| line.at));
                }
                lines.push(line);
            }
        }
        let has_more =
            chains.iter().any(|c| !c.is_empty()) || next.iter().any(|n| matches!(n, Some(Some(_))));
        Ok(MergedPage {
            lines,
            next,
            has_more,
        })
    }

    /// Whether a payment has its clearing (a succeeded payment always does).
    pub async fn payment_clearing(
        &self,
        id: PaymentId,
    ) -> Result<Option<PaymentClearingRecord>, EngineError> {
        Ok(self.store.get_payment_clearing(id).await?)
    }
}
