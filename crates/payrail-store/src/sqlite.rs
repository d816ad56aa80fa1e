//! The embedded SQLite store.
//!
//! Durability: WAL, and no write is answered before its commit is on disk (`fdatasync` of the
//! WAL by the syncer thread, see `sqlite/writer.rs`); an acknowledged write survives power
//! loss. Reader connections use `synchronous=FULL` (they never write).
//! Throughput: all writes go to one writer thread, which runs every write waiting in its queue
//! inside one transaction (each in its own savepoint, so one failing write does not undo the
//! others) — group commit — and hands the committed batch to the syncer, so the fsync of one
//! batch overlaps the execution of the next. Under load a batch forms while the previous one
//! commits, so no artificial delay is needed.
//! Reads run on a small pool of read-only connections; WAL lets them proceed during writes.

use crate::common::*;
use crate::schema::MIGRATIONS;
use crate::*;
use payrail_domain::{AttemptId, AttemptStatus, PaymentStatus};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokio::sync::{mpsc, oneshot};

mod clearing;
mod payouts;
mod refunds;
mod webhooks;
mod writer;

/// Most writes one transaction takes; bounds commit latency under overload.
const WRITE_BATCH_MAX: usize = 512;
/// Writes that may wait for the writer thread; senders wait (backpressure) beyond this.
const WRITE_QUEUE_MAX: usize = 8192;
/// Idle read connections kept open.
const READERS_MAX: usize = 8;
const BUSY_TIMEOUT_MS: u64 = 5_000;

use writer::{WriteJob, WriterMsg};

pub struct SqliteStore {
    writer: mpsc::Sender<WriterMsg>,
    health: Arc<writer::Health>,
    readers: Arc<Readers>,
}

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

pub(crate) fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

/// Creates the database file readable by its owner only (it holds payment data and encrypted
/// secrets). SQLite gives its -wal and -shm files the same permissions.
fn create_private(path: &Path) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        // Another process created it between the check and the open: fine.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StoreError::Config(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).map_err(db_err)?;
    conn.busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
        .map_err(db_err)?;
    // WAL + FULL: every commit is fsynced; an acknowledged write survives power loss.
    set_wal(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(db_err)?;
    // Each write runs in a savepoint, whose undo sub-journal would otherwise be a temp file.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(db_err)?;
    // 16 MiB page cache (negative = KiB). Measured (docs/BENCHMARKS.md): 2 MiB (the default)
    // re-reads index pages; 64 MiB costs more in cache bookkeeping at every commit than it saves.
    conn.pragma_update(None, "cache_size", -16_384)
        .map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Switching a new database file to WAL needs an exclusive lock, and SQLite reports BUSY at once
/// there instead of waiting (busy_timeout does not apply): when several processes open a new
/// file together, retry for as long as a busy wait would.
fn set_wal(conn: &Connection) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(BUSY_TIMEOUT_MS);
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other.map_err(db_err),
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies migrations.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        create_private(path)?;
        let conn = open_connection(path)?;
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Config(format!(
                "SQLite refused WAL mode (got {mode})"
            )));
        }
        migrate(&conn)?;
        // The writer, its syncer and their checkpoints: `sqlite/writer.rs`.
        let (tx, health) = writer::start(conn, path)?;
        Ok(SqliteStore {
            writer: tx,
            health,
            readers: Arc::new(Readers {
                path: path.to_path_buf(),
                idle: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Runs `f` in the shared write transaction; returns after the commit is durable.
    pub(crate) async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.write_or_rollback(move |c| f(c).map(|v| (v, true)))
            .await
    }

    /// Like [`Self::write`], but `f` may ask (with `false`) for its own changes to be undone
    /// while still returning a value.
    async fn write_or_rollback<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<(R, bool)> + Send + 'static,
    ) -> Result<R> {
        let (otx, orx) = oneshot::channel::<Result<R>>();
        let job: WriteJob = Box::new(move |conn| {
            let res = match conn {
                Ok(conn) => run_in_savepoint(conn, f),
                Err(e) => Err(StoreError::Database(e.to_string())),
            };
            Box::new(move |commit: Result<(), String>| {
                let out = match commit {
                    Ok(()) => res,
                    Err(e) => Err(StoreError::Database(e)),
                };
                let _ = otx.send(out);
            })
        });
        self.writer
            .send(WriterMsg::Job(job))
            .await
            .map_err(|_| StoreError::Closed)?;
        orx.await.map_err(|_| StoreError::Closed)?
    }

    #[cfg(test)]
    pub(crate) fn readers_path(&self) -> PathBuf {
        self.readers.path.clone()
    }

    /// Returns once every write committed before the call — by any connection, of this
    /// process or another — is on disk: an empty write through the pipeline, whose sync covers
    /// every frame in the WAL before it. A reader may see a commit up to one fsync before it is
    /// durable (see `writer.rs`), so reads whose results leave the process use
    /// [`Self::read_durable`].
    pub(crate) async fn durable(&self) -> Result<()> {
        self.write(|_| Ok(())).await
    }

    /// A read whose rows leave the process (outbox events): read, then pass a durability
    /// barrier before handing them out. Everything the read saw was committed before the
    /// barrier's empty write entered the writer, so it is on disk once the barrier returns
    /// (review finding: a barrier *before* the read let rows committed after it through).
    pub(crate) async fn read_durable<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let out = self.read(f).await?;
        self.durable().await?;
        Ok(out)
    }

    pub(crate) async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.take()?;
            let out = f(&conn);
            readers.give(conn);
            out
        })
        .await
        .map_err(|e| StoreError::Database(format!("read task failed: {e}")))?
    }
}

impl Readers {
    fn take(&self) -> Result<Connection> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        match pooled {
            Some(c) => Ok(c),
            None => {
                let c = open_connection(&self.path)?;
                c.pragma_update(None, "query_only", "ON").map_err(db_err)?;
                Ok(c)
            }
        }
    }

    fn give(&self, conn: Connection) {
        if let Ok(mut v) = self.idle.lock() {
            if v.len() < READERS_MAX {
                v.push(conn);
            }
        }
    }
}

/// Rolls the writer's transaction back to `savepoint`. Every savepoint rollback of the SQLite
/// store goes through here (a test checks the sources), because undone writes may include
/// ledger account rows whose states the writer caches between batches
/// (`sqlite_ledger::AccountCache`): a rolled-back account creation followed by another could
/// otherwise hand a cached account's number to a different account.
pub(crate) fn rollback_to(conn: &Connection, savepoint: &str) -> Result<()> {
    crate::sqlite_ledger::drop_account_cache();
    conn.prepare_cached(&format!("ROLLBACK TO {savepoint}"))
        .and_then(|mut s| s.execute([]))
        .map_err(db_err)?;
    Ok(())
}

fn run_in_savepoint<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<(R, bool)>,
) -> Result<R> {
    // Cached statements: this runs for every write, so no re-parsing.
    let exec = |sql: &str| {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([]))
            .map_err(db_err)
    };
    exec("SAVEPOINT op")?;
    match f(conn) {
        Ok((v, true)) => match exec("RELEASE op") {
            Ok(_) => Ok(v),
            Err(e) => {
                // Keep its writes out of the batch: the caller is told it failed.
                let _ = rollback_to(conn, "op");
                let _ = exec("RELEASE op");
                Err(e)
            }
        },
        Ok((v, false)) => {
            rollback_to(conn, "op")?;
            exec("RELEASE op")?;
            Ok(v)
        }
        Err(e) => {
            // Undo this write only; the others in the batch still commit.
            let _ = rollback_to(conn, "op");
            let _ = exec("RELEASE op");
            Err(e)
        }
    }
}

fn migrate(conn: &Connection) -> Result<()> {
    // One IMMEDIATE transaction takes the write lock before reading the version: a second
    // process opening the same file at the same time waits (busy_timeout), then finds the
    // migrations applied instead of failing on "table already exists".
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)
        .map_err(db_err)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)",
    )
    .map_err(db_err)?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    let latest = MIGRATIONS.last().map(|m| m.version).unwrap_or(0);
    if current > latest {
        return Err(StoreError::Config(format!(
            "database schema version {current} is newer than this binary supports ({latest}); upgrade payrail"
        )));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        let sql = crate::schema::render(m.sql, false);
        tx.execute_batch(&sql).map_err(db_err)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (?1, ?2, ?3)",
            params![m.version, m.name, now_ms()],
        )
        .map_err(db_err)?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "sqlite: migration applied"
        );
    }
    tx.commit().map_err(db_err)
}

// --- row mapping ---------------------------------------------------------------------------

fn parse_id<T: std::str::FromStr>(s: String) -> rusqlite::Result<T> {
    s.parse().map_err(|_| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("bad id {s}").into(),
        )
    })
}

fn conv_err(msg: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, msg.into())
}

fn merchant_row(r: &Row<'_>) -> rusqlite::Result<MerchantRecord> {
    let status: String = r.get(2)?;
    Ok(MerchantRecord {
        id: parse_id(r.get(0)?)?,
        name: r.get(1)?,
        status: MerchantStatus::parse(&status).ok_or_else(|| conv_err(status))?,
        version: r.get(3)?,
        created_at_ms: r.get(4)?,
        updated_at_ms: r.get(5)?,
    })
}

fn app_row(r: &Row<'_>) -> rusqlite::Result<AppRecord> {
    Ok(AppRecord {
        id: parse_id(r.get(0)?)?,
        merchant_id: parse_id(r.get(1)?)?,
        name: r.get(2)?,
        key_id: r.get(3)?,
        secret_ciphertext: r.get(4)?,
        created_at_ms: r.get(5)?,
    })
}

fn payment_row(r: &Row<'_>) -> rusqlite::Result<PaymentRecord> {
    let status: String = r.get(9)?;
    Ok(PaymentRecord {
        id: parse_id(r.get(0)?)?,
        merchant_id: parse_id(r.get(1)?)?,
        app_id: parse_id(r.get(2)?)?,
        out_trade_no: r.get(3)?,
        amount_minor: r.get(4)?,
        currency: r.get(5)?,
        subject: r.get(6)?,
        method: r.get(7)?,
        channel: r.get(8)?,
        status: PaymentStatus::parse(&status).ok_or_else(|| conv_err(status))?,
        version: r.get(10)?,
        notify_url: r.get(11)?,
        metadata: r.get(12)?,
        channel_trade_no: r.get(13)?,
        failure_code: r.get(14)?,
        failure_message: r.get(15)?,
        idempotency_key: r.get(16)?,
        request_hash: r.get(17)?,
        expires_at_ms: r.get(18)?,
        paid_at_ms: r.get(19)?,
        created_at_ms: r.get(20)?,
        updated_at_ms: r.get(21)?,
        amount_refunded_minor: r.get(22)?,
        refund_reserved_minor: r.get(23)?,
    })
}

fn attempt_row(r: &Row<'_>) -> rusqlite::Result<AttemptRecord> {
    let status: String = r.get(4)?;
    Ok(AttemptRecord {
        id: parse_id::<AttemptId>(r.get(0)?)?,
        payment_id: parse_id(r.get(1)?)?,
        merchant_id: parse_id(r.get(2)?)?,
        channel: r.get(3)?,
        status: AttemptStatus::parse(&status).ok_or_else(|| conv_err(status))?,
        version: r.get(5)?,
        channel_trade_no: r.get(6)?,
        failure_code: r.get(7)?,
        failure_message: r.get(8)?,
        created_at_ms: r.get(9)?,
        updated_at_ms: r.get(10)?,
        channel_account_id: r.get::<_, Option<String>>(11)?.map(parse_id).transpose()?,
    })
}

fn channel_account_row(r: &Row<'_>) -> rusqlite::Result<ChannelAccountRecord> {
    let status: String = r.get(3)?;
    Ok(ChannelAccountRecord {
        id: parse_id(r.get(0)?)?,
        channel: r.get(1)?,
        name: r.get(2)?,
        status: ChannelAccountStatus::parse(&status).ok_or_else(|| conv_err(status))?,
        priority: r.get(4)?,
        config: r.get(5)?,
        secrets_ciphertext: r.get(6)?,
        version: r.get(7)?,
        created_at_ms: r.get(8)?,
        updated_at_ms: r.get(9)?,
    })
}

fn job_row(r: &Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        kind: r.get(0)?,
        subject_id: r.get(1)?,
        run_at_ms: r.get(2)?,
        attempts: r.get(3)?,
        created_at_ms: r.get(4)?,
    })
}

fn event_row(r: &Row<'_>) -> rusqlite::Result<EventRecord> {
    Ok(EventRecord {
        seq: r.get(0)?,
        id: r.get(1)?,
        merchant_id: parse_id(r.get(2)?)?,
        event_type: r.get(3)?,
        object_id: r.get(4)?,
        payload: r.get(5)?,
        created_at_ms: r.get(6)?,
    })
}

fn insert_event(c: &Connection, e: &NewEvent) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO outbox (id, merchant_id, event_type, object_id, payload, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![e.id, e.merchant_id.to_string(), e.event_type, e.object_id, e.payload, e.created_at_ms])
    })
    .map_err(db_err)?;
    Ok(())
}

/// `false` if the claim `done.token` is no longer the key's current one (taken over).
fn complete_key(c: &Connection, done: &IdempotencyCompletion) -> Result<bool> {
    let n = c
        .prepare_cached(
            "UPDATE idempotency_keys SET state = 'completed', response_status = ?1, response_body = ?2 \
             WHERE scope = ?3 AND idem_key = ?4 AND state = 'in_progress' AND lock_token = ?5",
        )
        .and_then(|mut s| {
            s.execute(params![done.status, done.body, done.scope, done.key, done.token])
        })
        .map_err(db_err)?;
    Ok(n == 1)
}

/// Claims the nonce and the idempotency key of a request (inside the caller's transaction).
fn admit_in(c: &Connection, req: &Admission) -> Result<AdmissionOutcome> {
    if let Some(n) = &req.nonce {
        let claimed = c
            .prepare_cached(
                "INSERT INTO request_nonce_claims (timestamp_s, key_id, nonce) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![n.timestamp_s, n.key_id, n.nonce]))
            .map_err(db_err)?;
        if claimed == 0 {
            return Ok(AdmissionOutcome::NonceReused);
        }
    }
    let Some(k) = &req.idempotency else {
        return Ok(AdmissionOutcome::Admitted(None));
    };
    let inserted = c
        .prepare_cached(
            "INSERT INTO idempotency_keys (scope, idem_key, request_hash, state, locked_at_ms, created_at_ms, lock_token) \
             VALUES (?1, ?2, ?3, 'in_progress', ?4, ?4, ?5) ON CONFLICT (scope, idem_key) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![k.scope, k.key, k.request_hash, k.now_ms, k.token]))
        .map_err(db_err)?;
    if inserted == 1 {
        return Ok(AdmissionOutcome::Admitted(Some(IdempotencyState::New)));
    }
    let (hash, state, status, body, locked_at): (String, String, Option<i64>, Option<String>, i64) =
        c.prepare_cached(&format!(
            "SELECT {IDEMPOTENCY_COLS} FROM idempotency_keys WHERE scope = ?1 AND idem_key = ?2"
        ))
        .and_then(|mut s| {
            s.query_row(params![k.scope, k.key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
        })
        .map_err(db_err)?;
    let outcome = idempotency_state(k, &hash, &state, status, body, locked_at);
    if outcome == IdempotencyState::New {
        // Takeover of a stale claim: the new token makes the old request's completion a no-op.
        c.prepare_cached(
            "UPDATE idempotency_keys SET locked_at_ms = ?1, lock_token = ?2 WHERE scope = ?3 AND idem_key = ?4",
        )
        .and_then(|mut s| s.execute(params![k.now_ms, k.token, k.scope, k.key]))
        .map_err(db_err)?;
    }
    Ok(AdmissionOutcome::Admitted(Some(outcome)))
}

/// True if an admission lets the request run.
fn admitted(o: &AdmissionOutcome) -> bool {
    matches!(
        o,
        AdmissionOutcome::Admitted(None) | AdmissionOutcome::Admitted(Some(IdempotencyState::New))
    )
}

fn apply_job_update(c: &Connection, u: &JobUpdate) -> Result<()> {
    match u {
        JobUpdate::Schedule { kind, subject_id, run_at_ms, last_error } => c
            .prepare_cached(
                "INSERT INTO jobs (kind, subject_id, run_at_ms, attempts, last_error, created_at_ms) VALUES (?1, ?2, ?3, 0, ?4, ?3) \
                 ON CONFLICT (kind, subject_id) DO UPDATE SET run_at_ms = excluded.run_at_ms, last_error = excluded.last_error",
            )
            .and_then(|mut s| s.execute(params![kind, subject_id, run_at_ms, last_error])),
        JobUpdate::Delete { kind, subject_id } => c
            .prepare_cached("DELETE FROM jobs WHERE kind = ?1 AND subject_id = ?2")
            .and_then(|mut s| s.execute(params![kind, subject_id])),
    }
    .map_err(db_err)?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn check_writable(&self) -> Result<()> {
        if self.health.failed() {
            return Err(StoreError::Database(writer::STORE_FAILED.to_string()));
        }
        // Through the writer and the syncer, like any write.
        self.durable().await
    }

    async fn get_setting(&self, name: &str) -> Result<Option<String>> {
        let name = name.to_string();
        self.read(move |c| {
            c.query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn put_setting_if_absent(&self, name: &str, value: &str) -> Result<String> {
        let (name, value) = (name.to_string(), value.to_string());
        self.write(move |c| {
            c.execute(
                "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
                params![name, value],
            )
            .map_err(db_err)?;
            c.query_row("SELECT value FROM settings WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .map_err(db_err)
        })
        .await
    }

    async fn insert_merchant(&self, m: &MerchantRecord) -> Result<()> {
        let m = m.clone();
        self.write(move |c| {
            c.execute(
                &format!("INSERT INTO merchants ({MERCHANT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    m.id.to_string(),
                    m.name,
                    m.status.as_str(),
                    m.version,
                    m.created_at_ms,
                    m.updated_at_ms
                ],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn get_merchant(&self, id: MerchantId) -> Result<Option<MerchantRecord>> {
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {MERCHANT_COLS} FROM merchants WHERE id = ?1"),
                [id.to_string()],
                merchant_row,
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn list_merchants(
        &self,
        limit: u32,
        starting_after: Option<MerchantId>,
    ) -> Result<Vec<MerchantRecord>> {
        self.read(move |c| {
            let after = starting_after.map(|i| i.to_string());
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {MERCHANT_COLS} FROM merchants WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2"
                ))
                .map_err(db_err)?;
            let rows = s.query_map(params![after, limit], merchant_row).map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn set_merchant_status(
        &self,
        id: MerchantId,
        status: MerchantStatus,
        now_ms: i64,
    ) -> Result<Option<MerchantRecord>> {
        self.write(move |c| {
            c.execute(
                "UPDATE merchants SET status = ?1, version = version + 1, updated_at_ms = ?2 WHERE id = ?3 AND status <> ?1",
                params![status.as_str(), now_ms, id.to_string()],
            )
            .map_err(db_err)?;
            c.query_row(&format!("SELECT {MERCHANT_COLS} FROM merchants WHERE id = ?1"), [id.to_string()], merchant_row)
                .optional()
                .map_err(db_err)
        })
        .await
    }

    async fn insert_app(&self, app: &AppRecord) -> Result<()> {
        let a = app.clone();
        self.write(move |c| {
            c.execute(
                &format!("INSERT INTO apps ({APP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"),
                params![
                    a.id.to_string(),
                    a.merchant_id.to_string(),
                    a.name,
                    a.key_id,
                    a.secret_ciphertext,
                    a.created_at_ms
                ],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn get_app_by_key_id(&self, key_id: &str) -> Result<Option<AppRecord>> {
        let key_id = key_id.to_string();
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {APP_COLS} FROM apps WHERE key_id = ?1"),
                [key_id],
                app_row,
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn list_apps(&self, merchant_id: MerchantId) -> Result<Vec<AppRecord>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {APP_COLS} FROM apps WHERE merchant_id = ?1 ORDER BY id"
                ))
                .map_err(db_err)?;
            let rows = s
                .query_map([merchant_id.to_string()], app_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn admit(&self, req: &Admission) -> Result<AdmissionOutcome> {
        let req = req.clone();
        self.write(move |c| admit_in(c, &req)).await
    }

    async fn complete_idempotency(&self, done: &IdempotencyCompletion) -> Result<bool> {
        let done = done.clone();
        self.write(move |c| complete_key(c, &done)).await
    }

    async fn release_idempotency(&self, scope: &str, key: &str, token: &str) -> Result<()> {
        let (scope, key, token) = (scope.to_string(), key.to_string(), token.to_string());
        self.write(move |c| {
            c.execute(
                "DELETE FROM idempotency_keys WHERE scope = ?1 AND idem_key = ?2 AND state = 'in_progress' AND lock_token = ?3",
                params![scope, key, token],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn create_payment(&self, new: &NewPayment) -> Result<CreatePaymentOutcome> {
        let new = new.clone();
        self.write(move |c| {
            if let Some(admission) = &new.admission {
                let outcome = admit_in(c, admission)?;
                if !admitted(&outcome) {
                    return Ok(CreatePaymentOutcome::NotAdmitted(outcome));
                }
            }
            let p = &new.payment;
            let status: Option<String> = c
                .prepare_cached("SELECT status FROM merchants WHERE id = ?1")
                .and_then(|mut s| s.query_row([p.merchant_id.to_string()], |r| r.get(0)).optional())
                .map_err(db_err)?;
            if status.as_deref() != Some(MerchantStatus::Active.as_str()) {
                return Ok(CreatePaymentOutcome::MerchantNotActive);
            }
            let inserted = c
                .prepare_cached(&format!(
                    "INSERT INTO payments ({PAYMENT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24) \
                     ON CONFLICT (merchant_id, out_trade_no) DO NOTHING"
                ))
                .and_then(|mut s| {
                    s.execute(params![
                        p.id.to_string(), p.merchant_id.to_string(), p.app_id.to_string(), p.out_trade_no, p.amount_minor,
                        p.currency, p.subject, p.method, p.channel, p.status.as_str(), p.version, p.notify_url, p.metadata,
                        p.channel_trade_no, p.failure_code, p.failure_message, p.idempotency_key, p.request_hash,
                        p.expires_at_ms, p.paid_at_ms, p.created_at_ms, p.updated_at_ms, p.amount_refunded_minor,
                        p.refund_reserved_minor
                    ])
                })
                .map_err(db_err)?;
            if inserted == 0 {
                let existing = c
                    .query_row(
                        &format!("SELECT {PAYMENT_COLS} FROM payments WHERE merchant_id = ?1 AND out_trade_no = ?2"),
                        params![p.merchant_id.to_string(), p.out_trade_no],
                        payment_row,
                    )
                    .map_err(db_err)?;
                return Ok(CreatePaymentOutcome::DuplicateOutTradeNo(Box::new(existing)));
            }
            let a = &new.attempt;
            c.prepare_cached(&format!(
                "INSERT INTO payment_attempts ({ATTEMPT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ))
            .and_then(|mut s| {
                s.execute(params![
                    a.id.to_string(), a.payment_id.to_string(), a.merchant_id.to_string(), a.channel, a.status.as_str(),
                    a.version, a.channel_trade_no, a.failure_code, a.failure_message, a.created_at_ms, a.updated_at_ms,
                    a.channel_account_id.map(|i| i.to_string())
                ])
            })
            .map_err(db_err)?;
            if let Some(j) = &new.job {
                c.prepare_cached(
                    "INSERT INTO jobs (kind, subject_id, run_at_ms, attempts, created_at_ms) VALUES (?1, ?2, ?3, 0, ?4)",
                )
                .and_then(|mut s| s.execute(params![j.kind, j.subject_id, j.run_at_ms, p.created_at_ms]))
                .map_err(db_err)?;
            }
            Ok(CreatePaymentOutcome::Created)
        })
        .await
    }

    async fn get_payment(
        &self,
        merchant_id: MerchantId,
        id: PaymentId,
    ) -> Result<Option<PaymentRecord>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {PAYMENT_COLS} FROM payments WHERE id = ?1 AND merchant_id = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(
                    params![id.to_string(), merchant_id.to_string()],
                    payment_row,
                )
                .optional()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn get_payment_by_out_trade_no(
        &self,
        merchant_id: MerchantId,
        out_trade_no: &str,
    ) -> Result<Option<PaymentRecord>> {
        let otn = out_trade_no.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {PAYMENT_COLS} FROM payments WHERE merchant_id = ?1 AND out_trade_no = ?2"
            ))
            .and_then(|mut s| {
                s.query_row(params![merchant_id.to_string(), otn], payment_row)
                    .optional()
            })
            .map_err(db_err)
        })
        .await
    }

    async fn get_payment_any(&self, id: PaymentId) -> Result<Option<PaymentRecord>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {PAYMENT_COLS} FROM payments WHERE id = ?1"
            ))
            .and_then(|mut s| s.query_row([id.to_string()], payment_row).optional())
            .map_err(db_err)
        })
        .await
    }

    async fn list_payments(
        &self,
        merchant_id: MerchantId,
        limit: u32,
        starting_after: Option<PaymentId>,
    ) -> Result<Vec<PaymentRecord>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {PAYMENT_COLS} FROM payments WHERE merchant_id = ?1 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3"
                ))
                .map_err(db_err)?;
            let rows = s
                .query_map(params![merchant_id.to_string(), starting_after.map(|i| i.to_string()), limit], payment_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn get_attempts(&self, payment_id: PaymentId) -> Result<Vec<AttemptRecord>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {ATTEMPT_COLS} FROM payment_attempts WHERE payment_id = ?1 ORDER BY id"
                ))
                .map_err(db_err)?;
            let rows = s
                .query_map([payment_id.to_string()], attempt_row)
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn get_attempt(&self, id: AttemptId) -> Result<Option<AttemptRecord>> {
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {ATTEMPT_COLS} FROM payment_attempts WHERE id = ?1"
            ))
            .and_then(|mut s| s.query_row([id.to_string()], attempt_row).optional())
            .map_err(db_err)
        })
        .await
    }

    async fn insert_channel_account(&self, a: &ChannelAccountRecord) -> Result<()> {
        let a = a.clone();
        self.write(move |c| {
            c.execute(
                &format!("INSERT INTO channel_accounts ({CHANNEL_ACCOUNT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
                params![
                    a.id.to_string(), a.channel, a.name, a.status.as_str(), a.priority, a.config,
                    a.secrets_ciphertext, a.version, a.created_at_ms, a.updated_at_ms
                ],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn get_channel_account(
        &self,
        id: ChannelAccountId,
    ) -> Result<Option<ChannelAccountRecord>> {
        self.read(move |c| {
            c.query_row(
                &format!("SELECT {CHANNEL_ACCOUNT_COLS} FROM channel_accounts WHERE id = ?1"),
                [id.to_string()],
                channel_account_row,
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn list_channel_accounts(&self) -> Result<Vec<ChannelAccountRecord>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {CHANNEL_ACCOUNT_COLS} FROM channel_accounts ORDER BY id"
                ))
                .map_err(db_err)?;
            let rows = s.query_map([], channel_account_row).map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn set_channel_account_status(
        &self,
        id: ChannelAccountId,
        status: ChannelAccountStatus,
        now_ms: i64,
    ) -> Result<Option<ChannelAccountRecord>> {
        self.write(move |c| {
            c.execute(
                "UPDATE channel_accounts SET status = ?1, version = version + 1, updated_at_ms = ?2 WHERE id = ?3 AND status <> ?1",
                params![status.as_str(), now_ms, id.to_string()],
            )
            .map_err(db_err)?;
            c.query_row(
                &format!("SELECT {CHANNEL_ACCOUNT_COLS} FROM channel_accounts WHERE id = ?1"),
                [id.to_string()],
                channel_account_row,
            )
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn apply_transition(&self, t: &Transition) -> Result<bool> {
        let t = t.clone();
        self.write_or_rollback(move |c| {
            let n = c
                .prepare_cached(
                    "UPDATE payments SET status = ?1, version = version + 1, channel_trade_no = COALESCE(?2, channel_trade_no), \
                     failure_code = ?3, failure_message = ?4, paid_at_ms = COALESCE(?5, paid_at_ms), updated_at_ms = ?6 \
                     WHERE id = ?7 AND version = ?8",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        t.payment_status.as_str(), t.channel_trade_no, t.failure_code, t.failure_message, t.paid_at_ms,
                        t.now_ms, t.payment_id.to_string(), t.payment_version
                    ])
                })
                .map_err(db_err)?;
            if n == 0 {
                return Ok((false, false));
            }
            let n = c
                .prepare_cached(
                    "UPDATE payment_attempts SET status = ?1, version = version + 1, channel_trade_no = COALESCE(?2, channel_trade_no), \
                     failure_code = ?3, failure_message = ?4, updated_at_ms = ?5 WHERE id = ?6 AND version = ?7",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        t.attempt_status.as_str(), t.channel_trade_no, t.failure_code, t.failure_message, t.now_ms,
                        t.attempt_id.to_string(), t.attempt_version
                    ])
                })
                .map_err(db_err)?;
            if n == 0 {
                return Ok((false, false));
            }
            if let Some(e) = &t.event {
                insert_event(c, e)?;
            }
            if let Some(j) = &t.job {
                apply_job_update(c, j)?;
            }
            if let Some(done) = &t.idempotency {
                if !complete_key(c, done)? {
                    // The payment's change stands; only the replay record belongs to the
                    // request that took the key over.
                    tracing::warn!(key = %done.key, "idempotency claim was taken over; response not saved");
                }
            }
            // The posting set commits with the status change or not at all: an error here
            // rolls the whole change back.
            if let Some(l) = &t.ledger {
                clearing::transition_ledger_in(c, l, t.now_ms)?;
            }
            Ok((true, true))
        })
        .await
    }

    async fn count_payments_by_status(
        &self,
        merchant_id: MerchantId,
    ) -> Result<Vec<(String, i64)>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached("SELECT status, COUNT(*) FROM payments WHERE merchant_id = ?1 GROUP BY status ORDER BY status")
                .map_err(db_err)?;
            let rows = s.query_map([merchant_id.to_string()], |r| Ok((r.get(0)?, r.get(1)?))).map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn create_refund(&self, new: &NewRefund) -> Result<CreateRefundOutcome> {
        refunds::create_refund(self, new).await
    }

    async fn get_refund(
        &self,
        merchant_id: MerchantId,
        id: payrail_domain::RefundId,
    ) -> Result<Option<RefundRecord>> {
        refunds::get_refund(self, Some(merchant_id), id).await
    }

    async fn get_refund_by_out_refund_no(
        &self,
        merchant_id: MerchantId,
        out_refund_no: &str,
    ) -> Result<Option<RefundRecord>> {
        refunds::get_refund_by_out_refund_no(self, merchant_id, out_refund_no).await
    }

    async fn get_refund_any(&self, id: payrail_domain::RefundId) -> Result<Option<RefundRecord>> {
        refunds::get_refund(self, None, id).await
    }

    async fn list_refunds(
        &self,
        merchant_id: MerchantId,
        payment_id: Option<PaymentId>,
        limit: u32,
        starting_after: Option<payrail_domain::RefundId>,
    ) -> Result<Vec<RefundRecord>> {
        refunds::list_refunds(self, merchant_id, payment_id, limit, starting_after).await
    }

    async fn apply_refund_transition(&self, t: &RefundTransition) -> Result<bool> {
        refunds::apply_refund_transition(self, t).await
    }

    async fn lease_jobs(
        &self,
        kind: &str,
        now_ms: i64,
        lease_ms: i64,
        limit: u32,
    ) -> Result<Vec<JobRecord>> {
        let kind = kind.to_string();
        self.write(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "UPDATE jobs SET run_at_ms = ?2 + ?3, attempts = attempts + 1 \
                     WHERE kind = ?1 AND subject_id IN (SELECT subject_id FROM jobs WHERE kind = ?1 AND run_at_ms <= ?2 ORDER BY run_at_ms LIMIT ?4) \
                     RETURNING {JOB_COLS}",
                ))
                .map_err(db_err)?;
            let rows = s.query_map(params![kind, now_ms, lease_ms, limit], job_row).map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn update_job(&self, update: &JobUpdate) -> Result<()> {
        let u = update.clone();
        self.write(move |c| apply_job_update(c, &u)).await
    }

    async fn count_jobs(&self, kind: &str) -> Result<i64> {
        let kind = kind.to_string();
        self.read(move |c| {
            c.query_row("SELECT COUNT(*) FROM jobs WHERE kind = ?1", [kind], |r| {
                r.get(0)
            })
            .map_err(db_err)
        })
        .await
    }

    async fn list_events(
        &self,
        merchant_id: MerchantId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>> {
        // Events leave the process from here (the feed, the events API): durable ones only.
        self.read_durable(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLS} FROM outbox WHERE merchant_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                ))
                .map_err(db_err)?;
            let rows = s.query_map(params![merchant_id.to_string(), after_seq, limit], event_row).map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn insert_alert(&self, a: &AlertRecord) -> Result<()> {
        let a = a.clone();
        self.write(move |c| {
            c.execute(
                &format!("INSERT INTO alerts ({ALERT_COLS}) VALUES (?1, ?2, ?3, ?4)"),
                params![a.kind, a.subject_id, a.detail, a.created_at_ms],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn list_job_subjects(&self, kind: &str, limit: u32) -> Result<Vec<String>> {
        let kind = kind.to_string();
        self.read(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT subject_id FROM jobs WHERE kind = ?1 ORDER BY run_at_ms, subject_id LIMIT ?2",
                )
                .map_err(db_err)?;
            let rows = s
                .query_map(params![kind, limit], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn insert_alert_once(&self, a: &AlertRecord) -> Result<bool> {
        let a = a.clone();
        self.write(move |c| {
            let n = c
                .execute(
                    &format!(
                        "INSERT INTO alerts ({ALERT_COLS}) SELECT ?1, ?2, ?3, ?4 \
                         WHERE NOT EXISTS (SELECT 1 FROM alerts WHERE kind = ?1 AND subject_id = ?2)"
                    ),
                    params![a.kind, a.subject_id, a.detail, a.created_at_ms],
                )
                .map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn list_alerts(&self, limit: u32) -> Result<Vec<AlertRecord>> {
        self.read(move |c| {
            let mut s = c
                .prepare_cached(&format!(
                    "SELECT {ALERT_COLS} FROM alerts ORDER BY seq DESC LIMIT ?1"
                ))
                .map_err(db_err)?;
            let rows = s
                .query_map([limit], |r| {
                    Ok(AlertRecord {
                        kind: r.get(0)?,
                        subject_id: r.get(1)?,
                        detail: r.get(2)?,
                        created_at_ms: r.get(3)?,
                    })
                })
                .map_err(db_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db_err)
        })
        .await
    }

    async fn prune(&self, p: &Prune) -> Result<u64> {
        let p = *p;
        self.write(move |c| {
            // Bounded deletes: the writer thread serves every request meanwhile.
            let a = c
                .prepare_cached(
                    "DELETE FROM request_nonce_claims WHERE (timestamp_s, key_id, nonce) IN \
                     (SELECT timestamp_s, key_id, nonce FROM request_nonce_claims WHERE timestamp_s < ?1 LIMIT ?2)",
                )
                .and_then(|mut s| s.execute(params![p.nonces_signed_before_s, p.limit]))
                .map_err(db_err)?;
            let b = c
                .prepare_cached(
                    "DELETE FROM idempotency_keys WHERE rowid IN \
                     (SELECT rowid FROM idempotency_keys WHERE created_at_ms < ?1 LIMIT ?2)",
                )
                .and_then(|mut s| s.execute(params![p.keys_created_before_ms, p.limit]))
                .map_err(db_err)?;
            Ok((a + b) as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn temp_store() -> SqliteStore {
        let dir = std::env::temp_dir()
            .join(format!("payrail-sqlite-unit-{}", now_ms()))
            .join(format!("{:?}", std::thread::current().id()).replace(['(', ')'], ""));
        SqliteStore::open(&dir.join("t.db")).unwrap()
    }

    /// Regression: when SQLite aborted the batch transaction, the writes after it in the same
    /// batch committed on their own (autocommit) while their callers were told they failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_that_aborts_the_transaction_fails_the_batch_and_nothing_commits_behind_it() {
        let store = Arc::new(temp_store());
        let put = |name: &'static str| {
            let store = store.clone();
            async move {
                store
                    .write(move |c| {
                        c.execute(
                            "INSERT INTO settings (name, value) VALUES (?1, 'v')",
                            [name],
                        )
                        .map_err(db_err)?;
                        Ok(())
                    })
                    .await
            }
        };
        // Hold the writer inside a batch so the next writes join it.
        let slow = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(|c| {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        c.execute(
                            "INSERT INTO settings (name, value) VALUES ('slow', 'v')",
                            [],
                        )
                        .map_err(db_err)?;
                        Ok(())
                    })
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let abort = {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(|c| {
                        // What SQLite does itself on SQLITE_FULL or SQLITE_IOERR.
                        c.execute_batch("ROLLBACK").map_err(db_err)?;
                        Err::<(), _>(StoreError::Database("simulated disk full".into()))
                    })
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let after = tokio::spawn(put("after"));
        assert!(abort.await.unwrap().is_err());
        let slow = slow.await.unwrap();
        let after = after.await.unwrap();
        // Every answer must match what is on disk.
        for (name, answer) in [("slow", slow.is_ok()), ("after", after.is_ok())] {
            let stored = store.get_setting(name).await.unwrap().is_some();
            assert_eq!(answer, stored, "{name}: told ok={answer}, stored={stored}");
        }
        assert!(put("later").await.is_ok(), "the writer keeps working");
    }

    fn insert_setting(name: String) -> impl FnOnce(&Connection) -> Result<()> + Send + 'static {
        move |c| {
            c.execute(
                "INSERT INTO settings (name, value) VALUES (?1, 'v')",
                [name],
            )
            .map_err(db_err)?;
            Ok(())
        }
    }

    /// The syncer, not COMMIT, makes writes durable: a write must not be answered before a WAL
    /// sync that followed its execution (writes in sequence, so no other sync is in flight).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_is_answered_only_after_a_wal_sync_that_followed_it() {
        let store = Arc::new(temp_store());
        for i in 0..50 {
            let health = store.health.clone();
            let name = format!("k{i}");
            let at_exec = store
                .write(move |c| {
                    insert_setting(name)(c)?;
                    Ok(health.syncs.load(std::sync::atomic::Ordering::Acquire))
                })
                .await
                .unwrap();
            let now = store
                .health
                .syncs
                .load(std::sync::atomic::Ordering::Acquire);
            assert!(
                now > at_exec,
                "write {i} answered before its sync ({at_exec} -> {now})"
            );
        }
        // Durability barriers with nothing new to sync do not call fdatasync.
        let before = store
            .health
            .syncs
            .load(std::sync::atomic::Ordering::Acquire);
        for _ in 0..5 {
            store.durable().await.unwrap();
        }
        assert_eq!(
            store
                .health
                .syncs
                .load(std::sync::atomic::Ordering::Acquire),
            before
        );
    }

    /// A barrier must sync whatever anyone committed since the last sync: another process's
    /// commits (here a second store on the same file) and DDL, neither of which moves this
    /// process's `total_changes` (review finding: the skip keyed on it acknowledged them
    /// unsynced).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_barrier_syncs_other_connections_commits_and_ddl() {
        let a = Arc::new(temp_store());
        let path = a.readers.path.clone();
        let b = SqliteStore::open(&path).unwrap();
        a.write(insert_setting("a1".into())).await.unwrap();
        let syncs = || a.health.syncs.load(std::sync::atomic::Ordering::Acquire);
        let before = syncs();
        a.durable().await.unwrap();
        assert_eq!(syncs(), before, "nothing new: no sync");
        b.write(insert_setting("b1".into())).await.unwrap();
        a.durable().await.unwrap();
        assert_eq!(
            syncs(),
            before + 1,
            "another connection's commit must be synced"
        );
        let before = syncs();
        a.write(|c| {
            c.execute_batch("CREATE TABLE ddl_only (x INTEGER)")
                .map_err(db_err)
        })
        .await
        .unwrap();
        assert_eq!(syncs(), before + 1, "a DDL commit must be synced");
    }

    /// fsyncgate: after a failed sync nothing can be trusted to be on disk, so the write is
    /// reported failed and every later write is refused; reads go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_fails_its_writes_and_refuses_later_ones() {
        let store = Arc::new(temp_store());
        store.write(insert_setting("before".into())).await.unwrap();
        store.check_writable().await.unwrap();
        store
            .health
            .fail_next_sync
            .store(true, std::sync::atomic::Ordering::Release);
        let err = store
            .write(insert_setting("failed".into()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("could not be synced"), "{err}");
        let err = store
            .write(insert_setting("later".into()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("restart"), "{err}");
        assert!(store.get_setting("later").await.unwrap().is_none());
        assert_eq!(
            store.get_setting("before").await.unwrap().as_deref(),
            Some("v")
        );
    }

    /// Checkpoints run on the syncer while the writer keeps writing; the WAL must still start
    /// over (the writer holds once per `WAL_RESTART_FRAMES`) instead of growing without bound.
    /// Every batch goes through the syncer thread here, as under load; when the writer syncs
    /// an idle batch itself, the checkpoint after it lets the WAL start over by itself
    /// (`the_wal_stays_bounded_whichever_thread_syncs`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_under_continuous_writes() {
        wal_under_continuous_writes(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_whichever_thread_syncs() {
        wal_under_continuous_writes(false).await;
    }

    async fn wal_under_continuous_writes(through_syncer: bool) {
        let store = Arc::new(temp_store());
        store
            .health
            .no_inline_sync
            .store(through_syncer, std::sync::atomic::Ordering::Relaxed);
        store
            .write(|c| {
                c.execute_batch("CREATE TABLE scratch (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
                    .map_err(db_err)
            })
            .await
            .unwrap();
        let wal = {
            let dir = store.readers.path.clone();
            let mut p = dir.into_os_string();
            p.push("-wal");
            std::path::PathBuf::from(p)
        };
        // ~120 MiB through the WAL in rows of 8 KiB (each at least two pages), from 8 writers
        // that never pause; bounded by a row count and a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            let wal = wal.clone();
            tasks.push(tokio::spawn(async move {
                let mut max_wal = 0u64;
                for _ in 0..1_900 {
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                    store
                        .write(|c| {
                            c.execute("INSERT INTO scratch (v) VALUES (zeroblob(8192))", [])
                                .map_err(db_err)?;
                            Ok(())
                        })
                        .await
                        .unwrap();
                    max_wal = max_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
                }
                max_wal
            }));
        }
        let mut max_wal = 0;
        for t in tasks {
            max_wal = max_wal.max(t.await.unwrap());
        }
        let rows: i64 = store
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM scratch", [], |r| r.get(0))
                    .map_err(db_err)
            })
            .await
            .unwrap();
        let holds = store
            .health
            .holds
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            rows > 10_000,
            "only {rows} rows written before the deadline"
        );
        if through_syncer {
            assert!(
                holds >= 2,
                "the WAL was never restarted ({holds} holds, {rows} rows)"
            );
        }
        // 4,096 frames of 4 KiB plus one batch (<= 512 writes of 3 pages) and headers.
        assert!(
            max_wal < 24 * 1024 * 1024,
            "WAL grew to {max_wal} bytes with {rows} rows written"
        );
    }
}
