//! `Idempotency-Key` semantics from the IETF draft
//! (draft-ietf-httpapi-idempotency-key-header): the same key with the same
//! payload yields the same job; the same key with another payload is a client
//! error (422); a key whose first request is still being handled is a conflict
//! (409).

use super::JobId;

/// A stored key, as the store returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub request_sha256: String,
    /// Set once the first request has stored its job.
    pub job_id: Option<JobId>,
    pub created_at_ms: i64,
}

/// A key this request holds: reserved (or taken over) at `reserved_at_ms`,
/// which identifies the reservation. The job's insert binds the key only if
/// that reservation is still the key's, so a request that was presumed dead
/// and outlived by a take-over cannot create a second job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldKey {
    pub key: String,
    pub reserved_at_ms: i64,
}

/// What to do with a request whose key already exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDecision {
    /// Answer with the job the first request created.
    Replay(JobId),
    /// The payload differs from the first request's.
    PayloadMismatch,
    /// The first request is still running.
    InFlight,
    /// The first request died before it finished; this request may take the key over.
    TakeOver,
}

/// Decides how to treat a request that reuses `existing`'s key.
///
/// A key stuck without a job for longer than `abandon_after_ms` belongs to a
/// request whose process died; without a take-over the client could never use
/// that key again.
pub fn decide(
    existing: &KeyRecord,
    request_sha256: &str,
    now_ms: i64,
    abandon_after_ms: i64,
) -> KeyDecision {
    if existing.request_sha256 != request_sha256 {
        return KeyDecision::PayloadMismatch;
    }
    match existing.job_id {
        Some(job) => KeyDecision::Replay(job),
        None if now_ms - existing.created_at_ms > abandon_after_ms => KeyDecision::TakeOver,
        None => KeyDecision::InFlight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sha: &str, job: Option<JobId>, created: i64) -> KeyRecord {
        KeyRecord {
            request_sha256: sha.into(),
            job_id: job,
            created_at_ms: created,
        }
    }

    #[test]
    fn same_payload_replays_the_first_job() {
        let job = JobId::new();
        assert_eq!(
            decide(&record("a", Some(job), 0), "a", 10, 1000),
            KeyDecision::Replay(job)
        );
    }

    #[test]
    fn different_payload_is_rejected_even_in_flight() {
        assert_eq!(
            decide(&record("a", None, 0), "b", 10, 1000),
            KeyDecision::PayloadMismatch
        );
        assert_eq!(
            decide(&record("a", Some(JobId::new()), 0), "b", 10, 1000),
            KeyDecision::PayloadMismatch
        );
    }

    #[test]
    fn unfinished_key_is_in_flight_until_abandoned() {
        assert_eq!(
            decide(&record("a", None, 0), "a", 999, 1000),
            KeyDecision::InFlight
        );
        assert_eq!(
            decide(&record("a", None, 0), "a", 1001, 1000),
            KeyDecision::TakeOver
        );
    }
}
