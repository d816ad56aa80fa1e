//! Storage for merchant webhooks and the event feed: the [`WebhookStore`] trait (a supertrait of
//! [`crate::Store`], so every store has it) and its records.
//!
//! How a delivery is scheduled: the dispatcher reads committed outbox events after its durable
//! cursor (`outbox_cursors`), works out which ones have a notify URL, and in **one transaction**
//! moves the cursor and inserts a `webhook_deliveries` row plus a `webhook` job for each
//! ([`WebhookStore::dispatch_deliveries`]). The cursor moves only if it still has the value the
//! dispatcher read, so two dispatchers (two worker processes) cannot both schedule an event, and a
//! crash before the commit leaves the cursor where it was: the next pass schedules the same
//! events. Nothing is added to the transaction that writes the event itself.
//!
//! The backends are in `sqlite/webhooks.rs` and `postgres/webhooks.rs`.

use crate::{AlertRecord, AppRecord, EventRecord, Result};
use async_trait::async_trait;
use payrail_domain::{AppId, MerchantId};

/// Name of the webhook dispatcher's outbox cursor.
pub const WEBHOOK_CURSOR: &str = "webhooks";
/// Job kind of a delivery; the job's subject is the event id.
pub const JOB_WEBHOOK: &str = "webhook";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Attempts remain (or a manual re-send is due).
    Pending,
    /// A 2xx answer was received.
    Delivered,
    /// Every automatic attempt failed; an alert was raised.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

/// What started an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptTrigger {
    /// The retry schedule.
    Schedule,
    /// A re-send asked for through the API.
    Manual,
}

impl AttemptTrigger {
    pub fn as_str(&self) -> &'static str {
        match self {
            AttemptTrigger::Schedule => "schedule",
            AttemptTrigger::Manual => "manual",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "schedule" => Some(AttemptTrigger::Schedule),
            "manual" => Some(AttemptTrigger::Manual),
            _ => None,
        }
    }
}

/// A delivery to schedule: the first attempt is due at `created_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    pub event_id: String,
    pub event_seq: i64,
    pub merchant_id: MerchantId,
    pub app_id: AppId,
    pub url: String,
    pub created_at_ms: i64,
}

/// One dispatcher pass: the events in `(from_seq, to_seq]` were looked at; `deliveries` are the
/// ones to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub cursor: String,
    pub from_seq: i64,
    pub to_seq: i64,
    pub deliveries: Vec<NewDelivery>,
    pub now_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    pub event_id: String,
    pub event_seq: i64,
    pub merchant_id: MerchantId,
    pub app_id: AppId,
    pub url: String,
    pub status: DeliveryStatus,
    /// Every attempt made, automatic and manual; the last one's number.
    pub attempts: i64,
    /// Attempts made by the retry schedule.
    pub auto_attempts: i64,
    /// Re-sends asked for (bounded).
    pub manual_attempts: i64,
    /// When the schedule's next attempt is due; `None` once delivered or given up.
    pub next_attempt_at_ms: Option<i64>,
    /// A re-send asked for and not yet made.
    pub manual_due_at_ms: Option<i64>,
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One row of the delivery log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptLog {
    pub event_id: String,
    /// 1-based, counting automatic and manual attempts. Assigned by the store when recorded.
    pub attempt: i64,
    pub merchant_id: MerchantId,
    pub trigger: AttemptTrigger,
    pub url: String,
    /// The HTTP status, when an answer came back.
    pub status_code: Option<u16>,
    /// The error class when the attempt failed (`http_status`, `timeout`, `connect_failed`,
    /// `blocked_address`, …); `None` on success.
    pub error: Option<String>,
    /// Human-readable detail of the error.
    pub message: Option<String>,
    pub latency_ms: i64,
    /// The first bytes of the answer's body (bounded), for the merchant's debugging.
    pub response_body: Option<String>,
    pub created_at_ms: i64,
}

/// The delivery's state after an attempt, as the engine decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryState {
    pub status: DeliveryStatus,
    pub auto_attempts: i64,
    pub next_attempt_at_ms: Option<i64>,
    pub manual_due_at_ms: Option<i64>,
}

/// Records an attempt: the log row always (it happened), the new state and the job only if the
/// delivery still has `expected_version` (a re-send or another worker did not change it
/// meanwhile), all in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordAttempt {
    pub expected_version: i64,
    pub log: AttemptLog,
    pub state: DeliveryState,
    /// When the job runs next; `None` deletes it (nothing more is due).
    pub job_run_at_ms: Option<i64>,
    /// Raised with the state change (the delivery gave up).
    pub alert: Option<AlertRecord>,
    pub now_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedAttempt {
    /// The number the attempt got in the log.
    pub attempt: i64,
    /// Whether the state change was applied (`false`: the delivery changed meanwhile).
    pub applied: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResendOutcome {
    /// The event has no delivery (its object had no notify URL).
    NoDelivery,
    /// The delivery has had `manual_attempts_max` re-sends already.
    LimitReached,
    /// A manual attempt is due now; the delivery as stored afterwards.
    Scheduled(Box<DeliveryRecord>),
}

#[async_trait]
pub trait WebhookStore: Send + Sync + 'static {
    // --- outbox reads -----------------------------------------------------------------------
    /// Committed events of every merchant after `after_seq`, in `seq` order.
    async fn list_outbox(&self, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>>;
    /// The highest `seq` of a committed event (0 if none).
    async fn outbox_head(&self) -> Result<i64>;
    /// One event by id; scoped to `merchant_id` when given.
    async fn get_event(
        &self,
        merchant_id: Option<MerchantId>,
        id: &str,
    ) -> Result<Option<EventRecord>>;
    /// A merchant's events newest first (by `seq`), before `before_seq` when given.
    async fn list_events_desc(
        &self,
        merchant_id: MerchantId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<EventRecord>>;

    // --- dispatch ---------------------------------------------------------------------------
    /// The position of a named outbox cursor (0 if it was never set).
    async fn outbox_cursor(&self, name: &str) -> Result<i64>;
    /// Moves cursor `d.cursor` from `d.from_seq` to `d.to_seq` and schedules `d.deliveries`
    /// (each with its job, due at once), in one transaction. `Ok(false)`: the cursor was no
    /// longer at `from_seq` (another dispatcher went first); nothing was written.
    async fn dispatch_deliveries(&self, d: &Dispatch) -> Result<bool>;

    // --- deliveries -------------------------------------------------------------------------
    async fn get_delivery(&self, event_id: &str) -> Result<Option<DeliveryRecord>>;
    async fn record_attempt(&self, r: &RecordAttempt) -> Result<RecordedAttempt>;
    /// Asks for a manual attempt now (at most `manual_attempts_max` per delivery): marks it
    /// pending-manual, bumps its version and makes its job due at `now_ms`, in one transaction.
    async fn request_resend(
        &self,
        event_id: &str,
        now_ms: i64,
        manual_attempts_max: i64,
    ) -> Result<ResendOutcome>;
    /// The delivery log of an event, newest first, before attempt `before_attempt` when given.
    async fn list_attempts(
        &self,
        event_id: &str,
        before_attempt: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AttemptLog>>;
    /// Deliveries still pending (for the metric).
    async fn count_pending_deliveries(&self) -> Result<i64>;
    /// An app by id (a delivery is signed with its app's secret).
    async fn get_app(&self, id: AppId) -> Result<Option<AppRecord>>;
}

/// Column list of `webhook_deliveries`, in the order both backends read rows.
pub(crate) const DELIVERY_COLS: &str = "event_id, event_seq, merchant_id, app_id, url, status, attempts, auto_attempts, manual_attempts, next_attempt_at_ms, manual_due_at_ms, version, created_at_ms, updated_at_ms";

/// Column list of `webhook_attempts`.
pub(crate) const ATTEMPT_LOG_COLS: &str = "event_id, attempt, merchant_id, trigger_kind, url, status_code, error, message, latency_ms, response_body, created_at_ms";
