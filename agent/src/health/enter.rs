//! How a command probe gets into a task's container: the `docker exec` of
//! Corral, done in the forked child between fork and exec.
//!
//! In the agent ([`ContainerEntry::prepare`], per probe): open the
//! container init's namespaces that differ from the agent's (network when
//! it has its own, uts, ipc, mount — `/proc/<pid>/ns/*`), its root
//! (`/proc/<pid>/root`), and the `cgroup.procs` (v2) or `tasks` (v1) file
//! of each cgroup it is in and the agent is not; read its capability sets
//! and `no_new_privs`. Then check, through a pidfd taken while the init
//! was known to be alive, that it still is: so every file opened refers to
//! the init and not to a process that reused its pid.
//!
//! In the child ([`Prepared::enter`]): join the cgroups (so the probe is
//! accounted and limited with the task), `setns` into each namespace
//! (mount last), `fchdir` to the container's root + `chroot(".")` (as
//! `nsenter --root` does: correct whatever the namespace's root mount is),
//! drop to the container's privileges (bounding set, ambient set,
//! `no_new_privs`, user and group, and its effective/permitted/inheritable
//! capabilities), then `chdir` to the task's working directory. The probe
//! runs with the rights of the task's command and no more.
//!
//! `setns(CLONE_NEWNS)` fails in a multi-threaded process (EINVAL), hence
//! the forked child. The probe stays in the agent's pid namespace: joining
//! the container's would need a second fork in the child (setns(2) on a
//! pid namespace only moves later children). So inside the probe the
//! container's `/proc` shows the container's processes but not the probe
//! itself (`/proc/self` does not resolve there).

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::containerizer::sys;

/// The namespaces a probe joins when the container's differs from the
/// agent's, in the order joined: mount last, so the `/proc` paths above
/// were opened in the agent's view.
const NAMESPACES: [(&str, libc::c_int); 4] = [
    ("net", libc::CLONE_NEWNET),
    ("uts", libc::CLONE_NEWUTS),
    ("ipc", libc::CLONE_NEWIPC),
    ("mnt", libc::CLONE_NEWNS),
];

/// The umask of container commands (the init sets it).
const CONTAINER_UMASK: libc::mode_t = 0o022;

/// Why a command probe cannot get into its container; the message ends up
/// in the probe's failure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EnterError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("no mount of the cgroup hierarchy {hierarchy}")]
    NoCgroupMount { hierarchy: String },
    #[error("the init's status has no usable {field}")]
    Status { field: &'static str },
    #[error("the working directory contains a NUL byte")]
    CwdNul,
    #[error("cannot check the container's init: {0}")]
    Check(io::Error),
    #[error("the container has exited")]
    Exited,
}

/// What a command probe needs to enter one container; built when the
/// container started.
#[derive(Debug)]
pub(crate) struct ContainerEntry {
    pid: u32,
    /// Taken while the init was certainly alive (not yet waited for).
    pidfd: OwnedFd,
    cwd: PathBuf,
    env: Vec<(String, String)>,
    user: Option<(u32, u32)>,
}

/// A container's capability sets and `no_new_privs`, from its init's
/// `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Privileges {
    pub(crate) bounding: u64,
    pub(crate) effective: u64,
    pub(crate) permitted: u64,
    pub(crate) inheritable: u64,
    pub(crate) no_new_privs: bool,
}

impl ContainerEntry {
    /// For the container whose init is `pid`. Call it only while the init
    /// cannot have been reaped (before the launcher waits for it), so the
    /// pidfd is the init's.
    pub(crate) fn new(
        pid: u32,
        cwd: PathBuf,
        env: Vec<(String, String)>,
        user: Option<(u32, u32)>,
    ) -> io::Result<Self> {
        Ok(Self {
            pid,
            pidfd: pidfd_open(pid)?,
            cwd,
            env,
            user,
        })
    }

    /// The task's environment, for the probe.
    pub(crate) fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Everything the child needs, opened and read now; fails when the
    /// container is gone or a file cannot be opened, with a message saying
    /// which.
    pub(crate) fn prepare(&self) -> Result<Prepared, EnterError> {
        let proc_dir = PathBuf::from(format!("/proc/{}", self.pid));
        let open = |path: &Path| {
            std::fs::File::open(path)
                .map(OwnedFd::from)
                .map_err(|source| EnterError::Open {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let link = |path: &Path| {
            std::fs::read_link(path).map_err(|source| EnterError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let mut namespaces = Vec::with_capacity(NAMESPACES.len());
        for (name, flag) in NAMESPACES {
            let theirs = proc_dir.join("ns").join(name);
            if link(&theirs)? != link(&Path::new("/proc/self/ns").join(name))? {
                namespaces.push((open(&theirs)?, flag));
            }
        }
        let root = open(&proc_dir.join("root"))?;
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| EnterError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let files = join_files(
            &read(&proc_dir.join("cgroup"))?,
            &read(Path::new("/proc/self/cgroup"))?,
            &read(Path::new("/proc/self/mountinfo"))?,
        )?;
        let mut cgroups = Vec::with_capacity(files.len());
        for file in files {
            let fd = std::fs::OpenOptions::new()
                .write(true)
                .open(&file)
                .map_err(|source| EnterError::Open { path: file, source })?;
            cgroups.push(OwnedFd::from(fd));
        }
        let privileges = parse_privileges(&read(&proc_dir.join("status"))?)?;
        let cwd = CString::new(self.cwd.as_os_str().as_bytes()).map_err(|_| EnterError::CwdNul)?;
        // Every file above was opened while the init held its pid: it was
        // alive when the pidfd was taken, and is still.
        if exited(&self.pidfd).map_err(EnterError::Check)? {
            return Err(EnterError::Exited);
        }
        Ok(Prepared {
            cgroups,
            namespaces,
            root,
            cwd,
            user: self.user,
            privileges,
        })
    }
}

/// What the forked child uses to enter the container.
#[derive(Debug)]
pub(crate) struct Prepared {
    cgroups: Vec<OwnedFd>,
    namespaces: Vec<(OwnedFd, libc::c_int)>,
    root: OwnedFd,
    cwd: CString,
    user: Option<(u32, u32)>,
    privileges: Privileges,
}

impl Prepared {
    /// Enters the container; runs in the forked child, before exec.
    ///
    /// Async-signal-safe, as code between fork and exec of a
    /// multi-threaded process must be: only raw syscalls on the fds and C
    /// strings prepared in the agent, no allocation (`last_os_error` is an
    /// errno in a plain enum), no locks, nothing that can panic.
    pub(crate) fn enter(&self) -> io::Result<()> {
        for fd in &self.cgroups {
            // "0" is the writing process (cgroups(7)).
            // SAFETY: write(2) reads one byte from a static buffer.
            let n = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            check(n as libc::c_int)?;
        }
        for (fd, flag) in &self.namespaces {
            // SAFETY: setns(2) on an open namespace fd; no memory involved.
            check(unsafe { libc::setns(fd.as_raw_fd(), *flag) })?;
        }
        // SAFETY: fchdir(2) on an open directory fd; chroot(2) and chdir(2)
        // on NUL-terminated strings that live as long as `self`.
        unsafe {
            check(libc::fchdir(self.root.as_raw_fd()))?;
            check(libc::chroot(c".".as_ptr()))?;
            libc::umask(CONTAINER_UMASK);
        }
        let p = self.privileges;
        // Bounding set first: dropping needs CAP_SETPCAP, which capset
        // below may take away. EINVAL: a number past the kernel's last.
        for cap in 0..64u32 {
            if p.bounding & (1u64 << cap) == 0 {
                // SAFETY: prctl(2) with integer arguments only.
                let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) };
                if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        // SAFETY: prctl(2) with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        if rc != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(io::Error::last_os_error());
        }
        if p.no_new_privs {
            // SAFETY: prctl(2) with integer arguments only.
            check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        }
        let uid = match self.user {
            Some((uid, gid)) => {
                // SAFETY: setgroups(2) with an empty list (no pointer read);
                // setresgid(2)/setresuid(2) take integers.
                unsafe {
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setresgid(gid, gid, gid))?;
                    check(libc::setresuid(uid, uid, uid))?;
                }
                uid
            }
            None => 0,
        };
        // A non-root uid has no capabilities left (capabilities(7)); root
        // gets the container's sets.
        if uid == 0 {
            capset(p.effective, p.permitted, p.inheritable)?;
        }
        // Last, with the command's rights, as the init starts the command.
        // SAFETY: chdir(2) on a NUL-terminated string that lives as long
        // as `self`.
        check(unsafe { libc::chdir(self.cwd.as_ptr()) })?;
        Ok(())
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// capset(2), version 3 (64-bit sets in two 32-bit halves).
fn capset(effective: u64, permitted: u64, inheritable: u64) -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
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
    let half = |set: u64, high: bool| (if high { set >> 32 } else { set }) as u32;
    let data = [false, true].map(|high| Data {
        effective: half(effective, high),
        permitted: half(permitted, high),
        inheritable: half(inheritable, high),
    });
    // SAFETY: `header` and the two `data` words have the v3 layout capset(2)
    // expects and outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// pidfd_open(2): a handle on `pid` that stays valid after it exits and
/// can never refer to another process.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::pidfd_open(pid).map_err(io::Error::from)
}

/// A pidfd of `pid` registered with the tokio reactor: readable once the
/// process exited (and until it is reaped, after which it stays so).
pub(crate) fn watch_exit(pid: u32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let pidfd = pidfd_open(pid)?;
    // SAFETY: the AsyncFd owns the OwnedFd, so the fd stays open and is
    // not reused while it is registered (tokio's I/O-safety contract).
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)
}

/// Whether the process behind `pidfd` has exited (a pidfd polls readable
/// then, pidfd_open(2)).
pub(crate) fn exited(pidfd: &OwnedFd) -> io::Result<bool> {
    sys::poll_readable(pidfd.as_raw_fd(), 0).map_err(io::Error::from)
}

/// The files to write "0" into to join every cgroup the container is in
/// and the agent is not: `tasks` on a v1 hierarchy (moves only the
/// writing thread, which is all of the forked child, and spares the RCU
/// grace period a `cgroup.procs` write costs on v1), `cgroup.procs` on v2.
/// `target` and `own` are `/proc/<pid>/cgroup` texts, `mountinfo` the
/// agent's `/proc/self/mountinfo` (where the hierarchies are mounted).
pub(crate) fn join_files(
    target: &str,
    own: &str,
    mountinfo: &str,
) -> Result<Vec<PathBuf>, EnterError> {
    let own: HashMap<(&str, &str), &str> = own
        .lines()
        .filter_map(cgroup_line)
        .map(|(id, controllers, path)| ((id, controllers), path))
        .collect();
    let mounts: Vec<Mount> = mountinfo.lines().filter_map(Mount::parse).collect();
    let mut files = Vec::new();
    for (id, controllers, path) in target.lines().filter_map(cgroup_line) {
        if own.get(&(id, controllers)) == Some(&path) {
            continue;
        }
        let v2 = id == "0" && controllers.is_empty();
        let mount = mounts
            .iter()
            .filter(|m| {
                if v2 {
                    m.fstype == "cgroup2"
                } else {
                    m.fstype == "cgroup"
                        && controllers
                            .split(',')
                            .all(|c| m.super_options.split(',').any(|o| o == c))
                }
            })
            .find(|m| path.starts_with(m.root.as_str()))
            .ok_or_else(|| EnterError::NoCgroupMount {
                hierarchy: if v2 { "v2" } else { controllers }.to_string(),
            })?;
        let relative = path
            .strip_prefix(mount.root.as_str())
            .unwrap_or(path)
            .trim_start_matches('/');
        let dir = if relative.is_empty() {
            mount.point.clone()
        } else {
            mount.point.join(relative)
        };
        files.push(dir.join(if v2 { "cgroup.procs" } else { "tasks" }));
    }
    Ok(files)
}

/// `4:cpu,cpuacct:/corral/abc` → `("4", "cpu,cpuacct", "/corral/abc")`.
fn cgroup_line(line: &str) -> Option<(&str, &str, &str)> {
    let mut parts = line.splitn(3, ':');
    Some((parts.next()?, parts.next()?, parts.next()?))
}

/// One line of `/proc/self/mountinfo` (proc(5)), the fields we need.
struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    super_options: String,
}

impl Mount {
    fn parse(line: &str) -> Option<Mount> {
        let (before, after) = line.split_once(" - ")?;
        let fields: Vec<&str> = before.split(' ').collect();
        let mut rest = after.split(' ');
        let fstype = rest.next()?;
        let _source = rest.next()?;
        Some(Mount {
            root: unescape(fields.get(3)?),
            point: PathBuf::from(unescape(fields.get(4)?)),
            fstype: fstype.to_string(),
            super_options: rest.next().unwrap_or("").to_string(),
        })
    }
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The capability sets and `no_new_privs` in a `/proc/<pid>/status` text.
pub(crate) fn parse_privileges(status: &str) -> Result<Privileges, EnterError> {
    let field = |name: &'static str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .ok_or(EnterError::Status { field: name })
    };
    let caps = |name: &'static str| {
        field(name).and_then(|v| {
            u64::from_str_radix(v, 16).map_err(|_| EnterError::Status { field: name })
        })
    };
    Ok(Privileges {
        bounding: caps("CapBnd")?,
        effective: caps("CapEff")?,
        permitted: caps("CapPrm")?,
        inheritable: caps("CapInh")?,
        // Older kernels do not show it; the init always sets it.
        no_new_privs: !field("NoNewPrivs").is_ok_and(|v| v == "0"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
25 22 0:21 / /sys/fs/cgroup ro,nosuid shared:4 - tmpfs tmpfs ro,mode=755
26 25 0:22 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate
27 25 0:23 / /sys/fs/cgroup/systemd rw,nosuid shared:6 - cgroup cgroup rw,xattr,name=systemd
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/memory rw,nosuid shared:10 - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/pids rw,nosuid shared:11 - cgroup cgroup rw,pids
33 25 0:29 /sub /srv/my\\040cgroups rw shared:12 - cgroup cgroup rw,blkio
";

    const OWN: &str = "\
12:pids:/system.slice/corral.service
11:memory:/system.slice/corral.service
10:blkio:/sub/agent
4:cpu,cpuacct:/system.slice/corral.service
1:name=systemd:/system.slice/corral.service
0::/system.slice/corral.service
";

    #[test]
    fn only_the_cgroups_the_container_does_not_share_with_the_agent_are_joined() {
        let target = "\
12:pids:/corral/abc
11:memory:/corral/abc
10:blkio:/sub/corral/abc
4:cpu,cpuacct:/corral/abc
1:name=systemd:/system.slice/corral.service
0::/system.slice/corral.service
";
        let files = join_files(target, OWN, MOUNTINFO).unwrap();
        let files: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            files,
            [
                "/sys/fs/cgroup/pids/corral/abc/tasks",
                "/sys/fs/cgroup/memory/corral/abc/tasks",
                // The mount's root is cut off, its escapes undone.
                "/srv/my cgroups/corral/abc/tasks",
                "/sys/fs/cgroup/cpu,cpuacct/corral/abc/tasks",
            ]
        );
    }

    #[test]
    fn a_cgroup_v2_container_joins_through_cgroup_procs() {
        let mountinfo = "26 1 0:22 / /sys/fs/cgroup rw,nosuid shared:5 - cgroup2 cgroup2 rw\n";
        let files = join_files("0::/corral/abc\n", "0::/init.scope\n", mountinfo).unwrap();
        assert_eq!(
            files,
            [PathBuf::from("/sys/fs/cgroup/corral/abc/cgroup.procs")]
        );
        assert!(
            join_files("0::/init.scope\n", "0::/init.scope\n", mountinfo)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_hierarchy_that_is_not_mounted_is_an_error_naming_it() {
        let err = join_files("7:devices:/corral/abc\n", OWN, MOUNTINFO).unwrap_err();
        assert_eq!(err.to_string(), "no mount of the cgroup hierarchy devices");
    }

    #[test]
    fn privileges_come_from_the_status_file() {
        let status = "Name:\tcorral-init\nCapInh:\t00000000a80425fb\nCapPrm:\t00000000a80425fb\n\
                      CapEff:\t00000000a80425fb\nCapBnd:\t00000000a80425fb\n\
                      CapAmb:\t0000000000000000\nNoNewPrivs:\t1\n";
        let p = parse_privileges(status).unwrap();
        assert_eq!(
            p,
            Privileges {
                bounding: 0xa804_25fb,
                effective: 0xa804_25fb,
                permitted: 0xa804_25fb,
                inheritable: 0xa804_25fb,
                no_new_privs: true,
            }
        );
        assert_eq!(
            parse_privileges("Name:\tx\n").unwrap_err().to_string(),
            "the init's status has no usable CapBnd"
        );
    }

    #[test]
    fn a_pidfd_sees_its_process_exit() {
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read x"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let fd = pidfd_open(child.id()).unwrap();
        assert!(!exited(&fd).unwrap());
        drop(child.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !exited(&fd).unwrap() {
            assert!(std::time::Instant::now() < deadline, "no exit seen");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().unwrap();
    }
}
