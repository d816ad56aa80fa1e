//! Alipay OpenAPI wire structs, the RSA2 signing strings and the status mapping.

use crate::{CancelOutcome, RefundOutcome};
use payrail_domain::ChannelOutcome;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The string an OpenAPI request is signed over: every parameter except `sign`, empty values
/// dropped, sorted by key, `k=v` joined with `&`, values raw (not URL-encoded).
pub fn request_sign_content(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .filter(|(k, v)| k.as_str() != "sign" && !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The string an asynchronous notification is signed over: like a request, but `sign_type` is
/// excluded too (the SDK's `getSignCheckContentV1`).
pub fn notify_sign_content(params: &BTreeMap<String, String>) -> String {
    params
        .iter()
        .filter(|(k, v)| k.as_str() != "sign" && k.as_str() != "sign_type" && !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

#[derive(Debug, Serialize)]
pub struct PayBiz<'a> {
    pub out_trade_no: String,
    pub total_amount: String,
    pub subject: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scene: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_expire: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TradeRef {
    pub out_trade_no: String,
}

#[derive(Debug, Serialize)]
pub struct RefundBiz {
    pub out_trade_no: String,
    pub refund_amount: String,
    pub out_request_no: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refund_reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RefundQueryBiz {
    pub out_trade_no: String,
    pub out_request_no: String,
    pub query_options: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct BillBiz {
    pub bill_type: &'static str,
    pub bill_date: String,
}

/// The common part of every `*_response`, plus the fields of the methods we call.
#[derive(Debug, Default, Deserialize)]
pub struct Resp {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub msg: String,
    pub sub_code: Option<String>,
    pub sub_msg: Option<String>,
    pub trade_no: Option<String>,
    pub out_trade_no: Option<String>,
    pub trade_status: Option<String>,
    pub total_amount: Option<String>,
    pub gmt_payment: Option<String>,
    pub send_pay_date: Option<String>,
    pub qr_code: Option<String>,
    pub retry_flag: Option<String>,
    pub action: Option<String>,
    pub fund_change: Option<String>,
    pub gmt_refund_pay: Option<String>,
    pub refund_amount: Option<String>,
    pub refund_status: Option<String>,
    pub out_request_no: Option<String>,
    pub bill_download_url: Option<String>,
}

impl Resp {
    pub fn sub(&self) -> &str {
        self.sub_code.as_deref().unwrap_or("")
    }

    fn describe(&self) -> String {
        format!(
            "alipay: {} {} {}",
            self.code,
            self.sub(),
            self.sub_msg.as_deref().unwrap_or(&self.msg)
        )
    }

    fn failed(&self) -> ChannelOutcome {
        ChannelOutcome::Failed {
            code: if self.sub().is_empty() {
                self.code.clone()
            } else {
                self.sub().to_string()
            },
            message: self.sub_msg.clone().unwrap_or_else(|| self.msg.clone()),
        }
    }
}

/// Sub-codes of a 40004 that do not mean "refused": query, or repeat the same request.
const NOT_DEFINITE: &[&str] = &[
    "ACQ.SYSTEM_ERROR",
    "ACQ.TRADE_HAS_SUCCESS",
    "ACQ.TRADE_NOT_EXIST",
    "ACQ.TRADE_STATUS_ERROR",
    "ACQ.TRADE_BUYER_NOT_MATCH",
    "ACQ.NOW_TRADE_NOT_EXIST",
];

/// Gateway codes that reject the request before any trade exists.
const REJECTED: &[&str] = &["20001", "40001", "40002", "40006"];

/// A create-type answer (`pay`, `precreate`). `10000` means paid for `pay` and "QR ready"
/// for `precreate` (the trade exists only after the scan).
pub fn map_create(r: &Resp, paid_at_ms: Option<i64>, precreate: bool) -> ChannelOutcome {
    let trade_no = r.trade_no.clone().filter(|s| !s.is_empty());
    match r.code.as_str() {
        "10000" if precreate => ChannelOutcome::Processing {
            channel_trade_no: None,
        },
        "10000" => ChannelOutcome::Succeeded {
            channel_trade_no: trade_no,
            paid_at_ms,
        },
        "10003" => ChannelOutcome::Processing {
            channel_trade_no: trade_no,
        },
        "40004" if NOT_DEFINITE.contains(&r.sub()) => ChannelOutcome::unknown(r.describe()),
        "40004" => r.failed(),
        c if REJECTED.contains(&c) => r.failed(),
        _ => ChannelOutcome::unknown(r.describe()),
    }
}

/// A `trade.query` answer. A failed query says nothing about the trade; TRADE_NOT_EXIST is
/// expected before a QR code is scanned.
pub fn map_query(r: &Resp, paid_at_ms: Option<i64>) -> ChannelOutcome {
    if r.code != "10000" {
        return ChannelOutcome::unknown(r.describe());
    }
    let trade_no = r.trade_no.clone().filter(|s| !s.is_empty());
    match r.trade_status.as_deref().unwrap_or("") {
        "WAIT_BUYER_PAY" => ChannelOutcome::Processing {
            channel_trade_no: trade_no,
        },
        "TRADE_SUCCESS" | "TRADE_FINISHED" => ChannelOutcome::Succeeded {
            channel_trade_no: trade_no,
            paid_at_ms,
        },
        // Closed unpaid, or paid and then refunded in full: only the second has a payment date.
        "TRADE_CLOSED" if r.send_pay_date.as_deref().is_some_and(|s| !s.is_empty()) => {
            ChannelOutcome::Succeeded {
                channel_trade_no: trade_no,
                paid_at_ms,
            }
        }
        "TRADE_CLOSED" => ChannelOutcome::Closed,
        other => ChannelOutcome::unknown(format!("alipay: unknown trade_status {other}")),
    }
}

/// A `trade.cancel` answer.
pub fn map_cancel(r: &Resp) -> CancelOutcome {
    if r.retry_flag.as_deref() == Some("Y") {
        return CancelOutcome::Retry {
            reason: r.describe(),
        };
    }
    match r.code.as_str() {
        "10000" => CancelOutcome::Cancelled {
            refunded: match r.action.as_deref() {
                Some("refund") => Some(true),
                Some("close") => Some(false),
                _ => None,
            },
        },
        "40004" if r.sub() == "ACQ.SYSTEM_ERROR" => CancelOutcome::Retry {
            reason: r.describe(),
        },
        "40004" if NOT_DEFINITE.contains(&r.sub()) => CancelOutcome::Unknown {
            reason: r.describe(),
        },
        "40004" => CancelOutcome::Failed {
            code: r.sub().to_string(),
            message: r.sub_msg.clone().unwrap_or_default(),
        },
        c if REJECTED.contains(&c) => CancelOutcome::Failed {
            code: c.to_string(),
            message: r.msg.clone(),
        },
        _ => CancelOutcome::Unknown {
            reason: r.describe(),
        },
    }
}

/// A `trade.refund` answer. `None` = "ask the refund query" (a repeated request that moved no
/// money this time: it may have succeeded before).
pub fn map_refund(r: &Resp, refunded_at_ms: Option<i64>) -> Option<RefundOutcome> {
    Some(match r.code.as_str() {
        "10000" if r.fund_change.as_deref() == Some("Y") => RefundOutcome::Succeeded {
            channel_refund_no: None,
            refunded_at_ms,
        },
        "10000" => return None,
        "40004" if NOT_DEFINITE.contains(&r.sub()) => RefundOutcome::unknown(r.describe()),
        "40004" => RefundOutcome::Failed {
            code: r.sub().to_string(),
            message: r.sub_msg.clone().unwrap_or_default(),
        },
        c if REJECTED.contains(&c) => RefundOutcome::Failed {
            code: c.to_string(),
            message: r.msg.clone(),
        },
        _ => RefundOutcome::unknown(r.describe()),
    })
}

/// A `fastpay.refund.query` answer: 10000 only means the query ran; the refund succeeded when
/// refund data is present and its status, if given, is REFUND_SUCCESS.
pub fn map_refund_query(r: &Resp, refunded_at_ms: Option<i64>) -> RefundOutcome {
    if r.code != "10000" {
        return RefundOutcome::unknown(r.describe());
    }
    let has_data = r.refund_amount.as_deref().is_some_and(|s| !s.is_empty());
    match (has_data, r.refund_status.as_deref()) {
        (true, None | Some("REFUND_SUCCESS")) => RefundOutcome::Succeeded {
            channel_refund_no: None,
            refunded_at_ms,
        },
        (true, Some(_)) => RefundOutcome::Processing {
            channel_refund_no: None,
        },
        (false, _) => RefundOutcome::unknown("alipay: refund not found (yet)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(code: &str, sub: Option<&str>) -> Resp {
        Resp {
            code: code.into(),
            sub_code: sub.map(Into::into),
            ..Resp::default()
        }
    }

    #[test]
    fn create_codes() {
        let cases = [
            ("10000", None, "succeeded"),
            ("10003", None, "processing"),
            ("20000", Some("isp.unknow-error"), "unknown"),
            ("40004", Some("ACQ.SYSTEM_ERROR"), "unknown"),
            ("40004", Some("ACQ.TRADE_HAS_SUCCESS"), "unknown"),
            ("40004", Some("ACQ.TRADE_NOT_EXIST"), "unknown"),
            ("40004", Some("ACQ.PAYMENT_AUTH_CODE_INVALID"), "failed"),
            ("40004", Some("ACQ.BUYER_BALANCE_NOT_ENOUGH"), "failed"),
            ("40001", Some("isv.missing-signature"), "failed"),
            ("40002", Some("isv.invalid-signature"), "failed"),
            ("40006", Some("isv.insufficient-isv-permissions"), "failed"),
            ("20001", Some("aop.invalid-auth-token"), "failed"),
            ("", None, "unknown"),
            ("99999", None, "unknown"),
        ];
        for (code, sub, want) in cases {
            assert_eq!(
                map_create(&resp(code, sub), None, false).label(),
                want,
                "{code} {sub:?}"
            );
        }
        assert_eq!(
            map_create(&resp("10000", None), None, true).label(),
            "processing"
        );
    }

    #[test]
    fn query_codes_and_states() {
        for (code, sub) in [
            ("20000", None),
            ("40004", Some("ACQ.TRADE_NOT_EXIST")),
            ("40004", Some("ACQ.SYSTEM_ERROR")),
            ("40002", None),
        ] {
            assert_eq!(map_query(&resp(code, sub), None).label(), "unknown");
        }
        let st = |s: &str, paid: Option<&str>| Resp {
            code: "10000".into(),
            trade_status: Some(s.into()),
            send_pay_date: paid.map(Into::into),
            ..Resp::default()
        };
        assert_eq!(
            map_query(&st("WAIT_BUYER_PAY", None), None).label(),
            "processing"
        );
        assert_eq!(
            map_query(&st("TRADE_SUCCESS", None), None).label(),
            "succeeded"
        );
        assert_eq!(
            map_query(&st("TRADE_FINISHED", None), None).label(),
            "succeeded"
        );
        assert_eq!(map_query(&st("TRADE_CLOSED", None), None).label(), "closed");
        assert_eq!(
            map_query(&st("TRADE_CLOSED", Some("2026-11-22 10:00:00")), None).label(),
            "succeeded"
        );
        assert_eq!(map_query(&st("NEW", None), None).label(), "unknown");
    }

    #[test]
    fn cancel_codes() {
        let mut ok = resp("10000", None);
        ok.action = Some("refund".into());
        assert_eq!(
            map_cancel(&ok),
            CancelOutcome::Cancelled {
                refunded: Some(true)
            }
        );
        let mut retry = resp("40004", Some("ACQ.SYSTEM_ERROR"));
        assert!(matches!(map_cancel(&retry), CancelOutcome::Retry { .. }));
        retry.sub_code = Some("ACQ.REASON_TRADE_BEEN_FREEZEN".into());
        retry.retry_flag = Some("Y".into());
        assert!(matches!(map_cancel(&retry), CancelOutcome::Retry { .. }));
        assert!(matches!(
            map_cancel(&resp("40004", Some("ACQ.TRADE_CANCEL_TIME_OUT"))),
            CancelOutcome::Failed { .. }
        ));
        assert!(matches!(
            map_cancel(&resp("20000", None)),
            CancelOutcome::Unknown { .. }
        ));
    }

    #[test]
    fn refund_codes() {
        let mut ok = resp("10000", None);
        ok.fund_change = Some("Y".into());
        assert_eq!(map_refund(&ok, None).map(|o| o.label()), Some("succeeded"));
        ok.fund_change = Some("N".into());
        assert_eq!(map_refund(&ok, None), None);
        assert_eq!(
            map_refund(&resp("20000", None), None).map(|o| o.label()),
            Some("unknown")
        );
        assert_eq!(
            map_refund(&resp("40004", Some("ACQ.SYSTEM_ERROR")), None).map(|o| o.label()),
            Some("unknown")
        );
        assert_eq!(
            map_refund(&resp("40004", Some("ACQ.TRADE_NOT_EXIST")), None).map(|o| o.label()),
            Some("unknown")
        );
        assert_eq!(
            map_refund(&resp("40004", Some("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL")), None)
                .map(|o| o.label()),
            Some("failed")
        );
        let mut q = resp("10000", None);
        assert_eq!(map_refund_query(&q, None).label(), "unknown");
        q.refund_amount = Some("1.00".into());
        assert_eq!(map_refund_query(&q, None).label(), "succeeded");
        q.refund_status = Some("REFUND_SUCCESS".into());
        assert_eq!(map_refund_query(&q, None).label(), "succeeded");
        q.refund_status = Some("REFUND_PROCESSING".into());
        assert_eq!(map_refund_query(&q, None).label(), "processing");
        assert_eq!(
            map_refund_query(&resp("40004", Some("ACQ.TRADE_NOT_EXIST")), None).label(),
            "unknown"
        );
    }

    /// Pinned vector, computed independently with OpenSSL 3.0 over the sign content below:
    /// `openssl dgst -sha256 -sign merchant-private.pem ali.txt | base64 -w0`.
    #[test]
    fn request_signature_matches_openssl() {
        let key =
            include_str!("../../../payrail-emulator/testdata/test-only-keys/merchant-private.pem");
        let signer =
            crate::common::RsaSigner::from_secret("k", &payrail_domain::Secret::new(key.into()))
                .unwrap();
        let p: BTreeMap<String, String> = [
            ("app_id", "2021000000000001"),
            ("method", "alipay.trade.query"),
            ("format", "JSON"),
            ("charset", "utf-8"),
            ("sign_type", "RSA2"),
            ("timestamp", "2026-11-22 10:00:00"),
            ("version", "1.0"),
            ("notify_url", ""),
            (
                "biz_content",
                r#"{"out_trade_no":"att_01KAQ7Y9XH0000000000000000"}"#,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let content = request_sign_content(&p);
        assert_eq!(
            content,
            r#"app_id=2021000000000001&biz_content={"out_trade_no":"att_01KAQ7Y9XH0000000000000000"}&charset=utf-8&format=JSON&method=alipay.trade.query&sign_type=RSA2&timestamp=2026-11-22 10:00:00&version=1.0"#
        );
        assert_eq!(
            signer.sign_b64(content.as_bytes()),
            "BxW7ajQc1pRT0f0OY+2xFFbJ3zpu00My00GgjjwlzhGGSPL+5i1pglEPNbMsr9E/zSxc08ASL32djnI+T8tz4IFiar50a1TaOkruu712pGxUlpOtmZ/qi+xg4s/n99KzRtcxOTlLwGYYxIuxE6cAvyCcaT/HWJNEo7t22fYUxyjHrRH7QIQzx4r04x/RK6r2vYJoDPKm1KAxckTCs5Hzk/Y8qV53roPqxDWJ/4sf2LlyJSeUv+0mHv7uYKsdNHZnxkfaT6qzGPGgiR4KiMjrUABH8u9BfNsxfw0oP8/h8eEhhFR7+b2U7hm40stisk4S6scb4oAqDd3FRNYuHw6jGg=="
        );
    }

    #[test]
    fn sign_contents_exclude_the_right_fields() {
        let p: BTreeMap<String, String> = [
            ("b", "2"),
            ("a", "1"),
            ("sign", "S"),
            ("sign_type", "RSA2"),
            ("empty", ""),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(request_sign_content(&p), "a=1&b=2&sign_type=RSA2");
        assert_eq!(notify_sign_content(&p), "a=1&b=2");
    }
}
