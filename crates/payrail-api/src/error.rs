//! The one error shape of the API:
//! `{"error": {"type", "code", "message", "param", "request_id"}}` with a matching status.
//! 5xx bodies say nothing internal; the detail goes to the log under the same request id.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use payrail_domain::input::InputError;
use payrail_engine::auth::AuthError;
use payrail_engine::EngineError;
use serde_json::json;

tokio::task_local! {
    /// The id of the request being served, set by the request-id middleware.
    pub static REQUEST_ID: String;
}

pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(|id| id.clone()).ok()
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
        }
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn with_param(mut self, param: impl Into<String>) -> ApiError {
        self.param = Some(param.into());
        self
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "resource_missing",
            format!("no such {what}"),
        )
    }

    pub fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "internal_error",
            "an internal error occurred; quote the request id to support",
        )
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "type": self.kind,
            "code": self.code,
            "message": self.message,
            "param": self.param,
            "request_id": current_request_id(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        ApiError::invalid(e.code, e.message).with_param(e.param)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use EngineError as E;
        match e {
            E::Input(i) => i.into(),
            E::NotFound(what) => ApiError::not_found(what),
            E::MerchantFrozen => ApiError::new(
                StatusCode::FORBIDDEN,
                "permission_error",
                "merchant_frozen",
                "this merchant is frozen; contact the platform operator",
            ),
            E::DuplicateOutTradeNo => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "duplicate_out_trade_no",
                "a payment with this out_trade_no exists already; query it instead",
            )
            .with_param("out_trade_no"),
            E::DuplicateOutRefundNo => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "duplicate_out_refund_no",
                "a refund with this out_refund_no exists already; query it instead",
            )
            .with_param("out_refund_no"),
            E::DuplicateOutPayoutNo => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "duplicate_out_payout_no",
                "a payout with this out_payout_no exists already; query it instead",
            )
            .with_param("out_payout_no"),
            // 409, not 400: whether it fits depends on the balance, not on the request (the
            // same request fits after a settlement or a failed payout).
            E::InsufficientAvailableBalance {
                available_minor,
                requested_minor,
                currency,
            } => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "insufficient_available_balance",
                format!(
                    "the available balance is {available_minor} minor units of {currency}, less than the payout's {requested_minor}; nothing was paid out"
                ),
            )
            .with_param("amount"),
            E::RefundRefused(r) => refund_refusal(r),
            E::NotClosable(status) => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "payment_not_closable",
                format!("the payment is {status} and cannot be closed"),
            ),
            E::NotCancellable(status) => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "payment_not_cancellable",
                format!("the payment is {status} and cannot be cancelled; refund a succeeded payment instead"),
            ),
            E::CancelNotSupported(method) => ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "cancel_not_supported",
                format!("the channel cannot cancel {method} payments; close the payment instead"),
            ),
            E::CancelRefused(reason) => ApiError::new(
                StatusCode::CONFLICT,
                "channel_error",
                "cancel_refused",
                format!("the channel refused to cancel the payment ({reason}); it is unchanged"),
            ),
            E::ReversedAfterSuccess => ApiError::new(
                StatusCode::CONFLICT,
                "channel_error",
                "payment_reversed_after_success",
                "the payer completed the payment while it was being cancelled, and the channel then reversed it: the money went back to the payer; do not deliver. An alert was raised for reconciliation",
            ),
            E::NoChannel(method) => ApiError::invalid(
                "method_not_available",
                format!("no channel is configured for method {method}"),
            )
            .with_param("method"),
            E::ChannelBusy(busy) => {
                tracing::warn!(channel = %busy.channel, limit = busy.limit, "channel busy; failing fast");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "channel_error",
                    "channel_busy",
                    "the channel is handling as many requests as it may; nothing was done, retry shortly",
                )
            }
            E::ChannelUnconfirmed(reason) => {
                tracing::warn!(reason = %reason, "channel did not confirm");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "channel_error",
                    "channel_unconfirmed",
                    "the channel did not confirm the operation; the payment is unchanged, retry later",
                )
            }
            E::Store(err) => {
                tracing::error!(error = %err, "storage error");
                ApiError::internal()
            }
            E::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                ApiError::internal()
            }
        }
    }
}

/// Why a refund request was refused; nothing was written but its idempotency record. Amounts
/// over what remains refundable are 409, not 400: the same request may fit or not depending on
/// the payment's other refunds (a failed one frees its amount).
fn refund_refusal(r: payrail_domain::refund::RefundRefusal) -> ApiError {
    use payrail_domain::refund::RefundRefusal as R;
    let conflict = |code: &'static str, msg: String| {
        ApiError::new(StatusCode::CONFLICT, "invalid_request_error", code, msg)
    };
    let message = r.to_string();
    match r {
        R::NotRefundable(_) => conflict("payment_not_refundable", message).with_param("payment_id"),
        R::CurrencyMismatch { .. } => {
            ApiError::invalid("currency_mismatch", message).with_param("currency")
        }
        R::NotSupported => conflict("refund_not_supported", message).with_param("payment_id"),
        R::PartialNotSupported => {
            conflict("partial_refund_not_supported", message).with_param("amount")
        }
        R::WindowExpired { .. } => {
            conflict("refund_window_expired", message).with_param("payment_id")
        }
        R::TooManyRefunds { .. } => conflict("too_many_refunds", message).with_param("payment_id"),
        R::ExceedsRefundable { .. } => {
            conflict("refund_exceeds_payment", message).with_param("amount")
        }
        R::AmountInvalid => ApiError::invalid(
            "amount_invalid",
            "amount must be a positive integer number of minor units",
        )
        .with_param("amount"),
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let unauth = |code, msg: String| {
            ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", code, msg)
        };
        match e {
            AuthError::Signing(s) => {
                let code = match s {
                    payrail_domain::signing::SigningError::Missing => "signature_missing",
                    payrail_domain::signing::SigningError::Malformed => "signature_malformed",
                    payrail_domain::signing::SigningError::BadNonce => "nonce_invalid",
                    payrail_domain::signing::SigningError::StaleTimestamp => {
                        "timestamp_out_of_window"
                    }
                };
                unauth(code, s.to_string())
            }
            AuthError::UnknownKey => unauth("key_unknown", "unknown key_id".into()),
            AuthError::BadSignature => unauth(
                "signature_invalid",
                "signature does not match; see docs/signing.md for the canonical string".into(),
            ),
            AuthError::NonceReused => unauth(
                "nonce_reused",
                "this nonce was used before; use a fresh one per request".into(),
            ),
            AuthError::BadOperatorToken => unauth(
                "operator_token_invalid",
                "missing or invalid operator bearer token".into(),
            ),
            AuthError::Store(err) => {
                tracing::error!(error = %err, "storage error during authentication");
                ApiError::internal()
            }
            AuthError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error during authentication");
                ApiError::internal()
            }
        }
    }
}

/// Maps a JSON decoding failure to a 400 naming the parameter.
/// Drops a backticked input value from a serde message (`invalid type: integer `1`, …` →
/// `invalid type: integer, …`); names of fields and variants are kept.
fn strip_backticked_value(msg: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            if let (Some(open), Some(close)) = (rest.find(" `"), rest.find("`,")) {
                if open < close {
                    return format!("{prefix}{}{}", &rest[..open], &rest[close + 1..]);
                }
            }
        }
    }
    msg.to_string()
}

pub fn json_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.inner();
    let msg = inner.to_string();
    // serde_json appends " at line L column C"; keep the message short and stable.
    let msg = msg
        .split(" at line ")
        .next()
        .unwrap_or(&msg)
        .replace("expected i64", "expected an integer");
    if inner.is_syntax() || inner.is_eof() {
        return ApiError::invalid(
            "invalid_json",
            format!("request body is not valid JSON: {msg}"),
        );
    }
    if let Some(field) = msg
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        return ApiError::invalid("parameter_missing", format!("{field} is required"))
            .with_param(field);
    }
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("");
        return ApiError::invalid("parameter_unknown", format!("unknown parameter {field}"))
            .with_param(field);
    }
    // "invalid type: integer `123`, expected a string": the value is the caller's input, which
    // may be a secret sent in the wrong shape (a payment code as a number, a key in `secrets`);
    // it is not repeated back.
    let msg = strip_backticked_value(&msg);
    let param = if path == "." { None } else { Some(path) };
    let err = ApiError::invalid("parameter_invalid", msg);
    match param {
        Some(p) => err.with_param(p),
        None => err,
    }
}

#[cfg(test)]
mod value_tests {
    use super::strip_backticked_value as strip;

    #[test]
    fn input_values_are_not_echoed() {
        assert_eq!(
            strip("invalid type: integer `287654321098765432`, expected a string"),
            "invalid type: integer, expected a string"
        );
        assert_eq!(
            strip("invalid type: floating point `12.5`, expected an integer"),
            "invalid type: floating point, expected an integer"
        );
        assert_eq!(
            strip("invalid type: null, expected a string"),
            "invalid type: null, expected a string"
        );
        assert_eq!(strip("missing field `amount`"), "missing field `amount`");
    }
}
