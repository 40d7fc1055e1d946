//! Property tests of the migration state machine against a simulated cluster.
//!
//! The simulation models what matters for losing jobs: worker pods switch mode
//! one at a time during a rollout; a replaced pod keeps running in its old mode
//! for a few ticks while it terminates (the Deployment's replica counts already
//! leave it out, as a real Deployment's do); every pod in writer mode,
//! terminating or not, adds to the results lag (a terminating one publishes its
//! last batch as it exits); an available writer drains it;
//! deleting the writer with lag > 0 loses those results, and so does a result
//! published while no writer exists. Spec changes, reverts included, arrive at
//! arbitrary ticks, mid-migration too, and the status can be lost at any tick.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use ocr_operator::crd::{Architecture, Migration, MigrationPhase};
use ocr_operator::migration::{phases, step, Observed, Plan};
use proptest::prelude::*;

const PODS: usize = 3;

#[derive(Clone, Debug)]
struct World {
    template_mode: Architecture,
    /// The pods the Deployment counts.
    pods: [Architecture; PODS],
    /// Pods a rollout replaced that are still terminating: (mode, ticks left).
    /// The Deployment's counts leave them out, but they run and publish.
    terminating: Vec<(Architecture, u8)>,
    writer_present: bool,
    writer_available: bool,
    topic_exists: bool,
    lag: u64,
    lost: u64,
    writer_deletions: u32,
    /// Some worker pod ever ran in writer mode.
    ever_writer_mode: bool,
}

impl World {
    fn writer_mode_pods(&self) -> usize {
        self.pods
            .iter()
            .chain(self.terminating.iter().map(|(mode, _)| mode))
            .filter(|p| **p == Architecture::Writer)
            .count()
    }
}

#[derive(Clone, Copy, Debug)]
struct Tick {
    rollout_step: bool,
    writer_becomes_available: bool,
    lag_unknown: bool,
    topic_admin_fails: bool,
    traffic: u8,
    drain: u8,
    /// How many ticks a pod that this tick's rollout step replaces keeps
    /// terminating (and, in writer mode, publishing).
    grace: u8,
    /// The status is lost (restored from a backup, edited away) before this reconcile.
    status_lost: bool,
}

fn tick_strategy() -> impl Strategy<Value = Tick> {
    (
        any::<bool>(),
        any::<bool>(),
        0u8..4,
        0u8..4,
        0u8..4,
        0u8..4,
        0u8..4,
        0u8..24,
    )
        .prop_map(
            |(
                rollout_step,
                writer_becomes_available,
                unknown,
                fails,
                traffic,
                drain,
                grace,
                lost,
            )| {
                Tick {
                    rollout_step,
                    writer_becomes_available,
                    lag_unknown: unknown == 0,
                    topic_admin_fails: fails == 0,
                    traffic,
                    drain,
                    grace,
                    status_lost: lost == 0,
                }
            },
        )
}

/// Each tick lets everything progress: the world once the user stops editing.
const CALM: Tick = Tick {
    rollout_step: true,
    writer_becomes_available: true,
    lag_unknown: false,
    topic_admin_fails: false,
    traffic: 1,
    drain: 3,
    grace: 1,
    status_lost: false,
};

/// Two different architectures, generated without rejecting cases (a third
/// of all pairs are equal; rejecting them made the run abort on "too many
/// global rejects" for some seeds).
fn arch_pair_strategy() -> impl Strategy<Value = (Architecture, Architecture)> {
    (0usize..3, 1usize..3).prop_map(|(from, step)| {
        (
            Architecture::ALL[from],
            Architecture::ALL[(from + step) % Architecture::ALL.len()],
        )
    })
}

fn arch_strategy() -> impl Strategy<Value = Architecture> {
    prop_oneof![
        Just(Architecture::Standard),
        Just(Architecture::Batched),
        Just(Architecture::Writer),
    ]
}

struct Sim {
    world: World,
    applied: Option<Architecture>,
    migration: Option<Migration>,
    /// Phases seen per migration (keyed by from, to, start tick), in order.
    history: BTreeMap<(Architecture, Architecture, i64), Vec<MigrationPhase>>,
    clock: i64,
    bootstrapped: bool,
}

impl Sim {
    fn new(initial: Architecture) -> Sim {
        let mut sim = Sim {
            world: World {
                template_mode: initial,
                pods: [initial; PODS],
                terminating: Vec::new(),
                writer_present: false,
                writer_available: false,
                topic_exists: false,
                lag: 0,
                lost: 0,
                writer_deletions: 0,
                ever_writer_mode: initial == Architecture::Writer,
            },
            applied: None,
            migration: None,
            history: BTreeMap::new(),
            clock: 0,
            bootstrapped: false,
        };
        let plan = sim.reconcile(initial, CALM);
        assert!(plan.migration.is_none());
        sim.bootstrapped = true;
        sim
    }

    fn observe(&self, tick: Tick) -> Observed {
        let w = &self.world;
        Observed {
            worker_mode: Some(w.template_mode),
            workers_rolled_out: w.pods.iter().all(|p| *p == w.template_mode),
            worker_pod_modes: w
                .pods
                .iter()
                .copied()
                .chain(w.terminating.iter().map(|(mode, _)| *mode))
                .map(Some)
                .collect(),
            writer_present: w.writer_present,
            writer_available: w.writer_present && w.writer_available,
            results_topic_ready: w.topic_exists || !tick.topic_admin_fails,
            results_lag: (!tick.lag_unknown).then_some(w.lag),
        }
    }

    fn reconcile(&mut self, desired: Architecture, tick: Tick) -> Plan {
        self.clock += 1;
        let now = Time(Timestamp::from_second(1_800_000_000 + self.clock).expect("valid"));
        if tick.status_lost && self.bootstrapped {
            self.applied = None;
            self.migration = None;
        }
        let observed = self.observe(tick);
        let plan = step(
            self.applied,
            self.migration.as_ref(),
            desired,
            &observed,
            &now,
        );
        self.check_invariants(&observed, &plan, desired);
        self.check_phase_clock(&plan, &now);

        if let Some(m) = &plan.migration {
            let key = (m.from, m.to, m.started_at.0.as_second());
            self.history.entry(key).or_default().push(m.phase);
        }
        if let (Some(before), after) = (self.applied, plan.architecture) {
            if before != after {
                let migrated = self
                    .history
                    .keys()
                    .any(|(from, to, _)| *from == before && *to == after);
                assert!(migrated, "{before} became {after} without a migration");
            }
        }

        // Apply the plan to the world.
        if !tick.topic_admin_fails {
            self.world.topic_exists = true;
        }
        self.world.template_mode = plan.worker_mode;
        if plan.writer && !self.world.writer_present {
            self.world.writer_present = true;
            self.world.writer_available = false;
        }
        if !plan.writer && self.world.writer_present {
            self.world.writer_present = false;
            self.world.writer_available = false;
            self.world.writer_deletions += 1;
            self.world.lost += self.world.lag;
            self.world.lag = 0;
        }
        self.applied = Some(plan.architecture);
        self.migration = plan.migration.clone();
        plan
    }

    fn check_invariants(&self, observed: &Observed, plan: &Plan, desired: Architecture) {
        let w = &self.world;
        assert_eq!(
            w.lost, 0,
            "results were published with no writer to persist them"
        );
        if w.writer_present && !plan.writer {
            assert_eq!(
                w.writer_mode_pods(),
                0,
                "writer deleted while a writer-mode worker pod (terminating included) can still publish: {w:?}"
            );
            assert!(
                w.template_mode != Architecture::Writer && plan.worker_mode != Architecture::Writer,
                "writer deleted while the workers' template is in writer mode"
            );
            assert_eq!(w.lag, 0, "writer deleted with results lag {}", w.lag);
            assert_eq!(
                observed.results_lag,
                Some(0),
                "writer deleted on an unknown lag"
            );
            assert_ne!(
                desired,
                Architecture::Writer,
                "writer deleted although the spec asks for writer"
            );
        }
        if plan.worker_mode == Architecture::Writer
            && w.template_mode != Architecture::Writer
            && self.bootstrapped
        {
            assert!(
                w.writer_available && w.writer_present,
                "workers moved to writer mode before the writer was Available"
            );
            assert!(
                w.topic_exists || observed.results_topic_ready,
                "workers publish to a topic that was never ensured"
            );
            assert_eq!(
                desired,
                Architecture::Writer,
                "workers moved into writer mode although the spec asks for {desired}"
            );
        }
        if let Some(m) = &plan.migration {
            assert_ne!(m.from, m.to);
            assert!(
                phases(m.from, m.to).contains(&m.phase),
                "{:?} is not on the {} → {} path",
                m.phase,
                m.from,
                m.to
            );
        }
    }

    /// `phaseStartedAt` moves exactly when the phase (or the migration) changes.
    fn check_phase_clock(&self, plan: &Plan, now: &Time) {
        let Some(m) = &plan.migration else {
            return;
        };
        let same_phase = self.migration.as_ref().filter(|before| {
            before.from == m.from
                && before.to == m.to
                && before.started_at == m.started_at
                && before.phase == m.phase
        });
        match same_phase {
            Some(before) => assert_eq!(m.phase_started_at, before.phase_started_at),
            None => assert_eq!(m.phase_started_at.as_ref(), Some(now)),
        }
    }

    fn progress(&mut self, tick: Tick) {
        let w = &mut self.world;
        if tick.rollout_step {
            if let Some(pod) = w.pods.iter_mut().find(|p| **p != w.template_mode) {
                let old = *pod;
                *pod = w.template_mode;
                if tick.grace > 0 {
                    w.terminating.push((old, tick.grace));
                }
            }
        }
        w.ever_writer_mode |= w.pods.contains(&Architecture::Writer);
        if w.writer_present && tick.writer_becomes_available {
            w.writer_available = true;
        }
        // A terminating pod finishes its batch and publishes it as it exits.
        let last_batches = w
            .terminating
            .iter()
            .filter(|(mode, left)| *mode == Architecture::Writer && *left == 1)
            .count();
        let published =
            (w.writer_mode_pods() as u64 * u64::from(tick.traffic)) + last_batches as u64;
        if w.writer_present {
            w.lag += published;
        } else {
            w.lost += published;
        }
        if w.writer_present && w.writer_available {
            w.lag = w.lag.saturating_sub(u64::from(tick.drain));
        }
        for (_, left) in &mut w.terminating {
            *left -= 1;
        }
        w.terminating.retain(|(_, left)| *left > 0);
    }

    fn check_phase_order(&self) {
        for ((from, to, _), seen) in &self.history {
            let path = phases(*from, *to);
            let index = |p: &MigrationPhase| path.iter().position(|x| x == p).unwrap_or(usize::MAX);
            for pair in seen.windows(2) {
                let (a, b) = (index(&pair[0]), index(&pair[1]));
                let drain_retry = pair[0] == MigrationPhase::RemovingWriter
                    && pair[1] == MigrationPhase::DrainingResults;
                assert!(
                    a <= b || drain_retry,
                    "{from} → {to} went {:?} → {:?}",
                    pair[0],
                    pair[1]
                );
            }
        }
    }

    /// Calm ticks until the spec is reached; false when it never is.
    fn settle(&mut self, desired: Architecture) -> bool {
        // The bound covers draining the largest lag 40 random ticks can pile up
        // (up to 3 pods and their terminating predecessors × 3 results × 40
        // ticks at 3 per tick) plus the rollouts.
        for _ in 0..600 {
            self.reconcile(desired, CALM);
            self.progress(CALM);
            if self.migration.is_none() && self.applied == Some(desired) {
                // Let the last replaced pods finish terminating.
                for _ in 0..4 {
                    self.progress(CALM);
                }
                return true;
            }
        }
        false
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any path, with spec edits and reverts at any time, terminating pods
    /// that keep publishing and a status that may be lost, ends in the last
    /// requested architecture, passes phases in the documented order and loses
    /// nothing.
    #[test]
    fn every_path_reaches_its_target_without_losing_results(
        initial in arch_strategy(),
        edits in proptest::collection::vec((0usize..40, arch_strategy()), 1..8),
        ticks in proptest::collection::vec(tick_strategy(), 40),
    ) {
        let mut sim = Sim::new(initial);
        for _ in 0..PODS {
            sim.progress(CALM);
        }
        let mut desired = initial;
        for (t, tick) in ticks.iter().enumerate() {
            for (at, arch) in &edits {
                if *at == t {
                    desired = *arch;
                }
            }
            sim.reconcile(desired, *tick);
            sim.progress(*tick);
        }
        let settled = sim.settle(desired);
        prop_assert!(settled, "stuck in {:?} wanting {desired}", sim.migration);
        let w = &sim.world;
        prop_assert_eq!(w.template_mode, desired);
        prop_assert!(w.pods.iter().all(|p| *p == desired));
        prop_assert!(w.terminating.is_empty());
        prop_assert_eq!(w.writer_present, desired == Architecture::Writer);
        prop_assert_eq!(w.lost, 0);
        sim.check_phase_order();
    }

    /// A spec reverted at any point of a migration comes back without loss,
    /// and the way back is taken while it is open: a writer → X migration
    /// reverted while its writer still runs keeps that writer; an X → writer
    /// migration reverted before its workers rolled never puts a worker into
    /// writer mode.
    #[test]
    fn a_revert_at_any_point_is_honoured(
        (initial, target) in arch_pair_strategy(),
        revert_at in 1usize..30,
        ticks in proptest::collection::vec(tick_strategy(), 40),
    ) {
        let mut sim = Sim::new(initial);
        for _ in 0..PODS {
            sim.progress(CALM);
        }
        let mut phase_at_revert = None;
        for (t, tick) in ticks.iter().enumerate() {
            let tick = Tick { status_lost: false, ..*tick };
            let desired = if t < revert_at { target } else { initial };
            if t == revert_at {
                phase_at_revert = sim.migration.as_ref().map(|m| (m.from, m.to, m.phase));
            }
            sim.reconcile(desired, tick);
            sim.progress(tick);
        }
        prop_assert!(sim.settle(initial), "stuck in {:?} wanting {initial}", sim.migration);
        prop_assert_eq!(sim.world.lost, 0);
        prop_assert_eq!(sim.world.writer_present, initial == Architecture::Writer);
        use MigrationPhase::*;
        match phase_at_revert {
            Some((Architecture::Writer, _, RollingWorkers | DrainingResults)) => {
                prop_assert_eq!(sim.world.writer_deletions, 0, "the writer was removed and started again");
            }
            Some((from, Architecture::Writer, EnsuringResultsTopic | StartingWriter)) => {
                prop_assert_eq!(from, initial);
                prop_assert!(!sim.world.ever_writer_mode, "a worker entered writer mode after the revert");
            }
            _ => {}
        }
        sim.check_phase_order();
    }

    /// Without a measurable lag the writer is never removed: the migration waits.
    #[test]
    fn unknown_lag_blocks_writer_removal(target in prop_oneof![Just(Architecture::Standard), Just(Architecture::Batched)]) {
        let mut sim = Sim::new(Architecture::Writer);
        for _ in 0..PODS {
            sim.progress(CALM);
        }
        let blind = Tick { lag_unknown: true, ..CALM };
        for _ in 0..30 {
            sim.reconcile(target, blind);
            sim.progress(blind);
        }
        prop_assert!(sim.world.writer_present);
        prop_assert_eq!(sim.migration.as_ref().map(|m| m.phase), Some(MigrationPhase::DrainingResults));
        prop_assert_eq!(sim.world.lost, 0);
    }

    /// Old writer-mode pods that outlive the rollout hold the writer: it goes
    /// only after the last of them is gone and the lag read after that is 0.
    #[test]
    fn terminating_writer_mode_pods_hold_the_writer(
        target in prop_oneof![Just(Architecture::Standard), Just(Architecture::Batched)],
        grace in 1u8..6,
    ) {
        let mut sim = Sim::new(Architecture::Writer);
        for _ in 0..PODS {
            sim.progress(CALM);
        }
        // No steady traffic: the lag reads 0 while the old pods still hold
        // their last batch, which they publish as they exit.
        let slow = Tick { grace, traffic: 0, ..CALM };
        let mut removed_at = None;
        for t in 0..60 {
            let had_writer = sim.world.writer_present;
            let terminating_writers = sim.world.writer_mode_pods();
            sim.reconcile(target, slow);
            if had_writer && !sim.world.writer_present {
                prop_assert_eq!(terminating_writers, 0);
                removed_at = Some(t);
            }
            sim.progress(slow);
        }
        prop_assert!(removed_at.is_some(), "the writer is removed in the end");
        prop_assert_eq!(sim.world.lost, 0);
    }
}
