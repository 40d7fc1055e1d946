//! The writer role's use case: make a result event durable, then announce it.
//!
//! For each event: first the compare-and-set to the final state, which stores
//! the result in the database (the source of truth); then, from the row as it
//! stands, the result document in the blob store and the completion webhook.
//! A finished result is thus durable before anything outside our control is
//! tried, and a blob store or webhook that is down never fails a job: after
//! `writer.retries` tries the notification goes to the dead-letter topic
//! (`ocr-dead-letter-kind: notification`) and the job stays final.
//!
//! An event for a job already final (a redelivery after a crash, a duplicate
//! inference) is announced again from the row: the document is rewritten
//! with the stored result and the webhook repeats, so announcements are at
//! least once and receivers deduplicate by job id. The database being down is
//! nobody's fault: the writer waits for it as long as it takes and results
//! pile up in the topic.

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
    /// The job reached this final state and was announced.
    Final(JobStatus),
    /// The job was already final (a redelivered or duplicate event), or
    /// unknown; a final job was announced again.
    Duplicate,
    /// The job is final, but its document or webhook gave up: the
    /// notification was dead-lettered.
    Unannounced { status: JobStatus, reason: String },
}

/// Where the result document of a job is stored.
pub fn result_key(id: JobId) -> String {
    format!("results/{id}.json")
}

/// The final state and the row changes an inference outcome leads to.
fn final_changes(outcome: &InferenceOutcome) -> (JobStatus, Changes) {
    match outcome {
        InferenceOutcome::Recognized { page } => {
            let result = serde_json::to_string(page).unwrap_or_default();
            let changes = Changes {
                result: Some(result),
                count_attempt: true,
                ..Changes::default()
            };
            (JobStatus::Succeeded, changes)
        }
        InferenceOutcome::BadInput { reason } | InferenceOutcome::GaveUp { reason } => {
            let status = match outcome {
                InferenceOutcome::BadInput { .. } => JobStatus::Failed,
                _ => JobStatus::DeadLettered,
            };
            let changes = Changes {
                error: Some(reason.clone()),
                count_attempt: true,
                ..Changes::default()
            };
            (status, changes)
        }
    }
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
        let written = if job.status.is_terminal() {
            Written::Duplicate
        } else {
            let (status, changes) = final_changes(&event.outcome);
            self.finish(job, status, changes, shutdown).await?
        };
        // Announce what the database now holds, whichever event won.
        let Some(job) = self.with_database(shutdown, || self.store.get(id)).await? else {
            return Ok(written);
        };
        if !job.status.is_terminal() {
            return Ok(written);
        }
        match self.announce(&job, event, shutdown).await? {
            Some(reason) if written != Written::Duplicate => Ok(Written::Unannounced {
                status: job.status,
                reason,
            }),
            _ => Ok(written),
        }
    }

    /// The result document and the webhook for a final job; `Some(reason)`
    /// when one of them gave up and the notification was dead-lettered.
    async fn announce(
        &self,
        job: &Job,
        event: &ResultEvent,
        shutdown: &CancellationToken,
    ) -> Result<Option<String>, Interrupted> {
        let mut failures = Vec::new();
        let mut notice = serde_json::json!({
            "job_id": job.id, "status": job.status, "attempt": job.attempts,
        });
        if let (JobStatus::Succeeded, Some(result)) = (job.status, &job.result) {
            let key = result_key(job.id);
            let document = bytes::Bytes::from(result.clone().into_bytes());
            let upload = self
                .with_retries(shutdown, "blob", || self.blobs.put(&key, document.clone()))
                .await?;
            if let Err(reason) = upload {
                failures.push(reason);
            }
            notice["result_key"] = serde_json::Value::String(key);
            notice["result"] = serde_json::from_str(result).unwrap_or(serde_json::Value::Null);
        } else {
            notice["error"] = serde_json::json!(job.error);
        }
        if let Err(reason) = self.notify(job.id, &notice, shutdown).await? {
            failures.push(reason);
        }
        if failures.is_empty() {
            return Ok(None);
        }
        let reason = format!("announcing the result gave up: {}", failures.join("; "));
        self.dead_letter(event, &reason, shutdown).await?;
        Ok(Some(reason))
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

    /// Parks the event on the dead-letter topic (until the broker takes it)
    /// as a notification that never arrived; the job itself stays final.
    async fn dead_letter(
        &self,
        event: &ResultEvent,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> Result<(), Interrupted> {
        tracing::error!(job = %event.job_id, %reason, "dead-lettering the notification");
        let payload = event.encode().unwrap_or_default();
        let id = event.job_id.to_string();
        let headers = [
            (HEADER_JOB_ID, id.as_str()),
            (HEADER_DEAD_LETTER_KIND, "notification"),
            (HEADER_ERROR, reason),
        ];
        let mut failures = 0;
        while let Err(err) = self.dead_letters.send(&id, &payload, &headers).await {
            failures += 1;
            tracing::warn!(job = %id, error = %err, "dead-letter publish failed; retrying");
            self.pause(self.database_backoff.delay(failures), shutdown)
                .await?;
        }
        Ok(())
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
