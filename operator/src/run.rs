//! The `crdgen` and `run` commands.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::NamespaceResourceScope;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource};
use tracing::{info, warn};

use crate::build::{Capabilities, MANAGED_BY_LABEL, MANAGER};
use crate::controller::{error_policy, reconcile, Context};
use crate::crd::{crd_yaml, OcrPipeline};
use crate::kafka::{ExternallyProvisioned, KafkaAdmin, RdKafkaAdmin};
use crate::leader::LeaseLock;
use crate::metrics::Metrics;

const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_EVERY: Duration = Duration::from_secs(5);
const ACQUIRE_RETRY: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("rendering the CRD: {0}")]
    Crd(#[from] serde_yaml::Error),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("starting: {0}")]
    Io(#[from] std::io::Error),
    #[error("logging: {0}")]
    Tracing(String),
    #[error("lost the leader lease; exiting so that only one replica reconciles")]
    LostLeadership,
}

pub fn crdgen(output: &Path) -> Result<(), RunError> {
    let yaml = crd_yaml()?;
    if output == Path::new("-") {
        print!("{yaml}");
        return Ok(());
    }
    std::fs::write(output, yaml).map_err(|source| RunError::Write {
        path: output.display().to_string(),
        source,
    })
}

pub fn init_tracing() -> Result<(), RunError> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .json()
        .try_init()
        .map_err(|e| RunError::Tracing(e.to_string()))
}

pub fn runtime() -> Result<tokio::runtime::Runtime, RunError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

pub struct RunOptions {
    pub http_addr: SocketAddr,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: Option<String>,
    pub kafka_admin: KafkaAdminKind,
    /// Namespaces whose pipelines this operator reconciles; empty: every
    /// namespace. See [`watch_scopes`].
    pub watch_namespaces: Vec<String>,
}

/// The scopes the controllers watch: `None` is the whole cluster (no
/// namespace listed), otherwise one namespace each. With namespaces listed
/// the operator never lists or watches at cluster scope, so namespaced
/// Roles in those namespaces are all the rights its controllers need.
/// Blank entries (from `a,,b` or an empty variable) and repeats are dropped.
pub fn watch_scopes(namespaces: &[String]) -> Vec<Option<String>> {
    let mut listed: Vec<String> = namespaces
        .iter()
        .map(|ns| ns.trim().to_string())
        .filter(|ns| !ns.is_empty())
        .collect();
    listed.sort();
    listed.dedup();
    if listed.is_empty() {
        vec![None]
    } else {
        listed.into_iter().map(Some).collect()
    }
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// How the operator reaches each pipeline's Kafka (`--kafka-admin`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KafkaAdminKind {
    /// Connects to `spec.kafka.bootstrapServers`: creates missing topics and
    /// measures the writer group's lag, so writer → direct migrations finish.
    #[default]
    Rdkafka,
    /// Never connects: topics are provisioned by someone else and the results
    /// lag is unknown, so writer → direct migrations stop in `DrainingResults`.
    External,
}

impl KafkaAdminKind {
    pub fn adapter(self) -> Arc<dyn KafkaAdmin> {
        match self {
            KafkaAdminKind::Rdkafka => Arc::new(RdKafkaAdmin::default()),
            KafkaAdminKind::External => Arc::new(ExternallyProvisioned),
        }
    }
}

/// `/healthz` answers while the process serves; `/metrics` is Prometheus text.
pub fn admin_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_handler))
        .with_state(metrics)
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.render() {
        Ok(text) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn keda_installed(client: &Client) -> bool {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt("scaledobjects.keda.sh").await {
        Ok(found) => found.is_some(),
        Err(error) => {
            warn!(%error, "cannot tell whether KEDA is installed; worker lag autoscaling is off");
            false
        }
    }
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "ocr-operator".into());
    format!("{host}-{}", std::process::id())
}

/// Resolves on SIGTERM or Ctrl-C.
fn termination_signal() -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
    let (tx, rx) = futures::channel::oneshot::channel::<()>();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(error) => {
                        warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                        let _ = tokio::signal::ctrl_c().await;
                        let _ = tx.send(());
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(());
    });
    async move {
        let _ = rx.await;
    }
}

pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let listener = tokio::net::TcpListener::bind(options.http_addr).await?;
    run_with(client, listener, options, termination_signal()).await
}

/// The whole operator on a given client and admin listener, until `shutdown`
/// resolves or the leader lease is lost.
pub async fn run_with(
    client: Client,
    listener: tokio::net::TcpListener,
    options: RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let shutdown = shutdown.shared();
    let metrics = Arc::new(Metrics::default());

    info!(addr = %listener.local_addr()?, "serving /healthz and /metrics");
    let server = axum::serve(listener, admin_router(metrics.clone()));
    tokio::spawn(async move {
        if let Err(error) = server.await {
            warn!(%error, "admin server stopped");
        }
    });

    let identity = options.identity.unwrap_or_else(default_identity);
    let lock = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &options.lease_namespace),
        &options.lease_name,
        &identity,
        LEASE_DURATION,
    );
    info!(%identity, lease = %options.lease_name, "waiting for the leader lease");
    loop {
        tokio::select! {
            acquired = lock.try_acquire() => match acquired {
                Ok(true) => break,
                Ok(false) => {}
                Err(error) => warn!(%error, "leader election"),
            },
            _ = shutdown.clone() => return Ok(()),
        }
        tokio::select! {
            _ = tokio::time::sleep(ACQUIRE_RETRY) => {}
            _ = shutdown.clone() => return Ok(()),
        }
    }
    metrics.set_leader(true);
    info!(%identity, "became leader");

    let lost = Arc::new(AtomicBool::new(false));
    let (lost_tx, lost_rx) = futures::channel::oneshot::channel::<()>();
    let renewal = {
        let lost = lost.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut last_renewal = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                match lock.try_acquire().await {
                    Ok(true) => last_renewal = tokio::time::Instant::now(),
                    Ok(false) => break,
                    // A failed renewal is retried while the lease is still ours.
                    Err(error) => {
                        warn!(%error, "renewing the leader lease");
                        if last_renewal.elapsed() + RENEW_EVERY >= LEASE_DURATION {
                            break;
                        }
                    }
                }
            }
            metrics.set_leader(false);
            lost.store(true, Ordering::SeqCst);
            let _ = lost_tx.send(());
        })
    };

    let capabilities = Capabilities {
        keda: keda_installed(&client).await,
    };
    info!(keda = capabilities.keda, kafka_admin = ?options.kafka_admin, "cluster capabilities");
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ),
        kafka: options.kafka_admin.adapter(),
        capabilities,
        metrics: metrics.clone(),
        signals: Default::default(),
    });

    // Every controller stops on shutdown or when the lease is lost.
    let stop: futures::future::Shared<BoxFuture<'static, ()>> = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = lost_rx => {}
        }
    }
    .boxed()
    .shared();
    let scopes = watch_scopes(&options.watch_namespaces);
    info!(namespaces = ?scopes.iter().flatten().collect::<Vec<_>>(), "watching (empty: every namespace)");
    let owned = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
    let controllers = scopes.iter().map(|scope| {
        let namespace = scope.as_deref();
        Controller::new(
            scoped::<OcrPipeline>(&client, namespace),
            watcher::Config::default(),
        )
        .owns(scoped::<Deployment>(&client, namespace), owned.clone())
        .owns(scoped::<ConfigMap>(&client, namespace), owned.clone())
        .owns(scoped::<Service>(&client, namespace), owned.clone())
        .graceful_shutdown_on(stop.clone())
        .run(reconcile, error_policy, ctx.clone())
        .boxed()
    });
    futures::stream::select_all(controllers)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "controller");
            }
        })
        .await;

    renewal.abort();
    if lost.load(Ordering::SeqCst) {
        return Err(RunError::LostLeadership);
    }
    info!("shut down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("writes");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("reads");
        response
    }

    #[tokio::test]
    async fn admin_server_serves_health_and_metrics() {
        let metrics = Arc::new(Metrics::default());
        metrics.set_leader(true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("address");
        let server = axum::serve(listener, admin_router(metrics));
        tokio::spawn(async move { server.await });

        let health = get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        assert!(health.ends_with("ok"), "{health}");

        let scraped = get(addr, "/metrics").await;
        assert!(scraped.starts_with("HTTP/1.1 200"), "{scraped}");
        assert!(scraped.contains("ocr_operator_leader 1"), "{scraped}");

        let missing = get(addr, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    }

    #[test]
    fn watch_scopes_are_the_cluster_or_each_listed_namespace() {
        assert_eq!(watch_scopes(&[]), [None]);
        assert_eq!(watch_scopes(&[" ".into(), String::new()]), [None]);
        let listed = watch_scopes(&["team-b".into(), " team-a".into(), "team-b".into()]);
        assert_eq!(
            listed,
            [Some("team-a".to_string()), Some("team-b".to_string())]
        );
    }

    #[test]
    fn crdgen_writes_the_file() {
        let dir = std::env::temp_dir().join(format!("ocr-crdgen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("crd.yaml");
        crdgen(&path).expect("writes");
        let written = std::fs::read_to_string(&path).expect("reads");
        assert_eq!(written, crd_yaml().expect("renders"));
        std::fs::remove_dir_all(&dir).expect("cleans up");
    }
}
