//! Refunds: create → record and reserve → send → apply the channel's answer; refund status
//! sync; refund notifications; the operator re-query; reads.
//!
//! The order of writes is what keeps invariant 7 under concurrency and crashes:
//! 1. the refund is recorded `processing` and its amount reserved against the payment in one
//!    write, before the channel call; the write itself refuses a refund that does not fit
//!    (`Store::create_refund`), so concurrent requests cannot both take the same remainder, and
//!    a crash after the call leaves a `refund_sync` job that asks the channel what happened;
//! 2. the channel's answer is applied with an optimistic lock: a definite failure releases the
//!    reservation, a success moves it to the refunded total, each in the write of the status
//!    change with its `refund.*` event; the first definite answer wins, a contradicting later
//!    one raises an alert;
//! 3. unknown (timeout, 5xx, not found, WeChat ABNORMAL) changes nothing and keeps the amount
//!    reserved: the job queries with a growing delay (never sooner than the channel's
//!    `refund_query_delay_ms`) until a definite answer, and raises `refund_unresolved` if none
//!    comes for `unresolved_alert_after_ms`.
//!
//! Our refund id is the channel's refund request number, so every repeat is idempotent there.

use crate::auth::AppAuth;
use crate::payments::IdemRef;
use crate::{Engine, EngineError, JOB_REFUND_SYNC};
use payrail_channels::{Capabilities, Connector, RefundOutcome, RefundRequest};
use payrail_domain::input::{Metadata, NotifyUrl, OutRefundNo, RefundReason};
use payrail_domain::refund::{
    check_refund, decide, RefundCeiling, RefundDecision, RefundRefusal, RefundReport, RefundRules,
    RefundablePayment,
};
use payrail_domain::{
    AttemptId, AttemptStatus, Currency, EventId, Money, PaymentId, PaymentStatus, RefundId,
    RefundStatus,
};
use payrail_store::{
    Admission, AdmissionOutcome, AlertRecord, AttemptRecord, CreateRefundOutcome,
    IdempotencyCompletion, JobRecord, JobUpdate, NewEvent, NewJob, NewRefund, PaymentRecord,
    RefundCeilingState, RefundRecord, RefundTransition,
};
use std::sync::Arc;
use std::time::Instant;

/// Retries of a refund status change that lost an optimistic-lock race to another writer.
const APPLY_RETRIES_MAX: usize = 4;

/// Sync runs (counted by the job's leases) during which a refund the channel does not know is
/// sent again — same refund id, amount and request time, so idempotent at the channel. This
/// covers a request lost before it reached the channel; after that the job only queries, so a
/// refund stuck in an abnormal state is not re-sent indefinitely.
const REFUND_REPEATS_MAX: i64 = 3;

/// A validated create-refund request.
#[derive(Debug, Clone)]
pub struct CreateRefund {
    pub payment_id: PaymentId,
    /// Minor units of the payment's currency.
    pub amount_minor: i64,
    /// If given, it must be the payment's currency.
    pub currency: Option<Currency>,
    pub out_refund_no: OutRefundNo,
    pub reason: Option<RefundReason>,
    /// Defaults to the payment's `notify_url`.
    pub notify_url: Option<NotifyUrl>,
    pub metadata: Metadata,
}

/// What [`Engine::create_refund`] did.
#[derive(Debug, Clone)]
pub enum CreateRefundResult {
    Done(Box<RefundResult>),
    /// The admission made in the refund's write refused the request: nothing was done.
    Refused(AdmissionOutcome),
}

#[derive(Debug, Clone)]
pub struct RefundResult {
    pub refund: RefundRecord,
    /// The request's idempotent response (200, the refund) was saved with the final status
    /// change; the caller must not save it again.
    pub idempotency_completed: bool,
}

/// A refund notification from a channel, verified by its connector
/// (`NotificationEvent::Refund` plus the notification's `attempt_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundNotice {
    /// The merchant order number the notification names, when it names one.
    pub attempt_id: Option<AttemptId>,
    /// `None` when the channel's refund number is not one of ours.
    pub refund_id: Option<RefundId>,
    /// This refund's amount, when the channel states it (WeChat, UnionPay).
    pub refund_amount: Option<Money>,
    /// The total refunded on the order so far, when the channel states that instead (Alipay
    /// `refund_fee`).
    pub refunded_total: Option<Money>,
    pub outcome: RefundOutcome,
}

/// What a refund notification did. Every variant means: acknowledge it to the channel (it was
/// applied, or deliberately ignored with an alert raised); only an `Err` should make the
/// channel send it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundNoticeResult {
    /// Applied (or nothing to change); the refund as stored afterwards.
    Applied(Box<RefundRecord>),
    /// Names no refund of ours (a refund made in the channel's console or by a cancel):
    /// `refund_unmatched` alert raised.
    Unmatched,
    /// Contradicts our records (another order, another amount, more refunded than we asked
    /// for): `refund_notification_mismatch` alert raised, nothing changed.
    Mismatch { reason: String },
}

/// The channel's answer as the state machine sees it.
fn report(outcome: &RefundOutcome) -> RefundReport {
    match outcome {
        RefundOutcome::Succeeded { .. } => RefundReport::Succeeded,
        RefundOutcome::Processing { .. } => RefundReport::Processing,
        RefundOutcome::Failed { .. } => RefundReport::Failed,
        RefundOutcome::Unknown { .. } => RefundReport::Unknown,
    }
}

fn rules(caps: &Capabilities) -> RefundRules {
    RefundRules {
        refund: caps.refund,
        partial_refund: caps.partial_refund,
        window_ms: RefundRules::window_ms_from_days(caps.refund_window_days),
        max_refunds: caps.max_refunds_per_payment,
    }
}

fn currency_of(code: &str) -> Result<Currency, EngineError> {
    Currency::parse(code).map_err(|e| EngineError::Internal(e.to_string()))
}

impl Engine {
    /// The connector that refunds a payment: the one whose channel took its succeeded attempt.
    /// The one place refunds look a connector up; channel accounts change only this.
    fn refund_connector(
        &self,
        _payment: &PaymentRecord,
        attempt: &AttemptRecord,
    ) -> Result<Arc<dyn Connector>, EngineError> {
        self.connector_for(attempt)
    }

    /// The attempt that took the money: what the channel refunds.
    async fn succeeded_attempt(
        &self,
        payment: &PaymentRecord,
    ) -> Result<AttemptRecord, EngineError> {
        self.store
            .get_attempts(payment.id)
            .await?
            .into_iter()
            .find(|a| a.status == AttemptStatus::Succeeded)
            .ok_or_else(|| {
                EngineError::Internal(format!(
                    "payment {} is succeeded without a succeeded attempt",
                    payment.id
                ))
            })
    }

    async fn refund_attempt(&self, r: &RefundRecord) -> Result<AttemptRecord, EngineError> {
        self.store
            .get_attempts(r.payment_id)
            .await?
            .into_iter()
            .find(|a| a.id == r.attempt_id)
            .ok_or_else(|| {
                EngineError::Internal(format!("refund {}: attempt {} missing", r.id, r.attempt_id))
            })
    }

    async fn refund_payment(&self, r: &RefundRecord) -> Result<PaymentRecord, EngineError> {
        self.store
            .get_payment_any(r.payment_id)
            .await?
            .ok_or_else(|| {
                EngineError::Internal(format!("refund {}: payment {} missing", r.id, r.payment_id))
            })
    }

    fn refund_request(
        &self,
        p: &PaymentRecord,
        a: &AttemptRecord,
        r: &RefundRecord,
    ) -> Result<RefundRequest, EngineError> {
        let currency = currency_of(&p.currency)?;
        Ok(RefundRequest {
            refund_id: r.id,
            attempt_id: a.id,
            channel_trade_no: a
                .channel_trade_no
                .clone()
                .or_else(|| p.channel_trade_no.clone()),
            payment_amount: Money::new(p.amount_minor, currency),
            refund_amount: Money::new(r.amount_minor, currency),
            reason: r.reason.clone(),
            // Every repeat and query passes the first request's time (UnionPay `txnTime`).
            requested_at_ms: r.requested_at_ms,
            // Our endpoint for the channel account (the connector's config), not the
            // merchant's webhook.
            notify_url: None,
        })
    }

    /// Delay before the first refund query, or between queries: never sooner than the
    /// channel allows (Alipay: 10 s after the refund).
    fn refund_query_delay_ms(&self, caps: &Capabilities, backoff_ms: i64) -> i64 {
        backoff_ms.max(caps.refund_query_delay_ms)
    }

    fn observe_refund_call(
        &self,
        channel: &str,
        op: &str,
        outcome: &RefundOutcome,
        started: Instant,
    ) {
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.metrics.observe_us(
            "payrail_channel_call_duration_seconds",
            "Latency of channel calls.",
            &[("channel", channel), ("op", op)],
            us,
        );
        self.metrics.inc(
            "payrail_channel_calls_total",
            "Channel calls by outcome.",
            &[
                ("channel", channel),
                ("op", op),
                ("outcome", outcome.label()),
            ],
        );
        if let RefundOutcome::Unknown { reason } = outcome {
            tracing::warn!(channel, op, reason = %reason, "channel refund outcome unknown");
        }
    }

    /// One channel call for a refund, under the engine's timeout (past it: unknown).
    async fn call_refund(
        &self,
        connector: &Arc<dyn Connector>,
        op: &'static str,
        req: &RefundRequest,
    ) -> RefundOutcome {
        let started = Instant::now();
        let call = async {
            if op == "query_refund" {
                connector.query_refund(req).await
            } else {
                connector.refund(req).await
            }
        };
        let outcome = tokio::time::timeout(self.channel_timeout(), call)
            .await
            .unwrap_or_else(|_| RefundOutcome::unknown("timeout"));
        self.observe_refund_call(connector.name(), op, &outcome, started);
        outcome
    }

    /// Claims a refused request's nonce and key (so its refusal is what a replay gets), then
    /// returns the refusal. If the admission itself refuses, that is the answer instead.
    async fn refuse(
        &self,
        admission: Option<Admission>,
        err: EngineError,
    ) -> Result<CreateRefundResult, EngineError> {
        if let Some(a) = admission {
            let outcome = self.store.admit(&a).await?;
            if !matches!(
                outcome,
                AdmissionOutcome::Admitted(None)
                    | AdmissionOutcome::Admitted(Some(payrail_store::IdempotencyState::New))
            ) {
                return Ok(CreateRefundResult::Refused(outcome));
            }
        }
        Err(err)
    }

    /// Refunds part or all of a succeeded payment of the app's merchant.
    pub async fn create_refund(
        &self,
        app: &AppAuth,
        req: CreateRefund,
        idem: Option<IdemRef<'_>>,
        admission: Option<Admission>,
    ) -> Result<CreateRefundResult, EngineError> {
        let Some(payment) = self
            .store
            .get_payment(app.merchant_id, req.payment_id)
            .await?
        else {
            return self
                .refuse(admission, EngineError::NotFound("payment"))
                .await;
        };
        let payment_currency = currency_of(&payment.currency)?;
        let amount = Money::new(req.amount_minor, req.currency.unwrap_or(payment_currency));
        if payment.status != PaymentStatus::Succeeded {
            let err = RefundRefusal::NotRefundable(payment.status).into();
            return self.refuse(admission, err).await;
        }
        let attempt = self.succeeded_attempt(&payment).await?;
        let connector = match self.refund_connector(&payment, &attempt) {
            Ok(c) => c,
            Err(e) => return self.refuse(admission, e).await,
        };
        let caps = connector.capabilities();
        let now = self.now_ms();
        // The rules that do not depend on the payment's other refunds; here the amount is only
        // checked against the amount paid. What other refunds leave, and their number, the
        // write decides atomically — after its duplicate check, so a request retried after a
        // crash finds its refund even when that refund took everything.
        let facts = RefundablePayment {
            status: payment.status,
            amount: Money::new(payment.amount_minor, payment_currency),
            ceiling: RefundCeiling::new(payment.amount_minor),
            paid_at_ms: payment.paid_at_ms,
            refund_count: 0,
        };
        if let Err(refusal) = check_refund(&facts, &rules(&caps), amount, now) {
            return self.refuse(admission, refusal.into()).await;
        }
        // A call slot first: if the channel is saturated, fail fast before anything is written
        // (claiming the key first, so a replay of a finished refund still gets its answer).
        let _permit = match self.channel_permit(&Engine::bulkhead_key(&attempt)).await {
            Ok(p) => p,
            Err(e) => return self.refuse(admission, e).await,
        };
        let refund = RefundRecord {
            id: self.ids.next(),
            payment_id: payment.id,
            attempt_id: attempt.id,
            merchant_id: payment.merchant_id,
            app_id: app.app_id,
            out_refund_no: req.out_refund_no.into_string(),
            amount_minor: amount.amount_minor(),
            currency: payment.currency.clone(),
            reason: req.reason.map(|r| r.into_string()),
            channel: connector.name().to_string(),
            // Recorded as processing before the call: from the moment it is sent, its outcome
            // is unknown until the channel says otherwise.
            status: RefundStatus::Processing,
            version: 1,
            channel_refund_no: None,
            failure_code: None,
            failure_message: None,
            notify_url: req
                .notify_url
                .map(|u| u.into_string())
                .or_else(|| payment.notify_url.clone()),
            metadata: serde_json::to_string(req.metadata.as_map())
                .map_err(|e| EngineError::Internal(e.to_string()))?,
            idempotency_key: idem.map(|i| i.key.to_string()),
            request_hash: idem.map(|i| i.request_hash.to_string()),
            requested_at_ms: now,
            refunded_at_ms: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let channel_timeout_ms = i64::try_from(self.config.channel_timeout_ms).unwrap_or(i64::MAX);
        let new = NewRefund {
            refund: refund.clone(),
            max_refunds: caps.max_refunds_per_payment.map(i64::from),
            job: Some(NewJob {
                kind: JOB_REFUND_SYNC.into(),
                subject_id: refund.id.to_string(),
                // If this process dies during the call, a worker asks after it.
                run_at_ms: now.saturating_add(channel_timeout_ms).saturating_add(
                    self.refund_query_delay_ms(&caps, self.config.sync_first_delay_ms),
                ),
            }),
            admission,
        };
        match self.store.create_refund(&new).await? {
            CreateRefundOutcome::Created => {}
            CreateRefundOutcome::NotAdmitted(outcome) => {
                return Ok(CreateRefundResult::Refused(outcome))
            }
            CreateRefundOutcome::DuplicateOutRefundNo(existing) => {
                // The same request, retried after its first try died mid-way: answer with the
                // refund it created (its job is driving it) rather than an error.
                let same_request = idem.is_some_and(|i| {
                    existing.idempotency_key.as_deref() == Some(i.key)
                        && existing.request_hash.as_deref() == Some(i.request_hash)
                });
                if same_request {
                    return Ok(CreateRefundResult::Done(Box::new(RefundResult {
                        refund: *existing,
                        idempotency_completed: false,
                    })));
                }
                return Err(EngineError::DuplicateOutRefundNo);
            }
            CreateRefundOutcome::Refused(state) => {
                return Err(self.refusal_reason(state, &caps, amount, now));
            }
        }
        self.metrics.inc(
            "payrail_refunds_created_total",
            "Refunds recorded, by channel.",
            &[("channel", connector.name())],
        );
        let request = self.refund_request(&payment, &attempt, &refund)?;
        let outcome = self.call_refund(&connector, "refund", &request).await;
        let (refund, idempotency_completed) = self
            .apply_refund_outcome_saving(refund, &outcome, idem)
            .await?;
        if !refund.status.is_terminal() {
            // The answer came back (processing or unknown): the first query is due a short
            // delay from now, not after a full channel timeout.
            self.store
                .update_job(&JobUpdate::Schedule {
                    kind: JOB_REFUND_SYNC.into(),
                    subject_id: refund.id.to_string(),
                    run_at_ms: self.now_ms().saturating_add(
                        self.refund_query_delay_ms(&caps, self.config.sync_first_delay_ms),
                    ),
                    last_error: None,
                })
                .await?;
        }
        Ok(CreateRefundResult::Done(Box::new(RefundResult {
            refund,
            idempotency_completed,
        })))
    }

    /// Records money the channel itself gave back to the payer for a succeeded payment — a
    /// cancel (reverse/revoke) that the channel confirmed after the payer had paid — as a
    /// refund that already succeeded: the rest of the payment not yet refunded or reserved, out
    /// refund number `reversal-{payment}`. Its transaction posts the refund entry like any
    /// refund's (pending first, then available, then suspense with an alert), so the merchant
    /// is not settled money the platform no longer holds (review finding: the payment's net was
    /// still settled to the merchant). Idempotent: a second call finds the refund by its out
    /// refund number and does nothing. Returns the refund, if one was (or had been) recorded.
    pub async fn record_channel_reversal(
        &self,
        payment: &PaymentRecord,
    ) -> Result<Option<RefundRecord>, EngineError> {
        let out_refund_no = format!("reversal-{}", payment.id);
        if let Some(existing) = self
            .store
            .get_refund_by_out_refund_no(payment.merchant_id, &out_refund_no)
            .await?
        {
            return Ok(Some(existing));
        }
        let current = self
            .store
            .get_payment_any(payment.id)
            .await?
            .ok_or(EngineError::NotFound("payment"))?;
        let amount_minor = current
            .amount_minor
            .saturating_sub(current.refund_reserved_minor);
        if current.status != PaymentStatus::Succeeded || amount_minor <= 0 {
            return Ok(None);
        }
        let attempt = self.succeeded_attempt(&current).await?;
        let now = self.now_ms();
        let refund = RefundRecord {
            id: self.ids.next(),
            payment_id: current.id,
            attempt_id: attempt.id,
            merchant_id: current.merchant_id,
            app_id: current.app_id,
            out_refund_no,
            amount_minor,
            currency: current.currency.clone(),
            reason: Some("the channel reversed the payment after it succeeded".into()),
            channel: attempt.channel.clone(),
            status: RefundStatus::Processing,
            version: 1,
            channel_refund_no: None,
            failure_code: None,
            failure_message: None,
            notify_url: current.notify_url.clone(),
            metadata: "{}".into(),
            idempotency_key: None,
            request_hash: None,
            requested_at_ms: now,
            refunded_at_ms: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let new = NewRefund {
            refund: refund.clone(),
            max_refunds: None,
            job: None,
            admission: None,
        };
        match self.store.create_refund(&new).await? {
            CreateRefundOutcome::Created => {}
            CreateRefundOutcome::DuplicateOutRefundNo(existing) => return Ok(Some(*existing)),
            // Another refund reserved the rest meanwhile: it is that refund's to post.
            CreateRefundOutcome::Refused(_) => return Ok(None),
            CreateRefundOutcome::NotAdmitted(_) => {
                return Err(EngineError::Internal(
                    "a reversal has no admission to refuse".into(),
                ))
            }
        }
        // Nothing to call: the channel has already handed the money back.
        let refund = self
            .apply_refund_outcome(
                refund,
                &RefundOutcome::Succeeded {
                    channel_refund_no: current.channel_trade_no.clone(),
                    refunded_at_ms: Some(now),
                },
            )
            .await?;
        Ok(Some(refund))
    }

    /// Why the write refused a reservation, from the payment row it read in that write.
    fn refusal_reason(
        &self,
        state: Option<RefundCeilingState>,
        caps: &Capabilities,
        amount: Money,
        now_ms: i64,
    ) -> EngineError {
        let Some(s) = state else {
            return EngineError::NotFound("payment");
        };
        let Ok(currency) = Currency::parse(&s.currency) else {
            return EngineError::Internal(format!("stored currency {:?}", s.currency));
        };
        let ceiling = RefundCeiling {
            paid_minor: s.amount_minor,
            reserved_minor: s.refund_reserved_minor,
            refunded_minor: s.amount_refunded_minor,
        };
        let facts = RefundablePayment {
            status: s.status,
            amount: Money::new(s.amount_minor, currency),
            ceiling,
            paid_at_ms: None,
            refund_count: s.refund_count,
        };
        match check_refund(&facts, &rules(caps), amount, now_ms) {
            Err(refusal) => refusal.into(),
            // Refused by a row that would accept it now: another refund failed in between.
            Ok(()) => RefundRefusal::ExceedsRefundable {
                refundable_minor: ceiling.refundable_minor(),
            }
            .into(),
        }
    }

    /// Applies a channel's answer to a refund, retrying if another writer changed it meanwhile.
    /// Returns the refund as stored afterwards.
    pub async fn apply_refund_outcome(
        &self,
        refund: RefundRecord,
        outcome: &RefundOutcome,
    ) -> Result<RefundRecord, EngineError> {
        Ok(self
            .apply_refund_outcome_saving(refund, outcome, None)
            .await?
            .0)
    }

    /// [`Engine::apply_refund_outcome`], also saving the create request's idempotent response
    /// (`idem`) in the same transaction when the answer ends the refund. The flag says whether
    /// it was saved.
    async fn apply_refund_outcome_saving(
        &self,
        mut refund: RefundRecord,
        outcome: &RefundOutcome,
        idem: Option<IdemRef<'_>>,
    ) -> Result<(RefundRecord, bool), EngineError> {
        for _ in 0..APPLY_RETRIES_MAX {
            let next = match decide(refund.status, report(outcome)) {
                RefundDecision::NoChange => return Ok((refund, false)),
                RefundDecision::Conflict { current, reported } => {
                    self.raise_refund_conflict(&refund, current, reported)
                        .await?;
                    return Ok((refund, false));
                }
                RefundDecision::Transition(next) => next,
            };
            let now = self.now_ms();
            let mut updated = refund.clone();
            updated.status = next;
            updated.version = refund.version.saturating_add(1);
            updated.updated_at_ms = now;
            match outcome {
                RefundOutcome::Succeeded {
                    channel_refund_no,
                    refunded_at_ms,
                } => {
                    updated.channel_refund_no =
                        channel_refund_no.clone().or(updated.channel_refund_no);
                    updated.refunded_at_ms = Some(refunded_at_ms.unwrap_or(now));
                }
                RefundOutcome::Failed { code, message } => {
                    updated.failure_code = Some(code.clone());
                    updated.failure_message = Some(message.clone());
                }
                RefundOutcome::Processing { .. } | RefundOutcome::Unknown { .. } => {}
            }
            let terminal = next.is_terminal();
            let t = RefundTransition {
                refund_id: refund.id,
                refund_version: refund.version,
                status: next,
                channel_refund_no: updated.channel_refund_no.clone(),
                failure_code: updated.failure_code.clone(),
                failure_message: updated.failure_message.clone(),
                refunded_at_ms: updated.refunded_at_ms,
                now_ms: now,
                event: terminal.then(|| self.refund_event(&updated, now)),
                job: terminal.then(|| JobUpdate::Delete {
                    kind: JOB_REFUND_SYNC.into(),
                    subject_id: refund.id.to_string(),
                }),
                idempotency: idem.filter(|_| terminal).map(|i| IdempotencyCompletion {
                    scope: refund.merchant_id.to_string(),
                    key: i.key.to_string(),
                    token: i.token.to_string(),
                    status: 200,
                    body: crate::views::refund_json(&updated).to_string(),
                }),
            };
            if self.store.apply_refund_transition(&t).await? {
                self.metrics.inc(
                    "payrail_refund_transitions_total",
                    "Refund status changes, by channel and new status.",
                    &[("channel", &refund.channel), ("status", next.as_str())],
                );
                tracing::info!(refund_id = %refund.id, payment_id = %refund.payment_id, from = %refund.status, to = %next, "refund status changed");
                let saved = t.idempotency.is_some();
                return Ok((updated, saved));
            }
            // Lost the race: read what won and decide again.
            refund = self
                .store
                .get_refund_any(refund.id)
                .await?
                .ok_or(EngineError::NotFound("refund"))?;
        }
        Err(EngineError::Internal(format!(
            "refund {}: optimistic-lock retries exhausted",
            refund.id
        )))
    }

    fn refund_event(&self, r: &RefundRecord, now_ms: i64) -> NewEvent {
        let id: EventId = self.ids.next();
        let event_type = format!("refund.{}", r.status);
        let payload = serde_json::json!({
            "id": id,
            "object": "event",
            "type": event_type,
            "created": now_ms.div_euclid(1000),
            "data": { "object": crate::views::refund_json(r) },
        });
        NewEvent {
            id: id.to_string(),
            merchant_id: r.merchant_id,
            event_type,
            object_id: r.id.to_string(),
            payload: crate::views::json_text(&payload),
            created_at_ms: now_ms,
        }
    }

    async fn raise_refund_conflict(
        &self,
        r: &RefundRecord,
        current: RefundStatus,
        reported: &str,
    ) -> Result<(), EngineError> {
        tracing::error!(refund_id = %r.id, current = %current, reported, "conflicting channel refund result; status kept");
        self.metrics.inc(
            "payrail_channel_conflicts_total",
            "Definite channel results contradicting a final status.",
            &[("channel", &r.channel)],
        );
        // failed -> succeeded is the dangerous one: the amount was released but the channel
        // says the money went back. The status stays (the first definite answer wins); a
        // person must reconcile it before refunding that payment further.
        self.store
            .insert_alert(&AlertRecord {
                kind: "refund_conflict".into(),
                subject_id: r.id.to_string(),
                detail: format!(
                    "refund of {} {} on payment {} is {current}, channel now reports {reported}",
                    r.amount_minor, r.currency, r.payment_id
                ),
                created_at_ms: self.now_ms(),
            })
            .await?;
        Ok(())
    }

    /// One run of a refund-sync job: ask the channel about the refund (sending it again while
    /// the channel does not know it, during the first runs), apply the answer, and schedule the
    /// next run if still processing.
    pub async fn sync_refund(&self, job: &JobRecord) -> Result<(), EngineError> {
        let delete = JobUpdate::Delete {
            kind: JOB_REFUND_SYNC.into(),
            subject_id: job.subject_id.clone(),
        };
        let Ok(refund_id) = job.subject_id.parse::<RefundId>() else {
            tracing::error!(subject = %job.subject_id, "refund sync job names no refund; dropped");
            self.store.update_job(&delete).await?;
            return Ok(());
        };
        let Some(refund) = self.store.get_refund_any(refund_id).await? else {
            self.store.update_job(&delete).await?;
            return Ok(());
        };
        if refund.status.is_terminal() {
            self.store.update_job(&delete).await?;
            return Ok(());
        }
        let payment = self.refund_payment(&refund).await?;
        let attempt = self.refund_attempt(&refund).await?;
        let connector = self.refund_connector(&payment, &attempt)?;
        let caps = connector.capabilities();
        let request = self.refund_request(&payment, &attempt, &refund)?;
        let now = self.now_ms();
        let Ok(_permit) = self.channel_permit(&Engine::bulkhead_key(&attempt)).await else {
            // The channel is saturated: ask again shortly instead of piling on.
            self.store
                .update_job(&JobUpdate::Schedule {
                    kind: JOB_REFUND_SYNC.into(),
                    subject_id: job.subject_id.clone(),
                    run_at_ms: now.saturating_add(self.config.sync_first_delay_ms),
                    last_error: Some("channel busy".into()),
                })
                .await?;
            return Ok(());
        };
        let mut op = "query_refund";
        let mut outcome = self.call_refund(&connector, op, &request).await;
        if matches!(outcome, RefundOutcome::Unknown { .. }) && job.attempts <= REFUND_REPEATS_MAX {
            // The channel may never have received it (a timeout before it arrived): send the
            // same refund again, as the channels ask after an unknown outcome.
            op = "refund";
            outcome = self.call_refund(&connector, op, &request).await;
        }
        let updated = self.apply_refund_outcome(refund, &outcome).await?;
        if !updated.status.is_terminal() {
            let open_ms = now.saturating_sub(updated.requested_at_ms);
            if open_ms >= self.config.unresolved_alert_after_ms {
                // The job keeps asking (unknown is never failure, and the amount stays
                // reserved), but a refund this long without a definite answer needs a person.
                let raised = self
                    .store
                    .insert_alert_once(&AlertRecord {
                        kind: "refund_unresolved".into(),
                        subject_id: updated.id.to_string(),
                        detail: format!(
                            "requested {} s ago; the channel still gives no definite answer to {op} (last: {}); check the refund at the channel",
                            open_ms.div_euclid(1000),
                            match &outcome {
                                RefundOutcome::Unknown { reason } => reason.as_str(),
                                other => other.label(),
                            }
                        ),
                        created_at_ms: now,
                    })
                    .await?;
                if raised {
                    tracing::error!(refund_id = %updated.id, "refund unresolved; alert raised");
                    self.metrics.inc(
                        "payrail_refunds_unresolved_total",
                        "Refunds without a definite channel answer for long (alert raised).",
                        &[("channel", &updated.channel)],
                    );
                }
            }
            let next = now.saturating_add(
                self.refund_query_delay_ms(&caps, self.sync_backoff_ms(job.attempts)),
            );
            let last_error = match &outcome {
                RefundOutcome::Unknown { reason } => Some(reason.clone()),
                other => Some(other.label().to_string()),
            };
            self.store
                .update_job(&JobUpdate::Schedule {
                    kind: JOB_REFUND_SYNC.into(),
                    subject_id: job.subject_id.clone(),
                    run_at_ms: next,
                    last_error,
                })
                .await?;
        }
        Ok(())
    }

    /// Applies a refund notification a channel sent (the notification endpoint calls this
    /// after the connector verified it). Cross-checks it against our records first: a validly
    /// signed notification can still name another order or amount. Alipay states the total
    /// refunded on the order (`refunded_total`) instead of the refund's amount; that total may
    /// not exceed what we reserved for refunds of the payment.
    pub async fn apply_refund_notification(
        &self,
        notice: &RefundNotice,
    ) -> Result<RefundNoticeResult, EngineError> {
        let found = match notice.refund_id {
            Some(id) => self.store.get_refund_any(id).await?,
            None => None,
        };
        let Some(refund) = found else {
            let subject = notice
                .refund_id
                .map(|r| r.to_string())
                .or_else(|| notice.attempt_id.map(|a| a.to_string()))
                .unwrap_or_else(|| "unknown".into());
            tracing::warn!(subject = %subject, outcome = notice.outcome.label(), "refund notification names no refund of ours");
            self.store
                .insert_alert(&AlertRecord {
                    kind: "refund_unmatched".into(),
                    subject_id: subject,
                    detail: format!(
                        "a channel refund notification ({}) names no refund of ours; refunded outside payrail (console, cancel)?",
                        notice.outcome.label()
                    ),
                    created_at_ms: self.now_ms(),
                })
                .await?;
            return Ok(RefundNoticeResult::Unmatched);
        };
        if let Some(reason) = self.notice_mismatch(&refund, notice).await? {
            tracing::error!(refund_id = %refund.id, reason = %reason, "refund notification contradicts our records; ignored");
            self.store
                .insert_alert(&AlertRecord {
                    kind: "refund_notification_mismatch".into(),
                    subject_id: refund.id.to_string(),
                    detail: reason.clone(),
                    created_at_ms: self.now_ms(),
                })
                .await?;
            return Ok(RefundNoticeResult::Mismatch { reason });
        }
        let updated = self.apply_refund_outcome(refund, &notice.outcome).await?;
        Ok(RefundNoticeResult::Applied(Box::new(updated)))
    }

    async fn notice_mismatch(
        &self,
        r: &RefundRecord,
        n: &RefundNotice,
    ) -> Result<Option<String>, EngineError> {
        if let Some(a) = n.attempt_id.filter(|a| *a != r.attempt_id) {
            return Ok(Some(format!(
                "names order {a}, but refund {} is of {}",
                r.id, r.attempt_id
            )));
        }
        if let Some(m) = n.refund_amount {
            if m.currency().code() != r.currency || m.amount_minor() != r.amount_minor {
                return Ok(Some(format!(
                    "states a refund of {} {}, but refund {} is of {} {}",
                    m.amount_minor(),
                    m.currency(),
                    r.id,
                    r.amount_minor,
                    r.currency
                )));
            }
        }
        if let Some(total) = n.refunded_total {
            let p = self.refund_payment(r).await?;
            let succeeded = matches!(n.outcome, RefundOutcome::Succeeded { .. });
            if total.currency().code() != p.currency
                || total.amount_minor() > p.refund_reserved_minor
                || (succeeded && total.amount_minor() < r.amount_minor)
            {
                return Ok(Some(format!(
                    "states {} {} refunded on the order; payment {} has {} {} reserved for refunds (this one {})",
                    total.amount_minor(),
                    total.currency(),
                    p.id,
                    p.refund_reserved_minor,
                    p.currency,
                    r.amount_minor
                )));
            }
        }
        Ok(None)
    }

    /// Operator re-query: asks the channel about the refund now, processing or final, and
    /// applies the answer (a contradicting one raises an alert and changes nothing). Never
    /// re-sends the refund.
    pub async fn requery_refund(&self, id: RefundId) -> Result<RefundRecord, EngineError> {
        let refund = self
            .store
            .get_refund_any(id)
            .await?
            .ok_or(EngineError::NotFound("refund"))?;
        let payment = self.refund_payment(&refund).await?;
        let attempt = self.refund_attempt(&refund).await?;
        let connector = self.refund_connector(&payment, &attempt)?;
        let request = self.refund_request(&payment, &attempt, &refund)?;
        let _permit = self.channel_permit(&Engine::bulkhead_key(&attempt)).await?;
        let outcome = self.call_refund(&connector, "query_refund", &request).await;
        self.apply_refund_outcome(refund, &outcome).await
    }

    pub async fn get_refund(
        &self,
        app: &AppAuth,
        id: RefundId,
    ) -> Result<RefundRecord, EngineError> {
        self.store
            .get_refund(app.merchant_id, id)
            .await?
            .ok_or(EngineError::NotFound("refund"))
    }

    pub async fn get_refund_by_out_refund_no(
        &self,
        app: &AppAuth,
        out_refund_no: &OutRefundNo,
    ) -> Result<RefundRecord, EngineError> {
        self.store
            .get_refund_by_out_refund_no(app.merchant_id, out_refund_no.as_str())
            .await?
            .ok_or(EngineError::NotFound("refund"))
    }

    /// One page, newest first, and whether more follow; only the refunds of `payment_id` (which
    /// must be the merchant's) when given.
    pub async fn list_refunds(
        &self,
        app: &AppAuth,
        payment_id: Option<PaymentId>,
        limit: u32,
        starting_after: Option<RefundId>,
    ) -> Result<(Vec<RefundRecord>, bool), EngineError> {
        if let Some(p) = payment_id {
            self.get_payment(app, p).await?;
        }
        let limit = limit.clamp(1, crate::merchants::PAGE_LIMIT_MAX);
        let mut rows = self
            .store
            .list_refunds(
                app.merchant_id,
                payment_id,
                limit.saturating_add(1),
                starting_after,
            )
            .await?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((rows, has_more))
    }
}
