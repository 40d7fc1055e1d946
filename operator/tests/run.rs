//! `ocr-operator run` end to end on the in-memory API server: leader lease,
//! watches, reconcile of an existing pipeline, graceful shutdown.

mod support;

use std::time::Duration;

use ocr_operator::run::{run_with, KafkaAdminKind, RunOptions};
use support::{deployments, pipelines, FakeApi, NAME, NAMESPACE};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

#[tokio::test]
async fn run_takes_the_lease_and_reconciles_existing_pipelines() {
    let fake = FakeApi::default();
    fake.insert(&pipelines(NAMESPACE), support::pipeline_json("writer"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let (stop, stopped) = futures::channel::oneshot::channel::<()>();
    let operator = tokio::spawn(run_with(
        fake.client(),
        listener,
        RunOptions {
            http_addr: "127.0.0.1:0".parse().expect("address"),
            lease_namespace: "ops".into(),
            lease_name: "ocr-operator-leader".into(),
            identity: Some("test-replica".into()),
            // No Kafka here: the rdkafka adapter would wait for the brokers on every reconcile.
            kafka_admin: KafkaAdminKind::External,
        },
        async move {
            let _ = stopped.await;
        },
    ));

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

    let _ = stop.send(());
    let result = tokio::time::timeout(Duration::from_secs(10), operator)
        .await
        .expect("shuts down")
        .expect("task");
    assert!(result.is_ok(), "{result:?}");
}
