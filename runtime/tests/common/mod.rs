//! Helpers shared by the integration tests: throw-away MariaDB databases and
//! SQLite files, and generated images.
#![allow(dead_code)]

pub mod real_broker;

use ocr_runtime::storage::JobStore;

/// Where the MariaDB server for tests is; CI and the dev machine run one.
pub fn mysql_server_url() -> String {
    std::env::var("OCR_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A fresh database on the test server, dropped when the guard goes.
pub struct MysqlDatabase {
    pub url: String,
    pub name: String,
}

impl MysqlDatabase {
    pub async fn create() -> MysqlDatabase {
        use sqlx::Connection;
        let name = format!("ocr_test_{}", uuid::Uuid::now_v7().simple());
        let server = mysql_server_url();
        let mut conn = sqlx::MySqlConnection::connect(&server)
            .await
            .unwrap_or_else(|e| panic!("MariaDB must run at {server} for these tests: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        MysqlDatabase {
            url: format!("{server}/{name}"),
            name,
        }
    }

    pub async fn store(&self) -> JobStore {
        let store = JobStore::connect(&self.url, 8).await.expect("connect");
        store.migrate().await.expect("migrate");
        store
    }
}

impl Drop for MysqlDatabase {
    fn drop(&mut self) {
        let server = mysql_server_url();
        let name = self.name.clone();
        // Drop runs outside any runtime guarantee; use a short-lived thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    use sqlx::Connection;
                    if let Ok(mut conn) = sqlx::MySqlConnection::connect(&server).await {
                        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                            .execute(&mut conn)
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

pub async fn sqlite_store(dir: &std::path::Path) -> JobStore {
    let url = format!("sqlite://{}?mode=rwc", dir.join("jobs.db").display());
    let store = JobStore::connect(&url, 1).await.expect("open sqlite");
    store.migrate().await.expect("migrate sqlite");
    store
}

/// A small valid PNG: a white page with a dark bar.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    encode(width, height, image::ImageFormat::Png)
}

pub fn jpeg(width: u32, height: u32) -> Vec<u8> {
    encode(width, height, image::ImageFormat::Jpeg)
}

fn encode(width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        // Noise-like content so compressed files are not trivially tiny.
        let v = ((x * 31 + y * 17) ^ (x * y)) as u8;
        image::Rgb([v, v.wrapping_mul(3), 255 - v])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, format)
        .expect("encoding a generated image");
    out.into_inner()
}

/// A page of one colour: under a megabyte of PNG per 40 megapixels, 120 MB
/// once decoded. What a hostile client sends to make a server decode.
pub fn blank_png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding a generated image");
    out.into_inner()
}

/// The most memory a process has held (`VmHWM`), in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmHWM")
}

/// The memory a process holds now (`VmRSS`), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_status_bytes(pid, "VmRSS")
}

fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        * 1024
}

pub const INVOICE: &[u8] = include_bytes!("../data/invoice.png");

/// The invoice page repeated `times` times vertically: more lines, longer OCR.
pub fn invoice_page(times: u32) -> Vec<u8> {
    let tile = image::load_from_memory(INVOICE)
        .expect("invoice fixture")
        .to_rgb8();
    let mut page = image::RgbImage::from_pixel(
        tile.width(),
        tile.height() * times,
        image::Rgb([255, 255, 255]),
    );
    for i in 0..times {
        image::imageops::replace(&mut page, &tile, 0, i64::from(i * tile.height()));
    }
    let mut out = std::io::Cursor::new(Vec::new());
    page.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode page");
    out.into_inner()
}

/// Loading the weights takes a moment; tests in one binary share one engine.
pub fn engine() -> std::sync::Arc<ocr_runtime::engine::CandleRecognizer> {
    use std::sync::{Arc, OnceLock};
    static ENGINE: OnceLock<Arc<ocr_runtime::engine::CandleRecognizer>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            Arc::new(
                ocr_runtime::engine::CandleRecognizer::load(
                    &ocr_runtime::config::Config::default().model,
                )
                .expect("PP-OCR weights (run scripts/fetch-models.sh)"),
            )
        })
        .clone()
}

/// A port that was free a moment ago, for child processes that need a fixed one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls the store until the job reaches `status` (panics on timeout or on a
/// different final state).
pub async fn wait_for_status(
    store: &JobStore,
    id: ocr_runtime::domain::JobId,
    status: ocr_runtime::domain::JobStatus,
    timeout: std::time::Duration,
) -> ocr_runtime::domain::Job {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(job) = store.get(id).await.expect("reading the job") {
            if job.status == status {
                return job;
            }
            assert!(
                !job.status.is_terminal(),
                "job {id} ended {} ({:?}), expected {status}",
                job.status,
                job.error
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} never reached {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Runs `ocr-runtime ROLE` as a separate process configured through the
/// environment only, exactly as a Deployment would. `extra` adds or
/// overrides variables (`OCR_WORKER__MODE`, `OCR_FAULT`, ...).
pub fn spawn_role(
    role: &[&str],
    config: &ocr_runtime::config::Config,
    http_port: u16,
    extra: &[(&str, String)],
) -> std::process::Child {
    role_command(role, config, http_port, extra)
        .spawn()
        .expect("spawning ocr-runtime")
}

/// The command [`spawn_role`] runs, for a test that redirects its output.
pub fn role_command(
    role: &[&str],
    config: &ocr_runtime::config::Config,
    http_port: u16,
    extra: &[(&str, String)],
) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ocr-runtime"));
    command
        .args(role)
        .env("OCR_DATABASE__URL", &config.database.url)
        .env("OCR_BLOB__URL", &config.blob.url)
        .env("OCR_QUEUE__KIND", "kafka")
        .env("OCR_QUEUE__BROKERS", &config.queue.brokers)
        .env(
            "OCR_QUEUE__REPUBLISH_AFTER_MS",
            config.queue.republish_after_ms.to_string(),
        )
        .env("OCR_SERVER__HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env("OCR_SERVER__GRPC_ADDR", "127.0.0.1:0")
        // Logs go to stdout; the test harness shows them when a test fails.
        .env("RUST_LOG", "info,tower_http=warn")
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit());
    for (key, value) in extra {
        command.env(key, value);
    }
    command
}

/// Waits until `GET {base}/{path}` answers 200.
pub async fn wait_http_ok(base: &str, path: &str, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(response) = reqwest::get(format!("{base}{path}")).await {
            if response.status().is_success() {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{base}{path} never answered 200"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// POSTs a PNG to `{base}/v1/jobs`; the id the API answered with.
pub async fn submit_png(base: &str, body: Vec<u8>) -> ocr_runtime::domain::JobId {
    let accepted: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .body(body)
        .send()
        .await
        .expect("submitting a job")
        .json()
        .await
        .expect("a JSON answer");
    accepted["id"]
        .as_str()
        .expect("an id in the answer")
        .parse()
        .expect("a job id")
}

/// Sends SIGTERM and waits for a clean exit.
pub async fn terminate(mut child: std::process::Child) -> std::process::ExitStatus {
    let signalled = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(signalled.success());
    tokio::task::spawn_blocking(move || child.wait().expect("waiting for a child"))
        .await
        .expect("join")
}

/// A completion-webhook receiver: checks every signature, records job ids in
/// arrival order, and answers `status` (to simulate a broken receiver).
pub struct WebhookReceiver {
    pub url: String,
    pub secret: String,
    pub deliveries: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub bad_signatures: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// What it answers from now on (a receiver that comes back, say).
    pub status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl WebhookReceiver {
    pub async fn start(status: u16) -> WebhookReceiver {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        let secret = "topology-secret".to_owned();
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let bad_signatures = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(std::sync::atomic::AtomicU16::new(status));
        let (recorded, bad, key) = (deliveries.clone(), bad_signatures.clone(), secret.clone());
        let answering = answer.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (recorded, bad, key) = (recorded.clone(), bad.clone(), key.clone());
                let status = answering.load(Ordering::SeqCst);
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let valid = ocr_runtime::notify::verify_signature(
                        key.as_bytes(),
                        &header(ocr_runtime::notify::HEADER_TIMESTAMP),
                        &body,
                        &header(ocr_runtime::notify::HEADER_SIGNATURE),
                    );
                    if !valid {
                        bad.fetch_add(1, Ordering::SeqCst);
                        return StatusCode::UNAUTHORIZED;
                    }
                    recorded
                        .lock()
                        .unwrap()
                        .push(header(ocr_runtime::notify::HEADER_JOB_ID));
                    StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        WebhookReceiver {
            url: format!("http://{addr}/hook"),
            secret,
            deliveries,
            bad_signatures,
            status: answer,
            _shutdown: tx,
        }
    }

    /// Job ids after the receiver's deduplication.
    pub fn distinct(&self) -> std::collections::HashSet<String> {
        self.deliveries.lock().unwrap().iter().cloned().collect()
    }
}

/// A MariaDB server of the test's own (data in a temporary directory, on
/// a free port), so a test can stop and restart it without disturbing the
/// shared one the other tests use.
pub struct PrivateMariaDb {
    dir: tempfile::TempDir,
    pub port: u16,
    server: Option<std::process::Child>,
}

impl PrivateMariaDb {
    pub async fn start() -> PrivateMariaDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let installed = std::process::Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                &format!("--datadir={}", dir.path().join("data").display()),
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("mariadb-install-db (Debian package mariadb-server) must be installed");
        assert!(installed.success(), "mariadb-install-db failed");
        let mut db = PrivateMariaDb {
            dir,
            port: free_port(),
            server: None,
        };
        db.resume().await;
        use sqlx::Connection;
        let mut conn = sqlx::MySqlConnection::connect(&db.server_url())
            .await
            .expect("private MariaDB");
        sqlx::query("CREATE DATABASE ocr")
            .execute(&mut conn)
            .await
            .expect("create database");
        db
    }

    fn server_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("{}/ocr", self.server_url())
    }

    /// Starts the server (again) on the same data and port.
    pub async fn resume(&mut self) {
        let data = self.dir.path().join("data");
        let server = std::process::Command::new("mariadbd")
            .args([
                "--no-defaults".to_owned(),
                format!("--datadir={}", data.display()),
                format!("--port={}", self.port),
                "--bind-address=127.0.0.1".to_owned(),
                format!("--socket={}", self.dir.path().join("sock").display()),
                "--user=root".to_owned(),
                "--skip-grant-tables".to_owned(),
                "--innodb-buffer-pool-size=128M".to_owned(),
                "--max-connections=500".to_owned(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mariadbd must be installed");
        self.server = Some(server);
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("private MariaDB did not start");
    }

    /// Shuts the server down cleanly and waits until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &server.id().to_string()])
                .status();
            tokio::task::spawn_blocking(move || server.wait())
                .await
                .expect("join")
                .expect("mariadbd exit");
        }
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}
