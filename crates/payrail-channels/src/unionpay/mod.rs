//! UnionPay online payments (全渠道, ACP 5.1.0, `signMethod=01`): gateway consume (browser form),
//! payment-code consume, query with `origRespCode`, revoke, refund, back-URL notifications and
//! the reconciliation file.
//!
//! ACP has no close. An unpaid gateway order lapses at its `payTimeout` (UnionPay refuses to
//! take the payment after it), but nothing in the query says so: an order never paid answers
//! `34` (查无此交易, no such transaction) before and after `payTimeout` — the same answer as an
//! order UnionPay never received — and a debit that arrives late is `42`, not a closed order.
//! What the protocol does state definitely is the reconciliation file: every successful
//! consume is in the file of its settlement date. So `close` reports `closed` only when the
//! query finds no such transaction *and* the files of every settlement date the order could
//! have been paid on (its day through the day after `payTimeout`) are out and none lists it
//! (the walk over the files and their cache are shared with WeChat Pay: `crate::bills`).
//!
//! Limits: the UnionPay public key is configured directly (the `signPubKeyCert` chain in
//! answers is not walked), and the signing key is a PEM key (convert the `.pfx` with
//! `openssl pkcs12 -nocerts -nodes`). See docs/channels.md.

mod bill;
pub mod transformers;

use crate::bills::PaidOrders;
use crate::common::{self, compact_id, ConfigError, RsaSigner, RsaVerifier};
use crate::*;
use payrail_domain::Currency;
use transformers as t;

/// One UnionPay merchant.
#[derive(Debug, Clone)]
pub struct UnionPayConfig {
    /// `https://gateway.95516.com`, or an emulator's base URL.
    pub base_url: String,
    /// `merId`, 15 digits.
    pub mer_id: String,
    /// `certId`: the serial of the merchant signing certificate.
    pub cert_id: String,
    /// The merchant signing private key (PEM).
    pub signing_key: Secret<String>,
    /// UnionPay's signing public key (SPKI PEM).
    pub unionpay_public_key: String,
    /// Our notification endpoint (`backUrl`) for this account.
    pub back_url: String,
    /// Where the payer's browser returns (`frontUrl`) by default.
    pub front_url: Option<String>,
    /// Bound of each HTTP call, connect included.
    pub timeout_ms: u64,
}

pub struct UnionPay {
    cfg: UnionPayConfig,
    signer: RsaSigner,
    verifier: RsaVerifier,
    http: reqwest::Client,
    /// The order ids in each reconciliation file read so far (a file, once out, never
    /// changes), so many lapsed orders of one day fetch it once.
    settled: PaidOrders,
}

/// How long after `payTimeout` a close may stay unconfirmed: the file of the day after the
/// order's last day comes out the morning after that day (about 2 days 10 h at worst).
pub const CLOSE_CONFIRM_DELAY_MS: i64 = 3 * 24 * 3600 * 1000;

const FRONT: &str = "/gateway/api/frontTransReq.do";
const BACK: &str = "/gateway/api/backTransReq.do";
const QUERY: &str = "/gateway/api/queryTrans.do";
const FILE: &str = "/gateway/api/fileTransRequest.do";

type Fields = BTreeMap<String, String>;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
        .unwrap_or(0)
}

fn txn_time(ms: i64) -> String {
    common::beijing(ms)
        .map(|d| d.to_compact())
        .unwrap_or_default()
}

/// `reqReserved` echoes back in notifications: we put the attempt and the order total there,
/// since a refund notification names neither.
fn reserved(attempt: &AttemptId, total: Money) -> String {
    format!("{attempt}:{}", total.amount_minor())
}

impl UnionPay {
    pub fn new(cfg: UnionPayConfig) -> Result<UnionPay, ConfigError> {
        let signer = RsaSigner::from_secret("unionpay.signing_key", &cfg.signing_key)?;
        let verifier =
            RsaVerifier::parse("unionpay.unionpay_public_key", &cfg.unionpay_public_key)?;
        if cfg.mer_id.trim().is_empty() || cfg.cert_id.trim().is_empty() {
            return Err(ConfigError(
                "unionpay.mer_id and unionpay.cert_id are required".into(),
            ));
        }
        let http = common::http_client(cfg.timeout_ms)?;
        Ok(UnionPay {
            cfg,
            signer,
            verifier,
            http,
            settled: PaidOrders::new("unionpay", "reconciliation file"),
        })
    }

    fn base(
        &self,
        txn_type: &str,
        sub: &str,
        biz: &str,
        channel: &str,
        order_id: String,
        time: String,
    ) -> Fields {
        let mut f = Fields::new();
        for (k, v) in [
            ("version", "5.1.0"),
            ("encoding", "UTF-8"),
            ("signMethod", "01"),
            ("txnType", txn_type),
            ("txnSubType", sub),
            ("bizType", biz),
            ("channelType", channel),
            ("accessType", "0"),
        ] {
            f.insert(k.into(), v.into());
        }
        f.insert("merId".into(), self.cfg.mer_id.clone());
        f.insert("certId".into(), self.cfg.cert_id.clone());
        f.insert("orderId".into(), order_id);
        f.insert("txnTime".into(), time);
        f
    }

    fn sign(&self, mut f: Fields) -> Fields {
        let digest = t::sign_digest_hex(&f);
        f.insert("signature".into(), self.signer.sign_b64(digest.as_bytes()));
        f
    }

    fn verified(&self, f: &Fields) -> bool {
        f.get("signature").is_some_and(|s| {
            self.verifier
                .verify_b64(t::sign_digest_hex(f).as_bytes(), s)
        })
    }

    /// One back-end call. `Err` = no usable answer (transport, non-200, unsigned or bad
    /// signature).
    async fn call(&self, path: &str, fields: Fields) -> Result<Fields, String> {
        let body = serde_urlencoded::to_string(self.sign(fields)).map_err(|e| e.to_string())?;
        let resp = self
            .http
            .post(format!("{}{path}", self.cfg.base_url.trim_end_matches('/')))
            .header(
                "Content-Type",
                "application/x-www-form-urlencoded;charset=UTF-8",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| common::transport_reason(&e))?;
        let status = resp.status().as_u16();
        let bytes = common::read_body(resp).await?;
        if status != 200 {
            return Err(format!("HTTP {status}"));
        }
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_bytes(&bytes).map_err(|e| format!("malformed answer: {e}"))?;
        let f: Fields = pairs.into_iter().collect();
        if !self.verified(&f) {
            return Err("answer signature does not verify".into());
        }
        if f.get("merId").is_some_and(|m| m != &self.cfg.mer_id) {
            return Err("answer names another merchant".into());
        }
        Ok(f)
    }

    async fn query_order(&self, order_id: String, time_ms: i64) -> Result<Fields, String> {
        let f = self.base(
            "00",
            "00",
            "000000",
            "07",
            order_id.clone(),
            txn_time(time_ms),
        );
        let answer = self.call(QUERY, f).await?;
        if answer.get("orderId").is_some_and(|o| o != &order_id) {
            return Err("answer names another order".into());
        }
        Ok(answer)
    }

    fn map_query_answer(a: &Fields) -> ChannelOutcome {
        let paid_at = opt(a, "txnTime").and_then(|s| common::beijing_ms(&s));
        t::map_query(
            get(a, "respCode"),
            a.get("origRespCode").map(String::as_str),
            get(a, "origRespMsg"),
            opt(a, "queryId"),
            paid_at,
        )
    }
}

fn get<'a>(f: &'a Fields, k: &str) -> &'a str {
    f.get(k).map(String::as_str).unwrap_or("")
}

fn opt(f: &Fields, k: &str) -> Option<String> {
    f.get(k).filter(|v| !v.is_empty()).cloned()
}

#[async_trait]
impl Connector for UnionPay {
    fn name(&self) -> &'static str {
        "unionpay"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            methods: vec![
                // No close call: an unpaid gateway order lapses at its payTimeout, and `close`
                // confirms that from the reconciliation files (module comment). No cancel for
                // the engine either: revoke voids only a *successful* consume (its queryId, the
                // same day) — an inconclusive one is refused — and its `00` only acknowledges
                // the request. So an inconclusive payment-code payment is queried until
                // definite. (`Connector::cancel` still speaks revoke.)
                MethodCapability {
                    method: PaymentMethod::UnionpayWeb,
                    close: false,
                    cancel: false,
                    notifies: true,
                },
                MethodCapability {
                    method: PaymentMethod::UnionpayCode,
                    close: false,
                    cancel: false,
                    notifies: true,
                },
            ],
            refund: true,
            partial_refund: true,
            refund_window_days: 365,
            max_refunds_per_payment: None,
            cancel_window_ms: Some(24 * 3600 * 1000),
            refund_query_delay_ms: 0,
            bills: true,
            close_confirm_delay_ms: CLOSE_CONFIRM_DELAY_MS,
        }
    }

    async fn submit(&self, req: &SubmitRequest) -> SubmitResponse {
        let refused = |code: &str, message: &str| SubmitResponse {
            outcome: ChannelOutcome::Failed {
                code: code.into(),
                message: message.into(),
            },
            next_action: None,
        };
        if req.amount.currency() != Currency::CNY {
            return refused("currency_not_supported", "unionpay takes CNY (156) only");
        }
        let order_id = compact_id(&req.attempt_id);
        let time = txn_time(req.submitted_at_ms);
        let back_url = req
            .notify_url
            .clone()
            .unwrap_or_else(|| self.cfg.back_url.clone());
        match req.method {
            PaymentMethod::UnionpayWeb => {
                let mut f = self.base("01", "01", "000201", "07", order_id, time);
                f.insert("txnAmt".into(), req.amount.amount_minor().to_string());
                f.insert("currencyCode".into(), "156".into());
                f.insert("backUrl".into(), back_url);
                if let Some(front) = req
                    .return_url
                    .clone()
                    .or_else(|| self.cfg.front_url.clone())
                {
                    f.insert("frontUrl".into(), front);
                }
                f.insert("payTimeout".into(), txn_time(req.expires_at_ms));
                f.insert("reqReserved".into(), reserved(&req.attempt_id, req.amount));
                let fields = self.sign(f).into_iter().collect();
                SubmitResponse {
                    outcome: ChannelOutcome::Processing {
                        channel_trade_no: None,
                    },
                    next_action: Some(NextAction::PostForm {
                        url: format!("{}{FRONT}", self.cfg.base_url.trim_end_matches('/')),
                        fields,
                    }),
                }
            }
            PaymentMethod::UnionpayCode => {
                let Some(code) = &req.auth_code else {
                    return refused("auth_code_missing", "a payment code is required");
                };
                let mut f = self.base("01", "06", "000000", "08", order_id, time);
                f.insert("txnAmt".into(), req.amount.amount_minor().to_string());
                f.insert("currencyCode".into(), "156".into());
                f.insert("backUrl".into(), back_url);
                f.insert("qrNo".into(), code.expose().clone());
                f.insert("reqReserved".into(), reserved(&req.attempt_id, req.amount));
                let outcome = match self.call(BACK, f).await {
                    Err(reason) => ChannelOutcome::unknown(format!("unionpay: {reason}")),
                    Ok(a) => {
                        t::map_consume(get(&a, "respCode"), get(&a, "respMsg"), opt(&a, "queryId"))
                    }
                };
                SubmitResponse {
                    outcome,
                    next_action: None,
                }
            }
            _ => refused(
                "method_not_supported",
                "unionpay does not offer this method",
            ),
        }
    }

    async fn query(&self, req: &QueryRequest) -> ChannelOutcome {
        match self
            .query_order(compact_id(&req.attempt_id), req.submitted_at_ms)
            .await
        {
            Err(reason) => ChannelOutcome::unknown(format!("unionpay: {reason}")),
            Ok(a) => Self::map_query_answer(&a),
        }
    }

    /// UnionPay has no close: a definite query answer is reported as it is (a payment made
    /// meanwhile is `succeeded`, never closed); "no such transaction" becomes `closed` only once
    /// the reconciliation files confirm the order was never paid (module comment); anything
    /// else is unknown.
    async fn close(&self, req: &QueryRequest) -> ChannelOutcome {
        let order_id = compact_id(&req.attempt_id);
        let answer = match self
            .query_order(order_id.clone(), req.submitted_at_ms)
            .await
        {
            Err(reason) => return ChannelOutcome::unknown(format!("unionpay: {reason}")),
            Ok(a) => a,
        };
        if !t::is_not_found(get(&answer, "respCode")) {
            return match Self::map_query_answer(&answer) {
                definite if definite.is_definite() => definite,
                ChannelOutcome::Unknown { reason } => {
                    ChannelOutcome::unknown(format!("{reason}; unionpay has no close"))
                }
                other => ChannelOutcome::unknown(format!(
                    "unionpay: no close; the order is {} at UnionPay",
                    other.label()
                )),
            };
        }
        // Settlement dates from the order's day through the day after its payTimeout (a
        // consume after 23:00 settles the next day): see `crate::bills`.
        self.settled
            .confirm_never_paid(&order_id, req.submitted_at_ms, req.expires_at_ms, |d| {
                self.download_bill(d)
            })
            .await
    }

    async fn cancel(&self, req: &QueryRequest) -> CancelOutcome {
        let Some(orig) = req.channel_trade_no.clone() else {
            return CancelOutcome::Unknown {
                reason: "unionpay: revoke needs the consume's queryId; query first".into(),
            };
        };
        let order_id = format!("{}C", compact_id(&req.attempt_id));
        let mut f = self.base("31", "00", "000201", "07", order_id, txn_time(now_ms()));
        f.insert("txnAmt".into(), req.amount.amount_minor().to_string());
        f.insert("currencyCode".into(), "156".into());
        f.insert("origQryId".into(), orig);
        f.insert("backUrl".into(), self.cfg.back_url.clone());
        f.insert("reqReserved".into(), reserved(&req.attempt_id, req.amount));
        match self.call(BACK, f).await {
            Err(reason) => CancelOutcome::Unknown {
                reason: format!("unionpay: {reason}"),
            },
            Ok(a) => t::map_revoke(get(&a, "respCode"), get(&a, "respMsg")),
        }
    }

    async fn refund(&self, req: &RefundRequest) -> RefundOutcome {
        let Some(orig) = req.channel_trade_no.clone() else {
            return RefundOutcome::Failed {
                code: "channel_trade_no_missing".into(),
                message: "unionpay refunds need the consume's queryId; nothing was sent".into(),
            };
        };
        let mut f = self.base(
            "04",
            "00",
            "000201",
            "07",
            compact_id(&req.refund_id),
            txn_time(req.requested_at_ms),
        );
        f.insert(
            "txnAmt".into(),
            req.refund_amount.amount_minor().to_string(),
        );
        f.insert("currencyCode".into(), "156".into());
        f.insert("origQryId".into(), orig);
        f.insert(
            "backUrl".into(),
            req.notify_url
                .clone()
                .unwrap_or_else(|| self.cfg.back_url.clone()),
        );
        f.insert(
            "reqReserved".into(),
            reserved(&req.attempt_id, req.payment_amount),
        );
        match self.call(BACK, f).await {
            Err(reason) => RefundOutcome::unknown(format!("unionpay: {reason}")),
            Ok(a) => t::map_refund(get(&a, "respCode"), get(&a, "respMsg"), opt(&a, "queryId")),
        }
    }

    async fn query_refund(&self, req: &RefundRequest) -> RefundOutcome {
        match self
            .query_order(compact_id(&req.refund_id), req.requested_at_ms)
            .await
        {
            Err(reason) => RefundOutcome::unknown(format!("unionpay: {reason}")),
            Ok(a) => t::map_refund_query(
                get(&a, "respCode"),
                a.get("origRespCode").map(String::as_str),
                get(&a, "origRespMsg"),
                opt(&a, "queryId"),
                opt(&a, "txnTime").and_then(|s| common::beijing_ms(&s)),
            ),
        }
    }

    fn parse_notification(
        &self,
        n: &InboundNotification,
    ) -> Result<ChannelNotification, NotificationError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&n.body)
            .map_err(|e| NotificationError::Malformed(format!("form: {e}")))?;
        let f: Fields = pairs.into_iter().collect();
        if !self.verified(&f) {
            return Err(NotificationError::BadSignature);
        }
        let malformed = |what: &str| NotificationError::Malformed(what.into());
        let (attempt, total) = get(&f, "reqReserved")
            .split_once(':')
            .ok_or_else(|| malformed("reqReserved"))?;
        let attempt_id =
            common::parse_attempt(attempt).ok_or_else(|| malformed("reqReserved is not ours"))?;
        let total: i64 = total.parse().map_err(|_| malformed("reqReserved total"))?;
        if get(&f, "currencyCode") != "156" {
            return Err(malformed("currencyCode"));
        }
        let txn_amt = get(&f, "txnAmt")
            .parse::<i64>()
            .map(|a| Money::new(a, Currency::CNY))
            .map_err(|_| malformed("txnAmt"))?;
        let query_id = opt(&f, "queryId");
        let at = opt(&f, "txnTime").and_then(|s| common::beijing_ms(&s));
        let resp = get(&f, "respCode");
        let event = match get(&f, "txnType") {
            "01" => {
                if compact_id(&attempt_id) != get(&f, "orderId") {
                    return Err(malformed("orderId does not match reqReserved"));
                }
                NotificationEvent::Payment {
                    outcome: match resp {
                        "00" => ChannelOutcome::Succeeded {
                            channel_trade_no: query_id.clone(),
                            paid_at_ms: at,
                        },
                        c => t::map_consume(c, get(&f, "respMsg"), query_id.clone()),
                    },
                }
            }
            "31" => NotificationEvent::Payment {
                outcome: if resp == "00" {
                    ChannelOutcome::Cancelled
                } else {
                    ChannelOutcome::unknown(format!("unionpay: revoke respCode {resp}"))
                },
            },
            "04" => NotificationEvent::Refund {
                refund_id: common::parse_refund(get(&f, "orderId")),
                refund_amount: Some(txn_amt),
                refunded_total: None,
                outcome: t::map_refund_query(
                    "00",
                    Some(resp),
                    get(&f, "respMsg"),
                    query_id.clone(),
                    at,
                ),
            },
            other => return Err(NotificationError::Malformed(format!("txnType {other}"))),
        };
        Ok(ChannelNotification {
            notification_id: query_id.clone(),
            attempt_id,
            channel_trade_no: if get(&f, "txnType") == "01" {
                query_id
            } else {
                opt(&f, "origQryId")
            },
            // A payment states its amount (txnAmt); a refund or revoke states only its own, so
            // the order total is the one we sent in reqReserved.
            amount: if get(&f, "txnType") == "01" {
                txn_amt
            } else {
                Money::new(total, Currency::CNY)
            },
            channel_merchant_id: get(&f, "merId").to_string(),
            channel_app_id: None,
            event,
        })
    }

    fn notification_reply(&self, accepted: bool) -> NotificationReply {
        // UnionPay reads only the status: 200 (or 302) = received.
        NotificationReply {
            status: if accepted { 200 } else { 500 },
            content_type: Some("text/plain"),
            body: if accepted {
                b"ok".to_vec()
            } else {
                b"not accepted".to_vec()
            },
        }
    }

    async fn download_bill(&self, date: Date) -> Result<Bill, BillError> {
        let mut f = self.base(
            "76",
            "01",
            "000000",
            "07",
            String::new(),
            txn_time(now_ms()),
        );
        f.remove("orderId");
        f.remove("channelType");
        f.insert(
            "settleDate".into(),
            format!("{:02}{:02}", date.month(), date.day()),
        );
        f.insert("fileType".into(), "00".into());
        let a = self.call(FILE, f).await.map_err(BillError::Transport)?;
        match get(&a, "respCode") {
            "00" => {}
            "98" => return Err(BillError::NotReady),
            c => {
                return Err(BillError::Channel {
                    code: c.into(),
                    message: get(&a, "respMsg").into(),
                })
            }
        }
        bill::parse_file_content(date, &self.cfg.mer_id, get(&a, "fileContent"))
    }
}
