//! The checks between reading a pipeline and building its objects: what the
//! schema cannot express or an old CRD version may not have enforced. The
//! builders take only a [`ValidPipeline`], so nothing is built from a spec
//! that was not checked.

use std::ops::Deref;

use crate::crd::{Device, OcrPipeline, Precision};

/// Why a spec cannot be built; shown in `Ready` and a Warning event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

fn invalid(problem: impl Into<String>) -> InvalidSpec {
    InvalidSpec(problem.into())
}

/// A pipeline that passed [`validate`].
#[derive(Debug, Clone, Copy)]
pub struct ValidPipeline<'a>(&'a OcrPipeline);

impl Deref for ValidPipeline<'_> {
    type Target = OcrPipeline;

    fn deref(&self) -> &OcrPipeline {
        self.0
    }
}

/// Checks the schema cannot express or that an old CRD version may not have enforced.
pub fn validate(pipeline: &OcrPipeline) -> Result<ValidPipeline<'_>, InvalidSpec> {
    let spec = &pipeline.spec;
    let source = &spec.model.source;
    if source.volume.is_some() == source.url.is_some() {
        return Err(invalid(
            "spec.model.source: set exactly one of volume or url",
        ));
    }
    if let Some(url) = &source.url {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(invalid("spec.model.source.url must be http(s)"));
        }
    }
    if spec.blob.s3.is_some() == spec.blob.volume.is_some() {
        return Err(invalid("spec.blob: set exactly one of s3 or volume"));
    }
    if let Some(endpoint) = spec.blob.s3.as_ref().and_then(|s3| s3.endpoint.as_ref()) {
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(invalid("spec.blob.s3.endpoint must be http(s)"));
        }
    }
    if spec.kafka.bootstrap_servers.trim().is_empty() {
        return Err(invalid("spec.kafka.bootstrapServers is empty"));
    }
    if spec.model.device == Device::Cpu && spec.model.precision == Some(Precision::Bf16) {
        return Err(invalid(
            "spec.model.precision bf16 needs device cuda (the CPU has no bf16 matmul)",
        ));
    }
    if let Some(api) = &spec.autoscaling.api {
        if api.min_replicas < 1 || api.max_replicas < api.min_replicas {
            return Err(invalid(
                "spec.autoscaling.api: need 1 <= minReplicas <= maxReplicas",
            ));
        }
    }
    if let Some(worker) = &spec.autoscaling.worker {
        if worker.min_replicas < 0 || worker.max_replicas < worker.min_replicas.max(1) {
            return Err(invalid(
                "spec.autoscaling.worker: need 0 <= minReplicas <= maxReplicas",
            ));
        }
    }
    let budget = &spec.availability.disruption_budget;
    if budget.min_available.is_some() && budget.max_unavailable.is_some() {
        return Err(invalid(
            "spec.availability.disruptionBudget: set at most one of minAvailable or maxUnavailable",
        ));
    }
    for (field, value) in [
        ("api.replicas", spec.api.replicas),
        ("worker.replicas", spec.worker.replicas),
    ] {
        if value < 0 {
            return Err(invalid(format!("spec.{field} must not be negative")));
        }
    }
    if spec.writer.replicas < 1 {
        return Err(invalid("spec.writer.replicas must be at least 1"));
    }
    if spec.writer.retry_initial_ms < 1 || spec.writer.retry_max_ms < spec.writer.retry_initial_ms {
        return Err(invalid(
            "spec.writer: need 1 <= retryInitialMs <= retryMaxMs",
        ));
    }
    let queues = pipeline.queues();
    if queues.consumer_group == queues.writer_group {
        return Err(invalid(format!(
            "spec.kafka: writerGroup must differ from consumerGroup (workers and writers consume different topics); both are {}",
            queues.consumer_group
        )));
    }
    let [jobs, results, dead_letter] = queues.topics();
    if jobs == results || jobs == dead_letter || results == dead_letter {
        return Err(invalid(format!(
            "spec.kafka.topics: jobs ({jobs}), results ({results}) and dead letters ({dead_letter}) need three different topics"
        )));
    }
    if spec.kafka.partitions < 1 || spec.kafka.replication_factor < 1 {
        return Err(invalid(
            "spec.kafka: partitions and replicationFactor must be at least 1",
        ));
    }
    if spec.migration.phase_deadline_seconds < 1 {
        return Err(invalid(
            "spec.migration.phaseDeadlineSeconds must be at least 1",
        ));
    }
    let auto = &spec.auto_architecture;
    if !(0 <= auto.idle_utilization_percent
        && auto.idle_utilization_percent <= auto.writer_below_utilization_percent
        && auto.writer_below_utilization_percent <= auto.batched_at_utilization_percent
        && auto.batched_at_utilization_percent <= 100)
    {
        return Err(invalid(
            "spec.autoArchitecture: need 0 <= idleUtilizationPercent <= writerBelowUtilizationPercent <= batchedAtUtilizationPercent <= 100",
        ));
    }
    if auto.dwell_seconds < 0 || auto.cooldown_seconds < 0 {
        return Err(invalid(
            "spec.autoArchitecture: dwellSeconds and cooldownSeconds must not be negative",
        ));
    }
    Ok(ValidPipeline(pipeline))
}
