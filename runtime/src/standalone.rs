//! Everything in one process on embedded defaults: SQLite, a local blob
//! directory, an in-process queue and the CPU engine. Unfinished jobs in the
//! database are re-enqueued at start-up, so a crash loses nothing.

use crate::app::process::{Processor, Recognize};
use crate::app::submit::{Fault, Submitter};
use crate::config::{Config, WorkerMode};
use crate::domain::message::JobMessage;
use crate::domain::tenant::{NewKey, Tenant};
use crate::domain::JobStatus;
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::queue::{memory, JobPublisher};
use crate::roles::{
    connect_redis, guard_engine, open_storage, run_job_loop, serve_front_ends, FrontEnds, Running,
};
use crate::storage::JobStore;
use anyhow::Context;
use std::sync::Arc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub async fn start(config: &Config, engine: Arc<dyn Recognize>) -> anyhow::Result<Running> {
    anyhow::ensure!(
        config.worker.mode != WorkerMode::Writer,
        "worker.mode = \"writer\" needs Kafka and a writer process; standalone runs standard or batched"
    );
    let mut config = config.clone();
    config.database.migrate_on_start = true;
    let metrics = Metrics::new();
    let (store, blobs) = open_storage(&config, &metrics).await?;
    let (publisher, consumer) = memory::channel();
    let publisher: Arc<dyn JobPublisher> = Arc::new(publisher);

    // Resume what a previous run left unfinished, oldest first.
    let mut resumed = 0;
    for status in [
        JobStatus::Processing,
        JobStatus::Queued,
        JobStatus::Accepted,
    ] {
        let ids = store
            .ids_in_status(status, i64::MAX, u32::MAX)
            .await
            .context("listing unfinished jobs")?;
        for job_id in ids {
            let message = JobMessage {
                job_id,
                input_key: None,
            };
            publisher.publish(&message).await?;
            resumed += 1;
        }
    }
    if resumed > 0 {
        tracing::info!(resumed, "re-enqueued unfinished jobs");
    }

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let liveness = Liveness::new(config.worker.inference_timeout());
    let engine = guard_engine(&config, engine, &liveness);
    let processor = Processor {
        store: store.clone(),
        blobs: blobs.clone(),
        engine,
        max_attempts: config.worker.max_attempts,
        metrics: metrics.clone(),
    };
    let jobs = crate::worker::JobLoop {
        consumer: Box::new(consumer),
        handler: Arc::new(processor),
        dead_letters: None,
        policy: crate::roles::batch_policy(&config),
        metrics: metrics.clone(),
    };
    run_job_loop(jobs, &mut tasks, &shutdown, &liveness);
    let submitter = Submitter {
        store: store.clone(),
        blobs: blobs.clone(),
        publisher,
        limits: config.limits.clone(),
        fault: Fault::from_env(),
        relay: crate::app::submit::PublishRelay::in_process(&config.queue),
        guard: connect_redis(&config).await,
        metrics: metrics.clone(),
    };
    let front =
        serve_front_ends(submitter, metrics, liveness, &config, &shutdown, &mut tasks).await?;
    tracing::info!(http = %front.http_addr, grpc = %front.grpc_addr, "standalone OCR server listening");
    Ok(Running::new(front.http_addr, store, blobs, shutdown, tasks).with_front_ends(front))
}

/// The tenant of the key a standalone server makes for itself.
pub const FIRST_TENANT: &str = "default";

/// Where keys are required and none exists yet (no key in the database, none
/// from `auth.keys_dir`), makes one for the tenant [`FIRST_TENANT`] so the
/// one-command start stays one command; the caller shows it once.
pub async fn first_key(store: &JobStore, front: &FrontEnds) -> anyhow::Result<Option<NewKey>> {
    if !front.keys_required || front.folder_keys > 0 {
        return Ok(None);
    }
    if store
        .count_active_keys()
        .await
        .context("counting API keys")?
        > 0
    {
        return Ok(None);
    }
    let key = NewKey::generate().context("the system's random number generator")?;
    let tenant = Tenant::parse(FIRST_TENANT)?;
    store
        .create_key(&tenant, &key, crate::storage::now_ms())
        .await
        .context("storing the first API key")?;
    Ok(Some(key))
}
