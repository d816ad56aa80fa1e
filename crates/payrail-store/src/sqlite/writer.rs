//! The SQLite write pipeline: one writer thread executes and commits, one syncer thread makes
//! the commits durable, and nobody hears back before the syncer has.
//!
//! Why two threads: with `synchronous=FULL` SQLite fsyncs the WAL inside COMMIT, so the only
//! writer sat idle for every fsync, and nothing else may write meanwhile — measured, the writer
//! thread was off-CPU a third of the time under load (docs/BENCHMARKS.md). Here the writer's
//! connection runs `synchronous=NORMAL`, which in WAL mode appends the commit's frames to the WAL
//! without syncing, and hands the batch's replies to the syncer. The syncer calls
//! `fdatasync(2)` on the WAL file and only then answers every batch whose frames were written
//! before that call started, while the writer already executes the next batch. A commit is
//! answered only once it is on disk, exactly as before; what changes is that the fsync of
//! batch N overlaps the execution of batch N+1.
//!
//! Why this is as durable as `synchronous=FULL`:
//! - the WAL is append-only between checkpoints, and one `fdatasync` of the file covers every
//!   frame written to it before the call, whichever batch or process wrote it;
//! - in NORMAL mode SQLite itself syncs the WAL before every checkpoint and the database file
//!   after it, and syncs the WAL header when the WAL starts over; so a frame that a checkpoint
//!   consumed is durable in the database file before the WAL that held it can be overwritten;
//! - the WAL file is found by path and checked by inode at every sync: SQLite deletes it only
//!   when the last connection closes (after a full checkpoint), and the writer's connection stays
//!   open for the life of the store.
//!
//! What other connections see: a reader can see a commit up to one fsync before it is durable
//! (as with any write-back of SQLite's NORMAL mode). Nothing leaves the process on the strength
//! of such a read: the outbox readers (webhooks, the event feed) pass a durability barrier first
//! ([`super::SqliteStore::durable`]), and every write is answered only after its sync.
//!
//! If `fdatasync` fails, nothing after it can be trusted to be on disk (the kernel may have
//! dropped the dirty pages: the PostgreSQL "fsyncgate" lesson), so the store stops: every
//! waiting and later write fails until the process restarts and SQLite recovers from the WAL.

use super::*;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;

/// Batches committed but not yet synced; the writer waits (backpressure) beyond this. One batch
/// at most is ever with the syncer, so this is slack, not a queue.
const SYNC_QUEUE_MAX: usize = 4;
/// The syncer checkpoints at most this often (passive: the writer keeps working meanwhile).
const CHECKPOINT_INTERVAL_MS: u64 = 50;
/// WAL frames (pages) after which the writer pauses once so that the WAL can start over: ~16 MiB.
const WAL_RESTART_FRAMES: i64 = 4_096;

pub(super) type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;
/// Gets the writer's connection inside the batch transaction, or the reason there is none (the
/// batch could not begin): then the job must not touch the database.
pub(super) type WriteJob = Box<dyn FnOnce(Result<&Connection, &str>) -> Reply + Send>;

/// A committed batch on its way to disk.
#[derive(Default)]
struct Committed {
    replies: Vec<Reply>,
}

/// What the syncer tells the writer when it is free again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Done {
    /// Commit the next batch whenever there is one.
    Go,
    /// Commit what is open now (even nothing) and begin nothing new until the next `Done`:
    /// the checkpoint after that commit leaves the WAL fully copied into the database with no
    /// transaction in between, so the writer's next transaction starts the WAL over.
    Hold,
}

/// Shared by the writer, the syncer and the store.
#[derive(Default)]
pub(super) struct Health {
    /// Set when a sync failed: from then on no write is accepted.
    failed: AtomicBool,
    /// WAL syncs done (`fdatasync` calls that succeeded).
    pub(super) syncs: std::sync::atomic::AtomicU64,
    /// WAL restarts asked of the writer (holds).
    pub(super) holds: std::sync::atomic::AtomicU64,
    /// Tests: the next sync fails as if the disk had refused it.
    #[cfg(test)]
    pub(super) fail_next_sync: AtomicBool,
    /// Tests: every batch goes through the syncer thread (the path under load).
    #[cfg(test)]
    pub(super) no_inline_sync: AtomicBool,
}

pub(super) const STORE_FAILED: &str =
    "the database could not be synced to disk; writes are refused until payrail restarts";

impl Health {
    pub(super) fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

/// What the writer thread waits for.
pub(super) enum WriterMsg {
    Job(WriteJob),
}

/// Starts the writer and syncer threads on `conn` (already migrated).
pub(super) fn start(
    conn: Connection,
    db_path: &Path,
) -> Result<(mpsc::Sender<WriterMsg>, Arc<Health>)> {
    // NORMAL on this connection: its commits are synced by the syncer, not inside COMMIT. No
    // automatic checkpoint either: the syncer checkpoints, off the writer's path.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(db_err)?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(db_err)?;
    // The checkpointer's own connection (FULL: a checkpoint syncs the WAL before it copies
    // and the database file after).
    let ckpt = open_connection(db_path)?;
    let syncer: SharedSyncer = Arc::new(std::sync::Mutex::new(Syncer {
        wal_path: wal_path(db_path),
        wal: None,
        synced_version: None,
        ckpt,
        last_checkpoint: std::time::Instant::now(),
        restarting: false,
        hold_at_frames: WAL_RESTART_FRAMES,
    }));
    let writer_syncer = syncer.clone();
    let health = Arc::new(Health::default());
    let (tx, rx) = mpsc::channel::<WriterMsg>(WRITE_QUEUE_MAX);
    let (sync_tx, sync_rx) = std_mpsc::sync_channel::<Committed>(SYNC_QUEUE_MAX);
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    {
        let health = health.clone();
        std::thread::Builder::new()
            .name("sqlite-syncer".into())
            .spawn(move || syncer_loop(syncer, sync_rx, done_tx, &health))
            .map_err(|e| StoreError::Config(format!("cannot start syncer thread: {e}")))?;
    }
    let writer_health = health.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| StoreError::Config(format!("cannot start writer runtime: {e}")))?;
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || {
            rt.block_on(Writer::new(conn, sync_tx, writer_syncer, writer_health).run(rx, done_rx));
        })
        .map_err(|e| StoreError::Config(format!("cannot start writer thread: {e}")))?;
    Ok((tx, health))
}

fn wal_path(db_path: &Path) -> PathBuf {
    let mut p = db_path.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

/// The writer thread's state. It keeps one transaction open and runs every write in it as the
/// write arrives; it commits when the syncer is free, so the batch that forms while the
/// previous one is being synced goes to disk in one commit (group commit sized by the disk's
/// own latency, with no timer), and the writer never waits for a disk flush.
struct Writer {
    conn: Connection,
    sync_tx: std_mpsc::SyncSender<Committed>,
    syncer: SharedSyncer,
    health: Arc<Health>,
    /// Replies of the writes in the open transaction (none open when empty).
    replies: Vec<Reply>,
    syncer_busy: bool,
    /// Begin nothing until the syncer's next `Done` (see [`Done::Hold`]).
    holding: bool,
    /// Writes in the previous committed batch: a writer that sees single writes one after
    /// another is serving one client at a time, and syncs them itself.
    last_batch_len: usize,
}

impl Writer {
    fn new(
        conn: Connection,
        sync_tx: std_mpsc::SyncSender<Committed>,
        syncer: SharedSyncer,
        health: Arc<Health>,
    ) -> Writer {
        Writer {
            conn,
            sync_tx,
            syncer,
            health,
            replies: Vec::with_capacity(WRITE_BATCH_MAX),
            syncer_busy: false,
            holding: false,
            last_batch_len: 0,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<WriterMsg>,
        mut done_rx: mpsc::UnboundedReceiver<Done>,
    ) {
        let mut open = true;
        loop {
            if !self.replies.is_empty() && !self.syncer_busy {
                // Serial traffic (this batch and the one before are one write each, and
                // nothing waits): nothing to overlap, so no hand-off. Measured: with the check
                // on the queue alone, a loaded writer that found it empty at a commit synced
                // inline while the next writes queued up, 5-12 % fewer payments/s.
                let serial = self.replies.len() == 1 && self.last_batch_len == 1;
                self.last_batch_len = self.replies.len();
                self.commit(serial && rx.is_empty());
                if !self.syncer_busy && self.holding {
                    // The syncer is gone (the send failed): no `Done` will ever come.
                    self.holding = false;
                }
                continue;
            }
            if !open && self.replies.is_empty() && !self.syncer_busy {
                return;
            }
            // A full batch waits for the syncer; so does everything once the queue is closed,
            // and everything while holding.
            let take_jobs = open && !self.holding && self.replies.len() < WRITE_BATCH_MAX;
            tokio::select! {
                biased;
                done = done_rx.recv(), if self.syncer_busy => match done {
                    Some(Done::Go) => {
                        self.syncer_busy = false;
                        self.holding = false;
                    }
                    Some(Done::Hold) => {
                        self.syncer_busy = false;
                        self.holding = true;
                        // Even an empty commit: the syncer checkpoints after it.
                        self.commit(false);
                        // The syncer is gone if it did not take the batch.
                        self.holding = self.syncer_busy;
                    }
                    None => {
                        // The syncer is gone: it only stops when its channel closes.
                        self.fail_open_batch("the database syncer stopped");
                        return;
                    }
                },
                msg = rx.recv(), if take_jobs => match msg {
                    Some(WriterMsg::Job(job)) => {
                        self.execute(job);
                        // Whatever else is already queued joins the same transaction.
                        while self.replies.len() < WRITE_BATCH_MAX {
                            match rx.try_recv() {
                                Ok(WriterMsg::Job(job)) => self.execute(job),
                                Err(_) => break,
                            }
                        }
                    }
                    None => open = false,
                },
            }
        }
    }

    /// Runs one write inside the open transaction, beginning one if needed.
    fn execute(&mut self, job: WriteJob) {
        if self.health.failed.load(Ordering::Acquire) {
            job(Err(STORE_FAILED))(Err(STORE_FAILED.to_string()));
            return;
        }
        if self.replies.is_empty() {
            if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
                let msg = e.to_string();
                tracing::error!(error = %msg, "sqlite: cannot begin transaction");
                // Outside a transaction the job's SAVEPOINT would autocommit its writes while
                // we report failure, so the job only gets the error.
                job(Err(&msg))(Err(msg.clone()));
                return;
            }
        }
        self.replies.push(job(Ok(&self.conn)));
        // SQLite aborts the whole transaction on some errors (disk full, I/O error). Then the
        // batch is gone, and a later job's SAVEPOINT/RELEASE would commit on its own while its
        // caller is told it failed. So stop at once, and fail the whole batch.
        if self.conn.is_autocommit() {
            self.fail_open_batch(
                "the transaction was aborted by SQLite; nothing in this batch was saved",
            );
        }
    }

    fn fail_open_batch(&mut self, why: &str) {
        tracing::error!(error = %why, batch = self.replies.len(), "sqlite: batch failed");
        crate::sqlite_ledger::drop_account_cache();
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        for reply in self.replies.drain(..) {
            reply(Err(why.to_string()));
        }
    }

    /// Commits the open transaction, if any (its frames reach the WAL, unsynced), and hands its
    /// replies to the syncer. When nothing else waits (`idle`), the writer syncs the batch
    /// itself: with nothing to overlap, the hand-off to the syncer thread and back only adds
    /// two thread wake-ups to the latency (docs/BENCHMARKS.md, `payrail bench ledger` at
    /// batch 1).
    fn commit(&mut self, idle: bool) {
        if !self.replies.is_empty() && self.health.failed.load(Ordering::Acquire) {
            // A sync failed while this batch was executing: nothing more goes to the WAL
            // (review finding: the batch was still committed, visible, and might survive).
            self.fail_open_batch(STORE_FAILED);
        }
        if !self.replies.is_empty() {
            if let Err(e) = self.conn.execute_batch("COMMIT") {
                // Nothing of this batch is in the WAL: its callers may hear so at once.
                self.fail_open_batch(&format!("commit failed: {e}"));
                if !self.holding {
                    return;
                }
            }
        }
        let batch = Committed {
            replies: std::mem::replace(&mut self.replies, Vec::with_capacity(WRITE_BATCH_MAX)),
        };
        #[cfg(test)]
        let idle = idle && !self.health.no_inline_sync.load(Ordering::Relaxed);
        if idle && !self.holding {
            let mut syncer = lock(&self.syncer);
            if syncer.process(batch, &self.health) == Done::Hold {
                // Nothing is open: the WAL is copied and the next transaction starts it over
                // once this restart checkpoint has run.
                syncer.process(Committed::default(), &self.health);
            }
            return;
        }
        match self.sync_tx.send(batch) {
            Ok(()) => self.syncer_busy = true,
            Err(std_mpsc::SendError(batch)) => {
                // Say so rather than claim durability nobody checked, and refuse everything
                // after (the run loop stops on `failed`).
                self.health.failed.store(true, Ordering::Release);
                for reply in batch.replies {
                    reply(Err("the database syncer stopped".to_string()));
                }
            }
        }
    }
}

/// The syncer thread's state: makes committed batches durable, answers them, and checkpoints.
struct Syncer {
    wal_path: PathBuf,
    wal: Option<HeldWal>,
    /// `PRAGMA data_version` of the syncer's own connection read just before the last
    /// successful sync: it changes whenever any other connection, in this process or another,
    /// commits (DDL included), and the syncer's connection commits nothing itself. Unchanged
    /// means nothing was committed since that sync, so there is nothing to sync (empty
    /// durability barriers). Review finding: the writer's `total_changes` missed other
    /// processes' commits and DDL.
    synced_version: Option<i64>,
    /// Connection used for checkpoints and `data_version`.
    ckpt: Connection,
    last_checkpoint: std::time::Instant,
    /// The writer holds; checkpoint after this batch and let it go.
    restarting: bool,
    /// WAL frames at which the next hold is asked for: raised when a restart did not happen
    /// (a reader pinned the WAL), so the writer is not stopped every checkpoint for nothing.
    hold_at_frames: i64,
}

/// The syncer's state is shared with the writer, which syncs a batch itself when nothing else
/// is waiting (see [`Writer::commit`]); the two never use it at once: the writer commits only
/// while the syncer thread is idle.
type SharedSyncer = Arc<std::sync::Mutex<Syncer>>;

fn lock(s: &SharedSyncer) -> std::sync::MutexGuard<'_, Syncer> {
    // Nothing in the syncer panics; if it ever did, its state is still only a file handle and
    // counters, so carry on with it.
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn syncer_loop(
    syncer: SharedSyncer,
    rx: std_mpsc::Receiver<Committed>,
    done_tx: mpsc::UnboundedSender<Done>,
    health: &Health,
) {
    while let Ok(batch) = rx.recv() {
        let done = lock(&syncer).process(batch, health);
        // The writer may commit its next batch (it may be gone at shutdown: fine).
        let _ = done_tx.send(done);
    }
}

impl Syncer {
    /// Syncs, answers the batch, checkpoints if due; what the writer should do next.
    fn process(&mut self, batch: Committed, health: &Health) -> Done {
        let outcome = self.sync(health);
        for reply in batch.replies {
            reply(outcome.clone());
        }
        if outcome.is_err() {
            self.restarting = false;
            Done::Go
        } else {
            self.checkpoint(health)
        }
    }

    fn sync(&mut self, health: &Health) -> std::result::Result<(), String> {
        if health.failed.load(Ordering::Acquire) {
            return Err(STORE_FAILED.to_string());
        }
        // Read before the sync: whatever it counts is on disk once the sync returns.
        let version: Option<i64> = self
            .ckpt
            .query_row("PRAGMA data_version", [], |r| r.get(0))
            .ok();
        if version.is_some() && version == self.synced_version {
            // Nothing committed by anyone since the last sync (durability barriers).
            return Ok(());
        }
        #[cfg(test)]
        let injected = health.fail_next_sync.swap(false, Ordering::AcqRel);
        #[cfg(not(test))]
        let injected = false;
        let synced = if injected {
            Err(std::io::Error::other("injected sync failure"))
        } else {
            sync_wal(&self.wal_path, &mut self.wal)
        };
        match synced {
            Ok(()) => {
                self.synced_version = version;
                health.syncs.fetch_add(1, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, path = %self.wal_path.display(), "sqlite: fdatasync of the WAL failed; refusing writes until restart");
                health.failed.store(true, Ordering::Release);
                Err(STORE_FAILED.to_string())
            }
        }
    }

    /// A passive checkpoint when one is due, while the writer executes its next batch (it
    /// commits nothing until `Done`). Returns what the writer should do next.
    fn checkpoint(&mut self, health: &Health) -> Done {
        let due = self.restarting
            || self.last_checkpoint.elapsed()
                >= std::time::Duration::from_millis(CHECKPOINT_INTERVAL_MS);
        if !due {
            return Done::Go;
        }
        self.last_checkpoint = std::time::Instant::now();
        let restarting = std::mem::take(&mut self.restarting);
        let result: rusqlite::Result<(i64, i64, i64)> =
            self.ckpt
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                });
        match result {
            Ok((_, log_frames, _)) => {
                if log_frames < WAL_RESTART_FRAMES {
                    self.hold_at_frames = WAL_RESTART_FRAMES;
                }
                if restarting || log_frames < self.hold_at_frames {
                    return Done::Go;
                }
                // If this restart does not happen either, ask again only after as many frames
                // more.
                self.hold_at_frames = log_frames.saturating_add(WAL_RESTART_FRAMES);
                self.restarting = true;
                health.holds.fetch_add(1, Ordering::Relaxed);
                Done::Hold
            }
            Err(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::DatabaseBusy
                    || f.code == rusqlite::ErrorCode::DatabaseLocked =>
            {
                // Another checkpointer (another process) is at work: the next one retries.
                Done::Go
            }
            Err(e) => {
                // An I/O error of the checkpoint's own syncs (its fd sees the database file's
                // write-back errors): after it nothing can be trusted to be on disk, as after a
                // failed WAL sync (review finding: such errors were only logged).
                tracing::error!(error = %e, "sqlite: checkpoint failed; refusing writes until restart");
                health.failed.store(true, Ordering::Release);
                Done::Go
            }
        }
    }
}

/// The WAL file the syncer holds open, and its identity.
struct HeldWal {
    file: File,
    id: FileId,
}

/// `fdatasync` of the WAL file, (re)opened by path when it is not the file we hold.
fn sync_wal(path: &Path, wal: &mut Option<HeldWal>) -> std::io::Result<()> {
    // Twice at most: the file can be replaced between the stat and the open only while a
    // connection is closing, and what we sync must be the file at the path now.
    for _ in 0..2 {
        let at_path = FileId::of(&std::fs::metadata(path)?);
        let held = match wal.take() {
            // A deleted file keeps its inode number until it is closed; inode numbers are
            // reused quickly (ext4, tmpfs): identity is (device, inode) of a linked file.
            Some(h) if h.id == at_path && FileId::of(&h.file.metadata()?).linked() => h,
            _ => {
                let file = File::open(path)?;
                let id = FileId::of(&file.metadata()?);
                HeldWal { file, id }
            }
        };
        held.file.sync_data()?;
        let same = held.id == at_path;
        *wal = Some(held);
        if same {
            return Ok(());
        }
    }
    Err(std::io::Error::other(
        "the WAL file kept changing under the syncer",
    ))
}

#[derive(Debug, Clone, Copy)]
struct FileId {
    dev: u64,
    ino: u64,
    nlink: u64,
}

impl PartialEq for FileId {
    fn eq(&self, o: &FileId) -> bool {
        (self.dev, self.ino) == (o.dev, o.ino)
    }
}

impl FileId {
    #[cfg(unix)]
    fn of(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            nlink: m.nlink(),
        }
    }

    #[cfg(not(unix))]
    fn of(_: &std::fs::Metadata) -> FileId {
        FileId {
            dev: 0,
            ino: 0,
            nlink: 1,
        }
    }

    fn linked(&self) -> bool {
        self.nlink > 0
    }
}
