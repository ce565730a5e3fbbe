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
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::AgentError;
use crate::metrics::AgentMetrics;
use crate::state::{StateView, TaskView};
use crate::status_updates::{AckOutcome, StatusUpdateManager, StreamKey, new_update};
use crate::task::{self, LaunchSpec, Termination, sandbox_path, signal_group, signal_name};

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
    /// A task's main process ended (sent by its waiter).
    Exited {
        key: StreamKey,
        pid: u32,
        termination: Termination,
    },
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
    /// The process group of the running command; `None` once it exited.
    pid: Option<u32>,
    sandbox: PathBuf,
    exit_code: Option<i32>,
    signal: Option<i32>,
    kill: Option<KillTimer>,
    /// The agent signalled the task (kill or shutdown): its end is
    /// TASK_KILLED, not TASK_FAILED.
    killed_by_agent: bool,
    done: watch::Sender<bool>,
    /// Aborting the waiter SIGKILLs the group (see `task::wait`), so dropping
    /// the actor cannot leave processes behind.
    _waiter: Option<AbortOnDrop>,
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
    /// Handed to waiters so they can report exits.
    cmd_tx: mpsc::Sender<Command>,
    stopping: Option<Stop>,
}

/// The status a task's end maps to: `(state, reason, message)`.
pub(crate) fn final_status(
    termination: &Termination,
    killed_by_agent: bool,
) -> (TaskState, Reason, String) {
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
        if self.tasks.values().any(|t| t.pid.is_some()) {
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
            Command::Exited {
                key,
                pid,
                termination,
            } => self.exited(key, pid, termination),
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
            sandbox,
            exit_code: None,
            signal: None,
            kill: None,
            killed_by_agent: false,
            done,
            _waiter: None,
        };
        let agent_id = self
            .agent_id
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let launched = match task.info.command.as_ref().filter(|c| !c.value.is_empty()) {
            None => Err((
                TaskState::TaskError,
                Reason::TaskInvalid,
                "task has no command".to_string(),
            )),
            Some(command) => task::launch(&LaunchSpec {
                sandbox: &task.sandbox,
                framework_id: &framework_id,
                task_id: &task_id,
                agent_id: &agent_id,
                command,
            })
            .map_err(|e| {
                (
                    TaskState::TaskFailed,
                    Reason::ContainerLaunchFailed,
                    e.to_string(),
                )
            })
            .and_then(|child| match child.id() {
                Some(pid) => Ok((child, pid)),
                None => Err((
                    TaskState::TaskFailed,
                    Reason::ContainerLaunchFailed,
                    "the command exited before its pid was known".to_string(),
                )),
            }),
        };
        match launched {
            Ok((child, pid)) => {
                let tx = self.cmd_tx.clone();
                let waiter_key = key.clone();
                let handle = tokio::spawn(async move {
                    let termination = task::wait(child, pid).await;
                    // The actor is gone only when the agent is stopping.
                    let _ = tx
                        .send(Command::Exited {
                            key: waiter_key,
                            pid,
                            termination,
                        })
                        .await;
                });
                task._waiter = Some(AbortOnDrop(handle.abort_handle()));
                task.pid = Some(pid);
                task.state = TaskState::TaskRunning;
                let started_at = now_seconds();
                info!(framework_id = %framework_id, task_id = %task_id, pid,
                      sandbox = %task.sandbox.display(), "task started");
                let mut st = status(
                    task_id.as_str(),
                    TaskState::TaskRunning,
                    Reason::Unspecified,
                    String::new(),
                );
                st.started_at = Some(started_at);
                self.tasks.insert(key, task);
                self.emit(framework_id.as_str(), st);
            }
            Err((state, reason, message)) => {
                warn!(framework_id = %framework_id, task_id = %task_id, error = %message,
                      "task launch failed");
                task.state = state;
                task.done.send_replace(true);
                self.tasks.insert(key, task);
                self.emit(
                    framework_id.as_str(),
                    status(task_id.as_str(), state, reason, message),
                );
            }
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
        let Some(pid) = task.pid else {
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
        if let Err(e) = signal_group(pid, Signal::SIGTERM) {
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
            let Some(pid) = task.pid else { continue };
            task.killed_by_agent = true;
            task.kill = Some(KillTimer {
                sigkill_at: Instant::now(),
                sigkill_sent: true,
            });
            if let Err(e) = signal_group(pid, Signal::SIGKILL) {
                warn!(task_id = %task.task_id, pid, error = %e, "cannot send SIGKILL");
            }
        }
    }

    fn exited(&mut self, key: StreamKey, pid: u32, termination: Termination) {
        let Some(task) = self.tasks.get_mut(&key) else {
            warn!(framework_id = %key.0, task_id = %key.1, "exit of an unknown task");
            return;
        };
        if task.pid != Some(pid) {
            warn!(framework_id = %key.0, task_id = %key.1, pid, "exit of a stale process");
            return;
        }
        let (state, reason, message) = final_status(&termination, task.killed_by_agent);
        task.pid = None;
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
        kills.chain(retry).min()
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        for task in self.tasks.values_mut() {
            let (Some(pid), Some(timer)) = (task.pid, task.kill.as_mut()) else {
                continue;
            };
            if timer.sigkill_sent || timer.sigkill_at > now {
                continue;
            }
            timer.sigkill_sent = true;
            info!(task_id = %task.task_id, pid, "grace period over; sending SIGKILL");
            if let Err(e) = signal_group(pid, Signal::SIGKILL) {
                warn!(task_id = %task.task_id, pid, error = %e, "cannot send SIGKILL");
            }
        }
        self.flush_updates();
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
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
