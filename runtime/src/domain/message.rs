//! Messages on the queue. The job message carries only the id: the database is
//! the source of truth, so a message can be replayed any number of times.

use super::JobId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    pub job_id: JobId,
}

impl JobMessage {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising a struct of one UUID cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let message = JobMessage {
            job_id: JobId::new(),
        };
        assert_eq!(JobMessage::decode(&message.encode()).unwrap(), message);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(JobMessage::decode(b"\xff\x00not json").is_err());
    }
}
