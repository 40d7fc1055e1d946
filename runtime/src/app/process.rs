//! Processing jobs: claim, read the input, recognise, record the outcome.
//! Every worker mode runs this; standard mode passes one job at a time,
//! batched mode a micro-batch.

use crate::domain::{Job, JobId, JobStatus, Transition};
use crate::metrics::Metrics;
use crate::storage::jobs::Changes;
use crate::storage::{now_ms, BlobStore, JobStore, StoreError};
use ocr_engine::Page;
use std::sync::Arc;
use std::time::Instant;

/// Why recognition of one image failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecognizeFailure {
    /// The input can never be recognised: fail the job, don't retry.
    BadInput(String),
    /// The engine broke (out of memory, device error): retry.
    Engine(String),
}

/// The OCR engine as the worker sees it: one call per batch, one outcome per
/// image, so one bad image never fails the others.
pub trait Recognize: Send + Sync {
    fn recognize_batch(&self, images: &[&[u8]]) -> Vec<Result<Page, RecognizeFailure>>;
}

/// The outcome of handling one job's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    Succeeded,
    Failed(String),
    /// Attempts exhausted: the caller sends the message to the dead-letter topic.
    DeadLettered(String),
    /// Nothing to do (already final, unknown id, or another worker owns it).
    Skipped(&'static str),
    /// A transient failure: handle the same message again after a pause.
    Retry(String),
}

#[derive(Clone)]
pub struct Processor {
    pub store: JobStore,
    pub blobs: BlobStore,
    pub engine: Arc<dyn Recognize>,
    pub max_attempts: u32,
    pub metrics: Metrics,
}

enum Claim {
    Claimed(Job),
    Done(Handled),
}

impl Processor {
    /// Handles a batch of job ids; the result has one entry per id, in order.
    pub async fn handle(&self, ids: &[JobId]) -> Vec<Handled> {
        let mut outcomes: Vec<Option<Handled>> = vec![None; ids.len()];
        let mut claimed: Vec<(usize, Job, bytes::Bytes)> = Vec::new();
        for (slot, id) in ids.iter().enumerate() {
            match self.claim(*id).await {
                Ok(Claim::Done(outcome)) => outcomes[slot] = Some(outcome),
                Ok(Claim::Claimed(job)) => match self.blobs.get(&job.input_key).await {
                    Ok(bytes) => claimed.push((slot, job, bytes)),
                    Err(err) => outcomes[slot] = Some(self.release(&job, err.to_string()).await),
                },
                Err(err) => outcomes[slot] = Some(Handled::Retry(err.to_string())),
            }
        }

        if !claimed.is_empty() {
            let engine = self.engine.clone();
            let inputs: Vec<bytes::Bytes> = claimed.iter().map(|(_, _, b)| b.clone()).collect();
            let started = Instant::now();
            let results = tokio::task::spawn_blocking(move || {
                let views: Vec<&[u8]> = inputs.iter().map(|b| b.as_ref()).collect();
                engine.recognize_batch(&views)
            })
            .await;
            self.metrics
                .observe_inference(claimed.len(), started.elapsed());
            let results = match results {
                Ok(results) if results.len() == claimed.len() => results,
                Ok(results) => {
                    let reason = format!(
                        "engine returned {} results for {} images",
                        results.len(),
                        claimed.len()
                    );
                    vec![Err(RecognizeFailure::Engine(reason)); claimed.len()]
                }
                Err(panic) => {
                    let reason = format!("engine panicked: {panic}");
                    vec![Err(RecognizeFailure::Engine(reason)); claimed.len()]
                }
            };
            for ((slot, job, _), result) in claimed.into_iter().zip(results) {
                outcomes[slot] = Some(self.finish(&job, result).await);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Handled::Skipped("not handled")))
            .collect()
    }

    async fn claim(&self, id: JobId) -> Result<Claim, StoreError> {
        // A few rounds: a lost compare-and-set means the row moved under us,
        // so look again at what it is now.
        for _ in 0..4 {
            let Some(job) = self.store.get(id).await? else {
                return Ok(Claim::Done(Handled::Skipped("unknown job")));
            };
            if job.status.is_terminal() {
                return Ok(Claim::Done(Handled::Skipped("already final")));
            }
            if job.attempts >= self.max_attempts {
                let reason = format!(
                    "gave up after {} attempts: {}",
                    job.attempts,
                    job.error
                        .clone()
                        .unwrap_or_else(|| "no error recorded".into())
                );
                let changes = Changes {
                    error: Some(reason.clone()),
                    ..Changes::default()
                };
                match self
                    .store
                    .transition(
                        id,
                        job.status,
                        JobStatus::DeadLettered,
                        Some(job.attempts),
                        changes,
                        now_ms(),
                    )
                    .await?
                {
                    Transition::Applied => {
                        self.metrics.job_finished(JobStatus::DeadLettered);
                        return Ok(Claim::Done(Handled::DeadLettered(reason)));
                    }
                    Transition::Lost => continue,
                }
            }
            let changes = Changes {
                count_attempt: true,
                ..Changes::default()
            };
            match self
                .store
                .transition(
                    id,
                    job.status,
                    JobStatus::Processing,
                    Some(job.attempts),
                    changes,
                    now_ms(),
                )
                .await?
            {
                Transition::Applied => {
                    return Ok(Claim::Claimed(Job {
                        status: JobStatus::Processing,
                        attempts: job.attempts + 1,
                        ..job
                    }))
                }
                Transition::Lost => continue,
            }
        }
        Ok(Claim::Done(Handled::Skipped("contended")))
    }

    /// Records the outcome of the attempt this worker owns. A lost
    /// compare-and-set means another worker reclaimed the job: its attempt wins.
    async fn finish(&self, job: &Job, result: Result<Page, RecognizeFailure>) -> Handled {
        let (to, changes, handled) = match result {
            Ok(page) => match serde_json::to_string(&page) {
                Ok(json) => (
                    JobStatus::Succeeded,
                    Changes {
                        result: Some(json),
                        ..Changes::default()
                    },
                    Handled::Succeeded,
                ),
                Err(err) => {
                    return self
                        .release(job, format!("serialising result: {err}"))
                        .await
                }
            },
            Err(RecognizeFailure::BadInput(reason)) => (
                JobStatus::Failed,
                Changes {
                    error: Some(reason.clone()),
                    ..Changes::default()
                },
                Handled::Failed(reason),
            ),
            Err(RecognizeFailure::Engine(reason)) => return self.release(job, reason).await,
        };
        match self
            .store
            .transition(
                job.id,
                JobStatus::Processing,
                to,
                Some(job.attempts),
                changes,
                now_ms(),
            )
            .await
        {
            Ok(Transition::Applied) => {
                self.metrics.job_finished(to);
                handled
            }
            Ok(Transition::Lost) => Handled::Skipped("reclaimed by another worker"),
            Err(err) => Handled::Retry(err.to_string()),
        }
    }

    /// Hands the job back after a transient failure, keeping the reason so a
    /// dead-lettered job says why it kept failing.
    async fn release(&self, job: &Job, reason: String) -> Handled {
        let changes = Changes {
            error: Some(reason.clone()),
            ..Changes::default()
        };
        if let Err(err) = self
            .store
            .transition(
                job.id,
                JobStatus::Processing,
                JobStatus::Queued,
                Some(job.attempts),
                changes,
                now_ms(),
            )
            .await
        {
            tracing::warn!(job = %job.id, error = %err, "could not hand the job back");
        }
        Handled::Retry(reason)
    }
}
