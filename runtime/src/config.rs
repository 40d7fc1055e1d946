//! The runtime's configuration is the operator's contract: one typed schema,
//! its defaults and its loader, in the `ocr-contract` crate (see
//! `docs/configuration.md` for the keys).

pub use ocr_contract::config::{
    AuthConfig, AuthMode, BlobConfig, Config, ConfigError, DatabaseConfig, FailMode, LimitsConfig,
    ModelConfig, QueueConfig, QueueKind, RedisConfig, ServerConfig, WorkerConfig, WorkerMode,
    WriterConfig,
};
pub use ocr_contract::kafka::{KafkaSecurityConfig, SaslMechanism, SecurityProtocol};
pub use ocr_contract::model::DetLimitType;
pub use ocr_contract::Secret;
