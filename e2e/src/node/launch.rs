//! Starting one container: the agent re-executes itself as `ocr-e2e-node
//! launch SPEC`, and that short-lived process enters a private mount
//! namespace, bind-mounts the pod's volumes at the container's mount paths,
//! drops to the container's user and execs the container's program.
//!
//! A separate process, because the agent is multi-threaded: between `fork`
//! and `exec` only async-signal-safe calls are allowed, and creating
//! directories, reading the spec and mounting are not that.

use std::convert::Infallible;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
use serde::{Deserialize, Serialize};

/// Everything the launch step needs, written by the agent as JSON.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LaunchSpec {
    /// `argv[0]` is a host path to the program.
    pub argv: Vec<String>,
    /// The container's whole environment; nothing of the agent's is inherited.
    pub env: Vec<(String, String)>,
    pub mounts: Vec<BindMount>,
    /// A host folder; entered before the user is dropped.
    pub workdir: PathBuf,
    pub user: Option<User>,
    /// `readOnlyRootFilesystem`: what stands for the container's root
    /// filesystem here, its working directory and `/tmp` (unless a volume is
    /// mounted there), is mounted read-only, so a program that writes outside
    /// its volumes fails as it would in the image.
    #[serde(default)]
    pub read_only_root: bool,
}

/// Where programs write when nothing else is said; read-only with the root filesystem.
pub const TMP: &str = "/tmp";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// fsGroup and supplementalGroups.
    #[serde(default)]
    pub extra_group: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("reading the launch spec {path}: {source}")]
    ReadSpec {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing the launch spec {path}: {source}")]
    ParseSpec {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the launch spec has no program")]
    NoProgram,
    #[error("entering a private mount namespace: {0}")]
    Unshare(nix::Error),
    #[error("preparing the mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting {source_path} at {target}: {errno}")]
    Mount {
        source_path: PathBuf,
        target: PathBuf,
        errno: nix::Error,
    },
    #[error("entering {path}: {source}")]
    Workdir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("switching to uid {uid} gid {gid}: {errno}")]
    User {
        uid: u32,
        gid: u32,
        errno: nix::Error,
    },
    #[error("executing {program}: {source}")]
    Exec {
        program: String,
        source: std::io::Error,
    },
}

pub fn read_spec(path: &Path) -> Result<LaunchSpec, LaunchError> {
    let text = std::fs::read(path).map_err(|source| LaunchError::ReadSpec {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&text).map_err(|source| LaunchError::ParseSpec {
        path: path.to_owned(),
        source,
    })
}

/// Never returns on success: the process becomes the container's program.
pub fn launch(spec: &LaunchSpec) -> Result<Infallible, LaunchError> {
    let (program, args) = spec.argv.split_first().ok_or(LaunchError::NoProgram)?;
    let mut workdir = spec.workdir.clone();
    // Open until the exec (close-on-exec): what the mounts and the working
    // directory are reached through.
    let mut held = Vec::new();
    if !spec.mounts.is_empty() || spec.read_only_root {
        unshare(CloneFlags::CLONE_NEWNS).map_err(LaunchError::Unshare)?;
        // Mounts made here must not propagate back to the host's namespace.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|errno| LaunchError::Mount {
            source_path: "/".into(),
            target: "/".into(),
            errno,
        })?;
        // Every source is opened before anything is mounted (and after the
        // unshare: a bind's source must be in this namespace): a volume at
        // /tmp must not hide the sources (the node's root may be under
        // /tmp), and a source keeps its own mount's flags.
        let mut mounts = Vec::new();
        for m in &spec.mounts {
            let source = open_path(&m.source)?;
            mounts.push((m, fd_path(&source)));
            held.push(source);
        }
        for m in read_only_root(spec) {
            bind(&m, &m.source)?;
        }
        // The working directory as the container sees it (read-only with the
        // root), reached through its descriptor once a volume covers /tmp.
        let dir = open_path(&spec.workdir)?;
        workdir = fd_path(&dir);
        held.push(dir);
        // Parents before children: /var/run/secrets before /var/run/secrets/x.
        mounts.sort_by_key(|(m, _)| m.target.components().count());
        for (m, source) in &mounts {
            bind(m, source)?;
        }
    }
    std::env::set_current_dir(&workdir).map_err(|source| LaunchError::Workdir {
        path: spec.workdir.clone(),
        source,
    })?;
    if let Some(user) = spec.user {
        let failed = |errno| LaunchError::User {
            uid: user.uid,
            gid: user.gid,
            errno,
        };
        let mut groups = vec![Gid::from_raw(user.gid)];
        groups.extend(user.extra_group.map(Gid::from_raw));
        setgroups(&groups).map_err(failed)?;
        setgid(Gid::from_raw(user.gid)).map_err(failed)?;
        setuid(Uid::from_raw(user.uid)).map_err(failed)?;
    }
    let error = Command::new(program)
        .args(args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .exec();
    drop(held);
    Err(LaunchError::Exec {
        program: program.clone(),
        source: error,
    })
}

/// A descriptor that only names `path` (`O_PATH`), closed on exec.
fn open_path(path: &Path) -> Result<std::fs::File, LaunchError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_PATH)
        .open(path)
        .map_err(|source| LaunchError::MountPoint {
            path: path.to_owned(),
            source,
        })
}

/// The path that reaches an open descriptor's file whatever is mounted over
/// its own path (valid while this process is still root).
fn fd_path(file: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The read-only stand-ins for the root filesystem (see [`LaunchSpec::read_only_root`]).
fn read_only_root(spec: &LaunchSpec) -> Vec<BindMount> {
    if !spec.read_only_root {
        return Vec::new();
    }
    let tmp = PathBuf::from(TMP);
    let mut folders = Vec::new();
    if !spec.mounts.iter().any(|m| m.target == tmp) {
        folders.push(tmp);
    }
    folders.push(spec.workdir.clone());
    folders
        .into_iter()
        .map(|folder| BindMount {
            source: folder.clone(),
            target: folder,
            read_only: true,
        })
        .collect()
}

/// Bind-mounts `source` (the file `m.source` names) at `m.target`.
fn bind(m: &BindMount, source: &Path) -> Result<(), LaunchError> {
    let prepared = if source.is_dir() {
        std::fs::create_dir_all(&m.target)
    } else {
        // A file mounted with subPath: the mount point must be a file.
        m.target
            .parent()
            .map(std::fs::create_dir_all)
            .unwrap_or(Ok(()))
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&m.target)
                    .map(|_| ())
            })
    };
    prepared.map_err(|source| LaunchError::MountPoint {
        path: m.target.clone(),
        source,
    })?;
    let failed = |errno| LaunchError::Mount {
        source_path: m.source.clone(),
        target: m.target.clone(),
        errno,
    };
    mount(
        Some(source),
        &m.target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(failed)?;
    if m.read_only {
        mount(
            None::<&str>,
            &m.target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(read_only_root: bool, targets: &[&str]) -> LaunchSpec {
        LaunchSpec {
            argv: vec!["/bin/true".into()],
            workdir: "/node/pods/p/rootfs/c".into(),
            mounts: targets
                .iter()
                .map(|t| BindMount {
                    source: "/node/pods/p/volumes/v".into(),
                    target: (*t).into(),
                    read_only: false,
                })
                .collect(),
            read_only_root,
            ..LaunchSpec::default()
        }
    }

    fn targets(spec: &LaunchSpec) -> Vec<(String, bool)> {
        read_only_root(spec)
            .into_iter()
            .map(|m| (m.target.display().to_string(), m.read_only))
            .collect()
    }

    #[test]
    fn a_read_only_root_covers_the_workdir_and_tmp_unless_a_volume_is_there() {
        assert!(targets(&spec(false, &[])).is_empty());
        assert_eq!(
            targets(&spec(true, &["/etc/ocr"])),
            vec![
                ("/tmp".to_string(), true),
                ("/node/pods/p/rootfs/c".to_string(), true)
            ]
        );
        assert_eq!(
            targets(&spec(true, &["/etc/ocr", "/tmp"])),
            vec![("/node/pods/p/rootfs/c".to_string(), true)],
            "the pod's /tmp volume stays writable"
        );
    }
}
