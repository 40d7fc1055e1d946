//! The API's front ends as clients and sockets meet them: keys made and
//! revoked with `ocr-runtime keys` and an `ocr-runtime api` process that
//! requires them; HTTPS and gRPC over TLS from certificates made by
//! `openssl`; gRPC submissions admitted before their message is read.
//! MariaDB, librdkafka's mock cluster.

mod common;

use common::{free_port, role_command, spawn_role, terminate, wait_http_ok, MysqlDatabase};
use ocr_runtime::config::{Config, QueueKind};
use rdkafka::mocking::MockCluster;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn mock_kafka() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock Kafka cluster");
    let jobs = Config::default().queue.jobs_topic;
    cluster.create_topic(&jobs, 1, 1).expect("jobs topic");
    cluster
}

fn config(db: &MysqlDatabase, brokers: &str, blobs: &Path) -> Config {
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.blob.url = blobs.display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = brokers.to_owned();
    config.server.http_addr = "127.0.0.1:0".into();
    config.server.grpc_addr = "127.0.0.1:0".into();
    config
}

/// Runs `ocr-runtime keys ARGS`; its stdout (logs go to stderr).
fn keys(config: &Config, args: &[&str]) -> String {
    let mut command_line = vec!["keys"];
    command_line.extend_from_slice(args);
    let output = role_command(&command_line, config, free_port(), &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .expect("running ocr-runtime keys");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "keys {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

async fn post(client: &reqwest::Client, base: &str, key: Option<&str>) -> reqwest::Response {
    let mut request = client
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .body(common::png(64, 32));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("the API answers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_on_the_command_line_open_the_api_and_revoking_one_closes_it() {
    let kafka = mock_kafka();
    let db = MysqlDatabase::create().await;
    let blobs = tempfile::tempdir().unwrap();
    let config = config(&db, &kafka.bootstrap_servers(), blobs.path());

    let created = keys(&config, &["create", "--tenant", "acme"]);
    let key = created.lines().last().expect("output").to_owned();
    assert!(
        ocr_runtime::domain::tenant::key_id(&key).is_some(),
        "the last line is the key alone: {created:?}"
    );
    let id = ocr_runtime::domain::tenant::key_id(&key)
        .unwrap()
        .to_owned();
    let refused = role_command(
        &["keys", "create", "--tenant", "Not A Name"],
        &config,
        0,
        &[],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .status()
    .unwrap();
    assert!(!refused.success(), "a bad tenant name is refused");
    let listed: serde_json::Value = serde_json::from_str(&keys(&config, &["list", "--json"]))
        .expect("keys list --json is JSON");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["tenant"], "acme");
    let secret = &key[key.len() - 32..];
    assert!(!listed.to_string().contains(secret), "list shows no key");

    // The API on loopback, made to require keys as in a cluster; a checked
    // key is trusted for 200 ms.
    let port = free_port();
    let api = spawn_role(
        &["api"],
        &config,
        port,
        &[
            ("OCR_AUTH__MODE", "required".into()),
            ("OCR_AUTH__KEY_CACHE_MS", "200".into()),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(&base, "/readyz", Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    assert_eq!(post(&client, &base, None).await.status(), 401);
    let accepted = post(&client, &base, Some(&key)).await;
    assert_eq!(accepted.status(), 202);
    let job: serde_json::Value = accepted.json().await.unwrap();
    let own = client
        .get(format!("{base}/v1/jobs/{}", job["id"].as_str().unwrap()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200);
    let stored = db
        .store()
        .await
        .get(job["id"].as_str().unwrap().parse().unwrap())
        .await;
    assert_eq!(stored.unwrap().expect("stored").client_id, "acme");

    let revoked = keys(&config, &["revoke", &id]);
    assert!(revoked.contains(&id), "{revoked}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        post(&client, &base, Some(&key)).await.status(),
        401,
        "a revoked key stops working within auth.key_cache_ms"
    );
    terminate(api).await;
}

/// A test CA and a server certificate it signed for `localhost` and
/// 127.0.0.1: (CA certificate, server certificate, server key) files.
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    const NEW_EC_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let openssl = |args: String| {
        let done = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args.split(' '))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(done.success(), "openssl {args} failed");
    };
    openssl(format!(
        "req -x509 {NEW_EC_KEY} -days 1 -subj /CN=ocr-test-ca -keyout ca.key -out ca.crt"
    ));
    openssl(format!(
        "req {NEW_EC_KEY} -subj /CN=localhost -keyout tls.key -out tls.csr"
    ));
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        "x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 \
         -extfile server.ext -out tls.crt"
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    );
    (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_certificate_http_and_grpc_speak_tls_only() {
    use ocr_runtime::api::grpc::proto::{ocr_jobs_client::OcrJobsClient, GetJobRequest};
    let kafka = mock_kafka();
    let db = MysqlDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&db, &kafka.bootstrap_servers(), dir.path());
    let (ca, cert, key) = certificates(dir.path());
    config.server.tls_cert_file = cert.display().to_string();

    let half = ocr_runtime::roles::start_api(&config).await;
    assert!(half.is_err(), "a certificate without its key is refused");
    config.server.tls_key_file = key.display().to_string();
    let api = ocr_runtime::roles::start_api(&config).await.unwrap();
    let front = api.front_ends.expect("front ends");
    assert!(front.tls);
    let pem = std::fs::read(&ca).unwrap();

    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", front.http_addr.port());
    assert_eq!(post(&https, &base, None).await.status(), 202);
    let plain = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/v1/jobs",
            front.http_addr.port()
        ))
        .body(common::png(64, 32))
        .send()
        .await;
    assert!(
        plain.map(|r| r.status().as_u16()).unwrap_or(0) != 202,
        "plain HTTP must not be served"
    );
    // A client that does not trust the certificate cannot talk at all.
    assert!(reqwest::get(format!("{base}/livez")).await.is_err());

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pem))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!(
        "https://localhost:{}",
        front.grpc_addr.port()
    ))
    .unwrap()
    .tls_config(tls)
    .unwrap()
    .connect()
    .await
    .expect("a TLS gRPC connection");
    let missing = OcrJobsClient::new(channel)
        .get(GetJobRequest {
            id: ocr_runtime::domain::JobId::new().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");
    let plain = async {
        OcrJobsClient::connect(format!("http://127.0.0.1:{}", front.grpc_addr.port()))
            .await
            .ok()?
            .get(GetJobRequest {
                id: ocr_runtime::domain::JobId::new().to_string(),
            })
            .await
            .ok()
    };
    let plain = tokio::time::timeout(Duration::from_secs(10), plain).await;
    assert!(
        !matches!(plain, Ok(Some(_))),
        "plain-text gRPC must not be served"
    );
    api.stop().await;
}

/// Raw HTTP/2 `Submit` calls on one connection that send the message
/// prefix and then stall.
struct StalledUploads {
    grpc: std::net::SocketAddr,
    h2: h2::client::SendRequest<bytes::Bytes>,
}

type Answer = h2::client::ResponseFuture;

impl StalledUploads {
    async fn connect(grpc: std::net::SocketAddr) -> StalledUploads {
        let tcp = tokio::net::TcpStream::connect(grpc).await.unwrap();
        let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        StalledUploads { grpc, h2 }
    }

    /// A call whose message says it is `length` bytes long, and nothing more.
    async fn declare(&self, length: u32) -> (Answer, h2::SendStream<bytes::Bytes>) {
        let mut h2 = self.h2.clone().ready().await.unwrap();
        let request =
            axum::http::Request::post(format!("http://{}/ocr.v1.OcrJobs/Submit", self.grpc))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
        let (answer, mut body) = h2.send_request(request, false).unwrap();
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&length.to_be_bytes());
        body.send_data(prefix.into(), false).unwrap();
        (answer, body)
    }
}

/// The `grpc-status` a call is answered with (in its headers: the server
/// refuses or cuts off without a message), within `within`.
async fn answered_status(answer: Answer, within: Duration) -> String {
    let answer = tokio::time::timeout(within, answer)
        .await
        .expect("the call is answered in time")
        .unwrap();
    answer
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("missing")
        .to_owned()
}

/// A gRPC upload that stalls holds its admission only until the body
/// timeout; meanwhile a submission past the cap is refused at once, before
/// tonic reads (and buffers) its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_submissions_are_admitted_before_their_message_is_read() {
    use ocr_runtime::api::grpc::proto::{ocr_jobs_client::OcrJobsClient, SubmitRequest};
    let kafka = mock_kafka();
    let db = MysqlDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&db, &kafka.bootstrap_servers(), dir.path());
    config.limits.max_concurrent_submissions = 1;
    config.limits.body_timeout_ms = 1_000;
    let api = ocr_runtime::roles::start_api(&config).await.unwrap();
    let grpc = api.front_ends.expect("front ends").grpc_addr;

    // A raw HTTP/2 Submit that announces a message and never sends it.
    let uploads = StalledUploads::connect(grpc).await;
    let (stalled, body) = uploads.declare(4096).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut client = OcrJobsClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let submit = SubmitRequest {
        image: common::png(64, 32).into(),
        content_type: "image/png".into(),
        idempotency_key: String::new(),
    };
    let started = std::time::Instant::now();
    let shed = client.submit(submit.clone()).await.unwrap_err();
    assert_eq!(shed.code(), tonic::Code::Unavailable, "{shed}");
    assert!(started.elapsed() < Duration::from_secs(1));

    // The stalled call is cut off after limits.body_timeout_ms...
    let status = answered_status(stalled, Duration::from_secs(5)).await;
    assert_ne!(status, "0", "a stalled upload must not succeed");
    drop(body);
    // ...and its slot is free again.
    let job = client.submit(submit).await.unwrap().into_inner();
    assert!(!job.id.is_empty());
    api.stop().await;
}

/// A gRPC submission costs the memory budget the size its message declares
/// (the length prefix), as an HTTP upload with `Content-Length` does: many
/// small uploads go through at once, while uploads that declare more than
/// the budget has left are refused before tonic buffers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_submissions_cost_the_budget_what_their_message_declares() {
    use ocr_runtime::api::grpc::proto::{ocr_jobs_client::OcrJobsClient, SubmitRequest};
    let kafka = mock_kafka();
    let db = MysqlDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&db, &kafka.bootstrap_servers(), dir.path());
    // Room for one upload of the largest accepted size: counted that way,
    // gRPC submissions would go one at a time.
    config.limits.max_body_bytes = 1024 * 1024;
    config.limits.max_buffered_bytes = 2 * 1024 * 1024;
    // The stalled uploads below are cut off after this, so the API stops soon.
    config.limits.body_timeout_ms = 3_000;
    let api = ocr_runtime::roles::start_api(&config).await.unwrap();
    let grpc = api.front_ends.expect("front ends").grpc_addr;
    let client = OcrJobsClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let submit = SubmitRequest {
        image: common::png(64, 32).into(),
        content_type: "image/png".into(),
        idempotency_key: String::new(),
    };

    let calls: Vec<_> = (0..24)
        .map(|_| {
            let (mut client, submit) = (client.clone(), submit.clone());
            tokio::spawn(async move { client.submit(submit).await })
        })
        .collect();
    for call in calls {
        let job = call.await.unwrap().expect("a small upload is admitted");
        assert!(!job.into_inner().id.is_empty());
    }

    // Two stalled uploads that each declare 900 KiB hold 1.8 MiB of the
    // 2 MiB budget...
    let uploads = StalledUploads::connect(grpc).await;
    let _first = uploads.declare(900 * 1024).await;
    let _second = uploads.declare(900 * 1024).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so a third is refused at once, without its message being read...
    let (third, _body) = uploads.declare(900 * 1024).await;
    let status = answered_status(third, Duration::from_secs(2)).await;
    assert_eq!(status, "14", "UNAVAILABLE, got {status}");
    // ...while a small one still fits in what is left.
    let job = client
        .clone()
        .submit(submit)
        .await
        .expect("small upload fits");
    assert!(!job.into_inner().id.is_empty());
    api.stop().await;
}
