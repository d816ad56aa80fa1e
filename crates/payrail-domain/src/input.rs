//! Validated inputs of the merchant and operator APIs ("parse, don't validate").
//!
//! Each type can only be built through `parse`, which enforces the documented limits; handlers
//! and storage never see an unchecked string.

use std::collections::BTreeMap;
use std::fmt;

/// A rejected input: which parameter, a stable machine code, and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub param: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl InputError {
    pub fn new(param: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        InputError {
            param,
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.param, self.message)
    }
}

fn check_len(param: &'static str, s: &str, min: usize, max: usize) -> Result<(), InputError> {
    let n = s.chars().count();
    if n < min {
        return Err(InputError::new(
            param,
            "parameter_missing",
            format!("{param} must not be empty"),
        ));
    }
    if n > max {
        return Err(InputError::new(
            param,
            "parameter_too_long",
            format!("{param} must be at most {max} characters"),
        ));
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str { &self.0 }
            pub fn into_string(self) -> String { self.0 }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.0) }
        }
    };
}

string_newtype! {
    /// The merchant's own order number: 1–64 characters of `[A-Za-z0-9_-|*.]`, unique per
    /// merchant (the channels' own limits are of the same shape).
    OutTradeNo
}
string_newtype! {
    /// The merchant's own refund number: the same shape as [`OutTradeNo`], unique per merchant.
    OutRefundNo
}
string_newtype! {
    /// Why a refund is made, passed to the channel where it takes one (WeChat `reason`, Alipay
    /// `refund_reason`): 1–80 characters (WeChat's limit), no control characters.
    RefundReason
}
string_newtype! {
    /// The merchant's own payout number: the same shape as [`OutTradeNo`], unique per merchant.
    OutPayoutNo
}
string_newtype! {
    /// What a payout is for, passed to the bank as the transfer's remark (附言): 1–64
    /// characters, no control characters.
    PayoutDescription
}
string_newtype! {
    /// What is being bought, shown to the payer: 1–128 characters, no control characters.
    Subject
}
string_newtype! {
    /// A merchant's `http(s)` URL for payment notifications, at most 512 characters.
    NotifyUrl
}
string_newtype! {
    /// The `Idempotency-Key` header: 1–255 printable ASCII characters.
    IdempotencyKey
}
string_newtype! {
    /// A merchant's display name: 1–128 characters, no control characters.
    MerchantName
}

impl OutTradeNo {
    pub const MAX_LEN: usize = 64;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        check_len("out_trade_no", s, 1, Self::MAX_LEN)?;
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-|*.".contains(&b))
        {
            return Err(InputError::new(
                "out_trade_no",
                "parameter_invalid",
                "out_trade_no may contain only letters, digits and _ - | * .",
            ));
        }
        Ok(OutTradeNo(s.to_string()))
    }
}

impl OutRefundNo {
    pub const MAX_LEN: usize = 64;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        check_len("out_refund_no", s, 1, Self::MAX_LEN)?;
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-|*.".contains(&b))
        {
            return Err(InputError::new(
                "out_refund_no",
                "parameter_invalid",
                "out_refund_no may contain only letters, digits and _ - | * .",
            ));
        }
        Ok(OutRefundNo(s.to_string()))
    }
}

impl RefundReason {
    pub const MAX_LEN: usize = 80;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        check_len("reason", s, 1, Self::MAX_LEN)?;
        no_control("reason", s)?;
        Ok(RefundReason(s.to_string()))
    }
}

impl OutPayoutNo {
    pub const MAX_LEN: usize = 64;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        check_len("out_payout_no", s, 1, Self::MAX_LEN)?;
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-|*.".contains(&b))
        {
            return Err(InputError::new(
                "out_payout_no",
                "parameter_invalid",
                "out_payout_no may contain only letters, digits and _ - | * .",
            ));
        }
        Ok(OutPayoutNo(s.to_string()))
    }
}

impl PayoutDescription {
    /// Banks' remark fields are short (often 30–60 Chinese characters); 64 is the common cap.
    pub const MAX_LEN: usize = 64;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        check_len("description", s, 1, Self::MAX_LEN)?;
        no_control("description", s)?;
        Ok(PayoutDescription(s.to_string()))
    }
}

fn no_control(param: &'static str, s: &str) -> Result<(), InputError> {
    if s.chars().any(char::is_control) {
        return Err(InputError::new(
            param,
            "parameter_invalid",
            format!("{param} must not contain control characters"),
        ));
    }
    if s.trim().is_empty() {
        return Err(InputError::new(
            param,
            "parameter_missing",
            format!("{param} must not be blank"),
        ));
    }
    Ok(())
}

impl Subject {
    pub const MAX_LEN: usize = 128;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        check_len("subject", s, 1, Self::MAX_LEN)?;
        no_control("subject", s)?;
        Ok(Subject(s.to_string()))
    }
}

impl MerchantName {
    pub const MAX_LEN: usize = 128;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        check_len("name", s, 1, Self::MAX_LEN)?;
        no_control("name", s)?;
        Ok(MerchantName(s.to_string()))
    }
}

impl NotifyUrl {
    pub const MAX_LEN: usize = 512;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        check_len("notify_url", s, 1, Self::MAX_LEN)?;
        let rest = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .ok_or_else(|| {
                InputError::new(
                    "notify_url",
                    "parameter_invalid",
                    "notify_url must be an http:// or https:// URL",
                )
            })?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if host.is_empty() || host.contains('@') || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InputError::new(
                "notify_url",
                "parameter_invalid",
                "notify_url must be an absolute URL with a host and no credentials or spaces",
            ));
        }
        Ok(NotifyUrl(s.to_string()))
    }
}

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;
    pub fn parse(s: &str) -> Result<Self, InputError> {
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InputError::new(
                "Idempotency-Key",
                "idempotency_key_invalid",
                "Idempotency-Key must be 1-255 printable ASCII characters",
            ));
        }
        Ok(IdempotencyKey(s.to_string()))
    }
}

/// Free-form merchant key/value pairs stored with an object and echoed back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata(BTreeMap<String, String>);

impl Metadata {
    pub const MAX_KEYS: usize = 20;
    pub const MAX_KEY_LEN: usize = 40;
    pub const MAX_VALUE_LEN: usize = 500;

    pub fn parse(map: BTreeMap<String, String>) -> Result<Self, InputError> {
        if map.len() > Self::MAX_KEYS {
            return Err(InputError::new(
                "metadata",
                "parameter_invalid",
                format!("metadata may have at most {} keys", Self::MAX_KEYS),
            ));
        }
        for (k, v) in &map {
            if k.is_empty()
                || k.chars().count() > Self::MAX_KEY_LEN
                || k.chars().any(char::is_control)
            {
                return Err(InputError::new(
                    "metadata",
                    "parameter_invalid",
                    format!(
                        "metadata keys must be 1-{} characters without control characters",
                        Self::MAX_KEY_LEN
                    ),
                ));
            }
            if v.chars().count() > Self::MAX_VALUE_LEN {
                return Err(InputError::new(
                    "metadata",
                    "parameter_too_long",
                    format!(
                        "metadata values must be at most {} characters",
                        Self::MAX_VALUE_LEN
                    ),
                ));
            }
        }
        Ok(Metadata(map))
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

/// How the payer pays. Routing maps a method to a channel.
///
/// Names are `<wallet>_<way>`: `qr`/`native` = the payer scans a code we show; `code` = the
/// merchant scans the payer's payment code (barcode, 付款码); `h5`/`wap`/`web` = the payer's
/// browser is sent to the channel; `jsapi` = inside the wallet app (WeChat official account or
/// mini-program).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PaymentMethod {
    /// The built-in sandbox channel; outcome chosen by test amounts (docs/sandbox.md).
    Sandbox,
    /// WeChat Pay Native: we show `code_url` as a QR code, the payer scans it.
    WechatNative,
    /// WeChat Pay H5: the payer's mobile browser is sent to `h5_url` (needs the client IP).
    WechatH5,
    /// WeChat Pay JSAPI: inside WeChat; needs the payer's `openid`.
    WechatJsapi,
    /// WeChat Pay payment code (付款码): we scan the payer's code (`auth_code`).
    WechatCode,
    /// Alipay face-to-face precreate: we show `qr_code`, the payer scans it.
    AlipayQr,
    /// Alipay barcode pay: we scan the payer's code (`auth_code`).
    AlipayCode,
    /// Alipay WAP pay: the payer's mobile browser is sent to a signed gateway URL.
    AlipayWap,
    /// UnionPay online gateway (B2C): the payer's browser posts a signed form to UnionPay.
    UnionpayWeb,
    /// UnionPay QR payment code (被扫): we scan the payer's code (`auth_code`).
    UnionpayCode,
    /// The payer's stored balance at payrail (钱包余额支付), named by `payer_id`: frozen when
    /// the payment is created, confirmed when it succeeds, released when it fails (TCC).
    Wallet,
}

impl PaymentMethod {
    pub const ALL: &'static [PaymentMethod] = &[
        PaymentMethod::Sandbox,
        PaymentMethod::WechatNative,
        PaymentMethod::WechatH5,
        PaymentMethod::WechatJsapi,
        PaymentMethod::WechatCode,
        PaymentMethod::AlipayQr,
        PaymentMethod::AlipayCode,
        PaymentMethod::AlipayWap,
        PaymentMethod::UnionpayWeb,
        PaymentMethod::UnionpayCode,
        PaymentMethod::Wallet,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            PaymentMethod::Sandbox => "sandbox",
            PaymentMethod::WechatNative => "wechat_native",
            PaymentMethod::WechatH5 => "wechat_h5",
            PaymentMethod::WechatJsapi => "wechat_jsapi",
            PaymentMethod::WechatCode => "wechat_code",
            PaymentMethod::AlipayQr => "alipay_qr",
            PaymentMethod::AlipayCode => "alipay_code",
            PaymentMethod::AlipayWap => "alipay_wap",
            PaymentMethod::UnionpayWeb => "unionpay_web",
            PaymentMethod::UnionpayCode => "unionpay_code",
            PaymentMethod::Wallet => "wallet",
        }
    }

    /// The merchant scans the payer's code: the request must carry `auth_code`, the answer is
    /// often USERPAYING, and an inconclusive payment is cancelled (reversed), not closed.
    pub fn is_payment_code(&self) -> bool {
        matches!(
            self,
            PaymentMethod::WechatCode | PaymentMethod::AlipayCode | PaymentMethod::UnionpayCode
        )
    }

    pub fn parse(s: &str) -> Result<Self, InputError> {
        PaymentMethod::ALL
            .iter()
            .copied()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = PaymentMethod::ALL.iter().map(|m| m.as_str()).collect();
                InputError::new(
                    "method",
                    "parameter_invalid",
                    format!("unknown method; known methods: {}", known.join(", ")),
                )
            })
    }
}

/// Seconds until an unpaid payment expires and is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiresIn(u32);

impl ExpiresIn {
    pub const MIN_S: i64 = 60;
    pub const MAX_S: i64 = 7 * 24 * 3600;
    pub const DEFAULT: ExpiresIn = ExpiresIn(1800);

    pub fn parse(seconds: i64) -> Result<Self, InputError> {
        if !(Self::MIN_S..=Self::MAX_S).contains(&seconds) {
            return Err(InputError::new(
                "expires_in",
                "parameter_out_of_range",
                format!(
                    "expires_in must be between {} and {} seconds",
                    Self::MIN_S,
                    Self::MAX_S
                ),
            ));
        }
        Ok(ExpiresIn(seconds as u32))
    }

    pub fn seconds(&self) -> i64 {
        i64::from(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_trade_no_rules() {
        for good in ["A", "order-2024_01|x*y.z", &"9".repeat(64)] {
            assert!(OutTradeNo::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "has space",
            "中文",
            &"9".repeat(65),
            "semi;colon",
            "a\nb",
        ] {
            assert!(OutTradeNo::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn refund_number_and_reason_rules() {
        for good in ["R", "refund-2024_01|x*y.z", &"9".repeat(64)] {
            assert!(OutRefundNo::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "has space", "退款", &"9".repeat(65), "a\nb"] {
            let e = OutRefundNo::parse(bad).unwrap_err();
            assert_eq!(e.param, "out_refund_no", "{bad}");
        }
        assert!(RefundReason::parse("商品已退货").is_ok());
        assert!(RefundReason::parse(&"字".repeat(80)).is_ok());
        assert_eq!(
            RefundReason::parse(&"字".repeat(81)).unwrap_err().code,
            "parameter_too_long"
        );
        assert_eq!(
            RefundReason::parse("  ").unwrap_err().code,
            "parameter_missing"
        );
        assert_eq!(RefundReason::parse("a\u{7}b").unwrap_err().param, "reason");
    }

    #[test]
    fn payout_number_and_description_rules() {
        for good in ["P", "payout-2024_01|x*y.z", &"9".repeat(64)] {
            assert!(OutPayoutNo::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "has space", "出款", &"9".repeat(65), "a\nb"] {
            let e = OutPayoutNo::parse(bad).unwrap_err();
            assert_eq!(e.param, "out_payout_no", "{bad}");
        }
        assert!(PayoutDescription::parse("十一月货款").is_ok());
        assert!(PayoutDescription::parse(&"字".repeat(64)).is_ok());
        assert_eq!(
            PayoutDescription::parse(&"字".repeat(65)).unwrap_err().code,
            "parameter_too_long"
        );
        assert_eq!(
            PayoutDescription::parse(" ").unwrap_err().code,
            "parameter_missing"
        );
        assert_eq!(
            PayoutDescription::parse("a\u{7}b").unwrap_err().param,
            "description"
        );
    }

    #[test]
    fn subject_rules() {
        assert!(Subject::parse("咖啡 x2").is_ok());
        assert!(Subject::parse(&"字".repeat(128)).is_ok());
        assert_eq!(
            Subject::parse(&"字".repeat(129)).unwrap_err().code,
            "parameter_too_long"
        );
        assert!(Subject::parse("").is_err());
        assert!(Subject::parse("   ").is_err());
        assert!(Subject::parse("a\u{0}b").is_err());
    }

    #[test]
    fn notify_url_rules() {
        assert!(NotifyUrl::parse("https://shop.example/notify?x=1").is_ok());
        assert!(NotifyUrl::parse("http://127.0.0.1:9000/hook").is_ok());
        for bad in [
            "ftp://x",
            "https://",
            "https://user:pw@host/",
            "https://a b",
            "notaurl",
            &format!("https://h/{}", "a".repeat(600)),
        ] {
            assert!(NotifyUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_limits() {
        let mut m = BTreeMap::new();
        for i in 0..20 {
            m.insert(format!("k{i}"), "v".into());
        }
        assert!(Metadata::parse(m.clone()).is_ok());
        m.insert("k20".into(), "v".into());
        assert!(Metadata::parse(m).is_err());
        let long_value = BTreeMap::from([("k".to_string(), "v".repeat(501))]);
        assert!(Metadata::parse(long_value).is_err());
        let empty_key = BTreeMap::from([(String::new(), "v".to_string())]);
        assert!(Metadata::parse(empty_key).is_err());
    }

    #[test]
    fn expires_in_and_keys() {
        assert!(ExpiresIn::parse(59).is_err());
        assert!(ExpiresIn::parse(60).is_ok());
        assert!(ExpiresIn::parse(7 * 24 * 3600 + 1).is_err());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
        assert!(IdempotencyKey::parse("has space").is_err());
        assert!(IdempotencyKey::parse("550e8400-e29b-41d4-a716-446655440000").is_ok());
        assert!(PaymentMethod::parse("sandbox").is_ok());
        assert!(PaymentMethod::parse("SANDBOX").is_err());
        for m in PaymentMethod::ALL {
            assert_eq!(PaymentMethod::parse(m.as_str()), Ok(*m));
        }
        assert!(PaymentMethod::WechatCode.is_payment_code());
        assert!(!PaymentMethod::AlipayQr.is_payment_code());
    }
}
