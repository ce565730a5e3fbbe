//! The cloned child: a minimal init (pid 1 of the container's pid
//! namespace) that builds the container from a precomputed [`ChildPlan`]
//! and starts the command, then supervises it.
//!
//! Everything after the clone runs in a copy of the multi-threaded agent,
//! so it is async-signal-safe: raw syscalls on data prepared before the
//! clone, no allocation, no locks, no std I/O, and nothing that can panic
//! (slices are reached with `get`, or with indices checked just before).
//!
//! The init:
//! 1. blocks every signal (it takes them with `sigwaitinfo`), resets every
//!    handler to SIG_DFL (tokio's handlers and Rust's ignored SIGPIPE must
//!    not reach the command), closes every inherited fd but its three;
//! 2. becomes non-dumpable (so the container cannot open `/proc/1/exe`,
//!    `/proc/1/environ` or `/proc/1/mem` of what is a copy of the agent)
//!    and names itself `corral-init` (comm and cmdline: the container must
//!    not see the agent's command line);
//! 3. opens its cgroup root directories (they are unreachable after the
//!    pivot), runs the mount plan, sets the hostname;
//! 4. waits for the agent's "go" (sent once the agent has created the
//!    cgroup) and moves itself into it, so everything below is accounted
//!    and limited and the command starts inside it; then the last mount
//!    steps (on the host root: `/sys` read-only, which would also make the
//!    cgroup files read-only);
//! 5. stdio, umask 022, `no_new_privs`, capabilities cut to the Docker set
//!    (bounding, ambient cleared, then effective/permitted/inheritable);
//! 6. starts the command with `CLONE_VM | CLONE_VFORK` (it closes fds,
//!    switches user, chdirs, checks the cwd, execs; a failure is written to
//!    shared memory, which the init reads when it resumes);
//! 7. reports STARTED (or the failure) to the agent, then forwards
//!    SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the command, reaps
//!    every zombie, and when the command ends reports its wait status
//!    (pid 1 cannot die of its own signal, so the status travels over the
//!    socket) and exits — the kernel then kills whatever is left in the pid
//!    namespace.
//!
//! Containers outlive the agent: with a [`LogPlan`] the init itself pumps
//! the command's stdout and stderr (pipes it makes) into rotating files in
//! the sandbox, through a directory fd the agent opened (rotation is
//! `renameat`/`openat` on that fd, so it works after the pivot), and with a
//! state directory fd it records the command's status in `.corral-exit` there
//! (temp file + `renameat`) before it reports and exits. The report socket
//! may be closed at any time (the agent killed): sends to it just fail.
//! Nothing of a running container then depends on the agent process.

use std::ffi::CString;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use nix::errno::Errno;

use super::plan::{self, LinuxSys, MountPlan};
use super::sys::{self, Forked};

/// What /proc/1/cmdline shows inside the container.
const INIT_NAME: &[u8] = b"corral-init";

/// Stack of the vfork'd command child: it only makes a few syscalls (the
/// largest frame holds a 4 KiB getcwd buffer).
const COMMAND_STACK_BYTES: usize = 64 * 1024;

/// Signals the init passes on to the command (tini's set, minus job
/// control).
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Where a setup failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Stage {
    Signals = 1,
    Mount,
    Hostname,
    JoinCgroup,
    Stdio,
    NoNewPrivs,
    CapBounding,
    CapAmbient,
    Capset,
    SpawnCommand,
    Setgroups,
    Setgid,
    Setuid,
    Chdir,
    CwdOutsideRoot,
    Exec,
    JoinNetwork,
    /// Pipes, signalfd or log files of the init's log pump.
    Logs,
}

impl Stage {
    fn from_u32(v: u32) -> Option<Stage> {
        use Stage::*;
        [
            Signals,
            Mount,
            Hostname,
            JoinCgroup,
            Stdio,
            NoNewPrivs,
            CapBounding,
            CapAmbient,
            Capset,
            SpawnCommand,
            Setgroups,
            Setgid,
            Setuid,
            Chdir,
            CwdOutsideRoot,
            Exec,
            JoinNetwork,
            Logs,
        ]
        .into_iter()
        .find(|s| *s as u32 == v)
    }

    /// The step, for messages (mount steps are described by the plan).
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Stage::Signals => "set up signals",
            Stage::Mount => "mount",
            Stage::Hostname => "set hostname",
            Stage::JoinCgroup => "join cgroup",
            Stage::Stdio => "set up stdin/stdout/stderr",
            Stage::NoNewPrivs => "set no_new_privs",
            Stage::CapBounding => "drop capabilities from the bounding set",
            Stage::CapAmbient => "clear ambient capabilities",
            Stage::Capset => "set capabilities",
            Stage::SpawnCommand => "start the command",
            Stage::Setgroups => "clear supplementary groups",
            Stage::Setgid => "set gid",
            Stage::Setuid => "set uid",
            Stage::Chdir => "chdir",
            Stage::CwdOutsideRoot => "check cwd",
            Stage::Exec => "exec",
            Stage::JoinNetwork => "join the pod's network namespace",
            Stage::Logs => "set up the log files in the sandbox",
        }
    }
}

/// One record on the agent <-> init socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Report {
    /// Setup failed; the init exits.
    Failed {
        stage: Stage,
        index: u32,
        errno: i32,
    },
    /// The command has been exec'd.
    Started,
    /// The command ended with this `waitpid` status.
    Exited { status: i32 },
    /// Agent → init: you are in the cgroup, carry on.
    Go,
}

pub(crate) const REPORT_LEN: usize = 16;

impl Report {
    pub(crate) fn encode(self) -> [u8; REPORT_LEN] {
        let words: [u32; 4] = match self {
            Report::Failed {
                stage,
                index,
                errno,
            } => [1, stage as u32, index, errno as u32],
            Report::Started => [2, 0, 0, 0],
            Report::Exited { status } => [3, status as u32, 0, 0],
            Report::Go => [4, 0, 0, 0],
        };
        let mut out = [0u8; REPORT_LEN];
        for (chunk, w) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        out
    }

    pub(crate) fn decode(buf: &[u8]) -> Option<Report> {
        if buf.len() != REPORT_LEN {
            return None;
        }
        let mut words = [0u32; 4];
        for (w, chunk) in words.iter_mut().zip(buf.chunks_exact(4)) {
            *w = u32::from_ne_bytes(chunk.try_into().ok()?);
        }
        match words {
            [1, stage, index, errno] => Some(Report::Failed {
                stage: Stage::from_u32(stage)?,
                index,
                errno: errno as i32,
            }),
            [2, ..] => Some(Report::Started),
            [3, status, ..] => Some(Report::Exited {
                status: status as i32,
            }),
            [4, ..] => Some(Report::Go),
            _ => None,
        }
    }
}

/// argv, envp and the executable candidates as C arrays.
pub(crate) struct ExecPlan {
    pub(crate) candidates: Vec<CString>,
    // The pointer arrays point into these.
    _argv: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    _env: Vec<CString>,
    envp: Vec<*const libc::c_char>,
}

impl ExecPlan {
    pub(crate) fn new(
        argv: &[String],
        env: &[(String, String)],
        candidates: &[String],
    ) -> Result<ExecPlan, String> {
        let c = |s: String| CString::new(s).map_err(|_| "argument contains a NUL byte".to_string());
        let argv_c = argv.iter().cloned().map(c).collect::<Result<Vec<_>, _>>()?;
        let env_c = env
            .iter()
            .map(|(k, v)| c(format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let candidates = candidates
            .iter()
            .cloned()
            .map(c)
            .collect::<Result<Vec<_>, _>>()?;
        let ptrs = |v: &[CString]| {
            v.iter()
                .map(|s| s.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect::<Vec<_>>()
        };
        Ok(ExecPlan {
            candidates,
            argv: ptrs(&argv_c),
            envp: ptrs(&env_c),
            _argv: argv_c,
            _env: env_c,
        })
    }
}

/// Where the init records how the command ended, in the state directory.
pub(crate) const EXIT_FILE: &std::ffi::CStr = c".corral-exit";
/// Written first, then renamed over [`EXIT_FILE`]: readers see all or none.
const EXIT_TMP: &std::ffi::CStr = c".corral-exit.tmp";
/// The init's read size for the log pipes, on its stack: small, since every
/// running container has an init (a pipe holds 64 KiB; a chatty command
/// costs a few more reads, not more memory).
const PUMP_BUF: usize = 8 * 1024;
/// Reads per pipe once the command has ended: what it wrote is in the
/// pipe already; a descendant that keeps writing must not keep the init
/// (and the status record) waiting forever.
const DRAIN_READS: usize = 64;

/// How the init writes the command's output into the sandbox: the names
/// of the live file and of its rotations (`stdout`, `stdout.1`, …) and the
/// largest size of one file — the rotation of [`crate::logs::RotatingFile`].
pub(crate) struct LogPlan {
    pub(crate) max_size: u64,
    pub(crate) stdout: Vec<CString>,
    pub(crate) stderr: Vec<CString>,
}

impl LogPlan {
    pub(crate) fn new(max_size: u64, max_files: u32) -> LogPlan {
        let names = |stream: &str| {
            (0..max_files.max(1))
                .map(|n| {
                    let name = if n == 0 {
                        stream.to_string()
                    } else {
                        format!("{stream}.{n}")
                    };
                    // No NUL in these names.
                    CString::new(name).unwrap_or_default()
                })
                .collect()
        };
        LogPlan {
            max_size: max_size.max(1),
            stdout: names("stdout"),
            stderr: names("stderr"),
        }
    }
}

/// Everything the child needs, built before the clone.
pub(crate) struct ChildPlan {
    pub(crate) mounts: MountPlan,
    /// To join the container's cgroup: "0" goes into `file` under `dir`
    /// (the cgroup root, which exists before the clone; it is opened before
    /// the pivot, the file is written after "go").
    pub(crate) join: Vec<JoinFile>,
    pub(crate) hostname: CString,
    pub(crate) cwd: CString,
    pub(crate) user: Option<(u32, u32)>,
    pub(crate) keep_caps: u64,
    pub(crate) last_cap: u32,
    pub(crate) exec: ExecPlan,
    /// Upper bound for closing fds one by one without close_range(2).
    pub(crate) max_fd: u32,
    /// The agent's argument area `(arg_start, arg_end)`, which the init
    /// overwrites in its copy; `(0, 0)` if unknown.
    pub(crate) args_area: (usize, usize),
    /// The init pumps the output into the sandbox (`ChildFds::sandbox`);
    /// `None`: the command writes to `ChildFds::stdout`/`stderr` itself.
    pub(crate) logs: Option<LogPlan>,
}

/// One cgroup control file to write "0" to.
pub(crate) struct JoinFile {
    pub(crate) dir: CString,
    pub(crate) file: CString,
}

/// Memory the child writes: detached-tree fds, cgroup dir fds and the
/// command's stack.
pub(crate) struct Scratch {
    slots: Vec<RawFd>,
    join_fds: Vec<RawFd>,
    stack: Vec<u8>,
}

impl Scratch {
    pub(crate) fn new(plan: &ChildPlan) -> Scratch {
        Scratch {
            slots: vec![-1; plan.mounts.slots],
            join_fds: vec![-1; plan.join.len()],
            stack: vec![0; COMMAND_STACK_BYTES],
        }
    }
}

/// The child's fds (all >= 3, checked by the caller; -1 when absent).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildFds {
    /// The command's stdout and stderr; -1 when the init pumps the output
    /// into the sandbox instead.
    pub(crate) stdout: RawFd,
    pub(crate) stderr: RawFd,
    pub(crate) sock: RawFd,
    /// A network namespace to join, or -1 for the host's.
    pub(crate) netns: RawFd,
    /// The sandbox directory, for the log files (with `ChildPlan::logs`).
    pub(crate) sandbox: RawFd,
    /// The state directory, for the exit record; -1: none is kept.
    pub(crate) state: RawFd,
}

const NAMESPACES: libc::c_int =
    libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;

/// Clones the init into new pid, mount, uts and ipc namespaces; it keeps
/// the host network or joins `fds.netns`. Returns its host pid and a pidfd.
pub(crate) fn spawn(
    plan: &ChildPlan,
    scratch: &mut Scratch,
    fds: ChildFds,
) -> Result<(u32, OwnedFd), Errno> {
    // SAFETY: the child runs only `init_main`, which is async-signal-safe
    // (everything it touches was built before the clone; see the module
    // doc) and never returns.
    match unsafe { sys::clone_into_namespaces(NAMESPACES as u64) }? {
        Forked::Child => init_main(plan, scratch, fds),
        Forked::Parent { pid, pidfd } => Ok((pid, pidfd)),
    }
}

/// Whether this process may create the container namespaces: clones a
/// child into them that exits at once.
pub(crate) fn probe_namespaces() -> Result<(), Errno> {
    // SAFETY: the child only calls _exit.
    match unsafe { sys::clone_into_namespaces(NAMESPACES as u64) }? {
        Forked::Child => sys::exit(0),
        Forked::Parent { pidfd, .. } => {
            use std::os::fd::AsRawFd;
            sys::waitid_pidfd(pidfd.as_raw_fd(), false).map(drop)
        }
    }
}

fn report(sock: RawFd, r: Report) {
    // The agent may be gone (orphaned container): nothing to do then.
    let _ = sys::send(sock, &r.encode());
}

fn fail(sock: RawFd, stage: Stage, index: u32, errno: Errno) -> ! {
    report(
        sock,
        Report::Failed {
            stage,
            index,
            errno: errno as i32,
        },
    );
    sys::exit(1)
}

fn init_main(plan: &ChildPlan, scratch: &mut Scratch, fds: ChildFds) -> ! {
    let sock = fds.sock;
    if let Err(e) = sys::block_all_signals() {
        fail(sock, Stage::Signals, 0, e);
    }
    sys::reset_signal_dispositions();
    let mut keep = [
        fds.stdout,
        fds.stderr,
        sock,
        fds.netns,
        fds.sandbox,
        fds.state,
    ];
    keep.sort_unstable();
    // Absent fds (-1) sort first and must not count.
    let first = keep.iter().position(|&fd| fd >= 0).unwrap_or(keep.len());
    sys::close_fds_except(keep.get(first..).unwrap_or(&[]), plan.max_fd);
    // Before the mounts: a fresh /sys shows the network of its mounter.
    if fds.netns >= 0 {
        if let Err(e) = sys::setns(fds.netns, libc::CLONE_NEWNET) {
            fail(sock, Stage::JoinNetwork, 0, e);
        }
        sys::close(fds.netns);
    }

    let _ = sys::prctl(libc::PR_SET_DUMPABLE, 0);
    sys::set_name(c"corral-init");
    sys::overwrite_cmdline(plan.args_area.0, plan.args_area.1, INIT_NAME);
    // Device nodes and mount points get exactly the modes the plan says.
    sys::umask(0);

    for (index, (join, fd)) in plan
        .join
        .iter()
        .zip(scratch.join_fds.iter_mut())
        .enumerate()
    {
        match sys::open_dir_path(&join.dir) {
            Ok(dir) => *fd = dir,
            Err(e) => fail(sock, Stage::JoinCgroup, index as u32, e),
        }
    }

    let mounts = &plan.mounts;
    if let Err(f) = plan::execute_range(mounts, 0..mounts.late, &LinuxSys, &mut scratch.slots) {
        fail(sock, Stage::Mount, f.step as u32, f.errno);
    }
    if let Err(e) = sys::sethostname(plan.hostname.as_bytes()) {
        fail(sock, Stage::Hostname, 0, e);
    }

    let mut buf = [0u8; REPORT_LEN];
    match sys::recv(sock, &mut buf, false) {
        Ok(REPORT_LEN) if Report::decode(&buf) == Some(Report::Go) => {}
        // The agent failed (or died) before creating the cgroup.
        _ => sys::exit(1),
    }
    for (index, (join, &dir)) in plan.join.iter().zip(scratch.join_fds.iter()).enumerate() {
        if let Err(e) = sys::write_file_at(dir, &join.file, b"0") {
            fail(sock, Stage::JoinCgroup, index as u32, e);
        }
        sys::close(dir);
    }
    let all = mounts.late..mounts.ops.len();
    if let Err(f) = plan::execute_range(mounts, all, &LinuxSys, &mut scratch.slots) {
        fail(sock, Stage::Mount, f.step as u32, f.errno);
    }

    let null = match sys::open(c"/dev/null", libc::O_RDWR, 0) {
        Ok(fd) => fd,
        Err(e) => fail(sock, Stage::Stdio, 0, e),
    };
    let mut pump = None;
    match &plan.logs {
        None => {
            for (index, (from, to)) in [(null, 0), (fds.stdout, 1), (fds.stderr, 2)]
                .into_iter()
                .enumerate()
            {
                if let Err(e) = sys::dup2(from, to) {
                    fail(sock, Stage::Stdio, index as u32, e);
                }
            }
            for fd in [null, fds.stdout, fds.stderr] {
                if fd > 2 {
                    sys::close(fd);
                }
            }
        }
        Some(logs) => {
            // 0-2 taken first, so the pipes and files below land above them
            // and the dup2s cannot clobber one another.
            for to in 0..3 {
                if let Err(e) = sys::dup2(null, to) {
                    fail(sock, Stage::Stdio, to as u32, e);
                }
            }
            if null > 2 {
                sys::close(null);
            }
            let (p, writers) = match Pump::open(logs, fds.sandbox) {
                Ok(opened) => opened,
                Err((index, e)) => fail(sock, Stage::Logs, index, e),
            };
            for (index, (from, to)) in [(writers[0], 1), (writers[1], 2)].into_iter().enumerate() {
                if let Err(e) = sys::dup2(from, to) {
                    fail(sock, Stage::Stdio, index as u32 + 1, e);
                }
                sys::close(from);
            }
            pump = Some(p);
        }
    }
    sys::umask(0o022);

    if let Err(e) = sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1) {
        fail(sock, Stage::NoNewPrivs, 0, e);
    }
    // Bounding set first: dropping needs CAP_SETPCAP in the effective set.
    for cap in 0..=plan.last_cap.min(63) {
        if plan.keep_caps & (1u64 << cap) == 0 {
            match sys::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) {
                Ok(()) | Err(Errno::EINVAL) => {}
                Err(e) => fail(sock, Stage::CapBounding, cap, e),
            }
        }
    }
    match sys::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    ) {
        Ok(()) | Err(Errno::EINVAL) => {}
        Err(e) => fail(sock, Stage::CapAmbient, 0, e),
    }
    if let Err(e) = sys::capset(plan.keep_caps) {
        fail(sock, Stage::Capset, 0, e);
    }

    let result = CommandResult {
        stage: AtomicU32::new(0),
        errno: AtomicI32::new(0),
    };
    let args = CommandArgs {
        plan,
        result: &result,
    };
    // SAFETY: `command_main` is async-signal-safe and ends in execve or
    // _exit; `args` and `scratch.stack` outlive it because CLONE_VFORK
    // suspends us until then.
    let spawned = unsafe {
        sys::spawn_vfork(
            &mut scratch.stack,
            command_main,
            &args as *const CommandArgs<'_> as *mut libc::c_void,
        )
    };
    let pid = match spawned {
        Ok(pid) => pid,
        Err(e) => fail(sock, Stage::SpawnCommand, 0, e),
    };
    let stage = result.stage.load(Ordering::Acquire);
    if stage != 0 {
        let errno = Errno::from_raw(result.errno.load(Ordering::Relaxed));
        let _ = sys::waitpid_blocking(pid);
        fail(
            sock,
            Stage::from_u32(stage).unwrap_or(Stage::Exec),
            0,
            errno,
        );
    }
    match pump {
        Some(pump) => {
            // The init lets go of the pipes' write ends (fd 0 is /dev/null),
            // so a pipe hangs up once the command and its children closed it.
            let _ = sys::dup2(0, 1);
            let _ = sys::dup2(0, 2);
            report(sock, Report::Started);
            supervise_pumping(pid, sock, fds.state, pump)
        }
        None => {
            report(sock, Report::Started);
            supervise(pid, sock, fds.state)
        }
    }
}

/// Forwards signals to the command and reaps zombies until the command
/// has exited; then records and reports its status and exits.
fn supervise(command: libc::pid_t, sock: RawFd, state: RawFd) -> ! {
    loop {
        let Ok(sig) = sys::wait_signal() else {
            continue;
        };
        if sig == libc::SIGCHLD {
            while let Ok(Some((pid, status))) = sys::waitpid_nohang(-1) {
                if pid == command {
                    finish(sock, state, status);
                }
            }
        } else if FORWARDED.contains(&sig) {
            let _ = sys::kill(command, sig);
        }
    }
}

/// [`supervise`], also pumping the log pipes into the sandbox: one `poll`
/// over a signalfd and the two pipes.
fn supervise_pumping(command: libc::pid_t, sock: RawFd, state: RawFd, mut pump: Pump<'_>) -> ! {
    let mut buf = [0u8; PUMP_BUF];
    let pollfd = |fd: RawFd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // A negative fd (a pipe at end of file) is skipped by poll(2).
        let mut fds = [
            pollfd(pump.sigfd),
            pollfd(pump.streams[0].pipe),
            pollfd(pump.streams[1].pipe),
        ];
        if sys::poll_forever(&mut fds).is_err() {
            continue;
        }
        for (stream, fd) in pump.streams.iter_mut().zip(fds.iter().skip(1)) {
            if fd.revents != 0 {
                stream.pump_once(pump.dir, pump.max_size, &mut buf);
            }
        }
        if fds[0].revents == 0 {
            continue;
        }
        while let Ok(Some(sig)) = sys::read_signal(pump.sigfd) {
            if sig == libc::SIGCHLD {
                while let Ok(Some((pid, status))) = sys::waitpid_nohang(-1) {
                    if pid == command {
                        for stream in &mut pump.streams {
                            stream.drain(pump.dir, pump.max_size, &mut buf);
                        }
                        finish(sock, state, status);
                    }
                }
            } else if FORWARDED.contains(&sig) {
                let _ = sys::kill(command, sig);
            }
        }
    }
}

/// The command ended: record its status (for an agent that may be gone),
/// report it (to one that may be there), exit.
fn finish(sock: RawFd, state: RawFd, status: libc::c_int) -> ! {
    record_exit(state, status);
    report(sock, Report::Exited { status });
    sys::exit(0)
}

/// Writes `.corral-exit` in the state directory: `.corral-exit.tmp`, then renamed, so a
/// reader sees a whole record or none. No fsync: the record only matters
/// within this boot (a reboot ends every container, and the agent then
/// starts over), and within a boot rename(2) is atomic for every reader.
fn record_exit(state: RawFd, status: libc::c_int) {
    if state < 0 {
        return;
    }
    let mut text = [0u8; 32];
    let len = exit_record(sys::Exit::from_wait_status(status), &mut text);
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW;
    let Ok(fd) = sys::openat(state, EXIT_TMP, flags | libc::O_CLOEXEC, 0o644) else {
        return;
    };
    let written = sys::write_all(fd, text.get(..len).unwrap_or(&[]));
    sys::close(fd);
    if written.is_ok() {
        let _ = sys::renameat(state, EXIT_TMP, EXIT_FILE);
    }
}

/// `exit N\n` or `signal N\n` into `out` (no allocation: the init is
/// async-signal-safe); the length written.
pub(crate) fn exit_record(exit: sys::Exit, out: &mut [u8; 32]) -> usize {
    let (word, n): (&[u8], i32) = match exit {
        sys::Exit::Code(c) => (b"exit ", c),
        sys::Exit::Signal(s) => (b"signal ", s),
    };
    // At most 7 + 1 + 10 + 1 bytes: always fits; `get_mut` keeps it
    // panic-free anyway.
    let mut len = 0;
    let mut push = |b: u8| {
        if let Some(slot) = out.get_mut(len) {
            *slot = b;
            len += 1;
        }
    };
    word.iter().for_each(|&b| push(b));
    if n < 0 {
        push(b'-');
    }
    let mut digits = [0u8; 10];
    let mut count = 0;
    let mut v = n.unsigned_abs();
    // Bounded: a u32 has at most 10 digits.
    for slot in digits.iter_mut() {
        *slot = b'0' + (v % 10) as u8;
        count += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    digits.iter().take(count).rev().for_each(|&d| push(d));
    push(b'\n');
    len
}

/// Reads an [`exit_record`] back.
pub(crate) fn parse_exit_record(text: &str) -> Option<sys::Exit> {
    let (word, n) = text.trim_end().split_once(' ')?;
    let n: i32 = n.parse().ok()?;
    match word {
        "exit" => Some(sys::Exit::Code(n)),
        "signal" => Some(sys::Exit::Signal(n)),
        _ => None,
    }
}

/// The init's log pump: the sandbox dir fd, a signalfd and both streams.
/// Plain fds and borrowed names, nothing allocated after the clone.
struct Pump<'a> {
    dir: RawFd,
    max_size: u64,
    sigfd: RawFd,
    streams: [Stream<'a>; 2],
}

/// One output stream: the pipe's read end (-1 at end of file), the live
/// file (-1 when it could not be reopened) and its size.
struct Stream<'a> {
    pipe: RawFd,
    file: RawFd,
    size: u64,
    names: &'a [CString],
}

/// Flags of a live log file. The task can write to the sandbox: never
/// follow a symlink it may have put in place of the file, and never block
/// on a FIFO (no reader: ENXIO; a regular file ignores O_NONBLOCK).
const LOG_FLAGS: libc::c_int = libc::O_WRONLY
    | libc::O_CREAT
    | libc::O_TRUNC
    | libc::O_NOFOLLOW
    | libc::O_NONBLOCK
    | libc::O_CLOEXEC;

impl<'a> Pump<'a> {
    /// Makes both pipes, (re)creates the live files and the signalfd. The
    /// write ends of the pipes are returned for the command's 1 and 2.
    /// Errors: `(step index, errno)`.
    fn open(plan: &'a LogPlan, dir: RawFd) -> Result<(Pump<'a>, [RawFd; 2]), (u32, Errno)> {
        let sigfd = sys::signalfd_all().map_err(|e| (0, e))?;
        let mut streams = [&plan.stdout, &plan.stderr].map(|names| Stream {
            pipe: -1,
            file: -1,
            size: 0,
            names: names.as_slice(),
        });
        let mut writers = [-1; 2];
        for (i, (stream, writer)) in streams.iter_mut().zip(writers.iter_mut()).enumerate() {
            let step = 1 + 2 * i as u32;
            let (r, w) = sys::pipe_nonblocking_read().map_err(|e| (step, e))?;
            stream.pipe = r;
            *writer = w;
            let name = stream.names.first().ok_or((step + 1, Errno::EINVAL))?;
            stream.file = sys::openat(dir, name, LOG_FLAGS, 0o644).map_err(|e| (step + 1, e))?;
        }
        Ok((
            Pump {
                dir,
                max_size: plan.max_size,
                sigfd,
                streams,
            },
            writers,
        ))
    }
}

impl Stream<'_> {
    /// One read from the pipe into the files; end of file or an error
    /// closes the pipe (it is polled no more).
    fn pump_once(&mut self, dir: RawFd, max_size: u64, buf: &mut [u8]) -> bool {
        if self.pipe < 0 {
            return false;
        }
        match sys::read(self.pipe, buf) {
            Ok(0) => {}
            Ok(n) => {
                self.write(dir, max_size, buf.get(..n).unwrap_or(&[]));
                return true;
            }
            Err(Errno::EAGAIN) => return false,
            Err(_) => {}
        }
        sys::close(self.pipe);
        self.pipe = -1;
        false
    }

    /// What is left in the pipe, bounded by [`DRAIN_READS`].
    fn drain(&mut self, dir: RawFd, max_size: u64, buf: &mut [u8]) {
        for _ in 0..DRAIN_READS {
            if !self.pump_once(dir, max_size, buf) {
                return;
            }
        }
    }

    /// Appends, rotating first when `data` would not fit (a chunk larger
    /// than a file is split), as `RotatingFile::write` does. A failed write
    /// (a full disk) loses that chunk: the command must never block on a
    /// full pipe because its log cannot be written.
    fn write(&mut self, dir: RawFd, max_size: u64, mut data: &[u8]) {
        // Bounded: every pass consumes at least one byte.
        while !data.is_empty() {
            if self.file < 0 {
                // The last rotation could not make a new live file: try
                // again, without shifting the rotated ones once more.
                self.reopen(dir);
            } else if self.size >= max_size {
                self.rotate(dir);
            }
            let room = usize::try_from(max_size.saturating_sub(self.size)).unwrap_or(usize::MAX);
            let (now, rest) = data.split_at(data.len().min(room.max(1)));
            if self.file >= 0 {
                let _ = sys::write_all(self.file, now);
            }
            self.size += now.len() as u64;
            data = rest;
        }
    }

    /// `stdout.N-2` → `stdout.N-1`, …, `stdout` → `stdout.1`, then a new
    /// live file (only the live file kept: it starts over).
    fn rotate(&mut self, dir: RawFd) {
        let keep = self.names.len();
        if keep > 1 {
            if let Some(oldest) = self.names.get(keep - 1) {
                let _ = sys::unlinkat(dir, oldest);
            }
            for n in (0..keep - 1).rev() {
                if let (Some(from), Some(to)) = (self.names.get(n), self.names.get(n + 1)) {
                    let _ = sys::renameat(dir, from, to);
                }
            }
        }
        self.reopen(dir);
    }

    /// A new, empty live file.
    fn reopen(&mut self, dir: RawFd) {
        if self.file >= 0 {
            sys::close(self.file);
        }
        self.file = match self.names.first() {
            Some(live) => sys::openat(dir, live, LOG_FLAGS, 0o644).unwrap_or(-1),
            None => -1,
        };
        self.size = 0;
    }
}

/// Written by the command child before it gives up; read by the init once
/// CLONE_VFORK resumes it. Atomics, so neither side's compiler caches it.
struct CommandResult {
    stage: AtomicU32,
    errno: AtomicI32,
}

struct CommandArgs<'a> {
    plan: &'a ChildPlan,
    result: &'a CommandResult,
}

fn command_fail(result: &CommandResult, stage: Stage, errno: Errno) -> ! {
    result.errno.store(errno as i32, Ordering::Relaxed);
    result.stage.store(stage as u32, Ordering::Release);
    sys::exit(127)
}

extern "C" fn command_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `CommandArgs` the init passed to spawn_vfork;
    // the init is suspended (CLONE_VFORK) until we exec or exit, so it is
    // alive and nobody else touches it.
    let args = unsafe { &*(arg as *const CommandArgs<'_>) };
    let (plan, result) = (args.plan, args.result);

    // The socket to the agent and anything else: only 0, 1, 2 go on.
    sys::close_range(3, u32::MAX, plan.max_fd);
    if let Some((uid, gid)) = plan.user {
        // After setresuid to a non-zero uid the kernel clears the permitted
        // and effective capabilities (capabilities(7)); no_new_privs keeps
        // exec from granting any back.
        if let Err(e) = sys::setgroups_empty() {
            command_fail(result, Stage::Setgroups, e);
        }
        if let Err(e) = sys::setresgid(gid) {
            command_fail(result, Stage::Setgid, e);
        }
        if let Err(e) = sys::setresuid(uid) {
            command_fail(result, Stage::Setuid, e);
        }
    }
    if let Err(e) = sys::chdir(&plan.cwd) {
        command_fail(result, Stage::Chdir, e);
    }
    match sys::cwd_is_inside_root() {
        Ok(true) => {}
        Ok(false) => command_fail(result, Stage::CwdOutsideRoot, Errno::from_raw(0)),
        Err(e) => command_fail(result, Stage::CwdOutsideRoot, e),
    }
    if let Err(e) = sys::unblock_all_signals() {
        command_fail(result, Stage::Signals, e);
    }
    // execvp's rules: keep looking past ENOENT/ENOTDIR/EACCES, report
    // EACCES if any candidate had it, stop at anything else.
    let mut err = Errno::ENOENT;
    let mut saw_eacces = false;
    for candidate in &plan.exec.candidates {
        let e = sys::execve(candidate, &plan.exec.argv, &plan.exec.envp);
        match e {
            Errno::EACCES => saw_eacces = true,
            Errno::ENOENT | Errno::ENOTDIR | Errno::ESTALE | Errno::ENODEV | Errno::ETIMEDOUT => {}
            other => command_fail(result, Stage::Exec, other),
        }
        err = e;
    }
    command_fail(
        result,
        Stage::Exec,
        if saw_eacces { Errno::EACCES } else { err },
    )
}

/// The description of the program for messages.
pub(crate) fn program_name(argv: &[String]) -> &str {
    argv.first().map_or("", String::as_str)
}

/// For tests of the C arrays.
#[cfg(test)]
fn c_array(ptrs: &[*const libc::c_char]) -> Vec<String> {
    ptrs.iter()
        .take_while(|p| !p.is_null())
        // SAFETY: test-only; the pointers come from live CStrings.
        .map(|p| {
            unsafe { std::ffi::CStr::from_ptr(*p) }
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        for r in [
            Report::Failed {
                stage: Stage::Exec,
                index: 7,
                errno: libc::ENOENT,
            },
            Report::Started,
            Report::Exited { status: 0x0f00 },
            Report::Exited { status: 9 },
            Report::Go,
        ] {
            assert_eq!(Report::decode(&r.encode()), Some(r));
        }
        assert_eq!(Stage::from_u32(Stage::Logs as u32), Some(Stage::Logs));
        assert_eq!(Report::decode(&[0u8; REPORT_LEN]), None);
        assert_eq!(Report::decode(&[1u8; 3]), None);
        let mut bad_stage = Report::Started.encode();
        bad_stage[..4].copy_from_slice(&1u32.to_ne_bytes());
        bad_stage[4..8].copy_from_slice(&999u32.to_ne_bytes());
        assert_eq!(Report::decode(&bad_stage), None);
    }

    #[test]
    fn exit_records_round_trip() {
        for exit in [
            sys::Exit::Code(0),
            sys::Exit::Code(7),
            sys::Exit::Code(255),
            sys::Exit::Code(-1),
            sys::Exit::Code(i32::MIN),
            sys::Exit::Signal(libc::SIGKILL),
        ] {
            let mut out = [0u8; 32];
            let len = exit_record(exit, &mut out);
            let text = std::str::from_utf8(&out[..len]).unwrap();
            assert!(text.ends_with('\n'), "{text:?}");
            assert_eq!(parse_exit_record(text), Some(exit), "{text:?}");
        }
        assert_eq!(parse_exit_record("signal 9\n"), Some(sys::Exit::Signal(9)));
        assert_eq!(parse_exit_record("exit x"), None);
        assert_eq!(parse_exit_record("quit 1"), None);
        assert_eq!(parse_exit_record(""), None);
    }

    #[test]
    fn log_plans_name_the_live_file_and_its_rotations() {
        let plan = LogPlan::new(0, 3);
        assert_eq!(plan.max_size, 1, "a zero size would never fit a byte");
        let names: Vec<_> = plan.stdout.iter().map(|c| c.to_str().unwrap()).collect();
        assert_eq!(names, ["stdout", "stdout.1", "stdout.2"]);
        assert_eq!(
            LogPlan::new(10, 0).stderr.len(),
            1,
            "the live file at least"
        );
    }

    #[test]
    fn exec_plan_builds_null_terminated_arrays() {
        let plan = ExecPlan::new(
            &["sh".into(), "-c".into(), "echo hi".into()],
            &[("A".into(), "1".into()), ("PATH".into(), "/bin".into())],
            &["/bin/sh".into()],
        )
        .unwrap();
        assert_eq!(plan.argv.len(), 4);
        assert!(plan.argv[3].is_null());
        assert_eq!(c_array(&plan.argv), vec!["sh", "-c", "echo hi"]);
        assert_eq!(c_array(&plan.envp), vec!["A=1", "PATH=/bin"]);
        assert_eq!(plan.candidates[0].as_c_str(), c"/bin/sh");
        assert!(ExecPlan::new(&["a\0".into()], &[], &[]).is_err());
    }
}
