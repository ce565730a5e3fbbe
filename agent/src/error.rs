//! The error of [`crate::run`] and [`crate::detect_resources`].

use std::path::PathBuf;

/// Why the agent could not start, or why it stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot create work dir {path}: {source}")]
    WorkDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--work-dir {path}: containers mount their own {mount}, so they could not see their \
         sandboxes there; choose a work dir outside /dev, /proc and /sys"
    )]
    WorkDirHiddenFromContainers { path: PathBuf, mount: &'static str },
    #[error("cannot read {path}: {source}")]
    ReadMeminfo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {reason}")]
    ParseMeminfo { path: PathBuf, reason: String },
    #[error("cannot statvfs {path}: {source}")]
    Statvfs {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("cannot determine the number of cpus: {0}")]
    Cpus(std::io::Error),
    #[error("invalid master address '{master}': {reason}")]
    InvalidMaster { master: String, reason: String },
    #[error("cannot read the listener's local address: {0}")]
    ListenerAddress(std::io::Error),
    #[error("agent api server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("the master removed the agent: {message}")]
    RemovedByMaster { message: String },
    #[error("agent {what} stopped unexpectedly: {reason}")]
    Internal { what: &'static str, reason: String },
    #[error("cannot open the image store: {0}")]
    Images(#[from] crate::images::ImageError),
    #[error("persistent volumes: {0}")]
    Volumes(#[from] crate::volumes::VolumeError),
    /// The checkpoint cannot be read (the error names the file) or the
    /// work dir is another agent's.
    #[error("agent recovery: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Containers are impossible here (no root, no cgroups): the message
    /// says why and suggests `--isolation=none`.
    #[error("{0}")]
    Isolation(String),
}
