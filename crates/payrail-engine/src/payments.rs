//! The payment pipeline: create → record → submit → apply the channel's answer; status sync;
//! close.
//!
//! The order of writes is what keeps money safe across crashes:
//! 1. the payment, its attempt and a status-sync job are committed *before* the channel call,
//!    so a crash after the call leaves a job that will ask the channel what happened;
//! 2. the channel's answer is applied with an optimistic lock; the first definite answer wins
//!    and a contradicting one raises an alert instead of flipping the status;
//! 3. unknown (timeout, 5xx, not found) changes nothing: the job keeps asking, with a doubling
//!    delay, until a definite answer or the payment's expiry, when the order is closed.

use crate::auth::AppAuth;
use crate::{Engine, EngineError, JOB_PAYMENT_SYNC};
use payrail_channels::{NextAction, QueryRequest, SubmitRequest, SubmitResponse};
use payrail_domain::input::{ExpiresIn, Metadata, NotifyUrl, OutTradeNo, PaymentMethod, Subject};
use payrail_domain::payment::{decide, Decision};
use payrail_domain::{
    AttemptStatus, ChannelOutcome, Currency, EventId, Money, PaymentId, PaymentStatus,
};
use payrail_store::{
    Admission, AdmissionOutcome, AlertRecord, AttemptRecord, CreatePaymentOutcome,
    IdempotencyCompletion, JobRecord, JobUpdate, NewEvent, NewJob, NewPayment, PaymentRecord,
    Transition,
};
use std::time::{Duration, Instant};

/// Retries of a status change that lost an optimistic-lock race to another writer.
const APPLY_RETRIES_MAX: usize = 4;

/// A validated create-payment request.
#[derive(Debug, Clone)]
pub struct CreatePayment {
    pub amount: Money,
    pub out_trade_no: OutTradeNo,
    pub subject: Subject,
    pub method: PaymentMethod,
    pub expires_in: ExpiresIn,
    pub notify_url: Option<NotifyUrl>,
    pub metadata: Metadata,
    /// What the method needs from the payer, passed to the channel and never stored.
    pub payer: PayerDetails,
}

/// Per-method inputs: the payment code a cashier scanned (barcode methods), the payer's IP (H5),
/// the payer's id at the channel (JSAPI) and where to send the browser back (WAP/web).
#[derive(Debug, Clone, Default)]
pub struct PayerDetails {
    pub auth_code: Option<payrail_domain::Secret<String>>,
    pub client_ip: Option<std::net::IpAddr>,
    pub payer_id: Option<String>,
    pub return_url: Option<String>,
}

/// The idempotency key a request came with, so a retry after a crash recognises its payment.
#[derive(Debug, Clone, Copy)]
pub struct IdemRef<'a> {
    pub key: &'a str,
    pub request_hash: &'a str,
    /// The request's claim on the key; saving its response needs it.
    pub token: &'a str,
}

/// What [`Engine::create_payment`] did.
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    Done(Box<PaymentResult>),
    /// The admission made in the create write refused the request: nothing was done.
    Refused(AdmissionOutcome),
}

#[derive(Debug, Clone)]
pub struct PaymentResult {
    pub payment: PaymentRecord,
    pub next_action: Option<NextAction>,
    /// The request's idempotent response (200, the payment) was saved with the final status
    /// change; the caller must not save it again.
    pub idempotency_completed: bool,
}

impl Engine {
    pub async fn create_payment(
        &self,
        app: &AppAuth,
        req: CreatePayment,
        idem: Option<IdemRef<'_>>,
        admission: Option<Admission>,
    ) -> Result<CreateOutcome, EngineError> {
        // Checks that can refuse the request before its write. A refusal still claims the
        // request's nonce and key first (`refuse_create`): a retry of a request that already
        // completed gets its stored answer, not today's routing or load (review finding: a
        // replay answered "no channel" after an account was disabled), and a refused request
        // cannot be replayed later.
        if !app.merchant_active {
            return self
                .refuse_create(admission, EngineError::MerchantFrozen)
                .await;
        }
        let Some((account_id, connector)) = self.route(req.method) else {
            return self
                .refuse_create(
                    admission,
                    EngineError::NoChannel(req.method.as_str().into()),
                )
                .await;
        };
        // A call slot first: if the channel is saturated, fail fast before anything is written.
        let bulkhead = account_id.map_or_else(|| connector.name().to_string(), |id| id.to_string());
        let _permit = match self.channel_permit(&bulkhead).await {
            Ok(p) => p,
            Err(e) => return self.refuse_create(admission, e).await,
        };
        let now = self.now_ms();
        let status = PaymentStatus::Created
            .transition(PaymentStatus::Processing)
            .map_err(|e| EngineError::Internal(e.to_string()))?;
        let payment = PaymentRecord {
            id: self.ids.next(),
            merchant_id: app.merchant_id,
            app_id: app.app_id,
            out_trade_no: req.out_trade_no.as_str().to_string(),
            amount_minor: req.amount.amount_minor(),
            currency: req.amount.currency().code().to_string(),
            subject: req.subject.as_str().to_string(),
            method: req.method.as_str().to_string(),
            channel: connector.name().to_string(),
            status,
            version: 1,
            notify_url: req.notify_url.map(|u| u.into_string()),
            metadata: serde_json::to_string(req.metadata.as_map())
                .map_err(|e| EngineError::Internal(e.to_string()))?,
            channel_trade_no: None,
            failure_code: None,
            failure_message: None,
            idempotency_key: idem.map(|i| i.key.to_string()),
            request_hash: idem.map(|i| i.request_hash.to_string()),
            expires_at_ms: now.saturating_add(req.expires_in.seconds().saturating_mul(1000)),
            paid_at_ms: None,
            created_at_ms: now,
            updated_at_ms: now,
            amount_refunded_minor: 0,
            refund_reserved_minor: 0,
        };
        // Recorded as processing before the call: from the moment it is sent, its outcome is
        // unknown until the channel says otherwise.
        let attempt = AttemptRecord {
            id: self.ids.next(),
            payment_id: payment.id,
            merchant_id: payment.merchant_id,
            channel: payment.channel.clone(),
            status: AttemptStatus::Processing,
            version: 1,
            channel_trade_no: None,
            failure_code: None,
            failure_message: None,
            created_at_ms: now,
            updated_at_ms: now,
            channel_account_id: account_id,
        };
        let first_sync_ms = i64::try_from(self.config.channel_timeout_ms)
            .unwrap_or(i64::MAX)
            .saturating_add(self.config.sync_first_delay_ms);
        let new = NewPayment {
            payment: payment.clone(),
            attempt: attempt.clone(),
            job: Some(NewJob {
                kind: JOB_PAYMENT_SYNC.into(),
                subject_id: payment.id.to_string(),
                run_at_ms: now.saturating_add(first_sync_ms),
            }),
            admission,
        };
        let created = self.store.create_payment(&new).await?;
        if let CreatePaymentOutcome::NotAdmitted(outcome) = created {
            return Ok(CreateOutcome::Refused(outcome));
        }
        if created == CreatePaymentOutcome::MerchantNotActive {
            // Frozen since the app was cached (possibly by another process).
            self.invalidate_merchant(app.merchant_id);
            return Err(EngineError::MerchantFrozen);
        }
        if let CreatePaymentOutcome::DuplicateOutTradeNo(existing) = created {
            // The same request, retried after its first try died mid-way: answer with the
            // payment it created (the sync job is driving it) rather than an error.
            let same_request = idem.is_some_and(|i| {
                existing.idempotency_key.as_deref() == Some(i.key)
                    && existing.request_hash.as_deref() == Some(i.request_hash)
            });
            if same_request {
                return Ok(CreateOutcome::Done(Box::new(PaymentResult {
                    payment: *existing,
                    next_action: None,
                    idempotency_completed: false,
                })));
            }
            return Err(EngineError::DuplicateOutTradeNo);
        }
        self.metrics.inc(
            "payrail_payments_created_total",
            "Payments created, by channel.",
            &[("channel", connector.name())],
        );
        let mut submit = SubmitRequest::new(
            attempt.id,
            req.amount,
            payment.subject.clone(),
            req.method,
            now,
            payment.expires_at_ms,
        );
        submit.auth_code = req.payer.auth_code;
        submit.client_ip = req.payer.client_ip;
        submit.payer_id = req.payer.payer_id;
        submit.return_url = req.payer.return_url;
        let started = Instant::now();
        let response =
            match tokio::time::timeout(self.channel_timeout(), connector.submit(&submit)).await {
                Ok(r) => r,
                Err(_) => SubmitResponse {
                    outcome: ChannelOutcome::unknown("timeout"),
                    next_action: None,
                },
            };
        self.observe_channel(connector.name(), "submit", &response.outcome, started);
        let (payment, idempotency_completed) = self
            .apply_outcome_saving(payment, attempt, &response.outcome, idem)
            .await?;
        if !payment.status.is_terminal() {
            // The answer came back (processing or unknown): the first status query is due a
            // short delay from now, not after a full channel timeout.
            self.store
                .update_job(&JobUpdate::Schedule {
                    kind: JOB_PAYMENT_SYNC.into(),
                    subject_id: payment.id.to_string(),
                    run_at_ms: self
                        .now_ms()
                        .saturating_add(if req.method.is_payment_code() {
                            // The payer is confirming on their phone: ask often (barcode flow).
                            self.config.barcode_poll_ms
                        } else {
                            self.config.sync_first_delay_ms
                        }),
                    last_error: None,
                })
                .await?;
        }
        let next_action = (!payment.status.is_terminal())
            .then_some(response.next_action)
            .flatten();
        Ok(CreateOutcome::Done(Box::new(PaymentResult {
            payment,
            next_action,
            idempotency_completed,
        })))
    }

    /// Claims a refused create's nonce and key, then returns the refusal; if the admission
    /// itself refuses (a replay, a mismatch, a key in use, a reused nonce), that is the answer.
    async fn refuse_create(
        &self,
        admission: Option<Admission>,
        err: EngineError,
    ) -> Result<CreateOutcome, EngineError> {
        if let Some(a) = admission {
            let outcome = self.store.admit(&a).await?;
            if !matches!(
                outcome,
                AdmissionOutcome::Admitted(None)
                    | AdmissionOutcome::Admitted(Some(payrail_store::IdempotencyState::New))
            ) {
                return Ok(CreateOutcome::Refused(outcome));
            }
        }
        Err(err)
    }

    /// A call slot of `channel`'s bulkhead, or `ChannelBusy` (counted) after the queue time.
    pub(crate) async fn channel_permit(
        &self,
        channel: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, EngineError> {
        self.bulkheads.acquire(channel).await.map_err(|busy| {
            self.metrics.inc(
                "payrail_channel_busy_total",
                "Channel calls refused because the channel's call slots were all taken.",
                &[("channel", channel)],
            );
            EngineError::ChannelBusy(busy)
        })
    }

    pub(crate) fn channel_timeout(&self) -> Duration {
        Duration::from_millis(self.config.channel_timeout_ms)
    }

    pub(crate) fn observe_channel(
        &self,
        channel: &str,
        op: &str,
        outcome: &ChannelOutcome,
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
        if let ChannelOutcome::Unknown { reason } = outcome {
            tracing::warn!(channel, op, reason = %reason, "channel outcome unknown");
        }
    }

    /// Applies a channel outcome to an attempt and its payment, retrying if another writer
    /// changed them meanwhile. Returns the payment as stored afterwards.
    pub async fn apply_outcome(
        &self,
        payment: PaymentRecord,
        attempt: AttemptRecord,
        outcome: &ChannelOutcome,
    ) -> Result<PaymentRecord, EngineError> {
        Ok(self
            .apply_outcome_saving(payment, attempt, outcome, None)
            .await?
            .0)
    }

    /// [`Self::apply_outcome`] that, if the change ends the payment, also saves `idem`'s
    /// response (200 and the payment) in the same transaction. Returns whether it did.
    async fn apply_outcome_saving(
        &self,
        mut payment: PaymentRecord,
        mut attempt: AttemptRecord,
        outcome: &ChannelOutcome,
        idem: Option<IdemRef<'_>>,
    ) -> Result<(PaymentRecord, bool), EngineError> {
        // Replaced when a wallet payment's confirm is refused (its freeze was released).
        let mut replaced: Option<ChannelOutcome> = None;
        for _ in 0..APPLY_RETRIES_MAX {
            let outcome = replaced.as_ref().unwrap_or(outcome);
            let next = match decide(attempt.status, outcome) {
                Decision::NoChange => return Ok((payment, false)),
                Decision::Conflict { current, reported } => {
                    self.raise_conflict(&payment, current, reported).await?;
                    return Ok((payment, false));
                }
                Decision::Transition(next) => next,
            };
            let next_payment = next.payment_status();
            if next_payment != payment.status && !payment.status.can_become(next_payment) {
                return Err(EngineError::Internal(format!(
                    "payment {} is {} and cannot become {next_payment}",
                    payment.id, payment.status
                )));
            }
            let now = self.now_ms();
            let (channel_trade_no, failure, paid_at_ms) = match outcome {
                ChannelOutcome::Succeeded {
                    channel_trade_no,
                    paid_at_ms,
                } => (
                    channel_trade_no.clone(),
                    None,
                    Some(paid_at_ms.unwrap_or(now)),
                ),
                ChannelOutcome::Failed { code, message } => {
                    (None, Some((code.clone(), message.clone())), None)
                }
                ChannelOutcome::Processing { channel_trade_no } => {
                    (channel_trade_no.clone(), None, None)
                }
                _ => (None, None, None),
            };
            let mut updated = payment.clone();
            updated.status = next_payment;
            updated.version = payment.version.saturating_add(1);
            updated.channel_trade_no = channel_trade_no.clone().or(updated.channel_trade_no);
            updated.failure_code = failure.as_ref().map(|f| f.0.clone());
            updated.failure_message = failure.as_ref().map(|f| f.1.clone());
            updated.paid_at_ms = paid_at_ms.or(updated.paid_at_ms);
            updated.updated_at_ms = now;
            let terminal = next.is_terminal();
            let event = terminal.then(|| self.payment_event(&updated, now));
            // The posting set (or a wallet freeze's release) commits with the status change.
            let ledger = if next_payment != payment.status {
                self.transition_ledger(&updated, next_payment, now).await?
            } else {
                None
            };
            let t = Transition {
                payment_id: payment.id,
                payment_version: payment.version,
                payment_status: next_payment,
                attempt_id: attempt.id,
                attempt_version: attempt.version,
                attempt_status: next,
                channel_trade_no,
                failure_code: updated.failure_code.clone(),
                failure_message: updated.failure_message.clone(),
                paid_at_ms,
                now_ms: now,
                event,
                job: terminal.then(|| JobUpdate::Delete {
                    kind: JOB_PAYMENT_SYNC.into(),
                    subject_id: payment.id.to_string(),
                }),
                // A finished payment has no next action, so this is exactly the response the
                // API would send (crate::views is the one place that shapes it).
                idempotency: idem.filter(|_| terminal).map(|i| IdempotencyCompletion {
                    scope: payment.merchant_id.to_string(),
                    key: i.key.to_string(),
                    token: i.token.to_string(),
                    status: 200,
                    body: crate::views::json_text(&crate::views::payment_json(&updated, None)),
                }),
                ledger,
            };
            let applied = match self.store.apply_transition(&t).await {
                Err(payrail_store::StoreError::LedgerRefused { code, .. })
                    if payment.channel == payrail_domain::clearing::WALLET_CHANNEL
                        && next_payment == PaymentStatus::Succeeded =>
                {
                    // The freeze expired or was released before the confirm: the payment
                    // cannot succeed any more. Nothing was written; apply that instead.
                    tracing::warn!(payment_id = %payment.id, code = %code, "wallet confirm refused");
                    replaced = Some(ChannelOutcome::Failed {
                        code: "wallet_hold_released".into(),
                        message: format!("the wallet freeze could not be confirmed: {code}"),
                    });
                    continue;
                }
                other => other?,
            };
            if applied {
                if t.event.is_some() {
                    // Wakes this process's webhook dispatcher and event-feed pump.
                    self.feed.outbox_written();
                }
                self.metrics.inc(
                    "payrail_payment_transitions_total",
                    "Payment status changes, by channel and new status.",
                    &[
                        ("channel", &payment.channel),
                        ("status", next_payment.as_str()),
                    ],
                );
                tracing::info!(payment_id = %payment.id, from = %payment.status, to = %next_payment, "payment status changed");
                let saved = t.idempotency.is_some();
                return Ok((updated, saved));
            }
            // Lost the race: read what won and decide again.
            payment = self
                .store
                .get_payment_any(payment.id)
                .await?
                .ok_or(EngineError::NotFound("payment"))?;
            attempt = self
                .store
                .get_attempts(payment.id)
                .await?
                .into_iter()
                .find(|a| a.id == attempt.id)
                .ok_or(EngineError::NotFound("attempt"))?;
        }
        Err(EngineError::Internal(format!(
            "payment {}: optimistic-lock retries exhausted",
            payment.id
        )))
    }

    fn payment_event(&self, p: &PaymentRecord, now_ms: i64) -> NewEvent {
        let id: EventId = self.ids.next();
        let event_type = format!("payment.{}", p.status);
        let payload = serde_json::json!({
            "id": id,
            "object": "event",
            "type": event_type,
            "created": now_ms.div_euclid(1000),
            "data": { "object": crate::views::payment_json(p, None) },
        });
        NewEvent {
            id: id.to_string(),
            merchant_id: p.merchant_id,
            event_type,
            object_id: p.id.to_string(),
            payload: crate::views::json_text(&payload),
            created_at_ms: now_ms,
        }
    }

    async fn raise_conflict(
        &self,
        p: &PaymentRecord,
        current: AttemptStatus,
        reported: &str,
    ) -> Result<(), EngineError> {
        tracing::error!(payment_id = %p.id, current = %current, reported, "conflicting channel result; status kept");
        self.metrics.inc(
            "payrail_channel_conflicts_total",
            "Definite channel results contradicting a final status.",
            &[("channel", &p.channel)],
        );
        self.store
            .insert_alert(&AlertRecord {
                kind: "channel_conflict".into(),
                subject_id: p.id.to_string(),
                detail: format!("attempt is {current}, channel now reports {reported}"),
                created_at_ms: self.now_ms(),
            })
            .await?;
        Ok(())
    }

    pub(crate) fn query_request(
        &self,
        p: &PaymentRecord,
        a: &AttemptRecord,
    ) -> Result<QueryRequest, EngineError> {
        let currency =
            Currency::parse(&p.currency).map_err(|e| EngineError::Internal(e.to_string()))?;
        Ok(QueryRequest {
            attempt_id: a.id,
            amount: Money::new(p.amount_minor, currency),
            channel_trade_no: a.channel_trade_no.clone(),
            submitted_at_ms: a.created_at_ms,
            expires_at_ms: p.expires_at_ms,
        })
    }

    pub(crate) async fn open_attempt(
        &self,
        payment_id: PaymentId,
    ) -> Result<Option<AttemptRecord>, EngineError> {
        Ok(self
            .store
            .get_attempts(payment_id)
            .await?
            .into_iter()
            .rev()
            .find(|a| !a.status.is_terminal()))
    }

    /// Delay before the n-th status query (n starts at 1): first delay, doubling, capped.
    pub fn sync_backoff_ms(&self, n: i64) -> i64 {
        backoff_ms(
            self.config.sync_first_delay_ms,
            self.config.sync_max_delay_ms,
            n,
        )
    }

    /// One run of a status-sync job: ask the channel (or close the order once expired), apply
    /// the answer, and schedule the next run if still open.
    pub async fn sync_payment(&self, job: &JobRecord) -> Result<(), EngineError> {
        let delete = JobUpdate::Delete {
            kind: JOB_PAYMENT_SYNC.into(),
            subject_id: job.subject_id.clone(),
        };
        let Ok(payment_id) = job.subject_id.parse::<PaymentId>() else {
            tracing::error!(subject = %job.subject_id, "sync job names no payment; dropped");
            self.store.update_job(&delete).await?;
            return Ok(());
        };
        let Some(payment) = self.store.get_payment_any(payment_id).await? else {
            self.store.update_job(&delete).await?;
            return Ok(());
        };
        let Some(attempt) = self.open_attempt(payment_id).await? else {
            self.store.update_job(&delete).await?;
            return Ok(());
        };
        let connector = self.connector_for(&attempt)?;
        let req = self.query_request(&payment, &attempt)?;
        let now = self.now_ms();
        let expired = now >= payment.expires_at_ms;
        let Ok(_permit) = self.channel_permit(&Engine::bulkhead_key(&attempt)).await else {
            // The channel is saturated: ask again shortly instead of piling on.
            self.store
                .update_job(&JobUpdate::Schedule {
                    kind: JOB_PAYMENT_SYNC.into(),
                    subject_id: job.subject_id.clone(),
                    run_at_ms: now.saturating_add(self.config.sync_first_delay_ms),
                    last_error: Some("channel busy".into()),
                })
                .await?;
            return Ok(());
        };
        if crate::barcode::is_payment_code(&payment) {
            return self
                .sync_barcode(job, payment, attempt, connector, req)
                .await;
        }
        let started = Instant::now();
        let (op, call) = if expired {
            ("close", connector.close(&req))
        } else {
            ("query", connector.query(&req))
        };
        let outcome = tokio::time::timeout(self.channel_timeout(), call)
            .await
            .unwrap_or_else(|_| ChannelOutcome::unknown("timeout"));
        self.observe_channel(connector.name(), op, &outcome, started);
        let updated = self.apply_outcome(payment, attempt, &outcome).await?;
        if !updated.status.is_terminal() {
            let overdue_ms = now.saturating_sub(updated.expires_at_ms);
            // A channel that can only confirm a close some time after expiry (UnionPay, from
            // its reconciliation files) gets that much longer before a person is called.
            let alert_after_ms = self
                .config
                .unresolved_alert_after_ms
                .saturating_add(connector.capabilities().close_confirm_delay_ms.max(0));
            if overdue_ms >= alert_after_ms {
                // The status-sync job keeps asking (unknown is never failure), but a payment
                // this long past its expiry without a definite answer needs a person.
                let raised = self
                    .store
                    .insert_alert_once(&AlertRecord {
                        kind: "payment_unresolved".into(),
                        subject_id: updated.id.to_string(),
                        detail: format!(
                            "expired {} s ago; the channel still gives no definite answer to {op} (last: {}); check the order at the channel",
                            overdue_ms.div_euclid(1000),
                            match &outcome {
                                ChannelOutcome::Unknown { reason } => reason.as_str(),
                                other => other.label(),
                            }
                        ),
                        created_at_ms: now,
                    })
                    .await?;
                if raised {
                    tracing::error!(payment_id = %updated.id, "payment unresolved long after expiry; alert raised");
                    self.metrics.inc(
                        "payrail_payments_unresolved_total",
                        "Payments still open long after expiry (alert raised).",
                        &[("channel", &updated.channel)],
                    );
                }
            }
            let mut next = now.saturating_add(self.sync_backoff_ms(job.attempts));
            if !expired {
                // Wake up for the expiry close even if the backoff has grown past it.
                next = next.min(updated.expires_at_ms);
            }
            let last_error = match &outcome {
                ChannelOutcome::Unknown { reason } => Some(reason.clone()),
                other => Some(other.label().to_string()),
            };
            self.store
                .update_job(&JobUpdate::Schedule {
                    kind: JOB_PAYMENT_SYNC.into(),
                    subject_id: job.subject_id.clone(),
                    run_at_ms: next,
                    last_error,
                })
                .await?;
        }
        Ok(())
    }

    /// Operator re-query: asks the channel about the payment's latest attempt now, finished or
    /// not, and applies the answer. For an open payment that may finish it; for a finished one a
    /// contradicting answer raises an alert and changes nothing (the first definite result wins).
    pub async fn requery_payment(
        &self,
        payment_id: PaymentId,
    ) -> Result<PaymentRecord, EngineError> {
        let payment = self
            .store
            .get_payment_any(payment_id)
            .await?
            .ok_or(EngineError::NotFound("payment"))?;
        let attempt = self
            .store
            .get_attempts(payment_id)
            .await?
            .pop()
            .ok_or_else(|| EngineError::Internal(format!("payment {payment_id} has no attempt")))?;
        let connector = self.connector_for(&attempt)?;
        let req = self.query_request(&payment, &attempt)?;
        let _permit = self.channel_permit(&Engine::bulkhead_key(&attempt)).await?;
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.channel_timeout(), connector.query(&req))
            .await
            .unwrap_or_else(|_| ChannelOutcome::unknown("timeout"));
        self.observe_channel(connector.name(), "query", &outcome, started);
        self.apply_outcome(payment, attempt, &outcome).await
    }

    /// Closes an unpaid payment at the channel and locally. Closing a closed payment is a
    /// no-op; a payment the payer completed meanwhile is reported, not closed.
    pub async fn close_payment(
        &self,
        app: &AppAuth,
        id: PaymentId,
    ) -> Result<PaymentRecord, EngineError> {
        let payment = self
            .store
            .get_payment(app.merchant_id, id)
            .await?
            .ok_or(EngineError::NotFound("payment"))?;
        if payment.status == PaymentStatus::Closed {
            return Ok(payment);
        }
        if !payment.status.is_closable() {
            return Err(EngineError::NotClosable(payment.status.to_string()));
        }
        let attempt = self.open_attempt(id).await?.ok_or_else(|| {
            EngineError::Internal(format!("payment {id} is open without an open attempt"))
        })?;
        let connector = self.connector_for(&attempt)?;
        let req = self.query_request(&payment, &attempt)?;
        let _permit = self.channel_permit(&Engine::bulkhead_key(&attempt)).await?;
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.channel_timeout(), connector.close(&req))
            .await
            .unwrap_or_else(|_| ChannelOutcome::unknown("timeout"));
        self.observe_channel(connector.name(), "close", &outcome, started);
        let updated = self.apply_outcome(payment, attempt, &outcome).await?;
        match updated.status {
            PaymentStatus::Closed => Ok(updated),
            s if s.is_terminal() => Err(EngineError::NotClosable(s.to_string())),
            _ => Err(EngineError::ChannelUnconfirmed(match outcome {
                ChannelOutcome::Unknown { reason } => reason,
                other => other.label().to_string(),
            })),
        }
    }

    pub async fn get_payment(
        &self,
        app: &AppAuth,
        id: PaymentId,
    ) -> Result<PaymentRecord, EngineError> {
        self.store
            .get_payment(app.merchant_id, id)
            .await?
            .ok_or(EngineError::NotFound("payment"))
    }

    pub async fn get_payment_by_out_trade_no(
        &self,
        app: &AppAuth,
        otn: &OutTradeNo,
    ) -> Result<PaymentRecord, EngineError> {
        self.store
            .get_payment_by_out_trade_no(app.merchant_id, otn.as_str())
            .await?
            .ok_or(EngineError::NotFound("payment"))
    }

    /// One page, newest first, and whether more follow.
    pub async fn list_payments(
        &self,
        app: &AppAuth,
        limit: u32,
        starting_after: Option<PaymentId>,
    ) -> Result<(Vec<PaymentRecord>, bool), EngineError> {
        let limit = limit.clamp(1, crate::merchants::PAGE_LIMIT_MAX);
        let mut rows = self
            .store
            .list_payments(app.merchant_id, limit.saturating_add(1), starting_after)
            .await?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((rows, has_more))
    }
}

/// Most payments one batch re-query takes.
pub const REQUERY_BATCH_MAX: usize = 1_000;
/// Re-queries of one batch in flight at once (each holds a channel call slot).
const REQUERY_CONCURRENCY: usize = 8;

impl Engine {
    /// The open payments (each has a status-sync job), soonest due first.
    pub async fn open_payment_ids(&self, limit: usize) -> Result<Vec<PaymentId>, EngineError> {
        let limit = u32::try_from(limit.min(REQUERY_BATCH_MAX)).unwrap_or(0);
        Ok(self
            .store
            .list_job_subjects(JOB_PAYMENT_SYNC, limit)
            .await?
            .into_iter()
            .filter_map(|s| s.parse().ok())
            .collect())
    }

    /// Re-queries many payments at the channel (the operator's batch re-query), a few at a
    /// time; `progress` is called after each. The answers come back in the order given.
    pub async fn requery_batch(
        self: &std::sync::Arc<Self>,
        ids: Vec<PaymentId>,
        progress: impl Fn(usize) + Send + Sync + 'static,
    ) -> Vec<(PaymentId, Result<PaymentRecord, EngineError>)> {
        let ids: Vec<PaymentId> = ids.into_iter().take(REQUERY_BATCH_MAX).collect();
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(REQUERY_CONCURRENCY));
        let progress = std::sync::Arc::new(progress);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut set = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().copied().enumerate() {
            let (engine, permits, progress, done) = (
                self.clone(),
                permits.clone(),
                progress.clone(),
                done.clone(),
            );
            set.spawn(async move {
                let _p = permits.acquire_owned().await;
                let r = engine.requery_payment(id).await;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                progress(n.saturating_add(1));
                (i, id, r)
            });
        }
        let mut out: Vec<Option<(PaymentId, Result<PaymentRecord, EngineError>)>> =
            ids.iter().map(|_| None).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, id, r)) = joined {
                if let Some(slot) = out.get_mut(i) {
                    *slot = Some((id, r));
                }
            }
        }
        out.into_iter()
            .zip(ids)
            .map(|(r, id)| {
                r.unwrap_or_else(|| {
                    (
                        id,
                        Err(EngineError::Internal("re-query task failed".into())),
                    )
                })
            })
            .collect()
    }
}

/// The status-sync schedule: `first_delay_ms · 2^(n-1)`, at most `max_delay_ms` (n < 1 counts as
/// 1; the doubling stops at 2^30 and saturates).
pub fn backoff_ms(first_delay_ms: i64, max_delay_ms: i64, n: i64) -> i64 {
    let shift = u32::try_from(n.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    first_delay_ms
        .saturating_mul(1i64 << shift)
        .min(max_delay_ms)
}

#[cfg(test)]
mod tests {
    use super::backoff_ms;

    #[test]
    fn sync_backoff_doubles_from_the_first_delay_up_to_the_cap() {
        // The defaults: 5 s first, 5 min cap.
        let (first, cap) = (5_000, 300_000);
        let table: &[(i64, i64)] = &[
            (i64::MIN, 5_000),
            (-1, 5_000),
            (0, 5_000),
            (1, 5_000),
            (2, 10_000),
            (3, 20_000),
            (4, 40_000),
            (5, 80_000),
            (6, 160_000),
            (7, 300_000), // 320 s, capped
            (8, 300_000),
            (31, 300_000),
            (64, 300_000), // the shift stops at 30: no overflow
            (i64::MAX, 300_000),
        ];
        for &(n, want) in table {
            assert_eq!(backoff_ms(first, cap, n), want, "n = {n}");
        }
        // Never shrinks, never passes the cap.
        for n in 1..100 {
            let (a, b) = (backoff_ms(first, cap, n), backoff_ms(first, cap, n + 1));
            assert!(a <= b && b <= cap, "n = {n}: {a} then {b}");
        }
        // A huge first delay saturates instead of overflowing; a first delay above the cap is
        // the cap.
        assert_eq!(backoff_ms(i64::MAX / 2, i64::MAX, 3), i64::MAX);
        assert_eq!(backoff_ms(10_000, 4_000, 1), 4_000);
    }
}
