//! Prometheus metrics served on `/metrics`: the operator's own work
//! (reconciliations, failures, leadership) and, per pipeline (labelled by
//! `namespace` and `pipeline`), its phase, migration, results lag and pods.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::crd::{Migration, OcrPipelineStatus, Phase, ReplicaCounts};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabels {
    namespace: String,
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    namespace: String,
    pipeline: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    namespace: String,
    pipeline: String,
    role: String,
}

/// Finished migrations are labelled by path only: per-pipeline histograms
/// would multiply the series by every bucket.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationLabels {
    from: String,
    to: String,
}

const ROLES: [&str; 3] = ["api", "worker", "writer"];

fn migration_histogram() -> Histogram {
    // 10 s .. about 5.7 h: a standard ↔ batched roll takes minutes, a
    // writer drain behind a slow database hours.
    Histogram::new(exponential_buckets(10.0, 2.0, 12))
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciliations: Counter,
    failures: Family<Vec<(String, String)>, Counter>,
    duration: Histogram,
    leader: Gauge,
    phase: Family<PhaseLabels, Gauge>,
    migration_seconds: Family<PipelineLabels, Gauge>,
    migrations_finished: Family<MigrationLabels, Histogram, fn() -> Histogram>,
    results_lag: Family<PipelineLabels, Gauge>,
    ready_replicas: Family<RoleLabels, Gauge>,
    desired_replicas: Family<RoleLabels, Gauge>,
    advice_differs: Family<PipelineLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ocr_operator");
        let reconciliations = Counter::default();
        let failures = Family::<Vec<(String, String)>, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let leader = Gauge::default();
        let phase = Family::<PhaseLabels, Gauge>::default();
        let migration_seconds = Family::<PipelineLabels, Gauge>::default();
        let migrations_finished =
            Family::<MigrationLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                migration_histogram,
            );
        let results_lag = Family::<PipelineLabels, Gauge>::default();
        let ready_replicas = Family::<RoleLabels, Gauge>::default();
        let desired_replicas = Family::<RoleLabels, Gauge>::default();
        let advice_differs = Family::<PipelineLabels, Gauge>::default();
        registry.register(
            "reconciliations",
            "Reconciliations started",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Failed reconciliations by error category",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconciliation",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "pipeline_phase",
            "1 for the pipeline's status.phase (Pending, Running, Migrating, Degraded), 0 for the others",
            phase.clone(),
        );
        registry.register(
            "pipeline_migration_seconds",
            "Seconds since the pipeline's running architecture migration started; 0 when none runs",
            migration_seconds.clone(),
        );
        registry.register(
            "migration_duration_seconds",
            "Duration of finished architecture migrations, by path",
            migrations_finished.clone(),
        );
        registry.register(
            "pipeline_results_lag",
            "Results the writer group has not persisted yet, as last measured (only while a writer may be removed)",
            results_lag.clone(),
        );
        registry.register(
            "pipeline_ready_replicas",
            "Ready pods of each role of the pipeline",
            ready_replicas.clone(),
        );
        registry.register(
            "pipeline_desired_replicas",
            "Pods each role's Deployment asks for",
            desired_replicas.clone(),
        );
        registry.register(
            "pipeline_advice_differs",
            "1 while the advisor recommends another architecture than spec.architecture, 0 while they agree; absent while autoArchitecture is Disabled",
            advice_differs.clone(),
        );
        Metrics {
            registry,
            reconciliations,
            failures,
            duration,
            leader,
            phase,
            migration_seconds,
            migrations_finished,
            results_lag,
            ready_replicas,
            desired_replicas,
            advice_differs,
        }
    }
}

impl Metrics {
    pub fn observe_reconcile(&self, took: Duration) {
        self.reconciliations.inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn reconcile_failed(&self, category: &str) {
        self.failures
            .get_or_create(&vec![("error".to_string(), category.to_string())])
            .inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Publishes a pipeline's state as the status just written shows it.
    /// `results_lag`: the lag this round measured; `None` (not measured, or
    /// unknown) removes the series, so no stale value outlives its reading.
    pub fn record_pipeline(
        &self,
        namespace: &str,
        name: &str,
        status: &OcrPipelineStatus,
        results_lag: Option<u64>,
        now: &Time,
    ) {
        let pipeline = PipelineLabels {
            namespace: namespace.to_string(),
            pipeline: name.to_string(),
        };
        for phase in Phase::ALL {
            self.phase
                .get_or_create(&phase_labels(namespace, name, phase))
                .set(i64::from(status.phase == Some(phase)));
        }
        let migrating_for = status
            .migration
            .as_ref()
            .map(|m| (now.0.as_second() - m.started_at.0.as_second()).max(0))
            .unwrap_or(0);
        self.migration_seconds
            .get_or_create(&pipeline)
            .set(migrating_for);
        match results_lag {
            Some(lag) => {
                self.results_lag
                    .get_or_create(&pipeline)
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
            None => {
                self.results_lag.remove(&pipeline);
            }
        }
        let advice = status
            .conditions
            .iter()
            .find(|c| c.type_ == crate::status::ARCHITECTURE_ADVICE);
        match advice {
            Some(condition) => {
                self.advice_differs
                    .get_or_create(&pipeline)
                    .set(i64::from(condition.status == "False"));
            }
            None => {
                self.advice_differs.remove(&pipeline);
            }
        }
        let replicas = status.replicas.as_ref();
        let counts: [(&str, Option<ReplicaCounts>); 3] = [
            ("api", replicas.map(|r| r.api)),
            ("worker", replicas.map(|r| r.worker)),
            ("writer", replicas.and_then(|r| r.writer)),
        ];
        for (role, count) in counts {
            let labels = role_labels(namespace, name, role);
            match count {
                Some(count) => {
                    self.ready_replicas
                        .get_or_create(&labels)
                        .set(i64::from(count.ready));
                    self.desired_replicas
                        .get_or_create(&labels)
                        .set(i64::from(count.desired));
                }
                // A role that no longer runs (the writer after a migration) has no pods to count.
                None => {
                    self.ready_replicas.remove(&labels);
                    self.desired_replicas.remove(&labels);
                }
            }
        }
    }

    /// A migration reached its target: its whole duration goes into the histogram.
    pub fn migration_finished(&self, migration: &Migration, now: &Time) {
        let seconds = (now.0.as_second() - migration.started_at.0.as_second()).max(0);
        self.migrations_finished
            .get_or_create(&MigrationLabels {
                from: migration.from.to_string(),
                to: migration.to.to_string(),
            })
            .observe(seconds as f64);
    }

    /// Removes every series of a deleted pipeline.
    pub fn forget_pipeline(&self, namespace: &str, name: &str) {
        let pipeline = PipelineLabels {
            namespace: namespace.to_string(),
            pipeline: name.to_string(),
        };
        for phase in Phase::ALL {
            self.phase.remove(&phase_labels(namespace, name, phase));
        }
        self.migration_seconds.remove(&pipeline);
        self.results_lag.remove(&pipeline);
        self.advice_differs.remove(&pipeline);
        for role in ROLES {
            let labels = role_labels(namespace, name, role);
            self.ready_replicas.remove(&labels);
            self.desired_replicas.remove(&labels);
        }
    }

    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn phase_labels(namespace: &str, name: &str, phase: Phase) -> PhaseLabels {
    PhaseLabels {
        namespace: namespace.to_string(),
        pipeline: name.to_string(),
        phase: phase.as_str().to_string(),
    }
}

fn role_labels(namespace: &str, name: &str, role: &str) -> RoleLabels {
    RoleLabels {
        namespace: namespace.to_string(),
        pipeline: name.to_string(),
        role: role.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Architecture, MigrationPhase, RoleReplicas};
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + second).expect("valid timestamp"))
    }

    #[test]
    fn failures_are_exported_by_category() {
        let metrics = Metrics::default();
        metrics.reconcile_failed("kube");
        metrics.observe_reconcile(Duration::from_millis(20));
        let text = metrics.render().expect("encodes");
        assert!(
            text.contains("ocr_operator_reconcile_failures_total{error=\"kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ocr_operator_reconciliations_total 1"),
            "{text}"
        );
    }

    fn migrating_writer_to_standard() -> OcrPipelineStatus {
        OcrPipelineStatus {
            phase: Some(Phase::Migrating),
            migration: Some(Migration {
                from: Architecture::Writer,
                to: Architecture::Standard,
                phase: MigrationPhase::DrainingResults,
                started_at: at(0),
                phase_started_at: Some(at(60)),
            }),
            replicas: Some(RoleReplicas {
                api: ReplicaCounts {
                    ready: 2,
                    desired: 2,
                },
                worker: ReplicaCounts {
                    ready: 1,
                    desired: 3,
                },
                writer: Some(ReplicaCounts {
                    ready: 2,
                    desired: 2,
                }),
            }),
            ..OcrPipelineStatus::default()
        }
    }

    #[test]
    fn a_pipeline_exports_its_phase_migration_lag_and_pods() {
        let metrics = Metrics::default();
        let status = migrating_writer_to_standard();
        metrics.record_pipeline("team-a", "invoices", &status, Some(42), &at(95));
        let text = metrics.render().expect("encodes");
        for line in [
            r#"ocr_operator_pipeline_phase{namespace="team-a",pipeline="invoices",phase="Migrating"} 1"#,
            r#"ocr_operator_pipeline_phase{namespace="team-a",pipeline="invoices",phase="Running"} 0"#,
            r#"ocr_operator_pipeline_phase{namespace="team-a",pipeline="invoices",phase="Degraded"} 0"#,
            r#"ocr_operator_pipeline_migration_seconds{namespace="team-a",pipeline="invoices"} 95"#,
            r#"ocr_operator_pipeline_results_lag{namespace="team-a",pipeline="invoices"} 42"#,
            r#"ocr_operator_pipeline_ready_replicas{namespace="team-a",pipeline="invoices",role="worker"} 1"#,
            r#"ocr_operator_pipeline_desired_replicas{namespace="team-a",pipeline="invoices",role="worker"} 3"#,
            r#"ocr_operator_pipeline_ready_replicas{namespace="team-a",pipeline="invoices",role="writer"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }

        // The migration finishes: the writer is gone, the lag no longer read.
        let mut done = status.clone();
        done.phase = Some(Phase::Running);
        done.migration = None;
        if let Some(replicas) = done.replicas.as_mut() {
            replicas.writer = None;
        }
        metrics.migration_finished(status.migration.as_ref().expect("migration"), &at(700));
        metrics.record_pipeline("team-a", "invoices", &done, None, &at(700));
        let text = metrics.render().expect("encodes");
        assert!(
            text.contains(r#"ocr_operator_pipeline_phase{namespace="team-a",pipeline="invoices",phase="Running"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ocr_operator_pipeline_migration_seconds{namespace="team-a",pipeline="invoices"} 0"#),
            "{text}"
        );
        assert!(
            !text.contains("ocr_operator_pipeline_results_lag{"),
            "{text}"
        );
        assert!(!text.contains(r#"role="writer""#), "{text}");
        assert!(
            text.contains(
                r#"ocr_operator_migration_duration_seconds_count{from="writer",to="standard"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"ocr_operator_migration_duration_seconds_sum{from="writer",to="standard"} 700.0"#
            ),
            "{text}"
        );
    }

    #[test]
    fn a_deleted_pipeline_leaves_no_series_and_others_keep_theirs() {
        let metrics = Metrics::default();
        let status = migrating_writer_to_standard();
        metrics.record_pipeline("team-a", "invoices", &status, Some(1), &at(10));
        metrics.record_pipeline("team-b", "receipts", &status, Some(1), &at(10));
        metrics.forget_pipeline("team-a", "invoices");
        let text = metrics.render().expect("encodes");
        assert!(!text.contains(r#"pipeline="invoices""#), "{text}");
        assert!(
            text.contains(
                r#"ocr_operator_pipeline_results_lag{namespace="team-b",pipeline="receipts"} 1"#
            ),
            "{text}"
        );
    }
}
