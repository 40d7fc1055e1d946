//! Assembling each role from the configuration: which adapters it gets and
//! which tasks it runs. `main` and the tests start roles through here.

use crate::api::auth::{keys_required, Authenticator};
use crate::api::http::{router, HttpState};
use crate::app::bounded::BoundedEngine;
use crate::app::crash_journal::CrashJournal;
use crate::app::fault::{CrashingEngine, HungEngine};
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
use crate::tls::{TlsFiles, TlsListener};
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
    /// The API's front ends, for roles that serve them.
    pub front_ends: Option<FrontEnds>,
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
            front_ends: None,
            store,
            blobs,
            shutdown,
            tasks,
        }
    }

    pub fn with_front_ends(mut self, front_ends: FrontEnds) -> Self {
        self.front_ends = Some(front_ends);
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
    let store = open_job_store(config, Some(metrics)).await?;
    let blobs = BlobStore::from_url(&config.blob.url).context("opening the blob store")?;
    Ok((store, blobs))
}

/// Connects the job store (creating a SQLite file's folder), migrating if
/// `database.migrate_on_start`; timed into `metrics` when given.
pub async fn open_job_store(
    config: &Config,
    metrics: Option<&Metrics>,
) -> anyhow::Result<JobStore> {
    if let Some(dir) = sqlite_parent_dir(&config.database.url) {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating database directory {}", dir.display()))?;
    }
    let mut store = JobStore::connect_with(
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
    })?;
    if let Some(metrics) = metrics {
        store = store.observed_by(metrics);
    }
    if config.database.migrate_on_start {
        store.migrate().await.context("migrating the database")?;
    }
    Ok(store)
}

async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local_addr = listener.local_addr()?;
    Ok((listener, local_addr))
}

/// Binds and serves `app` (plain HTTP: probes and metrics of the consuming
/// roles) until `shutdown`; returns the bound address.
pub async fn serve_http(
    app: Router,
    addr: &str,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<SocketAddr> {
    let (listener, local_addr) = bind(addr).await?;
    serve_http_on(listener, None, app, shutdown, tasks)?;
    Ok(local_addr)
}

/// Serves `app` on `listener`, over TLS when `tls` is given, until `shutdown`.
fn serve_http_on(
    listener: TcpListener,
    tls: Option<&TlsFiles>,
    app: Router,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    let app = app.layer(tower_http::trace::TraceLayer::new_for_http());
    match tls {
        None => {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            spawn_serve(listener, app, shutdown, tasks)
        }
        Some(tls) => {
            let listener = TlsListener::new(listener, tls.rustls_config()?, shutdown.clone())
                .context("starting the HTTPS listener")?;
            spawn_serve(listener, app, shutdown, tasks);
        }
    }
    Ok(())
}

fn spawn_serve<L>(listener: L, app: Router, shutdown: CancellationToken, tasks: &mut JoinSet<()>)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "HTTP server failed");
        }
    });
}

/// Serves the gRPC API on `listener` until `shutdown`: over TLS when `tls`
/// is given, with reflection when `server.grpc_reflection` is on.
fn serve_grpc_on(
    listener: TcpListener,
    jobs: crate::api::grpc::GrpcJobs,
    config: &Config,
    tls: Option<&TlsFiles>,
    shutdown: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    // A unary call (Submit, Get) that has not finished within the body
    // timeout is cut off with DEADLINE_EXCEEDED: a stalled upload frees its
    // admission. Watch returns its stream at once and is not affected.
    let mut server = tonic::transport::Server::builder().timeout(config.limits.body_timeout());
    if let Some(tls) = tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        server = server
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("gRPC TLS")?;
    }
    let reflection = if config.server.grpc_reflection {
        Some(crate::api::grpc::reflection_service().context("gRPC reflection")?)
    } else {
        None
    };
    let admission = jobs.admission_layer();
    let router = server
        .layer(admission)
        .add_service(jobs.into_server())
        .add_optional_service(reflection);
    // Without TCP_NODELAY an HTTP/2 answer (headers, message, trailers in
    // separate writes) waits for the client's delayed ACK: about 40 ms per
    // call (measured with the accept bench: 727 gRPC jobs/s at p50 44 ms).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tasks.spawn(async move {
        let served = router
            .serve_with_incoming_shutdown(incoming, async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "gRPC server failed");
        }
    });
    Ok(())
}

/// The API's front ends as they listen.
#[derive(Debug, Clone, Copy)]
pub struct FrontEnds {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    /// Whether a request without a key is refused (see `auth.mode`).
    pub keys_required: bool,
    /// Keys read from `auth.keys_dir` at start.
    pub folder_keys: usize,
    pub tls: bool,
}

/// The HTTP and gRPC front ends over one submitter, one admission budget
/// and one authenticator. Keys are required or optional by `auth.mode`
/// and where the listeners are bound (see [`keys_required`]).
pub async fn serve_front_ends(
    submitter: Submitter,
    metrics: Metrics,
    liveness: Liveness,
    config: &Config,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<FrontEnds> {
    let tls = TlsFiles::from_config(&config.server)?;
    let (http_listener, http_addr) = bind(&config.server.http_addr).await?;
    let (grpc_listener, grpc_addr) = bind(&config.server.grpc_addr).await?;
    let required = keys_required(config.auth.mode, &[http_addr, grpc_addr]);
    let auth = Authenticator::new(&config.auth, required, submitter.store.clone());
    let folder_keys = auth
        .reload_folder()
        .await
        .context("reading auth.keys_dir")?;
    tasks.spawn(auth.clone().watch_folder(shutdown.clone()));
    if required {
        tracing::info!(folder_keys, "API keys required");
    } else {
        tracing::warn!(
            mode = ?config.auth.mode,
            "API keys optional: requests without one are the tenant \"anonymous\""
        );
    }
    let state = HttpState::new(submitter, metrics)
        .with_liveness(liveness)
        .with_auth(auth.clone());
    let jobs = crate::api::grpc::GrpcJobs::new(
        state.submitter.clone(),
        state.metrics.clone(),
        state.admission.clone(),
        auth,
    );
    serve_grpc_on(
        grpc_listener,
        jobs,
        config,
        tls.as_ref(),
        shutdown.clone(),
        tasks,
    )?;
    serve_http_on(
        http_listener,
        tls.as_ref(),
        router(state),
        shutdown.clone(),
        tasks,
    )?;
    Ok(FrontEnds {
        http_addr,
        grpc_addr,
        keys_required: required,
        folder_keys,
        tls: tls.is_some(),
    })
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
        relay: crate::app::submit::PublishRelay::new(&config.queue),
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
    let (relay, relay_store, stopping) = (submitter.relay.clone(), store.clone(), shutdown.clone());
    tasks.spawn(async move {
        stopping.cancelled().await;
        relay.drain(&relay_store).await;
    });
    let front = serve_front_ends(
        submitter,
        metrics,
        Liveness::without_engine(),
        config,
        &shutdown,
        &mut tasks,
    )
    .await?;
    tracing::info!(http = %front.http_addr, grpc = %front.grpc_addr, tls = front.tls, "API listening");
    Ok(Running::new(front.http_addr, store, blobs, shutdown, tasks).with_front_ends(front))
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
    let inner: Arc<dyn Recognize> = match Fault::from_env() {
        Fault::HangInference => Arc::new(HungEngine),
        Fault::CrashOnMarker => Arc::new(CrashingEngine(engine)),
        Fault::None | Fault::ExitAfterDbWrite => engine,
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
            let journal = match config.worker.crash_journal_dir.trim() {
                "" => CrashJournal::disabled(),
                dir => CrashJournal::open(std::path::Path::new(dir))
                    .with_context(|| format!("opening worker.crash_journal_dir {dir}"))?,
            };
            let handler = InferAndPublish::new(
                blobs.clone(),
                Some(store.clone()),
                engine,
                results,
                config.worker.max_attempts,
                metrics.clone(),
            )
            .with_crash_journal(journal);
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
