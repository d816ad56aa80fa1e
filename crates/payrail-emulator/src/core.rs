//! What every emulated channel shares: its orders, their scripts, the advanceable clock, the
//! notification queue with the channel's retry schedule, and the ledger the bills are made of.
//! Protocol modules turn requests into calls on this and answers into the channel's format.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Per-order behaviour. Set through [`crate::EmulatorHandle::script`] or `POST /__admin/script`
/// before the order is created; otherwise chosen by the amount's last two digits
/// ([`Script::for_amount`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Script {
    /// Payment-code orders: answer "user paying" (USERPAYING / 10003 / 05) to the submit and to
    /// this many queries, then end as `fail` says.
    pub user_paying_queries: u32,
    /// The payment ends in a definite failure (payment code: at once, or after the paying
    /// queries).
    pub fail: bool,
    /// Do the work, then hold the answer this long (the caller times out although the channel
    /// succeeded).
    pub hang_ms: u64,
    /// Answer the first N order-creating calls with HTTP 500 without doing anything.
    pub server_errors: u32,
    /// Answer the first N status queries of the order with HTTP 500 (the order is untouched:
    /// what it is, the next query after them tells).
    pub query_errors: u32,
    /// Send every notification twice.
    pub duplicate_notify: bool,
    /// After the payment notification, send a later one that contradicts it (closed/failed).
    pub conflicting_notify: bool,
    /// Answer the first N cancels with "retry" (WeChat recall, Alipay retry_flag=Y).
    pub cancel_retries: u32,
    /// WeChat: the channel contradicts itself — the order's query, close and reverse answer
    /// `ORDER_NOT_EXIST` although the emulator holds the order, and its payment sends no
    /// notification; the trade bill still lists it once paid. (An order the emulator never
    /// records — a lost submission — is `server_errors`.)
    pub not_found: bool,
}

impl Script {
    /// The amount scripts (last two digits of the amount in fen):
    /// `01` fail, `02` paying for 2 queries then paid, `03` paying for 2 queries then failed,
    /// `04` hang the submit 30 s after succeeding, `05` one HTTP 500 first, `06` duplicate
    /// notifications, `07` a conflicting later notification, `08` first cancel says retry,
    /// `09` the first two status queries get HTTP 500.
    pub fn for_amount(amount_fen: i64) -> Script {
        let mut s = Script::default();
        match amount_fen.rem_euclid(100) {
            1 => s.fail = true,
            2 => s.user_paying_queries = 2,
            3 => {
                s.user_paying_queries = 2;
                s.fail = true;
            }
            4 => s.hang_ms = 30_000,
            5 => s.server_errors = 1,
            6 => s.duplicate_notify = true,
            7 => s.conflicting_notify = true,
            8 => s.cancel_retries = 1,
            9 => s.query_errors = 2,
            _ => {}
        }
        s
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OrderKind {
    /// The payer scans our QR code.
    Qr,
    /// We scan the payer's code.
    Code,
    /// The payer's browser or wallet page (H5, JSAPI, WAP, UnionPay gateway).
    Page,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum OrderState {
    NotPaid,
    /// Waiting for the payer to confirm in the wallet; this many more queries say so.
    Paying(u32),
    Paid,
    Closed,
    Revoked,
    Failed,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Refund {
    pub out_refund_no: String,
    pub refund_no: String,
    pub amount_fen: i64,
    pub at_ms: i64,
    pub time_text: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Order {
    pub out_trade_no: String,
    pub amount_fen: i64,
    pub kind: OrderKind,
    pub state: OrderState,
    /// Alipay precreate: the trade exists only after the scan.
    pub exists: bool,
    pub trade_no: String,
    pub created_at_ms: i64,
    pub paid_at_ms: Option<i64>,
    pub notify_url: Option<String>,
    /// Protocol-specific text kept with the order (UnionPay `txnTime`, `reqReserved`).
    pub extra: BTreeMap<String, String>,
    pub script: Script,
    pub refunds: Vec<Refund>,
    pub cancels: u32,
    /// After this the order can no longer be paid (UnionPay `payTimeout`); `None` = no limit
    /// kept by the emulator (WeChat and Alipay orders are closed by the merchant's close).
    pub expires_at_ms: Option<i64>,
}

impl Order {
    pub fn refunded_fen(&self) -> i64 {
        self.refunds.iter().map(|r| r.amount_fen).sum()
    }

    /// Past its `expires_at_ms` at `now_ms`: a payment attempt is refused.
    pub fn lapsed(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|t| now_ms >= t)
    }
}

/// A fault injected into bill downloads, to test the caller's integrity checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillFault {
    #[default]
    None,
    /// The file served differs from the one the (signed) answer's hash was computed over.
    AlteredFile,
    /// The (signed) answer carries no hash of the file.
    NoHash,
}

/// One line of the channel's ledger, from which bills are written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerLine {
    pub refund: bool,
    pub revoked: bool,
    pub trade_no: String,
    pub out_trade_no: String,
    pub refund_no: String,
    pub out_refund_no: String,
    pub amount_fen: i64,
    /// Positive = charged to the merchant, negative = returned.
    pub fee_fen: i64,
    pub at_ms: i64,
    pub subject: String,
}

/// The fee the emulated channel charges: 0.6 %, rounded half up.
pub fn fee_fen(amount_fen: i64) -> i64 {
    (amount_fen.saturating_mul(6).saturating_add(500)) / 1000
}

/// What a protocol needs to render one notification (re-rendered, so re-signed, every retry).
#[derive(Debug, Clone, serde::Serialize)]
pub enum NotifyEvent {
    Paid {
        out_trade_no: String,
    },
    Refunded {
        out_trade_no: String,
        out_refund_no: String,
    },
    Revoked {
        out_trade_no: String,
    },
    /// The conflicting later notification: the channel claims the order closed.
    Contradiction {
        out_trade_no: String,
    },
    /// A validly signed notification whose amount was changed before signing.
    Tampered {
        out_trade_no: String,
        amount_fen: i64,
    },
}

impl NotifyEvent {
    pub fn out_trade_no(&self) -> &str {
        match self {
            NotifyEvent::Paid { out_trade_no }
            | NotifyEvent::Refunded { out_trade_no, .. }
            | NotifyEvent::Revoked { out_trade_no }
            | NotifyEvent::Contradiction { out_trade_no }
            | NotifyEvent::Tampered { out_trade_no, .. } => out_trade_no,
        }
    }
}

/// A rendered notification request.
pub struct Rendered {
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The channel-specific half of notifications.
pub trait NotifyProtocol: Send + Sync + 'static {
    fn render(&self, core: &Core, event: &NotifyEvent, notify_id: &str) -> Option<Rendered>;
    /// Whether our endpoint's answer stops the retries.
    fn acked(&self, status: u16, body: &[u8]) -> bool;
    /// Delays after the first send, in ms.
    fn schedule_ms(&self) -> &'static [i64];
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Delivery {
    pub notification: u64,
    pub out_trade_no: String,
    /// 1 = the first send.
    pub attempt: u32,
    pub at_ms: i64,
    /// `None` = no HTTP answer (refused, timed out).
    pub status: Option<u16>,
    pub acked: bool,
}

struct Pending {
    id: u64,
    notify_id: String,
    url: String,
    event: NotifyEvent,
    sends: u32,
    due_ms: i64,
    done: bool,
}

pub struct Core {
    now_ms: AtomicI64,
    next_no: AtomicU64,
    state: Mutex<State>,
    delivering: tokio::sync::Mutex<()>,
    http: reqwest::Client,
}

#[derive(Default)]
pub struct State {
    pub orders: BTreeMap<String, Order>,
    pub scripts: BTreeMap<String, Script>,
    pub ledger: Vec<LedgerLine>,
    pending: Vec<Pending>,
    pub deliveries: Vec<Delivery>,
    pub bill_fault: BillFault,
    /// Scripts by amount in fen, overriding [`Script::for_amount`] for new orders of that
    /// amount (for orders whose number is not known in advance).
    pub amount_scripts: BTreeMap<i64, Script>,
}

impl State {
    /// The script of a new order of `amount_fen` that has none of its own.
    pub fn amount_script(&self, amount_fen: i64) -> Script {
        self.amount_scripts
            .get(&amount_fen)
            .cloned()
            .unwrap_or_else(|| Script::for_amount(amount_fen))
    }
}

/// Bound of one notification delivery (the channels allow 5-10 s).
pub const DELIVERY_TIMEOUT_MS: u64 = 5_000;
/// Most notifications kept queued; beyond it new ones are dropped (a test tool, not a bank).
pub const PENDING_MAX: usize = 100_000;

impl Core {
    pub fn new(start_ms: i64) -> Core {
        Core {
            now_ms: AtomicI64::new(start_ms),
            next_no: AtomicU64::new(1),
            state: Mutex::new(State::default()),
            delivering: tokio::sync::Mutex::new(()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(DELIVERY_TIMEOUT_MS))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }

    pub fn advance_clock(&self, ms: i64) -> i64 {
        self.now_ms
            .fetch_add(ms, Ordering::SeqCst)
            .saturating_add(ms)
    }

    /// A fresh channel number: `prefix` + date-like digits + a counter, unique per emulator.
    pub fn number(&self, prefix: &str) -> String {
        let n = self.next_no.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}{:010}{n:08}", self.now_ms() / 1000)
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn script_for(&self, out_trade_no: &str, amount_fen: i64) -> Script {
        let st = self.lock();
        st.scripts
            .get(out_trade_no)
            .cloned()
            .unwrap_or_else(|| st.amount_script(amount_fen))
    }

    /// Marks an order paid: ledger line, notification when `notify`.
    pub fn pay(&self, st: &mut State, out_trade_no: &str, subject: &str, notify: bool) {
        let now = self.now_ms();
        let Some(o) = st.orders.get_mut(out_trade_no) else {
            return;
        };
        o.state = OrderState::Paid;
        o.exists = true;
        o.paid_at_ms = Some(now);
        let line = LedgerLine {
            refund: false,
            revoked: false,
            trade_no: o.trade_no.clone(),
            out_trade_no: o.out_trade_no.clone(),
            refund_no: String::new(),
            out_refund_no: String::new(),
            amount_fen: o.amount_fen,
            fee_fen: fee_fen(o.amount_fen),
            at_ms: now,
            subject: subject.to_string(),
        };
        let url = o.notify_url.clone();
        let script = o.script.clone();
        st.ledger.push(line);
        if notify && !script.not_found {
            if let Some(url) = url {
                let ev = NotifyEvent::Paid {
                    out_trade_no: out_trade_no.to_string(),
                };
                self.enqueue(st, &url, ev.clone());
                if script.duplicate_notify {
                    self.enqueue(st, &url, ev);
                }
                if script.conflicting_notify {
                    self.enqueue(
                        st,
                        &url,
                        NotifyEvent::Contradiction {
                            out_trade_no: out_trade_no.to_string(),
                        },
                    );
                }
            }
        }
    }

    /// Records a refund (or a revoke's full refund) in the order and the ledger.
    pub fn record_refund(&self, st: &mut State, out_trade_no: &str, refund: Refund, revoked: bool) {
        let Some(o) = st.orders.get_mut(out_trade_no) else {
            return;
        };
        let line = LedgerLine {
            refund: true,
            revoked,
            trade_no: o.trade_no.clone(),
            out_trade_no: o.out_trade_no.clone(),
            refund_no: refund.refund_no.clone(),
            out_refund_no: refund.out_refund_no.clone(),
            amount_fen: refund.amount_fen,
            fee_fen: fee_fen(refund.amount_fen).saturating_neg(),
            at_ms: refund.at_ms,
            subject: String::new(),
        };
        o.refunds.push(refund);
        st.ledger.push(line);
    }

    pub fn enqueue(&self, st: &mut State, url: &str, event: NotifyEvent) -> u64 {
        let id = self.next_no.fetch_add(1, Ordering::SeqCst);
        if st.pending.len() < PENDING_MAX {
            st.pending.push(Pending {
                id,
                notify_id: format!("{id:016}"),
                url: url.to_string(),
                event,
                sends: 0,
                due_ms: self.now_ms(),
                done: false,
            });
        }
        id
    }

    /// Sends every notification that is due on the emulator's clock, one at a time, and
    /// schedules the retries of those not acknowledged.
    pub async fn deliver_due(&self, proto: &dyn NotifyProtocol) {
        let _one_at_a_time = self.delivering.lock().await;
        loop {
            let now = self.now_ms();
            let next = {
                let st = self.lock();
                st.pending
                    .iter()
                    .filter(|p| !p.done && p.due_ms <= now)
                    .min_by_key(|p| (p.due_ms, p.id))
                    .map(|p| {
                        (
                            p.id,
                            p.notify_id.clone(),
                            p.url.clone(),
                            p.event.clone(),
                            p.sends,
                        )
                    })
            };
            let Some((id, notify_id, url, event, sends)) = next else {
                return;
            };
            let rendered = proto.render(self, &event, &notify_id);
            let (status, acked) = match rendered {
                None => (None, false),
                Some(r) => {
                    let mut rb = self.http.post(&url).header("Content-Type", r.content_type);
                    for (k, v) in r.headers {
                        rb = rb.header(k, v);
                    }
                    match rb.body(r.body).send().await {
                        Ok(resp) => {
                            let status = resp.status().as_u16();
                            let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                            (Some(status), proto.acked(status, &body))
                        }
                        Err(_) => (None, false),
                    }
                }
            };
            let mut st = self.lock();
            let sends = sends.saturating_add(1);
            st.deliveries.push(Delivery {
                notification: id,
                out_trade_no: event.out_trade_no().to_string(),
                attempt: sends,
                at_ms: now,
                status,
                acked,
            });
            if let Some(p) = st.pending.iter_mut().find(|p| p.id == id) {
                p.sends = sends;
                let schedule = proto.schedule_ms();
                match schedule.get(
                    usize::try_from(sends)
                        .unwrap_or(usize::MAX)
                        .saturating_sub(1),
                ) {
                    Some(delay) if !acked => p.due_ms = p.due_ms.saturating_add(*delay),
                    _ => p.done = true,
                }
            }
        }
    }

    /// Sends one rendered request to `url` at once, outside the retry queue; the HTTP status.
    pub async fn send_once(&self, url: &str, r: Rendered) -> Option<u16> {
        let mut rb = self.http.post(url).header("Content-Type", r.content_type);
        for (k, v) in r.headers {
            rb = rb.header(k, v);
        }
        rb.body(r.body)
            .send()
            .await
            .ok()
            .map(|resp| resp.status().as_u16())
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }

    pub fn order(&self, out_trade_no: &str) -> Option<Order> {
        self.lock().orders.get(out_trade_no).cloned()
    }

    pub fn ledger(&self) -> Vec<LedgerLine> {
        self.lock().ledger.clone()
    }
}

/// Shared pointer type for the protocol routers.
pub type CoreRef = Arc<Core>;
