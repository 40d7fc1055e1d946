//! The job table. One implementation over sqlx's `Any` driver serves MySQL
//! (clusters) and SQLite (standalone): both use `?` placeholders and we only
//! store strings and integers, so the SQL is shared and only the migrations
//! differ per dialect.

use crate::domain::idempotency::{HeldKey, KeyRecord};
use crate::domain::{Job, JobId, JobStatus, NewJob, Transition};
use crate::metrics::Metrics;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};
use std::sync::Arc;
use std::time::{Duration, Instant};

static MYSQL_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/mysql");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database URL {0:?} is neither mysql:// nor sqlite:")]
    UnsupportedUrl(String),
    #[error("connecting to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("running migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("another process held the migration lock for more than {0:?}")]
    MigrationLockTimeout(Duration),
    #[error("the database refused the migration lock (GET_LOCK returned NULL)")]
    MigrationLockRefused,
    #[error("database query failed ({what}): {source}")]
    Query {
        what: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("illegal job transition {from} -> {to}")]
    IllegalTransition { from: JobStatus, to: JobStatus },
    #[error("corrupt row in jobs table: {0}")]
    Corrupt(String),
    /// The idempotency key was taken over by another request after this one
    /// was presumed dead; no job was written.
    #[error("the idempotency key now belongs to another request")]
    KeyLost,
}

pub(crate) fn query_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// How long one migrator waits for another before giving up: a migrator that
/// died released its lock with its connection, so only a live one is waited for.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(600);

/// Takes the named lock (per database) that makes concurrent migrators run one
/// after the other.
async fn acquire_migration_lock(conn: &mut sqlx::AnyConnection) -> Result<(), StoreError> {
    const TRY_SECONDS: u64 = 5;
    let started = Instant::now();
    loop {
        let granted: Option<i64> =
            sqlx::query_scalar("SELECT GET_LOCK(LEFT(CONCAT('ocr_migrate.', DATABASE()), 64), ?)")
                .bind(TRY_SECONDS as i64)
                .fetch_one(&mut *conn)
                .await
                .map_err(query_error("take the migration lock"))?;
        match granted {
            Some(1) => return Ok(()),
            Some(_) if started.elapsed() < MIGRATION_LOCK_WAIT => {
                tracing::info!(
                    waited_s = started.elapsed().as_secs(),
                    "another process is migrating the database; waiting for it"
                );
            }
            Some(_) => return Err(StoreError::MigrationLockTimeout(MIGRATION_LOCK_WAIT)),
            None => return Err(StoreError::MigrationLockRefused),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    MySql,
    Sqlite,
}

impl Dialect {
    pub fn of_url(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("mysql:") || url.starts_with("mariadb:") {
            Ok(Dialect::MySql)
        } else if url.starts_with("sqlite:") {
            Ok(Dialect::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl(ocr_contract::redact_url(url)))
        }
    }
}

/// Fields a transition may set besides the status.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub result: Option<String>,
    pub error: Option<String>,
    /// Count a new attempt (a worker claimed the job).
    pub count_attempt: bool,
}

#[derive(Clone)]
pub struct JobStore {
    pool: AnyPool,
    dialect: Dialect,
    /// Where each operation's time goes (`ocr_store_seconds{op}`); none in tools.
    metrics: Option<Metrics>,
    /// Group commit of the accept path's writes (started on first use).
    /// Inserts and `Queued` marks of concurrent submissions, committed together.
    accept_writes: Arc<super::grouped::Group<super::grouped::AcceptWrites>>,
}

/// Times one operation from its creation to its drop, so every return path
/// (errors included: a database that times out is a slow one) is counted.
pub(crate) struct OpTimer<'a> {
    metrics: Option<&'a Metrics>,
    op: &'static str,
    started: Instant,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if let Some(metrics) = self.metrics {
            metrics.observe_store(self.op, self.started.elapsed());
        }
    }
}

/// The `op` label of a status change: claims, final writes and hand-backs
/// are told apart, so a slow final write (what the writer topology shields
/// the GPU from) shows as such.
fn transition_op(to: JobStatus) -> &'static str {
    if to.is_terminal() {
        ocr_contract::signals::STORE_OP_FINISH
    } else {
        match to {
            JobStatus::Processing => "claim",
            JobStatus::Queued => "requeue",
            _ => "transition",
        }
    }
}

const JOB_COLUMNS: &str = "id, client_id, status, attempts, input_key, content_type, \
    input_sha256, input_bytes, idempotency_key, result, error, created_at, updated_at";

/// How long an operation waits for a pooled connection. SQLite's single
/// connection is shared by every request and cannot be down, so it gets at
/// least [`SQLITE_ACQUIRE_TIMEOUT`] whatever is configured.
const SQLITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

fn acquire_timeout(dialect: Dialect, configured: Duration) -> Duration {
    match dialect {
        Dialect::MySql => configured,
        Dialect::Sqlite => configured.max(SQLITE_ACQUIRE_TIMEOUT),
    }
}

impl JobStore {
    /// A pool with the default acquire timeout (tests, tools).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let configured = ocr_contract::DatabaseConfig::default().acquire_timeout_ms;
        Self::connect_with(url, max_connections, Duration::from_millis(configured)).await
    }

    /// A pool whose operations fail after waiting `acquire` for a connection
    /// (`database.acquire_timeout_ms`): a database outage becomes an error
    /// within that bound instead of a hung request.
    pub async fn connect_with(
        url: &str,
        max_connections: u32,
        acquire: Duration,
    ) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::of_url(url)?;
        let url = match dialect {
            Dialect::MySql => url.replacen("mariadb:", "mysql:", 1),
            Dialect::Sqlite => url.to_owned(),
        };
        // SQLite serialises writers anyway; one connection avoids SQLITE_BUSY
        // and keeps `sqlite::memory:` a single database.
        let max_connections = match dialect {
            Dialect::MySql => max_connections.max(1),
            Dialect::Sqlite => 1,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout(dialect, acquire))
            .connect(&url)
            .await
            .map_err(StoreError::Connect)?;
        Ok(JobStore {
            pool,
            dialect,
            metrics: None,
            accept_writes: Arc::new(super::grouped::Group::new(super::grouped::AcceptWrites)),
        })
    }

    /// A pool that connects on first use, for roles that must start while
    /// the database is down (the writer waits for it per event).
    pub fn connect_lazy(
        url: &str,
        max_connections: u32,
        acquire: Duration,
    ) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = Dialect::of_url(url)?;
        let url = match dialect {
            Dialect::MySql => url.replacen("mariadb:", "mysql:", 1),
            Dialect::Sqlite => url.to_owned(),
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout(dialect, acquire))
            .connect_lazy(&url)
            .map_err(StoreError::Connect)?;
        Ok(JobStore {
            pool,
            dialect,
            metrics: None,
            accept_writes: Arc::new(super::grouped::Group::new(super::grouped::AcceptWrites)),
        })
    }

    /// Times every operation into `metrics` from now on.
    pub fn observed_by(mut self, metrics: &Metrics) -> Self {
        self.metrics = Some(metrics.clone());
        self
    }

    pub(crate) fn timer(&self, op: &'static str) -> OpTimer<'_> {
        OpTimer {
            metrics: self.metrics.as_ref(),
            op,
            started: Instant::now(),
        }
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Brings the schema up to date. Every API, worker and writer pod may run
    /// this at start, at the same moment, against one database.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self.dialect {
            Dialect::Sqlite => SQLITE_MIGRATIONS.run(&self.pool).await?,
            Dialect::MySql => {
                // sqlx serialises migrators with `GET_LOCK(name, -1)`, which MariaDB
                // answers with NULL at once instead of waiting: two pods starting
                // together both applied migration 3, and the loser found it "partially
                // applied" forever after. So the lock is ours, with a finite timeout
                // that both servers honour, held on the connection that migrates.
                let mut conn = self
                    .pool
                    .acquire()
                    .await
                    .map_err(query_error("connect to migrate"))?;
                acquire_migration_lock(&mut conn).await?;
                let migrated = MYSQL_MIGRATIONS.run(&mut *conn).await;
                let released = sqlx::query(
                    "SELECT RELEASE_LOCK(LEFT(CONCAT('ocr_migrate.', DATABASE()), 64))",
                )
                .execute(&mut *conn)
                .await;
                if released.is_err() {
                    // The lock lives as long as the session: never hand it back to the pool.
                    conn.close_on_drop();
                }
                migrated?;
            }
        }
        Ok(())
    }

    /// Cheap liveness check for readiness probes.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let _timer = self.timer("ping");
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(query_error("ping"))?;
        Ok(())
    }

    /// Inserts a new job and, in the same transaction, binds the idempotency
    /// key reserved for it: a crash or outage in between can never leave a
    /// job without its key (the client's retry would create a second job) or
    /// a key pointing at no job.
    pub async fn insert(&self, job: &NewJob, now_ms: i64) -> Result<(), StoreError> {
        let _timer = self.timer("insert");
        if job.idempotency.is_none() {
            // Nothing to bind: no transaction, and the row shares one
            // autocommit INSERT with those of concurrent submissions.
            let write = super::grouped::AcceptWrite::Insert(job.clone(), now_ms);
            return self.accept_writes.write(&self.pool, write).await;
        }
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(query_error("begin insert"))?;
        self.insert_row(&mut *tx, job, now_ms)
            .await
            .map_err(query_error("insert job"))?;
        if let Some(held) = &job.idempotency {
            // Conditional: only the reservation this request holds is bound.
            let bound = sqlx::query(
                "UPDATE idempotency_keys SET job_id = ? \
                 WHERE client_id = ? AND idem_key = ? AND job_id IS NULL AND created_at = ?",
            )
            .bind(job.id.to_string())
            .bind(&job.client_id)
            .bind(&held.key)
            .bind(held.reserved_at_ms)
            .execute(&mut *tx)
            .await
            .map_err(query_error("bind idempotency key"))?;
            if bound.rows_affected() != 1 {
                // Dropping the transaction rolls the job row back.
                return Err(StoreError::KeyLost);
            }
        }
        tx.commit().await.map_err(query_error("commit insert"))?;
        Ok(())
    }

    /// The job row in `Accepted`, on `executor` (the pool or a transaction).
    async fn insert_row<'e, E>(
        &self,
        executor: E,
        job: &NewJob,
        now_ms: i64,
    ) -> Result<(), sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = sqlx::Any>,
    {
        let sql = super::grouped::insert_jobs_sql(1);
        super::grouped::bind_new_job(sqlx::query(&sql), job, now_ms)
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Records `Queued` for an `Accepted` job (a job already further along is
    /// left as it is), in one statement with the marks of concurrent
    /// submissions.
    pub async fn mark_queued(&self, id: JobId, now_ms: i64) -> Result<(), StoreError> {
        let _timer = self.timer("mark_queued");
        let write = super::grouped::AcceptWrite::MarkQueued(id, now_ms);
        self.accept_writes.write(&self.pool, write).await
    }

    pub async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let _timer = self.timer("get");
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("get job"))?;
        row.map(|row| job_from_row(&row)).transpose()
    }

    /// Compare-and-set of the job's status. `expected_attempts` pins the
    /// attempt that the caller owns, so a worker whose job was reclaimed by
    /// another cannot overwrite the newer attempt's outcome.
    pub async fn transition(
        &self,
        id: JobId,
        from: JobStatus,
        to: JobStatus,
        expected_attempts: Option<u32>,
        changes: Changes,
        now_ms: i64,
    ) -> Result<Transition, StoreError> {
        let _timer = self.timer(transition_op(to));
        if !from.can_transition_to(to) {
            return Err(StoreError::IllegalTransition { from, to });
        }
        let mut sql = String::from(
            "UPDATE jobs SET status = ?, updated_at = ?, attempts = attempts + ?, \
             result = COALESCE(?, result), error = COALESCE(?, error) \
             WHERE id = ? AND status = ?",
        );
        if expected_attempts.is_some() {
            sql.push_str(" AND attempts = ?");
        }
        let mut query = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(now_ms)
            .bind(i32::from(changes.count_attempt))
            .bind(changes.result)
            .bind(changes.error)
            .bind(id.to_string())
            .bind(from.as_str());
        if let Some(attempts) = expected_attempts {
            query = query.bind(attempts as i32);
        }
        let done = query
            .execute(&self.pool)
            .await
            .map_err(query_error("transition job"))?;
        Ok(if done.rows_affected() == 1 {
            Transition::Applied
        } else {
            Transition::Lost
        })
    }

    /// Jobs in `status` whose last change is older than `older_than_ms`,
    /// oldest first: the sweeper republishes `Accepted` ones whose publish
    /// never happened, and standalone mode resumes unfinished ones.
    pub async fn ids_in_status(
        &self,
        status: JobStatus,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<JobId>, StoreError> {
        let _timer = self.timer("list");
        let rows = sqlx::query(
            "SELECT id FROM jobs WHERE status = ? AND updated_at <= ? ORDER BY updated_at LIMIT ?",
        )
        .bind(status.as_str())
        .bind(older_than_ms)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(query_error("list jobs by status"))?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id").map_err(query_error("read id"))?;
                id.parse()
                    .map_err(|_| StoreError::Corrupt(format!("job id {id:?}")))
            })
            .collect()
    }

    pub async fn count_in_status(&self, status: JobStatus) -> Result<u64, StoreError> {
        let _timer = self.timer("count");
        let row = sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE status = ?")
            .bind(status.as_str())
            .fetch_one(&self.pool)
            .await
            .map_err(query_error("count jobs"))?;
        let n: i64 = row.try_get("n").map_err(query_error("read count"))?;
        Ok(n as u64)
    }

    /// Every job row whatever its status, in one read (summing the statuses
    /// one query at a time counts a job twice if it moves in between).
    pub async fn count_all(&self) -> Result<u64, StoreError> {
        let _timer = self.timer("count");
        let row = sqlx::query("SELECT COUNT(*) AS n FROM jobs")
            .fetch_one(&self.pool)
            .await
            .map_err(query_error("count jobs"))?;
        let n: i64 = row.try_get("n").map_err(query_error("read count"))?;
        Ok(n as u64)
    }

    /// A tenant's unfinished jobs (accepted, queued, processing), for its quota.
    pub async fn count_open(&self, client_id: &str) -> Result<u64, StoreError> {
        let _timer = self.timer("count_open");
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM jobs WHERE client_id = ? AND status IN (?, ?, ?)",
        )
        .bind(client_id)
        .bind(JobStatus::Accepted.as_str())
        .bind(JobStatus::Queued.as_str())
        .bind(JobStatus::Processing.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(query_error("count open jobs"))?;
        let n: i64 = row.try_get("n").map_err(query_error("read count"))?;
        Ok(n as u64)
    }

    /// Removes a job row. Only used to undo a job whose input could not be stored.
    pub async fn delete(&self, id: JobId) -> Result<(), StoreError> {
        let _timer = self.timer("delete");
        sqlx::query("DELETE FROM jobs WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.pool)
            .await
            .map_err(query_error("delete job"))?;
        Ok(())
    }

    /// Reserves an idempotency key for a request. `None`: the key is ours.
    /// `Some(record)`: the key already existed, see [`crate::domain::idempotency::decide`].
    pub async fn reserve_key(
        &self,
        client_id: &str,
        key: &str,
        request_sha256: &str,
        now_ms: i64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let _timer = self.timer("reserve_key");
        let inserted = sqlx::query(
            "INSERT INTO idempotency_keys (client_id, idem_key, request_sha256, created_at) \
             VALUES (?, ?, ?, ?)",
        )
        .bind(client_id)
        .bind(key)
        .bind(request_sha256)
        .bind(now_ms)
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(None),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                self.get_key(client_id, key).await
            }
            Err(source) => Err(StoreError::Query {
                what: "reserve idempotency key",
                source,
            }),
        }
    }

    async fn get_key(&self, client_id: &str, key: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT request_sha256, job_id, created_at FROM idempotency_keys \
             WHERE client_id = ? AND idem_key = ?",
        )
        .bind(client_id)
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("read idempotency key"))?;
        let Some(row) = row else { return Ok(None) };
        let job_id: Option<String> = row.try_get("job_id").map_err(query_error("read key"))?;
        Ok(Some(KeyRecord {
            request_sha256: row
                .try_get("request_sha256")
                .map_err(query_error("read key"))?,
            job_id: job_id
                .map(|id| id.parse())
                .transpose()
                .map_err(|_| StoreError::Corrupt("idempotency job id".into()))?,
            created_at_ms: row.try_get("created_at").map_err(query_error("read key"))?,
        }))
    }

    /// Takes over a key abandoned by a request that died; compare-and-set on
    /// its creation time so only one of several retries wins.
    pub async fn take_over_key(
        &self,
        client_id: &str,
        key: &str,
        abandoned: &KeyRecord,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let _timer = self.timer("take_over_key");
        let done = sqlx::query(
            "UPDATE idempotency_keys SET created_at = ? \
             WHERE client_id = ? AND idem_key = ? AND job_id IS NULL AND created_at = ?",
        )
        .bind(now_ms)
        .bind(client_id)
        .bind(key)
        .bind(abandoned.created_at_ms)
        .execute(&self.pool)
        .await
        .map_err(query_error("take over idempotency key"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives a dead-lettered job a fresh start (`Queued`, no attempts, no
    /// error) for `ocr-runtime dlq replay`; false when it is not dead-lettered.
    /// Outside the workers' state machine on purpose: only an operator's
    /// replay moves a job out of a final state.
    pub async fn revive_dead_lettered(&self, id: JobId, now_ms: i64) -> Result<bool, StoreError> {
        let _timer = self.timer("revive");
        let done = sqlx::query(
            "UPDATE jobs SET status = ?, attempts = 0, error = NULL, updated_at = ? \
             WHERE id = ? AND status = ?",
        )
        .bind(JobStatus::Queued.as_str())
        .bind(now_ms)
        .bind(id.to_string())
        .bind(JobStatus::DeadLettered.as_str())
        .execute(&self.pool)
        .await
        .map_err(query_error("revive a dead-lettered job"))?;
        Ok(done.rows_affected() == 1)
    }

    /// Forgets the idempotency keys reserved before `cutoff_ms`: a request
    /// that reuses one afterwards creates a new job. Returns how many.
    pub async fn expire_keys(&self, cutoff_ms: i64) -> Result<u64, StoreError> {
        let _timer = self.timer("expire_keys");
        let done = sqlx::query("DELETE FROM idempotency_keys WHERE created_at < ?")
            .bind(cutoff_ms)
            .execute(&self.pool)
            .await
            .map_err(query_error("expire idempotency keys"))?;
        Ok(done.rows_affected())
    }

    /// Frees a key whose request failed before creating a job, so the client
    /// can retry; only while `held` is still the key's reservation.
    pub async fn release_key(&self, client_id: &str, held: &HeldKey) -> Result<(), StoreError> {
        let _timer = self.timer("release_key");
        sqlx::query(
            "DELETE FROM idempotency_keys \
             WHERE client_id = ? AND idem_key = ? AND job_id IS NULL AND created_at = ?",
        )
        .bind(client_id)
        .bind(&held.key)
        .bind(held.reserved_at_ms)
        .execute(&self.pool)
        .await
        .map_err(query_error("release idempotency key"))?;
        Ok(())
    }
}

fn job_from_row(row: &AnyRow) -> Result<Job, StoreError> {
    let get = |what| query_error(what);
    let id: String = row.try_get("id").map_err(get("id"))?;
    let status: String = row.try_get("status").map_err(get("status"))?;
    let attempts: i32 = row.try_get("attempts").map_err(get("attempts"))?;
    let input_bytes: i64 = row.try_get("input_bytes").map_err(get("input_bytes"))?;
    Ok(Job {
        id: id
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("job id {id:?}")))?,
        client_id: row.try_get("client_id").map_err(get("client_id"))?,
        status: status
            .parse()
            .map_err(|e: crate::domain::job::UnknownStatus| StoreError::Corrupt(e.to_string()))?,
        attempts: attempts.max(0) as u32,
        input_key: row.try_get("input_key").map_err(get("input_key"))?,
        content_type: row.try_get("content_type").map_err(get("content_type"))?,
        input_sha256: row.try_get("input_sha256").map_err(get("input_sha256"))?,
        input_bytes: input_bytes.max(0) as u64,
        idempotency_key: row
            .try_get("idempotency_key")
            .map_err(get("idempotency_key"))?,
        result: long_text(row, "result")?,
        error: long_text(row, "error")?,
        created_at_ms: row.try_get("created_at").map_err(get("created_at"))?,
        updated_at_ms: row.try_get("updated_at").map_err(get("updated_at"))?,
    })
}

/// MySQL reports TEXT columns as BLOBs, which the `Any` driver will not decode
/// into strings, while SQLite reports them as text: accept both.
fn long_text(row: &AnyRow, column: &'static str) -> Result<Option<String>, StoreError> {
    if let Ok(text) = row.try_get::<Option<String>, _>(column) {
        return Ok(text);
    }
    let bytes: Option<Vec<u8>> = row.try_get(column).map_err(query_error(column))?;
    bytes
        .map(|b| {
            String::from_utf8(b).map_err(|_| StoreError::Corrupt(format!("{column} is not UTF-8")))
        })
        .transpose()
}
