//! Writer mode on the GPU worker: recognise and publish a result event; never
//! touch the database, so inference keeps going while it is slow or down.
//! The writer role persists the events.

use super::crash_journal::CrashJournal;
use super::process::{infer, HandleJobs, Handled, JobInHand, RecognizeFailure};
use crate::domain::message::{traceparent, InferenceOutcome, JobMessage, ResultEvent};
use crate::domain::JobId;
use crate::metrics::Metrics;
use crate::queue::kafka::rand_span;
use crate::queue::{MessageSink, HEADER_ATTEMPT, HEADER_JOB_ID, HEADER_TRACEPARENT};
use crate::storage::{BlobStore, JobStore};
use async_trait::async_trait;
use futures::future::join_all;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::Instrument;

use super::process::Recognize;

pub struct InferAndPublish {
    pub blobs: BlobStore,
    /// Only to find the input of messages that do not carry its key.
    pub store: Option<JobStore>,
    pub engine: Arc<dyn Recognize>,
    pub results: Arc<dyn MessageSink>,
    /// Tries of one job (transient failures in this process, plus processes
    /// that died with it in the engine) before it gives up.
    pub max_attempts: u32,
    pub metrics: Metrics,
    failures: Mutex<HashMap<JobId, u32>>,
    journal: CrashJournal,
}

/// What became of one job before publishing.
enum Prepared {
    Publish(ResultEvent),
    Done(Handled),
}

impl InferAndPublish {
    pub fn new(
        blobs: BlobStore,
        store: Option<JobStore>,
        engine: Arc<dyn Recognize>,
        results: Arc<dyn MessageSink>,
        max_attempts: u32,
        metrics: Metrics,
    ) -> Self {
        InferAndPublish {
            blobs,
            store,
            engine,
            results,
            max_attempts,
            metrics,
            failures: Mutex::new(HashMap::new()),
            journal: CrashJournal::disabled(),
        }
    }

    /// Counts the processes that die with a job in the engine (see
    /// [`CrashJournal`]): such a job is inferred alone from then on and
    /// given up at `max_attempts`.
    pub fn with_crash_journal(mut self, journal: CrashJournal) -> Self {
        self.journal = journal;
        self
    }

    /// One engine call over `inputs`, recorded in the crash journal while it runs.
    async fn infer_journaled(
        &self,
        ids: &[JobId],
        inputs: Vec<bytes::Bytes>,
    ) -> Vec<Result<ocr_engine::Page, RecognizeFailure>> {
        if let Err(err) = self.journal.entering(ids) {
            tracing::warn!(error = %err, "writing the crash journal failed");
        }
        let results = infer(&self.engine, inputs, &self.metrics).await;
        if let Err(err) = self.journal.left() {
            tracing::warn!(error = %err, "writing the crash journal failed");
        }
        results
    }

    /// Counts a transient failure; past the budget the job gives up and a
    /// `GaveUp` event tells the writer to dead-letter it.
    fn transient(&self, job_id: JobId, reason: String) -> Prepared {
        let failures = {
            let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
            let count = failures.entry(job_id).or_insert(0);
            *count += 1;
            *count
        } + self.journal.crashes(job_id);
        if failures < self.max_attempts {
            return Prepared::Done(Handled::Retry(reason));
        }
        Prepared::Publish(ResultEvent {
            job_id,
            attempt: failures,
            outcome: InferenceOutcome::GaveUp {
                reason: format!("gave up after {failures} attempts: {reason}"),
            },
        })
    }

    fn attempt(&self, job_id: JobId) -> u32 {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.get(&job_id).copied().unwrap_or(0) + self.journal.crashes(job_id) + 1
    }

    /// The `GaveUp` event of a job that processes kept dying on.
    fn crashed_too_often(&self, job_id: JobId) -> Prepared {
        let crashes = self.journal.crashes(job_id);
        Prepared::Publish(ResultEvent {
            job_id,
            attempt: crashes,
            outcome: InferenceOutcome::GaveUp {
                reason: format!(
                    "gave up after {crashes} attempts: the worker process died during inference each time"
                ),
            },
        })
    }

    async fn read_input(&self, message: &JobMessage) -> Result<bytes::Bytes, Prepared> {
        let key = match (&message.input_key, &self.store) {
            (Some(key), _) => key.clone(),
            (None, Some(store)) => match store.get(message.job_id).await {
                Ok(Some(job)) => job.input_key,
                Ok(None) => return Err(Prepared::Done(Handled::Skipped("unknown job"))),
                // Not the job's fault: no attempt is counted.
                Err(err) => return Err(Prepared::Done(Handled::Retry(err.to_string()))),
            },
            (None, None) => {
                return Err(Prepared::Done(Handled::Skipped(
                    "message has no input key and no database is configured",
                )))
            }
        };
        self.blobs
            .get(&key)
            .await
            .map_err(|err| self.transient(message.job_id, err.to_string()))
    }

    async fn publish(&self, event: &ResultEvent) -> Handled {
        let payload = match event.encode() {
            Ok(payload) => payload,
            Err(err) => return Handled::Retry(format!("encoding the result: {err}")),
        };
        let id = event.job_id.to_string();
        // Within the job's span: the writer continues the job's trace.
        let trace = crate::telemetry::current_traceparent()
            .unwrap_or_else(|| traceparent(event.job_id, rand_span()));
        let attempt = event.attempt.to_string();
        let headers = [
            (HEADER_JOB_ID, id.as_str()),
            (HEADER_TRACEPARENT, trace.as_str()),
            (HEADER_ATTEMPT, attempt.as_str()),
        ];
        match self.results.send(&id, &payload, &headers).await {
            Ok(()) => {
                self.failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&event.job_id);
                if let Err(err) = self.journal.forget(event.job_id) {
                    tracing::warn!(error = %err, "writing the crash journal failed");
                }
                match &event.outcome {
                    InferenceOutcome::Recognized { .. } => Handled::Succeeded,
                    InferenceOutcome::BadInput { reason } => Handled::Failed(reason.clone()),
                    InferenceOutcome::GaveUp { reason } => Handled::DeadLettered(reason.clone()),
                }
            }
            // The result is not lost: the input offset stays uncommitted.
            Err(err) => Handled::Retry(err.to_string()),
        }
    }
}

#[async_trait]
impl HandleJobs for InferAndPublish {
    async fn handle(&self, jobs: &[JobInHand]) -> Vec<Handled> {
        let inputs = join_all(jobs.iter().map(|job| {
            self.read_input(&job.message)
                .instrument(tracing::info_span!(parent: &job.span, "ocr.read_input"))
        }))
        .await;
        let mut prepared: Vec<Option<Prepared>> = Vec::with_capacity(jobs.len());
        // Jobs a process died with in the engine run alone, after the
        // others, so a crashing image takes no batch-mate down with it again.
        let mut together = Vec::new();
        let mut alone = Vec::new();
        for (slot, input) in inputs.into_iter().enumerate() {
            let job_id = jobs[slot].message.job_id;
            match input {
                Ok(_) if self.journal.crashes(job_id) >= self.max_attempts => {
                    prepared.push(Some(self.crashed_too_often(job_id)));
                }
                Ok(input) if self.journal.crashes(job_id) > 0 => {
                    prepared.push(None);
                    alone.push(vec![(slot, input)]);
                }
                Ok(input) => {
                    prepared.push(None);
                    together.push((slot, input));
                }
                Err(done) => prepared.push(Some(done)),
            }
        }
        for group in std::iter::once(together).chain(alone) {
            if group.is_empty() {
                continue;
            }
            let ids: Vec<JobId> = group
                .iter()
                .map(|(slot, _)| jobs[*slot].message.job_id)
                .collect();
            let (slots, bytes): (Vec<usize>, Vec<bytes::Bytes>) = group.into_iter().unzip();
            let results = self.infer_journaled(&ids, bytes).await;
            for (slot, result) in slots.into_iter().zip(results) {
                let job_id = jobs[slot].message.job_id;
                let attempt = self.attempt(job_id);
                prepared[slot] = Some(match result {
                    Ok(page) => Prepared::Publish(ResultEvent {
                        job_id,
                        attempt,
                        outcome: InferenceOutcome::Recognized { page },
                    }),
                    Err(RecognizeFailure::BadInput(reason)) => Prepared::Publish(ResultEvent {
                        job_id,
                        attempt,
                        outcome: InferenceOutcome::BadInput { reason },
                    }),
                    Err(RecognizeFailure::Engine(reason)) => self.transient(job_id, reason),
                });
            }
        }
        join_all(prepared.into_iter().zip(jobs).map(|(p, job)| async move {
            match p {
                Some(Prepared::Publish(event)) => {
                    let span = tracing::info_span!(parent: &job.span, "ocr.publish_result");
                    self.publish(&event).instrument(span).await
                }
                Some(Prepared::Done(handled)) => handled,
                None => Handled::Skipped("not handled"),
            }
        }))
        .await
    }
}
