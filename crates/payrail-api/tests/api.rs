//! Black-box tests of the HTTP API: the real router on a real port (port 0), a fresh database
//! per test, the signed client. Every test runs on SQLite and, when PAYRAIL_TEST_POSTGRES_URL is
//! set, on a fresh PostgreSQL database too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use payrail_client::{nonce, unix_now, Answer, Credentials, PayrailClient};
use payrail_domain::{Clock, ManualClock, Secret, SystemClock};
use payrail_engine::{crypto::MasterKey, Engine, EngineConfig};
use reqwest::Method;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

/// Everything logged by any test in this binary, to prove secrets never reach the log.
static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogSink(Arc<Mutex<Vec<u8>>>);
impl Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_log() -> Arc<Mutex<Vec<u8>>> {
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = LogSink(buf.clone());
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter("debug")
            .with_writer(move || sink.clone())
            .try_init();
        buf
    })
    .clone()
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Harness {
    client: PayrailClient,
    op: String,
    engine: Arc<Engine>,
    clock: Arc<ManualClock>,
    dir: std::path::PathBuf,
    /// The database and the master key, for a second engine on the same data.
    url: String,
    master_key: Secret<String>,
    _stop: watch::Sender<bool>,
}

/// The test's data folder goes with it (the store's threads may still have files open: on
/// Unix they are unlinked and freed when closed).
impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn fresh_pg_url() -> Option<String> {
    let base = std::env::var("PAYRAIL_TEST_POSTGRES_URL").ok()?;
    let (client, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls)
        .await
        .expect("connect to PAYRAIL_TEST_POSTGRES_URL");
    tokio::spawn(conn);
    let name = format!("payrail_api_{}", &nonce()[..16]);
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (prefix, _) = base.rsplit_once('/').unwrap();
    Some(format!("{prefix}/{name}"))
}

async fn harness_with(backend: Backend, config: EngineConfig, worker: bool) -> Option<Harness> {
    harness_full(backend, config, worker, None).await
}

async fn harness_full(
    backend: Backend,
    config: EngineConfig,
    worker: bool,
    extra: Option<Arc<dyn payrail_channels::Connector>>,
) -> Option<Harness> {
    harness_with_bank(backend, config, worker, extra, None).await
}

/// [`harness_full`] with another payout bank than the sandbox bank.
async fn harness_with_bank(
    backend: Backend,
    config: EngineConfig,
    worker: bool,
    extra: Option<Arc<dyn payrail_channels::Connector>>,
    payout_bank: Option<Arc<dyn payrail_channels::payout::PayoutConnector>>,
) -> Option<Harness> {
    init_log();
    let dir = std::env::temp_dir().join(format!("payrail-api-test-{}", nonce()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.join("payrail.db").display()),
        Backend::Postgres => match fresh_pg_url().await {
            Some(u) => u,
            None => {
                eprintln!("PAYRAIL_TEST_POSTGRES_URL not set: PostgreSQL variant skipped");
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
        },
    };
    let store = payrail_store::open(&url).await.unwrap();
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let mut channels = payrail_channels::Registry::new();
    channels.register(Arc::new(payrail_channels::sandbox::Sandbox::new(
        dyn_clock.clone(),
    )));
    if let Some(c) = extra {
        channels.register(c);
    }
    let master_key = MasterKey::generate_hex();
    let key = MasterKey::parse(&master_key).unwrap();
    let mut engine = Engine::new(store, channels, dyn_clock, key, config);
    if let Some(bank) = payout_bank {
        engine.payout_bank = bank;
    }
    let engine = Arc::new(engine);
    let op = format!("op_test_{}", nonce());
    engine
        .ensure_operator_token(Some(&Secret::new(op.clone())))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
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
            stop_rx,
        ));
    }
    Some(Harness {
        client: PayrailClient::new(&format!("http://{addr}")),
        op,
        engine,
        clock,
        dir,
        url,
        master_key,
        _stop: stop,
    })
}

fn test_config() -> EngineConfig {
    EngineConfig {
        channel_timeout_ms: 300,
        sync_first_delay_ms: 100,
        sync_max_delay_ms: 400,
        worker_poll_ms: 20,
        ..EngineConfig::default()
    }
}

async fn harness(backend: Backend) -> Option<Harness> {
    harness_with(backend, test_config(), false).await
}

impl Harness {
    async fn merchant(&self, name: &str) -> (String, Credentials) {
        self.client.onboard(&self.op, name).await.unwrap()
    }

    async fn create(&self, c: &Credentials, amount: i64, otn: &str) -> Answer {
        let body = json!({"amount": amount, "currency": "CNY", "out_trade_no": otn, "subject": "test", "method": "sandbox"}).to_string();
        self.client
            .signed(c, Method::POST, "/v1/payments", Some(&body), Some(&nonce()))
            .await
            .unwrap()
    }

    async fn get(&self, c: &Credentials, path: &str) -> Answer {
        self.client
            .signed(c, Method::GET, path, None, None)
            .await
            .unwrap()
    }

    async fn post(
        &self,
        c: &Credentials,
        path: &str,
        body: Option<&str>,
        key: Option<&str>,
    ) -> Answer {
        self.client
            .signed(c, Method::POST, path, body, key)
            .await
            .unwrap()
    }

    async fn count_payments(&self, c: &Credentials) -> usize {
        let a = self.get(c, "/v1/payments?limit=100").await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["data"].as_array().unwrap().len()
    }

    async fn requery(&self, id: &str) -> Answer {
        self.client
            .operator(
                &self.op,
                Method::POST,
                &format!("/v1/operator/payments/{id}/requery"),
                None,
                Some(&nonce()),
            )
            .await
            .unwrap()
    }
}

/// Runs a test body against SQLite, and PostgreSQL when configured.
macro_rules! both {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let f = $body;
                f(Backend::Sqlite).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let f = $body;
                f(Backend::Postgres).await;
            }
        }
    };
}

both!(create_get_and_query_by_out_trade_no, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (mch, c) = h.merchant("Shop A").await;
    let a = h.create(&c, 1200, "order-1").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(a.request_id.as_deref().unwrap().starts_with("req_"));
    let p = &a.body;
    assert_eq!(p["status"], "succeeded");
    assert_eq!(p["amount"], 1200);
    assert_eq!(p["currency"], "CNY");
    assert_eq!(p["merchant_id"], mch.as_str());
    assert!(p["id"].as_str().unwrap().starts_with("pay_"));
    assert!(p["channel_trade_no"].as_str().unwrap().starts_with("sbx_"));
    assert!(p["paid_at"].as_i64().is_some());
    let id = p["id"].as_str().unwrap();
    let g = h.get(&c, &format!("/v1/payments/{id}")).await;
    assert_eq!(g.status, 200);
    assert_eq!(g.body["id"], p["id"]);
    assert_eq!(g.body["status"], "succeeded");
    let g = h.get(&c, "/v1/payments/out_trade_no/order-1").await;
    assert_eq!(g.body["id"], p["id"]);
    assert_eq!(
        h.get(&c, "/v1/payments/out_trade_no/nope").await.status,
        404
    );
    assert_eq!(
        h.get(&c, "/v1/payments/pay_01M80X1JKZ45058CKTFVQJKG7W")
            .await
            .error_code(),
        Some("resource_missing")
    );
});

both!(
    idempotency_replay_mismatch_and_concurrency,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (_, c) = h.merchant("Shop").await;
        let body = json!({"amount": 500, "currency": "CNY", "out_trade_no": "idem-1", "subject": "x", "method": "sandbox"}).to_string();
        let first = h.post(&c, "/v1/payments", Some(&body), Some("key-1")).await;
        assert_eq!(first.status, 200);
        assert!(!first.replayed);
        let again = h.post(&c, "/v1/payments", Some(&body), Some("key-1")).await;
        assert_eq!(again.status, 200);
        assert!(again.replayed);
        assert_eq!(again.body, first.body);
        let other = body.replace("500", "501");
        let m = h
            .post(&c, "/v1/payments", Some(&other), Some("key-1"))
            .await;
        assert_eq!(
            (m.status, m.error_code()),
            (409, Some("idempotency_key_reused"))
        );
        assert_eq!(m.body["error"]["type"], "idempotency_error");

        // 12 concurrent identical requests under one new key: one payment, every success is it.
        let body2 = json!({"amount": 700, "currency": "CNY", "out_trade_no": "idem-2", "subject": "x", "method": "sandbox"}).to_string();
        let mut tasks = Vec::new();
        for _ in 0..12 {
            let (client, c, body2) = (h.client.clone(), c.clone(), body2.clone());
            tasks.push(tokio::spawn(async move {
                client
                    .signed(
                        &c,
                        Method::POST,
                        "/v1/payments",
                        Some(&body2),
                        Some("key-2"),
                    )
                    .await
                    .unwrap()
            }));
        }
        let mut ids = std::collections::HashSet::new();
        let mut fresh = 0;
        for t in tasks {
            let a = t.await.unwrap();
            match a.status {
                200 => {
                    ids.insert(a.body["id"].as_str().unwrap().to_string());
                    if !a.replayed {
                        fresh += 1;
                    }
                }
                409 => assert_eq!(a.error_code(), Some("idempotency_key_in_use")),
                s => panic!("unexpected {s} {}", a.body),
            }
        }
        assert_eq!(fresh, 1, "exactly one request did the work");
        assert!(ids.len() <= 1);
        assert_eq!(h.count_payments(&c).await, 2);
    }
);

both!(bad_input_is_rejected_and_writes_nothing, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    let base = json!({"amount": 100, "currency": "CNY", "out_trade_no": "ok-1", "subject": "x", "method": "sandbox"});
    let with = |k: &str, v: Value| {
        let mut o = base.clone();
        o[k] = v;
        o.to_string()
    };
    let without = |k: &str| {
        let mut o = base.clone();
        o.as_object_mut().unwrap().remove(k);
        o.to_string()
    };
    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("{\"amount\": 1,".into(), "invalid_json", None),
        ("[1,2]".into(), "parameter_invalid", None),
        (with("amount", json!(0)), "amount_invalid", Some("amount")),
        (with("amount", json!(-5)), "amount_invalid", Some("amount")),
        (with("amount", json!(1_000_000_000_001i64)), "amount_invalid", Some("amount")),
        (with("amount", json!(12.5)), "parameter_invalid", Some("amount")),
        (with("amount", json!("100")), "parameter_invalid", Some("amount")),
        (with("amount", json!(1e30)), "parameter_invalid", Some("amount")),
        (r#"{"amount": 99999999999999999999999, "currency": "CNY", "out_trade_no": "a", "subject": "x", "method": "sandbox"}"#.into(), "parameter_invalid", Some("amount")),
        (with("currency", json!("XYZ")), "currency_invalid", Some("currency")),
        (with("currency", json!("cny")), "currency_invalid", Some("currency")),
        (with("out_trade_no", json!("")), "parameter_missing", Some("out_trade_no")),
        (with("out_trade_no", json!("x".repeat(65))), "parameter_too_long", Some("out_trade_no")),
        (with("out_trade_no", json!("has space")), "parameter_invalid", Some("out_trade_no")),
        (with("subject", json!("s".repeat(129))), "parameter_too_long", Some("subject")),
        (with("method", json!("bitcoin")), "parameter_invalid", Some("method")),
        (with("expires_in", json!(5)), "parameter_out_of_range", Some("expires_in")),
        (with("notify_url", json!("ftp://x")), "parameter_invalid", Some("notify_url")),
        (with("metadata", json!({"k": 1})), "parameter_invalid", Some("metadata.k")),
        (with("colour", json!("red")), "parameter_unknown", Some("colour")),
        (without("amount"), "parameter_missing", Some("amount")),
        (without("currency"), "parameter_missing", Some("currency")),
    ];
    for (body, code, param) in &cases {
        let a = h
            .post(&c, "/v1/payments", Some(body), Some("same-key"))
            .await;
        assert_eq!(a.status, 400, "{body} -> {}", a.body);
        assert_eq!(a.error_code(), Some(*code), "{body} -> {}", a.body);
        assert_eq!(a.body["error"]["type"], "invalid_request_error");
        if let Some(p) = param {
            assert_eq!(a.body["error"]["param"], *p, "{body} -> {}", a.body);
        }
        assert!(a.body["error"]["request_id"]
            .as_str()
            .unwrap()
            .starts_with("req_"));
    }
    assert_eq!(h.count_payments(&c).await, 0, "nothing written");
    // The key was not consumed by any rejected request.
    let ok = h
        .post(
            &c,
            "/v1/payments",
            Some(&base.to_string()),
            Some("same-key"),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(!ok.replayed);
    // Missing key, wrong media type, oversized body.
    let a = h
        .post(
            &c,
            "/v1/payments",
            Some(&with("out_trade_no", json!("k2"))),
            None,
        )
        .await;
    assert_eq!(a.error_code(), Some("idempotency_key_missing"));
    let auth = payrail_domain::signing::authorization_header(
        &c.key_id,
        c.secret.as_bytes(),
        "POST",
        "/v1/payments",
        unix_now(),
        &nonce(),
        b"amount=1",
    );
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/payments", h.client.base_url()))
        .header("authorization", auth)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("idempotency-key", "k3")
        .body("amount=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    let big = format!("{{\"subject\": \"{}\"}}", "x".repeat(70 * 1024));
    let a = h.post(&c, "/v1/payments", Some(&big), Some("k4")).await;
    assert_eq!((a.status, a.error_code()), (413, Some("body_too_large")));
    assert_eq!(h.count_payments(&c).await, 1);
});

both!(signatures_timestamps_and_nonces, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    let path = "/v1/payments?limit=1";
    let sign = |ts: i64, n: &str, secret: &str, path: &str| {
        payrail_domain::signing::authorization_header(
            &c.key_id,
            secret.as_bytes(),
            "GET",
            path,
            ts,
            n,
            b"",
        )
    };
    let get = |auth: String| {
        let client = h.client.clone();
        async move {
            client
                .signed_raw(Method::GET, path, "", &auth, None)
                .await
                .unwrap()
        }
    };
    let n = nonce();
    assert_eq!(get(sign(unix_now(), &n, &c.secret, path)).await.status, 200);
    assert_eq!(
        get(sign(unix_now(), &n, &c.secret, path))
            .await
            .error_code(),
        Some("nonce_reused")
    );
    assert_eq!(
        get(sign(unix_now(), &nonce(), "sk_wrong", path))
            .await
            .error_code(),
        Some("signature_invalid")
    );
    assert_eq!(
        get(sign(
            h.engine.clock.now_s() - 301,
            &nonce(),
            &c.secret,
            path
        ))
        .await
        .error_code(),
        Some("timestamp_out_of_window")
    );
    assert_eq!(
        get(sign(
            h.engine.clock.now_s() + 301,
            &nonce(),
            &c.secret,
            path
        ))
        .await
        .error_code(),
        Some("timestamp_out_of_window")
    );
    assert_eq!(
        get(sign(
            unix_now(),
            &nonce(),
            &c.secret,
            "/v1/payments?limit=2"
        ))
        .await
        .error_code(),
        Some("signature_invalid")
    );
    assert_eq!(
        get("Bearer nope".into()).await.error_code(),
        Some("signature_malformed")
    );
    assert_eq!(
        get(sign(unix_now(), "short", &c.secret, path))
            .await
            .error_code(),
        Some("nonce_invalid")
    );
    let unknown = sign(unix_now(), &nonce(), &c.secret, path)
        .replace(&c.key_id, "key_01M80X1GNB9FXVWJE3WG9B2RNY");
    assert_eq!(get(unknown).await.error_code(), Some("key_unknown"));
    let a = h
        .client
        .signed_raw(Method::GET, path, "", "", None)
        .await
        .unwrap();
    assert_eq!(
        (a.status, a.error_code()),
        (401, Some("signature_malformed"))
    );
    // A body changed after signing is refused.
    let body = json!({"amount": 100, "currency": "CNY", "out_trade_no": "t-1", "subject": "x", "method": "sandbox"}).to_string();
    let auth = payrail_domain::signing::authorization_header(
        &c.key_id,
        c.secret.as_bytes(),
        "POST",
        "/v1/payments",
        unix_now(),
        &nonce(),
        body.as_bytes(),
    );
    let tampered = body.replace("100", "1");
    let a = h
        .client
        .signed_raw(Method::POST, "/v1/payments", &tampered, &auth, Some("t"))
        .await
        .unwrap();
    assert_eq!(a.error_code(), Some("signature_invalid"));
    assert_eq!(h.count_payments(&c).await, 0);
});

both!(merchants_are_isolated, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, a) = h.merchant("A").await;
    let (_, bb) = h.merchant("B").await;
    let pa = h.create(&a, 1004, "shared-no").await;
    let id = pa.body["id"].as_str().unwrap();
    assert_eq!(h.get(&bb, &format!("/v1/payments/{id}")).await.status, 404);
    assert_eq!(
        h.get(&bb, "/v1/payments/out_trade_no/shared-no")
            .await
            .status,
        404
    );
    let close = h
        .post(
            &bb,
            &format!("/v1/payments/{id}/close"),
            None,
            Some(&nonce()),
        )
        .await;
    assert_eq!(close.status, 404);
    assert_eq!(h.count_payments(&bb).await, 0);
    // B may use the same out_trade_no; A may not.
    assert_eq!(h.create(&bb, 1000, "shared-no").await.status, 200);
    let dup = h.create(&a, 1000, "shared-no").await;
    assert_eq!(
        (dup.status, dup.error_code()),
        (409, Some("duplicate_out_trade_no"))
    );
    let still = h.get(&a, &format!("/v1/payments/{id}")).await;
    assert_eq!(
        still.body["status"], "processing",
        "A's payment untouched by B's close"
    );
    // B's idempotency keys are B's own.
    let body = json!({"amount": 100, "currency": "CNY", "out_trade_no": "k", "subject": "x", "method": "sandbox"}).to_string();
    assert_eq!(
        h.post(&a, "/v1/payments", Some(&body), Some("shared-key"))
            .await
            .status,
        200
    );
    let bres = h
        .post(&bb, "/v1/payments", Some(&body), Some("shared-key"))
        .await;
    assert_eq!(bres.status, 200);
    assert!(!bres.replayed);
});

both!(close_payments, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    let open = h.create(&c, 1004, "never-paid").await;
    assert_eq!(open.body["status"], "processing");
    assert_eq!(open.body["next_action"]["type"], "display_qr_code");
    let id = open.body["id"].as_str().unwrap();
    let closed = h
        .post(
            &c,
            &format!("/v1/payments/{id}/close"),
            None,
            Some(&nonce()),
        )
        .await;
    assert_eq!(
        (closed.status, closed.body["status"].as_str()),
        (200, Some("closed"))
    );
    let again = h
        .post(
            &c,
            &format!("/v1/payments/{id}/close"),
            None,
            Some(&nonce()),
        )
        .await;
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (200, Some("closed"))
    );
    let paid = h.create(&c, 1000, "paid").await;
    let pid = paid.body["id"].as_str().unwrap();
    let refused = h
        .post(
            &c,
            &format!("/v1/payments/{pid}/close"),
            None,
            Some(&nonce()),
        )
        .await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (409, Some("payment_not_closable"))
    );
    // Paid between creation and the close: the close reports success, never closes.
    let late = h.create(&c, 1002, "paid-late").await;
    let lid = late.body["id"].as_str().unwrap();
    h.clock.advance_ms(3_000);
    let r = h
        .post(
            &c,
            &format!("/v1/payments/{lid}/close"),
            None,
            Some(&nonce()),
        )
        .await;
    assert_eq!(r.error_code(), Some("payment_not_closable"));
    assert_eq!(
        h.get(&c, &format!("/v1/payments/{lid}")).await.body["status"],
        "succeeded"
    );
    // Unknown at the channel: 503 and the payment stays processing.
    let unk = h.create(&c, 1006, "unknown").await;
    let uid = unk.body["id"].as_str().unwrap();
    let r = h
        .post(
            &c,
            &format!("/v1/payments/{uid}/close"),
            None,
            Some(&nonce()),
        )
        .await;
    assert_eq!(
        (r.status, r.error_code()),
        (503, Some("channel_unconfirmed"))
    );
    assert_eq!(
        h.get(&c, &format!("/v1/payments/{uid}")).await.body["status"],
        "processing"
    );
    assert_eq!(
        h.post(&c, "/v1/payments/pay_nope/close", None, Some(&nonce()))
            .await
            .status,
        404
    );
});

both!(
    sandbox_scripts_and_unknown_is_never_failure,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (_, c) = h.merchant("Shop").await;
        assert_eq!(h.create(&c, 1001, "s1").await.body["status"], "failed");
        let cases = [
            (1002, "s2", "succeeded"),
            (1003, "s3", "succeeded"),
            (1005, "s5", "failed"),
            (1006, "s6", "succeeded"),
        ];
        let mut ids = Vec::new();
        for (amount, otn, _) in &cases {
            let a = h.create(&c, *amount, otn).await;
            assert_eq!(a.status, 200, "{}", a.body);
            assert_eq!(
                a.body["status"], "processing",
                "{amount}: unknown or pending is processing, never failed"
            );
            ids.push(a.body["id"].as_str().unwrap().to_string());
        }
        // Before the scripted time, re-queries change nothing ("not found" stays unknown).
        for id in &ids[..] {
            let r = h.requery(id).await;
            let expect = if r.body["id"] == ids[1].as_str() {
                "succeeded"
            } else {
                "processing"
            };
            assert_eq!(r.body["status"], expect, "{}", r.body);
        }
        h.clock.advance_ms(3_000);
        for (id, (amount, _, want)) in ids.iter().zip(&cases) {
            let r = h.requery(id).await;
            assert_eq!(r.body["status"], *want, "{amount}: {}", r.body);
        }
        // A payment with a definite failure is not flipped by later queries.
        let r = h.requery(&ids[2]).await;
        assert_eq!(r.body["status"], "failed");
    }
);

both!(status_sync_worker_resolves_and_expires, |b| async move {
    let Some(h) = harness_with(b, test_config(), true).await else {
        return;
    };
    let (_, c) = h.merchant("Shop").await;
    let pending = h.create(&c, 1002, "w1").await;
    let body = json!({"amount": 1004, "currency": "CNY", "out_trade_no": "w2", "subject": "x", "method": "sandbox", "expires_in": 60}).to_string();
    let never = h
        .post(&c, "/v1/payments", Some(&body), Some(&nonce()))
        .await;
    assert_eq!(
        never.body["expires_at"].as_i64().unwrap() - never.body["created"].as_i64().unwrap(),
        60
    );
    let pid = pending.body["id"].as_str().unwrap().to_string();
    let nid = never.body["id"].as_str().unwrap().to_string();
    h.clock.advance_ms(3_000);
    let mut status = String::new();
    for _ in 0..400 {
        status = h.get(&c, &format!("/v1/payments/{pid}")).await.body["status"]
            .as_str()
            .unwrap()
            .to_string();
        if status != "processing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, "succeeded");
    assert_eq!(
        h.get(&c, &format!("/v1/payments/{nid}")).await.body["status"],
        "processing"
    );
    // Past its expiry the worker closes it at the channel and locally.
    h.clock.advance_ms(58_000);
    for _ in 0..400 {
        status = h.get(&c, &format!("/v1/payments/{nid}")).await.body["status"]
            .as_str()
            .unwrap()
            .to_string();
        if status != "processing" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, "closed");
    assert_eq!(
        h.engine
            .store
            .count_jobs(payrail_engine::JOB_PAYMENT_SYNC)
            .await
            .unwrap(),
        0,
        "no job left behind"
    );
});

both!(hanging_channel_times_out_as_unknown, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    let t0 = std::time::Instant::now();
    let a = h.create(&c, 1003, "hang").await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the 300 ms channel timeout bounded the call"
    );
    assert_eq!(a.body["status"], "processing");
    let r = h.requery(a.body["id"].as_str().unwrap()).await;
    assert_eq!(
        r.body["status"], "succeeded",
        "the channel had taken the money"
    );
});

both!(
    a_saturated_channel_fails_fast_and_writes_nothing,
    |b| async move {
        // Two call slots per channel, 50 ms queue: two hanging payments (sandbox amount ..03 hangs
        // until the channel timeout, 2 s here so a loaded machine cannot free the slots before
        // the third request arrives) take both slots.
        let config = EngineConfig {
            channel_concurrency_max: 2,
            channel_queue_ms: 50,
            channel_timeout_ms: 2_000,
            ..test_config()
        };
        let Some(h) = harness_with(b, config, false).await else {
            return;
        };
        let (_, c) = h.merchant("Shop").await;
        let h = Arc::new(h);
        let mut hanging = Vec::new();
        for i in 0..2 {
            let (h, c) = (h.clone(), c.clone());
            hanging.push(tokio::spawn(async move {
                h.create(&c, 1003, &format!("hang-{i}")).await
            }));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.engine.bulkheads.in_flight("sandbox") < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the hanging payments never reached the channel"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t0 = std::time::Instant::now();
        let busy = h.create(&c, 1000, "while-busy").await;
        assert_eq!(
            (busy.status, busy.error_code()),
            (503, Some("channel_busy")),
            "{}",
            busy.body
        );
        assert!(
            t0.elapsed() < Duration::from_millis(1_500),
            "failed fast, not after the channel timeout: {:?}",
            t0.elapsed()
        );
        for t in hanging {
            assert_eq!(t.await.unwrap().body["status"], "processing");
        }
        // Nothing was written for the refused request, and its key and out_trade_no are free.
        assert_eq!(h.count_payments(&c).await, 2);
        let later = h.create(&c, 1000, "while-busy").await;
        assert_eq!(
            (later.status, later.body["status"].as_str()),
            (200, Some("succeeded")),
            "{}",
            later.body
        );
    }
);

both!(frozen_merchants_and_operator_auth, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (mch, c) = h.merchant("Shop").await;
    let f = h
        .client
        .operator(
            &h.op,
            Method::POST,
            &format!("/v1/operator/merchants/{mch}/freeze"),
            None,
            Some(&nonce()),
        )
        .await
        .unwrap();
    assert_eq!((f.status, f.body["status"].as_str()), (200, Some("frozen")));
    let a = h.create(&c, 1000, "f1").await;
    assert_eq!((a.status, a.error_code()), (403, Some("merchant_frozen")));
    let u = h
        .client
        .operator(
            &h.op,
            Method::POST,
            &format!("/v1/operator/merchants/{mch}/unfreeze"),
            None,
            Some(&nonce()),
        )
        .await
        .unwrap();
    assert_eq!(u.body["status"], "active");
    assert_eq!(h.create(&c, 1000, "f1").await.status, 200);
    let bad = h
        .client
        .operator(
            "op_wrong",
            Method::GET,
            "/v1/operator/merchants",
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        (bad.status, bad.error_code()),
        (401, Some("operator_token_invalid"))
    );
    let none = h.client.get("/v1/operator/merchants").await.unwrap();
    assert_eq!(none.0, 401);
    let list = h
        .client
        .operator(
            &h.op,
            Method::GET,
            "/v1/operator/merchants?limit=100",
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
    let missing = h
        .client
        .operator(
            &h.op,
            Method::GET,
            "/v1/operator/merchants/mch_01M80X1GNA1FY001EVCZTEEC7W",
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(missing.status, 404);
});

both!(pagination_walks_everything_once, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    let mut created = Vec::new();
    for i in 0..7 {
        created.push(
            h.create(&c, 1000, &format!("p{i}")).await.body["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
        h.clock.advance_ms(2);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let path = match &after {
            Some(a) => format!("/v1/payments?limit=3&starting_after={a}"),
            None => "/v1/payments?limit=3".into(),
        };
        let page = h.get(&c, &path).await;
        assert_eq!(page.body["object"], "list");
        let data = page.body["data"].as_array().unwrap().clone();
        seen.extend(data.iter().map(|p| p["id"].as_str().unwrap().to_string()));
        after = data.last().map(|p| p["id"].as_str().unwrap().to_string());
        if page.body["has_more"] == false {
            break;
        }
    }
    created.reverse();
    assert_eq!(seen, created, "newest first, each once");
    assert_eq!(
        h.get(&c, "/v1/payments?limit=0").await.error_code(),
        Some("parameter_out_of_range")
    );
    assert_eq!(
        h.get(&c, "/v1/payments?limit=101").await.error_code(),
        Some("parameter_out_of_range")
    );
    assert_eq!(
        h.get(&c, "/v1/payments?starting_after=bad")
            .await
            .error_code(),
        Some("parameter_invalid")
    );
    assert_eq!(
        h.get(&c, "/v1/payments?foo=1").await.error_code(),
        Some("parameter_unknown")
    );
});

both!(secrets_stay_secret, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (mch, c) = h.merchant("Shop").await;
    h.create(&c, 1000, "s").await;
    let apps = h
        .client
        .operator(
            &h.op,
            Method::GET,
            &format!("/v1/operator/merchants/{mch}/apps"),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(apps.status, 200);
    assert!(!apps.body.to_string().contains(&c.secret));
    // A replayed app creation never shows the secret again.
    let body = json!({"name": "second"});
    let path = format!("/v1/operator/merchants/{mch}/apps");
    let first = h
        .client
        .operator(&h.op, Method::POST, &path, Some(&body), Some("app-key"))
        .await
        .unwrap();
    let secret = first.body["secret"].as_str().unwrap().to_string();
    let replay = h
        .client
        .operator(&h.op, Method::POST, &path, Some(&body), Some("app-key"))
        .await
        .unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.body["secret"], Value::Null);
    assert_eq!(replay.body["key_id"], first.body["key_id"]);
    // Not in the log, not in the database file.
    let log = String::from_utf8_lossy(&init_log().lock().unwrap()).to_string();
    for s in [&c.secret, &secret, &h.op] {
        assert!(!log.contains(s.as_str()), "secret in log");
    }
    if let Backend::Sqlite = b {
        #[cfg(unix)]
        for f in ["payrail.db", "payrail.db-wal"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(h.dir.join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
        }
        let mut bytes = std::fs::read(h.dir.join("payrail.db")).unwrap();
        bytes.extend(std::fs::read(h.dir.join("payrail.db-wal")).unwrap_or_default());
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(&c.secret) && !text.contains(&secret),
            "app secret stored in the clear"
        );
        assert!(!text.contains(&h.op), "operator token stored in the clear");
    }
});

both!(health_metrics_openapi, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    h.create(&c, 1000, "m").await;
    assert_eq!(h.client.get("/healthz").await.unwrap().0, 200);
    let (s, body) = h.client.get("/readyz").await.unwrap();
    assert_eq!(s, 200, "{body}");
    let (_, m) = h.client.get("/metrics").await.unwrap();
    assert!(
        m.contains(
            "payrail_http_requests_total{route=\"/v1/payments\",method=\"POST\",status=\"200\"} 1"
        ),
        "{m}"
    );
    assert!(
        m.contains("payrail_payment_transitions_total{channel=\"sandbox\",status=\"succeeded\"} 1"),
        "{m}"
    );
    assert!(m.contains("payrail_http_request_duration_seconds_bucket"));
    let (s, o) = h.client.get("/openapi.json").await.unwrap();
    assert_eq!(s, 200);
    let o: Value = serde_json::from_str(&o).unwrap();
    assert!(
        o["paths"]["/v1/payments"]["post"].is_object(),
        "OpenAPI documents create payment"
    );
    let nf = h.client.get("/nope").await.unwrap();
    assert_eq!(nf.0, 404);
    assert!(nf.1.contains("route_not_found"));
});

both!(events_are_written_with_state_changes, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (mch, c) = h.merchant("Shop").await;
    h.create(&c, 1000, "e1").await;
    h.create(&c, 1001, "e2").await;
    let open = h.create(&c, 1004, "e3").await;
    h.post(
        &c,
        &format!("/v1/payments/{}/close", open.body["id"].as_str().unwrap()),
        None,
        Some(&nonce()),
    )
    .await;
    let events = h
        .engine
        .store
        .list_events(mch.parse().unwrap(), 0, 100)
        .await
        .unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(
        types,
        vec!["payment.succeeded", "payment.failed", "payment.closed"]
    );
    let payload: Value = serde_json::from_str(&events[0].payload).unwrap();
    assert_eq!(payload["type"], "payment.succeeded");
    assert_eq!(payload["data"]["object"]["out_trade_no"], "e1");
});

both!(
    retry_after_a_crash_mid_request_finds_its_payment,
    |b| async move {
        use payrail_store::{Admission, IdempotencyClaim};
        let Some(h) = harness(b).await else { return };
        let (mch, c) = h.merchant("Shop").await;
        let apps = h
            .client
            .operator(
                &h.op,
                Method::GET,
                &format!("/v1/operator/merchants/{mch}/apps"),
                None,
                None,
            )
            .await
            .unwrap();
        let app = payrail_engine::auth::AppAuth {
            app_id: apps.body["data"][0]["id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
            merchant_id: mch.parse().unwrap(),
            key_id: c.key_id.clone(),
            merchant_active: true,
        };
        let body = json!({"amount": 1002, "currency": "CNY", "out_trade_no": "r1", "subject": "x", "method": "sandbox"}).to_string();
        let key = "crash-key";
        let hash = payrail_engine::auth::request_hash("POST", "/v1/payments", body.as_bytes());
        // The first try claimed its key and created its payment, still processing (a final
        // status would have saved the answer in the same commit); then the process died.
        let now = h.engine.now_ms();
        let claim = IdempotencyClaim {
            scope: mch.clone(),
            key: key.into(),
            request_hash: hash.clone(),
            now_ms: now,
            stale_after_ms: 60_000,
            token: "first-try".into(),
        };
        let input = payrail_engine::payments::CreatePayment {
            amount: payrail_domain::Money::payment_amount(1002, payrail_domain::Currency::CNY)
                .unwrap(),
            out_trade_no: payrail_domain::input::OutTradeNo::parse("r1").unwrap(),
            subject: payrail_domain::input::Subject::parse("x").unwrap(),
            method: payrail_domain::input::PaymentMethod::Sandbox,
            expires_in: payrail_domain::input::ExpiresIn::DEFAULT,
            notify_url: None,
            metadata: payrail_domain::input::Metadata::default(),
            payer: Default::default(),
        };
        // Its admission is made in the create write, as the API does.
        let first = match h
            .engine
            .create_payment(
                &app,
                input,
                Some(payrail_engine::payments::IdemRef {
                    key,
                    request_hash: &hash,
                    token: "first-try",
                }),
                Some(Admission {
                    now_ms: now,
                    nonce: None,
                    idempotency: Some(claim),
                }),
            )
            .await
            .unwrap()
        {
            payrail_engine::payments::CreateOutcome::Done(r) => r,
            other => panic!("{other:?}"),
        };
        // While the claim is fresh, a retry is told to wait.
        let busy = h.post(&c, "/v1/payments", Some(&body), Some(key)).await;
        assert_eq!(
            (busy.status, busy.error_code()),
            (409, Some("idempotency_key_in_use"))
        );
        // Once stale, the retry takes the key over and finds the payment instead of a duplicate error.
        h.clock.advance_ms(61_000);
        let retry = h.post(&c, "/v1/payments", Some(&body), Some(key)).await;
        assert_eq!(retry.status, 200, "{}", retry.body);
        assert_eq!(
            retry.body["id"].as_str().unwrap(),
            first.payment.id.to_string()
        );
        let replay = h.post(&c, "/v1/payments", Some(&body), Some(key)).await;
        assert!(replay.replayed);
        assert_eq!(replay.body["id"], retry.body["id"]);
        assert_eq!(h.count_payments(&c).await, 1);
    }
);

/// A channel that says "paid" at submit and "failed" when asked later.
struct Contradicting;

#[async_trait::async_trait]
impl payrail_channels::Connector for Contradicting {
    fn name(&self) -> &'static str {
        "a_contradicting" // sorts before "sandbox", so routing picks it
    }
    fn supports(&self, _: payrail_domain::input::PaymentMethod) -> bool {
        true
    }
    async fn submit(
        &self,
        _: &payrail_channels::SubmitRequest,
    ) -> payrail_channels::SubmitResponse {
        payrail_channels::SubmitResponse {
            outcome: payrail_domain::ChannelOutcome::Succeeded {
                channel_trade_no: Some("T1".into()),
                paid_at_ms: None,
            },
            next_action: None,
        }
    }
    async fn query(&self, _: &payrail_channels::QueryRequest) -> payrail_domain::ChannelOutcome {
        payrail_domain::ChannelOutcome::Failed {
            code: "LATE".into(),
            message: "contradiction".into(),
        }
    }
    async fn close(&self, _: &payrail_channels::QueryRequest) -> payrail_domain::ChannelOutcome {
        payrail_domain::ChannelOutcome::Closed
    }
}

both!(
    a_conflicting_later_result_alerts_and_never_flips,
    |b| async move {
        let Some(h) = harness_full(b, test_config(), false, Some(Arc::new(Contradicting))).await
        else {
            return;
        };
        let (_, c) = h.merchant("Shop").await;
        let a = h.create(&c, 1000, "conflict").await;
        assert_eq!(
            (a.body["status"].as_str(), a.body["channel"].as_str()),
            (Some("succeeded"), Some("a_contradicting"))
        );
        let id = a.body["id"].as_str().unwrap();
        let r = h.requery(id).await;
        assert_eq!(
            r.body["status"], "succeeded",
            "the first definite result wins"
        );
        let alerts = h
            .client
            .operator(&h.op, Method::GET, "/v1/operator/alerts", None, None)
            .await
            .unwrap();
        let list = alerts.body["data"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{}", alerts.body);
        assert_eq!(list[0]["kind"], "channel_conflict");
        assert_eq!(list[0]["subject_id"], id);
        let (_, m) = h.client.get("/metrics").await.unwrap();
        assert!(
            m.contains("payrail_channel_conflicts_total{channel=\"a_contradicting\"} 1"),
            "{m}"
        );
    }
);

both!(operator_query_errors_are_json, |b| async move {
    let Some(h) = harness(b).await else { return };
    for (q, code) in [
        ("limit=abc", "parameter_out_of_range"),
        ("foo=1", "parameter_unknown"),
        ("starting_after=x", "parameter_invalid"),
    ] {
        let a = h
            .client
            .operator(
                &h.op,
                Method::GET,
                &format!("/v1/operator/merchants?{q}"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            (a.status, a.error_code()),
            (400, Some(code)),
            "{q}: {}",
            a.body
        );
    }
});

both!(
    a_client_that_disconnects_mid_payment_does_not_cancel_it,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (_, c) = h.merchant("Shop").await;
        // `03` hangs at the channel until the 300 ms channel timeout; the client gives up at 100 ms.
        let body = json!({"amount": 1003, "currency": "CNY", "out_trade_no": "gone", "subject": "x", "method": "sandbox"}).to_string();
        let auth = payrail_domain::signing::authorization_header(
            &c.key_id,
            c.secret.as_bytes(),
            "POST",
            "/v1/payments",
            unix_now(),
            &nonce(),
            body.as_bytes(),
        );
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let r = impatient
            .post(format!("{}/v1/payments", h.client.base_url()))
            .header("authorization", auth)
            .header("content-type", "application/json")
            .header("idempotency-key", "gone-key")
            .body(body.clone())
            .send()
            .await;
        assert!(r.is_err(), "the client timed out");
        // The server finishes the request anyway (the channel times out at 300 ms) and saves its
        // answer: a retry is then a replay, not a 409 "in use" for the next minute. Asked again
        // until then, within a bound, so a loaded machine only makes it take longer.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let retry = loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = h
                .post(&c, "/v1/payments", Some(&body), Some("gone-key"))
                .await;
            if r.status != 409 || std::time::Instant::now() > deadline {
                break r;
            }
        };
        assert_eq!(retry.status, 200, "{}", retry.body);
        assert!(retry.replayed);
        assert_eq!(retry.body["status"], "processing");
    }
);

both!(
    a_frozen_merchant_answer_is_not_replayed_after_unfreeze,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (mch, c) = h.merchant("Shop").await;
        let op = |path: String| {
            let (client, token) = (h.client.clone(), h.op.clone());
            async move {
                client
                    .operator(&token, Method::POST, &path, None, Some(&nonce()))
                    .await
                    .unwrap()
            }
        };
        op(format!("/v1/operator/merchants/{mch}/freeze")).await;
        let body = json!({"amount": 1000, "currency": "CNY", "out_trade_no": "fz", "subject": "x", "method": "sandbox"}).to_string();
        let a = h
            .post(&c, "/v1/payments", Some(&body), Some("fz-key"))
            .await;
        assert_eq!(a.error_code(), Some("merchant_frozen"));
        op(format!("/v1/operator/merchants/{mch}/unfreeze")).await;
        let b2 = h
            .post(&c, "/v1/payments", Some(&body), Some("fz-key"))
            .await;
        assert_eq!(b2.status, 200, "{}", b2.body);
        assert!(!b2.replayed);
        assert_eq!(b2.body["status"], "succeeded");
    }
);

both!(a_freeze_by_another_process_counts_at_once, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (mch, c) = h.merchant("Shop").await;
    assert_eq!(
        h.create(&c, 1000, "before").await.status,
        200,
        "the app is now cached as active"
    );
    // Another process freezes the merchant: this process's cache is not told.
    let id: payrail_domain::MerchantId = mch.parse().unwrap();
    h.engine
        .store
        .set_merchant_status(id, payrail_store::MerchantStatus::Frozen, h.engine.now_ms())
        .await
        .unwrap();
    let a = h.create(&c, 1000, "after").await;
    assert_eq!(
        (a.status, a.error_code()),
        (403, Some("merchant_frozen")),
        "{}",
        a.body
    );
    assert_eq!(
        h.get(&c, "/v1/payments/out_trade_no/after").await.status,
        404,
        "nothing written"
    );
});

/// A channel that never gives a definite answer: every call is unknown.
struct Silent;

#[async_trait::async_trait]
impl payrail_channels::Connector for Silent {
    fn name(&self) -> &'static str {
        "a_silent" // sorts before "sandbox", so routing picks it
    }
    fn supports(&self, _: payrail_domain::input::PaymentMethod) -> bool {
        true
    }
    async fn submit(
        &self,
        _: &payrail_channels::SubmitRequest,
    ) -> payrail_channels::SubmitResponse {
        payrail_channels::SubmitResponse {
            outcome: payrail_domain::ChannelOutcome::unknown("HTTP 503"),
            next_action: None,
        }
    }
    async fn query(&self, _: &payrail_channels::QueryRequest) -> payrail_domain::ChannelOutcome {
        payrail_domain::ChannelOutcome::unknown("order not found")
    }
    async fn close(&self, _: &payrail_channels::QueryRequest) -> payrail_domain::ChannelOutcome {
        payrail_domain::ChannelOutcome::unknown("order not found")
    }
}

both!(
    an_expired_payment_the_channel_never_resolves_alerts_once,
    |b| async move {
        let Some(h) = harness_full(b, test_config(), false, Some(Arc::new(Silent))).await else {
            return;
        };
        let (_, c) = h.merchant("Shop").await;
        let body = json!({"amount": 1000, "currency": "CNY", "out_trade_no": "silent", "subject": "x", "method": "sandbox", "expires_in": 60}).to_string();
        let a = h
            .post(&c, "/v1/payments", Some(&body), Some(&nonce()))
            .await;
        assert_eq!(a.body["status"], "processing", "{}", a.body);
        let sync_once = |advance_ms: i64| {
            let h = &h;
            async move {
                h.clock.advance_ms(advance_ms);
                let now = h.engine.now_ms();
                let jobs = h
                    .engine
                    .store
                    .lease_jobs(payrail_engine::JOB_PAYMENT_SYNC, now, 30_000, 10)
                    .await
                    .unwrap();
                assert_eq!(jobs.len(), 1, "the payment keeps its sync job");
                h.engine.sync_payment(&jobs[0]).await.unwrap();
            }
        };
        let unresolved = || async {
            h.engine
                .store
                .list_alerts(10)
                .await
                .unwrap()
                .into_iter()
                .filter(|a| a.kind == "payment_unresolved")
                .count()
        };
        // Expired, but not yet long enough: the close is retried, no alert.
        sync_once(61_000).await;
        assert_eq!(unresolved().await, 0);
        // An hour past expiry: one alert, and only one however often the job runs.
        sync_once(3_600_000).await;
        assert_eq!(unresolved().await, 1);
        sync_once(400_000).await;
        assert_eq!(unresolved().await, 1);
        // (Read from the store: the server's clock is hours ahead of the client's signatures.)
        let id = a.body["id"].as_str().unwrap().parse().unwrap();
        let p = h.engine.store.get_payment_any(id).await.unwrap().unwrap();
        assert_eq!(
            p.status,
            payrail_domain::PaymentStatus::Processing,
            "unknown is never failure"
        );
    }
);

both!(
    an_open_payments_sync_job_backs_off_doubling_up_to_the_cap,
    |b| async move {
        let cfg = EngineConfig {
            sync_first_delay_ms: 1_000,
            sync_max_delay_ms: 4_000,
            ..test_config()
        };
        let Some(h) = harness_with(b, cfg, false).await else {
            return;
        };
        let (_, c) = h.merchant("Shop").await;
        // Sandbox ..04: the order is open and the payer never pays (until expiry, 30 min).
        let a = h.create(&c, 1004, "backoff").await;
        assert_eq!(a.body["status"], "processing", "{}", a.body);
        let id: payrail_domain::PaymentId = a.body["id"].as_str().unwrap().parse().unwrap();
        let kind = payrail_engine::JOB_PAYMENT_SYNC;
        // The first query a short delay after the create's answer, then 2^N growth, capped.
        // Each due time is checked through the store: the job cannot be leased 1 ms before it
        // and can at it (the clock stands still between runs).
        let mut due = h.clock.now_ms();
        for (run, gap) in [1_000, 1_000, 2_000, 4_000, 4_000, 4_000]
            .into_iter()
            .enumerate()
        {
            let at = due + gap;
            let early = h
                .engine
                .store
                .lease_jobs(kind, at - 1, 30_000, 10)
                .await
                .unwrap();
            assert!(early.is_empty(), "run {run}: due before +{gap} ms");
            h.clock.set_ms(at);
            let jobs = h
                .engine
                .store
                .lease_jobs(kind, at, 30_000, 10)
                .await
                .unwrap();
            assert_eq!(jobs.len(), 1, "run {run}: not due at +{gap} ms");
            assert_eq!(jobs[0].subject_id, id.to_string());
            h.engine.sync_payment(&jobs[0]).await.unwrap();
            due = at;
        }
        let p = h.engine.store.get_payment_any(id).await.unwrap().unwrap();
        assert_eq!(p.status, payrail_domain::PaymentStatus::Processing);
    }
);

both!(operators_requery_open_payments_in_a_batch, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    // Sandbox ..02: processing, paid 3 s after submission; ..00: succeeded at once.
    let open1 = h.create(&c, 1002, "b1").await;
    let open2 = h.create(&c, 2002, "b2").await;
    let done = h.create(&c, 1000, "b3").await;
    assert_eq!(open1.body["status"], "processing");
    assert_eq!(done.body["status"], "succeeded");
    h.clock.advance_ms(3_100);
    let r = h
        .client
        .operator(
            &h.op,
            Method::POST,
            "/v1/operator/payments/requery",
            Some(&json!({"open": true})),
            Some(&nonce()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let mut got: Vec<(String, String)> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["id"].as_str().unwrap().to_string(),
                x["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want = vec![
        (
            open1.body["id"].as_str().unwrap().to_string(),
            "succeeded".to_string(),
        ),
        (
            open2.body["id"].as_str().unwrap().to_string(),
            "succeeded".to_string(),
        ),
    ];
    want.sort();
    assert_eq!(got, want, "only the open payments, now resolved");
    // Named ids; a bad id is a 400 and nothing runs.
    let named = h
        .client
        .operator(
            &h.op,
            Method::POST,
            "/v1/operator/payments/requery",
            Some(&json!({"payment_ids": [done.body["id"]]})),
            Some(&nonce()),
        )
        .await
        .unwrap();
    assert_eq!(
        named.body["data"][0]["status"], "succeeded",
        "{}",
        named.body
    );
    let bad = h
        .client
        .operator(
            &h.op,
            Method::POST,
            "/v1/operator/payments/requery",
            Some(&json!({"payment_ids": ["nope"]})),
            Some(&nonce()),
        )
        .await
        .unwrap();
    assert_eq!(
        (bad.status, bad.error_code()),
        (400, Some("parameter_invalid"))
    );
});

// --- refunds --------------------------------------------------------------------------------

impl Harness {
    async fn refund(&self, c: &Credentials, payment_id: &str, amount: i64, otn: &str) -> Answer {
        let body =
            json!({"payment_id": payment_id, "amount": amount, "out_refund_no": otn}).to_string();
        self.post(c, "/v1/refunds", Some(&body), Some(&nonce()))
            .await
    }

    async fn paid(&self, c: &Credentials, amount: i64, otn: &str) -> String {
        let a = self.create(c, amount, otn).await;
        assert_eq!(a.body["status"], "succeeded", "{}", a.body);
        a.body["id"].as_str().unwrap().to_string()
    }

    async fn payment_json(&self, c: &Credentials, id: &str) -> Value {
        let a = self.get(c, &format!("/v1/payments/{id}")).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body
    }

    async fn refund_count(&self, c: &Credentials, payment_id: &str) -> usize {
        let a = self
            .get(c, &format!("/v1/refunds?payment_id={payment_id}&limit=100"))
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["data"].as_array().unwrap().len()
    }

    async fn refund_events(&self, mch: &str) -> Vec<Value> {
        self.engine
            .store
            .list_events(mch.parse().unwrap(), 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type.starts_with("refund."))
            .map(|e| serde_json::from_str(&e.payload).unwrap())
            .collect()
    }

    async fn alerts_of(&self, kind: &str) -> Vec<payrail_store::AlertRecord> {
        self.engine
            .store
            .list_alerts(100)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.kind == kind)
            .collect()
    }
}

both!(
    partial_then_full_refund_and_over_refunds_refused,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (mch, c) = h.merchant("Shop").await;
        let body = json!({"amount": 10000, "currency": "CNY", "out_trade_no": "rf-1", "subject": "x", "method": "sandbox", "notify_url": "https://shop.example/n"}).to_string();
        let paid = h
            .post(&c, "/v1/payments", Some(&body), Some(&nonce()))
            .await;
        let pid = paid.body["id"].as_str().unwrap().to_string();
        assert_eq!(
            (
                &paid.body["amount_refunded"],
                &paid.body["amount_refundable"]
            ),
            (&json!(0), &json!(10000))
        );

        // Partial: 3000 of 10000.
        let body = json!({"payment_id": pid, "amount": 3000, "out_refund_no": "r-1", "reason": "退货", "metadata": {"rma": "7"}}).to_string();
        let r1 = h.post(&c, "/v1/refunds", Some(&body), Some(&nonce())).await;
        assert_eq!(r1.status, 200, "{}", r1.body);
        let r = &r1.body;
        assert_eq!(r["object"], "refund");
        assert!(r["id"].as_str().unwrap().starts_with("rfd_"));
        assert_eq!(r["status"], "succeeded");
        assert_eq!(r["payment_id"], pid.as_str());
        assert_eq!(r["merchant_id"], mch.as_str());
        assert_eq!(
            (r["amount"].as_i64(), r["currency"].as_str()),
            (Some(3000), Some("CNY"))
        );
        assert_eq!(r["reason"], "退货");
        assert_eq!(r["metadata"], json!({"rma": "7"}));
        assert_eq!(
            r["notify_url"], "https://shop.example/n",
            "the payment's, by default"
        );
        assert!(r["channel_refund_no"]
            .as_str()
            .unwrap()
            .starts_with("sbx_r_"));
        assert!(r["refunded_at"].as_i64().is_some());
        let p = h.payment_json(&c, &pid).await;
        assert_eq!(
            (
                p["amount_refunded"].as_i64(),
                p["amount_refundable"].as_i64()
            ),
            (Some(3000), Some(7000))
        );
        let g = h
            .get(&c, &format!("/v1/refunds/{}", r["id"].as_str().unwrap()))
            .await;
        assert_eq!(g.body, r1.body);
        assert_eq!(
            h.get(&c, "/v1/refunds/out_refund_no/r-1").await.body["id"],
            r["id"]
        );

        // Over the remainder by one minor unit: refused, nothing written.
        let over = h.refund(&c, &pid, 7001, "r-over").await;
        assert_eq!(
            (
                over.status,
                over.error_code(),
                over.body["error"]["param"].as_str()
            ),
            (409, Some("refund_exceeds_payment"), Some("amount")),
            "{}",
            over.body
        );
        assert_eq!(h.refund_count(&c, &pid).await, 1);
        assert_eq!(h.payment_json(&c, &pid).await, p);
        assert_eq!(
            h.get(&c, "/v1/refunds/out_refund_no/r-over").await.status,
            404
        );

        // The rest, exactly: fully refunded; then nothing is left. (Ids sort by creation
        // time: the clock moves so that the newest-first order below is defined.)
        h.clock.advance_ms(10);
        let full = h.refund(&c, &pid, 7000, "r-2").await;
        assert_eq!(full.body["status"], "succeeded", "{}", full.body);
        let p = h.payment_json(&c, &pid).await;
        assert_eq!(
            (
                p["status"].as_str(),
                p["amount_refunded"].as_i64(),
                p["amount_refundable"].as_i64()
            ),
            (Some("succeeded"), Some(10000), Some(0))
        );
        assert_eq!(
            h.refund(&c, &pid, 1, "r-3").await.error_code(),
            Some("refund_exceeds_payment")
        );

        // Every bad input is a 4xx with a stable code, and writes nothing.
        let failed = h.create(&c, 1001, "rf-failed").await.body["id"]
            .as_str()
            .unwrap()
            .to_string();
        let open = h.create(&c, 1002, "rf-open").await.body["id"]
            .as_str()
            .unwrap()
            .to_string();
        let other = h.paid(&c, 500, "rf-other").await;
        let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
            (
                json!({"payment_id": other, "amount": 0, "out_refund_no": "x1"}),
                400,
                "amount_invalid",
                Some("amount"),
            ),
            (
                json!({"payment_id": other, "amount": -5, "out_refund_no": "x1"}),
                400,
                "amount_invalid",
                Some("amount"),
            ),
            (
                json!({"payment_id": other, "amount": "5", "out_refund_no": "x1"}),
                400,
                "parameter_invalid",
                Some("amount"),
            ),
            (
                json!({"payment_id": other, "amount": 1.5, "out_refund_no": "x1"}),
                400,
                "parameter_invalid",
                Some("amount"),
            ),
            (
                json!({"payment_id": other, "amount": 5}),
                400,
                "parameter_missing",
                Some("out_refund_no"),
            ),
            (
                json!({"payment_id": other, "amount": 5, "out_refund_no": "has space"}),
                400,
                "parameter_invalid",
                Some("out_refund_no"),
            ),
            (
                json!({"payment_id": other, "amount": 5, "out_refund_no": "x1", "refund_all": true}),
                400,
                "parameter_unknown",
                Some("refund_all"),
            ),
            (
                json!({"payment_id": other, "amount": 5, "out_refund_no": "x1", "reason": "字".repeat(81)}),
                400,
                "parameter_too_long",
                Some("reason"),
            ),
            (
                json!({"payment_id": other, "amount": 5, "out_refund_no": "x1", "notify_url": "ftp://x"}),
                400,
                "parameter_invalid",
                Some("notify_url"),
            ),
            (
                json!({"payment_id": other, "amount": 5, "out_refund_no": "x1", "currency": "usd"}),
                400,
                "currency_invalid",
                Some("currency"),
            ),
            (
                json!({"payment_id": other, "amount": 5, "out_refund_no": "x1", "currency": "USD"}),
                400,
                "currency_mismatch",
                Some("currency"),
            ),
            (
                json!({"payment_id": "pay_nope", "amount": 5, "out_refund_no": "x1"}),
                400,
                "parameter_invalid",
                Some("payment_id"),
            ),
            (
                json!({"payment_id": "pay_01M80X1JKZ45058CKTFVQJKG7W", "amount": 5, "out_refund_no": "x1"}),
                404,
                "resource_missing",
                None,
            ),
            (
                json!({"payment_id": failed, "amount": 5, "out_refund_no": "x1"}),
                409,
                "payment_not_refundable",
                Some("payment_id"),
            ),
            (
                json!({"payment_id": open, "amount": 5, "out_refund_no": "x1"}),
                409,
                "payment_not_refundable",
                Some("payment_id"),
            ),
            (
                json!({"payment_id": other, "amount": 501, "out_refund_no": "x1"}),
                409,
                "refund_exceeds_payment",
                Some("amount"),
            ),
            (
                json!({"payment_id": other, "amount": 5, "out_refund_no": "r-1"}),
                409,
                "duplicate_out_refund_no",
                Some("out_refund_no"),
            ),
        ];
        for (body, status, code, param) in cases {
            let a = h
                .post(&c, "/v1/refunds", Some(&body.to_string()), Some(&nonce()))
                .await;
            assert_eq!(
                (a.status, a.error_code(), a.body["error"]["param"].as_str()),
                (status, Some(code), param),
                "{body}: {}",
                a.body
            );
        }
        let no_key = h
            .post(
                &c,
                "/v1/refunds",
                Some(&json!({"payment_id": other, "amount": 5, "out_refund_no": "x1"}).to_string()),
                None,
            )
            .await;
        assert_eq!(no_key.error_code(), Some("idempotency_key_missing"));
        assert_eq!(h.refund_count(&c, &other).await, 0);
        assert_eq!(h.payment_json(&c, &other).await["amount_refundable"], 500);
        let all = h.get(&c, "/v1/refunds?limit=100").await;
        assert_eq!(
            all.body["data"].as_array().unwrap().len(),
            2,
            "{}",
            all.body
        );

        // Pagination, newest first.
        let page = h.get(&c, "/v1/refunds?limit=1").await;
        assert_eq!(page.body["has_more"], true);
        assert_eq!(page.body["data"][0]["id"], full.body["id"]);
        let next = h
            .get(
                &c,
                &format!(
                    "/v1/refunds?limit=1&starting_after={}",
                    full.body["id"].as_str().unwrap()
                ),
            )
            .await;
        assert_eq!(next.body["data"][0]["id"], r1.body["id"]);
        assert_eq!(next.body["has_more"], false);
        for (q, code) in [
            ("limit=0", "parameter_out_of_range"),
            ("starting_after=pay_x", "parameter_invalid"),
            ("payment_id=rfd_x", "parameter_invalid"),
            ("status=succeeded", "parameter_unknown"),
        ] {
            assert_eq!(
                h.get(&c, &format!("/v1/refunds?{q}")).await.error_code(),
                Some(code),
                "{q}"
            );
        }

        // One refund.succeeded event per refund, carrying what webhook delivery needs.
        let events = h.refund_events(&mch).await;
        assert_eq!(events.len(), 2);
        let e = &events[0];
        assert!(e["id"].as_str().unwrap().starts_with("evt_"));
        assert_eq!(
            (e["object"].as_str(), e["type"].as_str()),
            (Some("event"), Some("refund.succeeded"))
        );
        let obj = &e["data"]["object"];
        assert_eq!(obj["id"], r["id"]);
        assert_eq!(obj["payment_id"], pid.as_str());
        assert_eq!(obj["app_id"], paid.body["app_id"]);
        assert_eq!(obj["notify_url"], "https://shop.example/n");
        assert_eq!(obj["status"], "succeeded");

        // The OpenAPI document describes the refund routes and every refund error code.
        let (_, o) = h.client.get("/openapi.json").await.unwrap();
        let o: Value = serde_json::from_str(&o).unwrap();
        for path in [
            "/v1/refunds",
            "/v1/refunds/{id}",
            "/v1/operator/refunds/{id}/requery",
        ] {
            assert!(o["paths"][path].is_object(), "{path}");
        }
        let codes = o["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
            ["code"]["enum"]
            .as_array()
            .unwrap()
            .clone();
        for code in [
            "currency_mismatch",
            "duplicate_out_refund_no",
            "payment_not_refundable",
            "refund_exceeds_payment",
            "refund_not_supported",
            "partial_refund_not_supported",
            "refund_window_expired",
            "too_many_refunds",
        ] {
            assert!(codes.contains(&json!(code)), "{code} undocumented");
        }
    }
);

both!(
    many_parallel_refunds_never_exceed_the_payment,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (mch, c) = h.merchant("Shop").await;
        let pid = h.paid(&c, 10_000, "par-1").await;
        // 20 concurrent refunds of a tenth each: exactly 10 fit.
        let started = std::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let (client, c, pid) = (h.client.clone(), c.clone(), pid.clone());
            tasks.push(tokio::spawn(async move {
                let body =
                json!({"payment_id": pid, "amount": 1000, "out_refund_no": format!("par-r{i}")})
                    .to_string();
                client
                    .signed(&c, Method::POST, "/v1/refunds", Some(&body), Some(&nonce()))
                    .await
                    .unwrap()
            }));
        }
        let mut ok = 0;
        let mut refunded = 0;
        for t in tasks {
            let a = t.await.unwrap();
            match a.status {
                200 => {
                    assert_eq!(a.body["status"], "succeeded", "{}", a.body);
                    ok += 1;
                    refunded += a.body["amount"].as_i64().unwrap();
                }
                409 => assert_eq!(a.error_code(), Some("refund_exceeds_payment"), "{}", a.body),
                other => panic!("unexpected {other}: {}", a.body),
            }
        }
        assert_eq!(ok, 10, "exactly the refunds that fit");
        assert_eq!(refunded, 10_000);
        assert!(started.elapsed() < Duration::from_secs(10));
        let p = h.payment_json(&c, &pid).await;
        assert_eq!(
            (
                p["amount_refunded"].as_i64(),
                p["amount_refundable"].as_i64()
            ),
            (Some(10_000), Some(0))
        );
        assert_eq!(h.refund_count(&c, &pid).await, 10);
        assert_eq!(h.refund_events(&mch).await.len(), 10);
    }
);

both!(refund_idempotency_and_out_refund_no_reuse, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    let pid = h.paid(&c, 5000, "idem-r").await;
    let body = json!({"payment_id": pid, "amount": 1000, "out_refund_no": "ir-1"}).to_string();
    let first = h.post(&c, "/v1/refunds", Some(&body), Some("rk-1")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let again = h.post(&c, "/v1/refunds", Some(&body), Some("rk-1")).await;
    assert!(again.replayed);
    assert_eq!((again.status, &again.body), (200, &first.body));
    let other = body.replace("1000", "1001");
    assert_eq!(
        h.post(&c, "/v1/refunds", Some(&other), Some("rk-1"))
            .await
            .error_code(),
        Some("idempotency_key_reused")
    );
    // The same out_refund_no under another key is another request: refused, nothing reserved.
    let reuse = h.post(&c, "/v1/refunds", Some(&body), Some("rk-2")).await;
    assert_eq!(
        (reuse.status, reuse.error_code()),
        (409, Some("duplicate_out_refund_no"))
    );
    assert_eq!(h.payment_json(&c, &pid).await["amount_refunded"], 1000);
    // A refusal is stored under its key too: the same request gets the same answer.
    let big = json!({"payment_id": pid, "amount": 4001, "out_refund_no": "ir-big"}).to_string();
    let refused = h.post(&c, "/v1/refunds", Some(&big), Some("rk-3")).await;
    assert_eq!(refused.error_code(), Some("refund_exceeds_payment"));
    let replay = h.post(&c, "/v1/refunds", Some(&big), Some("rk-3")).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, refused.body);

    // 8 concurrent identical requests under one new key: one refund, every success is it.
    let body = json!({"payment_id": pid, "amount": 500, "out_refund_no": "ir-c"}).to_string();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, c, body) = (h.client.clone(), c.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            client
                .signed(&c, Method::POST, "/v1/refunds", Some(&body), Some("rk-c"))
                .await
                .unwrap()
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let a = t.await.unwrap();
        match a.status {
            200 => {
                ids.insert(a.body["id"].as_str().unwrap().to_string());
            }
            409 => assert_eq!(a.error_code(), Some("idempotency_key_in_use"), "{}", a.body),
            s => panic!("unexpected {s}: {}", a.body),
        }
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(h.refund_count(&c, &pid).await, 2);
    assert_eq!(h.payment_json(&c, &pid).await["amount_refunded"], 1500);
});

both!(
    unknown_refunds_resolve_through_the_sync_worker,
    |b| async move {
        let Some(h) = harness_with(b, test_config(), true).await else {
            return;
        };
        let (mch, c) = h.merchant("Shop").await;
        let pid = h.paid(&c, 10_000, "sync-r").await;
        // 5xx although made (..06), and accepted but processing for 3 s (..02).
        let unknown = h.refund(&c, &pid, 106, "s-06").await;
        let pending = h.refund(&c, &pid, 202, "s-02").await;
        for a in [&unknown, &pending] {
            assert_eq!(
                (a.status, a.body["status"].as_str()),
                (200, Some("processing")),
                "{}",
                a.body
            );
            assert!(a.body["refunded_at"].is_null());
        }
        // Processing refunds keep their amount reserved: never refundable twice.
        let p = h.payment_json(&c, &pid).await;
        assert_eq!(
            (
                p["amount_refunded"].as_i64(),
                p["amount_refundable"].as_i64()
            ),
            (Some(0), Some(10_000 - 308))
        );
        assert_eq!(
            h.refund(&c, &pid, 10_000 - 307, "s-over")
                .await
                .error_code(),
            Some("refund_exceeds_payment")
        );
        let status_of = |a: &Answer| a.body["id"].as_str().unwrap().to_string();
        let (uid, pid2) = (status_of(&unknown), status_of(&pending));
        let wait_for = |id: String, want: &'static str| {
            let h = &h;
            let c = &c;
            async move {
                let mut last = Value::Null;
                for _ in 0..200 {
                    last = h.get(c, &format!("/v1/refunds/{id}")).await.body;
                    if last["status"] == want {
                        return last;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("{id} never became {want}: {last}");
            }
        };
        // The first query finds the ..06 refund made.
        h.clock.advance_ms(1_000);
        let done = wait_for(uid.clone(), "succeeded").await;
        assert!(done["refunded_at"].as_i64().is_some());
        assert_eq!(
            h.get(&c, &format!("/v1/refunds/{pid2}")).await.body["status"],
            "processing",
            "still processing at the channel"
        );
        h.clock.advance_ms(3_000);
        wait_for(pid2, "succeeded").await;
        let p = h.payment_json(&c, &pid).await;
        assert_eq!(
            (
                p["amount_refunded"].as_i64(),
                p["amount_refundable"].as_i64()
            ),
            (Some(308), Some(10_000 - 308))
        );
        assert_eq!(
            h.engine
                .store
                .count_jobs(payrail_engine::JOB_REFUND_SYNC)
                .await
                .unwrap(),
            0,
            "no job left behind"
        );
        let types: Vec<String> = h
            .refund_events(&mch)
            .await
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(types, vec!["refund.succeeded", "refund.succeeded"]);
    }
);

both!(refunds_are_isolated_between_merchants, |b| async move {
    let Some(h) = harness(b).await else { return };
    let (_, a) = h.merchant("Shop A").await;
    let (_, bm) = h.merchant("Shop B").await;
    let pa = h.paid(&a, 1000, "iso").await;
    let ra = h.refund(&a, &pa, 100, "iso-r").await;
    assert_eq!(ra.status, 200);
    let rid = ra.body["id"].as_str().unwrap();
    // B can neither refund nor see A's payment or refunds: 404, as for ids that do not exist.
    let steal = h.refund(&bm, &pa, 100, "steal").await;
    assert_eq!(
        (steal.status, steal.error_code()),
        (404, Some("resource_missing"))
    );
    assert_eq!(h.get(&bm, &format!("/v1/refunds/{rid}")).await.status, 404);
    assert_eq!(
        h.get(&bm, "/v1/refunds/out_refund_no/iso-r").await.status,
        404
    );
    assert_eq!(
        h.get(&bm, &format!("/v1/refunds?payment_id={pa}"))
            .await
            .status,
        404
    );
    assert_eq!(
        h.get(&bm, "/v1/refunds").await.body["data"],
        json!([]),
        "B sees no refunds"
    );
    assert_eq!(h.payment_json(&a, &pa).await["amount_refunded"], 100);
    // out_refund_no is unique per merchant: B may use A's for its own payment.
    let pb = h.paid(&bm, 1000, "iso").await;
    assert_eq!(h.refund(&bm, &pb, 100, "iso-r").await.status, 200);
    assert_eq!(h.refund_count(&a, &pa).await, 1);
});

/// A channel whose refunds are scripted: amounts ending in 01 are refused; everything else
/// succeeds at once. `query_refund` answers what `queried` says. At most 3 refunds per payment.
struct RefundScript {
    query_says_succeeded: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl payrail_channels::Connector for RefundScript {
    fn name(&self) -> &'static str {
        "a_refunds" // sorts before "sandbox", so routing picks it
    }
    fn supports(&self, _: payrail_domain::input::PaymentMethod) -> bool {
        true
    }
    fn capabilities(&self) -> payrail_channels::Capabilities {
        payrail_channels::Capabilities {
            methods: Vec::new(),
            refund: true,
            partial_refund: true,
            refund_window_days: 365,
            max_refunds_per_payment: Some(3),
            cancel_window_ms: None,
            refund_query_delay_ms: 10_000,
            bills: false,
            close_confirm_delay_ms: 0,
        }
    }
    async fn submit(
        &self,
        r: &payrail_channels::SubmitRequest,
    ) -> payrail_channels::SubmitResponse {
        payrail_channels::SubmitResponse {
            outcome: payrail_domain::ChannelOutcome::Succeeded {
                channel_trade_no: Some(format!("ch_{}", r.attempt_id)),
                paid_at_ms: None,
            },
            next_action: None,
        }
    }
    async fn query(&self, _: &payrail_channels::QueryRequest) -> payrail_domain::ChannelOutcome {
        payrail_domain::ChannelOutcome::unknown("not used")
    }
    async fn close(&self, _: &payrail_channels::QueryRequest) -> payrail_domain::ChannelOutcome {
        payrail_domain::ChannelOutcome::unknown("not used")
    }
    async fn refund(&self, r: &payrail_channels::RefundRequest) -> payrail_channels::RefundOutcome {
        match r.refund_amount.amount_minor().rem_euclid(100) {
            1 => payrail_channels::RefundOutcome::Failed {
                code: "NOT_ENOUGH".into(),
                message: "merchant balance too low".into(),
            },
            2 => payrail_channels::RefundOutcome::Processing {
                channel_refund_no: None,
            },
            _ => payrail_channels::RefundOutcome::Succeeded {
                channel_refund_no: Some(format!("chr_{}", r.refund_id)),
                refunded_at_ms: None,
            },
        }
    }
    async fn query_refund(
        &self,
        _: &payrail_channels::RefundRequest,
    ) -> payrail_channels::RefundOutcome {
        if self
            .query_says_succeeded
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            payrail_channels::RefundOutcome::Succeeded {
                channel_refund_no: None,
                refunded_at_ms: None,
            }
        } else {
            payrail_channels::RefundOutcome::unknown("ABNORMAL")
        }
    }
}

both!(
    a_failed_refund_releases_its_amount_and_a_contradiction_alerts,
    |b| async move {
        let script = Arc::new(RefundScript {
            query_says_succeeded: std::sync::atomic::AtomicBool::new(false),
        });
        let Some(h) = harness_full(b, test_config(), false, Some(script.clone())).await else {
            return;
        };
        let (mch, c) = h.merchant("Shop").await;
        let pid = h.paid(&c, 1000, "fail-r").await;
        let failed = h.refund(&c, &pid, 501, "f-1").await;
        assert_eq!(
            failed.status, 200,
            "a refused refund is an answer, not an HTTP error"
        );
        assert_eq!(failed.body["status"], "failed");
        assert_eq!(failed.body["failure"]["code"], "NOT_ENOUGH");
        assert_eq!(failed.body["channel"], "a_refunds");
        let p = h.payment_json(&c, &pid).await;
        assert_eq!(
            (
                p["amount_refunded"].as_i64(),
                p["amount_refundable"].as_i64()
            ),
            (Some(0), Some(1000)),
            "the failure released its amount"
        );
        let events = h.refund_events(&mch).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "refund.failed");
        assert_eq!(events[0]["data"]["object"]["failure"]["code"], "NOT_ENOUGH");

        // The whole amount is refundable again.
        assert_eq!(
            h.refund(&c, &pid, 1000, "f-2").await.body["status"],
            "succeeded"
        );

        // The operator re-queries the failed refund; the channel now claims it succeeded: the
        // first definite answer wins, an alert is raised.
        script
            .query_says_succeeded
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let fid = failed.body["id"].as_str().unwrap();
        let rq = h
            .client
            .operator(
                &h.op,
                Method::POST,
                &format!("/v1/operator/refunds/{fid}/requery"),
                None,
                Some(&nonce()),
            )
            .await
            .unwrap();
        assert_eq!(
            (rq.status, rq.body["status"].as_str()),
            (200, Some("failed")),
            "{}",
            rq.body
        );
        assert_eq!(rq.body["version"], 2);
        assert_eq!(h.alerts_of("refund_conflict").await.len(), 1);
        let og = h
            .client
            .operator(
                &h.op,
                Method::GET,
                &format!("/v1/operator/refunds/{fid}"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(og.body["status"], "failed");
        assert_eq!(h.payment_json(&c, &pid).await["amount_refunded"], 1000);

        // The channel's limit of refunds per payment (3 here) counts the failed ones too.
        let q = h.paid(&c, 1000, "max-r").await;
        for (i, amount) in [101, 100, 100].into_iter().enumerate() {
            assert_eq!(
                h.refund(&c, &q, amount, &format!("m-{i}")).await.status,
                200
            );
        }
        let fourth = h.refund(&c, &q, 100, "m-3").await;
        assert_eq!(
            (fourth.status, fourth.error_code()),
            (409, Some("too_many_refunds")),
            "{}",
            fourth.body
        );
        assert_eq!(h.refund_count(&c, &q).await, 3);
    }
);

both!(
    a_processing_refund_waits_for_the_channel_query_delay_and_alerts_when_unresolved,
    |b| async move {
        let script = Arc::new(RefundScript {
            query_says_succeeded: std::sync::atomic::AtomicBool::new(false),
        });
        let Some(h) = harness_full(b, test_config(), false, Some(script.clone())).await else {
            return;
        };
        let (_, c) = h.merchant("Shop").await;
        let pid = h.paid(&c, 1000, "slow-r").await;
        let r = h.refund(&c, &pid, 102, "slow-1").await;
        assert_eq!(r.body["status"], "processing");
        let rid: payrail_domain::RefundId = r.body["id"].as_str().unwrap().parse().unwrap();
        let lease = |h: &Harness| {
            let now = h.engine.now_ms();
            let store = h.engine.store.clone();
            async move {
                store
                    .lease_jobs(payrail_engine::JOB_REFUND_SYNC, now, 30_000, 10)
                    .await
                    .unwrap()
            }
        };
        // This channel allows a refund query 10 s after the refund, not before.
        h.clock.advance_ms(9_000);
        assert!(
            lease(&h).await.is_empty(),
            "queried before the channel allows"
        );
        h.clock.advance_ms(1_100);
        let jobs = lease(&h).await;
        assert_eq!(jobs.len(), 1);
        h.engine.sync_refund(&jobs[0]).await.unwrap();
        // Unknown (ABNORMAL) stays processing, the amount stays reserved; an hour later an alert.
        let stored = |h: &Harness| {
            let store = h.engine.store.clone();
            async move { store.get_refund_any(rid).await.unwrap().unwrap() }
        };
        assert_eq!(
            stored(&h).await.status,
            payrail_domain::RefundStatus::Processing
        );
        assert!(h.alerts_of("refund_unresolved").await.is_empty());
        h.clock.advance_ms(3_600_000);
        let jobs = lease(&h).await;
        assert_eq!(jobs.len(), 1, "the refund keeps its job");
        h.engine.sync_refund(&jobs[0]).await.unwrap();
        assert_eq!(h.alerts_of("refund_unresolved").await.len(), 1);
        assert_eq!(
            stored(&h).await.status,
            payrail_domain::RefundStatus::Processing
        );
        // Then the channel answers: succeeded, job gone.
        script
            .query_says_succeeded
            .store(true, std::sync::atomic::Ordering::SeqCst);
        h.clock.advance_ms(400_000);
        let jobs = lease(&h).await;
        h.engine.sync_refund(&jobs[0]).await.unwrap();
        assert_eq!(
            stored(&h).await.status,
            payrail_domain::RefundStatus::Succeeded
        );
        assert!(lease(&h).await.is_empty());
        let p = h
            .engine
            .store
            .get_payment_any(pid.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.amount_refunded_minor, p.refund_reserved_minor),
            (102, 102)
        );
    }
);

both!(refund_notifications_are_cross_checked, |b| async move {
    use payrail_channels::RefundOutcome;
    use payrail_domain::{Currency, Money};
    use payrail_engine::refunds::{RefundNotice, RefundNoticeResult};
    let Some(h) = harness(b).await else { return };
    let (_, c) = h.merchant("Shop").await;
    let pid = h.paid(&c, 1000, "notice").await;
    // ..02: processing at the channel for 3 s; a notification will finish it.
    let r = h.refund(&c, &pid, 302, "n-1").await;
    assert_eq!(r.body["status"], "processing");
    let rid = r.body["id"].as_str().unwrap().parse().unwrap();
    let refund = h.engine.store.get_refund_any(rid).await.unwrap().unwrap();
    let cny = |m| Money::new(m, Currency::CNY);
    let ok = RefundOutcome::Succeeded {
        channel_refund_no: Some("chr_n".into()),
        refunded_at_ms: None,
    };
    let notice = |amount: Option<i64>, total: Option<i64>| RefundNotice {
        attempt_id: Some(refund.attempt_id),
        refund_id: Some(rid),
        refund_amount: amount.map(cny),
        refunded_total: total.map(cny),
        outcome: ok.clone(),
    };
    let mismatch = |res: RefundNoticeResult| matches!(res, RefundNoticeResult::Mismatch { .. });
    // Another amount, another order, more refunded than we ever asked for: ignored, alerted.
    assert!(mismatch(
        h.engine
            .apply_refund_notification(&notice(Some(303), None))
            .await
            .unwrap()
    ));
    let mut other_order = notice(Some(302), None);
    other_order.attempt_id = Some(payrail_domain::AttemptId::generate(1, [1; 10]));
    assert!(mismatch(
        h.engine
            .apply_refund_notification(&other_order)
            .await
            .unwrap()
    ));
    assert!(mismatch(
        h.engine
            .apply_refund_notification(&notice(None, Some(303)))
            .await
            .unwrap()
    ));
    assert_eq!(h.alerts_of("refund_notification_mismatch").await.len(), 3);
    assert_eq!(
        h.engine
            .store
            .get_refund_any(rid)
            .await
            .unwrap()
            .unwrap()
            .status,
        payrail_domain::RefundStatus::Processing
    );
    // Not ours at all.
    let mut foreign = notice(Some(1), None);
    foreign.refund_id = None;
    assert_eq!(
        h.engine.apply_refund_notification(&foreign).await.unwrap(),
        RefundNoticeResult::Unmatched
    );
    assert_eq!(h.alerts_of("refund_unmatched").await.len(), 1);
    // Alipay's shape: the total refunded on the order; applied.
    match h
        .engine
        .apply_refund_notification(&notice(None, Some(302)))
        .await
        .unwrap()
    {
        RefundNoticeResult::Applied(r) => {
            assert_eq!(r.status, payrail_domain::RefundStatus::Succeeded);
            assert_eq!(r.channel_refund_no.as_deref(), Some("chr_n"));
        }
        other => panic!("not applied: {other:?}"),
    }
    // A repeat (notifications repeat) changes nothing; a contradicting one alerts.
    assert!(matches!(
        h.engine.apply_refund_notification(&notice(Some(302), None)).await.unwrap(),
        RefundNoticeResult::Applied(r) if r.version == 2
    ));
    let mut contra = notice(Some(302), None);
    contra.outcome = RefundOutcome::Failed {
        code: "CLOSED".into(),
        message: "closed".into(),
    };
    h.engine.apply_refund_notification(&contra).await.unwrap();
    assert_eq!(h.alerts_of("refund_conflict").await.len(), 1);
    let p = h.payment_json(&c, &pid).await;
    assert_eq!(
        (
            p["amount_refunded"].as_i64(),
            p["amount_refundable"].as_i64()
        ),
        (Some(302), Some(698))
    );
});

both!(
    a_refund_retried_after_a_crash_finds_its_refund,
    |b| async move {
        use payrail_store::{Admission, IdempotencyClaim};
        let Some(h) = harness(b).await else { return };
        let (mch, c) = h.merchant("Shop").await;
        // A payment of 1006 (5xx at submit, paid 3 s later), refunded in full with 1006 (5xx
        // although made): the refund takes everything and its first answer is unknown.
        let p = h.create(&c, 1006, "crash-r").await;
        let pid = p.body["id"].as_str().unwrap().to_string();
        h.clock.advance_ms(3_000);
        assert_eq!(h.requery(&pid).await.body["status"], "succeeded");
        let apps = h
            .client
            .operator(
                &h.op,
                Method::GET,
                &format!("/v1/operator/merchants/{mch}/apps"),
                None,
                None,
            )
            .await
            .unwrap();
        let app = payrail_engine::auth::AppAuth {
            app_id: apps.body["data"][0]["id"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
            merchant_id: mch.parse().unwrap(),
            key_id: c.key_id.clone(),
            merchant_active: true,
        };
        let body =
            json!({"payment_id": pid, "amount": 1006, "out_refund_no": "crash-1"}).to_string();
        let key = "crash-refund-key";
        let hash = payrail_engine::auth::request_hash("POST", "/v1/refunds", body.as_bytes());
        let now = h.engine.now_ms();
        // The first try: admitted and recorded in one write, sent, unknown; then the process
        // died before its answer was saved.
        let first = h
            .engine
            .create_refund(
                &app,
                payrail_engine::refunds::CreateRefund {
                    payment_id: pid.parse().unwrap(),
                    amount_minor: 1006,
                    currency: None,
                    out_refund_no: payrail_domain::input::OutRefundNo::parse("crash-1").unwrap(),
                    reason: None,
                    notify_url: None,
                    metadata: payrail_domain::input::Metadata::default(),
                },
                Some(payrail_engine::payments::IdemRef {
                    key,
                    request_hash: &hash,
                    token: "first-try",
                }),
                Some(Admission {
                    now_ms: now,
                    nonce: None,
                    idempotency: Some(IdempotencyClaim {
                        scope: mch.clone(),
                        key: key.into(),
                        request_hash: hash.clone(),
                        now_ms: now,
                        stale_after_ms: 60_000,
                        token: "first-try".into(),
                    }),
                }),
            )
            .await
            .unwrap();
        let first = match first {
            payrail_engine::refunds::CreateRefundResult::Done(r) => r.refund,
            other => panic!("{other:?}"),
        };
        assert_eq!(first.status, payrail_domain::RefundStatus::Processing);
        // The worker finds it made.
        h.clock.advance_ms(1_000);
        let jobs = h
            .engine
            .store
            .lease_jobs(
                payrail_engine::JOB_REFUND_SYNC,
                h.engine.now_ms(),
                30_000,
                10,
            )
            .await
            .unwrap();
        h.engine.sync_refund(&jobs[0]).await.unwrap();
        // While the claim is fresh, a retry is told to wait; once stale, it finds its refund —
        // not "exceeds", although the payment has nothing left to refund.
        let busy = h.post(&c, "/v1/refunds", Some(&body), Some(key)).await;
        assert_eq!(busy.error_code(), Some("idempotency_key_in_use"));
        h.clock.advance_ms(61_000);
        let retry = h.post(&c, "/v1/refunds", Some(&body), Some(key)).await;
        assert_eq!(retry.status, 200, "{}", retry.body);
        assert_eq!(retry.body["id"], first.id.to_string().as_str());
        assert_eq!(retry.body["status"], "succeeded");
        let replay = h.post(&c, "/v1/refunds", Some(&body), Some(key)).await;
        assert!(replay.replayed);
        assert_eq!(replay.body, retry.body);
        // Another request with the number is still refused as a duplicate.
        let other = h.refund(&c, &pid, 1, "crash-1").await;
        assert_eq!(other.error_code(), Some("duplicate_out_refund_no"));
        assert_eq!(h.refund_count(&c, &pid).await, 1);
        assert_eq!(h.payment_json(&c, &pid).await["amount_refunded"], 1006);
    }
);
#[path = "api/ledger.rs"]
mod ledger;

/// Payouts end to end (tests/api/payouts.rs).
#[path = "api/payouts.rs"]
mod payouts;

/// Webhooks, the delivery log and the event feed (tests/api/webhooks.rs).
#[path = "api/webhooks.rs"]
mod webhooks;

/// A channel where the payer confirms while the merchant's cancel is in flight: queries say
/// "processing" until the cancel arrives, "paid" from then on, and the cancel — held until the
/// test releases it, so the race is the same on a loaded machine — ends with the channel
/// reversing the (by then paid) order.
#[derive(Default)]
struct PaidDuringCancel {
    cancel_started: std::sync::atomic::AtomicBool,
    release_cancel: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl payrail_channels::Connector for PaidDuringCancel {
    fn name(&self) -> &'static str {
        "a_paid_during_cancel"
    }
    fn capabilities(&self) -> payrail_channels::Capabilities {
        payrail_channels::Capabilities {
            methods: vec![payrail_channels::MethodCapability {
                method: payrail_domain::input::PaymentMethod::Sandbox,
                close: true,
                cancel: true,
                notifies: false,
            }],
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
    async fn submit(
        &self,
        _: &payrail_channels::SubmitRequest,
    ) -> payrail_channels::SubmitResponse {
        payrail_channels::SubmitResponse {
            outcome: payrail_domain::ChannelOutcome::Processing {
                channel_trade_no: Some("T9".into()),
            },
            next_action: None,
        }
    }
    async fn query(&self, _: &payrail_channels::QueryRequest) -> payrail_domain::ChannelOutcome {
        if self
            .cancel_started
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            payrail_domain::ChannelOutcome::Succeeded {
                channel_trade_no: Some("T9".into()),
                paid_at_ms: None,
            }
        } else {
            payrail_domain::ChannelOutcome::Processing {
                channel_trade_no: Some("T9".into()),
            }
        }
    }
    async fn close(&self, _: &payrail_channels::QueryRequest) -> payrail_domain::ChannelOutcome {
        payrail_domain::ChannelOutcome::unknown("not used")
    }
    async fn cancel(&self, _: &payrail_channels::QueryRequest) -> payrail_channels::CancelOutcome {
        self.cancel_started
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Bounded: a test that never releases still ends.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.release_cancel.notified()).await;
        payrail_channels::CancelOutcome::Cancelled {
            refunded: Some(true),
        }
    }
}

both!(
    a_cancel_that_reverses_a_payment_paid_meanwhile_is_reported_and_alerted,
    |b| async move {
        let paid_during_cancel = Arc::new(PaidDuringCancel::default());
        let Some(h) = harness_full(b, test_config(), false, Some(paid_during_cancel.clone())).await
        else {
            return;
        };
        let h = Arc::new(h);
        let channel = paid_during_cancel.clone();
        let (_, c) = h.merchant("Shop").await;
        let a = h.create(&c, 1000, "race").await;
        assert_eq!(a.body["status"], "processing", "{}", a.body);
        let id = a.body["id"].as_str().unwrap().to_string();
        // The cancel is in flight when the payer's confirmation is learnt (operator re-query).
        let cancel = {
            let (h, c, id) = (h.clone(), c.clone(), id.clone());
            tokio::spawn(async move {
                h.post(
                    &c,
                    &format!("/v1/payments/{id}/cancel"),
                    None,
                    Some(&nonce()),
                )
                .await
            })
        };
        let started = std::time::Instant::now();
        while !channel
            .cancel_started
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the cancel never reached the channel"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(h.requery(&id).await.body["status"], "succeeded");
        channel.release_cancel.notify_one();
        let answer = cancel.await.unwrap();
        assert_eq!(
            (answer.status, answer.error_code()),
            (409, Some("payment_reversed_after_success")),
            "{}",
            answer.body
        );
        let alerts: Vec<String> = h
            .engine
            .store
            .list_alerts(10)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.kind)
            .collect();
        assert!(
            alerts.contains(&"payment_reversed_after_success".to_string()),
            "{alerts:?}"
        );
        // The first definite answer stands.
        let p = h.get(&c, &format!("/v1/payments/{id}")).await;
        assert_eq!(p.body["status"], "succeeded");
        // The money the channel gave back is recorded as a refund that succeeded, and taken
        // back from the merchant's balance (review finding: the payment's net stayed in pending
        // and would have been settled to the merchant).
        let refunds = h.get(&c, &format!("/v1/refunds?payment_id={id}")).await;
        let data = refunds.body["data"].as_array().unwrap().clone();
        assert_eq!(data.len(), 1, "{}", refunds.body);
        assert_eq!(data[0]["out_refund_no"], format!("reversal-{id}"));
        assert_eq!(
            (data[0]["status"].as_str(), data[0]["amount"].as_i64()),
            (Some("succeeded"), Some(1000))
        );
        assert_eq!(
            h.get(&c, &format!("/v1/payments/{id}")).await.body["amount_refunded"],
            1000
        );
        let balance = h.get(&c, "/v1/balance").await;
        assert_eq!(balance.body["pending"][0]["amount"], 0, "{}", balance.body);
        // A second confirmation of the same reversal records nothing more.
        let p = h
            .engine
            .store
            .get_payment_any(id.parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        let again = h.engine.record_channel_reversal(&p).await.unwrap();
        assert_eq!(
            again.map(|r| r.out_refund_no),
            Some(format!("reversal-{id}"))
        );
        assert_eq!(
            h.get(&c, &format!("/v1/refunds?payment_id={id}"))
                .await
                .body["data"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let check = h.engine.store.check_ledger().await.unwrap();
        assert!(check.ok(), "{check:?}");
    }
);
