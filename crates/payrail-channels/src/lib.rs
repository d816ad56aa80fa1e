//! Channel connectors: the one place that speaks each payment channel's protocol.
//!
//! A connector turns our requests into the channel's wire format (signing, field names, amount
//! units) and maps the channel's answers conservatively onto [`ChannelOutcome`],
//! [`CancelOutcome`] and [`RefundOutcome`]: only an explicit business rejection is a failure;
//! timeouts, 5xx, bad signatures, malformed answers and "not found" are unknown. The engine wraps
//! every call in a timeout too, so a connector may simply await; the HTTP connectors also bound
//! every request themselves (`timeout_ms` in their configs).
//!
//! Adding a channel = one module implementing [`Connector`] plus one line in [`Registry`].
//! Payout banks (代付) have their own, smaller trait: [`payout::PayoutConnector`].
//! One connector instance serves one channel account (merchant id + keys).

pub mod alipay;
mod bills;
mod common;
pub mod payout;
pub mod sandbox;
pub mod unionpay;
pub mod wechatpay;

use async_trait::async_trait;
use payrail_domain::civil::Date;
use payrail_domain::input::PaymentMethod;
use payrail_domain::{AttemptId, ChannelOutcome, Money, RefundId, Secret};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Submit one attempt to the channel.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    /// Our attempt id; sent to the channel as its merchant order number, so a later query or a
    /// notification names exactly this attempt.
    pub attempt_id: AttemptId,
    pub amount: Money,
    pub subject: String,
    pub method: PaymentMethod,
    /// Also the channel's order time where it needs one (UnionPay `txnTime`): queries must pass
    /// the same value in [`QueryRequest::submitted_at_ms`].
    pub submitted_at_ms: i64,
    pub expires_at_ms: i64,
    /// Where the channel should send its asynchronous notifications for this attempt (our
    /// endpoint for the channel account, not the merchant's webhook). `None` = the connector
    /// config's `notify_url`.
    pub notify_url: Option<String>,
    /// The payer's payment code, for `*_code` methods. One-time, but treated as a secret.
    pub auth_code: Option<Secret<String>>,
    /// The payer's IP address (WeChat H5 requires it; UnionPay and Alipay accept it).
    pub client_ip: Option<IpAddr>,
    /// Where the channel sends the payer's browser back after a redirect method (Alipay WAP
    /// `return_url`, UnionPay `frontUrl`). `None` = the connector config's default.
    pub return_url: Option<String>,
    /// The payer's id at the channel: WeChat JSAPI `openid`.
    pub payer_id: Option<String>,
}

impl SubmitRequest {
    /// A request with every optional field empty.
    pub fn new(
        attempt_id: AttemptId,
        amount: Money,
        subject: impl Into<String>,
        method: PaymentMethod,
        submitted_at_ms: i64,
        expires_at_ms: i64,
    ) -> SubmitRequest {
        SubmitRequest {
            attempt_id,
            amount,
            subject: subject.into(),
            method,
            submitted_at_ms,
            expires_at_ms,
            notify_url: None,
            auth_code: None,
            client_ip: None,
            return_url: None,
            payer_id: None,
        }
    }
}

/// Ask the channel about an attempt. Carries what some channels need to find the order again
/// (UnionPay's query wants the original order time, for example).
#[derive(Debug, Clone)]
pub struct QueryRequest {
    pub attempt_id: AttemptId,
    pub amount: Money,
    pub channel_trade_no: Option<String>,
    pub submitted_at_ms: i64,
    /// The order's expiry as sent at submit ([`SubmitRequest::expires_at_ms`]; UnionPay
    /// `payTimeout`): a connector that infers a close from the channel's records needs it.
    pub expires_at_ms: i64,
}

/// Refund (part of) a succeeded attempt, or ask about such a refund.
///
/// `refund_id` is sent as the channel's refund request number (WeChat `out_refund_no`, Alipay
/// `out_request_no`, UnionPay `orderId`), so repeating the same request is idempotent at the
/// channel: send it again, with the same amount, after any unknown outcome.
#[derive(Debug, Clone)]
pub struct RefundRequest {
    pub refund_id: RefundId,
    pub attempt_id: AttemptId,
    /// The attempt's channel trade number, if known (UnionPay needs it: `origQryId`).
    pub channel_trade_no: Option<String>,
    /// The amount the attempt was paid (WeChat requires the order total).
    pub payment_amount: Money,
    /// This refund's amount, at most what remains refundable.
    pub refund_amount: Money,
    pub reason: Option<String>,
    /// When the refund was first requested; also the channel's order time where it needs one
    /// (UnionPay `txnTime`), so a repeat and a refund query must pass the same value.
    pub requested_at_ms: i64,
    /// Where refund notifications go. `None` = the connector config's `notify_url`.
    pub notify_url: Option<String>,
}

/// What the payer must do next, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextAction {
    /// Show this payload as a QR code.
    DisplayQrCode { code_url: String },
    /// Send the payer's browser here.
    Redirect { url: String },
    /// Have the payer's browser POST these fields to `url` (an auto-submitting HTML form):
    /// UnionPay's front transaction.
    PostForm {
        url: String,
        fields: Vec<(String, String)>,
    },
    /// Pass these parameters to the wallet's in-app payment call (WeChat JSAPI
    /// `WeixinJSBridge.invoke('getBrandWCPayRequest', …)`); they are already signed.
    InvokeWallet { params: Vec<(String, String)> },
}

#[derive(Debug, Clone)]
pub struct SubmitResponse {
    pub outcome: ChannelOutcome,
    pub next_action: Option<NextAction>,
}

/// The answer to a cancel (WeChat reverse, Alipay cancel, UnionPay revoke). A cancel voids the
/// order whether or not it was paid: unpaid it is closed, paid it is refunded in full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The channel confirms the order is cancelled. `refunded` says whether money had been
    /// taken and is going back (Alipay `action=refund`), when the channel says.
    Cancelled { refunded: Option<bool> },
    /// The channel asks us to call cancel again (WeChat `recall`, Alipay `retry_flag=Y`).
    Retry { reason: String },
    /// We do not know whether the cancel happened (timeout, 5xx, bad signature, …): call again
    /// or query.
    Unknown { reason: String },
    /// The channel definitely refused: too late (past the cancel window), wrong state, …
    Failed { code: String, message: String },
    /// This channel or method has no cancel: close or refund instead (see [`Capabilities`]).
    NotSupported,
}

/// What the channel said about a refund, after conservative mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// The money is on its way back to the payer.
    Succeeded {
        channel_refund_no: Option<String>,
        refunded_at_ms: Option<i64>,
    },
    /// Accepted, not finished: query again later.
    Processing { channel_refund_no: Option<String> },
    /// The channel definitely refused this refund; nothing was refunded.
    Failed { code: String, message: String },
    /// We do not know (timeout, 5xx, bad signature, "not found", a refund in an abnormal state
    /// that needs a person). Never free the amount on this: query or repeat the same request.
    Unknown { reason: String },
}

impl RefundOutcome {
    pub fn unknown(reason: impl Into<String>) -> RefundOutcome {
        RefundOutcome::Unknown {
            reason: reason.into(),
        }
    }

    pub fn label(&self) -> &'static str {
        match self {
            RefundOutcome::Succeeded { .. } => "succeeded",
            RefundOutcome::Processing { .. } => "processing",
            RefundOutcome::Failed { .. } => "failed",
            RefundOutcome::Unknown { .. } => "unknown",
        }
    }

    pub fn is_definite(&self) -> bool {
        matches!(
            self,
            RefundOutcome::Succeeded { .. } | RefundOutcome::Failed { .. }
        )
    }
}

/// A raw inbound channel notification, exactly as received by our HTTP endpoint.
#[derive(Debug, Clone)]
pub struct InboundNotification {
    pub headers: http::HeaderMap,
    /// The raw body bytes: signatures cover them exactly, never re-serialise.
    pub body: Vec<u8>,
    /// Our clock, for the WeChat ±5 min timestamp window.
    pub now_ms: i64,
}

/// A verified, decoded channel notification.
///
/// The connector reports what the channel said; it does not compare it with our records. The
/// engine must cross-check `attempt_id`, `amount` and `channel_merchant_id` against the
/// attempt before applying `event` (a validly signed notification can still belong to another
/// order or account: jeepay #81), and on a mismatch acknowledge it (to stop the retries), leave
/// the payment alone and raise an alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelNotification {
    /// The channel's notification id (WeChat `id`, Alipay `notify_id`, UnionPay `queryId`):
    /// for logs. Retries may repeat or change it; de-duplicate on state, not on this.
    pub notification_id: Option<String>,
    /// The merchant order number the channel names, parsed as our attempt id.
    pub attempt_id: AttemptId,
    pub channel_trade_no: Option<String>,
    /// The order's total amount as the channel states it.
    pub amount: Money,
    /// The channel merchant id the notification is for: WeChat `mchid`, Alipay `app_id`,
    /// UnionPay `merId`.
    pub channel_merchant_id: String,
    /// The app id where the channel has one (WeChat `appid`, Alipay `seller_id` as the second
    /// account identifier).
    pub channel_app_id: Option<String>,
    pub event: NotificationEvent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotificationEvent {
    /// The payment's status changed.
    Payment { outcome: ChannelOutcome },
    /// A refund's status changed. `refund_id` is `None` when the channel's refund number is not
    /// one of ours (for example a refund made by a cancel, or in the channel's console).
    Refund {
        refund_id: Option<RefundId>,
        /// This refund's amount, when the channel states it (WeChat, UnionPay).
        refund_amount: Option<Money>,
        /// The total refunded on the order so far, when the channel states it (Alipay
        /// `refund_fee`).
        refunded_total: Option<Money>,
        outcome: RefundOutcome,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotificationError {
    /// WeChat's signature probe (`WECHATPAY/SIGNTEST/…`): refuse it like a bad signature, change
    /// nothing, do not alert.
    #[error("signature probe")]
    Probe,
    #[error("bad signature")]
    BadSignature,
    /// The signed timestamp is outside the allowed window (WeChat: ±5 minutes).
    #[error("timestamp outside the allowed window")]
    StaleTimestamp,
    #[error("cannot decrypt the notification resource")]
    Decrypt,
    /// Signed correctly but not understood (missing field, unknown order number format, …).
    #[error("malformed notification: {0}")]
    Malformed(String),
    #[error("this channel sends no notifications")]
    NotSupported,
}

/// Exactly what to answer the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationReply {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
}

/// One line of a channel's bill (reconciliation) file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillLine {
    pub kind: BillLineKind,
    pub channel_trade_no: String,
    /// Their merchant order number (our attempt id when the order is ours), as written.
    pub out_trade_no: String,
    pub channel_refund_no: Option<String>,
    /// Their merchant refund number (our refund id when ours), as written.
    pub out_refund_no: Option<String>,
    /// The payment's amount for a payment line; the refunded amount (positive) for a refund.
    pub amount: Money,
    /// The channel's fee for this line: positive = charged, negative = returned.
    pub fee: Money,
    /// The channel's own status or business-type word (`SUCCESS`, `REFUND`, `交易`, `退款`, …).
    pub status: String,
    pub occurred_at_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillLineKind {
    Payment,
    Refund,
}

/// A parsed bill: the lines and the totals the file states, already checked against each
/// other (a mismatch is a [`BillError::Inconsistent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    pub date: Date,
    pub lines: Vec<BillLine>,
    pub summary: BillSummary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BillSummary {
    pub payment_count: u64,
    pub payment_total: Money,
    pub refund_count: u64,
    pub refund_total: Money,
    pub fee_total: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillError {
    #[error("no bill for this date yet (the channel builds it the next morning)")]
    NotReady,
    #[error("bill download failed: {0}")]
    Transport(String),
    #[error("bill download refused by the channel: {code} {message}")]
    Channel { code: String, message: String },
    #[error("bad signature on the bill answer")]
    BadSignature,
    #[error("bill file corrupt: {0}")]
    Corrupt(String),
    #[error("bill lines do not add up to its summary: {0}")]
    Inconsistent(String),
    #[error("this channel has no bill download")]
    NotSupported,
}

/// What a method supports at a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodCapability {
    pub method: PaymentMethod,
    /// `close` stops an unpaid order (WeChat Native/H5/JSAPI, Alipay after the scan).
    pub close: bool,
    /// `cancel` voids the order paid or not (payment-code methods).
    pub cancel: bool,
    /// The channel sends payment notifications for this method.
    pub notifies: bool,
}

/// What a channel supports, so the engine can pick cancel vs close vs refund by the rules of
/// each channel (docs/channels.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub methods: Vec<MethodCapability>,
    pub refund: bool,
    pub partial_refund: bool,
    /// How long after payment a refund is accepted.
    pub refund_window_days: u32,
    /// Most refunds on one payment, where the channel limits it (WeChat: 50).
    pub max_refunds_per_payment: Option<u32>,
    /// How long after the order a cancel is accepted (WeChat 7 days, Alipay 24 h, UnionPay the
    /// same day; `None` = not supported).
    pub cancel_window_ms: Option<i64>,
    /// Wait at least this long after a refund before querying it (Alipay: 10 s).
    pub refund_query_delay_ms: i64,
    pub bills: bool,
    /// How long after an unpaid order's expiry `close` may still answer unknown before it can
    /// be definite (UnionPay: until the reconciliation files of the order's days are out). The
    /// engine's `payment_unresolved` alert waits this much longer. 0 for a channel that closes
    /// on request.
    pub close_confirm_delay_ms: i64,
}

impl Capabilities {
    pub fn method(&self, method: PaymentMethod) -> Option<&MethodCapability> {
        self.methods.iter().find(|m| m.method == method)
    }
}

#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// Stable channel name, stored on payments and used in metrics: `sandbox`, `wechatpay`, …
    fn name(&self) -> &'static str;

    fn supports(&self, method: PaymentMethod) -> bool {
        self.capabilities().method(method).is_some()
    }

    /// What this channel supports. The default: nothing beyond submit/query/close.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            methods: Vec::new(),
            refund: false,
            partial_refund: false,
            refund_window_days: 0,
            max_refunds_per_payment: None,
            cancel_window_ms: None,
            refund_query_delay_ms: 0,
            bills: false,
            close_confirm_delay_ms: 0,
        }
    }

    /// Place the order. Must be safe to repeat with the same attempt id (channels de-duplicate
    /// on their merchant order number).
    async fn submit(&self, req: &SubmitRequest) -> SubmitResponse;

    /// Ask for the attempt's current status.
    async fn query(&self, req: &QueryRequest) -> ChannelOutcome;

    /// Close an unpaid order so it can no longer be paid. If the payer paid meanwhile the
    /// channel says so and the outcome is `Succeeded`.
    async fn close(&self, req: &QueryRequest) -> ChannelOutcome;

    /// Cancel (reverse, revoke) the order whether or not it was paid. Safe to repeat.
    async fn cancel(&self, _req: &QueryRequest) -> CancelOutcome {
        CancelOutcome::NotSupported
    }

    /// Refund part or all of a succeeded attempt. Safe to repeat with the same refund id and
    /// amount.
    async fn refund(&self, _req: &RefundRequest) -> RefundOutcome {
        RefundOutcome::Failed {
            code: "refund_not_supported".into(),
            message: "this channel has no refunds; nothing was sent".into(),
        }
    }

    /// Ask about a refund made with [`Connector::refund`].
    async fn query_refund(&self, _req: &RefundRequest) -> RefundOutcome {
        RefundOutcome::unknown("this channel has no refund query")
    }

    /// Verify and decode an inbound notification. Never trusts an unverified body.
    fn parse_notification(
        &self,
        _n: &InboundNotification,
    ) -> Result<ChannelNotification, NotificationError> {
        Err(NotificationError::NotSupported)
    }

    /// The exact answer for the channel: `accepted` = we took responsibility for the
    /// notification (stored, or deliberately ignored after a mismatch) and it must not be sent
    /// again; otherwise the channel retries on its schedule.
    fn notification_reply(&self, accepted: bool) -> NotificationReply {
        NotificationReply {
            status: if accepted { 204 } else { 400 },
            content_type: None,
            body: Vec::new(),
        }
    }

    /// Download and parse the channel's bill for one day (the channel's own day, Beijing time).
    async fn download_bill(&self, _date: Date) -> Result<Bill, BillError> {
        Err(BillError::NotSupported)
    }
}

/// The channels this process can use, by name.
#[derive(Clone, Default)]
pub struct Registry {
    connectors: BTreeMap<&'static str, Arc<dyn Connector>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    pub fn register(&mut self, connector: Arc<dyn Connector>) {
        self.connectors.insert(connector.name(), connector);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Connector>> {
        self.connectors.get(name)
    }

    /// The first registered channel that supports `method`. Real routing (priorities, limits,
    /// health) replaces this when there is more than one candidate.
    pub fn route(&self, method: PaymentMethod) -> Option<&Arc<dyn Connector>> {
        self.connectors.values().find(|c| c.supports(method))
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.connectors.keys().copied().collect()
    }
}

/// Builds the connector for one channel account from its typed configuration: the one place
/// that knows every channel.
pub fn connector_from_config(
    config: ChannelConfig,
) -> Result<Arc<dyn Connector>, common::ConfigError> {
    Ok(match config {
        ChannelConfig::WechatPay(c) => Arc::new(wechatpay::WechatPay::new(c)?),
        ChannelConfig::Alipay(c) => Arc::new(alipay::Alipay::new(c)?),
        ChannelConfig::UnionPay(c) => Arc::new(unionpay::UnionPay::new(c)?),
    })
}

/// One channel account's configuration.
#[derive(Debug, Clone)]
pub enum ChannelConfig {
    WechatPay(wechatpay::WechatPayConfig),
    Alipay(alipay::AlipayConfig),
    UnionPay(unionpay::UnionPayConfig),
}

pub use common::{ConfigError, DEFAULT_TIMEOUT_MS};

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        include_str!("../../payrail-emulator/testdata/test-only-keys/merchant-private.pem");
    const PUB: &str =
        include_str!("../../payrail-emulator/testdata/test-only-keys/channel-public.pem");

    /// Key material never shows in a configuration's Debug output (it is what gets logged when
    /// a channel account is printed).
    #[test]
    fn configs_never_show_key_material() {
        let wx = wechatpay::WechatPayConfig {
            base_url: "https://api.mch.weixin.qq.com".into(),
            mchid: "1900000109".into(),
            appid: "wx1".into(),
            merchant_serial_no: "S".into(),
            merchant_private_key: Secret::new(KEY.into()),
            api_v3_key: Secret::new("payrailTestOnlyApiV3Key000000001".into()),
            platform_public_key: PUB.into(),
            platform_serial: "PUB_KEY_ID_1".into(),
            notify_url: "https://payrail.example/n".into(),
            timeout_ms: 1_000,
        };
        let ali = alipay::AlipayConfig {
            gateway_url: "https://openapi.alipay.com/gateway.do".into(),
            app_id: "2021".into(),
            app_private_key: Secret::new(KEY.into()),
            alipay_public_key: PUB.into(),
            seller_id: None,
            notify_url: "https://payrail.example/n".into(),
            return_url: None,
            timeout_ms: 1_000,
        };
        let up = unionpay::UnionPayConfig {
            base_url: "https://gateway.95516.com".into(),
            mer_id: "777290058110048".into(),
            cert_id: "1".into(),
            signing_key: Secret::new(KEY.into()),
            unionpay_public_key: PUB.into(),
            back_url: "https://payrail.example/n".into(),
            front_url: None,
            timeout_ms: 1_000,
        };
        let shown = format!("{wx:?} {ali:?} {up:?}");
        let key_body = KEY.lines().nth(1).unwrap();
        assert!(!shown.contains(key_body), "private key leaked");
        assert!(
            !shown.contains("payrailTestOnlyApiV3Key"),
            "APIv3 key leaked"
        );
        for c in [
            ChannelConfig::WechatPay(wx),
            ChannelConfig::Alipay(ali),
            ChannelConfig::UnionPay(up),
        ] {
            let conn = connector_from_config(c).unwrap();
            assert!(conn.capabilities().refund);
        }
        // A wrong key is refused with the field's name, never its content.
        let mut bad = alipay::AlipayConfig {
            gateway_url: "x".into(),
            app_id: "x".into(),
            app_private_key: Secret::new("not a key".into()),
            alipay_public_key: PUB.into(),
            seller_id: None,
            notify_url: "x".into(),
            return_url: None,
            timeout_ms: 1,
        };
        let err = connector_from_config(ChannelConfig::Alipay(bad.clone()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("alipay.app_private_key"));
        assert!(!err.to_string().contains("not a key"));
        bad.app_private_key = Secret::new(KEY.into());
        bad.alipay_public_key = "garbage".into();
        assert!(connector_from_config(ChannelConfig::Alipay(bad)).is_err());
    }

    #[test]
    fn registry_routes_by_capabilities() {
        let mut r = Registry::new();
        r.register(Arc::new(sandbox::Sandbox::new(Arc::new(
            payrail_domain::ManualClock::new(0),
        ))));
        let wx = wechatpay::WechatPay::new(wechatpay::WechatPayConfig {
            base_url: "http://127.0.0.1:9".into(),
            mchid: "1".into(),
            appid: "wx".into(),
            merchant_serial_no: "S".into(),
            merchant_private_key: Secret::new(KEY.into()),
            api_v3_key: Secret::new("payrailTestOnlyApiV3Key000000001".into()),
            platform_public_key: PUB.into(),
            platform_serial: "P".into(),
            notify_url: "http://127.0.0.1:9/n".into(),
            timeout_ms: 1_000,
        })
        .unwrap();
        r.register(Arc::new(wx));
        assert_eq!(
            r.route(PaymentMethod::WechatCode).map(|c| c.name()),
            Some("wechatpay")
        );
        assert_eq!(
            r.route(PaymentMethod::Sandbox).map(|c| c.name()),
            Some("sandbox")
        );
        assert!(r.route(PaymentMethod::AlipayQr).is_none());
        let caps = r.get("wechatpay").unwrap().capabilities();
        let code = caps.method(PaymentMethod::WechatCode).unwrap();
        assert!(
            !code.close && code.cancel,
            "payment-code orders are reversed, not closed"
        );
    }
}
