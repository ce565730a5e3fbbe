//! Raw Linux syscalls: the only `unsafe` of the containerizer besides the
//! two clone entry points in `init.rs`.
//!
//! Everything the cloned child calls is async-signal-safe: one syscall (or
//! a bounded loop of them) on buffers prepared before the clone, no
//! allocation, no locks, errno read straight after the call. glibc wrappers
//! that keep process-wide state (`setuid` & co broadcast to every thread
//! glibc believes exists, which after a raw clone are the agent's threads)
//! are avoided in favour of `libc::syscall`.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

pub(crate) type SysResult<T> = Result<T, Errno>;

fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn check_long(ret: libc::c_long) -> SysResult<libc::c_long> {
    if ret < 0 { Err(Errno::last()) } else { Ok(ret) }
}

fn opt_ptr(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(std::ptr::null(), CStr::as_ptr)
}

/// What a path is, for the mount plan's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Dir,
    Symlink,
    Other,
}

// ---------------------------------------------------------------------------
// Mounts and files (the mount plan's real `Sys`).

pub(crate) fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> SysResult<()> {
    // SAFETY: every pointer is a NUL-terminated string that outlives the
    // call, or null where mount(2) allows it.
    let ret = unsafe {
        libc::mount(
            opt_ptr(source),
            target.as_ptr(),
            opt_ptr(fstype),
            flags,
            opt_ptr(data).cast(),
        )
    };
    check(ret).map(drop)
}

pub(crate) fn umount_detach(target: &CStr) -> SysResult<()> {
    // SAFETY: `target` is a valid C string.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

pub(crate) fn pivot_root(new_root: &CStr, put_old: &CStr) -> SysResult<()> {
    // SAFETY: pivot_root(2) takes two C strings; glibc has no wrapper.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check_long(ret).map(drop)
}

pub(crate) fn chdir(path: &CStr) -> SysResult<()> {
    // SAFETY: `path` is a valid C string.
    check(unsafe { libc::chdir(path.as_ptr()) }).map(drop)
}

pub(crate) fn mkdir(path: &CStr, mode: u32) -> SysResult<()> {
    // SAFETY: `path` is a valid C string.
    check(unsafe { libc::mkdir(path.as_ptr(), mode) }).map(drop)
}

pub(crate) fn mknod(path: &CStr, mode: u32, dev: u64) -> SysResult<()> {
    // SAFETY: `path` is a valid C string.
    check(unsafe { libc::mknod(path.as_ptr(), mode, dev) }).map(drop)
}

pub(crate) fn symlink(target: &CStr, link: &CStr) -> SysResult<()> {
    // SAFETY: both are valid C strings.
    check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }).map(drop)
}

pub(crate) fn file_kind(path: &CStr, follow: bool) -> SysResult<FileKind> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is a writable stat buffer; it is read only on success,
    // when the kernel has filled it.
    let st = unsafe {
        let ret = if follow {
            libc::stat(path.as_ptr(), st.as_mut_ptr())
        } else {
            libc::lstat(path.as_ptr(), st.as_mut_ptr())
        };
        check(ret)?;
        st.assume_init()
    };
    Ok(match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    })
}

pub(crate) fn open(path: &CStr, flags: libc::c_int, mode: libc::mode_t) -> SysResult<RawFd> {
    // SAFETY: `path` is a valid C string; the returned fd is the caller's.
    check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) })
}

pub(crate) fn close(fd: RawFd) {
    // SAFETY: the caller owns `fd` and does not use it afterwards. The
    // result is ignored: after close(2) the fd is gone even on EINTR.
    unsafe { libc::close(fd) };
}

/// A detached copy of the mount tree at `source` (`open_tree(2)` with
/// `OPEN_TREE_CLONE | AT_RECURSIVE`, i.e. an rbind not yet attached).
pub(crate) fn open_tree(source: &CStr) -> SysResult<RawFd> {
    let flags =
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: open_tree(2) with a valid C string; the fd is the caller's.
    let ret = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, source.as_ptr(), flags) };
    check_long(ret).map(|fd| fd as RawFd)
}

/// Makes every mount of the detached tree `fd` read-only (`mount_setattr(2)`).
pub(crate) fn set_tree_read_only(fd: RawFd) -> SysResult<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `attr` is a valid mount_attr of the size passed; the path is
    // the empty string with AT_EMPTY_PATH, meaning `fd` itself.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd,
            c"".as_ptr(),
            (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    check_long(ret).map(drop)
}

/// Attaches the detached tree `fd` at `target`, following a symlink at
/// `target` (resolved against the caller's root, which by then is the
/// container's).
pub(crate) fn move_tree(fd: RawFd, target: &CStr) -> SysResult<()> {
    let flags = libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_SYMLINKS;
    // SAFETY: move_mount(2) with a valid fd, empty source path and a valid
    // target C string.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            fd,
            c"".as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            flags,
        )
    };
    check_long(ret).map(drop)
}

/// An `O_PATH` handle on a directory, to reach below it later even once
/// it is outside our root.
pub(crate) fn open_dir_path(path: &CStr) -> SysResult<RawFd> {
    open(path, libc::O_PATH | libc::O_DIRECTORY, 0)
}

/// Writes `data` in one write to the existing file `rel` under `dir` (a
/// cgroup control file).
pub(crate) fn write_file_at(dir: RawFd, rel: &CStr, data: &[u8]) -> SysResult<()> {
    // SAFETY: openat(2) with a valid dirfd and C string; we own the result.
    let fd = check(unsafe { libc::openat(dir, rel.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) })?;
    // SAFETY: `data` is valid for `len` bytes.
    let ret = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let result = check_long(ret as libc::c_long).map(drop);
    close(fd);
    result
}

/// Creates an empty regular file (a mount point for a file bind mount);
/// an existing file is fine.
pub(crate) fn create_file(path: &CStr) -> SysResult<()> {
    let fd = open(path, libc::O_CREAT | libc::O_WRONLY | libc::O_NOCTTY, 0o644)?;
    close(fd);
    Ok(())
}

// ---------------------------------------------------------------------------
// Process state of the cloned init and command.

/// setns(2) into the namespace `fd` refers to, of kind `nstype`.
pub(crate) fn setns(fd: RawFd, nstype: libc::c_int) -> SysResult<()> {
    // SAFETY: setns(2) on plain integers; a bad fd is an error, not UB.
    check(unsafe { libc::setns(fd, nstype) }).map(drop)
}

pub(crate) fn sethostname(name: &[u8]) -> SysResult<()> {
    // SAFETY: `name` is valid for `len` bytes.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

pub(crate) fn dup2(old: RawFd, new: RawFd) -> SysResult<()> {
    // SAFETY: dup2(2) on plain integers; the caller owns both numbers.
    check(unsafe { libc::dup2(old, new) }).map(drop)
}

pub(crate) fn umask(mask: libc::mode_t) {
    // SAFETY: umask(2) cannot fail.
    unsafe { libc::umask(mask) };
}

/// Closes every fd in `[first, last]` (`close_range(2)`, or a bounded loop
/// up to `fallback_max` on kernels without it).
pub(crate) fn close_range(first: u32, last: u32, fallback_max: u32) {
    if first > last {
        return;
    }
    // SAFETY: close_range(2) only closes fds; the caller keeps none in the
    // range.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if ret < 0 {
        let end = last.min(fallback_max);
        let mut fd = first;
        while fd <= end {
            close(fd as RawFd);
            fd += 1;
        }
    }
}

/// Closes every fd from 3 up except those in `keep` (sorted, each >= 3).
pub(crate) fn close_fds_except(keep: &[RawFd], fallback_max: u32) {
    let mut next: u32 = 3;
    for &fd in keep {
        let fd = fd as u32;
        if fd > next {
            close_range(next, fd - 1, fallback_max);
        }
        next = fd.saturating_add(1);
    }
    close_range(next, u32::MAX, fallback_max);
}

pub(crate) fn prctl(option: libc::c_int, arg2: libc::c_ulong) -> SysResult<()> {
    // SAFETY: prctl(2) options used here take integer arguments only.
    check(unsafe {
        libc::prctl(
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
    .map(drop)
}

pub(crate) fn set_name(name: &CStr) {
    // SAFETY: PR_SET_NAME reads at most 16 bytes of a valid C string.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

/// Makes /proc/self/cmdline read `name`: overwrites this process's
/// argument area `[start, end)` (from /proc/self/stat) with `name`, NUL,
/// zeros, and a non-NUL last byte — which makes the kernel report only up
/// to the first NUL, as for setproctitle(3). Used in the cloned init,
/// whose argument area is a copy of the agent's; without it the container
/// would see the agent's command line. (PR_SET_MM would be cleaner but
/// needs CAP_SYS_RESOURCE, which not every agent has.)
pub(crate) fn overwrite_cmdline(start: usize, end: usize, name: &[u8]) {
    if start == 0 || end <= start.saturating_add(1) {
        return;
    }
    let len = end - start;
    let n = name.len().min(len - 1);
    // SAFETY: [start, end) is this process's argument area as reported by
    // the kernel: mapped, writable (the initial stack), and in the cloned
    // child a private copy that nothing reads (std's args are never
    // consulted after the clone).
    unsafe {
        let area = std::slice::from_raw_parts_mut(start as *mut u8, len);
        area.fill(0);
        area[..n].copy_from_slice(&name[..n]);
        if n + 1 < len {
            area[len - 1] = b' ';
        }
    }
}

/// Makes the mount at `path` and every mount below it read-only
/// (`mount_setattr(2)` with AT_RECURSIVE).
pub(crate) fn set_path_read_only(path: &CStr) -> SysResult<()> {
    let attr = libc::mount_attr {
        attr_set: libc::MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: valid C string and mount_attr of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_RECURSIVE as libc::c_uint,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    check_long(ret).map(drop)
}

/// readlink(2) into `buf`; returns the length (not NUL-terminated).
pub(crate) fn readlink(path: &CStr, buf: &mut [u8]) -> SysResult<usize> {
    // SAFETY: `buf` is writable for `len` bytes.
    let ret = unsafe { libc::readlink(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    check_long(ret as libc::c_long).map(|n| n as usize)
}

/// Sets effective, permitted and inheritable capabilities to `keep`
/// (a bit mask of capability numbers), via `capset(2)` version 3.
pub(crate) fn capset(keep: u64) -> SysResult<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = keep as u32;
    let hi = (keep >> 32) as u32;
    let data = [
        Data {
            effective: lo,
            permitted: lo,
            inheritable: lo,
        },
        Data {
            effective: hi,
            permitted: hi,
            inheritable: hi,
        },
    ];
    // SAFETY: header and the two data words are the v3 layout capset(2)
    // expects, valid for the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    check_long(ret).map(drop)
}

pub(crate) fn setgroups_empty() -> SysResult<()> {
    // SAFETY: raw setgroups(2) with an empty list (no glibc setxid broadcast).
    check_long(unsafe {
        libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>())
    })
    .map(drop)
}

pub(crate) fn setresgid(gid: u32) -> SysResult<()> {
    // SAFETY: raw setresgid(2) on integers.
    check_long(unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) }).map(drop)
}

pub(crate) fn setresuid(uid: u32) -> SysResult<()> {
    // SAFETY: raw setresuid(2) on integers.
    check_long(unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) }).map(drop)
}

/// Whether the working directory is reachable from the root: the kernel's
/// getcwd(2) prefixes "(unreachable)" otherwise (CVE-2024-21626: a leaked
/// host directory fd used as cwd).
pub(crate) fn cwd_is_inside_root() -> SysResult<bool> {
    let mut buf = [0u8; 4096];
    // SAFETY: raw getcwd(2) writes at most `buf.len()` bytes into `buf`.
    let ret = unsafe { libc::syscall(libc::SYS_getcwd, buf.as_mut_ptr(), buf.len()) };
    check_long(ret)?;
    Ok(buf[0] == b'/')
}

/// execve(2); returns only on failure, with the errno.
pub(crate) fn execve(
    path: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> Errno {
    // SAFETY: `argv` and `envp` are NULL-terminated arrays of pointers to C
    // strings that the caller keeps alive (checked when they were built).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Errno::last()
}

pub(crate) fn exit(code: libc::c_int) -> ! {
    // SAFETY: _exit(2) ends the process without running any Rust or libc
    // teardown, which is what a cloned child must do.
    unsafe { libc::_exit(code) }
}

fn full_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises the set it is given.
    unsafe {
        libc::sigfillset(set.as_mut_ptr());
        set.assume_init()
    }
}

fn empty_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        set.assume_init()
    }
}

pub(crate) fn block_all_signals() -> SysResult<()> {
    let set = full_sigset();
    // SAFETY: sigprocmask with a valid set and no old-set output.
    check(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) }).map(drop)
}

pub(crate) fn unblock_all_signals() -> SysResult<()> {
    let set = empty_sigset();
    // SAFETY: as above.
    check(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) }).map(drop)
}

/// Every catchable signal back to SIG_DFL: the agent's handlers (tokio's)
/// and ignored signals (Rust ignores SIGPIPE) must not reach the command.
pub(crate) fn reset_signal_dispositions() {
    for sig in 1..libc::SIGRTMAX() {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a zeroed sigaction is SIG_DFL with no flags and an empty
        // mask; glibc-reserved signals just return EINVAL.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// Waits for any (blocked) signal; returns its number.
pub(crate) fn wait_signal() -> SysResult<libc::c_int> {
    let set = full_sigset();
    // SAFETY: sigwaitinfo with a valid set; the info output is optional.
    check(unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) })
}

pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) -> SysResult<()> {
    // SAFETY: kill(2) on integers.
    check(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// `waitpid(pid, WNOHANG)`: `Ok(None)` when nothing is waitable.
pub(crate) fn waitpid_nohang(pid: libc::pid_t) -> SysResult<Option<(libc::pid_t, libc::c_int)>> {
    let mut status = 0;
    // SAFETY: waitpid(2) writes the status into a valid int.
    let ret = check(unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) })?;
    Ok((ret > 0).then_some((ret, status)))
}

/// Blocking `waitpid(pid, 0)`, retried on EINTR.
pub(crate) fn waitpid_blocking(pid: libc::pid_t) -> SysResult<libc::c_int> {
    loop {
        let mut status = 0;
        // SAFETY: as above.
        match check(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) => return Ok(status),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------
// The init's log pump and exit record: raw syscalls on fds it opened (or was
// given) before the pivot, so they work whatever the container's root is.

/// `pipe2(O_CLOEXEC)`, the read end non-blocking: `(read, write)`.
pub(crate) fn pipe_nonblocking_read() -> SysResult<(RawFd, RawFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2(2) writes two fds into a valid two-element array.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: fcntl(2) on the fd we just got; no memory is involved.
    let set = unsafe {
        let flags = libc::fcntl(fds[0], libc::F_GETFL);
        libc::fcntl(fds[0], libc::F_SETFL, flags | libc::O_NONBLOCK)
    };
    if let Err(e) = check(set) {
        close(fds[0]);
        close(fds[1]);
        return Err(e);
    }
    Ok((fds[0], fds[1]))
}

/// `openat(2)`, retried on EINTR.
pub(crate) fn openat(
    dir: RawFd,
    rel: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> SysResult<RawFd> {
    loop {
        // SAFETY: openat(2) with a C string; a bad dirfd is an error.
        match check(unsafe { libc::openat(dir, rel.as_ptr(), flags, mode as libc::c_uint) }) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// `renameat(2)` within one directory.
pub(crate) fn renameat(dir: RawFd, from: &CStr, to: &CStr) -> SysResult<()> {
    // SAFETY: renameat(2) with two C strings.
    check(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) }).map(drop)
}

/// `unlinkat(2)` of a file.
pub(crate) fn unlinkat(dir: RawFd, rel: &CStr) -> SysResult<()> {
    // SAFETY: unlinkat(2) with a C string.
    check(unsafe { libc::unlinkat(dir, rel.as_ptr(), 0) }).map(drop)
}

/// One `read(2)`, retried on EINTR; `Ok(0)` is end of file.
pub(crate) fn read(fd: RawFd, buf: &mut [u8]) -> SysResult<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `len` bytes.
        let ret = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        match check_long(ret as libc::c_long) {
            Err(Errno::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

/// Writes all of `data` (short writes and EINTR retried).
pub(crate) fn write_all(fd: RawFd, mut data: &[u8]) -> SysResult<()> {
    while !data.is_empty() {
        // SAFETY: `data` is valid for reads of `len` bytes.
        let ret = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        match check_long(ret as libc::c_long) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => data = data.get(n as usize..).unwrap_or(&[]),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A signalfd for every signal (they are all blocked in the init), so the
/// init can wait for signals and log pipes in one `poll`.
pub(crate) fn signalfd_all() -> SysResult<RawFd> {
    let set = full_sigset();
    // SAFETY: signalfd(2) with a valid set, creating a new fd.
    check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })
}

/// The next pending signal from a signalfd; `Ok(None)` when none is.
pub(crate) fn read_signal(fd: RawFd) -> SysResult<Option<libc::c_int>> {
    // SAFETY: signalfd_siginfo is plain integers.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: `info` is valid for writes of `size` bytes.
    let ret = unsafe { libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
    match check_long(ret as libc::c_long) {
        Ok(n) if n as usize == size => Ok(Some(info.ssi_signo as libc::c_int)),
        Ok(_) | Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `poll(2)` without a timeout; EINTR is `Ok(0)`.
pub(crate) fn poll_forever(fds: &mut [libc::pollfd]) -> SysResult<usize> {
    // SAFETY: `fds` is a valid, writable array of pollfds.
    match check(unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) }) {
        Ok(n) => Ok(n as usize),
        Err(Errno::EINTR) => Ok(0),
        Err(e) => Err(e),
    }
}

/// Opens a directory (for `*at` calls in the init) with close-on-exec.
pub(crate) fn open_dir(path: &CStr) -> SysResult<OwnedFd> {
    let fd = open(
        path,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        0,
    )?;
    // SAFETY: open succeeded, so the fd is ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------
// The agent <-> init channel (a SOCK_SEQPACKET pair: one record per send).

pub(crate) fn socketpair_seqpacket() -> SysResult<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: socketpair(2) writes two fds into `fds`; both are owned here.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both fds are open and unowned.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// One record; MSG_NOSIGNAL so a gone peer is EPIPE, not SIGPIPE.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> SysResult<usize> {
    // SAFETY: `buf` is valid for `len` bytes.
    let ret = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
    check_long(ret as libc::c_long).map(|n| n as usize)
}

/// One record (blocking unless `dont_wait`); `Ok(0)` is end of stream.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8], dont_wait: bool) -> SysResult<usize> {
    let flags = if dont_wait { libc::MSG_DONTWAIT } else { 0 };
    loop {
        // SAFETY: `buf` is writable for `len` bytes.
        let ret = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        match check_long(ret as libc::c_long) {
            Err(Errno::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

/// Waits up to `timeout_ms` for `fd` to be readable (or hung up).
pub(crate) fn poll_readable(fd: RawFd, timeout_ms: i32) -> SysResult<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        match check(unsafe { libc::poll(&mut pfd, 1, timeout_ms) }) {
            Ok(n) => return Ok(n > 0),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The soft RLIMIT_NOFILE (1024 if unknown): the highest fd + 1.
pub(crate) fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) fills a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

/// A duplicate of `fd` numbered 3 or above, close-on-exec.
pub(crate) fn dup_above_stdio(fd: RawFd) -> SysResult<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd that we own.
    let new = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `new` was just returned by fcntl and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

// ---------------------------------------------------------------------------
// Process handles (pidfds) on the agent's side.

/// How a waited-for process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// Decodes a `waitpid(2)` status word.
    pub(crate) fn from_wait_status(status: libc::c_int) -> Exit {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

/// A pidfd for `pid` (`pidfd_open(2)`).
pub(crate) fn pidfd_open(pid: libc::pid_t) -> SysResult<OwnedFd> {
    // SAFETY: pidfd_open(2) on integers; the fd is ours.
    let fd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) })?;
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub(crate) fn pidfd_send_signal(pidfd: &OwnedFd, sig: libc::c_int) -> SysResult<()> {
    // SAFETY: pidfd_send_signal(2) with a valid pidfd and no siginfo.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    check_long(ret).map(drop)
}

/// Reaps the process behind `pidfd` (`waitid(P_PIDFD, WEXITED)`); with
/// `nohang`, `Ok(None)` if it is still running.
pub(crate) fn waitid_pidfd(pidfd: RawFd, nohang: bool) -> SysResult<Option<Exit>> {
    let flags = libc::WEXITED | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: a zeroed siginfo is a valid output buffer; si_pid stays 0
        // when WNOHANG finds nothing (waitid(2)).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid(2) with a valid pidfd and output buffer.
        let ret = unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, flags) };
        match check(ret) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        // SAFETY: the kernel filled the SIGCHLD fields on success.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(match info.si_code {
            libc::CLD_EXITED => Exit::Code(status),
            _ => Exit::Signal(status),
        }));
    }
}

/// A borrowed fd as tokio wants it (`AsRawFd`), tied to the borrow.
pub(crate) struct BorrowedRaw<'a>(std::os::fd::BorrowedFd<'a>);

impl AsRawFd for BorrowedRaw<'_> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Registers a pidfd with the current tokio reactor for readability (a
/// pidfd turns readable when the process exits).
pub(crate) fn async_pidfd(
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<tokio::io::unix::AsyncFd<BorrowedRaw<'_>>> {
    // SAFETY: the BorrowedFd keeps the fd open and unchanged for its
    // lifetime, which bounds the AsyncFd's (tokio's I/O-safety contract).
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            BorrowedRaw(fd),
            tokio::io::Interest::READABLE,
        )
    };
    afd.map_err(std::io::Error::from)
}

// ---------------------------------------------------------------------------
// Clones.

/// The two sides of [`clone_into_namespaces`].
pub(crate) enum Forked {
    Child,
    Parent { pid: u32, pidfd: OwnedFd },
}

/// `clone3(2)` without `CLONE_VM`: like fork(2) (the child is a copy of the
/// calling thread and returns from here too), plus `flags` (new namespaces)
/// and a pidfd for the parent.
///
/// # Safety
///
/// The agent is multi-threaded: in the child only async-signal-safe code
/// may run (no allocation, no locks, no std I/O), on data prepared before
/// the call, and it must end in `exit` or `execve`, never by returning
/// into code that expects the parent's state.
pub(crate) unsafe fn clone_into_namespaces(flags: u64) -> SysResult<Forked> {
    let mut pidfd: libc::c_int = -1;
    // SAFETY: clone_args is plain integers; zero means "not used".
    let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
    args.flags = flags | libc::CLONE_PIDFD as u64;
    args.pidfd = &mut pidfd as *mut libc::c_int as u64;
    args.exit_signal = libc::SIGCHLD as u64;
    // SAFETY: `args` is a valid clone_args of the size passed; without
    // CLONE_VM and with stack 0 the child runs on a copy of this stack,
    // as after fork(2). The caller upholds the child-side contract.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut libc::clone_args,
            std::mem::size_of::<libc::clone_args>(),
        )
    };
    match check_long(ret)? {
        0 => Ok(Forked::Child),
        pid => {
            // SAFETY: with CLONE_PIDFD the kernel stored a new fd, owned by
            // this (parent) process, in `pidfd`.
            let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
            Ok(Forked::Parent {
                pid: pid as u32,
                pidfd,
            })
        }
    }
}

/// Starts `entry(arg)` in a child sharing our memory on `stack`, and
/// returns once it has exec'd or exited (`CLONE_VM | CLONE_VFORK`, what
/// posix_spawn does): no page-table copy of the (agent-sized) init.
///
/// # Safety
///
/// `entry` must only do async-signal-safe work and end in execve or exit;
/// `arg` must be valid for it; `stack` must be big enough and unused.
pub(crate) unsafe fn spawn_vfork(
    stack: &mut [u8],
    entry: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> SysResult<libc::pid_t> {
    // Stacks grow down on every Linux architecture we build for; align the
    // top to 16 bytes as the ABIs require.
    let top = stack.as_mut_ptr_range().end as usize & !0xf;
    // SAFETY: `top` is inside (the end of) `stack`, which outlives the
    // child because CLONE_VFORK suspends us until it execs or exits.
    let pid = unsafe {
        libc::clone(
            entry,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            arg,
        )
    };
    check(pid)
}

/// Most fds passed in one message over the zygote's socket.
pub(crate) const MAX_PASSED_FDS: usize = 6;

/// One record with `fds` attached (SCM_RIGHTS); MSG_NOSIGNAL as [`send`].
pub(crate) fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> SysResult<usize> {
    assert!(fds.len() <= MAX_PASSED_FDS, "too many fds to pass");
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64s: cmsg buffers must be aligned for cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zero means "not used".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        // SAFETY: `control` is large enough for one cmsg of MAX_PASSED_FDS
        // fds (checked above) and aligned; CMSG_FIRSTHDR points into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        let ret = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        match check_long(ret as libc::c_long) {
            Err(Errno::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

/// One record and the fds attached to it (blocking). `Ok((0, _))` is end of
/// stream. The received fds are owned by the caller (close-on-exec).
pub(crate) fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> SysResult<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; zero means "not used".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: `msg` points at live, writable buffers.
        let ret = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        match check_long(ret as libc::c_long) {
            Err(Errno::EINTR) => continue,
            other => break other? as usize,
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` with `msg_controllen` bytes of
    // well-formed cmsgs; CMSG_FIRSTHDR/NXTHDR stay within them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    // The kernel installed each fd in our table for us.
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(Errno::EMSGSIZE);
    }
    Ok((n, fds))
}
