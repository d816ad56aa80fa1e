//! Background workers: status sync (payments, refunds and payouts) and housekeeping. They share work through the job table, so
//! any number of processes may run them.

use crate::{Engine, JOB_PAYMENT_SYNC, JOB_PAYOUT_SEND, JOB_REFUND_SYNC};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Pause after a storage error before polling again.
const ERROR_BACKOFF_MS: u64 = 1_000;
/// Housekeeping period.
const JANITOR_PERIOD_MS: u64 = 60_000;

/// The job kinds the status-sync worker runs: payments and refunds waiting for a definite
/// channel answer, and payouts to send to the bank or waiting for its definite answer.
const SYNC_KINDS: [&str; 3] = [JOB_PAYMENT_SYNC, JOB_REFUND_SYNC, JOB_PAYOUT_SEND];

/// Leases due sync jobs (payments, refunds, then payouts) and runs them, until `shutdown` turns
/// true. Jobs in flight finish first.
pub async fn run_sync_worker(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    tracing::info!("status-sync worker started");
    while !*shutdown.borrow() {
        let now = engine.now_ms();
        let mut set = JoinSet::new();
        let mut failed = false;
        for kind in SYNC_KINDS {
            let jobs = match engine
                .store
                .lease_jobs(
                    kind,
                    now,
                    engine.config.sync_lease_ms,
                    engine.config.sync_batch,
                )
                .await
            {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::error!(error = %e, kind, "status-sync: cannot lease jobs");
                    failed = true;
                    continue;
                }
            };
            for job in jobs {
                let engine = engine.clone();
                set.spawn(async move {
                    let res = match job.kind.as_str() {
                        JOB_REFUND_SYNC => engine.sync_refund(&job).await,
                        JOB_PAYOUT_SEND => engine.run_payout_job(&job).await,
                        _ => engine.sync_payment(&job).await,
                    };
                    if let Err(e) = res {
                        // The lease runs out and the job comes back by itself.
                        tracing::warn!(kind = %job.kind, subject = %job.subject_id, error = %e, "status-sync job failed");
                    }
                });
            }
        }
        if set.is_empty() {
            let pause = if failed {
                ERROR_BACKOFF_MS
            } else {
                engine.config.worker_poll_ms
            };
            wait(&mut shutdown, pause).await;
            continue;
        }
        while set.join_next().await.is_some() {}
    }
    tracing::info!("status-sync worker stopped");
}

/// Re-reads the channel accounts every `ACCOUNTS_REFRESH_MS`, so accounts created or disabled
/// through another process take effect here too.
pub async fn run_accounts_refresher(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    loop {
        wait(&mut shutdown, crate::channel_accounts::ACCOUNTS_REFRESH_MS).await;
        if *shutdown.borrow() {
            break;
        }
        if let Err(e) = engine.reload_channel_accounts().await {
            tracing::warn!(error = %e, "cannot refresh the channel accounts");
        }
        // Fee plans changed through another process apply within this period.
        if let Err(e) = engine.reload_fee_plans().await {
            tracing::warn!(error = %e, "cannot refresh the fee plans");
        }
    }
}

/// Rows of each kind one prune call deletes: each call is one write on the shared writer, so
/// it must stay short.
const PRUNE_BATCH_ROWS: u32 = 2_000;
/// Prune calls per janitor round; what is left waits for the next round.
const PRUNE_CALLS_PER_ROUND_MAX: u32 = 500;

/// Prunes nonce claims whose timestamps left the window and old idempotency keys.
pub async fn run_janitor(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        let mut pruned = 0u64;
        for _ in 0..PRUNE_CALLS_PER_ROUND_MAX {
            let now = engine.now_ms();
            let p = payrail_store::Prune {
                nonces_signed_before_s: now
                    .div_euclid(1000)
                    .saturating_sub(crate::auth::NONCE_RETENTION_S),
                keys_created_before_ms: now.saturating_sub(engine.config.idempotency_retention_ms),
                limit: PRUNE_BATCH_ROWS,
            };
            match engine.store.prune(&p).await {
                Ok(n) => {
                    pruned = pruned.saturating_add(n);
                    if n < u64::from(PRUNE_BATCH_ROWS) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "janitor: prune failed");
                    break;
                }
            }
            if *shutdown.borrow() {
                break;
            }
        }
        if pruned > 0 {
            tracing::info!(rows = pruned, "janitor: pruned");
        }
        wait(&mut shutdown, JANITOR_PERIOD_MS).await;
    }
}

async fn wait(shutdown: &mut watch::Receiver<bool>, ms: u64) {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
        _ = shutdown.changed() => {}
    }
}

/// How often buffered (hot) account changes are applied and expired holds released.
pub const LEDGER_MAINTENANCE_MS: u64 = 1_000;

/// Ledger housekeeping: applies the buffered changes of hot accounts (platform fee, channel
/// clearing and cost; PostgreSQL only — SQLite applies them in the writing batch) so their rows
/// stay exact and the delta table small, and releases wallet freezes whose timeout passed.
/// Any number of processes may run it (flushes serialise on an advisory lock; each hold is
/// released once, under its row lock).
pub async fn run_ledger_maintenance(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        let now = engine.now_ms();
        if let Err(e) = engine
            .store
            .flush_buffered(now, payrail_store::ledger::FLUSH_BATCH_MAX)
            .await
        {
            tracing::warn!(error = %e, "ledger: flush of buffered accounts failed");
        }
        match engine
            .store
            .expire_holds(now, payrail_store::ledger::EXPIRE_BATCH_MAX)
            .await
        {
            Ok(ids) if !ids.is_empty() => {
                tracing::info!(holds = ids.len(), "ledger: expired holds released")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ledger: expiry sweep failed"),
        }
        wait(&mut shutdown, LEDGER_MAINTENANCE_MS).await;
    }
}

/// Runs the settlement of every due business day every `SETTLE_PERIOD_MS` (batches are unique
/// per merchant, currency and day, so several processes running it create each one once).
pub async fn run_settlement_worker(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        match engine.run_settlement(None).await {
            Ok(r) if !r.created.is_empty() || r.failed > 0 => {
                tracing::info!(
                    created = r.created.len(),
                    failed = r.failed,
                    "settlement run"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "settlement run failed"),
        }
        wait(&mut shutdown, crate::settlement::SETTLE_PERIOD_MS).await;
    }
}
