//! The operator's view of Kafka: topic provisioning and the results lag that
//! gates deleting a writer. Behind a trait so reconcile tests can script it and
//! the real AdminClient adapter can be added without touching the controller.

use std::future::Future;
use std::pin::Pin;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("the results lag of topic {topic} cannot be measured: {reason}")]
    LagUnavailable { topic: String, reason: String },
    #[error("kafka admin: {0}")]
    Admin(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait KafkaAdmin: Send + Sync {
    /// Makes sure every topic exists; Ok means producers may publish to all of them.
    fn ensure_topics<'a>(
        &'a self,
        topics: &'a [TopicSpec],
    ) -> BoxFuture<'a, Result<(), KafkaError>>;

    /// Messages on `topic` not yet committed by the writer's consumer group.
    fn results_lag<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u64, KafkaError>>;
}

/// For clusters whose topics are provisioned outside the operator (Strimzi
/// `KafkaTopic`s, Terraform, broker auto-creation): the desired topics are
/// listed in `status.topics` for whoever provisions them, and the operator
/// trusts that they exist.
///
/// It cannot measure lag, so a writer → standard/batched migration stops in
/// `DrainingResults` (the writer is never deleted on a guess) until an adapter
/// that reads consumer-group offsets is configured.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExternallyProvisioned;

impl KafkaAdmin for ExternallyProvisioned {
    fn ensure_topics<'a>(
        &'a self,
        _topics: &'a [TopicSpec],
    ) -> BoxFuture<'a, Result<(), KafkaError>> {
        Box::pin(async { Ok(()) })
    }

    fn results_lag<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, Result<u64, KafkaError>> {
        Box::pin(async move {
            Err(KafkaError::LagUnavailable {
                topic: topic.to_string(),
                reason: "topics are provisioned externally and no Kafka admin client is configured"
                    .into(),
            })
        })
    }
}
