//! The master actor: one tokio task owns every agent, framework, offer and
//! task record and the allocator. The gRPC and HTTP layers send it
//! [`Command`]s and await the reply; nothing else touches this state, so
//! there are no locks to reason about.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use corral_allocator::Allocator;
use corral_proto::task::{is_terminal, now_seconds, reason_name, state_name};
use corral_proto::{AgentId, FrameworkId, OfferId, Resources, TaskId, VolumeId, pb};
use pb::{Reason, Source, TaskState};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::config::{AGENT_MESSAGE_BUFFER, FRAMEWORK_EVENT_BUFFER, MasterConfig};
use crate::metrics::Metrics;
use crate::registry::{
    AgentPhase, AgentRecord, Change, FrameworkRecord, Registry, RegistryError, RegistryWriter,
    Stored, TaskRecord, VolumeRecord,
};
use crate::state::{self, ResourcesJson, StateSnapshot};
use crate::validation::{self, FieldError};
use crate::volumes::{self, Volume, VolumeKey, Volumes};

pub(crate) type AgentTx = mpsc::Sender<Result<pb::MasterMessage, Status>>;
pub(crate) type EventTx = mpsc::Sender<Result<pb::Event, Status>>;
pub(crate) type EventRx = mpsc::Receiver<Result<pb::Event, Status>>;

/// What SUBSCRIBE hands the gRPC layer: the event stream and who it is for.
pub(crate) struct Subscription {
    pub(crate) events: EventRx,
    pub(crate) framework_id: FrameworkId,
    pub(crate) stream_id: String,
}
type Reply<T> = oneshot::Sender<Result<T, Status>>;
type TaskKey = (FrameworkId, TaskId);

/// Commands are processed in batches of at most this many before an
/// event-triggered allocation runs, so a burst of declines or task ends
/// costs one allocation round, not one per message (Mesos batches the same way).
const MAX_BATCH: usize = 256;

pub(crate) enum Command {
    AgentRegister {
        register: pb::Register,
        tx: AgentTx,
        reply: Reply<(AgentId, u64)>,
    },
    AgentMessage {
        agent_id: AgentId,
        conn: u64,
        message: pb::agent_message::Message,
    },
    AgentDisconnected {
        agent_id: AgentId,
        conn: u64,
    },
    Subscribe {
        request: pb::SubscribeRequest,
        reply: Reply<Subscription>,
    },
    FrameworkDisconnected {
        framework_id: FrameworkId,
        stream_id: String,
    },
    Call {
        call: Call,
        reply: Reply<()>,
    },
    Snapshot {
        reply: oneshot::Sender<StateSnapshot>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

pub(crate) enum Call {
    Accept(pb::AcceptRequest),
    Decline(pb::DeclineRequest),
    Revive(pb::ReviveRequest),
    Suppress(pb::SuppressRequest),
    Kill(pb::KillRequest),
    Acknowledge(pb::AcknowledgeRequest),
    Reconcile(pb::ReconcileRequest),
    Teardown(pb::TeardownRequest),
    DestroyVolume(pb::DestroyVolumeRequest),
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::Accept(_) => "accept",
            Call::Decline(_) => "decline",
            Call::Revive(_) => "revive",
            Call::Suppress(_) => "suppress",
            Call::Kill(_) => "kill",
            Call::Acknowledge(_) => "acknowledge",
            Call::Reconcile(_) => "reconcile",
            Call::Teardown(_) => "teardown",
            Call::DestroyVolume(_) => "destroy_volume",
        }
    }

    fn header(&self) -> Option<&pb::CallHeader> {
        match self {
            Call::Accept(r) => r.header.as_ref(),
            Call::Decline(r) => r.header.as_ref(),
            Call::Revive(r) => r.header.as_ref(),
            Call::Suppress(r) => r.header.as_ref(),
            Call::Kill(r) => r.header.as_ref(),
            Call::Acknowledge(r) => r.header.as_ref(),
            Call::Reconcile(r) => r.header.as_ref(),
            Call::Teardown(r) => r.header.as_ref(),
            Call::DestroyVolume(r) => r.header.as_ref(),
        }
    }
}

/// The one place the master turns a field error into a gRPC status.
fn invalid(e: FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

struct AgentConn {
    id: u64,
    tx: AgentTx,
}

struct Agent {
    id: AgentId,
    info: pb::AgentInfo,
    total: Resources,
    /// `None` while the agent is disconnected, unreachable or recovering.
    conn: Option<AgentConn>,
    last_seen: Instant,
    registered_at: f64,
    tasks: HashSet<TaskKey>,
    /// Kills asked for and not done yet (the task has not ended), sent
    /// again each time the agent registers: one asked for while it was
    /// away, or in flight on a stream that broke, is not lost.
    pending_kills: HashMap<TaskKey, Option<f64>>,
    /// Volumes destroyed while the agent was unreachable: destroyed there
    /// when it returns, never adopted back.
    pending_destroys: HashSet<VolumeKey>,
    /// When it became unreachable (monotonic, and Unix seconds for the
    /// registry); `None` while connected or recovering.
    unreachable_since: Option<(Instant, f64)>,
    /// Known from the registry after a master restart and not back yet.
    recovering: bool,
}

impl Agent {
    fn state_name(&self) -> &'static str {
        if self.conn.is_some() {
            "connected"
        } else if self.recovering {
            "recovering"
        } else if self.unreachable_since.is_some() {
            "unreachable"
        } else {
            "disconnected"
        }
    }
}

struct FrameworkConn {
    stream_id: String,
    tx: EventTx,
}

struct Framework {
    id: FrameworkId,
    info: pb::FrameworkInfo,
    role: String,
    failover_timeout: Duration,
    conn: Option<FrameworkConn>,
    disconnected_at: Option<Instant>,
    /// `disconnected_at` in Unix seconds: what the registry keeps, so the
    /// failover timeout keeps running across a master restart.
    disconnected_wall: Option<f64>,
    suppressed: bool,
    registered_at: f64,
    tasks: HashSet<TaskId>,
    offers: HashSet<OfferId>,
}

struct Offer {
    framework_id: FrameworkId,
    agent_id: AgentId,
    resources: Resources,
    created: Instant,
}

struct Task {
    agent_id: AgentId,
    info: pb::TaskInfo,
    resources: Resources,
    status: pb::TaskStatus,
    /// uuid of the terminal agent update; its acknowledgement retires the task.
    terminal_uuid: Option<Vec<u8>>,
    /// The agent said the task ended (`TaskEnded`, or a final state in its
    /// report) before its final update arrived: its resources are already
    /// back in the allocator.
    released: bool,
    /// Latest container usage the agent reported.
    usage: Option<pb::ContainerUsage>,
}

/// One LAUNCH's task or one LAUNCH_GROUP's pod, in call order.
// Lives for one accept call only: boxing would cost an allocation per task.
#[allow(clippy::large_enum_variant)]
enum Launching {
    Task(pb::TaskInfo),
    Group(pb::TaskGroupInfo),
}

impl Launching {
    fn tasks(&self) -> &[pb::TaskInfo] {
        match self {
            Launching::Task(t) => std::slice::from_ref(t),
            Launching::Group(g) => &g.tasks,
        }
    }
}

impl Task {
    fn state(&self) -> TaskState {
        self.status.state()
    }

    /// Whether the allocator counts the task's resources as used.
    fn holds_resources(&self) -> bool {
        !is_terminal(self.state()) && !self.released
    }
}

/// Cheap handle for the gRPC/HTTP layers.
#[derive(Clone)]
pub(crate) struct MasterHandle {
    tx: mpsc::Sender<Command>,
}

impl MasterHandle {
    /// Sends a command built around a reply channel and awaits the answer.
    pub(crate) async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| Status::unavailable("master is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("master is shutting down"))
    }

    pub(crate) async fn send(&self, command: Command) {
        // A closed channel means the master is stopping; nothing to tell.
        let _ = self.tx.send(command).await;
    }

    /// For `Drop` impls, which cannot await: queue if there is room,
    /// otherwise hand the send to a task.
    pub(crate) fn send_from_drop(&self, command: Command) {
        if let Err(mpsc::error::TrySendError::Full(command)) = self.tx.try_send(command) {
            let handle = self.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { handle.send(command).await });
            }
        }
    }
}

pub(crate) struct Master {
    config: MasterConfig,
    start: Instant,
    allocator: Allocator,
    agents: HashMap<AgentId, Agent>,
    frameworks: HashMap<FrameworkId, Framework>,
    /// Torn down or timed out; a SUBSCRIBE with one of these ids is refused.
    removed_frameworks: HashSet<FrameworkId>,
    tasks: HashMap<TaskKey, Task>,
    volumes: Volumes,
    completed: VecDeque<state::TaskState>,
    offers: HashMap<OfferId, Offer>,
    metrics: Arc<Metrics>,
    next_conn: u64,
    allocation_pending: bool,
    /// Frameworks whose stream broke while sending; handled after the command.
    broken_streams: Vec<(FrameworkId, String)>,
    /// Removed agents and when: never admitted again under their id.
    gone_agents: HashMap<AgentId, f64>,
    /// Commits what changed; `None` without a work dir.
    registry: Option<RegistryWriter>,
    /// What changed since the last flush to the registry.
    dirty: Dirty,
    /// After a restart: when agents that have not re-registered become
    /// unreachable.
    recovery_deadline: Option<Instant>,
    /// The earliest time the next unreachable agent may be removed.
    next_removal: Instant,
    /// More than `max_unreachable_percent` of agents are unreachable.
    removal_halted: bool,
    /// Stale records recovery found, deleted by the first commit.
    pending_deletes: Vec<Change>,
}

/// Records to write at the end of the current batch. Sets, so a task that
/// changes ten times in one batch is written once, with its latest state.
#[derive(Default)]
struct Dirty {
    agents: HashSet<AgentId>,
    frameworks: HashSet<FrameworkId>,
    removed_frameworks: Vec<(FrameworkId, f64)>,
    tasks: HashSet<TaskKey>,
    volumes: HashSet<VolumeKey>,
}

impl Dirty {
    fn is_empty(&self) -> bool {
        self.agents.is_empty()
            && self.frameworks.is_empty()
            && self.removed_frameworks.is_empty()
            && self.tasks.is_empty()
            && self.volumes.is_empty()
    }
}

/// Starts the actor, recovering from `registry` (the backend and what it
/// holds) when there is one; returns the handle the servers use and the
/// actor's task, which ends on shutdown or when the registry fails.
pub(crate) fn spawn(
    config: MasterConfig,
    metrics: Arc<Metrics>,
    registry: Option<(Box<dyn Registry>, Stored)>,
) -> Result<
    (
        MasterHandle,
        tokio::task::JoinHandle<Result<(), RegistryError>>,
    ),
    RegistryError,
> {
    let (tx, rx) = mpsc::channel(4096);
    let handle = MasterHandle { tx };
    let mut allocator = Allocator::new();
    for (role, weight) in &config.weights {
        allocator.set_weight(role, *weight);
    }
    let master = Master {
        config,
        start: Instant::now(),
        allocator,
        agents: HashMap::new(),
        frameworks: HashMap::new(),
        removed_frameworks: HashSet::new(),
        tasks: HashMap::new(),
        volumes: Volumes::default(),
        completed: VecDeque::new(),
        offers: HashMap::new(),
        metrics,
        next_conn: 0,
        allocation_pending: false,
        broken_streams: Vec::new(),
        gone_agents: HashMap::new(),
        registry: None,
        dirty: Dirty::default(),
        recovery_deadline: None,
        next_removal: Instant::now(),
        removal_halted: false,
        pending_deletes: Vec::new(),
    };
    let mut master = master;
    let (failed_tx, failed_rx) = oneshot::channel();
    if let Some((backend, stored)) = registry {
        master.recover(stored)?;
        let m = master.metrics.clone();
        let writer = RegistryWriter::start(backend, failed_tx, move |n, secs| {
            m.registry_commit(n, secs);
        })
        .map_err(|e| RegistryError::Invalid {
            key: "-".into(),
            message: format!("cannot start the registry writer thread: {e}"),
        })?;
        master.registry = Some(writer);
    }
    let task = tokio::spawn(master.run(rx, failed_rx));
    Ok((handle, task))
}

impl Master {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut failed: oneshot::Receiver<RegistryError>,
    ) -> Result<(), RegistryError> {
        let mut watch_registry = self.registry.is_some();
        let mut allocation = tokio::time::interval(self.config.allocation_interval);
        let mut agent_tick = tokio::time::interval(self.config.agent_heartbeat_interval);
        let mut framework_tick = tokio::time::interval(self.config.framework_heartbeat_interval);
        for t in [&mut allocation, &mut agent_tick, &mut framework_tick] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let result = loop {
            tokio::select! {
                command = rx.recv() => {
                    let Some(command) = command else { break Ok(()) };
                    if self.handle_command(command) {
                        break Ok(());
                    }
                    // Drain what is already queued before allocating.
                    let mut stop = false;
                    for _ in 0..MAX_BATCH {
                        match rx.try_recv() {
                            Ok(c) => if self.handle_command(c) { stop = true; break; },
                            Err(_) => break,
                        }
                    }
                    if stop {
                        break Ok(());
                    }
                    if self.allocation_pending {
                        self.allocate();
                    }
                }
                _ = allocation.tick() => self.allocate(),
                _ = agent_tick.tick() => self.agent_tick(),
                _ = framework_tick.tick() => self.framework_tick(),
                e = &mut failed, if watch_registry => {
                    match e {
                        // Acting on state that is not persisted would make
                        // the next restart forget it: stop, as Mesos does.
                        Ok(e) => break Err(e),
                        Err(_) => watch_registry = false,
                    }
                }
            }
            // One commit per batch of commands or timer tick.
            self.flush_registry();
        };
        self.flush_registry();
        for a in self.agents.values_mut() {
            a.conn = None;
        }
        for f in self.frameworks.values_mut() {
            f.conn = None;
        }
        if let Some(writer) = self.registry.take() {
            // Waits for the last commit, so the store is closed (and a new
            // master may open it) once this task has ended.
            let _ = tokio::task::spawn_blocking(move || writer.finish()).await;
        }
        match &result {
            Ok(()) => info!("master actor stopped"),
            Err(e) => tracing::error!("master actor stopped: {e}"),
        }
        result
    }

    // -------------------------------------------------------------- registry

    /// Rebuilds agents, frameworks, tasks and volumes from the registry after
    /// a restart. Agents that were admitted are *recovering* until they
    /// re-register or `agent_reregister_timeout` passes; frameworks are
    /// disconnected, their failover timeout running from when they
    /// disconnected (or from now, if they were connected when the master
    /// stopped).
    fn recover(&mut self, stored: Stored) -> Result<(), RegistryError> {
        let invalid = |key: String, e: &dyn std::fmt::Display| RegistryError::Invalid {
            key,
            message: e.to_string(),
        };
        let now = Instant::now();
        let wall = now_seconds();
        let ago = |t: f64| -> Instant {
            let elapsed = Duration::try_from_secs_f64((wall - t).max(0.0)).unwrap_or_default();
            now.checked_sub(elapsed).unwrap_or(now)
        };
        let mut deletes = Vec::new();
        // When they were removed is kept for operators; the master only
        // needs the ids.
        for (id, _removed_at) in stored.removed_frameworks {
            let key = format!("removed_frameworks/{id}");
            let fid = FrameworkId::parse(&id, "id").map_err(|e| invalid(key, &e))?;
            self.removed_frameworks.insert(fid);
        }
        let mut recovering = 0usize;
        for (id, record) in stored.agents {
            let key = format!("agents/{id}");
            let aid = AgentId::parse(&id, "id").map_err(|e| invalid(key.clone(), &e))?;
            let phase = record.phase().ok_or_else(|| {
                invalid(
                    key.clone(),
                    &format!("unknown agent phase {}", record.phase),
                )
            })?;
            if phase == AgentPhase::Gone {
                self.gone_agents.insert(aid, record.since);
                continue;
            }
            let info = record.info.clone().unwrap_or_default();
            let valid = validation::agent_info(&info).map_err(|e| invalid(key, &e))?;
            let unreachable_since =
                (phase == AgentPhase::Unreachable).then(|| (ago(record.since), record.since));
            let is_recovering = phase == AgentPhase::Admitted;
            recovering += usize::from(is_recovering);
            let mut info = valid.info;
            info.id = aid.to_string();
            self.agents.insert(
                aid.clone(),
                Agent {
                    id: aid,
                    info,
                    total: valid.total,
                    conn: None,
                    last_seen: now,
                    registered_at: record.registered_at,
                    tasks: HashSet::new(),
                    pending_kills: HashMap::new(),
                    pending_destroys: HashSet::new(),
                    unreachable_since,
                    recovering: is_recovering,
                },
            );
        }
        for (id, record) in stored.frameworks {
            let key = format!("frameworks/{id}");
            let fid = FrameworkId::parse(&id, "id").map_err(|e| invalid(key.clone(), &e))?;
            if self.removed_frameworks.contains(&fid) {
                deletes.push(Change::Framework(id, None));
                continue;
            }
            let info = record.info.clone().unwrap_or_default();
            let v = validation::framework_info(&info).map_err(|e| invalid(key, &e))?;
            self.add_framework_record(fid.clone(), v, None);
            if let Some(fw) = self.frameworks.get_mut(&fid) {
                let since = record.disconnected_at.unwrap_or(wall);
                fw.disconnected_at = Some(ago(since));
                fw.disconnected_wall = Some(since);
                fw.registered_at = record.registered_at;
            }
        }
        for ((f, t), record) in stored.tasks {
            let key = format!("tasks/{f}/{t}");
            let fid =
                FrameworkId::parse(&f, "framework_id").map_err(|e| invalid(key.clone(), &e))?;
            let tid = TaskId::parse(&t, "task_id").map_err(|e| invalid(key.clone(), &e))?;
            let aid = AgentId::parse(&record.agent_id, "agent_id")
                .map_err(|e| invalid(key.clone(), &e))?;
            if self.removed_frameworks.contains(&fid) || !self.agents.contains_key(&aid) {
                // Its framework or agent was removed after it was written.
                deletes.push(Change::Task((f, t), None));
                continue;
            }
            let info = record.info.unwrap_or_default();
            let status = record.status.unwrap_or_default();
            let resources = Resources::from_proto(&info.resources, "task.resources")
                .map_err(|e| invalid(key.clone(), &e))?;
            if !self.frameworks.contains_key(&fid) {
                self.add_recovered_framework(&fid);
            }
            let terminal = is_terminal(status.state());
            let uuid = status.uuid.clone();
            let task_key = (fid, tid);
            self.insert_task(task_key.clone(), aid, info, resources, status);
            if terminal && let Some(task) = self.tasks.get_mut(&task_key) {
                // Its final update was not acknowledged yet: the agent
                // resends it, and that acknowledgement retires the task.
                task.released = true;
                task.terminal_uuid = (!uuid.is_empty()).then_some(uuid);
            }
        }
        for ((f, v), record) in stored.volumes {
            let key = format!("volumes/{f}/{v}");
            let fid =
                FrameworkId::parse(&f, "framework_id").map_err(|e| invalid(key.clone(), &e))?;
            let aid = AgentId::parse(&record.agent_id, "agent_id")
                .map_err(|e| invalid(key.clone(), &e))?;
            let op = pb::CreateVolume {
                volume_id: v.clone(),
                disk_mib: record.disk_mib,
            };
            let create = volumes::create(&op, "volume").map_err(|e| invalid(key.clone(), &e))?;
            if self.removed_frameworks.contains(&fid) || !self.agents.contains_key(&aid) {
                deletes.push(Change::Volume((f, v), None));
                continue;
            }
            self.volumes
                .insert((fid, create.id), Volume::new(aid, create.disk));
        }
        // What recovery itself marked is already stored.
        self.dirty = Dirty::default();
        // Sent with the first flush, once the writer runs.
        self.pending_deletes = deletes;
        if recovering > 0 {
            self.recovery_deadline = Some(now + self.config.agent_reregister_timeout);
        }
        info!(
            agents = self.agents.len(),
            recovering,
            gone = self.gone_agents.len(),
            frameworks = self.frameworks.len(),
            tasks = self.tasks.len(),
            volumes = self.volumes.sorted().len(),
            "recovered the registry"
        );
        Ok(())
    }

    /// Hands what changed in this batch to the registry writer.
    fn flush_registry(&mut self) {
        if self.dirty.is_empty() && self.pending_deletes.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.dirty);
        let Some(writer) = &self.registry else {
            return;
        };
        let mut changes = std::mem::take(&mut self.pending_deletes);
        changes.reserve(
            dirty.agents.len() + dirty.frameworks.len() + dirty.tasks.len() + dirty.volumes.len(),
        );
        for id in dirty.agents {
            let record = match (self.agents.get(&id), self.gone_agents.get(&id)) {
                (Some(a), _) => Some(AgentRecord {
                    info: Some(a.info.clone()),
                    phase: if a.unreachable_since.is_some() {
                        AgentPhase::Unreachable
                    } else {
                        AgentPhase::Admitted
                    } as u32,
                    since: a.unreachable_since.map(|(_, w)| w).unwrap_or_default(),
                    registered_at: a.registered_at,
                }),
                (None, Some(at)) => Some(AgentRecord {
                    info: Some(pb::AgentInfo {
                        id: id.to_string(),
                        ..Default::default()
                    }),
                    phase: AgentPhase::Gone as u32,
                    since: *at,
                    registered_at: 0.0,
                }),
                (None, None) => None,
            };
            changes.push(Change::Agent(id.to_string(), record));
        }
        for id in dirty.frameworks {
            let record = self.frameworks.get(&id).map(|f| FrameworkRecord {
                info: Some(f.info.clone()),
                disconnected_at: f.disconnected_wall,
                registered_at: f.registered_at,
            });
            changes.push(Change::Framework(id.to_string(), record));
        }
        for (id, at) in dirty.removed_frameworks {
            changes.push(Change::RemovedFramework(id.to_string(), at));
        }
        for key in dirty.tasks {
            let record = self.tasks.get(&key).map(|t| {
                Box::new(TaskRecord {
                    agent_id: t.agent_id.to_string(),
                    info: Some(t.info.clone()),
                    status: Some(t.status.clone()),
                })
            });
            changes.push(Change::Task((key.0.to_string(), key.1.to_string()), record));
        }
        for key in dirty.volumes {
            let record = self.volumes.get(&key).map(|v| VolumeRecord {
                agent_id: v.agent_id.to_string(),
                disk_mib: v.disk.disk.as_f64(),
            });
            changes.push(Change::Volume(
                (key.0.to_string(), key.1.to_string()),
                record,
            ));
        }
        writer.send(changes);
    }

    /// Returns true when the master should stop.
    fn handle_command(&mut self, command: Command) -> bool {
        match command {
            Command::AgentRegister {
                register,
                tx,
                reply,
            } => {
                let r = self.register_agent(register, tx);
                let _ = reply.send(r);
            }
            Command::AgentMessage {
                agent_id,
                conn,
                message,
            } => self.agent_message(&agent_id, conn, message),
            Command::AgentDisconnected { agent_id, conn } => {
                let current = self
                    .agents
                    .get(&agent_id)
                    .and_then(|a| a.conn.as_ref())
                    .is_some_and(|c| c.id == conn);
                if current {
                    self.agent_disconnected(&agent_id);
                }
            }
            Command::Subscribe { request, reply } => {
                let r = self.subscribe(request);
                let _ = reply.send(r);
            }
            Command::FrameworkDisconnected {
                framework_id,
                stream_id,
            } => self.framework_disconnected(&framework_id, &stream_id),
            Command::Call { call, reply } => {
                let name = call.name();
                let r = self.call(call);
                if r.is_err() {
                    self.metrics.invalid_call(name);
                }
                let _ = reply.send(r);
            }
            Command::Snapshot { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::Shutdown { reply } => {
                // Dropping every sender ends every stream, so the server's
                // graceful shutdown does not wait on them forever.
                for a in self.agents.values_mut() {
                    a.conn = None;
                }
                for f in self.frameworks.values_mut() {
                    f.conn = None;
                }
                let _ = reply.send(());
                return true;
            }
        }
        for (fid, stream) in std::mem::take(&mut self.broken_streams) {
            self.framework_disconnected(&fid, &stream);
        }
        false
    }

    fn now(&self) -> Duration {
        Instant::now().duration_since(self.start)
    }

    fn next_conn_id(&mut self) -> u64 {
        self.next_conn += 1;
        self.next_conn
    }

    // ---------------------------------------------------------------- agents

    fn register_agent(
        &mut self,
        register: pb::Register,
        tx: AgentTx,
    ) -> Result<(AgentId, u64), Status> {
        let info = register.info.unwrap_or_default();
        let valid = validation::agent_info(&info).map_err(invalid)?;
        let mut reported: Vec<(TaskKey, pb::TaskInfo, TaskState)> = Vec::new();
        for (i, t) in register.tasks.iter().enumerate() {
            let fid = FrameworkId::parse(
                &t.framework_id,
                &format!("register.tasks[{i}].framework_id"),
            )
            .map_err(|e| invalid(e.into()))?;
            let task = t.task.clone().unwrap_or_default();
            let tid = TaskId::parse(&task.task_id, &format!("register.tasks[{i}].task.task_id"))
                .map_err(|e| invalid(e.into()))?;
            reported.push(((fid, tid), task, t.state()));
        }
        let mut reported_volumes = Vec::with_capacity(register.volumes.len());
        for (i, v) in register.volumes.iter().enumerate() {
            reported_volumes
                .push(volumes::reported(v, &format!("register.volumes[{i}]")).map_err(invalid)?);
        }
        let replaces = if register.replaces_agent_id.is_empty() {
            None
        } else {
            Some(
                AgentId::parse(&register.replaces_agent_id, "register.replaces_agent_id")
                    .map_err(|e| invalid(e.into()))?,
            )
        };
        // A first registration from an address and hostname the master
        // already knows is that agent again: its `Registered` was lost (the
        // stream broke first), or it restarted with an empty work dir. It
        // keeps its id, as in Mesos, and what it runs is reconciled, rather
        // than a second agent appearing beside a phantom one.
        let retried = valid
            .id
            .is_none()
            .then(|| self.known_agent_at(&valid.info))
            .flatten();
        if let Some(id) = &retried {
            info!(agent_id = %id, address = %valid.info.address,
                  "a first registration from a known agent's address: it keeps its id");
        }
        let reregister = valid.id.is_some() || retried.is_some();
        let id = valid
            .id
            .clone()
            .or(retried)
            .unwrap_or_else(|| AgentId::generated(uuid::Uuid::new_v4().to_string()));
        let conn_id = self.next_conn_id();
        let now = Instant::now();

        if self.gone_agents.contains_key(&id) {
            // Removed agents never come back under their id (its tasks were
            // reported GONE): it must shut down and start afresh as a new
            // agent. The stream ends after this message.
            warn!(agent_id = %id, "refusing a removed agent");
            let message = format!(
                "agent {id} was removed by the master (unreachable for too long, or replaced); \
                 start it with a fresh work dir to register as a new agent"
            );
            tx.try_send(Ok(shutdown_message(&message)))
                .map_err(|_| Status::unavailable("agent stream closed during registration"))?;
            return Ok((id, conn_id));
        }
        if let Some(old) = replaces.filter(|old| old != &id) {
            self.remove_agent(
                &old,
                REMOVED_REPLACED,
                &format!("agent {old} was replaced by agent {id} (it restarted as a new agent)"),
            );
        }

        // Registered goes first on the new stream, before kills or shutdowns.
        let registered = pb::MasterMessage {
            message: Some(pb::master_message::Message::Registered(pb::Registered {
                agent_id: id.to_string(),
                heartbeat_interval_seconds: self.config.agent_heartbeat_interval.as_secs_f64(),
                ..Default::default()
            })),
            ..Default::default()
        };
        tx.try_send(Ok(registered))
            .map_err(|_| Status::unavailable("agent stream closed during registration"))?;

        // An agent that reconnects before we noticed it was gone: settle the
        // old connection first (its offers are rescinded).
        if self.agents.get(&id).is_some_and(|a| a.conn.is_some()) {
            self.rescind_agent_offers(&id);
        }
        let agent = self.agents.entry(id.clone()).or_insert_with(|| Agent {
            id: id.clone(),
            info: valid.info.clone(),
            total: valid.total.clone(),
            conn: None,
            last_seen: now,
            registered_at: now_seconds(),
            tasks: HashSet::new(),
            pending_kills: HashMap::new(),
            pending_destroys: HashSet::new(),
            unreachable_since: None,
            recovering: false,
        });
        agent.unreachable_since = None;
        agent.recovering = false;
        agent.info = valid.info;
        agent.info.id = id.to_string();
        agent.total = valid.total;
        agent.conn = Some(AgentConn { id: conn_id, tx });
        agent.last_seen = now;
        info!(agent_id = %id, hostname = %agent.info.hostname, reregister, tasks = reported.len(), "agent registered");
        self.dirty.agents.insert(id.clone());

        // Frameworks the agent knows of that we do not (e.g. after a master
        // restart) come back as disconnected records so their tasks are
        // accounted for; their failover timeout runs from now.
        for fi in &register.frameworks {
            if let Ok(v) = validation::framework_info(fi)
                && let Some(fid) = v.id.clone()
                && !self.frameworks.contains_key(&fid)
                && !self.removed_frameworks.contains(&fid)
            {
                self.add_framework_record(fid, v, None);
            }
        }

        if reregister {
            self.reconcile_agent_tasks(&id, reported);
        }
        self.adopt_volumes(&id, reported_volumes);

        // The allocator learns the agent with what its tasks hold.
        let mut used: HashMap<FrameworkId, Resources> = HashMap::new();
        if let Some(agent) = self.agents.get(&id) {
            for key in &agent.tasks {
                if let Some(t) = self.tasks.get(key)
                    && t.holds_resources()
                {
                    used.entry(key.0.clone()).or_default().add(&t.resources);
                }
            }
        }
        for (key, volume) in self.volumes.on_agent(&id) {
            used.entry(key.0.clone()).or_default().add(&volume.disk);
        }
        if let Some(agent) = self.agents.get(&id) {
            self.allocator
                .add_agent(id.clone(), agent.total.clone(), used.into_iter().collect());
        }

        // Kills asked for while it was away, or lost with its last stream.
        let tasks = &self.tasks;
        let kills: Vec<_> = self
            .agents
            .get_mut(&id)
            .map(|a| {
                a.pending_kills
                    .retain(|key, _| tasks.get(key).is_some_and(|t| !is_terminal(t.state())));
                a.pending_kills
                    .iter()
                    .map(|(k, g)| (k.clone(), *g))
                    .collect()
            })
            .unwrap_or_default();
        for ((fid, tid), grace) in kills {
            self.send_to_agent(&id, kill_message(&fid, &tid, grace));
        }
        self.allocation_pending = true;
        Ok((id, conn_id))
    }

    /// Brings the master's view of a returning agent's tasks in line with
    /// what the agent reports.
    fn reconcile_agent_tasks(
        &mut self,
        id: &AgentId,
        reported: Vec<(TaskKey, pb::TaskInfo, TaskState)>,
    ) {
        let reported_keys: HashSet<TaskKey> = reported.iter().map(|(k, _, _)| k.clone()).collect();
        let known = self.tasks_on(id);
        // Tasks we thought were there but the agent does not have.
        for key in known {
            if reported_keys.contains(&key) {
                continue;
            }
            let live = self
                .tasks
                .get(&key)
                .is_some_and(|t| !is_terminal(t.state()));
            if live {
                self.master_update(
                    &key,
                    TaskState::TaskLost,
                    Reason::AgentReregistered,
                    "the agent came back without this task",
                );
            }
        }
        for (key, info, state) in reported {
            if self.removed_frameworks.contains(&key.0) {
                self.send_to_agent(id, shutdown_framework_message(&key.0));
                continue;
            }
            if let Some(task) = self.tasks.get_mut(&key) {
                // A terminal state arrives as the agent's own (acknowledgeable)
                // status update; only live states are taken from the report.
                // Its resources are free already: the allocator learns the
                // agent below without them.
                if is_terminal(state) {
                    task.released = true;
                } else if task.state() != state && !is_terminal(task.state()) {
                    self.master_update(
                        &key,
                        state,
                        Reason::AgentReregistered,
                        "agent re-registered",
                    );
                }
                continue;
            }
            if is_terminal(state) {
                continue;
            }
            let resources =
                Resources::from_proto(&info.resources, "task.resources").unwrap_or_default();
            if !self.frameworks.contains_key(&key.0) {
                self.add_recovered_framework(&key.0);
            }
            let status = pb::TaskStatus {
                task_id: key.1.to_string(),
                state: state as i32,
                source: Source::Master as i32,
                reason: Reason::AgentReregistered as i32,
                agent_id: id.to_string(),
                framework_id: key.0.to_string(),
                timestamp: now_seconds(),
                ..Default::default()
            };
            self.insert_task(key, id.clone(), info, resources, status);
        }
    }

    fn agent_message(&mut self, id: &AgentId, conn: u64, message: pb::agent_message::Message) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        if agent.conn.as_ref().map(|c| c.id) != Some(conn) {
            return; // from a connection that was replaced
        }
        agent.last_seen = Instant::now();
        match message {
            pb::agent_message::Message::Heartbeat(_) => {}
            pb::agent_message::Message::StatusUpdate(update) => self.status_update(id, update),
            pb::agent_message::Message::TaskEnded(ended) => self.task_ended(id, &ended),
            pb::agent_message::Message::Usage(report) => {
                for usage in report.containers {
                    let (Ok(fid), Ok(tid)) = (
                        FrameworkId::parse(&usage.framework_id, "usage.framework_id"),
                        TaskId::parse(&usage.task_id, "usage.task_id"),
                    ) else {
                        continue;
                    };
                    if let Some(task) = self.tasks.get_mut(&(fid, tid))
                        && &task.agent_id == id
                    {
                        task.usage = Some(usage);
                    }
                }
            }
            pb::agent_message::Message::Register(_) => {
                warn!(agent_id = %id, "ignoring a second register on one stream");
            }
        }
    }

    fn agent_tick(&mut self) {
        let limit = self.config.agent_unreachable_after();
        let now = Instant::now();
        let silent: Vec<(AgentId, bool)> = self
            .agents
            .values()
            .filter(|a| {
                a.unreachable_since.is_none()
                    && !a.recovering
                    && now.duration_since(a.last_seen) > limit
            })
            .map(|a| (a.id.clone(), a.conn.is_some()))
            .collect();
        for (id, connected) in silent {
            let why = if connected {
                "it missed its heartbeats".to_string()
            } else {
                format!("its stream closed and it did not re-register within {limit:?}")
            };
            self.agent_unreachable(&id, &why);
        }
        if self.recovery_deadline.is_some_and(|d| now >= d) {
            self.recovery_deadline = None;
            let late: Vec<AgentId> = self
                .agents
                .values()
                .filter(|a| a.recovering)
                .map(|a| a.id.clone())
                .collect();
            for id in late {
                self.agent_unreachable(
                    &id,
                    "it did not re-register within the agent re-register timeout after the master restarted",
                );
            }
        }
        self.remove_unreachable_agents(now);
        self.forget_old_gone_agents();
        let ids: Vec<AgentId> = self
            .agents
            .values()
            .filter(|a| a.conn.is_some())
            .map(|a| a.id.clone())
            .collect();
        for id in ids {
            self.send_to_agent(
                &id,
                pb::MasterMessage {
                    message: Some(pb::master_message::Message::Heartbeat(
                        pb::MasterHeartbeat {},
                    )),
                    ..Default::default()
                },
            );
        }
        if let Some(timeout) = self.config.offer_timeout {
            let expired: Vec<OfferId> = self
                .offers
                .iter()
                .filter(|(_, o)| now.duration_since(o.created) >= timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                self.rescind_offer(&id);
            }
        }
    }

    /// Marks an agent unreachable: its offers are rescinded, its tasks become
    /// TASK_UNREACHABLE but keep their resources (they may still run).
    /// The tasks the master places on agent `id`.
    fn tasks_on(&self, id: &AgentId) -> Vec<TaskKey> {
        self.agents
            .get(id)
            .map(|a| a.tasks.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The agent already known at this (non-empty) address and hostname.
    fn known_agent_at(&self, info: &pb::AgentInfo) -> Option<AgentId> {
        if info.address.is_empty() {
            return None;
        }
        self.agents
            .values()
            .find(|a| a.info.address == info.address && a.info.hostname == info.hostname)
            .map(|a| a.id.clone())
    }

    /// The agent's stream closed (a crash, a restart, a broken
    /// connection): no more offers from it, but its tasks stay as they are
    /// until it is unreachable, after the ping timeouts, as in Mesos. An
    /// agent that restarts within them costs its frameworks nothing.
    fn agent_disconnected(&mut self, id: &AgentId) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        if agent.conn.take().is_none() {
            return;
        }
        info!(agent_id = %id, unreachable_after = ?self.config.agent_unreachable_after(),
              "agent disconnected; unreachable unless it re-registers in time");
        self.rescind_agent_offers(id);
        self.allocator.set_agent_active(id, false);
    }

    fn agent_unreachable(&mut self, id: &AgentId, why: &str) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        agent.conn = None;
        if agent.unreachable_since.is_some() {
            return;
        }
        agent.recovering = false;
        agent.unreachable_since = Some((Instant::now(), now_seconds()));
        self.dirty.agents.insert(id.clone());
        warn!(agent_id = %id, "agent unreachable: {why}");
        let keys: Vec<TaskKey> = agent.tasks.iter().cloned().collect();
        self.rescind_agent_offers(id);
        self.allocator.set_agent_active(id, false);
        for key in keys {
            let live = self
                .tasks
                .get(&key)
                .is_some_and(|t| !is_terminal(t.state()));
            if live {
                self.master_update(
                    &key,
                    TaskState::TaskUnreachable,
                    Reason::AgentDisconnected,
                    &format!("agent {id} is unreachable: {why}"),
                );
            }
        }
    }

    /// Forgets removed agents older than `registry_max_agent_age`, and the
    /// oldest beyond `registry_max_agent_count`, so the registry does not
    /// grow forever with a churning fleet (Mesos' registry GC). An agent
    /// that returns after that is not refused: it registers like an
    /// unknown one, and its frameworks reconcile its tasks.
    fn forget_old_gone_agents(&mut self) {
        let max_age = self.config.registry_max_agent_age.as_secs_f64();
        let max_count = self.config.registry_max_agent_count;
        let oldest_kept = now_seconds() - max_age;
        let over = self.gone_agents.len().saturating_sub(max_count);
        let too_old = self.gone_agents.values().any(|at| *at < oldest_kept);
        if over == 0 && !too_old {
            return;
        }
        let mut by_age: Vec<(f64, AgentId)> = self
            .gone_agents
            .iter()
            .map(|(id, at)| (*at, id.clone()))
            .collect();
        by_age.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        for (i, (at, id)) in by_age.into_iter().enumerate() {
            if i >= over && at >= oldest_kept {
                break;
            }
            self.gone_agents.remove(&id);
            self.dirty.agents.insert(id);
        }
    }

    /// Removes agents unreachable for longer than `agent_removal_timeout`,
    /// oldest first, at most `agent_removal_rate`; none while more than
    /// `max_unreachable_percent` of the agents are unreachable.
    fn remove_unreachable_agents(&mut self, now: Instant) {
        let known = self.agents.len();
        let mut unreachable: Vec<(Instant, AgentId)> = self
            .agents
            .values()
            .filter_map(|a| a.unreachable_since.map(|(t, _)| (t, a.id.clone())))
            .collect();
        let limit = usize::from(self.config.max_unreachable_percent);
        let halted = known > 0 && unreachable.len() * 100 > known * limit;
        if halted != self.removal_halted {
            if halted {
                warn!(
                    unreachable = unreachable.len(),
                    known,
                    max_percent = limit,
                    "agent removal halted: too many agents are unreachable at once (the master may be the one cut off)"
                );
            } else {
                info!("agent removal resumed");
            }
            self.removal_halted = halted;
        }
        if halted {
            return;
        }
        let timeout = self.config.agent_removal_timeout;
        unreachable.retain(|(since, _)| now.duration_since(*since) >= timeout);
        unreachable.sort();
        for (_, id) in unreachable {
            if now < self.next_removal {
                break;
            }
            self.next_removal = now + self.config.agent_removal_rate.interval();
            self.remove_agent(
                &id,
                REMOVED_UNREACHABLE,
                &format!("agent {id} was unreachable for longer than {timeout:?} and was removed"),
            );
        }
    }

    /// Forgets an agent for good: its tasks become TASK_GONE (reason
    /// AGENT_REMOVED), its volumes are forgotten (the disk went with it),
    /// and its id is refused from now on.
    fn remove_agent(&mut self, id: &AgentId, kind: &'static str, why: &str) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        warn!(agent_id = %id, hostname = %agent.info.hostname, "removing agent: {why}");
        if let Some(conn) = agent.conn.take() {
            let _ = conn.tx.try_send(Ok(shutdown_message(why)));
        }
        self.rescind_agent_offers(id);
        let keys = self.tasks_on(id);
        for key in keys {
            let live = self
                .tasks
                .get(&key)
                .is_some_and(|t| !is_terminal(t.state()));
            if live {
                self.master_update(&key, TaskState::TaskGone, Reason::AgentRemoved, why);
            } else {
                self.retire_task(&key);
            }
        }
        self.agents.remove(id);
        let volumes: Vec<VolumeKey> = self.volumes.on_agent(id).map(|(k, _)| k.clone()).collect();
        for key in volumes {
            self.volumes.remove(&key);
            self.dirty.volumes.insert(key);
        }
        self.allocator.remove_agent(id);
        self.gone_agents.insert(id.clone(), now_seconds());
        self.dirty.agents.insert(id.clone());
        self.metrics.agent_removed(kind);
        self.allocation_pending = true;
    }

    fn send_to_agent(&mut self, id: &AgentId, message: pb::MasterMessage) {
        let Some(agent) = self.agents.get(id) else {
            return;
        };
        let Some(conn) = &agent.conn else { return };
        if conn.tx.try_send(Ok(message)).is_err() {
            // Full or closed: the agent cannot keep up or is gone. Treat it as
            // a broken stream; it re-registers and nothing is lost because
            // kills are re-sent and updates are retried by the agent.
            self.agent_unreachable(id, "its stream is full or closed");
        }
    }

    // ------------------------------------------------------------ frameworks

    /// A framework known only from what an agent reports (after a master
    /// restart): disconnected, its failover timeout running from now.
    fn add_recovered_framework(&mut self, id: &FrameworkId) {
        let info = pb::FrameworkInfo {
            id: id.to_string(),
            name: "(recovered)".into(),
            ..Default::default()
        };
        if let Ok(v) = validation::framework_info(&info) {
            self.add_framework_record(id.clone(), v, None);
        }
    }

    fn add_framework_record(
        &mut self,
        id: FrameworkId,
        v: validation::ValidFramework,
        conn: Option<FrameworkConn>,
    ) {
        let connected = conn.is_some();
        self.dirty.frameworks.insert(id.clone());
        self.allocator.add_framework(id.clone(), &v.role);
        self.allocator.set_framework_active(&id, connected);
        let mut info = v.info;
        info.id = id.to_string();
        self.frameworks.insert(
            id.clone(),
            Framework {
                id,
                info,
                role: v.role,
                failover_timeout: v.failover_timeout,
                conn,
                disconnected_at: if connected {
                    None
                } else {
                    Some(Instant::now())
                },
                disconnected_wall: if connected { None } else { Some(now_seconds()) },
                suppressed: false,
                registered_at: now_seconds(),
                tasks: HashSet::new(),
                offers: HashSet::new(),
            },
        );
    }

    fn subscribe(&mut self, request: pb::SubscribeRequest) -> Result<Subscription, Status> {
        let info = request.framework_info.unwrap_or_default();
        let v = validation::framework_info(&info).map_err(invalid)?;
        if let Some(id) = &v.id
            && self.removed_frameworks.contains(id)
        {
            return Err(Status::failed_precondition(format!(
                "framework {id} was removed (torn down or its failover timeout expired); subscribe without an id to start over"
            )));
        }
        let id =
            v.id.clone()
                .unwrap_or_else(|| FrameworkId::generated(uuid::Uuid::new_v4().to_string()));
        let (tx, rx) = mpsc::channel(FRAMEWORK_EVENT_BUFFER);
        let stream_id = uuid::Uuid::new_v4().to_string();
        let subscribed = pb::Event {
            event: Some(pb::event::Event::Subscribed(pb::Subscribed {
                framework_id: id.to_string(),
                stream_id: stream_id.clone(),
                heartbeat_interval_seconds: self.config.framework_heartbeat_interval.as_secs_f64(),
                ..Default::default()
            })),
            ..Default::default()
        };
        tx.try_send(Ok(subscribed))
            .map_err(|_| Status::internal("could not queue the subscribed event"))?;
        let conn = FrameworkConn {
            stream_id: stream_id.clone(),
            tx,
        };
        if let Some(fw) = self.frameworks.get_mut(&id) {
            // Failover: a new instance takes over from the old connection.
            if let Some(old) = fw.conn.take() {
                let _ = old.tx.try_send(Ok(error_event(
                    "framework failed over: a newer subscription with the same id replaced this one",
                )));
            }
            if fw.role != v.role {
                warn!(framework_id = %id, old = %fw.role, new = %v.role, "role change on re-subscribe is ignored");
            }
            fw.info = v.info;
            fw.info.id = id.to_string();
            fw.info.role = fw.role.clone();
            fw.failover_timeout = v.failover_timeout;
            fw.conn = Some(conn);
            fw.disconnected_at = None;
            fw.disconnected_wall = None;
            fw.suppressed = false;
            self.dirty.frameworks.insert(id.clone());
            info!(framework_id = %id, "framework re-subscribed");
            self.rescind_framework_offers(&id);
            self.allocator.set_framework_active(&id, true);
            self.allocator.revive(&id);
        } else {
            info!(framework_id = %id, name = %v.info.name, role = %v.role, "framework subscribed");
            self.add_framework_record(id.clone(), v, Some(conn));
        }
        self.allocation_pending = true;
        Ok(Subscription {
            events: rx,
            framework_id: id,
            stream_id,
        })
    }

    fn framework_disconnected(&mut self, id: &FrameworkId, stream_id: &str) {
        let Some(fw) = self.frameworks.get_mut(id) else {
            return;
        };
        if fw.conn.as_ref().map(|c| c.stream_id.as_str()) != Some(stream_id) {
            return; // an older stream
        }
        fw.conn = None;
        fw.disconnected_at = Some(Instant::now());
        fw.disconnected_wall = Some(now_seconds());
        let timeout = fw.failover_timeout;
        self.dirty.frameworks.insert(id.clone());
        info!(framework_id = %id, failover_timeout = ?timeout, "framework disconnected");
        self.rescind_framework_offers(id);
        self.allocator.set_framework_active(id, false);
        if timeout.is_zero() {
            self.remove_framework(id, "its failover timeout (0 s) expired");
        }
    }

    fn framework_tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<FrameworkId> = self
            .frameworks
            .values()
            .filter(|f| {
                f.disconnected_at
                    .is_some_and(|t| now.duration_since(t) >= f.failover_timeout)
            })
            .map(|f| f.id.clone())
            .collect();
        for id in expired {
            self.remove_framework(&id, "its failover timeout expired");
        }
        let ids: Vec<FrameworkId> = self
            .frameworks
            .values()
            .filter(|f| f.conn.is_some())
            .map(|f| f.id.clone())
            .collect();
        for id in ids {
            self.send_event(
                &id,
                pb::Event {
                    event: Some(pb::event::Event::Heartbeat(pb::Heartbeat {})),
                    ..Default::default()
                },
            );
        }
    }

    /// Teardown or failover timeout: kill the framework's tasks, drop its
    /// offers, forget it, and refuse its id from now on.
    fn remove_framework(&mut self, id: &FrameworkId, why: &str) {
        let Some(mut fw) = self.frameworks.remove(id) else {
            return;
        };
        info!(framework_id = %id, "removing framework: {why}");
        self.dirty.frameworks.insert(id.clone());
        self.dirty
            .removed_frameworks
            .push((id.clone(), now_seconds()));
        if let Some(conn) = fw.conn.take() {
            let _ = conn
                .tx
                .try_send(Ok(error_event(&format!("framework removed: {why}"))));
        }
        for offer_id in fw.offers.drain() {
            self.offers.remove(&offer_id);
        }
        let mut agents: HashSet<AgentId> = HashSet::new();
        for tid in fw.tasks.drain() {
            let key = (id.clone(), tid);
            self.dirty.tasks.insert(key.clone());
            if let Some(task) = self.tasks.remove(&key) {
                if let Some(agent) = self.agents.get_mut(&task.agent_id) {
                    agent.tasks.remove(&key);
                    agent.pending_kills.remove(&key);
                }
                if !is_terminal(task.state()) {
                    agents.insert(task.agent_id.clone());
                    self.metrics.terminal("TASK_KILLED", "FRAMEWORK_REMOVED");
                    let mut status = task.status.clone();
                    status.state = TaskState::TaskKilled as i32;
                    status.reason = Reason::FrameworkRemoved as i32;
                    status.message = format!("framework removed: {why}");
                    self.push_completed(&task, &status);
                } else {
                    self.push_completed(&task, &task.status);
                }
            }
        }
        for agent_id in agents {
            self.send_to_agent(&agent_id, shutdown_framework_message(id));
        }
        for key in self.volumes.of_framework(id) {
            self.drop_volume(&key, "its framework was removed");
        }
        self.allocator.remove_framework(id);
        self.removed_frameworks.insert(id.clone());
        self.allocation_pending = true;
    }

    /// Queues an event; a full or closed stream counts as a disconnection.
    fn send_event(&mut self, id: &FrameworkId, event: pb::Event) {
        let Some(fw) = self.frameworks.get(id) else {
            return;
        };
        let Some(conn) = &fw.conn else { return };
        if conn.tx.try_send(Ok(event)).is_err() {
            self.broken_streams
                .push((id.clone(), conn.stream_id.clone()));
        }
    }

    fn send_update(&mut self, status: pb::TaskStatus) {
        let Ok(fid) = FrameworkId::parse(&status.framework_id, "status.framework_id") else {
            return;
        };
        self.send_event(
            &fid,
            pb::Event {
                event: Some(pb::event::Event::Update(pb::Update {
                    status: Some(status),
                })),
                ..Default::default()
            },
        );
    }

    // ---------------------------------------------------------------- offers

    fn allocate(&mut self) {
        self.allocation_pending = false;
        let started = std::time::Instant::now();
        let allocations = self.allocator.allocate(self.now());
        self.metrics.allocation(started.elapsed().as_secs_f64());
        if allocations.is_empty() {
            return;
        }
        let now = self.now();
        let mut batches: HashMap<FrameworkId, Vec<pb::Offer>> = HashMap::new();
        for a in allocations {
            let agent = self.agents.get(&a.agent_id).filter(|ag| ag.conn.is_some());
            let framework = self
                .frameworks
                .get(&a.framework_id)
                .filter(|f| f.conn.is_some());
            let (Some(agent), Some(_)) = (agent, framework) else {
                // Raced with a disconnect handled in this batch: give it back.
                self.allocator
                    .recover(&a.framework_id, &a.agent_id, &a.resources, None, now);
                continue;
            };
            let id = OfferId::generated(uuid::Uuid::new_v4().to_string());
            let offer = pb::Offer {
                id: id.to_string(),
                framework_id: a.framework_id.to_string(),
                agent_id: a.agent_id.to_string(),
                hostname: agent.info.hostname.clone(),
                agent_address: agent.info.address.clone(),
                resources: a.resources.to_proto(),
                attributes: agent.info.attributes.clone(),
                volumes: Vec::new(),
            };
            let offer = pb::Offer {
                volumes: self.free_volumes(&a.framework_id, &a.agent_id),
                ..offer
            };
            if let Some(fw) = self.frameworks.get_mut(&a.framework_id) {
                fw.offers.insert(id.clone());
            }
            self.offers.insert(
                id,
                Offer {
                    framework_id: a.framework_id.clone(),
                    agent_id: a.agent_id,
                    resources: a.resources,
                    created: Instant::now(),
                },
            );
            batches.entry(a.framework_id).or_default().push(offer);
        }
        for (fid, offers) in batches {
            debug!(framework_id = %fid, count = offers.len(), "sending offers");
            self.metrics.offers("sent", offers.len() as u64);
            self.send_event(
                &fid,
                pb::Event {
                    event: Some(pb::event::Event::Offers(pb::Offers { offers })),
                    ..Default::default()
                },
            );
        }
    }

    /// Removes an offer and gives its resources back; tells the framework.
    fn rescind_offer(&mut self, id: &OfferId) {
        let Some(offer) = self.take_offer(id) else {
            return;
        };
        let now = self.now();
        self.allocator.recover(
            &offer.framework_id,
            &offer.agent_id,
            &offer.resources,
            None,
            now,
        );
        self.metrics.offers("rescinded", 1);
        self.send_event(
            &offer.framework_id,
            pb::Event {
                event: Some(pb::event::Event::Rescind(pb::Rescind {
                    offer_id: id.to_string(),
                })),
                ..Default::default()
            },
        );
        self.allocation_pending = true;
    }

    fn take_offer(&mut self, id: &OfferId) -> Option<Offer> {
        let offer = self.offers.remove(id)?;
        if let Some(fw) = self.frameworks.get_mut(&offer.framework_id) {
            fw.offers.remove(id);
        }
        Some(offer)
    }

    fn rescind_agent_offers(&mut self, agent: &AgentId) {
        let ids: Vec<OfferId> = self
            .offers
            .iter()
            .filter(|(_, o)| &o.agent_id == agent)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.rescind_offer(&id);
        }
    }

    fn rescind_framework_offers(&mut self, framework: &FrameworkId) {
        let ids: Vec<OfferId> = self
            .frameworks
            .get(framework)
            .map(|f| f.offers.iter().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            self.rescind_offer(&id);
        }
    }

    // ----------------------------------------------------------------- calls

    fn check_header(&self, header: Option<&pb::CallHeader>) -> Result<FrameworkId, Status> {
        let header = header.ok_or_else(|| Status::invalid_argument("header: is required"))?;
        let id = FrameworkId::parse(&header.framework_id, "header.framework_id")
            .map_err(|e| invalid(e.into()))?;
        if self.removed_frameworks.contains(&id) {
            return Err(Status::failed_precondition(format!(
                "framework {id} was removed"
            )));
        }
        let fw = self
            .frameworks
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("framework {id} is not subscribed")))?;
        match &fw.conn {
            Some(c) if c.stream_id == header.stream_id => Ok(id),
            _ => Err(Status::failed_precondition(format!(
                "header.stream_id: '{}' is not the current subscription of framework {id}",
                header.stream_id
            ))),
        }
    }

    fn call(&mut self, call: Call) -> Result<(), Status> {
        let fid = self.check_header(call.header())?;
        match call {
            Call::Accept(r) => self.accept(&fid, r),
            Call::Decline(r) => self.decline(&fid, r),
            Call::Revive(_) => {
                if let Some(fw) = self.frameworks.get_mut(&fid) {
                    fw.suppressed = false;
                }
                self.allocator.revive(&fid);
                self.allocation_pending = true;
                Ok(())
            }
            Call::Suppress(_) => {
                if let Some(fw) = self.frameworks.get_mut(&fid) {
                    fw.suppressed = true;
                }
                self.allocator.suppress(&fid);
                Ok(())
            }
            Call::Kill(r) => self.kill(&fid, r),
            Call::Acknowledge(r) => self.acknowledge(&fid, r),
            Call::Reconcile(r) => self.reconcile(&fid, r),
            Call::Teardown(_) => {
                self.remove_framework(&fid, "torn down by the framework");
                Ok(())
            }
            Call::DestroyVolume(r) => self.destroy_volume(&fid, &r),
        }
    }

    fn accept(&mut self, fid: &FrameworkId, r: pb::AcceptRequest) -> Result<(), Status> {
        let refuse = validation::refuse_seconds(r.filters.as_ref(), self.config.default_refuse)
            .map_err(invalid)?;
        let mut offer_ids = Vec::with_capacity(r.offer_ids.len());
        for (i, o) in r.offer_ids.iter().enumerate() {
            offer_ids.push(
                OfferId::parse(o, &format!("offer_ids[{i}]")).map_err(|e| invalid(e.into()))?,
            );
        }
        let mut launches: Vec<Launching> = Vec::new();
        let mut creates: Vec<(usize, pb::CreateVolume)> = Vec::new();
        for (i, op) in r.operations.into_iter().enumerate() {
            match op.operation {
                Some(pb::operation::Operation::Launch(l)) => {
                    launches.extend(l.tasks.into_iter().map(Launching::Task));
                }
                Some(pb::operation::Operation::LaunchGroup(l)) => {
                    launches.push(Launching::Group(l.task_group.unwrap_or_default()));
                }
                Some(pb::operation::Operation::CreateVolume(c)) => creates.push((i, c)),
                None => {}
            }
        }

        // Offers first: if any is not valid, nothing is launched (Mesos drops
        // every task of the call with INVALID_OFFERS) and the valid ones are
        // given back.
        let problem = self.offers_problem(fid, &offer_ids);
        if let Some(problem) = problem {
            warn!(framework_id = %fid, "accept with invalid offers: {problem}");
            for t in launches.iter().flat_map(Launching::tasks) {
                self.reject_task(
                    fid,
                    t,
                    TaskState::TaskDropped,
                    Reason::InvalidOffers,
                    &problem,
                );
            }
            let now = self.now();
            for id in &offer_ids {
                if self.offers.get(id).is_some_and(|o| &o.framework_id == fid)
                    && let Some(o) = self.take_offer(id)
                {
                    self.allocator
                        .recover(fid, &o.agent_id, &o.resources, None, now);
                    self.metrics.offers("declined", 1);
                }
            }
            self.allocation_pending = true;
            return Ok(());
        }

        // Volumes next: a create that cannot be done fails the whole call
        // before anything happens, and the offers stay outstanding.
        let creates = self
            .check_creates(fid, &offer_ids, &creates)
            .map_err(invalid)?;

        let mut offered = Resources::default();
        let mut agent_id = None;
        for id in &offer_ids {
            if let Some(o) = self.take_offer(id) {
                offered.add(&o.resources);
                agent_id = Some(o.agent_id);
            }
        }
        self.metrics.offers("accepted", offer_ids.len() as u64);
        let Some(agent_id) = agent_id else {
            // No offers and no tasks: nothing to do.
            for t in launches.iter().flat_map(Launching::tasks) {
                self.reject_task(
                    fid,
                    t,
                    TaskState::TaskDropped,
                    Reason::InvalidOffers,
                    "accept names no offers",
                );
            }
            return Ok(());
        };

        let mut remaining = offered;
        // Every create goes before the launches, so a pod of this call can
        // mount a volume it creates.
        for create in creates {
            remaining.saturating_sub(&create.disk);
            self.create_volume(fid, &agent_id, create);
        }
        let mut in_call: HashSet<TaskId> = HashSet::new();
        for launching in launches {
            match launching {
                Launching::Task(info) => {
                    let checked = validation::task(&info).and_then(|v| {
                        match validation::pod_volume_outside_a_pod(&info) {
                            Some(e) => Err(e),
                            None => Ok(v),
                        }
                    });
                    let problem = match &checked {
                        Ok(v) => self.launch_problem(fid, v, &agent_id, &remaining, &in_call),
                        Err(e) => Some(e.to_string()),
                    };
                    match (checked, problem) {
                        (Ok(valid), None) => {
                            remaining.saturating_sub(&valid.resources);
                            in_call.insert(valid.id.clone());
                            self.launch(fid, &agent_id, valid);
                        }
                        (_, problem) => self.reject_task(
                            fid,
                            &info,
                            TaskState::TaskError,
                            Reason::TaskInvalid,
                            problem.as_deref().unwrap_or_default(),
                        ),
                    }
                }
                Launching::Group(group) => {
                    // All or nothing: one problem fails every task of the pod.
                    let problem = match validation::task_group(&group) {
                        Err(e) => Some(e.to_string()),
                        Ok(valid) => {
                            let mut total = Resources::default();
                            let mut problem = self.volumes_problem(fid, &agent_id, &group);
                            for (i, v) in valid.iter().enumerate() {
                                total.add(&v.resources);
                                if problem.is_some() {
                                    break;
                                }
                                if let Some(p) =
                                    self.launch_problem(fid, v, &agent_id, &remaining, &in_call)
                                {
                                    problem = Some(format!("task_group.tasks[{i}]: {p}"));
                                    break;
                                }
                            }
                            match problem {
                                None if !remaining.contains(&total) => Some(format!(
                                    "task_group: the pod's resources {total} exceed what is left of the offers ({remaining})"
                                )),
                                None => {
                                    remaining.saturating_sub(&total);
                                    in_call.extend(valid.iter().map(|v| v.id.clone()));
                                    self.launch_group(fid, &agent_id, &group, valid);
                                    None
                                }
                                problem => problem,
                            }
                        }
                    };
                    if let Some(problem) = problem {
                        for t in &group.tasks {
                            self.reject_task(
                                fid,
                                t,
                                TaskState::TaskError,
                                Reason::TaskInvalid,
                                &problem,
                            );
                        }
                    }
                }
            }
        }
        if !remaining.is_empty() {
            let now = self.now();
            self.allocator
                .recover(fid, &agent_id, &remaining, Some(refuse), now);
        }
        self.allocation_pending = true;
        Ok(())
    }

    /// Why a valid task cannot be launched on these offers, if it cannot.
    fn launch_problem(
        &self,
        fid: &FrameworkId,
        task: &validation::ValidTask,
        agent_id: &AgentId,
        remaining: &Resources,
        in_call: &HashSet<TaskId>,
    ) -> Option<String> {
        let key = (fid.clone(), task.id.clone());
        if self.tasks.contains_key(&key) || in_call.contains(&task.id) {
            Some(format!(
                "task.task_id: '{}' is already in use by this framework",
                task.id
            ))
        } else if task.info.agent_id != agent_id.as_str() {
            Some(format!(
                "task.agent_id: '{}' is not the agent of the offers ({agent_id})",
                task.info.agent_id
            ))
        } else if !remaining.contains(&task.resources) {
            Some(format!(
                "task.resources: {} exceed what is left of the offers ({remaining})",
                task.resources
            ))
        } else {
            None
        }
    }

    /// Why these offers cannot be used by `fid`, if they cannot.
    fn offers_problem(&self, fid: &FrameworkId, ids: &[OfferId]) -> Option<String> {
        let mut agent: Option<&AgentId> = None;
        let mut seen = HashSet::new();
        for id in ids {
            if !seen.insert(id) {
                return Some(format!("offer {id} is named twice"));
            }
            let Some(o) = self.offers.get(id) else {
                return Some(format!("offer {id} is unknown, rescinded or already used"));
            };
            if &o.framework_id != fid {
                return Some(format!("offer {id} belongs to another framework"));
            }
            if agent.is_some_and(|a| a != &o.agent_id) {
                return Some(
                    "offers from different agents cannot be accepted together".to_string(),
                );
            }
            agent = Some(&o.agent_id);
        }
        None
    }

    fn launch(&mut self, fid: &FrameworkId, agent_id: &AgentId, task: validation::ValidTask) {
        let message = pb::MasterMessage {
            message: Some(pb::master_message::Message::RunTask(pb::RunTask {
                framework: Some(self.framework_info(fid)),
                task: Some(task.info.clone()),
            })),
            ..Default::default()
        };
        let id = task.id.clone();
        self.insert_staging(fid, agent_id, task);
        debug!(framework_id = %fid, task_id = %id, agent_id = %agent_id, "launching task");
        self.send_to_agent(agent_id, message);
    }

    /// Records every task of a pod and sends the pod to its agent in one
    /// message, so the agent launches it as a unit.
    fn launch_group(
        &mut self,
        fid: &FrameworkId,
        agent_id: &AgentId,
        group: &pb::TaskGroupInfo,
        tasks: Vec<validation::ValidTask>,
    ) {
        let ids: Vec<String> = tasks.iter().map(|t| t.id.to_string()).collect();
        let users: HashSet<TaskId> = tasks.iter().map(|t| t.id.clone()).collect();
        for key in persistent_volumes(fid, group) {
            if let Some(volume) = self.volumes.get_mut(&key) {
                volume.users = users.clone();
            }
        }
        for task in tasks {
            self.insert_staging(fid, agent_id, task);
        }
        debug!(framework_id = %fid, tasks = ?ids, agent_id = %agent_id, "launching pod");
        let message = pb::MasterMessage {
            message: Some(pb::master_message::Message::RunTaskGroup(
                pb::RunTaskGroup {
                    framework: Some(self.framework_info(fid)),
                    task_group: Some(group.clone()),
                },
            )),
            ..Default::default()
        };
        self.send_to_agent(agent_id, message);
    }

    // --------------------------------------------------------------- volumes

    /// Checks an Accept's CreateVolume operations against the framework's
    /// volumes and the disk of its (already checked) offers.
    fn check_creates(
        &self,
        fid: &FrameworkId,
        offer_ids: &[OfferId],
        creates: &[(usize, pb::CreateVolume)],
    ) -> Result<Vec<volumes::ValidCreate>, FieldError> {
        let mut offered = Resources::default();
        for id in offer_ids {
            if let Some(o) = self.offers.get(id) {
                offered.add(&o.resources);
            }
        }
        let mut needed = Resources::default();
        let mut ids = HashSet::new();
        let mut valid = Vec::with_capacity(creates.len());
        for (i, op) in creates {
            let field = format!("operations[{i}].create_volume");
            let create = volumes::create(op, &field)?;
            let key = (fid.clone(), create.id.clone());
            if let Some(v) = self.volumes.get(&key) {
                return Err(FieldError::new(
                    format!("{field}.volume_id"),
                    format!(
                        "the framework already has a persistent volume '{}' (on agent {})",
                        create.id, v.agent_id
                    ),
                ));
            }
            if !ids.insert(create.id.clone()) {
                return Err(FieldError::new(
                    format!("{field}.volume_id"),
                    format!("'{}' is created twice in this call", create.id),
                ));
            }
            needed.add(&create.disk);
            if !offered.contains(&needed) {
                return Err(FieldError::new(
                    format!("{field}.disk_mib"),
                    format!(
                        "the call's volumes need disk:{} but the offers have disk:{}",
                        needed.disk.as_f64(),
                        offered.disk.as_f64()
                    ),
                ));
            }
            valid.push(create);
        }
        Ok(valid)
    }

    /// Records a new volume (its disk stays allocated to the framework) and
    /// tells its agent to create it.
    fn create_volume(&mut self, fid: &FrameworkId, agent_id: &AgentId, c: volumes::ValidCreate) {
        info!(framework_id = %fid, volume_id = %c.id, agent_id = %agent_id, disk_mib = c.disk.disk.as_f64(), "creating persistent volume");
        let key = (fid.clone(), c.id);
        let volume = Volume::new(agent_id.clone(), c.disk);
        let message = pb::MasterMessage {
            message: Some(pb::master_message::Message::CreateVolume(
                volume.to_proto(&key),
            )),
            ..Default::default()
        };
        self.dirty.volumes.insert(key.clone());
        self.volumes.insert(key, volume);
        self.send_to_agent(agent_id, message);
    }

    /// Why a pod cannot mount the persistent volumes it names, if it cannot.
    fn volumes_problem(
        &self,
        fid: &FrameworkId,
        agent_id: &AgentId,
        group: &pb::TaskGroupInfo,
    ) -> Option<String> {
        for (i, v) in group.volumes.iter().enumerate() {
            let Some(pb::pod_volume::Source::Persistent(id)) = &v.source else {
                continue;
            };
            let field = format!("task_group.volumes[{i}].persistent");
            let Ok(id) = VolumeId::parse(id, &field) else {
                continue; // validation::task_group names it
            };
            let key = (fid.clone(), id);
            match self.volumes.get(&key) {
                None => {
                    return Some(format!(
                        "{field}: the framework has no persistent volume '{}'",
                        key.1
                    ));
                }
                Some(volume) if &volume.agent_id != agent_id => {
                    return Some(format!(
                        "{field}: persistent volume '{}' is on agent {}, not on the offers' agent {agent_id}",
                        key.1, volume.agent_id
                    ));
                }
                Some(_) => {
                    if let Some(user) = self.volume_user(&key) {
                        return Some(format!(
                            "{field}: persistent volume '{}' is in use by task {user}",
                            key.1
                        ));
                    }
                }
            }
        }
        None
    }

    /// A live task that mounts the volume, if one does.
    fn volume_user(&self, key: &VolumeKey) -> Option<&TaskId> {
        let volume = self.volumes.get(key)?;
        volume.users.iter().find(|tid| {
            self.tasks
                .get(&(key.0.clone(), (*tid).clone()))
                .is_some_and(Task::holds_resources)
        })
    }

    /// The framework's volumes on `agent` that no live task mounts: what an
    /// offer from there lists.
    fn free_volumes(&self, fid: &FrameworkId, agent: &AgentId) -> Vec<pb::PersistentVolume> {
        let mut free: Vec<pb::PersistentVolume> = self
            .volumes
            .on_agent(agent)
            .filter(|(key, _)| &key.0 == fid && self.volume_user(key).is_none())
            .map(|(key, v)| v.to_proto(key))
            .collect();
        free.sort_by(|a, b| a.id.cmp(&b.id));
        free
    }

    fn destroy_volume(
        &mut self,
        fid: &FrameworkId,
        r: &pb::DestroyVolumeRequest,
    ) -> Result<(), Status> {
        let id = VolumeId::parse(&r.volume_id, "volume_id").map_err(|e| invalid(e.into()))?;
        let key = (fid.clone(), id);
        if !self.volumes.contains(&key) {
            return Err(Status::not_found(format!(
                "volume_id: the framework has no persistent volume '{}'",
                key.1
            )));
        }
        if let Some(user) = self.volume_user(&key) {
            return Err(Status::failed_precondition(format!(
                "volume_id: persistent volume '{}' is in use by task {user}",
                key.1
            )));
        }
        self.drop_volume(&key, "destroyed by its framework");
        Ok(())
    }

    /// Forgets a volume, frees its disk and has its agent delete it (now,
    /// or when the agent is back).
    fn drop_volume(&mut self, key: &VolumeKey, why: &str) {
        let Some(volume) = self.volumes.remove(key) else {
            return;
        };
        self.dirty.volumes.insert(key.clone());
        info!(framework_id = %key.0, volume_id = %key.1, agent_id = %volume.agent_id, "destroying persistent volume: {why}");
        let now = self.now();
        self.allocator
            .recover(&key.0, &volume.agent_id, &volume.disk, None, now);
        self.allocation_pending = true;
        let connected = self
            .agents
            .get(&volume.agent_id)
            .is_some_and(|a| a.conn.is_some());
        if connected {
            let message = pb::MasterMessage {
                message: Some(pb::master_message::Message::DestroyVolume(
                    volume.to_proto(key),
                )),
                ..Default::default()
            };
            self.send_to_agent(&volume.agent_id, message);
        } else if let Some(agent) = self.agents.get_mut(&volume.agent_id) {
            agent.pending_destroys.insert(key.clone());
        }
    }

    /// Brings the master's volumes on a registering agent in line with what
    /// the agent has on disk: adopts unknown ones (after a master restart),
    /// destroys those of removed frameworks or destroyed while it was away,
    /// and forgets those it no longer has.
    fn adopt_volumes(&mut self, id: &AgentId, reported: Vec<(VolumeKey, Resources)>) {
        let reported_keys: HashSet<&VolumeKey> = reported.iter().map(|(k, _)| k).collect();
        let vanished: Vec<VolumeKey> = self
            .volumes
            .on_agent(id)
            .filter(|(k, _)| !reported_keys.contains(k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in vanished {
            warn!(agent_id = %id, framework_id = %key.0, volume_id = %key.1, "the agent came back without this persistent volume");
            self.volumes.remove(&key);
            self.dirty.volumes.insert(key);
        }
        let pending = self
            .agents
            .get_mut(id)
            .map(|a| std::mem::take(&mut a.pending_destroys))
            .unwrap_or_default();
        for (key, disk) in reported {
            let volume = Volume::new(id.clone(), disk);
            if pending.contains(&key) || self.removed_frameworks.contains(&key.0) {
                let message = pb::MasterMessage {
                    message: Some(pb::master_message::Message::DestroyVolume(
                        volume.to_proto(&key),
                    )),
                    ..Default::default()
                };
                self.send_to_agent(id, message);
                continue;
            }
            if let Some(known) = self.volumes.get(&key) {
                let elsewhere = known.agent_id.clone();
                if &elsewhere != id {
                    if self
                        .agents
                        .get(&elsewhere)
                        .is_some_and(|a| a.conn.is_some())
                    {
                        warn!(agent_id = %id, framework_id = %key.0, volume_id = %key.1, other = %elsewhere, "a persistent volume with this id is on another live agent; not adopted");
                        continue;
                    }
                    // The same disk under a new agent id (its agent restarted
                    // without recovering its id): it lives here now.
                    let (old_disk, now) = (known.disk.clone(), self.now());
                    self.allocator
                        .recover(&key.0, &elsewhere, &old_disk, None, now);
                }
                if let Some(known) = self.volumes.get_mut(&key) {
                    known.agent_id = id.clone();
                    known.disk = volume.disk;
                }
                self.dirty.volumes.insert(key);
                continue;
            }
            if !self.frameworks.contains_key(&key.0) {
                self.add_recovered_framework(&key.0);
            }
            self.dirty.volumes.insert(key.clone());
            self.volumes.insert(key, volume);
        }
    }

    fn framework_info(&self, fid: &FrameworkId) -> pb::FrameworkInfo {
        self.frameworks
            .get(fid)
            .map(|f| f.info.clone())
            .unwrap_or_default()
    }

    /// Records a task the master is about to send to `agent_id`: STAGING.
    fn insert_staging(
        &mut self,
        fid: &FrameworkId,
        agent_id: &AgentId,
        task: validation::ValidTask,
    ) {
        let status = pb::TaskStatus {
            task_id: task.id.to_string(),
            state: TaskState::TaskStaging as i32,
            source: Source::Master as i32,
            agent_id: agent_id.to_string(),
            framework_id: fid.to_string(),
            timestamp: now_seconds(),
            ..Default::default()
        };
        let key = (fid.clone(), task.id);
        self.insert_task(key, agent_id.clone(), task.info, task.resources, status);
    }

    fn insert_task(
        &mut self,
        key: TaskKey,
        agent_id: AgentId,
        info: pb::TaskInfo,
        resources: Resources,
        status: pb::TaskStatus,
    ) {
        if let Some(agent) = self.agents.get_mut(&agent_id) {
            agent.tasks.insert(key.clone());
        }
        if let Some(fw) = self.frameworks.get_mut(&key.0) {
            fw.tasks.insert(key.1.clone());
        }
        self.dirty.tasks.insert(key.clone());
        self.tasks.insert(
            key,
            Task {
                agent_id,
                info,
                resources,
                status,
                terminal_uuid: None,
                released: false,
                usage: None,
            },
        );
    }

    /// A task refused before launch: the framework is told, no state changes.
    fn reject_task(
        &mut self,
        fid: &FrameworkId,
        info: &pb::TaskInfo,
        state: TaskState,
        reason: Reason,
        message: &str,
    ) {
        self.metrics
            .terminal(state_name(state), reason_name(reason));
        self.send_update(pb::TaskStatus {
            task_id: info.task_id.clone(),
            state: state as i32,
            source: Source::Master as i32,
            reason: reason as i32,
            message: message.to_string(),
            agent_id: info.agent_id.clone(),
            framework_id: fid.to_string(),
            timestamp: now_seconds(),
            ..Default::default()
        });
    }

    fn decline(&mut self, fid: &FrameworkId, r: pb::DeclineRequest) -> Result<(), Status> {
        let refuse = validation::refuse_seconds(r.filters.as_ref(), self.config.default_refuse)
            .map_err(invalid)?;
        let mut ids = Vec::with_capacity(r.offer_ids.len());
        for (i, o) in r.offer_ids.iter().enumerate() {
            let id =
                OfferId::parse(o, &format!("offer_ids[{i}]")).map_err(|e| invalid(e.into()))?;
            if let Some(offer) = self.offers.get(&id)
                && &offer.framework_id != fid
            {
                return Err(Status::permission_denied(format!(
                    "offer_ids[{i}]: offer {id} belongs to another framework"
                )));
            }
            ids.push(id);
        }
        let now = self.now();
        for id in ids {
            // Unknown offers were rescinded or timed out meanwhile: nothing to do.
            if let Some(o) = self.take_offer(&id) {
                self.allocator
                    .recover(fid, &o.agent_id, &o.resources, Some(refuse), now);
                self.metrics.offers("declined", 1);
            }
        }
        self.allocation_pending = true;
        Ok(())
    }

    fn kill(&mut self, fid: &FrameworkId, r: pb::KillRequest) -> Result<(), Status> {
        let tid = TaskId::parse(&r.task_id, "task_id").map_err(|e| invalid(e.into()))?;
        if !r.agent_id.is_empty() {
            AgentId::parse(&r.agent_id, "agent_id").map_err(|e| invalid(e.into()))?;
        }
        if let Some(g) = r.kill_grace_period_seconds {
            validation::seconds(g, "kill_grace_period_seconds").map_err(invalid)?;
        }
        let key = (fid.clone(), tid.clone());
        let Some(task) = self.tasks.get(&key) else {
            // Another framework's task with this id is not visible here: the
            // caller only ever sees its own namespace.
            self.send_update(pb::TaskStatus {
                task_id: tid.to_string(),
                state: TaskState::TaskUnknown as i32,
                source: Source::Master as i32,
                reason: Reason::TaskUnknown as i32,
                message: "kill: the master does not know this task".into(),
                agent_id: r.agent_id.clone(),
                framework_id: fid.to_string(),
                timestamp: now_seconds(),
                ..Default::default()
            });
            return Ok(());
        };
        if !r.agent_id.is_empty() && r.agent_id != task.agent_id.as_str() {
            return Err(Status::invalid_argument(format!(
                "agent_id: task {tid} runs on agent {}, not {}",
                task.agent_id, r.agent_id
            )));
        }
        if is_terminal(task.state()) {
            return Ok(());
        }
        let agent_id = task.agent_id.clone();
        let Some(agent) = self.agents.get_mut(&agent_id) else {
            return Ok(());
        };
        agent.pending_kills.insert(key, r.kill_grace_period_seconds);
        if agent.conn.is_some() {
            self.send_to_agent(
                &agent_id,
                kill_message(fid, &tid, r.kill_grace_period_seconds),
            );
        }
        Ok(())
    }

    fn acknowledge(&mut self, fid: &FrameworkId, r: pb::AcknowledgeRequest) -> Result<(), Status> {
        let aid = AgentId::parse(&r.agent_id, "agent_id").map_err(|e| invalid(e.into()))?;
        let tid = TaskId::parse(&r.task_id, "task_id").map_err(|e| invalid(e.into()))?;
        if r.uuid.len() != 16 {
            return Err(Status::invalid_argument("uuid: must be 16 bytes"));
        }
        if !self.agents.contains_key(&aid) {
            return Err(Status::not_found(format!(
                "agent_id: agent {aid} is unknown"
            )));
        }
        let key = (fid.clone(), tid.clone());
        let retire = self
            .tasks
            .get(&key)
            .is_some_and(|t| t.agent_id == aid && t.terminal_uuid.as_deref() == Some(&r.uuid[..]));
        if retire {
            self.retire_task(&key);
        }
        // The agent matches framework, task and uuid, and this is always the
        // caller's framework id: nobody can acknowledge another's updates.
        self.send_to_agent(&aid, ack_message(fid, &tid, r.uuid));
        Ok(())
    }

    fn reconcile(&mut self, fid: &FrameworkId, r: pb::ReconcileRequest) -> Result<(), Status> {
        let mut statuses = Vec::new();
        if r.tasks.is_empty() {
            let fw_tasks: Vec<TaskId> = self
                .frameworks
                .get(fid)
                .map(|f| f.tasks.iter().cloned().collect())
                .unwrap_or_default();
            for tid in fw_tasks {
                if let Some(t) = self.tasks.get(&(fid.clone(), tid)) {
                    statuses.push(self.reconciled(t));
                }
            }
        } else {
            let mut keys = Vec::with_capacity(r.tasks.len());
            for (i, t) in r.tasks.iter().enumerate() {
                let tid = TaskId::parse(&t.task_id, &format!("tasks[{i}].task_id"))
                    .map_err(|e| invalid(e.into()))?;
                if !t.agent_id.is_empty() {
                    AgentId::parse(&t.agent_id, &format!("tasks[{i}].agent_id"))
                        .map_err(|e| invalid(e.into()))?;
                }
                keys.push((tid, t.agent_id.clone()));
            }
            for (tid, agent_id) in keys {
                match self.tasks.get(&(fid.clone(), tid.clone())) {
                    Some(t) => statuses.push(self.reconciled(t)),
                    None => statuses.push(pb::TaskStatus {
                        task_id: tid.to_string(),
                        state: TaskState::TaskUnknown as i32,
                        source: Source::Master as i32,
                        reason: Reason::Reconciliation as i32,
                        message: "the master does not know this task".into(),
                        agent_id,
                        framework_id: fid.to_string(),
                        timestamp: now_seconds(),
                        ..Default::default()
                    }),
                }
            }
        }
        for s in statuses {
            self.send_update(s);
        }
        Ok(())
    }

    // ----------------------------------------------------------------- tasks

    fn status_update(&mut self, agent_id: &AgentId, update: pb::StatusUpdate) {
        self.metrics.status_update();
        let Some(mut status) = update.status else {
            return;
        };
        let (Ok(fid), Ok(tid)) = (
            FrameworkId::parse(&update.framework_id, "framework_id"),
            TaskId::parse(&status.task_id, "status.task_id"),
        ) else {
            warn!(agent_id = %agent_id, "dropping a status update with invalid ids");
            return;
        };
        status.framework_id = fid.to_string();
        status.agent_id = agent_id.to_string();
        if self.removed_frameworks.contains(&fid) {
            // Nobody will acknowledge it: do it for the framework, or the
            // agent retries forever.
            self.send_to_agent(agent_id, ack_message(&fid, &tid, status.uuid.clone()));
            return;
        }
        let key = (fid.clone(), tid);
        let new_state = status.state();
        let mut recovered = None;
        if let Some(task) = self.tasks.get_mut(&key) {
            if &task.agent_id != agent_id {
                warn!(agent_id = %agent_id, task_id = %key.1, "update from an agent that does not run this task");
                return;
            }
            if !is_terminal(task.state()) {
                if is_terminal(new_state) {
                    task.terminal_uuid = Some(status.uuid.clone());
                    recovered = Some(task.holds_resources().then(|| task.resources.clone()));
                }
                task.status = status.clone();
                self.dirty.tasks.insert(key.clone());
            }
        }
        if let Some(resources) = recovered {
            if let Some(resources) = resources {
                let now = self.now();
                self.allocator
                    .recover(&fid, agent_id, &resources, None, now);
                self.allocation_pending = true;
            }
            self.metrics
                .terminal(state_name(new_state), reason_name(status.reason()));
        }
        self.send_update(status);
    }

    /// The agent's early word that a task ended: its final update waits
    /// behind an unacknowledged one. Frees the resources now; the task's
    /// state changes when that update arrives.
    fn task_ended(&mut self, agent_id: &AgentId, ended: &pb::TaskEnded) {
        let (Ok(fid), Ok(tid)) = (
            FrameworkId::parse(&ended.framework_id, "task_ended.framework_id"),
            TaskId::parse(&ended.task_id, "task_ended.task_id"),
        ) else {
            warn!(agent_id = %agent_id, "dropping a task-ended notice with invalid ids");
            return;
        };
        if !is_terminal(ended.state()) {
            warn!(agent_id = %agent_id, task_id = %tid, "dropping a task-ended notice with a live state");
            return;
        }
        let Some(task) = self.tasks.get_mut(&(fid.clone(), tid)) else {
            return;
        };
        if &task.agent_id != agent_id || !task.holds_resources() {
            return;
        }
        task.released = true;
        let resources = task.resources.clone();
        let now = self.now();
        self.allocator
            .recover(&fid, agent_id, &resources, None, now);
        self.allocation_pending = true;
    }

    /// A master-generated update: changes the task's state and tells the
    /// framework (no uuid; needs no acknowledgement).
    fn master_update(&mut self, key: &TaskKey, state: TaskState, reason: Reason, message: &str) {
        let Some(task) = self.tasks.get_mut(key) else {
            return;
        };
        let status = pb::TaskStatus {
            task_id: key.1.to_string(),
            state: state as i32,
            source: Source::Master as i32,
            reason: reason as i32,
            message: message.to_string(),
            agent_id: task.agent_id.to_string(),
            framework_id: key.0.to_string(),
            timestamp: now_seconds(),
            exit_code: None,
            started_at: task.status.started_at,
            pod: task.status.pod.clone(),
            restart_count: task.status.restart_count,
            ..Default::default()
        };
        task.status = status.clone();
        self.dirty.tasks.insert(key.clone());
        let terminal = is_terminal(state);
        let (agent_id, resources) = (task.agent_id.clone(), task.resources.clone());
        let holds = !task.released;
        if terminal {
            let now = self.now();
            if holds {
                self.allocator
                    .recover(&key.0, &agent_id, &resources, None, now);
            }
            self.metrics
                .terminal(state_name(state), reason_name(reason));
            self.retire_task(key);
            self.allocation_pending = true;
        }
        self.send_update(status);
    }

    /// Moves a terminal, acknowledged task to the completed list.
    fn retire_task(&mut self, key: &TaskKey) {
        let Some(task) = self.tasks.remove(key) else {
            return;
        };
        self.dirty.tasks.insert(key.clone());
        if let Some(agent) = self.agents.get_mut(&task.agent_id) {
            agent.tasks.remove(key);
            agent.pending_kills.remove(key);
        }
        if let Some(fw) = self.frameworks.get_mut(&key.0) {
            fw.tasks.remove(&key.1);
        }
        self.push_completed(&task, &task.status);
    }

    fn push_completed(&mut self, task: &Task, status: &pb::TaskStatus) {
        if self.config.max_completed_tasks == 0 {
            return;
        }
        while self.completed.len() >= self.config.max_completed_tasks {
            self.completed.pop_front();
        }
        self.completed.push_back(task_json(task, status));
    }

    // ---------------------------------------------------------------- /state

    fn snapshot(&self) -> StateSnapshot {
        let mut used_by_agent: HashMap<&AgentId, Resources> = HashMap::new();
        let mut used_by_fw: HashMap<&FrameworkId, Resources> = HashMap::new();
        for ((fid, _), t) in &self.tasks {
            if t.holds_resources() {
                used_by_agent
                    .entry(&t.agent_id)
                    .or_default()
                    .add(&t.resources);
                used_by_fw.entry(fid).or_default().add(&t.resources);
            }
        }
        let mut volumes = Vec::new();
        for (key, v) in self.volumes.sorted() {
            used_by_agent.entry(&v.agent_id).or_default().add(&v.disk);
            used_by_fw.entry(&key.0).or_default().add(&v.disk);
            let proto = v.to_proto(key);
            volumes.push(state::VolumeState {
                id: proto.id,
                framework_id: proto.framework_id,
                agent_id: proto.agent_id,
                disk_mib: proto.disk_mib,
                in_use_by: self.volume_user(key).map(ToString::to_string),
            });
        }
        let mut offered_by_agent: HashMap<&AgentId, Resources> = HashMap::new();
        let mut offered_by_fw: HashMap<&FrameworkId, Resources> = HashMap::new();
        for o in self.offers.values() {
            offered_by_agent
                .entry(&o.agent_id)
                .or_default()
                .add(&o.resources);
            offered_by_fw
                .entry(&o.framework_id)
                .or_default()
                .add(&o.resources);
        }
        let empty = Resources::default();
        let mut agents: Vec<state::AgentState> = self
            .agents
            .values()
            .map(|a| state::AgentState {
                id: a.id.to_string(),
                hostname: a.info.hostname.clone(),
                address: a.info.address.clone(),
                state: a.state_name().into(),
                resources: ResourcesJson::from(&a.total),
                used_resources: ResourcesJson::from(used_by_agent.get(&a.id).unwrap_or(&empty)),
                offered_resources: ResourcesJson::from(
                    offered_by_agent.get(&a.id).unwrap_or(&empty),
                ),
                attributes: a
                    .info
                    .attributes
                    .iter()
                    .map(|x| (x.name.clone(), corral_proto::attributes::value_text(x)))
                    .collect(),
                registered_at: a.registered_at,
                tasks: a.tasks.len(),
            })
            .collect();
        agents.sort_by(|a, b| a.hostname.cmp(&b.hostname).then(a.id.cmp(&b.id)));
        let mut frameworks: Vec<state::FrameworkState> = self
            .frameworks
            .values()
            .map(|f| state::FrameworkState {
                id: f.id.to_string(),
                name: f.info.name.clone(),
                user: f.info.user.clone(),
                role: f.role.clone(),
                hostname: f.info.hostname.clone(),
                state: if f.conn.is_some() {
                    "connected"
                } else {
                    "disconnected"
                }
                .into(),
                suppressed: f.suppressed,
                failover_timeout_seconds: f.failover_timeout.as_secs_f64(),
                registered_at: f.registered_at,
                dominant_share: self.allocator.framework_share(&f.id),
                used_resources: ResourcesJson::from(used_by_fw.get(&f.id).unwrap_or(&empty)),
                offered_resources: ResourcesJson::from(offered_by_fw.get(&f.id).unwrap_or(&empty)),
                tasks: f.tasks.len(),
                offers: f.offers.len(),
            })
            .collect();
        frameworks.sort_by(|a, b| {
            a.registered_at
                .total_cmp(&b.registered_at)
                .then(a.id.cmp(&b.id))
        });
        let mut tasks: Vec<state::TaskState> = self
            .tasks
            .values()
            .map(|t| task_json(t, &t.status))
            .collect();
        tasks.sort_by(|a, b| a.framework_id.cmp(&b.framework_id).then(a.id.cmp(&b.id)));
        StateSnapshot {
            version: env!("CARGO_PKG_VERSION").to_string(),
            timestamp: now_seconds(),
            agents,
            frameworks,
            tasks,
            completed_tasks: self.completed.iter().cloned().collect(),
            volumes,
            gone_agents: self.gone_agents.len(),
            agent_removal_halted: self.removal_halted,
            ..Default::default()
        }
    }
}

fn task_json(task: &Task, status: &pb::TaskStatus) -> state::TaskState {
    state::TaskState {
        id: status.task_id.clone(),
        name: task.info.name.clone(),
        framework_id: status.framework_id.clone(),
        agent_id: task.agent_id.to_string(),
        state: state_name(status.state()).to_string(),
        reason: reason_name(status.reason()).to_string(),
        message: status.message.clone(),
        resources: ResourcesJson::from(&task.resources),
        exit_code: status.exit_code,
        updated_at: status.timestamp,
        usage: task.usage.as_ref().map(state::UsageJson::from),
        healthy: status.healthy,
        ready: status.ready,
        pod_ip: status.pod.as_ref().map(|p| p.ip.clone()),
        restart_count: status.restart_count,
    }
}

impl Master {
    /// The latest status, re-sent for reconciliation. While the task's agent
    /// has not re-registered after a master restart, the state is the last
    /// one recorded and the reason says the agent is recovering: the task is
    /// not lost, the master just has not heard from its agent yet.
    fn reconciled(&self, task: &Task) -> pb::TaskStatus {
        let recovering = self
            .agents
            .get(&task.agent_id)
            .is_some_and(|a| a.recovering);
        let (reason, message) = if recovering {
            (
                Reason::AgentRecovering,
                format!(
                    "agent {} has not re-registered since the master restarted; this is the last state the master recorded",
                    task.agent_id
                ),
            )
        } else {
            (Reason::Reconciliation, task.status.message.clone())
        };
        pb::TaskStatus {
            uuid: Vec::new(),
            source: Source::Master as i32,
            reason: reason as i32,
            message,
            timestamp: now_seconds(),
            ..task.status.clone()
        }
    }
}

/// Metric label of removals of agents unreachable for too long.
const REMOVED_UNREACHABLE: &str = "unreachable";
/// Metric label of removals of agents that registered as their replacement.
const REMOVED_REPLACED: &str = "replaced";

fn shutdown_message(message: &str) -> pb::MasterMessage {
    pb::MasterMessage {
        message: Some(pb::master_message::Message::Shutdown(pb::Shutdown {
            message: message.to_string(),
        })),
        ..Default::default()
    }
}

fn kill_message(fid: &FrameworkId, tid: &TaskId, grace: Option<f64>) -> pb::MasterMessage {
    pb::MasterMessage {
        message: Some(pb::master_message::Message::KillTask(pb::KillTask {
            framework_id: fid.to_string(),
            task_id: tid.to_string(),
            kill_grace_period_seconds: grace,
        })),
        ..Default::default()
    }
}

fn shutdown_framework_message(fid: &FrameworkId) -> pb::MasterMessage {
    pb::MasterMessage {
        message: Some(pb::master_message::Message::ShutdownFramework(
            pb::ShutdownFramework {
                framework_id: fid.to_string(),
            },
        )),
        ..Default::default()
    }
}

fn ack_message(fid: &FrameworkId, tid: &TaskId, uuid: Vec<u8>) -> pb::MasterMessage {
    pb::MasterMessage {
        message: Some(pb::master_message::Message::Acknowledgement(
            pb::StatusAcknowledgement {
                framework_id: fid.to_string(),
                task_id: tid.to_string(),
                uuid,
            },
        )),
        ..Default::default()
    }
}

fn error_event(message: &str) -> pb::Event {
    pb::Event {
        event: Some(pb::event::Event::Error(pb::Error {
            message: message.to_string(),
        })),
        ..Default::default()
    }
}

/// Capacity check helper used by the servers.
pub(crate) fn agent_channel() -> (AgentTx, mpsc::Receiver<Result<pb::MasterMessage, Status>>) {
    mpsc::channel(AGENT_MESSAGE_BUFFER)
}

/// The persistent volumes a pod mounts, as keys of `fid`'s volumes.
fn persistent_volumes(fid: &FrameworkId, group: &pb::TaskGroupInfo) -> Vec<VolumeKey> {
    group
        .volumes
        .iter()
        .filter_map(|v| match &v.source {
            Some(pb::pod_volume::Source::Persistent(id)) => VolumeId::parse(id, "persistent")
                .ok()
                .map(|id| (fid.clone(), id)),
            _ => None,
        })
        .collect()
}
