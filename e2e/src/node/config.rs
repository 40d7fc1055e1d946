//! The agent's configuration file (TOML): the Node it registers and the
//! table that maps container images to local programs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default = "default_node_name")]
    pub node_name: String,
    /// Pod folders (volumes, logs, launch specs) live here.
    pub root: PathBuf,
    #[serde(default = "default_cpu")]
    pub cpu: String,
    #[serde(default = "default_memory")]
    pub memory: String,
    #[serde(default = "default_pods")]
    pub pods: u32,
    /// `nvidia.com/gpu` allocatable; above 0 the Node is also labelled
    /// `nvidia.com/gpu.present=true` so GPU workers schedule here.
    #[serde(default)]
    pub gpus: u32,
    /// Pod IPs are `10.<pod_ip_octet>.x.y`, each added to the loopback
    /// interface while its pod lives: every pod has its own address (two pods
    /// both listen on :8080), reachable from the host like a pod network, and
    /// outside 127.0.0.0/8, which EndpointSlices refuse.
    #[serde(default = "default_pod_ip_octet")]
    pub pod_ip_octet: u8,
    /// Cap of the crash-loop back-off between container restarts.
    #[serde(default = "default_backoff_max")]
    pub restart_backoff_max_seconds: u64,
    #[serde(default, rename = "image")]
    pub images: Vec<ImageRule>,
}

/// One entry of the image table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageRule {
    /// Matched against the image's last path segment (`ocr-runtime:0.1.0`);
    /// a trailing `*` matches any rest.
    pub pattern: String,
    /// The image's entrypoint as a host program.
    pub binary: PathBuf,
    /// The image's `USER`; a pod without `runAsUser` runs as this.
    #[serde(default)]
    pub user: Option<u32>,
    /// Added after the pod's own env. `{pod_ip}` and `{port:NAME}` (the
    /// container port called NAME) are filled in; a variable that names a
    /// port the container does not declare is left out. This is how a
    /// program that binds 0.0.0.0 in a real pod binds its own address here.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

fn default_node_name() -> String {
    "e2e-node".into()
}
fn default_cpu() -> String {
    "16".into()
}
fn default_memory() -> String {
    "64Gi".into()
}
fn default_pods() -> u32 {
    110
}
fn default_pod_ip_octet() -> u8 {
    245
}
fn default_backoff_max() -> u64 {
    10
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// The rule for an image reference, if the table has one.
    pub fn image(&self, image: &str) -> Option<&ImageRule> {
        let name = image.rsplit('/').next().unwrap_or(image);
        self.images
            .iter()
            .find(|rule| match rule.pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == rule.pattern,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AgentConfig {
        toml::from_str(
            r#"
            root = "/tmp/x"
            [[image]]
            pattern = "ocr-runtime*"
            binary = "/bin/ocr-runtime"
            user = 65532
            [image.env]
            OCR_SERVER__HTTP_ADDR = "{pod_ip}:{port:http}"
            [[image]]
            pattern = "exact:1"
            binary = "/bin/exact"
            "#,
        )
        .expect("valid config")
    }

    #[test]
    fn images_match_by_their_last_segment() {
        let c = config();
        let rule = c
            .image("ghcr.io/ocr-serving/ocr-runtime:0.1.0-cuda")
            .expect("runtime image");
        assert_eq!(rule.binary, PathBuf::from("/bin/ocr-runtime"));
        assert_eq!(rule.user, Some(65532));
        assert!(c.image("registry/exact:1").is_some());
        assert!(c.image("registry/exact:2").is_none());
        assert!(c.image("curlimages/curl:8.11.1").is_none());
        assert!(c.image("ocr-runtime-not/other:1").is_none());
    }

    #[test]
    fn defaults_describe_a_roomy_cpu_node() {
        let c = config();
        assert_eq!(c.node_name, "e2e-node");
        assert_eq!((c.gpus, c.pod_ip_octet), (0, 245));
    }
}
