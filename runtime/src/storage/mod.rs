//! Adapters for state: the job table (MySQL in clusters, SQLite standalone) and
//! the blob store for input images.

pub mod api_keys;
pub mod blob;
mod grouped;
pub mod jobs;
pub mod redis_guard;
pub mod watermarks;

pub use blob::BlobStore;
pub use jobs::{JobStore, StoreError};

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch, the unit of every timestamp we store.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
