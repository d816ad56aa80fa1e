//! The payout state machine (出款/提现): a merchant's available balance paid out to its bank.
//!
//! A payout is recorded `processing` — and its amount posted from `merchant_available` to
//! `payout_clearing` in the same write — before the bank is asked, because from the moment the
//! request may have been sent its outcome is unknown until the bank says otherwise. It ends
//! `paid` (the bank confirms the transfer) or `failed` (the bank definitely refused: account
//! closed, name mismatch, …; the amount goes back to the available balance by a reversing
//! entry). Both are final.
//!
//! The money rule is the one of payments and refunds: an unknown answer (timeout, 5xx, "not
//! found") never fails a payout. Failing it would hand the amount back to the merchant while the
//! bank may in fact be paying it out, and the merchant could then pay it out a second time.

use std::fmt;

/// Status of a payout as the merchant sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayoutStatus {
    Processing,
    Paid,
    Failed,
}

impl PayoutStatus {
    pub const ALL: &'static [PayoutStatus] = &[
        PayoutStatus::Processing,
        PayoutStatus::Paid,
        PayoutStatus::Failed,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            PayoutStatus::Processing => "processing",
            PayoutStatus::Paid => "paid",
            PayoutStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<PayoutStatus> {
        match s {
            "processing" => Some(PayoutStatus::Processing),
            "paid" => Some(PayoutStatus::Paid),
            "failed" => Some(PayoutStatus::Failed),
            _ => None,
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, PayoutStatus::Paid | PayoutStatus::Failed)
    }

    /// The whitelist. Everything not listed is refused.
    pub fn can_become(&self, to: PayoutStatus) -> bool {
        matches!(
            (self, to),
            (PayoutStatus::Processing, PayoutStatus::Paid)
                | (PayoutStatus::Processing, PayoutStatus::Failed)
        )
    }
}

impl fmt::Display for PayoutStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for PayoutStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What the payout bank said, reduced to what the state machine needs (the connector's
/// `PayoutOutcome` carries the details; the engine maps it onto this).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayoutReport {
    /// The bank confirms the transfer to the merchant's account.
    Paid,
    /// Accepted, not finished.
    Processing,
    /// The bank definitely refused this payout; nothing was transferred.
    Failed,
    /// Timeout, 5xx, bad signature, "not found".
    Unknown,
}

impl PayoutReport {
    pub fn label(&self) -> &'static str {
        match self {
            PayoutReport::Paid => "paid",
            PayoutReport::Processing => "processing",
            PayoutReport::Failed => "failed",
            PayoutReport::Unknown => "unknown",
        }
    }

    pub fn is_definite(&self) -> bool {
        matches!(self, PayoutReport::Paid | PayoutReport::Failed)
    }
}

/// What to do with a payout given a bank report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayoutDecision {
    Transition(PayoutStatus),
    /// Still open, still unknown, or the same definite answer again.
    NoChange,
    /// A definite answer contradicting the payout's final status: the status stays and an
    /// alert is raised (the first definite answer wins).
    Conflict {
        current: PayoutStatus,
        reported: &'static str,
    },
}

/// Applies a bank report to a payout's current status. Unknown and processing never change
/// anything; the first definite answer wins; a contradicting later one is a conflict.
pub fn decide(current: PayoutStatus, report: PayoutReport) -> PayoutDecision {
    let target = match report {
        PayoutReport::Unknown | PayoutReport::Processing => return PayoutDecision::NoChange,
        PayoutReport::Paid => PayoutStatus::Paid,
        PayoutReport::Failed => PayoutStatus::Failed,
    };
    if current == target {
        PayoutDecision::NoChange
    } else if current.can_become(target) {
        PayoutDecision::Transition(target)
    } else {
        PayoutDecision::Conflict {
            current,
            reported: report.label(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{AccountId, AccountKind, AccountState, Book, PostOutcome, Reject};
    use crate::money::{Currency, Money};
    use crate::posting_rules;
    use crate::MerchantId;
    use proptest::prelude::*;
    use PayoutReport as R;
    use PayoutStatus as S;

    #[test]
    fn decision_table() {
        let cases = [
            (S::Processing, R::Unknown, PayoutDecision::NoChange),
            (S::Processing, R::Processing, PayoutDecision::NoChange),
            (S::Processing, R::Paid, PayoutDecision::Transition(S::Paid)),
            (
                S::Processing,
                R::Failed,
                PayoutDecision::Transition(S::Failed),
            ),
            (S::Paid, R::Paid, PayoutDecision::NoChange),
            (S::Paid, R::Unknown, PayoutDecision::NoChange),
            (S::Paid, R::Processing, PayoutDecision::NoChange),
            (
                S::Paid,
                R::Failed,
                PayoutDecision::Conflict {
                    current: S::Paid,
                    reported: "failed",
                },
            ),
            (S::Failed, R::Failed, PayoutDecision::NoChange),
            (S::Failed, R::Unknown, PayoutDecision::NoChange),
            (S::Failed, R::Processing, PayoutDecision::NoChange),
            (
                S::Failed,
                R::Paid,
                PayoutDecision::Conflict {
                    current: S::Failed,
                    reported: "paid",
                },
            ),
        ];
        for (current, report, want) in cases {
            assert_eq!(decide(current, report), want, "{current} + {report:?}");
        }
    }

    #[test]
    fn whitelist_is_exactly_this() {
        let allowed = [(S::Processing, S::Paid), (S::Processing, S::Failed)];
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
        assert_eq!(S::parse("PAID"), None);
        assert_eq!(S::parse("succeeded"), None);
    }

    fn arb_report() -> impl Strategy<Value = PayoutReport> {
        prop_oneof![
            Just(R::Paid),
            Just(R::Processing),
            Just(R::Failed),
            Just(R::Unknown)
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A new payout of this many minor units.
        Request(i64),
        /// The bank's answer about the i-th payout.
        Answer(usize, PayoutReport),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1i64..400).prop_map(Op::Request),
            (0usize..16, arb_report()).prop_map(|(i, r)| Op::Answer(i, r)),
        ]
    }

    const T0: i64 = 1_750_000_000_000;

    proptest! {
        /// Any sequence of bank reports — duplicated, reordered, contradicting — leaves the
        /// payout at the first definite report, and unknowns never fail it.
        #[test]
        fn first_definite_answer_wins(reports in proptest::collection::vec(arb_report(), 0..40)) {
            let mut status = S::Processing;
            let mut first: Option<PayoutStatus> = None;
            for r in &reports {
                match decide(status, *r) {
                    PayoutDecision::Transition(next) => {
                        prop_assert!(status.can_become(next));
                        status = next;
                    }
                    PayoutDecision::NoChange => {}
                    PayoutDecision::Conflict { current, .. } => prop_assert!(current.is_terminal()),
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

        /// The payout path as a model, through the real `Book`: payouts (posted when recorded)
        /// and bank answers applied through `decide` (a failure posts the reversal) in any
        /// order never take the available balance below zero; available always equals the
        /// funding less every payout not failed, `payout_clearing` holds exactly those, a
        /// refused payout changes nothing, and the ledger sums to zero throughout.
        #[test]
        fn payouts_never_overdraw_and_failures_restore_the_balance(
            funded in 0i64..2_000,
            ops in proptest::collection::vec(arb_op(), 0..80),
        ) {
            let merchant = MerchantId::generate(T0 as u64, [3; 10]);
            let c = Currency::CNY;
            let available = AccountId::merchant_available(merchant, c);
            let clearing = AccountId::payout_clearing(merchant, c);
            let pending = AccountId::merchant_pending(merchant, c);
            let mut book = Book::default();
            for a in [&available, &clearing, &pending] {
                book.put_account(a.clone(), AccountState::new(a.kind().default_flags()));
            }
            let bal = |book: &Book, a: &AccountId, k: AccountKind| {
                book.account(a).map(|s| s.balance.posted_net(k.normal_side())).unwrap_or(0)
            };
            if funded > 0 {
                // Money reaches available through a settlement (pending → available), the
                // pending side first credited by a payment's posting set in real life.
                let day = crate::civil::Date::parse("2026-11-22").map_err(|e| TestCaseError::fail(e.to_string()))?;
                let s = posting_rules::settlement(merchant, day, Money::new(funded, c))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                // Let pending go negative for the model: open it without a limit.
                book.put_account(pending.clone(), AccountState::new(crate::ledger::AccountFlags::NONE));
                prop_assert!(matches!(book.post(&s, T0), Ok(PostOutcome::Posted(_))));
            }
            let mut payouts: Vec<(i64, PayoutStatus)> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Request(amount) => {
                        let before = bal(&book, &available, AccountKind::MerchantAvailable);
                        let id = format!("po_{n}");
                        let e = posting_rules::payout(&id, merchant, Money::new(amount, c))
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        match book.post(&e, T0) {
                            Ok(PostOutcome::Posted(_)) => {
                                prop_assert!(i128::from(amount) <= before);
                                payouts.push((amount, S::Processing));
                            }
                            Ok(PostOutcome::Rejected(Reject::ExceedsCredits(_))) => {
                                prop_assert!(i128::from(amount) > before);
                                prop_assert_eq!(bal(&book, &available, AccountKind::MerchantAvailable), before);
                            }
                            other => return Err(TestCaseError::fail(format!("{other:?}"))),
                        }
                    }
                    Op::Answer(i, report) => {
                        let Some(p) = payouts.get_mut(i) else { continue };
                        if let PayoutDecision::Transition(next) = decide(p.1, report) {
                            if next == S::Failed {
                                prop_assert_eq!(report, R::Failed);
                                let id = format!("po_{i}x");
                                let r = posting_rules::payout_reversal(&id, merchant, Money::new(p.0, c))
                                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                                prop_assert!(matches!(book.post(&r, T0), Ok(PostOutcome::Posted(_))));
                            }
                            p.1 = next;
                        }
                    }
                }
                let live: i64 = payouts.iter().filter(|p| p.1 != S::Failed).map(|p| p.0).sum();
                let avail = bal(&book, &available, AccountKind::MerchantAvailable);
                prop_assert!(avail >= 0);
                prop_assert_eq!(avail, i128::from(funded - live));
                prop_assert_eq!(bal(&book, &clearing, AccountKind::PayoutClearing), i128::from(live));
                prop_assert_eq!(book.net_by_currency().get(&c).copied().unwrap_or((0, 0)), (0, 0));
            }
        }
    }
}
