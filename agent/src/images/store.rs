//! [`ImageStore`]: the on-disk, content-addressed store and its in-memory
//! index.
//!
//! Layout under the root (`<work-dir>/images`):
//!
//! ```text
//! lock                      flock: one ImageStore per root
//! refs.json                 canonical reference -> image id
//! images/<hex>.json         one image: config digest, diff_ids, parsed config
//! blobs/sha256/<hex>        image config blobs (verified)
//! layers/<hex>.json         one layer: diff_id, its dir under l/, size
//! l/<12 hex>/               extracted layer, shared by every image using it;
//!                           short so many fit in overlay's `lowerdir`
//! tmp/                      in-flight imports and pulls, atomic-write temps,
//!                           deleted layers; wiped on open
//! ```
//!
//! Every metadata write is write-temp, fsync, rename, fsync-dir. A layer is
//! extracted in `tmp/`, then renamed into `l/` before its record is
//! written; `open` deletes `l/` dirs without a record, records without a
//! dir, images missing a layer or config, and references to missing
//! images, so a crash anywhere leaves a consistent store.
//!
//! Locking: one `std::sync::Mutex` over the index, held only for lookups
//! and commits (renames and small JSON writes), never while downloading or
//! extracting; directories of removed layers are renamed into `tmp/` under
//! the lock and deleted after it is released.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::error::io_err;
use super::pull::{Inflight, PullCounters};
use super::reference::{ImageRef, digest_hex, id_prefix, is_lower_hex, is_sha256_digest};
use super::{Image, ImageConfig, ImageError, ImageSummary, PullStats, RemoveReport};

/// Length of a layer directory name under `l/` (hex digits of the diff_id;
/// longer only on a collision). 12 like Docker's short ids: with a 40-byte
/// root, 100 layers take about 6 KiB of overlay's one-page option string.
const SHORT_LAYER_NAME: usize = 12;

/// The image store. Cheap to clone (an `Arc` inside); `Send + Sync`.
///
/// `import`, `resolve`, `list`, `remove` and `gc` block (file I/O, fsync,
/// extraction): call them from `spawn_blocking` in async code. `pull` is
/// async and moves its blocking parts to `spawn_blocking` itself.
#[derive(Clone)]
pub struct ImageStore {
    pub(super) inner: Arc<Inner>,
}

// The store is shared across tasks and threads.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    shared::<ImageStore>();
};

pub(super) struct Inner {
    pub root: PathBuf,
    pub insecure_registries: Vec<String>,
    state: Mutex<State>,
    seq: AtomicU64,
    pub inflight: Inflight,
    pub counters: PullCounters,
    _lock: Flock<File>,
}

#[derive(Default)]
struct State {
    layers: HashMap<String, LayerRecord>,
    images: HashMap<String, ImageRecord>,
    refs: BTreeMap<String, String>,
    /// Layers that in-flight imports/pulls decided to reuse: gc keeps them.
    pins: HashMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerRecord {
    diff_id: String,
    /// Directory name under `l/`.
    dir: String,
    size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ImageRecord {
    id: String,
    /// diff_ids, bottom first, as in the config (repeats kept).
    layers: Vec<String>,
    digest: Option<String>,
    created: String,
    config: ImageConfig,
    config_size: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RefsFile {
    refs: BTreeMap<String, String>,
}

/// An image ready to be committed.
pub(super) struct StagedImage {
    pub id: String,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfig,
    pub created: String,
    pub diff_ids: Vec<String>,
    pub digest: Option<String>,
    /// Canonical references.
    pub references: Vec<String>,
}

/// A layer extracted into an operation's temp dir, diff_id verified.
pub(super) struct StagedLayer {
    pub diff_id: String,
    pub dir: PathBuf,
    pub size_bytes: u64,
}

/// A directory under `tmp/` for one operation, deleted on drop.
pub(super) struct OpDir {
    pub path: PathBuf,
}

impl Drop for OpDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %self.path.display(), error = %e, "cannot remove image temp dir");
        }
    }
}

/// Layers pinned against gc until dropped.
pub(super) struct Pins {
    inner: Arc<Inner>,
    ids: Vec<String>,
}

impl Drop for Pins {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        for id in &self.ids {
            if let Some(n) = st.pins.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    st.pins.remove(id);
                }
            }
        }
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root` and repairs what a
    /// crash may have left. `insecure_registries` (`host:port`) are the only
    /// registries pulled from over plain http. Blocking.
    pub fn open(root: PathBuf, insecure_registries: Vec<String>) -> Result<Self, ImageError> {
        let root = std::path::absolute(&root).map_err(|e| ImageError::io("resolve", &root, e))?;
        for d in ["tmp", "l", "layers", "images", "blobs/sha256"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        let lock_path = root.join("lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            if e == nix::errno::Errno::EWOULDBLOCK {
                ImageError::Locked { path: root.clone() }
            } else {
                ImageError::io("lock", &lock_path, e.into())
            }
        })?;
        wipe_dir_contents(&root.join("tmp"))?;
        let state = recover(&root)?;
        info!(root = %root.display(), images = state.images.len(), layers = state.layers.len(),
              "image store open");
        Ok(ImageStore {
            inner: Arc::new(Inner {
                root,
                insecure_registries,
                state: Mutex::new(state),
                seq: AtomicU64::new(0),
                inflight: Inflight::default(),
                counters: PullCounters::default(),
                _lock: lock,
            }),
        })
    }

    /// The store's root directory. Layer dirs are `root/l/<name>`, so a
    /// containerizer can mount with `lowerdir=l/a:l/b` relative to it (as
    /// Docker's overlay2 does) to keep the option string short.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Resolves `name[:tag]`, `name@sha256:…` or an image id (`sha256:…`,
    /// or 12+ hex digits of it) to what a container needs. Blocking (cheap).
    pub fn resolve(&self, reference: &str) -> Result<Image, ImageError> {
        let st = self.inner.lock();
        let (id, _) = find(&st, reference)?;
        let rec = &st.images[&id];
        // A layer repeated in one image (e.g. several identical empty
        // layers) is listed once, at its topmost position: the union is the
        // same, and overlayfs refuses a lowerdir given twice.
        let mut layer_ids: Vec<String> = Vec::new();
        for (i, l) in rec.layers.iter().enumerate() {
            if !rec.layers[i + 1..].contains(l) {
                layer_ids.push(l.clone());
            }
        }
        let mut layers = Vec::with_capacity(layer_ids.len());
        for l in &layer_ids {
            let lr = st
                .layers
                .get(l)
                .ok_or_else(|| ImageError::Internal(format!("image {id} lost layer {l}")))?;
            layers.push(self.inner.root.join("l").join(&lr.dir));
        }
        Ok(Image {
            id,
            layers,
            layer_ids,
            config: rec.config.clone(),
        })
    }

    /// Every image, ordered by id. Blocking (cheap).
    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        let st = self.inner.lock();
        let mut ids: Vec<&String> = st.images.keys().collect();
        ids.sort();
        Ok(ids.into_iter().map(|id| summary(&st, id)).collect())
    }

    /// Removes `reference`. A name removes that reference (a `name@digest`
    /// that was not stored as such removes the image's references in that
    /// repository); an image id removes every reference of the image. An
    /// image left without references is removed, then unused layers are
    /// collected except those in `in_use`: the layers running containers
    /// use, as diff_ids ([`Image::layer_ids`]) or as layer dir paths
    /// ([`Image::layers`], `Path::display` form). Blocking.
    pub fn remove(
        &self,
        reference: &str,
        in_use: &HashSet<String>,
    ) -> Result<RemoveReport, ImageError> {
        let mut trash = Vec::new();
        let report = {
            let mut st = self.inner.lock();
            let (id, name) = find(&st, reference)?;
            let doomed: Vec<String> = st
                .refs
                .iter()
                .filter(|(r, i)| {
                    **i == id
                        && match &name {
                            None => true,
                            Some(FoundBy::Exact(c)) => *r == c,
                            Some(FoundBy::Repository(n)) => ref_name(r) == n,
                        }
                })
                .map(|(r, _)| r.clone())
                .collect();
            for r in &doomed {
                st.refs.remove(r);
            }
            self.inner.write_refs(&st)?;
            let mut report = RemoveReport::default();
            if !st.refs.values().any(|i| *i == id) {
                report.bytes_freed += self.inner.drop_image(&mut st, &id)?;
            }
            let layers = self.inner.collect_layers(&mut st, in_use, &mut trash)?;
            report.layers_removed = layers.0;
            report.bytes_freed += layers.1;
            info!(reference, image = %id, layers_removed = report.layers_removed,
                  bytes_freed = report.bytes_freed, "image reference removed");
            report
        };
        empty_trash(trash);
        Ok(report)
    }

    /// Removes images without references and layers no image uses, except
    /// layers in `in_use` and layers in-flight imports/pulls reuse.
    /// Blocking.
    pub fn gc(&self, in_use: &HashSet<String>) -> Result<RemoveReport, ImageError> {
        let mut trash = Vec::new();
        let report = {
            let mut st = self.inner.lock();
            let referenced: HashSet<String> = st.refs.values().cloned().collect();
            let dangling: Vec<String> = st
                .images
                .keys()
                .filter(|id| !referenced.contains(*id))
                .cloned()
                .collect();
            let mut report = RemoveReport::default();
            for id in dangling {
                report.bytes_freed += self.inner.drop_image(&mut st, &id)?;
            }
            let layers = self.inner.collect_layers(&mut st, in_use, &mut trash)?;
            report.layers_removed = layers.0;
            report.bytes_freed += layers.1;
            report
        };
        empty_trash(trash);
        Ok(report)
    }

    /// Registry traffic counters since open (for tests and metrics).
    pub fn pull_stats(&self) -> PullStats {
        self.inner.counters.snapshot()
    }
}

enum FoundBy {
    /// A stored reference.
    Exact(String),
    /// `name@digest` matching an image's manifest digest: the repository.
    Repository(String),
}

/// `registry/repository` of a canonical reference.
fn ref_name(r: &str) -> &str {
    if let Some((n, _)) = r.split_once('@') {
        return n;
    }
    match r.rfind(':') {
        Some(i) if !r[i..].contains('/') => &r[..i],
        _ => r,
    }
}

/// The image id `reference` names; `None` as the second value when it was
/// an id.
fn find(st: &State, reference: &str) -> Result<(String, Option<FoundBy>), ImageError> {
    if let Some((prefix, may_be_name)) = id_prefix(reference) {
        let hits: Vec<&String> = st
            .images
            .keys()
            .filter(|id| digest_hex(id).starts_with(prefix))
            .collect();
        match hits.as_slice() {
            [one] => return Ok(((*one).clone(), None)),
            [] if !may_be_name => return Err(ImageError::NotFound(reference.to_string())),
            [] => {}
            _ => {
                return Err(ImageError::InvalidReference {
                    field: "reference",
                    value: reference.to_string(),
                    reason: format!("id prefix matches {} images", hits.len()),
                });
            }
        }
    }
    let r = ImageRef::parse(reference, "reference")?;
    let canonical = r.canonical();
    if let Some(id) = st.refs.get(&canonical) {
        return Ok((id.clone(), Some(FoundBy::Exact(canonical))));
    }
    if let Some(d) = &r.digest {
        let name = r.name();
        let hit = st.images.values().find(|img| {
            img.digest.as_deref() == Some(d.as_str())
                && st
                    .refs
                    .iter()
                    .any(|(rf, i)| *i == img.id && ref_name(rf) == name)
        });
        if let Some(img) = hit {
            return Ok((img.id.clone(), Some(FoundBy::Repository(name))));
        }
    }
    Err(ImageError::NotFound(reference.to_string()))
}

fn summary(st: &State, id: &str) -> ImageSummary {
    let rec = &st.images[id];
    let distinct: HashSet<&String> = rec.layers.iter().collect();
    let layer_bytes: u64 = distinct
        .iter()
        .filter_map(|l| st.layers.get(*l))
        .map(|l| l.size_bytes)
        .sum();
    ImageSummary {
        id: rec.id.clone(),
        references: st
            .refs
            .iter()
            .filter(|(_, i)| *i == id)
            .map(|(r, _)| r.clone())
            .collect(),
        digest: rec.digest.clone(),
        size_bytes: layer_bytes + rec.config_size,
        layers: u32::try_from(rec.layers.len()).unwrap_or(u32::MAX),
        created: rec.created.clone(),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the index half
        // updated in a way the disk does not also show; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh directory under `tmp/` for one operation.
    pub fn op_dir(&self, kind: &str) -> Result<OpDir, ImageError> {
        let path = self.tmp_path(kind);
        fs::create_dir(&path).map_err(io_err("create", &path))?;
        Ok(OpDir { path })
    }

    /// A fresh, unused path under `tmp/`.
    pub fn tmp_path(&self, kind: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{kind}-{}-{n}", std::process::id()))
    }

    /// Pins the layers of `diff_ids` that the store has; returns the pins
    /// and which ones are present (those need no download or extraction).
    pub fn pin_present(self: &Arc<Self>, diff_ids: &[String]) -> (Pins, HashSet<String>) {
        let mut st = self.lock();
        let mut present = HashSet::new();
        for d in diff_ids {
            if st.layers.contains_key(d) && present.insert(d.clone()) {
                *st.pins.entry(d.clone()).or_insert(0) += 1;
            }
        }
        let pins = Pins {
            inner: Arc::clone(self),
            ids: present.iter().cloned().collect(),
        };
        (pins, present)
    }

    /// Adds `reference` to an image the store has in full (a pull that
    /// finds the config digest here skips every blob); `None` if it has not.
    pub fn tag_existing(
        &self,
        id: &str,
        reference: &str,
        digest: Option<String>,
    ) -> Result<Option<ImageSummary>, ImageError> {
        let mut st = self.lock();
        let Some(img) = st.images.get(id) else {
            return Ok(None);
        };
        if !img.layers.iter().all(|l| st.layers.contains_key(l)) {
            return Ok(None);
        }
        if img.digest.is_none() && digest.is_some() {
            let mut rec = img.clone();
            rec.digest = digest;
            let path = self
                .root
                .join("images")
                .join(format!("{}.json", digest_hex(id)));
            self.write_json(&path, &rec)?;
            st.images.insert(id.to_string(), rec);
        }
        st.refs.insert(reference.to_string(), id.to_string());
        self.write_refs(&st)?;
        Ok(Some(summary(&st, id)))
    }

    /// Moves staged layers into `l/`, writes the images and references.
    /// Every layer an image needs must be staged here or pinned.
    pub fn commit(
        &self,
        images: Vec<StagedImage>,
        layers: Vec<StagedLayer>,
    ) -> Result<Vec<ImageSummary>, ImageError> {
        let mut st = self.lock();
        let ldir = self.root.join("l");
        let mut moved = false;
        for l in layers {
            if st.layers.contains_key(&l.diff_id) {
                continue; // a concurrent import or pull committed it first
            }
            let hex = digest_hex(&l.diff_id).to_string();
            let dir = short_name(&st, &ldir, &hex);
            let dest = ldir.join(&dir);
            fs::rename(&l.dir, &dest).map_err(io_err("move layer into", &dest))?;
            moved = true;
            let rec = LayerRecord {
                diff_id: l.diff_id.clone(),
                dir,
                size_bytes: l.size_bytes,
            };
            self.write_json(&self.root.join("layers").join(format!("{hex}.json")), &rec)?;
            st.layers.insert(l.diff_id, rec);
        }
        if moved {
            fsync_dir(&ldir)?;
        }
        for img in &images {
            if let Some(l) = img.diff_ids.iter().find(|l| !st.layers.contains_key(*l)) {
                return Err(ImageError::Internal(format!(
                    "layer {l} of image {} is neither staged nor pinned",
                    img.id
                )));
            }
        }
        for img in &images {
            let hex = digest_hex(&img.id);
            match st.images.get_mut(&img.id) {
                Some(existing) => {
                    if existing.digest.is_none() && img.digest.is_some() {
                        existing.digest = img.digest.clone();
                        let rec = existing.clone();
                        self.write_json(
                            &self.root.join("images").join(format!("{hex}.json")),
                            &rec,
                        )?;
                    }
                }
                None => {
                    let blob = self.root.join("blobs/sha256").join(hex);
                    self.write_atomic(&blob, &img.config_bytes)?;
                    let rec = ImageRecord {
                        id: img.id.clone(),
                        layers: img.diff_ids.clone(),
                        digest: img.digest.clone(),
                        created: img.created.clone(),
                        config: img.config.clone(),
                        config_size: img.config_bytes.len() as u64,
                    };
                    self.write_json(&self.root.join("images").join(format!("{hex}.json")), &rec)?;
                    st.images.insert(img.id.clone(), rec);
                }
            }
            for r in &img.references {
                if let Some(old) = st.refs.insert(r.clone(), img.id.clone())
                    && old != img.id
                {
                    info!(reference = %r, from = %old, to = %img.id, "reference moved");
                }
            }
        }
        self.write_refs(&st)?;
        Ok(images.iter().map(|i| summary(&st, &i.id)).collect())
    }

    /// Deletes an image's record and config blob; returns the bytes freed.
    fn drop_image(&self, st: &mut State, id: &str) -> Result<u64, ImageError> {
        let Some(rec) = st.images.remove(id) else {
            return Ok(0);
        };
        let hex = digest_hex(id);
        remove_file_if_exists(&self.root.join("images").join(format!("{hex}.json")))?;
        remove_file_if_exists(&self.root.join("blobs/sha256").join(hex))?;
        info!(image = %id, "image removed");
        Ok(rec.config_size)
    }

    /// Unrecords layers no image uses (and not in use or pinned), moving
    /// their dirs into `trash` for deletion after the lock is released.
    fn collect_layers(
        &self,
        st: &mut State,
        in_use: &HashSet<String>,
        trash: &mut Vec<PathBuf>,
    ) -> Result<(u32, u64), ImageError> {
        let used: HashSet<&String> = st.images.values().flat_map(|i| i.layers.iter()).collect();
        let ldir = self.root.join("l");
        let unused: Vec<String> = st
            .layers
            .iter()
            .filter(|(l, rec)| {
                !used.contains(l)
                    && !st.pins.contains_key(*l)
                    && !in_use.contains(*l)
                    && !in_use.contains(&ldir.join(&rec.dir).display().to_string())
            })
            .map(|(l, _)| l.clone())
            .collect();
        let (mut n, mut bytes) = (0u32, 0u64);
        for l in unused {
            let Some(rec) = st.layers.remove(&l) else {
                continue;
            };
            let dir = self.root.join("l").join(&rec.dir);
            let to = self.tmp_path("gc");
            fs::rename(&dir, &to).map_err(io_err("move out", &dir))?;
            trash.push(to);
            remove_file_if_exists(
                &self
                    .root
                    .join("layers")
                    .join(format!("{}.json", digest_hex(&l))),
            )?;
            n += 1;
            bytes += rec.size_bytes;
            info!(layer = %l, bytes = rec.size_bytes, "layer collected");
        }
        Ok((n, bytes))
    }

    fn write_refs(&self, st: &State) -> Result<(), ImageError> {
        let file = RefsFile {
            refs: st.refs.clone(),
        };
        self.write_json(&self.root.join("refs.json"), &file)
    }

    fn write_json<T: Serialize>(&self, path: &Path, value: &T) -> Result<(), ImageError> {
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| ImageError::Internal(format!("cannot encode {}: {e}", path.display())))?;
        self.write_atomic(path, &bytes)
    }

    /// Write a temp file, fsync, rename over `path`, fsync the directory.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
        let tmp = self.tmp_path("write");
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err("rename into", path))?;
        if let Some(parent) = path.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }
}

/// A free name under `l/` for the layer with diff_id hex `hex`.
fn short_name(st: &State, ldir: &Path, hex: &str) -> String {
    let taken: HashSet<&str> = st.layers.values().map(|l| l.dir.as_str()).collect();
    let mut len = SHORT_LAYER_NAME;
    loop {
        let cand = &hex[..len.min(hex.len())];
        if len >= hex.len() || (!taken.contains(cand) && !ldir.join(cand).exists()) {
            return cand.to_string();
        }
        len += 4;
    }
}

/// Rebuilds the index from disk, repairing what a crash left behind.
fn recover(root: &Path) -> Result<State, ImageError> {
    let mut st = State::default();
    let ldir = root.join("l");
    for (path, rec) in read_records::<LayerRecord>(&root.join("layers"))? {
        let valid = is_sha256_digest(&rec.diff_id)
            && rec.dir.len() >= SHORT_LAYER_NAME
            && is_lower_hex(&rec.dir);
        if valid && ldir.join(&rec.dir).is_dir() {
            st.layers.insert(rec.diff_id.clone(), rec);
        } else {
            warn!(record = %path.display(), "dropping layer record without its directory");
            remove_file_if_exists(&path)?;
        }
    }
    let owned: HashSet<&str> = st.layers.values().map(|l| l.dir.as_str()).collect();
    for entry in fs::read_dir(&ldir).map_err(io_err("read", &ldir))? {
        let entry = entry.map_err(io_err("read", &ldir))?;
        let name = entry.file_name();
        if !owned.contains(name.to_string_lossy().as_ref()) {
            // Renamed into l/ but its record was never written: a crash.
            let p = entry.path();
            warn!(dir = %p.display(), "removing layer directory without a record");
            fs::remove_dir_all(&p).map_err(io_err("remove", &p))?;
        }
    }
    for (path, rec) in read_records::<ImageRecord>(&root.join("images"))? {
        let blob = root.join("blobs/sha256").join(digest_hex(&rec.id));
        let complete = is_sha256_digest(&rec.id)
            && rec.layers.iter().all(|l| st.layers.contains_key(l))
            && blob.is_file();
        if complete {
            st.images.insert(rec.id.clone(), rec);
        } else {
            warn!(record = %path.display(), "dropping image whose layers or config are missing");
            remove_file_if_exists(&path)?;
        }
    }
    let blobs = root.join("blobs/sha256");
    for entry in fs::read_dir(&blobs).map_err(io_err("read", &blobs))? {
        let entry = entry.map_err(io_err("read", &blobs))?;
        let id = format!("sha256:{}", entry.file_name().to_string_lossy());
        if !st.images.contains_key(&id) {
            remove_file_if_exists(&entry.path())?;
        }
    }
    let refs_path = root.join("refs.json");
    match fs::read(&refs_path) {
        Ok(bytes) => {
            let file: RefsFile = serde_json::from_slice(&bytes).map_err(|e| {
                ImageError::Internal(format!("corrupt {}: {e}", refs_path.display()))
            })?;
            for (r, id) in file.refs {
                if st.images.contains_key(&id) {
                    st.refs.insert(r, id);
                } else {
                    warn!(reference = %r, image = %id, "dropping reference to a missing image");
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ImageError::io("read", &refs_path, e)),
    }
    Ok(st)
}

fn read_records<T: for<'de> Deserialize<'de>>(dir: &Path) -> Result<Vec<(PathBuf, T)>, ImageError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let path = entry.map_err(io_err("read", dir))?.path();
        let parsed = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<T>(&b).ok());
        match parsed {
            Some(rec) => out.push((path, rec)),
            None => {
                warn!(record = %path.display(), "removing unreadable image store record");
                remove_file_if_exists(&path)?;
            }
        }
    }
    Ok(out)
}

fn wipe_dir_contents(dir: &Path) -> Result<(), ImageError> {
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let path = entry.map_err(io_err("read", dir))?.path();
        let r = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        r.map_err(io_err("remove", &path))?;
    }
    Ok(())
}

fn remove_file_if_exists(path: &Path) -> Result<(), ImageError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(ImageError::io("remove", path, e))
        }
        _ => Ok(()),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

fn empty_trash(trash: Vec<PathBuf>) {
    for p in trash {
        if let Err(e) = fs::remove_dir_all(&p) {
            warn!(path = %p.display(), error = %e, "cannot delete a collected layer; it goes at the next open");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ref_name_strips_tag_or_digest_only() {
        assert_eq!(ref_name("127.0.0.1:5000/a/b:v1"), "127.0.0.1:5000/a/b");
        assert_eq!(
            ref_name("127.0.0.1:5000/a/b@sha256:00"),
            "127.0.0.1:5000/a/b"
        );
        assert_eq!(
            ref_name("docker.io/library/busybox:latest"),
            "docker.io/library/busybox"
        );
    }
}
