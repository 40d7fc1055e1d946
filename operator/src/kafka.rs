//! The operator's view of Kafka: topic provisioning and the results lag that
//! gates deleting a writer. Behind a trait so reconcile tests can script it.
//!
//! Two adapters: [`RdKafkaAdmin`] (librdkafka; creates missing topics and
//! measures the writer group's lag) and [`ExternallyProvisioned`] (trusts that
//! the topics exist and cannot measure lag). `ocr-operator run --kafka-admin`
//! picks one.

use std::future::Future;
use std::pin::Pin;

use crate::crd::OcrPipeline;
use ocr_contract::KafkaSecurityConfig;

mod rdkafka_admin;

pub use rdkafka_admin::RdKafkaAdmin;

/// The Kafka cluster of one pipeline, from its `spec.kafka`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Cluster {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// The writers' consumer group on the results topic (`queue.writer_group`).
    pub writer_group: String,
    /// `spec.kafka.security` with its Secrets read: the same protocol,
    /// mechanism and credentials the pipeline's pods get.
    pub security: KafkaSecurityConfig,
}

impl Cluster {
    /// The pipeline's cluster without credentials; see [`Cluster::with_security`].
    pub fn of(pipeline: &OcrPipeline) -> Cluster {
        Cluster {
            bootstrap_servers: pipeline.spec.kafka.bootstrap_servers.clone(),
            writer_group: pipeline.queues().writer_group,
            security: KafkaSecurityConfig::default(),
        }
    }

    pub fn with_security(mut self, security: KafkaSecurityConfig) -> Cluster {
        self.security = security;
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i32,
}

/// An existing topic with fewer partitions than the spec asks for. Producers
/// can still publish to it, so it does not block anything; the operator never
/// adds partitions itself (that would move keys to other partitions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionShortfall {
    pub topic: String,
    pub partitions: i32,
    pub required: i32,
}

impl std::fmt::Display for PartitionShortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "topic {} has {} partitions, fewer than spec.kafka.partitions ({})",
            self.topic, self.partitions, self.required
        )
    }
}

/// What [`KafkaAdmin::ensure_topics`] did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicsReport {
    /// Topics this call created.
    pub created: Vec<String>,
    /// Topics that exist with fewer partitions than asked for.
    pub shortfalls: Vec<PartitionShortfall>,
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
    /// Makes sure every topic exists; Ok means producers may publish to all of
    /// them. Topics with too few partitions are reported, not an error.
    fn ensure_topics<'a>(
        &'a self,
        cluster: &'a Cluster,
        topics: &'a [TopicSpec],
    ) -> BoxFuture<'a, Result<TopicsReport, KafkaError>>;

    /// Messages on `topic` not yet committed by `cluster.writer_group`. Any
    /// doubt is an error, never 0.
    fn results_lag<'a>(
        &'a self,
        cluster: &'a Cluster,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<u64, KafkaError>>;

    /// Messages on `topic` not yet committed by `group` (the advisor's jobs
    /// lag). Clients that cannot measure lag leave the default: an error.
    fn consumer_lag<'a>(
        &'a self,
        _cluster: &'a Cluster,
        topic: &'a str,
        _group: &'a str,
    ) -> BoxFuture<'a, Result<u64, KafkaError>> {
        Box::pin(async move {
            Err(KafkaError::LagUnavailable {
                topic: topic.to_string(),
                reason: "this Kafka client cannot measure lag".into(),
            })
        })
    }

    /// Deletes the topics; one that is gone already is not an error.
    fn delete_topics<'a>(
        &'a self,
        cluster: &'a Cluster,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), KafkaError>>;
}

/// For clusters whose topics are provisioned outside the operator (Strimzi
/// `KafkaTopic`s, Terraform, broker auto-creation) and that the operator cannot
/// or should not reach: the desired topics are listed in `status.topics` for
/// whoever provisions them, and the operator trusts that they exist.
///
/// It cannot measure lag, so a writer → standard/batched migration stops in
/// `DrainingResults` (the writer is never deleted on a guess); use
/// [`RdKafkaAdmin`] for those.
#[derive(Clone, Copy, Debug, Default)]
pub struct ExternallyProvisioned;

impl KafkaAdmin for ExternallyProvisioned {
    fn ensure_topics<'a>(
        &'a self,
        _cluster: &'a Cluster,
        _topics: &'a [TopicSpec],
    ) -> BoxFuture<'a, Result<TopicsReport, KafkaError>> {
        Box::pin(async { Ok(TopicsReport::default()) })
    }

    fn results_lag<'a>(
        &'a self,
        _cluster: &'a Cluster,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<u64, KafkaError>> {
        Box::pin(async move {
            Err(KafkaError::LagUnavailable {
                topic: topic.to_string(),
                reason: "topics are provisioned externally (--kafka-admin=external) and no Kafka admin client is configured"
                    .into(),
            })
        })
    }

    /// Never asked in practice: it creates nothing, so no pipeline lists
    /// topics it created.
    fn delete_topics<'a>(
        &'a self,
        _cluster: &'a Cluster,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), KafkaError>> {
        Box::pin(async move {
            Err(KafkaError::Admin(format!(
                "cannot delete {}: topics are provisioned externally (--kafka-admin=external)",
                topics.join(", ")
            )))
        })
    }
}
