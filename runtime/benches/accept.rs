//! Accept-path benchmark: how many jobs per second the API takes at
//! saturation, the p50/p99 latency of `POST /v1/jobs`, how much of the
//! server's time is MySQL, the blob store and Kafka, and the ratio to what
//! MariaDB itself does with one autocommit INSERT per row (`mysqlslap`,
//! same connections, measured right before each run: the database's own
//! rate drifts by a quarter within minutes on a shared machine, so each run
//! is compared with the database as it was just then).
//!
//!     cargo bench -p ocr-runtime --bench accept [-- SECONDS CLIENTS]
//!
//! The API runs in this process (so its stage timings can be read); the
//! load comes from an `ocr-runtime loadgen` process, as a user would run it.
//! Needs MariaDB at 127.0.0.1:3306 (or `OCR_TEST_MYSQL_URL`). The same load
//! runs against the in-process queue (the baseline), librdkafka's mock
//! cluster (the real protocol, an in-process broker) and, when
//! `OCR_TEST_TANSU` names the binary (`scripts/install-tansu.sh`), a Tansu
//! broker process with in-memory storage (a fresh one per run). On the
//! in-process queue and on Tansu the same load also goes through gRPC
//! `Submit`, as `ocr-runtime loadgen --grpc` sends it (`clients` HTTP/2
//! connections, a call in flight on each).

#[path = "../tests/common/real_broker.rs"]
mod real_broker;

use ocr_runtime::api::admission::Admission;
use ocr_runtime::api::auth::Authenticator;
use ocr_runtime::api::grpc::GrpcJobs;
use ocr_runtime::api::http::{router, HttpState};
use ocr_runtime::app::submit::{Fault, Submitter};
use ocr_runtime::config::LimitsConfig;
use ocr_runtime::metrics::{Metrics, SubmitStage};
use ocr_runtime::queue::kafka::{KafkaConnection, KafkaPublisher};
use ocr_runtime::queue::{memory, JobPublisher};
use ocr_runtime::storage::{BlobStore, JobStore};
use rdkafka::mocking::MockCluster;
use std::sync::Arc;
use std::time::Duration;

/// As in the `ocr-runtime` binary: the API here should allocate as it does there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `ocr-runtime loadgen --json` measured.
struct Summary {
    accepted: u64,
    refused: u64,
    transport_errors: u64,
    elapsed_seconds: f64,
    accepted_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The front end the load goes through.
#[derive(Clone, Copy, PartialEq)]
enum FrontEnd {
    Http,
    Grpc,
}

struct Outcome {
    summary: Summary,
    stages: Vec<(SubmitStage, Duration)>,
    /// Share of the machine's CPU time the hypervisor gave to other guests
    /// during the load, where `/proc/stat` says.
    steal: Option<f64>,
    /// CPU seconds each process spent during the load (Linux only).
    cpu: Vec<(&'static str, f64)>,
}

/// CPU seconds (user + system) `pid` has used, from `/proc/PID/stat`.
fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}

/// The pid of the first process whose name is one of `names`.
fn find_process(names: &[&str]) -> Option<String> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            names.contains(&comm.trim()).then_some(pid)
        })
}

/// CPU seconds of every waited-for child process so far (the loadgen).
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// CPU seconds, so far, of the processes that share the machine in a run.
fn cpu_snapshot() -> Vec<(&'static str, Option<f64>)> {
    let of = |names: &[&str]| find_process(names).and_then(|pid| process_cpu_seconds(&pid));
    vec![
        ("API", process_cpu_seconds("self")),
        ("loadgen", Some(children_cpu_seconds())),
        ("MariaDB", of(&["mariadbd", "mysqld"])),
        ("Tansu", of(&["tansu"])),
    ]
}

fn cpu_between(
    before: &[(&'static str, Option<f64>)],
    after: &[(&'static str, Option<f64>)],
) -> Vec<(&'static str, f64)> {
    before
        .iter()
        .zip(after)
        .filter_map(|((name, b), (_, a))| Some((*name, a.zip(*b).map(|(a, b)| a - b)?)))
        .filter(|(_, spent)| *spent > 0.0)
        .collect()
}

/// `(steal, total)` CPU ticks since boot, from the first line of `/proc/stat`.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    Some((*ticks.get(7)?, ticks.iter().sum()))
}

fn steal_between(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((steal0, total0), (steal1, total1)) = (before?, after?);
    let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
    Some(steal1.saturating_sub(steal0) as f64 / total as f64)
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

/// The API in this process over a fresh database, loaded by an
/// `ocr-runtime loadgen` process (closed loop, `clients` requests in flight)
/// through `front_end`.
async fn run_load(
    mysql_server: &str,
    publisher: Arc<dyn JobPublisher>,
    front_end: FrontEnd,
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
    let blob_dir = tempfile::tempdir_in(blob_root())?;
    let metrics = Metrics::new();
    let submitter = Submitter {
        store,
        blobs: BlobStore::from_url(&blob_dir.path().display().to_string())?,
        publisher,
        limits: LimitsConfig::default(),
        fault: Fault::None,
        relay: ocr_runtime::app::submit::PublishRelay::new(
            &ocr_runtime::config::QueueConfig::default(),
        ),
        guard: None,
        metrics: metrics.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let target = format!("http://{}", listener.local_addr()?);
    // Both front ends as `ocr-runtime api` wires them: one admission budget,
    // keys optional (the loadgen sends none).
    let server = match front_end {
        FrontEnd::Http => {
            use axum::serve::ListenerExt;
            let app = router(HttpState::new(submitter, metrics.clone()));
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(async move {
                axum::serve(listener, app).await?;
                anyhow::Ok(())
            })
        }
        FrontEnd::Grpc => {
            let admission = Admission::new(&submitter.limits);
            let auth = Authenticator::optional(submitter.store.clone());
            let jobs = GrpcJobs::new(submitter, metrics.clone(), admission, auth);
            let admitting = jobs.admission_layer();
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .layer(admitting)
                    .add_service(jobs.into_server())
                    .serve_with_incoming(incoming)
                    .await?;
                anyhow::Ok(())
            })
        }
    };
    let image = tempfile::Builder::new().suffix(".png").tempfile()?;
    std::fs::write(image.path(), sample_png())?;
    let ticks_before = cpu_ticks();
    let cpu_before = cpu_snapshot();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ocr-runtime"))
        .arg("loadgen")
        .args(["--url", &target])
        .arg("--image")
        .arg(image.path())
        .args(["--connections", &clients.to_string()])
        .args(["--duration", &format!("{seconds}s"), "--json"])
        .args((front_end == FrontEnd::Grpc).then_some("--grpc"))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    let steal = steal_between(ticks_before, cpu_ticks());
    let cpu = cpu_between(&cpu_before, &cpu_snapshot());
    anyhow::ensure!(output.status.success(), "loadgen failed: {}", output.status);
    let summary = parse_summary(&output.stdout)?;
    if server.is_finished() {
        server.await??;
        anyhow::bail!("the API stopped before the load did");
    }
    server.abort();
    sqlx::query(&format!("DROP DATABASE {name}"))
        .execute(&mut admin)
        .await?;
    Ok(Outcome {
        summary,
        stages: SubmitStage::ALL
            .iter()
            .map(|s| (*s, metrics.stage_total(*s)))
            .collect(),
        steal,
        cpu,
    })
}

/// Where the uploads go: `OCR_BENCH_BLOB_DIR`, else tmpfs (`/dev/shm`) when
/// there is one. On ext4, creating a file per job right after the previous
/// run deleted tens of thousands costs more CPU than the rest of the accept
/// path (`recently_deleted` in the inode allocator, seen with perf): a
/// property of that churn, not of the API, which a cluster's S3 or volume
/// does not share.
fn blob_root() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("OCR_BENCH_BLOB_DIR") {
        return dir.into();
    }
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

fn parse_summary(json: &[u8]) -> anyhow::Result<Summary> {
    let value: serde_json::Value = serde_json::from_slice(json)?;
    let number = |pointer: &str| {
        value
            .pointer(pointer)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| anyhow::anyhow!("loadgen summary has no {pointer}"))
    };
    let refused = value
        .get("refused")
        .and_then(serde_json::Value::as_object)
        .map_or(0, |counts| counts.values().filter_map(|n| n.as_u64()).sum());
    Ok(Summary {
        accepted: number("/accepted")? as u64,
        refused,
        transport_errors: number("/transport_errors")? as u64,
        elapsed_seconds: number("/elapsed_seconds")?,
        accepted_per_second: number("/accepted_per_second")?,
        p50_ms: number("/accept_latency_ms/p50")?,
        p99_ms: number("/accept_latency_ms/p99")?,
    })
}

/// Enough single-row INSERTs for about three seconds of `mysqlslap` on a
/// small machine: one second was too short to be repeatable.
const SLAP_QUERIES: usize = 50_000;

fn mysqlslap_installed() -> bool {
    std::process::Command::new("mysqlslap")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

/// Single-row autocommit INSERTs/s into a table shaped like `jobs`, by
/// `mysqlslap` with `clients` connections: what the database itself allows
/// one commit per job to reach. `None` when mysqlslap is not installed.
fn mysqlslap_inserts_per_second(clients: usize, queries: usize) -> Option<f64> {
    let schema = format!("ocr_slap_{}", uuid::Uuid::now_v7().simple());
    let create = "CREATE TABLE jobs (id CHAR(36) NOT NULL PRIMARY KEY, client_id VARCHAR(128) NOT NULL, \
        status VARCHAR(16) NOT NULL, attempts INT NOT NULL DEFAULT 0, input_key VARCHAR(512) NOT NULL, \
        content_type VARCHAR(128) NOT NULL, input_sha256 CHAR(64) NOT NULL, input_bytes BIGINT NOT NULL, \
        idempotency_key VARCHAR(255) NULL, result LONGTEXT NULL, error TEXT NULL, created_at BIGINT NOT NULL, \
        updated_at BIGINT NOT NULL, KEY jobs_status_updated (status, updated_at), \
        KEY jobs_client_status (client_id, status)) ENGINE = InnoDB";
    let insert = "INSERT INTO jobs (id, client_id, status, attempts, input_key, content_type, input_sha256, \
        input_bytes, created_at, updated_at) VALUES (UUID(), 'bench', 'Accepted', 0, CONCAT('inputs/', UUID()), \
        'image/png', REPEAT('0', 64), 4000, UNIX_TIMESTAMP(NOW(3)) * 1000, UNIX_TIMESTAMP(NOW(3)) * 1000)";
    let output = std::process::Command::new("mysqlslap")
        .args(["--host=127.0.0.1", "--user=root", "--iterations=1"])
        .arg(format!("--concurrency={clients}"))
        .arg(format!("--number-of-queries={queries}"))
        .arg(format!("--create-schema={schema}"))
        .arg(format!("--create={create}"))
        .arg(format!("--query={insert}"))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let seconds: f64 = text
        .lines()
        .find(|l| l.contains("Average number of seconds to run all queries"))?
        .split(':')
        .nth(1)?
        .trim()
        .trim_end_matches("seconds")
        .trim()
        .parse()
        .ok()?;
    Some(queries as f64 / seconds.max(1e-9))
}

fn report(label: &str, outcome: &Outcome, slap: Option<f64>) -> f64 {
    let s = &outcome.summary;
    let rate = s.accepted_per_second;
    let server_total: Duration = outcome.stages.iter().map(|(_, d)| *d).sum();
    let versus = slap.map_or(String::new(), |slap| {
        format!(
            "  = {:.0} % of mysqlslap ({slap:.0} INSERTs/s just before)",
            100.0 * rate / slap
        )
    });
    println!(
        "{label:<22} {rate:>8.1} jobs/s  p50 {:>7.2} ms  p99 {:>7.2} ms  ({} jobs in {:.1} s, {} refused, {} errors){versus}",
        s.p50_ms, s.p99_ms, s.accepted, s.elapsed_seconds, s.refused, s.transport_errors,
    );
    if !outcome.cpu.is_empty() {
        // Per job, CPU time is steadier than jobs/s on a shared machine:
        // it does not move with what other guests take.
        let per_job = |seconds: f64| seconds * 1e6 / s.accepted.max(1) as f64;
        let parts: Vec<String> = outcome
            .cpu
            .iter()
            .map(|(name, seconds)| format!("{name} {:.0}", per_job(*seconds)))
            .collect();
        let total: f64 = outcome
            .cpu
            .iter()
            .map(|(_, seconds)| per_job(*seconds))
            .sum();
        println!("    CPU per job (us): {}, all {total:.0}", parts.join(", "));
    }
    if let Some(steal) = outcome.steal.filter(|steal| *steal >= 0.02) {
        println!(
            "    the hypervisor took {:.0} % of this machine's CPU during the run (steal): compare with care",
            100.0 * steal
        );
    }
    for (stage, total) in &outcome.stages {
        let per_job = total.as_secs_f64() * 1e3 / s.accepted.max(1) as f64;
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
            "accept benchmark: {clients} concurrent clients, {seconds} s per run, 640x200 PNG, uploads in {}",
            blob_root().display()
        );
        if !mysqlslap_installed() {
            println!("mysqlslap is not installed: no database baseline");
        }
        let slap = || mysqlslap_inserts_per_second(clients, SLAP_QUERIES);
        let (memory_publisher, _queue) = memory::channel();
        let memory_publisher: Arc<dyn JobPublisher> = Arc::new(memory_publisher);
        let db = slap();
        let baseline = run_load(&mysql, memory_publisher.clone(), FrontEnd::Http, seconds, clients).await?;
        let baseline_rate = report("MySQL + memory queue", &baseline, db);
        let db = slap();
        let grpc = run_load(&mysql, memory_publisher, FrontEnd::Grpc, seconds, clients).await?;
        let grpc_rate = report("  gRPC Submit", &grpc, db);
        println!("ratio gRPC / HTTP (memory queue): {:.2}x", grpc_rate / baseline_rate.max(1e-9));

        let cluster = MockCluster::new(1)?;
        cluster.create_topic("ocr.jobs", 6, 1)?;
        let kafka = KafkaPublisher::new(
            &KafkaConnection::plaintext(&cluster.bootstrap_servers()),
            "ocr.jobs",
        )?;
        let db = slap();
        let with_kafka = run_load(&mysql, Arc::new(kafka), FrontEnd::Http, seconds, clients).await?;
        let kafka_rate = report("MySQL + Kafka (mock)", &with_kafka, db);
        println!(
            "ratio Kafka (mock) / memory-queue baseline: {:.2}x",
            kafka_rate / baseline_rate.max(1e-9)
        );

        if std::env::var_os("OCR_TEST_TANSU").is_none() {
            println!("OCR_TEST_TANSU is not set: no Tansu run (scripts/install-tansu.sh)");
            return Ok(());
        }
        let db = slap();
        let with_tansu = run_on_tansu(&mysql, FrontEnd::Http, seconds, clients).await?;
        let tansu_rate = report("MySQL + Kafka (Tansu)", &with_tansu, db);
        println!(
            "ratio Kafka (Tansu) / memory-queue baseline: {:.2}x",
            tansu_rate / baseline_rate.max(1e-9)
        );
        let db = slap();
        let grpc_tansu = run_on_tansu(&mysql, FrontEnd::Grpc, seconds, clients).await?;
        report("  gRPC Submit", &grpc_tansu, db);
        Ok(())
    })
}

/// A run against a fresh Tansu broker: one that already holds the last
/// run's messages answers more slowly, which would favour whichever front
/// end ran first.
async fn run_on_tansu(
    mysql: &str,
    front_end: FrontEnd,
    seconds: u64,
    clients: usize,
) -> anyhow::Result<Outcome> {
    let broker = real_broker::RealBroker::start();
    create_topic(&broker.bootstrap_servers, "ocr.jobs").await?;
    let tansu = KafkaPublisher::new(
        &KafkaConnection::plaintext(&broker.bootstrap_servers),
        "ocr.jobs",
    )?;
    run_load(mysql, Arc::new(tansu), front_end, seconds, clients).await
}

async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let created = admin
        .create_topics(
            [&NewTopic::new(topic, 6, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await?;
    for outcome in created {
        outcome.map_err(|(topic, code)| anyhow::anyhow!("creating {topic}: {code}"))?;
    }
    Ok(())
}
