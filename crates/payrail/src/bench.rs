//! `payrail bench`: drives signed create-payment requests over real HTTP on loopback against the
//! sandbox channel's immediate-success path, then verifies that every acknowledged payment is
//! stored with the status it was acknowledged with.

use crate::config::{Config, LogFormat};
use anyhow::{bail, Context, Result};
use payrail_client::{nonce, Credentials, PayrailClient};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// What to measure instead of create-payment requests.
    #[command(subcommand)]
    pub command: Option<crate::bench_ledger::BenchCommand>,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrent clients, each with its own keep-alive connection.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Benchmark a running server instead of an in-process one.
    #[arg(long)]
    target: Option<String>,
    /// Operator token of the --target server (to create the bench merchant).
    #[arg(long, env = "PAYRAIL_OPERATOR_TOKEN", hide_env_values = true)]
    operator_token: Option<String>,
    /// Database of the in-process server (default: SQLite in a fresh temporary folder).
    #[arg(long)]
    database_url: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// How the merchant order numbers look: `time` (time-prefixed and rising, like most
    /// merchants' order numbers) or `random` (UUID-like; every insert lands on a random page of
    /// the `(merchant, out_trade_no)` index, which costs about one page write per payment more).
    #[arg(long, value_enum, default_value_t = OrderNumbers::Time)]
    out_trade_no: OrderNumbers,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum OrderNumbers {
    Time,
    Random,
}

/// Sandbox amount that succeeds at once (does not end in 01-06).
const AMOUNT_MINOR: i64 = 1000;
/// Upper bound on the verification listing, in pages of 100.
const VERIFY_PAGES_MAX: usize = 100_000;

struct Worker {
    latencies_us: Vec<u32>,
    acked: Vec<(String, String)>,
    errors: u64,
    first_error: Option<String>,
}

pub(crate) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kb / 1024.0 * 10.0).round() / 10.0)
}

pub(crate) fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted_us.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, sorted_us.len()) - 1;
    (f64::from(sorted_us[idx]) / 10.0).round() / 100.0
}

pub async fn run(args: BenchArgs) -> Result<()> {
    if args.concurrency == 0 || args.concurrency > 4096 {
        bail!("--concurrency must be 1..4096");
    }
    if args.duration == 0 || args.duration > 3600 {
        bail!("--duration must be 1..3600 seconds");
    }
    crate::serve::init_logging("warn", LogFormat::Text);
    let mut server = None;
    let mut tmp_dir = None;
    let merchant_name = format!("bench-{}", &nonce()[..6]);
    let (url, creds, database) = match &args.target {
        Some(url) => {
            let token = args
                .operator_token
                .clone()
                .context("--target needs --operator-token (or PAYRAIL_OPERATOR_TOKEN)")?;
            let client = PayrailClient::new(url);
            wait_healthy(&client).await?;
            let (_, creds) = client
                .onboard(&token, &merchant_name)
                .await
                .map_err(|e| anyhow::anyhow!("cannot create the bench merchant: {e}"))?;
            (url.clone(), creds, "remote".to_string())
        }
        None => {
            let dir = std::env::temp_dir().join(format!("payrail-bench-{}", &nonce()[..12]));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            drop(listener);
            let config = Config {
                listen: addr,
                data_dir: dir.clone(),
                database_url: args
                    .database_url
                    .clone()
                    .unwrap_or_else(|| format!("sqlite://{}", dir.join("payrail.db").display())),
                api: true,
                worker: true,
                log_level: "warn".into(),
                log_format: LogFormat::Text,
                engine: payrail_engine::EngineConfig::default(),
                shutdown_grace_ms: 5_000,
                demo_merchant: false,
                master_key: Some(payrail_engine::crypto::MasterKey::generate_hex()),
                operator_token: None,
                announce: false,
            };
            let engine = crate::serve::build_engine(&config).await?;
            let backend = engine.store.backend().to_string();
            // The merchant is made through the engine: an existing database keeps its own
            // operator token, which the bench does not need to know.
            let name = payrail_domain::input::MerchantName::parse(&merchant_name)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let merchant = engine.create_merchant(name.clone()).await?;
            let app = engine.create_app(merchant.id, name).await?;
            let creds = Credentials {
                key_id: app.app.key_id.clone(),
                secret: app.secret.expose().clone(),
            };
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let handle = tokio::spawn(async move {
                crate::serve::run_server(engine, &config, Some(stop_rx)).await
            });
            server = Some((stop_tx, handle));
            tmp_dir = Some(dir);
            (format!("http://{addr}"), creds, backend)
        }
    };
    let client = PayrailClient::new(&url);
    wait_healthy(&client).await?;

    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let progress = {
        let done = done.clone();
        let duration = args.duration;
        tokio::spawn(async move {
            let mut last = 0;
            for s in 1..=duration {
                tokio::time::sleep_until((started + Duration::from_secs(s)).into()).await;
                let n = done.load(Ordering::Relaxed);
                let bar_len = (s * 30 / duration) as usize;
                eprint!(
                    "\r  [{:<30}] {s:>4}/{duration} s  {n:>9} payments  {:>7}/s ",
                    "#".repeat(bar_len),
                    n - last
                );
                last = n;
            }
            eprintln!();
        })
    };
    let run_tag = nonce()[..8].to_string();
    let order_numbers = args.out_trade_no;
    let mut handles = Vec::with_capacity(args.concurrency);
    for w in 0..args.concurrency {
        let (client, creds, done, run_tag) =
            (client.clone(), creds.clone(), done.clone(), run_tag.clone());
        handles.push(tokio::spawn(async move {
            drive(w, client, creds, done, deadline, run_tag, order_numbers).await
        }));
    }
    let mut workers = Vec::with_capacity(handles.len());
    for h in handles {
        workers.push(h.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = progress.await;

    let mut lat: Vec<u32> = workers
        .iter()
        .flat_map(|w| w.latencies_us.iter().copied())
        .collect();
    lat.sort_unstable();
    let errors: u64 = workers.iter().map(|w| w.errors).sum();
    let acked: HashMap<String, String> = workers
        .iter()
        .flat_map(|w| w.acked.iter().cloned())
        .collect();
    let first_error = workers.iter().find_map(|w| w.first_error.clone());

    eprintln!("  verifying {} acknowledged payments…", acked.len());
    let (verified, verify_note) = verify(&client, &creds, &acked).await?;
    let result = json!({
        "payments_per_sec": (acked.len() as f64 / elapsed).round(),
        "latency_ms_p50": percentile_ms(&lat, 50.0),
        "latency_ms_p95": percentile_ms(&lat, 95.0),
        "latency_ms_p99": percentile_ms(&lat, 99.0),
        "latency_ms_max": percentile_ms(&lat, 100.0),
        "acknowledged": acked.len(),
        "errors": errors,
        "verified": verified,
        "database": database,
        "concurrency": args.concurrency,
        "out_trade_no": format!("{:?}", args.out_trade_no).to_lowercase(),
        "duration_s": (elapsed * 100.0).round() / 100.0,
        "peak_rss_mb": peak_rss_mb(),
        "target": args.target.clone().unwrap_or_else(|| "in-process".into()),
    });
    if let Some((stop, handle)) = server {
        let _ = stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    }
    if let Some(dir) = tmp_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    if args.json {
        println!("{result}");
    } else {
        println!(
            "payrail bench: {} on {} ({} clients, {:.1} s)",
            result["target"], result["database"], args.concurrency, elapsed
        );
        println!("  payments/s      {}", result["payments_per_sec"]);
        println!(
            "  latency ms      p50 {}  p95 {}  p99 {}  max {}",
            result["latency_ms_p50"],
            result["latency_ms_p95"],
            result["latency_ms_p99"],
            result["latency_ms_max"]
        );
        println!(
            "  acknowledged    {}   errors {}",
            result["acknowledged"], errors
        );
        println!(
            "  peak RSS        {} MiB{}",
            result["peak_rss_mb"],
            if args.target.is_some() {
                " (client only)"
            } else {
                " (server + client)"
            }
        );
        println!("  verified        {verified}  ({verify_note})");
    }
    if let Some(e) = first_error {
        eprintln!("  first error: {e}");
    }
    if !verified {
        bail!("verification failed: {verify_note}");
    }
    Ok(())
}

async fn wait_healthy(client: &PayrailClient) -> Result<()> {
    for _ in 0..200 {
        if let Ok((200, _)) = client.get("/healthz").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("server at {} did not become healthy", client.base_url())
}

async fn drive(
    w: usize,
    client: PayrailClient,
    creds: Credentials,
    done: Arc<AtomicU64>,
    deadline: Instant,
    run_tag: String,
    order_numbers: OrderNumbers,
) -> Worker {
    let mut out = Worker {
        latencies_us: Vec::with_capacity(1 << 14),
        acked: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let mut i: u64 = 0;
    while Instant::now() < deadline {
        i += 1;
        let out_trade_no = match order_numbers {
            OrderNumbers::Time => {
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                format!("{run_tag}-{unix_ms:013}-{w:03}-{i}")
            }
            OrderNumbers::Random => format!("{run_tag}-{}", nonce()),
        };
        let body = json!({
            "amount": AMOUNT_MINOR, "currency": "CNY", "out_trade_no": out_trade_no,
            "subject": "bench", "method": "sandbox",
        })
        .to_string();
        let t0 = Instant::now();
        let res = client.post_new(&creds, "/v1/payments", Some(&body)).await;
        let us = u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX);
        match res {
            Ok(a) if a.status == 200 => {
                out.latencies_us.push(us);
                let id = a.body["id"].as_str().unwrap_or_default().to_string();
                let status = a.body["status"].as_str().unwrap_or_default().to_string();
                out.acked.push((id, status));
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(a) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| format!("HTTP {} {}", a.status, a.body));
            }
            Err(e) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    out
}

/// Lists every payment of the bench merchant through the API and checks each acknowledged one.
async fn verify(
    client: &PayrailClient,
    creds: &Credentials,
    acked: &HashMap<String, String>,
) -> Result<(bool, String)> {
    let stored: HashMap<String, String> = client
        .list_all_payments(creds, VERIFY_PAGES_MAX)
        .await
        .map_err(|e| anyhow::anyhow!(e))?
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or_default().into(),
                p["status"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    let missing = acked.keys().filter(|id| !stored.contains_key(*id)).count();
    let wrong = acked
        .iter()
        .filter(|(id, st)| stored.get(*id).is_some_and(|s| s != *st))
        .count();
    let not_succeeded = acked.values().filter(|s| *s != "succeeded").count();
    let ok = missing == 0 && wrong == 0 && not_succeeded == 0 && !acked.is_empty();
    Ok((ok, format!("{} stored, {missing} missing, {wrong} with another status, {not_succeeded} not succeeded", stored.len())))
}
