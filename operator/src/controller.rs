//! Reconcile: observe → plan (migration state machine) → build → apply →
//! delete orphans → write status, inside kube's finalizer helper.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as K8sEvent, EventType, Recorder};
use kube::runtime::finalizer::{finalizer, Event};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::advisor::{self, Memory};
use crate::build::{
    self, object_name, owned_selector, role_selector, Capabilities, ManagedKind, Role,
    COMPONENT_LABEL, MANAGER,
};
use crate::crd::{
    Advice, AdviceSignals, Architecture, AutoArchitectureMode, Migration, OcrPipeline,
    OcrPipelineStatus, PendingAdvice, GROUP, KIND, VERSION,
};
use crate::kafka::{Cluster, KafkaAdmin, TopicSpec};
use crate::metrics::Metrics;
use crate::migration::{self, Observed};
use crate::status::{self, role_state, Observation};
use crate::validate::{validate, InvalidSpec};

pub const FINALIZER: &str = "ocr.serving.dev/cleanup";
/// While something is moving, look again soon; Deployment events also trigger reconciles.
const BUSY_REQUEUE: Duration = Duration::from_secs(10);
const IDLE_REQUEUE: Duration = Duration::from_secs(300);
/// How often the advisor reads the signals when it is on.
const ADVISE_PERIOD: Duration = Duration::from_secs(15);
/// The field manager of `spec.architecture` when the advisor sets it.
const ADVISOR_MANAGER: &str = "ocr-operator-advisor";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// The API server refused (or could not take) an object this round
    /// renders, or the deletion of one it no longer renders.
    #[error("{verb} {kind} {name}: {detail}")]
    Apply {
        verb: &'static str,
        kind: &'static str,
        name: String,
        detail: String,
        #[source]
        source: Box<kube::Error>,
    },
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
    #[error(
        "{pods} worker pod(s) in writer mode (terminating ones included) may still publish results; deletion keeps the writer until they are gone"
    )]
    WriterModeWorkersLeft { pods: usize },
    #[error("{pods} pod(s) of the pipeline are left; its topics are deleted once they are gone")]
    PodsLeft { pods: usize },
    #[error("deleting the pipeline's topics: {reason}")]
    TopicDeletion { reason: String },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// A small, fixed set of values for the failure metric's label.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Apply { .. } => "apply",
            Error::Build(_) => "build",
            Error::NoNamespace => "no_namespace",
            Error::Parse { .. } => "parse",
            Error::WriterDraining { .. } => "writer_draining",
            Error::WriterModeWorkersLeft { .. } => "writer_mode_workers_left",
            Error::PodsLeft { .. } => "pods_left",
            Error::TopicDeletion { .. } => "topic_deletion",
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

/// What the API server said, without the debug dump `kube::Error` prints.
fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} ({}): {}", status.reason, status.code, status.message)
        }
        other => other.to_string(),
    }
}

fn apply_error(verb: &'static str, kind: ManagedKind, name: &str, source: kube::Error) -> Error {
    Error::Apply {
        verb,
        kind: kind.name(),
        name: name.to_string(),
        detail: api_message(&source),
        source: Box::new(source),
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub kafka: Arc<dyn KafkaAdmin>,
    pub capabilities: Capabilities,
    pub metrics: Arc<Metrics>,
    /// The advisor's readings of each pipeline's pods and lag.
    pub signals: crate::signals::Scraper,
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
    status::pod_spec_mode(deployment?.spec.as_ref()?.template.spec.as_ref()?)
}

/// The worker pods as they are now, terminating ones included (a list returns
/// pods with a `deletionTimestamp` until they are gone), found by the worker
/// Deployment's selector.
async fn list_worker_pods(
    ctx: &Context,
    ns: &str,
    pipeline: &str,
) -> Result<Vec<Option<Architecture>>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let params = ListParams::default().labels(&role_selector(pipeline, Role::Worker));
    let listed = pods.list(&params).await?;
    Ok(status::worker_pod_modes(&listed.items))
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
    if let Some(given_up) = &plan.reverted {
        let next = match after {
            Some(a) => format!("{} → {}: {:?}", a.from, a.to, a.phase),
            None => format!("running {}", plan.architecture),
        };
        return Some((
            "MigrationReverted",
            format!(
                "{} → {} turned back in {:?} (the spec changed); {next}",
                given_up.from, given_up.to, given_up.phase
            ),
        ));
    }
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

/// The migration this round completed: it had run before and was neither
/// turned back nor is it still running.
fn finished_migration<'a>(
    before: Option<&'a Migration>,
    after: Option<&Migration>,
    plan: &migration::Plan,
) -> Option<&'a Migration> {
    let before = before?;
    if plan.reverted.is_some() {
        return None;
    }
    let still_running = after.is_some_and(|a| {
        a.from == before.from && a.to == before.to && a.started_at == before.started_at
    });
    (!still_running).then_some(before)
}

/// One Warning event when the pipeline turns `Degraded`, or when the reason
/// changes: each new failure is announced once, not at every round it lasts.
async fn publish_degraded(
    ctx: &Context,
    pipeline: &OcrPipeline,
    previous: Option<&OcrPipelineStatus>,
    current: &OcrPipelineStatus,
) {
    if let Some((reason, note)) = status::newly_degraded(previous, current) {
        warn!(pipeline = %pipeline.name_any(), %reason, %note, "pipeline degraded");
        publish(ctx, pipeline, EventType::Warning, &reason, note).await;
    }
}

/// The Secrets the rendered pods read through `secretKeyRef` (all required),
/// by name, with the keys they read. Kafka's Secrets are left out: the
/// operator reads those itself for its Kafka clients and reports them as
/// Kafka failures.
pub fn required_secrets(
    pipeline: &OcrPipeline,
    rendered: &build::Rendered,
) -> BTreeMap<String, BTreeSet<String>> {
    let security = &pipeline.spec.kafka.security;
    let kafka_secrets: BTreeSet<&str> = security
        .sasl
        .as_ref()
        .map(|sasl| sasl.secret.as_str())
        .into_iter()
        .chain(
            security
                .tls
                .as_ref()
                .and_then(|tls| tls.ca_secret.as_deref()),
        )
        .collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for object in rendered
        .objects
        .iter()
        .filter(|o| o.kind == ManagedKind::Deployment)
    {
        let pod = &object.body["spec"]["template"]["spec"];
        let containers = ["initContainers", "containers"]
            .into_iter()
            .filter_map(|field| pod[field].as_array())
            .flatten();
        let references = containers
            .filter_map(|c| c["env"].as_array())
            .flatten()
            .map(|env| &env["valueFrom"]["secretKeyRef"])
            .filter(|r| r["optional"] != serde_json::Value::Bool(true));
        for reference in references {
            if let (Some(name), Some(key)) = (reference["name"].as_str(), reference["key"].as_str())
            {
                if !kafka_secrets.contains(name) {
                    out.entry(name.to_string())
                        .or_default()
                        .insert(key.to_string());
                }
            }
        }
    }
    out
}

/// Why the pods of this round cannot get their Secrets, if they cannot: a
/// pod whose Secret or key is missing never starts, and its Deployment
/// reports that only after its progress deadline (10 minutes).
async fn check_secrets(
    ctx: &Context,
    ns: &str,
    pipeline: &OcrPipeline,
    rendered: &build::Rendered,
) -> Vec<String> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut problems = Vec::new();
    for (name, keys) in required_secrets(pipeline, rendered) {
        let secret = match secrets.get_opt(&name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                problems.push(format!(
                    "Secret {name} not found; the pods that read it cannot start"
                ));
                continue;
            }
            Err(error) => {
                problems.push(format!("reading Secret {name}: {}", api_message(&error)));
                continue;
            }
        };
        let present = |key: &String| secret.data.as_ref().is_some_and(|d| d.contains_key(key));
        let missing: Vec<&str> = keys
            .iter()
            .filter(|key| !present(key))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "Secret {name} has no key {}; the pods that read it cannot start",
                missing.join(", ")
            ));
        }
    }
    problems
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

async fn apply(cached: Arc<OcrPipeline>, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let name = cached.name_any();
    let now = now();
    let pipelines: Api<OcrPipeline> = Api::namespaced(ctx.client.clone(), ns);
    // The status is the migration's memory (phase, created topics). The
    // watch cache can lag behind this operator's own last status write (an
    // owned Deployment's event may trigger the next round first), and a round
    // computed from a stale status would undo the last one; the API server
    // answers with what was written.
    let pipeline = match pipelines.get_opt(&name).await? {
        Some(fresh) => fresh,
        None => {
            ctx.metrics.forget_pipeline(ns, &name);
            ctx.signals.forget(ns, &name);
            return Ok(Action::await_change());
        }
    };
    let generation = pipeline.metadata.generation;
    let previous = pipeline.status.as_ref();

    let valid = match validate(&pipeline) {
        Ok(valid) => valid,
        Err(InvalidSpec(problem)) => {
            warn!(pipeline = %name, %problem, "invalid spec; waiting for a change");
            ctx.metrics.reconcile_failed("invalid_spec");
            let status = status::failed(previous, status::INVALID_SPEC, &problem, generation, &now);
            patch_status(&pipelines, &name, &status).await?;
            ctx.metrics.record_pipeline(ns, &name, &status, None, &now);
            publish(
                ctx,
                &pipeline,
                EventType::Warning,
                status::INVALID_SPEC,
                problem,
            )
            .await;
            // Retrying cannot fix the spec; the next edit triggers a reconcile.
            return Ok(Action::await_change());
        }
    };

    let existing = list_owned(ctx, ns, &name).await?;
    let api_deployment = deployment_of(&existing, &name, Role::Api)?;
    let worker_deployment = deployment_of(&existing, &name, Role::Worker)?;
    let writer_deployment = deployment_of(&existing, &name, Role::Writer)?;
    let api_state = role_state(api_deployment.as_ref());
    let mut worker_state = role_state(worker_deployment.as_ref());
    let writer_state = role_state(writer_deployment.as_ref());
    let live_mode = live_worker_mode(worker_deployment.as_ref());

    // The worker pods are listed BEFORE Kafka is asked for the results lag. A
    // zero lag only proves the drain is over if nothing could publish after it
    // was read; a listing without writer-mode pods (terminating ones included)
    // that precedes the reading proves that, a later listing would not (a pod
    // seen gone afterwards may have published in between).
    let worker_pod_modes = list_worker_pods(ctx, ns, &name).await?;

    let desired = pipeline.spec.architecture;
    // `None` when the status holds no architecture (first deploy, or a status
    // that was lost): `migration::step` then reads what runs from the cluster.
    let applied = previous.and_then(|s| s.architecture);
    let migration = previous.and_then(|s| s.migration.as_ref());
    let involves_writer =
        migration.is_some_and(|m| m.from == Architecture::Writer || m.to == Architecture::Writer);
    let results_in_play = applied == Some(Architecture::Writer)
        || desired == Architecture::Writer
        || involves_writer
        || writer_state.present;
    // Whenever this round might remove the writer: a writer → X migration, or
    // a writer that the spec no longer asks for (a migration to writer being
    // turned back, or a lost status next to a writer).
    let lag_needed = migration.is_some_and(|m| m.from == Architecture::Writer)
        || (desired != Architecture::Writer && (writer_state.present || involves_writer));
    let kafka = observe_kafka(ctx, ns, &pipeline, results_in_play, lag_needed).await;

    let observed = Observed {
        worker_mode: live_mode,
        workers_rolled_out: worker_state.rolled_out,
        worker_pod_modes: worker_pod_modes.clone(),
        writer_present: writer_state.present,
        writer_available: writer_state.rolled_out && writer_state.available_replicas > 0,
        results_topic_ready: kafka.topics_ready && results_in_play,
        results_lag: kafka.results_lag,
    };
    // Replica counts leave out terminating pods: while a pod of another mode
    // still runs, the workers are not rolled out (shown in `Ready`).
    worker_state.rolled_out &= worker_pod_modes.iter().all(|m| *m == live_mode);
    let plan = migration::step(applied, migration, desired, &observed, &now);
    if plan.migration.as_ref().map(|m| m.phase) != migration.map(|m| m.phase) {
        info!(pipeline = %name, from = ?migration.map(|m| m.phase), to = ?plan.migration.as_ref().map(|m| m.phase), "migration phase");
    }
    if let Some(given_up) = &plan.reverted {
        info!(pipeline = %name, from = %given_up.from, to = %given_up.to, phase = ?given_up.phase, %desired, "migration turned back");
    }

    let rendered = build::render(&valid, &plan, ctx.capabilities)?;
    let outcome = match apply_objects(ctx, ns, &rendered, &existing).await {
        Ok(()) => delete_orphans(ctx, ns, &name, &existing, &rendered).await,
        Err(error) => Err(error),
    };
    if let Err(error) = outcome {
        // The status keeps the last round that was acted on (its migration
        // step above all); only `Degraded` says what the API server refused.
        let status = status::failed(
            previous,
            status::APPLY_FAILED,
            &error.to_string(),
            generation,
            &now,
        );
        match patch_status(&pipelines, &name, &status).await {
            Ok(()) => {
                ctx.metrics.record_pipeline(ns, &name, &status, None, &now);
                publish_degraded(ctx, &pipeline, previous, &status).await;
            }
            Err(write) => {
                warn!(pipeline = %name, error = %write, "writing the status of a failed apply")
            }
        }
        return Err(error);
    }
    let secret_problems = check_secrets(ctx, ns, &pipeline, &rendered).await;

    let mut warnings = rendered.warnings.clone();
    warnings.extend(kafka.warnings);
    let seen = Observation {
        api: &api_state,
        worker: &worker_state,
        writer: &writer_state,
        warnings: &warnings,
        // Listed from the plan, so a finished writer → direct migration drops the results topic.
        topics: build::desired_topics(&pipeline, build::needs_results_topic(&plan)),
        queues: pipeline.queues(),
        created_topics: kafka.created,
        kafka_error: (!kafka.errors.is_empty()).then(|| kafka.errors.join("; ")),
        secret_problems,
        phase_deadline_seconds: pipeline.spec.migration.phase_deadline_seconds,
        url: build::api_url(&name, ns, &pipeline),
    };
    let mut new_status = status::compute(previous, &plan, &seen, generation, &now);
    let settled = new_status.phase == Some(crate::crd::Phase::Running);
    let advised = advise(ctx, ns, &pipeline, &mut new_status, generation, &now).await;
    patch_status(&pipelines, &name, &new_status).await?;
    ctx.metrics
        .record_pipeline(ns, &name, &new_status, kafka.results_lag, &now);
    if let Some(finished) = finished_migration(migration, plan.migration.as_ref(), &plan) {
        ctx.metrics.migration_finished(finished, &now);
    }
    if let Some((reason, note)) = migration_event(migration, plan.migration.as_ref(), &plan) {
        publish(ctx, &pipeline, EventType::Normal, reason, note).await;
    }
    publish_degraded(ctx, &pipeline, previous, &new_status).await;
    for (reason, note) in advised.events {
        publish(ctx, &pipeline, EventType::Normal, reason, note).await;
    }
    let next = if settled { IDLE_REQUEUE } else { BUSY_REQUEUE };
    Ok(Action::requeue(if advised.on {
        next.min(ADVISE_PERIOD)
    } else {
        next
    }))
}

/// What the advisor's round did, for the caller to announce.
struct Advised {
    on: bool,
    events: Vec<(&'static str, String)>,
}

fn seconds(time: &Time) -> i64 {
    time.0.as_second()
}

/// `at` as a `Time`, reusing `earlier` when it is the same second (a status
/// rewritten with the same value is no change).
fn time_at(at: i64, earlier: Option<&Time>, now: &Time) -> Time {
    match earlier {
        Some(t) if seconds(t) == at => t.clone(),
        _ => Timestamp::from_second(at)
            .map(Time)
            .unwrap_or_else(|_| now.clone()),
    }
}

/// The advisor's round (`spec.autoArchitecture`): reads the signals, updates
/// `status.advice` and the `ArchitectureAdvice` condition and, in `Apply`,
/// sets `spec.architecture` to the advice when a switch is due.
async fn advise(
    ctx: &Context,
    ns: &str,
    pipeline: &OcrPipeline,
    status: &mut OcrPipelineStatus,
    generation: Option<i64>,
    now: &Time,
) -> Advised {
    let name = pipeline.name_any();
    let rule = &pipeline.spec.auto_architecture;
    let previous = status.advice.take();
    if rule.mode == AutoArchitectureMode::Disabled {
        ctx.signals.forget(ns, &name);
        status
            .conditions
            .retain(|c| c.type_ != status::ARCHITECTURE_ADVICE);
        return Advised {
            on: false,
            events: Vec::new(),
        };
    }
    let cluster = kafka_cluster(ctx, ns, pipeline).await.ok();
    let signals = crate::signals::read(ctx, ns, pipeline, cluster.as_ref()).await;
    let verdict = advisor::verdict(&signals, rule);
    let now_s = seconds(now);
    let spec_architecture = pipeline.spec.architecture;
    let memory = match &previous {
        Some(advice) => Memory {
            architecture: advice.architecture,
            since: seconds(&advice.since),
            pending: advice
                .pending
                .as_ref()
                .map(|p| (p.architecture, seconds(&p.since))),
        },
        None => Memory::start(spec_architecture, now_s),
    };
    let memory = advisor::remember(memory, &verdict, now_s, rule.dwell_seconds);
    let earlier = previous.as_ref();
    let mut advice = Advice {
        architecture: memory.architecture,
        reason: verdict.reason().to_string(),
        since: time_at(memory.since, earlier.map(|a| &a.since), now),
        pending: memory.pending.map(|(architecture, since)| PendingAdvice {
            architecture,
            since: time_at(
                since,
                earlier.and_then(|a| a.pending.as_ref()).map(|p| &p.since),
                now,
            ),
        }),
        signals: AdviceSignals {
            observed_at: Some(now.clone()),
            utilization_percent: signals
                .utilization
                .map(|(ratio, _)| (ratio * 100.0).round() as i32),
            utilization_source: signals
                .utilization
                .map(|(_, source)| source.as_str().to_string()),
            jobs_lag: signals.jobs_lag.map(|lag| lag.min(i64::MAX as u64) as i64),
            lag_growth_per_minute: signals
                .lag_growth_per_second
                .map(|g| (g * 60.0).round() as i64),
            store_finish_millis: signals
                .store_finish_seconds
                .map(|s| (s * 1000.0).round() as i64),
            pods_read: signals.pods_read as i32,
        },
        applied_at: earlier.and_then(|a| a.applied_at.clone()),
    };
    let mut events = Vec::new();
    if earlier.map(|a| a.architecture) != Some(advice.architecture) {
        events.push((
            "ArchitectureAdvice",
            format!(
                "advice: {} (was {}): {}",
                advice.architecture,
                earlier
                    .map(|a| a.architecture.to_string())
                    .unwrap_or_else(|| "none".into()),
                advice.reason
            ),
        ));
    }

    // The last change of architecture: an automatic switch, or the end of
    // the last migration (the `Migrating` condition turning false).
    let migration_ended = status
        .conditions
        .iter()
        .find(|c| c.type_ == status::MIGRATING && c.status == "False")
        .map(|c| seconds(&c.last_transition_time));
    let last_change = advice.applied_at.as_ref().map(seconds).max(migration_ended);
    let due = advisor::switch_due(
        rule,
        advice.architecture,
        spec_architecture,
        status.migration.is_some(),
        last_change,
        now_s,
    );
    if let Some(target) = due {
        let pipelines: Api<OcrPipeline> = Api::namespaced(ctx.client.clone(), ns);
        // `test` first: a person's edit since this round's read wins.
        let patch = json!([
            { "op": "test", "path": "/spec/architecture", "value": spec_architecture },
            { "op": "replace", "path": "/spec/architecture", "value": target },
        ]);
        let patch: json_patch::Patch = match serde_json::from_value(patch) {
            Ok(patch) => patch,
            Err(error) => {
                warn!(%error, "building the architecture patch");
                return Advised { on: true, events };
            }
        };
        match pipelines
            .patch(
                &name,
                &PatchParams {
                    field_manager: Some(ADVISOR_MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::<()>::Json(patch),
            )
            .await
        {
            Ok(_) => {
                info!(pipeline = %name, from = %spec_architecture, to = %target, "advisor switched the architecture");
                advice.applied_at = Some(now.clone());
                events.push((
                    "ArchitectureSwitched",
                    format!(
                        "spec.architecture {spec_architecture} → {target} (autoArchitecture Apply): {}",
                        advice.reason
                    ),
                ));
            }
            Err(error) => {
                warn!(pipeline = %name, error = %api_message(&error), "the advisor could not set spec.architecture")
            }
        }
    }
    let follows = advice.architecture == spec_architecture || due.is_some();
    status::set_condition(
        &mut status.conditions,
        status::ARCHITECTURE_ADVICE,
        follows,
        if follows {
            "SpecFollowsAdvice"
        } else {
            "AdviceDiffers"
        },
        format!("{}: {}", advice.architecture, advice.reason),
        generation,
        now,
    );
    status.advice = Some(advice);
    Advised { on: true, events }
}

struct KafkaView {
    topics_ready: bool,
    /// Topics this round created.
    created: Vec<String>,
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
    let cluster = match kafka_cluster(ctx, ns, pipeline).await {
        Ok(cluster) => cluster,
        Err(problem) => {
            return KafkaView {
                topics_ready: false,
                created: Vec::new(),
                results_lag: None,
                errors: vec![problem],
                warnings,
            }
        }
    };
    let mut created = Vec::new();
    let topics_ready = match ctx.kafka.ensure_topics(&cluster, &topics).await {
        Ok(report) => {
            if !report.created.is_empty() {
                info!(pipeline = %pipeline.name_any(), topics = ?report.created, "created topics");
            }
            warnings.extend(report.shortfalls.iter().map(|s| s.to_string()));
            created = report.created;
            true
        }
        Err(e) => {
            errors.push(e.to_string());
            false
        }
    };
    // The caller listed the worker pods before this: see `apply`.
    let results_lag = if lag_needed {
        match ctx
            .kafka
            .results_lag(&cluster, &pipeline.queues().results_topic)
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
        created,
        results_lag,
        errors,
        warnings,
    }
}

/// `spec.kafka` with its Secrets read, so the operator's own clients connect
/// the way the pipeline's pods do. Read on every reconcile: a rotated
/// password is picked up without a restart.
async fn kafka_cluster(ctx: &Context, ns: &str, pipeline: &OcrPipeline) -> Result<Cluster, String> {
    let security = &pipeline.spec.kafka.security;
    if security.is_plaintext() {
        return Ok(Cluster::of(pipeline));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut client = ocr_contract::KafkaSecurityConfig {
        protocol: security.protocol(),
        ..ocr_contract::KafkaSecurityConfig::default()
    };
    if let Some(sasl) = &security.sasl {
        let secret = read_secret(&secrets, &sasl.secret).await?;
        let username = match &sasl.username {
            Some(username) => username.clone(),
            None => secret_text(&secret, &sasl.secret, &sasl.username_key)?,
        };
        client.sasl_mechanism = sasl.mechanism;
        client.sasl_username = username;
        client.sasl_password = secret_text(&secret, &sasl.secret, &sasl.password_key)?.into();
    }
    if let Some(tls) = &security.tls {
        if let Some(name) = &tls.ca_secret {
            let secret = read_secret(&secrets, name).await?;
            client.ssl_ca_pem = secret_text(&secret, name, &tls.ca_key)?.into();
        }
    }
    Ok(Cluster::of(pipeline).with_security(client))
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
/// A Deployment whose replica count an autoscaler has just been given keeps
/// its count through [`build::replicas_handover`] first.
async fn apply_objects(
    ctx: &Context,
    ns: &str,
    rendered: &build::Rendered,
    existing: &[(ManagedKind, DynamicObject)],
) -> Result<(), Error> {
    let params = PatchParams::apply(MANAGER).force();
    for object in &rendered.objects {
        let api = dynamic_api(ctx, ns, object.kind);
        if object.kind == ManagedKind::Deployment {
            let live = live_deployment(existing, &object.name)?;
            if let Some(handover) = build::replicas_handover(object, live.as_ref()) {
                hand_over_replicas(&api, &object.name, &handover)
                    .await
                    .map_err(|e| {
                        apply_error("handing over the replicas of", object.kind, &object.name, e)
                    })?;
            }
        }
        api.patch(&object.name, &params, &Patch::Apply(&object.body))
            .await
            .map_err(|e| apply_error("applying", object.kind, &object.name, e))?;
    }
    Ok(())
}

fn live_deployment(
    existing: &[(ManagedKind, DynamicObject)],
    name: &str,
) -> Result<Option<Deployment>, Error> {
    existing
        .iter()
        .find(|(kind, o)| *kind == ManagedKind::Deployment && o.name_any() == name)
        .map(|(_, o)| {
            o.clone()
                .try_parse::<Deployment>()
                .map_err(|source| Error::Parse {
                    kind: "Deployment",
                    name: name.to_owned(),
                    source,
                })
        })
        .transpose()
}

/// Not forced: an autoscaler that changed the count since it was listed owns
/// the field now, the apply conflicts, and nothing is left to hand over.
async fn hand_over_replicas(
    api: &Api<DynamicObject>,
    name: &str,
    body: &serde_json::Value,
) -> Result<(), kube::Error> {
    let params = PatchParams::apply(build::REPLICAS_HANDOVER_MANAGER);
    match api.patch(name, &params, &Patch::Apply(body)).await {
        Ok(_) => {
            info!(deployment = %name, replicas = %body["spec"]["replicas"], "replica count handed over to the autoscaler");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
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
            .await
            .map_err(|e| apply_error("deleting", *kind, &object_name, e))?;
    }
    Ok(())
}

/// Deletion: everything but the writer goes at once. The writer (and the
/// finalizer) stay while a worker pod in writer mode is left, terminating ones
/// included (it may still publish the results of its last batch), and then
/// while the results lag, read after that listing, is known to be above 0; an
/// unknown lag does not block a deletion the user asked for.
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
        // Listed before the lag is read, as in `apply`: a zero lag read after a
        // listing without writer-mode pods cannot grow any more. The worker
        // Deployment was deleted above; its pods terminate within their grace
        // period, and the error requeues this cleanup until they are gone.
        let publishers = list_worker_pods(ctx, ns, &name)
            .await?
            .into_iter()
            .filter(|mode| migration::may_publish(*mode))
            .count();
        if publishers > 0 {
            return Err(Error::WriterModeWorkersLeft { pods: publishers });
        }
        let topic = pipeline.queues().results_topic;
        let lag = match kafka_cluster(ctx, ns, &pipeline).await {
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
    if pipeline.spec.kafka.delete_topics {
        delete_created_topics(&pipeline, ctx, ns).await?;
    }
    // The finalizer goes next: the pipeline's series go with it.
    ctx.metrics.forget_pipeline(ns, &name);
    ctx.signals.forget(ns, &name);
    Ok(Action::await_change())
}

/// `spec.kafka.deleteTopics`: once no pod of the pipeline is left (a pod
/// still publishing could make the broker create a topic again), the topics
/// the operator created go, except those another pipeline on the same
/// brokers uses. A failure keeps the finalizer and is retried; turning
/// `deleteTopics` off lets the deletion finish without it.
async fn delete_created_topics(
    pipeline: &OcrPipeline,
    ctx: &Context,
    ns: &str,
) -> Result<(), Error> {
    let name = pipeline.name_any();
    let created = pipeline
        .status
        .as_ref()
        .map(|s| s.created_topics.clone())
        .unwrap_or_default();
    if created.is_empty() {
        return Ok(());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let left = pods
        .list(&ListParams::default().labels(&owned_selector(&name)))
        .await?
        .items
        .len();
    if left > 0 {
        return Err(Error::PodsLeft { pods: left });
    }
    let others: Api<OcrPipeline> = Api::all(ctx.client.clone());
    let others = others.list(&ListParams::default()).await?.items;
    let doomed = topics_only_this_pipeline_uses(pipeline, &created, &others);
    let cluster = kafka_cluster(ctx, ns, pipeline)
        .await
        .map_err(|reason| Error::TopicDeletion { reason })?;
    if let Err(e) = ctx.kafka.delete_topics(&cluster, &doomed).await {
        let reason = e.to_string();
        publish(
            ctx,
            pipeline,
            EventType::Warning,
            "TopicDeletionFailed",
            format!("{reason}; retrying (set spec.kafka.deleteTopics=false to delete the pipeline without its topics)"),
        )
        .await;
        return Err(Error::TopicDeletion { reason });
    }
    info!(pipeline = %name, topics = ?doomed, "deleted topics");
    Ok(())
}

/// The topics in `created` that no other pipeline in `all` on the same
/// brokers names (an explicit topic name may be shared on purpose).
pub fn topics_only_this_pipeline_uses(
    pipeline: &OcrPipeline,
    created: &[String],
    all: &[OcrPipeline],
) -> Vec<String> {
    let same = |a: &OcrPipeline, b: &OcrPipeline| {
        a.uid().is_some() && a.uid() == b.uid()
            || (a.namespace() == b.namespace() && a.name_any() == b.name_any())
    };
    let in_use: BTreeSet<String> = all
        .iter()
        .filter(|other| !same(other, pipeline))
        .filter(|other| other.spec.kafka.bootstrap_servers == pipeline.spec.kafka.bootstrap_servers)
        .flat_map(|other| {
            let queues = other.queues();
            [
                queues.jobs_topic,
                queues.results_topic,
                queues.dead_letter_topic,
            ]
        })
        .collect();
    created
        .iter()
        .filter(|topic| !in_use.contains(*topic))
        .cloned()
        .collect()
}
