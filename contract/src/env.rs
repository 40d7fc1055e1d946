//! Environment variable names. Every configuration key has one
//! (`OCR_` + the key in upper case, `__` between sections); the operator sets
//! some keys through them rather than through the shared file, and a few
//! `OCR_` variables are not configuration keys at all.

/// The key `database.url` as `OCR_DATABASE__URL`.
pub fn env_name(key: &str) -> String {
    format!("{PREFIX}{}", key.replace('.', "__").to_ascii_uppercase())
}

pub const PREFIX: &str = "OCR_";

/// The configuration file to read (`ocr-runtime --config` does the same).
pub const CONFIG_FILE: &str = "OCR_CONFIG";
/// `json` or `text` logs.
pub const LOG_FORMAT: &str = "OCR_LOG_FORMAT";
/// Fault injection for the kill tests.
pub const FAULT: &str = "OCR_FAULT";
/// The API key `ocr-runtime loadgen` sends (a client's, not the server's).
pub const API_KEY: &str = "OCR_API_KEY";

/// `OCR_*` variables that are not configuration keys (the loader would reject
/// them as unknown fields); `OCR_TEST_*` and `OCR_E2E_*` variables are skipped too.
pub const NOT_CONFIG_KEYS: [&str; 5] = [
    CONFIG_FILE,
    LOG_FORMAT,
    FAULT,
    API_KEY,
    crate::model::MODEL_DIR_ENV,
];
/// Prefixes of variables that belong to the test suites.
pub const TEST_PREFIXES: [&str; 2] = ["OCR_TEST_", "OCR_E2E_"];

pub mod keys {
    //! Keys that code on both sides names.

    pub const DATABASE_URL: &str = "database.url";
    pub const REDIS_URL: &str = "redis.url";
    pub const SASL_USERNAME: &str = "queue.security.sasl_username";
    pub const SASL_PASSWORD: &str = "queue.security.sasl_password";
    pub const SSL_CA_PEM: &str = "queue.security.ssl_ca_pem";
    pub const WEBHOOK_SECRET: &str = "writer.webhook_secret";
    pub const WORKER_MODE: &str = "worker.mode";

    /// What the operator passes from Secrets, never through the ConfigMap.
    pub const FROM_SECRETS: [&str; 6] = [
        DATABASE_URL,
        REDIS_URL,
        SASL_USERNAME,
        SASL_PASSWORD,
        SSL_CA_PEM,
        WEBHOOK_SECRET,
    ];

    /// Set on the worker Deployment only: a migration rolls the workers and
    /// not every pod sharing the ConfigMap.
    pub const WORKER_ONLY: [&str; 1] = [WORKER_MODE];

    pub const AUTH_MODE: &str = "auth.mode";
    pub const AUTH_KEYS_DIR: &str = "auth.keys_dir";
    pub const TLS_CERT_FILE: &str = "server.tls_cert_file";
    pub const TLS_KEY_FILE: &str = "server.tls_key_file";

    /// Set on the API Deployment only (only the API serves clients), so
    /// turning TLS or keys on rolls the API and not the GPU workers.
    pub const API_ONLY: [&str; 4] = [AUTH_MODE, AUTH_KEYS_DIR, TLS_CERT_FILE, TLS_KEY_FILE];

    /// Set on the writer Deployment only (only writers read `writer.*`), so
    /// changing one rolls the writers and not the API or the GPU workers.
    pub const WRITER_ONLY: [&str; 5] = [
        "writer.retries",
        "writer.retry_initial_ms",
        "writer.retry_max_ms",
        "writer.webhook_url",
        "writer.webhook_timeout_ms",
    ];

    /// Keys whose environment values are taken verbatim. figment parses the
    /// others as TOML-like values, which would turn a password `12345` into a
    /// number and trim, unquote or split others.
    pub const VERBATIM: [&str; 4] = [SASL_USERNAME, SASL_PASSWORD, SSL_CA_PEM, WEBHOOK_SECRET];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_loader_convention() {
        assert_eq!(env_name(keys::DATABASE_URL), "OCR_DATABASE__URL");
        assert_eq!(
            env_name(keys::SASL_PASSWORD),
            "OCR_QUEUE__SECURITY__SASL_PASSWORD"
        );
    }
}
