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

/// Uploads up to this size to a directory in memory (tmpfs) are written in
/// place on the calling runtime thread: a write of a few kilobytes there
/// takes microseconds, less than handing it to the blocking pool and back
/// (two thread wake-ups per job, a fifth of the API's CPU at saturation).
/// Larger ones, and every write that must reach a disk or a server (whose
/// flush takes milliseconds), go to the blocking pool so they do not stall
/// the other requests of their thread.
const INLINE_PUT_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    /// The directory of a local store: writes go straight to the file
    /// system, in the layout `LocalFileSystem` reads.
    local_root: Option<Arc<std::path::Path>>,
    /// Whether the directory is in memory (tmpfs): small writes run in
    /// place (see [`INLINE_PUT_BYTES`]) and nothing is flushed, as nothing
    /// there survives a reboot anyway. Elsewhere a `put` returns only once
    /// the file and its name are on the disk: the job row that points at it
    /// is committed right after, and must never outlive its input in a
    /// machine crash.
    in_memory: bool,
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
        let mut in_memory = false;
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
            in_memory = is_in_memory(&root);
            local_root = Some(Arc::from(root.as_path()));
            Arc::new(LocalFileSystem::new_with_prefix(&root).map_err(|e| config(e.to_string()))?)
        };
        Ok(BlobStore {
            inner,
            local_root,
            in_memory,
        })
    }

    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        if let Some(file) = self.local_file(key) {
            // Flushed up to the store's folder, where nothing else lives in memory.
            let durable = (!self.in_memory).then(|| self.local_root.clone()).flatten();
            let written = if self.in_memory && bytes.len() <= INLINE_PUT_BYTES {
                write_replacing(&file, &bytes, None)
            } else {
                tokio::task::spawn_blocking(move || {
                    write_replacing(&file, &bytes, durable.as_deref())
                })
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

/// Whether `dir` is on a file system that lives in memory (tmpfs, ramfs).
fn is_in_memory(dir: &std::path::Path) -> bool {
    const TMPFS: u32 = 0x0102_1994;
    const RAMFS: u32 = 0x8584_58f6;
    matches!(file_system_magic(dir), Some(TMPFS | RAMFS))
}

/// The magic number `statfs` gives for the file system that holds `dir`.
#[cfg(target_os = "linux")]
fn file_system_magic(dir: &std::path::Path) -> Option<u32> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and statfs writes only into `stat`,
    // which is read only when the call succeeded.
    let kind = unsafe {
        if libc::statfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init().f_type
    };
    // File system magic numbers are 32-bit; some platforms sign-extend them.
    Some(kind as u32)
}

#[cfg(not(target_os = "linux"))]
fn file_system_magic(_dir: &std::path::Path) -> Option<u32> {
    None
}

/// Flushes a folder's entries (a new or renamed file's name) to the disk.
fn sync_folder(folder: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(folder)?.sync_all()
}

/// Writes `bytes` to `file` as one atomic replacement: a reader sees the
/// old content or all of the new, never a part (a staging file in the same
/// folder, renamed over it). Creates missing folders. With `durable` (the
/// store's folder, which holds `file`), the content, the name and any folder
/// created for it are on the disk when it returns: a crash of the machine
/// right after cannot lose or empty the file.
fn write_replacing(
    file: &std::path::Path,
    bytes: &[u8],
    durable: Option<&std::path::Path>,
) -> std::io::Result<()> {
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
    let parent = file.parent().unwrap_or(std::path::Path::new("."));
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
                create_folders(parent, durable)?;
                created_folders = true;
                continue;
            }
            // Another writer's staging file (this process's earlier life).
            Err(err) if err.kind() == ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        };
        let written = out
            .write_all(bytes)
            .and_then(|()| match durable {
                Some(_) => out.sync_data(),
                None => Ok(()),
            })
            .and_then(|()| {
                drop(out);
                std::fs::rename(&staging, file)
            })
            .and_then(|()| match durable {
                Some(_) => sync_folder(parent),
                None => Ok(()),
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

/// `create_dir_all`, and with `durable` (a folder above `folder`) the name of
/// every folder between the two flushed in the folder that holds it. All of
/// them, not only those this call created: a folder another writer created
/// a moment ago may not be flushed yet, and this file is lost with it.
/// Taken once per new folder, so the few extra flushes do not matter.
fn create_folders(
    folder: &std::path::Path,
    durable: Option<&std::path::Path>,
) -> std::io::Result<()> {
    std::fs::create_dir_all(folder)?;
    if let Some(root) = durable {
        for created in folder.ancestors().take_while(|f| *f != root) {
            if let Some(holder) = created.parent() {
                sync_folder(holder)?;
            }
        }
    }
    Ok(())
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
    fn only_tmpfs_and_ramfs_count_as_memory() {
        let shm = std::path::Path::new("/dev/shm");
        if shm.is_dir() {
            assert!(is_in_memory(shm), "/dev/shm is tmpfs");
        }
        // procfs stands for any other file system (ext4, NFS, CephFS...).
        assert!(!is_in_memory(std::path::Path::new("/proc")));
        assert!(!is_in_memory(std::path::Path::new("/no/such/dir")));
    }

    /// Extents of `file` as the file system reports them without flushing
    /// it first (`FS_IOC_FIEMAP` without `FIEMAP_FLAG_SYNC`): on ext4, data
    /// still only in the page cache shows as a delayed-allocation extent.
    #[cfg(target_os = "linux")]
    fn unwritten_extents(file: &std::path::Path) -> Vec<u32> {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Extent {
            logical: u64,
            physical: u64,
            length: u64,
            reserved64: [u64; 2],
            flags: u32,
            reserved: [u32; 3],
        }
        #[repr(C)]
        #[derive(Default)]
        struct Fiemap {
            start: u64,
            length: u64,
            flags: u32,
            mapped_extents: u32,
            extent_count: u32,
            reserved: u32,
            extents: [Extent; 16],
        }
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        const EXTENT_UNKNOWN: u32 = 0x2;
        const EXTENT_DELALLOC: u32 = 0x4;
        let handle = std::fs::File::open(file).expect("open");
        let mut map = Fiemap {
            length: u64::MAX,
            extent_count: 16,
            ..Fiemap::default()
        };
        // SAFETY: `map` is a `struct fiemap` with room for the 16 extents
        // `extent_count` announces; the kernel writes only inside it.
        let rc = unsafe { libc::ioctl(handle.as_raw_fd(), FS_IOC_FIEMAP, &mut map) };
        assert_eq!(rc, 0, "FIEMAP: {}", std::io::Error::last_os_error());
        map.extents[..map.mapped_extents as usize]
            .iter()
            .map(|e| e.flags & (EXTENT_UNKNOWN | EXTENT_DELALLOC))
            .filter(|&flags| flags != 0)
            .collect()
    }

    /// The job row is committed right after `put`: the input must already
    /// be on the disk then, or a machine crash leaves a job whose input is
    /// empty. ext4 (this machine's and CI's /tmp) shows data not yet
    /// written as delayed-allocation extents, and writes back on its own
    /// only after seconds.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_local_put_returns_once_the_input_is_on_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ext4 = file_system_magic(dir.path()) == Some(0xef53);
        if !ext4 {
            eprintln!("skipped: {} is not on ext4", dir.path().display());
            return;
        }
        // The check itself: a plain write leaves delayed extents behind.
        let plain = dir.path().join("plain");
        std::fs::write(&plain, vec![1u8; 64 * 1024]).expect("write");
        assert!(
            !unwritten_extents(&plain).is_empty(),
            "a plain write should still be in the page cache"
        );

        let blobs =
            BlobStore::from_url(&format!("file://{}", dir.path().display())).expect("store");
        for (key, len) in [("inputs/small", 5_000), ("results/new/large", 600_000)] {
            blobs
                .put(key, Bytes::from(vec![7u8; len]))
                .await
                .expect("put");
            let unwritten = unwritten_extents(&dir.path().join(key));
            assert!(
                unwritten.is_empty(),
                "{key}: extents not on the disk yet after put: {unwritten:?}"
            );
        }
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
