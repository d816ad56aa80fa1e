//! The schema, as numbered migrations shared by both backends. `{serial}` becomes the backend's
//! auto-incrementing key type. A migration, once released, is never edited: add a new one.

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "payments foundation",
        sql: r#"
CREATE TABLE settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE merchants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'frozen')),
    version BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE apps (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL REFERENCES merchants(id),
    name TEXT NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    secret_ciphertext TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE INDEX apps_by_merchant ON apps (merchant_id, id);
CREATE TABLE payments (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    out_trade_no TEXT NOT NULL,
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    subject TEXT NOT NULL,
    method TEXT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('created', 'processing', 'succeeded', 'failed', 'closed', 'cancelled')),
    version BIGINT NOT NULL,
    notify_url TEXT,
    metadata TEXT NOT NULL,
    channel_trade_no TEXT,
    failure_code TEXT,
    failure_message TEXT,
    idempotency_key TEXT,
    request_hash TEXT,
    expires_at_ms BIGINT NOT NULL,
    paid_at_ms BIGINT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    UNIQUE (merchant_id, out_trade_no)
);
CREATE INDEX payments_by_merchant ON payments (merchant_id, id);
CREATE TABLE payment_attempts (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments(id),
    merchant_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'processing', 'succeeded', 'failed', 'closed', 'cancelled')),
    version BIGINT NOT NULL,
    channel_trade_no TEXT,
    failure_code TEXT,
    failure_message TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX attempts_by_payment ON payment_attempts (payment_id);
-- Invariant 3: at most one successful attempt per payment, enforced by the database too.
CREATE UNIQUE INDEX attempts_one_success ON payment_attempts (payment_id) WHERE status = 'succeeded';
CREATE TABLE idempotency_keys (
    scope TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('in_progress', 'completed')),
    response_status BIGINT,
    response_body TEXT,
    locked_at_ms BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (scope, idem_key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_ms);
CREATE TABLE request_nonces (
    key_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (key_id, nonce)
);
CREATE INDEX request_nonces_by_expiry ON request_nonces (expires_at_ms);
CREATE TABLE jobs (
    kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    run_at_ms BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (kind, subject_id)
);
CREATE INDEX jobs_due ON jobs (kind, run_at_ms);
-- `seq` is the event's position for readers paging with `seq > last_seen`; it must follow
-- commit order. SQLite's single writer gives that directly. On PostgreSQL a sequence would
-- follow insert order instead, so rows are inserted without a position and readers first
-- number the committed ones (see postgres.rs, `sequence_outbox`).
CREATE TABLE outbox (
    seq {outbox_seq},
    id TEXT NOT NULL UNIQUE,
    merchant_id TEXT NOT NULL,
    event_type TEXT NOT NULL,
    object_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    published_at_ms BIGINT
);
CREATE INDEX outbox_by_merchant ON outbox (merchant_id, seq);
{outbox_position}
CREATE TABLE alerts (
    seq {serial},
    kind TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    detail TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
"#,
    },
    Migration {
        version: 2,
        name: "idempotency claim tokens",
        sql: r#"
-- Only the request holding the current claim of a key may complete or release it.
ALTER TABLE idempotency_keys ADD COLUMN lock_token TEXT;
-- Nonces are unique per key and signed timestamp, and kept in timestamp order: the random
-- (key_id, nonce) primary key put every insert on a random index page (one 4 KiB page written
-- per request). Old claims carry their timestamp in their expiry (timestamp + 360 s).
CREATE TABLE request_nonce_claims (
    timestamp_s BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    PRIMARY KEY (timestamp_s, key_id, nonce)
) {without_rowid};
INSERT INTO request_nonce_claims (timestamp_s, key_id, nonce)
    SELECT expires_at_ms / 1000 - 360, key_id, nonce FROM request_nonces;
DROP TABLE request_nonces;
-- Alerts raised once per subject (for example an expired payment the channel never resolves).
CREATE INDEX alerts_by_subject ON alerts (kind, subject_id);
"#,
    },
    Migration {
        version: 3,
        name: "refunds",
        sql: r#"
-- Invariant 7, in the payment's own row: refunds processing or succeeded are reserved, refunds
-- succeeded are refunded, and refunded <= reserved <= paid. A new refund reserves its amount with
-- a conditional update of this row in the same transaction as its insert; a failed one releases
-- it, a succeeded one moves it to refunded, each with its status change. The CHECK is the
-- backstop: a write that would break the order fails and changes nothing.
ALTER TABLE payments ADD COLUMN amount_refunded_minor BIGINT NOT NULL DEFAULT 0;
ALTER TABLE payments ADD COLUMN refund_reserved_minor BIGINT NOT NULL DEFAULT 0
    CHECK (amount_refunded_minor >= 0 AND amount_refunded_minor <= refund_reserved_minor AND refund_reserved_minor <= amount_minor);
-- Refunds recorded, failed ones included (a channel's limit per payment: WeChat 50).
ALTER TABLE payments ADD COLUMN refund_count BIGINT NOT NULL DEFAULT 0 CHECK (refund_count >= 0);
CREATE TABLE refunds (
    id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL REFERENCES payments(id),
    attempt_id TEXT NOT NULL REFERENCES payment_attempts(id),
    merchant_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    out_refund_no TEXT NOT NULL,
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    reason TEXT,
    channel TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('processing', 'succeeded', 'failed')),
    version BIGINT NOT NULL,
    channel_refund_no TEXT,
    failure_code TEXT,
    failure_message TEXT,
    notify_url TEXT,
    metadata TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash TEXT,
    requested_at_ms BIGINT NOT NULL,
    refunded_at_ms BIGINT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    UNIQUE (merchant_id, out_refund_no)
);
CREATE INDEX refunds_by_merchant ON refunds (merchant_id, id);
CREATE INDEX refunds_by_payment ON refunds (payment_id, id);
"#,
    },
    Migration {
        version: 4,
        name: "channel accounts",
        sql: r#"
-- An operator-configured account at a channel. `config` holds the public settings (endpoint,
-- merchant ids, the channel's public key); `secrets_ciphertext` the private keys, encrypted
-- under the master key and bound to the account id.
CREATE TABLE channel_accounts (
    id TEXT PRIMARY KEY,
    channel TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
    priority BIGINT NOT NULL,
    config TEXT NOT NULL,
    secrets_ciphertext TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
-- Which account an attempt went to: queries, closes, cancels and refunds must go to the same
-- one, even after the account is disabled for new payments. NULL for built-in channels.
ALTER TABLE payment_attempts ADD COLUMN channel_account_id TEXT;
"#,
    },
    Migration {
        version: 5,
        name: "merchant webhooks",
        sql: r#"
-- Durable read positions in the outbox (`seq`), one per consumer. The webhook dispatcher moves
-- its cursor in the same transaction as the deliveries it schedules, so an event is scheduled
-- exactly once even across crashes and several worker processes. Events written before this
-- migration predate webhooks and are not delivered.
CREATE TABLE outbox_cursors (
    name TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
INSERT INTO outbox_cursors (name, seq, updated_at_ms)
    SELECT 'webhooks', COALESCE(MAX(seq), 0), 0 FROM outbox;
-- PostgreSQL numbers committed events after the fact (`sequence_outbox`); it numbers the ones
-- of one pass in the order they were inserted, so a merchant's events are read in the order
-- they were created (also when creation times from several processes disagree). SQLite numbers
-- at insert time (its single writer) and needs nothing.
{outbox_insert_order}
-- One row per event that has a notify URL: where it goes and how far delivery got. Its
-- `webhook` job (jobs table, subject = event id) is due when the next attempt is.
CREATE TABLE webhook_deliveries (
    event_id TEXT PRIMARY KEY,
    event_seq BIGINT NOT NULL,
    merchant_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    url TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts BIGINT NOT NULL,
    auto_attempts BIGINT NOT NULL,
    manual_attempts BIGINT NOT NULL,
    next_attempt_at_ms BIGINT,
    manual_due_at_ms BIGINT,
    version BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (status);
-- The delivery log: one row per attempt, kept for the merchant and the operator.
CREATE TABLE webhook_attempts (
    event_id TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    merchant_id TEXT NOT NULL,
    trigger_kind TEXT NOT NULL CHECK (trigger_kind IN ('schedule', 'manual')),
    url TEXT NOT NULL,
    status_code BIGINT,
    error TEXT,
    message TEXT,
    latency_ms BIGINT NOT NULL,
    response_body TEXT,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (event_id, attempt)
);
"#,
    },
    Migration {
        version: 6,
        name: "ledger",
        sql: LEDGER_SQL,
    },
    Migration {
        version: 7,
        name: "clearing and settlement",
        sql: CLEARING_SQL,
    },
    Migration {
        version: 8,
        name: "payouts",
        sql: PAYOUTS_SQL,
    },
];

/// Payouts of merchants' available balances to their banks (docs/ledger.md, "Payouts"). Touches
/// no table of another migration, so it can be renumbered when migrations from other branches
/// land. The money itself is in the ledger: a payout's row is inserted in the transaction that
/// posts `po_…:payout`, and a failed one's status change posts `po_…:payout_reversal`.
const PAYOUTS_SQL: &str = r#"
CREATE TABLE payouts (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    out_payout_no TEXT NOT NULL,
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    description TEXT,
    bank TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('processing', 'paid', 'failed')),
    version BIGINT NOT NULL CHECK (version >= 1),
    bank_reference TEXT,
    failure_code TEXT,
    failure_message TEXT,
    notify_url TEXT,
    idempotency_key TEXT,
    request_hash TEXT,
    paid_at_ms BIGINT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    UNIQUE (merchant_id, out_payout_no),
    -- A paid payout says when; a failed one says why; only a paid one has a payment time.
    CHECK ((status = 'paid') = (paid_at_ms IS NOT NULL)),
    CHECK (status <> 'failed' OR failure_code IS NOT NULL)
);
CREATE INDEX payouts_by_merchant ON payouts (merchant_id, id);
-- The operator's list by status (the processing ones above all).
CREATE INDEX payouts_by_status ON payouts (status, id);
"#;

/// Fee plans, settlement cycles, the clearing rows of payments and refunds, settlement batches
/// (docs/ledger.md). Changes no table of another migration (it adds one PostgreSQL index on
/// ledger postings), so it can be renumbered when migrations from other branches land.
const CLEARING_SQL: &str = r#"
-- Clearing rules per merchant x channel x method x currency; '' in a key part matches anything.
-- The most specific plan wins (merchant, then channel, then method).
CREATE TABLE fee_plans (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    method TEXT NOT NULL,
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    rate_bps BIGINT NOT NULL CHECK (rate_bps >= 0 AND rate_bps <= 10000),
    fixed_minor BIGINT NOT NULL CHECK (fixed_minor >= 0),
    min_minor BIGINT NOT NULL CHECK (min_minor >= 0),
    max_minor BIGINT CHECK (max_minor IS NULL OR max_minor >= min_minor),
    channel_cost_bps BIGINT NOT NULL CHECK (channel_cost_bps >= 0 AND channel_cost_bps <= 10000),
    channel_cost_fixed_minor BIGINT NOT NULL CHECK (channel_cost_fixed_minor >= 0),
    fee_refund TEXT NOT NULL CHECK (fee_refund IN ('keep', 'proportional')),
    channel_cost_refund TEXT NOT NULL CHECK (channel_cost_refund IN ('keep', 'proportional')),
    version BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    UNIQUE (merchant_id, channel, method, currency)
);
-- T+N with a day cut-off at a local time and a fixed UTC offset; merchant_id '' = the default.
CREATE TABLE settlement_cycles (
    merchant_id TEXT PRIMARY KEY,
    t_plus_days BIGINT NOT NULL CHECK (t_plus_days >= 0 AND t_plus_days <= 30),
    cutoff TEXT NOT NULL,
    utc_offset_minutes BIGINT NOT NULL CHECK (utc_offset_minutes >= -720 AND utc_offset_minutes <= 840),
    updated_at_ms BIGINT NOT NULL
);
-- One row per succeeded payment, inserted with its status change and its ledger entry (WITHOUT
-- ROWID on SQLite: one B-tree keyed by the payment, not a table plus a key index): the fee
-- fixed at that moment, and the residual (what of it the merchant still holds: net minus its
-- refunds' merchant shares). Unsettled, the residual is in merchant_pending; a settlement batch
-- marks the row and moves the residual to merchant_available.
CREATE TABLE payment_clearing (
    payment_id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    channel TEXT NOT NULL,
    method TEXT NOT NULL,
    wallet_id TEXT,
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    fee_minor BIGINT NOT NULL CHECK (fee_minor >= 0 AND fee_minor <= amount_minor),
    channel_cost_minor BIGINT NOT NULL CHECK (channel_cost_minor >= 0 AND channel_cost_minor <= amount_minor),
    fee_plan_id TEXT,
    fee_refund TEXT NOT NULL CHECK (fee_refund IN ('keep', 'proportional')),
    channel_cost_refund TEXT NOT NULL CHECK (channel_cost_refund IN ('keep', 'proportional')),
    entry_id TEXT NOT NULL,
    cleared_at_ms BIGINT NOT NULL,
    refunded_minor BIGINT NOT NULL CHECK (refunded_minor >= 0 AND refunded_minor <= amount_minor),
    residual_minor BIGINT NOT NULL CHECK (residual_minor >= 0 AND residual_minor <= amount_minor - fee_minor),
    settlement_id TEXT
){without_rowid};
CREATE INDEX payment_clearing_unsettled ON payment_clearing (merchant_id, currency, cleared_at_ms)
    WHERE settlement_id IS NULL;
CREATE INDEX payment_clearing_by_settlement ON payment_clearing (settlement_id, cleared_at_ms)
    WHERE settlement_id IS NOT NULL;
-- One row per succeeded refund, inserted with its status change and its ledger entry: where its
-- merchant share came from (pending, available, suspense).
CREATE TABLE refund_clearing (
    refund_id TEXT PRIMARY KEY,
    payment_id TEXT NOT NULL,
    merchant_id TEXT NOT NULL,
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    fee_refund_minor BIGINT NOT NULL CHECK (fee_refund_minor >= 0),
    cost_refund_minor BIGINT NOT NULL CHECK (cost_refund_minor >= 0),
    from_pending_minor BIGINT NOT NULL CHECK (from_pending_minor >= 0),
    from_available_minor BIGINT NOT NULL CHECK (from_available_minor >= 0),
    from_suspense_minor BIGINT NOT NULL CHECK (from_suspense_minor >= 0),
    entry_id TEXT NOT NULL,
    cleared_at_ms BIGINT NOT NULL,
    settlement_id TEXT,
    CHECK (from_pending_minor + from_available_minor + from_suspense_minor + fee_refund_minor = amount_minor)
){without_rowid};
CREATE INDEX refund_clearing_by_payment ON refund_clearing (payment_id);
-- Settlement batches: one per merchant, currency and business day, whatever runs them.
CREATE TABLE settlements (
    id TEXT PRIMARY KEY,
    merchant_id TEXT NOT NULL,
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    business_day TEXT NOT NULL,
    t_plus_days BIGINT NOT NULL,
    cutoff TEXT NOT NULL,
    utc_offset_minutes BIGINT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    window_end_ms BIGINT NOT NULL,
    due_at_ms BIGINT NOT NULL,
    payment_count BIGINT NOT NULL,
    refund_count BIGINT NOT NULL,
    gross_minor BIGINT NOT NULL,
    fee_minor BIGINT NOT NULL,
    refunded_minor BIGINT NOT NULL,
    fee_refunded_minor BIGINT NOT NULL,
    net_minor BIGINT NOT NULL CHECK (net_minor >= 0),
    entry_id TEXT,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (merchant_id, currency, business_day)
);
CREATE INDEX settlements_by_merchant ON settlements (merchant_id, id);
{merchant_postings_index}
"#;

/// PostgreSQL keeps no per-posting history for a buffered account, and a merchant's pending
/// balance is buffered (hot), so its postings are found through this index instead. Only the
/// merchant accounts are indexed (a range on the id; the ledger's own benchmark accounts are
/// not), and SQLite needs none: it writes every account's history chain.
const PG_MERCHANT_POSTINGS_INDEX: &str = "CREATE INDEX ledger_postings_by_merchant \
     ON ledger_postings (account_id, entry_seq, leg) \
     WHERE account_id >= 'merchant' AND account_id < 'merchanu';";

/// The double-entry ledger (docs/ledger.md). Self-contained: it touches no table of another
/// migration, so it can be renumbered when migrations from other branches land.
///
/// Write-path cost drives the layout: on SQLite every page a commit touches is written whole to
/// the WAL, so the per-posting tables are keyed by an ever-growing entry sequence number (appends)
/// and there is **no per-account index on postings** (measured: one doubled the commit time at
/// 10,000 accounts). An account's history is a chain instead: each posting row links to the
/// account's previous posting and carries the account's counters after it, and every
/// `HISTORY_CHECKPOINT_EVERY`-th posting of an account is also indexed in
/// `ledger_balance_history`, so a balance at a past time is found by a seek plus a bounded walk.
const LEDGER_SQL: &str = r#"
-- One row per account, named kind:owner:CUR: what the account is. Never updated.
CREATE TABLE ledger_accounts (
    id TEXT PRIMARY KEY,
    account_no BIGINT NOT NULL,
    kind TEXT NOT NULL,
    currency TEXT NOT NULL CHECK (length(currency) = 3),
    flags BIGINT NOT NULL CHECK (flags >= 0 AND flags < 8),
    created_at_ms BIGINT NOT NULL
){without_rowid};
-- What changes: the counters, kept apart so that the rows every commit rewrites are narrow
-- (measured: ~40 % less commit time than one wide row at 10,000 accounts on SQLite). The four
-- counters only grow, except that pending amounts leave when a hold is posted, voided or
-- expires. No-overdraft is enforced by the posting code and, as a last line of defence, by these
-- CHECKs (`flags` is copied here for them).
CREATE TABLE ledger_balances (
    account_no {ledger_seq},
    flags BIGINT NOT NULL,
    debits_pending BIGINT NOT NULL CHECK (debits_pending >= 0),
    debits_posted BIGINT NOT NULL CHECK (debits_posted >= 0),
    credits_pending BIGINT NOT NULL CHECK (credits_pending >= 0),
    credits_posted BIGINT NOT NULL CHECK (credits_posted >= 0),
    version BIGINT NOT NULL,
    last_posted_at_ms BIGINT NOT NULL,
    last_entry_seq BIGINT,
    last_leg BIGINT,
    CHECK ((flags & 1) = 0 OR debits_pending + debits_posted <= credits_posted),
    CHECK ((flags & 2) = 0 OR credits_pending + credits_posted <= debits_posted)
);
-- Journal entries. `id` is the caller's idempotency key; `seq` orders entries and keys postings.
CREATE TABLE ledger_entries (
    seq {ledger_seq},
    id TEXT NOT NULL UNIQUE,
    code TEXT NOT NULL,
    phase TEXT NOT NULL CHECK (phase IN ('posted', 'pending', 'post_pending', 'void_pending')),
    currency TEXT,
    reference TEXT,
    pending_id TEXT,
    timeout_ms BIGINT,
    body_hash TEXT NOT NULL,
    posted_at_ms BIGINT NOT NULL
);
-- Postings. The history columns are null for a buffered (hot) account on PostgreSQL, whose
-- history is kept per flush in ledger_balance_history instead.
CREATE TABLE ledger_postings (
    entry_seq BIGINT NOT NULL,
    leg BIGINT NOT NULL,
    account_id TEXT NOT NULL,
    side TEXT NOT NULL CHECK (side IN ('D', 'C')),
    amount_minor BIGINT NOT NULL CHECK (amount_minor > 0),
    pending BIGINT NOT NULL CHECK (pending IN (0, 1)),
    posted_at_ms BIGINT NOT NULL,
    account_version BIGINT,
    debits_posted_after BIGINT,
    credits_posted_after BIGINT,
    prev_entry_seq BIGINT,
    prev_leg BIGINT,
    PRIMARY KEY (entry_seq, leg)
){without_rowid};
-- The hold of each two-phase entry and what became of it.
CREATE TABLE ledger_holds (
    entry_id TEXT PRIMARY KEY,
    entry_seq BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'posted', 'voided', 'expired')),
    resolved_by TEXT
);
CREATE INDEX ledger_holds_due ON ledger_holds (expires_at_ms) WHERE state = 'pending';
-- Balance checkpoints: every HISTORY_CHECKPOINT_EVERY-th posting of an account (entry_seq and
-- leg name it), and every flush of a buffered account (entry_seq null).
CREATE TABLE ledger_balance_history (
    account_id TEXT NOT NULL,
    posted_at_ms BIGINT NOT NULL,
    account_version BIGINT NOT NULL,
    debits_posted BIGINT NOT NULL,
    credits_posted BIGINT NOT NULL,
    entry_seq BIGINT,
    leg BIGINT,
    PRIMARY KEY (account_id, posted_at_ms, account_version)
){without_rowid};
-- Balance changes of buffered accounts not yet applied (PostgreSQL; the SQLite writer applies
-- them in the same batch). Deleted by the flush that applies them.
CREATE TABLE ledger_buffered (
    seq {serial},
    account_id TEXT NOT NULL,
    debits_pending BIGINT NOT NULL,
    debits_posted BIGINT NOT NULL,
    credits_pending BIGINT NOT NULL,
    credits_posted BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
{ledger_immutable}
"#;

pub const SQLITE_SERIAL: &str = "INTEGER PRIMARY KEY AUTOINCREMENT";
pub const PG_SERIAL: &str = "BIGSERIAL PRIMARY KEY";

/// A migration's SQL for SQLite or (`postgres = true`) PostgreSQL.
pub fn render(sql: &str, postgres: bool) -> String {
    let sql = render_ledger(sql, postgres).replace(
        "{merchant_postings_index}",
        if postgres {
            PG_MERCHANT_POSTINGS_INDEX
        } else {
            ""
        },
    );
    if postgres {
        // Outbox positions: null until numbered after commit, unique once numbered.
        sql.replace("{outbox_seq}", "BIGINT UNIQUE")
            .replace("{outbox_position}", "CREATE SEQUENCE outbox_position;")
            .replace("{serial}", PG_SERIAL)
            .replace("{without_rowid}", "")
            .replace(
                "{outbox_insert_order}",
                "ALTER TABLE outbox ADD COLUMN inserted BIGSERIAL;",
            )
    } else {
        sql.replace("{outbox_seq}", SQLITE_SERIAL)
            .replace("{outbox_position}", "")
            .replace("{serial}", SQLITE_SERIAL)
            .replace("{without_rowid}", "WITHOUT ROWID")
            .replace("{outbox_insert_order}", "")
    }
}

/// The ledger migration's placeholders.
fn render_ledger(sql: &str, postgres: bool) -> String {
    if postgres {
        sql.replace("{ledger_seq}", PG_SERIAL)
            .replace("{without_rowid}", "")
            .replace("{ledger_immutable}", PG_LEDGER_IMMUTABLE)
    } else {
        // A plain INTEGER PRIMARY KEY is the rowid: appends with no separate index, and no
        // AUTOINCREMENT bookkeeping row to rewrite at every commit. Entries are never deleted,
        // so rowids are never reused. WITHOUT ROWID stores rows in their key's B-tree: one tree
        // per table instead of two.
        sql.replace("{ledger_seq}", "INTEGER PRIMARY KEY")
            .replace("{without_rowid}", " WITHOUT ROWID")
            .replace("{ledger_immutable}", SQLITE_LEDGER_IMMUTABLE)
    }
}

/// Entries and postings are never updated or deleted: a correction is a reversing entry.
const SQLITE_LEDGER_IMMUTABLE: &str = r#"
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END;
CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries
BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END;
CREATE TRIGGER ledger_postings_no_update BEFORE UPDATE ON ledger_postings
BEGIN SELECT RAISE(ABORT, 'ledger postings are immutable'); END;
CREATE TRIGGER ledger_postings_no_delete BEFORE DELETE ON ledger_postings
BEGIN SELECT RAISE(ABORT, 'ledger postings are immutable'); END;
"#;

const PG_LEDGER_IMMUTABLE: &str = r#"
CREATE FUNCTION ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger rows are immutable (%)', TG_TABLE_NAME;
END
$$;
CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_immutable();
CREATE TRIGGER ledger_postings_immutable BEFORE UPDATE OR DELETE ON ledger_postings
    FOR EACH ROW EXECUTE FUNCTION ledger_immutable();
"#;
