//! The ledger on SQLite.
//!
//! Every write runs on the store's single writer thread, inside its group-commit batch
//! transaction, so there are no locks to order and no concurrent writer to race: a batch of
//! entries is one write closure that loads what it needs, posts through a [`Book`] in memory,
//! and writes the changes with cached prepared statements — every touched account row once per
//! batch, however many postings it got (hot accounts included).
//!
//! [`post_entries_in_tx`] is the same, for a caller that already holds the writer's connection
//! inside a write (e.g. a payment status change that must commit with its postings).

use crate::ledger::*;
use crate::sqlite::{db_err, SqliteStore};
use crate::{Result, StoreError};
use async_trait::async_trait;
use payrail_domain::ledger::{
    AccountId, AccountState, Balance, BodyHash, Book, Changes, Entry, EntryId, Hold, PostOutcome,
    PostingRef, StoredEntry,
};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{BTreeSet, HashMap};

fn exec(c: &Connection, sql: &str) -> Result<()> {
    c.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map_err(db_err)?;
    Ok(())
}

/// Posts `entries` in order inside the caller's transaction, which must be the SQLite writer's
/// (pass the `&Connection` a `SqliteStore` write closure receives). Runs in a savepoint of its
/// own: on `Err` nothing of it remains, and the caller decides about the rest of its
/// transaction. A refused entry (`PostOutcome::Rejected`) writes nothing; the others are
/// written. Nothing is durable before the caller's transaction commits.
pub fn post_entries_in_tx(
    conn: &Connection,
    entries: &[Entry],
    now_ms: i64,
) -> Result<Vec<PostOutcome>> {
    check_batch(entries.len())?;
    exec(conn, "SAVEPOINT ledger_post")?;
    let result = match post_once(conn, entries, now_ms, false) {
        Ok(Some(out)) => Ok(out),
        // An entry id was taken: a replay. Undo and post again knowing the stored entries.
        Ok(None) => crate::sqlite::rollback_to(conn, "ledger_post").and_then(|()| {
            post_once(conn, entries, now_ms, true)?
                .ok_or_else(|| corrupt("entry id taken although loaded as absent"))
        }),
        Err(e) => Err(e),
    };
    match result {
        Ok(out) => {
            exec(conn, "RELEASE ledger_post")?;
            Ok(out)
        }
        Err(e) => {
            let _ = crate::sqlite::rollback_to(conn, "ledger_post");
            let _ = exec(conn, "RELEASE ledger_post");
            Err(e)
        }
    }
}

/// Opens accounts inside the caller's write transaction (see [`post_entries_in_tx`]).
pub fn open_accounts_in_tx(
    conn: &Connection,
    specs: &[AccountSpec],
    now_ms: i64,
) -> Result<Vec<OpenOutcome>> {
    if specs.len() > OPEN_BATCH_MAX {
        return Err(StoreError::Config(format!(
            "{} accounts in one call; at most {OPEN_BATCH_MAX}",
            specs.len()
        )));
    }
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let id = spec.id.to_string();
        let flags = i64::from(spec.flags.bits());
        // The single writer numbers accounts: no other transaction can take the number.
        let inserted = conn
            .prepare_cached(
                "INSERT INTO ledger_accounts (id, account_no, kind, currency, flags, created_at_ms) \
                 VALUES (?1, (SELECT COALESCE(MAX(account_no), 0) + 1 FROM ledger_balances), ?2, ?3, ?4, ?5) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    spec.id.kind().as_str(),
                    spec.id.currency().code(),
                    flags,
                    now_ms
                ])
            })
            .map_err(db_err)?;
        if inserted == 1 {
            conn.prepare_cached(
                "INSERT INTO ledger_balances (account_no, flags, debits_pending, debits_posted, credits_pending, \
                 credits_posted, version, last_posted_at_ms) \
                 VALUES ((SELECT account_no FROM ledger_accounts WHERE id = ?1), ?2, 0, 0, 0, 0, 0, 0)",
            )
            .and_then(|mut s| s.execute(params![id, flags]))
            .map_err(db_err)?;
            out.push(OpenOutcome::Opened);
            continue;
        }
        let bits: i64 = conn
            .prepare_cached("SELECT flags FROM ledger_accounts WHERE id = ?1")
            .and_then(|mut s| s.query_row([&id], |r| r.get(0)))
            .map_err(db_err)?;
        let existing = parse_flags(bits)?;
        out.push(if existing == spec.flags {
            OpenOutcome::AlreadyOpen
        } else {
            OpenOutcome::FlagsDiffer { existing }
        });
    }
    Ok(out)
}

/// One attempt at posting a batch. `Ok(None)`: an entry id turned out to be taken (only when
/// `load_stored` is false, i.e. on the optimistic first attempt).
/// Accounts one cache keeps at most (~100 bytes each); past it the cache starts over.
const ACCOUNT_CACHE_MAX: usize = 200_000;

/// The account states the writer thread posted last, kept between batches so a batch does not
/// load them again: loading 200 accounts was 20 % of the writer's time per batch of 100
/// transfers (`perf`, docs/BENCHMARKS.md). The writer is the only thread that changes account
/// rows, but not the only changer of the database: another process may post, and a write
/// closure (or a whole batch) may roll back after posting through the cache. Both move the
/// ledger's highest entry number away from the one the cache recorded after its last post, and
/// every post compares the two first, dropping the cache on any difference. Expiring holds
/// changes balances without an entry, so it drops the cache itself.
struct AccountCache {
    /// The database file the states belong to.
    path: String,
    /// `MAX(seq)` of `ledger_entries` right after the states were stored.
    seq: i64,
    accounts: HashMap<String, (AccountState, i64)>,
}

thread_local! {
    static ACCOUNT_CACHE: std::cell::RefCell<Option<AccountCache>> =
        const { std::cell::RefCell::new(None) };
}

fn max_entry_seq(conn: &Connection) -> Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM ledger_entries")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(db_err)
}

/// Forgets the cached account states; the writer calls it whenever it rolls back writes (a
/// closure's savepoint, a failed batch), so a cache of rolled-back states can never look valid.
pub(crate) fn drop_account_cache() {
    ACCOUNT_CACHE.with(|c| *c.borrow_mut() = None);
}

/// Moves the cached states of `ids` into `book` (if the cache is still valid for this database
/// at `max_seq`); returns their account numbers and the ids not cached.
fn cached_accounts<'a>(
    conn: &Connection,
    max_seq: i64,
    book: &mut Book,
    ids: &BTreeSet<&'a AccountId>,
) -> (HashMap<String, i64>, BTreeSet<&'a AccountId>) {
    let path = conn.path().unwrap_or("");
    ACCOUNT_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref()
            .is_some_and(|c| c.path != path || c.seq != max_seq)
        {
            *c = None;
        }
        let mut nos = HashMap::with_capacity(ids.len());
        let mut missing = BTreeSet::new();
        for id in ids {
            match c.as_ref().and_then(|c| c.accounts.get(id.as_str())) {
                Some((state, no)) => {
                    book.put_account((*id).clone(), state.clone());
                    nos.insert(id.as_str().to_string(), *no);
                }
                None => {
                    missing.insert(*id);
                }
            }
        }
        (nos, missing)
    })
}

/// Records the states of the accounts a post loaded, as its book left them, valid at `seq`.
fn store_accounts(conn: &Connection, seq: i64, book: &Book, nos: &HashMap<String, i64>) {
    let path = conn.path().unwrap_or("").to_string();
    ACCOUNT_CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let cache = c.get_or_insert_with(|| AccountCache {
            path: path.clone(),
            seq,
            accounts: HashMap::new(),
        });
        if cache.path != path || cache.accounts.len() > ACCOUNT_CACHE_MAX {
            cache.accounts.clear();
            cache.path = path;
        }
        cache.seq = seq;
        for (id, state) in book.accounts() {
            if let Some(no) = nos.get(id.as_str()) {
                cache
                    .accounts
                    .insert(id.as_str().to_string(), (state.clone(), *no));
            }
        }
    });
}

fn post_once(
    conn: &Connection,
    entries: &[Entry],
    now_ms: i64,
    load_stored: bool,
) -> Result<Option<Vec<PostOutcome>>> {
    let max_seq = max_entry_seq(conn)?;
    let first = max_seq
        .checked_add(1)
        .ok_or_else(|| corrupt("entry sequence exhausted"))?;
    let mut book = Book::new(first);
    let mut hold_accounts = Vec::new();
    for pending_id in pending_ids(entries) {
        if let Some(hold) = load_hold(conn, &pending_id)? {
            hold_accounts.extend(hold.legs.iter().map(|(a, ..)| a.clone()));
            book.put_hold(pending_id, hold);
        }
    }
    let mut accounts = own_accounts(entries);
    accounts.extend(hold_accounts.iter());
    let (mut nos, missing) = cached_accounts(conn, max_seq, &mut book, &accounts);
    nos.extend(load_accounts(conn, &mut book, &missing)?);
    if load_stored {
        for e in entries {
            if let Some(stored) = load_stored_entry(conn, e.id())? {
                book.put_stored(e.id().clone(), stored);
            }
        }
    }
    let mut outcomes = Vec::with_capacity(entries.len());
    for e in entries {
        outcomes.push(book.post(e, now_ms).map_err(corrupt)?);
    }
    let changes = book.take_changes();
    if !write_changes(conn, &book, &changes, &nos)? {
        drop_account_cache();
        return Ok(None);
    }
    store_accounts(conn, max_entry_seq(conn)?, &book, &nos);
    Ok(Some(outcomes))
}

/// Chunk sizes of the multi-row statements, largest first: a batch of n rows runs as few
/// statements as these sizes allow, and each size is one cached prepared statement. One
/// multi-row statement instead of one per row saved ~30 % of the writer's CPU per transfer
/// (docs/BENCHMARKS.md, "Ledger").
const CHUNKS: [usize; 4] = [64, 16, 4, 1];

/// Splits `n` rows into chunk sizes from [`CHUNKS`].
fn chunks(mut n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for size in CHUNKS {
        while n >= size {
            out.push(size);
            n -= size;
        }
    }
    out
}

/// `(?, ?, …), (…)`: `rows` groups of `cols` placeholders.
fn value_groups(rows: usize, cols: usize) -> String {
    let one = format!("({})", vec!["?"; cols].join(", "));
    vec![one; rows].join(", ")
}

/// Loads the accounts into the book; returns each one's `account_no`.
fn load_accounts(
    conn: &Connection,
    book: &mut Book,
    ids: &BTreeSet<&AccountId>,
) -> Result<HashMap<String, i64>> {
    let keys: Vec<&str> = ids.iter().map(|a| a.as_str()).collect();
    let mut nos = HashMap::with_capacity(keys.len());
    let mut done = 0;
    for size in chunks(keys.len()) {
        let part = &keys[done..done + size];
        done += size;
        let mut s = conn
            .prepare_cached(&format!(
                "SELECT a.id, b.flags, b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted, \
                 b.version, b.last_posted_at_ms, b.last_entry_seq, b.last_leg, b.account_no \
                 FROM ledger_accounts a JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id IN ({})",
                vec!["?"; size].join(", ")
            ))
            .map_err(db_err)?;
        let mut rows = s
            .query(rusqlite::params_from_iter(part.iter()))
            .map_err(db_err)?;
        // A missing account stays out of the book, which refuses entries naming it.
        while let Some(r) = rows.next().map_err(db_err)? {
            let id: String = r.get(0).map_err(db_err)?;
            let seq: Option<i64> = r.get(8).map_err(db_err)?;
            let leg: Option<i64> = r.get(9).map_err(db_err)?;
            let account = parse_account(&id)?;
            nos.insert(id, r.get(10).map_err(db_err)?);
            book.put_account(
                account,
                AccountState {
                    flags: parse_flags(r.get(1).map_err(db_err)?)?,
                    balance: Balance {
                        debits_pending: r.get(2).map_err(db_err)?,
                        debits_posted: r.get(3).map_err(db_err)?,
                        credits_pending: r.get(4).map_err(db_err)?,
                        credits_posted: r.get(5).map_err(db_err)?,
                    },
                    version: r.get(6).map_err(db_err)?,
                    last_posted_at_ms: r.get(7).map_err(db_err)?,
                    last_posting: seq
                        .zip(leg)
                        .map(|(entry_seq, leg)| PostingRef { entry_seq, leg }),
                    deferred: false,
                },
            );
        }
    }
    Ok(nos)
}

fn load_hold(conn: &Connection, pending_id: &EntryId) -> Result<Option<Hold>> {
    let row: Option<(i64, i64, String)> = conn
        .prepare_cached(
            "SELECT entry_seq, expires_at_ms, state FROM ledger_holds WHERE entry_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([pending_id.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
        })
        .map_err(db_err)?;
    let Some((seq, expires_at_ms, state)) = row else {
        return Ok(None);
    };
    let mut s = conn
        .prepare_cached(
            "SELECT account_id, side, amount_minor FROM ledger_postings WHERE entry_seq = ?1 AND pending = 1 ORDER BY leg",
        )
        .map_err(db_err)?;
    let rows = s
        .query_map([seq], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(db_err)?;
    let mut legs = Vec::new();
    for row in rows {
        let (account, side, amount) = row.map_err(db_err)?;
        legs.push((parse_account(&account)?, parse_side(&side)?, amount));
    }
    Ok(Some(Hold {
        seq,
        legs,
        expires_at_ms,
        state: parse_hold_state(&state)?,
    }))
}

fn load_stored_entry(conn: &Connection, id: &EntryId) -> Result<Option<StoredEntry>> {
    let row: Option<(i64, i64, String)> = conn
        .prepare_cached("SELECT seq, posted_at_ms, body_hash FROM ledger_entries WHERE id = ?1")
        .and_then(|mut s| {
            s.query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(db_err)?;
    row.map(|(seq, posted_at_ms, hash)| {
        Ok(StoredEntry {
            seq,
            posted_at_ms,
            hash: BodyHash::from_hex(&hash).ok_or_else(|| corrupt(format!("hash {hash}")))?,
        })
    })
    .transpose()
}

/// Runs `head VALUES (…), (…) tail` over `rows`, `cols` parameters per row, in chunks;
/// returns the number of rows the statements changed.
fn insert_chunked(
    conn: &Connection,
    head: &str,
    tail: &str,
    cols: usize,
    rows: &[Vec<rusqlite::types::ToSqlOutput<'_>>],
) -> Result<usize> {
    let mut changed = 0;
    let mut done = 0;
    for size in chunks(rows.len()) {
        let mut s = conn
            .prepare_cached(&format!(
                "{head} VALUES {} {tail}",
                value_groups(size, cols)
            ))
            .map_err(db_err)?;
        let params = rows[done..done + size].iter().flatten();
        changed += s
            .execute(rusqlite::params_from_iter(params))
            .map_err(db_err)?;
        done += size;
    }
    Ok(changed)
}

/// Writes a book's changes. `Ok(false)`: an entry id is already taken; the caller rolls back.
fn write_changes(
    conn: &Connection,
    book: &Book,
    changes: &Changes,
    nos: &HashMap<String, i64>,
) -> Result<bool> {
    use rusqlite::types::{ToSqlOutput, Value};
    fn int(v: i64) -> ToSqlOutput<'static> {
        ToSqlOutput::Owned(Value::Integer(v))
    }
    fn opt_int(v: Option<i64>) -> ToSqlOutput<'static> {
        ToSqlOutput::Owned(v.map_or(Value::Null, Value::Integer))
    }
    fn text(v: String) -> ToSqlOutput<'static> {
        ToSqlOutput::Owned(Value::Text(v))
    }
    fn opt_text(v: Option<String>) -> ToSqlOutput<'static> {
        ToSqlOutput::Owned(v.map_or(Value::Null, Value::Text))
    }
    fn borrowed(v: &str) -> ToSqlOutput<'_> {
        ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Text(v.as_bytes()))
    }
    let mut entries = Vec::with_capacity(changes.entries.len());
    let mut postings = Vec::with_capacity(changes.entries.len().saturating_mul(2));
    let mut history = Vec::new();
    let mut holds = Vec::new();
    for ne in &changes.entries {
        let e = &ne.entry;
        entries.push(vec![
            int(ne.seq),
            borrowed(e.id().as_str()),
            borrowed(e.code().as_str()),
            borrowed(e.phase().as_str()),
            opt_text(e.currency().map(|c| c.code().to_string())),
            opt_text(e.reference().map(str::to_string)),
            opt_text(e.pending_id().map(|p| p.to_string())),
            opt_int(e.timeout_ms()),
            text(ne.hash.to_hex()),
            int(ne.posted_at_ms),
        ]);
        for p in &ne.postings {
            if is_checkpoint(p.account_version) {
                history.push(vec![
                    borrowed(p.account.as_str()),
                    int(p.posted_at_ms),
                    int(p.account_version),
                    int(p.debits_posted_after),
                    int(p.credits_posted_after),
                    int(p.at.entry_seq),
                    int(p.at.leg),
                ]);
            }
            postings.push(vec![
                int(p.at.entry_seq),
                int(p.at.leg),
                borrowed(p.account.as_str()),
                borrowed(p.side.as_str()),
                int(p.amount_minor),
                int(i64::from(p.pending)),
                int(p.posted_at_ms),
                int(p.account_version),
                int(p.debits_posted_after),
                int(p.credits_posted_after),
                opt_int(p.prev.map(|r| r.entry_seq)),
                opt_int(p.prev.map(|r| r.leg)),
            ]);
        }
        if let Some(expires_at_ms) = ne.expires_at_ms {
            holds.push(vec![
                borrowed(e.id().as_str()),
                int(ne.seq),
                int(expires_at_ms),
            ]);
        }
    }
    let inserted = insert_chunked(
        conn,
        "INSERT INTO ledger_entries (seq, id, code, phase, currency, reference, pending_id, timeout_ms, \
         body_hash, posted_at_ms)",
        "ON CONFLICT (id) DO NOTHING",
        10,
        &entries,
    )?;
    if inserted != entries.len() {
        return Ok(false);
    }
    insert_chunked(
        conn,
        "INSERT INTO ledger_postings (entry_seq, leg, account_id, side, amount_minor, pending, posted_at_ms, \
         account_version, debits_posted_after, credits_posted_after, prev_entry_seq, prev_leg)",
        "",
        12,
        &postings,
    )?;
    insert_chunked(
        conn,
        "INSERT INTO ledger_balance_history (account_id, posted_at_ms, account_version, \
         debits_posted, credits_posted, entry_seq, leg)",
        "",
        7,
        &history,
    )?;
    insert_chunked(
        conn,
        "INSERT INTO ledger_holds (entry_id, entry_seq, expires_at_ms, state) SELECT column1, column2, column3, 'pending' FROM (",
        ")",
        3,
        &holds,
    )?;
    for h in &changes.holds {
        conn.prepare_cached(
            "UPDATE ledger_holds SET state = ?1, resolved_by = ?2 WHERE entry_id = ?3 AND state = 'pending'",
        )
        .and_then(|mut s| {
            s.execute(params![
                h.state.as_str(),
                h.resolved_by.as_ref().map(|r| r.as_str()),
                h.pending_id.as_str()
            ])
        })
        .map_err(db_err)?;
    }
    // Every changed account, once per batch: one primary-key update each.
    let mut update = conn
        .prepare_cached(
            "UPDATE ledger_balances SET debits_pending = ?2, debits_posted = ?3, credits_pending = ?4, \
             credits_posted = ?5, version = ?6, last_posted_at_ms = ?7, last_entry_seq = ?8, last_leg = ?9 \
             WHERE account_no = ?1",
        )
        .map_err(db_err)?;
    for id in &changes.accounts {
        let Some(s) = book.account(id) else {
            return Err(corrupt(format!("changed account {id} not in the book")));
        };
        let b = s.balance;
        let no = nos
            .get(id.as_str())
            .ok_or_else(|| corrupt(format!("changed account {id} was not loaded")))?;
        update
            .execute(params![
                no,
                b.debits_pending,
                b.debits_posted,
                b.credits_pending,
                b.credits_posted,
                s.version,
                s.last_posted_at_ms,
                s.last_posting.map(|r| r.entry_seq),
                s.last_posting.map(|r| r.leg)
            ])
            .map_err(db_err)?;
    }
    Ok(true)
}

fn expire_in_tx(conn: &Connection, now_ms: i64, limit: u32) -> Result<Vec<EntryId>> {
    // Expiry changes balances without an entry: the cache could not tell.
    drop_account_cache();
    let limit = limit.min(EXPIRE_BATCH_MAX);
    let ids: Vec<String> = {
        let mut s = conn
            .prepare_cached(
                "SELECT entry_id FROM ledger_holds WHERE state = 'pending' AND expires_at_ms <= ?1 \
                 ORDER BY expires_at_ms LIMIT ?2",
            )
            .map_err(db_err)?;
        let rows = s
            .query_map(params![now_ms, limit], |r| r.get(0))
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db_err)?
    };
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut book = Book::default();
    let mut owned = Vec::new();
    for id in &ids {
        let id = parse_entry_id(id)?;
        if let Some(hold) = load_hold(conn, &id)? {
            owned.extend(hold.legs.iter().map(|(a, ..)| a.clone()));
            book.put_hold(id, hold);
        }
    }
    let accounts: BTreeSet<&AccountId> = owned.iter().collect();
    let nos = load_accounts(conn, &mut book, &accounts)?;
    let expired = book
        .expire_due(now_ms, usize::try_from(limit).unwrap_or(usize::MAX))
        .map_err(corrupt)?;
    let changes = book.take_changes();
    if !write_changes(conn, &book, &changes, &nos)? {
        return Err(corrupt("expiry wrote an entry"));
    }
    Ok(expired)
}

/// Runs `f` in one read transaction: every statement sees the same WAL snapshot, so reads of
/// several tables agree even while the writer commits.
fn in_read_tx<R>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
    exec(conn, "BEGIN")?;
    let out = f(conn);
    // A read transaction has nothing to commit; ending it releases the snapshot.
    let end = exec(conn, "COMMIT");
    let out = out?;
    end?;
    Ok(out)
}

fn balance_at_in(conn: &Connection, id: &AccountId, at_ms: i64) -> Result<Option<Balance>> {
    let key = id.to_string();
    let account: Option<(Option<i64>, Option<i64>)> = conn
        .prepare_cached(
            "SELECT b.last_entry_seq, b.last_leg FROM ledger_accounts a \
             JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([&key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(db_err)?;
    let Some((last_seq, last_leg)) = account else {
        return Ok(None);
    };
    let posted = |debits_posted, credits_posted| Balance {
        debits_posted,
        credits_posted,
        ..Balance::ZERO
    };
    type HistoryRow = (i64, i64, Option<i64>, Option<i64>);
    let before: Option<HistoryRow> = conn
        .prepare_cached(
            "SELECT debits_posted, credits_posted, entry_seq, leg FROM ledger_balance_history \
             WHERE account_id = ?1 AND posted_at_ms <= ?2 ORDER BY posted_at_ms DESC, account_version DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row(params![key, at_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()
        })
        .map_err(db_err)?;
    if let Some((d, c, None, _)) = before {
        // A flush checkpoint of a buffered account: its history is kept at flush times.
        return Ok(Some(posted(d, c)));
    }
    let after: Option<(Option<i64>, Option<i64>)> = conn
        .prepare_cached(
            "SELECT entry_seq, leg FROM ledger_balance_history \
             WHERE account_id = ?1 AND posted_at_ms > ?2 ORDER BY posted_at_ms, account_version LIMIT 1",
        )
        .and_then(|mut s| s.query_row(params![key, at_ms], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(db_err)?;
    // Walk back from the first checkpoint after `at_ms` (or the latest posting) to the last
    // posting at or before it. The checkpoint before that one is at or before `at_ms`, so the
    // walk is at most HISTORY_CHECKPOINT_EVERY steps.
    let mut cur = match after {
        Some((Some(seq), Some(leg))) => Some((seq, leg)),
        _ => last_seq.zip(last_leg),
    };
    let mut s = conn
        .prepare_cached(
            "SELECT posted_at_ms, debits_posted_after, credits_posted_after, prev_entry_seq, prev_leg \
             FROM ledger_postings WHERE entry_seq = ?1 AND leg = ?2",
        )
        .map_err(db_err)?;
    for _ in 0..=HISTORY_CHECKPOINT_EVERY {
        let Some((seq, leg)) = cur else {
            return Ok(Some(Balance::ZERO));
        };
        type PostingRow = (i64, Option<i64>, Option<i64>, Option<i64>, Option<i64>);
        let row: PostingRow = s
            .query_row(params![seq, leg], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(db_err)?;
        let (posted_at_ms, d, c, prev_seq, prev_leg) = row;
        if posted_at_ms <= at_ms {
            return match (d, c) {
                (Some(d), Some(c)) => Ok(Some(posted(d, c))),
                _ => Err(corrupt(format!(
                    "posting {seq}/{leg} of {id} has no history"
                ))),
            };
        }
        cur = prev_seq.zip(prev_leg);
    }
    Err(corrupt(format!(
        "history of {id} is longer than {HISTORY_CHECKPOINT_EVERY} postings between checkpoints"
    )))
}

fn get_entry_in(conn: &Connection, id: &EntryId) -> Result<Option<EntryRecord>> {
    type Row = (
        i64,
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
        String,
        i64,
    );
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT seq, code, phase, currency, reference, pending_id, timeout_ms, body_hash, posted_at_ms \
             FROM ledger_entries WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([id.as_str()], |r| {
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
                ))
            })
            .optional()
        })
        .map_err(db_err)?;
    let Some((seq, code, phase, currency, reference, pending_id, timeout_ms, body_hash, at)) = row
    else {
        return Ok(None);
    };
    let mut postings = Vec::new();
    {
        let mut s = conn
            .prepare_cached(
                "SELECT leg, account_id, side, amount_minor, pending, posted_at_ms, account_version \
                 FROM ledger_postings WHERE entry_seq = ?1 ORDER BY leg",
            )
            .map_err(db_err)?;
        let rows = s
            .query_map([seq], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            })
            .map_err(db_err)?;
        for row in rows {
            let (leg, account, side, amount_minor, pending, posted_at_ms, account_version) =
                row.map_err(db_err)?;
            postings.push(PostingRow {
                leg,
                account: parse_account(&account)?,
                side: parse_side(&side)?,
                amount_minor,
                pending: pending != 0,
                posted_at_ms,
                account_version,
            });
        }
    }
    let hold: Option<(i64, String, Option<String>)> = conn
        .prepare_cached(
            "SELECT expires_at_ms, state, resolved_by FROM ledger_holds WHERE entry_id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(db_err)?;
    let hold = match hold {
        Some((expires_at_ms, state, resolved_by)) => Some(HoldRecord {
            expires_at_ms,
            state: parse_hold_state(&state)?,
            resolved_by: resolved_by.as_deref().map(parse_entry_id).transpose()?,
        }),
        None => None,
    };
    Ok(Some(EntryRecord {
        seq,
        id: id.clone(),
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
    }))
}

fn check_in(conn: &Connection) -> Result<LedgerCheck> {
    let counts: (i64, i64) = conn
        .query_row(CHECK_COUNTS_SQL, [], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(db_err)?;
    let accounts = {
        let mut s = conn.prepare(CHECK_ACCOUNTS_SQL).map_err(db_err)?;
        let rows = s
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    Balance {
                        debits_pending: r.get(2)?,
                        debits_posted: r.get(3)?,
                        credits_pending: r.get(4)?,
                        credits_posted: r.get(5)?,
                    },
                ))
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?
    };
    let postings = {
        let mut s = conn.prepare(CHECK_POSTINGS_SQL).map_err(db_err)?;
        let rows = s
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?
    };
    let buffered = {
        let mut s = conn.prepare(CHECK_BUFFERED_SQL).map_err(db_err)?;
        let rows = s
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Balance {
                        debits_pending: r.get(1)?,
                        debits_posted: r.get(2)?,
                        credits_pending: r.get(3)?,
                        credits_posted: r.get(4)?,
                    },
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(db_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)?
    };
    evaluate_check(counts, accounts, postings, buffered)
}

#[async_trait]
impl LedgerStore for SqliteStore {
    fn ledger_backend(&self) -> &'static str {
        "sqlite"
    }

    async fn open_accounts(&self, specs: &[AccountSpec], now_ms: i64) -> Result<Vec<OpenOutcome>> {
        let specs = specs.to_vec();
        self.write(move |c| open_accounts_in_tx(c, &specs, now_ms))
            .await
    }

    async fn post_entries(&self, entries: &[Entry], now_ms: i64) -> Result<Vec<PostOutcome>> {
        check_batch(entries.len())?;
        let entries = entries.to_vec();
        self.write(move |c| post_entries_in_tx(c, &entries, now_ms))
            .await
    }

    async fn expire_holds(&self, now_ms: i64, limit: u32) -> Result<Vec<EntryId>> {
        self.write(move |c| expire_in_tx(c, now_ms, limit)).await
    }

    async fn flush_buffered(&self, _now_ms: i64, _limit: u32) -> Result<FlushReport> {
        // The writer applies buffered accounts' postings in the batch that journals them, so
        // there is never anything left to flush.
        Ok(FlushReport::default())
    }

    async fn get_account(&self, id: &AccountId) -> Result<Option<AccountRecord>> {
        let id = id.clone();
        self.read(move |c| {
            let row = c
                .prepare_cached(
                    "SELECT a.flags, b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted, \
                     b.version, b.last_posted_at_ms, a.created_at_ms FROM ledger_accounts a \
                     JOIN ledger_balances b ON b.account_no = a.account_no WHERE a.id = ?1",
                )
                .and_then(|mut s| {
                    s.query_row([id.to_string()], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            Balance {
                                debits_pending: r.get(1)?,
                                debits_posted: r.get(2)?,
                                credits_pending: r.get(3)?,
                                credits_posted: r.get(4)?,
                            },
                            r.get::<_, i64>(5)?,
                            r.get::<_, i64>(6)?,
                            r.get::<_, i64>(7)?,
                        ))
                    })
                    .optional()
                })
                .map_err(db_err)?;
            row.map(|(flags, balance, version, last_posted_at_ms, created_at_ms)| {
                Ok(AccountRecord {
                    id: id.clone(),
                    flags: parse_flags(flags)?,
                    balance,
                    buffered: Balance::ZERO,
                    version,
                    last_posted_at_ms,
                    created_at_ms,
                })
            })
            .transpose()
        })
        .await
    }

    async fn balance_at(&self, id: &AccountId, at_ms: i64) -> Result<Option<Balance>> {
        let id = id.clone();
        self.read(move |c| in_read_tx(c, |c| balance_at_in(c, &id, at_ms)))
            .await
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<EntryRecord>> {
        let id = id.clone();
        self.read(move |c| in_read_tx(c, |c| get_entry_in(c, &id)))
            .await
    }

    async fn trial_balance(&self) -> Result<Vec<TrialBalanceRow>> {
        self.read(|c| {
            let mut s = c.prepare(TRIAL_BALANCE_SQL).map_err(db_err)?;
            let rows = s
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                    ))
                })
                .map_err(db_err)?;
            let mut out = Vec::new();
            for row in rows {
                let (kind, currency, n, d, c) = row.map_err(db_err)?;
                out.push(trial_row(&kind, currency, n, d, c)?);
            }
            Ok(out)
        })
        .await
    }

    async fn check_ledger(&self) -> Result<LedgerCheck> {
        self.read(|c| in_read_tx(c, check_in)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use payrail_domain::ledger::{EntryCode, Posting};
    use payrail_domain::{Currency, Money};

    fn temp_store() -> SqliteStore {
        let dir = std::env::temp_dir().join(format!(
            "payrail-sqlite-ledger-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        SqliteStore::open(&dir.join("t.db")).unwrap()
    }

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

    fn put_setting(c: &Connection, name: &str) -> Result<()> {
        c.execute(
            "INSERT INTO settings (name, value) VALUES (?1, 'v')",
            [name],
        )
        .map_err(db_err)?;
        Ok(())
    }

    /// The writer's cache of account states must never be used after someone else changed the
    /// ledger: here a second store on the same file (another process) posts between two posts
    /// of the first, whose no-overdraft check must see the second's debit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_account_cache_sees_another_process_posts() {
        let a = temp_store();
        let path = a.readers_path();
        let b = SqliteStore::open(&path).unwrap();
        let f = AccountId::funding(Currency::CNY);
        let w = AccountId::wallet(
            payrail_domain::MerchantId::generate(1, [7; 10]),
            "cache",
            Currency::CNY,
        )
        .unwrap();
        a.open_accounts(
            &[
                AccountSpec::default_for(f.clone()),
                AccountSpec::default_for(w.clone()),
            ],
            0,
        )
        .await
        .unwrap();
        // 100 into the wallet through A (its cache now holds the wallet at 100).
        let out = a
            .post_entries(&[transfer("c1", &f, &w, 100)], 1)
            .await
            .unwrap();
        assert!(matches!(out[0], PostOutcome::Posted(_)));
        // B spends 80 of it.
        let out = b
            .post_entries(&[transfer("c2", &w, &f, 80)], 2)
            .await
            .unwrap();
        assert!(matches!(out[0], PostOutcome::Posted(_)));
        // A may not spend 80 again: 20 are left.
        let out = a
            .post_entries(&[transfer("c3", &w, &f, 80)], 3)
            .await
            .unwrap();
        assert!(
            matches!(out[0], PostOutcome::Rejected(_)),
            "a stale cache let the wallet go negative: {out:?}"
        );
        let out = a
            .post_entries(&[transfer("c4", &w, &f, 20)], 4)
            .await
            .unwrap();
        assert!(matches!(out[0], PostOutcome::Posted(_)));
        let check = a.check_ledger().await.unwrap();
        assert!(check.ok(), "{check:?}");
    }

    /// Savepoint rollbacks outside the ledger (here a write that opens an account, posts, then
    /// rolls its savepoint back) must drop the cache: the account number the cache remembers
    /// may be handed to another account next.
    #[test]
    fn every_savepoint_rollback_goes_through_rollback_to() {
        let pattern = ["\"ROLLBACK", " TO"].concat();
        for (file, src) in [
            ("sqlite.rs", include_str!("sqlite.rs")),
            ("sqlite_ledger.rs", include_str!("sqlite_ledger.rs")),
            ("sqlite/clearing.rs", include_str!("sqlite/clearing.rs")),
            ("sqlite/refunds.rs", include_str!("sqlite/refunds.rs")),
            ("sqlite/payouts.rs", include_str!("sqlite/payouts.rs")),
            ("sqlite/webhooks.rs", include_str!("sqlite/webhooks.rs")),
            ("sqlite/writer.rs", include_str!("sqlite/writer.rs")),
        ] {
            let allowed = usize::from(file == "sqlite.rs");
            assert_eq!(
                src.matches(&pattern).count(),
                allowed,
                "{file}: roll savepoints back with sqlite::rollback_to"
            );
        }
    }

    /// Phase 2 posts a payment's entry in the write that changes its status: both commit, or
    /// neither does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postings_commit_with_the_callers_write_or_not_at_all() {
        let store = temp_store();
        let f = AccountId::funding(Currency::CNY);
        let w = AccountId::wallet(
            payrail_domain::MerchantId::generate(1, [7; 10]),
            "w",
            Currency::CNY,
        )
        .unwrap();
        store
            .open_accounts(
                &[
                    AccountSpec::default_for(f.clone()),
                    AccountSpec::default_for(w.clone()),
                ],
                0,
            )
            .await
            .unwrap();
        let (f2, w2) = (f.clone(), w.clone());
        let out = store
            .write(move |c| {
                put_setting(c, "committed")?;
                post_entries_in_tx(c, &[transfer("e1", &f2, &w2, 10)], 1)
            })
            .await
            .unwrap();
        assert!(matches!(out[0], PostOutcome::Posted(_)));
        // The caller's write fails after posting: the posting goes too.
        let (f2, w2) = (f.clone(), w.clone());
        let failed = store
            .write(move |c| {
                post_entries_in_tx(c, &[transfer("e2", &f2, &w2, 20)], 2)?;
                put_setting(c, "rolled back")?;
                Err::<(), _>(StoreError::Database(
                    "the status change lost its race".into(),
                ))
            })
            .await;
        assert!(failed.is_err());
        // A refused entry leaves the caller's own write alone.
        let (w2, f2) = (w.clone(), f.clone());
        let out = store
            .write(move |c| {
                put_setting(c, "kept")?;
                post_entries_in_tx(c, &[transfer("e3", &w2, &f2, 1_000)], 3)
            })
            .await
            .unwrap();
        assert!(matches!(out[0], PostOutcome::Rejected(_)));
        use crate::Store;
        assert!(store.get_setting("committed").await.unwrap().is_some());
        assert!(store.get_setting("rolled back").await.unwrap().is_none());
        assert!(store.get_setting("kept").await.unwrap().is_some());
        assert!(store
            .get_entry(&EntryId::parse("e2").unwrap())
            .await
            .unwrap()
            .is_none());
        let acct = store.get_account(&w).await.unwrap().unwrap();
        assert_eq!(acct.posted_net().unwrap(), 10);
        assert!(store.check_ledger().await.unwrap().ok());
    }
}
