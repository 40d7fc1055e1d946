//! Rules of the system with no I/O: the job state machine, idempotency and
//! the messages that travel between roles.

pub mod idempotency;
pub mod job;
pub mod message;

pub use job::{Job, JobId, JobStatus, NewJob, Transition};
