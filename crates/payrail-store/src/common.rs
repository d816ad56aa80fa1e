//! Pieces both backends share: column lists (so row mapping reads columns in the same order
//! everywhere) and the decision logic that does not depend on the database.

use crate::{IdempotencyClaim, IdempotencyState};

pub(crate) const MERCHANT_COLS: &str = "id, name, status, version, created_at_ms, updated_at_ms";

pub(crate) const APP_COLS: &str = "id, merchant_id, name, key_id, secret_ciphertext, created_at_ms";

pub(crate) const PAYMENT_COLS: &str = "id, merchant_id, app_id, out_trade_no, amount_minor, currency, subject, method, channel, status, version, notify_url, metadata, channel_trade_no, failure_code, failure_message, idempotency_key, request_hash, expires_at_ms, paid_at_ms, created_at_ms, updated_at_ms, amount_refunded_minor, refund_reserved_minor";

pub(crate) const REFUND_COLS: &str = "id, payment_id, attempt_id, merchant_id, app_id, out_refund_no, amount_minor, currency, reason, channel, status, version, channel_refund_no, failure_code, failure_message, notify_url, metadata, idempotency_key, request_hash, requested_at_ms, refunded_at_ms, created_at_ms, updated_at_ms";

/// What a refused refund reservation reads back for its reason.
pub(crate) const CEILING_COLS: &str =
    "status, currency, amount_minor, refund_reserved_minor, amount_refunded_minor, refund_count";

pub(crate) const ATTEMPT_COLS: &str = "id, payment_id, merchant_id, channel, status, version, channel_trade_no, failure_code, failure_message, created_at_ms, updated_at_ms, channel_account_id";

pub(crate) const CHANNEL_ACCOUNT_COLS: &str = "id, channel, name, status, priority, config, secrets_ciphertext, version, created_at_ms, updated_at_ms";

pub(crate) const JOB_COLS: &str = "kind, subject_id, run_at_ms, attempts, created_at_ms";

pub(crate) const EVENT_COLS: &str =
    "seq, id, merchant_id, event_type, object_id, payload, created_at_ms";

pub(crate) const ALERT_COLS: &str = "kind, subject_id, detail, created_at_ms";

pub(crate) const IDEMPOTENCY_COLS: &str =
    "request_hash, state, response_status, response_body, locked_at_ms";

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Shared by both backends: what an existing idempotency row means for a new request.
pub(crate) fn idempotency_state(
    claim: &IdempotencyClaim,
    stored_hash: &str,
    state: &str,
    status: Option<i64>,
    body: Option<String>,
    locked_at_ms: i64,
) -> IdempotencyState {
    if stored_hash != claim.request_hash {
        return IdempotencyState::Mismatch;
    }
    match (state, status, body) {
        ("completed", Some(status), Some(body)) => IdempotencyState::Replay {
            status: u16::try_from(status).unwrap_or(500),
            body,
        },
        _ if locked_at_ms < claim.now_ms.saturating_sub(claim.stale_after_ms) => {
            IdempotencyState::New
        }
        _ => IdempotencyState::InProgress,
    }
}
