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
    /// How to start the same broker again (see [`RealBroker::kill`]).
    restart: Option<Restart>,
}

struct Restart {
    port: u16,
    args: Vec<&'static str>,
    dir: std::path::PathBuf,
}

impl RealBroker {
    /// Plaintext, no authentication.
    pub fn start() -> RealBroker {
        if let Ok(brokers) = std::env::var("OCR_TEST_KAFKA_BROKERS") {
            return RealBroker {
                bootstrap_servers: brokers,
                tansu: None,
                _storage: None,
                restart: None,
            };
        }
        let (child, port) = spawn_tansu(
            &tansu_binary(),
            &["--storage-engine", "memory://tansu/"],
            None,
            None,
        );
        RealBroker {
            bootstrap_servers: format!("127.0.0.1:{port}"),
            tansu: Some(child),
            _storage: None,
            restart: None,
        }
    }

    /// Plaintext, with its topics, messages and committed offsets in an
    /// SQLite file, so that [`RealBroker::kill`] and [`RealBroker::restart`]
    /// make a broker outage that loses nothing, as a restarted Kafka would.
    pub fn start_persistent() -> RealBroker {
        let storage = storage_dir();
        let args = vec!["--storage-engine", "sqlite://tansu.db"];
        let (child, port) = spawn_tansu(&tansu_binary(), &args, Some(&storage), None);
        RealBroker {
            bootstrap_servers: format!("127.0.0.1:{port}"),
            tansu: Some(child),
            restart: Some(Restart {
                port,
                args,
                dir: storage.clone(),
            }),
            _storage: Some(TempDir(storage)),
        }
    }

    /// SIGKILLs the broker process: connections drop, the port refuses.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.tansu.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a broker killed by [`RealBroker::kill`] again, on the same
    /// port and storage.
    pub fn restart(&mut self) {
        let restart = self
            .restart
            .as_ref()
            .expect("only a broker from start_persistent restarts");
        let (child, _) = spawn_tansu(
            &tansu_binary(),
            &restart.args,
            Some(&restart.dir),
            Some(restart.port),
        );
        self.tansu = Some(child);
    }

    /// SASL_PLAINTEXT that requires SCRAM-SHA-512 authentication, with one
    /// user. Tansu stores SCRAM credentials in its storage and only accepts
    /// AlterUserScramCredentials from authenticated clients, so the user is
    /// created on an open broker over an SQLite file first, and the
    /// authenticating broker then starts on that file.
    pub fn start_with_scram_user(user: &str, password: &str) -> RealBroker {
        let tansu = tansu_binary();
        let storage = storage_dir();
        let sqlite = ["--storage-engine", "sqlite://tansu.db"];
        let (mut open, port) = spawn_tansu(&tansu, &sqlite, Some(&storage), None);
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
        let (child, port) = spawn_tansu(&tansu, &args, Some(&storage), None);
        RealBroker {
            bootstrap_servers: format!("127.0.0.1:{port}"),
            tansu: Some(child),
            _storage: Some(TempDir(storage)),
            restart: None,
        }
    }
}

fn tansu_binary() -> String {
    std::env::var("OCR_TEST_TANSU").expect(
        "OCR_TEST_TANSU must name the tansu binary (scripts/test.sh installs it) \
         or OCR_TEST_KAFKA_BROKERS a broker",
    )
}

/// A new directory for a broker's SQLite storage.
fn storage_dir() -> std::path::PathBuf {
    let storage = std::env::temp_dir().join(format!(
        "ocr-tansu-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&storage).expect("tansu storage directory");
    storage
}

/// Starts `tansu broker` on `port` (default: a free loopback port) and
/// waits until it listens.
fn spawn_tansu(
    tansu: &str,
    args: &[&str],
    dir: Option<&std::path::Path>,
    port: Option<u16>,
) -> (std::process::Child, u16) {
    let port = port.unwrap_or_else(|| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    });
    let url = format!("tcp://127.0.0.1:{port}");
    let mut command = std::process::Command::new(tansu);
    command
        .args([
            "broker",
            "--silent",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
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
