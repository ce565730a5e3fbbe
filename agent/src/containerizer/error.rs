//! [`ContainerError`]: what went wrong, with the container id, the step and
//! the path in the message.

use nix::errno::Errno;

/// `ENOENT` → "No such file or directory" (without nix's `ENOENT: ` prefix).
pub(crate) fn errno_text(errno: Errno) -> &'static str {
    errno.desc()
}

/// Why a containerizer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The containerizer cannot run on this host (missing privileges,
    /// controllers or kernel features); the message says what to do.
    #[error("{reason}; {hint}")]
    Unavailable { reason: String, hint: &'static str },
    #[error("invalid isolation config: {0}")]
    InvalidConfig(String),
    #[error("invalid container spec for '{id}': {reason}")]
    InvalidSpec { id: String, reason: String },
    #[error("container {id}: cannot {op} cgroup {path}: {reason}")]
    Cgroup {
        id: String,
        op: &'static str,
        path: String,
        reason: String,
    },
    /// A setup step in the cloned child failed (a mount, the hostname,
    /// capabilities, the user switch, chdir...).
    #[error("container {id}: {step}: {}", errno_text(*errno))]
    Setup {
        id: String,
        step: String,
        errno: Errno,
    },
    /// The working directory is not inside the container root (never a
    /// leaked host directory; CVE-2024-21626).
    #[error("container {id}: cwd {cwd} is outside the container root")]
    CwdOutsideRoot { id: String, cwd: String },
    /// The command could not be executed.
    #[error("container {id}: exec {program}: {}", errno_text(*errno))]
    Exec {
        id: String,
        program: String,
        errno: Errno,
    },
    /// The init died before reporting (killed from outside, OOM during
    /// setup) or spoke nonsense.
    #[error("container {id}: init {what}")]
    Init { id: String, what: String },
    #[error("container {id}: {what}: {}", errno_text(*errno))]
    Sys {
        id: String,
        what: &'static str,
        errno: Errno,
    },
    #[error("container {id}: cannot read {path}: {source}")]
    Read {
        id: String,
        path: String,
        source: std::io::Error,
    },
    #[error("container {id}: timed out after {seconds} s {what}")]
    Timeout {
        id: String,
        what: &'static str,
        seconds: u64,
    },
}
