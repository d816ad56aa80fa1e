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
