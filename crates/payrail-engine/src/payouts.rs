//! Payouts (出款/提现): create → record and post → send (job) → apply the bank's answer; reads.
//!
//! The order of writes is what keeps the merchant's available balance from being paid out
//! twice, under concurrency and crashes:
//! 1. one transaction claims the request's nonce and key, records the payout `processing`,
//!    posts `po_…:payout` (D merchant available, C payout clearing) and schedules its
//!    `payout_send` job, due at once (`Store::create_payout`). The available balance's
//!    no-overdraft limit refuses a payout it cannot cover, under the ledger's write lock, so
//!    concurrent payouts never together take more than the balance; a refused one writes
//!    nothing but the admission (409 `insufficient_available_balance`);
//! 2. the job (leased like `refund_sync`; any worker process) sends the payout to the payout
//!    bank and applies its answer with an optimistic lock: `paid` is final; a definite failure
//!    is `failed` and posts `po_…:payout_reversal` (the amount back to available) in the same
//!    transaction, with the `payout.*` event;
//! 3. unknown (timeout, 5xx, "not found") and processing change nothing: the amount stays in
//!    payout clearing and the job asks again with a growing delay; during its first runs it
//!    sends the same payout again if the bank does not know it (our payout id is the bank's
//!    request number, so this is the same transfer). An unknown answer never fails a payout —
//!    the bank may be paying it — and a payout without a definite answer for
//!    `unresolved_alert_after_ms` raises `payout_unresolved`; the job keeps asking.

use crate::auth::AppAuth;
use crate::payments::IdemRef;
use crate::{Engine, EngineError, JOB_PAYOUT_SEND};
use payrail_channels::payout::{PayoutOutcome, PayoutRequest};
use payrail_domain::input::{InputError, NotifyUrl, OutPayoutNo, PayoutDescription};
use payrail_domain::payout::{decide, PayoutDecision, PayoutReport};
use payrail_domain::{Currency, EventId, Money, PayoutId, PayoutStatus};
use payrail_store::{
    Admission, AdmissionOutcome, AlertRecord, CreatePayoutOutcome, IdempotencyCompletion,
    JobRecord, JobUpdate, NewEvent, NewJob, NewPayout, PayoutFilter, PayoutRecord,
    PayoutTransition,
};
use std::time::Instant;

/// Retries of a payout status change that lost an optimistic-lock race to another writer.
const APPLY_RETRIES_MAX: usize = 4;

/// Job runs (counted by the job's leases) during which a payout the bank does not know is sent
/// again — same payout id and amount, so the same transfer at the bank. This covers a request
/// lost before it reached the bank (a crash mid-send, a timeout); after that the job only
/// queries.
const PAYOUT_SENDS_MAX: i64 = 3;

/// A validated create-payout request.
#[derive(Debug, Clone)]
pub struct CreatePayout {
    /// Minor units of `currency`, > 0.
    pub amount_minor: i64,
    pub currency: Currency,
    pub out_payout_no: OutPayoutNo,
    pub description: Option<PayoutDescription>,
    /// Where `payout.*` webhooks go.
    pub notify_url: Option<NotifyUrl>,
}

/// What [`Engine::create_payout`] did.
#[derive(Debug, Clone)]
pub enum CreatePayoutResult {
    Done(Box<PayoutResult>),
    /// The admission made in the payout's write refused the request: nothing was done.
    Refused(AdmissionOutcome),
}

#[derive(Debug, Clone)]
pub struct PayoutResult {
    pub payout: PayoutRecord,
    /// The request's idempotent response (200, the payout) was saved in the payout's own
    /// write; the caller must not save it again.
    pub idempotency_completed: bool,
}

/// The bank's answer as the state machine sees it.
fn report(outcome: &PayoutOutcome) -> PayoutReport {
    match outcome {
        PayoutOutcome::Paid { .. } => PayoutReport::Paid,
        PayoutOutcome::Processing { .. } => PayoutReport::Processing,
        PayoutOutcome::Failed { .. } => PayoutReport::Failed,
        PayoutOutcome::Unknown { .. } => PayoutReport::Unknown,
    }
}

fn currency_of(code: &str) -> Result<Currency, EngineError> {
    Currency::parse(code).map_err(|e| EngineError::Internal(e.to_string()))
}

impl Engine {
    /// Pays out part of the app's merchant's available balance to its bank account. Answers at
    /// once with the payout `processing`; the `payout_send` job sends it.
    pub async fn create_payout(
        &self,
        app: &AppAuth,
        req: CreatePayout,
        idem: Option<IdemRef<'_>>,
        admission: Option<Admission>,
    ) -> Result<CreatePayoutResult, EngineError> {
        if req.amount_minor <= 0 || req.amount_minor > Money::MAX_PAYMENT_MINOR {
            return Err(InputError::new(
                "amount",
                "amount_invalid",
                format!(
                    "amount must be an integer number of minor units from 1 to {}",
                    Money::MAX_PAYMENT_MINOR
                ),
            )
            .into());
        }
        let now = self.now_ms();
        let payout = PayoutRecord {
            id: self.ids.next(),
            merchant_id: app.merchant_id,
            app_id: app.app_id,
            out_payout_no: req.out_payout_no.into_string(),
            amount_minor: req.amount_minor,
            currency: req.currency.code().to_string(),
            description: req.description.map(|d| d.into_string()),
            bank: self.payout_bank.name().to_string(),
            // Recorded as processing, with its money already in payout clearing, before the
            // bank is asked: from the moment it may have been sent, its outcome is unknown.
            status: PayoutStatus::Processing,
            version: 1,
            bank_reference: None,
            failure_code: None,
            failure_message: None,
            notify_url: req.notify_url.map(|u| u.into_string()),
            idempotency_key: idem.map(|i| i.key.to_string()),
            request_hash: idem.map(|i| i.request_hash.to_string()),
            paid_at_ms: None,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let new = NewPayout {
            job: NewJob {
                kind: JOB_PAYOUT_SEND.into(),
                subject_id: payout.id.to_string(),
                // Due at once: a worker sends it on its next poll.
                run_at_ms: now,
            },
            admission,
            idempotency: idem.map(|i| IdempotencyCompletion {
                scope: payout.merchant_id.to_string(),
                key: i.key.to_string(),
                token: i.token.to_string(),
                status: 200,
                body: crate::views::payout_json(&payout).to_string(),
            }),
            payout: payout.clone(),
        };
        match self.store.create_payout(&new).await? {
            CreatePayoutOutcome::Created => {}
            CreatePayoutOutcome::NotAdmitted(outcome) => {
                return Ok(CreatePayoutResult::Refused(outcome))
            }
            CreatePayoutOutcome::MerchantNotActive => return Err(EngineError::MerchantFrozen),
            CreatePayoutOutcome::InsufficientBalance { available_minor } => {
                self.metrics.inc(
                    "payrail_payouts_refused_total",
                    "Payouts refused because the available balance could not cover them.",
                    &[("currency", req.currency.code())],
                );
                return Err(EngineError::InsufficientAvailableBalance {
                    available_minor,
                    requested_minor: req.amount_minor,
                    currency: req.currency,
                });
            }
            CreatePayoutOutcome::DuplicateOutPayoutNo(existing) => {
                // The same request, retried after its first try died mid-way: answer with the
                // payout it created (its job is driving it) rather than an error.
                let same_request = idem.is_some_and(|i| {
                    existing.idempotency_key.as_deref() == Some(i.key)
                        && existing.request_hash.as_deref() == Some(i.request_hash)
                });
                if same_request {
                    return Ok(CreatePayoutResult::Done(Box::new(PayoutResult {
                        payout: *existing,
                        idempotency_completed: false,
                    })));
                }
                return Err(EngineError::DuplicateOutPayoutNo);
            }
        }
        self.metrics.inc(
            "payrail_payouts_created_total",
            "Payouts recorded, by bank.",
            &[("bank", &payout.bank)],
        );
        tracing::info!(payout_id = %payout.id, merchant_id = %payout.merchant_id, amount_minor = payout.amount_minor, currency = %payout.currency, "payout recorded");
        Ok(CreatePayoutResult::Done(Box::new(PayoutResult {
            idempotency_completed: new.idempotency.is_some(),
            payout,
        })))
    }

    fn payout_request(&self, p: &PayoutRecord) -> Result<PayoutRequest, EngineError> {
        Ok(PayoutRequest {
            payout_id: p.id,
            merchant_id: p.merchant_id,
            amount: Money::new(p.amount_minor, currency_of(&p.currency)?),
            description: p.description.clone(),
            requested_at_ms: p.created_at_ms,
        })
    }

    /// One bank call for a payout, under the engine's channel timeout (past it: unknown).
    async fn call_bank(&self, op: &'static str, req: &PayoutRequest) -> PayoutOutcome {
        let started = Instant::now();
        let bank = self.payout_bank.clone();
        let call = async {
            if op == "query_payout" {
                bank.query(req).await
            } else {
                bank.send(req).await
            }
        };
        let outcome = tokio::time::timeout(self.channel_timeout(), call)
            .await
            .unwrap_or_else(|_| PayoutOutcome::unknown("timeout"));
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let name = bank.name();
        self.metrics.observe_us(
            "payrail_channel_call_duration_seconds",
            "Latency of channel calls.",
            &[("channel", name), ("op", op)],
            us,
        );
        self.metrics.inc(
            "payrail_channel_calls_total",
            "Channel calls by outcome.",
            &[("channel", name), ("op", op), ("outcome", outcome.label())],
        );
        if let PayoutOutcome::Unknown { reason } = &outcome {
            tracing::warn!(bank = name, op, payout_id = %req.payout_id, reason = %reason, "payout outcome unknown");
        }
        outcome
    }

    /// One run of a `payout_send` job: send the payout (first run; again while the bank does
    /// not know it, during the first runs) or ask the bank about it, apply a definite answer,
    /// and schedule the next run with a growing delay while it stays open.
    pub async fn run_payout_job(&self, job: &JobRecord) -> Result<(), EngineError> {
        let delete = JobUpdate::Delete {
            kind: JOB_PAYOUT_SEND.into(),
            subject_id: job.subject_id.clone(),
        };
        let Ok(payout_id) = job.subject_id.parse::<PayoutId>() else {
            tracing::error!(subject = %job.subject_id, "payout job names no payout; dropped");
            self.store.update_job(&delete).await?;
            return Ok(());
        };
        let Some(payout) = self.store.get_payout(None, payout_id).await? else {
            self.store.update_job(&delete).await?;
            return Ok(());
        };
        if payout.status.is_terminal() {
            self.store.update_job(&delete).await?;
            return Ok(());
        }
        let request = self.payout_request(&payout)?;
        let now = self.now_ms();
        let (mut op, mut outcome) = if job.attempts <= 1 {
            ("send_payout", self.call_bank("send_payout", &request).await)
        } else {
            (
                "query_payout",
                self.call_bank("query_payout", &request).await,
            )
        };
        if op == "query_payout"
            && matches!(outcome, PayoutOutcome::Unknown { .. })
            && job.attempts <= PAYOUT_SENDS_MAX
        {
            // The bank may never have received it (a crash or timeout before it arrived):
            // send the same payout again — the same request number, so the same transfer.
            op = "send_payout";
            outcome = self.call_bank(op, &request).await;
        }
        let updated = self.apply_payout_outcome(payout, &outcome).await?;
        if updated.status.is_terminal() {
            return Ok(());
        }
        let open_ms = now.saturating_sub(updated.created_at_ms);
        if open_ms >= self.config.unresolved_alert_after_ms {
            // The job keeps asking (unknown is never failure, and the amount stays in payout
            // clearing), but a payout this long without a definite answer needs a person.
            let raised = self
                .store
                .insert_alert_once(&AlertRecord {
                    kind: "payout_unresolved".into(),
                    subject_id: updated.id.to_string(),
                    detail: format!(
                        "recorded {} s ago; the bank still gives no definite answer to {op} (last: {}); check the transfer at the bank",
                        open_ms.div_euclid(1000),
                        match &outcome {
                            PayoutOutcome::Unknown { reason } => reason.as_str(),
                            other => other.label(),
                        }
                    ),
                    created_at_ms: now,
                })
                .await?;
            if raised {
                tracing::error!(payout_id = %updated.id, "payout unresolved; alert raised");
                self.metrics.inc(
                    "payrail_payouts_unresolved_total",
                    "Payouts without a definite bank answer for long (alert raised).",
                    &[("bank", &updated.bank)],
                );
            }
        }
        let last_error = match &outcome {
            PayoutOutcome::Unknown { reason } => Some(reason.clone()),
            other => Some(other.label().to_string()),
        };
        self.store
            .update_job(&JobUpdate::Schedule {
                kind: JOB_PAYOUT_SEND.into(),
                subject_id: job.subject_id.clone(),
                run_at_ms: now.saturating_add(self.sync_backoff_ms(job.attempts)),
                last_error,
            })
            .await?;
        Ok(())
    }

    /// Applies a bank's answer to a payout, retrying if another writer changed it meanwhile.
    /// Returns the payout as stored afterwards.
    pub async fn apply_payout_outcome(
        &self,
        mut payout: PayoutRecord,
        outcome: &PayoutOutcome,
    ) -> Result<PayoutRecord, EngineError> {
        for _ in 0..APPLY_RETRIES_MAX {
            let next = match decide(payout.status, report(outcome)) {
                PayoutDecision::NoChange => return Ok(payout),
                PayoutDecision::Conflict { current, reported } => {
                    self.raise_payout_conflict(&payout, current, reported)
                        .await?;
                    return Ok(payout);
                }
                PayoutDecision::Transition(next) => next,
            };
            let now = self.now_ms();
            let mut updated = payout.clone();
            updated.status = next;
            updated.version = payout.version.saturating_add(1);
            updated.updated_at_ms = now;
            match outcome {
                PayoutOutcome::Paid {
                    bank_reference,
                    paid_at_ms,
                } => {
                    updated.bank_reference = bank_reference.clone().or(updated.bank_reference);
                    updated.paid_at_ms = Some(paid_at_ms.unwrap_or(now));
                }
                PayoutOutcome::Failed { code, message } => {
                    updated.failure_code = Some(code.clone());
                    updated.failure_message = Some(message.clone());
                }
                PayoutOutcome::Processing { .. } | PayoutOutcome::Unknown { .. } => {}
            }
            let t = PayoutTransition {
                payout_id: payout.id,
                payout_version: payout.version,
                status: next,
                bank_reference: updated.bank_reference.clone(),
                failure_code: updated.failure_code.clone(),
                failure_message: updated.failure_message.clone(),
                paid_at_ms: updated.paid_at_ms,
                now_ms: now,
                event: Some(self.payout_event(&updated, now)),
                job: Some(JobUpdate::Delete {
                    kind: JOB_PAYOUT_SEND.into(),
                    subject_id: payout.id.to_string(),
                }),
            };
            if self.store.apply_payout_transition(&t).await? {
                self.metrics.inc(
                    "payrail_payout_transitions_total",
                    "Payout status changes, by bank and new status.",
                    &[("bank", &payout.bank), ("status", next.as_str())],
                );
                tracing::info!(payout_id = %payout.id, from = %payout.status, to = %next, "payout status changed");
                return Ok(updated);
            }
            // Lost the race: read what won and decide again.
            payout = self
                .store
                .get_payout(None, payout.id)
                .await?
                .ok_or(EngineError::NotFound("payout"))?;
        }
        Err(EngineError::Internal(format!(
            "payout {}: optimistic-lock retries exhausted",
            payout.id
        )))
    }

    fn payout_event(&self, p: &PayoutRecord, now_ms: i64) -> NewEvent {
        let id: EventId = self.ids.next();
        let event_type = format!("payout.{}", p.status);
        let payload = serde_json::json!({
            "id": id,
            "object": "event",
            "type": event_type,
            "created": now_ms.div_euclid(1000),
            "data": { "object": crate::views::payout_json(p) },
        });
        NewEvent {
            id: id.to_string(),
            merchant_id: p.merchant_id,
            event_type,
            object_id: p.id.to_string(),
            payload: payload.to_string(),
            created_at_ms: now_ms,
        }
    }

    async fn raise_payout_conflict(
        &self,
        p: &PayoutRecord,
        current: PayoutStatus,
        reported: &str,
    ) -> Result<(), EngineError> {
        tracing::error!(payout_id = %p.id, current = %current, reported, "conflicting bank payout result; status kept");
        self.metrics.inc(
            "payrail_channel_conflicts_total",
            "Definite channel results contradicting a final status.",
            &[("channel", &p.bank)],
        );
        // failed -> paid is the dangerous one: the amount went back to available, but the bank
        // says it transferred it. The status stays (the first definite answer wins); a person
        // must reconcile it before the merchant pays the amount out again.
        self.store
            .insert_alert(&AlertRecord {
                kind: "payout_conflict".into(),
                subject_id: p.id.to_string(),
                detail: format!(
                    "payout of {} {} is {current}, the bank now reports {reported}",
                    p.amount_minor, p.currency
                ),
                created_at_ms: self.now_ms(),
            })
            .await?;
        Ok(())
    }

    pub async fn get_payout(
        &self,
        app: &AppAuth,
        id: PayoutId,
    ) -> Result<PayoutRecord, EngineError> {
        self.store
            .get_payout(Some(app.merchant_id), id)
            .await?
            .ok_or(EngineError::NotFound("payout"))
    }

    pub async fn get_payout_by_out_payout_no(
        &self,
        app: &AppAuth,
        out_payout_no: &OutPayoutNo,
    ) -> Result<PayoutRecord, EngineError> {
        self.store
            .get_payout_by_out_payout_no(app.merchant_id, out_payout_no.as_str())
            .await?
            .ok_or(EngineError::NotFound("payout"))
    }

    /// Any merchant's payout (operators).
    pub async fn get_payout_any(&self, id: PayoutId) -> Result<PayoutRecord, EngineError> {
        self.store
            .get_payout(None, id)
            .await?
            .ok_or(EngineError::NotFound("payout"))
    }

    /// One page, newest first, and whether more follow. Merchant routes pass their own
    /// merchant in `filter`; operators any filter.
    pub async fn list_payouts(
        &self,
        filter: PayoutFilter,
        limit: u32,
        starting_after: Option<PayoutId>,
    ) -> Result<(Vec<PayoutRecord>, bool), EngineError> {
        let limit = limit.clamp(1, crate::merchants::PAGE_LIMIT_MAX);
        let mut rows = self
            .store
            .list_payouts(filter, limit.saturating_add(1), starting_after)
            .await?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((rows, has_more))
    }
}
