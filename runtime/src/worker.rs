//! The worker loop, for every mode: gather a micro-batch (standard mode is a
//! batch of one), hand it to the mode's handler, retry what failed for
//! transient reasons, then complete the deliveries so the consumer commits.
//! Shutdown is graceful: gathering stops, the batch in hand finishes and is
//! completed; what is still retrying stays uncommitted and is redelivered.

use crate::app::process::{HandleJobs, Handled};
use crate::domain::message::JobMessage;
use crate::domain::retry::Backoff;
use crate::metrics::Metrics;
use crate::queue::{
    Delivery, MessageConsumer, MessageSink, Receipt, HEADER_DEAD_LETTER_KIND, HEADER_ERROR,
    HEADER_JOB_ID,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const RETRY_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));

/// When a micro-batch closes: at `max_size` messages or `max_wait` after its
/// first message, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_size: usize,
    pub max_wait: Duration,
}

impl BatchPolicy {
    /// One message at a time.
    pub const STANDARD: BatchPolicy = BatchPolicy {
        max_size: 1,
        max_wait: Duration::ZERO,
    };
}

pub struct JobLoop {
    pub consumer: Box<dyn MessageConsumer>,
    pub handler: Arc<dyn HandleJobs>,
    pub dead_letters: Option<Arc<dyn MessageSink>>,
    pub policy: BatchPolicy,
    pub metrics: Metrics,
}

/// One job of a batch and every delivery of it (a batch may hold duplicates).
struct Pending {
    message: JobMessage,
    receipts: Vec<Receipt>,
}

impl JobLoop {
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let Some(batch) = self.gather(&shutdown).await else {
                break;
            };
            let (jobs, mut done) = decode(batch);
            self.metrics.set_in_flight(jobs.len());
            let (finished, interrupted) = self.process(jobs, &shutdown).await;
            self.metrics.set_in_flight(0);
            done.extend(finished);
            if let Err(err) = self.consumer.complete(&done).await {
                // Redelivery is harmless: the jobs are final in the database.
                tracing::warn!(error = %err, "committing offsets failed");
            }
            if interrupted {
                break;
            }
        }
        tracing::info!("worker stopped");
    }

    /// Waits for a first message, then fills the batch until it is full or
    /// its wait is over. `None` once shut down or the queue closed.
    async fn gather(&mut self, shutdown: &CancellationToken) -> Option<Vec<Delivery>> {
        let first = loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return None,
                next = self.consumer.next() => next,
            };
            match next? {
                Ok(delivery) => break delivery,
                Err(err) => {
                    tracing::warn!(error = %err, "receiving from the queue failed");
                    tokio::time::sleep(RETRY_BACKOFF.initial).await;
                }
            }
        };
        let opened = Instant::now();
        let deadline = tokio::time::Instant::now() + self.policy.max_wait;
        let mut batch = vec![first];
        while batch.len() < self.policy.max_size {
            let next = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = shutdown.cancelled() => break,
                next = self.consumer.next() => next,
            };
            match next {
                Some(Ok(delivery)) => batch.push(delivery),
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "receiving from the queue failed");
                    break;
                }
                None => break,
            }
        }
        self.metrics.observe_batch_wait(opened.elapsed());
        Some(batch)
    }

    /// Handles the jobs until none is left to retry or shutdown comes.
    /// Returns the receipts of finished jobs and whether it was interrupted.
    async fn process(
        &self,
        mut pending: Vec<Pending>,
        shutdown: &CancellationToken,
    ) -> (Vec<Receipt>, bool) {
        let mut finished = Vec::new();
        let mut failures = 0;
        while !pending.is_empty() {
            let messages: Vec<JobMessage> = pending.iter().map(|p| p.message.clone()).collect();
            let outcomes = self.handler.handle(&messages).await;
            let mut retry = Vec::new();
            for (job, outcome) in pending.into_iter().zip(outcomes) {
                match outcome {
                    Handled::Retry(reason) => {
                        tracing::warn!(job = %job.message.job_id, %reason, "transient failure; retrying");
                        retry.push(job);
                    }
                    Handled::DeadLettered(reason) => {
                        tracing::error!(job = %job.message.job_id, %reason, "job dead-lettered");
                        if !self.dead_letter(&job.message, &reason, shutdown).await {
                            return (finished, true);
                        }
                        finished.extend(job.receipts);
                    }
                    other => {
                        tracing::debug!(job = %job.message.job_id, outcome = ?other, "job handled");
                        finished.extend(job.receipts);
                    }
                }
            }
            pending = retry;
            if pending.is_empty() {
                break;
            }
            failures += 1;
            tokio::select! {
                // Unfinished jobs stay uncommitted: they come back after a restart.
                _ = shutdown.cancelled() => return (finished, true),
                _ = tokio::time::sleep(RETRY_BACKOFF.delay(failures)) => {}
            }
        }
        (finished, false)
    }

    /// Parks a job that gave up on the dead-letter topic, retrying until the
    /// broker takes it; `false` when shutdown interrupted.
    async fn dead_letter(
        &self,
        message: &JobMessage,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        let Some(dlq) = &self.dead_letters else {
            return true;
        };
        let id = message.job_id.to_string();
        let headers = [
            (HEADER_JOB_ID, id.as_str()),
            (HEADER_DEAD_LETTER_KIND, "job"),
            (HEADER_ERROR, reason),
        ];
        let mut failures = 0;
        loop {
            match dlq.send(&id, &message.encode(), &headers).await {
                Ok(()) => return true,
                Err(err) => {
                    failures += 1;
                    tracing::error!(job = %id, error = %err, "dead-letter publish failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(RETRY_BACKOFF.delay(failures)) => {}
                    }
                }
            }
        }
    }
}

/// Splits a batch into jobs (one entry per job id) and the receipts of
/// messages that are not job messages, which are done as soon as seen.
fn decode(batch: Vec<Delivery>) -> (Vec<Pending>, Vec<Receipt>) {
    let mut jobs: Vec<Pending> = Vec::with_capacity(batch.len());
    let mut skipped = Vec::new();
    for delivery in batch {
        match JobMessage::decode(&delivery.payload) {
            Ok(message) => match jobs.iter_mut().find(|p| p.message.job_id == message.job_id) {
                Some(existing) => existing.receipts.push(delivery.receipt),
                None => jobs.push(Pending {
                    message,
                    receipts: vec![delivery.receipt],
                }),
            },
            Err(err) => {
                tracing::warn!(error = %err, "skipping a message that is not a job message");
                skipped.push(delivery.receipt);
            }
        }
    }
    (jobs, skipped)
}
