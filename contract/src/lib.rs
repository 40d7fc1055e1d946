//! The contract between the operator and the runtime, in one place.
//!
//! The operator builds a typed [`Config`] for each role, writes the shared part
//! into a ConfigMap ([`Config::to_shared_toml`]) and the per-role and secret
//! parts into environment variables named by [`env`]; the runtime reads both
//! back with [`Config::load`]. Both sides use the same enums, defaults and
//! Kafka client settings ([`kafka`]), so they cannot drift apart. The metrics
//! the operator's advisor reads from the pods are named in [`signals`].
//!
//! The enums the CRD takes as they are (with the `schema` feature) describe
//! themselves in plain `//` comments at type level: schemars would put a doc
//! comment there in place of the CRD field's own description.

pub mod config;
pub mod env;
pub mod kafka;
pub mod model;
mod secret;
pub mod signals;

pub use config::{
    AuthConfig, AuthMode, BlobConfig, Config, ConfigError, DatabaseConfig, FailMode, LimitsConfig,
    ModelConfig, QueueConfig, QueueKind, RedisConfig, ServerConfig, WorkerConfig, WorkerMode,
    WriterConfig,
};
pub use kafka::{KafkaSecurityConfig, SaslMechanism, SecurityProtocol};
pub use model::{default_model_dir, DetLimitType, ModelVariant, Precision};
pub use secret::{redact_url, Secret};
