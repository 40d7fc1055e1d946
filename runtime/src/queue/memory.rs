//! In-process queue for standalone mode. It keeps nothing across restarts: the
//! database does. At start-up standalone mode re-enqueues every unfinished
//! job, which gives the same at-least-once guarantee as Kafka's committed
//! offsets.

use super::{Delivery, JobPublisher, MessageConsumer, QueueError, Receipt};
use crate::domain::message::JobMessage;
use async_trait::async_trait;
use tokio::sync::mpsc;

/// A message in the channel: the payload and the publisher's `traceparent`.
type Message = (Vec<u8>, Option<String>);

pub fn channel() -> (MemoryPublisher, MemoryConsumer) {
    let (tx, rx) = mpsc::unbounded_channel();
    (MemoryPublisher { tx }, MemoryConsumer { rx, received: 0 })
}

#[derive(Clone)]
pub struct MemoryPublisher {
    tx: mpsc::UnboundedSender<Message>,
}

pub struct MemoryConsumer {
    rx: mpsc::UnboundedReceiver<Message>,
    received: i64,
}

#[async_trait]
impl JobPublisher for MemoryPublisher {
    async fn publish(&self, message: &JobMessage) -> Result<(), QueueError> {
        self.tx
            .send((message.encode(), crate::telemetry::current_traceparent()))
            .map_err(|_| QueueError::Closed)
    }

    async fn check(&self) -> Result<(), QueueError> {
        if self.tx.is_closed() {
            Err(QueueError::Closed)
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl MessageConsumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let (payload, traceparent) = self.rx.recv().await?;
        let receipt = Receipt {
            partition: 0,
            offset: self.received,
        };
        self.received += 1;
        Some(Ok(Delivery {
            payload,
            traceparent,
            receipt,
        }))
    }

    /// Nothing to record: the database is what survives a restart.
    async fn complete(&mut self, _done: &[Receipt]) -> Result<(), QueueError> {
        Ok(())
    }
}
