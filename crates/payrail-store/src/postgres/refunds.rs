//! Refunds on PostgreSQL. Each method is one transaction. The ceiling is a conditional
//! `UPDATE payments … WHERE refund_reserved_minor + amount <= amount_minor`: concurrent
//! reservations of one payment queue on its row lock, and under READ COMMITTED each waiting
//! update re-evaluates its condition against the row as the previous one committed it, so the
//! amounts that fit are reserved and the rest refused, never more.

use super::*;
use payrail_domain::{PaymentId, RefundId, RefundStatus};

fn refund_row(r: &Row) -> Result<RefundRecord> {
    Ok(RefundRecord {
        id: get_id(r, 0)?,
        payment_id: get_id(r, 1)?,
        attempt_id: get_id(r, 2)?,
        merchant_id: get_id(r, 3)?,
        app_id: get_id(r, 4)?,
        out_refund_no: get(r, 5)?,
        amount_minor: get(r, 6)?,
        currency: get(r, 7)?,
        reason: get(r, 8)?,
        channel: get(r, 9)?,
        status: get_enum(r, 10, RefundStatus::parse)?,
        version: get(r, 11)?,
        channel_refund_no: get(r, 12)?,
        failure_code: get(r, 13)?,
        failure_message: get(r, 14)?,
        notify_url: get(r, 15)?,
        metadata: get(r, 16)?,
        idempotency_key: get(r, 17)?,
        request_hash: get(r, 18)?,
        requested_at_ms: get(r, 19)?,
        refunded_at_ms: get(r, 20)?,
        created_at_ms: get(r, 21)?,
        updated_at_ms: get(r, 22)?,
    })
}

fn ceiling_row(r: &Row) -> Result<RefundCeilingState> {
    Ok(RefundCeilingState {
        status: get_enum(r, 0, PaymentStatus::parse)?,
        currency: get(r, 1)?,
        amount_minor: get(r, 2)?,
        refund_reserved_minor: get(r, 3)?,
        amount_refunded_minor: get(r, 4)?,
        refund_count: get(r, 5)?,
    })
}

pub(super) async fn create_refund(store: &PgStore, new: &NewRefund) -> Result<CreateRefundOutcome> {
    let mut c = store.client().await?;
    let tx = c.transaction().await.map_err(pg_err)?;
    if let Some(admission) = &new.admission {
        let outcome = admit_in(&tx, admission).await?;
        let admitted = matches!(
            outcome,
            AdmissionOutcome::Admitted(None)
                | AdmissionOutcome::Admitted(Some(IdempotencyState::New))
        );
        if !admitted {
            if outcome == AdmissionOutcome::NonceReused {
                tx.rollback().await.map_err(pg_err)?;
            } else {
                tx.commit().await.map_err(pg_err)?;
            }
            return Ok(CreateRefundOutcome::NotAdmitted(outcome));
        }
    }
    let r = &new.refund;
    let (merchant_id, payment_id) = (r.merchant_id.to_string(), r.payment_id.to_string());
    // The refund first, so a duplicate out_refund_no is answered as such even when the payment
    // has no room left (a retried full refund must find its refund); undone if the payment then
    // refuses the reservation.
    tx.batch_execute("SAVEPOINT refund_reserve")
        .await
        .map_err(pg_err)?;
    let inserted = execute(
        &tx,
        &format!(
            "INSERT INTO refunds ({REFUND_COLS}) VALUES ({}) ON CONFLICT (merchant_id, out_refund_no) DO NOTHING",
            placeholders(23)
        ),
        &[
            &r.id.to_string(), &payment_id, &r.attempt_id.to_string(), &merchant_id, &r.app_id.to_string(),
            &r.out_refund_no, &r.amount_minor, &r.currency, &r.reason, &r.channel, &r.status.as_str(), &r.version,
            &r.channel_refund_no, &r.failure_code, &r.failure_message, &r.notify_url, &r.metadata,
            &r.idempotency_key, &r.request_hash, &r.requested_at_ms, &r.refunded_at_ms, &r.created_at_ms,
            &r.updated_at_ms,
        ],
    )
    .await?;
    if inserted == 0 {
        let row = query_one(
            &tx,
            &format!(
                "SELECT {REFUND_COLS} FROM refunds WHERE merchant_id = $1 AND out_refund_no = $2"
            ),
            &[&merchant_id, &r.out_refund_no],
        )
        .await?;
        let existing = refund_row(&row)?;
        // Commit, not roll back: the admission in this transaction stands.
        tx.commit().await.map_err(pg_err)?;
        return Ok(CreateRefundOutcome::DuplicateOutRefundNo(Box::new(
            existing,
        )));
    }
    let reserved = execute(
        &tx,
        "UPDATE payments SET refund_reserved_minor = refund_reserved_minor + $1, refund_count = refund_count + 1, \
         updated_at_ms = $2 \
         WHERE id = $3 AND merchant_id = $4 AND status = 'succeeded' AND currency = $5 \
         AND refund_reserved_minor + $1 <= amount_minor AND ($6::BIGINT IS NULL OR refund_count < $6::BIGINT)",
        &[
            &r.amount_minor,
            &r.created_at_ms,
            &payment_id,
            &merchant_id,
            &r.currency,
            &new.max_refunds,
        ],
    )
    .await?;
    if reserved == 0 {
        tx.batch_execute("ROLLBACK TO SAVEPOINT refund_reserve")
            .await
            .map_err(pg_err)?;
        let state = query_opt(
            &tx,
            &format!("SELECT {CEILING_COLS} FROM payments WHERE id = $1 AND merchant_id = $2"),
            &[&payment_id, &merchant_id],
        )
        .await?
        .map(|row| ceiling_row(&row))
        .transpose()?;
        tx.commit().await.map_err(pg_err)?;
        return Ok(CreateRefundOutcome::Refused(state));
    }
    if let Some(j) = &new.job {
        apply_job_update(
            &tx,
            &JobUpdate::Schedule {
                kind: j.kind.clone(),
                subject_id: j.subject_id.clone(),
                run_at_ms: j.run_at_ms,
                last_error: None,
            },
        )
        .await?;
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(CreateRefundOutcome::Created)
}

pub(super) async fn apply_refund_transition(store: &PgStore, t: &RefundTransition) -> Result<bool> {
    let mut c = store.client().await?;
    let tx = c.transaction().await.map_err(pg_err)?;
    // Only a processing refund changes: the payment's totals move exactly once per refund.
    let changed = query_opt(
        &tx,
        "UPDATE refunds SET status = $1, version = version + 1, channel_refund_no = COALESCE($2, channel_refund_no), \
         failure_code = $3, failure_message = $4, refunded_at_ms = COALESCE($5, refunded_at_ms), updated_at_ms = $6 \
         WHERE id = $7 AND version = $8 AND status = 'processing' RETURNING payment_id, amount_minor",
        &[
            &t.status.as_str(), &t.channel_refund_no, &t.failure_code, &t.failure_message, &t.refunded_at_ms,
            &t.now_ms, &t.refund_id.to_string(), &t.refund_version,
        ],
    )
    .await?;
    let Some(row) = changed else {
        tx.rollback().await.map_err(pg_err)?;
        return Ok(false);
    };
    let payment_id: String = get(&row, 0)?;
    let amount_minor: i64 = get(&row, 1)?;
    let money = match t.status {
        RefundStatus::Succeeded => Some(
            "UPDATE payments SET amount_refunded_minor = amount_refunded_minor + $1, updated_at_ms = $2 WHERE id = $3",
        ),
        RefundStatus::Failed => Some(
            "UPDATE payments SET refund_reserved_minor = refund_reserved_minor - $1, updated_at_ms = $2 WHERE id = $3",
        ),
        RefundStatus::Processing => None,
    };
    if let Some(sql) = money {
        let n = execute(&tx, sql, &[&amount_minor, &t.now_ms, &payment_id]).await?;
        if n != 1 {
            // Dropping the transaction rolls it back.
            return Err(StoreError::Corrupt(format!(
                "refund {} names payment {payment_id}, which does not exist",
                t.refund_id
            )));
        }
    }
    if t.status == RefundStatus::Succeeded {
        // The refund's posting set, from the payment's clearing row locked in this transaction.
        super::clearing::clear_refund_in(&tx, t.refund_id, &payment_id, amount_minor, t.now_ms)
            .await?;
    }
    if let Some(j) = &t.job {
        apply_job_update(&tx, j).await?;
    }
    if let Some(done) = &t.idempotency {
        if !complete_key(&tx, done).await? {
            tracing::warn!(key = %done.key, "idempotency claim was taken over; response not saved");
        }
    }
    if let Some(e) = &t.event {
        insert_event(&tx, e).await?;
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(true)
}

pub(super) async fn get_refund(
    store: &PgStore,
    merchant_id: Option<MerchantId>,
    id: RefundId,
) -> Result<Option<RefundRecord>> {
    let c = store.client().await?;
    let row = match merchant_id {
        Some(m) => {
            query_opt(
                &c,
                &format!("SELECT {REFUND_COLS} FROM refunds WHERE id = $1 AND merchant_id = $2"),
                &[&id.to_string(), &m.to_string()],
            )
            .await?
        }
        None => {
            query_opt(
                &c,
                &format!("SELECT {REFUND_COLS} FROM refunds WHERE id = $1"),
                &[&id.to_string()],
            )
            .await?
        }
    };
    row.map(|r| refund_row(&r)).transpose()
}

pub(super) async fn get_refund_by_out_refund_no(
    store: &PgStore,
    merchant_id: MerchantId,
    out_refund_no: &str,
) -> Result<Option<RefundRecord>> {
    let c = store.client().await?;
    query_opt(
        &c,
        &format!("SELECT {REFUND_COLS} FROM refunds WHERE merchant_id = $1 AND out_refund_no = $2"),
        &[&merchant_id.to_string(), &out_refund_no],
    )
    .await?
    .map(|r| refund_row(&r))
    .transpose()
}

pub(super) async fn list_refunds(
    store: &PgStore,
    merchant_id: MerchantId,
    payment_id: Option<PaymentId>,
    limit: u32,
    starting_after: Option<RefundId>,
) -> Result<Vec<RefundRecord>> {
    let c = store.client().await?;
    let (merchant, limit) = (merchant_id.to_string(), i64::from(limit));
    let payment = payment_id.map(|p| p.to_string());
    let after = starting_after.map(|a| a.to_string());
    let rows = match (&payment, &after) {
        (Some(p), Some(a)) => {
            query(
                &c,
                &format!(
                    "SELECT {REFUND_COLS} FROM refunds WHERE payment_id = $1 AND merchant_id = $2 AND id < $3 \
                     ORDER BY id DESC LIMIT $4"
                ),
                &[p, &merchant, a, &limit],
            )
            .await?
        }
        (Some(p), None) => {
            query(
                &c,
                &format!(
                    "SELECT {REFUND_COLS} FROM refunds WHERE payment_id = $1 AND merchant_id = $2 \
                     ORDER BY id DESC LIMIT $3"
                ),
                &[p, &merchant, &limit],
            )
            .await?
        }
        (None, Some(a)) => {
            query(
                &c,
                &format!(
                    "SELECT {REFUND_COLS} FROM refunds WHERE merchant_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
                ),
                &[&merchant, a, &limit],
            )
            .await?
        }
        (None, None) => {
            query(
                &c,
                &format!(
                    "SELECT {REFUND_COLS} FROM refunds WHERE merchant_id = $1 ORDER BY id DESC LIMIT $2"
                ),
                &[&merchant, &limit],
            )
            .await?
        }
    };
    map_rows(rows, refund_row)
}
