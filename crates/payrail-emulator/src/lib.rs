//! Loopback emulators of the WeChat Pay v3, Alipay OpenAPI and UnionPay ACP channel protocols.
//!
//! Each emulator serves the channel's side of the protocol with its own keys: it verifies our
//! signatures, signs its answers and notifications, keeps orders, refunds and a ledger, sends
//! notifications on the channel's retry schedule against a clock that only moves when told
//! (`advance`), and writes bills in the channel's format. Behaviour is scriptable per order
//! (by the amount, or with [`EmulatorHandle::script`] / `POST /__admin/script`). Its wire code
//! is written independently of `payrail-channels`, so a connector's mistake is not mirrored.
//!
//! In tests: `spawn(EmulatorConfig::for_tests(ChannelKind::WechatPay)).await`. From the shell:
//! `payrail emulate wechatpay --port 9001`.

pub mod alipay;
pub mod core;
pub mod crypto;
pub mod testkeys;
pub mod unionpay;
pub mod wechatpay;

pub use crate::core::{BillFault, Delivery, LedgerLine, Order, Script};
use crate::core::{Core, NotifyEvent, NotifyProtocol, OrderState, Rendered};
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    WechatPay,
    Alipay,
    UnionPay,
}

impl ChannelKind {
    pub fn parse(s: &str) -> Option<ChannelKind> {
        match s {
            "wechatpay" => Some(ChannelKind::WechatPay),
            "alipay" => Some(ChannelKind::Alipay),
            "unionpay" => Some(ChannelKind::UnionPay),
            _ => None,
        }
    }
}

/// One emulated channel account.
#[derive(Clone)]
pub struct EmulatorConfig {
    pub channel: ChannelKind,
    pub listen: SocketAddr,
    /// The emulator's (the channel's) private key, PKCS#8 PEM.
    pub channel_private_key_pem: String,
    /// The merchant's public key (SPKI PEM): requests signed otherwise are refused.
    pub merchant_public_key_pem: String,
    /// WeChat `mchid`, Alipay `app_id`, UnionPay `merId`.
    pub merchant_id: String,
    /// WeChat `appid`, Alipay `seller_id`.
    pub app_id: String,
    /// WeChat: the 32-byte APIv3 key notifications are encrypted with.
    pub api_v3_key: String,
    /// WeChat: `Wechatpay-Serial` of the emulator's key.
    pub platform_serial: String,
    /// The emulator clock's start, Unix ms.
    pub start_ms: i64,
}

impl EmulatorConfig {
    /// The fixed test identities and the committed test-only keys, on 127.0.0.1:0, the clock at
    /// the real time.
    pub fn for_tests(channel: ChannelKind) -> EmulatorConfig {
        let (merchant_id, app_id) = match channel {
            ChannelKind::WechatPay => ("1900000109", "wxd678efh567hg6787"),
            ChannelKind::Alipay => ("2021000000000001", "2088000000000001"),
            ChannelKind::UnionPay => ("777290058110048", ""),
        };
        EmulatorConfig {
            channel,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            channel_private_key_pem: testkeys::CHANNEL_PRIVATE_PEM.to_string(),
            merchant_public_key_pem: testkeys::MERCHANT_PUBLIC_PEM.to_string(),
            merchant_id: merchant_id.into(),
            app_id: app_id.into(),
            api_v3_key: testkeys::WECHAT_API_V3_KEY.into(),
            platform_serial: "PUB_KEY_ID_0114232024112200000000000000".into(),
            start_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(0))
                .unwrap_or(0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("{0}")]
    Key(String),
    #[error("cannot listen: {0}")]
    Listen(#[from] std::io::Error),
}

/// The channel-specific half of an emulator.
pub trait Protocol: NotifyProtocol {
    fn routes(self: Arc<Self>) -> Router;
    /// WeChat's signature probe, if the channel sends one.
    fn probe(&self, _core: &Core) -> Option<Rendered> {
        None
    }
}

/// A running emulator.
pub struct EmulatorHandle {
    /// `http://127.0.0.1:PORT` (WeChat, UnionPay base; Alipay's gateway is `{base_url}/gateway.do`).
    pub base_url: String,
    /// The emulator's public key (SPKI PEM): what a channel account needs to verify it.
    pub public_key_pem: String,
    pub config: EmulatorConfig,
    core: Arc<Core>,
    proto: Arc<dyn Protocol>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct AdminState {
    core: Arc<Core>,
    proto: Arc<dyn Protocol>,
}

pub async fn spawn(config: EmulatorConfig) -> Result<EmulatorHandle, EmulatorError> {
    let keys = crypto::KeyPair::from_pkcs8_pem(&config.channel_private_key_pem)
        .map_err(EmulatorError::Key)?;
    let merchant =
        crypto::PublicKey::from_pem(&config.merchant_public_key_pem).map_err(EmulatorError::Key)?;
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let base_url = format!("http://{addr}");
    let core = Arc::new(Core::new(config.start_ms));
    let public_key_pem = keys.public_pem.clone();
    let proto: Arc<dyn Protocol> = match config.channel {
        ChannelKind::WechatPay => Arc::new(wechatpay::WechatEmu::new(
            &config,
            keys,
            merchant,
            core.clone(),
            &base_url,
        )),
        ChannelKind::Alipay => Arc::new(alipay::AlipayEmu::new(
            &config,
            keys,
            merchant,
            core.clone(),
            &base_url,
        )),
        ChannelKind::UnionPay => Arc::new(unionpay::UnionPayEmu::new(
            &config,
            keys,
            merchant,
            core.clone(),
        )),
    };
    let admin = AdminState {
        core: core.clone(),
        proto: proto.clone(),
    };
    let app = proto.clone().routes().merge(admin_routes(admin));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(EmulatorHandle {
        base_url,
        public_key_pem,
        config,
        core,
        proto,
        task,
    })
}

impl EmulatorHandle {
    /// Sets the script of an order not yet created (it wins over the amount's script).
    pub fn script(&self, out_trade_no: &str, script: Script) {
        self.core
            .lock()
            .scripts
            .insert(out_trade_no.to_string(), script);
    }

    /// The payer scans the QR code / pays on the page. Sends the payment notification at once
    /// (delivered by [`EmulatorHandle::flush`] or [`EmulatorHandle::advance`]).
    pub fn scan(&self, out_trade_no: &str) -> Result<(), String> {
        scan(&self.core, out_trade_no)
    }

    /// Sets the script of every new order of `amount_fen` that has no script of its own (it
    /// wins over the amount table): for orders whose number the caller does not know yet.
    pub fn script_amount(&self, amount_fen: i64, script: Script) {
        self.core.lock().amount_scripts.insert(amount_fen, script);
    }

    /// Makes every later bill download faulty (or correct again with [`BillFault::None`]).
    pub fn bill_fault(&self, fault: BillFault) {
        self.core.lock().bill_fault = fault;
    }

    /// Moves the emulator's clock and delivers every notification that became due, in order,
    /// before returning.
    pub async fn advance(&self, ms: i64) -> i64 {
        let now = self.core.advance_clock(ms);
        self.core.deliver_due(self.proto.as_ref()).await;
        now
    }

    /// Delivers the notifications due now.
    pub async fn flush(&self) {
        self.core.deliver_due(self.proto.as_ref()).await;
    }

    pub fn now_ms(&self) -> i64 {
        self.core.now_ms()
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.core.deliveries()
    }

    pub fn order(&self, out_trade_no: &str) -> Option<Order> {
        self.core.order(out_trade_no)
    }

    pub fn ledger(&self) -> Vec<LedgerLine> {
        self.core.ledger()
    }

    /// The notification of `event` as the channel would send it now (signed), without sending
    /// it: for tests that post it themselves.
    pub fn render_payment_notification(&self, out_trade_no: &str) -> Option<Rendered> {
        self.proto.render(
            &self.core,
            &NotifyEvent::Paid {
                out_trade_no: out_trade_no.into(),
            },
            "manual-0001",
        )
    }

    /// A validly signed payment notification claiming `amount_fen` instead of the order's.
    pub fn render_tampered_notification(
        &self,
        out_trade_no: &str,
        amount_fen: i64,
    ) -> Option<Rendered> {
        self.proto.render(
            &self.core,
            &NotifyEvent::Tampered {
                out_trade_no: out_trade_no.into(),
                amount_fen,
            },
            "manual-0002",
        )
    }

    /// WeChat's signature probe (`WECHATPAY/SIGNTEST/…`).
    pub fn render_probe(&self) -> Option<Rendered> {
        self.proto.probe(&self.core)
    }

    /// Sends WeChat's signature probe to `url`; the HTTP status our endpoint answered (a
    /// correct endpoint refuses it). `None` for channels without probes or no answer.
    pub async fn send_probe(&self, url: &str) -> Option<u16> {
        let r = self.proto.probe(&self.core)?;
        self.core.send_once(url, r).await
    }
}

fn scan(core: &Core, out_trade_no: &str) -> Result<(), String> {
    let mut st = core.lock();
    let order = st.orders.get_mut(out_trade_no).ok_or("no such order")?;
    match order.state {
        OrderState::NotPaid => {}
        OrderState::Paid => return Ok(()),
        other => return Err(format!("order is {other:?}")),
    }
    if order.lapsed(core.now_ms()) {
        // UnionPay: past `payTimeout` the payment is refused; the order stays unpaid.
        return Err("order lapsed at its payment timeout; the payment is refused".into());
    }
    if order.script.fail {
        order.exists = true;
        order.state = OrderState::Failed;
        return Ok(());
    }
    core.pay(&mut st, out_trade_no, "emulated order", true);
    Ok(())
}

/// An order's script (`out_trade_no`), or the script of new orders of an amount (`amount`).
#[derive(serde::Deserialize)]
struct ScriptBody {
    out_trade_no: Option<String>,
    amount: Option<i64>,
    #[serde(flatten)]
    script: Script,
}

#[derive(serde::Deserialize)]
struct OrderRef {
    out_trade_no: String,
}

#[derive(serde::Deserialize)]
struct Url {
    url: String,
}

#[derive(serde::Deserialize)]
struct Fault {
    fault: BillFault,
}

#[derive(serde::Deserialize)]
struct Advance {
    ms: i64,
}

/// `/__admin/…`: the same controls as [`EmulatorHandle`], over HTTP for `payrail emulate`.
fn admin_routes(state: AdminState) -> Router {
    Router::new()
        .route(
            "/__admin/script",
            post(
                |State(s): State<AdminState>, Json(b): Json<ScriptBody>| async move {
                    let mut st = s.core.lock();
                    match (b.out_trade_no, b.amount) {
                        (Some(no), None) => {
                            st.scripts.insert(no, b.script);
                        }
                        (None, Some(fen)) => {
                            st.amount_scripts.insert(fen, b.script);
                        }
                        _ => {
                            return Json(
                                serde_json::json!({"ok": false, "error": "give out_trade_no or amount"}),
                            )
                        }
                    }
                    Json(serde_json::json!({"ok": true}))
                },
            ),
        )
        .route(
            "/__admin/scan",
            post(
                |State(s): State<AdminState>, Json(b): Json<OrderRef>| async move {
                    let r = scan(&s.core, &b.out_trade_no);
                    s.core.deliver_due(s.proto.as_ref()).await;
                    Json(match r {
                        Ok(()) => serde_json::json!({"ok": true}),
                        Err(e) => serde_json::json!({"ok": false, "error": e}),
                    })
                },
            ),
        )
        .route(
            "/__admin/bill-fault",
            post(
                |State(s): State<AdminState>, Json(b): Json<Fault>| async move {
                    s.core.lock().bill_fault = b.fault;
                    Json(serde_json::json!({"ok": true}))
                },
            ),
        )
        .route(
            "/__admin/clock",
            get(|State(s): State<AdminState>| async move {
                Json(serde_json::json!({"now_ms": s.core.now_ms()}))
            }),
        )
        .route(
            "/__admin/clock/advance",
            post(
                |State(s): State<AdminState>, Json(b): Json<Advance>| async move {
                    let now = s.core.advance_clock(b.ms);
                    s.core.deliver_due(s.proto.as_ref()).await;
                    Json(serde_json::json!({"now_ms": now}))
                },
            ),
        )
        .route(
            "/__admin/orders/{no}",
            get(
                |State(s): State<AdminState>, Path(no): Path<String>| async move {
                    Json(serde_json::json!(s.core.order(&no)))
                },
            ),
        )
        .route(
            "/__admin/probe",
            post(
                |State(s): State<AdminState>, Json(b): Json<Url>| async move {
                    let status = match s.proto.probe(&s.core) {
                        Some(r) => s.core.send_once(&b.url, r).await,
                        None => None,
                    };
                    Json(serde_json::json!({"status": status}))
                },
            ),
        )
        .route(
            "/__admin/deliveries",
            get(|State(s): State<AdminState>| async move {
                Json(serde_json::json!(s.core.deliveries()))
            }),
        )
        .with_state(state)
}
