//! The agent's checkpoint: what a restarted agent needs to come back as the
//! same agent, report its tasks and resend what the frameworks have not
//! acknowledged (Mesos' `src/slave/paths.hpp` and `state.hpp`, one file per
//! task instead of a directory tree per executor run).
//!
//! Layout under `<work_dir>/meta/`:
//! - `lock`: held (`flock`) by the one agent that owns the work dir, for as
//!   long as its checkpoint writer runs; a second agent on the same work
//!   dir waits for it, then fails naming the file.
//! - `agent`: [`pb::AgentCheckpoint`], the agent id and the boot id.
//! - `tasks/<framework_id>/<task_id>`: [`pb::TaskCheckpoint`], the task's
//!   framework and info, state, container and unacknowledged updates.
//! - `corrupt/`: task files that a `--strict=false` agent could not read,
//!   moved aside for a human to look at.
//!
//! Every file is one protobuf message in an envelope: the magic
//! `CORRALCK`, the format version (u32 LE), the payload's length (u32 LE),
//! the payload's SHA-256, the payload. A torn or bit-rotten file is named
//! as corrupt instead of decoding into something plausible.
//!
//! Every write is atomic: a temp file in the same directory, `fdatasync`,
//! `rename`, `fsync` of the directory. Writes run on one thread of their
//! own ([`Checkpointer`]) in batches: whatever the actor queued while the
//! previous batch was being written goes into the next one, later writes of
//! a file replace earlier ones, and each directory is synced once per batch.
//! A large batch (a batch workload: hundreds of tasks a second, four writes
//! each) is written by several threads at once, so the journal commits
//! their `fdatasync`s together: on a 2-core VM, one `fdatasync` after
//! another made batches of ~100 files take ~200 ms and the writer the
//! bottleneck of the agent. (`syncfs(2)` twice per batch was tried too: it
//! also flushes every task's logs and root filesystem on the same disk.)
//! The actor learns which writes are durable from a sequence number, and
//! sends a status update only once the write that holds it is.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use corral_proto::pb;
use corral_proto::{AgentId, FrameworkId, TaskId};
use prost::Message;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

/// The checkpoint format this agent writes and reads. A checkpoint of
/// another version is incompatible: the agent registers as a new one.
pub(crate) const FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"CORRALCK";
/// Magic, version, length, SHA-256.
const HEADER_LEN: usize = 8 + 4 + 4 + 32;
/// A task's info and a handful of updates take a few KiB; anything near
/// this is not a file the agent wrote.
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// Suffix of files being written; a crash can leave them behind.
const TMP_SUFFIX: &str = ".tmp";
/// How long a starting agent waits for the previous owner of the work dir
/// to let go of it (an in-process agent's writer finishing its last batch).
const LOCK_WAIT: Duration = Duration::from_secs(10);
const LOCK_POLL: Duration = Duration::from_millis(20);
/// Most writes in one batch: bounds the time before the first of them is
/// reported durable.
const MAX_BATCH: usize = 4096;
/// From this many files on, a batch writes them on several threads.
const PARALLEL_FROM: usize = 4;
/// Threads a large batch writes on; their `fdatasync`s wait for the same
/// journal commits.
const SYNC_THREADS: usize = 8;

/// Why the checkpoint could not be read or written. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read the boot id from {path}: {source}")]
    BootId {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "corrupt checkpoint file {path}: {reason} (start the agent with --strict=false to skip it and recover the rest)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {path} has format version {found}; this agent reads version {expected}")]
    Incompatible {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("work dir is in use by another agent: {path} is locked")]
    Locked { path: PathBuf },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Wraps a payload in the envelope.
pub(crate) fn seal(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    // Payloads are far below 4 GiB (the actor writes a task's info and
    // updates); a larger one would fail `unseal`'s length check, loudly.
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(payload);
    out
}

/// What an envelope held.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unsealed<'a> {
    /// Intact and of this format version.
    Current(&'a [u8]),
    /// Intact, but of another version: fields this version knows may be
    /// read (field numbers are never reused), nothing else.
    OtherVersion(u32, &'a [u8]),
}

/// Checks an envelope; `Err` says why it is corrupt.
pub(crate) fn unseal(bytes: &[u8]) -> Result<Unsealed<'_>, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    let (header, payload) = bytes.split_at(HEADER_LEN);
    if &header[..8] != MAGIC {
        return Err("not a Corral checkpoint (bad magic)".into());
    }
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let version = word(8);
    let len = word(12) as usize;
    if len != payload.len() {
        return Err(format!(
            "the header says {len} payload bytes, the file has {}",
            payload.len()
        ));
    }
    if len > MAX_PAYLOAD {
        return Err(format!("payload of {len} bytes is implausibly large"));
    }
    if header[16..] != Sha256::digest(payload)[..] {
        return Err("checksum mismatch".into());
    }
    Ok(if version == FORMAT_VERSION {
        Unsealed::Current(payload)
    } else {
        Unsealed::OtherVersion(version, payload)
    })
}

/// Reads one checkpoint file of this version.
fn read_message<M: Message + Default>(path: &Path) -> Result<M, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io_error(path))?;
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    match unseal(&bytes).map_err(corrupt)? {
        Unsealed::Current(payload) => {
            M::decode(payload).map_err(|e| corrupt(format!("cannot decode: {e}")))
        }
        Unsealed::OtherVersion(found, _) => Err(CheckpointError::Incompatible {
            path: path.to_path_buf(),
            found,
            expected: FORMAT_VERSION,
        }),
    }
}

/// Where the checkpoint's files are.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    meta: PathBuf,
}

impl Layout {
    pub(crate) fn new(work_dir: &Path) -> Self {
        Self {
            meta: work_dir.join("meta"),
        }
    }

    pub(crate) fn meta(&self) -> &Path {
        &self.meta
    }

    fn lock(&self) -> PathBuf {
        self.meta.join("lock")
    }

    pub(crate) fn agent(&self) -> PathBuf {
        self.meta.join("agent")
    }

    pub(crate) fn tasks(&self) -> PathBuf {
        self.meta.join("tasks")
    }

    fn corrupt(&self) -> PathBuf {
        self.meta.join("corrupt")
    }

    /// Ids are validated newtypes (no `/`, not `.` or `..`), so the path
    /// stays under `tasks/`.
    pub(crate) fn task(&self, framework_id: &str, task_id: &str) -> PathBuf {
        self.tasks().join(framework_id).join(task_id)
    }
}

/// Reads the machine's boot id (`/proc/sys/kernel/random/boot_id`).
pub(crate) fn read_boot_id(path: &Path) -> Result<String, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::BootId {
        path: path.to_path_buf(),
        source,
    })?;
    let id = text.trim();
    if id.is_empty() {
        return Err(CheckpointError::BootId {
            path: path.to_path_buf(),
            source: std::io::Error::new(ErrorKind::InvalidData, "empty"),
        });
    }
    Ok(id.to_string())
}

/// Takes the work dir's lock, waiting up to `wait` for a previous owner.
fn acquire_lock(layout: &Layout, wait: Duration) -> Result<File, CheckpointError> {
    std::fs::create_dir_all(layout.meta()).map_err(io_error(layout.meta()))?;
    let path = layout.lock();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error(&path))?;
    let deadline = Instant::now() + wait;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(LOCK_POLL);
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(CheckpointError::Locked { path });
            }
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(CheckpointError::Io { path, source });
            }
        }
    }
}

/// What recovery found.
#[derive(Debug)]
pub(crate) struct Recovered {
    /// Come back as this agent: the checkpoint is of this boot and format.
    pub(crate) agent_id: Option<AgentId>,
    /// Register as a new agent that replaces this one (the machine
    /// rebooted, or the checkpoint is of another format).
    pub(crate) replaces_agent_id: Option<String>,
    pub(crate) boot_id: String,
    /// The tasks to recover (empty unless `agent_id` is set).
    pub(crate) tasks: Vec<pb::TaskCheckpoint>,
    /// Files skipped with `--strict=false`, with why.
    pub(crate) skipped: Vec<CheckpointError>,
    /// The work dir's lock, for the writer to hold.
    pub(crate) lock: File,
}

/// Reads the checkpoint in `layout`. With `strict`, a file that cannot be
/// read is an error naming it; without, it is skipped (a task file is moved
/// to `meta/corrupt/`) and the rest is recovered. A checkpoint of another
/// boot or format is dropped: the agent registers as a new one that
/// replaces the old id.
pub(crate) fn recover(
    layout: &Layout,
    boot_id_path: &Path,
    strict: bool,
) -> Result<Recovered, CheckpointError> {
    let lock = acquire_lock(layout, LOCK_WAIT)?;
    let boot_id = read_boot_id(boot_id_path)?;
    let mut skipped = Vec::new();
    let agent_path = layout.agent();
    let (agent_id, replaces) = match read_message::<pb::AgentCheckpoint>(&agent_path) {
        Err(CheckpointError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
            (None, None)
        }
        Err(CheckpointError::Incompatible { found, .. }) => {
            // The agent id is field 1 in every version: the old agent can
            // still be named, so the master marks its tasks gone.
            let old = std::fs::read(&agent_path)
                .ok()
                .and_then(|b| match unseal(&b) {
                    Ok(Unsealed::OtherVersion(_, p)) => pb::AgentCheckpoint::decode(p).ok(),
                    _ => None,
                })
                .map(|a| a.agent_id)
                .filter(|id| !id.is_empty());
            warn!(path = %agent_path.display(), found, expected = FORMAT_VERSION,
                  "checkpoint of another format version; registering as a new agent");
            (None, old)
        }
        Err(e) if strict => return Err(e),
        Err(e) => {
            warn!(error = %e, "unreadable agent checkpoint skipped (--strict=false); registering as a new agent");
            skipped.push(e);
            (None, None)
        }
        Ok(a) => {
            let id = AgentId::parse(&a.agent_id, "agent_checkpoint.agent_id").map_err(|e| {
                CheckpointError::Corrupt {
                    path: agent_path.clone(),
                    reason: e.to_string(),
                }
            });
            match id {
                Ok(id) if a.boot_id == boot_id => (Some(id), None),
                Ok(id) => {
                    info!(agent_id = %id, old_boot_id = %a.boot_id, boot_id = %boot_id,
                          "the machine rebooted since the checkpoint; registering as a new agent");
                    (None, Some(id.to_string()))
                }
                Err(e) if strict => return Err(e),
                Err(e) => {
                    warn!(error = %e, "unreadable agent checkpoint skipped (--strict=false)");
                    skipped.push(e);
                    (None, None)
                }
            }
        }
    };
    let tasks = if agent_id.is_some() {
        read_tasks(layout, strict, &mut skipped)?
    } else {
        // Another boot or format, or no agent: nothing of its tasks is
        // ours to recover.
        remove_tree(&layout.tasks())?;
        Vec::new()
    };
    Ok(Recovered {
        agent_id,
        replaces_agent_id: replaces,
        boot_id,
        tasks,
        skipped,
        lock,
    })
}

fn remove_tree(path: &Path) -> Result<(), CheckpointError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => {
            if let Some(parent) = path.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf)>, CheckpointError> {
    let read = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CheckpointError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in read {
        let entry = entry.map_err(io_error(dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        out.push((name, entry.path()));
    }
    out.sort();
    Ok(out)
}

/// Every task file, checked: intact, of this format, and about the task
/// its path names.
fn read_tasks(
    layout: &Layout,
    strict: bool,
    skipped: &mut Vec<CheckpointError>,
) -> Result<Vec<pb::TaskCheckpoint>, CheckpointError> {
    let mut tasks = Vec::new();
    for (framework, dir) in entries(&layout.tasks())? {
        for (name, path) in entries(&dir)? {
            if name.ends_with(TMP_SUFFIX) {
                // A write the crash interrupted: the file it was to
                // replace (if any) is still whole.
                if let Err(e) = std::fs::remove_file(&path) {
                    warn!(path = %path.display(), error = %e, "cannot remove a leftover temp file");
                }
                continue;
            }
            match read_task(&path, &framework, &name) {
                Ok(task) => tasks.push(task),
                Err(e) if strict => return Err(e),
                Err(e) => {
                    warn!(error = %e, "skipping an unreadable task checkpoint (--strict=false)");
                    move_aside(layout, &path, &framework, &name);
                    skipped.push(e);
                }
            }
        }
    }
    Ok(tasks)
}

fn read_task(
    path: &Path,
    framework: &str,
    name: &str,
) -> Result<pb::TaskCheckpoint, CheckpointError> {
    let task = read_message::<pb::TaskCheckpoint>(path).map_err(|e| match e {
        // Under an agent file of this format, a task file of another one
        // was not written by this agent's format: corrupt, not a reason
        // to drop every other task.
        CheckpointError::Incompatible { path, found, .. } => CheckpointError::Corrupt {
            path,
            reason: format!(
                "format version {found} under an agent checkpoint of version {FORMAT_VERSION}"
            ),
        },
        other => other,
    })?;
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let fw = task.framework.as_ref().map(|f| f.id.as_str()).unwrap_or("");
    let task_id = task.task.as_ref().map(|t| t.task_id.as_str()).unwrap_or("");
    FrameworkId::parse(fw, "task_checkpoint.framework.id").map_err(|e| corrupt(e.to_string()))?;
    TaskId::parse(task_id, "task_checkpoint.task.task_id").map_err(|e| corrupt(e.to_string()))?;
    if fw != framework || task_id != name {
        return Err(corrupt(format!(
            "holds task '{task_id}' of framework '{fw}', not the one its path names"
        )));
    }
    Ok(task)
}

/// Keeps an unreadable task file for a human, out of the way of the next
/// recovery.
fn move_aside(layout: &Layout, path: &Path, framework: &str, name: &str) {
    let dir = layout.corrupt();
    let target = dir.join(format!(
        "{framework}.{name}.{}",
        uuid::Uuid::new_v4().simple()
    ));
    let moved = std::fs::create_dir_all(&dir).and_then(|()| std::fs::rename(path, &target));
    match moved {
        Ok(()) => {
            warn!(from = %path.display(), to = %target.display(), "moved an unreadable task checkpoint aside")
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot move an unreadable task checkpoint aside; removing it");
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes the whole checkpoint: the master removed this agent, so no
/// later start may come back as it.
pub(crate) fn forget(layout: &Layout) -> Result<(), CheckpointError> {
    remove_tree(layout.meta())
}

/// A file of the checkpoint, as the writer names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Agent,
    Task(String, String),
}

#[derive(Debug)]
enum Op {
    Put(Vec<u8>),
    Remove,
}

/// The writer's metrics.
#[derive(Clone)]
pub(crate) struct WriterMetrics {
    /// Seconds per batch.
    pub(crate) batch_duration: metrics::Histogram,
    pub(crate) errors: metrics::Counter,
}

/// The actor's handle on the checkpoint writer thread. Every write gets a
/// sequence number; the writer reports, after each batch, the highest one
/// that is durable.
pub(crate) struct Checkpointer {
    tx: Option<mpsc::Sender<(u64, Key, Op)>>,
    next_seq: u64,
}

/// Resolves once the writer thread has written everything and let go of
/// the work dir's lock.
pub(crate) struct WriterStopped(Option<std::thread::JoinHandle<()>>);

impl WriterStopped {
    /// Waits at most `timeout`; false if the writer is still busy.
    pub(crate) async fn wait(mut self, timeout: Duration) -> bool {
        let Some(handle) = self.0.take() else {
            return true;
        };
        let join = tokio::task::spawn_blocking(move || handle.join());
        matches!(tokio::time::timeout(timeout, join).await, Ok(Ok(_)))
    }
}

impl Checkpointer {
    /// Starts the writer thread. It holds `lock` until every handle is
    /// dropped and its last batch is written; `durable` is called with the
    /// highest durable sequence number after each batch.
    pub(crate) fn start(
        layout: Layout,
        lock: File,
        metrics: WriterMetrics,
        durable: impl Fn(u64) + Send + 'static,
    ) -> Result<(Self, WriterStopped), CheckpointError> {
        std::fs::create_dir_all(layout.tasks()).map_err(io_error(&layout.tasks()))?;
        let (tx, rx) = mpsc::channel();
        let writer_layout = layout.clone();
        let handle = std::thread::Builder::new()
            .name("corral-checkpoint".into())
            .spawn(move || {
                let _lock = lock;
                write_loop(&writer_layout, &rx, &metrics, &durable);
            })
            .map_err(io_error(layout.meta()))?;
        Ok((
            Self {
                tx: Some(tx),
                next_seq: 1,
            },
            WriterStopped(Some(handle)),
        ))
    }

    /// A handle that writes nothing: every write is durable at once. For
    /// actor unit tests that are not about checkpoints.
    #[cfg(test)]
    pub(crate) fn disabled() -> Self {
        Self {
            tx: None,
            next_seq: 1,
        }
    }

    fn send(&mut self, key: Key, op: Op) -> u64 {
        let Some(tx) = &self.tx else {
            return 0;
        };
        let seq = self.next_seq;
        if tx.send((seq, key, op)).is_err() {
            // The writer is gone (it only ends when we drop the sender, so
            // this means it panicked): go on without checkpoints rather
            // than hold every status update back forever.
            warn!("the checkpoint writer is gone; nothing more is checkpointed");
            self.tx = None;
            return 0;
        }
        self.next_seq += 1;
        seq
    }

    /// Queues the task's file; returns the write's sequence number (0: no
    /// write, durable at once).
    pub(crate) fn put_task(
        &mut self,
        framework_id: &str,
        task_id: &str,
        task: &pb::TaskCheckpoint,
    ) -> u64 {
        let bytes = seal(&task.encode_to_vec());
        self.send(
            Key::Task(framework_id.to_string(), task_id.to_string()),
            Op::Put(bytes),
        )
    }

    pub(crate) fn remove_task(&mut self, framework_id: &str, task_id: &str) -> u64 {
        self.send(
            Key::Task(framework_id.to_string(), task_id.to_string()),
            Op::Remove,
        )
    }

    pub(crate) fn put_agent(&mut self, agent: &pb::AgentCheckpoint) -> u64 {
        let bytes = seal(&agent.encode_to_vec());
        self.send(Key::Agent, Op::Put(bytes))
    }
}

fn write_loop(
    layout: &Layout,
    rx: &mpsc::Receiver<(u64, Key, Op)>,
    metrics: &WriterMetrics,
    durable: &dyn Fn(u64),
) {
    while let Ok((seq, key, op)) = rx.recv() {
        let mut last = seq;
        let mut batch = BTreeMap::new();
        batch.insert(key, op);
        // Everything queued meanwhile joins this batch; a later write of a
        // file replaces an earlier one. Taken in order, so every sequence
        // number up to `last` is in the batch.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok((seq, key, op)) => {
                    last = seq;
                    batch.insert(key, op);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let files = batch.len();
        let errors = write_batch(layout, batch);
        metrics
            .batch_duration
            .record(started.elapsed().as_secs_f64());
        for e in &errors {
            warn!(error = %e, "checkpoint write failed");
        }
        metrics.errors.increment(errors.len() as u64);
        debug!(files, last, "checkpoint batch written");
        durable(last);
    }
}

fn path_of(layout: &Layout, key: &Key) -> PathBuf {
    match key {
        Key::Agent => layout.agent(),
        Key::Task(fw, task) => layout.task(fw, task),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(TMP_SUFFIX);
    path.with_file_name(name)
}

/// Writes one batch: every new file to a synced temp file (a large batch
/// on several threads at once), then the renames and removals, then one
/// fsync per directory touched.
fn write_batch(layout: &Layout, batch: BTreeMap<Key, Op>) -> Vec<CheckpointError> {
    let mut errors = Vec::new();
    let mut dirs = BTreeSet::new();
    let mut puts = Vec::new();
    let mut removals = Vec::new();
    for (key, op) in batch {
        let path = path_of(layout, &key);
        let Some(dir) = path.parent().map(Path::to_path_buf) else {
            continue;
        };
        match op {
            Op::Put(bytes) => {
                if !dir.exists() {
                    if let Err(source) = std::fs::create_dir_all(&dir) {
                        errors.push(CheckpointError::Io { path: dir, source });
                        continue;
                    }
                    // The new directory's own entry must be durable too.
                    if let Some(parent) = dir.parent() {
                        dirs.insert(parent.to_path_buf());
                    }
                }
                puts.push((tmp_path(&path), path, bytes));
            }
            Op::Remove => removals.push(path),
        }
        dirs.insert(dir);
    }
    // Each file's data is durable before its rename can publish it.
    for ((tmp, path, _), written) in puts.iter().zip(write_files(&puts)) {
        let renamed = written.and_then(|()| std::fs::rename(tmp, path));
        if let Err(source) = renamed {
            let _ = std::fs::remove_file(tmp);
            errors.push(CheckpointError::Io {
                path: path.clone(),
                source,
            });
        }
    }
    for path in removals {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => errors.push(CheckpointError::Io { path, source }),
        }
    }
    for dir in dirs {
        if let Err(e) = sync_dir(&dir) {
            errors.push(e);
        }
    }
    errors
}

type Put = (PathBuf, PathBuf, Vec<u8>);

/// Writes and `fdatasync`s each temp file; a large batch on
/// [`SYNC_THREADS`] threads, whose syncs the filesystem's journal commits
/// together (ext4's jbd2 joins concurrent fsyncs into one transaction)
/// instead of one commit after another.
fn write_files(puts: &[Put]) -> Vec<std::io::Result<()>> {
    let one = |(tmp, _, bytes): &Put| write_file(tmp, bytes);
    if puts.len() < PARALLEL_FROM {
        return puts.iter().map(one).collect();
    }
    let chunk = puts.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = puts
            .chunks(chunk)
            .map(|part| {
                let handle = scope.spawn(move || part.iter().map(one).collect::<Vec<_>>());
                (part.len(), handle)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(len, handle)| {
                handle.join().unwrap_or_else(|_| {
                    (0..len)
                        .map(|_| Err(std::io::Error::other("checkpoint write thread panicked")))
                        .collect()
                })
            })
            .collect()
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (tempfile::TempDir, Layout) {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        (dir, layout)
    }

    fn boot(dir: &Path, id: &str) -> PathBuf {
        let path = dir.join("boot_id");
        std::fs::write(&path, format!("{id}\n")).unwrap();
        path
    }

    fn task(fw: &str, id: &str) -> pb::TaskCheckpoint {
        pb::TaskCheckpoint {
            framework: Some(pb::FrameworkInfo {
                id: fw.into(),
                name: "test".into(),
                ..Default::default()
            }),
            task: Some(pb::TaskInfo {
                task_id: id.into(),
                ..Default::default()
            }),
            state: pb::TaskState::TaskRunning as i32,
            ..Default::default()
        }
    }

    fn metrics() -> WriterMetrics {
        WriterMetrics {
            batch_duration: metrics::Histogram::noop(),
            errors: metrics::Counter::noop(),
        }
    }

    /// Starts a writer, runs `f` on it, waits until it wrote everything.
    fn with_writer(layout: &Layout, f: impl FnOnce(&mut Checkpointer)) {
        let lock = acquire_lock(layout, LOCK_WAIT).unwrap();
        let (mut c, stopped) =
            Checkpointer::start(layout.clone(), lock, metrics(), |_| {}).unwrap();
        f(&mut c);
        drop(c);
        let handle = stopped.0.unwrap();
        handle.join().unwrap();
    }

    #[test]
    fn an_envelope_round_trips_and_any_damage_is_named() {
        let sealed = seal(b"payload");
        assert_eq!(unseal(&sealed), Ok(Unsealed::Current(&b"payload"[..])));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(unseal(&flipped), Err("checksum mismatch".to_string()));
        let torn = &sealed[..sealed.len() - 2];
        assert!(
            unseal(torn).unwrap_err().contains("payload bytes"),
            "{:?}",
            unseal(torn)
        );
        assert!(unseal(&sealed[..10]).unwrap_err().contains("header"));
        assert!(
            unseal(b"{\"json\": true, \"padding\": \"...........................\"}")
                .unwrap_err()
                .contains("magic")
        );
        let mut other = sealed;
        other[8..12].copy_from_slice(&7u32.to_le_bytes());
        assert_eq!(
            unseal(&other),
            Ok(Unsealed::OtherVersion(7, &b"payload"[..]))
        );
    }

    #[test]
    fn written_tasks_are_recovered_under_the_same_boot_and_temp_files_are_dropped() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "boot-a");
        with_writer(&layout, |c| {
            c.put_agent(&pb::AgentCheckpoint {
                agent_id: "agent-1".into(),
                boot_id: "boot-a".into(),
            });
            c.put_task("fw", "a", &task("fw", "a"));
            c.put_task("fw", "b", &task("fw", "b"));
            c.put_task("fw", "gone", &task("fw", "gone"));
            c.remove_task("fw", "gone");
        });
        std::fs::write(layout.tasks().join("fw").join("c.tmp"), b"half a write").unwrap();
        let r = recover(&layout, &boot_id, true).unwrap();
        assert_eq!(r.agent_id.unwrap().as_str(), "agent-1");
        assert_eq!(r.replaces_agent_id, None);
        let ids: Vec<_> = r
            .tasks
            .iter()
            .map(|t| t.task.as_ref().unwrap().task_id.clone())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(!layout.tasks().join("fw").join("c.tmp").exists());
        assert!(r.skipped.is_empty());
    }

    #[test]
    fn a_large_batch_written_on_several_threads_is_recovered_whole() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        let batch: BTreeMap<Key, Op> = (0..50)
            .map(|i| {
                let id = format!("t{i:02}");
                let bytes = seal(&task("fw", &id).encode_to_vec());
                (Key::Task("fw".into(), id), Op::Put(bytes))
            })
            .chain([(
                Key::Agent,
                Op::Put(seal(
                    &pb::AgentCheckpoint {
                        agent_id: "agent-1".into(),
                        boot_id: "b".into(),
                    }
                    .encode_to_vec(),
                )),
            )])
            .collect();
        assert!(batch.len() >= PARALLEL_FROM);
        assert!(write_batch(&layout, batch).is_empty());
        let removals: BTreeMap<Key, Op> = (0..10)
            .map(|i| (Key::Task("fw".into(), format!("t{i:02}")), Op::Remove))
            .collect();
        assert!(write_batch(&layout, removals).is_empty());
        let r = recover(&layout, &boot_id, true).unwrap();
        assert_eq!(r.tasks.len(), 40);
        assert_eq!(r.tasks[0].task.as_ref().unwrap().task_id, "t10");
    }

    #[test]
    fn a_later_write_of_a_file_replaces_an_earlier_one() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        with_writer(&layout, |c| {
            c.put_agent(&pb::AgentCheckpoint {
                agent_id: "agent-1".into(),
                boot_id: "b".into(),
            });
            for state in [
                pb::TaskState::TaskStaging,
                pb::TaskState::TaskRunning,
                pb::TaskState::TaskKilling,
            ] {
                let mut t = task("fw", "a");
                t.state = state as i32;
                c.put_task("fw", "a", &t);
            }
        });
        let r = recover(&layout, &boot_id, true).unwrap();
        assert_eq!(r.tasks.len(), 1);
        assert_eq!(r.tasks[0].state(), pb::TaskState::TaskKilling);
    }

    #[test]
    fn a_corrupt_task_file_is_an_error_naming_it_unless_not_strict() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        with_writer(&layout, |c| {
            c.put_agent(&pb::AgentCheckpoint {
                agent_id: "agent-1".into(),
                boot_id: "b".into(),
            });
            c.put_task("fw", "good", &task("fw", "good"));
            c.put_task("fw", "bad", &task("fw", "bad"));
            // A file about another task than its path says.
            c.put_task("fw", "moved", &task("fw", "elsewhere"));
        });
        let bad = layout.task("fw", "bad");
        let mut bytes = std::fs::read(&bad).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0xff;
        std::fs::write(&bad, bytes).unwrap();

        let err = recover(&layout, &boot_id, true).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );

        let r = recover(&layout, &boot_id, false).unwrap();
        let ids: Vec<_> = r
            .tasks
            .iter()
            .map(|t| t.task.as_ref().unwrap().task_id.clone())
            .collect();
        assert_eq!(ids, ["good"]);
        assert_eq!(r.skipped.len(), 2, "{:?}", r.skipped);
        assert!(!bad.exists(), "moved aside");
        assert_eq!(std::fs::read_dir(layout.corrupt()).unwrap().count(), 2);
        drop(r); // lets go of the work dir's lock
        // The next strict start finds nothing wrong.
        assert_eq!(recover(&layout, &boot_id, true).unwrap().tasks.len(), 1);
    }

    #[test]
    fn another_boot_or_format_drops_the_tasks_and_names_the_old_agent() {
        let (dir, layout) = layout();
        with_writer(&layout, |c| {
            c.put_agent(&pb::AgentCheckpoint {
                agent_id: "agent-1".into(),
                boot_id: "boot-a".into(),
            });
            c.put_task("fw", "a", &task("fw", "a"));
        });
        let r = recover(&layout, &boot(dir.path(), "boot-b"), true).unwrap();
        assert_eq!(r.agent_id, None);
        assert_eq!(r.replaces_agent_id.as_deref(), Some("agent-1"));
        assert!(r.tasks.is_empty());
        assert!(!layout.tasks().exists());
        drop(r);

        // A checkpoint of another format version, same boot.
        let payload = pb::AgentCheckpoint {
            agent_id: "agent-2".into(),
            boot_id: "boot-b".into(),
        }
        .encode_to_vec();
        let mut sealed = seal(&payload);
        sealed[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(layout.agent(), sealed).unwrap();
        let r = recover(&layout, &boot(dir.path(), "boot-b"), true).unwrap();
        assert_eq!(r.agent_id, None);
        assert_eq!(r.replaces_agent_id.as_deref(), Some("agent-2"));
    }

    #[test]
    fn a_corrupt_agent_file_is_an_error_unless_not_strict() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        std::fs::create_dir_all(layout.meta()).unwrap();
        std::fs::write(layout.agent(), b"garbage").unwrap();
        let err = recover(&layout, &boot_id, true).unwrap_err();
        assert!(err.to_string().contains("meta/agent"), "{err}");
        let r = recover(&layout, &boot_id, false).unwrap();
        assert_eq!(
            (r.agent_id, r.replaces_agent_id, r.skipped.len()),
            (None, None, 1)
        );
    }

    #[test]
    fn no_checkpoint_is_a_new_agent() {
        let (dir, layout) = layout();
        let r = recover(&layout, &boot(dir.path(), "b"), true).unwrap();
        assert_eq!((r.agent_id, r.replaces_agent_id), (None, None));
        assert_eq!(r.boot_id, "b");
    }

    #[test]
    fn a_second_owner_of_the_work_dir_is_refused_while_the_first_holds_it() {
        let (_dir, layout) = layout();
        let first = acquire_lock(&layout, LOCK_WAIT).unwrap();
        let err = acquire_lock(&layout, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, CheckpointError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("meta/lock"), "{err}");
        drop(first);
        acquire_lock(&layout, Duration::ZERO).unwrap();
    }

    #[test]
    fn a_missing_boot_id_is_an_error_naming_the_path() {
        let (dir, layout) = layout();
        let err = recover(&layout, &dir.path().join("nope"), true).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
