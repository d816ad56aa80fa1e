//! Ledger storage: the [`LedgerStore`] trait, its records, and what both backends share.
//!
//! Both backends post a batch the same way: load the accounts, holds (and, on PostgreSQL, the
//! already-stored entries) the batch needs into a [`Book`], post every entry through it — the
//! same code the domain's property tests run — and write back what changed, inside one
//! transaction. A refused entry writes nothing; a replay writes nothing and answers with the
//! original receipt.
//!
//! To post inside a transaction that is already open (a payment's status change and its
//! postings must commit together), use `sqlite_ledger::post_entries_in_tx` with the SQLite
//! writer's `&Connection`, or `postgres_ledger::post_entries_in_tx` with a PostgreSQL
//! transaction.
//!
//! **Hot accounts.** Accounts flagged `BUFFERED` (platform fee, channel clearing and cost: almost
//! every payment posts to them) never take a lock or a row update per posting:
//! - SQLite: there are no locks; the writer posts a whole batch of entries in memory and updates
//!   each touched account row once per batch, so a hot account costs one row update per batch.
//! - PostgreSQL: a posting to a buffered account inserts a delta row instead of locking and
//!   updating the account; [`LedgerStore::flush_buffered`] applies deltas in batches (a worker
//!   runs it). After a flush the account's counters are exact; between flushes the unapplied
//!   part is in [`AccountRecord::buffered`].

use async_trait::async_trait;
use payrail_domain::ledger::{
    AccountFlags, AccountId, AccountKind, Balance, Entry, EntryId, HoldState, PostOutcome, Side,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::{Result, StoreError};

/// Most entries in one `post_entries` call (TigerBeetle takes 8,189 per request). Bounds the
/// time one write holds the SQLite writer or PostgreSQL row locks.
pub const POST_BATCH_MAX: usize = 8_192;
/// Most accounts in one `open_accounts` call.
pub const OPEN_BATCH_MAX: usize = 8_192;
/// Every this many postings of an account, its balance is also indexed in
/// `ledger_balance_history`: a balance at a past time is one index seek plus a walk of at most
/// this many postings, while the write path pays one extra index insert per this many postings.
pub const HISTORY_CHECKPOINT_EVERY: i64 = 128;
/// Most buffered deltas one flush applies.
pub const FLUSH_BATCH_MAX: u32 = 50_000;
/// Most holds one expiry sweep releases.
pub const EXPIRE_BATCH_MAX: u32 = 10_000;
/// Most mismatched accounts a ledger check lists.
pub const CHECK_REPORT_MAX: usize = 20;

/// An account to open: its name and flags (usually `id.kind().default_flags()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSpec {
    pub id: AccountId,
    pub flags: AccountFlags,
}

impl AccountSpec {
    /// The account with its kind's default flags.
    pub fn default_for(id: AccountId) -> AccountSpec {
        let flags = id.kind().default_flags();
        AccountSpec { id, flags }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenOutcome {
    Opened,
    /// Already open with the same flags: nothing changed (opening is idempotent).
    AlreadyOpen,
    /// Already open with other flags: nothing changed.
    FlagsDiffer {
        existing: AccountFlags,
    },
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountRecord {
    pub id: AccountId,
    pub flags: AccountFlags,
    /// The counters in the account row.
    pub balance: Balance,
    /// Buffered changes not yet applied by a flush (always zero on SQLite).
    pub buffered: Balance,
    pub version: i64,
    pub last_posted_at_ms: i64,
    pub created_at_ms: i64,
}

impl AccountRecord {
    /// The account's counters including buffered changes.
    pub fn current(&self) -> Result<Balance> {
        self.balance
            .checked_add(self.buffered)
            .ok_or_else(|| StoreError::Corrupt(format!("counters of {} overflow", self.id)))
    }

    /// Posted balance on the account's normal side.
    pub fn posted_net(&self) -> Result<i128> {
        Ok(self.current()?.posted_net(self.id.kind().normal_side()))
    }
}

/// One stored posting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostingRow {
    pub leg: i64,
    pub account: AccountId,
    pub side: Side,
    pub amount_minor: i64,
    pub pending: bool,
    pub posted_at_ms: i64,
    /// Null for a buffered account on PostgreSQL.
    pub account_version: Option<i64>,
}

/// A stored entry with its postings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    pub seq: i64,
    pub id: EntryId,
    pub code: String,
    pub phase: String,
    pub currency: Option<String>,
    pub reference: Option<String>,
    pub pending_id: Option<EntryId>,
    pub timeout_ms: Option<i64>,
    pub body_hash: String,
    pub posted_at_ms: i64,
    pub postings: Vec<PostingRow>,
    /// For a pending entry: its hold.
    pub hold: Option<HoldRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRecord {
    pub expires_at_ms: i64,
    pub state: HoldState,
    pub resolved_by: Option<EntryId>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Delta rows applied.
    pub deltas: u64,
    /// Accounts updated.
    pub accounts: u64,
}

/// One line of the trial balance: the posted totals of one kind of account in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialBalanceRow {
    pub kind: AccountKind,
    pub currency: String,
    pub accounts: i64,
    pub debits_posted: i128,
    pub credits_posted: i128,
}

/// The result of [`LedgerStore::check_ledger`]: the ledger-wide invariants, recomputed from the
/// rows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerCheck {
    pub entries: i64,
    pub postings: i64,
    pub accounts: i64,
    /// Buffered delta rows not yet flushed (counted into the accounts' current balances).
    pub unflushed: i64,
    /// Per currency: Σ (debits − credits) of posted and of pending amounts over all accounts.
    /// Both zero when the books balance.
    pub net_by_currency: BTreeMap<String, (i128, i128)>,
    /// Accounts whose counters (plus buffered deltas) differ from the sum of their postings
    /// (at most [`CHECK_REPORT_MAX`]).
    pub mismatched: Vec<String>,
}

impl LedgerCheck {
    pub fn ok(&self) -> bool {
        self.mismatched.is_empty() && self.net_by_currency.values().all(|v| *v == (0, 0))
    }
}

#[async_trait]
pub trait LedgerStore: Send + Sync + 'static {
    /// Which backend this is (`sqlite` or `postgres`).
    fn ledger_backend(&self) -> &'static str;

    /// Opens accounts (idempotent), at most [`OPEN_BATCH_MAX`] per call.
    async fn open_accounts(&self, specs: &[AccountSpec], now_ms: i64) -> Result<Vec<OpenOutcome>>;

    /// Posts up to [`POST_BATCH_MAX`] entries in one transaction (one commit), in order; one
    /// outcome per entry. Entries later in the batch see the effects of earlier ones.
    async fn post_entries(&self, entries: &[Entry], now_ms: i64) -> Result<Vec<PostOutcome>>;

    /// Releases up to `limit` holds whose timeout has passed at `now_ms`; returns their ids.
    async fn expire_holds(&self, now_ms: i64, limit: u32) -> Result<Vec<EntryId>>;

    /// Applies up to `limit` buffered deltas to their accounts.
    async fn flush_buffered(&self, now_ms: i64, limit: u32) -> Result<FlushReport>;

    async fn get_account(&self, id: &AccountId) -> Result<Option<AccountRecord>>;

    /// The account's posted counters as of `at_ms` (the pending ones are not kept in history,
    /// and come back as zero). A buffered account on PostgreSQL is known at flush times.
    /// `None` if the account does not exist.
    async fn balance_at(&self, id: &AccountId, at_ms: i64) -> Result<Option<Balance>>;

    async fn get_entry(&self, id: &EntryId) -> Result<Option<EntryRecord>>;

    /// Posted totals per account kind and currency.
    async fn trial_balance(&self) -> Result<Vec<TrialBalanceRow>>;

    /// Recomputes the invariants from the rows (a full scan: for tests, the benchmark and
    /// operators, not the request path).
    async fn check_ledger(&self) -> Result<LedgerCheck>;
}

pub type DynLedgerStore = Arc<dyn LedgerStore>;

/// Opens the ledger of the store named by a URL (see [`crate::open`]). Phase 1: a process that
/// also runs payments should use one store object for both, since each SQLite store has its own
/// writer thread.
pub async fn open_ledger(url: &str) -> Result<DynLedgerStore> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(crate::postgres::PgStore::connect(url).await?))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        Ok(Arc::new(crate::sqlite::SqliteStore::open(
            std::path::Path::new(path),
        )?))
    }
}

// --- shared by both backends -----------------------------------------------------------------

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(crate) fn check_batch(entries: usize) -> Result<()> {
    if entries > POST_BATCH_MAX {
        return Err(StoreError::Config(format!(
            "{entries} entries in one batch; at most {POST_BATCH_MAX}"
        )));
    }
    Ok(())
}

pub(crate) fn parse_account(s: &str) -> Result<AccountId> {
    AccountId::parse(s).map_err(corrupt)
}

pub(crate) fn parse_entry_id(s: &str) -> Result<EntryId> {
    EntryId::parse(s).map_err(corrupt)
}

pub(crate) fn parse_flags(bits: i64) -> Result<AccountFlags> {
    let bits = u32::try_from(bits).map_err(|_| corrupt(format!("flags {bits}")))?;
    AccountFlags::from_bits(bits).map_err(corrupt)
}

pub(crate) fn parse_side(s: &str) -> Result<Side> {
    Side::parse(s).ok_or_else(|| corrupt(format!("side {s}")))
}

pub(crate) fn parse_hold_state(s: &str) -> Result<HoldState> {
    HoldState::parse(s).ok_or_else(|| corrupt(format!("hold state {s}")))
}

/// The accounts an entry batch names directly (post/void name theirs through the hold).
pub(crate) fn own_accounts(entries: &[Entry]) -> BTreeSet<&AccountId> {
    entries
        .iter()
        .flat_map(|e| e.postings().iter().map(|p| &p.account))
        .collect()
}

/// The holds an entry batch acts on.
pub(crate) fn pending_ids(entries: &[Entry]) -> BTreeSet<EntryId> {
    entries
        .iter()
        .filter_map(|e| e.pending_id().cloned())
        .collect()
}

/// Whether a posting of this account version also gets a balance-history checkpoint.
pub(crate) fn is_checkpoint(version: i64) -> bool {
    version > 0 && version % HISTORY_CHECKPOINT_EVERY == 0
}

/// Trial balance: one query both backends run as is.
pub(crate) const TRIAL_BALANCE_SQL: &str = "SELECT a.kind, a.currency, COUNT(*), \
     CAST(SUM(b.debits_posted) AS BIGINT), CAST(SUM(b.credits_posted) AS BIGINT) \
     FROM ledger_accounts a JOIN ledger_balances b ON b.account_no = a.account_no \
     GROUP BY a.kind, a.currency ORDER BY a.kind, a.currency";

/// The check's three scans, identical on both backends.
pub(crate) const CHECK_ACCOUNTS_SQL: &str = "SELECT a.id, a.currency, b.debits_pending, \
     b.debits_posted, b.credits_pending, b.credits_posted \
     FROM ledger_accounts a JOIN ledger_balances b ON b.account_no = a.account_no";
pub(crate) const CHECK_POSTINGS_SQL: &str = "SELECT p.account_id, p.side, p.pending, \
     CAST(SUM(p.amount_minor) AS BIGINT), COUNT(*) \
     FROM ledger_postings p \
     WHERE p.pending = 0 OR p.entry_seq IN (SELECT entry_seq FROM ledger_holds WHERE state = 'pending') \
     GROUP BY p.account_id, p.side, p.pending";
pub(crate) const CHECK_BUFFERED_SQL: &str = "SELECT account_id, \
     CAST(SUM(debits_pending) AS BIGINT), CAST(SUM(debits_posted) AS BIGINT), \
     CAST(SUM(credits_pending) AS BIGINT), CAST(SUM(credits_posted) AS BIGINT), COUNT(*) \
     FROM ledger_buffered GROUP BY account_id";
pub(crate) const CHECK_COUNTS_SQL: &str =
    "SELECT (SELECT COUNT(*) FROM ledger_entries), (SELECT COUNT(*) FROM ledger_postings)";

/// Rows of [`CHECK_ACCOUNTS_SQL`]: id, currency, counters.
pub(crate) type CheckAccountRow = (String, String, Balance);
/// Rows of [`CHECK_POSTINGS_SQL`]: account, side, pending, sum, count.
pub(crate) type CheckPostingRow = (String, String, i64, i64, i64);
/// Rows of [`CHECK_BUFFERED_SQL`]: account, delta counters, count.
pub(crate) type CheckBufferedRow = (String, Balance, i64);

/// Compares every account's counters with the sum of its postings and adds up the ledger.
pub(crate) fn evaluate_check(
    counts: (i64, i64),
    accounts: Vec<CheckAccountRow>,
    postings: Vec<CheckPostingRow>,
    buffered: Vec<CheckBufferedRow>,
) -> Result<LedgerCheck> {
    let mut sums: HashMap<String, Balance> = HashMap::new();
    for (account, side, pending, sum, _) in postings {
        let b = sums.entry(account).or_default();
        let slot = match (parse_side(&side)?, pending != 0) {
            (Side::Debit, true) => &mut b.debits_pending,
            (Side::Debit, false) => &mut b.debits_posted,
            (Side::Credit, true) => &mut b.credits_pending,
            (Side::Credit, false) => &mut b.credits_posted,
        };
        *slot = sum;
    }
    let mut deltas: HashMap<String, Balance> = HashMap::new();
    let mut unflushed = 0i64;
    for (account, delta, n) in buffered {
        deltas.insert(account, delta);
        unflushed = unflushed.saturating_add(n);
    }
    let mut check = LedgerCheck {
        entries: counts.0,
        postings: counts.1,
        unflushed,
        ..LedgerCheck::default()
    };
    for (id, currency, stored) in accounts {
        check.accounts = check.accounts.saturating_add(1);
        let current = match deltas.get(&id) {
            Some(d) => stored
                .checked_add(*d)
                .ok_or_else(|| corrupt(format!("counters of {id} overflow")))?,
            None => stored,
        };
        let (posted, pending) = current.net_debit();
        let e = check.net_by_currency.entry(currency).or_insert((0, 0));
        e.0 = e.0.saturating_add(posted);
        e.1 = e.1.saturating_add(pending);
        let want = sums.remove(&id).unwrap_or_default();
        if current != want && check.mismatched.len() < CHECK_REPORT_MAX {
            check
                .mismatched
                .push(format!("{id}: counters {current:?}, postings {want:?}"));
        }
    }
    // Postings to accounts that do not exist.
    for (id, _) in sums.into_iter().take(CHECK_REPORT_MAX) {
        if check.mismatched.len() < CHECK_REPORT_MAX {
            check
                .mismatched
                .push(format!("{id}: postings but no account"));
        }
    }
    Ok(check)
}

pub(crate) fn trial_row(
    kind: &str,
    currency: String,
    accounts: i64,
    debits: Option<i64>,
    credits: Option<i64>,
) -> Result<TrialBalanceRow> {
    Ok(TrialBalanceRow {
        kind: AccountKind::parse(kind).ok_or_else(|| corrupt(format!("account kind {kind}")))?,
        currency,
        accounts,
        debits_posted: i128::from(debits.unwrap_or(0)),
        credits_posted: i128::from(credits.unwrap_or(0)),
    })
}
