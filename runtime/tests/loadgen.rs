//! `ocr-runtime loadgen` as a user runs it, against a real API: closed and
//! open loop over HTTP, refusals counted, and gRPC with each job followed
//! to its result by the real engine, and a careful load (idempotency keys,
//! retries, stopped by SIGINT) across an API restart. What it reports is
//! checked against the database.

mod common;

use common::{free_port, role_command, MysqlDatabase, INVOICE};
use ocr_runtime::config::{AuthMode, Config, QueueKind};
use ocr_runtime::domain::tenant::{NewKey, Tenant};
use ocr_runtime::storage::JobStore;
use rdkafka::mocking::MockCluster;
use std::path::Path;
use std::process::Stdio;

fn mock_kafka() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock Kafka cluster");
    let jobs = Config::default().queue.jobs_topic;
    cluster.create_topic(&jobs, 1, 1).expect("jobs topic");
    cluster
}

/// Runs `ocr-runtime loadgen ARGS --json` with `key` in `OCR_API_KEY`; the summary.
fn loadgen(config: &Config, key: Option<&str>, args: &[&str]) -> serde_json::Value {
    let mut command_line = vec!["loadgen", "--json"];
    command_line.extend_from_slice(args);
    let extra: Vec<(&str, String)> = key
        .map(|key| vec![("OCR_API_KEY", key.to_owned())])
        .unwrap_or_default();
    let output = role_command(&command_line, config, free_port(), &extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("running ocr-runtime loadgen");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadgen {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

async fn jobs_of(store: &JobStore) -> u64 {
    store.count_all().await.unwrap()
}

fn image_file(dir: &Path) -> String {
    let path = dir.join("invoice.png");
    std::fs::write(&path, INVOICE).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_and_open_loops_send_what_they_say_and_count_refusals() {
    let kafka = mock_kafka();
    let db = MysqlDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.blob.url = dir.path().join("blobs").display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = kafka.bootstrap_servers();
    config.server.http_addr = "127.0.0.1:0".into();
    config.server.grpc_addr = "127.0.0.1:0".into();
    config.auth.mode = AuthMode::Required;
    let api = ocr_runtime::roles::start_api(&config).await.unwrap();
    let key = NewKey::generate().unwrap();
    api.store
        .create_key(&Tenant::parse("load").unwrap(), &key, 0)
        .await
        .unwrap();
    let url = format!("http://{}", api.local_addr);
    let image = image_file(dir.path());

    let closed = loadgen(
        &config,
        Some(&key.token),
        &[
            "--url",
            &url,
            "--image",
            &image,
            "--requests",
            "30",
            "--connections",
            "4",
        ],
    );
    assert_eq!(closed["pacing"], "closed");
    assert_eq!(
        (closed["sent"].as_u64(), closed["accepted"].as_u64()),
        (Some(30), Some(30)),
        "{closed}"
    );
    assert_eq!(closed["accept_latency_ms"]["count"], 30);
    assert!(closed["accept_latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert_eq!(
        jobs_of(&api.store).await,
        30,
        "one job per accepted request"
    );

    // 40/s for one second: 40 requests, due every 25 ms.
    let open = loadgen(
        &config,
        Some(&key.token),
        &[
            "--url",
            &url,
            "--image",
            &image,
            "--rate",
            "40",
            "--duration",
            "1s",
        ],
    );
    assert_eq!(open["pacing"], "open");
    assert_eq!(
        (open["sent"].as_u64(), open["accepted"].as_u64()),
        (Some(40), Some(40)),
        "{open}"
    );
    let elapsed = open["elapsed_seconds"].as_f64().unwrap();
    assert!((0.9..3.0).contains(&elapsed), "{open}");
    assert_eq!(jobs_of(&api.store).await, 70);

    // Without a key every request is refused, and counted as such.
    let refused = loadgen(
        &config,
        None,
        &["--url", &url, "--image", &image, "--requests", "5"],
    );
    assert_eq!(refused["accepted"], 0, "{refused}");
    assert_eq!(refused["refused"]["401"], 5, "{refused}");
    assert_eq!(jobs_of(&api.store).await, 70);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_load_followed_to_the_end_reports_every_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.database.url = format!("sqlite://{}?mode=rwc", dir.path().join("ocr.db").display());
    config.blob.url = dir.path().join("blobs").display().to_string();
    config.server.http_addr = "127.0.0.1:0".into();
    config.server.grpc_addr = "127.0.0.1:0".into();
    config.queue.kind = QueueKind::Memory;
    let server = ocr_runtime::standalone::start(&config, common::engine())
        .await
        .unwrap();
    let grpc = format!("http://{}", server.front_ends.expect("gRPC").grpc_addr);
    let image = image_file(dir.path());
    let summary = loadgen(
        &config,
        None,
        &[
            "--grpc",
            "--url",
            &grpc,
            "--image",
            &image,
            "--requests",
            "3",
            "--connections",
            "1",
            "--follow",
            "3m",
        ],
    );
    assert_eq!(summary["protocol"], "grpc");
    assert_eq!(summary["accepted"], 3, "{summary}");
    assert_eq!(summary["finished"]["Succeeded"], 3, "{summary}");
    let e2e = &summary["end_to_end_latency_ms"];
    assert_eq!(e2e["count"], 3, "{summary}");
    assert!(
        e2e["p50"].as_f64().unwrap() > summary["accept_latency_ms"]["p50"].as_f64().unwrap(),
        "a job ends after it is accepted: {summary}"
    );
    server.stop().await;
}

/// A careful load across an API restart: every job keeps its idempotency
/// key through its retries, so the jobs the API went down under are sent
/// again and none is created twice; SIGINT stops the load, which still
/// waits for its answers; `--jobs-out` lists every accepted job as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_keys_survive_an_api_restart_without_duplicates() {
    careful_load_across_an_api_restart(false).await;
}

/// The same over gRPC: the load generator opens a new connection when the
/// API comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_retries_with_keys_survive_an_api_restart_without_duplicates() {
    careful_load_across_an_api_restart(true).await;
}

async fn careful_load_across_an_api_restart(grpc: bool) {
    let kafka = mock_kafka();
    let db = MysqlDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.blob.url = dir.path().join("blobs").display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = kafka.bootstrap_servers();
    let grpc_port = free_port();
    config.server.http_addr = format!("127.0.0.1:{port}");
    config.server.grpc_addr = format!("127.0.0.1:{grpc_port}");
    let api = ocr_runtime::roles::start_api(&config).await.unwrap();
    let image = image_file(dir.path());
    let journal = dir.path().join("jobs.jsonl");
    let url = format!("http://127.0.0.1:{}", if grpc { grpc_port } else { port });
    let journal_path = journal.display().to_string();
    let mut args = vec![
        "loadgen",
        "--json",
        "--url",
        &url,
        "--image",
        &image,
        "--rate",
        "40",
        "--until-interrupted",
        "--retry-with-keys",
        "careful",
        "--jobs-out",
        &journal_path,
    ];
    if grpc {
        args.push("--grpc");
    }
    let load = role_command(&args, &config, free_port(), &[])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting loadgen");

    let journaled = || {
        std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.ends_with('}'))
            .count()
    };
    let wait_for = |n: usize| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while journaled() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "fewer than {n} jobs accepted"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    wait_for(20).await;
    api.stop().await;
    // Down for a second: about 40 jobs wait for it, retried every 300 ms.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let api = ocr_runtime::roles::start_api(&config).await.unwrap();
    let before = journaled();
    wait_for(before + 40).await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &load.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || load.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        output.status.success(),
        "loadgen exited with {}",
        output.status
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("a JSON summary on stdout");

    let sent = summary["sent"].as_u64().unwrap();
    assert_eq!(summary["accepted"].as_u64(), Some(sent), "{summary}");
    assert!(
        summary["retries"].as_u64().unwrap() > 0,
        "the outage was retried: {summary}"
    );
    assert_eq!(summary["transport_errors"], 0, "{summary}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&journal)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines.len() as u64,
        sent,
        "one journal line per accepted job"
    );
    let keys: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l["key"].as_str().unwrap()).collect();
    let ids: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert_eq!((keys.len(), ids.len()), (lines.len(), lines.len()));
    assert!(keys.iter().all(|k| k.starts_with("careful-")));
    assert_eq!(
        jobs_of(&api.store).await,
        sent,
        "every job once in the database, none twice"
    );
    api.stop().await;
}
