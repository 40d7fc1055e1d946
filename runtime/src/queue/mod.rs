//! The job queue: Kafka in clusters, an in-process channel in standalone mode.
//! Both are at-least-once; the job state machine makes redelivery harmless.

pub mod kafka;
pub mod memory;

use crate::domain::message::JobMessage;
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("publishing to {topic}: {reason}")]
    Publish { topic: String, reason: String },
    #[error("consuming: {0}")]
    Consume(String),
    #[error("committing: {0}")]
    Commit(String),
    #[error("queue unreachable: {0}")]
    Unreachable(String),
    #[error("queue closed")]
    Closed,
}

/// Sends job messages; `publish` returns once the queue has durably accepted it.
#[async_trait]
pub trait JobPublisher: Send + Sync {
    async fn publish(&self, message: &JobMessage) -> Result<(), QueueError>;
    /// For readiness probes.
    async fn check(&self) -> Result<(), QueueError>;
}

/// A received message and the means to acknowledge it. Dropping a delivery
/// without acknowledging leaves it to be redelivered.
pub struct Delivery {
    /// `Err` when the payload is not a job message; it is acknowledged and skipped.
    pub message: Result<JobMessage, String>,
    pub ack: Box<dyn Acknowledge>,
}

#[async_trait]
pub trait Acknowledge: Send {
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
}

#[async_trait]
pub trait JobConsumer: Send {
    /// The next delivery, or `None` once the queue is closed.
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>>;
}
