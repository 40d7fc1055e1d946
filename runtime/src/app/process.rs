//! Processing jobs in the direct modes: claim, read the input, recognise,
//! record the outcome. Standard mode passes one job at a time, batched mode a
//! micro-batch; writer mode infers with [`super::infer`] instead.

use crate::domain::message::JobMessage;
use crate::domain::{Job, JobId, JobStatus, Transition};
use crate::metrics::Metrics;
use crate::storage::jobs::Changes;
use crate::storage::{now_ms, BlobStore, JobStore, StoreError};
use async_trait::async_trait;
use futures::future::join_all;
use ocr_engine::Page;
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

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

/// A job message being handled, and the span its work is recorded under
/// (in the job's trace; see [`crate::telemetry`]).
#[derive(Debug, Clone)]
pub struct JobInHand {
    pub message: JobMessage,
    pub span: tracing::Span,
}

/// What a worker does with a micro-batch of job messages: one outcome per
/// message, in order.
#[async_trait]
pub trait HandleJobs: Send + Sync {
    async fn handle(&self, jobs: &[JobInHand]) -> Vec<Handled>;
}

/// Runs the engine on a thread that may block, timing the batch. A panic or a
/// miscounted answer becomes an engine failure of every image in the batch.
pub async fn infer(
    engine: &Arc<dyn Recognize>,
    inputs: Vec<bytes::Bytes>,
    metrics: &Metrics,
) -> Vec<Result<Page, RecognizeFailure>> {
    let count = inputs.len();
    if count == 0 {
        return Vec::new();
    }
    let engine = engine.clone();
    let started = Instant::now();
    let results = tokio::task::spawn_blocking(move || {
        let views: Vec<&[u8]> = inputs.iter().map(|b| b.as_ref()).collect();
        engine.recognize_batch(&views)
    })
    .instrument(tracing::info_span!("ocr.infer", ocr.batch.size = count))
    .await;
    metrics.observe_inference(count, started.elapsed());
    match results {
        Ok(results) if results.len() == count => results,
        Ok(results) => {
            let reason = format!(
                "engine returned {} results for {count} images",
                results.len()
            );
            vec![Err(RecognizeFailure::Engine(reason)); count]
        }
        Err(panic) => {
            let reason = format!("engine panicked: {panic}");
            vec![Err(RecognizeFailure::Engine(reason)); count]
        }
    }
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

impl Handled {
    /// For the job's span.
    pub fn label(&self) -> &'static str {
        match self {
            Handled::Succeeded => "succeeded",
            Handled::Failed(_) => "failed",
            Handled::DeadLettered(_) => "dead_lettered",
            Handled::Skipped(_) => "skipped",
            Handled::Retry(_) => "retry",
        }
    }
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
    /// Left for later: see [`Processor::handle`].
    Suspect,
    Done(Handled),
}

/// Handles a batch; the result has one entry per job, in order. The
/// database round trips of a batch run concurrently.
///
/// A job that is already `Processing` when its message arrives was claimed
/// by a worker that never finished it: most likely that worker died inside
/// the engine, and a crashing image takes its whole batch down with it. Such
/// suspects are claimed and inferred one at a time, after the rest of the
/// batch is recorded, so an image that crashes the process again charges an
/// attempt to itself only and is dead-lettered at `worker.max_attempts`,
/// while its former batch-mates finish.
#[async_trait]
impl HandleJobs for Processor {
    async fn handle(&self, jobs: &[JobInHand]) -> Vec<Handled> {
        let mut outcomes: Vec<Option<Handled>> = vec![None; jobs.len()];
        let defer_suspects = jobs.len() > 1;
        let claims = join_all(jobs.iter().map(|job| {
            self.claim_with_input(job.message.job_id, defer_suspects)
                .instrument(tracing::info_span!(parent: &job.span, "ocr.claim"))
        }))
        .await;
        let mut claimed = Vec::new();
        let mut suspects = Vec::new();
        for (slot, claim) in claims.into_iter().enumerate() {
            match claim {
                Ok(Some((job, bytes))) => claimed.push((slot, job, bytes)),
                Ok(None) => suspects.push(slot),
                Err(outcome) => outcomes[slot] = Some(outcome),
            }
        }
        self.infer_and_record(jobs, claimed, &mut outcomes).await;
        for slot in suspects {
            tracing::warn!(
                job = %jobs[slot].message.job_id,
                "job was left Processing by a worker that stopped; inferring it alone"
            );
            let claim = self
                .claim_with_input(jobs[slot].message.job_id, false)
                .instrument(tracing::info_span!(parent: &jobs[slot].span, "ocr.claim"))
                .await;
            match claim {
                Ok(Some((job, bytes))) => {
                    self.infer_and_record(jobs, vec![(slot, job, bytes)], &mut outcomes)
                        .await
                }
                Ok(None) => {}
                Err(outcome) => outcomes[slot] = Some(outcome),
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Handled::Skipped("not handled")))
            .collect()
    }
}

impl Processor {
    /// One engine call over `claimed` (slot, job, input), then each outcome
    /// recorded into `outcomes[slot]`.
    async fn infer_and_record(
        &self,
        jobs: &[JobInHand],
        claimed: Vec<(usize, Job, bytes::Bytes)>,
        outcomes: &mut [Option<Handled>],
    ) {
        if claimed.is_empty() {
            return;
        }
        let inputs = claimed.iter().map(|(_, _, bytes)| bytes.clone()).collect();
        let results = infer(&self.engine, inputs, &self.metrics).await;
        let finished = join_all(claimed.iter().zip(results).map(|((slot, job, _), result)| {
            self.finish(job, result)
                .instrument(tracing::info_span!(parent: &jobs[*slot].span, "ocr.record"))
        }))
        .await;
        for ((slot, _, _), outcome) in claimed.iter().zip(finished) {
            outcomes[*slot] = Some(outcome);
        }
    }

    /// Claims the job and reads its input; `Ok(None)`: a suspect left for
    /// later (only when `defer_suspect`); `Err` is the job's outcome when
    /// there is nothing to recognise.
    async fn claim_with_input(
        &self,
        id: JobId,
        defer_suspect: bool,
    ) -> Result<Option<(Job, bytes::Bytes)>, Handled> {
        match self.claim(id, defer_suspect).await {
            Ok(Claim::Done(outcome)) => Err(outcome),
            Ok(Claim::Suspect) => Ok(None),
            Ok(Claim::Claimed(job)) => match self.blobs.get(&job.input_key).await {
                Ok(bytes) => Ok(Some((job, bytes))),
                Err(err) => Err(self.release(&job, err.to_string()).await),
            },
            Err(err) => Err(Handled::Retry(err.to_string())),
        }
    }

    async fn claim(&self, id: JobId, defer_suspect: bool) -> Result<Claim, StoreError> {
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
                        self.metrics.job_finished(
                            JobStatus::DeadLettered,
                            job.created_at_ms,
                            now_ms(),
                        );
                        return Ok(Claim::Done(Handled::DeadLettered(reason)));
                    }
                    Transition::Lost => continue,
                }
            }
            if defer_suspect && job.status == JobStatus::Processing {
                return Ok(Claim::Suspect);
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
                self.metrics.job_finished(to, job.created_at_ms, now_ms());
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
