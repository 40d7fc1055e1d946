//! `ocr-runtime loadgen`: load against a running API, over HTTP or gRPC.
//!
//! Closed loop: N connections, each sending its next request when the last
//! one is answered (how many jobs/s the API sustains); over gRPC too, N
//! HTTP/2 connections with a call in flight on each. Open loop: requests
//! at a fixed rate whatever the answers do, each timed from the moment it
//! was due, not from when it was sent, so a server that falls behind shows
//! its queueing in the latencies instead of slowing the load down (the
//! coordinated-omission trap). With `follow`, each accepted job is followed
//! to its final state (gRPC `Watch`, HTTP polling) and the accepted-to-final
//! latency is measured too. Latencies go into HDR histograms.

mod h2_channel;

use crate::api::grpc::proto::{ocr_jobs_client::OcrJobsClient, GetJobRequest, SubmitRequest};
use anyhow::Context;
use h2_channel::H2Channel;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A request unanswered this long counts as a transport failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// This many requests in flight at all times.
    Closed { connections: usize },
    /// This many requests per second, each due at its own time.
    Open { per_second: f64 },
}

/// When to stop sending (besides [`Plan::cancel`], which always stops it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    After(Duration),
    Requests(u64),
    /// Only when cancelled.
    Cancelled,
}

/// A careful client: every job has its own idempotency key, and a request
/// that is not accepted (refused, unanswered) is sent again with the same
/// key after a pause, until it is, even after sending has stopped. No job is
/// lost to a restarting API and none is created twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Keys are `<prefix>-<n>`, `n` counting from 0.
    pub key_prefix: String,
    pub pause: Duration,
}

/// A job the API accepted: its idempotency key (with [`Retry`]) and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcceptedJob {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// `http://host:port` of the HTTP API or the gRPC API.
    pub target: String,
    pub protocol: Protocol,
    pub key: Option<String>,
    pub image: bytes::Bytes,
    pub content_type: String,
    pub pacing: Pacing,
    pub stop: Stop,
    /// Follow each accepted job to its final state, for at most this long
    /// after its acceptance.
    pub follow: Option<Duration>,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Retry every job with its own idempotency key until it is accepted.
    pub retry: Option<Retry>,
    /// Stops sending when cancelled (Ctrl-C in the CLI); requests already
    /// sent are still answered (and, with `retry`, retried) and summed up.
    pub cancel: CancellationToken,
    /// Every accepted job, as it is accepted.
    pub accepted_jobs: Option<tokio::sync::mpsc::UnboundedSender<AcceptedJob>>,
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// What `loadgen --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub target: String,
    pub protocol: &'static str,
    /// `closed` or `open`.
    pub pacing: &'static str,
    pub connections: Option<usize>,
    pub rate_per_second: Option<f64>,
    pub elapsed_seconds: f64,
    pub sent: u64,
    pub accepted: u64,
    /// Answers that were not an acceptance, by HTTP status or gRPC code name.
    pub refused: BTreeMap<String, u64>,
    /// Requests that got no answer (connection refused, reset, timeout).
    pub transport_errors: u64,
    pub accepted_per_second: f64,
    /// Requests sent again (with `retry`) after an answer that was not an acceptance.
    pub retries: u64,
    /// From when each request was due (open loop) or sent (closed loop) to its answer
    /// (with `retry`: to its acceptance).
    pub accept_latency_ms: Latency,
    /// Final states of followed jobs (`follow`), and jobs still unfinished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished: Option<BTreeMap<String, u64>>,
    /// From acceptance to the final state, as the follower saw it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_to_end_latency_ms: Option<Latency>,
}

/// One request's outcome.
enum Outcome {
    Accepted(String),
    Refused(String),
    Transport,
}

/// Everything the request tasks record into.
struct Recorder {
    sent: AtomicU64,
    accepted: AtomicU64,
    transport: AtomicU64,
    retries: AtomicU64,
    refused: Mutex<BTreeMap<String, u64>>,
    accept: Mutex<Histogram<u64>>,
    end_to_end: Mutex<Histogram<u64>>,
    finished: Mutex<BTreeMap<String, u64>>,
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to an hour, 3 significant digits: constant and valid.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record(histogram: &Mutex<Histogram<u64>>, took: Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
    if let Ok(mut h) = histogram.lock() {
        h.saturating_record(micros);
    }
}

fn latency(histogram: &Histogram<u64>) -> Latency {
    let ms = |micros: u64| micros as f64 / 1000.0;
    Latency {
        count: histogram.len(),
        mean: histogram.mean() / 1000.0,
        p50: ms(histogram.value_at_quantile(0.5)),
        p90: ms(histogram.value_at_quantile(0.9)),
        p99: ms(histogram.value_at_quantile(0.99)),
        p999: ms(histogram.value_at_quantile(0.999)),
        max: ms(histogram.max()),
    }
}

/// The client side of one protocol.
#[derive(Clone)]
enum Client {
    Http {
        http: reqwest::Client,
        base: String,
    },
    /// Closed loop: one HTTP/2 connection per `--connections`, each with one
    /// call in flight, as HTTP/1.1 has. Open loop: every call multiplexed on
    /// one connection, as one gRPC client sends them.
    Grpc {
        connections: Vec<OcrJobsClient<H2Channel>>,
    },
}

impl Client {
    async fn connect(plan: &Plan) -> anyhow::Result<Client> {
        let base = plan.target.trim_end_matches('/').to_owned();
        match plan.protocol {
            Protocol::Http => {
                let mut headers = reqwest::header::HeaderMap::new();
                if let Some(key) = &plan.key {
                    let value = format!("Bearer {key}")
                        .parse()
                        .context("the API key is not a valid header value")?;
                    headers.insert(reqwest::header::AUTHORIZATION, value);
                }
                let http = reqwest::Client::builder()
                    .default_headers(headers)
                    .timeout(CALL_TIMEOUT)
                    .pool_max_idle_per_host(usize::MAX)
                    .build()
                    .context("building the HTTP client")?;
                Ok(Client::Http { http, base })
            }
            Protocol::Grpc => {
                let origin: http::Uri = base
                    .parse()
                    .with_context(|| format!("{base} is not a gRPC address"))?;
                anyhow::ensure!(
                    origin.scheme_str() == Some("http"),
                    "--grpc sends cleartext HTTP/2: the address must start with http://, not {base}"
                );
                let authority = origin
                    .authority()
                    .with_context(|| format!("{base} names no host"))?
                    .as_str()
                    .to_owned();
                let count = match plan.pacing {
                    Pacing::Closed { connections } => connections.max(1),
                    Pacing::Open { .. } => 1,
                };
                let mut connections = Vec::with_capacity(count);
                for _ in 0..count {
                    let channel = H2Channel::connect(&authority)
                        .await
                        .map_err(|e| anyhow::anyhow!(e))
                        .with_context(|| format!("connecting to {base}"))?;
                    connections.push(
                        OcrJobsClient::with_origin(channel, origin.clone())
                            .max_decoding_message_size(64 * 1024 * 1024)
                            .max_encoding_message_size(64 * 1024 * 1024),
                    );
                }
                Ok(Client::Grpc { connections })
            }
        }
    }

    fn grpc_request<T>(key: &Option<String>, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = key
            .as_ref()
            .and_then(|key| format!("Bearer {key}").parse().ok())
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// The gRPC connection of `lane`.
    fn grpc(connections: &[OcrJobsClient<H2Channel>], lane: usize) -> OcrJobsClient<H2Channel> {
        connections[lane % connections.len()].clone()
    }

    async fn submit(&self, plan: &Plan, idempotency_key: Option<&str>, lane: usize) -> Outcome {
        match self {
            Client::Http { http, base } => {
                let mut post = http
                    .post(format!("{base}/v1/jobs"))
                    .header(reqwest::header::CONTENT_TYPE, &plan.content_type)
                    .body(plan.image.clone());
                if let Some(key) = idempotency_key {
                    post = post.header("idempotency-key", key);
                }
                let sent = post.send().await;
                let Ok(response) = sent else {
                    return Outcome::Transport;
                };
                let status = response.status();
                if status != reqwest::StatusCode::ACCEPTED {
                    return Outcome::Refused(status.as_u16().to_string());
                }
                match response.json::<serde_json::Value>().await {
                    Ok(body) => match body["id"].as_str() {
                        Some(id) => Outcome::Accepted(id.to_owned()),
                        None => Outcome::Refused("202 without an id".into()),
                    },
                    Err(_) => Outcome::Transport,
                }
            }
            Client::Grpc { connections } => {
                let request = SubmitRequest {
                    image: plan.image.clone(),
                    content_type: plan.content_type.clone(),
                    idempotency_key: idempotency_key.unwrap_or_default().to_owned(),
                };
                let mut client = Self::grpc(connections, lane);
                let call = client.submit(Self::grpc_request(&plan.key, request));
                match tokio::time::timeout(CALL_TIMEOUT, call).await {
                    Ok(Ok(job)) => Outcome::Accepted(job.into_inner().id),
                    Ok(Err(status)) if status.code() != tonic::Code::Unknown => {
                        Outcome::Refused(format!("{:?}", status.code()))
                    }
                    Ok(Err(_)) | Err(_) => Outcome::Transport,
                }
            }
        }
    }

    /// Waits until the job is final; its final status, or `unfinished`.
    async fn follow(&self, plan: &Plan, id: &str, until: Instant, lane: usize) -> String {
        match self {
            Client::Http { http, base } => {
                let mut pause = Duration::from_millis(20);
                while Instant::now() < until {
                    if let Ok(response) = http.get(format!("{base}/v1/jobs/{id}")).send().await {
                        if let Ok(job) = response.json::<serde_json::Value>().await {
                            let status = job["status"].as_str().unwrap_or_default();
                            if matches!(status, "Succeeded" | "Failed" | "DeadLettered") {
                                return status.to_owned();
                            }
                        }
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                "unfinished".into()
            }
            Client::Grpc { connections } => {
                let watch = async {
                    let request = GetJobRequest { id: id.to_owned() };
                    let mut stream = Self::grpc(connections, lane)
                        .watch(Self::grpc_request(&plan.key, request))
                        .await
                        .ok()?
                        .into_inner();
                    let mut last = None;
                    while let Ok(Some(job)) = stream.message().await {
                        last = Some(job.status());
                    }
                    last
                };
                let remaining = until.saturating_duration_since(Instant::now());
                match tokio::time::timeout(remaining, watch).await {
                    Ok(Some(status)) => match status {
                        crate::api::grpc::proto::JobStatus::Succeeded => "Succeeded".into(),
                        crate::api::grpc::proto::JobStatus::Failed => "Failed".into(),
                        crate::api::grpc::proto::JobStatus::DeadLettered => "DeadLettered".into(),
                        _ => "unfinished".into(),
                    },
                    _ => "unfinished".into(),
                }
            }
        }
    }
}

/// Runs the plan; the summary once every request is answered (and, with
/// `follow`, every followed job is final or its time is up).
pub async fn run(plan: Plan) -> anyhow::Result<Summary> {
    if let Pacing::Open { per_second } = plan.pacing {
        anyhow::ensure!(
            per_second > 0.0 && per_second.is_finite(),
            "the rate must be above 0"
        );
    }
    let client = Client::connect(&plan).await?;
    let plan = Arc::new(plan);
    let recorder = Arc::new(Recorder {
        sent: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        transport: AtomicU64::new(0),
        retries: AtomicU64::new(0),
        refused: Mutex::new(BTreeMap::new()),
        accept: Mutex::new(histogram()),
        end_to_end: Mutex::new(histogram()),
        finished: Mutex::new(BTreeMap::new()),
    });
    let following = Arc::new(AtomicU64::new(0));
    let progress = progress_bar(&plan);
    let ticker = tokio::spawn(report_progress(recorder.clone(), progress.clone()));
    let started = Instant::now();
    let request = Request {
        client,
        plan: plan.clone(),
        recorder: recorder.clone(),
        following: following.clone(),
    };

    let mut requests = JoinSet::new();
    match plan.pacing {
        Pacing::Closed { connections } => {
            let issued = Arc::new(AtomicU64::new(0));
            for lane in 0..connections.max(1) {
                let (request, issued, stop) = (request.clone(), issued.clone(), plan.stop);
                let cancel = plan.cancel.clone();
                requests.spawn(async move {
                    loop {
                        let n = issued.fetch_add(1, Ordering::Relaxed);
                        let over = cancel.is_cancelled()
                            || match stop {
                                Stop::After(duration) => started.elapsed() >= duration,
                                Stop::Requests(limit) => n >= limit,
                                Stop::Cancelled => false,
                            };
                        if over {
                            return;
                        }
                        request.clone().send(n, lane, Instant::now()).await;
                    }
                });
            }
        }
        Pacing::Open { per_second } => {
            let interval = Duration::from_secs_f64(1.0 / per_second);
            for n in 0u64.. {
                let due = started + interval.mul_f64(n as f64);
                let over = match plan.stop {
                    Stop::After(duration) => due >= started + duration,
                    Stop::Requests(limit) => n >= limit,
                    Stop::Cancelled => false,
                };
                if over {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = plan.cancel.cancelled() => break,
                }
                requests.spawn(request.clone().send(n, 0, due));
                // Reap what has finished, so the set stays small.
                while requests.try_join_next().is_some() {}
            }
        }
    }
    while requests.join_next().await.is_some() {}
    let sending_took = started.elapsed();
    while following.load(Ordering::Acquire) > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ticker.abort();
    progress.finish_and_clear();

    let accepted = recorder.accepted.load(Ordering::Relaxed);
    let lock_failed = || anyhow::anyhow!("a request task panicked");
    let accept = latency(&*recorder.accept.lock().map_err(|_| lock_failed())?);
    let followed = plan.follow.is_some();
    let (finished, end_to_end) = if followed {
        (
            Some(recorder.finished.lock().map_err(|_| lock_failed())?.clone()),
            Some(latency(
                &*recorder.end_to_end.lock().map_err(|_| lock_failed())?,
            )),
        )
    } else {
        (None, None)
    };
    let refused = recorder.refused.lock().map_err(|_| lock_failed())?.clone();
    Ok(Summary {
        target: plan.target.clone(),
        protocol: match plan.protocol {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
        },
        pacing: match plan.pacing {
            Pacing::Closed { .. } => "closed",
            Pacing::Open { .. } => "open",
        },
        connections: match plan.pacing {
            Pacing::Closed { connections } => Some(connections),
            Pacing::Open { .. } => None,
        },
        rate_per_second: match plan.pacing {
            Pacing::Open { per_second } => Some(per_second),
            Pacing::Closed { .. } => None,
        },
        elapsed_seconds: sending_took.as_secs_f64(),
        sent: recorder.sent.load(Ordering::Relaxed),
        accepted,
        refused,
        transport_errors: recorder.transport.load(Ordering::Relaxed),
        accepted_per_second: accepted as f64 / sending_took.as_secs_f64().max(1e-9),
        retries: recorder.retries.load(Ordering::Relaxed),
        accept_latency_ms: accept,
        finished,
        end_to_end_latency_ms: end_to_end,
    })
}

/// What one request needs; cheap to clone.
#[derive(Clone)]
struct Request {
    client: Client,
    plan: Arc<Plan>,
    recorder: Arc<Recorder>,
    /// Followers still running.
    following: Arc<AtomicU64>,
}

impl Request {
    /// Submits job `n` on connection `lane` (again, with `retry`, until it
    /// is accepted), timed from `due`; records the answer and, with
    /// `follow`, starts following the job.
    async fn send(self, n: u64, lane: usize, due: Instant) {
        let recorder = &self.recorder;
        recorder.sent.fetch_add(1, Ordering::Relaxed);
        let key = self
            .plan
            .retry
            .as_ref()
            .map(|retry| format!("{}-{n}", retry.key_prefix));
        let outcome = loop {
            let outcome = self.client.submit(&self.plan, key.as_deref(), lane).await;
            match (&outcome, &self.plan.retry) {
                (Outcome::Accepted(_), _) | (_, None) => break outcome,
                (_, Some(retry)) => {
                    recorder.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(retry.pause).await;
                }
            }
        };
        let answered = Instant::now();
        record(&recorder.accept, answered.saturating_duration_since(due));
        match outcome {
            Outcome::Accepted(id) => {
                recorder.accepted.fetch_add(1, Ordering::Relaxed);
                if let Some(jobs) = &self.plan.accepted_jobs {
                    let _ = jobs.send(AcceptedJob {
                        key: key.clone(),
                        id: id.clone(),
                    });
                }
                if let Some(follow) = self.plan.follow {
                    self.following.fetch_add(1, Ordering::AcqRel);
                    tokio::spawn(async move {
                        let status = self
                            .client
                            .follow(&self.plan, &id, answered + follow, lane)
                            .await;
                        finish(&self.recorder, &status, answered);
                        self.following.fetch_sub(1, Ordering::AcqRel);
                    });
                }
            }
            Outcome::Refused(why) => {
                if let Ok(mut refused) = recorder.refused.lock() {
                    *refused.entry(why).or_insert(0) += 1;
                }
            }
            Outcome::Transport => {
                recorder.transport.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn report_progress(recorder: Arc<Recorder>, progress: indicatif::ProgressBar) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        progress.set_position(recorder.sent.load(Ordering::Relaxed));
        let refused: u64 = recorder
            .refused
            .lock()
            .map(|r| r.values().sum())
            .unwrap_or(0);
        progress.set_message(format!(
            "accepted {}  refused {refused}  errors {}",
            recorder.accepted.load(Ordering::Relaxed),
            recorder.transport.load(Ordering::Relaxed)
        ));
    }
}

fn finish(recorder: &Recorder, status: &str, accepted_at: Instant) {
    if status != "unfinished" {
        record(&recorder.end_to_end, accepted_at.elapsed());
    }
    if let Ok(mut finished) = recorder.finished.lock() {
        *finished.entry(status.to_owned()).or_insert(0) += 1;
    }
}

fn progress_bar(plan: &Plan) -> indicatif::ProgressBar {
    if !plan.progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match plan.stop {
        Stop::Requests(n) => indicatif::ProgressBar::new(n),
        Stop::After(_) | Stop::Cancelled => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed_precise} sent {pos} {per_sec} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
    bar.set_style(style);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}

impl Summary {
    /// For people: a few lines.
    pub fn to_text(&self) -> String {
        let l = &self.accept_latency_ms;
        let mut text = format!(
            "{} {} loop against {}: sent {} in {:.1} s, accepted {} ({:.1}/s), refused {:?}, transport errors {}, retries {}\naccept latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n",
            self.protocol,
            self.pacing,
            self.target,
            self.sent,
            self.elapsed_seconds,
            self.accepted,
            self.accepted_per_second,
            self.refused,
            self.transport_errors,
            self.retries,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max
        );
        if let (Some(finished), Some(e2e)) = (&self.finished, &self.end_to_end_latency_ms) {
            text.push_str(&format!(
                "followed to the end: {finished:?}\nend-to-end latency ms: p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}\n",
                e2e.p50, e2e.p90, e2e.p99, e2e.max
            ));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_recorded_latencies() {
        let h = Mutex::new(histogram());
        for ms in 1..=100 {
            record(&h, Duration::from_millis(ms));
        }
        let l = latency(&h.lock().unwrap());
        assert_eq!(l.count, 100);
        assert!((l.p50 - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p99 - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
    }
}
