//! Optional Redis helpers in front of the database: per-client rate limiting
//! and a fast path for repeated idempotency keys. Redis is never the source of
//! truth: when it is down both fail open and the database decides.

use crate::domain::JobId;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::time::Duration;

/// Commands against a sick Redis must not hold up submissions for long.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// Idempotency entries expire with the keys' useful life.
const KEY_TTL_SECS: u64 = 24 * 3600;

#[derive(Clone)]
pub struct RedisGuard {
    connection: ConnectionManager,
    requests_per_minute: u32,
}

/// What Redis remembers about an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedKey {
    pub request_sha256: String,
    pub job_id: JobId,
}

#[derive(Debug, thiserror::Error)]
#[error("connecting to Redis at {url}: {source}")]
pub struct RedisConnectError {
    url: String,
    #[source]
    source: redis::RedisError,
}

impl RedisGuard {
    pub async fn connect(url: &str, requests_per_minute: u32) -> Result<Self, RedisConnectError> {
        let error = |source| RedisConnectError {
            url: url.to_owned(),
            source,
        };
        let client = redis::Client::open(url).map_err(error)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(2))
            .set_response_timeout(REDIS_TIMEOUT)
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(error)?;
        Ok(RedisGuard {
            connection,
            requests_per_minute,
        })
    }

    /// `Some(wait)` when `client_id` has used up this minute's requests.
    /// Fixed one-minute windows: cheap (one INCR) and good enough to stop a
    /// client from flooding the queue.
    pub async fn over_limit(&self, client_id: &str, now_ms: i64) -> Option<Duration> {
        if self.requests_per_minute == 0 {
            return None;
        }
        let window = now_ms.div_euclid(60_000);
        let key = format!("ocr:rate:{client_id}:{window}");
        let mut connection = self.connection.clone();
        let counted: redis::RedisResult<(u64,)> = redis::pipe()
            .atomic()
            .incr(&key, 1u64)
            .expire(&key, 120)
            .ignore()
            .query_async(&mut connection)
            .await;
        match counted {
            Ok((count,)) if count > u64::from(self.requests_per_minute) => {
                let left_ms = 60_000 - now_ms.rem_euclid(60_000);
                Some(Duration::from_millis(left_ms as u64))
            }
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(error = %err, "rate limiter unavailable; allowing the request");
                None
            }
        }
    }

    pub async fn cached_key(&self, client_id: &str, key: &str) -> Option<CachedKey> {
        let mut connection = self.connection.clone();
        let value: redis::RedisResult<Option<String>> =
            connection.get(idempotency_key(client_id, key)).await;
        let value = match value {
            Ok(value) => value?,
            Err(err) => {
                tracing::warn!(error = %err, "idempotency cache unavailable");
                return None;
            }
        };
        let (sha, job) = value.split_once(':')?;
        Some(CachedKey {
            request_sha256: sha.to_owned(),
            job_id: job.parse().ok()?,
        })
    }

    pub async fn remember_key(&self, client_id: &str, key: &str, cached: &CachedKey) {
        let mut connection = self.connection.clone();
        let stored: redis::RedisResult<()> = connection
            .set_ex(
                idempotency_key(client_id, key),
                format!("{}:{}", cached.request_sha256, cached.job_id),
                KEY_TTL_SECS,
            )
            .await;
        if let Err(err) = stored {
            tracing::warn!(error = %err, "could not cache an idempotency key");
        }
    }
}

fn idempotency_key(client_id: &str, key: &str) -> String {
    format!("ocr:idem:{client_id}:{key}")
}
