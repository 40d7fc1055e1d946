//! The cluster topology on real MariaDB and a Kafka protocol broker
//! (librdkafka's mock cluster on loopback): jobs flow API -> Kafka -> worker,
//! and crashes of either process never lose or duplicate a job.

mod common;

use common::real_broker::RealBroker;
use common::{
    engine, free_port, invoice_page, spawn_role, terminate, wait_for_status, wait_http_ok,
    MysqlDatabase, WebhookReceiver, INVOICE,
};
use ocr_runtime::config::{
    Config, KafkaSecurityConfig, QueueKind, SaslMechanism, Secret, SecurityProtocol, WorkerMode,
};
use ocr_runtime::domain::{JobId, JobStatus};
use ocr_runtime::queue::kafka::KafkaConnection;
use ocr_runtime::roles::{group_lag, start_api, start_worker, start_writer};
use rdkafka::mocking::MockCluster;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const JOBS: &str = "ocr.jobs";
const DEAD: &str = "ocr.dead-letter";
const RESULTS: &str = "ocr.results";

fn mock_kafka() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock Kafka cluster");
    cluster.create_topic(JOBS, 3, 1).expect("jobs topic");
    cluster.create_topic(DEAD, 1, 1).expect("dead-letter topic");
    cluster.create_topic(RESULTS, 3, 1).expect("results topic");
    cluster
}

/// Everything a topology test runs against; dropping it tears it all down.
struct Env {
    kafka: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    db: MysqlDatabase,
    _blobs: tempfile::TempDir,
    config: Config,
}

async fn environment() -> Env {
    let kafka = mock_kafka();
    let db = MysqlDatabase::create().await;
    let blobs = tempfile::tempdir().unwrap();
    let config = config(&db, &kafka.bootstrap_servers(), blobs.path());
    Env {
        kafka,
        db,
        _blobs: blobs,
        config,
    }
}

fn config(db: &MysqlDatabase, brokers: &str, blobs: &Path) -> Config {
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.blob.url = blobs.display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = brokers.to_owned();
    config.queue.republish_after_ms = 500;
    config.server.http_addr = "127.0.0.1:0".into();
    config.server.grpc_addr = "127.0.0.1:0".into();
    config
}

async fn submit(base: &str, body: Vec<u8>) -> reqwest::Result<serde_json::Value> {
    reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .body(body)
        .send()
        .await?
        .json()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_flows_from_api_through_kafka_to_worker() {
    let env = environment().await;
    let config = &env.config;
    let api = start_api(config).await.unwrap();
    let worker = start_worker(config, engine()).await.unwrap();

    let accepted = submit(&format!("http://{}", api.local_addr), INVOICE.to_vec())
        .await
        .unwrap();
    let id: JobId = accepted["id"].as_str().unwrap().parse().unwrap();
    let job = succeeds_with_the_invoice(&api.store, id).await;
    assert_eq!(job.attempts, 1);

    let ready = reqwest::get(format!("http://{}/readyz", worker.local_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_killed_between_db_write_and_publish_still_completes_the_job() {
    let env = environment().await;
    let config = &env.config;
    let store = env.db.store().await;

    let port = free_port();
    let mut dying_api = spawn_role(
        &["api"],
        config,
        port,
        &[("OCR_FAULT", "exit-after-db-write".into())],
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&base, "/livez", Duration::from_secs(30)).await;
    assert!(
        submit(&base, INVOICE.to_vec()).await.is_err(),
        "the API must die before answering"
    );
    let status = dying_api.wait().unwrap();
    assert!(!status.success());
    let stranded = store
        .ids_in_status(JobStatus::Queued, i64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(
        stranded.len(),
        1,
        "the job row was written, Queued, before the crash"
    );

    // The dead API's relay stopped beating with the job past its watermark:
    // a healthy API's sweeper gives it back to Accepted and republishes it;
    // a worker completes it.
    let api = start_api(config).await.unwrap();
    let worker = start_worker(config, engine()).await.unwrap();
    let job = wait_for_status(
        &store,
        stranded[0],
        JobStatus::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(job.attempts, 1);
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_job_completes_it_exactly_once_after_restart() {
    let env = environment().await;
    let config = &env.config;
    let api = start_api(config).await.unwrap();

    let mut worker = spawn_role(&["worker"], config, free_port(), &[]);
    // A long page keeps the worker busy long enough to be caught mid-job.
    let id = submit_until_processing(&api, invoice_page(8)).await;
    worker.kill().unwrap();
    worker.wait().unwrap();
    let interrupted = api.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        interrupted.status,
        JobStatus::Processing,
        "killed before finishing"
    );
    assert_eq!(interrupted.attempts, 1);

    finishes_on_a_fresh_worker(api, config, id).await;
}

/// Waits for the job to succeed and checks that it read the invoice.
async fn succeeds_with_the_invoice(
    store: &ocr_runtime::storage::JobStore,
    id: JobId,
) -> ocr_runtime::domain::Job {
    let job = wait_for_status(store, id, JobStatus::Succeeded, Duration::from_secs(180)).await;
    let text = job.result.clone().unwrap_or_default();
    assert!(text.contains("Invoice 2026-11-27"), "{text}");
    job
}

async fn wait_for_blob(blobs: &ocr_runtime::storage::BlobStore, key: &str) -> bytes::Bytes {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(bytes) = blobs.get(key).await {
            return bytes;
        }
        assert!(std::time::Instant::now() < deadline, "{key} never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits through the API and waits until a worker has claimed the job.
async fn submit_until_processing(api: &ocr_runtime::roles::Running, image: Vec<u8>) -> JobId {
    let accepted = submit(&format!("http://{}", api.local_addr), image)
        .await
        .unwrap();
    let id: JobId = accepted["id"].as_str().unwrap().parse().unwrap();
    wait_for_status(
        &api.store,
        id,
        JobStatus::Processing,
        Duration::from_secs(120),
    )
    .await;
    id
}

/// Starts a worker process, waits until it finishes the job on its second
/// attempt (the interrupted one counted), and stops everything.
async fn finishes_on_a_fresh_worker(api: ocr_runtime::roles::Running, config: &Config, id: JobId) {
    let mut fresh = spawn_role(&["worker"], config, free_port(), &[]);
    let job = succeeds_with_the_invoice(&api.store, id).await;
    assert_eq!(job.attempts, 2, "the interrupted attempt is counted");
    fresh.kill().unwrap();
    fresh.wait().unwrap();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_whose_input_keeps_failing_is_dead_lettered_and_replayed_once_fixed() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::Message;

    let env = environment().await;
    let mut config = env.config.clone();
    config.worker.max_attempts = 3;
    let api = start_api(&config).await.unwrap();
    let accepted = submit(&format!("http://{}", api.local_addr), INVOICE.to_vec())
        .await
        .unwrap();
    let id: JobId = accepted["id"].as_str().unwrap().parse().unwrap();
    // The input vanishes from the blob store: every attempt fails transiently.
    let stored = api.store.get(id).await.unwrap().unwrap();
    api.blobs.delete(&stored.input_key).await.unwrap();

    let worker = start_worker(&config, engine()).await.unwrap();
    let job = wait_for_status(
        &api.store,
        id,
        JobStatus::DeadLettered,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(job.attempts, 3);
    let error = job.error.unwrap();
    assert!(error.contains("gave up after 3 attempts"), "{error}");

    let dlq: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", env.kafka.bootstrap_servers())
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    dlq.subscribe(&[DEAD]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), dlq.recv())
        .await
        .expect("a dead-letter message")
        .unwrap();
    assert_eq!(message.key(), Some(id.to_string().as_bytes()));

    // The cause is fixed (the input is back): `ocr-runtime dlq replay` sends
    // the job round again, with fresh attempts, and it succeeds.
    api.blobs
        .put(&stored.input_key, bytes::Bytes::from_static(INVOICE))
        .await
        .unwrap();
    let replay = |config: &Config| {
        let output = common::role_command(&["dlq", "replay"], config, free_port(), &[])
            .stdout(std::process::Stdio::piped())
            .output()
            .expect("running ocr-runtime dlq replay");
        assert!(output.status.success(), "dlq replay failed");
        // Logs go to stderr: stdout is the JSON summary alone.
        let stdout = String::from_utf8_lossy(&output.stdout);
        serde_json::from_str::<serde_json::Value>(stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON summary ({e}): {stdout:?}"))
    };
    let first = replay(&config);
    assert_eq!(first["jobs"], 1, "{first}");
    let job = succeeds_with_the_invoice(&api.store, id).await;
    assert_eq!(
        job.attempts, 1,
        "the replayed job starts its attempts afresh"
    );
    // What was replayed is committed: a second run finds nothing.
    let second = replay(&config);
    assert_eq!(
        (second["jobs"].as_u64(), second["skipped"].as_u64()),
        (Some(0), Some(0)),
        "{second}"
    );
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_worker_finish_its_job_before_exiting() {
    let env = environment().await;
    let config = &env.config;
    let api = start_api(config).await.unwrap();
    let worker = spawn_role(&["worker"], config, free_port(), &[]);
    let id = submit_until_processing(&api, invoice_page(8)).await;

    let exit = terminate(worker).await;
    assert!(exit.success(), "worker exited with {exit}");
    let job = api.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        job.status,
        JobStatus::Succeeded,
        "the job in hand was finished"
    );
    assert_eq!(job.attempts, 1);
    api.stop().await;
}

/// `ocr_batch_size` histogram from a role's `/metrics`: (sum, count).
async fn batch_sizes(base: &str) -> (f64, f64) {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("ocr_batch_size_sum "), value("ocr_batch_size_count "))
}

async fn wait_for_lag(brokers: &str, group: &str, topic: &str, expected: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(lag) = group_lag(&KafkaConnection::plaintext(brokers), group, topic).await {
            if lag.total == expected {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lag of {group} on {topic} never reached {expected}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_worker_runs_micro_batches_and_a_bad_image_fails_only_its_job() {
    let env = environment().await;
    let mut config = env.config.clone();
    config.worker.mode = WorkerMode::Batched;
    config.worker.max_batch_size = 8;
    config.worker.max_wait_ms = 300;
    let api = start_api(&config).await.unwrap();
    let base = format!("http://{}", api.local_addr);
    // A backlog before the worker starts, so batches fill up.
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(common::submit_png(&base, INVOICE.to_vec()).await);
    }
    // One input rots in the blob store after it was accepted.
    let bad = ids[3];
    let stored = api.store.get(bad).await.unwrap().unwrap();
    api.blobs
        .put(
            &stored.input_key,
            bytes::Bytes::from_static(b"no longer an image"),
        )
        .await
        .unwrap();

    let worker = start_worker(&config, engine()).await.unwrap();
    let failed =
        wait_for_status(&api.store, bad, JobStatus::Failed, Duration::from_secs(180)).await;
    assert!(failed.error.is_some());
    for id in ids.iter().filter(|id| **id != bad) {
        let job = wait_for_status(
            &api.store,
            *id,
            JobStatus::Succeeded,
            Duration::from_secs(180),
        )
        .await;
        assert!(job.result.unwrap().contains("Invoice 2026-11-27"));
        assert_eq!(job.attempts, 1);
    }
    let (images, calls) = batch_sizes(&format!("http://{}", worker.local_addr)).await;
    assert_eq!(images, 10.0, "every image went through the engine once");
    assert!(
        calls < 10.0,
        "micro-batches hold several images: {calls} engine calls"
    );
    wait_for_lag(&env.kafka.bootstrap_servers(), "ocr-worker", JOBS, 0).await;
    worker.stop().await;
    api.stop().await;
}

/// Workers in writer mode, and writers calling `receiver`.
fn writer_topology(base: &Config, receiver: &WebhookReceiver) -> Config {
    let mut config = base.clone();
    config.worker.mode = WorkerMode::Writer;
    config.writer.webhook_url = receiver.url.clone();
    config.writer.webhook_secret = Secret::new(receiver.secret.clone());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_mode_results_are_persisted_stored_and_announced_once_each() {
    let env = environment().await;
    let receiver = WebhookReceiver::start(200).await;
    let config = writer_topology(&env.config, &receiver);
    let api = start_api(&config).await.unwrap();
    let worker = start_worker(&config, engine()).await.unwrap();
    let writer = start_writer(&config).await.unwrap();
    let base = format!("http://{}", api.local_addr);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(common::submit_png(&base, INVOICE.to_vec()).await);
    }
    for id in &ids {
        let job = wait_for_status(
            &api.store,
            *id,
            JobStatus::Succeeded,
            Duration::from_secs(120),
        )
        .await;
        assert_eq!(job.attempts, 1);
        // The document follows the database write.
        let document = wait_for_blob(&api.blobs, &ocr_runtime::app::persist::result_key(*id)).await;
        let page: serde_json::Value = serde_json::from_slice(&document).unwrap();
        assert!(page["text"]
            .as_str()
            .unwrap()
            .contains("Invoice 2026-11-27"));
    }
    let expected: std::collections::HashSet<String> = ids.iter().map(|id| id.to_string()).collect();
    // The webhook follows the database write and the document.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while receiver.distinct() != expected && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.distinct(), expected, "one webhook per job");
    assert_eq!(
        receiver
            .bad_signatures
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let ready = reqwest::get(format!("http://{}/readyz", writer.local_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    wait_for_lag(&env.kafka.bootstrap_servers(), "ocr-writer", RESULTS, 0).await;
    writer.stop().await;
    worker.stop().await;
    api.stop().await;
}

/// A webhook that keeps failing must not cost a finished result: the job
/// succeeds with its result and document, and the notification goes to the
/// dead-letter topic after `writer.retries` tries. (It used to fail the job
/// and drop the result.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_keeps_failing_is_dead_lettered_and_the_job_still_succeeds() {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    use rdkafka::Message;

    let env = environment().await;
    let receiver = WebhookReceiver::start(500).await;
    let mut config = writer_topology(&env.config, &receiver);
    config.writer.retries = 3;
    config.writer.retry_initial_ms = 20;
    let api = start_api(&config).await.unwrap();
    let worker = start_worker(&config, engine()).await.unwrap();
    let writer = start_writer(&config).await.unwrap();
    let id = common::submit_png(&format!("http://{}", api.local_addr), INVOICE.to_vec()).await;
    succeeds_with_the_invoice(&api.store, id).await;

    let dlq: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", env.kafka.bootstrap_servers())
        .set("group.id", "dlq-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    dlq.subscribe(&[DEAD]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), dlq.recv())
        .await
        .expect("a dead-letter message")
        .unwrap();
    assert_eq!(message.key(), Some(id.to_string().as_bytes()));
    let header = |name: &str| {
        message
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == name))
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(
        header("ocr-dead-letter-kind").as_deref(),
        Some("notification")
    );
    let error = header("ocr-error").unwrap_or_default();
    assert!(
        error.contains("webhook") && error.contains("500"),
        "{error}"
    );
    assert_eq!(
        receiver.deliveries.lock().unwrap().len(),
        3,
        "tried exactly `retries` times"
    );
    let still = api.store.get(id).await.unwrap().unwrap();
    assert_eq!(still.status, JobStatus::Succeeded, "the job is not failed");
    api.blobs
        .get(&ocr_runtime::app::persist::result_key(id))
        .await
        .expect("the result document was written");

    // The receiver is back: `ocr-runtime dlq replay` sends the notification
    // to the writer again, which delivers it once.
    receiver
        .status
        .store(200, std::sync::atomic::Ordering::SeqCst);
    let output = common::role_command(&["dlq", "replay"], &config, free_port(), &[])
        .stdout(std::process::Stdio::piped())
        .output()
        .expect("running ocr-runtime dlq replay");
    assert!(output.status.success(), "dlq replay failed");
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("a JSON summary on stdout");
    assert_eq!(
        (summary["notifications"].as_u64(), summary["jobs"].as_u64()),
        (Some(1), Some(0)),
        "{summary}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while receiver.deliveries.lock().unwrap().len() < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the replayed notification never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        receiver.deliveries.lock().unwrap().len(),
        4,
        "delivered once, not retried after success"
    );
    assert_eq!(
        api.store.get(id).await.unwrap().unwrap().status,
        JobStatus::Succeeded
    );
    writer.stop().await;
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_writer_exits_once_every_result_is_persisted() {
    let env = environment().await;
    let mut config = env.config.clone();
    config.worker.mode = WorkerMode::Writer;
    let brokers = env.kafka.bootstrap_servers();
    let api = start_api(&config).await.unwrap();
    let worker = start_worker(&config, engine()).await.unwrap();
    let base = format!("http://{}", api.local_addr);
    let ids = [
        common::submit_png(&base, INVOICE.to_vec()).await,
        common::submit_png(&base, INVOICE.to_vec()).await,
    ];
    // No writer yet: the results wait on the topic, the jobs stay unfinished.
    wait_for_lag(&brokers, "ocr-writer", RESULTS, 2).await;
    for id in &ids {
        let job = api.store.get(*id).await.unwrap().unwrap();
        assert!(!job.status.is_terminal());
    }
    worker.stop().await;

    let draining = spawn_role(&["writer", "--drain"], &config, free_port(), &[]);
    let exit = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::task::spawn_blocking(move || {
            let mut draining = draining;
            draining.wait().unwrap()
        }),
    )
    .await
    .expect("the draining writer exits by itself")
    .unwrap();
    assert!(exit.success(), "writer exited with {exit}");
    for id in &ids {
        let job = api.store.get(*id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
    }
    wait_for_lag(&brokers, "ocr-writer", RESULTS, 0).await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_command_reports_what_the_worker_group_has_not_consumed() {
    let env = environment().await;
    let config = &env.config;
    let api = start_api(config).await.unwrap();
    let base = format!("http://{}", api.local_addr);
    for _ in 0..3 {
        common::submit_png(&base, INVOICE.to_vec()).await;
    }
    let lag = |config: &Config| {
        let output = Command::new(env!("CARGO_BIN_EXE_ocr-runtime"))
            .args(["lag", "--json"])
            .env("OCR_QUEUE__BROKERS", &config.queue.brokers)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let lag: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        (
            lag["total"].as_i64().unwrap(),
            lag["partitions"].as_array().unwrap().len(),
        )
    };
    // The API answers before it publishes: the three messages arrive shortly after.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lag(config) != (3, 3) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lag(config), (3, 3), "3 jobs waiting, over 3 partitions");

    let worker = start_worker(config, engine()).await.unwrap();
    wait_for_lag(&config.queue.brokers, "ocr-worker", JOBS, 0).await;
    assert_eq!(lag(config).0, 0);
    worker.stop().await;
    api.stop().await;
}

/// Creates the topics a standard pipeline needs, then runs four jobs from the
/// API through the broker to a worker and back, with `security` on every client.
async fn jobs_flow_through(brokers: &str, security: KafkaSecurityConfig) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let connection = KafkaConnection::new(brokers, &security).expect("valid security");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        connection.client_config().create().expect("admin client");
    let created = admin
        .create_topics(
            &[
                NewTopic::new(JOBS, 3, TopicReplication::Fixed(1)),
                NewTopic::new(DEAD, 1, TopicReplication::Fixed(1)),
            ],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("CreateTopics answered");
    for result in created {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
    let db = MysqlDatabase::create().await;
    let blobs = tempfile::tempdir().unwrap();
    let mut config = config(&db, brokers, blobs.path());
    config.queue.security = security;
    let api = start_api(&config).await.unwrap();
    let worker = start_worker(&config, engine()).await.unwrap();
    let base = format!("http://{}", api.local_addr);

    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(common::submit_png(&base, INVOICE.to_vec()).await);
    }
    for id in ids {
        let job = wait_for_status(
            &api.store,
            id,
            JobStatus::Succeeded,
            Duration::from_secs(120),
        )
        .await;
        assert_eq!(job.attempts, 1, "{id} was claimed more than once");
        let text = job.result.unwrap_or_default();
        assert!(text.contains("Total: 1,234.50 EUR"), "{text}");
    }
    let lag = group_lag(&connection, "ocr-worker", JOBS)
        .await
        .expect("lag");
    assert_eq!(lag.total, 0, "{lag:?}");
    worker.stop().await;
    api.stop().await;
}

/// The API → Kafka → worker path on a real broker process (Tansu) instead of
/// the in-process mock: topic creation, the idempotent producer, the group
/// join and manual commits against another implementation of the protocol.
/// One consumer per group, as Tansu's multi-member rebalancing is not
/// reliable enough to gate on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_flow_through_a_real_broker_process() {
    let broker = RealBroker::start();
    jobs_flow_through(&broker.bootstrap_servers, KafkaSecurityConfig::default()).await;
}

/// The same against a broker that requires SCRAM-SHA-512: the configured
/// credentials reach every client (producer, consumers, lag probe), and a
/// wrong password is refused rather than silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_flow_through_a_broker_that_requires_scram() {
    let broker = RealBroker::start_with_scram_user("ocr", "s3cret-pa55");
    let security = |password: &str| KafkaSecurityConfig {
        protocol: SecurityProtocol::SaslPlaintext,
        sasl_mechanism: SaslMechanism::ScramSha512,
        sasl_username: "ocr".into(),
        sasl_password: Secret::new(password),
        ..KafkaSecurityConfig::default()
    };
    let wrong = KafkaConnection::new(&broker.bootstrap_servers, &security("guess")).unwrap();
    let refused = group_lag(&wrong, "ocr-worker", JOBS).await;
    assert!(refused.is_err(), "a wrong password got {refused:?}");
    jobs_flow_through(&broker.bootstrap_servers, security("s3cret-pa55")).await;
}

/// A wedged engine (a GPU call that never returns) leaves a process that
/// serves HTTP and does nothing: `/livez` must fail so Kubernetes restarts
/// it, and the job must finish on the next worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_fails_livez_and_its_job_finishes_on_a_fresh_worker() {
    let env = environment().await;
    let config = &env.config;
    let api = start_api(config).await.unwrap();
    let port = free_port();
    let mut hung = spawn_role(
        &["worker"],
        config,
        port,
        &[
            ("OCR_FAULT", "hang-inference".into()),
            ("OCR_WORKER__INFERENCE_TIMEOUT_MS", "1500".into()),
        ],
    );
    let worker_base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&worker_base, "/livez", Duration::from_secs(60)).await;
    let id = submit_until_processing(&api, INVOICE.to_vec()).await;
    assert_eq!(
        reqwest::get(format!("{worker_base}/livez"))
            .await
            .unwrap()
            .status(),
        200,
        "alive while the inference is young"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let answer = reqwest::get(format!("{worker_base}/livez")).await.unwrap();
        if answer.status() == 503 {
            break answer.text().await.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/livez never failed while the engine hung"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(reason.contains("inference_timeout"), "{reason}");

    // What the kubelet does on a failed liveness probe, then the new pod.
    hung.kill().unwrap();
    hung.wait().unwrap();
    finishes_on_a_fresh_worker(api, config, id).await;
}

/// 64 concurrent uploads of a 40-megapixel page (600 KB of PNG, 120 MB of
/// pixels each): an API that decodes to check them needs gigabytes (2.4 GB
/// measured before it stopped decoding). It now walks their framing only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_40_megapixel_uploads_keeps_the_api_small_and_quick() {
    const UPLOADS: usize = 64;
    const PEAK_RSS_LIMIT: u64 = 512 * 1024 * 1024;
    let env = environment().await;
    let port = free_port();
    let mut api = spawn_role(&["api"], &env.config, port, &[]);
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&base, "/readyz", Duration::from_secs(60)).await;
    let page = common::blank_png(6_300, 6_300);
    let client = reqwest::Client::new();
    let answers = futures::future::join_all((0..UPLOADS).map(|_| {
        let request = client
            .post(format!("{base}/v1/jobs"))
            .header("content-type", "image/png")
            .body(page.clone());
        async move {
            let started = std::time::Instant::now();
            let status = request.send().await.expect("an answer").status();
            (status.as_u16(), started.elapsed())
        }
    }))
    .await;
    let peak = common::peak_rss_bytes(api.id());
    api.kill().unwrap();
    api.wait().unwrap();
    let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
    println!(
        "{UPLOADS} uploads of {} bytes: peak RSS {} MiB, slowest answer {slowest:?}",
        page.len(),
        peak >> 20
    );
    assert!(
        answers.iter().all(|(status, _)| *status == 202),
        "{answers:?}"
    );
    assert!(peak < PEAK_RSS_LIMIT, "peak RSS {} MiB", peak >> 20);
    // Decoding took 6.6-7 s per request here; the bound leaves room for a busy CI machine.
    assert!(
        slowest < Duration::from_secs(5),
        "slowest answer {slowest:?}"
    );
}

/// Jobs whose message is gone never finish on their own: one `Queued` whose
/// message was lost, one `Processing` whose worker died without its message
/// coming back. The API's sweeper republishes both and a worker finishes
/// them, the dead worker's attempt still counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_message_is_gone_are_republished_and_finish() {
    use ocr_runtime::domain::NewJob;
    use ocr_runtime::storage::blob::input_key;
    use ocr_runtime::storage::jobs::Changes;
    use ocr_runtime::storage::{now_ms, BlobStore};
    let env = environment().await;
    let mut config = env.config.clone();
    // Above the invoice's inference time even on a loaded machine, so that the
    // revived jobs are not revived twice.
    config.queue.stale_after_ms = 3_000;
    let store = env.db.store().await;
    let blobs = BlobStore::from_url(&config.blob.url).unwrap();
    let long_ago = now_ms() - 600_000;
    let mut stranded = Vec::new();
    for _ in 0..2 {
        let id = JobId::new();
        let key = input_key(id);
        blobs
            .put(&key, bytes::Bytes::from_static(INVOICE))
            .await
            .unwrap();
        let job = NewJob {
            id,
            client_id: "test".into(),
            input_key: key,
            content_type: "image/png".into(),
            input_sha256: "0".repeat(64),
            input_bytes: INVOICE.len() as u64,
            idempotency: None,
            relay: None,
        };
        store.insert(&job, long_ago).await.unwrap();
        store
            .transition(
                id,
                JobStatus::Accepted,
                JobStatus::Queued,
                None,
                Changes::default(),
                long_ago,
            )
            .await
            .unwrap();
        stranded.push(id);
    }
    // The second was claimed by a worker that then died.
    store
        .transition(
            stranded[1],
            JobStatus::Queued,
            JobStatus::Processing,
            Some(0),
            Changes {
                count_attempt: true,
                ..Changes::default()
            },
            long_ago,
        )
        .await
        .unwrap();

    let api = start_api(&config).await.unwrap();
    let worker = start_worker(&config, engine()).await.unwrap();
    let lost = wait_for_status(
        &store,
        stranded[0],
        JobStatus::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(lost.attempts, 1);
    let orphaned = wait_for_status(
        &store,
        stranded[1],
        JobStatus::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(orphaned.attempts, 2, "the dead worker's attempt is counted");
    assert!(orphaned.result.unwrap().contains("Invoice 2026-11-27"));
    worker.stop().await;
    api.stop().await;
}

/// A worker that a poisonous image kills (a real abort, restarted as the
/// kubelet would), in batched mode and in writer mode: its batch-mates
/// finish, and the image alone is dead-lettered at `worker.max_attempts`
/// instead of killing the worker forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_crashes_a_batched_worker_is_isolated_and_dead_lettered() {
    crashing_image_is_isolated(WorkerMode::Batched).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_crashes_a_writer_mode_worker_is_isolated_and_dead_lettered() {
    crashing_image_is_isolated(WorkerMode::Writer).await;
}

async fn crashing_image_is_isolated(mode: WorkerMode) {
    use ocr_runtime::app::fault::CRASH_MARKER;
    let env = environment().await;
    let config = &env.config;
    let api = start_api(config).await.unwrap();
    let writer = match mode {
        WorkerMode::Writer => Some(start_writer(config).await.unwrap()),
        _ => None,
    };
    let base = format!("http://{}", api.local_addr);
    let mut poison = INVOICE.to_vec();
    poison.extend_from_slice(CRASH_MARKER);
    let poisoned = common::submit_png(&base, poison).await;
    let mut mates = Vec::new();
    for _ in 0..4 {
        mates.push(common::submit_png(&base, INVOICE.to_vec()).await);
    }
    let journal = tempfile::tempdir().unwrap();
    let worker_env = [
        ("OCR_WORKER__MODE", mode.as_str().to_owned()),
        ("OCR_WORKER__MAX_BATCH_SIZE", "8".to_owned()),
        ("OCR_WORKER__MAX_WAIT_MS", "300".to_owned()),
        ("OCR_WORKER__MAX_ATTEMPTS", "3".to_owned()),
        (
            "OCR_WORKER__CRASH_JOURNAL_DIR",
            journal.path().display().to_string(),
        ),
        ("OCR_FAULT", "crash-on-marker".to_owned()),
    ];
    let all_final = || async {
        let mut done = true;
        for id in mates.iter().chain([&poisoned]) {
            let job = api.store.get(*id).await.unwrap().unwrap();
            done &= job.status.is_terminal();
        }
        done
    };
    let mut crashes = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut worker = spawn_role(&["worker"], config, free_port(), &worker_env);
    while !all_final().await {
        assert!(std::time::Instant::now() < deadline, "jobs never finished");
        if let Some(status) = worker.try_wait().unwrap() {
            assert!(!status.success(), "the worker exited cleanly mid-run");
            crashes += 1;
            assert!(crashes <= 5, "the worker keeps crashing");
            worker = spawn_role(&["worker"], config, free_port(), &worker_env);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = terminate(worker).await;
    assert!(crashes >= 1, "the poisonous image never crashed the worker");
    let dead = api.store.get(poisoned).await.unwrap().unwrap();
    assert_eq!(dead.status, JobStatus::DeadLettered, "{:?}", dead.error);
    for id in mates {
        let job = api.store.get(id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Succeeded, "{:?}", job.error);
        if mode == WorkerMode::Batched {
            assert!(
                job.attempts <= 2,
                "a batch-mate was charged {} attempts",
                job.attempts
            );
        }
    }
    if mode == WorkerMode::Batched {
        assert_eq!(dead.attempts, 3);
    }
    if let Some(writer) = writer {
        writer.stop().await;
    }
    api.stop().await;
}
