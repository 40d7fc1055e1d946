//! Pure builders: (pipeline, plan, cluster capabilities) → desired objects.
//! Nothing here talks to the API server; `tests/snapshots.rs` renders every
//! topology and compares it with the checked-in YAML.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities as LinuxCapabilities, ConfigMap, ConfigMapVolumeSource, Container,
    ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, LocalObjectReference,
    PersistentVolumeClaimVolumeSource, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::ApiResource;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde_json::{json, Value};

use crate::crd::{AntiAffinity, Architecture, Device, OcrPipeline};
use crate::migration::Plan;

pub const MANAGER: &str = "ocr-operator";
pub const PIPELINE_LABEL: &str = "ocr.serving.dev/pipeline";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const CONFIG_HASH_ANNOTATION: &str = "ocr.serving.dev/config-hash";
pub const WORKER_MODE_ENV: &str = "OCR_WORKER__MODE";
pub const WRITER_RETRIES_ENV: &str = "OCR_WRITER__RETRIES";
pub const WRITER_RETRY_INITIAL_ENV: &str = "OCR_WRITER__RETRY_INITIAL_MS";
pub const WRITER_RETRY_MAX_ENV: &str = "OCR_WRITER__RETRY_MAX_MS";
pub const WEBHOOK_URL_ENV: &str = "OCR_WRITER__WEBHOOK_URL";
pub const WEBHOOK_TIMEOUT_ENV: &str = "OCR_WRITER__WEBHOOK_TIMEOUT_MS";
pub const WEBHOOK_SECRET_ENV: &str = "OCR_WRITER__WEBHOOK_SECRET";
pub const SASL_USERNAME_ENV: &str = "OCR_QUEUE__SECURITY__SASL_USERNAME";
pub const SASL_PASSWORD_ENV: &str = "OCR_QUEUE__SECURITY__SASL_PASSWORD";
pub const SSL_CA_PEM_ENV: &str = "OCR_QUEUE__SECURITY__SSL_CA_PEM";
pub const CONFIG_PATH: &str = "/etc/ocr/ocr.toml";
pub const MODEL_DIR: &str = "/models";
/// Where `spec.blob.volume` is mounted in every role.
pub const BLOB_DIR: &str = "/var/lib/ocr/blobs";
/// The runtime image's user and group (see the Dockerfile's `USER
/// 65532:65532`); every container of a pipeline pod runs as them, and shared
/// volumes are made writable for them through `fsGroup`.
pub const RUNTIME_UID: i64 = 65532;
/// An `emptyDir` in every runtime container: the root filesystem is read-only.
pub const TMP_DIR: &str = "/tmp";
/// The field manager that keeps a Deployment's `spec.replicas` while an
/// autoscaler takes the count over (see [`replicas_handover`]).
pub const REPLICAS_HANDOVER_MANAGER: &str = "ocr-operator-replicas-handover";
pub const GRPC_PORT: i32 = 50051;
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the pipeline has no {0}")]
    MissingMetadata(&'static str),
    #[error("rendering ocr.toml: {0}")]
    Toml(#[from] toml::ser::Error),
    #[error("serializing {kind} {name}: {source}")]
    Serialize {
        kind: &'static str,
        name: String,
        source: serde_json::Error,
    },
}

/// What the cluster offers beyond core Kubernetes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// KEDA's `ScaledObject` CRD is installed.
    pub keda: bool,
}

/// Every kind the operator creates; orphan cleanup lists exactly these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ManagedKind {
    ConfigMap,
    Service,
    Deployment,
    PodDisruptionBudget,
    HorizontalPodAutoscaler,
    ScaledObject,
    /// Credentials for the ScaledObject's Kafka trigger.
    TriggerAuthentication,
}

impl ManagedKind {
    pub const ALL: [ManagedKind; 7] = [
        ManagedKind::ConfigMap,
        ManagedKind::Service,
        ManagedKind::Deployment,
        ManagedKind::PodDisruptionBudget,
        ManagedKind::HorizontalPodAutoscaler,
        ManagedKind::ScaledObject,
        ManagedKind::TriggerAuthentication,
    ];

    /// Kinds that exist only where KEDA is installed.
    pub fn needs_keda(self) -> bool {
        matches!(
            self,
            ManagedKind::ScaledObject | ManagedKind::TriggerAuthentication
        )
    }

    pub fn api_resource(self) -> ApiResource {
        match self {
            ManagedKind::ConfigMap => ApiResource::erase::<ConfigMap>(&()),
            ManagedKind::Service => ApiResource::erase::<Service>(&()),
            ManagedKind::Deployment => ApiResource::erase::<Deployment>(&()),
            ManagedKind::PodDisruptionBudget => ApiResource::erase::<PodDisruptionBudget>(&()),
            ManagedKind::HorizontalPodAutoscaler => {
                ApiResource::erase::<HorizontalPodAutoscaler>(&())
            }
            ManagedKind::ScaledObject => keda_resource("ScaledObject", "scaledobjects"),
            ManagedKind::TriggerAuthentication => {
                keda_resource("TriggerAuthentication", "triggerauthentications")
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ManagedKind::ConfigMap => "ConfigMap",
            ManagedKind::Service => "Service",
            ManagedKind::Deployment => "Deployment",
            ManagedKind::PodDisruptionBudget => "PodDisruptionBudget",
            ManagedKind::HorizontalPodAutoscaler => "HorizontalPodAutoscaler",
            ManagedKind::ScaledObject => "ScaledObject",
            ManagedKind::TriggerAuthentication => "TriggerAuthentication",
        }
    }
}

/// KEDA's CRDs have no Rust types here; they are applied as dynamic objects.
fn keda_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "keda.sh".into(),
        version: "v1alpha1".into(),
        api_version: "keda.sh/v1alpha1".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// One object to server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredObject {
    pub kind: ManagedKind,
    pub name: String,
    pub body: Value,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rendered {
    pub objects: Vec<DesiredObject>,
    /// Parts of the spec the cluster cannot honour (e.g. lag autoscaling without KEDA).
    pub warnings: Vec<String>,
}

impl Rendered {
    /// All objects as one multi-document YAML, in render order.
    pub fn to_yaml(&self) -> Result<String, serde_yaml::Error> {
        let mut out = String::new();
        for object in &self.objects {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&object.body)?);
        }
        Ok(out)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Api,
    Worker,
    Writer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Worker => "worker",
            Role::Writer => "writer",
        }
    }

    pub fn from_label(value: &str) -> Option<Role> {
        match value {
            "api" => Some(Role::Api),
            "worker" => Some(Role::Worker),
            "writer" => Some(Role::Writer),
            _ => None,
        }
    }
}

pub fn object_name(pipeline: &str, suffix: &str) -> String {
    format!("{pipeline}-{suffix}")
}

/// Labels on every object of a pipeline; cleanup selects on the last two.
pub fn labels(pipeline: &str, component: &str) -> BTreeMap<String, String> {
    let mut labels = selector_labels(pipeline, component);
    labels.insert(MANAGED_BY_LABEL.into(), MANAGER.into());
    labels.insert(PIPELINE_LABEL.into(), pipeline.into());
    labels
}

fn selector_labels(pipeline: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "ocr".to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            pipeline.to_string(),
        ),
        (COMPONENT_LABEL.to_string(), component.to_string()),
    ])
}

/// The label selector of one role's Deployment, as a list selector: it finds
/// the role's pods, terminating ones included.
pub fn role_selector(pipeline: &str, role: Role) -> String {
    selector_labels(pipeline, role.as_str())
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The label selector that finds everything this operator made for `pipeline`.
pub fn owned_selector(pipeline: &str) -> String {
    format!("{MANAGED_BY_LABEL}={MANAGER},{PIPELINE_LABEL}={pipeline}")
}

/// Topics the pipeline needs while `plan` is in force.
pub fn desired_topics(pipeline: &OcrPipeline, results: bool) -> Vec<String> {
    let queues = pipeline.queues();
    let mut out = vec![queues.jobs_topic];
    if results {
        out.push(queues.results_topic);
    }
    out.push(queues.dead_letter_topic);
    out
}

struct Ctx<'a> {
    p: &'a OcrPipeline,
    name: String,
    namespace: String,
    config_hash: String,
}

impl Ctx<'_> {
    fn meta(&self, suffix: &str, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(object_name(&self.name, suffix)),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels(&self.name, component)),
            owner_references: self.p.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        }
    }
}

pub fn render(p: &OcrPipeline, plan: &Plan, caps: Capabilities) -> Result<Rendered, BuildError> {
    let name = p
        .metadata
        .name
        .clone()
        .ok_or(BuildError::MissingMetadata("name"))?;
    let namespace = p
        .namespace()
        .ok_or(BuildError::MissingMetadata("namespace"))?;
    let toml = runtime_config(p)?;
    let ctx = Ctx {
        p,
        name,
        namespace,
        config_hash: format!("{:016x}", fnv1a64(toml.as_bytes())),
    };
    let mut out = Rendered::default();
    push(&mut out, ManagedKind::ConfigMap, &config_map(&ctx, toml))?;

    let api_hpa = p.spec.autoscaling.api.as_ref();
    push(
        &mut out,
        ManagedKind::Deployment,
        &deployment(&ctx, Role::Api, api_hpa.is_none(), plan)?,
    )?;
    push(&mut out, ManagedKind::Service, &api_service(&ctx))?;
    push(
        &mut out,
        ManagedKind::PodDisruptionBudget,
        &pdb(&ctx, Role::Api),
    )?;
    if let Some(scaling) = api_hpa {
        push(
            &mut out,
            ManagedKind::HorizontalPodAutoscaler,
            &api_hpa_object(&ctx, scaling),
        )?;
    }

    let worker_keda = match (&p.spec.autoscaling.worker, caps.keda) {
        (Some(scaling), true) => Some(scaling),
        (Some(_), false) => {
            out.warnings.push(
                "autoscaling.worker is set but KEDA is not installed: workers keep spec.worker.replicas"
                    .into(),
            );
            None
        }
        (None, _) => None,
    };
    push(
        &mut out,
        ManagedKind::Deployment,
        &deployment(&ctx, Role::Worker, worker_keda.is_none(), plan)?,
    )?;
    push(
        &mut out,
        ManagedKind::PodDisruptionBudget,
        &pdb(&ctx, Role::Worker),
    )?;
    if let Some(scaling) = worker_keda {
        let name = object_name(&ctx.name, Role::Worker.as_str());
        let auth = worker_trigger_authentication(&ctx);
        let body = worker_scaled_object(&ctx, scaling, auth.is_some());
        if let Some(auth) = auth {
            out.objects.push(DesiredObject {
                kind: ManagedKind::TriggerAuthentication,
                name: name.clone(),
                body: auth,
            });
        }
        out.objects.push(DesiredObject {
            kind: ManagedKind::ScaledObject,
            name,
            body,
        });
    }

    if plan.writer {
        push(
            &mut out,
            ManagedKind::Deployment,
            &deployment(&ctx, Role::Writer, true, plan)?,
        )?;
        push(
            &mut out,
            ManagedKind::PodDisruptionBudget,
            &pdb(&ctx, Role::Writer),
        )?;
    }
    Ok(out)
}

fn push<T: Serialize + Resource>(
    out: &mut Rendered,
    kind: ManagedKind,
    object: &T,
) -> Result<(), BuildError>
where
    T::DynamicType: Default,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let mut body = serde_json::to_value(object).map_err(|source| BuildError::Serialize {
        kind: kind.name(),
        name: name.clone(),
        source,
    })?;
    // k8s-openapi types serialise without apiVersion/kind; server-side apply needs both.
    if let Value::Object(map) = &mut body {
        let dt = T::DynamicType::default();
        map.insert(
            "apiVersion".into(),
            Value::String(T::api_version(&dt).into()),
        );
        map.insert("kind".into(), Value::String(T::kind(&dt).into()));
    }
    out.objects.push(DesiredObject { kind, name, body });
    Ok(())
}

/// FNV-1a: stable across Rust releases (std's hasher is not), so snapshots and
/// pod-template annotations do not change with the compiler.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[derive(Serialize)]
struct RuntimeToml {
    server: ServerToml,
    blob: BlobToml,
    queue: QueueToml,
    worker: WorkerToml,
    model: ModelToml,
    #[serde(skip_serializing_if = "Option::is_none")]
    redis: Option<RedisToml>,
}

#[derive(Serialize)]
struct ServerToml {
    http_addr: String,
    grpc_addr: String,
}

#[derive(Serialize)]
struct BlobToml {
    url: String,
}

#[derive(Serialize)]
struct QueueToml {
    kind: &'static str,
    brokers: String,
    jobs_topic: String,
    results_topic: String,
    dead_letter_topic: String,
    consumer_group: String,
    writer_group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    security: Option<KafkaSecurityToml>,
}

/// The non-secret half of `queue.security`; credentials and the CA arrive as
/// environment variables from their Secrets (see [`kafka_env`]).
#[derive(Serialize)]
struct KafkaSecurityToml {
    protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sasl_mechanism: Option<&'static str>,
}

/// `worker.mode` is not here: it is set per Deployment through `OCR_WORKER__MODE`,
/// so a migration rolls only the workers and not every pod sharing this file.
#[derive(Serialize)]
struct WorkerToml {
    max_attempts: i32,
    max_batch_size: i32,
    max_wait_ms: i32,
    batches_in_flight: i32,
}

#[derive(Serialize)]
struct ModelToml {
    dir: &'static str,
    variant: &'static str,
    device: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    det_limit_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    det_limit_side_len: Option<i32>,
    precision: &'static str,
}

/// The URL comes from a secret (`OCR_REDIS__URL`), never from the ConfigMap.
#[derive(Serialize)]
struct RedisToml {
    requests_per_minute: i32,
}

/// The runtime's `ocr.toml`; keys follow `docs/configuration.md`.
pub fn runtime_config(p: &OcrPipeline) -> Result<String, toml::ser::Error> {
    let s = &p.spec;
    let queues = p.queues();
    let config = RuntimeToml {
        server: ServerToml {
            http_addr: format!("0.0.0.0:{}", s.observability.metrics_port),
            grpc_addr: format!("0.0.0.0:{GRPC_PORT}"),
        },
        blob: BlobToml {
            url: match &s.blob.s3 {
                Some(s3) => s3.url(),
                None => format!("file://{BLOB_DIR}"),
            },
        },
        queue: QueueToml {
            kind: "kafka",
            brokers: s.kafka.bootstrap_servers.clone(),
            jobs_topic: queues.jobs_topic,
            results_topic: queues.results_topic,
            dead_letter_topic: queues.dead_letter_topic,
            consumer_group: queues.consumer_group,
            writer_group: queues.writer_group,
            security: (!s.kafka.security.is_plaintext()).then(|| KafkaSecurityToml {
                protocol: s.kafka.security.protocol(),
                sasl_mechanism: s
                    .kafka
                    .security
                    .sasl
                    .as_ref()
                    .map(|sasl| sasl.mechanism.as_str()),
            }),
        },
        worker: WorkerToml {
            max_attempts: s.worker.max_attempts,
            max_batch_size: s.worker.batching.max_batch_size,
            max_wait_ms: s.worker.batching.max_wait_ms,
            batches_in_flight: s.worker.batching.in_flight.unwrap_or(match s.model.device {
                Device::Cuda => 2,
                Device::Cpu => 1,
            }),
        },
        model: ModelToml {
            dir: MODEL_DIR,
            variant: s.model.variant.as_str(),
            device: match s.model.device {
                Device::Cpu => "cpu",
                Device::Cuda => "cuda",
            },
            det_limit_type: s.model.detection.as_ref().map(|d| d.limit_type.as_str()),
            det_limit_side_len: s.model.detection.as_ref().map(|d| d.limit_side_len),
            precision: s.model.effective_precision().as_str(),
        },
        redis: s.redis.as_ref().map(|r| RedisToml {
            requests_per_minute: r.requests_per_minute,
        }),
    };
    toml::to_string(&config)
}

fn config_map(ctx: &Ctx, toml: String) -> ConfigMap {
    ConfigMap {
        metadata: ctx.meta("config", "config"),
        data: Some(BTreeMap::from([("ocr.toml".to_string(), toml)])),
        ..ConfigMap::default()
    }
}

fn secret_env(name: &str, secret_name: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret_name.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Kafka credentials and CA for every role (all of them produce or consume),
/// straight from the user's Secrets so they never land in the ConfigMap.
fn kafka_env(ctx: &Ctx) -> Vec<EnvVar> {
    let security = &ctx.p.spec.kafka.security;
    let mut out = Vec::new();
    if let Some(sasl) = &security.sasl {
        out.push(match &sasl.username {
            Some(username) => env(SASL_USERNAME_ENV, username.clone()),
            None => secret_env(SASL_USERNAME_ENV, &sasl.secret, &sasl.username_key),
        });
        out.push(secret_env(
            SASL_PASSWORD_ENV,
            &sasl.secret,
            &sasl.password_key,
        ));
    }
    if let Some(ca_secret) = security.tls.as_ref().and_then(|tls| {
        tls.ca_secret
            .as_ref()
            .map(|name| (name.as_str(), tls.ca_key.as_str()))
    }) {
        out.push(secret_env(SSL_CA_PEM_ENV, ca_secret.0, ca_secret.1));
    }
    out
}

/// The S3 client settings every role needs (the API writes inputs, workers
/// read them, writers store results), in the standard `AWS_*` variables the
/// runtime's S3 client reads.
fn blob_env(ctx: &Ctx) -> Vec<EnvVar> {
    let Some(s3) = &ctx.p.spec.blob.s3 else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(endpoint) = &s3.endpoint {
        out.push(env("AWS_ENDPOINT", endpoint.clone()));
        if endpoint.starts_with("http://") {
            out.push(env("AWS_ALLOW_HTTP", "true"));
        }
    }
    if let Some(region) = &s3.region {
        out.push(env("AWS_REGION", region.clone()));
    }
    if let Some(secret) = &s3.credentials_secret {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            out.push(secret_env(key, secret, key));
        }
    }
    out
}

/// `writer.*` keys, on the writer Deployment only: only writers read them, so
/// changing one rolls the writers and not the API or the GPU workers (which a
/// change of the shared ConfigMap would, through the config hash).
fn writer_env(ctx: &Ctx) -> Vec<EnvVar> {
    let writer = &ctx.p.spec.writer;
    let mut out = vec![
        env(WRITER_RETRIES_ENV, writer.retries.to_string()),
        env(
            WRITER_RETRY_INITIAL_ENV,
            writer.retry_initial_ms.to_string(),
        ),
        env(WRITER_RETRY_MAX_ENV, writer.retry_max_ms.to_string()),
    ];
    if let Some(webhook) = &writer.webhook {
        out.push(env(WEBHOOK_URL_ENV, webhook.url.clone()));
        out.push(env(WEBHOOK_TIMEOUT_ENV, webhook.timeout_ms.to_string()));
        if let Some(secret) = &webhook.secret {
            out.push(secret_env(WEBHOOK_SECRET_ENV, &secret.name, &secret.key));
        }
    }
    out
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// Holds liveness and readiness off until `/livez` answers: a worker serves
/// HTTP only once its model is loaded (minutes for a large model on slow
/// storage or a first CUDA initialisation), the API and the writer once
/// their database is connected and migrated. Liveness alone would restart
/// them after a minute.
fn startup_probe(role: Role) -> Probe {
    let failures = match role {
        // 10 minutes.
        Role::Worker => 120,
        // 2 minutes.
        Role::Api | Role::Writer => 24,
    };
    http_probe("/livez", 5, failures)
}

/// CPU and memory requests a role gets when its `resources` leave them out
/// (documented on the CRD's `resources` fields).
pub fn default_requests(role: Role, device: Device) -> [(&'static str, &'static str); 2] {
    match (role, device) {
        (Role::Api, _) => [("cpu", "250m"), ("memory", "256Mi")],
        (Role::Worker, Device::Cpu) => [("cpu", "1"), ("memory", "1Gi")],
        (Role::Worker, Device::Cuda) => [("cpu", "1"), ("memory", "2Gi")],
        (Role::Writer, _) => [("cpu", "100m"), ("memory", "128Mi")],
    }
}

/// Requests of the model download: curl piped into tar.
const FETCHER_REQUESTS: [(&str, &str); 2] = [("cpu", "100m"), ("memory", "64Mi")];

/// The user's resources with a request added for each of `defaults` that
/// they neither request nor limit (a limit alone makes Kubernetes request
/// the limit, and a lower default would change the pod's QoS class).
fn with_default_requests(
    resources: Option<&ResourceRequirements>,
    defaults: &[(&str, &str)],
) -> ResourceRequirements {
    let mut out = resources.cloned().unwrap_or_default();
    for (name, quantity) in defaults {
        let limited = out.limits.as_ref().is_some_and(|l| l.contains_key(*name));
        let requested = out.requests.as_ref().is_some_and(|r| r.contains_key(*name));
        if !limited && !requested {
            out.requests
                .get_or_insert_with(BTreeMap::new)
                .insert((*name).into(), Quantity((*quantity).into()));
        }
    }
    out
}

fn role_resources(ctx: &Ctx, role: Role) -> ResourceRequirements {
    let spec = &ctx.p.spec;
    let user = match role {
        Role::Api => spec.api.resources.as_ref(),
        Role::Worker => spec.worker.resources.as_ref(),
        Role::Writer => spec.writer.resources.as_ref(),
    };
    let defaults = default_requests(role, spec.model.device);
    let mut resources = with_default_requests(user, &defaults);
    if role == Role::Worker && spec.model.device == Device::Cuda {
        resources.limits.get_or_insert_with(BTreeMap::new).insert(
            GPU_RESOURCE.into(),
            Quantity(spec.worker.gpus_per_pod.to_string()),
        );
    }
    resources
}

/// Pod Security `restricted`, pod side: non-root as the image's user, the
/// runtime's default seccomp profile.
fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUNTIME_UID),
        run_as_group: Some(RUNTIME_UID),
        fs_group: Some(RUNTIME_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

/// Pod Security `restricted`, container side, for every container (init
/// containers included): no privilege escalation, no capabilities, and a
/// read-only root filesystem (the containers write only to their volumes).
fn container_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(LinuxCapabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        ..SecurityContext::default()
    }
}

/// Whether `manager` owns the live object's `spec.replicas` through
/// server-side apply.
fn applies_replicas(live: &Deployment, manager: &str) -> bool {
    live.metadata.managed_fields.iter().flatten().any(|entry| {
        entry.manager.as_deref() == Some(manager)
            && entry.operation.as_deref() == Some("Apply")
            && entry.subresource.as_deref().unwrap_or("").is_empty()
            && entry.fields_v1.as_ref().is_some_and(|f| {
                f.0.get("f:spec")
                    .and_then(|s| s.get("f:replicas"))
                    .is_some()
            })
    })
}

/// The apply that keeps a Deployment's replica count when an autoscaler
/// takes it over, to be sent (not forced) with [`REPLICAS_HANDOVER_MANAGER`]
/// before `desired`.
///
/// `desired` leaves `spec.replicas` out once an autoscaler owns the count.
/// While the operator's own apply still owns the field (autoscaling was just
/// switched on), that apply alone would remove it, and the Deployment would
/// fall back to the default of 1 replica until the autoscaler acts. Applying
/// the live count under a second manager first keeps the field owned, at its
/// value; the autoscaler's first scale takes it from that manager.
/// `None` when there is nothing to hand over.
pub fn replicas_handover(desired: &DesiredObject, live: Option<&Deployment>) -> Option<Value> {
    if desired.kind != ManagedKind::Deployment || desired.body.pointer("/spec/replicas").is_some() {
        return None;
    }
    let live = live?;
    let replicas = live.spec.as_ref()?.replicas?;
    if !applies_replicas(live, MANAGER) {
        return None;
    }
    Some(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": desired.name},
        "spec": {"replicas": replicas},
    }))
}

fn anti_affinity(ctx: &Ctx, role: Role) -> Option<Affinity> {
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(&ctx.name, role.as_str())),
            ..LabelSelector::default()
        }),
        topology_key: "kubernetes.io/hostname".into(),
        ..PodAffinityTerm::default()
    };
    let pod_anti_affinity = match ctx.p.spec.availability.anti_affinity {
        AntiAffinity::None => return None,
        AntiAffinity::Preferred => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..PodAntiAffinity::default()
        },
        AntiAffinity::Required => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
    };
    Some(Affinity {
        pod_anti_affinity: Some(pod_anti_affinity),
        ..Affinity::default()
    })
}

fn deployment(
    ctx: &Ctx,
    role: Role,
    set_replicas: bool,
    plan: &Plan,
) -> Result<Deployment, BuildError> {
    let spec = &ctx.p.spec;
    let component = role.as_str();
    let port = spec.observability.metrics_port;

    let mut env_vars = vec![
        env("OCR_CONFIG", CONFIG_PATH),
        env("OCR_LOG_FORMAT", "json"),
        secret_env(
            "OCR_DATABASE__URL",
            &spec.database.secret.name,
            &spec.database.secret.key,
        ),
    ];
    env_vars.extend(kafka_env(ctx));
    env_vars.extend(blob_env(ctx));
    if let Some(redis) = &spec.redis {
        env_vars.push(secret_env(
            "OCR_REDIS__URL",
            &redis.secret.name,
            &redis.secret.key,
        ));
    }
    if role == Role::Worker {
        env_vars.push(env(WORKER_MODE_ENV, plan.worker_mode.as_str()));
    }
    if role == Role::Writer {
        env_vars.extend(writer_env(ctx));
    }
    if let Some(endpoint) = &spec.observability.otlp_endpoint {
        env_vars.push(env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()));
        env_vars.push(env("OTEL_SERVICE_NAME", format!("ocr-{component}")));
    }

    let mut ports = vec![ContainerPort {
        name: Some("http".into()),
        container_port: port,
        ..ContainerPort::default()
    }];
    if role == Role::Api {
        ports.push(ContainerPort {
            name: Some("grpc".into()),
            container_port: GRPC_PORT,
            ..ContainerPort::default()
        });
    }

    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: "/etc/ocr".into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: object_name(&ctx.name, "config"),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(blob_volume) = &spec.blob.volume {
        mounts.push(VolumeMount {
            name: "blobs".into(),
            mount_path: BLOB_DIR.into(),
            sub_path: blob_volume.sub_path.clone(),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "blobs".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: blob_volume.claim_name.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
    }
    let mut init_containers = Vec::new();
    if role == Role::Worker {
        let source = &spec.model.source;
        mounts.push(VolumeMount {
            name: "models".into(),
            mount_path: MODEL_DIR.into(),
            read_only: Some(true),
            sub_path: source.volume.as_ref().and_then(|v| v.sub_path.clone()),
            ..VolumeMount::default()
        });
        match (&source.volume, &source.url) {
            (Some(volume), _) => volumes.push(Volume {
                name: "models".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: volume.claim_name.clone(),
                    read_only: Some(true),
                }),
                ..Volume::default()
            }),
            (None, url) => {
                volumes.push(Volume {
                    name: "models".into(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                });
                if let Some(url) = url {
                    init_containers.push(Container {
                        name: "fetch-model".into(),
                        image: Some(spec.images.model_fetcher.clone()),
                        image_pull_policy: Some(spec.images.pull_policy.as_str().into()),
                        command: Some(vec![
                            "sh".into(),
                            "-c".into(),
                            "set -eu; curl -fsSL --retry 5 \"$MODEL_URL\" | tar -xzf - -C /models"
                                .into(),
                        ]),
                        env: Some(vec![env("MODEL_URL", url.clone())]),
                        volume_mounts: Some(vec![VolumeMount {
                            name: "models".into(),
                            mount_path: MODEL_DIR.into(),
                            ..VolumeMount::default()
                        }]),
                        resources: Some(with_default_requests(None, &FETCHER_REQUESTS)),
                        security_context: Some(container_security_context()),
                        ..Container::default()
                    });
                }
            }
        }
    }

    mounts.push(VolumeMount {
        name: "tmp".into(),
        mount_path: TMP_DIR.into(),
        ..VolumeMount::default()
    });
    volumes.push(Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });

    let (replicas, grace) = match role {
        Role::Api => (spec.api.replicas, 30),
        Role::Worker => (spec.worker.replicas, 60),
        Role::Writer => (spec.writer.replicas, 60),
    };

    let container = Container {
        name: component.into(),
        image: Some(
            spec.images
                .runtime_image(role == Role::Worker && spec.model.device == Device::Cuda),
        ),
        image_pull_policy: Some(spec.images.pull_policy.as_str().into()),
        args: Some(vec![component.into()]),
        env: Some(env_vars),
        ports: Some(ports),
        startup_probe: Some(startup_probe(role)),
        liveness_probe: Some(http_probe("/livez", 10, 6)),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        resources: Some(role_resources(ctx, role)),
        volume_mounts: Some(mounts),
        security_context: Some(container_security_context()),
        ..Container::default()
    };

    let (node_selector, tolerations) = if role == Role::Worker {
        (
            Some(spec.worker.node_selector.clone()).filter(|m| !m.is_empty()),
            Some(spec.worker.tolerations.clone()).filter(|t| !t.is_empty()),
        )
    } else {
        (None, None)
    };

    let annotations = BTreeMap::from([
        (CONFIG_HASH_ANNOTATION.to_string(), ctx.config_hash.clone()),
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), port.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);

    // Workers hold GPUs, which are rarely free for a surge pod: replace in place.
    // API and writer pods are cheap: surge so capacity never drops.
    let (max_surge, max_unavailable) = match role {
        Role::Worker => (IntOrString::Int(0), IntOrString::Int(1)),
        Role::Api | Role::Writer => (IntOrString::Int(1), IntOrString::Int(0)),
    };

    let pull_secrets = Some(
        spec.images
            .pull_secrets
            .iter()
            .map(|name| LocalObjectReference { name: name.clone() })
            .collect::<Vec<_>>(),
    )
    .filter(|v| !v.is_empty());

    Ok(Deployment {
        metadata: ctx.meta(component, component),
        spec: Some(DeploymentSpec {
            // Left out when an autoscaler owns the count, so applies do not
            // fight it; `replicas_handover` keeps the count when it changes hands.
            replicas: set_replicas.then_some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&ctx.name, component)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(max_surge),
                    max_unavailable: Some(max_unavailable),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(&ctx.name, component)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    init_containers: Some(init_containers).filter(|c| !c.is_empty()),
                    volumes: Some(volumes),
                    affinity: anti_affinity(ctx, role),
                    node_selector,
                    tolerations,
                    image_pull_secrets: pull_secrets,
                    termination_grace_period_seconds: Some(grace),
                    security_context: Some(pod_security_context()),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

fn api_service(ctx: &Ctx) -> Service {
    let spec = &ctx.p.spec.api.service;
    Service {
        metadata: ctx.meta("api", "api"),
        spec: Some(ServiceSpec {
            type_: Some(spec.type_.as_str().into()),
            selector: Some(selector_labels(&ctx.name, "api")),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: spec.port,
                    target_port: Some(IntOrString::String("http".into())),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("grpc".into()),
                    port: GRPC_PORT,
                    target_port: Some(IntOrString::String("grpc".into())),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn pdb(ctx: &Ctx, role: Role) -> PodDisruptionBudget {
    let budget = &ctx.p.spec.availability.disruption_budget;
    let (min_available, max_unavailable) = match (&budget.min_available, &budget.max_unavailable) {
        (None, None) => (None, Some(IntOrString::Int(1))),
        (min, max) => (min.clone(), max.clone()),
    };
    PodDisruptionBudget {
        metadata: ctx.meta(role.as_str(), role.as_str()),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&ctx.name, role.as_str())),
                ..LabelSelector::default()
            }),
            min_available,
            max_unavailable,
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn api_hpa_object(ctx: &Ctx, scaling: &crate::crd::CpuScaling) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: ctx.meta("api", "api"),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: object_name(&ctx.name, "api"),
            },
            min_replicas: Some(scaling.min_replicas),
            max_replicas: scaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(scaling.target_cpu_utilization),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

/// KEDA's Kafka scaler reads the brokers itself, so a secured cluster needs
/// the same credentials handed to it; `None` for a plaintext cluster or TLS
/// with the system CAs.
fn worker_trigger_authentication(ctx: &Ctx) -> Option<Value> {
    let security = &ctx.p.spec.kafka.security;
    let mut secret_refs = Vec::new();
    let mut env_refs = Vec::new();
    if let Some(sasl) = &security.sasl {
        match &sasl.username {
            // Not in a Secret: KEDA reads it from the worker container's env.
            Some(_) => env_refs.push(json!({
                "parameter": "username",
                "name": SASL_USERNAME_ENV,
                "containerName": Role::Worker.as_str(),
            })),
            None => secret_refs.push(json!({
                "parameter": "username", "name": sasl.secret, "key": sasl.username_key,
            })),
        }
        secret_refs.push(json!({
            "parameter": "password", "name": sasl.secret, "key": sasl.password_key,
        }));
    }
    if let Some(tls) = &security.tls {
        if let Some(ca_secret) = &tls.ca_secret {
            secret_refs.push(json!({"parameter": "ca", "name": ca_secret, "key": tls.ca_key}));
        }
    }
    if secret_refs.is_empty() && env_refs.is_empty() {
        return None;
    }
    let mut spec = serde_json::Map::new();
    if !secret_refs.is_empty() {
        spec.insert("secretTargetRef".into(), Value::Array(secret_refs));
    }
    if !env_refs.is_empty() {
        spec.insert("env".into(), Value::Array(env_refs));
    }
    Some(json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": ctx.meta("worker", "worker"),
        "spec": spec,
    }))
}

fn worker_scaled_object(ctx: &Ctx, scaling: &crate::crd::LagScaling, authenticated: bool) -> Value {
    let spec = &ctx.p.spec;
    let meta = ctx.meta("worker", "worker");
    // A consumer beyond the partition count gets no partition and sits idle.
    let max = scaling.max_replicas.min(spec.kafka.partitions);
    let security = &spec.kafka.security;
    let queues = ctx.p.queues();
    let mut trigger_metadata = json!({
        "bootstrapServers": spec.kafka.bootstrap_servers,
        "consumerGroup": queues.consumer_group,
        "topic": queues.jobs_topic,
        "lagThreshold": scaling.lag_threshold.to_string(),
    });
    if let Some(sasl) = &security.sasl {
        trigger_metadata["sasl"] = json!(sasl.mechanism.keda_name());
    }
    if security.tls.is_some() {
        trigger_metadata["tls"] = json!("enable");
    }
    let mut trigger = json!({"type": "kafka", "metadata": trigger_metadata});
    if authenticated {
        trigger["authenticationRef"] = json!({"name": object_name(&ctx.name, "worker")});
    }
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"name": object_name(&ctx.name, "worker")},
            "minReplicaCount": scaling.min_replicas.min(max),
            "maxReplicaCount": max,
            "triggers": [trigger],
        },
    })
}

/// Whether the results topic is still in use: by the writer, or by either end of a migration.
pub fn needs_results_topic(plan: &Plan) -> bool {
    plan.writer
        || plan.architecture == Architecture::Writer
        || plan
            .migration
            .as_ref()
            .is_some_and(|m| m.to == Architecture::Writer || m.from == Architecture::Writer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::{step, Observed};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};
    use k8s_openapi::jiff::Timestamp;

    /// A pipeline with every container kind: the model comes by URL, so
    /// workers have the `fetch-model` init container.
    fn pipeline(extra: Value) -> OcrPipeline {
        let mut spec = json!({
            "architecture": "writer",
            "model": {"source": {"url": "https://models.example/v6.tar.gz"}},
            "kafka": {"bootstrapServers": "kafka:9092"},
            "database": {"secret": {"name": "db"}},
            "blob": {"volume": {"claimName": "blobs"}},
        });
        merge(&mut spec, extra);
        serde_json::from_value(json!({
            "apiVersion": "ocr.serving.dev/v1alpha1",
            "kind": "OcrPipeline",
            "metadata": {"name": "demo", "namespace": "ocr", "uid": "u-1"},
            "spec": spec,
        }))
        .expect("a valid pipeline")
    }

    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn rendered(p: &OcrPipeline) -> Rendered {
        let now = Time(Timestamp::from_second(1_800_000_000).expect("a timestamp"));
        let plan = step(None, None, p.spec.architecture, &Observed::default(), &now);
        render(p, &plan, Capabilities { keda: true }).expect("renders")
    }

    fn deployment(r: &Rendered, role: Role) -> &Value {
        let name = object_name("demo", role.as_str());
        r.objects
            .iter()
            .find(|o| o.kind == ManagedKind::Deployment && o.name == name)
            .map(|o| &o.body)
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    }

    fn container<'a>(d: &'a Value, name: &str) -> &'a Value {
        d["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// The checks of Pod Security Standards `restricted` (Kubernetes 1.36,
    /// "restricted:latest") that a pod template can fail; the reasons are the
    /// admission plugin's.
    fn restricted_violations(pod: &Value) -> Vec<String> {
        let mut out = Vec::new();
        let psc = &pod["securityContext"];
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            if pod[host] == true {
                out.push(format!("host namespaces ({host})"));
            }
        }
        let allowed_volumes = [
            "configMap",
            "csi",
            "downwardAPI",
            "emptyDir",
            "ephemeral",
            "persistentVolumeClaim",
            "projected",
            "secret",
        ];
        for volume in pod["volumes"].as_array().into_iter().flatten() {
            for key in volume.as_object().into_iter().flatten().map(|(k, _)| k) {
                if key != "name" && !allowed_volumes.contains(&key.as_str()) {
                    out.push(format!("restricted volume types ({key})"));
                }
            }
        }
        if psc["runAsUser"] == 0 {
            out.push("runAsUser=0 (pod)".into());
        }
        let pod_seccomp = psc["seccompProfile"]["type"].as_str();
        if pod_seccomp == Some("Unconfined") {
            out.push("seccompProfile (pod Unconfined)".into());
        }
        let containers = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| pod[*k].as_array().cloned().unwrap_or_default());
        for c in containers {
            let name = c["name"].as_str().unwrap_or("?").to_owned();
            let sc = &c["securityContext"];
            if sc["privileged"] == true {
                out.push(format!("privileged ({name})"));
            }
            if sc["allowPrivilegeEscalation"] != false {
                out.push(format!("allowPrivilegeEscalation != false ({name})"));
            }
            let drop = sc["capabilities"]["drop"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !drop.iter().any(|d| d == "ALL") {
                out.push(format!(
                    "unrestricted capabilities: not dropping ALL ({name})"
                ));
            }
            for add in sc["capabilities"]["add"].as_array().into_iter().flatten() {
                if add != "NET_BIND_SERVICE" {
                    out.push(format!("unrestricted capabilities: adds {add} ({name})"));
                }
            }
            let non_root = match sc["runAsNonRoot"].as_bool() {
                Some(v) => v,
                None => psc["runAsNonRoot"] == true,
            };
            if !non_root {
                out.push(format!("runAsNonRoot != true ({name})"));
            }
            if sc["runAsUser"] == 0 {
                out.push(format!("runAsUser=0 ({name})"));
            }
            let seccomp = sc["seccompProfile"]["type"].as_str().or(pod_seccomp);
            if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
                out.push(format!("seccompProfile ({name})"));
            }
            for port in c["ports"].as_array().into_iter().flatten() {
                if port["hostPort"].as_i64().unwrap_or(0) != 0 {
                    out.push(format!("hostPort ({name})"));
                }
            }
        }
        out
    }

    fn every_deployment(r: &Rendered) -> impl Iterator<Item = &DesiredObject> {
        r.objects
            .iter()
            .filter(|o| o.kind == ManagedKind::Deployment)
    }

    #[test]
    fn every_container_of_every_pipeline_pod_passes_pod_security_restricted() {
        for extra in [
            json!({}),
            json!({"model": {"device": "cuda"}}),
            json!({"model": {"source": {"url": null, "volume": {"claimName": "models"}}}}),
            json!({"blob": {"volume": null, "s3": {"bucket": "ocr"}}}),
        ] {
            let r = rendered(&pipeline(extra.clone()));
            let mut roles = 0;
            for d in every_deployment(&r) {
                roles += 1;
                let pod = &d.body["spec"]["template"]["spec"];
                assert_eq!(
                    restricted_violations(pod),
                    Vec::<String>::new(),
                    "{} with {extra}",
                    d.name
                );
                let psc = &pod["securityContext"];
                for id in ["runAsUser", "runAsGroup", "fsGroup"] {
                    assert_eq!(psc[id], RUNTIME_UID, "{} {id}: the image's USER", d.name);
                }
                for c in ["initContainers", "containers"]
                    .iter()
                    .flat_map(|k| pod[*k].as_array().cloned().unwrap_or_default())
                {
                    assert_eq!(
                        c["securityContext"]["readOnlyRootFilesystem"], true,
                        "{} {}",
                        d.name, c["name"]
                    );
                }
            }
            assert_eq!(roles, 3, "api, worker and writer rendered");
        }
        let r = rendered(&pipeline(json!({})));
        let init = &deployment(&r, Role::Worker)["spec"]["template"]["spec"]["initContainers"];
        assert_eq!(
            init[0]["name"], "fetch-model",
            "the init container is checked too"
        );
    }

    #[test]
    fn the_checker_catches_what_the_api_server_refused() {
        // The pod template the operator rendered before: fsGroup only, no
        // seccomp, capabilities kept, the init container without any context.
        let pod = json!({
            "securityContext": {"fsGroup": 65532},
            "initContainers": [{"name": "fetch-model"}],
            "containers": [{"name": "worker", "securityContext": {
                "allowPrivilegeEscalation": false, "runAsNonRoot": true}}],
            "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        });
        let found = restricted_violations(&pod);
        for expected in [
            "unrestricted capabilities: not dropping ALL (worker)",
            "seccompProfile (worker)",
            "allowPrivilegeEscalation != false (fetch-model)",
            "runAsNonRoot != true (fetch-model)",
            "restricted volume types (hostPath)",
        ] {
            assert!(
                found.iter().any(|f| f == expected),
                "{expected} in {found:?}"
            );
        }
    }

    #[test]
    fn runtime_containers_write_only_to_volumes() {
        let r = rendered(&pipeline(json!({})));
        for role in [Role::Api, Role::Worker, Role::Writer] {
            let d = deployment(&r, role);
            let mounts = container(d, role.as_str())["volumeMounts"].clone();
            let tmp = mounts
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["mountPath"] == TMP_DIR)
                .unwrap_or_else(|| panic!("{role:?} mounts no /tmp"));
            let volume = d["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == tmp["name"])
                .expect("the /tmp volume");
            assert!(
                volume["emptyDir"].is_object(),
                "{role:?}: /tmp is an emptyDir"
            );
            let blobs = mounts
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["mountPath"] == BLOB_DIR)
                .expect("the blob volume");
            assert_ne!(blobs["readOnly"], true, "{role:?} writes blobs");
        }
        let worker = deployment(&r, Role::Worker);
        let init = &worker["spec"]["template"]["spec"]["initContainers"][0];
        assert_eq!(init["volumeMounts"][0]["mountPath"], MODEL_DIR);
        assert_ne!(
            init["volumeMounts"][0]["readOnly"], true,
            "it unpacks the model there"
        );
    }

    #[test]
    fn roles_get_default_requests_and_keep_what_the_user_set() {
        let requests = |r: &Rendered, role: Role| {
            container(deployment(r, role), role.as_str())["resources"].clone()
        };
        let r = rendered(&pipeline(json!({})));
        assert_eq!(
            requests(&r, Role::Api),
            json!({"requests": {"cpu": "250m", "memory": "256Mi"}})
        );
        assert_eq!(
            requests(&r, Role::Worker),
            json!({"requests": {"cpu": "1", "memory": "1Gi"}})
        );
        assert_eq!(
            requests(&r, Role::Writer),
            json!({"requests": {"cpu": "100m", "memory": "128Mi"}})
        );
        let init = &deployment(&r, Role::Worker)["spec"]["template"]["spec"]["initContainers"][0];
        assert_eq!(
            init["resources"],
            json!({"requests": {"cpu": "100m", "memory": "64Mi"}})
        );

        let gpu = rendered(&pipeline(
            json!({"model": {"device": "cuda"}, "worker": {"gpusPerPod": 2}}),
        ));
        assert_eq!(
            requests(&gpu, Role::Worker),
            json!({"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"nvidia.com/gpu": "2"}})
        );

        let user = rendered(&pipeline(json!({
            "model": {"device": "cuda"},
            "api": {"resources": {"requests": {"memory": "1Gi"}}},
            "worker": {"resources": {"requests": {"cpu": "4"}, "limits": {"memory": "8Gi"}}},
            "writer": {"resources": {"limits": {"cpu": "2", "memory": "1Gi"}}},
        })));
        assert_eq!(
            requests(&user, Role::Api),
            json!({"requests": {"cpu": "250m", "memory": "1Gi"}}),
            "the user's memory request kept, the missing CPU request defaulted"
        );
        assert_eq!(
            requests(&user, Role::Worker),
            json!({"requests": {"cpu": "4"}, "limits": {"memory": "8Gi", "nvidia.com/gpu": "1"}}),
            "a limited resource keeps its limit as request (Kubernetes' rule); the GPU limit stays"
        );
        assert_eq!(
            requests(&user, Role::Writer),
            json!({"limits": {"cpu": "2", "memory": "1Gi"}}),
            "limits alone: Guaranteed QoS stays"
        );
    }

    #[test]
    fn the_api_autoscaler_always_has_a_cpu_request_to_compute_from() {
        for resources in [
            json!(null),
            json!({"requests": {"memory": "512Mi"}}),
            json!({"limits": {"memory": "512Mi"}}),
        ] {
            let r = rendered(&pipeline(json!({
                "api": {"resources": resources},
                "autoscaling": {"api": {"minReplicas": 2, "maxReplicas": 5}},
            })));
            assert!(r
                .objects
                .iter()
                .any(|o| o.kind == ManagedKind::HorizontalPodAutoscaler));
            let api = container(deployment(&r, Role::Api), "api");
            assert_eq!(
                api["resources"]["requests"]["cpu"], "250m",
                "with resources {resources}"
            );
        }
    }

    #[test]
    fn a_slow_start_is_covered_by_a_startup_probe_before_liveness_applies() {
        let r = rendered(&pipeline(json!({})));
        for (role, budget) in [(Role::Worker, 600), (Role::Api, 120), (Role::Writer, 120)] {
            let c = container(deployment(&r, role), role.as_str());
            let startup = &c["startupProbe"];
            assert_eq!(startup["httpGet"]["path"], "/livez", "{role:?}");
            assert_eq!(startup["httpGet"]["port"], "http", "{role:?}");
            let period = startup["periodSeconds"].as_i64().expect("period");
            let failures = startup["failureThreshold"].as_i64().expect("failures");
            assert_eq!(period * failures, budget, "{role:?}: seconds to come up");
            let liveness = &c["livenessProbe"];
            let liveness_budget = liveness["periodSeconds"].as_i64().expect("period")
                * liveness["failureThreshold"].as_i64().expect("failures");
            assert!(
                period * failures > liveness_budget,
                "{role:?}: the startup probe gives more time than liveness would"
            );
        }
    }

    fn live_deployment(replicas: Option<i32>, owners: &[(&str, &str, Value)]) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("demo-api".into()),
                managed_fields: Some(
                    owners
                        .iter()
                        .map(|(manager, operation, fields)| ManagedFieldsEntry {
                            manager: Some((*manager).into()),
                            operation: Some((*operation).into()),
                            api_version: Some("apps/v1".into()),
                            fields_type: Some("FieldsV1".into()),
                            fields_v1: Some(FieldsV1(fields.clone())),
                            ..ManagedFieldsEntry::default()
                        })
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas,
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    fn api_object(r: &Rendered) -> &DesiredObject {
        r.objects
            .iter()
            .find(|o| o.kind == ManagedKind::Deployment && o.name == "demo-api")
            .expect("the API Deployment")
    }

    #[test]
    fn switching_autoscaling_on_hands_the_live_replica_count_over() {
        let ours = json!({"f:spec": {"f:replicas": {}, "f:template": {}}});
        let autoscaled = rendered(&pipeline(json!({
            "api": {"replicas": 4},
            "autoscaling": {"api": {"minReplicas": 1, "maxReplicas": 8}},
        })));
        let desired = api_object(&autoscaled);
        assert!(desired.body.pointer("/spec/replicas").is_none());

        // The operator applied `replicas: 4` until now: its apply without the
        // field would drop it and the Deployment would fall back to 1.
        let live = live_deployment(Some(4), &[(MANAGER, "Apply", ours.clone())]);
        assert_eq!(
            replicas_handover(desired, Some(&live)),
            Some(json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "demo-api"},
                "spec": {"replicas": 4},
            }))
        );

        // Already handed over, or the autoscaler has scaled: nothing to do.
        let scaled = live_deployment(
            Some(6),
            &[
                (MANAGER, "Apply", json!({"f:spec": {"f:template": {}}})),
                (
                    REPLICAS_HANDOVER_MANAGER,
                    "Apply",
                    json!({"f:spec": {"f:replicas": {}}}),
                ),
                (
                    "kube-controller-manager",
                    "Update",
                    json!({"f:spec": {"f:replicas": {}}}),
                ),
            ],
        );
        assert_eq!(replicas_handover(desired, Some(&scaled)), None);
        // An Update by this manager's name is not its apply.
        let updated = live_deployment(Some(4), &[(MANAGER, "Update", ours.clone())]);
        assert_eq!(replicas_handover(desired, Some(&updated)), None);
        // Nothing live yet: the autoscaler starts from the default.
        assert_eq!(replicas_handover(desired, None), None);

        // Without an autoscaler the operator applies the count itself.
        let fixed = rendered(&pipeline(json!({"api": {"replicas": 4}})));
        let desired = api_object(&fixed);
        assert_eq!(desired.body["spec"]["replicas"], 4);
        assert_eq!(replicas_handover(desired, Some(&live)), None);
        // Only Deployments have replicas to hand over.
        let hpa = autoscaled
            .objects
            .iter()
            .find(|o| o.kind == ManagedKind::HorizontalPodAutoscaler)
            .expect("the HPA");
        assert_eq!(replicas_handover(hpa, Some(&live)), None);
    }

    #[test]
    fn fnv_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
