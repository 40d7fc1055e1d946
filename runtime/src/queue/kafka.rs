//! Kafka adapter. The producer is idempotent with `acks=all`, keyed by job id
//! so one job's messages stay in one partition. The consumer commits by hand,
//! and only after the job's database transition, so a crash replays the
//! message instead of losing it.

use super::{Acknowledge, Delivery, JobConsumer, JobPublisher, QueueError};
use crate::domain::message::JobMessage;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;

const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const METADATA_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
    topic: String,
}

impl KafkaPublisher {
    pub fn new(brokers: &str, topic: &str) -> Result<Self, QueueError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .set("linger.ms", "2")
            .create()
            .map_err(|e| {
                QueueError::Unreachable(format!("creating producer for {brokers}: {e}"))
            })?;
        Ok(KafkaPublisher {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Sends raw bytes under `key`; used for job, result and dead-letter messages.
    pub async fn send(
        &self,
        key: &str,
        payload: &[u8],
        headers: Option<rdkafka::message::OwnedHeaders>,
    ) -> Result<(), QueueError> {
        let mut record = FutureRecord::to(&self.topic).key(key).payload(payload);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        self.producer
            .send(record, SEND_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(err, _)| QueueError::Publish {
                topic: self.topic.clone(),
                reason: err.to_string(),
            })
    }

    /// Waits for queued messages before shutdown.
    pub fn flush(&self) {
        let _ = self.producer.flush(Duration::from_secs(5));
    }
}

#[async_trait]
impl JobPublisher for KafkaPublisher {
    async fn publish(&self, message: &JobMessage) -> Result<(), QueueError> {
        self.send(&message.job_id.to_string(), &message.encode(), None)
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

pub struct KafkaConsumer {
    consumer: Arc<StreamConsumer>,
}

impl KafkaConsumer {
    pub fn new(brokers: &str, group: &str, topic: &str) -> Result<Self, QueueError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // A slow OCR job must not get the worker thrown out of its group.
            .set("max.poll.interval.ms", "600000")
            .create()
            .map_err(|e| {
                QueueError::Unreachable(format!("creating consumer for {brokers}: {e}"))
            })?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| QueueError::Consume(format!("subscribing to {topic}: {e}")))?;
        Ok(KafkaConsumer {
            consumer: Arc::new(consumer),
        })
    }

    pub fn client(&self) -> Arc<StreamConsumer> {
        self.consumer.clone()
    }
}

struct KafkaAck {
    consumer: Arc<StreamConsumer>,
    topic: String,
    partition: i32,
    offset: i64,
}

#[async_trait]
impl Acknowledge for KafkaAck {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset(&self.topic, self.partition, Offset::Offset(self.offset + 1))
            .map_err(|e| QueueError::Commit(e.to_string()))?;
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
                tracing::info!(
                    partition = self.partition,
                    offset = self.offset,
                    "commit skipped during rebalance"
                );
                Ok(())
            }
            Err(err) => Err(QueueError::Commit(err.to_string())),
        }
    }
}

#[async_trait]
impl JobConsumer for KafkaConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let message = match self.consumer.recv().await {
            Ok(message) => message,
            Err(err) => return Some(Err(QueueError::Consume(err.to_string()))),
        };
        let decoded = match message.payload() {
            Some(payload) => JobMessage::decode(payload).map_err(|e| e.to_string()),
            None => Err("empty payload".to_owned()),
        };
        Some(Ok(Delivery {
            message: decoded,
            ack: Box::new(KafkaAck {
                consumer: self.consumer.clone(),
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
            }),
        }))
    }
}
