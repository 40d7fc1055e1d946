//! One typed configuration for every role, read from defaults, then an optional
//! TOML file, then `OCR_`-prefixed environment variables (`__` separates
//! sections: `OCR_DATABASE__URL`). The operator renders exactly these keys; the
//! contract is documented in `docs/configuration.md`.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub blob: BlobConfig,
    pub queue: QueueConfig,
    pub limits: LimitsConfig,
    pub worker: WorkerConfig,
    pub writer: WriterConfig,
    pub model: ModelConfig,
    pub redis: RedisConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// HTTP API, health probes and `/metrics`.
    pub http_addr: String,
    /// gRPC API.
    pub grpc_addr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `mysql://user:pass@host:3306/db` or `sqlite://path?mode=rwc`.
    pub url: String,
    pub max_connections: u32,
    /// Apply pending migrations at start-up (the `migrate` command does it explicitly).
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BlobConfig {
    /// `file:///dir` (default: `./ocr-data/blobs`) or `memory://`.
    pub url: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    /// In-process queue; only meaningful in `standalone`.
    Memory,
    Kafka,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueueConfig {
    pub kind: QueueKind,
    pub brokers: String,
    pub jobs_topic: String,
    pub results_topic: String,
    pub dead_letter_topic: String,
    /// The workers' consumer group on the jobs topic.
    pub consumer_group: String,
    /// The writers' consumer group on the results topic.
    pub writer_group: String,
    /// Accepted jobs older than this are republished by the sweeper (the API
    /// may have died between the database write and the publish).
    pub republish_after_ms: u64,
    /// TLS and SASL towards the brokers (`[queue.security]`).
    pub security: KafkaSecurityConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }

    /// The value of librdkafka's `security.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The value of librdkafka's `sasl.mechanism`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// How every Kafka client of a role reaches the brokers: the API's producer,
/// the workers' and writers' consumers and producers, and the lag probes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurityConfig {
    pub protocol: SecurityProtocol,
    /// Used with the `sasl_*` protocols.
    pub sasl_mechanism: SaslMechanism,
    pub sasl_username: String,
    pub sasl_password: Secret,
    /// PEM of the CA that signed the brokers' certificates (what the operator
    /// renders from a Secret); empty with `ssl_ca_location` empty: the system CAs.
    pub ssl_ca_pem: Secret,
    /// A file holding that PEM instead.
    pub ssl_ca_location: String,
}

/// A string that never shows in `Debug` output, so a logged configuration
/// cannot leak a password.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_body_bytes: usize,
    pub max_pixels: u64,
    pub max_side: u32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WorkerMode {
    /// One job at a time, result written to the database.
    Standard,
    /// Micro-batches, results written to the database.
    Batched,
    /// Infer only; results go to the results topic for the writer.
    Writer,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    pub mode: WorkerMode,
    /// Claims of one job before it is dead-lettered.
    pub max_attempts: u32,
    pub max_batch_size: usize,
    pub max_wait_ms: u64,
    /// Micro-batches handled at once (batched and writer modes). 2 lets a GPU
    /// infer one batch while the next is claimed, decoded and recorded; 1
    /// (the default) suits a CPU, where the engine already uses every core.
    pub batches_in_flight: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Tries of the result-document upload and of the webhook before the
    /// event is dead-lettered and the job fails. The database is waited for
    /// without limit instead: an outage never fails a job.
    pub retries: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Completion webhook (empty: none). POSTed once per finished job.
    pub webhook_url: String,
    /// HMAC-SHA256 key for the `ocr-signature` header.
    pub webhook_secret: Secret,
    pub webhook_timeout_ms: u64,
    /// Exit once the results topic is drained (lag 0): how a switch away
    /// from writer mode retires the writer.
    pub drain: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DetLimitType {
    /// Grow images until the short side reaches the limit (rapidocr's default).
    Min,
    /// Shrink images until the long side fits the limit.
    Max,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Directory with the PP-OCR ONNX files (see `scripts/fetch-models.sh`).
    pub dir: PathBuf,
    /// `v6-small`, `v6-tiny` or `v5-mobile`.
    pub variant: String,
    /// `cpu` or `cuda` (`cuda:N` for another GPU).
    pub device: String,
    /// Detector input size rule: with `min` (default) images whose short
    /// side is below `det_limit_side_len` are scaled up to it; `max` shrinks
    /// images whose long side exceeds it. The default, `min` 64 (PaddleOCR
    /// 3's), runs pages and small inputs at their own scale: rapidocr's
    /// `min` 736 gives the same result on pages but grows a 640×208 label
    /// 3.5× (3.2 s and 600 MB instead of 0.3 s and 90 MB, the same text).
    pub det_limit_type: DetLimitType,
    pub det_limit_side_len: u32,
    /// What the networks compute in: `f32`, `f16` or `bf16`. Half precision pays on a GPU
    /// (tensor cores, half the memory traffic); on the CPU only f32 has the fast kernels.
    pub precision: ocr_engine::engine::Precision,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Empty: no Redis; everything works without it.
    pub url: String,
    /// Per client; 0 turns rate limiting off.
    pub requests_per_minute: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http_addr: "0.0.0.0:8080".into(),
            grpc_addr: "0.0.0.0:50051".into(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://ocr-data/ocr.db?mode=rwc".into(),
            max_connections: 16,
            migrate_on_start: true,
        }
    }
}

impl Default for BlobConfig {
    fn default() -> Self {
        BlobConfig {
            url: "ocr-data/blobs".into(),
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            kind: QueueKind::Kafka,
            brokers: "127.0.0.1:9092".into(),
            jobs_topic: "ocr.jobs".into(),
            results_topic: "ocr.results".into(),
            dead_letter_topic: "ocr.dead-letter".into(),
            consumer_group: "ocr-worker".into(),
            writer_group: "ocr-writer".into(),
            republish_after_ms: 30_000,
            security: KafkaSecurityConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 20 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_side: 12_000,
        }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            mode: WorkerMode::Standard,
            max_attempts: 5,
            max_batch_size: 8,
            max_wait_ms: 20,
            batches_in_flight: 1,
        }
    }
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            retries: 5,
            retry_initial_ms: 200,
            retry_max_ms: 10_000,
            webhook_url: String::new(),
            webhook_secret: Secret::default(),
            webhook_timeout_ms: 10_000,
            drain: false,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            // $OCR_MODEL_DIR, else ~/.cache/ocr-models: where fetch-models.sh puts them.
            dir: ocr_engine::engine::default_model_dir(),
            variant: "v6-small".into(),
            device: "cpu".into(),
            det_limit_type: DetLimitType::Min,
            det_limit_side_len: 64,
            precision: ocr_engine::engine::Precision::F32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// `OCR_*` variables that are not configuration keys (they would otherwise be
/// rejected as unknown fields); `OCR_TEST_*` variables are skipped too.
/// `OCR_MODEL_DIR` is the engine's and `scripts/fetch-models.sh`'s variable
/// for the weights folder: it sets `model.dir`'s default, not a config key.
const NOT_CONFIG_KEYS: [&str; 4] = ["config", "log_format", "fault", "model_dir"];

/// Keys whose environment values are taken verbatim. figment parses the
/// others as TOML-like values, which would turn a password `12345` into a
/// number and trim, unquote or split others.
const VERBATIM_KEYS: [&str; 4] = [
    "queue.security.sasl_username",
    "queue.security.sasl_password",
    "queue.security.ssl_ca_pem",
    "writer.webhook_secret",
];

fn env_name(key: &str) -> String {
    format!("OCR_{}", key.replace('.', "__").to_ascii_uppercase())
}

impl Config {
    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Self::figment(file).merge(
            Env::prefixed("OCR_")
                .filter(|key| {
                    let key = key.as_str().to_ascii_lowercase();
                    let path = key.replace("__", ".");
                    !key.starts_with("test_")
                        && !NOT_CONFIG_KEYS.contains(&key.as_str())
                        && !VERBATIM_KEYS.contains(&path.as_str())
                })
                .split("__"),
        );
        for key in VERBATIM_KEYS {
            if let Ok(value) = std::env::var(env_name(key)) {
                figment = figment.merge(Serialized::default(key, value));
            }
        }
        figment.extract().map_err(|e| ConfigError(Box::new(e)))
    }

    fn figment(file: Option<&Path>) -> Figment {
        let figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => figment.merge(Toml::file_exact(path)),
            None => figment,
        }
    }
}

#[cfg(test)]
// figment's test jail returns its (large) error type by value.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "ocr.toml",
                "[database]\nurl = \"mysql://file\"\n[worker]\nmax_batch_size = 32\n",
            )?;
            jail.set_env("OCR_DATABASE__URL", "mysql://env");
            jail.set_env("OCR_QUEUE__KIND", "memory");
            jail.set_env("OCR_LOG_FORMAT", "json");
            jail.set_env("OCR_CONFIG", "ocr.toml");
            jail.set_env("OCR_TEST_MOTO_SERVER", "/bin/true");
            let config = Config::load(Some(Path::new("ocr.toml"))).expect("valid config");
            assert_eq!(config.database.url, "mysql://env");
            assert_eq!(config.worker.max_batch_size, 32);
            assert_eq!(config.queue.kind, QueueKind::Memory);
            assert_eq!(config.worker.max_wait_ms, 20);
            Ok(())
        });
    }

    /// `OCR_MODEL_DIR` (what fetch-models.sh fills) is where the runtime looks
    /// by default, and is not refused as an unknown config key.
    #[test]
    fn ocr_model_dir_sets_the_default_model_folder() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OCR_MODEL_DIR", "/models/ppocr");
            let config = Config::load(None).expect("OCR_MODEL_DIR is not a config key");
            assert_eq!(config.model.dir, Path::new("/models/ppocr"));
            jail.set_env("OCR_MODEL__DIR", "/elsewhere");
            let config = Config::load(None).expect("valid config");
            assert_eq!(config.model.dir, Path::new("/elsewhere"));
            Ok(())
        });
    }

    #[test]
    fn secrets_from_the_environment_are_taken_verbatim() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("OCR_QUEUE__SECURITY__PROTOCOL", "sasl_ssl");
            jail.set_env("OCR_QUEUE__SECURITY__SASL_MECHANISM", "SCRAM-SHA-256");
            jail.set_env("OCR_QUEUE__SECURITY__SASL_USERNAME", "1234");
            jail.set_env("OCR_QUEUE__SECURITY__SASL_PASSWORD", " [p,a]\"ss\" ");
            jail.set_env(
                "OCR_QUEUE__SECURITY__SSL_CA_PEM",
                "-----BEGIN X-----\nAB=,\n",
            );
            jail.set_env("OCR_WRITER__WEBHOOK_SECRET", "true");
            let config = Config::load(None).expect("valid config");
            let security = &config.queue.security;
            assert_eq!(security.protocol, SecurityProtocol::SaslSsl);
            assert_eq!(security.sasl_mechanism, SaslMechanism::ScramSha256);
            assert_eq!(security.sasl_username, "1234");
            assert_eq!(security.sasl_password.expose(), " [p,a]\"ss\" ");
            assert_eq!(security.ssl_ca_pem.expose(), "-----BEGIN X-----\nAB=,\n");
            assert_eq!(config.writer.webhook_secret.expose(), "true");
            let printed = format!("{config:?}");
            assert!(
                !printed.contains("[p,a]"),
                "password in Debug output: {printed}"
            );
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_rejected_not_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("ocr.toml", "[worker]\nmax_batch = 32\n")?;
            let err = Config::load(Some(Path::new("ocr.toml"))).unwrap_err();
            assert!(err.to_string().contains("max_batch"), "{err}");
            Ok(())
        });
    }
}
