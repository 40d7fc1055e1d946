//! What `/livez` answers. A process that serves HTTP is not necessarily
//! alive: an engine call that never returns (a wedged GPU, a decoder in an
//! endless loop) or a consume loop that has stopped leaves a pod that looks
//! healthy and does nothing. Kubernetes restarts a pod whose liveness probe
//! fails; its unfinished messages are then redelivered to a fresh process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Liveness {
    inner: Arc<Inner>,
}

struct Inner {
    inference_timeout: Duration,
    next_inference: AtomicU64,
    inferences: Mutex<HashMap<u64, Instant>>,
    stopped: Mutex<Option<String>>,
}

/// An inference in progress; dropping it (returning, unwinding) ends it.
#[must_use]
pub struct Inferring {
    liveness: Liveness,
    id: u64,
}

impl Drop for Inferring {
    fn drop(&mut self) {
        self.liveness
            .inner
            .inferences
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Liveness {
    /// `inference_timeout`: how long one engine call may take before the
    /// process counts as stuck.
    pub fn new(inference_timeout: Duration) -> Liveness {
        Liveness {
            inner: Arc::new(Inner {
                inference_timeout,
                next_inference: AtomicU64::new(0),
                inferences: Mutex::new(HashMap::new()),
                stopped: Mutex::new(None),
            }),
        }
    }

    /// For processes without an engine: alive unless a loop stops.
    pub fn without_engine() -> Liveness {
        Liveness::new(Duration::MAX)
    }

    pub fn inference(&self) -> Inferring {
        let id = self.inner.next_inference.fetch_add(1, Ordering::Relaxed);
        self.inner
            .inferences
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Instant::now());
        Inferring {
            liveness: self.clone(),
            id,
        }
    }

    /// A loop the process exists for has ended without being asked to.
    pub fn stopped(&self, what: impl Into<String>) {
        let what = what.into();
        tracing::error!(reason = %what, "the process is no longer alive");
        *self
            .inner
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(what);
    }

    pub fn check(&self) -> Result<(), String> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Result<(), String> {
        if let Some(what) = self
            .inner
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(what);
        }
        let oldest = self
            .inner
            .inferences
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .min()
            .copied();
        match oldest {
            Some(started) if now.duration_since(started) > self.inner.inference_timeout => {
                Err(format!(
                    "an inference has been running for {:.0?}, over worker.inference_timeout_ms ({:?})",
                    now.duration_since(started),
                    self.inner.inference_timeout
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inference_past_its_timeout_fails_until_it_returns() {
        let liveness = Liveness::new(Duration::from_secs(10));
        let now = Instant::now();
        assert!(liveness.check_at(now).is_ok());
        let stuck = liveness.inference();
        let quick = liveness.inference();
        drop(quick);
        assert!(liveness.check_at(now + Duration::from_secs(5)).is_ok());
        let failed = liveness.check_at(now + Duration::from_secs(11));
        assert!(
            failed
                .as_ref()
                .is_err_and(|m| m.contains("inference_timeout")),
            "{failed:?}"
        );
        drop(stuck);
        assert!(liveness.check_at(now + Duration::from_secs(11)).is_ok());
    }

    #[test]
    fn a_stopped_loop_fails_for_good() {
        let liveness = Liveness::without_engine();
        let _long = liveness.inference();
        assert!(liveness
            .check_at(Instant::now() + Duration::from_secs(1_000_000))
            .is_ok());
        liveness.stopped("the job loop stopped");
        assert_eq!(liveness.check(), Err("the job loop stopped".to_owned()));
    }
}
