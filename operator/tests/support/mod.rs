//! An in-memory Kubernetes API server behind `tower_test::mock::pair()`.
//!
//! Unlike a strictly scripted verifier it keeps objects between requests, so a
//! test can run several reconciles (create → roll out → migrate → delete) and
//! then assert on the request log and on the stored objects.

#![allow(dead_code)]

pub mod prometheus;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Option<Value>,
}

impl Recorded {
    /// `PATCH deployments/demo-worker` style summary for readable assertions.
    pub fn summary(&self) -> String {
        let parts: Vec<&str> = self.path.split('/').collect();
        let tail = match parts.iter().position(|p| *p == "namespaces") {
            Some(i) => parts[i + 2..].join("/"),
            None => self.path.clone(),
        };
        format!("{} {}", self.method, tail)
    }
}

#[derive(Default)]
struct State {
    /// collection path (`/apis/apps/v1/namespaces/ocr/deployments`) → name → object
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    log: Vec<Recorded>,
    next_version: u64,
    /// (collection, name): right after the next GET of it, another client updates it.
    race: Option<(String, String)>,
    /// (collection, name) → (code, reason, message): server-side applies of
    /// that object are refused, as an admission webhook or a quota would.
    refused: BTreeMap<(String, String), (u16, String, String)>,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

struct Target {
    collection: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Target {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (collection_len, rest) = match segments.iter().position(|s| *s == "namespaces") {
        Some(i) if segments.len() > i + 2 => (i + 3, &segments[i + 3..]),
        _ => {
            // cluster-scoped: /api/v1/<plural> or /apis/<group>/<version>/<plural>
            let len = if segments.first() == Some(&"api") {
                3
            } else {
                4
            };
            let len = len.min(segments.len());
            (len, &segments[len..])
        }
    };
    Target {
        collection: format!("/{}", segments[..collection_len].join("/")),
        name: rest.first().map(|s| s.to_string()),
        subresource: rest.get(1).map(|s| s.to_string()),
    }
}

/// The objects of a collection; a path without a namespace (`Api::all`)
/// gathers that resource from every namespace.
fn gather(objects: &BTreeMap<String, BTreeMap<String, Value>>, collection: &str) -> Vec<Value> {
    if collection.contains("/namespaces/") {
        return objects
            .get(collection)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
    }
    let plural = collection.rsplit('/').next().unwrap_or("");
    let prefix = collection.trim_end_matches(plural);
    objects
        .iter()
        .filter(|(key, _)| {
            key.starts_with(&format!("{prefix}namespaces/")) && key.ends_with(&format!("/{plural}"))
        })
        .flat_map(|(_, c)| c.values().cloned())
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

fn matches_selector(object: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
        let Some((k, v)) = term.split_once('=') else {
            return false;
        };
        object["metadata"]["labels"][k].as_str() == Some(v)
    })
}

fn status_response(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

/// Minimal RFC 6902 support for what kube's finalizer helper sends.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("patch is not an array")? {
        let path = op["path"].as_str().ok_or("op without path")?;
        let kind = op["op"].as_str().ok_or("op without op")?;
        let (parent_path, last) = path.rsplit_once('/').ok_or("bad path")?;
        match kind {
            "test" => {
                let current = target.pointer(path).cloned().unwrap_or(Value::Null);
                if current != op["value"] {
                    return Err(format!(
                        "test failed at {path}: {current} != {}",
                        op["value"]
                    ));
                }
            }
            "add" => {
                let parent = target.pointer_mut(parent_path).ok_or("missing parent")?;
                match parent {
                    Value::Object(map) => {
                        map.insert(last.to_string(), op["value"].clone());
                    }
                    Value::Array(items) if last == "-" => items.push(op["value"].clone()),
                    Value::Array(items) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        items.insert(i, op["value"].clone());
                    }
                    _ => return Err("add into a scalar".into()),
                }
            }
            "remove" => {
                let parent = target.pointer_mut(parent_path).ok_or("missing parent")?;
                match parent {
                    Value::Object(map) => {
                        map.remove(last);
                    }
                    Value::Array(items) => {
                        let i: usize = last.parse().map_err(|_| "bad index")?;
                        if i >= items.len() {
                            return Err("remove out of range".into());
                        }
                        items.remove(i);
                    }
                    _ => return Err("remove from a scalar".into()),
                }
            }
            other => return Err(format!("unsupported op {other}")),
        }
    }
    Ok(())
}

impl FakeApi {
    pub fn client(&self) -> Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let state = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let state = state.clone();
                // Concurrently, so that a held-open watch does not block other requests.
                tokio::spawn(async move {
                    let response = state.handle(request).await;
                    send.send_response(response);
                });
            }
        });
        Client::new(service, "default")
    }

    async fn handle(&self, request: Request<Body>) -> Response<Body> {
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(&bytes).expect("request bodies are JSON"))
        };
        let recorded = Recorded {
            method,
            path,
            query,
            content_type,
            body,
        };
        if query_param(&recorded.query, "watch").is_some_and(|w| w == "true" || w == "1") {
            // Every object changed since the requested version, as MODIFIED
            // events; then the stream ends and the watcher watches again.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let since: u64 = query_param(&recorded.query, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let collection = parse_path(&recorded.path).collection;
            let state = self.state.lock().expect("fake state");
            let mut lines = Vec::new();
            for object in gather(&state.objects, &collection) {
                let version: u64 = object["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if version > since {
                    let event = json!({"type": "MODIFIED", "object": object});
                    lines.extend(serde_json::to_vec(&event).expect("serializable"));
                    lines.push(b'\n');
                }
            }
            return Response::builder()
                .status(StatusCode::OK)
                .body(Body::from(lines))
                .expect("valid response");
        }
        let (code, value) = self.respond(&recorded);
        self.state.lock().expect("fake state").log.push(recorded);
        Response::builder()
            .status(StatusCode::from_u16(code).expect("valid status"))
            .header("content-type", "application/json")
            .body(Body::from(
                serde_json::to_vec(&value).expect("serializable"),
            ))
            .expect("valid response")
    }

    fn respond(&self, r: &Recorded) -> (u16, Value) {
        let target = parse_path(&r.path);
        let mut guard = self.state.lock().expect("fake state");
        let state = &mut *guard;
        state.next_version += 1;
        let version = state.next_version.to_string();
        let collection = state.objects.entry(target.collection.clone()).or_default();
        match (r.method.as_str(), target.name) {
            ("GET", None) => {
                let selector = query_param(&r.query, "labelSelector").unwrap_or_default();
                let gathered = gather(&state.objects, &target.collection);
                let items: Vec<Value> = gathered
                    .iter()
                    .filter(|o| matches_selector(o, &selector))
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "List",
                           "metadata": {"resourceVersion": version}, "items": items}),
                )
            }
            ("GET", Some(name)) => {
                let raced = state.race.as_ref() == Some(&(target.collection.clone(), name.clone()));
                match collection.get_mut(&name) {
                    Some(o) => {
                        let seen = o.clone();
                        if raced {
                            o["metadata"]["resourceVersion"] = json!(format!("{version}-raced"));
                            state.race = None;
                        }
                        (200, seen)
                    }
                    None => status_response(404, "NotFound", &format!("{name} not found")),
                }
            }
            ("POST", _) => {
                let mut object = r.body.clone().unwrap_or(Value::Null);
                let name = object["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                if collection.contains_key(&name) {
                    return status_response(409, "AlreadyExists", &format!("{name} exists"));
                }
                object["metadata"]["resourceVersion"] = json!(version);
                object["metadata"]["uid"] = json!(format!("uid-{name}"));
                collection.insert(name, object.clone());
                (201, object)
            }
            ("PUT", Some(name)) => {
                let mut object = r.body.clone().unwrap_or(Value::Null);
                let Some(existing) = collection.get(&name) else {
                    return status_response(404, "NotFound", &format!("{name} not found"));
                };
                if existing["metadata"]["resourceVersion"] != object["metadata"]["resourceVersion"]
                {
                    return status_response(409, "Conflict", "the object has been modified");
                }
                object["metadata"]["resourceVersion"] = json!(version);
                collection.insert(name, object.clone());
                (200, object)
            }
            ("PATCH", Some(name)) if r.content_type.contains("json-patch") => {
                let Some(existing) = collection.get_mut(&name) else {
                    return status_response(404, "NotFound", &format!("{name} not found"));
                };
                let mut patched = existing.clone();
                if let Err(e) = json_patch(&mut patched, r.body.as_ref().unwrap_or(&Value::Null)) {
                    return status_response(422, "Invalid", &e);
                }
                patched["metadata"]["resourceVersion"] = json!(version);
                *existing = patched.clone();
                (200, patched)
            }
            ("PATCH", Some(name)) if r.content_type.contains("apply-patch") => {
                if target.subresource.is_none() {
                    if let Some((code, reason, message)) = state
                        .refused
                        .get(&(target.collection.clone(), name.clone()))
                    {
                        return status_response(*code, reason, message);
                    }
                }
                let body = r.body.clone().unwrap_or(Value::Null);
                if target.subresource.as_deref() == Some("status") {
                    let Some(existing) = collection.get_mut(&name) else {
                        return status_response(404, "NotFound", &format!("{name} not found"));
                    };
                    existing["status"] = body["status"].clone();
                    existing["metadata"]["resourceVersion"] = json!(version);
                    return (200, existing.clone());
                }
                let mut object = body;
                let generation = match collection.get(&name) {
                    Some(old) if old["spec"] == object["spec"] => {
                        old["metadata"]["generation"].as_i64().unwrap_or(1)
                    }
                    Some(old) => old["metadata"]["generation"].as_i64().unwrap_or(1) + 1,
                    None => 1,
                };
                if let Some(old) = collection.get(&name) {
                    if !old["status"].is_null() {
                        object["status"] = old["status"].clone();
                    }
                }
                object["metadata"]["generation"] = json!(generation);
                object["metadata"]["resourceVersion"] = json!(version);
                object["metadata"]["uid"] = json!(format!("uid-{name}"));
                collection.insert(name, object.clone());
                (200, object)
            }
            ("DELETE", Some(name)) => match collection.remove(&name) {
                Some(o) => (200, o),
                None => status_response(404, "NotFound", &format!("{name} not found")),
            },
            _ => status_response(405, "MethodNotAllowed", &format!("{} {}", r.method, r.path)),
        }
    }

    pub fn insert(&self, collection: &str, object: Value) {
        let name = object["metadata"]["name"]
            .as_str()
            .expect("object has a name")
            .to_string();
        self.state
            .lock()
            .expect("fake state")
            .objects
            .entry(collection.to_string())
            .or_default()
            .insert(name, object);
    }

    /// Another actor (the kubelet, the garbage collector) removes an object.
    pub fn remove(&self, collection: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .expect("fake state")
            .objects
            .get_mut(collection)
            .and_then(|c| c.remove(name))
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.state
            .lock()
            .expect("fake state")
            .objects
            .get(collection)
            .and_then(|c| c.get(name))
            .cloned()
    }

    pub fn get_all(&self, collection: &str) -> Vec<Value> {
        self.state
            .lock()
            .expect("fake state")
            .objects
            .get(collection)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn update(&self, collection: &str, name: &str, f: impl FnOnce(&mut Value)) {
        let mut state = self.state.lock().expect("fake state");
        let object = state
            .objects
            .get_mut(collection)
            .and_then(|c| c.get_mut(name))
            .unwrap_or_else(|| panic!("{collection}/{name} exists"));
        f(object);
    }

    /// What the Deployment controller would report once every pod runs the template.
    pub fn roll_out(&self, namespace: &str, name: &str) {
        self.update(&deployments(namespace), name, |d| {
            let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
            let generation = d["metadata"]["generation"].clone();
            d["status"] = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "updatedReplicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
            });
        });
    }

    /// Server-side applies of `collection/name` fail with `code` until [`Self::accept_applies`].
    pub fn refuse_applies(
        &self,
        collection: &str,
        name: &str,
        code: u16,
        reason: &str,
        message: &str,
    ) {
        self.state.lock().expect("fake state").refused.insert(
            (collection.to_string(), name.to_string()),
            (code, reason.to_string(), message.to_string()),
        );
    }

    pub fn accept_applies(&self) {
        self.state.lock().expect("fake state").refused.clear();
    }

    /// Another client writes `name` between our next GET of it and whatever follows.
    pub fn race_after_next_get(&self, collection: &str, name: &str) {
        self.state.lock().expect("fake state").race =
            Some((collection.to_string(), name.to_string()));
    }

    pub fn log(&self) -> Vec<Recorded> {
        self.state.lock().expect("fake state").log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().expect("fake state").log.clear();
    }
}

pub fn deployments(namespace: &str) -> String {
    format!("/apis/apps/v1/namespaces/{namespace}/deployments")
}

pub fn pods(namespace: &str) -> String {
    format!("/api/v1/namespaces/{namespace}/pods")
}

/// A worker pod of the sample pipeline in `mode`, labelled as the worker
/// Deployment's pods are; `terminating`: it has a `deletionTimestamp` and is
/// still running (finishing its batch within its grace period).
pub fn worker_pod(name: &str, mode: &str, terminating: bool) -> Value {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {
                "app.kubernetes.io/name": "ocr",
                "app.kubernetes.io/instance": NAME,
                "app.kubernetes.io/component": "worker",
                "app.kubernetes.io/managed-by": "ocr-operator",
                "ocr.serving.dev/pipeline": NAME,
            },
        },
        "spec": {"containers": [{
            "name": "worker",
            "image": "ghcr.io/ocr-serving/ocr-runtime:0.1.0-cuda",
            "env": [{"name": "OCR_WORKER__MODE", "value": mode}],
        }]},
        "status": {"phase": "Running"},
    });
    if terminating {
        pod["metadata"]["deletionTimestamp"] = json!("2026-11-27T21:00:00Z");
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(60);
    }
    pod
}

pub fn pipelines(namespace: &str) -> String {
    format!("/apis/ocr.serving.dev/v1alpha1/namespaces/{namespace}/ocrpipelines")
}

pub const NAMESPACE: &str = "ocr";
pub const NAME: &str = "demo";

/// A pipeline as a user would write it, parsed so that serde defaults apply.
pub fn pipeline_json(architecture: &str) -> Value {
    json!({
        "apiVersion": "ocr.serving.dev/v1alpha1",
        "kind": "OcrPipeline",
        "metadata": {
            "name": NAME,
            "namespace": NAMESPACE,
            "uid": "7a1c1f2e-0000-4000-8000-000000000001",
            "generation": 1,
        },
        "spec": {
            "architecture": architecture,
            "model": {
                "variant": "v6-small",
                "device": "cuda",
                "source": {"url": "https://models.example.com/pp-ocr-v6-small.tar.gz"},
            },
            "api": {"replicas": 2},
            "worker": {
                "replicas": 3,
                "gpusPerPod": 1,
                "nodeSelector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "batching": {"maxBatchSize": 16, "maxWaitMs": 25},
            },
            "writer": {
                "replicas": 2,
                "webhook": {"url": "https://hooks.example.com/ocr", "secret": {"name": "ocr-webhook"}},
            },
            "kafka": {"bootstrapServers": "kafka-0.kafka:9092,kafka-1.kafka:9092", "partitions": 6},
            "database": {"secret": {"name": "ocr-mysql"}},
            "blob": {"s3": {
                "bucket": "ocr-blobs",
                "prefix": "demo",
                "endpoint": "http://minio.storage:9000",
                "region": "us-east-1",
                "credentialsSecret": "ocr-s3",
            }},
            "redis": {"secret": {"name": "ocr-redis", "key": "redis-url"}, "requestsPerMinute": 600},
            "autoscaling": {
                "api": {"minReplicas": 2, "maxReplicas": 6},
                "worker": {"minReplicas": 1, "maxReplicas": 20, "lagThreshold": 50},
            },
            "observability": {"otlpEndpoint": "http://otel-collector.observability:4317"},
        },
    })
}

pub fn pipeline(architecture: &str) -> ocr_operator::crd::OcrPipeline {
    serde_json::from_value(pipeline_json(architecture)).expect("the sample pipeline parses")
}
