//! Tasks as plain child processes: sandbox, launch, signals, waiting.
//!
//! Each task runs in its own process group (`setpgid(0, 0)` in the child,
//! via `process_group(0)`), so signals reach everything the command started,
//! and everything is SIGKILLed once the main process is gone. cgroups and
//! namespaces come in a later issue.

use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use corral_proto::pb;
use corral_proto::{FrameworkId, TaskId};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The only files of a sandbox the agent API serves.
pub(crate) const SANDBOX_FILES: [&str; 2] = ["stdout", "stderr"];

/// `PATH` of every task; the agent's own environment is not passed on, so
/// tasks do not depend on how the agent was started.
pub(crate) const TASK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One error per thing that can go wrong launching a task; the message ends
/// up in the TASK_FAILED update.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LaunchError {
    #[error("cannot start '{program}': {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

/// `<work_dir>/sandboxes/<framework_id>/<task_id>`; the ids are validated
/// newtypes, so they cannot climb out of the work dir.
pub(crate) fn sandbox_path(
    work_dir: &Path,
    framework_id: &FrameworkId,
    task_id: &TaskId,
) -> PathBuf {
    work_dir
        .join("sandboxes")
        .join(framework_id.as_str())
        .join(task_id.as_str())
}

/// What a task needs to start.
pub(crate) struct LaunchSpec<'a> {
    pub(crate) sandbox: &'a Path,
    pub(crate) framework_id: &'a FrameworkId,
    pub(crate) task_id: &'a TaskId,
    pub(crate) agent_id: &'a str,
    pub(crate) command: &'a pb::CommandInfo,
}

/// Starts the command in its (existing) sandbox, writing to the given
/// stdout/stderr (the write ends of the log pipes).
///
/// The environment is built from scratch: `PATH` (above), `HOME` = the
/// sandbox (tasks get a private writable home instead of the agent's),
/// `CORRAL_SANDBOX`, `CORRAL_TASK_ID`, `CORRAL_FRAMEWORK_ID`,
/// `CORRAL_AGENT_ID`, then the task's own variables, which win. stdin is
/// `/dev/null`. `shell`: `/bin/sh -c value`; otherwise `value` is executed
/// with `arguments` as the whole argv (argv[0] included, as in Mesos).
///
/// Runs on the caller's thread: mkdir, two opens and a fork/exec are short,
/// and doing them in order keeps the launch simple.
pub(crate) fn launch(
    spec: &LaunchSpec<'_>,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Child, LaunchError> {
    let cmd = spec.command;
    let (program, mut command) = if cmd.shell {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(&cmd.value);
        ("/bin/sh".to_string(), c)
    } else {
        let mut c = Command::new(&cmd.value);
        if let Some((argv0, rest)) = cmd.arguments.split_first() {
            c.arg0(argv0).args(rest);
        }
        (cmd.value.clone(), c)
    };
    command
        .current_dir(spec.sandbox)
        .env_clear()
        .env("PATH", TASK_PATH)
        .env("HOME", spec.sandbox)
        .env("CORRAL_SANDBOX", spec.sandbox)
        .env("CORRAL_TASK_ID", spec.task_id.as_str())
        .env("CORRAL_FRAMEWORK_ID", spec.framework_id.as_str())
        .env("CORRAL_AGENT_ID", spec.agent_id)
        .envs(&cmd.environment)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        // The waiter owns the child and kills its whole group itself.
        .kill_on_drop(false);
    command
        .spawn()
        .map_err(|source| LaunchError::Spawn { program, source })
}

/// Sends `signal` to the process group `pgid`. A group that is already gone
/// (ESRCH) is not an error: the task exited on its own.
pub(crate) fn signal_group(pgid: u32, signal: Signal) -> Result<(), Errno> {
    let Ok(raw) = i32::try_from(pgid) else {
        return Err(Errno::EINVAL);
    };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// SIGKILLs a process group when dropped while armed: if the waiter is
/// dropped (agent aborted, test runtime torn down) no task outlives it.
struct GroupKillGuard(Option<u32>);

impl GroupKillGuard {
    fn fire(&mut self) {
        if let Some(pgid) = self.0.take()
            && let Err(e) = signal_group(pgid, Signal::SIGKILL)
        {
            tracing::warn!(pgid, error = %e, "cannot kill process group");
        }
    }
}

impl Drop for GroupKillGuard {
    fn drop(&mut self) {
        self.fire();
    }
}

/// How a task's main process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Termination {
    Exited(i32),
    Signaled(i32),
    /// waitpid failed; the group was killed anyway.
    WaitFailed(String),
}

impl From<ExitStatus> for Termination {
    fn from(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Termination::Exited(code),
            (None, Some(sig)) => Termination::Signaled(sig),
            (None, None) => Termination::WaitFailed(format!("unexpected wait status {status}")),
        }
    }
}

/// Waits for the main process without blocking the runtime (tokio reaps on
/// SIGCHLD), then SIGKILLs its group so nothing it started is left behind.
pub(crate) async fn wait(mut child: Child, pgid: u32) -> Termination {
    let mut guard = GroupKillGuard(Some(pgid));
    let termination = match child.wait().await {
        Ok(status) => Termination::from(status),
        Err(e) => Termination::WaitFailed(e.to_string()),
    };
    guard.fire();
    termination
}

/// The signal's name for messages, e.g. `SIGTERM`.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    Signal::try_from(sig).map_or("unknown signal", Signal::as_str)
}

/// The start time of process `pid` in clock ticks since boot
/// (`/proc/<pid>/stat` field 22, proc(5)): with the pid, it names one
/// process for the whole boot, even after the pid is reused.
pub(crate) fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'. Field 3 is the first after it, so 22 is the 20th.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How long a process that started at `start_ticks` (`/proc/PID/stat`
/// field 22, on this boot) has run, from `/proc/uptime`. The unit is
/// USER_HZ, 100 per second on every architecture Linux exports it for.
pub(crate) fn running_for(start_ticks: u64) -> Option<std::time::Duration> {
    const USER_HZ: f64 = 100.0;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let now: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let started = start_ticks as f64 / USER_HZ;
    let ran = now - started;
    (ran.is_finite() && ran >= 0.0).then(|| std::time::Duration::from_secs_f64(ran))
}

/// SIGKILLs the process group of a plain-process task that an earlier run
/// of the agent started, if its leader is still that process (same start
/// time). Such processes outlive a `kill -9` of the agent; the agent cannot
/// wait for them (they are not its children any more), so it ends them
/// rather than leave a second copy of a task it reports ended. True if it
/// signalled the group.
pub(crate) fn kill_leftover_group(pgid: u32, start_ticks: u64) -> bool {
    if start_ticks == 0 || process_start_ticks(pgid) != Some(start_ticks) {
        return false;
    }
    match signal_group(pgid, Signal::SIGKILL) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(pgid, error = %e, "cannot kill a task's leftover process group");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn a_process_has_run_since_its_start_time() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let ticks = process_start_ticks(child.id()).unwrap();
        let ran = running_for(ticks).unwrap();
        // Started just now: well under a few seconds (ticks are 10 ms).
        assert!(ran < std::time::Duration::from_secs(3), "{ran:?}");
        // A process that started 2 s of ticks earlier ran 2 s longer.
        let earlier = running_for(ticks.saturating_sub(200)).unwrap();
        let diff = earlier.saturating_sub(ran).as_secs_f64();
        assert!((1.9..2.2).contains(&diff), "{diff}");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_leftover_group_is_killed_only_when_its_leader_is_the_same_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let ticks = process_start_ticks(pid).expect("start time of a live process");
        // Another start time: a reused pid, not the task's process.
        assert!(!kill_leftover_group(pid, ticks + 1));
        assert!(!kill_leftover_group(pid, 0));
        assert!(child.try_wait().unwrap().is_none(), "left alone");
        assert!(kill_leftover_group(pid, ticks));
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert_eq!(process_start_ticks(pid), None);
    }
}
