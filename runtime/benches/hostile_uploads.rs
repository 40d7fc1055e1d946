//! `ocr-runtime api` under a flood of 40-megapixel uploads: UPLOADS
//! concurrent POSTs of a 6300×6300 page of one colour (600 KB of PNG,
//! 120 MB of pixels once decoded), against MariaDB and a Kafka protocol
//! broker (librdkafka's mock cluster). Prints how the requests were answered,
//! their latency, and the API's resident memory before the flood (the
//! baseline of the same run) and at its peak, against the goals of 512 MB and
//! 1 s per answer.
//!
//!     cargo bench -p ocr-runtime --bench hostile_uploads [-- UPLOADS]
//!
//! Default 64 uploads. Needs MariaDB at 127.0.0.1:3306 (or `OCR_TEST_MYSQL_URL`).

#[path = "../tests/common/mod.rs"]
mod common;

use ocr_runtime::config::{Config, QueueKind};
use rdkafka::mocking::MockCluster;
use std::process::Stdio;
use std::time::{Duration, Instant};

const PEAK_GOAL: u64 = 512 * 1024 * 1024;
const ANSWER_GOAL: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let uploads: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(64);
    let kafka = MockCluster::new(1)?;
    kafka.create_topic("ocr.jobs", 1, 1)?;
    let db = common::MysqlDatabase::create().await;
    let blobs = tempfile::tempdir()?;
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.blob.url = blobs.path().display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = kafka.bootstrap_servers();
    let port = common::free_port();
    let mut api = common::role_command(&["api"], &config, port, &[])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    common::wait_http_ok(&base, "/readyz", Duration::from_secs(60)).await;
    let page = common::blank_png(6_300, 6_300);
    let client = reqwest::Client::new();
    // One request first, so the baseline includes warmed-up pools.
    client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .body(page.clone())
        .send()
        .await?;
    let idle = common::rss_bytes(api.id());

    let started = Instant::now();
    let answers = futures::future::join_all((0..uploads).map(|_| {
        let request = client
            .post(format!("{base}/v1/jobs"))
            .header("content-type", "image/png")
            .body(page.clone());
        async move {
            let sent = Instant::now();
            let status = request
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            (status, sent.elapsed())
        }
    }))
    .await;
    let wall = started.elapsed();
    let peak = common::peak_rss_bytes(api.id());
    api.kill()?;
    api.wait()?;

    let mut latencies: Vec<Duration> = answers.iter().map(|(_, took)| *took).collect();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let count = |status: u16| answers.iter().filter(|(s, _)| *s == status).count();
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!(
        "{uploads} concurrent uploads of a 6300x6300 PNG ({} bytes) in {wall:.2?}",
        page.len()
    );
    println!(
        "  answers: {} accepted (202), {} shed (503), {} other",
        count(202),
        count(503),
        uploads - count(202) - count(503)
    );
    println!(
        "  latency: p50 {:.1?}  p99 {:.1?}  max {:.1?}  (goal: every answer within {ANSWER_GOAL:?}: {})",
        at(0.5),
        at(0.99),
        at(1.0),
        if at(1.0) <= ANSWER_GOAL { "met" } else { "MISSED" }
    );
    println!(
        "  API resident memory: {:.0} MiB before, {:.0} MiB peak, {:.2}x the baseline (goal: peak under {:.0} MiB: {})",
        mib(idle),
        mib(peak),
        peak as f64 / idle.max(1) as f64,
        mib(PEAK_GOAL),
        if peak < PEAK_GOAL { "met" } else { "MISSED" }
    );
    Ok(())
}
