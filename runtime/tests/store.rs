//! The job store against real MariaDB and SQLite: the same behaviour on both.

mod common;

use common::{sqlite_store, MysqlDatabase};
use ocr_runtime::domain::idempotency::HeldKey;
use ocr_runtime::domain::watermark::RelayId;
use ocr_runtime::domain::{JobId, JobStatus, NewJob, Transition};
use ocr_runtime::storage::jobs::Changes;
use ocr_runtime::storage::watermarks::RelayBeat;
use ocr_runtime::storage::{JobStore, StoreError};

fn new_job(key: Option<&str>) -> NewJob {
    let id = JobId::new();
    NewJob {
        id,
        client_id: "tenant-a".into(),
        input_key: format!("inputs/{id}"),
        content_type: "image/png".into(),
        input_sha256: "ab".repeat(32),
        input_bytes: 1234,
        idempotency: key.map(|key| HeldKey {
            key: key.to_owned(),
            reserved_at_ms: 1_000,
        }),
        relay: None,
    }
}

async fn transitions_are_compare_and_set(store: JobStore) {
    let job = new_job(None);
    store.insert(&job, 1_000).await.unwrap();
    let stored = store.get(job.id).await.unwrap().expect("inserted job");
    assert_eq!(stored.status, JobStatus::Accepted);
    assert_eq!(stored.attempts, 0);
    assert_eq!(stored.input_bytes, 1234);

    let queued = store
        .transition(
            job.id,
            JobStatus::Accepted,
            JobStatus::Queued,
            None,
            Changes::default(),
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(queued, Transition::Applied);
    // The same transition again finds the row already moved: nothing changes.
    let again = store
        .transition(
            job.id,
            JobStatus::Accepted,
            JobStatus::Queued,
            None,
            Changes::default(),
            3_000,
        )
        .await
        .unwrap();
    assert_eq!(again, Transition::Lost);
    assert_eq!(
        store.get(job.id).await.unwrap().unwrap().updated_at_ms,
        2_000
    );

    // Two workers claim the same attempt; exactly one wins.
    let claim = || Changes {
        count_attempt: true,
        ..Changes::default()
    };
    let first = store
        .transition(
            job.id,
            JobStatus::Queued,
            JobStatus::Processing,
            Some(0),
            claim(),
            4_000,
        )
        .await
        .unwrap();
    let second = store
        .transition(
            job.id,
            JobStatus::Queued,
            JobStatus::Processing,
            Some(0),
            claim(),
            4_000,
        )
        .await
        .unwrap();
    assert_eq!((first, second), (Transition::Applied, Transition::Lost));

    // A reclaim bumps the attempt; the first worker's late success then loses.
    let reclaim = store
        .transition(
            job.id,
            JobStatus::Processing,
            JobStatus::Processing,
            Some(1),
            claim(),
            5_000,
        )
        .await
        .unwrap();
    assert_eq!(reclaim, Transition::Applied);
    let late = store
        .transition(
            job.id,
            JobStatus::Processing,
            JobStatus::Succeeded,
            Some(1),
            Changes {
                result: Some("{\"text\":\"stale\"}".into()),
                ..Changes::default()
            },
            6_000,
        )
        .await
        .unwrap();
    assert_eq!(late, Transition::Lost);
    let done = store
        .transition(
            job.id,
            JobStatus::Processing,
            JobStatus::Succeeded,
            Some(2),
            Changes {
                result: Some("{\"text\":\"fresh\"}".into()),
                ..Changes::default()
            },
            7_000,
        )
        .await
        .unwrap();
    assert_eq!(done, Transition::Applied);
    let finished = store.get(job.id).await.unwrap().unwrap();
    assert_eq!(finished.status, JobStatus::Succeeded);
    assert_eq!(finished.attempts, 2);
    assert_eq!(finished.result.as_deref(), Some("{\"text\":\"fresh\"}"));

    let illegal = store
        .transition(
            job.id,
            JobStatus::Succeeded,
            JobStatus::Processing,
            None,
            Changes::default(),
            8_000,
        )
        .await;
    assert!(matches!(illegal, Err(StoreError::IllegalTransition { .. })));
}

async fn stale_jobs_are_listed_oldest_first(store: JobStore) {
    let old = new_job(None);
    let newer = new_job(None);
    let fresh = new_job(None);
    store.insert(&newer, 2_000).await.unwrap();
    store.insert(&old, 1_000).await.unwrap();
    store.insert(&fresh, 9_000).await.unwrap();
    let stale = store
        .ids_in_status(JobStatus::Accepted, 5_000, 10)
        .await
        .unwrap();
    assert_eq!(stale, vec![old.id, newer.id]);
    assert_eq!(store.count_in_status(JobStatus::Accepted).await.unwrap(), 3);
}

/// Concurrent submissions share statements (group commit): every row is
/// committed before its request returns, and a row that cannot be written
/// fails alone while its batch-mates are kept. The same for the Queued marks,
/// which share commits with new rows and never undo a worker's claim.
async fn concurrent_inserts_and_marks_share_statements_and_fail_alone(store: JobStore) {
    let taken = new_job(None);
    store.insert(&taken, 1_000).await.unwrap();
    let mut jobs: Vec<NewJob> = (0..300).map(|_| new_job(None)).collect();
    // The same id as a stored job: the primary key refuses it.
    let mut clash = new_job(None);
    clash.id = taken.id;
    clash.input_key = "inputs/someone-else".into();
    jobs.insert(150, clash);
    let inserts = jobs.iter().cloned().map(|job| {
        let store = store.clone();
        tokio::spawn(async move { store.insert(&job, 2_000).await })
    });
    let outcomes = futures::future::join_all(inserts).await;
    for (job, outcome) in jobs.iter().zip(outcomes) {
        let outcome = outcome.expect("insert task");
        if job.id == taken.id {
            assert!(outcome.is_err(), "a duplicate id must be refused");
        } else {
            outcome.unwrap_or_else(|e| panic!("job {} failed with its batch: {e}", job.id));
            let stored = store.get(job.id).await.unwrap().expect("committed row");
            assert_eq!(stored.input_key, job.input_key);
            assert_eq!(stored.status, JobStatus::Accepted);
        }
    }
    assert_eq!(
        store.get(taken.id).await.unwrap().unwrap().input_key,
        taken.input_key
    );
    assert_eq!(
        store.count_in_status(JobStatus::Accepted).await.unwrap(),
        301
    );

    // A worker claimed one job before its mark arrived: the mark leaves it.
    let claimed = jobs[0].id;
    store
        .transition(
            claimed,
            JobStatus::Accepted,
            JobStatus::Processing,
            None,
            Changes::default(),
            3_000,
        )
        .await
        .unwrap();
    let ids: Vec<JobId> = std::iter::once(taken.id)
        .chain(jobs.iter().map(|job| job.id).filter(|id| *id != taken.id))
        .collect();
    let marks = ids.iter().map(|id| {
        let store = store.clone();
        let id = *id;
        tokio::spawn(async move { store.mark_queued(id, 4_000).await })
    });
    // New submissions arrive meanwhile and share commits with the marks; one
    // of them clashes with a stored id, and neither the marks nor the other
    // inserts that shared its commit may fail with it.
    let mut second_wave: Vec<NewJob> = (0..100).map(|_| new_job(None)).collect();
    let mut clash = new_job(None);
    clash.id = jobs[1].id;
    clash.input_key = "inputs/someone-else".into();
    second_wave.insert(50, clash);
    let inserts = second_wave.iter().cloned().map(|job| {
        let store = store.clone();
        tokio::spawn(async move { store.insert(&job, 4_000).await })
    });
    let (marks, inserts) = tokio::join!(
        futures::future::join_all(marks),
        futures::future::join_all(inserts)
    );
    for mark in marks {
        mark.expect("mark task").expect("mark");
    }
    for (job, outcome) in second_wave.iter().zip(inserts) {
        let outcome = outcome.expect("insert task");
        assert_eq!(outcome.is_err(), job.id == jobs[1].id, "job {}", job.id);
    }
    assert_eq!(
        store.get(claimed).await.unwrap().unwrap().status,
        JobStatus::Processing
    );
    let first = store.get(jobs[1].id).await.unwrap().unwrap();
    assert_eq!(
        (first.status, first.input_key.as_str()),
        (JobStatus::Queued, jobs[1].input_key.as_str())
    );
    assert_eq!(store.count_in_status(JobStatus::Queued).await.unwrap(), 300);
    assert_eq!(
        store.count_in_status(JobStatus::Accepted).await.unwrap(),
        100
    );
}

async fn idempotency_keys_reserve_bind_and_release(store: JobStore) {
    let sha = "cd".repeat(32);
    assert!(store
        .reserve_key("c", "k1", &sha, 1_000)
        .await
        .unwrap()
        .is_none());
    let existing = store
        .reserve_key("c", "k1", &sha, 1_001)
        .await
        .unwrap()
        .expect("second reservation sees the first");
    assert_eq!(existing.job_id, None);
    assert_eq!(existing.created_at_ms, 1_000);
    // Keys are per client.
    assert!(store
        .reserve_key("other", "k1", &sha, 1_000)
        .await
        .unwrap()
        .is_none());

    assert!(store
        .take_over_key("c", "k1", &existing, 70_000)
        .await
        .unwrap());
    assert!(!store
        .take_over_key("c", "k1", &existing, 70_001)
        .await
        .unwrap());

    // The request that reserved at 1 000 was presumed dead and taken over at
    // 70 000: it can neither create its job nor free the key.
    let mut outlived = new_job(Some("k1"));
    outlived.client_id = "c".into();
    assert!(matches!(
        store.insert(&outlived, 2_000).await,
        Err(StoreError::KeyLost)
    ));
    assert_eq!(store.get(outlived.id).await.unwrap(), None, "rolled back");
    store
        .release_key("c", outlived.idempotency.as_ref().unwrap())
        .await
        .unwrap();
    let mut job = new_job(Some("k1"));
    job.client_id = "c".into();
    job.idempotency.as_mut().unwrap().reserved_at_ms = 70_000;
    // Inserting the job binds its key in the same transaction.
    store.insert(&job, 2_000).await.unwrap();
    let bound = store
        .reserve_key("c", "k1", &sha, 3_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bound.job_id, Some(job.id));
    // A bound key is never released.
    store
        .release_key("c", job.idempotency.as_ref().unwrap())
        .await
        .unwrap();
    assert!(store
        .reserve_key("c", "k1", &sha, 4_000)
        .await
        .unwrap()
        .is_some());

    assert!(store
        .reserve_key("c", "k2", &sha, 1_000)
        .await
        .unwrap()
        .is_none());
    let k2 = HeldKey {
        key: "k2".into(),
        reserved_at_ms: 1_000,
    };
    store.release_key("c", &k2).await.unwrap();
    assert!(store
        .reserve_key("c", "k2", &sha, 1_000)
        .await
        .unwrap()
        .is_none());

    // Keys expire by age, bound or not; an expired key is free again.
    assert_eq!(store.expire_keys(1_000).await.unwrap(), 0);
    assert_eq!(
        store.expire_keys(1_001).await.unwrap(),
        2,
        "other/k1 and c/k2"
    );
    assert!(store
        .reserve_key("c", "k2", &sha, 5_000)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .reserve_key("c", "k1", &sha, 5_000)
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.expire_keys(i64::MAX).await.unwrap(), 2);
    assert!(store
        .reserve_key("c", "k1", &sha, 6_000)
        .await
        .unwrap()
        .is_none());
}

/// A relay's jobs start `Queued`; once the relay falls silent, exactly its
/// jobs stamped after its watermark and no later than its recorded limit go
/// back to `Accepted` with their time kept, and the relay is forgotten
/// unless it beat again.
async fn a_silent_relays_unconfirmed_jobs_go_back_to_the_sweeper(store: JobStore) {
    let (dead, alive) = (RelayId(11), RelayId(22));
    let stamped = |relay: RelayId| {
        let mut job = new_job(None);
        job.relay = Some(relay);
        job
    };
    let dead_beat = RelayBeat {
        relay: dead,
        published_through: 1_000,
        heartbeat_at: 2_000,
        stamps_until: 3_000,
    };
    store.record_beat(dead_beat).await.unwrap();
    // The same beat again (MySQL reports rows it matched, not only changed),
    // and a late write of an older beat: the row keeps the latest.
    store.record_beat(dead_beat).await.unwrap();
    store
        .record_beat(RelayBeat {
            published_through: 900,
            heartbeat_at: 1_900,
            stamps_until: 2_900,
            ..dead_beat
        })
        .await
        .unwrap();
    let alive_beat = RelayBeat {
        relay: alive,
        published_through: 1_000,
        heartbeat_at: 9_000,
        stamps_until: 10_000,
    };
    store
        .record_beat(RelayBeat {
            heartbeat_at: 8_000,
            ..alive_beat
        })
        .await
        .unwrap();
    store.record_beat(alive_beat).await.unwrap();

    let covered = stamped(dead);
    let unconfirmed = stamped(dead);
    let last_moment = stamped(dead);
    let too_late = stamped(dead);
    let claimed = stamped(dead);
    let others = stamped(alive);
    for (job, stamp) in [
        (&covered, 1_000),
        (&unconfirmed, 1_500),
        (&last_moment, 3_000),
        (&too_late, 3_001),
        (&claimed, 1_600),
        (&others, 1_500),
    ] {
        store.insert(job, stamp).await.unwrap();
        let stored = store.get(job.id).await.unwrap().unwrap();
        assert_eq!(
            stored.status,
            JobStatus::Queued,
            "a relay's job starts Queued"
        );
    }
    store
        .transition(
            claimed.id,
            JobStatus::Queued,
            JobStatus::Processing,
            None,
            Changes::default(),
            1_700,
        )
        .await
        .unwrap();

    // Many more than one statement returns (a relay stuck behind a broker
    // outage for a while).
    let backlog: Vec<NewJob> = (0..1_100).map(|_| stamped(dead)).collect();
    let inserts = backlog.iter().cloned().enumerate().map(|(i, job)| {
        let store = store.clone();
        tokio::spawn(async move { store.insert(&job, 2_001 + (i % 999) as i64).await })
    });
    for inserted in futures::future::join_all(inserts).await {
        inserted.unwrap().unwrap();
    }

    assert_eq!(store.silent_relays(5_000).await.unwrap(), vec![dead_beat]);
    assert_eq!(
        store.return_unconfirmed_jobs(&dead_beat).await.unwrap(),
        2 + 1_100
    );
    assert_eq!(
        store.count_in_status(JobStatus::Accepted).await.unwrap(),
        2 + 1_100
    );
    for (job, status) in [
        (&covered, JobStatus::Queued),
        (&unconfirmed, JobStatus::Accepted),
        (&last_moment, JobStatus::Accepted),
        (&too_late, JobStatus::Queued),
        (&claimed, JobStatus::Processing),
        (&others, JobStatus::Queued),
    ] {
        assert_eq!(store.get(job.id).await.unwrap().unwrap().status, status);
    }
    let returned = store.get(unconfirmed.id).await.unwrap().unwrap();
    assert_eq!(returned.updated_at_ms, 1_500, "its waiting time is kept");
    assert_eq!(
        store
            .ids_in_status(JobStatus::Accepted, 2_000, 10)
            .await
            .unwrap(),
        vec![unconfirmed.id],
        "the sweeper finds it by its age"
    );

    // A relay that beat since it was listed is not forgotten.
    store
        .record_beat(RelayBeat {
            heartbeat_at: 2_500,
            ..dead_beat
        })
        .await
        .unwrap();
    assert!(!store.forget_relay(&dead_beat).await.unwrap());
    let latest = RelayBeat {
        heartbeat_at: 2_500,
        ..dead_beat
    };
    assert!(store.forget_relay(&latest).await.unwrap());
    assert!(store.silent_relays(i64::MAX).await.unwrap() == vec![alive_beat]);
}

#[tokio::test]
async fn mysql_silent_relays() {
    let db = MysqlDatabase::create().await;
    a_silent_relays_unconfirmed_jobs_go_back_to_the_sweeper(db.store().await).await;
}

#[tokio::test]
async fn sqlite_silent_relays() {
    let dir = tempfile::tempdir().unwrap();
    a_silent_relays_unconfirmed_jobs_go_back_to_the_sweeper(sqlite_store(dir.path()).await).await;
}

#[tokio::test]
async fn mysql_transitions_are_compare_and_set() {
    let db = MysqlDatabase::create().await;
    transitions_are_compare_and_set(db.store().await).await;
}

#[tokio::test]
async fn sqlite_transitions_are_compare_and_set() {
    let dir = tempfile::tempdir().unwrap();
    transitions_are_compare_and_set(sqlite_store(dir.path()).await).await;
}

#[tokio::test]
async fn mysql_stale_jobs_are_listed_oldest_first() {
    let db = MysqlDatabase::create().await;
    stale_jobs_are_listed_oldest_first(db.store().await).await;
}

#[tokio::test]
async fn sqlite_stale_jobs_are_listed_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    stale_jobs_are_listed_oldest_first(sqlite_store(dir.path()).await).await;
}

#[tokio::test]
async fn mysql_idempotency_keys() {
    let db = MysqlDatabase::create().await;
    idempotency_keys_reserve_bind_and_release(db.store().await).await;
}

#[tokio::test]
async fn sqlite_idempotency_keys() {
    let dir = tempfile::tempdir().unwrap();
    idempotency_keys_reserve_bind_and_release(sqlite_store(dir.path()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_concurrent_inserts_and_marks() {
    let db = MysqlDatabase::create().await;
    concurrent_inserts_and_marks_share_statements_and_fail_alone(db.store().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_concurrent_inserts_and_marks() {
    let dir = tempfile::tempdir().unwrap();
    concurrent_inserts_and_marks_share_statements_and_fail_alone(sqlite_store(dir.path()).await)
        .await;
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let db = MysqlDatabase::create().await;
    let store = db.store().await;
    store.migrate().await.expect("second migrate is a no-op");
}

/// Every API, worker and writer pod migrates at start, and a new pipeline starts them all
/// at once against an empty database: each must come up, none may find a migration "partially
/// applied" (MariaDB ignores sqlx's own lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_pods_migrating_a_fresh_database_together_all_succeed() {
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/mysql"))
        .expect("migrations folder")
        .count() as i64;
    for _ in 0..3 {
        let db = MysqlDatabase::create().await;
        let mut pods = Vec::new();
        for _ in 0..8 {
            pods.push(JobStore::connect(&db.url, 2).await.expect("connect"));
        }
        let results = futures::future::join_all(pods.iter().map(|pod| pod.migrate())).await;
        for (pod, result) in results.iter().enumerate() {
            assert!(result.is_ok(), "pod {pod} failed to migrate: {result:?}");
        }
        use sqlx::Connection;
        let mut conn = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
        let (applied, succeeded): (i64, i64) =
            sqlx::query_as("SELECT COUNT(*), CAST(SUM(success) AS SIGNED) FROM _sqlx_migrations")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(applied, migrations);
        assert_eq!(succeeded, migrations);
    }
}
