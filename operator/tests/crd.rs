//! The checked-in CRD must match the Rust types.

use std::path::PathBuf;

use kube::CustomResourceExt;
use ocr_operator::crd::{crd_yaml, OcrPipeline};

#[test]
fn checked_in_crd_is_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds/ocrpipeline.yaml");
    let generated = crd_yaml().expect("CRD renders");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).expect("CRD written");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "crds/ocrpipeline.yaml is stale: run `cargo run -p ocr-operator -- crdgen` from the repository root"
    );
}

#[test]
fn crd_has_columns_status_and_validation() {
    let crd = OcrPipeline::crd();
    assert_eq!(crd.spec.group, "ocr.serving.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Architecture", "Phase", "Ready", "Age"]);
    assert!(version
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
    let schema = serde_json::to_string(&version.schema).expect("schema serialises");
    for needle in [
        "has(self.volume) != has(self.url)",
        "self.maxReplicas >= self.minReplicas",
        "\"enum\":[\"standard\",\"batched\",\"writer\"]",
        "\"enum\":[\"v6-small\",\"v6-tiny\",\"v5-mobile\"]",
    ] {
        assert!(schema.contains(needle), "schema lacks {needle}");
    }
}
