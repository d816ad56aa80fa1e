//! `payrail settle`: settles every due business day, or those up to `--date` — the same run as
//! the scheduled worker's, against the database directly, so it works while the server is down
//! too. One batch per merchant, currency and day; re-running creates nothing new. Exit code 1 if
//! any merchant's settlement failed.

use crate::config::Overrides;
use anyhow::{bail, Result};
use payrail_domain::civil::Date;

#[derive(clap::Args, Clone)]
pub struct SettleArgs {
    /// Settle business days up to this one (YYYY-MM-DD) only; default: every day that is due.
    /// A day that is not due yet is never settled.
    #[arg(long)]
    date: Option<String>,
}

pub async fn run(o: Overrides, args: SettleArgs) -> Result<()> {
    let upto = match args.date.as_deref() {
        Some(d) => match Date::parse(d) {
            Ok(d) => Some(d),
            Err(_) => {
                return Err(anyhow::Error::new(crate::serve::ConfigError(format!(
                    "--date {d:?} is not a date (YYYY-MM-DD)"
                ))))
            }
        },
        None => None,
    };
    let config = crate::serve::load_config(&o)?;
    crate::serve::init_logging("warn", config.log_format);
    let engine = crate::serve::build_engine(&config).await?;
    let report = engine.run_settlement(upto).await?;
    for s in &report.created {
        println!(
            "{}  {}  {}  {}  {} payment(s), {} refund(s), net {}",
            s.id,
            s.merchant_id,
            s.business_day,
            s.currency,
            s.payment_count,
            s.refund_count,
            s.net_minor
        );
    }
    println!(
        "settled {} batch(es); {} already settled{}",
        report.created.len(),
        report.existing,
        if report.failed > 0 {
            format!("; {} failed (see the alerts)", report.failed)
        } else {
            String::new()
        }
    );
    if report.failed > 0 {
        bail!("{} settlement(s) failed", report.failed);
    }
    Ok(())
}
