//! Rendered objects for each topology, compared with `tests/snapshots/*.yaml`.
//! `UPDATE_SNAPSHOTS=1 cargo test -p ocr-operator --test snapshots` rewrites them.

mod support;

use std::path::PathBuf;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use ocr_operator::build::{render, Capabilities};
use ocr_operator::crd::{Architecture, Migration, MigrationPhase, OcrPipeline};
use ocr_operator::migration::{step, Observed};
use ocr_operator::validate::validate;
use serde_json::json;

fn snapshot(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.yaml"));
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("snapshot written");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        let first_difference = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} is stale (first difference at line {}); rerun with UPDATE_SNAPSHOTS=1 and review the diff\n--- actual ---\n{actual}",
            path.display(),
            first_difference + 1
        );
    }
}

fn time() -> Time {
    Time(Timestamp::from_second(1_800_000_000).expect("valid timestamp"))
}

fn steady(p: &OcrPipeline, keda: bool) -> String {
    let plan = step(
        None,
        None,
        p.spec.architecture,
        &Observed::default(),
        &time(),
    );
    let valid = validate(p).expect("valid");
    render(&valid, &plan, Capabilities { keda })
        .expect("renders")
        .to_yaml()
        .expect("yaml")
}

#[test]
fn standard_topology() {
    snapshot("standard", &steady(&support::pipeline("standard"), true));
}

#[test]
fn batched_topology() {
    snapshot("batched", &steady(&support::pipeline("batched"), true));
}

#[test]
fn writer_topology() {
    snapshot("writer", &steady(&support::pipeline("writer"), true));
}

/// The smallest spec: CPU, model on a volume, no autoscaling, no Redis, no KEDA.
#[test]
fn minimal_topology() {
    let p: OcrPipeline = serde_json::from_value(json!({
        "apiVersion": "ocr.serving.dev/v1alpha1",
        "kind": "OcrPipeline",
        "metadata": {"name": "mini", "namespace": "default", "uid": "00000000-0000-4000-8000-000000000002"},
        "spec": {
            "model": {"source": {"volume": {"claimName": "ocr-models", "subPath": "pp-ocr"}}},
            "kafka": {"bootstrapServers": "kafka:9092"},
            "database": {"secret": {"name": "ocr-mysql"}},
            "blob": {"volume": {"claimName": "ocr-blobs"}},
            "availability": {"antiAffinity": "Required", "disruptionBudget": {"minAvailable": "50%"}},
        },
    }))
    .expect("minimal spec parses");
    snapshot("minimal", &steady(&p, false));
}

/// standard → writer, writer being started: workers still write to the database.
#[test]
fn starting_writer_during_migration() {
    let p = support::pipeline("writer");
    let migration = Migration {
        from: Architecture::Standard,
        to: Architecture::Writer,
        phase: MigrationPhase::StartingWriter,
        started_at: time(),
        phase_started_at: Some(time()),
    };
    let observed = Observed {
        worker_mode: Some(Architecture::Standard),
        workers_rolled_out: true,
        writer_present: true,
        results_topic_ready: true,
        ..Observed::default()
    };
    let plan = step(
        Some(Architecture::Standard),
        Some(&migration),
        Architecture::Writer,
        &observed,
        &time(),
    );
    let valid = validate(&p).expect("valid");
    let yaml = render(&valid, &plan, Capabilities { keda: true })
        .expect("renders")
        .to_yaml()
        .expect("yaml");
    snapshot("migrating-starting-writer", &yaml);
}
