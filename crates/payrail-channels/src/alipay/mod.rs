//! Alipay OpenAPI (`gateway.do`, RSA2 public-key mode): precreate (QR), barcode pay, WAP pay,
//! query, close, cancel, refund with `out_request_no`, refund query, asynchronous notifications
//! (answered with the literal `success`) and the trade bill.
//!
//! Every answer must carry a valid Alipay signature over the raw `*_response` text, or it is
//! treated as no answer (unknown). See docs/channels.md.

mod bill;
pub mod transformers;

use crate::common::{self, ConfigError, RsaSigner, RsaVerifier};
use crate::*;
use payrail_domain::Currency;
use serde_json::value::RawValue;
use transformers as t;

/// One Alipay application (direct merchant, public-key mode).
#[derive(Debug, Clone)]
pub struct AlipayConfig {
    /// `https://openapi.alipay.com/gateway.do`, or an emulator's `…/gateway.do`.
    pub gateway_url: String,
    pub app_id: String,
    /// The application private key (PKCS#8/PKCS#1 PEM, or the bare base64 the key tool prints).
    pub app_private_key: Secret<String>,
    /// The Alipay public key of this application (SPKI PEM or bare base64).
    pub alipay_public_key: String,
    /// The merchant's Alipay user id (`seller_id`, 2088…), if known: reported in notifications.
    pub seller_id: Option<String>,
    /// Our notification endpoint for this account (used when a request names none).
    pub notify_url: String,
    /// Where WAP payers return to by default.
    pub return_url: Option<String>,
    /// Bound of each HTTP call, connect included.
    pub timeout_ms: u64,
}

pub struct Alipay {
    cfg: AlipayConfig,
    signer: RsaSigner,
    verifier: RsaVerifier,
    http: reqwest::Client,
}

impl Alipay {
    pub fn new(cfg: AlipayConfig) -> Result<Alipay, ConfigError> {
        let signer = RsaSigner::from_secret("alipay.app_private_key", &cfg.app_private_key)?;
        let verifier = RsaVerifier::parse("alipay.alipay_public_key", &cfg.alipay_public_key)?;
        if cfg.app_id.trim().is_empty() || cfg.gateway_url.trim().is_empty() {
            return Err(ConfigError(
                "alipay.app_id and alipay.gateway_url are required".into(),
            ));
        }
        let http = common::http_client(cfg.timeout_ms)?;
        Ok(Alipay {
            cfg,
            signer,
            verifier,
            http,
        })
    }

    /// The signed common parameters of one call.
    fn params(
        &self,
        method: &str,
        biz: &impl serde::Serialize,
        extra: &[(&str, String)],
    ) -> BTreeMap<String, String> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0);
        let mut p = BTreeMap::new();
        p.insert("app_id".to_string(), self.cfg.app_id.clone());
        p.insert("method".to_string(), method.to_string());
        p.insert("format".to_string(), "JSON".to_string());
        p.insert("charset".to_string(), "utf-8".to_string());
        p.insert("sign_type".to_string(), "RSA2".to_string());
        p.insert(
            "timestamp".to_string(),
            common::beijing(now_ms)
                .map(|d| d.to_spaced())
                .unwrap_or_default(),
        );
        p.insert("version".to_string(), "1.0".to_string());
        p.insert(
            "biz_content".to_string(),
            serde_json::to_string(biz).unwrap_or_default(),
        );
        for (k, v) in extra {
            p.insert((*k).to_string(), v.clone());
        }
        let sign = self.signer.sign_b64(t::request_sign_content(&p).as_bytes());
        p.insert("sign".to_string(), sign);
        p
    }

    /// One call. `Err` = no usable answer (transport error, 5xx, unsigned or badly signed).
    async fn call(
        &self,
        method: &str,
        biz: &impl serde::Serialize,
        extra: &[(&str, String)],
    ) -> Result<t::Resp, String> {
        let params = self.params(method, biz, extra);
        let resp = self
            .http
            .post(&self.cfg.gateway_url)
            .header(
                "Content-Type",
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .body(serde_urlencoded::to_string(&params).map_err(|e| e.to_string())?)
            .send()
            .await
            .map_err(|e| common::transport_reason(&e))?;
        let status = resp.status().as_u16();
        let body = common::read_body(resp).await?;
        if status != 200 {
            return Err(format!("HTTP {status}"));
        }
        let text = std::str::from_utf8(&body).map_err(|_| "answer not UTF-8".to_string())?;
        let envelope: BTreeMap<String, Box<RawValue>> =
            serde_json::from_str(text).map_err(|e| format!("malformed answer: {e}"))?;
        let key = format!("{}_response", method.replace('.', "_"));
        let raw = envelope
            .get(&key)
            .or_else(|| envelope.get("error_response"))
            .ok_or_else(|| format!("answer without {key}"))?;
        let sign = envelope
            .get("sign")
            .and_then(|s| serde_json::from_str::<String>(s.get()).ok())
            .ok_or_else(|| "unsigned answer".to_string())?;
        // The signature covers the raw text of the *_response object exactly as sent.
        if !self.verifier.verify_b64(raw.get().as_bytes(), &sign) {
            return Err("answer signature does not verify".into());
        }
        serde_json::from_str(raw.get()).map_err(|e| format!("malformed {key}: {e}"))
    }

    fn yuan(m: Money) -> String {
        m.to_decimal_string()
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

    fn unknown(reason: String) -> SubmitResponse {
        SubmitResponse {
            outcome: ChannelOutcome::unknown(format!("alipay: {reason}")),
            next_action: None,
        }
    }

    fn same_order(r: &t::Resp, attempt: &AttemptId) -> bool {
        r.out_trade_no
            .as_deref()
            .is_none_or(|o| o == attempt.to_string())
    }

    async fn query_refund_inner(&self, req: &RefundRequest) -> RefundOutcome {
        let biz = t::RefundQueryBiz {
            out_trade_no: req.attempt_id.to_string(),
            out_request_no: req.refund_id.to_string(),
            query_options: vec!["gmt_refund_pay"],
        };
        match self
            .call("alipay.trade.fastpay.refund.query", &biz, &[])
            .await
        {
            Err(reason) => RefundOutcome::unknown(format!("alipay: {reason}")),
            Ok(r) => {
                if r.out_request_no
                    .as_deref()
                    .is_some_and(|o| o != req.refund_id.to_string())
                {
                    return RefundOutcome::unknown("alipay: answer names another refund");
                }
                let at = r.gmt_refund_pay.as_deref().and_then(common::beijing_ms);
                t::map_refund_query(&r, at)
            }
        }
    }

    async fn cancel_inner(&self, attempt: &AttemptId) -> CancelOutcome {
        let biz = t::TradeRef {
            out_trade_no: attempt.to_string(),
        };
        match self.call("alipay.trade.cancel", &biz, &[]).await {
            Err(reason) => CancelOutcome::Unknown {
                reason: format!("alipay: {reason}"),
            },
            Ok(r) => t::map_cancel(&r),
        }
    }
}

#[async_trait]
impl Connector for Alipay {
    fn name(&self) -> &'static str {
        "alipay"
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
                // Close works on WAIT_BUYER_PAY; before the scan there is no trade, and close
                // falls back to cancel (which voids the order number).
                m(PaymentMethod::AlipayQr, true, true, true),
                m(PaymentMethod::AlipayCode, true, true, false),
                m(PaymentMethod::AlipayWap, true, true, true),
            ],
            refund: true,
            partial_refund: true,
            refund_window_days: 365,
            max_refunds_per_payment: None,
            cancel_window_ms: Some(24 * 3600 * 1000),
            refund_query_delay_ms: 10_000,
            bills: true,
            close_confirm_delay_ms: 0,
        }
    }

    async fn submit(&self, req: &SubmitRequest) -> SubmitResponse {
        if req.amount.currency() != Currency::CNY {
            return Self::refused("currency_not_supported", "alipay takes CNY only");
        }
        let notify = req
            .notify_url
            .clone()
            .unwrap_or_else(|| self.cfg.notify_url.clone());
        let expire = common::beijing(req.expires_at_ms).map(|d| d.to_spaced());
        let mut biz = t::PayBiz {
            out_trade_no: req.attempt_id.to_string(),
            total_amount: Self::yuan(req.amount),
            subject: &req.subject,
            scene: None,
            auth_code: None,
            product_code: None,
            time_expire: expire,
        };
        match req.method {
            PaymentMethod::AlipayQr => {
                let r = match self
                    .call("alipay.trade.precreate", &biz, &[("notify_url", notify)])
                    .await
                {
                    Ok(r) => r,
                    Err(reason) => return Self::unknown(reason),
                };
                if !Self::same_order(&r, &req.attempt_id) {
                    return Self::unknown("answer names another order".into());
                }
                let outcome = t::map_create(&r, None, true);
                let next_action = match (&outcome, r.qr_code) {
                    (ChannelOutcome::Processing { .. }, Some(code_url)) => {
                        Some(NextAction::DisplayQrCode { code_url })
                    }
                    (ChannelOutcome::Processing { .. }, None) => {
                        return Self::unknown("precreate without qr_code".into())
                    }
                    _ => None,
                };
                SubmitResponse {
                    outcome,
                    next_action,
                }
            }
            PaymentMethod::AlipayCode => {
                let Some(code) = &req.auth_code else {
                    return Self::refused("auth_code_missing", "a payment code is required");
                };
                biz.scene = Some("bar_code");
                biz.auth_code = Some(code.expose().clone());
                let r = match self
                    .call("alipay.trade.pay", &biz, &[("notify_url", notify)])
                    .await
                {
                    Ok(r) => r,
                    Err(reason) => return Self::unknown(reason),
                };
                if !Self::same_order(&r, &req.attempt_id) {
                    return Self::unknown("answer names another order".into());
                }
                let paid_at = r.gmt_payment.as_deref().and_then(common::beijing_ms);
                SubmitResponse {
                    outcome: t::map_create(&r, paid_at, false),
                    next_action: None,
                }
            }
            PaymentMethod::AlipayWap => {
                // No server call: the payer's browser carries the signed request to the gateway,
                // and the trade is created there.
                biz.product_code = Some("QUICK_WAP_WAY");
                let mut extra = vec![("notify_url", notify)];
                if let Some(ret) = req
                    .return_url
                    .clone()
                    .or_else(|| self.cfg.return_url.clone())
                {
                    extra.push(("return_url", ret));
                }
                let params = self.params("alipay.trade.wap.pay", &biz, &extra);
                let query = serde_urlencoded::to_string(&params).unwrap_or_default();
                SubmitResponse {
                    outcome: ChannelOutcome::Processing {
                        channel_trade_no: None,
                    },
                    next_action: Some(NextAction::Redirect {
                        url: format!("{}?{query}", self.cfg.gateway_url),
                    }),
                }
            }
            _ => Self::refused("method_not_supported", "alipay does not offer this method"),
        }
    }

    async fn query(&self, req: &QueryRequest) -> ChannelOutcome {
        let biz = t::TradeRef {
            out_trade_no: req.attempt_id.to_string(),
        };
        match self.call("alipay.trade.query", &biz, &[]).await {
            Err(reason) => ChannelOutcome::unknown(format!("alipay: {reason}")),
            Ok(r) if !Self::same_order(&r, &req.attempt_id) => {
                ChannelOutcome::unknown("alipay: answer names another order")
            }
            Ok(r) => {
                let paid_at = r.send_pay_date.as_deref().and_then(common::beijing_ms);
                t::map_query(&r, paid_at)
            }
        }
    }

    async fn close(&self, req: &QueryRequest) -> ChannelOutcome {
        let biz = t::TradeRef {
            out_trade_no: req.attempt_id.to_string(),
        };
        match self.call("alipay.trade.close", &biz, &[]).await {
            Ok(r) if r.code == "10000" => ChannelOutcome::Closed,
            // No trade yet (a QR code never scanned): close cannot reach it, cancel voids the
            // order number so a late scan cannot pay it.
            Ok(r) if r.sub() == "ACQ.TRADE_NOT_EXIST" => {
                match self.cancel_inner(&req.attempt_id).await {
                    CancelOutcome::Cancelled {
                        refunded: Some(true),
                    } => ChannelOutcome::Cancelled,
                    CancelOutcome::Cancelled { .. } => ChannelOutcome::Closed,
                    other => ChannelOutcome::unknown(format!(
                        "alipay: close via cancel not confirmed: {other:?}"
                    )),
                }
            }
            // Refused (paid meanwhile: ACQ.TRADE_STATUS_ERROR) or no answer: a query decides.
            _ => match self.query(req).await {
                definite if definite.is_definite() => definite,
                other => ChannelOutcome::unknown(format!(
                    "alipay: close not confirmed ({})",
                    other.label()
                )),
            },
        }
    }

    async fn cancel(&self, req: &QueryRequest) -> CancelOutcome {
        self.cancel_inner(&req.attempt_id).await
    }

    async fn refund(&self, req: &RefundRequest) -> RefundOutcome {
        if req.refund_amount.currency() != Currency::CNY {
            return RefundOutcome::Failed {
                code: "currency_not_supported".into(),
                message: "alipay refunds CNY only".into(),
            };
        }
        let biz = t::RefundBiz {
            out_trade_no: req.attempt_id.to_string(),
            refund_amount: Self::yuan(req.refund_amount),
            out_request_no: req.refund_id.to_string(),
            refund_reason: req.reason.clone(),
        };
        match self.call("alipay.trade.refund", &biz, &[]).await {
            Err(reason) => RefundOutcome::unknown(format!("alipay: {reason}")),
            Ok(r) => {
                let at = r.gmt_refund_pay.as_deref().and_then(common::beijing_ms);
                match t::map_refund(&r, at) {
                    Some(outcome) => outcome,
                    None => self.query_refund_inner(req).await,
                }
            }
        }
    }

    async fn query_refund(&self, req: &RefundRequest) -> RefundOutcome {
        self.query_refund_inner(req).await
    }

    fn parse_notification(
        &self,
        n: &InboundNotification,
    ) -> Result<ChannelNotification, NotificationError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&n.body)
            .map_err(|e| NotificationError::Malformed(format!("form: {e}")))?;
        let params: BTreeMap<String, String> = pairs.into_iter().collect();
        let sign = params.get("sign").ok_or(NotificationError::BadSignature)?;
        if !self
            .verifier
            .verify_b64(t::notify_sign_content(&params).as_bytes(), sign)
        {
            return Err(NotificationError::BadSignature);
        }
        let get = |k: &str| params.get(k).map(String::as_str).filter(|v| !v.is_empty());
        let malformed = |what: &str| NotificationError::Malformed(what.into());
        let attempt_id = get("out_trade_no")
            .and_then(common::parse_attempt)
            .ok_or_else(|| malformed("out_trade_no is not ours"))?;
        let amount = get("total_amount")
            .and_then(|a| Money::parse_decimal(a, Currency::CNY).ok())
            .ok_or_else(|| malformed("total_amount"))?;
        let trade_no = get("trade_no").map(str::to_owned);
        let status = get("trade_status").unwrap_or("");
        let refund_fee =
            get("refund_fee").and_then(|a| Money::parse_decimal(a, Currency::CNY).ok());
        let event = match (refund_fee, get("out_biz_no")) {
            // A refund (partial: TRADE_SUCCESS again; full: TRADE_CLOSED) carries refund_fee,
            // the total refunded so far, and our refund request number in out_biz_no. It is not
            // a change of the payment's status.
            (Some(total), biz_no) if total.amount_minor() > 0 => NotificationEvent::Refund {
                refund_id: biz_no.and_then(common::parse_refund),
                refund_amount: None,
                refunded_total: Some(total),
                outcome: RefundOutcome::Succeeded {
                    channel_refund_no: None,
                    refunded_at_ms: get("gmt_refund").and_then(common::beijing_ms),
                },
            },
            _ => NotificationEvent::Payment {
                outcome: match status {
                    "TRADE_SUCCESS" | "TRADE_FINISHED" => ChannelOutcome::Succeeded {
                        channel_trade_no: trade_no.clone(),
                        paid_at_ms: get("gmt_payment").and_then(common::beijing_ms),
                    },
                    "WAIT_BUYER_PAY" => ChannelOutcome::Processing {
                        channel_trade_no: trade_no.clone(),
                    },
                    "TRADE_CLOSED" => ChannelOutcome::Closed,
                    other => ChannelOutcome::unknown(format!("alipay: trade_status {other}")),
                },
            },
        };
        Ok(ChannelNotification {
            notification_id: get("notify_id").map(str::to_owned),
            attempt_id,
            channel_trade_no: trade_no,
            amount,
            channel_merchant_id: get("app_id").unwrap_or("").to_string(),
            channel_app_id: get("seller_id").map(str::to_owned),
            event,
        })
    }

    fn notification_reply(&self, accepted: bool) -> NotificationReply {
        // Anything but the literal `success` makes Alipay send it again.
        NotificationReply {
            status: 200,
            content_type: Some("text/plain"),
            body: if accepted {
                b"success".to_vec()
            } else {
                b"failure".to_vec()
            },
        }
    }

    async fn download_bill(&self, date: Date) -> Result<Bill, BillError> {
        let biz = t::BillBiz {
            bill_type: "trade",
            bill_date: date.to_string(),
        };
        let r = self
            .call("alipay.data.dataservice.bill.downloadurl.query", &biz, &[])
            .await
            .map_err(BillError::Transport)?;
        if r.code != "10000" {
            if r.sub() == "isp.bill_not_exist" {
                return Err(BillError::NotReady);
            }
            return Err(BillError::Channel {
                code: format!("{} {}", r.code, r.sub()),
                message: r.sub_msg.unwrap_or(r.msg),
            });
        }
        let url = r
            .bill_download_url
            .ok_or_else(|| BillError::Corrupt("no bill_download_url".into()))?;
        // The URL is pre-signed by Alipay and lives 30 s: fetch it at once, unsigned.
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| BillError::Transport(common::transport_reason(&e)))?;
        if !resp.status().is_success() {
            return Err(BillError::Transport(format!(
                "HTTP {}",
                resp.status().as_u16()
            )));
        }
        let zip = common::read_body(resp)
            .await
            .map_err(BillError::Transport)?;
        bill::parse_zip(date, &zip)
    }
}
