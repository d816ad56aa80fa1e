//! The payrail domain: money, identifiers, the payment, refund and payout state machines, request
//! signing, the validated inputs of the merchant API, and the ledger: accounts and entries,
//! posting rules, fee plans and settlement cycles.
//!
//! This crate does no I/O: no clock, no randomness, no network, no database. Time and random bytes
//! are passed in by the caller, so every rule here is deterministic and unit-testable.
#![cfg_attr(not(test), warn(clippy::arithmetic_side_effects))]

pub mod channel;
pub mod civil;
pub mod clearing;
pub mod clock;
pub mod fees;
pub mod id;
pub mod input;
pub mod ledger;
pub mod money;
pub mod payment;
pub mod payout;
pub mod posting_rules;
pub mod refund;
pub mod secret;
pub mod settlement;
pub mod signing;
pub mod webhook;

pub use channel::ChannelOutcome;
pub use clock::{Clock, ManualClock, SystemClock};
pub use id::{
    AppId, AttemptId, ChannelAccountId, EventId, FeePlanId, Id, IdKind, JobId, MerchantId,
    PaymentId, PayoutId, RefundId, SettlementId, TopUpId,
};
pub use money::{Currency, Money, MoneyError};
pub use payment::{AttemptStatus, PaymentStatus, TransitionError};
pub use payout::PayoutStatus;
pub use refund::RefundStatus;
pub use secret::Secret;
