//! Republishes jobs stuck in `Accepted`: the API died (or the broker was down)
//! between the database write and the publish. Several API replicas may sweep
//! at once; the duplicates they publish are harmless.

use super::submit::Submitter;
use crate::domain::JobStatus;
use crate::storage::now_ms;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub async fn sweep_once(submitter: &Submitter, older_than: Duration) -> usize {
    let cutoff = now_ms() - older_than.as_millis() as i64;
    match submitter
        .store
        .ids_in_status(JobStatus::Accepted, cutoff, 500)
        .await
    {
        Ok(ids) => {
            for id in &ids {
                match submitter.store.get(*id).await {
                    Ok(Some(job)) => {
                        // The accept span is long gone: the republished
                        // message starts a trace of its own.
                        let span = tracing::info_span!(parent: None, "ocr.republish", ocr.job.id = %job.id);
                        submitter
                            .publish(job.id, &job.input_key)
                            .instrument(span)
                            .await
                    }
                    Ok(None) => {}
                    Err(err) => {
                        tracing::warn!(job = %id, error = %err, "sweeper could not read a job")
                    }
                }
            }
            if !ids.is_empty() {
                tracing::info!(count = ids.len(), "republished stale accepted jobs");
            }
            ids.len()
        }
        Err(err) => {
            tracing::warn!(error = %err, "sweeper could not list stale jobs");
            0
        }
    }
}

pub async fn run(submitter: Submitter, older_than: Duration, shutdown: CancellationToken) {
    let period = (older_than / 3).max(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        sweep_once(&submitter, older_than).await;
    }
}
