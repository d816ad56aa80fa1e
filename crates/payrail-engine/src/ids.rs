//! Id generation from the injected clock and a random source.

use payrail_domain::{Clock, Id, IdKind};
use rand::{RngCore, SeedableRng};
use std::sync::{Arc, Mutex};

pub struct IdGen {
    clock: Arc<dyn Clock>,
    /// `None`: the OS-seeded thread RNG. `Some`: a seeded RNG for reproducible tests.
    seeded: Option<Mutex<rand::rngs::StdRng>>,
}

impl IdGen {
    pub fn new(clock: Arc<dyn Clock>) -> IdGen {
        IdGen {
            clock,
            seeded: None,
        }
    }

    pub fn seeded(clock: Arc<dyn Clock>, seed: u64) -> IdGen {
        IdGen {
            clock,
            seeded: Some(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))),
        }
    }

    pub fn fill(&self, buf: &mut [u8]) {
        match &self.seeded {
            Some(rng) => match rng.lock() {
                Ok(mut r) => r.fill_bytes(buf),
                Err(poisoned) => poisoned.into_inner().fill_bytes(buf),
            },
            None => rand::thread_rng().fill_bytes(buf),
        }
    }

    pub fn next<K: IdKind>(&self) -> Id<K> {
        let mut r = [0u8; 10];
        self.fill(&mut r);
        Id::generate(u64::try_from(self.clock.now_ms()).unwrap_or(0), r)
    }

    /// `prefix` + 48 lower-case hex characters (192 random bits).
    pub fn token(&self, prefix: &str) -> String {
        let mut r = [0u8; 24];
        self.fill(&mut r);
        format!("{prefix}{}", hex::encode(r))
    }
}
