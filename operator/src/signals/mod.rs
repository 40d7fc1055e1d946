//! Reading the advisor's signals from a running pipeline: each worker and
//! writer pod's `/metrics` page (straight from the pod's IP and metrics port,
//! as Prometheus scrapes it), or the same metrics from a Prometheus server
//! when the pipeline names one ([`prometheus`]), and the workers' lag on the
//! jobs topic from Kafka. Counters only mean something as differences, so the last reading
//! of every pod and the lag's recent history are kept per pipeline, in
//! memory: after an operator restart the advice waits a few rounds for them.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use ocr_contract::signals::{PodSample, Trend, LAG_TREND_WINDOW_SECONDS};

use crate::advisor::{summarize, PodReading, Signals};
use crate::build::{role_selector, Role};
use crate::controller::Context;
use crate::crd::OcrPipeline;
use crate::kafka::Cluster;

pub mod prometheus;

/// How long one pod may take to serve its metrics.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Rates are taken over the readings of the last minute, like Prometheus'
/// `rate(x[1m])`: reconciles come in bursts (a rollout's events), and two
/// readings a few milliseconds apart would say "idle" of a busy pod.
const RATE_WINDOW_SECONDS: f64 = 60.0;
/// Readings closer together than this give no rate yet.
const MIN_RATE_SPAN_SECONDS: f64 = 5.0;

/// The memory of the readings, per pipeline.
pub struct Scraper {
    http: reqwest::Client,
    prometheus: prometheus::Client,
    started: Instant,
    pipelines: Mutex<HashMap<String, History>>,
}

impl Default for Scraper {
    fn default() -> Self {
        Scraper {
            http: reqwest::Client::builder()
                .timeout(SCRAPE_TIMEOUT)
                .build()
                .unwrap_or_default(),
            prometheus: prometheus::Client::default(),
            started: Instant::now(),
            pipelines: Mutex::default(),
        }
    }
}

#[derive(Default)]
struct History {
    lag: Option<Trend>,
    /// The readings of each pod over the last minute, oldest first, by pod UID.
    pods: HashMap<String, VecDeque<(f64, PodSample)>>,
}

fn key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

impl Scraper {
    /// Forgets a pipeline (deleted, or its advisor turned off).
    pub fn forget(&self, ns: &str, name: &str) {
        if let Ok(mut pipelines) = self.pipelines.lock() {
            pipelines.remove(&key(ns, name));
        }
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// Reads every signal of `pipeline`; a part that cannot be read is `None`
/// in the result, never a guess.
pub async fn read(
    ctx: &Context,
    ns: &str,
    pipeline: &OcrPipeline,
    cluster: Option<&Cluster>,
) -> Signals {
    let name = pipeline.name_any();
    let from_prometheus = match &pipeline.spec.auto_architecture.prometheus {
        Some(source) => {
            let queries = prometheus::Queries::new(
                &source.matchers,
                ns,
                &name,
                u32::try_from(source.window_seconds).unwrap_or(120),
            );
            Some(
                ctx.signals
                    .prometheus
                    .read(&source.url, &queries)
                    .await
                    .map_err(|error| tracing::info!(pipeline = %name, %error, "Prometheus signals unavailable"))
                    .unwrap_or_default(),
            )
        }
        None => None,
    };
    let pods = match from_prometheus {
        Some(_) => Vec::new(),
        None => {
            let port = pipeline.spec.observability.metrics_port;
            scrape_pods(ctx, ns, &name, port).await
        }
    };
    let queues = pipeline.queues();
    let lag = match cluster {
        Some(cluster) => ctx
            .kafka
            .consumer_lag(cluster, &queues.jobs_topic, &queues.consumer_group)
            .await
            .map_err(|error| tracing::debug!(pipeline = %name, %error, "jobs lag unavailable"))
            .ok(),
        None => None,
    };

    let scraper = &ctx.signals;
    let now = scraper.now();
    let Ok(mut pipelines) = scraper.pipelines.lock() else {
        return Signals::default();
    };
    let history = pipelines.entry(key(ns, &name)).or_default();
    let mut readings = Vec::new();
    let mut seen = HashMap::new();
    for (uid, sample) in pods {
        let mut window = history.pods.remove(&uid).unwrap_or_default();
        window.push_back((now, sample));
        while window.len() > 1
            && window
                .front()
                .is_some_and(|(then, _)| now - then > RATE_WINDOW_SECONDS)
        {
            window.pop_front();
        }
        if let (Some((then, first)), Some((_, last))) = (window.front(), window.back()) {
            if now - then >= MIN_RATE_SPAN_SECONDS {
                readings.push(difference(now - then, first, last));
            }
        }
        seen.insert(uid, window);
    }
    // Pods that are gone are forgotten with their counters.
    let pods_read = seen.len();
    history.pods = seen;
    let trend = history
        .lag
        .get_or_insert_with(|| Trend::new(LAG_TREND_WINDOW_SECONDS));
    if let Some(lag) = lag {
        trend.push(now, lag as f64);
    }
    let (utilization, store_finish_seconds, pods_read) = match from_prometheus {
        Some(reading) => (
            reading.utilization,
            reading.store_finish_seconds,
            reading.pods_read,
        ),
        None => {
            let (utilization, store) = summarize(&readings);
            (utilization, store, pods_read)
        }
    };
    Signals {
        utilization,
        jobs_lag: lag,
        lag_growth_per_second: lag.and_then(|_| trend.slope()),
        store_finish_seconds,
        pods_read,
    }
}

/// What a pod did between two readings. A counter that went down means
/// the process restarted: the later reading alone is what it did since.
fn difference(elapsed: f64, before: &PodSample, after: &PodSample) -> PodReading {
    let busy_seconds = after.engine_busy_seconds.map(|now| {
        let then = before.engine_busy_seconds.unwrap_or(0.0);
        if now >= then {
            now - then
        } else {
            now
        }
    });
    let (finish_sum, finish_count) = match (before.store_finish, after.store_finish) {
        (Some(then), Some(now)) if now.count >= then.count => {
            (now.sum - then.sum, now.count - then.count)
        }
        (_, Some(now)) => (now.sum, now.count),
        (_, None) => (0.0, 0.0),
    };
    PodReading {
        elapsed,
        gpu_utilization: after.gpu_utilization,
        busy_seconds,
        finish_sum,
        finish_count,
    }
}

/// The current samples of the running, ready-or-not worker and writer pods, by UID.
async fn scrape_pods(ctx: &Context, ns: &str, name: &str, port: i32) -> Vec<(String, PodSample)> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let mut targets = Vec::new();
    for role in [Role::Worker, Role::Writer] {
        let params = ListParams::default().labels(&role_selector(name, role));
        match api.list(&params).await {
            Ok(list) => targets.extend(list.items.into_iter().filter_map(|pod| {
                let running = pod.metadata.deletion_timestamp.is_none()
                    && pod.status.as_ref()?.phase.as_deref() == Some("Running");
                let ip = pod.status.as_ref()?.pod_ip.clone()?;
                running.then(|| (pod.uid().unwrap_or_else(|| pod.name_any()), ip))
            })),
            Err(error) => {
                tracing::debug!(pipeline = %name, %error, "listing pods to read their metrics")
            }
        }
    }
    let http = &ctx.signals.http;
    let pages = join_all(targets.into_iter().map(|(uid, ip)| async move {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        let url = format!("http://{host}:{port}/metrics");
        let page = async {
            http.get(&url)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await
        }
        .await;
        match page {
            Ok(text) => match PodSample::parse(&text) {
                Ok(sample) => Some((uid, sample)),
                Err(error) => {
                    tracing::debug!(%url, %error, "unreadable metrics");
                    None
                }
            },
            Err(error) => {
                tracing::debug!(%url, %error, "scraping a pod failed");
                None
            }
        }
    }))
    .await;
    pages.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ocr_contract::signals::SumCount;

    fn sample(busy: f64, sum: f64, count: f64) -> PodSample {
        PodSample {
            engine_busy_seconds: Some(busy),
            gpu_utilization: None,
            store_finish: Some(SumCount { sum, count }),
        }
    }

    #[test]
    fn two_readings_give_what_happened_between_them() {
        let reading = difference(10.0, &sample(5.0, 1.0, 10.0), &sample(12.0, 2.0, 30.0));
        assert_eq!(reading.busy_seconds, Some(7.0));
        assert_eq!((reading.finish_sum, reading.finish_count), (1.0, 20.0));
    }

    #[test]
    fn a_restarted_pod_counts_from_zero() {
        let reading = difference(10.0, &sample(500.0, 9.0, 900.0), &sample(4.0, 0.5, 10.0));
        assert_eq!(reading.busy_seconds, Some(4.0));
        assert_eq!((reading.finish_sum, reading.finish_count), (0.5, 10.0));
    }
}
