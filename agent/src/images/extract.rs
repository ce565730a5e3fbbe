//! Safe extraction of one untrusted layer tar (plain or gzip) into a fresh,
//! private directory, converting OCI/AUFS whiteouts to overlayfs ones.
//!
//! Rules (each refusal fails the whole import or pull, naming the layer and
//! the entry; the caller drops the half-extracted directory):
//! - entry paths must be relative and free of `..` (Mesos'
//!   `ARCHIVE_EXTRACT_SECURE_NODOTDOT`, runc CVE-2021-30465 class);
//! - no entry is written through a symlink: every parent component is
//!   checked with `lstat` from the layer root down and must be a real
//!   directory (missing ones are created), files are created with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW`, and metadata calls never dereference
//!   (`lchown`, `lsetxattr`, `utimensat(AT_SYMLINK_NOFOLLOW)`). The
//!   `lstat`-then-use pattern is race-free here because the directory is a
//!   fresh one under the store's private `tmp/` that only this thread
//!   writes;
//! - symlinks: absolute targets are normal (busybox's `/bin/busybox`) and
//!   kept, since they resolve inside the container's root at run time; a
//!   relative target that lexically climbs above the layer root from where
//!   the link sits is refused;
//! - hardlinks: the target must be relative, `..`-free and already
//!   extracted from this same layer (not a directory);
//! - devices: only overlay whiteouts (char 0:0) and the standard character
//!   pseudo-devices (null, zero, full, random, urandom, tty, console, ptmx)
//!   are kept; block devices and other character devices are refused.
//!   FIFOs are kept;
//! - modes are kept including setuid/setgid/sticky: containers run with
//!   `no_new_privs`, so a setuid binary cannot raise privileges (the same
//!   choice as Docker/containerd, which keep them too); owners are kept
//!   numerically (we extract as root); mtimes are kept;
//! - xattrs from PAX `SCHILY.xattr.*` records: `user.*` and
//!   `security.capability` are kept, everything else (notably
//!   `trusted.overlay.*`, which would steer overlayfs) is dropped;
//! - whiteouts: `.wh.NAME` becomes a 0/0 character device `NAME`;
//!   `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory; other
//!   `.wh..wh.*` AUFS metadata is skipped.
//!
//! The uncompressed stream is hashed while it is read (to the end, past the
//! tar trailer) so the caller can check it against the config's `diff_id`.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use sha2::{Digest, Sha256};

use super::ImageError;

/// What an extraction produced.
#[derive(Debug, Clone)]
pub(crate) struct Extracted {
    /// `sha256:` of the uncompressed tar stream.
    pub diff_id: String,
    /// Sum of the regular files' sizes.
    pub size_bytes: u64,
}

/// The xattr that marks an overlayfs directory opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const AUFS_META_PREFIX: &[u8] = b".wh..wh.";

/// Character devices an image may carry (Linux `devices.txt`): null, zero,
/// full, random, urandom (1:3,5,7,8,9), tty, console, ptmx (5:0,1,2).
const ALLOWED_CHAR_DEVICES: &[(u32, u32)] = &[
    (1, 3),
    (1, 5),
    (1, 7),
    (1, 8),
    (1, 9),
    (5, 0),
    (5, 1),
    (5, 2),
];

/// Extracts the layer `blob` (tar, optionally gzip; zstd is refused) into
/// `dest`, an existing empty directory. `layer` names the layer in errors.
/// Blocking.
pub(crate) fn extract_layer<R: Read>(
    blob: R,
    dest: &Path,
    layer: &str,
) -> Result<Extracted, ImageError> {
    let bad = |reason: String| ImageError::BadLayer {
        layer: layer.to_string(),
        reason,
    };
    let mut buffered = BufReader::with_capacity(256 * 1024, blob);
    let head = buffered
        .fill_buf()
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    let decompressed: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(MultiGzDecoder::new(buffered))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(ImageError::Unsupported(format!(
            "layer {layer} is zstd-compressed; only plain and gzip layers are supported"
        )));
    } else {
        Box::new(buffered)
    };
    let mut hashing = HashingReader::new(decompressed);
    let size_bytes;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let mut x = Extractor {
            root: dest,
            layer,
            dirs: BTreeMap::new(),
            size: 0,
        };
        let entries = archive
            .entries()
            .map_err(|e| bad(format!("not a tar stream: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| bad(format!("corrupt tar stream: {e}")))?;
            x.entry(entry)?;
        }
        size_bytes = x.size;
        x.finish()?;
    }
    // The tar reader stops at the end-of-archive blocks; the diff_id covers
    // the whole stream, padding included.
    io::copy(&mut hashing, &mut io::sink())
        .map_err(|e| bad(format!("cannot read to the end: {e}")))?;
    Ok(Extracted {
        diff_id: hashing.digest(),
        size_bytes,
    })
}

/// Hashes what passes through (sha256) and counts it.
pub(crate) struct HashingReader<R> {
    inner: R,
    pub hasher: Sha256,
    pub count: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    pub fn digest(self) -> String {
        format!("sha256:{}", hex::encode(self.hasher.finalize()))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// sha256 of a whole file, `sha256:<hex>`, and its size.
pub(crate) fn file_digest(path: &Path) -> Result<(String, u64), ImageError> {
    let f = fs::File::open(path).map_err(|e| ImageError::io("open", path, e))?;
    let mut r = HashingReader::new(f);
    io::copy(&mut r, &mut io::sink()).map_err(|e| ImageError::io("read", path, e))?;
    let n = r.count;
    Ok((r.digest(), n))
}

/// Splits an entry path into normal components; refuses absolute paths and
/// `..` anywhere. `./` prefixes and `.` components are dropped.
pub(crate) fn normalize(path: &Path) -> Result<Vec<OsString>, &'static str> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
            Component::ParentDir => return Err("'..' path component"),
            Component::CurDir => {}
            Component::Normal(n) => out.push(n.to_os_string()),
        }
    }
    Ok(out)
}

/// Whether a relative symlink `target`, placed in a directory `depth`
/// components below the layer root, climbs above the root. Absolute targets
/// never do: they resolve inside the container root at run time.
pub(crate) fn symlink_escapes(depth: usize, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut level = depth as i64;
    for c in target.components() {
        match c {
            Component::ParentDir => {
                level -= 1;
                if level < 0 {
                    return true;
                }
            }
            Component::Normal(_) => level += 1,
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    false
}

/// Metadata of one entry, applied after its content.
#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

struct Extractor<'a> {
    root: &'a Path,
    layer: &'a str,
    /// Directories get their metadata at the end, deepest first, so that
    /// creating their children neither trips over read-only modes nor
    /// bumps their mtimes afterwards. Later entries for a path win.
    dirs: BTreeMap<PathBuf, Meta>,
    size: u64,
}

impl Extractor<'_> {
    fn refuse(&self, entry: &str, reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer.to_string(),
            entry: entry.to_string(),
            reason: reason.into(),
        }
    }

    fn io(&self, entry: &str, what: &str, e: impl std::fmt::Display) -> ImageError {
        ImageError::BadLayer {
            layer: self.layer.to_string(),
            reason: format!("entry '{entry}': cannot {what}: {e}"),
        }
    }

    fn entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), ImageError> {
        let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let path = entry
            .path()
            .map_err(|e| self.refuse(&shown, format!("unreadable path: {e}")))?
            .into_owned();
        let comps = normalize(&path).map_err(|r| self.refuse(&shown, r))?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            return Ok(());
        }
        let meta = self.meta(&shown, &mut entry)?;

        let Some((name, parents)) = comps.split_last() else {
            // `./` itself: the layer root's own metadata.
            if kind.is_dir() {
                self.dirs.insert(self.root.to_path_buf(), meta);
                return Ok(());
            }
            return Err(self.refuse(&shown, "a non-directory entry for the layer root"));
        };

        if let Some(wh) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            let parent = self.ensure_parents(&shown, parents)?;
            if name.as_bytes() == OPAQUE_MARKER {
                return xattr::set(&parent, OPAQUE_XATTR, b"y")
                    .map_err(|e| self.io(&shown, "set the opaque xattr", e));
            }
            if name.as_bytes().starts_with(AUFS_META_PREFIX) {
                return Ok(());
            }
            if wh.is_empty() || wh == b"." || wh == b".." {
                return Err(self.refuse(&shown, "whiteout of an invalid name"));
            }
            let target = parent.join(OsStr::from_bytes(wh));
            self.clear(&shown, &target)?;
            return self.whiteout(&shown, &target);
        }

        match kind {
            tar::EntryType::Directory => {
                let path = self.ensure_parents(&shown, parents)?.join(name);
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.clear(&shown, &path)?;
                        self.mkdir(&shown, &path)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => self.mkdir(&shown, &path)?,
                    Err(e) => return Err(self.io(&shown, "stat", e)),
                }
                self.dirs.insert(path, meta);
                Ok(())
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let path = self.prepare(&shown, parents, name)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(|e| self.io(&shown, "create", e))?;
                let n = io::copy(&mut entry, &mut f).map_err(|e| self.io(&shown, "write", e))?;
                drop(f);
                self.size += n;
                self.apply(&shown, &path, &meta, false)
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| self.refuse(&shown, format!("unreadable link target: {e}")))?
                    .ok_or_else(|| self.refuse(&shown, "symlink without a target"))?
                    .into_owned();
                if target.as_os_str().is_empty() {
                    return Err(self.refuse(&shown, "symlink with an empty target"));
                }
                if symlink_escapes(parents.len(), &target) {
                    return Err(self.refuse(
                        &shown,
                        format!(
                            "symlink target '{}' escapes the layer root",
                            target.display()
                        ),
                    ));
                }
                let path = self.prepare(&shown, parents, name)?;
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(|e| self.io(&shown, "create symlink", e))?;
                self.apply(&shown, &path, &meta, true)
            }
            tar::EntryType::Link => {
                let raw = entry
                    .link_name()
                    .map_err(|e| self.refuse(&shown, format!("unreadable link target: {e}")))?
                    .ok_or_else(|| self.refuse(&shown, "hardlink without a target"))?
                    .into_owned();
                let tcomps = normalize(&raw).map_err(|r| {
                    self.refuse(&shown, format!("hardlink target '{}': {r}", raw.display()))
                })?;
                let target = self.existing(&shown, &tcomps, &raw)?;
                let path = self.prepare_link(&shown, parents, name, &target)?;
                fs::hard_link(&target, &path).map_err(|e| self.io(&shown, "create hardlink", e))
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = entry.header().device_major().ok().flatten().unwrap_or(0);
                let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
                let flag = match kind {
                    tar::EntryType::Fifo => SFlag::S_IFIFO,
                    tar::EntryType::Block => {
                        return Err(self
                            .refuse(&shown, format!("block device {major}:{minor} in an image")));
                    }
                    _ if (major, minor) == (0, 0) => {
                        // Already an overlayfs whiteout (some builders
                        // write them so).
                        let path = self.prepare(&shown, parents, name)?;
                        return self.whiteout(&shown, &path);
                    }
                    _ if ALLOWED_CHAR_DEVICES.contains(&(major, minor)) => SFlag::S_IFCHR,
                    _ => {
                        return Err(self.refuse(
                            &shown,
                            format!("character device {major}:{minor} is not allowed in an image"),
                        ));
                    }
                };
                let path = self.prepare(&shown, parents, name)?;
                mknod(
                    &path,
                    flag,
                    Mode::from_bits_truncate(0o600),
                    makedev(major.into(), minor.into()),
                )
                .map_err(|e| self.io(&shown, "mknod", e))?;
                self.apply(&shown, &path, &meta, false)
            }
            other => Err(self.refuse(&shown, format!("unsupported entry type {other:?}"))),
        }
    }

    /// Mode, owner, mtime (PAX overrides the header) and kept xattrs.
    fn meta<R: Read>(
        &self,
        shown: &str,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<Meta, ImageError> {
        let h = entry.header();
        let bad = |what: &str, e: io::Error| self.refuse(shown, format!("bad {what}: {e}"));
        let mode = h.mode().map_err(|e| bad("mode", e))?;
        let mut uid = h.uid().map_err(|e| bad("uid", e))?;
        let mut gid = h.gid().map_err(|e| bad("gid", e))?;
        let mut mtime = i64::try_from(h.mtime().map_err(|e| bad("mtime", e))?).unwrap_or(0);
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(|e| bad("pax header", e))? {
            for ext in pax {
                let ext = ext.map_err(|e| bad("pax record", e))?;
                let Ok(key) = ext.key() else { continue };
                let num = || {
                    ext.value()
                        .ok()
                        .and_then(|v| v.split('.').next())
                        .and_then(|v| v.parse::<i64>().ok())
                };
                match key {
                    "uid" => uid = num().and_then(|v| u64::try_from(v).ok()).unwrap_or(uid),
                    "gid" => gid = num().and_then(|v| u64::try_from(v).ok()).unwrap_or(gid),
                    "mtime" => mtime = num().unwrap_or(mtime),
                    _ => {
                        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                            if name.starts_with("user.") || name == "security.capability" {
                                xattrs.push((OsString::from(name), ext.value_bytes().to_vec()));
                            } else {
                                tracing::debug!(layer = %self.layer, entry = %shown, xattr = %name,
                                    "dropping xattr from image layer");
                            }
                        }
                    }
                }
            }
        }
        let uid = u32::try_from(uid).map_err(|_| self.refuse(shown, "uid out of range"))?;
        let gid = u32::try_from(gid).map_err(|_| self.refuse(shown, "gid out of range"))?;
        Ok(Meta {
            mode: mode & 0o7777,
            uid,
            gid,
            mtime,
            xattrs,
        })
    }

    /// Walks `parents` from the layer root, creating missing directories and
    /// refusing any component that is a symlink or not a directory.
    fn ensure_parents(&self, shown: &str, parents: &[OsString]) -> Result<PathBuf, ImageError> {
        let mut cur = self.root.to_path_buf();
        for (i, c) in parents.iter().enumerate() {
            cur.push(c);
            let so_far = || {
                parents[..=i]
                    .iter()
                    .map(|c| c.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/")
            };
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.refuse(
                        shown,
                        format!(
                            "parent '{}' is a symlink; extraction never follows symlinks",
                            so_far()
                        ),
                    ));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(
                        self.refuse(shown, format!("parent '{}' is not a directory", so_far()))
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => self.mkdir(shown, &cur)?,
                Err(e) => return Err(self.io(shown, "stat a parent", e)),
            }
        }
        Ok(cur)
    }

    /// Parents ready and nothing left at the entry's own path.
    fn prepare(
        &self,
        shown: &str,
        parents: &[OsString],
        name: &OsStr,
    ) -> Result<PathBuf, ImageError> {
        let path = self.ensure_parents(shown, parents)?.join(name);
        self.clear(shown, &path)?;
        Ok(path)
    }

    /// Like `prepare`, but refuses to replace the link's own target.
    fn prepare_link(
        &self,
        shown: &str,
        parents: &[OsString],
        name: &OsStr,
        target: &Path,
    ) -> Result<PathBuf, ImageError> {
        let path = self.ensure_parents(shown, parents)?.join(name);
        if path == target {
            return Err(self.refuse(shown, "hardlink to itself"));
        }
        self.clear(shown, &path)?;
        Ok(path)
    }

    /// Removes whatever an earlier entry of this layer left at `path` (the
    /// later entry wins, as in tar). Never follows a symlink.
    fn clear(&self, shown: &str, path: &Path) -> Result<(), ImageError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(path).map_err(|e| self.io(shown, "replace a directory", e))
            }
            Ok(_) => fs::remove_file(path).map_err(|e| self.io(shown, "replace a file", e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(shown, "stat", e)),
        }
    }

    /// The path of an already-extracted non-directory for a hardlink target.
    fn existing(&self, shown: &str, comps: &[OsString], raw: &Path) -> Result<PathBuf, ImageError> {
        let missing = || {
            self.refuse(
                shown,
                format!(
                    "hardlink target '{}' does not exist in the layer",
                    raw.display()
                ),
            )
        };
        let Some((name, parents)) = comps.split_last() else {
            return Err(missing());
        };
        let mut cur = self.root.to_path_buf();
        for c in parents {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(self.refuse(
                        shown,
                        format!("hardlink target '{}' goes through a symlink", raw.display()),
                    ));
                }
                _ => return Err(missing()),
            }
        }
        cur.push(name);
        match fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => Err(self.refuse(
                shown,
                format!("hardlink target '{}' is a directory", raw.display()),
            )),
            Ok(_) => Ok(cur),
            Err(_) => Err(missing()),
        }
    }

    fn mkdir(&self, shown: &str, path: &Path) -> Result<(), ImageError> {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(path)
            .map_err(|e| self.io(shown, "create a directory", e))
    }

    /// An overlayfs whiteout: a 0/0 character device owned by root.
    fn whiteout(&self, shown: &str, path: &Path) -> Result<(), ImageError> {
        mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
            .map_err(|e| self.io(shown, "create a whiteout (needs root)", e))
    }

    /// Owner, then mode (chown clears setuid bits and file capabilities),
    /// then xattrs, then mtime; none of it dereferences a symlink.
    fn apply(&self, shown: &str, path: &Path, m: &Meta, symlink: bool) -> Result<(), ImageError> {
        std::os::unix::fs::lchown(path, Some(m.uid), Some(m.gid))
            .map_err(|e| self.io(shown, "chown", e))?;
        if !symlink {
            // `path` is no symlink (we just created it), so following is moot.
            fs::set_permissions(path, fs::Permissions::from_mode(m.mode))
                .map_err(|e| self.io(shown, "chmod", e))?;
            for (k, v) in &m.xattrs {
                xattr::set(path, k, v).map_err(|e| self.io(shown, "set an xattr", e))?;
            }
        }
        let t = filetime::FileTime::from_unix_time(m.mtime, 0);
        filetime::set_symlink_file_times(path, t, t).map_err(|e| self.io(shown, "set mtime", e))
    }

    fn finish(self) -> Result<(), ImageError> {
        let mut dirs: Vec<_> = self.dirs.iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (path, meta) in dirs {
            // A later entry may have replaced the directory with a file.
            match fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            let shown = path
                .strip_prefix(self.root)
                .unwrap_or(path)
                .display()
                .to_string();
            self.apply(&shown, path, meta, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_refuses_absolute_and_dotdot() {
        assert_eq!(
            normalize(Path::new("./a/./b")).unwrap(),
            vec![OsString::from("a"), OsString::from("b")]
        );
        assert!(normalize(Path::new("./")).unwrap().is_empty());
        assert!(normalize(Path::new("/etc/passwd")).is_err());
        assert!(normalize(Path::new("a/../../b")).is_err());
        assert!(normalize(Path::new("a/..")).is_err());
    }

    #[test]
    fn symlink_escape_is_lexical_from_the_link() {
        assert!(!symlink_escapes(0, Path::new("/etc/passwd")));
        assert!(!symlink_escapes(1, Path::new("busybox")));
        assert!(!symlink_escapes(1, Path::new("../lib/x")));
        assert!(symlink_escapes(0, Path::new("../x")));
        assert!(symlink_escapes(1, Path::new("../../x")));
        assert!(symlink_escapes(2, Path::new("a/../../../../x")));
        assert!(!symlink_escapes(2, Path::new("./../..")));
    }
}
