//! Webhooks over real HTTP: a loopback receiver that records every request and answers as
//! scripted (status codes, hanging), the real dispatcher and sender workers, and the
//! `ManualClock` driving the retry schedule. Also the delivery log, re-sends, the
//! private-address guard, merchant isolation and the SSE event feed.

use super::*;
use hmac::{Hmac, Mac};
use payrail_domain::webhook::RETRY_DELAYS_S;
use sha2::Sha256;
use std::collections::VecDeque;

/// Longest wait for anything asynchronous in these tests.
const WAIT: Duration = Duration::from_secs(10);

// --- the receiver ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Reply {
    Status(u16),
    /// Never answers (the sender's timeout fires).
    Hang,
    /// 302 to the same URL: following it would show as one more request.
    Redirect,
    /// A status with a 1 MB body.
    Large(u16),
}

#[derive(Clone, Debug)]
struct Received {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    script: VecDeque<Reply>,
}

/// A webhook endpoint on 127.0.0.1: records requests, answers from its script, then 200.
#[derive(Clone)]
struct Receiver {
    url: String,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    async fn start(script: &[Reply]) -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState {
            received: Vec::new(),
            script: script.iter().copied().collect(),
        }));
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let state = shared.clone();
                    async move {
                        use axum::response::IntoResponse;
                        let reply = {
                            let mut s = state.lock().unwrap();
                            s.received.push(Received {
                                headers: headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.to_string(), v.to_str().unwrap_or("").to_string())
                                    })
                                    .collect(),
                                body: body.to_vec(),
                            });
                            s.script.pop_front().unwrap_or(Reply::Status(200))
                        };
                        let status = |code| axum::http::StatusCode::from_u16(code).unwrap();
                        match reply {
                            Reply::Status(code) => {
                                (status(code), format!("receiver says {code}")).into_response()
                            }
                            Reply::Hang => {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                (status(200), "too late").into_response()
                            }
                            Reply::Redirect => (
                                status(302),
                                [(axum::http::header::LOCATION, "/hook")],
                                "moved",
                            )
                                .into_response(),
                            Reply::Large(code) => {
                                (status(code), "x".repeat(1 << 20)).into_response()
                            }
                        }
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            state,
        }
    }

    fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }
}

// --- helpers --------------------------------------------------------------------------------

fn hook_config(allow_private: bool) -> EngineConfig {
    EngineConfig {
        webhook_timeout_ms: 300,
        webhook_allow_private_targets: allow_private,
        ..test_config()
    }
}

/// A harness whose process also runs the webhook dispatcher and sender.
async fn hook_harness(b: Backend, allow_private: bool) -> Option<Harness> {
    let h = harness_with(b, hook_config(allow_private), false).await?;
    spawn_webhook_workers(&h.engine, h._stop.subscribe());
    Some(h)
}

fn spawn_webhook_workers(engine: &Arc<Engine>, stop: watch::Receiver<bool>) {
    tokio::spawn(payrail_engine::webhooks::run_webhook_dispatcher(
        engine.clone(),
        stop.clone(),
    ));
    tokio::spawn(payrail_engine::webhooks::run_webhook_sender(
        engine.clone(),
        stop,
    ));
}

/// Polls `f` until it is true, at most [`WAIT`].
async fn until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A signed request timed by the server's (manual) clock, which the tests move by hours.
async fn signed_at(
    h: &Harness,
    c: &Credentials,
    method: Method,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> Answer {
    let body = body.unwrap_or("");
    let auth = payrail_domain::signing::authorization_header(
        &c.key_id,
        c.secret.as_bytes(),
        method.as_str(),
        path,
        h.clock.now_s(),
        &nonce(),
        body.as_bytes(),
    );
    h.client
        .signed_raw(method, path, body, &auth, key)
        .await
        .unwrap()
}

async fn get_at(h: &Harness, c: &Credentials, path: &str) -> Answer {
    signed_at(h, c, Method::GET, path, None, None).await
}

/// Creates a payment (`amount` scripts the sandbox: 1000 succeeds, 1001 fails) with a
/// notify URL; returns its id.
async fn pay(h: &Harness, c: &Credentials, amount: i64, otn: &str, notify: Option<&str>) -> String {
    let mut body = json!({"amount": amount, "currency": "CNY", "out_trade_no": otn, "subject": "hook", "method": "sandbox"});
    if let Some(u) = notify {
        body["notify_url"] = json!(u);
    }
    let a = signed_at(
        h,
        c,
        Method::POST,
        "/v1/payments",
        Some(&body.to_string()),
        Some(&nonce()),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body["id"].as_str().unwrap().to_string()
}

/// [`pay`], then a millisecond passes: events of different milliseconds have a fixed order on
/// every backend (PostgreSQL numbers events committed together by creation time, then id).
async fn pay_tick(h: &Harness, c: &Credentials, amount: i64, otn: &str) -> String {
    let id = pay(h, c, amount, otn, None).await;
    h.clock.advance_ms(1);
    id
}

/// The event of a payment (its only one: a final status).
async fn event_of(h: &Harness, c: &Credentials, payment_id: &str) -> Value {
    let list = get_at(h, c, "/v1/events?limit=100").await;
    assert_eq!(list.status, 200, "{}", list.body);
    list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"]["object"]["id"] == payment_id)
        .cloned()
        .unwrap_or_else(|| panic!("no event for {payment_id}: {}", list.body))
}

async fn deliveries(h: &Harness, c: &Credentials, event_id: &str) -> Value {
    let a = get_at(h, c, &format!("/v1/events/{event_id}/deliveries?limit=100")).await;
    assert_eq!(a.status, 200, "{}", a.body);
    a.body
}

async fn attempts_logged(h: &Harness, event_id: &str) -> usize {
    h.engine
        .store
        .list_attempts(event_id, None, 100)
        .await
        .unwrap()
        .len()
}

/// An independent HMAC-SHA256 (the `hmac` crate, not payrail's code) of `"<t>.<body>"`.
fn expected_signature(secret: &str, t: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The fenced code block after `<!-- tested: NAME -->` in docs/webhooks.md.
fn doc_block(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/webhooks.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let marker = format!("<!-- tested: {name} -->");
    let after = &doc[doc.find(&marker).expect("marker in docs/webhooks.md") + marker.len()..];
    let start = after.find("```").unwrap();
    let body = &after[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    body[..body.find("```").unwrap()].to_string()
}

/// Runs a documented verifier on a captured delivery; returns (exit ok, stdout).
fn run_doc_verifier(
    interpreter: &str,
    block: &str,
    dir: &std::path::Path,
    secret: &str,
    body: &[u8],
    header: &str,
) -> (bool, String) {
    let script = dir.join(format!("verify-{interpreter}"));
    std::fs::write(&script, doc_block(block)).unwrap();
    let body_file = dir.join(format!("body-{}.json", nonce()));
    std::fs::write(&body_file, body).unwrap();
    let out = std::process::Command::new(interpreter)
        .arg(&script)
        .arg(&body_file)
        .arg(header)
        .env("PAYRAIL_WEBHOOK_SECRET", secret)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {interpreter}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

// --- deliveries -----------------------------------------------------------------------------

both!(a_webhook_is_delivered_once_and_signed, |b| async move {
    let Some(h) = hook_harness(b, true).await else {
        return;
    };
    let rx = Receiver::start(&[]).await;
    let (mch, c) = h.merchant("Shop").await;
    let pid = pay(&h, &c, 1000, "hook-ok", Some(&rx.url)).await;
    until("the delivery", || async { rx.count() == 1 }).await;
    let got = rx.received().remove(0);
    let event = event_of(&h, &c, &pid).await;
    let event_id = event["id"].as_str().unwrap();

    // The body is the event, byte for byte as the API serves it.
    let raw = get_at(&h, &c, &format!("/v1/events/{event_id}")).await;
    assert_eq!(raw.status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&got.body).unwrap(),
        raw.body
    );
    assert_eq!(raw.body["type"], "payment.succeeded");
    assert_eq!(raw.body["data"]["object"]["merchant_id"], mch.as_str());
    assert_eq!(got.header("payrail-event-id"), Some(event_id));
    assert_eq!(got.header("payrail-event-type"), Some("payment.succeeded"));
    assert_eq!(got.header("payrail-delivery-attempt"), Some("1"));
    assert_eq!(got.header("content-type"), Some("application/json"));

    // The signature, checked with an independent HMAC.
    let header = got.header("payrail-signature").unwrap().to_string();
    let (t, v1) = header
        .split_once(',')
        .map(|(t, v)| {
            (
                t.strip_prefix("t=").unwrap(),
                v.strip_prefix("v1=").unwrap(),
            )
        })
        .unwrap();
    assert_eq!(t.parse::<i64>().unwrap(), h.clock.now_s());
    assert_eq!(v1, expected_signature(&c.secret, t, &got.body));
    assert_ne!(v1, expected_signature("sk_wrong", t, &got.body));

    // The verifiers in docs/webhooks.md accept it and refuse a tampered body.
    let dir = h.dir.join("verify");
    std::fs::create_dir_all(&dir).unwrap();
    for (interpreter, block) in [("python3", "verify-python"), ("sh", "verify-shell")] {
        let ok = run_doc_verifier(interpreter, block, &dir, &c.secret, &got.body, &header);
        assert_eq!(ok, (true, "valid".to_string()), "{block}");
        let mut tampered = got.body.clone();
        tampered.extend_from_slice(b" ");
        let bad = run_doc_verifier(interpreter, block, &dir, &c.secret, &tampered, &header);
        assert!(!bad.0 && bad.1.starts_with("INVALID"), "{block}: {bad:?}");
    }

    // The log: one attempt, delivered; no more attempts however long we wait.
    let d = deliveries(&h, &c, event_id).await;
    assert_eq!(d["delivery"]["status"], "delivered", "{d}");
    assert_eq!(d["delivery"]["url"], rx.url.as_str());
    assert_eq!(d["delivery"]["next_attempt_at"], Value::Null);
    let log = d["data"].as_array().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (
            &log[0]["attempt"],
            &log[0]["status_code"],
            &log[0]["error"],
            &log[0]["trigger"]
        ),
        (&json!(1), &json!(200), &Value::Null, &json!("schedule"))
    );
    assert_eq!(log[0]["response_body"], "receiver says 200");
    assert!(log[0]["latency_ms"].as_i64().unwrap() >= 0);
    h.clock.advance_ms(2 * 24 * 3600 * 1000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.count(), 1, "delivered once");
    assert_eq!(h.engine.store.count_jobs("webhook").await.unwrap(), 0);

    // A payment without a notify URL has an event but no delivery.
    let quiet = pay(&h, &c, 1000, "hook-none", None).await;
    let e2 = event_of(&h, &c, &quiet).await;
    h.engine.dispatch_webhooks_once().await.unwrap();
    let d2 = deliveries(&h, &c, e2["id"].as_str().unwrap()).await;
    assert_eq!(d2["delivery"], Value::Null);
    assert_eq!(d2["data"], json!([]));

    // No secret anywhere it could leak.
    assert!(!d.to_string().contains(&c.secret));
    let log = String::from_utf8_lossy(&init_log().lock().unwrap()).to_string();
    assert!(!log.contains(&c.secret), "app secret in the log");
    let (_, m) = h.client.get("/metrics").await.unwrap();
    assert!(
        m.contains("payrail_webhook_attempts_total{outcome=\"delivered\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("payrail_webhook_attempt_duration_seconds_count 1"),
        "{m}"
    );
    assert!(
        m.contains("# TYPE payrail_webhook_deliveries_pending gauge"),
        "{m}"
    );
});

both!(
    failed_attempts_are_retried_on_the_schedule_until_a_2xx,
    |b| async move {
        let Some(h) = hook_harness(b, true).await else {
            return;
        };
        let rx = Receiver::start(&[
            Reply::Status(500),
            Reply::Hang,
            Reply::Redirect,
            Reply::Large(503),
            Reply::Status(204),
        ])
        .await;
        let (_, c) = h.merchant("Shop").await;
        let pid = pay(&h, &c, 1001, "retry", Some(&rx.url)).await;
        let event = event_of(&h, &c, &pid).await;
        assert_eq!(event["type"], "payment.failed");
        let eid = event["id"].as_str().unwrap().to_string();

        // Attempt 1: HTTP 500. The next is due 15 s later, not before.
        until("attempt 1", || async {
            attempts_logged(&h, &eid).await == 1
        })
        .await;
        let t1 = h.clock.now_ms();
        let d = h.engine.store.get_delivery(&eid).await.unwrap().unwrap();
        assert_eq!(d.next_attempt_at_ms, Some(t1 + 15_000));
        h.clock.advance_ms(14_999);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(rx.count(), 1, "not before its time");

        // Attempt 2: the receiver hangs; the 300 ms timeout fails it. Next: 1 min later.
        h.clock.advance_ms(1);
        until("attempt 2", || async {
            attempts_logged(&h, &eid).await == 2
        })
        .await;
        let d = h.engine.store.get_delivery(&eid).await.unwrap().unwrap();
        assert_eq!(d.next_attempt_at_ms, Some(h.clock.now_ms() + 60_000));

        // Attempt 3: a redirect, not followed. Attempt 4: 503 with a 1 MB body, of which 4 KiB
        // are read and 1,024 characters kept. Attempt 5: 204 — delivered; nothing more after.
        for (n, wait_s) in [(3, 60), (4, 300), (5, 900)] {
            h.clock.advance_ms(wait_s * 1000);
            until(&format!("attempt {n}"), || async {
                attempts_logged(&h, &eid).await == n
            })
            .await;
        }
        let log = deliveries(&h, &c, &eid).await;
        assert_eq!(log["delivery"]["status"], "delivered", "{log}");
        let rows = log["data"].as_array().unwrap();
        let summary: Vec<(i64, Value, Value)> = rows
            .iter()
            .map(|r| {
                (
                    r["attempt"].as_i64().unwrap(),
                    r["status_code"].clone(),
                    r["error"].clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (5, json!(204), Value::Null),
                (4, json!(503), json!("http_status")),
                (3, json!(302), json!("redirect_not_followed")),
                (2, Value::Null, json!("timeout")),
                (1, json!(500), json!("http_status")),
            ]
        );
        assert_eq!(rows[4]["response_body"], "receiver says 500");
        assert_eq!(rows[1]["response_body"], "x".repeat(1024));
        assert!(
            rows[3]["latency_ms"].as_i64().unwrap() >= 300,
            "{}",
            rows[3]
        );
        let headers: Vec<String> = rx
            .received()
            .iter()
            .map(|r| r.header("payrail-delivery-attempt").unwrap().to_string())
            .collect();
        assert_eq!(
            headers,
            ["1", "2", "3", "4", "5"],
            "the redirect was not followed"
        );
        h.clock.advance_ms(24 * 3600 * 1000);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(rx.count(), 5, "stops on 2xx");

        // Connection refused: a port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pid = pay(
            &h,
            &c,
            1000,
            "refused",
            Some(&format!("http://{closed}/hook")),
        )
        .await;
        let eid = event_of(&h, &c, &pid).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        until("refused attempt", || async {
            attempts_logged(&h, &eid).await == 1
        })
        .await;
        let log = deliveries(&h, &c, &eid).await;
        assert_eq!(log["data"][0]["error"], "connect_failed", "{log}");
        assert_eq!(log["data"][0]["status_code"], Value::Null);
        assert_eq!(log["delivery"]["status"], "pending");
        assert_eq!(
            log["delivery"]["next_attempt_at"].as_i64().unwrap(),
            (h.clock.now_ms() + 15_000) / 1000
        );
        let (_, m) = h.client.get("/metrics").await.unwrap();
        for outcome in [
            "http_status",
            "timeout",
            "redirect_not_followed",
            "connect_failed",
            "delivered",
        ] {
            assert!(
                m.contains(&format!(
                    "payrail_webhook_attempts_total{{outcome=\"{outcome}\"}}"
                )),
                "{outcome}: {m}"
            );
        }
    }
);

both!(
    a_delivery_gives_up_after_the_last_attempt_and_alerts,
    |b| async move {
        let Some(h) = hook_harness(b, true).await else {
            return;
        };
        let rx = Receiver::start(&[Reply::Status(503); 20]).await;
        let (_, c) = h.merchant("Shop").await;
        let pid = pay(&h, &c, 1000, "doomed", Some(&rx.url)).await;
        let eid = event_of(&h, &c, &pid).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        until("attempt 1", || async {
            attempts_logged(&h, &eid).await == 1
        })
        .await;
        for (i, delay_s) in RETRY_DELAYS_S.iter().enumerate() {
            let attempt = i + 2;
            let before = h.engine.store.get_delivery(&eid).await.unwrap().unwrap();
            assert_eq!(
                before.next_attempt_at_ms,
                Some(before.updated_at_ms + delay_s * 1000),
                "attempt {attempt} is due {delay_s} s after the last"
            );
            h.clock.advance_ms(delay_s * 1000);
            until(&format!("attempt {attempt}"), || async {
                rx.count() == attempt
            })
            .await;
            until("attempt recorded", || async {
                attempts_logged(&h, &eid).await == attempt
            })
            .await;
        }
        let log = deliveries(&h, &c, &eid).await;
        assert_eq!(log["delivery"]["status"], "failed", "{log}");
        assert_eq!(log["delivery"]["attempts"], 11);
        assert_eq!(log["delivery"]["next_attempt_at"], Value::Null);
        assert_eq!(log["data"].as_array().unwrap().len(), 11);
        // Nothing more, ever.
        h.clock.advance_ms(3 * 24 * 3600 * 1000);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(rx.count(), 11);
        assert_eq!(h.engine.store.count_jobs("webhook").await.unwrap(), 0);
        // The operator is told.
        let alerts = h
            .client
            .operator(&h.op, Method::GET, "/v1/operator/alerts", None, None)
            .await
            .unwrap();
        let alert = alerts.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["kind"] == "webhook_delivery_failed")
            .cloned()
            .unwrap_or_else(|| panic!("no alert: {}", alerts.body));
        assert_eq!(alert["subject_id"], eid.as_str());
        assert!(
            alert["detail"].as_str().unwrap().contains("11 attempts"),
            "{alert}"
        );
        let (_, m) = h.client.get("/metrics").await.unwrap();
        assert!(
            m.contains("payrail_webhook_deliveries_failed_total 1"),
            "{m}"
        );
        assert!(
            m.contains("payrail_webhook_attempts_total{outcome=\"http_status\"} 11"),
            "{m}"
        );
    }
);

both!(
    a_scheduled_delivery_survives_a_crash_and_a_new_engine_sends_it,
    |b| async move {
        // This engine runs no webhook workers: it schedules the delivery, takes the job as a
        // worker would, and "dies" before sending.
        let Some(h) = harness_with(b, hook_config(true), false).await else {
            return;
        };
        let rx = Receiver::start(&[]).await;
        let (_, c) = h.merchant("Shop").await;
        let pid = pay(&h, &c, 1000, "crash", Some(&rx.url)).await;
        assert_eq!(h.engine.dispatch_webhooks_once().await.unwrap(), 1);
        let eid = event_of(&h, &c, &pid).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let leased = h
            .engine
            .store
            .lease_jobs("webhook", h.clock.now_ms(), 30_000, 10)
            .await
            .unwrap();
        assert_eq!(leased.len(), 1);
        assert_eq!(leased[0].subject_id, eid);

        // A new engine (another process) on the same database and master key.
        let store = payrail_store::open(&h.url).await.unwrap();
        let clock: Arc<dyn Clock> = h.clock.clone();
        let mut channels = payrail_channels::Registry::new();
        channels.register(Arc::new(payrail_channels::sandbox::Sandbox::new(
            clock.clone(),
        )));
        let key = MasterKey::parse(&h.master_key).unwrap();
        let second = Arc::new(Engine::new(store, channels, clock, key, hook_config(true)));
        let (stop, stop_rx) = watch::channel(false);
        spawn_webhook_workers(&second, stop_rx);
        // It does not send while the dead worker's lease holds…
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rx.count(), 0);
        // …and sends once the lease has run out, exactly once.
        h.clock.advance_ms(30_000);
        until("delivery by the new engine", || async { rx.count() == 1 }).await;
        until("recorded", || async {
            second
                .store
                .get_delivery(&eid)
                .await
                .unwrap()
                .is_some_and(|d| d.status == payrail_store::DeliveryStatus::Delivered)
        })
        .await;
        assert_eq!(
            rx.received()[0].header("payrail-event-id"),
            Some(eid.as_str())
        );
        assert_eq!(
            rx.received()[0]
                .header("payrail-signature")
                .map(|s| s.starts_with("t=")),
            Some(true)
        );
        h.clock.advance_ms(3_600_000);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(rx.count(), 1);
        let _ = stop.send(true);
    }
);

both!(resend_by_merchant_and_operator, |b| async move {
    let Some(h) = hook_harness(b, true).await else {
        return;
    };
    let rx = Receiver::start(&[]).await;
    let (_, c) = h.merchant("Shop").await;
    let pid = pay(&h, &c, 1000, "again", Some(&rx.url)).await;
    until("first delivery", || async { rx.count() == 1 }).await;
    let eid = event_of(&h, &c, &pid).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/v1/events/{eid}/resend");
    until("delivered", || async {
        deliveries(&h, &c, &eid).await["delivery"]["status"] == "delivered"
    })
    .await;

    let r = signed_at(&h, &c, Method::POST, &path, None, Some("resend-1")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["object"], "webhook_delivery");
    assert_eq!(r.body["event_id"], eid.as_str());
    assert_eq!(r.body["next_attempt_at"], h.clock.now_s());
    until("the re-send", || async { rx.count() == 2 }).await;
    let second = rx.received().remove(1);
    assert_eq!(second.header("payrail-event-id"), Some(eid.as_str()));
    assert_eq!(second.header("payrail-delivery-attempt"), Some("2"));
    assert_eq!(second.body, rx.received()[0].body, "the same event");

    // The same key replays the answer and sends nothing more.
    let replay = signed_at(&h, &c, Method::POST, &path, None, Some("resend-1")).await;
    assert!(replay.replayed);
    assert_eq!(replay.body, r.body);
    until("recorded", || async {
        attempts_logged(&h, &eid).await == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(rx.count(), 2);
    let log = deliveries(&h, &c, &eid).await;
    assert_eq!(log["data"][0]["trigger"], "manual");
    assert_eq!(log["data"][0]["attempt"], 2);
    assert_eq!(log["delivery"]["status"], "delivered");
    // Paging the log by attempt number.
    let page = get_at(&h, &c, &format!("/v1/events/{eid}/deliveries?limit=1")).await;
    assert_eq!(
        (
            page.body["has_more"].clone(),
            page.body["data"][0]["attempt"].clone()
        ),
        (json!(true), json!(2))
    );
    let next = get_at(
        &h,
        &c,
        &format!("/v1/events/{eid}/deliveries?limit=1&starting_after=2"),
    )
    .await;
    assert_eq!(
        (
            next.body["has_more"].clone(),
            next.body["data"][0]["attempt"].clone()
        ),
        (json!(false), json!(1))
    );

    // The operator's re-send ("re-notify").
    let op = h
        .client
        .operator(
            &h.op,
            Method::POST,
            &format!("/v1/operator/events/{eid}/resend"),
            None,
            Some(&nonce()),
        )
        .await
        .unwrap();
    assert_eq!(op.status, 200, "{}", op.body);
    until("the operator's re-send", || async { rx.count() == 3 }).await;
    let op_log = h
        .client
        .operator(
            &h.op,
            Method::GET,
            &format!("/v1/operator/events/{eid}/deliveries"),
            None,
            None,
        )
        .await
        .unwrap();
    until("recorded", || async {
        attempts_logged(&h, &eid).await == 3
    })
    .await;
    assert_eq!(op_log.status, 200);
    assert_eq!(op_log.body["delivery"]["event_id"], eid.as_str());

    // Nothing to re-send for an event without a notify URL; no body allowed.
    let quiet = pay(&h, &c, 1000, "no-url", None).await;
    let qe = event_of(&h, &c, &quiet).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    h.engine.dispatch_webhooks_once().await.unwrap();
    let none = signed_at(
        &h,
        &c,
        Method::POST,
        &format!("/v1/events/{qe}/resend"),
        None,
        Some(&nonce()),
    )
    .await;
    assert_eq!(
        (none.status, none.error_code()),
        (409, Some("event_not_deliverable"))
    );
    let with_body = signed_at(
        &h,
        &c,
        Method::POST,
        &path,
        Some("{\"x\":1}"),
        Some(&nonce()),
    )
    .await;
    assert_eq!(
        (with_body.status, with_body.error_code()),
        (400, Some("parameter_unknown"))
    );
    let no_key = signed_at(&h, &c, Method::POST, &path, None, None).await;
    assert_eq!(no_key.error_code(), Some("idempotency_key_missing"));
});

both!(
    private_addresses_are_refused_unless_allowed,
    |b| async move {
        // The default: the guard is on.
        let Some(h) = hook_harness(b, false).await else {
            return;
        };
        let rx = Receiver::start(&[]).await;
        let (_, c) = h.merchant("Shop").await;
        let port = rx.url.rsplit(':').next().unwrap().to_string();
        let targets = [
            (rx.url.clone(), "127.0.0.1 is a loopback address"),
            (format!("http://localhost:{port}"), "localhost resolves to"),
            (format!("http://[::1]:{port}"), "::1 is a loopback address"),
            (
                "http://169.254.169.254/latest/meta-data".to_string(),
                "169.254.169.254 is a link-local address",
            ),
        ];
        let mut events = Vec::new();
        for (i, (url, _)) in targets.iter().enumerate() {
            let pid = pay(&h, &c, 1000, &format!("ssrf-{i}"), Some(url)).await;
            events.push(
                event_of(&h, &c, &pid).await["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        for (eid, (url, reason)) in events.iter().zip(&targets) {
            until("the refused attempt", || async {
                attempts_logged(&h, eid).await == 1
            })
            .await;
            let log = deliveries(&h, &c, eid).await;
            let row = &log["data"][0];
            assert_eq!(row["error"], "blocked_address", "{url}: {log}");
            let message = row["message"].as_str().unwrap();
            assert!(message.contains(reason), "{url}: {message}");
            assert!(
                message.contains("webhook_allow_private_targets"),
                "{message}"
            );
            assert_eq!(row["status_code"], Value::Null);
            assert_eq!(
                log["delivery"]["status"], "pending",
                "retried on the schedule"
            );
        }
        assert_eq!(rx.count(), 0, "nothing reached the loopback receiver");
        let (_, m) = h.client.get("/metrics").await.unwrap();
        assert!(
            m.contains("payrail_webhook_attempts_total{outcome=\"blocked_address\"} 4"),
            "{m}"
        );
    }
);

// --- events API and isolation ---------------------------------------------------------------

both!(
    events_and_deliveries_are_isolated_per_merchant,
    |b| async move {
        let Some(h) = hook_harness(b, true).await else {
            return;
        };
        let rx = Receiver::start(&[]).await;
        let (_, a) = h.merchant("Shop A").await;
        let (_, bee) = h.merchant("Shop B").await;
        let pa = pay(&h, &a, 1000, "iso-a", Some(&rx.url)).await;
        let pb = pay(&h, &bee, 1001, "iso-b", None).await;
        until("A's delivery", || async { rx.count() == 1 }).await;
        let ea = event_of(&h, &a, &pa).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        let eb = event_of(&h, &bee, &pb).await["id"]
            .as_str()
            .unwrap()
            .to_string();

        // B cannot see, list, inspect or re-send A's event: 404 like a missing one.
        for path in [
            format!("/v1/events/{ea}"),
            format!("/v1/events/{ea}/deliveries"),
        ] {
            let r = get_at(&h, &bee, &path).await;
            assert_eq!(
                (r.status, r.error_code()),
                (404, Some("resource_missing")),
                "{path}"
            );
        }
        let r = signed_at(
            &h,
            &bee,
            Method::POST,
            &format!("/v1/events/{ea}/resend"),
            None,
            Some(&nonce()),
        )
        .await;
        assert_eq!((r.status, r.error_code()), (404, Some("resource_missing")));
        let list = get_at(&h, &bee, "/v1/events").await;
        let ids: Vec<&str> = list.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [eb.as_str()]);
        // A's own cursor is not B's.
        let r = get_at(&h, &bee, &format!("/v1/events?starting_after={ea}")).await;
        assert_eq!((r.status, r.error_code()), (400, Some("parameter_invalid")));
        assert_eq!(r.body["error"]["param"], "starting_after");
        assert_eq!(rx.count(), 1, "B's refused re-send sent nothing");
        // Malformed and missing ids.
        assert_eq!(get_at(&h, &a, "/v1/events/evt_nope").await.status, 404);
        assert_eq!(
            get_at(&h, &a, "/v1/events/pay_01M80X1JKZ45058CKTFVQJKG7W")
                .await
                .status,
            404
        );
        // The operator sees both.
        for e in [&ea, &eb] {
            let r = h
                .client
                .operator(
                    &h.op,
                    Method::GET,
                    &format!("/v1/operator/events/{e}"),
                    None,
                    None,
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.body["id"], e.as_str());
        }

        // Listing: newest first (commit order), keyset pages, the list shape and query checks.
        let mut paid = vec![pa.clone()];
        for i in 0..3 {
            h.clock.advance_ms(1);
            paid.push(pay_tick(&h, &a, 1000, &format!("iso-a{i}")).await);
        }
        paid.reverse();
        let mut seen = Vec::new();
        let mut objects = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path = match &after {
                Some(x) => format!("/v1/events?limit=2&starting_after={x}"),
                None => "/v1/events?limit=2".to_string(),
            };
            let page = get_at(&h, &a, &path).await;
            assert_eq!(page.body["object"], "list");
            assert_eq!(page.body["url"], "/v1/events");
            let data = page.body["data"].as_array().unwrap().clone();
            after = data.last().map(|e| e["id"].as_str().unwrap().to_string());
            seen.extend(data.iter().map(|e| e["id"].as_str().unwrap().to_string()));
            objects.extend(
                data.iter()
                    .map(|e| e["data"]["object"]["id"].as_str().unwrap().to_string()),
            );
            if page.body["has_more"] != json!(true) {
                break;
            }
        }
        assert_eq!(objects, paid, "newest first, each once");
        assert_eq!(seen.last().unwrap(), &ea);
        for (q, code) in [
            ("limit=0", "parameter_out_of_range"),
            ("x=1", "parameter_unknown"),
            ("starting_after=pay_1", "parameter_invalid"),
        ] {
            let r = get_at(&h, &a, &format!("/v1/events?{q}")).await;
            assert_eq!((r.status, r.error_code()), (400, Some(code)), "{q}");
        }
    }
);

// --- the SSE feed ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Frame {
    id: String,
    event: String,
    data: Value,
}

/// A minimal SSE reader over a streaming response.
struct Stream {
    resp: reqwest::Response,
    buf: String,
}

impl Stream {
    async fn open(
        h: &Harness,
        c: &Credentials,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<Stream, Answer> {
        let auth = payrail_domain::signing::authorization_header(
            &c.key_id,
            c.secret.as_bytes(),
            "GET",
            path,
            h.clock.now_s(),
            &nonce(),
            b"",
        );
        let mut rb = reqwest::Client::new()
            .get(format!("{}{path}", h.client.base_url()))
            .header("authorization", auth);
        if let Some(id) = last_event_id {
            rb = rb.header("last-event-id", id);
        }
        let resp = rb.send().await.unwrap();
        if resp.status() != 200 {
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap();
            return Err(Answer {
                status,
                request_id: None,
                replayed: false,
                body,
            });
        }
        assert_eq!(
            resp.headers().get("content-type").unwrap(),
            "text/event-stream"
        );
        let mut s = Stream {
            resp,
            buf: String::new(),
        };
        // The stream says hello first: from here on, every new event is in it.
        let first = s.next_block(WAIT).await.expect("hello");
        assert!(
            first.contains("retry: 3000") && first.contains(": connected"),
            "{first}"
        );
        Ok(s)
    }

    /// The next blank-line-terminated block, or `None` after `wait` (or at the end).
    async fn next_block(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(i) = self.buf.find("\n\n") {
                let block = self.buf[..i].to_string();
                self.buf.drain(..i + 2);
                return Some(block);
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .ok()?;
            let chunk = chunk.ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next event (skipping comments), or `None` after `wait`.
    async fn next_event(&mut self, wait: Duration) -> Option<Frame> {
        loop {
            let block = self.next_block(wait).await?;
            let (mut id, mut event, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).unwrap());
                }
            }
            if let (Some(id), Some(event), Some(data)) = (id, event, data) {
                return Some(Frame { id, event, data });
            }
        }
    }

    /// True if the server ended the stream within `wait`.
    async fn ended(mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
            }
        }
    }
}

both!(
    the_event_stream_delivers_in_order_and_resumes_exactly,
    |b| async move {
        let Some(h) = harness(b).await else { return };
        let (mch, c) = h.merchant("Shop").await;
        let mch: payrail_domain::MerchantId = mch.parse().unwrap();
        let (_, other) = h.merchant("Other").await;
        let before = pay_tick(&h, &c, 1000, "sse-0").await;

        // Live: a stream without a cursor starts after the latest event.
        let mut s1 = Stream::open(&h, &c, "/v1/events/stream", None)
            .await
            .unwrap();
        let mut created = Vec::new();
        for (i, amount) in [1000, 1001, 1000].iter().enumerate() {
            created.push(pay_tick(&h, &c, *amount, &format!("sse-a{i}")).await);
            pay_tick(&h, &other, 1000, &format!("sse-other{i}")).await;
        }
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(s1.next_event(WAIT).await.expect("a live event"));
        }
        let objects: Vec<&str> = got
            .iter()
            .map(|f| f.data["data"]["object"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            objects,
            created.iter().map(String::as_str).collect::<Vec<_>>(),
            "in order, only mine"
        );
        assert_eq!(
            got.iter().map(|f| f.event.as_str()).collect::<Vec<_>>(),
            ["payment.succeeded", "payment.failed", "payment.succeeded"]
        );
        for f in &got {
            assert_eq!(f.data["id"], f.id.as_str(), "id: is the event id");
            assert_eq!(f.data["type"], f.event.as_str());
            let stored = get_at(&h, &c, &format!("/v1/events/{}", f.id)).await;
            assert_eq!(stored.body, f.data, "the same JSON as the API and webhooks");
        }
        assert!(!got
            .iter()
            .any(|f| f.data["data"]["object"]["id"] == before.as_str()));
        assert_eq!(
            s1.next_event(Duration::from_millis(300)).await,
            None,
            "nothing else"
        );
        let last_seen = got[2].id.clone();
        drop(s1);

        // Missed while disconnected, then resumed with Last-Event-ID: exactly those, then live.
        let mut missed = Vec::new();
        for i in 0..2 {
            missed.push(pay_tick(&h, &c, 1000, &format!("sse-b{i}")).await);
        }
        until("the stream slot is released", || async {
            h.engine.feed.open_streams(mch) == 0
        })
        .await;
        let mut s2 = Stream::open(&h, &c, "/v1/events/stream", Some(&last_seen))
            .await
            .unwrap();
        for want in &missed {
            let f = s2.next_event(WAIT).await.expect("a missed event");
            assert_eq!(f.data["data"]["object"]["id"], want.as_str());
        }
        let live = pay_tick(&h, &c, 1001, "sse-c").await;
        let f = s2
            .next_event(WAIT)
            .await
            .expect("a live event after the replay");
        assert_eq!(f.data["data"]["object"]["id"], live.as_str());
        assert_eq!(
            s2.next_event(Duration::from_millis(300)).await,
            None,
            "no duplicates"
        );

        // ?after= replays from any of my events; Last-Event-ID wins over it.
        let mut s3 = Stream::open(
            &h,
            &c,
            &format!("/v1/events/stream?after={}", got[0].id),
            None,
        )
        .await
        .unwrap();
        let mut replayed = Vec::new();
        for _ in 0..5 {
            replayed.push(
                s3.next_event(WAIT).await.unwrap().data["data"]["object"]["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let mut want: Vec<String> = created[1..].to_vec();
        want.extend(missed.iter().cloned());
        want.push(live.clone());
        assert_eq!(replayed, want);
        let mut s4 = Stream::open(
            &h,
            &c,
            &format!("/v1/events/stream?after={}", got[0].id),
            Some(&f.id),
        )
        .await
        .unwrap();
        assert_eq!(
            s4.next_event(Duration::from_millis(300)).await,
            None,
            "Last-Event-ID was the latest"
        );

        // Bad cursors, unknown parameters, another merchant's event.
        for (path, last, param) in [
            (
                "/v1/events/stream?after=evt_01M80X1JKZ45058CKTFVQJKG7W",
                None,
                "after",
            ),
            ("/v1/events/stream", Some("evt_nope"), "Last-Event-ID"),
        ] {
            let e = Stream::open(&h, &c, path, last).await.err().unwrap();
            assert_eq!(
                (e.status, e.error_code()),
                (400, Some("parameter_invalid")),
                "{path}"
            );
            assert_eq!(e.body["error"]["param"], param);
        }
        let theirs = event_of(&h, &other, &pay_tick(&h, &other, 1000, "sse-theirs").await).await;
        let e = Stream::open(&h, &c, "/v1/events/stream", theirs["id"].as_str())
            .await
            .err()
            .unwrap();
        assert_eq!(e.status, 400);
        let e = Stream::open(&h, &c, "/v1/events/stream?x=1", None)
            .await
            .err()
            .unwrap();
        assert_eq!(e.error_code(), Some("parameter_unknown"));

        // At most 5 streams per merchant (s2, s3, s4 are open).
        let s5 = Stream::open(&h, &c, "/v1/events/stream", None)
            .await
            .unwrap();
        let s6 = Stream::open(&h, &c, "/v1/events/stream", None)
            .await
            .unwrap();
        let e = Stream::open(&h, &c, "/v1/events/stream", None)
            .await
            .err()
            .unwrap();
        assert_eq!((e.status, e.error_code()), (429, Some("too_many_streams")));
        assert!(
            Stream::open(&h, &other, "/v1/events/stream", None)
                .await
                .is_ok(),
            "per merchant"
        );

        // Server shutdown ends every stream, so graceful shutdown is not held up.
        h.engine.feed.close();
        for s in [s2, s3, s4, s5, s6] {
            assert!(s.ended(WAIT).await, "the stream ended");
        }
        let e = Stream::open(&h, &c, "/v1/events/stream", None)
            .await
            .err()
            .unwrap();
        assert_eq!(e.status, 503);
    }
);

// --- other event types ----------------------------------------------------------------------

// Refund events will be written by the refunds work; delivery must need no change for them.
// Here two are written straight into the outbox (with a status change of their payment, as
// every event is): one without a notify URL of its own goes to its payment's, signed with the
// payment's app; one with its own goes there.
both!(
    any_outbox_event_is_delivered_to_its_objects_target,
    |b| async move {
        let Some(h) = hook_harness(b, true).await else {
            return;
        };
        let (payment_rx, refund_rx) = (Receiver::start(&[]).await, Receiver::start(&[]).await);
        let (_, c) = h.merchant("Shop").await;
        // 1004 leaves the payment open (processing): it has no event of its own.
        let pid = pay(&h, &c, 1004, "refunded", Some(&payment_rx.url)).await;
        let payment_id: payrail_domain::PaymentId = pid.parse().unwrap();
        let p = h
            .engine
            .store
            .get_payment_any(payment_id)
            .await
            .unwrap()
            .unwrap();
        let now = h.clock.now_ms();
        let refund_event = |event_type: &str, refund: Value, now: i64| {
            let id = h.engine.ids.next::<payrail_domain::id::Event>().to_string();
            let payload = json!({"id": id, "object": "event", "type": event_type, "created": now / 1000,
                                 "data": {"object": refund}});
            payrail_store::NewEvent {
                id,
                merchant_id: p.merchant_id,
                event_type: event_type.into(),
                object_id: refund["id"].as_str().unwrap().into(),
                payload: payload.to_string(),
                created_at_ms: now,
            }
        };
        let events = [
            refund_event(
                "refund.succeeded",
                json!({"id": "re_1", "object": "refund", "payment_id": pid, "amount": 100, "status": "succeeded", "notify_url": null}),
                now,
            ),
            refund_event(
                "refund.failed",
                json!({"id": "re_2", "object": "refund", "payment_id": pid, "amount": 50, "status": "failed", "notify_url": refund_rx.url}),
                now + 1,
            ),
        ];
        for e in &events {
            let p = h
                .engine
                .store
                .get_payment_any(payment_id)
                .await
                .unwrap()
                .unwrap();
            let a = h
                .engine
                .store
                .get_attempts(payment_id)
                .await
                .unwrap()
                .remove(0);
            let t = payrail_store::Transition {
                payment_id,
                payment_version: p.version,
                payment_status: p.status,
                attempt_id: a.id,
                attempt_version: a.version,
                attempt_status: a.status,
                channel_trade_no: None,
                failure_code: None,
                failure_message: None,
                paid_at_ms: None,
                now_ms: now,
                event: Some(e.clone()),
                job: None,
                idempotency: None,
                ledger: None,
            };
            assert!(h.engine.store.apply_transition(&t).await.unwrap());
        }
        until("both deliveries", || async {
            payment_rx.count() == 1 && refund_rx.count() == 1
        })
        .await;
        for (rx, e) in [(&payment_rx, &events[0]), (&refund_rx, &events[1])] {
            let got = rx.received().remove(0);
            assert_eq!(got.header("payrail-event-id"), Some(e.id.as_str()));
            assert_eq!(
                got.header("payrail-event-type"),
                Some(e.event_type.as_str())
            );
            assert_eq!(got.body, e.payload.as_bytes());
            let header = got.header("payrail-signature").unwrap();
            let (t, v1) = header.split_once(",v1=").unwrap();
            assert_eq!(
                v1,
                expected_signature(&c.secret, t.strip_prefix("t=").unwrap(), &got.body),
                "signed with the payment's app"
            );
        }
        // They are the merchant's events like any other.
        let list = get_at(&h, &c, "/v1/events").await;
        let types: Vec<&str> = list.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["refund.failed", "refund.succeeded"]);
    }
);
