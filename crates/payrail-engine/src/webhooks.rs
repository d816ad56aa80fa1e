//! Merchant webhooks: every outbox event whose object has a notify URL is POSTed to it, signed
//! with the app's secret, retried on a schedule over about a day, logged per attempt, and can be
//! re-sent by hand. docs/webhooks.md is the merchant's side of it.
//!
//! Two workers, any number of processes:
//! - the **dispatcher** ([`run_webhook_dispatcher`]) reads committed events after its durable
//!   outbox cursor and schedules a delivery for each event that has a target, moving the cursor
//!   in the same transaction ([`payrail_store::WebhookStore::dispatch_deliveries`]). The target
//!   comes from the event's object (`data.object`): its `notify_url` and `app_id`; an object
//!   without them that names a `payment_id` (a refund) falls back to that payment's. So any
//!   event type written to the outbox is delivered without code here knowing it.
//! - the **sender** ([`run_webhook_sender`]) leases due `webhook` jobs (`FOR UPDATE SKIP LOCKED`
//!   on PostgreSQL), makes one attempt each, and records the attempt with the delivery's next
//!   state and job in one transaction.
//!
//! A crash anywhere leaves either the cursor unmoved (the events are dispatched again) or a
//! delivery with its job (leased jobs come back when the lease runs out): at least once.

mod transport;

use crate::{Engine, EngineError};
use payrail_domain::webhook::{retry_delay_ms, signature_header};
use payrail_domain::{AppId, MerchantId, PaymentId};
use payrail_store::{
    AlertRecord, AttemptLog, AttemptTrigger, DeliveryRecord, DeliveryState, DeliveryStatus,
    Dispatch, EventRecord, JobRecord, JobUpdate, NewDelivery, RecordAttempt, ResendOutcome,
    JOB_WEBHOOK, WEBHOOK_CURSOR,
};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

pub use transport::RESPONSE_BODY_MAX_BYTES;

/// Outbox events the dispatcher looks at per pass (one transaction).
pub const DISPATCH_BATCH: u32 = 500;
/// Deliveries one sender has in flight at once.
pub const SEND_CONCURRENCY: usize = 32;
/// Manual re-sends per delivery.
pub const MANUAL_RESENDS_MAX: i64 = 20;
/// How often the sender refreshes the pending-deliveries gauge.
const PENDING_GAUGE_PERIOD_MS: u64 = 5_000;
/// Pause after a storage error before polling again.
const ERROR_BACKOFF_MS: u64 = 1_000;
/// After a pass that found events, the dispatcher waits this long before the next one, so that
/// under load one pass (one write) covers many events instead of one pass per commit. A lone
/// event after a quiet spell is dispatched at once.
const DISPATCH_COALESCE_MS: u64 = 100;
/// Characters of an answer's body kept in the delivery log.
const LOG_BODY_MAX_CHARS: usize = 1024;

/// Alert kind raised when a delivery gives up.
pub const ALERT_WEBHOOK_FAILED: &str = "webhook_delivery_failed";

/// The engine's webhook machinery: the HTTP transport and the dispatcher → sender wake-up.
pub(crate) struct Webhooks {
    transport: transport::Transport,
    /// Set when the dispatcher scheduled deliveries, so the sender does not wait for its poll.
    due: Notify,
    timeout_ms: u64,
}

impl Webhooks {
    pub(crate) fn new(config: &crate::EngineConfig) -> Webhooks {
        Webhooks {
            transport: transport::Transport::new(
                config.webhook_timeout_ms,
                config.webhook_allow_private_targets,
            ),
            due: Notify::new(),
            timeout_ms: config.webhook_timeout_ms,
        }
    }
}

/// Errors of the event and delivery API, beside the engine's own.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("no such event")]
    NotFound,
    /// `starting_after` (or a stream cursor) names no event of this merchant.
    #[error("{0} names no event")]
    UnknownCursor(&'static str),
    #[error("the event's object has no notify_url, so there is nothing to re-send")]
    NotDeliverable,
    #[error("the event was re-sent {MANUAL_RESENDS_MAX} times already")]
    ResendLimit,
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl From<payrail_store::StoreError> for WebhookError {
    fn from(e: payrail_store::StoreError) -> Self {
        WebhookError::Engine(e.into())
    }
}

/// The part of an event payload the dispatcher reads: `data.object`'s target fields.
#[derive(serde::Deserialize)]
struct Envelope {
    data: EnvelopeData,
}

#[derive(serde::Deserialize)]
struct EnvelopeData {
    object: TargetFields,
}

#[derive(serde::Deserialize)]
struct TargetFields {
    #[serde(default)]
    notify_url: Option<String>,
    #[serde(default)]
    app_id: Option<String>,
    #[serde(default)]
    payment_id: Option<String>,
}

/// Where an event goes: found in its object, or in the payment its object belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    url: String,
    app_id: AppId,
}

impl Engine {
    /// The lease of a delivery job: it must outlast one attempt, with room to record it.
    fn webhook_lease_ms(&self) -> i64 {
        i64::try_from(self.webhooks.timeout_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(2)
            .saturating_add(10_000)
    }

    async fn delivery_target(&self, e: &EventRecord) -> Result<Option<Target>, EngineError> {
        // Only the three fields are decoded; the rest of the payload is skipped, not built.
        let Ok(envelope) = serde_json::from_str::<Envelope>(&e.payload) else {
            tracing::warn!(event_id = %e.id, "outbox event payload is not an event; not delivered");
            return Ok(None);
        };
        let object = envelope.data.object;
        let text = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        let mut url = text(object.notify_url);
        let mut app_id = text(object.app_id).and_then(|a| a.parse::<AppId>().ok());
        if url.is_none() || app_id.is_none() {
            // A refund (or any object of a payment) without its own target uses the payment's.
            if let Some(pid) = text(object.payment_id).and_then(|p| p.parse::<PaymentId>().ok()) {
                if let Some(p) = self.store.get_payment(e.merchant_id, pid).await? {
                    url = url.or(p.notify_url);
                    app_id = app_id.or(Some(p.app_id));
                }
            }
        }
        match (url, app_id) {
            (Some(url), Some(app_id)) => Ok(Some(Target { url, app_id })),
            (Some(_), None) => {
                tracing::warn!(event_id = %e.id, "event has a notify URL but no app to sign with; not delivered");
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// One dispatcher pass: schedules deliveries for the next events after the cursor.
    /// Returns how many events it looked at (0: caught up).
    pub async fn dispatch_webhooks_once(&self) -> Result<usize, EngineError> {
        let from_seq = self.store.outbox_cursor(WEBHOOK_CURSOR).await?;
        let events = self.store.list_outbox(from_seq, DISPATCH_BATCH).await?;
        let Some(last) = events.last() else {
            return Ok(0);
        };
        let now = self.now_ms();
        let mut deliveries = Vec::new();
        for e in &events {
            if let Some(t) = self.delivery_target(e).await? {
                deliveries.push(NewDelivery {
                    event_id: e.id.clone(),
                    event_seq: e.seq,
                    merchant_id: e.merchant_id,
                    app_id: t.app_id,
                    url: t.url,
                    created_at_ms: now,
                });
            }
        }
        let scheduled = deliveries.len();
        let won = self
            .store
            .dispatch_deliveries(&Dispatch {
                cursor: WEBHOOK_CURSOR.into(),
                from_seq,
                to_seq: last.seq,
                deliveries,
                now_ms: now,
            })
            .await?;
        if won && scheduled > 0 {
            tracing::debug!(deliveries = scheduled, "webhooks: deliveries scheduled");
            self.webhooks.due.notify_one();
        }
        Ok(events.len())
    }

    /// Runs a leased `webhook` job: one attempt if one is due, then the next state.
    pub async fn deliver_webhook(&self, job: &JobRecord) -> Result<(), EngineError> {
        let event_id = job.subject_id.as_str();
        let Some(d) = self.store.get_delivery(event_id).await? else {
            self.store
                .update_job(&JobUpdate::Delete {
                    kind: JOB_WEBHOOK.into(),
                    subject_id: event_id.into(),
                })
                .await?;
            return Ok(());
        };
        let now = self.now_ms();
        let due_auto =
            d.status == DeliveryStatus::Pending && d.next_attempt_at_ms.is_some_and(|t| t <= now);
        let due_manual = d.manual_due_at_ms.is_some_and(|t| t <= now);
        if !due_auto && !due_manual {
            // Nothing due (another worker got there first): the job follows the delivery.
            let update = match next_due(&d) {
                Some(t) => JobUpdate::Schedule {
                    kind: JOB_WEBHOOK.into(),
                    subject_id: event_id.into(),
                    run_at_ms: t,
                    last_error: None,
                },
                None => JobUpdate::Delete {
                    kind: JOB_WEBHOOK.into(),
                    subject_id: event_id.into(),
                },
            };
            self.store.update_job(&update).await?;
            return Ok(());
        }
        // A re-send asked for while a scheduled attempt is due is served by that attempt.
        let trigger = if due_auto {
            AttemptTrigger::Schedule
        } else {
            AttemptTrigger::Manual
        };
        let event = self
            .store
            .get_event(Some(d.merchant_id), event_id)
            .await?
            .ok_or_else(|| {
                EngineError::Internal(format!("delivery of a missing event {event_id}"))
            })?;
        let attempt_no = d.attempts.saturating_add(1);
        let started = Instant::now();
        let sent = self.send_event(&d, &event, attempt_no).await?;
        let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let latency_ms = i64::try_from(latency_us / 1000).unwrap_or(i64::MAX);
        let now = self.now_ms();

        let mut state = DeliveryState {
            status: d.status,
            auto_attempts: d.auto_attempts,
            next_attempt_at_ms: d.next_attempt_at_ms,
            manual_due_at_ms: None,
        };
        let mut alert = None;
        let mut gave_up = false;
        match &sent.failure {
            None => {
                state.status = DeliveryStatus::Delivered;
                state.next_attempt_at_ms = None;
            }
            Some(f) if trigger == AttemptTrigger::Schedule => {
                state.auto_attempts = d.auto_attempts.saturating_add(1);
                match retry_delay_ms(state.auto_attempts).filter(|_| !f.permanent) {
                    Some(delay) => state.next_attempt_at_ms = Some(now.saturating_add(delay)),
                    None => {
                        gave_up = true;
                        state.status = DeliveryStatus::Failed;
                        state.next_attempt_at_ms = None;
                        let host = reqwest::Url::parse(&d.url)
                            .ok()
                            .and_then(|u| u.host_str().map(str::to_string))
                            .unwrap_or_default();
                        alert = Some(AlertRecord {
                            kind: ALERT_WEBHOOK_FAILED.into(),
                            subject_id: d.event_id.clone(),
                            detail: format!(
                                "{} to {host} for merchant {} gave up after {} attempts; last: {} ({})",
                                event.event_type, d.merchant_id, state.auto_attempts, f.class, f.message
                            ),
                            created_at_ms: now,
                        });
                    }
                }
            }
            // A failed manual attempt changes nothing else: the schedule (if any) goes on.
            Some(_) => {}
        }
        let job_run_at_ms = if state.status == DeliveryStatus::Pending {
            state.next_attempt_at_ms
        } else {
            None
        };
        let (error, message) = match &sent.failure {
            Some(f) => (Some(f.class.to_string()), Some(f.message.clone())),
            None => (None, None),
        };
        let recorded = self
            .store
            .record_attempt(&RecordAttempt {
                expected_version: d.version,
                log: AttemptLog {
                    event_id: d.event_id.clone(),
                    attempt: attempt_no,
                    merchant_id: d.merchant_id,
                    trigger,
                    url: d.url.clone(),
                    status_code: sent.status_code,
                    error: error.clone(),
                    message,
                    latency_ms,
                    response_body: sent
                        .body
                        .as_ref()
                        .map(|b| b.chars().take(LOG_BODY_MAX_CHARS).collect()),
                    created_at_ms: now,
                },
                state,
                job_run_at_ms,
                alert,
                now_ms: now,
            })
            .await?;

        let outcome = error.as_deref().unwrap_or("delivered");
        self.metrics.inc(
            "payrail_webhook_attempts_total",
            "Webhook delivery attempts, by outcome (delivered or the error class).",
            &[("outcome", outcome)],
        );
        self.metrics.observe_us(
            "payrail_webhook_attempt_duration_seconds",
            "Latency of webhook delivery attempts.",
            &[],
            latency_us,
        );
        if gave_up && recorded.applied {
            self.metrics.inc(
                "payrail_webhook_deliveries_failed_total",
                "Webhook deliveries given up after the last scheduled attempt.",
                &[],
            );
            tracing::error!(event_id = %d.event_id, merchant_id = %d.merchant_id, "webhook delivery gave up; alert raised");
        }
        match &sent.failure {
            None => {
                tracing::info!(event_id = %d.event_id, attempt = recorded.attempt, status = ?sent.status_code, latency_ms, "webhook delivered")
            }
            Some(f) => {
                tracing::warn!(event_id = %d.event_id, attempt = recorded.attempt, error = f.class, detail = %f.message, latency_ms, "webhook attempt failed")
            }
        }
        Ok(())
    }

    /// Signs and POSTs the event. Storage or decryption problems are errors (the job's lease
    /// runs out and it is tried again); everything about the receiver is in the result.
    async fn send_event(
        &self,
        d: &DeliveryRecord,
        event: &EventRecord,
        attempt_no: i64,
    ) -> Result<transport::Sent, EngineError> {
        // An app of another merchant must never sign this merchant's events.
        let app = self
            .store
            .get_app(d.app_id)
            .await?
            .filter(|a| a.merchant_id == d.merchant_id);
        let Some(app) = app else {
            return Ok(transport::Sent {
                status_code: None,
                body: None,
                failure: Some(transport::Failure {
                    class: "app_missing",
                    message: "the app that created the object does not exist (for this merchant)"
                        .into(),
                    permanent: true,
                }),
            });
        };
        let secret = self
            .master_key
            .decrypt(&app.secret_ciphertext, &app.key_id)
            .map_err(|e| EngineError::Internal(format!("app {}: {e}", app.id)))?;
        let signature = signature_header(
            secret.expose(),
            self.clock.now_s(),
            event.payload.as_bytes(),
        );
        let headers = [
            ("payrail-signature", signature),
            ("payrail-event-id", event.id.clone()),
            ("payrail-event-type", event.event_type.clone()),
            ("payrail-delivery-attempt", attempt_no.to_string()),
        ];
        Ok(self
            .webhooks
            .transport
            .post(&d.url, &headers, &event.payload)
            .await)
    }

    async fn visible_event(
        &self,
        merchant: Option<MerchantId>,
        id: &str,
    ) -> Result<EventRecord, WebhookError> {
        if id.parse::<payrail_domain::EventId>().is_err() {
            return Err(WebhookError::NotFound);
        }
        self.store
            .get_event(merchant, id)
            .await?
            .ok_or(WebhookError::NotFound)
    }

    /// One event (the payload as delivered). `merchant`: `None` for the operator.
    pub async fn event(
        &self,
        merchant: Option<MerchantId>,
        id: &str,
    ) -> Result<EventRecord, WebhookError> {
        self.visible_event(merchant, id).await
    }

    /// A page of a merchant's events, newest first, and whether more follow.
    pub async fn list_merchant_events(
        &self,
        merchant: MerchantId,
        limit: u32,
        starting_after: Option<&str>,
    ) -> Result<(Vec<EventRecord>, bool), WebhookError> {
        let before = match starting_after {
            Some(id) => Some(
                self.visible_event(Some(merchant), id)
                    .await
                    .map_err(|_| WebhookError::UnknownCursor("starting_after"))?
                    .seq,
            ),
            None => None,
        };
        let limit = limit.clamp(1, crate::merchants::PAGE_LIMIT_MAX);
        let mut rows = self
            .store
            .list_events_desc(merchant, before, limit.saturating_add(1))
            .await?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((rows, has_more))
    }

    /// An event's delivery (if it has one) and a page of its delivery log, newest first.
    pub async fn event_deliveries(
        &self,
        merchant: Option<MerchantId>,
        id: &str,
        limit: u32,
        before_attempt: Option<i64>,
    ) -> Result<(Option<DeliveryRecord>, Vec<AttemptLog>, bool), WebhookError> {
        let event = self.visible_event(merchant, id).await?;
        let delivery = self.store.get_delivery(&event.id).await?;
        let limit = limit.clamp(1, crate::merchants::PAGE_LIMIT_MAX);
        let mut rows = self
            .store
            .list_attempts(&event.id, before_attempt, limit.saturating_add(1))
            .await?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok((delivery, rows, has_more))
    }

    /// Asks for the event to be delivered again now (one manual attempt, made by a sender).
    pub async fn resend_event(
        &self,
        merchant: Option<MerchantId>,
        id: &str,
    ) -> Result<DeliveryRecord, WebhookError> {
        let event = self.visible_event(merchant, id).await?;
        match self
            .store
            .request_resend(&event.id, self.now_ms(), MANUAL_RESENDS_MAX)
            .await?
        {
            ResendOutcome::NoDelivery => Err(WebhookError::NotDeliverable),
            ResendOutcome::LimitReached => Err(WebhookError::ResendLimit),
            ResendOutcome::Scheduled(d) => {
                tracing::info!(event_id = %event.id, "webhook re-send requested");
                self.webhooks.due.notify_one();
                Ok(*d)
            }
        }
    }

    /// Resolves a stream cursor (an event id of the merchant) to its outbox position.
    pub async fn event_cursor(
        &self,
        merchant: MerchantId,
        id: &str,
        param: &'static str,
    ) -> Result<i64, WebhookError> {
        self.visible_event(Some(merchant), id)
            .await
            .map(|e| e.seq)
            .map_err(|e| match e {
                WebhookError::NotFound => WebhookError::UnknownCursor(param),
                other => other,
            })
    }

    /// The position a stream without a cursor starts from: after the merchant's latest event.
    pub async fn latest_event_seq(&self, merchant: MerchantId) -> Result<i64, EngineError> {
        Ok(self
            .store
            .list_events_desc(merchant, None, 1)
            .await?
            .first()
            .map_or(0, |e| e.seq))
    }
}

/// When a delivery's job should run next, or `None` if nothing is due any more.
fn next_due(d: &DeliveryRecord) -> Option<i64> {
    let auto = d
        .next_attempt_at_ms
        .filter(|_| d.status == DeliveryStatus::Pending);
    match (auto, d.manual_due_at_ms) {
        (Some(a), Some(m)) => Some(a.min(m)),
        (a, m) => a.or(m),
    }
}

/// The JSON of a delivery's state.
pub fn delivery_json(d: &DeliveryRecord) -> Value {
    json!({
        "object": "webhook_delivery",
        "event_id": d.event_id,
        "url": d.url,
        "status": d.status.as_str(),
        "attempts": d.attempts,
        "next_attempt_at": next_due(d).map(|t| t.div_euclid(1000)),
        "created": d.created_at_ms.div_euclid(1000),
        "updated": d.updated_at_ms.div_euclid(1000),
    })
}

/// The JSON of one delivery-log row.
pub fn attempt_json(a: &AttemptLog) -> Value {
    json!({
        "object": "webhook_attempt",
        "event_id": a.event_id,
        "attempt": a.attempt,
        "trigger": a.trigger.as_str(),
        "url": a.url,
        "status_code": a.status_code,
        "error": a.error,
        "message": a.message,
        "latency_ms": a.latency_ms,
        "response_body": a.response_body,
        "created": a.created_at_ms.div_euclid(1000),
    })
}

/// Schedules deliveries for new outbox events until `shutdown` turns true.
pub async fn run_webhook_dispatcher(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    tracing::info!("webhook dispatcher started");
    let mut signal = engine.feed.outbox_signal();
    while !*shutdown.borrow() {
        signal.borrow_and_update();
        let wait_ms = match engine.dispatch_webhooks_once().await {
            // A full batch: more may be waiting.
            Ok(n) if n >= DISPATCH_BATCH as usize => continue,
            Ok(0) => engine.config.worker_poll_ms,
            Ok(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(DISPATCH_COALESCE_MS)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "webhook dispatcher: pass failed");
                ERROR_BACKOFF_MS
            }
        };
        tokio::select! {
            _ = signal.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            _ = shutdown.changed() => {}
        }
    }
    tracing::info!("webhook dispatcher stopped");
}

/// Leases due delivery jobs and runs them, at most [`SEND_CONCURRENCY`] at once, until
/// `shutdown` turns true; attempts in flight finish first (each is bounded by the timeout).
pub async fn run_webhook_sender(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    tracing::info!("webhook sender started");
    let mut in_flight: JoinSet<()> = JoinSet::new();
    let mut gauge_at = Instant::now();
    let mut first = true;
    while !*shutdown.borrow() {
        if first || gauge_at.elapsed() >= Duration::from_millis(PENDING_GAUGE_PERIOD_MS) {
            first = false;
            gauge_at = Instant::now();
            if let Ok(n) = engine.store.count_pending_deliveries().await {
                engine.metrics.set_gauge(
                    "payrail_webhook_deliveries_pending",
                    "Webhook deliveries not yet delivered or given up.",
                    &[],
                    n,
                );
            }
        }
        let free = SEND_CONCURRENCY.saturating_sub(in_flight.len());
        let mut wait_ms = engine.config.worker_poll_ms;
        if free > 0 {
            match engine
                .store
                .lease_jobs(
                    JOB_WEBHOOK,
                    engine.now_ms(),
                    engine.webhook_lease_ms(),
                    u32::try_from(free).unwrap_or(1),
                )
                .await
            {
                Ok(jobs) => {
                    for job in jobs {
                        let engine = engine.clone();
                        in_flight.spawn(async move {
                            if let Err(e) = engine.deliver_webhook(&job).await {
                                // The lease runs out and the job comes back by itself.
                                tracing::warn!(event_id = %job.subject_id, error = %e, "webhook job failed");
                            }
                        });
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "webhook sender: cannot lease jobs");
                    wait_ms = ERROR_BACKOFF_MS;
                }
            }
        }
        tokio::select! {
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            _ = engine.webhooks.due.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            _ = shutdown.changed() => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
    tracing::info!("webhook sender stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery() -> DeliveryRecord {
        DeliveryRecord {
            event_id: "evt_x".into(),
            event_seq: 1,
            merchant_id: MerchantId::generate(1, [0; 10]),
            app_id: AppId::generate(1, [0; 10]),
            url: "https://shop.example/n".into(),
            status: DeliveryStatus::Pending,
            attempts: 0,
            auto_attempts: 0,
            manual_attempts: 0,
            next_attempt_at_ms: Some(100),
            manual_due_at_ms: None,
            version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn next_due_follows_schedule_and_resends() {
        let mut d = delivery();
        assert_eq!(next_due(&d), Some(100));
        d.manual_due_at_ms = Some(50);
        assert_eq!(next_due(&d), Some(50));
        d.status = DeliveryStatus::Delivered;
        assert_eq!(next_due(&d), Some(50), "a re-send of a delivered event");
        d.manual_due_at_ms = None;
        assert_eq!(next_due(&d), None);
        d.status = DeliveryStatus::Failed;
        assert_eq!(next_due(&d), None);
    }
}
