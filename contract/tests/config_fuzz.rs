//! Fuzzing the configuration loader with hostile files: every real key (taken from the
//! defaults, so new keys are covered as they are added) set to values of every TOML type,
//! unknown keys, and arbitrary text. Loading never panics; whatever loads renders back to TOML
//! and loads again as the same configuration, which is what the operator relies on when it
//! renders a pipeline's file for the runtime.

use ocr_contract::Config;
use proptest::prelude::*;
use std::io::Write;

/// Every leaf key of the configuration, dotted (`queue.security.protocol`).
fn keys() -> Vec<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (name, value) in table {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            match value {
                toml::Value::Table(inner) => walk(&key, inner, out),
                _ => out.push(key),
            }
        }
    }
    let defaults = toml::Table::try_from(Config::default()).expect("the defaults serialise");
    let mut out = Vec::new();
    walk("", &defaults, &mut out);
    out.push("no_such_section.key".into());
    out.push("limits.no_such_key".into());
    out
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<f64>()
            .prop_filter("TOML floats are finite here", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        ".{0,24}".prop_map(|s| format!("{s:?}")),
        prop::sample::select(vec![
            "\"standard\"",
            "\"batched\"",
            "\"writer\"",
            "\"kafka\"",
            "\"memory\"",
            "\"sasl_ssl\"",
            "\"SCRAM-SHA-256\"",
            "\"v6-tiny\"",
            "\"f16\"",
            "\"max\"",
            "\"\"",
            "[]",
            "[1, \"a\"]",
            "{}",
            "{ a = 1 }",
            "1979-05-27T07:32:00Z",
        ])
        .prop_map(str::to_owned),
    ]
}

fn document() -> impl Strategy<Value = String> {
    let line = (prop::sample::select(keys()), value()).prop_map(|(k, v)| format!("{k} = {v}"));
    prop_oneof![
        4 => prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n")),
        1 => ".{0,200}",
    ]
}

fn load(text: &str) -> Result<Config, ocr_contract::config::ConfigError> {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(text.as_bytes()).expect("writing the file");
    Config::load(Some(file.path()))
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn hostile_files_load_or_fail_cleanly_and_what_loads_round_trips(text in document()) {
        if let Ok(config) = load(&text) {
            let rendered = toml::to_string(&config).expect("a loaded configuration renders");
            let reloaded = load(&rendered).expect("a rendered configuration loads");
            prop_assert_eq!(reloaded, config);
        }
    }
}
