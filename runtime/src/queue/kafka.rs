//! Kafka adapter. The producer is idempotent with `acks=all`, keyed by job id
//! so one job's messages stay in one partition. The consumer commits by hand,
//! only after the application completed a message, and per partition only up
//! to the highest contiguous completed offset, so a crash replays messages
//! instead of losing them.

use super::offsets::CommitTracker;
use super::{
    Delivery, JobPublisher, MessageConsumer, MessageSink, QueueError, Receipt, HEADER_JOB_ID,
    HEADER_TRACEPARENT,
};
use crate::config::{KafkaSecurityConfig, QueueConfig};
use crate::domain::message::{traceparent, JobMessage};
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const METADATA_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the brokers are and how to authenticate to them. Every client this
/// adapter creates starts from [`KafkaConnection::client_config`], so the API,
/// the workers, the writers and the lag probes all connect the same way.
#[derive(Clone, Debug)]
pub struct KafkaConnection {
    brokers: String,
    security: KafkaSecurityConfig,
}

impl KafkaConnection {
    /// No TLS, no authentication (local brokers, tests).
    pub fn plaintext(brokers: &str) -> Self {
        KafkaConnection {
            brokers: brokers.to_owned(),
            security: KafkaSecurityConfig::default(),
        }
    }

    /// Checks that the settings belong together, so a half-configured
    /// secret fails at start-up instead of as an endless reconnect loop.
    pub fn new(brokers: &str, security: &KafkaSecurityConfig) -> Result<Self, QueueError> {
        security
            .validate()
            .map_err(|e| QueueError::Config(e.to_string()))?;
        Ok(KafkaConnection {
            brokers: brokers.to_owned(),
            security: security.clone(),
        })
    }

    pub fn from_config(queue: &QueueConfig) -> Result<Self, QueueError> {
        Self::new(&queue.brokers, &queue.security)
    }

    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// The client settings every producer and consumer shares.
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in self.security.client_settings() {
            config.set(key, value);
        }
        config
    }
}

#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
    topic: String,
}

impl KafkaPublisher {
    pub fn new(connection: &KafkaConnection, topic: &str) -> Result<Self, QueueError> {
        let brokers = connection.brokers();
        let producer: FutureProducer = connection
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // No request waits for delivery (the API answers after
            // `queue.publish_wait_ms`), so librdkafka may keep retrying
            // through a long broker outage instead of failing the publish to
            // the sweeper; it also spares the idempotent producer the epoch
            // bump that expired messages force.
            .set("message.timeout.ms", "120000")
            // Batching for up to 5 ms (librdkafka's own default) delays a
            // job or a result by at most that before it is consumed, next to
            // inference times of tens of ms and more, and saves the broker
            // and this process a request per handful of messages: 2 -> 5 ms
            // took the accept bench on Tansu from 7.5k to 8.1k jobs/s.
            .set("linger.ms", "5")
            .create()
            .map_err(|e| {
                QueueError::Unreachable(format!("creating producer for {brokers}: {e}"))
            })?;
        Ok(KafkaPublisher {
            producer,
            topic: topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Waits for queued messages before shutdown.
    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

#[async_trait]
impl MessageSink for KafkaPublisher {
    async fn send(
        &self,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), QueueError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let record = FutureRecord::to(&self.topic)
            .key(key)
            .payload(payload)
            .headers(owned);
        self.producer
            .send(record, SEND_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(err, _)| QueueError::Publish {
                topic: self.topic.clone(),
                reason: err.to_string(),
            })
    }
}

#[async_trait]
impl JobPublisher for KafkaPublisher {
    async fn publish(&self, message: &JobMessage) -> Result<(), QueueError> {
        let id = message.job_id.to_string();
        let trace = crate::telemetry::current_traceparent()
            .unwrap_or_else(|| traceparent(message.job_id, rand_span()));
        self.send(
            &id,
            &message.encode(),
            &[(HEADER_JOB_ID, &id), (HEADER_TRACEPARENT, &trace)],
        )
        .await
    }

    async fn check(&self) -> Result<(), QueueError> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map(|_| ())
                .map_err(|e| QueueError::Unreachable(e.to_string()))
        })
        .await
        .map_err(|e| QueueError::Unreachable(e.to_string()))?
    }
}

/// A span id for a new hop; uniqueness is all that matters.
pub fn rand_span() -> u64 {
    let id = uuid::Uuid::now_v7();
    let bytes = id.as_bytes();
    u64::from_le_bytes([
        bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14], bytes[15],
    ])
}

/// Forgets in-flight offsets of revoked partitions, so completions that
/// arrive after a rebalance do not commit for the partition's new owner.
struct TrackingContext {
    tracker: Arc<Mutex<CommitTracker>>,
}

impl ClientContext for TrackingContext {}

impl ConsumerContext for TrackingContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            if let Ok(mut tracker) = self.tracker.lock() {
                for element in partitions.elements() {
                    tracker.revoked(element.partition());
                }
            }
            tracing::info!(
                partitions = partitions.count(),
                "partitions revoked; their in-flight messages will be redelivered"
            );
        }
    }
}

/// The consumer, closed off the async runtime when the last handle goes.
/// librdkafka's close (leave the group, hand partitions back) runs in the
/// drop and can block on a rebalance that never completes: seen as a worker
/// that never exited after SIGTERM, its loop stuck in `rd_kafka_assign`
/// under the drop. Closed on a thread of its own, it can take its time; the
/// process exits when its work is done, and the group reassigns the
/// partitions after `session.timeout.ms` at worst.
struct ClosedApart(Option<StreamConsumer<TrackingContext>>);

impl std::ops::Deref for ClosedApart {
    type Target = StreamConsumer<TrackingContext>;

    fn deref(&self) -> &Self::Target {
        // Only `drop` takes it out.
        self.0
            .as_ref()
            .expect("the consumer is there until dropped")
    }
}

impl Drop for ClosedApart {
    fn drop(&mut self) {
        let Some(consumer) = self.0.take() else {
            return;
        };
        let closing = std::thread::Builder::new()
            .name("kafka-close".into())
            .spawn(move || drop(consumer));
        if let Err(err) = closing {
            tracing::warn!(error = %err, "no thread to close the Kafka consumer on; leaving it open");
        }
    }
}

pub struct KafkaConsumer {
    consumer: Arc<ClosedApart>,
    tracker: Arc<Mutex<CommitTracker>>,
    topic: String,
}

impl KafkaConsumer {
    pub fn new(connection: &KafkaConnection, group: &str, topic: &str) -> Result<Self, QueueError> {
        let brokers = connection.brokers();
        let tracker = Arc::new(Mutex::new(CommitTracker::default()));
        let consumer: StreamConsumer<TrackingContext> = connection
            .client_config()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // A slow OCR batch must not get the worker thrown out of its group.
            .set("max.poll.interval.ms", "600000")
            .create_with_context(TrackingContext {
                tracker: tracker.clone(),
            })
            .map_err(|e| {
                QueueError::Unreachable(format!("creating consumer for {brokers}: {e}"))
            })?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| QueueError::Consume(format!("subscribing to {topic}: {e}")))?;
        Ok(KafkaConsumer {
            consumer: Arc::new(ClosedApart(Some(consumer))),
            tracker,
            topic: topic.to_owned(),
        })
    }

    /// For readiness probes: the brokers answer for this consumer's topic.
    pub fn checker(&self) -> KafkaCheck {
        KafkaCheck {
            consumer: self.consumer.clone(),
            topic: self.topic.clone(),
        }
    }

    async fn commit(&self, offsets: TopicPartitionList) -> Result<(), QueueError> {
        let consumer = self.consumer.clone();
        let committed =
            tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
                .await
                .map_err(|e| QueueError::Commit(e.to_string()))?;
        match committed {
            Ok(()) => Ok(()),
            // The partition moved to another member mid-commit; it will
            // redeliver from the last commit, which the state machine absorbs.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress))
            | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::IllegalGeneration)) => {
                tracing::info!("commit skipped during rebalance");
                Ok(())
            }
            Err(err) => Err(QueueError::Commit(err.to_string())),
        }
    }
}

#[derive(Clone)]
pub struct KafkaCheck {
    consumer: Arc<ClosedApart>,
    topic: String,
}

impl KafkaCheck {
    pub async fn check(&self) -> Result<(), QueueError> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            consumer
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)
                .map(|_| ())
                .map_err(|e| QueueError::Unreachable(e.to_string()))
        })
        .await
        .map_err(|e| QueueError::Unreachable(e.to_string()))?
    }
}

#[async_trait]
impl MessageConsumer for KafkaConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let message = match self.consumer.recv().await {
            Ok(message) => message,
            Err(err) => return Some(Err(QueueError::Consume(err.to_string()))),
        };
        let receipt = Receipt {
            partition: message.partition(),
            offset: message.offset(),
        };
        if let Ok(mut tracker) = self.tracker.lock() {
            tracker.received(receipt.partition, receipt.offset);
        }
        let traceparent = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == HEADER_TRACEPARENT)
                .and_then(|h| h.value)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned)
        });
        Some(Ok(Delivery {
            payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            traceparent,
            receipt,
        }))
    }

    async fn complete(&mut self, done: &[Receipt]) -> Result<(), QueueError> {
        let mut offsets = TopicPartitionList::new();
        {
            let mut tracker = self
                .tracker
                .lock()
                .map_err(|_| QueueError::Commit("offset tracker poisoned".into()))?;
            let mut highest = std::collections::BTreeMap::new();
            for receipt in done {
                if let Some(next) = tracker.completed(receipt.partition, receipt.offset) {
                    highest.insert(receipt.partition, next);
                }
            }
            for (partition, next) in highest {
                offsets
                    .add_partition_offset(&self.topic, partition, Offset::Offset(next))
                    .map_err(|e| QueueError::Commit(e.to_string()))?;
            }
        }
        if offsets.count() == 0 {
            return Ok(());
        }
        self.commit(offsets).await
    }
}

/// How far a consumer group is behind on one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLag {
    pub partition: i32,
    /// The group's committed offset; `None` when it never committed.
    pub committed: Option<i64>,
    pub low_watermark: i64,
    pub high_watermark: i64,
    pub lag: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupLag {
    pub topic: String,
    pub group: String,
    pub partitions: Vec<PartitionLag>,
    pub total: i64,
}

/// The lag of `group` on `topic`: for each partition, the messages between
/// the group's committed offset (or the oldest retained message) and the end.
/// Blocking; reads offsets without joining the group.
pub fn consumer_group_lag(
    connection: &KafkaConnection,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<GroupLag, QueueError> {
    let brokers = connection.brokers();
    let consumer: BaseConsumer = connection
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| QueueError::Unreachable(format!("creating a client for {brokers}: {e}")))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| QueueError::Unreachable(format!("metadata of {topic}: {e}")))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(QueueError::Unreachable(format!(
            "topic {topic} does not exist"
        )));
    }
    let mut wanted = TopicPartitionList::new();
    for partition in &partitions {
        wanted.add_partition(topic, *partition);
    }
    let committed = consumer
        .committed_offsets(wanted, timeout)
        .map_err(|e| QueueError::Unreachable(format!("committed offsets of {group}: {e}")))?;
    let mut lags = Vec::with_capacity(partitions.len());
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|e| {
                QueueError::Unreachable(format!("watermarks of {topic}/{partition}: {e}"))
            })?;
        let committed = committed
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let from = committed.unwrap_or(low).max(low);
        lags.push(PartitionLag {
            partition,
            committed,
            low_watermark: low,
            high_watermark: high,
            lag: (high - from).max(0),
        });
    }
    Ok(GroupLag {
        topic: topic.to_owned(),
        group: group.to_owned(),
        total: lags.iter().map(|l| l.lag).sum(),
        partitions: lags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{SaslMechanism, Secret, SecurityProtocol};

    const TEST_CA: &str = include_str!("../../tests/data/test-kafka-ca.pem");

    fn sasl_ssl() -> KafkaSecurityConfig {
        KafkaSecurityConfig {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: SaslMechanism::ScramSha512,
            sasl_username: "ocr".into(),
            sasl_password: Secret::new("s3cret"),
            ssl_ca_pem: Secret::new(TEST_CA),
            ssl_ca_location: String::new(),
        }
    }

    #[test]
    fn every_client_gets_the_security_settings() {
        let connection = KafkaConnection::new("kafka:9093", &sasl_ssl()).unwrap();
        let config = connection.client_config();
        assert_eq!(config.get("bootstrap.servers"), Some("kafka:9093"));
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("ocr"));
        assert_eq!(config.get("sasl.password"), Some("s3cret"));
        assert_eq!(config.get("ssl.ca.pem"), Some(TEST_CA));

        let plain = KafkaConnection::plaintext("localhost:9092").client_config();
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.mechanism"), None);
        assert_eq!(plain.get("ssl.ca.pem"), None);
    }

    #[test]
    fn half_configured_security_is_refused_at_start() {
        let mut no_password = sasl_ssl();
        no_password.sasl_password = Secret::default();
        let mut credentials_without_sasl = sasl_ssl();
        credentials_without_sasl.protocol = SecurityProtocol::Ssl;
        let mut ca_without_tls = sasl_ssl();
        ca_without_tls.protocol = SecurityProtocol::SaslPlaintext;
        let mut two_cas = sasl_ssl();
        two_cas.ssl_ca_location = "/etc/ca.pem".into();
        for (security, expected) in [
            (no_password, "need sasl_username and sasl_password"),
            (credentials_without_sasl, "does not use SASL"),
            (ca_without_tls, "does not use TLS"),
            (two_cas, "not both"),
        ] {
            let err = KafkaConnection::new("kafka:9093", &security).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    /// librdkafka refuses `ssl` and SCRAM at client creation when it was
    /// built without OpenSSL; this keeps the build able to reach real clusters.
    #[tokio::test]
    async fn tls_and_scram_clients_can_be_created() {
        for protocol in [SecurityProtocol::SaslSsl, SecurityProtocol::Ssl] {
            let mut security = sasl_ssl();
            security.protocol = protocol;
            if protocol == SecurityProtocol::Ssl {
                security.sasl_username.clear();
                security.sasl_password = Secret::default();
            }
            let connection = KafkaConnection::new("127.0.0.1:1", &security).unwrap();
            KafkaPublisher::new(&connection, "ocr.jobs").unwrap_or_else(|e| panic!("{e}"));
            KafkaConsumer::new(&connection, "ocr-worker", "ocr.jobs")
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn a_broken_ca_fails_at_start_not_at_first_send() {
        let mut security = sasl_ssl();
        security.ssl_ca_pem = Secret::new("-----BEGIN CERTIFICATE-----\nnot a cert\n");
        let connection = KafkaConnection::new("127.0.0.1:1", &security).unwrap();
        let err = KafkaPublisher::new(&connection, "ocr.jobs")
            .err()
            .expect("a producer with an unreadable CA");
        assert!(err.to_string().to_lowercase().contains("ssl"), "{err}");
    }
}
