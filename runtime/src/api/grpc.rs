//! The gRPC API (tonic): the same submit use case as HTTP, plus a server
//! stream that follows a job to its final state.

use super::admission::{Admission, FRAMING_BYTES};
use crate::app::submit::{Submission, SubmitError, Submitted, Submitter};
use crate::domain::{Job, JobId, JobStatus};
use crate::metrics::Metrics;
use futures::Stream;
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
}

impl GrpcJobs {
    /// `admission` is shared with the HTTP front end: one budget per process.
    pub fn new(submitter: Submitter, metrics: Metrics, admission: Admission) -> Self {
        GrpcJobs {
            submitter,
            metrics,
            admission,
        }
    }

    /// The service with a message limit that admits the largest accepted image.
    pub fn into_server(self) -> OcrJobsServer<GrpcJobs> {
        let limit = self.submitter.limits.max_body_bytes + FRAMING_BYTES;
        OcrJobsServer::new(self).max_decoding_message_size(limit)
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
        SubmitError::RateLimited { .. } => Status::resource_exhausted(err.to_string()),
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

async fn load(submitter: &Submitter, id: JobId) -> Result<Job, Status> {
    match submitter.store.get(id).await {
        Ok(Some(job)) => Ok(job),
        Ok(None) => Err(Status::not_found(format!("no job {id}"))),
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
        let started = Instant::now();
        // tonic has read the message by now (within its size limit); the
        // budget still bounds how many are checked and stored at once.
        let declared = request.get_ref().image.len() as u64;
        let _admitted = self
            .admission
            .try_admit(Some(declared))
            .map_err(|overloaded| {
                self.metrics.submitted("shed", started.elapsed());
                Status::unavailable(overloaded.to_string())
            })?;
        let request = request.into_inner();
        let client_id = Some(request.client_id)
            .filter(|c| !c.trim().is_empty() && c.len() <= 128)
            .unwrap_or_else(|| "anonymous".into());
        let outcome = self
            .submitter
            .submit(Submission {
                client_id,
                idempotency_key: Some(request.idempotency_key).filter(|k| !k.is_empty()),
                content_type: request.content_type,
                body: request.image.into(),
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
        let id = parse_id(&request.into_inner().id)?;
        let job = load(&self.submitter, id).await?;
        Ok(Response::new(job_to_proto(&job, false)?))
    }

    type WatchStream = JobStream;

    async fn watch(
        &self,
        request: Request<proto::GetJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let id = parse_id(&request.into_inner().id)?;
        // Fail fast on an unknown id instead of streaming nothing.
        load(&self.submitter, id).await?;
        struct Cursor {
            submitter: Submitter,
            id: JobId,
            last: Option<(JobStatus, u32)>,
            finished: bool,
        }
        let cursor = Cursor {
            submitter: self.submitter.clone(),
            id,
            last: None,
            finished: false,
        };
        let stream = futures::stream::unfold(cursor, |mut cursor| async move {
            if cursor.finished {
                return None;
            }
            loop {
                let job = match load(&cursor.submitter, cursor.id).await {
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
