//! One pod's life on this node: volumes, init containers in order, the
//! containers with their probes and restart policy, graceful termination
//! (SIGTERM, up to the grace period, SIGKILL), and the final removal of the
//! pod object once every process has exited — never before, which is what
//! keeps a deleted pod's processes visible to the controllers, as on a real
//! kubelet.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::{Api, Client};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::{AgentConfig, ImageRule};
use super::env::{self, EnvSources};
use super::launch::{BindMount, LaunchSpec, User};
use super::probe::{self, Check, Streak};
use super::status::{ContainerRecord, Exit, PodRecord, State};
use super::volumes::{self, Prepared};

/// What every pod supervisor shares.
pub struct NodeContext {
    pub client: Client,
    pub config: AgentConfig,
    /// This program, re-executed as `launch SPEC` for each container.
    pub self_exe: PathBuf,
    pub api_host: String,
    pub api_port: u16,
    pub http: reqwest::Client,
}

/// The agent's handle on a running supervisor.
pub struct PodHandle {
    pub updates: watch::Sender<Pod>,
    /// Cancelled when the pod object is gone from the API (force deletion):
    /// the processes are killed at once.
    pub gone: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

struct Supervisor {
    node: Arc<NodeContext>,
    pods: Api<Pod>,
    name: String,
    namespace: String,
    uid: String,
    ip: Ipv4Addr,
    dir: PathBuf,
    record: Mutex<PodRecord>,
    /// Set once the pod has a deletionTimestamp (or is gone).
    terminating: CancellationToken,
    /// Seconds of grace once terminating; 0 when the pod object is gone.
    grace: Mutex<Duration>,
    changed: Notify,
}

fn now() -> Time {
    Time(Timestamp::now())
}

pub fn start(node: Arc<NodeContext>, pod: Pod, ip: Ipv4Addr) -> PodHandle {
    let (updates, receiver) = watch::channel(pod.clone());
    let gone = CancellationToken::new();
    let spec = pod.spec.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let dir = node
        .config
        .root
        .join("pods")
        .join(format!("{namespace}_{name}_{uid}"));
    let record = PodRecord {
        pod_ip: ip.to_string(),
        host_ip: "127.0.0.1".into(),
        start_time: now(),
        init: spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| {
                ContainerRecord::new(&c.name, c.image.as_deref().unwrap_or(""), "PodInitializing")
            })
            .collect(),
        containers: spec
            .containers
            .iter()
            .map(|c| {
                ContainerRecord::new(
                    &c.name,
                    c.image.as_deref().unwrap_or(""),
                    "ContainerCreating",
                )
            })
            .collect(),
        initialized: spec.init_containers.as_ref().is_none_or(|c| c.is_empty()),
        failed: false,
        transitions: vec![],
    };
    let supervisor = Arc::new(Supervisor {
        pods: Api::namespaced(node.client.clone(), &namespace),
        node,
        name,
        namespace,
        uid,
        ip,
        dir,
        record: Mutex::new(record),
        terminating: CancellationToken::new(),
        grace: Mutex::new(Duration::from_secs(30)),
        changed: Notify::new(),
    });
    let task = tokio::spawn(supervisor.run(receiver, gone.clone()));
    PodHandle {
        updates,
        gone,
        task,
    }
}

impl Supervisor {
    async fn run(self: Arc<Self>, updates: watch::Receiver<Pod>, gone: CancellationToken) {
        let pod = updates.borrow().clone();
        tokio::spawn(self.clone().watch_deletion(updates, gone.clone()));
        let publisher = tokio::spawn(self.clone().publish_loop());
        info!(pod = %self.key(), ip = %self.ip, "starting pod");

        let prepared = self.prepare_volumes(&pod).await;
        if let Some(volumes) = prepared {
            if self.run_init_containers(&pod, &volumes).await {
                let spec = pod.spec.clone().unwrap_or_default();
                let mut tasks = Vec::new();
                for (index, container) in spec.containers.iter().enumerate() {
                    let me = self.clone();
                    let (pod, container, volumes) =
                        (pod.clone(), container.clone(), volumes.clone());
                    tasks.push(tokio::spawn(async move {
                        me.run_container(&pod, index, &container, &volumes).await
                    }));
                }
                for task in tasks {
                    if let Err(error) = task.await {
                        warn!(pod = %self.key(), %error, "container task failed");
                    }
                }
            }
        }
        // Every process has exited. A pod that is not being deleted stays
        // (Succeeded or Failed); a deleted one is removed now.
        self.terminating.cancelled().await;
        self.mark_all_done();
        publisher.abort();
        let _ = self.publish().await;
        if !gone.is_cancelled() {
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match self.pods.delete(&self.name, &params).await {
                Ok(_) => info!(pod = %self.key(), "pod removed"),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(error) => warn!(pod = %self.key(), %error, "removing the pod"),
            }
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    async fn watch_deletion(
        self: Arc<Self>,
        mut updates: watch::Receiver<Pod>,
        gone: CancellationToken,
    ) {
        loop {
            let deleting = {
                let pod = updates.borrow_and_update();
                pod.metadata.deletion_timestamp.is_some().then(|| {
                    pod.metadata
                        .deletion_grace_period_seconds
                        .or_else(|| {
                            pod.spec
                                .as_ref()
                                .and_then(|s| s.termination_grace_period_seconds)
                        })
                        .unwrap_or(30)
                })
            };
            if let Some(seconds) = deleting {
                self.terminate(Duration::from_secs(seconds.max(0) as u64));
            }
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                () = gone.cancelled() => {
                    self.terminate(Duration::ZERO);
                    return;
                }
            }
        }
    }

    fn terminate(&self, grace: Duration) {
        if let Ok(mut current) = self.grace.lock() {
            // A second delete can only shorten the grace period.
            if !self.terminating.is_cancelled() || grace < *current {
                *current = grace;
            }
        }
        if !self.terminating.is_cancelled() {
            info!(pod = %self.key(), grace_s = grace.as_secs(), "terminating pod");
        }
        self.terminating.cancel();
    }

    fn grace(&self) -> Duration {
        self.grace.lock().map(|g| *g).unwrap_or(Duration::ZERO)
    }

    fn update(&self, change: impl FnOnce(&mut PodRecord)) {
        if let Ok(mut record) = self.record.lock() {
            change(&mut record);
        }
        self.changed.notify_one();
    }

    fn mark_all_done(&self) {
        self.update(|r| {
            for c in r.init.iter_mut().chain(r.containers.iter_mut()) {
                c.done = true;
                c.ready = false;
            }
        });
    }

    /// Writes the status after every change, coalescing bursts.
    async fn publish_loop(self: Arc<Self>) {
        loop {
            if let Err(error) = self.publish().await {
                warn!(pod = %self.key(), %error, "writing pod status");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            self.changed.notified().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn publish(&self) -> Result<(), kube::Error> {
        let status = match self.record.lock() {
            Ok(mut record) => record.to_status(&now()),
            Err(_) => return Ok(()),
        };
        let body = serde_json::json!({ "status": status });
        match self
            .pods
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => Ok(()),
            // Removed already (force deletion): nothing left to report on.
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn sources(&self) -> EnvSources {
        EnvSources {
            pod_ip: self.ip.to_string(),
            host_ip: "127.0.0.1".into(),
            api_host: self.node.api_host.clone(),
            api_port: self.node.api_port,
            ..EnvSources::default()
        }
    }

    /// Retries until the volumes can be made or the pod is deleted.
    async fn prepare_volumes(&self, pod: &Pod) -> Option<Prepared> {
        let pvc_root = self.node.config.root.join("claims");
        loop {
            match volumes::prepare(
                &self.node.client,
                pod,
                &self.dir,
                &pvc_root,
                &self.sources(),
            )
            .await
            {
                Ok(prepared) => return Some(prepared),
                Err(error) => {
                    let message = error.to_string();
                    warn!(pod = %self.key(), %message, "volumes not ready");
                    self.update(|r| {
                        for c in r.init.iter_mut().chain(r.containers.iter_mut()) {
                            if let State::Waiting { message: m, .. } = &mut c.state {
                                *m = Some(message.clone());
                            }
                        }
                    });
                }
            }
            if self.pause(Duration::from_secs(2)).await {
                return None;
            }
        }
    }

    /// Sleeps; true when the pod started terminating meanwhile.
    async fn pause(&self, duration: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(duration) => false,
            () = self.terminating.cancelled() => true,
        }
    }

    fn restart_policy(pod: &Pod) -> String {
        pod.spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    /// In order; a failed one is retried unless the policy is Never. True
    /// when every init container completed.
    async fn run_init_containers(self: &Arc<Self>, pod: &Pod, volumes: &Prepared) -> bool {
        let spec = pod.spec.clone().unwrap_or_default();
        let never = Self::restart_policy(pod) == "Never";
        for (index, container) in spec.init_containers.iter().flatten().enumerate() {
            let mut backoff = Duration::from_secs(1);
            loop {
                let exit = self
                    .run_once(pod, Slot::Init(index), container, volumes)
                    .await;
                match exit {
                    Some(exit) if exit.exit_code == 0 => break,
                    Some(_) if never => {
                        self.update(|r| r.failed = true);
                        return false;
                    }
                    Some(_) => {}
                    None => return false,
                }
                self.update(|r| r.init[index].restarts += 1);
                if self.pause(backoff).await {
                    return false;
                }
                backoff = (backoff * 2).min(Duration::from_secs(
                    self.node.config.restart_backoff_max_seconds,
                ));
            }
        }
        self.update(|r| r.initialized = true);
        true
    }

    async fn run_container(
        self: &Arc<Self>,
        pod: &Pod,
        index: usize,
        container: &Container,
        volumes: &Prepared,
    ) {
        let policy = Self::restart_policy(pod);
        let mut backoff = Duration::from_secs(1);
        loop {
            let Some(exit) = self
                .run_once(pod, Slot::Main(index), container, volumes)
                .await
            else {
                break;
            };
            let again = match policy.as_str() {
                "Never" => false,
                "OnFailure" => exit.exit_code != 0,
                _ => true,
            };
            if !again || self.terminating.is_cancelled() {
                break;
            }
            self.update(|r| {
                let c = &mut r.containers[index];
                c.restarts += 1;
                c.last = Some(exit.clone());
                c.state = State::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: Some(format!(
                        "back-off {}s restarting failed container",
                        backoff.as_secs()
                    )),
                };
            });
            if self.pause(backoff).await {
                break;
            }
            backoff = (backoff * 2).min(Duration::from_secs(
                self.node.config.restart_backoff_max_seconds,
            ));
        }
        self.update(|r| {
            r.containers[index].done = true;
            r.containers[index].ready = false;
        });
    }

    fn set(&self, slot: Slot, change: impl FnOnce(&mut ContainerRecord)) {
        self.update(|r| match slot {
            Slot::Init(i) => change(&mut r.init[i]),
            Slot::Main(i) => change(&mut r.containers[i]),
        });
    }

    /// Runs one container process to its end. `None` when it never ran
    /// because the pod is terminating (or cannot run at all).
    async fn run_once(
        self: &Arc<Self>,
        pod: &Pod,
        slot: Slot,
        container: &Container,
        volumes: &Prepared,
    ) -> Option<Exit> {
        let image = container.image.clone().unwrap_or_default();
        let Some(rule) = self.node.config.image(&image).cloned() else {
            self.set(slot, |c| {
                c.state = State::Waiting {
                    reason: "ImagePullBackOff".into(),
                    message: Some(format!(
                        "image {image} is not in the node agent's image table; it cannot be run here"
                    )),
                }
            });
            self.terminating.cancelled().await;
            return None;
        };
        let spec = loop {
            match self.launch_spec(pod, container, &rule, volumes).await {
                Ok(spec) => break spec,
                Err(message) => {
                    warn!(pod = %self.key(), container = %container.name, %message, "cannot create container");
                    self.set(slot, |c| {
                        c.state = State::Waiting {
                            reason: "CreateContainerConfigError".into(),
                            message: Some(message.clone()),
                        }
                    });
                    if self.pause(Duration::from_secs(2)).await {
                        return None;
                    }
                }
            }
        };
        if self.terminating.is_cancelled() {
            return None;
        }
        let restarts = match self.record.lock() {
            Ok(r) => match slot {
                Slot::Init(i) => r.init[i].restarts,
                Slot::Main(i) => r.containers[i].restarts,
            },
            Err(_) => 0,
        };
        let mut child = match self.spawn(container, &spec, restarts) {
            Ok(child) => child,
            Err(message) => {
                self.set(slot, |c| {
                    c.state = State::Waiting {
                        reason: "RunContainerError".into(),
                        message: Some(message.clone()),
                    }
                });
                let started = now();
                return Some(Exit {
                    exit_code: 128,
                    signal: None,
                    reason: "ContainerCannotRun".into(),
                    started_at: Some(started.clone()),
                    finished_at: started,
                });
            }
        };
        let started_at = now();
        let pid = child.id();
        let has_startup = container.startup_probe.is_some();
        self.set(slot, |c| {
            c.state = State::Running {
                started_at: started_at.clone(),
            };
            c.started = !has_startup;
            // No readiness probe: ready as soon as it runs (init containers never are).
            c.ready = matches!(slot, Slot::Main(_))
                && container.readiness_probe.is_none()
                && !has_startup;
        });
        let probes_stop = CancellationToken::new();
        let liveness_failed = CancellationToken::new();
        if let Slot::Main(index) = slot {
            tokio::spawn(self.clone().probe_loop(
                index,
                container.clone(),
                probes_stop.clone(),
                liveness_failed.clone(),
            ));
        }
        let status = tokio::select! {
            status = child.wait() => status.ok(),
            () = self.terminating.cancelled() => {
                self.stop(&mut child, pid, self.grace()).await
            }
            () = liveness_failed.cancelled() => {
                warn!(pod = %self.key(), container = %container.name, "liveness probe failed; restarting");
                let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30);
                self.stop(&mut child, pid, Duration::from_secs(grace.max(0) as u64)).await
            }
        };
        probes_stop.cancel();
        let (exit_code, signal) = exit_code(status);
        let exit = Exit {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            started_at: Some(started_at),
            finished_at: now(),
        };
        info!(pod = %self.key(), container = %container.name, exit_code, "container exited");
        self.set(slot, |c| {
            c.state = State::Terminated(exit.clone());
            c.ready = false;
        });
        Some(exit)
    }

    /// SIGTERM to the container's process group, SIGKILL after `grace`.
    async fn stop(
        &self,
        child: &mut tokio::process::Child,
        pid: Option<u32>,
        grace: Duration,
    ) -> Option<std::process::ExitStatus> {
        let group = pid.map(|p| Pid::from_raw(p as i32));
        if let Some(group) = group {
            let _ = killpg(group, Signal::SIGTERM);
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                warn!(pod = %self.key(), grace_s = grace.as_secs(), "grace period over; killing");
                if let Some(group) = group {
                    let _ = killpg(group, Signal::SIGKILL);
                }
                child.wait().await.ok()
            }
        }
    }

    async fn probe_loop(
        self: Arc<Self>,
        index: usize,
        container: Container,
        stop: CancellationToken,
        liveness_failed: CancellationToken,
    ) {
        let ip = self.ip.to_string();
        let http = self.node.http.clone();
        let resolve = |p: Option<&k8s_openapi::api::core::v1::Probe>| -> Option<Check> {
            match probe::resolve(p?, &container, &ip) {
                Ok(check) => Some(check),
                Err(message) => {
                    warn!(pod = %self.key(), container = %container.name, %message, "probe ignored");
                    None
                }
            }
        };
        let startup = resolve(container.startup_probe.as_ref());
        let readiness = resolve(container.readiness_probe.as_ref());
        let liveness = resolve(container.liveness_probe.as_ref());
        if let Some(check) = startup {
            let mut streak = Streak::default();
            if sleep_or_stop(check.initial_delay, &stop).await {
                return;
            }
            loop {
                let ok = probe::attempt(&http, &check).await;
                match streak.record(ok, &check) {
                    Some(true) => break,
                    Some(false) => {
                        liveness_failed.cancel();
                        return;
                    }
                    None => {}
                }
                if sleep_or_stop(check.period, &stop).await {
                    return;
                }
            }
            let ready = container.readiness_probe.is_none();
            self.set(Slot::Main(index), |c| {
                c.started = true;
                c.ready = ready;
            });
        }
        let readiness_task = readiness.map(|check| {
            let (me, http, stop) = (self.clone(), http.clone(), stop.clone());
            tokio::spawn(async move {
                let mut streak = Streak::default();
                if sleep_or_stop(check.initial_delay, &stop).await {
                    return;
                }
                loop {
                    let ok = probe::attempt(&http, &check).await;
                    if let Some(ready) = streak.record(ok, &check) {
                        if !stop.is_cancelled() {
                            me.set(Slot::Main(index), |c| c.ready = ready);
                        }
                    }
                    if sleep_or_stop(check.period, &stop).await {
                        return;
                    }
                }
            })
        });
        if let Some(check) = liveness {
            let mut streak = Streak::default();
            if !sleep_or_stop(check.initial_delay, &stop).await {
                loop {
                    let ok = probe::attempt(&http, &check).await;
                    if streak.record(ok, &check) == Some(false) {
                        liveness_failed.cancel();
                        break;
                    }
                    if sleep_or_stop(check.period, &stop).await {
                        break;
                    }
                }
            }
        }
        if let Some(task) = readiness_task {
            let _ = task.await;
        }
    }

    async fn launch_spec(
        &self,
        pod: &Pod,
        container: &Container,
        rule: &ImageRule,
        volumes: &Prepared,
    ) -> Result<LaunchSpec, String> {
        let (config_map_names, secret_names) = env::referenced(container);
        let mut sources = self.sources();
        for name in config_map_names {
            let api: Api<ConfigMap> = Api::namespaced(self.node.client.clone(), &self.namespace);
            if let Some(found) = api
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading configmap {name}: {e}"))?
            {
                sources.config_maps.insert(name, found);
            }
        }
        for name in secret_names {
            let api: Api<Secret> = Api::namespaced(self.node.client.clone(), &self.namespace);
            if let Some(found) = api
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading secret {name}: {e}"))?
            {
                sources.secrets.insert(name, found);
            }
        }
        let mut environment = env::resolve(pod, container, &sources)?;
        for (name, template) in &rule.env {
            if let Some(value) = fill_template(template, &self.ip.to_string(), container) {
                match environment.iter_mut().find(|(n, _)| n == name) {
                    Some(slot) => slot.1 = value,
                    None => environment.push((name.clone(), value)),
                }
            }
        }
        let mut argv = vec![rule.binary.display().to_string()];
        match (&container.command, &container.args) {
            (Some(command), args) if !command.is_empty() => {
                let program = std::path::Path::new(&command[0]);
                let wanted = rule.binary.file_name();
                if program.file_name() != wanted {
                    return Err(format!(
                        "command {} is not this image's program {}",
                        command[0],
                        rule.binary.display()
                    ));
                }
                argv.extend(command[1..].iter().cloned());
                argv.extend(args.iter().flatten().cloned());
            }
            (_, args) => argv.extend(args.iter().flatten().cloned()),
        }
        let mut mounts = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            let source = volumes
                .get(&m.name)
                .ok_or_else(|| format!("volume mount {} names no volume of the pod", m.name))?;
            let source = match m.sub_path.as_deref() {
                Some(sub) if !sub.is_empty() => {
                    if sub.split('/').any(|p| p == "..") {
                        return Err(format!("subPath {sub} leaves its volume"));
                    }
                    source.join(sub)
                }
                _ => source.clone(),
            };
            mounts.push(BindMount {
                source,
                target: PathBuf::from(&m.mount_path),
                read_only: m.read_only == Some(true),
            });
        }
        let user = self.user(pod, container, rule)?;
        let workdir = self.dir.join("rootfs").join(&container.name);
        std::fs::create_dir_all(&workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&workdir, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| format!("{}: {e}", workdir.display()))?;
        }
        let read_only_root = container
            .security_context
            .as_ref()
            .and_then(|c| c.read_only_root_filesystem)
            == Some(true);
        Ok(LaunchSpec {
            argv,
            env: environment,
            mounts,
            workdir,
            user,
            read_only_root,
        })
    }

    /// The user a container runs as, and the kubelet's refusal to run a
    /// `runAsNonRoot` container as root.
    fn user(
        &self,
        pod: &Pod,
        container: &Container,
        rule: &ImageRule,
    ) -> Result<Option<User>, String> {
        let pod_ctx = pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.clone())
            .unwrap_or_default();
        let ctx = container.security_context.clone().unwrap_or_default();
        let uid = ctx
            .run_as_user
            .or(pod_ctx.run_as_user)
            .map(|u| u as u32)
            .or(rule.user);
        let non_root = ctx.run_as_non_root.or(pod_ctx.run_as_non_root) == Some(true);
        let uid = match uid {
            Some(0) | None if non_root => {
                return Err("container has runAsNonRoot and image will run as root".into())
            }
            Some(uid) => uid,
            None => return Ok(None),
        };
        let gid = ctx
            .run_as_group
            .or(pod_ctx.run_as_group)
            .map(|g| g as u32)
            .unwrap_or(uid);
        Ok(Some(User {
            uid,
            gid,
            extra_group: pod_ctx.fs_group.map(|g| g as u32),
        }))
    }

    fn spawn(
        &self,
        container: &Container,
        spec: &LaunchSpec,
        restarts: i32,
    ) -> Result<tokio::process::Child, String> {
        let run_dir = self.dir.join("run");
        let log_dir = self.dir.join("logs").join(&container.name);
        std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
        std::fs::create_dir_all(&log_dir).map_err(|e| format!("{}: {e}", log_dir.display()))?;
        let spec_path = run_dir.join(format!("{}.json", container.name));
        let body = serde_json::to_vec_pretty(spec).map_err(|e| e.to_string())?;
        std::fs::write(&spec_path, body).map_err(|e| format!("{}: {e}", spec_path.display()))?;
        let log_path = log_dir.join(format!("{restarts}.log"));
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let child = tokio::process::Command::new(&self.node.self_exe)
            .arg("launch")
            .arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.node.self_exe.display()))?;
        // The launch step execs in place: this pid is the container's program.
        // Tests read it to freeze or kill one container for real.
        if let Some(pid) = child.id() {
            let pid_path = run_dir.join(format!("{}.pid", container.name));
            std::fs::write(&pid_path, pid.to_string())
                .map_err(|e| format!("{}: {e}", pid_path.display()))?;
        }
        Ok(child)
    }
}

#[derive(Clone, Copy, Debug)]
enum Slot {
    Init(usize),
    Main(usize),
}

async fn sleep_or_stop(duration: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = stop.cancelled() => true,
    }
}

fn exit_code(status: Option<std::process::ExitStatus>) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => (code, None),
            (None, Some(signal)) => (128 + signal, Some(signal)),
            (None, None) => (255, None),
        },
        None => (255, None),
    }
}

/// `{pod_ip}` and `{port:NAME}`; `None` when a named port is not declared.
pub fn fill_template(template: &str, pod_ip: &str, container: &Container) -> Option<String> {
    let mut out = template.replace("{pod_ip}", pod_ip);
    while let Some(start) = out.find("{port:") {
        let end = out[start..].find('}')? + start;
        let name = &out[start + 6..end];
        let port = container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))?
            .container_port;
        out.replace_range(start..=end, &port.to_string());
    }
    Some(out)
}
