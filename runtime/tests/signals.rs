//! The signals the operator's advisor reads, as a real worker process serves
//! them: `ocr-runtime api` and `ocr-runtime worker` on MariaDB and a Kafka
//! protocol broker (librdkafka's mock cluster); the worker's `/metrics` page
//! is read with the contract's own parser, the one the operator uses.

mod common;

use common::{free_port, spawn_role, terminate, wait_for_status, wait_http_ok, MysqlDatabase};
use ocr_contract::signals::{self, PodSample};
use ocr_runtime::config::{Config, QueueKind};
use ocr_runtime::domain::JobStatus;
use rdkafka::mocking::MockCluster;
use std::time::{Duration, Instant};

const JOBS: usize = 3;

async fn metrics_page(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .expect("scraping the worker")
        .text()
        .await
        .expect("a metrics page")
}

/// The value of one series, e.g. `ocr_job_latency_seconds_count{status="succeeded"}`.
fn series(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_exports_busy_time_store_timings_latency_and_lag_trend() {
    let kafka = MockCluster::new(1).expect("mock Kafka cluster");
    for topic in ["ocr.jobs", "ocr.dead-letter"] {
        kafka.create_topic(topic, 1, 1).expect("a topic");
    }
    let db = MysqlDatabase::create().await;
    let store = db.store().await;
    let blobs = tempfile::tempdir().expect("a blob directory");
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.blob.url = blobs.path().display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = kafka.bootstrap_servers();

    let api_port = free_port();
    let worker_port = free_port();
    let api = spawn_role(&["api"], &config, api_port, &[]);
    let worker = spawn_role(&["worker"], &config, worker_port, &[]);
    let base = format!("http://127.0.0.1:{api_port}");
    let worker_base = format!("http://127.0.0.1:{worker_port}");
    wait_http_ok(&base, "/readyz", Duration::from_secs(60)).await;
    wait_http_ok(&worker_base, "/readyz", Duration::from_secs(60)).await;
    let started = Instant::now();

    let mut ids = Vec::new();
    for _ in 0..JOBS {
        ids.push(common::submit_png(&base, common::INVOICE.to_vec()).await);
    }
    for id in &ids {
        wait_for_status(&store, *id, JobStatus::Succeeded, Duration::from_secs(120)).await;
    }

    let page = metrics_page(&worker_base).await;
    let sample = PodSample::parse(&page).expect("the worker's page parses");
    let busy = sample
        .engine_busy_seconds
        .expect("the engine's busy time is exported");
    assert!(
        busy > 0.0 && busy < started.elapsed().as_secs_f64(),
        "busy {busy} s of {:?}",
        started.elapsed()
    );
    let finish = sample
        .store_finish
        .expect("the final writes of the jobs are timed");
    assert_eq!(finish.count, JOBS as f64, "one final write per job");
    assert!(finish.sum > 0.0);
    // Every job's acceptance-to-success latency, each shorter than the test so far.
    let latency = signals::exposed(signals::JOB_LATENCY_SECONDS);
    assert_eq!(
        series(&page, &format!("{latency}_count{{status=\"Succeeded\"}}")),
        Some(JOBS as f64),
        "{page}"
    );
    let latency_sum =
        series(&page, &format!("{latency}_sum{{status=\"Succeeded\"}}")).expect("a latency sum");
    assert!(latency_sum > 0.0 && latency_sum < JOBS as f64 * started.elapsed().as_secs_f64());
    // Claims are timed apart from final writes.
    let store_metric = signals::exposed(signals::STORE_SECONDS);
    assert!(
        series(&page, &format!("{store_metric}_count{{op=\"claim\"}}")) >= Some(JOBS as f64),
        "{page}"
    );
    // Every runtime metric the chart's dashboard and alert rules use exists
    // (the operator's own are checked in operator/tests/dashboards.rs).
    let exported = signals::families(&page);
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ocr-operator");
    for file in [
        "dashboards/ocr-pipelines.json",
        "templates/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(chart.join(file)).expect("a chart file");
        let mentioned = signals::mentioned_metrics(&text);
        assert!(!mentioned.is_empty(), "{file} uses no metric");
        let missing: Vec<_> = mentioned
            .iter()
            .filter(|m| !m.starts_with("ocr_operator_") && !exported.contains(*m))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics no role exports: {missing:?}"
        );
    }
    // A GPU shows only where NVML loads; this machine's worker runs on the CPU.
    eprintln!("GPU utilisation: {:?}", sample.gpu_utilization);

    // The lag's trend appears once the readings (every 5 s) span a quarter of
    // the window; with every job done it settles at no growth (the burst of
    // submissions may still be in the window at first).
    let growth = format!(
        "{}{{topic=\"ocr.jobs\",group=\"ocr-worker\"}}",
        signals::exposed(signals::CONSUMER_LAG_GROWTH)
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = None;
    loop {
        seen = series(&metrics_page(&worker_base).await, &growth).or(seen);
        if seen.is_some_and(|trend| trend <= 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{growth} is {seen:?} long after the last job finished"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    for child in [worker, api] {
        assert!(terminate(child).await.success());
    }
}
