//! The Alipay OpenAPI side (`/gateway.do`): precreate, pay, WAP page, query, close, cancel,
//! refund, refund query, bill download URL, `trade_status_sync` notifications (retried at
//! 4m,10m,10m,1h,2h,6h,15h until the answer is the literal `success`), GBK zip bills.

use crate::core::{
    Core, NotifyEvent, NotifyProtocol, Order, OrderKind, OrderState, Refund, Rendered,
};
use crate::crypto::{self, KeyPair, PublicKey};
use crate::{EmulatorConfig, Protocol};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

pub struct AlipayEmu {
    app_id: String,
    seller_id: String,
    keys: KeyPair,
    merchant: PublicKey,
    core: Arc<Core>,
    base_url: String,
}

pub const SCHEDULE_MS: [i64; 7] = [
    240_000, 600_000, 600_000, 3_600_000, 7_200_000, 21_600_000, 54_000_000,
];

fn sorted_content(p: &BTreeMap<String, String>, skip: &[&str]) -> String {
    let mut parts = Vec::new();
    for (k, v) in p {
        if skip.contains(&k.as_str()) || v.is_empty() {
            continue;
        }
        parts.push(format!("{k}={v}"));
    }
    parts.join("&")
}

fn fail(sub_code: &str, sub_msg: &str) -> Value {
    json!({"code": "40004", "msg": "Business Failed", "sub_code": sub_code, "sub_msg": sub_msg})
}

fn ok(mut v: Value) -> Value {
    v["code"] = json!("10000");
    v["msg"] = json!("Success");
    v
}

impl AlipayEmu {
    pub fn new(
        cfg: &EmulatorConfig,
        keys: KeyPair,
        merchant: PublicKey,
        core: Arc<Core>,
        base_url: &str,
    ) -> AlipayEmu {
        AlipayEmu {
            app_id: cfg.merchant_id.clone(),
            seller_id: cfg.app_id.clone(),
            keys,
            merchant,
            core,
            base_url: base_url.to_string(),
        }
    }

    fn respond(&self, method: &str, v: Value) -> Response {
        let inner = v.to_string();
        let sign = self.keys.sign(inner.as_bytes());
        let key = format!("{}_response", method.replace('.', "_"));
        let body = format!("{{\"{key}\":{inner},\"sign\":\"{sign}\"}}");
        (
            StatusCode::OK,
            [("Content-Type", "application/json;charset=utf-8")],
            body,
        )
            .into_response()
    }

    fn new_order(
        &self,
        st: &mut crate::core::State,
        no: &str,
        fen: i64,
        kind: OrderKind,
        notify: Option<String>,
    ) {
        let script = st
            .scripts
            .get(no)
            .cloned()
            .unwrap_or_else(|| st.amount_script(fen));
        st.orders.insert(
            no.to_string(),
            Order {
                out_trade_no: no.to_string(),
                amount_fen: fen,
                kind,
                state: OrderState::NotPaid,
                exists: kind != OrderKind::Qr,
                trade_no: self.core.number("2026"),
                created_at_ms: self.core.now_ms(),
                paid_at_ms: None,
                notify_url: notify,
                extra: BTreeMap::new(),
                script,
                refunds: Vec::new(),
                cancels: 0,
                expires_at_ms: None,
            },
        );
    }

    fn trade_status(o: &Order) -> &'static str {
        match o.state {
            OrderState::NotPaid | OrderState::Paying(_) => "WAIT_BUYER_PAY",
            OrderState::Paid if o.refunded_fen() >= o.amount_fen => "TRADE_CLOSED",
            OrderState::Paid => "TRADE_SUCCESS",
            _ => "TRADE_CLOSED",
        }
    }

    fn dispatch(&self, method: &str, p: &BTreeMap<String, String>) -> (Value, u64) {
        let biz: Value =
            serde_json::from_str(p.get("biz_content").map(String::as_str).unwrap_or("{}"))
                .unwrap_or(Value::Null);
        let no = biz["out_trade_no"].as_str().unwrap_or("").to_string();
        let notify = p.get("notify_url").cloned();
        let now = self.core.now_ms();
        let mut st = self.core.lock();
        match method {
            "alipay.trade.precreate" | "alipay.trade.pay" => {
                let Some(fen) = biz["total_amount"].as_str().and_then(crypto::fen) else {
                    return (
                        json!({"code": "40002", "msg": "Invalid Arguments", "sub_code": "isv.invalid-parameter"}),
                        0,
                    );
                };
                let fallback = st.amount_script(fen);
                let script = st.scripts.entry(no.clone()).or_insert(fallback);
                if script.server_errors > 0 {
                    script.server_errors -= 1;
                    return (Value::Null, 0);
                }
                let script = script.clone();
                let code = method == "alipay.trade.pay";
                if !st.orders.contains_key(&no) {
                    self.new_order(
                        &mut st,
                        &no,
                        fen,
                        if code { OrderKind::Code } else { OrderKind::Qr },
                        notify,
                    );
                    if code {
                        if script.fail && script.user_paying_queries == 0 {
                            if let Some(o) = st.orders.get_mut(&no) {
                                o.state = OrderState::Failed;
                            }
                            return (fail("ACQ.BUYER_BALANCE_NOT_ENOUGH", "买家余额不足"), 0);
                        } else if script.user_paying_queries > 0 {
                            if let Some(o) = st.orders.get_mut(&no) {
                                o.state = OrderState::Paying(script.user_paying_queries);
                            }
                        } else {
                            let subject = biz["subject"].as_str().unwrap_or("").to_string();
                            self.core.pay(&mut st, &no, &subject, false);
                        }
                    }
                }
                let Some(o) = st.orders.get(&no) else {
                    return (
                        json!({"code": "20000", "msg": "Service Currently Unavailable", "sub_code": "isp.unknow-error"}),
                        0,
                    );
                };
                let v = if !code {
                    ok(
                        json!({"out_trade_no": no, "qr_code": format!("https://qr.alipay.com/{}", o.trade_no)}),
                    )
                } else {
                    match o.state {
                        OrderState::Paid => ok(
                            json!({"out_trade_no": no, "trade_no": o.trade_no, "total_amount": crypto::yuan(o.amount_fen), "gmt_payment": crypto::spaced(o.paid_at_ms.unwrap_or(now))}),
                        ),
                        OrderState::Paying(_) => {
                            json!({"code": "10003", "msg": "order success pay inprocess", "out_trade_no": no, "trade_no": o.trade_no})
                        }
                        _ => fail("ACQ.TRADE_HAS_CLOSE", "交易已关闭"),
                    }
                };
                (v, script.hang_ms)
            }
            "alipay.trade.query" => {
                // Before the existence check: a gateway error says nothing about the trade.
                if let Some(o) = st.orders.get_mut(&no) {
                    if o.script.query_errors > 0 {
                        o.script.query_errors -= 1;
                        return (Value::Null, 0);
                    }
                }
                let Some(o) = st.orders.get_mut(&no).filter(|o| o.exists) else {
                    return (fail("ACQ.TRADE_NOT_EXIST", "交易不存在"), 0);
                };
                if let OrderState::Paying(n) = o.state {
                    if n > 0 {
                        o.state = OrderState::Paying(n - 1);
                    } else if o.script.fail {
                        o.state = OrderState::Failed;
                    } else {
                        self.core.pay(&mut st, &no, "", false);
                    }
                }
                let Some(o) = st.orders.get(&no) else {
                    return (fail("ACQ.TRADE_NOT_EXIST", "交易不存在"), 0);
                };
                let mut v = ok(
                    json!({"out_trade_no": no, "trade_no": o.trade_no, "trade_status": Self::trade_status(o), "total_amount": crypto::yuan(o.amount_fen)}),
                );
                if let Some(at) = o.paid_at_ms {
                    v["send_pay_date"] = json!(crypto::spaced(at));
                }
                (v, 0)
            }
            "alipay.trade.close" => {
                let Some(o) = st.orders.get_mut(&no).filter(|o| o.exists) else {
                    return (fail("ACQ.TRADE_NOT_EXIST", "交易不存在"), 0);
                };
                match o.state {
                    OrderState::NotPaid | OrderState::Paying(_) => {
                        o.state = OrderState::Closed;
                        (ok(json!({"out_trade_no": no, "trade_no": o.trade_no})), 0)
                    }
                    OrderState::Closed => (ok(json!({"out_trade_no": no})), 0),
                    _ => (fail("ACQ.TRADE_STATUS_ERROR", "交易状态不合法"), 0),
                }
            }
            "alipay.trade.cancel" => {
                if !st.orders.contains_key(&no) {
                    // Cancelling an order number that has no trade voids it: a later scan fails.
                    self.new_order(&mut st, &no, 0, OrderKind::Qr, None);
                }
                let Some(o) = st.orders.get_mut(&no) else {
                    return (fail("ACQ.SYSTEM_ERROR", "系统错误"), 0);
                };
                o.cancels += 1;
                if o.cancels <= o.script.cancel_retries {
                    let mut v = fail("ACQ.SYSTEM_ERROR", "系统错误");
                    v["retry_flag"] = json!("Y");
                    return (v, 0);
                }
                if now - o.created_at_ms > 86_400_000 {
                    return (fail("ACQ.TRADE_CANCEL_TIME_OUT", "超过撤销时限"), 0);
                }
                let was_paid = o.state == OrderState::Paid;
                let remaining = o.amount_fen - o.refunded_fen();
                o.exists = true;
                o.state = OrderState::Revoked;
                if was_paid && remaining > 0 {
                    let trade_no = o.trade_no.clone();
                    let r = Refund {
                        out_refund_no: trade_no.clone(),
                        refund_no: String::new(),
                        amount_fen: remaining,
                        at_ms: now,
                        time_text: None,
                    };
                    self.core.record_refund(&mut st, &no, r, true);
                }
                (
                    ok(
                        json!({"out_trade_no": no, "retry_flag": "N", "action": if was_paid { "refund" } else { "close" }}),
                    ),
                    0,
                )
            }
            "alipay.trade.refund" => {
                let req_no = biz["out_request_no"].as_str().unwrap_or(&no).to_string();
                let Some(amount) = biz["refund_amount"].as_str().and_then(crypto::fen) else {
                    return (
                        json!({"code": "40002", "msg": "Invalid Arguments", "sub_code": "isv.invalid-parameter"}),
                        0,
                    );
                };
                let Some(o) = st.orders.get(&no).filter(|o| o.exists).cloned() else {
                    return (fail("ACQ.TRADE_NOT_EXIST", "交易不存在"), 0);
                };
                if let Some(r) = o.refunds.iter().find(|r| r.out_refund_no == req_no) {
                    if r.amount_fen != amount {
                        return (fail("ACQ.DISCORDANT_REPEAT_REQUEST", "请求信息不一致"), 0);
                    }
                    return (
                        ok(
                            json!({"out_trade_no": no, "trade_no": o.trade_no, "fund_change": "N", "refund_fee": crypto::yuan(o.refunded_fen())}),
                        ),
                        0,
                    );
                }
                if o.state != OrderState::Paid || o.refunded_fen() >= o.amount_fen {
                    return (fail("ACQ.TRADE_STATUS_ERROR", "交易状态不合法"), 0);
                }
                if amount <= 0 || amount > o.amount_fen - o.refunded_fen() {
                    return (fail("ACQ.REFUND_AMT_NOT_EQUAL_TOTAL", "退款金额超限"), 0);
                }
                let r = Refund {
                    out_refund_no: req_no.clone(),
                    refund_no: String::new(),
                    amount_fen: amount,
                    at_ms: now,
                    time_text: None,
                };
                self.core.record_refund(&mut st, &no, r, false);
                // A partial refund re-notifies TRADE_SUCCESS; a full one TRADE_CLOSED.
                if let Some(url) = o.notify_url.clone() {
                    self.core.enqueue(
                        &mut st,
                        &url,
                        NotifyEvent::Refunded {
                            out_trade_no: no.clone(),
                            out_refund_no: req_no,
                        },
                    );
                }
                let total = o.refunded_fen() + amount;
                (
                    ok(
                        json!({"out_trade_no": no, "trade_no": o.trade_no, "fund_change": "Y", "refund_fee": crypto::yuan(total), "gmt_refund_pay": crypto::spaced(now)}),
                    ),
                    0,
                )
            }
            "alipay.trade.fastpay.refund.query" => {
                let req_no = biz["out_request_no"].as_str().unwrap_or("");
                let found = st.orders.get(&no).and_then(|o| {
                    o.refunds
                        .iter()
                        .find(|r| r.out_refund_no == req_no)
                        .map(|r| (o.clone(), r.clone()))
                });
                match found {
                    Some((o, r)) => (
                        ok(
                            json!({"out_trade_no": no, "trade_no": o.trade_no, "out_request_no": req_no, "total_amount": crypto::yuan(o.amount_fen), "refund_amount": crypto::yuan(r.amount_fen), "refund_status": "REFUND_SUCCESS", "gmt_refund_pay": crypto::spaced(r.at_ms)}),
                        ),
                        0,
                    ),
                    None => (ok(json!({"out_trade_no": no, "out_request_no": req_no})), 0),
                }
            }
            "alipay.data.dataservice.bill.downloadurl.query" => {
                let date = biz["bill_date"].as_str().unwrap_or("").to_string();
                if date.as_str() >= crypto::day(now).as_str() {
                    return (fail("isp.bill_not_exist", "账单不存在"), 0);
                }
                (
                    ok(
                        json!({"bill_download_url": format!("{}/__bill/alipay?date={date}", self.base_url)}),
                    ),
                    0,
                )
            }
            _ => (
                json!({"code": "40004", "msg": "Business Failed", "sub_code": "isv.invalid-method"}),
                0,
            ),
        }
    }

    /// The zip of GBK CSVs for one day.
    pub fn bill_zip(&self, date: &str) -> Vec<u8> {
        let lines: Vec<_> = self
            .core
            .ledger()
            .into_iter()
            .filter(|l| crypto::day(l.at_ms) == date)
            .collect();
        let mut csv = String::new();
        csv.push_str(&format!("#支付宝业务明细查询\r\n#账号：[{}]\r\n#起始日期：[{date} 00:00:00]   终止日期：[{date} 23:59:59]\r\n", self.seller_id));
        csv.push_str("#-----------------------------------------业务明细列表----------------------------------------\r\n");
        csv.push_str("支付宝交易号,商户订单号,业务类型,商品名称,创建时间,完成时间,门店编号,门店名称,操作员,终端号,对方账户,订单金额（元）,商家实收（元）,支付宝红包（元）,集分宝（元）,支付宝优惠（元）,商家优惠（元）,券核销金额（元）,券名称,商家红包消费金额（元）,卡消费金额（元）,退款批次号/请求号,服务费（元）,分润（元）,备注\r\n");
        let (mut np, mut sp, mut nr, mut sr) = (0, 0i64, 0, 0i64);
        for l in &lines {
            let signed = if l.refund {
                -l.amount_fen
            } else {
                l.amount_fen
            };
            if l.refund {
                nr += 1;
                sr += signed;
            } else {
                np += 1;
                sp += signed;
            }
            let t = crypto::spaced(l.at_ms);
            let cols = [
                format!("{}\t", l.trade_no),
                format!("{}\t", l.out_trade_no),
                if l.refund {
                    "退款".into()
                } else {
                    "交易".into()
                },
                l.subject.clone(),
                t.clone(),
                t,
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                "buyer@example.com".into(),
                crypto::yuan(signed),
                crypto::yuan(signed),
                "0.00".into(),
                "0.00".into(),
                "0.00".into(),
                "0.00".into(),
                "0.00".into(),
                String::new(),
                "0.00".into(),
                "0.00".into(),
                if l.refund {
                    format!("{}\t", l.out_refund_no)
                } else {
                    String::new()
                },
                crypto::yuan(-l.fee_fen),
                "0.00".into(),
                String::new(),
            ];
            csv.push_str(&cols.join(","));
            csv.push_str("\r\n");
        }
        csv.push_str("#-----------------------------------------业务明细列表结束------------------------------------\r\n");
        csv.push_str(&format!(
            "#交易合计：{np}笔，商家实收共{}元，商家优惠共0.00元\r\n",
            crypto::yuan(sp)
        ));
        csv.push_str(&format!(
            "#退款合计：{nr}笔，商家实收共{}元，商家优惠共0.00元\r\n",
            crypto::yuan(sr)
        ));
        csv.push_str(&format!(
            "#导出时间：[{}]\r\n",
            crypto::spaced(self.core.now_ms())
        ));
        let (gbk, _, _) = encoding_rs::GBK.encode(&csv);
        let compact_date = date.replace('-', "");
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let detail = format!("{}_{compact_date}_业务明细.csv", self.seller_id);
        let summary = format!("{}_{compact_date}_业务明细(汇总).csv", self.seller_id);
        let summary_csv = format!(
            "#支付宝业务汇总查询\r\n交易笔数,商家实收（元）\r\n{np},{}\r\n",
            crypto::yuan(sp)
        );
        let (summary_gbk, _, _) = encoding_rs::GBK.encode(&summary_csv);
        let write = || -> Result<Vec<u8>, zip::result::ZipError> {
            zip.start_file(detail.as_str(), opts)?;
            zip.write_all(&gbk)?;
            zip.start_file(summary.as_str(), opts)?;
            zip.write_all(&summary_gbk)?;
            Ok(zip.finish()?.into_inner())
        };
        write().unwrap_or_default()
    }

    async fn handle(self: Arc<Self>, method: Method, uri: Uri, body: Bytes) -> Response {
        if uri.path() == "/__bill/alipay" {
            let q: BTreeMap<String, String> =
                serde_urlencoded::from_str(uri.query().unwrap_or("")).unwrap_or_default();
            return (
                StatusCode::OK,
                [("Content-Type", "application/zip")],
                self.bill_zip(q.get("date").map(String::as_str).unwrap_or("")),
            )
                .into_response();
        }
        if uri.path() != "/gateway.do" {
            return StatusCode::NOT_FOUND.into_response();
        }
        let raw: &[u8] = if method == Method::GET {
            uri.query().unwrap_or("").as_bytes()
        } else {
            &body
        };
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(raw).unwrap_or_default();
        let p: BTreeMap<String, String> = pairs.into_iter().collect();
        let api = p.get("method").cloned().unwrap_or_default();
        let signed_ok = p.get("sign").is_some_and(|s| {
            self.merchant
                .verify(sorted_content(&p, &["sign"]).as_bytes(), s)
        });
        if !signed_ok || p.get("app_id") != Some(&self.app_id) {
            return self.respond(&api, json!({"code": "40002", "msg": "Invalid Arguments", "sub_code": "isv.invalid-signature", "sub_msg": "验签出错"}));
        }
        if api == "alipay.trade.wap.pay" {
            // The payer's browser opened the cashier page: the trade now exists, unpaid.
            let biz: Value =
                serde_json::from_str(p.get("biz_content").map(String::as_str).unwrap_or("{}"))
                    .unwrap_or(Value::Null);
            let no = biz["out_trade_no"].as_str().unwrap_or("").to_string();
            let fen = biz["total_amount"]
                .as_str()
                .and_then(crypto::fen)
                .unwrap_or(0);
            let mut st = self.core.lock();
            if !st.orders.contains_key(&no) && fen > 0 {
                self.new_order(
                    &mut st,
                    &no,
                    fen,
                    OrderKind::Page,
                    p.get("notify_url").cloned(),
                );
            }
            return (
                StatusCode::OK,
                [("Content-Type", "text/html; charset=utf-8")],
                format!("<html><body>emulated Alipay cashier for {no}</body></html>"),
            )
                .into_response();
        }
        let (v, hang) = self.dispatch(&api, &p);
        if hang > 0 {
            tokio::time::sleep(Duration::from_millis(hang)).await;
        }
        if v.is_null() {
            return (StatusCode::INTERNAL_SERVER_ERROR, "upstream error").into_response();
        }
        self.respond(&api, v)
    }

    fn form(&self, mut p: BTreeMap<String, String>) -> Rendered {
        let sign = self
            .keys
            .sign(sorted_content(&p, &["sign", "sign_type"]).as_bytes());
        p.insert("sign".into(), sign);
        Rendered {
            content_type: "application/x-www-form-urlencoded; charset=utf-8",
            headers: Vec::new(),
            body: serde_urlencoded::to_string(&p)
                .unwrap_or_default()
                .into_bytes(),
        }
    }
}

impl NotifyProtocol for AlipayEmu {
    fn render(&self, core: &Core, event: &NotifyEvent, notify_id: &str) -> Option<Rendered> {
        let o = core.order(event.out_trade_no())?;
        let mut m: Map<String, Value> = Map::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), Value::String(v));
        };
        put("notify_time", crypto::spaced(core.now_ms()));
        put("notify_type", "trade_status_sync".into());
        put("notify_id", format!("2026{notify_id}"));
        put("app_id", self.app_id.clone());
        put("charset", "utf-8".into());
        put("version", "1.0".into());
        put("sign_type", "RSA2".into());
        put("trade_no", o.trade_no.clone());
        put("out_trade_no", o.out_trade_no.clone());
        put("seller_id", self.seller_id.clone());
        put("total_amount", crypto::yuan(o.amount_fen));
        put("receipt_amount", crypto::yuan(o.amount_fen));
        put("gmt_create", crypto::spaced(o.created_at_ms));
        if let Some(at) = o.paid_at_ms {
            put("gmt_payment", crypto::spaced(at));
        }
        match event {
            NotifyEvent::Paid { .. } => put("trade_status", "TRADE_SUCCESS".into()),
            NotifyEvent::Tampered { amount_fen, .. } => {
                put("trade_status", "TRADE_SUCCESS".into());
                put("total_amount", crypto::yuan(*amount_fen));
            }
            NotifyEvent::Contradiction { .. } => {
                put("trade_status", "TRADE_CLOSED".into());
                put("gmt_close", crypto::spaced(core.now_ms()));
            }
            NotifyEvent::Refunded { out_refund_no, .. } => {
                let upto = o
                    .refunds
                    .iter()
                    .position(|r| &r.out_refund_no == out_refund_no)?;
                let total: i64 = o.refunds[..=upto].iter().map(|r| r.amount_fen).sum();
                let full = total >= o.amount_fen;
                put(
                    "trade_status",
                    if full {
                        "TRADE_CLOSED".into()
                    } else {
                        "TRADE_SUCCESS".into()
                    },
                );
                put("refund_fee", crypto::yuan(total));
                put("out_biz_no", out_refund_no.clone());
                put("gmt_refund", crypto::spaced(o.refunds[upto].at_ms));
            }
            NotifyEvent::Revoked { .. } => return None,
        }
        let p: BTreeMap<String, String> = m
            .into_iter()
            .map(|(k, v)| (k, v.as_str().unwrap_or("").to_string()))
            .collect();
        Some(self.form(p))
    }

    fn acked(&self, status: u16, body: &[u8]) -> bool {
        status == 200 && body.trim_ascii() == b"success"
    }

    fn schedule_ms(&self) -> &'static [i64] {
        &SCHEDULE_MS
    }
}

impl Protocol for AlipayEmu {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .fallback(|State(s): State<Arc<AlipayEmu>>, method: Method, uri: Uri, body: Bytes| async move { s.handle(method, uri, body).await })
            .with_state(self)
    }
}
