//! The user's story on a real Kubernetes control plane (kube-apiserver,
//! controller-manager and scheduler v1.36 from `../shared/k8s`), with the
//! node agent running every pod as local processes, MariaDB, and
//! librdkafka's mock Kafka cluster hosted by this test (consumer groups with
//! several members, which pods rolling over need).
//!
//! The operator is installed from its Helm chart and runs as two pods with
//! the chart's ServiceAccount and RBAC; the pipeline's pods are the real
//! `ocr-runtime` processes. Each scenario prints what it checked and the
//! counts; `scripts/test.sh` runs them (see README: "Real-cluster scenarios").

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::ResourceExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ocr_e2e::scenario::{
    api_client, check_pods_admitted, check_queues, check_texts, committed_total, delete_pod,
    group_lag, messages_in, operator_leader, settle_jobs, submit, topics_on, wait_settled_admitted,
    wait_until, BrokerKind, Env, Load, PipelineRef, Report, Submitted, OPERATOR_NS,
};
use serde_json::json;

const NODE_AGENT: &str = env!("CARGO_BIN_EXE_ocr-e2e-node");
const NS: &str = "ocr";
const SETTLE: Duration = Duration::from_secs(240);

async fn environment(env: &Env) -> Result<PipelineRef> {
    env.install_operator().await?;
    env.prepare_namespace(NS)?;
    let pipeline = PipelineRef::new(NS, "ocr-e2e");
    env.create_topics(&pipeline)?;
    Ok(pipeline)
}

/// Creates the pipeline in its namespace, which enforces Pod Security
/// `restricted` (see `Env::prepare_namespace`): a pod the API server refuses
/// fails the scenario at once.
async fn create_pipeline(
    env: &Env,
    pipeline: &PipelineRef,
    architecture: &str,
    workers: u32,
    report: &mut Report,
) -> Result<f64> {
    env.plane
        .apply(&pipeline.manifest(architecture, &env.bootstrap_servers(), workers))?;
    let took = wait_settled_admitted(
        &env.client,
        pipeline,
        architecture,
        Duration::from_secs(180),
    )
    .await?;
    pipeline.check_queue_names(&env.client).await?;
    env.say(&format!(
        "pipeline {} runs {architecture} ({:.1} s)",
        pipeline.name,
        took.as_secs_f64()
    ));
    report
        .checks
        .push(check_pods_admitted(&env.client, pipeline).await?);
    Ok(took.as_secs_f64())
}

/// Runs a scenario on the mock broker with the default pipeline's namespace
/// and topics prepared; on failure, prints the cluster's state and the pods' logs.
async fn run<F, Fut>(name: &'static str, scenario: F)
where
    F: FnOnce(Env, PipelineRef) -> Fut,
    Fut: std::future::Future<Output = (Env, Result<Report>)>,
{
    run_on(name, BrokerKind::Mock, |env| async move {
        match environment(&env).await {
            Ok(pipeline) => scenario(env, pipeline).await,
            Err(e) => (env, Err(e.context("setting up"))),
        }
    })
    .await;
}

/// Runs a scenario that sets up its own pipelines on `broker`.
async fn run_on<F, Fut>(name: &'static str, broker: BrokerKind, scenario: F)
where
    F: FnOnce(Env) -> Fut,
    Fut: std::future::Future<Output = (Env, Result<Report>)>,
{
    let env = match Env::start(name, NODE_AGENT, broker).await {
        Ok(env) => env,
        Err(e) => panic!("{name}: starting the environment: {e:#}"),
    };
    let (env, outcome) = scenario(env).await;
    match outcome {
        Ok(report) => {
            report.print();
            report.assert_clean();
        }
        Err(e) => {
            env.dump();
            panic!("{name}: {e:#}");
        }
    }
}

async fn worker_modes(env: &Env, pipeline: &PipelineRef) -> Result<Vec<String>> {
    Ok(pipeline
        .pods(&env.client, "worker")
        .await?
        .iter()
        .map(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.env.as_ref())
                .and_then(|env| env.iter().find(|e| e.name == "OCR_WORKER__MODE"))
                .and_then(|e| e.value.clone())
                .unwrap_or_default()
        })
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_under_load_lose_and_duplicate_nothing() {
    run("migrations under load", |env, pipeline| async move {
        let outcome = migrations_under_load(&env, &pipeline).await;
        (env, outcome)
    })
    .await;
}

/// `e2e/scenarios/migrations.json`, the scenario `e2e/run.sh` runs on kind too.
#[derive(serde::Deserialize)]
struct MigrationScenario {
    name: String,
    start: String,
    workers: u32,
    steps: Vec<Step>,
    checks: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Step {
    to: String,
    #[serde(default)]
    revert_to: Option<String>,
    #[serde(default)]
    disrupt: Vec<String>,
}

async fn migrations_under_load(env: &Env, pipeline: &PipelineRef) -> Result<Report> {
    let scenario: MigrationScenario =
        serde_json::from_str(include_str!("../scenarios/migrations.json"))
            .context("e2e/scenarios/migrations.json")?;
    let mut report = Report {
        scenario: format!("{} (e2e/scenarios/migrations.json)", scenario.name),
        ..Report::default()
    };
    let took = create_pipeline(
        env,
        pipeline,
        &scenario.start,
        scenario.workers,
        &mut report,
    )
    .await?;
    report
        .migrations
        .push((format!("create ({})", scenario.start), took));

    let load = Load::start(env, pipeline, "load", 6.0).await?;
    wait_until(
        "the first jobs to be accepted",
        Duration::from_secs(60),
        || async { Ok(load.count() >= 10) },
    )
    .await?;

    let mut current = scenario.start.clone();
    for step in &scenario.steps {
        let started = Instant::now();
        pipeline.set_architecture(&env.client, &step.to).await?;
        let leader_before = operator_leader(&env.client).await?;
        if !step.disrupt.is_empty() || step.revert_to.is_some() {
            wait_until(
                "the migration to start",
                Duration::from_secs(60),
                || async { Ok(pipeline.status(&env.client).await?["migration"].is_object()) },
            )
            .await?;
        }
        for disruption in &step.disrupt {
            let done = disrupt(env, pipeline, disruption).await?;
            report
                .checks
                .push(format!("{current} → {}: {done}", step.to));
        }
        let settled_in = match &step.revert_to {
            Some(back) => {
                pipeline.set_architecture(&env.client, back).await?;
                report.checks.push(format!(
                    "{current} → {}: spec.architecture flipped back to {back} mid-migration",
                    step.to
                ));
                back.clone()
            }
            None => step.to.clone(),
        };
        pipeline
            .wait_settled(&env.client, &settled_in, Duration::from_secs(300))
            .await?;
        let label = match &step.revert_to {
            Some(back) => format!("{current} → {} reverted to {back}", step.to),
            None => format!("{current} → {}", step.to),
        };
        report
            .migrations
            .push((label, started.elapsed().as_secs_f64()));
        if step.disrupt.iter().any(|d| d == "delete-operator-leader") {
            let leader = operator_leader(&env.client).await?;
            anyhow::ensure!(
                leader != leader_before,
                "the Lease still names the deleted leader {leader_before}"
            );
            report.checks.push(format!(
                "the other operator replica, {leader}, took the Lease and finished the migration"
            ));
        }
        env.say(&format!("running {settled_in}"));
        current = settled_in;
    }

    let jobs = load.finish().await?;
    env.say(&format!("load stopped after {} jobs", jobs.len()));
    settle_jobs(env, &jobs, SETTLE, &mut report).await?;
    check_texts(env, pipeline, &jobs, 20, &mut report).await?;
    check_queues(env, pipeline, &mut report).await?;

    let workers = scenario.workers as usize;
    wait_until(
        "no writer pod and every worker in the final mode",
        Duration::from_secs(60),
        || async {
            let writers = pipeline.pods(&env.client, "writer").await?;
            let modes = worker_modes(env, pipeline).await?;
            let writer_left = current == "writer";
            Ok(writers.is_empty() != writer_left
                && modes.len() == workers
                && modes.iter().all(|m| *m == current))
        },
    )
    .await?;
    report.checks.push(format!(
        "{workers} worker pods, all in {current} mode; writer pods only if the final architecture is writer"
    ));
    for check in &scenario.checks {
        report.checks.push(format!("scenario check: {check}"));
    }
    Ok(report)
}

/// One disruption of `e2e/scenarios/migrations.json`, done for real.
async fn disrupt(env: &Env, pipeline: &PipelineRef, what: &str) -> Result<String> {
    let running =
        |pods: Vec<k8s_openapi::api::core::v1::Pod>| -> Vec<k8s_openapi::api::core::v1::Pod> {
            pods.into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect()
        };
    match what {
        "delete-worker-pod" => {
            let pods = running(pipeline.pods(&env.client, "worker").await?);
            let victim = pods.first().context("a running worker pod")?;
            delete_pod(&env.client, &pipeline.namespace, &victim.name_any()).await?;
            Ok(format!("worker pod {} deleted", victim.name_any()))
        }
        "kill-worker-pod" => {
            // A worker whose process runs (a pod of the new template may not
            // have started yet).
            let found = std::sync::Mutex::new(None);
            wait_until(
                "a running worker process",
                Duration::from_secs(60),
                || async {
                    let pods = running(pipeline.pods(&env.client, "worker").await?);
                    let process = pods.iter().rev().find_map(|p| {
                        let pid = env.node.pid(&p.uid().unwrap_or_default(), "worker").ok()?;
                        Some((p.name_any(), pid))
                    });
                    let seen = process.is_some();
                    if let Ok(mut slot) = found.lock() {
                        *slot = process;
                    }
                    Ok(seen)
                },
            )
            .await?;
            let (name, pid) = found
                .into_inner()
                .ok()
                .flatten()
                .context("a running worker process")?;
            kill(Pid::from_raw(pid), Signal::SIGKILL).context("SIGKILL a worker")?;
            Ok(format!("worker pod {name} SIGKILLed (pid {pid})"))
        }
        "delete-operator-leader" => {
            let leader = operator_leader(&env.client).await?;
            delete_pod(&env.client, OPERATOR_NS, &leader).await?;
            Ok(format!("operator leader {leader} deleted"))
        }
        other => anyhow::bail!("unknown disruption {other} in e2e/scenarios/migrations.json"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminating_writer_mode_worker_keeps_the_writer_until_its_result_is_persisted() {
    run("drain race", |env, pipeline| async move {
        let outcome = drain_race(&env, &pipeline).await;
        (env, outcome)
    })
    .await;
}

/// A writer-mode worker pod that is still terminating (here: frozen with
/// SIGSTOP in the middle of its batch, standing in for a slow batch) will
/// publish its result when it resumes. The writer must outlive it.
async fn drain_race(env: &Env, pipeline: &PipelineRef) -> Result<Report> {
    let mut report = Report {
        scenario:
            "writer → standard while a writer-mode worker is still terminating with a job in hand"
                .into(),
        ..Report::default()
    };
    create_pipeline(env, pipeline, "writer", 1, &mut report).await?;
    let http = api_client(None);
    let mut jobs = Vec::new();
    let warm_up = submit(&env.client, pipeline, &http, "warm-up").await?;
    jobs.push(ocr_e2e::scenario::Submitted {
        key: "warm-up".into(),
        id: warm_up,
    });
    settle_jobs(env, &jobs, Duration::from_secs(60), &mut Report::default()).await?;

    // Freeze the worker with the next job consumed but its result not yet published.
    let worker = pipeline
        .pods(&env.client, "worker")
        .await?
        .into_iter()
        .next()
        .context("a worker pod")?;
    let pid = env.node.pid(&worker.uid().unwrap_or_default(), "worker")?;
    let frozen = freeze_mid_job(env, pipeline, &http, pid, &mut jobs).await?;
    report.checks.push(format!(
        "worker {} frozen with job {} consumed and not yet published",
        worker.name_any(),
        frozen
    ));

    let started = Instant::now();
    pipeline.set_architecture(&env.client, "standard").await?;
    // Give the operator every chance to (wrongly) finish while the old pod is terminating.
    wait_until(
        "the new worker to be ready",
        Duration::from_secs(120),
        || async {
            let pods = pipeline.pods(&env.client, "worker").await?;
            Ok(pods.iter().any(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            }))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let writer_during = pipeline.pods(&env.client, "writer").await?.len();
    let status = pipeline.status(&env.client).await?;
    let phase = status["migration"]["phase"]
        .as_str()
        .unwrap_or("none")
        .to_owned();
    let old_pod_left = pipeline
        .pods(&env.client, "worker")
        .await?
        .iter()
        .any(|p| p.uid() == worker.uid());
    // The race: a writer-mode worker is still running (terminating, a job in
    // hand); whatever it publishes needs a writer.
    kill(Pid::from_raw(pid), Signal::SIGCONT).context("resuming the frozen worker")?;
    anyhow::ensure!(
        old_pod_left,
        "the frozen worker's pod was removed before it exited"
    );
    anyhow::ensure!(
        writer_during > 0,
        "the writer was removed (migration phase {phase}) while the writer-mode worker {} was still terminating with a job in hand",
        worker.name_any()
    );
    report.checks.push(format!(
        "15 s after the new worker was ready, with the old writer-mode worker still terminating: {writer_during} writer pod(s) kept, migration phase {phase}"
    ));
    wait_until(
        "the old worker to exit and its pod to go",
        Duration::from_secs(90),
        || async {
            let pods = pipeline.pods(&env.client, "worker").await?;
            Ok(!pods.iter().any(|p| p.uid() == worker.uid()))
        },
    )
    .await?;
    pipeline
        .wait_settled(&env.client, "standard", Duration::from_secs(300))
        .await?;
    report
        .migrations
        .push(("writer → standard".into(), started.elapsed().as_secs_f64()));

    settle_jobs(env, &jobs, Duration::from_secs(90), &mut report).await?;
    check_queues(env, pipeline, &mut report).await?;
    Ok(report)
}

/// Submits a job whose image takes the worker a second or two to decode
/// (a blank 6000×6000 page: small upload, 36 MP to decode) and SIGSTOPs the
/// worker as soon as it is busy with it (its CPU time climbs), i.e. with the
/// job consumed and its result not yet published. Returns the job's id.
async fn freeze_mid_job(
    env: &Env,
    pipeline: &PipelineRef,
    http: &reqwest::Client,
    pid: i32,
    jobs: &mut Vec<ocr_e2e::scenario::Submitted>,
) -> Result<String> {
    let page = ocr_e2e::scenario::blank_page(6000, 6000)?;
    let id = ocr_e2e::scenario::submit_image(&env.client, pipeline, http, "frozen", page).await?;
    jobs.push(ocr_e2e::scenario::Submitted {
        key: "frozen".into(),
        id: id.clone(),
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut window = std::collections::VecDeque::new();
    loop {
        let now = Instant::now();
        let ticks = cpu_ticks(pid)?;
        window.push_back((now, ticks));
        while window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_millis(100))
        {
            window.pop_front();
        }
        // 60 % of a core over 100 ms: decoding, not idling.
        if window.front().is_some_and(|(_, first)| ticks >= first + 6) {
            kill(Pid::from_raw(pid), Signal::SIGSTOP).context("freezing the worker")?;
            break;
        }
        anyhow::ensure!(now < deadline, "the worker never picked up the job");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let results =
        ocr_e2e::scenario::messages_in(&env.bootstrap_servers(), &pipeline.results_topic)?;
    env.say(&format!(
        "worker pid {pid} frozen mid-job; the results topic holds {results} message(s)"
    ));
    Ok(id)
}

fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime is 14th, stime 15th overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or(&stat);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleting_a_pipeline_waits_for_its_results_then_removes_everything() {
    run("deletion", |env, pipeline| async move {
        let outcome = deletion(&env, &pipeline).await;
        (env, outcome)
    })
    .await;
}

/// Two API replicas, then `autoscaling.api` switched on: the Deployment keeps
/// its 2 replicas (the operator stops applying the count, the HPA has not
/// acted: this cluster has no metrics API), not the default of 1.
async fn switch_api_autoscaling_on(
    env: &Env,
    pipeline: &PipelineRef,
    report: &mut Report,
) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &pipeline.namespace);
    let api_name = format!("{}-api", pipeline.name);
    let replicas = || async {
        let d = deployments.get(&api_name).await?;
        Ok::<_, anyhow::Error>(d.spec.and_then(|s| s.replicas))
    };
    let set = |spec: serde_json::Value| async move {
        pipeline
            .api(&env.client)
            .patch(
                &pipeline.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .context("patching the pipeline")
    };
    set(json!({"api": {"replicas": 2}})).await?;
    wait_until(
        "the API Deployment to ask for 2 replicas",
        Duration::from_secs(60),
        || async { Ok(replicas().await? == Some(2)) },
    )
    .await?;
    let patched =
        set(json!({"autoscaling": {"api": {"minReplicas": 1, "maxReplicas": 3}}})).await?;
    let generation = patched.metadata.generation;
    let hpas: Api<HorizontalPodAutoscaler> =
        Api::namespaced(env.client.clone(), &pipeline.namespace);
    wait_until(
        "the operator to apply autoscaling.api",
        Duration::from_secs(60),
        || async {
            let observed = pipeline.status(&env.client).await?["observedGeneration"].as_i64();
            Ok(observed >= generation && hpas.get_opt(&api_name).await?.is_some())
        },
    )
    .await?;
    // A few more reconciles (Deployment and HPA events trigger them).
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(replicas().await?);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::ensure!(
        seen.iter().all(|r| *r == Some(2)),
        "switching autoscaling.api on changed the API Deployment's replicas from 2: {seen:?}"
    );
    let pods = wait_settled_admitted(&env.client, pipeline, "writer", Duration::from_secs(60));
    pods.await?;
    report.checks.push(format!(
        "autoscaling.api switched on with 2 API replicas: the HPA exists and the Deployment kept 2 replicas over 5 s ({} samples)",
        seen.len()
    ));
    report
        .checks
        .push(check_pods_admitted(&env.client, pipeline).await?);
    Ok(())
}

async fn deletion(env: &Env, pipeline: &PipelineRef) -> Result<Report> {
    let mut report = Report {
        scenario: "deleting a writer pipeline with results still lagging".into(),
        ..Report::default()
    };
    create_pipeline(env, pipeline, "writer", 1, &mut report).await?;
    switch_api_autoscaling_on(env, pipeline, &mut report).await?;
    let writer = pipeline
        .pods(&env.client, "writer")
        .await?
        .into_iter()
        .next()
        .context("a writer pod")?;
    let writer_pid = env.node.pid(&writer.uid().unwrap_or_default(), "writer")?;
    kill(Pid::from_raw(writer_pid), Signal::SIGSTOP).context("freezing the writer")?;
    let http = api_client(None);
    let mut jobs = Vec::new();
    for n in 0..5 {
        let key = format!("before-delete-{n}");
        let id = submit(&env.client, pipeline, &http, &key).await?;
        jobs.push(ocr_e2e::scenario::Submitted { key, id });
    }
    let bootstrap = env.bootstrap_servers();
    wait_until(
        "results to wait for the frozen writer",
        Duration::from_secs(120),
        || async {
            Ok(group_lag(&bootstrap, &pipeline.writer_group, &pipeline.results_topic)? >= 5)
        },
    )
    .await?;
    pipeline
        .api(&env.client)
        .delete(&pipeline.name, &DeleteParams::default())
        .await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let held = pipeline
        .api(&env.client)
        .get_opt(&pipeline.name)
        .await?
        .is_some();
    let writer_kept = !pipeline.pods(&env.client, "writer").await?.is_empty();
    anyhow::ensure!(held && writer_kept, "the finalizer must hold the pipeline and its writer while 5 results lag (held {held}, writer {writer_kept})");
    report.checks.push("10 s after the delete, with 5 results lagging: the pipeline is held by its finalizer and the writer runs".into());
    kill(Pid::from_raw(writer_pid), Signal::SIGCONT).context("resuming the writer")?;
    wait_until(
        "the pipeline to be gone",
        Duration::from_secs(120),
        || async {
            Ok(pipeline
                .api(&env.client)
                .get_opt(&pipeline.name)
                .await?
                .is_none())
        },
    )
    .await?;
    wait_until(
        "every object the pipeline owned to be gone",
        Duration::from_secs(120),
        || async {
            let left = env.plane.kubectl(
                &[
                    "-n",
                    NS,
                    "get",
                    "deploy,rs,pods,svc,cm,pdb,hpa",
                    "-l",
                    &format!("app.kubernetes.io/instance={}", pipeline.name),
                    "-o",
                    "name",
                ],
                None,
            )?;
            Ok(left.trim().is_empty())
        },
    )
    .await?;
    report.checks.push("after the writer drained: the pipeline, its Deployments, ReplicaSets, pods, Services, ConfigMap and PDBs are gone".into());
    settle_jobs(env, &jobs, Duration::from_secs(60), &mut report).await?;
    check_queues(env, pipeline, &mut report).await?;
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pipelines_in_one_namespace_keep_their_jobs_apart() {
    run_on("two pipelines", BrokerKind::Tansu, |env| async move {
        let outcome = two_pipelines(&env).await;
        (env, outcome)
    })
    .await;
}

/// Two pipelines side by side in one namespace, on one broker (Tansu, so
/// the operator creates the topics itself) and one database, with no topic
/// or group named in their specs: each gets its own, neither consumes the
/// other's jobs, the names cannot be changed under them, and deleting one
/// with `deleteTopics` removes its topics and nothing of the other.
async fn two_pipelines(env: &Env) -> Result<Report> {
    let mut report = Report {
        scenario: "two pipelines in one namespace, one broker, one database".into(),
        ..Report::default()
    };
    env.install_operator().await?;
    env.prepare_namespace(NS)?;
    let alpha = PipelineRef::new(NS, "alpha");
    let beta = PipelineRef {
        delete_topics: true,
        ..PipelineRef::new(NS, "beta")
    };
    let bootstrap = env.bootstrap_servers();
    for pipeline in [&alpha, &beta] {
        env.plane
            .apply(&pipeline.manifest("standard", &bootstrap, 1))?;
    }
    for pipeline in [&alpha, &beta] {
        let took =
            wait_settled_admitted(&env.client, pipeline, "standard", Duration::from_secs(180))
                .await?;
        pipeline.check_queue_names(&env.client).await?;
        let created = pipeline.status(&env.client).await?["createdTopics"].clone();
        let expected = serde_json::json!([pipeline.dead_letter_topic, pipeline.jobs_topic]);
        anyhow::ensure!(
            created == expected,
            "{}: status.createdTopics is {created}, expected {expected}",
            pipeline.name
        );
        env.say(&format!(
            "pipeline {} runs standard on its own topics ({:.1} s)",
            pipeline.name,
            took.as_secs_f64()
        ));
    }
    report.checks.push(format!(
        "with no names in their specs, the pipelines got {} / {} and {} / {}; the operator created their topics",
        alpha.jobs_topic, alpha.worker_group, beta.jobs_topic, beta.worker_group
    ));

    let http = api_client(None);
    let per_pipeline = 4;
    let mut jobs: Vec<(&PipelineRef, Submitted)> = Vec::new();
    for n in 0..per_pipeline {
        for pipeline in [&alpha, &beta] {
            let key = format!("{}-{n}", pipeline.name);
            let id = submit(&env.client, pipeline, &http, &key).await?;
            jobs.push((pipeline, Submitted { key, id }));
        }
    }
    let mut all: Vec<Submitted> = jobs.iter().map(|(_, job)| job.clone()).collect();
    let mut first = Report::default();
    settle_jobs(env, &all, Duration::from_secs(180), &mut first).await?;
    anyhow::ensure!(
        first.succeeded == all.len(),
        "{} of {} jobs succeeded: {first:?}",
        first.succeeded,
        all.len()
    );
    for pipeline in [&alpha, &beta] {
        let own: Vec<Submitted> = jobs
            .iter()
            .filter(|(p, _)| p.name == pipeline.name)
            .map(|(_, job)| job.clone())
            .collect();
        check_texts(env, pipeline, &own, own.len(), &mut report).await?;
        check_queues(env, pipeline, &mut report).await?;
    }
    for (pipeline, other) in [(&alpha, &beta), (&beta, &alpha)] {
        let published = messages_in(&bootstrap, &pipeline.jobs_topic)?;
        let consumed = committed_total(&bootstrap, &pipeline.worker_group, &pipeline.jobs_topic)?;
        let crossed = committed_total(&bootstrap, &other.worker_group, &pipeline.jobs_topic)?;
        anyhow::ensure!(
            published == per_pipeline && consumed == per_pipeline && crossed == 0,
            "{}: {published} jobs published to {}, {consumed} consumed by {}, {crossed} by {} (expected {per_pipeline}, {per_pipeline}, 0)",
            pipeline.name, pipeline.jobs_topic, pipeline.worker_group, other.worker_group
        );
        report.checks.push(format!(
            "{}: {published} jobs on {}, all consumed by {}, none by {}",
            pipeline.name, pipeline.jobs_topic, pipeline.worker_group, other.worker_group
        ));
    }

    // The real apiserver enforces the CRD's transition rule.
    for patch in [
        serde_json::json!({"spec": {"kafka": {"consumerGroup": "beta.worker"}}}),
        serde_json::json!({"spec": {"kafka": {"topics": {"jobs": alpha.jobs_topic.clone() + "-2"}}}}),
    ] {
        let refused = alpha
            .api(&env.client)
            .patch(
                &alpha.name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await;
        match refused {
            Err(kube::Error::Api(status))
                if status.code == 422
                    && status.message.contains("cannot change on a live pipeline") => {}
            other => anyhow::bail!(
                "changing a queue name of a live pipeline ({patch}) must be refused, got {other:?}"
            ),
        }
    }
    report.checks.push("the apiserver refused a new consumerGroup and a new jobs topic on a live pipeline (CEL transition rule)".into());

    beta.api(&env.client)
        .delete(&beta.name, &DeleteParams::default())
        .await?;
    wait_until("beta to be gone", Duration::from_secs(120), || async {
        Ok(beta.api(&env.client).get_opt(&beta.name).await?.is_none())
    })
    .await?;
    let topics = topics_on(&bootstrap)?;
    let beta_prefix = format!("{NS}.{}.", beta.name);
    let beta_left: Vec<&String> = topics
        .iter()
        .filter(|t| t.starts_with(&beta_prefix))
        .collect();
    anyhow::ensure!(
        beta_left.is_empty(),
        "beta was deleted with deleteTopics but {beta_left:?} remain"
    );
    for topic in [&alpha.jobs_topic, &alpha.dead_letter_topic] {
        anyhow::ensure!(
            topics.contains(topic),
            "alpha's topic {topic} is gone: {topics:?}"
        );
    }
    report.checks.push(format!(
        "deleting beta (deleteTopics: true) removed its topics; alpha's remain ({})",
        topics.join(", ")
    ));

    // alpha still serves.
    let key = "alpha-after".to_string();
    let id = submit(&env.client, &alpha, &http, &key).await?;
    let after = [Submitted { key, id }];
    all.extend(after.iter().cloned());
    settle_jobs(env, &all, Duration::from_secs(120), &mut report).await?;
    check_texts(env, &alpha, &after, 1, &mut report).await?;
    report
        .checks
        .push("alpha still serves after beta is gone".into());
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_advisor_switches_on_measured_signals_and_loses_nothing() {
    run_on("automatic switches", BrokerKind::Mock, |env| async move {
        let outcome = automatic_switches(&env).await;
        (env, outcome)
    })
    .await;
}

/// `url` with its `host:port` replaced by `127.0.0.1:port`, and the
/// `host:port` it named.
fn through_port(url: &str, port: u16) -> Result<(String, String)> {
    let (scheme, rest) = url.split_once("://").context("a URL")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (credentials, address) = match authority.rsplit_once('@') {
        Some((credentials, address)) => (format!("{credentials}@"), address),
        None => (String::new(), authority),
    };
    Ok((
        format!("{scheme}://{credentials}127.0.0.1:{port}/{path}"),
        address.to_owned(),
    ))
}

/// The pipeline's advice and spec, as `(advice, spec, reason)`.
async fn advice_of(env: &Env, pipeline: &PipelineRef) -> Result<(String, String, String)> {
    let object = pipeline.api(&env.client).get(&pipeline.name).await?;
    let advice = &object.data["status"]["advice"];
    Ok((
        advice["architecture"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        object.data["spec"]["architecture"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        advice["reason"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// Waits until the advisor has switched the spec to `architecture` and the
/// migration to it is over; returns the reason the advice gave.
async fn switched_to(
    env: &Env,
    pipeline: &PipelineRef,
    architecture: &str,
    timeout: Duration,
) -> Result<(String, f64)> {
    let started = Instant::now();
    let reason = std::sync::Mutex::new(String::new());
    wait_until(
        &format!("the advisor to switch to {architecture}"),
        timeout,
        || async {
            let (advice, spec, why) = advice_of(env, pipeline).await?;
            if advice == architecture {
                if let Ok(mut reason) = reason.lock() {
                    if reason.is_empty() {
                        *reason = why;
                    }
                }
            }
            Ok(spec == architecture)
        },
    )
    .await?;
    pipeline
        .wait_settled(&env.client, architecture, Duration::from_secs(300))
        .await?;
    let reason = reason.into_inner().unwrap_or_default();
    env.say(&format!(
        "the advisor switched to {architecture} ({:.0} s): {reason}",
        started.elapsed().as_secs_f64()
    ));
    Ok((reason, started.elapsed().as_secs_f64()))
}

/// Issue 15's proof: `autoArchitecture: Apply` on a real control plane. A
/// CPU-saturated worker with a growing lag makes the advisor switch to
/// batched; once the load stops it returns to standard; a database slowed on
/// purpose (a latency-adding proxy in front of MariaDB) with a growing lag
/// makes it switch to writer; and back to standard when the load stops.
/// Every job submitted across the four automatic switches succeeds exactly once.
async fn automatic_switches(env: &Env) -> Result<Report> {
    let mut report = Report {
        scenario: "automatic architecture switches (autoArchitecture: Apply)".into(),
        ..Report::default()
    };
    env.install_operator().await?;
    env.prepare_namespace(NS)?;
    let (_, upstream) = through_port(&env.database.url, 0)?;
    let proxy = ocr_e2e::slow_proxy::SlowProxy::start(&upstream).await?;
    let (slow_url, _) = through_port(&env.database.url, proxy.port)?;
    // Every role of the pipeline reaches the database through the proxy.
    env.plane.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: ocr-mysql, namespace: {NS}}}\nstringData:\n  url: \"{slow_url}\"\n"
    ))?;
    let pipeline = PipelineRef::new(NS, "ocr-auto");
    env.create_topics(&pipeline)?;
    create_pipeline(env, &pipeline, "standard", 1, &mut report).await?;
    // The seed's rule with a CPU's margins (a 2-core machine shares its cores
    // with the control plane and every pod) and short waits, so the scenario
    // takes minutes, not hours.
    let auto = json!({ "spec": { "autoArchitecture": {
        "mode": "Apply",
        "batchedAtUtilizationPercent": 70,
        "writerBelowUtilizationPercent": 50,
        "idleUtilizationPercent": 25,
        "slowStoreMillis": 40,
        "lagGrowthPerMinute": 30,
        "idleLag": 5,
        "dwellSeconds": 15,
        "cooldownSeconds": 15,
    }}});
    pipeline
        .api(&env.client)
        .patch(
            &pipeline.name,
            &PatchParams::default(),
            &Patch::Merge(&auto),
        )
        .await
        .context("turning the advisor on")?;

    // 1. More jobs than one CPU worker can take: busy engine, growing lag.
    // 60/s: a worker alone on this 2-core machine keeps up with 20/s of these
    // one-line images at 45% busy once the API stops decoding uploads.
    let load = Load::start(env, &pipeline, "cpu", 60.0).await?;
    let (reason, took) = switched_to(env, &pipeline, "batched", Duration::from_secs(300)).await?;
    report
        .migrations
        .push(("standard → batched (automatic)".into(), took));
    report.checks.push(format!("advised batched: {reason}"));
    let mut jobs = load.finish().await?;
    env.say(&format!("load stopped after {} jobs", jobs.len()));

    // 2. Idle again: back to standard.
    let (reason, took) = switched_to(env, &pipeline, "standard", Duration::from_secs(420)).await?;
    report
        .migrations
        .push(("batched → standard (idle)".into(), took));
    report.checks.push(format!("advised standard: {reason}"));

    // 3. The database answers 60 ms late: the worker waits for it.
    proxy.set_delay(Duration::from_millis(60));
    let load = Load::start(env, &pipeline, "db", 12.0).await?;
    let (reason, took) = switched_to(env, &pipeline, "writer", Duration::from_secs(300)).await?;
    report
        .migrations
        .push(("standard → writer (slow database)".into(), took));
    report.checks.push(format!("advised writer: {reason}"));
    jobs.extend(load.finish().await?);
    env.say(&format!("load stopped after {} jobs in all", jobs.len()));

    // 4. Load over, database fast again: back to standard.
    proxy.set_delay(Duration::ZERO);
    let (reason, took) = switched_to(env, &pipeline, "standard", Duration::from_secs(420)).await?;
    report
        .migrations
        .push(("writer → standard (idle)".into(), took));
    report.checks.push(format!("advised standard: {reason}"));

    settle_jobs(env, &jobs, SETTLE, &mut report).await?;
    check_texts(env, &pipeline, &jobs, 20, &mut report).await?;
    check_queues(env, &pipeline, &mut report).await?;
    // The recorder folds repeats of one reason into a series: count them.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(env.client.clone(), NS);
    let switches: i32 = events
        .list(&Default::default())
        .await?
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("ArchitectureSwitched"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count))
        .sum();
    anyhow::ensure!(
        switches == 4,
        "{switches} ArchitectureSwitched events, expected 4"
    );
    report
        .checks
        .push(format!("{switches} ArchitectureSwitched events"));
    Ok(report)
}
