//! A container's environment, as the kubelet builds it: `envFrom` first,
//! then `env` (later names win), `$(VAR)` references to earlier variables,
//! and the service variables that make in-cluster clients find the API.
//! Pure: the ConfigMaps and Secrets are fetched by the caller.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, ObjectFieldSelector, Pod, Secret};

/// What the resolution may read.
#[derive(Clone, Debug, Default)]
pub struct EnvSources {
    pub pod_ip: String,
    pub host_ip: String,
    pub config_maps: BTreeMap<String, ConfigMap>,
    pub secrets: BTreeMap<String, Secret>,
    /// `KUBERNETES_SERVICE_HOST`/`_PORT`: the real API server, since there is
    /// no kube-proxy to route the `kubernetes` Service's ClusterIP.
    pub api_host: String,
    pub api_port: u16,
}

/// The ConfigMaps and Secrets a container's env names: (config maps, secrets).
pub fn referenced(container: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut config_maps = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    for from in container.env_from.iter().flatten() {
        if let Some(c) = &from.config_map_ref {
            config_maps.insert(c.name.clone());
        }
        if let Some(s) = &from.secret_ref {
            secrets.insert(s.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        let Some(from) = &var.value_from else {
            continue;
        };
        if let Some(c) = &from.config_map_key_ref {
            config_maps.insert(c.name.clone());
        }
        if let Some(s) = &from.secret_key_ref {
            secrets.insert(s.name.clone());
        }
    }
    (config_maps, secrets)
}

pub fn resolve(
    pod: &Pod,
    container: &Container,
    sources: &EnvSources,
) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = vec![
        (
            "HOSTNAME".into(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
        ("KUBERNETES_SERVICE_HOST".into(), sources.api_host.clone()),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            sources.api_port.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT_HTTPS".into(),
            sources.api_port.to_string(),
        ),
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
    ];
    let set = |env: &mut Vec<(String, String)>, name: String, value: String| match env
        .iter_mut()
        .find(|(n, _)| *n == name)
    {
        Some(slot) => slot.1 = value,
        None => env.push((name, value)),
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(c) = &from.config_map_ref {
            match sources.config_maps.get(&c.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        set(&mut env, format!("{prefix}{k}"), v.clone());
                    }
                }
                None if c.optional == Some(true) => {}
                None => return Err(format!("configmap \"{}\" not found", c.name)),
            }
        }
        if let Some(s) = &from.secret_ref {
            match sources.secrets.get(&s.name) {
                Some(secret) => {
                    for (k, v) in secret_data(secret) {
                        set(&mut env, format!("{prefix}{k}"), v);
                    }
                }
                None if s.optional == Some(true) => {}
                None => return Err(format!("secret \"{}\" not found", s.name)),
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(value) = value_of(pod, var, sources, &env)? {
            set(&mut env, var.name.clone(), value);
        }
    }
    Ok(env)
}

/// `None` for an optional reference that is missing: the variable is left out.
fn value_of(
    pod: &Pod,
    var: &EnvVar,
    sources: &EnvSources,
    so_far: &[(String, String)],
) -> Result<Option<String>, String> {
    let Some(from) = &var.value_from else {
        return Ok(Some(expand(var.value.as_deref().unwrap_or(""), so_far)));
    };
    if let Some(field) = &from.field_ref {
        return field_value(pod, field, sources).map(Some);
    }
    if let Some(key) = &from.secret_key_ref {
        let value = sources
            .secrets
            .get(&key.name)
            .and_then(|s| secret_data(s).remove(&key.key));
        return match value {
            Some(v) => Ok(Some(v)),
            None if key.optional == Some(true) => Ok(None),
            None => Err(format!(
                "couldn't find key {} in Secret {}",
                key.key, key.name
            )),
        };
    }
    if let Some(key) = &from.config_map_key_ref {
        let value = sources
            .config_maps
            .get(&key.name)
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(&key.key))
            .cloned();
        return match value {
            Some(v) => Ok(Some(v)),
            None if key.optional == Some(true) => Ok(None),
            None => Err(format!(
                "couldn't find key {} in ConfigMap {}",
                key.key, key.name
            )),
        };
    }
    Err(format!(
        "env {}: only fieldRef, secretKeyRef and configMapKeyRef are supported by this node",
        var.name
    ))
}

pub fn field_value(
    pod: &Pod,
    field: &ObjectFieldSelector,
    sources: &EnvSources,
) -> Result<String, String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = field.field_path.as_str();
    let from_map = |map: Option<&BTreeMap<String, String>>, prefix: &str| {
        let key = path
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    let value = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.podIP" => Some(sources.pod_ip.clone()),
        "status.podIPs" => Some(sources.pod_ip.clone()),
        "status.hostIP" | "status.hostIPs" => Some(sources.host_ip.clone()),
        _ => from_map(meta.labels.as_ref(), "metadata.labels['")
            .or_else(|| from_map(meta.annotations.as_ref(), "metadata.annotations['")),
    };
    value.ok_or_else(|| format!("unsupported fieldRef {path}"))
}

fn secret_data(secret: &Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    // stringData is write-only on a real server, but a Secret built in a test may carry it.
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// `$(NAME)` becomes the value of an earlier variable; `$$(NAME)` is a
/// literal `$(NAME)`; an unknown reference stays as written (kubelet rules).
fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(literal) = tail.strip_prefix("$$") {
            out.push('$');
            rest = literal;
        } else if let Some(inner) = tail.strip_prefix("$(") {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(n, _)| n == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&tail[..end + 3]),
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str(tail);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, EnvFromSource, EnvVarSource, SecretKeySelector,
    };
    use k8s_openapi::ByteString;

    fn pod() -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some("api-1".into());
        pod.metadata.namespace = Some("ocr".into());
        pod.metadata.labels = Some([("app".to_string(), "ocr".to_string())].into());
        pod
    }

    fn sources() -> EnvSources {
        let secret = Secret {
            data: Some([("url".to_string(), ByteString(b"mysql://x".to_vec()))].into()),
            ..Secret::default()
        };
        let cm = ConfigMap {
            data: Some([("A".to_string(), "from-cm".to_string())].into()),
            ..ConfigMap::default()
        };
        EnvSources {
            pod_ip: "10.245.0.7".into(),
            host_ip: "127.0.0.1".into(),
            config_maps: [("cm".to_string(), cm)].into(),
            secrets: [("db".to_string(), secret)].into(),
            api_host: "127.0.0.1".into(),
            api_port: 6443,
        }
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn get<'a>(env: &'a [(String, String)], name: &str) -> Option<&'a str> {
        env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn env_overrides_env_from_and_expands_earlier_variables() {
        let container = Container {
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm".into(),
                    optional: None,
                }),
                ..EnvFromSource::default()
            }]),
            env: Some(vec![
                var("B", "b-$(A)-$$(A)-$(NOPE)"),
                var("A", "own"),
                EnvVar {
                    name: "DB".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "db".into(),
                            key: "url".into(),
                            optional: None,
                        }),
                        ..EnvVarSource::default()
                    }),
                },
                EnvVar {
                    name: "IP".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "status.podIP".into(),
                            api_version: None,
                        }),
                        ..EnvVarSource::default()
                    }),
                },
            ]),
            ..Container::default()
        };
        let env = resolve(&pod(), &container, &sources()).expect("resolves");
        assert_eq!(get(&env, "B"), Some("b-from-cm-$(A)-$(NOPE)"));
        assert_eq!(get(&env, "A"), Some("own"));
        assert_eq!(get(&env, "DB"), Some("mysql://x"));
        assert_eq!(get(&env, "IP"), Some("10.245.0.7"));
        assert_eq!(get(&env, "KUBERNETES_SERVICE_HOST"), Some("127.0.0.1"));
        assert_eq!(get(&env, "HOSTNAME"), Some("api-1"));
    }

    #[test]
    fn a_missing_required_secret_key_is_an_error_and_an_optional_one_is_left_out() {
        let reference = |optional| EnvVar {
            name: "X".into(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "db".into(),
                    key: "password".into(),
                    optional,
                }),
                ..EnvVarSource::default()
            }),
        };
        let required = Container {
            env: Some(vec![reference(None)]),
            ..Container::default()
        };
        let error = resolve(&pod(), &required, &sources()).expect_err("missing key");
        assert!(error.contains("password"), "{error}");
        let optional = Container {
            env: Some(vec![reference(Some(true))]),
            ..Container::default()
        };
        let env = resolve(&pod(), &optional, &sources()).expect("optional");
        assert_eq!(get(&env, "X"), None);
    }

    #[test]
    fn labels_are_readable_through_field_refs() {
        let field = ObjectFieldSelector {
            field_path: "metadata.labels['app']".into(),
            api_version: None,
        };
        assert_eq!(
            field_value(&pod(), &field, &sources()).as_deref(),
            Ok("ocr")
        );
    }
}
