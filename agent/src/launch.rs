//! From a `RunTask` to a running task: sandbox, log pipes, image (resolved
//! or pulled), the container spec, and the launch itself, all off the
//! actor's loop. Then the task's whole life until it ended: wait, destroy,
//! drain the logs, remove the container's root filesystem dirs.
//!
//! The spec is built by pure functions (command, environment, user,
//! volumes) that are unit-tested without root.
//!
//! Containers outlive the agent: their init writes the output into the
//! sandbox and records the exit status in `.corral-exit` in the sandbox (a
//! host container) or in `<work_dir>/containers/<id>/` (an image
//! container; see `containerizer`). For a restarted agent, each started container
//! comes with a [`LaunchCheckpoint`] ([`Running::checkpoint`], in
//! `Command::Started`) to persist, [`Launcher::recover`] re-adopts one
//! and runs the rest of its task's life, and [`orphans`] /
//! [`destroy_orphans`] remove what no checkpoint names. Plain processes
//! (`--isolation=none`) are not recoverable: their output goes through
//! the agent.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use corral_proto::{FrameworkId, TaskId, pb};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::actor::{Command, StreamKey};
use crate::config::Isolation;
use crate::containerizer::{
    BindMount, Container, ContainerCheckpoint, ContainerSpec, Containerizer, Output, Recovered,
    RootFs,
};
use crate::health::{self, ContainerEntry, ExecTarget, ProbeTarget};
use crate::images::{ImageConfig, ImageStore};
use crate::logs::{self, LogConfig, RotatingFile};
use crate::network::PodNetwork;
use crate::task::{self, TASK_PATH, Termination};
use crate::volumes::{VolumeKey, Volumes};

/// Where an image task sees its sandbox (`CORRAL_SANDBOX`).
pub(crate) const CONTAINER_SANDBOX: &str = "/mnt/sandbox";
/// How long the log pumps may take to drain after the task is gone.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the launcher needs from the agent, shared by every launch.
#[derive(Clone)]
pub(crate) struct Launcher {
    pub(crate) isolation: Isolation,
    pub(crate) containerizer: Option<Arc<Containerizer>>,
    pub(crate) images: Arc<ImageStore>,
    pub(crate) work_dir: PathBuf,
    pub(crate) allowed_host_paths: Vec<PathBuf>,
    pub(crate) log: LogConfig,
    /// Layers of running containers, by container id (for image GC).
    pub(crate) layers_in_use: Arc<dashmap::DashMap<String, Vec<String>>>,
    /// Container launches are CPU-bound syscall work on the blocking pool:
    /// a few at a time keep a burst of thousands from growing the pool to
    /// hundreds of threads (and their memory) for no gain in throughput.
    pub(crate) launch_slots: Arc<tokio::sync::Semaphore>,
    /// The agent's pod bridge and pods' namespaces; `None` without
    /// container isolation (no pods then).
    pub(crate) network: Option<Arc<PodNetwork>>,
    /// Why this agent cannot run pods, when it cannot.
    pub(crate) pods_unavailable: Option<String>,
}

/// One task to start.
pub(crate) struct LaunchRequest {
    pub(crate) key: StreamKey,
    pub(crate) framework_id: FrameworkId,
    pub(crate) task_id: TaskId,
    pub(crate) agent_id: String,
    pub(crate) info: pb::TaskInfo,
    pub(crate) sandbox: PathBuf,
    /// Set for the tasks of a pod: what they share.
    pub(crate) pod: Option<PodLaunch>,
}

/// What the containers of one pod share.
#[derive(Debug, Clone)]
pub(crate) struct PodLaunch {
    /// The pod's address on the agent's pod bridge.
    pub(crate) ip: String,
    /// The pod's network namespace.
    pub(crate) netns: Arc<OwnedFd>,
    /// The pod's volumes: name → directory on the agent.
    pub(crate) volumes: HashMap<String, PathBuf>,
}

/// The pod's [`PodLaunch`] again, after an agent restart: its namespace
/// reopened from the network's pin (the sweep of old pod networks at start
/// keeps the pods being recovered).
pub(crate) fn recover_pod(
    network: Option<&PodNetwork>,
    checkpoint: &pb::PodCheckpoint,
) -> Result<PodLaunch, String> {
    let network = network.ok_or("this agent has no pod network")?;
    crate::network::validate_pod_id(&checkpoint.pod_id)
        .map_err(|e| format!("pod checkpoint pod_id: {e}"))?;
    let pin = network.config().netns_dir.join(&checkpoint.pod_id);
    let netns = std::fs::File::open(&pin).map_err(|e| {
        format!(
            "pod {}: cannot open its netns {}: {e}",
            checkpoint.pod_id,
            pin.display()
        )
    })?;
    Ok(PodLaunch {
        ip: checkpoint.ip.clone(),
        netns: Arc::new(OwnedFd::from(netns)),
        volumes: checkpoint
            .volumes
            .iter()
            .map(|(name, dir)| (name.clone(), PathBuf::from(dir)))
            .collect(),
    })
}

/// How command probes enter a container (its command's cwd, environment
/// and user), kept so probes work on a recovered container too.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ExecCheckpoint {
    pub(crate) cwd: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) user: Option<(u32, u32)>,
}

/// What the agent persists for each started container task so that a
/// restarted agent can re-adopt it with [`Launcher::recover`]. Plain data
/// (serde); take it from [`Running::checkpoint`] when `Command::Started`
/// arrives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct LaunchCheckpoint {
    pub(crate) container: ContainerCheckpoint,
    /// Image layers the container's root filesystem uses (kept from the
    /// image GC while it runs).
    pub(crate) layers: Vec<String>,
    /// The task has health checks: probes are rebuilt on recovery.
    pub(crate) checked: bool,
    /// Where HTTP and TCP probes go: the pod's IP, else loopback.
    pub(crate) probe_host: IpAddr,
    /// Set when the task has command probes.
    pub(crate) exec: Option<ExecCheckpoint>,
}

/// A task re-adopted by [`Launcher::recover`].
pub(crate) struct RecoveredTask {
    /// What the actor holds, as for a launched task.
    pub(crate) running: Running,
    /// The probe target, when the task has health checks.
    pub(crate) probes: Option<Arc<ProbeTarget>>,
    /// The command had ended while no agent ran (its recorded status
    /// arrives as `Command::Exited` at once).
    pub(crate) ended_while_down: bool,
}

/// Container dirs and cgroups that no checkpoint names ([`orphans`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Orphans {
    /// Container ids with a cgroup in the agent's subtree.
    pub(crate) cgroups: Vec<String>,
    /// Dirs under `<work_dir>/containers`.
    pub(crate) dirs: Vec<PathBuf>,
}

/// What an earlier agent left that `known` (the ids of the containers
/// recovered from checkpoints) does not name. Blocking (directory reads).
pub(crate) fn orphans(
    containerizer: Option<&Containerizer>,
    work_dir: &Path,
    known: &std::collections::HashSet<String>,
) -> Result<Orphans, String> {
    let cgroups = match containerizer {
        Some(c) => c.orphans(known).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let root = work_dir.join("containers");
    let mut dirs = Vec::new();
    match std::fs::read_dir(&root) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot list {}: {e}", root.display()))?;
                let name = entry.file_name();
                if !name.to_str().is_some_and(|n| known.contains(n)) {
                    dirs.push(entry.path());
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot list {}: {e}", root.display())),
    }
    dirs.sort();
    Ok(Orphans { cgroups, dirs })
}

/// Kills and removes every orphan ([`orphans`]): the cgroups' processes
/// and cgroups, then the dirs. Blocking; failures are logged and the rest
/// still removed. Returns what was removed.
pub(crate) fn destroy_orphans(
    containerizer: Option<&Containerizer>,
    work_dir: &Path,
    known: &std::collections::HashSet<String>,
) -> Orphans {
    let found = match orphans(containerizer, work_dir, known) {
        Ok(found) => found,
        Err(e) => {
            warn!(error = %e, "cannot list orphan containers");
            return Orphans::default();
        }
    };
    let mut removed = Orphans::default();
    if let Some(c) = containerizer {
        for id in found.cgroups {
            warn!(container_id = %id, "destroying an orphan container");
            match c.destroy(&id) {
                Ok(()) => removed.cgroups.push(id),
                Err(e) => warn!(container_id = %id, error = %e, "cannot destroy orphan container"),
            }
        }
    }
    for dir in found.dirs {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => removed.dirs.push(dir),
            Err(e) => {
                warn!(path = %dir.display(), error = %e, "cannot remove an orphan container dir")
            }
        }
    }
    removed
}

/// A started task, as the actor holds it.
#[derive(Debug, Clone)]
pub(crate) enum Running {
    /// A plain process (`--isolation=none`), in its own process group.
    Process { pgid: u32 },
    /// The actor only observes the container (signals, usage); the
    /// launcher owns it, so its teardown happens once, on the blocking
    /// pool, never on the actor's loop.
    Container {
        pid: u32,
        container: std::sync::Weak<Container>,
        /// To persist, so a restarted agent can re-adopt the container.
        checkpoint: Arc<LaunchCheckpoint>,
    },
}

impl Running {
    pub(crate) fn pid(&self) -> u32 {
        match self {
            Running::Process { pgid } => *pgid,
            Running::Container { pid, .. } => *pid,
        }
    }

    /// What to persist to re-adopt the task after an agent restart; `None`
    /// for a plain process, which cannot be re-adopted.
    pub(crate) fn checkpoint(&self) -> Option<&LaunchCheckpoint> {
        match self {
            Running::Process { .. } => None,
            Running::Container { checkpoint, .. } => Some(checkpoint),
        }
    }

    /// SIGTERM: to the process group, or to the container's init, which
    /// forwards it to the command.
    pub(crate) fn terminate(&self) -> Result<(), String> {
        match self {
            Running::Process { pgid } => {
                task::signal_group(*pgid, nix::sys::signal::Signal::SIGTERM)
                    .map_err(|e| e.to_string())
            }
            Running::Container { container, .. } => match container.upgrade() {
                Some(c) => c.terminate().map_err(|e| e.to_string()),
                None => Ok(()), // already gone
            },
        }
    }

    /// SIGKILL to everything the task started.
    pub(crate) fn kill(&self) -> Result<(), String> {
        match self {
            Running::Process { pgid } => {
                task::signal_group(*pgid, nix::sys::signal::Signal::SIGKILL)
                    .map_err(|e| e.to_string())
            }
            Running::Container { container, .. } => match container.upgrade() {
                Some(c) => c.kill().map_err(|e| e.to_string()),
                None => Ok(()),
            },
        }
    }
}

/// The log pumps of one task.
type Pumps = Vec<tokio::task::JoinHandle<std::io::Result<u64>>>;
/// A started task: what the actor holds, what the launcher waits on, its
/// log pumps, its container id, and how its command probes get in.
type Started = (Running, Handle, Pumps, Option<String>, Option<ExecTarget>);
/// A started process or container, its id and how command probes get in.
type Launched = (Running, Handle, Option<String>, Option<ExecTarget>);

/// What the launcher waits on.
enum Handle {
    Process(tokio::process::Child, u32),
    Container(Arc<Container>),
}

/// How a launch ended badly: the task fails with this message.
#[derive(Debug)]
pub(crate) struct LaunchFailure(pub(crate) String);

/// How the task ended, for the final status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ended {
    pub(crate) termination: Termination,
    /// The cgroup's OOM killer fired; with the limit in bytes.
    pub(crate) oom_limit: Option<u64>,
}

impl Launcher {
    /// Runs the task's whole life; reports `Started` (or `LaunchFailed`)
    /// and then `Ended` to the actor.
    pub(crate) async fn run(self, req: LaunchRequest, tx: mpsc::Sender<Command>) {
        let key = req.key.clone();
        // Boxed: the launch's large state (spec, image, paths) is freed once
        // it is done instead of sizing this long-lived future for its whole
        // life (thousands of containers wait here).
        let started = Box::pin(self.start(&req)).await;
        let task_id = req.task_id.clone();
        let checked = !req.info.health_checks.is_empty();
        // HTTP and TCP probes go to the task's address: a pod's own IP, else
        // the host's loopback (the task shares the host's network).
        let probe_host = req
            .pod
            .as_ref()
            .and_then(|p| p.ip.parse().ok())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        drop(req);
        let (running, handle, pumps, container_id, exec) = match started {
            Ok(s) => s,
            Err(LaunchFailure(message)) => {
                let _ = tx.send(Command::LaunchFailed { key, message }).await;
                return;
            }
        };
        let pid = running.pid();
        let _ = tx
            .send(Command::Started {
                key: key.clone(),
                running: running.clone(),
                probes: checked.then(|| {
                    Arc::new(ProbeTarget {
                        host: probe_host,
                        exec,
                        // Not waited for yet (below), so not reaped: the
                        // pidfd is certainly this task's process.
                        main: health::pidfd_open(pid).ok(),
                    })
                }),
            })
            .await;
        self.finish(key, pid, handle, pumps, container_id, task_id, tx)
            .await;
    }

    /// The rest of a started task's life: wait for it, drain its log pumps,
    /// free its container's dir and layers, tell the actor it `Exited`.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        key: StreamKey,
        pid: u32,
        handle: Handle,
        pumps: Pumps,
        container_id: Option<String>,
        task_id: TaskId,
        tx: mpsc::Sender<Command>,
    ) {
        let ended = Box::pin(self.wait(handle)).await;
        // The task is gone; what it wrote is drained before anyone is told,
        // so the sandbox has all of it when the final update goes out. (A
        // container's init drains its pipes itself before it exits.)
        for pump in pumps {
            match tokio::time::timeout(LOG_DRAIN_TIMEOUT, pump).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => warn!(task_id = %task_id, error = %e, "log pump failed"),
                Ok(Err(e)) => warn!(task_id = %task_id, error = %e, "log pump panicked"),
                Err(_) => warn!(task_id = %task_id, "log pump did not drain in time"),
            }
        }
        if let Some(id) = container_id {
            self.layers_in_use.remove(&id);
            let dir = self.container_dir(&id);
            if dir.exists()
                && let Err(e) = tokio::fs::remove_dir_all(&dir).await
            {
                warn!(container_id = %id, error = %e, "cannot remove container dir");
            }
        }
        let _ = tx.send(Command::Exited { key, pid, ended }).await;
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.work_dir.join("containers").join(id)
    }

    /// Re-adopts the container of a task launched by an earlier agent
    /// process, from its [`LaunchCheckpoint`]. `Ok`: adopted; the task's
    /// life goes on as after a launch (a spawned task waits for it and
    /// sends `Command::Exited` for `key` when it ends — at once, with the
    /// recorded status, if it ended while no agent ran). `Err`: the
    /// container is gone (no status recorded, pid reused, host rebooted,
    /// or this agent has no containerizer); whatever was left of it (cgroup,
    /// dir) has been removed, and the reason says why.
    pub(crate) async fn recover(
        &self,
        key: StreamKey,
        task_id: TaskId,
        checkpoint: LaunchCheckpoint,
        tx: mpsc::Sender<Command>,
    ) -> Result<RecoveredTask, String> {
        let containerizer = self
            .containerizer
            .clone()
            .ok_or("this agent runs without container isolation")?;
        let id = checkpoint.container.id.clone();
        let cz = containerizer.clone();
        let cp = checkpoint.container.clone();
        let recovered = tokio::task::spawn_blocking(move || cz.recover(&cp))
            .await
            .map_err(|e| format!("container recovery panicked: {e}"))?;
        let (container, ended_while_down) = match recovered {
            Ok(Recovered::Running(c)) => (c, false),
            Ok(Recovered::Exited { container, .. }) => (container, true),
            Ok(Recovered::Gone { reason }) => {
                self.remove_leftovers(containerizer, &id).await;
                return Err(format!("container {id}: {reason}"));
            }
            Err(e) => {
                self.remove_leftovers(containerizer, &id).await;
                return Err(e.to_string());
            }
        };
        self.layers_in_use
            .insert(id.clone(), checkpoint.layers.clone());
        let pid = container.pid;
        let probes = (checkpoint.checked && !ended_while_down).then(|| {
            let exec = checkpoint.exec.as_ref().map(|e| {
                match ContainerEntry::new(pid, e.cwd.clone(), e.env.clone(), e.user) {
                    Ok(entry) => ExecTarget::Container(entry),
                    Err(err) => {
                        ExecTarget::Unavailable(format!("cannot watch the container's init: {err}"))
                    }
                }
            });
            Arc::new(ProbeTarget {
                host: checkpoint.probe_host,
                exec,
                main: health::pidfd_open(pid).ok(),
            })
        });
        let container = Arc::new(container);
        let running = Running::Container {
            pid,
            container: Arc::downgrade(&container),
            checkpoint: Arc::new(checkpoint),
        };
        let launcher = self.clone();
        tokio::spawn(async move {
            launcher
                .finish(
                    key,
                    pid,
                    Handle::Container(container),
                    Vec::new(),
                    Some(id),
                    task_id,
                    tx,
                )
                .await;
        });
        Ok(RecoveredTask {
            running,
            probes,
            ended_while_down,
        })
    }

    /// What a gone container may have left: its cgroup and its dir.
    async fn remove_leftovers(&self, containerizer: Arc<Containerizer>, id: &str) {
        let cg_id = id.to_string();
        match tokio::task::spawn_blocking(move || containerizer.destroy(&cg_id)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(container_id = %id, error = %e, "cannot destroy a gone container"),
            Err(e) => warn!(container_id = %id, error = %e, "container destroy panicked"),
        }
        let dir = self.container_dir(id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(container_id = %id, error = %e, "cannot remove container dir");
        }
    }

    /// Waits for the task to end and makes sure nothing of it is left.
    async fn wait(&self, handle: Handle) -> Ended {
        match handle {
            Handle::Process(child, pgid) => Ended {
                termination: task::wait(child, pgid).await,
                oom_limit: None,
            },
            Handle::Container(container) => {
                let exit = container.wait().await;
                // Kill what is left and remove the cgroup; blocking, a few ms.
                // A usage sample may hold the container for a moment: then
                // its last reference tears it down (Drop) on that thread.
                let slot = self.launch_slots.clone().acquire_owned().await.ok();
                let destroyed = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    match Arc::try_unwrap(container) {
                        Ok(c) => c.destroy(),
                        Err(shared) => {
                            drop(shared);
                            Ok(())
                        }
                    }
                })
                .await;
                match destroyed {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot destroy container"),
                    Err(e) => warn!(error = %e, "container destroy panicked"),
                }
                match exit {
                    Ok(e) => Ended {
                        termination: match (e.code, e.signal) {
                            (Some(code), _) => Termination::Exited(code),
                            (None, Some(sig)) => Termination::Signaled(sig),
                            (None, None) => Termination::WaitFailed("no exit status".into()),
                        },
                        oom_limit: e.oom_killed.then_some(e.mem_limit_bytes),
                    },
                    Err(e) => Ended {
                        termination: Termination::WaitFailed(e.to_string()),
                        oom_limit: None,
                    },
                }
            }
        }
    }

    /// Sandbox, log pumps, then the process or container.
    async fn start(&self, req: &LaunchRequest) -> Result<Started, LaunchFailure> {
        let fail = |what: &str, e: &dyn std::fmt::Display| LaunchFailure(format!("{what}: {e}"));
        tokio::fs::create_dir_all(&req.sandbox).await.map_err(|e| {
            fail(
                &format!("cannot create sandbox {}", req.sandbox.display()),
                &e,
            )
        })?;
        if let (Isolation::Container, Some(c)) = (self.isolation, &self.containerizer) {
            // The container's init writes the sandbox's stdout/stderr.
            let (running, handle, id, exec) = self.start_container(req, c.clone()).await?;
            return Ok((running, handle, Vec::new(), id, exec));
        }
        let (out_r, out_w) = logs::pipe().map_err(|e| fail("cannot create the stdout pipe", &e))?;
        let (err_r, err_w) = logs::pipe().map_err(|e| fail("cannot create the stderr pipe", &e))?;
        let out = RotatingFile::create(req.sandbox.join("stdout"), self.log)
            .map_err(|e| fail("cannot create stdout in the sandbox", &e))?;
        let err = RotatingFile::create(req.sandbox.join("stderr"), self.log)
            .map_err(|e| fail("cannot create stderr in the sandbox", &e))?;
        let pumps = vec![
            tokio::spawn(logs::pump(out_r, out)),
            tokio::spawn(logs::pump(err_r, err)),
        ];

        match start_process(req, out_w, err_w) {
            Ok((running, handle, id, exec)) => Ok((running, handle, pumps, id, exec)),
            Err(e) => {
                // The write ends are gone with the failed launch: the pumps end.
                for p in pumps {
                    let _ = tokio::time::timeout(LOG_DRAIN_TIMEOUT, p).await;
                }
                Err(e)
            }
        }
    }

    async fn start_container(
        &self,
        req: &LaunchRequest,
        containerizer: Arc<Containerizer>,
    ) -> Result<Launched, LaunchFailure> {
        let container = req.info.container.clone().unwrap_or_default();
        let id = uuid::Uuid::new_v4().simple().to_string();
        let result = self.start_in(req, containerizer, container, &id).await;
        if result.is_err() {
            self.layers_in_use.remove(&id);
            let _ = tokio::fs::remove_dir_all(self.container_dir(&id)).await;
        }
        result
    }

    async fn start_in(
        &self,
        req: &LaunchRequest,
        containerizer: Arc<Containerizer>,
        container: pb::ContainerInfo,
        id: &str,
    ) -> Result<Launched, LaunchFailure> {
        let id = id.to_string();
        let image = if container.image.is_empty() {
            None
        } else {
            Some(self.image(&container.image).await?)
        };
        let mut mounts = Vec::new();
        for (i, v) in container.volumes.iter().enumerate() {
            let source = if v.pod_volume.is_empty() {
                allowed_volume(Path::new(&v.host_path), &self.allowed_host_paths).map_err(|e| {
                    LaunchFailure(format!("task.container.volumes[{i}].host_path: {e}"))
                })?
            } else {
                let found = req.pod.as_ref().and_then(|p| p.volumes.get(&v.pod_volume));
                found.cloned().ok_or_else(|| {
                    LaunchFailure(format!(
                        "task.container.volumes[{i}].pod_volume: the pod has no volume named '{}'",
                        v.pod_volume
                    ))
                })?
            };
            mounts.push(BindMount {
                source,
                target: PathBuf::from(&v.container_path),
                read_only: v.read_only,
            });
        }
        let empty = ImageConfig::default();
        let config = image.as_ref().map_or(&empty, |i| &i.config);
        let argv = command_argv(
            req.info.command.as_ref(),
            image.as_ref().map(|i| &i.config),
            container.entrypoint_override,
        )
        .map_err(LaunchFailure)?;
        // Where the init records how the command ended (for an agent that
        // is gone by then): an image container's own dir, which holds its
        // root filesystem's upper/work/mount point anyway; a host
        // container's sandbox, which saves a directory per task (a batch
        // workload creates hundreds a second). Such a container sees the
        // host's files anyway, so a dir of its own would protect nothing.
        let state_dir = match &image {
            Some(_) => self.container_dir(&id),
            None => req.sandbox.clone(),
        };
        let (rootfs, sandbox_env, cwd) = match &image {
            None => (
                RootFs::Host,
                req.sandbox.display().to_string(),
                non_empty(&container.working_dir)
                    .map_or_else(|| req.sandbox.clone(), PathBuf::from),
            ),
            Some(img) => {
                let dir = self.container_dir(&id);
                let (upper, work, target) =
                    (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
                for d in [&upper, &work, &target] {
                    tokio::fs::create_dir_all(d).await.map_err(|e| {
                        LaunchFailure(format!("cannot create {}: {e}", d.display()))
                    })?;
                }
                mounts.insert(
                    0,
                    BindMount {
                        source: req.sandbox.clone(),
                        target: PathBuf::from(CONTAINER_SANDBOX),
                        read_only: false,
                    },
                );
                self.layers_in_use.insert(id.clone(), img.layer_ids.clone());
                let cwd = non_empty(&container.working_dir)
                    .or_else(|| non_empty(&img.config.working_dir))
                    .unwrap_or(CONTAINER_SANDBOX);
                (
                    RootFs::Overlay {
                        lower: img.layers.iter().rev().cloned().collect(),
                        upper,
                        work,
                        target,
                    },
                    CONTAINER_SANDBOX.to_string(),
                    PathBuf::from(cwd),
                )
            }
        };
        let user_text = non_empty(&container.user).or_else(|| non_empty(&config.user));
        let user = match (user_text, &image) {
            (None, _) => None,
            (Some(u), img) => Some(
                resolve_user(u, img.as_ref().map_or(&[][..], |i| i.layers.as_slice()))
                    .map_err(|e| LaunchFailure(format!("user '{u}': {e}")))?,
            ),
        };
        let command_env = req
            .info
            .command
            .as_ref()
            .map(|c| c.environment.clone())
            .unwrap_or_default();
        let env = environment(
            &config.env,
            &[
                ("CORRAL_SANDBOX", sandbox_env.as_str()),
                ("CORRAL_TASK_ID", req.task_id.as_str()),
                ("CORRAL_FRAMEWORK_ID", req.framework_id.as_str()),
                ("CORRAL_AGENT_ID", req.agent_id.as_str()),
            ],
            if image.is_some() {
                None
            } else {
                Some(req.sandbox.as_path())
            },
            &command_env,
        );
        let resources = corral_proto::Resources::from_proto(&req.info.resources, "task.resources")
            .unwrap_or_default();
        // Command probes run like the command: same environment, working
        // directory and user.
        let probe_exec = health::has_command_probe(&req.info.health_checks)
            .then(|| (cwd.clone(), env.clone(), user));
        let exec_checkpoint = probe_exec.as_ref().map(|(cwd, env, user)| ExecCheckpoint {
            cwd: cwd.clone(),
            env: env.clone(),
            user: *user,
        });
        let layers = image
            .as_ref()
            .map(|i| i.layer_ids.clone())
            .unwrap_or_default();
        let probe_host = req
            .pod
            .as_ref()
            .and_then(|p| p.ip.parse().ok())
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let spec =
            ContainerSpec {
                id: id.clone(),
                argv,
                env,
                cwd,
                rootfs,
                hostname: hostname_for(req.task_id.as_str()),
                mounts,
                user,
                cpus_milli: resources.cpus.milli(),
                mem_bytes: (resources.mem.milli() * 1024 * 1024) / 1000,
                output: Output::Sandbox {
                    dir: req.sandbox.clone(),
                    logs: self.log,
                },
                state_dir: Some(state_dir),
                netns: match &req.pod {
                    Some(pod) => Some(pod.netns.try_clone().map_err(|e| {
                        LaunchFailure(format!("cannot share the pod's network: {e}"))
                    })?),
                    None => None,
                },
            };
        let slot = self
            .launch_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| LaunchFailure(format!("launcher closed: {e}")))?;
        let launched = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            containerizer.launch(&spec)
        })
        .await
        .map_err(|e| LaunchFailure(format!("launch panicked: {e}")))?;
        match launched {
            Ok(c) => {
                debug!(container_id = %id, pid = c.pid, "container started");
                // Now, while the init cannot have been reaped (nobody waits
                // for it yet): the entry's pidfd is certainly the init's.
                let exec = probe_exec.map(|(cwd, env, user)| {
                    match ContainerEntry::new(c.pid, cwd, env, user) {
                        Ok(entry) => ExecTarget::Container(entry),
                        Err(e) => ExecTarget::Unavailable(format!(
                            "cannot watch the container's init: {e}"
                        )),
                    }
                });
                let checkpoint = Arc::new(LaunchCheckpoint {
                    container: c.checkpoint().clone(),
                    layers,
                    checked: !req.info.health_checks.is_empty(),
                    probe_host,
                    exec: exec_checkpoint,
                });
                let c = Arc::new(c);
                Ok((
                    Running::Container {
                        pid: c.pid,
                        container: Arc::downgrade(&c),
                        checkpoint,
                    },
                    Handle::Container(c),
                    Some(id),
                    exec,
                ))
            }
            Err(e) => Err(LaunchFailure(e.to_string())),
        }
    }

    /// The image from the store, pulled first when it is not there.
    async fn image(&self, reference: &str) -> Result<crate::images::Image, LaunchFailure> {
        let store = self.images.clone();
        let r = reference.to_string();
        let local = tokio::task::spawn_blocking(move || store.resolve(&r))
            .await
            .map_err(|e| LaunchFailure(format!("image lookup panicked: {e}")))?;
        if let Ok(image) = local {
            return Ok(image);
        }
        self.images
            .pull(reference, None)
            .await
            .map_err(|e| LaunchFailure(format!("image {reference}: {e}")))?;
        let store = self.images.clone();
        let r = reference.to_string();
        tokio::task::spawn_blocking(move || store.resolve(&r))
            .await
            .map_err(|e| LaunchFailure(format!("image lookup panicked: {e}")))?
            .map_err(|e| LaunchFailure(format!("image {reference}: {e}")))
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The container's hostname: the task id, cut to a valid hostname.
fn hostname_for(task_id: &str) -> String {
    let h: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if h.is_empty() { "task".into() } else { h }
}

/// The argv to run. A shell command is `/bin/sh -c value` and replaces the
/// image's Entrypoint and Cmd; otherwise the task's argv (its `arguments`,
/// or `[value]`) replaces the image's Cmd, and the Entrypoint stays unless
/// overridden — `docker run IMAGE ARGS...` semantics. No command at all: the
/// image's Entrypoint + Cmd.
pub(crate) fn command_argv(
    command: Option<&pb::CommandInfo>,
    image: Option<&ImageConfig>,
    entrypoint_override: bool,
) -> Result<Vec<String>, String> {
    let task_argv: Option<Vec<String>> = command.and_then(|c| {
        if c.shell {
            (!c.value.is_empty()).then(|| vec!["/bin/sh".into(), "-c".into(), c.value.clone()])
        } else if !c.arguments.is_empty() {
            Some(c.arguments.clone())
        } else {
            (!c.value.is_empty()).then(|| vec![c.value.clone()])
        }
    });
    let shell = command.is_some_and(|c| c.shell);
    let argv = match (task_argv, image) {
        (Some(argv), None) => argv,
        (Some(argv), Some(_)) if shell || entrypoint_override => argv,
        (Some(argv), Some(img)) => img.entrypoint.iter().cloned().chain(argv).collect(),
        (None, Some(img)) => img
            .entrypoint
            .iter()
            .chain(img.cmd.iter())
            .cloned()
            .collect(),
        (None, None) => Vec::new(),
    };
    if argv.is_empty() {
        return Err("the task has no command and its image none either".into());
    }
    // A non-shell command names its program in `value`; argv[0] is only
    // what the program sees, so run `value` when it differs.
    if let Some(c) = command.filter(|c| !c.shell && !c.value.is_empty() && !c.arguments.is_empty())
        && c.arguments.first() != Some(&c.value)
        && image.is_none()
    {
        let mut v = vec![c.value.clone()];
        v.extend(c.arguments.iter().skip(1).cloned());
        return Ok(v);
    }
    Ok(argv)
}

/// The container's environment: the image's, then a default PATH and HOME
/// where missing, then Corral's variables, then the task's (which win).
pub(crate) fn environment(
    image_env: &[String],
    corral: &[(&str, &str)],
    home: Option<&Path>,
    task: &HashMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| {
        if let Some(slot) = env.iter_mut().find(|(ek, _)| ek == k) {
            slot.1 = v.to_string();
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    };
    for kv in image_env {
        if let Some((k, v)) = kv.split_once('=') {
            set(k, v);
        }
    }
    let has = |k: &str| {
        image_env
            .iter()
            .any(|kv| kv.split_once('=').is_some_and(|(ek, _)| ek == k))
    };
    if !has("PATH") {
        set("PATH", TASK_PATH);
    }
    match home {
        Some(h) => set("HOME", &h.display().to_string()),
        None if !has("HOME") => set("HOME", "/root"),
        None => {}
    }
    for (k, v) in corral {
        set(k, v);
    }
    let mut task: Vec<_> = task.iter().collect();
    task.sort();
    for (k, v) in task {
        set(k, v);
    }
    env
}

/// `UID[:GID]`, or a user (and group) name looked up in the image's
/// `/etc/passwd` (`/etc/group`), top layer first.
pub(crate) fn resolve_user(
    text: &str,
    layers_bottom_first: &[PathBuf],
) -> Result<(u32, u32), String> {
    let (user, group) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        for layer in layers_bottom_first.iter().rev() {
            let Ok(content) = std::fs::read_to_string(layer.join("etc").join(file)) else {
                continue;
            };
            for line in content.lines() {
                let f: Vec<&str> = line.split(':').collect();
                if f.first() == Some(&name) && f.len() >= 4 {
                    let id = f[2].parse().ok()?;
                    let gid = f[3].parse().unwrap_or(id);
                    return Some((id, gid));
                }
            }
            return None;
        }
        None
    };
    let (uid, default_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => lookup("passwd", user)
            .ok_or_else(|| format!("no user '{user}' in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => default_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("group", g)
                .map(|(gid, _)| gid)
                .ok_or_else(|| format!("no group '{g}' in the image's /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

/// The host path of a volume, if it is under an allowed prefix. Both are
/// resolved first, so `..` or a symlink cannot lead outside.
pub(crate) fn allowed_volume(host: &Path, allowed: &[PathBuf]) -> Result<PathBuf, String> {
    if allowed.is_empty() {
        return Err(
            "host path volumes are not allowed on this agent (start it with --allowed-host-paths)"
                .into(),
        );
    }
    let real = host
        .canonicalize()
        .map_err(|e| format!("{}: {e}", host.display()))?;
    let ok = allowed
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .any(|prefix| real.starts_with(&prefix));
    if ok {
        Ok(real)
    } else {
        let list: Vec<String> = allowed.iter().map(|p| p.display().to_string()).collect();
        Err(format!(
            "{} is not under an allowed host path ({})",
            real.display(),
            list.join(", ")
        ))
    }
}

/// Plain process (`--isolation=none`): no cgroup, no namespaces; its own
/// process group and the log pipes.
fn start_process(
    req: &LaunchRequest,
    stdout: OwnedFd,
    stderr: OwnedFd,
) -> Result<Launched, LaunchFailure> {
    let empty = pb::CommandInfo::default();
    let command = req.info.command.as_ref().unwrap_or(&empty);
    if command.value.is_empty() {
        return Err(LaunchFailure("task has no command".into()));
    }
    if req
        .info
        .container
        .as_ref()
        .is_some_and(|c| !c.image.is_empty() || !c.volumes.is_empty())
    {
        return Err(LaunchFailure(
            "this agent runs plain processes (--isolation=none): images and volumes need isolation == container".into(),
        ));
    }
    let child = task::launch(
        &task::LaunchSpec {
            sandbox: &req.sandbox,
            framework_id: &req.framework_id,
            task_id: &req.task_id,
            agent_id: &req.agent_id,
            command,
        },
        stdout,
        stderr,
    )
    .map_err(|e| LaunchFailure(e.to_string()))?;
    let pgid = child
        .id()
        .ok_or_else(|| LaunchFailure("the command exited before its pid was known".into()))?;
    // Command probes run where the command does: on the host, in the
    // sandbox, with the environment `task::launch` gives it.
    let exec = health::has_command_probe(&req.info.health_checks).then(|| {
        let sandbox = req.sandbox.display().to_string();
        ExecTarget::Host {
            cwd: req.sandbox.clone(),
            env: environment(
                &[],
                &[
                    ("CORRAL_SANDBOX", sandbox.as_str()),
                    ("CORRAL_TASK_ID", req.task_id.as_str()),
                    ("CORRAL_FRAMEWORK_ID", req.framework_id.as_str()),
                    ("CORRAL_AGENT_ID", req.agent_id.as_str()),
                ],
                Some(req.sandbox.as_path()),
                &command.environment,
            ),
        }
    });
    Ok((
        Running::Process { pgid },
        Handle::Process(child, pgid),
        None,
        exec,
    ))
}

/// A persistent volume a pod mounts: `task_group.volumes[index]`, named
/// `name`.
#[derive(Debug, Clone)]
pub(crate) struct PersistentMount {
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) key: VolumeKey,
}

/// Makes sure the pod's persistent volumes exist on this agent (asked of
/// the volume thread, so a create sent just before the pod counts), makes
/// the pod's `emptyDir` volumes and its network namespace (its own IP on
/// the bridge); undoes what it made if a step fails.
pub(crate) async fn prepare_pod(
    network: Option<Arc<PodNetwork>>,
    pod_id: &str,
    empty_dirs: Vec<PathBuf>,
    store: Volumes,
    persistent: Vec<PersistentMount>,
    mut volumes: HashMap<String, PathBuf>,
) -> Result<PodLaunch, String> {
    let network = network.ok_or("this agent has no pod network")?;
    for m in persistent {
        let id = m.key.volume_id.clone();
        let path = store.lookup(m.key).await.map_err(|why| {
            format!(
                "task_group.volumes[{}] ('{}'): persistent volume '{id}' {why}",
                m.index, m.name
            )
        })?;
        volumes.insert(m.name, path);
    }
    for dir in &empty_dirs {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("cannot create volume {}: {e}", dir.display()))?;
    }
    let net = network.setup(pod_id).await.map_err(|e| e.to_string())?;
    match net.netns_fd() {
        Ok(fd) => Ok(PodLaunch {
            ip: net.ip.to_string(),
            netns: Arc::new(fd),
            volumes,
        }),
        Err(e) => {
            if let Err(undo) = network.teardown(pod_id).await {
                warn!(pod_id, error = %undo, "cannot tear down a pod network");
            }
            Err(e.to_string())
        }
    }
}

/// Removes a pod's network and its directory (`emptyDir` volumes). Its
/// persistent volumes live outside that directory and stay. Errors are
/// logged: the pod is over either way, and the agent's sweep at start
/// removes what is left.
pub(crate) async fn tear_down_pod(network: Option<Arc<PodNetwork>>, pod_id: &str, dir: &Path) {
    if let Some(network) = network
        && let Err(e) = network.teardown(pod_id).await
    {
        warn!(pod_id, error = %e, "cannot tear down a pod network");
    }
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(pod_id, dir = %dir.display(), error = %e, "cannot remove a pod's directory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(cmd: &str) -> pb::CommandInfo {
        pb::CommandInfo {
            shell: true,
            value: cmd.into(),
            ..Default::default()
        }
    }

    fn argv_cmd(args: &[&str]) -> pb::CommandInfo {
        pb::CommandInfo {
            shell: false,
            value: args[0].into(),
            arguments: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_command_follows_docker_run_semantics() {
        let img = image(&["/entry"], &["default"]);
        assert_eq!(
            command_argv(None, Some(&img), false).unwrap(),
            ["/entry", "default"]
        );
        assert_eq!(
            command_argv(Some(&argv_cmd(&["x", "y"])), Some(&img), false).unwrap(),
            ["/entry", "x", "y"]
        );
        assert_eq!(
            command_argv(Some(&argv_cmd(&["x"])), Some(&img), true).unwrap(),
            ["x"]
        );
        assert_eq!(
            command_argv(Some(&shell("echo hi")), Some(&img), false).unwrap(),
            ["/bin/sh", "-c", "echo hi"]
        );
        assert_eq!(
            command_argv(Some(&shell("true")), None, false).unwrap(),
            ["/bin/sh", "-c", "true"]
        );
        assert!(command_argv(None, Some(&image(&[], &[])), false).is_err());
    }

    #[test]
    fn task_variables_win_over_corral_and_image_ones() {
        let task: HashMap<String, String> = [("A".to_string(), "task".to_string())].into();
        let env = environment(
            &["A=image".into(), "B=image".into()],
            &[("CORRAL_TASK_ID", "t1")],
            None,
            &task,
        );
        let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
        assert_eq!(get("A"), Some("task"));
        assert_eq!(get("B"), Some("image"));
        assert_eq!(get("PATH"), Some(TASK_PATH));
        assert_eq!(get("HOME"), Some("/root"));
        assert_eq!(get("CORRAL_TASK_ID"), Some("t1"));
    }

    #[test]
    fn users_are_numbers_or_names_from_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let bottom = dir.path().join("bottom");
        std::fs::create_dir_all(bottom.join("etc")).unwrap();
        std::fs::write(
            bottom.join("etc/passwd"),
            "root:x:0:0::/:/bin/sh\napp:x:1000:100::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(bottom.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let layers = vec![bottom];
        assert_eq!(resolve_user("1000:5", &layers).unwrap(), (1000, 5));
        assert_eq!(resolve_user("app", &layers).unwrap(), (1000, 100));
        assert_eq!(resolve_user("app:staff", &layers).unwrap(), (1000, 50));
        assert!(resolve_user("ghost", &layers).is_err());
    }

    #[test]
    fn volumes_must_resolve_under_an_allowed_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        let other = dir.path().join("other");
        std::fs::create_dir_all(allowed.join("data")).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(&other, allowed.join("link")).unwrap();
        let list = vec![allowed.clone()];
        assert!(allowed_volume(&allowed.join("data"), &list).is_ok());
        assert!(allowed_volume(&allowed.join("data/../../other"), &list).is_err());
        assert!(
            allowed_volume(&allowed.join("link"), &list).is_err(),
            "a symlink out is refused"
        );
        assert!(allowed_volume(&allowed.join("data"), &[]).is_err());
    }

    #[test]
    fn orphan_dirs_are_the_container_dirs_no_checkpoint_names() {
        let work = tempfile::tempdir().unwrap();
        let none = orphans(None, work.path(), &Default::default()).unwrap();
        assert_eq!(none, Orphans::default(), "no containers dir yet");
        for id in ["kept", "old-a", "old-b"] {
            std::fs::create_dir_all(work.path().join("containers").join(id).join("upper")).unwrap();
        }
        let known = ["kept".to_string()].into();
        let found = orphans(None, work.path(), &known).unwrap();
        let containers = work.path().join("containers");
        assert_eq!(
            found.dirs,
            [containers.join("old-a"), containers.join("old-b")]
        );
        assert!(found.cgroups.is_empty());
        let removed = destroy_orphans(None, work.path(), &known);
        assert_eq!(removed.dirs, found.dirs);
        assert!(containers.join("kept").is_dir());
        assert!(!containers.join("old-a").exists());
    }

    #[test]
    fn launch_and_pod_checkpoints_survive_a_json_round_trip() {
        let launch = LaunchCheckpoint {
            container: ContainerCheckpoint {
                id: "c1".into(),
                pid: 42,
                start_time: 7,
                boot_id: "b".into(),
                cgroup_root: "corral".into(),
                cgroups: vec![],
                state_dir: Some("/w/containers/c1".into()),
                sandbox: Some("/w/sandboxes/f/t".into()),
                cpus_milli: 100,
                mem_bytes: 1 << 20,
            },
            layers: vec!["sha256:ab".into()],
            checked: true,
            probe_host: IpAddr::V4(Ipv4Addr::new(10, 88, 0, 2)),
            exec: Some(ExecCheckpoint {
                cwd: "/".into(),
                env: vec![("A".into(), "1".into())],
                user: Some((1000, 1000)),
            }),
        };
        let text = serde_json::to_vec(&launch).unwrap();
        assert_eq!(
            serde_json::from_slice::<LaunchCheckpoint>(&text).unwrap(),
            launch
        );
        let pod = pb::PodCheckpoint {
            pod_id: "p1".into(),
            ip: "10.88.0.2".into(),
            volumes: [("www".to_string(), "/w/pods/p1/www".to_string())].into(),
            ..Default::default()
        };
        let err = recover_pod(None, &pod).unwrap_err();
        assert!(err.contains("no pod network"), "{err}");
    }

    #[test]
    fn hostnames_are_valid() {
        assert_eq!(hostname_for("web.1_a"), "web-1-a");
        assert_eq!(hostname_for(&"x".repeat(100)).len(), 63);
    }
}
