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
//! It keeps no state: every answer is a function of the amount, the submission time and the
//! clock, so it gives the same answers after a restart, exactly like a real channel would.

use crate::*;
use payrail_domain::Clock;
use std::collections::HashSet;
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
                if let Ok(mut closed) = self.closed.lock() {
                    if closed.len() >= CLOSED_REMEMBERED_MAX {
                        closed.clear();
                    }
                    closed.insert(req.attempt_id);
                }
                ChannelOutcome::Closed
            }
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

    #[tokio::test]
    async fn hanging_submit_really_hangs() {
        let sbx = Sandbox::new(Arc::new(ManualClock::new(0)));
        let r = req(1003, 0);
        let submit = SubmitRequest {
            attempt_id: r.attempt_id,
            amount: r.amount,
            subject: "x".into(),
            method: PaymentMethod::Sandbox,
            submitted_at_ms: 0,
            expires_at_ms: 60_000,
        };
        let res = tokio::time::timeout(Duration::from_millis(50), sbx.submit(&submit)).await;
        assert!(res.is_err(), "the 03 script must outlast a 50 ms timeout");
    }
}
