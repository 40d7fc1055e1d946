//! The architecture advisor (the design's §4), pure: from measured signals to
//! a verdict, from verdicts over time to an advice that does not flap, and
//! from an advice to an automatic switch. Reading the signals is
//! `signals.rs`'s job; writing the status and the spec is the controller's.
//!
//! The rule:
//! - the jobs lag grows and utilisation is at or above `batchedAt`: the GPU is
//!   the bottleneck, micro-batches use it better → `batched`;
//! - the lag grows, utilisation is below `writerBelow` and a job's final
//!   database write is slow: the GPU waits for the database → `writer`;
//! - the lag is small, does not grow and utilisation is below `idle`: nothing
//!   needs the extra parts → `standard`;
//! - anything else (a lag that grows between the bands, a busy pipeline that
//!   keeps up, signals missing) holds the current advice.
//!
//! Hysteresis comes from the gap between the bands (nothing in between ever
//! changes the advice) and from the dwell time: a new recommendation becomes
//! the advice only after it was the verdict at every evaluation for
//! `dwellSeconds`; one evaluation that says otherwise starts the wait over.

use crate::crd::{Architecture, AutoArchitectureMode, AutoArchitectureSpec};

/// Where a utilisation figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UtilizationSource {
    /// NVML's GPU utilisation.
    Gpu,
    /// The share of wall time the engine spent inferring (no GPU seen).
    EngineBusy,
}

impl UtilizationSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UtilizationSource::Gpu => "gpu",
            UtilizationSource::EngineBusy => "engineBusy",
        }
    }
}

/// The signals of one evaluation; `None` where a value could not be measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signals {
    /// Mean utilisation of the workers, 0..1.
    pub utilization: Option<(f64, UtilizationSource)>,
    /// Messages on the jobs topic not committed by the workers.
    pub jobs_lag: Option<u64>,
    /// Least-squares slope of that lag, messages per second.
    pub lag_growth_per_second: Option<f64>,
    /// Mean time of a job's final database write since the last evaluation.
    pub store_finish_seconds: Option<f64>,
    /// Worker and writer pods whose metrics were read.
    pub pods_read: usize,
}

/// What the signals of one evaluation call for.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Recommend {
        architecture: Architecture,
        reason: String,
    },
    /// Nothing clear: keep the current advice.
    Hold { reason: String },
}

impl Verdict {
    pub fn reason(&self) -> &str {
        match self {
            Verdict::Recommend { reason, .. } | Verdict::Hold { reason } => reason,
        }
    }

    pub fn architecture(&self) -> Option<Architecture> {
        match self {
            Verdict::Recommend { architecture, .. } => Some(*architecture),
            Verdict::Hold { .. } => None,
        }
    }
}

fn percent(ratio: f64) -> i64 {
    (ratio * 100.0).round() as i64
}

/// The seed's rule on one set of signals.
pub fn verdict(signals: &Signals, rule: &AutoArchitectureSpec) -> Verdict {
    let (Some((utilization, source)), Some(lag), Some(growth)) = (
        signals.utilization,
        signals.jobs_lag,
        signals.lag_growth_per_second,
    ) else {
        let mut missing = Vec::new();
        if signals.utilization.is_none() {
            missing.push("utilisation (no worker pod's metrics could be read)");
        }
        if signals.jobs_lag.is_none() {
            missing.push("the jobs lag (Kafka could not be asked)");
        } else if signals.lag_growth_per_second.is_none() {
            missing.push("the lag's growth (too few readings yet)");
        }
        return Verdict::Hold {
            reason: format!("signals incomplete: no {}", missing.join(", no ")),
        };
    };
    let utilization_percent = percent(utilization);
    let growth_per_minute = (growth * 60.0).round() as i64;
    let (what, engine) = match source {
        UtilizationSource::Gpu => ("GPU utilisation", "the GPU"),
        UtilizationSource::EngineBusy => ("engine busy", "inference"),
    };
    let growing = lag > 0 && growth_per_minute >= rule.lag_growth_per_minute;
    let lag_text = format!("jobs lag {lag} growing {growth_per_minute}/min");
    if growing && utilization_percent >= i64::from(rule.batched_at_utilization_percent) {
        return Verdict::Recommend {
            architecture: Architecture::Batched,
            reason: format!(
                "{what} {utilization_percent}% ≥ {}% and {lag_text} (≥ {}/min): {engine} is the bottleneck",
                rule.batched_at_utilization_percent, rule.lag_growth_per_minute
            ),
        };
    }
    if growing && utilization_percent < i64::from(rule.writer_below_utilization_percent) {
        return match signals.store_finish_seconds {
            Some(store) if store * 1000.0 >= rule.slow_store_millis as f64 => Verdict::Recommend {
                architecture: Architecture::Writer,
                reason: format!(
                    "{what} {utilization_percent}% < {}%, {lag_text} and final writes take {:.0} ms (≥ {} ms): {engine} waits for the database",
                    rule.writer_below_utilization_percent,
                    store * 1000.0,
                    rule.slow_store_millis
                ),
            },
            Some(store) => Verdict::Hold {
                reason: format!(
                    "{lag_text} at {what} {utilization_percent}%, but final writes take {:.0} ms (< {} ms): neither batching nor a writer would help; add workers",
                    store * 1000.0,
                    rule.slow_store_millis
                ),
            },
            None => Verdict::Hold {
                reason: format!(
                    "{lag_text} at {what} {utilization_percent}%; no final write was timed since the last reading"
                ),
            },
        };
    }
    if growing {
        return Verdict::Hold {
            reason: format!(
                "{lag_text} at {what} {utilization_percent}%, between {}% and {}%",
                rule.writer_below_utilization_percent, rule.batched_at_utilization_percent
            ),
        };
    }
    let idle = lag <= rule.idle_lag.max(0) as u64
        && utilization_percent < i64::from(rule.idle_utilization_percent);
    if idle {
        return Verdict::Recommend {
            architecture: Architecture::Standard,
            reason: format!(
                "idle: jobs lag {lag} (≤ {}), {what} {utilization_percent}% (< {}%)",
                rule.idle_lag, rule.idle_utilization_percent
            ),
        };
    }
    Verdict::Hold {
        reason: format!(
            "keeping up: jobs lag {lag} changing {growth_per_minute}/min, {what} {utilization_percent}%"
        ),
    }
}

/// The advice's memory between evaluations; times are seconds on any clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memory {
    /// The current advice.
    pub architecture: Architecture,
    /// When it became the advice.
    pub since: i64,
    /// Another recommendation and since when every evaluation made it.
    pub pending: Option<(Architecture, i64)>,
}

impl Memory {
    /// The advice of a pipeline the advisor has not judged yet: what runs.
    pub fn start(running: Architecture, now: i64) -> Memory {
        Memory {
            architecture: running,
            since: now,
            pending: None,
        }
    }
}

/// The advice after one more evaluation.
pub fn remember(memory: Memory, verdict: &Verdict, now: i64, dwell_seconds: i64) -> Memory {
    let wanted = match verdict.architecture() {
        Some(wanted) if wanted != memory.architecture => wanted,
        // Hold, or the advice again: whatever was pending was interrupted.
        _ => {
            return Memory {
                pending: None,
                ..memory
            }
        }
    };
    let since = match memory.pending {
        Some((pending, since)) if pending == wanted && since <= now => since,
        _ => now,
    };
    if now - since >= dwell_seconds {
        Memory {
            architecture: wanted,
            since: now,
            pending: None,
        }
    } else {
        Memory {
            pending: Some((wanted, since)),
            ..memory
        }
    }
}

/// The architecture `Apply` switches the spec to now, if any: only in
/// `Apply`, when the advice differs from the spec, no migration runs, and
/// `cooldownSeconds` have passed since the last switch or migration.
pub fn switch_due(
    rule: &AutoArchitectureSpec,
    advice: Architecture,
    spec: Architecture,
    migration_running: bool,
    last_change: Option<i64>,
    now: i64,
) -> Option<Architecture> {
    if rule.mode != AutoArchitectureMode::Apply || advice == spec || migration_running {
        return None;
    }
    let cooled = last_change.is_none_or(|at| now - at >= rule.cooldown_seconds);
    cooled.then_some(advice)
}

/// What one pod said at two readings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PodReading {
    /// Seconds between the two readings.
    pub elapsed: f64,
    pub gpu_utilization: Option<f64>,
    /// Engine busy seconds between the readings; absent in pods without an engine.
    pub busy_seconds: Option<f64>,
    /// Final writes between the readings: summed seconds and count.
    pub finish_sum: f64,
    pub finish_count: f64,
}

/// Utilisation and final-write time of the pipeline from its pods' readings:
/// the mean over worker pods (GPU where NVML reports one, else the busy
/// share), and the mean final write over all pods.
pub fn summarize(pods: &[PodReading]) -> (Option<(f64, UtilizationSource)>, Option<f64>) {
    let gpus: Vec<f64> = pods.iter().filter_map(|p| p.gpu_utilization).collect();
    let utilization = if !gpus.is_empty() {
        Some((
            gpus.iter().sum::<f64>() / gpus.len() as f64,
            UtilizationSource::Gpu,
        ))
    } else {
        let busy: Vec<f64> = pods
            .iter()
            .filter(|p| p.elapsed > 0.0)
            .filter_map(|p| p.busy_seconds.map(|b| (b / p.elapsed).clamp(0.0, 1.0)))
            .collect();
        (!busy.is_empty()).then(|| {
            (
                busy.iter().sum::<f64>() / busy.len() as f64,
                UtilizationSource::EngineBusy,
            )
        })
    };
    let count: f64 = pods.iter().map(|p| p.finish_count).sum();
    let sum: f64 = pods.iter().map(|p| p.finish_sum).sum();
    let store = (count > 0.0).then(|| sum / count);
    (utilization, store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> AutoArchitectureSpec {
        AutoArchitectureSpec::default()
    }

    fn signals(utilization: f64, lag: u64, growth_per_minute: f64, store_ms: f64) -> Signals {
        Signals {
            utilization: Some((utilization, UtilizationSource::Gpu)),
            jobs_lag: Some(lag),
            lag_growth_per_second: Some(growth_per_minute / 60.0),
            store_finish_seconds: Some(store_ms / 1000.0),
            pods_read: 2,
        }
    }

    #[test]
    fn the_seeds_three_cases() {
        let busy_gpu = verdict(&signals(0.93, 1200, 720.0, 5.0), &rule());
        assert_eq!(busy_gpu.architecture(), Some(Architecture::Batched));
        assert!(busy_gpu.reason().contains("93% ≥ 80%"), "{busy_gpu:?}");
        let slow_db = verdict(&signals(0.40, 1200, 720.0, 180.0), &rule());
        assert_eq!(slow_db.architecture(), Some(Architecture::Writer));
        assert!(slow_db.reason().contains("180 ms"), "{slow_db:?}");
        let idle = verdict(&signals(0.05, 0, 0.0, 3.0), &rule());
        assert_eq!(idle.architecture(), Some(Architecture::Standard));
    }

    #[test]
    fn between_the_bands_nothing_changes() {
        // Growing lag at 70 %: neither batched (≥ 80) nor writer (< 60).
        assert_eq!(
            verdict(&signals(0.70, 500, 600.0, 500.0), &rule()).architecture(),
            None
        );
        // Busy and keeping up: not idle, not growing.
        assert_eq!(
            verdict(&signals(0.95, 300, 0.0, 5.0), &rule()).architecture(),
            None
        );
        // Slow GPU with a growing lag but a fast database: more workers, not a writer.
        let fast_db = verdict(&signals(0.30, 500, 600.0, 4.0), &rule());
        assert_eq!(fast_db.architecture(), None);
        assert!(fast_db.reason().contains("add workers"), "{fast_db:?}");
    }

    #[test]
    fn missing_signals_hold_and_say_which() {
        let mut partial = signals(0.95, 1000, 900.0, 5.0);
        partial.lag_growth_per_second = None;
        let held = verdict(&partial, &rule());
        assert_eq!(held.architecture(), None);
        assert!(held.reason().contains("growth"), "{held:?}");
        let held = verdict(&Signals::default(), &rule());
        assert!(held.reason().contains("utilisation"), "{held:?}");
        assert!(held.reason().contains("Kafka"), "{held:?}");
    }

    #[test]
    fn a_recommendation_becomes_the_advice_after_the_dwell() {
        let batched = verdict(&signals(0.95, 1000, 900.0, 5.0), &rule());
        let start = Memory::start(Architecture::Standard, 0);
        let waiting = remember(start, &batched, 10, 120);
        assert_eq!(waiting.architecture, Architecture::Standard);
        assert_eq!(waiting.pending, Some((Architecture::Batched, 10)));
        let still = remember(waiting.clone(), &batched, 129, 120);
        assert_eq!(still.architecture, Architecture::Standard);
        let advised = remember(still, &batched, 130, 120);
        assert_eq!(advised.architecture, Architecture::Batched);
        assert_eq!((advised.since, advised.pending), (130, None));
        // One evaluation that holds starts the wait over.
        let held = verdict(&signals(0.70, 500, 600.0, 5.0), &rule());
        let interrupted = remember(waiting, &held, 60, 120);
        assert_eq!(interrupted.pending, None);
    }

    #[test]
    fn apply_waits_for_the_migration_and_the_cooldown() {
        let apply = AutoArchitectureSpec {
            mode: AutoArchitectureMode::Apply,
            cooldown_seconds: 600,
            ..rule()
        };
        let (batched, standard) = (Architecture::Batched, Architecture::Standard);
        assert_eq!(
            switch_due(&apply, batched, standard, false, None, 0),
            Some(batched)
        );
        assert_eq!(switch_due(&apply, batched, standard, true, None, 0), None);
        assert_eq!(
            switch_due(&apply, batched, standard, false, Some(100), 699),
            None
        );
        assert_eq!(
            switch_due(&apply, batched, standard, false, Some(100), 700),
            Some(batched)
        );
        assert_eq!(switch_due(&apply, batched, batched, false, None, 0), None);
        let advise = AutoArchitectureSpec {
            mode: AutoArchitectureMode::Advise,
            ..apply
        };
        assert_eq!(switch_due(&advise, batched, standard, false, None, 0), None);
    }

    #[test]
    fn gpu_utilisation_wins_over_the_busy_share() {
        let cpu = PodReading {
            elapsed: 10.0,
            gpu_utilization: None,
            busy_seconds: Some(9.0),
            finish_sum: 0.5,
            finish_count: 10.0,
        };
        let (utilization, store) = summarize(&[cpu]);
        assert_eq!(utilization, Some((0.9, UtilizationSource::EngineBusy)));
        assert_eq!(store, Some(0.05));
        let gpu = PodReading {
            gpu_utilization: Some(0.5),
            ..cpu
        };
        let writer = PodReading {
            elapsed: 10.0,
            gpu_utilization: None,
            busy_seconds: None,
            finish_sum: 1.5,
            finish_count: 10.0,
        };
        let (utilization, store) = summarize(&[gpu, writer]);
        assert_eq!(utilization, Some((0.5, UtilizationSource::Gpu)));
        assert_eq!(store, Some(0.1));
        assert_eq!(summarize(&[]), (None, None));
    }
}
