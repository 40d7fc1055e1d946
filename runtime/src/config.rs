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
    pub webhook_secret: String,
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
    /// Detector input size rule: with `min` (default) small images are
    /// scaled up to `det_limit_side_len` on their short side; `max` only
    /// shrinks large ones, which is much faster for small inputs.
    pub det_limit_type: DetLimitType,
    pub det_limit_side_len: u32,
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
            webhook_secret: String::new(),
            webhook_timeout_ms: 10_000,
            drain: false,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        let cache = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join(".cache/ocr-models");
        ModelConfig {
            dir: cache,
            variant: "v6-small".into(),
            device: "cpu".into(),
            det_limit_type: DetLimitType::Min,
            det_limit_side_len: 736,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

/// `OCR_*` variables that are not configuration keys (they would otherwise be
/// rejected as unknown fields); `OCR_TEST_*` variables are skipped too.
const NOT_CONFIG_KEYS: [&str; 3] = ["config", "log_format", "fault"];

impl Config {
    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::figment(file)
            .merge(
                Env::prefixed("OCR_")
                    .filter(|key| {
                        let key = key.as_str().to_ascii_lowercase();
                        !key.starts_with("test_") && !NOT_CONFIG_KEYS.contains(&key.as_str())
                    })
                    .split("__"),
            )
            .extract()
            .map_err(|e| ConfigError(Box::new(e)))
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
