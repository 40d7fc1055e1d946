//! Prometheus metrics shared by every role.

use crate::domain::JobStatus;
use ocr_contract::signals;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LagLabels {
    topic: String,
    group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabel {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: String,
}

/// The steps of accepting a job, timed separately so a slow database or
/// broker shows up as such.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitStage {
    /// Decoding and checking the image.
    Check,
    /// Writing the input to the blob store.
    Blob,
    /// Database writes and reads (job row, idempotency key, status).
    Database,
    /// Publishing to the queue.
    Publish,
}

impl SubmitStage {
    pub const ALL: [SubmitStage; 4] = [
        SubmitStage::Check,
        SubmitStage::Blob,
        SubmitStage::Database,
        SubmitStage::Publish,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SubmitStage::Check => "check",
            SubmitStage::Blob => "blob",
            SubmitStage::Database => "database",
            SubmitStage::Publish => "publish",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    submitted: Family<OutcomeLabel, Counter>,
    finished: Family<StatusLabel, Counter>,
    submit_seconds: Histogram,
    batch_size: Histogram,
    inference_seconds: Histogram,
    inference_seconds_per_item: Histogram,
    batch_wait_seconds: Histogram,
    in_flight: Gauge,
    consumer_lag: Family<LagLabels, Gauge>,
    writer_retries: Family<RetryLabel, Counter>,
    stage_seconds: Family<StageLabel, Histogram>,
    engine_busy_seconds: Counter<f64, AtomicU64>,
    store_seconds: Family<OpLabel, Histogram>,
    job_latency_seconds: Family<StatusLabel, Histogram>,
    consumer_lag_growth: Family<LagLabels, Gauge<f64, AtomicU64>>,
    gpu_utilization: Family<GpuLabel, Gauge<f64, AtomicU64>>,
    gpu_memory_used: Family<GpuLabel, Gauge>,
    gpu_memory_total: Family<GpuLabel, Gauge>,
    /// Running totals per stage, readable in-process (benchmarks).
    stage_nanos: [AtomicU64; 4],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ocr");
        let submitted = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "jobs_submitted",
            "Job submissions by outcome (created, replayed, rejected)",
            submitted.clone(),
        );
        let finished = Family::<StatusLabel, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that reached a final state, by state",
            finished.clone(),
        );
        let submit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "submit_seconds",
            "Time to accept a job (check, store, publish)",
            submit_seconds.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register("batch_size", "Images per engine call", batch_size.clone());
        let inference_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "inference_seconds",
            "Engine time per batch",
            inference_seconds.clone(),
        );
        let inference_seconds_per_item = Histogram::new(exponential_buckets(0.002, 2.0, 14));
        registry.register(
            "inference_seconds_per_item",
            "Engine time per batch divided by its size",
            inference_seconds_per_item.clone(),
        );
        let batch_wait_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 12));
        registry.register(
            "batch_wait_seconds",
            "Time a micro-batch waited to fill",
            batch_wait_seconds.clone(),
        );
        let stage_seconds = Family::<StageLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        registry.register(
            "submit_stage_seconds",
            "Time spent in each step of accepting a job",
            stage_seconds.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "jobs_in_flight",
            "Jobs a worker holds right now",
            in_flight.clone(),
        );
        let consumer_lag = Family::<LagLabels, Gauge>::default();
        registry.register(
            signals::CONSUMER_LAG,
            "Messages the role's consumer group has not committed yet, over all partitions",
            consumer_lag.clone(),
        );
        let writer_retries = Family::<RetryLabel, Counter>::default();
        registry.register(
            "writer_retries",
            "Failed attempts of the writer, by operation (database, blob, webhook)",
            writer_retries.clone(),
        );
        let engine_busy_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            signals::ENGINE_BUSY_SECONDS,
            "Seconds the engine spent inferring; its rate is the busy ratio (GPU utilisation's stand-in on a CPU)",
            engine_busy_seconds.clone(),
        );
        let store_seconds = Family::<OpLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0002, 2.0, 16))
        });
        registry.register(
            signals::STORE_SECONDS,
            "Time of each database operation (insert, get, claim, finish, requeue, ...), failures included",
            store_seconds.clone(),
        );
        let job_latency_seconds = Family::<StatusLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 16))
        });
        registry.register(
            signals::JOB_LATENCY_SECONDS,
            "From a job's acceptance to its final state, by that state",
            job_latency_seconds.clone(),
        );
        let consumer_lag_growth = Family::<LagLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            signals::CONSUMER_LAG_GROWTH,
            "How fast the consumer lag grows (negative: shrinks), messages per second over the last minute",
            consumer_lag_growth.clone(),
        );
        let gpu_utilization = Family::<GpuLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            signals::GPU_UTILIZATION,
            "GPU utilisation from NVML, 0 to 1, averaged over the last 15 s; absent without an NVIDIA driver",
            gpu_utilization.clone(),
        );
        let gpu_memory_used = Family::<GpuLabel, Gauge>::default();
        registry.register(
            signals::GPU_MEMORY_USED,
            "GPU memory in use, from NVML",
            gpu_memory_used.clone(),
        );
        let gpu_memory_total = Family::<GpuLabel, Gauge>::default();
        registry.register(
            signals::GPU_MEMORY_TOTAL,
            "GPU memory in all, from NVML",
            gpu_memory_total.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                submitted,
                finished,
                submit_seconds,
                batch_size,
                inference_seconds,
                inference_seconds_per_item,
                batch_wait_seconds,
                in_flight,
                consumer_lag,
                writer_retries,
                stage_seconds,
                engine_busy_seconds,
                store_seconds,
                job_latency_seconds,
                consumer_lag_growth,
                gpu_utilization,
                gpu_memory_used,
                gpu_memory_total,
                stage_nanos: Default::default(),
            }),
        }
    }

    pub fn submitted(&self, outcome: &str, took: Duration) {
        self.inner
            .submitted
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_owned(),
            })
            .inc();
        self.inner.submit_seconds.observe(took.as_secs_f64());
    }

    pub fn observe_stage(&self, stage: SubmitStage, took: Duration) {
        self.inner
            .stage_seconds
            .get_or_create(&StageLabel {
                stage: stage.as_str().to_owned(),
            })
            .observe(took.as_secs_f64());
        self.inner.stage_nanos[stage as usize].fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Total time spent in `stage` since start.
    pub fn stage_total(&self, stage: SubmitStage) -> Duration {
        Duration::from_nanos(self.inner.stage_nanos[stage as usize].load(Ordering::Relaxed))
    }

    /// A job reached `status`; `accepted_at_ms` is its creation time (ms since the epoch).
    pub fn job_finished(&self, status: JobStatus, accepted_at_ms: i64, now_ms: i64) {
        let label = StatusLabel {
            status: status.as_str().to_owned(),
        };
        self.inner.finished.get_or_create(&label).inc();
        // Clocks of different hosts may disagree a little: never a negative latency.
        let latency = (now_ms - accepted_at_ms).max(0) as f64 / 1000.0;
        self.inner
            .job_latency_seconds
            .get_or_create(&label)
            .observe(latency);
    }

    pub fn observe_store(&self, op: &'static str, took: Duration) {
        self.inner
            .store_seconds
            .get_or_create(&OpLabel { op: op.to_owned() })
            .observe(took.as_secs_f64());
    }

    pub fn set_consumer_lag_growth(&self, topic: &str, group: &str, per_second: f64) {
        self.inner
            .consumer_lag_growth
            .get_or_create(&LagLabels {
                topic: topic.to_owned(),
                group: group.to_owned(),
            })
            .set(per_second);
    }

    pub fn set_gpu(&self, gpu: u32, utilization: f64, memory_used: u64, memory_total: u64) {
        let label = GpuLabel {
            gpu: gpu.to_string(),
        };
        self.inner
            .gpu_utilization
            .get_or_create(&label)
            .set(utilization);
        self.inner
            .gpu_memory_used
            .get_or_create(&label)
            .set(memory_used as i64);
        self.inner
            .gpu_memory_total
            .get_or_create(&label)
            .set(memory_total as i64);
    }

    pub fn observe_inference(&self, items: usize, took: Duration) {
        self.inner.batch_size.observe(items as f64);
        self.inner.inference_seconds.observe(took.as_secs_f64());
        self.inner.engine_busy_seconds.inc_by(took.as_secs_f64());
        if items > 0 {
            self.inner
                .inference_seconds_per_item
                .observe(took.as_secs_f64() / items as f64);
        }
    }

    pub fn observe_batch_wait(&self, took: Duration) {
        self.inner.batch_wait_seconds.observe(took.as_secs_f64());
    }

    pub fn set_consumer_lag(&self, topic: &str, group: &str, lag: i64) {
        self.inner
            .consumer_lag
            .get_or_create(&LagLabels {
                topic: topic.to_owned(),
                group: group.to_owned(),
            })
            .set(lag);
    }

    pub fn writer_retry(&self, operation: &str) {
        self.inner
            .writer_retries
            .get_or_create(&RetryLabel {
                operation: operation.to_owned(),
            })
            .inc();
    }

    pub fn set_in_flight(&self, n: usize) {
        self.inner.in_flight.set(n as i64);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }
}
