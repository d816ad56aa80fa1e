//! The binary's user-facing behaviour: bad configuration exits with code 2 and a message that
//! names the setting; `migrate` works on a fresh folder.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn payrail(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let dir = std::env::temp_dir().join(format!("payrail-cli-{}", payrail_client::nonce()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_payrail"));
    cmd.args(args)
        .current_dir(&dir)
        .env("PAYRAIL_DATA_DIR", &dir)
        .env_remove("PAYRAIL_DATABASE_URL");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn bad_configuration_exits_2_with_a_clear_message() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("PAYRAIL_LISTEN", "not-an-address")], "listen address"),
        (&[("PAYRAIL_ROLES", "api,cook")], "unknown role"),
        (
            &[("PAYRAIL_CHANNEL_TIMEOUT_MS", "abc")],
            "PAYRAIL_CHANNEL_TIMEOUT_MS",
        ),
        (&[("PAYRAIL_CHANNEL_TIMEOUT_MS", "5")], "channel_timeout_ms"),
        (&[("PAYRAIL_DATABASE_URL", "mysql://x")], "database URL"),
        (&[("PAYRAIL_MASTER_KEY", "short")], "PAYRAIL_MASTER_KEY"),
        (&[("PAYRAIL_LOG_FORMAT", "xml")], "log format"),
    ];
    for (env, needle) in cases {
        let (code, _, stderr) = payrail(&["serve"], env);
        assert_eq!(code, 2, "{env:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{env:?}: message should mention {needle}: {stderr}"
        );
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
    let (code, _, stderr) = payrail(&["serve", "--config", "/nonexistent/payrail.toml"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/payrail.toml"), "{stderr}");
}

#[test]
fn migrate_creates_a_fresh_database() {
    let (code, stdout, stderr) = payrail(&["migrate"], &[("PAYRAIL_LOG", "warn")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("is up to date"), "{stdout}");
}

#[test]
fn demo_without_a_server_says_what_to_do() {
    let (code, _, stderr) = payrail(
        &[
            "demo",
            "--url",
            "http://127.0.0.1:9",
            "--key-id",
            "k",
            "--secret",
            "s",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("payrail serve"), "{stderr}");
}

#[test]
fn a_changed_master_key_is_refused_at_start() {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("payrail-cli-key-{}", payrail_client::nonce()));
    std::fs::create_dir_all(&dir).unwrap();
    let key_a = "11".repeat(32);
    let mut first = Command::new(env!("CARGO_BIN_EXE_payrail"))
        .arg("serve")
        .env("PAYRAIL_DATA_DIR", &dir)
        .env("PAYRAIL_LISTEN", "127.0.0.1:0")
        .env("PAYRAIL_MASTER_KEY", &key_a)
        .env_remove("PAYRAIL_DATABASE_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = first.stdout.take().unwrap();
    let started = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.starts_with("payrail listening on"));
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(started);
    let out = Command::new(env!("CARGO_BIN_EXE_payrail"))
        .arg("serve")
        .env("PAYRAIL_DATA_DIR", &dir)
        .env("PAYRAIL_LISTEN", "127.0.0.1:0")
        .env("PAYRAIL_MASTER_KEY", "22".repeat(32))
        .env_remove("PAYRAIL_DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("master key does not match"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn requery_needs_ids_or_open_and_runs_on_a_fresh_database() {
    let (code, _, stderr) = payrail(&["requery"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--open"), "{stderr}");
    let (code, _, stderr) = payrail(&["requery", "not-an-id"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not a payment id"), "{stderr}");
    // No open payments yet: nothing to do, success.
    let (code, stdout, stderr) = payrail(&["requery", "--open"], &[("PAYRAIL_LOG", "warn")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("re-queried 0 payment(s)"), "{stdout}");
}

/// A `payrail serve` child process, killed when dropped (an interrupted or failed test must
/// not leave it running).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `args` with `envs` and waits (bounded) for a stdout line starting with `prefix`;
/// returns the child and the rest of that line.
fn start_until(args: &[&str], envs: &[(&str, &str)], prefix: &str) -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_payrail"));
    cmd.args(args)
        .env_remove("PAYRAIL_DATABASE_URL")
        .env_remove("PAYRAIL_MASTER_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = Child(cmd.spawn().unwrap());
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let prefix = prefix.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix(&prefix) {
                let _ = tx.send(rest.to_string());
            }
        }
    });
    let rest = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the process did not start in 30 s");
    (child, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requery_resolves_an_open_payment_in_the_database() {
    use payrail_client::{Credentials, PayrailClient};
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let dir = std::env::temp_dir().join(format!("payrail-cli-requery-{}", payrail_client::nonce()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.to_str().unwrap();
        let env = [("PAYRAIL_DATA_DIR", data), ("PAYRAIL_LOG", "warn")];
        // The API role only: no status-sync worker, so the payment stays open in the database.
        // Sandbox amount ..03 hangs the submit (the money was taken): the create answers
        // `processing` after the channel timeout.
        let (server, url) = start_until(
            &["serve"],
            &[
                env[0],
                env[1],
                ("PAYRAIL_LISTEN", "127.0.0.1:0"),
                ("PAYRAIL_ROLES", "api"),
                ("PAYRAIL_CHANNEL_TIMEOUT_MS", "200"),
            ],
            "payrail listening on ",
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("demo-credentials.json")).unwrap())
                .unwrap();
        let creds = Credentials {
            key_id: v["key_id"].as_str().unwrap().into(),
            secret: v["secret"].as_str().unwrap().into(),
        };
        let body = serde_json::json!({"amount": 1003, "currency": "CNY", "out_trade_no": "cli-1", "subject": "requery", "method": "sandbox"}).to_string();
        let a = PayrailClient::new(&url)
            .signed(&creds, reqwest::Method::POST, "/v1/payments", Some(&body), Some(&payrail_client::nonce()))
            .await
            .unwrap();
        assert_eq!((a.status, a.body["status"].as_str()), (200, Some("processing")), "{}", a.body);
        let id = a.body["id"].as_str().unwrap().to_string();
        drop(server);

        // The server is down; the CLI asks the channel and records the answer.
        let (code, stdout, stderr) = payrail_in(&["requery", "--open"], &env);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(&format!("{id}  succeeded")), "{stdout}");
        assert!(stdout.contains("re-queried 1 payment(s): 1 succeeded"), "{stdout}");
        // Resolved for good: nothing is open any more, and a named re-query reads it back.
        let (code, stdout, stderr) = payrail_in(&["requery", "--open"], &env);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("re-queried 0 payment(s)"), "{stdout}");
        let (code, stdout, stderr) = payrail_in(&["requery", &id], &env);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(&format!("{id}  succeeded")), "{stdout}");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("test took too long");
}

/// Runs the binary to completion with `envs` (no temporary data folder of its own).
fn payrail_in(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_payrail"));
    cmd.args(args)
        .env_remove("PAYRAIL_DATABASE_URL")
        .env_remove("PAYRAIL_MASTER_KEY");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulate_serves_a_channel_on_a_free_port() {
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        let dir =
            std::env::temp_dir().join(format!("payrail-cli-emulate-{}", payrail_client::nonce()));
        // The committed test keys: generating RSA keys is slow in debug builds.
        let keys = dir.join("unionpay");
        std::fs::create_dir_all(&keys).unwrap();
        use payrail_emulator::testkeys as k;
        for (name, pem) in [
            ("channel-private.pem", k::CHANNEL_PRIVATE_PEM),
            ("channel-public.pem", k::CHANNEL_PUBLIC_PEM),
            ("merchant-private.pem", k::MERCHANT_PRIVATE_PEM),
            ("merchant-public.pem", k::MERCHANT_PUBLIC_PEM),
        ] {
            std::fs::write(keys.join(name), pem).unwrap();
        }
        let (child, url) = start_until(
            &[
                "emulate",
                "unionpay",
                "--port",
                "0",
                "--keys-dir",
                dir.to_str().unwrap(),
            ],
            &[],
            "unionpay emulator listening on ",
        );
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        let clock: serde_json::Value = http
            .get(format!("{url}/__admin/clock"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            clock["now_ms"].as_i64().unwrap() > 1_700_000_000_000,
            "{clock}"
        );
        // An unsigned request to the gateway is refused with UnionPay's own code.
        let refused = http
            .post(format!("{url}/gateway/api/queryTrans.do"))
            .form(&[("merId", "777290058110048")])
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(refused.contains("respCode=11"), "{refused}");
        // The channel-account body it wrote names its own port.
        let account: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(keys.join("channel-account.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(account["config"]["base_url"], url.as_str());
        drop(child);
        assert!(
            http.get(format!("{url}/__admin/clock"))
                .send()
                .await
                .is_err(),
            "still serving after the kill"
        );
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("test took too long");
}
