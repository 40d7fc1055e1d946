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
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
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

use ocr_contract::config::{AuthMode, Config, QueueKind, RenderError};
use ocr_contract::env::{self as contract_env, env_name, keys};

use crate::crd::{AntiAffinity, ApiAuthMode, Architecture, Device, OcrPipeline};
use crate::migration::Plan;
use crate::validate::ValidPipeline;

mod autoscaling;
mod config;
mod deployment;
mod pdb;
mod service;

use autoscaling::{api_hpa_object, worker_scaled_object, worker_trigger_authentication};
use config::{
    blob_env, config_map, env, kafka_env, per_deployment_env, secret_env, webhook_secret_env,
};
pub use config::{pipeline_config, runtime_config};
use deployment::deployment;
pub use deployment::{default_requests, replicas_handover};
use pdb::pdb;
use service::api_service;
pub use service::api_url;

pub const MANAGER: &str = "ocr-operator";
pub const PIPELINE_LABEL: &str = "ocr.serving.dev/pipeline";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const CONFIG_HASH_ANNOTATION: &str = "ocr.serving.dev/config-hash";
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
/// Where `spec.api.auth.keysSecret` is mounted in the API pods.
pub const API_KEYS_DIR: &str = "/var/run/ocr/api-keys";
/// Where `spec.api.tls.secretName` is mounted in the API pods.
pub const TLS_DIR: &str = "/var/run/ocr/tls";
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the pipeline has no {0}")]
    MissingMetadata(&'static str),
    #[error("rendering the runtime configuration: {0}")]
    Config(#[from] RenderError),
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

pub fn render(p: &ValidPipeline, plan: &Plan, caps: Capabilities) -> Result<Rendered, BuildError> {
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
        let valid = crate::validate::validate(p).expect("valid");
        render(&valid, &plan, Capabilities { keda: true }).expect("renders")
    }

    fn deployment(r: &Rendered, role: Role) -> &Value {
        let name = object_name("demo", role.as_str());
        r.objects
            .iter()
            .find(|o| o.kind == ManagedKind::Deployment && o.name == name)
            .map(|o| &o.body)
            .unwrap_or_else(|| panic!("no Deployment {name}"))
    }

    /// `status.url` must name the Service the pipeline really gets, on its HTTP port.
    #[test]
    fn api_url_is_the_rendered_services_address() {
        let p = pipeline(json!({"api": {"service": {"port": 8081}}}));
        let r = rendered(&p);
        let service = r
            .objects
            .iter()
            .find(|o| o.kind == ManagedKind::Service)
            .expect("the API Service");
        let http = service.body["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|port| port["name"] == "http")
            .expect("an http port");
        assert_eq!(http["port"], 8081);
        assert_eq!(
            api_url("demo", "ocr", &p),
            format!("http://{}.ocr.svc:8081", service.name)
        );
    }

    fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
        container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
    }

    fn volume<'a>(d: &'a Value, name: &str) -> Option<&'a Value> {
        d["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
    }

    /// Keys and TLS reach the API pods only: each Secret mounted where the
    /// API's variables point, probes over HTTPS, `status.url` in https; the
    /// workers and writers (which serve no clients) are left as they were.
    #[test]
    fn api_keys_and_certificate_are_wired_into_the_api_pods_only() {
        let p = pipeline(json!({"api": {
            "auth": {"keysSecret": "tenants"},
            "tls": {"secretName": "api-cert"},
        }}));
        let r = rendered(&p);
        let api = deployment(&r, Role::Api);
        let c = container(api, "api");
        assert_eq!(
            volume(api, "api-keys").expect("keys volume")["secret"]["secretName"],
            "tenants"
        );
        assert_eq!(
            volume(api, "tls").expect("tls volume")["secret"]["secretName"],
            "api-cert"
        );
        let mounted = |name: &str| {
            c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == name)
                .and_then(|m| m["mountPath"].as_str())
                .map(str::to_owned)
        };
        assert_eq!(mounted("api-keys").as_deref(), Some(API_KEYS_DIR));
        assert_eq!(
            env_value(c, &env_name(keys::AUTH_KEYS_DIR)),
            Some(API_KEYS_DIR)
        );
        assert_eq!(env_value(c, &env_name(keys::AUTH_MODE)), Some("required"));
        let cert = env_value(c, &env_name(keys::TLS_CERT_FILE)).expect("cert file");
        assert!(cert.starts_with(&mounted("tls").expect("tls mount")));
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            assert_eq!(c[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
        }
        assert!(api_url("demo", "ocr", &p).starts_with("https://"));
        let shared = r
            .objects
            .iter()
            .find(|o| o.kind == ManagedKind::ConfigMap)
            .expect("the shared configuration");
        assert!(!shared.body.to_string().contains("/var/run/ocr"));
        for role in [Role::Worker, Role::Writer] {
            let d = deployment(&r, role);
            let c = container(d, role.as_str());
            assert!(volume(d, "api-keys").is_none() && volume(d, "tls").is_none());
            assert_eq!(env_value(c, &env_name(keys::AUTH_MODE)), None);
            assert!(c["readinessProbe"]["httpGet"]["scheme"].is_null());
        }
    }

    /// A pipeline that says nothing about auth requires keys.
    #[test]
    fn the_api_requires_keys_unless_told_otherwise() {
        let r = rendered(&pipeline(json!({})));
        let c = container(deployment(&r, Role::Api), "api");
        assert_eq!(env_value(c, &env_name(keys::AUTH_MODE)), Some("required"));
        assert_eq!(env_value(c, &env_name(keys::AUTH_KEYS_DIR)), None);
        let r = rendered(&pipeline(json!({"api": {"auth": {"mode": "Disabled"}}})));
        let c = container(deployment(&r, Role::Api), "api");
        assert_eq!(env_value(c, &env_name(keys::AUTH_MODE)), Some("disabled"));
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
