//! The sandbox channel: no network, outcome chosen by the amount, like test card numbers.
//!
//! The last two digits of the amount in minor units pick the script (docs/sandbox.md):
//!
//! | amount ends in | behaviour |
//! |---|---|
//! | `01` | definite failure at submit (`insufficient_funds`) |
//! | `02` | processing (payer has not confirmed); paid `PENDING_MS` after submission |
//! | `03` | submit hangs past every timeout (outcome unknown); the channel did take the money, so the first query succeeds |
//! | `04` | processing and never paid: expires and is closed |
//! | `05` | processing, then fails definitely `PENDING_MS` after submission |
//! | `06` | submit answers 5xx (unknown); queries say "order not found" for `PENDING_MS`, then paid |
//! | anything else | succeeds at once |
//!
//! Payment answers are a function of the amount, the submission time and the clock, so they are
//! the same after a restart. Closes, cancels and refunds are remembered in memory (bounded).
//!
//! Cancel voids the order (paid: refunded in full); an attempt amount ending in `07` answers
//! "retry" to the first cancel. Refunds are checked against what was paid and already refunded;
//! a refund amount ending in `06` answers 5xx (unknown) although the refund was made, so a
//! refund query then says succeeded; one ending in `02` stays processing for `PENDING_MS`.

use crate::*;
use payrail_domain::Clock;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// How long scripted "processing" orders stay open before their scripted end.
pub const PENDING_MS: i64 = 3_000;

pub struct Sandbox {
    clock: Arc<dyn Clock>,
    /// How long the `03` script hangs; longer than any sensible channel timeout.
    hang: Duration,
    /// Orders closed here: a real channel never lets a closed order be paid, so neither does
    /// the sandbox. Kept in memory (forgotten on restart) and bounded.
    closed: Mutex<HashSet<AttemptId>>,
    /// Cancels answered per attempt (the `07` script's first one says "retry").
    cancels: Mutex<HashMap<AttemptId, u32>>,
    /// Refunds made: refund id → (attempt, amount, made at).
    refunds: Mutex<HashMap<RefundId, SandboxRefund>>,
}

#[derive(Debug, Clone, Copy)]
struct SandboxRefund {
    attempt_id: AttemptId,
    amount: Money,
    at_ms: i64,
}

/// Most closed orders the sandbox remembers; beyond it the oldest knowledge is dropped at once.
const CLOSED_REMEMBERED_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Succeed,
    Decline,
    PendingThenSucceed,
    HangThenSucceeded,
    NeverPaid,
    PendingThenFail,
    ServerErrorThenNotFound,
}

fn script(amount: Money) -> Script {
    match amount.amount_minor().rem_euclid(100) {
        1 => Script::Decline,
        2 => Script::PendingThenSucceed,
        3 => Script::HangThenSucceeded,
        4 => Script::NeverPaid,
        5 => Script::PendingThenFail,
        6 => Script::ServerErrorThenNotFound,
        _ => Script::Succeed,
    }
}

impl Sandbox {
    pub fn new(clock: Arc<dyn Clock>) -> Sandbox {
        Sandbox {
            clock,
            hang: Duration::from_secs(120),
            closed: Mutex::new(HashSet::new()),
            cancels: Mutex::new(HashMap::new()),
            refunds: Mutex::new(HashMap::new()),
        }
    }

    fn trade_no(attempt: &AttemptId) -> String {
        format!("sbx_{attempt}")
    }

    fn paid(&self, attempt: &AttemptId, paid_at_ms: i64) -> ChannelOutcome {
        ChannelOutcome::Succeeded {
            channel_trade_no: Some(Self::trade_no(attempt)),
            paid_at_ms: Some(paid_at_ms),
        }
    }

    /// The status the channel would report now for an order submitted at `submitted_at_ms`.
    fn is_closed(&self, attempt: &AttemptId) -> bool {
        self.closed
            .lock()
            .map(|c| c.contains(attempt))
            .unwrap_or(false)
    }

    fn remember_closed(&self, attempt: AttemptId) {
        if let Ok(mut closed) = self.closed.lock() {
            if closed.len() >= CLOSED_REMEMBERED_MAX {
                closed.clear();
            }
            closed.insert(attempt);
        }
    }

    fn refund_outcome(&self, r: &SandboxRefund) -> RefundOutcome {
        let done_at = r.at_ms.saturating_add(PENDING_MS);
        let pending = r.amount.amount_minor().rem_euclid(100) == 2 && self.clock.now_ms() < done_at;
        if pending {
            RefundOutcome::Processing {
                channel_refund_no: None,
            }
        } else {
            RefundOutcome::Succeeded {
                channel_refund_no: Some(format!("sbx_r_{}", r.attempt_id)),
                refunded_at_ms: Some(r.at_ms),
            }
        }
    }

    fn status_now(&self, req: &QueryRequest) -> ChannelOutcome {
        if self.is_closed(&req.attempt_id) {
            return ChannelOutcome::Closed;
        }
        let now = self.clock.now_ms();
        let settled_at = req.submitted_at_ms.saturating_add(PENDING_MS);
        let open = ChannelOutcome::Processing {
            channel_trade_no: Some(Self::trade_no(&req.attempt_id)),
        };
        match script(req.amount) {
            Script::Succeed | Script::HangThenSucceeded => {
                self.paid(&req.attempt_id, req.submitted_at_ms)
            }
            Script::Decline => ChannelOutcome::Failed {
                code: "insufficient_funds".into(),
                message: "sandbox: the payer's balance is insufficient".into(),
            },
            Script::PendingThenSucceed if now >= settled_at => {
                self.paid(&req.attempt_id, settled_at)
            }
            Script::PendingThenSucceed | Script::NeverPaid => open,
            Script::PendingThenFail if now >= settled_at => ChannelOutcome::Failed {
                code: "payer_cancelled".into(),
                message: "sandbox: the payer cancelled in the wallet".into(),
            },
            Script::PendingThenFail => open,
            Script::ServerErrorThenNotFound if now >= settled_at => {
                self.paid(&req.attempt_id, settled_at)
            }
            Script::ServerErrorThenNotFound => ChannelOutcome::unknown("sandbox: ORDER_NOT_EXIST"),
        }
    }
}

#[async_trait]
impl Connector for Sandbox {
    fn name(&self) -> &'static str {
        "sandbox"
    }

    fn supports(&self, method: PaymentMethod) -> bool {
        method == PaymentMethod::Sandbox
    }

    async fn submit(&self, req: &SubmitRequest) -> SubmitResponse {
        let q = QueryRequest {
            attempt_id: req.attempt_id,
            amount: req.amount,
            channel_trade_no: None,
            submitted_at_ms: req.submitted_at_ms,
            expires_at_ms: req.expires_at_ms,
        };
        let outcome = match script(req.amount) {
            Script::HangThenSucceeded => {
                tokio::time::sleep(self.hang).await;
                ChannelOutcome::unknown("sandbox: no answer")
            }
            Script::ServerErrorThenNotFound => ChannelOutcome::unknown("sandbox: HTTP 503"),
            _ => self.status_now(&q),
        };
        let next_action = matches!(outcome, ChannelOutcome::Processing { .. }).then(|| {
            NextAction::DisplayQrCode {
                code_url: format!("sandbox://pay/{}", req.attempt_id),
            }
        });
        SubmitResponse {
            outcome,
            next_action,
        }
    }

    async fn query(&self, req: &QueryRequest) -> ChannelOutcome {
        self.status_now(req)
    }

    async fn close(&self, req: &QueryRequest) -> ChannelOutcome {
        match self.status_now(req) {
            // Paid before the close arrived: the channel refuses and says so.
            paid @ ChannelOutcome::Succeeded { .. } => paid,
            failed @ ChannelOutcome::Failed { .. } => failed,
            // "Not found": nothing to close, and we cannot prove it is closed.
            unknown @ ChannelOutcome::Unknown { .. } => unknown,
            _ => {
                self.remember_closed(req.attempt_id);
                ChannelOutcome::Closed
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            methods: vec![MethodCapability {
                method: PaymentMethod::Sandbox,
                close: true,
                cancel: true,
                notifies: false,
            }],
            refund: true,
            partial_refund: true,
            refund_window_days: 365,
            max_refunds_per_payment: None,
            cancel_window_ms: Some(24 * 3600 * 1000),
            refund_query_delay_ms: 0,
            bills: false,
            close_confirm_delay_ms: 0,
        }
    }

    async fn cancel(&self, req: &QueryRequest) -> CancelOutcome {
        let calls = self
            .cancels
            .lock()
            .map(|mut c| {
                if c.len() >= CLOSED_REMEMBERED_MAX {
                    c.clear();
                }
                let n = c.entry(req.attempt_id).or_insert(0);
                *n = n.saturating_add(1);
                *n
            })
            .unwrap_or(1);
        if req.amount.amount_minor().rem_euclid(100) == 7 && calls == 1 {
            return CancelOutcome::Retry {
                reason: "sandbox: retry_flag=Y".into(),
            };
        }
        let refunded = match self.status_now(req) {
            ChannelOutcome::Unknown { reason } => return CancelOutcome::Unknown { reason },
            ChannelOutcome::Succeeded { .. } => true,
            _ => false,
        };
        self.remember_closed(req.attempt_id);
        CancelOutcome::Cancelled {
            refunded: Some(refunded),
        }
    }

    async fn refund(&self, req: &RefundRequest) -> RefundOutcome {
        let q = QueryRequest {
            attempt_id: req.attempt_id,
            amount: req.payment_amount,
            channel_trade_no: None,
            submitted_at_ms: req.attempt_id.unix_ms() as i64,
            expires_at_ms: i64::MAX,
        };
        if !matches!(self.status_now(&q), ChannelOutcome::Succeeded { .. }) {
            return RefundOutcome::Failed {
                code: "trade_not_paid".into(),
                message: "sandbox: only a paid order can be refunded".into(),
            };
        }
        let Ok(mut refunds) = self.refunds.lock() else {
            return RefundOutcome::unknown("sandbox: state poisoned");
        };
        if let Some(existing) = refunds.get(&req.refund_id).copied() {
            if existing.amount != req.refund_amount || existing.attempt_id != req.attempt_id {
                return RefundOutcome::Failed {
                    code: "discordant_repeat_request".into(),
                    message: "sandbox: same refund id, different refund".into(),
                };
            }
            return self.refund_outcome(&existing);
        }
        let already = refunds
            .values()
            .filter(|r| r.attempt_id == req.attempt_id)
            .try_fold(Money::zero(req.payment_amount.currency()), |acc, r| {
                acc.checked_add(r.amount)
            });
        let remaining = already.and_then(|a| req.payment_amount.checked_sub(a));
        match remaining {
            Ok(rest)
                if req.refund_amount.amount_minor() > 0
                    && req.refund_amount.currency() == rest.currency()
                    && req.refund_amount.amount_minor() <= rest.amount_minor() => {}
            _ => {
                return RefundOutcome::Failed {
                    code: "refund_amount_exceeds".into(),
                    message: "sandbox: more than the refundable amount".into(),
                }
            }
        }
        if refunds.len() >= CLOSED_REMEMBERED_MAX {
            refunds.clear();
        }
        let r = SandboxRefund {
            attempt_id: req.attempt_id,
            amount: req.refund_amount,
            at_ms: self.clock.now_ms(),
        };
        refunds.insert(req.refund_id, r);
        if req.refund_amount.amount_minor().rem_euclid(100) == 6 {
            return RefundOutcome::unknown("sandbox: HTTP 503");
        }
        self.refund_outcome(&r)
    }

    async fn query_refund(&self, req: &RefundRequest) -> RefundOutcome {
        let found = self
            .refunds
            .lock()
            .ok()
            .and_then(|r| r.get(&req.refund_id).copied());
        match found {
            Some(r) => self.refund_outcome(&r),
            None => RefundOutcome::unknown("sandbox: refund not found"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payrail_domain::{Currency, ManualClock};

    fn req(amount_minor: i64, submitted_at_ms: i64) -> QueryRequest {
        QueryRequest {
            // Distinct orders get distinct ids (the sandbox remembers closes per id).
            attempt_id: AttemptId::generate(submitted_at_ms as u64, {
                let mut r = [0u8; 10];
                r[..8].copy_from_slice(&amount_minor.to_be_bytes());
                r
            }),
            amount: Money::new(amount_minor, Currency::CNY),
            channel_trade_no: None,
            submitted_at_ms,
            expires_at_ms: submitted_at_ms.saturating_add(1_800_000),
        }
    }

    #[tokio::test]
    async fn scripts_follow_the_documented_table() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let sbx = Sandbox::new(clock.clone());
        let t0 = 1_000_000;
        assert_eq!(sbx.query(&req(1000, t0)).await.label(), "succeeded");
        assert_eq!(sbx.query(&req(1001, t0)).await.label(), "failed");
        assert_eq!(sbx.query(&req(1002, t0)).await.label(), "processing");
        assert_eq!(sbx.query(&req(1003, t0)).await.label(), "succeeded");
        assert_eq!(sbx.query(&req(1004, t0)).await.label(), "processing");
        assert_eq!(sbx.query(&req(1005, t0)).await.label(), "processing");
        assert_eq!(sbx.query(&req(1006, t0)).await.label(), "unknown");
        clock.advance_ms(PENDING_MS);
        assert_eq!(sbx.query(&req(1002, t0)).await.label(), "succeeded");
        assert_eq!(sbx.query(&req(1004, t0)).await.label(), "processing");
        assert_eq!(sbx.query(&req(1005, t0)).await.label(), "failed");
        assert_eq!(sbx.query(&req(1006, t0)).await.label(), "succeeded");
    }

    #[tokio::test]
    async fn close_refuses_paid_orders() {
        let clock = Arc::new(ManualClock::new(0));
        let sbx = Sandbox::new(clock.clone());
        assert_eq!(sbx.close(&req(1004, 0)).await, ChannelOutcome::Closed);
        assert_eq!(sbx.close(&req(1000, 0)).await.label(), "succeeded");
        assert_eq!(sbx.close(&req(1006, 0)).await.label(), "unknown");
    }

    /// Regression: a `02` order closed before its scripted payment was later reported paid,
    /// which raised a false conflict alert on re-query.
    #[tokio::test]
    async fn a_closed_order_stays_closed() {
        let clock = Arc::new(ManualClock::new(0));
        let sbx = Sandbox::new(clock.clone());
        let r = req(1002, 0);
        assert_eq!(sbx.close(&r).await, ChannelOutcome::Closed);
        clock.advance_ms(PENDING_MS * 2);
        assert_eq!(sbx.query(&r).await, ChannelOutcome::Closed);
        assert_eq!(sbx.close(&r).await, ChannelOutcome::Closed);
        // Another order with the same script is unaffected.
        assert_eq!(sbx.query(&req(2002, 0)).await.label(), "succeeded");
    }

    fn refund(q: &QueryRequest, n: u8, amount_minor: i64) -> RefundRequest {
        RefundRequest {
            refund_id: RefundId::generate(q.submitted_at_ms as u64, [n; 10]),
            attempt_id: q.attempt_id,
            channel_trade_no: None,
            payment_amount: q.amount,
            refund_amount: Money::new(amount_minor, Currency::CNY),
            reason: None,
            requested_at_ms: q.submitted_at_ms,
            notify_url: None,
        }
    }

    #[tokio::test]
    async fn refunds_never_exceed_the_payment_and_repeat_idempotently() {
        let clock = Arc::new(ManualClock::new(5_000));
        let sbx = Sandbox::new(clock.clone());
        let q = req(1000, 5_000);
        let r1 = refund(&q, 1, 400);
        assert_eq!(sbx.refund(&r1).await.label(), "succeeded");
        assert_eq!(
            sbx.refund(&r1).await.label(),
            "succeeded",
            "a repeat is the same refund"
        );
        assert_eq!(sbx.refund(&refund(&q, 2, 601)).await.label(), "failed");
        assert_eq!(sbx.refund(&refund(&q, 3, 600)).await.label(), "succeeded");
        assert_eq!(sbx.refund(&refund(&q, 4, 1)).await.label(), "failed");
        // 5xx although made: unknown, and the query finds it.
        let q2 = req(2000, 5_000);
        let r = refund(&q2, 5, 106);
        assert_eq!(sbx.refund(&r).await.label(), "unknown");
        assert_eq!(sbx.query_refund(&r).await.label(), "succeeded");
        assert_eq!(
            sbx.query_refund(&refund(&q2, 6, 1)).await.label(),
            "unknown"
        );
        // Processing for PENDING_MS.
        let r = refund(&q2, 7, 102);
        assert_eq!(sbx.refund(&r).await.label(), "processing");
        clock.advance_ms(PENDING_MS);
        assert_eq!(sbx.query_refund(&r).await.label(), "succeeded");
        // Unpaid orders are not refundable.
        assert_eq!(
            sbx.refund(&refund(&req(1004, 5_000), 8, 1)).await.label(),
            "failed"
        );
    }

    #[tokio::test]
    async fn cancel_voids_and_the_07_script_asks_for_a_retry() {
        let sbx = Sandbox::new(Arc::new(ManualClock::new(0)));
        let paid = req(1000, 0);
        assert_eq!(
            sbx.cancel(&paid).await,
            CancelOutcome::Cancelled {
                refunded: Some(true)
            }
        );
        let r = req(1007, 0);
        assert!(matches!(sbx.cancel(&r).await, CancelOutcome::Retry { .. }));
        assert_eq!(
            sbx.cancel(&r).await,
            CancelOutcome::Cancelled {
                refunded: Some(true)
            }
        );
        let open = req(1004, 0);
        assert_eq!(
            sbx.cancel(&open).await,
            CancelOutcome::Cancelled {
                refunded: Some(false)
            }
        );
        assert_eq!(sbx.query(&open).await, ChannelOutcome::Closed);
        assert!(matches!(
            sbx.cancel(&req(1006, 0)).await,
            CancelOutcome::Unknown { .. }
        ));
    }

    #[tokio::test]
    async fn hanging_submit_really_hangs() {
        let sbx = Sandbox::new(Arc::new(ManualClock::new(0)));
        let r = req(1003, 0);
        let submit = SubmitRequest::new(
            r.attempt_id,
            r.amount,
            "x",
            PaymentMethod::Sandbox,
            0,
            60_000,
        );
        let res = tokio::time::timeout(Duration::from_millis(50), sbx.submit(&submit)).await;
        assert!(res.is_err(), "the 03 script must outlast a 50 ms timeout");
    }
}
