//! The agent actor: one tokio task owns all agent state (tasks, the status
//! update manager, the master stream's sender) and changes it only in
//! response to [`Command`]s. The master link, the API handlers and the
//! per-task waiters only send commands; timers (status update retries,
//! SIGKILL after the grace period, a task's max completion time) are
//! deadlines of the actor's own loop, so they cost no task or thread each,
//! go away with the task and follow `tokio::time::pause` in tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_proto::pb::{self, Reason, TaskState};
use corral_proto::task::{is_terminal, now_seconds, state_name};
use corral_proto::{AgentId, FrameworkId, Resources, TaskId, VolumeId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::checkpoint::Checkpointer;
use crate::containerizer::{Container, Usage};
use crate::error::AgentError;
use crate::health::{self, Monitor, ProbeTarget};
use crate::launch::{
    Ended, LaunchCheckpoint, LaunchRequest, Launcher, PodLaunch, RecoveredTask, Running,
};
use crate::metrics::AgentMetrics;
use crate::pod;
use crate::state::{StateView, TaskView, UsageView};
pub(crate) use crate::status_updates::StreamKey;
use crate::status_updates::{AckOutcome, StatusUpdateManager, new_update};
use crate::task::{Termination, sandbox_path, signal_name};
use crate::volumes::{VolumeKey, Volumes, validate_disk_mib};

/// Room for bursts of launches, exits and API calls; senders wait (never
/// the actor) when it is full.
pub(crate) const COMMAND_CHANNEL_CAPACITY: usize = 1024;

/// Longest kill grace period honoured; also keeps `Instant + grace` from
/// overflowing on absurd values.
const MAX_KILL_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest max completion time honoured (the master allows up to a year);
/// keeps `Instant + max` from overflowing on absurd values.
const MAX_COMPLETION_TIME: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// How often the gauges are refreshed while updates wait for
/// acknowledgement, so the oldest one's age keeps growing on `/metrics`
/// while nothing else happens.
const PENDING_METRICS_REFRESH: Duration = Duration::from_secs(1);

/// The version reported in `Register`.
const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the actor is asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    /// The master link is opening a stream; reply with its first message.
    Attaching {
        reply: oneshot::Sender<pb::Register>,
    },
    /// The master answered `Registered`; updates go out on `outbound`.
    Registered {
        agent_id: AgentId,
        outbound: mpsc::Sender<pb::AgentMessage>,
    },
    /// The stream to the master is gone.
    Disconnected,
    /// Any master message but `Registered` and heartbeats.
    FromMaster(Box<pb::master_message::Message>),
    /// A task's process or container is running (sent by its launcher).
    Started {
        key: StreamKey,
        running: Running,
        /// Where its health checks probe; `None` when it has none.
        probes: Option<std::sync::Arc<ProbeTarget>>,
    },
    /// One health check probe of a task's process `pid` ended (sent by the
    /// check's runner).
    HealthResult {
        key: StreamKey,
        pid: u32,
        kind: health::Kind,
        outcome: health::Outcome,
        duration: Duration,
    },
    /// A task could not be started; it fails with `message`.
    LaunchFailed { key: StreamKey, message: String },
    /// A task's command ended and nothing of it is left (sent by its
    /// launcher after destroying the container and draining the logs).
    Exited {
        key: StreamKey,
        pid: u32,
        ended: Ended,
    },
    /// Fresh usage of the running containers.
    UsageSampled(Vec<(StreamKey, Usage)>),
    /// A pod's network and volumes are ready (or could not be made).
    PodReady {
        pod_id: String,
        result: Result<PodLaunch, String>,
    },
    /// A pod's network and volumes are gone.
    PodGone { pod_id: String },
    /// `GET /state`.
    State { reply: oneshot::Sender<StateView> },
    /// `ReadFile`: where the task's files are and whether it is done.
    FileTarget {
        framework_id: FrameworkId,
        task_id: TaskId,
        reply: oneshot::Sender<Option<FileTarget>>,
    },
    /// Checkpoint writes up to `seq` are durable (sent by the writer).
    Checkpointed { seq: u64 },
    /// The launcher re-adopted (or could not re-adopt) the container of a
    /// task recovered from the checkpoint.
    Readopted { key: StreamKey, result: Readopted },
    /// `run`'s shutdown future resolved: kill everything and stop.
    Shutdown,
}

/// How re-adopting a recovered task's container went: `Err` says why it
/// is gone.
pub(crate) struct Readopted(pub(crate) Result<RecoveredTask, String>);

impl std::fmt::Debug for Readopted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Ok(t) => write!(
                f,
                "Readopted(pid {}, ended_while_down {})",
                t.running.pid(),
                t.ended_while_down
            ),
            Err(e) => write!(f, "Readopted(gone: {e})"),
        }
    }
}

/// A task's sandbox and a flag that turns true once it is terminal.
#[derive(Debug)]
pub(crate) struct FileTarget {
    pub(crate) sandbox: PathBuf,
    pub(crate) done: watch::Receiver<bool>,
}

/// Who the agent is; fixed for the agent's lifetime.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) hostname: String,
    pub(crate) address: String,
    pub(crate) resources: Resources,
    pub(crate) attributes: Vec<pb::Attribute>,
    pub(crate) work_dir: PathBuf,
    /// This boot's id, checkpointed with the agent id.
    pub(crate) boot_id: String,
}

/// Aborts a spawned tokio task when dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why the agent signalled a task: decides its final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KillCause {
    /// A framework kill or shutdown, or the agent stopping: TASK_KILLED.
    Requested,
    /// The task's max completion time (this long) elapsed: TASK_FAILED
    /// with REASON_MAX_COMPLETION_TIME_REACHED, as Mesos reports it.
    MaxCompletionTime(Duration),
    /// Another task of its pod failed (restart policy `Never`, or a failed
    /// launch): TASK_KILLED, the pod fails as a unit.
    PodFailed,
    /// A liveness or startup health check failed: TASK_FAILED with
    /// REASON_TASK_UNHEALTHY. The check's message (which probe, how often,
    /// the last error) is the task's health monitor's; `emit` puts it on
    /// the task's updates.
    Unhealthy,
}

#[derive(Debug)]
struct KillTimer {
    sigkill_at: Instant,
    sigkill_sent: bool,
}

#[derive(Debug)]
struct Task {
    framework_id: FrameworkId,
    task_id: TaskId,
    info: pb::TaskInfo,
    state: TaskState,
    /// The init (container) or process group (plain process) of the running
    /// command; `None` before it started and once it exited.
    pid: Option<u32>,
    running: Option<Running>,
    /// Between RunTask and Started/LaunchFailed.
    launching: bool,
    /// A kill that arrived while launching: its grace override.
    pending_kill: Option<Option<f64>>,
    /// The task's launcher (launch, wait, cleanup). Aborting it drops the
    /// process's kill guard or the container, which kill what is left: so
    /// dropping the actor cannot leave processes behind.
    _launcher: Option<AbortOnDrop>,
    sandbox: PathBuf,
    exit_code: Option<i32>,
    signal: Option<i32>,
    kill: Option<KillTimer>,
    /// When the task's max completion time elapses; set while its command
    /// runs and no kill has begun, cleared when either ends.
    completion_deadline: Option<(Instant, Duration)>,
    /// The agent signalled the task, and why (the first cause wins); `None`:
    /// it ended on its own.
    kill_cause: Option<KillCause>,
    done: watch::Sender<bool>,
    /// The pod the task belongs to, if any.
    pod: Option<String>,
    /// A pod task's container restarts (its pod's restart policy).
    restarts: Option<pod::Restarts>,
    /// When the container of a pod task in restart backoff starts again,
    /// and why it ended.
    restart_at: Option<(Instant, String)>,
    /// Why the container being started again ended (for the update that
    /// says it restarted).
    restarting: Option<String>,
    /// The running process or container, as checkpointed.
    container: Option<pb::ContainerCheckpoint>,
    /// The exit of a re-adopted container that came in before the news that
    /// it was re-adopted (they come from different tasks of the launcher).
    early_exit: Option<(u32, Ended)>,
}

impl Task {
    /// A task just handed to the agent, about to launch (alone, or as
    /// part of `pod`, whose containers restart by its policy).
    fn staging(
        work_dir: &Path,
        framework_id: FrameworkId,
        task_id: TaskId,
        info: pb::TaskInfo,
        pod: Option<String>,
    ) -> Task {
        let sandbox = sandbox_path(work_dir, &framework_id, &task_id);
        let restarts = pod
            .as_ref()
            .map(|_| pod::Restarts::new(Instant::now().into_std()));
        Task {
            framework_id,
            task_id,
            info,
            state: TaskState::TaskStaging,
            pid: None,
            running: None,
            launching: true,
            pending_kill: None,
            _launcher: None,
            sandbox,
            exit_code: None,
            signal: None,
            kill: None,
            completion_deadline: None,
            kill_cause: None,
            done: watch::channel(false).0,
            pod,
            restarts,
            restart_at: None,
            restarting: None,
            container: None,
            early_exit: None,
        }
    }

    /// A task read back from the checkpoint: nothing of it runs under this
    /// agent (yet); `recover` joins it to its pod, if that was recovered.
    fn recovered(
        work_dir: &Path,
        framework_id: FrameworkId,
        task_id: TaskId,
        info: pb::TaskInfo,
        state: TaskState,
    ) -> Task {
        let mut task = Task::staging(work_dir, framework_id, task_id, info, None);
        task.launching = false;
        task.state = state;
        if is_terminal(state) {
            task.done.send_replace(true);
        }
        task
    }
}

/// A pod on this agent: its tasks share `launch` (network, volumes).
#[derive(Debug)]
struct Pod {
    framework_id: String,
    keys: Vec<StreamKey>,
    /// The framework's persistent volumes it mounts: no other pod may
    /// mount them, nor may they be destroyed, until its teardown begins.
    persistent: Vec<VolumeId>,
    policy: pod::Policy,
    dir: PathBuf,
    /// Set once the network and volumes are ready.
    launch: Option<PodLaunch>,
    /// One of its tasks failed (or the pod is being killed): nothing
    /// restarts any more.
    failed: bool,
    /// Teardown has begun.
    tearing_down: bool,
    _prepare: Option<AbortOnDrop>,
}

#[derive(Debug)]
enum Stop {
    Requested,
    RemovedByMaster(String),
}

pub(crate) struct Actor {
    identity: Identity,
    default_kill_grace: Duration,
    agent_id: Option<AgentId>,
    outbound: Option<mpsc::Sender<pb::AgentMessage>>,
    tasks: BTreeMap<StreamKey, Task>,
    frameworks: HashMap<String, pb::FrameworkInfo>,
    updates: StatusUpdateManager,
    metrics: AgentMetrics,
    /// Handed to launchers so they can report starts and exits.
    cmd_tx: mpsc::Sender<Command>,
    stopping: Option<Stop>,
    launcher: Launcher,
    usage_interval: Duration,
    next_usage: Instant,
    /// When the gauges are refreshed next while updates are pending.
    next_metrics: Instant,
    /// Latest container usage, by task: read by `/metrics` and `/state`.
    usage: std::sync::Arc<dashmap::DashMap<StreamKey, Usage>>,
    /// Sandboxes of finished tasks, until they are removed.
    gc: crate::gc::SandboxGc,
    /// Pods, until their network and volumes are gone.
    pods: HashMap<String, Pod>,
    /// Health checks of running tasks, until their final update.
    health: HashMap<StreamKey, Monitor>,
    /// The persistent volumes on this agent's disk (their own thread).
    volumes: Volumes,
    /// Writes the checkpoint (its own thread).
    checkpoint: Checkpointer,
    /// The agent this one replaces (the checkpoint was of another boot or
    /// format), until the master has registered us.
    replaces_agent_id: Option<String>,
}

/// The status a task's end maps to: `(state, reason, message)`; the
/// container's OOM kill takes precedence: the
/// kernel killed it for going over its memory limit (Mesos
/// `REASON_CONTAINER_LIMITATION_MEMORY`). A task killed for reaching its
/// max completion time failed, however its command ended (Mesos'
/// command executor reports TASK_FAILED, not TASK_KILLED).
pub(crate) fn final_status_of(
    ended: &Ended,
    kill_cause: Option<KillCause>,
) -> (TaskState, Reason, String) {
    if let Some(limit) = ended.oom_limit {
        return (
            TaskState::TaskFailed,
            Reason::ContainerLimitationMemory,
            format!(
                "memory limit of {} MiB exceeded: the container was OOM-killed",
                limit / (1024 * 1024)
            ),
        );
    }
    let killed_by_agent = match kill_cause {
        Some(KillCause::MaxCompletionTime(max)) => {
            return (
                TaskState::TaskFailed,
                Reason::MaxCompletionTimeReached,
                max_completion_message(max),
            );
        }
        Some(KillCause::PodFailed) => {
            return (
                TaskState::TaskKilled,
                Reason::Unspecified,
                "killed: another task of its pod failed".to_string(),
            );
        }
        Some(KillCause::Unhealthy) => {
            return (
                TaskState::TaskFailed,
                Reason::TaskUnhealthy,
                "killed: a health check failed".to_string(),
            );
        }
        Some(KillCause::Requested) => true,
        None => false,
    };
    let termination = &ended.termination;
    match (termination, killed_by_agent) {
        (Termination::Exited(code), true) => (
            TaskState::TaskKilled,
            Reason::Unspecified,
            format!("command exited with status {code} after being killed"),
        ),
        (Termination::Signaled(sig), true) => (
            TaskState::TaskKilled,
            Reason::Unspecified,
            format!("command killed by signal {sig} ({})", signal_name(*sig)),
        ),
        (Termination::WaitFailed(e), true) => (
            TaskState::TaskKilled,
            Reason::Unspecified,
            format!("command killed; cannot wait for it: {e}"),
        ),
        (Termination::Exited(0), false) => (
            TaskState::TaskFinished,
            Reason::Unspecified,
            "command exited with status 0".to_string(),
        ),
        (Termination::Exited(code), false) => (
            TaskState::TaskFailed,
            Reason::CommandFailed,
            format!("command exited with status {code}"),
        ),
        (Termination::Signaled(sig), false) => (
            TaskState::TaskFailed,
            Reason::CommandFailed,
            format!("command terminated by signal {sig} ({})", signal_name(*sig)),
        ),
        (Termination::WaitFailed(e), false) => (
            TaskState::TaskFailed,
            Reason::CommandFailed,
            format!("cannot wait for the command: {e}"),
        ),
    }
}

/// `max completion time of 2s reached`.
fn max_completion_message(max: Duration) -> String {
    format!("max completion time of {}s reached", max.as_secs_f64())
}

/// A max completion time from the wire, or `None` when it is not usable
/// (the master rejects those; an agent never trusts the wire).
fn completion_time_from_seconds(seconds: f64) -> Option<Duration> {
    if seconds.is_finite() && seconds > 0.0 {
        Some(Duration::from_secs_f64(
            seconds.min(MAX_COMPLETION_TIME.as_secs_f64()),
        ))
    } else {
        None
    }
}

/// A kill grace period from the wire, or `None` when it is not usable.
fn grace_from_seconds(seconds: f64) -> Option<Duration> {
    if seconds.is_finite() && seconds >= 0.0 {
        Some(Duration::from_secs_f64(
            seconds.min(MAX_KILL_GRACE.as_secs_f64()),
        ))
    } else {
        None
    }
}

fn status(task_id: &str, state: TaskState, reason: Reason, message: String) -> pb::TaskStatus {
    pb::TaskStatus {
        task_id: task_id.to_string(),
        state: state as i32,
        reason: reason as i32,
        message,
        ..Default::default()
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Actor {
    // Each argument is a handle `run` made for the actor alone; a struct
    // around them would only rename them.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        identity: Identity,
        config: &crate::AgentConfig,
        metrics: AgentMetrics,
        cmd_tx: mpsc::Sender<Command>,
        launcher: Launcher,
        usage: std::sync::Arc<dashmap::DashMap<StreamKey, Usage>>,
        volumes: Volumes,
        checkpoint: Checkpointer,
    ) -> Self {
        Self {
            identity,
            default_kill_grace: config.default_kill_grace,
            agent_id: None,
            outbound: None,
            tasks: BTreeMap::new(),
            frameworks: HashMap::new(),
            updates: StatusUpdateManager::new(
                config.status_update_retry_initial,
                config.status_update_retry_max,
            ),
            metrics,
            cmd_tx,
            stopping: None,
            launcher,
            usage_interval: config.usage_interval.max(Duration::from_millis(100)),
            next_usage: Instant::now() + config.usage_interval,
            next_metrics: Instant::now() + PENDING_METRICS_REFRESH,
            usage,
            gc: crate::gc::SandboxGc::new(config.sandbox_gc_delay, config.sandbox_gc_max),
            pods: HashMap::new(),
            health: HashMap::new(),
            volumes,
            checkpoint,
            replaces_agent_id: None,
        }
    }

    /// Takes over what the checkpoint says: the agent id to come back as
    /// (or the one this agent replaces), and the tasks with their
    /// unacknowledged updates, restored in order with their uuids. Nothing
    /// of a recovered task runs under this agent: a task that had not ended
    /// is reported ended now (behind its restored updates); its container,
    /// if any survived, was destroyed with the orphans at start.
    ///
    /// `pods` are the checkpointed pods whose network survived, reopened:
    /// their tasks' containers are re-adopted into them, and restart in
    /// them by the pod's policy. A pod task that cannot be re-adopted fails
    /// its pod (the pod is a unit), as do the tasks of a pod not in `pods`.
    pub(crate) fn recover(
        &mut self,
        agent_id: Option<AgentId>,
        replaces_agent_id: Option<String>,
        tasks: Vec<pb::TaskCheckpoint>,
        pods: Vec<(pb::PodCheckpoint, PodLaunch)>,
    ) {
        self.agent_id = agent_id;
        self.replaces_agent_id = replaces_agent_id;
        let now = Instant::now().into_std();
        let wall = now_seconds();
        for (record, launch) in pods {
            let persistent = record
                .persistent_volumes
                .iter()
                .filter_map(|id| VolumeId::parse(id, "pod_checkpoint.persistent_volumes").ok())
                .collect();
            info!(pod_id = %record.pod_id, ip = %launch.ip, "pod recovered from the checkpoint");
            self.pods.insert(
                record.pod_id.clone(),
                Pod {
                    framework_id: record.framework_id,
                    keys: Vec::new(),
                    persistent,
                    policy: pod::Policy::from_proto(record.restart_policy),
                    dir: pod::pod_dir(&self.identity.work_dir, &record.pod_id),
                    launch: Some(launch),
                    failed: false,
                    tearing_down: false,
                    _prepare: None,
                },
            );
        }
        let pod_ids: HashSet<String> = self.pods.keys().cloned().collect();
        let mut to_end = Vec::new();
        for record in tasks {
            let (Some(framework), Some(info)) = (record.framework, record.task) else {
                continue;
            };
            let ids =
                FrameworkId::parse(&framework.id, "task_checkpoint.framework.id").and_then(|f| {
                    TaskId::parse(&info.task_id, "task_checkpoint.task.task_id").map(|t| (f, t))
                });
            let Ok((framework_id, task_id)) = ids else {
                continue;
            };
            let key = (framework_id.to_string(), task_id.to_string());
            let state = TaskState::try_from(record.state).unwrap_or(TaskState::TaskStaging);
            if is_terminal(state) && record.updates.is_empty() {
                // Its end was acknowledged; only the file's removal was lost.
                self.checkpoint.remove_task(&key.0, &key.1);
                continue;
            }
            for update in record.updates {
                let made = update.status.as_ref().map_or(wall, |s| s.timestamp);
                let age = Duration::from_secs_f64(
                    (wall - made).clamp(0.0, MAX_COMPLETION_TIME.as_secs_f64()),
                );
                self.updates.restore(update, age, now);
            }
            info!(framework_id = %key.0, task_id = %key.1, state = state_name(state),
                  "task recovered from the checkpoint");
            self.metrics.tasks_recovered.increment(1);
            self.frameworks.insert(framework_id.to_string(), framework);
            let mut task =
                Task::recovered(&self.identity.work_dir, framework_id, task_id, info, state);
            if let Some(pod) = self.pods.get_mut(&record.pod_id) {
                pod.keys.push(key.clone());
                task.pod = Some(record.pod_id.clone());
                task.restarts = Some(pod::Restarts::new(now));
            }
            if !is_terminal(state) {
                match readoptable(
                    &record.pod_id,
                    record.container.as_ref(),
                    self.launcher.containerizer.is_some(),
                    &pod_ids,
                ) {
                    Some(checkpoint) => {
                        // Like a launch: kills wait until it is back.
                        task.launching = true;
                        task.container = record.container.clone();
                        self.readopt(&key, task.task_id.clone(), checkpoint);
                    }
                    None => to_end.push((key.clone(), record.container)),
                }
            }
            self.tasks.insert(key, task);
        }
        let mut failed_pods = Vec::new();
        for (key, container) in to_end {
            if let Some(pod_id) = self.tasks.get(&key).and_then(|t| t.pod.clone()) {
                failed_pods.push(pod_id);
            }
            let message = match container {
                None => "the agent restarted before the task started".to_string(),
                Some(c) if c.container_id.is_empty() => {
                    "the agent restarted; plain processes cannot be re-adopted, so the task's process was killed".to_string()
                }
                Some(_) => {
                    "the agent restarted and could not re-adopt the task's container; it was destroyed".to_string()
                }
            };
            self.end_task(
                &key,
                TaskState::TaskFailed,
                Reason::AgentRestarted,
                message,
                None,
                None,
            );
        }
        for pod_id in failed_pods {
            self.fail_pod(&pod_id);
        }
        // A pod with nothing left alive goes now (its tasks all ended).
        for pod_id in pod_ids {
            self.maybe_tear_down(&pod_id);
        }
    }

    /// Asks the launcher to re-adopt a recovered task's container (off the
    /// loop); the outcome comes back as `Command::Readopted`, then the task
    /// goes on as if this agent had launched it.
    fn readopt(&mut self, key: &StreamKey, task_id: TaskId, checkpoint: LaunchCheckpoint) {
        let launcher = self.launcher.clone();
        let tx = self.cmd_tx.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let result = launcher
                .recover(key.clone(), task_id, checkpoint, tx.clone())
                .await;
            let _ = tx
                .send(Command::Readopted {
                    key,
                    result: Readopted(result),
                })
                .await;
        });
    }

    /// A recovered task's container is back (or gone for good).
    fn readopted(&mut self, key: StreamKey, result: Readopted) {
        let stopping = self.stopping.is_some();
        let Some(task) = self.tasks.get_mut(&key) else {
            if let Ok(t) = result.0 {
                let _ = t.running.kill();
            }
            return;
        };
        task.launching = false;
        let pod_id = task.pod.clone();
        let recovered = match result.0 {
            Ok(recovered) => recovered,
            Err(why) => {
                warn!(framework_id = %key.0, task_id = %key.1, reason = %why,
                      "cannot re-adopt a recovered task's container");
                let message =
                    format!("the agent restarted and the task's container is gone: {why}");
                self.end_task(
                    &key,
                    TaskState::TaskFailed,
                    Reason::AgentRestarted,
                    message,
                    None,
                    None,
                );
                if let Some(pod_id) = pod_id {
                    self.fail_pod(&pod_id);
                }
                return;
            }
        };
        info!(framework_id = %key.0, task_id = %key.1, pid = recovered.running.pid(),
              ended_while_down = recovered.ended_while_down, "re-adopted a recovered task's container");
        task.pid = Some(recovered.running.pid());
        task.running = Some(recovered.running.clone());
        // Its max completion time counts from the container's start (its
        // checkpointed start time on this boot), not from the restart.
        if !recovered.ended_while_down
            && let Some(max) = task
                .info
                .max_completion_time_seconds
                .and_then(completion_time_from_seconds)
        {
            let ran = task
                .container
                .as_ref()
                .and_then(|c| crate::task::running_for(c.start_ticks))
                .unwrap_or_default();
            task.completion_deadline = Some((Instant::now() + max.saturating_sub(ran), max));
        }
        if let Some((pid, ended)) = task.early_exit.take() {
            self.exited(key, pid, ended);
            return;
        }
        let pending_kill = task.pending_kill.take();
        let cause = task.kill_cause.unwrap_or(KillCause::Requested);
        let killing = task.state == TaskState::TaskKilling;
        if !recovered.ended_while_down {
            self.start_health(&key, &recovered.running, recovered.probes);
        }
        if stopping {
            if let Some(task) = self.tasks.get_mut(&key) {
                hard_kill(task);
            }
        } else if let Some(grace) = pending_kill {
            self.start_kill(&key, grace, cause);
        } else if killing {
            // It was being killed when the agent stopped: finish the job.
            if let Some(task) = self.tasks.get_mut(&key) {
                task.state = TaskState::TaskRunning;
            }
            self.start_kill(&key, None, KillCause::Requested);
        }
    }

    /// The sandboxes of the tasks the agent holds (recovered ones included).
    pub(crate) fn live_sandboxes(&self) -> Vec<PathBuf> {
        self.tasks.values().map(|t| t.sandbox.clone()).collect()
    }

    /// Sandboxes left by an earlier run of the agent, found at start.
    pub(crate) fn adopt_sandboxes(&mut self, found: Vec<(PathBuf, Duration)>) {
        self.gc.adopt(found, Instant::now());
    }

    /// Runs until a shutdown (ours or the master's) has killed every task.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), AgentError> {
        loop {
            if let Some(result) = self.finished() {
                return result;
            }
            self.step(&mut rx).await;
        }
    }

    /// One turn of the loop: the next command or the earliest timer. Tests
    /// call it directly to look at the actor between turns.
    async fn step(&mut self, rx: &mut mpsc::Receiver<Command>) {
        let deadline = self.next_deadline();
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => self.handle(cmd),
                // Cannot happen while we hold `cmd_tx`; stop cleanly anyway.
                None => self.begin_stop(Stop::Requested),
            },
            () = sleep_until_opt(deadline) => self.on_timer(),
        }
        self.update_metrics();
    }

    fn finished(&mut self) -> Option<Result<(), AgentError>> {
        let stop = self.stopping.as_ref()?;
        if self.tasks.values().any(|t| t.pid.is_some() || t.launching) || !self.pods.is_empty() {
            return None;
        }
        Some(match stop {
            Stop::Requested => Ok(()),
            Stop::RemovedByMaster(message) => Err(AgentError::RemovedByMaster {
                message: message.clone(),
            }),
        })
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Attaching { reply } => {
                self.outbound = None;
                // The volumes come from the volume thread, after every
                // create and destroy already sent to it: what is on disk.
                let mut register = self.register_message();
                let volumes = self.volumes.clone();
                tokio::spawn(async move {
                    match volumes.list().await {
                        Ok(list) => {
                            let agent_id = register
                                .info
                                .as_ref()
                                .map(|i| i.id.clone())
                                .unwrap_or_default();
                            register.volumes = list
                                .into_iter()
                                .map(|v| pb::PersistentVolume {
                                    agent_id: agent_id.clone(),
                                    ..v
                                })
                                .collect();
                        }
                        Err(e) => warn!(error = %e, "registering without persistent volumes"),
                    }
                    let _ = reply.send(register);
                });
            }
            Command::Registered { agent_id, outbound } => self.registered(agent_id, outbound),
            Command::Disconnected => {
                if self.outbound.take().is_some() {
                    info!("disconnected from the master");
                }
            }
            Command::FromMaster(msg) => self.handle_master_message(*msg),
            Command::Started {
                key,
                running,
                probes,
            } => {
                // First, so the RUNNING update carries `ready = false`.
                self.start_health(&key, &running, probes);
                self.started(key, running);
            }
            Command::HealthResult {
                key,
                pid,
                kind,
                outcome,
                duration,
            } => self.health_result(key, pid, kind, outcome, duration),
            Command::LaunchFailed { key, message } => self.launch_failed(key, message),
            Command::Exited { key, pid, ended } => self.exited(key, pid, ended),
            Command::UsageSampled(samples) => self.usage_sampled(samples),
            Command::PodReady { pod_id, result } => self.pod_ready(&pod_id, result),
            Command::PodGone { pod_id } => {
                self.pods.remove(&pod_id);
                self.checkpoint.remove_pod(&pod_id);
            }
            Command::State { reply } => {
                let _ = reply.send(self.state_view());
            }
            Command::FileTarget {
                framework_id,
                task_id,
                reply,
            } => {
                let key = (framework_id.to_string(), task_id.to_string());
                let target = self.tasks.get(&key).map(|t| FileTarget {
                    sandbox: t.sandbox.clone(),
                    done: t.done.subscribe(),
                });
                let _ = reply.send(target);
            }
            Command::Readopted { key, result } => self.readopted(key, result),
            Command::Checkpointed { seq } => {
                self.updates.mark_durable(seq);
                self.flush_updates();
            }
            Command::Shutdown => self.begin_stop(Stop::Requested),
        }
    }

    fn handle_master_message(&mut self, msg: pb::master_message::Message) {
        use pb::master_message::Message;
        match msg {
            Message::RunTask(run) => self.run_task(run),
            Message::RunTaskGroup(run) => self.run_task_group(run),
            Message::KillTask(kill) => self.kill_task(kill),
            Message::Acknowledgement(ack) => self.acknowledge(ack),
            Message::ShutdownFramework(s) => self.shutdown_framework(&s.framework_id),
            Message::Shutdown(s) => {
                warn!(message = %s.message, "the master removed this agent; killing all tasks");
                self.begin_stop(Stop::RemovedByMaster(s.message));
            }
            Message::CreateVolume(v) => self.create_volume(&v),
            Message::DestroyVolume(v) => self.destroy_volume(&v),
            // The master link consumes these itself.
            Message::Registered(_) | Message::Heartbeat(_) => {}
        }
    }

    /// `CreateVolume`: made on the volume thread, in order with the pods
    /// and destroys that follow.
    fn create_volume(&mut self, volume: &pb::PersistentVolume) {
        let checked = VolumeKey::parse(&volume.framework_id, &volume.id, "create_volume")
            .and_then(|k| validate_disk_mib(volume.disk_mib, "create_volume.disk_mib").map(|_| k));
        match checked {
            Ok(key) => {
                info!(framework_id = %key.framework_id, volume_id = %key.volume_id,
                      disk_mib = volume.disk_mib, "creating persistent volume");
                self.volumes.create(key, volume.disk_mib);
            }
            Err(e) => warn!(framework_id = %volume.framework_id, volume_id = %volume.id,
                            error = %e, "invalid CreateVolume; ignored"),
        }
    }

    /// `DestroyVolume`: refused while a live pod of this agent mounts the
    /// volume (the master never asks then; the data is worth a check).
    fn destroy_volume(&mut self, volume: &pb::PersistentVolume) {
        let key = match VolumeKey::parse(&volume.framework_id, &volume.id, "destroy_volume") {
            Ok(key) => key,
            Err(e) => {
                warn!(framework_id = %volume.framework_id, volume_id = %volume.id,
                      error = %e, "invalid DestroyVolume; ignored");
                return;
            }
        };
        if let Some(pod_id) = self.pod_mounting(&key) {
            warn!(framework_id = %key.framework_id, volume_id = %key.volume_id, pod_id,
                  "DestroyVolume of a persistent volume a live pod mounts; refused");
            return;
        }
        info!(framework_id = %key.framework_id, volume_id = %key.volume_id,
              "destroying persistent volume");
        self.volumes.destroy(key);
    }

    /// The live pod (teardown not begun) that mounts the volume, if any.
    fn pod_mounting(&self, key: &VolumeKey) -> Option<&str> {
        self.pods
            .iter()
            .find(|(_, p)| {
                !p.tearing_down
                    && p.framework_id == key.framework_id.as_str()
                    && p.persistent.contains(&key.volume_id)
            })
            .map(|(id, _)| id.as_str())
    }

    fn register_message(&self) -> pb::Register {
        let mut framework_ids: Vec<&str> = self
            .tasks
            .values()
            .map(|t| t.framework_id.as_str())
            .collect();
        framework_ids.sort_unstable();
        framework_ids.dedup();
        pb::Register {
            info: Some(pb::AgentInfo {
                id: self
                    .agent_id
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                hostname: self.identity.hostname.clone(),
                address: self.identity.address.clone(),
                resources: self.identity.resources.to_proto(),
                attributes: self.identity.attributes.clone(),
            }),
            tasks: self
                .tasks
                .values()
                .map(|t| pb::RunningTask {
                    framework_id: t.framework_id.to_string(),
                    task: Some(t.info.clone()),
                    state: t.state as i32,
                })
                .collect(),
            frameworks: framework_ids
                .into_iter()
                .filter_map(|id| self.frameworks.get(id).cloned())
                .collect(),
            version: AGENT_VERSION.to_string(),
            // Filled in from the volume thread (`Command::Attaching`).
            volumes: Vec::new(),
            replaces_agent_id: self.replaces_agent_id.clone().unwrap_or_default(),
        }
    }

    fn registered(&mut self, agent_id: AgentId, outbound: mpsc::Sender<pb::AgentMessage>) {
        match &self.agent_id {
            Some(old) if *old != agent_id => warn!(
                old_agent_id = %old, agent_id = %agent_id,
                "the master assigned a different agent id; adopting it"
            ),
            Some(_) => info!(agent_id = %agent_id, "re-registered with the master"),
            None => info!(agent_id = %agent_id, "registered with the master"),
        }
        // Lazily durable: a crash before it is written comes back as the
        // agent of the previous checkpoint, which the master sorts out.
        self.checkpoint.put_agent(&pb::AgentCheckpoint {
            agent_id: agent_id.to_string(),
            boot_id: self.identity.boot_id.clone(),
        });
        self.replaces_agent_id = None;
        self.agent_id = Some(agent_id);
        self.outbound = Some(outbound);
        self.metrics.master_connections.increment(1);
        let now = Instant::now().into_std();
        let resend = self.updates.resend_all(now);
        self.send_updates(resend);
    }

    fn run_task(&mut self, run: pb::RunTask) {
        let (Some(framework), Some(info)) = (run.framework, run.task) else {
            warn!("RunTask without framework or task; ignored");
            return;
        };
        if self.stopping.is_some() {
            warn!(task_id = %info.task_id, "agent is shutting down; RunTask ignored");
            return;
        }
        let ids = FrameworkId::parse(&framework.id, "run_task.framework.id")
            .and_then(|f| TaskId::parse(&info.task_id, "run_task.task.task_id").map(|t| (f, t)));
        let (framework_id, task_id) = match ids {
            Ok(ids) => ids,
            Err(e) => {
                warn!(framework_id = %framework.id, task_id = %info.task_id, error = %e,
                      "RunTask with an invalid id");
                let st = status(
                    &info.task_id,
                    TaskState::TaskError,
                    Reason::TaskInvalid,
                    e.to_string(),
                );
                self.emit(&framework.id, st);
                return;
            }
        };
        let key = (framework_id.to_string(), task_id.to_string());
        if self.tasks.contains_key(&key) {
            info!(framework_id = %framework_id, task_id = %task_id,
                  "duplicate RunTask for a task the agent already has; ignored");
            return;
        }
        self.frameworks.insert(framework_id.to_string(), framework);

        let task = Task::staging(&self.identity.work_dir, framework_id, task_id, info, None);
        self.tasks.insert(key.clone(), task);
        // Not waited for: it only makes a restart report the task ended
        // instead of not knowing it.
        self.checkpoint_task(&key, None);
        self.launch(&key, None);
    }

    /// Starts the task's launcher (image pull, sandbox, container, wait),
    /// which reports Started, then Exited.
    fn launch(&mut self, key: &StreamKey, pod: Option<PodLaunch>) {
        let agent_id = self
            .agent_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        task.launching = true;
        let request = LaunchRequest {
            key: key.clone(),
            framework_id: task.framework_id.clone(),
            task_id: task.task_id.clone(),
            agent_id,
            info: task.info.clone(),
            sandbox: task.sandbox.clone(),
            pod,
        };
        let handle = tokio::spawn(self.launcher.clone().run(request, self.cmd_tx.clone()));
        task._launcher = Some(AbortOnDrop(handle.abort_handle()));
    }

    /// A pod: its tasks are admitted together, then its network and
    /// volumes are made (off the loop), then its containers start.
    fn run_task_group(&mut self, run: pb::RunTaskGroup) {
        let (Some(framework), Some(group)) = (run.framework, run.task_group) else {
            warn!("RunTaskGroup without framework or task group; ignored");
            return;
        };
        if self.stopping.is_some() {
            warn!(
                tasks = group.tasks.len(),
                "agent is shutting down; RunTaskGroup ignored"
            );
            return;
        }
        let fail_all = |actor: &mut Self, state: TaskState, reason: Reason, message: &str| {
            warn!(framework_id = %framework.id, error = %message, "pod refused");
            for info in &group.tasks {
                let st = status(&info.task_id, state, reason, message.to_string());
                actor.emit(&framework.id, st);
            }
        };
        let framework_id = match FrameworkId::parse(&framework.id, "run_task_group.framework.id") {
            Ok(id) => id,
            Err(e) => {
                return fail_all(
                    self,
                    TaskState::TaskError,
                    Reason::TaskInvalid,
                    &e.to_string(),
                );
            }
        };
        let mut ids = Vec::with_capacity(group.tasks.len());
        for (i, info) in group.tasks.iter().enumerate() {
            let parsed =
                TaskId::parse(&info.task_id, &format!("run_task_group.tasks[{i}].task_id"))
                    .map(|t| (framework_id.clone(), t));
            match parsed {
                Ok(ids_of) => ids.push(ids_of),
                Err(e) => {
                    return fail_all(
                        self,
                        TaskState::TaskError,
                        Reason::TaskInvalid,
                        &e.to_string(),
                    );
                }
            }
        }
        if ids
            .iter()
            .any(|(f, t)| self.tasks.contains_key(&(f.to_string(), t.to_string())))
        {
            info!(framework_id = %framework.id, "duplicate RunTaskGroup for a pod the agent already has; ignored");
            return;
        }
        if self.launcher.containerizer.is_none() || self.launcher.network.is_none() {
            let why = self.launcher.pods_unavailable.clone().unwrap_or_default();
            let message = format!("pods need container isolation and a pod network; {why}");
            return fail_all(
                self,
                TaskState::TaskFailed,
                Reason::ContainerLaunchFailed,
                &message,
            );
        }
        let pod_id = uuid::Uuid::new_v4().simple().to_string();
        let dir = pod::pod_dir(&self.identity.work_dir, &pod_id);
        let mut volumes = HashMap::new();
        let mut empty_dirs = Vec::new();
        let mut persistent = Vec::new();
        for (i, v) in group.volumes.iter().enumerate() {
            let source = pod::volume_source(
                &self.identity.work_dir,
                &dir,
                &framework_id,
                v,
                &self.launcher.allowed_host_paths,
            );
            let source = match source {
                Ok(source) => source,
                Err(e) => {
                    let message = format!("task_group.volumes[{i}] ('{}'): {e}", v.name);
                    return fail_all(
                        self,
                        TaskState::TaskFailed,
                        Reason::ContainerLaunchFailed,
                        &message,
                    );
                }
            };
            match &source {
                pod::VolumeSource::EmptyDir(path) => empty_dirs.push(path.clone()),
                pod::VolumeSource::HostPath(_) => {}
                pod::VolumeSource::Persistent { id, .. } => {
                    let key = VolumeKey {
                        framework_id: framework_id.clone(),
                        volume_id: id.clone(),
                    };
                    // One pod at a time: two writers of one directory that
                    // each believe they own it corrupt it.
                    if let Some(other) = self.pod_mounting(&key) {
                        let message = format!(
                            "task_group.volumes[{i}] ('{}'): persistent volume '{id}' is mounted by another pod on this agent ({other})",
                            v.name
                        );
                        return fail_all(
                            self,
                            TaskState::TaskFailed,
                            Reason::ContainerLaunchFailed,
                            &message,
                        );
                    }
                    persistent.push(crate::launch::PersistentMount {
                        index: i,
                        name: v.name.clone(),
                        key,
                    });
                }
            }
            volumes.insert(v.name.clone(), source.path().to_path_buf());
        }
        self.frameworks
            .insert(framework.id.clone(), framework.clone());
        let mut keys = Vec::with_capacity(ids.len());
        for ((framework_id, task_id), info) in ids.into_iter().zip(group.tasks) {
            let key = (framework_id.to_string(), task_id.to_string());
            let task = Task::staging(
                &self.identity.work_dir,
                framework_id,
                task_id,
                info,
                Some(pod_id.clone()),
            );
            self.tasks.insert(key.clone(), task);
            self.checkpoint_task(&key, None);
            keys.push(key);
        }
        info!(framework_id = %framework.id, pod_id = %pod_id, tasks = keys.len(), "launching pod");
        let mounted: Vec<VolumeId> = persistent.iter().map(|m| m.key.volume_id.clone()).collect();
        let network = self.launcher.network.clone();
        let store = self.volumes.clone();
        let tx = self.cmd_tx.clone();
        let id = pod_id.clone();
        let prepare = tokio::spawn(async move {
            let result =
                crate::launch::prepare_pod(network, &id, empty_dirs, store, persistent, volumes)
                    .await;
            let _ = tx.send(Command::PodReady { pod_id: id, result }).await;
        });
        self.pods.insert(
            pod_id,
            Pod {
                framework_id: framework.id,
                keys,
                persistent: mounted,
                policy: pod::Policy::from_proto(group.restart_policy),
                dir,
                launch: None,
                failed: false,
                tearing_down: false,
                _prepare: Some(AbortOnDrop(prepare.abort_handle())),
            },
        );
    }

    /// The pod's network and volumes are ready: start its containers; or
    /// they are not: its tasks fail.
    fn pod_ready(&mut self, pod_id: &str, result: Result<PodLaunch, String>) {
        let Some(pod) = self.pods.get_mut(pod_id) else {
            return;
        };
        pod._prepare = None;
        match result {
            Ok(launch) => {
                info!(pod_id, ip = %launch.ip, "pod network ready");
                pod.launch = Some(launch.clone());
                // Before any of its containers starts: a restarted agent
                // re-adopts a container only into a recorded pod.
                let record = pb::PodCheckpoint {
                    pod_id: pod_id.to_string(),
                    framework_id: pod.framework_id.clone(),
                    restart_policy: pod.policy.to_proto() as i32,
                    ip: launch.ip.clone(),
                    volumes: launch
                        .volumes
                        .iter()
                        .map(|(name, dir)| (name.clone(), dir.display().to_string()))
                        .collect(),
                    persistent_volumes: pod.persistent.iter().map(ToString::to_string).collect(),
                };
                self.checkpoint.put_pod(record);
                let keys = pod.keys.clone();
                for key in keys {
                    self.launch(&key, Some(launch.clone()));
                }
            }
            Err(message) => {
                pod.failed = true;
                let keys = pod.keys.clone();
                for key in keys {
                    self.launch_failed(key, format!("cannot set up the pod: {message}"));
                }
            }
        }
    }

    /// The pod has failed: every task of it still alive is killed.
    fn fail_pod(&mut self, pod_id: &str) {
        let Some(pod) = self.pods.get_mut(pod_id) else {
            return;
        };
        pod.failed = true;
        let keys = pod.keys.clone();
        for key in keys {
            self.kill_one(&key, None, KillCause::PodFailed);
        }
    }

    /// Kills one task, whatever it is doing: launching (killed once
    /// started), running, or waiting to restart (ends now).
    fn kill_one(&mut self, key: &StreamKey, grace: Option<f64>, cause: KillCause) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        if is_terminal(task.state) {
            return;
        }
        if task.launching {
            task.kill_cause.get_or_insert(cause);
            task.pending_kill = Some(grace);
        } else if let Some((_, why)) = task.restart_at.take() {
            let cause = *task.kill_cause.get_or_insert(cause);
            let (state, reason, message) = match cause {
                KillCause::PodFailed => (
                    TaskState::TaskKilled,
                    Reason::Unspecified,
                    "killed: another task of its pod failed".to_string(),
                ),
                _ => (
                    TaskState::TaskKilled,
                    Reason::Unspecified,
                    format!("killed while waiting to restart ({why})"),
                ),
            };
            self.end_task(key, state, reason, message, None, None);
        } else {
            self.start_kill(key, grace, cause);
        }
    }

    /// A task ends for good: its final update, and its pod's teardown once
    /// the pod has no live task.
    fn end_task(
        &mut self,
        key: &StreamKey,
        state: TaskState,
        reason: Reason,
        message: String,
        exit_code: Option<i32>,
        signal: Option<i32>,
    ) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        task.state = state;
        task.exit_code = exit_code;
        task.signal = signal;
        task.done.send_replace(true);
        let pod_id = task.pod.clone();
        info!(framework_id = %key.0, task_id = %key.1, state = state_name(state),
              message = %message, "task ended");
        let mut st = status(&key.1, state, reason, message);
        st.exit_code = exit_code;
        st.signal = signal;
        self.emit(&key.0, st);
        if let Some(pod_id) = pod_id {
            self.maybe_tear_down(&pod_id);
        }
    }

    fn pod_status(&self, pod_id: &str) -> Option<pb::PodStatus> {
        let launch = self.pods.get(pod_id)?.launch.as_ref()?;
        Some(pb::PodStatus {
            ip: launch.ip.clone(),
        })
    }

    /// Once no task of the pod is alive, its network and volumes go.
    fn maybe_tear_down(&mut self, pod_id: &str) {
        let Some(pod) = self.pods.get(pod_id) else {
            return;
        };
        let alive = pod.keys.iter().any(|k| {
            self.tasks
                .get(k)
                .is_some_and(|t| !is_terminal(t.state) || t.launching || t.pid.is_some())
        });
        if alive || pod.tearing_down {
            return;
        }
        let Some(pod) = self.pods.get_mut(pod_id) else {
            return;
        };
        pod.tearing_down = true;
        pod._prepare = None;
        info!(pod_id, framework_id = %pod.framework_id, "pod ended; removing its network and volumes");
        let network = self.launcher.network.clone();
        let dir = pod.dir.clone();
        let tx = self.cmd_tx.clone();
        let id = pod_id.to_string();
        tokio::spawn(async move {
            crate::launch::tear_down_pod(network, &id, &dir).await;
            let _ = tx.send(Command::PodGone { pod_id: id }).await;
        });
    }

    fn started(&mut self, key: StreamKey, running: Running) {
        let stopping = self.stopping.is_some();
        let Some(task) = self.tasks.get_mut(&key) else {
            // Cannot happen (tasks are kept until their terminal update is
            // acknowledged); never leave the process running.
            let _ = running.kill();
            return;
        };
        task.launching = false;
        task.pid = Some(running.pid());
        let pid = running.pid();
        task.container = Some(match running.checkpoint() {
            // A plain process: only to kill what a crash of the agent left.
            None => pb::ContainerCheckpoint {
                pid,
                start_ticks: crate::task::process_start_ticks(pid).unwrap_or(0),
                ..Default::default()
            },
            Some(checkpoint) => pb::ContainerCheckpoint {
                container_id: checkpoint.container.id.clone(),
                pid,
                start_ticks: checkpoint.container.start_time,
                launcher_data: serde_json::to_vec(checkpoint).unwrap_or_else(|e| {
                    warn!(error = %e, "cannot encode the container's checkpoint; it will not be re-adopted");
                    Vec::new()
                }),
            },
        });
        task.running = Some(running);
        task.state = TaskState::TaskRunning;
        let restarted = task.restarting.take();
        let restart_count = task.restarts.as_ref().map_or(0, |r| r.count);
        if let Some(r) = task.restarts.as_mut() {
            r.started(Instant::now().into_std());
        }
        // Counted from the command's start, as Mesos' command executor does:
        // an image pull does not eat into it.
        if let Some(secs) = task.info.max_completion_time_seconds {
            match completion_time_from_seconds(secs) {
                Some(max) => task.completion_deadline = Some((Instant::now() + max, max)),
                None => warn!(task_id = %task.task_id, secs,
                              "invalid max completion time; not enforced"),
            }
        }
        info!(framework_id = %task.framework_id, task_id = %task.task_id, pid = ?task.pid,
              sandbox = %task.sandbox.display(), "task started");
        let message = restarted.map_or_else(String::new, |why| {
            format!("container restarted (restart {restart_count}); it had ended: {why}")
        });
        let mut st = status(
            task.task_id.as_str(),
            TaskState::TaskRunning,
            Reason::Unspecified,
            message,
        );
        st.started_at = Some(now_seconds());
        let pending_kill = task.pending_kill.take();
        let cause = task.kill_cause.unwrap_or(KillCause::Requested);
        self.emit(&key.0, st);
        if stopping {
            if let Some(task) = self.tasks.get_mut(&key) {
                hard_kill(task);
            }
        } else if let Some(grace) = pending_kill {
            self.start_kill(&key, grace, cause);
        }
    }

    fn launch_failed(&mut self, key: StreamKey, message: String) {
        let Some(task) = self.tasks.get_mut(&key) else {
            return;
        };
        warn!(framework_id = %key.0, task_id = %key.1, error = %message, "task launch failed");
        task.launching = false;
        let pod_id = task.pod.clone();
        self.end_task(
            &key,
            TaskState::TaskFailed,
            Reason::ContainerLaunchFailed,
            message,
            None,
            None,
        );
        // A pod launches as a unit: the others are killed.
        if let Some(pod_id) = pod_id
            && self.pods.get(&pod_id).is_some_and(|p| !p.failed)
        {
            self.fail_pod(&pod_id);
        }
    }

    /// Starts the health checks of a task whose process `running` just
    /// started (again, for a restarted pod container: its checks start
    /// over, as Kubernetes' do). Checks the agent cannot run are logged
    /// and skipped; the master refuses them, so this is only a safeguard.
    fn start_health(
        &mut self,
        key: &StreamKey,
        running: &Running,
        probes: Option<std::sync::Arc<ProbeTarget>>,
    ) {
        self.health.remove(key);
        let (Some(target), Some(task)) = (probes, self.tasks.get(key)) else {
            return;
        };
        if self.stopping.is_some() {
            return;
        }
        let (specs, errors) = health::checks_from_proto(&task.info.health_checks);
        for error in errors {
            warn!(framework_id = %key.0, task_id = %key.1, %error,
                  "health check cannot be run; skipped");
        }
        if specs.is_empty() {
            return;
        }
        let monitor = Monitor::start(
            key.clone(),
            running.pid(),
            specs,
            target,
            self.cmd_tx.clone(),
        );
        self.health.insert(key.clone(), monitor);
    }

    /// A probe's result: counted, then judged by the task's monitor; a
    /// change of `healthy`/`ready` is a RUNNING update, a failed liveness
    /// or startup check kills the task.
    fn health_result(
        &mut self,
        key: StreamKey,
        pid: u32,
        kind: health::Kind,
        outcome: health::Outcome,
        duration: Duration,
    ) {
        self.metrics
            .health_check(kind.label(), outcome.label(), duration.as_secs_f64());
        let current = self
            .tasks
            .get(&key)
            .is_some_and(|t| t.pid == Some(pid) && t.state == TaskState::TaskRunning);
        let Some(monitor) = self.health.get_mut(&key).filter(|_| current) else {
            // A result from before a kill or restart, already on its way.
            return;
        };
        if let health::Outcome::Failure(e) | health::Outcome::Timeout(e) = &outcome {
            debug!(framework_id = %key.0, task_id = %key.1, check = kind.label(), error = %e,
                   "health check probe failed");
        }
        let effects = monitor.record(kind, &outcome);
        if let Some(message) = effects.update {
            info!(framework_id = %key.0, task_id = %key.1, healthy = ?monitor.healthy(),
                  ready = ?monitor.ready(), %message, "health changed");
            let st = status(
                &key.1,
                TaskState::TaskRunning,
                Reason::TaskHealthCheckStatusUpdated,
                message,
            );
            self.emit(&key.0, st);
        }
        if let Some(message) = effects.kill {
            warn!(framework_id = %key.0, task_id = %key.1, %message,
                  "health check failed; killing task");
            self.metrics.tasks_unhealthy_killed.increment(1);
            self.start_kill(&key, None, KillCause::Unhealthy);
        }
    }

    fn kill_task(&mut self, kill: pb::KillTask) {
        let key = (kill.framework_id, kill.task_id);
        match self.tasks.get(&key) {
            None => {
                info!(framework_id = %key.0, task_id = %key.1,
                      "kill of a task unknown to the agent; reporting TASK_LOST");
                let st = status(
                    &key.1,
                    TaskState::TaskLost,
                    Reason::TaskUnknown,
                    "task is unknown to the agent".to_string(),
                );
                self.emit(&key.0, st);
            }
            Some(t) if is_terminal(t.state) => {
                debug!(framework_id = %key.0, task_id = %key.1, "kill of a terminal task; ignored");
            }
            // Killing one task of a pod kills the pod (Mesos: a task group
            // lives and dies as a unit).
            Some(t) if t.pod.is_some() => {
                let keys = t
                    .pod
                    .as_ref()
                    .and_then(|id| self.pods.get_mut(id))
                    .map(|p| {
                        p.failed = true;
                        p.keys.clone()
                    })
                    .unwrap_or_else(|| vec![key.clone()]);
                for k in keys {
                    self.kill_one(&k, kill.kill_grace_period_seconds, KillCause::Requested);
                }
            }
            Some(_) if self.tasks.get(&key).is_some_and(|t| t.launching) => {
                // Killed once it has started (or reported failed if it never does).
                if let Some(t) = self.tasks.get_mut(&key) {
                    t.pending_kill = Some(kill.kill_grace_period_seconds);
                }
            }
            Some(_) => self.start_kill(&key, kill.kill_grace_period_seconds, KillCause::Requested),
        }
    }

    fn shutdown_framework(&mut self, framework_id: &str) {
        let keys: Vec<StreamKey> = self
            .tasks
            .iter()
            .filter(|(k, t)| k.0 == framework_id && !is_terminal(t.state))
            .map(|(k, _)| k.clone())
            .collect();
        info!(framework_id, tasks = keys.len(), "shutting down framework");
        for key in keys {
            self.start_kill(&key, None, KillCause::Requested);
        }
    }

    /// SIGTERM now, SIGKILL after the grace period (the kill's, else the
    /// task's, else the agent default). A second kill can only shorten it;
    /// the first kill's cause decides the task's final state.
    fn start_kill(&mut self, key: &StreamKey, grace_override: Option<f64>, cause: KillCause) {
        let default = self.default_kill_grace;
        // Probing a task that is going away would only add noise.
        if let Some(monitor) = self.health.get_mut(key) {
            monitor.stop();
        }
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        let grace = match grace_override.or(task.info.kill_grace_period_seconds) {
            None => default,
            Some(secs) => grace_from_seconds(secs).unwrap_or_else(|| {
                warn!(task_id = %task.task_id, secs, "invalid kill grace period; using the default");
                default
            }),
        };
        let sigkill_at = Instant::now() + grace;
        if let Some(timer) = task.kill.as_mut() {
            if !timer.sigkill_sent && sigkill_at < timer.sigkill_at {
                timer.sigkill_at = sigkill_at;
            }
            return;
        }
        let (Some(pid), Some(running)) = (task.pid, task.running.clone()) else {
            return;
        };
        task.state = TaskState::TaskKilling;
        let cause = *task.kill_cause.get_or_insert(cause);
        task.completion_deadline = None;
        task.kill = Some(KillTimer {
            sigkill_at,
            sigkill_sent: false,
        });
        info!(framework_id = %task.framework_id, task_id = %task.task_id, pid,
              grace_ms = grace.as_millis() as u64, cause = ?cause, "killing task");
        if let Err(e) = running.terminate() {
            warn!(task_id = %task.task_id, pid, error = %e, "cannot send SIGTERM");
        }
        // Tell the framework why now, not only in the terminal update.
        let (reason, message) = match cause {
            KillCause::Requested => (Reason::Unspecified, String::new()),
            KillCause::MaxCompletionTime(max) => (
                Reason::MaxCompletionTimeReached,
                max_completion_message(max),
            ),
            KillCause::PodFailed => (
                Reason::Unspecified,
                "another task of its pod failed".to_string(),
            ),
            // The check's message is filled in by `emit`.
            KillCause::Unhealthy => (Reason::TaskUnhealthy, String::new()),
        };
        let st = status(
            task.task_id.as_str(),
            TaskState::TaskKilling,
            reason,
            message,
        );
        let framework_id = key.0.clone();
        self.emit(&framework_id, st);
    }

    fn begin_stop(&mut self, stop: Stop) {
        if self.stopping.is_none() {
            self.stopping = Some(stop);
        }
        for task in self.tasks.values_mut() {
            hard_kill(task);
        }
        for monitor in self.health.values_mut() {
            monitor.stop();
        }
        for pod in self.pods.values_mut() {
            pod.failed = true;
        }
        // Containers waiting to restart have nothing to kill: they end.
        let waiting: Vec<StreamKey> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.restart_at.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for key in waiting {
            self.kill_one(&key, Some(0.0), KillCause::Requested);
        }
    }

    fn exited(&mut self, key: StreamKey, pid: u32, ended: Ended) {
        let Some(task) = self.tasks.get_mut(&key) else {
            warn!(framework_id = %key.0, task_id = %key.1, "exit of an unknown task");
            return;
        };
        if task.pid.is_none() && task.launching && task.container.is_some() {
            // A recovered container that ended while no agent ran: its
            // exit can beat `Readopted`, which handles it.
            task.early_exit = Some((pid, ended));
            return;
        }
        if task.pid != Some(pid) {
            warn!(framework_id = %key.0, task_id = %key.1, pid, "exit of a stale process");
            return;
        }
        let (state, reason, message) = final_status_of(&ended, task.kill_cause);
        // The check's own words say more than "a health check failed".
        let message = match (
            task.kill_cause,
            self.health.get(&key).and_then(|m| m.failure()),
        ) {
            (Some(KillCause::Unhealthy), Some(failure)) => failure.to_string(),
            _ => message,
        };
        let succeeded = state == TaskState::TaskFinished;
        // A container killed by its liveness check restarts by its pod's
        // policy, as in Kubernetes; any other kill ends it.
        let stopping =
            task.kill_cause.is_some_and(|c| c != KillCause::Unhealthy) || self.stopping.is_some();
        task.pid = None;
        task.running = None;
        task.container = None;
        self.usage.remove(&key);
        if let Some(monitor) = self.health.get_mut(&key) {
            monitor.stop();
        }
        task.kill = None;
        task.completion_deadline = None;
        let (exit_code, signal) = match ended.termination {
            Termination::Exited(code) => (Some(code), None),
            Termination::Signaled(sig) => (None, Some(sig)),
            Termination::WaitFailed(_) => (None, None),
        };
        let verdict = match (task.pod.clone(), task.restarts.as_mut()) {
            (Some(pod_id), Some(restarts)) => {
                let pod = self.pods.get(&pod_id);
                let policy = pod.map_or(pod::Policy::Never, |p| p.policy);
                let stopping = stopping || pod.is_none_or(|p| p.failed);
                let now = Instant::now().into_std();
                Some((
                    pod_id,
                    pod::on_exit(policy, restarts, succeeded, stopping, now),
                ))
            }
            _ => None,
        };
        match verdict {
            Some((_, pod::Verdict::Restart { at })) => {
                let at = Instant::from_std(at);
                info!(framework_id = %key.0, task_id = %key.1, %message,
                      delay_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64,
                      "pod container ended; restarting it");
                task.restart_at = Some((at, message));
                task.kill_cause = None;
                task.state = TaskState::TaskRunning;
            }
            Some((pod_id, pod::Verdict::EndAndKillPod)) => {
                self.end_task(&key, state, reason, message, exit_code, signal);
                self.fail_pod(&pod_id);
            }
            Some((_, pod::Verdict::End)) | None => {
                self.end_task(&key, state, reason, message, exit_code, signal);
            }
        }
    }

    fn acknowledge(&mut self, ack: pb::StatusAcknowledgement) {
        match self
            .updates
            .acknowledge(&ack.framework_id, &ack.task_id, &ack.uuid)
        {
            AckOutcome::Ignored => {
                self.metrics.acks_ignored.increment(1);
                debug!(framework_id = %ack.framework_id, task_id = %ack.task_id,
                       ignored_total = self.updates.acks_ignored(),
                       "acknowledgement matches no pending update; ignored");
            }
            AckOutcome::Accepted { task_done } => {
                let key = (ack.framework_id, ack.task_id);
                if task_done && self.tasks.get(&key).is_some_and(|t| is_terminal(t.state)) {
                    if let Some(task) = self.tasks.remove(&key) {
                        self.gc.finished(task.sandbox, Instant::now());
                        self.checkpoint.remove_task(&key.0, &key.1);
                    }
                    if !self.tasks.keys().any(|k| k.0 == key.0) {
                        self.frameworks.remove(&key.0);
                    }
                    info!(framework_id = %key.0, task_id = %key.1,
                          "terminal update acknowledged; task forgotten");
                } else if self.tasks.contains_key(&key) {
                    // Not waited for: a crash before it is written resends
                    // the acknowledged update, with its uuid.
                    self.checkpoint_task(&key, None);
                }
                self.flush_updates();
            }
        }
    }

    /// Queues an agent-generated update and sends what is due.
    fn emit(&mut self, framework_id: &str, mut status: pb::TaskStatus) {
        // Every update of a task with health checks carries its latest
        // verdicts; a kill for a failed check also carries why. The
        // monitor goes with the task's final update.
        let key =
            (!self.health.is_empty()).then(|| (framework_id.to_string(), status.task_id.clone()));
        if let Some(key) = key
            && let Some(monitor) = self.health.get(&key)
        {
            status.healthy = status.healthy.or(monitor.healthy());
            status.ready = status.ready.or(monitor.ready());
            if status.reason() == Reason::TaskUnhealthy
                && let Some(failure) = monitor.failure()
            {
                status.message = failure.to_string();
            }
            if is_terminal(status.state()) {
                self.health.remove(&key);
            }
        }
        // Every update of a pod's task says which pod and how often its
        // container restarted, so the latest one always has it.
        if !self.pods.is_empty()
            && let Some(task) = self
                .tasks
                .get(&(framework_id.to_string(), status.task_id.clone()))
            && let Some(pod_id) = &task.pod
        {
            status.restart_count = task.restarts.as_ref().map_or(0, |r| r.count);
            if status.pod.is_none() {
                status.pod = self.pod_status(pod_id);
            }
        }
        let agent_id = self
            .agent_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let key = (framework_id.to_string(), status.task_id.clone());
        let update = new_update(&agent_id, framework_id, status, now_seconds());
        // Durable before it is sent: the writer's report releases it.
        let seq = self.checkpoint_task(&key, Some(&update));
        if let Some(notice) = self.updates.push(update, seq, Instant::now().into_std()) {
            self.send_to_master(pb::agent_message::Message::TaskEnded(notice));
        }
        self.flush_updates();
    }

    /// Queues a write of the task's checkpoint (with `extra`, an update not
    /// queued yet, behind its unacknowledged ones); returns the write's
    /// sequence number, 0 when there is nothing to write (an update about a
    /// task the agent does not hold, e.g. `TASK_LOST` for an unknown one:
    /// the master reconciles those).
    fn checkpoint_task(&mut self, key: &StreamKey, extra: Option<&pb::StatusUpdate>) -> u64 {
        let Some(task) = self.tasks.get(key) else {
            return 0;
        };
        let framework = self
            .frameworks
            .get(&key.0)
            .cloned()
            .unwrap_or_else(|| pb::FrameworkInfo {
                id: key.0.clone(),
                ..Default::default()
            });
        let record = pb::TaskCheckpoint {
            framework: Some(framework),
            task: Some(task.info.clone()),
            state: task.state as i32,
            pod_id: task.pod.clone().unwrap_or_default(),
            container: task.container.clone(),
            updates: self.updates.queued(key).chain(extra).cloned().collect(),
        };
        self.checkpoint.put_task(&key.0, &key.1, record)
    }

    /// Sends a message that needs no retry: it is best effort, or restated
    /// by the next registration (a task's final state is in its report).
    fn send_to_master(&self, message: pb::agent_message::Message) {
        if let Some(outbound) = &self.outbound
            && outbound
                .try_send(pb::AgentMessage {
                    message: Some(message),
                })
                .is_err()
        {
            debug!("stream to the master is full or closed; message dropped");
        }
    }

    fn flush_updates(&mut self) {
        if self.outbound.is_none() {
            // Sent by `resend_all` on the next registration.
            return;
        }
        let due = self.updates.due(Instant::now().into_std());
        self.send_updates(due);
    }

    fn send_updates(&mut self, updates: Vec<pb::StatusUpdate>) {
        let Some(outbound) = &self.outbound else {
            return;
        };
        for update in updates {
            let msg = pb::AgentMessage {
                message: Some(pb::agent_message::Message::StatusUpdate(update)),
            };
            match outbound.try_send(msg) {
                Ok(()) => self.metrics.status_updates_sent.increment(1),
                // The retry timer sends it again.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    warn!("stream to the master is full; status update will be retried");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.outbound = None;
                    break;
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let kills = self
            .tasks
            .values()
            .filter_map(|t| t.kill.as_ref())
            .filter(|k| !k.sigkill_sent)
            .map(|k| k.sigkill_at);
        let completions = self
            .tasks
            .values()
            .filter_map(|t| t.completion_deadline.map(|(at, _)| at));
        let retry = self
            .outbound
            .as_ref()
            .and(self.updates.next_retry())
            .map(Instant::from_std);
        let usage = self
            .launcher
            .containerizer
            .as_ref()
            .map(|_| self.next_usage);
        let gc = self.gc.next_deadline(Instant::now());
        let metrics = (self.updates.pending() > 0).then_some(self.next_metrics);
        let restarts = self
            .tasks
            .values()
            .filter_map(|t| t.restart_at.as_ref().map(|(at, _)| *at));
        kills
            .chain(restarts)
            .chain(completions)
            .chain(retry)
            .chain(usage)
            .chain(gc)
            .chain(metrics)
            .min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let restarts: Vec<(StreamKey, Option<PodLaunch>)> = self
            .tasks
            .iter_mut()
            .filter(|(_, t)| t.restart_at.as_ref().is_some_and(|(at, _)| *at <= now))
            .filter_map(|(k, t)| {
                let (_, why) = t.restart_at.take()?;
                t.restarting = Some(why);
                let launch = t
                    .pod
                    .as_ref()
                    .and_then(|id| self.pods.get(id)?.launch.clone());
                Some((k.clone(), launch))
            })
            .collect();
        for (key, launch) in restarts {
            info!(framework_id = %key.0, task_id = %key.1, "restarting pod container");
            self.launch(&key, launch);
        }
        let sandboxes = self.gc.take_due(now);
        if !sandboxes.is_empty() {
            debug!(
                count = sandboxes.len(),
                "removing sandboxes of finished tasks"
            );
            self.metrics
                .sandboxes_removed
                .increment(sandboxes.len() as u64);
            tokio::task::spawn_blocking(move || crate::gc::remove(&sandboxes));
        }
        // Taken, not just read: a deadline left in the past would spin the loop.
        let expired: Vec<(StreamKey, Duration)> = self
            .tasks
            .iter_mut()
            .filter_map(|(k, t)| match t.completion_deadline {
                Some((at, max)) if at <= now => {
                    t.completion_deadline = None;
                    Some((k.clone(), max))
                }
                _ => None,
            })
            .collect();
        for (key, max) in expired {
            info!(framework_id = %key.0, task_id = %key.1, max_secs = max.as_secs_f64(),
                  "max completion time reached; killing task");
            self.start_kill(&key, None, KillCause::MaxCompletionTime(max));
        }
        for task in self.tasks.values_mut() {
            let (Some(pid), Some(running), Some(timer)) =
                (task.pid, task.running.as_ref(), task.kill.as_mut())
            else {
                continue;
            };
            if timer.sigkill_sent || timer.sigkill_at > now {
                continue;
            }
            timer.sigkill_sent = true;
            info!(task_id = %task.task_id, pid, "grace period over; sending SIGKILL");
            if let Err(e) = running.kill() {
                warn!(task_id = %task.task_id, pid, error = %e, "cannot send SIGKILL");
            }
        }
        if now >= self.next_metrics {
            // `step` refreshes the gauges after this.
            self.next_metrics = now + PENDING_METRICS_REFRESH;
        }
        if now >= self.next_usage {
            self.next_usage = now + self.usage_interval;
            self.sample_usage();
        }
        self.flush_updates();
    }

    /// Reads every running container's cgroup on the blocking pool; the
    /// result comes back as `UsageSampled`.
    fn sample_usage(&self) {
        let containers: Vec<(StreamKey, std::sync::Arc<Container>)> = self
            .tasks
            .iter()
            .filter_map(|(k, t)| match &t.running {
                Some(Running::Container { container, .. }) => {
                    container.upgrade().map(|c| (k.clone(), c))
                }
                _ => None,
            })
            .collect();
        if containers.is_empty() {
            self.usage.clear();
            return;
        }
        let tx = self.cmd_tx.clone();
        tokio::task::spawn_blocking(move || {
            let samples: Vec<(StreamKey, Usage)> = containers
                .into_iter()
                .filter_map(|(k, c)| c.usage().ok().map(|u| (k, u)))
                .collect();
            let _ = tx.blocking_send(Command::UsageSampled(samples));
        });
    }

    fn usage_sampled(&mut self, samples: Vec<(StreamKey, Usage)>) {
        let now = now_seconds();
        self.usage
            .retain(|k, _| self.tasks.get(k).is_some_and(|t| t.running.is_some()));
        let mut report = Vec::with_capacity(samples.len());
        for (key, u) in samples {
            if self.tasks.get(&key).is_none_or(|t| t.running.is_none()) {
                continue;
            }
            report.push(pb::ContainerUsage {
                framework_id: key.0.clone(),
                task_id: key.1.clone(),
                cpu_user_seconds: u.cpu_user_seconds,
                cpu_system_seconds: u.cpu_system_seconds,
                cpu_throttled_periods: u.cpu_throttled_periods,
                cpu_throttled_seconds: u.cpu_throttled_seconds,
                mem_rss_bytes: u.mem_rss_bytes,
                mem_cache_bytes: u.mem_cache_bytes,
                mem_limit_bytes: u.mem_limit_bytes,
                pids: u.pids,
                timestamp: now,
            });
            self.usage.insert(key, u);
        }
        // Usage is a best-effort view: a full stream skips one report.
        self.send_to_master(pb::agent_message::Message::Usage(pb::UsageReport {
            containers: report,
        }));
    }

    fn update_metrics(&self) {
        let mut counts: HashMap<TaskState, usize> = HashMap::new();
        for t in self.tasks.values() {
            *counts.entry(t.state).or_default() += 1;
        }
        self.metrics.set_task_counts(&counts);
        self.metrics
            .status_updates_pending
            .set(self.updates.pending() as f64);
        let oldest = self.updates.oldest_pending(Instant::now().into_std());
        self.metrics
            .oldest_pending
            .set(oldest.map_or(0.0, |d| d.as_secs_f64()));
        self.metrics
            .sandboxes_retained
            .set(self.gc.retained() as f64);
        let unhealthy = self
            .health
            .values()
            .filter(|m| m.healthy() == Some(false))
            .count();
        self.metrics.tasks_unhealthy.set(unhealthy as f64);
    }

    fn state_view(&self) -> StateView {
        use corral_proto::pb::attribute::Value;
        StateView {
            agent_id: self
                .agent_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            hostname: self.identity.hostname.clone(),
            address: self.identity.address.clone(),
            connected: self.outbound.is_some(),
            resources: self.identity.resources.to_string(),
            attributes: self
                .identity
                .attributes
                .iter()
                .map(|a| {
                    let v = match &a.value {
                        Some(Value::Text(t)) => serde_json::Value::from(t.clone()),
                        Some(Value::Scalar(s)) => serde_json::Value::from(*s),
                        None => serde_json::Value::Null,
                    };
                    (a.name.clone(), v)
                })
                .collect(),
            status_updates_pending: self.updates.pending(),
            tasks: self
                .tasks
                .values()
                .map(|t| TaskView {
                    framework_id: t.framework_id.to_string(),
                    task_id: t.task_id.to_string(),
                    name: t.info.name.clone(),
                    state: state_name(t.state).to_string(),
                    pid: t.pid,
                    sandbox: t.sandbox.display().to_string(),
                    exit_code: t.exit_code,
                    signal: t.signal,
                    usage: self
                        .usage
                        .get(&(t.framework_id.to_string(), t.task_id.to_string()))
                        .map(|u| UsageView::from(&*u)),
                    pod_id: t.pod.clone(),
                    pod_ip: t
                        .pod
                        .as_ref()
                        .and_then(|id| self.pod_status(id))
                        .map(|p| p.ip),
                    restart_count: t.restarts.as_ref().map_or(0, |r| r.count),
                })
                .collect(),
        }
    }
}

/// What the launcher needs to re-adopt a recovered task's container, if it
/// can: a container (not a plain process), not part of a pod (pod networks
/// are not recovered yet), with the launcher's record intact.
fn readoptable(
    pod_id: &str,
    container: Option<&pb::ContainerCheckpoint>,
    have_containerizer: bool,
    pods: &HashSet<String>,
) -> Option<LaunchCheckpoint> {
    let c = container?;
    let pod_lost = !pod_id.is_empty() && !pods.contains(pod_id);
    if pod_lost || c.container_id.is_empty() || !have_containerizer {
        return None;
    }
    match serde_json::from_slice::<LaunchCheckpoint>(&c.launcher_data) {
        Ok(checkpoint) if checkpoint.container.id == c.container_id => Some(checkpoint),
        Ok(_) => {
            warn!(container_id = %c.container_id, "the launcher's record names another container");
            None
        }
        Err(e) => {
            warn!(container_id = %c.container_id, error = %e, "unreadable launcher record");
            None
        }
    }
}

/// The containers the recovered tasks name that the agent will try to
/// re-adopt (a pod task's only if its pod is among `pods`, those whose
/// network survived): the orphan sweep at start leaves them alone.
pub(crate) fn readoptable_containers(
    tasks: &[pb::TaskCheckpoint],
    have_containerizer: bool,
    pods: &HashSet<String>,
) -> HashSet<String> {
    tasks
        .iter()
        .filter(|t| !is_terminal(t.state()))
        .filter_map(|t| readoptable(&t.pod_id, t.container.as_ref(), have_containerizer, pods))
        .map(|c| c.container.id)
        .collect()
}

/// The checkpointed pods worth recovering: those with a task that may
/// still run in a container.
pub(crate) fn pods_to_recover(
    tasks: &[pb::TaskCheckpoint],
    pods: &[pb::PodCheckpoint],
) -> Vec<pb::PodCheckpoint> {
    pods.iter()
        .filter(|p| {
            tasks.iter().any(|t| {
                t.pod_id == p.pod_id
                    && !is_terminal(t.state())
                    && t.container
                        .as_ref()
                        .is_some_and(|c| !c.container_id.is_empty())
            })
        })
        .cloned()
        .collect()
}

/// SIGKILL now (agent stopping): everything the task started; a task still
/// launching is killed as soon as it starts.
fn hard_kill(task: &mut Task) {
    task.kill_cause.get_or_insert(KillCause::Requested);
    task.completion_deadline = None;
    if task.launching {
        task.pending_kill = Some(Some(0.0));
        return;
    }
    let (Some(pid), Some(running)) = (task.pid, task.running.as_ref()) else {
        return;
    };
    task.kill = Some(KillTimer {
        sigkill_at: Instant::now(),
        sigkill_sent: true,
    });
    if let Err(e) = running.kill() {
        warn!(task_id = %task.task_id, pid, error = %e, "cannot send SIGKILL");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::master_message::Message;

    fn final_status(
        termination: &Termination,
        kill_cause: Option<KillCause>,
    ) -> (TaskState, Reason, String) {
        final_status_of(
            &Ended {
                termination: termination.clone(),
                oom_limit: None,
            },
            kill_cause,
        )
    }

    #[test]
    fn an_oom_kill_is_a_memory_limitation_with_the_limit() {
        let ended = Ended {
            termination: Termination::Signaled(9),
            oom_limit: Some(64 * 1024 * 1024),
        };
        let (s, r, m) = final_status_of(&ended, None);
        assert_eq!(
            (s, r),
            (TaskState::TaskFailed, Reason::ContainerLimitationMemory)
        );
        assert!(m.contains("64 MiB"), "{m}");
    }

    #[test]
    fn exit_codes_and_signals_map_to_task_states() {
        let (s, r, m) = final_status(&Termination::Exited(0), None);
        assert_eq!((s, r), (TaskState::TaskFinished, Reason::Unspecified));
        assert_eq!(m, "command exited with status 0");
        let (s, r, m) = final_status(&Termination::Exited(3), None);
        assert_eq!((s, r), (TaskState::TaskFailed, Reason::CommandFailed));
        assert_eq!(m, "command exited with status 3");
        let (s, r, m) = final_status(&Termination::Signaled(11), None);
        assert_eq!((s, r), (TaskState::TaskFailed, Reason::CommandFailed));
        assert!(m.contains("SIGSEGV"), "{m}");
    }

    #[test]
    fn a_task_the_agent_signalled_ends_killed_however_it_exits() {
        for t in [
            Termination::Exited(0),
            Termination::Exited(143),
            Termination::Signaled(15),
            Termination::Signaled(9),
        ] {
            let requested = Some(KillCause::Requested);
            assert_eq!(
                final_status(&t, requested).0,
                TaskState::TaskKilled,
                "{t:?}"
            );
        }
    }

    #[test]
    fn a_task_killed_at_its_max_completion_time_failed_however_it_exits() {
        let cause = Some(KillCause::MaxCompletionTime(Duration::from_secs(2)));
        for t in [
            Termination::Exited(0),
            Termination::Exited(143),
            Termination::Signaled(15),
            Termination::Signaled(9),
            Termination::WaitFailed("gone".into()),
        ] {
            assert_eq!(
                final_status(&t, cause),
                (
                    TaskState::TaskFailed,
                    Reason::MaxCompletionTimeReached,
                    "max completion time of 2s reached".to_string()
                ),
                "{t:?}"
            );
        }
        let half = Some(KillCause::MaxCompletionTime(Duration::from_millis(1500)));
        let (_, _, m) = final_status(&Termination::Signaled(15), half);
        assert_eq!(m, "max completion time of 1.5s reached");
    }

    #[test]
    fn a_task_killed_for_a_failed_health_check_failed_unhealthy_however_it_exits() {
        for t in [
            Termination::Exited(0),
            Termination::Exited(143),
            Termination::Signaled(15),
            Termination::Signaled(9),
            Termination::WaitFailed("gone".into()),
        ] {
            let (state, reason, _) = final_status(&t, Some(KillCause::Unhealthy));
            assert_eq!(
                (state, reason),
                (TaskState::TaskFailed, Reason::TaskUnhealthy),
                "{t:?}"
            );
        }
    }

    #[test]
    fn max_completion_times_from_the_wire_are_validated_and_capped() {
        assert_eq!(
            completion_time_from_seconds(2.5),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(completion_time_from_seconds(0.0), None);
        assert_eq!(completion_time_from_seconds(-1.0), None);
        assert_eq!(completion_time_from_seconds(f64::NAN), None);
        assert_eq!(completion_time_from_seconds(f64::INFINITY), None);
        assert_eq!(
            completion_time_from_seconds(1e300),
            Some(MAX_COMPLETION_TIME)
        );
    }

    #[test]
    fn kill_grace_periods_from_the_wire_are_validated_and_capped() {
        assert_eq!(grace_from_seconds(1.5), Some(Duration::from_millis(1500)));
        assert_eq!(grace_from_seconds(0.0), Some(Duration::ZERO));
        assert_eq!(grace_from_seconds(-1.0), None);
        assert_eq!(grace_from_seconds(f64::NAN), None);
        assert_eq!(grace_from_seconds(f64::INFINITY), None);
        assert_eq!(grace_from_seconds(1e300), Some(MAX_KILL_GRACE));
    }

    const FW: &str = "fw-1";

    /// An actor turned step by step (`Actor::step`) so tests can look at
    /// its timers between turns, registered on a fake master stream, running
    /// plain processes (`--isolation=none`). Acknowledges every update it
    /// returns, as a framework would. Dropping it kills what is left.
    struct Driven {
        actor: Actor,
        rx: mpsc::Receiver<Command>,
        to_master: mpsc::Receiver<pb::AgentMessage>,
        /// The test started on a paused clock that is not resumed yet.
        paused: bool,
        _work_dir: tempfile::TempDir,
    }

    impl Driven {
        fn new(paused: bool) -> Self {
            let work_dir = tempfile::tempdir().unwrap();
            let dir = work_dir.path().to_path_buf();
            let mut config = crate::AgentConfig::new("127.0.0.1:1".into(), dir.clone());
            config.isolation = crate::Isolation::None;
            let launcher = Launcher {
                isolation: crate::Isolation::None,
                containerizer: None,
                images: std::sync::Arc::new(
                    crate::images::ImageStore::open(dir.join("images"), Vec::new()).unwrap(),
                ),
                work_dir: dir.clone(),
                allowed_host_paths: Vec::new(),
                log: crate::logs::LogConfig::default(),
                layers_in_use: Default::default(),
                launch_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(2)),
                network: None,
                pods_unavailable: Some("test agent".into()),
            };
            let resources = Resources::parse("cpus:1;mem:64").unwrap();
            let identity = Identity {
                hostname: "test-host".into(),
                address: "127.0.0.1:1".into(),
                resources: resources.clone(),
                attributes: Vec::new(),
                work_dir: dir.clone(),
                boot_id: "test-boot".into(),
            };
            let (cmd_tx, rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
            let metrics = AgentMetrics::new(&resources);
            let (store, trash) = crate::volumes::VolumeStore::open(&dir).unwrap();
            let (volumes, _stopped) =
                Volumes::start(store, trash, metrics.volume_gauges(), tracing::Span::none())
                    .unwrap();
            let mut actor = Actor::new(
                identity,
                &config,
                metrics,
                cmd_tx,
                launcher,
                Default::default(),
                volumes,
                Checkpointer::disabled(),
            );
            let (outbound, to_master) = mpsc::channel(64);
            actor.handle(Command::Registered {
                agent_id: AgentId::parse("agent-1", "agent_id").unwrap(),
                outbound,
            });
            Self {
                actor,
                rx,
                to_master,
                paused,
                _work_dir: work_dir,
            }
        }

        fn run_shell(&mut self, task_id: &str, script: &str, max_completion: Option<f64>) {
            let task = pb::TaskInfo {
                task_id: task_id.into(),
                agent_id: "agent-1".into(),
                command: Some(pb::CommandInfo {
                    shell: true,
                    value: script.into(),
                    ..Default::default()
                }),
                kill_grace_period_seconds: Some(30.0),
                max_completion_time_seconds: max_completion,
                ..Default::default()
            };
            let framework = pb::FrameworkInfo {
                id: FW.into(),
                name: "test".into(),
                ..Default::default()
            };
            self.actor
                .handle(Command::FromMaster(Box::new(Message::RunTask(
                    pb::RunTask {
                        framework: Some(framework),
                        task: Some(task),
                    },
                ))));
        }

        fn kill(&mut self, task_id: &str, grace: Option<f64>) {
            self.actor
                .handle(Command::FromMaster(Box::new(Message::KillTask(
                    pb::KillTask {
                        framework_id: FW.into(),
                        task_id: task_id.into(),
                        kill_grace_period_seconds: grace,
                    },
                ))));
        }

        /// Turns the loop until the agent sends an update, for at most
        /// `bound` of the runtime's clock.
        async fn next_update(&mut self, bound: Duration) -> pb::TaskStatus {
            let wait = async {
                loop {
                    if let Ok(msg) = self.to_master.try_recv() {
                        if let Some(pb::agent_message::Message::StatusUpdate(u)) = msg.message {
                            return u.status.unwrap();
                        }
                        continue;
                    }
                    self.actor.step(&mut self.rx).await;
                }
            };
            let status = tokio::time::timeout(bound, wait)
                .await
                .unwrap_or_else(|_| panic!("no status update within {bound:?}"));
            self.actor
                .handle(Command::FromMaster(Box::new(Message::Acknowledgement(
                    pb::StatusAcknowledgement {
                        framework_id: status.framework_id.clone(),
                        task_id: status.task_id.clone(),
                        uuid: status.uuid.clone(),
                    },
                ))));
            status
        }

        /// The next update, on a clock that only moves when the actor
        /// waits for a timer (the paused clock's auto-advance): what comes
        /// from the process itself (its exit) needs [`Self::expect_real`].
        async fn expect(&mut self, state: TaskState) -> pb::TaskStatus {
            self.expect_within(state, Duration::from_secs(4 * 3600))
                .await
        }

        /// The next update, with the clock running: a paused clock would
        /// jump to the next timer while the runtime waits for the
        /// process's SIGCHLD, which only real time brings.
        async fn expect_real(&mut self, state: TaskState) -> pb::TaskStatus {
            if std::mem::take(&mut self.paused) {
                tokio::time::resume();
            }
            self.expect_within(state, Duration::from_secs(30)).await
        }

        async fn expect_within(&mut self, state: TaskState, bound: Duration) -> pb::TaskStatus {
            let status = self.next_update(bound).await;
            assert_eq!(status.state(), state, "{status:?}");
            status
        }

        /// Waits (bounded, in real time) until the task created `name` in
        /// its sandbox. Blocks the runtime, so no timer of the actor can
        /// fire meanwhile; the file comes from the process, not the runtime.
        fn wait_for_file(&self, task_id: &str, name: &str) {
            let key = (FW.to_string(), task_id.to_string());
            let path = self.actor.tasks[&key].sandbox.join(name);
            let start = std::time::Instant::now();
            while !path.exists() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "{} not created within 10 s",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// Every task forgotten and no timer left behind but the sandbox
        /// collector's (the finished task's sandbox waits out its delay).
        fn assert_idle(&self) {
            assert!(self.actor.tasks.is_empty(), "{:?}", self.actor.tasks.keys());
            assert_eq!(
                self.actor.next_deadline(),
                self.actor.gc.next_deadline(Instant::now())
            );
            assert_eq!(self.actor.gc.retained(), 1);
        }
    }

    /// On a paused clock an hour-long max completion time passes in no real
    /// time: the deadline is a timer of the actor's loop, not a sleep.
    #[tokio::test(start_paused = true)]
    async fn max_completion_time_kills_the_task_and_reports_it_failed() {
        let mut d = Driven::new(true);
        let launched = Instant::now();
        d.run_shell("long", "exec sleep 7200", Some(3600.0));
        d.expect(TaskState::TaskRunning).await;
        let deadline = d.actor.next_deadline().unwrap();
        assert!(deadline >= launched + Duration::from_secs(3600));
        assert!(deadline <= Instant::now() + Duration::from_secs(3600));

        let killing = d.expect(TaskState::TaskKilling).await;
        assert!(Instant::now() >= deadline, "killed before the deadline");
        assert_eq!(killing.reason(), Reason::MaxCompletionTimeReached);
        assert_eq!(killing.message, "max completion time of 3600s reached");
        // SIGTERM ends `sleep` well within its 30 s grace period.
        let failed = d.expect_real(TaskState::TaskFailed).await;
        assert_eq!(failed.reason(), Reason::MaxCompletionTimeReached);
        assert_eq!(failed.message, "max completion time of 3600s reached");
        assert_eq!(failed.signal, Some(15), "{failed:?}");
        d.assert_idle();
    }

    #[tokio::test(start_paused = true)]
    async fn a_framework_kill_during_the_max_completion_grace_keeps_the_task_failed() {
        let mut d = Driven::new(true);
        // Ignores SIGTERM (inherited through exec): only a SIGKILL ends it.
        d.run_shell(
            "stubborn",
            "trap '' TERM; touch trapped; exec sleep 7200",
            Some(60.0),
        );
        d.expect(TaskState::TaskRunning).await;
        d.wait_for_file("stubborn", "trapped");
        let killing = d.expect(TaskState::TaskKilling).await;
        assert_eq!(killing.reason(), Reason::MaxCompletionTimeReached);
        // Shortens the 30 s grace to none; the first kill's cause stays.
        d.kill("stubborn", Some(0.0));
        let failed = d.expect_real(TaskState::TaskFailed).await;
        assert_eq!(failed.reason(), Reason::MaxCompletionTimeReached);
        assert_eq!(failed.signal, Some(9), "{failed:?}");
        d.assert_idle();
    }

    #[tokio::test]
    async fn a_framework_kill_before_the_deadline_is_a_kill_and_clears_the_timer() {
        let mut d = Driven::new(false);
        d.run_shell("killed", "exec sleep 7200", Some(3600.0));
        d.expect_real(TaskState::TaskRunning).await;
        d.kill("killed", None);
        let killing = d.expect_real(TaskState::TaskKilling).await;
        assert_eq!(killing.reason(), Reason::Unspecified);
        assert!(
            d.actor
                .tasks
                .values()
                .all(|t| t.completion_deadline.is_none())
        );
        let killed = d.expect_real(TaskState::TaskKilled).await;
        assert_eq!(killed.reason(), Reason::Unspecified);
        d.assert_idle();
    }

    /// Real time: on a paused clock the runtime would jump to the deadline
    /// while it waits for the process's exit.
    #[tokio::test]
    async fn a_task_that_ends_before_its_max_completion_time_finishes_and_leaves_no_timer() {
        let mut d = Driven::new(false);
        d.run_shell("quick", "exit 0", Some(3600.0));
        d.expect_real(TaskState::TaskRunning).await;
        assert!(
            d.actor.next_deadline().is_some(),
            "the deadline is armed while the task runs"
        );
        let finished = d.expect_real(TaskState::TaskFinished).await;
        assert_eq!(finished.reason(), Reason::Unspecified);
        assert_eq!(finished.exit_code, Some(0));
        d.assert_idle();
    }
}
