//! The job state machine. Every state change in the system goes through
//! [`JobStatus::can_transition_to`], and storage applies it as a
//! compare-and-set, so a redelivered message or a second worker can never
//! move a job backwards or complete it twice.

use super::idempotency::HeldKey;
use super::watermark::RelayId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Where a job is in its life. Stored as the variant name in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum JobStatus {
    /// Stored in the database; its message is not on the queue (its publish
    /// failed, or the API was too busy to start it): the sweeper publishes it.
    Accepted,
    /// Handed to the queue: the message is published, or the API that stored
    /// the job is publishing it (if that fails the job goes back to
    /// `Accepted`; if that API dies first, the sweeper republishes it, see
    /// [`crate::domain::watermark`]).
    Queued,
    /// A worker claimed the job and is running OCR.
    Processing,
    /// The result is stored.
    Succeeded,
    /// The input can never be recognised (for example an image that does not decode).
    Failed,
    /// Processing kept failing for transient reasons until the attempt budget ran out;
    /// the message was moved to the dead-letter topic for an operator to inspect.
    DeadLettered,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Accepted,
        JobStatus::Queued,
        JobStatus::Processing,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Accepted => "Accepted",
            JobStatus::Queued => "Queued",
            JobStatus::Processing => "Processing",
            JobStatus::Succeeded => "Succeeded",
            JobStatus::Failed => "Failed",
            JobStatus::DeadLettered => "DeadLettered",
        }
    }

    /// A final state: nothing may change the job any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::DeadLettered
        )
    }

    /// The legal edges of the state machine.
    ///
    /// `Accepted -> Processing` exists because a worker may receive the message
    /// before the API has recorded that the publish was acknowledged.
    /// `Processing -> Processing` is a reclaim: the worker that held the job died
    /// (its offset was never committed) and the message was redelivered.
    /// `Processing -> Queued` hands a job back after a transient failure.
    /// `Queued -> Accepted` gives a job whose publish failed to the sweeper.
    /// `Queued -> Queued` marks a job the sweeper republished because its
    /// message was lost (it refreshes the row's time, so it is not
    /// republished again at every sweep).
    pub fn can_transition_to(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Accepted, Queued)
                | (Accepted, Processing)
                | (Queued, Processing)
                | (Queued, Queued)
                | (Queued, Accepted)
                | (Processing, Processing)
                | (Processing, Queued)
                | (Processing, Succeeded)
                | (Processing, Failed)
                | (Processing, DeadLettered)
                | (Accepted, DeadLettered)
                | (Queued, DeadLettered)
        )
    }

    /// States from which a worker may claim the job.
    pub fn claimable() -> [JobStatus; 3] {
        [
            JobStatus::Accepted,
            JobStatus::Queued,
            JobStatus::Processing,
        ]
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown job status {0:?}")]
pub struct UnknownStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// A job id: a UUIDv7, so ids sort by creation time (good for B-tree inserts
/// and for reading the table in arrival order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// A job as the database holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub client_id: String,
    pub status: JobStatus,
    /// How many times a worker claimed the job.
    pub attempts: u32,
    /// Key of the input image in the blob store.
    pub input_key: String,
    pub content_type: String,
    pub input_sha256: String,
    pub input_bytes: u64,
    pub idempotency_key: Option<String>,
    /// The recognised page as JSON, once `Succeeded`.
    pub result: Option<String>,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What a new job needs; the rest is set by the store.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub client_id: String,
    pub input_key: String,
    pub content_type: String,
    pub input_sha256: String,
    pub input_bytes: u64,
    /// The request's idempotency key, reserved for it (see
    /// [`crate::domain::idempotency`]); inserting the job binds the key.
    pub idempotency: Option<HeldKey>,
    /// The API instance whose publish relay publishes the job: the row
    /// starts `Queued`, stamped with it. `None`: it starts `Accepted` and the
    /// sweeper publishes it.
    pub relay: Option<RelayId>,
}

impl NewJob {
    /// A job its API's relay publishes starts `Queued` (see
    /// [`crate::domain::watermark`]), any other `Accepted`.
    pub fn initial_status(&self) -> JobStatus {
        if self.relay.is_some() {
            JobStatus::Queued
        } else {
            JobStatus::Accepted
        }
    }
}

/// What happened to a compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The row was in an expected state and now holds the new one.
    Applied,
    /// Someone else changed the job first (or it does not exist); nothing was written.
    Lost,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_move() {
        for from in JobStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in JobStatus::ALL {
                assert!(
                    !from.can_transition_to(to),
                    "{from} -> {to} must be illegal"
                );
            }
        }
    }

    #[test]
    fn only_a_queued_job_whose_publish_failed_goes_back_to_accepted() {
        for from in JobStatus::ALL {
            assert_eq!(
                from.can_transition_to(JobStatus::Accepted),
                from == JobStatus::Queued,
                "{from} -> Accepted"
            );
        }
    }

    #[test]
    fn success_only_from_processing() {
        for from in JobStatus::ALL {
            assert_eq!(
                from.can_transition_to(JobStatus::Succeeded),
                from == JobStatus::Processing
            );
        }
    }

    #[test]
    fn status_round_trips_through_its_name() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
        }
        assert!("Done".parse::<JobStatus>().is_err());
    }

    #[test]
    fn job_ids_sort_by_creation() {
        let first = JobId::new();
        let second = JobId::new();
        assert!(first < second);
    }
}
