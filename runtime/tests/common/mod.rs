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
