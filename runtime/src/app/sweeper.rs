//! Finds jobs that nothing is going to move and sets them going again.
//!
//! - `Queued` jobs of an API whose publish relay has not beaten for
//!   `queue.republish_after_ms`, stamped after its last watermark: that API
//!   died between the database write and the publish (see
//!   [`crate::domain::watermark`]). Given back to `Accepted`, below.
//! - `Accepted` past `queue.republish_after_ms`: its publish failed (the
//!   broker was down) or never started (see above). Republished.
//! - `Queued` past `queue.stale_after_ms`: its message is gone (retention
//!   deleted it, it was skipped as contended, a consumer lost it). Touched,
//!   so one sweep republishes it once, and republished.
//! - `Processing` past `queue.stale_after_ms`: its worker died or hung
//!   without its message coming back. Handed back to `Queued` (the attempt
//!   stays counted, so a job that kills every worker is still dead-lettered
//!   after `worker.max_attempts`) and republished.
//!
//! Several API replicas may sweep at once: every change is a compare-and-set
//! on the row's status and attempts, so only one of them republishes a job,
//! and a duplicate message is harmless anyway (the worker's claim decides).

use super::submit::Submitter;
use crate::domain::{Job, JobStatus, Transition};
use crate::storage::jobs::Changes;
use crate::storage::now_ms;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Jobs looked at per status and sweep.
const BATCH: u32 = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPolicy {
    pub republish_after: Duration,
    pub stale_after: Duration,
    /// Idempotency keys older than this are forgotten.
    pub key_ttl: Duration,
}

/// Jobs republished by one sweep, per status they were found in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Jobs of dead APIs given back to `Accepted` (republished by the next sweep).
    pub unconfirmed: usize,
    pub accepted: usize,
    pub queued: usize,
    pub processing: usize,
}

pub async fn sweep_once(submitter: &Submitter, policy: SweepPolicy) -> Swept {
    let now = now_ms();
    let cutoff = |age: Duration| now - i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
    let swept = Swept {
        unconfirmed: sweep_silent_relays(submitter, cutoff(policy.republish_after)).await,
        accepted: sweep_status(
            submitter,
            JobStatus::Accepted,
            cutoff(policy.republish_after),
        )
        .await,
        queued: sweep_status(submitter, JobStatus::Queued, cutoff(policy.stale_after)).await,
        processing: sweep_status(submitter, JobStatus::Processing, cutoff(policy.stale_after))
            .await,
    };
    match submitter.store.expire_keys(cutoff(policy.key_ttl)).await {
        Ok(0) => {}
        Ok(expired) => tracing::info!(expired, "forgot expired idempotency keys"),
        Err(err) => tracing::warn!(error = %err, "sweeper could not expire idempotency keys"),
    }
    if swept != Swept::default() {
        tracing::info!(
            unconfirmed = swept.unconfirmed,
            accepted = swept.accepted,
            queued = swept.queued,
            processing = swept.processing,
            "republished stale jobs"
        );
    }
    swept
}

/// Gives the unconfirmed jobs of every relay silent since `heard_before_ms`
/// back to `Accepted`, then forgets the relay.
async fn sweep_silent_relays(submitter: &Submitter, heard_before_ms: i64) -> usize {
    let store = &submitter.store;
    let silent = match store.silent_relays(heard_before_ms).await {
        Ok(silent) => silent,
        Err(err) => {
            tracing::warn!(error = %err, "sweeper could not list silent publish relays");
            return 0;
        }
    };
    let mut unconfirmed = 0;
    // This process's own relay is alive whatever its row says (its beats
    // failed while the database was away).
    for beat in silent
        .iter()
        .filter(|beat| beat.relay != submitter.relay.id())
    {
        match store.return_unconfirmed_jobs(beat).await {
            Ok(returned) => {
                unconfirmed += returned as usize;
                tracing::info!(relay = %beat.relay, returned, published_through = beat.published_through, "an API stopped beating; its jobs past its watermark go to the sweeper");
            }
            Err(err) => {
                tracing::warn!(relay = %beat.relay, error = %err, "sweeper could not return a silent relay's jobs");
                continue;
            }
        }
        if let Err(err) = store.forget_relay(beat).await {
            tracing::warn!(relay = %beat.relay, error = %err, "sweeper could not forget a silent relay");
        }
    }
    unconfirmed
}

async fn sweep_status(submitter: &Submitter, status: JobStatus, cutoff_ms: i64) -> usize {
    let ids = match submitter
        .store
        .ids_in_status(status, cutoff_ms, BATCH)
        .await
    {
        Ok(ids) => ids,
        Err(err) => {
            tracing::warn!(error = %err, %status, "sweeper could not list stale jobs");
            return 0;
        }
    };
    let mut republished = 0;
    for id in ids {
        let job = match submitter.store.get(id).await {
            Ok(Some(job)) if job.status == status => job,
            Ok(_) => continue,
            Err(err) => {
                tracing::warn!(job = %id, error = %err, "sweeper could not read a job");
                continue;
            }
        };
        // The accept span is long gone: the republished message starts a trace of its own.
        let span = tracing::info_span!(parent: None, "ocr.republish", ocr.job.id = %job.id, ocr.status = %status);
        if revive(submitter, &job).instrument(span).await {
            republished += 1;
        }
    }
    republished
}

/// Republishes one stale job; false when another sweeper or a worker moved
/// it first, or the publish failed (the next sweep tries again).
async fn revive(submitter: &Submitter, job: &Job) -> bool {
    match job.status {
        JobStatus::Accepted => {
            // Publishes and records `Queued`.
            submitter.publish(job.id, &job.input_key).await;
            true
        }
        JobStatus::Queued | JobStatus::Processing => {
            let error = (job.status == JobStatus::Processing).then(|| {
                "no progress while Processing; handed back by the sweeper (did its worker die?)"
                    .to_owned()
            });
            let claimed = submitter
                .store
                .transition(
                    job.id,
                    job.status,
                    JobStatus::Queued,
                    Some(job.attempts),
                    Changes {
                        error,
                        ..Changes::default()
                    },
                    now_ms(),
                )
                .await;
            match claimed {
                Ok(Transition::Applied) => {}
                Ok(Transition::Lost) => return false,
                Err(err) => {
                    tracing::warn!(job = %job.id, error = %err, "sweeper could not touch a stale job");
                    return false;
                }
            }
            match submitter.republish(job.id, &job.input_key).await {
                Ok(()) => true,
                Err(err) => {
                    tracing::warn!(job = %job.id, error = %err, "republishing a stale job failed; a later sweep tries again");
                    false
                }
            }
        }
        _ => false,
    }
}

pub async fn run(submitter: Submitter, policy: SweepPolicy, shutdown: CancellationToken) {
    let period =
        (policy.republish_after.min(policy.stale_after) / 3).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        sweep_once(&submitter, policy).await;
    }
}
