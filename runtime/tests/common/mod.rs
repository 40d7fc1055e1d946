//! Helpers shared by the integration tests: throw-away MariaDB databases and
//! SQLite files, and generated images.
#![allow(dead_code)]

use ocr_runtime::storage::JobStore;

/// Where the MariaDB server for tests is; CI and the dev machine run one.
pub fn mysql_server_url() -> String {
    std::env::var("OCR_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// A fresh database on the test server, dropped when the guard goes.
pub struct MysqlDatabase {
    pub url: String,
    name: String,
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
