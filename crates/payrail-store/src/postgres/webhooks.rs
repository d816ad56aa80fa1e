//! [`WebhookStore`] on PostgreSQL. Readers of the outbox number committed events first
//! (`sequence_outbox`), exactly like `list_events`, so a cursor over `seq` never skips one.
//! Rows of a delivery are locked (`FOR UPDATE`) while an attempt or a re-send is recorded, so
//! concurrent workers and API processes serialise on it.

use super::{
    app_row, event_row, execute, get, get_enum, get_id, map_rows, pg_err, placeholders, query,
    query_one, query_opt, sequence_outbox, PgStore,
};
use crate::common::{APP_COLS, EVENT_COLS};
use crate::webhooks::{ATTEMPT_LOG_COLS, DELIVERY_COLS};
use crate::*;
use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use payrail_domain::{AppId, MerchantId};
use tokio_postgres::Row;

fn delivery_row(r: &Row) -> Result<DeliveryRecord> {
    Ok(DeliveryRecord {
        event_id: get(r, 0)?,
        event_seq: get(r, 1)?,
        merchant_id: get_id(r, 2)?,
        app_id: get_id(r, 3)?,
        url: get(r, 4)?,
        status: get_enum(r, 5, DeliveryStatus::parse)?,
        attempts: get(r, 6)?,
        auto_attempts: get(r, 7)?,
        manual_attempts: get(r, 8)?,
        next_attempt_at_ms: get(r, 9)?,
        manual_due_at_ms: get(r, 10)?,
        version: get(r, 11)?,
        created_at_ms: get(r, 12)?,
        updated_at_ms: get(r, 13)?,
    })
}

fn attempt_log_row(r: &Row) -> Result<AttemptLog> {
    let status_code: Option<i64> = get(r, 5)?;
    Ok(AttemptLog {
        event_id: get(r, 0)?,
        attempt: get(r, 1)?,
        merchant_id: get_id(r, 2)?,
        trigger: get_enum(r, 3, AttemptTrigger::parse)?,
        url: get(r, 4)?,
        status_code: status_code.and_then(|s| u16::try_from(s).ok()),
        error: get(r, 6)?,
        message: get(r, 7)?,
        latency_ms: get(r, 8)?,
        response_body: get(r, 9)?,
        created_at_ms: get(r, 10)?,
    })
}

async fn load_delivery<C: GenericClient>(
    c: &C,
    event_id: &str,
    for_update: bool,
) -> Result<Option<DeliveryRecord>> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    query_opt(
        c,
        &format!("SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE event_id = $1{lock}"),
        &[&event_id],
    )
    .await?
    .map(|r| delivery_row(&r))
    .transpose()
}

/// Creates the job or moves it to `run_at_ms` (earlier only, when `earlier_only`).
async fn schedule_job<C: GenericClient>(
    c: &C,
    event_id: &str,
    run_at_ms: i64,
    earlier_only: bool,
) -> Result<()> {
    let sql = if earlier_only {
        "INSERT INTO jobs (kind, subject_id, run_at_ms, attempts, created_at_ms) VALUES ($1, $2, $3, 0, $3) \
         ON CONFLICT (kind, subject_id) DO UPDATE SET run_at_ms = LEAST(jobs.run_at_ms, EXCLUDED.run_at_ms)"
    } else {
        "INSERT INTO jobs (kind, subject_id, run_at_ms, attempts, created_at_ms) VALUES ($1, $2, $3, 0, $3) \
         ON CONFLICT (kind, subject_id) DO UPDATE SET run_at_ms = EXCLUDED.run_at_ms"
    };
    execute(c, sql, &[&JOB_WEBHOOK, &event_id, &run_at_ms]).await?;
    Ok(())
}

#[async_trait]
impl WebhookStore for PgStore {
    async fn list_outbox(&self, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>> {
        let mut c = self.client().await?;
        sequence_outbox(&mut c).await?;
        let rows = query(
            &c,
            &format!("SELECT {EVENT_COLS} FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2"),
            &[&after_seq, &i64::from(limit)],
        )
        .await?;
        map_rows(rows, event_row)
    }

    async fn outbox_head(&self) -> Result<i64> {
        let mut c = self.client().await?;
        sequence_outbox(&mut c).await?;
        let row = query_one(&c, "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM outbox", &[]).await?;
        get(&row, 0)
    }

    async fn get_event(
        &self,
        merchant_id: Option<MerchantId>,
        id: &str,
    ) -> Result<Option<EventRecord>> {
        let mut c = self.client().await?;
        // An event committed a moment ago may not have its position yet.
        sequence_outbox(&mut c).await?;
        let row = match merchant_id {
            Some(m) => {
                query_opt(
                    &c,
                    &format!("SELECT {EVENT_COLS} FROM outbox WHERE id = $1 AND merchant_id = $2 AND seq IS NOT NULL"),
                    &[&id, &m.to_string()],
                )
                .await?
            }
            None => {
                query_opt(
                    &c,
                    &format!("SELECT {EVENT_COLS} FROM outbox WHERE id = $1 AND seq IS NOT NULL"),
                    &[&id],
                )
                .await?
            }
        };
        row.map(|r| event_row(&r)).transpose()
    }

    async fn list_events_desc(
        &self,
        merchant_id: MerchantId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<EventRecord>> {
        let mut c = self.client().await?;
        sequence_outbox(&mut c).await?;
        let rows = query(
            &c,
            &format!(
                "SELECT {EVENT_COLS} FROM outbox WHERE merchant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
            ),
            &[
                &merchant_id.to_string(),
                &before_seq.unwrap_or(i64::MAX),
                &i64::from(limit),
            ],
        )
        .await?;
        map_rows(rows, event_row)
    }

    async fn outbox_cursor(&self, name: &str) -> Result<i64> {
        let c = self.client().await?;
        query_opt(
            &c,
            "SELECT seq FROM outbox_cursors WHERE name = $1",
            &[&name],
        )
        .await?
        .map(|r| get(&r, 0))
        .transpose()
        .map(|v| v.unwrap_or(0))
    }

    async fn dispatch_deliveries(&self, d: &Dispatch) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        let moved = execute(
            &tx,
            "UPDATE outbox_cursors SET seq = $1, updated_at_ms = $2 WHERE name = $3 AND seq = $4",
            &[&d.to_seq, &d.now_ms, &d.cursor, &d.from_seq],
        )
        .await?;
        if moved == 0 {
            // A cursor that was never set starts at 0.
            let created = if d.from_seq == 0 {
                execute(
                    &tx,
                    "INSERT INTO outbox_cursors (name, seq, updated_at_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                    &[&d.cursor, &d.to_seq, &d.now_ms],
                )
                .await?
            } else {
                0
            };
            if created == 0 {
                tx.rollback().await.map_err(pg_err)?;
                return Ok(false);
            }
        }
        for n in &d.deliveries {
            let inserted = execute(
                &tx,
                &format!(
                    "INSERT INTO webhook_deliveries ({DELIVERY_COLS}) \
                     VALUES ($1, $2, $3, $4, $5, 'pending', 0, 0, 0, $6, NULL, 1, $6, $6) ON CONFLICT (event_id) DO NOTHING"
                ),
                &[
                    &n.event_id,
                    &n.event_seq,
                    &n.merchant_id.to_string(),
                    &n.app_id.to_string(),
                    &n.url,
                    &n.created_at_ms,
                ],
            )
            .await?;
            if inserted == 1 {
                schedule_job(&tx, &n.event_id, n.created_at_ms, false).await?;
            }
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(true)
    }

    async fn get_delivery(&self, event_id: &str) -> Result<Option<DeliveryRecord>> {
        let c = self.client().await?;
        load_delivery(&c, event_id, false).await
    }

    async fn record_attempt(&self, r: &RecordAttempt) -> Result<RecordedAttempt> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        let d = load_delivery(&tx, &r.log.event_id, true)
            .await?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("no delivery for event {}", r.log.event_id))
            })?;
        let attempt = d.attempts.saturating_add(1);
        execute(
            &tx,
            "UPDATE webhook_deliveries SET attempts = $1 WHERE event_id = $2",
            &[&attempt, &d.event_id],
        )
        .await?;
        let l = &r.log;
        execute(
            &tx,
            &format!(
                "INSERT INTO webhook_attempts ({ATTEMPT_LOG_COLS}) VALUES ({})",
                placeholders(11)
            ),
            &[
                &l.event_id,
                &attempt,
                &l.merchant_id.to_string(),
                &l.trigger.as_str(),
                &l.url,
                &l.status_code.map(i64::from),
                &l.error,
                &l.message,
                &l.latency_ms,
                &l.response_body,
                &l.created_at_ms,
            ],
        )
        .await?;
        if d.version != r.expected_version {
            tx.commit().await.map_err(pg_err)?;
            return Ok(RecordedAttempt {
                attempt,
                applied: false,
            });
        }
        let st = &r.state;
        execute(
            &tx,
            "UPDATE webhook_deliveries SET status = $1, auto_attempts = $2, next_attempt_at_ms = $3, \
             manual_due_at_ms = $4, version = version + 1, updated_at_ms = $5 WHERE event_id = $6",
            &[
                &st.status.as_str(),
                &st.auto_attempts,
                &st.next_attempt_at_ms,
                &st.manual_due_at_ms,
                &r.now_ms,
                &d.event_id,
            ],
        )
        .await?;
        match r.job_run_at_ms {
            Some(t) => schedule_job(&tx, &d.event_id, t, false).await?,
            None => {
                execute(
                    &tx,
                    "DELETE FROM jobs WHERE kind = $1 AND subject_id = $2",
                    &[&JOB_WEBHOOK, &d.event_id],
                )
                .await?;
            }
        }
        if let Some(a) = &r.alert {
            execute(
                &tx,
                "INSERT INTO alerts (kind, subject_id, detail, created_at_ms) VALUES ($1, $2, $3, $4)",
                &[&a.kind, &a.subject_id, &a.detail, &a.created_at_ms],
            )
            .await?;
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(RecordedAttempt {
            attempt,
            applied: true,
        })
    }

    async fn request_resend(
        &self,
        event_id: &str,
        now_ms: i64,
        manual_attempts_max: i64,
    ) -> Result<ResendOutcome> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        let Some(d) = load_delivery(&tx, event_id, true).await? else {
            tx.rollback().await.map_err(pg_err)?;
            return Ok(ResendOutcome::NoDelivery);
        };
        if d.manual_due_at_ms.is_some() {
            // Asked for already and not yet made: the same re-send.
            tx.rollback().await.map_err(pg_err)?;
            return Ok(ResendOutcome::Scheduled(Box::new(d)));
        }
        if d.manual_attempts >= manual_attempts_max {
            tx.rollback().await.map_err(pg_err)?;
            return Ok(ResendOutcome::LimitReached);
        }
        execute(
            &tx,
            "UPDATE webhook_deliveries SET manual_attempts = manual_attempts + 1, manual_due_at_ms = $1, \
             version = version + 1, updated_at_ms = $1 WHERE event_id = $2",
            &[&now_ms, &event_id],
        )
        .await?;
        schedule_job(&tx, event_id, now_ms, true).await?;
        let d = load_delivery(&tx, event_id, false)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("delivery {event_id} vanished")))?;
        tx.commit().await.map_err(pg_err)?;
        Ok(ResendOutcome::Scheduled(Box::new(d)))
    }

    async fn list_attempts(
        &self,
        event_id: &str,
        before_attempt: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AttemptLog>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!(
                "SELECT {ATTEMPT_LOG_COLS} FROM webhook_attempts WHERE event_id = $1 AND attempt < $2 \
                 ORDER BY attempt DESC LIMIT $3"
            ),
            &[
                &event_id,
                &before_attempt.unwrap_or(i64::MAX),
                &i64::from(limit),
            ],
        )
        .await?;
        map_rows(rows, attempt_log_row)
    }

    async fn count_pending_deliveries(&self) -> Result<i64> {
        let c = self.client().await?;
        let row = query_one(
            &c,
            "SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'",
            &[],
        )
        .await?;
        get(&row, 0)
    }

    async fn get_app(&self, id: AppId) -> Result<Option<AppRecord>> {
        let c = self.client().await?;
        query_opt(
            &c,
            &format!("SELECT {APP_COLS} FROM apps WHERE id = $1"),
            &[&id.to_string()],
        )
        .await?
        .map(|r| app_row(&r))
        .transpose()
    }
}
