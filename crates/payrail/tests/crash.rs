//! Crash test: the real binary under load, killed with SIGKILL, restarted on the same data
//! folder. Every payment whose creation was acknowledged must be there with the acknowledged
//! status (or a later one along the whitelist), and payments left processing must resume
//! syncing to their final status after the restart. Bounded in time throughout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use payrail_client::{nonce, Credentials, PayrailClient};
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const OPERATOR_TOKEN: &str = "op_crash_test_token_0123456789";

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    /// An interrupted or failed test must not leave a server running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_payrail"))
        .arg("serve")
        .env("PAYRAIL_DATA_DIR", dir)
        .env("PAYRAIL_LISTEN", "127.0.0.1:0")
        .env("PAYRAIL_LOG", "warn")
        .env("PAYRAIL_LOG_FORMAT", "json")
        .env("PAYRAIL_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("PAYRAIL_SYNC_FIRST_DELAY_MS", "200")
        .env("PAYRAIL_SYNC_MAX_DELAY_MS", "1000")
        .env("PAYRAIL_WORKER_POLL_MS", "50")
        // Jobs leased by the killed process come back after the lease: keep it short here.
        .env("PAYRAIL_CHANNEL_TIMEOUT_MS", "1000")
        .env("PAYRAIL_SYNC_LEASE_MS", "2000")
        .env_remove("PAYRAIL_DATABASE_URL")
        .env_remove("PAYRAIL_MASTER_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start payrail serve");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("payrail listening on ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("server did not announce its address in 30 s");
    Server { child, url }
}

fn credentials(dir: &Path) -> Credentials {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("demo-credentials.json")).unwrap())
            .unwrap();
    Credentials {
        key_id: v["key_id"].as_str().unwrap().into(),
        secret: v["secret"].as_str().unwrap().into(),
    }
}

/// (payment id, acknowledged status, idempotency key, body) of every 200 answer.
type Acked = Arc<Mutex<Vec<(String, String, String, String)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_payments_survive_sigkill_and_sync_resumes() {
    let dir = std::env::temp_dir().join(format!("payrail-crash-{}", nonce()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = start(&dir);
    let creds = credentials(&dir);
    let client = PayrailClient::new(&server.url);

    let acked: Acked = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (client, creds, acked) = (client.clone(), creds.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            // Keeps sending until the server dies; bounded by the kill below and a count cap.
            while i < 100_000 {
                i += 1;
                // Even: succeeds at once. Odd: processing, paid 3 s after submission.
                let amount = if i % 2 == 0 { 1000 } else { 1002 };
                let key = nonce();
                let body = json!({"amount": amount, "currency": "CNY", "out_trade_no": format!("c{w}-{i}"), "subject": "crash", "method": "sandbox"}).to_string();
                match client.signed(&creds, Method::POST, "/v1/payments", Some(&body), Some(&key)).await {
                    Ok(a) if a.status == 200 => acked.lock().unwrap().push((
                        a.body["id"].as_str().unwrap().to_string(),
                        a.body["status"].as_str().unwrap().to_string(),
                        key,
                        body,
                    )),
                    Ok(a) => panic!("unexpected answer under load: {} {}", a.status, a.body),
                    Err(_) => break, // the server was killed
                }
                if Instant::now() > deadline + Duration::from_secs(20) {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep_until(deadline.into()).await;
    server.child.kill().unwrap(); // SIGKILL on Unix
    server.child.wait().unwrap();
    drop(server);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("load task hung")
            .unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let processing = acked.iter().filter(|a| a.1 == "processing").count();
    eprintln!(
        "acknowledged before SIGKILL: {} ({} processing)",
        acked.len(),
        processing
    );
    assert!(
        acked.len() > 50,
        "load too small to mean anything: {}",
        acked.len()
    );
    assert!(
        processing > 0,
        "some payments must be processing at the kill"
    );

    let server = start(&dir);
    let client = PayrailClient::new(&server.url);
    // Every acknowledged payment is there, with its status or a whitelisted successor.
    for (id, status, _, _) in &acked {
        let a = client
            .signed(
                &creds,
                Method::GET,
                &format!("/v1/payments/{id}"),
                None,
                None,
            )
            .await
            .unwrap();
        assert_eq!(a.status, 200, "acknowledged payment {id} lost: {}", a.body);
        let now = a.body["status"].as_str().unwrap();
        assert!(
            now == status || (status == "processing" && now == "succeeded"),
            "{id}: acked {status}, now {now}"
        );
    }
    // Retrying an acknowledged request with its idempotency key returns the same payment.
    for (id, _, key, body) in acked.iter().step_by(25) {
        let a = client
            .signed(&creds, Method::POST, "/v1/payments", Some(body), Some(key))
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.body["id"].as_str(), Some(id.as_str()));
    }
    // The status-sync worker of the new process finishes every payment left processing,
    // including ones whose request was in flight at the kill.
    let started = Instant::now();
    let mut statuses: HashMap<String, String> = HashMap::new();
    while started.elapsed() < Duration::from_secs(40) {
        statuses = client
            .list_all_payments(&creds, 1000)
            .await
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["id"].as_str().unwrap().into(),
                    p["status"].as_str().unwrap().into(),
                )
            })
            .collect();
        if statuses.values().all(|s| s != "processing") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stuck: Vec<_> = statuses
        .iter()
        .filter(|(_, s)| *s == "processing")
        .collect();
    assert!(
        stuck.is_empty(),
        "{} payments still processing 40 s after restart",
        stuck.len()
    );
    assert!(
        statuses.values().all(|s| s == "succeeded"),
        "the sandbox amounts used all end in success"
    );
    for (id, _, _, _) in &acked {
        assert_eq!(
            statuses.get(id).map(String::as_str),
            Some("succeeded"),
            "{id}"
        );
    }
    ledger_after_the_crash(&dir, server, &creds).await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn op_call(client: &PayrailClient, method: Method, path: &str, body: Option<Value>) -> Value {
    let key = (method == Method::POST).then(nonce);
    let a = client
        .operator(OPERATOR_TOKEN, method, path, body.as_ref(), key.as_deref())
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{path}: {}", a.body);
    a.body
}

fn payrail_cli(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_payrail"))
        .args(args)
        .env("PAYRAIL_DATA_DIR", dir)
        .env("PAYRAIL_LOG", "warn")
        .env_remove("PAYRAIL_DATABASE_URL")
        .env_remove("PAYRAIL_MASTER_KEY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// After the kill and the restart: every succeeded payment has exactly one posting set (none
/// lost with a crash between status change and posting, none doubled by a retry), the books
/// balance, and `payrail settle` settles the day once.
async fn ledger_after_the_crash(dir: &Path, server: Server, creds: &Credentials) {
    let client = PayrailClient::new(&server.url);
    let payments = client.list_all_payments(creds, 1000).await.unwrap();
    let merchant = payments[0]["merchant_id"].as_str().unwrap().to_string();
    let total: i64 = payments.iter().map(|p| p["amount"].as_i64().unwrap()).sum();
    let mut captured = std::collections::HashSet::new();
    let mut after: Option<i64> = None;
    for _ in 0..100_000 {
        let path = match after {
            Some(seq) => format!("/v1/operator/ledger/entries?limit=100&starting_after={seq}"),
            None => "/v1/operator/ledger/entries?limit=100".to_string(),
        };
        let page = op_call(&client, Method::GET, &path, None).await;
        for e in page["data"].as_array().unwrap() {
            if e["type"] == "payment_captured" {
                assert!(
                    captured.insert(e["reference"].as_str().unwrap().to_string()),
                    "{e}"
                );
            }
            after = e["seq"].as_i64();
        }
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(
        captured.len(),
        payments.len(),
        "one posting set per succeeded payment"
    );
    let trial = op_call(
        &client,
        Method::GET,
        "/v1/operator/ledger/trial-balance",
        None,
    )
    .await;
    assert_eq!(trial["balanced"], true, "{trial}");
    let balance = client
        .signed(creds, Method::GET, "/v1/balance", None, None)
        .await
        .unwrap();
    assert_eq!(
        balance.body["pending"][0]["amount"], total,
        "{}",
        balance.body
    );

    // Settle today's payments with `payrail settle`: T+0 with a cut-off two seconds from now
    // (Beijing time), then the day is due.
    let cutoff_ms = payrail_client::unix_now() * 1000 + 2_500;
    let local = payrail_domain::civil::DateTime::from_unix_ms(cutoff_ms, 480).unwrap();
    op_call(
        &client,
        Method::POST,
        "/v1/operator/settlement-cycles",
        Some(json!({"merchant_id": merchant, "t_plus_days": 0, "cutoff": local.time.to_string(), "utc_offset": "+08:00"})),
    )
    .await;
    drop(server);
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let (code, stdout, stderr) = payrail_cli(dir, &["settle"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("settled 1 batch(es)"), "{stdout}");
    assert!(
        stdout.contains(&format!("{} payment(s)", payments.len())),
        "{stdout}"
    );
    let (code, stdout, stderr) = payrail_cli(dir, &["settle"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("settled 0 batch(es)"), "{stdout}");
    let (code, _, stderr) = payrail_cli(dir, &["settle", "--date", "yesterday"]);
    assert_eq!(code, 2, "{stderr}");
    let server = start(dir);
    let client = PayrailClient::new(&server.url);
    let balance = client
        .signed(creds, Method::GET, "/v1/balance", None, None)
        .await
        .unwrap();
    assert_eq!(balance.body["pending"][0]["amount"], 0, "{}", balance.body);
    assert_eq!(
        balance.body["available"][0]["amount"], total,
        "{}",
        balance.body
    );
    drop(server);
}
