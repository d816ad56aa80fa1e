//! [`WebhookStore`] on SQLite. Writes go through the single writer like every other write, so
//! a dispatch or an attempt record is one savepoint inside a group-committed batch.

use super::{app_row, db_err, event_row, parse_id, SqliteStore};
use crate::common::{APP_COLS, EVENT_COLS};
use crate::webhooks::{ATTEMPT_LOG_COLS, DELIVERY_COLS};
use crate::*;
use async_trait::async_trait;
use payrail_domain::{AppId, MerchantId};
use rusqlite::{params, Connection, OptionalExtension, Row};

fn conv(msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, msg.into())
}

fn delivery_row(r: &Row<'_>) -> rusqlite::Result<DeliveryRecord> {
    let status: String = r.get(5)?;
    Ok(DeliveryRecord {
        event_id: r.get(0)?,
        event_seq: r.get(1)?,
        merchant_id: parse_id(r.get(2)?)?,
        app_id: parse_id(r.get(3)?)?,
        url: r.get(4)?,
        status: DeliveryStatus::parse(&status).ok_or_else(|| conv(status))?,
        attempts: r.get(6)?,
        auto_attempts: r.get(7)?,
        manual_attempts: r.get(8)?,
        next_attempt_at_ms: r.get(9)?,
        manual_due_at_ms: r.get(10)?,
        version: r.get(11)?,
        created_at_ms: r.get(12)?,
        updated_at_ms: r.get(13)?,
    })
}

fn attempt_log_row(r: &Row<'_>) -> rusqlite::Result<AttemptLog> {
    let trigger: String = r.get(3)?;
    let status_code: Option<i64> = r.get(5)?;
    Ok(AttemptLog {
        event_id: r.get(0)?,
        attempt: r.get(1)?,
        merchant_id: parse_id(r.get(2)?)?,
        trigger: AttemptTrigger::parse(&trigger).ok_or_else(|| conv(trigger))?,
        url: r.get(4)?,
        status_code: status_code.and_then(|s| u16::try_from(s).ok()),
        error: r.get(6)?,
        message: r.get(7)?,
        latency_ms: r.get(8)?,
        response_body: r.get(9)?,
        created_at_ms: r.get(10)?,
    })
}

fn load_delivery(c: &Connection, event_id: &str) -> Result<Option<DeliveryRecord>> {
    c.prepare_cached(&format!(
        "SELECT {DELIVERY_COLS} FROM webhook_deliveries WHERE event_id = ?1"
    ))
    .and_then(|mut s| s.query_row([event_id], delivery_row).optional())
    .map_err(db_err)
}

/// Creates the job or moves it to `run_at_ms` (earlier only, when `earlier_only`).
fn schedule_job(c: &Connection, event_id: &str, run_at_ms: i64, earlier_only: bool) -> Result<()> {
    let sql = if earlier_only {
        "INSERT INTO jobs (kind, subject_id, run_at_ms, attempts, created_at_ms) VALUES (?1, ?2, ?3, 0, ?3) \
         ON CONFLICT (kind, subject_id) DO UPDATE SET run_at_ms = MIN(jobs.run_at_ms, excluded.run_at_ms)"
    } else {
        "INSERT INTO jobs (kind, subject_id, run_at_ms, attempts, created_at_ms) VALUES (?1, ?2, ?3, 0, ?3) \
         ON CONFLICT (kind, subject_id) DO UPDATE SET run_at_ms = excluded.run_at_ms"
    };
    c.prepare_cached(sql)
        .and_then(|mut s| s.execute(params![JOB_WEBHOOK, event_id, run_at_ms]))
        .map_err(db_err)?;
    Ok(())
}

#[async_trait]
impl WebhookStore for SqliteStore {
    async fn list_outbox(&self, after_seq: i64, limit: u32) -> Result<Vec<EventRecord>> {
        // Events leave the process from here (webhooks, the feed): durable ones only.
        self.read_durable(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLS} FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ))
                .map_err(db_err)?;
            let rows = s
                .query_map(params![after_seq, limit], event_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn outbox_head(&self) -> Result<i64> {
        // A position handed out must not be reused by another event after a crash.
        self.read_durable(|c| {
            c.query_row("SELECT COALESCE(MAX(seq), 0) FROM outbox", [], |r| r.get(0))
                .map_err(db_err)
        })
        .await
    }

    async fn get_event(
        &self,
        merchant_id: Option<MerchantId>,
        id: &str,
    ) -> Result<Option<EventRecord>> {
        let id = id.to_string();
        let merchant = merchant_id.map(|m| m.to_string());
        self.read_durable(move |c| {
            c.prepare_cached(&format!(
                "SELECT {EVENT_COLS} FROM outbox WHERE id = ?1 AND (?2 IS NULL OR merchant_id = ?2)"
            ))
            .and_then(|mut s| s.query_row(params![id, merchant], event_row).optional())
            .map_err(db_err)
        })
        .await
    }

    async fn list_events_desc(
        &self,
        merchant_id: MerchantId,
        before_seq: Option<i64>,
        limit: u32,
    ) -> Result<Vec<EventRecord>> {
        self.read_durable(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLS} FROM outbox WHERE merchant_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
                ))
                .map_err(db_err)?;
            let before = before_seq.unwrap_or(i64::MAX);
            let rows = s
                .query_map(params![merchant_id.to_string(), before, limit], event_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn outbox_cursor(&self, name: &str) -> Result<i64> {
        let name = name.to_string();
        self.read(move |c| {
            c.query_row(
                "SELECT seq FROM outbox_cursors WHERE name = ?1",
                [name],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0))
            .map_err(db_err)
        })
        .await
    }

    async fn dispatch_deliveries(&self, d: &Dispatch) -> Result<bool> {
        let d = d.clone();
        self.write_or_rollback(move |c| {
            let moved = c
                .prepare_cached(
                    "UPDATE outbox_cursors SET seq = ?1, updated_at_ms = ?2 WHERE name = ?3 AND seq = ?4",
                )
                .and_then(|mut s| s.execute(params![d.to_seq, d.now_ms, d.cursor, d.from_seq]))
                .map_err(db_err)?;
            if moved == 0 {
                // A cursor that was never set starts at 0.
                let created = if d.from_seq == 0 {
                    c.execute(
                        "INSERT INTO outbox_cursors (name, seq, updated_at_ms) VALUES (?1, ?2, ?3) ON CONFLICT (name) DO NOTHING",
                        params![d.cursor, d.to_seq, d.now_ms],
                    )
                    .map_err(db_err)?
                } else {
                    0
                };
                if created == 0 {
                    return Ok((false, false));
                }
            }
            for n in &d.deliveries {
                let inserted = c
                    .prepare_cached(&format!(
                        "INSERT INTO webhook_deliveries ({DELIVERY_COLS}) \
                         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, 0, 0, ?6, NULL, 1, ?6, ?6) ON CONFLICT (event_id) DO NOTHING"
                    ))
                    .and_then(|mut s| {
                        s.execute(params![
                            n.event_id,
                            n.event_seq,
                            n.merchant_id.to_string(),
                            n.app_id.to_string(),
                            n.url,
                            n.created_at_ms
                        ])
                    })
                    .map_err(db_err)?;
                if inserted == 1 {
                    schedule_job(c, &n.event_id, n.created_at_ms, false)?;
                }
            }
            Ok((true, true))
        })
        .await
    }

    async fn get_delivery(&self, event_id: &str) -> Result<Option<DeliveryRecord>> {
        let event_id = event_id.to_string();
        self.read(move |c| load_delivery(c, &event_id)).await
    }

    async fn record_attempt(&self, r: &RecordAttempt) -> Result<RecordedAttempt> {
        let r = r.clone();
        self.write(move |c| {
            let d = load_delivery(c, &r.log.event_id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("no delivery for event {}", r.log.event_id))
            })?;
            let attempt = d.attempts.saturating_add(1);
            c.prepare_cached("UPDATE webhook_deliveries SET attempts = ?1 WHERE event_id = ?2")
                .and_then(|mut s| s.execute(params![attempt, d.event_id]))
                .map_err(db_err)?;
            let l = &r.log;
            c.prepare_cached(&format!(
                "INSERT INTO webhook_attempts ({ATTEMPT_LOG_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))
            .and_then(|mut s| {
                s.execute(params![
                    l.event_id,
                    attempt,
                    l.merchant_id.to_string(),
                    l.trigger.as_str(),
                    l.url,
                    l.status_code.map(i64::from),
                    l.error,
                    l.message,
                    l.latency_ms,
                    l.response_body,
                    l.created_at_ms
                ])
            })
            .map_err(db_err)?;
            if d.version != r.expected_version {
                return Ok(RecordedAttempt { attempt, applied: false });
            }
            let st = &r.state;
            c.prepare_cached(
                "UPDATE webhook_deliveries SET status = ?1, auto_attempts = ?2, next_attempt_at_ms = ?3, \
                 manual_due_at_ms = ?4, version = version + 1, updated_at_ms = ?5 WHERE event_id = ?6",
            )
            .and_then(|mut s| {
                s.execute(params![
                    st.status.as_str(),
                    st.auto_attempts,
                    st.next_attempt_at_ms,
                    st.manual_due_at_ms,
                    r.now_ms,
                    d.event_id
                ])
            })
            .map_err(db_err)?;
            match r.job_run_at_ms {
                Some(t) => schedule_job(c, &d.event_id, t, false)?,
                None => {
                    c.prepare_cached("DELETE FROM jobs WHERE kind = ?1 AND subject_id = ?2")
                        .and_then(|mut s| s.execute(params![JOB_WEBHOOK, d.event_id]))
                        .map_err(db_err)?;
                }
            }
            if let Some(a) = &r.alert {
                c.execute(
                    "INSERT INTO alerts (kind, subject_id, detail, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![a.kind, a.subject_id, a.detail, a.created_at_ms],
                )
                .map_err(db_err)?;
            }
            Ok(RecordedAttempt { attempt, applied: true })
        })
        .await
    }

    async fn request_resend(
        &self,
        event_id: &str,
        now_ms: i64,
        manual_attempts_max: i64,
    ) -> Result<ResendOutcome> {
        let event_id = event_id.to_string();
        self.write(move |c| {
            let Some(d) = load_delivery(c, &event_id)? else {
                return Ok(ResendOutcome::NoDelivery);
            };
            if d.manual_due_at_ms.is_some() {
                // Asked for already and not yet made: the same re-send.
                return Ok(ResendOutcome::Scheduled(Box::new(d)));
            }
            if d.manual_attempts >= manual_attempts_max {
                return Ok(ResendOutcome::LimitReached);
            }
            c.prepare_cached(
                "UPDATE webhook_deliveries SET manual_attempts = manual_attempts + 1, manual_due_at_ms = ?1, \
                 version = version + 1, updated_at_ms = ?1 WHERE event_id = ?2",
            )
            .and_then(|mut s| s.execute(params![now_ms, event_id]))
            .map_err(db_err)?;
            schedule_job(c, &event_id, now_ms, true)?;
            let d = load_delivery(c, &event_id)?.ok_or_else(|| {
                StoreError::Corrupt(format!("delivery {event_id} vanished"))
            })?;
            Ok(ResendOutcome::Scheduled(Box::new(d)))
        })
        .await
    }

    async fn list_attempts(
        &self,
        event_id: &str,
        before_attempt: Option<i64>,
        limit: u32,
    ) -> Result<Vec<AttemptLog>> {
        let event_id = event_id.to_string();
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {ATTEMPT_LOG_COLS} FROM webhook_attempts WHERE event_id = ?1 AND attempt < ?2 \
                     ORDER BY attempt DESC LIMIT ?3"
                ))
                .map_err(db_err)?;
            let before = before_attempt.unwrap_or(i64::MAX);
            let rows = s
                .query_map(params![event_id, before, limit], attempt_log_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn count_pending_deliveries(&self) -> Result<i64> {
        self.read(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)
        })
        .await
    }

    async fn get_app(&self, id: AppId) -> Result<Option<AppRecord>> {
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {APP_COLS} FROM apps WHERE id = ?1"),
                [id.to_string()],
                app_row,
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }
}
