//! UnionPay ACP 5.1.0 signing string and status mapping.

use crate::{CancelOutcome, RefundOutcome};
use payrail_domain::ChannelOutcome;
use sha2::Digest;
use std::collections::BTreeMap;

/// What 5.1.0 (`signMethod=01`) signs: the lowercase hex SHA-256 of `k=v&…` over every field
/// but `signature`, sorted by key, raw values. The RSA signature is over that hex string.
pub fn sign_digest_hex(fields: &BTreeMap<String, String>) -> String {
    let content = fields
        .iter()
        .filter(|(k, _)| k.as_str() != "signature")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    hex::encode(sha2::Sha256::digest(content.as_bytes()))
}

/// Response codes that say nothing definite: timeout (03), unknown (04), accepted/processing
/// (05), system error (06), duplicate order (12: it exists), not found (34), rate limited (37),
/// temporarily unavailable (02), and anything unrecognised.
fn is_unknown(code: &str) -> bool {
    !is_definite_failure(code)
}

/// Codes that are an explicit refusal of the transaction.
fn is_definite_failure(code: &str) -> bool {
    matches!(
        code,
        "01" | "11" | "13" | "30" | "31" | "32" | "33" | "35" | "36" | "38" | "39"
    ) || code.parse::<u8>().is_ok_and(|n| (60..=79).contains(&n))
}

fn failed(code: &str, msg: &str) -> ChannelOutcome {
    ChannelOutcome::Failed {
        code: code.into(),
        message: msg.into(),
    }
}

/// The answer to a back-end consume (payment code): `00` = accepted; the result comes by
/// query or notification.
pub fn map_consume(resp_code: &str, msg: &str, query_id: Option<String>) -> ChannelOutcome {
    match resp_code {
        "00" => ChannelOutcome::Processing {
            channel_trade_no: query_id,
        },
        c if is_unknown(c) => ChannelOutcome::unknown(format!("unionpay: respCode {c} {msg}")),
        c => failed(c, msg),
    }
}

/// The answer to a query: `respCode` says whether the query worked, `origRespCode` is the
/// transaction's result (paysharp's bug was to read `respCode` alone).
pub fn map_query(
    resp_code: &str,
    orig_resp_code: Option<&str>,
    orig_msg: &str,
    query_id: Option<String>,
    paid_at_ms: Option<i64>,
) -> ChannelOutcome {
    if resp_code != "00" {
        return ChannelOutcome::unknown(format!("unionpay: query respCode {resp_code}"));
    }
    match orig_resp_code {
        Some("00") => ChannelOutcome::Succeeded {
            channel_trade_no: query_id,
            paid_at_ms,
        },
        Some(c) if is_definite_failure(c) => failed(c, orig_msg),
        Some(c) => ChannelOutcome::unknown(format!("unionpay: origRespCode {c}")),
        None => ChannelOutcome::unknown("unionpay: query answer without origRespCode"),
    }
}

pub fn map_revoke(resp_code: &str, msg: &str) -> CancelOutcome {
    match resp_code {
        "00" => CancelOutcome::Cancelled {
            refunded: Some(true),
        },
        c if is_unknown(c) => CancelOutcome::Unknown {
            reason: format!("unionpay: respCode {c} {msg}"),
        },
        c => CancelOutcome::Failed {
            code: c.into(),
            message: msg.into(),
        },
    }
}

/// The answer to a refund request: `00` = accepted, the result by query or notification.
pub fn map_refund(resp_code: &str, msg: &str, query_id: Option<String>) -> RefundOutcome {
    match resp_code {
        "00" => RefundOutcome::Processing {
            channel_refund_no: query_id,
        },
        c if is_unknown(c) => RefundOutcome::unknown(format!("unionpay: respCode {c} {msg}")),
        c => RefundOutcome::Failed {
            code: c.into(),
            message: msg.into(),
        },
    }
}

pub fn map_refund_query(
    resp_code: &str,
    orig_resp_code: Option<&str>,
    orig_msg: &str,
    query_id: Option<String>,
    at_ms: Option<i64>,
) -> RefundOutcome {
    if resp_code != "00" {
        return RefundOutcome::unknown(format!("unionpay: query respCode {resp_code}"));
    }
    match orig_resp_code {
        Some("00") => RefundOutcome::Succeeded {
            channel_refund_no: query_id,
            refunded_at_ms: at_ms,
        },
        Some(c) if is_definite_failure(c) => RefundOutcome::Failed {
            code: c.into(),
            message: orig_msg.into(),
        },
        Some("05") => RefundOutcome::Processing {
            channel_refund_no: query_id,
        },
        Some(c) => RefundOutcome::unknown(format!("unionpay: origRespCode {c}")),
        None => RefundOutcome::unknown("unionpay: query answer without origRespCode"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_codes() {
        let cases = [
            ("00", "processing"),
            ("03", "unknown"),
            ("04", "unknown"),
            ("05", "unknown"),
            ("06", "unknown"),
            ("12", "unknown"),
            ("34", "unknown"),
            ("37", "unknown"),
            ("02", "unknown"),
            ("", "unknown"),
            ("99", "unknown"),
            ("01", "failed"),
            ("11", "failed"),
            ("33", "failed"),
            ("61", "failed"),
        ];
        for (code, want) in cases {
            assert_eq!(map_consume(code, "", None).label(), want, "{code}");
        }
    }

    #[test]
    fn query_reads_orig_resp_code() {
        assert_eq!(
            map_query("00", Some("00"), "", None, None).label(),
            "succeeded"
        );
        for c in ["03", "04", "05"] {
            assert_eq!(
                map_query("00", Some(c), "", None, None).label(),
                "unknown",
                "{c}"
            );
        }
        assert_eq!(
            map_query("00", Some("01"), "", None, None).label(),
            "failed"
        );
        assert_eq!(map_query("00", None, "", None, None).label(), "unknown");
        // respCode 00 alone is not a payment.
        for c in ["34", "03", "04", "05", "01", "11"] {
            assert_eq!(
                map_query(c, Some("00"), "", None, None).label(),
                "unknown",
                "{c}"
            );
        }
    }

    #[test]
    fn revoke_and_refund_codes() {
        assert_eq!(
            map_revoke("00", ""),
            CancelOutcome::Cancelled {
                refunded: Some(true)
            }
        );
        assert!(matches!(
            map_revoke("05", ""),
            CancelOutcome::Unknown { .. }
        ));
        assert!(matches!(map_revoke("35", ""), CancelOutcome::Failed { .. }));
        assert_eq!(map_refund("00", "", None).label(), "processing");
        assert_eq!(map_refund("03", "", None).label(), "unknown");
        assert_eq!(map_refund("36", "", None).label(), "failed");
        assert_eq!(
            map_refund_query("00", Some("00"), "", None, None).label(),
            "succeeded"
        );
        assert_eq!(
            map_refund_query("00", Some("05"), "", None, None).label(),
            "processing"
        );
        assert_eq!(
            map_refund_query("34", None, "", None, None).label(),
            "unknown"
        );
        assert_eq!(
            map_refund_query("00", Some("01"), "", None, None).label(),
            "failed"
        );
    }
}
