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
    init_log();
    let dir = std::env::temp_dir().join(format!("payrail-api-test-{}", nonce()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.join("payrail.db").display()),
        Backend::Postgres => match fresh_pg_url().await {
            Some(u) => u,
            None => {
                eprintln!("PAYRAIL_TEST_POSTGRES_URL not set: PostgreSQL variant skipped");
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
    let engine = Arc::new(Engine::new(store, channels, dyn_clock, key, config));
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
    for _ in 0..200 {
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
    for _ in 0..200 {
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
        tokio::time::sleep(Duration::from_millis(700)).await;
        // The server finished the request anyway and saved its answer: the retry is a replay, not
        // a 409 "in use" for the next minute.
        let retry = h
            .post(&c, "/v1/payments", Some(&body), Some("gone-key"))
            .await;
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

/// Webhooks, the delivery log and the event feed (tests/api/webhooks.rs).
#[path = "api/webhooks.rs"]
mod webhooks;
