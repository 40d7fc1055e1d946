//! The runtime configuration every pod reads: the shared `ocr.toml` ConfigMap
//! built from the contract's typed [`Config`], and the environment variables
//! that carry what differs per Deployment or comes from Secrets.

use super::*;

/// The runtime configuration of the pipeline's pods, typed: the contract the
/// runtime loads. `worker_mode` is what the workers are to run.
pub fn pipeline_config(p: &OcrPipeline, worker_mode: Architecture) -> Config {
    let s = &p.spec;
    let queues = p.queues();
    let mut config = Config::default();
    config.server.http_addr = format!("0.0.0.0:{}", s.observability.metrics_port);
    config.server.grpc_addr = format!("0.0.0.0:{GRPC_PORT}");
    config.blob.url = match &s.blob.s3 {
        Some(s3) => s3.url(),
        None => format!("file://{BLOB_DIR}"),
    };
    let queue = &mut config.queue;
    queue.kind = QueueKind::Kafka;
    queue.brokers = s.kafka.bootstrap_servers.clone();
    queue.jobs_topic = queues.jobs_topic;
    queue.results_topic = queues.results_topic;
    queue.dead_letter_topic = queues.dead_letter_topic;
    queue.consumer_group = queues.consumer_group;
    queue.writer_group = queues.writer_group;
    queue.security.protocol = s.kafka.security.protocol();
    if let Some(sasl) = &s.kafka.security.sasl {
        queue.security.sasl_mechanism = sasl.mechanism;
    }
    let worker = &mut config.worker;
    worker.mode = worker_mode;
    worker.max_attempts = count(s.worker.max_attempts);
    worker.max_batch_size = count(s.worker.batching.max_batch_size);
    worker.max_wait_ms = count(s.worker.batching.max_wait_ms);
    worker.batches_in_flight = match s.worker.batching.in_flight {
        Some(in_flight) => count(in_flight),
        None => match s.model.device {
            Device::Cuda => 2,
            Device::Cpu => 1,
        },
    };
    // The pod's /tmp emptyDir outlives a crashed container.
    worker.crash_journal_dir = format!("{TMP_DIR}/ocr-crash-journal");
    let writer = &mut config.writer;
    writer.retries = count(s.writer.retries);
    writer.retry_initial_ms = count(s.writer.retry_initial_ms);
    writer.retry_max_ms = count(s.writer.retry_max_ms);
    if let Some(webhook) = &s.writer.webhook {
        writer.webhook_url = webhook.url.clone();
        writer.webhook_timeout_ms = count(webhook.timeout_ms);
    }
    let model = &mut config.model;
    model.dir = MODEL_DIR.into();
    model.variant = s.model.variant;
    model.device = match s.model.device {
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
    }
    .into();
    if let Some(detection) = &s.model.detection {
        model.det_limit_type = detection.limit_type.into();
        model.det_limit_side_len = count(detection.limit_side_len);
    }
    model.precision = s.model.effective_precision();
    if let Some(redis) = &s.redis {
        config.redis.requests_per_minute = count(redis.requests_per_minute);
    }
    config.auth.mode = match s.api.auth.mode {
        ApiAuthMode::Required => AuthMode::Required,
        ApiAuthMode::Disabled => AuthMode::Disabled,
    };
    if s.api.auth.keys_secret.is_some() {
        config.auth.keys_dir = API_KEYS_DIR.into();
    }
    if s.api.tls.is_some() {
        config.server.tls_cert_file = format!("{TLS_DIR}/tls.crt");
        config.server.tls_key_file = format!("{TLS_DIR}/tls.key");
    }
    config
}

/// A count from the CRD (whose schema keeps it non-negative) as the runtime's type.
pub(super) fn count<T: TryFrom<i32> + Default>(value: i32) -> T {
    T::try_from(value).unwrap_or_default()
}

/// The runtime's `ocr.toml` that every pod of the pipeline shares; what
/// differs per Deployment or comes from Secrets is left to the environment.
pub fn runtime_config(p: &OcrPipeline) -> Result<String, RenderError> {
    pipeline_config(p, Architecture::default()).to_shared_toml()
}

/// `(name, value)` variables for the keys the contract sets per Deployment;
/// empty values are left to the runtime's default.
pub(super) fn per_deployment_env(
    config: &Config,
    keys: &[&str],
) -> Result<Vec<EnvVar>, RenderError> {
    Ok(config
        .env_vars(keys)?
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| env(&name, value))
        .collect())
}

pub(super) fn config_map(ctx: &Ctx, toml: String) -> ConfigMap {
    ConfigMap {
        metadata: ctx.meta("config", "config"),
        data: Some(BTreeMap::from([("ocr.toml".to_string(), toml)])),
        ..ConfigMap::default()
    }
}

pub(super) fn secret_env(name: &str, secret_name: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret_name.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// Kafka credentials and CA for every role (all of them produce or consume),
/// straight from the user's Secrets so they never land in the ConfigMap.
pub(super) fn kafka_env(ctx: &Ctx) -> Vec<EnvVar> {
    let security = &ctx.p.spec.kafka.security;
    let mut out = Vec::new();
    if let Some(sasl) = &security.sasl {
        out.push(match &sasl.username {
            Some(username) => env(&env_name(keys::SASL_USERNAME), username.clone()),
            None => secret_env(
                &env_name(keys::SASL_USERNAME),
                &sasl.secret,
                &sasl.username_key,
            ),
        });
        out.push(secret_env(
            &env_name(keys::SASL_PASSWORD),
            &sasl.secret,
            &sasl.password_key,
        ));
    }
    if let Some(ca_secret) = security.tls.as_ref().and_then(|tls| {
        tls.ca_secret
            .as_ref()
            .map(|name| (name.as_str(), tls.ca_key.as_str()))
    }) {
        out.push(secret_env(
            &env_name(keys::SSL_CA_PEM),
            ca_secret.0,
            ca_secret.1,
        ));
    }
    out
}

/// The S3 client settings every role needs (the API writes inputs, workers
/// read them, writers store results), in the standard `AWS_*` variables the
/// runtime's S3 client reads.
pub(super) fn blob_env(ctx: &Ctx) -> Vec<EnvVar> {
    let Some(s3) = &ctx.p.spec.blob.s3 else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(endpoint) = &s3.endpoint {
        out.push(env("AWS_ENDPOINT", endpoint.clone()));
        if endpoint.starts_with("http://") {
            out.push(env("AWS_ALLOW_HTTP", "true"));
        }
    }
    if let Some(region) = &s3.region {
        out.push(env("AWS_REGION", region.clone()));
    }
    if let Some(secret) = &s3.credentials_secret {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            out.push(secret_env(key, secret, key));
        }
    }
    out
}

/// The webhook's HMAC key, on the writer Deployment only (the other
/// `writer.*` keys are in [`per_deployment_env`]).
pub(super) fn webhook_secret_env(ctx: &Ctx) -> Option<EnvVar> {
    let webhook = ctx.p.spec.writer.webhook.as_ref()?;
    let secret = webhook.secret.as_ref()?;
    Some(secret_env(
        &env_name(keys::WEBHOOK_SECRET),
        &secret.name,
        &secret.key,
    ))
}

pub(super) fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}
