//! Property tests of the migration state machine against a simulated cluster.
//!
//! The simulation models what matters for losing jobs: worker pods switch mode
//! one at a time during a rollout; every pod in writer mode adds to the results
//! lag; an available writer drains it; deleting the writer with lag > 0 loses
//! those results. Spec changes arrive at arbitrary ticks, including mid-migration.

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
    pods: [Architecture; PODS],
    writer_present: bool,
    writer_available: bool,
    topic_exists: bool,
    lag: u64,
    lost: u64,
}

#[derive(Clone, Copy, Debug)]
struct Tick {
    rollout_step: bool,
    writer_becomes_available: bool,
    lag_unknown: bool,
    topic_admin_fails: bool,
    traffic: u8,
    drain: u8,
}

fn tick_strategy() -> impl Strategy<Value = Tick> {
    (any::<bool>(), any::<bool>(), 0u8..4, 0u8..4, 0u8..4, 0u8..4).prop_map(
        |(rollout_step, writer_becomes_available, unknown, fails, traffic, drain)| Tick {
            rollout_step,
            writer_becomes_available,
            lag_unknown: unknown == 0,
            topic_admin_fails: fails == 0,
            traffic,
            drain,
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
};

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
}

impl Sim {
    fn new(initial: Architecture) -> Sim {
        let mut sim = Sim {
            world: World {
                template_mode: initial,
                pods: [initial; PODS],
                writer_present: false,
                writer_available: false,
                topic_exists: false,
                lag: 0,
                lost: 0,
            },
            applied: None,
            migration: None,
            history: BTreeMap::new(),
            clock: 0,
        };
        let plan = sim.reconcile(initial, CALM);
        assert!(plan.migration.is_none());
        sim
    }

    fn observe(&self, tick: Tick) -> Observed {
        let w = &self.world;
        Observed {
            worker_mode: Some(w.template_mode),
            workers_rolled_out: w.pods.iter().all(|p| *p == w.template_mode),
            writer_present: w.writer_present,
            writer_available: w.writer_present && w.writer_available,
            results_topic_ready: w.topic_exists || !tick.topic_admin_fails,
            results_lag: (!tick.lag_unknown).then_some(w.lag),
        }
    }

    fn reconcile(&mut self, desired: Architecture, tick: Tick) -> Plan {
        self.clock += 1;
        let now = Time(Timestamp::from_second(1_800_000_000 + self.clock).expect("valid"));
        let observed = self.observe(tick);
        let plan = step(
            self.applied,
            self.migration.as_ref(),
            desired,
            &observed,
            &now,
        );
        self.check_invariants(&observed, &plan);

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
            self.world.lost += self.world.lag;
            self.world.lag = 0;
        }
        self.applied = Some(plan.architecture);
        self.migration = plan.migration.clone();
        plan
    }

    fn check_invariants(&self, observed: &Observed, plan: &Plan) {
        let w = &self.world;
        if w.writer_present && !plan.writer {
            assert_eq!(w.lag, 0, "writer deleted with results lag {}", w.lag);
            assert_eq!(
                observed.results_lag,
                Some(0),
                "writer deleted on an unknown lag"
            );
            assert!(
                w.pods.iter().all(|p| *p != Architecture::Writer)
                    && w.template_mode != Architecture::Writer
                    && plan.worker_mode != Architecture::Writer,
                "writer deleted while a worker can still publish results"
            );
        }
        let bootstrapping = self.applied.is_none();
        if plan.worker_mode == Architecture::Writer
            && w.template_mode != Architecture::Writer
            && !bootstrapping
        {
            assert!(
                w.writer_available && w.writer_present,
                "workers moved to writer mode before the writer was Available"
            );
            assert!(
                w.topic_exists || observed.results_topic_ready,
                "workers publish to a topic that was never ensured"
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

    fn progress(&mut self, tick: Tick) {
        let w = &mut self.world;
        if tick.rollout_step {
            if let Some(pod) = w.pods.iter_mut().find(|p| **p != w.template_mode) {
                *pod = w.template_mode;
            }
        }
        if w.writer_present && tick.writer_becomes_available {
            w.writer_available = true;
        }
        let publishers = w
            .pods
            .iter()
            .filter(|p| **p == Architecture::Writer)
            .count() as u64;
        w.lag += publishers * u64::from(tick.traffic);
        if w.writer_present && w.writer_available {
            w.lag = w.lag.saturating_sub(u64::from(tick.drain));
        }
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
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any path, with spec edits at any time, ends in the last requested
    /// architecture, passes phases in the documented order and loses nothing.
    #[test]
    fn every_path_reaches_its_target_without_losing_results(
        initial in arch_strategy(),
        edits in proptest::collection::vec((0usize..40, arch_strategy()), 1..5),
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
        // The user stopped editing; the world now progresses every tick. The
        // bound covers draining the largest lag 40 random ticks can pile up
        // (3 pods × 3 results × 40 ticks at 3 per tick) plus the rollouts.
        let mut settled = false;
        for _ in 0..300 {
            sim.reconcile(desired, CALM);
            sim.progress(CALM);
            if sim.migration.is_none() && sim.applied == Some(desired) {
                settled = true;
                break;
            }
        }
        prop_assert!(settled, "stuck in {:?} wanting {desired}", sim.migration);
        for _ in 0..PODS {
            sim.progress(CALM);
        }
        let w = &sim.world;
        prop_assert_eq!(w.template_mode, desired);
        prop_assert!(w.pods.iter().all(|p| *p == desired));
        prop_assert_eq!(w.writer_present, desired == Architecture::Writer);
        prop_assert_eq!(w.lost, 0);
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
}
