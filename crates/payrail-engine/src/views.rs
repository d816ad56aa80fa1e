//! The JSON shapes merchants see. One place, shared by API responses, stored idempotent
//! replies and event payloads, so they never drift apart.

use payrail_channels::NextAction;
use payrail_domain::PaymentStatus;
use payrail_store::{MerchantRecord, PaymentRecord, PayoutRecord, RefundRecord};
use serde_json::{json, Map, Value};

fn secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

/// A JSON value as text. `serde_json::to_string` writes into a byte buffer directly; a `Value`'s
/// `Display` (`.to_string()`) goes through `fmt::Write` token by token, measurably slower on
/// the payment path (docs/BENCHMARKS.md).
pub fn json_text(v: &Value) -> String {
    // Serializing a `Value` cannot fail: its keys are strings.
    serde_json::to_string(v).unwrap_or_default()
}

pub fn payment_json(p: &PaymentRecord, next_action: Option<&NextAction>) -> Value {
    let metadata: Value =
        serde_json::from_str(&p.metadata).unwrap_or_else(|_| Value::Object(Map::new()));
    let next_action = next_action.map(|a| match a {
        NextAction::DisplayQrCode { code_url } => {
            json!({"type": "display_qr_code", "code_url": code_url})
        }
        NextAction::Redirect { url } => json!({"type": "redirect", "url": url}),
        NextAction::PostForm { url, fields } => {
            let fields: Map<String, Value> = fields
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            json!({"type": "post_form", "url": url, "fields": fields})
        }
        NextAction::InvokeWallet { params } => {
            let params: Map<String, Value> = params
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            json!({"type": "invoke_wallet", "params": params})
        }
    });
    let failure = p
        .failure_code
        .as_ref()
        .map(|code| json!({"code": code, "message": p.failure_message}));
    json!({
        "id": p.id,
        "object": "payment",
        "merchant_id": p.merchant_id,
        "app_id": p.app_id,
        "out_trade_no": p.out_trade_no,
        "amount": p.amount_minor,
        "currency": p.currency,
        "amount_refunded": p.amount_refunded_minor,
        "amount_refundable": amount_refundable(p),
        "subject": p.subject,
        "method": p.method,
        "channel": p.channel,
        "status": p.status,
        "channel_trade_no": p.channel_trade_no,
        "failure": failure,
        "notify_url": p.notify_url,
        "metadata": metadata,
        "next_action": next_action,
        "created": secs(p.created_at_ms),
        "updated": secs(p.updated_at_ms),
        "expires_at": secs(p.expires_at_ms),
        "paid_at": p.paid_at_ms.map(secs),
    })
}

/// What a new refund may still take: the paid amount less every refund not failed (processing
/// ones included, since they may yet succeed); 0 unless the payment succeeded.
pub fn amount_refundable(p: &PaymentRecord) -> i64 {
    if p.status == PaymentStatus::Succeeded {
        p.amount_minor
            .saturating_sub(p.refund_reserved_minor)
            .max(0)
    } else {
        0
    }
}

pub fn refund_json(r: &RefundRecord) -> Value {
    let metadata: Value =
        serde_json::from_str(&r.metadata).unwrap_or_else(|_| Value::Object(Map::new()));
    let failure = r
        .failure_code
        .as_ref()
        .map(|code| json!({"code": code, "message": r.failure_message}));
    json!({
        "id": r.id,
        "object": "refund",
        "payment_id": r.payment_id,
        "merchant_id": r.merchant_id,
        "app_id": r.app_id,
        "out_refund_no": r.out_refund_no,
        "amount": r.amount_minor,
        "currency": r.currency,
        "reason": r.reason,
        "status": r.status,
        "channel": r.channel,
        "channel_refund_no": r.channel_refund_no,
        "failure": failure,
        "notify_url": r.notify_url,
        "metadata": metadata,
        "created": secs(r.created_at_ms),
        "updated": secs(r.updated_at_ms),
        "refunded_at": r.refunded_at_ms.map(secs),
    })
}

pub fn payout_json(p: &PayoutRecord) -> Value {
    let failure = p
        .failure_code
        .as_ref()
        .map(|code| json!({"code": code, "message": p.failure_message}));
    json!({
        "id": p.id,
        "object": "payout",
        "merchant_id": p.merchant_id,
        "app_id": p.app_id,
        "out_payout_no": p.out_payout_no,
        "amount": p.amount_minor,
        "currency": p.currency,
        "description": p.description,
        "status": p.status,
        "bank": p.bank,
        "bank_reference": p.bank_reference,
        "failure": failure,
        "notify_url": p.notify_url,
        "created": secs(p.created_at_ms),
        "updated": secs(p.updated_at_ms),
        "paid_at": p.paid_at_ms.map(secs),
    })
}

pub fn merchant_json(m: &MerchantRecord) -> Value {
    json!({
        "id": m.id,
        "object": "merchant",
        "name": m.name,
        "status": m.status.as_str(),
        "created": secs(m.created_at_ms),
        "updated": secs(m.updated_at_ms),
    })
}
