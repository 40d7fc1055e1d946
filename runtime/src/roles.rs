//! Assembling each role from the configuration: which adapters it gets and
//! which tasks it runs. `main` and the tests start roles through here.

use crate::api::http::{router, HttpState};
use crate::app::bounded::BoundedEngine;
use crate::app::fault::HungEngine;
use crate::app::infer::InferAndPublish;
use crate::app::input::decode_limits;
use crate::app::persist::{ResultWriter, RetryPolicy};
use crate::app::process::{HandleJobs, Processor, Recognize};
use crate::app::submit::{Fault, Submitter};
use crate::app::sweeper::SweepPolicy;
use crate::config::{Config, FailMode, QueueKind, WorkerMode};
use crate::domain::retry::Backoff;
use crate::health::Liveness;
use crate::metrics::Metrics;
use crate::notify::Webhook;
use crate::queue::kafka::{
    consumer_group_lag, GroupLag, KafkaCheck, KafkaConnection, KafkaConsumer, KafkaPublisher,
};
use crate::queue::{JobPublisher, MessageSink, QueueError};
use crate::storage::redis_guard::RedisGuard;
use crate::storage::{BlobStore, JobStore};
use crate::worker::{BatchPolicy, JobLoop};
use crate::writer::{LagFuture, LagProbe, ResultLoop};
use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use ocr_contract::signals::{Trend, LAG_TREND_WINDOW_SECONDS};
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

/// Connects the job store (migrating if configured, timing every operation
/// into `metrics`) and the blob store.
pub async fn open_storage(
    config: &Config,
    metrics: &Metrics,
) -> anyhow::Result<(JobStore, BlobStore)> {
    if let Some(dir) = sqlite_parent_dir(&config.database.url) {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating database directory {}", dir.display()))?;
    }
    let store = JobStore::connect_with(
        &config.database.url,
        config.database.max_connections,
        config.database.acquire_timeout(),
    )
    .await
    .with_context(|| {
        format!(
            "opening database {}",
            ocr_contract::redact_url(&config.database.url)
        )
    })?
    .observed_by(metrics);
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
    jobs: crate::api::grpc::GrpcJobs,
    addr: &str,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<SocketAddr> {
    let (listener, local_addr) = bind(addr).await?;
    let reflection = crate::api::grpc::reflection_service().context("gRPC reflection")?;
    let jobs = jobs.into_server();
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

/// The HTTP and gRPC front ends over one submitter and one admission
/// budget; returns their addresses. `liveness` is what `/livez` reports.
pub async fn serve_front_ends(
    submitter: Submitter,
    metrics: Metrics,
    liveness: Liveness,
    config: &Config,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let state = HttpState::new(submitter, metrics).with_liveness(liveness);
    let jobs = crate::api::grpc::GrpcJobs::new(
        state.submitter.clone(),
        state.metrics.clone(),
        state.admission.clone(),
    );
    let grpc_addr = serve_grpc(jobs, &config.server.grpc_addr, shutdown.clone(), tasks).await?;
    let app = router(state);
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
        Ok(guard) => Some(
            guard
                .with_key_ttl(config.server.idempotency_key_ttl())
                .failing_closed(config.redis.rate_limit_when_down == FailMode::Closed),
        ),
        Err(err) => {
            tracing::warn!(error = %err, "running without Redis");
            None
        }
    }
}

fn require_kafka(config: &Config, role: &str) -> anyhow::Result<KafkaConnection> {
    anyhow::ensure!(
        config.queue.kind == QueueKind::Kafka,
        "the {role} role needs queue.kind = \"kafka\" (the memory queue only works inside `standalone`)"
    );
    Ok(KafkaConnection::from_config(&config.queue)?)
}

/// The API role: HTTP front end, Kafka publisher and the republishing sweeper.
pub async fn start_api(config: &Config) -> anyhow::Result<Running> {
    let kafka = require_kafka(config, "api")?;
    let metrics = Metrics::new();
    let (store, blobs) = open_storage(config, &metrics).await?;
    let publisher = KafkaPublisher::new(&kafka, &config.queue.jobs_topic)?;
    let publisher: Arc<dyn JobPublisher> = Arc::new(publisher);
    let submitter = Submitter {
        store: store.clone(),
        blobs: blobs.clone(),
        publisher,
        limits: config.limits.clone(),
        fault: Fault::from_env(),
        publish_wait: config.queue.publish_wait(),
        guard: connect_redis(config).await,
        metrics: metrics.clone(),
    };
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let sweep = SweepPolicy {
        republish_after: Duration::from_millis(config.queue.republish_after_ms),
        stale_after: Duration::from_millis(config.queue.stale_after_ms),
        key_ttl: config.server.idempotency_key_ttl(),
    };
    tasks.spawn(crate::app::sweeper::run(
        submitter.clone(),
        sweep,
        shutdown.clone(),
    ));
    let (local_addr, grpc_addr) = serve_front_ends(
        submitter,
        metrics,
        Liveness::without_engine(),
        config,
        &shutdown,
        &mut tasks,
    )
    .await?;
    tracing::info!(%local_addr, %grpc_addr, "API listening");
    Ok(Running::new(local_addr, store, blobs, shutdown, tasks).with_grpc(grpc_addr))
}

/// What a role must reach to be ready. A worker in writer mode and the
/// writer only need Kafka: a database outage must not take them out of
/// service (the writer waits for it, the worker does not use it).
#[derive(Clone)]
enum Readiness {
    Database(JobStore),
    Kafka(KafkaCheck),
}

#[derive(Clone)]
struct RoleHealth {
    readiness: Readiness,
    liveness: Liveness,
    metrics: Metrics,
}

/// Probes and metrics for roles without the job API.
fn health_router(health: RoleHealth) -> Router {
    Router::new()
        .route(
            "/livez",
            get(|State(health): State<RoleHealth>| async move {
                match health.liveness.check() {
                    Ok(()) => "ok".into_response(),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(health): State<RoleHealth>| async move {
                let checked = match &health.readiness {
                    Readiness::Database(store) => store.ping().await.map_err(|e| e.to_string()),
                    Readiness::Kafka(kafka) => kafka.check().await.map_err(|e| e.to_string()),
                };
                match checked {
                    Ok(()) => "ready".into_response(),
                    Err(err) => (StatusCode::SERVICE_UNAVAILABLE, err).into_response(),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(health): State<RoleHealth>| async move { health.metrics.render() }),
        )
        .with_state(health)
}

/// The engine as the worker loop calls it: micro-batches split by
/// `worker.max_batch_pixels`, images decoded within `limits`, every call
/// watched by `liveness` (and replaced by a hung one under
/// `OCR_FAULT=hang-inference`).
pub fn guard_engine(
    config: &Config,
    engine: Arc<dyn Recognize>,
    liveness: &Liveness,
) -> Arc<dyn Recognize> {
    let inner: Arc<dyn Recognize> = if Fault::from_env() == Fault::HangInference {
        Arc::new(HungEngine)
    } else {
        engine
    };
    Arc::new(BoundedEngine {
        inner,
        max_batch_pixels: config.worker.max_batch_pixels,
        limits: decode_limits(&config.limits),
        liveness: liveness.clone(),
    })
}

/// Runs a loop the process exists for; its ending without a shutdown makes
/// the process not alive, so Kubernetes restarts it.
pub fn spawn_vital(
    tasks: &mut JoinSet<()>,
    what: &'static str,
    work: impl std::future::Future<Output = ()> + Send + 'static,
    shutdown: &CancellationToken,
    liveness: &Liveness,
) {
    let (shutdown, liveness) = (shutdown.clone(), liveness.clone());
    tasks.spawn(async move {
        work.await;
        if !shutdown.is_cancelled() {
            liveness.stopped(format!("{what} stopped"));
        }
    });
}

/// Runs a worker's job loop as vital (see [`spawn_vital`]) with the GPU
/// sampler beside it.
pub fn run_job_loop(
    jobs: JobLoop,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
    liveness: &Liveness,
) {
    let metrics = jobs.metrics.clone();
    spawn_vital(
        tasks,
        "the job loop",
        jobs.run(shutdown.clone()),
        shutdown,
        liveness,
    );
    tasks.spawn(crate::gpu::sample(metrics, shutdown.clone()));
}

/// The micro-batch rule for the configured worker mode.
pub fn batch_policy(config: &Config) -> BatchPolicy {
    match config.worker.mode {
        WorkerMode::Standard => BatchPolicy::STANDARD,
        WorkerMode::Batched | WorkerMode::Writer => BatchPolicy {
            max_size: config.worker.max_batch_size.max(1),
            max_wait: Duration::from_millis(config.worker.max_wait_ms),
            in_flight: config.worker.batches_in_flight.max(1),
        },
    }
}

/// How often roles publish their consumer group's lag as a metric.
const LAG_REPORT_PERIOD: Duration = Duration::from_secs(5);
const LAG_TIMEOUT: Duration = Duration::from_secs(5);

/// The lag of `group` on `topic`, without blocking the runtime.
pub async fn group_lag(
    kafka: &KafkaConnection,
    group: &str,
    topic: &str,
) -> Result<GroupLag, QueueError> {
    let (kafka, group, topic) = (kafka.clone(), group.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || consumer_group_lag(&kafka, &group, &topic, LAG_TIMEOUT))
        .await
        .map_err(|e| QueueError::Unreachable(e.to_string()))?
}

/// What every consuming role serves on its HTTP port: probes, metrics, and
/// its consumer group's lag on its topic as `ocr_consumer_lag` with its trend
/// `ocr_consumer_lag_growth`, refreshed until shutdown. Returns the bound address.
async fn serve_consumer_health(
    config: &Config,
    kafka: &KafkaConnection,
    (group, topic): (&str, &str),
    health: RoleHealth,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<SocketAddr> {
    let (kafka, group, topic) = (kafka.clone(), group.to_owned(), topic.to_owned());
    let (metrics, until) = (health.metrics.clone(), shutdown.clone());
    tasks.spawn(async move {
        let started = std::time::Instant::now();
        let mut trend = Trend::new(LAG_TREND_WINDOW_SECONDS);
        loop {
            match group_lag(&kafka, &group, &topic).await {
                Ok(lag) => {
                    metrics.set_consumer_lag(&topic, &group, lag.total);
                    trend.push(started.elapsed().as_secs_f64(), lag.total as f64);
                    if let Some(growth) = trend.slope() {
                        metrics.set_consumer_lag_growth(&topic, &group, growth);
                    }
                }
                Err(err) => tracing::debug!(error = %err, "measuring consumer lag failed"),
            }
            tokio::select! {
                _ = until.cancelled() => return,
                _ = tokio::time::sleep(LAG_REPORT_PERIOD) => {}
            }
        }
    });
    let app = health_router(health);
    serve_http(app, &config.server.http_addr, shutdown.clone(), tasks).await
}

/// The GPU worker role, in the configured mode. Every mode consumes the jobs
/// topic in the same consumer group, so a worker restarted in another mode
/// resumes where the group left off.
pub async fn start_worker(config: &Config, engine: Arc<dyn Recognize>) -> anyhow::Result<Running> {
    let kafka = require_kafka(config, "worker")?;
    let metrics = Metrics::new();
    let liveness = Liveness::new(config.worker.inference_timeout());
    let engine = guard_engine(config, engine, &liveness);
    let consumer = KafkaConsumer::new(
        &kafka,
        &config.queue.consumer_group,
        &config.queue.jobs_topic,
    )?;
    let kafka_check = consumer.checker();
    let dead_letters: Arc<dyn MessageSink> = Arc::new(KafkaPublisher::new(
        &kafka,
        &config.queue.dead_letter_topic,
    )?);
    let (store, blobs, handler, readiness): (_, _, Arc<dyn HandleJobs>, _) = match config
        .worker
        .mode
    {
        WorkerMode::Standard | WorkerMode::Batched => {
            let (store, blobs) = open_storage(config, &metrics).await?;
            let processor = Processor {
                store: store.clone(),
                blobs: blobs.clone(),
                engine,
                max_attempts: config.worker.max_attempts,
                metrics: metrics.clone(),
            };
            let readiness = Readiness::Database(store.clone());
            (store, blobs, Arc::new(processor), readiness)
        }
        WorkerMode::Writer => {
            // The database is only a fallback for old messages without
            // an input key; the worker must start while it is down.
            let store =
                JobStore::connect_lazy(&config.database.url, 2, config.database.acquire_timeout())
                    .context("database URL")?
                    .observed_by(&metrics);
            let blobs = BlobStore::from_url(&config.blob.url).context("opening the blob store")?;
            let results: Arc<dyn MessageSink> =
                Arc::new(KafkaPublisher::new(&kafka, &config.queue.results_topic)?);
            let handler = InferAndPublish::new(
                blobs.clone(),
                Some(store.clone()),
                engine,
                results,
                config.worker.max_attempts,
                metrics.clone(),
            );
            (
                store,
                blobs,
                Arc::new(handler),
                Readiness::Kafka(kafka_check),
            )
        }
    };
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let jobs = JobLoop {
        consumer: Box::new(consumer),
        handler,
        dead_letters: Some(dead_letters),
        policy: batch_policy(config),
        metrics: metrics.clone(),
    };
    run_job_loop(jobs, &mut tasks, &shutdown, &liveness);
    let local_addr = serve_consumer_health(
        config,
        &kafka,
        (&config.queue.consumer_group, &config.queue.jobs_topic),
        RoleHealth {
            readiness,
            liveness,
            metrics,
        },
        &shutdown,
        &mut tasks,
    )
    .await?;
    tracing::info!(%local_addr, mode = ?config.worker.mode, "worker health endpoint listening");
    Ok(Running::new(local_addr, store, blobs, shutdown, tasks))
}

/// The writer role: persists result events from the results topic.
pub async fn start_writer(config: &Config) -> anyhow::Result<Running> {
    let kafka = require_kafka(config, "writer")?;
    let metrics = Metrics::new();
    // Lazy: the writer starts (and reports ready) while the database is
    // down, and waits for it per event.
    let store = JobStore::connect_lazy(
        &config.database.url,
        config.database.max_connections,
        config.database.acquire_timeout(),
    )
    .context("database URL")?
    .observed_by(&metrics);
    let blobs = BlobStore::from_url(&config.blob.url).context("opening the blob store")?;
    let writer_config = &config.writer;
    let webhook = if writer_config.webhook_url.is_empty() {
        None
    } else {
        Some(
            Webhook::new(
                &writer_config.webhook_url,
                writer_config.webhook_secret.expose(),
                Duration::from_millis(writer_config.webhook_timeout_ms),
            )
            .context("writer.webhook_url")?,
        )
    };
    let dead_letters: Arc<dyn MessageSink> = Arc::new(KafkaPublisher::new(
        &kafka,
        &config.queue.dead_letter_topic,
    )?);
    let writer = ResultWriter {
        store: store.clone(),
        blobs: blobs.clone(),
        webhook,
        retry: RetryPolicy {
            attempts: writer_config.retries.max(1),
            backoff: Backoff::new(
                Duration::from_millis(writer_config.retry_initial_ms),
                Duration::from_millis(writer_config.retry_max_ms),
            ),
        },
        database_backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
        dead_letters,
        metrics: metrics.clone(),
    };
    let consumer = KafkaConsumer::new(
        &kafka,
        &config.queue.writer_group,
        &config.queue.results_topic,
    )?;
    let readiness = Readiness::Kafka(consumer.checker());
    let drain = writer_config.drain.then(|| {
        let (kafka, group, topic) = (
            kafka.clone(),
            config.queue.writer_group.clone(),
            config.queue.results_topic.clone(),
        );
        let probe: LagProbe = Box::new(move || -> LagFuture {
            let (kafka, group, topic) = (kafka.clone(), group.clone(), topic.clone());
            Box::pin(async move {
                group_lag(&kafka, &group, &topic)
                    .await
                    .ok()
                    .map(|lag| lag.total)
            })
        });
        probe
    });
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let results = ResultLoop {
        consumer: Box::new(consumer),
        writer,
        drain,
    };
    let drained = shutdown.clone();
    let liveness = Liveness::without_engine();
    spawn_vital(
        &mut tasks,
        "the result loop",
        async move {
            if results.run(drained.clone()).await {
                // Drained: stop the whole role so the process exits 0.
                drained.cancel();
            }
        },
        &shutdown,
        &liveness,
    );
    let local_addr = serve_consumer_health(
        config,
        &kafka,
        (&config.queue.writer_group, &config.queue.results_topic),
        RoleHealth {
            readiness,
            liveness,
            metrics,
        },
        &shutdown,
        &mut tasks,
    )
    .await?;
    tracing::info!(%local_addr, drain = writer_config.drain, "writer listening");
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
