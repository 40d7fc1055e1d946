//! The blob store against a real S3 protocol server (moto's, on loopback):
//! the configuration a cluster uses so API and worker pods share inputs.
//! `scripts/test.sh` installs moto and sets `OCR_TEST_MOTO_SERVER`.

mod common;

use ocr_runtime::storage::BlobStore;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn inputs_round_trip_through_an_s3_compatible_store() {
    let moto = std::env::var("OCR_TEST_MOTO_SERVER")
        .expect("OCR_TEST_MOTO_SERVER must name moto_server (scripts/test.sh installs it)");
    let port = common::free_port();
    let _server = Server(
        Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server"),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut created = false;
    for _ in 0..100 {
        // CreateBucket; moto accepts unsigned requests.
        if let Ok(response) = client.put(format!("{endpoint}/ocr-inputs")).send().await {
            created = response.status().is_success();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(created, "could not create the test bucket");

    // This test binary holds a single test, so setting the environment is race-free.
    std::env::set_var("AWS_ENDPOINT", &endpoint);
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    let blobs = BlobStore::from_url("s3://ocr-inputs/cluster-a").unwrap();
    let image = common::png(32, 16);
    blobs
        .put("inputs/job-1", image.clone().into())
        .await
        .unwrap();
    blobs
        .put("inputs/job-2", b"two".to_vec().into())
        .await
        .unwrap();
    assert_eq!(blobs.get("inputs/job-1").await.unwrap().to_vec(), image);
    assert_eq!(blobs.count("inputs").await.unwrap(), 2);

    // The prefix keeps pipelines that share a bucket apart.
    let other = BlobStore::from_url("s3://ocr-inputs/cluster-b").unwrap();
    assert_eq!(other.count("inputs").await.unwrap(), 0);

    blobs.delete("inputs/job-1").await.unwrap();
    blobs.delete("inputs/job-1").await.unwrap();
    assert!(blobs.get("inputs/job-1").await.is_err());
    assert_eq!(blobs.count("inputs").await.unwrap(), 1);
}
