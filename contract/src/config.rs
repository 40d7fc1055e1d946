//! One typed configuration for every role, read from defaults, then an optional
//! TOML file, then `OCR_`-prefixed environment variables (`__` separates
//! sections: `OCR_DATABASE__URL`). The operator renders exactly these keys;
//! the keys are documented in `docs/configuration.md`.

use crate::env::{self, env_name, keys};
use crate::kafka::KafkaSecurityConfig;
use crate::model::{default_model_dir, DetLimitType, ModelVariant, Precision};
use crate::Secret;
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
    pub auth: AuthConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// HTTP API, health probes and `/metrics`.
    pub http_addr: String,
    /// gRPC API.
    pub grpc_addr: String,
    /// How long an `Idempotency-Key` is remembered: a request that reuses a
    /// key older than this creates a new job.
    pub idempotency_key_ttl_ms: u64,
    /// PEM certificate chain and private key: both set, HTTP and gRPC serve
    /// TLS only; both empty, plain text. One without the other is refused.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// gRPC server reflection (`grpcurl` without the .proto file). Off: it
    /// describes the whole service to anyone who can connect.
    pub grpc_reflection: bool,
}

/// Who may call the API. Every caller is a tenant: a job, its idempotency
/// key, its rate limit and its quota belong to the tenant of the key that
/// submitted it, and other tenants cannot see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// A folder of key files, e.g. a mounted Secret: each file is named after
    /// its tenant and holds that tenant's keys, one per line. Re-read every
    /// `key_cache_ms`. Keys made with `ocr-runtime keys create` live in the
    /// database and work alongside these.
    pub keys_dir: String,
    /// How long a checked key is trusted before it is checked again: a
    /// revoked key or a removed key file stops working within this time.
    pub key_cache_ms: u64,
}

// Whether the API requires a key (`Authorization: Bearer <key>`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Required unless both listeners are on a loopback address, where only
    /// this machine can connect (the standalone server's default).
    #[default]
    Auto,
    /// Every request needs a valid key.
    Required,
    /// Keys are optional: a request without one is the tenant `anonymous`
    /// (behind a gateway that authenticates, or on a trusted network).
    Disabled,
}

impl AuthConfig {
    pub fn key_cache(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.key_cache_ms)
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Auto,
            keys_dir: String::new(),
            key_cache_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `mysql://user:pass@host:3306/db` or `sqlite://path?mode=rwc`.
    pub url: String,
    pub max_connections: u32,
    /// How long an operation waits for a connection before it fails: while
    /// the database is down, the API answers 503 after this long.
    pub acquire_timeout_ms: u64,
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
    /// `Queued` and `Processing` jobs that have not changed for this long
    /// are republished by the sweeper (their message was lost, or their
    /// worker died without it coming back). Keep it above the longest wait
    /// in the queue plus `worker.inference_timeout_ms`: a job republished
    /// while its message still waits is inferred twice (one result wins).
    pub stale_after_ms: u64,
    /// How long the API waits for the broker to acknowledge a job before it
    /// answers anyway: the job is durable in the database, the publish goes
    /// on in the background, and the sweeper republishes it if that fails.
    /// Zero (the default) answers as soon as the job's row is committed.
    pub publish_wait_ms: u64,
    /// TLS and SASL towards the brokers (`[queue.security]`).
    pub security: KafkaSecurityConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_body_bytes: usize,
    pub max_pixels: u64,
    pub max_side: u32,
    /// Submissions handled at once per API process (HTTP and gRPC); past it
    /// a request is answered 503 with `Retry-After` at once.
    pub max_concurrent_submissions: usize,
    /// Bytes of request bodies an API process holds at once (each request
    /// counts its `Content-Length`, or `max_body_bytes` when undeclared);
    /// past it, 503 with `Retry-After` at once.
    pub max_buffered_bytes: usize,
    /// How long a client may take to send its body (slow senders hold a
    /// slot and memory): past it, 408.
    pub body_timeout_ms: u64,
    /// Unfinished jobs (accepted, queued or processing) a tenant may have at
    /// once; past it, 429 `quota_exceeded`. 0: no quota.
    pub max_open_jobs_per_tenant: u32,
}

// What the workers do with a job: the pipeline's architecture (the CRD's
// `spec.architecture` takes the same values).
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord, Default,
)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum WorkerMode {
    /// Workers infer one job at a time and write results to the database.
    #[default]
    Standard,
    /// Workers infer micro-batches and write results to the database.
    Batched,
    /// Workers publish results to a topic; writer pods persist them.
    Writer,
}

impl WorkerMode {
    pub const ALL: [WorkerMode; 3] = [Self::Standard, Self::Batched, Self::Writer];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Batched => "batched",
            Self::Writer => "writer",
        }
    }
}

impl std::fmt::Display for WorkerMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Pixels the engine decodes and infers at once: a micro-batch whose
    /// images add up to more is inferred in consecutive runs within it, so
    /// memory follows this bound rather than `max_batch_size` × the largest
    /// accepted image. An image larger than this is inferred alone.
    pub max_batch_pixels: u64,
    /// An inference running longer than this means the engine is stuck:
    /// `/livez` fails so that the pod is restarted (its jobs are redelivered).
    pub inference_timeout_ms: u64,
    /// Writer mode: a folder that outlives the process (a pod's `/tmp`
    /// emptyDir survives container restarts) where the worker counts the
    /// processes that died with a job inside the engine; such a job is then
    /// inferred alone and given up at `max_attempts`. Empty: not counted (a
    /// crashing image is met again after every restart).
    pub crash_journal_dir: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WriterConfig {
    /// Tries of the result-document upload and of the webhook before the
    /// notification is dead-lettered (the job, already final in the
    /// database, is not affected). The database is waited for without limit
    /// instead: an outage never fails a job.
    pub retries: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Completion webhook (empty: none). POSTed once per finished job.
    pub webhook_url: String,
    /// HMAC-SHA256 key for the `ocr-signature` header.
    #[serde(skip_serializing_if = "Secret::is_empty")]
    pub webhook_secret: Secret,
    pub webhook_timeout_ms: u64,
    /// Exit once the results topic is drained (lag 0): how a switch away
    /// from writer mode retires the writer.
    pub drain: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Directory with the PP-OCR ONNX files (see `scripts/fetch-models.sh`).
    pub dir: PathBuf,
    /// `v6-small`, `v6-tiny` or `v5-mobile`.
    pub variant: ModelVariant,
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
    pub precision: Precision,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Empty: no Redis; everything works without it.
    pub url: String,
    /// Per tenant; 0 turns rate limiting off.
    pub requests_per_minute: u32,
    /// What rate limiting does while Redis is unreachable: `open` lets
    /// submissions through unlimited, `closed` refuses them (503 with
    /// `Retry-After`) until Redis answers again.
    pub rate_limit_when_down: FailMode,
}

/// How a guard behaves when what it needs is unavailable.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    #[default]
    Open,
    Closed,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            // Loopback: a server started without configuration is reachable
            // from this machine only (the operator sets 0.0.0.0 for pods).
            http_addr: "127.0.0.1:8080".into(),
            grpc_addr: "127.0.0.1:50051".into(),
            idempotency_key_ttl_ms: 24 * 3_600_000,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            grpc_reflection: false,
        }
    }
}

impl DatabaseConfig {
    pub fn acquire_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.acquire_timeout_ms)
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://ocr-data/ocr.db?mode=rwc".into(),
            max_connections: 16,
            acquire_timeout_ms: 500,
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

impl ServerConfig {
    pub fn idempotency_key_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.idempotency_key_ttl_ms)
    }
}

impl LimitsConfig {
    pub fn body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.body_timeout_ms)
    }
}

impl WorkerConfig {
    pub fn inference_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.inference_timeout_ms)
    }
}

impl QueueConfig {
    pub fn publish_wait(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.publish_wait_ms)
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
            stale_after_ms: 900_000,
            publish_wait_ms: 0,
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
            max_concurrent_submissions: 256,
            max_buffered_bytes: 256 * 1024 * 1024,
            body_timeout_ms: 30_000,
            max_open_jobs_per_tenant: 0,
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
            max_batch_pixels: 48_000_000,
            inference_timeout_ms: 300_000,
            crash_journal_dir: String::new(),
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
            dir: default_model_dir(),
            variant: ModelVariant::V6Small,
            device: "cpu".into(),
            det_limit_type: DetLimitType::Min,
            det_limit_side_len: 64,
            precision: Precision::F32,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("serialising the configuration: {0}")]
    Serialise(#[from] toml::ser::Error),
    #[error("{0} is not a configuration key")]
    UnknownKey(String),
    #[error("{0} is a section, not a single value")]
    NotAValue(String),
}

impl Config {
    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Self::figment(file).merge(
            Env::prefixed(env::PREFIX)
                .filter(|key| {
                    let variable = format!("{}{}", env::PREFIX, key.as_str().to_ascii_uppercase());
                    let key = key.as_str().to_ascii_lowercase().replace("__", ".");
                    !env::TEST_PREFIXES.iter().any(|p| variable.starts_with(p))
                        && !env::NOT_CONFIG_KEYS.contains(&variable.as_str())
                        && !keys::VERBATIM.contains(&key.as_str())
                })
                .split("__"),
        );
        for key in keys::VERBATIM {
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

    fn to_table(&self) -> Result<toml::Table, RenderError> {
        Ok(toml::Table::try_from(self)?)
    }

    /// The file every pod of a pipeline shares: everything except what comes
    /// from Secrets ([`keys::FROM_SECRETS`]) and what is set per Deployment
    /// ([`keys::WORKER_ONLY`], [`keys::WRITER_ONLY`], [`keys::API_ONLY`]).
    pub fn to_shared_toml(&self) -> Result<String, RenderError> {
        let mut table = self.to_table()?;
        let per_deployment = keys::WORKER_ONLY
            .iter()
            .chain(&keys::WRITER_ONLY)
            .chain(&keys::API_ONLY);
        for key in keys::FROM_SECRETS.iter().chain(per_deployment) {
            remove(&mut table, key);
        }
        // Only writers read the rest of `writer` (`drain` is their command-line flag).
        table.remove("writer");
        Ok(toml::to_string(&table)?)
    }

    /// `(variable, value)` for each key, in the form the loader reads back.
    pub fn env_vars(&self, keys: &[&str]) -> Result<Vec<(String, String)>, RenderError> {
        let table = self.to_table()?;
        keys.iter()
            .map(|key| {
                let value =
                    lookup(&table, key).ok_or_else(|| RenderError::UnknownKey(key.to_string()))?;
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    _ => return Err(RenderError::NotAValue(key.to_string())),
                };
                Ok((env_name(key), text))
            })
            .collect()
    }
}

fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let (section, rest) = match key.split_once('.') {
        Some(split) => split,
        None => return table.get(key),
    };
    match table.get(section)? {
        toml::Value::Table(inner) => lookup(inner, rest),
        _ => None,
    }
}

fn remove(table: &mut toml::Table, key: &str) {
    match key.split_once('.') {
        None => {
            table.remove(key);
        }
        Some((section, rest)) => {
            if let Some(toml::Value::Table(inner)) = table.get_mut(section) {
                remove(inner, rest);
            }
        }
    }
}

#[cfg(test)]
// figment's test jail returns its (large) error type by value.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use crate::kafka::{SaslMechanism, SecurityProtocol};

    /// A configuration with every secret set, so that serialising it shows every key.
    fn everything_set() -> Config {
        let mut config = Config::default();
        config.queue.security = KafkaSecurityConfig {
            protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: SaslMechanism::Plain,
            sasl_username: "user".into(),
            sasl_password: Secret::new("password"),
            ssl_ca_pem: Secret::new("pem"),
            ssl_ca_location: String::new(),
        };
        config.writer.webhook_secret = Secret::new("hmac");
        config.redis.url = "redis://127.0.0.1".into();
        config
    }

    #[test]
    fn every_named_key_is_a_configuration_key() {
        let table = everything_set().to_table().expect("serialisable");
        let named = keys::FROM_SECRETS
            .iter()
            .chain(&keys::WORKER_ONLY)
            .chain(&keys::WRITER_ONLY)
            .chain(&keys::API_ONLY)
            .chain(&keys::VERBATIM);
        for key in named {
            assert!(
                lookup(&table, key).is_some(),
                "{key} is not a configuration key"
            );
        }
    }

    #[test]
    fn the_shared_file_holds_no_secret_and_no_per_deployment_key() {
        let shared = everything_set().to_shared_toml().expect("serialisable");
        for leaked in [
            "password",
            "pem",
            "hmac",
            "redis://",
            "sqlite://",
            "mode =",
            "[writer]",
            "retries",
        ] {
            assert!(
                !shared.contains(leaked),
                "{leaked:?} in the shared file:\n{shared}"
            );
        }
        assert!(shared.contains("[queue.security]"), "{shared}");
        assert!(shared.contains("max_batch_size = 8"), "{shared}");
    }

    /// What the shared file and the per-deployment variables say is what the
    /// loader reads back.
    #[test]
    fn rendered_file_and_variables_load_back_to_the_same_configuration() {
        let mut config = Config::default();
        config.worker.mode = WorkerMode::Batched;
        config.worker.max_batch_size = 32;
        config.writer.retries = 9;
        config.writer.webhook_url = "https://hooks.example/ocr?a=1".into();
        config.model.precision = Precision::F16;
        config.model.variant = ModelVariant::V6Tiny;
        config.auth.mode = AuthMode::Required;
        config.auth.keys_dir = "/var/run/ocr/api-keys".into();
        config.server.tls_cert_file = "/var/run/ocr/tls/tls.crt".into();
        config.server.tls_key_file = "/var/run/ocr/tls/tls.key".into();
        let shared = config.to_shared_toml().expect("serialisable");
        assert!(!shared.contains("/var/run/ocr"), "{shared}");
        let mut variables = config.env_vars(&keys::WORKER_ONLY).expect("worker keys");
        variables.extend(config.env_vars(&keys::WRITER_ONLY).expect("writer keys"));
        variables.extend(config.env_vars(&keys::API_ONLY).expect("API keys"));
        assert!(variables.contains(&("OCR_WORKER__MODE".into(), "batched".into())));
        figment::Jail::expect_with(|jail| {
            jail.create_file("ocr.toml", &shared)?;
            for (name, value) in &variables {
                jail.set_env(name, value);
            }
            let loaded = Config::load(Some(Path::new("ocr.toml"))).expect("loads");
            assert_eq!(loaded, config);
            Ok(())
        });
    }

    #[test]
    fn a_section_or_unknown_key_is_not_an_environment_value() {
        let config = Config::default();
        assert!(matches!(
            config.env_vars(&["worker"]),
            Err(RenderError::NotAValue(_))
        ));
        assert!(matches!(
            config.env_vars(&["worker.nope"]),
            Err(RenderError::UnknownKey(_))
        ));
    }

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
            jail.set_env("OCR_E2E_KEEP", "1");
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
