//! Everything in one process on embedded defaults: SQLite, a local blob
//! directory, an in-process queue and the CPU engine. Unfinished jobs in the
//! database are re-enqueued at start-up, so a crash loses nothing.

use crate::api::http::{router, HttpState};
use crate::app::process::{Processor, Recognize};
use crate::app::submit::{Fault, Submitter};
use crate::config::Config;
use crate::domain::message::JobMessage;
use crate::domain::JobStatus;
use crate::metrics::Metrics;
use crate::queue::{memory, JobPublisher};
use crate::storage::{BlobStore, JobStore};
use anyhow::Context;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running standalone server, for `main` and for tests.
pub struct Standalone {
    pub local_addr: std::net::SocketAddr,
    pub store: JobStore,
    pub blobs: BlobStore,
    shutdown: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Standalone {
    pub async fn start(config: &Config, engine: Arc<dyn Recognize>) -> anyhow::Result<Self> {
        if let Some(dir) = sqlite_parent_dir(&config.database.url) {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating database directory {}", dir.display()))?;
        }
        let store = JobStore::connect(&config.database.url, config.database.max_connections)
            .await
            .with_context(|| format!("opening database {}", config.database.url))?;
        store.migrate().await.context("migrating the database")?;
        let blobs = BlobStore::from_url(&config.blob.url).context("opening the blob store")?;
        let metrics = Metrics::new();
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
                publisher.publish(&JobMessage { job_id }).await?;
                resumed += 1;
            }
        }
        if resumed > 0 {
            tracing::info!(resumed, "re-enqueued unfinished jobs");
        }

        let shutdown = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let processor = Processor {
            store: store.clone(),
            blobs: blobs.clone(),
            engine,
            max_attempts: config.worker.max_attempts,
            metrics: metrics.clone(),
        };
        tasks.spawn(crate::worker::run_standard(
            Box::new(consumer),
            processor,
            None,
            shutdown.clone(),
        ));

        let submitter = Submitter {
            store: store.clone(),
            blobs: blobs.clone(),
            publisher,
            limits: config.limits.clone(),
            fault: Fault::from_env(),
        };
        let app = router(HttpState { submitter, metrics })
            .layer(tower_http::trace::TraceLayer::new_for_http());
        let listener = TcpListener::bind(&config.server.http_addr)
            .await
            .with_context(|| format!("binding {}", config.server.http_addr))?;
        let local_addr = listener.local_addr()?;
        let http_shutdown = shutdown.clone();
        tasks.spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
                .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "HTTP server failed");
            }
        });
        tracing::info!(%local_addr, "standalone OCR server listening");
        Ok(Standalone {
            local_addr,
            store,
            blobs,
            shutdown,
            tasks,
        })
    }

    /// Stops accepting, lets the worker finish the job in hand, then returns.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

fn sqlite_parent_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url.strip_prefix("sqlite://")?;
    let path = path.split('?').next()?;
    if path.is_empty() || path.starts_with(':') {
        return None;
    }
    std::path::Path::new(path).parent().map(|p| p.to_path_buf())
}
