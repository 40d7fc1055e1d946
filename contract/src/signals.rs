//! The signals the operator's architecture advisor reads from the pipeline's
//! pods: the names of the metrics the runtime exports for it, the reading of
//! one pod's `/metrics` page, and the trend of a series (the consumer lag).
//!
//! The runtime registers these names under [`PREFIX`]; the operator finds
//! them in the exposition through [`PodSample::parse`]. A runtime test parses
//! what a real worker serves with this parser, so the two cannot drift apart.

use std::collections::{BTreeSet, VecDeque};

/// Every runtime metric is `ocr_<name>`.
pub const PREFIX: &str = "ocr";

/// Counter: seconds the engine spent inferring, over all batches. Its rate is
/// the busy ratio, the stand-in for GPU utilisation on a CPU.
pub const ENGINE_BUSY_SECONDS: &str = "engine_busy_seconds";
/// Gauge per `gpu`: NVML's utilisation, 0..1, averaged over the last samples.
pub const GPU_UTILIZATION: &str = "gpu_utilization_ratio";
/// Gauge per `gpu`: device memory in use, bytes.
pub const GPU_MEMORY_USED: &str = "gpu_memory_used_bytes";
/// Gauge per `gpu`: device memory in all, bytes.
pub const GPU_MEMORY_TOTAL: &str = "gpu_memory_total_bytes";
/// Histogram per `op`: time of each database operation.
pub const STORE_SECONDS: &str = "store_seconds";
/// The `op` of [`STORE_SECONDS`] that writes a job's final state: what a slow
/// database slows down in the workers (standard, batched) or the writers.
pub const STORE_OP_FINISH: &str = "finish";
/// Histogram per final `status`: from the job's acceptance to its final state.
pub const JOB_LATENCY_SECONDS: &str = "job_latency_seconds";
/// Gauge per `topic` and `group`: messages not yet committed.
pub const CONSUMER_LAG: &str = "consumer_lag";
/// Gauge per `topic` and `group`: least-squares slope of the consumer lag over
/// the last [`LAG_TREND_WINDOW_SECONDS`], messages per second.
pub const CONSUMER_LAG_GROWTH: &str = "consumer_lag_growth";
/// The window of the lag trend.
pub const LAG_TREND_WINDOW_SECONDS: f64 = 60.0;

/// The exposed name of a registered metric (`ocr_` + name).
pub fn exposed(name: &str) -> String {
    format!("{PREFIX}_{name}")
}

/// What one pod's `/metrics` says about the advisor's signals, as cumulative
/// values: two samples of the same pod give rates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSample {
    /// [`ENGINE_BUSY_SECONDS`]; absent in pods that run no engine.
    pub engine_busy_seconds: Option<f64>,
    /// Mean of [`GPU_UTILIZATION`] over the pod's GPUs; absent without NVML.
    pub gpu_utilization: Option<f64>,
    /// Sum and count of [`STORE_SECONDS`] for [`STORE_OP_FINISH`].
    pub store_finish: Option<SumCount>,
}

/// A histogram's `_sum` and `_count`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SumCount {
    pub sum: f64,
    pub count: f64,
}

impl SumCount {
    /// The mean of the observations between `earlier` and `self`; `None`
    /// when there were none (or the counter was reset by a restart).
    pub fn mean_since(&self, earlier: &SumCount) -> Option<f64> {
        let count = self.count - earlier.count;
        let sum = self.sum - earlier.sum;
        (count > 0.0 && sum >= 0.0).then(|| sum / count)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading a metrics page: {0}")]
pub struct ParseError(String);

impl PodSample {
    /// Reads the Prometheus or OpenMetrics text a runtime pod serves.
    pub fn parse(text: &str) -> Result<PodSample, ParseError> {
        let lines = text.lines().map(|line| Ok(line.to_owned()));
        let scrape =
            prometheus_parse::Scrape::parse(lines).map_err(|e| ParseError(e.to_string()))?;
        let busy = exposed(ENGINE_BUSY_SECONDS);
        let busy_total = format!("{busy}_total");
        let gpu = exposed(GPU_UTILIZATION);
        // A histogram's `_sum` and `_count` come out of the parser as plain samples.
        let store_sum = format!("{}_sum", exposed(STORE_SECONDS));
        let store_count = format!("{}_count", exposed(STORE_SECONDS));
        let mut sample = PodSample::default();
        let mut gpus = Vec::new();
        for s in &scrape.samples {
            let metric = s.metric.as_str();
            let value = scalar(&s.value);
            if metric == busy || metric == busy_total {
                sample.engine_busy_seconds = Some(value);
            } else if metric == gpu {
                gpus.push(value);
            } else if s.labels.get("op") == Some(STORE_OP_FINISH) {
                if metric == store_sum {
                    sample
                        .store_finish
                        .get_or_insert_with(SumCount::default)
                        .sum = value;
                } else if metric == store_count {
                    sample
                        .store_finish
                        .get_or_insert_with(SumCount::default)
                        .count = value;
                }
            }
        }
        if !gpus.is_empty() {
            sample.gpu_utilization = Some(gpus.iter().sum::<f64>() / gpus.len() as f64);
        }
        Ok(sample)
    }
}

/// The metric families a Prometheus text page declares (`# TYPE name kind`),
/// whether or not they have samples yet.
pub fn families(page: &str) -> BTreeSet<String> {
    page.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The `ocr_…` metric families a dashboard or an alert rule mentions: every
/// `ocr_` word, without the `_bucket`, `_sum`, `_count` and `_total` of its series.
pub fn mentioned_metrics(text: &str) -> BTreeSet<String> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("ocr_") {
        let preceded = rest[..at].chars().next_back().is_some_and(is_name);
        let word: String = rest[at..].chars().take_while(|c| is_name(*c)).collect();
        rest = &rest[at + word.len()..];
        if preceded {
            continue;
        }
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|suffix| word.strip_suffix(suffix))
            .unwrap_or(&word);
        out.insert(family.to_owned());
    }
    out
}

fn scalar(value: &prometheus_parse::Value) -> f64 {
    match value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        _ => f64::NAN,
    }
}

/// The slope of a series over a sliding window, by least squares: how fast
/// the consumer lag grows (positive) or shrinks. Timestamps are seconds on
/// any monotonic clock.
#[derive(Clone, Debug)]
pub struct Trend {
    window: f64,
    points: VecDeque<(f64, f64)>,
}

impl Trend {
    pub fn new(window_seconds: f64) -> Trend {
        Trend {
            window: window_seconds,
            points: VecDeque::new(),
        }
    }

    /// Adds a reading and forgets those older than the window. A reading
    /// that goes back in time starts the series over.
    pub fn push(&mut self, at: f64, value: f64) {
        if self.points.back().is_some_and(|(t, _)| *t > at) {
            self.points.clear();
        }
        self.points.push_back((at, value));
        while self
            .points
            .front()
            .is_some_and(|(t, _)| at - *t > self.window)
        {
            self.points.pop_front();
        }
    }

    /// The latest reading.
    pub fn last(&self) -> Option<f64> {
        self.points.back().map(|(_, v)| *v)
    }

    /// How many seconds the readings span.
    pub fn span(&self) -> f64 {
        match (self.points.front(), self.points.back()) {
            (Some((first, _)), Some((last, _))) => last - first,
            _ => 0.0,
        }
    }

    /// Units per second; `None` until the readings span a quarter of the
    /// window (two readings a second apart say nothing about a trend).
    pub fn slope(&self) -> Option<f64> {
        if self.points.len() < 2 || self.span() < self.window / 4.0 {
            return None;
        }
        let n = self.points.len() as f64;
        let t0 = self.points[0].0;
        let mean_t = self.points.iter().map(|(t, _)| t - t0).sum::<f64>() / n;
        let mean_v = self.points.iter().map(|(_, v)| v).sum::<f64>() / n;
        let (mut cov, mut var) = (0.0, 0.0);
        for (t, v) in &self.points {
            let dt = t - t0 - mean_t;
            cov += dt * (v - mean_v);
            var += dt * dt;
        }
        (var > 0.0).then(|| cov / var)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steadily_growing_series_has_its_rate_as_slope() {
        let mut trend = Trend::new(60.0);
        for second in 0..=60 {
            trend.push(second as f64, 100.0 + 3.0 * second as f64);
        }
        let slope = trend.slope().expect("a full window");
        assert!((slope - 3.0).abs() < 1e-9, "{slope}");
        assert_eq!(trend.last(), Some(280.0));
    }

    #[test]
    fn old_readings_leave_the_window() {
        let mut trend = Trend::new(10.0);
        // Growing for a minute, then flat for the last 10 s: only the flat part counts.
        for second in 0..60 {
            trend.push(second as f64, second as f64);
        }
        for second in 60..=75 {
            trend.push(second as f64, 60.0);
        }
        assert_eq!(trend.slope(), Some(0.0));
        assert!(trend.span() <= 10.0);
    }

    #[test]
    fn too_short_a_span_is_no_trend() {
        let mut trend = Trend::new(60.0);
        trend.push(0.0, 0.0);
        trend.push(5.0, 500.0);
        assert_eq!(trend.slope(), None);
        trend.push(15.0, 1500.0);
        assert!(trend.slope().is_some());
    }

    #[test]
    fn a_clock_going_back_starts_over() {
        let mut trend = Trend::new(60.0);
        trend.push(100.0, 1.0);
        trend.push(130.0, 2.0);
        trend.push(10.0, 3.0);
        assert_eq!(trend.span(), 0.0);
        assert_eq!(trend.slope(), None);
    }

    #[test]
    fn a_store_mean_needs_new_observations() {
        let before = SumCount {
            sum: 1.0,
            count: 10.0,
        };
        let after = SumCount {
            sum: 3.0,
            count: 20.0,
        };
        assert_eq!(after.mean_since(&before), Some(0.2));
        assert_eq!(after.mean_since(&after), None);
        // A restarted pod's counters start from zero.
        assert_eq!(before.mean_since(&after), None);
    }

    #[test]
    fn a_pod_page_is_read() {
        let page = "\
# HELP ocr_engine_busy_seconds Seconds the engine spent inferring.
# TYPE ocr_engine_busy_seconds counter
ocr_engine_busy_seconds_total 12.5
# TYPE ocr_gpu_utilization_ratio gauge
ocr_gpu_utilization_ratio{gpu=\"0\"} 0.9
ocr_gpu_utilization_ratio{gpu=\"1\"} 0.7
# TYPE ocr_store_seconds histogram
ocr_store_seconds_sum{op=\"finish\"} 0.75
ocr_store_seconds_count{op=\"finish\"} 30
ocr_store_seconds_bucket{le=\"0.01\",op=\"finish\"} 10
ocr_store_seconds_bucket{le=\"+Inf\",op=\"finish\"} 30
ocr_store_seconds_sum{op=\"claim\"} 9.0
ocr_store_seconds_count{op=\"claim\"} 3
ocr_store_seconds_bucket{le=\"+Inf\",op=\"claim\"} 3
# EOF
";
        let sample = PodSample::parse(page).expect("parses");
        assert_eq!(sample.engine_busy_seconds, Some(12.5));
        assert!((sample.gpu_utilization.expect("gpus") - 0.8).abs() < 1e-9);
        assert_eq!(
            sample.store_finish,
            Some(SumCount {
                sum: 0.75,
                count: 30.0
            })
        );
    }

    #[test]
    fn mentioned_metrics_are_families() {
        let rule = r#"expr: histogram_quantile(0.9, rate(ocr_store_seconds_bucket{op="finish"}[5m]))
            and rate(ocr_engine_busy_seconds_total[1m]) > 0 unless ocr_consumer_lag
            # not a metric: xocr_thing, ocr-pipelines"#;
        let names: Vec<String> = mentioned_metrics(rule).into_iter().collect();
        assert_eq!(
            names,
            [
                "ocr_consumer_lag",
                "ocr_engine_busy_seconds",
                "ocr_store_seconds"
            ]
        );
        let page = "# HELP ocr_x X.\n# TYPE ocr_x counter\nocr_x_total 1\n# TYPE ocr_y histogram\n";
        let families: Vec<String> = families(page).into_iter().collect();
        assert_eq!(families, ["ocr_x", "ocr_y"]);
    }

    #[test]
    fn a_page_without_the_signals_reads_as_absent() {
        let sample = PodSample::parse("# EOF\nocr_jobs_in_flight 3\n").expect("parses");
        assert_eq!(sample, PodSample::default());
    }
}
