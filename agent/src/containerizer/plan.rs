//! The mount plan: which mounts a container gets, in which order, with
//! which flags — built as plain data before the clone (pure, unit-tested
//! without root), then executed by the cloned init through [`Sys`].
//!
//! Order (runc's, `libcontainer/rootfs_linux.go`, adapted):
//! 1. `/` recursively private, so nothing propagates back to the host.
//! 2. Image rootfs: the overlay, mounted in the container's namespace.
//! 3. Bind sources opened as detached trees (`open_tree`) while host paths
//!    still resolve; read-only ones made so (`mount_setattr`) before they
//!    are ever attached.
//! 4. Image rootfs: `pivot_root(".", ".")` + detach the old root; from now
//!    on every path resolves inside the container root, so a symlink in the
//!    image cannot point a mount outside it.
//! 5. Image rootfs: a minimal `/dev` (tmpfs + nodes, pts, shm, mqueue).
//!    Host rootfs: a private `/dev/shm` only.
//! 6. The bind mounts (after `/dev`, so users may mount over `/dev/...`;
//!    before `/proc`, so no procfs magic link can be a target).
//! 7. A fresh `/proc` for the new pid namespace; `/sys` read-only.
//! 8. Masked paths (`/dev/null` over files, an empty read-only tmpfs over
//!    directories), then read-only `/proc` subtrees.

use std::ffi::{CStr, CString};
use std::os::fd::RawFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;

use super::sys::{self, FileKind, SysResult};

/// Masked like runc's default spec, plus `/proc/key-users` (Mesos).
pub(crate) const MASKED_PATHS: [&str; 12] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/key-users",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Read-only like runc's default spec.
pub(crate) const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The nodes of a minimal `/dev` (OCI runtime spec "default devices").
const DEVICES: [(&str, u32, u32); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

const DEV_SYMLINKS: [(&str, &str); 5] = [
    ("/proc/self/fd", "/dev/fd"),
    ("/proc/self/fd/0", "/dev/stdin"),
    ("/proc/self/fd/1", "/dev/stdout"),
    ("/proc/self/fd/2", "/dev/stderr"),
    ("pts/ptmx", "/dev/ptmx"),
];

/// Extra overlay options. `volatile` (Linux 5.10) skips the sync of the
/// upper layer's filesystem at unmount: a container's writable layer dies
/// with it, so durability is not needed and the sync costs milliseconds.
const OVERLAY_EXTRA_OPTIONS: &str = ",volatile";

/// mount(2) data is one page.
const MAX_MOUNT_DATA: usize = 4095;

/// The syscalls the plan needs: real ones in the cloned child
/// ([`LinuxSys`]), a recording fake in tests. Implementations used in the
/// child must be async-signal-safe.
pub(crate) trait Sys {
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> SysResult<()>;
    fn umount_detach(&self, target: &CStr) -> SysResult<()>;
    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> SysResult<()>;
    fn chdir(&self, path: &CStr) -> SysResult<()>;
    fn mkdir(&self, path: &CStr, mode: u32) -> SysResult<()>;
    fn mknod(&self, path: &CStr, mode: u32, dev: u64) -> SysResult<()>;
    fn symlink(&self, target: &CStr, link: &CStr) -> SysResult<()>;
    fn file_kind(&self, path: &CStr, follow: bool) -> SysResult<FileKind>;
    fn create_file(&self, path: &CStr) -> SysResult<()>;
    fn open_tree(&self, source: &CStr) -> SysResult<RawFd>;
    fn set_tree_read_only(&self, fd: RawFd) -> SysResult<()>;
    fn move_tree(&self, fd: RawFd, target: &CStr) -> SysResult<()>;
    fn set_path_read_only(&self, path: &CStr) -> SysResult<()>;
    fn readlink(&self, path: &CStr, buf: &mut [u8]) -> SysResult<usize>;
    fn close(&self, fd: RawFd);
}

/// The real syscalls.
pub(crate) struct LinuxSys;

impl Sys for LinuxSys {
    fn mount(
        &self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> SysResult<()> {
        sys::mount(source, target, fstype, flags, data)
    }
    fn umount_detach(&self, target: &CStr) -> SysResult<()> {
        sys::umount_detach(target)
    }
    fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> SysResult<()> {
        sys::pivot_root(new_root, put_old)
    }
    fn chdir(&self, path: &CStr) -> SysResult<()> {
        sys::chdir(path)
    }
    fn mkdir(&self, path: &CStr, mode: u32) -> SysResult<()> {
        sys::mkdir(path, mode)
    }
    fn mknod(&self, path: &CStr, mode: u32, dev: u64) -> SysResult<()> {
        sys::mknod(path, mode, dev)
    }
    fn symlink(&self, target: &CStr, link: &CStr) -> SysResult<()> {
        sys::symlink(target, link)
    }
    fn file_kind(&self, path: &CStr, follow: bool) -> SysResult<FileKind> {
        sys::file_kind(path, follow)
    }
    fn create_file(&self, path: &CStr) -> SysResult<()> {
        sys::create_file(path)
    }
    fn open_tree(&self, source: &CStr) -> SysResult<RawFd> {
        sys::open_tree(source)
    }
    fn set_tree_read_only(&self, fd: RawFd) -> SysResult<()> {
        sys::set_tree_read_only(fd)
    }
    fn move_tree(&self, fd: RawFd, target: &CStr) -> SysResult<()> {
        sys::move_tree(fd, target)
    }
    fn set_path_read_only(&self, path: &CStr) -> SysResult<()> {
        sys::set_path_read_only(path)
    }
    fn readlink(&self, path: &CStr, buf: &mut [u8]) -> SysResult<usize> {
        sys::readlink(path, buf)
    }
    fn close(&self, fd: RawFd) {
        sys::close(fd)
    }
}

/// One step of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MountOp {
    /// mount(2) as given; `optional`: a missing target (ENOENT) is skipped.
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
        optional: bool,
    },
    /// mkdir, an existing directory being fine; with `no_symlink`, the
    /// path must not be a symlink (runc refuses a symlinked /proc or /sys).
    MakeDir {
        path: CString,
        mode: u32,
        no_symlink: bool,
    },
    /// A character device node.
    MakeNode {
        path: CString,
        major: u32,
        minor: u32,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// `chdir(new_root); pivot_root(".", "."); umount2(".", MNT_DETACH);
    /// chdir("/")`: the old root ends up stacked on the new one and is
    /// detached, so it is unreachable (runc's trick).
    PivotRoot {
        new_root: CString,
    },
    /// Detached copy of `source` into fd slot `slot`.
    OpenBind {
        source: CString,
        slot: usize,
        read_only: bool,
    },
    /// Creates `target` if missing (parents first; a symlink is followed,
    /// inside the root) and attaches slot `slot` there.
    AttachBind {
        slot: usize,
        target: CString,
        file: bool,
    },
    /// An existing mount tree made read-only, recursively.
    ReadOnlyTree {
        path: CString,
    },
    /// `/dev/null` over a file, an empty read-only tmpfs over a directory;
    /// a missing path is skipped.
    Mask {
        path: CString,
    },
    /// Read-only bind of a path onto itself; a missing path is skipped.
    ReadOnly {
        path: CString,
    },
}

impl MountOp {
    /// What the step does, for error messages.
    pub(crate) fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            MountOp::Mount {
                source,
                target,
                fstype,
                flags,
                ..
            } => {
                let what = fstype
                    .as_ref()
                    .or(source.as_ref())
                    .map_or_else(|| "(none)".to_string(), s);
                if flags & libc::MS_PRIVATE != 0 {
                    format!("make {} private", s(target))
                } else {
                    format!("mount {what} on {}", s(target))
                }
            }
            MountOp::MakeDir { path, .. } => format!("create directory {}", s(path)),
            MountOp::MakeNode { path, .. } => format!("create device {}", s(path)),
            MountOp::Symlink { link, .. } => format!("create symlink {}", s(link)),
            MountOp::PivotRoot { new_root } => format!("pivot_root into {}", s(new_root)),
            MountOp::OpenBind { source, .. } => format!("open bind mount source {}", s(source)),
            MountOp::AttachBind { target, .. } => format!("bind mount on {}", s(target)),
            MountOp::Mask { path } => format!("mask {}", s(path)),
            MountOp::ReadOnly { path } | MountOp::ReadOnlyTree { path } => {
                format!("make {} read-only", s(path))
            }
        }
    }
}

/// The plan and how many detached-tree fd slots it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountPlan {
    pub(crate) ops: Vec<MountOp>,
    pub(crate) slots: usize,
    /// `ops[late..]` run after the init has joined its cgroup: on the host
    /// root, making `/sys` read-only also makes the cgroup mounts below it
    /// read-only, and the init writes to those to join.
    pub(crate) late: usize,
}

/// Which step failed and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlanFailure {
    pub(crate) step: usize,
    pub(crate) errno: Errno,
}

/// A bind mount with its source already checked on the host.
#[derive(Debug, Clone)]
pub(crate) struct PlannedBind {
    pub(crate) source: PathBuf,
    pub(crate) target: PathBuf,
    pub(crate) read_only: bool,
    /// The source is a directory (else the target is created as a file).
    pub(crate) source_is_dir: bool,
}

/// The root filesystem, as the plan needs it.
#[derive(Debug, Clone)]
pub(crate) enum PlannedRoot {
    Host,
    Overlay {
        lower: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
        target: PathBuf,
    },
}

fn cstr(path: impl AsRef<Path>) -> Result<CString, String> {
    use std::os::unix::ffi::OsStrExt;
    let path = path.as_ref();
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("path {} contains a NUL byte", path.display()))
}

fn c(s: &str) -> CString {
    // Only called with the constants of this module, which have no NUL.
    CString::new(s).unwrap_or_default()
}

/// `/a/./b//c` → `/a/b/c`; `..` is refused rather than resolved, so a
/// target means what it says.
pub(crate) fn normalize_container_path(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let mut out = PathBuf::from("/");
    for comp in path.components() {
        match comp {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => out.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("{} contains '..'", path.display()));
            }
        }
    }
    Ok(out)
}

/// The overlay `lowerdir=..,upperdir=..,workdir=..` option string. Paths
/// must not contain the option separators `,` `:` or the escape `\`.
pub(crate) fn overlay_options(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
) -> Result<String, String> {
    if lower.is_empty() {
        return Err("overlay needs at least one lower layer".into());
    }
    let check = |p: &Path| -> Result<String, String> {
        let s = p
            .to_str()
            .ok_or_else(|| format!("overlay path {} is not UTF-8", p.display()))?;
        if !p.is_absolute() {
            return Err(format!("overlay path {s} is not absolute"));
        }
        if s.contains([',', ':', '\\']) {
            return Err(format!("overlay path {s} contains ',', ':' or '\\'"));
        }
        Ok(s.to_string())
    };
    let lowers = lower
        .iter()
        .map(|p| check(p))
        .collect::<Result<Vec<_>, _>>()?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}{OVERLAY_EXTRA_OPTIONS}",
        lowers.join(":"),
        check(upper)?,
        check(work)?
    );
    if data.len() > MAX_MOUNT_DATA {
        return Err(format!(
            "overlay options are {} bytes, more than the {MAX_MOUNT_DATA} mount(2) accepts; use fewer or shorter layer paths",
            data.len()
        ));
    }
    Ok(data)
}

/// Builds the plan for `root` with `binds` (already normalized).
pub(crate) fn build(root: &PlannedRoot, binds: &[PlannedBind]) -> Result<MountPlan, String> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    let mut ops = Vec::with_capacity(64);
    let mount = |source: Option<&str>,
                 target: &str,
                 fstype: Option<&str>,
                 flags: libc::c_ulong,
                 data: Option<&str>,
                 optional: bool| MountOp::Mount {
        source: source.map(c),
        target: c(target),
        fstype: fstype.map(c),
        flags,
        data: data.map(c),
        optional,
    };
    let dir = |path: &str, no_symlink: bool| MountOp::MakeDir {
        path: c(path),
        mode: 0o755,
        no_symlink,
    };

    // 1.
    ops.push(mount(
        None,
        "/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        false,
    ));
    // 2.
    if let PlannedRoot::Overlay {
        lower,
        upper,
        work,
        target,
    } = root
    {
        ops.push(MountOp::Mount {
            source: Some(c("overlay")),
            target: cstr(target)?,
            fstype: Some(c("overlay")),
            flags: 0,
            data: Some(c(&overlay_options(lower, upper, work)?)),
            optional: false,
        });
    }
    // 3.
    for (slot, bind) in binds.iter().enumerate() {
        ops.push(MountOp::OpenBind {
            source: cstr(&bind.source)?,
            slot,
            read_only: bind.read_only,
        });
    }
    // 4. + 5.
    match root {
        PlannedRoot::Overlay { target, .. } => {
            ops.push(MountOp::PivotRoot {
                new_root: cstr(target)?,
            });
            ops.push(dir("/dev", true));
            ops.push(mount(
                Some("tmpfs"),
                "/dev",
                Some("tmpfs"),
                libc::MS_NOSUID | libc::MS_STRICTATIME,
                Some("mode=755,size=65536k"),
                false,
            ));
            for (path, major, minor) in DEVICES {
                ops.push(MountOp::MakeNode {
                    path: c(path),
                    major,
                    minor,
                });
            }
            for (target, link) in DEV_SYMLINKS {
                ops.push(MountOp::Symlink {
                    target: c(target),
                    link: c(link),
                });
            }
            ops.push(dir("/dev/pts", false));
            ops.push(mount(
                Some("devpts"),
                "/dev/pts",
                Some("devpts"),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                Some("newinstance,ptmxmode=0666,mode=0620"),
                false,
            ));
            ops.push(dir("/dev/shm", false));
            ops.push(mount(
                Some("shm"),
                "/dev/shm",
                Some("tmpfs"),
                nosuid_nodev_noexec,
                Some("mode=1777,size=65536k"),
                false,
            ));
            ops.push(dir("/dev/mqueue", false));
            ops.push(mount(
                Some("mqueue"),
                "/dev/mqueue",
                Some("mqueue"),
                nosuid_nodev_noexec,
                None,
                false,
            ));
        }
        PlannedRoot::Host => {
            // The host's /dev stays (plain command tasks may need its
            // devices), but POSIX shm follows the new IPC namespace.
            ops.push(mount(
                Some("shm"),
                "/dev/shm",
                Some("tmpfs"),
                nosuid_nodev_noexec,
                Some("mode=1777,size=65536k"),
                true,
            ));
        }
    }
    // 6.
    for (slot, bind) in binds.iter().enumerate() {
        let target = normalize_container_path(&bind.target)?;
        ops.push(MountOp::AttachBind {
            slot,
            target: cstr(&target)?,
            file: !bind.source_is_dir,
        });
    }
    // 7.
    let is_overlay = matches!(root, PlannedRoot::Overlay { .. });
    if is_overlay {
        ops.push(dir("/proc", true));
    }
    ops.push(mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        nosuid_nodev_noexec,
        None,
        false,
    ));
    if is_overlay {
        ops.push(dir("/sys", true));
        ops.push(mount(
            Some("sysfs"),
            "/sys",
            Some("sysfs"),
            libc::MS_RDONLY | nosuid_nodev_noexec,
            None,
            false,
        ));
    }
    // 8.
    for path in MASKED_PATHS {
        ops.push(MountOp::Mask { path: c(path) });
    }
    for path in READONLY_PATHS {
        ops.push(MountOp::ReadOnly { path: c(path) });
    }
    let late = ops.len();
    if !is_overlay {
        // A second sysfs of the same network namespace on the same mount
        // point is EBUSY; make the host's (our private copy) read-only.
        ops.push(MountOp::ReadOnlyTree { path: c("/sys") });
    }
    Ok(MountPlan {
        ops,
        slots: binds.len(),
        late,
    })
}

fn ignore(result: SysResult<()>, ok: Errno) -> SysResult<()> {
    match result {
        Err(e) if e == ok => Ok(()),
        other => other,
    }
}

/// PATH_MAX: the longest path the child handles.
const PATH_MAX: usize = 4096;
/// Symlinks followed when creating a bind mount target.
const MAX_LINK_HOPS: usize = 16;

/// A NUL-terminated path in a fixed buffer (the child cannot allocate).
struct FixedPath {
    buf: [u8; PATH_MAX],
    len: usize,
}

impl FixedPath {
    fn new(path: &[u8]) -> SysResult<FixedPath> {
        let mut p = FixedPath {
            buf: [0; PATH_MAX],
            len: 0,
        };
        p.set(path)?;
        Ok(p)
    }

    fn set(&mut self, path: &[u8]) -> SysResult<()> {
        let dst = self.buf.get_mut(..path.len()).ok_or(Errno::ENAMETOOLONG)?;
        dst.copy_from_slice(path);
        *self.buf.get_mut(path.len()).ok_or(Errno::ENAMETOOLONG)? = 0;
        self.len = path.len();
        Ok(())
    }

    /// Replaces the last component with `rel` (a relative symlink).
    fn replace_last(&mut self, rel: &[u8]) -> SysResult<()> {
        let head = self.buf.get(..self.len).unwrap_or(&[]);
        let cut = head.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        let end = cut + rel.len();
        let dst = self.buf.get_mut(cut..end).ok_or(Errno::ENAMETOOLONG)?;
        dst.copy_from_slice(rel);
        *self.buf.get_mut(end).ok_or(Errno::ENAMETOOLONG)? = 0;
        self.len = end;
        Ok(())
    }

    /// The path, or its prefix up to a NUL put there by `make_parents`.
    fn as_cstr(&self) -> &CStr {
        CStr::from_bytes_until_nul(&self.buf).unwrap_or(c"")
    }
}

/// `mkdir -p` of the parents of `p`, existing ones being fine.
fn make_parents<S: Sys>(sys: &S, p: &mut FixedPath) -> SysResult<()> {
    for i in 1..p.len {
        if p.buf.get(i) == Some(&b'/') {
            if let Some(b) = p.buf.get_mut(i) {
                *b = 0;
            }
            let r = sys.mkdir(p.as_cstr(), 0o755);
            if let Some(b) = p.buf.get_mut(i) {
                *b = b'/';
            }
            ignore(r, Errno::EEXIST)?;
        }
    }
    Ok(())
}

/// Creates a bind mount target (a directory, or an empty file) unless it
/// exists. A symlink is followed — after the pivot every path resolves in
/// the container root, so it cannot lead out — and its destination is
/// created, as runc does with securejoin.
fn create_target<S: Sys>(sys: &S, target: &CStr, file: bool) -> SysResult<()> {
    let mut p = FixedPath::new(target.to_bytes())?;
    let mut link = [0u8; PATH_MAX];
    for _ in 0..MAX_LINK_HOPS {
        make_parents(sys, &mut p)?;
        match sys.file_kind(p.as_cstr(), false) {
            Err(Errno::ENOENT) if file => return sys.create_file(p.as_cstr()),
            Err(Errno::ENOENT) => return ignore(sys.mkdir(p.as_cstr(), 0o755), Errno::EEXIST),
            Err(e) => return Err(e),
            Ok(FileKind::Symlink) => {
                let n = sys.readlink(p.as_cstr(), &mut link)?;
                let dest = link.get(..n).ok_or(Errno::ENAMETOOLONG)?;
                if dest.first() == Some(&b'/') {
                    p.set(dest)?;
                } else {
                    p.replace_last(dest)?;
                }
            }
            Ok(_) => return Ok(()),
        }
    }
    Err(Errno::ELOOP)
}

/// Runs one step. Allocation-free: runs in the cloned child.
fn run_op<S: Sys>(op: &MountOp, sys: &S, slots: &mut [RawFd]) -> SysResult<()> {
    match op {
        MountOp::Mount {
            source,
            target,
            fstype,
            flags,
            data,
            optional,
        } => {
            let r = sys.mount(
                source.as_deref(),
                target,
                fstype.as_deref(),
                *flags,
                data.as_deref(),
            );
            if *optional {
                ignore(r, Errno::ENOENT)
            } else {
                r
            }
        }
        MountOp::MakeDir {
            path,
            mode,
            no_symlink,
        } => {
            ignore(sys.mkdir(path, *mode), Errno::EEXIST)?;
            if *no_symlink {
                match sys.file_kind(path, false)? {
                    FileKind::Dir => {}
                    FileKind::Symlink => return Err(Errno::ELOOP),
                    FileKind::Other => return Err(Errno::ENOTDIR),
                }
            }
            Ok(())
        }
        MountOp::MakeNode { path, major, minor } => {
            let dev = libc::makedev(*major, *minor);
            sys.mknod(path, libc::S_IFCHR | 0o666, dev)
        }
        MountOp::Symlink { target, link } => ignore(sys.symlink(target, link), Errno::EEXIST),
        MountOp::PivotRoot { new_root } => {
            sys.chdir(new_root)?;
            sys.pivot_root(c".", c".")?;
            sys.umount_detach(c".")?;
            sys.chdir(c"/")
        }
        MountOp::OpenBind {
            source,
            slot,
            read_only,
        } => {
            let fd = sys.open_tree(source)?;
            match slots.get_mut(*slot) {
                Some(s) => *s = fd,
                None => {
                    sys.close(fd);
                    return Err(Errno::EBADF);
                }
            }
            if *read_only {
                sys.set_tree_read_only(fd)?;
            }
            Ok(())
        }
        MountOp::AttachBind { slot, target, file } => {
            let fd = slots.get(*slot).copied().ok_or(Errno::EBADF)?;
            create_target(sys, target, *file)?;
            sys.move_tree(fd, target)?;
            sys.close(fd);
            Ok(())
        }
        MountOp::ReadOnlyTree { path } => sys.set_path_read_only(path),
        MountOp::Mask { path } => match sys.file_kind(path, true) {
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e),
            Ok(FileKind::Dir) => sys.mount(
                Some(c"tmpfs"),
                path,
                Some(c"tmpfs"),
                libc::MS_RDONLY,
                Some(c"size=0"),
            ),
            Ok(_) => sys.mount(Some(c"/dev/null"), path, None, libc::MS_BIND, None),
        },
        MountOp::ReadOnly { path } => {
            match sys.mount(Some(path), path, None, libc::MS_BIND | libc::MS_REC, None) {
                Err(Errno::ENOENT) => return Ok(()),
                other => other?,
            }
            // Remount flags replace the per-mount flags: keep proc's
            // nosuid/nodev/noexec.
            let flags = libc::MS_BIND
                | libc::MS_REMOUNT
                | libc::MS_RDONLY
                | libc::MS_NOSUID
                | libc::MS_NODEV
                | libc::MS_NOEXEC;
            sys.mount(None, path, None, flags, None)
        }
    }
}

/// Runs `plan.ops[range]`, stopping at the first failing step.
/// Allocation-free.
pub(crate) fn execute_range<S: Sys>(
    plan: &MountPlan,
    range: std::ops::Range<usize>,
    sys: &S,
    slots: &mut [RawFd],
) -> Result<(), PlanFailure> {
    let start = range.start;
    for (i, op) in plan.ops.get(range).unwrap_or(&[]).iter().enumerate() {
        if let Err(errno) = run_op(op, sys, slots) {
            return Err(PlanFailure {
                step: start + i,
                errno,
            });
        }
    }
    Ok(())
}

/// Runs the whole plan (tests; the init runs it in two parts).
#[cfg(test)]
pub(crate) fn execute<S: Sys>(
    plan: &MountPlan,
    sys: &S,
    slots: &mut [RawFd],
) -> Result<(), PlanFailure> {
    execute_range(plan, 0..plan.ops.len(), sys, slots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Records every call as a line; fails the call whose line contains
    /// `fail_on` with `fail_with`; `kinds` answers `file_kind`.
    #[derive(Default)]
    struct RecordingSys {
        calls: RefCell<Vec<String>>,
        fail_on: Option<(String, Errno)>,
        kinds: Vec<(String, SysResult<FileKind>)>,
        links: Vec<(String, String)>,
    }

    impl RecordingSys {
        fn failing(on: &str, errno: Errno) -> Self {
            RecordingSys {
                fail_on: Some((on.to_string(), errno)),
                ..Default::default()
            }
        }
        fn record(&self, line: String) -> SysResult<()> {
            let fail = match &self.fail_on {
                Some((pat, errno)) if line.contains(pat.as_str()) => Err(*errno),
                _ => Ok(()),
            };
            self.calls.borrow_mut().push(line);
            fail
        }
        fn calls(&self) -> Vec<String> {
            self.calls.borrow().clone()
        }
    }

    fn s(c: &CStr) -> String {
        c.to_string_lossy().into_owned()
    }

    fn o(c: Option<&CStr>) -> String {
        c.map_or("-".into(), s)
    }

    impl Sys for RecordingSys {
        fn mount(
            &self,
            source: Option<&CStr>,
            target: &CStr,
            fstype: Option<&CStr>,
            flags: libc::c_ulong,
            data: Option<&CStr>,
        ) -> SysResult<()> {
            self.record(format!(
                "mount {} {} {} {flags:#x} {}",
                o(source),
                s(target),
                o(fstype),
                o(data)
            ))
        }
        fn umount_detach(&self, target: &CStr) -> SysResult<()> {
            self.record(format!("umount_detach {}", s(target)))
        }
        fn pivot_root(&self, new_root: &CStr, put_old: &CStr) -> SysResult<()> {
            self.record(format!("pivot_root {} {}", s(new_root), s(put_old)))
        }
        fn chdir(&self, path: &CStr) -> SysResult<()> {
            self.record(format!("chdir {}", s(path)))
        }
        fn mkdir(&self, path: &CStr, mode: u32) -> SysResult<()> {
            self.record(format!("mkdir {} {mode:o}", s(path)))
        }
        fn mknod(&self, path: &CStr, mode: u32, dev: u64) -> SysResult<()> {
            self.record(format!(
                "mknod {} {mode:o} {}:{}",
                s(path),
                libc::major(dev),
                libc::minor(dev)
            ))
        }
        fn symlink(&self, target: &CStr, link: &CStr) -> SysResult<()> {
            self.record(format!("symlink {} {}", s(target), s(link)))
        }
        fn file_kind(&self, path: &CStr, follow: bool) -> SysResult<FileKind> {
            self.record(format!("stat {} follow={follow}", s(path)))?;
            let path = s(path);
            self.kinds
                .iter()
                .find(|(p, _)| *p == path)
                .map_or(Ok(FileKind::Dir), |(_, k)| *k)
        }
        fn create_file(&self, path: &CStr) -> SysResult<()> {
            self.record(format!("create_file {}", s(path)))
        }
        fn open_tree(&self, source: &CStr) -> SysResult<RawFd> {
            self.record(format!("open_tree {}", s(source)))?;
            Ok(100 + self.calls.borrow().len() as RawFd)
        }
        fn set_tree_read_only(&self, fd: RawFd) -> SysResult<()> {
            self.record(format!("set_tree_read_only {fd}"))
        }
        fn move_tree(&self, fd: RawFd, target: &CStr) -> SysResult<()> {
            self.record(format!("move_tree {fd} {}", s(target)))
        }
        fn set_path_read_only(&self, path: &CStr) -> SysResult<()> {
            self.record(format!("set_path_read_only {}", s(path)))
        }
        fn readlink(&self, path: &CStr, buf: &mut [u8]) -> SysResult<usize> {
            self.record(format!("readlink {}", s(path)))?;
            let path = s(path);
            let (_, dest) = self
                .links
                .iter()
                .find(|(p, _)| *p == path)
                .ok_or(Errno::EINVAL)?;
            buf[..dest.len()].copy_from_slice(dest.as_bytes());
            Ok(dest.len())
        }
        fn close(&self, fd: RawFd) {
            let _ = self.record(format!("close {fd}"));
        }
    }

    /// Bind targets that do not exist yet.
    fn missing_targets() -> Vec<(String, SysResult<FileKind>)> {
        vec![
            ("/mnt/data".into(), Err(Errno::ENOENT)),
            ("/etc/conf/file.txt".into(), Err(Errno::ENOENT)),
        ]
    }

    fn overlay() -> PlannedRoot {
        PlannedRoot::Overlay {
            lower: vec!["/img/l2".into(), "/img/l1".into()],
            upper: "/c/upper".into(),
            work: "/c/work".into(),
            target: "/c/merged".into(),
        }
    }

    fn binds() -> Vec<PlannedBind> {
        vec![
            PlannedBind {
                source: "/host/data".into(),
                target: "/mnt/data".into(),
                read_only: true,
                source_is_dir: true,
            },
            PlannedBind {
                source: "/host/file.txt".into(),
                target: "/etc//./conf/file.txt".into(),
                read_only: false,
                source_is_dir: false,
            },
        ]
    }

    fn position(calls: &[String], prefix: &str) -> usize {
        calls
            .iter()
            .position(|c| c.starts_with(prefix))
            .unwrap_or_else(|| panic!("no call starting with {prefix:?} in {calls:#?}"))
    }

    #[test]
    fn overlay_plan_orders_private_overlay_binds_pivot_dev_proc_sys_masks() {
        let plan = build(&overlay(), &binds()).unwrap();
        let sys = RecordingSys::default();
        let mut slots = vec![-1; plan.slots];
        execute(&plan, &sys, &mut slots).unwrap();
        let calls = sys.calls();
        assert_eq!(calls[0], "mount - / - 0x44000 -", "rprivate first");
        assert_eq!(
            calls[1],
            "mount overlay /c/merged overlay 0x0 lowerdir=/img/l2:/img/l1,upperdir=/c/upper,workdir=/c/work,volatile"
        );
        let open1 = position(&calls, "open_tree /host/data");
        let ro = position(&calls, "set_tree_read_only");
        let pivot = position(&calls, "pivot_root . .");
        assert!(
            open1 < ro && ro < pivot,
            "sources opened and sealed before the pivot"
        );
        assert_eq!(calls[pivot - 1], "chdir /c/merged");
        assert_eq!(calls[pivot + 1], "umount_detach .");
        assert_eq!(calls[pivot + 2], "chdir /");
        let dev = position(&calls, "mount tmpfs /dev tmpfs");
        let attach = position(&calls, "move_tree");
        let proc_ = position(&calls, "mount proc /proc proc 0xe");
        let sys_ = position(&calls, "mount sysfs /sys sysfs 0xf");
        let mask = position(&calls, "stat /proc/acpi");
        let ro_sys = position(&calls, "mount /proc/sys /proc/sys - 0x5000");
        assert!(pivot < dev && dev < attach && attach < proc_ && proc_ < sys_);
        assert!(sys_ < mask && mask < ro_sys);
        assert!(calls.contains(&"mknod /dev/null 20666 1:3".to_string()));
        assert!(calls.contains(&"mknod /dev/tty 20666 5:0".to_string()));
        assert!(calls.contains(&"symlink pts/ptmx /dev/ptmx".to_string()));
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with("mount devpts /dev/pts devpts"))
        );
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with("mount mqueue /dev/mqueue mqueue"))
        );
        // The remount keeps nosuid/nodev/noexec and sets rdonly.
        let remount = libc::MS_BIND
            | libc::MS_REMOUNT
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC;
        assert_eq!(
            calls[ro_sys + 1],
            format!("mount - /proc/sys - {remount:#x} -")
        );
    }

    #[test]
    fn bind_targets_are_normalized_and_created_inside_the_new_root() {
        let plan = build(&overlay(), &binds()).unwrap();
        let sys = RecordingSys {
            kinds: missing_targets(),
            ..Default::default()
        };
        let mut slots = vec![-1; plan.slots];
        execute(&plan, &sys, &mut slots).unwrap();
        let calls = sys.calls();
        let file_target = position(&calls, "create_file /etc/conf/file.txt");
        assert_eq!(calls[file_target - 3], "mkdir /etc 755");
        assert_eq!(calls[file_target - 2], "mkdir /etc/conf 755");
        assert_eq!(
            calls[file_target - 1],
            "stat /etc/conf/file.txt follow=false"
        );
        assert!(calls[file_target + 1].starts_with("move_tree "));
        assert!(calls[file_target + 1].ends_with(" /etc/conf/file.txt"));
        let dir_target = position(&calls, "mkdir /mnt/data");
        assert_eq!(calls[dir_target - 2], "mkdir /mnt 755");
        // Every opened tree is closed after it is attached.
        let opened = calls.iter().filter(|c| c.starts_with("open_tree")).count();
        let closed = calls.iter().filter(|c| c.starts_with("close")).count();
        assert_eq!((opened, closed), (2, 2));
    }

    #[test]
    fn a_symlinked_bind_target_is_followed_and_its_destination_created() {
        let bind = PlannedBind {
            source: "/host/data".into(),
            target: "/data-link".into(),
            read_only: false,
            source_is_dir: true,
        };
        let plan = build(&overlay(), &[bind]).unwrap();
        let sys = RecordingSys {
            kinds: vec![
                ("/data-link".into(), Ok(FileKind::Symlink)),
                ("/srv/rel".into(), Ok(FileKind::Symlink)),
                ("/srv/real/dir".into(), Err(Errno::ENOENT)),
            ],
            links: vec![
                ("/data-link".into(), "/srv/rel".into()),
                ("/srv/rel".into(), "real/dir".into()),
            ],
            ..Default::default()
        };
        let mut slots = vec![-1; 1];
        execute(&plan, &sys, &mut slots).unwrap();
        let calls = sys.calls();
        let at = position(&calls, "readlink /data-link");
        assert_eq!(
            calls[at + 1..at + 8],
            [
                "mkdir /srv 755",
                "stat /srv/rel follow=false",
                "readlink /srv/rel",
                "mkdir /srv 755",
                "mkdir /srv/real 755",
                "stat /srv/real/dir follow=false",
                "mkdir /srv/real/dir 755",
            ]
        );
        assert!(calls[at + 8].starts_with("move_tree ") && calls[at + 8].ends_with(" /data-link"));

        // A symlink loop ends in ELOOP, not a hang.
        let plan = build(
            &overlay(),
            &[PlannedBind {
                source: "/host/data".into(),
                target: "/loop".into(),
                read_only: false,
                source_is_dir: true,
            }],
        )
        .unwrap();
        let sys = RecordingSys {
            kinds: vec![("/loop".into(), Ok(FileKind::Symlink))],
            links: vec![("/loop".into(), "/loop".into())],
            ..Default::default()
        };
        let err = execute(&plan, &sys, &mut slots).unwrap_err();
        assert_eq!(err.errno, Errno::ELOOP);
    }

    #[test]
    fn host_plan_has_no_pivot_and_keeps_host_dev() {
        let plan = build(&PlannedRoot::Host, &[]).unwrap();
        let sys = RecordingSys::default();
        execute(&plan, &sys, &mut []).unwrap();
        let calls = sys.calls();
        assert_eq!(calls[0], "mount - / - 0x44000 -");
        assert!(!calls.iter().any(|c| c.starts_with("pivot_root")));
        assert!(!calls.iter().any(|c| c.starts_with("mount tmpfs /dev ")));
        assert!(!calls.iter().any(|c| c.starts_with("mknod")));
        assert!(
            calls
                .iter()
                .any(|c| c.starts_with("mount shm /dev/shm tmpfs"))
        );
        assert!(calls.iter().any(|c| c.starts_with("mount proc /proc proc")));
        assert_eq!(calls.last().unwrap(), "set_path_read_only /sys");
        // ... after the init joined its cgroup (below /sys/fs/cgroup).
        assert_eq!(plan.late, plan.ops.len() - 1);
        assert_eq!(
            build(&overlay(), &[]).unwrap().late,
            build(&overlay(), &[]).unwrap().ops.len()
        );
    }

    #[test]
    fn masks_use_dev_null_for_files_tmpfs_for_dirs_and_skip_missing() {
        let plan = build(&PlannedRoot::Host, &[]).unwrap();
        let sys = RecordingSys {
            kinds: vec![
                ("/proc/kcore".into(), Ok(FileKind::Other)),
                ("/proc/acpi".into(), Ok(FileKind::Dir)),
                ("/proc/asound".into(), Err(Errno::ENOENT)),
            ],
            ..Default::default()
        };
        execute(&plan, &sys, &mut []).unwrap();
        let calls = sys.calls();
        assert!(calls.contains(&"mount /dev/null /proc/kcore - 0x1000 -".to_string()));
        assert!(calls.contains(&"mount tmpfs /proc/acpi tmpfs 0x1 size=0".to_string()));
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("mount") && c.contains("/proc/asound"))
        );
    }

    #[test]
    fn missing_read_only_paths_and_existing_dirs_are_not_errors() {
        let plan = build(&overlay(), &[]).unwrap();
        let sys = RecordingSys::failing("/proc/irq /proc/irq", Errno::ENOENT);
        execute(&plan, &sys, &mut []).unwrap();
        let sys = RecordingSys::failing("mkdir /dev/pts", Errno::EEXIST);
        execute(&plan, &sys, &mut []).unwrap();
    }

    #[test]
    fn a_failing_step_stops_the_plan_and_names_itself() {
        let plan = build(&overlay(), &binds()).unwrap();
        let sys = RecordingSys::failing("mount overlay", Errno::EINVAL);
        let mut slots = vec![-1; plan.slots];
        let err = execute(&plan, &sys, &mut slots).unwrap_err();
        assert_eq!(err.errno, Errno::EINVAL);
        assert_eq!(err.step, 1);
        assert_eq!(plan.ops[err.step].describe(), "mount overlay on /c/merged");
        assert_eq!(sys.calls().len(), 2, "nothing runs after the failure");

        let sys = RecordingSys::failing("pivot_root", Errno::EBUSY);
        let err = execute(&plan, &sys, &mut slots).unwrap_err();
        assert_eq!(plan.ops[err.step].describe(), "pivot_root into /c/merged");
        assert_eq!(err.errno, Errno::EBUSY);
    }

    #[test]
    fn symlinked_proc_in_the_image_is_refused() {
        let plan = build(&overlay(), &[]).unwrap();
        let sys = RecordingSys {
            kinds: vec![("/proc".into(), Ok(FileKind::Symlink))],
            ..Default::default()
        };
        let err = execute(&plan, &sys, &mut []).unwrap_err();
        assert_eq!(err.errno, Errno::ELOOP);
        assert_eq!(plan.ops[err.step].describe(), "create directory /proc");
    }

    #[test]
    fn overlay_options_reject_separators_relative_paths_and_oversize() {
        let up = Path::new("/u");
        let wk = Path::new("/w");
        assert!(overlay_options(&[], up, wk).is_err());
        assert!(overlay_options(&["/a,b".into()], up, wk).is_err());
        assert!(overlay_options(&["/a:b".into()], up, wk).is_err());
        assert!(overlay_options(&["rel".into()], up, wk).is_err());
        let many: Vec<PathBuf> = (0..200)
            .map(|i| PathBuf::from(format!("/var/lib/corral/layers/{i:040}")))
            .collect();
        let err = overlay_options(&many, up, wk).unwrap_err();
        assert!(err.contains("mount(2) accepts"), "{err}");
    }

    #[test]
    fn container_paths_are_normalized_and_dotdot_is_refused() {
        assert_eq!(
            normalize_container_path(Path::new("/a/./b//c/")).unwrap(),
            PathBuf::from("/a/b/c")
        );
        assert!(normalize_container_path(Path::new("/a/../b")).is_err());
        assert!(normalize_container_path(Path::new("a/b")).is_err());
    }
}
