//! The harness shared by the tests that run the real server against the channel emulators
//! (`channels.rs`, `channel_faults.rs`): the payrail router on a loopback port with a fresh
//! SQLite database, channel accounts pointing at the WeChat Pay, Alipay and UnionPay emulators,
//! and a merchant webhook receiver. Every helper that waits is bounded.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use payrail_channels::{Connector, SubmitRequest};
use payrail_client::{nonce, Answer, Credentials, PayrailClient};
use payrail_domain::input::PaymentMethod;
use payrail_domain::{AttemptId, Clock, Currency, Money, PaymentId, Secret, SystemClock};
use payrail_emulator::{ChannelKind, EmulatorConfig, EmulatorHandle};
use payrail_engine::{crypto::MasterKey, Engine, EngineConfig};
use reqwest::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub const TEST_BOUND: Duration = Duration::from_secs(30);

pub struct H {
    pub client: PayrailClient,
    pub op: String,
    pub engine: Arc<Engine>,
    pub base: String,
    /// The server's clock: the wall clock, which a test may move ahead (expiry).
    pub clock: Arc<SkewClock>,
    dir: std::path::PathBuf,
    _stop: watch::Sender<bool>,
}

/// The test's data folder goes with it.
impl Drop for H {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The wall clock plus an offset a test can grow: the server's timers keep running (the worker
/// polls on the wall clock) while payments can be made to expire without waiting.
#[derive(Default)]
pub struct SkewClock(std::sync::atomic::AtomicI64);

impl SkewClock {
    pub fn jump_ms(&self, ms: i64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for SkewClock {
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms() + self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub fn config() -> EngineConfig {
    EngineConfig {
        channel_timeout_ms: 2_000,
        sync_first_delay_ms: 100,
        sync_max_delay_ms: 400,
        worker_poll_ms: 20,
        barcode_poll_ms: 100,
        barcode_window_ms: 60_000,
        ..EngineConfig::default()
    }
}

pub async fn harness(config: EngineConfig, worker: bool) -> H {
    harness_full(config, worker, false).await
}

pub async fn harness_full(mut config: EngineConfig, worker: bool, webhooks: bool) -> H {
    let dir = std::env::temp_dir().join(format!("payrail-channels-test-{}", nonce()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("payrail.db").display());
    let store = payrail_store::open(&url).await.unwrap();
    // Bound first: channels must be told where to send their notifications.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    config.public_url = base.clone();
    let skew = Arc::new(SkewClock::default());
    let clock: Arc<dyn Clock> = skew.clone();
    let mut channels = payrail_channels::Registry::new();
    channels.register(Arc::new(payrail_channels::sandbox::Sandbox::new(
        clock.clone(),
    )));
    let key = MasterKey::parse(&MasterKey::generate_hex()).unwrap();
    let engine = Arc::new(Engine::new(store, channels, clock, key, config));
    let op = format!("op_test_{}", nonce());
    engine
        .ensure_operator_token(Some(&payrail_domain::Secret::new(op.clone())))
        .await
        .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let app = payrail_api::app(engine.clone());
    let mut rx = stop_rx.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.changed().await;
            })
            .await
            .unwrap();
    });
    if worker {
        tokio::spawn(payrail_engine::worker::run_sync_worker(
            engine.clone(),
            stop_rx.clone(),
        ));
    }
    if webhooks {
        tokio::spawn(payrail_engine::webhooks::run_webhook_dispatcher(
            engine.clone(),
            stop_rx.clone(),
        ));
        tokio::spawn(payrail_engine::webhooks::run_webhook_sender(
            engine.clone(),
            stop_rx,
        ));
    }
    H {
        client: PayrailClient::new(&base),
        op,
        engine,
        base,
        clock: skew,
        dir,
        _stop: stop,
    }
}

pub async fn emulator(kind: ChannelKind) -> EmulatorHandle {
    payrail_emulator::spawn(EmulatorConfig::for_tests(kind))
        .await
        .unwrap()
}

/// The body that creates a channel account for `emu` (its endpoint, ids and test keys).
pub fn account_body(emu: &EmulatorHandle, name: &str, priority: i64) -> Value {
    let merchant_key = payrail_emulator::testkeys::MERCHANT_PRIVATE_PEM;
    match emu.config.channel {
        ChannelKind::WechatPay => json!({
            "channel": "wechatpay", "name": name, "priority": priority,
            "config": {
                "base_url": emu.base_url, "mchid": emu.config.merchant_id, "appid": emu.config.app_id,
                "merchant_serial_no": "3775B6A45ACD588826D15E583A95F5DD00000000",
                "platform_public_key": emu.public_key_pem, "platform_serial": emu.config.platform_serial,
                "timeout_ms": 5000
            },
            "secrets": {"merchant_private_key": merchant_key, "api_v3_key": emu.config.api_v3_key}
        }),
        ChannelKind::Alipay => json!({
            "channel": "alipay", "name": name, "priority": priority,
            "config": {
                "gateway_url": format!("{}/gateway.do", emu.base_url), "app_id": emu.config.merchant_id,
                "alipay_public_key": emu.public_key_pem, "timeout_ms": 5000
            },
            "secrets": {"app_private_key": merchant_key}
        }),
        ChannelKind::UnionPay => json!({
            "channel": "unionpay", "name": name, "priority": priority,
            "config": {
                "base_url": emu.base_url, "mer_id": emu.config.merchant_id, "cert_id": "69629715588",
                "unionpay_public_key": emu.public_key_pem, "timeout_ms": 5000
            },
            "secrets": {"signing_key": merchant_key}
        }),
    }
}

impl H {
    pub async fn account(&self, emu: &EmulatorHandle) -> String {
        let body = account_body(emu, "test account", 0);
        let a = self
            .client
            .operator(
                &self.op,
                Method::POST,
                "/v1/operator/channel-accounts",
                Some(&body),
                Some(&nonce()),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 201, "{}", a.body);
        a.body["id"].as_str().unwrap().to_string()
    }

    pub async fn merchant(&self) -> Credentials {
        self.client.onboard(&self.op, "Shop").await.unwrap().1
    }

    pub async fn create(&self, c: &Credentials, body: Value) -> Answer {
        self.client
            .signed(
                c,
                Method::POST,
                "/v1/payments",
                Some(&body.to_string()),
                Some(&nonce()),
            )
            .await
            .unwrap()
    }

    pub async fn get(&self, c: &Credentials, id: &str) -> Answer {
        self.client
            .signed(c, Method::GET, &format!("/v1/payments/{id}"), None, None)
            .await
            .unwrap()
    }

    /// The channel's order number of a payment: its attempt id.
    pub async fn order_no(&self, payment_id: &str) -> String {
        let id: PaymentId = payment_id.parse().unwrap();
        let attempts = self.engine.store.get_attempts(id).await.unwrap();
        attempts.last().unwrap().id.to_string()
    }

    /// Polls the payment until its status is `want` (bounded).
    pub async fn wait_status(&self, c: &Credentials, id: &str, want: &str) -> Answer {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = self.get(c, id).await;
            if p.body["status"] == want {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "payment {id} is still {} (wanted {want})",
                p.body["status"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn alerts(&self, kind: &str) -> Vec<payrail_store::AlertRecord> {
        self.engine
            .store
            .list_alerts(100)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.kind == kind)
            .collect()
    }

    /// The types of the events written for one object, oldest first.
    pub async fn events_of(&self, c: &Credentials, object_id: &str) -> Vec<String> {
        self.engine
            .store
            .list_events(c_merchant(self, c).await, 0, 500)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.object_id == object_id)
            .map(|e| e.event_type)
            .collect()
    }

    pub async fn post(&self, c: &Credentials, path: &str, body: Option<Value>) -> Answer {
        self.client
            .signed(
                c,
                Method::POST,
                path,
                body.map(|b| b.to_string()).as_deref(),
                Some(&nonce()),
            )
            .await
            .unwrap()
    }

    /// Polls a refund until its status is `want` (bounded).
    pub async fn wait_refund(&self, c: &Credentials, id: &str, want: &str) -> Answer {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self
                .client
                .signed(c, Method::GET, &format!("/v1/refunds/{id}"), None, None)
                .await
                .unwrap();
            if r.body["status"] == want {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "refund {id} is still {} (wanted {want})",
                r.body["status"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Posts a rendered notification to an account's endpoint, as the channel would.
    pub async fn post_notification(
        &self,
        account: &str,
        r: &payrail_emulator::core::Rendered,
    ) -> (u16, String) {
        let mut req = reqwest::Client::new()
            .post(format!("{}/v1/channel-notify/{account}", self.base))
            .header("content-type", r.content_type)
            .body(r.body.clone());
        for (k, v) in &r.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = req.send().await.unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    }
}

pub async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_BOUND, f)
        .await
        .expect("test took too long");
}

pub async fn c_merchant(h: &H, c: &Credentials) -> payrail_domain::MerchantId {
    h.engine
        .store
        .get_app_by_key_id(&c.key_id)
        .await
        .unwrap()
        .unwrap()
        .merchant_id
}

/// Every delivery a webhook receiver got: headers and body.
pub type Deliveries = Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, Vec<u8>)>>>;

/// A merchant's webhook endpoint: records every delivery, answers 200.
pub async fn webhook_receiver() -> (String, Deliveries) {
    let got: Deliveries = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let g = g.clone();
            async move {
                g.lock().unwrap().push((headers, body.to_vec()));
                axum::http::StatusCode::OK
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/payrail/webhooks", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, got)
}

/// Longest wait for one expected change (a status, a delivery, an alert); well under
/// [`TEST_BOUND`], so a missed change fails with its own message rather than the test's bound.
pub const WAIT_BOUND: Duration = Duration::from_secs(10);

/// A bounded poll: `tick` fails the test once [`WAIT_BOUND`] has passed, otherwise pauses.
pub struct Poll {
    until: Instant,
}

impl Poll {
    pub fn start() -> Poll {
        Poll {
            until: Instant::now() + WAIT_BOUND,
        }
    }

    pub async fn tick(&self, waiting_for: impl std::fmt::Display) {
        assert!(
            Instant::now() < self.until,
            "not reached in time: {waiting_for}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A payment method of `kind` that shows a QR code or a page (nothing happens until the payer
/// acts), and its payment-code method (we scan the payer's code).
pub fn page_method(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::WechatPay => "wechat_native",
        ChannelKind::Alipay => "alipay_qr",
        ChannelKind::UnionPay => "unionpay_web",
    }
}

pub fn code_method(kind: ChannelKind) -> &'static str {
    match kind {
        ChannelKind::WechatPay => "wechat_code",
        ChannelKind::Alipay => "alipay_code",
        ChannelKind::UnionPay => "unionpay_code",
    }
}

/// A create-payment body; payment-code methods get a payment code.
pub fn payment_body(method: &str, amount: i64, out_trade_no: &str) -> Value {
    let mut body = json!({"amount": amount, "currency": "CNY", "out_trade_no": out_trade_no, "subject": "Tea", "method": method});
    if method.ends_with("_code") {
        body["auth_code"] = json!(match method {
            "wechat_code" => "134567890123456789",
            "alipay_code" => "287654321098765432",
            _ => "6223194500000000001",
        });
    }
    body
}

/// The order number the channel knows an attempt by (UnionPay: letters and digits only).
pub fn channel_order_no(kind: ChannelKind, attempt: &str) -> String {
    match kind {
        ChannelKind::UnionPay => attempt.replace('_', ""),
        _ => attempt.to_string(),
    }
}

/// How the channel wants an accepted notification answered (docs/channels.md): WeChat 204 with
/// no body, Alipay 200 with the literal `success`, UnionPay 200 (our body is `ok`).
pub fn ack(kind: ChannelKind) -> (u16, &'static str) {
    match kind {
        ChannelKind::WechatPay => (204, ""),
        ChannelKind::Alipay => (200, "success"),
        ChannelKind::UnionPay => (200, "ok"),
    }
}

/// An emulator whose channel identities differ from the test account's: `merchant_id`
/// (WeChat `mchid`, Alipay `app_id`, UnionPay `merId`) and `app_id` (WeChat `appid`, Alipay
/// `seller_id`), when given. Same keys, so what it signs verifies with the account's key.
pub async fn emulator_as(
    kind: ChannelKind,
    merchant_id: Option<&str>,
    app_id: Option<&str>,
) -> EmulatorHandle {
    let mut cfg = EmulatorConfig::for_tests(kind);
    if let Some(m) = merchant_id {
        cfg.merchant_id = m.into();
    }
    if let Some(a) = app_id {
        cfg.app_id = a.into();
    }
    payrail_emulator::spawn(cfg).await.unwrap()
}

/// A connector for `emu` used directly, not through the server: another system on the same
/// channel account, or the merchant's channel portal. Notifications of its orders go to
/// `notify_url`.
pub fn direct_connector(emu: &EmulatorHandle, notify_url: &str) -> Arc<dyn Connector> {
    use payrail_channels::{alipay, unionpay, wechatpay};
    let key = || Secret::new(payrail_emulator::testkeys::MERCHANT_PRIVATE_PEM.to_string());
    match emu.config.channel {
        ChannelKind::WechatPay => Arc::new(
            wechatpay::WechatPay::new(wechatpay::WechatPayConfig {
                base_url: emu.base_url.clone(),
                mchid: emu.config.merchant_id.clone(),
                appid: emu.config.app_id.clone(),
                merchant_serial_no: "3775B6A45ACD588826D15E583A95F5DD00000000".into(),
                merchant_private_key: key(),
                api_v3_key: Secret::new(emu.config.api_v3_key.clone()),
                platform_public_key: emu.public_key_pem.clone(),
                platform_serial: emu.config.platform_serial.clone(),
                notify_url: notify_url.into(),
                timeout_ms: 5_000,
            })
            .unwrap(),
        ),
        ChannelKind::Alipay => Arc::new(
            alipay::Alipay::new(alipay::AlipayConfig {
                gateway_url: format!("{}/gateway.do", emu.base_url),
                app_id: emu.config.merchant_id.clone(),
                app_private_key: key(),
                alipay_public_key: emu.public_key_pem.clone(),
                seller_id: Some(emu.config.app_id.clone()),
                notify_url: notify_url.into(),
                return_url: None,
                timeout_ms: 5_000,
            })
            .unwrap(),
        ),
        ChannelKind::UnionPay => Arc::new(
            unionpay::UnionPay::new(unionpay::UnionPayConfig {
                base_url: emu.base_url.clone(),
                mer_id: emu.config.merchant_id.clone(),
                cert_id: "69629715588".into(),
                signing_key: key(),
                unionpay_public_key: emu.public_key_pem.clone(),
                back_url: notify_url.into(),
                front_url: None,
                timeout_ms: 5_000,
            })
            .unwrap(),
        ),
    }
}

/// A payment-code order for `attempt` created at `emu` directly (see [`direct_connector`]);
/// the channel charges it at once (amount without a script).
pub async fn direct_code_order(
    emu: &EmulatorHandle,
    notify_url: &str,
    attempt: AttemptId,
    amount_minor: i64,
) {
    let kind = emu.config.channel;
    let method = PaymentMethod::parse(code_method(kind)).unwrap();
    let now = payrail_client::unix_now() * 1000;
    let mut req = SubmitRequest::new(
        attempt,
        Money::new(amount_minor, Currency::CNY),
        "Tea",
        method,
        now,
        now + 1_800_000,
    );
    let code = payment_body(code_method(kind), amount_minor, "x")["auth_code"]
        .as_str()
        .unwrap()
        .to_string();
    req.auth_code = Some(Secret::new(code));
    let res = direct_connector(emu, notify_url).submit(&req).await;
    assert!(
        matches!(res.outcome.label(), "succeeded" | "processing"),
        "the direct order was not taken: {res:?}"
    );
}

impl H {
    /// Creates a channel account from a full body (see [`account_body`]).
    pub async fn account_with(&self, body: &Value) -> String {
        let a = self
            .client
            .operator(
                &self.op,
                Method::POST,
                "/v1/operator/channel-accounts",
                Some(body),
                Some(&nonce()),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 201, "{}", a.body);
        a.body["id"].as_str().unwrap().to_string()
    }

    /// Where the channel notifies an account.
    pub fn notify_url(&self, account: &str) -> String {
        format!("{}/v1/channel-notify/{account}", self.base)
    }

    pub async fn attempt_id(&self, payment_id: &str) -> AttemptId {
        self.order_no(payment_id).await.parse().unwrap()
    }

    /// The payer's browser posts a `post_form` next action (UnionPay web) to the channel,
    /// which creates the order there; other next actions need nothing.
    pub async fn open_page(&self, created: &Answer) {
        let action = &created.body["next_action"];
        if action["type"] != "post_form" {
            return;
        }
        let form: Vec<(String, String)> = action["fields"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let page = reqwest::Client::new()
            .post(action["url"].as_str().unwrap())
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
    }

    pub async fn refund(&self, c: &Credentials, payment_id: &str, amount: i64, no: &str) -> Answer {
        let body = json!({"payment_id": payment_id, "amount": amount, "out_refund_no": no});
        self.client
            .signed(
                c,
                Method::POST,
                "/v1/refunds",
                Some(&body.to_string()),
                Some(&nonce()),
            )
            .await
            .unwrap()
    }

    pub async fn get_refund(&self, c: &Credentials, id: &str) -> Answer {
        self.client
            .signed(c, Method::GET, &format!("/v1/refunds/{id}"), None, None)
            .await
            .unwrap()
    }

    /// The alerts as the operator API lists them: (kind, subject, detail).
    pub async fn op_alerts(&self) -> Vec<(String, String, String)> {
        let a = self
            .client
            .operator(&self.op, Method::GET, "/v1/operator/alerts", None, None)
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["kind"].as_str().unwrap().to_string(),
                    x["subject_id"].as_str().unwrap().to_string(),
                    x["detail"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// The ids of every ledger entry, from the operator's journal API.
    pub async fn journal_ids(&self) -> Vec<String> {
        let a = self
            .client
            .operator(
                &self.op,
                Method::GET,
                "/v1/operator/ledger/entries?limit=100",
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["has_more"], false, "more entries than one page");
        a.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// How many times the payment was posted as captured (`pay_…:captured`).
    pub async fn captured_postings(&self, payment_id: &str) -> usize {
        let want = format!("{payment_id}:captured");
        self.journal_ids()
            .await
            .iter()
            .filter(|id| **id == want)
            .count()
    }

    /// The types of the outbox events of one object (a payment or a refund), in order.
    pub async fn event_types(&self, c: &Credentials, object_id: &str) -> Vec<String> {
        let merchant = c_merchant(self, c).await;
        self.engine
            .store
            .list_events(merchant, 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.object_id == object_id)
            .map(|e| e.event_type)
            .collect()
    }

    /// Polls until the payment's status is final (bounded), asserting on every read that it
    /// is never `failed`: what the faults in these tests must never cause.
    pub async fn wait_final_never_failed(&self, c: &Credentials, id: &str) -> Answer {
        let poll = Poll::start();
        loop {
            let p = self.get(c, id).await;
            let status = p.body["status"].as_str().unwrap_or("?").to_string();
            assert_ne!(status, "failed", "payment {id} wrongly failed: {}", p.body);
            if status != "processing" {
                return p;
            }
            poll.tick(format!("payment {id} is still processing")).await;
        }
    }

    /// The value of one channel-call counter: `op` calls to `channel` that came out `outcome`.
    pub fn channel_calls(&self, channel: &str, op: &str, outcome: &str) -> u64 {
        self.engine.metrics.counter(
            "payrail_channel_calls_total",
            &[("channel", channel), ("op", op), ("outcome", outcome)],
        )
    }
}
