//! `ocr-operator run` end to end on the in-memory API server: leader lease,
//! watches, reconcile of an existing pipeline, graceful shutdown.

mod support;

use std::time::Duration;

use ocr_operator::run::{run_with, KafkaAdminKind, RunOptions};
use support::{deployments, pipelines, FakeApi, NAME, NAMESPACE};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

/// `run_with` on the fake API server, in a task, until [`Running::stop`].
struct Running {
    stop: futures::channel::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), ocr_operator::run::RunError>>,
}

impl Running {
    async fn start(fake: &FakeApi, watch_namespaces: Vec<String>) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let (stop, stopped) = futures::channel::oneshot::channel::<()>();
        let task = tokio::spawn(run_with(
            fake.client(),
            listener,
            RunOptions {
                http_addr: "127.0.0.1:0".parse().expect("address"),
                lease_namespace: "ops".into(),
                lease_name: "ocr-operator-leader".into(),
                identity: Some("test-replica".into()),
                // No Kafka here: the rdkafka adapter would wait for the brokers on every reconcile.
                kafka_admin: KafkaAdminKind::External,
                watch_namespaces,
            },
            async move {
                let _ = stopped.await;
            },
        ));
        Running { stop, task }
    }

    /// Stops the operator and checks that it shut down cleanly.
    async fn stop(self) {
        let _ = self.stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("shuts down")
            .expect("task");
        assert!(result.is_ok(), "{result:?}");
    }
}

#[tokio::test]
async fn run_takes_the_lease_and_reconciles_existing_pipelines() {
    let fake = FakeApi::default();
    fake.insert(&pipelines(NAMESPACE), support::pipeline_json("writer"));
    let operator = Running::start(&fake, Vec::new()).await;

    // The controller re-reconciles after the finalizer patch; wait for the objects.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let applied = fake
            .get(&deployments(NAMESPACE), &format!("{NAME}-writer"))
            .is_some();
        let status = fake
            .get(&pipelines(NAMESPACE), NAME)
            .map(|p| p["status"]["architecture"].clone());
        if applied && status.as_ref().is_some_and(|s| s == "writer") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconcile happened: {:?}",
            fake.log().iter().map(|r| r.summary()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lease = fake.get(LEASES, "ocr-operator-leader").expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "test-replica");

    operator.stop().await;
}

/// `--watch-namespaces`: only the listed namespaces' pipelines are
/// reconciled, and nothing is listed at cluster scope (where the operator
/// then has no rights: the chart grants them per namespace).
#[tokio::test]
async fn watch_namespaces_confines_the_operator_to_the_listed_namespaces() {
    let fake = FakeApi::default();
    fake.insert(&pipelines(NAMESPACE), support::pipeline_json("standard"));
    let mut elsewhere = support::pipeline_json("standard");
    elsewhere["metadata"]["namespace"] = serde_json::json!("elsewhere");
    elsewhere["metadata"]["uid"] = serde_json::json!("7a1c1f2e-0000-4000-8000-000000000009");
    fake.insert(&pipelines("elsewhere"), elsewhere);
    let operator = Running::start(&fake, vec![NAMESPACE.into()]).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fake
        .get(&pipelines(NAMESPACE), NAME)
        .map(|p| p["status"]["architecture"].clone())
        .is_none_or(|a| a != "standard")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the listed namespace was not reconciled: {:?}",
            fake.log().iter().map(|r| r.summary()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Unconfined, the other pipeline would have been reconciled by now too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fake.get_all(&deployments("elsewhere")).is_empty(),
        "a pipeline outside --watch-namespaces got objects"
    );
    let other = fake.get(&pipelines("elsewhere"), NAME).expect("pipeline");
    assert!(other["status"].is_null(), "{other}");
    assert!(other["metadata"]["finalizers"].is_null(), "{other}");
    let cluster_wide: Vec<String> = fake
        .log()
        .iter()
        .filter(|r| r.method == "GET" && !r.path.contains("/namespaces/"))
        .filter(|r| !r.path.contains("customresourcedefinitions"))
        .map(|r| r.summary())
        .collect();
    assert!(
        cluster_wide.is_empty(),
        "listed at cluster scope: {cluster_wide:?}"
    );

    operator.stop().await;
}
