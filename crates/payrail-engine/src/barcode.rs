//! Payment-code (barcode) payments and cancellation.
//!
//! The cashier scans the payer's code; the channel may answer at once, or say the payer is
//! confirming (WeChat USERPAYING, Alipay 10003, UnionPay 05) or nothing definite at all. Then:
//! query every `barcode_poll_ms`; once `barcode_window_ms` has passed since submission without
//! a definite answer, query one last time and cancel the order at the channel (WeChat reverse,
//! Alipay cancel), repeating while the channel asks to retry (`recall=Y`/`retry_flag=Y`), at
//! most `CANCEL_CALLS_MAX` times, then raising `cancel_unconfirmed`. A cancelled order cannot
//! be paid any more, and one the payer did pay is refunded by the channel. UnionPay payment
//! codes are not cancelled (its revoke voids only a successful consume; `capabilities()` says
//! `cancel: false`): they are queried until definite, and a success stays `succeeded` — the
//! merchant refunds it if it no longer wants it. Unknown is never failure: without a definite
//! answer the job keeps asking, and raises `payment_unresolved` once it is long overdue.
//!
//! A merchant may also cancel an open payment (`POST /v1/payments/{id}/cancel`), for example a
//! cashier who gives up; a finished payment is refunded, not cancelled.

use crate::auth::AppAuth;
use crate::{Engine, EngineError, JOB_PAYMENT_SYNC};
use payrail_channels::{CancelOutcome, Connector, QueryRequest};
use payrail_domain::input::PaymentMethod;
use payrail_domain::{ChannelOutcome, PaymentId, PaymentStatus};
use payrail_store::{AlertRecord, AttemptRecord, JobRecord, JobUpdate, PaymentRecord};
use std::sync::Arc;
use std::time::Instant;

/// Cancel calls for one payment before a person must look (the channel kept asking to retry).
pub const CANCEL_CALLS_MAX: i64 = 10;
/// Pause before repeating a cancel the channel asked us to retry (never longer than the poll).
const CANCEL_RETRY_MS: i64 = 1_000;

pub fn is_payment_code(p: &PaymentRecord) -> bool {
    PaymentMethod::parse(&p.method).is_ok_and(|m| m.is_payment_code())
}

/// What a cancel call means for the attempt, in the terms `apply_outcome` speaks.
fn cancel_as_outcome(c: &CancelOutcome) -> ChannelOutcome {
    match c {
        CancelOutcome::Cancelled { .. } => ChannelOutcome::Cancelled,
        CancelOutcome::Retry { reason } => {
            ChannelOutcome::unknown(format!("cancel: retry ({reason})"))
        }
        CancelOutcome::Unknown { reason } => ChannelOutcome::unknown(format!("cancel: {reason}")),
        // A refused cancel is not a payment failure (the trade may have succeeded meanwhile);
        // the next query tells.
        CancelOutcome::Failed { code, message } => {
            ChannelOutcome::unknown(format!("cancel refused: {code} {message}"))
        }
        CancelOutcome::NotSupported => ChannelOutcome::unknown("cancel not supported"),
    }
}

impl Engine {
    async fn call_cancel(
        &self,
        connector: &Arc<dyn Connector>,
        req: &QueryRequest,
    ) -> CancelOutcome {
        let started = Instant::now();
        let c = tokio::time::timeout(self.channel_timeout(), connector.cancel(req))
            .await
            .unwrap_or_else(|_| CancelOutcome::Unknown {
                reason: "timeout".into(),
            });
        self.observe_channel(connector.name(), "cancel", &cancel_as_outcome(&c), started);
        c
    }

    async fn call_query(
        &self,
        connector: &Arc<dyn Connector>,
        req: &QueryRequest,
    ) -> ChannelOutcome {
        let started = Instant::now();
        let o = tokio::time::timeout(self.channel_timeout(), connector.query(req))
            .await
            .unwrap_or_else(|_| ChannelOutcome::unknown("timeout"));
        self.observe_channel(connector.name(), "query", &o, started);
        o
    }

    /// One status-sync step of an open payment-code payment (the caller holds its permit).
    pub(crate) async fn sync_barcode(
        &self,
        job: &JobRecord,
        payment: PaymentRecord,
        attempt: AttemptRecord,
        connector: Arc<dyn Connector>,
        req: QueryRequest,
    ) -> Result<(), EngineError> {
        let now = self.now_ms();
        let outcome = self.call_query(&connector, &req).await;
        let mut updated = self
            .apply_outcome(payment, attempt.clone(), &outcome)
            .await?;
        if updated.status.is_terminal() {
            return Ok(());
        }
        let age_ms = now.saturating_sub(attempt.created_at_ms);
        let mut next_ms = self.config.barcode_poll_ms;
        let mut last = outcome.label().to_string();
        let supports_cancel = connector
            .capabilities()
            .method(PaymentMethod::parse(&updated.method).map_err(EngineError::from)?)
            .is_some_and(|m| m.cancel);
        if age_ms >= self.config.barcode_window_ms && supports_cancel {
            // Past the window and still inconclusive: cancel, so the code can no longer be
            // charged (and a charge that did happen is refunded by the channel).
            let cancels = self.cancel_calls(job);
            if cancels < CANCEL_CALLS_MAX {
                let c = self.call_cancel(&connector, &req).await;
                let current = self
                    .open_attempt(updated.id)
                    .await?
                    .unwrap_or_else(|| attempt.clone());
                updated = self
                    .apply_outcome(updated, current, &cancel_as_outcome(&c))
                    .await?;
                match self.check_reversed_after_success(&updated, &c).await {
                    // Alerted; the payment is final, so the job ends below.
                    Ok(()) | Err(EngineError::ReversedAfterSuccess) => {}
                    Err(e) => return Err(e),
                }
                if updated.status.is_terminal() {
                    tracing::info!(payment_id = %updated.id, status = %updated.status, "payment-code payment ended by cancel");
                    return Ok(());
                }
                if matches!(c, CancelOutcome::Retry { .. }) {
                    next_ms = CANCEL_RETRY_MS.min(self.config.barcode_poll_ms);
                }
                last = format!("cancel {}", cancel_as_outcome(&c).label());
            } else {
                // The channel would not cancel: keep asking for the status, ever more slowly,
                // and let a person look.
                next_ms = self.sync_backoff_ms(job.attempts);
                self.store
                    .insert_alert_once(&AlertRecord {
                        kind: "cancel_unconfirmed".into(),
                        subject_id: updated.id.to_string(),
                        detail: format!(
                            "{CANCEL_CALLS_MAX} cancel calls without a definite answer; the status is still asked"
                        ),
                        created_at_ms: now,
                    })
                    .await?;
            }
        }
        self.store
            .update_job(&JobUpdate::Schedule {
                kind: JOB_PAYMENT_SYNC.into(),
                subject_id: job.subject_id.clone(),
                run_at_ms: now.saturating_add(next_ms),
                last_error: Some(last),
            })
            .await?;
        Ok(())
    }

    /// A cancel the channel confirmed for a payment that succeeded meanwhile (the payer
    /// confirmed while the cancel was in flight): the channel has handed the money back, so the
    /// merchant must not deliver. The status stays `succeeded` (the first definite answer wins,
    /// and `apply_outcome` raised `channel_conflict`); the money the channel returned is
    /// recorded as a refund that succeeded (`Engine::record_channel_reversal`: its posting takes
    /// it back from the merchant's balance, and the merchant gets `refund.succeeded`); this
    /// raises the specific alert and refuses the merchant's cancel with a code that says so.
    async fn check_reversed_after_success(
        &self,
        p: &PaymentRecord,
        c: &CancelOutcome,
    ) -> Result<(), EngineError> {
        if p.status != PaymentStatus::Succeeded || !matches!(c, CancelOutcome::Cancelled { .. }) {
            return Ok(());
        }
        tracing::error!(payment_id = %p.id, "the channel reversed a payment that had succeeded; do not deliver");
        let recorded = self.record_channel_reversal(p).await?;
        let detail = match &recorded {
            Some(r) => format!(
                "the channel confirmed a cancel (reverse/revoke) of this succeeded payment: the payer was refunded by the channel; recorded as refund {} ({} minor units) and taken back from the merchant's balance",
                r.id, r.amount_minor
            ),
            None => "the channel confirmed a cancel (reverse/revoke) of this succeeded payment: the payer was refunded by the channel; reconcile by hand".into(),
        };
        self.store
            .insert_alert_once(&AlertRecord {
                kind: "payment_reversed_after_success".into(),
                subject_id: p.id.to_string(),
                detail,
                created_at_ms: self.now_ms(),
            })
            .await?;
        Err(EngineError::ReversedAfterSuccess)
    }

    /// Cancel calls made so far for a job's payment: the runs past the window (each run past it
    /// makes one call). Run k comes k polls after submission, so the first run past the window
    /// is run ⌈window / poll⌉ and the runs before it make no call.
    fn cancel_calls(&self, job: &JobRecord) -> i64 {
        let poll = self.config.barcode_poll_ms.max(1);
        let first_past_window = self
            .config
            .barcode_window_ms
            .max(0)
            .saturating_add(poll.saturating_sub(1))
            .checked_div(poll)
            .unwrap_or(0)
            .max(1);
        // The current run is number `attempts`; the calls so far are those of the runs before it
        // from the first past the window on.
        job.attempts.saturating_sub(first_past_window).max(0)
    }

    /// The merchant cancels an open payment at the channel (WeChat reverse, Alipay cancel). Cancelling
    /// a cancelled payment is a no-op; a finished one cannot be cancelled (refund it instead).
    pub async fn cancel_payment(
        &self,
        app: &AppAuth,
        id: PaymentId,
    ) -> Result<PaymentRecord, EngineError> {
        let payment = self
            .store
            .get_payment(app.merchant_id, id)
            .await?
            .ok_or(EngineError::NotFound("payment"))?;
        if payment.status == PaymentStatus::Cancelled {
            return Ok(payment);
        }
        if payment.status.is_terminal() {
            return Err(EngineError::NotCancellable(payment.status.to_string()));
        }
        let attempt = self.open_attempt(id).await?.ok_or_else(|| {
            EngineError::Internal(format!("payment {id} is open without an open attempt"))
        })?;
        let connector = self.connector_for(&attempt)?;
        let method = PaymentMethod::parse(&payment.method).map_err(EngineError::from)?;
        if !connector
            .capabilities()
            .method(method)
            .is_some_and(|m| m.cancel)
        {
            return Err(EngineError::CancelNotSupported(payment.method.clone()));
        }
        let req = self.query_request(&payment, &attempt)?;
        let _permit = self.channel_permit(&Engine::bulkhead_key(&attempt)).await?;
        // Ask first: if the payer has just paid, the answer is the payment, not a reversal of
        // it (a cancel racing a success would hand the money back behind the cashier's back).
        let known = self.call_query(&connector, &req).await;
        let payment = self.apply_outcome(payment, attempt.clone(), &known).await?;
        if payment.status.is_terminal() {
            return match payment.status {
                PaymentStatus::Cancelled => Ok(payment),
                s => Err(EngineError::NotCancellable(s.to_string())),
            };
        }
        let attempt = self.open_attempt(id).await?.unwrap_or(attempt);
        let mut c = self.call_cancel(&connector, &req).await;
        // Repeat at once while the channel asks to (bounded): the cashier is waiting.
        for _ in 1..3 {
            if !matches!(c, CancelOutcome::Retry { .. }) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            c = self.call_cancel(&connector, &req).await;
        }
        let updated = self
            .apply_outcome(payment, attempt, &cancel_as_outcome(&c))
            .await?;
        self.check_reversed_after_success(&updated, &c).await?;
        match updated.status {
            PaymentStatus::Cancelled => Ok(updated),
            s if s.is_terminal() => Err(EngineError::NotCancellable(s.to_string())),
            _ => match c {
                CancelOutcome::Failed { code, message } => {
                    Err(EngineError::CancelRefused(format!("{code}: {message}")))
                }
                other => Err(EngineError::ChannelUnconfirmed(
                    match cancel_as_outcome(&other) {
                        ChannelOutcome::Unknown { reason } => reason,
                        o => o.label().to_string(),
                    },
                )),
            },
        }
    }
}
