//! Pure status computation: observed Deployments and pods + plan → `OcrPipelineStatus`.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{Architecture, OcrPipelineStatus, Phase, QueueNames};
use crate::migration::{self, Plan};
use ocr_contract::env::{env_name, keys};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const MIGRATING: &str = "Migrating";
/// `Degraded` reason of a migration phase that waited past its deadline.
pub const MIGRATION_STUCK: &str = "MigrationStuck";

/// One role's Deployment as last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleState {
    pub present: bool,
    /// The controller saw the latest template and every replica runs it and is available.
    pub rolled_out: bool,
    pub available_replicas: i32,
    /// Why the Deployment is stuck, from its own conditions.
    pub failure: Option<String>,
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
    /// `spec.migration.phaseDeadlineSeconds`.
    pub phase_deadline_seconds: i64,
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
    degraded_messages.extend(failures.iter().cloned());
    if let Some(error) = &seen.kafka_error {
        degraded_messages.push(format!("kafka: {error}"));
    }
    let degraded_reason = if stuck.is_some() {
        MIGRATION_STUCK
    } else if !failures.is_empty() {
        "RolloutStuck"
    } else if seen.kafka_error.is_some() {
        "KafkaUnavailable"
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

/// The `Degraded` message when this status is the first to report the current
/// migration phase past its deadline: the note of the one Warning event per
/// stuck phase (a later phase, or the same phase after a recovery, reports anew).
pub fn newly_stuck(
    previous: Option<&OcrPipelineStatus>,
    current: &OcrPipelineStatus,
) -> Option<String> {
    let stuck = |status: &OcrPipelineStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == DEGRADED && c.status == "True" && c.reason == MIGRATION_STUCK)
            .map(|c| c.message.clone())
    };
    let message = stuck(current)?;
    match previous.and_then(stuck) {
        Some(_) => None,
        None => Some(message),
    }
}

/// The status of a spec the operator refuses to act on: the topology stays as it was.
pub fn invalid(
    previous: Option<&OcrPipelineStatus>,
    problem: &str,
    generation: Option<i64>,
    now: &Time,
) -> OcrPipelineStatus {
    let mut status = previous.cloned().unwrap_or_default();
    set_condition(
        &mut status.conditions,
        DEGRADED,
        true,
        "InvalidSpec",
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
        let healthy = RoleState {
            present: true,
            rolled_out: true,
            available_replicas: 1,
            failure: None,
        };
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
            phase_deadline_seconds: 600,
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
            phase_deadline_seconds: 600,
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
        assert_eq!(newly_stuck(None, &waiting), None);

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

        let note = newly_stuck(Some(&waiting), &stuck).expect("one Warning event");
        assert!(note.contains("DrainingResults"), "{note}");
        let still = compute(Some(&stuck), &plan, &seen(&role, None), Some(1), &at(760));
        assert_eq!(
            newly_stuck(Some(&stuck), &still),
            None,
            "not again while it stays stuck"
        );

        // The next phase starts its own clock.
        let next = draining_since(800);
        let moved = compute(Some(&still), &next, &seen(&role, None), Some(1), &at(800));
        assert_eq!(condition(&moved, DEGRADED).status, "False");
        let stuck_again = compute(Some(&moved), &next, &seen(&role, None), Some(1), &at(1401));
        assert!(newly_stuck(Some(&moved), &stuck_again).is_some());
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
}
