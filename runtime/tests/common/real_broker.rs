//! A real Kafka-compatible broker process for tests that the in-process mock
//! cluster cannot serve (it has no CreateTopics handler). Included by path
//! from the runtime's and the operator's tests, so it uses only `std`.
#![allow(dead_code)]

use std::time::{Duration, Instant};

/// A real broker for what the mock cluster cannot do (CreateTopics): the
/// Kafka-compatible Tansu broker, started on a free loopback port with
/// in-memory storage and killed when dropped. `scripts/test.sh` installs it
/// and sets `OCR_TEST_TANSU`; `OCR_TEST_KAFKA_BROKERS=host:9092` names an
/// existing broker instead.
pub struct RealBroker {
    pub bootstrap_servers: String,
    tansu: Option<std::process::Child>,
    _storage: Option<TempDir>,
}

impl RealBroker {
    /// Plaintext, no authentication.
    pub fn start() -> RealBroker {
        if let Ok(brokers) = std::env::var("OCR_TEST_KAFKA_BROKERS") {
            return RealBroker {
                bootstrap_servers: brokers,
                tansu: None,
                _storage: None,
            };
        }
        let (child, port) = spawn_tansu(
            &tansu_binary(),
            &["--storage-engine", "memory://tansu/"],
            None,
        );
        RealBroker {
            bootstrap_servers: format!("127.0.0.1:{port}"),
            tansu: Some(child),
            _storage: None,
        }
    }

    /// Plaintext, telling clients to connect to `advertised` (`host:port`)
    /// rather than to where it listens (`bootstrap_servers`): for a proxy in
    /// front of it that a test can cut, so the broker is unreachable while
    /// its process and its state live on.
    pub fn start_advertising(advertised: &str) -> RealBroker {
        let (child, port) = spawn_tansu_advertising(
            &tansu_binary(),
            &["--storage-engine", "memory://tansu/"],
            None,
            Some(advertised),
        );
        RealBroker {
            bootstrap_servers: format!("127.0.0.1:{port}"),
            tansu: Some(child),
            _storage: None,
        }
    }

    /// SASL_PLAINTEXT that requires SCRAM-SHA-512 authentication, with one
    /// user. Tansu stores SCRAM credentials in its storage and only accepts
    /// AlterUserScramCredentials from authenticated clients, so the user is
    /// created on an open broker over an SQLite file first, and the
    /// authenticating broker then starts on that file.
    pub fn start_with_scram_user(user: &str, password: &str) -> RealBroker {
        let tansu = tansu_binary();
        let storage = std::env::temp_dir().join(format!(
            "ocr-tansu-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&storage).expect("tansu storage directory");
        let sqlite = ["--storage-engine", "sqlite://tansu.db"];
        let (mut open, port) = spawn_tansu(&tansu, &sqlite, Some(&storage));
        let status = std::process::Command::new(&tansu)
            .args(["user", "create", "--mechanism", "scram512", "--broker"])
            .arg(format!("tcp://127.0.0.1:{port}"))
            .args([user, password])
            .current_dir(&storage)
            .status()
            .expect("running tansu user create");
        let _ = open.kill();
        let _ = open.wait();
        assert!(status.success(), "tansu user create failed: {status}");
        let mut args = sqlite.to_vec();
        args.push("--authentication");
        let (child, port) = spawn_tansu(&tansu, &args, Some(&storage));
        RealBroker {
            bootstrap_servers: format!("127.0.0.1:{port}"),
            tansu: Some(child),
            _storage: Some(TempDir(storage)),
        }
    }
}

fn tansu_binary() -> String {
    std::env::var("OCR_TEST_TANSU").expect(
        "OCR_TEST_TANSU must name the tansu binary (scripts/test.sh installs it) \
         or OCR_TEST_KAFKA_BROKERS a broker",
    )
}

/// Starts `tansu broker` on a free loopback port and waits until it listens.
fn spawn_tansu(
    tansu: &str,
    args: &[&str],
    dir: Option<&std::path::Path>,
) -> (std::process::Child, u16) {
    spawn_tansu_advertising(tansu, args, dir, None)
}

/// [`spawn_tansu`], advertising `advertised` (`host:port`) instead of the
/// address it listens on.
fn spawn_tansu_advertising(
    tansu: &str,
    args: &[&str],
    dir: Option<&std::path::Path>,
    advertised: Option<&str>,
) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let advertised = advertised.map_or_else(|| url.clone(), |a| format!("tcp://{a}"));
    let mut command = std::process::Command::new(tansu);
    command
        .args([
            "broker",
            "--silent",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
        ])
        .args(args)
        .stdout(std::process::Stdio::null());
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting {tansu}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("tansu did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, port)
}

/// Removed when the broker is dropped.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for RealBroker {
    fn drop(&mut self) {
        if let Some(child) = &mut self.tansu {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
