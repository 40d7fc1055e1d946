//! Rules of the system with no I/O: the job state machine, idempotency, the
//! messages that travel between roles and how retries back off.

pub mod idempotency;
pub mod job;
pub mod message;
pub mod retry;
pub mod tenant;
pub mod watermark;

pub use job::{Job, JobId, JobStatus, NewJob, Transition};
