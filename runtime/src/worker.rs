//! The worker loop: take a message, process its job, acknowledge. Shutdown is
//! graceful: polling stops, the job in hand finishes and is acknowledged.

use crate::app::process::{Handled, Processor};
use crate::domain::message::JobMessage;
use crate::queue::{JobConsumer, JobPublisher};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const RETRY_PAUSE: Duration = Duration::from_millis(500);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(10);

pub async fn run_standard(
    mut consumer: Box<dyn JobConsumer>,
    processor: Processor,
    dead_letters: Option<Arc<dyn JobPublisher>>,
    shutdown: CancellationToken,
) {
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        let delivery = match delivery {
            None => break,
            Some(Ok(delivery)) => delivery,
            Some(Err(err)) => {
                tracing::warn!(error = %err, "receiving from the queue failed");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        let job_id = match delivery.message {
            Ok(JobMessage { job_id }) => job_id,
            Err(reason) => {
                tracing::warn!(%reason, "skipping a message that is not a job message");
                if let Err(err) = delivery.ack.ack().await {
                    tracing::warn!(error = %err, "acknowledging a skipped message failed");
                }
                continue;
            }
        };
        processor.metrics.set_in_flight(1);
        let mut pause = RETRY_PAUSE;
        let finished = loop {
            let outcome = processor
                .handle(&[job_id])
                .await
                .pop()
                .unwrap_or(Handled::Skipped("no outcome"));
            match outcome {
                Handled::Retry(reason) => {
                    tracing::warn!(job = %job_id, %reason, "transient failure; retrying");
                    tokio::select! {
                        // Unacknowledged: the message comes back after a restart.
                        _ = shutdown.cancelled() => break false,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                }
                Handled::DeadLettered(reason) => {
                    tracing::error!(job = %job_id, %reason, "job dead-lettered");
                    if let Some(dlq) = &dead_letters {
                        if let Err(err) = dlq.publish(&JobMessage { job_id }).await {
                            tracing::error!(job = %job_id, error = %err, "dead-letter publish failed");
                        }
                    }
                    break true;
                }
                other => {
                    tracing::info!(job = %job_id, outcome = ?other, "job handled");
                    break true;
                }
            }
        };
        processor.metrics.set_in_flight(0);
        if !finished {
            break;
        }
        if let Err(err) = delivery.ack.ack().await {
            // Redelivery is harmless: the job is final in the database.
            tracing::warn!(job = %job_id, error = %err, "acknowledge failed");
        }
    }
    tracing::info!("worker stopped");
}
