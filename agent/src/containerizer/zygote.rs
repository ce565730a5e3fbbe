//! The zygote: a small single-threaded process, forked from the agent when
//! the containerizer starts, that clones every container's init.
//!
//! Why: cloning the init from the agent itself (a multi-threaded process
//! with a busy heap) costs a copy of the agent's page tables per container,
//! and — the larger part — copy-on-write faults in the agent for as long as
//! each init lives, each with a TLB shootdown across the agent's threads
//! (measured: 35–40 % of all CPU at ~190 containers/s on 2 cores). The
//! zygote's memory is small and it writes almost nothing while inits live,
//! so those costs mostly vanish.
//!
//! Protocol (SOCK_SEQPACKET): the agent sends the container spec (JSON,
//! without its fds) with the init's fds attached (SCM_RIGHTS), in this
//! order: stdout and stderr (or the sandbox dir), the report socket, the
//! netns and the state dir (each when the request says it is there); the
//! zygote builds the plan, clones the init as
//! [`init::spawn`] does in-process, and answers `[errno: i32, pid: u32]`
//! with the init's pidfd attached. Inits are the zygote's children, reaped
//! automatically (SIGCHLD ignored): the agent learns the command's status
//! from the init's report, as it already does when an init was reaped
//! elsewhere. The zygote exits when the agent's end of the socket closes
//! (the containerizer dropped, or the agent gone); its inits live on,
//! reparented (they do not ask for a parent-death signal).
//!
//! After fork(2) in a multi-threaded process only the forking thread exists
//! in the child. glibc's fork makes malloc usable in the child; the zygote
//! touches no other lock (no logging, no std I/O) and never returns.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;

use super::init::{self, ChildFds, Scratch};
use super::{BindMount, ContainerSpec, Containerizer, Output, RootFs, sys};
use crate::logs::LogConfig;

/// Largest request: a spec with long argv/env (the agent caps both well
/// below this).
const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// The spec minus its fds, as sent to the zygote.
#[derive(serde::Serialize, serde::Deserialize)]
struct Request {
    id: String,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    rootfs: RootFs,
    hostname: String,
    mounts: Vec<BindMount>,
    user: Option<(u32, u32)>,
    cpus_milli: u64,
    mem_bytes: u64,
    /// `Output::Sandbox`'s rotation `(max_size, max_files)`; `None`:
    /// `Output::Fds`.
    logs: Option<(u64, u32)>,
    netns: bool,
    state: bool,
}

/// Longest wait for the zygote's answer; a zygote that does not answer is
/// killed and the agent clones inits itself from then on.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's handle on its zygote.
#[derive(Debug)]
pub(crate) struct Zygote {
    /// One request at a time: each is a send and its answer.
    sock: Mutex<OwnedFd>,
    pid: libc::pid_t,
    /// Killed after not answering: never asked again.
    dead: AtomicBool,
}

impl Zygote {
    /// Forks the zygote. Call before the containerizer is shared, so no
    /// other thread holds its state.
    pub(crate) fn start(cz: &Containerizer) -> Result<Zygote, Errno> {
        let (parent, child) = sys::socketpair_seqpacket()?;
        // SAFETY: glibc's fork(2); in the child only this thread exists and
        // it runs `serve`, which uses malloc (reset by glibc for the child)
        // and raw syscalls, takes no other lock, and never returns.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => Err(Errno::last()),
            0 => {
                drop(parent);
                serve(cz, child)
            }
            pid => {
                drop(child);
                Ok(Zygote {
                    sock: Mutex::new(parent),
                    pid,
                    dead: AtomicBool::new(false),
                })
            }
        }
    }

    /// Has the zygote clone the init of `spec` with `fds`; the init's pid
    /// and a pidfd for it. `None`: the request could not be sent (the
    /// zygote is gone), so no init was cloned and the caller may clone it
    /// itself. Once sent, any failure is final: an init may exist.
    pub(crate) fn spawn(
        &self,
        spec: &ContainerSpec,
        fds: ChildFds,
    ) -> Option<Result<(u32, OwnedFd), Errno>> {
        let request = Request {
            id: spec.id.clone(),
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            rootfs: spec.rootfs.clone(),
            hostname: spec.hostname.clone(),
            mounts: spec.mounts.clone(),
            user: spec.user,
            cpus_milli: spec.cpus_milli,
            mem_bytes: spec.mem_bytes,
            logs: match &spec.output {
                Output::Fds { .. } => None,
                Output::Sandbox { logs, .. } => Some((logs.max_size, logs.max_files)),
            },
            netns: fds.netns >= 0,
            state: fds.state >= 0,
        };
        if self.dead.load(Ordering::Acquire) {
            return None;
        }
        let body = serde_json::to_vec(&request).ok()?;
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let all = [
            fds.stdout,
            fds.stderr,
            fds.sandbox,
            fds.sock,
            fds.netns,
            fds.state,
        ];
        let mut passed = [-1; sys::MAX_PASSED_FDS];
        let mut count = 0;
        for fd in all.into_iter().filter(|fd| *fd >= 0) {
            passed[count] = fd;
            count += 1;
        }
        sys::send_with_fds(sock.as_raw_fd(), &body, &passed[..count]).ok()?;
        let ms = ANSWER_TIMEOUT.as_millis() as i32;
        if !sys::poll_readable(sock.as_raw_fd(), ms).unwrap_or(false) {
            // Hung (it must not be: see the module doc). An init it may
            // have cloned reports to the socket the caller holds, and the
            // caller kills what it cannot use.
            self.dead.store(true, Ordering::Release);
            // SAFETY: signals our own child process.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            return Some(Err(Errno::ETIMEDOUT));
        }
        let mut answer = [0u8; 8];
        let received = sys::recv_with_fds(sock.as_raw_fd(), &mut answer);
        drop(sock);
        Some(received.and_then(|(n, mut passed)| {
            if n != answer.len() {
                return Err(Errno::EPIPE);
            }
            let errno = i32::from_le_bytes([answer[0], answer[1], answer[2], answer[3]]);
            let pid = u32::from_le_bytes([answer[4], answer[5], answer[6], answer[7]]);
            if errno != 0 {
                return Err(Errno::from_raw(errno));
            }
            match (passed.pop(), passed.is_empty()) {
                (Some(pidfd), true) => Ok((pid, pidfd)),
                _ => Err(Errno::EPROTO),
            }
        }))
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Closing our end ends the zygote's loop; then reap it.
        if let Ok(sock) = self.sock.get_mut() {
            // SAFETY: shutdown(2) on our own open socket.
            unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid out-pointer.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The zygote's loop; runs in the forked child and never returns.
fn serve(cz: &Containerizer, sock: OwnedFd) -> ! {
    // Events (and `log` records through tracing-log) go nowhere: the
    // agent's subscriber may have held its lock at the fork, forever here.
    let _quiet = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
    // Inits are reaped by the kernel; the agent reads their reports.
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    // Keep 0-2 taken, so received fds are >= 3 as the init requires.
    for fd in 0..3 {
        // SAFETY: F_GETFD on any number is harmless.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: a constant, NUL-terminated path.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
    // Everything else the agent had open stays with the agent: a listening
    // socket held here (the master's, in `corral dev`) would keep its port
    // taken after the agent's process let it go, and a pipe or file would
    // never see its end.
    sys::close_fds_except(&[sock.as_raw_fd()], cz.max_fd);
    // SAFETY: a constant, NUL-terminated name for `ps`.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"corral-zygote".as_ptr()) };
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let (n, fds) = match sys::recv_with_fds(sock.as_raw_fd(), &mut buf) {
            Ok((0, _)) | Err(_) => sys::exit(0),
            Ok(got) => got,
        };
        let (errno, pid, pidfd) = match answer(cz, &buf[..n], fds) {
            Ok((pid, pidfd)) => (0, pid, Some(pidfd)),
            Err(e) => (e as i32, 0, None),
        };
        let mut reply = [0u8; 8];
        reply[..4].copy_from_slice(&errno.to_le_bytes());
        reply[4..].copy_from_slice(&pid.to_le_bytes());
        let passed: Vec<RawFd> = pidfd.iter().map(AsRawFd::as_raw_fd).collect();
        if sys::send_with_fds(sock.as_raw_fd(), &reply, &passed).is_err() {
            sys::exit(0);
        }
        // `pidfd` and the received fds close here: the agent has its copies.
    }
}

/// Builds the plan for one request and clones its init.
fn answer(cz: &Containerizer, body: &[u8], fds: Vec<OwnedFd>) -> Result<(u32, OwnedFd), Errno> {
    let request: Request = serde_json::from_slice(body).map_err(|_| Errno::EINVAL)?;
    let mut fds = fds.into_iter();
    let (output, sandbox) = match request.logs {
        None => {
            let (Some(stdout), Some(stderr)) = (fds.next(), fds.next()) else {
                return Err(Errno::EPROTO);
            };
            (Output::Fds { stdout, stderr }, None)
        }
        Some((max_size, max_files)) => {
            let dir = fds.next().ok_or(Errno::EPROTO)?;
            let logs = LogConfig {
                max_size,
                max_files,
            };
            // The path is not needed here: the init writes through the fd.
            let output = Output::Sandbox {
                dir: PathBuf::new(),
                logs,
            };
            (output, Some(dir))
        }
    };
    let sock = fds.next().ok_or(Errno::EPROTO)?;
    let netns = if request.netns {
        Some(fds.next().ok_or(Errno::EPROTO)?)
    } else {
        None
    };
    let state = if request.state {
        Some(fds.next().ok_or(Errno::EPROTO)?)
    } else {
        None
    };
    if fds.next().is_some() {
        return Err(Errno::EPROTO);
    }
    let raw = |fd: Option<&OwnedFd>| fd.map_or(-1, AsRawFd::as_raw_fd);
    let (stdout, stderr) = match &output {
        Output::Fds { stdout, stderr } => (stdout.as_raw_fd(), stderr.as_raw_fd()),
        Output::Sandbox { .. } => (-1, -1),
    };
    let child = ChildFds {
        stdout,
        stderr,
        sock: sock.as_raw_fd(),
        netns: raw(netns.as_ref()),
        sandbox: raw(sandbox.as_ref()),
        state: raw(state.as_ref()),
    };
    let spec = ContainerSpec {
        id: request.id,
        argv: request.argv,
        env: request.env,
        cwd: request.cwd,
        rootfs: request.rootfs,
        hostname: request.hostname,
        mounts: request.mounts,
        user: request.user,
        cpus_milli: request.cpus_milli,
        mem_bytes: request.mem_bytes,
        output,
        state_dir: None,
        netns,
    };
    let leaf = cz.cgroups.leaf(&spec.id);
    let plan = cz.child_plan(&spec, &leaf).map_err(|_| Errno::EINVAL)?;
    let mut scratch = Scratch::new(&plan);
    let spawned = init::spawn(&plan, &mut scratch, child);
    drop((sock, sandbox, state));
    spawned
}
