//! Clearing (清分) on the payment path: what a succeeded payment fixes for good (its fee
//! snapshot), how each refund of it is split between the merchant's balances, what a settlement
//! batch adds up to, and the entries all of these post.
//!
//! Pure functions: the stores call them inside the transaction of the status change, with what
//! they read in that transaction (the amount refunded before, the payment's residual, whether it
//! is settled), so concurrent refunds and settlements see each other.
//!
//! **Residual.** Each succeeded payment tracks what of it the merchant still holds: its net
//! (amount − fee) minus the merchant's share of its refunds, never below zero. While the payment
//! is unsettled the residual sits in `merchant_pending`; settlement moves exactly the residuals of
//! the payments it covers to `merchant_available`. So `merchant_pending` = Σ residuals of the
//! unsettled payments at every commit, and a refund's debit of pending (capped at its payment's
//! residual) can never be refused by the no-overdraft limit.
//!
//! **A refund's merchant share** (refund − fee returned) comes from, in order:
//! 1. the payment's residual — in `merchant_pending` while the payment is unsettled, in
//!    `merchant_available` after (未结算从待结算账户扣, 已结算从可用余额扣);
//! 2. the rest (only when the fee is kept, `keep`: the merchant bears the whole refund, more than
//!    the payment left it) from `merchant_available`, as far as it goes;
//! 3. whatever the merchant's balances cannot cover is debited to `suspense` (the platform
//!    fronted it; an operator recovers it) — never refused, because the channel has already paid
//!    the refund out.

use crate::civil::Date;
use crate::fees::{refund_shares, FeeError, FeeQuote, FeeRefundPolicy, RefundQuote};
use crate::id::{MerchantId, PaymentId, RefundId};
use crate::ledger::{AccountId, Entry, EntryCode, EntryId, LedgerError, Posting};
use crate::money::{Currency, Money, MoneyError};
use crate::posting_rules;

/// The channel name of wallet payments (a payrail-internal payment method, no external channel).
pub const WALLET_CHANNEL: &str = "wallet";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClearingError {
    #[error(transparent)]
    Fee(#[from] FeeError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Money(#[from] MoneyError),
    #[error("settlement totals disagree: payments net {net_minor} − refunds from pending {from_pending_minor} ≠ residuals {residual_minor}")]
    TotalsDisagree {
        net_minor: i64,
        from_pending_minor: i64,
        residual_minor: i64,
    },
    #[error("a wallet payment names no wallet")]
    NoWallet,
}

/// A payment's clearing, fixed when it succeeds: later changes of fee plans do not touch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clearing {
    pub payment: PaymentId,
    pub merchant: MerchantId,
    /// The channel that collected the money ([`WALLET_CHANNEL`] for a wallet payment).
    pub channel: String,
    /// The wallet paid from (wallet payments only).
    pub wallet: Option<String>,
    pub quote: FeeQuote,
    pub fee_refund: FeeRefundPolicy,
    pub cost_refund: FeeRefundPolicy,
}

impl Clearing {
    pub fn currency(&self) -> Currency {
        self.quote.amount.currency()
    }

    pub fn is_wallet(&self) -> bool {
        self.channel == WALLET_CHANNEL
    }

    /// The entry that records the payment's success: the channel posting set
    /// ([`posting_rules::payment_succeeded`], id `pay_…:captured`), or for a wallet payment the
    /// confirm of its freeze (`pay_…:wallet_confirm`).
    pub fn success_entry(&self) -> Result<Entry, LedgerError> {
        if self.is_wallet() {
            posting_rules::wallet_confirm(self.payment)
        } else {
            posting_rules::payment_succeeded(
                self.payment,
                self.merchant,
                &self.channel,
                &self.quote,
            )
        }
    }
}

/// What a refund's transaction read, for [`split_refund`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundFacts {
    /// Succeeded refunds of the payment before this one.
    pub refunded_before: Money,
    pub refund: Money,
    /// What of the payment the merchant still holds.
    pub residual: Money,
    /// Whether the payment is settled (its residual is in `merchant_available`).
    pub settled: bool,
    /// What `merchant_available` can still spend (0 if it is not open).
    pub available_minor: i64,
}

/// Where a refund's money comes from and goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundSplit {
    pub quote: RefundQuote,
    pub from_pending: Money,
    pub from_available: Money,
    pub from_suspense: Money,
    /// The part of the payment's residual this refund takes.
    pub residual_used: Money,
}

/// Splits a refund's merchant share between pending, available and suspense (see the module
/// documentation for the order).
pub fn split_refund(c: &Clearing, f: &RefundFacts) -> Result<RefundSplit, ClearingError> {
    let quote = refund_shares(
        &c.quote,
        c.fee_refund,
        c.cost_refund,
        f.refunded_before,
        f.refund,
    )?;
    let cur = c.currency();
    let debit = quote.merchant_debit.amount_minor();
    let residual_used = debit.min(f.residual.amount_minor().max(0));
    let (from_pending, need_available) = if f.settled {
        (0, debit)
    } else {
        (
            residual_used,
            debit
                .checked_sub(residual_used)
                .ok_or(MoneyError::Overflow)?,
        )
    };
    let from_available = need_available.min(f.available_minor.max(0));
    let from_suspense = need_available
        .checked_sub(from_available)
        .ok_or(MoneyError::Overflow)?;
    Ok(RefundSplit {
        quote,
        from_pending: Money::new(from_pending, cur),
        from_available: Money::new(from_available, cur),
        from_suspense: Money::new(from_suspense, cur),
        residual_used: Money::new(residual_used, cur),
    })
}

fn push_nonzero(out: &mut Vec<Posting>, p: Posting) {
    if !p.amount.is_zero() {
        out.push(p);
    }
}

/// The entry of a succeeded refund: the merchant's share from where [`split_refund`] says, the
/// fee returned from the platform's fee income, and the money back to the channel (minus the
/// cost it returns) or to the wallet. Id `rfd_…:refund` (`rfd_…:wallet_refund`): derived from
/// the refund, so it posts once whatever retries or replays.
pub fn refund_entry(
    refund: RefundId,
    c: &Clearing,
    s: &RefundSplit,
) -> Result<Entry, ClearingError> {
    let cur = c.currency();
    let mut p = Vec::with_capacity(6);
    push_nonzero(
        &mut p,
        Posting::debit(AccountId::merchant_pending(c.merchant, cur), s.from_pending),
    );
    push_nonzero(
        &mut p,
        Posting::debit(
            AccountId::merchant_available(c.merchant, cur),
            s.from_available,
        ),
    );
    push_nonzero(
        &mut p,
        Posting::debit(AccountId::suspense(cur), s.from_suspense),
    );
    push_nonzero(
        &mut p,
        Posting::debit(AccountId::platform_fee(cur), s.quote.fee_refund),
    );
    let (code, suffix) = if c.is_wallet() {
        let holder = c.wallet.as_deref().ok_or(ClearingError::NoWallet)?;
        push_nonzero(
            &mut p,
            Posting::credit(AccountId::wallet(c.merchant, holder, cur)?, s.quote.refund),
        );
        (EntryCode::WalletRefund, "wallet_refund")
    } else {
        push_nonzero(
            &mut p,
            Posting::credit(
                AccountId::channel_clearing(&c.channel, cur)?,
                s.quote.refund.checked_sub(s.quote.cost_refund)?,
            ),
        );
        push_nonzero(
            &mut p,
            Posting::credit(
                AccountId::channel_cost(&c.channel, cur)?,
                s.quote.cost_refund,
            ),
        );
        (EntryCode::Refund, "refund")
    };
    Ok(Entry::posted(
        EntryId::derived(&refund, suffix)?,
        code,
        Some(&c.payment.to_string()),
        p,
    )?)
}

/// One payment of a settlement batch: amount, fee, and the residual the batch moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettledPayment {
    pub amount_minor: i64,
    pub fee_minor: i64,
    pub residual_minor: i64,
}

/// One refund netted in a settlement batch (a refund of one of its payments made before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettledRefund {
    pub amount_minor: i64,
    pub fee_refund_minor: i64,
    pub from_pending_minor: i64,
}

/// What a settlement batch adds up to. `net_minor` is what moves from pending to available.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettlementTotals {
    pub payment_count: i64,
    pub refund_count: i64,
    pub gross_minor: i64,
    pub fee_minor: i64,
    pub refunded_minor: i64,
    pub fee_refunded_minor: i64,
    /// Σ (amount − fee) − Σ refunds' pending shares = Σ residuals.
    pub net_minor: i64,
}

fn add(a: i64, b: i64) -> Result<i64, MoneyError> {
    a.checked_add(b).ok_or(MoneyError::Overflow)
}

/// Adds up a batch and checks it two ways: the net computed line by line from the statement
/// (payments' nets minus refunds' pending shares) must equal the sum of the residuals the batch
/// moves. A difference means the stored clearing rows are inconsistent, and nothing is settled.
pub fn settlement_totals(
    payments: &[SettledPayment],
    refunds: &[SettledRefund],
) -> Result<SettlementTotals, ClearingError> {
    let mut t = SettlementTotals::default();
    let (mut net, mut residual, mut from_pending) = (0i64, 0i64, 0i64);
    for p in payments {
        t.payment_count = add(t.payment_count, 1)?;
        t.gross_minor = add(t.gross_minor, p.amount_minor)?;
        t.fee_minor = add(t.fee_minor, p.fee_minor)?;
        net = add(
            net,
            p.amount_minor
                .checked_sub(p.fee_minor)
                .ok_or(MoneyError::Overflow)?,
        )?;
        residual = add(residual, p.residual_minor)?;
    }
    for r in refunds {
        t.refund_count = add(t.refund_count, 1)?;
        t.refunded_minor = add(t.refunded_minor, r.amount_minor)?;
        t.fee_refunded_minor = add(t.fee_refunded_minor, r.fee_refund_minor)?;
        from_pending = add(from_pending, r.from_pending_minor)?;
    }
    if net.checked_sub(from_pending) != Some(residual) {
        return Err(ClearingError::TotalsDisagree {
            net_minor: net,
            from_pending_minor: from_pending,
            residual_minor: residual,
        });
    }
    t.net_minor = residual;
    Ok(t)
}

/// The settlement entry of a batch (D merchant pending, C merchant available), or `None` when
/// the batch moves nothing (its payments were refunded in full before it).
pub fn settlement_entry(
    merchant: MerchantId,
    day: Date,
    currency: Currency,
    net_minor: i64,
) -> Result<Option<Entry>, ClearingError> {
    if net_minor <= 0 {
        return Ok(None);
    }
    Ok(Some(posting_rules::settlement(
        merchant,
        day,
        Money::new(net_minor, currency),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fees::{FeePlan, FeePlanSpec};
    use proptest::prelude::*;

    fn cny(m: i64) -> Money {
        Money::new(m, Currency::CNY)
    }

    fn clearing(amount: i64, fee_bps: u32, policy: FeeRefundPolicy) -> Clearing {
        let plan = FeePlan::new(FeePlanSpec {
            currency: Currency::CNY,
            rate_bps: fee_bps,
            fixed_minor: 0,
            min_minor: 0,
            max_minor: None,
            channel_cost_bps: 25,
            channel_cost_fixed_minor: 0,
            fee_refund: policy,
            channel_cost_refund: FeeRefundPolicy::Proportional,
        })
        .unwrap();
        Clearing {
            payment: PaymentId::generate(1, [1; 10]),
            merchant: MerchantId::generate(1, [2; 10]),
            channel: "sandbox".into(),
            wallet: None,
            quote: plan.quote(cny(amount)).unwrap(),
            fee_refund: policy,
            cost_refund: FeeRefundPolicy::Proportional,
        }
    }

    fn facts(before: i64, refund: i64, residual: i64, settled: bool, avail: i64) -> RefundFacts {
        RefundFacts {
            refunded_before: cny(before),
            refund: cny(refund),
            residual: cny(residual),
            settled,
            available_minor: avail,
        }
    }

    #[test]
    fn refund_before_settlement_comes_from_pending() {
        // 100.00 at 0.6 %: fee 60, net 9,940. Refund 30.00: fee back 18, merchant share 2,982.
        let c = clearing(10_000, 60, FeeRefundPolicy::Proportional);
        let s = split_refund(&c, &facts(0, 3_000, 9_940, false, 0)).unwrap();
        assert_eq!(s.quote.fee_refund, cny(18));
        assert_eq!(
            (s.from_pending, s.from_available, s.from_suspense),
            (cny(2_982), cny(0), cny(0))
        );
        assert_eq!(s.residual_used, cny(2_982));
        let e = refund_entry(RefundId::generate(1, [3; 10]), &c, &s).unwrap();
        assert!(e.id().as_str().ends_with(":refund"));
        assert_eq!(e.postings().len(), 4);
    }

    #[test]
    fn refund_after_settlement_comes_from_available() {
        let c = clearing(10_000, 60, FeeRefundPolicy::Proportional);
        let s = split_refund(&c, &facts(0, 3_000, 9_940, true, 9_940)).unwrap();
        assert_eq!(
            (s.from_pending, s.from_available, s.from_suspense),
            (cny(0), cny(2_982), cny(0))
        );
    }

    #[test]
    fn a_kept_fee_beyond_the_residual_comes_from_available_then_suspense() {
        // Fee kept: refunding all of 100.00 costs the merchant 100.00, 0.60 more than it got.
        let c = clearing(10_000, 60, FeeRefundPolicy::Keep);
        let s = split_refund(&c, &facts(0, 10_000, 9_940, false, 50)).unwrap();
        assert_eq!(s.from_pending, cny(9_940));
        assert_eq!(s.from_available, cny(50));
        assert_eq!(s.from_suspense, cny(10));
        let e = refund_entry(RefundId::generate(1, [3; 10]), &c, &s).unwrap();
        // pending, available, suspense; channel clearing and cost (no fee line: fee kept).
        assert_eq!(e.postings().len(), 5);
    }

    #[test]
    fn a_wallet_refund_goes_back_to_the_wallet() {
        let mut c = clearing(10_000, 60, FeeRefundPolicy::Proportional);
        c.channel = WALLET_CHANNEL.into();
        c.wallet = Some("alice".into());
        let s = split_refund(&c, &facts(0, 6_000, 9_940, false, 0)).unwrap();
        let e = refund_entry(RefundId::generate(1, [3; 10]), &c, &s).unwrap();
        assert!(e.id().as_str().ends_with(":wallet_refund"));
        let to_wallet = e
            .postings()
            .iter()
            .find(|p| p.account.kind() == crate::ledger::AccountKind::Wallet)
            .unwrap();
        assert_eq!(to_wallet.amount, cny(6_000));
        c.wallet = None;
        assert!(refund_entry(RefundId::generate(1, [3; 10]), &c, &s).is_err());
    }

    #[test]
    fn totals_must_agree_with_the_residuals() {
        let p = [
            SettledPayment {
                amount_minor: 10_000,
                fee_minor: 60,
                residual_minor: 9_940 - 2_982,
            },
            SettledPayment {
                amount_minor: 500,
                fee_minor: 3,
                residual_minor: 497,
            },
        ];
        let r = [SettledRefund {
            amount_minor: 3_000,
            fee_refund_minor: 18,
            from_pending_minor: 2_982,
        }];
        let t = settlement_totals(&p, &r).unwrap();
        assert_eq!(t.net_minor, 9_940 - 2_982 + 497);
        assert_eq!(
            (t.gross_minor, t.fee_minor, t.refunded_minor),
            (10_500, 63, 3_000)
        );
        // A refund missing from the statement is caught.
        assert!(settlement_totals(&p, &[]).is_err());
        assert_eq!(
            settlement_entry(
                MerchantId::generate(1, [2; 10]),
                Date::parse("2026-11-22").unwrap(),
                Currency::CNY,
                0
            )
            .unwrap(),
            None
        );
    }

    proptest! {
        /// However a payment is refunded, with or without settlement in between: every refund
        /// balances, the merchant's shares plus the fee returned are the refund, the pending
        /// share never exceeds the residual (so pending never goes negative), and the residual
        /// ends at zero once fully refunded under the proportional policy.
        #[test]
        fn refunds_split_exactly(
            amount in 1i64..5_000_000,
            bps in 0u32..=10_000,
            keep in any::<bool>(),
            cuts in proptest::collection::vec(1i64..2_000_000, 1..6),
            settle_after in 0usize..6,
            avail in 0i64..1_000_000,
        ) {
            let policy = if keep { FeeRefundPolicy::Keep } else { FeeRefundPolicy::Proportional };
            let c = clearing(amount, bps, policy);
            let mut before = 0i64;
            let mut residual = c.quote.net.amount_minor();
            for (i, cut) in cuts.iter().enumerate() {
                let r = (*cut).min(amount - before);
                if r == 0 { break; }
                let settled = i >= settle_after;
                let s = split_refund(&c, &facts(before, r, residual, settled, avail)).unwrap();
                let shares = s.from_pending.amount_minor() + s.from_available.amount_minor()
                    + s.from_suspense.amount_minor();
                prop_assert_eq!(shares, s.quote.merchant_debit.amount_minor());
                prop_assert_eq!(shares + s.quote.fee_refund.amount_minor(), r);
                prop_assert!(s.from_pending.amount_minor() <= residual);
                prop_assert!(s.from_available.amount_minor() <= avail.max(0));
                let e = refund_entry(RefundId::generate(1, [3; 10]), &c, &s);
                prop_assert!(e.is_ok());
                residual -= s.residual_used.amount_minor();
                prop_assert!(residual >= 0);
                before += r;
            }
            if before == amount && !keep {
                prop_assert_eq!(residual, 0);
            }
        }
    }
}
