//! WeChat Pay API v3 wire structs and the one status mapping.

use crate::{CancelOutcome, RefundOutcome};
use payrail_domain::ChannelOutcome;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize)]
pub struct Amount {
    pub total: i64,
    pub currency: String,
}

#[derive(Debug, Serialize)]
pub struct Payer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub openid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_code: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct H5Info {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Serialize)]
pub struct SceneInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payer_client_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h5_info: Option<H5Info>,
}

/// `POST /v3/pay/transactions/{native|h5|jsapi}` and `/codepay`.
#[derive(Debug, Serialize)]
pub struct OrderBody {
    pub appid: String,
    pub mchid: String,
    pub description: String,
    pub out_trade_no: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_expire: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    pub amount: Amount,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payer: Option<Payer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scene_info: Option<SceneInfo>,
}

#[derive(Debug, Deserialize)]
pub struct PrepayResponse {
    pub code_url: Option<String>,
    pub h5_url: Option<String>,
    pub prepay_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct TxAmount {
    pub total: Option<i64>,
    pub currency: Option<String>,
}

/// A transaction as returned by query, codepay and the payment notification.
#[derive(Debug, Deserialize)]
pub struct Transaction {
    pub appid: Option<String>,
    pub mchid: Option<String>,
    pub out_trade_no: String,
    pub transaction_id: Option<String>,
    pub trade_state: String,
    pub trade_state_desc: Option<String>,
    pub success_time: Option<String>,
    pub amount: Option<TxAmount>,
}

#[derive(Debug, Deserialize)]
pub struct ErrorBody {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct MchidBody {
    pub mchid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RefundAmount {
    pub refund: i64,
    pub total: i64,
    pub currency: String,
}

/// `POST /v3/refund/domestic/refunds`.
#[derive(Debug, Serialize)]
pub struct RefundBody {
    pub out_trade_no: String,
    pub out_refund_no: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify_url: Option<String>,
    pub amount: RefundAmount,
}

#[derive(Debug, Deserialize)]
pub struct RefundRespAmount {
    pub refund: Option<i64>,
    pub total: Option<i64>,
    pub currency: Option<String>,
}

/// A refund as returned by refund, refund query (`status`) and the refund notification
/// (`refund_status`).
#[derive(Debug, Deserialize)]
pub struct RefundResponse {
    pub refund_id: Option<String>,
    pub out_refund_no: String,
    pub out_trade_no: Option<String>,
    pub transaction_id: Option<String>,
    pub mchid: Option<String>,
    #[serde(alias = "refund_status")]
    pub status: String,
    pub success_time: Option<String>,
    pub amount: Option<RefundRespAmount>,
}

#[derive(Debug, Deserialize)]
pub struct NotifyResource {
    pub algorithm: String,
    pub ciphertext: String,
    pub nonce: String,
    #[serde(default)]
    pub associated_data: String,
}

#[derive(Debug, Deserialize)]
pub struct NotifyEnvelope {
    pub id: Option<String>,
    pub event_type: String,
    pub resource: NotifyResource,
}

#[derive(Debug, Deserialize)]
pub struct BillResponse {
    pub hash_type: Option<String>,
    pub hash_value: Option<String>,
    pub download_url: String,
}

/// The transaction's `trade_state`, mapped. `REFUND` is a paid order with a refund: the payment
/// succeeded.
pub fn map_trade_state(tx: &Transaction, paid_at_ms: Option<i64>) -> ChannelOutcome {
    let trade_no = tx.transaction_id.clone().filter(|s| !s.is_empty());
    match tx.trade_state.as_str() {
        "SUCCESS" | "REFUND" => ChannelOutcome::Succeeded {
            channel_trade_no: trade_no,
            paid_at_ms,
        },
        "NOTPAY" | "USERPAYING" => ChannelOutcome::Processing {
            channel_trade_no: trade_no,
        },
        "CLOSED" => ChannelOutcome::Closed,
        "REVOKED" => ChannelOutcome::Cancelled,
        "PAYERROR" => ChannelOutcome::Failed {
            code: "PAYERROR".into(),
            message: tx.trade_state_desc.clone().unwrap_or_default(),
        },
        other => ChannelOutcome::unknown(format!("wechatpay: unknown trade_state {other}")),
    }
}

/// Error codes of an order or codepay request that are definite: no order was created, or the
/// payer's payment was refused. Everything else is unknown (SYSTEMERROR, BANKERROR,
/// FREQUENCY_LIMITED, ORDERPAID, OUT_TRADE_NO_USED, ORDER_CLOSED, any 5xx, anything new).
const SUBMIT_FAILURES: &[&str] = &[
    "NOTENOUGH",
    "NOT_ENOUGH",
    "AUTHCODEEXPIRE",
    "AUTH_CODE_INVALID",
    "AUTH_CODE_ERROR",
    "PAYER_ACCOUNT_ABNORMAL",
    "BUYER_MISMATCH",
    "TRADE_ERROR",
    "RULE_LIMIT",
    "ACCOUNTERROR",
    "PARAM_ERROR",
    "INVALID_REQUEST",
    "SIGN_ERROR",
    "NO_AUTH",
    "NOAUTH",
    "MCH_NOT_EXISTS",
    "APPID_MCHID_NOT_MATCH",
];

/// An error answer to an order or codepay request.
pub fn map_submit_error(http_status: u16, code: &str, message: &str) -> ChannelOutcome {
    if code == "USERPAYING" {
        return ChannelOutcome::Processing {
            channel_trade_no: None,
        };
    }
    if http_status < 500 && SUBMIT_FAILURES.contains(&code) {
        return ChannelOutcome::Failed {
            code: code.into(),
            message: message.into(),
        };
    }
    ChannelOutcome::unknown(format!("wechatpay: HTTP {http_status} {code}"))
}

/// An error answer to a query or close: a query that failed says nothing about the order.
pub fn map_query_error(http_status: u16, code: &str) -> ChannelOutcome {
    ChannelOutcome::unknown(format!("wechatpay: HTTP {http_status} {code}"))
}

/// A signed 4xx answer saying WeChat has no such order (its creation never reached WeChat, or
/// another merchant's number). Unknown by itself, never closed: see `WechatPay::close`.
pub fn is_order_not_exist(http_status: u16, code: &str) -> bool {
    (400..500).contains(&http_status) && (code == "ORDER_NOT_EXIST" || code == "ORDERNOTEXIST")
}

/// Codes of a reverse that are definite refusals.
const REVERSE_FAILURES: &[&str] = &[
    "TRADE_ERROR",
    "REVERSE_EXPIRE",
    "INVALID_REQUEST",
    "PARAM_ERROR",
];

/// The answer to a reverse. `recall` = Y/true means "call reverse again".
pub fn map_reverse(http_status: u16, body: &serde_json::Value) -> CancelOutcome {
    if (200..300).contains(&http_status) {
        let recall = match body.get("recall") {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::String(s)) => s == "Y" || s == "true",
            _ => false,
        };
        return if recall {
            CancelOutcome::Retry {
                reason: "wechatpay: recall".into(),
            }
        } else {
            CancelOutcome::Cancelled { refunded: None }
        };
    }
    let code = body.get("code").and_then(|c| c.as_str()).unwrap_or("");
    let message = body.get("message").and_then(|c| c.as_str()).unwrap_or("");
    if matches!(code, "SYSTEMERROR" | "USERPAYING" | "BANKERROR") && http_status < 500 {
        return CancelOutcome::Retry {
            reason: format!("wechatpay: {code}"),
        };
    }
    if http_status < 500 && REVERSE_FAILURES.contains(&code) {
        return CancelOutcome::Failed {
            code: code.into(),
            message: message.into(),
        };
    }
    CancelOutcome::Unknown {
        reason: format!("wechatpay: HTTP {http_status} {code}"),
    }
}

/// A refund's `status`. ABNORMAL (the payer's card refused the money back) needs a person: it
/// is neither done nor refused, so it stays unknown and the amount stays reserved.
pub fn map_refund_status(r: &RefundResponse, refunded_at_ms: Option<i64>) -> RefundOutcome {
    let no = r.refund_id.clone().filter(|s| !s.is_empty());
    match r.status.as_str() {
        "SUCCESS" => RefundOutcome::Succeeded {
            channel_refund_no: no,
            refunded_at_ms,
        },
        "PROCESSING" => RefundOutcome::Processing {
            channel_refund_no: no,
        },
        "CLOSED" => RefundOutcome::Failed {
            code: "CLOSED".into(),
            message: "wechatpay: refund closed".into(),
        },
        "ABNORMAL" => RefundOutcome::unknown("wechatpay: refund ABNORMAL, needs manual handling"),
        other => RefundOutcome::unknown(format!("wechatpay: unknown refund status {other}")),
    }
}

/// Refund request errors that are definite refusals (nothing was refunded).
const REFUND_FAILURES: &[&str] = &[
    "INVALID_REQUEST",
    "PARAM_ERROR",
    "NOT_ENOUGH",
    "USER_ACCOUNT_ABNORMAL",
    "NO_AUTH",
    "SIGN_ERROR",
    "MCH_NOT_EXISTS",
];

pub fn map_refund_error(http_status: u16, code: &str, message: &str) -> RefundOutcome {
    if http_status < 500 && REFUND_FAILURES.contains(&code) {
        return RefundOutcome::Failed {
            code: code.into(),
            message: message.into(),
        };
    }
    RefundOutcome::unknown(format!("wechatpay: HTTP {http_status} {code}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx(state: &str) -> Transaction {
        Transaction {
            appid: None,
            mchid: None,
            out_trade_no: "x".into(),
            transaction_id: Some("4200".into()),
            trade_state: state.into(),
            trade_state_desc: None,
            success_time: None,
            amount: None,
        }
    }

    #[test]
    fn every_trade_state() {
        let cases = [
            ("SUCCESS", "succeeded"),
            ("REFUND", "succeeded"),
            ("NOTPAY", "processing"),
            ("USERPAYING", "processing"),
            ("CLOSED", "closed"),
            ("REVOKED", "cancelled"),
            ("PAYERROR", "failed"),
            ("SOMETHING_NEW", "unknown"),
        ];
        for (state, want) in cases {
            assert_eq!(map_trade_state(&tx(state), None).label(), want, "{state}");
        }
    }

    #[test]
    fn submit_errors_are_conservative() {
        let cases = [
            (500, "SYSTEMERROR", "unknown"),
            (500, "BANKERROR", "unknown"),
            (403, "BANKERROR", "unknown"),
            (202, "USERPAYING", "processing"),
            (400, "USERPAYING", "processing"),
            (404, "ORDER_NOT_EXIST", "unknown"),
            (404, "ORDERNOTEXIST", "unknown"),
            (429, "FREQUENCY_LIMITED", "unknown"),
            (400, "ORDERPAID", "unknown"),
            (400, "OUT_TRADE_NO_USED", "unknown"),
            (502, "", "unknown"),
            (503, "NOTENOUGH", "unknown"), // a 5xx is never definite
            (403, "NOTENOUGH", "failed"),
            (403, "AUTHCODEEXPIRE", "failed"),
            (400, "PARAM_ERROR", "failed"),
            (401, "SIGN_ERROR", "failed"),
            (400, "NEW_CODE", "unknown"),
        ];
        for (status, code, want) in cases {
            assert_eq!(
                map_submit_error(status, code, "m").label(),
                want,
                "{status} {code}"
            );
        }
        for (status, code) in [
            (404, "ORDER_NOT_EXIST"),
            (500, "SYSTEMERROR"),
            (400, "PARAM_ERROR"),
            (401, "SIGN_ERROR"),
        ] {
            assert_eq!(map_query_error(status, code).label(), "unknown");
        }
    }

    #[test]
    fn only_a_4xx_order_not_exist_is_not_found() {
        for (status, code, want) in [
            (404, "ORDER_NOT_EXIST", true),
            (404, "ORDERNOTEXIST", true),
            (400, "ORDER_NOT_EXIST", true),
            (500, "ORDER_NOT_EXIST", false), // a 5xx says nothing
            (404, "RESOURCE_NOT_EXISTS", false),
            (404, "", false),
            (400, "ORDER_CLOSED", false),
            (200, "ORDER_NOT_EXIST", false),
        ] {
            assert_eq!(is_order_not_exist(status, code), want, "{status} {code}");
        }
    }

    #[test]
    fn reverse_answers() {
        use serde_json::json;
        assert_eq!(
            map_reverse(200, &json!({"recall": "N"})),
            CancelOutcome::Cancelled { refunded: None }
        );
        assert_eq!(
            map_reverse(200, &json!({})),
            CancelOutcome::Cancelled { refunded: None }
        );
        assert!(matches!(
            map_reverse(200, &json!({"recall": "Y"})),
            CancelOutcome::Retry { .. }
        ));
        assert!(matches!(
            map_reverse(200, &json!({"recall": true})),
            CancelOutcome::Retry { .. }
        ));
        assert!(matches!(
            map_reverse(400, &json!({"code": "SYSTEMERROR"})),
            CancelOutcome::Retry { .. }
        ));
        assert!(matches!(
            map_reverse(500, &json!({"code": "SYSTEMERROR"})),
            CancelOutcome::Unknown { .. }
        ));
        assert!(matches!(
            map_reverse(400, &json!({"code": "REVERSE_EXPIRE"})),
            CancelOutcome::Failed { .. }
        ));
        assert!(matches!(
            map_reverse(404, &json!({"code": "ORDER_NOT_EXIST"})),
            CancelOutcome::Unknown { .. }
        ));
    }

    #[test]
    fn every_refund_status() {
        let r = |s: &str| RefundResponse {
            refund_id: Some("50".into()),
            out_refund_no: "r".into(),
            out_trade_no: None,
            transaction_id: None,
            mchid: None,
            status: s.into(),
            success_time: None,
            amount: None,
        };
        let cases = [
            ("SUCCESS", "succeeded"),
            ("PROCESSING", "processing"),
            ("CLOSED", "failed"),
            ("ABNORMAL", "unknown"),
            ("NEW", "unknown"),
        ];
        for (s, want) in cases {
            assert_eq!(map_refund_status(&r(s), None).label(), want, "{s}");
        }
        assert_eq!(
            map_refund_error(400, "INVALID_REQUEST", "over").label(),
            "failed"
        );
        assert_eq!(map_refund_error(500, "SYSTEMERROR", "").label(), "unknown");
        assert_eq!(
            map_refund_error(404, "RESOURCE_NOT_EXISTS", "").label(),
            "unknown"
        );
        assert_eq!(
            map_refund_error(429, "FREQUENCY_LIMITED", "").label(),
            "unknown"
        );
    }
}
