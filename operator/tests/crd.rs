//! The checked-in CRD must match the Rust types, and what `kubectl explain`
//! and `kubectl get` show from it must be useful.

use std::path::PathBuf;

use kube::CustomResourceExt;
use ocr_operator::crd::{crd_yaml, OcrPipeline};
use serde_json::Value;

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

/// The `openAPIV3Schema` of the only version, as JSON.
fn schema() -> Value {
    let crd = OcrPipeline::crd();
    let version = &crd.spec.versions[0];
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has a schema");
    serde_json::to_value(schema).expect("schema serialises")
}

/// Every property below `node` (through `properties`, `items` and
/// `additionalProperties`) whose `description` is missing or empty, as a
/// `kubectl explain` path; `[]` marks list items, `{}` map values.
fn undescribed(node: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(properties) = node.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            let here = format!("{path}.{name}");
            let described = property
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| !d.trim().is_empty());
            if !described {
                out.push(here.clone());
            }
            undescribed(property, &here, out);
        }
    }
    if let Some(items) = node.get("items") {
        undescribed(items, &format!("{path}[]"), out);
    }
    if let Some(values) = node.get("additionalProperties") {
        undescribed(values, &format!("{path}{{}}"), out);
    }
}

#[test]
fn every_field_of_spec_and_status_is_described() {
    let schema = schema();
    for root in ["spec", "status"] {
        assert!(
            schema["properties"][root].is_object(),
            "the schema has no {root}"
        );
    }
    let mut missing = Vec::new();
    undescribed(&schema, "", &mut missing);
    assert!(
        missing.is_empty(),
        "`kubectl explain ocrpipeline` shows <no description> for {} field(s); add doc comments:\n{}",
        missing.len(),
        missing.join("\n")
    );
}

/// A field's own doc comment wins over its type's: `spec.api` says what the
/// API role is, not what `ApiSpec` (shared by nothing else) says of itself,
/// and `status.architecture` is not described as a generic architecture.
#[test]
fn field_docs_survive_the_docs_of_their_types() {
    let schema = schema();
    let description = |pointer: &str| {
        schema
            .pointer(pointer)
            .and_then(|p| p["description"].as_str())
            .unwrap_or_else(|| panic!("no description at {pointer}"))
            .to_string()
    };
    let running = description("/properties/status/properties/architecture");
    assert!(running.contains("fully rolled out"), "{running}");
    let phase = description("/properties/status/properties/phase");
    assert!(phase.contains("rolling out"), "{phase}");
    let from = description("/properties/status/properties/migration/properties/from");
    assert!(from.contains("being left"), "{from}");
    let secret = description("/properties/spec/properties/database/properties/secret");
    assert!(secret.contains("MySQL URL"), "{secret}");
    let redis = description("/properties/spec/properties/redis/properties/secret");
    assert!(redis.contains("Redis URL"), "{redis}");
}

/// Whether `json_path` (`.spec.a.b`) names a property of the schema.
fn resolves(schema: &Value, json_path: &str) -> bool {
    let mut node = schema;
    for segment in json_path.trim_start_matches('.').split('.') {
        match node.get("properties").and_then(|p| p.get(segment)) {
            Some(next) => node = next,
            None => return false,
        }
    }
    true
}

#[test]
fn kubectl_get_shows_desired_running_advice_migration_and_ready_roles() {
    let crd = OcrPipeline::crd();
    assert_eq!(crd.spec.group, "ocr.serving.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, "v1alpha1");
    let columns: Vec<(&str, &str, i32)> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| {
            (
                c.name.as_str(),
                c.json_path.as_str(),
                c.priority.unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        columns,
        [
            ("Desired", ".spec.architecture", 0),
            ("Running", ".status.architecture", 0),
            ("Advice", ".status.advice.architecture", 0),
            ("Migration", ".status.migration.phase", 0),
            ("Phase", ".status.phase", 0),
            ("Ready", ".status.readyRoles", 0),
            ("URL", ".status.url", 1),
            ("Age", ".metadata.creationTimestamp", 0),
        ]
    );
    let schema = schema();
    for (name, path, _) in &columns {
        if path.starts_with(".spec") || path.starts_with(".status") {
            assert!(
                resolves(&schema, path),
                "column {name}: {path} is not a field of the schema"
            );
        }
    }
    assert!(version
        .subresources
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .is_some());
}

#[test]
fn crd_has_validation_rules_and_enums() {
    let schema = serde_json::to_string(&schema()).expect("schema serialises");
    for needle in [
        "has(self.volume) != has(self.url)",
        "self.maxReplicas >= self.minReplicas",
        "\"enum\":[\"standard\",\"batched\",\"writer\"]",
        "\"enum\":[\"v6-small\",\"v6-tiny\",\"v5-mobile\"]",
    ] {
        assert!(schema.contains(needle), "schema lacks {needle}");
    }
}

/// Conditions are a map keyed by `type`: server-side apply merges them per
/// type, and the API server refuses two conditions of one type.
#[test]
fn status_conditions_are_a_map_list_keyed_by_type() {
    let schema = schema();
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map", "{conditions}");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"]),
        "{conditions}"
    );
    let required = conditions["items"]["required"]
        .as_array()
        .expect("condition items list their required fields");
    assert!(
        required.contains(&Value::from("type")),
        "a map key must be required: {required:?}"
    );
}

/// Every string an `enum` or a `default` of the schema holds, with its path.
fn enum_and_default_strings(node: &Value, path: &str, out: &mut Vec<(String, String)>) {
    match node {
        Value::Object(map) => {
            for (key, value) in map {
                let here = format!("{path}.{key}");
                if key == "enum" || key == "default" {
                    let mut strings = Vec::new();
                    collect_strings(value, &mut strings);
                    out.extend(strings.into_iter().map(|s| (here.clone(), s)));
                }
                enum_and_default_strings(value, &here, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                enum_and_default_strings(item, path, out);
            }
        }
        _ => {}
    }
}

fn collect_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// A value a user types unquoted in a manifest must stay a string: YAML 1.1
/// parsers (kubectl's among them) read `Off`, `on`, `yes`, `n` and the like
/// as booleans, and the API server then refuses the object (or, in the
/// CRD's own defaults, the CRD).
#[test]
fn no_enum_value_or_default_reads_as_a_yaml_boolean() {
    const YAML11_BOOLEANS: [&str; 8] = ["y", "n", "yes", "no", "on", "off", "true", "false"];
    let mut strings = Vec::new();
    enum_and_default_strings(&schema(), "", &mut strings);
    assert!(!strings.is_empty(), "the schema has enums and defaults");
    let ambiguous: Vec<_> = strings
        .iter()
        .filter(|(_, s)| YAML11_BOOLEANS.contains(&s.to_ascii_lowercase().as_str()))
        .collect();
    assert!(ambiguous.is_empty(), "YAML 1.1 booleans: {ambiguous:?}");
}
