//! OpenTelemetry traces across processes: the API, a worker in writer mode and
//! a writer, each a real `ocr-runtime` process exporting over OTLP/gRPC to a
//! receiver in this test, with MariaDB and a Kafka protocol broker
//! (librdkafka's mock cluster). One job must be one trace: the accept span in
//! the API is its root, the worker's job span a child of the API's publish
//! span, the writer's persist span a child of the worker's result publish.

mod common;

use common::{free_port, spawn_role, terminate, wait_for_status, wait_http_ok, MysqlDatabase};
use ocr_runtime::config::{Config, QueueKind};
use ocr_runtime::domain::JobStatus;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use rdkafka::mocking::MockCluster;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attribute(&self, key: &str) -> Option<String> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(Value::StringValue(s)) => Some(s.clone()),
                Some(Value::IntValue(i)) => Some(i.to_string()),
                Some(Value::BoolValue(b)) => Some(b.to_string()),
                _ => None,
            })
    }
}

/// The smallest OTLP/gRPC trace receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| Received {
                    service: service.clone(),
                    span,
                }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Receiver {
    async fn start(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the OTLP receiver");
        let addr = listener.local_addr().expect("its address");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn snapshot(&self) -> Vec<Received> {
        self.spans.lock().expect("lock").clone()
    }

    /// Waits until a span that `wanted` accepts has been exported.
    async fn wait_for(&self, what: &str, wanted: impl Fn(&Received) -> bool) -> Received {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(found) = self.snapshot().into_iter().find(&wanted) {
                return found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {what} was exported; received: {:#?}",
                self.snapshot()
                    .iter()
                    .map(|r| (&r.service, &r.span.name, hex(&r.span.trace_id)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the span named `name` that `service` exported in `trace`.
    async fn in_trace(&self, service: &str, name: &str, trace: &[u8]) -> Received {
        self.wait_for(
            &format!("{name} span from {service} in the job's trace"),
            |r| r.service == service && r.span.name == name && r.span.trace_id == trace,
        )
        .await
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_is_one_trace_across_api_worker_and_writer() {
    let kafka = MockCluster::new(1).expect("mock Kafka cluster");
    for topic in ["ocr.jobs", "ocr.results", "ocr.dead-letter"] {
        kafka.create_topic(topic, 1, 1).expect("a topic");
    }
    let db = MysqlDatabase::create().await;
    let store = db.store().await;
    let blobs = tempfile::tempdir().expect("a blob directory");
    let mut config = Config::default();
    config.database.url = db.url.clone();
    config.blob.url = blobs.path().display().to_string();
    config.queue.kind = QueueKind::Kafka;
    config.queue.brokers = kafka.bootstrap_servers();

    let receiver = Receiver::default();
    let endpoint = receiver.clone().start().await;
    let traced = |service: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.clone()),
            ("OTEL_SERVICE_NAME", service.to_owned()),
            // Export at once rather than every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let api_port = free_port();
    let api = spawn_role(&["api"], &config, api_port, &traced("test-api"));
    let mut worker_env = traced("test-worker");
    worker_env.push(("OCR_WORKER__MODE", "writer".to_owned()));
    let worker = spawn_role(&["worker"], &config, free_port(), &worker_env);
    let writer = spawn_role(&["writer"], &config, free_port(), &traced("test-writer"));
    let base = format!("http://127.0.0.1:{api_port}");
    wait_http_ok(&base, "/readyz", Duration::from_secs(60)).await;

    let id = common::submit_png(&base, common::INVOICE.to_vec()).await;
    wait_for_status(&store, id, JobStatus::Succeeded, Duration::from_secs(120)).await;

    // The API's accept span roots the trace and names the job.
    let accept = receiver
        .wait_for("the accept span of the job", |r| {
            r.span.name == "ocr.accept" && r.attribute("ocr.job.id") == Some(id.to_string())
        })
        .await;
    assert_eq!(accept.service, "test-api");
    assert!(
        accept.span.parent_span_id.is_empty(),
        "the accept span is the root"
    );
    let trace = accept.span.trace_id.clone();

    // Its stages are its children.
    let publish = receiver.in_trace("test-api", "ocr.publish", &trace).await;
    assert_eq!(publish.span.parent_span_id, accept.span.span_id);
    for stage in ["ocr.check", "ocr.blob.put", "ocr.db"] {
        let span = receiver.in_trace("test-api", stage, &trace).await;
        assert_eq!(span.span.parent_span_id, accept.span.span_id, "{stage}");
    }

    // The worker continues the trace from the message's header, and links the
    // job to the batch it was inferred in.
    let job = receiver.in_trace("test-worker", "ocr.job", &trace).await;
    assert_eq!(
        job.span.parent_span_id, publish.span.span_id,
        "the worker's job span is a child of the API's publish span"
    );
    assert_eq!(job.attribute("ocr.outcome").as_deref(), Some("succeeded"));
    let batch_link = job
        .span
        .links
        .first()
        .expect("the job span links to its batch");
    let batch = receiver
        .wait_for("the job's batch span", |r| {
            r.span.span_id == batch_link.span_id && r.span.name == "ocr.batch"
        })
        .await;
    assert_eq!(batch.service, "test-worker");
    let infer = receiver
        .wait_for("an inference span under the batch", |r| {
            r.span.name == "ocr.infer" && r.span.parent_span_id == batch.span.span_id
        })
        .await;
    assert_eq!(infer.attribute("ocr.batch.size").as_deref(), Some("1"));
    let result_publish = receiver
        .in_trace("test-worker", "ocr.publish_result", &trace)
        .await;
    assert_eq!(result_publish.span.parent_span_id, job.span.span_id);

    // The writer continues it from the result event's header.
    let persist = receiver
        .in_trace("test-writer", "ocr.persist", &trace)
        .await;
    assert_eq!(
        persist.span.parent_span_id, result_publish.span.span_id,
        "the writer's span is a child of the worker's result publish"
    );

    for child in [api, worker, writer] {
        let exit = terminate(child).await;
        assert!(exit.success(), "a role exited with {exit}");
    }
}
