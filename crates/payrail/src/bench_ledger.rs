//! `payrail bench ledger`: posts N two-leg transfers in batches of B through the real ledger
//! store (SQLite with `synchronous=FULL`, or PostgreSQL with its default durable commits), from
//! C concurrent clients, then verifies the books: every currency sums to zero, every account's
//! counters equal the sum of its postings, and exactly N entries were added.
//!
//! With `--hot-percent H`, H % of transfers debit or credit one hot account (the platform fee
//! account, flagged `BUFFERED` as in production); the others pick both sides uniformly among
//! `--accounts` accounts. On PostgreSQL a flusher applies buffered deltas every
//! [`FLUSH_INTERVAL_MS`] during the run, and once more before verification.

use crate::bench::{peak_rss_mb, percentile_ms};
use anyhow::{bail, Context, Result};
use payrail_domain::ledger::{
    AccountFlags, AccountId, AccountKind, Entry, EntryCode, EntryId, PostOutcome, Posting,
};
use payrail_domain::{Currency, Money};
use payrail_store::ledger::{AccountSpec, DynLedgerStore, FLUSH_BATCH_MAX, OPEN_BATCH_MAX};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sub-commands of `payrail bench`.
#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Measure ledger posting throughput through the real store, then verify the books.
    Ledger(LedgerBenchArgs),
}

#[derive(clap::Args)]
pub struct LedgerBenchArgs {
    /// Transfers to post in total.
    #[arg(long, default_value_t = 1_000_000)]
    transfers: u64,
    /// Transfers per batch (one store call, one commit on PostgreSQL; on SQLite concurrent
    /// batches may share a commit).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Accounts the uniform part of the load spreads over.
    #[arg(long, default_value_t = 10_000)]
    accounts: u64,
    /// Percentage of transfers with one side on the hot account (0..=100).
    #[arg(long, default_value_t = 0)]
    hot_percent: u8,
    /// Concurrent clients, each posting its own batches.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Make the hot account an ordinary (unbuffered) account, to measure what buffering saves.
    #[arg(long)]
    hot_unbuffered: bool,
    /// Database (default: SQLite in a fresh temporary folder).
    #[arg(long)]
    database_url: Option<String>,
    /// Seed of the transfer generator (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Bounds on the arguments.
const TRANSFERS_MAX: u64 = 100_000_000;
const ACCOUNTS_MAX: u64 = 10_000_000;
const CLIENTS_MAX: usize = 256;
/// How often the PostgreSQL flusher applies buffered deltas during the run.
const FLUSH_INTERVAL_MS: u64 = 100;
/// Amounts are 1..=this many minor units.
const AMOUNT_MAX_MINOR: i64 = 100_000;
/// Time the entries are posted at (fixed: the benchmark measures the store, not the clock).
const BENCH_NOW_MS: i64 = 1_750_000_000_000;

/// CPU time (user + system) this process has used, in ms. Wall-clock throughput on a shared
/// machine swings with other load; CPU per transfer is the steadier figure for comparing code.
fn cpu_ms() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in clock ticks of 1/100 s on every platform we run on.
    Some(ticks * 10)
}

fn account(i: u64) -> Result<AccountId> {
    Ok(AccountId::new(
        AccountKind::Wallet,
        &format!("bench{i:08}"),
        Currency::CNY,
    )?)
}

pub async fn run(args: LedgerBenchArgs) -> Result<()> {
    if args.transfers == 0 || args.transfers > TRANSFERS_MAX {
        bail!("--transfers must be 1..={TRANSFERS_MAX}");
    }
    if args.batch == 0 || args.batch > payrail_store::ledger::POST_BATCH_MAX {
        bail!(
            "--batch must be 1..={}",
            payrail_store::ledger::POST_BATCH_MAX
        );
    }
    if args.accounts < 2 || args.accounts > ACCOUNTS_MAX {
        bail!("--accounts must be 2..={ACCOUNTS_MAX}");
    }
    if args.hot_percent > 100 {
        bail!("--hot-percent must be 0..=100");
    }
    if args.clients == 0 || args.clients > CLIENTS_MAX {
        bail!("--clients must be 1..={CLIENTS_MAX}");
    }
    crate::serve::init_logging("warn", crate::config::LogFormat::Text);
    let tmp_dir = match &args.database_url {
        Some(_) => None,
        None => Some(std::env::temp_dir().join(format!(
            "payrail-bench-ledger-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ))),
    };
    let url = match (&args.database_url, &tmp_dir) {
        (Some(u), _) => u.clone(),
        (None, Some(d)) => format!("sqlite://{}", d.join("ledger.db").display()),
        (None, None) => bail!("no database"),
    };
    let store = payrail_store::ledger::open_ledger(&url)
        .await
        .with_context(|| format!("opening {}", payrail_store::redact_url(&url)))?;
    let result = bench(&args, store.clone()).await;
    drop(store);
    if let Some(dir) = tmp_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    let result = result?;
    if args.json {
        println!("{result}");
    } else {
        print_text(&result);
    }
    if result["verified"] != json!(true) {
        bail!("verification failed: {}", result["verify_note"]);
    }
    Ok(())
}

async fn bench(args: &LedgerBenchArgs, store: DynLedgerStore) -> Result<serde_json::Value> {
    let backend = store.ledger_backend();
    let hot = if args.hot_unbuffered {
        AccountId::new(AccountKind::Suspense, "benchhot", Currency::CNY)?
    } else {
        AccountId::platform_fee(Currency::CNY)
    };
    let hot_flags = if args.hot_unbuffered {
        AccountFlags::NONE
    } else {
        AccountFlags::BUFFERED
    };
    // Open the accounts (not timed). No limits: the benchmark measures posting, and a refused
    // transfer would not be a transfer.
    let mut specs = vec![AccountSpec {
        id: hot.clone(),
        flags: hot_flags,
    }];
    for i in 0..args.accounts {
        specs.push(AccountSpec {
            id: account(i)?,
            flags: AccountFlags::NONE,
        });
        if specs.len() == OPEN_BATCH_MAX {
            store.open_accounts(&specs, BENCH_NOW_MS).await?;
            specs.clear();
        }
    }
    if !specs.is_empty() {
        store.open_accounts(&specs, BENCH_NOW_MS).await?;
    }
    let entries_before = store.check_ledger().await?.entries;

    let next = Arc::new(AtomicU64::new(0));
    let run_tag = format!("{:08x}", rand::random::<u32>());
    let seed = args.seed.unwrap_or_else(rand::random);
    let stop_flusher = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = (backend == "postgres").then(|| {
        let (store, stop) = (store.clone(), stop_flusher.clone());
        tokio::spawn(async move {
            let mut flushed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(FLUSH_INTERVAL_MS)).await;
                match store.flush_buffered(BENCH_NOW_MS, FLUSH_BATCH_MAX).await {
                    Ok(r) => flushed += r.deltas,
                    Err(e) => return Err(anyhow::anyhow!("flush failed: {e}")),
                }
            }
            Ok(flushed)
        })
    });
    let cpu_before = cpu_ms();
    let started = Instant::now();
    let mut handles = Vec::with_capacity(args.clients);
    for client in 0..args.clients {
        let ctx = Client {
            store: store.clone(),
            next: next.clone(),
            total: args.transfers,
            batch: args.batch,
            accounts: args.accounts,
            hot_percent: args.hot_percent,
            hot: hot.clone(),
            run_tag: run_tag.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(client as u64)),
        };
        handles.push(tokio::spawn(ctx.drive()));
    }
    let mut latencies_us: Vec<u32> = Vec::new();
    let mut posted = 0u64;
    let mut first_error = None;
    for h in handles {
        match h.await? {
            Ok((lat, n)) => {
                latencies_us.extend(lat);
                posted += n;
            }
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_used_ms = cpu_ms().zip(cpu_before).map(|(a, b)| a.saturating_sub(b));
    stop_flusher.store(true, Ordering::Relaxed);
    let flushed_during_run = match flusher {
        Some(f) => f.await??,
        None => 0,
    };
    // Apply whatever is still buffered, then verify.
    let flush_started = Instant::now();
    loop {
        let r = store.flush_buffered(BENCH_NOW_MS, FLUSH_BATCH_MAX).await?;
        if r.deltas == 0 {
            break;
        }
    }
    let final_flush_ms = flush_started.elapsed().as_secs_f64() * 1000.0;
    let verify_started = Instant::now();
    let check = store.check_ledger().await?;
    let verify_s = verify_started.elapsed().as_secs_f64();
    let added = check.entries - entries_before;
    let expected = i64::try_from(args.transfers).unwrap_or(i64::MAX);
    let verified = check.ok()
        && check.unflushed == 0
        && added == expected
        && posted == args.transfers
        && first_error.is_none();
    let verify_note = format!(
        "{} entries added (expected {expected}), {} postings, {} accounts, net per currency {:?}, {} mismatched accounts{}",
        added,
        check.postings,
        check.accounts,
        check.net_by_currency,
        check.mismatched.len(),
        first_error
            .as_ref()
            .map(|e| format!(", first error: {e}"))
            .unwrap_or_default()
    );
    latencies_us.sort_unstable();
    Ok(json!({
        "transfers_per_sec": (posted as f64 / elapsed).round(),
        "batch_latency_ms_p50": percentile_ms(&latencies_us, 50.0),
        "batch_latency_ms_p99": percentile_ms(&latencies_us, 99.0),
        "batch_latency_ms_max": percentile_ms(&latencies_us, 100.0),
        "peak_rss_mb": peak_rss_mb(),
        "cpu_us_per_transfer": cpu_used_ms.map(|ms| (ms as f64 * 1000.0 / posted.max(1) as f64 * 10.0).round() / 10.0),
        "transfers": posted,
        "batches": latencies_us.len(),
        "batch": args.batch,
        "accounts": args.accounts,
        "hot_percent": args.hot_percent,
        "hot_account": hot.to_string(),
        "hot_buffered": !args.hot_unbuffered,
        "clients": args.clients,
        "database": backend,
        "duration_s": (elapsed * 100.0).round() / 100.0,
        "flushed_during_run": flushed_during_run,
        "final_flush_ms": (final_flush_ms * 10.0).round() / 10.0,
        "verify_s": (verify_s * 100.0).round() / 100.0,
        "verified": verified,
        "verify_note": verify_note,
        "seed": seed,
    }))
}

struct Client {
    store: DynLedgerStore,
    next: Arc<AtomicU64>,
    total: u64,
    batch: usize,
    accounts: u64,
    hot_percent: u8,
    hot: AccountId,
    run_tag: String,
    rng: rand::rngs::StdRng,
}

impl Client {
    /// Posts batches until the shared counter reaches the total; returns each batch's latency
    /// (µs) and the number of transfers posted.
    async fn drive(mut self) -> Result<(Vec<u32>, u64)> {
        let mut latencies = Vec::new();
        let mut posted = 0u64;
        loop {
            let start = self.next.fetch_add(self.batch as u64, Ordering::Relaxed);
            if start >= self.total {
                break;
            }
            let end = (start + self.batch as u64).min(self.total);
            let mut entries = Vec::with_capacity(self.batch);
            for i in start..end {
                entries.push(self.transfer(i)?);
            }
            let t0 = Instant::now();
            let out = self.store.post_entries(&entries, BENCH_NOW_MS).await?;
            latencies.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
            for o in &out {
                match o {
                    PostOutcome::Posted(_) => posted += 1,
                    other => bail!("transfer not posted: {other:?}"),
                }
            }
        }
        Ok((latencies, posted))
    }

    fn transfer(&mut self, i: u64) -> Result<Entry> {
        let mut debit = account(self.rng.gen_range(0..self.accounts))?;
        let mut credit = account(self.rng.gen_range(0..self.accounts))?;
        while credit == debit {
            credit = account(self.rng.gen_range(0..self.accounts))?;
        }
        if self.rng.gen_range(0..100u8) < self.hot_percent {
            if self.rng.gen_bool(0.5) {
                debit = self.hot.clone();
            } else {
                credit = self.hot.clone();
            }
        }
        let amount = Money::new(self.rng.gen_range(1..=AMOUNT_MAX_MINOR), Currency::CNY);
        // Ids increase with `i`, like the time-ordered ids posting rules derive from payments.
        let id = EntryId::parse(&format!("bench-{}-{i:012}", self.run_tag))?;
        Ok(Entry::posted(
            id,
            EntryCode::Transfer,
            None,
            vec![
                Posting::debit(debit, amount),
                Posting::credit(credit, amount),
            ],
        )?)
    }
}

fn print_text(r: &serde_json::Value) {
    println!(
        "payrail bench ledger: {} transfers on {} (batch {}, {} accounts, {} % hot{}, {} clients, {} s)",
        r["transfers"],
        r["database"],
        r["batch"],
        r["accounts"],
        r["hot_percent"],
        if r["hot_buffered"] == json!(true) {
            ", buffered"
        } else {
            ", unbuffered"
        },
        r["clients"],
        r["duration_s"]
    );
    println!("  transfers/s     {}", r["transfers_per_sec"]);
    println!(
        "  batch latency   p50 {} ms  p99 {} ms  max {} ms  ({} batches)",
        r["batch_latency_ms_p50"],
        r["batch_latency_ms_p99"],
        r["batch_latency_ms_max"],
        r["batches"]
    );
    println!("  peak RSS        {} MiB", r["peak_rss_mb"]);
    println!(
        "  CPU             {} µs per transfer (this process, all threads)",
        r["cpu_us_per_transfer"]
    );
    if r["database"] == json!("postgres") {
        println!(
            "  flushes         {} deltas during the run, final flush {} ms",
            r["flushed_during_run"], r["final_flush_ms"]
        );
    }
    println!(
        "  verified        {}  ({}; {} s)",
        r["verified"], r["verify_note"], r["verify_s"]
    );
}
