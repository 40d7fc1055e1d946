//! The cluster topology on real MariaDB and a Kafka protocol broker
//! (librdkafka's mock cluster on loopback): jobs flow API -> Kafka -> worker,
//! and crashes of either process never lose or duplicate a job.

mod common;

use common::{engine, free_port, invoice_page, wait_for_status, MysqlDatabase, INVOICE};
use ocr_runtime::config::{Config, QueueKind};
use ocr_runtime::domain::{JobId, JobStatus};
use ocr_runtime::roles::{start_api, start_worker};
use rdkafka::mocking::MockCluster;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const JOBS: &str = "ocr.jobs";
const DEAD: &str = "ocr.dead-letter";

fn mock_kafka() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock Kafka cluster");
    cluster.create_topic(JOBS, 3, 1).expect("jobs topic");
    cluster.create_topic(DEAD, 1, 1).expect("dead-letter topic");
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

/// Runs `ocr-runtime ROLE` as a separate process configured through the
/// environment, exactly as a Deployment would.
fn spawn_role(role: &str, config: &Config, http_port: u16, fault: Option<&str>) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ocr-runtime"));
    command
        .arg(role)
        .env("OCR_DATABASE__URL", &config.database.url)
        .env("OCR_BLOB__URL", &config.blob.url)
        .env("OCR_QUEUE__KIND", "kafka")
        .env("OCR_QUEUE__BROKERS", &config.queue.brokers)
        .env(
            "OCR_QUEUE__REPUBLISH_AFTER_MS",
            config.queue.republish_after_ms.to_string(),
        )
        .env("OCR_SERVER__HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env("OCR_SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(fault) = fault {
        command.env("OCR_FAULT", fault);
    }
    command.spawn().expect("spawning ocr-runtime")
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

async fn wait_http(base: &str) {
    for _ in 0..300 {
        if reqwest::get(format!("{base}/livez")).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{base} never came up");
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
    let job = wait_for_status(
        &api.store,
        id,
        JobStatus::Succeeded,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(job.attempts, 1);
    let text = job.result.unwrap();
    assert!(text.contains("Invoice 2026-11-27"), "{text}");

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
    let mut dying_api = spawn_role("api", config, port, Some("exit-after-db-write"));
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base).await;
    assert!(
        submit(&base, INVOICE.to_vec()).await.is_err(),
        "the API must die before answering"
    );
    let status = dying_api.wait().unwrap();
    assert!(!status.success());
    let stranded = store
        .ids_in_status(JobStatus::Accepted, i64::MAX, 10)
        .await
        .unwrap();
    assert_eq!(
        stranded.len(),
        1,
        "the job row was written before the crash"
    );

    // A healthy API's sweeper republishes it; a worker completes it.
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

    let mut worker = spawn_role("worker", config, free_port(), None);
    // A long page keeps the worker busy long enough to be caught mid-job.
    let accepted = submit(&format!("http://{}", api.local_addr), invoice_page(8))
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
    worker.kill().unwrap();
    worker.wait().unwrap();
    let interrupted = api.store.get(id).await.unwrap().unwrap();
    assert_eq!(
        interrupted.status,
        JobStatus::Processing,
        "killed before finishing"
    );
    assert_eq!(interrupted.attempts, 1);

    let mut restarted = spawn_role("worker", config, free_port(), None);
    let job = wait_for_status(
        &api.store,
        id,
        JobStatus::Succeeded,
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(job.attempts, 2, "the interrupted attempt is counted");
    assert!(job.result.unwrap().contains("Invoice 2026-11-27"));
    restarted.kill().unwrap();
    restarted.wait().unwrap();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_whose_input_keeps_failing_is_dead_lettered_after_max_attempts() {
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
    worker.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_worker_finish_its_job_before_exiting() {
    let env = environment().await;
    let config = &env.config;
    let api = start_api(config).await.unwrap();
    let mut worker = spawn_role("worker", config, free_port(), None);
    let accepted = submit(&format!("http://{}", api.local_addr), invoice_page(8))
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

    let signalled = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let exit = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
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
