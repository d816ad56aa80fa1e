//! Per-channel bulkheads: a bound on the calls in flight to each channel.
//!
//! Every channel call already has a timeout (`channel_timeout_ms`), but a channel that hangs
//! until the timeout would still hold one task, one connection and one merchant request per
//! call; under load, a slow channel would soak up the server and slow every other channel with
//! it. So each channel gets its own permit pool. A call waits at most `channel_queue_ms` for a
//! permit; past that it fails fast with [`ChannelBusy`] — before anything is written or sent for
//! a new payment, so the merchant can simply retry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The channel's permit pool is exhausted: no call was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("channel {channel} is at its limit of {limit} calls in flight")]
pub struct ChannelBusy {
    pub channel: String,
    pub limit: usize,
}

pub struct Bulkheads {
    limit: usize,
    queue: Duration,
    pools: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Bulkheads {
    pub fn new(limit: usize, queue_ms: u64) -> Bulkheads {
        Bulkheads {
            limit: limit.max(1),
            queue: Duration::from_millis(queue_ms),
            pools: Mutex::new(HashMap::new()),
        }
    }

    fn pool(&self, channel: &str) -> Arc<Semaphore> {
        let mut pools = match self.pools.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        pools
            .entry(channel.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.limit)))
            .clone()
    }

    /// A permit for one call to `channel`, waiting at most the queue time.
    pub async fn acquire(&self, channel: &str) -> Result<OwnedSemaphorePermit, ChannelBusy> {
        let pool = self.pool(channel);
        let busy = || ChannelBusy {
            channel: channel.to_string(),
            limit: self.limit,
        };
        match tokio::time::timeout(self.queue, pool.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Closed never happens (we never close a pool); treat it like busy.
            Ok(Err(_)) | Err(_) => Err(busy()),
        }
    }

    /// Calls in flight to `channel` now.
    pub fn in_flight(&self, channel: &str) -> usize {
        self.limit
            .saturating_sub(self.pool(channel).available_permits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_channel_fails_fast_and_others_are_untouched() {
        let b = Bulkheads::new(2, 20);
        let p1 = b.acquire("slow").await.unwrap();
        let _p2 = b.acquire("slow").await.unwrap();
        assert_eq!(b.in_flight("slow"), 2);
        let started = std::time::Instant::now();
        let err = b.acquire("slow").await.unwrap_err();
        assert_eq!(err.limit, 2);
        assert!(started.elapsed() < Duration::from_millis(500));
        // Another channel has its own pool.
        let _q = b.acquire("fast").await.unwrap();
        assert_eq!(b.in_flight("fast"), 1);
        // A released permit is available again.
        drop(p1);
        assert!(b.acquire("slow").await.is_ok());
    }
}
