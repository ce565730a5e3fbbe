//! Containers: cgroups, namespaces, root filesystems, hardening — the
//! agent's own runtime, in process (no runc/crun, no helper binary).
//!
//! Internal to the agent; public for tests and benches.
//!
//! [`Containerizer::launch`], step by step:
//! 1. Validate the spec and precompute everything the child needs as plain
//!    data (`init::ChildPlan`): the mount plan (`plan`, pure and
//!    unit-tested), argv/envp C arrays, the executable candidates from the
//!    task's `PATH`, the capability mask.
//! 2. `clone3(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC |
//!    CLONE_PIDFD)`, done by the `zygote` (a small single-threaded process
//!    forked when the containerizer starts; the spec and fds travel over a
//!    socket, the pidfd comes back): the child becomes the container's init
//!    and starts building the root filesystem ...
//! 3. ... while the agent, in parallel, creates the cgroup with cgroups-rs
//!    (cpu shares + CFS quota, memory, pids) and sends "go" over a
//!    `SOCK_SEQPACKET` pair. The init then moves itself into the cgroup
//!    (v1: "0" into each `tasks`, which avoids an RCU grace period that
//!    `cgroup.procs` costs) before it starts the command, so the command
//!    runs in the cgroup from its first instruction.
//! 4. The init hardens itself and vfork-starts the command, which execs;
//!    `launch` returns when the init reports STARTED, or the failing step.
//!
//! Waiting is a pidfd registered with tokio (`AsyncFd`): no thread per
//! container. Killing goes through the cgroup.
//!
//! Containers outlive the agent. With [`Output::Sandbox`] the init pumps
//! the command's output into rotating files in the sandbox itself, and
//! with a `state_dir` it records the command's status there (`.corral-exit`)
//! before it exits; the agent's socket to it may close at any time. After
//! a `kill -9` of the agent, a restarted one re-adopts each container from
//! the [`ContainerCheckpoint`] it persisted ([`Containerizer::recover`]:
//! a pidfd on the init, guarded against pid reuse by the init's start
//! time), and lists what no checkpoint names
//! ([`Containerizer::orphans`]) to destroy it. Nothing is mounted in the
//! host's mount namespace: the overlay and every other mount live and die
//! with the container's.
//!
//! Why it is fast (≈ 2-3 ms for create + run `/bin/true` + destroy on an
//! overlay, vs ≈ 7-12 ms for `crun run`): no runtime binary to exec and
//! no config to parse; the rootfs setup overlaps the cgroup creation; the
//! v1 cgroup join avoids the RCU grace period of `cgroup.procs`; the
//! command is vfork-started (no page-table copy); the overlay is
//! `volatile` (no sync of the upper filesystem at teardown); only the five
//! v1 hierarchies a container needs get a directory.
//!
//! What a container costs the agent: two fds (pidfd, socket) and, while
//! waited for, one epoll registration; its output costs the agent nothing
//! (the init pumps it, with an 8 KiB buffer on its stack). The init is a copy-on-write copy of
//! the zygote, not of the agent: cloning from the busy, multi-threaded
//! agent made the agent take a copy-on-write fault (and a TLB shootdown)
//! for every page it wrote while any init lived — 35–40 % of all CPU at
//! ~190 containers/s. Without a zygote (it could not start, or died) the
//! agent clones inits itself. The kernel counts the zygote's resident pages
//! in the init's RSS, so in a memory-cgroup OOM the init can be the victim,
//! which ends the whole container (Mesos' behaviour on OOM anyway) and is
//! reported the same way.
//!
//! cgroup v2 hosts go through the same code (cgroups-rs picks the
//! hierarchy; file names and the kill method differ); they are unit-tested
//! on a fake directory tree only — the CI host is v1.
//!
//! Modules: `spec` (validation, limits), `plan` (mount plan + the `Sys`
//! trait), `cgroup` (cgroups-rs), `init` (the cloned child), `zygote` (the
//! process that clones inits), `sys` (raw syscalls, the `unsafe`), `error`.

mod cgroup;
mod error;
mod init;
mod plan;
mod spec;
pub(crate) mod sys;
mod zygote;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tracing::warn;

pub use error::ContainerError;

use cgroup::{Cgroups, Leaf};
use init::{ChildFds, ChildPlan, ExecPlan, JoinFile, LogPlan, Report, Scratch, Stage};

use crate::logs::LogConfig;
use plan::{PlannedBind, PlannedRoot};
use sys::Exit;

/// Default cgroup subtree (agent flag `--cgroup-root`).
pub const DEFAULT_CGROUP_ROOT: &str = "corral";
/// Default pids limit per container: room for real workloads, a ceiling
/// for fork bombs.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;

/// How long `launch` waits for the init to report: setup takes
/// milliseconds; a minute means something is stuck (a hung mount).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long teardown waits for killed processes to be gone.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// How containers are isolated (agent flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationConfig {
    /// Subtree under each cgroup hierarchy, e.g. `corral`; `/`-separated
    /// names of `[A-Za-z0-9._-]`.
    pub cgroup_root: String,
    /// Enforce `cpus` as a CFS quota (hard limit), not only as shares.
    pub cpu_hard_limit: bool,
    /// `pids.max` of every container (the init counts).
    pub pids_limit: u64,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        IsolationConfig {
            cgroup_root: DEFAULT_CGROUP_ROOT.to_string(),
            cpu_hard_limit: true,
            pids_limit: DEFAULT_PIDS_LIMIT,
        }
    }
}

/// What to run and how.
#[derive(Debug)]
pub struct ContainerSpec {
    /// cgroup leaf name, `[A-Za-z0-9._-]{1,128}`.
    pub id: String,
    /// `argv[0]` without a `/` is looked up in `PATH` from `env` (or a
    /// default PATH) inside the container's root.
    pub argv: Vec<String>,
    /// The whole environment (nothing is inherited from the agent).
    pub env: Vec<(String, String)>,
    /// Working directory inside the container.
    pub cwd: PathBuf,
    pub rootfs: RootFs,
    pub hostname: String,
    /// Bind mounts, attached after the root is pivoted so their targets
    /// resolve (and are created) inside the container root.
    pub mounts: Vec<BindMount>,
    /// `(uid, gid)`; `None` runs as root (uid 0) in the container.
    pub user: Option<(u32, u32)>,
    /// `cpu.shares = cpus * 1024` (min 2); CFS quota `cpus * 100 ms` per
    /// 100 ms when the hard limit is on.
    pub cpus_milli: u64,
    /// Memory limit (v1: also memory+swap when swap accounting exists).
    pub mem_bytes: u64,
    /// Where stdout and stderr go (stdin is /dev/null).
    pub output: Output,
    /// A host directory where the init records how the command ended
    /// (`.corral-exit`: `exit N` or `signal N`, replaced atomically), so the status
    /// outlives the agent; `None`: only the agent hears it.
    pub state_dir: Option<PathBuf>,
    /// A network namespace to join (a pod's, shared by its containers);
    /// `None`: the host's network.
    pub netns: Option<OwnedFd>,
}

/// Where a container's stdout and stderr go.
#[derive(Debug)]
pub enum Output {
    /// The command writes to these itself (files, or pipes the caller
    /// reads: then the output stops being read when the caller dies).
    Fds { stdout: OwnedFd, stderr: OwnedFd },
    /// The init pumps both into `<dir>/stdout` and `<dir>/stderr`, rotated
    /// as [`crate::logs::RotatingFile`] does (`stdout.1` … per `logs`), so
    /// the output is captured with or without an agent. The live files are
    /// created (truncated) by the init before the command starts.
    Sandbox { dir: PathBuf, logs: LogConfig },
}

/// The container's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RootFs {
    /// The host's root, in the container's own mount namespace: fresh
    /// `/proc` for the pid namespace, read-only `/sys`, private `/dev/shm`,
    /// masks applied; the host's files and `/dev` stay reachable, so this is
    /// for trusted plain command tasks (normally with `user`). Missing bind
    /// mount targets are created on the host's filesystem.
    Host,
    /// overlayfs. `lower`: read-only layer dirs, top-most first (overlay
    /// `lowerdir` order); `upper`, `work`: dirs the caller created on one
    /// filesystem; `target`: mountpoint dir the caller created. Mounted
    /// inside the container's mount namespace, so it vanishes with the
    /// container and nothing is left mounted on the host.
    Overlay {
        lower: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
        target: PathBuf,
    },
}

/// A host path bind-mounted into the container (recursively).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// How a container's command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerExit {
    /// Exit code, when the command exited.
    pub code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// The kernel OOM-killed a process of this container.
    pub oom_killed: bool,
    pub mem_limit_bytes: u64,
}

/// What a restarted agent needs to re-adopt a container
/// ([`Containerizer::recover`]): persist it (it is small, plain data) when
/// [`Containerizer::launch`] returns, from [`Container::checkpoint`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ContainerCheckpoint {
    pub id: String,
    /// Host pid of the init.
    pub pid: u32,
    /// The init's start time (`/proc/PID/stat` field 22, clock ticks after
    /// boot): a pid reused by another process has another. 0 if the init
    /// had already ended when the checkpoint was taken.
    pub start_time: u64,
    /// `/proc/sys/kernel/random/boot_id` at launch: after a reboot no
    /// container survives, and a pid may be anyone's.
    pub boot_id: String,
    /// The containerizer's cgroup subtree (`IsolationConfig::cgroup_root`).
    pub cgroup_root: String,
    /// The container's cgroup directories, one per hierarchy (for
    /// operators; recovery derives them from the id and the root).
    pub cgroups: Vec<PathBuf>,
    /// Where the init records the command's status (`ContainerSpec::state_dir`).
    pub state_dir: Option<PathBuf>,
    /// The sandbox the init writes the logs into (`Output::Sandbox`).
    pub sandbox: Option<PathBuf>,
    pub cpus_milli: u64,
    pub mem_bytes: u64,
}

/// What [`Containerizer::recover`] found.
#[derive(Debug)]
pub enum Recovered {
    /// The init still runs: adopted. The handle waits (pidfd), kills
    /// (cgroup), samples usage and destroys as a launched one does; its
    /// `wait` reads the status from the state directory.
    Running(Container),
    /// The command ended while no agent ran; `exit` is what its init
    /// recorded (with `oom_killed` from the cgroup). The handle's `wait`
    /// returns the same at once; `destroy` removes the cgroup.
    Exited {
        container: Container,
        exit: ContainerExit,
    },
    /// Neither running nor a recorded status: the init is gone without a
    /// record, its pid now belongs to another process, or the host
    /// rebooted. Nothing was adopted; remove leftovers with
    /// [`Containerizer::destroy`].
    Gone { reason: String },
}

/// Resource usage from the container's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub cpu_throttled_periods: u64,
    pub cpu_throttled_seconds: f64,
    pub mem_rss_bytes: u64,
    pub mem_cache_bytes: u64,
    pub mem_limit_bytes: u64,
    pub pids: u64,
}

/// Launches and tears down containers. `Send + Sync`; share it in an
/// `Arc`.
#[derive(Debug)]
pub struct Containerizer {
    config: IsolationConfig,
    cgroups: Cgroups,
    last_cap: u32,
    max_fd: u32,
    args_area: (usize, usize),
    /// Clones the inits; None if it could not be started (then the agent
    /// clones them itself, at a higher cost).
    zygote: Option<zygote::Zygote>,
    /// This boot's id, for checkpoints.
    boot_id: String,
}

/// `/proc/sys/kernel/random/boot_id`, trimmed; empty if unreadable.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Field 22 of `/proc/PID/stat` (the start time in clock ticks after boot),
/// counted after the parenthesised command name (which may hold spaces).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(") ")?;
    // `rest` starts at field 3 (state).
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The status an init recorded in `state_dir`, if it did.
fn recorded_exit(state_dir: &Path) -> Option<Exit> {
    let path = state_dir.join(init::EXIT_FILE.to_str().unwrap_or(".corral-exit"));
    let text = std::fs::read_to_string(path).ok()?;
    init::parse_exit_record(&text)
}

/// `(arg_start, arg_end)` of this process from /proc/self/stat (fields 48
/// and 49, counted after the parenthesised command name).
fn args_area() -> (usize, usize) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return (0, 0);
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return (0, 0);
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse().ok()).unwrap_or(0);
    (field(48), field(49))
}

impl Containerizer {
    /// Checks this process can create cgroups under `cgroup_root` (in every
    /// controller needed; the root is created) and the container
    /// namespaces. The error says why and what to do.
    pub fn new(config: IsolationConfig) -> Result<Self, ContainerError> {
        if !spec::valid_cgroup_root(&config.cgroup_root) {
            return Err(ContainerError::InvalidConfig(format!(
                "cgroup root '{}' must be '/'-separated names of [A-Za-z0-9._-]",
                config.cgroup_root
            )));
        }
        if config.pids_limit < 2 {
            return Err(ContainerError::InvalidConfig(
                "pids limit must be at least 2 (the init and the command)".into(),
            ));
        }
        init::probe_namespaces().map_err(|errno| ContainerError::Unavailable {
            reason: match errno {
                Errno::ENOSYS => "cannot create namespaces: clone3 is not supported (Linux 5.3 or newer is needed)".to_string(),
                e => format!(
                    "cannot create pid, mount, uts and ipc namespaces: {}",
                    e.desc().to_lowercase()
                ),
            },
            hint: cgroup::HINT,
        })?;
        // After the probe, so a process that may not unshare leaves no
        // cgroup root behind.
        let cgroups = Cgroups::detect(&config.cgroup_root)?;
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40u32)
            .min(63);
        let max_fd = sys::nofile_limit().min(1 << 20) as u32;
        let mut cz = Containerizer {
            config,
            cgroups,
            last_cap,
            max_fd,
            args_area: args_area(),
            zygote: None,
            boot_id: boot_id(),
        };
        match zygote::Zygote::start(&cz) {
            Ok(z) => cz.zygote = Some(z),
            Err(errno) => warn!(%errno, "cannot start the zygote; inits are cloned from the agent"),
        }
        Ok(cz)
    }

    /// The configuration this containerizer runs with.
    pub fn config(&self) -> &IsolationConfig {
        &self.config
    }

    /// Whether the host uses the cgroup v2 unified hierarchy.
    pub fn cgroup_v2(&self) -> bool {
        self.cgroups.is_v2()
    }

    /// Creates the cgroup, clones the init into new pid, mount, uts and ipc
    /// namespaces (host network), sets up the root filesystem, mounts and
    /// hardening, and execs the command. Blocking, a few milliseconds;
    /// returns once the command has been exec'd, or an error naming the
    /// step that failed and why (an exec failure of the command is an
    /// error too: "exec /bin/nope: No such file or directory"). Nothing is
    /// left behind on error.
    pub fn launch(&self, spec: &ContainerSpec) -> Result<Container, ContainerError> {
        let id = spec.id.clone();
        spec::validate(spec).map_err(|reason| ContainerError::InvalidSpec {
            id: id.clone(),
            reason,
        })?;
        let leaf = self.cgroups.leaf(&id);
        let plan = self.child_plan(spec, &leaf)?;
        let limits = spec::limits(
            spec.cpus_milli,
            spec.mem_bytes,
            self.config.cpu_hard_limit,
            self.config.pids_limit,
        );
        let sys_err = |what: &'static str| {
            let id = id.clone();
            move |errno| ContainerError::Sys { id, what, errno }
        };

        let (parent_sock, child_sock) =
            sys::socketpair_seqpacket().map_err(sys_err("create the init socket"))?;
        // The child dup2s its stdio onto 0-2; keep its own fds above that.
        let (stdout, stderr, sandbox) = match &spec.output {
            Output::Fds { stdout, stderr } => (
                Some(AboveStdio::new(stdout.as_fd()).map_err(sys_err("dup stdout"))?),
                Some(AboveStdio::new(stderr.as_fd()).map_err(sys_err("dup stderr"))?),
                None,
            ),
            Output::Sandbox { dir, .. } => {
                let fd = open_dir(&id, dir, "open the sandbox")?;
                (
                    None,
                    None,
                    Some(AboveStdio::owned(fd).map_err(sys_err("dup the sandbox fd"))?),
                )
            }
        };
        let state = match &spec.state_dir {
            Some(dir) => {
                let fd = open_dir(&id, dir, "open the state directory")?;
                // A record of an earlier run in the same place would be
                // taken for this one's.
                let _ = std::fs::remove_file(
                    dir.join(init::EXIT_FILE.to_str().unwrap_or(".corral-exit")),
                );
                Some(AboveStdio::owned(fd).map_err(sys_err("dup the state dir fd"))?)
            }
            None => None,
        };
        let child_sock = AboveStdio::owned(child_sock).map_err(sys_err("dup the init socket"))?;
        let netns = match &spec.netns {
            Some(fd) => Some(AboveStdio::new(fd.as_fd()).map_err(sys_err("dup the netns"))?),
            None => None,
        };
        let raw = |fd: &Option<AboveStdio<'_>>| fd.as_ref().map_or(-1, AboveStdio::raw);
        let fds = ChildFds {
            stdout: raw(&stdout),
            stderr: raw(&stderr),
            sock: child_sock.raw(),
            netns: raw(&netns),
            sandbox: raw(&sandbox),
            state: raw(&state),
        };
        // A zygote that is gone (killed by an operator?) costs only speed.
        let spawned = match self.zygote.as_ref().and_then(|z| z.spawn(spec, fds)) {
            Some(spawned) => spawned,
            // The command's vfork stack is only needed when we clone.
            None => init::spawn(&plan, &mut Scratch::new(&plan), fds),
        };
        let (pid, pidfd) = spawned.map_err(sys_err("clone the init"))?;
        drop((stdout, stderr, child_sock, netns, sandbox, state));
        // From here on, every error path kills and reaps the init.
        let abort = |err: ContainerError, leaf: Option<&Leaf>| {
            let _ = sys::pidfd_send_signal(&pidfd, libc::SIGKILL);
            let _ = reap(&pidfd, TEARDOWN_TIMEOUT);
            if let Some(leaf) = leaf {
                let _ = leaf.delete();
            }
            err
        };

        // The init builds the root filesystem meanwhile; it joins the
        // cgroup itself once told it exists.
        if let Err(e) = self.cgroups.create(&leaf, &limits) {
            return Err(abort(e, None));
        }
        match sys::send(parent_sock.as_raw_fd(), &Report::Go.encode()) {
            // EPIPE: the init already failed; its report is read below.
            Ok(_) | Err(Errno::EPIPE | Errno::ECONNRESET) => {}
            Err(errno) => {
                let err = ContainerError::Sys {
                    id: id.clone(),
                    what: "signal the init to go on",
                    errno,
                };
                return Err(abort(err, Some(&leaf)));
            }
        }

        match read_report(&parent_sock, LAUNCH_TIMEOUT) {
            Ok(Some(Report::Started)) => {
                // Read while the init is known to live (its pidfd is not
                // readable yet), so the time is certainly its own: inits
                // are reaped by the zygote at once, and the pid is free
                // for reuse as soon as it ends.
                let started = start_time(pid)
                    .filter(|_| !sys::poll_readable(pidfd.as_raw_fd(), 0).unwrap_or(true))
                    .unwrap_or(0);
                Ok(Container {
                    checkpoint: ContainerCheckpoint {
                        id: id.clone(),
                        pid,
                        start_time: started,
                        boot_id: self.boot_id.clone(),
                        cgroup_root: self.config.cgroup_root.clone(),
                        cgroups: leaf.dirs(),
                        state_dir: spec.state_dir.clone(),
                        sandbox: match &spec.output {
                            Output::Sandbox { dir, .. } => Some(dir.clone()),
                            Output::Fds { .. } => None,
                        },
                        cpus_milli: spec.cpus_milli,
                        mem_bytes: spec.mem_bytes,
                    },
                    id,
                    pid,
                    pidfd: Some(pidfd),
                    sock: Some(parent_sock),
                    leaf,
                    mem_limit_bytes: spec.mem_bytes,
                    exit: tokio::sync::OnceCell::new(),
                    reaped: AtomicBool::new(false),
                    destroyed: AtomicBool::new(false),
                })
            }
            Ok(Some(Report::Failed {
                stage,
                index,
                errno,
            })) => {
                let err = failure(&id, spec, &plan, stage, index, Errno::from_raw(errno));
                Err(abort(err, Some(&leaf)))
            }
            Ok(other) => {
                let status = match reap(&pidfd, TEARDOWN_TIMEOUT) {
                    Reaped::Exited(Exit::Code(c)) => format!("exit code {c}"),
                    Reaped::Exited(Exit::Signal(s)) => format!("signal {s}"),
                    Reaped::Gone | Reaped::Running => "unknown status".into(),
                };
                let what = match other {
                    None => format!("exited during setup ({status})"),
                    Some(r) => format!("sent {r:?} instead of STARTED ({status})"),
                };
                Err(abort(
                    ContainerError::Init {
                        id: id.clone(),
                        what,
                    },
                    Some(&leaf),
                ))
            }
            Err(err) => Err(abort(err.with_id(&id), Some(&leaf))),
        }
    }

    fn child_plan(&self, spec: &ContainerSpec, leaf: &Leaf) -> Result<ChildPlan, ContainerError> {
        let invalid = |reason: String| ContainerError::InvalidSpec {
            id: spec.id.clone(),
            reason,
        };
        let root = match &spec.rootfs {
            RootFs::Host => PlannedRoot::Host,
            RootFs::Overlay {
                lower,
                upper,
                work,
                target,
            } => {
                if !target.is_absolute() {
                    return Err(invalid(format!(
                        "overlay target {} is not absolute",
                        target.display()
                    )));
                }
                PlannedRoot::Overlay {
                    lower: lower.clone(),
                    upper: upper.clone(),
                    work: work.clone(),
                    target: target.clone(),
                }
            }
        };
        let mut binds = Vec::with_capacity(spec.mounts.len());
        for m in &spec.mounts {
            let meta = std::fs::metadata(&m.source)
                .map_err(|e| invalid(format!("mount source {}: {e}", m.source.display())))?;
            binds.push(PlannedBind {
                source: m.source.clone(),
                target: plan::normalize_container_path(&m.target).map_err(invalid)?,
                read_only: m.read_only,
                source_is_dir: meta.is_dir(),
            });
        }
        let mounts = plan::build(&root, &binds).map_err(invalid)?;
        let program = init::program_name(&spec.argv);
        let candidates = spec::exec_candidates(program, &spec.env);
        let exec = ExecPlan::new(&spec.argv, &spec.env, &candidates).map_err(invalid)?;
        let c = |bytes: &[u8], what: &str| {
            std::ffi::CString::new(bytes)
                .map_err(|_| invalid(format!("{what} contains a NUL byte")))
        };
        let mut join = Vec::new();
        for path in leaf.join_files() {
            // <root>/<id>/<file>: open <root> early, write <id>/<file> late.
            let (Some(file), Some(dir)) = (path.file_name(), path.parent().and_then(Path::parent))
            else {
                return Err(invalid(format!(
                    "unexpected cgroup path {}",
                    path.display()
                )));
            };
            let rel = Path::new(&spec.id).join(file);
            join.push(JoinFile {
                dir: c(dir.as_os_str().as_bytes(), "cgroup path")?,
                file: c(rel.as_os_str().as_bytes(), "cgroup path")?,
            });
        }
        Ok(ChildPlan {
            mounts,
            join,
            hostname: c(spec.hostname.as_bytes(), "hostname")?,
            cwd: c(spec.cwd.as_os_str().as_bytes(), "cwd")?,
            user: spec.user,
            keep_caps: spec::default_cap_mask(),
            last_cap: self.last_cap,
            exec,
            max_fd: self.max_fd,
            args_area: self.args_area,
            logs: match &spec.output {
                Output::Fds { .. } => None,
                Output::Sandbox { logs, .. } => Some(LogPlan::new(logs.max_size, logs.max_files)),
            },
        })
    }

    /// Re-adopts a container launched by an earlier agent process from its
    /// checkpoint. Blocking, a few file reads. The init is adopted only if
    /// its pid still runs with the checkpoint's start time (and this is the
    /// same boot); a container that ended meanwhile comes back with the
    /// status its init recorded. Errors: a checkpoint that does not fit
    /// this containerizer (another cgroup root, an invalid id) or a failed
    /// syscall.
    pub fn recover(&self, checkpoint: &ContainerCheckpoint) -> Result<Recovered, ContainerError> {
        let id = &checkpoint.id;
        let invalid = |reason: String| ContainerError::InvalidSpec {
            id: id.clone(),
            reason,
        };
        if !spec::valid_id(id) {
            return Err(invalid("checkpoint.id: not a valid container id".into()));
        }
        if checkpoint.cgroup_root != self.config.cgroup_root {
            return Err(invalid(format!(
                "checkpoint.cgroup_root: '{}', but this containerizer runs under '{}'",
                checkpoint.cgroup_root, self.config.cgroup_root
            )));
        }
        if checkpoint.boot_id != self.boot_id {
            return Ok(Recovered::Gone {
                reason: format!(
                    "the host rebooted since the container was launched (boot id {} then, {} now)",
                    checkpoint.boot_id, self.boot_id
                ),
            });
        }
        let pid = libc::pid_t::try_from(checkpoint.pid)
            .ok()
            .filter(|p| *p > 1)
            .ok_or_else(|| invalid(format!("checkpoint.pid: {} is not a pid", checkpoint.pid)))?;
        let handle = |pidfd: Option<OwnedFd>, ended: bool| Container {
            id: id.clone(),
            pid: checkpoint.pid,
            pidfd,
            sock: None,
            leaf: self.cgroups.leaf(id),
            mem_limit_bytes: checkpoint.mem_bytes,
            exit: tokio::sync::OnceCell::new(),
            reaped: AtomicBool::new(ended),
            destroyed: AtomicBool::new(false),
            checkpoint: checkpoint.clone(),
        };
        let exited = |status: Exit| {
            let container = handle(None, true);
            let oom_killed = container.leaf.oom_kills().is_ok_and(|n| n > 0);
            let exit = container_exit(status, oom_killed, checkpoint.mem_bytes);
            let _ = container.exit.set(exit);
            Recovered::Exited { container, exit }
        };
        let state = checkpoint.state_dir.as_deref();
        // A record means the command ended (the init exits right after).
        if let Some(recorded) = state.and_then(recorded_exit) {
            return Ok(exited(recorded));
        }
        let gone = |why: String| match state.and_then(recorded_exit) {
            // Written between the first look and the init's exit.
            Some(recorded) => exited(recorded),
            // An init without a record was killed; an OOM kill in its
            // cgroup says by whom (the command died with it).
            None if self.cgroups.leaf(id).oom_kills().is_ok_and(|n| n > 0) => {
                exited(Exit::Signal(libc::SIGKILL))
            }
            None => Recovered::Gone { reason: why },
        };
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(Errno::ESRCH) => {
                return Ok(gone(format!(
                    "its init (pid {pid}) ended without recording a status"
                )));
            }
            Err(errno) => {
                return Err(ContainerError::Sys {
                    id: id.clone(),
                    what: "open a pidfd for the init",
                    errno,
                });
            }
        };
        // Checked after the pidfd is open: if the start time matches now,
        // the pidfd is certainly the init's (a pid is reused only after
        // its process is gone, and the pidfd pins this one).
        match start_time(checkpoint.pid) {
            Some(t) if t == checkpoint.start_time && t != 0 => {}
            Some(_) => {
                return Ok(gone(format!(
                    "pid {pid} now belongs to another process (start time differs)"
                )));
            }
            None => {
                return Ok(gone(format!(
                    "its init (pid {pid}) ended without recording a status"
                )));
            }
        }
        if sys::poll_readable(pidfd.as_raw_fd(), 0).unwrap_or(false) {
            // Ended (a zombie nobody reaped yet); its record, if any, is
            // complete now.
            return Ok(gone(format!(
                "its init (pid {pid}) ended without recording a status"
            )));
        }
        Ok(Recovered::Running(handle(Some(pidfd), false)))
    }

    /// Ids of the containers in this containerizer's cgroup subtree that
    /// `known` does not name: orphans of an earlier agent, to be removed
    /// with [`Containerizer::destroy`] once the known ones are recovered.
    pub fn orphans(
        &self,
        known: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>, ContainerError> {
        Ok(self
            .cgroups
            .list()?
            .into_iter()
            .filter(|id| !known.contains(id))
            .collect())
    }

    /// Ids of the containers present in the cgroup subtree (for the orphan
    /// sweep at agent start; see also [`Containerizer::orphans`]).
    pub fn list(&self) -> Result<Vec<String>, ContainerError> {
        self.cgroups.list()
    }

    /// Kills every process in a container's cgroup and removes the cgroup
    /// (orphans left by a previous agent). For containers of this process,
    /// use [`Container::destroy`].
    pub fn destroy(&self, id: &str) -> Result<(), ContainerError> {
        if !spec::valid_id(id) {
            return Err(ContainerError::InvalidSpec {
                id: id.to_string(),
                reason: "not a valid container id".into(),
            });
        }
        let leaf = self.cgroups.leaf(id);
        let started = Instant::now();
        let mut pause = Duration::from_micros(100);
        // A pidfd per process seen, taken while it is known to be in the
        // cgroup: an orphan's init can be our own child (a Container leaked
        // with mem::forget), and then it must be reaped — by pidfd, so a
        // recycled pid can never make us reap someone else's child.
        let mut seen: HashMap<u64, Option<OwnedFd>> = HashMap::new();
        loop {
            let procs = leaf.procs();
            if procs.is_empty() {
                break;
            }
            if started.elapsed() > TEARDOWN_TIMEOUT {
                return Err(ContainerError::Timeout {
                    id: id.to_string(),
                    what: "waiting for the cgroup to empty",
                    seconds: TEARDOWN_TIMEOUT.as_secs(),
                });
            }
            for pid in &procs {
                seen.entry(*pid).or_insert_with(|| {
                    libc::pid_t::try_from(*pid)
                        .ok()
                        .and_then(|p| sys::pidfd_open(p).ok())
                });
            }
            leaf.kill_all()?;
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        for pidfd in seen.values().flatten() {
            // Not our child: ECHILD, nothing to do.
            let _ = reap(pidfd, Duration::from_millis(100));
        }
        leaf.delete()
    }

    /// Removes the (empty) cgroup subtree root from every hierarchy, e.g.
    /// when the agent shuts down cleanly or a test ends.
    pub fn remove_root(&self) -> Result<(), ContainerError> {
        self.cgroups.remove_root()
    }
}

/// A [`ContainerExit`] from how the command ended.
fn container_exit(exit: Exit, oom_killed: bool, mem_limit_bytes: u64) -> ContainerExit {
    let (code, signal) = match exit {
        Exit::Code(c) => (Some(c), None),
        Exit::Signal(s) => (None, Some(s)),
    };
    ContainerExit {
        code,
        signal,
        oom_killed,
        mem_limit_bytes,
    }
}

/// A directory fd for the init's `*at` calls.
fn open_dir(id: &str, dir: &Path, what: &'static str) -> Result<OwnedFd, ContainerError> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| {
        ContainerError::InvalidSpec {
            id: id.to_string(),
            reason: format!("{} contains a NUL byte", dir.display()),
        }
    })?;
    sys::open_dir(&c).map_err(|errno| ContainerError::Sys {
        id: id.to_string(),
        what,
        errno,
    })
}

/// A dup of an fd when it is 0-2, else the fd itself.
enum AboveStdio<'a> {
    Borrowed(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl<'a> AboveStdio<'a> {
    fn new(fd: BorrowedFd<'a>) -> Result<Self, Errno> {
        if fd.as_raw_fd() > 2 {
            Ok(AboveStdio::Borrowed(fd))
        } else {
            sys::dup_above_stdio(fd.as_raw_fd()).map(AboveStdio::Owned)
        }
    }
    fn owned(fd: OwnedFd) -> Result<Self, Errno> {
        if fd.as_raw_fd() > 2 {
            Ok(AboveStdio::Owned(fd))
        } else {
            sys::dup_above_stdio(fd.as_raw_fd()).map(AboveStdio::Owned)
        }
    }
    fn raw(&self) -> RawFd {
        match self {
            AboveStdio::Borrowed(fd) => fd.as_raw_fd(),
            AboveStdio::Owned(fd) => fd.as_raw_fd(),
        }
    }
}

/// A launch error before the id is known to the helper.
struct ReportError {
    what: &'static str,
    errno: Option<Errno>,
}

impl ReportError {
    fn with_id(self, id: &str) -> ContainerError {
        match self.errno {
            Some(errno) => ContainerError::Sys {
                id: id.to_string(),
                what: self.what,
                errno,
            },
            None => ContainerError::Timeout {
                id: id.to_string(),
                what: self.what,
                seconds: LAUNCH_TIMEOUT.as_secs(),
            },
        }
    }
}

/// The init's next report; `Ok(None)` when it closed the socket (died).
fn read_report(sock: &OwnedFd, timeout: Duration) -> Result<Option<Report>, ReportError> {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    match sys::poll_readable(sock.as_raw_fd(), ms) {
        Ok(true) => {}
        Ok(false) => {
            return Err(ReportError {
                what: "waiting for the init to start the command",
                errno: None,
            });
        }
        Err(errno) => {
            return Err(ReportError {
                what: "poll the init socket",
                errno: Some(errno),
            });
        }
    }
    let mut buf = [0u8; init::REPORT_LEN];
    match sys::recv(sock.as_raw_fd(), &mut buf, true) {
        Ok(0) | Err(Errno::ECONNRESET) => Ok(None),
        Ok(n) => Ok(Report::decode(buf.get(..n).unwrap_or(&[]))),
        Err(errno) => Err(ReportError {
            what: "read from the init socket",
            errno: Some(errno),
        }),
    }
}

/// What [`reap`] found.
enum Reaped {
    /// Reaped here, with its status.
    Exited(Exit),
    /// Gone, but reaped elsewhere (a `waitpid(-1)` in the process).
    Gone,
    /// Still running after the timeout.
    Running,
}

/// Waits up to `timeout` for the process behind `pidfd` to exit and reaps
/// it.
fn reap(pidfd: &OwnedFd, timeout: Duration) -> Reaped {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    if !sys::poll_readable(pidfd.as_raw_fd(), ms).unwrap_or(false) {
        return Reaped::Running;
    }
    match sys::waitid_pidfd(pidfd.as_raw_fd(), true) {
        Ok(Some(exit)) => Reaped::Exited(exit),
        Ok(None) => Reaped::Running,
        Err(_) => Reaped::Gone,
    }
}

/// The error for a setup step the init reported.
fn failure(
    id: &str,
    spec: &ContainerSpec,
    plan: &ChildPlan,
    stage: Stage,
    index: u32,
    errno: Errno,
) -> ContainerError {
    let id = id.to_string();
    let cwd = spec.cwd.display().to_string();
    let step = match stage {
        Stage::Exec => {
            return ContainerError::Exec {
                id,
                program: init::program_name(&spec.argv).to_string(),
                errno,
            };
        }
        Stage::CwdOutsideRoot => return ContainerError::CwdOutsideRoot { id, cwd },
        Stage::Mount => plan
            .mounts
            .ops
            .get(index as usize)
            .map_or_else(|| "mount".to_string(), plan::MountOp::describe),
        Stage::Chdir => format!("chdir {cwd}"),
        Stage::Setuid | Stage::Setgid => {
            let (uid, gid) = spec.user.unwrap_or((0, 0));
            format!("{} (uid {uid}, gid {gid})", stage.describe())
        }
        Stage::Hostname => format!("set hostname {:?}", spec.hostname),
        Stage::JoinCgroup => format!(
            "join cgroup ({})",
            plan.join
                .get(index as usize)
                .map_or_else(String::new, |j| format!(
                    "{}/{}",
                    j.dir.to_string_lossy(),
                    j.file.to_string_lossy()
                ))
        ),
        Stage::CapBounding => format!("{} (capability {index})", stage.describe()),
        other => other.describe().to_string(),
    };
    ContainerError::Setup { id, step, errno }
}

/// A running (or ended, not yet destroyed) container.
///
/// Dropping it without [`Container::destroy`] still kills every process in
/// its cgroup, reaps the init and removes the cgroup (best effort, logged;
/// it may block for the few milliseconds that takes).
#[derive(Debug)]
pub struct Container {
    pub id: String,
    /// Host pid of the container's init.
    pub pid: u32,
    /// `None` once the init is known to be gone (a recovered container
    /// that had ended).
    pidfd: Option<OwnedFd>,
    /// The init's report socket; `None` for a recovered container (its
    /// status comes from the state directory).
    sock: Option<OwnedFd>,
    leaf: Leaf,
    checkpoint: ContainerCheckpoint,
    mem_limit_bytes: u64,
    exit: tokio::sync::OnceCell<ContainerExit>,
    /// The init has been waited for (its pid may be reused).
    reaped: AtomicBool,
    destroyed: AtomicBool,
}

impl Container {
    /// Resolves when the command ended: how it ended (exit code or signal;
    /// the command's, not the init's) and whether the cgroup saw an OOM
    /// kill. Async on the init's pidfd registered with the current tokio
    /// runtime's reactor (no thread per container; IO must be enabled); may
    /// be called again (or concurrently) and returns the same answer.
    pub async fn wait(&self) -> Result<ContainerExit, ContainerError> {
        self.exit
            .get_or_try_init(|| self.wait_once())
            .await
            .copied()
    }

    async fn wait_once(&self) -> Result<ContainerExit, ContainerError> {
        let sys_err = |errno| ContainerError::Sys {
            id: self.id.clone(),
            what: "wait for the init",
            errno,
        };
        let io_err =
            |e: std::io::Error| sys_err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ContainerError::Sys {
                id: self.id.clone(),
                what: "wait outside a tokio runtime",
                errno: Errno::EINVAL,
            });
        }
        let init_exit = match &self.pidfd {
            Some(pidfd) if !self.reaped.load(Ordering::Acquire) => {
                let afd = sys::async_pidfd(pidfd.as_fd()).map_err(io_err)?;
                loop {
                    let mut guard = afd.readable().await.map_err(io_err)?;
                    match sys::waitid_pidfd(pidfd.as_raw_fd(), true) {
                        Ok(Some(exit)) => {
                            self.reaped.store(true, Ordering::Release);
                            break Some(exit);
                        }
                        Ok(None) => guard.clear_ready(),
                        // Reaped by someone else (a waitpid(-1) elsewhere in
                        // the process), or not our child (a recovered
                        // container): the status is on the socket or recorded.
                        Err(Errno::ECHILD) => {
                            self.reaped.store(true, Ordering::Release);
                            break None;
                        }
                        Err(e) => return Err(sys_err(e)),
                    }
                }
            }
            _ => None,
        };
        let mut buf = [0u8; init::REPORT_LEN];
        let reported =
            self.sock
                .as_ref()
                .and_then(|sock| match sys::recv(sock.as_raw_fd(), &mut buf, true) {
                    Ok(init::REPORT_LEN) => match Report::decode(&buf) {
                        Some(Report::Exited { status }) => Some(Exit::from_wait_status(status)),
                        _ => None,
                    },
                    _ => None,
                });
        // No report: the record in the state directory (a recovered
        // container's only source). Neither: the init was killed (kill(),
        // destroy, the OOM killer) together with the command, which then
        // died of the same signal.
        let exit = reported
            .or_else(|| self.checkpoint.state_dir.as_deref().and_then(recorded_exit))
            .or(init_exit)
            .unwrap_or(Exit::Signal(libc::SIGKILL));
        let oom_killed = self.leaf.oom_kills().is_ok_and(|n| n > 0);
        Ok(container_exit(exit, oom_killed, self.mem_limit_bytes))
    }

    /// What a restarted agent needs to re-adopt this container; persist it
    /// once `launch` returned.
    pub fn checkpoint(&self) -> &ContainerCheckpoint {
        &self.checkpoint
    }

    /// SIGTERM to the init, which forwards it to the command.
    pub fn terminate(&self) -> Result<(), ContainerError> {
        self.signal_init(libc::SIGTERM)
    }

    fn signal_init(&self, sig: libc::c_int) -> Result<(), ContainerError> {
        let Some(pidfd) = &self.pidfd else {
            return Ok(()); // the init is gone
        };
        match sys::pidfd_send_signal(pidfd, sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(errno) => Err(ContainerError::Sys {
                id: self.id.clone(),
                what: "signal the init",
                errno,
            }),
        }
    }

    /// SIGKILLs every process in the container's cgroup (v1: freeze, kill,
    /// thaw; v2: cgroup.kill), and the init (which takes the whole pid
    /// namespace with it). Does not wait; `wait` then reports SIGKILL.
    pub fn kill(&self) -> Result<(), ContainerError> {
        let cgroup = self.leaf.kill_all();
        self.signal_init(libc::SIGKILL)?;
        cgroup
    }

    /// CPU, throttling, memory and pids of the container, from its cgroup.
    pub fn usage(&self) -> Result<Usage, ContainerError> {
        let u = self.leaf.usage()?;
        let secs = |ns: u64| ns as f64 / 1e9;
        Ok(Usage {
            cpu_user_seconds: secs(u.user_ns),
            cpu_system_seconds: secs(u.system_ns),
            cpu_throttled_periods: u.throttled_periods,
            cpu_throttled_seconds: secs(u.throttled_ns),
            mem_rss_bytes: u.rss,
            mem_cache_bytes: u.cache,
            mem_limit_bytes: u.limit,
            pids: u.pids,
        })
    }

    /// Kills everything in the container, reaps the init and removes the
    /// cgroup from every hierarchy. Never leaves processes behind; a
    /// failure (a cgroup that will not go away) is returned, and the
    /// cgroup can then be removed later with [`Containerizer::destroy`].
    pub fn destroy(self) -> Result<(), ContainerError> {
        self.destroyed.store(true, Ordering::Release);
        self.teardown()
    }

    fn teardown(&self) -> Result<(), ContainerError> {
        if let Some(pidfd) = self
            .pidfd
            .as_ref()
            .filter(|_| !self.reaped.load(Ordering::Acquire))
        {
            let killed = self.leaf.kill_all();
            let _ = sys::pidfd_send_signal(pidfd, libc::SIGKILL);
            if let Reaped::Running = reap(pidfd, TEARDOWN_TIMEOUT) {
                killed?;
                return Err(ContainerError::Timeout {
                    id: self.id.clone(),
                    what: "waiting for the init to die",
                    seconds: TEARDOWN_TIMEOUT.as_secs(),
                });
            }
            self.reaped.store(true, Ordering::Release);
        }
        // Every process was in the init's pid namespace, which died with
        // it; exiting ones can linger in cgroup.procs for a moment.
        let started = Instant::now();
        let mut pause = Duration::from_micros(50);
        while !self.leaf.procs().is_empty() {
            if started.elapsed() > TEARDOWN_TIMEOUT {
                return Err(ContainerError::Timeout {
                    id: self.id.clone(),
                    what: "waiting for the cgroup to empty",
                    seconds: TEARDOWN_TIMEOUT.as_secs(),
                });
            }
            self.leaf.kill_all()?;
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        self.leaf.delete()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if !self.destroyed.swap(true, Ordering::AcqRel)
            && let Err(e) = self.teardown()
        {
            warn!(container = %self.id, error = %e, "cannot tear down dropped container");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_shareable_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Containerizer>();
        send_sync::<Container>();
        send_sync::<ContainerError>();
    }

    #[test]
    fn the_start_time_is_field_22_even_with_spaces_in_the_name() {
        let stat = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 200";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(parse_start_time("42 (x) S 1"), None);
        let own = start_time(std::process::id()).unwrap();
        assert!(own > 0);
    }

    #[test]
    fn checkpoints_survive_a_json_round_trip() {
        let cp = ContainerCheckpoint {
            id: "c1".into(),
            pid: 1234,
            start_time: 5678,
            boot_id: "b".into(),
            cgroup_root: "corral".into(),
            cgroups: vec!["/sys/fs/cgroup/memory/corral/c1".into()],
            state_dir: Some("/var/lib/corral/containers/c1".into()),
            sandbox: Some("/var/lib/corral/sandboxes/t".into()),
            cpus_milli: 500,
            mem_bytes: 64 << 20,
        };
        let text = serde_json::to_string(&cp).unwrap();
        assert_eq!(
            serde_json::from_str::<ContainerCheckpoint>(&text).unwrap(),
            cp
        );
    }

    #[test]
    fn the_argument_area_is_found() {
        let (start, end) = args_area();
        assert!(start > 0 && end > start, "{start:#x}..{end:#x}");
    }
}
