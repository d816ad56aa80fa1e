//! PostgreSQL store: see the module docs in lib.rs. Implemented in the next commit.

use crate::*;

pub struct PgStore;

impl PgStore {
    pub async fn connect(url: &str) -> Result<PgStore> {
        Err(StoreError::Config(format!("PostgreSQL support is not built yet ({})", redact_url(url))))
    }
}
