//! A pod's volumes as host folders: ConfigMaps, Secrets, projected
//! service-account tokens and downward API files are written out;
//! emptyDirs are fresh folders; a PersistentVolumeClaim is its bound
//! PersistentVolume's hostPath (or a folder per claim), so every pod that
//! mounts one claim sees the same files.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, PersistentVolume, PersistentVolumeClaim, Pod,
    Secret, ServiceAccount, Volume,
};
use kube::api::PostParams;
use kube::{Api, Client};

use super::env::{field_value, EnvSources};

/// The host folder (or file) of each volume, by volume name.
pub type Prepared = BTreeMap<String, PathBuf>;

/// Why a volume is not ready yet; the pod waits in `ContainerCreating` and retries.
#[derive(Debug, thiserror::Error)]
#[error("volume {volume}: {message}")]
pub struct VolumeError {
    pub volume: String,
    pub message: String,
}

pub async fn prepare(
    client: &Client,
    pod: &Pod,
    pod_dir: &Path,
    pvc_root: &Path,
    sources: &EnvSources,
) -> Result<Prepared, VolumeError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut prepared = Prepared::new();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone());
    for volume in volumes.iter().flatten() {
        let fail = |message: String| VolumeError {
            volume: volume.name.clone(),
            message,
        };
        let dir = pod_dir.join("volumes").join(&volume.name);
        let path = prepare_one(client, pod, &namespace, volume, &dir, pvc_root, sources)
            .await
            .map_err(fail)?;
        prepared.insert(volume.name.clone(), path);
    }
    Ok(prepared)
}

async fn prepare_one(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
    dir: &Path,
    pvc_root: &Path,
    sources: &EnvSources,
) -> Result<PathBuf, String> {
    if volume.empty_dir.is_some() {
        // The kubelet makes emptyDirs world-writable: any container user may write.
        fresh_dir(dir, 0o777)?;
        return Ok(dir.to_owned());
    }
    if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        if host.type_.as_deref() == Some("DirectoryOrCreate") {
            std::fs::create_dir_all(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
        return Ok(path);
    }
    if let Some(cm) = &volume.config_map {
        fresh_dir(dir, 0o755)?;
        let keys = Keys {
            items: cm.items.as_deref(),
            mode: cm.default_mode,
            optional: cm.optional == Some(true),
        };
        project::<ConfigMap>(client, namespace, &cm.name, config_map_files, keys, dir).await?;
        return Ok(dir.to_owned());
    }
    if let Some(s) = &volume.secret {
        fresh_dir(dir, 0o755)?;
        let name = s.secret_name.clone().unwrap_or_default();
        let keys = Keys {
            items: s.items.as_deref(),
            mode: s.default_mode,
            optional: s.optional == Some(true),
        };
        project::<Secret>(client, namespace, &name, secret_files, keys, dir).await?;
        return Ok(dir.to_owned());
    }
    if let Some(claim) = &volume.persistent_volume_claim {
        return claim_folder(client, namespace, &claim.claim_name, pvc_root).await;
    }
    if let Some(downward) = &volume.downward_api {
        fresh_dir(dir, 0o755)?;
        let files = downward.items.as_deref().unwrap_or_default();
        write_downward(pod, files, downward.default_mode, sources, dir)?;
        return Ok(dir.to_owned());
    }
    if let Some(projected) = &volume.projected {
        fresh_dir(dir, 0o755)?;
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let jwt = service_account_token(
                    client,
                    pod,
                    namespace,
                    token.audience.clone(),
                    token.expiration_seconds,
                )
                .await?;
                write_file(dir, &token.path, jwt.as_bytes(), projected.default_mode)?;
            }
            if let Some(cm) = &source.config_map {
                let keys = Keys {
                    items: cm.items.as_deref(),
                    mode: projected.default_mode,
                    optional: cm.optional == Some(true),
                };
                project::<ConfigMap>(client, namespace, &cm.name, config_map_files, keys, dir)
                    .await?;
            }
            if let Some(s) = &source.secret {
                let keys = Keys {
                    items: s.items.as_deref(),
                    mode: projected.default_mode,
                    optional: s.optional == Some(true),
                };
                project::<Secret>(client, namespace, &s.name, secret_files, keys, dir).await?;
            }
            if let Some(downward) = &source.downward_api {
                let files = downward.items.as_deref().unwrap_or_default();
                write_downward(pod, files, projected.default_mode, sources, dir)?;
            }
        }
        return Ok(dir.to_owned());
    }
    Err("this volume type is not supported by the e2e node agent".into())
}

/// The folder behind a claim: only a Bound claim is usable, as on a real node.
async fn claim_folder(
    client: &Client,
    namespace: &str,
    claim: &str,
    pvc_root: &Path,
) -> Result<PathBuf, String> {
    let pvc = get::<PersistentVolumeClaim>(client, namespace, claim)
        .await?
        .ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" not found"))?;
    let phase = pvc.status.as_ref().and_then(|s| s.phase.clone());
    if phase.as_deref() != Some("Bound") {
        return Err(format!("persistentvolumeclaim \"{claim}\" is not bound"));
    }
    let volume_name = pvc.spec.as_ref().and_then(|s| s.volume_name.clone());
    if let Some(name) = volume_name {
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let pv = pvs
            .get_opt(&name)
            .await
            .map_err(|e| format!("reading persistentvolume {name}: {e}"))?;
        let spec = pv.and_then(|pv| pv.spec);
        let host = spec
            .as_ref()
            .and_then(|s| s.host_path.as_ref().map(|h| h.path.clone()));
        let local = spec
            .as_ref()
            .and_then(|s| s.local.as_ref().map(|l| l.path.clone()));
        if let Some(path) = host.or(local) {
            return Ok(PathBuf::from(path));
        }
    }
    let dir = pvc_root.join(namespace).join(claim);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

async fn service_account_token(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    audience: Option<String>,
    expiration_seconds: Option<i64>,
) -> Result<String, String> {
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration_seconds.unwrap_or(3607)),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let answer = accounts
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("requesting a token for serviceaccount {account}: {e}"))?;
    answer
        .status
        .map(|s| s.token)
        .ok_or_else(|| format!("the token request for serviceaccount {account} had no status"))
}

async fn get<K>(client: &Client, namespace: &str, name: &str) -> Result<Option<K>, String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.get_opt(name).await.map_err(|e| {
        format!(
            "reading {} {name}: {e}",
            K::kind(&K::DynamicType::default())
        )
    })
}

/// Which keys of a ConfigMap or Secret a volume projects, and how.
struct Keys<'a> {
    items: Option<&'a [KeyToPath]>,
    mode: Option<i32>,
    optional: bool,
}

/// Writes the keys of one ConfigMap or Secret into `dir`; a missing object
/// is an error unless the volume marks it optional.
async fn project<K>(
    client: &Client,
    namespace: &str,
    name: &str,
    files_of: fn(&K) -> BTreeMap<String, Vec<u8>>,
    keys: Keys<'_>,
    dir: &Path,
) -> Result<(), String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    match get::<K>(client, namespace, name).await? {
        Some(found) => write_items(dir, &files_of(&found), keys.items, keys.mode),
        None if keys.optional => Ok(()),
        None => Err(format!(
            "{} \"{name}\" not found",
            K::kind(&K::DynamicType::default()).to_lowercase()
        )),
    }
}

fn write_downward(
    pod: &Pod,
    files: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
    sources: &EnvSources,
    dir: &Path,
) -> Result<(), String> {
    for item in files {
        if let Some(field) = &item.field_ref {
            let value = field_value(pod, field, sources)?;
            write_file(
                dir,
                &item.path,
                value.as_bytes(),
                item.mode.or(default_mode),
            )?;
        }
    }
    Ok(())
}

fn config_map_files(cm: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut files: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in cm.binary_data.iter().flatten() {
        files.insert(k.clone(), v.0.clone());
    }
    files
}

fn secret_files(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

fn write_items(
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
) -> Result<(), String> {
    match items {
        None => {
            for (key, bytes) in files {
                write_file(dir, key, bytes, default_mode)?;
            }
        }
        Some(items) => {
            for item in items {
                let bytes = files
                    .get(&item.key)
                    .ok_or_else(|| format!("no key {} to project", item.key))?;
                write_file(dir, &item.path, bytes, item.mode.or(default_mode))?;
            }
        }
    }
    Ok(())
}

fn write_file(dir: &Path, relative: &str, bytes: &[u8], mode: Option<i32>) -> Result<(), String> {
    if Path::new(relative).is_absolute() || relative.split('/').any(|part| part == "..") {
        return Err(format!("path {relative} leaves the volume"));
    }
    let path = dir.join(relative);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    // 0644 is the API's default for every projected file.
    let mode = mode.unwrap_or(0o644) as u32;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn fresh_dir(dir: &Path, mode: u32) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_project_selected_keys_with_their_modes_and_stay_inside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files: BTreeMap<String, Vec<u8>> = [
            ("ocr.toml".to_string(), b"[server]".to_vec()),
            ("other".to_string(), b"x".to_vec()),
        ]
        .into();
        let items = [KeyToPath {
            key: "ocr.toml".into(),
            path: "conf/ocr.toml".into(),
            mode: Some(0o600),
        }];
        write_items(dir.path(), &files, Some(&items), None).expect("written");
        let written = dir.path().join("conf/ocr.toml");
        assert_eq!(std::fs::read(&written).expect("file"), b"[server]");
        let mode = std::fs::metadata(&written)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!dir.path().join("other").exists());
        let escape = [KeyToPath {
            key: "other".into(),
            path: "../escape".into(),
            mode: None,
        }];
        assert!(write_items(dir.path(), &files, Some(&escape), None).is_err());
    }
}
