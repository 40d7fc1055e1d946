//! Outages of the broker and of the database under real `ocr-runtime api`
//! and `ocr-runtime worker` processes: a real Tansu broker cut off the
//! network, a private MariaDB stopped and started again, each for
//! [`OUTAGE`]. The API must keep answering within a second, and
//! every job must still finish exactly once.

mod common;

use common::real_broker::RealBroker;
use common::{
    free_port, spawn_role, terminate, wait_for_status, wait_http_ok, MysqlDatabase, PrivateMariaDb,
    INVOICE,
};
use ocr_runtime::config::{Config, QueueKind};
use ocr_runtime::domain::{JobId, JobStatus};
use ocr_runtime::storage::JobStore;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::ClientConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long each outage lasts.
const OUTAGE: Duration = Duration::from_secs(30);
/// The most any request may take during an outage.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

fn config(database_url: &str, brokers: &str, blobs: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.database.url = database_url.to_owned();
    config.blob.url = blobs.display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = brokers.to_owned();
    config.queue.republish_after_ms = 2_000;
    config
}

async fn create_topics(brokers: &str) {
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            &[
                NewTopic::new("ocr.jobs", 3, TopicReplication::Fixed(1)),
                NewTopic::new("ocr.dead-letter", 1, TopicReplication::Fixed(1)),
            ],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("CreateTopics answered");
    for result in created {
        result.unwrap_or_else(|(topic, e)| panic!("creating {topic}: {e}"));
    }
}

/// `ocr-runtime api` and `ocr-runtime worker` processes, the API ready;
/// killed if the test fails before [`Roles::stop`].
struct Roles {
    children: Vec<std::process::Child>,
    base: String,
}

impl Roles {
    async fn start(config: &Config) -> Roles {
        let (api_port, worker_port) = (free_port(), free_port());
        let roles = Roles {
            children: vec![
                spawn_role(&["api"], config, api_port, &[]),
                spawn_role(&["worker"], config, worker_port, &[]),
            ],
            base: format!("http://127.0.0.1:{api_port}"),
        };
        wait_http_ok(&roles.base, "/readyz", Duration::from_secs(60)).await;
        // The worker too: one still loading its engine when a test stops the
        // database fails to open it and exits, and nothing runs the jobs.
        let worker = format!("http://127.0.0.1:{worker_port}");
        wait_http_ok(&worker, "/readyz", Duration::from_secs(120)).await;
        roles
    }

    /// SIGTERM to each; each must exit cleanly.
    async fn stop(mut self) {
        for child in std::mem::take(&mut self.children) {
            let exit = terminate(child).await;
            assert!(exit.success(), "a role exited with {exit}");
        }
    }
}

impl Drop for Roles {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One timed request: its status, `Retry-After`, body and duration.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: serde_json::Value,
    took: Duration,
}

async fn timed(request: reqwest::RequestBuilder) -> Answer {
    let started = Instant::now();
    let response = request
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the API answers");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    Answer {
        status,
        retry_after,
        body,
        took: started.elapsed(),
    }
}

fn submission(client: &reqwest::Client, base: &str) -> reqwest::RequestBuilder {
    client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .body(INVOICE.to_vec())
}

fn job_id(answer: &Answer) -> JobId {
    answer.body["id"]
        .as_str()
        .expect("an id in the answer")
        .parse()
        .expect("a job id")
}

/// Every job ends `succeeded`, and the database holds exactly these jobs.
async fn assert_all_succeeded_once(store: &JobStore, ids: &[JobId]) {
    for id in ids {
        let job = wait_for_status(store, *id, JobStatus::Succeeded, Duration::from_secs(240)).await;
        assert!(
            job.result
                .is_some_and(|r| r.contains("Total: 1,234.50 EUR")),
            "{id} has no result"
        );
    }
    let listed = store
        .ids_in_status(JobStatus::Succeeded, i64::MAX, 10_000)
        .await
        .expect("listing jobs");
    assert_eq!(
        listed.len(),
        ids.len(),
        "one job per accepted submission, no more"
    );
}

/// A TCP proxy in front of the broker that a test can cut: while cut, every
/// connection through it is closed and new ones are closed at once, as when
/// the broker's host drops off the network. (Killing and restarting Tansu
/// itself would model a broker restart, but Tansu 0.6 loses idempotent
/// producers' state across one and panics on their next produce, which a
/// Kafka broker does not.)
struct Cuttable {
    addr: String,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Cuttable {
    async fn bind() -> (Cuttable, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let addr = listener.local_addr().expect("its address").to_string();
        let proxy = Cuttable {
            addr,
            cut: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(Mutex::new(Vec::new())),
        };
        (proxy, listener)
    }

    fn forward(&self, listener: tokio::net::TcpListener, upstream: String) {
        let cut = self.cut.clone();
        let connections = self.connections.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut.load(Ordering::SeqCst) {
                    continue;
                }
                let upstream = upstream.clone();
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                connections.lock().expect("lock").push(connection);
            }
        });
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().expect("lock").drain(..) {
            connection.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A real Tansu broker reachable only through a [`Cuttable`] proxy, a fresh
/// database, and API and worker processes that have finished a first job.
struct BehindProxy {
    proxy: Cuttable,
    _broker: RealBroker,
    _db: MysqlDatabase,
    store: JobStore,
    _blobs: tempfile::TempDir,
    config: Config,
    roles: Roles,
    client: reqwest::Client,
    first: JobId,
}

impl BehindProxy {
    async fn start() -> BehindProxy {
        let (proxy, listener) = Cuttable::bind().await;
        let broker = RealBroker::start_advertising(&proxy.addr);
        proxy.forward(listener, broker.bootstrap_servers.clone());
        create_topics(&proxy.addr).await;
        let db = MysqlDatabase::create().await;
        let store = db.store().await;
        let blobs = tempfile::tempdir().expect("a blob directory");
        let config = config(&db.url, &proxy.addr, blobs.path());
        let roles = Roles::start(&config).await;
        let client = reqwest::Client::new();
        let accepted = timed(submission(&client, &roles.base)).await;
        assert_eq!(accepted.status, 202);
        let first = job_id(&accepted);
        wait_for_status(
            &store,
            first,
            JobStatus::Succeeded,
            Duration::from_secs(120),
        )
        .await;
        BehindProxy {
            proxy,
            _broker: broker,
            _db: db,
            store,
            _blobs: blobs,
            config,
            roles,
            client,
            first,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_neither_blocks_submissions_nor_loses_a_job() {
    // Every field bound: the broker, database and blob folder live to the end.
    let BehindProxy {
        proxy,
        _broker,
        _db,
        store,
        _blobs,
        config: _,
        roles,
        client,
        first,
    } = BehindProxy::start().await;
    let base = roles.base.clone();
    let mut ids = vec![first];

    proxy.cut();
    let outage = Instant::now();
    let mut slowest = Duration::ZERO;
    while outage.elapsed() < OUTAGE {
        let accepted = timed(submission(&client, &base)).await;
        assert_eq!(accepted.status, 202, "{}", accepted.body);
        assert!(
            accepted.took < ANSWER_WITHIN,
            "POST took {:?} with the broker down",
            accepted.took
        );
        let id = job_id(&accepted);
        let read = timed(client.get(format!("{base}/v1/jobs/{id}"))).await;
        assert_eq!(read.status, 200, "GET with the broker down: {}", read.body);
        assert!(read.took < ANSWER_WITHIN, "GET took {:?}", read.took);
        let ready = timed(client.get(format!("{base}/readyz"))).await;
        assert_eq!(ready.status, 200, "the API stays ready without the broker");
        assert!(
            ready.took < ANSWER_WITHIN,
            "/readyz took {:?}: a probe would time out",
            ready.took
        );
        slowest = slowest.max(accepted.took);
        ids.push(id);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "broker down {:?}: {} submissions accepted, slowest {slowest:?}",
        outage.elapsed(),
        ids.len() - 1
    );
    proxy.restore();

    assert_all_succeeded_once(&store, &ids).await;
    for id in &ids {
        let job = store.get(*id).await.expect("reading").expect("the job");
        assert_eq!(job.attempts, 1, "{id} was inferred more than once");
    }
    roles.stop().await;
}

/// Jobs stored `Queued` whose publish was still waiting for the broker when
/// their API was killed (SIGKILL, no shutdown): the API's relay stopped
/// beating with those jobs past its watermark, so another API's sweeper
/// gives them back to `Accepted` and publishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_killed_while_its_publishes_wait_for_the_broker_loses_no_job() {
    let BehindProxy {
        proxy,
        _broker,
        _db,
        store,
        _blobs,
        config,
        mut roles,
        client,
        first,
    } = BehindProxy::start().await;
    let mut ids = vec![first];

    proxy.cut();
    let mut stranded = Vec::new();
    for _ in 0..5 {
        let accepted = timed(submission(&client, &roles.base)).await;
        assert_eq!(accepted.status, 202, "{}", accepted.body);
        assert_eq!(accepted.body["status"], "Queued", "{}", accepted.body);
        stranded.push(job_id(&accepted));
    }
    let mut api = roles.children.remove(0);
    api.kill().expect("SIGKILL to the API");
    api.wait().expect("the API exits");
    for id in &stranded {
        let job = store.get(*id).await.expect("reading").expect("the job");
        assert_eq!(
            job.status,
            JobStatus::Queued,
            "{id}: never published, still Queued"
        );
    }
    proxy.restore();

    let api_port = free_port();
    roles
        .children
        .push(spawn_role(&["api"], &config, api_port, &[]));
    ids.extend(&stranded);
    assert_all_succeeded_once(&store, &ids).await;
    for id in &ids {
        let job = store.get(*id).await.expect("reading").expect("the job");
        assert_eq!(job.attempts, 1, "{id} was inferred more than once");
    }
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_answered_at_once_and_loses_no_job() {
    let kafka = rdkafka::mocking::MockCluster::new(1).expect("mock Kafka cluster");
    kafka.create_topic("ocr.jobs", 3, 1).expect("jobs topic");
    kafka
        .create_topic("ocr.dead-letter", 1, 1)
        .expect("dead-letter topic");
    let mut db = PrivateMariaDb::start().await;
    let blobs = tempfile::tempdir().expect("a blob directory");
    let config = config(&db.url(), &kafka.bootstrap_servers(), blobs.path());
    let store = JobStore::connect(&db.url(), 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    let roles = Roles::start(&config).await;
    let base = roles.base.clone();
    let client = reqwest::Client::new();

    // Jobs in every state when the database goes: some queued, one in hand.
    let mut ids = Vec::new();
    for _ in 0..4 {
        let accepted = timed(submission(&client, &base)).await;
        assert_eq!(accepted.status, 202, "{}", accepted.body);
        ids.push(job_id(&accepted));
    }
    db.stop().await;
    let outage = Instant::now();
    let mut answers = 0;
    while outage.elapsed() < OUTAGE {
        let refused = timed(submission(&client, &base)).await;
        assert_eq!(
            refused.status, 503,
            "POST without a database: {}",
            refused.body
        );
        assert_eq!(refused.retry_after.as_deref(), Some("1"));
        assert!(
            refused.took < ANSWER_WITHIN,
            "POST took {:?} with the database down",
            refused.took
        );
        let read = timed(client.get(format!("{base}/v1/jobs/{}", ids[0]))).await;
        assert_eq!(read.status, 503, "GET without a database: {}", read.body);
        assert!(read.took < ANSWER_WITHIN, "GET took {:?}", read.took);
        answers += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    println!(
        "database down {:?}: {answers} POST and GET pairs answered 503",
        outage.elapsed()
    );
    db.resume().await;

    assert_all_succeeded_once(&store, &ids).await;
    roles.stop().await;
}
