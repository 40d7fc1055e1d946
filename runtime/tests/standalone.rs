//! Standalone mode end to end with the real Candle engine and PP-OCR weights:
//! submit over HTTP, read the text back, and survive crashes.

mod common;

use common::{engine, INVOICE};

use ocr_runtime::config::{Config, QueueKind};
use ocr_runtime::domain::{JobId, JobStatus, NewJob};
use ocr_runtime::standalone;
use ocr_runtime::storage::jobs::Changes;
use ocr_runtime::storage::{BlobStore, JobStore};
use std::path::Path;
use std::time::{Duration, Instant};

fn config_in(dir: &Path) -> Config {
    let mut config = Config::default();
    config.database.url = format!("sqlite://{}?mode=rwc", dir.join("ocr.db").display());
    config.blob.url = dir.join("blobs").display().to_string();
    config.server.http_addr = "127.0.0.1:0".into();
    config.server.grpc_addr = "127.0.0.1:0".into();
    config.queue.kind = QueueKind::Memory;
    config
}

async fn wait_final(client: &reqwest::Client, base: &str, id: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let job: serde_json::Value = client
            .get(format!("{base}/v1/jobs/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let status = job["status"].as_str().unwrap_or_default().to_owned();
        if ["Succeeded", "Failed", "DeadLettered"].contains(&status.as_str()) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} stuck in {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn normalised(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitted_image_is_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let server = standalone::start(&config_in(dir.path()), engine())
        .await
        .unwrap();
    let base = format!("http://{}", server.local_addr);
    let client = reqwest::Client::new();
    let accepted: serde_json::Value = client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .body(INVOICE)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap().to_owned();
    let job = wait_final(&client, &base, &id).await;
    assert_eq!(job["status"], "Succeeded", "{job}");
    assert_eq!(job["attempts"], 1);

    let page: serde_json::Value = client
        .get(format!("{base}/v1/jobs/{id}/result"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = normalised(page["text"].as_str().unwrap());
    for expected in [
        "Invoice 2026-11-27",
        "Total: 1,234.50 EUR",
        "Thank you for your order",
    ] {
        assert!(text.contains(expected), "{expected:?} not in {text:?}");
    }
    let lines = page["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 3, "{page}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_left_unfinished_by_a_crash_complete_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    // What a crash leaves behind: one job mid-processing, one never published.
    let mut ids = Vec::new();
    {
        std::fs::create_dir_all(dir.path()).unwrap();
        let store = JobStore::connect(&config.database.url, 1).await.unwrap();
        store.migrate().await.unwrap();
        let blobs = BlobStore::from_url(&config.blob.url).unwrap();
        for crashed_in in [JobStatus::Processing, JobStatus::Accepted] {
            let id = JobId::new();
            let key = format!("inputs/{id}");
            blobs.put(&key, INVOICE.to_vec().into()).await.unwrap();
            store
                .insert(
                    &NewJob {
                        id,
                        // Read back below without a key: the anonymous tenant's.
                        client_id: ocr_runtime::domain::tenant::ANONYMOUS.into(),
                        input_key: key,
                        content_type: "image/png".into(),
                        input_sha256: "00".repeat(32),
                        input_bytes: INVOICE.len() as u64,
                        idempotency: None,
                        relay: None,
                    },
                    0,
                )
                .await
                .unwrap();
            if crashed_in == JobStatus::Processing {
                let claim = Changes {
                    count_attempt: true,
                    ..Changes::default()
                };
                store
                    .transition(
                        id,
                        JobStatus::Accepted,
                        JobStatus::Processing,
                        Some(0),
                        claim,
                        1,
                    )
                    .await
                    .unwrap();
            }
            ids.push(id);
        }
    }

    let server = standalone::start(&config, engine()).await.unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://{}", server.local_addr);
    let mut attempts = Vec::new();
    for id in &ids {
        let job = wait_final(&client, &base, &id.to_string()).await;
        assert_eq!(job["status"], "Succeeded", "{job}");
        attempts.push(job["attempts"].as_u64().unwrap());
    }
    // The interrupted attempt counts; each job ran to completion exactly once more.
    assert_eq!(attempts, vec![2, 1]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_submit_and_watch_follow_the_job_to_its_result() {
    use ocr_runtime::api::grpc::proto::{
        ocr_jobs_client::OcrJobsClient, GetJobRequest, JobStatus as Status, SubmitRequest,
    };
    let dir = tempfile::tempdir().unwrap();
    let server = standalone::start(&config_in(dir.path()), engine())
        .await
        .unwrap();
    let grpc = server.front_ends.expect("standalone serves gRPC").grpc_addr;
    let mut client = OcrJobsClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let request = SubmitRequest {
        image: bytes::Bytes::from_static(INVOICE),
        content_type: "image/png".into(),
        idempotency_key: "grpc-1".into(),
    };
    let job = client.submit(request.clone()).await.unwrap().into_inner();
    assert!(!job.replayed);
    let again = client.submit(request).await.unwrap().into_inner();
    assert_eq!((again.id.as_str(), again.replayed), (job.id.as_str(), true));

    let mut watch = client
        .watch(GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let mut last = None;
    while let Some(update) = watch.message().await.unwrap() {
        seen.push(update.status());
        last = Some(update);
    }
    let last = last.expect("at least one update");
    assert_eq!(last.status(), Status::Succeeded, "{seen:?}");
    let ranks: Vec<i32> = seen.iter().map(|s| *s as i32).collect();
    assert!(
        ranks.windows(2).all(|w| w[0] < w[1]),
        "states went backwards: {seen:?}"
    );
    let page = last.result.expect("a succeeded job carries its page");
    assert_eq!(page.lines.len(), 3);
    assert!(page.text.contains("Total: 1,234.50 EUR"), "{}", page.text);
    assert!(page
        .lines
        .iter()
        .all(|l| l.polygon.len() == 4 && l.confidence > 0.5));

    let fetched = client
        .get(GetJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.status(), Status::Succeeded);

    let bad = client
        .submit(SubmitRequest {
            image: bytes::Bytes::from_static(b"not an image"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let unknown = client
        .get(GetJobRequest {
            id: "0190c0de-0000-7000-8000-000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    server.stop().await;
}

/// gRPC with keys required: calls without a key are UNAUTHENTICATED, and a
/// job is NOT_FOUND to every tenant but its own (Get and Watch alike).
#[tokio::test]
async fn grpc_calls_need_a_key_and_see_only_their_tenants_jobs() {
    use ocr_runtime::api::grpc::proto::{
        ocr_jobs_client::OcrJobsClient, GetJobRequest, SubmitRequest,
    };
    use ocr_runtime::domain::tenant::{NewKey, Tenant};
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.auth.mode = ocr_runtime::config::AuthMode::Required;
    let server = standalone::start(&config, engine()).await.unwrap();
    let mut keys = Vec::new();
    for tenant in ["acme", "globex"] {
        let key = NewKey::generate().unwrap();
        server
            .store
            .create_key(&Tenant::parse(tenant).unwrap(), &key, 0)
            .await
            .unwrap();
        keys.push(key.token);
    }
    fn with_key<T>(key: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        request
    }
    let grpc = server.front_ends.expect("gRPC").grpc_addr;
    let mut client = OcrJobsClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let submit = SubmitRequest {
        image: bytes::Bytes::from_static(INVOICE),
        content_type: "image/png".into(),
        idempotency_key: String::new(),
    };
    let refused = client.submit(submit.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let forged = client
        .submit(with_key("ocr_0000000000000000_00", submit.clone()))
        .await
        .unwrap_err();
    assert_eq!(forged.code(), tonic::Code::Unauthenticated);

    let job = client
        .submit(with_key(&keys[0], submit))
        .await
        .unwrap()
        .into_inner();
    let get = |key: &str| with_key(key, GetJobRequest { id: job.id.clone() });
    assert_eq!(
        client.get(get(&keys[1])).await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert_eq!(
        client.watch(get(&keys[1])).await.err().map(|s| s.code()),
        Some(tonic::Code::NotFound)
    );
    assert_eq!(
        client
            .get(GetJobRequest { id: job.id.clone() })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::Unauthenticated
    );
    let own = client.get(get(&keys[0])).await.unwrap().into_inner();
    assert_eq!(own.id, job.id);
    server.stop().await;
}

/// The defaults listen on loopback only, where keys are optional; the same
/// server on every interface requires keys (auth.mode = auto).
#[tokio::test]
async fn default_listeners_are_loopback_and_other_addresses_require_keys() {
    let defaults = Config::default();
    for addr in [&defaults.server.http_addr, &defaults.server.grpc_addr] {
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        assert!(addr.ip().is_loopback(), "{addr}");
    }
    assert!(!defaults.server.grpc_reflection);

    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.server.http_addr = "0.0.0.0:0".into();
    let server = standalone::start(&config, engine()).await.unwrap();
    let front = server.front_ends.expect("front ends");
    assert!(front.keys_required);
    let base = format!("http://127.0.0.1:{}", front.http_addr.port());
    let client = reqwest::Client::new();
    let refused = client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .body(INVOICE.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // The first start made a key (main prints it); it is accepted.
    let key = standalone::first_key(&server.store, &front)
        .await
        .unwrap()
        .expect("no key existed yet");
    assert!(standalone::first_key(&server.store, &front)
        .await
        .unwrap()
        .is_none());
    let accepted = client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .header("authorization", format!("Bearer {}", key.token))
        .body(INVOICE.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 202);
    server.stop().await;
}
