//! The `OcrPipeline` custom resource (`ocr.serving.dev/v1alpha1`).
//!
//! Every optional section has a default, so the smallest useful object names
//! only the Kafka brokers, the database secret and the model source. Defaults
//! are written into the schema too, so `kubectl get -o yaml` shows what runs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The pipeline's topology is the workers' mode: one enum for both sides.
pub use ocr_contract::WorkerMode as Architecture;
pub use ocr_contract::{ModelVariant, Precision, SaslMechanism};

pub const GROUP: &str = "ocr.serving.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "OcrPipeline";

/// The desired pipeline. The operator renders it into a runtime ConfigMap, the
/// API, worker and (in the `writer` architecture) writer Deployments, the API
/// Service, autoscalers and disruption budgets, and applies every change at
/// its next reconcile: pods roll only where their configuration changed.
//
// Each printcolumn repeats `type_ = "string"`, which clippy mistakes for a repeated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ocr.serving.dev",
    version = "v1alpha1",
    kind = "OcrPipeline",
    namespaced,
    status = "OcrPipelineStatus",
    derive = "PartialEq",
    shortname = "ocrp",
    category = "ocr",
    doc = "An OCR serving pipeline: API, GPU workers and (in writer architecture) result writers",
    printcolumn(
        name = "Desired",
        type_ = "string",
        description = "The architecture the spec asks for",
        json_path = ".spec.architecture"
    ),
    printcolumn(
        name = "Running",
        type_ = "string",
        description = "The architecture fully rolled out; during a migration, the one being left",
        json_path = ".status.architecture"
    ),
    printcolumn(
        name = "Advice",
        type_ = "string",
        description = "The architecture the measured signals call for (spec.autoArchitecture); empty when it is Disabled",
        json_path = ".status.advice.architecture"
    ),
    printcolumn(
        name = "Migration",
        type_ = "string",
        description = "The step an architecture migration waits in; empty when none runs",
        json_path = ".status.migration.phase"
    ),
    printcolumn(
        name = "Phase",
        type_ = "string",
        description = "Pending, Running, Migrating or Degraded",
        json_path = ".status.phase"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "Roles (api, worker, writer) with every desired pod ready and rolled out, of all roles",
        json_path = ".status.readyRoles"
    ),
    printcolumn(
        name = "URL",
        type_ = "string",
        description = "In-cluster address of the API Service",
        json_path = ".status.url",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct OcrPipelineSpec {
    /// The topology: `standard` (workers infer one job at a time and write
    /// results to the database; the default), `batched` (workers infer
    /// micro-batches, see `worker.batching`) or `writer` (workers publish
    /// results to Kafka and writer pods persist them, which shields a slow
    /// database). Changing it migrates the running pipeline step by step
    /// without losing a job; `status.migration` shows the step.
    #[serde(default)]
    pub architecture: Architecture,
    /// Container images of the pipeline's pods and how they are pulled.
    /// Changing an image rolls the pods that use it.
    #[serde(default)]
    pub images: Images,
    /// The PP-OCR model the workers run, on which device and precision, and
    /// where its files come from. Changing it rolls the workers.
    pub model: ModelSpec,
    /// The API pods, which accept jobs over HTTP and gRPC, store them in the
    /// database and publish them to the jobs topic, and their Service.
    #[serde(default)]
    pub api: ApiSpec,
    /// The inference pods, which consume the jobs topic, run OCR and write
    /// the results to the database (or, in the `writer` architecture,
    /// publish them to the results topic).
    #[serde(default)]
    pub worker: WorkerSpec,
    /// The result writers of the `writer` architecture, which persist the
    /// results topic to the database and call the completion webhook.
    /// Ignored (and no writer runs) in the other architectures.
    #[serde(default)]
    pub writer: WriterSpec,
    /// The Kafka cluster the jobs and results queue on, its security, and
    /// the topic and consumer-group names (fixed once the pipeline exists).
    pub kafka: KafkaSpec,
    /// The MySQL/MariaDB database that holds every job (the source of
    /// truth); every role connects to it.
    pub database: DatabaseSpec,
    /// Where uploaded images and result documents live. Required: the API and
    /// the workers run in different pods and must see the same store.
    pub blob: BlobSpec,
    /// Optional Redis, used by the API to deduplicate submissions and to
    /// rate-limit clients. Absent: no deduplication, no rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSpec>,
    /// Optional autoscalers of the API and the workers; without them the
    /// replica counts of `api`, `worker` and `writer` hold.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    /// PodDisruptionBudgets and the spreading of pods across nodes.
    #[serde(default)]
    pub availability: AvailabilitySpec,
    /// The runtime's HTTP (and metrics) port and where traces go. Changing
    /// it rolls every role.
    #[serde(default)]
    pub observability: ObservabilitySpec,
    /// How architecture migrations are supervised: how long one step may
    /// wait before the pipeline is reported `Degraded`.
    #[serde(default)]
    pub migration: MigrationSpec,
    /// Choosing the architecture from measured signals: GPU utilisation (or,
    /// on a CPU, the engine's busy share), the jobs topic's lag and its
    /// growth, and the time of the database's final writes. `Advise` writes
    /// the recommendation to `status.advice`; `Apply` also switches
    /// `spec.architecture` to it.
    #[serde(default)]
    pub auto_architecture: AutoArchitectureSpec,
}

/// Container images of the pipeline's pods and how they are pulled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Images {
    /// The `ocr-runtime` image of every role. Absent: the project's CPU image
    /// for the API and the writer, and for the workers its CUDA build when
    /// `model.device` is `cuda` (a CPU build cannot open a GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub runtime: Option<String>,
    /// Image of the init container that downloads `model.source.url`; it needs `sh`, `curl` and `tar`.
    #[serde(default = "default_fetcher_image")]
    #[schemars(length(min = 1))]
    pub model_fetcher: String,
    /// `imagePullPolicy` of every container: `Always`, `IfNotPresent` (the
    /// default) or `Never`.
    #[serde(default)]
    pub pull_policy: PullPolicy,
    /// Names of `kubernetes.io/dockerconfigjson` Secrets, in the pipeline's
    /// namespace, that every pod pulls its images with (private registries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<String>,
}

impl Default for Images {
    fn default() -> Self {
        Images {
            runtime: None,
            model_fetcher: default_fetcher_image(),
            pull_policy: PullPolicy::default(),
            pull_secrets: Vec::new(),
        }
    }
}

/// The project's runtime images (`docker build` targets `runtime` and `runtime-cuda`).
pub const RUNTIME_IMAGE: &str = "ghcr.io/ocr-serving/ocr-runtime:0.1.0";
pub const RUNTIME_CUDA_IMAGE: &str = "ghcr.io/ocr-serving/ocr-runtime:0.1.0-cuda";

impl Images {
    /// The image for a role; `needs_gpu` for workers on `cuda`.
    pub fn runtime_image(&self, needs_gpu: bool) -> String {
        match (&self.runtime, needs_gpu) {
            (Some(image), _) => image.clone(),
            (None, true) => RUNTIME_CUDA_IMAGE.into(),
            (None, false) => RUNTIME_IMAGE.into(),
        }
    }
}

fn default_fetcher_image() -> String {
    "curlimages/curl:8.11.1".into()
}

/// When the kubelet pulls an image (a container's `imagePullPolicy`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The PP-OCR model the workers run and where its files come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// PP-OCR variant: `v6-small` (best accuracy; the default), `v6-tiny`
    /// (fastest on CPU) or `v5-mobile`. The files in `source` must be this
    /// variant's.
    #[serde(default)]
    pub variant: ModelVariant,
    /// `cuda` runs the workers on a GPU (`worker.gpusPerPod` each, the CUDA
    /// image); `cpu` (the default) needs no GPU.
    #[serde(default)]
    pub device: Device,
    /// Where the model files come from: a PersistentVolumeClaim (`volume`)
    /// or a tarball downloaded when each worker starts (`url`).
    pub source: ModelSource,
    /// How page images are sized for the detector; absent: the runtime's
    /// default (`Min`, 64: images run at their own scale).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<DetectionSpec>,
    /// What the networks compute in: `f32`, `f16` or `bf16`. Absent: `f16`
    /// on `cuda` (the benchmark's page CER equals f32's, about 1.2-1.4x
    /// faster on an H200), `f32` on `cpu` (the only precision with fast CPU
    /// kernels; `bf16` is refused there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,
}

impl ModelSpec {
    /// [`Self::precision`], or the default for the device.
    pub fn effective_precision(&self) -> Precision {
        self.precision.unwrap_or(match self.device {
            Device::Cuda => Precision::F16,
            Device::Cpu => Precision::F32,
        })
    }
}

/// The runtime's `model.det_limit_type` and `model.det_limit_side_len`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DetectionSpec {
    /// `Min` scales small images up until their short side reaches
    /// `limitSideLen` (best recall on small text); `Max` only shrinks images
    /// whose long side exceeds it (much faster on small inputs).
    pub limit_type: DetLimitType,
    /// The side length, in pixels, that `limitType` holds images to.
    #[schemars(range(min = 32, max = 4096))]
    pub limit_side_len: i32,
}

/// How `limitSideLen` bounds page images before detection: `Min` or `Max`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DetLimitType {
    Min,
    Max,
}

/// The CRD spells the values as Kubernetes enums are spelled (`Min`), the
/// runtime's file in lower case; this is the one mapping between them.
impl From<DetLimitType> for ocr_contract::DetLimitType {
    fn from(limit: DetLimitType) -> Self {
        match limit {
            DetLimitType::Min => ocr_contract::DetLimitType::Min,
            DetLimitType::Max => ocr_contract::DetLimitType::Max,
        }
    }
}

/// Where the workers run the model: `cpu` or `cuda` (the runtime's `model.device`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

/// Where the PP-OCR ONNX files come from: exactly one of `volume` or `url`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.volume) != has(self.url)").message("set exactly one of volume or url"))]
pub struct ModelSource {
    /// A PersistentVolumeClaim that holds the model files, mounted read-only
    /// into every worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<ModelVolume>,
    /// An `http(s)://` URL of a `.tar.gz` with the model files at its root,
    /// downloaded by an init container (`images.modelFetcher`) into an
    /// `emptyDir` each time a worker pod starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("url must be http(s)"))]
    pub url: Option<String>,
}

/// The blob store every role shares: exactly one of `s3` or `volume`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.s3) != has(self.volume)").message("set exactly one of s3 or volume"))]
pub struct BlobSpec {
    /// An S3 bucket (or an S3-compatible store such as MinIO or Ceph RGW).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3BlobSpec>,
    /// A ReadWriteMany PersistentVolumeClaim, mounted into every API, worker
    /// and writer pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<BlobVolume>,
}

/// S3 or an S3-compatible store (MinIO, Ceph RGW).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3BlobSpec {
    /// The bucket's name; it must exist, the operator does not create it.
    #[schemars(
        length(min = 3, max = 63),
        regex(pattern = r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
    )]
    pub bucket: String,
    /// Key prefix inside the bucket, without a leading slash, so that
    /// several pipelines can share a bucket. Absent: the bucket's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^/].*$"))]
    pub prefix: Option<String>,
    /// Endpoint of an S3-compatible store; absent: AWS. An `http://` endpoint
    /// is allowed explicitly (in-cluster MinIO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("endpoint must be http(s)"))]
    pub endpoint: Option<String>,
    /// The bucket's region; absent: the SDK's default chain (`AWS_REGION`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub region: Option<String>,
    /// Secret with the keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`;
    /// absent: the pods' own identity (IRSA, instance profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub credentials_secret: Option<String>,
}

impl S3BlobSpec {
    /// The runtime's `blob.url`.
    pub fn url(&self) -> String {
        match &self.prefix {
            Some(prefix) if !prefix.is_empty() => {
                format!("s3://{}/{}", self.bucket, prefix.trim_end_matches('/'))
            }
            _ => format!("s3://{}", self.bucket),
        }
    }
}

/// A ReadWriteMany PersistentVolumeClaim shared by every role, mounted at
/// `/var/lib/ocr/blobs`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlobVolume {
    /// The claim's name, in the pipeline's namespace. ReadWriteMany, so that
    /// pods on different nodes share it (ReadWriteOnce works on one node).
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Directory inside the volume that holds the blobs; the volume root
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

/// An existing PersistentVolumeClaim that holds the model files.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelVolume {
    /// The claim's name, in the pipeline's namespace.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Directory inside the volume that holds the model files; the volume
    /// root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

/// The API role: its pods and its Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    /// Number of API pods (default 2). Ignored while `autoscaling.api` is
    /// set: the HorizontalPodAutoscaler sets the count then.
    #[serde(default = "two")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// The API container's resources. A CPU or memory request left out (and
    /// not limited either, which makes Kubernetes request the limit) defaults
    /// to `cpu: 250m`, `memory: 256Mi`, so the scheduler reserves room for the
    /// pod and `autoscaling.api` always has a CPU request to compute
    /// utilisation from. No limits are set by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The Service `<name>-api` in front of the API pods (HTTP, and gRPC on
    /// port 50051); `status.url` shows its in-cluster address.
    #[serde(default)]
    pub service: ServiceSpec,
    /// Who may call the API. By default every request needs a key
    /// (`Authorization: Bearer <key>`); each key belongs to a tenant, and a
    /// tenant sees only its own jobs.
    #[serde(default)]
    pub auth: ApiAuthSpec,
    /// Serve HTTPS and gRPC over TLS with the certificate of a
    /// `kubernetes.io/tls` Secret (keys `tls.crt` and `tls.key`), e.g. one
    /// cert-manager issues. Probes switch to HTTPS; plain text is not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ApiTlsSpec>,
}

impl Default for ApiSpec {
    fn default() -> Self {
        ApiSpec {
            replicas: two(),
            resources: None,
            service: ServiceSpec::default(),
            auth: ApiAuthSpec::default(),
            tls: None,
        }
    }
}

/// API keys and tenants.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiAuthSpec {
    /// `Required` (the default) or `Disabled`: requests without a key are
    /// the tenant `anonymous` (only behind a gateway that authenticates).
    #[serde(default)]
    pub mode: ApiAuthMode,
    /// A Secret in the pipeline's namespace whose every key is a tenant
    /// name and whose value holds that tenant's API keys, one per line (at
    /// least 32 characters each). Mounted into the API pods and re-read
    /// while they run, so adding or removing a key needs no restart. Keys
    /// made with `ocr-runtime keys create` in an API pod work alongside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_secret: Option<String>,
}

// Whether API requests need a key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ApiAuthMode {
    #[default]
    Required,
    Disabled,
}

/// The API's TLS certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiTlsSpec {
    /// A `kubernetes.io/tls` Secret in the pipeline's namespace.
    pub secret_name: String,
}

/// The API's Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (the default: reachable inside the cluster only),
    /// `NodePort` or `LoadBalancer` (reachable from outside the cluster).
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// The Service's HTTP port (default 80), which clients and `status.url`
    /// use; the pods keep listening on `observability.metricsPort`.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        ServiceSpec {
            type_: ServiceType::default(),
            port: default_service_port(),
        }
    }
}

fn default_service_port() -> i32 {
    80
}

/// A Kubernetes Service type.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The worker role: the pods that run OCR.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSpec {
    /// Number of worker pods (default 1). Ignored while `autoscaling.worker`
    /// is set and KEDA is installed: KEDA sets the count from the jobs lag then.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// `nvidia.com/gpu` limit per worker pod when `model.device` is `cuda`
    /// (default 1); ignored on `cpu`.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 16))]
    pub gpus_per_pod: i32,
    /// The worker container's resources. A CPU or memory request left out
    /// (and not limited either) defaults to `cpu: 1`, `memory: 1Gi` on `cpu`
    /// and `cpu: 1`, `memory: 2Gi` on `cuda` (the CUDA runtime's host memory);
    /// on `cuda` the `nvidia.com/gpu` limit is always `gpusPerPod`. No CPU or
    /// memory limits are set by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels a worker pod needs to be scheduled, e.g.
    /// `nvidia.com/gpu.present: "true"` to keep workers on GPU nodes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the worker pods tolerate, e.g. `nvidia.com/gpu` with
    /// `operator: Exists` for tainted GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Micro-batching of the `batched` and `writer` architectures (in
    /// `standard`, workers take one job at a time).
    #[serde(default)]
    pub batching: BatchingSpec,
    /// How often one job may be claimed (or, in the `writer` architecture,
    /// inferred) before it is dead-lettered and fails (default 5).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: i32,
}

impl Default for WorkerSpec {
    fn default() -> Self {
        WorkerSpec {
            replicas: one(),
            gpus_per_pod: one(),
            resources: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            batching: BatchingSpec::default(),
            max_attempts: default_max_attempts(),
        }
    }
}

fn default_max_attempts() -> i32 {
    runtime_default(ocr_contract::WorkerConfig::default().max_attempts)
}

/// Micro-batching of the workers, used by the `batched` and `writer`
/// architectures (in `standard`, workers take one job at a time).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Most jobs one engine call infers together (default 8). Larger
    /// batches use a GPU better and need more memory per worker.
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1, max = 256))]
    pub max_batch_size: i32,
    /// Milliseconds a batch waits to fill after its first job (default 20):
    /// the latency a job may lose for the sake of a fuller batch.
    #[serde(default = "default_max_wait_ms")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_wait_ms: i32,
    /// Micro-batches one worker handles at once. Absent: 2 on `cuda` (the
    /// GPU infers one batch while the next is claimed and decoded: 1.5x the
    /// jobs/s of one at a time on an H200), 1 on `cpu`, where one batch
    /// already uses every core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub in_flight: Option<i32>,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        BatchingSpec {
            max_batch_size: default_max_batch_size(),
            max_wait_ms: default_max_wait_ms(),
            in_flight: None,
        }
    }
}

fn default_max_batch_size() -> i32 {
    runtime_default(ocr_contract::WorkerConfig::default().max_batch_size)
}

fn default_max_wait_ms() -> i32 {
    runtime_default(ocr_contract::WorkerConfig::default().max_wait_ms)
}

/// Result writers; deployed only in the `writer` architecture.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.retryMaxMs >= self.retryInitialMs").message("retryMaxMs must be at least retryInitialMs"))]
pub struct WriterSpec {
    /// Number of writer pods (default 1); more than the results topic's
    /// partitions sit idle.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub replicas: i32,
    /// The writer container's resources. A CPU or memory request left out
    /// (and not limited either) defaults to `cpu: 100m`, `memory: 128Mi`. No
    /// limits are set by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Tries of the result-document upload and of the webhook before the result is
    /// dead-lettered and the job fails (the runtime's `writer.retries`; 0 counts as 1).
    /// The database is waited for without limit instead.
    #[serde(default = "default_writer_retries")]
    #[schemars(range(min = 0, max = 100))]
    pub retries: i32,
    /// First pause between tries, in milliseconds (default 200), doubling
    /// per failure up to `retryMaxMs`.
    #[serde(default = "default_retry_initial_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub retry_initial_ms: i32,
    /// Longest pause between tries, in milliseconds (default 10000).
    #[serde(default = "default_retry_max_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub retry_max_ms: i32,
    /// Completion webhook, POSTed by the writer once per finished job.
    /// Absent: no webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookSpec>,
}

impl Default for WriterSpec {
    fn default() -> Self {
        WriterSpec {
            replicas: one(),
            resources: None,
            retries: default_writer_retries(),
            retry_initial_ms: default_retry_initial_ms(),
            retry_max_ms: default_retry_max_ms(),
            webhook: None,
        }
    }
}

fn default_writer_retries() -> i32 {
    runtime_default(ocr_contract::WriterConfig::default().retries)
}

fn default_retry_initial_ms() -> i32 {
    runtime_default(ocr_contract::WriterConfig::default().retry_initial_ms)
}

fn default_retry_max_ms() -> i32 {
    runtime_default(ocr_contract::WriterConfig::default().retry_max_ms)
}

/// A completion webhook the writers call once per finished job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSpec {
    /// The `http(s)://` URL the writer POSTs each finished job's result to.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("url must be http(s)"))]
    pub url: String,
    /// Secret with the HMAC-SHA256 key of the `ocr-signature` header. Without it the
    /// signature is keyed with an empty key and proves nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<WebhookSecret>,
    /// Limit of one webhook call, in milliseconds (default 10000); a call
    /// that takes longer counts as a failed try (see `retries`).
    #[serde(default = "default_webhook_timeout_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub timeout_ms: i32,
}

fn default_webhook_timeout_ms() -> i32 {
    runtime_default(ocr_contract::WriterConfig::default().webhook_timeout_ms)
}

/// A runtime default as the CRD's integer type: the CRD defaults what the
/// runtime would, so an object without the field and one with the default
/// run the same (they were 3 and 5 writer retries once).
fn runtime_default<T: TryInto<i32>>(value: T) -> i32 {
    value.try_into().unwrap_or(i32::MAX)
}

/// The Secret that holds the webhook's signing key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSecret {
    /// The Secret's name, in the pipeline's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key of the Secret that holds the HMAC key (default `secret`).
    #[serde(default = "default_webhook_secret_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn default_webhook_secret_key() -> String {
    "secret".into()
}

/// Where the pipeline's jobs and results queue. Topic and consumer-group names
/// left out are derived from the pipeline's namespace and name (see
/// [`QueueNames`]), so two pipelines never share a queue unless told to; the
/// names in use are shown in `status.queues`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(QUEUE_NAMES_IMMUTABLE).message("topic and consumer-group names cannot change on a live pipeline: jobs and results queued under the old names would be stranded. Create a new pipeline for new names").reason(Reason::FieldValueForbidden))]
pub struct KafkaSpec {
    /// Comma-separated `host:port` list of brokers, used by every role, by
    /// the KEDA scaler and by the operator itself.
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// TLS and SASL; both absent: plaintext without authentication.
    #[serde(default, skip_serializing_if = "KafkaSecuritySpec::is_plaintext")]
    pub security: KafkaSecuritySpec,
    /// Topic names; absent ones derive from the pipeline's namespace and name.
    #[serde(default)]
    pub topics: TopicsSpec,
    /// Partitions of the topics the operator creates (default 12), which
    /// caps how many workers consume in parallel; an existing topic with
    /// fewer is reported in `Ready`, never repartitioned (that would move keys).
    #[serde(default = "default_partitions")]
    #[schemars(range(min = 1, max = 1000))]
    pub partitions: i32,
    /// Replication factor of the topics the operator creates (default 3; at
    /// most the number of brokers).
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1, max = 10))]
    pub replication_factor: i32,
    /// The workers' consumer group on the jobs topic. Absent:
    /// `<namespace>.<name>.worker` (from the topic prefix when one is set).
    /// Fixed once the pipeline exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub consumer_group: Option<String>,
    /// The writers' consumer group on the results topic; its lag gates removing
    /// the writer. Absent: `<namespace>.<name>.writer` (from the topic prefix
    /// when one is set). Fixed once the pipeline exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub writer_group: Option<String>,
    /// Delete the topics this operator created for the pipeline when the
    /// pipeline is deleted (after its pods are gone). Off by default: queued
    /// jobs and dead letters outlive the pipeline. Topics that existed before,
    /// or that another pipeline on the same brokers uses, are never deleted.
    #[serde(default)]
    pub delete_topics: bool,
}

/// The transition rule behind "queue names are fixed": every name, set or
/// left to its default, stays as it was (setting a defaulted name, or removing
/// a set one, is a change too).
const QUEUE_NAMES_IMMUTABLE: &str = "\
(has(self.consumerGroup) ? self.consumerGroup : '') == (has(oldSelf.consumerGroup) ? oldSelf.consumerGroup : '') && \
(has(self.writerGroup) ? self.writerGroup : '') == (has(oldSelf.writerGroup) ? oldSelf.writerGroup : '') && \
(has(self.topics) && has(self.topics.prefix) ? self.topics.prefix : '') == (has(oldSelf.topics) && has(oldSelf.topics.prefix) ? oldSelf.topics.prefix : '') && \
(has(self.topics) && has(self.topics.jobs) ? self.topics.jobs : '') == (has(oldSelf.topics) && has(oldSelf.topics.jobs) ? oldSelf.topics.jobs : '') && \
(has(self.topics) && has(self.topics.results) ? self.topics.results : '') == (has(oldSelf.topics) && has(oldSelf.topics.results) ? oldSelf.topics.results : '') && \
(has(self.topics) && has(self.topics.deadLetter) ? self.topics.deadLetter : '') == (has(oldSelf.topics) && has(oldSelf.topics.deadLetter) ? oldSelf.topics.deadLetter : '')";

fn default_partitions() -> i32 {
    12
}

fn default_replication_factor() -> i32 {
    3
}

/// How the runtime's pods, the KEDA scaler and the operator itself reach the
/// brokers. The protocol follows from what is set: `tls` alone is `SSL`, `sasl`
/// alone `SASL_PLAINTEXT`, both `SASL_SSL`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSecuritySpec {
    /// TLS to the brokers. Absent: plaintext connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<KafkaTlsSpec>,
    /// SASL authentication. Absent: no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sasl: Option<KafkaSaslSpec>,
}

impl KafkaSecuritySpec {
    pub fn is_plaintext(&self) -> bool {
        self.tls.is_none() && self.sasl.is_none()
    }

    pub fn protocol(&self) -> ocr_contract::SecurityProtocol {
        ocr_contract::SecurityProtocol::from_parts(self.tls.is_some(), self.sasl.is_some())
    }
}

/// TLS to the brokers.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaTlsSpec {
    /// Secret with the PEM of the CA that signed the brokers' certificates
    /// (Strimzi: `<cluster>-cluster-ca-cert`); absent: the image's system CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub ca_secret: Option<String>,
    /// The key of `caSecret` that holds the PEM (default `ca.crt`).
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1))]
    pub ca_key: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

/// SASL authentication; the credentials come from a Secret in the pipeline's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSaslSpec {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` (the default).
    #[serde(default)]
    pub mechanism: SaslMechanism,
    /// Secret with the credentials, in the pipeline's namespace.
    #[schemars(length(min = 1))]
    pub secret: String,
    /// The user name itself, for secrets that hold only the password (a
    /// Strimzi `KafkaUser` secret is named after its user); otherwise it is
    /// read from `usernameKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub username: Option<String>,
    /// The key of `secret` that holds the user name (default `username`).
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1))]
    pub username_key: String,
    /// The key of `secret` that holds the password (default `password`).
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".into()
}

fn default_password_key() -> String {
    "password".into()
}

/// Topic names; any name left out is `<prefix>.jobs`, `<prefix>.results` or
/// `<prefix>.dead-letter`. Fixed once the pipeline exists.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicsSpec {
    /// Prefix of every topic and consumer-group name left out
    /// (`<prefix>.jobs`, `<prefix>.worker`, …). Absent: `<namespace>.<name>`
    /// of the pipeline (shortened with a hash
    /// where that would make a topic name longer than Kafka's 249 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 237), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub prefix: Option<String>,
    /// The jobs topic the API publishes to and the workers consume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub jobs: Option<String>,
    /// The results topic of the writer architecture: writer-mode workers
    /// publish to it, the writers consume it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub results: Option<String>,
    /// Where jobs and results that cannot be processed end up, for
    /// inspection or replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub dead_letter: Option<String>,
}

/// Kafka refuses longer topic names.
const MAX_TOPIC_NAME: usize = 249;
/// The longest suffix a derived topic name gets.
const LONGEST_TOPIC_SUFFIX: &str = ".dead-letter";

/// The topics and consumer groups a pipeline's data flows through, resolved
/// from `spec.kafka` and the pipeline's namespace and name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueNames {
    /// The API publishes jobs here; the workers consume them.
    pub jobs_topic: String,
    /// Writer-mode workers publish results here; the writers persist them.
    pub results_topic: String,
    /// Jobs and results that cannot be processed.
    pub dead_letter_topic: String,
    /// The workers' consumer group on the jobs topic.
    pub consumer_group: String,
    /// The writers' consumer group on the results topic.
    pub writer_group: String,
}

impl QueueNames {
    /// Names left out of `kafka` are derived from `namespace` and `name`: a
    /// namespace is a DNS label (no dots), so `<namespace>.<name>` differs for
    /// every pipeline.
    pub fn resolve(kafka: &KafkaSpec, namespace: &str, name: &str) -> QueueNames {
        let prefix = kafka
            .topics
            .prefix
            .clone()
            .unwrap_or_else(|| default_queue_prefix(namespace, name));
        let or = |set: &Option<String>, suffix: &str| {
            set.clone().unwrap_or_else(|| format!("{prefix}.{suffix}"))
        };
        QueueNames {
            jobs_topic: or(&kafka.topics.jobs, "jobs"),
            results_topic: or(&kafka.topics.results, "results"),
            dead_letter_topic: or(&kafka.topics.dead_letter, "dead-letter"),
            consumer_group: or(&kafka.consumer_group, "worker"),
            writer_group: or(&kafka.writer_group, "writer"),
        }
    }

    /// Every topic, jobs first.
    pub fn topics(&self) -> [&str; 3] {
        [
            &self.jobs_topic,
            &self.results_topic,
            &self.dead_letter_topic,
        ]
    }
}

/// `<namespace>.<name>`, or where a topic named after it would be too long
/// for Kafka, its start and a hash of the whole (still one per pipeline).
fn default_queue_prefix(namespace: &str, name: &str) -> String {
    let full = format!("{namespace}.{name}");
    let room = MAX_TOPIC_NAME - LONGEST_TOPIC_SUFFIX.len();
    if full.len() <= room {
        return full;
    }
    let hash = format!("{:016x}", crate::build::fnv1a64(full.as_bytes()));
    let keep: String = full.chars().take(room - hash.len() - 1).collect();
    format!("{keep}-{hash}")
}

impl OcrPipeline {
    /// The pipeline's topics and consumer groups; see [`QueueNames::resolve`].
    pub fn queues(&self) -> QueueNames {
        QueueNames::resolve(
            &self.spec.kafka,
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name.as_deref().unwrap_or_default(),
        )
    }
}

/// The MySQL/MariaDB database of the pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// Secret with the MySQL URL (`mysql://user:pass@host:3306/db`), given
    /// to every role as `OCR_DATABASE__URL`. A missing Secret or key marks
    /// the pipeline `Degraded` (the pods cannot start without it).
    pub secret: SecretKey,
}

/// Redis for deduplication and rate limiting.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSpec {
    /// Secret with the Redis URL (`redis://host:6379`), given to the pods as
    /// `OCR_REDIS__URL`.
    pub secret: SecretKey,
    /// Jobs one client may submit per minute; 0 (the default) turns rate
    /// limiting off.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub requests_per_minute: i32,
}

/// A key of a Secret in the pipeline's namespace that holds a connection URL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKey {
    /// The Secret's name, in the pipeline's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key that holds the URL (default `url`).
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn default_secret_key() -> String {
    "url".into()
}

/// Autoscalers of the API and the workers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingSpec {
    /// API pods, on CPU utilisation (HorizontalPodAutoscaler). Utilisation is
    /// measured against the API container's CPU request, which is therefore
    /// always set (see `api.resources`). Switching autoscaling on keeps the
    /// running replica count: the autoscaler takes it from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<CpuScaling>,
    /// Workers, on jobs-topic lag (KEDA ScaledObject, only where KEDA is
    /// installed). Switching it on keeps the running replica count, as for `api`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<LagScaling>,
}

/// A HorizontalPodAutoscaler on CPU utilisation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas").message("maxReplicas must be at least minReplicas"))]
pub struct CpuScaling {
    /// Fewest API pods the autoscaler keeps.
    #[schemars(range(min = 1, max = 1000))]
    pub min_replicas: i32,
    /// Most API pods the autoscaler starts.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Average CPU use, in percent of the API container's CPU request, that
    /// the autoscaler holds the pods at (default 70).
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: i32,
}

fn default_cpu_target() -> i32 {
    70
}

/// A KEDA ScaledObject on the workers' lag on the jobs topic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.maxReplicas >= self.minReplicas").message("maxReplicas must be at least minReplicas"))]
pub struct LagScaling {
    /// Fewest worker pods KEDA keeps; 0 lets an idle pipeline run no worker
    /// (the first job then waits for a worker to start and load the model).
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,
    /// Most worker pods KEDA starts, capped at `kafka.partitions`: more
    /// consumers than partitions sit idle.
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,
    /// Unconsumed jobs per worker pod that KEDA aims at (default 10): the
    /// lag divided by this is the desired worker count.
    #[serde(default = "default_lag_threshold")]
    #[schemars(range(min = 1))]
    pub lag_threshold: i32,
}

fn default_lag_threshold() -> i32 {
    10
}

/// Disruption budgets and the spreading of pods across nodes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AvailabilitySpec {
    /// The PodDisruptionBudget of each role, which limits how many of its
    /// pods a node drain may take at once. Neither field: `maxUnavailable: 1`.
    #[serde(default)]
    pub disruption_budget: DisruptionBudget,
    /// How the pods of one role spread over nodes: `Preferred` (where the
    /// scheduler can), `Required` (never two on a node) or `None`.
    #[serde(default)]
    pub anti_affinity: AntiAffinity,
}

/// One PodDisruptionBudget per role; at most one of the two fields. Neither: `maxUnavailable: 1`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.minAvailable) && has(self.maxUnavailable))").message("set at most one of minAvailable or maxUnavailable"))]
pub struct DisruptionBudget {
    /// Pods (or a percentage) of a role that voluntary disruptions leave running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_available: Option<IntOrString>,
    /// Pods (or a percentage) of a role that voluntary disruptions may take at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrString>,
}

/// How the pods of one role spread over nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum AntiAffinity {
    /// Spread pods of one role across nodes where the scheduler can.
    #[default]
    Preferred,
    /// Never two pods of one role on a node.
    Required,
    /// No spreading rule.
    None,
}

/// The runtime's HTTP port and tracing.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObservabilitySpec {
    /// The runtime's HTTP port (default 8080), which serves the API,
    /// `/livez`, `/readyz` and `/metrics` in every role.
    #[serde(default = "default_metrics_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub metrics_port: i32,
    /// OTLP collector every role sends traces to, e.g.
    /// `http://otel-collector:4317`. Absent: no traces are exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

impl Default for ObservabilitySpec {
    fn default() -> Self {
        ObservabilitySpec {
            metrics_port: default_metrics_port(),
            otlp_endpoint: None,
        }
    }
}

fn default_metrics_port() -> i32 {
    8080
}

/// Supervision of architecture migrations.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// Seconds (default 600) one migration phase may wait (for the results topic, the
    /// writer, the worker rollout including terminating pods, the results lag,
    /// the writer's removal) before the pipeline is marked `Degraded` (reason
    /// `MigrationStuck`) and a Warning event is published. The migration keeps
    /// waiting: a deadline never skips a wait.
    #[serde(default = "default_phase_deadline_seconds")]
    #[schemars(range(min = 1))]
    pub phase_deadline_seconds: i64,
}

impl Default for MigrationSpec {
    fn default() -> Self {
        MigrationSpec {
            phase_deadline_seconds: default_phase_deadline_seconds(),
        }
    }
}

fn default_phase_deadline_seconds() -> i64 {
    600
}

/// The architecture advisor: the seed's rule (utilisation at or above
/// `batchedAtUtilizationPercent` with a growing lag: `batched`; utilisation
/// below `writerBelowUtilizationPercent` with a growing lag and slow final
/// writes: `writer`; idle: `standard`) with a dwell time, so noisy signals
/// never flap the pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.writerBelowUtilizationPercent <= self.batchedAtUtilizationPercent").message("writerBelowUtilizationPercent must not exceed batchedAtUtilizationPercent"),
    validation = Rule::new("self.idleUtilizationPercent <= self.writerBelowUtilizationPercent").message("idleUtilizationPercent must not exceed writerBelowUtilizationPercent")
)]
pub struct AutoArchitectureSpec {
    /// `Disabled` (the default): no signals are read. `Advise`: the operator
    /// reads the signals every 15 s and writes its recommendation to
    /// `status.advice`, the `ArchitectureAdvice` condition and an Event on
    /// every change. `Apply`: as `Advise`, and it sets `spec.architecture` to
    /// the advice (never while a migration runs, at most once per
    /// `cooldownSeconds`); the migration then runs as for a manual edit.
    #[serde(default)]
    pub mode: AutoArchitectureMode,
    /// Utilisation (percent) at or above which a growing lag calls for
    /// `batched`: the GPU is the bottleneck, bigger batches use it better.
    #[serde(default = "default_batched_at")]
    #[schemars(range(min = 1, max = 100))]
    pub batched_at_utilization_percent: i32,
    /// Utilisation (percent) below which a growing lag with slow final
    /// writes calls for `writer`: the GPU waits for the database.
    #[serde(default = "default_writer_below")]
    #[schemars(range(min = 1, max = 100))]
    pub writer_below_utilization_percent: i32,
    /// Mean time (ms) of the final write of a job at or above which the
    /// database counts as slow.
    #[serde(default = "default_slow_store_millis")]
    #[schemars(range(min = 1))]
    pub slow_store_millis: i64,
    /// Growth of the jobs topic's lag (messages per minute, least squares
    /// over the last minute) at or above which the lag counts as growing.
    #[serde(default = "default_lag_growth_per_minute")]
    #[schemars(range(min = 1))]
    pub lag_growth_per_minute: i64,
    /// The pipeline counts as idle, which calls for `standard`, when the lag
    /// is at most `idleLag`, does not grow, and utilisation is below this.
    #[serde(default = "default_idle_utilization")]
    #[schemars(range(min = 0, max = 100))]
    pub idle_utilization_percent: i32,
    /// Lag (messages) at or below which the pipeline may count as idle.
    #[serde(default = "default_idle_lag")]
    #[schemars(range(min = 0))]
    pub idle_lag: i64,
    /// Seconds a different recommendation must hold without interruption
    /// before it becomes the advice.
    #[serde(default = "default_dwell_seconds")]
    #[schemars(range(min = 0))]
    pub dwell_seconds: i64,
    /// `Apply` only: seconds after a migration finished (or after the last
    /// switch) before the next automatic switch.
    #[serde(default = "default_cooldown_seconds")]
    #[schemars(range(min = 0))]
    pub cooldown_seconds: i64,
    /// Read utilisation and final-write times from this Prometheus instead
    /// of the worker and writer pods' `/metrics` (the jobs lag still comes
    /// from Kafka). For clusters where the operator may not reach pod IPs.
    /// Absent: the operator reads the pods itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSignals>,
}

/// The label matchers the chart's PodMonitor gives a pipeline's worker and
/// writer series (`podTargetLabels`, as Prometheus sanitises them).
pub const DEFAULT_PROMETHEUS_MATCHERS: &str = r#"namespace="$namespace",ocr_serving_dev_pipeline="$pipeline",app_kubernetes_io_component=~"worker|writer""#;

/// Where the advisor's utilisation and database signals come from when a
/// Prometheus server scrapes the pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSignals {
    /// Base URL of the Prometheus HTTP API, e.g.
    /// `http://prometheus-operated.monitoring:9090`.
    #[x_kube(validation = Rule::new("self.startsWith('https://') || self.startsWith('http://')").message("url must be http(s)"))]
    pub url: String,
    /// PromQL label matchers that select this pipeline's worker and writer
    /// series; `$namespace` and `$pipeline` are replaced by the pipeline's.
    /// The default matches the labels of the chart's PodMonitor.
    #[serde(default = "default_prometheus_matchers")]
    #[schemars(length(min = 1))]
    pub matchers: String,
    /// Rates and averages are taken over this many seconds; keep it at four
    /// scrape intervals or more.
    #[serde(default = "default_prometheus_window_seconds")]
    #[schemars(range(min = 10))]
    pub window_seconds: i32,
}

fn default_prometheus_matchers() -> String {
    DEFAULT_PROMETHEUS_MATCHERS.to_owned()
}
fn default_prometheus_window_seconds() -> i32 {
    120
}

impl Default for AutoArchitectureSpec {
    fn default() -> Self {
        AutoArchitectureSpec {
            mode: AutoArchitectureMode::default(),
            batched_at_utilization_percent: default_batched_at(),
            writer_below_utilization_percent: default_writer_below(),
            slow_store_millis: default_slow_store_millis(),
            lag_growth_per_minute: default_lag_growth_per_minute(),
            idle_utilization_percent: default_idle_utilization(),
            idle_lag: default_idle_lag(),
            dwell_seconds: default_dwell_seconds(),
            cooldown_seconds: default_cooldown_seconds(),
            prometheus: None,
        }
    }
}

fn default_batched_at() -> i32 {
    80
}
fn default_writer_below() -> i32 {
    60
}
fn default_slow_store_millis() -> i64 {
    50
}
fn default_lag_growth_per_minute() -> i64 {
    60
}
fn default_idle_utilization() -> i32 {
    30
}
fn default_idle_lag() -> i64 {
    10
}
fn default_dwell_seconds() -> i64 {
    120
}
fn default_cooldown_seconds() -> i64 {
    600
}

// What the advisor does: `Disabled`, `Advise` or `Apply` (see `spec.autoArchitecture.mode`).
// Not `Off`: YAML 1.1 parsers (kubectl's among them) read an unquoted `Off` as the boolean false.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AutoArchitectureMode {
    #[default]
    Disabled,
    Advise,
    Apply,
}

fn one() -> i32 {
    1
}

fn two() -> i32 {
    2
}

/// What the operator last observed and did; written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OcrPipelineStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending` (rolling out), `Running` (every role ready, no migration),
    /// `Migrating` (an architecture migration runs) or `Degraded` (something
    /// the pipeline needs fails; the `Degraded` condition says what).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = field_description_wins)]
    pub phase: Option<Phase>,
    /// The architecture that is fully rolled out; during a migration, the
    /// migration's `from` (a migration that a spec change turned around starts
    /// from the target it gave up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = field_description_wins)]
    pub architecture: Option<Architecture>,
    /// The architecture migration in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// What the advisor recommends and why (`spec.autoArchitecture.mode` not `Disabled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advice: Option<Advice>,
    /// In-cluster address of the API Service, where clients submit jobs:
    /// `http://<name>-api.<namespace>.svc:<api.service.port>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Roles whose Deployment has every desired pod ready and running the
    /// current template, of all roles the pipeline runs, e.g. `2/3` (api,
    /// worker and, while it runs, writer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_roles: Option<String>,
    /// Ready and desired pods of each role, from its Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<RoleReplicas>,
    /// Topics the pipeline needs (jobs, results in writer architecture, dead letters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// The topic and consumer-group names in use (from `spec.kafka`, or
    /// derived from the pipeline's namespace and name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<QueueNames>,
    /// Topics this operator created for the pipeline (deleted with it when
    /// `spec.kafka.deleteTopics` is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created_topics: Vec<String>,
    /// `Ready` (every role available, no migration), `Progressing` (a
    /// rollout or migration is under way), `Degraded` (something the pipeline
    /// needs fails: Kafka, a Secret, an apply, a stuck rollout or migration
    /// phase) and `Migrating`; one entry per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// For an optional enum whose variants are documented, kube's schema rewrite
/// lifts the enum's schema, description included, over the field's, so
/// `kubectl explain` would describe the type instead of the field. Dropping
/// the enum's own description inside the `anyOf` keeps the field's.
fn field_description_wins(schema: &mut schemars::Schema) {
    if let Some(variants) = schema.get_mut("anyOf").and_then(|v| v.as_array_mut()) {
        for variant in variants.iter_mut().filter_map(|v| v.as_object_mut()) {
            variant.remove("description");
        }
    }
}

/// Pod counts per role.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleReplicas {
    /// The API Deployment's pods.
    pub api: ReplicaCounts,
    /// The worker Deployment's pods.
    pub worker: ReplicaCounts,
    /// The writer Deployment's pods; absent while no writer runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<ReplicaCounts>,
}

/// Ready and desired pods of one Deployment.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaCounts {
    /// Pods that pass their readiness probe.
    pub ready: i32,
    /// Pods the Deployment asks for (an autoscaler's choice when one is on);
    /// 0 until the Deployment exists.
    pub desired: i32,
}

/// The pipeline's overall state (`status.phase`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Roles are still rolling out.
    Pending,
    /// Every role is ready and no migration runs.
    Running,
    /// An architecture migration runs.
    Migrating,
    /// Something the pipeline needs fails; see the `Degraded` condition.
    Degraded,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Pending,
        Phase::Running,
        Phase::Migrating,
        Phase::Degraded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Migrating => "Migrating",
            Phase::Degraded => "Degraded",
        }
    }
}

/// An architecture migration in progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Migration {
    /// The architecture being left.
    pub from: Architecture,
    /// The architecture being migrated to.
    pub to: Architecture,
    /// The step the migration waits in: `EnsuringResultsTopic`,
    /// `StartingWriter`, `RollingWorkers`, `DrainingResults` or
    /// `RemovingWriter` (see the operator's README for each path's steps).
    pub phase: MigrationPhase,
    /// When the migration began.
    pub started_at: Time,
    /// When the current phase began; a phase waiting longer than
    /// `spec.migration.phaseDeadlineSeconds` marks the pipeline `Degraded`.
    /// Absent in statuses written before phases were timed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_started_at: Option<Time>,
}

/// The advisor's recommendation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Advice {
    /// The architecture the signals call for; until they call for another
    /// for `dwellSeconds`, the one that runs.
    pub architecture: Architecture,
    /// Why, with the values that decided it.
    pub reason: String,
    /// Since when this is the advice.
    pub since: Time,
    /// A different recommendation that is waiting out `dwellSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingAdvice>,
    /// The signals of the last evaluation.
    pub signals: AdviceSignals,
    /// When `Apply` last set `spec.architecture`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<Time>,
}

/// A recommendation that has not held for `dwellSeconds` yet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingAdvice {
    /// The architecture the signals call for now.
    pub architecture: Architecture,
    /// Since when they call for it without interruption.
    pub since: Time,
}

/// The signals as the advisor last read them; a field is absent when it
/// could not be measured (no pod answered, Kafka unreachable, too few readings).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdviceSignals {
    /// When they were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_at: Option<Time>,
    /// Mean utilisation of the workers, percent: NVML's GPU utilisation, or
    /// the share of time the engine was busy where no GPU is seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<i32>,
    /// `gpu` or `engineBusy`: where `utilizationPercent` comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_source: Option<String>,
    /// Messages on the jobs topic the workers have not committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs_lag: Option<i64>,
    /// How fast that lag grows, messages per minute (negative: shrinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_growth_per_minute: Option<i64>,
    /// Mean time of a job's final database write since the last reading, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_finish_millis: Option<i64>,
    /// Worker and writer pods whose metrics were read.
    #[serde(default)]
    pub pods_read: i32,
}

/// Steps of a migration, in the order each path takes them (see `migration.rs`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum MigrationPhase {
    /// → writer: the results topic must exist before anything publishes to it.
    EnsuringResultsTopic,
    /// → writer: writer pods must be Available before workers hand results to them.
    StartingWriter,
    /// Workers roll to the target mode; done when no pod of another mode is
    /// left, terminating ones included.
    RollingWorkers,
    /// writer →: every worker pod (terminating ones included) writes directly;
    /// the writer drains the results topic.
    DrainingResults,
    /// writer →: results lag was 0; the writer is being deleted.
    RemovingWriter,
}

/// The CRD as YAML, exactly as `ocr-operator crdgen` writes it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&OcrPipeline::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kafka(extra: serde_json::Value) -> KafkaSpec {
        let mut spec = serde_json::json!({"bootstrapServers": "kafka:9092"});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        serde_json::from_value(spec).expect("kafka spec")
    }

    #[test]
    fn names_left_out_come_from_namespace_and_name() {
        let queues = QueueNames::resolve(&kafka(serde_json::json!({})), "team-a", "invoices");
        assert_eq!(queues.jobs_topic, "team-a.invoices.jobs");
        assert_eq!(queues.results_topic, "team-a.invoices.results");
        assert_eq!(queues.dead_letter_topic, "team-a.invoices.dead-letter");
        assert_eq!(queues.consumer_group, "team-a.invoices.worker");
        assert_eq!(queues.writer_group, "team-a.invoices.writer");
        let other = QueueNames::resolve(&kafka(serde_json::json!({})), "team-b", "invoices");
        assert_ne!(queues.jobs_topic, other.jobs_topic);
        assert_ne!(queues.consumer_group, other.consumer_group);
    }

    #[test]
    fn names_set_in_the_spec_win_and_the_prefix_applies_to_the_rest() {
        let queues = QueueNames::resolve(
            &kafka(serde_json::json!({
                "topics": {"prefix": "shop", "jobs": "incoming"},
                "writerGroup": "persisters",
            })),
            "ns",
            "p",
        );
        assert_eq!(queues.jobs_topic, "incoming");
        assert_eq!(queues.results_topic, "shop.results");
        assert_eq!(queues.consumer_group, "shop.worker");
        assert_eq!(queues.writer_group, "persisters");
    }

    #[test]
    fn a_long_name_still_gives_valid_distinct_topics() {
        let long = "n".repeat(253);
        let a = QueueNames::resolve(&kafka(serde_json::json!({})), "ns", &long);
        let b = QueueNames::resolve(
            &kafka(serde_json::json!({})),
            "ns",
            &format!("{}m", &long[..252]),
        );
        for name in a.topics() {
            assert!(name.len() <= MAX_TOPIC_NAME, "{} chars", name.len());
            assert!(name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
        }
        assert_ne!(a.jobs_topic, b.jobs_topic);
    }
}
