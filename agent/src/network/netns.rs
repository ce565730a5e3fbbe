//! Per-pod network namespaces: created on a throwaway thread, pinned by a
//! bind mount (as `ip netns add` does under /run/netns), opened for
//! `setns(2)`, and unpinned.
//!
//! A network namespace belongs to a *thread*: `unshare(CLONE_NEWNET)` and
//! `setns(.., CLONE_NEWNET)` only move the calling thread. So both happen on
//! a dedicated OS thread that exits afterwards, never on a tokio worker or
//! blocking-pool thread, which would stay in the pod's namespace and run
//! unrelated work there.

use std::fs;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::Mode;
use nix::sys::statfs::{NSFS_MAGIC, fstatfs, statfs};

use super::NetworkError;
use super::store::remove_file_if_exists;

/// Most mounts stacked on one pin that teardown peels off; pins are
/// mounted once, so more means something else is mounting there.
const MAX_STACKED_MOUNTS: usize = 16;

/// Makes `dir` the mount point of a private bind mount of itself, unless it
/// already is a mount point (a restarted agent finds its own from before).
///
/// Why a mount point, and why private rather than shared (`ip netns`
/// makes /run/netns shared):
/// - Pins are the agent's own business. Under a shared parent (systemd
///   makes `/` shared) every pin would also be mounted in each peer mount
///   namespace, each copy holding the pod's namespace alive; private keeps
///   them here.
/// - A container cloned with `CLONE_NEWNS` gets a copy of every pin that
///   exists at that moment whatever the propagation, and the containerizer
///   makes its root `rprivate`, so a shared dir would not even carry our
///   unmount to it. What releases those copies is removing the pin file:
///   since Linux 3.18 unlinking a file that is a mount point in *other*
///   mount namespaces detaches it there (`vfs_unlink` → `detach_mounts`).
///   So teardown always unmounts here (unlink would fail with EBUSY in our
///   own namespace) and then unlinks; an empty pin file is never reused.
pub(crate) fn ensure_private_mount(dir: &Path) -> Result<(), NetworkError> {
    fs::create_dir_all(dir).map_err(|source| NetworkError::Io {
        what: "cannot create",
        path: dir.to_path_buf(),
        source,
    })?;
    if !is_mount_point(dir)? {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|source| {
            NetworkError::Sys {
                what: "cannot bind-mount onto itself",
                path: dir.to_path_buf(),
                source,
            }
        })?;
    }
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|source| NetworkError::Sys {
        what: "cannot make private",
        path: dir.to_path_buf(),
        source,
    })
}

/// Undoes [`ensure_private_mount`] and removes the dir if it is empty.
/// A plain unmount, not a lazy one: if a pin were still mounted inside, a
/// lazy unmount would hide it (and keep its namespace alive) instead of
/// failing.
pub(crate) fn release_private_mount(dir: &Path) -> Result<(), NetworkError> {
    for _ in 0..MAX_STACKED_MOUNTS {
        if !dir.exists() || !is_mount_point(dir)? {
            break;
        }
        umount2(dir, MntFlags::empty()).map_err(|source| NetworkError::Sys {
            what: "cannot unmount",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetworkError::Io {
            what: "cannot remove",
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Whether `path` is a mount point in this process's mount namespace.
pub(crate) fn is_mount_point(path: &Path) -> Result<bool, NetworkError> {
    let real = fs::canonicalize(path).map_err(|source| NetworkError::Io {
        what: "cannot resolve",
        path: path.to_path_buf(),
        source,
    })?;
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|source| NetworkError::Io {
        what: "cannot read",
        path: PathBuf::from("/proc/self/mountinfo"),
        source,
    })?;
    Ok(mount_points(&info).any(|p| p == real))
}

/// The mount points listed in a `/proc/<pid>/mountinfo` text (field 5,
/// with the kernel's octal escapes of space, tab, newline and backslash
/// undone; see proc(5)).
pub fn mount_points(mountinfo: &str) -> impl Iterator<Item = PathBuf> + '_ {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Creates a new network namespace pinned at `pin` (which must not exist).
/// On failure nothing is left: no file, no mount.
pub(crate) async fn create_pinned(pin: PathBuf) -> Result<(), NetworkError> {
    let what = format!("creating {}", pin.display());
    on_own_thread(what, move || {
        // Mode 0 and O_EXCL as `ip netns add`: the file is only ever a
        // mount point, and an existing one is somebody's namespace.
        let fd = open(
            &pin,
            OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|source| NetworkError::Sys {
            what: "cannot create namespace pin",
            path: pin.clone(),
            source,
        })?;
        drop(fd);
        let pinned = unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|source| NetworkError::Sys {
                what: "cannot unshare a network namespace for",
                path: pin.clone(),
                source,
            })
            .and_then(|()| {
                // thread-self, not self: only this thread is in the new
                // namespace.
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &pin,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|source| NetworkError::Sys {
                    what: "cannot bind-mount the network namespace onto",
                    path: pin.clone(),
                    source,
                })
            });
        if pinned.is_err() {
            let _ = fs::remove_file(&pin);
        }
        pinned
    })
    .await?
}

/// Unmounts (however many times it is mounted) and removes a pin. Fine if
/// it is not mounted or does not exist.
pub(crate) fn remove_pin(pin: &Path) -> Result<(), NetworkError> {
    for _ in 0..MAX_STACKED_MOUNTS {
        // Lazy: an open fd on the pin (a launch holding the namespace fd)
        // would make a plain unmount fail with EBUSY; the namespace itself
        // lives on for as long as processes or fds use it.
        match umount2(pin, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(source) => {
                return Err(NetworkError::Sys {
                    what: "cannot unmount namespace pin",
                    path: pin.to_path_buf(),
                    source,
                });
            }
        }
    }
    remove_file_if_exists(pin).map(|_| ())
}

/// Whether `pin` is a mounted network namespace (not just an empty file
/// left by a reboot or a crash between create and mount).
pub(crate) fn is_pinned(pin: &Path) -> bool {
    statfs(pin).is_ok_and(|s| s.filesystem_type() == NSFS_MAGIC)
}

/// Opens a pinned namespace: an fd for `setns(fd, CLONE_NEWNET)`. Checked
/// to be a namespace, so an unmounted pin is an error, not the pin file.
pub(crate) fn open_pinned(pod_id: &str, pin: &Path) -> Result<OwnedFd, NetworkError> {
    let not_pinned = || NetworkError::NotPinned {
        pod_id: pod_id.to_string(),
        path: pin.to_path_buf(),
    };
    let fd =
        open(pin, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(|_| not_pinned())?;
    match fstatfs(&fd) {
        Ok(s) if s.filesystem_type() == NSFS_MAGIC => Ok(fd),
        _ => Err(not_pinned()),
    }
}

/// Runs `body` on a new thread that first joins the network namespace
/// `netns`, with a current-thread runtime of its own: netlink sockets
/// opened there talk to that namespace. The thread exits afterwards, so
/// no thread of the agent stays in a pod's namespace.
pub(crate) async fn in_netns<T, F, Fut>(
    pin: &Path,
    netns: OwnedFd,
    body: F,
) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let what = format!("configuring {}", pin.display());
    let thread_what = what.clone();
    let pin = pin.to_path_buf();
    on_own_thread(what, move || {
        setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetworkError::Sys {
            what: "cannot join the network namespace",
            path: pin,
            source,
        })?;
        drop(netns);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetworkError::Thread {
                what: thread_what,
                reason: format!("cannot build a runtime: {e}"),
            })?;
        runtime.block_on(body())
    })
    .await?
}

/// Runs `f` on a fresh OS thread and awaits its result without blocking
/// the caller's runtime.
async fn on_own_thread<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetworkError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("corral-netns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| NetworkError::Thread {
            what: what.clone(),
            reason: format!("cannot spawn: {e}"),
        })?;
    rx.await.map_err(|_| NetworkError::Thread {
        what,
        reason: "panicked".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_mount_points_are_unescaped() {
        let info = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
600 22 0:4 net:[4026532000] /var/lib/corral\\040agent/netns/pod-a rw shared:1 - nsfs nsfs rw
601 22 0:4 / /tmp/back\\134slash\\011tab rw - tmpfs tmpfs rw
";
        let points: Vec<PathBuf> = mount_points(info).collect();
        assert_eq!(
            points,
            vec![
                PathBuf::from("/"),
                PathBuf::from("/var/lib/corral agent/netns/pod-a"),
                PathBuf::from("/tmp/back\\slash\ttab"),
            ]
        );
        assert_eq!(unescape_octal("a\\04"), "a\\04");
        assert_eq!(unescape_octal("a\\777b"), "a\\777b");
    }
}
