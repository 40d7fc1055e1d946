//! Assembling each role from the configuration: which adapters it gets and
//! which tasks it runs. `main` and the tests start roles through here.

use crate::api::http::{router, HttpState};
use crate::app::process::{Processor, Recognize};
use crate::app::submit::{Fault, Submitter};
use crate::config::{Config, QueueKind, WorkerMode};
use crate::metrics::Metrics;
use crate::queue::kafka::{KafkaConsumer, KafkaPublisher};
use crate::queue::JobPublisher;
use crate::storage::redis_guard::RedisGuard;
use crate::storage::{BlobStore, JobStore};
use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A started role: its HTTP address and the tasks to stop.
pub struct Running {
    pub local_addr: SocketAddr,
    /// Where gRPC listens, for roles that serve it.
    pub grpc_addr: Option<SocketAddr>,
    pub store: JobStore,
    pub blobs: BlobStore,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Running {
    pub fn new(
        local_addr: SocketAddr,
        store: JobStore,
        blobs: BlobStore,
        shutdown: CancellationToken,
        tasks: JoinSet<()>,
    ) -> Self {
        Running {
            local_addr,
            grpc_addr: None,
            store,
            blobs,
            shutdown,
            tasks,
        }
    }

    pub fn with_grpc(mut self, addr: SocketAddr) -> Self {
        self.grpc_addr = Some(addr);
        self
    }

    /// Stops taking work, lets the job in hand finish, then returns.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Connects the job store (migrating if configured) and the blob store.
pub async fn open_storage(config: &Config) -> anyhow::Result<(JobStore, BlobStore)> {
    if let Some(dir) = sqlite_parent_dir(&config.database.url) {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating database directory {}", dir.display()))?;
    }
    let store = JobStore::connect(&config.database.url, config.database.max_connections)
        .await
        .with_context(|| format!("opening database {}", redact(&config.database.url)))?;
    if config.database.migrate_on_start {
        store.migrate().await.context("migrating the database")?;
    }
    let blobs = BlobStore::from_url(&config.blob.url).context("opening the blob store")?;
    Ok((store, blobs))
}

async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local_addr = listener.local_addr()?;
    Ok((listener, local_addr))
}

/// Binds and serves `app` until `shutdown`; returns the bound address.
pub async fn serve_http(
    app: Router,
    addr: &str,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<SocketAddr> {
    let (listener, local_addr) = bind(addr).await?;
    let app = app.layer(tower_http::trace::TraceLayer::new_for_http());
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "HTTP server failed");
        }
    });
    Ok(local_addr)
}

/// Binds and serves the gRPC API (with reflection) until `shutdown`.
pub async fn serve_grpc(
    submitter: Submitter,
    metrics: Metrics,
    addr: &str,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<SocketAddr> {
    let (listener, local_addr) = bind(addr).await?;
    let reflection = crate::api::grpc::reflection_service().context("gRPC reflection")?;
    let jobs = crate::api::grpc::GrpcJobs::new(submitter, metrics).into_server();
    tasks.spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(jobs)
            .add_service(reflection)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { shutdown.cancelled().await },
            )
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "gRPC server failed");
        }
    });
    Ok(local_addr)
}

/// The HTTP and gRPC front ends over one submitter; returns their addresses.
pub async fn serve_front_ends(
    submitter: Submitter,
    metrics: Metrics,
    config: &Config,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let grpc_addr = serve_grpc(
        submitter.clone(),
        metrics.clone(),
        &config.server.grpc_addr,
        shutdown.clone(),
        tasks,
    )
    .await?;
    let app = router(HttpState { submitter, metrics });
    let http_addr = serve_http(app, &config.server.http_addr, shutdown.clone(), tasks).await?;
    Ok((http_addr, grpc_addr))
}

/// Redis is optional: when it is configured but unreachable the API runs
/// without it rather than refusing to start.
pub async fn connect_redis(config: &Config) -> Option<RedisGuard> {
    if config.redis.url.is_empty() {
        return None;
    }
    match RedisGuard::connect(&config.redis.url, config.redis.requests_per_minute).await {
        Ok(guard) => Some(guard),
        Err(err) => {
            tracing::warn!(error = %err, "running without Redis");
            None
        }
    }
}

fn require_kafka(config: &Config, role: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        config.queue.kind == QueueKind::Kafka,
        "the {role} role needs queue.kind = \"kafka\" (the memory queue only works inside `standalone`)"
    );
    Ok(())
}

/// The API role: HTTP front end, Kafka publisher and the republishing sweeper.
pub async fn start_api(config: &Config) -> anyhow::Result<Running> {
    require_kafka(config, "api")?;
    let (store, blobs) = open_storage(config).await?;
    let publisher = KafkaPublisher::new(&config.queue.brokers, &config.queue.jobs_topic)?;
    let publisher: Arc<dyn JobPublisher> = Arc::new(publisher);
    let metrics = Metrics::new();
    let submitter = Submitter {
        store: store.clone(),
        blobs: blobs.clone(),
        publisher,
        limits: config.limits.clone(),
        fault: Fault::from_env(),
        guard: connect_redis(config).await,
        metrics: metrics.clone(),
    };
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::app::sweeper::run(
        submitter.clone(),
        Duration::from_millis(config.queue.republish_after_ms),
        shutdown.clone(),
    ));
    let (local_addr, grpc_addr) =
        serve_front_ends(submitter, metrics, config, &shutdown, &mut tasks).await?;
    tracing::info!(%local_addr, %grpc_addr, "API listening");
    Ok(Running::new(local_addr, store, blobs, shutdown, tasks).with_grpc(grpc_addr))
}

#[derive(Clone)]
struct WorkerHealth {
    store: JobStore,
    metrics: Metrics,
}

/// Probes and metrics for roles without the job API.
fn health_router(health: WorkerHealth) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(health): State<WorkerHealth>| async move {
                match health.store.ping().await {
                    Ok(()) => "ready".into_response(),
                    Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err.to_string()).into_response(),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(health): State<WorkerHealth>| async move { health.metrics.render() }),
        )
        .with_state(health)
}

/// The GPU worker role.
pub async fn start_worker(config: &Config, engine: Arc<dyn Recognize>) -> anyhow::Result<Running> {
    require_kafka(config, "worker")?;
    anyhow::ensure!(
        config.worker.mode == WorkerMode::Standard,
        "worker.mode {:?} is not available yet; use \"standard\"",
        config.worker.mode
    );
    let (store, blobs) = open_storage(config).await?;
    let metrics = Metrics::new();
    let consumer = KafkaConsumer::new(
        &config.queue.brokers,
        &config.queue.consumer_group,
        &config.queue.jobs_topic,
    )?;
    let dead_letters: Arc<dyn JobPublisher> = Arc::new(KafkaPublisher::new(
        &config.queue.brokers,
        &config.queue.dead_letter_topic,
    )?);
    let processor = Processor {
        store: store.clone(),
        blobs: blobs.clone(),
        engine,
        max_attempts: config.worker.max_attempts,
        metrics: metrics.clone(),
    };
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::worker::run_standard(
        Box::new(consumer),
        processor,
        Some(dead_letters),
        shutdown.clone(),
    ));
    let app = health_router(WorkerHealth {
        store: store.clone(),
        metrics,
    });
    let local_addr =
        serve_http(app, &config.server.http_addr, shutdown.clone(), &mut tasks).await?;
    tracing::info!(%local_addr, "worker health endpoint listening");
    Ok(Running::new(local_addr, store, blobs, shutdown, tasks))
}

fn sqlite_parent_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url.strip_prefix("sqlite://")?;
    let path = path.split('?').next()?;
    if path.is_empty() || path.starts_with(':') {
        return None;
    }
    std::path::Path::new(path).parent().map(|p| p.to_path_buf())
}

/// A database URL without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}
