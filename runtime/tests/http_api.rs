//! The HTTP submission path against real MariaDB: accepted jobs, idempotency
//! keys, and hundreds of malformed uploads that must leave nothing behind.

mod common;

use common::{jpeg, png, MysqlDatabase};
use ocr_runtime::api::auth::Authenticator;
use ocr_runtime::api::http::{router, HttpState};
use ocr_runtime::app::submit::{Fault, Submitter};
use ocr_runtime::config::LimitsConfig;
use ocr_runtime::domain::message::JobMessage;
use ocr_runtime::domain::tenant::{NewKey, Tenant};
use ocr_runtime::metrics::Metrics;
use ocr_runtime::queue::{memory, MessageConsumer};
use ocr_runtime::storage::redis_guard::RedisGuard;
use ocr_runtime::storage::{BlobStore, JobStore};
use std::sync::Arc;

struct Api {
    base: String,
    store: JobStore,
    blobs: BlobStore,
    queue: memory::MemoryConsumer,
    /// Sends [`Api::key`] on every request.
    client: reqwest::Client,
    /// This test's own tenant and its key.
    tenant: Tenant,
    key: String,
    _db: MysqlDatabase,
}

/// A fresh tenant with a key in `store`: (tenant, key). Unique per call, so
/// tests sharing a Redis have their own rate-limit windows.
async fn new_tenant(store: &JobStore) -> (Tenant, String) {
    let tenant = Tenant::parse(&format!("t-{}", uuid::Uuid::now_v7().simple())).unwrap();
    let key = NewKey::generate().unwrap();
    store
        .create_key(&tenant, &key, ocr_runtime::storage::now_ms())
        .await
        .unwrap();
    (tenant, key.token)
}

fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

const MAX_BODY: usize = 2 * 1024 * 1024;

/// The submission path on `store`, publishing to `publisher`, as the API
/// role builds it (blobs in memory).
fn submitter_on(
    store: &JobStore,
    publisher: memory::MemoryPublisher,
    limits: LimitsConfig,
    queue: &ocr_runtime::config::QueueConfig,
    guard: Option<RedisGuard>,
) -> Submitter {
    Submitter {
        store: store.clone(),
        blobs: BlobStore::from_url("memory://").unwrap(),
        publisher: Arc::new(publisher),
        limits,
        fault: Fault::None,
        relay: ocr_runtime::app::submit::PublishRelay::new(queue),
        guard,
        metrics: Metrics::new(),
    }
}

/// A small PNG from tenant `tenant-a`, without an idempotency key.
fn png_submission() -> ocr_runtime::app::submit::Submission {
    ocr_runtime::app::submit::Submission {
        tenant: Tenant::parse("tenant-a").unwrap(),
        idempotency_key: None,
        content_type: "image/png".into(),
        body: png(64, 32).into(),
    }
}

async fn start_api() -> Api {
    start_api_with(None).await
}

async fn start_api_with(guard: Option<RedisGuard>) -> Api {
    start_api_limited(guard, |_| {}).await
}

async fn start_api_limited(
    guard: Option<RedisGuard>,
    adjust: impl FnOnce(&mut LimitsConfig),
) -> Api {
    let mut limits = LimitsConfig {
        max_body_bytes: MAX_BODY,
        max_pixels: 25_000_000,
        max_side: 10_000,
        ..LimitsConfig::default()
    };
    adjust(&mut limits);
    let db = MysqlDatabase::create().await;
    let store = db.store().await;
    let (publisher, queue) = memory::channel();
    let submitter = submitter_on(
        &store,
        publisher,
        limits,
        &ocr_runtime::config::QueueConfig::default(),
        guard,
    );
    let blobs = submitter.blobs.clone();
    // As in a cluster: keys required; checked keys trusted for no time, so
    // a revocation shows at once.
    let auth_config = ocr_runtime::config::AuthConfig {
        key_cache_ms: 0,
        ..Default::default()
    };
    let auth = Authenticator::new(&auth_config, true, store.clone());
    let (tenant, key) = new_tenant(&store).await;
    let app = router(HttpState::new(submitter.clone(), submitter.metrics.clone()).with_auth(auth));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Api {
        base: format!("http://{addr}"),
        store,
        blobs,
        queue,
        client: client_with_key(&key),
        tenant,
        key,
        _db: db,
    }
}

impl Api {
    async fn post(
        &self,
        body: Vec<u8>,
        content_type: &str,
        key: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("{}/v1/jobs", self.base))
            .header("content-type", content_type)
            .body(body);
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send().await.unwrap()
    }

    async fn total_jobs(&self) -> u64 {
        self.store.count_all().await.unwrap()
    }
}

/// A publish that fails (here the queue is gone) gives the job back to the
/// sweeper: the request that waited for it is answered `Accepted`, the row
/// says so, and the relay's recorded watermark moves past it. A job whose
/// publish went through is passed the same way, with no write of its own.
#[tokio::test]
async fn a_job_whose_publish_fails_goes_back_to_the_sweeper() {
    use ocr_runtime::domain::JobStatus;
    let db = MysqlDatabase::create().await;
    let store = db.store().await;
    let queue_config = ocr_runtime::config::QueueConfig {
        publish_wait_ms: 5_000,
        republish_after_ms: 400,
        ..Default::default()
    };
    let (publisher, queue) = memory::channel();
    let submitter = submitter_on(
        &store,
        publisher,
        LimitsConfig::default(),
        &queue_config,
        None,
    );
    let published = submitter.submit(png_submission()).await.unwrap();
    assert_eq!(published.job().status, JobStatus::Queued);
    drop(queue);
    let failed = submitter.submit(png_submission()).await.unwrap();
    let failed = failed.job();
    assert_eq!(
        failed.status,
        JobStatus::Accepted,
        "answered after the failed publish"
    );
    let stored = store.get(failed.id).await.unwrap().unwrap();
    assert_eq!(
        stored.status,
        JobStatus::Accepted,
        "the sweeper's to publish"
    );
    assert_eq!(submitter.relay.pending(), 0);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let beats = store.silent_relays(i64::MAX).await.unwrap();
        let ours = beats
            .iter()
            .find(|beat| beat.relay == submitter.relay.id())
            .expect("the relay's row exists once it stamped a job");
        if ours.published_through >= failed.created_at_ms {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the watermark never passed the settled jobs: {ours:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A stopping API records its watermark past everything it published, at
/// once rather than at its next beat (250 ms away here), so the sweepers
/// have nothing of it to republish.
#[tokio::test]
async fn a_drained_relay_records_its_watermark_past_its_last_jobs() {
    let db = MysqlDatabase::create().await;
    let store = db.store().await;
    let (publisher, _queue) = memory::channel();
    let submitter = submitter_on(
        &store,
        publisher,
        LimitsConfig::default(),
        &ocr_runtime::config::QueueConfig::default(),
        None,
    );
    let mut last = 0;
    for _ in 0..2 {
        let submitted = submitter.submit(png_submission()).await.unwrap();
        last = submitted.job().created_at_ms;
    }
    let recorded = |beats: Vec<ocr_runtime::storage::watermarks::RelayBeat>| {
        beats
            .into_iter()
            .find(|beat| beat.relay == submitter.relay.id())
            .expect("the relay's row")
            .published_through
    };
    submitter.relay.drain(&store).await;
    assert_eq!(submitter.relay.pending(), 0);
    assert!(recorded(store.silent_relays(i64::MAX).await.unwrap()) >= last);
}

#[tokio::test]
async fn accepted_job_is_stored_queued_and_readable() {
    let mut api = start_api().await;
    let response = api.post(png(64, 32), "image/png", None).await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    // Answered once the row is committed, as `Queued`: the publish follows
    // the answer and needs no second write.
    assert_eq!(body["status"], "Queued");

    let delivery = api.queue.next().await.unwrap().unwrap();
    let message = JobMessage::decode(&delivery.payload).unwrap();
    assert_eq!(message.job_id.to_string(), id);
    assert!(
        message.input_key.is_some(),
        "the message says where the input is"
    );
    let status: serde_json::Value = api
        .client
        .get(format!("{}{location}", api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "Queued", "{status}");

    let result = api
        .client
        .get(format!("{}{location}/result", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(result.status(), 409, "no result before the worker ran");
    let error: serde_json::Value = result.json().await.unwrap();
    assert_eq!(error["error"]["code"], "not_finished");

    assert_eq!(api.blobs.count("inputs").await.unwrap(), 1);
}

#[tokio::test]
async fn multipart_upload_is_accepted() {
    let api = start_api().await;
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(jpeg(80, 40))
            .file_name("scan.jpg")
            .mime_str("image/jpeg")
            .unwrap(),
    );
    let response = api
        .client
        .post(format!("{}/v1/jobs", api.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let job: serde_json::Value = response.json().await.unwrap();
    let stored = api
        .store
        .get(job["id"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.content_type, "image/jpeg");
}

#[tokio::test]
async fn idempotency_key_replays_rejects_other_payload_and_in_flight() {
    let api = start_api().await;
    let image = png(50, 20);
    let first = api.post(image.clone(), "image/png", Some("order-42")).await;
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await.unwrap();

    let replay = api.post(image.clone(), "image/png", Some("order-42")).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], first["id"]);

    let other = api.post(png(51, 20), "image/png", Some("order-42")).await;
    assert_eq!(other.status(), 422);
    let other: serde_json::Value = other.json().await.unwrap();
    assert_eq!(other["error"]["code"], "idempotency_key_reused");

    // A first request still in flight: its key is reserved but has no job yet.
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&image))
    };
    let now = ocr_runtime::storage::now_ms();
    assert!(api
        .store
        .reserve_key(api.tenant.as_str(), "order-43", &sha, now)
        .await
        .unwrap()
        .is_none());
    let in_flight = api.post(image, "image/png", Some("order-43")).await;
    assert_eq!(in_flight.status(), 409);

    assert_eq!(
        api.total_jobs().await,
        1,
        "only the first request made a job"
    );
}

/// Builds well over 200 uploads that must all be refused.
fn malformed_uploads() -> Vec<(String, Vec<u8>, String)> {
    let mut cases = Vec::new();
    cases.push(("empty body".into(), Vec::new(), "image/png".into()));
    let good_png = png(300, 200);
    let good_jpeg = jpeg(300, 200);
    for i in 1..=60 {
        let cut = good_png.len() * i / 64;
        cases.push((
            format!("PNG cut at {cut}"),
            good_png[..cut].to_vec(),
            "image/png".into(),
        ));
    }
    for i in 1..=60 {
        let cut = good_jpeg.len() * i / 64;
        cases.push((
            format!("JPEG cut at {cut}"),
            good_jpeg[..cut].to_vec(),
            "image/jpeg".into(),
        ));
    }
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..70 {
        let len = 1 + (i * 37) % 3000;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        cases.push((
            format!("random bytes #{i}"),
            bytes,
            "application/octet-stream".into(),
        ));
    }
    for text in [
        "hello",
        "{\"image\": null}",
        "<svg></svg>",
        "GIF89a",
        "%PDF-1.7",
    ] {
        cases.push((
            format!("text {text:?}"),
            text.as_bytes().to_vec(),
            "image/png".into(),
        ));
    }
    // A valid PNG header that declares 30000x30000 pixels.
    let mut huge = good_png.clone();
    huge[16..20].copy_from_slice(&30_000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&30_000u32.to_be_bytes());
    cases.push((
        "30000x30000 header".into(),
        huge.clone(),
        "image/png".into(),
    ));
    cases.push((
        "30000x30000 header, no type".into(),
        huge,
        "application/octet-stream".into(),
    ));
    for content_type in [
        "text/plain",
        "application/json",
        "image/gif",
        "image/svg+xml",
        "video/mp4",
    ] {
        cases.push((
            format!("valid PNG sent as {content_type}"),
            good_png.clone(),
            content_type.into(),
        ));
    }
    cases.push((
        "PNG declared as JPEG".into(),
        good_png.clone(),
        "image/jpeg".into(),
    ));
    cases.push((
        "JPEG declared as PNG".into(),
        good_jpeg.clone(),
        "image/png".into(),
    ));
    cases.push((
        "body over the limit".into(),
        vec![0x89; MAX_BODY + 1],
        "image/png".into(),
    ));
    cases
}

#[tokio::test]
async fn malformed_uploads_get_a_clear_4xx_and_store_nothing() {
    let api = start_api().await;
    let cases = malformed_uploads();
    assert!(cases.len() >= 200, "{} cases", cases.len());
    for (name, body, content_type) in cases {
        let response = api.post(body, &content_type, None).await;
        let status = response.status();
        assert!(
            status.is_client_error(),
            "{name}: expected a 4xx, got {status}"
        );
        let body: serde_json::Value = response
            .json()
            .await
            .unwrap_or_else(|e| panic!("{name}: error body is not JSON: {e}"));
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty() && body["error"]["code"].is_string(),
            "{name}: error body lacks code/message: {body}"
        );
    }
    assert_eq!(api.total_jobs().await, 0, "a rejected request stored a job");
    assert_eq!(
        api.blobs.count("inputs").await.unwrap(),
        0,
        "a rejected request stored a blob"
    );
}

#[tokio::test]
async fn openapi_document_lists_the_job_routes() {
    let api = start_api().await;
    let doc: serde_json::Value = api
        .client
        .get(format!("{}/openapi.json", api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in ["/v1/jobs", "/v1/jobs/{id}", "/v1/jobs/{id}/result"] {
        assert!(doc["paths"][path].is_object(), "missing {path}");
    }
    let ready = api
        .client
        .get(format!("{}/readyz", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = api
        .client
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ocr_submit_seconds"), "{metrics}");
}

fn redis_url() -> String {
    std::env::var("OCR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[tokio::test]
async fn redis_rate_limit_answers_429_with_retry_after() {
    let guard = RedisGuard::connect(&redis_url(), 3)
        .await
        .expect("Redis for tests");
    let api = start_api_with(Some(guard)).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..5 {
        let response = api
            .client
            .post(format!("{}/v1/jobs", api.base))
            .header("content-type", "image/png")
            .body(png(40 + i, 20))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            retry_after = response.headers().get("retry-after").cloned();
        }
    }
    // A minute boundary can fall inside the loop and reset the window once.
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    assert!((3..=4).contains(&accepted), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let seconds: u64 = retry_after.unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&seconds));
    assert_eq!(api.total_jobs().await, accepted as u64);
}

#[tokio::test]
async fn redis_remembers_idempotency_keys_and_still_rejects_other_payloads() {
    let guard = RedisGuard::connect(&redis_url(), 0)
        .await
        .expect("Redis for tests");
    let api = start_api_with(Some(guard.clone())).await;
    let key = format!("k-{}", uuid::Uuid::now_v7().simple());
    let first: serde_json::Value = api
        .post(png(60, 20), "image/png", Some(&key))
        .await
        .json()
        .await
        .unwrap();
    let cached = guard
        .cached_key(api.tenant.as_str(), &key)
        .await
        .expect("key cached in Redis");
    assert_eq!(cached.job_id.to_string(), first["id"].as_str().unwrap());
    let replay = api.post(png(60, 20), "image/png", Some(&key)).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let other = api.post(png(61, 20), "image/png", Some(&key)).await;
    assert_eq!(other.status(), 422);
}

#[tokio::test]
async fn submissions_work_when_redis_is_down() {
    // A port nothing listens on: connecting fails and the API runs without Redis.
    let url = format!("redis://:hunter2@127.0.0.1:{}", common::free_port());
    let down = RedisGuard::connect(&url, 1).await;
    let error = down.as_ref().err().map(|e| format!("{e} / {e:?}"));
    let error = error.expect("no Redis listens there");
    assert!(!error.contains("hunter2"), "the password leaked: {error}");
    let api = start_api_with(down.ok()).await;
    for i in 0..3 {
        assert_eq!(
            api.post(png(30 + i, 20), "image/png", None).await.status(),
            202
        );
    }
}

/// A `redis-server` of the test's own on a free port, without persistence.
struct PrivateRedis {
    port: u16,
    server: std::process::Child,
}

impl PrivateRedis {
    async fn start() -> PrivateRedis {
        let port = common::free_port();
        let server = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        // Owned at once, so a panic below still kills it (Drop).
        let redis = PrivateRedis { port, server };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return redis;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("redis-server did not listen on {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: the connection drops, the port refuses.
    fn kill(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis is an optimisation, never a dependency: when it dies under a
/// running API, rate limiting and the idempotency cache fail open and every
/// submission is still answered at once, with idempotency kept by the
/// database.
#[tokio::test]
async fn submissions_go_on_when_redis_dies_mid_run() {
    let mut redis = PrivateRedis::start().await;
    let guard = RedisGuard::connect(&redis.url(), 1000)
        .await
        .expect("the private Redis");
    let api = start_api_with(Some(guard)).await;
    let key = format!("key-{}", uuid::Uuid::now_v7().simple());
    let first = api.post(png(50, 20), "image/png", Some(&key)).await;
    assert_eq!(first.status(), 202);
    let first: serde_json::Value = first.json().await.unwrap();

    redis.kill();
    for i in 0..5 {
        let started = std::time::Instant::now();
        let response = api.post(png(51 + i, 20), "image/png", None).await;
        assert_eq!(response.status(), 202, "submission {i} without Redis");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "submission {i} took {:?} without Redis",
            started.elapsed()
        );
    }
    // The cache is gone; the database still replays the key.
    let replay = api.post(png(50, 20), "image/png", Some(&key)).await;
    assert_eq!(replay.status(), 202);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], first["id"]);
    assert_eq!(api.total_jobs().await, 6);
}

/// With `redis.rate_limit_when_down = "closed"`, a dead Redis means no
/// unlimited submissions: each is refused at once with 503 and `Retry-After`,
/// and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limiting_that_fails_closed_refuses_while_redis_is_down() {
    let mut redis = PrivateRedis::start().await;
    let guard = RedisGuard::connect(&redis.url(), 1000)
        .await
        .expect("the private Redis")
        .failing_closed(true);
    let api = start_api_with(Some(guard)).await;
    assert_eq!(api.post(png(50, 20), "image/png", None).await.status(), 202);
    redis.kill();
    for i in 0..3 {
        let started = std::time::Instant::now();
        let refused = api.post(png(51 + i, 20), "image/png", None).await;
        assert_eq!(refused.status(), 503, "submission {i} without Redis");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(refused.headers().contains_key("retry-after"));
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "rate_limiter_unavailable");
    }
    assert_eq!(api.total_jobs().await, 1);
}

/// Starts a raw upload that declares `declared` bytes, sends a few and then
/// stalls, as a slow or hostile client does; the connection stays open.
async fn stalled_upload(api: &Api, declared: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = api.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/jobs HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-type: image/png\r\ncontent-length: {declared}\r\n\r\n",
        api.key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&png(4, 4)[..10]).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_submission_cap_requests_are_shed_at_once_with_retry_after() {
    let api = start_api_limited(None, |limits| {
        limits.max_concurrent_submissions = 1;
        limits.body_timeout_ms = 60_000;
    })
    .await;
    let _holding = stalled_upload(&api, 5_000).await;
    // Give the server a moment to take the stalled request's slot.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let shed = api.post(png(64, 32), "image/png", None).await;
    assert_eq!(shed.status(), 503);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "shed after {:?}",
        started.elapsed()
    );
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    assert_eq!(api.total_jobs().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_off_and_frees_its_slot() {
    let api = start_api_limited(None, |limits| {
        limits.max_concurrent_submissions = 1;
        limits.body_timeout_ms = 300;
    })
    .await;
    let mut stalled = stalled_upload(&api, 5_000).await;
    let mut answer = Vec::new();
    use tokio::io::AsyncReadExt;
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        loop {
            let n = stalled.read(&mut buf).await.unwrap();
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the stalled upload was never answered");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // Its slot is free again.
    let accepted = api.post(png(64, 32), "image/png", None).await;
    assert_eq!(accepted.status(), 202);
}

/// Fuzzing the multipart parser and the upload checks through the real
/// router: a valid multipart upload damaged anywhere (bytes overwritten, cut
/// short, junk inserted, the boundary parameter changed) is answered 202 or a
/// 4xx, never a 5xx or a hang, and only the 202s leave a job behind.
#[test]
fn damaged_multipart_uploads_get_4xx_never_5xx_and_store_nothing() {
    use proptest::prelude::*;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let api = runtime.block_on(start_api());
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", api.key).parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let image = png(40, 20);
    let mut valid = b"--XyZ\r\ncontent-disposition: form-data; name=\"file\"; filename=\"p.png\"\r\ncontent-type: image/png\r\n\r\n".to_vec();
    valid.extend_from_slice(&image);
    valid.extend_from_slice(b"\r\n--XyZ--\r\n");
    // Undamaged, the upload is accepted: the damage below is what gets it refused.
    let intact = runtime.block_on(async {
        client
            .post(format!("{}/v1/jobs", api.base))
            .header("content-type", "multipart/form-data; boundary=XyZ")
            .body(valid.clone())
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(intact, 202);
    let accepted = std::sync::atomic::AtomicU64::new(1);
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256);
    proptest!(ProptestConfig::with_cases(cases), |(
        overwrites in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in prop::option::of(any::<usize>()),
        insert in prop::option::of((any::<usize>(), prop::collection::vec(any::<u8>(), 1..32))),
        boundary in prop::sample::select(vec!["XyZ", "xyz", "", "XyZ; charset=utf-8", "\"XyZ\"", "X"]),
    )| {
        let mut body = valid.clone();
        for (at, byte) in overwrites {
            let at = at % body.len();
            body[at] = byte;
        }
        if let Some((at, junk)) = insert {
            let at = at % (body.len() + 1);
            body.splice(at..at, junk);
        }
        if let Some(cut) = cut {
            body.truncate(cut % (body.len() + 1));
        }
        let status = runtime.block_on(async {
            client
                .post(format!("{}/v1/jobs", api.base))
                .header("content-type", format!("multipart/form-data; boundary={boundary}"))
                .body(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
        let status = status.map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
        prop_assert!(status == 202 || (400..500).contains(&status), "answered {}", status);
        if status == 202 {
            accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let stored = runtime.block_on(api.total_jobs());
    let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
    println!("{accepted} of {} uploads accepted", cases + 1);
    assert_eq!(stored, accepted);
}

/// Without a valid key nothing is stored and nothing is read: 401 with
/// `WWW-Authenticate: Bearer`, whether the key is missing, made up,
/// malformed or revoked.
#[tokio::test]
async fn requests_without_a_valid_key_are_refused_and_store_nothing() {
    let api = start_api().await;
    let accepted = api.post(png(64, 32), "image/png", None).await;
    assert_eq!(accepted.status(), 202);
    let id = accepted.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, revoked) = new_tenant(&api.store).await;
    let revoked_id = ocr_runtime::domain::tenant::key_id(&revoked)
        .unwrap()
        .to_owned();
    assert!(api
        .store
        .revoke_key(&revoked_id, ocr_runtime::storage::now_ms())
        .await
        .unwrap());
    let made_up = NewKey::generate().unwrap().token;
    let anonymous = reqwest::Client::new();
    for authorization in [
        None,
        Some(format!("Bearer {made_up}")),
        Some(format!("Basic {}", api.key)),
        Some(api.key.clone()),
        Some(format!("Bearer {revoked}")),
    ] {
        let with = |request: reqwest::RequestBuilder| match &authorization {
            Some(value) => request.header("authorization", value),
            None => request,
        };
        let post = with(anonymous.post(format!("{}/v1/jobs", api.base)))
            .header("content-type", "image/png")
            .body(png(64, 33))
            .send()
            .await
            .unwrap();
        assert_eq!(post.status(), 401, "POST with {authorization:?}");
        assert_eq!(post.headers()["www-authenticate"], "Bearer");
        for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/result")] {
            let get = with(anonymous.get(format!("{}{path}", api.base)))
                .send()
                .await
                .unwrap();
            assert_eq!(get.status(), 401, "GET {path} with {authorization:?}");
        }
    }
    assert_eq!(api.total_jobs().await, 1);
    // Probes and metrics stay open: the kubelet and Prometheus bring no key.
    for path in ["/livez", "/readyz", "/metrics"] {
        let probe = anonymous
            .get(format!("{}{path}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(probe.status(), 200, "{path}");
    }
}

/// A job belongs to its tenant: another tenant's GET and result read
/// exactly like an id that does not exist.
#[tokio::test]
async fn a_tenant_cannot_see_another_tenants_job() {
    let api = start_api().await;
    let accepted = api.post(png(64, 32), "image/png", None).await;
    let id = accepted.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, other_key) = new_tenant(&api.store).await;
    let other = client_with_key(&other_key);
    let missing = ocr_runtime::domain::JobId::new();
    for path in ["", "/result"] {
        let theirs = other
            .get(format!("{}/v1/jobs/{id}{path}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(theirs.status(), 404, "another tenant's GET {path}");
        let body: serde_json::Value = theirs.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
        let nobody = other
            .get(format!("{}/v1/jobs/{missing}{path}", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(nobody.status(), 404);
    }
    let own = api
        .client
        .get(format!("{}/v1/jobs/{id}", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
}

/// The same idempotency key from two tenants is two keys: two jobs, and
/// neither request is a replay of the other.
#[tokio::test]
async fn idempotency_keys_are_scoped_per_tenant() {
    let api = start_api().await;
    let (_, other_key) = new_tenant(&api.store).await;
    let other = client_with_key(&other_key);
    let body = png(64, 32);
    let first = api
        .post(body.clone(), "image/png", Some("shared-key"))
        .await;
    assert_eq!(first.status(), 202);
    let second = other
        .post(format!("{}/v1/jobs", api.base))
        .header("content-type", "image/png")
        .header("idempotency-key", "shared-key")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 202);
    assert!(!second.headers().contains_key("idempotent-replayed"));
    let first: serde_json::Value = first.json().await.unwrap();
    let second: serde_json::Value = second.json().await.unwrap();
    assert_ne!(first["id"], second["id"]);
    // Each tenant's retry replays its own job.
    let again = api.post(body, "image/png", Some("shared-key")).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(api.total_jobs().await, 2);
}

/// `limits.max_open_jobs_per_tenant`: a tenant with that many unfinished
/// jobs gets 429 `quota_exceeded`; other tenants are not affected.
#[tokio::test]
async fn a_tenant_past_its_quota_gets_429_and_others_still_submit() {
    let api = start_api_limited(None, |limits| limits.max_open_jobs_per_tenant = 2).await;
    for i in 0..2 {
        let accepted = api.post(png(64 + i, 32), "image/png", None).await;
        assert_eq!(accepted.status(), 202);
    }
    let refused = api.post(png(70, 32), "image/png", None).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "quota_exceeded");
    let (_, other_key) = new_tenant(&api.store).await;
    let other = client_with_key(&other_key)
        .post(format!("{}/v1/jobs", api.base))
        .header("content-type", "image/png")
        .body(png(71, 32))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 202);
    assert_eq!(api.total_jobs().await, 3);
}
