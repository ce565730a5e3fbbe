//! The agent's checkpoint: what a restarted agent needs to come back as the
//! same agent, report its tasks and resend what the frameworks have not
//! acknowledged (Mesos' `src/slave/state.hpp`; Nomad's client keeps the
//! same in a BoltDB file).
//!
//! Layout under `<work_dir>/meta/`:
//! - `lock`: held (`flock`) by the one agent that owns the work dir, for as
//!   long as its checkpoint writer runs; a second agent on the same work
//!   dir waits for it, then fails naming the file.
//! - `journal`: the checkpoint, an append-only sequence of
//!   [`pb::CheckpointRecord`]s: the agent's id and boot id, each task's
//!   framework, info, state, container and unacknowledged updates, and the
//!   removal of a task whose end was acknowledged; each pod whose network
//!   is set up (its address, volumes, restart policy), and its removal.
//!   The last record about the agent, a task or a pod wins.
//! - `corrupt/`: copies of journals in which a `--strict=false` agent found
//!   damaged records, for a human to look at.
//!
//! Every record is one protobuf message in an envelope: the magic
//! `CORRALCK`, the format version (u32 LE), the payload's length (u32 LE),
//! the payload's SHA-256, the payload. A damaged record is named (file and
//! byte offset) instead of decoding into something plausible; an
//! incomplete last record is a write that a crash interrupted before it
//! was reported durable, and is dropped.
//!
//! Writes run on one thread of their own ([`Checkpointer`]) in batches:
//! whatever the actor queued while the previous batch was being written is
//! appended in one `write` and made durable with one `fdatasync`. (Version
//! 1 wrote a file per task, atomically by rename: four files created,
//! synced and renamed per short task made the checkpoint a quarter of a
//! batch workload's cost.) When the journal has grown to several times
//! what it describes, the writer compacts it: the live records go to a
//! temp file, which is synced and renamed over the journal. A starting
//! agent compacts what it recovered the same way, so damage and torn
//! writes never outlive one recovery. The actor learns which writes are
//! durable from a sequence number, and sends a status update only once the
//! write that holds it is.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use corral_proto::pb;
use corral_proto::pb::checkpoint_record::Record;
use corral_proto::{AgentId, FrameworkId, TaskId};
use prost::Message;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

/// The checkpoint format this agent writes and reads. A checkpoint of
/// another version is incompatible: the agent registers as a new one.
/// Version 1 was a file per task (`meta/agent`, `meta/tasks/`).
pub(crate) const FORMAT_VERSION: u32 = 2;

const MAGIC: &[u8; 8] = b"CORRALCK";
/// Magic, version, length, SHA-256.
const HEADER_LEN: usize = 8 + 4 + 4 + 32;
/// A task's info and a handful of updates take a few KiB; anything near
/// this is not a record the agent wrote.
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;
/// How long a starting agent waits for the previous owner of the work dir
/// to let go of it (an in-process agent's writer finishing its last batch).
const LOCK_WAIT: Duration = Duration::from_secs(10);
const LOCK_POLL: Duration = Duration::from_millis(20);
/// Most writes in one batch: bounds the time before the first of them is
/// reported durable.
const MAX_BATCH: usize = 4096;
/// Least time between two batches: what queues meanwhile joins the next
/// one. Each batch ends in an `fdatasync`, which on a virtual disk flushes
/// the device's cache and slows every other file operation of the agent
/// (sandboxes, logs); a batch workload of hundreds of tasks a second made
/// hundreds of them a second. Status updates wait at most this much more.
const MIN_BATCH_INTERVAL: Duration = Duration::from_millis(5);
/// The journal is compacted once it is this large...
const COMPACT_FROM: u64 = 1 << 20;
/// ...and this many times the size of its live records.
const COMPACT_RATIO: u64 = 4;

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

    pub(crate) fn journal(&self) -> PathBuf {
        self.meta.join("journal")
    }

    fn journal_tmp(&self) -> PathBuf {
        self.meta.join("journal.tmp")
    }

    fn corrupt(&self) -> PathBuf {
        self.meta.join("corrupt")
    }

    /// Format 1's agent file; its presence means an upgrade.
    fn legacy_agent(&self) -> PathBuf {
        self.meta.join("agent")
    }

    /// Format 1's task files.
    fn legacy_tasks(&self) -> PathBuf {
        self.meta.join("tasks")
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

/// What the journal is about: the agent, one task, or one pod. Ordered so
/// that the agent's record comes first in a compacted journal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Agent,
    Task(String, String),
    Pod(String),
}

/// The live records (sealed, as they are written) of a checkpoint: what a
/// compacted journal holds.
#[derive(Debug, Default)]
pub(crate) struct Live(BTreeMap<Key, Vec<u8>>);

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
    /// The pods their tasks name (empty unless `agent_id` is set).
    pub(crate) pods: Vec<pb::PodCheckpoint>,
    /// Damage skipped with `--strict=false`, with why.
    pub(crate) skipped: Vec<CheckpointError>,
    /// The work dir's lock, for the writer to hold.
    pub(crate) lock: File,
    /// What the writer's first, compacted journal holds.
    pub(crate) live: Live,
}

/// A record read back from the journal.
#[derive(Debug)]
struct Entry {
    offset: usize,
    key: Key,
    /// `None`: the task was removed.
    record: Option<Record>,
    sealed: Vec<u8>,
}

/// A journal read back: its intact records in order, and where it is
/// damaged.
#[derive(Debug, Default)]
struct Scan {
    entries: Vec<Entry>,
    /// Damaged stretches, each followed by an intact record: (offset, why).
    damaged: Vec<(usize, String)>,
    /// Another format's version, found in the journal's first record.
    other_version: Option<u32>,
}

/// Checks the record at `at`; returns where it ends and its envelope's
/// content.
fn record_at(bytes: &[u8], at: usize) -> Result<(usize, Unsealed<'_>), String> {
    let rest = &bytes[at..];
    if rest.len() < HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than a record's {HEADER_LEN}-byte header",
            rest.len()
        ));
    }
    let len = u32::from_le_bytes([rest[12], rest[13], rest[14], rest[15]]) as usize;
    let end = (at + HEADER_LEN).saturating_add(len);
    if end > bytes.len() {
        return Err(format!(
            "the header says {len} payload bytes, only {} follow",
            bytes.len() - at - HEADER_LEN
        ));
    }
    unseal(&bytes[at..end]).map(|u| (end, u))
}

/// The next offset after `from` where an intact record starts.
fn next_record(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(HEADER_LEN - 1))
        .filter(|&i| bytes[i..].starts_with(MAGIC))
        .find(|&i| record_at(bytes, i).is_ok())
}

/// Decodes a record's payload into its key and content; `Err` says why it
/// cannot be used.
fn decode_record(payload: &[u8]) -> Result<(Key, Option<Record>), String> {
    let record = pb::CheckpointRecord::decode(payload)
        .map_err(|e| format!("cannot decode: {e}"))?
        .record
        .ok_or("an empty record")?;
    let task_key = |fw: &str, task: &str| {
        FrameworkId::parse(fw, "framework_id")
            .and_then(|_| TaskId::parse(task, "task_id"))
            .map(|_| Key::Task(fw.to_string(), task.to_string()))
            .map_err(|e| e.to_string())
    };
    let pod_key = |pod_id: &str| {
        crate::network::validate_pod_id(pod_id)
            .map(|()| Key::Pod(pod_id.to_string()))
            .map_err(|e| format!("pod_id: {e}"))
    };
    match record {
        Record::Agent(a) => Ok((Key::Agent, Some(Record::Agent(a)))),
        Record::Task(t) => {
            let fw = t.framework.as_ref().map_or("", |f| f.id.as_str());
            let task = t.task.as_ref().map_or("", |t| t.task_id.as_str());
            Ok((task_key(fw, task)?, Some(Record::Task(t))))
        }
        Record::TaskRemoved(k) => Ok((task_key(&k.framework_id, &k.task_id)?, None)),
        Record::Pod(p) => Ok((pod_key(&p.pod_id)?, Some(Record::Pod(p)))),
        Record::PodRemoved(id) => Ok((pod_key(&id)?, None)),
    }
}

/// Reads a journal's records. A damaged stretch followed by an intact
/// record is damage; one that runs to the end is a write the crash
/// interrupted, except at the very start: the journal begins with a
/// compaction, written whole before it was renamed into place.
fn scan(bytes: &[u8]) -> Scan {
    let mut out = Scan::default();
    let mut at = 0;
    while at < bytes.len() {
        let (end, unsealed) = match record_at(bytes, at) {
            Ok(found) => found,
            Err(reason) => match next_record(bytes, at + 1) {
                Some(next) => {
                    out.damaged.push((at, reason));
                    at = next;
                    continue;
                }
                None if at == 0 => {
                    out.damaged.push((0, format!("no intact record: {reason}")));
                    break;
                }
                None => {
                    warn!(offset = at, reason = %reason,
                          "dropping the journal's incomplete last write (the agent stopped while writing it)");
                    break;
                }
            },
        };
        let decoded = match unsealed {
            Unsealed::Current(payload) => decode_record(payload),
            Unsealed::OtherVersion(found, payload) if at == 0 => {
                // Of another format: only the agent id is of use.
                out.other_version = Some(found);
                if let Ok((key, record)) = decode_record(payload) {
                    out.entries.push(Entry {
                        offset: at,
                        key,
                        record,
                        sealed: Vec::new(),
                    });
                }
                break;
            }
            Unsealed::OtherVersion(found, _) => Err(format!(
                "format version {found} in a journal of version {FORMAT_VERSION}"
            )),
        };
        match decoded {
            Ok((key, record)) => out.entries.push(Entry {
                offset: at,
                key,
                record,
                sealed: bytes[at..end].to_vec(),
            }),
            // Intact but unusable: damage wherever it is.
            Err(reason) => out.damaged.push((at, reason)),
        }
        at = end;
    }
    out
}

/// What a journal holds once its records are applied in order.
#[derive(Debug, Default)]
struct Applied {
    agent: Option<pb::AgentCheckpoint>,
    tasks: BTreeMap<Key, pb::TaskCheckpoint>,
    pods: BTreeMap<Key, pb::PodCheckpoint>,
    live: Live,
    /// Errors for the damage, naming the journal and where it is.
    damage: Vec<CheckpointError>,
}

/// Applies a scanned journal. A damaged record may have been any task's
/// latest (or its removal), so a task whose last intact record comes
/// before damage is not trusted: it is dropped with the damage, as a
/// corrupt file of format 1 was. The agent's record is only ever written
/// again with the same id, so its last intact one stands.
fn apply(path: &Path, scan: Scan) -> Applied {
    let mut out = Applied::default();
    let last_damage = scan.damaged.last().map(|(at, _)| *at);
    let mut last_offset = BTreeMap::new();
    for entry in scan.entries {
        last_offset.insert(entry.key.clone(), entry.offset);
        match entry.record {
            Some(Record::Agent(a)) => out.agent = Some(a),
            Some(Record::Task(t)) => {
                out.tasks.insert(entry.key.clone(), t);
            }
            Some(Record::Pod(p)) => {
                out.pods.insert(entry.key.clone(), p);
            }
            // A removal (`decode_record` gives it no content).
            Some(Record::TaskRemoved(_) | Record::PodRemoved(_)) | None => {
                out.tasks.remove(&entry.key);
                out.pods.remove(&entry.key);
                out.live.0.remove(&entry.key);
                continue;
            }
        }
        out.live.0.insert(entry.key, entry.sealed);
    }
    if let Some(damage) = last_damage {
        let untrusted: Vec<Key> = out
            .tasks
            .keys()
            .chain(out.pods.keys())
            .filter(|k| last_offset.get(*k).is_some_and(|at| *at < damage))
            .cloned()
            .collect();
        for key in untrusted {
            match &key {
                Key::Task(fw, task) => warn!(framework_id = %fw, task_id = %task,
                      "dropping a task whose latest record may be in the journal's damaged part"),
                Key::Pod(pod_id) => warn!(pod_id = %pod_id,
                      "dropping a pod whose latest record may be in the journal's damaged part"),
                Key::Agent => {}
            }
            out.tasks.remove(&key);
            out.pods.remove(&key);
            out.live.0.remove(&key);
        }
    }
    out.damage = scan
        .damaged
        .into_iter()
        .map(|(at, reason)| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("record at byte {at}: {reason}"),
        })
        .collect();
    out
}

/// What a checkpoint holds, for tools and tests: read without taking the
/// work dir's lock, changing nothing.
#[derive(Debug, Default)]
pub struct CheckpointContents {
    pub agent: Option<pb::AgentCheckpoint>,
    pub tasks: Vec<pb::TaskCheckpoint>,
    pub pods: Vec<pb::PodCheckpoint>,
}

/// Reads the checkpoint in `work_dir` as a strict agent would: damage is
/// an error naming the journal and the byte; an incomplete last write is
/// not (the writer may be appending right now).
pub fn read_checkpoint(work_dir: &Path) -> Result<CheckpointContents, CheckpointError> {
    let path = Layout::new(work_dir).journal();
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(CheckpointContents::default()),
        Err(source) => return Err(CheckpointError::Io { path, source }),
    };
    let scan = scan(&bytes);
    if let Some(found) = scan.other_version {
        return Err(CheckpointError::Incompatible {
            path,
            found,
            expected: FORMAT_VERSION,
        });
    }
    let applied = apply(&path, scan);
    if let Some(e) = applied.damage.into_iter().next() {
        return Err(e);
    }
    Ok(CheckpointContents {
        agent: applied.agent,
        tasks: applied.tasks.into_values().collect(),
        pods: applied.pods.into_values().collect(),
    })
}

/// Reads the checkpoint in `layout`. With `strict`, damage is an error
/// naming the journal and where; without, the damaged records (and the
/// tasks they may have been about) are skipped, a copy of the journal goes
/// to `meta/corrupt/`, and the rest is recovered. A checkpoint of another
/// boot or format is dropped: the agent registers as a new one that
/// replaces the old id.
pub(crate) fn recover(
    layout: &Layout,
    boot_id_path: &Path,
    strict: bool,
) -> Result<Recovered, CheckpointError> {
    let lock = acquire_lock(layout, LOCK_WAIT)?;
    let boot_id = read_boot_id(boot_id_path)?;
    let new_agent = |lock, replaces: Option<String>, skipped| Recovered {
        agent_id: None,
        replaces_agent_id: replaces,
        boot_id: boot_id.clone(),
        tasks: Vec::new(),
        pods: Vec::new(),
        skipped,
        lock,
        live: Live::default(),
    };
    let path = layout.journal();
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Ok(new_agent(lock, legacy_agent_id(layout)?, Vec::new()));
        }
        Err(source) => return Err(CheckpointError::Io { path, source }),
    };
    let scan = scan(&bytes);
    if let Some(found) = scan.other_version {
        let old = scan.entries.into_iter().find_map(|e| match e.record {
            Some(Record::Agent(a)) if !a.agent_id.is_empty() => Some(a.agent_id),
            _ => None,
        });
        warn!(path = %path.display(), found, expected = FORMAT_VERSION,
              "checkpoint of another format version; registering as a new agent");
        return Ok(new_agent(lock, old, Vec::new()));
    }
    let applied = apply(&path, scan);
    let mut skipped = applied.damage;
    if !skipped.is_empty() {
        if strict {
            return Err(skipped.remove(0));
        }
        for e in &skipped {
            warn!(error = %e, "skipping damaged checkpoint records (--strict=false)");
        }
        keep_aside(layout, &path);
    }
    let agent = match applied.agent {
        None => return Ok(new_agent(lock, None, skipped)),
        Some(agent) => agent,
    };
    let id = match AgentId::parse(&agent.agent_id, "agent_checkpoint.agent_id") {
        Ok(id) => id,
        Err(e) => {
            let e = CheckpointError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            };
            if strict {
                return Err(e);
            }
            warn!(error = %e, "unreadable agent record skipped (--strict=false); registering as a new agent");
            skipped.push(e);
            return Ok(new_agent(lock, None, skipped));
        }
    };
    if agent.boot_id != boot_id {
        info!(agent_id = %id, old_boot_id = %agent.boot_id, boot_id = %boot_id,
              "the machine rebooted since the checkpoint; registering as a new agent");
        return Ok(new_agent(lock, Some(id.to_string()), skipped));
    }
    Ok(Recovered {
        agent_id: Some(id),
        replaces_agent_id: None,
        boot_id,
        tasks: applied.tasks.into_values().collect(),
        pods: applied.pods.into_values().collect(),
        skipped,
        lock,
        live: applied.live,
    })
}

/// The agent id of a format 1 checkpoint, which is removed: the agent
/// registers as a new one that replaces it.
fn legacy_agent_id(layout: &Layout) -> Result<Option<String>, CheckpointError> {
    let path = layout.legacy_agent();
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CheckpointError::Io { path, source }),
    };
    // The agent id is field 1 in every version.
    let id = match unseal(&bytes) {
        Ok(Unsealed::Current(p) | Unsealed::OtherVersion(_, p)) => {
            pb::AgentCheckpoint::decode(p).ok().map(|a| a.agent_id)
        }
        Err(_) => None,
    }
    .filter(|id| !id.is_empty());
    warn!(path = %path.display(), "checkpoint of format 1; registering as a new agent");
    remove_tree(&layout.legacy_tasks())?;
    std::fs::remove_file(&path).map_err(io_error(&path))?;
    sync_dir(layout.meta())?;
    Ok(id)
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

/// Keeps a copy of a damaged journal for a human; the writer's first
/// compaction then replaces the journal with what could be recovered.
fn keep_aside(layout: &Layout, journal: &Path) {
    let dir = layout.corrupt();
    let target = dir.join(format!("journal.{}", uuid::Uuid::new_v4().simple()));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::copy(journal, &target)) {
        Ok(_) => warn!(to = %target.display(), "kept a copy of the damaged journal"),
        Err(e) => warn!(error = %e, "cannot keep a copy of the damaged journal"),
    }
}

/// Removes the whole checkpoint: the master removed this agent, so no
/// later start may come back as it.
pub(crate) fn forget(layout: &Layout) -> Result<(), CheckpointError> {
    remove_tree(layout.meta())
}

#[derive(Debug)]
enum Op {
    /// A sealed record.
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
    /// Writes `live` as the journal (compacted, atomically), then starts
    /// the writer thread. It holds `lock` until every handle is dropped and
    /// its last batch is written; `durable` is called with the highest
    /// durable sequence number after each batch.
    pub(crate) fn start(
        layout: Layout,
        lock: File,
        live: Live,
        metrics: WriterMetrics,
        durable: impl Fn(u64) + Send + 'static,
    ) -> Result<(Self, WriterStopped), CheckpointError> {
        let mut journal = Journal::create(&layout, live)?;
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("corral-checkpoint".into())
            .spawn(move || {
                let _lock = lock;
                write_loop(&mut journal, &rx, &metrics, &durable);
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

    /// Queues the task's record; returns the write's sequence number (0: no
    /// write, durable at once).
    pub(crate) fn put_task(
        &mut self,
        framework_id: &str,
        task_id: &str,
        task: pb::TaskCheckpoint,
    ) -> u64 {
        let bytes = seal_record(Record::Task(task));
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

    pub(crate) fn put_pod(&mut self, pod: pb::PodCheckpoint) -> u64 {
        let key = Key::Pod(pod.pod_id.clone());
        self.send(key, Op::Put(seal_record(Record::Pod(pod))))
    }

    pub(crate) fn remove_pod(&mut self, pod_id: &str) -> u64 {
        self.send(Key::Pod(pod_id.to_string()), Op::Remove)
    }

    pub(crate) fn put_agent(&mut self, agent: &pb::AgentCheckpoint) -> u64 {
        let bytes = seal_record(Record::Agent(agent.clone()));
        self.send(Key::Agent, Op::Put(bytes))
    }
}

fn seal_record(record: Record) -> Vec<u8> {
    seal(
        &pb::CheckpointRecord {
            record: Some(record),
        }
        .encode_to_vec(),
    )
}

/// The journal as the writer thread holds it: the open file, and the live
/// records it would compact to.
struct Journal {
    layout: Layout,
    file: File,
    len: u64,
    live: Live,
    live_bytes: u64,
    /// A write failed part way: the file's tail is unknown, so the next
    /// batch compacts instead of appending.
    broken: bool,
}

impl Journal {
    /// Writes `live` as a new journal, replacing any there is.
    fn create(layout: &Layout, live: Live) -> Result<Self, CheckpointError> {
        std::fs::create_dir_all(layout.meta()).map_err(io_error(layout.meta()))?;
        let live_bytes = live.0.values().map(|r| r.len() as u64).sum();
        let (file, len) = compact(layout, &live)?;
        Ok(Self {
            layout: layout.clone(),
            file,
            len,
            live,
            live_bytes,
            broken: false,
        })
    }

    /// Appends one batch and makes it durable (one `write`, one
    /// `fdatasync`); compacts when the journal has grown large.
    fn write(&mut self, batch: BTreeMap<Key, Op>) -> Result<(), CheckpointError> {
        let mut buf = Vec::new();
        for (key, op) in batch {
            let (record, removed) = match (op, &key) {
                (Op::Put(bytes), _) => (bytes, false),
                (Op::Remove, Key::Task(fw, task)) => (
                    seal_record(Record::TaskRemoved(pb::CheckpointedTaskKey {
                        framework_id: fw.clone(),
                        task_id: task.clone(),
                    })),
                    true,
                ),
                (Op::Remove, Key::Pod(pod_id)) => {
                    (seal_record(Record::PodRemoved(pod_id.clone())), true)
                }
                (Op::Remove, Key::Agent) => continue,
            };
            buf.extend_from_slice(&record);
            let old = if removed {
                self.live.0.remove(&key)
            } else {
                self.live_bytes += record.len() as u64;
                self.live.0.insert(key, record)
            };
            self.live_bytes -= old.map_or(0, |r| r.len() as u64);
        }
        if self.broken || (self.len > COMPACT_FROM && self.len > COMPACT_RATIO * self.live_bytes) {
            return self.compact();
        }
        let path = self.layout.journal();
        let appended = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        match appended {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(source) => {
                self.broken = true;
                Err(CheckpointError::Io { path, source })
            }
        }
    }

    fn compact(&mut self) -> Result<(), CheckpointError> {
        let (file, len) = compact(&self.layout, &self.live)?;
        self.file = file;
        self.len = len;
        self.broken = false;
        Ok(())
    }
}

/// Writes `live` to a temp file, syncs it and renames it over the journal;
/// returns the new journal, open for appending, and its length.
fn compact(layout: &Layout, live: &Live) -> Result<(File, u64), CheckpointError> {
    let tmp = layout.journal_tmp();
    let path = layout.journal();
    let bytes: Vec<u8> = live.0.values().flatten().copied().collect();
    let written = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_data()))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(CheckpointError::Io { path, source });
    }
    sync_dir(layout.meta())?;
    let file = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_error(&path))?;
    Ok((file, bytes.len() as u64))
}

fn write_loop(
    journal: &mut Journal,
    rx: &mpsc::Receiver<(u64, Key, Op)>,
    metrics: &WriterMetrics,
    durable: &dyn Fn(u64),
) {
    let mut previous: Option<Instant> = None;
    while let Ok((seq, key, op)) = rx.recv() {
        if let Some(at) = previous {
            std::thread::sleep((at + MIN_BATCH_INTERVAL).saturating_duration_since(Instant::now()));
        }
        let mut last = seq;
        let mut batch = BTreeMap::new();
        batch.insert(key, op);
        // Everything queued meanwhile joins this batch; a later write about
        // the same key replaces an earlier one. Taken in order, so every
        // sequence number up to `last` is in the batch.
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
        previous = Some(started);
        let records = batch.len();
        let result = journal.write(batch);
        metrics
            .batch_duration
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            warn!(error = %e, "checkpoint write failed");
            metrics.errors.increment(1);
        }
        debug!(records, last, "checkpoint batch written");
        durable(last);
    }
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

    fn agent(id: &str, boot_id: &str) -> pb::AgentCheckpoint {
        pb::AgentCheckpoint {
            agent_id: id.into(),
            boot_id: boot_id.into(),
        }
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

    /// Starts a writer on what is recovered so far, runs `f` on it, waits
    /// until it wrote everything.
    fn with_writer(layout: &Layout, f: impl FnOnce(&mut Checkpointer)) {
        let lock = acquire_lock(layout, LOCK_WAIT).unwrap();
        let (mut c, stopped) =
            Checkpointer::start(layout.clone(), lock, Live::default(), metrics(), |_| {}).unwrap();
        f(&mut c);
        drop(c);
        let handle = stopped.0.unwrap();
        handle.join().unwrap();
    }

    fn ids(tasks: &[pb::TaskCheckpoint]) -> Vec<String> {
        tasks
            .iter()
            .map(|t| t.task.as_ref().unwrap().task_id.clone())
            .collect()
    }

    /// One batch per record, in this order.
    fn journal_of(layout: &Layout, records: Vec<(Key, Op)>) -> Journal {
        let mut j = Journal::create(layout, Live::default()).unwrap();
        for (key, op) in records {
            j.write(BTreeMap::from([(key, op)])).unwrap();
        }
        j
    }

    fn put_task(id: &str) -> (Key, Op) {
        (
            Key::Task("fw".into(), id.into()),
            Op::Put(seal_record(Record::Task(task("fw", id)))),
        )
    }

    fn put_agent(id: &str, boot_id: &str) -> (Key, Op) {
        (
            Key::Agent,
            Op::Put(seal_record(Record::Agent(agent(id, boot_id)))),
        )
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
    fn written_tasks_are_recovered_and_a_torn_last_write_is_dropped() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "boot-a");
        with_writer(&layout, |c| {
            c.put_agent(&agent("agent-1", "boot-a"));
            c.put_task("fw", "a", task("fw", "a"));
            c.put_task("fw", "b", task("fw", "b"));
            c.put_task("fw", "gone", task("fw", "gone"));
            c.remove_task("fw", "gone");
        });
        // A crash in the middle of the next append.
        let half = seal_record(Record::Task(task("fw", "c")));
        let mut file = OpenOptions::new()
            .append(true)
            .open(layout.journal())
            .unwrap();
        file.write_all(&half[..half.len() / 2]).unwrap();
        drop(file);

        let r = recover(&layout, &boot_id, true).unwrap();
        assert_eq!(r.agent_id.as_ref().unwrap().as_str(), "agent-1");
        assert_eq!(r.replaces_agent_id, None);
        assert_eq!(ids(&r.tasks), ["a", "b"]);
        assert!(r.skipped.is_empty());
        assert_eq!(read_checkpoint(dir.path()).unwrap().tasks.len(), 2);
        // The writer starts from a compaction of what was recovered.
        let (lock, live) = (r.lock, r.live);
        let (c, stopped) =
            Checkpointer::start(layout.clone(), lock, live, metrics(), |_| {}).unwrap();
        drop(c);
        stopped.0.unwrap().join().unwrap();
        let bytes = std::fs::read(layout.journal()).unwrap();
        let scanned = scan(&bytes);
        assert_eq!(scanned.entries.len(), 3, "agent, a, b and nothing else");
        assert!(scanned.damaged.is_empty());
        assert_eq!(scanned.entries[0].key, Key::Agent, "the agent comes first");
    }

    #[test]
    fn a_later_write_about_a_task_replaces_an_earlier_one() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        let states = [
            pb::TaskState::TaskStaging,
            pb::TaskState::TaskRunning,
            pb::TaskState::TaskKilling,
        ];
        // Within one batch and across batches.
        with_writer(&layout, |c| {
            c.put_agent(&agent("agent-1", "b"));
            for state in states {
                let mut t = task("fw", "a");
                t.state = state as i32;
                c.put_task("fw", "a", t);
            }
        });
        let mut j = journal_of(&layout, vec![put_agent("agent-1", "b")]);
        for state in states {
            let mut t = task("fw", "a");
            t.state = state as i32;
            let put = Op::Put(seal_record(Record::Task(t)));
            j.write(BTreeMap::from([(Key::Task("fw".into(), "a".into()), put)]))
                .unwrap();
        }
        drop(j);
        let r = recover(&layout, &boot_id, true).unwrap();
        assert_eq!(r.tasks.len(), 1);
        assert_eq!(r.tasks[0].state(), pb::TaskState::TaskKilling);
    }

    #[test]
    fn the_journal_is_compacted_once_it_outgrows_what_it_holds() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        let mut j = journal_of(&layout, vec![put_agent("agent-1", "b")]);
        let big = |id: &str| {
            let mut t = task("fw", id);
            t.task.as_mut().unwrap().name = "x".repeat(16 * 1024);
            Op::Put(seal_record(Record::Task(t)))
        };
        let mut largest = 0;
        for i in 0..200 {
            let id = format!("t{i}");
            j.write(BTreeMap::from([(
                Key::Task("fw".into(), id.clone()),
                big(&id),
            )]))
            .unwrap();
            if i > 0 {
                let previous = Key::Task("fw".into(), format!("t{}", i - 1));
                j.write(BTreeMap::from([(previous, Op::Remove)])).unwrap();
            }
            largest = largest.max(std::fs::metadata(layout.journal()).unwrap().len());
        }
        assert_eq!(j.len, std::fs::metadata(layout.journal()).unwrap().len());
        drop(j);
        // 200 records of 16 KiB were written: 3.2 MiB without compaction.
        assert!(
            largest < 2 * COMPACT_FROM,
            "largest journal: {largest} bytes"
        );
        let r = recover(&layout, &boot_id, true).unwrap();
        assert_eq!(ids(&r.tasks), ["t199"]);
        assert_eq!(r.agent_id.unwrap().as_str(), "agent-1");
    }

    #[test]
    fn damage_is_an_error_naming_the_journal_and_byte_unless_not_strict() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        let records = vec![
            put_agent("agent-1", "b"),
            put_task("old"),
            put_task("bad"),
            put_task("good"),
        ];
        drop(journal_of(&layout, records));
        let mut bytes = std::fs::read(layout.journal()).unwrap();
        let bad = scan(&bytes).entries[2].offset;
        bytes[bad + HEADER_LEN + 3] ^= 0xff;
        std::fs::write(layout.journal(), &bytes).unwrap();

        let err = recover(&layout, &boot_id, true).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("meta/journal"), "{text}");
        assert!(text.contains(&format!("record at byte {bad}")), "{text}");
        assert!(read_checkpoint(dir.path()).is_err());

        let r = recover(&layout, &boot_id, false).unwrap();
        // `old` may have been what the damaged record was about: only the
        // task written after the damage is trusted.
        assert_eq!(ids(&r.tasks), ["good"]);
        assert_eq!(r.agent_id.as_ref().unwrap().as_str(), "agent-1");
        assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
        assert_eq!(std::fs::read_dir(layout.corrupt()).unwrap().count(), 1);
        let (c, stopped) =
            Checkpointer::start(layout.clone(), r.lock, r.live, metrics(), |_| {}).unwrap();
        drop(c);
        stopped.0.unwrap().join().unwrap();
        // The next strict start finds nothing wrong.
        assert_eq!(
            ids(&recover(&layout, &boot_id, true).unwrap().tasks),
            ["good"]
        );
    }

    #[test]
    fn a_journal_without_one_intact_record_is_an_error_unless_not_strict() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        std::fs::create_dir_all(layout.meta()).unwrap();
        std::fs::write(layout.journal(), b"garbage").unwrap();
        let err = recover(&layout, &boot_id, true).unwrap_err();
        assert!(err.to_string().contains("meta/journal"), "{err}");
        assert!(err.to_string().contains("no intact record"), "{err}");
        let r = recover(&layout, &boot_id, false).unwrap();
        assert_eq!(
            (r.agent_id, r.replaces_agent_id, r.skipped.len()),
            (None, None, 1)
        );
    }

    fn pod(id: &str, ip: &str) -> pb::PodCheckpoint {
        pb::PodCheckpoint {
            pod_id: id.into(),
            framework_id: "fw".into(),
            restart_policy: pb::PodRestartPolicy::Always as i32,
            ip: ip.into(),
            volumes: [("data".to_string(), format!("/w/pods/{id}/volumes/data"))].into(),
            persistent_volumes: vec!["db-0".into()],
        }
    }

    #[test]
    fn pods_are_recovered_their_removal_sticks_and_compaction_keeps_them() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        with_writer(&layout, |c| {
            c.put_agent(&agent("agent-1", "b"));
            c.put_pod(pod("p1", "10.88.0.2"));
            c.put_pod(pod("p2", "10.88.0.3"));
            c.put_pod(pod("p1", "10.88.0.9"));
            c.remove_pod("p2");
        });
        let r = recover(&layout, &boot_id, true).unwrap();
        assert_eq!(r.pods, vec![pod("p1", "10.88.0.9")], "the last record wins");
        assert_eq!(read_checkpoint(dir.path()).unwrap().pods.len(), 1);
        let (c, stopped) =
            Checkpointer::start(layout.clone(), r.lock, r.live, metrics(), |_| {}).unwrap();
        drop(c);
        stopped.0.unwrap().join().unwrap();
        let compacted = read_checkpoint(dir.path()).unwrap();
        assert_eq!(compacted.pods, vec![pod("p1", "10.88.0.9")]);
    }

    #[test]
    fn a_pod_record_with_an_invalid_id_is_damage() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        let records = vec![
            put_agent("agent-1", "b"),
            (
                Key::Pod("x".into()),
                Op::Put(seal_record(Record::Pod(pod("../escape", "10.88.0.2")))),
            ),
            put_task("good"),
        ];
        drop(journal_of(&layout, records));
        let err = recover(&layout, &boot_id, true).unwrap_err();
        assert!(err.to_string().contains("pod_id"), "{err}");
        // Not strict: the rest is recovered.
        let r = recover(&layout, &boot_id, false).unwrap();
        assert!(r.pods.is_empty());
        assert_eq!(ids(&r.tasks), ["good"]);
    }

    #[test]
    fn a_record_naming_an_invalid_task_id_is_damage() {
        let (dir, layout) = layout();
        let boot_id = boot(dir.path(), "b");
        let records = vec![
            put_agent("agent-1", "b"),
            (
                Key::Task("fw".into(), "x".into()),
                Op::Put(seal_record(Record::Task(task("fw", "../escape")))),
            ),
            put_task("good"),
        ];
        drop(journal_of(&layout, records));
        let err = recover(&layout, &boot_id, true).unwrap_err();
        assert!(err.to_string().contains("task_id"), "{err}");
    }

    #[test]
    fn another_boot_or_format_drops_the_tasks_and_names_the_old_agent() {
        let (dir, layout) = layout();
        with_writer(&layout, |c| {
            c.put_agent(&agent("agent-1", "boot-a"));
            c.put_task("fw", "a", task("fw", "a"));
        });
        let r = recover(&layout, &boot(dir.path(), "boot-b"), true).unwrap();
        assert_eq!(r.agent_id, None);
        assert_eq!(r.replaces_agent_id.as_deref(), Some("agent-1"));
        assert!(r.tasks.is_empty());
        assert!(r.live.0.is_empty(), "the writer starts from nothing");
        drop(r);

        // A journal of another format version, same boot.
        let mut sealed = seal_record(Record::Agent(agent("agent-2", "boot-b")));
        sealed[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(layout.journal(), sealed).unwrap();
        let r = recover(&layout, &boot(dir.path(), "boot-b"), true).unwrap();
        assert_eq!(r.agent_id, None);
        assert_eq!(r.replaces_agent_id.as_deref(), Some("agent-2"));
        assert!(matches!(
            read_checkpoint(dir.path()).unwrap_err(),
            CheckpointError::Incompatible { .. }
        ));
    }

    #[test]
    fn a_format_1_checkpoint_is_replaced_and_removed() {
        let (dir, layout) = layout();
        let mut sealed = seal(&agent("agent-1", "b").encode_to_vec());
        sealed[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::create_dir_all(layout.legacy_tasks().join("fw")).unwrap();
        std::fs::write(layout.legacy_agent(), sealed).unwrap();
        std::fs::write(layout.legacy_tasks().join("fw/a"), b"a task").unwrap();
        let r = recover(&layout, &boot(dir.path(), "b"), true).unwrap();
        assert_eq!(r.agent_id, None);
        assert_eq!(r.replaces_agent_id.as_deref(), Some("agent-1"));
        assert!(!layout.legacy_agent().exists());
        assert!(!layout.legacy_tasks().exists());
    }

    #[test]
    fn no_checkpoint_is_a_new_agent() {
        let (dir, layout) = layout();
        let r = recover(&layout, &boot(dir.path(), "b"), true).unwrap();
        assert_eq!((r.agent_id, r.replaces_agent_id), (None, None));
        assert_eq!(r.boot_id, "b");
        assert!(read_checkpoint(dir.path()).unwrap().agent.is_none());
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
