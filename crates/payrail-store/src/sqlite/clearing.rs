//! Clearing and settlement on SQLite. Every write is a closure on the single writer thread, so
//! a refund reading its payment's clearing row, or a settlement reading the unsettled ones, sees
//! every earlier write and no later one: no locks to order.

use super::*;
use crate::clearing::*;
use crate::ledger::{
    parse_account, parse_entry_id, parse_flags, parse_hold_state, parse_side, AccountRecord,
    EntryRecord, HoldRecord, PostingRow,
};
use crate::sqlite_ledger::{open_accounts_in_tx, post_entries_in_tx};
use payrail_domain::ledger::{AccountId, Balance, Entry, PostOutcome, PostingRef, Reject};
use payrail_domain::{PaymentId, RefundId, SettlementId};

fn opt_id<T: std::str::FromStr>(s: Option<String>) -> rusqlite::Result<Option<T>> {
    s.map(parse_id).transpose()
}

fn fee_plan_row(r: &Row<'_>) -> rusqlite::Result<FeePlanRecord> {
    let merchant: String = r.get(1)?;
    Ok(FeePlanRecord {
        id: parse_id(r.get(0)?)?,
        merchant_id: opt_id(from_key_part(merchant))?,
        channel: from_key_part(r.get(2)?),
        method: from_key_part(r.get(3)?),
        currency: r.get(4)?,
        rate_bps: r.get(5)?,
        fixed_minor: r.get(6)?,
        min_minor: r.get(7)?,
        max_minor: r.get(8)?,
        channel_cost_bps: r.get(9)?,
        channel_cost_fixed_minor: r.get(10)?,
        fee_refund: r.get(11)?,
        channel_cost_refund: r.get(12)?,
        version: r.get(13)?,
        created_at_ms: r.get(14)?,
        updated_at_ms: r.get(15)?,
    })
}

fn payment_clearing_row(r: &Row<'_>) -> rusqlite::Result<PaymentClearingRecord> {
    Ok(PaymentClearingRecord {
        payment_id: parse_id(r.get(0)?)?,
        merchant_id: parse_id(r.get(1)?)?,
        currency: r.get(2)?,
        channel: r.get(3)?,
        method: r.get(4)?,
        wallet_id: r.get(5)?,
        amount_minor: r.get(6)?,
        fee_minor: r.get(7)?,
        channel_cost_minor: r.get(8)?,
        fee_plan_id: opt_id(r.get(9)?)?,
        fee_refund: r.get(10)?,
        channel_cost_refund: r.get(11)?,
        entry_id: r.get(12)?,
        cleared_at_ms: r.get(13)?,
        refunded_minor: r.get(14)?,
        residual_minor: r.get(15)?,
        settlement_id: opt_id(r.get(16)?)?,
    })
}

fn refund_clearing_row(r: &Row<'_>) -> rusqlite::Result<RefundClearingRecord> {
    Ok(RefundClearingRecord {
        refund_id: parse_id(r.get(0)?)?,
        payment_id: parse_id(r.get(1)?)?,
        merchant_id: parse_id(r.get(2)?)?,
        currency: r.get(3)?,
        amount_minor: r.get(4)?,
        fee_refund_minor: r.get(5)?,
        cost_refund_minor: r.get(6)?,
        from_pending_minor: r.get(7)?,
        from_available_minor: r.get(8)?,
        from_suspense_minor: r.get(9)?,
        entry_id: r.get(10)?,
        cleared_at_ms: r.get(11)?,
        settlement_id: opt_id(r.get(12)?)?,
    })
}

fn settlement_row(r: &Row<'_>) -> rusqlite::Result<SettlementRecord> {
    Ok(SettlementRecord {
        id: parse_id(r.get(0)?)?,
        merchant_id: parse_id(r.get(1)?)?,
        currency: r.get(2)?,
        business_day: r.get(3)?,
        t_plus_days: r.get(4)?,
        cutoff: r.get(5)?,
        utc_offset_minutes: r.get(6)?,
        window_start_ms: r.get(7)?,
        window_end_ms: r.get(8)?,
        due_at_ms: r.get(9)?,
        payment_count: r.get(10)?,
        refund_count: r.get(11)?,
        gross_minor: r.get(12)?,
        fee_minor: r.get(13)?,
        refunded_minor: r.get(14)?,
        fee_refunded_minor: r.get(15)?,
        net_minor: r.get(16)?,
        entry_id: r.get(17)?,
        created_at_ms: r.get(18)?,
    })
}

/// Raw columns of [`ACCOUNT_COLS`].
type AccountCols = (String, i64, i64, Balance, i64, i64);

fn account_cols(r: &Row<'_>) -> rusqlite::Result<AccountCols> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        Balance {
            debits_pending: r.get(3)?,
            debits_posted: r.get(4)?,
            credits_pending: r.get(5)?,
            credits_posted: r.get(6)?,
        },
        r.get(7)?,
        r.get(8)?,
    ))
}

fn account_record(c: AccountCols) -> Result<AccountRecord> {
    let (id, flags, created_at_ms, balance, version, last_posted_at_ms) = c;
    Ok(AccountRecord {
        id: parse_account(&id)?,
        flags: parse_flags(flags)?,
        balance,
        buffered: Balance::ZERO,
        version,
        last_posted_at_ms,
        created_at_ms,
    })
}

/// Raw columns of a posting line.
type LineCols = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    String,
    String,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

fn line_cols(r: &Row<'_>) -> rusqlite::Result<LineCols> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
    ))
}

fn posting_line(c: LineCols) -> Result<PostingLine> {
    let (seq, leg, entry_id, code, reference, account, side, amount, pending, at, dpa, cpa, ps, pl) =
        c;
    Ok(PostingLine {
        at: PostingRef {
            entry_seq: seq,
            leg,
        },
        entry_id,
        code,
        reference,
        account: parse_account(&account)?,
        side: parse_side(&side)?,
        amount_minor: amount,
        pending: pending != 0,
        posted_at_ms: at,
        debits_posted_after: dpa,
        credits_posted_after: cpa,
        prev: match (ps, pl) {
            (Some(entry_seq), Some(leg)) => Some(PostingRef { entry_seq, leg }),
            _ => None,
        },
    })
}

// --- writes inside the payment path --------------------------------------------------------

/// Posts one entry inside the writer's transaction, opening its accounts if the ledger says one
/// is missing (accounts are opened on first use).
pub(super) fn post_in_tx(c: &Connection, entry: &Entry, now_ms: i64) -> Result<PostOutcome> {
    let out = single(post_entries_in_tx(c, std::slice::from_ref(entry), now_ms)?)?;
    if let PostOutcome::Rejected(Reject::AccountNotFound(_)) = out {
        open_accounts_in_tx(c, &specs_of(entry), now_ms)?;
        return single(post_entries_in_tx(c, std::slice::from_ref(entry), now_ms)?);
    }
    Ok(out)
}

fn insert_payment_clearing(c: &Connection, r: &PaymentClearingRecord) -> Result<()> {
    c.prepare_cached(&format!(
        "INSERT INTO payment_clearing ({PAYMENT_CLEARING_COLS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
         ON CONFLICT (payment_id) DO NOTHING"
    ))
    .and_then(|mut s| {
        s.execute(params![
            r.payment_id.to_string(),
            r.merchant_id.to_string(),
            r.currency,
            r.channel,
            r.method,
            r.wallet_id,
            r.amount_minor,
            r.fee_minor,
            r.channel_cost_minor,
            r.fee_plan_id.map(|i| i.to_string()),
            r.fee_refund,
            r.channel_cost_refund,
            r.entry_id,
            r.cleared_at_ms,
            r.refunded_minor,
            r.residual_minor,
            r.settlement_id.map(|i| i.to_string()),
        ])
    })
    .map_err(db_err)?;
    Ok(())
}

/// The ledger part of a payment's status change, inside its write.
pub(super) fn transition_ledger_in(
    c: &Connection,
    l: &TransitionLedger,
    now_ms: i64,
) -> Result<()> {
    let out = post_in_tx(c, &l.entry, now_ms)?;
    if judge(l, &out)? {
        if let Some(r) = &l.clearing {
            insert_payment_clearing(c, r)?;
        }
    }
    Ok(())
}

/// What `merchant_available` of a merchant can spend (0 if it is not open).
pub(super) fn available_minor(c: &Connection, account: &AccountId) -> Result<i64> {
    let row: Option<(i64, i64, i64)> = c
        .prepare_cached(
            "SELECT b.credits_posted, b.debits_posted, b.debits_pending FROM ledger_accounts a \
             JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([account.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
        })
        .map_err(db_err)?;
    Ok(row
        .map(|(c, d, p)| c.saturating_sub(d).saturating_sub(p))
        .unwrap_or(0))
}

/// The ledger part of a refund becoming `succeeded`, inside its write: split from the payment's
/// clearing row as of now, post, move the row's totals, record the refund's clearing. A payment
/// without a clearing row (succeeded before clearing existed) posts nothing.
pub(super) fn clear_refund_in(
    c: &Connection,
    refund_id: RefundId,
    payment_id: &str,
    amount_minor: i64,
    now_ms: i64,
) -> Result<()> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {PAYMENT_CLEARING_COLS} FROM payment_clearing WHERE payment_id = ?1"
        ))
        .and_then(|mut s| s.query_row([payment_id], payment_clearing_row).optional())
        .map_err(db_err)?;
    let Some(row) = row else {
        tracing::warn!(refund_id = %refund_id, payment_id, "refund of a payment without clearing: not posted");
        return Ok(());
    };
    let mut plan = plan_refund(&row, refund_id, amount_minor, 0, now_ms)?;
    if plan.needs_available() {
        let cur = payrail_domain::Currency::parse(&row.currency)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let avail = available_minor(c, &AccountId::merchant_available(row.merchant_id, cur))?;
        plan = plan_refund(&row, refund_id, amount_minor, avail, now_ms)?;
    }
    match post_in_tx(c, &plan.entry, now_ms)? {
        PostOutcome::Posted(_) | PostOutcome::Replayed(_) => {}
        PostOutcome::Rejected(r) => return Err(refused(&plan.entry, &r)),
    }
    let n = c
        .prepare_cached(
            "UPDATE payment_clearing SET refunded_minor = refunded_minor + ?1, \
             residual_minor = residual_minor - ?2 WHERE payment_id = ?3",
        )
        .and_then(|mut s| {
            s.execute(params![
                amount_minor,
                plan.split.residual_used.amount_minor(),
                payment_id
            ])
        })
        .map_err(db_err)?;
    if n != 1 {
        return Err(StoreError::Corrupt(format!(
            "clearing row of {payment_id} vanished"
        )));
    }
    let r = &plan.record;
    c.prepare_cached(&format!(
        "INSERT INTO refund_clearing ({REFUND_CLEARING_COLS}) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, NULL)"
    ))
    .and_then(|mut s| {
        s.execute(params![
            r.refund_id.to_string(),
            r.payment_id.to_string(),
            r.merchant_id.to_string(),
            r.currency,
            r.amount_minor,
            r.fee_refund_minor,
            r.cost_refund_minor,
            r.from_pending_minor,
            r.from_available_minor,
            r.from_suspense_minor,
            r.entry_id,
            r.cleared_at_ms,
        ])
    })
    .map_err(db_err)?;
    if let Some(a) = &plan.alert {
        c.execute(
            &format!("INSERT INTO alerts ({ALERT_COLS}) VALUES (?1, ?2, ?3, ?4)"),
            params![a.kind, a.subject_id, a.detail, a.created_at_ms],
        )
        .map_err(db_err)?;
    }
    Ok(())
}

// --- settlement ----------------------------------------------------------------------------

fn settlement_by_key(c: &Connection, s: &NewSettlement) -> Result<SettlementRecord> {
    c.prepare_cached(&format!(
        "SELECT {SETTLEMENT_COLS} FROM settlements WHERE merchant_id = ?1 AND currency = ?2 AND business_day = ?3"
    ))
    .and_then(|mut st| {
        st.query_row(
            params![s.merchant_id.to_string(), s.currency, s.business_day],
            settlement_row,
        )
    })
    .map_err(db_err)
}

/// `(outcome, keep)`: `keep = false` rolls the closure's writes back.
fn settle_in(c: &Connection, s: &NewSettlement) -> Result<(SettleOutcome, bool)> {
    let id = s.id.to_string();
    let inserted = c
        .prepare_cached(&format!(
            "INSERT INTO settlements ({SETTLEMENT_COLS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, 0, 0, 0, 0, 0, 0, NULL, ?11) \
             ON CONFLICT (merchant_id, currency, business_day) DO NOTHING"
        ))
        .and_then(|mut st| {
            st.execute(params![
                id,
                s.merchant_id.to_string(),
                s.currency,
                s.business_day,
                s.t_plus_days,
                s.cutoff,
                s.utc_offset_minutes,
                s.window_start_ms,
                s.window_end_ms,
                s.due_at_ms,
                s.now_ms,
            ])
        })
        .map_err(db_err)?;
    if inserted == 0 {
        return Ok((SettleOutcome::Exists(settlement_by_key(c, s)?), false));
    }
    let limit = i64::try_from(SETTLEMENT_PAYMENTS_MAX.saturating_add(1)).unwrap_or(i64::MAX);
    let payments: Vec<PaymentClearingRecord> = c
        .prepare_cached(&format!(
            "SELECT {PAYMENT_CLEARING_COLS} FROM payment_clearing WHERE merchant_id = ?1 AND currency = ?2 \
             AND settlement_id IS NULL AND cleared_at_ms < ?3 ORDER BY cleared_at_ms, payment_id LIMIT ?4"
        ))
        .and_then(|mut st| {
            st.query_map(
                params![s.merchant_id.to_string(), s.currency, s.window_end_ms, limit],
                payment_clearing_row,
            )?
            .collect()
        })
        .map_err(db_err)?;
    if payments.is_empty() {
        return Ok((SettleOutcome::Nothing, false));
    }
    if payments.len() > SETTLEMENT_PAYMENTS_MAX {
        return Err(StoreError::Config(format!(
            "settlement of {} {} {} covers more than {SETTLEMENT_PAYMENTS_MAX} payments",
            s.merchant_id, s.currency, s.business_day
        )));
    }
    let n = c
        .prepare_cached(
            "UPDATE payment_clearing SET settlement_id = ?1 WHERE merchant_id = ?2 AND currency = ?3 \
             AND settlement_id IS NULL AND cleared_at_ms < ?4",
        )
        .and_then(|mut st| {
            st.execute(params![
                id,
                s.merchant_id.to_string(),
                s.currency,
                s.window_end_ms
            ])
        })
        .map_err(db_err)?;
    if n != payments.len() {
        return Err(StoreError::Corrupt(format!(
            "settlement {id}: read {} payments, marked {n}",
            payments.len()
        )));
    }
    // Every refund of these payments so far was made while they were unsettled.
    c.prepare_cached(
        "UPDATE refund_clearing SET settlement_id = ?1 WHERE settlement_id IS NULL AND payment_id IN \
         (SELECT payment_id FROM payment_clearing WHERE settlement_id = ?1)",
    )
    .and_then(|mut st| st.execute([&id]))
    .map_err(db_err)?;
    let refunds: Vec<RefundClearingRecord> = c
        .prepare_cached(&format!(
            "SELECT {REFUND_CLEARING_COLS} FROM refund_clearing WHERE settlement_id = ?1 ORDER BY cleared_at_ms, refund_id"
        ))
        .and_then(|mut st| st.query_map([&id], refund_clearing_row)?.collect())
        .map_err(db_err)?;
    let (totals, entry) = plan_settlement(s, &payments, &refunds)?;
    if let Some(e) = &entry {
        match post_in_tx(c, e, s.now_ms)? {
            PostOutcome::Posted(_) | PostOutcome::Replayed(_) => {}
            PostOutcome::Rejected(r) => return Err(refused(e, &r)),
        }
    }
    c.prepare_cached(
        "UPDATE settlements SET payment_count = ?1, refund_count = ?2, gross_minor = ?3, fee_minor = ?4, \
         refunded_minor = ?5, fee_refunded_minor = ?6, net_minor = ?7, entry_id = ?8 WHERE id = ?9",
    )
    .and_then(|mut st| {
        st.execute(params![
            totals.payment_count,
            totals.refund_count,
            totals.gross_minor,
            totals.fee_minor,
            totals.refunded_minor,
            totals.fee_refunded_minor,
            totals.net_minor,
            entry.as_ref().map(|e| e.id().to_string()),
            id
        ])
    })
    .map_err(db_err)?;
    Ok((SettleOutcome::Created(settlement_by_key(c, s)?), true))
}

/// Raw columns of [`ENTRY_COLS`].
type EntryCols = (
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    String,
    i64,
);

fn entry_record(c: &Connection, cols: EntryCols) -> Result<EntryRecord> {
    let (seq, id, code, phase, currency, reference, pending_id, timeout_ms, body_hash, at) = cols;
    let postings = c
        .prepare_cached(
            "SELECT leg, account_id, side, amount_minor, pending, posted_at_ms, account_version \
             FROM ledger_postings WHERE entry_seq = ?1 ORDER BY leg",
        )
        .and_then(|mut s| {
            s.query_map([seq], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })
        .map_err(db_err)?
        .into_iter()
        .map(
            |(leg, account, side, amount_minor, pending, posted_at_ms, v)| {
                Ok(PostingRow {
                    leg,
                    account: parse_account(&account)?,
                    side: parse_side(&side)?,
                    amount_minor,
                    pending: pending != 0,
                    posted_at_ms,
                    account_version: v,
                })
            },
        )
        .collect::<Result<Vec<_>>>()?;
    let hold = if phase == "pending" {
        c.prepare_cached(
            "SELECT expires_at_ms, state, resolved_by FROM ledger_holds WHERE entry_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([&id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                ))
            })
            .optional()
        })
        .map_err(db_err)?
        .map(|(expires_at_ms, state, by)| {
            Ok::<_, StoreError>(HoldRecord {
                expires_at_ms,
                state: parse_hold_state(&state)?,
                resolved_by: by.as_deref().map(parse_entry_id).transpose()?,
            })
        })
        .transpose()?
    } else {
        None
    };
    Ok(EntryRecord {
        seq,
        id: parse_entry_id(&id)?,
        code,
        phase,
        currency,
        reference,
        pending_id: pending_id.as_deref().map(parse_entry_id).transpose()?,
        timeout_ms,
        body_hash,
        posted_at_ms: at,
        postings,
        hold,
    })
}

fn read_line(c: &Connection, at: PostingRef) -> Result<Option<PostingLine>> {
    let cols = c
        .prepare_cached(&format!(
            "SELECT {POSTING_LINE_SQL_TAIL} WHERE p.entry_seq = ?1 AND p.leg = ?2"
        ))
        .and_then(|mut s| s.query_row([at.entry_seq, at.leg], line_cols).optional())
        .map_err(db_err)?;
    cols.map(posting_line).transpose()
}

fn postings_in(
    c: &Connection,
    account: &AccountId,
    before: Option<PostingRef>,
    limit: u32,
) -> Result<PostingPage> {
    let mut next = match before {
        Some(at) => match read_line(c, at)? {
            Some(line) if &line.account == account => line.prev,
            _ => return Ok(PostingPage::BadCursor),
        },
        None => c
            .prepare_cached(
                "SELECT b.last_entry_seq, b.last_leg FROM ledger_accounts a \
                 JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id = ?1",
            )
            .and_then(|mut s| {
                s.query_row([account.as_str()], |r| {
                    Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?))
                })
                .optional()
            })
            .map_err(db_err)?
            .and_then(|(s, l)| {
                Some(PostingRef {
                    entry_seq: s?,
                    leg: l?,
                })
            }),
    };
    let mut out = Vec::new();
    while let Some(at) = next {
        if out.len() >= limit.min(LIST_LIMIT_MAX) as usize {
            break;
        }
        let Some(line) = read_line(c, at)? else {
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
    Ok(PostingPage::Lines(out))
}

#[async_trait]
impl ClearingStore for SqliteStore {
    async fn put_fee_plan(&self, p: &FeePlanRecord) -> Result<FeePlanRecord> {
        let p = p.clone();
        self.write(move |c| {
            c.prepare_cached(&format!(
                "INSERT INTO fee_plans ({FEE_PLAN_COLS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 1, ?14, ?14) \
                 ON CONFLICT (merchant_id, channel, method, currency) DO UPDATE SET \
                 rate_bps = excluded.rate_bps, fixed_minor = excluded.fixed_minor, \
                 min_minor = excluded.min_minor, max_minor = excluded.max_minor, \
                 channel_cost_bps = excluded.channel_cost_bps, \
                 channel_cost_fixed_minor = excluded.channel_cost_fixed_minor, \
                 fee_refund = excluded.fee_refund, channel_cost_refund = excluded.channel_cost_refund, \
                 version = fee_plans.version + 1, updated_at_ms = excluded.updated_at_ms \
                 RETURNING {FEE_PLAN_COLS}"
            ))
            .and_then(|mut s| {
                s.query_row(
                    params![
                        p.id.to_string(),
                        key_part(p.merchant_id.map(|m| m.to_string()).as_deref()),
                        key_part(p.channel.as_deref()),
                        key_part(p.method.as_deref()),
                        p.currency,
                        p.rate_bps,
                        p.fixed_minor,
                        p.min_minor,
                        p.max_minor,
                        p.channel_cost_bps,
                        p.channel_cost_fixed_minor,
                        p.fee_refund,
                        p.channel_cost_refund,
                        p.updated_at_ms,
                    ],
                    fee_plan_row,
                )
            })
            .map_err(db_err)
        })
        .await
    }

    async fn list_fee_plans(&self) -> Result<Vec<FeePlanRecord>> {
        self.read(|c| {
            c.prepare_cached(&format!(
                "SELECT {FEE_PLAN_COLS} FROM fee_plans ORDER BY merchant_id, channel, method, currency"
            ))
            .and_then(|mut s| s.query_map([], fee_plan_row)?.collect())
            .map_err(db_err)
        })
        .await
    }

    async fn put_settlement_cycle(&self, cy: &SettlementCycleRecord) -> Result<()> {
        let cy = cy.clone();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO settlement_cycles (merchant_id, t_plus_days, cutoff, utc_offset_minutes, updated_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (merchant_id) DO UPDATE SET \
                 t_plus_days = excluded.t_plus_days, cutoff = excluded.cutoff, \
                 utc_offset_minutes = excluded.utc_offset_minutes, updated_at_ms = excluded.updated_at_ms",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key_part(cy.merchant_id.map(|m| m.to_string()).as_deref()),
                    cy.t_plus_days,
                    cy.cutoff,
                    cy.utc_offset_minutes,
                    cy.updated_at_ms
                ])
            })
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn list_settlement_cycles(&self) -> Result<Vec<SettlementCycleRecord>> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT merchant_id, t_plus_days, cutoff, utc_offset_minutes, updated_at_ms \
                 FROM settlement_cycles ORDER BY merchant_id",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok(SettlementCycleRecord {
                        merchant_id: opt_id(from_key_part(r.get(0)?))?,
                        t_plus_days: r.get(1)?,
                        cutoff: r.get(2)?,
                        utc_offset_minutes: r.get(3)?,
                        updated_at_ms: r.get(4)?,
                    })
                })?
                .collect()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn get_payment_clearing(&self, id: PaymentId) -> Result<Option<PaymentClearingRecord>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {PAYMENT_CLEARING_COLS} FROM payment_clearing WHERE payment_id = ?1"
            ))
            .and_then(|mut s| {
                s.query_row([id.to_string()], payment_clearing_row)
                    .optional()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn list_refund_clearings(&self, payment: PaymentId) -> Result<Vec<RefundClearingRecord>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {REFUND_CLEARING_COLS} FROM refund_clearing WHERE payment_id = ?1 ORDER BY cleared_at_ms, refund_id"
            ))
            .and_then(|mut s| s.query_map([payment.to_string()], refund_clearing_row)?.collect())
            .map_err(db_err)
        })
        .await
    }

    async fn unsettled_groups(
        &self,
        after: Option<(MerchantId, String)>,
        limit: u32,
    ) -> Result<Vec<UnsettledGroup>> {
        // '' sorts before every merchant id and currency code.
        let (m, cur) = after.map_or((String::new(), String::new()), |(m, c)| (m.to_string(), c));
        self.read(move |c| {
            c.prepare_cached(
                "SELECT merchant_id, currency, MIN(cleared_at_ms) FROM payment_clearing \
                 WHERE settlement_id IS NULL AND (merchant_id > ?1 OR (merchant_id = ?1 AND currency > ?2)) \
                 GROUP BY merchant_id, currency ORDER BY merchant_id, currency LIMIT ?3",
            )
            .and_then(|mut s| {
                s.query_map(params![m, cur, i64::from(limit.min(LIST_LIMIT_MAX))], |r| {
                    Ok(UnsettledGroup {
                        merchant_id: parse_id(r.get(0)?)?,
                        currency: r.get(1)?,
                        oldest_cleared_at_ms: r.get(2)?,
                    })
                })?
                .collect()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn settle(&self, s: &NewSettlement) -> Result<SettleOutcome> {
        let s = s.clone();
        self.write_or_rollback(move |c| settle_in(c, &s)).await
    }

    async fn get_settlement(
        &self,
        merchant: Option<MerchantId>,
        id: SettlementId,
    ) -> Result<Option<SettlementRecord>> {
        self.read(move |c| {
            let row = c
                .prepare_cached(&format!(
                    "SELECT {SETTLEMENT_COLS} FROM settlements WHERE id = ?1"
                ))
                .and_then(|mut s| s.query_row([id.to_string()], settlement_row).optional())
                .map_err(db_err)?;
            Ok(row.filter(|r| merchant.is_none_or(|m| m == r.merchant_id)))
        })
        .await
    }

    async fn list_settlements(
        &self,
        merchant: Option<MerchantId>,
        limit: u32,
        starting_after: Option<SettlementId>,
    ) -> Result<Vec<SettlementRecord>> {
        self.read(move |c| {
            let m = merchant.map(|m| m.to_string());
            let after = starting_after.map(|a| a.to_string());
            c.prepare_cached(&format!(
                "SELECT {SETTLEMENT_COLS} FROM settlements WHERE (?1 IS NULL OR merchant_id = ?1) \
                 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
            ))
            .and_then(|mut s| {
                s.query_map(
                    params![m, after, i64::from(limit.min(LIST_LIMIT_MAX))],
                    settlement_row,
                )?
                .collect()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn settlement_lines(
        &self,
        id: SettlementId,
    ) -> Result<(Vec<StatementPayment>, Vec<StatementRefund>)> {
        self.read(move |c| {
            let id = id.to_string();
            let payments = c
                .prepare_cached(&format!(
                    "SELECT {}, p.out_trade_no FROM payment_clearing pc JOIN payments p ON p.id = pc.payment_id \
                     WHERE pc.settlement_id = ?1 ORDER BY pc.cleared_at_ms, pc.payment_id",
                    prefixed("pc", PAYMENT_CLEARING_COLS)
                ))
                .and_then(|mut s| {
                    s.query_map([&id], |r| {
                        Ok(StatementPayment {
                            clearing: payment_clearing_row(r)?,
                            out_trade_no: r.get(17)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(db_err)?;
            let refunds = c
                .prepare_cached(&format!(
                    "SELECT {}, r.out_refund_no FROM refund_clearing rc JOIN refunds r ON r.id = rc.refund_id \
                     WHERE rc.settlement_id = ?1 ORDER BY rc.cleared_at_ms, rc.refund_id",
                    prefixed("rc", REFUND_CLEARING_COLS)
                ))
                .and_then(|mut s| {
                    s.query_map([&id], |r| {
                        Ok(StatementRefund {
                            clearing: refund_clearing_row(r)?,
                            out_refund_no: r.get(13)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(db_err)?;
            Ok((payments, refunds))
        })
        .await
    }

    async fn list_ledger_accounts(
        &self,
        prefix: &str,
        limit: u32,
        starting_after: Option<&str>,
    ) -> Result<Vec<AccountRecord>> {
        let (from, to) = (prefix.to_string(), prefix_end(prefix));
        let after = starting_after.map(str::to_string);
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {ACCOUNT_COLS} FROM ledger_accounts a JOIN ledger_balances b ON b.account_no = a.account_no \
                 WHERE a.id >= ?1 AND a.id < ?2 AND (?3 IS NULL OR a.id > ?3) ORDER BY a.id LIMIT ?4"
            ))
            .and_then(|mut s| {
                s.query_map(
                    params![from, to, after, i64::from(limit.min(LIST_LIMIT_MAX))],
                    account_cols,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(db_err)?
            .into_iter()
            .map(account_record)
            .collect()
        })
        .await
    }

    async fn account_postings(
        &self,
        account: &AccountId,
        before: Option<PostingRef>,
        limit: u32,
    ) -> Result<PostingPage> {
        let account = account.clone();
        self.read(move |c| postings_in(c, &account, before, limit))
            .await
    }

    async fn list_entries(&self, before_seq: Option<i64>, limit: u32) -> Result<Vec<EntryRecord>> {
        self.read(move |c| {
            let heads = c
                .prepare_cached(&format!(
                    "SELECT {ENTRY_COLS} FROM ledger_entries WHERE (?1 IS NULL OR seq < ?1) ORDER BY seq DESC LIMIT ?2"
                ))
                .and_then(|mut s| {
                    s.query_map(
                        params![before_seq, i64::from(limit.min(LIST_LIMIT_MAX))],
                        |r| {
                            Ok((
                                r.get(0)?,
                                r.get(1)?,
                                r.get(2)?,
                                r.get(3)?,
                                r.get(4)?,
                                r.get(5)?,
                                r.get(6)?,
                                r.get(7)?,
                                r.get(8)?,
                                r.get(9)?,
                            ))
                        },
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(db_err)?;
            heads.into_iter().map(|h| entry_record(c, h)).collect()
        })
        .await
    }

    async fn trial_balance_lines(&self) -> Result<Vec<TrialLine>> {
        self.read(|c| {
            let lines = c
                .prepare_cached(TRIAL_SQL)
                .and_then(|mut s| {
                    s.query_map([], |r| {
                        Ok(TrialLine {
                            kind: r.get(0)?,
                            currency: r.get(1)?,
                            accounts: r.get(2)?,
                            debits_posted: i128::from(r.get::<_, Option<i64>>(3)?.unwrap_or(0)),
                            credits_posted: i128::from(r.get::<_, Option<i64>>(4)?.unwrap_or(0)),
                            debits_pending: i128::from(r.get::<_, Option<i64>>(5)?.unwrap_or(0)),
                            credits_pending: i128::from(r.get::<_, Option<i64>>(6)?.unwrap_or(0)),
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(db_err)?;
            let buffered = c
                .prepare_cached(TRIAL_BUFFERED_SQL)
                .and_then(|mut s| {
                    s.query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            [
                                r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                                r.get::<_, Option<i64>>(3)?.unwrap_or(0),
                                r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                                r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                            ],
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(db_err)?;
            Ok(merge_trial(lines, buffered))
        })
        .await
    }
}
