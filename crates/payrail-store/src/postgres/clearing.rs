//! Clearing and settlement on PostgreSQL. Each method is one transaction (READ COMMITTED).
//!
//! Lock order, the same in every write that takes more than one of these: the refund row, the
//! payment row, the payment's clearing row, then ledger accounts in id order (the ledger's own
//! rule: `merchant_available` before `merchant_pending`). A refund reads its payment's clearing
//! row `FOR UPDATE`; a settlement marks the clearing rows with one `UPDATE … RETURNING`, which
//! waits for a refund holding one of them and then sees its result (PostgreSQL re-reads an
//! updated row before applying its own change). So a refund and a settlement of the same
//! payment serialise, and either the refund came first (from pending, netted in the batch) or
//! the batch did (the refund comes from available).

use super::*;
use crate::clearing::*;
use crate::ledger::{AccountRecord, EntryRecord, HoldRecord, PostingRow};
use crate::postgres_ledger::{open_accounts_in_tx, post_entries_in_tx};
use deadpool_postgres::Transaction;
use payrail_domain::ledger::{AccountId, Balance, Entry, PostOutcome, PostingRef, Reject};
use payrail_domain::{PaymentId, RefundId, SettlementId};

fn opt_id<T: FromStr>(r: &Row, i: usize) -> Result<Option<T>> {
    let s: Option<&str> = get(r, i)?;
    s.map(|s| {
        s.parse()
            .map_err(|_| StoreError::Corrupt(format!("bad id {s}")))
    })
    .transpose()
}

fn key_id<T: FromStr>(r: &Row, i: usize) -> Result<Option<T>> {
    let s: String = get(r, i)?;
    from_key_part(s)
        .map(|s| {
            s.parse()
                .map_err(|_| StoreError::Corrupt(format!("bad id {s}")))
        })
        .transpose()
}

fn fee_plan_row(r: &Row) -> Result<FeePlanRecord> {
    Ok(FeePlanRecord {
        id: get_id(r, 0)?,
        merchant_id: key_id(r, 1)?,
        channel: from_key_part(get(r, 2)?),
        method: from_key_part(get(r, 3)?),
        currency: get(r, 4)?,
        rate_bps: get(r, 5)?,
        fixed_minor: get(r, 6)?,
        min_minor: get(r, 7)?,
        max_minor: get(r, 8)?,
        channel_cost_bps: get(r, 9)?,
        channel_cost_fixed_minor: get(r, 10)?,
        fee_refund: get(r, 11)?,
        channel_cost_refund: get(r, 12)?,
        version: get(r, 13)?,
        created_at_ms: get(r, 14)?,
        updated_at_ms: get(r, 15)?,
    })
}

fn payment_clearing_row(r: &Row) -> Result<PaymentClearingRecord> {
    Ok(PaymentClearingRecord {
        payment_id: get_id(r, 0)?,
        merchant_id: get_id(r, 1)?,
        currency: get(r, 2)?,
        channel: get(r, 3)?,
        method: get(r, 4)?,
        wallet_id: get(r, 5)?,
        amount_minor: get(r, 6)?,
        fee_minor: get(r, 7)?,
        channel_cost_minor: get(r, 8)?,
        fee_plan_id: opt_id(r, 9)?,
        fee_refund: get(r, 10)?,
        channel_cost_refund: get(r, 11)?,
        entry_id: get(r, 12)?,
        cleared_at_ms: get(r, 13)?,
        refunded_minor: get(r, 14)?,
        residual_minor: get(r, 15)?,
        settlement_id: opt_id(r, 16)?,
    })
}

fn refund_clearing_row(r: &Row) -> Result<RefundClearingRecord> {
    Ok(RefundClearingRecord {
        refund_id: get_id(r, 0)?,
        payment_id: get_id(r, 1)?,
        merchant_id: get_id(r, 2)?,
        currency: get(r, 3)?,
        amount_minor: get(r, 4)?,
        fee_refund_minor: get(r, 5)?,
        cost_refund_minor: get(r, 6)?,
        from_pending_minor: get(r, 7)?,
        from_available_minor: get(r, 8)?,
        from_suspense_minor: get(r, 9)?,
        entry_id: get(r, 10)?,
        cleared_at_ms: get(r, 11)?,
        settlement_id: opt_id(r, 12)?,
    })
}

fn settlement_row(r: &Row) -> Result<SettlementRecord> {
    Ok(SettlementRecord {
        id: get_id(r, 0)?,
        merchant_id: get_id(r, 1)?,
        currency: get(r, 2)?,
        business_day: get(r, 3)?,
        t_plus_days: get(r, 4)?,
        cutoff: get(r, 5)?,
        utc_offset_minutes: get(r, 6)?,
        window_start_ms: get(r, 7)?,
        window_end_ms: get(r, 8)?,
        due_at_ms: get(r, 9)?,
        payment_count: get(r, 10)?,
        refund_count: get(r, 11)?,
        gross_minor: get(r, 12)?,
        fee_minor: get(r, 13)?,
        refunded_minor: get(r, 14)?,
        fee_refunded_minor: get(r, 15)?,
        net_minor: get(r, 16)?,
        entry_id: get(r, 17)?,
        created_at_ms: get(r, 18)?,
    })
}

fn account_row(r: &Row) -> Result<AccountRecord> {
    let id: String = get(r, 0)?;
    Ok(AccountRecord {
        id: crate::ledger::parse_account(&id)?,
        flags: crate::ledger::parse_flags(get(r, 1)?)?,
        created_at_ms: get(r, 2)?,
        balance: Balance {
            debits_pending: get(r, 3)?,
            debits_posted: get(r, 4)?,
            credits_pending: get(r, 5)?,
            credits_posted: get(r, 6)?,
        },
        version: get(r, 7)?,
        last_posted_at_ms: get(r, 8)?,
        buffered: Balance::ZERO,
    })
}

fn posting_line(r: &Row) -> Result<PostingLine> {
    let prev = match (get::<Option<i64>>(r, 12)?, get::<Option<i64>>(r, 13)?) {
        (Some(entry_seq), Some(leg)) => Some(PostingRef { entry_seq, leg }),
        _ => None,
    };
    let account: &str = get(r, 5)?;
    let side: &str = get(r, 6)?;
    let pending: i64 = get(r, 8)?;
    Ok(PostingLine {
        at: PostingRef {
            entry_seq: get(r, 0)?,
            leg: get(r, 1)?,
        },
        entry_id: get(r, 2)?,
        code: get(r, 3)?,
        reference: get(r, 4)?,
        account: crate::ledger::parse_account(account)?,
        side: crate::ledger::parse_side(side)?,
        amount_minor: get(r, 7)?,
        pending: pending != 0,
        posted_at_ms: get(r, 9)?,
        debits_posted_after: get(r, 10)?,
        credits_posted_after: get(r, 11)?,
        prev,
    })
}

// --- writes inside the payment path --------------------------------------------------------

/// Posts one entry inside `tx`, opening its accounts if the ledger says one is missing.
pub(super) async fn post_in_tx(
    tx: &Transaction<'_>,
    entry: &Entry,
    now_ms: i64,
) -> Result<PostOutcome> {
    let out = single(post_entries_in_tx(tx, std::slice::from_ref(entry), now_ms).await?)?;
    if let PostOutcome::Rejected(Reject::AccountNotFound(_)) = out {
        open_accounts_in_tx(tx, &specs_of(entry), now_ms).await?;
        return single(post_entries_in_tx(tx, std::slice::from_ref(entry), now_ms).await?);
    }
    Ok(out)
}

async fn insert_payment_clearing(tx: &Transaction<'_>, r: &PaymentClearingRecord) -> Result<()> {
    execute(
        tx,
        &format!(
            "INSERT INTO payment_clearing ({PAYMENT_CLEARING_COLS}) VALUES ({}) ON CONFLICT (payment_id) DO NOTHING",
            placeholders(17)
        ),
        &[
            &r.payment_id.to_string(),
            &r.merchant_id.to_string(),
            &r.currency,
            &r.channel,
            &r.method,
            &r.wallet_id,
            &r.amount_minor,
            &r.fee_minor,
            &r.channel_cost_minor,
            &r.fee_plan_id.map(|i| i.to_string()),
            &r.fee_refund,
            &r.channel_cost_refund,
            &r.entry_id,
            &r.cleared_at_ms,
            &r.refunded_minor,
            &r.residual_minor,
            &r.settlement_id.map(|i| i.to_string()),
        ],
    )
    .await?;
    Ok(())
}

/// The ledger part of a payment's status change, inside its transaction. On `Err` the caller
/// drops (rolls back) the transaction.
pub(super) async fn transition_ledger_in(
    tx: &Transaction<'_>,
    l: &TransitionLedger,
    now_ms: i64,
) -> Result<()> {
    // The clearing row first, while statements still use their cached plans (the ledger plans
    // the rest of the transaction per execution). A change with a clearing row tolerates no
    // refusal, so if the entry is refused the whole transaction rolls back, row included.
    if let Some(r) = &l.clearing {
        insert_payment_clearing(tx, r).await?;
    }
    let out = post_in_tx(tx, &l.entry, now_ms).await?;
    if !judge(l, &out)? && l.clearing.is_some() {
        return Err(StoreError::Corrupt(
            "a success's entry was refused but tolerated".into(),
        ));
    }
    Ok(())
}

/// What `merchant_available` can spend, its balance row locked (0 if it is not open).
async fn available_minor(tx: &Transaction<'_>, account: &AccountId) -> Result<i64> {
    let row = query_opt(
        tx,
        "SELECT b.credits_posted, b.debits_posted, b.debits_pending FROM ledger_accounts a \
         JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id = $1 FOR UPDATE OF b",
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

/// The ledger part of a refund becoming `succeeded` (see the SQLite twin, `clear_refund_in`).
pub(super) async fn clear_refund_in(
    tx: &Transaction<'_>,
    refund_id: RefundId,
    payment_id: &str,
    amount_minor: i64,
    now_ms: i64,
) -> Result<()> {
    let Some(row) = query_opt(
        tx,
        &format!(
            "SELECT {PAYMENT_CLEARING_COLS} FROM payment_clearing WHERE payment_id = $1 FOR UPDATE"
        ),
        &[&payment_id],
    )
    .await?
    else {
        tracing::warn!(refund_id = %refund_id, payment_id, "refund of a payment without clearing: not posted");
        return Ok(());
    };
    let row = payment_clearing_row(&row)?;
    let mut plan = plan_refund(&row, refund_id, amount_minor, 0, now_ms)?;
    if plan.needs_available() {
        let cur = payrail_domain::Currency::parse(&row.currency)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let avail =
            available_minor(tx, &AccountId::merchant_available(row.merchant_id, cur)).await?;
        plan = plan_refund(&row, refund_id, amount_minor, avail, now_ms)?;
    }
    match post_in_tx(tx, &plan.entry, now_ms).await? {
        PostOutcome::Posted(_) | PostOutcome::Replayed(_) => {}
        PostOutcome::Rejected(r) => return Err(refused(&plan.entry, &r)),
    }
    let n = execute(
        tx,
        "UPDATE payment_clearing SET refunded_minor = refunded_minor + $1, \
         residual_minor = residual_minor - $2 WHERE payment_id = $3",
        &[
            &amount_minor,
            &plan.split.residual_used.amount_minor(),
            &payment_id,
        ],
    )
    .await?;
    if n != 1 {
        return Err(StoreError::Corrupt(format!(
            "clearing row of {payment_id} vanished"
        )));
    }
    let r = &plan.record;
    execute(
        tx,
        &format!(
            "INSERT INTO refund_clearing ({REFUND_CLEARING_COLS}) VALUES ({}, NULL)",
            placeholders(12)
        ),
        &[
            &r.refund_id.to_string(),
            &r.payment_id.to_string(),
            &r.merchant_id.to_string(),
            &r.currency,
            &r.amount_minor,
            &r.fee_refund_minor,
            &r.cost_refund_minor,
            &r.from_pending_minor,
            &r.from_available_minor,
            &r.from_suspense_minor,
            &r.entry_id,
            &r.cleared_at_ms,
        ],
    )
    .await?;
    if let Some(a) = &plan.alert {
        execute(
            tx,
            &format!("INSERT INTO alerts ({ALERT_COLS}) VALUES ($1, $2, $3, $4)"),
            &[&a.kind, &a.subject_id, &a.detail, &a.created_at_ms],
        )
        .await?;
    }
    Ok(())
}

// --- settlement ----------------------------------------------------------------------------

async fn settlement_by_key<C: GenericClient>(c: &C, s: &NewSettlement) -> Result<SettlementRecord> {
    let r = query_one(
        c,
        &format!(
            "SELECT {SETTLEMENT_COLS} FROM settlements WHERE merchant_id = $1 AND currency = $2 AND business_day = $3"
        ),
        &[&s.merchant_id.to_string(), &s.currency, &s.business_day],
    )
    .await?;
    settlement_row(&r)
}

async fn settle_in(tx: &Transaction<'_>, s: &NewSettlement) -> Result<Option<SettleOutcome>> {
    let id = s.id.to_string();
    let merchant = s.merchant_id.to_string();
    // A concurrent run of the same batch waits here for the first one's commit, then finds it.
    let inserted = query_opt(
        tx,
        &format!(
            "INSERT INTO settlements ({SETTLEMENT_COLS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, 0, 0, 0, 0, 0, 0, NULL, $11) \
             ON CONFLICT (merchant_id, currency, business_day) DO NOTHING RETURNING id"
        ),
        &[
            &id,
            &merchant,
            &s.currency,
            &s.business_day,
            &s.t_plus_days,
            &s.cutoff,
            &s.utc_offset_minutes,
            &s.window_start_ms,
            &s.window_end_ms,
            &s.due_at_ms,
            &s.now_ms,
        ],
    )
    .await?;
    if inserted.is_none() {
        return Ok(Some(SettleOutcome::Exists(settlement_by_key(tx, s).await?)));
    }
    let rows = query(
        tx,
        &format!(
            "UPDATE payment_clearing SET settlement_id = $1 WHERE merchant_id = $2 AND currency = $3 \
             AND settlement_id IS NULL AND cleared_at_ms < $4 RETURNING {PAYMENT_CLEARING_COLS}"
        ),
        &[&id, &merchant, &s.currency, &s.window_end_ms],
    )
    .await?;
    if rows.is_empty() {
        return Ok(None);
    }
    if rows.len() > SETTLEMENT_PAYMENTS_MAX {
        return Err(StoreError::Config(format!(
            "settlement of {} {} {} covers more than {SETTLEMENT_PAYMENTS_MAX} payments",
            s.merchant_id, s.currency, s.business_day
        )));
    }
    let payments = map_rows(rows, payment_clearing_row)?;
    execute(
        tx,
        "UPDATE refund_clearing SET settlement_id = $1 WHERE settlement_id IS NULL AND payment_id IN \
         (SELECT payment_id FROM payment_clearing WHERE settlement_id = $1)",
        &[&id],
    )
    .await?;
    let refunds = map_rows(
        query(
            tx,
            &format!("SELECT {REFUND_CLEARING_COLS} FROM refund_clearing WHERE settlement_id = $1"),
            &[&id],
        )
        .await?,
        refund_clearing_row,
    )?;
    let (totals, entry) = plan_settlement(s, &payments, &refunds)?;
    if let Some(e) = &entry {
        match post_in_tx(tx, e, s.now_ms).await? {
            PostOutcome::Posted(_) | PostOutcome::Replayed(_) => {}
            PostOutcome::Rejected(r) => return Err(refused(e, &r)),
        }
    }
    execute(
        tx,
        "UPDATE settlements SET payment_count = $1, refund_count = $2, gross_minor = $3, fee_minor = $4, \
         refunded_minor = $5, fee_refunded_minor = $6, net_minor = $7, entry_id = $8 WHERE id = $9",
        &[
            &totals.payment_count,
            &totals.refund_count,
            &totals.gross_minor,
            &totals.fee_minor,
            &totals.refunded_minor,
            &totals.fee_refunded_minor,
            &totals.net_minor,
            &entry.as_ref().map(|e| e.id().to_string()),
            &id,
        ],
    )
    .await?;
    Ok(Some(SettleOutcome::Created(
        settlement_by_key(tx, s).await?,
    )))
}

async fn read_line<C: GenericClient>(c: &C, at: PostingRef) -> Result<Option<PostingLine>> {
    query_opt(
        c,
        &format!("SELECT {POSTING_LINE_SQL_TAIL} WHERE p.entry_seq = $1 AND p.leg = $2"),
        &[&at.entry_seq, &at.leg],
    )
    .await?
    .map(|r| posting_line(&r))
    .transpose()
}

async fn entry_record<C: GenericClient>(c: &C, r: &Row) -> Result<EntryRecord> {
    let seq: i64 = get(r, 0)?;
    let id: String = get(r, 1)?;
    let phase: String = get(r, 3)?;
    let postings = query(
        c,
        "SELECT leg, account_id, side, amount_minor, pending, posted_at_ms, account_version \
         FROM ledger_postings WHERE entry_seq = $1 ORDER BY leg",
        &[&seq],
    )
    .await?
    .iter()
    .map(|p| {
        let account: &str = get(p, 1)?;
        let side: &str = get(p, 2)?;
        let pending: i64 = get(p, 4)?;
        Ok(PostingRow {
            leg: get(p, 0)?,
            account: crate::ledger::parse_account(account)?,
            side: crate::ledger::parse_side(side)?,
            amount_minor: get(p, 3)?,
            pending: pending != 0,
            posted_at_ms: get(p, 5)?,
            account_version: get(p, 6)?,
        })
    })
    .collect::<Result<Vec<_>>>()?;
    let hold = if phase == "pending" {
        match query_opt(
            c,
            "SELECT expires_at_ms, state, resolved_by FROM ledger_holds WHERE entry_id = $1",
            &[&id],
        )
        .await?
        {
            Some(h) => {
                let state: &str = get(&h, 1)?;
                let by: Option<&str> = get(&h, 2)?;
                Some(HoldRecord {
                    expires_at_ms: get(&h, 0)?,
                    state: crate::ledger::parse_hold_state(state)?,
                    resolved_by: by.map(crate::ledger::parse_entry_id).transpose()?,
                })
            }
            None => None,
        }
    } else {
        None
    };
    let pending_id: Option<&str> = get(r, 6)?;
    Ok(EntryRecord {
        seq,
        id: crate::ledger::parse_entry_id(&id)?,
        code: get(r, 2)?,
        phase,
        currency: get(r, 4)?,
        reference: get(r, 5)?,
        pending_id: pending_id.map(crate::ledger::parse_entry_id).transpose()?,
        timeout_ms: get(r, 7)?,
        body_hash: get(r, 8)?,
        posted_at_ms: get(r, 9)?,
        postings,
        hold,
    })
}

/// A merchant's accounts: their postings are indexed (`ledger_postings_by_merchant`), because a
/// merchant's pending balance is buffered and buffered accounts keep no history chain here.
fn is_merchant_account(a: &AccountId) -> bool {
    matches!(
        a.kind(),
        payrail_domain::ledger::AccountKind::MerchantPending
            | payrail_domain::ledger::AccountKind::MerchantAvailable
    )
}

/// A merchant account's postings, newest first, through the partial index (its range
/// condition is repeated so the planner can use it).
async fn merchant_postings(
    store: &PgStore,
    account: &AccountId,
    before: Option<PostingRef>,
    limit: u32,
) -> Result<PostingPage> {
    let c = store.client().await?;
    let (seq, leg) = match before {
        Some(at) => match read_line(&c, at).await? {
            Some(line) if &line.account == account => (at.entry_seq, at.leg),
            _ => return Ok(PostingPage::BadCursor),
        },
        None => (i64::MAX, i64::MAX),
    };
    let rows = query(
        &c,
        &format!(
            "SELECT {POSTING_LINE_SQL_TAIL} WHERE p.account_id = $1 \
             AND p.account_id >= 'merchant' AND p.account_id < 'merchanu' \
             AND (p.entry_seq < $2 OR (p.entry_seq = $2 AND p.leg < $3)) \
             ORDER BY p.entry_seq DESC, p.leg DESC LIMIT $4"
        ),
        &[&account.as_str(), &seq, &leg, &limit_of(limit)],
    )
    .await?;
    let mut lines = map_rows(rows, posting_line)?;
    // The page links each posting to the next older one, like a history chain does, so the
    // caller pages the same way on both backends; the last one links on if the page is full.
    let n = lines.len();
    for i in 0..n {
        let next = lines.get(i.saturating_add(1)).map(|l| l.at);
        if let Some(l) = lines.get_mut(i) {
            l.prev = next.or(if n == limit_of(limit) as usize {
                Some(l.at)
            } else {
                None
            });
        }
    }
    Ok(PostingPage::Lines(lines))
}

fn limit_of(limit: u32) -> i64 {
    i64::from(limit.min(LIST_LIMIT_MAX))
}

#[async_trait]
impl ClearingStore for PgStore {
    async fn put_fee_plan(&self, p: &FeePlanRecord) -> Result<FeePlanRecord> {
        let c = self.client().await?;
        let r = query_one(
            &c,
            &format!(
                "INSERT INTO fee_plans ({FEE_PLAN_COLS}) VALUES \
                 ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 1, $14, $14) \
                 ON CONFLICT (merchant_id, channel, method, currency) DO UPDATE SET \
                 rate_bps = excluded.rate_bps, fixed_minor = excluded.fixed_minor, \
                 min_minor = excluded.min_minor, max_minor = excluded.max_minor, \
                 channel_cost_bps = excluded.channel_cost_bps, \
                 channel_cost_fixed_minor = excluded.channel_cost_fixed_minor, \
                 fee_refund = excluded.fee_refund, channel_cost_refund = excluded.channel_cost_refund, \
                 version = fee_plans.version + 1, updated_at_ms = excluded.updated_at_ms \
                 RETURNING {FEE_PLAN_COLS}"
            ),
            &[
                &p.id.to_string(),
                &key_part(p.merchant_id.map(|m| m.to_string()).as_deref()),
                &key_part(p.channel.as_deref()),
                &key_part(p.method.as_deref()),
                &p.currency,
                &p.rate_bps,
                &p.fixed_minor,
                &p.min_minor,
                &p.max_minor,
                &p.channel_cost_bps,
                &p.channel_cost_fixed_minor,
                &p.fee_refund,
                &p.channel_cost_refund,
                &p.updated_at_ms,
            ],
        )
        .await?;
        fee_plan_row(&r)
    }

    async fn list_fee_plans(&self) -> Result<Vec<FeePlanRecord>> {
        let c = self.client().await?;
        map_rows(
            query(
                &c,
                &format!(
                    "SELECT {FEE_PLAN_COLS} FROM fee_plans ORDER BY merchant_id, channel, method, currency"
                ),
                &[],
            )
            .await?,
            fee_plan_row,
        )
    }

    async fn put_settlement_cycle(&self, cy: &SettlementCycleRecord) -> Result<()> {
        let c = self.client().await?;
        execute(
            &c,
            "INSERT INTO settlement_cycles (merchant_id, t_plus_days, cutoff, utc_offset_minutes, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (merchant_id) DO UPDATE SET \
             t_plus_days = excluded.t_plus_days, cutoff = excluded.cutoff, \
             utc_offset_minutes = excluded.utc_offset_minutes, updated_at_ms = excluded.updated_at_ms",
            &[
                &key_part(cy.merchant_id.map(|m| m.to_string()).as_deref()),
                &cy.t_plus_days,
                &cy.cutoff,
                &cy.utc_offset_minutes,
                &cy.updated_at_ms,
            ],
        )
        .await?;
        Ok(())
    }

    async fn list_settlement_cycles(&self) -> Result<Vec<SettlementCycleRecord>> {
        let c = self.client().await?;
        query(
            &c,
            "SELECT merchant_id, t_plus_days, cutoff, utc_offset_minutes, updated_at_ms \
             FROM settlement_cycles ORDER BY merchant_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(SettlementCycleRecord {
                merchant_id: key_id(r, 0)?,
                t_plus_days: get(r, 1)?,
                cutoff: get(r, 2)?,
                utc_offset_minutes: get(r, 3)?,
                updated_at_ms: get(r, 4)?,
            })
        })
        .collect()
    }

    async fn get_payment_clearing(&self, id: PaymentId) -> Result<Option<PaymentClearingRecord>> {
        let c = self.client().await?;
        query_opt(
            &c,
            &format!("SELECT {PAYMENT_CLEARING_COLS} FROM payment_clearing WHERE payment_id = $1"),
            &[&id.to_string()],
        )
        .await?
        .map(|r| payment_clearing_row(&r))
        .transpose()
    }

    async fn list_refund_clearings(&self, payment: PaymentId) -> Result<Vec<RefundClearingRecord>> {
        let c = self.client().await?;
        map_rows(
            query(
                &c,
                &format!(
                    "SELECT {REFUND_CLEARING_COLS} FROM refund_clearing WHERE payment_id = $1 ORDER BY cleared_at_ms, refund_id"
                ),
                &[&payment.to_string()],
            )
            .await?,
            refund_clearing_row,
        )
    }

    async fn unsettled_groups(
        &self,
        after: Option<(MerchantId, String)>,
        limit: u32,
    ) -> Result<Vec<UnsettledGroup>> {
        // '' sorts before every merchant id and currency code.
        let (m, cur) = after.map_or((String::new(), String::new()), |(m, c)| (m.to_string(), c));
        let c = self.client().await?;
        query(
            &c,
            "SELECT merchant_id, currency, MIN(cleared_at_ms) FROM payment_clearing \
             WHERE settlement_id IS NULL AND (merchant_id > $1 OR (merchant_id = $1 AND currency > $2)) \
             GROUP BY merchant_id, currency ORDER BY merchant_id, currency LIMIT $3",
            &[&m, &cur, &limit_of(limit)],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(UnsettledGroup {
                merchant_id: get_id(r, 0)?,
                currency: get(r, 1)?,
                oldest_cleared_at_ms: get(r, 2)?,
            })
        })
        .collect()
    }

    async fn settle(&self, s: &NewSettlement) -> Result<SettleOutcome> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        match settle_in(&tx, s).await? {
            Some(SettleOutcome::Created(r)) => {
                tx.commit().await.map_err(pg_err)?;
                Ok(SettleOutcome::Created(r))
            }
            Some(other) => {
                tx.rollback().await.map_err(pg_err)?;
                Ok(other)
            }
            None => {
                tx.rollback().await.map_err(pg_err)?;
                Ok(SettleOutcome::Nothing)
            }
        }
    }

    async fn get_settlement(
        &self,
        merchant: Option<MerchantId>,
        id: SettlementId,
    ) -> Result<Option<SettlementRecord>> {
        let c = self.client().await?;
        let row = query_opt(
            &c,
            &format!("SELECT {SETTLEMENT_COLS} FROM settlements WHERE id = $1"),
            &[&id.to_string()],
        )
        .await?
        .map(|r| settlement_row(&r))
        .transpose()?;
        Ok(row.filter(|r| merchant.is_none_or(|m| m == r.merchant_id)))
    }

    async fn list_settlements(
        &self,
        merchant: Option<MerchantId>,
        limit: u32,
        starting_after: Option<SettlementId>,
    ) -> Result<Vec<SettlementRecord>> {
        let c = self.client().await?;
        let m = merchant.map(|m| m.to_string());
        let after = starting_after.map(|a| a.to_string());
        map_rows(
            query(
                &c,
                &format!(
                    "SELECT {SETTLEMENT_COLS} FROM settlements WHERE ($1::text IS NULL OR merchant_id = $1) \
                     AND ($2::text IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"
                ),
                &[&m, &after, &limit_of(limit)],
            )
            .await?,
            settlement_row,
        )
    }

    async fn settlement_lines(
        &self,
        id: SettlementId,
    ) -> Result<(Vec<StatementPayment>, Vec<StatementRefund>)> {
        let c = self.client().await?;
        let id = id.to_string();
        let payments = query(
            &c,
            &format!(
                "SELECT {}, p.out_trade_no FROM payment_clearing pc JOIN payments p ON p.id = pc.payment_id \
                 WHERE pc.settlement_id = $1 ORDER BY pc.cleared_at_ms, pc.payment_id",
                prefixed("pc", PAYMENT_CLEARING_COLS)
            ),
            &[&id],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(StatementPayment {
                clearing: payment_clearing_row(r)?,
                out_trade_no: get(r, 17)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        let refunds = query(
            &c,
            &format!(
                "SELECT {}, r.out_refund_no FROM refund_clearing rc JOIN refunds r ON r.id = rc.refund_id \
                 WHERE rc.settlement_id = $1 ORDER BY rc.cleared_at_ms, rc.refund_id",
                prefixed("rc", REFUND_CLEARING_COLS)
            ),
            &[&id],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(StatementRefund {
                clearing: refund_clearing_row(r)?,
                out_refund_no: get(r, 13)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
        Ok((payments, refunds))
    }

    async fn list_ledger_accounts(
        &self,
        prefix: &str,
        limit: u32,
        starting_after: Option<&str>,
    ) -> Result<Vec<AccountRecord>> {
        let c = self.client().await?;
        let (from, to) = (prefix.to_string(), prefix_end(prefix));
        let after = starting_after.map(str::to_string);
        let mut accounts = map_rows(
            query(
                &c,
                &format!(
                    "SELECT {ACCOUNT_COLS} FROM ledger_accounts a JOIN ledger_balances b ON b.account_no = a.account_no \
                     WHERE a.id >= $1 AND a.id < $2 AND ($3::text IS NULL OR a.id > $3) ORDER BY a.id LIMIT $4"
                ),
                &[&from, &to, &after, &limit_of(limit)],
            )
            .await?,
            account_row,
        )?;
        // Hot accounts: the changes no flush has applied yet.
        let ids: Vec<String> = accounts.iter().map(|a| a.id.to_string()).collect();
        if !ids.is_empty() {
            for r in query(
                &c,
                "SELECT account_id, CAST(SUM(debits_pending) AS BIGINT), CAST(SUM(debits_posted) AS BIGINT), \
                 CAST(SUM(credits_pending) AS BIGINT), CAST(SUM(credits_posted) AS BIGINT) \
                 FROM ledger_buffered WHERE account_id = ANY($1) GROUP BY account_id",
                &[&ids],
            )
            .await?
            {
                let id: &str = get(&r, 0)?;
                if let Some(a) = accounts.iter_mut().find(|a| a.id.as_str() == id) {
                    a.buffered = Balance {
                        debits_pending: get(&r, 1)?,
                        debits_posted: get(&r, 2)?,
                        credits_pending: get(&r, 3)?,
                        credits_posted: get(&r, 4)?,
                    };
                }
            }
        }
        Ok(accounts)
    }

    async fn account_postings(
        &self,
        account: &AccountId,
        before: Option<PostingRef>,
        limit: u32,
    ) -> Result<PostingPage> {
        if is_merchant_account(account) {
            return merchant_postings(self, account, before, limit).await;
        }
        let mut c = self.client().await?;
        // One snapshot for the whole walk.
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)?;
        let mut next = match before {
            Some(at) => match read_line(&tx, at).await? {
                Some(line) if &line.account == account => line.prev,
                _ => return Ok(PostingPage::BadCursor),
            },
            None => match query_opt(
                &tx,
                "SELECT b.last_entry_seq, b.last_leg FROM ledger_accounts a \
                 JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id = $1",
                &[&account.as_str()],
            )
            .await?
            {
                Some(r) => match (get::<Option<i64>>(&r, 0)?, get::<Option<i64>>(&r, 1)?) {
                    (Some(entry_seq), Some(leg)) => Some(PostingRef { entry_seq, leg }),
                    _ => None,
                },
                None => None,
            },
        };
        let mut out = Vec::new();
        while let Some(at) = next {
            if out.len() >= limit.min(LIST_LIMIT_MAX) as usize {
                break;
            }
            let Some(line) = read_line(&tx, at).await? else {
                return Err(StoreError::Corrupt(format!(
                    "history of {account} names a missing posting {}.{}",
                    at.entry_seq, at.leg
                )));
            };
            if &line.account != account {
                return Err(StoreError::Corrupt(format!(
                    "history of {account} leads to a posting of {}",
                    line.account
                )));
            }
            next = line.prev;
            out.push(line);
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(PostingPage::Lines(out))
    }

    async fn list_entries(&self, before_seq: Option<i64>, limit: u32) -> Result<Vec<EntryRecord>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!(
                "SELECT {ENTRY_COLS} FROM ledger_entries WHERE ($1::bigint IS NULL OR seq < $1) ORDER BY seq DESC LIMIT $2"
            ),
            &[&before_seq, &limit_of(limit)],
        )
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.push(entry_record(&c, r).await?);
        }
        Ok(out)
    }

    async fn trial_balance_lines(&self) -> Result<Vec<TrialLine>> {
        let mut c = self.client().await?;
        // Balances and unflushed deltas from one snapshot, so a flush in between cannot count a
        // delta twice or not at all.
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)?;
        let lines = query(&tx, TRIAL_SQL, &[])
            .await?
            .iter()
            .map(|r| {
                let v = |i: usize| -> Result<i128> {
                    Ok(i128::from(get::<Option<i64>>(r, i)?.unwrap_or(0)))
                };
                Ok(TrialLine {
                    kind: get(r, 0)?,
                    currency: get(r, 1)?,
                    accounts: get(r, 2)?,
                    debits_posted: v(3)?,
                    credits_posted: v(4)?,
                    debits_pending: v(5)?,
                    credits_pending: v(6)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let buffered = query(&tx, TRIAL_BUFFERED_SQL, &[])
            .await?
            .iter()
            .map(|r| {
                let v = |i: usize| -> Result<i64> { Ok(get::<Option<i64>>(r, i)?.unwrap_or(0)) };
                Ok((get(r, 0)?, get(r, 1)?, [v(2)?, v(3)?, v(4)?, v(5)?]))
            })
            .collect::<Result<Vec<_>>>()?;
        tx.commit().await.map_err(pg_err)?;
        Ok(merge_trial(lines, buffered))
    }
}
