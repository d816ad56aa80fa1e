//! The UnionPay ACP 5.1.0 side: front (browser) consume, back-end payment-code consume, revoke,
//! refund, query with `origRespCode`, back-URL notifications (retried at 1, 2, 4, 5 min until
//! HTTP 200/302), and the reconciliation file.

use crate::core::{
    Core, NotifyEvent, NotifyProtocol, Order, OrderKind, OrderState, Refund, Rendered,
};
use crate::crypto::{self, KeyPair, PublicKey};
use crate::{EmulatorConfig, Protocol};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine as _;
use sha2::Digest;
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

type Form = BTreeMap<String, String>;

pub struct UnionPayEmu {
    mer_id: String,
    keys: KeyPair,
    merchant: PublicKey,
    core: Arc<Core>,
}

pub const SCHEDULE_MS: [i64; 4] = [60_000, 120_000, 240_000, 300_000];

/// The reconciliation file's field widths (docs/channels.md), one space between fields.
pub const WIDTHS: [usize; 12] = [3, 11, 11, 6, 10, 19, 12, 15, 40, 21, 21, 13];

fn digest_hex(f: &Form) -> String {
    let content: Vec<String> = f
        .iter()
        .filter(|(k, _)| *k != "signature")
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    hex::encode(sha2::Sha256::digest(content.join("&").as_bytes()))
}

impl UnionPayEmu {
    pub fn new(
        cfg: &EmulatorConfig,
        keys: KeyPair,
        merchant: PublicKey,
        core: Arc<Core>,
    ) -> UnionPayEmu {
        UnionPayEmu {
            mer_id: cfg.merchant_id.clone(),
            keys,
            merchant,
            core,
        }
    }

    fn sign(&self, mut f: Form) -> Form {
        f.insert(
            "signature".into(),
            self.keys.sign(digest_hex(&f).as_bytes()),
        );
        f
    }

    fn answer(&self, req: &Form, resp_code: &str, msg: &str, extra: &[(&str, String)]) -> Response {
        let mut f = Form::new();
        for k in [
            "version",
            "encoding",
            "signMethod",
            "txnType",
            "txnSubType",
            "bizType",
            "accessType",
            "merId",
            "orderId",
            "txnTime",
        ] {
            if let Some(v) = req.get(k) {
                f.insert(k.into(), v.clone());
            }
        }
        f.insert("certId".into(), "69042905377".into());
        f.insert("respCode".into(), resp_code.into());
        f.insert("respMsg".into(), msg.into());
        for (k, v) in extra {
            f.insert((*k).into(), v.clone());
        }
        let body = serde_urlencoded::to_string(self.sign(f)).unwrap_or_default();
        (
            StatusCode::OK,
            [(
                "Content-Type",
                "application/x-www-form-urlencoded;charset=UTF-8",
            )],
            body,
        )
            .into_response()
    }

    fn new_order(
        &self,
        st: &mut crate::core::State,
        req: &Form,
        kind: OrderKind,
    ) -> Option<String> {
        let no = req.get("orderId")?.clone();
        let fen: i64 = req.get("txnAmt")?.parse().ok()?;
        let script = st
            .scripts
            .get(&no)
            .cloned()
            .unwrap_or_else(|| st.amount_script(fen));
        let mut extra = BTreeMap::new();
        for k in ["txnTime", "reqReserved"] {
            extra.insert(k.to_string(), req.get(k).cloned().unwrap_or_default());
        }
        // After `payTimeout` the order can no longer be paid (`scan` refuses).
        let expires_at_ms = req.get("payTimeout").and_then(|t| crypto::parse_compact(t));
        st.orders.entry(no.clone()).or_insert_with(|| Order {
            out_trade_no: no.clone(),
            amount_fen: fen,
            kind,
            state: OrderState::NotPaid,
            exists: true,
            trade_no: self.core.number("6"),
            created_at_ms: self.core.now_ms(),
            paid_at_ms: None,
            notify_url: req.get("backUrl").cloned(),
            extra,
            script,
            refunds: Vec::new(),
            cancels: 0,
            expires_at_ms,
        });
        Some(no)
    }

    fn by_query_id(st: &crate::core::State, query_id: &str) -> Option<String> {
        st.orders
            .values()
            .find(|o| o.trade_no == query_id)
            .map(|o| o.out_trade_no.clone())
    }

    async fn back(&self, req: Form) -> Response {
        let now = self.core.now_ms();
        let txn = req.get("txnType").cloned().unwrap_or_default();
        let (resp, hang) = {
            let mut st = self.core.lock();
            match txn.as_str() {
                "01" => {
                    let no = req.get("orderId").cloned().unwrap_or_default();
                    let fen: i64 = req.get("txnAmt").and_then(|a| a.parse().ok()).unwrap_or(0);
                    let fallback = st.amount_script(fen);
                    let script = st.scripts.entry(no.clone()).or_insert(fallback);
                    if script.server_errors > 0 {
                        script.server_errors -= 1;
                        return (StatusCode::INTERNAL_SERVER_ERROR, "error").into_response();
                    }
                    let script = script.clone();
                    let fresh = !st.orders.contains_key(&no);
                    let Some(no) = self.new_order(&mut st, &req, OrderKind::Code) else {
                        return self.answer(&req, "30", "报文格式错误", &[]);
                    };
                    if fresh {
                        if script.fail && script.user_paying_queries == 0 {
                            if let Some(o) = st.orders.get_mut(&no) {
                                o.state = OrderState::Failed;
                            }
                        } else if script.user_paying_queries > 0 {
                            if let Some(o) = st.orders.get_mut(&no) {
                                o.state = OrderState::Paying(script.user_paying_queries);
                            }
                        } else {
                            self.core.pay(&mut st, &no, "", true);
                        }
                    } else {
                        return self.answer(&req, "12", "重复交易", &[]);
                    }
                    let o = st.orders.get(&no).cloned();
                    match o {
                        Some(o) if o.state == OrderState::Failed => {
                            (("01", "交易失败，余额不足".to_string(), vec![]), 0)
                        }
                        Some(o) => (
                            (
                                "00",
                                "成功[0000000]".to_string(),
                                vec![("queryId", o.trade_no)],
                            ),
                            script.hang_ms,
                        ),
                        None => (("06", "系统错误".to_string(), vec![]), 0),
                    }
                }
                "31" | "04" => {
                    let orig = req.get("origQryId").cloned().unwrap_or_default();
                    let order_id = req.get("orderId").cloned().unwrap_or_default();
                    let amount: i64 = req.get("txnAmt").and_then(|a| a.parse().ok()).unwrap_or(0);
                    let Some(no) = Self::by_query_id(&st, &orig) else {
                        return self.answer(&req, "35", "原交易不存在", &[]);
                    };
                    let Some(o) = st.orders.get_mut(&no) else {
                        return self.answer(&req, "35", "原交易不存在", &[]);
                    };
                    if o.refunds.iter().any(|r| r.out_refund_no == order_id) {
                        return self.answer(&req, "12", "重复交易", &[]);
                    }
                    if o.state != OrderState::Paid {
                        return self.answer(&req, "35", "原交易状态不正确", &[]);
                    }
                    let remaining = o.amount_fen - o.refunded_fen();
                    let revoke = txn == "31";
                    if revoke {
                        o.cancels += 1;
                        if o.cancels <= o.script.cancel_retries {
                            return self.answer(&req, "05", "交易处理中", &[]);
                        }
                        if crypto::day(o.paid_at_ms.unwrap_or(0)) != crypto::day(now)
                            || amount != o.amount_fen
                        {
                            return self.answer(&req, "36", "撤销仅限当日全额", &[]);
                        }
                        o.state = OrderState::Revoked;
                    } else if amount <= 0 || amount > remaining {
                        return self.answer(&req, "33", "退货金额超限", &[]);
                    }
                    let r = Refund {
                        out_refund_no: order_id.clone(),
                        refund_no: self.core.number("7"),
                        amount_fen: if revoke { remaining } else { amount },
                        at_ms: now,
                        time_text: req.get("txnTime").cloned(),
                    };
                    let query_id = r.refund_no.clone();
                    let reserved = req.get("reqReserved").cloned().unwrap_or_default();
                    let url = req.get("backUrl").cloned();
                    self.core.record_refund(&mut st, &no, r, revoke);
                    if let Some(o) = st.orders.get_mut(&no) {
                        o.extra.insert(format!("reserved:{order_id}"), reserved);
                    }
                    if let Some(url) = url {
                        let ev = if revoke {
                            NotifyEvent::Revoked {
                                out_trade_no: no.clone(),
                            }
                        } else {
                            NotifyEvent::Refunded {
                                out_trade_no: no.clone(),
                                out_refund_no: order_id,
                            }
                        };
                        self.core.enqueue(&mut st, &url, ev);
                    }
                    (
                        (
                            "00",
                            "成功[0000000]".to_string(),
                            vec![("queryId", query_id), ("origQryId", orig)],
                        ),
                        0,
                    )
                }
                _ => (("30", "报文格式错误".to_string(), vec![]), 0),
            }
        };
        if hang > 0 {
            tokio::time::sleep(Duration::from_millis(hang)).await;
        }
        let (code, msg, extra) = resp;
        let extra: Vec<(&str, String)> = extra.into_iter().collect();
        self.answer(&req, code, &msg, &extra)
    }

    fn query(&self, req: &Form) -> Response {
        let order_id = req.get("orderId").cloned().unwrap_or_default();
        let txn_time = req.get("txnTime").cloned().unwrap_or_default();
        let mut st = self.core.lock();
        // A refund or revoke order?
        let refund = st.orders.values().find_map(|o| {
            o.refunds
                .iter()
                .find(|r| r.out_refund_no == order_id)
                .map(|r| (o.amount_fen, r.clone()))
        });
        if let Some((_, r)) = refund {
            if r.time_text.as_deref() != Some(txn_time.as_str()) {
                return self.answer(req, "34", "查无此交易", &[]);
            }
            return self.answer(
                req,
                "00",
                "成功",
                &[
                    ("origRespCode", "00".into()),
                    ("origRespMsg", "成功".into()),
                    ("queryId", r.refund_no),
                    ("txnAmt", r.amount_fen.to_string()),
                ],
            );
        }
        let Some(o) = st.orders.get_mut(&order_id) else {
            return self.answer(req, "34", "查无此交易", &[]);
        };
        // An order never paid has no transaction at UnionPay: `34`, before its `payTimeout`
        // and after it alike. ACP has no "closed" answer; only the reconciliation file says
        // definitely that nothing was paid (docs/channels.md).
        if o.script.query_errors > 0 {
            o.script.query_errors -= 1;
            return (StatusCode::INTERNAL_SERVER_ERROR, "error").into_response();
        }
        if o.extra.get("txnTime") != Some(&txn_time) || o.state == OrderState::NotPaid {
            return self.answer(req, "34", "查无此交易", &[]);
        }
        if let OrderState::Paying(n) = o.state {
            if n > 0 {
                o.state = OrderState::Paying(n - 1);
            } else if o.script.fail {
                o.state = OrderState::Failed;
            } else {
                self.core.pay(&mut st, &order_id, "", true);
            }
        }
        let Some(o) = st.orders.get(&order_id).cloned() else {
            return self.answer(req, "34", "查无此交易", &[]);
        };
        let (orig, msg) = match o.state {
            OrderState::Paid | OrderState::Revoked => ("00", "成功"),
            OrderState::Paying(_) => ("05", "交易处理中"),
            _ => ("01", "交易失败"),
        };
        self.answer(
            req,
            "00",
            "成功",
            &[
                ("origRespCode", orig.into()),
                ("origRespMsg", msg.into()),
                ("queryId", o.trade_no.clone()),
                ("txnAmt", o.amount_fen.to_string()),
            ],
        )
    }

    /// The ACOMN-style file of one Beijing day (`yyyy-MM-dd`), zipped, zlib'd, base64'd.
    pub fn file_content(&self, date: &str) -> (String, String) {
        let mut text = String::new();
        for (i, l) in self
            .core
            .ledger()
            .into_iter()
            .filter(|l| crypto::day(l.at_ms) == date)
            .enumerate()
        {
            let (_, mo, d, h, mi, s) = crypto::beijing_parts(l.at_ms);
            let code = if !l.refund {
                "S22"
            } else if l.revoked {
                "S30"
            } else {
                "R22"
            };
            let fee = if l.fee_fen >= 0 {
                format!("D{:012}", l.fee_fen)
            } else {
                format!("C{:012}", -l.fee_fen)
            };
            let fields = [
                code.to_string(),
                "00010000".into(),
                "00010000".into(),
                format!("{:06}", i + 1),
                format!("{mo:02}{d:02}{h:02}{mi:02}{s:02}"),
                "6216***********0018".into(),
                format!("{:012}", l.amount_fen),
                self.mer_id.clone(),
                if l.refund {
                    l.out_refund_no.clone()
                } else {
                    l.out_trade_no.clone()
                },
                if l.refund {
                    l.refund_no.clone()
                } else {
                    l.trade_no.clone()
                },
                if l.refund {
                    l.trade_no.clone()
                } else {
                    String::new()
                },
                fee,
            ];
            let padded: Vec<String> = fields
                .iter()
                .zip(WIDTHS)
                .map(|(f, w)| format!("{f:<w$}"))
                .collect();
            text.push_str(&padded.join(" "));
            text.push_str("\r\n");
        }
        let yymmdd = format!("{}{}{}", &date[2..4], &date[5..7], &date[8..10]);
        let name = format!("INN{yymmdd}88ZM_{}", self.mer_id);
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        let zipped = (|| -> Result<Vec<u8>, zip::result::ZipError> {
            zip.start_file(name.as_str(), opts)?;
            zip.write_all(text.as_bytes())?;
            Ok(zip.finish()?.into_inner())
        })()
        .unwrap_or_default();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = z.write_all(&zipped);
        let deflated = z.finish().unwrap_or_default();
        (
            format!("{name}.zip"),
            base64::engine::general_purpose::STANDARD.encode(deflated),
        )
    }

    async fn handle(self: Arc<Self>, uri: Uri, body: Bytes) -> Response {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
        let req: Form = pairs.into_iter().collect();
        let signed = req
            .get("signature")
            .is_some_and(|s| self.merchant.verify(digest_hex(&req).as_bytes(), s));
        if !signed || req.get("merId") != Some(&self.mer_id) {
            return self.answer(&req, "11", "验证签名失败", &[]);
        }
        match uri.path() {
            "/gateway/api/frontTransReq.do" => {
                let now = self.core.now_ms();
                let timeout = req.get("payTimeout").map(|t| crypto::parse_compact(t));
                if let Some(t) = timeout {
                    // A payTimeout that does not parse, or has passed: no cashier.
                    if t.is_none_or(|t| now >= t) {
                        return (
                            StatusCode::OK,
                            [("Content-Type", "text/html; charset=utf-8")],
                            "<html><body>交易已超时 (payTimeout passed): the order can no longer be paid</body></html>",
                        )
                            .into_response();
                    }
                }
                // The payer's browser reached the cashier: the order exists, unpaid.
                let mut st = self.core.lock();
                let no = self
                    .new_order(&mut st, &req, OrderKind::Page)
                    .unwrap_or_default();
                (
                    StatusCode::OK,
                    [("Content-Type", "text/html; charset=utf-8")],
                    format!("<html><body>emulated UnionPay cashier for {no}</body></html>"),
                )
                    .into_response()
            }
            "/gateway/api/backTransReq.do" => self.back(req).await,
            "/gateway/api/queryTrans.do" => self.query(&req),
            "/gateway/api/fileTransRequest.do" => {
                let settle = req.get("settleDate").cloned().unwrap_or_default();
                let today = crypto::day(self.core.now_ms());
                // MMDD of this year or last.
                let year: i32 = today[..4].parse().unwrap_or(1970);
                let mmdd = format!("{}{}", &today[5..7], &today[8..10]);
                let y = if settle > mmdd { year - 1 } else { year };
                let date = format!(
                    "{y:04}-{}-{}",
                    settle.get(..2).unwrap_or("01"),
                    settle.get(2..4).unwrap_or("01")
                );
                if date >= today {
                    return self.answer(&req, "98", "文件不存在", &[]);
                }
                let (name, content) = self.file_content(&date);
                self.answer(
                    &req,
                    "00",
                    "成功",
                    &[
                        ("fileName", name),
                        ("fileContent", content),
                        ("settleDate", settle),
                    ],
                )
            }
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    }
}

impl NotifyProtocol for UnionPayEmu {
    fn render(&self, core: &Core, event: &NotifyEvent, _notify_id: &str) -> Option<Rendered> {
        let o = core.order(event.out_trade_no())?;
        let mut f = Form::new();
        for (k, v) in [
            ("version", "5.1.0"),
            ("encoding", "UTF-8"),
            ("signMethod", "01"),
            ("bizType", "000201"),
            ("accessType", "0"),
            ("currencyCode", "156"),
            ("txnSubType", "01"),
        ] {
            f.insert(k.into(), v.into());
        }
        f.insert("merId".into(), self.mer_id.clone());
        f.insert("certId".into(), "69042905377".into());
        f.insert("respMsg".into(), "成功[0000000]".into());
        f.insert("respCode".into(), "00".into());
        let reserved = o.extra.get("reqReserved").cloned().unwrap_or_default();
        match event {
            NotifyEvent::Paid { .. }
            | NotifyEvent::Tampered { .. }
            | NotifyEvent::Contradiction { .. } => {
                f.insert("txnType".into(), "01".into());
                f.insert("orderId".into(), o.out_trade_no.clone());
                f.insert(
                    "txnTime".into(),
                    o.extra.get("txnTime").cloned().unwrap_or_default(),
                );
                f.insert("queryId".into(), o.trade_no.clone());
                f.insert("reqReserved".into(), reserved);
                let amt = if let NotifyEvent::Tampered { amount_fen, .. } = event {
                    *amount_fen
                } else {
                    o.amount_fen
                };
                f.insert("txnAmt".into(), amt.to_string());
                if matches!(event, NotifyEvent::Contradiction { .. }) {
                    f.insert("respCode".into(), "01".into());
                    f.insert("respMsg".into(), "交易失败".into());
                }
            }
            NotifyEvent::Refunded { out_refund_no, .. } => {
                let r = o
                    .refunds
                    .iter()
                    .find(|r| &r.out_refund_no == out_refund_no)?;
                f.insert("txnType".into(), "04".into());
                f.insert("orderId".into(), r.out_refund_no.clone());
                f.insert("txnTime".into(), r.time_text.clone().unwrap_or_default());
                f.insert("queryId".into(), r.refund_no.clone());
                f.insert("origQryId".into(), o.trade_no.clone());
                f.insert("txnAmt".into(), r.amount_fen.to_string());
                f.insert(
                    "reqReserved".into(),
                    o.extra
                        .get(&format!("reserved:{out_refund_no}"))
                        .cloned()
                        .unwrap_or_default(),
                );
            }
            NotifyEvent::Revoked { .. } => {
                let r = o.refunds.last()?;
                f.insert("txnType".into(), "31".into());
                f.insert("orderId".into(), r.out_refund_no.clone());
                f.insert("txnTime".into(), r.time_text.clone().unwrap_or_default());
                f.insert("queryId".into(), r.refund_no.clone());
                f.insert("origQryId".into(), o.trade_no.clone());
                f.insert("txnAmt".into(), r.amount_fen.to_string());
                f.insert(
                    "reqReserved".into(),
                    o.extra
                        .get(&format!("reserved:{}", r.out_refund_no))
                        .cloned()
                        .unwrap_or_default(),
                );
            }
        }
        Some(Rendered {
            content_type: "application/x-www-form-urlencoded;charset=UTF-8",
            headers: Vec::new(),
            body: serde_urlencoded::to_string(self.sign(f))
                .unwrap_or_default()
                .into_bytes(),
        })
    }

    fn acked(&self, status: u16, _body: &[u8]) -> bool {
        status == 200 || status == 302
    }

    fn schedule_ms(&self) -> &'static [i64] {
        &SCHEDULE_MS
    }
}

impl Protocol for UnionPayEmu {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .fallback(
                |State(s): State<Arc<UnionPayEmu>>, uri: Uri, body: Bytes| async move {
                    s.handle(uri, body).await
                },
            )
            .with_state(self)
    }
}
