//! The master's registry: what must survive a master restart. Admitted,
//! unreachable and gone agents; frameworks with their failover timeouts and
//! when they disconnected; removed framework ids; tasks with their latest
//! status; persistent volumes.
//!
//! [`Registry`] is the storage interface; [`EmbeddedRegistry`] keeps it in
//! one redb file in the master's work dir (the default, single master). An
//! etcd backend implements the same two calls.
//!
//! The actor never waits for the store: it collects what changed during one
//! batch of commands and hands the records to [`RegistryWriter`], a
//! dedicated thread that commits everything queued since its previous
//! commit in one transaction (one fsync per burst, as the batch and service
//! frameworks do). So a crash can lose the last few milliseconds of changes;
//! that is safe because agents report their tasks and volumes and frameworks
//! re-subscribe with their ids: what the registry adds is the knowledge of
//! who is *missing* (agents to wait for, failover timeouts to keep running).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use corral_proto::pb;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;
use tracing::error;

/// Bumped when a record's meaning changes incompatibly; a store with another
/// version is refused rather than misread.
pub const FORMAT_VERSION: u32 = 1;
/// The embedded store's file in the master's work dir.
pub const FILE_NAME: &str = "registry.redb";

const META: TableDefinition<'_, &str, u32> = TableDefinition::new("meta");
const AGENTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("agents");
const FRAMEWORKS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("frameworks");
const REMOVED_FRAMEWORKS: TableDefinition<'_, &str, f64> =
    TableDefinition::new("removed_frameworks");
const TASKS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("tasks");
const VOLUMES: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("volumes");
const FORMAT_KEY: &str = "format";
/// In META: the leader epoch, bumped each time a master opens the store.
const EPOCH_KEY: &str = "epoch";
const IDENTITY: TableDefinition<'_, &str, &str> = TableDefinition::new("identity");
const REGISTRY_ID_KEY: &str = "registry_id";

/// The fencing token a leading master stamps on every message: the
/// registry it leads (so epochs of two clusters never compare) and its
/// epoch there, which grows with every election or restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fence {
    pub registry_id: String,
    pub epoch: u64,
}

impl Fence {
    /// For a master without a registry (no work dir): nothing to fence
    /// across restarts, so a fresh id each time.
    pub fn ephemeral() -> Self {
        Self {
            registry_id: uuid::Uuid::new_v4().simple().to_string(),
            epoch: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry {path}: cannot open: {message}")]
    Open { path: PathBuf, message: String },
    #[error("registry {path}: {message}")]
    Storage { path: PathBuf, message: String },
    #[error("registry {path}: record {key}: {message}")]
    Corrupt {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// A record that decodes but does not make sense (the master's own
    /// validation refuses it).
    #[error("registry record {key}: {message}")]
    Invalid { key: String, message: String },
    #[error(
        "registry {path}: format version {found} is not the supported {FORMAT_VERSION}; \
         written by another Corral version"
    )]
    UnknownFormat { path: PathBuf, found: u32 },
    /// Another master was elected: this one's writes are refused.
    #[error("registry {path}: this master (epoch {epoch}) is no longer the leader")]
    Deposed { path: PathBuf, epoch: u64 },
}

/// Where an agent stands. Stored as a number; an unknown one is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentPhase {
    /// Registered and, as far as the master last knew, connected.
    Admitted = 1,
    /// Cut off; its tasks are TASK_UNREACHABLE.
    Unreachable = 2,
    /// Removed: never admitted again under this id.
    Gone = 3,
}

impl AgentPhase {
    fn from_u32(n: u32) -> Option<Self> {
        match n {
            1 => Some(Self::Admitted),
            2 => Some(Self::Unreachable),
            3 => Some(Self::Gone),
            _ => None,
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AgentRecord {
    /// With the agent's total resources and attributes.
    #[prost(message, optional, tag = "1")]
    pub info: Option<pb::AgentInfo>,
    /// An [`AgentPhase`].
    #[prost(uint32, tag = "2")]
    pub phase: u32,
    /// Unix seconds when it became unreachable (Unreachable) or was removed
    /// (Gone); 0 otherwise.
    #[prost(double, tag = "3")]
    pub since: f64,
    #[prost(double, tag = "4")]
    pub registered_at: f64,
}

impl AgentRecord {
    pub fn phase(&self) -> Option<AgentPhase> {
        AgentPhase::from_u32(self.phase)
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FrameworkRecord {
    /// With the failover timeout and the role.
    #[prost(message, optional, tag = "1")]
    pub info: Option<pb::FrameworkInfo>,
    /// Unix seconds when it disconnected; absent while connected.
    #[prost(double, optional, tag = "2")]
    pub disconnected_at: Option<f64>,
    #[prost(double, tag = "3")]
    pub registered_at: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TaskRecord {
    #[prost(string, tag = "1")]
    pub agent_id: String,
    #[prost(message, optional, tag = "2")]
    pub info: Option<pb::TaskInfo>,
    /// The latest status the master recorded.
    #[prost(message, optional, tag = "3")]
    pub status: Option<pb::TaskStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeRecord {
    #[prost(string, tag = "1")]
    pub agent_id: String,
    #[prost(double, tag = "2")]
    pub disk_mib: f64,
}

/// One change; `None` deletes the record.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Agent(String, Option<AgentRecord>),
    Framework(String, Option<FrameworkRecord>),
    /// A framework id that stays refused, with when it was removed.
    RemovedFramework(String, f64),
    /// Boxed: a task record is far larger than the others.
    Task((String, String), Option<Box<TaskRecord>>),
    Volume((String, String), Option<VolumeRecord>),
}

/// Which record a change is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RecordKey {
    Agent(String),
    Framework(String),
    RemovedFramework(String),
    Task(String, String),
    Volume(String, String),
}

impl Change {
    fn key(&self) -> RecordKey {
        match self {
            Change::Agent(id, _) => RecordKey::Agent(id.clone()),
            Change::Framework(id, _) => RecordKey::Framework(id.clone()),
            Change::RemovedFramework(id, _) => RecordKey::RemovedFramework(id.clone()),
            Change::Task((f, t), _) => RecordKey::Task(f.clone(), t.clone()),
            Change::Volume((f, v), _) => RecordKey::Volume(f.clone(), v.clone()),
        }
    }
}

/// Keeps the last change of each record: each change is the whole record
/// (or its deletion), so the earlier ones need not be written at all.
fn coalesce(changes: Vec<Change>) -> Vec<Change> {
    let mut at: HashMap<RecordKey, usize> = HashMap::with_capacity(changes.len());
    let mut out: Vec<Change> = Vec::with_capacity(changes.len());
    for change in changes {
        match at.entry(change.key()) {
            Entry::Occupied(e) => out[*e.get()] = change,
            Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(change);
            }
        }
    }
    out
}

/// Everything stored, as read back at recovery.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stored {
    pub agents: Vec<(String, AgentRecord)>,
    pub frameworks: Vec<(String, FrameworkRecord)>,
    pub removed_frameworks: Vec<(String, f64)>,
    pub tasks: Vec<((String, String), TaskRecord)>,
    pub volumes: Vec<((String, String), VolumeRecord)>,
}

/// A registry backend. Both calls block (disk or network I/O): the master
/// calls them on the blocking pool or its writer thread, never on the actor.
pub trait Registry: Send + Sync + 'static {
    /// Everything stored. A record that does not decode is an error naming
    /// it: guessing would lose or invent state.
    fn load(&self) -> Result<Stored, RegistryError>;
    /// Applies `changes` durably, in order (a later change to one record
    /// wins); each record changes atomically (etcd splits a large batch
    /// into several transactions). Refused with `Deposed` once another
    /// master leads.
    fn apply(&self, changes: &[Change]) -> Result<(), RegistryError>;
    /// This master's fencing token in this registry (its epoch grows
    /// with every election or restart).
    fn fence(&self) -> Fence;
}

/// The default backend: one redb file (commits fsync).
pub struct EmbeddedRegistry {
    db: Database,
    path: PathBuf,
    fence: Fence,
}

impl EmbeddedRegistry {
    /// Opens (or creates) `<dir>/registry.redb`.
    pub fn open(dir: &Path) -> Result<Self, RegistryError> {
        let path = dir.join(FILE_NAME);
        let fail = |message: String| RegistryError::Open {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        let db = Database::create(&path).map_err(|e| fail(e.to_string()))?;
        let mut registry = Self {
            db,
            path,
            fence: Fence::default(),
        };
        let found = registry.format()?;
        match found {
            None => registry.write(|txn| {
                txn.open_table(META)?.insert(FORMAT_KEY, FORMAT_VERSION)?;
                txn.open_table(AGENTS)?;
                txn.open_table(FRAMEWORKS)?;
                txn.open_table(REMOVED_FRAMEWORKS)?;
                txn.open_table(TASKS)?;
                txn.open_table(VOLUMES)?;
                Ok(())
            })?,
            Some(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(RegistryError::UnknownFormat {
                    path: registry.path.clone(),
                    found,
                });
            }
        }
        registry.fence = registry.next_fence()?;
        Ok(registry)
    }

    /// Bumps the stored epoch (one master per store: each open is a new
    /// leadership) and reads, or creates, the registry's id.
    fn next_fence(&self) -> Result<Fence, RegistryError> {
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let epoch = meta.get(EPOCH_KEY)?.map_or(0, |v| v.value()) + 1;
            meta.insert(EPOCH_KEY, epoch)?;
            let mut identity = txn.open_table(IDENTITY)?;
            let stored = identity
                .get(REGISTRY_ID_KEY)?
                .map(|v| v.value().to_string());
            let registry_id = match stored {
                Some(id) => id,
                None => {
                    let id = uuid::Uuid::new_v4().simple().to_string();
                    identity.insert(REGISTRY_ID_KEY, id.as_str())?;
                    id
                }
            };
            Ok(Fence {
                registry_id,
                epoch: u64::from(epoch),
            })
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn storage(&self, e: impl ToString) -> RegistryError {
        RegistryError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn corrupt(&self, key: String, e: impl ToString) -> RegistryError {
        RegistryError::Corrupt {
            path: self.path.clone(),
            key,
            message: e.to_string(),
        }
    }

    fn format(&self) -> Result<Option<u32>, RegistryError> {
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.storage(e)),
        };
        let value = table.get(FORMAT_KEY).map_err(|e| self.storage(e))?;
        Ok(value.map(|v| v.value()))
    }

    fn write<T>(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, RegistryError> {
        let txn = self.db.begin_write().map_err(|e| self.storage(e))?;
        let out = body(&txn).map_err(|e| self.storage(e))?;
        txn.commit().map_err(|e| self.storage(e))?;
        Ok(out)
    }

    /// Raw write access for tests that plant bad records.
    #[cfg(test)]
    fn write_raw(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), RegistryError> {
        self.write(body)
    }
}

fn decode<M: Message + Default>(
    registry: &EmbeddedRegistry,
    key: String,
    bytes: &[u8],
) -> Result<M, RegistryError> {
    M::decode(bytes).map_err(|e| registry.corrupt(key, e))
}

impl Registry for EmbeddedRegistry {
    fn fence(&self) -> Fence {
        self.fence.clone()
    }

    fn load(&self) -> Result<Stored, RegistryError> {
        let txn = self.db.begin_read().map_err(|e| self.storage(e))?;
        let mut out = Stored::default();
        let agents = txn.open_table(AGENTS).map_err(|e| self.storage(e))?;
        for item in agents.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let key = format!("agents/{}", k.value());
            let record: AgentRecord = decode(self, key.clone(), v.value())?;
            if record.phase().is_none() {
                return Err(self.corrupt(key, format!("unknown agent phase {}", record.phase)));
            }
            out.agents.push((k.value().to_string(), record));
        }
        let frameworks = txn.open_table(FRAMEWORKS).map_err(|e| self.storage(e))?;
        for item in frameworks.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let key = format!("frameworks/{}", k.value());
            out.frameworks
                .push((k.value().to_string(), decode(self, key, v.value())?));
        }
        let removed = txn
            .open_table(REMOVED_FRAMEWORKS)
            .map_err(|e| self.storage(e))?;
        for item in removed.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            out.removed_frameworks
                .push((k.value().to_string(), v.value()));
        }
        let tasks = txn.open_table(TASKS).map_err(|e| self.storage(e))?;
        for item in tasks.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let (fid, tid) = k.value();
            let key = format!("tasks/{fid}/{tid}");
            out.tasks.push((
                (fid.to_string(), tid.to_string()),
                decode(self, key, v.value())?,
            ));
        }
        let volumes = txn.open_table(VOLUMES).map_err(|e| self.storage(e))?;
        for item in volumes.iter().map_err(|e| self.storage(e))? {
            let (k, v) = item.map_err(|e| self.storage(e))?;
            let (fid, vid) = k.value();
            let key = format!("volumes/{fid}/{vid}");
            out.volumes.push((
                (fid.to_string(), vid.to_string()),
                decode(self, key, v.value())?,
            ));
        }
        Ok(out)
    }

    fn apply(&self, changes: &[Change]) -> Result<(), RegistryError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.write(|txn| {
            let mut agents = txn.open_table(AGENTS)?;
            let mut frameworks = txn.open_table(FRAMEWORKS)?;
            let mut removed = txn.open_table(REMOVED_FRAMEWORKS)?;
            let mut tasks = txn.open_table(TASKS)?;
            let mut volumes = txn.open_table(VOLUMES)?;
            for change in changes {
                match change {
                    Change::Agent(id, Some(r)) => {
                        agents.insert(id.as_str(), r.encode_to_vec().as_slice())?;
                    }
                    Change::Agent(id, None) => {
                        agents.remove(id.as_str())?;
                    }
                    Change::Framework(id, Some(r)) => {
                        frameworks.insert(id.as_str(), r.encode_to_vec().as_slice())?;
                    }
                    Change::Framework(id, None) => {
                        frameworks.remove(id.as_str())?;
                    }
                    Change::RemovedFramework(id, at) => {
                        removed.insert(id.as_str(), *at)?;
                    }
                    Change::Task((f, t), Some(r)) => {
                        tasks.insert((f.as_str(), t.as_str()), r.encode_to_vec().as_slice())?;
                    }
                    Change::Task((f, t), None) => {
                        tasks.remove((f.as_str(), t.as_str()))?;
                    }
                    Change::Volume((f, v), Some(r)) => {
                        volumes.insert((f.as_str(), v.as_str()), r.encode_to_vec().as_slice())?;
                    }
                    Change::Volume((f, v), None) => {
                        volumes.remove((f.as_str(), v.as_str()))?;
                    }
                }
            }
            Ok(())
        })
    }
}

/// The dedicated thread that commits the actor's changes: group commit.
/// Commits are at least [`MIN_COMMIT_INTERVAL`] apart; what queues in
/// between goes into the next one, with only the last change of each
/// record written. A short batch task (staged, running, finished and
/// forgotten within the interval) then costs a fraction of a commit
/// instead of four; a crash of the master loses at most the interval's
/// changes, which agents and frameworks restate when they re-register.
pub(crate) struct RegistryWriter {
    tx: Option<std_mpsc::Sender<Vec<Change>>>,
    thread: Option<JoinHandle<()>>,
}

/// Bound on changes per commit, so one huge backlog does not become one
/// transaction that holds everything in memory twice.
const MAX_CHANGES_PER_COMMIT: usize = 100_000;
/// Least time between two commits. Measured with `bench/batch-vs-slurm.sh`:
/// committing each batch of the actor as it came doubled the master's CPU
/// time in a batch workload.
pub(crate) const MIN_COMMIT_INTERVAL: Duration = Duration::from_millis(50);

impl RegistryWriter {
    /// Starts the thread. `failed` fires once, with the error, if a commit
    /// fails; the thread stops then (the master must not go on acting on
    /// state it cannot persist).
    pub(crate) fn start(
        registry: Box<dyn Registry>,
        failed: oneshot::Sender<RegistryError>,
        committed: impl Fn(usize, f64) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::channel::<Vec<Change>>();
        let thread = std::thread::Builder::new()
            .name("corral-registry".into())
            .spawn(move || {
                // Ends when the actor drops the sender and the queue is empty.
                let mut last_commit: Option<Instant> = None;
                while let Ok(first) = rx.recv() {
                    if let Some(last) = last_commit {
                        let next = last + MIN_COMMIT_INTERVAL;
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                    let mut changes = first;
                    while changes.len() < MAX_CHANGES_PER_COMMIT {
                        match rx.try_recv() {
                            Ok(more) => changes.extend(more),
                            Err(_) => break,
                        }
                    }
                    let changes = coalesce(changes);
                    let started = Instant::now();
                    last_commit = Some(started);
                    if let Err(e) = registry.apply(&changes) {
                        error!("registry commit failed: {e}");
                        let _ = failed.send(e);
                        return;
                    }
                    committed(changes.len(), started.elapsed().as_secs_f64());
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn send(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx {
            // A closed channel means the thread stopped on an error, which
            // it reported through `failed`.
            let _ = tx.send(changes);
        }
    }

    /// Commits what is queued and waits for the thread (blocking: call it
    /// from the blocking pool).
    pub(crate) fn finish(mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, phase: AgentPhase) -> AgentRecord {
        AgentRecord {
            info: Some(pb::AgentInfo {
                id: id.into(),
                hostname: "h".into(),
                ..Default::default()
            }),
            phase: phase as u32,
            since: 12.5,
            registered_at: 1.0,
        }
    }

    #[test]
    fn only_the_last_change_of_each_record_is_written() {
        let task = |state: pb::TaskState| {
            Some(Box::new(TaskRecord {
                agent_id: "a1".into(),
                info: None,
                status: Some(pb::TaskStatus {
                    state: state as i32,
                    ..Default::default()
                }),
            }))
        };
        let key = |t: &str| ("f1".to_string(), t.to_string());
        let changes = vec![
            Change::Task(key("a"), task(pb::TaskState::TaskStaging)),
            Change::Agent("x".into(), Some(agent("x", AgentPhase::Admitted))),
            Change::Task(key("a"), task(pb::TaskState::TaskRunning)),
            Change::Task(key("b"), task(pb::TaskState::TaskRunning)),
            Change::Task(key("b"), None),
            Change::Agent("x".into(), Some(agent("x", AgentPhase::Unreachable))),
        ];
        assert_eq!(
            coalesce(changes),
            vec![
                Change::Task(key("a"), task(pb::TaskState::TaskRunning)),
                Change::Agent("x".into(), Some(agent("x", AgentPhase::Unreachable))),
                Change::Task(key("b"), None),
            ]
        );
    }

    #[test]
    fn every_record_kind_survives_a_reopen_and_deletes_stick() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskRecord {
            agent_id: "a1".into(),
            info: Some(pb::TaskInfo {
                task_id: "t1".into(),
                name: "t".into(),
                ..Default::default()
            }),
            status: Some(pb::TaskStatus {
                task_id: "t1".into(),
                state: pb::TaskState::TaskRunning as i32,
                ..Default::default()
            }),
        };
        let fw = FrameworkRecord {
            info: Some(pb::FrameworkInfo {
                id: "f1".into(),
                name: "f".into(),
                failover_timeout_seconds: 60.0,
                ..Default::default()
            }),
            disconnected_at: Some(100.0),
            registered_at: 50.0,
        };
        {
            let r = EmbeddedRegistry::open(dir.path()).unwrap();
            r.apply(&[
                Change::Agent("a1".into(), Some(agent("a1", AgentPhase::Admitted))),
                Change::Agent("a2".into(), Some(agent("a2", AgentPhase::Gone))),
                Change::Agent("a3".into(), Some(agent("a3", AgentPhase::Admitted))),
                Change::Framework("f1".into(), Some(fw.clone())),
                Change::RemovedFramework("f0".into(), 7.0),
                Change::Task(("f1".into(), "t1".into()), Some(Box::new(task.clone()))),
                Change::Task(("f1".into(), "t2".into()), Some(Box::new(task.clone()))),
                Change::Volume(
                    ("f1".into(), "v".into()),
                    Some(VolumeRecord {
                        agent_id: "a1".into(),
                        disk_mib: 64.0,
                    }),
                ),
            ])
            .unwrap();
            // A later change in the same batch wins; deletes remove.
            r.apply(&[
                Change::Agent("a3".into(), Some(agent("a3", AgentPhase::Unreachable))),
                Change::Agent("a3".into(), None),
                Change::Task(("f1".into(), "t2".into()), None),
            ])
            .unwrap();
        }
        let r = EmbeddedRegistry::open(dir.path()).unwrap();
        let s = r.load().unwrap();
        assert_eq!(
            s.agents,
            vec![
                ("a1".to_string(), agent("a1", AgentPhase::Admitted)),
                ("a2".to_string(), agent("a2", AgentPhase::Gone)),
            ]
        );
        assert_eq!(s.frameworks, vec![("f1".to_string(), fw)]);
        assert_eq!(s.removed_frameworks, vec![("f0".to_string(), 7.0)]);
        assert_eq!(s.tasks, vec![(("f1".to_string(), "t1".to_string()), task)]);
        assert_eq!(s.volumes.len(), 1);
        assert_eq!(s.volumes[0].1.disk_mib, 64.0);
    }

    #[test]
    fn each_open_is_a_new_epoch_of_the_same_registry() {
        let dir = tempfile::tempdir().unwrap();
        let first = EmbeddedRegistry::open(dir.path()).unwrap().fence();
        let second = EmbeddedRegistry::open(dir.path()).unwrap().fence();
        assert_eq!((first.epoch, second.epoch), (1, 2));
        assert_eq!(first.registry_id, second.registry_id);
        assert_eq!(first.registry_id.len(), 32);
        let other = tempfile::tempdir().unwrap();
        let elsewhere = EmbeddedRegistry::open(other.path()).unwrap().fence();
        assert_ne!(elsewhere.registry_id, first.registry_id);
        assert_eq!(elsewhere.epoch, 1);
    }

    #[test]
    fn a_corrupt_record_is_named_by_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let r = EmbeddedRegistry::open(dir.path()).unwrap();
        r.write_raw(|txn| {
            txn.open_table(TASKS)?
                .insert(("f1", "t9"), [0xffu8, 0xff, 0xff].as_slice())?;
            Ok(())
        })
        .unwrap();
        let e = r.load().expect_err("a corrupt task must fail the load");
        let text = e.to_string();
        assert!(text.contains("tasks/f1/t9"), "{text}");
        assert!(text.contains(FILE_NAME), "{text}");
    }

    #[test]
    fn an_unknown_agent_phase_is_refused_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let r = EmbeddedRegistry::open(dir.path()).unwrap();
        let mut bad = agent("a7", AgentPhase::Admitted);
        bad.phase = 42;
        r.apply(&[Change::Agent("a7".into(), Some(bad))]).unwrap();
        let e = r.load().expect_err("phase 42 must fail the load");
        assert!(e.to_string().contains("agents/a7"), "{e}");
        assert!(e.to_string().contains("phase 42"), "{e}");
    }

    #[test]
    fn a_store_of_another_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = EmbeddedRegistry::open(dir.path()).unwrap();
            r.write_raw(|txn| {
                txn.open_table(META)?.insert(FORMAT_KEY, 99)?;
                Ok(())
            })
            .unwrap();
        }
        let e = EmbeddedRegistry::open(dir.path())
            .err()
            .expect("format 99 must be refused");
        assert!(
            matches!(e, RegistryError::UnknownFormat { found: 99, .. }),
            "{e}"
        );
    }

    #[test]
    fn the_writer_commits_every_queued_batch_before_it_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let r = EmbeddedRegistry::open(dir.path()).unwrap();
        let (failed, mut failed_rx) = oneshot::channel();
        let writer = RegistryWriter::start(Box::new(r), failed, |_, _| {}).unwrap();
        for i in 0..50 {
            writer.send(vec![Change::Agent(
                format!("a{i}"),
                Some(agent(&format!("a{i}"), AgentPhase::Admitted)),
            )]);
        }
        writer.finish();
        assert!(failed_rx.try_recv().is_err(), "no commit failed");
        let r = EmbeddedRegistry::open(dir.path()).unwrap();
        assert_eq!(r.load().unwrap().agents.len(), 50);
    }
}
