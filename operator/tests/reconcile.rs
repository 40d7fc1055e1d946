//! Reconcile against an in-memory API server (tower-test mock service):
//! create, update, migrate both ways and delete through the finalizer.

mod support;

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::Api;
use ocr_operator::build::Capabilities;
use ocr_operator::controller::{reconcile, Context, Error, FINALIZER};
use ocr_operator::crd::OcrPipeline;
use ocr_operator::kafka::{
    BoxFuture, Cluster, KafkaAdmin, KafkaError, PartitionShortfall, TopicSpec, TopicsReport,
};
use ocr_operator::metrics::Metrics;
use serde_json::{json, Value};
use support::{deployments, pipelines, pods, worker_pod, FakeApi, NAME, NAMESPACE};

#[derive(Default)]
struct FakeKafka {
    lag: Mutex<Option<u64>>,
    ensured: Mutex<Vec<Vec<String>>>,
    shortfalls: Mutex<Vec<PartitionShortfall>>,
    clusters: Mutex<Vec<Cluster>>,
    /// The API server, to see what the reconcile had asked it before each lag reading.
    api: Mutex<Option<FakeApi>>,
    /// Per lag reading: whether this reconcile had listed the worker pods before it.
    lag_after_pod_listing: Mutex<Vec<bool>>,
    /// The broker's topics: ensuring creates the missing ones, as a real broker does.
    topics: Mutex<std::collections::BTreeSet<String>>,
    /// Per delete call: the topics asked for.
    deleted: Mutex<Vec<Vec<String>>>,
    /// The workers' lag on the jobs topic, as (topic, group, lag); `None`: unknown.
    jobs_lag: Mutex<Option<u64>>,
    lag_questions: Mutex<Vec<(String, String)>>,
}

impl KafkaAdmin for FakeKafka {
    fn ensure_topics<'a>(
        &'a self,
        cluster: &'a Cluster,
        topics: &'a [TopicSpec],
    ) -> BoxFuture<'a, Result<TopicsReport, KafkaError>> {
        Box::pin(async move {
            self.clusters.lock().expect("lock").push(cluster.clone());
            self.ensured
                .lock()
                .expect("lock")
                .push(topics.iter().map(|t| t.name.clone()).collect());
            let mut existing = self.topics.lock().expect("lock");
            let created = topics
                .iter()
                .filter(|t| existing.insert(t.name.clone()))
                .map(|t| t.name.clone())
                .collect();
            Ok(TopicsReport {
                created,
                shortfalls: self.shortfalls.lock().expect("lock").clone(),
            })
        })
    }

    fn results_lag<'a>(
        &'a self,
        cluster: &'a Cluster,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<u64, KafkaError>> {
        Box::pin(async move {
            self.clusters.lock().expect("lock").push(cluster.clone());
            if let Some(api) = self.api.lock().expect("lock").as_ref() {
                let listed = api
                    .log()
                    .iter()
                    .any(|r| r.method == "GET" && r.path == pods(NAMESPACE));
                self.lag_after_pod_listing
                    .lock()
                    .expect("lock")
                    .push(listed);
            }
            (*self.lag.lock().expect("lock")).ok_or_else(|| KafkaError::LagUnavailable {
                topic: topic.into(),
                reason: "test".into(),
            })
        })
    }

    fn consumer_lag<'a>(
        &'a self,
        _cluster: &'a Cluster,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<u64, KafkaError>> {
        Box::pin(async move {
            self.lag_questions
                .lock()
                .expect("lock")
                .push((topic.to_owned(), group.to_owned()));
            (*self.jobs_lag.lock().expect("lock")).ok_or_else(|| KafkaError::LagUnavailable {
                topic: topic.into(),
                reason: "test".into(),
            })
        })
    }

    fn delete_topics<'a>(
        &'a self,
        _cluster: &'a Cluster,
        topics: &'a [String],
    ) -> BoxFuture<'a, Result<(), KafkaError>> {
        Box::pin(async move {
            self.deleted.lock().expect("lock").push(topics.to_vec());
            let mut existing = self.topics.lock().expect("lock");
            for topic in topics {
                existing.remove(topic);
            }
            Ok(())
        })
    }
}

struct Harness {
    fake: FakeApi,
    kafka: Arc<FakeKafka>,
    ctx: Arc<Context>,
}

impl Harness {
    fn new(architecture: &str) -> Harness {
        let fake = FakeApi::default();
        fake.insert(&pipelines(NAMESPACE), support::pipeline_json(architecture));
        // The Secrets the sample pipeline's pods read.
        fake.insert(
            SECRETS,
            secret("ocr-mysql", &[("url", "mysql://ocr@db/ocr")]),
        );
        fake.insert(
            SECRETS,
            secret("ocr-redis", &[("redis-url", "redis://redis:6379")]),
        );
        fake.insert(
            SECRETS,
            secret(
                "ocr-s3",
                &[
                    ("AWS_ACCESS_KEY_ID", "id"),
                    ("AWS_SECRET_ACCESS_KEY", "key"),
                ],
            ),
        );
        fake.insert(SECRETS, secret("ocr-webhook", &[("secret", "hmac")]));
        let kafka = Arc::new(FakeKafka::default());
        *kafka.api.lock().expect("lock") = Some(fake.clone());
        let client = fake.client();
        let ctx = Arc::new(Context {
            client: client.clone(),
            recorder: Recorder::new(client, "ocr-operator".into()),
            kafka: kafka.clone(),
            capabilities: Capabilities { keda: true },
            metrics: Arc::new(Metrics::default()),
            signals: Default::default(),
        });
        Harness { fake, kafka, ctx }
    }

    /// Reads the pipeline back, as the controller's watch would deliver it.
    async fn reconcile(&self) -> Result<Action, Error> {
        let api: Api<OcrPipeline> = Api::namespaced(self.ctx.client.clone(), NAMESPACE);
        let current = api.get(NAME).await.expect("pipeline exists");
        self.fake.clear_log();
        reconcile(Arc::new(current), self.ctx.clone()).await
    }

    fn status(&self) -> Value {
        self.fake
            .get(&pipelines(NAMESPACE), NAME)
            .expect("pipeline")["status"]
            .clone()
    }

    fn phase(&self) -> Value {
        self.status()["migration"]["phase"].clone()
    }

    fn deployment(&self, role: &str) -> Option<Value> {
        self.fake
            .get(&deployments(NAMESPACE), &format!("{NAME}-{role}"))
    }

    fn worker_mode(&self) -> Value {
        let worker = self.deployment("worker").expect("worker deployment");
        worker["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == "OCR_WORKER__MODE")
            .expect("mode")["value"]
            .clone()
    }

    fn set_architecture(&self, architecture: &str) {
        self.fake.update(&pipelines(NAMESPACE), NAME, |p| {
            p["spec"]["architecture"] = json!(architecture);
            let generation = p["metadata"]["generation"].as_i64().unwrap_or(1);
            p["metadata"]["generation"] = json!(generation + 1);
        });
    }

    fn roll_out(&self, role: &str) {
        self.fake.roll_out(NAMESPACE, &format!("{NAME}-{role}"));
    }

    async fn create_and_settle(&self) {
        self.reconcile().await.expect("adds the finalizer");
        self.reconcile().await.expect("applies");
        for role in ["api", "worker", "writer"] {
            if self.deployment(role).is_some() {
                self.roll_out(role);
            }
        }
        self.reconcile().await.expect("settles");
        assert_eq!(self.status()["phase"], "Running", "{}", self.status());
    }
}

fn summaries(fake: &FakeApi) -> Vec<String> {
    fake.log().iter().map(|r| r.summary()).collect()
}

#[tokio::test]
async fn create_adds_finalizer_then_applies_every_object() {
    let h = Harness::new("standard");

    let action = h.reconcile().await.expect("first reconcile");
    assert_eq!(action, Action::await_change());
    let log = h.fake.log();
    assert_eq!(
        log.len(),
        1,
        "only the finalizer patch: {:?}",
        summaries(&h.fake)
    );
    assert_eq!(log[0].method, "PATCH");
    assert!(log[0].content_type.contains("json-patch"));
    let stored = h.fake.get(&pipelines(NAMESPACE), NAME).expect("pipeline");
    assert_eq!(stored["metadata"]["finalizers"], json!([FINALIZER]));

    h.reconcile().await.expect("second reconcile");
    let log = h.fake.log();
    let applies: Vec<String> = log
        .iter()
        .filter(|r| r.method == "PATCH" && r.content_type.contains("apply-patch"))
        .map(|r| r.summary())
        .collect();
    assert_eq!(
        applies,
        [
            "PATCH configmaps/demo-config",
            "PATCH deployments/demo-api",
            "PATCH services/demo-api",
            "PATCH poddisruptionbudgets/demo-api",
            "PATCH horizontalpodautoscalers/demo-api",
            "PATCH deployments/demo-worker",
            "PATCH poddisruptionbudgets/demo-worker",
            "PATCH scaledobjects/demo-worker",
            "PATCH ocrpipelines/demo/status",
        ]
    );
    for r in log
        .iter()
        .filter(|r| r.content_type.contains("apply-patch"))
    {
        assert!(r.query.contains("fieldManager=ocr-operator"), "{}", r.query);
        assert!(r.query.contains("force=true"), "{}", r.query);
    }
    let first_apply = log
        .iter()
        .position(|r| r.method == "PATCH")
        .expect("applies");
    assert!(
        log[..first_apply].iter().all(|r| r.method == "GET"),
        "observes before it applies: {:?}",
        summaries(&h.fake)
    );
    assert_eq!(
        log.last().map(|r| r.summary()).as_deref(),
        Some("PATCH ocrpipelines/demo/status")
    );
    assert!(log.iter().all(|r| r.method != "DELETE"));

    let worker = h.deployment("worker").expect("worker");
    assert_eq!(worker["metadata"]["ownerReferences"][0]["name"], NAME);
    assert_eq!(h.worker_mode(), "standard");
    assert!(h.deployment("writer").is_none());
    let status = h.status();
    assert_eq!(status["architecture"], "standard");
    assert_eq!(status["phase"], "Pending");
    assert_eq!(
        status["topics"],
        json!(["ocr.demo.jobs", "ocr.demo.dead-letter"])
    );

    h.roll_out("api");
    h.roll_out("worker");
    h.reconcile().await.expect("third reconcile");
    let status = h.status();
    assert_eq!(status["phase"], "Running");
    let ready = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Ready")
        .expect("Ready condition")
        .clone();
    assert_eq!(ready["status"], "True");
}

#[tokio::test]
async fn update_to_batched_rolls_workers_and_keeps_transition_times() {
    let h = Harness::new("standard");
    h.create_and_settle().await;
    let ready_since = |s: &Value| {
        s["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Degraded").cloned())
            .expect("Degraded condition")["lastTransitionTime"]
            .clone()
    };
    let degraded_before = ready_since(&h.status());

    h.set_architecture("batched");
    h.reconcile().await.expect("starts the migration");
    assert_eq!(h.phase(), "RollingWorkers");
    assert_eq!(h.worker_mode(), "batched");
    assert_eq!(h.status()["architecture"], "standard", "not rolled out yet");
    assert_eq!(h.status()["phase"], "Migrating");

    h.reconcile().await.expect("waits for the rollout");
    assert_eq!(h.phase(), "RollingWorkers");

    h.roll_out("worker");
    h.reconcile().await.expect("completes");
    let status = h.status();
    assert_eq!(status["architecture"], "batched");
    assert!(status["migration"].is_null());
    assert_eq!(
        ready_since(&status),
        degraded_before,
        "Degraded stayed False, so its lastTransitionTime is kept"
    );
}

#[tokio::test]
async fn migrates_to_writer_and_back_without_dropping_results() {
    let h = Harness::new("standard");
    h.create_and_settle().await;

    // standard → writer
    h.set_architecture("writer");
    h.reconcile().await.expect("topic, then writer");
    assert_eq!(h.phase(), "StartingWriter");
    assert!(h.deployment("writer").is_some(), "writer is created first");
    assert_eq!(h.worker_mode(), "standard", "workers wait for the writer");
    let ensured = h.kafka.ensured.lock().expect("lock").clone();
    assert!(ensured
        .last()
        .is_some_and(|t| t.contains(&"ocr.demo.results".to_string())));

    h.reconcile().await.expect("writer not available yet");
    assert_eq!(h.worker_mode(), "standard");

    h.roll_out("writer");
    h.reconcile().await.expect("rolls workers");
    assert_eq!(h.phase(), "RollingWorkers");
    assert_eq!(h.worker_mode(), "writer");

    h.roll_out("worker");
    h.reconcile().await.expect("completes");
    assert_eq!(h.status()["architecture"], "writer");
    assert!(h.status()["migration"].is_null());

    let events = h.fake.get_all(&format!(
        "/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"
    ));
    let reasons: Vec<&str> = events.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert!(reasons.contains(&"MigrationStarted"), "{reasons:?}");
    assert!(reasons.contains(&"MigrationProgressed"), "{reasons:?}");
    assert!(reasons.contains(&"MigrationCompleted"), "{reasons:?}");

    // writer → standard
    *h.kafka.lag.lock().expect("lock") = Some(12);
    h.set_architecture("standard");
    h.reconcile().await.expect("rolls workers back");
    assert_eq!(h.phase(), "RollingWorkers");
    assert_eq!(h.worker_mode(), "standard");

    h.roll_out("worker");
    h.reconcile().await.expect("drains");
    assert_eq!(h.phase(), "DrainingResults");
    assert!(h.deployment("writer").is_some());
    assert!(!summaries(&h.fake).iter().any(|s| s.starts_with("DELETE")));

    *h.kafka.lag.lock().expect("lock") = None;
    h.reconcile().await.expect("lag unknown");
    assert_eq!(
        h.phase(),
        "DrainingResults",
        "an unknown lag never removes the writer"
    );

    *h.kafka.lag.lock().expect("lock") = Some(0);
    h.reconcile().await.expect("removes the writer");
    assert_eq!(h.phase(), "RemovingWriter");
    let deletes: Vec<String> = summaries(&h.fake)
        .into_iter()
        .filter(|s| s.starts_with("DELETE"))
        .collect();
    assert_eq!(
        deletes,
        [
            "DELETE deployments/demo-writer",
            "DELETE poddisruptionbudgets/demo-writer"
        ]
    );

    h.reconcile().await.expect("completes");
    let status = h.status();
    assert_eq!(status["architecture"], "standard");
    assert!(status["migration"].is_null());
    assert_eq!(
        status["topics"],
        json!(["ocr.demo.jobs", "ocr.demo.dead-letter"])
    );
}

#[tokio::test]
async fn delete_removes_children_then_the_finalizer() {
    let h = Harness::new("standard");
    h.create_and_settle().await;
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["metadata"]["deletionTimestamp"] = json!("2026-11-27T21:00:00Z");
    });

    h.reconcile().await.expect("cleanup");
    let log = summaries(&h.fake);
    let deletes = log.iter().filter(|s| s.starts_with("DELETE")).count();
    assert_eq!(deletes, 8, "{log:?}");
    assert_eq!(
        log.last().map(String::as_str),
        Some("PATCH ocrpipelines/demo")
    );
    let stored = h.fake.get(&pipelines(NAMESPACE), NAME).expect("pipeline");
    assert_eq!(stored["metadata"]["finalizers"], json!([]));
    assert!(h.deployment("worker").is_none());
}

#[tokio::test]
async fn delete_keeps_the_writer_while_results_are_pending() {
    let h = Harness::new("writer");
    h.create_and_settle().await;
    *h.kafka.lag.lock().expect("lock") = Some(3);
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["metadata"]["deletionTimestamp"] = json!("2026-11-27T21:00:00Z");
    });

    let result = h.reconcile().await;
    assert!(result.is_err(), "cleanup must fail so the finalizer stays");
    assert!(h.deployment("writer").is_some());
    assert!(h.deployment("worker").is_none());
    let stored = h.fake.get(&pipelines(NAMESPACE), NAME).expect("pipeline");
    assert_eq!(stored["metadata"]["finalizers"], json!([FINALIZER]));

    *h.kafka.lag.lock().expect("lock") = Some(0);
    h.reconcile().await.expect("cleanup completes");
    assert!(h.deployment("writer").is_none());
    let stored = h.fake.get(&pipelines(NAMESPACE), NAME).expect("pipeline");
    assert_eq!(stored["metadata"]["finalizers"], json!([]));
}

#[tokio::test]
async fn invalid_spec_is_reported_and_nothing_is_applied() {
    let h = Harness::new("standard");
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["spec"]["model"]["source"]["volume"] = json!({"claimName": "models"});
    });
    h.reconcile().await.expect("finalizer");
    let action = h.reconcile().await.expect("invalid spec is not an error");
    assert_eq!(action, Action::await_change());
    let log = summaries(&h.fake);
    assert_eq!(
        log,
        [
            "GET ocrpipelines/demo",
            "PATCH ocrpipelines/demo/status",
            "POST events"
        ],
        "the status is read fresh, written, and the spec problem published"
    );
    let events = h.fake.get_all(&format!(
        "/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"
    ));
    assert_eq!(events[0]["reason"], "InvalidSpec");
    assert_eq!(events[0]["type"], "Warning");
    let status = h.status();
    assert_eq!(status["phase"], "Degraded");
    let degraded = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Degraded").cloned())
        .expect("Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
}

#[tokio::test]
async fn a_lost_status_is_recovered_from_the_running_workers() {
    let h = Harness::new("writer");
    h.create_and_settle().await;
    *h.kafka.lag.lock().expect("lock") = Some(4);
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["status"] = Value::Null;
    });
    h.set_architecture("batched");

    h.reconcile().await.expect("reconciles");
    assert_eq!(h.phase(), "RollingWorkers", "{}", h.status());
    assert_eq!(h.status()["migration"]["from"], "writer");
    assert!(
        h.deployment("writer").is_some(),
        "the writer still has results to persist"
    );
    assert!(!summaries(&h.fake).iter().any(|s| s.starts_with("DELETE")));
}

#[tokio::test]
async fn kafka_calls_name_the_pipelines_cluster_and_shortfalls_reach_the_status() {
    let h = Harness::new("writer");
    *h.kafka.shortfalls.lock().expect("lock") = vec![PartitionShortfall {
        topic: "ocr.results".into(),
        partitions: 2,
        required: 6,
    }];
    h.create_and_settle().await;
    let clusters = h.kafka.clusters.lock().expect("lock").clone();
    assert!(!clusters.is_empty());
    for cluster in &clusters {
        assert_eq!(
            cluster.bootstrap_servers,
            "kafka-0.kafka:9092,kafka-1.kafka:9092"
        );
        assert_eq!(cluster.writer_group, "ocr.demo.writer");
    }
    let status = h.status();
    let ready = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
        .expect("Ready");
    assert_eq!(ready["status"], "True", "too few partitions block nothing");
    let message = ready["message"].as_str().expect("message");
    assert!(
        message
            .contains("topic ocr.results has 2 partitions, fewer than spec.kafka.partitions (6)"),
        "{message}"
    );
}

/// A Secret as the API server returns it (k8s-openapi base64-encodes `data`).
fn secret(name: &str, data: &[(&str, &str)]) -> Value {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NAMESPACE.into()),
            ..ObjectMeta::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    };
    let mut value = serde_json::to_value(secret).expect("serializes");
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("Secret");
    value
}

fn secure(h: &Harness) {
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["spec"]["kafka"]["security"] = json!({
            "tls": {"caSecret": "kafka-ca"},
            "sasl": {"mechanism": "SCRAM-SHA-256", "secret": "kafka-user"},
        });
    });
}

const SECRETS: &str = "/api/v1/namespaces/ocr/secrets";

#[tokio::test]
async fn the_operator_reaches_a_secured_kafka_with_the_pipelines_secrets() {
    let h = Harness::new("writer");
    secure(&h);
    h.fake.insert(
        SECRETS,
        secret("kafka-user", &[("username", "ocr"), ("password", "p4ss")]),
    );
    h.fake.insert(
        SECRETS,
        secret("kafka-ca", &[("ca.crt", "-----BEGIN CERTIFICATE-----\n")]),
    );
    h.create_and_settle().await;

    let clusters = h.kafka.clusters.lock().expect("lock").clone();
    assert!(!clusters.is_empty());
    for cluster in &clusters {
        let security = &cluster.security;
        assert_eq!(security.protocol.as_str(), "sasl_ssl");
        assert_eq!(
            (
                security.sasl_mechanism.as_str(),
                security.sasl_username.as_str(),
                security.sasl_password.expose()
            ),
            ("SCRAM-SHA-256", "ocr", "p4ss")
        );
        assert_eq!(
            security.ssl_ca_pem.expose(),
            "-----BEGIN CERTIFICATE-----\n"
        );
    }
}

#[tokio::test]
async fn a_missing_kafka_secret_is_reported_and_blocks_no_rollout() {
    let h = Harness::new("standard");
    secure(&h);
    h.fake.insert(
        SECRETS,
        secret("kafka-ca", &[("ca.crt", "-----BEGIN CERTIFICATE-----\n")]),
    );
    h.reconcile().await.expect("adds the finalizer");
    h.reconcile().await.expect("applies");
    assert!(
        h.kafka.clusters.lock().expect("lock").is_empty(),
        "Kafka is not asked without credentials"
    );
    assert!(h.deployment("worker").is_some(), "the pods still roll out");
    let degraded = h.status()["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Degraded").cloned())
        .expect("Degraded");
    let message = degraded["message"].as_str().expect("message");
    assert!(
        message.contains("reading the Kafka secret kafka-user"),
        "{message}"
    );
    assert_eq!(
        degraded["status"], "True",
        "a failing Kafka admin is Degraded"
    );
    assert_eq!(degraded["reason"], "KafkaUnavailable");
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_).cloned())
        .unwrap_or_else(|| panic!("{type_} condition in {status}"))
}

fn event_reasons(fake: &FakeApi) -> Vec<String> {
    fake.get_all(&format!(
        "/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"
    ))
    .iter()
    .filter_map(|e| e["reason"].as_str().map(str::to_string))
    .collect()
}

fn deletes(fake: &FakeApi) -> Vec<String> {
    summaries(fake)
        .into_iter()
        .filter(|s| s.starts_with("DELETE"))
        .collect()
}

/// Issue 11, bug 1 (drain race): the Deployment reports the rollout finished
/// and the results lag reads 0, but an old writer-mode worker pod is still
/// terminating and may publish its last batch: the writer stays until it is gone.
#[tokio::test]
async fn a_terminating_writer_mode_worker_keeps_the_writer() {
    let h = Harness::new("writer");
    h.create_and_settle().await;
    *h.kafka.lag.lock().expect("lock") = Some(0);
    h.set_architecture("standard");
    h.reconcile().await.expect("rolls workers");
    assert_eq!(h.phase(), "RollingWorkers");

    h.roll_out("worker");
    h.fake.insert(
        &pods(NAMESPACE),
        worker_pod("demo-worker-new", "standard", false),
    );
    h.fake.insert(
        &pods(NAMESPACE),
        worker_pod("demo-worker-old", "writer", true),
    );
    h.reconcile().await.expect("waits for the old pod");
    assert_eq!(h.phase(), "RollingWorkers", "{}", h.status());
    assert!(
        h.deployment("writer").is_some(),
        "the writer outlives the old pod"
    );
    assert!(deletes(&h.fake).is_empty(), "{:?}", summaries(&h.fake));
    assert_eq!(
        condition(&h.status(), "Migrating")["reason"],
        "WaitingForWorkerRollout"
    );
    let pod_lists = summaries(&h.fake)
        .into_iter()
        .filter(|s| s == "GET pods")
        .count();
    assert_eq!(pod_lists, 1, "{:?}", summaries(&h.fake));
    let list = h
        .fake
        .log()
        .into_iter()
        .find(|r| r.path == pods(NAMESPACE))
        .expect("the worker pods were listed");
    assert!(
        list.query
            .contains("app.kubernetes.io%2Fcomponent%3Dworker"),
        "by the worker Deployment's selector: {}",
        list.query
    );

    h.fake.remove(&pods(NAMESPACE), "demo-worker-old");
    h.reconcile().await.expect("drains and removes the writer");
    assert_eq!(h.phase(), "RemovingWriter");
    assert_eq!(
        deletes(&h.fake),
        [
            "DELETE deployments/demo-writer",
            "DELETE poddisruptionbudgets/demo-writer"
        ]
    );
    let order = h.kafka.lag_after_pod_listing.lock().expect("lock").clone();
    assert!(!order.is_empty());
    assert!(
        order.iter().all(|listed| *listed),
        "every lag reading follows this reconcile's pod listing: {order:?}"
    );
}

/// Issue 11, bug 1 (finalizer): deleting the pipeline keeps the writer while
/// a writer-mode worker pod is still terminating, even with a lag of 0.
#[tokio::test]
async fn delete_keeps_the_writer_while_a_writer_mode_worker_terminates() {
    let h = Harness::new("writer");
    h.create_and_settle().await;
    *h.kafka.lag.lock().expect("lock") = Some(0);
    h.fake.insert(
        &pods(NAMESPACE),
        worker_pod("demo-worker-old", "writer", true),
    );
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["metadata"]["deletionTimestamp"] = json!("2026-11-27T21:00:00Z");
    });

    let result = h.reconcile().await;
    let error = result.expect_err("cleanup must fail so the finalizer stays");
    assert_eq!(error.category(), "writer_mode_workers_left");
    assert!(h.deployment("writer").is_some());
    assert!(h.deployment("worker").is_none());
    let stored = h.fake.get(&pipelines(NAMESPACE), NAME).expect("pipeline");
    assert_eq!(stored["metadata"]["finalizers"], json!([FINALIZER]));
    assert!(
        h.kafka
            .lag_after_pod_listing
            .lock()
            .expect("lock")
            .is_empty(),
        "the lag is not even read while such a pod is left"
    );

    h.fake.remove(&pods(NAMESPACE), "demo-worker-old");
    h.reconcile().await.expect("cleanup completes");
    assert!(h.deployment("writer").is_none());
    let stored = h.fake.get(&pipelines(NAMESPACE), NAME).expect("pipeline");
    assert_eq!(stored["metadata"]["finalizers"], json!([]));
}

/// Issue 11, bug 2: writer → standard waiting for the results lag, reverted
/// to writer: the writer stays and the workers roll back into writer mode.
#[tokio::test]
async fn reverting_to_writer_while_draining_rolls_the_workers_back() {
    let h = Harness::new("writer");
    h.create_and_settle().await;
    *h.kafka.lag.lock().expect("lock") = Some(5);
    h.set_architecture("standard");
    h.reconcile().await.expect("rolls workers");
    h.roll_out("worker");
    h.reconcile().await.expect("drains");
    assert_eq!(h.phase(), "DrainingResults");

    h.set_architecture("writer");
    h.reconcile().await.expect("turns back");
    let status = h.status();
    assert_eq!(status["migration"]["from"], "standard", "{status}");
    assert_eq!(status["migration"]["to"], "writer");
    assert_eq!(status["migration"]["phase"], "RollingWorkers");
    assert_eq!(h.worker_mode(), "writer");
    assert!(h.deployment("writer").is_some());
    assert!(deletes(&h.fake).is_empty(), "{:?}", summaries(&h.fake));
    assert!(event_reasons(&h.fake).contains(&"MigrationReverted".to_string()));

    h.roll_out("worker");
    h.reconcile().await.expect("completes");
    let status = h.status();
    assert_eq!(status["architecture"], "writer");
    assert!(status["migration"].is_null());
    assert!(h.deployment("writer").is_some());
}

/// Issue 11, bug 3: a phase that waits past `spec.migration.phaseDeadlineSeconds`
/// marks the pipeline Degraded (MigrationStuck) with one Warning event, and keeps waiting.
#[tokio::test]
async fn a_phase_past_its_deadline_is_degraded_and_keeps_waiting() {
    let h = Harness::new("writer");
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["spec"]["migration"] = json!({"phaseDeadlineSeconds": 120});
    });
    h.create_and_settle().await;
    *h.kafka.lag.lock().expect("lock") = Some(5);
    h.set_architecture("standard");
    h.reconcile().await.expect("rolls workers");
    h.roll_out("worker");
    h.reconcile().await.expect("drains");
    assert_eq!(h.phase(), "DrainingResults");
    assert!(h.status()["migration"]["phaseStartedAt"].is_string());
    assert_eq!(condition(&h.status(), "Degraded")["status"], "False");

    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["status"]["migration"]["phaseStartedAt"] = json!("2020-01-01T00:00:00Z");
    });
    h.reconcile().await.expect("still draining");
    let status = h.status();
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True", "{status}");
    assert_eq!(degraded["reason"], "MigrationStuck");
    assert!(
        degraded["message"]
            .as_str()
            .is_some_and(|m| m.contains("phaseDeadlineSeconds (120 s)")),
        "{degraded}"
    );
    assert_eq!(status["migration"]["phase"], "DrainingResults");
    assert!(
        h.deployment("writer").is_some(),
        "the deadline skips no wait"
    );
    let warnings = |fake: &FakeApi| {
        fake.get_all(&format!(
            "/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"
        ))
        .into_iter()
        .filter(|e| e["reason"] == "MigrationStuck" && e["type"] == "Warning")
        .count()
    };
    assert_eq!(warnings(&h.fake), 1);

    h.reconcile().await.expect("still draining");
    assert_eq!(warnings(&h.fake), 1, "one Warning per stuck phase");
    assert!(!summaries(&h.fake).iter().any(|s| s == "POST events"));
}

/// Issue 11, bug 4: a status lost mid writer → standard (workers already
/// standard, the writer still draining) is recovered as that migration.
#[tokio::test]
async fn a_lost_status_next_to_a_writer_drains_before_removing_it() {
    let h = Harness::new("writer");
    h.create_and_settle().await;
    *h.kafka.lag.lock().expect("lock") = Some(4);
    h.set_architecture("standard");
    h.reconcile().await.expect("rolls workers");
    h.roll_out("worker");
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["status"] = Value::Null;
    });

    h.reconcile().await.expect("recovers");
    let status = h.status();
    assert_eq!(status["migration"]["from"], "writer", "{status}");
    assert_eq!(status["migration"]["to"], "standard");
    assert_eq!(status["migration"]["phase"], "DrainingResults");
    assert!(h.deployment("writer").is_some(), "never removed undrained");
    assert!(deletes(&h.fake).is_empty(), "{:?}", summaries(&h.fake));

    *h.kafka.lag.lock().expect("lock") = Some(0);
    h.reconcile().await.expect("drained");
    assert_eq!(h.phase(), "RemovingWriter");
    assert!(h.deployment("writer").is_none());
}

/// Pipelines do not share queues by default: the names come from namespace
/// and name, and the status shows them and which topics the operator created.
#[tokio::test]
async fn queue_names_are_per_pipeline_and_shown_in_the_status() {
    let h = Harness::new("writer");
    h.kafka
        .topics
        .lock()
        .expect("lock")
        .insert("ocr.demo.dead-letter".into());
    h.create_and_settle().await;
    let status = h.status();
    assert_eq!(
        status["queues"],
        json!({
            "jobsTopic": "ocr.demo.jobs",
            "resultsTopic": "ocr.demo.results",
            "deadLetterTopic": "ocr.demo.dead-letter",
            "consumerGroup": "ocr.demo.worker",
            "writerGroup": "ocr.demo.writer",
        })
    );
    assert_eq!(
        status["createdTopics"],
        json!(["ocr.demo.jobs", "ocr.demo.results"]),
        "the dead-letter topic existed before: {status}"
    );
    let config = h
        .fake
        .get(
            &format!("/api/v1/namespaces/{NAMESPACE}/configmaps"),
            "demo-config",
        )
        .expect("config map");
    let toml = config["data"]["ocr.toml"].as_str().expect("ocr.toml");
    assert!(
        toml.contains("consumer_group = \"ocr.demo.worker\""),
        "{toml}"
    );
    assert!(toml.contains("jobs_topic = \"ocr.demo.jobs\""), "{toml}");
    let clusters = h.kafka.clusters.lock().expect("lock");
    assert!(clusters.iter().all(|c| c.writer_group == "ocr.demo.writer"));
}

fn delete_pipeline(h: &Harness) {
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["metadata"]["deletionTimestamp"] = json!("2026-11-27T21:00:00Z");
    });
}

/// `spec.kafka.deleteTopics`: the topics the operator created go with the
/// pipeline once its pods are gone; a topic another pipeline on the same
/// brokers names stays, and one that existed before was never the operator's.
#[tokio::test]
async fn delete_topics_removes_only_created_unshared_topics_after_the_pods() {
    let h = Harness::new("standard");
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["spec"]["kafka"]["deleteTopics"] = json!(true);
    });
    h.create_and_settle().await;
    assert_eq!(
        h.status()["createdTopics"],
        json!(["ocr.demo.dead-letter", "ocr.demo.jobs"])
    );
    let mut other = support::pipeline_json("standard");
    other["metadata"]["name"] = json!("other");
    other["metadata"]["namespace"] = json!("elsewhere");
    other["metadata"]["uid"] = json!("7a1c1f2e-0000-4000-8000-000000000002");
    other["spec"]["kafka"]["topics"] = json!({"deadLetter": "ocr.demo.dead-letter"});
    h.fake.insert(&pipelines("elsewhere"), other);
    h.fake.insert(
        &pods(NAMESPACE),
        worker_pod("demo-worker-a", "standard", true),
    );
    delete_pipeline(&h);

    let error = h.reconcile().await.expect_err("a pod is left");
    assert_eq!(error.category(), "pods_left");
    assert!(h.kafka.deleted.lock().expect("lock").is_empty());
    let stored = h.fake.get(&pipelines(NAMESPACE), NAME).expect("pipeline");
    assert_eq!(stored["metadata"]["finalizers"], json!([FINALIZER]));

    h.fake.remove(&pods(NAMESPACE), "demo-worker-a");
    h.reconcile().await.expect("cleanup completes");
    assert_eq!(
        *h.kafka.deleted.lock().expect("lock"),
        [vec!["ocr.demo.jobs".to_string()]]
    );
    let stored = h.fake.get(&pipelines(NAMESPACE), NAME).expect("pipeline");
    assert_eq!(stored["metadata"]["finalizers"], json!([]));
}

#[tokio::test]
async fn topics_stay_unless_delete_topics_is_set() {
    let h = Harness::new("standard");
    h.create_and_settle().await;
    delete_pipeline(&h);
    h.reconcile().await.expect("cleanup completes");
    assert!(h.kafka.deleted.lock().expect("lock").is_empty());
    assert_eq!(h.kafka.topics.lock().expect("lock").len(), 2);
}

/// Found on the real control plane: an owned object's event can start the
/// next round before the watch cache holds the operator's own last status
/// write. A round computed from that stale copy must not undo the last one
/// (here: forget the topics it created, or restart a migration).
#[tokio::test]
async fn a_stale_cached_copy_does_not_undo_the_last_status() {
    let h = Harness::new("standard");
    h.create_and_settle().await;
    let api: Api<OcrPipeline> = Api::namespaced(h.ctx.client.clone(), NAMESPACE);
    let before_migration = api.get(NAME).await.expect("pipeline");
    h.set_architecture("writer");
    h.reconcile().await.expect("starts the migration");
    let status = h.status();
    assert_eq!(status["migration"]["to"], "writer", "{status}");
    let created = status["createdTopics"].clone();
    assert!(
        created
            .as_array()
            .is_some_and(|t| t.contains(&json!("ocr.demo.results"))),
        "{status}"
    );
    let started_at = status["migration"]["startedAt"].clone();

    // The cache still holds the copy from before this migration.
    let mut stale = before_migration;
    stale.spec.architecture = ocr_operator::crd::Architecture::Writer;
    h.fake.clear_log();
    reconcile(Arc::new(stale), h.ctx.clone())
        .await
        .expect("reconciles");
    let status = h.status();
    assert_eq!(status["createdTopics"], created, "{status}");
    assert_eq!(status["migration"]["startedAt"], started_at, "{status}");
}

/// Without autoscalers the Deployments hold the spec's replica counts (in
/// this fake API no autoscaler would set them).
fn without_autoscaling(h: &Harness) {
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        if let Some(spec) = p["spec"].as_object_mut() {
            spec.remove("autoscaling");
        }
    });
}

fn event_requests(fake: &FakeApi) -> Vec<String> {
    summaries(fake)
        .into_iter()
        .filter(|s| s.contains("events"))
        .collect()
}

fn warnings(fake: &FakeApi, reason: &str) -> usize {
    fake.get_all(&format!(
        "/apis/events.k8s.io/v1/namespaces/{NAMESPACE}/events"
    ))
    .iter()
    .filter(|e| e["reason"] == reason && e["type"] == "Warning")
    .count()
}

/// Issue 11, item 5: `kubectl get ocrp` and `status` show where to submit
/// jobs and how many of each role's pods are ready.
#[tokio::test]
async fn the_status_shows_the_url_and_ready_pods_per_role() {
    let h = Harness::new("writer");
    without_autoscaling(&h);
    h.reconcile().await.expect("adds the finalizer");
    h.reconcile().await.expect("applies");
    h.roll_out("api");
    h.reconcile().await.expect("observes");
    let status = h.status();
    assert_eq!(status["url"], "http://demo-api.ocr.svc:80");
    assert_eq!(status["readyRoles"], "1/3", "{status}");
    assert_eq!(status["replicas"]["api"], json!({"ready": 2, "desired": 2}));
    assert_eq!(
        status["replicas"]["worker"],
        json!({"ready": 0, "desired": 3})
    );
    assert_eq!(
        status["replicas"]["writer"],
        json!({"ready": 0, "desired": 2})
    );

    h.roll_out("worker");
    h.roll_out("writer");
    h.reconcile().await.expect("settles");
    let status = h.status();
    assert_eq!(status["readyRoles"], "3/3", "{status}");
    assert_eq!(
        status["replicas"]["writer"],
        json!({"ready": 2, "desired": 2})
    );
}

/// Issue 11, item 5: a Secret the pods read that is missing (or lacks its
/// key) is `Degraded` at once, with one Warning event; the pods would only
/// sit in CreateContainerConfigError otherwise.
#[tokio::test]
async fn a_missing_secret_the_pods_need_is_degraded_with_one_warning() {
    let h = Harness::new("standard");
    h.fake.remove(SECRETS, "ocr-mysql");
    h.fake
        .insert(SECRETS, secret("ocr-s3", &[("AWS_ACCESS_KEY_ID", "id")]));
    h.reconcile().await.expect("adds the finalizer");
    h.reconcile().await.expect("applies anyway");
    assert!(h.deployment("worker").is_some(), "the rollout goes on");
    let degraded = condition(&h.status(), "Degraded");
    assert_eq!(degraded["status"], "True", "{degraded}");
    assert_eq!(degraded["reason"], "SecretUnavailable");
    let message = degraded["message"].as_str().expect("message");
    assert!(message.contains("Secret ocr-mysql not found"), "{message}");
    assert!(
        message.contains("Secret ocr-s3 has no key AWS_SECRET_ACCESS_KEY"),
        "{message}"
    );
    assert_eq!(h.status()["phase"], "Degraded");
    assert_eq!(warnings(&h.fake, "SecretUnavailable"), 1);

    h.reconcile().await.expect("still missing");
    assert_eq!(
        event_requests(&h.fake),
        Vec::<String>::new(),
        "once per failure"
    );

    h.fake.insert(
        SECRETS,
        secret("ocr-mysql", &[("url", "mysql://ocr@db/ocr")]),
    );
    h.fake.insert(
        SECRETS,
        secret(
            "ocr-s3",
            &[
                ("AWS_ACCESS_KEY_ID", "id"),
                ("AWS_SECRET_ACCESS_KEY", "key"),
            ],
        ),
    );
    h.roll_out("api");
    h.roll_out("worker");
    h.reconcile().await.expect("recovers");
    assert_eq!(condition(&h.status(), "Degraded")["status"], "False");
    assert_eq!(h.status()["phase"], "Running");
}

/// Issue 11, item 5: an object the API server refuses (an admission policy,
/// a quota) is `Degraded` with the server's message and one Warning event;
/// the migration state is kept as it was and the round is retried.
#[tokio::test]
async fn an_apply_the_api_server_refuses_is_degraded_with_one_warning() {
    let h = Harness::new("standard");
    h.create_and_settle().await;
    let before = h.status();
    h.fake.refuse_applies(
        &deployments(NAMESPACE),
        "demo-worker",
        403,
        "Forbidden",
        "admission webhook \"policy.example.com\" denied the request: GPUs need a priority class",
    );
    h.set_architecture("batched");
    let error = h.reconcile().await.expect_err("the apply fails");
    assert_eq!(error.category(), "apply");
    let status = h.status();
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True", "{status}");
    assert_eq!(degraded["reason"], "ApplyFailed");
    let message = degraded["message"].as_str().expect("message");
    assert!(
        message.contains("applying Deployment demo-worker")
            && message.contains("GPUs need a priority class"),
        "{message}"
    );
    assert_eq!(status["phase"], "Degraded");
    assert_eq!(
        status["migration"], before["migration"],
        "no migration step is recorded for a round that could not act"
    );
    assert_eq!(warnings(&h.fake, "ApplyFailed"), 1);

    h.reconcile().await.expect_err("still refused");
    assert_eq!(
        event_requests(&h.fake),
        Vec::<String>::new(),
        "once per failure"
    );

    h.fake.accept_applies();
    h.reconcile().await.expect("applies");
    let status = h.status();
    assert_eq!(
        condition(&status, "Degraded")["status"],
        "False",
        "{status}"
    );
    assert_eq!(status["migration"]["phase"], "RollingWorkers");
    assert_eq!(h.worker_mode(), "batched");
}

/// Issue 11, item 5: the operator's /metrics show each pipeline's phase and
/// pods, and forget a pipeline once it is deleted.
#[tokio::test]
async fn pipeline_metrics_follow_the_status_and_go_with_the_pipeline() {
    let h = Harness::new("standard");
    without_autoscaling(&h);
    h.create_and_settle().await;
    let text = h.ctx.metrics.render().expect("encodes");
    for line in [
        r#"ocr_operator_pipeline_phase{namespace="ocr",pipeline="demo",phase="Running"} 1"#,
        r#"ocr_operator_pipeline_phase{namespace="ocr",pipeline="demo",phase="Pending"} 0"#,
        r#"ocr_operator_pipeline_ready_replicas{namespace="ocr",pipeline="demo",role="worker"} 3"#,
        r#"ocr_operator_pipeline_desired_replicas{namespace="ocr",pipeline="demo",role="api"} 2"#,
        r#"ocr_operator_pipeline_migration_seconds{namespace="ocr",pipeline="demo"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }

    h.set_architecture("batched");
    h.reconcile().await.expect("starts the migration");
    let text = h.ctx.metrics.render().expect("encodes");
    assert!(
        text.contains(
            r#"ocr_operator_pipeline_phase{namespace="ocr",pipeline="demo",phase="Migrating"} 1"#
        ),
        "{text}"
    );
    h.roll_out("worker");
    h.reconcile().await.expect("completes");
    let text = h.ctx.metrics.render().expect("encodes");
    assert!(
        text.contains(
            r#"ocr_operator_migration_duration_seconds_count{from="standard",to="batched"} 1"#
        ),
        "{text}"
    );

    delete_pipeline(&h);
    h.reconcile().await.expect("cleanup completes");
    let text = h.ctx.metrics.render().expect("encodes");
    assert!(!text.contains(r#"pipeline="demo""#), "{text}");
}

/// A pod's `/metrics` page, served for real on 127.0.0.1 (the pod's IP in
/// the fake API), changeable while the test runs.
async fn serve_metrics(page: Arc<Mutex<String>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding");
    let port = listener.local_addr().expect("address").port();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let page = page.clone();
            async move { page.lock().expect("lock").clone() }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

fn worker_page(busy_seconds: f64, finish_sum: f64, finish_count: u64) -> String {
    format!(
        "# TYPE ocr_engine_busy_seconds counter\n\
         ocr_engine_busy_seconds_total {busy_seconds}\n\
         # TYPE ocr_store_seconds histogram\n\
         ocr_store_seconds_sum{{op=\"finish\"}} {finish_sum}\n\
         ocr_store_seconds_count{{op=\"finish\"}} {finish_count}\n\
         ocr_store_seconds_bucket{{le=\"+Inf\",op=\"finish\"}} {finish_count}\n\
         # EOF\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advise_reads_the_pods_metrics_and_the_jobs_lag_into_the_status() {
    let page = Arc::new(Mutex::new(worker_page(10.0, 0.5, 10)));
    let port = serve_metrics(page.clone()).await;
    let h = Harness::new("standard");
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["spec"]["autoArchitecture"] = json!({ "mode": "Advise" });
        p["spec"]["observability"] = json!({ "metricsPort": port });
    });
    *h.kafka.jobs_lag.lock().expect("lock") = Some(42);
    h.create_and_settle().await;
    let mut pod = worker_pod("demo-worker-a", "standard", false);
    pod["status"]["podIP"] = json!("127.0.0.1");
    h.fake.insert(&pods(NAMESPACE), pod);

    let action = h.reconcile().await.expect("reconciles");
    assert_eq!(
        action,
        Action::requeue(std::time::Duration::from_secs(15)),
        "the advisor looks again within 15 s"
    );
    let status = h.status();
    let advice = &status["advice"];
    assert_eq!(advice["architecture"], "standard", "{advice}");
    assert_eq!(advice["signals"]["jobsLag"], 42, "{advice}");
    assert_eq!(advice["signals"]["podsRead"], 1, "{advice}");
    // One reading of a counter says nothing yet.
    assert!(
        advice["signals"]["utilizationPercent"].is_null(),
        "{advice}"
    );
    assert!(
        advice["reason"]
            .as_str()
            .is_some_and(|r| r.contains("signals incomplete")),
        "{advice}"
    );
    let asked = h.kafka.lag_questions.lock().expect("lock").clone();
    assert!(
        asked.contains(&(
            format!("{NAMESPACE}.{NAME}.jobs"),
            format!("{NAMESPACE}.{NAME}.worker")
        )),
        "the jobs topic and the workers' group: {asked:?}"
    );
    let advised = condition(&status, "ArchitectureAdvice");
    assert_eq!(
        (advised["status"].clone(), advised["reason"].clone()),
        (json!("True"), json!("SpecFollowsAdvice"))
    );

    // A reading right after the first gives no rate: a burst of reconciles
    // must not read a busy pod as idle.
    h.reconcile().await.expect("reconciles");
    let signals = h.status()["advice"]["signals"].clone();
    assert!(signals["utilizationPercent"].is_null(), "{signals}");

    // Five seconds later: 3 s busy, 10 final writes of 100 ms.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    *page.lock().expect("lock") = worker_page(13.0, 1.5, 20);
    h.reconcile().await.expect("reconciles");
    let signals = h.status()["advice"]["signals"].clone();
    assert_eq!(signals["utilizationSource"], "engineBusy", "{signals}");
    let utilization = signals["utilizationPercent"]
        .as_i64()
        .expect("a utilisation");
    assert!((45..=60).contains(&utilization), "{signals}");
    assert_eq!(signals["storeFinishMillis"], 100, "{signals}");

    // Disabled: the advice and its condition go.
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["spec"]["autoArchitecture"] = json!({ "mode": "Disabled" });
    });
    h.reconcile().await.expect("reconciles");
    let status = h.status();
    assert!(status["advice"].is_null(), "{status}");
    let types: Vec<&str> = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .filter_map(|c| c["type"].as_str())
        .collect();
    assert!(!types.contains(&"ArchitectureAdvice"), "{status}");
}
/// A worker's counters advancing in real time: `busy` seconds of inference
/// per second, `writes` final writes per second of `write_seconds` each,
/// and a GPU gauge when set.
struct Pace {
    busy: f64,
    writes: f64,
    write_seconds: f64,
    gpu: Option<f64>,
}

fn paced_page(pace: &Pace, elapsed: f64) -> String {
    let count = (pace.writes * elapsed).floor();
    let mut page = worker_page(
        pace.busy * elapsed,
        count * pace.write_seconds,
        count as u64,
    );
    if let Some(gpu) = pace.gpu {
        page = page.replace(
            "# EOF\n",
            &format!(
                "# TYPE ocr_gpu_utilization_ratio gauge\nocr_gpu_utilization_ratio{{gpu=\"0\"}} {gpu}\n# EOF\n"
            ),
        );
    }
    page
}

/// Serves pages whose counters advance as `pace` says, changeable while
/// the test runs.
async fn serve_paced(pace: Arc<Mutex<Pace>>) -> String {
    let page = Arc::new(Mutex::new(String::new()));
    let port = serve_metrics(page.clone()).await;
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        loop {
            let text = paced_page(&pace.lock().expect("lock"), started.elapsed().as_secs_f64());
            *page.lock().expect("lock") = text;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    format!("127.0.0.1:{port}")
}

/// Reconciles once a second until the advice's signals are as `want`s.
async fn signals_when(h: &Harness, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        h.reconcile().await.expect("reconciles");
        let signals = h.status()["advice"]["signals"].clone();
        if want(&signals) {
            return signals;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the signals never became what was expected: {signals}"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advise_reads_utilisation_and_final_writes_from_a_real_prometheus() {
    use support::prometheus::{Prometheus, Target};
    let pace = |busy, writes, write_seconds| {
        Arc::new(Mutex::new(Pace {
            busy,
            writes,
            write_seconds,
            gpu: None,
        }))
    };
    // Two workers of this pipeline: busy 80 % and 40 %, final writes of
    // 50 ms and 150 ms (10 a second each). Neither its API nor another
    // pipeline's worker may count.
    let worker_a = pace(0.8, 10.0, 0.05);
    let worker_b = pace(0.4, 10.0, 0.15);
    let labels = |pipeline: &str, component: &str| {
        vec![
            ("namespace", NAMESPACE.to_owned()),
            ("ocr_serving_dev_pipeline", pipeline.to_owned()),
            ("app_kubernetes_io_component", component.to_owned()),
        ]
    };
    let targets = vec![
        Target {
            address: serve_paced(worker_a.clone()).await,
            labels: labels(NAME, "worker"),
        },
        Target {
            address: serve_paced(worker_b.clone()).await,
            labels: labels(NAME, "worker"),
        },
        Target {
            address: serve_paced(pace(1.0, 100.0, 2.0)).await,
            labels: labels(NAME, "api"),
        },
        Target {
            address: serve_paced(pace(0.0, 100.0, 3.0)).await,
            labels: labels("another", "worker"),
        },
    ];
    let prometheus = Prometheus::start(&targets);

    // No pod in the API: whatever the advice says came from Prometheus.
    let h = Harness::new("standard");
    h.fake.update(&pipelines(NAMESPACE), NAME, |p| {
        p["spec"]["autoArchitecture"] = json!({
            "mode": "Advise",
            "prometheus": { "url": prometheus.url, "windowSeconds": 10 },
        });
    });
    *h.kafka.jobs_lag.lock().expect("lock") = Some(7);
    h.create_and_settle().await;

    // Two scrapes of each target make a first rate, but `rate()` divides by
    // the whole window: it is right once the window is full of samples.
    signals_when(&h, |s| {
        s["podsRead"] == 2
            && !s["utilizationPercent"].is_null()
            && !s["storeFinishMillis"].is_null()
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    h.reconcile().await.expect("reconciles");
    let signals = h.status()["advice"]["signals"].clone();
    assert_eq!(signals["utilizationSource"], "engineBusy", "{signals}");
    assert_eq!(signals["jobsLag"], 7, "{signals}");
    let utilization = signals["utilizationPercent"]
        .as_i64()
        .expect("a utilisation");
    assert!(
        (52..=68).contains(&utilization),
        "mean of 80 % and 40 %: {signals}"
    );
    let store = signals["storeFinishMillis"]
        .as_i64()
        .expect("a final-write time");
    assert!(
        (85..=115).contains(&store),
        "mean of 50 and 150 ms: {signals}"
    );

    // A GPU reports itself: its utilisation wins over the busy ratio.
    worker_a.lock().expect("lock").gpu = Some(0.93);
    let signals = signals_when(&h, |s| s["utilizationSource"] == "gpu").await;
    assert_eq!(signals["utilizationPercent"], 93, "{signals}");

    // Prometheus gone: no value is guessed, the reconcile still succeeds.
    drop(prometheus);
    h.reconcile().await.expect("reconciles without Prometheus");
    let advice = h.status()["advice"].clone();
    assert!(
        advice["signals"]["utilizationPercent"].is_null(),
        "{advice}"
    );
    assert_eq!(advice["signals"]["podsRead"], 0, "{advice}");
    assert!(
        advice["reason"]
            .as_str()
            .is_some_and(|r| r.contains("signals incomplete")),
        "{advice}"
    );
}
