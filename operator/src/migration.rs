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
//! "Every worker runs mode M" ([`Observed::workers_all_in`]) means the worker
//! Deployment rolled out a template in mode M *and* no worker pod of another
//! mode exists, terminating pods included: a terminating pod keeps running for
//! its grace period, finishes its batch and, in writer mode, publishes the
//! results. The writer is removed only when every worker runs the direct mode
//! and the results lag, read after the pod listing that showed it, is 0: after
//! such a listing nothing is left that could publish, so a lag of 0 stays 0.
//!
//! A spec that changes during a migration:
//!
//! * Back to `writer` while a writer → X migration still has its writer
//!   (`RollingWorkers`, `DrainingResults`): the migration turns into
//!   X → writer from `StartingWriter`. The writer never stopped consuming, so
//!   once it is Available the workers roll back into writer mode.
//! * Away from `writer` during X → writer:
//!   - `EnsuringResultsTopic`: nothing changed yet; the migration is dropped
//!     and re-planned from X.
//!   - `StartingWriter` or `RollingWorkers`: the migration turns into
//!     writer → (new spec) from `RollingWorkers`, so the writer stays until
//!     the workers left writer mode and the results are drained, exactly as
//!     on the writer → X path. In `StartingWriter` the workers never changed,
//!     so this passes straight on to removing the writer once the lag is 0.
//! * Anything else (standard ↔ batched, a writer → X migration in
//!   `RemovingWriter`, whose writer is already deleted, or a new target that
//!   is not `writer` during writer → X) runs to completion first; then the
//!   latest spec is compared with its target and, if different, a new
//!   migration starts from that target. Intermediate values that were replaced
//!   before completion are never applied.
//!
//! A migration that was turned around keeps the documented phase order: it is
//! a new migration (new `startedAt`) on the reverse path.
//!
//! A pipeline whose status was lost is recovered from the cluster
//! ([`step`] with `applied: None`): the live worker mode is what runs, and a
//! writer Deployment next to workers that are not in writer mode is a
//! writer → (their mode) migration that still has to drain.
//!
//! Every phase records when it began (`phaseStartedAt`); [`overdue`] says when
//! it has waited past `spec.migration.phaseDeadlineSeconds`. That is reported,
//! never acted on: a deadline never skips a wait.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{Architecture, Migration, MigrationPhase};

/// What the cluster showed at the start of a reconcile, before anything was applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `worker.mode` in the live worker Deployment's pod template; `None` when there is none.
    pub worker_mode: Option<Architecture>,
    /// The worker Deployment reports its template rolled out (replica counts,
    /// which leave out terminating pods).
    pub workers_rolled_out: bool,
    /// The mode of every worker pod that can still run, terminating ones
    /// included; `None` for a pod whose mode could not be read (it counts as
    /// possibly in writer mode).
    pub worker_pod_modes: Vec<Option<Architecture>>,
    pub writer_present: bool,
    pub writer_available: bool,
    pub results_topic_ready: bool,
    /// Unconsumed messages on the results topic; `None` when it could not be
    /// measured. Read after `worker_pod_modes` was listed.
    pub results_lag: Option<u64>,
}

/// Whether a worker pod of this mode can publish to the results topic; a pod
/// whose mode could not be read might.
pub fn may_publish(mode: Option<Architecture>) -> bool {
    mode.is_none_or(|m| m == Architecture::Writer)
}

impl Observed {
    /// Every worker runs `mode`: the Deployment's template is in `mode` and
    /// rolled out, and no worker pod of another mode is left, terminating
    /// ones included.
    pub fn workers_all_in(&self, mode: Architecture) -> bool {
        self.worker_mode == Some(mode)
            && self.workers_rolled_out
            && self.worker_pod_modes.iter().all(|m| *m == Some(mode))
    }

    /// Worker pods (terminating ones included) that may still publish to the
    /// results topic: in writer mode, or of a mode that could not be read.
    pub fn writer_mode_pods(&self) -> usize {
        self.worker_pod_modes
            .iter()
            .filter(|m| may_publish(**m))
            .count()
    }

    /// The writer may go: every worker runs the direct mode `mode` and the
    /// results lag, read after that pod listing, is known to be 0.
    fn writer_removable(&self, mode: Architecture) -> Result<(), Wait> {
        if !self.workers_all_in(mode) {
            Err(Wait::WorkerRollout)
        } else if self.results_lag != Some(0) {
            Err(Wait::ResultsLag)
        } else {
            Ok(())
        }
    }
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
    /// `status.architecture`: the last architecture that was fully rolled out
    /// (during a migration, its `from`).
    pub architecture: Architecture,
    pub migration: Option<Migration>,
    pub waiting_for: Option<Wait>,
    /// This round turned back or dropped a migration because the spec no
    /// longer asks for its target (the migration that was given up).
    pub reverted: Option<Migration>,
}

impl Plan {
    fn steady(architecture: Architecture) -> Plan {
        Plan {
            worker_mode: architecture,
            writer: architecture == Architecture::Writer,
            architecture,
            migration: None,
            waiting_for: None,
            reverted: None,
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
            reverted: None,
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

/// A migration from `from` to `to` that enters `phase` now.
fn begin(from: Architecture, to: Architecture, phase: MigrationPhase, now: &Time) -> Migration {
    Migration {
        from,
        to,
        phase,
        started_at: now.clone(),
        phase_started_at: Some(now.clone()),
    }
}

enum Advance {
    Stay(Wait),
    Next(MigrationPhase),
    Done,
    /// The spec no longer asks for the target and nothing changed yet: back to `from`.
    Drop,
    /// The spec no longer asks for the target: continue on the reverse path.
    Turn {
        from: Architecture,
        to: Architecture,
        phase: MigrationPhase,
    },
}

fn advance(migration: &Migration, desired: Architecture, observed: &Observed) -> Advance {
    use Architecture::Writer;
    use MigrationPhase::*;
    let (from, to) = (migration.from, migration.to);
    let changed = desired != to;
    match migration.phase {
        // Nothing has changed in the cluster yet (the writer is not rendered).
        EnsuringResultsTopic if changed => Advance::Drop,
        EnsuringResultsTopic if observed.results_topic_ready => Advance::Next(StartingWriter),
        EnsuringResultsTopic => Advance::Stay(Wait::ResultsTopic),
        // X → writer given up after the writer was started: leave writer mode the
        // way writer → X does, so the writer outlives every writer-mode pod and
        // the drain. In StartingWriter the workers are still in X, so with
        // `desired == X` this passes straight through to the drain.
        StartingWriter | RollingWorkers if to == Writer && changed => Advance::Turn {
            from: Writer,
            to: desired,
            phase: RollingWorkers,
        },
        StartingWriter if observed.writer_available => Advance::Next(RollingWorkers),
        StartingWriter => Advance::Stay(Wait::WriterAvailable),
        // writer → X turned back to writer while the writer still runs: it has kept
        // consuming, so the workers can roll back into writer mode once it is Available.
        RollingWorkers | DrainingResults if from == Writer && desired == Writer => Advance::Turn {
            from: to,
            to: Writer,
            phase: StartingWriter,
        },
        RollingWorkers if !observed.workers_all_in(to) => Advance::Stay(Wait::WorkerRollout),
        RollingWorkers if from == Writer => Advance::Next(DrainingResults),
        RollingWorkers => Advance::Done,
        // Checked again on every round, not only on entering the phase: the lag
        // counts only if it was read after a listing without writer-mode pods.
        DrainingResults => match observed.writer_removable(to) {
            Ok(()) => Advance::Next(RemovingWriter),
            Err(wait) => Advance::Stay(wait),
        },
        // Something published results after the drain: keep (or bring back) the writer.
        RemovingWriter if observed.results_lag.is_some_and(|lag| lag > 0) => {
            Advance::Next(DrainingResults)
        }
        RemovingWriter if observed.writer_present => Advance::Stay(Wait::WriterRemoval),
        RemovingWriter => Advance::Done,
    }
}

/// Where a pipeline without a recorded architecture stands, from the cluster.
///
/// `Err(plan)`: nothing is deployed; render the desired topology directly.
fn recover(
    desired: Architecture,
    observed: &Observed,
    now: &Time,
) -> Result<(Architecture, Option<Migration>), Plan> {
    use Architecture::Writer;
    use MigrationPhase::RollingWorkers;
    match (observed.worker_mode, observed.writer_present) {
        (Some(Writer), _) => Ok((Writer, None)),
        // A writer next to workers in a direct mode: it may still hold results
        // (the status may have been lost mid-drain), so leave writer mode the way
        // writer → X does instead of deleting the writer outright.
        (Some(live), true) => Ok((Writer, Some(begin(Writer, live, RollingWorkers, now)))),
        (Some(live), false) => Ok((live, None)),
        // No worker Deployment, only a writer: the same, towards the spec.
        (None, true) if desired == Writer => Ok((Writer, None)),
        (None, true) => Ok((Writer, Some(begin(Writer, desired, RollingWorkers, now)))),
        (None, false) => Err(Plan::steady(desired)),
    }
}

/// Decides the next plan.
///
/// `applied` is `status.architecture`; `None` means the status holds none
/// (a first deploy, or a status that was lost): the cluster itself says what
/// runs (see the module doc), and only when nothing runs is the desired
/// topology rendered directly without a migration.
pub fn step(
    applied: Option<Architecture>,
    migration: Option<&Migration>,
    desired: Architecture,
    observed: &Observed,
    now: &Time,
) -> Plan {
    let (mut architecture, mut current) = match (applied, migration) {
        (Some(architecture), m) => (architecture, m.cloned()),
        (None, Some(m)) => (m.from, Some(m.clone())),
        (None, None) => match recover(desired, observed, now) {
            Ok(found) => found,
            Err(plan) => return plan,
        },
    };
    let mut reverted = None;
    // Each pass either returns or moves the state on: one phase forward, a
    // finished migration into the next, or a migration the spec no longer
    // wants onto its reverse path (whose target is then the desired one, so it
    // turns at most once more). The bound is never reached in practice and only
    // guards against a logic error.
    for _ in 0..16 {
        match current.take() {
            None if architecture == desired => {
                return Plan {
                    reverted,
                    ..Plan::steady(architecture)
                }
            }
            None => {
                let first = phases(architecture, desired)[0];
                current = Some(begin(architecture, desired, first, now));
            }
            Some(mut m) => match advance(&m, desired, observed) {
                Advance::Stay(wait) => {
                    // A status written before phases were timed: time it from now.
                    m.phase_started_at.get_or_insert_with(|| now.clone());
                    return Plan {
                        reverted,
                        ..Plan::during(m, wait)
                    };
                }
                Advance::Next(phase) => {
                    m.phase = phase;
                    m.phase_started_at = Some(now.clone());
                    current = Some(m);
                }
                Advance::Done => architecture = m.to,
                Advance::Drop => {
                    architecture = m.from;
                    reverted = Some(m);
                }
                Advance::Turn { from, to, phase } => {
                    architecture = from;
                    current = Some(begin(from, to, phase, now));
                    reverted = Some(m);
                }
            },
        }
    }
    match current {
        Some(m) => Plan {
            reverted,
            ..Plan::during(m, Wait::WorkerRollout)
        },
        None => Plan {
            reverted,
            ..Plan::steady(architecture)
        },
    }
}

/// How many seconds the current phase of `migration` has waited, when that is
/// more than `deadline_seconds`; `None` while it is within the deadline.
pub fn overdue(migration: &Migration, deadline_seconds: i64, now: &Time) -> Option<i64> {
    let since = migration.phase_started_at.as_ref()?;
    let waited = now.0.as_second() - since.0.as_second();
    (waited > deadline_seconds).then_some(waited)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use Architecture::*;
    use MigrationPhase::*;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + second).expect("valid timestamp"))
    }

    fn now() -> Time {
        at(0)
    }

    /// Every worker runs `mode`, as the Deployment and the pod listing show it.
    fn rolled(mode: Architecture) -> Observed {
        Observed {
            worker_mode: Some(mode),
            workers_rolled_out: true,
            worker_pod_modes: vec![Some(mode); 3],
            ..Observed::default()
        }
    }

    /// Writer up and consuming, results topic in place.
    fn with_writer(observed: Observed) -> Observed {
        Observed {
            writer_present: true,
            writer_available: true,
            results_topic_ready: true,
            ..observed
        }
    }

    fn migration(from: Architecture, to: Architecture, phase: MigrationPhase) -> Migration {
        Migration {
            from,
            to,
            phase,
            started_at: now(),
            phase_started_at: Some(now()),
        }
    }

    fn route(plan: &Plan) -> Option<(Architecture, Architecture, MigrationPhase)> {
        plan.migration.as_ref().map(|m| (m.from, m.to, m.phase))
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

        let done = with_writer(rolled(Writer));
        let plan = step(Some(Standard), Some(&m), Writer, &done, &now());
        assert_eq!(plan, Plan::steady(Writer));
    }

    #[test]
    fn writer_is_kept_until_results_lag_is_zero() {
        let start = with_writer(rolled(Writer));
        let plan = step(Some(Writer), None, Batched, &start, &now());
        let m = plan.migration.clone().expect("migration starts");
        assert_eq!(m.phase, RollingWorkers);
        assert_eq!((plan.worker_mode, plan.writer), (Batched, true));

        let lagging = Observed {
            results_lag: Some(7),
            ..with_writer(rolled(Batched))
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
        let m = migration(Standard, Batched, RollingWorkers);
        let half = Observed {
            worker_mode: Some(Batched),
            workers_rolled_out: false,
            worker_pod_modes: vec![Some(Standard), Some(Batched)],
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
        let m = migration(Batched, Writer, EnsuringResultsTopic);
        let plan = step(Some(Batched), Some(&m), Batched, &rolled(Batched), &now());
        assert_eq!(
            plan,
            Plan {
                reverted: Some(m),
                ..Plan::steady(Batched)
            }
        );
    }

    // ---- issue 11, bug 1: the drain race

    #[test]
    fn workers_all_in_counts_terminating_pods_and_the_deployment() {
        assert!(rolled(Standard).workers_all_in(Standard));
        assert!(!rolled(Standard).workers_all_in(Batched));
        let terminating_writer = Observed {
            worker_pod_modes: vec![Some(Standard), Some(Standard), Some(Writer)],
            ..rolled(Standard)
        };
        assert!(!terminating_writer.workers_all_in(Standard));
        assert_eq!(terminating_writer.writer_mode_pods(), 1);
        let unreadable = Observed {
            worker_pod_modes: vec![Some(Standard), None],
            ..rolled(Standard)
        };
        assert!(!unreadable.workers_all_in(Standard));
        assert_eq!(
            unreadable.writer_mode_pods(),
            1,
            "an unknown mode may publish"
        );
        let not_rolled = Observed {
            workers_rolled_out: false,
            ..rolled(Standard)
        };
        assert!(!not_rolled.workers_all_in(Standard));
        let scaled_to_zero = Observed {
            worker_pod_modes: vec![],
            ..rolled(Batched)
        };
        assert!(scaled_to_zero.workers_all_in(Batched));
        assert_eq!(scaled_to_zero.writer_mode_pods(), 0);
    }

    /// The Deployment reports the rollout finished (its counts leave out
    /// terminating pods) while an old writer-mode pod is still finishing its
    /// batch; even with a lag of 0 the writer must stay.
    #[test]
    fn a_terminating_writer_mode_pod_keeps_the_writer() {
        let m = migration(Writer, Standard, RollingWorkers);
        let terminating = Observed {
            worker_pod_modes: vec![Some(Standard), Some(Standard), Some(Writer)],
            results_lag: Some(0),
            ..with_writer(rolled(Standard))
        };
        let plan = step(Some(Writer), Some(&m), Standard, &terminating, &at(1));
        assert_eq!(route(&plan), Some((Writer, Standard, RollingWorkers)));
        assert_eq!(plan.waiting_for, Some(Wait::WorkerRollout));
        assert!(plan.writer);

        let gone = Observed {
            worker_pod_modes: vec![Some(Standard); 2],
            ..terminating
        };
        let plan = step(Some(Writer), Some(&m), Standard, &gone, &at(2));
        assert_eq!(route(&plan), Some((Writer, Standard, RemovingWriter)));
        assert!(!plan.writer);
    }

    /// A zero lag counts only when the listing before it showed no writer-mode
    /// pod: DrainingResults checks the pods again on every round.
    #[test]
    fn draining_checks_the_pods_again_before_trusting_a_zero_lag() {
        let m = migration(Writer, Batched, DrainingResults);
        for pods in [vec![Some(Batched), Some(Writer)], vec![Some(Batched), None]] {
            let observed = Observed {
                worker_pod_modes: pods,
                results_lag: Some(0),
                ..with_writer(rolled(Batched))
            };
            let plan = step(Some(Writer), Some(&m), Batched, &observed, &at(1));
            assert_eq!(route(&plan), Some((Writer, Batched, DrainingResults)));
            assert_eq!(plan.waiting_for, Some(Wait::WorkerRollout));
            assert!(plan.writer);
        }
    }

    // ---- issue 11, bug 2: a way back

    #[test]
    fn reverting_to_writer_while_draining_rolls_the_workers_back() {
        let m = migration(Writer, Standard, DrainingResults);
        let draining = Observed {
            results_lag: Some(5),
            ..with_writer(rolled(Standard))
        };
        let plan = step(Some(Writer), Some(&m), Writer, &draining, &at(1));
        assert_eq!(route(&plan), Some((Standard, Writer, RollingWorkers)));
        assert_eq!((plan.worker_mode, plan.writer), (Writer, true));
        assert_eq!(plan.reverted, Some(m.clone()));
        let turned = plan.migration.expect("migrating");
        assert_eq!(
            turned.started_at,
            at(1),
            "a new migration on the reverse path"
        );

        let writer_down = Observed {
            writer_available: false,
            ..draining
        };
        let plan = step(Some(Writer), Some(&m), Writer, &writer_down, &at(1));
        assert_eq!(route(&plan), Some((Standard, Writer, StartingWriter)));
        assert_eq!(
            (plan.worker_mode, plan.writer),
            (Standard, true),
            "workers return to writer mode only once the writer is Available"
        );
    }

    #[test]
    fn reverting_to_writer_while_rolling_away_from_it_keeps_the_writer() {
        let m = migration(Writer, Batched, RollingWorkers);
        let half = Observed {
            workers_rolled_out: false,
            worker_pod_modes: vec![Some(Writer), Some(Batched)],
            ..with_writer(rolled(Batched))
        };
        let plan = step(Some(Writer), Some(&m), Writer, &half, &at(1));
        assert_eq!(route(&plan), Some((Batched, Writer, RollingWorkers)));
        assert_eq!((plan.worker_mode, plan.writer), (Writer, true));
    }

    #[test]
    fn reverting_while_starting_the_writer_cancels_and_removes_it() {
        let m = migration(Standard, Writer, StartingWriter);
        let starting = Observed {
            writer_present: true,
            results_topic_ready: true,
            results_lag: Some(0),
            ..rolled(Standard)
        };
        let plan = step(Some(Standard), Some(&m), Standard, &starting, &at(1));
        assert_eq!(route(&plan), Some((Writer, Standard, RemovingWriter)));
        assert_eq!((plan.worker_mode, plan.writer), (Standard, false));
        assert_eq!(plan.reverted, Some(m.clone()));

        let gone = Observed {
            writer_present: false,
            ..starting.clone()
        };
        let removing = plan.migration.clone().expect("removing");
        let plan = step(
            Some(plan.architecture),
            Some(&removing),
            Standard,
            &gone,
            &at(2),
        );
        assert_eq!(plan, Plan::steady(Standard));

        let blind = Observed {
            results_lag: None,
            ..starting
        };
        let plan = step(Some(Standard), Some(&m), Standard, &blind, &at(1));
        assert_eq!(route(&plan), Some((Writer, Standard, DrainingResults)));
        assert!(plan.writer, "an unknown lag keeps the writer");
        assert_eq!(
            plan.worker_mode, Standard,
            "workers never enter writer mode"
        );
    }

    #[test]
    fn reverting_while_rolling_into_writer_drains_first() {
        let m = migration(Batched, Writer, RollingWorkers);
        let half = Observed {
            workers_rolled_out: false,
            worker_pod_modes: vec![Some(Writer), Some(Batched)],
            results_lag: Some(0),
            ..with_writer(rolled(Writer))
        };
        let plan = step(Some(Batched), Some(&m), Batched, &half, &at(1));
        assert_eq!(route(&plan), Some((Writer, Batched, RollingWorkers)));
        assert_eq!((plan.worker_mode, plan.writer), (Batched, true));

        // A third architecture goes there directly, still through the drain.
        let plan = step(Some(Batched), Some(&m), Standard, &half, &at(1));
        assert_eq!(route(&plan), Some((Writer, Standard, RollingWorkers)));
        assert_eq!((plan.worker_mode, plan.writer), (Standard, true));
    }

    #[test]
    fn reverting_to_writer_while_removing_it_is_queued() {
        let m = migration(Writer, Standard, RemovingWriter);
        let removing = Observed {
            results_lag: Some(0),
            ..with_writer(rolled(Standard))
        };
        let plan = step(Some(Writer), Some(&m), Writer, &removing, &at(1));
        assert_eq!(route(&plan), Some((Writer, Standard, RemovingWriter)));
        assert!(!plan.writer);

        let gone = Observed {
            writer_present: false,
            writer_available: false,
            ..removing
        };
        let plan = step(Some(Writer), Some(&m), Writer, &gone, &at(2));
        assert_eq!(
            route(&plan),
            Some((Standard, Writer, StartingWriter)),
            "then standard → writer starts afresh (the topic is still there)"
        );
    }

    // ---- issue 11, bug 3: phase deadlines

    #[test]
    fn each_phase_records_when_it_started() {
        let m = migration(Writer, Standard, RollingWorkers);
        let rolling = Observed {
            workers_rolled_out: false,
            results_lag: Some(3),
            ..with_writer(rolled(Standard))
        };
        let plan = step(Some(Writer), Some(&m), Standard, &rolling, &at(50));
        let waiting = plan.migration.expect("rolling");
        assert_eq!(waiting.phase_started_at, Some(now()), "kept while waiting");

        let rolled_out = Observed {
            workers_rolled_out: true,
            ..rolling
        };
        let plan = step(Some(Writer), Some(&waiting), Standard, &rolled_out, &at(60));
        let draining = plan.migration.expect("draining");
        assert_eq!(draining.phase, DrainingResults);
        assert_eq!(draining.phase_started_at, Some(at(60)));
        assert_eq!(draining.started_at, now());

        let untimed = Migration {
            phase_started_at: None,
            ..draining
        };
        let plan = step(Some(Writer), Some(&untimed), Standard, &rolled_out, &at(70));
        assert_eq!(
            plan.migration.and_then(|m| m.phase_started_at),
            Some(at(70)),
            "a status from before phases were timed starts the clock now"
        );
    }

    #[test]
    fn a_phase_past_its_deadline_is_overdue_and_keeps_waiting() {
        let m = migration(Writer, Standard, DrainingResults);
        let lagging = Observed {
            results_lag: Some(9),
            ..with_writer(rolled(Standard))
        };
        let plan = step(Some(Writer), Some(&m), Standard, &lagging, &at(601));
        let waiting = plan.migration.clone().expect("still draining");
        assert_eq!(waiting.phase, DrainingResults);
        assert!(plan.writer, "a deadline never skips the wait");
        assert_eq!(overdue(&waiting, 600, &at(600)), None);
        assert_eq!(overdue(&waiting, 600, &at(601)), Some(601));
        let untimed = Migration {
            phase_started_at: None,
            ..waiting
        };
        assert_eq!(overdue(&untimed, 600, &at(10_000)), None);
    }

    // ---- issue 11, bug 4: a lost status

    #[test]
    fn a_lost_status_next_to_a_writer_is_a_migration_that_drains() {
        let direct_workers = Observed {
            results_lag: Some(3),
            ..with_writer(rolled(Standard))
        };
        let plan = step(None, None, Standard, &direct_workers, &now());
        assert_eq!(route(&plan), Some((Writer, Standard, DrainingResults)));
        assert!(plan.writer, "never deleted without draining");

        let drained = Observed {
            results_lag: Some(0),
            ..direct_workers.clone()
        };
        let plan = step(None, None, Standard, &drained, &now());
        assert_eq!(route(&plan), Some((Writer, Standard, RemovingWriter)));

        // The spec asks for writer again: roll back into writer mode instead.
        let plan = step(None, None, Writer, &direct_workers, &now());
        assert_eq!(route(&plan), Some((Standard, Writer, RollingWorkers)));
        assert!(plan.writer);

        // Only a writer left, the spec asks for batched: workers come back batched first.
        let only_writer = Observed {
            writer_present: true,
            writer_available: true,
            results_lag: Some(0),
            ..Observed::default()
        };
        let plan = step(None, None, Batched, &only_writer, &now());
        assert_eq!(route(&plan), Some((Writer, Batched, RollingWorkers)));
        assert!(plan.writer);
    }

    #[test]
    fn a_lost_status_is_read_from_the_live_workers() {
        let plan = step(None, None, Writer, &with_writer(rolled(Writer)), &now());
        assert_eq!(plan, Plan::steady(Writer));
        let plan = step(None, None, Standard, &with_writer(rolled(Writer)), &now());
        assert_eq!(route(&plan), Some((Writer, Standard, RollingWorkers)));
        let plan = step(None, None, Batched, &rolled(Standard), &now());
        assert_eq!(route(&plan), Some((Standard, Batched, RollingWorkers)));
    }
}
