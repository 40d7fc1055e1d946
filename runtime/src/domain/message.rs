//! Messages on the queues. The database is the source of truth, so every
//! message can be replayed any number of times.

use super::JobId;
use ocr_engine::Page;
use serde::{Deserialize, Serialize};

/// A job to run, on the jobs topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    pub job_id: JobId,
    /// Where the input lies in the blob store. A worker in writer mode reads
    /// it from here so that inference goes on while the database is down;
    /// absent in messages from older producers (the worker looks it up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_key: Option<String>,
}

impl JobMessage {
    pub fn new(job_id: JobId, input_key: impl Into<String>) -> Self {
        JobMessage {
            job_id,
            input_key: Some(input_key.into()),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // A struct of strings always serialises.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// What inference produced for one job, on the results topic (writer mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEvent {
    pub job_id: JobId,
    /// Inference attempts this delivery of the job took in its worker.
    pub attempt: u32,
    pub outcome: InferenceOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InferenceOutcome {
    Recognized {
        page: Page,
    },
    /// The input can never be recognised: the job becomes `Failed`.
    BadInput {
        reason: String,
    },
    /// Transient failures used up the attempt budget: `DeadLettered`.
    GaveUp {
        reason: String,
    },
}

impl ResultEvent {
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A W3C `traceparent` for a job: the job id is the trace id, so the logs of
/// the API, the worker and the writer for one job share one trace.
pub fn traceparent(job_id: JobId, span: u64) -> String {
    format!("00-{}-{span:016x}-01", job_id.0.simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_message_round_trips() {
        let message = JobMessage::new(JobId::new(), "inputs/x");
        assert_eq!(JobMessage::decode(&message.encode()).unwrap(), message);
    }

    #[test]
    fn job_message_without_input_key_still_decodes() {
        let id = JobId::new();
        let old = format!("{{\"job_id\":\"{id}\"}}");
        let decoded = JobMessage::decode(old.as_bytes()).unwrap();
        assert_eq!(decoded.job_id, id);
        assert_eq!(decoded.input_key, None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(JobMessage::decode(b"\xff\x00not json").is_err());
        assert!(ResultEvent::decode(b"{\"job_id\":1}").is_err());
    }

    #[test]
    fn result_event_round_trips() {
        let event = ResultEvent {
            job_id: JobId::new(),
            attempt: 2,
            outcome: InferenceOutcome::BadInput {
                reason: "not an image".into(),
            },
        };
        let decoded = ResultEvent::decode(&event.encode().unwrap()).unwrap();
        assert_eq!(decoded, event);
    }

    fn recognized(text: String) -> ResultEvent {
        let line = ocr_engine::Line {
            text: text.clone(),
            confidence: 0.9,
            polygon: [[0.0, 0.0], [10.0, 0.0], [10.0, 5.0], [0.0, 5.0]],
        };
        ResultEvent {
            job_id: JobId::new(),
            attempt: 1,
            outcome: InferenceOutcome::Recognized {
                page: ocr_engine::Page {
                    width: 10,
                    height: 5,
                    lines: vec![line],
                    text,
                },
            },
        }
    }

    proptest::proptest! {
        /// Messages come off topics any producer can write to: whatever the bytes (a valid
        /// message damaged anywhere, or anything at all), decoding answers without panicking,
        /// and what decodes encodes back to itself.
        #[test]
        fn hostile_messages_decode_or_fail_cleanly(
            text in ".{0,40}",
            damage in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..4),
            cut in proptest::prelude::any::<usize>(),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut bytes = recognized(text).encode().unwrap();
            for (at, byte) in damage {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            bytes.truncate(bytes.len() - cut % bytes.len().max(1));
            for input in [&bytes[..], &junk[..]] {
                if let Ok(event) = ResultEvent::decode(input) {
                    let again = ResultEvent::decode(&event.encode().unwrap()).unwrap();
                    proptest::prop_assert_eq!(again, event);
                }
                if let Ok(message) = JobMessage::decode(input) {
                    proptest::prop_assert_eq!(JobMessage::decode(&message.encode()).unwrap(), message);
                }
            }
        }
    }

    #[test]
    fn traceparent_is_w3c_shaped() {
        let id = JobId::new();
        let header = traceparent(id, 0xab);
        let parts: Vec<&str> = header.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[1].len(), 32);
        assert_eq!(parts[2], "00000000000000ab");
    }
}
