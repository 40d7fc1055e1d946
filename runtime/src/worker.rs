//! The worker loop, for every mode: gather a micro-batch (standard mode is a
//! batch of one), hand it to the mode's handler, retry what failed for
//! transient reasons, then complete the deliveries so the consumer commits.
//! With `in_flight` > 1 the next batch is gathered and started while earlier
//! ones are still being handled, so a GPU is not left idle while a batch is
//! claimed, decoded and recorded; offsets still commit only up to the first
//! unfinished message ([`crate::queue::offsets`]).
//! Shutdown is graceful: gathering stops, the batches in hand finish and are
//! completed; what is still retrying stays uncommitted and is redelivered.

use crate::app::process::{HandleJobs, Handled, JobInHand};
use crate::domain::message::JobMessage;
use crate::domain::retry::Backoff;
use crate::metrics::Metrics;
use crate::queue::{
    Delivery, MessageConsumer, MessageSink, Receipt, HEADER_DEAD_LETTER_KIND, HEADER_ERROR,
    HEADER_JOB_ID,
};
use crate::telemetry;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

const RETRY_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));

/// When a micro-batch closes: at `max_size` messages or `max_wait` after its
/// first message, whichever comes first; and how many batches may be handled
/// at once (`in_flight`, at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    pub max_size: usize,
    pub max_wait: Duration,
    pub in_flight: usize,
}

impl BatchPolicy {
    /// One message at a time.
    pub const STANDARD: BatchPolicy = BatchPolicy {
        max_size: 1,
        max_wait: Duration::ZERO,
        in_flight: 1,
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
    job: JobInHand,
    receipts: Vec<Receipt>,
}

impl JobLoop {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let handling = Handling {
            handler: self.handler.clone(),
            dead_letters: self.dead_letters.clone(),
        };
        let limit = self.policy.in_flight.max(1);
        let mut running: JoinSet<Outcome> = JoinSet::new();
        let mut in_flight_jobs = 0;
        let mut interrupted = false;
        while !interrupted {
            if running.len() >= limit {
                if let Some(outcome) = running.join_next().await {
                    interrupted = self.finish(outcome, &mut in_flight_jobs).await;
                }
                continue;
            }
            let batch = match self.gather(&shutdown, &mut running).await {
                Gathered::Batch(batch) => batch,
                Gathered::Finished(outcome) => {
                    interrupted = self.finish(outcome, &mut in_flight_jobs).await;
                    continue;
                }
                Gathered::Stopped => break,
            };
            let batch_span = tracing::info_span!(
                parent: None,
                "ocr.batch",
                ocr.batch.messages = batch.len()
            );
            let (jobs, skipped) = decode(batch, &batch_span);
            in_flight_jobs += jobs.len();
            self.metrics.set_in_flight(in_flight_jobs);
            let handling = handling.clone();
            let shutdown = shutdown.clone();
            running.spawn(
                async move {
                    let jobs_count = jobs.len();
                    let (mut done, interrupted) = handling.process(jobs, &shutdown).await;
                    done.extend(skipped);
                    Outcome {
                        done,
                        jobs: jobs_count,
                        interrupted,
                    }
                }
                .instrument(batch_span),
            );
        }
        // Whatever is still being handled finishes and is completed.
        while let Some(outcome) = running.join_next().await {
            self.finish(outcome, &mut in_flight_jobs).await;
        }
        tracing::info!("worker stopped");
    }

    /// Completes a handled batch's deliveries; true when handling was
    /// interrupted by shutdown (then no new batch starts).
    async fn finish(
        &mut self,
        outcome: Result<Outcome, tokio::task::JoinError>,
        in_flight_jobs: &mut usize,
    ) -> bool {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(err) => {
                // Its deliveries stay uncommitted and come back after a restart.
                tracing::error!(error = %err, "a batch task failed");
                return true;
            }
        };
        *in_flight_jobs = in_flight_jobs.saturating_sub(outcome.jobs);
        self.metrics.set_in_flight(*in_flight_jobs);
        if let Err(err) = self.consumer.complete(&outcome.done).await {
            // Redelivery is harmless: the jobs are final in the database.
            tracing::warn!(error = %err, "committing offsets failed");
        }
        outcome.interrupted
    }

    /// Waits for a first message, then fills the batch until it is full or
    /// its wait is over. While waiting for the first message, a batch in
    /// `running` that finishes is handed back so it commits at once.
    async fn gather(
        &mut self,
        shutdown: &CancellationToken,
        running: &mut JoinSet<Outcome>,
    ) -> Gathered {
        let first = loop {
            // `next()` is cancel-safe (nothing is taken from the queue
            // unless it returns), so racing it with a finished batch is too.
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Gathered::Stopped,
                Some(outcome) = running.join_next(), if !running.is_empty() => {
                    return Gathered::Finished(outcome);
                }
                next = self.consumer.next() => next,
            };
            match next {
                None => return Gathered::Stopped,
                Some(Ok(delivery)) => break delivery,
                Some(Err(err)) => {
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
        Gathered::Batch(batch)
    }
}

/// What [`JobLoop::gather`] came back with.
enum Gathered {
    Batch(Vec<Delivery>),
    /// A running batch finished before the next message came.
    Finished(Result<Outcome, tokio::task::JoinError>),
    /// Shut down, or the queue closed.
    Stopped,
}

/// A handled batch: the receipts to complete, and whether shutdown cut it short.
struct Outcome {
    done: Vec<Receipt>,
    jobs: usize,
    interrupted: bool,
}

/// What handling a batch needs, cloned into each batch's task.
#[derive(Clone)]
struct Handling {
    handler: Arc<dyn HandleJobs>,
    dead_letters: Option<Arc<dyn MessageSink>>,
}

impl Handling {
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
            let jobs: Vec<JobInHand> = pending.iter().map(|p| p.job.clone()).collect();
            let outcomes = self.handler.handle(&jobs).await;
            let mut retry = Vec::new();
            for (job, outcome) in pending.into_iter().zip(outcomes) {
                let id = job.job.message.job_id;
                job.job.span.record("ocr.outcome", outcome.label());
                match outcome {
                    Handled::Retry(reason) => {
                        tracing::warn!(job = %id, %reason, "transient failure; retrying");
                        retry.push(job);
                    }
                    Handled::DeadLettered(reason) => {
                        tracing::error!(job = %id, %reason, "job dead-lettered");
                        if !self.dead_letter(&job.job.message, &reason, shutdown).await {
                            return (finished, true);
                        }
                        finished.extend(job.receipts);
                    }
                    other => {
                        tracing::debug!(job = %id, outcome = ?other, "job handled");
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
/// Each job gets a span in the trace its message carries, linked to the
/// batch's span.
fn decode(batch: Vec<Delivery>, batch_span: &tracing::Span) -> (Vec<Pending>, Vec<Receipt>) {
    let mut jobs: Vec<Pending> = Vec::with_capacity(batch.len());
    let mut skipped = Vec::new();
    for delivery in batch {
        match JobMessage::decode(&delivery.payload) {
            Ok(message) => match jobs
                .iter_mut()
                .find(|p| p.job.message.job_id == message.job_id)
            {
                Some(existing) => existing.receipts.push(delivery.receipt),
                None => {
                    let span = tracing::info_span!(
                        parent: None,
                        "ocr.job",
                        ocr.job.id = %message.job_id,
                        ocr.outcome = tracing::field::Empty
                    );
                    telemetry::continue_trace(&span, delivery.traceparent.as_deref());
                    telemetry::link(&span, batch_span);
                    jobs.push(Pending {
                        job: JobInHand { message, span },
                        receipts: vec![delivery.receipt],
                    })
                }
            },
            Err(err) => {
                tracing::warn!(error = %err, "skipping a message that is not a job message");
                skipped.push(delivery.receipt);
            }
        }
    }
    (jobs, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::JobId;
    use crate::queue::QueueError;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::sync::mpsc;

    /// A queue whose completions the test can read; `next` waits for the
    /// test to send (like a quiet topic) until the sender is dropped.
    struct Queue {
        rx: mpsc::UnboundedReceiver<JobMessage>,
        received: i64,
        completed: Arc<Mutex<Vec<i64>>>,
    }

    #[async_trait]
    impl MessageConsumer for Queue {
        async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
            let message = self.rx.recv().await?;
            let offset = self.received;
            self.received += 1;
            Some(Ok(Delivery {
                payload: message.encode(),
                traceparent: None,
                receipt: Receipt {
                    partition: 0,
                    offset,
                },
            }))
        }

        async fn complete(&mut self, done: &[Receipt]) -> Result<(), QueueError> {
            let mut completed = self.completed.lock().expect("lock");
            completed.extend(done.iter().map(|r| r.offset));
            Ok(())
        }
    }

    /// Takes `delay` per batch and records how many batches ran at once.
    struct SlowHandler {
        delay: Duration,
        running: AtomicUsize,
        most_at_once: AtomicUsize,
    }

    #[async_trait]
    impl HandleJobs for SlowHandler {
        async fn handle(&self, jobs: &[JobInHand]) -> Vec<Handled> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_at_once.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            self.running.fetch_sub(1, Ordering::SeqCst);
            jobs.iter().map(|_| Handled::Succeeded).collect()
        }
    }

    struct Run {
        send: mpsc::UnboundedSender<JobMessage>,
        completed: Arc<Mutex<Vec<i64>>>,
        handler: Arc<SlowHandler>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(policy: BatchPolicy, delay: Duration) -> Run {
        let (send, rx) = mpsc::unbounded_channel();
        let completed = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(SlowHandler {
            delay,
            running: AtomicUsize::new(0),
            most_at_once: AtomicUsize::new(0),
        });
        let jobs = JobLoop {
            consumer: Box::new(Queue {
                rx,
                received: 0,
                completed: completed.clone(),
            }),
            handler: handler.clone(),
            dead_letters: None,
            policy,
            metrics: Metrics::new(),
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(jobs.run(shutdown.clone()));
        Run {
            send,
            completed,
            handler,
            shutdown,
            task,
        }
    }

    fn send_jobs(run: &Run, n: usize) {
        for _ in 0..n {
            let message = JobMessage::new(JobId::new(), "input");
            run.send.send(message).expect("loop is running");
        }
    }

    async fn wait_completed(run: &Run, n: usize) -> Vec<i64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let done = run.completed.lock().expect("lock").clone();
            if done.len() >= n {
                return done;
            }
            assert!(Instant::now() < deadline, "only {done:?} completed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn batched(in_flight: usize) -> BatchPolicy {
        BatchPolicy {
            max_size: 2,
            max_wait: Duration::from_millis(5),
            in_flight,
        }
    }

    #[tokio::test]
    async fn with_two_in_flight_the_next_batch_starts_before_the_first_ends() {
        let run = start(batched(2), Duration::from_millis(200));
        send_jobs(&run, 8);
        let mut done = wait_completed(&run, 8).await;
        done.sort();
        assert_eq!(done, (0..8).collect::<Vec<_>>());
        assert_eq!(run.handler.most_at_once.load(Ordering::SeqCst), 2);
        run.shutdown.cancel();
        run.task.await.expect("loop ends");
    }

    #[tokio::test]
    async fn with_one_in_flight_batches_run_one_after_another() {
        let run = start(batched(1), Duration::from_millis(50));
        send_jobs(&run, 6);
        wait_completed(&run, 6).await;
        assert_eq!(run.handler.most_at_once.load(Ordering::SeqCst), 1);
        run.shutdown.cancel();
        run.task.await.expect("loop ends");
    }

    /// A batch that finishes while the loop waits on a quiet queue commits
    /// then, not when the next message happens to arrive.
    #[tokio::test]
    async fn a_finished_batch_commits_while_the_queue_is_quiet() {
        let run = start(batched(2), Duration::from_millis(50));
        send_jobs(&run, 3);
        let done = wait_completed(&run, 3).await;
        assert_eq!(done.len(), 3);
        // The queue is still open: the loop is waiting for more.
        assert!(!run.task.is_finished());
        run.shutdown.cancel();
        run.task.await.expect("loop ends");
    }

    /// Shutdown lets every batch in hand finish and complete.
    #[tokio::test]
    async fn shutdown_completes_the_batches_in_hand() {
        let run = start(batched(2), Duration::from_millis(300));
        send_jobs(&run, 4);
        let deadline = Instant::now() + Duration::from_secs(5);
        while run.handler.running.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "two batches never ran at once");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        run.shutdown.cancel();
        run.task.await.expect("loop ends");
        let mut done = run.completed.lock().expect("lock").clone();
        done.sort();
        assert_eq!(done, vec![0, 1, 2, 3]);
    }
}
