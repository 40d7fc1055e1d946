//! Autoscalers: the API's HorizontalPodAutoscaler (CPU) and the workers'
//! KEDA ScaledObject (jobs-topic lag) with its TriggerAuthentication.

use super::*;

pub(super) fn api_hpa_object(
    ctx: &Ctx,
    scaling: &crate::crd::CpuScaling,
) -> HorizontalPodAutoscaler {
    HorizontalPodAutoscaler {
        metadata: ctx.meta("api", "api"),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: object_name(&ctx.name, "api"),
            },
            min_replicas: Some(scaling.min_replicas),
            max_replicas: scaling.max_replicas,
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(scaling.target_cpu_utilization),
                        ..MetricTarget::default()
                    },
                }),
                ..MetricSpec::default()
            }]),
            ..HorizontalPodAutoscalerSpec::default()
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

/// KEDA's Kafka scaler reads the brokers itself, so a secured cluster needs
/// the same credentials handed to it; `None` for a plaintext cluster or TLS
/// with the system CAs.
pub(super) fn worker_trigger_authentication(ctx: &Ctx) -> Option<Value> {
    let security = &ctx.p.spec.kafka.security;
    let mut secret_refs = Vec::new();
    let mut env_refs = Vec::new();
    if let Some(sasl) = &security.sasl {
        match &sasl.username {
            // Not in a Secret: KEDA reads it from the worker container's env.
            Some(_) => env_refs.push(json!({
                "parameter": "username",
                "name": env_name(keys::SASL_USERNAME),
                "containerName": Role::Worker.as_str(),
            })),
            None => secret_refs.push(json!({
                "parameter": "username", "name": sasl.secret, "key": sasl.username_key,
            })),
        }
        secret_refs.push(json!({
            "parameter": "password", "name": sasl.secret, "key": sasl.password_key,
        }));
    }
    if let Some(tls) = &security.tls {
        if let Some(ca_secret) = &tls.ca_secret {
            secret_refs.push(json!({"parameter": "ca", "name": ca_secret, "key": tls.ca_key}));
        }
    }
    if secret_refs.is_empty() && env_refs.is_empty() {
        return None;
    }
    let mut spec = serde_json::Map::new();
    if !secret_refs.is_empty() {
        spec.insert("secretTargetRef".into(), Value::Array(secret_refs));
    }
    if !env_refs.is_empty() {
        spec.insert("env".into(), Value::Array(env_refs));
    }
    Some(json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": ctx.meta("worker", "worker"),
        "spec": spec,
    }))
}

/// The name KEDA's Kafka scaler gives a SASL mechanism.
fn keda_sasl_name(mechanism: ocr_contract::SaslMechanism) -> &'static str {
    match mechanism {
        ocr_contract::SaslMechanism::Plain => "plaintext",
        ocr_contract::SaslMechanism::ScramSha256 => "scram_sha256",
        ocr_contract::SaslMechanism::ScramSha512 => "scram_sha512",
    }
}

pub(super) fn worker_scaled_object(
    ctx: &Ctx,
    scaling: &crate::crd::LagScaling,
    authenticated: bool,
) -> Value {
    let spec = &ctx.p.spec;
    let meta = ctx.meta("worker", "worker");
    // A consumer beyond the partition count gets no partition and sits idle.
    let max = scaling.max_replicas.min(spec.kafka.partitions);
    let security = &spec.kafka.security;
    let queues = ctx.p.queues();
    let mut trigger_metadata = json!({
        "bootstrapServers": spec.kafka.bootstrap_servers,
        "consumerGroup": queues.consumer_group,
        "topic": queues.jobs_topic,
        "lagThreshold": scaling.lag_threshold.to_string(),
    });
    if let Some(sasl) = &security.sasl {
        trigger_metadata["sasl"] = json!(keda_sasl_name(sasl.mechanism));
    }
    if security.tls.is_some() {
        trigger_metadata["tls"] = json!("enable");
    }
    let mut trigger = json!({"type": "kafka", "metadata": trigger_metadata});
    if authenticated {
        trigger["authenticationRef"] = json!({"name": object_name(&ctx.name, "worker")});
    }
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": meta,
        "spec": {
            "scaleTargetRef": {"name": object_name(&ctx.name, "worker")},
            "minReplicaCount": scaling.min_replicas.min(max),
            "maxReplicaCount": max,
            "triggers": [trigger],
        },
    })
}
