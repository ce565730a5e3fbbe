//! Containers outlive the agent and are re-adopted by a new one: the
//! "agent" here is a child process (this test binary, re-executed) that
//! launches a container and is then SIGKILLed; the test process plays the
//! restarted agent with a fresh containerizer on the same cgroup root.
//! Needs root, cgroups and /bin/busybox; fails (never skips) without them.
//!
//! Every test ends with `Env::finish` (no process, cgroup or mount left);
//! `Env`'s `Drop` and `AgentChild`'s `Drop` clean up when a test fails.

#![allow(clippy::unwrap_used)]

mod containerizer_support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use containerizer_support::{Env, alive, eventually, wait};
use corral_agent::containerizer::{
    ContainerCheckpoint, ContainerSpec, Containerizer, IsolationConfig, Output, Recovered,
};
use corral_agent::logs::LogConfig;

/// Set in the re-executed child: the JSON of a [`ChildJob`].
const CHILD_ENV: &str = "CORRAL_TEST_CHILD_AGENT";
/// The child's entry point (a `#[test]` that does nothing unless
/// [`CHILD_ENV`] is set).
const CHILD_ENTRY: &str = "child_agent_entry_point_runs_only_when_re_executed";
/// How long the child waits to be killed before it gives up (and its
/// containerizer cleans up after it).
const CHILD_LIFETIME: Duration = Duration::from_secs(120);

/// What the child "agent" launches.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChildJob {
    cgroup_root: String,
    id: String,
    rootfs: PathBuf,
    /// Fresh overlay dirs for the container's root.
    upper: PathBuf,
    work: PathBuf,
    target: PathBuf,
    sandbox: PathBuf,
    state_dir: PathBuf,
    script: String,
    log_max_size: u64,
    log_max_files: u32,
    mem_bytes: u64,
    /// Where the child writes the container's checkpoint (temp + rename).
    checkpoint: PathBuf,
}

/// Runs only in the re-executed child: launch, persist the checkpoint,
/// wait to be killed.
#[test]
fn child_agent_entry_point_runs_only_when_re_executed() {
    let Ok(job) = std::env::var(CHILD_ENV) else {
        return;
    };
    let job: ChildJob = serde_json::from_str(&job).unwrap();
    let cz = Containerizer::new(IsolationConfig {
        cgroup_root: job.cgroup_root.clone(),
        ..IsolationConfig::default()
    })
    .unwrap();
    let spec = ContainerSpec {
        id: job.id.clone(),
        argv: vec!["/bin/sh".into(), "-c".into(), job.script.clone()],
        env: vec![("PATH".into(), "/bin:/sbin:/usr/bin:/usr/sbin".into())],
        cwd: "/".into(),
        rootfs: corral_agent::containerizer::RootFs::Overlay {
            lower: vec![job.rootfs.clone()],
            upper: job.upper.clone(),
            work: job.work.clone(),
            target: job.target.clone(),
        },
        hostname: job.id.clone(),
        mounts: vec![],
        user: None,
        cpus_milli: 500,
        mem_bytes: job.mem_bytes,
        output: Output::Sandbox {
            dir: job.sandbox.clone(),
            logs: LogConfig {
                max_size: job.log_max_size,
                max_files: job.log_max_files,
            },
        },
        state_dir: Some(job.state_dir.clone()),
        netns: None,
    };
    let container = cz.launch(&spec).unwrap();
    let tmp = job.checkpoint.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(container.checkpoint()).unwrap()).unwrap();
    std::fs::rename(&tmp, &job.checkpoint).unwrap();
    // Killed (SIGKILL) long before this ends; if not, the container is
    // torn down with the handle.
    std::thread::sleep(CHILD_LIFETIME);
}

/// The child "agent" process; SIGKILLed on drop if still running.
struct AgentChild {
    child: Child,
}

impl AgentChild {
    /// Re-executes this test binary as an agent that launches `job`, and
    /// waits (bounded) for the checkpoint it persists.
    async fn start(job: &ChildJob) -> (AgentChild, ContainerCheckpoint) {
        let exe = std::env::current_exe().unwrap();
        let child = Command::new(exe)
            .args(["--exact", CHILD_ENTRY, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, serde_json::to_string(job).unwrap())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut agent = AgentChild { child };
        let path = job.checkpoint.clone();
        let checkpoint = eventually("the child agent's checkpoint", || {
            let exited = agent.child.try_wait().unwrap();
            assert!(exited.is_none(), "the child agent exited: {exited:?}");
            let text = std::fs::read(&path).ok();
            async move { text.map(|t| serde_json::from_slice(&t).unwrap()) }
        })
        .await;
        (agent, checkpoint)
    }

    /// `kill -9` of the agent, reaped.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn job(env: &mut Env, id: &str, script: &str) -> ChildJob {
    let base = env.path(id);
    let [upper, work, target, sandbox, state_dir] =
        ["upper", "work", "merged", "sandbox", "state"].map(|d| base.join(d));
    for d in [&upper, &work, &target, &sandbox, &state_dir] {
        std::fs::create_dir_all(d).unwrap();
    }
    ChildJob {
        cgroup_root: env.cgroup_root.clone(),
        id: id.to_string(),
        rootfs: env.rootfs.clone(),
        upper,
        work,
        target,
        sandbox,
        state_dir,
        script: script.to_string(),
        log_max_size: 1 << 20,
        log_max_files: 5,
        mem_bytes: 48 << 20,
        checkpoint: base.join("checkpoint.json"),
    }
}

/// A stream's whole output, oldest rotation first: `name.N-1` … `name.1`,
/// then `name`.
fn whole_log(dir: &Path, name: &str, max_files: u32) -> String {
    let mut out = String::new();
    for n in (1..max_files).rev() {
        out += &std::fs::read_to_string(dir.join(format!("{name}.{n}"))).unwrap_or_default();
    }
    out + &std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// The memory cgroup dir of a checkpoint (v1: the one with
/// `memory.limit_in_bytes`; v2: `memory.max`).
fn memory_limit(checkpoint: &ContainerCheckpoint) -> Option<u64> {
    checkpoint.cgroups.iter().find_map(|dir| {
        ["memory.limit_in_bytes", "memory.max"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .and_then(|s| s.trim().parse().ok())
    })
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[tokio::test]
async fn a_container_outlives_a_killed_agent_and_is_recovered_with_its_whole_output_and_exit_code()
{
    let mut env = Env::new("outlive");
    // A line every 100 ms for ~2 s, then exit 7. Small log files, so the
    // init also rotates them while no agent runs.
    let mut job = job(
        &mut env,
        "ticker",
        "i=0; while [ $i -lt 20 ]; do echo line-$i; i=$((i+1)); sleep 0.1; done; exit 7",
    );
    job.log_max_size = 40;
    job.log_max_files = 20;
    let (mut agent, checkpoint) = AgentChild::start(&job).await;
    let pid = checkpoint.pid;
    assert!(checkpoint.start_time > 0, "{checkpoint:?}");
    assert_eq!(checkpoint.sandbox.as_deref(), Some(job.sandbox.as_path()));

    agent.kill();

    // The container runs on: same init, same start time, in its cgroup,
    // with its memory limit.
    assert!(alive(pid), "the init died with the agent");
    assert_eq!(start_time(pid), Some(checkpoint.start_time));
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup.contains(&format!("/{}/ticker", env.cgroup_root)),
        "{cgroup}"
    );
    assert_eq!(memory_limit(&checkpoint), Some(48 << 20));
    // Its output is still captured: it grows with no agent.
    let before = whole_log(&job.sandbox, "stdout", job.log_max_files).len();
    eventually("stdout to grow without an agent", || {
        let now = whole_log(&job.sandbox, "stdout", job.log_max_files).len();
        async move { (now > before).then_some(()) }
    })
    .await;
    assert!(
        alive(pid),
        "ended too early to show it runs without an agent"
    );

    // The restarted agent: a fresh containerizer on the same cgroup root.
    let Recovered::Running(container) = env.cz.recover(&checkpoint).unwrap() else {
        panic!("the running container was not re-adopted");
    };
    assert_eq!(container.pid, pid);
    assert_eq!(container.usage().unwrap().mem_limit_bytes, 48 << 20);
    let exit = wait(&container).await;
    assert_eq!(exit.code, Some(7), "{exit:?}");
    assert!(!exit.oom_killed);
    let expected: String = (0..20).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(
        whole_log(&job.sandbox, "stdout", job.log_max_files),
        expected
    );
    assert!(
        job.sandbox.join("stdout.1").exists(),
        "the init rotated the log"
    );
    assert_eq!(
        std::fs::read_to_string(job.state_dir.join(".corral-exit")).unwrap(),
        "exit 7\n"
    );
    container.destroy().unwrap();
    env.finish();
}

#[tokio::test]
async fn a_container_that_ended_while_no_agent_ran_is_recovered_with_its_recorded_status() {
    let mut env = Env::new("ended");
    let job = job(
        &mut env,
        "short",
        "echo out; echo err >&2; sleep 0.3; exit 3",
    );
    let (mut agent, checkpoint) = AgentChild::start(&job).await;
    agent.kill();
    eventually("the container to end with no agent", || {
        let done = !alive(checkpoint.pid) && job.state_dir.join(".corral-exit").exists();
        async move { done.then_some(()) }
    })
    .await;

    let started = Instant::now();
    let Recovered::Exited { container, exit } = env.cz.recover(&checkpoint).unwrap() else {
        panic!("the ended container's status was not recovered");
    };
    assert_eq!(exit.code, Some(3), "{exit:?}");
    assert_eq!(wait(&container).await, exit, "wait returns the record");
    assert!(started.elapsed() < Duration::from_secs(1), "at once");
    assert_eq!(
        std::fs::read_to_string(job.sandbox.join("stdout")).unwrap(),
        "out\n"
    );
    assert_eq!(
        std::fs::read_to_string(job.sandbox.join("stderr")).unwrap(),
        "err\n"
    );
    container.destroy().unwrap();
    env.finish();
}

#[tokio::test]
async fn a_checkpoint_whose_start_time_differs_is_gone_and_the_stranger_is_not_adopted() {
    let mut env = Env::new("pidreuse");
    let spec = env.spec("real", &["sleep", "1000"]);
    let real = env.cz.launch(&spec).unwrap();
    let mut stranger = real.checkpoint().clone();
    stranger.start_time += 1;
    match env.cz.recover(&stranger).unwrap() {
        Recovered::Gone { reason } => assert!(reason.contains("another process"), "{reason}"),
        other => panic!("a stranger was adopted: {other:?}"),
    }
    assert!(alive(real.pid), "recovery touched the process it refused");

    // Another boot: nothing survives a reboot, whatever runs at that pid.
    let mut rebooted = real.checkpoint().clone();
    rebooted.boot_id = "not-this-boot".into();
    assert!(matches!(
        env.cz.recover(&rebooted).unwrap(),
        Recovered::Gone { .. }
    ));
    // Another cgroup root is a checkpoint this containerizer cannot use.
    let mut elsewhere = real.checkpoint().clone();
    elsewhere.cgroup_root = "someone-else".into();
    let err = env.cz.recover(&elsewhere).unwrap_err();
    assert!(err.to_string().contains("checkpoint.cgroup_root"), "{err}");

    // An init that ended without a record (killed) is gone too.
    let checkpoint = real.checkpoint().clone();
    real.kill().unwrap();
    let _ = wait(&real).await;
    eventually("the killed init to be gone", || {
        let gone = !alive(checkpoint.pid);
        async move { gone.then_some(()) }
    })
    .await;
    match env.cz.recover(&checkpoint).unwrap() {
        Recovered::Gone { reason } => assert!(reason.contains("without recording"), "{reason}"),
        other => panic!("expected gone: {other:?}"),
    }
    real.destroy().unwrap();
    env.finish();
}

#[tokio::test]
async fn orphans_are_the_containers_no_checkpoint_names() {
    let mut env = Env::new("orphanset");
    let mut running = Vec::new();
    for id in ["keep-a", "orphan-b", "orphan-c"] {
        let spec = env.spec(id, &["sleep", "1000"]);
        running.push(env.cz.launch(&spec).unwrap());
    }
    // As if the agent had died: the handles are gone, the containers not.
    let pids: Vec<u32> = running.iter().map(|c| c.pid).collect();
    running.into_iter().for_each(std::mem::forget);
    let known: HashSet<String> = ["keep-a".to_string(), "unknown".to_string()].into();
    let orphans = env.cz.orphans(&known).unwrap();
    assert_eq!(orphans, ["orphan-b", "orphan-c"]);
    for id in &orphans {
        env.cz.destroy(id).unwrap();
    }
    assert_eq!(env.cz.list().unwrap(), ["keep-a"]);
    assert!(alive(pids[0]), "a known container was touched");
    env.cz.destroy("keep-a").unwrap();
    env.finish();
}

/// In-process too (the agent alive throughout): output in the sandbox,
/// rotated, and the record written, with the fast path's report.
#[tokio::test]
async fn the_init_writes_the_sandbox_logs_and_the_exit_record() {
    let mut env = Env::new("sandboxlogs");
    let sandbox = env.path("sb");
    let state = env.path("st");
    std::fs::create_dir_all(&sandbox).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    // A symlink where the live file goes must not be followed.
    std::os::unix::fs::symlink(env.path("victim"), sandbox.join("stderr")).unwrap();
    let mut spec = env.spec(
        "logs",
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 100 ]; do echo 0123456789; i=$((i+1)); done; kill -TERM $$",
        ],
    );
    spec.output = Output::Sandbox {
        dir: sandbox.clone(),
        logs: LogConfig {
            max_size: 100,
            max_files: 3,
        },
    };
    spec.state_dir = Some(state.clone());
    let err = env.cz.launch(&spec).unwrap_err();
    assert!(err.to_string().contains("log files"), "{err}");
    assert!(!env.path("victim").exists(), "followed a symlink");
    std::fs::remove_file(sandbox.join("stderr")).unwrap();
    // Nor may a FIFO there (no reader) hang the init.
    nix::unistd::mkfifo(&sandbox.join("stderr"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut spec = env.spec("logs", &["true"]);
    spec.output = Output::Sandbox {
        dir: sandbox.clone(),
        logs: LogConfig::default(),
    };
    let err = env.cz.launch(&spec).unwrap_err();
    assert!(err.to_string().contains("log files"), "{err}");
    std::fs::remove_file(sandbox.join("stderr")).unwrap();

    let mut spec = env.spec(
        "logs",
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 100 ]; do echo 0123456789; i=$((i+1)); done; kill -TERM $$",
        ],
    );
    spec.output = Output::Sandbox {
        dir: sandbox.clone(),
        logs: LogConfig {
            max_size: 100,
            max_files: 3,
        },
    };
    spec.state_dir = Some(state.clone());
    let c = env.cz.launch(&spec).unwrap();
    let exit = wait(&c).await;
    assert_eq!(exit.signal, Some(libc::SIGTERM), "{exit:?}");
    assert_eq!(
        std::fs::read_to_string(state.join(".corral-exit")).unwrap(),
        format!("signal {}\n", libc::SIGTERM)
    );
    let line = "0123456789\n";
    // 1100 bytes in files of 100: the newest 300 bytes are kept.
    assert_eq!(whole_log(&sandbox, "stdout", 3), &line.repeat(100)[800..]);
    assert!(!sandbox.join("stdout.3").exists());
    assert_eq!(std::fs::read_to_string(sandbox.join("stderr")).unwrap(), "");
    c.destroy().unwrap();
    env.finish();
}
