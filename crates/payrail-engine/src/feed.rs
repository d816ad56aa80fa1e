//! The real-time merchant event feed behind `GET /v1/events/stream` (SSE).
//!
//! A stream always reads its events from the outbox, after its own cursor (`seq`), in order; it
//! never takes an event from memory. So a reconnect with the last seen event gets exactly what
//! it missed, and nothing is skipped or repeated. What is in memory is only *when* to read:
//!
//! - each merchant with an open stream has a slot with a `watch` of the highest `seq` seen for
//!   it;
//! - one pump per process reads new outbox rows (all merchants) after its head and bumps the
//!   slots of the merchants they belong to. It wakes when this process commits an event
//!   ([`Feed::outbox_written`]) and polls every [`FEED_POLL_MS`], so events committed by other
//!   processes (PostgreSQL) arrive too. It runs only while streams are open;
//! - a stream marks its slot seen *before* reading, so a bump during the read wakes it again.
//!   When the pump (re)starts it bumps every slot once, which covers events committed between a
//!   stream's read and the pump's first head;
//! - as a safety net a waiting stream re-reads every [`RESYNC_MS`] anyway.
//!
//! Bounds: [`STREAMS_PER_MERCHANT_MAX`] and [`STREAMS_MAX`] open streams, [`STREAM_PAGE`] events
//! buffered per stream, [`FEED_PAGE`] rows per pump read. [`Feed::close`] ends every stream (the
//! server calls it on shutdown so graceful shutdown is not held up by open streams).

use payrail_domain::MerchantId;
use payrail_store::{DynStore, EventRecord, StoreError};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// Open streams per merchant (a few shop screens; more is a leak or abuse).
pub const STREAMS_PER_MERCHANT_MAX: usize = 5;
/// Open streams per process.
pub const STREAMS_MAX: usize = 10_000;
/// Events one stream reads (and buffers) at a time.
pub const STREAM_PAGE: u32 = 100;
/// Outbox rows the pump reads at a time.
pub const FEED_PAGE: u32 = 500;
/// The pump's poll for events committed by other processes.
pub const FEED_POLL_MS: u64 = 1_000;
/// A waiting stream re-reads at least this often, whatever the pump says.
pub const RESYNC_MS: u64 = 30_000;
/// Pause after a storage error in the pump.
const PUMP_ERROR_BACKOFF_MS: u64 = 1_000;
/// After a read that found events, the pump waits this long before the next one, so under load
/// one read covers many commits.
const PUMP_COALESCE_MS: u64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    #[error("this merchant has {STREAMS_PER_MERCHANT_MAX} event streams open already")]
    TooManyForMerchant,
    #[error("the server has {STREAMS_MAX} event streams open already")]
    TooMany,
    #[error("the server is shutting down")]
    Closed,
}

pub struct Feed {
    inner: Arc<Inner>,
    store: DynStore,
}

struct Inner {
    /// Bumped after this process commits an outbox event.
    outbox: watch::Sender<u64>,
    closing: watch::Sender<bool>,
    slots: Mutex<HashMap<MerchantId, Slot>>,
    pump_started: AtomicBool,
}

struct Slot {
    streams: usize,
    seen: watch::Sender<i64>,
}

impl Inner {
    fn bump(&self, merchant: MerchantId, seq: i64) {
        if let Ok(slots) = self.slots.lock() {
            if let Some(s) = slots.get(&merchant) {
                s.seen.send_modify(|v| *v = (*v).max(seq));
            }
        }
    }

    fn bump_all(&self) {
        if let Ok(slots) = self.slots.lock() {
            for s in slots.values() {
                s.seen.send_modify(|_| {});
            }
        }
    }

    fn has_streams(&self) -> bool {
        self.slots.lock().map(|s| !s.is_empty()).unwrap_or(false)
    }
}

impl Feed {
    pub fn new(store: DynStore) -> Feed {
        Feed {
            inner: Arc::new(Inner {
                outbox: watch::channel(0).0,
                closing: watch::channel(false).0,
                slots: Mutex::new(HashMap::new()),
                pump_started: AtomicBool::new(false),
            }),
            store,
        }
    }

    /// Tells the feed and the webhook dispatcher of this process that an event was committed.
    pub fn outbox_written(&self) {
        self.inner.outbox.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that changes whenever [`Self::outbox_written`] is called.
    pub fn outbox_signal(&self) -> watch::Receiver<u64> {
        self.inner.outbox.subscribe()
    }

    /// Ends every open stream and refuses new ones (server shutdown).
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    pub fn is_closed(&self) -> bool {
        *self.inner.closing.borrow()
    }

    /// Open streams of a merchant (tests, metrics).
    pub fn open_streams(&self, merchant: MerchantId) -> usize {
        self.inner
            .slots
            .lock()
            .ok()
            .and_then(|s| s.get(&merchant).map(|slot| slot.streams))
            .unwrap_or(0)
    }

    /// Opens a stream of `merchant`'s events after outbox position `after_seq`.
    pub fn open(&self, merchant: MerchantId, after_seq: i64) -> Result<FeedStream, FeedError> {
        if self.is_closed() {
            return Err(FeedError::Closed);
        }
        let wake = {
            let mut slots = self.inner.slots.lock().map_err(|_| FeedError::Closed)?;
            let total: usize = slots.values().map(|s| s.streams).sum();
            if total >= STREAMS_MAX {
                return Err(FeedError::TooMany);
            }
            let slot = slots.entry(merchant).or_insert_with(|| Slot {
                streams: 0,
                seen: watch::channel(0).0,
            });
            if slot.streams >= STREAMS_PER_MERCHANT_MAX {
                return Err(FeedError::TooManyForMerchant);
            }
            slot.streams = slot.streams.saturating_add(1);
            slot.seen.subscribe()
        };
        if !self.inner.pump_started.swap(true, Ordering::SeqCst) {
            tokio::spawn(pump(Arc::downgrade(&self.inner), self.store.clone()));
        }
        Ok(FeedStream {
            store: self.store.clone(),
            merchant,
            cursor: after_seq,
            pending: VecDeque::new(),
            wake,
            closing: self.inner.closing.subscribe(),
            _guard: SlotGuard {
                inner: self.inner.clone(),
                merchant,
            },
        })
    }
}

/// Releases a stream's place in its merchant's slot.
struct SlotGuard {
    inner: Arc<Inner>,
    merchant: MerchantId,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.inner.slots.lock() {
            if let Some(slot) = slots.get_mut(&self.merchant) {
                slot.streams = slot.streams.saturating_sub(1);
                if slot.streams == 0 {
                    slots.remove(&self.merchant);
                }
            }
        }
    }
}

/// One merchant's stream: its events in outbox order, from its cursor on.
pub struct FeedStream {
    store: DynStore,
    merchant: MerchantId,
    cursor: i64,
    pending: VecDeque<EventRecord>,
    wake: watch::Receiver<i64>,
    closing: watch::Receiver<bool>,
    _guard: SlotGuard,
}

impl FeedStream {
    /// The next event; waits for one. `None` when the feed closes; `Some(Err)` on a storage
    /// error (the caller ends the stream; the client resumes from its last event).
    pub async fn next(&mut self) -> Option<Result<EventRecord, StoreError>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                self.cursor = e.seq;
                return Some(Ok(e));
            }
            if *self.closing.borrow() {
                return None;
            }
            // Seen before reading: a bump while we read wakes the wait below at once.
            self.wake.borrow_and_update();
            match self
                .store
                .list_events(self.merchant, self.cursor, STREAM_PAGE)
                .await
            {
                Ok(page) if !page.is_empty() => {
                    self.pending.extend(page);
                    continue;
                }
                Ok(_) => {}
                Err(e) => return Some(Err(e)),
            }
            tokio::select! {
                r = self.wake.changed() => {
                    if r.is_err() {
                        return None;
                    }
                }
                _ = self.closing.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(RESYNC_MS)) => {}
            }
        }
    }
}

/// Reads new outbox rows while streams are open and wakes the streams of their merchants.
async fn pump(inner: Weak<Inner>, store: DynStore) {
    let (mut outbox, mut closing) = match inner.upgrade() {
        Some(i) => (i.outbox.subscribe(), i.closing.subscribe()),
        None => return,
    };
    let mut head: Option<i64> = None;
    loop {
        let Some(feed) = inner.upgrade() else { return };
        if *closing.borrow() {
            return;
        }
        let mut backoff = false;
        let mut found = false;
        if !feed.has_streams() {
            head = None;
        } else if let Some(mut h) = head {
            loop {
                match store.list_outbox(h, FEED_PAGE).await {
                    Ok(page) => {
                        for e in &page {
                            feed.bump(e.merchant_id, e.seq);
                            h = e.seq;
                            found = true;
                        }
                        head = Some(h);
                        if page.len() < FEED_PAGE as usize {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event feed: cannot read the outbox");
                        backoff = true;
                        break;
                    }
                }
            }
        } else {
            match store.outbox_head().await {
                Ok(h) => {
                    head = Some(h);
                    // Whatever committed before this head: streams re-read once.
                    feed.bump_all();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event feed: cannot read the outbox head");
                    backoff = true;
                }
            }
        }
        drop(feed);
        if found {
            tokio::select! {
                _ = closing.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(PUMP_COALESCE_MS)) => {}
            }
        }
        let wait_ms = if backoff {
            PUMP_ERROR_BACKOFF_MS
        } else {
            FEED_POLL_MS
        };
        tokio::select! {
            r = outbox.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = closing.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
        }
    }
}
