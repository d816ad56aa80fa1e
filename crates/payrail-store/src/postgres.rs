//! The PostgreSQL store, for running several payrail processes against one database.
//!
//! Durability: every trait method is one transaction, committed with the server's default
//! `synchronous_commit`, so a commit is on disk before its caller hears back. Concurrency
//! between processes is the database's: version-guarded updates for status changes, row locks
//! for idempotency takeovers, `FOR UPDATE SKIP LOCKED` for job leases, and advisory locks for
//! migrations and for numbering outbox events after they commit (`sequence_outbox`).

use crate::common::*;
use crate::schema::MIGRATIONS;
use crate::*;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use payrail_domain::{AttemptStatus, PaymentStatus};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{NoTls, Row};

mod clearing;
mod payouts;
mod refunds;
mod webhooks;

const POOL_MAX: usize = 32;
const POOL_WAIT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Advisory lock keys ("payrail" followed by a number); transaction-scoped.
const MIGRATION_LOCK: i64 = 0x0070_6179_7261_696C;
const OUTBOX_LOCK: i64 = 0x0170_6179_7261_696C;

pub struct PgStore {
    pool: Pool,
}

type Params<'a> = [&'a (dyn ToSql + Sync)];

pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    StoreError::Database(e.to_string())
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Database(format!("connection pool: {e}"))
}

impl PgStore {
    /// Connects (lazily, up to 32 connections, no TLS) and applies migrations.
    pub async fn connect(url: &str) -> Result<PgStore> {
        let target = redact_url(url);
        let mut cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL {target}: {e}")))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(CONNECT_TIMEOUT);
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("payrail");
        }
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .filter(|p| !p.is_empty());
        // Errors below come from the server or the network and should not contain the password;
        // make sure of it anyway, and name the database without credentials.
        let scrub = |msg: String| {
            let msg = match &password {
                Some(p) => msg.replace(p.as_str(), "***"),
                None => msg,
            };
            format!("{target}: {msg}")
        };
        let manager = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_MAX)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Config(scrub(e.to_string())))?;
        let store = PgStore { pool };
        store.migrate().await.map_err(|e| match e {
            StoreError::Database(m) => StoreError::Database(scrub(m)),
            StoreError::Corrupt(m) => StoreError::Corrupt(scrub(m)),
            StoreError::Config(m) => StoreError::Config(scrub(m)),
            StoreError::Closed => StoreError::Closed,
            other @ StoreError::LedgerRefused { .. } => other,
        })?;
        Ok(store)
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(pool_err)
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        // Processes starting together queue here; the later ones then see the new version.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg_err)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)",
        )
        .await
        .map_err(pg_err)?;
        let current: i64 = tx
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
                &[],
            )
            .await
            .map_err(pg_err)
            .and_then(|r| get(&r, 0))?;
        let latest = MIGRATIONS.last().map(|m| m.version).unwrap_or(0);
        if current > latest {
            return Err(StoreError::Config(format!(
                "database schema version {current} is newer than this binary supports ({latest}); upgrade payrail"
            )));
        }
        for m in MIGRATIONS.iter().filter(|m| m.version > current) {
            tx.batch_execute(&crate::schema::render(m.sql, true))
                .await
                .map_err(pg_err)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES ($1, $2, $3)",
                &[&m.version, &m.name, &now_ms()],
            )
            .await
            .map_err(pg_err)?;
            tracing::info!(
                version = m.version,
                name = m.name,
                "postgres: migration applied"
            );
        }
        tx.commit().await.map_err(pg_err)
    }
}

// --- statements ----------------------------------------------------------------------------

async fn query<C: GenericClient>(c: &C, sql: &str, params: &Params<'_>) -> Result<Vec<Row>> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
    c.query(&stmt, params).await.map_err(pg_err)
}

async fn query_opt<C: GenericClient>(c: &C, sql: &str, params: &Params<'_>) -> Result<Option<Row>> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
    c.query_opt(&stmt, params).await.map_err(pg_err)
}

async fn query_one<C: GenericClient>(c: &C, sql: &str, params: &Params<'_>) -> Result<Row> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
    c.query_one(&stmt, params).await.map_err(pg_err)
}

async fn execute<C: GenericClient>(c: &C, sql: &str, params: &Params<'_>) -> Result<u64> {
    let stmt = c.prepare_cached(sql).await.map_err(pg_err)?;
    c.execute(&stmt, params).await.map_err(pg_err)
}

/// `$1, $2, …, $n`.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn map_rows<T>(rows: Vec<Row>, f: fn(&Row) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(f).collect()
}

// --- row mapping ---------------------------------------------------------------------------

fn get<'a, T: FromSql<'a>>(r: &'a Row, i: usize) -> Result<T> {
    r.try_get(i).map_err(pg_err)
}

fn get_id<T: FromStr>(r: &Row, i: usize) -> Result<T> {
    let s: &str = get(r, i)?;
    s.parse()
        .map_err(|_| StoreError::Corrupt(format!("bad id {s}")))
}

fn get_enum<T>(r: &Row, i: usize, parse: fn(&str) -> Option<T>) -> Result<T> {
    let s: &str = get(r, i)?;
    parse(s).ok_or_else(|| StoreError::Corrupt(format!("bad status {s}")))
}

fn merchant_row(r: &Row) -> Result<MerchantRecord> {
    Ok(MerchantRecord {
        id: get_id(r, 0)?,
        name: get(r, 1)?,
        status: get_enum(r, 2, MerchantStatus::parse)?,
        version: get(r, 3)?,
        created_at_ms: get(r, 4)?,
        updated_at_ms: get(r, 5)?,
    })
}

fn app_row(r: &Row) -> Result<AppRecord> {
    Ok(AppRecord {
        id: get_id(r, 0)?,
        merchant_id: get_id(r, 1)?,
        name: get(r, 2)?,
        key_id: get(r, 3)?,
        secret_ciphertext: get(r, 4)?,
        created_at_ms: get(r, 5)?,
    })
}

fn payment_row(r: &Row) -> Result<PaymentRecord> {
    Ok(PaymentRecord {
        id: get_id(r, 0)?,
        merchant_id: get_id(r, 1)?,
        app_id: get_id(r, 2)?,
        out_trade_no: get(r, 3)?,
        amount_minor: get(r, 4)?,
        currency: get(r, 5)?,
        subject: get(r, 6)?,
        method: get(r, 7)?,
        channel: get(r, 8)?,
        status: get_enum(r, 9, PaymentStatus::parse)?,
        version: get(r, 10)?,
        notify_url: get(r, 11)?,
        metadata: get(r, 12)?,
        channel_trade_no: get(r, 13)?,
        failure_code: get(r, 14)?,
        failure_message: get(r, 15)?,
        idempotency_key: get(r, 16)?,
        request_hash: get(r, 17)?,
        expires_at_ms: get(r, 18)?,
        paid_at_ms: get(r, 19)?,
        created_at_ms: get(r, 20)?,
        updated_at_ms: get(r, 21)?,
        amount_refunded_minor: get(r, 22)?,
        refund_reserved_minor: get(r, 23)?,
    })
}

fn attempt_row(r: &Row) -> Result<AttemptRecord> {
    Ok(AttemptRecord {
        id: get_id(r, 0)?,
        payment_id: get_id(r, 1)?,
        merchant_id: get_id(r, 2)?,
        channel: get(r, 3)?,
        status: get_enum(r, 4, AttemptStatus::parse)?,
        version: get(r, 5)?,
        channel_trade_no: get(r, 6)?,
        failure_code: get(r, 7)?,
        failure_message: get(r, 8)?,
        created_at_ms: get(r, 9)?,
        updated_at_ms: get(r, 10)?,
        channel_account_id: get::<Option<&str>>(r, 11)?
            .map(|s| {
                s.parse()
                    .map_err(|_| StoreError::Corrupt(format!("bad id {s}")))
            })
            .transpose()?,
    })
}

fn channel_account_row(r: &Row) -> Result<ChannelAccountRecord> {
    Ok(ChannelAccountRecord {
        id: get_id(r, 0)?,
        channel: get(r, 1)?,
        name: get(r, 2)?,
        status: get_enum(r, 3, ChannelAccountStatus::parse)?,
        priority: get(r, 4)?,
        config: get(r, 5)?,
        secrets_ciphertext: get(r, 6)?,
        version: get(r, 7)?,
        created_at_ms: get(r, 8)?,
        updated_at_ms: get(r, 9)?,
    })
}

fn job_row(r: &Row) -> Result<JobRecord> {
    Ok(JobRecord {
        kind: get(r, 0)?,
        subject_id: get(r, 1)?,
        run_at_ms: get(r, 2)?,
        attempts: get(r, 3)?,
        created_at_ms: get(r, 4)?,
    })
}

fn event_row(r: &Row) -> Result<EventRecord> {
    Ok(EventRecord {
        seq: get(r, 0)?,
        id: get(r, 1)?,
        merchant_id: get_id(r, 2)?,
        event_type: get(r, 3)?,
        object_id: get(r, 4)?,
        payload: get(r, 5)?,
        created_at_ms: get(r, 6)?,
    })
}

fn alert_row(r: &Row) -> Result<AlertRecord> {
    Ok(AlertRecord {
        kind: get(r, 0)?,
        subject_id: get(r, 1)?,
        detail: get(r, 2)?,
        created_at_ms: get(r, 3)?,
    })
}

// --- shared writes -------------------------------------------------------------------------

/// Inserts an outbox event without a position; [`sequence_outbox`] numbers it once committed.
/// (Numbering at insert time would follow insert order, and a reader paging by
/// `seq > last_seen` could skip a row that commits later with a lower number. Holding a lock
/// from insert to commit instead serialises every payment's commit: measured 567 vs 1,367
/// payments/s.)
async fn insert_event<C: GenericClient>(c: &C, e: &NewEvent) -> Result<()> {
    execute(
        c,
        "INSERT INTO outbox (id, merchant_id, event_type, object_id, payload, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&e.id, &e.merchant_id.to_string(), &e.event_type, &e.object_id, &e.payload, &e.created_at_ms],
    )
    .await?;
    Ok(())
}

/// Most outbox rows numbered in one pass.
const OUTBOX_SEQUENCE_BATCH: i64 = 10_000;

/// Numbers committed, unnumbered outbox rows. Passes are serialised by a transaction-scoped
/// advisory lock and only see committed rows, so every number handed out is greater than every
/// number any reader has seen: readers paging by `seq` never skip a row.
async fn sequence_outbox(client: &mut deadpool_postgres::Object) -> Result<()> {
    let tx = client.transaction().await.map_err(pg_err)?;
    execute(&tx, "SELECT pg_advisory_xact_lock($1)", &[&OUTBOX_LOCK]).await?;
    // The numbers are drawn in the sorted subquery, so they follow insertion order (the
    // `inserted` column, migration 5). (An `UPDATE … WHERE id IN (sorted subquery)` draws them
    // in whatever order the join visits the rows — heap order — and a merchant's events could
    // be read out of the order they were created in.)
    execute(
        &tx,
        "UPDATE outbox SET seq = numbered.position FROM \
         (SELECT id, nextval('outbox_position') AS position FROM \
          (SELECT id FROM outbox WHERE seq IS NULL ORDER BY inserted LIMIT $1) AS pending) AS numbered \
         WHERE outbox.id = numbered.id",
        &[&OUTBOX_SEQUENCE_BATCH],
    )
    .await?;
    tx.commit().await.map_err(pg_err)
}

/// `false` if the claim `done.token` is no longer the key's current one (taken over).
async fn complete_key<C: GenericClient>(c: &C, done: &IdempotencyCompletion) -> Result<bool> {
    let n = execute(
        c,
        "UPDATE idempotency_keys SET state = 'completed', response_status = $1, response_body = $2 \
         WHERE scope = $3 AND idem_key = $4 AND state = 'in_progress' AND lock_token = $5",
        &[&i64::from(done.status), &done.body, &done.scope, &done.key, &done.token],
    )
    .await?;
    Ok(n == 1)
}

/// Claims the nonce and the idempotency key of a request inside the caller's transaction.
/// On `NonceReused` nothing was written.
async fn admit_in<C: GenericClient>(tx: &C, req: &Admission) -> Result<AdmissionOutcome> {
    if let Some(n) = &req.nonce {
        // Claims a new nonce, or re-claims one whose previous use has expired.
        let claimed = execute(
            tx,
            "INSERT INTO request_nonce_claims (timestamp_s, key_id, nonce) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
            &[&n.timestamp_s, &n.key_id, &n.nonce],
        )
        .await?;
        if claimed == 0 {
            return Ok(AdmissionOutcome::NonceReused);
        }
    }
    let Some(k) = &req.idempotency else {
        return Ok(AdmissionOutcome::Admitted(None));
    };
    // A concurrent release can delete the row between our insert and our read; then the
    // key is free again and the next round claims it.
    for _ in 0..3 {
        let inserted = execute(
            tx,
            "INSERT INTO idempotency_keys (scope, idem_key, request_hash, state, locked_at_ms, created_at_ms, lock_token) \
             VALUES ($1, $2, $3, 'in_progress', $4, $4, $5) ON CONFLICT (scope, idem_key) DO NOTHING",
            &[&k.scope, &k.key, &k.request_hash, &k.now_ms, &k.token],
        )
        .await?;
        if inserted == 1 {
            return Ok(AdmissionOutcome::Admitted(Some(IdempotencyState::New)));
        }
        // FOR UPDATE: of several requests finding the same stale claim, one takes it over;
        // the others wait and then see the fresh lock time.
        let row = query_opt(
            tx,
            &format!("SELECT {IDEMPOTENCY_COLS} FROM idempotency_keys WHERE scope = $1 AND idem_key = $2 FOR UPDATE"),
            &[&k.scope, &k.key],
        )
        .await?;
        let Some(row) = row else { continue };
        let state = idempotency_state(
            k,
            get(&row, 0)?,
            get(&row, 1)?,
            get(&row, 2)?,
            get(&row, 3)?,
            get(&row, 4)?,
        );
        if state == IdempotencyState::New {
            // Takeover of a stale claim: the new token makes the old request's completion a
            // no-op.
            execute(
                tx,
                "UPDATE idempotency_keys SET locked_at_ms = $1, lock_token = $2 WHERE scope = $3 AND idem_key = $4",
                &[&k.now_ms, &k.token, &k.scope, &k.key],
            )
            .await?;
        }
        return Ok(AdmissionOutcome::Admitted(Some(state)));
    }
    Err(StoreError::Database(format!(
        "idempotency key {} keeps changing; try again",
        k.key
    )))
}

async fn apply_job_update<C: GenericClient>(c: &C, u: &JobUpdate) -> Result<()> {
    match u {
        JobUpdate::Schedule { kind, subject_id, run_at_ms, last_error } => {
            execute(
                c,
                "INSERT INTO jobs (kind, subject_id, run_at_ms, attempts, last_error, created_at_ms) VALUES ($1, $2, $3, 0, $4, $3) \
                 ON CONFLICT (kind, subject_id) DO UPDATE SET run_at_ms = EXCLUDED.run_at_ms, last_error = EXCLUDED.last_error",
                &[kind, subject_id, run_at_ms, last_error],
            )
            .await?
        }
        JobUpdate::Delete { kind, subject_id } => {
            execute(c, "DELETE FROM jobs WHERE kind = $1 AND subject_id = $2", &[kind, subject_id])
                .await?
        }
    };
    Ok(())
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn check_writable(&self) -> Result<()> {
        let c = self.client().await?;
        c.simple_query("SELECT 1").await.map_err(pg_err)?;
        Ok(())
    }

    async fn get_setting(&self, name: &str) -> Result<Option<String>> {
        let c = self.client().await?;
        query_opt(&c, "SELECT value FROM settings WHERE name = $1", &[&name])
            .await?
            .map(|r| get(&r, 0))
            .transpose()
    }

    async fn put_setting_if_absent(&self, name: &str, value: &str) -> Result<String> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        execute(
            &tx,
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &value],
        )
        .await?;
        let row = query_one(&tx, "SELECT value FROM settings WHERE name = $1", &[&name]).await?;
        let value = get(&row, 0)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(value)
    }

    async fn insert_merchant(&self, m: &MerchantRecord) -> Result<()> {
        let c = self.client().await?;
        execute(
            &c,
            &format!(
                "INSERT INTO merchants ({MERCHANT_COLS}) VALUES ({})",
                placeholders(6)
            ),
            &[
                &m.id.to_string(),
                &m.name,
                &m.status.as_str(),
                &m.version,
                &m.created_at_ms,
                &m.updated_at_ms,
            ],
        )
        .await?;
        Ok(())
    }

    async fn get_merchant(&self, id: MerchantId) -> Result<Option<MerchantRecord>> {
        let c = self.client().await?;
        query_opt(
            &c,
            &format!("SELECT {MERCHANT_COLS} FROM merchants WHERE id = $1"),
            &[&id.to_string()],
        )
        .await?
        .map(|r| merchant_row(&r))
        .transpose()
    }

    async fn list_merchants(
        &self,
        limit: u32,
        starting_after: Option<MerchantId>,
    ) -> Result<Vec<MerchantRecord>> {
        let c = self.client().await?;
        let limit = i64::from(limit);
        let rows = match starting_after {
            None => {
                query(
                    &c,
                    &format!("SELECT {MERCHANT_COLS} FROM merchants ORDER BY id DESC LIMIT $1"),
                    &[&limit],
                )
                .await?
            }
            Some(after) => {
                query(
                    &c,
                    &format!(
                    "SELECT {MERCHANT_COLS} FROM merchants WHERE id < $1 ORDER BY id DESC LIMIT $2"
                ),
                    &[&after.to_string(), &limit],
                )
                .await?
            }
        };
        map_rows(rows, merchant_row)
    }

    async fn get_attempt(&self, id: AttemptId) -> Result<Option<AttemptRecord>> {
        let c = self.client().await?;
        let row = query_opt(
            &c,
            &format!("SELECT {ATTEMPT_COLS} FROM payment_attempts WHERE id = $1"),
            &[&id.to_string()],
        )
        .await?;
        row.map(|r| attempt_row(&r)).transpose()
    }

    async fn insert_channel_account(&self, a: &ChannelAccountRecord) -> Result<()> {
        let c = self.client().await?;
        execute(
            &c,
            &format!(
                "INSERT INTO channel_accounts ({CHANNEL_ACCOUNT_COLS}) VALUES ({})",
                placeholders(10)
            ),
            &[
                &a.id.to_string(),
                &a.channel,
                &a.name,
                &a.status.as_str(),
                &a.priority,
                &a.config,
                &a.secrets_ciphertext,
                &a.version,
                &a.created_at_ms,
                &a.updated_at_ms,
            ],
        )
        .await?;
        Ok(())
    }

    async fn get_channel_account(
        &self,
        id: ChannelAccountId,
    ) -> Result<Option<ChannelAccountRecord>> {
        let c = self.client().await?;
        let row = query_opt(
            &c,
            &format!("SELECT {CHANNEL_ACCOUNT_COLS} FROM channel_accounts WHERE id = $1"),
            &[&id.to_string()],
        )
        .await?;
        row.map(|r| channel_account_row(&r)).transpose()
    }

    async fn list_channel_accounts(&self) -> Result<Vec<ChannelAccountRecord>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!("SELECT {CHANNEL_ACCOUNT_COLS} FROM channel_accounts ORDER BY id"),
            &[],
        )
        .await?;
        map_rows(rows, channel_account_row)
    }

    async fn set_channel_account_status(
        &self,
        id: ChannelAccountId,
        status: ChannelAccountStatus,
        now_ms: i64,
    ) -> Result<Option<ChannelAccountRecord>> {
        let c = self.client().await?;
        let id = id.to_string();
        execute(
            &c,
            "UPDATE channel_accounts SET status = $1, version = version + 1, updated_at_ms = $2 WHERE id = $3 AND status <> $1",
            &[&status.as_str(), &now_ms, &id],
        )
        .await?;
        let row = query_opt(
            &c,
            &format!("SELECT {CHANNEL_ACCOUNT_COLS} FROM channel_accounts WHERE id = $1"),
            &[&id],
        )
        .await?;
        row.map(|r| channel_account_row(&r)).transpose()
    }

    async fn set_merchant_status(
        &self,
        id: MerchantId,
        status: MerchantStatus,
        now_ms: i64,
    ) -> Result<Option<MerchantRecord>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        let id = id.to_string();
        execute(
            &tx,
            "UPDATE merchants SET status = $1, version = version + 1, updated_at_ms = $2 WHERE id = $3 AND status <> $1",
            &[&status.as_str(), &now_ms, &id],
        )
        .await?;
        let row = query_opt(
            &tx,
            &format!("SELECT {MERCHANT_COLS} FROM merchants WHERE id = $1"),
            &[&id],
        )
        .await?;
        let merchant = row.map(|r| merchant_row(&r)).transpose()?;
        tx.commit().await.map_err(pg_err)?;
        Ok(merchant)
    }

    async fn insert_app(&self, a: &AppRecord) -> Result<()> {
        let c = self.client().await?;
        execute(
            &c,
            &format!("INSERT INTO apps ({APP_COLS}) VALUES ({})", placeholders(6)),
            &[
                &a.id.to_string(),
                &a.merchant_id.to_string(),
                &a.name,
                &a.key_id,
                &a.secret_ciphertext,
                &a.created_at_ms,
            ],
        )
        .await?;
        Ok(())
    }

    async fn get_app_by_key_id(&self, key_id: &str) -> Result<Option<AppRecord>> {
        let c = self.client().await?;
        query_opt(
            &c,
            &format!("SELECT {APP_COLS} FROM apps WHERE key_id = $1"),
            &[&key_id],
        )
        .await?
        .map(|r| app_row(&r))
        .transpose()
    }

    async fn list_apps(&self, merchant_id: MerchantId) -> Result<Vec<AppRecord>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!("SELECT {APP_COLS} FROM apps WHERE merchant_id = $1 ORDER BY id"),
            &[&merchant_id.to_string()],
        )
        .await?;
        map_rows(rows, app_row)
    }

    async fn admit(&self, req: &Admission) -> Result<AdmissionOutcome> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        let outcome = admit_in(&tx, req).await?;
        if outcome == AdmissionOutcome::NonceReused {
            tx.rollback().await.map_err(pg_err)?;
        } else {
            tx.commit().await.map_err(pg_err)?;
        }
        Ok(outcome)
    }

    async fn complete_idempotency(&self, done: &IdempotencyCompletion) -> Result<bool> {
        let c = self.client().await?;
        complete_key(&c, done).await
    }

    async fn release_idempotency(&self, scope: &str, key: &str, token: &str) -> Result<()> {
        let c = self.client().await?;
        execute(
            &c,
            "DELETE FROM idempotency_keys WHERE scope = $1 AND idem_key = $2 AND state = 'in_progress' AND lock_token = $3",
            &[&scope, &key, &token],
        )
        .await?;
        Ok(())
    }

    async fn create_payment(&self, new: &NewPayment) -> Result<CreatePaymentOutcome> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        if let Some(admission) = &new.admission {
            let outcome = admit_in(&tx, admission).await?;
            let admitted = matches!(
                outcome,
                AdmissionOutcome::Admitted(None)
                    | AdmissionOutcome::Admitted(Some(IdempotencyState::New))
            );
            if !admitted {
                // Keep what the admission wrote (a takeover's lock time, say) unless nothing.
                if outcome == AdmissionOutcome::NonceReused {
                    tx.rollback().await.map_err(pg_err)?;
                } else {
                    tx.commit().await.map_err(pg_err)?;
                }
                return Ok(CreatePaymentOutcome::NotAdmitted(outcome));
            }
        }
        let p = &new.payment;
        let (merchant_id, out_trade_no) = (p.merchant_id.to_string(), &p.out_trade_no);
        // FOR SHARE: a concurrent freeze waits for this commit, so a payment is either created
        // before the freeze or refused after it.
        let status = tx
            .query_opt(
                "SELECT status FROM merchants WHERE id = $1 FOR SHARE",
                &[&merchant_id],
            )
            .await
            .map_err(pg_err)?
            .map(|r| r.get::<_, String>(0));
        if status.as_deref() != Some(MerchantStatus::Active.as_str()) {
            // Commit, not roll back: the admission in this transaction stands.
            tx.commit().await.map_err(pg_err)?;
            return Ok(CreatePaymentOutcome::MerchantNotActive);
        }
        let inserted = execute(
            &tx,
            &format!(
                "INSERT INTO payments ({PAYMENT_COLS}) VALUES ({}) ON CONFLICT (merchant_id, out_trade_no) DO NOTHING",
                placeholders(24)
            ),
            &[
                &p.id.to_string(), &merchant_id, &p.app_id.to_string(), out_trade_no, &p.amount_minor,
                &p.currency, &p.subject, &p.method, &p.channel, &p.status.as_str(), &p.version, &p.notify_url, &p.metadata,
                &p.channel_trade_no, &p.failure_code, &p.failure_message, &p.idempotency_key, &p.request_hash,
                &p.expires_at_ms, &p.paid_at_ms, &p.created_at_ms, &p.updated_at_ms, &p.amount_refunded_minor,
                &p.refund_reserved_minor,
            ],
        )
        .await?;
        if inserted == 0 {
            let row = query_one(
                &tx,
                &format!("SELECT {PAYMENT_COLS} FROM payments WHERE merchant_id = $1 AND out_trade_no = $2"),
                &[&merchant_id, out_trade_no],
            )
            .await?;
            let existing = payment_row(&row)?;
            tx.commit().await.map_err(pg_err)?;
            return Ok(CreatePaymentOutcome::DuplicateOutTradeNo(Box::new(
                existing,
            )));
        }
        let a = &new.attempt;
        execute(
            &tx,
            &format!(
                "INSERT INTO payment_attempts ({ATTEMPT_COLS}) VALUES ({})",
                placeholders(12)
            ),
            &[
                &a.id.to_string(),
                &a.payment_id.to_string(),
                &a.merchant_id.to_string(),
                &a.channel,
                &a.status.as_str(),
                &a.version,
                &a.channel_trade_no,
                &a.failure_code,
                &a.failure_message,
                &a.created_at_ms,
                &a.updated_at_ms,
                &a.channel_account_id.map(|i| i.to_string()),
            ],
        )
        .await?;
        if let Some(j) = &new.job {
            execute(
                &tx,
                "INSERT INTO jobs (kind, subject_id, run_at_ms, attempts, created_at_ms) VALUES ($1, $2, $3, 0, $4)",
                &[&j.kind, &j.subject_id, &j.run_at_ms, &p.created_at_ms],
            )
            .await?;
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(CreatePaymentOutcome::Created)
    }

    async fn get_payment(
        &self,
        merchant_id: MerchantId,
        id: PaymentId,
    ) -> Result<Option<PaymentRecord>> {
        let c = self.client().await?;
        query_opt(
            &c,
            &format!("SELECT {PAYMENT_COLS} FROM payments WHERE id = $1 AND merchant_id = $2"),
            &[&id.to_string(), &merchant_id.to_string()],
        )
        .await?
        .map(|r| payment_row(&r))
        .transpose()
    }

    async fn get_payment_by_out_trade_no(
        &self,
        merchant_id: MerchantId,
        out_trade_no: &str,
    ) -> Result<Option<PaymentRecord>> {
        let c = self.client().await?;
        query_opt(
            &c,
            &format!(
                "SELECT {PAYMENT_COLS} FROM payments WHERE merchant_id = $1 AND out_trade_no = $2"
            ),
            &[&merchant_id.to_string(), &out_trade_no],
        )
        .await?
        .map(|r| payment_row(&r))
        .transpose()
    }

    async fn get_payment_any(&self, id: PaymentId) -> Result<Option<PaymentRecord>> {
        let c = self.client().await?;
        query_opt(
            &c,
            &format!("SELECT {PAYMENT_COLS} FROM payments WHERE id = $1"),
            &[&id.to_string()],
        )
        .await?
        .map(|r| payment_row(&r))
        .transpose()
    }

    async fn list_payments(
        &self,
        merchant_id: MerchantId,
        limit: u32,
        starting_after: Option<PaymentId>,
    ) -> Result<Vec<PaymentRecord>> {
        let c = self.client().await?;
        let (merchant_id, limit) = (merchant_id.to_string(), i64::from(limit));
        let rows = match starting_after {
            None => {
                query(
                    &c,
                    &format!("SELECT {PAYMENT_COLS} FROM payments WHERE merchant_id = $1 ORDER BY id DESC LIMIT $2"),
                    &[&merchant_id, &limit],
                )
                .await?
            }
            Some(after) => {
                query(
                    &c,
                    &format!(
                        "SELECT {PAYMENT_COLS} FROM payments WHERE merchant_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
                    ),
                    &[&merchant_id, &after.to_string(), &limit],
                )
                .await?
            }
        };
        map_rows(rows, payment_row)
    }

    async fn get_attempts(&self, payment_id: PaymentId) -> Result<Vec<AttemptRecord>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!(
                "SELECT {ATTEMPT_COLS} FROM payment_attempts WHERE payment_id = $1 ORDER BY id"
            ),
            &[&payment_id.to_string()],
        )
        .await?;
        map_rows(rows, attempt_row)
    }

    async fn apply_transition(&self, t: &Transition) -> Result<bool> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        // Payment first, then attempt: every writer locks in this order, so no deadlocks.
        let n = execute(
            &tx,
            "UPDATE payments SET status = $1, version = version + 1, channel_trade_no = COALESCE($2, channel_trade_no), \
             failure_code = $3, failure_message = $4, paid_at_ms = COALESCE($5, paid_at_ms), updated_at_ms = $6 \
             WHERE id = $7 AND version = $8",
            &[
                &t.payment_status.as_str(), &t.channel_trade_no, &t.failure_code, &t.failure_message, &t.paid_at_ms,
                &t.now_ms, &t.payment_id.to_string(), &t.payment_version,
            ],
        )
        .await?;
        if n == 0 {
            tx.rollback().await.map_err(pg_err)?;
            return Ok(false);
        }
        let n = execute(
            &tx,
            "UPDATE payment_attempts SET status = $1, version = version + 1, channel_trade_no = COALESCE($2, channel_trade_no), \
             failure_code = $3, failure_message = $4, updated_at_ms = $5 WHERE id = $6 AND version = $7",
            &[
                &t.attempt_status.as_str(), &t.channel_trade_no, &t.failure_code, &t.failure_message, &t.now_ms,
                &t.attempt_id.to_string(), &t.attempt_version,
            ],
        )
        .await?;
        if n == 0 {
            tx.rollback().await.map_err(pg_err)?;
            return Ok(false);
        }
        if let Some(j) = &t.job {
            apply_job_update(&tx, j).await?;
        }
        if let Some(done) = &t.idempotency {
            if !complete_key(&tx, done).await? {
                // The payment's change stands; only the replay record belongs to the request
                // that took the key over.
                tracing::warn!(key = %done.key, "idempotency claim was taken over; response not saved");
            }
        }
        if let Some(e) = &t.event {
            insert_event(&tx, e).await?;
        }
        // Last: it plans the rest of the transaction per execution, and its row locks (the
        // merchant's pending balance) are held for the shortest time. An error drops `tx`,
        // which rolls the whole change back.
        if let Some(l) = &t.ledger {
            clearing::transition_ledger_in(&tx, l, t.now_ms).await?;
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(true)
    }

    async fn count_payments_by_status(
        &self,
        merchant_id: MerchantId,
    ) -> Result<Vec<(String, i64)>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            "SELECT status, COUNT(*) FROM payments WHERE merchant_id = $1 GROUP BY status ORDER BY status",
            &[&merchant_id.to_string()],
        )
        .await?;
        rows.iter().map(|r| Ok((get(r, 0)?, get(r, 1)?))).collect()
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
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!(
                "UPDATE jobs SET run_at_ms = $2::BIGINT + $3::BIGINT, attempts = attempts + 1 \
                 WHERE kind = $1 AND subject_id IN (SELECT subject_id FROM jobs WHERE kind = $1 AND run_at_ms <= $2 \
                 ORDER BY run_at_ms LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 RETURNING {JOB_COLS}"
            ),
            &[&kind, &now_ms, &lease_ms, &i64::from(limit)],
        )
        .await?;
        map_rows(rows, job_row)
    }

    async fn update_job(&self, update: &JobUpdate) -> Result<()> {
        let c = self.client().await?;
        apply_job_update(&c, update).await
    }

    async fn count_jobs(&self, kind: &str) -> Result<i64> {
        let c = self.client().await?;
        let row = query_one(&c, "SELECT COUNT(*) FROM jobs WHERE kind = $1", &[&kind]).await?;
        get(&row, 0)
    }

    async fn list_events(
        &self,
        merchant_id: MerchantId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<EventRecord>> {
        let mut c = self.client().await?;
        sequence_outbox(&mut c).await?;
        let rows = query(
            &c,
            &format!("SELECT {EVENT_COLS} FROM outbox WHERE merchant_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"),
            &[&merchant_id.to_string(), &after_seq, &i64::from(limit)],
        )
        .await?;
        map_rows(rows, event_row)
    }

    async fn insert_alert(&self, a: &AlertRecord) -> Result<()> {
        let c = self.client().await?;
        execute(
            &c,
            &format!("INSERT INTO alerts ({ALERT_COLS}) VALUES ($1, $2, $3, $4)"),
            &[&a.kind, &a.subject_id, &a.detail, &a.created_at_ms],
        )
        .await?;
        Ok(())
    }

    async fn list_job_subjects(&self, kind: &str, limit: u32) -> Result<Vec<String>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            "SELECT subject_id FROM jobs WHERE kind = $1 ORDER BY run_at_ms, subject_id LIMIT $2",
            &[&kind, &i64::from(limit)],
        )
        .await?;
        rows.iter().map(|r| get::<String>(r, 0)).collect()
    }

    async fn insert_alert_once(&self, a: &AlertRecord) -> Result<bool> {
        let c = self.client().await?;
        let n = execute(
            &c,
            &format!(
                "INSERT INTO alerts ({ALERT_COLS}) SELECT $1, $2, $3, $4 \
                 WHERE NOT EXISTS (SELECT 1 FROM alerts WHERE kind = $1 AND subject_id = $2)"
            ),
            &[&a.kind, &a.subject_id, &a.detail, &a.created_at_ms],
        )
        .await?;
        Ok(n == 1)
    }

    async fn list_alerts(&self, limit: u32) -> Result<Vec<AlertRecord>> {
        let c = self.client().await?;
        let rows = query(
            &c,
            &format!("SELECT {ALERT_COLS} FROM alerts ORDER BY seq DESC LIMIT $1"),
            &[&i64::from(limit)],
        )
        .await?;
        map_rows(rows, alert_row)
    }

    async fn prune(&self, p: &Prune) -> Result<u64> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(pg_err)?;
        let limit = i64::from(p.limit);
        let a = execute(
            &tx,
            "DELETE FROM request_nonce_claims WHERE (timestamp_s, key_id, nonce) IN \
             (SELECT timestamp_s, key_id, nonce FROM request_nonce_claims WHERE timestamp_s < $1 LIMIT $2)",
            &[&p.nonces_signed_before_s, &limit],
        )
        .await?;
        let b = execute(
            &tx,
            "DELETE FROM idempotency_keys WHERE (scope, idem_key) IN \
             (SELECT scope, idem_key FROM idempotency_keys WHERE created_at_ms < $1 LIMIT $2)",
            &[&p.keys_created_before_ms, &limit],
        )
        .await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(a + b)
    }
}
