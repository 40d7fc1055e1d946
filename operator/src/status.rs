//! Pure status computation: observed Deployments + plan → `OcrPipelineStatus`.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{OcrPipelineStatus, Phase};
use crate::migration::Plan;

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const MIGRATING: &str = "Migrating";

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
    /// Kafka could not be asked (topics or lag); shown, not fatal.
    pub kafka_error: Option<String>,
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

    let mut degraded_messages = failures.clone();
    if let Some(error) = &seen.kafka_error {
        degraded_messages.push(error.clone());
    }
    let degraded = !failures.is_empty();
    set_condition(
        &mut conditions,
        DEGRADED,
        degraded,
        if degraded {
            "RolloutStuck"
        } else {
            "AsExpected"
        },
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
        conditions,
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
            kafka_error: None,
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
}
