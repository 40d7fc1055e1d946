//! The writer loop: consume result events one at a time, make each durable
//! with [`ResultWriter`], then commit. In drain mode it exits once its group
//! has consumed everything on the results topic, which is how a topology
//! switch away from writer mode retires it.

use crate::app::persist::{ResultWriter, Written};
use crate::domain::message::ResultEvent;
use crate::queue::MessageConsumer;
use crate::telemetry;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Asks whether the group's lag on the results topic is zero.
pub type LagProbe = Box<dyn Fn() -> LagFuture + Send + Sync>;
pub type LagFuture = Pin<Box<dyn Future<Output = Option<i64>> + Send>>;

/// How long the writer must see no message before it asks about lag.
const IDLE_BEFORE_DRAIN_CHECK: Duration = Duration::from_millis(500);

pub struct ResultLoop {
    pub consumer: Box<dyn MessageConsumer>,
    pub writer: ResultWriter,
    /// Drain mode: exit once this reports a lag of 0.
    pub drain: Option<LagProbe>,
}

impl ResultLoop {
    /// Runs until shutdown, or, in drain mode, until nothing is left.
    /// Returns true when it stopped because it drained.
    pub async fn run(mut self, shutdown: CancellationToken) -> bool {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = self.consumer.next() => Some(next),
                _ = tokio::time::sleep(IDLE_BEFORE_DRAIN_CHECK), if self.drain.is_some() => None,
            };
            let delivery = match next {
                None => {
                    if let Some(probe) = &self.drain {
                        if probe().await == Some(0) {
                            tracing::info!("results topic drained; writer exiting");
                            return true;
                        }
                    }
                    continue;
                }
                Some(None) => break,
                Some(Some(Err(err))) => {
                    tracing::warn!(error = %err, "receiving results failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Some(Some(Ok(delivery))) => delivery,
            };
            match ResultEvent::decode(&delivery.payload) {
                Ok(event) => {
                    let span = tracing::info_span!(
                        parent: None,
                        "ocr.persist",
                        ocr.job.id = %event.job_id,
                        ocr.outcome = tracing::field::Empty
                    );
                    telemetry::continue_trace(&span, delivery.traceparent.as_deref());
                    let writing = self.writer.write(&event, &shutdown);
                    match writing.instrument(span.clone()).await {
                        Ok(written) => {
                            span.record("ocr.outcome", tracing::field::debug(&written));
                            if written != Written::Duplicate {
                                tracing::info!(
                                    job = %event.job_id,
                                    traceparent = delivery.traceparent.as_deref().unwrap_or(""),
                                    outcome = ?written,
                                    "result written"
                                );
                            }
                        }
                        // Uncommitted: the next writer writes it.
                        Err(_interrupted) => break,
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "skipping a message that is not a result event");
                }
            }
            if let Err(err) = self.consumer.complete(&[delivery.receipt]).await {
                tracing::warn!(error = %err, "committing the result offset failed");
            }
        }
        tracing::info!("writer stopped");
        false
    }
}
