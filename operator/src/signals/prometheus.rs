//! The advisor's utilisation and database signals from a Prometheus server
//! (`spec.autoArchitecture.prometheus`) instead of the pods' own pages: for
//! clusters where the operator may not reach pod IPs (a NetworkPolicy), or
//! whose Prometheus already scrapes the pipeline (the chart's PodMonitor).
//! The queries ask for what the pod scraper computes itself: the workers'
//! mean utilisation over the window, and the mean time of a job's final
//! database write, from the same metrics (names from `ocr_contract`).

use std::time::Duration;

use ocr_contract::signals::{
    exposed, ENGINE_BUSY_SECONDS, GPU_UTILIZATION, STORE_OP_FINISH, STORE_SECONDS,
};

use crate::advisor::UtilizationSource;

/// How long one query may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error("querying {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("Prometheus answered {query:?} with {detail}")]
    Answer { query: String, detail: String },
}

/// The PromQL of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queries {
    pub gpu_utilization: String,
    pub engine_busy: String,
    pub store_finish_seconds: String,
    pub pods: String,
}

impl Queries {
    /// `matchers` with `$namespace` and `$pipeline` filled in; rates and
    /// averages over the last `window_seconds`.
    pub fn new(matchers: &str, namespace: &str, pipeline: &str, window_seconds: u32) -> Queries {
        let m = matchers
            .replace("$namespace", namespace)
            .replace("$pipeline", pipeline);
        let w = format!("{window_seconds}s");
        let gpu = exposed(GPU_UTILIZATION);
        let busy = format!("{}_total", exposed(ENGINE_BUSY_SECONDS));
        let store = exposed(STORE_SECONDS);
        let finish = format!(r#"{m},op="{STORE_OP_FINISH}""#);
        Queries {
            gpu_utilization: format!("avg(avg_over_time({gpu}{{{m}}}[{w}]))"),
            engine_busy: format!("avg(rate({busy}{{{m}}}[{w}]))"),
            store_finish_seconds: format!(
                "sum(rate({store}_sum{{{finish}}}[{w}])) / sum(rate({store}_count{{{finish}}}[{w}]))"
            ),
            pods: format!("count(up{{{m}}} == 1)"),
        }
    }
}

/// What Prometheus says; `None` where it has no (finite) value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    pub utilization: Option<(f64, UtilizationSource)>,
    pub store_finish_seconds: Option<f64>,
    pub pods_read: usize,
}

pub struct Client {
    http: reqwest::Client,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            http: reqwest::Client::builder()
                .timeout(QUERY_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }
}

impl Client {
    /// Runs the queries against the Prometheus HTTP API at `base_url`.
    /// GPU utilisation wins over the engine's busy ratio when any worker
    /// reports it, as with the pods' own pages.
    pub async fn read(
        &self,
        base_url: &str,
        queries: &Queries,
    ) -> Result<Reading, PrometheusError> {
        let (gpu, busy, store, pods) = futures::try_join!(
            self.scalar(base_url, &queries.gpu_utilization),
            self.scalar(base_url, &queries.engine_busy),
            self.scalar(base_url, &queries.store_finish_seconds),
            self.scalar(base_url, &queries.pods),
        )?;
        let utilization = match (gpu, busy) {
            (Some(gpu), _) => Some((gpu.clamp(0.0, 1.0), UtilizationSource::Gpu)),
            (None, Some(busy)) => Some((busy.clamp(0.0, 1.0), UtilizationSource::EngineBusy)),
            (None, None) => None,
        };
        Ok(Reading {
            utilization,
            store_finish_seconds: store,
            pods_read: pods.map_or(0, |n| n.max(0.0) as usize),
        })
    }

    /// The value of an instant query that aggregates to one series; `None`
    /// when there is no series or its value is not finite (a ratio of two
    /// zero rates is NaN: no final write in the window).
    async fn scalar(&self, base_url: &str, query: &str) -> Result<Option<f64>, PrometheusError> {
        let url = format!("{}/api/v1/query", base_url.trim_end_matches('/'));
        let http_error = |source| PrometheusError::Http {
            url: url.clone(),
            source,
        };
        let response = self
            .http
            .get(&url)
            .query(&[("query", query)])
            .send()
            .await
            .map_err(http_error)?;
        let status = response.status();
        let body = response.text().await.map_err(http_error)?;
        let answer = |detail: String| PrometheusError::Answer {
            query: query.to_owned(),
            detail,
        };
        let json: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| answer(format!("HTTP {status} and a body that is not JSON ({e})")))?;
        if json["status"] != "success" {
            return Err(answer(format!(
                "HTTP {status}: {} {}",
                json["errorType"].as_str().unwrap_or("error"),
                json["error"].as_str().unwrap_or("")
            )));
        }
        let result = &json["data"]["result"];
        let Some(series) = result.as_array() else {
            return Err(answer(format!("an unexpected result: {result}")));
        };
        let Some(first) = series.first() else {
            return Ok(None);
        };
        // An instant vector's sample is `[unix seconds, "value"]`.
        let value = first["value"][1]
            .as_str()
            .and_then(|text| text.parse::<f64>().ok())
            .ok_or_else(|| answer(format!("a sample without a value: {first}")))?;
        Ok(value.is_finite().then_some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DEFAULT_PROMETHEUS_MATCHERS;

    #[test]
    fn queries_select_the_pipeline_by_the_pod_monitor_labels() {
        let q = Queries::new(DEFAULT_PROMETHEUS_MATCHERS, "ocr", "demo", 120);
        let m = r#"namespace="ocr",ocr_serving_dev_pipeline="demo",app_kubernetes_io_component=~"worker|writer""#;
        assert_eq!(
            q.engine_busy,
            format!("avg(rate(ocr_engine_busy_seconds_total{{{m}}}[120s]))")
        );
        assert_eq!(
            q.gpu_utilization,
            format!("avg(avg_over_time(ocr_gpu_utilization_ratio{{{m}}}[120s]))")
        );
        assert_eq!(
            q.store_finish_seconds,
            format!(
                r#"sum(rate(ocr_store_seconds_sum{{{m},op="finish"}}[120s])) / sum(rate(ocr_store_seconds_count{{{m},op="finish"}}[120s]))"#
            )
        );
        assert_eq!(q.pods, format!("count(up{{{m}}} == 1)"));
    }
}
