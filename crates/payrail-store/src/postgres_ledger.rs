//! The ledger on PostgreSQL.
//!
//! Concurrency: a batch locks what it changes before it reads balances — the holds it posts or
//! voids, then the (non-buffered) accounts it touches, each set `ORDER BY` its key so two
//! batches always lock in the same order and cannot deadlock — then posts through a [`Book`]
//! and writes with one statement per table (`UNNEST` arrays). No-overdraft checks therefore see
//! the committed balance under a row lock: parallel debits of one account serialise on it and
//! never overdraw it.
//!
//! Hot accounts (`BUFFERED`) are neither locked nor updated by a batch: it inserts one delta row
//! per buffered account instead (the batch's net change), and [`LedgerStore::flush_buffered`]
//! applies deltas in bulk under one account lock per flush. Without this, every payment would
//! queue on the platform-fee row lock until the previous payment's commit (fsync) finished.

use crate::ledger::*;
use crate::postgres::{pg_err, PgStore};
use crate::{Result, StoreError};
use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Transaction};
use payrail_domain::ledger::{
    AccountId, AccountState, Balance, BodyHash, Book, Changes, Entry, EntryId, Hold, PostOutcome,
    PostingRef, StoredEntry,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

/// Attempts of a batch that lost a race (another transaction took one of its entry ids
/// meanwhile, or PostgreSQL broke a deadlock) before the error is returned.
const POST_ATTEMPTS_MAX: usize = 4;
/// Transaction-scoped advisory lock serialising flushes ("payrail" + 2), so deltas are applied
/// in commit order of their holds and a release never reaches an account before its hold.
const FLUSH_LOCK: i64 = 0x0270_6179_7261_696C;
const BUFFERED_BIT: i64 = 4;

type Params<'a> = [&'a (dyn ToSql + Sync)];

/// Why a batch failed.
enum Fail {
    /// Lost a race that a retry resolves (id taken meanwhile, deadlock, serialization).
    Retry(String),
    Store(StoreError),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

fn pg(e: tokio_postgres::Error) -> Fail {
    use tokio_postgres::error::SqlState;
    match e.code() {
        Some(c)
            if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::UNIQUE_VIOLATION =>
        {
            Fail::Retry(e.to_string())
        }
        _ => Fail::Store(db_error(e)),
    }
}

/// Like `pg_err`, but keeps the server's message and SQLSTATE (a constraint that fired says
/// which).
fn db_error(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(d) => StoreError::Database(format!(
            "{} ({}){}",
            d.message(),
            d.code().code(),
            d.detail().map(|x| format!(": {x}")).unwrap_or_default()
        )),
        None => pg_err(e),
    }
}

fn into_store(f: Fail) -> StoreError {
    match f {
        Fail::Retry(m) => StoreError::Database(format!(
            "ledger batch lost a race ({m}); roll the transaction back and retry"
        )),
        Fail::Store(e) => e,
    }
}

async fn query<C: GenericClient>(c: &C, sql: &str, p: &Params<'_>) -> Result<Vec<Row>, Fail> {
    let stmt = c.prepare_cached(sql).await.map_err(pg)?;
    c.query(&stmt, p).await.map_err(pg)
}

async fn execute<C: GenericClient>(c: &C, sql: &str, p: &Params<'_>) -> Result<u64, Fail> {
    let stmt = c.prepare_cached(sql).await.map_err(pg)?;
    c.execute(&stmt, p).await.map_err(pg)
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(r: &'a Row, i: usize) -> Result<T> {
    r.try_get(i).map_err(pg_err)
}

/// Posts `entries` in order inside `tx`. A refused entry writes nothing. On `Err` the
/// transaction may hold partial writes of this call: roll it back (an error that says "lost a
/// race" is worth retrying). Nothing is durable before the caller commits.
pub async fn post_entries_in_tx(
    tx: &Transaction<'_>,
    entries: &[Entry],
    now_ms: i64,
) -> Result<Vec<PostOutcome>> {
    post_in(tx, entries, now_ms).await.map_err(into_store)
}

/// Opens accounts inside `tx` (idempotent).
pub async fn open_accounts_in_tx(
    tx: &Transaction<'_>,
    specs: &[AccountSpec],
    now_ms: i64,
) -> Result<Vec<OpenOutcome>> {
    open_in(tx, specs, now_ms).await.map_err(into_store)
}

async fn open_in<C: GenericClient>(
    c: &C,
    specs: &[AccountSpec],
    now_ms: i64,
) -> Result<Vec<OpenOutcome>, Fail> {
    if specs.len() > OPEN_BATCH_MAX {
        return Err(Fail::Store(StoreError::Config(format!(
            "{} accounts in one call; at most {OPEN_BATCH_MAX}",
            specs.len()
        ))));
    }
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let id = spec.id.to_string();
        let flags = i64::from(spec.flags.bits());
        // The number comes from the balances' sequence; a concurrent open of the same account
        // waits on the id and then finds it taken, leaving only a gap in the numbers.
        let inserted = query(
            c,
            "INSERT INTO ledger_accounts (id, account_no, kind, currency, flags, created_at_ms) \
             VALUES ($1, nextval(pg_get_serial_sequence('ledger_balances', 'account_no')), $2, $3, $4, $5) \
             ON CONFLICT (id) DO NOTHING RETURNING account_no",
            &[&id, &spec.id.kind().as_str(), &spec.id.currency().code(), &flags, &now_ms],
        )
        .await?;
        if let Some(r) = inserted.first() {
            let no: i64 = get(r, 0)?;
            execute(
                c,
                "INSERT INTO ledger_balances (account_no, flags, debits_pending, debits_posted, credits_pending, \
                 credits_posted, version, last_posted_at_ms) VALUES ($1, $2, 0, 0, 0, 0, 0, 0)",
                &[&no, &flags],
            )
            .await?;
            out.push(OpenOutcome::Opened);
            continue;
        }
        let rows = query(c, "SELECT flags FROM ledger_accounts WHERE id = $1", &[&id]).await?;
        let row = rows
            .first()
            .ok_or_else(|| corrupt(format!("account {id} vanished")))?;
        let existing = parse_flags(get(row, 0)?)?;
        out.push(if existing == spec.flags {
            OpenOutcome::AlreadyOpen
        } else {
            OpenOutcome::FlagsDiffer { existing }
        });
    }
    Ok(out)
}

/// Plans this transaction's statements for their actual arguments. Cached statements otherwise
/// switch to a generic plan after five runs, and a generic plan made while the ledger tables
/// were nearly empty keeps scanning them sequentially as they grow: measured 111 ms per batch
/// of 100 after 100,000 entries, ~1,000 full scans of `ledger_entries` (docs/BENCHMARKS.md).
/// `SET LOCAL` ends with the transaction (the caller's, for `post_entries_in_tx`).
async fn plan_per_execution(tx: &Transaction<'_>) -> Result<(), Fail> {
    tx.batch_execute("SET LOCAL plan_cache_mode = force_custom_plan")
        .await
        .map_err(pg)
}

async fn post_in(
    tx: &Transaction<'_>,
    entries: &[Entry],
    now_ms: i64,
) -> Result<Vec<PostOutcome>, Fail> {
    check_batch(entries.len())?;
    plan_per_execution(tx).await?;
    let n = i64::try_from(entries.len()).unwrap_or(i64::MAX);
    // Sequence numbers for every entry that may be new (unused ones are gaps, which is fine).
    let seqs: Vec<i64> = query(
        tx,
        "SELECT nextval(pg_get_serial_sequence('ledger_entries', 'seq')) FROM generate_series(1, $1::int8)",
        &[&n],
    )
    .await?
    .iter()
    .map(|r| get(r, 0))
    .collect::<Result<_>>()?;
    let mut book = Book::with_seqs(seqs);
    let ids: Vec<String> = entries.iter().map(|e| e.id().to_string()).collect();
    for r in query(
        tx,
        "SELECT id, seq, posted_at_ms, body_hash FROM ledger_entries WHERE id = ANY($1)",
        &[&ids],
    )
    .await?
    {
        let hash: &str = get(&r, 3)?;
        book.put_stored(
            parse_entry_id(get(&r, 0)?)?,
            StoredEntry {
                seq: get(&r, 1)?,
                posted_at_ms: get(&r, 2)?,
                hash: BodyHash::from_hex(hash).ok_or_else(|| corrupt(format!("hash {hash}")))?,
            },
        );
    }
    let mut hold_accounts = Vec::new();
    let pending: Vec<String> = pending_ids(entries).iter().map(|p| p.to_string()).collect();
    if !pending.is_empty() {
        for (id, hold) in lock_holds(tx, &pending).await? {
            hold_accounts.extend(hold.legs.iter().map(|(a, ..)| a.clone()));
            book.put_hold(id, hold);
        }
    }
    let mut accounts = own_accounts(entries);
    accounts.extend(hold_accounts.iter());
    let nos = load_accounts(tx, &mut book, &accounts).await?;
    let mut outcomes = Vec::with_capacity(entries.len());
    for e in entries {
        outcomes.push(book.post(e, now_ms).map_err(corrupt)?);
    }
    let changes = book.take_changes();
    write_changes(tx, &book, &changes, &nos, now_ms).await?;
    Ok(outcomes)
}

/// Locks the holds (sorted by id) and loads them with their legs.
async fn lock_holds(
    tx: &Transaction<'_>,
    pending: &[String],
) -> Result<Vec<(EntryId, Hold)>, Fail> {
    let rows = query(
        tx,
        "SELECT entry_id, entry_seq, expires_at_ms, state FROM ledger_holds \
         WHERE entry_id = ANY($1) ORDER BY entry_id FOR UPDATE",
        &[&pending],
    )
    .await?;
    let seqs: Vec<i64> = rows.iter().map(|r| get(r, 1)).collect::<Result<_>>()?;
    let mut legs: BTreeMap<i64, Vec<(AccountId, payrail_domain::ledger::Side, i64)>> =
        BTreeMap::new();
    for r in query(
        tx,
        "SELECT entry_seq, account_id, side, amount_minor FROM ledger_postings \
         WHERE entry_seq = ANY($1) AND pending = 1 ORDER BY entry_seq, leg",
        &[&seqs],
    )
    .await?
    {
        legs.entry(get(&r, 0)?).or_default().push((
            parse_account(get(&r, 1)?)?,
            parse_side(get(&r, 2)?)?,
            get(&r, 3)?,
        ));
    }
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let seq: i64 = get(r, 1)?;
        out.push((
            parse_entry_id(get(r, 0)?)?,
            Hold {
                seq,
                legs: legs.remove(&seq).unwrap_or_default(),
                expires_at_ms: get(r, 2)?,
                state: parse_hold_state(get(r, 3)?)?,
            },
        ));
    }
    Ok(out)
}

/// Loads the accounts into the book: the others with their balance rows locked `FOR UPDATE` in
/// id order, the buffered ones as deferred (no lock, no balance: the batch records a delta).
/// Returns the `account_no` of each locked account.
async fn load_accounts(
    tx: &Transaction<'_>,
    book: &mut Book,
    ids: &BTreeSet<&AccountId>,
) -> Result<HashMap<String, i64>, Fail> {
    let mut nos = HashMap::new();
    if ids.is_empty() {
        return Ok(nos);
    }
    let keys: Vec<String> = ids.iter().map(|a| a.to_string()).collect();
    for r in query(
        tx,
        "SELECT id, flags FROM ledger_accounts WHERE id = ANY($1) AND (flags & $2) <> 0",
        &[&keys, &BUFFERED_BIT],
    )
    .await?
    {
        book.put_account(
            parse_account(get(&r, 0)?)?,
            AccountState::deferred(parse_flags(get(&r, 1)?)?),
        );
    }
    for r in query(
        tx,
        "SELECT a.id, b.flags, b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted, \
         b.version, b.last_posted_at_ms, b.last_entry_seq, b.last_leg, b.account_no \
         FROM ledger_accounts a JOIN ledger_balances b ON b.account_no = a.account_no \
         WHERE a.id = ANY($1) AND (a.flags & $2) = 0 ORDER BY a.id FOR UPDATE OF b",
        &[&keys, &BUFFERED_BIT],
    )
    .await?
    {
        let seq: Option<i64> = get(&r, 8)?;
        let leg: Option<i64> = get(&r, 9)?;
        let id: String = get(&r, 0)?;
        let account = parse_account(&id)?;
        nos.insert(id, get(&r, 10)?);
        book.put_account(
            account,
            AccountState {
                flags: parse_flags(get(&r, 1)?)?,
                balance: Balance {
                    debits_pending: get(&r, 2)?,
                    debits_posted: get(&r, 3)?,
                    credits_pending: get(&r, 4)?,
                    credits_posted: get(&r, 5)?,
                },
                version: get(&r, 6)?,
                last_posted_at_ms: get(&r, 7)?,
                last_posting: seq
                    .zip(leg)
                    .map(|(entry_seq, leg)| PostingRef { entry_seq, leg }),
                deferred: false,
            },
        );
    }
    Ok(nos)
}

/// Column arrays for one `INSERT … SELECT * FROM UNNEST(…)`.
#[derive(Default)]
struct EntryCols {
    seq: Vec<i64>,
    id: Vec<String>,
    code: Vec<&'static str>,
    phase: Vec<&'static str>,
    currency: Vec<Option<String>>,
    reference: Vec<Option<String>>,
    pending_id: Vec<Option<String>>,
    timeout_ms: Vec<Option<i64>>,
    hash: Vec<String>,
    at: Vec<i64>,
}

#[derive(Default)]
struct PostingCols {
    seq: Vec<i64>,
    leg: Vec<i64>,
    account: Vec<String>,
    side: Vec<&'static str>,
    amount: Vec<i64>,
    pending: Vec<i64>,
    at: Vec<i64>,
    version: Vec<Option<i64>>,
    debits_after: Vec<Option<i64>>,
    credits_after: Vec<Option<i64>>,
    prev_seq: Vec<Option<i64>>,
    prev_leg: Vec<Option<i64>>,
}

#[derive(Default)]
struct HistoryCols {
    account: Vec<String>,
    at: Vec<i64>,
    version: Vec<i64>,
    debits: Vec<i64>,
    credits: Vec<i64>,
    seq: Vec<Option<i64>>,
    leg: Vec<Option<i64>>,
}

#[derive(Default)]
struct BalanceCols {
    id: Vec<String>,
    dp: Vec<i64>,
    dpo: Vec<i64>,
    cp: Vec<i64>,
    cpo: Vec<i64>,
}

impl BalanceCols {
    fn push(&mut self, id: String, b: Balance) {
        self.id.push(id);
        self.dp.push(b.debits_pending);
        self.dpo.push(b.debits_posted);
        self.cp.push(b.credits_pending);
        self.cpo.push(b.credits_posted);
    }
}

impl HistoryCols {
    async fn insert(&self, tx: &Transaction<'_>) -> Result<(), Fail> {
        if self.account.is_empty() {
            return Ok(());
        }
        execute(
            tx,
            "INSERT INTO ledger_balance_history (account_id, posted_at_ms, account_version, debits_posted, \
             credits_posted, entry_seq, leg) SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], \
             $4::int8[], $5::int8[], $6::int8[], $7::int8[])",
            &[&self.account, &self.at, &self.version, &self.debits, &self.credits, &self.seq, &self.leg],
        )
        .await?;
        Ok(())
    }
}

async fn write_changes(
    tx: &Transaction<'_>,
    book: &Book,
    changes: &Changes,
    nos: &HashMap<String, i64>,
    now_ms: i64,
) -> Result<(), Fail> {
    let deferred = |a: &AccountId| book.account(a).is_some_and(|s| s.deferred);
    let mut e = EntryCols::default();
    let mut p = PostingCols::default();
    let mut h = HistoryCols::default();
    let (mut hold_id, mut hold_seq, mut hold_exp) = (Vec::new(), Vec::new(), Vec::new());
    // Entries in id order: two batches inserting the same ids wait for each other in the same
    // order instead of deadlocking.
    let mut new_entries: Vec<_> = changes.entries.iter().collect();
    new_entries.sort_by(|a, b| a.entry.id().cmp(b.entry.id()));
    for ne in new_entries {
        let en = &ne.entry;
        e.seq.push(ne.seq);
        e.id.push(en.id().to_string());
        e.code.push(en.code().as_str());
        e.phase.push(en.phase().as_str());
        e.currency.push(en.currency().map(|c| c.code().to_string()));
        e.reference.push(en.reference().map(str::to_string));
        e.pending_id.push(en.pending_id().map(|x| x.to_string()));
        e.timeout_ms.push(en.timeout_ms());
        e.hash.push(ne.hash.to_hex());
        e.at.push(ne.posted_at_ms);
        if let Some(exp) = ne.expires_at_ms {
            hold_id.push(en.id().to_string());
            hold_seq.push(ne.seq);
            hold_exp.push(exp);
        }
        for r in &ne.postings {
            let account = r.account.to_string();
            let linked = !deferred(&r.account);
            p.seq.push(r.at.entry_seq);
            p.leg.push(r.at.leg);
            p.side.push(r.side.as_str());
            p.amount.push(r.amount_minor);
            p.pending.push(i64::from(r.pending));
            p.at.push(r.posted_at_ms);
            p.version.push(linked.then_some(r.account_version));
            p.debits_after.push(linked.then_some(r.debits_posted_after));
            p.credits_after
                .push(linked.then_some(r.credits_posted_after));
            p.prev_seq
                .push(r.prev.filter(|_| linked).map(|x| x.entry_seq));
            p.prev_leg.push(r.prev.filter(|_| linked).map(|x| x.leg));
            if linked && is_checkpoint(r.account_version) {
                h.account.push(account.clone());
                h.at.push(r.posted_at_ms);
                h.version.push(r.account_version);
                h.debits.push(r.debits_posted_after);
                h.credits.push(r.credits_posted_after);
                h.seq.push(Some(r.at.entry_seq));
                h.leg.push(Some(r.at.leg));
            }
            p.account.push(account);
        }
    }
    if !e.id.is_empty() {
        let inserted = execute(
            tx,
            "INSERT INTO ledger_entries (seq, id, code, phase, currency, reference, pending_id, timeout_ms, \
             body_hash, posted_at_ms) SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::text[], $8::int8[], $9::text[], $10::int8[]) ON CONFLICT (id) DO NOTHING",
            &[&e.seq, &e.id, &e.code, &e.phase, &e.currency, &e.reference, &e.pending_id, &e.timeout_ms, &e.hash, &e.at],
        )
        .await?;
        if inserted != e.id.len() as u64 {
            return Err(Fail::Retry(
                "an entry id was taken by a concurrent batch".into(),
            ));
        }
    }
    if !p.seq.is_empty() {
        execute(
            tx,
            "INSERT INTO ledger_postings (entry_seq, leg, account_id, side, amount_minor, pending, posted_at_ms, \
             account_version, debits_posted_after, credits_posted_after, prev_entry_seq, prev_leg) \
             SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], $5::int8[], $6::int8[], \
             $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[])",
            &[&p.seq, &p.leg, &p.account, &p.side, &p.amount, &p.pending, &p.at, &p.version, &p.debits_after,
              &p.credits_after, &p.prev_seq, &p.prev_leg],
        )
        .await?;
    }
    h.insert(tx).await?;
    if !hold_id.is_empty() {
        execute(
            tx,
            "INSERT INTO ledger_holds (entry_id, entry_seq, expires_at_ms, state) \
             SELECT u.id, u.seq, u.exp, 'pending' FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS u(id, seq, exp)",
            &[&hold_id, &hold_seq, &hold_exp],
        )
        .await?;
    }
    if !changes.holds.is_empty() {
        let ids: Vec<String> = changes
            .holds
            .iter()
            .map(|c| c.pending_id.to_string())
            .collect();
        let states: Vec<&str> = changes.holds.iter().map(|c| c.state.as_str()).collect();
        let by: Vec<Option<String>> = changes
            .holds
            .iter()
            .map(|c| c.resolved_by.as_ref().map(|r| r.to_string()))
            .collect();
        execute(
            tx,
            "UPDATE ledger_holds h SET state = u.state, resolved_by = u.by \
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS u(id, state, by) \
             WHERE h.entry_id = u.id AND h.state = 'pending'",
            &[&ids, &states, &by],
        )
        .await?;
    }
    let mut locked = BalanceCols::default();
    let mut locked_nos = Vec::new();
    let (mut version, mut last_at, mut last_seq, mut last_leg) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut deltas = BalanceCols::default();
    for id in &changes.accounts {
        let Some(s) = book.account(id) else {
            return Err(corrupt(format!("changed account {id} not in the book")).into());
        };
        if s.deferred {
            if s.balance != Balance::ZERO {
                deltas.push(id.to_string(), s.balance);
            }
            continue;
        }
        locked_nos.push(
            *nos.get(id.as_str())
                .ok_or_else(|| corrupt(format!("changed account {id} was not loaded")))?,
        );
        locked.push(id.to_string(), s.balance);
        version.push(s.version);
        last_at.push(s.last_posted_at_ms);
        last_seq.push(s.last_posting.map(|r| r.entry_seq));
        last_leg.push(s.last_posting.map(|r| r.leg));
    }
    if !locked.id.is_empty() {
        execute(
            tx,
            "UPDATE ledger_balances b SET debits_pending = u.dp, debits_posted = u.dpo, credits_pending = u.cp, \
             credits_posted = u.cpo, version = u.v, last_posted_at_ms = u.t, last_entry_seq = u.s, last_leg = u.l \
             FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[], \
             $8::int8[], $9::int8[]) AS u(no, dp, dpo, cp, cpo, v, t, s, l) WHERE b.account_no = u.no",
            &[&locked_nos, &locked.dp, &locked.dpo, &locked.cp, &locked.cpo, &version, &last_at, &last_seq, &last_leg],
        )
        .await?;
    }
    if !deltas.id.is_empty() {
        let at = vec![now_ms; deltas.id.len()];
        execute(
            tx,
            "INSERT INTO ledger_buffered (account_id, debits_pending, debits_posted, credits_pending, credits_posted, \
             created_at_ms) SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[])",
            &[&deltas.id, &deltas.dp, &deltas.dpo, &deltas.cp, &deltas.cpo, &at],
        )
        .await?;
    }
    Ok(())
}

async fn expire_in(tx: &Transaction<'_>, now_ms: i64, limit: u32) -> Result<Vec<EntryId>, Fail> {
    plan_per_execution(tx).await?;
    let limit = i64::from(limit.min(EXPIRE_BATCH_MAX));
    // SKIP LOCKED: a hold being posted or voided right now is that batch's business.
    let ids: Vec<String> = query(
        tx,
        "SELECT entry_id FROM ledger_holds WHERE state = 'pending' AND expires_at_ms <= $1 \
         ORDER BY entry_id LIMIT $2 FOR UPDATE SKIP LOCKED",
        &[&now_ms, &limit],
    )
    .await?
    .iter()
    .map(|r| get(r, 0))
    .collect::<Result<_>>()?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut book = Book::default();
    let mut owned = Vec::new();
    for (id, hold) in lock_holds(tx, &ids).await? {
        owned.extend(hold.legs.iter().map(|(a, ..)| a.clone()));
        book.put_hold(id, hold);
    }
    let accounts: BTreeSet<&AccountId> = owned.iter().collect();
    let nos = load_accounts(tx, &mut book, &accounts).await?;
    let expired = book.expire_due(now_ms, ids.len()).map_err(corrupt)?;
    let changes = book.take_changes();
    write_changes(tx, &book, &changes, &nos, now_ms).await?;
    Ok(expired)
}

async fn flush_in(tx: &Transaction<'_>, now_ms: i64, limit: u32) -> Result<FlushReport, Fail> {
    plan_per_execution(tx).await?;
    execute(tx, "SELECT pg_advisory_xact_lock($1)", &[&FLUSH_LOCK]).await?;
    let limit = i64::from(limit.min(FLUSH_BATCH_MAX));
    let rows = query(
        tx,
        "DELETE FROM ledger_buffered WHERE seq IN (SELECT seq FROM ledger_buffered ORDER BY seq LIMIT $1) \
         RETURNING account_id, debits_pending, debits_posted, credits_pending, credits_posted",
        &[&limit],
    )
    .await?;
    let mut sums: BTreeMap<String, Balance> = BTreeMap::new();
    for r in &rows {
        let id: String = get(r, 0)?;
        let d = Balance {
            debits_pending: get(r, 1)?,
            debits_posted: get(r, 2)?,
            credits_pending: get(r, 3)?,
            credits_posted: get(r, 4)?,
        };
        let s = sums.entry(id.clone()).or_default();
        *s = s
            .checked_add(d)
            .ok_or_else(|| corrupt(format!("buffered counters of {id} overflow")))?;
    }
    if sums.is_empty() {
        return Ok(FlushReport::default());
    }
    let keys: Vec<String> = sums.keys().cloned().collect();
    let current = query(
        tx,
        "SELECT a.id, b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted, b.version, \
         b.last_posted_at_ms, b.account_no FROM ledger_accounts a JOIN ledger_balances b ON b.account_no = a.account_no \
         WHERE a.id = ANY($1) ORDER BY a.id FOR UPDATE OF b",
        &[&keys],
    )
    .await?;
    let mut cols = BalanceCols::default();
    let (mut versions, mut times, mut flushed_nos) = (Vec::new(), Vec::new(), Vec::new());
    let mut h = HistoryCols::default();
    for r in &current {
        let id: String = get(r, 0)?;
        let stored = Balance {
            debits_pending: get(r, 1)?,
            debits_posted: get(r, 2)?,
            credits_pending: get(r, 3)?,
            credits_posted: get(r, 4)?,
        };
        let delta = sums.remove(&id).unwrap_or_default();
        let b = stored
            .checked_add(delta)
            .ok_or_else(|| corrupt(format!("counters of {id} overflow")))?;
        let version = get::<i64>(r, 5)?
            .checked_add(1)
            .ok_or_else(|| corrupt(format!("version of {id}")))?;
        let at = now_ms.max(get(r, 6)?);
        // A buffered account's history is kept at flush times.
        h.account.push(id.clone());
        h.at.push(at);
        h.version.push(version);
        h.debits.push(b.debits_posted);
        h.credits.push(b.credits_posted);
        h.seq.push(None);
        h.leg.push(None);
        flushed_nos.push(get::<i64>(r, 7)?);
        cols.push(id, b);
        versions.push(version);
        times.push(at);
    }
    if let Some(id) = sums.keys().next() {
        return Err(corrupt(format!("buffered deltas for a missing account {id}")).into());
    }
    execute(
        tx,
        "UPDATE ledger_balances b SET debits_pending = u.dp, debits_posted = u.dpo, credits_pending = u.cp, \
         credits_posted = u.cpo, version = u.v, last_posted_at_ms = u.t \
         FROM UNNEST($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[], $6::int8[], $7::int8[]) \
         AS u(no, dp, dpo, cp, cpo, v, t) WHERE b.account_no = u.no",
        &[&flushed_nos, &cols.dp, &cols.dpo, &cols.cp, &cols.cpo, &versions, &times],
    )
    .await?;
    h.insert(tx).await?;
    Ok(FlushReport {
        deltas: rows.len() as u64,
        accounts: cols.id.len() as u64,
    })
}

/// Runs `$body` (a future using transaction `$tx`) in a fresh transaction and commits it,
/// retrying a lost race up to [`POST_ATTEMPTS_MAX`] times. (A macro: a closure returning a
/// future that borrows its argument cannot be named on stable Rust without boxing gymnastics.)
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:expr) => {{
        let mut last = String::new();
        let mut result = None;
        for _ in 0..POST_ATTEMPTS_MAX {
            let mut client = $store.client().await?;
            let $tx = client.transaction().await.map_err(pg_err)?;
            match $body.await {
                Ok(v) => match $tx.commit().await {
                    Ok(()) => {
                        result = Some(v);
                        break;
                    }
                    Err(e) => match pg(e) {
                        Fail::Retry(m) => last = m,
                        Fail::Store(e) => return Err(e),
                    },
                },
                Err(Fail::Retry(m)) => {
                    last = m;
                    let _ = $tx.rollback().await;
                }
                Err(Fail::Store(e)) => {
                    let _ = $tx.rollback().await;
                    return Err(e);
                }
            }
        }
        result.ok_or_else(|| {
            StoreError::Database(format!(
                "ledger write lost {POST_ATTEMPTS_MAX} races in a row; last: {last}"
            ))
        })
    }};
}

#[async_trait]
impl LedgerStore for PgStore {
    fn ledger_backend(&self) -> &'static str {
        "postgres"
    }

    async fn open_accounts(&self, specs: &[AccountSpec], now_ms: i64) -> Result<Vec<OpenOutcome>> {
        in_tx!(self, |tx| open_in(&tx, specs, now_ms))
    }

    async fn post_entries(&self, entries: &[Entry], now_ms: i64) -> Result<Vec<PostOutcome>> {
        check_batch(entries.len())?;
        in_tx!(self, |tx| post_in(&tx, entries, now_ms))
    }

    async fn expire_holds(&self, now_ms: i64, limit: u32) -> Result<Vec<EntryId>> {
        in_tx!(self, |tx| expire_in(&tx, now_ms, limit))
    }

    async fn flush_buffered(&self, now_ms: i64, limit: u32) -> Result<FlushReport> {
        in_tx!(self, |tx| flush_in(&tx, now_ms, limit))
    }

    async fn get_account(&self, id: &AccountId) -> Result<Option<AccountRecord>> {
        let c = self.client().await?;
        let key = id.to_string();
        // One statement, so the row and the unflushed deltas come from one snapshot: a flush
        // moving deltas into the row between two reads would otherwise be counted twice or not
        // at all.
        let rows = query(
            &c,
            "SELECT a.flags, n.debits_pending, n.debits_posted, n.credits_pending, n.credits_posted, \
             n.version, n.last_posted_at_ms, a.created_at_ms, \
             CAST(COALESCE(SUM(b.debits_pending), 0) AS BIGINT), CAST(COALESCE(SUM(b.debits_posted), 0) AS BIGINT), \
             CAST(COALESCE(SUM(b.credits_pending), 0) AS BIGINT), CAST(COALESCE(SUM(b.credits_posted), 0) AS BIGINT) \
             FROM ledger_accounts a JOIN ledger_balances n ON n.account_no = a.account_no \
             LEFT JOIN ledger_buffered b ON b.account_id = a.id \
             WHERE a.id = $1 GROUP BY a.id, n.account_no",
            &[&key],
        )
        .await
        .map_err(into_store)?;
        let Some(r) = rows.first() else {
            return Ok(None);
        };
        let flags = parse_flags(get(r, 0)?)?;
        let buffered = Balance {
            debits_pending: get(r, 8)?,
            debits_posted: get(r, 9)?,
            credits_pending: get(r, 10)?,
            credits_posted: get(r, 11)?,
        };
        Ok(Some(AccountRecord {
            id: id.clone(),
            flags,
            balance: Balance {
                debits_pending: get(r, 1)?,
                debits_posted: get(r, 2)?,
                credits_pending: get(r, 3)?,
                credits_posted: get(r, 4)?,
            },
            buffered,
            version: get(r, 5)?,
            last_posted_at_ms: get(r, 6)?,
            created_at_ms: get(r, 7)?,
        }))
    }

    async fn balance_at(&self, id: &AccountId, at_ms: i64) -> Result<Option<Balance>> {
        let c = self.client().await?;
        balance_at_in(&c, id, at_ms).await.map_err(into_store)
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<EntryRecord>> {
        let c = self.client().await?;
        get_entry_in(&c, id).await.map_err(into_store)
    }

    async fn trial_balance(&self) -> Result<Vec<TrialBalanceRow>> {
        let c = self.client().await?;
        let rows = query(&c, TRIAL_BALANCE_SQL, &[])
            .await
            .map_err(into_store)?;
        rows.iter()
            .map(|r| trial_row(get(r, 0)?, get(r, 1)?, get(r, 2)?, get(r, 3)?, get(r, 4)?))
            .collect()
    }

    async fn check_ledger(&self) -> Result<LedgerCheck> {
        let mut c = self.client().await?;
        // One snapshot for all four scans, so concurrent posting cannot make them disagree.
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(pg_err)?;
        let counts = query(&tx, CHECK_COUNTS_SQL, &[])
            .await
            .map_err(into_store)?;
        let counts = counts.first().ok_or_else(|| corrupt("no count row"))?;
        let counts = (get(counts, 0)?, get(counts, 1)?);
        let mut accounts = Vec::new();
        for r in query(&tx, CHECK_ACCOUNTS_SQL, &[])
            .await
            .map_err(into_store)?
        {
            accounts.push((
                get(&r, 0)?,
                get(&r, 1)?,
                Balance {
                    debits_pending: get(&r, 2)?,
                    debits_posted: get(&r, 3)?,
                    credits_pending: get(&r, 4)?,
                    credits_posted: get(&r, 5)?,
                },
            ));
        }
        let mut postings = Vec::new();
        for r in query(&tx, CHECK_POSTINGS_SQL, &[])
            .await
            .map_err(into_store)?
        {
            postings.push((
                get(&r, 0)?,
                get(&r, 1)?,
                get(&r, 2)?,
                get(&r, 3)?,
                get(&r, 4)?,
            ));
        }
        let mut buffered = Vec::new();
        for r in query(&tx, CHECK_BUFFERED_SQL, &[])
            .await
            .map_err(into_store)?
        {
            buffered.push((
                get(&r, 0)?,
                Balance {
                    debits_pending: get(&r, 1)?,
                    debits_posted: get(&r, 2)?,
                    credits_pending: get(&r, 3)?,
                    credits_posted: get(&r, 4)?,
                },
                get(&r, 5)?,
            ));
        }
        tx.commit().await.map_err(pg_err)?;
        evaluate_check(counts, accounts, postings, buffered)
    }
}

async fn balance_at_in<C: GenericClient>(
    c: &C,
    id: &AccountId,
    at_ms: i64,
) -> Result<Option<Balance>, Fail> {
    let key = id.to_string();
    let rows = query(
        c,
        "SELECT b.last_entry_seq, b.last_leg FROM ledger_accounts a \
         JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id = $1",
        &[&key],
    )
    .await?;
    let Some(acct) = rows.first() else {
        return Ok(None);
    };
    let last: Option<(i64, i64)> = get::<Option<i64>>(acct, 0)?.zip(get::<Option<i64>>(acct, 1)?);
    let posted = |debits_posted, credits_posted| Balance {
        debits_posted,
        credits_posted,
        ..Balance::ZERO
    };
    let before = query(
        c,
        "SELECT debits_posted, credits_posted, entry_seq FROM ledger_balance_history \
         WHERE account_id = $1 AND posted_at_ms <= $2 ORDER BY posted_at_ms DESC, account_version DESC LIMIT 1",
        &[&key, &at_ms],
    )
    .await?;
    if let Some(r) = before.first() {
        if get::<Option<i64>>(r, 2)?.is_none() {
            // A flush checkpoint of a buffered account: its history is kept at flush times.
            return Ok(Some(posted(get(r, 0)?, get(r, 1)?)));
        }
    }
    let after = query(
        c,
        "SELECT entry_seq, leg FROM ledger_balance_history \
         WHERE account_id = $1 AND posted_at_ms > $2 ORDER BY posted_at_ms, account_version LIMIT 1",
        &[&key, &at_ms],
    )
    .await?;
    let mut cur = match after.first() {
        Some(r) => get::<Option<i64>>(r, 0)?
            .zip(get::<Option<i64>>(r, 1)?)
            .or(last),
        None => last,
    };
    for _ in 0..=HISTORY_CHECKPOINT_EVERY {
        let Some((seq, leg)) = cur else {
            return Ok(Some(Balance::ZERO));
        };
        let rows = query(
            c,
            "SELECT posted_at_ms, debits_posted_after, credits_posted_after, prev_entry_seq, prev_leg \
             FROM ledger_postings WHERE entry_seq = $1 AND leg = $2",
            &[&seq, &leg],
        )
        .await?;
        let r = rows
            .first()
            .ok_or_else(|| corrupt(format!("posting {seq}/{leg} of {id} is missing")))?;
        if get::<i64>(r, 0)? <= at_ms {
            return match (get::<Option<i64>>(r, 1)?, get::<Option<i64>>(r, 2)?) {
                (Some(d), Some(c)) => Ok(Some(posted(d, c))),
                _ => Err(corrupt(format!("posting {seq}/{leg} of {id} has no history")).into()),
            };
        }
        cur = get::<Option<i64>>(r, 3)?.zip(get::<Option<i64>>(r, 4)?);
    }
    Err(corrupt(format!(
        "history of {id} is longer than {HISTORY_CHECKPOINT_EVERY} postings between checkpoints"
    ))
    .into())
}

async fn get_entry_in<C: GenericClient>(c: &C, id: &EntryId) -> Result<Option<EntryRecord>, Fail> {
    let rows = query(
        c,
        "SELECT seq, code, phase, currency, reference, pending_id, timeout_ms, body_hash, posted_at_ms \
         FROM ledger_entries WHERE id = $1",
        &[&id.as_str()],
    )
    .await?;
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    let seq: i64 = get(r, 0)?;
    let mut postings = Vec::new();
    for p in query(
        c,
        "SELECT leg, account_id, side, amount_minor, pending, posted_at_ms, account_version \
         FROM ledger_postings WHERE entry_seq = $1 ORDER BY leg",
        &[&seq],
    )
    .await?
    {
        postings.push(PostingRow {
            leg: get(&p, 0)?,
            account: parse_account(get(&p, 1)?)?,
            side: parse_side(get(&p, 2)?)?,
            amount_minor: get(&p, 3)?,
            pending: get::<i64>(&p, 4)? != 0,
            posted_at_ms: get(&p, 5)?,
            account_version: get(&p, 6)?,
        });
    }
    let holds = query(
        c,
        "SELECT expires_at_ms, state, resolved_by FROM ledger_holds WHERE entry_id = $1",
        &[&id.as_str()],
    )
    .await?;
    let hold = match holds.first() {
        Some(h) => Some(HoldRecord {
            expires_at_ms: get(h, 0)?,
            state: parse_hold_state(get(h, 1)?)?,
            resolved_by: get::<Option<&str>>(h, 2)?.map(parse_entry_id).transpose()?,
        }),
        None => None,
    };
    Ok(Some(EntryRecord {
        seq,
        id: id.clone(),
        code: get(r, 1)?,
        phase: get(r, 2)?,
        currency: get(r, 3)?,
        reference: get(r, 4)?,
        pending_id: get::<Option<&str>>(r, 5)?.map(parse_entry_id).transpose()?,
        timeout_ms: get(r, 6)?,
        body_hash: get(r, 7)?,
        posted_at_ms: get(r, 8)?,
        postings,
        hold,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use payrail_domain::ledger::{EntryCode, Posting};
    use payrail_domain::{Currency, Money};

    fn transfer(id: &str, from: &AccountId, to: &AccountId, minor: i64) -> Entry {
        Entry::posted(
            EntryId::parse(id).unwrap(),
            EntryCode::Transfer,
            None,
            vec![
                Posting::debit(from.clone(), Money::new(minor, Currency::CNY)),
                Posting::credit(to.clone(), Money::new(minor, Currency::CNY)),
            ],
        )
        .unwrap()
    }

    /// Phase 2 posts a payment's entry in the transaction that changes its status: both
    /// commit, or neither does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postings_commit_with_the_callers_transaction_or_not_at_all() {
        let Ok(server) = std::env::var("PAYRAIL_TEST_POSTGRES_URL") else {
            println!("skipped: PAYRAIL_TEST_POSTGRES_URL is not set");
            return;
        };
        let (admin, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let db = format!("payrail_ledger_unit_{}", std::process::id());
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        let store = PgStore::connect(&format!("{base}/{db}")).await.unwrap();
        let f = AccountId::funding(Currency::CNY);
        let w = AccountId::wallet(
            payrail_domain::MerchantId::generate(1, [7; 10]),
            "w",
            Currency::CNY,
        )
        .unwrap();
        let mut c = store.client().await.unwrap();
        {
            let tx = c.transaction().await.unwrap();
            open_accounts_in_tx(
                &tx,
                &[
                    AccountSpec::default_for(f.clone()),
                    AccountSpec::default_for(w.clone()),
                ],
                0,
            )
            .await
            .unwrap();
            tx.execute(
                "INSERT INTO settings (name, value) VALUES ('committed', 'v')",
                &[],
            )
            .await
            .unwrap();
            let out = post_entries_in_tx(&tx, &[transfer("e1", &f, &w, 10)], 1)
                .await
                .unwrap();
            assert!(matches!(out[0], PostOutcome::Posted(_)));
            tx.commit().await.unwrap();
        }
        {
            let tx = c.transaction().await.unwrap();
            let out = post_entries_in_tx(&tx, &[transfer("e2", &f, &w, 20)], 2)
                .await
                .unwrap();
            assert!(matches!(out[0], PostOutcome::Posted(_)));
            tx.execute(
                "INSERT INTO settings (name, value) VALUES ('rolled back', 'v')",
                &[],
            )
            .await
            .unwrap();
            tx.rollback().await.unwrap();
        }
        drop(c);
        use crate::Store;
        assert!(store.get_setting("committed").await.unwrap().is_some());
        assert!(store.get_setting("rolled back").await.unwrap().is_none());
        assert!(store
            .get_entry(&EntryId::parse("e2").unwrap())
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            store
                .get_account(&w)
                .await
                .unwrap()
                .unwrap()
                .posted_net()
                .unwrap(),
            10
        );
        assert!(store.check_ledger().await.unwrap().ok());
        drop(store);
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    }
}
