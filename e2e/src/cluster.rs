//! The environment the scenarios run in: a real control plane from
//! `../shared/k8s` (etcd, kube-apiserver, controller-manager, scheduler),
//! one node agent, and `kubectl`/`helm` to install things as a user would.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::node::config::{AgentConfig, ImageRule};

/// Where the tools and the built programs are.
#[derive(Clone, Debug)]
pub struct Tools {
    pub repo: PathBuf,
    /// `../shared/k8s`: `setup.sh`, `start-cluster.sh`, `stop-cluster.sh`.
    pub k8s: PathBuf,
    pub helm: PathBuf,
    /// `target/debug` (or release) with `ocr-runtime` and `ocr-operator`.
    pub programs: PathBuf,
    pub node_agent: PathBuf,
}

impl Tools {
    /// From `OCR_TEST_K8S` (default `../shared/k8s` beside the clone) and
    /// `OCR_TEST_HELM` (set by `scripts/test.sh`, which installs Helm).
    pub fn from_env(node_agent: &str) -> Result<Tools> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the e2e crate sits in the repository")?
            .to_owned();
        let k8s = match std::env::var_os("OCR_TEST_K8S") {
            Some(dir) => PathBuf::from(dir),
            None => repo.join("../shared/k8s"),
        };
        if !k8s.join("start-cluster.sh").is_file() {
            bail!(
                "no control plane kit at {} (set OCR_TEST_K8S to the folder with start-cluster.sh)",
                k8s.display()
            );
        }
        let helm = std::env::var_os("OCR_TEST_HELM")
            .map(PathBuf::from)
            .context("OCR_TEST_HELM must name a helm binary (scripts/test.sh installs one with scripts/install-helm.sh)")?;
        let node_agent = PathBuf::from(node_agent);
        // Test binaries live in target/<profile>/deps; the programs one level up.
        let programs = std::env::current_exe()
            .context("locating the test binary")?
            .parent()
            .and_then(Path::parent)
            .context("the test binary's folder")?
            .to_owned();
        for program in ["ocr-runtime", "ocr-operator"] {
            if !programs.join(program).is_file() {
                bail!(
                    "{} is missing: build the workspace first (cargo nextest run --workspace builds every binary)",
                    programs.join(program).display()
                );
            }
        }
        Ok(Tools {
            repo,
            k8s,
            helm,
            programs,
            node_agent,
        })
    }
}

pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A control plane of its own, stopped when dropped.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    stop: PathBuf,
}

impl ControlPlane {
    pub fn start(tools: &Tools) -> Result<ControlPlane> {
        let setup = Command::new(tools.k8s.join("setup.sh"))
            .stderr(Stdio::inherit())
            .output()
            .context("running the control plane kit's setup.sh")?;
        if !setup.status.success() {
            bail!("setup.sh failed");
        }
        let bin = PathBuf::from(String::from_utf8_lossy(&setup.stdout).trim());
        let dir = tempfile::Builder::new()
            .prefix("ocr-e2e-cluster")
            .tempdir()
            .context("creating the control plane folder")?;
        let started = Instant::now();
        let status = Command::new(tools.k8s.join("start-cluster.sh"))
            .arg(dir.path())
            .env("K8S_BIN", &bin)
            .env("K8S_PORT", free_port()?.to_string())
            .env("ETCD_PORT", free_etcd_port()?.to_string())
            .status()
            .context("running start-cluster.sh")?;
        let plane = ControlPlane {
            kubeconfig: dir.path().join("kubeconfig"),
            kubectl: bin.join("kubectl"),
            stop: tools.k8s.join("stop-cluster.sh"),
            dir,
        };
        if !status.success() {
            bail!(
                "start-cluster.sh failed; see {}",
                plane.dir.path().display()
            );
        }
        eprintln!(
            "e2e: control plane up in {:.1} s at {}",
            started.elapsed().as_secs_f64(),
            plane.dir.path().display()
        );
        Ok(plane)
    }

    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// `kubectl ARGS` with stdin; the output, or an error with stderr.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .context("kubectl stdin")?
                .write_all(input.as_bytes())
                .context("writing to kubectl")?;
        }
        drop(child.stdin.take());
        let output = child.wait_with_output().context("waiting for kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Server-side apply, as `kubectl apply --server-side` does it.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(yaml),
        )
    }

    /// A ServiceAccount's token, to act exactly as a workload would.
    pub fn token(&self, namespace: &str, account: &str) -> Result<String> {
        Ok(self
            .kubectl(&["-n", namespace, "create", "token", account], None)?
            .trim()
            .to_owned())
    }
}

fn free_etcd_port() -> Result<u16> {
    // etcd also listens on port+1 for peers.
    for _ in 0..50 {
        let port = free_port()?;
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no two free adjacent ports for etcd")
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = Command::new(&self.stop).arg(self.dir.path()).status();
        if std::env::var_os("OCR_E2E_KEEP").is_some() {
            let kept = self.dir.path().to_owned();
            eprintln!("e2e: keeping {}", kept.display());
            std::mem::forget(std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("a throwaway tempdir"),
            ));
        }
    }
}

/// One node agent process; its pods' processes go with it when dropped.
pub struct NodeAgent {
    child: Child,
    pub root: PathBuf,
    pub name: String,
}

impl NodeAgent {
    pub fn start(plane: &ControlPlane, tools: &Tools, name: &str, gpus: u32) -> Result<NodeAgent> {
        let root = plane.dir.path().join(format!("node-{name}"));
        std::fs::create_dir_all(&root)?;
        let config = AgentConfig {
            node_name: name.into(),
            root: root.clone(),
            cpu: "16".into(),
            memory: "64Gi".into(),
            pods: 110,
            gpus,
            pod_ip_octet: 245,
            restart_backoff_max_seconds: 10,
            images: vec![
                ImageRule {
                    pattern: "ocr-runtime*".into(),
                    binary: tools.programs.join("ocr-runtime"),
                    // The Dockerfile's USER.
                    user: Some(65532),
                    env: [
                        (
                            "OCR_SERVER__HTTP_ADDR".to_string(),
                            "{pod_ip}:{port:http}".to_string(),
                        ),
                        (
                            "OCR_SERVER__GRPC_ADDR".to_string(),
                            "{pod_ip}:{port:grpc}".to_string(),
                        ),
                    ]
                    .into(),
                },
                ImageRule {
                    pattern: "ocr-operator*".into(),
                    // OCR_E2E_OPERATOR_BIN runs another build of the operator
                    // (e.g. the last release's) against the same scenarios.
                    binary: std::env::var_os("OCR_E2E_OPERATOR_BIN")
                        .map(PathBuf::from)
                        .unwrap_or_else(|| tools.programs.join("ocr-operator")),
                    user: Some(65532),
                    env: [(
                        "OCR_OPERATOR_HTTP_ADDR".to_string(),
                        "{pod_ip}:{port:metrics}".to_string(),
                    )]
                    .into(),
                },
            ],
        };
        let config_path = root.join("node.toml");
        std::fs::write(&config_path, toml::to_string(&config)?)?;
        let log = std::fs::File::create(root.join("agent.log"))?;
        let child = Command::new(&tools.node_agent)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("KUBECONFIG", &plane.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the node agent")?;
        Ok(NodeAgent {
            child,
            root,
            name: name.into(),
        })
    }

    /// The host pid of a pod's container, from the file the agent writes.
    pub fn pid(&self, pod_uid: &str, container: &str) -> Result<i32> {
        let pods = self.root.join("pods");
        for entry in std::fs::read_dir(&pods)? {
            let path = entry?.path();
            let matches = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(pod_uid));
            if matches {
                let text =
                    std::fs::read_to_string(path.join("run").join(format!("{container}.pid")))?;
                return Ok(text.trim().parse()?);
            }
        }
        bail!("no pod {pod_uid} on node {}", self.name)
    }

    /// Every container log of every pod, for a failed scenario's report.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        let Ok(pods) = std::fs::read_dir(self.root.join("pods")) else {
            return out;
        };
        for pod in pods.flatten() {
            let Ok(containers) = std::fs::read_dir(pod.path().join("logs")) else {
                continue;
            };
            for container in containers.flatten() {
                let Ok(logs) = std::fs::read_dir(container.path()) else {
                    continue;
                };
                for log in logs.flatten() {
                    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
                    out.push_str(&format!("---- {}\n", log.path().display()));
                    for line in tail.into_iter().rev() {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        // SIGTERM: the agent stops every pod's processes before it exits.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Renders the operator's Helm chart as a user would install it.
pub fn render_chart(tools: &Tools, namespace: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut command = Command::new(&tools.helm);
    command
        .args(["template", "ocr-operator"])
        .arg(tools.repo.join("charts/ocr-operator"))
        .args(["--namespace", namespace, "--include-crds"]);
    for (key, value) in values {
        command.arg("--set-string").arg(format!("{key}={value}"));
    }
    let output = command.output().context("running helm template")?;
    if !output.status.success() {
        bail!(
            "helm template: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
