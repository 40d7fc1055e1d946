//! `ocr-runtime dlq replay`: sends what the dead-letter topic holds back into
//! the pipeline once its cause is fixed (a missing input restored, a webhook
//! receiver back up).
//!
//! - A job message (a job `DeadLettered` after `worker.max_attempts`): the
//!   job is reset to `Queued` with its attempts at zero and republished. A
//!   job that is no longer `DeadLettered` (replayed already, or finished some
//!   other way) is skipped.
//! - A result event (a notification that never arrived): republished to the
//!   results topic; the writer finds the job final and announces it again.
//!
//! The replay reads as its own consumer group and commits what it replayed,
//! so running it twice does not replay a message twice.

use crate::domain::message::{JobMessage, ResultEvent};
use crate::queue::{JobPublisher, MessageConsumer, MessageSink, QueueError, HEADER_JOB_ID};
use crate::storage::{now_ms, JobStore, StoreError};
use std::time::Duration;

/// How long to wait for the next of the messages the replay counted.
const NEXT_MESSAGE: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Replayed {
    pub jobs: usize,
    pub notifications: usize,
    /// Jobs no longer dead-lettered, and messages that are neither kind.
    pub skipped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("the dead-letter topic: {0}")]
    Queue(#[from] QueueError),
    #[error("the job store: {0}")]
    Store(#[from] StoreError),
    #[error("{0} dead-lettered messages were counted but did not arrive within {NEXT_MESSAGE:?}")]
    Missing(u64),
}

pub struct Replay<'a> {
    pub dead_letters: &'a mut dyn MessageConsumer,
    pub store: &'a JobStore,
    pub jobs: &'a dyn JobPublisher,
    pub results: &'a dyn MessageSink,
}

impl Replay<'_> {
    /// Replays the next `pending` messages (the group's lag on the topic).
    pub async fn run(self, pending: u64) -> Result<Replayed, ReplayError> {
        let mut replayed = Replayed::default();
        for left in (1..=pending).rev() {
            let delivery = match tokio::time::timeout(NEXT_MESSAGE, self.dead_letters.next()).await
            {
                Ok(Some(delivery)) => delivery?,
                Ok(None) | Err(_) => return Err(ReplayError::Missing(left)),
            };
            if let Ok(event) = ResultEvent::decode(&delivery.payload) {
                let id = event.job_id.to_string();
                self.results
                    .send(&id, &delivery.payload, &[(HEADER_JOB_ID, id.as_str())])
                    .await?;
                replayed.notifications += 1;
            } else if let Ok(message) = JobMessage::decode(&delivery.payload) {
                if self
                    .store
                    .revive_dead_lettered(message.job_id, now_ms())
                    .await?
                {
                    self.jobs.publish(&message).await?;
                    tracing::info!(job = %message.job_id, "replayed a dead-lettered job");
                    replayed.jobs += 1;
                } else {
                    replayed.skipped += 1;
                }
            } else {
                tracing::warn!(
                    partition = delivery.receipt.partition,
                    offset = delivery.receipt.offset,
                    "a dead-letter message that is neither a job nor a result; skipped"
                );
                replayed.skipped += 1;
            }
            self.dead_letters.complete(&[delivery.receipt]).await?;
        }
        Ok(replayed)
    }
}
