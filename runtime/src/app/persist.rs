//! The writer role's use case: make a result event durable. For each event,
//! in this order: store the result document in the blob store, call the
//! completion webhook, then move the job to its final state with a
//! compare-and-set. A job already final means the event is a duplicate and
//! nothing happens, so the webhook has always been called before a job
//! reads as final.
//!
//! Failures are treated by where they come from. The database being down
//! is nobody's fault: the writer waits for it as long as it takes and results
//! pile up in the topic. A blob store or webhook that keeps failing past the
//! retry budget sends the event to the dead-letter topic and fails the job
//! with the reason.

use crate::domain::message::{InferenceOutcome, ResultEvent};
use crate::domain::retry::Backoff;
use crate::domain::{Job, JobId, JobStatus, Transition};
use crate::metrics::Metrics;
use crate::notify::Webhook;
use crate::queue::{MessageSink, HEADER_DEAD_LETTER_KIND, HEADER_ERROR, HEADER_JOB_ID};
use crate::storage::jobs::Changes;
use crate::storage::{now_ms, BlobStore, JobStore, StoreError};
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How many times the blob upload and the webhook are tried, and the pauses.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub backoff: Backoff,
}

#[derive(Clone)]
pub struct ResultWriter {
    pub store: JobStore,
    pub blobs: BlobStore,
    pub webhook: Option<Webhook>,
    pub retry: RetryPolicy,
    /// Pauses while waiting for the database.
    pub database_backoff: Backoff,
    pub dead_letters: Arc<dyn MessageSink>,
    pub metrics: Metrics,
}

/// What writing one event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The job reached this final state.
    Final(JobStatus),
    /// The job was already final (a redelivered or duplicate event), or unknown.
    Duplicate,
    /// The blob store or webhook gave up: dead-lettered and `Failed`.
    DeadLettered(String),
}

/// Where the result document of a job is stored.
pub fn result_key(id: JobId) -> String {
    format!("results/{id}.json")
}

/// Shutdown came while waiting: leave the event uncommitted.
#[derive(Debug)]
pub struct Interrupted;

impl ResultWriter {
    pub async fn write(
        &self,
        event: &ResultEvent,
        shutdown: &CancellationToken,
    ) -> Result<Written, Interrupted> {
        let id = event.job_id;
        let Some(job) = self.with_database(shutdown, || self.store.get(id)).await? else {
            tracing::warn!(job = %id, "result for an unknown job; skipping");
            return Ok(Written::Duplicate);
        };
        if job.status.is_terminal() {
            return Ok(Written::Duplicate);
        }
        let (status, changes, notice) = match &event.outcome {
            InferenceOutcome::Recognized { page } => {
                let document = serde_json::to_vec(page).unwrap_or_default();
                let key = result_key(id);
                let upload = self
                    .with_retries(shutdown, "blob", || {
                        self.blobs.put(&key, document.clone().into())
                    })
                    .await?;
                if let Err(reason) = upload {
                    return self.give_up(event, job, reason, shutdown).await;
                }
                let result = String::from_utf8(document).unwrap_or_default();
                let notice = serde_json::json!({
                    "job_id": id, "status": JobStatus::Succeeded, "result_key": key,
                    "attempt": event.attempt, "result": page,
                });
                let changes = Changes {
                    result: Some(result),
                    count_attempt: true,
                    ..Changes::default()
                };
                (JobStatus::Succeeded, changes, notice)
            }
            InferenceOutcome::BadInput { reason } | InferenceOutcome::GaveUp { reason } => {
                let status = match event.outcome {
                    InferenceOutcome::BadInput { .. } => JobStatus::Failed,
                    _ => JobStatus::DeadLettered,
                };
                let notice = serde_json::json!({
                    "job_id": id, "status": status, "error": reason, "attempt": event.attempt,
                });
                let changes = Changes {
                    error: Some(reason.clone()),
                    count_attempt: true,
                    ..Changes::default()
                };
                (status, changes, notice)
            }
        };
        if let Err(reason) = self.notify(id, &notice, shutdown).await? {
            return self.give_up(event, job, reason, shutdown).await;
        }
        self.finish(job, status, changes, shutdown).await
    }

    async fn notify(
        &self,
        id: JobId,
        notice: &serde_json::Value,
        shutdown: &CancellationToken,
    ) -> Result<Result<(), String>, Interrupted> {
        let Some(webhook) = &self.webhook else {
            return Ok(Ok(()));
        };
        let body = notice.to_string().into_bytes();
        let id = id.to_string();
        self.with_retries(shutdown, "webhook", || webhook.deliver(&id, body.clone()))
            .await
    }

    /// The blob store or the webhook kept failing: park the event on the
    /// dead-letter topic (until the broker takes it) and fail the job.
    async fn give_up(
        &self,
        event: &ResultEvent,
        job: Job,
        reason: String,
        shutdown: &CancellationToken,
    ) -> Result<Written, Interrupted> {
        let reason = format!("writer gave up: {reason}");
        tracing::error!(job = %event.job_id, %reason, "dead-lettering the result");
        let payload = event.encode().unwrap_or_default();
        let id = event.job_id.to_string();
        let headers = [
            (HEADER_JOB_ID, id.as_str()),
            (HEADER_DEAD_LETTER_KIND, "result"),
            (HEADER_ERROR, reason.as_str()),
        ];
        let mut failures = 0;
        while let Err(err) = self.dead_letters.send(&id, &payload, &headers).await {
            failures += 1;
            tracing::warn!(job = %id, error = %err, "dead-letter publish failed; retrying");
            self.pause(self.database_backoff.delay(failures), shutdown)
                .await?;
        }
        let changes = Changes {
            error: Some(reason.clone()),
            count_attempt: true,
            ..Changes::default()
        };
        match self
            .finish(job, JobStatus::Failed, changes, shutdown)
            .await?
        {
            Written::Final(_) => Ok(Written::DeadLettered(reason)),
            other => Ok(other),
        }
    }

    /// Claims the job for this result (`→ Processing`, counting the attempt)
    /// and moves it to `status`, re-reading whenever a compare-and-set loses.
    async fn finish(
        &self,
        mut job: Job,
        status: JobStatus,
        changes: Changes,
        shutdown: &CancellationToken,
    ) -> Result<Written, Interrupted> {
        loop {
            if job.status.is_terminal() {
                return Ok(Written::Duplicate);
            }
            let claim = Changes {
                count_attempt: true,
                ..Changes::default()
            };
            let (from, attempts) = (job.status, job.attempts);
            let claimed = self
                .with_database(shutdown, || {
                    self.store.transition(
                        job.id,
                        from,
                        JobStatus::Processing,
                        Some(attempts),
                        claim.clone(),
                        now_ms(),
                    )
                })
                .await?;
            if claimed == Transition::Applied {
                let done = Changes {
                    count_attempt: false,
                    ..changes.clone()
                };
                let finished = self
                    .with_database(shutdown, || {
                        self.store.transition(
                            job.id,
                            JobStatus::Processing,
                            status,
                            Some(attempts + 1),
                            done.clone(),
                            now_ms(),
                        )
                    })
                    .await?;
                if finished == Transition::Applied {
                    self.metrics
                        .job_finished(status, job.created_at_ms, now_ms());
                    return Ok(Written::Final(status));
                }
            }
            match self
                .with_database(shutdown, || self.store.get(job.id))
                .await?
            {
                Some(current) => job = current,
                None => return Ok(Written::Duplicate),
            }
        }
    }

    /// Runs a database call until it succeeds: an outage stalls the writer,
    /// never fails a job.
    async fn with_database<T, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        mut call: F,
    ) -> Result<T, Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let mut failures = 0;
        loop {
            match call().await {
                Ok(value) => {
                    if failures > 0 {
                        tracing::info!(failures, "database is back");
                    }
                    return Ok(value);
                }
                Err(err) => {
                    failures += 1;
                    self.metrics.writer_retry("database");
                    tracing::warn!(error = %err, failures, "database unavailable; waiting");
                    self.pause(self.database_backoff.delay(failures), shutdown)
                        .await?;
                }
            }
        }
    }

    /// Tries `call` up to the retry budget; the inner `Err` is the last
    /// reason. `what` names the operation in logs and metrics.
    async fn with_retries<E, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        what: &'static str,
        mut call: F,
    ) -> Result<Result<(), String>, Interrupted>
    where
        E: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let mut last = String::new();
        for attempt in 1..=self.retry.attempts.max(1) {
            match call().await {
                Ok(()) => return Ok(Ok(())),
                Err(err) => {
                    last = format!("{what} failed {attempt} times, last: {err}");
                    self.metrics.writer_retry(what);
                    tracing::warn!(%what, attempt, error = %err, "retrying");
                    if attempt < self.retry.attempts {
                        self.pause(self.retry.backoff.delay(attempt), shutdown)
                            .await?;
                    }
                }
            }
        }
        Ok(Err(last))
    }

    async fn pause(
        &self,
        delay: std::time::Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        tokio::select! {
            _ = shutdown.cancelled() => Err(Interrupted),
            _ = tokio::time::sleep(delay) => Ok(()),
        }
    }
}
