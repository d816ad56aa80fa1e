//! The refund state machine and the refund ceiling (invariant 7).
//!
//! A refund is recorded `processing` — with its amount reserved against the payment — before
//! the channel is asked, because from the moment the request is sent its outcome is unknown
//! until the channel says otherwise. It ends `succeeded` (the money goes back to the payer) or
//! `failed` (the channel definitely refused; nothing moved, and the reservation is released).
//! Both are final. An unknown answer never fails a refund: failing it would release an amount
//! the channel may in fact be paying out, and a later refund could then push the total over
//! what was paid.
//!
//! The ceiling: for every payment, `refunded ≤ reserved ≤ paid`, where `reserved` is the sum of
//! every refund that is processing or succeeded. [`RefundCeiling`] is the rule; storage applies
//! the same rule inside the write that records a refund (a conditional update of the payment's
//! row), so concurrent requests cannot both fit into the same remainder.

use crate::money::{Currency, Money};
use crate::payment::PaymentStatus;
use std::fmt;

/// Status of a refund as the merchant sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefundStatus {
    Processing,
    Succeeded,
    Failed,
}

impl RefundStatus {
    pub const ALL: &'static [RefundStatus] = &[
        RefundStatus::Processing,
        RefundStatus::Succeeded,
        RefundStatus::Failed,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            RefundStatus::Processing => "processing",
            RefundStatus::Succeeded => "succeeded",
            RefundStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<RefundStatus> {
        match s {
            "processing" => Some(RefundStatus::Processing),
            "succeeded" => Some(RefundStatus::Succeeded),
            "failed" => Some(RefundStatus::Failed),
            _ => None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, RefundStatus::Succeeded | RefundStatus::Failed)
    }

    /// The whitelist. Everything not listed is refused.
    pub fn can_become(&self, to: RefundStatus) -> bool {
        matches!(
            (self, to),
            (RefundStatus::Processing, RefundStatus::Succeeded)
                | (RefundStatus::Processing, RefundStatus::Failed)
        )
    }
}

impl fmt::Display for RefundStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for RefundStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What a channel said about a refund, reduced to what the state machine needs. (The
/// connectors' `RefundOutcome` carries the details; the engine maps it onto this.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefundReport {
    /// The channel confirms the money is on its way back.
    Succeeded,
    /// Accepted, not finished.
    Processing,
    /// The channel definitely refused this refund; nothing was refunded.
    Failed,
    /// Timeout, 5xx, bad signature, "not found", an abnormal refund that needs a person.
    Unknown,
}

impl RefundReport {
    pub fn label(&self) -> &'static str {
        match self {
            RefundReport::Succeeded => "succeeded",
            RefundReport::Processing => "processing",
            RefundReport::Failed => "failed",
            RefundReport::Unknown => "unknown",
        }
    }

    pub fn is_definite(&self) -> bool {
        matches!(self, RefundReport::Succeeded | RefundReport::Failed)
    }
}

/// What to do with a refund given a channel report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundDecision {
    Transition(RefundStatus),
    /// Still open, still unknown, or the same definite answer again.
    NoChange,
    /// A definite answer contradicting the refund's final status: the status stays, an alert
    /// is raised (the first definite answer wins).
    Conflict {
        current: RefundStatus,
        reported: &'static str,
    },
}

/// Applies a channel report to a refund's current status. Unknown and processing never change
/// anything; the first definite answer wins; a contradicting later one is a conflict.
pub fn decide(current: RefundStatus, report: RefundReport) -> RefundDecision {
    let target = match report {
        RefundReport::Unknown | RefundReport::Processing => return RefundDecision::NoChange,
        RefundReport::Succeeded => RefundStatus::Succeeded,
        RefundReport::Failed => RefundStatus::Failed,
    };
    if current == target {
        RefundDecision::NoChange
    } else if current.can_become(target) {
        RefundDecision::Transition(target)
    } else {
        RefundDecision::Conflict {
            current,
            reported: report.label(),
        }
    }
}

/// A payment's refund totals, in minor units of its currency: `refunded ≤ reserved ≤ paid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundCeiling {
    pub paid_minor: i64,
    /// Refunds processing or succeeded.
    pub reserved_minor: i64,
    /// Refunds succeeded.
    pub refunded_minor: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CeilingError {
    #[error("refund amount must be positive")]
    NotPositive,
    #[error("only {refundable_minor} minor units remain refundable")]
    Exceeds { refundable_minor: i64 },
    /// Releasing or settling more than is reserved: a programming error, never a merchant's.
    #[error("refund totals would become inconsistent")]
    Inconsistent,
}

impl RefundCeiling {
    pub fn new(paid_minor: i64) -> RefundCeiling {
        RefundCeiling {
            paid_minor,
            reserved_minor: 0,
            refunded_minor: 0,
        }
    }

    /// What a new refund may still take.
    pub fn refundable_minor(&self) -> i64 {
        self.paid_minor.saturating_sub(self.reserved_minor).max(0)
    }

    /// A new refund of `amount_minor`: reserved now, settled or released later.
    pub fn reserve(self, amount_minor: i64) -> Result<RefundCeiling, CeilingError> {
        if amount_minor <= 0 {
            return Err(CeilingError::NotPositive);
        }
        if amount_minor > self.refundable_minor() {
            return Err(CeilingError::Exceeds {
                refundable_minor: self.refundable_minor(),
            });
        }
        let reserved_minor = self
            .reserved_minor
            .checked_add(amount_minor)
            .ok_or(CeilingError::Inconsistent)?;
        Ok(RefundCeiling {
            reserved_minor,
            ..self
        })
    }

    /// A reserved refund failed: its amount is refundable again.
    pub fn release(self, amount_minor: i64) -> Result<RefundCeiling, CeilingError> {
        let reserved_minor = self
            .reserved_minor
            .checked_sub(amount_minor)
            .filter(|r| amount_minor > 0 && *r >= self.refunded_minor)
            .ok_or(CeilingError::Inconsistent)?;
        Ok(RefundCeiling {
            reserved_minor,
            ..self
        })
    }

    /// A reserved refund succeeded: its amount is refunded (and stays reserved).
    pub fn settle(self, amount_minor: i64) -> Result<RefundCeiling, CeilingError> {
        let refunded_minor = self
            .refunded_minor
            .checked_add(amount_minor)
            .filter(|r| amount_minor > 0 && *r <= self.reserved_minor)
            .ok_or(CeilingError::Inconsistent)?;
        Ok(RefundCeiling {
            refunded_minor,
            ..self
        })
    }

    /// `0 ≤ refunded ≤ reserved ≤ paid`: what storage also enforces with a CHECK constraint.
    pub fn is_consistent(&self) -> bool {
        0 <= self.refunded_minor
            && self.refunded_minor <= self.reserved_minor
            && self.reserved_minor <= self.paid_minor
    }
}

/// The refund rules of the channel that took the payment (its `Capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundRules {
    pub refund: bool,
    pub partial_refund: bool,
    /// How long after payment a refund is accepted.
    pub window_ms: i64,
    /// Most refunds on one payment, failed ones included (the conservative reading of WeChat's
    /// limit of 50), where the channel limits it.
    pub max_refunds: Option<u32>,
}

/// What the rules need to know about the payment being refunded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefundablePayment {
    pub status: PaymentStatus,
    pub amount: Money,
    pub ceiling: RefundCeiling,
    pub paid_at_ms: Option<i64>,
    /// Refunds recorded so far, failed ones included.
    pub refund_count: i64,
}

/// Why a refund request is refused. Nothing is written for any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefundRefusal {
    #[error("the payment is {0} and cannot be refunded; only succeeded payments can")]
    NotRefundable(PaymentStatus),
    #[error("the payment is in {payment}, the refund in {requested}")]
    CurrencyMismatch {
        payment: Currency,
        requested: Currency,
    },
    #[error("the channel of this payment has no refunds")]
    NotSupported,
    #[error("the channel of this payment refunds only the full amount")]
    PartialNotSupported,
    #[error("the channel accepts refunds only within {window_days} days of payment")]
    WindowExpired { window_days: i64 },
    #[error("the channel accepts at most {max} refunds per payment")]
    TooManyRefunds { max: u32 },
    #[error("amount exceeds the refundable amount of {refundable_minor} minor units")]
    ExceedsRefundable { refundable_minor: i64 },
    #[error("amount must be positive")]
    AmountInvalid,
}

const DAY_MS: i64 = 86_400_000;

/// Checks a refund request against the payment and the channel's rules, in the order a merchant
/// would fix them. Storage re-checks the status, currency, ceiling and count atomically in the
/// write; this gives the reason.
pub fn check_refund(
    payment: &RefundablePayment,
    rules: &RefundRules,
    amount: Money,
    now_ms: i64,
) -> Result<(), RefundRefusal> {
    if payment.status != PaymentStatus::Succeeded {
        return Err(RefundRefusal::NotRefundable(payment.status));
    }
    if amount.currency() != payment.amount.currency() {
        return Err(RefundRefusal::CurrencyMismatch {
            payment: payment.amount.currency(),
            requested: amount.currency(),
        });
    }
    if amount.amount_minor() <= 0 {
        return Err(RefundRefusal::AmountInvalid);
    }
    if !rules.refund {
        return Err(RefundRefusal::NotSupported);
    }
    if !rules.partial_refund && amount.amount_minor() != payment.amount.amount_minor() {
        return Err(RefundRefusal::PartialNotSupported);
    }
    let paid_at_ms = payment.paid_at_ms.unwrap_or(now_ms);
    if now_ms.saturating_sub(paid_at_ms) > rules.window_ms {
        return Err(RefundRefusal::WindowExpired {
            window_days: rules.window_ms.div_euclid(DAY_MS),
        });
    }
    if let Some(max) = rules.max_refunds {
        if payment.refund_count >= i64::from(max) {
            return Err(RefundRefusal::TooManyRefunds { max });
        }
    }
    match payment.ceiling.reserve(amount.amount_minor()) {
        Ok(_) => Ok(()),
        Err(CeilingError::Exceeds { refundable_minor }) => {
            Err(RefundRefusal::ExceedsRefundable { refundable_minor })
        }
        Err(CeilingError::NotPositive) => Err(RefundRefusal::AmountInvalid),
        Err(CeilingError::Inconsistent) => Err(RefundRefusal::ExceedsRefundable {
            refundable_minor: payment.ceiling.refundable_minor(),
        }),
    }
}

impl RefundRules {
    /// Days to milliseconds, saturating.
    pub fn window_ms_from_days(days: u32) -> i64 {
        i64::from(days).saturating_mul(DAY_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use RefundReport as R;
    use RefundStatus as S;

    #[test]
    fn decision_table() {
        let cases = [
            (S::Processing, R::Unknown, RefundDecision::NoChange),
            (S::Processing, R::Processing, RefundDecision::NoChange),
            (
                S::Processing,
                R::Succeeded,
                RefundDecision::Transition(S::Succeeded),
            ),
            (
                S::Processing,
                R::Failed,
                RefundDecision::Transition(S::Failed),
            ),
            (S::Succeeded, R::Succeeded, RefundDecision::NoChange),
            (S::Succeeded, R::Unknown, RefundDecision::NoChange),
            (S::Succeeded, R::Processing, RefundDecision::NoChange),
            (
                S::Succeeded,
                R::Failed,
                RefundDecision::Conflict {
                    current: S::Succeeded,
                    reported: "failed",
                },
            ),
            (S::Failed, R::Failed, RefundDecision::NoChange),
            (S::Failed, R::Unknown, RefundDecision::NoChange),
            (
                S::Failed,
                R::Succeeded,
                RefundDecision::Conflict {
                    current: S::Failed,
                    reported: "succeeded",
                },
            ),
        ];
        for (current, report, want) in cases {
            assert_eq!(decide(current, report), want, "{current} + {report:?}");
        }
    }

    #[test]
    fn whitelist_is_exactly_this() {
        let allowed = [(S::Processing, S::Succeeded), (S::Processing, S::Failed)];
        for from in S::ALL {
            for to in S::ALL {
                assert_eq!(
                    from.can_become(*to),
                    allowed.contains(&(*from, *to)),
                    "{from} -> {to}"
                );
            }
        }
        for from in S::ALL.iter().filter(|s| s.is_terminal()) {
            assert!(S::ALL.iter().all(|to| !from.can_become(*to)), "{from}");
        }
    }

    #[test]
    fn statuses_round_trip_through_strings() {
        for s in S::ALL {
            assert_eq!(S::parse(s.as_str()), Some(*s));
        }
        assert_eq!(S::parse("SUCCEEDED"), None);
        assert_eq!(S::parse("refunded"), None);
    }

    fn cny(minor: i64) -> Money {
        Money::new(minor, Currency::CNY)
    }

    fn paid(amount_minor: i64, reserved_minor: i64, refund_count: i64) -> RefundablePayment {
        RefundablePayment {
            status: PaymentStatus::Succeeded,
            amount: cny(amount_minor),
            ceiling: RefundCeiling {
                paid_minor: amount_minor,
                reserved_minor,
                refunded_minor: 0,
            },
            paid_at_ms: Some(1_000),
            refund_count,
        }
    }

    const RULES: RefundRules = RefundRules {
        refund: true,
        partial_refund: true,
        window_ms: 365 * DAY_MS,
        max_refunds: Some(50),
    };

    #[test]
    fn refund_checks_table() {
        let now = 2_000;
        let cases: Vec<(
            RefundablePayment,
            RefundRules,
            Money,
            Result<(), RefundRefusal>,
        )> = vec![
            (paid(1000, 0, 0), RULES, cny(1000), Ok(())),
            (paid(1000, 0, 0), RULES, cny(1), Ok(())),
            (paid(1000, 600, 3), RULES, cny(400), Ok(())),
            (
                paid(1000, 600, 3),
                RULES,
                cny(401),
                Err(RefundRefusal::ExceedsRefundable {
                    refundable_minor: 400,
                }),
            ),
            (
                paid(1000, 0, 0),
                RULES,
                cny(1001),
                Err(RefundRefusal::ExceedsRefundable {
                    refundable_minor: 1000,
                }),
            ),
            (
                paid(1000, 0, 0),
                RULES,
                cny(0),
                Err(RefundRefusal::AmountInvalid),
            ),
            (
                RefundablePayment {
                    status: PaymentStatus::Processing,
                    ..paid(1000, 0, 0)
                },
                RULES,
                cny(1),
                Err(RefundRefusal::NotRefundable(PaymentStatus::Processing)),
            ),
            (
                paid(1000, 0, 0),
                RULES,
                Money::new(1, Currency::USD),
                Err(RefundRefusal::CurrencyMismatch {
                    payment: Currency::CNY,
                    requested: Currency::USD,
                }),
            ),
            (
                paid(1000, 0, 0),
                RefundRules {
                    refund: false,
                    ..RULES
                },
                cny(1),
                Err(RefundRefusal::NotSupported),
            ),
            (
                paid(1000, 0, 0),
                RefundRules {
                    partial_refund: false,
                    ..RULES
                },
                cny(999),
                Err(RefundRefusal::PartialNotSupported),
            ),
            (
                paid(1000, 0, 0),
                RefundRules {
                    partial_refund: false,
                    ..RULES
                },
                cny(1000),
                Ok(()),
            ),
            (
                paid(1000, 0, 50),
                RULES,
                cny(1),
                Err(RefundRefusal::TooManyRefunds { max: 50 }),
            ),
            (paid(1000, 0, 49), RULES, cny(1), Ok(())),
            (
                paid(1000, 0, 0),
                RefundRules {
                    window_ms: 500,
                    ..RULES
                },
                cny(1),
                Err(RefundRefusal::WindowExpired { window_days: 0 }),
            ),
            (
                paid(1000, 0, 0),
                RefundRules {
                    window_ms: 1_000,
                    ..RULES
                },
                cny(1),
                Ok(()),
            ),
        ];
        for (i, (p, rules, amount, want)) in cases.into_iter().enumerate() {
            assert_eq!(check_refund(&p, &rules, amount, now), want, "case {i}");
        }
    }

    #[test]
    fn ceiling_operations_refuse_inconsistency() {
        let c = RefundCeiling::new(100);
        assert_eq!(c.reserve(0), Err(CeilingError::NotPositive));
        assert_eq!(
            c.reserve(101),
            Err(CeilingError::Exceeds {
                refundable_minor: 100
            })
        );
        let c = c.reserve(60).unwrap();
        assert_eq!(c.refundable_minor(), 40);
        assert_eq!(c.settle(61), Err(CeilingError::Inconsistent));
        assert_eq!(c.release(61), Err(CeilingError::Inconsistent));
        let c = c.settle(60).unwrap();
        assert_eq!(
            c.release(60),
            Err(CeilingError::Inconsistent),
            "a settled refund cannot be released"
        );
        assert_eq!(c.refundable_minor(), 40);
        assert!(c.is_consistent());
    }

    fn arb_report() -> impl Strategy<Value = RefundReport> {
        prop_oneof![
            Just(R::Succeeded),
            Just(R::Processing),
            Just(R::Failed),
            Just(R::Unknown)
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Request(i64),
        Answer(usize, RefundReport),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1i64..400).prop_map(Op::Request),
            (0usize..16, arb_report()).prop_map(|(i, r)| Op::Answer(i, r)),
        ]
    }

    proptest! {
        /// Any sequence of channel reports — duplicated, reordered, contradicting — leaves the
        /// refund at the first definite report, and unknowns never fail it.
        #[test]
        fn first_definite_answer_wins(reports in proptest::collection::vec(arb_report(), 0..40)) {
            let mut status = S::Processing;
            let mut first: Option<RefundStatus> = None;
            for r in &reports {
                match decide(status, *r) {
                    RefundDecision::Transition(next) => {
                        prop_assert!(status.can_become(next));
                        status = next;
                    }
                    RefundDecision::NoChange => {}
                    RefundDecision::Conflict { current, .. } => prop_assert!(current.is_terminal()),
                }
                if first.is_none() && r.is_definite() {
                    first = Some(status);
                }
            }
            match first {
                Some(s) => prop_assert_eq!(status, s),
                None => prop_assert_eq!(status, S::Processing),
            }
        }

        /// Invariant 7 as a model: refund requests (reserve) and channel answers applied through
        /// `decide` (settle or release) in any order never take the refunded or reserved total
        /// over the paid amount, and an amount is released only by a definite failure.
        #[test]
        fn refunds_never_exceed_the_payment(paid_minor in 1i64..2_000, ops in proptest::collection::vec(arb_op(), 0..80)) {
            let mut ceiling = RefundCeiling::new(paid_minor);
            let mut refunds: Vec<(i64, RefundStatus)> = Vec::new();
            for op in ops {
                match op {
                    Op::Request(amount) => {
                        let before = ceiling.refundable_minor();
                        match ceiling.reserve(amount) {
                            Ok(next) => {
                                prop_assert!(amount <= before);
                                ceiling = next;
                                refunds.push((amount, S::Processing));
                            }
                            Err(_) => prop_assert!(amount > before),
                        }
                    }
                    Op::Answer(i, report) => {
                        let Some(r) = refunds.get_mut(i) else { continue };
                        if let RefundDecision::Transition(next) = decide(r.1, report) {
                            ceiling = match next {
                                S::Succeeded => ceiling.settle(r.0).map_err(|e| TestCaseError::fail(e.to_string()))?,
                                S::Failed => {
                                    prop_assert_eq!(report, R::Failed);
                                    ceiling.release(r.0).map_err(|e| TestCaseError::fail(e.to_string()))?
                                }
                                S::Processing => ceiling,
                            };
                            r.1 = next;
                        }
                    }
                }
                prop_assert!(ceiling.is_consistent(), "{:?}", ceiling);
                let live: i64 = refunds.iter().filter(|r| r.1 != S::Failed).map(|r| r.0).sum();
                let done: i64 = refunds.iter().filter(|r| r.1 == S::Succeeded).map(|r| r.0).sum();
                prop_assert_eq!(live, ceiling.reserved_minor);
                prop_assert_eq!(done, ceiling.refunded_minor);
            }
        }
    }
}
