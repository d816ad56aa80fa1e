//! Payout banks (代付): the connector that transfers a merchant's payout to its bank account, and
//! the sandbox bank, the only one built so far.
//!
//! A payout connector is asked to `send` a payout and to `query` it, with our payout id as the
//! bank's request number: a bank paying out must treat a repeated request number as the same
//! transfer (every 代付 interface does), so the engine may send again after an unknown answer.
//! Answers are mapped conservatively, as for payments: only an explicit business rejection is
//! `Failed`; timeouts, 5xx, malformed answers and "not found" are `Unknown`.
//!
//! Where the money goes is not part of the request: a payout goes to the merchant's own
//! settlement account, which an operator registers (planned), never to an account named in an
//! API call — an API key alone must not be able to send money elsewhere. The sandbox needs none.

use async_trait::async_trait;
use payrail_domain::{Clock, MerchantId, Money, PayoutId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Send or query one payout.
#[derive(Debug, Clone)]
pub struct PayoutRequest {
    /// Our payout id: the bank's request number (idempotent there).
    pub payout_id: PayoutId,
    pub merchant_id: MerchantId,
    pub amount: Money,
    /// The transfer's remark (附言), where the bank takes one.
    pub description: Option<String>,
    /// When the payout was recorded; repeats and queries pass the same value.
    pub requested_at_ms: i64,
}

/// What a bank said about a payout, after the connector's conservative mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayoutOutcome {
    /// The bank confirms the transfer to the merchant's account.
    Paid {
        bank_reference: Option<String>,
        paid_at_ms: Option<i64>,
    },
    /// Accepted, not finished: query again later.
    Processing { bank_reference: Option<String> },
    /// The bank definitely refused this payout; nothing was transferred.
    Failed { code: String, message: String },
    /// We do not know (timeout, 5xx, bad signature, "not found"). Never give the amount back on
    /// this: query, or send the same request again.
    Unknown { reason: String },
}

impl PayoutOutcome {
    pub fn unknown(reason: impl Into<String>) -> PayoutOutcome {
        PayoutOutcome::Unknown {
            reason: reason.into(),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            PayoutOutcome::Paid { .. } => "paid",
            PayoutOutcome::Processing { .. } => "processing",
            PayoutOutcome::Failed { .. } => "failed",
            PayoutOutcome::Unknown { .. } => "unknown",
        }
    }
}

/// A bank that pays out to merchants' accounts.
#[async_trait]
pub trait PayoutConnector: Send + Sync + 'static {
    /// Stable name, stored on payouts and used in metrics: `sandbox_bank`, …
    fn name(&self) -> &'static str;
    /// Asks the bank to transfer the payout. Sending the same payout id again is the same
    /// transfer at the bank.
    async fn send(&self, req: &PayoutRequest) -> PayoutOutcome;
    /// Asks the bank what became of the payout.
    async fn query(&self, req: &PayoutRequest) -> PayoutOutcome;
}

/// The sandbox bank's answers: the last two digits of the amount in minor units pick the script
/// (docs/sandbox.md, "Payouts").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// Pays at once.
    Pay,
    /// `01`: refuses at once — the merchant's account is closed.
    AccountClosed,
    /// `05`: accepts (processing), then the first query finds it refused: the account name
    /// does not match.
    ProcessingThenNameMismatch,
    /// `06`: the send answers HTTP 503 and the first [`SANDBOX_BANK_UNKNOWN_QUERIES`] queries
    /// time out (unknown); the next query finds it paid.
    UnknownThenPay,
}

fn script(amount: Money) -> Script {
    match amount.amount_minor().rem_euclid(100) {
        1 => Script::AccountClosed,
        5 => Script::ProcessingThenNameMismatch,
        6 => Script::UnknownThenPay,
        _ => Script::Pay,
    }
}

/// Queries of a `06` payout that answer unknown before one finds it paid.
pub const SANDBOX_BANK_UNKNOWN_QUERIES: u32 = 2;
/// Most payouts the sandbox bank remembers; beyond it, it forgets them all at once (and answers
/// "not found" — unknown — until they are sent again).
const REMEMBERED_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct BankPayout {
    amount: Money,
    sent_at_ms: i64,
    queries: u32,
}

/// The sandbox payout bank: no network, the amount chooses the answer. It remembers what was
/// sent in memory (bounded, forgotten on restart: a query then says "not found", which is
/// unknown, and the engine sends the payout again — the same transfer at the bank).
pub struct SandboxBank {
    clock: Arc<dyn Clock>,
    sent: Mutex<HashMap<PayoutId, BankPayout>>,
}

impl SandboxBank {
    pub fn new(clock: Arc<dyn Clock>) -> SandboxBank {
        SandboxBank {
            clock,
            sent: Mutex::new(HashMap::new()),
        }
    }

    fn reference(id: &PayoutId) -> Option<String> {
        Some(format!("sbk_{id}"))
    }

    /// The answer to a query of a payout the bank has: counts the query.
    fn answer(&self, id: &PayoutId, p: &mut BankPayout) -> PayoutOutcome {
        p.queries = p.queries.saturating_add(1);
        match script(p.amount) {
            Script::Pay => PayoutOutcome::Paid {
                bank_reference: Self::reference(id),
                paid_at_ms: Some(p.sent_at_ms),
            },
            Script::AccountClosed => closed(),
            Script::ProcessingThenNameMismatch => PayoutOutcome::Failed {
                code: "account_name_mismatch".into(),
                message: "sandbox bank: the account holder's name does not match the merchant"
                    .into(),
            },
            Script::UnknownThenPay if p.queries <= SANDBOX_BANK_UNKNOWN_QUERIES => {
                PayoutOutcome::unknown("sandbox bank: query timed out")
            }
            Script::UnknownThenPay => PayoutOutcome::Paid {
                bank_reference: Self::reference(id),
                paid_at_ms: Some(self.clock.now_ms()),
            },
        }
    }
}

fn closed() -> PayoutOutcome {
    PayoutOutcome::Failed {
        code: "account_closed".into(),
        message: "sandbox bank: the merchant's bank account is closed".into(),
    }
}

#[async_trait]
impl PayoutConnector for SandboxBank {
    fn name(&self) -> &'static str {
        "sandbox_bank"
    }

    async fn send(&self, req: &PayoutRequest) -> PayoutOutcome {
        let Ok(mut sent) = self.sent.lock() else {
            return PayoutOutcome::unknown("sandbox bank: unavailable");
        };
        if let Some(p) = sent.get_mut(&req.payout_id) {
            if p.amount != req.amount {
                // A bank refuses a repeated request number with other content; that refusal
                // says nothing about the first request, so it is not a failure of the payout.
                return PayoutOutcome::unknown(
                    "sandbox bank: request number reused with another amount",
                );
            }
            // The same request number again: the same transfer; answered like a query.
            return self.answer(&req.payout_id, p);
        }
        if sent.len() >= REMEMBERED_MAX {
            sent.clear();
        }
        let now = self.clock.now_ms();
        sent.insert(
            req.payout_id,
            BankPayout {
                amount: req.amount,
                sent_at_ms: now,
                queries: 0,
            },
        );
        match script(req.amount) {
            Script::Pay => PayoutOutcome::Paid {
                bank_reference: Self::reference(&req.payout_id),
                paid_at_ms: Some(now),
            },
            Script::AccountClosed => closed(),
            Script::ProcessingThenNameMismatch => PayoutOutcome::Processing {
                bank_reference: Self::reference(&req.payout_id),
            },
            Script::UnknownThenPay => PayoutOutcome::unknown("sandbox bank: HTTP 503"),
        }
    }

    async fn query(&self, req: &PayoutRequest) -> PayoutOutcome {
        let Ok(mut sent) = self.sent.lock() else {
            return PayoutOutcome::unknown("sandbox bank: unavailable");
        };
        match sent.get_mut(&req.payout_id) {
            Some(p) => self.answer(&req.payout_id, p),
            None => PayoutOutcome::unknown("sandbox bank: payout not found"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use payrail_domain::{Currency, ManualClock};

    fn req(minor: i64, n: u8) -> PayoutRequest {
        PayoutRequest {
            payout_id: PayoutId::generate(1, [n; 10]),
            merchant_id: MerchantId::generate(1, [9; 10]),
            amount: Money::new(minor, Currency::CNY),
            description: None,
            requested_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn scripts_by_amount() {
        let clock = Arc::new(ManualClock::new(5_000));
        let bank = SandboxBank::new(clock);
        // Anything else: paid at once, and a query or repeat says paid.
        let r = req(3_000, 1);
        assert_eq!(bank.query(&r).await.label(), "unknown", "not sent yet");
        assert_eq!(bank.send(&r).await.label(), "paid");
        assert_eq!(bank.send(&r).await.label(), "paid");
        assert_eq!(bank.query(&r).await.label(), "paid");
        // 01: account closed, definitely.
        let r = req(2_001, 2);
        assert!(
            matches!(bank.send(&r).await, PayoutOutcome::Failed { code, .. } if code == "account_closed")
        );
        assert_eq!(bank.query(&r).await.label(), "failed");
        // 05: accepted, then refused at the first query.
        let r = req(2_005, 3);
        assert_eq!(bank.send(&r).await.label(), "processing");
        assert!(
            matches!(bank.query(&r).await, PayoutOutcome::Failed { code, .. } if code == "account_name_mismatch")
        );
        // 06: 503, two unknown queries, then paid.
        let r = req(2_006, 4);
        assert_eq!(bank.send(&r).await.label(), "unknown");
        assert_eq!(bank.query(&r).await.label(), "unknown");
        assert_eq!(bank.query(&r).await.label(), "unknown");
        assert_eq!(bank.query(&r).await.label(), "paid");
        // The same request number with another amount proves nothing about the first.
        let other = PayoutRequest {
            amount: Money::new(999, Currency::CNY),
            ..r
        };
        assert_eq!(bank.send(&other).await.label(), "unknown");
    }
}
