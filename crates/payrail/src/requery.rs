//! `payrail requery`: ask the channels again about payments — the open ones, or those named —
//! and apply their answers (the operator's batch re-query). Runs against the database directly,
//! with the server's configuration (master key, channel accounts), so it works while the server
//! is down too. Exit code 1 if any re-query failed.

use crate::config::Overrides;
use anyhow::{bail, Result};
use payrail_domain::PaymentId;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(clap::Args, Clone)]
pub struct RequeryArgs {
    /// Payment ids (`pay_…`) to re-query.
    ids: Vec<String>,
    /// Re-query the open payments (those still waiting for a definite channel answer), soonest
    /// due first.
    #[arg(long)]
    open: bool,
    /// Most payments to re-query (at most 1000).
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

pub async fn run(o: Overrides, args: RequeryArgs) -> Result<()> {
    if args.open != args.ids.is_empty() {
        bail!("name payment ids or pass --open (one of the two)");
    }
    let mut ids = Vec::new();
    for s in &args.ids {
        match s.parse::<PaymentId>() {
            Ok(id) => ids.push(id),
            Err(_) => bail!("{s:?} is not a payment id (pay_…)"),
        }
    }
    let config = crate::serve::load_config(&o)?;
    crate::serve::init_logging("warn", config.log_format);
    let engine = crate::serve::build_engine(&config).await?;
    if args.open {
        ids = engine.open_payment_ids(args.limit).await?;
    }
    ids.truncate(args.limit.min(payrail_engine::payments::REQUERY_BATCH_MAX));
    let total = ids.len();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let shown = Arc::new(AtomicBool::new(false));
    let shown2 = shown.clone();
    let results = engine
        .requery_batch(ids, move |n| {
            if tty {
                shown2.store(true, Ordering::Relaxed);
                let width = 30usize;
                let filled = n.saturating_mul(width).checked_div(total).unwrap_or(width);
                eprint!(
                    "\r  [{}{}] {n}/{total}",
                    "#".repeat(filled),
                    " ".repeat(width.saturating_sub(filled))
                );
                let _ = std::io::stderr().flush();
            }
        })
        .await;
    if shown.load(Ordering::Relaxed) {
        eprintln!();
    }
    let mut failed = 0usize;
    let mut by_status = std::collections::BTreeMap::<String, usize>::new();
    for (id, r) in &results {
        match r {
            Ok(p) => {
                println!("{id}  {}", p.status);
                *by_status.entry(p.status.to_string()).or_default() += 1;
            }
            Err(e) => {
                failed += 1;
                println!("{id}  error: {e}");
            }
        }
    }
    let summary: Vec<String> = by_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!(
        "re-queried {total} payment(s): {}{}",
        if summary.is_empty() {
            "none".to_string()
        } else {
            summary.join(", ")
        },
        if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        }
    );
    if failed > 0 {
        bail!("{failed} re-query(ies) failed");
    }
    Ok(())
}
