//! [`RdKafkaAdmin`]: topics and the writer group's lag over librdkafka.
//!
//! Every call opens a short-lived client for the pipeline's bootstrap servers
//! and closes it again, all on a blocking thread: librdkafka's metadata,
//! offset and watermark calls block, and a long-lived client nobody polls
//! piles up its log and error events. Reconciles are seconds apart, so the
//! extra connection per call is cheap.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication, TopicResult};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as RdError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{
    BoxFuture, Cluster, KafkaAdmin, KafkaError, PartitionShortfall, TopicSpec, TopicsReport,
};

/// Creates missing topics (CreateTopics) and measures the writer group's lag
/// (OffsetFetch and ListOffsets, without joining the group).
#[derive(Clone, Copy, Debug)]
pub struct RdKafkaAdmin {
    timeout: Duration,
}

impl Default for RdKafkaAdmin {
    fn default() -> Self {
        RdKafkaAdmin::new(RdKafkaAdmin::DEFAULT_TIMEOUT)
    }
}

impl RdKafkaAdmin {
    /// Per broker request; an unreachable cluster fails a call after about this long.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    pub fn new(timeout: Duration) -> RdKafkaAdmin {
        RdKafkaAdmin { timeout }
    }
}

impl KafkaAdmin for RdKafkaAdmin {
    fn ensure_topics<'a>(
        &'a self,
        cluster: &'a Cluster,
        topics: &'a [TopicSpec],
    ) -> BoxFuture<'a, Result<TopicsReport, KafkaError>> {
        let cluster = cluster.clone();
        let topics = topics.to_vec();
        let timeout = self.timeout;
        Box::pin(async move {
            tokio::task::spawn_blocking(move || ensure_topics(&cluster, &topics, timeout))
                .await
                .map_err(|e| KafkaError::Admin(format!("the topic check did not finish: {e}")))?
        })
    }

    fn results_lag<'a>(
        &'a self,
        cluster: &'a Cluster,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<u64, KafkaError>> {
        self.consumer_lag(cluster, topic, &cluster.writer_group)
    }

    fn consumer_lag<'a>(
        &'a self,
        cluster: &'a Cluster,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<u64, KafkaError>> {
        let owned_cluster = cluster.clone();
        let owned_topic = topic.to_string();
        let owned_group = group.to_string();
        let timeout = self.timeout;
        Box::pin(async move {
            let lag = tokio::task::spawn_blocking(move || {
                group_lag(&owned_cluster, &owned_group, &owned_topic, timeout)
            })
            .await
            .unwrap_or_else(|e| Err(format!("the lag measurement did not finish: {e}")));
            lag.map_err(|reason| KafkaError::LagUnavailable {
                topic: topic.to_string(),
                reason,
            })
        })
    }

    fn delete_topics<'a>(
        &'a self,
        cluster: &'a Cluster,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), KafkaError>> {
        let cluster = cluster.clone();
        let topics = topics.to_vec();
        let timeout = self.timeout;
        Box::pin(async move {
            tokio::task::spawn_blocking(move || delete_topics(&cluster, &topics, timeout))
                .await
                .map_err(|e| KafkaError::Admin(format!("the topic deletion did not finish: {e}")))?
        })
    }
}

fn client_config(cluster: &Cluster) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &cluster.bootstrap_servers)
        .set("client.id", "ocr-operator")
        // A metadata lookup must never create a topic with the broker's defaults.
        .set("allow.auto.create.topics", "false");
    for (key, value) in cluster.security.client_settings() {
        config.set(key, value);
    }
    config
}

/// `Some(partitions)` for an existing topic, `None` for a missing one.
fn partition_count<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<i32>, String> {
    let metadata = match client.fetch_metadata(Some(topic), timeout) {
        Ok(metadata) => metadata,
        Err(RdError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition)) => return Ok(None),
        Err(e) => return Err(format!("metadata of topic {topic}: {e}")),
    };
    let entry = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| format!("the metadata response lacks topic {topic}"))?;
    match entry.error().map(RDKafkaErrorCode::from) {
        None => Ok(Some(
            i32::try_from(entry.partitions().len()).unwrap_or(i32::MAX),
        )),
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(None),
        Some(code) => Err(format!("metadata of topic {topic}: {code}")),
    }
}

fn admin_client(cluster: &Cluster) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    client_config(cluster).create().map_err(|e| {
        KafkaError::Admin(format!(
            "creating a client for {}: {e}",
            cluster.bootstrap_servers
        ))
    })
}

fn ensure_topics(
    cluster: &Cluster,
    topics: &[TopicSpec],
    timeout: Duration,
) -> Result<TopicsReport, KafkaError> {
    let admin = admin_client(cluster)?;
    let mut report = TopicsReport::default();
    let mut missing = Vec::new();
    for topic in topics {
        match partition_count(admin.inner(), &topic.name, timeout).map_err(KafkaError::Admin)? {
            Some(partitions) if partitions < topic.partitions => {
                report.shortfalls.push(PartitionShortfall {
                    topic: topic.name.clone(),
                    partitions,
                    required: topic.partitions,
                })
            }
            Some(_) => {}
            None => missing.push(topic),
        }
    }
    if missing.is_empty() {
        return Ok(report);
    }
    let new_topics: Vec<NewTopic> = missing
        .iter()
        .map(|t| {
            NewTopic::new(
                &t.name,
                t.partitions,
                TopicReplication::Fixed(t.replication_factor),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout * 2));
    let names = missing
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let results = futures::executor::block_on(admin.create_topics(&new_topics, &options))
        .map_err(|e| KafkaError::Admin(format!("creating topics {names}: {e}")))?;
    let (created, failures) = creation_outcome(results);
    if !failures.is_empty() {
        return Err(KafkaError::Admin(format!(
            "creating topics: {}",
            failures.join(", ")
        )));
    }
    report.created = created;
    Ok(report)
}

fn delete_topics(
    cluster: &Cluster,
    topics: &[String],
    timeout: Duration,
) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin = admin_client(cluster)?;
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout * 2));
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let results = futures::executor::block_on(admin.delete_topics(&names, &options))
        .map_err(|e| KafkaError::Admin(format!("deleting topics {}: {e}", names.join(", "))))?;
    let failures = deletion_failures(results);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(KafkaError::Admin(format!(
            "deleting topics: {}",
            failures.join(", ")
        )))
    }
}

/// A topic that is already gone counts as deleted.
fn deletion_failures(results: Vec<TopicResult>) -> Vec<String> {
    results
        .into_iter()
        .filter_map(|result| match result {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => None,
            Err((name, code)) => Some(format!("{name}: {code}")),
        })
        .collect()
}

/// Created topics and failures; a topic that exists already (created by
/// someone else since the metadata lookup) is neither.
fn creation_outcome(results: Vec<TopicResult>) -> (Vec<String>, Vec<String>) {
    let mut created = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => failures.push(format!("{name}: {code}")),
        }
    }
    (created, failures)
}

/// Messages of one partition the group has not committed: from its committed
/// offset, or from the oldest retained message when it never committed, to the
/// end.
fn partition_lag(committed: Option<i64>, low: i64, high: i64) -> u64 {
    let from = committed.unwrap_or(low).max(low);
    u64::try_from(high - from).unwrap_or(0)
}

/// The lag of `cluster.writer_group` on `topic`, over every partition. Reads
/// committed offsets without joining the group.
fn group_lag(
    cluster: &Cluster,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<u64, String> {
    let consumer: BaseConsumer = client_config(cluster)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| format!("creating a client for {}: {e}", cluster.bootstrap_servers))?;
    let partitions = match partition_count(consumer.client(), topic, timeout)? {
        Some(n) if n > 0 => n,
        _ => return Err(format!("topic {topic} does not exist")),
    };
    let mut wanted = TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, timeout)
        .map_err(|e| format!("committed offsets of group {group}: {e}"))?;
    let mut total = 0u64;
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|e| format!("watermarks of {topic}/{partition}: {e}"))?;
        let entry = committed.find_partition(topic, partition);
        if let Some(error) = entry.as_ref().and_then(|e| e.error().err()) {
            return Err(format!(
                "committed offset of group {group} on {topic}/{partition}: {error}"
            ));
        }
        let committed = entry.and_then(|e| match e.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        });
        total = total.saturating_add(partition_lag(committed, low, high));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ocr_contract::{KafkaSecurityConfig, SaslMechanism, Secret, SecurityProtocol};

    #[test]
    fn an_uncommitted_partition_counts_its_retained_range() {
        assert_eq!(partition_lag(None, 0, 7), 7);
        assert_eq!(partition_lag(None, 5, 7), 2);
        assert_eq!(partition_lag(Some(3), 0, 7), 4);
        assert_eq!(partition_lag(Some(7), 0, 7), 0);
        // A commit below the retained range (deleted by retention) counts from the oldest message.
        assert_eq!(partition_lag(Some(1), 5, 7), 2);
        assert_eq!(partition_lag(Some(9), 0, 7), 0);
    }

    #[test]
    fn a_topic_created_meanwhile_is_fine_and_other_failures_are_not() {
        let (created, failures) = creation_outcome(vec![
            Ok("ocr.jobs".into()),
            Err(("ocr.results".into(), RDKafkaErrorCode::TopicAlreadyExists)),
            Err((
                "ocr.dead-letter".into(),
                RDKafkaErrorCode::InvalidReplicationFactor,
            )),
        ]);
        assert_eq!(created, ["ocr.jobs"]);
        assert_eq!(failures.len(), 1);
        assert!(failures[0].starts_with("ocr.dead-letter: "), "{failures:?}");
    }

    #[test]
    fn a_topic_gone_already_counts_as_deleted() {
        let failures = deletion_failures(vec![
            Ok("a.jobs".into()),
            Err((
                "a.results".into(),
                RDKafkaErrorCode::UnknownTopicOrPartition,
            )),
            Err((
                "a.dead-letter".into(),
                RDKafkaErrorCode::TopicAuthorizationFailed,
            )),
        ]);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].starts_with("a.dead-letter: "), "{failures:?}");
    }

    #[test]
    fn the_operators_clients_use_the_pipelines_credentials() {
        let cluster = Cluster {
            bootstrap_servers: "kafka:9093".into(),
            writer_group: "ocr-writer".into(),
            security: KafkaSecurityConfig {
                protocol: SecurityProtocol::SaslSsl,
                sasl_mechanism: SaslMechanism::ScramSha512,
                sasl_username: "ocr".into(),
                sasl_password: Secret::new("s3cret"),
                ssl_ca_pem: Secret::new("-----BEGIN CERTIFICATE-----"),
                ssl_ca_location: String::new(),
            },
        };
        let config = client_config(&cluster);
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("ocr"));
        assert_eq!(config.get("sasl.password"), Some("s3cret"));
        assert_eq!(
            config.get("ssl.ca.pem"),
            Some("-----BEGIN CERTIFICATE-----")
        );
        assert!(!format!("{cluster:?}").contains("s3cret"));

        let plain = client_config(&Cluster {
            security: KafkaSecurityConfig::default(),
            ..cluster
        });
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.username"), None);
    }
}
