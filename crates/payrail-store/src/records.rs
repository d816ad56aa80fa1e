//! Rows as the store reads and writes them. Amounts are integer minor units; times are Unix
//! milliseconds.

use payrail_domain::{
    AppId, AttemptId, AttemptStatus, ChannelAccountId, MerchantId, PaymentId, PaymentStatus,
    RefundId, RefundStatus,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MerchantStatus {
    Active,
    Frozen,
}

impl MerchantStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            MerchantStatus::Active => "active",
            MerchantStatus::Frozen => "frozen",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(MerchantStatus::Active),
            "frozen" => Some(MerchantStatus::Frozen),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantRecord {
    pub id: MerchantId,
    pub name: String,
    pub status: MerchantStatus,
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// An app of a merchant. `secret_ciphertext` is the AEAD-encrypted signing secret; the store
/// never sees it in the clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRecord {
    pub id: AppId,
    pub merchant_id: MerchantId,
    pub name: String,
    pub key_id: String,
    pub secret_ciphertext: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// A signed request's nonce. A replay repeats the signed timestamp along with the nonce, so a
/// nonce must be unique per key and timestamp (as in OAuth 1.0a), which lets the store keep the
/// claims in timestamp order: inserts append instead of landing on a random index page.
pub struct NonceClaim {
    pub key_id: String,
    pub nonce: String,
    /// The request's signed timestamp, Unix seconds.
    pub timestamp_s: i64,
}

/// What the janitor deletes, at most `limit` rows of each kind per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prune {
    /// Nonce claims of requests signed before this (Unix seconds): such timestamps are outside
    /// the window now, so their requests are refused before admission anyway.
    pub nonces_signed_before_s: i64,
    /// Idempotency keys created before this, completed or abandoned in progress.
    pub keys_created_before_ms: i64,
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// Whose key space: a merchant id, or `operator`.
    pub scope: String,
    pub key: String,
    /// SHA-256 over method, path and body: the same key with another request is an error.
    pub request_hash: String,
    pub now_ms: i64,
    /// An in-progress claim older than this is taken over (its request died mid-way).
    pub stale_after_ms: i64,
    /// Random, per claim: only the request holding the current claim may complete or release
    /// the key, so a request whose stale claim was taken over cannot overwrite the answer of
    /// the request that took it over.
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Admission {
    pub now_ms: i64,
    pub nonce: Option<NonceClaim>,
    pub idempotency: Option<IdempotencyClaim>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyState {
    /// First use (or takeover of a stale claim): go ahead, then complete or release it.
    New,
    /// Completed before with the same request: send this response again.
    Replay { status: u16, body: String },
    /// Same key, different request.
    Mismatch,
    /// Same key, same request, still running elsewhere.
    InProgress,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionOutcome {
    NonceReused,
    Admitted(Option<IdempotencyState>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRecord {
    pub id: PaymentId,
    pub merchant_id: MerchantId,
    pub app_id: AppId,
    pub out_trade_no: String,
    pub amount_minor: i64,
    pub currency: String,
    pub subject: String,
    pub method: String,
    pub channel: String,
    pub status: PaymentStatus,
    pub version: i64,
    pub notify_url: Option<String>,
    /// JSON object of string values.
    pub metadata: String,
    pub channel_trade_no: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    /// The idempotency key and request hash that created it: a retry of that very request
    /// after a crash finds its payment instead of a duplicate-order error.
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub expires_at_ms: i64,
    pub paid_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Sum of its succeeded refunds. Written only by the refund writes (a new payment has 0).
    pub amount_refunded_minor: i64,
    /// Sum of its refunds that are processing or succeeded: `amount_refunded_minor ≤
    /// refund_reserved_minor ≤ amount_minor`, enforced in the write that records a refund and
    /// by a CHECK constraint.
    pub refund_reserved_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub id: AttemptId,
    pub payment_id: PaymentId,
    pub merchant_id: MerchantId,
    pub channel: String,
    pub status: AttemptStatus,
    pub version: i64,
    pub channel_trade_no: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// The channel account the attempt was sent to (`None`: a built-in channel).
    pub channel_account_id: Option<ChannelAccountId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelAccountStatus {
    /// Takes new payments.
    Active,
    /// Takes no new payments; still serves its existing ones (queries, refunds, notifications).
    Disabled,
}

impl ChannelAccountStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            ChannelAccountStatus::Active => "active",
            ChannelAccountStatus::Disabled => "disabled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(ChannelAccountStatus::Active),
            "disabled" => Some(ChannelAccountStatus::Disabled),
            _ => None,
        }
    }
}

/// A channel account as stored. `config` is JSON of the public settings; the private keys are
/// only in `secrets_ciphertext` (AEAD under the master key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelAccountRecord {
    pub id: ChannelAccountId,
    /// `wechatpay`, `alipay`, `unionpay`.
    pub channel: String,
    pub name: String,
    pub status: ChannelAccountStatus,
    /// Higher first when several accounts serve a method.
    pub priority: i64,
    pub config: String,
    pub secrets_ciphertext: String,
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub kind: String,
    pub subject_id: String,
    pub run_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPayment {
    pub payment: PaymentRecord,
    pub attempt: AttemptRecord,
    pub job: Option<NewJob>,
    /// The request's admission (nonce + idempotency key), claimed in the same write as the
    /// payment: one commit fewer on the create path. The payment is inserted only if the
    /// admission is `New` (or has no key).
    pub admission: Option<Admission>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatePaymentOutcome {
    Created,
    /// `(merchant, out_trade_no)` exists already; here it is.
    DuplicateOutTradeNo(Box<PaymentRecord>),
    /// The merchant is frozen (or gone) as of this write; nothing was written. Checked in the
    /// write itself so a freeze counts at once in every process, whatever caches say.
    MerchantNotActive,
    /// The admission in the same write refused the request (nonce reused; key replayed,
    /// mismatched or in progress); no payment was written.
    NotAdmitted(AdmissionOutcome),
}

/// A domain event for the transactional outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub merchant_id: MerchantId,
    pub event_type: String,
    pub object_id: String,
    /// JSON.
    pub payload: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Position in the outbox; strictly increasing in commit order per backend.
    pub seq: i64,
    pub id: String,
    pub merchant_id: MerchantId,
    pub event_type: String,
    pub object_id: String,
    pub payload: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobUpdate {
    /// Create the job, or move an existing one to `run_at_ms`.
    Schedule {
        kind: String,
        subject_id: String,
        run_at_ms: i64,
        last_error: Option<String>,
    },
    Delete {
        kind: String,
        subject_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub kind: String,
    pub subject_id: String,
    pub run_at_ms: i64,
    /// How many times it has been leased, including this lease.
    pub attempts: i64,
    pub created_at_ms: i64,
}

/// A guarded status change of one attempt and its payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub payment_id: PaymentId,
    pub payment_version: i64,
    pub payment_status: PaymentStatus,
    pub attempt_id: AttemptId,
    pub attempt_version: i64,
    pub attempt_status: AttemptStatus,
    pub channel_trade_no: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub paid_at_ms: Option<i64>,
    pub now_ms: i64,
    pub event: Option<NewEvent>,
    pub job: Option<JobUpdate>,
    /// The idempotent response of the request that caused this change, saved in the same
    /// transaction (one commit fewer on the payment path).
    pub idempotency: Option<IdempotencyCompletion>,
    /// What the change posts to the ledger (a success: the payment's posting set and clearing
    /// row; a wallet payment's end: the release of its freeze), in the same transaction.
    pub ledger: Option<crate::clearing::TransitionLedger>,
}

/// The final response of an idempotent request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyCompletion {
    pub scope: String,
    pub key: String,
    /// The token of the claim being completed (see [`IdempotencyClaim::token`]).
    pub token: String,
    pub status: u16,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRecord {
    pub kind: String,
    pub subject_id: String,
    pub detail: String,
    pub created_at_ms: i64,
}

/// A refund of (part of) a succeeded payment. Its id is the channel's refund request number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundRecord {
    pub id: RefundId,
    pub payment_id: PaymentId,
    /// The payment's succeeded attempt: what the channel refunds.
    pub attempt_id: AttemptId,
    pub merchant_id: MerchantId,
    pub app_id: AppId,
    pub out_refund_no: String,
    pub amount_minor: i64,
    pub currency: String,
    pub reason: Option<String>,
    pub channel: String,
    pub status: RefundStatus,
    pub version: i64,
    pub channel_refund_no: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    /// Where the merchant hears about it: the refund request's, else the payment's.
    pub notify_url: Option<String>,
    /// JSON object of string values.
    pub metadata: String,
    /// As for payments: a retry of the creating request after a crash finds its refund.
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    /// When the refund was first sent; repeats and queries pass it again (UnionPay `txnTime`).
    pub requested_at_ms: i64,
    pub refunded_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A refund to record, with its reservation against the payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRefund {
    /// Recorded as given (normally `processing`).
    pub refund: RefundRecord,
    /// The payment must still be `succeeded` in this currency, with fewer than this many
    /// refunds recorded (failed ones included), where the channel has such a limit.
    pub max_refunds: Option<i64>,
    pub job: Option<NewJob>,
    /// The request's admission, claimed in the same write (as for payments).
    pub admission: Option<Admission>,
}

/// The payment row as the refund write found it when it refused a reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundCeilingState {
    pub status: PaymentStatus,
    pub currency: String,
    pub amount_minor: i64,
    pub refund_reserved_minor: i64,
    pub amount_refunded_minor: i64,
    /// Refunds recorded for the payment, failed ones included.
    pub refund_count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateRefundOutcome {
    /// Recorded, its amount reserved, its job scheduled.
    Created,
    /// `(merchant, out_refund_no)` exists already (here it is); nothing was reserved.
    DuplicateOutRefundNo(Box<RefundRecord>),
    /// The payment's row refused the reservation: not this merchant's (`None`), not
    /// succeeded, another currency, over the ceiling, or too many refunds. Nothing was written
    /// but the admission.
    Refused(Option<RefundCeilingState>),
    /// The admission in the same write refused the request; nothing was written.
    NotAdmitted(AdmissionOutcome),
}

/// A guarded status change of one refund. Leaving `processing` moves the payment's totals in
/// the same transaction: `succeeded` adds the amount to `amount_refunded_minor`, `failed`
/// releases it from `refund_reserved_minor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundTransition {
    pub refund_id: RefundId,
    pub refund_version: i64,
    pub status: RefundStatus,
    pub channel_refund_no: Option<String>,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub refunded_at_ms: Option<i64>,
    pub now_ms: i64,
    pub event: Option<NewEvent>,
    pub job: Option<JobUpdate>,
    /// The idempotent response of the request that caused this change, saved with it.
    pub idempotency: Option<IdempotencyCompletion>,
}
