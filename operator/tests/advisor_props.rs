//! Property tests of the architecture advisor: noisy and oscillating signals
//! never flap the advice, a clear and lasting signal always wins, and `Apply`
//! never switches during a migration or inside the cooldown.

use ocr_operator::advisor::{
    remember, switch_due, verdict, Memory, Signals, UtilizationSource, Verdict,
};
use ocr_operator::crd::{Architecture, AutoArchitectureMode, AutoArchitectureSpec};
use proptest::prelude::*;

fn architecture() -> impl Strategy<Value = Architecture> {
    prop_oneof![
        Just(Architecture::Standard),
        Just(Architecture::Batched),
        Just(Architecture::Writer),
    ]
}

/// Any signals, some of them missing.
fn signals() -> impl Strategy<Value = Signals> {
    (
        proptest::option::weighted(0.9, 0.0..=1.0f64),
        proptest::option::weighted(0.9, 0u64..5000),
        proptest::option::weighted(0.9, -50.0..50.0f64),
        proptest::option::weighted(0.8, 0.0..0.5f64),
        any::<bool>(),
    )
        .prop_map(|(utilization, lag, growth, store, gpu)| Signals {
            utilization: utilization.map(|u| {
                let source = if gpu {
                    UtilizationSource::Gpu
                } else {
                    UtilizationSource::EngineBusy
                };
                (u, source)
            }),
            jobs_lag: lag,
            lag_growth_per_second: growth,
            store_finish_seconds: store,
            pods_read: 1,
        })
}

fn rule(dwell_seconds: i64) -> AutoArchitectureSpec {
    AutoArchitectureSpec {
        mode: AutoArchitectureMode::Apply,
        dwell_seconds,
        ..AutoArchitectureSpec::default()
    }
}

/// Signals squarely inside one band of the rule.
fn clear_signals(target: Architecture, noise: f64) -> Signals {
    let (utilization, lag, growth_per_minute, store_ms) = match target {
        Architecture::Batched => (0.85 + noise * 0.1, 2000, 600.0 + 400.0 * noise, 5.0),
        Architecture::Writer => (
            0.2 + noise * 0.3,
            2000,
            600.0 + 400.0 * noise,
            80.0 + 100.0 * noise,
        ),
        Architecture::Standard => (0.05 + noise * 0.2, (noise * 10.0) as u64, -5.0 * noise, 2.0),
    };
    Signals {
        utilization: Some((utilization, UtilizationSource::Gpu)),
        jobs_lag: Some(lag),
        lag_growth_per_second: Some(growth_per_minute / 60.0),
        store_finish_seconds: Some(store_ms / 1000.0),
        pods_read: 2,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the signals do, the advice changes at most once per dwell
    /// time, and only to what every evaluation of the last dwell time called for.
    #[test]
    fn the_advice_never_flaps(
        start in architecture(),
        dwell in 30i64..600,
        evaluations in proptest::collection::vec((1i64..40, signals()), 1..200),
    ) {
        let rule = rule(dwell);
        let mut now = 0;
        let mut memory = Memory::start(start, now);
        // (time, verdict architecture) of every evaluation.
        let mut history: Vec<(i64, Option<Architecture>)> = Vec::new();
        let mut changes: Vec<i64> = Vec::new();
        for (step, signals) in evaluations {
            now += step;
            let verdict = verdict(&signals, &rule);
            history.push((now, verdict.architecture()));
            let next = remember(memory.clone(), &verdict, now, dwell);
            if next.architecture != memory.architecture {
                // Every evaluation since `now - dwell` (and the one just
                // before that window, which started the wait) called for it.
                let window: Vec<_> = history
                    .iter()
                    .filter(|(t, _)| *t >= now - dwell)
                    .collect();
                prop_assert!(window.iter().all(|(_, a)| *a == Some(next.architecture)),
                    "changed to {:?} at {now} after {:?}", next.architecture, window);
                let started = history.iter().rev()
                    .take_while(|(_, a)| *a == Some(next.architecture))
                    .last()
                    .map(|(t, _)| *t)
                    .unwrap_or(now);
                prop_assert!(now - started >= dwell);
                if let Some(last) = changes.last() {
                    prop_assert!(now - last >= dwell, "two changes {} s apart, dwell {dwell}", now - last);
                }
                changes.push(now);
            }
            memory = next;
        }
        prop_assert!(changes.len() as i64 <= now / dwell + 1);
    }

    /// Signals that swing between two bands faster than the dwell time never
    /// change the advice, however long they swing.
    #[test]
    fn oscillating_signals_keep_the_advice(
        start in architecture(),
        a in architecture(),
        b in architecture(),
        dwell in 60i64..600,
        period_fraction in 0.0f64..1.0,
        noise in proptest::collection::vec(0.0f64..1.0, 200),
    ) {
        prop_assume!(a != b);
        let rule = rule(dwell);
        // Evaluations every 15 s; each band lasts at least that (so the
        // evaluations see the swing) and less than the dwell time.
        let half_period = 15 + ((dwell - 31) as f64 * period_fraction) as i64;
        let mut memory = Memory::start(start, 0);
        for (i, noise) in noise.iter().enumerate() {
            let now = 15 * (i as i64 + 1);
            let band = if (now / half_period) % 2 == 0 { a } else { b };
            let verdict = verdict(&clear_signals(band, *noise), &rule);
            memory = remember(memory, &verdict, now, dwell);
            prop_assert_eq!(memory.architecture, start, "band {:?} at {}", band, now);
        }
    }

    /// A clear signal that lasts longer than the dwell time becomes the advice.
    #[test]
    fn a_lasting_signal_wins(
        start in architecture(),
        target in architecture(),
        dwell in 0i64..600,
        noise in proptest::collection::vec(0.0f64..1.0, 1..10),
    ) {
        let rule = rule(dwell);
        let mut memory = Memory::start(start, 0);
        let mut now = 0;
        let mut i = 0;
        while now <= dwell + 15 {
            now += 15;
            let verdict = verdict(&clear_signals(target, noise[i % noise.len()]), &rule);
            prop_assert_eq!(verdict.architecture(), Some(target), "{:?}", verdict);
            memory = remember(memory, &verdict, now, dwell);
            i += 1;
        }
        prop_assert_eq!(memory.architecture, target);
    }

    /// Signals between the bands, or missing, never recommend anything.
    #[test]
    fn the_gap_between_the_bands_holds(
        utilization in 0.60f64..0.795,
        lag in 1u64..5000,
        growth_per_minute in 60.0f64..3000.0,
        store in proptest::option::of(0.0f64..1.0),
    ) {
        let signals = Signals {
            utilization: Some((utilization, UtilizationSource::Gpu)),
            jobs_lag: Some(lag),
            lag_growth_per_second: Some(growth_per_minute / 60.0),
            store_finish_seconds: store,
            pods_read: 1,
        };
        let held = verdict(&signals, &rule(60));
        prop_assert!(matches!(held, Verdict::Hold { .. }), "{:?}", held);
    }

    /// `Apply` switches only to a different advice, never while a migration
    /// runs and never inside the cooldown after the last change.
    #[test]
    fn apply_respects_migrations_and_the_cooldown(
        advice in architecture(),
        spec in architecture(),
        migrating in any::<bool>(),
        cooldown in 0i64..3600,
        last_change in proptest::option::of(0i64..10_000),
        now in 0i64..20_000,
        mode in prop_oneof![Just(AutoArchitectureMode::Disabled), Just(AutoArchitectureMode::Advise), Just(AutoArchitectureMode::Apply)],
    ) {
        let rule = AutoArchitectureSpec { mode, cooldown_seconds: cooldown, ..AutoArchitectureSpec::default() };
        let due = switch_due(&rule, advice, spec, migrating, last_change, now);
        if let Some(target) = due {
            prop_assert_eq!(mode, AutoArchitectureMode::Apply);
            prop_assert_eq!(target, advice);
            prop_assert!(target != spec);
            prop_assert!(!migrating);
            prop_assert!(last_change.is_none_or(|at| now - at >= cooldown));
        } else if mode == AutoArchitectureMode::Apply && advice != spec && !migrating {
            prop_assert!(last_change.is_some_and(|at| now - at < cooldown));
        }
    }
}
