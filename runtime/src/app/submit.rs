//! Accepting a job: check the input, store it, publish it, answer at once.

pub use super::fault::Fault;
use super::input::{check_image, InputError};
use crate::config::LimitsConfig;
use crate::domain::idempotency::{decide, HeldKey, KeyDecision};
use crate::domain::message::JobMessage;
use crate::domain::tenant::Tenant;
use crate::domain::{Job, JobId, JobStatus, NewJob};
use crate::metrics::{Metrics, SubmitStage};
use crate::queue::{JobPublisher, QueueError};
use crate::storage::blob::{input_key, BlobError};
use crate::storage::redis_guard::{CachedKey, RateDecision, RedisGuard};
use crate::storage::{now_ms, BlobStore, JobStore, StoreError};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Instant;
use tracing::field::{display, Empty};
use tracing::Instrument;

/// A key whose first request has not finished after this long belongs to a
/// request that died; a retry may take it over.
const ABANDONED_KEY_MS: i64 = 60_000;

/// The input check walks the body once (a checksum pass): below this size it
/// takes microseconds and runs in place; above, on a blocking thread so a
/// large upload does not stall the other requests of its runtime thread.
const CHECK_INLINE_BYTES: usize = 256 * 1024;

pub struct Submission {
    /// Who submits: the job, its idempotency key, rate limit and quota are theirs.
    pub tenant: Tenant,
    pub idempotency_key: Option<String>,
    pub content_type: String,
    pub body: Bytes,
}

#[derive(Debug)]
pub enum Submitted {
    Created(Job),
    /// Same idempotency key and payload as an earlier request.
    Replayed(Job),
}

impl Submitted {
    pub fn job(&self) -> &Job {
        match self {
            Submitted::Created(job) | Submitted::Replayed(job) => job,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("this Idempotency-Key was used with a different request body")]
    KeyReusedWithOtherPayload,
    #[error("a request with this Idempotency-Key is still being processed")]
    KeyInFlight,
    #[error("the Idempotency-Key must be 1 to 255 printable ASCII characters")]
    BadKey,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("input check was interrupted: {0}")]
    Internal(String),
    #[error("too many requests for this client; retry in {} s", retry_after.as_secs().max(1))]
    RateLimited { retry_after: std::time::Duration },
    #[error("this tenant already has {limit} unfinished jobs (limits.max_open_jobs_per_tenant); retry when some have finished")]
    QuotaExceeded { limit: u32 },
    #[error("rate limiting is unavailable (Redis does not answer) and set to refuse meanwhile; retry shortly")]
    RateLimiterDown,
}

/// A request's idempotency key after reservation.
enum Reserved {
    /// This request holds the key and creates the job.
    Held(HeldKey),
    /// An earlier request with the same key and body created this job.
    Replay(Job),
}

/// Publishes held back at once per process, waiting for the broker. Past
/// it (a broker outage under load) new jobs stay `Accepted` and the sweeper
/// publishes them after `queue.republish_after_ms`: memory stays bounded.
const MAX_PUBLISHES_IN_FLIGHT: usize = 10_000;

/// The outbox relay: a job is durable once its row is committed, so the
/// request can be answered then, and its message is published after the
/// answer. librdkafka batches the produces of concurrent jobs (`linger.ms`)
/// and the store batches their `Queued` marks; a crash before the publish
/// leaves the job `Accepted`, which the sweeper republishes.
#[derive(Clone)]
pub struct PublishRelay {
    wait: std::time::Duration,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Set while new jobs are left to the sweeper: one log line per episode,
    /// not one per job at thousands a second.
    saturated: Arc<std::sync::atomic::AtomicBool>,
}

impl PublishRelay {
    /// `wait`: how long a request waits for the broker's acknowledgement
    /// before it answers (`queue.publish_wait_ms`; zero answers at once).
    pub fn new(wait: std::time::Duration) -> Self {
        PublishRelay {
            wait,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_PUBLISHES_IN_FLIGHT)),
            saturated: Arc::default(),
        }
    }
}

#[derive(Clone)]
pub struct Submitter {
    pub store: JobStore,
    pub blobs: BlobStore,
    pub publisher: Arc<dyn JobPublisher>,
    pub limits: LimitsConfig,
    pub fault: Fault,
    /// Publishes accepted jobs, after the answer by default.
    pub relay: PublishRelay,
    /// Optional Redis: rate limiting and the idempotency fast path.
    pub guard: Option<RedisGuard>,
    pub metrics: Metrics,
}

impl Submitter {
    /// Accepts a job; its span is the root of the job's trace (see
    /// [`crate::telemetry`]).
    pub async fn submit(&self, submission: Submission) -> Result<Submitted, SubmitError> {
        let span = tracing::info_span!(
            parent: None,
            "ocr.accept",
            ocr.job.id = Empty,
            ocr.tenant = %submission.tenant,
            ocr.input.bytes = submission.body.len(),
            ocr.replayed = Empty
        );
        let submitted = self.accept(submission).instrument(span.clone()).await;
        if let Ok(Submitted::Replayed(job)) = &submitted {
            span.record("ocr.job.id", display(job.id));
            span.record("ocr.replayed", true);
        }
        submitted
    }

    async fn accept(&self, submission: Submission) -> Result<Submitted, SubmitError> {
        if let Some(guard) = &self.guard {
            match guard.admit(submission.tenant.as_str(), now_ms()).await {
                RateDecision::Allowed => {}
                RateDecision::Limited(retry_after) => {
                    return Err(SubmitError::RateLimited { retry_after })
                }
                RateDecision::Unavailable => return Err(SubmitError::RateLimiterDown),
            }
        }
        let quota = self.limits.max_open_jobs_per_tenant;
        if quota > 0 {
            let open = self.store.count_open(submission.tenant.as_str()).await?;
            if open >= u64::from(quota) {
                return Err(SubmitError::QuotaExceeded { limit: quota });
            }
        }
        let stored_type = if submission.body.len() <= CHECK_INLINE_BYTES {
            self.timed(SubmitStage::Check, async {
                check_image(&submission.body, &submission.content_type, &self.limits)
            })
            .await?
        } else {
            let limits = self.limits.clone();
            let body = submission.body.clone();
            let content_type = submission.content_type.clone();
            let checking =
                tokio::task::spawn_blocking(move || check_image(&body, &content_type, &limits));
            self.timed(SubmitStage::Check, checking)
                .await
                .map_err(|e| SubmitError::Internal(e.to_string()))??
        };

        let sha256 = hex::encode(Sha256::digest(&submission.body));
        let mut held = None;
        if let Some(key) = &submission.idempotency_key {
            if key.is_empty()
                || key.len() > 255
                || !key.chars().all(|c| c.is_ascii_graphic() || c == ' ')
            {
                return Err(SubmitError::BadKey);
            }
            if let Some(replayed) = self
                .cached_replay(submission.tenant.as_str(), key, &sha256)
                .await?
            {
                return Ok(Submitted::Replayed(replayed));
            }
            match self
                .reserve_key(submission.tenant.as_str(), key, &sha256)
                .await?
            {
                Reserved::Held(key) => held = Some(key),
                Reserved::Replay(job) => return Ok(Submitted::Replayed(job)),
            }
        }

        let created = self
            .create(&submission, stored_type, &sha256, held.clone())
            .await;
        if created.is_err() {
            if let Some(held) = &held {
                // Free the key so the client's retry is not stuck behind a
                // failure; only this request's reservation is freed.
                let _ = self
                    .store
                    .release_key(submission.tenant.as_str(), held)
                    .await;
            }
        }
        let job = match created {
            Err(SubmitError::Store(StoreError::KeyLost)) => {
                // A retry took the key over while this request was presumed
                // dead; its job is the one the key stands for.
                return Err(SubmitError::KeyInFlight);
            }
            other => other?,
        };
        if let (Some(guard), Some(key)) = (&self.guard, &submission.idempotency_key) {
            let cached = CachedKey {
                request_sha256: sha256,
                job_id: job.id,
            };
            guard
                .remember_key(submission.tenant.as_str(), key, &cached)
                .await;
        }
        Ok(Submitted::Created(job))
    }

    /// The Redis fast path for a repeated key: no database write at all.
    async fn cached_replay(
        &self,
        client_id: &str,
        key: &str,
        sha256: &str,
    ) -> Result<Option<Job>, SubmitError> {
        let Some(guard) = &self.guard else {
            return Ok(None);
        };
        let Some(cached) = guard.cached_key(client_id, key).await else {
            return Ok(None);
        };
        if cached.request_sha256 != sha256 {
            return Err(SubmitError::KeyReusedWithOtherPayload);
        }
        Ok(self.store.get(cached.job_id).await?)
    }

    async fn reserve_key(
        &self,
        client_id: &str,
        key: &str,
        sha256: &str,
    ) -> Result<Reserved, SubmitError> {
        let reserved_at_ms = now_ms();
        let held = HeldKey {
            key: key.to_owned(),
            reserved_at_ms,
        };
        let reserving = self
            .store
            .reserve_key(client_id, key, sha256, reserved_at_ms);
        let Some(existing) = self.timed(SubmitStage::Database, reserving).await? else {
            return Ok(Reserved::Held(held));
        };
        match decide(&existing, sha256, reserved_at_ms, ABANDONED_KEY_MS) {
            KeyDecision::PayloadMismatch => Err(SubmitError::KeyReusedWithOtherPayload),
            KeyDecision::InFlight => Err(SubmitError::KeyInFlight),
            KeyDecision::TakeOver => {
                if self
                    .store
                    .take_over_key(client_id, key, &existing, reserved_at_ms)
                    .await?
                {
                    Ok(Reserved::Held(held))
                } else {
                    Err(SubmitError::KeyInFlight)
                }
            }
            KeyDecision::Replay(job_id) => match self.store.get(job_id).await? {
                Some(job) => Ok(Reserved::Replay(job)),
                None => Err(SubmitError::Store(StoreError::Corrupt(format!(
                    "idempotency key points at missing job {job_id}"
                )))),
            },
        }
    }

    async fn create(
        &self,
        submission: &Submission,
        content_type: &str,
        sha256: &str,
        idempotency: Option<HeldKey>,
    ) -> Result<Job, SubmitError> {
        let id = JobId::new();
        tracing::Span::current().record("ocr.job.id", display(id));
        let key = input_key(id);
        let new_job = NewJob {
            id,
            client_id: submission.tenant.to_string(),
            input_key: key.clone(),
            content_type: content_type.to_owned(),
            input_sha256: sha256.to_owned(),
            input_bytes: submission.body.len() as u64,
            idempotency,
        };
        // Blob first: a job row must never point at a missing input.
        self.timed(
            SubmitStage::Blob,
            self.blobs.put(&key, submission.body.clone()),
        )
        .await?;
        let created_at = now_ms();
        let inserted = self.timed(
            SubmitStage::Database,
            self.store.insert(&new_job, created_at),
        );
        if let Err(err) = inserted.await {
            let _ = self.blobs.delete(&key).await;
            return Err(err.into());
        }
        if self.fault == Fault::ExitAfterDbWrite {
            tracing::warn!(job = %id, "fault injection: exiting between the database write and the publish");
            std::process::exit(86);
        }
        let queued = self.publish_within_wait(id, &key).await;
        // The row as this request wrote it: no read-back. A worker may have
        // claimed it since; the client's next GET says so.
        Ok(Job {
            id,
            client_id: new_job.client_id,
            status: if queued {
                JobStatus::Queued
            } else {
                JobStatus::Accepted
            },
            attempts: 0,
            input_key: key,
            content_type: new_job.content_type,
            input_sha256: new_job.input_sha256,
            input_bytes: new_job.input_bytes,
            idempotency_key: new_job.idempotency.map(|held| held.key),
            result: None,
            error: None,
            created_at_ms: created_at,
            updated_at_ms: created_at,
        })
    }

    async fn timed<T>(&self, stage: SubmitStage, work: impl std::future::Future<Output = T>) -> T {
        let started = Instant::now();
        let span = tracing::info_span!("ocr.accept.stage", otel.name = stage_span_name(stage));
        let output = work.instrument(span).await;
        self.metrics.observe_stage(stage, started.elapsed());
        output
    }

    /// Publishes through the relay, waiting at most its `wait`: past it
    /// the client gets its answer (the job is durable) while the publish
    /// goes on; if that fails, the sweeper republishes. A broker outage thus
    /// never holds a request longer than the wait.
    /// Whether the job was published and recorded `Queued` within the wait.
    async fn publish_within_wait(&self, id: JobId, input_key: &str) -> bool {
        use std::sync::atomic::Ordering;
        let Ok(slot) = self.relay.in_flight.clone().try_acquire_owned() else {
            if !self.relay.saturated.swap(true, Ordering::Relaxed) {
                tracing::warn!(job = %id, "{MAX_PUBLISHES_IN_FLIGHT} publishes are waiting for the broker; new jobs are left to the sweeper until they drain");
            }
            return false;
        };
        if self.relay.saturated.swap(false, Ordering::Relaxed) {
            tracing::info!("publishes drained below {MAX_PUBLISHES_IN_FLIGHT}; publishing after each answer again");
        }
        let submitter = self.clone();
        let input_key = input_key.to_owned();
        let mut publishing = tokio::spawn(
            async move {
                let queued = submitter.publish(id, &input_key).await;
                drop(slot);
                queued
            }
            .in_current_span(),
        );
        if self.relay.wait.is_zero() {
            return false;
        }
        match tokio::time::timeout(self.relay.wait, &mut publishing).await {
            Ok(queued) => queued.unwrap_or(false),
            Err(_) => {
                // Dropping the handle detaches the task; it still records `Queued`.
                tracing::warn!(job = %id, wait = ?self.relay.wait, "the broker has not acknowledged the job yet; answering before it does");
                false
            }
        }
    }

    /// Publishes the job's message again, its state left as it is.
    pub async fn republish(&self, id: JobId, input_key: &str) -> Result<(), QueueError> {
        let message = JobMessage::new(id, input_key);
        self.timed(SubmitStage::Publish, self.publisher.publish(&message))
            .await
    }

    /// Publishes and records `Queued`. A failed publish is not the client's
    /// problem: the job is durable and the sweeper republishes it.
    /// Called within the accept span, the message carries its trace.
    /// Whether the job is now recorded `Queued`.
    pub async fn publish(&self, id: JobId, input_key: &str) -> bool {
        let message = JobMessage::new(id, input_key);
        let published = self.timed(SubmitStage::Publish, self.publisher.publish(&message));
        match published.await {
            Ok(()) => {
                let queued =
                    self.timed(SubmitStage::Database, self.store.mark_queued(id, now_ms()));
                match queued.await {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::warn!(job = %id, error = %err, "recording Queued failed; the worker does not depend on it");
                        false
                    }
                }
            }
            Err(err) => {
                tracing::warn!(job = %id, error = %err, "publish failed; the sweeper will republish");
                false
            }
        }
    }
}

/// Span names of the accept path's stages, as in `ocr_submit_stage_seconds`.
fn stage_span_name(stage: SubmitStage) -> &'static str {
    match stage {
        SubmitStage::Check => "ocr.check",
        SubmitStage::Blob => "ocr.blob.put",
        SubmitStage::Database => "ocr.db",
        SubmitStage::Publish => "ocr.publish",
    }
}
