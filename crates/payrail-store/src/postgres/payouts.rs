//! Payouts on PostgreSQL. Each method is one transaction (READ COMMITTED). A payout's row is
//! inserted first, its entry posted last: the ledger locks the merchant's available balance row
//! (`FOR UPDATE`, then payout clearing: the ledger's id order), so concurrent payouts of one
//! merchant queue on that lock and each checks the no-overdraft limit against the balance the
//! previous one committed — together they never take more than the balance. A status change
//! locks the payout's row, then (for a failure's reversal) the same ledger rows in the same
//! order, so a payout and a reversal cannot deadlock.

use super::clearing::post_in_tx;
use super::*;
use crate::payouts::{payout_entry, reversal_entry, PAYOUT_COLS};
use payrail_domain::ledger::{AccountId, PostOutcome, Reject};
use payrail_domain::{Currency, PayoutId, PayoutStatus};

fn payout_row(r: &Row) -> Result<PayoutRecord> {
    Ok(PayoutRecord {
        id: get_id(r, 0)?,
        merchant_id: get_id(r, 1)?,
        app_id: get_id(r, 2)?,
        out_payout_no: get(r, 3)?,
        amount_minor: get(r, 4)?,
        currency: get(r, 5)?,
        description: get(r, 6)?,
        bank: get(r, 7)?,
        status: get_enum(r, 8, PayoutStatus::parse)?,
        version: get(r, 9)?,
        bank_reference: get(r, 10)?,
        failure_code: get(r, 11)?,
        failure_message: get(r, 12)?,
        notify_url: get(r, 13)?,
        idempotency_key: get(r, 14)?,
        request_hash: get(r, 15)?,
        paid_at_ms: get(r, 16)?,
        created_at_ms: get(r, 17)?,
        updated_at_ms: get(r, 18)?,
    })
}

/// What the merchant's available balance can spend (0 if it is not open). A plain read: it
/// only explains a refusal.
async fn available_minor<C: GenericClient>(c: &C, account: &AccountId) -> Result<i64> {
    let row = query_opt(
        c,
        "SELECT b.credits_posted, b.debits_posted, b.debits_pending FROM ledger_accounts a \
         JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id = $1",
        &[&account.as_str()],
    )
    .await?;
    Ok(match row {
        Some(r) => {
            let (c, d, p): (i64, i64, i64) = (get(&r, 0)?, get(&r, 1)?, get(&r, 2)?);
            c.saturating_sub(d).saturating_sub(p)
        }
        None => 0,
    })
}

async fn create_payout(store: &PgStore, new: &NewPayout) -> Result<CreatePayoutOutcome> {
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
            return Ok(CreatePayoutOutcome::NotAdmitted(outcome));
        }
    }
    let p = &new.payout;
    let merchant_id = p.merchant_id.to_string();
    // FOR SHARE: a concurrent freeze waits for this commit, so a payout is either recorded
    // before the freeze or refused after it.
    let status = query_opt(
        &tx,
        "SELECT status FROM merchants WHERE id = $1 FOR SHARE",
        &[&merchant_id],
    )
    .await?
    .map(|r| get::<String>(&r, 0))
    .transpose()?;
    if status.as_deref() != Some(MerchantStatus::Active.as_str()) {
        // Commit, not roll back: the admission in this transaction stands.
        tx.commit().await.map_err(pg_err)?;
        return Ok(CreatePayoutOutcome::MerchantNotActive);
    }
    // The row first, so a duplicate out_payout_no is answered as such even when the balance is
    // spent; undone if the ledger then refuses the entry.
    tx.batch_execute("SAVEPOINT payout_create")
        .await
        .map_err(pg_err)?;
    let inserted = execute(
        &tx,
        &format!(
            "INSERT INTO payouts ({PAYOUT_COLS}) VALUES ({}) ON CONFLICT (merchant_id, out_payout_no) DO NOTHING",
            placeholders(19)
        ),
        &[
            &p.id.to_string(), &merchant_id, &p.app_id.to_string(), &p.out_payout_no, &p.amount_minor,
            &p.currency, &p.description, &p.bank, &p.status.as_str(), &p.version, &p.bank_reference,
            &p.failure_code, &p.failure_message, &p.notify_url, &p.idempotency_key, &p.request_hash,
            &p.paid_at_ms, &p.created_at_ms, &p.updated_at_ms,
        ],
    )
    .await?;
    if inserted == 0 {
        let row = query_one(
            &tx,
            &format!(
                "SELECT {PAYOUT_COLS} FROM payouts WHERE merchant_id = $1 AND out_payout_no = $2"
            ),
            &[&merchant_id, &p.out_payout_no],
        )
        .await?;
        let existing = payout_row(&row)?;
        // Commit, not roll back: the admission in this transaction stands.
        tx.commit().await.map_err(pg_err)?;
        return Ok(CreatePayoutOutcome::DuplicateOutPayoutNo(Box::new(
            existing,
        )));
    }
    apply_job_update(
        &tx,
        &JobUpdate::Schedule {
            kind: new.job.kind.clone(),
            subject_id: new.job.subject_id.clone(),
            run_at_ms: new.job.run_at_ms,
            last_error: None,
        },
    )
    .await?;
    if let Some(done) = &new.idempotency {
        if !complete_key(&tx, done).await? {
            tracing::warn!(key = %done.key, "idempotency claim was taken over; response not saved");
        }
    }
    // Last: it locks the merchant's available balance row until the commit, so the lock is
    // held for the shortest time.
    let entry = payout_entry(p)?;
    match post_in_tx(&tx, &entry, p.created_at_ms).await? {
        PostOutcome::Posted(_) => {}
        PostOutcome::Rejected(Reject::ExceedsCredits(_)) => {
            // The row, the job, the saved answer and any account the posting opened go; the
            // admission stays.
            tx.batch_execute("ROLLBACK TO SAVEPOINT payout_create")
                .await
                .map_err(pg_err)?;
            let currency =
                Currency::parse(&p.currency).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let available_minor =
                available_minor(&tx, &AccountId::merchant_available(p.merchant_id, currency))
                    .await?;
            tx.commit().await.map_err(pg_err)?;
            return Ok(CreatePayoutOutcome::InsufficientBalance { available_minor });
        }
        // A new payout's id is new, so its entry cannot be a replay.
        PostOutcome::Replayed(_) => {
            return Err(StoreError::Corrupt(format!(
                "entry {} existed before its payout",
                entry.id()
            )))
        }
        PostOutcome::Rejected(r) => return Err(crate::clearing::refused(&entry, &r)),
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(CreatePayoutOutcome::Created)
}

async fn apply_payout_transition(store: &PgStore, t: &PayoutTransition) -> Result<bool> {
    let mut c = store.client().await?;
    let tx = c.transaction().await.map_err(pg_err)?;
    // Only a processing payout changes, so its reversal is posted at most once.
    let changed = query_opt(
        &tx,
        "UPDATE payouts SET status = $1, version = version + 1, bank_reference = COALESCE($2, bank_reference), \
         failure_code = $3, failure_message = $4, paid_at_ms = $5, updated_at_ms = $6 \
         WHERE id = $7 AND version = $8 AND status = 'processing' \
         RETURNING merchant_id, amount_minor, currency",
        &[
            &t.status.as_str(), &t.bank_reference, &t.failure_code, &t.failure_message, &t.paid_at_ms,
            &t.now_ms, &t.payout_id.to_string(), &t.payout_version,
        ],
    )
    .await?;
    let Some(row) = changed else {
        tx.rollback().await.map_err(pg_err)?;
        return Ok(false);
    };
    if let Some(j) = &t.job {
        apply_job_update(&tx, j).await?;
    }
    if let Some(e) = &t.event {
        insert_event(&tx, e).await?;
    }
    // The ledger last (it plans the rest of the transaction per execution). An error drops
    // `tx`, which rolls the whole change back.
    if t.status == PayoutStatus::Failed {
        let merchant: MerchantId = get_id(&row, 0)?;
        let amount_minor: i64 = get(&row, 1)?;
        let currency: String = get(&row, 2)?;
        let entry = reversal_entry(t.payout_id, merchant, amount_minor, &currency)?;
        match post_in_tx(&tx, &entry, t.now_ms).await? {
            PostOutcome::Posted(_) | PostOutcome::Replayed(_) => {}
            PostOutcome::Rejected(r) => return Err(crate::clearing::refused(&entry, &r)),
        }
    }
    tx.commit().await.map_err(pg_err)?;
    Ok(true)
}

#[async_trait]
impl PayoutStore for PgStore {
    async fn create_payout(&self, new: &NewPayout) -> Result<CreatePayoutOutcome> {
        create_payout(self, new).await
    }

    async fn get_payout(
        &self,
        merchant: Option<MerchantId>,
        id: PayoutId,
    ) -> Result<Option<PayoutRecord>> {
        let c = self.client().await?;
        let row = match merchant {
            Some(m) => {
                query_opt(
                    &c,
                    &format!(
                        "SELECT {PAYOUT_COLS} FROM payouts WHERE id = $1 AND merchant_id = $2"
                    ),
                    &[&id.to_string(), &m.to_string()],
                )
                .await?
            }
            None => {
                query_opt(
                    &c,
                    &format!("SELECT {PAYOUT_COLS} FROM payouts WHERE id = $1"),
                    &[&id.to_string()],
                )
                .await?
            }
        };
        row.map(|r| payout_row(&r)).transpose()
    }

    async fn get_payout_by_out_payout_no(
        &self,
        merchant: MerchantId,
        out_payout_no: &str,
    ) -> Result<Option<PayoutRecord>> {
        let c = self.client().await?;
        query_opt(
            &c,
            &format!(
                "SELECT {PAYOUT_COLS} FROM payouts WHERE merchant_id = $1 AND out_payout_no = $2"
            ),
            &[&merchant.to_string(), &out_payout_no],
        )
        .await?
        .map(|r| payout_row(&r))
        .transpose()
    }

    async fn list_payouts(
        &self,
        filter: PayoutFilter,
        limit: u32,
        starting_after: Option<PayoutId>,
    ) -> Result<Vec<PayoutRecord>> {
        let c = self.client().await?;
        let merchant = filter.merchant_id.map(|m| m.to_string());
        let status = filter.status.map(|s| s.as_str().to_string());
        let after = starting_after.map(|a| a.to_string());
        let limit = i64::from(limit);
        // Only the conditions that apply, so each filter uses its index: by merchant, by
        // status, or the primary key.
        let mut conds: Vec<String> = Vec::new();
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (col, op, v) in [
            ("merchant_id", "=", &merchant),
            ("status", "=", &status),
            ("id", "<", &after),
        ] {
            if let Some(v) = v {
                params.push(v);
                conds.push(format!("{col} {op} ${}", params.len()));
            }
        }
        params.push(&limit);
        let filter_sql = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let rows = query(
            &c,
            &format!(
                "SELECT {PAYOUT_COLS} FROM payouts {filter_sql} ORDER BY id DESC LIMIT ${}",
                params.len()
            ),
            &params,
        )
        .await?;
        map_rows(rows, payout_row)
    }

    async fn apply_payout_transition(&self, t: &PayoutTransition) -> Result<bool> {
        apply_payout_transition(self, t).await
    }
}
