//! A real Prometheus server for tests: the Debian build that
//! `scripts/install-prometheus.sh` unpacks (`OCR_TEST_PROMETHEUS` names the
//! binary), on a free loopback port, scraping static targets every second
//! with in-memory-sized storage in a temporary folder. Killed when dropped.

use std::time::{Duration, Instant};

pub struct Prometheus {
    pub url: String,
    child: std::process::Child,
    _storage: tempfile::TempDir,
}

/// One scrape target and the labels Prometheus attaches to its series.
pub struct Target {
    pub address: String,
    pub labels: Vec<(&'static str, String)>,
}

impl Prometheus {
    pub fn start(targets: &[Target]) -> Prometheus {
        let binary = std::env::var("OCR_TEST_PROMETHEUS").expect(
            "OCR_TEST_PROMETHEUS must name the prometheus binary (scripts/test.sh installs it \
             with scripts/install-prometheus.sh)",
        );
        let storage = tempfile::tempdir().expect("a storage folder");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: pods\n    static_configs:\n",
        );
        for target in targets {
            config.push_str(&format!(
                "      - targets: ['{}']\n        labels:\n",
                target.address
            ));
            for (name, value) in &target.labels {
                config.push_str(&format!("          {name}: '{value}'\n"));
            }
        }
        let config_file = storage.path().join("prometheus.yml");
        std::fs::write(&config_file, config).expect("writing prometheus.yml");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = std::process::Command::new(&binary)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                storage.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        let mut prometheus = Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _storage: storage,
        };
        prometheus.wait_ready();
        prometheus
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited at start: {status}");
            }
            let ready = std::net::TcpStream::connect(self.url.trim_start_matches("http://"))
                .and_then(|mut stream| {
                    use std::io::{Read, Write};
                    stream.write_all(b"GET /-/ready HTTP/1.0\r\n\r\n")?;
                    let mut answer = String::new();
                    stream.read_to_string(&mut answer)?;
                    Ok(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
                })
                .unwrap_or(false);
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready in 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
