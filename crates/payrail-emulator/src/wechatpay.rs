//! The WeChat Pay API v3 side: orders, codepay, query, close, reverse, refunds, trade bills,
//! signed answers, encrypted notifications with the v3 retry schedule, signature probes.

use crate::core::{
    BillFault, Core, NotifyEvent, NotifyProtocol, Order, OrderKind, OrderState, Refund, Rendered,
};
use crate::crypto::{self, KeyPair, PublicKey};
use crate::{EmulatorConfig, Protocol};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub struct WechatEmu {
    mchid: String,
    appid: String,
    api_v3_key: Vec<u8>,
    serial: String,
    keys: KeyPair,
    merchant: PublicKey,
    core: Arc<Core>,
    base_url: String,
}

/// v3 notification retries after the first send: 15s/15s/30s/3m/10m/20m/30m/30m/30m/60m/3h/3h/3h/6h/6h.
pub const SCHEDULE_MS: [i64; 15] = [
    15_000, 15_000, 30_000, 180_000, 600_000, 1_200_000, 1_800_000, 1_800_000, 1_800_000,
    3_600_000, 10_800_000, 10_800_000, 10_800_000, 21_600_000, 21_600_000,
];

/// Day D's trade bill is served from 10:00 Beijing on D+1 (WeChat builds it at 09:00 and says
/// to fetch it after 10:00), on the emulator's clock.
pub const BILL_OUT_AFTER_DAY_END_MS: i64 = 10 * 3_600_000;

type Answer = (StatusCode, Value);

fn not_exist() -> Answer {
    err(StatusCode::NOT_FOUND, "ORDER_NOT_EXIST", "订单不存在")
}

fn err(status: StatusCode, code: &str, message: &str) -> Answer {
    (status, json!({"code": code, "message": message}))
}

impl WechatEmu {
    pub fn new(
        cfg: &EmulatorConfig,
        keys: KeyPair,
        merchant: PublicKey,
        core: Arc<Core>,
        base_url: &str,
    ) -> WechatEmu {
        WechatEmu {
            mchid: cfg.merchant_id.clone(),
            appid: cfg.app_id.clone(),
            api_v3_key: cfg.api_v3_key.as_bytes().to_vec(),
            serial: cfg.platform_serial.clone(),
            keys,
            merchant,
            core,
            base_url: base_url.to_string(),
        }
    }

    /// Signs an answer: `Wechatpay-*` headers over timestamp, nonce and body.
    fn signed(&self, status: StatusCode, body: Vec<u8>, content_type: &'static str) -> Response {
        let ts = (self.core.now_ms() / 1000).to_string();
        let nonce = crypto::random_nonce();
        let mut msg = format!("{ts}\n{nonce}\n").into_bytes();
        msg.extend_from_slice(&body);
        msg.push(b'\n');
        let sig = self.keys.sign(&msg);
        (
            status,
            [
                ("Content-Type", content_type.to_string()),
                ("Wechatpay-Timestamp", ts),
                ("Wechatpay-Nonce", nonce),
                ("Wechatpay-Signature", sig),
                ("Wechatpay-Serial", self.serial.clone()),
            ],
            body,
        )
            .into_response()
    }

    fn verify_request(&self, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> bool {
        let Some(auth) = headers.get("Authorization").and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let Some(rest) = auth.strip_prefix("WECHATPAY2-SHA256-RSA2048 ") else {
            return false;
        };
        let mut fields = std::collections::HashMap::new();
        for part in rest.split(',') {
            if let Some((k, v)) = part.trim().split_once('=') {
                fields.insert(k.to_string(), v.trim_matches('"').to_string());
            }
        }
        let (Some(mchid), Some(nonce), Some(ts), Some(sig)) = (
            fields.get("mchid"),
            fields.get("nonce_str"),
            fields.get("timestamp"),
            fields.get("signature"),
        ) else {
            return false;
        };
        if mchid != &self.mchid {
            return false;
        }
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut msg = format!("{method}\n{path}\n{ts}\n{nonce}\n").into_bytes();
        msg.extend_from_slice(body);
        msg.push(b'\n');
        self.merchant.verify(&msg, sig)
    }

    fn trade_type(kind: OrderKind, path_kind: &str) -> &'static str {
        match (kind, path_kind) {
            (OrderKind::Code, _) => "MICROPAY",
            (OrderKind::Qr, _) => "NATIVE",
            (_, "h5") => "MWEB",
            _ => "JSAPI",
        }
    }

    fn transaction(
        &self,
        o: &Order,
        state_override: Option<&str>,
        amount_override: Option<i64>,
    ) -> Value {
        let state = state_override.unwrap_or(match o.state {
            OrderState::NotPaid => "NOTPAY",
            OrderState::Paying(_) => "USERPAYING",
            OrderState::Paid if !o.refunds.is_empty() => "REFUND",
            OrderState::Paid => "SUCCESS",
            OrderState::Closed => "CLOSED",
            OrderState::Revoked => "REVOKED",
            OrderState::Failed => "PAYERROR",
        });
        let total = amount_override.unwrap_or(o.amount_fen);
        let mut v = json!({
            "appid": self.appid,
            "mchid": self.mchid,
            "out_trade_no": o.out_trade_no,
            "trade_type": Self::trade_type(o.kind, o.extra.get("path").map(String::as_str).unwrap_or("")),
            "trade_state": state,
            "trade_state_desc": state,
            "amount": {"total": total, "payer_total": total, "currency": "CNY", "payer_currency": "CNY"},
        });
        if o.exists && !o.trade_no.is_empty() && o.state != OrderState::NotPaid {
            v["transaction_id"] = json!(o.trade_no);
        }
        if let Some(at) = o.paid_at_ms {
            v["success_time"] = json!(crypto::rfc3339(at));
        }
        v
    }

    async fn create(&self, path_kind: &str, body: &Value) -> Answer {
        let no = body["out_trade_no"].as_str().unwrap_or("").to_string();
        let total = body["amount"]["total"].as_i64().unwrap_or(0);
        if no.is_empty()
            || total <= 0
            || body["mchid"].as_str() != Some(&self.mchid)
            || body["appid"].as_str() != Some(&self.appid)
        {
            return err(StatusCode::BAD_REQUEST, "PARAM_ERROR", "参数错误");
        }
        let code = path_kind == "codepay";
        let (answer, hang) = {
            let mut st = self.core.lock();
            let fallback = st.amount_script(total);
            let script = st.scripts.entry(no.clone()).or_insert(fallback);
            if script.server_errors > 0 {
                script.server_errors -= 1;
                return err(StatusCode::INTERNAL_SERVER_ERROR, "SYSTEMERROR", "系统错误");
            }
            let script = script.clone();
            if let Some(existing) = st.orders.get(&no) {
                if existing.amount_fen != total {
                    return err(
                        StatusCode::BAD_REQUEST,
                        "OUT_TRADE_NO_USED",
                        "商户订单号重复",
                    );
                }
            } else {
                let kind = match path_kind {
                    "native" => OrderKind::Qr,
                    "codepay" => OrderKind::Code,
                    _ => OrderKind::Page,
                };
                let mut extra = std::collections::BTreeMap::new();
                extra.insert("path".to_string(), path_kind.to_string());
                let order = Order {
                    out_trade_no: no.clone(),
                    amount_fen: total,
                    kind,
                    state: OrderState::NotPaid,
                    exists: true,
                    trade_no: self.core.number("4200"),
                    created_at_ms: self.core.now_ms(),
                    paid_at_ms: None,
                    notify_url: body["notify_url"].as_str().map(str::to_owned),
                    extra,
                    script: script.clone(),
                    refunds: Vec::new(),
                    cancels: 0,
                    expires_at_ms: None,
                };
                st.orders.insert(no.clone(), order);
                if code {
                    if script.fail && script.user_paying_queries == 0 {
                        if let Some(o) = st.orders.get_mut(&no) {
                            o.state = OrderState::Failed;
                        }
                    } else if script.user_paying_queries > 0 {
                        if let Some(o) = st.orders.get_mut(&no) {
                            o.state = OrderState::Paying(script.user_paying_queries);
                        }
                    } else {
                        let subject = body["description"].as_str().unwrap_or("").to_string();
                        // Payment-code orders send no notification.
                        self.core.pay(&mut st, &no, &subject, false);
                    }
                }
            }
            let o = st.orders.get(&no).cloned();
            let answer = match (o, path_kind) {
                (Some(o), "codepay") => match o.state {
                    OrderState::Paid => (StatusCode::OK, self.transaction(&o, None, None)),
                    OrderState::Paying(_) => {
                        err(StatusCode::ACCEPTED, "USERPAYING", "需要用户输入支付密码")
                    }
                    OrderState::Failed => err(StatusCode::FORBIDDEN, "NOTENOUGH", "用户余额不足"),
                    _ => err(StatusCode::BAD_REQUEST, "ORDER_CLOSED", "订单已关闭"),
                },
                (Some(o), "native") => (
                    StatusCode::OK,
                    json!({"code_url": format!("weixin://wxpay/bizpayurl?pr={}", o.trade_no)}),
                ),
                (Some(o), "h5") => (
                    StatusCode::OK,
                    json!({"h5_url": format!("{}/pay/h5?no={}", self.base_url, o.out_trade_no)}),
                ),
                (Some(o), _) => (
                    StatusCode::OK,
                    json!({"prepay_id": format!("wx{}", o.trade_no)}),
                ),
                (None, _) => err(StatusCode::INTERNAL_SERVER_ERROR, "SYSTEMERROR", "系统错误"),
            };
            (answer, script.hang_ms)
        };
        if hang > 0 {
            tokio::time::sleep(Duration::from_millis(hang)).await;
        }
        answer
    }

    fn query(&self, no: &str) -> Answer {
        let mut st = self.core.lock();
        let Some(o) = st.orders.get_mut(no).filter(|o| !o.script.not_found) else {
            return not_exist();
        };
        if o.script.query_errors > 0 {
            o.script.query_errors -= 1;
            return err(StatusCode::INTERNAL_SERVER_ERROR, "SYSTEMERROR", "系统错误");
        }
        if let OrderState::Paying(n) = o.state {
            if n > 0 {
                o.state = OrderState::Paying(n - 1);
            } else if o.script.fail {
                o.state = OrderState::Failed;
            } else {
                self.core.pay(&mut st, no, "", false);
            }
        }
        match st.orders.get(no) {
            Some(o) => (StatusCode::OK, self.transaction(o, None, None)),
            None => err(StatusCode::NOT_FOUND, "ORDER_NOT_EXIST", "订单不存在"),
        }
    }

    fn close(&self, no: &str) -> Answer {
        let mut st = self.core.lock();
        let Some(o) = st.orders.get_mut(no).filter(|o| !o.script.not_found) else {
            return not_exist();
        };
        match o.state {
            OrderState::Paid => err(StatusCode::BAD_REQUEST, "ORDERPAID", "订单已支付"),
            _ if o.kind == OrderKind::Code => err(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "付款码订单请撤销",
            ),
            _ => {
                o.state = OrderState::Closed;
                (StatusCode::NO_CONTENT, Value::Null)
            }
        }
    }

    fn reverse(&self, no: &str) -> Answer {
        let now = self.core.now_ms();
        let mut st = self.core.lock();
        let Some(o) = st.orders.get_mut(no).filter(|o| !o.script.not_found) else {
            return not_exist();
        };
        o.cancels += 1;
        if o.cancels <= o.script.cancel_retries {
            return (StatusCode::OK, json!({"recall": "Y"}));
        }
        if now - o.created_at_ms > 7 * 86_400_000 {
            return err(
                StatusCode::BAD_REQUEST,
                "REVERSE_EXPIRE",
                "订单已超过撤销期限",
            );
        }
        let was_paid = o.state == OrderState::Paid;
        let remaining = o.amount_fen - o.refunded_fen();
        if o.state != OrderState::Revoked {
            o.state = OrderState::Revoked;
            if was_paid && remaining > 0 {
                let refund = Refund {
                    out_refund_no: String::new(),
                    refund_no: self.core.number("5030"),
                    amount_fen: remaining,
                    at_ms: now,
                    time_text: None,
                };
                self.core.record_refund(&mut st, no, refund, true);
            }
        }
        (StatusCode::OK, json!({"recall": "N"}))
    }

    fn refund_json(&self, o: &Order, r: &Refund, status: &str) -> Value {
        json!({
            "refund_id": r.refund_no,
            "out_refund_no": r.out_refund_no,
            "transaction_id": o.trade_no,
            "out_trade_no": o.out_trade_no,
            "channel": "ORIGINAL",
            "status": status,
            "success_time": crypto::rfc3339(r.at_ms),
            "create_time": crypto::rfc3339(r.at_ms),
            "amount": {"total": o.amount_fen, "refund": r.amount_fen, "payer_total": o.amount_fen, "payer_refund": r.amount_fen, "currency": "CNY"},
        })
    }

    fn refund(&self, body: &Value) -> Answer {
        let no = body["out_trade_no"].as_str().unwrap_or("");
        let out_refund_no = body["out_refund_no"].as_str().unwrap_or("").to_string();
        let amount = body["amount"]["refund"].as_i64().unwrap_or(0);
        let total = body["amount"]["total"].as_i64().unwrap_or(0);
        let now = self.core.now_ms();
        let mut st = self.core.lock();
        let Some(o) = st.orders.get(no).cloned() else {
            return err(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "订单不存在");
        };
        if let Some(r) = o
            .refunds
            .iter()
            .find(|r| r.out_refund_no == out_refund_no && !out_refund_no.is_empty())
        {
            if r.amount_fen != amount {
                return err(
                    StatusCode::BAD_REQUEST,
                    "INVALID_REQUEST",
                    "同一退款单号金额不一致",
                );
            }
            return (StatusCode::OK, self.refund_json(&o, r, "SUCCESS"));
        }
        if o.state != OrderState::Paid {
            return err(StatusCode::BAD_REQUEST, "INVALID_REQUEST", "订单状态不正确");
        }
        if total != o.amount_fen || amount <= 0 || out_refund_no.is_empty() {
            return err(StatusCode::BAD_REQUEST, "PARAM_ERROR", "参数错误");
        }
        if amount > o.amount_fen - o.refunded_fen() {
            return err(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "申请退款金额超过订单可退金额",
            );
        }
        let r = Refund {
            out_refund_no: out_refund_no.clone(),
            refund_no: self.core.number("5030"),
            amount_fen: amount,
            at_ms: now,
            time_text: None,
        };
        self.core.record_refund(&mut st, no, r.clone(), false);
        let url = body["notify_url"]
            .as_str()
            .map(str::to_owned)
            .or(o.notify_url.clone());
        if let Some(url) = url {
            self.core.enqueue(
                &mut st,
                &url,
                NotifyEvent::Refunded {
                    out_trade_no: no.to_string(),
                    out_refund_no,
                },
            );
        }
        (StatusCode::OK, self.refund_json(&o, &r, "PROCESSING"))
    }

    fn refund_query(&self, out_refund_no: &str) -> Answer {
        let st = self.core.lock();
        for o in st.orders.values() {
            if let Some(r) = o.refunds.iter().find(|r| r.out_refund_no == out_refund_no) {
                return (StatusCode::OK, self.refund_json(o, r, "SUCCESS"));
            }
        }
        err(StatusCode::NOT_FOUND, "RESOURCE_NOT_EXISTS", "退款单不存在")
    }

    /// The ALL trade bill of one Beijing day.
    pub fn bill(&self, date: &str) -> String {
        let mut out = String::from("交易时间,公众账号ID,商户号,特约商户号,设备号,微信订单号,商户订单号,用户标识,交易类型,交易状态,付款银行,货币种类,应结订单金额,代金券金额,微信退款单号,商户退款单号,退款金额,充值券退款金额,退款类型,退款状态,商品名称,商户数据包,手续费,费率,订单金额,申请退款金额,费率备注\r\n");
        let lines: Vec<_> = self
            .core
            .ledger()
            .into_iter()
            .filter(|l| crypto::day(l.at_ms) == date)
            .collect();
        let (mut pay, mut refund, mut fee) = (0i64, 0i64, 0i64);
        for l in &lines {
            let status = if !l.refund {
                "SUCCESS"
            } else if l.revoked {
                "REVOKED"
            } else {
                "REFUND"
            };
            let (settle, refund_amt) = if l.refund {
                (0, l.amount_fen)
            } else {
                (l.amount_fen, 0)
            };
            pay += settle;
            refund += refund_amt;
            fee += l.fee_fen;
            let cols = [
                crypto::spaced(l.at_ms),
                self.appid.clone(),
                self.mchid.clone(),
                "0".into(),
                String::new(),
                l.trade_no.clone(),
                l.out_trade_no.clone(),
                "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o".into(),
                "NATIVE".into(),
                status.into(),
                "OTHERS".into(),
                "CNY".into(),
                crypto::yuan(settle),
                "0.00".into(),
                if l.refund {
                    l.refund_no.clone()
                } else {
                    "0".into()
                },
                if l.refund {
                    l.out_refund_no.clone()
                } else {
                    "0".into()
                },
                crypto::yuan(refund_amt),
                "0.00".into(),
                if l.refund {
                    "ORIGINAL".into()
                } else {
                    String::new()
                },
                if l.refund {
                    "SUCCESS".into()
                } else {
                    String::new()
                },
                l.subject.clone(),
                String::new(),
                crypto::yuan(l.fee_fen),
                "0.60%".into(),
                crypto::yuan(settle),
                crypto::yuan(refund_amt),
                String::new(),
            ];
            let row: Vec<String> = cols.iter().map(|c| format!("`{c}")).collect();
            out.push_str(&row.join(","));
            out.push_str("\r\n");
        }
        out.push_str("总交易单数,应结订单总金额,退款总金额,充值券退款总金额,手续费总金额,订单总金额,申请退款总金额\r\n");
        let summary = [
            lines.len().to_string(),
            crypto::yuan(pay),
            crypto::yuan(refund),
            "0.00".into(),
            crypto::yuan(fee),
            crypto::yuan(pay),
            crypto::yuan(refund),
        ];
        out.push_str(
            &summary
                .iter()
                .map(|c| format!("`{c}"))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push_str("\r\n");
        out
    }

    async fn handle(
        self: Arc<Self>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        if !self.verify_request(&method, &uri, &headers, &body) {
            return self.answer(err(StatusCode::UNAUTHORIZED, "SIGN_ERROR", "签名错误"));
        }
        let path = uri.path().to_string();
        let query: std::collections::HashMap<String, String> =
            serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
        let json_body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let answer = match (method.as_str(), segs.as_slice()) {
            (
                "POST",
                ["v3", "pay", "transactions", kind @ ("native" | "h5" | "jsapi" | "codepay")],
            ) => {
                let kind = kind.to_string();
                self.create(&kind, &json_body).await
            }
            ("GET", ["v3", "pay", "transactions", "out-trade-no", no]) => {
                if query.get("mchid") != Some(&self.mchid) {
                    err(StatusCode::BAD_REQUEST, "PARAM_ERROR", "mchid")
                } else {
                    self.query(no)
                }
            }
            ("POST", ["v3", "pay", "transactions", "out-trade-no", no, "close"]) => self.close(no),
            ("POST", ["v3", "pay", "transactions", "out-trade-no", no, "reverse"]) => {
                self.reverse(no)
            }
            ("POST", ["v3", "refund", "domestic", "refunds"]) => self.refund(&json_body),
            ("GET", ["v3", "refund", "domestic", "refunds", no]) => self.refund_query(no),
            ("GET", ["v3", "bill", "tradebill"]) => {
                let date = query.get("bill_date").cloned().unwrap_or_default();
                let first_not_out =
                    crypto::day(self.core.now_ms().saturating_sub(BILL_OUT_AFTER_DAY_END_MS));
                if date >= first_not_out {
                    err(
                        StatusCode::BAD_REQUEST,
                        "NO_STATEMENT_EXIST",
                        "账单尚未生成",
                    )
                } else {
                    use sha1::Digest;
                    let file = self.bill(&date);
                    let hash = hex::encode(sha1::Sha1::digest(file.as_bytes()));
                    let url = format!("{}/v3/billdownload/file?token={date}", self.base_url);
                    let fault = self.core.lock().bill_fault;
                    (
                        StatusCode::OK,
                        if fault == BillFault::NoHash {
                            json!({"download_url": url})
                        } else {
                            json!({"hash_type": "SHA1", "hash_value": hash, "download_url": url})
                        },
                    )
                }
            }
            ("GET", ["v3", "billdownload", "file"]) => {
                let date = query.get("token").cloned().unwrap_or_default();
                let mut file = self.bill(&date);
                if self.core.lock().bill_fault == BillFault::AlteredFile {
                    // Changed in transit: another WeChat order number, which no total checks.
                    file = file.replacen("`4200", "`4201", 1);
                }
                return (
                    StatusCode::OK,
                    [("Content-Type", "text/plain; charset=utf-8")],
                    file,
                )
                    .into_response();
            }
            _ => err(StatusCode::NOT_FOUND, "NOT_FOUND", "no such API"),
        };
        self.answer(answer)
    }

    fn answer(&self, (status, v): Answer) -> Response {
        let body = if v.is_null() {
            Vec::new()
        } else {
            v.to_string().into_bytes()
        };
        self.signed(status, body, "application/json")
    }

    fn encrypt(&self, plain: &Value, aad: &str) -> Option<Value> {
        let nonce = crypto::random_nonce()[..12].to_string();
        let ct = crypto::aes_gcm_encrypt_b64(
            &self.api_v3_key,
            nonce.as_bytes(),
            aad.as_bytes(),
            plain.to_string().as_bytes(),
        )?;
        Some(
            json!({"algorithm": "AEAD_AES_256_GCM", "ciphertext": ct, "nonce": nonce, "associated_data": aad, "original_type": aad}),
        )
    }

    fn notification(&self, body: Vec<u8>, signature: Option<String>) -> Rendered {
        let ts = (self.core.now_ms() / 1000).to_string();
        let nonce = crypto::random_nonce();
        let sig = signature.unwrap_or_else(|| {
            let mut msg = format!("{ts}\n{nonce}\n").into_bytes();
            msg.extend_from_slice(&body);
            msg.push(b'\n');
            self.keys.sign(&msg)
        });
        Rendered {
            content_type: "application/json",
            headers: vec![
                ("Wechatpay-Timestamp".into(), ts),
                ("Wechatpay-Nonce".into(), nonce),
                ("Wechatpay-Signature".into(), sig),
                ("Wechatpay-Serial".into(), self.serial.clone()),
            ],
            body,
        }
    }
}

impl NotifyProtocol for WechatEmu {
    fn render(&self, core: &Core, event: &NotifyEvent, notify_id: &str) -> Option<Rendered> {
        let o = core.order(event.out_trade_no())?;
        let (event_type, summary, resource) = match event {
            NotifyEvent::Paid { .. } => (
                "TRANSACTION.SUCCESS",
                "支付成功",
                self.encrypt(&self.transaction(&o, Some("SUCCESS"), None), "transaction")?,
            ),
            NotifyEvent::Tampered { amount_fen, .. } => (
                "TRANSACTION.SUCCESS",
                "支付成功",
                self.encrypt(
                    &self.transaction(&o, Some("SUCCESS"), Some(*amount_fen)),
                    "transaction",
                )?,
            ),
            NotifyEvent::Contradiction { .. } => (
                "TRANSACTION.CLOSED",
                "订单关闭",
                self.encrypt(&self.transaction(&o, Some("CLOSED"), None), "transaction")?,
            ),
            NotifyEvent::Refunded { out_refund_no, .. } => {
                let r = o
                    .refunds
                    .iter()
                    .find(|r| &r.out_refund_no == out_refund_no)?;
                let mut v = self.refund_json(&o, r, "SUCCESS");
                v["mchid"] = json!(self.mchid);
                // The notification names it refund_status, the API answers status.
                if let Some(obj) = v.as_object_mut() {
                    obj.remove("status");
                }
                v["refund_status"] = json!("SUCCESS");
                ("REFUND.SUCCESS", "退款成功", self.encrypt(&v, "refund")?)
            }
            NotifyEvent::Revoked { .. } => return None,
        };
        let body = json!({
            "id": format!("EV-{notify_id}"),
            "create_time": crypto::rfc3339(core.now_ms()),
            "resource_type": "encrypt-resource",
            "event_type": event_type,
            "summary": summary,
            "resource": resource,
        });
        Some(self.notification(body.to_string().into_bytes(), None))
    }

    fn acked(&self, status: u16, _body: &[u8]) -> bool {
        status == 200 || status == 204
    }

    fn schedule_ms(&self) -> &'static [i64] {
        &SCHEDULE_MS
    }
}

impl Protocol for WechatEmu {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .fallback(
                |State(s): State<Arc<WechatEmu>>,
                 method: Method,
                 uri: Uri,
                 headers: HeaderMap,
                 body: Bytes| async move { s.handle(method, uri, headers, body).await },
            )
            .with_state(self)
    }

    fn probe(&self, core: &Core) -> Option<Rendered> {
        let body = json!({"id": "PROBE", "create_time": crypto::rfc3339(core.now_ms()), "event_type": "TRANSACTION.SUCCESS", "resource_type": "encrypt-resource", "summary": "probe", "resource": {"algorithm": "AEAD_AES_256_GCM", "ciphertext": "", "nonce": "", "associated_data": ""}});
        Some(self.notification(
            body.to_string().into_bytes(),
            Some(format!("WECHATPAY/SIGNTEST/{}", crypto::random_nonce())),
        ))
    }
}
