//! Reconcile: observe → plan (migration state machine) → build → apply →
//! delete orphans → write status, inside kube's finalizer helper.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::build::{
    self, object_name, owned_selector, Capabilities, ManagedKind, Role, COMPONENT_LABEL, MANAGER,
    WORKER_MODE_ENV,
};
use crate::crd::{
    Architecture, KafkaSpec, Migration, OcrPipeline, OcrPipelineSpec, OcrPipelineStatus, GROUP,
    KIND, VERSION,
};
use crate::kafka::{ClientSecurity, Cluster, KafkaAdmin, SaslCredentials, TopicSpec};
use crate::metrics::Metrics;
use crate::migration::{self, Observed};
use crate::status::{self, role_state, Observation};

pub const FINALIZER: &str = "ocr.serving.dev/cleanup";
/// While something is moving, look again soon; Deployment events also trigger reconciles.
const BUSY_REQUEUE: Duration = Duration::from_secs(10);
const IDLE_REQUEUE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error("the OcrPipeline has no namespace")]
    NoNamespace,
    #[error("reading {kind} {name}: {source}")]
    Parse {
        kind: &'static str,
        name: String,
        source: kube::core::dynamic::ParseDynamicObjectError,
    },
    #[error("the writer still has {lag} results to persist; deletion waits for it")]
    WriterDraining { lag: u64 },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A small, fixed set of values for the failure metric's label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Build(_) => "build",
            Error::NoNamespace => "no_namespace",
            Error::Parse { .. } => "parse",
            Error::WriterDraining { .. } => "writer_draining",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.category(),
                _ => "finalizer",
            },
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub kafka: Arc<dyn KafkaAdmin>,
    pub capabilities: Capabilities,
    pub metrics: Arc<Metrics>,
}

pub async fn reconcile(pipeline: Arc<OcrPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = pipeline.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<OcrPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(&api, FINALIZER, pipeline, |event| async {
        match event {
            Event::Apply(p) => apply(p, &ctx, &ns).await,
            Event::Cleanup(p) => cleanup(p, &ctx, &ns).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.observe_reconcile(started.elapsed());
    result
}

pub fn error_policy(pipeline: Arc<OcrPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(pipeline = %pipeline.name_any(), %error, "reconcile failed");
    ctx.metrics.reconcile_failed(error.category());
    Action::requeue(BUSY_REQUEUE)
}

/// Checks the schema cannot express or that an old CRD version may not have enforced.
pub fn validate(spec: &OcrPipelineSpec) -> Result<(), String> {
    let source = &spec.model.source;
    if source.volume.is_some() == source.url.is_some() {
        return Err("spec.model.source: set exactly one of volume or url".into());
    }
    if let Some(url) = &source.url {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err("spec.model.source.url must be http(s)".into());
        }
    }
    if spec.blob.s3.is_some() == spec.blob.volume.is_some() {
        return Err("spec.blob: set exactly one of s3 or volume".into());
    }
    if let Some(endpoint) = spec.blob.s3.as_ref().and_then(|s3| s3.endpoint.as_ref()) {
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err("spec.blob.s3.endpoint must be http(s)".into());
        }
    }
    if spec.kafka.bootstrap_servers.trim().is_empty() {
        return Err("spec.kafka.bootstrapServers is empty".into());
    }
    if let Some(api) = &spec.autoscaling.api {
        if api.min_replicas < 1 || api.max_replicas < api.min_replicas {
            return Err("spec.autoscaling.api: need 1 <= minReplicas <= maxReplicas".into());
        }
    }
    if let Some(worker) = &spec.autoscaling.worker {
        if worker.min_replicas < 0 || worker.max_replicas < worker.min_replicas.max(1) {
            return Err("spec.autoscaling.worker: need 0 <= minReplicas <= maxReplicas".into());
        }
    }
    let budget = &spec.availability.disruption_budget;
    if budget.min_available.is_some() && budget.max_unavailable.is_some() {
        return Err(
            "spec.availability.disruptionBudget: set at most one of minAvailable or maxUnavailable"
                .into(),
        );
    }
    for (field, value) in [
        ("api.replicas", spec.api.replicas),
        ("worker.replicas", spec.worker.replicas),
    ] {
        if value < 0 {
            return Err(format!("spec.{field} must not be negative"));
        }
    }
    if spec.writer.replicas < 1 {
        return Err("spec.writer.replicas must be at least 1".into());
    }
    if spec.writer.retry_initial_ms < 1 || spec.writer.retry_max_ms < spec.writer.retry_initial_ms {
        return Err("spec.writer: need 1 <= retryInitialMs <= retryMaxMs".into());
    }
    let kafka = &spec.kafka;
    if kafka.consumer_group.trim().is_empty() || kafka.writer_group.trim().is_empty() {
        return Err("spec.kafka: consumerGroup and writerGroup must not be empty".into());
    }
    if kafka.consumer_group == kafka.writer_group {
        return Err(
            "spec.kafka: writerGroup must differ from consumerGroup (workers and writers consume different topics)"
                .into(),
        );
    }
    if spec.kafka.partitions < 1 || spec.kafka.replication_factor < 1 {
        return Err("spec.kafka: partitions and replicationFactor must be at least 1".into());
    }
    Ok(())
}

/// Objects this operator made for the pipeline, as found before this round's apply.
async fn list_owned(
    ctx: &Context,
    ns: &str,
    pipeline: &str,
) -> Result<Vec<(ManagedKind, DynamicObject)>, Error> {
    let params = ListParams::default().labels(&owned_selector(pipeline));
    let mut out = Vec::new();
    for kind in ManagedKind::ALL {
        if kind.needs_keda() && !ctx.capabilities.keda {
            continue;
        }
        for object in dynamic_api(ctx, ns, kind).list(&params).await? {
            out.push((kind, object));
        }
    }
    Ok(out)
}

fn role_of(object: &DynamicObject) -> Option<Role> {
    object
        .labels()
        .get(COMPONENT_LABEL)
        .and_then(|c| Role::from_label(c))
}

fn deployment_of(
    existing: &[(ManagedKind, DynamicObject)],
    pipeline: &str,
    role: Role,
) -> Result<Option<Deployment>, Error> {
    let name = object_name(pipeline, role.as_str());
    existing
        .iter()
        .find(|(kind, o)| {
            *kind == ManagedKind::Deployment && o.name_any() == name && role_of(o) == Some(role)
        })
        .map(|(_, o)| {
            o.clone()
                .try_parse::<Deployment>()
                .map_err(|source| Error::Parse {
                    kind: "Deployment",
                    name: name.clone(),
                    source,
                })
        })
        .transpose()
}

/// The worker mode the live worker pod template carries.
fn live_worker_mode(deployment: Option<&Deployment>) -> Option<Architecture> {
    let containers = &deployment?
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers;
    let value = containers
        .iter()
        .filter_map(|c| c.env.as_ref())
        .flatten()
        .find(|e| e.name == WORKER_MODE_ENV)?
        .value
        .as_deref()?;
    Architecture::ALL.into_iter().find(|a| a.as_str() == value)
}

async fn patch_status(
    api: &Api<OcrPipeline>,
    name: &str,
    status: &OcrPipelineStatus,
) -> Result<(), Error> {
    let body = json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// The event for a migration step, if this round took one.
fn migration_event(
    before: Option<&Migration>,
    after: Option<&Migration>,
    plan: &migration::Plan,
) -> Option<(&'static str, String)> {
    let same = |a: &Migration, b: &Migration| {
        a.from == b.from && a.to == b.to && a.started_at == b.started_at
    };
    match (before, after) {
        (None, Some(m)) => Some((
            "MigrationStarted",
            format!("{} → {}: {:?}", m.from, m.to, m.phase),
        )),
        (Some(b), Some(a)) if !same(b, a) => Some((
            "MigrationStarted",
            format!(
                "{} → {} finished; {} → {}: {:?}",
                b.from, b.to, a.from, a.to, a.phase
            ),
        )),
        (Some(b), Some(a)) if b.phase != a.phase => Some((
            "MigrationProgressed",
            format!("{} → {}: {:?} → {:?}", a.from, a.to, b.phase, a.phase),
        )),
        (Some(b), None) => Some((
            "MigrationCompleted",
            format!("{} → {}; running {}", b.from, b.to, plan.architecture),
        )),
        _ => None,
    }
}

/// Events are for people reading `kubectl describe`; failing to publish one
/// must not fail the reconcile.
async fn publish(
    ctx: &Context,
    pipeline: &OcrPipeline,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = K8sEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = ctx
        .recorder
        .publish(&event, &pipeline.object_ref(&()))
        .await
    {
        warn!(pipeline = %pipeline.name_any(), %error, "publishing an event");
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

async fn apply(pipeline: Arc<OcrPipeline>, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let name = pipeline.name_any();
    let now = now();
    let generation = pipeline.metadata.generation;
    let previous = pipeline.status.as_ref();
    let pipelines: Api<OcrPipeline> = Api::namespaced(ctx.client.clone(), ns);

    if let Err(problem) = validate(&pipeline.spec) {
        warn!(pipeline = %name, %problem, "invalid spec; waiting for a change");
        ctx.metrics.reconcile_failed("invalid_spec");
        let status = status::invalid(previous, &problem, generation, &now);
        patch_status(&pipelines, &name, &status).await?;
        publish(ctx, &pipeline, EventType::Warning, "InvalidSpec", problem).await;
        // Retrying cannot fix the spec; the next edit triggers a reconcile.
        return Ok(Action::await_change());
    }

    let existing = list_owned(ctx, ns, &name).await?;
    let api_deployment = deployment_of(&existing, &name, Role::Api)?;
    let worker_deployment = deployment_of(&existing, &name, Role::Worker)?;
    let writer_deployment = deployment_of(&existing, &name, Role::Writer)?;
    let api_state = role_state(api_deployment.as_ref());
    let worker_state = role_state(worker_deployment.as_ref());
    let writer_state = role_state(writer_deployment.as_ref());

    let live_mode = live_worker_mode(worker_deployment.as_ref());
    // A status that was lost (restored from a backup, edited away) must not make
    // the running topology look like a fresh deploy: that would delete a writer
    // without draining it. The live workers' mode says what is running.
    let applied = previous.and_then(|s| s.architecture).or(live_mode);
    let migration = previous.and_then(|s| s.migration.as_ref());
    let results_in_play = applied == Some(Architecture::Writer)
        || pipeline.spec.architecture == Architecture::Writer
        || migration
            .is_some_and(|m| m.from == Architecture::Writer || m.to == Architecture::Writer);
    let lag_needed = migration.is_some_and(|m| m.from == Architecture::Writer);
    let kafka = observe_kafka(ctx, ns, &pipeline, results_in_play, lag_needed).await;

    let observed = Observed {
        worker_mode: live_mode,
        workers_rolled_out: worker_state.rolled_out,
        writer_present: writer_state.present,
        writer_available: writer_state.rolled_out && writer_state.available_replicas > 0,
        results_topic_ready: kafka.topics_ready && results_in_play,
        results_lag: kafka.results_lag,
    };
    let plan = migration::step(
        applied,
        migration,
        pipeline.spec.architecture,
        &observed,
        &now,
    );
    if plan.migration.as_ref().map(|m| m.phase) != migration.map(|m| m.phase) {
        info!(pipeline = %name, from = ?migration.map(|m| m.phase), to = ?plan.migration.as_ref().map(|m| m.phase), "migration phase");
    }

    let rendered = build::render(&pipeline, &plan, ctx.capabilities)?;
    apply_objects(ctx, ns, &rendered).await?;
    delete_orphans(ctx, ns, &name, &existing, &rendered).await?;

    let mut warnings = rendered.warnings.clone();
    warnings.extend(kafka.warnings);
    let seen = Observation {
        api: &api_state,
        worker: &worker_state,
        writer: &writer_state,
        warnings: &warnings,
        // Listed from the plan, so a finished writer → direct migration drops the results topic.
        topics: build::desired_topics(&pipeline, build::needs_results_topic(&plan)),
        kafka_error: (!kafka.errors.is_empty()).then(|| kafka.errors.join("; ")),
    };
    let new_status = status::compute(previous, &plan, &seen, generation, &now);
    let settled = new_status.phase == Some(crate::crd::Phase::Running);
    patch_status(&pipelines, &name, &new_status).await?;
    if let Some((reason, note)) = migration_event(migration, plan.migration.as_ref(), &plan) {
        publish(ctx, &pipeline, EventType::Normal, reason, note).await;
    }
    Ok(Action::requeue(if settled {
        IDLE_REQUEUE
    } else {
        BUSY_REQUEUE
    }))
}

struct KafkaView {
    topics_ready: bool,
    results_lag: Option<u64>,
    /// Kafka could not be asked; shown in the status.
    errors: Vec<String>,
    /// Kafka answered, but not as the spec asks (too few partitions); shown in `Ready`.
    warnings: Vec<String>,
}

async fn observe_kafka(
    ctx: &Context,
    ns: &str,
    pipeline: &OcrPipeline,
    results_in_play: bool,
    lag_needed: bool,
) -> KafkaView {
    let kafka = &pipeline.spec.kafka;
    let topics: Vec<TopicSpec> = build::desired_topics(pipeline, results_in_play)
        .into_iter()
        .map(|name| TopicSpec {
            name,
            partitions: kafka.partitions,
            replication_factor: kafka.replication_factor,
        })
        .collect();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let cluster = match kafka_cluster(ctx, ns, kafka).await {
        Ok(cluster) => cluster,
        Err(problem) => {
            return KafkaView {
                topics_ready: false,
                results_lag: None,
                errors: vec![problem],
                warnings,
            }
        }
    };
    let topics_ready = match ctx.kafka.ensure_topics(&cluster, &topics).await {
        Ok(report) => {
            if !report.created.is_empty() {
                info!(pipeline = %pipeline.name_any(), topics = ?report.created, "created topics");
            }
            warnings.extend(report.shortfalls.iter().map(|s| s.to_string()));
            true
        }
        Err(e) => {
            errors.push(e.to_string());
            false
        }
    };
    // Measured after the Deployments were listed: if every worker already wrote
    // directly then, nothing can add to the lag after this reading.
    let results_lag = if lag_needed {
        match ctx
            .kafka
            .results_lag(&cluster, &kafka.topics.results())
            .await
        {
            Ok(lag) => Some(lag),
            Err(e) => {
                errors.push(e.to_string());
                None
            }
        }
    } else {
        None
    };
    KafkaView {
        topics_ready,
        results_lag,
        errors,
        warnings,
    }
}

/// `spec.kafka` with its Secrets read, so the operator's own clients connect
/// the way the pipeline's pods do. Read on every reconcile: a rotated
/// password is picked up without a restart.
async fn kafka_cluster(ctx: &Context, ns: &str, spec: &KafkaSpec) -> Result<Cluster, String> {
    let security = &spec.security;
    if security.is_plaintext() {
        return Ok(Cluster::of(spec));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut client = ClientSecurity {
        protocol: security.protocol().into(),
        ..ClientSecurity::default()
    };
    if let Some(sasl) = &security.sasl {
        let secret = read_secret(&secrets, &sasl.secret).await?;
        let username = match &sasl.username {
            Some(username) => username.clone(),
            None => secret_text(&secret, &sasl.secret, &sasl.username_key)?,
        };
        client.sasl = Some(SaslCredentials {
            mechanism: sasl.mechanism.as_str().into(),
            username,
            password: secret_text(&secret, &sasl.secret, &sasl.password_key)?,
        });
    }
    if let Some(tls) = &security.tls {
        if let Some(name) = &tls.ca_secret {
            let secret = read_secret(&secrets, name).await?;
            client.ca_pem = Some(secret_text(&secret, name, &tls.ca_key)?);
        }
    }
    Ok(Cluster::of(spec).with_security(client))
}

async fn read_secret(secrets: &Api<Secret>, name: &str) -> Result<Secret, String> {
    secrets
        .get(name)
        .await
        .map_err(|e| format!("reading the Kafka secret {name}: {e}"))
}

fn secret_text(secret: &Secret, name: &str, key: &str) -> Result<String, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .ok_or_else(|| format!("the Kafka secret {name} has no key {key}"))?;
    String::from_utf8(bytes.0.clone())
        .map_err(|_| format!("the Kafka secret {name} key {key} is not UTF-8 text"))
}

fn dynamic_api(ctx: &Context, ns: &str, kind: ManagedKind) -> Api<DynamicObject> {
    Api::namespaced_with(ctx.client.clone(), ns, &kind.api_resource())
}

/// Server-side apply with one field manager; `force` takes over fields another
/// manager (e.g. a `kubectl edit`) changed, so the spec stays the source of truth.
async fn apply_objects(ctx: &Context, ns: &str, rendered: &build::Rendered) -> Result<(), Error> {
    let params = PatchParams::apply(MANAGER).force();
    for object in &rendered.objects {
        dynamic_api(ctx, ns, object.kind)
            .patch(&object.name, &params, &Patch::Apply(&object.body))
            .await?;
    }
    Ok(())
}

/// Deletes what this operator made earlier and no longer renders (the writer
/// after a migration, an HPA whose autoscaling was turned off, …).
async fn delete_orphans(
    ctx: &Context,
    ns: &str,
    pipeline: &str,
    existing: &[(ManagedKind, DynamicObject)],
    rendered: &build::Rendered,
) -> Result<(), Error> {
    let desired: BTreeSet<(ManagedKind, &str)> = rendered
        .objects
        .iter()
        .map(|o| (o.kind, o.name.as_str()))
        .collect();
    for (kind, object) in existing {
        let object_name = object.name_any();
        if desired.contains(&(*kind, object_name.as_str())) {
            continue;
        }
        info!(pipeline, kind = kind.name(), object = %object_name, "deleting object that is no longer desired");
        dynamic_api(ctx, ns, *kind)
            .delete(&object_name, &DeleteParams::background())
            .await?;
    }
    Ok(())
}

/// Deletion: everything but the writer goes at once. While the writer still has
/// results to persist (lag known and above 0) it stays and the finalizer holds
/// the pipeline; an unknown lag does not block a deletion the user asked for.
async fn cleanup(pipeline: Arc<OcrPipeline>, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let name = pipeline.name_any();
    let existing = list_owned(ctx, ns, &name).await?;
    let writer_name = object_name(&name, Role::Writer.as_str());
    let is_writer = |kind: ManagedKind, object: &DynamicObject| {
        matches!(
            kind,
            ManagedKind::Deployment | ManagedKind::PodDisruptionBudget
        ) && object.name_any() == writer_name
    };
    let mut writer_left = false;
    for (kind, object) in &existing {
        if is_writer(*kind, object) {
            writer_left = true;
            continue;
        }
        dynamic_api(ctx, ns, *kind)
            .delete(&object.name_any(), &DeleteParams::background())
            .await?;
    }
    if writer_left {
        let topic = pipeline.spec.kafka.topics.results();
        let lag = match kafka_cluster(ctx, ns, &pipeline.spec.kafka).await {
            Ok(cluster) => ctx
                .kafka
                .results_lag(&cluster, &topic)
                .await
                .map_err(|e| e.to_string()),
            Err(problem) => Err(problem),
        };
        match lag {
            // An error keeps the finalizer; Ok would let the deletion finish.
            Ok(lag) if lag > 0 => return Err(Error::WriterDraining { lag }),
            Ok(_) => {}
            Err(e) => {
                warn!(pipeline = %name, error = %e, "deleting the writer without knowing the results lag")
            }
        }
        for (kind, object) in existing.iter().filter(|(k, o)| is_writer(*k, o)) {
            dynamic_api(ctx, ns, *kind)
                .delete(&object.name_any(), &DeleteParams::background())
                .await?;
        }
    }
    Ok(Action::await_change())
}
