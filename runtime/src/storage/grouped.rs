//! Group commit for the accept path. Every accepted job is one INSERT (and
//! one `Accepted -> Queued` mark when the sweeper publishes it); done one by
//! one that is a commit per job, and the database's commit rate caps the API.
//! Concurrent submissions instead share statements: the first write to
//! arrive is made at once, and the writes that arrive while that statement
//! runs go together in the next commit (one multi-row `INSERT` and one
//! `UPDATE ... WHERE id IN (...)` in one transaction). Nobody waits for a
//! batch to fill, so a lone request costs what it did before.
//!
//! A request is answered only once its own row is committed, so the crash
//! guarantees are those of one statement per job. If the database refuses a
//! grouped commit, its writes are retried one by one: one bad row never
//! fails its neighbours.

use super::jobs::StoreError;
use crate::domain::{JobId, JobStatus, NewJob};
use async_trait::async_trait;
use sqlx::AnyPool;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most rows one statement writes. Every batch size is its own prepared
/// statement, cached per connection (sqlx keeps 100): 64 insert shapes plus
/// the marks' 7 (padded to powers of two) plus the store's other queries fit.
pub(crate) const MAX_ROWS: usize = 64;

/// Statements of one kind running at once. More than one lets the next
/// batch start while the last waits for its commit to reach the disk
/// (InnoDB then flushes both in one group commit).
const STATEMENTS_IN_FLIGHT: usize = 2;

type Reply = oneshot::Sender<Result<(), String>>;
type Requests<W> = mpsc::UnboundedSender<(<W as GroupedWrite>::Row, Reply)>;

/// One kind of grouped write.
#[async_trait]
pub(crate) trait GroupedWrite: Send + Sync + 'static {
    type Row: Send + Sync + 'static;
    /// For errors: what the statement does.
    const WHAT: &'static str;
    async fn write(&self, pool: &AnyPool, rows: &[Self::Row]) -> Result<(), sqlx::Error>;
}

/// The sending side of a writing task; the task ends when this is dropped.
/// The task lives on the runtime that first wrote; a store used again after
/// that runtime is gone (tools, tests) starts a new one.
pub(crate) struct Group<W: GroupedWrite> {
    write: Arc<W>,
    requests: std::sync::Mutex<Option<Requests<W>>>,
}

impl<W: GroupedWrite> Group<W> {
    pub(crate) fn new(write: W) -> Self {
        Group {
            write: Arc::new(write),
            requests: std::sync::Mutex::new(None),
        }
    }

    fn sender(&self, pool: &AnyPool) -> Requests<W> {
        let mut requests = self
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match requests.as_ref() {
            Some(sender) if !sender.is_closed() => sender.clone(),
            _ => {
                let (sender, pending) = mpsc::unbounded_channel();
                tokio::spawn(run(pool.clone(), self.write.clone(), pending));
                *requests = Some(sender.clone());
                sender
            }
        }
    }

    /// Writes `row` with whatever else is waiting; returns once it is committed.
    pub(crate) async fn write(&self, pool: &AnyPool, row: W::Row) -> Result<(), StoreError> {
        let gone = || StoreError::Corrupt(format!("the task that runs {} has stopped", W::WHAT));
        let (reply, answer) = oneshot::channel();
        self.sender(pool).send((row, reply)).map_err(|_| gone())?;
        answer
            .await
            .map_err(|_| gone())?
            .map_err(|message| StoreError::Query {
                what: W::WHAT,
                source: sqlx::Error::Protocol(message),
            })
    }
}

async fn run<W: GroupedWrite>(
    pool: AnyPool,
    write: Arc<W>,
    mut pending: mpsc::UnboundedReceiver<(W::Row, Reply)>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(STATEMENTS_IN_FLIGHT));
    loop {
        // A batch is gathered only once a statement may start, so it holds
        // everything that arrived while the others ran.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_ROWS);
        if pending.recv_many(&mut batch, MAX_ROWS).await == 0 {
            return;
        }
        let (pool, write) = (pool.clone(), write.clone());
        tokio::spawn(async move {
            write_batch(&pool, &*write, batch).await;
            drop(slot);
        });
    }
}

async fn write_batch<W: GroupedWrite>(pool: &AnyPool, write: &W, batch: Vec<(W::Row, Reply)>) {
    let (rows, replies): (Vec<W::Row>, Vec<Reply>) = batch.into_iter().unzip();
    match write.write(pool, &rows).await {
        Ok(()) => {
            for reply in replies {
                let _ = reply.send(Ok(()));
            }
        }
        // The database refused the statement (a key, a constraint):
        // some row is at fault, and only that one should fail.
        Err(sqlx::Error::Database(_)) if rows.len() > 1 => {
            for (row, reply) in rows.iter().zip(replies) {
                let alone = write.write(pool, std::slice::from_ref(row)).await;
                let _ = reply.send(alone.map_err(|err| err.to_string()));
            }
        }
        // The database is unreachable or timed out: every row shares the
        // failure, and retrying them one by one would only hold the last
        // request for as many timeouts.
        Err(err) => {
            let message = err.to_string();
            for reply in replies {
                let _ = reply.send(Err(message.clone()));
            }
        }
    }
}

/// One write of the accept path.
pub(crate) enum AcceptWrite {
    /// A new job without an idempotency key (one with a key is inserted in
    /// a transaction with its key).
    Insert(NewJob, i64),
    /// `Accepted -> Queued` once the sweeper published the job. A job
    /// already further along (a worker claimed it first) is left as it is.
    MarkQueued(JobId, i64),
}

/// New jobs and `Queued` marks share one commit: a mark written on its own
/// would cost the disk a second flush per job, and on a disk whose flush
/// takes milliseconds that halves the accept rate.
pub(crate) struct AcceptWrites;

#[async_trait]
impl GroupedWrite for AcceptWrites {
    type Row = AcceptWrite;
    const WHAT: &'static str = "insert jobs and mark them queued";

    async fn write(&self, pool: &AnyPool, rows: &[AcceptWrite]) -> Result<(), sqlx::Error> {
        let mut inserts = Vec::new();
        let mut marks = Vec::new();
        for row in rows {
            match row {
                AcceptWrite::Insert(job, at) => inserts.push((job, *at)),
                AcceptWrite::MarkQueued(id, at) => marks.push((*id, *at)),
            }
        }
        match (inserts.is_empty(), marks.is_empty()) {
            (false, true) => insert_jobs(pool, &inserts).await,
            (true, false) => mark_queued(pool, &marks).await,
            (true, true) => Ok(()),
            (false, false) => {
                let mut tx = pool.begin().await?;
                insert_jobs(&mut *tx, &inserts).await?;
                mark_queued(&mut *tx, &marks).await?;
                tx.commit().await
            }
        }
    }
}

/// The `INSERT` of `rows` new jobs, bound by [`bind_new_job`].
pub(crate) fn insert_jobs_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO jobs (id, client_id, status, attempts, input_key, content_type, \
         input_sha256, input_bytes, idempotency_key, accepted_by, created_at, updated_at) VALUES ",
    );
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)");
    }
    sql
}

pub(crate) fn bind_new_job<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    job: &'q NewJob,
    now_ms: i64,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    query
        .bind(job.id.to_string())
        .bind(job.client_id.as_str())
        .bind(job.initial_status().as_str())
        .bind(job.input_key.as_str())
        .bind(job.content_type.as_str())
        .bind(job.input_sha256.as_str())
        .bind(job.input_bytes as i64)
        .bind(job.idempotency.as_ref().map(|held| held.key.as_str()))
        .bind(job.relay.map(|relay| relay.0))
        .bind(now_ms)
        .bind(now_ms)
}

async fn insert_jobs<'e, E>(executor: E, rows: &[(&NewJob, i64)]) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let sql = insert_jobs_sql(rows.len());
    let mut query = sqlx::query(&sql);
    for (job, now_ms) in rows {
        query = bind_new_job(query, job, *now_ms);
    }
    query.execute(executor).await?;
    Ok(())
}

async fn mark_queued<'e, E>(executor: E, rows: &[(JobId, i64)]) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let now = rows.iter().map(|(_, at)| *at).max().unwrap_or(0);
    // Padded to a power of two by repeating the last id, so at most 7
    // statement shapes exist.
    let slots = rows.len().next_power_of_two();
    let placeholders = vec!["?"; slots].join(", ");
    let sql = format!(
        "UPDATE jobs SET status = ?, updated_at = ? WHERE status = ? AND id IN ({placeholders})"
    );
    let mut query = sqlx::query(&sql)
        .bind(JobStatus::Queued.as_str())
        .bind(now)
        .bind(JobStatus::Accepted.as_str());
    let last = rows.last().map(|(id, _)| *id);
    for id in rows
        .iter()
        .map(|(id, _)| *id)
        .chain(std::iter::repeat_n(last, slots - rows.len()).flatten())
    {
        query = query.bind(id.to_string());
    }
    query.execute(executor).await?;
    Ok(())
}
