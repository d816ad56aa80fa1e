//! WeChat Pay API v3 (direct merchant): Native, H5, JSAPI and payment-code orders, query,
//! close, reverse, refund, refund query, signed and encrypted notifications, trade bills.
//!
//! Every request is signed `WECHATPAY2-SHA256-RSA2048` with the merchant key; every answer
//! (error answers too) must carry a valid platform signature, or it is treated as no answer
//! (unknown). See docs/channels.md for the configuration and the status mapping.
//!
//! An order whose creation never reached WeChat (the submit timed out or failed in transit)
//! answers `ORDER_NOT_EXIST` to the query and to the close for ever, and so would an order
//! WeChat lost track of: "not found" is never a close by itself. The trade bill is definite:
//! every paid order is in the bill of its payment day. So `close` reports `closed` for an
//! order WeChat does not know only once the bills of its submission day (Beijing) through the
//! day after its expiry are out and none lists it (`crate::bills`, shared with UnionPay); a
//! bill that lists it is a contradiction left to a person.

mod bill;
pub mod crypto;
pub mod transformers;

use crate::bills::PaidOrders;
use crate::common::{self, ConfigError, RsaSigner, RsaVerifier};
use crate::*;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use payrail_domain::civil::CHINA_OFFSET_MINUTES;
use payrail_domain::Currency;
use transformers as t;

/// One WeChat Pay merchant account.
#[derive(Debug, Clone)]
pub struct WechatPayConfig {
    /// `https://api.mch.weixin.qq.com`, or an emulator's base URL.
    pub base_url: String,
    pub mchid: String,
    pub appid: String,
    /// Serial number of the merchant API certificate the private key belongs to.
    pub merchant_serial_no: String,
    /// The merchant API private key (`apiclient_key.pem`, PKCS#8 PEM).
    pub merchant_private_key: Secret<String>,
    /// The 32-byte APIv3 key that encrypts notification resources.
    pub api_v3_key: Secret<String>,
    /// The WeChat Pay public key (微信支付公钥, SPKI PEM) that signs answers and notifications.
    pub platform_public_key: String,
    /// Its id as sent in `Wechatpay-Serial` (`PUB_KEY_ID_…`, or a platform certificate serial).
    pub platform_serial: String,
    /// Our notification endpoint for this account (used when a request names none).
    pub notify_url: String,
    /// Bound of each HTTP call, connect included.
    pub timeout_ms: u64,
}

pub struct WechatPay {
    cfg: WechatPayConfig,
    signer: RsaSigner,
    verifier: RsaVerifier,
    api_v3_key: Secret<Vec<u8>>,
    http: reqwest::Client,
    /// The order numbers in each trade bill read so far (a published bill never changes), so
    /// many lost orders of one day fetch it once.
    billed: PaidOrders,
}

/// WeChat builds day D's trade bill at 09:00 on D+1 and serves it from about 10:00 (Beijing).
pub const BILL_OUT_AFTER_DAY_END_MS: i64 = 10 * 3600 * 1000;
/// How long after expiry the close of an order WeChat does not know may stay unconfirmed: the
/// bill of the day after the expiry day comes out at 10:00 the day after that, at worst 2 days
/// 10 h after an expiry just past midnight; 2 h more for a bill that is late.
pub const CLOSE_CONFIRM_DELAY_MS: i64 =
    2 * 24 * 3600 * 1000 + BILL_OUT_AFTER_DAY_END_MS + 2 * 3600 * 1000;

/// How far a notification's signed timestamp may be from our clock.
pub const NOTIFY_WINDOW_MS: i64 = 5 * 60 * 1000;

struct Answer {
    status: u16,
    body: Vec<u8>,
}

impl WechatPay {
    pub fn new(cfg: WechatPayConfig) -> Result<WechatPay, ConfigError> {
        let signer =
            RsaSigner::from_secret("wechatpay.merchant_private_key", &cfg.merchant_private_key)?;
        let verifier =
            RsaVerifier::parse("wechatpay.platform_public_key", &cfg.platform_public_key)?;
        let key = cfg.api_v3_key.expose().as_bytes().to_vec();
        if key.len() != 32 {
            return Err(ConfigError("wechatpay.api_v3_key must be 32 bytes".into()));
        }
        for (what, v) in [
            ("base_url", &cfg.base_url),
            ("mchid", &cfg.mchid),
            ("appid", &cfg.appid),
            ("merchant_serial_no", &cfg.merchant_serial_no),
            ("platform_serial", &cfg.platform_serial),
        ] {
            if v.trim().is_empty() {
                return Err(ConfigError(format!("wechatpay.{what} is empty")));
            }
        }
        let http = common::http_client(cfg.timeout_ms)?;
        Ok(WechatPay {
            cfg,
            signer,
            verifier,
            api_v3_key: Secret::new(key),
            http,
            billed: PaidOrders::new("wechatpay", "trade bill"),
        })
    }

    fn url(&self, path_and_query: &str) -> String {
        format!(
            "{}{}",
            self.cfg.base_url.trim_end_matches('/'),
            path_and_query
        )
    }

    /// One signed call. `Err` = no usable answer (transport error, timeout, bad signature).
    async fn call(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<String>,
        verify_answer: bool,
    ) -> Result<Answer, String> {
        let now_s = common_now_s();
        let nonce = common::nonce(32);
        let body_text = body.clone().unwrap_or_default();
        let auth = crypto::authorization(
            &self.signer,
            &self.cfg.mchid,
            &self.cfg.merchant_serial_no,
            method.as_str(),
            path_and_query,
            now_s,
            &nonce,
            &body_text,
        );
        let mut rb = self
            .http
            .request(method, self.url(path_and_query))
            .header("Authorization", auth)
            .header("Accept", "application/json")
            .header("User-Agent", "payrail");
        if let Some(b) = body {
            rb = rb.header("Content-Type", "application/json").body(b);
        }
        let resp = rb.send().await.map_err(|e| common::transport_reason(&e))?;
        let status = resp.status().as_u16();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let (ts, nonce, sig, serial) = (
            header("Wechatpay-Timestamp"),
            header("Wechatpay-Nonce"),
            header("Wechatpay-Signature"),
            header("Wechatpay-Serial"),
        );
        let body = common::read_body(resp).await?;
        if verify_answer {
            let v = crypto::verify(
                &self.verifier,
                &self.cfg.platform_serial,
                &crypto::SignedHeaders {
                    timestamp: ts.as_deref(),
                    nonce: nonce.as_deref(),
                    signature: sig.as_deref(),
                    serial: serial.as_deref(),
                },
                &body,
            );
            if v != crypto::Verified::Ok {
                // A 5xx from a proxy carries no signature either; both are "no answer".
                return Err(format!("HTTP {status} answer not verified ({v:?})"));
            }
        }
        Ok(Answer { status, body })
    }

    fn error_of(a: &Answer) -> (String, String) {
        serde_json::from_slice::<t::ErrorBody>(&a.body)
            .map(|e| (e.code, e.message))
            .unwrap_or_default()
    }

    fn order_path(method: PaymentMethod) -> Option<&'static str> {
        Some(match method {
            PaymentMethod::WechatNative => "/v3/pay/transactions/native",
            PaymentMethod::WechatH5 => "/v3/pay/transactions/h5",
            PaymentMethod::WechatJsapi => "/v3/pay/transactions/jsapi",
            PaymentMethod::WechatCode => "/v3/pay/transactions/codepay",
            _ => return None,
        })
    }

    fn refused(code: &str, message: &str) -> SubmitResponse {
        SubmitResponse {
            outcome: ChannelOutcome::Failed {
                code: code.into(),
                message: message.into(),
            },
            next_action: None,
        }
    }

    fn jsapi_params(&self, prepay_id: &str) -> Vec<(String, String)> {
        let ts = common_now_s().to_string();
        let nonce = common::nonce(32);
        let package = format!("prepay_id={prepay_id}");
        let message = format!("{}\n{ts}\n{nonce}\n{package}\n", self.cfg.appid);
        let pay_sign = self.signer.sign_b64(message.as_bytes());
        vec![
            ("appId".into(), self.cfg.appid.clone()),
            ("timeStamp".into(), ts),
            ("nonceStr".into(), nonce),
            ("package".into(), package),
            ("signType".into(), "RSA".into()),
            ("paySign".into(), pay_sign),
        ]
    }

    fn transaction_outcome(&self, tx: &t::Transaction, expect: &AttemptId) -> ChannelOutcome {
        if tx.out_trade_no != expect.to_string()
            || tx.mchid.as_deref().is_some_and(|m| m != self.cfg.mchid)
        {
            return ChannelOutcome::unknown("wechatpay: answer names another order or merchant");
        }
        let paid_at = tx.success_time.as_deref().and_then(common::beijing_ms);
        t::map_trade_state(tx, paid_at)
    }

    /// The order's status by query, and whether the answer was a signed "no such order".
    async fn lookup(&self, req: &QueryRequest) -> (ChannelOutcome, bool) {
        let path = format!(
            "/v3/pay/transactions/out-trade-no/{}?mchid={}",
            req.attempt_id, self.cfg.mchid
        );
        match self.call(reqwest::Method::GET, &path, None, true).await {
            Err(reason) => (
                ChannelOutcome::unknown(format!("wechatpay: {reason}")),
                false,
            ),
            Ok(a) if a.status == 200 => match serde_json::from_slice::<t::Transaction>(&a.body) {
                Ok(tx) => (self.transaction_outcome(&tx, &req.attempt_id), false),
                Err(e) => (
                    ChannelOutcome::unknown(format!("wechatpay: malformed answer: {e}")),
                    false,
                ),
            },
            Ok(a) => {
                let (code, _) = Self::error_of(&a);
                (
                    t::map_query_error(a.status, &code),
                    t::is_order_not_exist(a.status, &code),
                )
            }
        }
    }

    async fn query_refund_by_no(&self, out_refund_no: &str) -> RefundOutcome {
        let path = format!("/v3/refund/domestic/refunds/{out_refund_no}");
        match self.call(reqwest::Method::GET, &path, None, true).await {
            Err(reason) => RefundOutcome::unknown(format!("wechatpay: {reason}")),
            Ok(a) if a.status == 200 => self.refund_answer(&a, out_refund_no),
            Ok(a) => {
                // Not found, or the query itself failed: says nothing about the refund.
                let (code, _) = Self::error_of(&a);
                RefundOutcome::unknown(format!("wechatpay: HTTP {} {code}", a.status))
            }
        }
    }

    fn refund_answer(&self, a: &Answer, out_refund_no: &str) -> RefundOutcome {
        match serde_json::from_slice::<t::RefundResponse>(&a.body) {
            Ok(r) if r.out_refund_no == out_refund_no => {
                let at = r.success_time.as_deref().and_then(common::beijing_ms);
                t::map_refund_status(&r, at)
            }
            Ok(_) => RefundOutcome::unknown("wechatpay: answer names another refund"),
            Err(e) => RefundOutcome::unknown(format!("wechatpay: malformed refund answer: {e}")),
        }
    }
}

fn common_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(0))
        .unwrap_or(0)
}

fn cny(amount: Money) -> bool {
    amount.currency() == Currency::CNY
}

#[async_trait]
impl Connector for WechatPay {
    fn name(&self) -> &'static str {
        "wechatpay"
    }

    fn capabilities(&self) -> Capabilities {
        let m = |method, close, cancel, notifies| MethodCapability {
            method,
            close,
            cancel,
            notifies,
        };
        Capabilities {
            methods: vec![
                m(PaymentMethod::WechatNative, true, false, true),
                m(PaymentMethod::WechatH5, true, false, true),
                m(PaymentMethod::WechatJsapi, true, false, true),
                // Payment-code orders cannot be closed: reverse them.
                m(PaymentMethod::WechatCode, false, true, false),
            ],
            refund: true,
            partial_refund: true,
            refund_window_days: 365,
            max_refunds_per_payment: Some(50),
            cancel_window_ms: Some(7 * 24 * 3600 * 1000),
            refund_query_delay_ms: 0,
            bills: true,
            // A close of an order WeChat does not know waits for the trade bills (`close`).
            close_confirm_delay_ms: CLOSE_CONFIRM_DELAY_MS,
        }
    }

    async fn submit(&self, req: &SubmitRequest) -> SubmitResponse {
        let Some(path) = Self::order_path(req.method) else {
            return Self::refused(
                "method_not_supported",
                "wechatpay does not offer this method",
            );
        };
        if !cny(req.amount) {
            return Self::refused("currency_not_supported", "wechatpay takes CNY only");
        }
        let code = req.method == PaymentMethod::WechatCode;
        let payer = match req.method {
            PaymentMethod::WechatCode => match &req.auth_code {
                Some(c) => Some(t::Payer {
                    openid: None,
                    auth_code: Some(c.expose().clone()),
                }),
                None => return Self::refused("auth_code_missing", "a payment code is required"),
            },
            PaymentMethod::WechatJsapi => match &req.payer_id {
                Some(openid) => Some(t::Payer {
                    openid: Some(openid.clone()),
                    auth_code: None,
                }),
                None => return Self::refused("payer_id_missing", "JSAPI needs the payer's openid"),
            },
            _ => None,
        };
        let scene_info = match req.method {
            PaymentMethod::WechatH5 => match req.client_ip {
                Some(ip) => Some(t::SceneInfo {
                    payer_client_ip: Some(ip.to_string()),
                    h5_info: Some(t::H5Info { kind: "Wap".into() }),
                }),
                None => return Self::refused("client_ip_missing", "H5 needs the payer's IP"),
            },
            PaymentMethod::WechatCode => req.client_ip.map(|ip| t::SceneInfo {
                payer_client_ip: Some(ip.to_string()),
                h5_info: None,
            }),
            _ => None,
        };
        let body = t::OrderBody {
            appid: self.cfg.appid.clone(),
            mchid: self.cfg.mchid.clone(),
            description: req.subject.chars().take(127).collect(),
            out_trade_no: req.attempt_id.to_string(),
            time_expire: (!code)
                .then(|| {
                    common::beijing(req.expires_at_ms).map(|d| d.to_rfc3339(CHINA_OFFSET_MINUTES))
                })
                .flatten(),
            notify_url: (!code).then(|| {
                req.notify_url
                    .clone()
                    .unwrap_or_else(|| self.cfg.notify_url.clone())
            }),
            amount: t::Amount {
                total: req.amount.amount_minor(),
                currency: "CNY".into(),
            },
            payer,
            scene_info,
        };
        let Ok(json) = serde_json::to_string(&body) else {
            return Self::refused("encode_error", "cannot encode the order");
        };
        let answer = match self
            .call(reqwest::Method::POST, path, Some(json), true)
            .await
        {
            Ok(a) => a,
            Err(reason) => {
                return SubmitResponse {
                    outcome: ChannelOutcome::unknown(format!("wechatpay: {reason}")),
                    next_action: None,
                }
            }
        };
        if answer.status != 200 {
            let (code, message) = Self::error_of(&answer);
            return SubmitResponse {
                outcome: t::map_submit_error(answer.status, &code, &message),
                next_action: None,
            };
        }
        if code {
            let outcome = match serde_json::from_slice::<t::Transaction>(&answer.body) {
                Ok(tx) => self.transaction_outcome(&tx, &req.attempt_id),
                Err(e) => ChannelOutcome::unknown(format!("wechatpay: malformed answer: {e}")),
            };
            return SubmitResponse {
                outcome,
                next_action: None,
            };
        }
        let Ok(p) = serde_json::from_slice::<t::PrepayResponse>(&answer.body) else {
            return SubmitResponse {
                outcome: ChannelOutcome::unknown("wechatpay: malformed prepay answer"),
                next_action: None,
            };
        };
        let next_action = match req.method {
            PaymentMethod::WechatNative => p
                .code_url
                .map(|code_url| NextAction::DisplayQrCode { code_url }),
            PaymentMethod::WechatH5 => p.h5_url.map(|url| NextAction::Redirect { url }),
            _ => p.prepay_id.map(|id| NextAction::InvokeWallet {
                params: self.jsapi_params(&id),
            }),
        };
        let outcome = if next_action.is_some() {
            ChannelOutcome::Processing {
                channel_trade_no: None,
            }
        } else {
            ChannelOutcome::unknown("wechatpay: prepay answer without its payload")
        };
        SubmitResponse {
            outcome,
            next_action,
        }
    }

    async fn query(&self, req: &QueryRequest) -> ChannelOutcome {
        self.lookup(req).await.0
    }

    /// Closes the order; a refused close is followed by a query and only a definite answer is
    /// passed on. When both say WeChat has no such order, the trade bills decide (module
    /// comment): `closed` once every bill that could list a payment is out and none does.
    async fn close(&self, req: &QueryRequest) -> ChannelOutcome {
        let path = format!("/v3/pay/transactions/out-trade-no/{}/close", req.attempt_id);
        let body = serde_json::json!({ "mchid": self.cfg.mchid }).to_string();
        let close_not_found = match self
            .call(reqwest::Method::POST, &path, Some(body), true)
            .await
        {
            Ok(a) if a.status == 204 || a.status == 200 => return ChannelOutcome::Closed,
            Ok(a) => t::is_order_not_exist(a.status, &Self::error_of(&a).0),
            Err(_) => false,
        };
        // Refused (ORDERPAID, ORDER_NOT_EXIST, …) or no answer: the order's status is what a
        // query says.
        let (outcome, query_not_found) = self.lookup(req).await;
        if outcome.is_definite() {
            return outcome;
        }
        if close_not_found && query_not_found {
            return self
                .billed
                .confirm_never_paid(
                    &req.attempt_id.to_string(),
                    req.submitted_at_ms,
                    req.expires_at_ms,
                    |d| self.download_bill(d),
                )
                .await;
        }
        ChannelOutcome::unknown(format!(
            "wechatpay: close not confirmed ({})",
            match &outcome {
                ChannelOutcome::Unknown { reason } => reason.as_str(),
                other => other.label(),
            }
        ))
    }

    async fn cancel(&self, req: &QueryRequest) -> CancelOutcome {
        let path = format!(
            "/v3/pay/transactions/out-trade-no/{}/reverse",
            req.attempt_id
        );
        let body =
            serde_json::json!({ "mchid": self.cfg.mchid, "appid": self.cfg.appid }).to_string();
        match self
            .call(reqwest::Method::POST, &path, Some(body), true)
            .await
        {
            Err(reason) => CancelOutcome::Unknown {
                reason: format!("wechatpay: {reason}"),
            },
            Ok(a) => {
                let v = serde_json::from_slice::<serde_json::Value>(&a.body)
                    .unwrap_or(serde_json::Value::Null);
                t::map_reverse(a.status, &v)
            }
        }
    }

    async fn refund(&self, req: &RefundRequest) -> RefundOutcome {
        if !cny(req.refund_amount) || req.refund_amount.currency() != req.payment_amount.currency()
        {
            return RefundOutcome::Failed {
                code: "currency_not_supported".into(),
                message: "wechatpay refunds CNY only".into(),
            };
        }
        let out_refund_no = req.refund_id.to_string();
        let body = t::RefundBody {
            out_trade_no: req.attempt_id.to_string(),
            out_refund_no: out_refund_no.clone(),
            reason: req.reason.clone(),
            notify_url: Some(
                req.notify_url
                    .clone()
                    .unwrap_or_else(|| self.cfg.notify_url.clone()),
            ),
            amount: t::RefundAmount {
                refund: req.refund_amount.amount_minor(),
                total: req.payment_amount.amount_minor(),
                currency: "CNY".into(),
            },
        };
        let Ok(json) = serde_json::to_string(&body) else {
            return RefundOutcome::Failed {
                code: "encode_error".into(),
                message: "cannot encode the refund".into(),
            };
        };
        match self
            .call(
                reqwest::Method::POST,
                "/v3/refund/domestic/refunds",
                Some(json),
                true,
            )
            .await
        {
            Err(reason) => RefundOutcome::unknown(format!("wechatpay: {reason}")),
            Ok(a) if a.status == 200 => self.refund_answer(&a, &out_refund_no),
            Ok(a) => {
                let (code, message) = Self::error_of(&a);
                t::map_refund_error(a.status, &code, &message)
            }
        }
    }

    async fn query_refund(&self, req: &RefundRequest) -> RefundOutcome {
        self.query_refund_by_no(&req.refund_id.to_string()).await
    }

    fn parse_notification(
        &self,
        n: &InboundNotification,
    ) -> Result<ChannelNotification, NotificationError> {
        let h = |name: &str| n.headers.get(name).and_then(|v| v.to_str().ok());
        let signed = crypto::SignedHeaders {
            timestamp: h("Wechatpay-Timestamp"),
            nonce: h("Wechatpay-Nonce"),
            signature: h("Wechatpay-Signature"),
            serial: h("Wechatpay-Serial"),
        };
        match crypto::verify(&self.verifier, &self.cfg.platform_serial, &signed, &n.body) {
            crypto::Verified::Ok => {}
            crypto::Verified::Probe => return Err(NotificationError::Probe),
            _ => return Err(NotificationError::BadSignature),
        }
        let ts_s: i64 = signed
            .timestamp
            .and_then(|t| t.parse().ok())
            .ok_or(NotificationError::BadSignature)?;
        let skew_ms = ts_s.saturating_mul(1000).saturating_sub(n.now_ms);
        if skew_ms.saturating_abs() > NOTIFY_WINDOW_MS {
            return Err(NotificationError::StaleTimestamp);
        }
        let env: t::NotifyEnvelope = serde_json::from_slice(&n.body)
            .map_err(|e| NotificationError::Malformed(format!("envelope: {e}")))?;
        if env.resource.algorithm != "AEAD_AES_256_GCM" {
            return Err(NotificationError::Malformed(format!(
                "algorithm {}",
                env.resource.algorithm
            )));
        }
        let ct = B64
            .decode(&env.resource.ciphertext)
            .map_err(|_| NotificationError::Decrypt)?;
        let plain = common::aes_256_gcm_decrypt(
            self.api_v3_key.expose(),
            env.resource.nonce.as_bytes(),
            env.resource.associated_data.as_bytes(),
            &ct,
        )
        .ok_or(NotificationError::Decrypt)?;
        let malformed = |what: &str| NotificationError::Malformed(what.into());
        if env.event_type.starts_with("TRANSACTION.") {
            let tx: t::Transaction = serde_json::from_slice(&plain)
                .map_err(|e| NotificationError::Malformed(format!("transaction: {e}")))?;
            let attempt_id = common::parse_attempt(&tx.out_trade_no)
                .ok_or_else(|| malformed("out_trade_no is not ours"))?;
            let amount = tx_amount(
                tx.amount.as_ref().and_then(|a| a.total),
                tx.amount.as_ref().and_then(|a| a.currency.as_deref()),
            )?;
            let paid_at = tx.success_time.as_deref().and_then(common::beijing_ms);
            Ok(ChannelNotification {
                notification_id: env.id,
                attempt_id,
                channel_trade_no: tx.transaction_id.clone(),
                amount,
                channel_merchant_id: tx.mchid.clone().unwrap_or_default(),
                channel_app_id: tx.appid.clone(),
                event: NotificationEvent::Payment {
                    outcome: t::map_trade_state(&tx, paid_at),
                },
            })
        } else if env.event_type.starts_with("REFUND.") {
            let r: t::RefundResponse = serde_json::from_slice(&plain)
                .map_err(|e| NotificationError::Malformed(format!("refund: {e}")))?;
            let attempt_id = r
                .out_trade_no
                .as_deref()
                .and_then(common::parse_attempt)
                .ok_or_else(|| malformed("out_trade_no is not ours"))?;
            let amount = r.amount.as_ref();
            let currency = amount.and_then(|a| a.currency.as_deref());
            let total = tx_amount(amount.and_then(|a| a.total), currency)?;
            // A refund notification without its refund amount cannot be cross-checked: refuse
            // it as malformed (the refund query still tells us the outcome).
            let refund_amount = Some(
                tx_amount(amount.and_then(|a| a.refund), currency)
                    .map_err(|_| malformed("refund notification without amount.refund"))?,
            );
            let at = r.success_time.as_deref().and_then(common::beijing_ms);
            Ok(ChannelNotification {
                notification_id: env.id,
                attempt_id,
                channel_trade_no: r.transaction_id.clone(),
                amount: total,
                channel_merchant_id: r.mchid.clone().unwrap_or_default(),
                channel_app_id: None,
                event: NotificationEvent::Refund {
                    refund_id: common::parse_refund(&r.out_refund_no),
                    refund_amount,
                    refunded_total: None,
                    outcome: t::map_refund_status(&r, at),
                },
            })
        } else {
            Err(NotificationError::Malformed(format!(
                "event_type {}",
                env.event_type
            )))
        }
    }

    fn notification_reply(&self, accepted: bool) -> NotificationReply {
        if accepted {
            // v3: 200 or 204 with no body.
            NotificationReply {
                status: 204,
                content_type: None,
                body: Vec::new(),
            }
        } else {
            NotificationReply {
                status: 500,
                content_type: Some("application/json"),
                body: br#"{"code":"FAIL","message":"not accepted"}"#.to_vec(),
            }
        }
    }

    async fn download_bill(&self, date: Date) -> Result<Bill, BillError> {
        let path = format!("/v3/bill/tradebill?bill_date={date}&bill_type=ALL");
        let a = self
            .call(reqwest::Method::GET, &path, None, true)
            .await
            .map_err(BillError::Transport)?;
        if a.status != 200 {
            let (code, message) = Self::error_of(&a);
            if code == "NO_STATEMENT_EXIST" || code == "STATEMENT_CREATING" {
                return Err(BillError::NotReady);
            }
            return Err(BillError::Channel { code, message });
        }
        let meta: t::BillResponse = serde_json::from_slice(&a.body)
            .map_err(|e| BillError::Corrupt(format!("answer: {e}")))?;
        // The download URL is on the API host; the request is signed like any other, the file
        // itself is not signed but its SHA-1 was, in the answer above.
        let base = self.cfg.base_url.trim_end_matches('/');
        let path_and_query = meta
            .download_url
            .strip_prefix(base)
            .ok_or_else(|| BillError::Corrupt("download_url is not on the API host".into()))?;
        let file = self
            .call(reqwest::Method::GET, path_and_query, None, false)
            .await
            .map_err(BillError::Transport)?;
        if file.status != 200 {
            return Err(BillError::Transport(format!(
                "file download: HTTP {}",
                file.status
            )));
        }
        // The signed answer's hash is the only thing that binds the unsigned file: without a
        // SHA-1 to check (missing, or another algorithm) the file is not trusted.
        match (meta.hash_type.as_deref(), meta.hash_value.as_deref()) {
            (Some(kind), Some(want)) if kind.eq_ignore_ascii_case("SHA1") => {
                use sha1::Digest;
                let got = hex::encode(sha1::Sha1::digest(&file.body));
                if !got.eq_ignore_ascii_case(want) {
                    return Err(BillError::Corrupt(
                        "SHA-1 of the file does not match".into(),
                    ));
                }
            }
            (kind, _) => {
                return Err(BillError::Corrupt(format!(
                    "the bill answer gives no SHA-1 to check the file against (hash_type {})",
                    kind.unwrap_or("missing")
                )))
            }
        }
        bill::parse(date, &file.body)
    }
}

fn tx_amount(total: Option<i64>, currency: Option<&str>) -> Result<Money, NotificationError> {
    let total = total.ok_or_else(|| NotificationError::Malformed("amount.total missing".into()))?;
    let currency = Currency::parse(currency.unwrap_or("CNY"))
        .map_err(|_| NotificationError::Malformed("amount.currency".into()))?;
    Ok(Money::new(total, currency))
}
