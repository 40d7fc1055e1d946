//! Accept-path benchmark: how many jobs per second the API takes at
//! saturation, the p50/p99 latency of `POST /v1/jobs`, and how much of that
//! time is MySQL and Kafka.
//!
//!     cargo bench -p ocr-runtime --bench accept [-- SECONDS CLIENTS]
//!
//! Needs MariaDB at 127.0.0.1:3306 (or `OCR_TEST_MYSQL_URL`). Kafka is
//! librdkafka's mock cluster on loopback: the real protocol, but an
//! in-process broker, so broker-side disk and replication costs are absent.
//! The same load runs twice, with Kafka and with the in-process queue as the
//! baseline, so the ratio shows what publishing costs.

use ocr_runtime::api::http::{router, HttpState};
use ocr_runtime::app::submit::{Fault, Submitter};
use ocr_runtime::config::LimitsConfig;
use ocr_runtime::metrics::{Metrics, SubmitStage};
use ocr_runtime::queue::kafka::{KafkaConnection, KafkaPublisher};
use ocr_runtime::queue::{memory, JobPublisher};
use ocr_runtime::storage::{BlobStore, JobStore};
use rdkafka::mocking::MockCluster;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Outcome {
    accepted: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    stages: Vec<(SubmitStage, Duration)>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn sample_png() -> Vec<u8> {
    let image = image::RgbImage::from_fn(640, 200, |x, y| {
        let v = if (x / 8 + y / 8) % 2 == 0 { 20 } else { 235 };
        image::Rgb([v, v, v])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode sample");
    out.into_inner()
}

async fn run_load(
    mysql_server: &str,
    publisher: Arc<dyn JobPublisher>,
    seconds: u64,
    clients: usize,
) -> anyhow::Result<Outcome> {
    use sqlx::Connection;
    let name = format!("ocr_bench_{}", uuid::Uuid::now_v7().simple());
    let mut admin = sqlx::MySqlConnection::connect(mysql_server).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    let store = JobStore::connect(&format!("{mysql_server}/{name}"), 32).await?;
    store.migrate().await?;
    let blob_dir = tempfile::tempdir()?;
    let metrics = Metrics::new();
    let submitter = Submitter {
        store,
        blobs: BlobStore::from_url(&blob_dir.path().display().to_string())?,
        publisher,
        limits: LimitsConfig::default(),
        fault: Fault::None,
        publish_wait: ocr_runtime::config::QueueConfig::default().publish_wait(),
        guard: None,
        metrics: metrics.clone(),
    };
    let app = router(HttpState::new(submitter, metrics.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/jobs", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let body = bytes::Bytes::from(sample_png());
    let client = reqwest::Client::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("content-type", "image/png")
                    .body(body.clone())
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status() == 202 => latencies.push(sent.elapsed()),
                    Ok(r) => eprintln!("unexpected status {}", r.status()),
                    Err(e) => eprintln!("request failed: {e}"),
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await?);
    }
    let elapsed = started.elapsed();
    server.abort();
    sqlx::query(&format!("DROP DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    latencies.sort();
    Ok(Outcome {
        accepted: latencies.len(),
        elapsed,
        latencies,
        stages: SubmitStage::ALL
            .iter()
            .map(|s| (*s, metrics.stage_total(*s)))
            .collect(),
    })
}

fn report(label: &str, outcome: &Outcome) -> f64 {
    let rate = outcome.accepted as f64 / outcome.elapsed.as_secs_f64();
    let server_total: Duration = outcome.stages.iter().map(|(_, d)| *d).sum();
    println!(
        "{label:<22} {:>8.1} jobs/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} jobs in {:.1} s)",
        rate,
        percentile(&outcome.latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&outcome.latencies, 0.99).as_secs_f64() * 1e3,
        outcome.accepted,
        outcome.elapsed.as_secs_f64()
    );
    for (stage, total) in &outcome.stages {
        let per_job = total.as_secs_f64() * 1e3 / outcome.accepted.max(1) as f64;
        let share = 100.0 * total.as_secs_f64() / server_total.as_secs_f64().max(1e-9);
        println!(
            "    {:<9} {per_job:>7.3} ms/job  {share:>5.1} % of server time",
            stage.as_str()
        );
    }
    rate
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let seconds: u64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(10);
    let clients: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(32);
    let mysql = std::env::var("OCR_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        println!(
            "accept benchmark: {clients} concurrent clients, {seconds} s per run, 640x200 PNG"
        );
        let (memory_publisher, _queue) = memory::channel();
        let baseline = run_load(&mysql, Arc::new(memory_publisher), seconds, clients).await?;
        let baseline_rate = report("MySQL + memory queue", &baseline);

        let cluster = MockCluster::new(1)?;
        cluster.create_topic("ocr.jobs", 6, 1)?;
        let kafka = KafkaPublisher::new(
            &KafkaConnection::plaintext(&cluster.bootstrap_servers()),
            "ocr.jobs",
        )?;
        let with_kafka = run_load(&mysql, Arc::new(kafka), seconds, clients).await?;
        let kafka_rate = report("MySQL + Kafka (mock)", &with_kafka);
        println!(
            "ratio Kafka / memory-queue baseline: {:.2}x",
            kafka_rate / baseline_rate.max(1e-9)
        );
        Ok(())
    })
}
