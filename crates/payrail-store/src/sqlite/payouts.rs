//! Payouts on SQLite. Every write is one closure on the group-commit writer: the payout's row,
//! its ledger entry (whose no-overdraft check reads the available balance as every earlier
//! write left it) and its job commit together or not at all, and SQLite's single writer orders
//! concurrent payouts of a merchant, so they never together take more than its balance.

use super::clearing::{available_minor, post_in_tx};
use super::*;
use crate::payouts::{payout_entry, reversal_entry, PAYOUT_COLS};
use payrail_domain::ledger::{AccountId, PostOutcome, Reject};
use payrail_domain::{Currency, PayoutId, PayoutStatus};

fn payout_row(r: &Row<'_>) -> rusqlite::Result<PayoutRecord> {
    let status: String = r.get(8)?;
    Ok(PayoutRecord {
        id: parse_id(r.get(0)?)?,
        merchant_id: parse_id(r.get(1)?)?,
        app_id: parse_id(r.get(2)?)?,
        out_payout_no: r.get(3)?,
        amount_minor: r.get(4)?,
        currency: r.get(5)?,
        description: r.get(6)?,
        bank: r.get(7)?,
        status: PayoutStatus::parse(&status).ok_or_else(|| conv_err(status))?,
        version: r.get(9)?,
        bank_reference: r.get(10)?,
        failure_code: r.get(11)?,
        failure_message: r.get(12)?,
        notify_url: r.get(13)?,
        idempotency_key: r.get(14)?,
        request_hash: r.get(15)?,
        paid_at_ms: r.get(16)?,
        created_at_ms: r.get(17)?,
        updated_at_ms: r.get(18)?,
    })
}

fn exec(c: &Connection, sql: &str) -> Result<()> {
    c.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map_err(db_err)?;
    Ok(())
}

fn create_in(c: &Connection, new: &NewPayout) -> Result<CreatePayoutOutcome> {
    if let Some(admission) = &new.admission {
        let outcome = admit_in(c, admission)?;
        if !admitted(&outcome) {
            return Ok(CreatePayoutOutcome::NotAdmitted(outcome));
        }
    }
    let p = &new.payout;
    let status: Option<String> = c
        .prepare_cached("SELECT status FROM merchants WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row([p.merchant_id.to_string()], |r| r.get(0))
                .optional()
        })
        .map_err(db_err)?;
    if status.as_deref() != Some(MerchantStatus::Active.as_str()) {
        return Ok(CreatePayoutOutcome::MerchantNotActive);
    }
    // The row first: a duplicate out_payout_no is answered as such even when the balance is
    // spent (a retried payout must find its payout, not "insufficient"). Undone (savepoint) if
    // the ledger then refuses the entry.
    exec(c, "SAVEPOINT payout_create")?;
    let inserted = c
        .prepare_cached(&format!(
            "INSERT INTO payouts ({PAYOUT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19) \
             ON CONFLICT (merchant_id, out_payout_no) DO NOTHING"
        ))
        .and_then(|mut s| {
            s.execute(params![
                p.id.to_string(), p.merchant_id.to_string(), p.app_id.to_string(), p.out_payout_no,
                p.amount_minor, p.currency, p.description, p.bank, p.status.as_str(), p.version,
                p.bank_reference, p.failure_code, p.failure_message, p.notify_url, p.idempotency_key,
                p.request_hash, p.paid_at_ms, p.created_at_ms, p.updated_at_ms
            ])
        })
        .map_err(db_err)?;
    if inserted == 0 {
        exec(c, "RELEASE payout_create")?;
        let existing = c
            .prepare_cached(&format!(
                "SELECT {PAYOUT_COLS} FROM payouts WHERE merchant_id = ?1 AND out_payout_no = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(
                    params![p.merchant_id.to_string(), p.out_payout_no],
                    payout_row,
                )
            })
            .map_err(db_err)?;
        return Ok(CreatePayoutOutcome::DuplicateOutPayoutNo(Box::new(
            existing,
        )));
    }
    let entry = payout_entry(p)?;
    match post_in_tx(c, &entry, p.created_at_ms)? {
        PostOutcome::Posted(_) => {}
        PostOutcome::Rejected(Reject::ExceedsCredits(_)) => {
            // The available balance cannot cover it: nothing of the payout stays (its row, any
            // account the posting opened).
            crate::sqlite::rollback_to(c, "payout_create")?;
            exec(c, "RELEASE payout_create")?;
            let currency =
                Currency::parse(&p.currency).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let available_minor =
                available_minor(c, &AccountId::merchant_available(p.merchant_id, currency))?;
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
    apply_job_update(
        c,
        &JobUpdate::Schedule {
            kind: new.job.kind.clone(),
            subject_id: new.job.subject_id.clone(),
            run_at_ms: new.job.run_at_ms,
            last_error: None,
        },
    )?;
    exec(c, "RELEASE payout_create")?;
    if let Some(done) = &new.idempotency {
        if !complete_key(c, done)? {
            tracing::warn!(key = %done.key, "idempotency claim was taken over; response not saved");
        }
    }
    Ok(CreatePayoutOutcome::Created)
}

/// `Ok(false)`: the version did not match (or the payout is final); the caller rolls back.
fn transition_in(c: &Connection, t: &PayoutTransition) -> Result<bool> {
    // Only a processing payout changes, so its reversal is posted at most once.
    let changed: Option<(String, i64, String)> = c
        .prepare_cached(
            "UPDATE payouts SET status = ?1, version = version + 1, bank_reference = COALESCE(?2, bank_reference), \
             failure_code = ?3, failure_message = ?4, paid_at_ms = ?5, updated_at_ms = ?6 \
             WHERE id = ?7 AND version = ?8 AND status = 'processing' \
             RETURNING merchant_id, amount_minor, currency",
        )
        .and_then(|mut s| {
            s.query_row(
                params![
                    t.status.as_str(), t.bank_reference, t.failure_code, t.failure_message, t.paid_at_ms,
                    t.now_ms, t.payout_id.to_string(), t.payout_version
                ],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
        })
        .map_err(db_err)?;
    let Some((merchant, amount_minor, currency)) = changed else {
        return Ok(false);
    };
    if t.status == PayoutStatus::Failed {
        let merchant = merchant
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("payout {} merchant", t.payout_id)))?;
        let entry = reversal_entry(t.payout_id, merchant, amount_minor, &currency)?;
        match post_in_tx(c, &entry, t.now_ms)? {
            PostOutcome::Posted(_) | PostOutcome::Replayed(_) => {}
            PostOutcome::Rejected(r) => return Err(crate::clearing::refused(&entry, &r)),
        }
    }
    if let Some(e) = &t.event {
        insert_event(c, e)?;
    }
    if let Some(j) = &t.job {
        apply_job_update(c, j)?;
    }
    Ok(true)
}

pub(super) async fn apply_payout_transition(
    store: &SqliteStore,
    t: &PayoutTransition,
) -> Result<bool> {
    let t = t.clone();
    store
        .write_or_rollback(move |c| transition_in(c, &t).map(|ok| (ok, ok)))
        .await
}

#[async_trait]
impl PayoutStore for SqliteStore {
    async fn create_payout(&self, new: &NewPayout) -> Result<CreatePayoutOutcome> {
        let new = new.clone();
        self.write(move |c| create_in(c, &new)).await
    }

    async fn get_payout(
        &self,
        merchant: Option<MerchantId>,
        id: PayoutId,
    ) -> Result<Option<PayoutRecord>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {PAYOUT_COLS} FROM payouts WHERE id = ?1 AND (?2 IS NULL OR merchant_id = ?2)"
            ))
            .and_then(|mut s| {
                s.query_row(
                    params![id.to_string(), merchant.map(|m| m.to_string())],
                    payout_row,
                )
                .optional()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn get_payout_by_out_payout_no(
        &self,
        merchant: MerchantId,
        out_payout_no: &str,
    ) -> Result<Option<PayoutRecord>> {
        let no = out_payout_no.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {PAYOUT_COLS} FROM payouts WHERE merchant_id = ?1 AND out_payout_no = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(params![merchant.to_string(), no], payout_row)
                    .optional()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn list_payouts(
        &self,
        filter: PayoutFilter,
        limit: u32,
        starting_after: Option<PayoutId>,
    ) -> Result<Vec<PayoutRecord>> {
        self.read(move |c| {
            let merchant = filter.merchant_id.map(|m| m.to_string());
            let status = filter.status.map(|s| s.as_str());
            let after = starting_after.map(|i| i.to_string());
            // One statement per filter, so each uses its index: by merchant, by status, or the
            // primary key.
            let sql = match (&merchant, status) {
                (Some(_), _) => format!(
                    "SELECT {PAYOUT_COLS} FROM payouts WHERE merchant_id = ?1 AND (?2 IS NULL OR status = ?2) \
                     AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?4"
                ),
                (None, Some(_)) => format!(
                    "SELECT {PAYOUT_COLS} FROM payouts WHERE ?1 IS NULL AND status = ?2 \
                     AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?4"
                ),
                (None, None) => format!(
                    "SELECT {PAYOUT_COLS} FROM payouts WHERE ?1 IS NULL AND ?2 IS NULL \
                     AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?4"
                ),
            };
            let mut s = c.prepare_cached(&sql).map_err(db_err)?;
            let rows = s
                .query_map(params![merchant, status, after, limit], payout_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn apply_payout_transition(&self, t: &PayoutTransition) -> Result<bool> {
        apply_payout_transition(self, t).await
    }
}
