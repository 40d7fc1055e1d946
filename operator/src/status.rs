//! Pure status computation: observed Deployments and pods + plan → `OcrPipelineStatus`.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{Architecture, OcrPipelineStatus, Phase, QueueNames, ReplicaCounts, RoleReplicas};
use crate::migration::{self, Plan};
use ocr_contract::env::{env_name, keys};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const MIGRATING: &str = "Migrating";
/// Whether `spec.architecture` is what the advisor recommends (only while
/// `spec.autoArchitecture` is not `Off`).
pub const ARCHITECTURE_ADVICE: &str = "ArchitectureAdvice";
/// `Degraded` reason of a migration phase that waited past its deadline.
pub const MIGRATION_STUCK: &str = "MigrationStuck";
/// `Degraded` reason of a Secret the pods need that is missing, unreadable or lacks a key.
pub const SECRET_UNAVAILABLE: &str = "SecretUnavailable";
/// `Degraded` reason of an object the API server refused to apply (or delete).
pub const APPLY_FAILED: &str = "ApplyFailed";
/// `Degraded` reason of a Deployment that reports it cannot progress.
pub const ROLLOUT_STUCK: &str = "RolloutStuck";
/// `Degraded` reason of a Kafka cluster the operator cannot ask (topics, lag, credentials).
pub const KAFKA_UNAVAILABLE: &str = "KafkaUnavailable";
/// `Degraded` reason of a spec the operator refuses to act on.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// One role's Deployment as last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleState {
    pub present: bool,
    /// The controller saw the latest template and every replica runs it and is available.
    pub rolled_out: bool,
    pub available_replicas: i32,
    /// Pods that pass their readiness probe.
    pub ready_replicas: i32,
    /// `spec.replicas` of the live Deployment (set by an autoscaler when one is on).
    pub desired_replicas: i32,
    /// Why the Deployment is stuck, from its own conditions.
    pub failure: Option<String>,
}

impl RoleState {
    fn counts(&self) -> ReplicaCounts {
        ReplicaCounts {
            ready: self.ready_replicas,
            desired: self.desired_replicas,
        }
    }
}

pub fn role_state(deployment: Option<&Deployment>) -> RoleState {
    let Some(d) = deployment else {
        return RoleState::default();
    };
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let generation = d.metadata.generation.unwrap_or(0);
    let status = d.status.clone().unwrap_or_default();
    let rolled_out = status.observed_generation.unwrap_or(0) >= generation
        && status.updated_replicas.unwrap_or(0) == desired
        && status.replicas.unwrap_or(0) == desired
        && status.available_replicas.unwrap_or(0) == desired;
    let failure = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .find_map(|c| {
            let stuck = (c.type_ == "Progressing"
                && c.status == "False"
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
                || (c.type_ == "ReplicaFailure" && c.status == "True");
            stuck.then(|| c.message.unwrap_or(c.type_))
        });
    RoleState {
        present: true,
        rolled_out,
        available_replicas: status.available_replicas.unwrap_or(0),
        ready_replicas: status.ready_replicas.unwrap_or(0),
        desired_replicas: desired,
        failure,
    }
}

/// The worker mode a pod spec runs: `OCR_WORKER__MODE` of its containers.
pub fn pod_spec_mode(spec: &PodSpec) -> Option<Architecture> {
    let value = spec
        .containers
        .iter()
        .filter_map(|c| c.env.as_ref())
        .flatten()
        .find(|e| e.name == env_name(keys::WORKER_MODE))?
        .value
        .as_deref()?;
    Architecture::ALL.into_iter().find(|a| a.as_str() == value)
}

/// The mode of every worker pod that can still run, terminating ones included:
/// a pod with a `deletionTimestamp` keeps running for its grace period and may
/// still publish the results of its last batch. Pods that have finished
/// (`Succeeded`, `Failed`, e.g. evicted) are left out: their containers have
/// exited and will not restart. `None`: a pod whose mode cannot be read.
pub fn worker_pod_modes(pods: &[Pod]) -> Vec<Option<Architecture>> {
    pods.iter()
        .filter(|pod| {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            !matches!(phase, Some("Succeeded" | "Failed"))
        })
        .map(|pod| pod.spec.as_ref().and_then(pod_spec_mode))
        .collect()
}

/// Sets one condition; `lastTransitionTime` changes only when the status does.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" };
    let last_transition_time = conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    let condition = Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

pub struct Observation<'a> {
    pub api: &'a RoleState,
    pub worker: &'a RoleState,
    pub writer: &'a RoleState,
    pub warnings: &'a [String],
    pub topics: Vec<String>,
    /// The topic and consumer-group names in use.
    pub queues: QueueNames,
    /// Topics this round created.
    pub created_topics: Vec<String>,
    /// Kafka could not be asked (topics or lag); `Degraded`, but not fatal.
    pub kafka_error: Option<String>,
    /// Secrets the pods need that are missing, unreadable or lack a key;
    /// `Degraded`: the pods that need them cannot start.
    pub secret_problems: Vec<String>,
    /// `spec.migration.phaseDeadlineSeconds`.
    pub phase_deadline_seconds: i64,
    /// The API Service's in-cluster address.
    pub url: String,
}

pub fn compute(
    previous: Option<&OcrPipelineStatus>,
    plan: &Plan,
    seen: &Observation,
    generation: Option<i64>,
    now: &Time,
) -> OcrPipelineStatus {
    let mut conditions = previous.map(|s| s.conditions.clone()).unwrap_or_default();

    let mut roles = vec![("api", seen.api), ("worker", seen.worker)];
    if plan.writer {
        roles.push(("writer", seen.writer));
    }
    let not_ready: Vec<&str> = roles
        .iter()
        .filter(|(_, s)| !s.rolled_out)
        .map(|(name, _)| *name)
        .collect();
    let failures: Vec<String> = roles
        .iter()
        .filter_map(|(name, s)| s.failure.as_ref().map(|f| format!("{name}: {f}")))
        .collect();
    let ready_roles = format!("{}/{}", roles.len() - not_ready.len(), roles.len());

    let ready = not_ready.is_empty() && plan.migration.is_none();
    let mut ready_message = if not_ready.is_empty() {
        "all roles are available".to_string()
    } else {
        format!("waiting for {}", not_ready.join(", "))
    };
    for warning in seen.warnings {
        ready_message.push_str("; ");
        ready_message.push_str(warning);
    }
    let ready_reason = match (ready, plan.migration.is_some()) {
        (true, _) => "Available",
        (false, true) => "Migrating",
        (false, false) => "RolesUnavailable",
    };
    set_condition(
        &mut conditions,
        READY,
        ready,
        ready_reason,
        ready_message,
        generation,
        now,
    );

    let progressing = !not_ready.is_empty() || plan.migration.is_some();
    set_condition(
        &mut conditions,
        PROGRESSING,
        progressing,
        if progressing { "RollingOut" } else { "Idle" },
        if progressing {
            "the desired topology is being rolled out".into()
        } else {
            "the desired topology is rolled out".into()
        },
        generation,
        now,
    );

    // A phase waiting past its deadline is reported, never acted on: the plan
    // keeps waiting, because every wait guards against losing results.
    let stuck = plan.migration.as_ref().and_then(|m| {
        let waited = migration::overdue(m, seen.phase_deadline_seconds, now)?;
        let waiting_for = plan.waiting_for.map(|w| w.reason()).unwrap_or("Migrating");
        Some(format!(
            "{} → {}: {:?} has waited {waited} s, longer than spec.migration.phaseDeadlineSeconds ({} s); still {waiting_for}",
            m.from, m.to, m.phase, seen.phase_deadline_seconds
        ))
    });
    let mut degraded_messages: Vec<String> = stuck.iter().cloned().collect();
    degraded_messages.extend(seen.secret_problems.iter().cloned());
    degraded_messages.extend(failures.iter().cloned());
    if let Some(error) = &seen.kafka_error {
        degraded_messages.push(format!("kafka: {error}"));
    }
    // The reason names the failure a user should look at first: a missing
    // Secret, for one, is why a rollout gets stuck, not the other way round.
    let degraded_reason = if stuck.is_some() {
        MIGRATION_STUCK
    } else if !seen.secret_problems.is_empty() {
        SECRET_UNAVAILABLE
    } else if !failures.is_empty() {
        ROLLOUT_STUCK
    } else if seen.kafka_error.is_some() {
        KAFKA_UNAVAILABLE
    } else {
        "AsExpected"
    };
    let degraded = !degraded_messages.is_empty();
    set_condition(
        &mut conditions,
        DEGRADED,
        degraded,
        degraded_reason,
        if degraded_messages.is_empty() {
            "no failures observed".into()
        } else {
            degraded_messages.join("; ")
        },
        generation,
        now,
    );

    match (&plan.migration, plan.waiting_for) {
        (Some(m), wait) => {
            let mut message = format!("{} → {}: {:?}", m.from, m.to, m.phase);
            if let Some(error) = &seen.kafka_error {
                message.push_str(&format!(" ({error})"));
            }
            set_condition(
                &mut conditions,
                MIGRATING,
                true,
                wait.map(|w| w.reason()).unwrap_or("Migrating"),
                message,
                generation,
                now,
            )
        }
        (None, _) => set_condition(
            &mut conditions,
            MIGRATING,
            false,
            "NoMigration",
            format!("running the {} architecture", plan.architecture),
            generation,
            now,
        ),
    }

    let phase = if degraded {
        Phase::Degraded
    } else if plan.migration.is_some() {
        Phase::Migrating
    } else if ready {
        Phase::Running
    } else {
        Phase::Pending
    };

    OcrPipelineStatus {
        observed_generation: generation,
        phase: Some(phase),
        architecture: Some(plan.architecture),
        migration: plan.migration.clone(),
        // The advisor's round updates it.
        advice: previous.and_then(|s| s.advice.clone()),
        url: Some(seen.url.clone()),
        ready_roles: Some(ready_roles),
        replicas: Some(RoleReplicas {
            api: seen.api.counts(),
            worker: seen.worker.counts(),
            writer: (plan.writer || seen.writer.present).then(|| seen.writer.counts()),
        }),
        topics: seen.topics.clone(),
        queues: Some(seen.queues.clone()),
        created_topics: created_topics(previous, &seen.created_topics),
        conditions,
    }
}

/// Every topic the operator ever created for the pipeline, sorted: the ones
/// listed before and the ones created now.
fn created_topics(previous: Option<&OcrPipelineStatus>, now: &[String]) -> Vec<String> {
    let mut all: Vec<String> = previous
        .map(|s| s.created_topics.clone())
        .unwrap_or_default();
    all.extend(now.iter().cloned());
    all.sort();
    all.dedup();
    all
}

/// `(reason, message)` of the `Degraded` condition when this status is the
/// first to report it `True` for that reason: the note of the one Warning
/// event per failure (a failure that clears and comes back, or a different
/// failure, such as the next migration phase getting stuck, reports anew).
pub fn newly_degraded(
    previous: Option<&OcrPipelineStatus>,
    current: &OcrPipelineStatus,
) -> Option<(String, String)> {
    let degraded = |status: &OcrPipelineStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == DEGRADED && c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let (reason, message) = degraded(current)?;
    match previous.and_then(degraded) {
        Some((before, _)) if before == reason => None,
        _ => Some((reason, message)),
    }
}

/// The status of a round that could not act: the spec is invalid, or the API
/// server refused an object. Everything else (the migration above all) stays
/// as it was, so the next round resumes from the last state that was acted on.
pub fn failed(
    previous: Option<&OcrPipelineStatus>,
    reason: &str,
    problem: &str,
    generation: Option<i64>,
    now: &Time,
) -> OcrPipelineStatus {
    let mut status = previous.cloned().unwrap_or_default();
    set_condition(
        &mut status.conditions,
        DEGRADED,
        true,
        reason,
        problem.to_string(),
        generation,
        now,
    );
    status.observed_generation = generation;
    status.phase = Some(Phase::Degraded);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).expect("valid timestamp"))
    }

    #[test]
    fn last_transition_time_is_kept_while_status_is_unchanged() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            READY,
            false,
            "A",
            "m1".into(),
            Some(1),
            &at(100),
        );
        set_condition(
            &mut conditions,
            READY,
            false,
            "B",
            "m2".into(),
            Some(2),
            &at(200),
        );
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, at(100));
        assert_eq!(conditions[0].reason, "B");
        assert_eq!(conditions[0].observed_generation, Some(2));

        set_condition(
            &mut conditions,
            READY,
            true,
            "C",
            "m3".into(),
            Some(2),
            &at(300),
        );
        assert_eq!(conditions[0].last_transition_time, at(300));
        assert_eq!(conditions[0].status, "True");
    }

    #[test]
    fn a_deployment_with_old_pods_is_not_rolled_out() {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(3),
                replicas: Some(3),
                updated_replicas: Some(2),
                available_replicas: Some(2),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        };
        d.metadata.generation = Some(3);
        assert!(!role_state(Some(&d)).rolled_out);
        if let Some(status) = d.status.as_mut() {
            status.replicas = Some(2);
        }
        assert!(role_state(Some(&d)).rolled_out);
        d.metadata.generation = Some(4);
        assert!(
            !role_state(Some(&d)).rolled_out,
            "the controller has not seen generation 4"
        );
    }

    #[test]
    fn a_stuck_rollout_marks_the_pipeline_degraded() {
        use k8s_openapi::api::apps::v1::DeploymentCondition;
        let stuck = Deployment {
            status: Some(DeploymentStatus {
                conditions: Some(vec![DeploymentCondition {
                    type_: "Progressing".into(),
                    status: "False".into(),
                    reason: Some("ProgressDeadlineExceeded".into()),
                    message: Some("ReplicaSet has timed out progressing".into()),
                    ..DeploymentCondition::default()
                }]),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        };
        let worker = role_state(Some(&stuck));
        assert!(worker.failure.is_some());
        let healthy = healthy();
        let plan = crate::migration::step(
            None,
            None,
            crate::crd::Architecture::Standard,
            &crate::migration::Observed::default(),
            &at(1),
        );
        let seen = Observation {
            api: &healthy,
            worker: &worker,
            writer: &RoleState::default(),
            warnings: &[],
            topics: vec![],
            queues: queues(),
            created_topics: vec![],
            kafka_error: None,
            secret_problems: vec![],
            phase_deadline_seconds: 600,
            url: "http://p-api.ns.svc:80".into(),
        };
        let status = compute(None, &plan, &seen, Some(1), &at(2));
        assert_eq!(status.phase, Some(Phase::Degraded));
        let degraded = status
            .conditions
            .iter()
            .find(|c| c.type_ == DEGRADED)
            .expect("Degraded condition");
        assert_eq!(degraded.status, "True");
        assert!(
            degraded
                .message
                .contains("worker: ReplicaSet has timed out"),
            "{}",
            degraded.message
        );
    }

    fn healthy() -> RoleState {
        RoleState {
            present: true,
            rolled_out: true,
            available_replicas: 1,
            ready_replicas: 1,
            desired_replicas: 1,
            failure: None,
        }
    }

    fn condition<'a>(status: &'a OcrPipelineStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("{type_} condition"))
    }

    fn queues() -> QueueNames {
        let kafka: crate::crd::KafkaSpec =
            serde_json::from_value(serde_json::json!({"bootstrapServers": "kafka:9092"}))
                .expect("kafka spec");
        QueueNames::resolve(&kafka, "ns", "p")
    }

    #[test]
    fn created_topics_are_remembered_across_rounds() {
        let previous = OcrPipelineStatus {
            created_topics: vec!["ns.p.jobs".into(), "ns.p.results".into()],
            ..OcrPipelineStatus::default()
        };
        let merged = created_topics(
            Some(&previous),
            &["ns.p.dead-letter".into(), "ns.p.jobs".into()],
        );
        assert_eq!(merged, ["ns.p.dead-letter", "ns.p.jobs", "ns.p.results"]);
        assert!(created_topics(None, &[]).is_empty());
    }

    fn seen<'a>(role: &'a RoleState, kafka_error: Option<&str>) -> Observation<'a> {
        Observation {
            api: role,
            worker: role,
            writer: role,
            warnings: &[],
            topics: vec![],
            queues: queues(),
            created_topics: vec![],
            kafka_error: kafka_error.map(str::to_string),
            secret_problems: vec![],
            phase_deadline_seconds: 600,
            url: "http://p-api.ns.svc:80".into(),
        }
    }

    fn draining_since(second: i64) -> Plan {
        use crate::crd::{Architecture::*, Migration, MigrationPhase::*};
        let migration = Migration {
            from: Writer,
            to: Standard,
            phase: DrainingResults,
            started_at: at(0),
            phase_started_at: Some(at(second)),
        };
        let observed = crate::migration::Observed {
            worker_mode: Some(Standard),
            workers_rolled_out: true,
            writer_present: true,
            writer_available: true,
            results_lag: Some(4),
            ..crate::migration::Observed::default()
        };
        crate::migration::step(
            Some(Writer),
            Some(&migration),
            Standard,
            &observed,
            &at(second),
        )
    }

    // ---- issue 11, bug 3: nothing times out

    #[test]
    fn a_failing_kafka_admin_marks_the_pipeline_degraded() {
        let role = healthy();
        let plan = crate::migration::step(
            None,
            None,
            crate::crd::Architecture::Standard,
            &crate::migration::Observed::default(),
            &at(1),
        );
        let status = compute(
            None,
            &plan,
            &seen(&role, Some("brokers unreachable")),
            Some(1),
            &at(2),
        );
        let degraded = condition(&status, DEGRADED);
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, "KafkaUnavailable");
        assert!(
            degraded.message.contains("brokers unreachable"),
            "{}",
            degraded.message
        );
        assert_eq!(status.phase, Some(Phase::Degraded));

        let recovered = compute(Some(&status), &plan, &seen(&role, None), Some(1), &at(3));
        assert_eq!(condition(&recovered, DEGRADED).status, "False");
        assert_eq!(recovered.phase, Some(Phase::Running));
    }

    #[test]
    fn a_phase_past_its_deadline_marks_the_migration_stuck() {
        let role = healthy();
        let plan = draining_since(100);
        let waiting = compute(None, &plan, &seen(&role, None), Some(1), &at(700));
        assert_eq!(
            condition(&waiting, DEGRADED).status,
            "False",
            "600 s is within the deadline"
        );
        assert_eq!(waiting.phase, Some(Phase::Migrating));
        assert_eq!(newly_degraded(None, &waiting), None);

        let stuck = compute(
            Some(&waiting),
            &plan,
            &seen(&role, Some("lag unknown")),
            Some(1),
            &at(701),
        );
        let degraded = condition(&stuck, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", MIGRATION_STUCK)
        );
        assert!(
            degraded
                .message
                .contains("DrainingResults has waited 601 s"),
            "{}",
            degraded.message
        );
        assert!(
            degraded.message.contains("WaitingForResultsLag"),
            "{}",
            degraded.message
        );
        assert!(
            degraded.message.contains("lag unknown"),
            "other causes stay in the message"
        );
        assert_eq!(
            condition(&stuck, MIGRATING).status,
            "True",
            "still migrating"
        );
        assert_eq!(stuck.migration, plan.migration, "the wait goes on");
        assert_eq!(stuck.phase, Some(Phase::Degraded));

        let (reason, note) = newly_degraded(Some(&waiting), &stuck).expect("one Warning event");
        assert_eq!(reason, MIGRATION_STUCK);
        assert!(note.contains("DrainingResults"), "{note}");
        let still = compute(Some(&stuck), &plan, &seen(&role, None), Some(1), &at(760));
        assert_eq!(
            newly_degraded(Some(&stuck), &still),
            None,
            "not again while it stays stuck"
        );

        // The next phase starts its own clock.
        let next = draining_since(800);
        let moved = compute(Some(&still), &next, &seen(&role, None), Some(1), &at(800));
        assert_eq!(condition(&moved, DEGRADED).status, "False");
        let stuck_again = compute(Some(&moved), &next, &seen(&role, None), Some(1), &at(1401));
        assert!(newly_degraded(Some(&moved), &stuck_again).is_some());
    }

    // ---- issue 11, bug 1: terminating pods count

    fn pod(mode: Option<&str>, terminating: bool, phase: &str) -> Pod {
        use k8s_openapi::api::core::v1::{Container, EnvVar, PodStatus};
        let mut pod = Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "worker".into(),
                    env: mode.map(|m| {
                        vec![EnvVar {
                            name: env_name(keys::WORKER_MODE),
                            value: Some(m.into()),
                            ..EnvVar::default()
                        }]
                    }),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            }),
            ..Pod::default()
        };
        if terminating {
            pod.metadata.deletion_timestamp = Some(at(5));
        }
        pod
    }

    #[test]
    fn worker_pod_modes_include_terminating_pods_and_skip_finished_ones() {
        use crate::crd::Architecture::*;
        let pods = [
            pod(Some("standard"), false, "Running"),
            pod(Some("writer"), true, "Running"),
            pod(Some("writer"), false, "Failed"),
            pod(Some("writer"), false, "Succeeded"),
            pod(None, false, "Pending"),
            pod(Some("bogus"), true, "Running"),
        ];
        assert_eq!(
            worker_pod_modes(&pods),
            [Some(Standard), Some(Writer), None, None]
        );
    }

    // ---- issue 11, item 5: what `kubectl get ocrp` and the status show

    fn standard_plan() -> Plan {
        crate::migration::step(
            None,
            None,
            crate::crd::Architecture::Standard,
            &crate::migration::Observed::default(),
            &at(1),
        )
    }

    #[test]
    fn role_state_reads_ready_and_desired_pods_from_the_deployment() {
        let mut d = Deployment {
            spec: Some(DeploymentSpec {
                replicas: Some(3),
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(3),
                ready_replicas: Some(1),
                available_replicas: Some(1),
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        };
        let state = role_state(Some(&d));
        assert_eq!((state.ready_replicas, state.desired_replicas), (1, 3));
        d.status = None;
        assert_eq!(role_state(Some(&d)).ready_replicas, 0);
        assert_eq!(role_state(None).desired_replicas, 0, "no Deployment yet");
    }

    #[test]
    fn ready_roles_replicas_and_url_reach_the_status() {
        let api = RoleState {
            ready_replicas: 2,
            desired_replicas: 2,
            ..healthy()
        };
        let worker = RoleState {
            rolled_out: false,
            ready_replicas: 1,
            desired_replicas: 3,
            ..healthy()
        };
        let no_writer = RoleState::default();
        let observed = Observation {
            api: &api,
            worker: &worker,
            writer: &no_writer,
            ..seen(&api, None)
        };
        let status = compute(None, &standard_plan(), &observed, Some(1), &at(2));
        assert_eq!(status.ready_roles.as_deref(), Some("1/2"));
        assert_eq!(status.url.as_deref(), Some("http://p-api.ns.svc:80"));
        let replicas = status.replicas.expect("replica counts");
        assert_eq!(
            (replicas.api, replicas.worker, replicas.writer),
            (
                ReplicaCounts {
                    ready: 2,
                    desired: 2
                },
                ReplicaCounts {
                    ready: 1,
                    desired: 3
                },
                None
            ),
            "no writer in the standard architecture"
        );

        let all = compute(None, &standard_plan(), &seen(&api, None), Some(1), &at(2));
        assert_eq!(all.ready_roles.as_deref(), Some("2/2"));
    }

    #[test]
    fn a_missing_secret_is_degraded_and_named_before_the_rollout_it_blocks() {
        let api = healthy();
        let worker = RoleState {
            rolled_out: false,
            failure: Some("ReplicaSet has timed out progressing".into()),
            ..healthy()
        };
        let problems = vec!["secret ocr-mysql (spec.database.secret) not found".to_string()];
        let observed = Observation {
            api: &api,
            worker: &worker,
            secret_problems: problems,
            ..seen(&api, None)
        };
        let status = compute(None, &standard_plan(), &observed, Some(1), &at(2));
        let degraded = condition(&status, DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", SECRET_UNAVAILABLE)
        );
        assert!(
            degraded.message.contains("ocr-mysql"),
            "{}",
            degraded.message
        );
        assert!(
            degraded
                .message
                .contains("worker: ReplicaSet has timed out"),
            "{}",
            degraded.message
        );
        assert_eq!(status.phase, Some(Phase::Degraded));
    }

    #[test]
    fn each_new_degraded_reason_is_reported_once() {
        let role = healthy();
        let plan = standard_plan();
        let fine = compute(None, &plan, &seen(&role, None), Some(1), &at(2));
        let kafka = compute(
            Some(&fine),
            &plan,
            &seen(&role, Some("down")),
            Some(1),
            &at(3),
        );
        let (reason, message) = newly_degraded(Some(&fine), &kafka).expect("reported");
        assert_eq!(reason, KAFKA_UNAVAILABLE);
        assert!(message.contains("down"), "{message}");
        let still = compute(
            Some(&kafka),
            &plan,
            &seen(&role, Some("down")),
            Some(1),
            &at(4),
        );
        assert_eq!(newly_degraded(Some(&kafka), &still), None, "same failure");

        let refused = failed(Some(&still), APPLY_FAILED, "forbidden", Some(1), &at(5));
        assert_eq!(
            newly_degraded(Some(&still), &refused).map(|(reason, _)| reason),
            Some(APPLY_FAILED.to_string()),
            "a different failure"
        );
        assert_eq!(refused.phase, Some(Phase::Degraded));
    }
}
