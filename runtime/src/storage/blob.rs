//! Input images (and, in writer mode, result documents) live in an object
//! store: a local directory by default, any `object_store` URL otherwise.

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutPayload};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store URL {url:?}: {reason}")]
    Config { url: String, reason: String },
    #[error("blob store {op} {key}: {source}")]
    Io {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
}

#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
}

impl BlobStore {
    /// `file:///abs/dir` or a plain path: a local directory (created if missing);
    /// `s3://bucket/prefix`: S3 or any S3-compatible store, configured by the
    /// standard `AWS_*` variables (`AWS_ENDPOINT` for MinIO and friends,
    /// `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint); `memory://`: process
    /// memory (tests).
    pub fn from_url(url: &str) -> Result<Self, BlobError> {
        let config = |reason: String| BlobError::Config {
            url: ocr_contract::redact_url(url),
            reason,
        };
        let inner: Arc<dyn ObjectStore> = if url.starts_with("memory:") {
            Arc::new(InMemory::new())
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(config("no bucket name".into()));
            }
            let s3 = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()
                .map_err(|e| config(e.to_string()))?;
            let prefix = prefix.trim_matches('/');
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(PrefixStore::new(s3, prefix))
            }
        } else {
            let dir = url.strip_prefix("file://").unwrap_or(url);
            if dir.contains("://") {
                return Err(config("use file://, s3:// or memory://".into()));
            }
            std::fs::create_dir_all(dir).map_err(|e| config(format!("creating {dir}: {e}")))?;
            Arc::new(LocalFileSystem::new_with_prefix(dir).map_err(|e| config(e.to_string()))?)
        };
        Ok(BlobStore { inner })
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        self.inner
            .put(&ObjectPath::from(key), PutPayload::from(bytes))
            .await
            .map_err(|source| BlobError::Io {
                op: "put",
                key: key.to_owned(),
                source,
            })?;
        Ok(())
    }

    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let io = |source| BlobError::Io {
            op: "get",
            key: key.to_owned(),
            source,
        };
        self.inner
            .get(&ObjectPath::from(key))
            .await
            .map_err(io)?
            .bytes()
            .await
            .map_err(io)
    }

    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        match self.inner.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(BlobError::Io {
                op: "delete",
                key: key.to_owned(),
                source,
            }),
        }
    }

    /// Number of stored objects under `prefix`; tests use it to prove that a
    /// rejected request left nothing behind.
    pub async fn count(&self, prefix: &str) -> Result<usize, BlobError> {
        use futures::TryStreamExt;
        let prefix = ObjectPath::from(prefix);
        let listed: Vec<_> =
            self.inner
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|source| BlobError::Io {
                    op: "list",
                    key: prefix.to_string(),
                    source,
                })?;
        Ok(listed.len())
    }
}

/// Key of a job's input image.
pub fn input_key(job: crate::domain::JobId) -> String {
    format!("inputs/{job}")
}
