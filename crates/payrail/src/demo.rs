//! `payrail demo`: a guided, real, signed merchant flow against a running server.

use anyhow::{bail, Context, Result};
use payrail_client::{nonce, Answer, Credentials, PayrailClient};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Server URL (default: the one in the credentials file, else http://127.0.0.1:8080).
    #[arg(long)]
    url: Option<String>,
    /// Credentials file written by `payrail serve` on first start.
    #[arg(long, default_value = "./payrail-data/demo-credentials.json")]
    credentials: PathBuf,
    /// Key id (instead of the credentials file).
    #[arg(long, requires = "secret")]
    key_id: Option<String>,
    /// App secret (instead of the credentials file; also PAYRAIL_DEMO_SECRET).
    #[arg(long, env = "PAYRAIL_DEMO_SECRET", hide_env_values = true)]
    secret: Option<String>,
}

fn show(step: &str, a: &Answer) {
    let summary = match (a.body.get("status"), a.error_code()) {
        (Some(Value::String(s)), _) => format!("status={s}"),
        (_, Some(code)) => format!(
            "error={code}: {}",
            a.body["error"]["message"].as_str().unwrap_or("")
        ),
        _ => String::new(),
    };
    let replay = if a.replayed {
        "  (idempotent replay)"
    } else {
        ""
    };
    println!("  {step:<58} HTTP {}  {summary}{replay}", a.status);
}

fn expect(a: &Answer, status: u16, what: &str) -> Result<()> {
    if a.status != status {
        bail!(
            "{what}: expected HTTP {status}, got {} {}",
            a.status,
            a.body
        );
    }
    Ok(())
}

fn payment_body(amount: i64, otn: &str, subject: &str) -> String {
    json!({"amount": amount, "currency": "CNY", "out_trade_no": otn, "subject": subject, "method": "sandbox"}).to_string()
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let (url, creds) = match (args.key_id, args.secret) {
        (Some(key_id), Some(secret)) => (
            args.url.unwrap_or_else(|| "http://127.0.0.1:8080".into()),
            Credentials { key_id, secret },
        ),
        _ => {
            let text = std::fs::read_to_string(&args.credentials).with_context(|| {
                format!("cannot read {}; start `payrail serve` first (it writes the demo credentials there) or pass --key-id and --secret", args.credentials.display())
            })?;
            let v: Value = serde_json::from_str(&text).context("credentials file is not JSON")?;
            let s = |k: &str| {
                v[k].as_str()
                    .map(str::to_string)
                    .with_context(|| format!("credentials file lacks {k}"))
            };
            (
                args.url.map(Ok).unwrap_or_else(|| s("url"))?,
                Credentials {
                    key_id: s("key_id")?,
                    secret: s("secret")?,
                },
            )
        }
    };
    let c = PayrailClient::new(&url);
    let (status, _) = c
        .get("/healthz")
        .await
        .with_context(|| format!("no payrail server at {url}; start it with `payrail serve`"))?;
    if status != 200 {
        bail!("{url}/healthz answered HTTP {status}");
    }
    let run_id = &nonce()[..8];
    println!("payrail demo against {url} (key {})\n", creds.key_id);

    println!("1. A payment that succeeds at once (sandbox: any amount not ending in 01-06)");
    let otn = format!("demo-{run_id}-1");
    let body = payment_body(1200, &otn, "Coffee x2");
    let key = nonce();
    let a = c
        .signed(
            &creds,
            Method::POST,
            "/v1/payments",
            Some(&body),
            Some(&key),
        )
        .await?;
    show("POST /v1/payments  12.00 CNY", &a);
    expect(&a, 200, "create payment")?;
    let id = a.body["id"].as_str().unwrap_or_default().to_string();
    println!(
        "     id={id} channel_trade_no={}",
        a.body["channel_trade_no"]
    );
    let r = c
        .signed(
            &creds,
            Method::POST,
            "/v1/payments",
            Some(&body),
            Some(&key),
        )
        .await?;
    show("same request, same Idempotency-Key (a client retry)", &r);
    if r.body["id"] != a.body["id"] || !r.replayed {
        bail!("the retry did not return the same payment");
    }
    let g = c
        .signed(
            &creds,
            Method::GET,
            &format!("/v1/payments/{id}"),
            None,
            None,
        )
        .await?;
    show(&format!("GET /v1/payments/{id}"), &g);
    let g = c
        .signed(
            &creds,
            Method::GET,
            &format!("/v1/payments/out_trade_no/{otn}"),
            None,
            None,
        )
        .await?;
    show("GET by out_trade_no", &g);

    println!("\n2. A payment the payer confirms a few seconds later (amount ending in 02)");
    let a = c
        .post_new(
            &creds,
            "/v1/payments",
            Some(&payment_body(1002, &format!("demo-{run_id}-2"), "Tea")),
        )
        .await?;
    show("POST /v1/payments  10.02 CNY", &a);
    expect(&a, 200, "create pending payment")?;
    let pid = a.body["id"].as_str().unwrap_or_default().to_string();
    let started = Instant::now();
    let mut last = a;
    while last.body["status"] == "processing" && started.elapsed() < Duration::from_secs(45) {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        last = c
            .signed(
                &creds,
                Method::GET,
                &format!("/v1/payments/{pid}"),
                None,
                None,
            )
            .await?;
    }
    show(
        &format!(
            "status-sync worker resolved it after {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        &last,
    );

    println!("\n3. Closing an unpaid payment (amount ending in 04: the payer never pays)");
    let a = c
        .post_new(
            &creds,
            "/v1/payments",
            Some(&payment_body(1504, &format!("demo-{run_id}-3"), "Cake")),
        )
        .await?;
    show("POST /v1/payments  15.04 CNY", &a);
    let cid = a.body["id"].as_str().unwrap_or_default().to_string();
    let cl = c
        .post_new(&creds, &format!("/v1/payments/{cid}/close"), None)
        .await?;
    show(&format!("POST /v1/payments/{cid}/close"), &cl);
    let cl2 = c
        .post_new(&creds, &format!("/v1/payments/{id}/close"), None)
        .await?;
    show("closing the succeeded payment from step 1", &cl2);

    println!("\n4. A declined payment (amount ending in 01)");
    let a = c
        .post_new(
            &creds,
            "/v1/payments",
            Some(&payment_body(2001, &format!("demo-{run_id}-4"), "Book")),
        )
        .await?;
    show("POST /v1/payments  20.01 CNY", &a);
    println!("     failure={}", a.body["failure"]);

    println!("\n5. Refunds of the payment from step 1: partial, the rest, then one fen too many");
    for (amount, label, want) in [
        (500, "refund 5.00 CNY", 200),
        (700, "refund the remaining 7.00 CNY", 200),
        (1, "refund 0.01 CNY more", 409),
    ] {
        let body = json!({"payment_id": id, "amount": amount, "out_refund_no": format!("demo-{run_id}-r{amount}"), "reason": "demo"}).to_string();
        let a = c.post_new(&creds, "/v1/refunds", Some(&body)).await?;
        show(&format!("POST /v1/refunds  {label}"), &a);
        expect(&a, want, label)?;
    }
    let g = c
        .signed(
            &creds,
            Method::GET,
            &format!("/v1/payments/{id}"),
            None,
            None,
        )
        .await?;
    println!(
        "     payment: amount_refunded={} amount_refundable={}",
        g.body["amount_refunded"], g.body["amount_refundable"]
    );

    println!("\n6. Bad requests: each gets a 4xx with a stable code, and nothing is written");
    let bad: Vec<(&str, String)> = vec![
        ("amount 0", payment_body(0, &format!("demo-{run_id}-b1"), "x")),
        ("amount 12.5 (not minor units)", r#"{"amount":12.5,"currency":"CNY","out_trade_no":"b2","subject":"x","method":"sandbox"}"#.into()),
        ("amount as a string", r#"{"amount":"100","currency":"CNY","out_trade_no":"b3","subject":"x","method":"sandbox"}"#.into()),
        ("unknown currency", r#"{"amount":100,"currency":"XYZ","out_trade_no":"b4","subject":"x","method":"sandbox"}"#.into()),
        ("unknown field", r#"{"amount":100,"currency":"CNY","out_trade_no":"b5","subject":"x","method":"sandbox","colour":"red"}"#.into()),
        ("malformed JSON", r#"{"amount":100,"#.into()),
        ("out_trade_no reused from step 1", payment_body(1200, &otn, "again")),
    ];
    for (what, body) in bad {
        let a = c.post_new(&creds, "/v1/payments", Some(&body)).await?;
        show(what, &a);
    }
    let a = c
        .signed(
            &creds,
            Method::POST,
            "/v1/payments",
            Some(&payment_body(100, "b8", "x")),
            None,
        )
        .await?;
    show("no Idempotency-Key", &a);
    let a = c
        .signed(
            &creds,
            Method::POST,
            "/v1/payments",
            Some(&payment_body(999, &otn, "other")),
            Some(&key),
        )
        .await?;
    show("step 1's Idempotency-Key with another body", &a);
    let wrong = Credentials {
        key_id: creds.key_id.clone(),
        secret: "sk_wrong".into(),
    };
    let a = c
        .signed(
            &wrong,
            Method::GET,
            &format!("/v1/payments/{id}"),
            None,
            None,
        )
        .await?;
    show("signed with a wrong secret", &a);

    let l = c
        .signed(&creds, Method::GET, "/v1/payments?limit=3", None, None)
        .await?;
    println!(
        "\n7. GET /v1/payments?limit=3 -> {} payments, has_more={}",
        l.body["data"].as_array().map(Vec::len).unwrap_or(0),
        l.body["has_more"]
    );
    println!("\nDone. Every response carries a Request-Id header; the server log has the same id.");
    Ok(())
}
