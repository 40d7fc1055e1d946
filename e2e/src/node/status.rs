//! What the node reports about a pod: phase, conditions and container
//! statuses, computed from what the supervisor recorded. Pure.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

#[derive(Clone, Debug, PartialEq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Time,
    },
    Terminated(Exit),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Exit {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub started_at: Option<Time>,
    pub finished_at: Time,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ContainerRecord {
    pub name: String,
    pub image: String,
    pub state: State,
    pub last: Option<Exit>,
    pub restarts: i32,
    pub ready: bool,
    pub started: bool,
    /// Will not be started again (restart policy, or the pod is going away).
    pub done: bool,
}

impl ContainerRecord {
    pub fn new(name: &str, image: &str, reason: &str) -> ContainerRecord {
        ContainerRecord {
            name: name.into(),
            image: image.into(),
            state: State::Waiting {
                reason: reason.into(),
                message: None,
            },
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            done: false,
        }
    }

    fn succeeded(&self) -> bool {
        matches!(&self.state, State::Terminated(e) if e.exit_code == 0)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PodRecord {
    pub pod_ip: String,
    pub host_ip: String,
    pub start_time: Time,
    pub init: Vec<ContainerRecord>,
    pub containers: Vec<ContainerRecord>,
    pub initialized: bool,
    /// Every init container has run to completion or the pod failed.
    pub failed: bool,
    /// Condition → time of its last transition, so repeated writes keep it.
    pub transitions: Vec<(String, bool, Time)>,
}

impl PodRecord {
    pub fn phase(&self) -> &'static str {
        if self.failed {
            return "Failed";
        }
        if !self.initialized {
            return "Pending";
        }
        let all_done = self.containers.iter().all(|c| c.done);
        if all_done && !self.containers.is_empty() {
            return if self.containers.iter().all(ContainerRecord::succeeded) {
                "Succeeded"
            } else {
                "Failed"
            };
        }
        let any_started = self
            .containers
            .iter()
            .any(|c| !matches!(c.state, State::Waiting { .. }) || c.restarts > 0);
        if any_started {
            "Running"
        } else {
            "Pending"
        }
    }

    fn condition(&mut self, type_: &str, status: bool, now: &Time) -> PodCondition {
        let since = match self.transitions.iter_mut().find(|(t, _, _)| t == type_) {
            Some(entry) if entry.1 == status => entry.2.clone(),
            Some(entry) => {
                entry.1 = status;
                entry.2 = now.clone();
                now.clone()
            }
            None => {
                self.transitions.push((type_.into(), status, now.clone()));
                now.clone()
            }
        };
        PodCondition {
            type_: type_.into(),
            status: if status { "True" } else { "False" }.into(),
            last_transition_time: Some(since),
            ..PodCondition::default()
        }
    }

    pub fn to_status(&mut self, now: &Time) -> PodStatus {
        let containers_ready = self.initialized
            && self.containers.iter().all(|c| c.ready)
            && !self.containers.is_empty();
        let conditions = vec![
            self.condition("PodScheduled", true, now),
            self.condition("Initialized", self.initialized, now),
            self.condition("ContainersReady", containers_ready, now),
            self.condition("Ready", containers_ready, now),
        ];
        PodStatus {
            phase: Some(self.phase().into()),
            conditions: Some(conditions),
            host_ip: Some(self.host_ip.clone()),
            host_ips: Some(vec![HostIP {
                ip: self.host_ip.clone(),
            }]),
            pod_ip: Some(self.pod_ip.clone()),
            pod_ips: Some(vec![PodIP {
                ip: self.pod_ip.clone(),
            }]),
            start_time: Some(self.start_time.clone()),
            init_container_statuses: Some(self.init.iter().map(container_status).collect()),
            container_statuses: Some(self.containers.iter().map(container_status).collect()),
            ..PodStatus::default()
        }
    }
}

fn terminated(exit: &Exit) -> ContainerStateTerminated {
    ContainerStateTerminated {
        exit_code: exit.exit_code,
        signal: exit.signal,
        reason: Some(exit.reason.clone()),
        started_at: exit.started_at.clone(),
        finished_at: Some(exit.finished_at.clone()),
        ..ContainerStateTerminated::default()
    }
}

fn container_status(c: &ContainerRecord) -> ContainerStatus {
    let state = match &c.state {
        State::Waiting { reason, message } => ContainerState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.clone()),
                message: message.clone(),
            }),
            ..ContainerState::default()
        },
        State::Running { started_at } => ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(started_at.clone()),
            }),
            ..ContainerState::default()
        },
        State::Terminated(exit) => ContainerState {
            terminated: Some(terminated(exit)),
            ..ContainerState::default()
        },
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: format!("local://{}", c.image),
        ready: c.ready,
        started: Some(c.started),
        restart_count: c.restarts,
        state: Some(state),
        last_state: c.last.as_ref().map(|exit| ContainerState {
            terminated: Some(terminated(exit)),
            ..ContainerState::default()
        }),
        container_id: None,
        ..ContainerStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).expect("valid"))
    }

    fn record() -> PodRecord {
        PodRecord {
            pod_ip: "10.245.0.2".into(),
            host_ip: "127.0.0.1".into(),
            start_time: at(1),
            init: vec![],
            containers: vec![ContainerRecord::new(
                "api",
                "ocr-runtime:1",
                "ContainerCreating",
            )],
            initialized: false,
            failed: false,
            transitions: vec![],
        }
    }

    #[test]
    fn ready_follows_the_containers_and_keeps_its_transition_time() {
        let mut pod = record();
        assert_eq!(pod.phase(), "Pending");
        pod.initialized = true;
        pod.containers[0].state = State::Running { started_at: at(2) };
        let status = pod.to_status(&at(3));
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let ready = |s: &PodStatus| {
            s.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == "Ready")
                .cloned()
                .expect("Ready condition")
        };
        assert_eq!(ready(&status).status, "False");
        pod.containers[0].ready = true;
        let status = pod.to_status(&at(4));
        assert_eq!(ready(&status).status, "True");
        assert_eq!(ready(&status).last_transition_time, Some(at(4)));
        let status = pod.to_status(&at(9));
        assert_eq!(ready(&status).last_transition_time, Some(at(4)));
    }

    #[test]
    fn a_finished_pod_reports_its_exit() {
        let mut pod = record();
        pod.initialized = true;
        pod.containers[0].state = State::Terminated(Exit {
            exit_code: 137,
            signal: Some(9),
            reason: "Error".into(),
            started_at: Some(at(2)),
            finished_at: at(5),
        });
        pod.containers[0].done = true;
        let status = pod.to_status(&at(6));
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        let terminated = status.container_statuses.expect("statuses")[0]
            .state
            .clone()
            .and_then(|s| s.terminated)
            .expect("terminated");
        assert_eq!(terminated.exit_code, 137);
    }
}
