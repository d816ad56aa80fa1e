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

/// Codes that are an explicit refusal of the transaction. Not in it, although they sit in the
/// issuer range 60–79: `70` (交易已跳转，等待持卡人输入: waiting for the cardholder), `74`
/// (扣款成功，销账未知: debited, outcome unknown) and `75` (扣款成功，销账失败: debited, not
/// written off) — money may have moved, so they are unknown; and `42` (扣款成功但交易超过规定
/// 支付时间: debited after `payTimeout`) is unknown too.
fn is_definite_failure(code: &str) -> bool {
    matches!(
        code,
        "01" | "11" | "13" | "30" | "31" | "32" | "33" | "35" | "36" | "38" | "39"
    ) || code
        .parse::<u8>()
        .is_ok_and(|n| (60..=79).contains(&n) && !matches!(n, 70 | 74 | 75))
}

/// The query answer "no such transaction": UnionPay has no record of the order (never
/// received, or the payer never paid it). Unknown by itself; see `UnionPay::close`.
pub fn is_not_found(resp_code: &str) -> bool {
    resp_code == "34"
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

    /// Pinned vector, computed independently with OpenSSL 3.0:
    ///
    /// ```text
    /// H=$(openssl dgst -sha256 -hex up.txt | awk '{print $2}')
    /// printf '%s' "$H" | openssl dgst -sha256 -sign merchant-private.pem | base64 -w0
    /// ```
    #[test]
    fn signature_over_the_sha256_hex_matches_openssl() {
        let fields: BTreeMap<String, String> = [
            ("version", "5.1.0"),
            ("encoding", "UTF-8"),
            ("signMethod", "01"),
            ("txnType", "00"),
            ("txnSubType", "00"),
            ("bizType", "000000"),
            ("channelType", "07"),
            ("accessType", "0"),
            ("merId", "777290058110048"),
            ("certId", "68759663125"),
            ("orderId", "att01KAQ7Y9XH0000000000000000"),
            ("txnTime", "20261122100000"),
            ("signature", "ignored"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let hex = sign_digest_hex(&fields);
        assert_eq!(
            hex,
            "4ad4f98c1a2e2b830ec9bff95dc600cf4fbb4e9658ffd14f418212b828211f35"
        );
        let key =
            include_str!("../../../payrail-emulator/testdata/test-only-keys/merchant-private.pem");
        let signer =
            crate::common::RsaSigner::from_secret("k", &payrail_domain::Secret::new(key.into()))
                .unwrap();
        assert_eq!(
            signer.sign_b64(hex.as_bytes()),
            "l2pH6VonaR26IEc9GbAWD9KtlUAQE/riwUajwXyhgFIaZy5RvvEIwzRKdpLVXzqblw5vI9aydekCSTozyxuc0GYJxugEjU0V4sIL1lnrK6Ojq2lfW0MEOne+KO5ACJUV64sKj44a0yX6RCUBNyh8etEhwS8MPK7f4/U/fTy0yu03PCxIUx4tTjL7oKlYBD2dkofwRnwTXBftP3SFAuVVUAO2gO8Rg0euEZ9C0dxD1EPh6CiBep/zwzgqxH63y50kB1StSNPeZozy5hj8Ok/Xz6+St5fIkHULrO2FMza1UTn9FujSNx0CIpYrie+Mh5188+bmDilX/vMgIUprpuwyfw=="
        );
    }

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

    /// Bug: the whole issuer range 60–79 was read as a definite failure, including `70`
    /// (waiting for the cardholder's input), `74` (debited, write-off unknown) and `75`
    /// (debited, write-off failed). A payment the payer was charged for would have been
    /// `failed` (no money moved) and the order released.
    #[test]
    fn unionpay_debited_or_waiting_codes_are_not_failures() {
        for c in ["70", "74", "75", "42"] {
            assert_eq!(map_consume(c, "", None).label(), "unknown", "consume {c}");
            assert_eq!(
                map_query("00", Some(c), "", None, None).label(),
                "unknown",
                "query {c}"
            );
            assert_eq!(map_refund(c, "", None).label(), "unknown", "refund {c}");
            assert!(
                matches!(map_revoke(c, ""), CancelOutcome::Unknown { .. }),
                "revoke {c}"
            );
        }
        // The rest of the issuer range still refuses.
        for c in ["60", "61", "64", "65", "69", "71", "73", "76", "77", "79"] {
            assert_eq!(map_consume(c, "", None).label(), "failed", "consume {c}");
            assert_eq!(
                map_query("00", Some(c), "", None, None).label(),
                "failed",
                "query {c}"
            );
        }
        assert!(is_not_found("34"));
        assert!(!is_not_found("00") && !is_not_found("35"));
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
