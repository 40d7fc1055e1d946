//! The node: registers itself, keeps its Lease and Ready condition fresh
//! (or the node lifecycle controller would taint it and evict its pods),
//! and starts a supervisor for every pod the scheduler binds to it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Pod,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use super::config::AgentConfig;
use super::pod::{self, NodeContext, PodHandle};

const MANAGER: &str = "ocr-e2e-node";
const HEARTBEAT: Duration = Duration::from_secs(10);
const LEASE_SECONDS: i32 = 40;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("registering node {node}: {source}")]
    Register { node: String, source: kube::Error },
    #[error("watching pods: {0}")]
    Watch(#[from] watcher::Error),
    #[error("locating this program: {0}")]
    SelfExe(std::io::Error),
    #[error("building the API client: {0}")]
    Client(kube::Error),
    #[error("the kubeconfig's server {0} has no host")]
    Server(String),
}

pub fn node_object(config: &AgentConfig) -> Node {
    let mut capacity = BTreeMap::from([
        ("cpu".to_string(), Quantity(config.cpu.clone())),
        ("memory".to_string(), Quantity(config.memory.clone())),
        ("pods".to_string(), Quantity(config.pods.to_string())),
        ("ephemeral-storage".to_string(), Quantity("100Gi".into())),
    ]);
    let mut labels = BTreeMap::from([
        (
            "kubernetes.io/hostname".to_string(),
            config.node_name.clone(),
        ),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), "amd64".to_string()),
        (
            "node.kubernetes.io/instance-type".to_string(),
            "ocr-e2e-node".to_string(),
        ),
    ]);
    if config.gpus > 0 {
        capacity.insert("nvidia.com/gpu".into(), Quantity(config.gpus.to_string()));
        labels.insert("nvidia.com/gpu.present".into(), "true".into());
    }
    let mut node = Node {
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            allocatable: Some(capacity.clone()),
            capacity: Some(capacity),
            ..NodeStatus::default()
        }),
        ..Node::default()
    };
    node.metadata.name = Some(config.node_name.clone());
    node.metadata.labels = Some(labels);
    node
}

pub fn ready_status(config: &AgentConfig, now: &Time) -> NodeStatus {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    };
    let node = node_object(config);
    let mut status = node.status.unwrap_or_default();
    status.conditions = Some(vec![
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "e2e node",
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "e2e node",
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "e2e node",
        ),
        condition(
            "Ready",
            "True",
            "KubeletReady",
            "the e2e node agent runs pods as local processes",
        ),
    ]);
    status.addresses = Some(vec![
        NodeAddress {
            type_: "InternalIP".into(),
            address: "127.0.0.1".into(),
        },
        NodeAddress {
            type_: "Hostname".into(),
            address: config.node_name.clone(),
        },
    ]);
    status.node_info = Some(NodeSystemInfo {
        architecture: "amd64".into(),
        operating_system: "linux".into(),
        kubelet_version: "v1.36.2".into(),
        kube_proxy_version: String::new(),
        container_runtime_version: "ocr-e2e-node://0.1".into(),
        os_image: "local processes".into(),
        kernel_version: String::new(),
        boot_id: String::new(),
        machine_id: String::new(),
        system_uuid: String::new(),
        ..NodeSystemInfo::default()
    });
    status
}

/// Hands out one address per pod and puts it on the loopback interface
/// (`ip addr add A/32 dev lo`) for as long as the pod lives.
pub struct IpPool {
    octet: u8,
    next: u32,
    free: Vec<Ipv4Addr>,
}

impl IpPool {
    pub fn new(octet: u8) -> IpPool {
        IpPool {
            octet,
            next: 2,
            free: Vec::new(),
        }
    }

    /// The next address, not yet configured.
    pub fn next_address(&mut self) -> Ipv4Addr {
        // Reusing only after 64 fresh ones keeps a just-deleted pod's address
        // (still in an EndpointSlice for a moment) from pointing at a new pod.
        if self.free.len() > 64 {
            return self.free.remove(0);
        }
        let n = self.next;
        self.next += 1;
        Ipv4Addr::new(10, self.octet, (n / 250) as u8, (n % 250) as u8 + 1)
    }

    pub fn take(&mut self) -> Result<Ipv4Addr, String> {
        let ip = self.next_address();
        // Left over from an agent that was killed: take it over.
        let _ = ip_addr("del", ip);
        ip_addr("add", ip)?;
        Ok(ip)
    }

    pub fn give_back(&mut self, ip: Ipv4Addr) {
        if let Err(error) = ip_addr("del", ip) {
            warn!(%ip, %error, "removing a pod address");
        }
        self.free.push(ip);
    }
}

fn ip_addr(verb: &str, ip: Ipv4Addr) -> Result<(), String> {
    let output = std::process::Command::new("ip")
        .args(["addr", verb, &format!("{ip}/32"), "dev", "lo"])
        .output()
        .map_err(|e| {
            format!("running ip addr {verb}: {e} (the node agent needs iproute2 and root)")
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip addr {verb} {ip}/32 dev lo: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

pub async fn run(
    kube_config: kube::Config,
    config: AgentConfig,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), AgentError> {
    let cluster = api_address(&kube_config)?;
    let client = Client::try_from(kube_config).map_err(AgentError::Client)?;
    let node_ctx = Arc::new(NodeContext {
        client: client.clone(),
        self_exe: std::env::current_exe().map_err(AgentError::SelfExe)?,
        api_host: cluster.0,
        api_port: cluster.1,
        http: reqwest::Client::new(),
        config,
    });
    let node_uid = register(&client, &node_ctx.config).await?;
    tokio::spawn(heartbeat(client.clone(), node_ctx.config.clone(), node_uid));

    let pods: Api<Pod> = Api::all(client.clone());
    let selector = format!("spec.nodeName={}", node_ctx.config.node_name);
    let mut events = watcher(pods, watcher::Config::default().fields(&selector)).boxed();
    let mut running: HashMap<String, (PodHandle, Ipv4Addr)> = HashMap::new();
    let mut ips = IpPool::new(node_ctx.config.pod_ip_octet);
    let mut seen_in_relist: BTreeSet<String> = BTreeSet::new();
    info!(node = %node_ctx.config.node_name, "node agent ready");
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = shutdown.cancelled() => break,
        };
        let Some(event) = event else { break };
        // Finished supervisors (pod removed) give their address back.
        running.retain(|_, (handle, ip)| {
            let keep = !handle.task.is_finished();
            if !keep {
                ips.give_back(*ip);
            }
            keep
        });
        match event {
            Ok(watcher::Event::Init) => seen_in_relist.clear(),
            Ok(watcher::Event::InitApply(pod)) => {
                seen_in_relist.insert(pod.uid().unwrap_or_default());
                on_pod(&node_ctx, &mut running, &mut ips, pod);
            }
            Ok(watcher::Event::InitDone) => {
                // A pod that vanished while the watch was down was force-deleted.
                for (uid, (handle, _)) in running.iter() {
                    if !seen_in_relist.contains(uid) {
                        handle.gone.cancel();
                    }
                }
            }
            Ok(watcher::Event::Apply(pod)) => on_pod(&node_ctx, &mut running, &mut ips, pod),
            Ok(watcher::Event::Delete(pod)) => {
                if let Some((handle, _)) = running.get(&pod.uid().unwrap_or_default()) {
                    handle.gone.cancel();
                }
            }
            Err(error) => {
                warn!(%error, "pod watch error; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    info!("node agent stopping: terminating every pod's processes");
    for (handle, _) in running.values() {
        handle.gone.cancel();
    }
    for (_, (handle, ip)) in running.drain() {
        let _ = handle.task.await;
        ips.give_back(ip);
    }
    Ok(())
}

fn on_pod(
    node: &Arc<NodeContext>,
    running: &mut HashMap<String, (PodHandle, Ipv4Addr)>,
    ips: &mut IpPool,
    pod: Pod,
) {
    let uid = pod.uid().unwrap_or_default();
    if let Some((handle, _)) = running.get(&uid) {
        let _ = handle.updates.send(pod);
        return;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    let finished = matches!(phase.as_deref(), Some("Succeeded") | Some("Failed"));
    if pod.metadata.deletion_timestamp.is_some() || finished {
        // Not ours to run (again): a deleted pod is removed, a finished one left alone.
        if pod.metadata.deletion_timestamp.is_some() {
            let pods: Api<Pod> =
                Api::namespaced(node.client.clone(), &pod.namespace().unwrap_or_default());
            let name = pod.name_any();
            tokio::spawn(async move {
                let _ = pods
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
            });
        }
        return;
    }
    let ip = match ips.take() {
        Ok(ip) => ip,
        Err(error) => {
            warn!(pod = %pod.name_any(), %error, "no address for the pod; it stays pending");
            return;
        }
    };
    let handle = pod::start(node.clone(), pod, ip);
    running.insert(uid, (handle, ip));
}

/// Where pods reach the API server: there is no kube-proxy to route the
/// `kubernetes` Service's ClusterIP, so pods get the real address.
fn api_address(config: &kube::Config) -> Result<(String, u16), AgentError> {
    let url = &config.cluster_url;
    let host = url
        .host()
        .ok_or_else(|| AgentError::Server(url.to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_u16().unwrap_or(443);
    Ok((host, port))
}

async fn register(client: &Client, config: &AgentConfig) -> Result<String, AgentError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let failed = |source| AgentError::Register {
        node: config.node_name.clone(),
        source,
    };
    let node = match nodes
        .create(&PostParams::default(), &node_object(config))
        .await
    {
        Ok(node) => node,
        Err(kube::Error::Api(e)) if e.code == 409 => {
            nodes.get(&config.node_name).await.map_err(failed)?
        }
        Err(e) => return Err(failed(e)),
    };
    let status = serde_json::json!({ "status": ready_status(config, &Time(Timestamp::now())) });
    nodes
        .patch_status(
            &config.node_name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await
        .map_err(failed)?;
    Ok(node.uid().unwrap_or_default())
}

/// The node lifecycle controller marks a node whose Lease stops being renewed
/// NotReady after 40 s and evicts its pods: renew both, as a kubelet does.
async fn heartbeat(client: Client, config: AgentConfig, node_uid: String) {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    loop {
        let now = Timestamp::now();
        let lease = Lease {
            metadata: kube::api::ObjectMeta {
                name: Some(config.node_name.clone()),
                namespace: Some("kube-node-lease".into()),
                owner_references: Some(vec![OwnerReference {
                    api_version: Node::api_version(&()).into(),
                    kind: Node::kind(&()).into(),
                    name: config.node_name.clone(),
                    uid: node_uid.clone(),
                    ..OwnerReference::default()
                }]),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.node_name.clone()),
                lease_duration_seconds: Some(LEASE_SECONDS),
                renew_time: Some(MicroTime(now)),
                ..LeaseSpec::default()
            }),
        };
        let params = PatchParams::apply(MANAGER).force();
        if let Err(error) = leases
            .patch(&config.node_name, &params, &Patch::Apply(&lease))
            .await
        {
            warn!(%error, "renewing the node lease");
        }
        let status = serde_json::json!({ "status": ready_status(&config, &Time(now)) });
        if let Err(error) = nodes
            .patch_status(
                &config.node_name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await
        {
            warn!(%error, "reporting node status");
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(gpus: u32) -> AgentConfig {
        toml::from_str(&format!("root = \"/tmp/x\"\ngpus = {gpus}")).expect("config")
    }

    #[test]
    fn a_gpu_node_advertises_its_gpus_for_the_worker_selector() {
        let node = node_object(&config(2));
        let labels = node.metadata.labels.expect("labels");
        assert_eq!(
            labels.get("nvidia.com/gpu.present").map(String::as_str),
            Some("true")
        );
        let allocatable = node
            .status
            .and_then(|s| s.allocatable)
            .expect("allocatable");
        assert_eq!(
            allocatable.get("nvidia.com/gpu"),
            Some(&Quantity("2".into()))
        );
        let cpu_only = node_object(&config(0));
        assert!(!cpu_only
            .metadata
            .labels
            .expect("labels")
            .contains_key("nvidia.com/gpu.present"));
    }

    #[test]
    fn pod_addresses_are_distinct_and_outside_loopback() {
        let mut pool = IpPool::new(245);
        let a = pool.next_address();
        let b = pool.next_address();
        assert_ne!(a, b);
        assert_eq!(a.octets()[..2], [10, 245]);
        pool.free.push(a);
        assert_ne!(
            pool.next_address(),
            a,
            "a released address is not reused at once"
        );
    }
}
