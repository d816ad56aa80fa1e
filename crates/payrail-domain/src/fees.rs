//! Clearing (清算): what the platform charges a merchant for a payment, what the channel charges
//! the platform, and how both are shared back on a refund.
//!
//! **Rounding rule.** A rate is in basis points (1 bp = 0.01 %). The rate part of a fee is
//! `amount × bps / 10 000` rounded **half up** to the minor unit, computed exactly in i128:
//! `(2 × amount × bps + 10 000) div (2 × 10 000)`. Then, in this order: add the fixed fee, raise
//! to the minimum, lower to the maximum, and never above the payment itself. Examples
//! (CNY, minor unit = fen): 0.6 % of 100.00 = 60 fen exactly; 0.6 % of 0.75 = 0.45 fen → 0;
//! 0.6 % of 2.50 = 1.5 fen → 2; 0.6 % of 1.00 = 0.6 fen → 1. docs/ledger.md has more.
//!
//! **Refunds.** A refund returns a share of the fee (and the channel returns a share of its
//! cost) according to a [`FeeRefundPolicy`]. Proportional shares are computed on the
//! *cumulative* refunded amount — share = round(fee × refunded_after / amount) −
//! round(fee × refunded_before / amount) — so however a payment is refunded in parts, the shares
//! add up to exactly the whole fee once it is fully refunded, never a fen more or less.

use crate::id::MerchantId;
use crate::money::{Currency, Money, MoneyError};

/// 100 % in basis points.
pub const BPS_MAX: u32 = 10_000;
/// Longest channel or method name in a fee-plan key.
pub const PLAN_KEY_LEN_MAX: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeeError {
    #[error("rate of {0} bps is above {BPS_MAX} (100 %)")]
    RateTooHigh(u32),
    #[error("{0} must be 0..={max} minor units", max = Money::MAX_PAYMENT_MINOR)]
    BadAmount(&'static str),
    #[error("maximum fee {max_minor} is below the minimum {min_minor}")]
    MaxBelowMin { min_minor: i64, max_minor: i64 },
    #[error("plan is in {plan}, amount in {amount}")]
    CurrencyMismatch { plan: Currency, amount: Currency },
    #[error("refund of {refund_minor} after {before_minor} already refunded exceeds the payment of {amount_minor}")]
    RefundExceedsPayment {
        amount_minor: i64,
        before_minor: i64,
        refund_minor: i64,
    },
    #[error("invalid fee-plan key {0:?}")]
    BadKey(String),
    #[error(transparent)]
    Money(#[from] MoneyError),
}

/// What happens to a fee (or a channel's cost) when its payment is refunded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeeRefundPolicy {
    /// The fee is kept; the merchant bears the whole refund.
    Keep,
    /// The fee is returned pro rata, exact over cumulative partial refunds.
    Proportional,
}

impl FeeRefundPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            FeeRefundPolicy::Keep => "keep",
            FeeRefundPolicy::Proportional => "proportional",
        }
    }
    pub fn parse(s: &str) -> Option<FeeRefundPolicy> {
        match s {
            "keep" => Some(FeeRefundPolicy::Keep),
            "proportional" => Some(FeeRefundPolicy::Proportional),
            _ => None,
        }
    }
}

/// The plain fields of a fee plan, as an operator configures it; [`FeePlan::new`] validates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeePlanSpec {
    pub currency: Currency,
    pub rate_bps: u32,
    pub fixed_minor: i64,
    pub min_minor: i64,
    pub max_minor: Option<i64>,
    /// What the channel charges the platform, so the platform's margin is visible.
    pub channel_cost_bps: u32,
    pub channel_cost_fixed_minor: i64,
    pub fee_refund: FeeRefundPolicy,
    pub channel_cost_refund: FeeRefundPolicy,
}

/// A validated fee plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeePlan(FeePlanSpec);

/// The fee split of one payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeeQuote {
    pub amount: Money,
    /// Charged to the merchant.
    pub fee: Money,
    /// amount − fee: what the merchant is owed.
    pub net: Money,
    /// Charged by the channel to the platform.
    pub channel_cost: Money,
    /// fee − channel cost; negative when the platform loses money on the payment.
    pub margin: Money,
}

/// The split of one refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundQuote {
    pub refund: Money,
    /// Fee returned to the merchant.
    pub fee_refund: Money,
    /// refund − fee_refund: what the merchant's balance pays.
    pub merchant_debit: Money,
    /// Channel cost the channel returns to the platform.
    pub cost_refund: Money,
}

/// `n × num / den` rounded half up, for n, num ≥ 0 and den > 0, exactly in i128.
/// Callers keep every operand below 2^63, so 2 × n × num < 2^127: no overflow.
pub fn mul_div_round_half_up(n: i64, num: i64, den: i64) -> Result<i64, MoneyError> {
    if n < 0 || num < 0 || den <= 0 {
        return Err(MoneyError::NotPositive);
    }
    let two_den = i128::from(den).checked_mul(2).ok_or(MoneyError::Overflow)?;
    let q = i128::from(n)
        .checked_mul(i128::from(num))
        .and_then(|p| p.checked_mul(2))
        .and_then(|p| p.checked_add(i128::from(den)))
        .and_then(|p| p.checked_div(two_den))
        .ok_or(MoneyError::Overflow)?;
    i64::try_from(q).map_err(|_| MoneyError::Overflow)
}

fn bps_of(amount_minor: i64, bps: u32) -> Result<i64, MoneyError> {
    mul_div_round_half_up(amount_minor, i64::from(bps), i64::from(BPS_MAX))
}

fn check_minor(name: &'static str, v: i64) -> Result<(), FeeError> {
    if (0..=Money::MAX_PAYMENT_MINOR).contains(&v) {
        Ok(())
    } else {
        Err(FeeError::BadAmount(name))
    }
}

impl FeePlan {
    pub fn new(spec: FeePlanSpec) -> Result<FeePlan, FeeError> {
        for bps in [spec.rate_bps, spec.channel_cost_bps] {
            if bps > BPS_MAX {
                return Err(FeeError::RateTooHigh(bps));
            }
        }
        check_minor("fixed fee", spec.fixed_minor)?;
        check_minor("minimum fee", spec.min_minor)?;
        check_minor("channel fixed cost", spec.channel_cost_fixed_minor)?;
        if let Some(max) = spec.max_minor {
            check_minor("maximum fee", max)?;
            if max < spec.min_minor {
                return Err(FeeError::MaxBelowMin {
                    min_minor: spec.min_minor,
                    max_minor: max,
                });
            }
        }
        Ok(FeePlan(spec))
    }

    pub fn spec(&self) -> &FeePlanSpec {
        &self.0
    }

    pub fn currency(&self) -> Currency {
        self.0.currency
    }

    /// The fee, channel cost and margin of a payment of `amount` (> 0).
    pub fn quote(&self, amount: Money) -> Result<FeeQuote, FeeError> {
        let s = &self.0;
        if amount.currency() != s.currency {
            return Err(FeeError::CurrencyMismatch {
                plan: s.currency,
                amount: amount.currency(),
            });
        }
        let a = amount.amount_minor();
        if a <= 0 {
            return Err(MoneyError::NotPositive.into());
        }
        let mut fee = bps_of(a, s.rate_bps)?
            .checked_add(s.fixed_minor)
            .ok_or(MoneyError::Overflow)?;
        fee = fee.max(s.min_minor);
        if let Some(max) = s.max_minor {
            fee = fee.min(max);
        }
        // The merchant is never owed a negative amount.
        fee = fee.min(a);
        let cost = bps_of(a, s.channel_cost_bps)?
            .checked_add(s.channel_cost_fixed_minor)
            .ok_or(MoneyError::Overflow)?
            .min(a);
        let c = s.currency;
        Ok(FeeQuote {
            amount,
            fee: Money::new(fee, c),
            net: Money::new(a.checked_sub(fee).ok_or(MoneyError::Overflow)?, c),
            channel_cost: Money::new(cost, c),
            margin: Money::new(fee.checked_sub(cost).ok_or(MoneyError::Overflow)?, c),
        })
    }

    /// The split of a refund of `refund` when `refunded_before` of the payment quoted by
    /// `original` was already refunded.
    pub fn refund_quote(
        &self,
        original: &FeeQuote,
        refunded_before: Money,
        refund: Money,
    ) -> Result<RefundQuote, FeeError> {
        refund_shares(
            original,
            self.0.fee_refund,
            self.0.channel_cost_refund,
            refunded_before,
            refund,
        )
    }
}

/// The split of a refund of `refund` when `refunded_before` of the payment quoted by `original`
/// was already refunded, under the given policies. [`FeePlan::refund_quote`] is this with the
/// plan's policies; the payment path calls it with the policies snapshotted when the payment
/// succeeded, so a plan changed since does not change how an old payment is refunded.
pub fn refund_shares(
    original: &FeeQuote,
    fee_policy: FeeRefundPolicy,
    cost_policy: FeeRefundPolicy,
    refunded_before: Money,
    refund: Money,
) -> Result<RefundQuote, FeeError> {
    let c = original.amount.currency();
    for m in [refunded_before, refund] {
        if m.currency() != c {
            return Err(FeeError::CurrencyMismatch {
                plan: c,
                amount: m.currency(),
            });
        }
    }
    let (a, before, r) = (
        original.amount.amount_minor(),
        refunded_before.amount_minor(),
        refund.amount_minor(),
    );
    let after = before.checked_add(r).ok_or(MoneyError::Overflow)?;
    if r <= 0 || before < 0 || after > a {
        return Err(FeeError::RefundExceedsPayment {
            amount_minor: a,
            before_minor: before,
            refund_minor: r,
        });
    }
    let share = |total: i64, policy: FeeRefundPolicy| -> Result<i64, FeeError> {
        match policy {
            FeeRefundPolicy::Keep => Ok(0),
            FeeRefundPolicy::Proportional => {
                let upto_after = mul_div_round_half_up(total, after, a)?;
                let upto_before = mul_div_round_half_up(total, before, a)?;
                Ok(upto_after
                    .checked_sub(upto_before)
                    .ok_or(MoneyError::Overflow)?)
            }
        }
    };
    let fee_refund = share(original.fee.amount_minor(), fee_policy)?;
    let cost_refund = share(original.channel_cost.amount_minor(), cost_policy)?;
    Ok(RefundQuote {
        refund,
        fee_refund: Money::new(fee_refund, c),
        merchant_debit: Money::new(r.checked_sub(fee_refund).ok_or(MoneyError::Overflow)?, c),
        cost_refund: Money::new(cost_refund, c),
    })
}

/// Which payments a plan applies to. `None` matches anything.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeePlanKey {
    pub merchant: Option<MerchantId>,
    pub channel: Option<String>,
    pub method: Option<String>,
}

impl FeePlanKey {
    pub fn new(
        merchant: Option<MerchantId>,
        channel: Option<&str>,
        method: Option<&str>,
    ) -> Result<FeePlanKey, FeeError> {
        let name = |s: Option<&str>| -> Result<Option<String>, FeeError> {
            match s {
                None => Ok(None),
                Some(v)
                    if !v.is_empty()
                        && v.len() <= PLAN_KEY_LEN_MAX
                        && v.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
                {
                    Ok(Some(v.to_string()))
                }
                Some(v) => Err(FeeError::BadKey(v.chars().take(40).collect())),
            }
        };
        Ok(FeePlanKey {
            merchant,
            channel: name(channel)?,
            method: name(method)?,
        })
    }

    fn matches(&self, merchant: MerchantId, channel: &str, method: &str) -> bool {
        self.merchant.is_none_or(|m| m == merchant)
            && self.channel.as_deref().is_none_or(|c| c == channel)
            && self.method.as_deref().is_none_or(|m| m == method)
    }

    /// Precedence of a matching key: a merchant's own plan beats any generic one; then a
    /// channel-specific one; then a method-specific one.
    fn precedence(&self) -> (bool, bool, bool) {
        (
            self.merchant.is_some(),
            self.channel.is_some(),
            self.method.is_some(),
        )
    }
}

/// The fee plans in force, one per key and currency.
#[derive(Debug, Clone, Default)]
pub struct FeeSchedule {
    plans: Vec<(FeePlanKey, FeePlan)>,
}

impl FeeSchedule {
    /// Adds or replaces the plan for `key` in the plan's currency.
    pub fn set(&mut self, key: FeePlanKey, plan: FeePlan) {
        self.plans
            .retain(|(k, p)| !(k == &key && p.currency() == plan.currency()));
        self.plans.push((key, plan));
    }

    /// The most specific plan for a payment (see [`FeePlanKey`] for precedence), if any.
    pub fn select(
        &self,
        merchant: MerchantId,
        channel: &str,
        method: &str,
        currency: Currency,
    ) -> Option<&FeePlan> {
        self.select_key(merchant, channel, method, currency)
            .map(|(_, p)| p)
    }

    /// [`FeeSchedule::select`], with the key of the plan chosen.
    pub fn select_key(
        &self,
        merchant: MerchantId,
        channel: &str,
        method: &str,
        currency: Currency,
    ) -> Option<(&FeePlanKey, &FeePlan)> {
        self.plans
            .iter()
            .filter(|(k, p)| p.currency() == currency && k.matches(merchant, channel, method))
            .max_by_key(|(k, _)| k.precedence())
            .map(|(k, p)| (k, p))
    }

    /// Number of plans.
    pub fn len(&self) -> usize {
        self.plans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn plan(rate_bps: u32, fixed: i64, min: i64, max: Option<i64>) -> FeePlan {
        FeePlan::new(FeePlanSpec {
            currency: Currency::CNY,
            rate_bps,
            fixed_minor: fixed,
            min_minor: min,
            max_minor: max,
            channel_cost_bps: 25,
            channel_cost_fixed_minor: 0,
            fee_refund: FeeRefundPolicy::Proportional,
            channel_cost_refund: FeeRefundPolicy::Proportional,
        })
        .unwrap()
    }

    fn cny(minor: i64) -> Money {
        Money::new(minor, Currency::CNY)
    }

    #[test]
    fn rounding_is_half_up_in_integers() {
        // (amount, bps) → rate part
        let cases = [
            (10_000, 60, 60), // 0.6 % of 100.00 = 60 fen exactly
            (75, 60, 0),      // 0.45 fen → 0
            (250, 60, 2),     // 1.5 fen → 2 (half up)
            (100, 60, 1),     // 0.6 fen → 1
            (83, 60, 0),      // 0.498 fen → 0
            (84, 60, 1),      // 0.504 fen → 1
            (1, 10_000, 1),   // 100 %
            (1_000_000_000_000, 10_000, 1_000_000_000_000),
            (0, 60, 0),
        ];
        for (amount, bps, want) in cases {
            assert_eq!(bps_of(amount, bps).unwrap(), want, "{amount} × {bps} bps");
        }
    }

    #[test]
    fn fee_table() {
        // (plan, amount) → (fee, net)
        let cases = [
            (plan(60, 0, 0, None), 10_000, 60, 9_940),
            (plan(60, 10, 0, None), 10_000, 70, 9_930),
            (plan(60, 0, 50, None), 1_000, 50, 950), // 6 fen raised to the 50 fen minimum
            (plan(60, 0, 0, Some(500)), 1_000_000, 500, 999_500), // 6,000 capped at 5.00
            (plan(60, 0, 50, None), 30, 30, 0),      // the minimum never exceeds the payment
            (plan(0, 0, 0, None), 10_000, 0, 10_000),
        ];
        for (p, amount, fee, net) in cases {
            let q = p.quote(cny(amount)).unwrap();
            assert_eq!((q.fee, q.net), (cny(fee), cny(net)), "{p:?} on {amount}");
            assert_eq!(q.fee.checked_add(q.net).unwrap(), q.amount);
        }
    }

    #[test]
    fn margin_is_fee_minus_channel_cost() {
        // 0.6 % fee, 0.25 % channel cost on 100.00: 60 − 25 = 35 fen of margin.
        let q = plan(60, 0, 0, None).quote(cny(10_000)).unwrap();
        assert_eq!(q.channel_cost, cny(25));
        assert_eq!(q.margin, cny(35));
        // A fee below the channel cost shows a negative margin rather than hiding it.
        let q = plan(10, 0, 0, None).quote(cny(10_000)).unwrap();
        assert_eq!(q.margin, cny(10 - 25));
    }

    #[test]
    fn plans_are_validated() {
        let base = plan(60, 0, 0, None).spec().clone();
        let bad = [
            FeePlanSpec {
                rate_bps: 10_001,
                ..base.clone()
            },
            FeePlanSpec {
                fixed_minor: -1,
                ..base.clone()
            },
            FeePlanSpec {
                min_minor: 100,
                max_minor: Some(99),
                ..base.clone()
            },
            FeePlanSpec {
                channel_cost_bps: 20_000,
                ..base.clone()
            },
        ];
        for spec in bad {
            assert!(FeePlan::new(spec.clone()).is_err(), "{spec:?}");
        }
        let p = plan(60, 0, 0, None);
        assert!(p.quote(Money::new(100, Currency::USD)).is_err());
        assert!(p.quote(cny(0)).is_err());
        assert!(p.quote(cny(-5)).is_err());
    }

    #[test]
    fn partial_refunds_return_exactly_the_whole_fee() {
        // Fee of 100.01 at 0.6 %: 60.006 fen → 60. Refunded in three parts.
        let p = plan(60, 0, 0, None);
        let q = p.quote(cny(10_001)).unwrap();
        assert_eq!(q.fee, cny(60));
        let parts = [3_333, 3_333, 3_335];
        let mut before = 0;
        let mut fee_back = 0;
        let mut cost_back = 0;
        for r in parts {
            let rq = p.refund_quote(&q, cny(before), cny(r)).unwrap();
            assert_eq!(
                rq.merchant_debit.checked_add(rq.fee_refund).unwrap(),
                cny(r)
            );
            fee_back += rq.fee_refund.amount_minor();
            cost_back += rq.cost_refund.amount_minor();
            before += r;
        }
        assert_eq!(fee_back, 60);
        assert_eq!(cost_back, q.channel_cost.amount_minor());
        assert!(p.refund_quote(&q, cny(before), cny(1)).is_err());
    }

    #[test]
    fn keep_policy_returns_no_fee() {
        let mut spec = plan(60, 0, 0, None).spec().clone();
        spec.fee_refund = FeeRefundPolicy::Keep;
        let p = FeePlan::new(spec).unwrap();
        let q = p.quote(cny(10_000)).unwrap();
        let rq = p.refund_quote(&q, cny(0), cny(10_000)).unwrap();
        assert_eq!(rq.fee_refund, cny(0));
        assert_eq!(rq.merchant_debit, cny(10_000));
    }

    #[test]
    fn the_most_specific_plan_wins() {
        let m1 = MerchantId::generate(1, [1; 10]);
        let m2 = MerchantId::generate(1, [2; 10]);
        let mut s = FeeSchedule::default();
        s.set(
            FeePlanKey::new(None, None, None).unwrap(),
            plan(60, 0, 0, None),
        );
        s.set(
            FeePlanKey::new(None, Some("sandbox"), None).unwrap(),
            plan(50, 0, 0, None),
        );
        s.set(
            FeePlanKey::new(Some(m1), None, None).unwrap(),
            plan(30, 0, 0, None),
        );
        s.set(
            FeePlanKey::new(Some(m1), Some("sandbox"), Some("wallet")).unwrap(),
            plan(10, 0, 0, None),
        );
        let rate = |m, ch, me| {
            s.select(m, ch, me, Currency::CNY)
                .map(|p| p.spec().rate_bps)
        };
        assert_eq!(rate(m2, "alipay", "qr"), Some(60));
        assert_eq!(rate(m2, "sandbox", "qr"), Some(50));
        assert_eq!(rate(m1, "sandbox", "qr"), Some(30));
        assert_eq!(rate(m1, "sandbox", "wallet"), Some(10));
        assert_eq!(s.select(m1, "sandbox", "qr", Currency::USD), None);
        assert!(FeePlanKey::new(None, Some("bad name"), None).is_err());
    }

    proptest! {
        #[test]
        fn quote_is_exact_and_bounded(
            amount in 1i64..=Money::MAX_PAYMENT_MINOR,
            bps in 0u32..=BPS_MAX,
            fixed in 0i64..10_000,
            min in 0i64..10_000,
            extra in proptest::option::of(0i64..100_000),
        ) {
            let max = extra.map(|e| min + e);
            let p = plan(bps, fixed, min, max);
            let q = p.quote(cny(amount)).unwrap();
            let (fee, net) = (q.fee.amount_minor(), q.net.amount_minor());
            prop_assert_eq!(fee + net, amount);
            prop_assert!(fee >= 0 && fee <= amount);
            if let Some(max) = max { prop_assert!(fee <= max); }
            prop_assert!(fee >= min.min(amount));
            // The rate part is the exact rational rounded half up: |rate − exact| ≤ 1/2.
            let exact2 = 2 * i128::from(amount) * i128::from(bps);
            let got2 = 2 * i128::from(bps_of(amount, bps).unwrap()) * 10_000;
            prop_assert!((got2 - exact2).abs() <= 10_000);
        }

        #[test]
        fn any_split_of_refunds_returns_the_whole_fee(
            amount in 1i64..10_000_000,
            bps in 0u32..=BPS_MAX,
            cuts in proptest::collection::vec(1i64..1_000_000, 1..8),
        ) {
            let p = plan(bps, 3, 0, None);
            let q = p.quote(cny(amount)).unwrap();
            let mut before = 0i64;
            let mut fee_back = 0i64;
            for c in cuts {
                let r = c.min(amount - before);
                if r == 0 { break; }
                let rq = p.refund_quote(&q, cny(before), cny(r)).unwrap();
                prop_assert!(rq.fee_refund.amount_minor() >= 0);
                prop_assert!(rq.merchant_debit.amount_minor() >= 0);
                fee_back += rq.fee_refund.amount_minor();
                before += r;
            }
            if before < amount {
                let rq = p.refund_quote(&q, cny(before), cny(amount - before)).unwrap();
                fee_back += rq.fee_refund.amount_minor();
            }
            prop_assert_eq!(fee_back, q.fee.amount_minor());
        }
    }
}
