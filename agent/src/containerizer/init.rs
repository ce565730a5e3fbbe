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

/// The child's fds (all >= 3, checked by the caller).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildFds {
    pub(crate) stdout: RawFd,
    pub(crate) stderr: RawFd,
    pub(crate) sock: RawFd,
    /// A network namespace to join, or -1 for the host's.
    pub(crate) netns: RawFd,
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
    let mut keep = [fds.stdout, fds.stderr, sock, fds.netns];
    keep.sort_unstable();
    // An absent netns (-1) sorts first and must not count.
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
    report(sock, Report::Started);
    supervise(pid, sock)
}

/// Forwards signals to the command and reaps zombies until the command
/// has exited; then reports its status and exits.
fn supervise(command: libc::pid_t, sock: RawFd) -> ! {
    loop {
        let Ok(sig) = sys::wait_signal() else {
            continue;
        };
        if sig == libc::SIGCHLD {
            while let Ok(Some((pid, status))) = sys::waitpid_nohang(-1) {
                if pid == command {
                    report(sock, Report::Exited { status });
                    sys::exit(0);
                }
            }
        } else if FORWARDED.contains(&sig) {
            let _ = sys::kill(command, sig);
        }
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
        assert_eq!(Report::decode(&[0u8; REPORT_LEN]), None);
        assert_eq!(Report::decode(&[1u8; 3]), None);
        let mut bad_stage = Report::Started.encode();
        bad_stage[..4].copy_from_slice(&1u32.to_ne_bytes());
        bad_stage[4..8].copy_from_slice(&999u32.to_ne_bytes());
        assert_eq!(Report::decode(&bad_stage), None);
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
