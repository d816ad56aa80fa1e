//! Refunds on SQLite. Every write is one closure on the group-commit writer, so the ceiling
//! check and the reservation, and a status change and its money movement, are each one atomic
//! step; SQLite's single writer orders them.

use super::*;
use payrail_domain::{RefundId, RefundStatus};

pub(super) fn refund_row(r: &Row<'_>) -> rusqlite::Result<RefundRecord> {
    let status: String = r.get(10)?;
    Ok(RefundRecord {
        id: parse_id::<RefundId>(r.get(0)?)?,
        payment_id: parse_id(r.get(1)?)?,
        attempt_id: parse_id(r.get(2)?)?,
        merchant_id: parse_id(r.get(3)?)?,
        app_id: parse_id(r.get(4)?)?,
        out_refund_no: r.get(5)?,
        amount_minor: r.get(6)?,
        currency: r.get(7)?,
        reason: r.get(8)?,
        channel: r.get(9)?,
        status: RefundStatus::parse(&status).ok_or_else(|| conv_err(status))?,
        version: r.get(11)?,
        channel_refund_no: r.get(12)?,
        failure_code: r.get(13)?,
        failure_message: r.get(14)?,
        notify_url: r.get(15)?,
        metadata: r.get(16)?,
        idempotency_key: r.get(17)?,
        request_hash: r.get(18)?,
        requested_at_ms: r.get(19)?,
        refunded_at_ms: r.get(20)?,
        created_at_ms: r.get(21)?,
        updated_at_ms: r.get(22)?,
    })
}

fn ceiling_row(r: &Row<'_>) -> rusqlite::Result<RefundCeilingState> {
    let status: String = r.get(0)?;
    Ok(RefundCeilingState {
        status: PaymentStatus::parse(&status).ok_or_else(|| conv_err(status))?,
        currency: r.get(1)?,
        amount_minor: r.get(2)?,
        refund_reserved_minor: r.get(3)?,
        amount_refunded_minor: r.get(4)?,
        refund_count: r.get(5)?,
    })
}

fn exec(c: &Connection, sql: &str) -> Result<()> {
    c.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map_err(db_err)?;
    Ok(())
}

fn create_in(c: &Connection, new: &NewRefund) -> Result<CreateRefundOutcome> {
    if let Some(admission) = &new.admission {
        let outcome = admit_in(c, admission)?;
        if !admitted(&outcome) {
            return Ok(CreateRefundOutcome::NotAdmitted(outcome));
        }
    }
    let r = &new.refund;
    // The refund first: a duplicate out_refund_no is answered as such even when the payment
    // has no room left (a retry of a full refund must find its refund, not "exceeds"). Its
    // insert is undone (savepoint) if the payment then refuses the reservation.
    exec(c, "SAVEPOINT refund_reserve")?;
    let inserted = c
        .prepare_cached(&format!(
            "INSERT INTO refunds ({REFUND_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23) \
             ON CONFLICT (merchant_id, out_refund_no) DO NOTHING"
        ))
        .and_then(|mut s| {
            s.execute(params![
                r.id.to_string(), r.payment_id.to_string(), r.attempt_id.to_string(), r.merchant_id.to_string(),
                r.app_id.to_string(), r.out_refund_no, r.amount_minor, r.currency, r.reason, r.channel,
                r.status.as_str(), r.version, r.channel_refund_no, r.failure_code, r.failure_message, r.notify_url,
                r.metadata, r.idempotency_key, r.request_hash, r.requested_at_ms, r.refunded_at_ms,
                r.created_at_ms, r.updated_at_ms
            ])
        })
        .map_err(db_err)?;
    if inserted == 0 {
        exec(c, "RELEASE refund_reserve")?;
        let existing = c
            .prepare_cached(&format!(
                "SELECT {REFUND_COLS} FROM refunds WHERE merchant_id = ?1 AND out_refund_no = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(
                    params![r.merchant_id.to_string(), r.out_refund_no],
                    refund_row,
                )
            })
            .map_err(db_err)?;
        return Ok(CreateRefundOutcome::DuplicateOutRefundNo(Box::new(
            existing,
        )));
    }
    // Invariant 7: the reservation succeeds only if it fits, as of this write.
    let reserved = c
        .prepare_cached(
            "UPDATE payments SET refund_reserved_minor = refund_reserved_minor + ?1, refund_count = refund_count + 1, \
             updated_at_ms = ?2 \
             WHERE id = ?3 AND merchant_id = ?4 AND status = 'succeeded' AND currency = ?5 \
             AND refund_reserved_minor + ?1 <= amount_minor AND (?6 IS NULL OR refund_count < ?6)",
        )
        .and_then(|mut s| {
            s.execute(params![
                r.amount_minor,
                r.created_at_ms,
                r.payment_id.to_string(),
                r.merchant_id.to_string(),
                r.currency,
                new.max_refunds
            ])
        })
        .map_err(db_err)?;
    if reserved == 0 {
        crate::sqlite::rollback_to(c, "refund_reserve")?;
        exec(c, "RELEASE refund_reserve")?;
        let state = c
            .prepare_cached(&format!(
                "SELECT {CEILING_COLS} FROM payments WHERE id = ?1 AND merchant_id = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(
                    params![r.payment_id.to_string(), r.merchant_id.to_string()],
                    ceiling_row,
                )
                .optional()
            })
            .map_err(db_err)?;
        return Ok(CreateRefundOutcome::Refused(state));
    }
    exec(c, "RELEASE refund_reserve")?;
    if let Some(j) = &new.job {
        apply_job_update(
            c,
            &JobUpdate::Schedule {
                kind: j.kind.clone(),
                subject_id: j.subject_id.clone(),
                run_at_ms: j.run_at_ms,
                last_error: None,
            },
        )?;
    }
    Ok(CreateRefundOutcome::Created)
}

pub(super) async fn create_refund(
    store: &SqliteStore,
    new: &NewRefund,
) -> Result<CreateRefundOutcome> {
    let new = new.clone();
    store.write(move |c| create_in(c, &new)).await
}

/// `Ok(false)`: the version did not match (or the refund is final); the caller rolls back.
fn transition_in(c: &Connection, t: &RefundTransition) -> Result<bool> {
    // Only a processing refund changes: the payment's totals move exactly once per refund.
    let changed: Option<(String, i64)> = c
        .prepare_cached(
            "UPDATE refunds SET status = ?1, version = version + 1, channel_refund_no = COALESCE(?2, channel_refund_no), \
             failure_code = ?3, failure_message = ?4, refunded_at_ms = COALESCE(?5, refunded_at_ms), updated_at_ms = ?6 \
             WHERE id = ?7 AND version = ?8 AND status = 'processing' RETURNING payment_id, amount_minor",
        )
        .and_then(|mut s| {
            s.query_row(
                params![
                    t.status.as_str(), t.channel_refund_no, t.failure_code, t.failure_message, t.refunded_at_ms,
                    t.now_ms, t.refund_id.to_string(), t.refund_version
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .map_err(db_err)?;
    let Some((payment_id, amount_minor)) = changed else {
        return Ok(false);
    };
    let money = match t.status {
        RefundStatus::Succeeded => Some(
            "UPDATE payments SET amount_refunded_minor = amount_refunded_minor + ?1, updated_at_ms = ?2 WHERE id = ?3",
        ),
        RefundStatus::Failed => Some(
            "UPDATE payments SET refund_reserved_minor = refund_reserved_minor - ?1, updated_at_ms = ?2 WHERE id = ?3",
        ),
        RefundStatus::Processing => None,
    };
    if let Some(sql) = money {
        let n = c
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(params![amount_minor, t.now_ms, payment_id]))
            .map_err(db_err)?;
        if n != 1 {
            return Err(StoreError::Corrupt(format!(
                "refund {} names payment {payment_id}, which does not exist",
                t.refund_id
            )));
        }
    }
    if t.status == RefundStatus::Succeeded {
        // The refund's posting set, computed from the payment's clearing row as of this write.
        super::clearing::clear_refund_in(c, t.refund_id, &payment_id, amount_minor, t.now_ms)?;
    }
    if let Some(e) = &t.event {
        insert_event(c, e)?;
    }
    if let Some(j) = &t.job {
        apply_job_update(c, j)?;
    }
    if let Some(done) = &t.idempotency {
        if !complete_key(c, done)? {
            tracing::warn!(key = %done.key, "idempotency claim was taken over; response not saved");
        }
    }
    Ok(true)
}

pub(super) async fn apply_refund_transition(
    store: &SqliteStore,
    t: &RefundTransition,
) -> Result<bool> {
    let t = t.clone();
    store
        .write_or_rollback(move |c| transition_in(c, &t).map(|ok| (ok, ok)))
        .await
}

pub(super) async fn get_refund(
    store: &SqliteStore,
    merchant_id: Option<MerchantId>,
    id: RefundId,
) -> Result<Option<RefundRecord>> {
    store
        .read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {REFUND_COLS} FROM refunds WHERE id = ?1 AND (?2 IS NULL OR merchant_id = ?2)"
            ))
            .and_then(|mut s| {
                s.query_row(
                    params![id.to_string(), merchant_id.map(|m| m.to_string())],
                    refund_row,
                )
                .optional()
            })
            .map_err(db_err)
        })
        .await
}

pub(super) async fn get_refund_by_out_refund_no(
    store: &SqliteStore,
    merchant_id: MerchantId,
    out_refund_no: &str,
) -> Result<Option<RefundRecord>> {
    let no = out_refund_no.to_string();
    store
        .read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {REFUND_COLS} FROM refunds WHERE merchant_id = ?1 AND out_refund_no = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(params![merchant_id.to_string(), no], refund_row)
                    .optional()
            })
            .map_err(db_err)
        })
        .await
}

pub(super) async fn list_refunds(
    store: &SqliteStore,
    merchant_id: MerchantId,
    payment_id: Option<PaymentId>,
    limit: u32,
    starting_after: Option<RefundId>,
) -> Result<Vec<RefundRecord>> {
    store
        .read(move |c| {
            // Two statements so each uses its index: by payment, or by merchant.
            let after = starting_after.map(|i| i.to_string());
            let merchant = merchant_id.to_string();
            let mut s;
            let rows = match payment_id {
                Some(p) => {
                    s = c
                        .prepare_cached(&format!(
                            "SELECT {REFUND_COLS} FROM refunds WHERE payment_id = ?1 AND merchant_id = ?2 \
                             AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?4"
                        ))
                        .map_err(db_err)?;
                    s.query_map(params![p.to_string(), merchant, after, limit], refund_row)
                }
                None => {
                    s = c
                        .prepare_cached(&format!(
                            "SELECT {REFUND_COLS} FROM refunds WHERE merchant_id = ?1 \
                             AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
                        ))
                        .map_err(db_err)?;
                    s.query_map(params![merchant, after, limit], refund_row)
                }
            }
            .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
}
