//! Optional Redis helpers in front of the database: per-client rate limiting
//! and a fast path for repeated idempotency keys. Redis is never the source of
//! truth: when it is down both fail open and the database decides.

use crate::domain::JobId;
use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Commands against a sick Redis must not hold up submissions for long.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed command Redis is skipped for this long, so that while it
/// is down requests do not each wait [`REDIS_TIMEOUT`] (or a reconnect).
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Idempotency entries expire with the keys' useful life (the default of
/// `server.idempotency_key_ttl_ms`; see [`RedisGuard::with_key_ttl`]).
const KEY_TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone)]
pub struct RedisGuard {
    connection: ConnectionManager,
    requests_per_minute: u32,
    key_ttl: Duration,
    fail_closed: bool,
    /// Until when Redis is skipped after a failure (see [`SKIP_AFTER_FAILURE`]).
    skip_until: Arc<Mutex<Option<Instant>>>,
}

/// Whether a submission may go ahead, as far as rate limiting goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    Allowed,
    /// The client used up its window; it may retry after this long.
    Limited(Duration),
    /// Redis is unreachable and rate limiting fails closed.
    Unavailable,
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
            url: ocr_contract::redact_url(url),
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
            key_ttl: KEY_TTL,
            fail_closed: false,
            skip_until: Arc::new(Mutex::new(None)),
        })
    }

    /// Runs a command within [`REDIS_TIMEOUT`]; `None` (fail open) when it
    /// fails, times out, or Redis failed less than [`SKIP_AFTER_FAILURE`] ago.
    async fn run<T>(
        &self,
        what: &str,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        let skip_until = *self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        if skip_until.is_some_and(|until| Instant::now() < until) {
            return None;
        }
        let failure = match tokio::time::timeout(REDIS_TIMEOUT, command).await {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(err)) => err.to_string(),
            Err(_) => format!("no answer within {REDIS_TIMEOUT:?}"),
        };
        let mut skip_until = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        if skip_until.is_none_or(|until| Instant::now() >= until) {
            tracing::warn!(error = %failure, "Redis unavailable ({what}); going on without it for {SKIP_AFTER_FAILURE:?}");
        }
        *skip_until = Some(Instant::now() + SKIP_AFTER_FAILURE);
        None
    }

    /// Whether rate limiting refuses submissions while Redis is unreachable
    /// (`redis.rate_limit_when_down = "closed"`) rather than letting them through.
    pub fn failing_closed(mut self, closed: bool) -> Self {
        self.fail_closed = closed;
        self
    }

    /// Whether `client_id` may submit now. Fixed one-minute windows: cheap
    /// (one INCR) and good enough to stop a client from flooding the queue.
    pub async fn admit(&self, client_id: &str, now_ms: i64) -> RateDecision {
        if self.requests_per_minute == 0 {
            return RateDecision::Allowed;
        }
        match self.over_limit(client_id, now_ms).await {
            Some(Some(retry_after)) => RateDecision::Limited(retry_after),
            Some(None) => RateDecision::Allowed,
            None if self.fail_closed => RateDecision::Unavailable,
            None => RateDecision::Allowed,
        }
    }

    /// `None` when Redis did not answer; `Some(Some(wait))` when the client
    /// has used up this minute's requests.
    async fn over_limit(&self, client_id: &str, now_ms: i64) -> Option<Option<Duration>> {
        let window = now_ms.div_euclid(60_000);
        let key = format!("ocr:rate:{}:{window}", length_prefixed(client_id));
        let mut connection = self.connection.clone();
        let counting = async move {
            redis::pipe()
                .atomic()
                .incr(&key, 1u64)
                .expire(&key, 120)
                .ignore()
                .query_async::<(u64,)>(&mut connection)
                .await
        };
        let (count,) = self.run("rate limit", counting).await?;
        Some((count > u64::from(self.requests_per_minute)).then(|| {
            let left_ms = 60_000 - now_ms.rem_euclid(60_000);
            Duration::from_millis(left_ms as u64)
        }))
    }

    /// Cached idempotency keys expire after `ttl`, as the database's do.
    pub fn with_key_ttl(mut self, ttl: Duration) -> Self {
        self.key_ttl = ttl;
        self
    }

    pub async fn cached_key(&self, client_id: &str, key: &str) -> Option<CachedKey> {
        let mut connection = self.connection.clone();
        let key = idempotency_key(client_id, key);
        let reading = async move { connection.get::<_, Option<String>>(key).await };
        let value = self.run("idempotency cache", reading).await??;
        let (sha, job) = value.split_once(':')?;
        Some(CachedKey {
            request_sha256: sha.to_owned(),
            job_id: job.parse().ok()?,
        })
    }

    pub async fn remember_key(&self, client_id: &str, key: &str, cached: &CachedKey) {
        let mut connection = self.connection.clone();
        let key = idempotency_key(client_id, key);
        let value = format!("{}:{}", cached.request_sha256, cached.job_id);
        let ttl_secs = self.key_ttl.as_secs().max(1);
        let storing = async move { connection.set_ex::<_, _, ()>(key, value, ttl_secs).await };
        // Not cached: a repeat of the key is decided by the database.
        let _ = self.run("idempotency cache", storing).await;
    }
}

/// The client id carries its length, so that no two (client, key) pairs map
/// to one Redis key: `a:b` + `c` and `a` + `b:c` stay apart.
fn idempotency_key(client_id: &str, key: &str) -> String {
    format!("ocr:idem:{}:{key}", length_prefixed(client_id))
}

fn length_prefixed(part: &str) -> String {
    format!("{}.{part}", part.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_and_keys_never_share_a_redis_key() {
        assert_ne!(idempotency_key("a:b", "c"), idempotency_key("a", "b:c"));
        assert_ne!(idempotency_key("", "1.a:b"), idempotency_key("1.a", "b"));
        assert_eq!(idempotency_key("tenant", "k"), "ocr:idem:6.tenant:k");
    }
}
