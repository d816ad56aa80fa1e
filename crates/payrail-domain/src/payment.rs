//! The payment and payment-attempt state machines.
//!
//! A payment is what the merchant asked for; an attempt is one submission of it to one channel.
//! Both move only along the whitelists below, and terminal states never change. Storage applies a
//! transition only if the row still has the version it was read at (optimistic lock), so two
//! writers racing on one payment cannot both win.

use crate::channel::ChannelOutcome;
use std::fmt;

macro_rules! status_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $s:literal),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $s),* }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s { $($s => Some($name::$variant),)* _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

status_enum! {
    /// Status of a payment as the merchant sees it.
    PaymentStatus {
        Created = "created",
        Processing = "processing",
        Succeeded = "succeeded",
        Failed = "failed",
        Closed = "closed",
        Cancelled = "cancelled",
    }
}

status_enum! {
    /// Status of one channel attempt.
    AttemptStatus {
        Pending = "pending",
        Processing = "processing",
        Succeeded = "succeeded",
        Failed = "failed",
        Closed = "closed",
        Cancelled = "cancelled",
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transition {from} -> {to} is not allowed")]
pub struct TransitionError {
    pub from: &'static str,
    pub to: &'static str,
}

impl PaymentStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            PaymentStatus::Succeeded
                | PaymentStatus::Failed
                | PaymentStatus::Closed
                | PaymentStatus::Cancelled
        )
    }

    /// The whitelist. Everything not listed is refused.
    pub fn can_become(&self, to: PaymentStatus) -> bool {
        use PaymentStatus::*;
        matches!(
            (self, to),
            (Created, Processing)
                | (Created, Succeeded)
                | (Created, Failed)
                | (Created, Closed)
                | (Created, Cancelled)
                | (Processing, Succeeded)
                | (Processing, Failed)
                | (Processing, Closed)
                | (Processing, Cancelled)
        )
    }

    pub fn transition(&self, to: PaymentStatus) -> Result<PaymentStatus, TransitionError> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(TransitionError {
                from: self.as_str(),
                to: to.as_str(),
            })
        }
    }

    /// True if the merchant may still ask to close the payment.
    pub fn is_closable(&self) -> bool {
        matches!(self, PaymentStatus::Created | PaymentStatus::Processing)
    }
}

impl AttemptStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            AttemptStatus::Succeeded
                | AttemptStatus::Failed
                | AttemptStatus::Closed
                | AttemptStatus::Cancelled
        )
    }

    /// The whitelist. `Pending` is an attempt recorded but not yet sent; once sent it is
    /// `Processing` until a definite channel answer.
    pub fn can_become(&self, to: AttemptStatus) -> bool {
        use AttemptStatus::*;
        matches!(
            (self, to),
            (Pending, Processing)
                | (Pending, Succeeded)
                | (Pending, Failed)
                | (Processing, Succeeded)
                | (Processing, Failed)
                | (Processing, Closed)
                | (Processing, Cancelled)
        )
    }

    /// The payment status that an attempt in this status implies, for a payment whose only
    /// live attempt it is.
    pub fn payment_status(&self) -> PaymentStatus {
        match self {
            AttemptStatus::Pending => PaymentStatus::Created,
            AttemptStatus::Processing => PaymentStatus::Processing,
            AttemptStatus::Succeeded => PaymentStatus::Succeeded,
            AttemptStatus::Failed => PaymentStatus::Failed,
            AttemptStatus::Closed => PaymentStatus::Closed,
            AttemptStatus::Cancelled => PaymentStatus::Cancelled,
        }
    }
}

/// What to do with an attempt given a channel outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Move the attempt to this status.
    Transition(AttemptStatus),
    /// Nothing to change: still open, still unknown, or the same definite answer again.
    NoChange,
    /// A definite answer that contradicts the attempt's terminal status. The status stays; an
    /// alert is raised (first definite result wins).
    Conflict {
        current: AttemptStatus,
        reported: &'static str,
    },
}

/// Applies a channel outcome to an attempt's current status.
///
/// - Unknown never changes anything: unknown is not failure.
/// - The first definite result wins; a later contradicting one is a [`Decision::Conflict`].
pub fn decide(current: AttemptStatus, outcome: &ChannelOutcome) -> Decision {
    let target = match outcome {
        ChannelOutcome::Unknown { .. } => return Decision::NoChange,
        ChannelOutcome::Processing { .. } => {
            return if current == AttemptStatus::Pending {
                Decision::Transition(AttemptStatus::Processing)
            } else {
                Decision::NoChange
            };
        }
        ChannelOutcome::Succeeded { .. } => AttemptStatus::Succeeded,
        ChannelOutcome::Failed { .. } => AttemptStatus::Failed,
        ChannelOutcome::Closed => AttemptStatus::Closed,
        ChannelOutcome::Cancelled => AttemptStatus::Cancelled,
    };
    if current == target {
        return Decision::NoChange;
    }
    if current.is_terminal() {
        return Decision::Conflict {
            current,
            reported: outcome.label(),
        };
    }
    if current.can_become(target) {
        Decision::Transition(target)
    } else if current == AttemptStatus::Pending {
        // A pending attempt was never confirmed as received; closing/cancelling it goes through
        // processing first. Both steps are whitelisted, so report the end state.
        Decision::Transition(target)
    } else {
        Decision::Conflict {
            current,
            reported: outcome.label(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use AttemptStatus as A;

    fn ok() -> ChannelOutcome {
        ChannelOutcome::Succeeded {
            channel_trade_no: Some("t1".into()),
            paid_at_ms: None,
        }
    }
    fn fail() -> ChannelOutcome {
        ChannelOutcome::Failed {
            code: "DECLINED".into(),
            message: "no".into(),
        }
    }
    fn unknown() -> ChannelOutcome {
        ChannelOutcome::unknown("timeout")
    }
    fn processing() -> ChannelOutcome {
        ChannelOutcome::Processing {
            channel_trade_no: None,
        }
    }

    #[test]
    fn decision_table() {
        let cases: Vec<(A, ChannelOutcome, Decision)> = vec![
            (A::Pending, ok(), Decision::Transition(A::Succeeded)),
            (A::Pending, fail(), Decision::Transition(A::Failed)),
            (A::Pending, unknown(), Decision::NoChange),
            (
                A::Pending,
                processing(),
                Decision::Transition(A::Processing),
            ),
            (A::Processing, unknown(), Decision::NoChange),
            (A::Processing, processing(), Decision::NoChange),
            (A::Processing, ok(), Decision::Transition(A::Succeeded)),
            (A::Processing, fail(), Decision::Transition(A::Failed)),
            (
                A::Processing,
                ChannelOutcome::Closed,
                Decision::Transition(A::Closed),
            ),
            (
                A::Processing,
                ChannelOutcome::Cancelled,
                Decision::Transition(A::Cancelled),
            ),
            (A::Succeeded, ok(), Decision::NoChange),
            (A::Succeeded, unknown(), Decision::NoChange),
            (A::Succeeded, processing(), Decision::NoChange),
            (
                A::Succeeded,
                fail(),
                Decision::Conflict {
                    current: A::Succeeded,
                    reported: "failed",
                },
            ),
            (
                A::Succeeded,
                ChannelOutcome::Closed,
                Decision::Conflict {
                    current: A::Succeeded,
                    reported: "closed",
                },
            ),
            (
                A::Failed,
                ok(),
                Decision::Conflict {
                    current: A::Failed,
                    reported: "succeeded",
                },
            ),
            (
                A::Closed,
                ok(),
                Decision::Conflict {
                    current: A::Closed,
                    reported: "succeeded",
                },
            ),
            (A::Closed, ChannelOutcome::Closed, Decision::NoChange),
        ];
        for (current, outcome, want) in cases {
            assert_eq!(decide(current, &outcome), want, "{current} + {outcome:?}");
        }
    }

    #[test]
    fn payment_whitelist_is_exactly_this() {
        use PaymentStatus::*;
        let allowed = [
            (Created, Processing),
            (Created, Succeeded),
            (Created, Failed),
            (Created, Closed),
            (Created, Cancelled),
            (Processing, Succeeded),
            (Processing, Failed),
            (Processing, Closed),
            (Processing, Cancelled),
        ];
        for from in PaymentStatus::ALL {
            for to in PaymentStatus::ALL {
                let want = allowed.contains(&(*from, *to));
                assert_eq!(from.can_become(*to), want, "{from} -> {to}");
                assert_eq!(from.transition(*to).is_ok(), want);
            }
        }
    }

    /// Regression (review of the foundation): `decide` moved a pending attempt to cancelled, but
    /// the payment whitelist had no created -> cancelled, so applying it would have failed.
    /// Every attempt transition `decide` can produce must be a payment transition too.
    #[test]
    fn every_decision_is_a_whitelisted_payment_transition() {
        let outcomes = [
            ok(),
            fail(),
            unknown(),
            processing(),
            ChannelOutcome::Closed,
            ChannelOutcome::Cancelled,
        ];
        for from in AttemptStatus::ALL {
            for outcome in &outcomes {
                if let Decision::Transition(to) = decide(*from, outcome) {
                    let (p_from, p_to) = (from.payment_status(), to.payment_status());
                    assert!(
                        p_from == p_to || p_from.can_become(p_to),
                        "attempt {from} -> {to} needs payment {p_from} -> {p_to}"
                    );
                }
            }
        }
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for from in PaymentStatus::ALL.iter().filter(|s| s.is_terminal()) {
            assert!(
                PaymentStatus::ALL.iter().all(|to| !from.can_become(*to)),
                "{from}"
            );
        }
        for from in AttemptStatus::ALL.iter().filter(|s| s.is_terminal()) {
            assert!(
                AttemptStatus::ALL.iter().all(|to| !from.can_become(*to)),
                "{from}"
            );
        }
    }

    #[test]
    fn statuses_round_trip_through_strings() {
        for s in PaymentStatus::ALL {
            assert_eq!(PaymentStatus::parse(s.as_str()), Some(*s));
        }
        for s in AttemptStatus::ALL {
            assert_eq!(AttemptStatus::parse(s.as_str()), Some(*s));
        }
        assert_eq!(PaymentStatus::parse("SUCCEEDED"), None);
    }

    fn arb_outcome() -> impl Strategy<Value = ChannelOutcome> {
        prop_oneof![
            Just(ok()),
            Just(fail()),
            Just(unknown()),
            Just(processing()),
            Just(ChannelOutcome::Closed),
            Just(ChannelOutcome::Cancelled),
        ]
    }

    proptest! {
        /// Any sequence of channel answers — duplicated, reordered, contradicting — leaves the
        /// attempt at the first definite answer, and unknowns never make it fail.
        #[test]
        fn first_definite_answer_wins(outcomes in proptest::collection::vec(arb_outcome(), 0..40)) {
            let mut status = A::Pending;
            let mut first_definite: Option<AttemptStatus> = None;
            for o in &outcomes {
                match decide(status, o) {
                    Decision::Transition(next) => {
                        prop_assert!(!status.is_terminal());
                        status = next;
                    }
                    Decision::NoChange => {}
                    Decision::Conflict { current, .. } => prop_assert!(current.is_terminal()),
                }
                if first_definite.is_none() && o.is_definite() {
                    first_definite = Some(status);
                }
            }
            match first_definite {
                Some(s) => prop_assert_eq!(status, s),
                None => prop_assert!(matches!(status, A::Pending | A::Processing)),
            }
        }
    }
}
