//! HTTP and TCP probes against the pod's own address, with the kubelet's
//! defaults (period 10 s, timeout 1 s, failure threshold 3).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// A probe resolved against its container: what to call and how often.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub target: Target,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Http { url: String },
    Tcp { addr: String },
}

/// An error for a probe this node cannot run (exec, gRPC) or whose port the
/// container does not declare: the caller logs it and treats the probe as absent.
pub fn resolve(probe: &Probe, container: &Container, pod_ip: &str) -> Result<Check, String> {
    let port_of = |port: &IntOrString| -> Result<i32, String> {
        match port {
            IntOrString::Int(n) => Ok(*n),
            IntOrString::String(name) => container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .ok_or_else(|| {
                    format!("probe names the port {name}, which the container does not declare")
                }),
        }
    };
    let target = if let Some(http) = &probe.http_get {
        let port = port_of(&http.port)?;
        let scheme = http
            .scheme
            .as_deref()
            .unwrap_or("HTTP")
            .to_ascii_lowercase();
        let host = http.host.clone().unwrap_or_else(|| pod_ip.to_owned());
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        Target::Http {
            url: format!("{scheme}://{host}:{port}{path}"),
        }
    } else if let Some(tcp) = &probe.tcp_socket {
        let port = port_of(&tcp.port)?;
        let host = tcp.host.clone().unwrap_or_else(|| pod_ip.to_owned());
        Target::Tcp {
            addr: format!("{host}:{port}"),
        }
    } else {
        return Err("only httpGet and tcpSocket probes are supported by this node".into());
    };
    let seconds = |value: Option<i32>, default: u64| {
        Duration::from_secs(value.map(|v| v.max(0) as u64).unwrap_or(default))
    };
    Ok(Check {
        target,
        initial_delay: seconds(probe.initial_delay_seconds, 0),
        period: seconds(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: probe.success_threshold.unwrap_or(1).max(1) as u32,
        failure_threshold: probe.failure_threshold.unwrap_or(3).max(1) as u32,
    })
}

/// One attempt: an HTTP status in 200..400 or an accepted TCP connection.
pub async fn attempt(client: &reqwest::Client, check: &Check) -> bool {
    match &check.target {
        Target::Http { url } => client
            .get(url)
            .timeout(check.timeout)
            .send()
            .await
            .is_ok_and(|r| (200..400).contains(&r.status().as_u16())),
        Target::Tcp { addr } => {
            tokio::time::timeout(check.timeout, tokio::net::TcpStream::connect(addr.as_str()))
                .await
                .is_ok_and(|r| r.is_ok())
        }
    }
}

/// Counts consecutive results against the thresholds.
#[derive(Clone, Debug, Default)]
pub struct Streak {
    successes: u32,
    failures: u32,
}

impl Streak {
    /// `Some(true)` when the probe just passed its success threshold,
    /// `Some(false)` when it just reached its failure threshold.
    pub fn record(&mut self, ok: bool, check: &Check) -> Option<bool> {
        if ok {
            self.failures = 0;
            self.successes += 1;
            (self.successes >= check.success_threshold).then_some(true)
        } else {
            self.successes = 0;
            self.failures += 1;
            (self.failures >= check.failure_threshold).then_some(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    fn container() -> Container {
        Container {
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..ContainerPort::default()
            }]),
            ..Container::default()
        }
    }

    #[test]
    fn named_ports_resolve_against_the_pod_address() {
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::String("http".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            ..Probe::default()
        };
        let check = resolve(&probe, &container(), "10.245.0.3").expect("resolves");
        assert_eq!(
            check.target,
            Target::Http {
                url: "http://10.245.0.3:8080/readyz".into()
            }
        );
        assert_eq!(check.period, Duration::from_secs(5));
        assert_eq!(check.failure_threshold, 3);
        let unknown = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("grpc".into()),
                ..HTTPGetAction::default()
            }),
            ..Probe::default()
        };
        assert!(resolve(&unknown, &container(), "10.245.0.3").is_err());
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let check = Check {
            target: Target::Tcp { addr: "x".into() },
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        };
        let mut streak = Streak::default();
        assert_eq!(streak.record(false, &check), None);
        assert_eq!(streak.record(false, &check), None);
        assert_eq!(streak.record(true, &check), Some(true));
        assert_eq!(streak.record(false, &check), None);
        assert_eq!(streak.record(false, &check), None);
        assert_eq!(streak.record(false, &check), Some(false));
    }
}
