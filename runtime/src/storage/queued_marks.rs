//! `Accepted -> Queued` for many jobs in one statement. Every accepted job
//! is marked once its message is published; done one by one that is a
//! second commit per job on the accept path. Concurrent submissions instead
//! share one `UPDATE ... WHERE id IN (...)`: the first mark to arrive runs at
//! once, and the marks that arrive while it runs go together in the next.

use super::jobs::{query_error, JobStore, StoreError};
use crate::domain::{JobId, JobStatus};
use sqlx::AnyPool;
use tokio::sync::{mpsc, oneshot};

/// Most jobs marked by one statement.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<(), String>>;

/// The sending side of the marking task.
pub struct Marks {
    requests: mpsc::UnboundedSender<(JobId, i64, Reply)>,
}

impl JobStore {
    /// Records `Queued` for an `Accepted` job (a job already further along is
    /// left as it is), batched with the marks of concurrent submissions.
    pub async fn mark_queued(&self, id: JobId, now_ms: i64) -> Result<(), StoreError> {
        let _timer = self.timer("mark_queued");
        let marks = self.queued_marks.get_or_init(|| {
            let (requests, pending) = mpsc::unbounded_channel();
            tokio::spawn(run(self.pool().clone(), pending));
            Marks { requests }
        });
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Corrupt("the Queued-marking task has stopped".into());
        marks
            .requests
            .send((id, now_ms, reply))
            .map_err(|_| gone())?;
        match answer.await.map_err(|_| gone())? {
            Ok(()) => Ok(()),
            Err(message) => Err(StoreError::Query {
                what: "mark jobs queued",
                source: sqlx::Error::Protocol(message),
            }),
        }
    }
}

/// Takes marks until every sender is gone (the store is dropped).
async fn run(pool: AnyPool, mut pending: mpsc::UnboundedReceiver<(JobId, i64, Reply)>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while pending.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let now = batch.iter().map(|(_, at, _)| *at).max().unwrap_or(0);
        let ids: Vec<JobId> = batch.iter().map(|(id, _, _)| *id).collect();
        let outcome = mark(&pool, &ids, now).await.map_err(|err| err.to_string());
        for (_, _, reply) in batch.drain(..) {
            let _ = reply.send(outcome.clone());
        }
    }
}

async fn mark(pool: &AnyPool, ids: &[JobId], now_ms: i64) -> Result<(), StoreError> {
    let placeholders = vec!["?"; ids.len()].join(", ");
    let sql = format!(
        "UPDATE jobs SET status = ?, updated_at = ? WHERE status = ? AND id IN ({placeholders})"
    );
    let mut query = sqlx::query(&sql)
        .bind(JobStatus::Queued.as_str())
        .bind(now_ms)
        .bind(JobStatus::Accepted.as_str());
    for id in ids {
        query = query.bind(id.to_string());
    }
    query
        .execute(pool)
        .await
        .map_err(query_error("mark jobs queued"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::NewJob;

    async fn store() -> JobStore {
        let store = JobStore::connect("sqlite::memory:", 1)
            .await
            .expect("sqlite");
        store.migrate().await.expect("migrations");
        store
    }

    fn job() -> NewJob {
        let id = JobId::new();
        NewJob {
            id,
            client_id: "t".into(),
            input_key: format!("inputs/{id}"),
            content_type: "image/png".into(),
            input_sha256: "00".repeat(32),
            input_bytes: 1,
            idempotency: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_marks_queue_every_accepted_job_and_leave_the_others() {
        let store = store().await;
        let mut ids = Vec::new();
        for _ in 0..50 {
            let job = job();
            store.insert(&job, 1).await.unwrap();
            ids.push(job.id);
        }
        // One job a worker already claimed: a late mark must not undo that.
        store
            .transition(
                ids[0],
                JobStatus::Accepted,
                JobStatus::Processing,
                None,
                Default::default(),
                2,
            )
            .await
            .unwrap();
        let marks = ids.iter().map(|id| {
            let store = store.clone();
            let id = *id;
            tokio::spawn(async move { store.mark_queued(id, 3).await })
        });
        for mark in futures::future::join_all(marks).await {
            mark.unwrap().unwrap();
        }
        assert_eq!(
            store.get(ids[0]).await.unwrap().unwrap().status,
            JobStatus::Processing
        );
        assert_eq!(store.count_in_status(JobStatus::Queued).await.unwrap(), 49);
        assert_eq!(store.count_in_status(JobStatus::Accepted).await.unwrap(), 0);
    }
}
