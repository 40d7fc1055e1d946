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

/// Uploads up to this size to a directory on a local file system are
/// written in place on the calling runtime thread: a page-cache write of a
/// few kilobytes takes microseconds, less than handing it to the blocking
/// pool and back (two thread wake-ups per job, a fifth of the API's CPU at
/// saturation). Larger ones, and every write to a network file system
/// (whose `close` waits for the server), go to the blocking pool so they do
/// not stall the other requests of their thread.
const INLINE_PUT_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    /// The directory of a local store: writes go straight to the file
    /// system, in the layout `LocalFileSystem` reads.
    local_root: Option<Arc<std::path::Path>>,
    /// Whether small writes may run in place (see [`INLINE_PUT_BYTES`]).
    inline_writes: bool,
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
        let mut local_root = None;
        let mut inline_writes = false;
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
            let root =
                std::fs::canonicalize(dir).map_err(|e| config(format!("resolving {dir}: {e}")))?;
            inline_writes = writes_stay_in_page_cache(&root);
            local_root = Some(Arc::from(root.as_path()));
            Arc::new(LocalFileSystem::new_with_prefix(&root).map_err(|e| config(e.to_string()))?)
        };
        Ok(BlobStore {
            inner,
            local_root,
            inline_writes,
        })
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        if let Some(file) = self.local_file(key) {
            let written = if self.inline_writes && bytes.len() <= INLINE_PUT_BYTES {
                write_replacing(&file, &bytes)
            } else {
                tokio::task::spawn_blocking(move || write_replacing(&file, &bytes))
                    .await
                    .unwrap_or_else(|join| Err(std::io::Error::other(join.to_string())))
            };
            return written.map_err(|source| BlobError::Io {
                op: "put",
                key: key.to_owned(),
                source: object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(source),
                },
            });
        }
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

impl BlobStore {
    /// The file that holds `key` in a local store, for keys made of plain
    /// path segments (every key this crate makes); others, which
    /// `LocalFileSystem` would percent-encode, go through it.
    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        let root = self.local_root.as_ref()?;
        let plain = |segment: &str| {
            !segment.is_empty()
                && !segment.starts_with('.')
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        key.split('/').all(plain).then(|| root.join(key))
    }
}

/// Whether `dir` is on a file system known to keep writes in this machine's
/// page cache (tmpfs, ext4, XFS, Btrfs, overlayfs, ZFS, F2FS): a small
/// write there takes microseconds. Network file systems (NFS, CephFS, SMB,
/// FUSE...) and anything unknown say no.
#[cfg(target_os = "linux")]
fn writes_stay_in_page_cache(dir: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const LOCAL: [u32; 9] = [
        0x0102_1994, // tmpfs
        0x8584_58f6, // ramfs
        0x0000_ef53, // ext2, ext3, ext4
        0x5846_5342, // XFS
        0x9123_683e, // Btrfs
        0x794c_7630, // overlayfs (a container's own file system)
        0x2fc1_2fc1, // ZFS
        0xf2f5_2010, // F2FS
        0x0000_4d44, // FAT
    ];
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and statfs writes only into `stat`,
    // which is read only when the call succeeded.
    let kind = unsafe {
        if libc::statfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return false;
        }
        stat.assume_init().f_type
    };
    // File system magic numbers are 32-bit; some platforms sign-extend them.
    LOCAL.contains(&(kind as u32))
}

#[cfg(not(target_os = "linux"))]
fn writes_stay_in_page_cache(_dir: &std::path::Path) -> bool {
    false
}

/// Writes `bytes` to `file` as one atomic replacement: a reader sees the
/// old content or all of the new, never a part (a staging file in the same
/// folder, renamed over it). Creates missing folders.
fn write_replacing(file: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::{ErrorKind, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    // Staging names end in `#` and digits, which `LocalFileSystem` never
    // lists (its own staging files look the same), so `count` and the
    // store's readers never see a half-written blob.
    static STAGED: AtomicU64 = AtomicU64::new(0);
    // Read once: `getpid` is a system call per write otherwise.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let pid = *PID.get_or_init(std::process::id);
    let mut created_folders = false;
    for _ in 0..8 {
        let n = STAGED.fetch_add(1, Ordering::Relaxed);
        let mut staging = file.as_os_str().to_owned();
        staging.push(format!("#{pid}{n:012}"));
        let staging = std::path::PathBuf::from(staging);
        let mut out = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(out) => out,
            Err(err) if err.kind() == ErrorKind::NotFound && !created_folders => {
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                created_folders = true;
                continue;
            }
            // Another writer's staging file (this process's earlier life).
            Err(err) if err.kind() == ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        };
        let written = out.write_all(bytes).and_then(|()| {
            drop(out);
            std::fs::rename(&staging, file)
        });
        if written.is_err() {
            let _ = std::fs::remove_file(&staging);
        }
        return written;
    }
    Err(std::io::Error::other(format!(
        "no free staging name next to {}",
        file.display()
    )))
}

/// Key of a job's input image.
pub fn input_key(job: crate::domain::JobId) -> String {
    format!("inputs/{job}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_under(dir: &std::path::Path) -> Vec<String> {
        let mut names = Vec::new();
        let mut folders = vec![dir.to_owned()];
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).expect("read folder") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    folders.push(path);
                } else {
                    let relative = path.strip_prefix(dir).expect("under dir");
                    names.push(relative.display().to_string());
                }
            }
        }
        names.sort();
        names
    }

    #[tokio::test]
    async fn local_writes_read_back_replace_whole_and_leave_no_staging_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs =
            BlobStore::from_url(&format!("file://{}", dir.path().display())).expect("store");
        let small = Bytes::from_static(b"a small upload");
        let large = Bytes::from(vec![7u8; INLINE_PUT_BYTES + 1]);

        blobs
            .put("inputs/job-1", small.clone())
            .await
            .expect("put small");
        blobs
            .put("results/deep/job-2.json", large.clone())
            .await
            .expect("put large");
        assert_eq!(blobs.get("inputs/job-1").await.expect("get"), small);
        assert_eq!(
            blobs.get("results/deep/job-2.json").await.expect("get"),
            large
        );

        // A retried write (writer mode) replaces the document whole.
        blobs
            .put("inputs/job-1", Bytes::from_static(b"v2"))
            .await
            .expect("replace");
        assert_eq!(blobs.get("inputs/job-1").await.expect("get"), &b"v2"[..]);

        // A key this store would have to encode goes through object_store
        // and reads back the same.
        blobs
            .put("inputs/odd name", small.clone())
            .await
            .expect("put odd");
        assert_eq!(blobs.get("inputs/odd name").await.expect("get odd"), small);

        assert_eq!(blobs.count("inputs").await.expect("count"), 2);
        let files = files_under(dir.path());
        assert!(
            files.iter().all(|f| !f.contains('#')),
            "staging files left behind: {files:?}"
        );
        blobs.delete("inputs/job-1").await.expect("delete");
        assert!(blobs.get("inputs/job-1").await.is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn small_writes_run_in_place_only_on_file_systems_known_to_be_local() {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            assert!(writes_stay_in_page_cache(shm), "tmpfs is local");
        }
        // procfs stands for any file system not on the list (NFS, CephFS...).
        assert!(!writes_stay_in_page_cache(std::path::Path::new("/proc")));
        assert!(!writes_stay_in_page_cache(std::path::Path::new(
            "/no/such/dir"
        )));
    }

    #[tokio::test]
    async fn a_staging_file_is_never_listed_as_a_blob() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = BlobStore::from_url(&dir.path().display().to_string()).expect("store");
        blobs
            .put("inputs/job-1", Bytes::from_static(b"x"))
            .await
            .expect("put");
        // What a process killed mid-write leaves: a staging file, never renamed.
        std::fs::write(dir.path().join("inputs/job-2#4242000000000001"), b"half").expect("write");
        assert_eq!(blobs.count("inputs").await.expect("count"), 1);
    }

    #[tokio::test]
    async fn a_local_write_that_cannot_land_reports_its_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blobs = BlobStore::from_url(&dir.path().display().to_string()).expect("store");
        // A file where the key needs a folder.
        std::fs::write(dir.path().join("inputs"), b"not a folder").expect("write");
        let err = blobs
            .put("inputs/job-1", Bytes::from_static(b"x"))
            .await
            .expect_err("cannot write under a file");
        assert!(err.to_string().contains("inputs/job-1"), "{err}");
    }
}
