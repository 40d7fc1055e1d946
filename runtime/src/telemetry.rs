//! Logs and traces.
//!
//! Logs: `RUST_LOG` filters, `OCR_LOG_FORMAT=json` for machines.
//!
//! Traces: OpenTelemetry spans exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (off otherwise; the other standard
//! `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*` variables tune the exporter, and
//! `OTEL_SERVICE_NAME` defaults to `ocr-<role>`). One job is one trace across
//! processes: the API's accept span is its root, and its context travels in
//! the `traceparent` header of the job message to the worker, and from the
//! worker's span in the result event's header to the writer.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::queue::HEADER_TRACEPARENT;

/// Turns trace export on; the exporter reads the address itself.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
pub const SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";
/// Only this crate's spans are exported: the libraries' own (HTTP, SQL,
/// Kafka) would be many and say little about a job.
const TRACED_TARGET: &str = "ocr_runtime";

/// Keeps the trace exporter; [`Telemetry::shutdown`] sends what is buffered.
#[must_use = "call shutdown() before exiting, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exports_traces(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The batch processor's shutdown blocks until its thread has exported.
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "flushing traces at exit failed"),
            Err(err) => tracing::warn!(error = %err, "flushing traces at exit failed"),
        }
    }
}

/// Where log lines go: servers log to stdout (what container runtimes
/// collect); tools log to stderr, so their stdout is only their output
/// (`keys create | tail -1` is the key, `lag --json` is JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    Stdout,
    Stderr,
}

/// Installs the log subscriber and, when an OTLP endpoint is set, the trace
/// exporter. `role` names the service (`ocr-<role>`) unless
/// `OTEL_SERVICE_NAME` does. Must run inside the Tokio runtime (the gRPC
/// exporter's connection lives on it).
pub fn init(role: &str, log_to: LogTo) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let json = std::env::var(ocr_contract::env::LOG_FORMAT).is_ok_and(|v| v == "json");
    let writer = match log_to {
        LogTo::Stdout => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout),
        LogTo::Stderr => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let logs = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(writer);
    let logs = if json {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let (provider, problem) = match otlp_provider(role) {
        Ok(provider) => (provider, None),
        Err(problem) => (None, Some(problem)),
    };
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("ocr-runtime"))
            .with_filter(Targets::new().with_target(TRACED_TARGET, tracing::Level::INFO))
    });
    // A second init (tests) is harmless; ignore its error.
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    if let Some(problem) = problem {
        tracing::warn!(%problem, "traces are not exported");
    }
    Telemetry { provider }
}

fn otlp_provider(role: &str) -> Result<Option<SdkTracerProvider>, String> {
    let Some(endpoint) = non_empty_env(OTLP_ENDPOINT_ENV) else {
        return Ok(None);
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|err| format!("the OTLP exporter for {endpoint}: {err}"))?;
    let service = non_empty_env(SERVICE_NAME_ENV).unwrap_or_else(|| format!("ocr-{role}"));
    let resource = Resource::builder().with_service_name(service).build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The W3C `traceparent` of the current span, when spans are exported.
pub fn current_traceparent() -> Option<String> {
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(HEADER_TRACEPARENT)
}

/// Makes a new `span` the child of the remote span a message's `traceparent`
/// names, so the work on the message joins the producer's trace. Call it
/// before the span is first entered.
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([(HEADER_TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    if parent.span().span_context().is_valid() {
        // Fails only when spans are not exported, or the span already started.
        let _ = span.set_parent(parent);
    }
}

/// Links a new `span` to `other` (a job's span to the batch it was inferred in).
pub fn link(span: &Span, other: &Span) {
    let context = other.context();
    span.add_link(context.span().span_context().clone());
}
