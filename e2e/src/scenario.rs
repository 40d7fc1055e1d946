//! What every scenario shares: the environment (control plane, node agent,
//! the operator installed from its chart, MariaDB, a Kafka broker), a
//! pipeline, a client that keeps submitting jobs through the API Service's
//! EndpointSlices, and the checks at the end (every job `Succeeded` exactly
//! once with its text, no dead letters, no lag, no stray pods).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Api, Client};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;

use crate::cluster::{render_chart, ControlPlane, NodeAgent, Tools};
use crate::service_proxy::ServiceProxy;

pub const OPERATOR_NS: &str = "ocr-system";
/// Every namespace of the scenarios enforces Pod Security `restricted`, as a
/// hardened cluster does: the API server refuses any pod that falls short.
pub const RESTRICTED: &str = "pod-security.kubernetes.io/enforce: restricted";
pub const HELLO: &[u8] = include_bytes!("../../runtime/tests/data/hello.png");
pub const HELLO_TEXT: &str = "Hello OCR world";
/// The tenant the scenarios submit as, and its key: each namespace's
/// `ocr-api-keys` Secret holds it, and every pipeline names that Secret
/// (`spec.api.auth.keysSecret`), so the keys wiring is on every scenario's path.
pub const E2E_TENANT: &str = "e2e";
pub const E2E_API_KEY: &str = "e2e-scenario-api-key-7f3a9c2e51b84d06a1c3";

/// An HTTP client that sends the scenarios' API key on every request.
pub fn api_client(timeout: Option<Duration>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(value) = format!("Bearer {E2E_API_KEY}").parse() {
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    builder.build().unwrap_or_default()
}

/// The Kafka-protocol broker a scenario runs on.
pub enum Broker {
    /// librdkafka's mock cluster, hosted by the test: consumer groups with
    /// several members (pods rolling over need them), but no CreateTopics, so
    /// the harness creates the topics.
    Mock(MockCluster<'static, DefaultProducerContext>),
    /// A Tansu broker process: CreateTopics and DeleteTopics, so the operator
    /// provisions and deletes topics itself; single-member groups only.
    Tansu(crate::real_broker::RealBroker),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    Mock,
    Tansu,
}

impl Broker {
    fn start(kind: BrokerKind) -> Result<Broker> {
        Ok(match kind {
            BrokerKind::Mock => {
                Broker::Mock(MockCluster::new(1).context("starting the mock Kafka cluster")?)
            }
            BrokerKind::Tansu => Broker::Tansu(crate::real_broker::RealBroker::start()),
        })
    }

    pub fn bootstrap_servers(&self) -> String {
        match self {
            Broker::Mock(mock) => mock.bootstrap_servers(),
            Broker::Tansu(tansu) => tansu.bootstrap_servers.clone(),
        }
    }
}

/// A scenario's whole world; everything stops when it is dropped.
pub struct Env {
    pub name: &'static str,
    pub started: Instant,
    pub kafka: Broker,
    pub database: Database,
    pub client: Client,
    pub node: NodeAgent,
    pub plane: ControlPlane,
    pub tools: Tools,
    pub models: PathBuf,
}

impl Env {
    pub async fn start(name: &'static str, node_agent: &str, broker: BrokerKind) -> Result<Env> {
        let started = Instant::now();
        let tools = Tools::from_env(node_agent)?;
        let plane = ControlPlane::start(&tools)?;
        let client = plane.client().await?;
        let node = NodeAgent::start(&plane, &tools, "e2e-node-1", 0)?;
        let kafka = Broker::start(broker)?;
        let database = Database::create().await?;
        let models = plane.dir.path().join("models");
        copy_models(&models)?;
        let env = Env {
            name,
            started,
            kafka,
            database,
            client,
            node,
            plane,
            tools,
            models,
        };
        env.wait_node_ready().await?;
        env.say("control plane, node agent, MariaDB and Kafka are up");
        Ok(env)
    }

    pub fn say(&self, message: &str) {
        eprintln!(
            "e2e [{}] {:6.1}s {message}",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }

    async fn wait_node_ready(&self) -> Result<()> {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        wait_until("the node to be Ready", Duration::from_secs(60), || async {
            let node = nodes.get_opt(&self.node.name).await?;
            Ok(node
                .and_then(|n| n.status)
                .and_then(|s| s.conditions)
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")))
        })
        .await
    }

    /// The chart, rendered with `helm template` and applied as is: the
    /// operator runs as a pod with the chart's ServiceAccount and RBAC.
    pub async fn install_operator(&self) -> Result<()> {
        self.plane.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {OPERATOR_NS}\n  labels:\n    {RESTRICTED}\n"
        ))?;
        let manifests = render_chart(
            &self.tools,
            OPERATOR_NS,
            &[("image.tag", "e2e"), ("logLevel", "info,kube=warn")],
        )?;
        self.plane.apply(&manifests)?;
        self.plane.kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "crd/ocrpipelines.ocr.serving.dev",
                "--timeout=60s",
            ],
            None,
        )?;
        let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
            Api::namespaced(self.client.clone(), OPERATOR_NS);
        wait_until(
            "the operator to be available",
            Duration::from_secs(120),
            || async {
                let list = deployments.list(&ListParams::default()).await?;
                Ok(list.items.iter().all(|d| {
                    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    d.status
                        .as_ref()
                        .and_then(|s| s.available_replicas)
                        .unwrap_or(0)
                        == want
                }) && !list.items.is_empty())
            },
        )
        .await?;
        self.say("operator installed from the Helm chart (2 replicas, leader election)");
        Ok(())
    }

    /// The namespace, the database Secret and the claims (models, blobs) a pipeline uses.
    pub fn prepare_namespace(&self, namespace: &str) -> Result<()> {
        let blobs = self.plane.dir.path().join(format!("blobs-{namespace}"));
        std::fs::create_dir_all(&blobs)?;
        {
            use std::os::unix::fs::PermissionsExt;
            // The pods run as 65532, as the images do.
            std::fs::set_permissions(&blobs, std::fs::Permissions::from_mode(0o777))?;
        }
        let yaml = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
  labels:
    {RESTRICTED}
    pod-security.kubernetes.io/warn: restricted
---
apiVersion: v1
kind: Secret
metadata: {{name: ocr-mysql, namespace: {namespace}}}
stringData:
  url: "{db}"
---
apiVersion: v1
kind: Secret
metadata: {{name: ocr-api-keys, namespace: {namespace}}}
stringData:
  {E2E_TENANT}: "{E2E_API_KEY}"
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: models-{namespace}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadOnlyMany, ReadWriteMany]
  storageClassName: ""
  hostPath: {{path: "{models}"}}
  claimRef: {{namespace: {namespace}, name: ocr-models}}
---
apiVersion: v1
kind: PersistentVolume
metadata: {{name: blobs-{namespace}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteMany]
  storageClassName: ""
  hostPath: {{path: "{blobs}"}}
  claimRef: {{namespace: {namespace}, name: ocr-blobs}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: ocr-models, namespace: {namespace}}}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: models-{namespace}
  resources: {{requests: {{storage: 1Gi}}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: ocr-blobs, namespace: {namespace}}}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: blobs-{namespace}
  resources: {{requests: {{storage: 1Gi}}}}
"#,
            db = self.database.url,
            models = self.models.display(),
            blobs = blobs.display(),
        );
        self.plane.apply(&yaml)?;
        Ok(())
    }

    pub fn bootstrap_servers(&self) -> String {
        self.kafka.bootstrap_servers()
    }

    /// Topics on the mock broker, which cannot create them on request; the
    /// operator finds them and leaves them alone. On Tansu the operator
    /// creates them.
    pub fn create_topics(&self, pipeline: &PipelineRef) -> Result<()> {
        let Broker::Mock(mock) = &self.kafka else {
            bail!("only the mock broker needs its topics made by the harness");
        };
        for topic in [
            &pipeline.jobs_topic,
            &pipeline.results_topic,
            &pipeline.dead_letter_topic,
        ] {
            // As many partitions as the pipeline's spec.kafka.partitions asks.
            mock.create_topic(topic, 4, 1)
                .with_context(|| format!("creating the topic {topic}"))?;
        }
        Ok(())
    }

    pub fn dump(&self) {
        eprintln!("{}", self.node.logs_tail(40));
        if let Ok(text) = std::fs::read_to_string(self.node.root.join("agent.log")) {
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            eprintln!("---- node agent log (last 80 lines)");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        for args in [
            vec![
                "get",
                "ocrp,deploy,rs,pods,pdb,svc,endpointslices",
                "-A",
                "-o",
                "wide",
            ],
            vec!["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            if let Ok(out) = self.plane.kubectl(&args, None) {
                eprintln!("---- kubectl {}\n{out}", args.join(" "));
            }
        }
    }
}

fn copy_models(dir: &std::path::Path) -> Result<()> {
    let source = match std::env::var_os("OCR_MODEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("HOME").context("HOME")?).join(".cache/ocr-models"),
    };
    std::fs::create_dir_all(dir)?;
    for file in [
        "ppocrv6_tiny_det.onnx",
        "ppocrv6_tiny_rec.onnx",
        "ppocrv6_tiny_dict.txt",
    ] {
        std::fs::copy(source.join(file), dir.join(file)).with_context(|| {
            format!(
                "copying {file} from {} (run scripts/fetch-models.sh)",
                source.display()
            )
        })?;
    }
    Ok(())
}

/// A database of the scenario's own on the local MariaDB.
pub struct Database {
    pub url: String,
    pub pool: sqlx::MySqlPool,
    name: String,
}

impl Database {
    async fn create() -> Result<Database> {
        let server = std::env::var("OCR_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
        let name = format!("ocr_e2e_{}", uuid::Uuid::now_v7().simple());
        let admin = sqlx::MySqlPool::connect(&server)
            .await
            .with_context(|| format!("MariaDB must run at {server}"))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin)
            .await?;
        let url = format!("{server}/{name}");
        let pool = sqlx::MySqlPool::connect(&url).await?;
        Ok(Database { url, pool, name })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (pool, name) = (self.pool.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                        .execute(&pool)
                        .await;
                });
            }
        })
        .join();
    }
}

/// The names a pipeline's data flows through.
#[derive(Clone, Debug)]
pub struct PipelineRef {
    pub namespace: String,
    pub name: String,
    pub jobs_topic: String,
    pub results_topic: String,
    pub dead_letter_topic: String,
    pub worker_group: String,
    pub writer_group: String,
    /// `spec.kafka.deleteTopics`.
    pub delete_topics: bool,
}

impl PipelineRef {
    /// The manifest names no topic or group: they are the documented
    /// defaults, `<namespace>.<name>.{jobs,results,dead-letter,worker,writer}`,
    /// which [`PipelineRef::check_queue_names`] holds the status to.
    pub fn new(namespace: &str, name: &str) -> PipelineRef {
        let prefix = format!("{namespace}.{name}");
        PipelineRef {
            namespace: namespace.into(),
            name: name.into(),
            jobs_topic: format!("{prefix}.jobs"),
            results_topic: format!("{prefix}.results"),
            dead_letter_topic: format!("{prefix}.dead-letter"),
            worker_group: format!("{prefix}.worker"),
            writer_group: format!("{prefix}.writer"),
            delete_topics: false,
        }
    }

    /// `status.queues` names what this pipeline's data flows through.
    pub async fn check_queue_names(&self, client: &Client) -> Result<()> {
        let status = self.status(client).await?;
        let expected = json!({
            "jobsTopic": self.jobs_topic,
            "resultsTopic": self.results_topic,
            "deadLetterTopic": self.dead_letter_topic,
            "consumerGroup": self.worker_group,
            "writerGroup": self.writer_group,
        });
        anyhow::ensure!(
            status["queues"] == expected,
            "{}: status.queues is {}, expected {expected}",
            self.name,
            status["queues"]
        );
        Ok(())
    }

    /// A CPU pipeline on PP-OCRv6 tiny with the scenario's broker and claims.
    pub fn manifest(&self, architecture: &str, bootstrap: &str, workers: u32) -> String {
        format!(
            r#"
apiVersion: ocr.serving.dev/v1alpha1
kind: OcrPipeline
metadata:
  name: {name}
  namespace: {namespace}
spec:
  architecture: {architecture}
  images:
    runtime: ghcr.io/ocr-serving/ocr-runtime:e2e
  model:
    variant: v6-tiny
    device: cpu
    source:
      volume:
        claimName: ocr-models
    detection:
      limitType: Max
      limitSideLen: 320
  api:
    replicas: 1
    auth:
      keysSecret: ocr-api-keys
  worker:
    replicas: {workers}
    batching:
      maxBatchSize: 8
      maxWaitMs: 20
  writer:
    replicas: 1
  kafka:
    bootstrapServers: "{bootstrap}"
    partitions: 4
    replicationFactor: 1
    deleteTopics: {delete_topics}
  database:
    secret:
      name: ocr-mysql
  blob:
    volume:
      claimName: ocr-blobs
  availability:
    antiAffinity: None
"#,
            name = self.name,
            namespace = self.namespace,
            delete_topics = self.delete_topics,
        )
    }

    pub fn api(&self, client: &Client) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("ocr.serving.dev", "v1alpha1", "OcrPipeline");
        Api::namespaced_with(
            client.clone(),
            &self.namespace,
            &ApiResource::from_gvk_with_plural(&gvk, "ocrpipelines"),
        )
    }

    pub async fn set_architecture(&self, client: &Client, architecture: &str) -> Result<()> {
        let patch = json!({ "spec": { "architecture": architecture } });
        self.api(client)
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("setting spec.architecture={architecture}"))?;
        Ok(())
    }

    /// The pipeline's status as JSON (empty when it has none yet).
    pub async fn status(&self, client: &Client) -> Result<serde_json::Value> {
        let object = self.api(client).get(&self.name).await?;
        Ok(object.data.get("status").cloned().unwrap_or_default())
    }

    /// Waits until the status reports `architecture` fully rolled out: no
    /// migration, Ready, and the latest generation observed.
    pub async fn wait_settled(
        &self,
        client: &Client,
        architecture: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        let started = Instant::now();
        let api = self.api(client);
        wait_until(
            &format!("{}/{} to run {architecture}", self.namespace, self.name),
            timeout,
            || async {
                let object = api.get(&self.name).await?;
                let status = object.data.get("status").cloned().unwrap_or_default();
                let generation = object.metadata.generation;
                let ready = status["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                Ok(status["architecture"] == architecture
                    && status["migration"].is_null()
                    && ready
                    && status["observedGeneration"].as_i64() == generation)
            },
        )
        .await?;
        Ok(started.elapsed())
    }

    pub async fn pods(&self, client: &Client, component: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        let selector = format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component={component}",
            self.name
        );
        Ok(pods
            .list(&ListParams::default().labels(&selector))
            .await?
            .items)
    }

    /// `http://IP:PORT` of a ready endpoint of the API Service, read from its
    /// EndpointSlices as kube-proxy would (there is none here).
    pub async fn api_endpoint(&self, client: &Client) -> Result<String> {
        let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &self.namespace);
        let service = format!("{}-api", self.name);
        let list = slices
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
            .await?;
        for slice in list.items {
            let port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some("http"))
                .and_then(|p| p.port);
            let Some(port) = port else { continue };
            for endpoint in slice.endpoints {
                let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                if ready {
                    if let Some(address) = endpoint.addresses.first() {
                        return Ok(format!("http://{address}:{port}"));
                    }
                }
            }
        }
        bail!("the Service {service} has no ready endpoint")
    }
}

/// The pods the API server refused to create in `namespace` (the
/// ReplicaSet controller's `FailedCreate` events, e.g. a Pod Security
/// violation), as `object: message`.
pub async fn refused_pods(client: &Client, namespace: &str) -> Result<Vec<String>> {
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    let list = events
        .list(&ListParams::default().fields("reason=FailedCreate"))
        .await?;
    Ok(list
        .items
        .into_iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.involved_object.name.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect())
}

/// Waits until the pipeline runs `architecture` ([`PipelineRef::wait_settled`]),
/// failing at once when the API server refuses one of its pods.
pub async fn wait_settled_admitted(
    client: &Client,
    pipeline: &PipelineRef,
    architecture: &str,
    timeout: Duration,
) -> Result<Duration> {
    let refused = async {
        loop {
            let refused = refused_pods(client, &pipeline.namespace).await?;
            if let Some(first) = refused.first() {
                bail!(
                    "the API server refused {} pod creation(s) in {}; first: {first}",
                    refused.len(),
                    pipeline.namespace
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        settled = pipeline.wait_settled(client, architecture, timeout) => settled,
        refused = refused => refused,
    }
}

/// Every ReplicaSet of the pipeline has created all its pods in a namespace
/// that enforces Pod Security `restricted`, and none was refused. Returns
/// what was checked.
pub async fn check_pods_admitted(client: &Client, pipeline: &PipelineRef) -> Result<String> {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let namespace = namespaces.get(&pipeline.namespace).await?;
    let enforced = namespace
        .metadata
        .labels
        .unwrap_or_default()
        .get("pod-security.kubernetes.io/enforce")
        .cloned();
    anyhow::ensure!(
        enforced.as_deref() == Some("restricted"),
        "the namespace {} does not enforce restricted (enforce={enforced:?})",
        pipeline.namespace
    );
    let refused = refused_pods(client, &pipeline.namespace).await?;
    anyhow::ensure!(
        refused.is_empty(),
        "the API server refused pods: {refused:?}"
    );
    let sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(client.clone(), &pipeline.namespace);
    let selector = format!("app.kubernetes.io/instance={}", pipeline.name);
    let mut counts = Vec::new();
    for set in sets.list(&ListParams::default().labels(&selector)).await? {
        let want = set.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        if want == 0 {
            continue;
        }
        let name = set.metadata.name.clone().unwrap_or_default();
        let have = set.status.as_ref().map(|s| s.replicas).unwrap_or(0);
        anyhow::ensure!(
            have == want,
            "ReplicaSet {name} has created {have} of its {want} pods"
        );
        counts.push(format!("{name} {have}/{want}"));
    }
    anyhow::ensure!(!counts.is_empty(), "no ReplicaSet of {selector}");
    Ok(format!(
        "namespace {} enforces Pod Security restricted: no pod refused, every ReplicaSet created its pods ({})",
        pipeline.namespace,
        counts.join(", ")
    ))
}

pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            match last_error {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what} (last error: {e:#})")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The pod holding the operator's leader Lease.
pub async fn operator_leader(client: &Client) -> Result<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NS);
    let lease = leases.get("ocr-operator-leader").await?;
    lease
        .spec
        .and_then(|s| s.holder_identity)
        .context("the operator Lease has no holder")
}

pub async fn delete_pod(client: &Client, namespace: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.delete(name, &DeleteParams::default()).await?;
    Ok(())
}

/// One submitted job: its idempotency key and the id the API gave it.
#[derive(Clone, Debug)]
pub struct Submitted {
    pub key: String,
    pub id: String,
}

/// The load of a careful user, from `ocr-runtime loadgen` as users run it:
/// `per_second` jobs a second (open loop), each with its own idempotency key
/// `<run>-<n>` and sent again with it every 300 ms until it is accepted
/// (`--retry-with-keys`), through [`ServiceProxy`] to a ready API pod. The
/// accepted jobs are read from loadgen's `--jobs-out` journal.
pub struct Load {
    loadgen: tokio::process::Child,
    journal: PathBuf,
    _folder: tempfile::TempDir,
    _proxy: ServiceProxy,
}

/// How long a stopped load may take to get its last jobs accepted.
const LOAD_DRAIN: Duration = Duration::from_secs(180);

impl Load {
    pub async fn start(
        env: &Env,
        pipeline: &PipelineRef,
        run: &str,
        per_second: f64,
    ) -> Result<Load> {
        let proxy = ServiceProxy::start(env.client.clone(), pipeline.clone()).await?;
        let folder = tempfile::tempdir().context("a folder for the load")?;
        let image = folder.path().join("hello.png");
        std::fs::write(&image, HELLO).context("writing the load's image")?;
        let journal = folder.path().join("jobs.jsonl");
        let loadgen = tokio::process::Command::new(env.tools.programs.join("ocr-runtime"))
            .arg("loadgen")
            .args([
                "--json",
                "--url",
                &format!("http://127.0.0.1:{}", proxy.port),
            ])
            .arg("--image")
            .arg(&image)
            .args(["--rate", &per_second.to_string(), "--until-interrupted"])
            .args(["--retry-with-keys", run])
            .arg("--jobs-out")
            .arg(&journal)
            .env("OCR_API_KEY", E2E_API_KEY)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting ocr-runtime loadgen")?;
        Ok(Load {
            loadgen,
            journal,
            _folder: folder,
            _proxy: proxy,
        })
    }

    fn accepted(&self) -> Vec<Submitted> {
        std::fs::read_to_string(&self.journal)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|job| {
                Some(Submitted {
                    key: job["key"].as_str()?.to_owned(),
                    id: job["id"].as_str()?.to_owned(),
                })
            })
            .collect()
    }

    /// Jobs accepted so far.
    pub fn count(&self) -> usize {
        self.accepted().len()
    }

    /// Stops sending new jobs (SIGINT) and waits until every job sent is
    /// accepted; returns them all.
    pub async fn finish(mut self) -> Result<Vec<Submitted>> {
        let pid = self.loadgen.id().context("loadgen has exited already")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .context("interrupting loadgen")?;
        let mut stdout = self.loadgen.stdout.take().context("loadgen's stdout")?;
        let waited = tokio::time::timeout(LOAD_DRAIN, async {
            use tokio::io::AsyncReadExt;
            let mut summary = String::new();
            stdout.read_to_string(&mut summary).await?;
            let status = self.loadgen.wait().await?;
            anyhow::Ok((status, summary))
        })
        .await;
        let (status, summary) = match waited {
            Ok(done) => done.context("waiting for loadgen")?,
            Err(_) => bail!(
                "loadgen still had jobs that were not accepted {} s after it was stopped",
                LOAD_DRAIN.as_secs()
            ),
        };
        anyhow::ensure!(status.success(), "loadgen exited with {status}: {summary}");
        let summary: serde_json::Value =
            serde_json::from_str(summary.trim()).context("loadgen's JSON summary")?;
        let jobs = self.accepted();
        anyhow::ensure!(
            summary["accepted"].as_u64() == Some(jobs.len() as u64)
                && summary["sent"] == summary["accepted"],
            "loadgen's journal has {} jobs, its summary says {summary}",
            jobs.len()
        );
        tracing::info!(
            accepted = jobs.len(),
            retries = summary["retries"].as_u64().unwrap_or(0),
            p99_ms = summary["accept_latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            "load finished"
        );
        Ok(jobs)
    }
}

pub async fn submit(
    client: &Client,
    pipeline: &PipelineRef,
    http: &reqwest::Client,
    key: &str,
) -> Result<String> {
    submit_image(client, pipeline, http, key, HELLO.to_vec()).await
}

pub async fn submit_image(
    client: &Client,
    pipeline: &PipelineRef,
    http: &reqwest::Client,
    key: &str,
    png: Vec<u8>,
) -> Result<String> {
    let base = pipeline.api_endpoint(client).await?;
    let response = http
        .post(format!("{base}/v1/jobs"))
        .header("content-type", "image/png")
        .header("idempotency-key", key)
        .body(png)
        .send()
        .await?;
    let status = response.status();
    if !status.is_success() {
        bail!("POST /v1/jobs answered {status}");
    }
    let body: serde_json::Value = response.json().await?;
    body["id"]
        .as_str()
        .map(str::to_owned)
        .context("the API's answer has no id")
}

/// A white page: a few kilobytes to upload, `width × height` pixels to decode.
pub fn blank_page(width: u32, height: u32) -> Result<Vec<u8>> {
    let page = image::RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    let mut png = std::io::Cursor::new(Vec::new());
    page.write_to(&mut png, image::ImageFormat::Png)
        .context("encoding a PNG")?;
    Ok(png.into_inner())
}

/// What a scenario measured, printed at its end.
#[derive(Debug, Default)]
pub struct Report {
    pub scenario: String,
    pub submitted: usize,
    pub succeeded: usize,
    pub duplicated: usize,
    pub lost: usize,
    pub failed: usize,
    pub dead_lettered: usize,
    pub wrong_text: usize,
    pub submit_retries: usize,
    pub migrations: Vec<(String, f64)>,
    pub checks: Vec<String>,
}

impl Report {
    pub fn print(&self) {
        eprintln!("\n==== e2e scenario: {}", self.scenario);
        eprintln!(
            "jobs: submitted {}, succeeded {}, duplicated {}, lost {}, failed {}, dead-lettered {}, wrong text {} (client retries {})",
            self.submitted, self.succeeded, self.duplicated, self.lost, self.failed, self.dead_lettered, self.wrong_text, self.submit_retries
        );
        for (what, seconds) in &self.migrations {
            eprintln!("migration {what}: {seconds:.1} s");
        }
        for check in &self.checks {
            eprintln!("checked: {check}");
        }
    }

    pub fn assert_clean(&self) {
        assert!(
            self.submitted > 0,
            "{}: nothing was submitted",
            self.scenario
        );
        assert_eq!(
            (
                self.succeeded,
                self.duplicated,
                self.lost,
                self.failed,
                self.dead_lettered,
                self.wrong_text
            ),
            (self.submitted, 0, 0, 0, 0, 0),
            "{}: every job must succeed exactly once with its text",
            self.scenario
        );
    }
}

/// Waits until every submitted job is final, then counts what the database holds.
pub async fn settle_jobs(
    env: &Env,
    jobs: &[Submitted],
    timeout: Duration,
    report: &mut Report,
) -> Result<()> {
    let pool = &env.database.pool;
    let keys: Vec<&str> = jobs.iter().map(|j| j.key.as_str()).collect();
    let _ = wait_until("every job to be final", timeout, || async {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT status FROM jobs")
            .fetch_all(pool)
            .await?;
        Ok(rows
            .iter()
            .all(|(s,)| matches!(s.as_str(), "Succeeded" | "Failed" | "DeadLettered"))
            && rows.len() >= jobs.len())
    })
    .await;
    let rows: Vec<(String, String, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, status, idempotency_key, result FROM jobs")
            .fetch_all(pool)
            .await?;
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    let by_id: BTreeMap<&str, (&str, Option<&str>)> = rows
        .iter()
        .map(|(id, status, _, result)| (id.as_str(), (status.as_str(), result.as_deref())))
        .collect();
    for (_, _, key, _) in &rows {
        if let Some(key) = key {
            *per_key.entry(key.as_str()).or_default() += 1;
        }
    }
    report.submitted = jobs.len();
    report.duplicated = keys
        .iter()
        .map(|k| per_key.get(k).copied().unwrap_or(0).saturating_sub(1))
        .sum();
    for job in jobs {
        match by_id.get(job.id.as_str()) {
            None => report.lost += 1,
            Some(("Succeeded", _)) => report.succeeded += 1,
            Some(("DeadLettered", _)) => report.dead_lettered += 1,
            Some(("Failed", _)) => report.failed += 1,
            Some(_) => report.lost += 1,
        }
    }
    Ok(())
}

/// Reads a job's result through the API, as a user does, and checks its text.
pub async fn check_texts(
    env: &Env,
    pipeline: &PipelineRef,
    jobs: &[Submitted],
    sample: usize,
    report: &mut Report,
) -> Result<()> {
    let http = api_client(None);
    let base = pipeline.api_endpoint(&env.client).await?;
    // Keys are required (the CRD's default): without one, nothing is read.
    if let Some(job) = jobs.first() {
        let anonymous = reqwest::Client::new()
            .get(format!("{base}/v1/jobs/{}/result", job.id))
            .send()
            .await?
            .status();
        anyhow::ensure!(
            anonymous == reqwest::StatusCode::UNAUTHORIZED,
            "GET without a key answered {anonymous}, expected 401"
        );
        report
            .checks
            .push("a GET without an API key is refused with 401".into());
    }
    let step = (jobs.len() / sample.max(1)).max(1);
    let mut checked = 0;
    for job in jobs.iter().step_by(step) {
        let body: serde_json::Value = http
            .get(format!("{base}/v1/jobs/{}/result", job.id))
            .send()
            .await?
            .json()
            .await?;
        let text = body["text"].as_str().unwrap_or_default();
        if text != HELLO_TEXT {
            report.wrong_text += 1;
            eprintln!("job {}: text {text:?}, expected {HELLO_TEXT:?}", job.id);
        }
        checked += 1;
    }
    report.checks.push(format!(
        "{checked} results read through GET /v1/jobs/{{id}}/result say {HELLO_TEXT:?}"
    ));
    Ok(())
}

/// Unconsumed messages of a group on a topic (committed offset to end).
pub fn group_lag(bootstrap: &str, group: &str, topic: &str) -> Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("a Kafka client for the lag")?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut list = TopicPartitionList::new();
    for p in &partitions {
        list.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    let mut lag = 0;
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => low,
        };
        lag += (high - at).max(0);
    }
    Ok(lag)
}

/// Offsets a group committed on a topic, summed over its partitions (0
/// where it never committed): how far it consumed that topic.
pub fn committed_total(bootstrap: &str, group: &str, topic: &str) -> Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .context("a Kafka client for committed offsets")?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut list = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            list.add_partition(topic, p.id());
        }
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    Ok(committed
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o.max(0),
            _ => 0,
        })
        .sum())
}

/// Every topic on the broker.
pub fn topics_on(bootstrap: &str) -> Result<Vec<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .context("a Kafka client")?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
    let mut topics: Vec<String> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| t.name().to_string())
        .collect();
    topics.sort();
    Ok(topics)
}

/// Messages ever written to a topic (the dead-letter topic must have none).
pub fn messages_in(bootstrap: &str, topic: &str) -> Result<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("a Kafka client")?;
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let mut total = 0;
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
            total += high - low;
        }
    }
    Ok(total)
}

/// The data-plane checks every scenario ends with. The lag must reach 0
/// once the load has stopped (a redelivered message may still be on its way
/// to a consumer after a rebalance), and stay there.
pub async fn check_queues(env: &Env, pipeline: &PipelineRef, report: &mut Report) -> Result<()> {
    let bootstrap = env.bootstrap_servers();
    let dead = messages_in(&bootstrap, &pipeline.dead_letter_topic)?;
    report.dead_lettered += dead as usize;
    let lags = Mutex::new((0, 0));
    let drained = wait_until(
        "the jobs and results lag to reach 0",
        Duration::from_secs(90),
        || async {
            let now = (
                group_lag(&bootstrap, &pipeline.worker_group, &pipeline.jobs_topic)?,
                group_lag(&bootstrap, &pipeline.writer_group, &pipeline.results_topic)?,
            );
            if let Ok(mut last) = lags.lock() {
                *last = now;
            }
            Ok(now == (0, 0))
        },
    )
    .await;
    let (jobs_lag, results_lag) = lags.into_inner().unwrap_or_default();
    report.checks.push(format!(
        "dead-letter topic {} holds {dead} messages; lag {} on {} = {jobs_lag}, {} on {} = {results_lag}",
        pipeline.dead_letter_topic, pipeline.worker_group, pipeline.jobs_topic, pipeline.writer_group, pipeline.results_topic
    ));
    if drained.is_err() {
        bail!("messages left unconsumed: jobs lag {jobs_lag}, results lag {results_lag}");
    }
    Ok(())
}
