//! `RdKafkaAdmin` against librdkafka's in-process mock cluster (loopback, no
//! broker to install) for metadata, partition counts, OffsetFetch, ListOffsets
//! and commits. The mock has no CreateTopics handler (librdkafka 2.12: the
//! request times out), so topic creation runs against a real broker process
//! (Tansu, see `runtime/tests/common/real_broker.rs`).

use std::time::{Duration, Instant};

// Shared with the runtime's tests, which run jobs through the same broker.
#[path = "../../runtime/tests/common/real_broker.rs"]
mod real_broker;

use ocr_operator::kafka::{
    Cluster, KafkaAdmin, KafkaError, PartitionShortfall, RdKafkaAdmin, TopicSpec,
};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use rdkafka::{ClientConfig, TopicPartitionList};

const JOBS: &str = "ocr.jobs";
const RESULTS: &str = "ocr.results";
const DEAD: &str = "ocr.dead-letter";

type Mock = MockCluster<'static, DefaultProducerContext>;

fn admin() -> RdKafkaAdmin {
    RdKafkaAdmin::new(Duration::from_secs(5))
}

fn cluster(mock: &Mock) -> Cluster {
    Cluster {
        bootstrap_servers: mock.bootstrap_servers(),
        writer_group: "ocr-writer".into(),
        security: Default::default(),
    }
}

fn topic(name: &str, partitions: i32) -> TopicSpec {
    TopicSpec {
        name: name.into(),
        partitions,
        replication_factor: 1,
    }
}

/// `per_partition` messages on each of `partitions` partitions of `topic`.
fn produce(mock: &Mock, topic: &str, partitions: i32, per_partition: usize) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .create()
        .expect("producer");
    for partition in 0..partitions {
        for i in 0..per_partition {
            let key = format!("job-{partition}-{i}");
            producer
                .send(
                    BaseRecord::to(topic)
                        .partition(partition)
                        .key(&key)
                        .payload("{}"),
                )
                .expect("enqueued");
        }
    }
    producer.flush(Duration::from_secs(10)).expect("flushed");
}

/// Consumes `partitions` of `topic` from the start to the end as `group` and
/// commits, as a writer that persisted everything would.
fn consume_and_commit(mock: &Mock, group: &str, topic: &str, partitions: &[i32], expected: usize) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment
            .add_partition_offset(topic, *partition, rdkafka::Offset::Beginning)
            .expect("assignment");
    }
    consumer.assign(&assignment).expect("assigned");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut consumed = 0;
    while consumed < expected {
        assert!(
            Instant::now() < deadline,
            "consumed {consumed} of {expected}"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            message.expect("message");
            consumed += 1;
        }
    }
    consumer
        .commit_consumer_state(CommitMode::Sync)
        .expect("committed");
}

#[tokio::test]
async fn existing_topics_pass_and_checking_again_changes_nothing() {
    let mock = MockCluster::new(1).expect("mock cluster");
    for name in [JOBS, RESULTS, DEAD] {
        mock.create_topic(name, 6, 1).expect("topic");
    }
    let topics = [topic(JOBS, 6), topic(RESULTS, 6), topic(DEAD, 4)];
    for _ in 0..2 {
        let report = admin()
            .ensure_topics(&cluster(&mock), &topics)
            .await
            .expect("topics exist");
        assert!(report.created.is_empty(), "{report:?}");
        assert!(report.shortfalls.is_empty(), "{report:?}");
    }
}

#[tokio::test]
async fn a_topic_with_too_few_partitions_is_reported_not_fatal() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(JOBS, 6, 1).expect("topic");
    mock.create_topic(RESULTS, 2, 1).expect("topic");
    let report = admin()
        .ensure_topics(&cluster(&mock), &[topic(JOBS, 6), topic(RESULTS, 6)])
        .await
        .expect("both topics exist");
    assert_eq!(
        report.shortfalls,
        [PartitionShortfall {
            topic: RESULTS.into(),
            partitions: 2,
            required: 6,
        }]
    );
    assert_eq!(
        report.shortfalls[0].to_string(),
        "topic ocr.results has 2 partitions, fewer than spec.kafka.partitions (6)"
    );
}

/// The mock cannot create topics over the protocol (CreateTopics times out):
/// the adapter must report that as an error naming the topic, and its metadata
/// lookup must not have created the topic with the broker's defaults on the way.
#[tokio::test]
async fn a_missing_topic_that_cannot_be_created_is_an_error() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(JOBS, 3, 1).expect("topic");
    let cluster = cluster(&mock);
    let error = RdKafkaAdmin::new(Duration::from_secs(1))
        .ensure_topics(&cluster, &[topic(JOBS, 3), topic(RESULTS, 3)])
        .await
        .expect_err("the mock has no CreateTopics");
    let message = error.to_string();
    assert!(message.contains(RESULTS), "{message}");
    assert!(!message.contains(JOBS), "{message}");

    let lag = admin().results_lag(&cluster, RESULTS).await;
    assert!(
        matches!(&lag, Err(KafkaError::LagUnavailable { reason, .. }) if reason.contains("does not exist")),
        "the lookup auto-created the topic: {lag:?}"
    );
}

#[tokio::test]
async fn results_lag_follows_the_writer_groups_commits() {
    let mock = MockCluster::new(1).expect("mock cluster");
    mock.create_topic(RESULTS, 3, 1).expect("topic");
    let cluster = cluster(&mock);

    assert_eq!(
        admin().results_lag(&cluster, RESULTS).await.expect("lag"),
        0,
        "an empty topic"
    );

    produce(&mock, RESULTS, 3, 10);
    assert_eq!(
        admin().results_lag(&cluster, RESULTS).await.expect("lag"),
        30,
        "a group that never committed owes every retained message"
    );

    consume_and_commit(&mock, "ocr-writer", RESULTS, &[0], 10);
    assert_eq!(
        admin().results_lag(&cluster, RESULTS).await.expect("lag"),
        20,
        "partitions without a commit still count in full"
    );

    consume_and_commit(&mock, "ocr-writer", RESULTS, &[0, 1, 2], 30);
    assert_eq!(
        admin().results_lag(&cluster, RESULTS).await.expect("lag"),
        0
    );

    // The group comes from the pipeline (spec.kafka.writerGroup), not a constant.
    let other = Cluster {
        writer_group: "custom-writers".into(),
        ..cluster.clone()
    };
    assert_eq!(admin().results_lag(&other, RESULTS).await.expect("lag"), 30);

    produce(&mock, RESULTS, 1, 4);
    assert_eq!(
        admin().results_lag(&cluster, RESULTS).await.expect("lag"),
        4,
        "results published after the drain"
    );
}

#[tokio::test]
async fn an_unknown_lag_is_an_error_never_zero() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let missing = admin().results_lag(&cluster(&mock), RESULTS).await;
    assert!(
        matches!(missing, Err(KafkaError::LagUnavailable { ref topic, .. }) if topic == RESULTS),
        "{missing:?}"
    );

    let unreachable = Cluster {
        bootstrap_servers: "127.0.0.1:1".into(),
        writer_group: "ocr-writer".into(),
        security: Default::default(),
    };
    let quick = RdKafkaAdmin::new(Duration::from_secs(1));
    let lag = quick.results_lag(&unreachable, RESULTS).await;
    assert!(
        matches!(lag, Err(KafkaError::LagUnavailable { .. })),
        "{lag:?}"
    );
    let topics = quick.ensure_topics(&unreachable, &[topic(JOBS, 1)]).await;
    assert!(matches!(topics, Err(KafkaError::Admin(_))), "{topics:?}");
}

#[tokio::test]
async fn creates_missing_topics_on_a_real_broker() {
    let broker = real_broker::RealBroker::start();
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let cluster = Cluster {
        bootstrap_servers: broker.bootstrap_servers.clone(),
        writer_group: "ocr-writer".into(),
        security: Default::default(),
    };
    let topics = [
        topic(&format!("ocr-operator-test-{suffix}.a"), 3),
        topic(&format!("ocr-operator-test-{suffix}.b"), 2),
    ];
    let report = admin()
        .ensure_topics(&cluster, &topics)
        .await
        .expect("creates");
    let mut created = report.created.clone();
    created.sort();
    assert_eq!(created, [topics[0].name.clone(), topics[1].name.clone()]);

    let again = admin()
        .ensure_topics(&cluster, &topics)
        .await
        .expect("idempotent");
    assert!(
        again.created.is_empty() && again.shortfalls.is_empty(),
        "{again:?}"
    );
    let more = [topic(&topics[0].name, 4)];
    let short = admin()
        .ensure_topics(&cluster, &more)
        .await
        .expect("exists");
    assert_eq!(short.shortfalls.len(), 1, "{short:?}");
    assert_eq!(short.shortfalls[0].partitions, 3);
}

#[tokio::test]
async fn deletes_topics_on_a_real_broker_and_a_missing_one_is_fine() {
    let broker = real_broker::RealBroker::start();
    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let cluster = Cluster {
        bootstrap_servers: broker.bootstrap_servers.clone(),
        writer_group: "ocr-writer".into(),
        security: Default::default(),
    };
    let doomed = format!("ocr-operator-test-{suffix}.doomed");
    let kept = format!("ocr-operator-test-{suffix}.kept");
    admin()
        .ensure_topics(&cluster, &[topic(&doomed, 2), topic(&kept, 2)])
        .await
        .expect("creates");
    admin()
        .delete_topics(&cluster, &[doomed.clone(), format!("{doomed}.never-made")])
        .await
        .expect("deletes, and a topic that is not there counts as deleted");
    let again = admin()
        .ensure_topics(&cluster, &[topic(&doomed, 2), topic(&kept, 2)])
        .await
        .expect("ensures");
    assert_eq!(
        again.created,
        [doomed],
        "the deleted topic is made anew, the kept one is there"
    );
}

/// The operator's own clients authenticate with the pipeline's credentials:
/// topics are created on a broker that requires SCRAM-SHA-512, and the same
/// call with a wrong password fails instead of reporting success.
#[tokio::test]
async fn creates_topics_on_a_broker_that_requires_scram() {
    use ocr_contract::{KafkaSecurityConfig, SaslMechanism, Secret, SecurityProtocol};
    let broker = real_broker::RealBroker::start_with_scram_user("operator", "pa55-word");
    let cluster = |password: &str| Cluster {
        bootstrap_servers: broker.bootstrap_servers.clone(),
        writer_group: "ocr-writer".into(),
        security: KafkaSecurityConfig {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl_mechanism: SaslMechanism::ScramSha512,
            sasl_username: "operator".into(),
            sasl_password: Secret::new(password),
            ..KafkaSecurityConfig::default()
        },
    };
    let topics = [topic(JOBS, 3)];
    let quick = RdKafkaAdmin::new(Duration::from_secs(3));
    let refused = quick.ensure_topics(&cluster("wrong"), &topics).await;
    assert!(refused.is_err(), "a wrong password got {refused:?}");
    let report = admin()
        .ensure_topics(&cluster("pa55-word"), &topics)
        .await
        .expect("creates with the right password");
    assert_eq!(report.created, [JOBS]);
}
