//! Worker throughput, standard vs batched: the same backlog of jobs goes
//! through the real worker loop (claim in the database, read the input,
//! recognise with the Candle engine, record the result, commit), once one
//! message at a time and once in micro-batches of each size asked.
//!
//!     cargo bench -p ocr-runtime --bench worker_modes [-- JOBS [BATCH_SIZES]]
//!
//! Defaults: 48 jobs, batch sizes 4,8,16 (`NxK`: batches of N, K of them in
//! flight, see `worker.batches_in_flight`). Needs MariaDB at 127.0.0.1:3306
//! (or `OCR_TEST_MYSQL_URL`; `OCR_BENCH_DATABASE=sqlite` uses a SQLite file
//! instead, for a GPU machine without MariaDB) and the PP-OCR weights
//! (`scripts/fetch-models.sh`). `OCR_BENCH_DEVICE` (`cpu`, `cuda`) and
//! `OCR_BENCH_PRECISION` (`f32`, `f16`, `bf16`) pick where the engine runs.
//! Each run prints a `window` line (label, start and end in Unix ms) that
//! `scripts/gpu-check.sh` matches with `nvidia-smi` samples.
//! Two workloads from the tests' images, each run standard then batched: a
//! one-line label (640×96) and a three-line invoice (640×208). The detector
//! runs with `det_limit_type = max` (no upscaling of small pages).

use ocr_runtime::api::http::{router, HttpState};
use ocr_runtime::app::process::Processor;
use ocr_runtime::app::submit::{Fault, Submitter};
use ocr_runtime::config::{Config, DetLimitType, LimitsConfig};
use ocr_runtime::domain::JobStatus;
use ocr_runtime::engine::CandleRecognizer;
use ocr_runtime::loadgen::{Pacing, Plan, Protocol, Stop};
use ocr_runtime::metrics::Metrics;
use ocr_runtime::queue::memory;
use ocr_runtime::storage::{BlobStore, JobStore};
use ocr_runtime::worker::{BatchPolicy, JobLoop};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const INVOICE: &[u8] = include_bytes!("../tests/data/invoice.png");
const LINE: &[u8] = include_bytes!("../tests/data/hello.png");

struct Run {
    jobs_per_s: f64,
    mean_batch: f64,
    max_batch: usize,
}

/// Where each run's jobs live: a fresh MariaDB database, or a fresh SQLite file.
enum Database {
    MySql(String),
    Sqlite,
}

async fn run_mode(
    database: &Database,
    engine: Arc<CandleRecognizer>,
    image: &'static [u8],
    jobs: usize,
    policy: BatchPolicy,
    label: &str,
) -> anyhow::Result<Run> {
    use sqlx::Connection;
    let name = format!("ocr_bench_{}", uuid::Uuid::now_v7().simple());
    let blob_dir = tempfile::tempdir()?;
    let (store, mut admin) = match database {
        Database::MySql(server) => {
            let mut admin = sqlx::MySqlConnection::connect(server).await?;
            sqlx::query(&format!("CREATE DATABASE {name}"))
                .execute(&mut admin)
                .await?;
            let store = JobStore::connect(&format!("{server}/{name}"), 16).await?;
            (store, Some(admin))
        }
        Database::Sqlite => {
            let file = blob_dir.path().join("jobs.db");
            let url = format!("sqlite://{}?mode=rwc", file.display());
            (JobStore::connect(&url, 16).await?, None)
        }
    };
    store.migrate().await?;
    let blobs = BlobStore::from_url(&blob_dir.path().display().to_string())?;
    let metrics = Metrics::new();
    let (publisher, consumer) = memory::channel();
    let submitter = Submitter {
        store: store.clone(),
        blobs: blobs.clone(),
        publisher: Arc::new(publisher),
        limits: LimitsConfig::default(),
        fault: Fault::None,
        relay: ocr_runtime::app::submit::PublishRelay::new(
            &ocr_runtime::config::QueueConfig::default(),
        ),
        guard: None,
        metrics: metrics.clone(),
    };
    // The backlog is queued before the worker starts, so both modes see the
    // same full queue and only the loop differs. It goes in as users send
    // it: over HTTP, from `ocr-runtime loadgen`'s engine.
    let api = router(HttpState::new(submitter, metrics.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, api).await });
    let queued = ocr_runtime::loadgen::run(Plan {
        target,
        protocol: Protocol::Http,
        key: None,
        image: bytes::Bytes::from_static(image),
        content_type: "image/png".into(),
        pacing: Pacing::Closed { connections: 8 },
        stop: Stop::Requests(jobs as u64),
        follow: None,
        progress: false,
        retry: None,
        cancel: CancellationToken::new(),
        accepted_jobs: None,
    })
    .await?;
    server.abort();
    anyhow::ensure!(
        queued.accepted == jobs as u64,
        "the API accepted {} of {jobs} jobs",
        queued.accepted
    );
    let processor = Processor {
        store: store.clone(),
        blobs,
        engine,
        max_attempts: 5,
        metrics: metrics.clone(),
    };
    let shutdown = CancellationToken::new();
    let worker = JobLoop {
        consumer: Box::new(consumer),
        handler: Arc::new(processor),
        dead_letters: None,
        policy,
        metrics: metrics.clone(),
    };
    let started = Instant::now();
    let started_unix = unix_ms();
    let running = tokio::spawn(worker.run(shutdown.clone()));
    // What the workers export for the advisor, to set beside nvidia-smi's
    // samples of the same window (`scripts/gpu-check.sh`).
    let nvml = tokio::spawn(ocr_runtime::gpu::sample(metrics.clone(), shutdown.clone()));
    while (store.count_in_status(JobStatus::Succeeded).await? as usize) < jobs {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    println!("window {label} {started_unix} {}", unix_ms());
    shutdown.cancel();
    let _ = nvml.await;
    let page = metrics.render();
    match page
        .lines()
        .find(|line| line.starts_with("ocr_gpu_utilization_ratio{"))
    {
        Some(line) => println!("nvml {label} {}", line.rsplit(' ').next().unwrap_or("?")),
        None => println!("nvml {label} none (no NVML: the CPU busy ratio stands in)"),
    }
    running.await?;
    let (sum, count, max) = batch_sizes(&metrics.render());
    if let Some(admin) = admin.as_mut() {
        sqlx::query(&format!("DROP DATABASE {name}"))
            .execute(admin)
            .await?;
    }
    Ok(Run {
        jobs_per_s: jobs as f64 / elapsed.as_secs_f64(),
        mean_batch: if count > 0.0 { sum / count } else { 0.0 },
        max_batch: max,
    })
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Sum, count and the largest occupied bucket bound of `ocr_batch_size`.
fn batch_sizes(metrics: &str) -> (f64, f64, usize) {
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let count = value("ocr_batch_size_count ");
    // Buckets are cumulative: the first bound holding every batch is the max.
    let max = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("ocr_batch_size_bucket{le=\""))
        .filter_map(|l| {
            let (bound, n) = l.split_once("\"} ")?;
            Some((bound.parse::<f64>().ok()?, n.trim().parse::<f64>().ok()?))
        })
        .find(|(_, n)| *n >= count)
        .map(|(bound, _)| bound as usize)
        .unwrap_or(0);
    (value("ocr_batch_size_sum "), count, max)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let jobs: usize = args.first().map(|a| a.parse()).transpose()?.unwrap_or(48);
    // `N` or `NxK`: batches of at most N, K of them in flight.
    let sizes: Vec<(usize, usize)> = match args.get(1) {
        Some(list) => list
            .split(',')
            .map(|item| -> anyhow::Result<(usize, usize)> {
                Ok(match item.split_once('x') {
                    Some((n, k)) => (n.parse()?, k.parse()?),
                    None => (item.parse()?, 1),
                })
            })
            .collect::<anyhow::Result<_>>()?,
        None => vec![(4, 1), (8, 1), (16, 1)],
    };
    let database = match std::env::var("OCR_BENCH_DATABASE").as_deref() {
        Ok("sqlite") => Database::Sqlite,
        _ => Database::MySql(
            std::env::var("OCR_TEST_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into()),
        ),
    };
    let mut model = Config::default().model;
    model.det_limit_type = DetLimitType::Max;
    model.det_limit_side_len = 960;
    if let Ok(device) = std::env::var("OCR_BENCH_DEVICE") {
        model.device = device;
    }
    if let Ok(precision) = std::env::var("OCR_BENCH_PRECISION") {
        model.precision = precision.parse().map_err(anyhow::Error::msg)?;
    }
    println!("engine on {} in {}", model.device, model.precision);
    let engine = Arc::new(CandleRecognizer::load(&model)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Warm-up: first calls allocate and fault in the weights.
        run_mode(
            &database,
            engine.clone(),
            INVOICE,
            4,
            BatchPolicy::STANDARD,
            "warm-up",
        )
        .await?;
        for (workload, image) in [("one-line-label", LINE), ("invoice-page", INVOICE)] {
            println!("{workload}, {jobs} jobs:");
            let standard = run_mode(
                &database,
                engine.clone(),
                image,
                jobs,
                BatchPolicy::STANDARD,
                &format!("{workload}/standard"),
            )
            .await?;
            println!(
                "  standard          {:6.2} jobs/s  (batch 1)",
                standard.jobs_per_s
            );
            for &(size, in_flight) in &sizes {
                let policy = BatchPolicy {
                    max_size: size,
                    max_wait: Duration::from_millis(20),
                    in_flight,
                };
                let batched = run_mode(
                    &database,
                    engine.clone(),
                    image,
                    jobs,
                    policy,
                    &format!("{workload}/batched-{size}x{in_flight}"),
                )
                .await?;
                println!(
                    "  batched max {:<3} x{in_flight} {:6.2} jobs/s  mean batch {:.1}, largest <= {}  -> {:.2}x standard",
                    size,
                    batched.jobs_per_s,
                    batched.mean_batch,
                    batched.max_batch,
                    batched.jobs_per_s / standard.jobs_per_s
                );
            }
        }
        Ok::<(), anyhow::Error>(())
    })
}
