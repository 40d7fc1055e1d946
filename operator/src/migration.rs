//! The migration state machine: a pure function from (status, spec, what the
//! cluster shows) to what to render next. It never talks to the API server, so
//! every path is property-tested (`tests/migration_props.rs`).
//!
//! Paths and the order of their phases:
//!
//! * standard ↔ batched: `RollingWorkers` (the worker Deployment rolls to the
//!   new mode; done when every pod runs it).
//! * standard/batched → writer: `EnsuringResultsTopic` (nothing publishes to a
//!   topic that may not exist) → `StartingWriter` (the writer Deployment must be
//!   Available) → `RollingWorkers` (workers roll into writer mode).
//! * writer → standard/batched: `RollingWorkers` (workers roll back to writing
//!   the database; the writer keeps consuming) → `DrainingResults` (wait until
//!   the results lag is 0) → `RemovingWriter` (the writer is deleted; done when
//!   it is gone).
//!
//! A spec that changes during a migration: the migration runs to completion,
//! then the latest spec is compared with its target and, if different, a new
//! migration starts from that target. Intermediate values that were replaced
//! before completion are never applied. The one exception is
//! `EnsuringResultsTopic`, which has not changed the topology yet: there the
//! migration is dropped and re-planned from `from`, so a migration blocked on a
//! topic can be undone by reverting the spec.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{Architecture, Migration, MigrationPhase};

/// What the cluster showed at the start of a reconcile, before anything was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `worker.mode` in the live worker Deployment's pod template; `None` when there is none.
    pub worker_mode: Option<Architecture>,
    /// Every worker pod runs the live template (rollout finished, nothing old left).
    pub workers_rolled_out: bool,
    pub writer_present: bool,
    pub writer_available: bool,
    pub results_topic_ready: bool,
    /// Unconsumed messages on the results topic; `None` when it could not be measured.
    pub results_lag: Option<u64>,
}

/// What blocks the current phase; shown in the `Migrating` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    ResultsTopic,
    WriterAvailable,
    WorkerRollout,
    ResultsLag,
    WriterRemoval,
}

impl Wait {
    pub fn reason(self) -> &'static str {
        match self {
            Wait::ResultsTopic => "WaitingForResultsTopic",
            Wait::WriterAvailable => "WaitingForWriter",
            Wait::WorkerRollout => "WaitingForWorkerRollout",
            Wait::ResultsLag => "WaitingForResultsLag",
            Wait::WriterRemoval => "WaitingForWriterRemoval",
        }
    }
}

/// What to render this round and what to record in the status.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// `worker.mode` of the worker Deployment.
    pub worker_mode: Architecture,
    /// Whether the writer Deployment is desired; when false it is deleted.
    pub writer: bool,
    /// `status.architecture`: the last architecture that was fully rolled out.
    pub architecture: Architecture,
    pub migration: Option<Migration>,
    pub waiting_for: Option<Wait>,
}

impl Plan {
    fn steady(architecture: Architecture) -> Plan {
        Plan {
            worker_mode: architecture,
            writer: architecture == Architecture::Writer,
            architecture,
            migration: None,
            waiting_for: None,
        }
    }

    fn during(migration: Migration, wait: Wait) -> Plan {
        use MigrationPhase::*;
        let worker_mode = match migration.phase {
            EnsuringResultsTopic | StartingWriter => migration.from,
            RollingWorkers | DrainingResults | RemovingWriter => migration.to,
        };
        let writer = if migration.to == Architecture::Writer {
            migration.phase != EnsuringResultsTopic
        } else if migration.from == Architecture::Writer {
            migration.phase != RemovingWriter
        } else {
            false
        };
        Plan {
            worker_mode,
            writer,
            architecture: migration.from,
            migration: Some(migration),
            waiting_for: Some(wait),
        }
    }
}

/// The phases a migration from `from` to `to` passes, in order.
pub fn phases(from: Architecture, to: Architecture) -> &'static [MigrationPhase] {
    use MigrationPhase::*;
    if from == to {
        &[]
    } else if to == Architecture::Writer {
        &[EnsuringResultsTopic, StartingWriter, RollingWorkers]
    } else if from == Architecture::Writer {
        &[RollingWorkers, DrainingResults, RemovingWriter]
    } else {
        &[RollingWorkers]
    }
}

enum Advance {
    Stay(Wait),
    Next(MigrationPhase),
    Done,
}

fn advance(migration: &Migration, observed: &Observed) -> Advance {
    use MigrationPhase::*;
    let workers_in_target =
        observed.worker_mode == Some(migration.to) && observed.workers_rolled_out;
    match migration.phase {
        EnsuringResultsTopic if observed.results_topic_ready => Advance::Next(StartingWriter),
        EnsuringResultsTopic => Advance::Stay(Wait::ResultsTopic),
        StartingWriter if observed.writer_available => Advance::Next(RollingWorkers),
        StartingWriter => Advance::Stay(Wait::WriterAvailable),
        RollingWorkers if !workers_in_target => Advance::Stay(Wait::WorkerRollout),
        RollingWorkers if migration.from == Architecture::Writer => Advance::Next(DrainingResults),
        RollingWorkers => Advance::Done,
        DrainingResults if observed.results_lag == Some(0) => Advance::Next(RemovingWriter),
        DrainingResults => Advance::Stay(Wait::ResultsLag),
        // Something published results after the drain: keep (or bring back) the writer.
        RemovingWriter if observed.results_lag.is_some_and(|lag| lag > 0) => {
            Advance::Next(DrainingResults)
        }
        RemovingWriter if observed.writer_present => Advance::Stay(Wait::WriterRemoval),
        RemovingWriter => Advance::Done,
    }
}

/// Decides the next plan.
///
/// `applied` is `status.architecture`; `None` means nothing was deployed yet,
/// so the desired topology is rendered directly without a migration.
pub fn step(
    applied: Option<Architecture>,
    migration: Option<&Migration>,
    desired: Architecture,
    observed: &Observed,
    now: &Time,
) -> Plan {
    let Some(mut architecture) = applied else {
        return Plan::steady(desired);
    };
    let mut current = migration.cloned();
    if let Some(m) = &current {
        if m.phase == MigrationPhase::EnsuringResultsTopic && m.to != desired {
            architecture = m.from;
            current = None;
        }
    }
    // Each pass either returns or moves one phase forward; a migration has at
    // most three phases, and a completed one can start at most one more, so the
    // bound is never reached in practice and only guards against a logic error.
    for _ in 0..16 {
        match current.take() {
            None if architecture == desired => return Plan::steady(architecture),
            None => {
                let first = phases(architecture, desired)[0];
                current = Some(Migration {
                    from: architecture,
                    to: desired,
                    phase: first,
                    started_at: now.clone(),
                });
            }
            Some(mut m) => match advance(&m, observed) {
                Advance::Stay(wait) => return Plan::during(m, wait),
                Advance::Next(phase) => {
                    m.phase = phase;
                    current = Some(m);
                }
                Advance::Done => architecture = m.to,
            },
        }
    }
    match current {
        Some(m) => Plan::during(m, Wait::WorkerRollout),
        None => Plan::steady(architecture),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use Architecture::*;
    use MigrationPhase::*;

    fn now() -> Time {
        Time(Timestamp::from_second(1_800_000_000).expect("valid timestamp"))
    }

    fn rolled(mode: Architecture) -> Observed {
        Observed {
            worker_mode: Some(mode),
            workers_rolled_out: true,
            ..Observed::default()
        }
    }

    #[test]
    fn first_deploy_renders_the_target_without_migrating() {
        let plan = step(None, None, Writer, &Observed::default(), &now());
        assert_eq!(plan, Plan::steady(Writer));
        assert!(plan.writer);
    }

    #[test]
    fn to_writer_waits_for_topic_then_writer_then_rolls_workers() {
        let plan = step(Some(Standard), None, Writer, &rolled(Standard), &now());
        let m = plan.migration.clone().expect("migration starts");
        assert_eq!(
            (m.from, m.to, m.phase),
            (Standard, Writer, EnsuringResultsTopic)
        );
        assert_eq!((plan.worker_mode, plan.writer), (Standard, false));
        assert_eq!(plan.waiting_for, Some(Wait::ResultsTopic));

        let topic = Observed {
            results_topic_ready: true,
            ..rolled(Standard)
        };
        let plan = step(Some(Standard), Some(&m), Writer, &topic, &now());
        let m = plan.migration.clone().expect("still migrating");
        assert_eq!(m.phase, StartingWriter);
        assert_eq!((plan.worker_mode, plan.writer), (Standard, true));

        let writer_up = Observed {
            writer_present: true,
            writer_available: true,
            ..topic
        };
        let plan = step(Some(Standard), Some(&m), Writer, &writer_up, &now());
        let m = plan.migration.clone().expect("still migrating");
        assert_eq!(m.phase, RollingWorkers);
        assert_eq!((plan.worker_mode, plan.writer), (Writer, true));
        assert_eq!(m.started_at, now(), "startedAt is kept across phases");

        let done = Observed {
            worker_mode: Some(Writer),
            ..writer_up
        };
        let plan = step(Some(Standard), Some(&m), Writer, &done, &now());
        assert_eq!(plan, Plan::steady(Writer));
    }

    #[test]
    fn writer_is_kept_until_results_lag_is_zero() {
        let start = Observed {
            writer_present: true,
            writer_available: true,
            results_topic_ready: true,
            ..rolled(Writer)
        };
        let plan = step(Some(Writer), None, Batched, &start, &now());
        let m = plan.migration.clone().expect("migration starts");
        assert_eq!(m.phase, RollingWorkers);
        assert_eq!((plan.worker_mode, plan.writer), (Batched, true));

        let lagging = Observed {
            worker_mode: Some(Batched),
            results_lag: Some(7),
            ..start.clone()
        };
        let plan = step(Some(Writer), Some(&m), Batched, &lagging, &now());
        let m = plan.migration.clone().expect("draining");
        assert_eq!(m.phase, DrainingResults);
        assert!(plan.writer);

        let unknown = Observed {
            results_lag: None,
            ..lagging.clone()
        };
        let plan = step(Some(Writer), Some(&m), Batched, &unknown, &now());
        assert!(plan.writer, "an unknown lag is not a zero lag");

        let drained = Observed {
            results_lag: Some(0),
            ..lagging
        };
        let plan = step(Some(Writer), Some(&m), Batched, &drained, &now());
        let m = plan.migration.clone().expect("removing");
        assert_eq!(m.phase, RemovingWriter);
        assert!(!plan.writer);

        let gone = Observed {
            writer_present: false,
            writer_available: false,
            ..drained
        };
        let plan = step(Some(Writer), Some(&m), Batched, &gone, &now());
        assert_eq!(plan, Plan::steady(Batched));
    }

    #[test]
    fn a_spec_change_mid_migration_is_queued_behind_it() {
        let m = Migration {
            from: Standard,
            to: Batched,
            phase: RollingWorkers,
            started_at: now(),
        };
        let half = Observed {
            worker_mode: Some(Batched),
            workers_rolled_out: false,
            ..Observed::default()
        };
        let plan = step(Some(Standard), Some(&m), Writer, &half, &now());
        assert_eq!(plan.migration.as_ref().map(|m| m.to), Some(Batched));
        assert_eq!(plan.worker_mode, Batched);

        let plan = step(Some(Standard), Some(&m), Writer, &rolled(Batched), &now());
        let next = plan.migration.expect("the queued migration starts");
        assert_eq!(
            (next.from, next.to, next.phase),
            (Batched, Writer, EnsuringResultsTopic)
        );
        assert_eq!(plan.architecture, Batched);
    }

    #[test]
    fn reverting_while_ensuring_the_topic_cancels() {
        let m = Migration {
            from: Batched,
            to: Writer,
            phase: EnsuringResultsTopic,
            started_at: now(),
        };
        let plan = step(Some(Batched), Some(&m), Batched, &rolled(Batched), &now());
        assert_eq!(plan, Plan::steady(Batched));
    }
}
