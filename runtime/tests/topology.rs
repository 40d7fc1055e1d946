//! The topology switch under load, with real processes: an API, two GPU
//! workers and (in writer mode) a writer, on a MariaDB server of the test's
//! own and librdkafka's mock Kafka cluster hosted here on loopback.
//!
//! Continuous load of 2,000 jobs while the topology goes standard → batched
//! → writer → standard in the order of `docs/topologies.md` (the order the
//! operator follows); a worker is SIGKILLed once; in writer mode MariaDB is
//! stopped for 20 s. At the end every job is `Succeeded` exactly once, no
//! message is left unconsumed and the dead-letter topic is empty.

mod common;

use common::{free_port, spawn_role, terminate, wait_http_ok, PrivateMariaDb, WebhookReceiver};
use ocr_runtime::config::{Config, QueueKind};
use ocr_runtime::domain::{JobId, JobStatus};
use ocr_runtime::queue::kafka::KafkaConnection;
use ocr_runtime::roles::group_lag;
use ocr_runtime::storage::JobStore;
use rdkafka::mocking::MockCluster;
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const JOBS_TOTAL: usize = 2000;
/// Submissions per second: faster than the workers drain, so every phase
/// runs under load and batches fill.
const SUBMIT_RATE: f64 = 40.0;
const JOBS: &str = "ocr.jobs";
const RESULTS: &str = "ocr.results";
const DEAD: &str = "ocr.dead-letter";
const HELLO: &[u8] = include_bytes!("data/hello.png");

struct Topology {
    config: Config,
    webhook: WebhookReceiver,
    workers: Vec<Option<(Child, u16)>>,
    writer: Option<Child>,
}

impl Topology {
    fn worker_env(&self, mode: &str) -> Vec<(&'static str, String)> {
        vec![
            ("OCR_WORKER__MODE", mode.to_owned()),
            ("OCR_WORKER__MAX_BATCH_SIZE", "8".into()),
            ("OCR_WORKER__MAX_WAIT_MS", "20".into()),
            // Two batches in hand at once in batched and writer modes: kills and
            // rolls then land while batches overlap (standard mode ignores it).
            ("OCR_WORKER__BATCHES_IN_FLIGHT", "2".into()),
            // The scenario is about the data plane, not accuracy: the tiny
            // model on small one-line pages (not blown up for the detector)
            // keeps 2,000 real recognitions within minutes on two cores.
            ("OCR_MODEL__VARIANT", "v6-tiny".into()),
            ("OCR_MODEL__DET_LIMIT_TYPE", "max".into()),
            ("OCR_MODEL__DET_LIMIT_SIDE_LEN", "320".into()),
            ("OCR_DATABASE__MIGRATE_ON_START", "false".into()),
        ]
    }

    async fn start_worker(&mut self, slot: usize, mode: &str) {
        let port = free_port();
        let child = spawn_role(&["worker"], &self.config, port, &self.worker_env(mode));
        wait_http_ok(
            &format!("http://127.0.0.1:{port}"),
            "/readyz",
            Duration::from_secs(60),
        )
        .await;
        self.workers[slot] = Some((child, port));
    }

    /// A rolling update of one worker: stop it gracefully (it finishes and
    /// commits its batch), start it in the new mode, wait until it is ready.
    async fn roll_worker(&mut self, slot: usize, mode: &str) {
        if let Some((child, _)) = self.workers[slot].take() {
            let exit = terminate(child).await;
            assert!(exit.success(), "worker {slot} exited with {exit}");
        }
        self.start_worker(slot, mode).await;
    }

    async fn roll_all(&mut self, mode: &str) {
        for slot in 0..self.workers.len() {
            self.roll_worker(slot, mode).await;
        }
        eprintln!("topology: every worker runs in {mode} mode");
    }

    async fn start_writer(&mut self) {
        let port = free_port();
        let env = vec![
            ("OCR_WRITER__WEBHOOK_URL", self.webhook.url.clone()),
            ("OCR_WRITER__WEBHOOK_SECRET", self.webhook.secret.clone()),
            ("OCR_DATABASE__MIGRATE_ON_START", "false".into()),
        ];
        let child = spawn_role(&["writer"], &self.config, port, &env);
        wait_http_ok(
            &format!("http://127.0.0.1:{port}"),
            "/readyz",
            Duration::from_secs(60),
        )
        .await;
        self.writer = Some(child);
    }
}

/// Submits `total` jobs at `rate` per second with a few concurrent clients;
/// each retries its job (same idempotency key) until the API accepts it, as
/// a careful client does while the database is down.
fn start_load(
    base: String,
    total: usize,
    rate: f64,
) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<Vec<JobId>>) {
    let accepted = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(Mutex::new(vec![None; total]));
    let next = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    let handle = tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let mut clients = Vec::new();
        for _ in 0..6 {
            let (client, base, ids, next, counter) = (
                client.clone(),
                base.clone(),
                ids.clone(),
                next.clone(),
                counter.clone(),
            );
            clients.push(tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= total {
                        return;
                    }
                    tokio::time::sleep_until(started + Duration::from_secs_f64(n as f64 / rate))
                        .await;
                    let id = submit_until_accepted(&client, &base, n).await;
                    ids.lock().unwrap()[n] = Some(id);
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        for client in clients {
            client.await.unwrap();
        }
        let ids = ids.lock().unwrap();
        ids.iter()
            .map(|id| id.expect("every job accepted"))
            .collect()
    });
    (accepted, handle)
}

async fn submit_until_accepted(client: &reqwest::Client, base: &str, n: usize) -> JobId {
    loop {
        let answer = client
            .post(format!("{base}/v1/jobs"))
            .header("content-type", "image/png")
            .header("idempotency-key", format!("load-{n}"))
            .body(HELLO.to_vec())
            .send()
            .await;
        if let Ok(response) = answer {
            if response.status().is_success() {
                let body: serde_json::Value = response.json().await.unwrap();
                return body["id"].as_str().unwrap().parse().unwrap();
            }
            let status = response.status();
            assert!(
                status.is_server_error() || status == 409,
                "job {n} rejected with {status}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_accepted(accepted: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while accepted.load(Ordering::SeqCst) < at_least {
        assert!(Instant::now() < deadline, "load stalled below {at_least}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("topology: {at_least} jobs accepted");
}

/// Waits until `group` has committed at least `messages` of `topic`: the
/// phases follow the accepted count, and an API that accepts quickly could
/// otherwise end the writer phase before the writer has persisted anything.
async fn wait_consumed(brokers: &str, group: &str, topic: &str, messages: i64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(lag) = group_lag(&KafkaConnection::plaintext(brokers), group, topic).await {
            let committed: i64 = lag.partitions.iter().filter_map(|p| p.committed).sum();
            if committed >= messages {
                eprintln!("topology: {group} consumed {committed} of {topic}");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{group} consumed fewer than {messages} of {topic}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn wait_lag(brokers: &str, group: &str, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(lag) = group_lag(&KafkaConnection::plaintext(brokers), group, topic).await {
            if lag.total == 0 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{group} never drained {topic}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switching_topologies_under_load_loses_and_duplicates_nothing() {
    let began = Instant::now();
    let mut db = PrivateMariaDb::start().await;
    let kafka = MockCluster::new(1).expect("mock Kafka cluster");
    kafka.create_topic(JOBS, 4, 1).unwrap();
    kafka.create_topic(RESULTS, 4, 1).unwrap();
    kafka.create_topic(DEAD, 1, 1).unwrap();
    let brokers = kafka.bootstrap_servers();
    let blobs = tempfile::tempdir().unwrap();

    let mut config = Config::default();
    config.database.url = db.url();
    config.blob.url = blobs.path().display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = brokers.clone();
    config.queue.republish_after_ms = 3000;
    let store = JobStore::connect(&config.database.url, 4).await.unwrap();
    store.migrate().await.unwrap();

    let mut topology = Topology {
        config: config.clone(),
        webhook: WebhookReceiver::start(200).await,
        workers: vec![None, None],
        writer: None,
    };
    let api_port = free_port();
    let api = spawn_role(&["api"], &config, api_port, &[]);
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&base, "/readyz", Duration::from_secs(60)).await;
    topology.start_worker(0, "standard").await;
    topology.start_worker(1, "standard").await;

    let (accepted, load) = start_load(base.clone(), JOBS_TOTAL, SUBMIT_RATE);

    // standard → batched: a rolling update of the workers.
    wait_accepted(&accepted, 300).await;
    topology.roll_all("batched").await;

    // A worker dies mid-batch and comes back.
    wait_accepted(&accepted, 600).await;
    if let Some((mut child, _)) = topology.workers[0].take() {
        child.kill().unwrap();
        child.wait().unwrap();
        eprintln!("topology: worker 0 SIGKILLed");
    }
    topology.start_worker(0, "batched").await;

    // batched → writer: results topic (created above), writer Available,
    // then the workers roll into writer mode.
    wait_accepted(&accepted, 900).await;
    topology.start_writer().await;
    topology.roll_all("writer").await;
    wait_consumed(&brokers, "ocr-writer", RESULTS, 20).await;

    // The database goes away for 20 s: inference goes on, results pile up
    // in the results topic, the writer waits, the API answers 5xx and the
    // clients retry.
    wait_accepted(&accepted, 1100).await;
    db.stop().await;
    eprintln!("topology: MariaDB stopped");
    tokio::time::sleep(Duration::from_secs(20)).await;
    db.resume().await;
    eprintln!("topology: MariaDB restarted");

    // writer → standard: workers back to direct mode, wait until the writer
    // has consumed every result, then retire it.
    wait_accepted(&accepted, 1400).await;
    topology.roll_all("standard").await;
    wait_lag(&brokers, "ocr-writer", RESULTS).await;
    let writer = topology.writer.take().unwrap();
    let exit = terminate(writer).await;
    assert!(exit.success(), "writer exited with {exit}");
    eprintln!("topology: writer retired");

    let ids = load.await.unwrap();
    eprintln!(
        "topology: all {} jobs accepted after {:?}",
        ids.len(),
        began.elapsed()
    );

    // Every job ends Succeeded.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let done = store.count_in_status(JobStatus::Succeeded).await.unwrap();
        if done as usize == JOBS_TOTAL {
            break;
        }
        for status in [JobStatus::Failed, JobStatus::DeadLettered] {
            assert_eq!(
                store.count_in_status(status).await.unwrap(),
                0,
                "{status} jobs"
            );
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {JOBS_TOTAL} succeeded"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("topology: all jobs succeeded after {:?}", began.elapsed());
    // Nothing left unconsumed: the writer commits an event once its result
    // document and webhook are done, which follow the database write.
    wait_lag(&brokers, "ocr-worker", JOBS).await;
    wait_lag(&brokers, "ocr-writer", RESULTS).await;

    // Exactly once: one job row per submission (the idempotency keys held
    // through the outage), each with its result.
    let distinct: std::collections::HashSet<JobId> = ids.iter().copied().collect();
    assert_eq!(distinct.len(), JOBS_TOTAL);
    let mut total_rows = 0;
    for status in JobStatus::ALL {
        total_rows += store.count_in_status(status).await.unwrap();
    }
    assert_eq!(
        total_rows as usize, JOBS_TOTAL,
        "no job row was created twice"
    );
    let blob_store = ocr_runtime::storage::BlobStore::from_url(&config.blob.url).unwrap();
    let mut via_writer = 0;
    let delivered = topology.webhook.distinct();
    for id in &ids {
        let job = store.get(*id).await.unwrap().unwrap();
        let result = job.result.expect("a result");
        assert!(result.contains("Hello"), "job {id}: {result}");
        let document = blob_store
            .get(&ocr_runtime::app::persist::result_key(*id))
            .await;
        if document.is_ok() {
            via_writer += 1;
            assert!(
                delivered.contains(&id.to_string()),
                "job {id} was written by the writer but its webhook never arrived"
            );
        }
    }
    assert!(via_writer > 0, "the writer phase persisted results");
    assert_eq!(topology.webhook.bad_signatures.load(Ordering::SeqCst), 0);
    let raw = topology.webhook.deliveries.lock().unwrap().len();
    assert!(delivered
        .iter()
        .all(|id| distinct.contains(&id.parse().unwrap())));
    eprintln!(
        "topology: {via_writer} jobs through the writer, {raw} webhook calls for {} jobs",
        delivered.len()
    );

    // Nothing dead-lettered.
    let dead = group_lag(
        &KafkaConnection::plaintext(&brokers),
        "dead-letter-audit",
        DEAD,
    )
    .await
    .unwrap();
    assert_eq!(
        dead.partitions
            .iter()
            .map(|p| p.high_watermark)
            .sum::<i64>(),
        0
    );

    for slot in 0..topology.workers.len() {
        if let Some((child, _)) = topology.workers[slot].take() {
            assert!(terminate(child).await.success());
        }
    }
    assert!(terminate(api).await.success());
    eprintln!("topology: scenario done in {:?}", began.elapsed());
}
