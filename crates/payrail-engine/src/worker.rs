//! Background workers: status sync and housekeeping. They share work through the job table, so
//! any number of processes may run them.

use crate::{Engine, JOB_PAYMENT_SYNC};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Pause after a storage error before polling again.
const ERROR_BACKOFF_MS: u64 = 1_000;
/// Housekeeping period.
const JANITOR_PERIOD_MS: u64 = 60_000;

/// Leases due sync jobs and runs them, until `shutdown` turns true. Jobs in flight finish first.
pub async fn run_sync_worker(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    tracing::info!("status-sync worker started");
    while !*shutdown.borrow() {
        let now = engine.now_ms();
        let jobs = match engine
            .store
            .lease_jobs(
                JOB_PAYMENT_SYNC,
                now,
                engine.config.sync_lease_ms,
                engine.config.sync_batch,
            )
            .await
        {
            Ok(jobs) => jobs,
            Err(e) => {
                tracing::error!(error = %e, "status-sync: cannot lease jobs");
                wait(&mut shutdown, ERROR_BACKOFF_MS).await;
                continue;
            }
        };
        if jobs.is_empty() {
            wait(&mut shutdown, engine.config.worker_poll_ms).await;
            continue;
        }
        let mut set = JoinSet::new();
        for job in jobs {
            let engine = engine.clone();
            set.spawn(async move {
                if let Err(e) = engine.sync_payment(&job).await {
                    // The lease runs out and the job comes back by itself.
                    tracing::warn!(subject = %job.subject_id, error = %e, "status-sync job failed");
                }
            });
        }
        while set.join_next().await.is_some() {}
    }
    tracing::info!("status-sync worker stopped");
}

/// Prunes expired nonces and old idempotency keys.
pub async fn run_janitor(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        let now = engine.now_ms();
        let keys_before = now.saturating_sub(engine.config.idempotency_retention_ms);
        match engine.store.prune(now, keys_before).await {
            Ok(n) if n > 0 => tracing::info!(rows = n, "janitor: pruned"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "janitor: prune failed"),
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
