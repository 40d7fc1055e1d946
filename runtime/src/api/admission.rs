//! Load shedding for submissions: a cap on submissions in progress and a
//! budget of body bytes held in memory, both taken before a body is read.
//! Past either the request is answered 503 with `Retry-After` at once: a
//! client that backs off is served soon, and a flood costs the API neither
//! memory nor a queue of requests that time out anyway.
//!
//! The budget counts bytes, not pixels: the API never decodes an image (see
//! [`crate::app::input`]), so an upload costs what its body weighs; pixels
//! are bounded where images are decoded, in the worker's batches.

use crate::config::LimitsConfig;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Multipart framing around the image, as the body limit allows.
pub const FRAMING_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct Admission {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_request_bytes: usize,
    limits: (usize, usize),
}

/// Held while a submission is handled; dropping it frees its share.
#[must_use]
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Overloaded {
    #[error("the server is handling its limit of {0} submissions; retry shortly")]
    Submissions(usize),
    #[error("the server holds its limit of {0} bytes of uploads; retry shortly")]
    Memory(usize),
}

impl Admission {
    pub fn new(limits: &LimitsConfig) -> Admission {
        let max_request_bytes = limits.max_body_bytes + FRAMING_BYTES;
        // The budget always admits one request of the largest accepted size.
        let budget = limits.max_buffered_bytes.max(max_request_bytes);
        let slots = limits.max_concurrent_submissions.max(1);
        Admission {
            slots: Arc::new(Semaphore::new(slots)),
            bytes: Arc::new(Semaphore::new(budget)),
            max_request_bytes,
            limits: (slots, budget),
        }
    }

    /// Reserves a slot and the request's size (`Content-Length`, or the
    /// largest accepted body when it is not declared) without waiting.
    pub fn try_admit(&self, declared_len: Option<u64>) -> Result<Admitted, Overloaded> {
        let size = declared_len
            .map_or(self.max_request_bytes, |len| {
                usize::try_from(len).unwrap_or(usize::MAX)
            })
            .min(self.max_request_bytes);
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Overloaded::Submissions(self.limits.0))?;
        // `max_request_bytes` is far below u32::MAX (the body limit is a usize
        // of a few MiB); a larger configuration is refused, not wrapped.
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        let bytes = self
            .bytes
            .clone()
            .try_acquire_many_owned(size)
            .map_err(|err| match err {
                TryAcquireError::NoPermits | TryAcquireError::Closed => {
                    Overloaded::Memory(self.limits.1)
                }
            })?;
        Ok(Admitted {
            _slot: slot,
            _bytes: bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(submissions: usize, buffered: usize) -> LimitsConfig {
        LimitsConfig {
            max_body_bytes: 1_000,
            max_concurrent_submissions: submissions,
            max_buffered_bytes: buffered,
            ..LimitsConfig::default()
        }
    }

    #[test]
    fn sheds_past_the_submission_cap_and_recovers_when_one_finishes() {
        let admission = Admission::new(&limits(2, 1 << 30));
        let first = admission.try_admit(Some(10)).expect("first");
        let _second = admission.try_admit(Some(10)).expect("second");
        assert_eq!(
            admission.try_admit(Some(10)).err(),
            Some(Overloaded::Submissions(2))
        );
        drop(first);
        assert!(admission.try_admit(Some(10)).is_ok());
    }

    #[test]
    fn sheds_past_the_byte_budget_counting_undeclared_bodies_at_the_limit() {
        let max_request = 1_000 + FRAMING_BYTES;
        let admission = Admission::new(&limits(100, 2 * max_request));
        let _declared = admission.try_admit(Some(max_request as u64)).expect("one");
        let undeclared = admission.try_admit(None).expect("two");
        assert!(matches!(
            admission.try_admit(Some(1)),
            Err(Overloaded::Memory(_))
        ));
        drop(undeclared);
        // A lying Content-Length cannot reserve more than the body limit.
        assert!(admission.try_admit(Some(u64::MAX)).is_ok());
    }

    #[test]
    fn a_budget_below_one_request_still_admits_one() {
        let admission = Admission::new(&limits(10, 1));
        let only = admission.try_admit(None).expect("one request fits");
        assert!(admission.try_admit(Some(1)).is_err());
        drop(only);
    }
}
