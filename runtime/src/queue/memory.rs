//! In-process queue for standalone mode. It keeps nothing across restarts: the
//! database does. At start-up standalone mode re-enqueues every unfinished
//! job, which gives the same at-least-once guarantee as Kafka's committed
//! offsets.

use super::{Acknowledge, Delivery, JobConsumer, JobPublisher, QueueError};
use crate::domain::message::JobMessage;
use async_trait::async_trait;
use tokio::sync::mpsc;

pub fn channel() -> (MemoryPublisher, MemoryConsumer) {
    let (tx, rx) = mpsc::unbounded_channel();
    (MemoryPublisher { tx }, MemoryConsumer { rx })
}

#[derive(Clone)]
pub struct MemoryPublisher {
    tx: mpsc::UnboundedSender<JobMessage>,
}

pub struct MemoryConsumer {
    rx: mpsc::UnboundedReceiver<JobMessage>,
}

struct NoAck;

#[async_trait]
impl Acknowledge for NoAck {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        Ok(())
    }
}

#[async_trait]
impl JobPublisher for MemoryPublisher {
    async fn publish(&self, message: &JobMessage) -> Result<(), QueueError> {
        self.tx
            .send(message.clone())
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
impl JobConsumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<Delivery, QueueError>> {
        let message = self.rx.recv().await?;
        Some(Ok(Delivery {
            message: Ok(message),
            ack: Box::new(NoAck),
        }))
    }
}
