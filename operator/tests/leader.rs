//! Leader election against the in-memory API server.

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use ocr_operator::leader::LeaseLock;
use serde_json::json;
use support::FakeApi;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

#[tokio::test]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    let fake = FakeApi::default();
    let client = fake.client();
    let api: Api<Lease> = Api::namespaced(client, "ops");
    let a = LeaseLock::new(
        api.clone(),
        "ocr-operator-leader",
        "a",
        Duration::from_secs(15),
    );
    let b = LeaseLock::new(api, "ocr-operator-leader", "b", Duration::from_secs(15));

    assert!(a.try_acquire().await.expect("a creates the lease"));
    assert!(!b.try_acquire().await.expect("b sees a live lease"));
    assert!(a.try_acquire().await.expect("a renews"));
    let lease = fake.get(LEASES, "ocr-operator-leader").expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "a");

    // a stops renewing: its last renewal is a minute old.
    fake.update(LEASES, "ocr-operator-leader", |l| {
        l["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
    });
    assert!(b.try_acquire().await.expect("b takes over"));
    let lease = fake.get(LEASES, "ocr-operator-leader").expect("lease");
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    assert!(!a.try_acquire().await.expect("a learns it lost"));
}

#[tokio::test]
async fn a_concurrent_update_makes_the_round_fail_not_both_win() {
    let fake = FakeApi::default();
    let api: Api<Lease> = Api::namespaced(fake.client(), "ops");
    let a = LeaseLock::new(api, "ocr-operator-leader", "a", Duration::from_secs(15));
    fake.insert(
        LEASES,
        json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "ocr-operator-leader", "resourceVersion": "1"},
            "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 15,
                     "renewTime": "2020-01-01T00:00:00.000000Z"},
        }),
    );
    fake.race_after_next_get(LEASES, "ocr-operator-leader");
    assert!(
        !a.try_acquire().await.expect("a conflict is not an error"),
        "the lease changed under us: this round is lost"
    );
    let log = fake.log();
    assert_eq!(log.last().map(|r| r.method.as_str()), Some("PUT"));
    assert!(
        a.try_acquire().await.expect("next round"),
        "the expired lease is taken on retry"
    );
}
