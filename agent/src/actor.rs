//! The agent actor: one tokio task owns all agent state (tasks, the status
//! update manager, the master stream's sender) and changes it only in
//! response to [`Command`]s. The master link, the API handlers and the
//! per-task waiters only send commands; timers (status update retries,
//! SIGKILL after the grace period) are deadlines of the actor's own loop.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use corral_proto::pb::{self, Reason, TaskState};
use corral_proto::task::{is_terminal, now_seconds, state_name};
use corral_proto::{AgentId, FrameworkId, Resources, TaskId};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::containerizer::{Container, Usage};
use crate::error::AgentError;
use crate::launch::{Ended, LaunchRequest, Launcher, Running};
use crate::metrics::AgentMetrics;
use crate::state::{StateView, TaskView, UsageView};
pub(crate) use crate::status_updates::StreamKey;
use crate::status_updates::{AckOutcome, StatusUpdateManager, new_update};
use crate::task::{Termination, sandbox_path, signal_name};

/// Room for bursts of launches, exits and API calls; senders wait (never
/// the actor) when it is full.
pub(crate) const COMMAND_CHANNEL_CAPACITY: usize = 1024;

/// Longest kill grace period honoured; also keeps `Instant + grace` from
/// overflowing on absurd values.
const MAX_KILL_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

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
    Started { key: StreamKey, running: Running },
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
    /// `GET /state`.
    State { reply: oneshot::Sender<StateView> },
    /// `ReadFile`: where the task's files are and whether it is done.
    FileTarget {
        framework_id: FrameworkId,
        task_id: TaskId,
        reply: oneshot::Sender<Option<FileTarget>>,
    },
    /// `run`'s shutdown future resolved: kill everything and stop.
    Shutdown,
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
}

/// Aborts a spawned tokio task when dropped.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    /// The agent signalled the task (kill or shutdown): its end is
    /// TASK_KILLED, not TASK_FAILED.
    killed_by_agent: bool,
    done: watch::Sender<bool>,
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
    /// Latest container usage, by task: read by `/metrics` and `/state`.
    usage: std::sync::Arc<dashmap::DashMap<StreamKey, Usage>>,
}

/// The status a task's end maps to: `(state, reason, message)`; the
/// container's OOM kill takes precedence: the
/// kernel killed it for going over its memory limit (Mesos
/// `REASON_CONTAINER_LIMITATION_MEMORY`).
pub(crate) fn final_status_of(ended: &Ended, killed_by_agent: bool) -> (TaskState, Reason, String) {
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
    pub(crate) fn new(
        identity: Identity,
        config: &crate::AgentConfig,
        metrics: AgentMetrics,
        cmd_tx: mpsc::Sender<Command>,
        launcher: Launcher,
        usage: std::sync::Arc<dashmap::DashMap<StreamKey, Usage>>,
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
            usage,
        }
    }

    /// Runs until a shutdown (ours or the master's) has killed every task.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), AgentError> {
        loop {
            if let Some(result) = self.finished() {
                return result;
            }
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
    }

    fn finished(&mut self) -> Option<Result<(), AgentError>> {
        let stop = self.stopping.as_ref()?;
        if self.tasks.values().any(|t| t.pid.is_some() || t.launching) {
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
                let _ = reply.send(self.register_message());
            }
            Command::Registered { agent_id, outbound } => self.registered(agent_id, outbound),
            Command::Disconnected => {
                if self.outbound.take().is_some() {
                    info!("disconnected from the master");
                }
            }
            Command::FromMaster(msg) => self.handle_master_message(*msg),
            Command::Started { key, running } => self.started(key, running),
            Command::LaunchFailed { key, message } => self.launch_failed(key, message),
            Command::Exited { key, pid, ended } => self.exited(key, pid, ended),
            Command::UsageSampled(samples) => self.usage_sampled(samples),
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
            Command::Shutdown => self.begin_stop(Stop::Requested),
        }
    }

    fn handle_master_message(&mut self, msg: pb::master_message::Message) {
        use pb::master_message::Message;
        match msg {
            Message::RunTask(run) => self.run_task(run),
            Message::KillTask(kill) => self.kill_task(kill),
            Message::Acknowledgement(ack) => self.acknowledge(ack),
            Message::ShutdownFramework(s) => self.shutdown_framework(&s.framework_id),
            Message::Shutdown(s) => {
                warn!(message = %s.message, "the master removed this agent; killing all tasks");
                self.begin_stop(Stop::RemovedByMaster(s.message));
            }
            // The master link consumes these itself.
            Message::Registered(_) | Message::Heartbeat(_) => {}
        }
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

        let sandbox = sandbox_path(&self.identity.work_dir, &framework_id, &task_id);
        let (done, _) = watch::channel(false);
        let mut task = Task {
            framework_id: framework_id.clone(),
            task_id: task_id.clone(),
            info,
            state: TaskState::TaskStaging,
            pid: None,
            running: None,
            launching: false,
            pending_kill: None,
            _launcher: None,
            sandbox,
            exit_code: None,
            signal: None,
            kill: None,
            killed_by_agent: false,
            done,
        };
        let agent_id = self
            .agent_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        task.launching = true;
        let request = LaunchRequest {
            key: key.clone(),
            framework_id: framework_id.clone(),
            task_id: task_id.clone(),
            agent_id,
            info: task.info.clone(),
            sandbox: task.sandbox.clone(),
        };
        // The launch (image pull, sandbox, container) and the wait run in
        // their own task; it reports Started, then Exited.
        let handle = tokio::spawn(self.launcher.clone().run(request, self.cmd_tx.clone()));
        task._launcher = Some(AbortOnDrop(handle.abort_handle()));
        self.tasks.insert(key, task);
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
        task.running = Some(running);
        task.state = TaskState::TaskRunning;
        info!(framework_id = %task.framework_id, task_id = %task.task_id, pid = ?task.pid,
              sandbox = %task.sandbox.display(), "task started");
        let mut st = status(
            task.task_id.as_str(),
            TaskState::TaskRunning,
            Reason::Unspecified,
            String::new(),
        );
        st.started_at = Some(now_seconds());
        let pending_kill = task.pending_kill.take();
        self.emit(&key.0, st);
        if stopping {
            if let Some(task) = self.tasks.get_mut(&key) {
                hard_kill(task);
            }
        } else if let Some(grace) = pending_kill {
            self.start_kill(&key, grace);
        }
    }

    fn launch_failed(&mut self, key: StreamKey, message: String) {
        let Some(task) = self.tasks.get_mut(&key) else {
            return;
        };
        warn!(framework_id = %key.0, task_id = %key.1, error = %message, "task launch failed");
        task.launching = false;
        task.state = TaskState::TaskFailed;
        task.done.send_replace(true);
        let st = status(
            &key.1,
            TaskState::TaskFailed,
            Reason::ContainerLaunchFailed,
            message,
        );
        self.emit(&key.0, st);
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
            Some(_) if self.tasks.get(&key).is_some_and(|t| t.launching) => {
                // Killed once it has started (or reported failed if it never does).
                if let Some(t) = self.tasks.get_mut(&key) {
                    t.pending_kill = Some(kill.kill_grace_period_seconds);
                }
            }
            Some(_) => self.start_kill(&key, kill.kill_grace_period_seconds),
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
            self.start_kill(&key, None);
        }
    }

    /// SIGTERM now, SIGKILL after the grace period (the kill's, else the
    /// task's, else the agent default). A second kill can only shorten it.
    fn start_kill(&mut self, key: &StreamKey, grace_override: Option<f64>) {
        let default = self.default_kill_grace;
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
        task.killed_by_agent = true;
        task.kill = Some(KillTimer {
            sigkill_at,
            sigkill_sent: false,
        });
        info!(framework_id = %task.framework_id, task_id = %task.task_id, pid,
              grace_ms = grace.as_millis() as u64, "killing task");
        if let Err(e) = running.terminate() {
            warn!(task_id = %task.task_id, pid, error = %e, "cannot send SIGTERM");
        }
        let st = status(
            task.task_id.as_str(),
            TaskState::TaskKilling,
            Reason::Unspecified,
            String::new(),
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
    }

    fn exited(&mut self, key: StreamKey, pid: u32, ended: Ended) {
        let Some(task) = self.tasks.get_mut(&key) else {
            warn!(framework_id = %key.0, task_id = %key.1, "exit of an unknown task");
            return;
        };
        if task.pid != Some(pid) {
            warn!(framework_id = %key.0, task_id = %key.1, pid, "exit of a stale process");
            return;
        }
        let (state, reason, message) = final_status_of(&ended, task.killed_by_agent);
        let termination = ended.termination;
        task.pid = None;
        task.running = None;
        self.usage.remove(&key);
        task.kill = None;
        task.state = state;
        let (exit_code, signal) = match termination {
            Termination::Exited(code) => (Some(code), None),
            Termination::Signaled(sig) => (None, Some(sig)),
            Termination::WaitFailed(_) => (None, None),
        };
        task.exit_code = exit_code;
        task.signal = signal;
        task.done.send_replace(true);
        info!(framework_id = %key.0, task_id = %key.1, state = state_name(state),
              message = %message, "task ended");
        let mut st = status(&key.1, state, reason, message);
        st.exit_code = exit_code;
        st.signal = signal;
        self.emit(&key.0, st);
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
                    self.tasks.remove(&key);
                    if !self.tasks.keys().any(|k| k.0 == key.0) {
                        self.frameworks.remove(&key.0);
                    }
                    info!(framework_id = %key.0, task_id = %key.1,
                          "terminal update acknowledged; task forgotten");
                }
                self.flush_updates();
            }
        }
    }

    /// Queues an agent-generated update and sends what is due.
    fn emit(&mut self, framework_id: &str, status: pb::TaskStatus) {
        let agent_id = self
            .agent_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let update = new_update(&agent_id, framework_id, status, now_seconds());
        self.updates.push(update);
        self.flush_updates();
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
        kills.chain(retry).chain(usage).min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
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
        if let Some(outbound) = &self.outbound {
            let msg = pb::AgentMessage {
                message: Some(pb::agent_message::Message::Usage(pb::UsageReport {
                    containers: report,
                })),
            };
            // Usage is a best-effort view: a full stream skips one report.
            let _ = outbound.try_send(msg);
        }
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
                })
                .collect(),
        }
    }
}

/// SIGKILL now (agent stopping): everything the task started; a task still
/// launching is killed as soon as it starts.
fn hard_kill(task: &mut Task) {
    task.killed_by_agent = true;
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

    fn final_status(
        termination: &Termination,
        killed_by_agent: bool,
    ) -> (TaskState, Reason, String) {
        final_status_of(
            &Ended {
                termination: termination.clone(),
                oom_limit: None,
            },
            killed_by_agent,
        )
    }

    #[test]
    fn an_oom_kill_is_a_memory_limitation_with_the_limit() {
        let ended = Ended {
            termination: Termination::Signaled(9),
            oom_limit: Some(64 * 1024 * 1024),
        };
        let (s, r, m) = final_status_of(&ended, false);
        assert_eq!(
            (s, r),
            (TaskState::TaskFailed, Reason::ContainerLimitationMemory)
        );
        assert!(m.contains("64 MiB"), "{m}");
    }

    #[test]
    fn exit_codes_and_signals_map_to_task_states() {
        let (s, r, m) = final_status(&Termination::Exited(0), false);
        assert_eq!((s, r), (TaskState::TaskFinished, Reason::Unspecified));
        assert_eq!(m, "command exited with status 0");
        let (s, r, m) = final_status(&Termination::Exited(3), false);
        assert_eq!((s, r), (TaskState::TaskFailed, Reason::CommandFailed));
        assert_eq!(m, "command exited with status 3");
        let (s, r, m) = final_status(&Termination::Signaled(11), false);
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
            assert_eq!(final_status(&t, true).0, TaskState::TaskKilled, "{t:?}");
        }
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
}
