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
}

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
    if !spec.mounts.is_empty() {
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
        let mut mounts = spec.mounts.clone();
        // Parents before children: /var/run/secrets before /var/run/secrets/x.
        mounts.sort_by_key(|m| m.target.components().count());
        for m in &mounts {
            bind(m)?;
        }
    }
    std::env::set_current_dir(&spec.workdir).map_err(|source| LaunchError::Workdir {
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
    Err(LaunchError::Exec {
        program: program.clone(),
        source: error,
    })
}

fn bind(m: &BindMount) -> Result<(), LaunchError> {
    let prepared = if m.source.is_dir() {
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
        Some(&m.source),
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
