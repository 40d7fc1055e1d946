//! The HTTP API: submit a job, read its status and result, probes, metrics
//! and the OpenAPI document.

use super::admission::{Admission, Overloaded, FRAMING_BYTES};
use super::auth::{AuthError, Authenticator};
use crate::app::submit::{Submission, SubmitError, Submitted, Submitter};
use crate::domain::tenant::Tenant;
use crate::domain::{Job, JobId, JobStatus};
use crate::health::Liveness;
use crate::metrics::Metrics;
use axum::body::{to_bytes, Body};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use std::time::Instant;
use utoipa::{OpenApi, ToSchema};

#[derive(Clone)]
pub struct HttpState {
    pub submitter: Submitter,
    pub metrics: Metrics,
    pub admission: Admission,
    pub liveness: Liveness,
    pub auth: Authenticator,
}

impl HttpState {
    /// Sheds load by the submitter's limits; alive unless told otherwise
    /// ([`HttpState::with_liveness`]); keys optional unless told otherwise
    /// ([`HttpState::with_auth`]).
    pub fn new(submitter: Submitter, metrics: Metrics) -> HttpState {
        HttpState {
            admission: Admission::new(&submitter.limits),
            auth: Authenticator::optional(submitter.store.clone()),
            submitter,
            metrics,
            liveness: Liveness::without_engine(),
        }
    }

    /// For a process that also runs the engine (standalone).
    pub fn with_liveness(mut self, liveness: Liveness) -> HttpState {
        self.liveness = liveness;
        self
    }

    pub fn with_auth(mut self, auth: Authenticator) -> HttpState {
        self.auth = auth;
        self
    }

    pub fn with_admission(mut self, admission: Admission) -> HttpState {
        self.admission = admission;
        self
    }
}

/// Status of a job as clients see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub attempts: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where the result is, once `Succeeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_url: Option<String>,
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> Self {
        JobView {
            id: job.id.to_string(),
            status: job.status,
            attempts: job.attempts,
            created_at_ms: job.created_at_ms,
            updated_at_ms: job.updated_at_ms,
            error: job.error.clone().filter(|_| job.status.is_terminal()),
            result_url: (job.status == JobStatus::Succeeded)
                .then(|| format!("/v1/jobs/{}/result", job.id)),
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable.
    pub code: String,
    /// For people.
    pub message: String,
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
            },
        }),
    )
        .into_response()
}

impl IntoResponse for SubmitError {
    fn into_response(self) -> Response {
        match &self {
            SubmitError::Input(input) => error(
                StatusCode::from_u16(input.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
                input.code(),
                input.to_string(),
            ),
            SubmitError::KeyReusedWithOtherPayload => error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                self.to_string(),
            ),
            SubmitError::KeyInFlight => error(
                StatusCode::CONFLICT,
                "idempotency_key_in_flight",
                self.to_string(),
            ),
            SubmitError::BadKey => error(
                StatusCode::BAD_REQUEST,
                "bad_idempotency_key",
                self.to_string(),
            ),
            SubmitError::QuotaExceeded { .. } => retry_soon(error(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                self.to_string(),
            )),
            SubmitError::RateLimiterDown => retry_soon(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "rate_limiter_unavailable",
                self.to_string(),
            )),
            SubmitError::RateLimited { retry_after } => {
                let mut response = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    self.to_string(),
                );
                if let Ok(seconds) =
                    HeaderValue::from_str(&retry_after.as_secs().max(1).to_string())
                {
                    response.headers_mut().insert(header::RETRY_AFTER, seconds);
                }
                response
            }
            SubmitError::Store(_) | SubmitError::Blob(_) | SubmitError::Internal(_) => {
                tracing::error!(error = %self, "submission failed");
                retry_soon(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the job could not be stored; retry later",
                ))
            }
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let code = match &self {
            AuthError::Missing => "unauthenticated",
            AuthError::Invalid => "invalid_key",
            AuthError::Unavailable(err) => {
                tracing::error!(error = %err, "checking an API key failed");
                return retry_soon(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    self.to_string(),
                ));
            }
        };
        let mut response = error(StatusCode::UNAUTHORIZED, code, self.to_string());
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}

/// The caller's tenant, or the answer that refuses it.
async fn caller(state: &HttpState, headers: &HeaderMap) -> Result<Tenant, Response> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    state
        .auth
        .authenticate(authorization)
        .await
        .map_err(IntoResponse::into_response)
}

pub fn router(state: HttpState) -> Router {
    // Multipart framing adds a little to the image itself.
    let body_limit = state.submitter.limits.max_body_bytes + FRAMING_BYTES;
    Router::new()
        .route("/v1/jobs", post(create_job))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/result", get(get_result))
        .route("/livez", get(live))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(title = "OCR serving API", description = "Asynchronous OCR jobs"),
    paths(create_job, get_job, get_result),
    components(schemas(JobView, JobStatus, ErrorBody, ErrorDetail)),
    modifiers(&BearerKeys),
    security(("api_key" = []))
)]
pub struct ApiDoc;

/// `Authorization: Bearer <key>` in the OpenAPI document.
struct BearerKeys;

impl utoipa::Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "api_key",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// Submit an image for OCR.
#[utoipa::path(
    post,
    path = "/v1/jobs",
    request_body(content = Vec<u8>, description = "The image: a raw body (image/png, image/jpeg, image/tiff, image/webp, image/bmp) or multipart/form-data with one file part", content_type = "image/png"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Same key and body (for this tenant): the same job; same key, other body: 422"),
    ),
    responses(
        (status = 202, description = "Accepted; poll the Location", body = JobView),
        (status = 401, description = "No key where keys are required, or a key that is not valid", body = ErrorBody),
        (status = 429, description = "Rate limited, or the tenant's quota of unfinished jobs is reached (code quota_exceeded); retry after Retry-After", body = ErrorBody),
        (status = 409, description = "The same Idempotency-Key is still in flight", body = ErrorBody),
        (status = 413, description = "Body or image too large", body = ErrorBody),
        (status = 415, description = "Unsupported content type", body = ErrorBody),
        (status = 422, description = "Not a readable image, or key reused with another body", body = ErrorBody),
        (status = 408, description = "The body did not arrive within limits.body_timeout_ms", body = ErrorBody),
        (status = 503, description = "Storage unavailable, or the server is at its limit of submissions or buffered bytes (code overloaded); retry after Retry-After", body = ErrorBody),
    )
)]
async fn create_job(State(state): State<HttpState>, request: Request) -> Response {
    let started = Instant::now();
    let declared_len = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let _admitted = match state.admission.try_admit(declared_len) {
        Ok(admitted) => admitted,
        Err(overloaded) => {
            state.metrics.submitted("shed", started.elapsed());
            return overloaded.into_response();
        }
    };
    let headers = request.headers().clone();
    let tenant = match caller(&state, &headers).await {
        Ok(tenant) => tenant,
        Err(refused) => {
            state.metrics.submitted("rejected", started.elapsed());
            return refused;
        }
    };
    let idempotency_key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_owned));
    let idempotency_key = match idempotency_key.transpose() {
        Ok(key) => key,
        Err(_) => return SubmitError::BadKey.into_response(),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // Only the upload is timed: once the job is being stored, an answer
    // other than its outcome would make the client submit it twice.
    let body_timeout = state.submitter.limits.body_timeout();
    let (body, content_type) =
        match tokio::time::timeout(body_timeout, read_body(&state, request, content_type)).await {
            Ok(Ok(body)) => body,
            Ok(Err(response)) => return response,
            Err(_) => {
                state.metrics.submitted("rejected", started.elapsed());
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("the request body did not arrive within {body_timeout:?}"),
                );
            }
        };
    let outcome = state
        .submitter
        .submit(Submission {
            tenant,
            idempotency_key,
            content_type,
            body,
        })
        .await;
    let label = match &outcome {
        Ok(Submitted::Created(_)) => "created",
        Ok(Submitted::Replayed(_)) => "replayed",
        Err(_) => "rejected",
    };
    state.metrics.submitted(label, started.elapsed());
    match outcome {
        Ok(submitted) => {
            let job = submitted.job();
            let mut response = (StatusCode::ACCEPTED, Json(JobView::from(job))).into_response();
            let headers = response.headers_mut();
            if let Ok(location) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
                headers.insert(header::LOCATION, location);
            }
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            if matches!(submitted, Submitted::Replayed(_)) {
                headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            response
        }
        Err(err) => err.into_response(),
    }
}

impl IntoResponse for Overloaded {
    fn into_response(self) -> Response {
        retry_soon(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            self.to_string(),
        ))
    }
}

/// The image and its content type, from a raw or a multipart body.
async fn read_body(
    state: &HttpState,
    request: Request,
    content_type: String,
) -> Result<(bytes::Bytes, String), Response> {
    let limit = state.submitter.limits.max_body_bytes;
    if content_type.starts_with("multipart/form-data") {
        read_multipart(request, state, limit).await
    } else {
        match to_bytes(request.into_body(), limit).await {
            Ok(body) => Ok((body, content_type)),
            Err(_) => Err(too_large(limit)),
        }
    }
}

fn too_large(limit: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the body exceeds the limit of {limit} bytes"),
    )
}

/// The first file part of a multipart upload, with its own content type.
async fn read_multipart(
    request: Request<Body>,
    state: &HttpState,
    limit: usize,
) -> Result<(bytes::Bytes, String), Response> {
    let bad = |message: String| error(StatusCode::BAD_REQUEST, "bad_multipart", message);
    let mut multipart = Multipart::from_request(request, state)
        .await
        .map_err(|e| bad(e.body_text()))?;
    loop {
        let field = multipart.next_field().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(limit)
            } else {
                bad(e.body_text())
            }
        })?;
        let Some(field) = field else {
            return Err(error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "empty_body",
                "the multipart body has no file part",
            ));
        };
        if field.file_name().is_none() && field.name() != Some("file") {
            continue;
        }
        let content_type = field.content_type().unwrap_or("").to_owned();
        let bytes = field.bytes().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large(limit)
            } else {
                bad(e.body_text())
            }
        })?;
        return Ok((bytes, content_type));
    }
}

/// A path id that is not a job id.
struct BadJobId(String);

impl IntoResponse for BadJobId {
    fn into_response(self) -> Response {
        error(
            StatusCode::BAD_REQUEST,
            "bad_job_id",
            format!("{:?} is not a job id", self.0),
        )
    }
}

fn parse_id(id: &str) -> Result<JobId, BadJobId> {
    id.parse().map_err(|_| BadJobId(id.to_owned()))
}

fn not_found(id: JobId) -> Response {
    error(StatusCode::NOT_FOUND, "not_found", format!("no job {id}"))
}

fn unavailable(err: impl std::fmt::Display) -> Response {
    tracing::error!(error = %err, "reading a job failed");
    retry_soon(error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the job store is unavailable; retry later",
    ))
}

/// Adds `Retry-After: 1`: an outage answer a client should retry.
fn retry_soon(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// A job's status.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, body = JobView),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
    )
)]
async fn get_job(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match own_job(&state, &headers, &id).await {
        Ok(job) => Json(JobView::from(&job)).into_response(),
        Err(refused) => refused,
    }
}

/// The job `id` if it belongs to the caller's tenant. Another tenant's job
/// is answered exactly like a missing one, so ids reveal nothing.
async fn own_job(state: &HttpState, headers: &HeaderMap, id: &str) -> Result<Job, Response> {
    let tenant = caller(state, headers).await?;
    let id = parse_id(id).map_err(IntoResponse::into_response)?;
    match state.submitter.store.get(id).await {
        Ok(Some(job)) if job.client_id == tenant.as_str() => Ok(job),
        Ok(_) => Err(not_found(id)),
        Err(err) => Err(unavailable(err)),
    }
}

/// A finished job's result: the page with its lines, confidences and polygons.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/result",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The recognised page", content_type = "application/json"),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such job for this tenant", body = ErrorBody),
        (status = 409, description = "Not finished, or failed", body = ErrorBody),
    )
)]
async fn get_result(
    State(state): State<HttpState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let job = match own_job(&state, &headers, &id).await {
        Ok(job) => job,
        Err(refused) => return refused,
    };
    match (job.status, job.result) {
        (JobStatus::Succeeded, Some(result)) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            result,
        )
            .into_response(),
        (status, _) if status.is_terminal() => error(
            StatusCode::CONFLICT,
            "job_failed",
            format!(
                "job is {status}: {}",
                job.error.unwrap_or_else(|| "no reason recorded".into())
            ),
        ),
        (status, _) => retry_soon(error(
            StatusCode::CONFLICT,
            "not_finished",
            format!("job is {status}; retry later"),
        )),
    }
}

/// How long `/readyz` asks the broker: probes time out after 1 s by
/// default, and a metadata request to a broker that is down can take 3 s.
const QUEUE_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// Ready when the database answers: it is the source of truth, so the API
/// accepts jobs and answers reads while the broker is down (the jobs are
/// published once it is back). The broker's state is in the body.
async fn ready(State(state): State<HttpState>) -> Response {
    let db = state.submitter.store.ping().await;
    let queue = match tokio::time::timeout(QUEUE_CHECK, state.submitter.publisher.check()).await {
        Ok(Ok(())) => "queue: reachable".to_owned(),
        Ok(Err(err)) => format!("queue: {err}; accepted jobs are published once it is back"),
        Err(_) => format!(
            "queue: no answer within {QUEUE_CHECK:?}; accepted jobs are published once it is back"
        ),
    };
    match db {
        Ok(()) => format!("ready ({queue})").into_response(),
        Err(err) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("database: {err}; {queue}"),
        ),
    }
}

/// Fails when the process is stuck (see [`crate::health`]); readiness is
/// separate: a live API may still be waiting for its database.
async fn live(State(state): State<HttpState>) -> Response {
    match state.liveness.check() {
        Ok(()) => "ok".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}
