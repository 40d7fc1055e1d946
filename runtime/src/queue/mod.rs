//! The queues: Kafka in clusters, an in-process channel in standalone mode.
//! Both are at-least-once; the job state machine makes redelivery harmless.

pub mod kafka;
pub mod memory;
pub mod offsets;

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
    #[error("queue configuration: {0}")]
    Config(String),
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

/// Sends raw keyed messages with headers (results, dead letters); returns
/// once the broker acknowledged the message.
#[async_trait]
pub trait MessageSink: Send + Sync {
    async fn send(
        &self,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), QueueError>;
}

/// Where a delivered message sits in its topic; handed back on completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    pub partition: i32,
    pub offset: i64,
}

/// A received message. Until it is completed it will be redelivered after a
/// restart or a rebalance.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub payload: Vec<u8>,
    /// The W3C trace context the producer attached, if any.
    pub traceparent: Option<String>,
    pub receipt: Receipt,
}

#[async_trait]
pub trait MessageConsumer: Send + Sync {
    /// The next delivery, or `None` once the queue is closed.
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>>;
    /// Marks deliveries done; the consumer commits, per partition, up to the
    /// highest offset below which everything is done.
    async fn complete(&mut self, done: &[Receipt]) -> Result<(), QueueError>;
}

/// Headers every message about a job carries.
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_JOB_ID: &str = "ocr-job-id";
pub const HEADER_ATTEMPT: &str = "ocr-attempt";
/// On the dead-letter topic: `job` (inference gave up) or `result` (the
/// writer gave up), and why.
pub const HEADER_DEAD_LETTER_KIND: &str = "ocr-dead-letter-kind";
pub const HEADER_ERROR: &str = "ocr-error";
