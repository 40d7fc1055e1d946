//! The chart's Grafana dashboard and alert rules use only metrics that exist:
//! here the operator's own (`ocr_operator_*`); the runtime's are checked
//! against a real worker's page in `runtime/tests/signals.rs`.

use std::path::Path;

use ocr_contract::signals::{families, mentioned_metrics};
use ocr_operator::metrics::Metrics;

#[test]
fn the_dashboard_and_the_rules_use_only_exported_operator_metrics() {
    let exported = families(&Metrics::default().render().expect("renders"));
    assert!(
        exported.contains("ocr_operator_pipeline_phase"),
        "{exported:?}"
    );
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/ocr-operator");
    let mut used = 0;
    for file in [
        "dashboards/ocr-pipelines.json",
        "templates/prometheusrule.yaml",
    ] {
        let text = std::fs::read_to_string(chart.join(file)).expect("a chart file");
        let mentioned: Vec<String> = mentioned_metrics(&text)
            .into_iter()
            .filter(|m| m.starts_with("ocr_operator_"))
            .collect();
        used += mentioned.len();
        let missing: Vec<&String> = mentioned
            .iter()
            .filter(|m| !exported.contains(*m))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} uses operator metrics it does not export: {missing:?}"
        );
    }
    assert!(
        used >= 4,
        "the dashboard and rules watch the pipelines' state"
    );
}

#[test]
fn the_dashboard_is_grafana_json_with_a_query_per_panel() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/ocr-operator/dashboards/ocr-pipelines.json");
    let text = std::fs::read_to_string(path).expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(
            !targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()),
            "{panel}"
        );
    }
}
