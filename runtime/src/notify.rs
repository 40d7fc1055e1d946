//! The completion webhook: an HTTP POST per finished job, signed with
//! HMAC-SHA256 so the receiver can trust it, and carrying the job id so it can
//! drop the duplicates that at-least-once delivery brings.
//!
//! Headers: `ocr-job-id` and `idempotency-key` (both the job id),
//! `ocr-timestamp` (Unix seconds) and `ocr-signature: sha256=<hex>` over
//! `"{timestamp}.{body}"`. Verify with [`verify_signature`] and reject old
//! timestamps to stop replays.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const HEADER_SIGNATURE: &str = "ocr-signature";
pub const HEADER_TIMESTAMP: &str = "ocr-timestamp";
pub const HEADER_JOB_ID: &str = "ocr-job-id";

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL {0:?} is not an http(s) URL")]
    BadUrl(String),
    #[error("building the webhook client: {0}")]
    Client(String),
    #[error("calling the webhook: {0}")]
    Transport(String),
    #[error("the webhook answered {0}")]
    Status(u16),
}

#[derive(Clone)]
pub struct Webhook {
    client: reqwest::Client,
    url: url::Url,
    secret: Vec<u8>,
}

impl Webhook {
    pub fn new(url: &str, secret: &str, timeout: Duration) -> Result<Self, WebhookError> {
        let bad = || WebhookError::BadUrl(ocr_contract::redact_url(url));
        let parsed = url::Url::parse(url).map_err(|_| bad())?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad());
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        Ok(Webhook {
            client,
            url: parsed,
            secret: secret.as_bytes().to_vec(),
        })
    }

    /// One delivery attempt; `Ok` only for a 2xx answer.
    pub async fn deliver(&self, job_id: &str, body: Vec<u8>) -> Result<(), WebhookError> {
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default()
            .to_string();
        let signature = sign(&self.secret, &timestamp, &body);
        let response = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(HEADER_JOB_ID, job_id)
            .header("idempotency-key", job_id)
            .header(HEADER_TIMESTAMP, &timestamp)
            .header(HEADER_SIGNATURE, signature)
            .body(body)
            .send()
            .await
            // reqwest names the URL in its errors, and a URL may carry credentials.
            .map_err(|e| WebhookError::Transport(e.without_url().to_string()))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status(response.status().as_u16()))
        }
    }
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `ocr-signature` header value for a body sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(secret, timestamp, body).finalize().into_bytes())
    )
}

/// Checks an `ocr-signature` header in constant time.
pub fn verify_signature(secret: &[u8], timestamp: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_digest) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(digest) = hex::decode(hex_digest) else {
        return false;
    };
    mac(secret, timestamp, body).verify_slice(&digest).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_is_caught() {
        let header = sign(b"s3cret", "1700000000", b"{\"job\":1}");
        assert!(verify_signature(
            b"s3cret",
            "1700000000",
            b"{\"job\":1}",
            &header
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000001",
            b"{\"job\":1}",
            &header
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            b"{\"job\":2}",
            &header
        ));
        assert!(!verify_signature(
            b"other",
            "1700000000",
            b"{\"job\":1}",
            &header
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            b"{\"job\":1}",
            "sha256=zz"
        ));
    }

    #[test]
    fn only_http_urls_are_accepted() {
        assert!(Webhook::new("ftp://x", "", Duration::from_secs(1)).is_err());
        assert!(Webhook::new("not a url", "", Duration::from_secs(1)).is_err());
        assert!(Webhook::new("https://hooks.example/ocr", "", Duration::from_secs(1)).is_ok());
    }
}
