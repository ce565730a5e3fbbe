//! Persistent volumes on the agent's disk: disk a framework reserved on this
//! agent (`CreateVolume`), which outlives the pods that mount it (Mesos
//! persistent volumes, a Kubernetes local PersistentVolume).
//!
//! Layout under the work dir:
//!
//! - `volumes/<framework_id>/<volume_id>/`: the data, what pods bind-mount.
//! - `volume-meta/records/<framework_id>/<volume_id>`: the volume's record
//!   (JSON: its ids and `disk_mib`). The record is what makes a volume
//!   exist: a create writes it last (temp file, fsync, rename, fsync the
//!   dir), a destroy removes it first. A crash therefore leaves a whole
//!   volume, or data without a record, which the next start removes.
//! - `volume-meta/tmp/`: records being written; emptied at start.
//! - `volume-meta/trash/`: data of destroyed volumes being deleted.
//!
//! Records do not sit next to the data (`<volume_id>.volume`): every name
//! under `volumes/<framework_id>/` is some valid volume id, so the record
//! of `x` would be the data dir of a volume named `x.volume`.
//!
//! [`VolumeStore`] is the blocking file layer. [`Volumes`] is the handle
//! the actor and pod launches use: every operation runs in order on one
//! thread of its own, so a `CreateVolume` followed by a pod that mounts the
//! volume (one Accept, two messages) is always created before the pod
//! looks it up, and a destroy followed by a create of the same id never
//! interleaves. Deleting a destroyed volume's data, which can be large, is
//! a rename into the trash on that thread and the deletion on another.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_proto::resources::MAX_SCALAR;
use corral_proto::{Amount, FrameworkId, IdError, VolumeId, pb};
use metrics::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Under the work dir: the volumes' data.
const DATA_DIR: &str = "volumes";
/// Under the work dir: records, temp files and trash.
const META_DIR: &str = "volume-meta";

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error("{field}: must be finite, at least 0.001 and at most {MAX_SCALAR:e}, got {value}")]
    InvalidDisk { field: String, value: f64 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("corrupt volume record {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        name: &'static str,
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { what, path, source }
}

/// A volume's identity: unique per framework, so a framework id with it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct VolumeKey {
    pub(crate) framework_id: FrameworkId,
    pub(crate) volume_id: VolumeId,
}

impl VolumeKey {
    /// Validates both ids; errors name `<field>.framework_id` or `<field>.id`.
    pub(crate) fn parse(
        framework_id: &str,
        volume_id: &str,
        field: &str,
    ) -> Result<VolumeKey, VolumeError> {
        Ok(VolumeKey {
            framework_id: FrameworkId::parse(framework_id, &format!("{field}.framework_id"))?,
            volume_id: VolumeId::parse(volume_id, &format!("{field}.id"))?,
        })
    }
}

/// A volume's size from the wire or a record: finite, > 0 once rounded to
/// the thousandth of a MiB, at most `MAX_SCALAR` — the master's rule, so
/// every size the agent reports the master takes back.
pub(crate) fn validate_disk_mib(value: f64, field: &str) -> Result<f64, VolumeError> {
    match Amount::from_f64(value, field) {
        Ok(amount) if !amount.is_zero() => Ok(value),
        _ => Err(VolumeError::InvalidDisk {
            field: field.to_string(),
            value,
        }),
    }
}

/// Where the data of a framework's volume lives (what pods mount).
pub(crate) fn data_dir(work_dir: &Path, framework_id: &FrameworkId, id: &VolumeId) -> PathBuf {
    work_dir
        .join(DATA_DIR)
        .join(framework_id.as_str())
        .join(id.as_str())
}

/// The record as written to disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Record {
    framework_id: String,
    volume_id: String,
    disk_mib: f64,
}

/// What a destroy did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Retired {
    /// There was a record: the volume existed.
    pub(crate) existed: bool,
    /// The data, moved into the trash, still to be deleted (see
    /// [`remove_path`]); `None` when nothing is left to delete.
    pub(crate) trash: Option<PathBuf>,
}

/// The volumes' files. Blocking (fsync, deletes): callers run it on a
/// thread of its own or the blocking pool, one operation at a time.
#[derive(Debug, Clone)]
pub(crate) struct VolumeStore {
    work_dir: PathBuf,
    data: PathBuf,
    records: PathBuf,
    tmp: PathBuf,
    trash: PathBuf,
}

impl VolumeStore {
    /// Creates the dirs if needed and brings the disk back to "a volume is
    /// its record and its data": leftover temp files are removed, data
    /// without a record (a create or destroy cut short by a crash) moves to
    /// the trash, and a record whose data dir is gone gets an empty one.
    /// Returns the store and what is in the trash, to delete in the
    /// background.
    pub(crate) fn open(work_dir: &Path) -> Result<(VolumeStore, Vec<PathBuf>), VolumeError> {
        let meta = work_dir.join(META_DIR);
        let store = VolumeStore {
            work_dir: work_dir.to_path_buf(),
            data: work_dir.join(DATA_DIR),
            records: meta.join("records"),
            tmp: meta.join("tmp"),
            trash: meta.join("trash"),
        };
        for dir in [&store.data, &store.records, &store.tmp, &store.trash] {
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
        }
        for entry in fs::read_dir(&store.tmp).map_err(io_err("cannot read", &store.tmp))? {
            let path = entry.map_err(io_err("cannot read", &store.tmp))?.path();
            remove_path(&path)?;
        }
        store.sweep_orphans()?;
        for volume in store.list() {
            let (Ok(fw), Ok(id)) = (
                FrameworkId::parse(&volume.framework_id, "framework_id"),
                VolumeId::parse(&volume.id, "id"),
            ) else {
                continue;
            };
            let dir = data_dir(work_dir, &fw, &id);
            if !dir.is_dir() {
                warn!(path = %dir.display(), "persistent volume lost its data dir; recreating it empty");
                store.make_data_dir(&dir)?;
            }
        }
        let mut trash = Vec::new();
        for entry in fs::read_dir(&store.trash).map_err(io_err("cannot read", &store.trash))? {
            trash.push(entry.map_err(io_err("cannot read", &store.trash))?.path());
        }
        Ok((store, trash))
    }

    /// Moves data without a record into the trash; removes empty framework
    /// dirs. Entries that are not a framework's (a name that is no valid
    /// id) are left alone.
    fn sweep_orphans(&self) -> Result<(), VolumeError> {
        for framework in fs::read_dir(&self.data).map_err(io_err("cannot read", &self.data))? {
            let framework = framework.map_err(io_err("cannot read", &self.data))?;
            let name = framework.file_name();
            let Some(fw) = name
                .to_str()
                .and_then(|n| FrameworkId::parse(n, "framework_id").ok())
            else {
                warn!(path = %framework.path().display(), "not a framework's volumes dir; left alone");
                continue;
            };
            if !framework.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let fw_dir = framework.path();
            for volume in fs::read_dir(&fw_dir).map_err(io_err("cannot read", &fw_dir))? {
                let volume = volume.map_err(io_err("cannot read", &fw_dir))?;
                let record = self.records.join(fw.as_str()).join(volume.file_name());
                match fs::symlink_metadata(&record) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        warn!(path = %volume.path().display(),
                              "persistent volume data without a record (a create or destroy cut short); removing it");
                        if fs::rename(volume.path(), unique_in(&self.trash)).is_err() {
                            remove_path(&volume.path())?;
                        }
                    }
                    Err(e) => return Err(io_err("cannot stat", &record)(e)),
                }
            }
            let _ = fs::remove_dir(&fw_dir);
        }
        if let Ok(frameworks) = fs::read_dir(&self.records) {
            for framework in frameworks.flatten() {
                // Only succeeds when empty: a framework with no volume left.
                let _ = fs::remove_dir(framework.path());
            }
        }
        Ok(())
    }

    /// Every volume with a readable record, sorted, `agent_id` empty (the
    /// caller knows it). A corrupt record is logged, naming the file, and
    /// skipped: one bad file must not hide the other volumes.
    pub(crate) fn list(&self) -> Vec<pb::PersistentVolume> {
        let mut out = Vec::new();
        let frameworks = match fs::read_dir(&self.records) {
            Ok(f) => f,
            Err(e) => {
                warn!(path = %self.records.display(), error = %e, "cannot list persistent volumes");
                return out;
            }
        };
        for framework in frameworks.flatten() {
            let path = framework.path();
            let Some(fw) = framework
                .file_name()
                .to_str()
                .and_then(|n| FrameworkId::parse(n, "framework_id").ok())
            else {
                warn!(path = %path.display(), "not a framework's volume records; skipped");
                continue;
            };
            let entries = match fs::read_dir(&path) {
                Ok(e) => e,
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot list persistent volumes");
                    continue;
                }
            };
            for entry in entries.flatten() {
                let file = entry.path();
                let Some(id) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| VolumeId::parse(n, "volume_id").ok())
                else {
                    warn!(path = %file.display(), "not a volume record (bad name); skipped");
                    continue;
                };
                let key = VolumeKey {
                    framework_id: fw.clone(),
                    volume_id: id,
                };
                match self.read_record(&key) {
                    Ok(Some(disk_mib)) => out.push(pb::PersistentVolume {
                        id: key.volume_id.to_string(),
                        framework_id: key.framework_id.to_string(),
                        agent_id: String::new(),
                        disk_mib,
                    }),
                    // Removed since the listing: not a volume any more.
                    Ok(None) => {}
                    Err(e) => warn!(path = %file.display(), error = %e,
                                    "unreadable persistent volume record; skipped"),
                }
            }
        }
        out.sort_by(|a, b| (&a.framework_id, &a.id).cmp(&(&b.framework_id, &b.id)));
        out
    }

    /// The volume's size from its record; `None` when it does not exist.
    pub(crate) fn read_record(&self, key: &VolumeKey) -> Result<Option<f64>, VolumeError> {
        let path = self.record_path(key);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("cannot read", &path)(e)),
        };
        let corrupt = |reason: String| VolumeError::Corrupt {
            path: path.clone(),
            reason,
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if record.framework_id != key.framework_id.as_str()
            || record.volume_id != key.volume_id.as_str()
        {
            return Err(corrupt(format!(
                "holds the record of volume '{}' of framework '{}'",
                record.volume_id, record.framework_id
            )));
        }
        validate_disk_mib(record.disk_mib, "disk_mib").map_err(|e| corrupt(e.to_string()))?;
        Ok(Some(record.disk_mib))
    }

    /// Where the volume's data lives.
    pub(crate) fn data_dir(&self, key: &VolumeKey) -> PathBuf {
        data_dir(&self.work_dir, &key.framework_id, &key.volume_id)
    }

    fn record_path(&self, key: &VolumeKey) -> PathBuf {
        self.records
            .join(key.framework_id.as_str())
            .join(key.volume_id.as_str())
    }

    /// Creates the volume, or makes sure it is there: idempotent. An
    /// existing volume keeps its data (and takes `disk_mib`, the master's
    /// word, if its record said otherwise or was unreadable). Data without
    /// a record is a volume destroyed half-way: a new volume starts empty.
    pub(crate) fn create(&self, key: &VolumeKey, disk_mib: f64) -> Result<PathBuf, VolumeError> {
        validate_disk_mib(disk_mib, "disk_mib")?;
        let data = self.data_dir(key);
        let write_record = match self.read_record(key) {
            Ok(Some(existing)) if existing == disk_mib => false,
            Ok(Some(existing)) => {
                warn!(framework_id = %key.framework_id, volume_id = %key.volume_id,
                      existing, disk_mib, "persistent volume created again with another size; recording the new one");
                true
            }
            Ok(None) => {
                if fs::symlink_metadata(&data).is_ok() {
                    warn!(path = %data.display(),
                          "stale data of a destroyed volume where a new one goes; removing it");
                    remove_path(&data)?;
                }
                true
            }
            Err(e @ VolumeError::Corrupt { .. }) => {
                warn!(error = %e, "rewriting a corrupt persistent volume record");
                true
            }
            Err(e) => return Err(e),
        };
        // Data first, record last: the record is the commit point.
        self.make_data_dir(&data)?;
        if write_record {
            self.write_record(key, disk_mib)?;
        }
        Ok(data)
    }

    /// `mkdir -p` of a data dir, made durable.
    fn make_data_dir(&self, data: &Path) -> Result<(), VolumeError> {
        if data.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(data).map_err(io_err("cannot create", data))?;
        if let Some(parent) = data.parent() {
            sync_dir(parent)?;
        }
        sync_dir(&self.data)
    }

    /// Writes (or replaces) a record: temp file, fsync, rename, fsync dir.
    fn write_record(&self, key: &VolumeKey, disk_mib: f64) -> Result<(), VolumeError> {
        let path = self.record_path(key);
        let record = Record {
            framework_id: key.framework_id.to_string(),
            volume_id: key.volume_id.to_string(),
            disk_mib,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| VolumeError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let tmp = unique_in(&self.tmp);
        let written = fs::File::create(&tmp).and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("cannot write", &tmp)(e));
        }
        let dir = self.records.join(key.framework_id.as_str());
        let new_dir = !dir.is_dir();
        let renamed = fs::create_dir_all(&dir)
            .map_err(io_err("cannot create", &dir))
            .and_then(|()| fs::rename(&tmp, &path).map_err(io_err("cannot rename into", &path)));
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        sync_dir(&dir)?;
        if new_dir {
            sync_dir(&self.records)?;
        }
        Ok(())
    }

    /// The quick part of a destroy: the record goes (from now on the volume
    /// does not exist), then the data moves into the trash in one rename.
    /// When the rename is impossible (`volumes/` on a filesystem of its
    /// own: EXDEV) the data is deleted here instead. Idempotent.
    pub(crate) fn retire(&self, key: &VolumeKey) -> Result<Retired, VolumeError> {
        let record = self.record_path(key);
        let existed = match fs::remove_file(&record) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err("cannot remove", &record)(e)),
        };
        if let Some(dir) = record.parent()
            && existed
        {
            sync_dir(dir)?;
            let _ = fs::remove_dir(dir);
        }
        let data = self.data_dir(key);
        let trash = match fs::symlink_metadata(&data) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("cannot stat", &data)(e)),
            Ok(_) => {
                let dest = unique_in(&self.trash);
                match fs::rename(&data, &dest) {
                    Ok(()) => Some(dest),
                    Err(e) => {
                        info!(path = %data.display(), error = %e,
                              "cannot move the volume into the trash; deleting it in place");
                        remove_path(&data)?;
                        None
                    }
                }
            }
        };
        if let Some(parent) = data.parent() {
            let _ = fs::remove_dir(parent);
        }
        Ok(Retired { existed, trash })
    }
}

/// Removes a file or a whole tree (without following symlinks); a path
/// that is not there is fine.
pub(crate) fn remove_path(path: &Path) -> Result<(), VolumeError> {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot remove", path)(e)),
    }
}

/// A fresh name in `dir` (temp files, trash entries).
fn unique_in(dir: &Path) -> PathBuf {
    dir.join(uuid::Uuid::new_v4().simple().to_string())
}

/// Makes a rename or a new entry in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), VolumeError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot fsync", dir))
}

/// The volume gauges the volume thread keeps current.
#[derive(Clone)]
pub(crate) struct VolumeGauges {
    /// How many volumes there are.
    pub(crate) count: Gauge,
    /// The disk they reserve, MiB.
    pub(crate) disk_mib: Gauge,
}

/// What the volume thread is asked to do, in order.
enum Op {
    Create {
        key: VolumeKey,
        disk_mib: f64,
    },
    Destroy {
        key: VolumeKey,
    },
    /// The data dir, once every earlier operation is done; or why there is
    /// no such volume.
    Lookup {
        key: VolumeKey,
        reply: oneshot::Sender<Result<PathBuf, String>>,
    },
    List {
        reply: oneshot::Sender<Vec<pb::PersistentVolume>>,
    },
}

/// The handle to the agent's volumes: cheap to clone. Operations run in
/// the order they are sent, on the volume thread; the thread ends (after
/// the last queued operation) when every handle is dropped.
#[derive(Clone, Debug)]
pub(crate) struct Volumes {
    ops: mpsc::UnboundedSender<Op>,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Create { key, .. } => write!(f, "Create({key:?})"),
            Op::Destroy { key } => write!(f, "Destroy({key:?})"),
            Op::Lookup { key, .. } => write!(f, "Lookup({key:?})"),
            Op::List { .. } => f.write_str("List"),
        }
    }
}

/// Resolves once the volume thread has run every queued operation and
/// stopped.
#[derive(Debug)]
pub(crate) struct VolumesStopped(oneshot::Receiver<()>);

impl VolumesStopped {
    /// Waits at most `bound`; `false` if the thread is still busy.
    pub(crate) async fn wait(self, bound: Duration) -> bool {
        tokio::time::timeout(bound, self.0).await.is_ok()
    }
}

impl Volumes {
    /// Starts the volume thread (and the one that deletes the trash, which
    /// begins with `trash`). Logs go to `span`.
    pub(crate) fn start(
        store: VolumeStore,
        trash: Vec<PathBuf>,
        gauges: VolumeGauges,
        span: tracing::Span,
    ) -> Result<(Volumes, VolumesStopped), VolumeError> {
        let (reap_tx, reap_rx) = std::sync::mpsc::channel::<PathBuf>();
        let reaper_span = span.clone();
        std::thread::Builder::new()
            .name("corral-volume-trash".into())
            .spawn(move || {
                let _entered = reaper_span.enter();
                // Ends when the volume thread (the only sender) ends.
                for path in reap_rx {
                    if let Err(e) = remove_path(&path) {
                        warn!(error = %e, "cannot delete a destroyed volume's data");
                    }
                }
            })
            .map_err(|source| VolumeError::Thread {
                name: "volume trash",
                source,
            })?;
        for path in trash {
            let _ = reap_tx.send(path);
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let mut worker = Worker {
            index: BTreeMap::new(),
            store,
            gauges,
            reap: reap_tx,
        };
        std::thread::Builder::new()
            .name("corral-volumes".into())
            .spawn(move || {
                let _entered = span.enter();
                worker.resync();
                while let Some(op) = rx.blocking_recv() {
                    worker.handle(op);
                }
                drop(worker);
                let _ = stopped_tx.send(());
            })
            .map_err(|source| VolumeError::Thread {
                name: "volumes",
                source,
            })?;
        Ok((Volumes { ops: tx }, VolumesStopped(stopped_rx)))
    }

    fn send(&self, op: Op) {
        if let Err(e) = self.ops.send(op) {
            warn!(op = ?e.0, "the volume thread has stopped; volume operation dropped");
        }
    }

    /// Creates the volume (idempotent); failures are logged.
    pub(crate) fn create(&self, key: VolumeKey, disk_mib: f64) {
        self.send(Op::Create { key, disk_mib });
    }

    /// Destroys the volume and its data (idempotent); failures are logged.
    pub(crate) fn destroy(&self, key: VolumeKey) {
        self.send(Op::Destroy { key });
    }

    /// The volume's data dir once every operation sent before is done, or
    /// why it cannot be mounted (`does not exist on this agent`).
    pub(crate) async fn lookup(&self, key: VolumeKey) -> Result<PathBuf, String> {
        let (reply, rx) = oneshot::channel();
        self.ops.send(Op::Lookup { key, reply }).map_err(|_| {
            "cannot be looked up: the agent's volume thread has stopped".to_string()
        })?;
        rx.await
            .map_err(|_| "cannot be looked up: the agent's volume thread has stopped".to_string())?
    }

    /// Every volume on disk once every operation sent before is done.
    pub(crate) async fn list(&self) -> Result<Vec<pb::PersistentVolume>, String> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op::List { reply })
            .map_err(|_| "the agent's volume thread has stopped".to_string())?;
        rx.await
            .map_err(|_| "the agent's volume thread has stopped".to_string())
    }
}

/// The volume thread's state: the store and what is on it, for the gauges.
struct Worker {
    store: VolumeStore,
    index: BTreeMap<VolumeKey, f64>,
    gauges: VolumeGauges,
    /// To the trash thread.
    reap: std::sync::mpsc::Sender<PathBuf>,
}

impl Worker {
    fn handle(&mut self, op: Op) {
        match op {
            Op::Create { key, disk_mib } => match self.store.create(&key, disk_mib) {
                Ok(path) => {
                    info!(framework_id = %key.framework_id, volume_id = %key.volume_id, disk_mib,
                          path = %path.display(), "persistent volume ready");
                    self.index.insert(key, disk_mib);
                }
                Err(e) => {
                    warn!(framework_id = %key.framework_id, volume_id = %key.volume_id,
                          error = %e, "cannot create persistent volume");
                    self.refresh(&key);
                }
            },
            Op::Destroy { key } => match self.store.retire(&key) {
                Ok(retired) => {
                    info!(framework_id = %key.framework_id, volume_id = %key.volume_id,
                          existed = retired.existed, "persistent volume destroyed");
                    // The trash thread only stops after this one; if it
                    // failed anyway, delete here rather than never.
                    if let Some(trash) = retired.trash
                        && let Err(unsent) = self.reap.send(trash)
                        && let Err(e) = remove_path(&unsent.0)
                    {
                        warn!(error = %e, "cannot delete a destroyed volume's data");
                    }
                    self.index.remove(&key);
                }
                Err(e) => {
                    warn!(framework_id = %key.framework_id, volume_id = %key.volume_id,
                          error = %e, "cannot destroy persistent volume");
                    self.refresh(&key);
                }
            },
            Op::Lookup { key, reply } => {
                let _ = reply.send(self.lookup(&key));
            }
            Op::List { reply } => {
                let _ = reply.send(self.resync());
            }
        }
        self.publish();
    }

    fn lookup(&self, key: &VolumeKey) -> Result<PathBuf, String> {
        match self.store.read_record(key) {
            Ok(Some(_)) => {
                let dir = self.store.data_dir(key);
                if dir.is_dir() {
                    Ok(dir)
                } else {
                    Err(format!("has no data dir {}", dir.display()))
                }
            }
            Ok(None) => Err("does not exist on this agent".into()),
            Err(e) => Err(format!("cannot be read: {e}")),
        }
    }

    /// After a failed operation: what the disk now says about `key`.
    fn refresh(&mut self, key: &VolumeKey) {
        match self.store.read_record(key) {
            Ok(Some(disk_mib)) => {
                self.index.insert(key.clone(), disk_mib);
            }
            Ok(None) => {
                self.index.remove(key);
            }
            Err(_) => {}
        }
    }

    /// Re-reads every record; the index follows the disk.
    fn resync(&mut self) -> Vec<pb::PersistentVolume> {
        let list = self.store.list();
        self.index = list
            .iter()
            .filter_map(|v| {
                VolumeKey::parse(&v.framework_id, &v.id, "volume")
                    .ok()
                    .map(|k| (k, v.disk_mib))
            })
            .collect();
        self.publish();
        list
    }

    fn publish(&self) {
        self.gauges.count.set(self.index.len() as f64);
        self.gauges.disk_mib.set(self.index.values().sum::<f64>());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fw: &str, id: &str) -> VolumeKey {
        VolumeKey::parse(fw, id, "volume").unwrap()
    }

    /// Destroys with the data deleted right away (what the volume thread
    /// does in two steps on two threads).
    fn destroy(store: &VolumeStore, k: &VolumeKey) -> bool {
        let retired = store.retire(k).unwrap();
        if let Some(trash) = &retired.trash {
            remove_path(trash).unwrap();
        }
        retired.existed
    }

    fn open(dir: &Path) -> VolumeStore {
        let (store, trash) = VolumeStore::open(dir).unwrap();
        for t in trash {
            remove_path(&t).unwrap();
        }
        store
    }

    fn ids(store: &VolumeStore) -> Vec<(String, String, f64)> {
        store
            .list()
            .into_iter()
            .map(|v| (v.framework_id, v.id, v.disk_mib))
            .collect()
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(entries) = fs::read_dir(dir) else {
            return out;
        };
        for e in entries.flatten() {
            out.push(e.path());
            if e.file_type().unwrap().is_dir() {
                out.extend(files_under(&e.path()));
            }
        }
        out
    }

    #[test]
    fn create_makes_the_data_dir_under_volumes_and_a_record_that_list_reports() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let path = store.create(&key("fw-1", "db"), 512.0).unwrap();
        assert_eq!(path, dir.path().join("volumes/fw-1/db"));
        assert!(path.is_dir());
        store.create(&key("fw-1", "cache"), 64.5).unwrap();
        store.create(&key("fw-2", "db"), 10.0).unwrap();
        assert_eq!(
            ids(&store),
            vec![
                ("fw-1".into(), "cache".into(), 64.5),
                ("fw-1".into(), "db".into(), 512.0),
                ("fw-2".into(), "db".into(), 10.0),
            ]
        );
        assert!(store.list().iter().all(|v| v.agent_id.is_empty()));
        // Nothing half-written is left in tmp.
        assert!(files_under(&dir.path().join("volume-meta/tmp")).is_empty());
    }

    #[test]
    fn create_again_is_idempotent_and_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let k = key("fw-1", "db");
        let path = store.create(&k, 100.0).unwrap();
        fs::write(path.join("table"), "rows").unwrap();
        assert_eq!(store.create(&k, 100.0).unwrap(), path);
        assert_eq!(fs::read_to_string(path.join("table")).unwrap(), "rows");
        // Another size: the master's word is recorded, the data stays.
        store.create(&k, 200.0).unwrap();
        assert_eq!(ids(&store), vec![("fw-1".into(), "db".into(), 200.0)]);
        assert_eq!(fs::read_to_string(path.join("table")).unwrap(), "rows");
    }

    #[test]
    fn ids_and_sizes_are_validated_naming_the_field() {
        let err = VolumeKey::parse("fw-1", "../etc", "create_volume").unwrap_err();
        assert_eq!(
            err.to_string(),
            "create_volume.id: must not contain '/'",
            "{err}"
        );
        let err = VolumeKey::parse("..", "db", "create_volume").unwrap_err();
        assert!(
            err.to_string().starts_with("create_volume.framework_id:"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for bad in [0.0, 0.0004, -1.0, f64::NAN, f64::INFINITY, 1e13] {
            let err = store.create(&key("fw-1", "db"), bad).unwrap_err();
            assert!(
                err.to_string().starts_with("disk_mib: must be finite"),
                "{err}"
            );
        }
        assert!(store.list().is_empty());
        assert!(!dir.path().join("volumes/fw-1/db").exists());
    }

    #[test]
    fn destroy_removes_data_and_record_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let k = key("fw-1", "db");
        let path = store.create(&k, 100.0).unwrap();
        fs::create_dir_all(path.join("a/b")).unwrap();
        fs::write(path.join("a/b/c"), "data").unwrap();
        store.create(&key("fw-1", "other"), 1.0).unwrap();
        assert!(destroy(&store, &k));
        assert!(!path.exists());
        assert_eq!(ids(&store), vec![("fw-1".into(), "other".into(), 1.0)]);
        assert!(!destroy(&store, &k), "a second destroy is a no-op");
        assert!(files_under(&dir.path().join("volume-meta/trash")).is_empty());
        // The last volume of a framework takes its dirs along.
        assert!(destroy(&store, &key("fw-1", "other")));
        assert!(!dir.path().join("volumes/fw-1").exists());
        assert!(!dir.path().join("volume-meta/records/fw-1").exists());
    }

    #[test]
    fn retire_moves_the_data_into_the_trash_so_a_new_volume_of_that_id_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let k = key("fw-1", "db");
        let path = store.create(&k, 100.0).unwrap();
        fs::write(path.join("old"), "x").unwrap();
        let retired = store.retire(&k).unwrap();
        assert!(retired.existed);
        let trash = retired.trash.expect("moved into the trash");
        assert!(trash.join("old").is_file(), "deleted later, not here");
        assert!(!path.exists());
        let again = store.create(&k, 100.0).unwrap();
        assert!(files_under(&again).is_empty(), "a new volume starts empty");
        remove_path(&trash).unwrap();
    }

    #[test]
    fn names_that_collide_with_a_records_suffix_are_distinct_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create(&key("fw-1", "x"), 1.0).unwrap();
        store.create(&key("fw-1", "x.volume"), 2.0).unwrap();
        store.create(&key("fw-1", "x.tmp"), 3.0).unwrap();
        assert_eq!(store.list().len(), 3);
        assert!(destroy(&store, &key("fw-1", "x.volume")));
        assert_eq!(
            ids(&store),
            vec![
                ("fw-1".into(), "x".into(), 1.0),
                ("fw-1".into(), "x.tmp".into(), 3.0)
            ]
        );
    }

    #[test]
    fn a_corrupt_record_is_skipped_by_list_and_the_others_still_show() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store.create(&key("fw-1", "good"), 5.0).unwrap();
        store.create(&key("fw-1", "torn"), 5.0).unwrap();
        store.create(&key("fw-1", "moved"), 5.0).unwrap();
        store.create(&key("fw-1", "huge"), 5.0).unwrap();
        let records = dir.path().join("volume-meta/records/fw-1");
        fs::write(records.join("torn"), "{\"framework_id\": \"fw-1\", \"vol").unwrap();
        fs::write(
            records.join("moved"),
            r#"{"framework_id":"fw-1","volume_id":"good","disk_mib":5.0}"#,
        )
        .unwrap();
        fs::write(
            records.join("huge"),
            r#"{"framework_id":"fw-1","volume_id":"huge","disk_mib":-3}"#,
        )
        .unwrap();
        assert_eq!(ids(&store), vec![("fw-1".into(), "good".into(), 5.0)]);
        let err = store.read_record(&key("fw-1", "torn")).unwrap_err();
        assert!(
            err.to_string().contains("volume-meta/records/fw-1/torn"),
            "{err}"
        );
        // Reopening does not crash either, and keeps the data of the
        // unreadable ones: a record that exists is not an orphan.
        let store = open(dir.path());
        assert_eq!(store.list().len(), 1);
        assert!(dir.path().join("volumes/fw-1/torn").is_dir());
        // Creating it again repairs the record.
        store.create(&key("fw-1", "torn"), 7.0).unwrap();
        assert_eq!(store.read_record(&key("fw-1", "torn")).unwrap(), Some(7.0));
    }

    #[test]
    fn open_removes_temp_files_and_data_without_a_record_and_repairs_missing_data_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let kept = store.create(&key("fw-1", "kept"), 1.0).unwrap();
        fs::write(kept.join("f"), "x").unwrap();
        let lost = store.create(&key("fw-1", "lost"), 1.0).unwrap();
        fs::remove_dir(&lost).unwrap();
        // A destroy cut short after its record went; a create before its
        // record was written; a torn temp file.
        let orphan = dir.path().join("volumes/fw-1/orphan");
        fs::create_dir_all(orphan.join("sub")).unwrap();
        fs::write(orphan.join("sub/f"), "old").unwrap();
        fs::create_dir_all(dir.path().join("volumes/fw-9/half")).unwrap();
        fs::write(dir.path().join("volume-meta/tmp/abc"), "{\"fra").unwrap();
        drop(store);

        let (store, trash) = VolumeStore::open(dir.path()).unwrap();
        assert_eq!(trash.len(), 2, "both orphans await deletion: {trash:?}");
        for t in &trash {
            remove_path(t).unwrap();
        }
        assert!(!orphan.exists());
        assert!(!dir.path().join("volumes/fw-9").exists());
        assert!(files_under(&dir.path().join("volume-meta/tmp")).is_empty());
        assert!(lost.is_dir(), "a recorded volume gets its data dir back");
        assert_eq!(fs::read_to_string(kept.join("f")).unwrap(), "x");
        assert_eq!(store.list().len(), 2);
    }

    #[test]
    fn stray_entries_that_are_not_a_frameworks_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("volumes")).unwrap();
        fs::write(dir.path().join("volumes/README"), "operator notes").unwrap();
        let store = open(dir.path());
        assert!(store.list().is_empty());
        assert!(dir.path().join("volumes/README").is_file());
    }

    fn gauges() -> (VolumeGauges, metrics_exporter_prometheus::PrometheusHandle) {
        use metrics::{Key, Recorder};
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let meta = metrics::Metadata::new(module_path!(), metrics::Level::INFO, None);
        let g = VolumeGauges {
            count: recorder.register_gauge(&Key::from_static_name("count"), &meta),
            disk_mib: recorder.register_gauge(&Key::from_static_name("disk"), &meta),
        };
        (g, recorder.handle())
    }

    #[tokio::test]
    async fn the_volume_thread_runs_operations_in_order_and_keeps_the_gauges() {
        let dir = tempfile::tempdir().unwrap();
        let (store, trash) = VolumeStore::open(dir.path()).unwrap();
        let (g, handle) = gauges();
        let (volumes, stopped) = Volumes::start(store, trash, g, tracing::Span::none()).unwrap();
        let k = key("fw-1", "db");
        // Sent back to back: the lookup sees the create, and after the
        // destroy a lookup says it is gone.
        volumes.create(k.clone(), 128.0);
        let path = volumes.lookup(k.clone()).await.unwrap();
        assert_eq!(path, dir.path().join("volumes/fw-1/db"));
        fs::write(path.join("f"), "x").unwrap();
        volumes.create(key("fw-1", "logs"), 2.0);
        let listed = volumes.list().await.unwrap();
        assert_eq!(listed.len(), 2);
        let text = handle.render();
        assert!(text.contains("count 2"), "{text}");
        assert!(text.contains("disk 130"), "{text}");
        volumes.destroy(k.clone());
        volumes.create(k.clone(), 1.0);
        let again = volumes.lookup(k.clone()).await.unwrap();
        assert!(
            !again.join("f").exists(),
            "destroy then create: a new, empty volume"
        );
        volumes.destroy(k.clone());
        let gone = volumes.lookup(k).await.unwrap_err();
        assert_eq!(gone, "does not exist on this agent");
        drop(volumes);
        assert!(stopped.wait(Duration::from_secs(10)).await);
        let text = handle.render();
        assert!(text.contains("count 1"), "{text}");
        assert!(text.contains("disk 2"), "{text}");
    }
}
