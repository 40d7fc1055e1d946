//! Properties of rendered objects that matter beyond "same as last time".

mod support;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use ocr_contract::{AuthConfig, Config, WorkerMode, WriterConfig};
use ocr_operator::build::{
    pipeline_config, render, runtime_config, Capabilities, ManagedKind, Rendered,
};
use ocr_operator::crd::OcrPipeline;
use ocr_operator::migration::{step, Observed};
use ocr_operator::validate::validate;
use serde_json::Value;

fn rendered(p: &OcrPipeline, keda: bool) -> Rendered {
    let now = Time(Timestamp::from_second(1_800_000_000).expect("valid timestamp"));
    let plan = step(None, None, p.spec.architecture, &Observed::default(), &now);
    let valid = validate(p).expect("valid");
    render(&valid, &plan, Capabilities { keda }).expect("renders")
}

fn object<'a>(r: &'a Rendered, kind: ManagedKind, name: &str) -> Option<&'a Value> {
    r.objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .map(|o| &o.body)
}

fn env<'a>(deployment: &'a Value, name: &str) -> Option<&'a Value> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

#[test]
fn workers_get_gpu_limits_and_their_mode() {
    for arch in ["standard", "batched", "writer"] {
        let r = rendered(&support::pipeline(arch), true);
        let worker = object(&r, ManagedKind::Deployment, "demo-worker").expect("worker");
        let container = &worker["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert_eq!(container["args"][0], "worker");
        assert_eq!(
            env(worker, "OCR_WORKER__MODE").expect("mode env")["value"],
            arch
        );
        let api = object(&r, ManagedKind::Deployment, "demo-api").expect("api");
        assert!(
            api["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
                ["nvidia.com/gpu"]
                .is_null(),
            "the API never holds a GPU"
        );
    }
}

#[test]
fn writer_deployment_exists_only_in_writer_architecture() {
    for (arch, expected) in [("standard", false), ("batched", false), ("writer", true)] {
        let r = rendered(&support::pipeline(arch), true);
        let writer = object(&r, ManagedKind::Deployment, "demo-writer");
        assert_eq!(writer.is_some(), expected, "{arch}");
        assert_eq!(
            object(&r, ManagedKind::PodDisruptionBudget, "demo-writer").is_some(),
            expected,
            "{arch}"
        );
        if let Some(writer) = writer {
            assert_eq!(
                writer["spec"]["template"]["spec"]["containers"][0]["args"][0],
                "writer"
            );
            assert_eq!(writer["spec"]["replicas"], 2);
        }
    }
}

#[test]
fn autoscaled_roles_leave_replicas_to_the_autoscaler() {
    let r = rendered(&support::pipeline("standard"), true);
    let api = object(&r, ManagedKind::Deployment, "demo-api").expect("api");
    assert!(api["spec"]["replicas"].is_null());
    let hpa = object(&r, ManagedKind::HorizontalPodAutoscaler, "demo-api").expect("hpa");
    assert_eq!(hpa["spec"]["maxReplicas"], 6);
    let worker = object(&r, ManagedKind::Deployment, "demo-worker").expect("worker");
    assert!(worker["spec"]["replicas"].is_null());
    let scaled = object(&r, ManagedKind::ScaledObject, "demo-worker").expect("scaled object");
    assert_eq!(
        scaled["spec"]["maxReplicaCount"], 6,
        "capped at kafka.partitions, not autoscaling.worker.maxReplicas (20)"
    );
    assert_eq!(
        scaled["spec"]["triggers"][0]["metadata"]["topic"],
        "ocr.demo.jobs"
    );
}

#[test]
fn without_keda_workers_keep_static_replicas_and_a_warning() {
    let r = rendered(&support::pipeline("standard"), false);
    assert!(object(&r, ManagedKind::ScaledObject, "demo-worker").is_none());
    let worker = object(&r, ManagedKind::Deployment, "demo-worker").expect("worker");
    assert_eq!(worker["spec"]["replicas"], 3);
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
}

#[test]
fn every_object_is_labelled_and_owned() {
    let r = rendered(&support::pipeline("writer"), true);
    assert!(r.objects.len() >= 10);
    for o in &r.objects {
        let meta = &o.body["metadata"];
        assert_eq!(
            meta["labels"]["app.kubernetes.io/managed-by"],
            "ocr-operator"
        );
        assert_eq!(meta["labels"]["ocr.serving.dev/pipeline"], "demo");
        assert_eq!(meta["namespace"], "ocr");
        let owner = &meta["ownerReferences"][0];
        assert_eq!(owner["kind"], "OcrPipeline");
        assert_eq!(owner["controller"], true);
        assert!(o.body["apiVersion"].is_string() && o.body["kind"].is_string());
    }
}

/// Variables a Deployment's runtime container gets: plain values as they
/// are, Secret references as a marker naming the Secret and key.
fn container_env(deployment: &Value) -> Vec<(String, String)> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|var| {
            let name = var["name"].as_str().expect("named").to_owned();
            let value = match var["value"].as_str() {
                Some(value) => value.to_owned(),
                None => {
                    let secret = &var["valueFrom"]["secretKeyRef"];
                    format!("from-secret {} {}", secret["name"], secret["key"])
                }
            };
            (name, value)
        })
        .collect()
}

/// The keys a configuration gets from Secrets, cleared: the loaded side holds
/// the markers of [`container_env`], the built side nothing.
fn without_secrets(mut config: Config) -> Config {
    config.database.url = String::new();
    config.redis.url = String::new();
    config.queue.security.sasl_username = String::new();
    config.queue.security.sasl_password = Default::default();
    config.queue.security.ssl_ca_pem = Default::default();
    config.writer.webhook_secret = Default::default();
    config
}

// figment's test jail returns its (large) error type by value.
#[allow(clippy::result_large_err)]
/// What the operator renders (the ConfigMap and each Deployment's
/// environment) is loaded by the runtime's own loader, for every topology
/// and role, and yields exactly the configuration the operator built: no
/// unknown key, no value lost between the two sides.
#[test]
fn every_role_of_every_topology_loads_with_the_runtimes_loader() {
    let mut secured = support::pipeline_json("writer");
    secured["spec"]["kafka"]["security"] = serde_json::json!({
        "tls": {"caSecret": "kafka-ca"},
        "sasl": {"mechanism": "SCRAM-SHA-256", "secret": "kafka-user"},
    });
    secured["spec"]["writer"]["webhook"] =
        serde_json::json!({"url": "https://hooks.example/done", "secret": {"name": "hooks"}});
    secured["spec"]["redis"] = serde_json::json!({"secret": {"name": "redis"}});
    secured["spec"]["api"]["auth"] = serde_json::json!({"keysSecret": "tenants"});
    secured["spec"]["api"]["tls"] = serde_json::json!({"secretName": "api-cert"});
    let secured: OcrPipeline = serde_json::from_value(secured).expect("parses");
    let pipelines = ["standard", "batched", "writer"]
        .map(support::pipeline)
        .into_iter()
        .chain([secured]);
    for p in pipelines {
        let arch = p.spec.architecture;
        let r = rendered(&p, true);
        let config_map = object(&r, ManagedKind::ConfigMap, "demo-config").expect("config");
        let shared = config_map["data"]["ocr.toml"]
            .as_str()
            .expect("ocr.toml")
            .to_owned();
        let built = pipeline_config(&p, arch);
        for role in ["api", "worker", "writer"] {
            let Some(d) = object(&r, ManagedKind::Deployment, &format!("demo-{role}")) else {
                continue;
            };
            let variables = container_env(d);
            let mut expected = built.clone();
            if role != "worker" {
                expected.worker.mode = WorkerMode::default();
            }
            if role != "writer" {
                expected.writer = WriterConfig::default();
            }
            if role != "api" {
                // Keys and TLS are the API's alone (`keys::API_ONLY`).
                expected.auth.mode = AuthConfig::default().mode;
                expected.auth.keys_dir = AuthConfig::default().keys_dir;
                expected.server.tls_cert_file = String::new();
                expected.server.tls_key_file = String::new();
            }
            figment::Jail::expect_with(|jail| {
                jail.create_file("ocr.toml", &shared)?;
                for (name, value) in &variables {
                    jail.set_env(name, value);
                }
                let path = variables
                    .iter()
                    .find(|(name, _)| name == "OCR_CONFIG")
                    .map(|_| std::path::Path::new("ocr.toml"));
                let loaded = Config::load(path).unwrap_or_else(|e| {
                    panic!("{arch} {role}: the runtime refuses what the operator rendered: {e}")
                });
                assert!(
                    loaded.database.url.starts_with("from-secret"),
                    "{arch} {role}: database URL from its Secret"
                );
                loaded
                    .queue
                    .security
                    .validate()
                    .unwrap_or_else(|e| panic!("{arch} {role}: {e}"));
                assert_eq!(
                    without_secrets(loaded),
                    without_secrets(expected.clone()),
                    "{arch} {role}"
                );
                Ok(())
            });
        }
    }
}

#[test]
fn config_changes_roll_pods_through_the_template_hash() {
    let a = rendered(&support::pipeline("standard"), true);
    let mut changed = support::pipeline("standard");
    changed.spec.worker.batching.max_wait_ms = 99;
    let b = rendered(&changed, true);
    let hash = |r: &Rendered| {
        object(r, ManagedKind::Deployment, "demo-worker").expect("worker")["spec"]["template"]
            ["metadata"]["annotations"]["ocr.serving.dev/config-hash"]
            .clone()
    };
    assert_ne!(hash(&a), hash(&b));
}

#[test]
fn the_example_parses_validates_and_renders() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/ocrpipeline.yaml");
    let text = std::fs::read_to_string(path).expect("example exists");
    let mut p: OcrPipeline = serde_yaml::from_str(&text).expect("example parses");
    validate(&p).expect("example is valid");
    p.metadata.uid = Some("00000000-0000-4000-8000-000000000003".into());
    let r = rendered(&p, true);
    let worker = object(&r, ManagedKind::Deployment, "ocr-worker").expect("worker");
    assert_eq!(
        env(worker, "OCR_WORKER__MODE").expect("mode")["value"],
        "batched"
    );
}

#[test]
fn the_rbac_manifest_covers_every_managed_kind() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rbac.yaml");
    let text = std::fs::read_to_string(path).expect("rbac exists");
    for kind in ManagedKind::ALL {
        let plural = kind.api_resource().plural;
        assert!(
            text.contains(&format!("\"{plural}\"")),
            "deploy/rbac.yaml lacks {plural}"
        );
    }
}

#[test]
fn writer_settings_are_env_of_the_writer_only() {
    let mut p = support::pipeline("writer");
    p.spec.writer.retries = 7;
    p.spec.writer.retry_initial_ms = 50;
    p.spec.writer.retry_max_ms = 2_000;
    p.spec.kafka.writer_group = Some("persisters".into());
    p.spec.writer.webhook = None;
    let plain = rendered(&p, true);
    let writer = object(&plain, ManagedKind::Deployment, "demo-writer").expect("writer");
    assert_eq!(
        env(writer, "OCR_WRITER__RETRIES").expect("retries")["value"],
        "7"
    );
    assert_eq!(
        env(writer, "OCR_WRITER__RETRY_INITIAL_MS").expect("initial pause")["value"],
        "50"
    );
    assert_eq!(
        env(writer, "OCR_WRITER__RETRY_MAX_MS").expect("longest pause")["value"],
        "2000"
    );
    assert!(env(writer, "OCR_WRITER__WEBHOOK_URL").is_none());
    let toml = runtime_config(&p).expect("renders");
    let parsed: toml::Table = toml.parse().expect("valid TOML");
    assert_eq!(parsed["queue"]["writer_group"].as_str(), Some("persisters"));
    assert!(
        parsed.get("writer").is_none(),
        "writer keys stay out of the shared file"
    );

    p.spec.writer.webhook = Some(
        serde_json::from_value(serde_json::json!({
            "url": "https://hooks.example.com/done",
            "secret": {"name": "hooks"},
        }))
        .expect("webhook parses"),
    );
    let hooked = rendered(&p, true);
    let writer = object(&hooked, ManagedKind::Deployment, "demo-writer").expect("writer");
    assert_eq!(
        env(writer, "OCR_WRITER__WEBHOOK_URL").expect("url")["value"],
        "https://hooks.example.com/done"
    );
    assert_eq!(
        env(writer, "OCR_WRITER__WEBHOOK_TIMEOUT_MS").expect("timeout")["value"],
        "10000"
    );
    let secret = env(writer, "OCR_WRITER__WEBHOOK_SECRET").expect("secret");
    assert!(
        secret["value"].is_null(),
        "the key never appears in the object"
    );
    assert_eq!(secret["valueFrom"]["secretKeyRef"]["name"], "hooks");
    assert_eq!(secret["valueFrom"]["secretKeyRef"]["key"], "secret");

    for role in ["demo-api", "demo-worker"] {
        let d = object(&hooked, ManagedKind::Deployment, role).expect("deployment");
        let before = object(&plain, ManagedKind::Deployment, role).expect("deployment");
        assert_eq!(d, before, "{role} does not roll for a writer setting");
        assert!(env(d, "OCR_WRITER__RETRIES").is_none());
    }
}

#[test]
fn workers_and_writers_need_different_groups() {
    let mut p = support::pipeline("writer");
    validate(&p).expect("defaults differ");
    p.spec.kafka.writer_group = Some("ocr.demo.worker".into());
    let problem = validate(&p).expect_err("same as the derived group").0;
    assert!(problem.contains("writerGroup"), "{problem}");
    p.spec.kafka.writer_group = None;
    p.spec.kafka.topics.results = Some("ocr.demo.jobs".into());
    let problem = validate(&p).expect_err("same topic").0;
    assert!(problem.contains("three different topics"), "{problem}");
}

fn secured(mut json: Value) -> OcrPipeline {
    json["spec"]["kafka"]["security"] = serde_json::json!({
        "tls": {"caSecret": "kafka-cluster-ca-cert"},
        "sasl": {"mechanism": "SCRAM-SHA-512", "secret": "ocr-kafka-user", "username": "ocr"},
    });
    serde_json::from_value(json).expect("the secured pipeline parses")
}

#[test]
fn kafka_credentials_reach_every_role_from_secrets_and_never_the_configmap() {
    let p = secured(support::pipeline_json("writer"));
    let toml = runtime_config(&p).expect("renders");
    let parsed: toml::Table = toml.parse().expect("valid TOML");
    let security = &parsed["queue"]["security"];
    assert_eq!(security["protocol"].as_str(), Some("sasl_ssl"));
    assert_eq!(security["sasl_mechanism"].as_str(), Some("SCRAM-SHA-512"));
    assert_eq!(security.as_table().map(|t| t.len()), Some(2), "{toml}");

    let r = rendered(&p, true);
    for role in ["api", "worker", "writer"] {
        let deployment =
            object(&r, ManagedKind::Deployment, &format!("demo-{role}")).expect("deployment");
        let username = env(deployment, "OCR_QUEUE__SECURITY__SASL_USERNAME").expect("username");
        assert_eq!(username["value"], "ocr", "{role}");
        let password = env(deployment, "OCR_QUEUE__SECURITY__SASL_PASSWORD").expect("password");
        assert_eq!(
            password["valueFrom"]["secretKeyRef"],
            serde_json::json!({"name": "ocr-kafka-user", "key": "password", "optional": false}),
            "{role}"
        );
        let ca = env(deployment, "OCR_QUEUE__SECURITY__SSL_CA_PEM").expect("CA");
        assert_eq!(
            ca["valueFrom"]["secretKeyRef"]["name"],
            "kafka-cluster-ca-cert"
        );
        assert_eq!(ca["valueFrom"]["secretKeyRef"]["key"], "ca.crt");
    }

    // KEDA's scaler connects on its own and gets the same credentials.
    let scaled = object(&r, ManagedKind::ScaledObject, "demo-worker").expect("ScaledObject");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["metadata"]["sasl"], "scram_sha512");
    assert_eq!(trigger["metadata"]["tls"], "enable");
    assert_eq!(trigger["authenticationRef"]["name"], "demo-worker");
    let auth = object(&r, ManagedKind::TriggerAuthentication, "demo-worker")
        .expect("TriggerAuthentication");
    let secret_refs = auth["spec"]["secretTargetRef"]
        .as_array()
        .expect("secret refs");
    let parameters: Vec<&str> = secret_refs
        .iter()
        .map(|s| s["parameter"].as_str().expect("parameter"))
        .collect();
    assert_eq!(parameters, ["password", "ca"]);
    assert_eq!(auth["spec"]["env"][0]["parameter"], "username");
    assert_eq!(auth["spec"]["env"][0]["containerName"], "worker");

    // A plaintext cluster renders none of it.
    let plain = rendered(&support::pipeline("writer"), true);
    assert!(object(&plain, ManagedKind::TriggerAuthentication, "demo-worker").is_none());
    let worker = object(&plain, ManagedKind::Deployment, "demo-worker").expect("worker");
    assert!(env(worker, "OCR_QUEUE__SECURITY__SASL_PASSWORD").is_none());
    let parsed: toml::Table = runtime_config(&support::pipeline("writer"))
        .expect("renders")
        .parse()
        .expect("valid TOML");
    let security = parsed["queue"]["security"].as_table().expect("stated");
    assert_eq!(security["protocol"].as_str(), Some("plaintext"));
    assert!(
        !security.contains_key("sasl_username") && !security.contains_key("sasl_password"),
        "{security:?}"
    );
}

#[test]
fn every_role_shares_one_blob_store() {
    // S3: the URL in the ConfigMap, endpoint and credentials in every role's env.
    let p = support::pipeline("writer");
    let parsed: toml::Table = runtime_config(&p)
        .expect("renders")
        .parse()
        .expect("valid TOML");
    assert_eq!(parsed["blob"]["url"].as_str(), Some("s3://ocr-blobs/demo"));
    let r = rendered(&p, true);
    for role in ["api", "worker", "writer"] {
        let d = object(&r, ManagedKind::Deployment, &format!("demo-{role}")).expect("deployment");
        assert_eq!(
            env(d, "AWS_ENDPOINT").expect("endpoint")["value"],
            "http://minio.storage:9000"
        );
        assert_eq!(
            env(d, "AWS_ALLOW_HTTP").expect("plain http")["value"],
            "true"
        );
        assert_eq!(env(d, "AWS_REGION").expect("region")["value"], "us-east-1");
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            let var = env(d, key).expect("credential");
            assert_eq!(var["valueFrom"]["secretKeyRef"]["name"], "ocr-s3", "{role}");
            assert_eq!(var["valueFrom"]["secretKeyRef"]["key"], key, "{role}");
        }
    }

    // Volume: one claim mounted read-write at the file:// path of the ConfigMap.
    let mut json = support::pipeline_json("writer");
    json["spec"]["blob"] = serde_json::json!({"volume": {"claimName": "ocr-blobs"}});
    let p: OcrPipeline = serde_json::from_value(json).expect("parses");
    let parsed: toml::Table = runtime_config(&p)
        .expect("renders")
        .parse()
        .expect("valid TOML");
    assert_eq!(
        parsed["blob"]["url"].as_str(),
        Some("file:///var/lib/ocr/blobs")
    );
    let r = rendered(&p, true);
    for role in ["api", "worker", "writer"] {
        let d = object(&r, ManagedKind::Deployment, &format!("demo-{role}")).expect("deployment");
        let pod = &d["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "blobs"))
            .expect("blobs volume");
        assert_eq!(volume["persistentVolumeClaim"]["claimName"], "ocr-blobs");
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "blobs"))
            .expect("blobs mount");
        assert_eq!(mount["mountPath"], "/var/lib/ocr/blobs");
        assert!(mount["readOnly"].is_null(), "{role} must write to it");
        // The non-root runtime user can write to the claim.
        assert_eq!(pod["securityContext"]["fsGroup"], 65532);
        assert!(env(d, "AWS_ENDPOINT").is_none());
    }
}

#[test]
fn detector_sizing_reaches_the_runtime_and_defaults_to_the_runtimes() {
    let mut json = support::pipeline_json("batched");
    let parsed: toml::Table =
        runtime_config(&serde_json::from_value(json.clone()).expect("parses"))
            .expect("renders")
            .parse()
            .expect("valid TOML");
    // Unset: the runtime's own default, written out so the ConfigMap shows what runs.
    let runtime = ocr_contract::ModelConfig::default();
    assert_eq!(parsed["model"]["det_limit_type"].as_str(), Some("min"));
    assert_eq!(
        parsed["model"]["det_limit_side_len"].as_integer(),
        Some(i64::from(runtime.det_limit_side_len))
    );
    json["spec"]["model"]["detection"] =
        serde_json::json!({"limitType": "Max", "limitSideLen": 960});
    let p: OcrPipeline = serde_json::from_value(json).expect("parses");
    let parsed: toml::Table = runtime_config(&p)
        .expect("renders")
        .parse()
        .expect("valid TOML");
    assert_eq!(parsed["model"]["det_limit_type"].as_str(), Some("max"));
    assert_eq!(
        parsed["model"]["det_limit_side_len"].as_integer(),
        Some(960)
    );
}

#[test]
fn gpu_workers_get_the_cuda_image_unless_one_is_named() {
    let r = rendered(&support::pipeline("writer"), true);
    let image = |r: &Rendered, role: &str| {
        object(r, ManagedKind::Deployment, &format!("demo-{role}")).expect("deployment")["spec"]
            ["template"]["spec"]["containers"][0]["image"]
            .clone()
    };
    assert_eq!(
        image(&r, "worker"),
        "ghcr.io/ocr-serving/ocr-runtime:0.1.0-cuda"
    );
    assert_eq!(image(&r, "api"), "ghcr.io/ocr-serving/ocr-runtime:0.1.0");
    assert_eq!(image(&r, "writer"), "ghcr.io/ocr-serving/ocr-runtime:0.1.0");

    let mut json = support::pipeline_json("writer");
    json["spec"]["model"]["device"] = serde_json::json!("cpu");
    let cpu: OcrPipeline = serde_json::from_value(json.clone()).expect("parses");
    assert_eq!(
        image(&rendered(&cpu, true), "worker"),
        "ghcr.io/ocr-serving/ocr-runtime:0.1.0"
    );
    json["spec"]["images"] = serde_json::json!({"runtime": "registry.local/ocr:dev"});
    let named: OcrPipeline = serde_json::from_value(json).expect("parses");
    for role in ["api", "worker", "writer"] {
        assert_eq!(
            image(&rendered(&named, true), role),
            "registry.local/ocr:dev"
        );
    }
}

#[test]
fn precision_and_batches_in_flight_follow_the_device_unless_set() {
    let mut p = support::pipeline("batched");
    p.spec.model.device = ocr_operator::crd::Device::Cpu;
    let parsed: toml::Table = runtime_config(&p).expect("renders").parse().expect("TOML");
    assert_eq!(parsed["model"]["precision"].as_str(), Some("f32"));
    assert_eq!(parsed["worker"]["batches_in_flight"].as_integer(), Some(1));

    p.spec.model.precision = Some(ocr_operator::crd::Precision::Bf16);
    let problem = validate(&p).expect_err("bf16 on a CPU").0;
    assert!(problem.contains("bf16 needs device cuda"), "{problem}");

    p.spec.model.device = ocr_operator::crd::Device::Cuda;
    p.spec.worker.batching.in_flight = Some(3);
    validate(&p).expect("bf16 on a GPU is fine");
    let parsed: toml::Table = runtime_config(&p).expect("renders").parse().expect("TOML");
    assert_eq!(parsed["model"]["precision"].as_str(), Some("bf16"));
    assert_eq!(parsed["worker"]["batches_in_flight"].as_integer(), Some(3));
}

/// The Secrets the operator checks before the pods would get stuck on them
/// are exactly those the rendered pods read: the writer's webhook key only
/// where a writer runs, Kafka's credentials never (the Kafka client setup
/// reports those).
#[test]
fn required_secrets_are_the_ones_the_rendered_pods_read() {
    use ocr_operator::controller::required_secrets;
    let keys = |names: &[&str]| -> std::collections::BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    };
    let standard = support::pipeline("standard");
    let needed = required_secrets(&standard, &rendered(&standard, true));
    assert_eq!(
        needed.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ocr-mysql", "ocr-redis", "ocr-s3"]
    );
    assert_eq!(needed["ocr-mysql"], keys(&["url"]));
    assert_eq!(needed["ocr-redis"], keys(&["redis-url"]));
    assert_eq!(
        needed["ocr-s3"],
        keys(&["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
    );

    let mut writer = support::pipeline_json("writer");
    writer["spec"]["kafka"]["security"] = serde_json::json!({
        "sasl": {"secret": "kafka-user"},
        "tls": {"caSecret": "kafka-ca"},
    });
    let writer: OcrPipeline = serde_json::from_value(writer).expect("parses");
    let needed = required_secrets(&writer, &rendered(&writer, true));
    assert_eq!(needed["ocr-webhook"], keys(&["secret"]));
    assert!(
        !needed.contains_key("kafka-user") && !needed.contains_key("kafka-ca"),
        "{needed:?}"
    );
}
