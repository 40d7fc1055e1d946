//! Accepting a job: check the input, store it, publish it, answer at once.

pub use super::fault::Fault;
use super::input::{check_image, InputError};
use crate::config::{LimitsConfig, QueueConfig};
use crate::domain::idempotency::{decide, HeldKey, KeyDecision};
use crate::domain::message::JobMessage;
use crate::domain::tenant::Tenant;
use crate::domain::watermark::{beat_interval, stamp_window, PublishWatermark, RelayId};
use crate::domain::{Job, JobId, JobStatus, NewJob};
use crate::metrics::{Metrics, SubmitStage};
use crate::queue::{JobPublisher, QueueError};
use crate::storage::blob::{input_key, BlobError};
use crate::storage::jobs::Changes;
use crate::storage::redis_guard::{CachedKey, RateDecision, RedisGuard};
use crate::storage::watermarks::RelayBeat;
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
/// it (a broker outage under load) new jobs are stored `Accepted` and the
/// sweeper publishes them after `queue.republish_after_ms`: memory stays
/// bounded.
const MAX_PUBLISHES_IN_FLIGHT: usize = 10_000;

/// How long a stopping API waits for its publishes before it records its
/// watermark for the last time (what is still unpublished then is left to
/// the sweepers).
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The outbox relay: a job is durable once its row is committed, so the
/// request can be answered then, and its message is published after the
/// answer (librdkafka batches the produces of concurrent jobs, `linger.ms`).
/// The row is written `Queued` and costs no second write: the relay records
/// its progress once per beat for all its jobs (see
/// [`crate::domain::watermark`]). A job whose publish fails goes back to
/// `Accepted`; if this process dies first, the sweeper of another (or of
/// its successor) finds its heartbeat stopped and republishes the jobs past
/// its last watermark.
#[derive(Clone)]
pub struct PublishRelay {
    wait: std::time::Duration,
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Set while new jobs are left to the sweeper: one log line per episode,
    /// not one per job at thousands a second.
    saturated: Arc<std::sync::atomic::AtomicBool>,
    progress: Arc<RelayProgress>,
}

/// A relay's watermark and the heartbeat that records it.
struct RelayProgress {
    id: RelayId,
    beat: std::time::Duration,
    window: i64,
    /// Whether the relay records beats at all: standalone mode republishes
    /// every unfinished job when it starts, and no other process sweeps.
    recorded: bool,
    marks: std::sync::Mutex<PublishWatermark>,
    /// `stamps_until` of the latest beat the database took: the relay
    /// stamps nothing past it.
    vouched_until: std::sync::atomic::AtomicI64,
    /// Held while a beat is computed and written, so beats land in order.
    beating: tokio::sync::Mutex<()>,
    /// Set once the relay's row exists and its heartbeat runs.
    started: tokio::sync::OnceCell<()>,
}

impl RelayProgress {
    fn marks(&self) -> std::sync::MutexGuard<'_, PublishWatermark> {
        self.marks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Computes and records a beat; once the database has it, the relay may
    /// stamp up to its limit.
    async fn record(&self, store: &JobStore) -> Result<RelayBeat, StoreError> {
        let _in_order = self.beating.lock().await;
        let beat = {
            let mut marks = self.marks();
            let heartbeat_at = marks.clock(now_ms());
            RelayBeat {
                relay: self.id,
                published_through: marks.watermark(),
                heartbeat_at,
                stamps_until: heartbeat_at.saturating_add(self.window),
            }
        };
        store.record_beat(beat).await?;
        self.vouched_until
            .fetch_max(beat.stamps_until, std::sync::atomic::Ordering::AcqRel);
        Ok(beat)
    }
}

/// Records the relay's watermark every beat, for as long as the relay exists.
async fn heartbeat(
    progress: std::sync::Weak<RelayProgress>,
    store: JobStore,
    every: std::time::Duration,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate, and the relay beat once as it started.
    ticks.tick().await;
    let mut failing = false;
    loop {
        ticks.tick().await;
        let Some(progress) = progress.upgrade() else {
            return;
        };
        match progress.record(&store).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!(relay = %progress.id, "recording the publish watermark works again");
            }
            Ok(_) => {}
            Err(err) if !failing => {
                failing = true;
                tracing::warn!(relay = %progress.id, error = %err, "could not record the publish watermark; new jobs are marked Queued one by one until it works again");
            }
            Err(_) => {}
        }
    }
}

/// A stamped job in the relay's hands, until its publish is settled. Only
/// [`Handover::settle`] settles: a handover lost on the way (a panicked
/// task) keeps the watermark below its job, so the job is republished
/// should this process die.
struct Handover {
    progress: Arc<RelayProgress>,
    stamp: i64,
}

impl Handover {
    fn settle(self) {
        self.progress.marks().settle(self.stamp);
    }
}

/// How a new job reaches the queue.
enum Route {
    /// Written `Queued`, stamped: the relay's watermark covers it.
    Stamped(Handover),
    /// Written `Accepted`, published, then marked `Queued`: the relay's last
    /// recorded beat is too old to vouch for a stamp.
    Marked,
}

impl PublishRelay {
    /// A request waits `queue.publish_wait_ms` for the broker's
    /// acknowledgement before it answers (zero answers at once). The sweepers
    /// take a relay silent for `queue.republish_after_ms` for dead, so it
    /// beats several times within that.
    pub fn new(queue: &QueueConfig) -> Self {
        Self::build(queue, true)
    }

    /// For standalone mode: jobs are stamped but no beat is recorded, since
    /// the process republishes every unfinished job when it starts.
    pub fn in_process(queue: &QueueConfig) -> Self {
        Self::build(queue, false)
    }

    fn build(queue: &QueueConfig, recorded: bool) -> Self {
        let republish_after = std::time::Duration::from_millis(queue.republish_after_ms);
        let window = i64::try_from(stamp_window(republish_after).as_millis()).unwrap_or(i64::MAX);
        PublishRelay {
            wait: queue.publish_wait(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_PUBLISHES_IN_FLIGHT)),
            saturated: Arc::default(),
            progress: Arc::new(RelayProgress {
                id: RelayId::random(),
                beat: beat_interval(republish_after),
                window,
                recorded,
                marks: std::sync::Mutex::new(PublishWatermark::new(now_ms())),
                vouched_until: std::sync::atomic::AtomicI64::new(if recorded {
                    i64::MIN
                } else {
                    i64::MAX
                }),
                beating: tokio::sync::Mutex::new(()),
                started: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// This run's relay, as its jobs are stamped.
    pub fn id(&self) -> RelayId {
        self.progress.id
    }

    /// Jobs stamped and not yet published (or given back to the sweeper).
    pub fn pending(&self) -> usize {
        self.progress.marks().pending()
    }

    /// At shutdown: waits up to [`DRAIN_WAIT`] for the publishes under way,
    /// then records the watermark once more, so the sweepers do not
    /// republish what this API published in its last moments.
    pub async fn drain(&self, store: &JobStore) {
        if !self.progress.recorded || self.progress.started.get().is_none() {
            return;
        }
        let deadline = std::time::Instant::now() + DRAIN_WAIT;
        while self.pending() > 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        match self.progress.record(store).await {
            Ok(beat) => {
                tracing::info!(relay = %beat.relay, unpublished = self.pending(), "recorded the publish watermark for the last time")
            }
            Err(err) => {
                tracing::warn!(relay = %self.id(), error = %err, "could not record the publish watermark at shutdown; the sweepers will republish this API's last jobs")
            }
        }
    }

    /// Stamps a job about to be written, or routes it the marked way when
    /// the relay cannot vouch for a stamp.
    async fn route(&self, store: &JobStore) -> Result<Route, StoreError> {
        if self.progress.recorded {
            // The relay's row exists before any job names it.
            self.progress
                .started
                .get_or_try_init(|| async {
                    self.progress.record(store).await?;
                    tokio::spawn(heartbeat(
                        Arc::downgrade(&self.progress),
                        store.clone(),
                        self.progress.beat,
                    ));
                    Ok::<(), StoreError>(())
                })
                .await?;
        }
        let limit = self
            .progress
            .vouched_until
            .load(std::sync::atomic::Ordering::Acquire);
        let stamped = self.progress.marks().stamp(now_ms(), limit);
        Ok(match stamped {
            Some(stamp) => Route::Stamped(Handover {
                progress: self.progress.clone(),
                stamp,
            }),
            None => Route::Marked,
        })
    }

    /// A slot among the publishes waiting for the broker, or `None` when
    /// there are too many (the job is then left to the sweeper).
    fn publish_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        use std::sync::atomic::Ordering;
        let Ok(slot) = self.in_flight.clone().try_acquire_owned() else {
            if !self.saturated.swap(true, Ordering::Relaxed) {
                tracing::warn!("{MAX_PUBLISHES_IN_FLIGHT} publishes are waiting for the broker; new jobs are left to the sweeper until they drain");
            }
            return None;
        };
        if self.saturated.swap(false, Ordering::Relaxed) {
            tracing::info!("publishes drained below {MAX_PUBLISHES_IN_FLIGHT}; publishing after each answer again");
        }
        Some(slot)
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
        // Blob first: a job row must never point at a missing input.
        self.timed(
            SubmitStage::Blob,
            self.blobs.put(&key, submission.body.clone()),
        )
        .await?;
        let route = match self.relay.route(&self.store).await {
            Ok(route) => route,
            Err(err) => {
                let _ = self.blobs.delete(&key).await;
                return Err(err.into());
            }
        };
        let (created_at, relay) = match &route {
            Route::Stamped(handover) => (handover.stamp, Some(self.relay.id())),
            Route::Marked => (now_ms(), None),
        };
        let new_job = NewJob {
            id,
            client_id: submission.tenant.to_string(),
            input_key: key.clone(),
            content_type: content_type.to_owned(),
            input_sha256: sha256.to_owned(),
            input_bytes: submission.body.len() as u64,
            idempotency,
            relay,
        };
        // The insert and the publish run as one task, so a request dropped
        // mid-insert (a client gone, a deadline) cannot leave a committed
        // row whose stamp the watermark passes unpublished.
        let (inserted, insert_outcome) = tokio::sync::oneshot::channel();
        let submitter = self.clone();
        let job = new_job.clone();
        let mut publishing = tokio::spawn(
            async move {
                submitter
                    .store_and_publish(job, created_at, route, inserted)
                    .await
            }
            .in_current_span(),
        );
        match insert_outcome.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                let _ = self.blobs.delete(&key).await;
                return Err(err.into());
            }
            Err(_) => {
                return Err(SubmitError::Internal(
                    "the task storing the job stopped".into(),
                ))
            }
        }
        let status = if self.relay.wait.is_zero() {
            new_job.initial_status()
        } else {
            match tokio::time::timeout(self.relay.wait, &mut publishing).await {
                Ok(Ok(status)) => status,
                Ok(Err(_)) => new_job.initial_status(),
                Err(_) => {
                    // Dropping the handle detaches the task; it still settles the job.
                    tracing::warn!(job = %id, wait = ?self.relay.wait, "the broker has not acknowledged the job yet; answering before it does");
                    new_job.initial_status()
                }
            }
        };
        // The row as this request wrote it: no read-back. A worker may have
        // claimed it since; the client's next GET says so.
        Ok(Job {
            id,
            client_id: new_job.client_id,
            status,
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

    /// Writes the job's row, tells the request how that went, then
    /// publishes the job. The job's status once done.
    async fn store_and_publish(
        &self,
        job: NewJob,
        created_at: i64,
        route: Route,
        inserted: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
    ) -> JobStatus {
        let (id, input_key) = (job.id, job.input_key.clone());
        let insert = self.timed(SubmitStage::Database, self.store.insert(&job, created_at));
        if let Err(err) = insert.await {
            let _ = inserted.send(Err(err));
            if let Route::Stamped(handover) = route {
                // An error does not prove the row absent (the commit may
                // have landed before the connection broke): if it is there,
                // it is the sweeper's.
                self.give_back(id).await;
                handover.settle();
            }
            return JobStatus::Accepted;
        }
        let _ = inserted.send(Ok(()));
        if self.fault == Fault::ExitAfterDbWrite {
            tracing::warn!(job = %id, "fault injection: exiting between the database write and the publish");
            std::process::exit(86);
        }
        let Some(_slot) = self.relay.publish_slot() else {
            if let Route::Stamped(handover) = route {
                self.give_back(id).await;
                handover.settle();
            }
            return JobStatus::Accepted;
        };
        match route {
            Route::Stamped(handover) => {
                let message = JobMessage::new(id, &input_key);
                let published = self.timed(SubmitStage::Publish, self.publisher.publish(&message));
                if let Err(err) = published.await {
                    tracing::warn!(job = %id, error = %err, "publish failed; the sweeper will republish");
                    self.give_back(id).await;
                    handover.settle();
                    return JobStatus::Accepted;
                }
                handover.settle();
                JobStatus::Queued
            }
            Route::Marked => {
                if self.publish(id, &input_key).await {
                    JobStatus::Queued
                } else {
                    JobStatus::Accepted
                }
            }
        }
    }

    /// `Queued -> Accepted` for a job whose publish failed, retried until the
    /// database takes it: until then the watermark stays below the job.
    async fn give_back(&self, id: JobId) {
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            let returned = self.store.transition(
                id,
                JobStatus::Queued,
                JobStatus::Accepted,
                None,
                Changes::default(),
                now_ms(),
            );
            match returned.await {
                // Lost: a worker has it already (the publish went through after all).
                Ok(_) => return,
                Err(err) => {
                    tracing::warn!(job = %id, error = %err, "could not give a job whose publish failed to the sweeper; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(5));
                }
            }
        }
    }

    /// Publishes the job's message again, its state left as it is.
    pub async fn republish(&self, id: JobId, input_key: &str) -> Result<(), QueueError> {
        let message = JobMessage::new(id, input_key);
        self.timed(SubmitStage::Publish, self.publisher.publish(&message))
            .await
    }

    /// Publishes a job the sweeper found `Accepted` and records `Queued`. A
    /// failed publish leaves it `Accepted` for the next sweep.
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
