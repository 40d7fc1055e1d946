//! How every Kafka client reaches the brokers: the runtime's producers,
//! consumers and lag probes, and the operator's admin client. One function
//! turns the settings into librdkafka's, so both connect the same way.

use crate::Secret;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// The protocol that follows from what is configured, as the CRD derives it:
    /// TLS alone is `ssl`, SASL alone `sasl_plaintext`, both `sasl_ssl`.
    pub fn from_parts(tls: bool, sasl: bool) -> Self {
        match (tls, sasl) {
            (false, false) => Self::Plaintext,
            (true, false) => Self::Ssl,
            (false, true) => Self::SaslPlaintext,
            (true, true) => Self::SaslSsl,
        }
    }

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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum SaslMechanism {
    /// User name and password sent as they are (use it only over TLS).
    #[serde(rename = "PLAIN")]
    Plain,
    /// Salted challenge-response with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// Salted challenge-response with SHA-512 (Strimzi's `scram-sha-512` users).
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

/// TLS and SASL towards the brokers (`[queue.security]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurityConfig {
    pub protocol: SecurityProtocol,
    /// Used with the `sasl_*` protocols.
    pub sasl_mechanism: SaslMechanism,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub sasl_username: String,
    #[serde(skip_serializing_if = "Secret::is_empty")]
    pub sasl_password: Secret,
    /// PEM of the CA that signed the brokers' certificates (what the operator
    /// renders from a Secret); empty with `ssl_ca_location` empty: the system CAs.
    #[serde(skip_serializing_if = "Secret::is_empty")]
    pub ssl_ca_pem: Secret,
    /// A file holding that PEM instead.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub ssl_ca_location: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue.security: {0}")]
pub struct InvalidSecurity(&'static str);

impl KafkaSecurityConfig {
    /// Checks that the settings belong together, so a half-configured secret
    /// fails at start-up instead of as an endless reconnect loop.
    pub fn validate(&self) -> Result<(), InvalidSecurity> {
        let has_credentials = !self.sasl_username.is_empty() || !self.sasl_password.is_empty();
        if self.protocol.uses_sasl() {
            if self.sasl_username.is_empty() || self.sasl_password.is_empty() {
                return Err(InvalidSecurity(
                    "the sasl_* protocols need sasl_username and sasl_password",
                ));
            }
        } else if has_credentials {
            return Err(InvalidSecurity(
                "SASL credentials are set but the protocol does not use SASL",
            ));
        }
        let has_ca = !self.ssl_ca_pem.is_empty() || !self.ssl_ca_location.is_empty();
        if has_ca && !self.protocol.uses_tls() {
            return Err(InvalidSecurity(
                "a CA is set but the protocol does not use TLS",
            ));
        }
        if !self.ssl_ca_pem.is_empty() && !self.ssl_ca_location.is_empty() {
            return Err(InvalidSecurity(
                "set ssl_ca_pem or ssl_ca_location, not both",
            ));
        }
        Ok(())
    }

    /// librdkafka's settings for these, to add to a client's configuration
    /// (`bootstrap.servers` and the client's own settings come on top). The
    /// values include the password in clear: they are for librdkafka only.
    pub fn client_settings(&self) -> Vec<(&'static str, String)> {
        let mut settings = vec![("security.protocol", self.protocol.as_str().to_owned())];
        if self.protocol.uses_sasl() {
            settings.push(("sasl.mechanism", self.sasl_mechanism.as_str().to_owned()));
            settings.push(("sasl.username", self.sasl_username.clone()));
            settings.push(("sasl.password", self.sasl_password.expose().to_owned()));
        }
        if !self.ssl_ca_pem.is_empty() {
            settings.push(("ssl.ca.pem", self.ssl_ca_pem.expose().to_owned()));
        }
        if !self.ssl_ca_location.is_empty() {
            settings.push(("ssl.ca.location", self.ssl_ca_location.clone()));
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting<'a>(settings: &'a [(&str, String)], key: &str) -> Option<&'a str> {
        settings
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn sasl_over_tls_sets_every_librdkafka_key() {
        let security = KafkaSecurityConfig {
            protocol: SecurityProtocol::from_parts(true, true),
            sasl_mechanism: SaslMechanism::ScramSha512,
            sasl_username: "ocr".into(),
            sasl_password: Secret::new("pw"),
            ssl_ca_pem: Secret::new("-----BEGIN CERTIFICATE-----"),
            ssl_ca_location: String::new(),
        };
        security.validate().expect("complete settings");
        let settings = security.client_settings();
        assert_eq!(setting(&settings, "security.protocol"), Some("sasl_ssl"));
        assert_eq!(setting(&settings, "sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(setting(&settings, "sasl.username"), Some("ocr"));
        assert_eq!(setting(&settings, "sasl.password"), Some("pw"));
        assert_eq!(
            setting(&settings, "ssl.ca.pem"),
            Some("-----BEGIN CERTIFICATE-----")
        );
        assert!(!format!("{security:?}").contains("pw\""));
    }

    #[test]
    fn plaintext_sets_no_credentials() {
        let settings = KafkaSecurityConfig::default().client_settings();
        assert_eq!(
            settings,
            vec![("security.protocol", "plaintext".to_owned())]
        );
    }

    #[test]
    fn half_configured_security_is_refused() {
        let sasl_without_password = KafkaSecurityConfig {
            protocol: SecurityProtocol::SaslPlaintext,
            sasl_username: "ocr".into(),
            ..KafkaSecurityConfig::default()
        };
        assert!(sasl_without_password.validate().is_err());
        let ca_without_tls = KafkaSecurityConfig {
            ssl_ca_location: "/ca.pem".into(),
            ..KafkaSecurityConfig::default()
        };
        assert!(ca_without_tls.validate().is_err());
        let password_without_sasl = KafkaSecurityConfig {
            sasl_password: Secret::new("pw"),
            ..KafkaSecurityConfig::default()
        };
        assert!(password_without_sasl.validate().is_err());
    }
}
