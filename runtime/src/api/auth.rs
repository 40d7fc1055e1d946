//! Who is calling: `Authorization: Bearer <key>` (HTTP) or `authorization`
//! metadata (gRPC) resolved to a tenant, shared by both front ends.
//!
//! Keys come from two places: the database (`ocr-runtime keys create`) and
//! an optional key folder (`auth.keys_dir`, a mounted Secret: one file per
//! tenant). A checked key is trusted for `auth.key_cache_ms`, so the accept
//! path pays no database round trip per request and a revocation takes
//! effect within that time.

use crate::config::{AuthConfig, AuthMode};
use crate::domain::tenant::{bearer_token, key_id, key_sha256, keys_in_file, Tenant};
use crate::storage::{JobStore, StoreError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Checked keys remembered at most; past it the memory is cleared (a flood of
/// made-up keys must not grow the process).
const MAX_CACHED_KEYS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this API requires a key: send `Authorization: Bearer <key>`")]
    Missing,
    #[error("the key is not valid (unknown, revoked, or not a Bearer token)")]
    Invalid,
    #[error("keys cannot be checked now (the key store is unavailable); retry shortly")]
    Unavailable(#[source] StoreError),
}

#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    required: bool,
    store: JobStore,
    folder: Option<PathBuf>,
    /// key hash -> tenant, from the key folder.
    folder_keys: RwLock<HashMap<String, Tenant>>,
    /// key hash -> what the database said, and when.
    checked: Mutex<HashMap<String, (Option<Tenant>, Instant)>>,
    trust_for: Duration,
}

/// Whether keys are required for a front end listening on `listeners`.
pub fn keys_required(mode: AuthMode, listeners: &[SocketAddr]) -> bool {
    match mode {
        AuthMode::Required => true,
        AuthMode::Disabled => false,
        AuthMode::Auto => !listeners.iter().all(|addr| addr.ip().is_loopback()),
    }
}

impl Authenticator {
    pub fn new(config: &AuthConfig, required: bool, store: JobStore) -> Authenticator {
        let folder = Some(config.keys_dir.trim())
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from);
        Authenticator {
            inner: Arc::new(Inner {
                required,
                store,
                folder,
                folder_keys: RwLock::new(HashMap::new()),
                checked: Mutex::new(HashMap::new()),
                trust_for: config.key_cache(),
            }),
        }
    }

    /// Keys optional, none from a folder (in-process tests, tools).
    pub fn optional(store: JobStore) -> Authenticator {
        Authenticator::new(&AuthConfig::default(), false, store)
    }

    pub fn required(&self) -> bool {
        self.inner.required
    }

    /// The tenant of a request with this `Authorization` value. Without
    /// one: [`AuthError::Missing`] where keys are required, the anonymous
    /// tenant where they are not. A key that is sent is always checked.
    pub async fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Tenant, AuthError> {
        let Some(value) = authorization else {
            return if self.inner.required {
                Err(AuthError::Missing)
            } else {
                Ok(Tenant::anonymous())
            };
        };
        let value = std::str::from_utf8(value).map_err(|_| AuthError::Invalid)?;
        let token = bearer_token(value).ok_or(AuthError::Invalid)?;
        let hash = key_sha256(token);
        if let Some(tenant) = self.folder_tenant(&hash) {
            return Ok(tenant);
        }
        if let Some(known) = self.remembered(&hash) {
            return known.ok_or(AuthError::Invalid);
        }
        // Only keys made by `keys create` have a row to look up; anything
        // else costs no database round trip.
        let Some(id) = key_id(token) else {
            return Err(AuthError::Invalid);
        };
        let stored = self
            .inner
            .store
            .find_key(id)
            .await
            .map_err(AuthError::Unavailable)?;
        // Comparing hashes (not keys) leaks nothing useful through timing.
        let tenant = stored
            .filter(|key| !key.revoked && key.key_sha256 == hash)
            .and_then(|key| Tenant::parse(&key.tenant).ok());
        self.remember(hash, tenant.clone());
        tenant.ok_or(AuthError::Invalid)
    }

    fn folder_tenant(&self, hash: &str) -> Option<Tenant> {
        let keys = self.inner.folder_keys.read().ok()?;
        keys.get(hash).cloned()
    }

    fn remembered(&self, hash: &str) -> Option<Option<Tenant>> {
        let checked = self.inner.checked.lock().ok()?;
        let (tenant, at) = checked.get(hash)?;
        (at.elapsed() < self.inner.trust_for).then(|| tenant.clone())
    }

    fn remember(&self, hash: String, tenant: Option<Tenant>) {
        if let Ok(mut checked) = self.inner.checked.lock() {
            if checked.len() >= MAX_CACHED_KEYS {
                checked.clear();
            }
            checked.insert(hash, (tenant, Instant::now()));
        }
    }

    /// Reads the key folder now; how many keys it holds. Without a folder, 0.
    pub async fn reload_folder(&self) -> std::io::Result<usize> {
        let Some(folder) = self.inner.folder.clone() else {
            return Ok(0);
        };
        let keys = tokio::task::spawn_blocking(move || read_key_folder(&folder))
            .await
            .map_err(std::io::Error::other)??;
        let count = keys.len();
        if let Ok(mut held) = self.inner.folder_keys.write() {
            *held = keys;
        }
        Ok(count)
    }

    /// Re-reads the key folder every `auth.key_cache_ms` until `shutdown`
    /// (a Secret's files change in place when it is edited). An unreadable
    /// folder keeps the keys last read.
    pub async fn watch_folder(self, shutdown: CancellationToken) {
        if self.inner.folder.is_none() {
            return;
        }
        let period = self.inner.trust_for.max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            if let Err(err) = self.reload_folder().await {
                tracing::warn!(error = %err, "re-reading the API key folder failed; keeping the keys read before");
            }
        }
    }
}

/// Tenant files in `folder`: each file named after its tenant. Names that
/// start with `.` are skipped (a mounted Secret keeps its data in `..data`).
fn read_key_folder(folder: &Path) -> std::io::Result<HashMap<String, Tenant>> {
    let mut keys = HashMap::new();
    let entries = std::fs::read_dir(folder)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", folder.display())))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows the Secret's symlinks; a folder is not a key file.
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        let tenant = match Tenant::parse(&name) {
            Ok(tenant) => tenant,
            Err(bad) => {
                tracing::warn!(file = %path.display(), "skipping key file: {bad}");
                continue;
            }
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let (found, too_short) = keys_in_file(&text);
        if too_short > 0 {
            tracing::warn!(%tenant, too_short, "skipping keys shorter than {} characters", crate::domain::tenant::MIN_KEY_LENGTH);
        }
        for key in found {
            keys.insert(key_sha256(key), tenant.clone());
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tenant::NewKey;
    use crate::storage::now_ms;

    async fn store() -> JobStore {
        let store = JobStore::connect("sqlite::memory:", 1)
            .await
            .expect("sqlite");
        store.migrate().await.expect("migrations");
        store
    }

    fn config(dir: &Path, cache_ms: u64) -> AuthConfig {
        AuthConfig {
            mode: AuthMode::Required,
            keys_dir: dir.display().to_string(),
            key_cache_ms: cache_ms,
        }
    }

    fn bearer(key: &str) -> Vec<u8> {
        format!("Bearer {key}").into_bytes()
    }

    #[test]
    fn auto_requires_keys_unless_every_listener_is_loopback() {
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let local6: SocketAddr = "[::1]:50051".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert!(!keys_required(AuthMode::Auto, &[local, local6]));
        assert!(keys_required(AuthMode::Auto, &[local, any]));
        assert!(keys_required(AuthMode::Required, &[local]));
        assert!(!keys_required(AuthMode::Disabled, &[any]));
    }

    #[tokio::test]
    async fn database_keys_name_their_tenant_until_revoked() {
        let store = store().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = Authenticator::new(&config(dir.path(), 0), true, store.clone());
        let key = NewKey::generate().expect("randomness");
        let acme = Tenant::parse("acme").unwrap();
        store
            .create_key(&acme, &key, now_ms())
            .await
            .expect("stored");

        let tenant = auth.authenticate(Some(&bearer(&key.token))).await;
        assert_eq!(tenant.expect("valid key"), acme);
        assert!(matches!(
            auth.authenticate(None).await,
            Err(AuthError::Missing)
        ));
        let other = NewKey::generate().expect("randomness");
        assert!(matches!(
            auth.authenticate(Some(&bearer(&other.token))).await,
            Err(AuthError::Invalid)
        ));
        // Same id, wrong secret.
        let last = if key.token.ends_with('0') { "1" } else { "0" };
        let forged = format!("{}{last}", &key.token[..key.token.len() - 1]);
        assert!(matches!(
            auth.authenticate(Some(&bearer(&forged))).await,
            Err(AuthError::Invalid)
        ));

        assert!(store.revoke_key(&key.id, now_ms()).await.expect("revoked"));
        assert!(matches!(
            auth.authenticate(Some(&bearer(&key.token))).await,
            Err(AuthError::Invalid)
        ));
    }

    #[tokio::test]
    async fn a_checked_key_is_trusted_for_the_cache_time() {
        let store = store().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = Authenticator::new(&config(dir.path(), 60_000), true, store.clone());
        let key = NewKey::generate().expect("randomness");
        let acme = Tenant::parse("acme").unwrap();
        store
            .create_key(&acme, &key, now_ms())
            .await
            .expect("stored");
        auth.authenticate(Some(&bearer(&key.token)))
            .await
            .expect("valid");
        store.revoke_key(&key.id, now_ms()).await.expect("revoked");
        // Within key_cache_ms the process still trusts it: the documented delay.
        auth.authenticate(Some(&bearer(&key.token)))
            .await
            .expect("still trusted from the cache");
    }

    #[tokio::test]
    async fn folder_keys_follow_their_files() {
        let store = store().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let long = "a-key-from-a-kubernetes-secret-0123456789";
        std::fs::write(dir.path().join("team-a"), format!("{long}\n")).unwrap();
        std::fs::write(dir.path().join("team-b"), "too-short\n").unwrap();
        std::fs::write(dir.path().join("Bad Name"), format!("{long}-x\n")).unwrap();
        std::fs::create_dir(dir.path().join("..data")).unwrap();
        let auth = Authenticator::new(&config(dir.path(), 0), true, store);
        assert_eq!(auth.reload_folder().await.expect("readable"), 1);
        let tenant = auth.authenticate(Some(&bearer(long))).await.expect("valid");
        assert_eq!(tenant.as_str(), "team-a");
        assert!(auth.authenticate(Some(b"Bearer too-short")).await.is_err());

        std::fs::remove_file(dir.path().join("team-a")).unwrap();
        auth.reload_folder().await.expect("readable");
        assert!(matches!(
            auth.authenticate(Some(&bearer(long))).await,
            Err(AuthError::Invalid)
        ));
    }

    #[tokio::test]
    async fn where_keys_are_optional_a_sent_key_is_still_checked() {
        let store = store().await;
        let auth = Authenticator::optional(store);
        assert_eq!(
            auth.authenticate(None).await.expect("anonymous"),
            Tenant::anonymous()
        );
        assert!(matches!(
            auth.authenticate(Some(b"Bearer not-a-key")).await,
            Err(AuthError::Invalid)
        ));
        assert!(matches!(
            auth.authenticate(Some(&[0xff, 0xfe])).await,
            Err(AuthError::Invalid)
        ));
    }
}
