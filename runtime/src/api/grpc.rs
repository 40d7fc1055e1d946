//! The gRPC API (tonic): the same submit use case as HTTP, plus a server
//! stream that follows a job to its final state.

use super::admission::{Admission, FRAMING_BYTES};
use super::auth::{AuthError, Authenticator};
use crate::app::submit::{Submission, SubmitError, Submitted, Submitter};
use crate::domain::tenant::Tenant;
use crate::domain::{Job, JobId, JobStatus};
use crate::metrics::Metrics;
use futures::{Future, Stream};
use std::pin::Pin;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

pub mod proto {
    tonic::include_proto!("ocr.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ocr_descriptor");
}

use proto::ocr_jobs_server::{OcrJobs, OcrJobsServer};

/// How often Watch looks at the job row. The database is the source of truth
/// and any replica may have changed the job, so it is polled.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Clone)]
pub struct GrpcJobs {
    submitter: Submitter,
    metrics: Metrics,
    admission: Admission,
    auth: Authenticator,
}

impl GrpcJobs {
    /// `admission` and `auth` are shared with the HTTP front end: one budget
    /// and one key cache per process.
    pub fn new(
        submitter: Submitter,
        metrics: Metrics,
        admission: Admission,
        auth: Authenticator,
    ) -> Self {
        GrpcJobs {
            submitter,
            metrics,
            admission,
            auth,
        }
    }

    /// The caller's tenant from the `authorization` metadata.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Tenant, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        self.auth
            .authenticate(authorization)
            .await
            .map_err(|err| match err {
                AuthError::Missing | AuthError::Invalid => Status::unauthenticated(err.to_string()),
                AuthError::Unavailable(ref source) => {
                    tracing::error!(error = %source, "checking an API key failed");
                    Status::unavailable(err.to_string())
                }
            })
    }

    /// The service with a message limit that admits the largest accepted image.
    pub fn into_server(self) -> OcrJobsServer<GrpcJobs> {
        let limit = self.submitter.limits.max_body_bytes + FRAMING_BYTES;
        OcrJobsServer::new(self).max_decoding_message_size(limit)
    }

    /// The layer that admits this service's submissions (see [`AdmitSubmissions`]).
    pub fn admission_layer(&self) -> AdmitSubmissions {
        AdmitSubmissions {
            admission: self.admission.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl From<JobStatus> for proto::JobStatus {
    fn from(status: JobStatus) -> Self {
        match status {
            JobStatus::Accepted => proto::JobStatus::Accepted,
            JobStatus::Queued => proto::JobStatus::Queued,
            JobStatus::Processing => proto::JobStatus::Processing,
            JobStatus::Succeeded => proto::JobStatus::Succeeded,
            JobStatus::Failed => proto::JobStatus::Failed,
            JobStatus::DeadLettered => proto::JobStatus::DeadLettered,
        }
    }
}

fn page_to_proto(page: ocr_engine::Page) -> proto::Page {
    proto::Page {
        width: page.width,
        height: page.height,
        text: page.text,
        lines: page
            .lines
            .into_iter()
            .map(|line| proto::Line {
                text: line.text,
                confidence: line.confidence,
                polygon: line
                    .polygon
                    .iter()
                    .map(|[x, y]| proto::Point { x: *x, y: *y })
                    .collect(),
            })
            .collect(),
    }
}

fn job_to_proto(job: &Job, replayed: bool) -> Result<proto::Job, Status> {
    let result = match (&job.status, &job.result) {
        (JobStatus::Succeeded, Some(json)) => {
            let page: ocr_engine::Page = serde_json::from_str(json)
                .map_err(|e| Status::internal(format!("stored result is unreadable: {e}")))?;
            Some(page_to_proto(page))
        }
        _ => None,
    };
    Ok(proto::Job {
        id: job.id.to_string(),
        status: proto::JobStatus::from(job.status).into(),
        attempts: job.attempts,
        created_at_ms: job.created_at_ms,
        updated_at_ms: job.updated_at_ms,
        error: job
            .error
            .clone()
            .filter(|_| job.status.is_terminal())
            .unwrap_or_default(),
        result,
        replayed,
    })
}

fn submit_status(err: SubmitError) -> Status {
    match &err {
        SubmitError::Input(input) => match input.http_status() {
            413 => Status::resource_exhausted(input.to_string()),
            _ => Status::invalid_argument(input.to_string()),
        },
        SubmitError::KeyReusedWithOtherPayload | SubmitError::BadKey => {
            Status::invalid_argument(err.to_string())
        }
        SubmitError::KeyInFlight => Status::aborted(err.to_string()),
        SubmitError::RateLimited { .. } | SubmitError::QuotaExceeded { .. } => {
            Status::resource_exhausted(err.to_string())
        }
        SubmitError::RateLimiterDown => Status::unavailable(err.to_string()),
        SubmitError::Store(_) | SubmitError::Blob(_) | SubmitError::Internal(_) => {
            tracing::error!(error = %err, "gRPC submission failed");
            Status::unavailable("the job could not be stored; retry later")
        }
    }
}

fn parse_id(id: &str) -> Result<JobId, Status> {
    id.parse()
        .map_err(|_| Status::invalid_argument(format!("{id:?} is not a job id")))
}

/// The job if it belongs to `tenant`; another tenant's job is not found.
async fn load(submitter: &Submitter, tenant: &Tenant, id: JobId) -> Result<Job, Status> {
    match submitter.store.get(id).await {
        Ok(Some(job)) if job.client_id == tenant.as_str() => Ok(job),
        Ok(_) => Err(Status::not_found(format!("no job {id}"))),
        Err(err) => {
            tracing::error!(error = %err, "reading a job failed");
            Err(Status::unavailable("the job store is unavailable"))
        }
    }
}

type JobStream = Pin<Box<dyn Stream<Item = Result<proto::Job, Status>> + Send>>;

#[tonic::async_trait]
impl OcrJobs for GrpcJobs {
    async fn submit(
        &self,
        request: Request<proto::SubmitRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        // Admitted by [`AdmitSubmissions`] before tonic read the message.
        let started = Instant::now();
        let tenant = self.caller(&request).await.inspect_err(|_| {
            self.metrics.submitted("rejected", started.elapsed());
        })?;
        let request = request.into_inner();
        let outcome = self
            .submitter
            .submit(Submission {
                tenant,
                idempotency_key: Some(request.idempotency_key).filter(|k| !k.is_empty()),
                content_type: request.content_type,
                body: request.image,
            })
            .await;
        let label = match &outcome {
            Ok(Submitted::Created(_)) => "created",
            Ok(Submitted::Replayed(_)) => "replayed",
            Err(_) => "rejected",
        };
        self.metrics.submitted(label, started.elapsed());
        let submitted = outcome.map_err(submit_status)?;
        let replayed = matches!(submitted, Submitted::Replayed(_));
        Ok(Response::new(job_to_proto(submitted.job(), replayed)?))
    }

    async fn get(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::Job>, Status> {
        let tenant = self.caller(&request).await?;
        let id = parse_id(&request.into_inner().id)?;
        let job = load(&self.submitter, &tenant, id).await?;
        Ok(Response::new(job_to_proto(&job, false)?))
    }

    type WatchStream = JobStream;

    async fn watch(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let tenant = self.caller(&request).await?;
        let id = parse_id(&request.into_inner().id)?;
        // Fail fast on an unknown id instead of streaming nothing.
        load(&self.submitter, &tenant, id).await?;
        struct Cursor {
            submitter: Submitter,
            tenant: Tenant,
            id: JobId,
            last: Option<(JobStatus, u32)>,
            finished: bool,
        }
        let cursor = Cursor {
            submitter: self.submitter.clone(),
            tenant,
            id,
            last: None,
            finished: false,
        };
        let stream = futures::stream::unfold(cursor, |mut cursor| async move {
            if cursor.finished {
                return None;
            }
            loop {
                let job = match load(&cursor.submitter, &cursor.tenant, cursor.id).await {
                    Ok(job) => job,
                    Err(status) => {
                        cursor.finished = true;
                        return Some((Err(status), cursor));
                    }
                };
                let seen = (job.status, job.attempts);
                if cursor.last != Some(seen) {
                    cursor.last = Some(seen);
                    cursor.finished = job.status.is_terminal();
                    return Some((job_to_proto(&job, false), cursor));
                }
                tokio::time::sleep(WATCH_INTERVAL).await;
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The path of `Submit` in HTTP/2 requests.
const SUBMIT_PATH: &str = "/ocr.v1.OcrJobs/Submit";

/// Admits `Submit` calls before tonic reads their message: tonic buffers a
/// whole message before the handler runs, so a handler that admitted would
/// bound nothing. A gRPC message starts with its length (the 5-byte
/// length-prefixed framing), so the layer reads that much of the body, and
/// reserves the declared size (at most the largest accepted message) before
/// tonic reads the rest: small uploads cost the budget what they weigh, as
/// an HTTP upload with `Content-Length` does. Past the budget:
/// `UNAVAILABLE` at once. Other calls pass.
#[derive(Clone)]
pub struct AdmitSubmissions {
    admission: Admission,
    metrics: Metrics,
}

impl<S> tower_layer::Layer<S> for AdmitSubmissions {
    type Service = Admitting<S>;

    fn layer(&self, inner: S) -> Admitting<S> {
        Admitting {
            inner,
            gate: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Admitting<S> {
    inner: S,
    gate: AdmitSubmissions,
}

type GrpcRequest = axum::http::Request<tonic::body::Body>;

/// Bytes of the gRPC message prefix: a compression flag and a big-endian
/// u32 length.
const MESSAGE_PREFIX_BYTES: usize = 5;

impl<S, ResBody> tower_service::Service<GrpcRequest> for Admitting<S>
where
    S: tower_service::Service<GrpcRequest, Response = axum::http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = axum::http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: GrpcRequest) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone
        // waits for the next one.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        if request.uri().path() != SUBMIT_PATH {
            return Box::pin(ready.call(request));
        }
        let gate = self.gate.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // Until the prefix is in, the call holds no admission, only what
            // it has sent (one HTTP/2 frame at most, within the stream's flow
            // control window); the server's timeout cuts off a stream that
            // never sends it.
            let (declared, body) = read_message_prefix(body).await;
            let admitted = match gate.admission.try_admit(declared) {
                Ok(admitted) => admitted,
                Err(overloaded) => {
                    gate.metrics.submitted("shed", Duration::ZERO);
                    return Ok(Status::unavailable(overloaded.to_string()).into_http());
                }
            };
            let response = ready
                .call(GrpcRequest::from_parts(parts, tonic::body::Body::new(body)))
                .await;
            drop(admitted);
            response
        })
    }
}

/// Reads `body` until the message's length prefix is in; returns the size
/// the request declares (prefix included), if it declared one, and the
/// body to hand on, whole.
async fn read_message_prefix(mut body: tonic::body::Body) -> (Option<u64>, Replayed) {
    use http_body_util::BodyExt;
    let mut read = std::collections::VecDeque::new();
    let mut head = Vec::with_capacity(MESSAGE_PREFIX_BYTES);
    while head.len() < MESSAGE_PREFIX_BYTES {
        let Some(frame) = body.frame().await else {
            break;
        };
        let data = frame.as_ref().ok().and_then(|f| f.data_ref());
        let Some(data) = data else {
            // Trailers or an error before the prefix: tonic answers it.
            read.push_back(frame);
            break;
        };
        let wanted = MESSAGE_PREFIX_BYTES - head.len();
        head.extend_from_slice(&data[..wanted.min(data.len())]);
        read.push_back(frame);
    }
    let declared = (head.len() == MESSAGE_PREFIX_BYTES).then(|| {
        let length = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        MESSAGE_PREFIX_BYTES as u64 + u64::from(length)
    });
    (declared, Replayed { read, rest: body })
}

/// A request body whose first frames were read already: those, then the rest.
struct Replayed {
    read: std::collections::VecDeque<Result<http_body::Frame<bytes::Bytes>, Status>>,
    rest: tonic::body::Body,
}

impl http_body::Body for Replayed {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Some(frame) = self.read.pop_front() {
            return std::task::Poll::Ready(Some(frame));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }
}

/// gRPC reflection, so `grpcurl` works without the .proto file.
pub fn reflection_service() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::Error,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .build_v1()
}
