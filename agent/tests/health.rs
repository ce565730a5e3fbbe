//! Health checks run by the agent, against a fake master: HTTP, TCP and
//! command probes; liveness kills, readiness flips, startup gating,
//! timeouts; command probes inside a real container. Needs root (the
//! container test) and /bin/busybox; fails, never skips, without them.
//!
//! Probe intervals are 0.1-0.3 s so the tests stay fast; ports are picked
//! free at run time.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use corral_proto::pb::{
    self, Reason, TaskState, health_check::Kind, health_check::Probe, master_message::Message,
};
use support::{FakeMaster, TestAgent, eventually, kill, run_shell};

const FW: &str = "fw-1";
const AGENT_ID: &str = "agent-1";
const BUSYBOX: &str = "/bin/busybox";

fn require_busybox() {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "the health check tests need a static busybox at {BUSYBOX}: `apt-get install -y busybox-static`"
    );
}

fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the container health check test needs root (cgroups, namespaces): \
         run it as root, e.g. `sudo -E cargo test -p corral-agent --test health`"
    );
}

async fn registered_agent_with(
    tweak: impl FnOnce(&mut corral_agent::AgentConfig),
) -> (FakeMaster, TestAgent, support::Conn) {
    require_busybox();
    let mut master = FakeMaster::start().await;
    let agent = TestAgent::start_with(master.addr, tweak).await;
    let conn = master.accept(AGENT_ID).await;
    (master, agent, conn)
}

/// An agent running plain processes (`--isolation=none`).
async fn registered_agent() -> (FakeMaster, TestAgent, support::Conn) {
    registered_agent_with(|_| {}).await
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A check with short timings: 0.2 s interval, 2 s timeout, 3 failures.
fn check(kind: Kind, probe: Probe) -> pb::HealthCheck {
    pb::HealthCheck {
        kind: kind as i32,
        probe: Some(probe),
        interval_seconds: Some(0.2),
        timeout_seconds: Some(2.0),
        consecutive_failures: Some(3),
        ..Default::default()
    }
}

fn shell_probe(script: &str) -> Probe {
    Probe::Command(pb::CommandProbe {
        shell: true,
        value: script.to_string(),
        arguments: Vec::new(),
    })
}

/// `run_shell` with health checks on the task.
fn run_checked(task_id: &str, script: &str, checks: Vec<pb::HealthCheck>) -> Message {
    let mut msg = run_shell(FW, task_id, script);
    if let Message::RunTask(run) = &mut msg
        && let Some(task) = run.task.as_mut()
    {
        task.health_checks = checks;
        task.kill_grace_period_seconds = Some(5.0);
        // A container needs limits; a plain process ignores them.
        task.resources = corral_proto::Resources::parse("cpus:0.1;mem:32")
            .unwrap()
            .to_proto();
    }
    msg
}

async fn metric(agent: &TestAgent, line_prefix: &str) -> f64 {
    let (code, text) = agent.http_get("/metrics").await;
    assert_eq!(code, 200);
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_prefix} in:\n{text}"))
}

/// Live processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z'));
        if !zombie
            && String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(needle)
        {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn an_http_liveness_probe_that_passes_reports_the_task_healthy_on_every_later_update() {
    let (_master, agent, mut conn) = registered_agent().await;
    let port = free_port();
    let script = format!(
        "mkdir -p www && echo ok > www/health && \
         exec {BUSYBOX} httpd -f -p 127.0.0.1:{port} -h www"
    );
    let mut liveness = check(
        Kind::Liveness,
        Probe::Http(pb::HttpProbe {
            scheme: "http".into(),
            port: u32::from(port),
            path: "/health".into(),
        }),
    );
    liveness.delay_seconds = Some(0.1);
    conn.send(run_checked("web", &script, vec![liveness]));
    let running = conn.expect_and_ack(FW, "web", TaskState::TaskRunning).await;
    assert_eq!(running.healthy, None, "no verdict before the first probe");
    assert_eq!(running.ready, None, "no readiness check");
    let healthy = conn.expect_and_ack(FW, "web", TaskState::TaskRunning).await;
    assert_eq!(healthy.reason(), Reason::TaskHealthCheckStatusUpdated);
    assert_eq!(healthy.healthy, Some(true));
    assert_eq!(healthy.message, "liveness probe succeeded");

    conn.send(kill(FW, "web", None));
    let killing = conn.expect_and_ack(FW, "web", TaskState::TaskKilling).await;
    assert_eq!(killing.healthy, Some(true));
    let killed = conn.expect_and_ack(FW, "web", TaskState::TaskKilled).await;
    assert_eq!(
        killed.healthy,
        Some(true),
        "the final update carries it too"
    );
    let successes = metric(
        &agent,
        "corral_agent_health_checks_total{kind=\"liveness\",result=\"success\"}",
    )
    .await;
    assert!(successes >= 1.0, "{successes}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_failing_command_liveness_probe_kills_the_task_after_exactly_its_failure_threshold() {
    let (_master, agent, mut conn) = registered_agent().await;
    let probe = shell_probe("echo probe >> probes; echo boom >&2; exit 1");
    conn.send(run_checked(
        "sick",
        "exec sleep 1000",
        vec![check(Kind::Liveness, probe)],
    ));
    let running = conn
        .expect_and_ack(FW, "sick", TaskState::TaskRunning)
        .await;
    assert_eq!(running.healthy, None);
    let message = "liveness probe failed 3 times: command: exited with status 1: boom";
    let unhealthy = conn
        .expect_and_ack(FW, "sick", TaskState::TaskRunning)
        .await;
    assert_eq!(
        (
            unhealthy.reason(),
            unhealthy.healthy,
            unhealthy.message.as_str()
        ),
        (Reason::TaskHealthCheckStatusUpdated, Some(false), message)
    );
    let killing = conn
        .expect_and_ack(FW, "sick", TaskState::TaskKilling)
        .await;
    assert_eq!(
        (killing.reason(), killing.healthy, killing.message.as_str()),
        (Reason::TaskUnhealthy, Some(false), message)
    );
    let failed = conn.expect_and_ack(FW, "sick", TaskState::TaskFailed).await;
    assert_eq!(
        (failed.reason(), failed.healthy, failed.message.as_str()),
        (Reason::TaskUnhealthy, Some(false), message)
    );
    assert_eq!(failed.signal, Some(15), "killed with SIGTERM: {failed:?}");

    // The probe ran in the sandbox, three times, and no more once the
    // task was being killed (absence needs a window: four intervals).
    let probes = agent.sandbox(FW, "sick").join("probes");
    let count = || std::fs::read_to_string(&probes).unwrap().lines().count();
    assert_eq!(count(), 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(count(), 3, "probes ran after the kill");

    let failures = "corral_agent_health_checks_total{kind=\"liveness\",result=\"failure\"}";
    assert_eq!(metric(&agent, failures).await, 3.0);
    assert_eq!(
        metric(&agent, "corral_agent_tasks_unhealthy_killed_total").await,
        1.0
    );
    eventually("the unhealthy gauge to drop with the task", || async {
        (metric(&agent, "corral_agent_tasks_unhealthy ").await == 0.0).then_some(())
    })
    .await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_tcp_readiness_probe_turns_the_task_ready_once_its_port_opens() {
    let (_master, agent, mut conn) = registered_agent().await;
    let port = free_port();
    let script = format!("sleep 0.5; exec {BUSYBOX} httpd -f -p 127.0.0.1:{port} -h .");
    let mut readiness = check(
        Kind::Readiness,
        Probe::Tcp(pb::TcpProbe {
            port: u32::from(port),
        }),
    );
    readiness.interval_seconds = Some(0.1);
    readiness.consecutive_successes = Some(2);
    conn.send(run_checked("slow", &script, vec![readiness]));
    let running = conn
        .expect_and_ack(FW, "slow", TaskState::TaskRunning)
        .await;
    assert_eq!(
        running.ready,
        Some(false),
        "not ready until the probe says so"
    );
    assert_eq!(running.healthy, None, "no liveness check");
    let ready = conn
        .expect_and_ack(FW, "slow", TaskState::TaskRunning)
        .await;
    assert_eq!(
        (ready.reason(), ready.ready, ready.message.as_str()),
        (
            Reason::TaskHealthCheckStatusUpdated,
            Some(true),
            "readiness probe succeeded 2 times"
        )
    );
    // Failures before the port opened did not kill: readiness never does.
    let failures = "corral_agent_health_checks_total{kind=\"readiness\",result=\"failure\"}";
    assert!(metric(&agent, failures).await >= 1.0);
    conn.send(kill(FW, "slow", None));
    let killing = conn
        .expect_and_ack(FW, "slow", TaskState::TaskKilling)
        .await;
    assert_eq!(killing.ready, Some(true));
    conn.expect_and_ack(FW, "slow", TaskState::TaskKilled).await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_startup_probe_holds_back_liveness_until_it_passes() {
    let (_master, agent, mut conn) = registered_agent().await;
    let mut startup = check(Kind::Startup, shell_probe("test -f started"));
    startup.consecutive_failures = Some(50);
    // Would kill on its first failure if it ran before startup passed.
    let mut liveness = check(Kind::Liveness, shell_probe("test -f started"));
    liveness.consecutive_failures = Some(1);
    conn.send(run_checked(
        "slowstart",
        "sleep 1; touch started; exec sleep 1000",
        vec![liveness, startup],
    ));
    let running = conn
        .expect_and_ack(FW, "slowstart", TaskState::TaskRunning)
        .await;
    assert_eq!(running.healthy, None);
    let healthy = conn
        .expect_and_ack(FW, "slowstart", TaskState::TaskRunning)
        .await;
    assert_eq!(
        (healthy.reason(), healthy.healthy),
        (Reason::TaskHealthCheckStatusUpdated, Some(true))
    );
    let startup_failures = "corral_agent_health_checks_total{kind=\"startup\",result=\"failure\"}";
    assert!(metric(&agent, startup_failures).await >= 1.0);
    let liveness_failures =
        "corral_agent_health_checks_total{kind=\"liveness\",result=\"failure\"}";
    assert_eq!(metric(&agent, liveness_failures).await, 0.0);
    conn.send(kill(FW, "slowstart", None));
    conn.expect_and_ack(FW, "slowstart", TaskState::TaskKilling)
        .await;
    conn.expect_and_ack(FW, "slowstart", TaskState::TaskKilled)
        .await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn a_hanging_probe_is_killed_at_its_timeout_and_counts_as_a_failure() {
    let (_master, agent, mut conn) = registered_agent().await;
    // The odd duration marks the probe's process.
    let mut liveness = check(Kind::Liveness, shell_probe("sleep 1003.75; true"));
    liveness.timeout_seconds = Some(0.3);
    liveness.consecutive_failures = Some(2);
    conn.send(run_checked("hang", "exec sleep 1000", vec![liveness]));
    conn.expect_and_ack(FW, "hang", TaskState::TaskRunning)
        .await;
    let message = "liveness probe failed 2 times: command: timed out after 0.3s";
    let unhealthy = conn
        .expect_and_ack(FW, "hang", TaskState::TaskRunning)
        .await;
    assert_eq!(unhealthy.message, message);
    conn.expect_and_ack(FW, "hang", TaskState::TaskKilling)
        .await;
    let failed = conn.expect_and_ack(FW, "hang", TaskState::TaskFailed).await;
    assert_eq!(
        (failed.reason(), failed.message.as_str()),
        (Reason::TaskUnhealthy, message)
    );
    let timeouts = "corral_agent_health_checks_total{kind=\"liveness\",result=\"timeout\"}";
    assert_eq!(metric(&agent, timeouts).await, 2.0);
    eventually("the timed-out probes' processes to be gone", || async {
        processes_with("sleep 1003.75").is_empty().then_some(())
    })
    .await;
    agent.stop().await.unwrap();
}

/// The `/proc/<pid>/ns/<name>` link of a process.
fn namespace(pid: u32, name: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{name}"))
        .unwrap()
        .display()
        .to_string()
}

/// Directories left under the cgroup root in any hierarchy.
fn cgroup_leftovers(root: &str) -> Vec<String> {
    let mut left = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let dir = h.path().join(root);
        if dir.exists() {
            left.push(dir.display().to_string());
        }
    }
    left
}

/// Removes the cgroup root of a test that failed half-way (the agent
/// removes it when it stops cleanly).
struct CgroupRoot(String);

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        for dir in cgroup_leftovers(&self.0) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// An agent running containers under its own cgroup root, which the
/// guard removes if the test fails half-way.
async fn container_agent() -> (FakeMaster, TestAgent, support::Conn, CgroupRoot) {
    require_root();
    let root = format!(
        "corral-health-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let cleanup = CgroupRoot(root.clone());
    let (master, agent, conn) = registered_agent_with(move |c| {
        c.isolation = corral_agent::Isolation::Container;
        c.cgroup_root = root;
    })
    .await;
    (master, agent, conn, cleanup)
}

#[tokio::test]
async fn a_command_probe_runs_inside_the_task_container_with_its_namespaces_and_cgroups() {
    let (_master, agent, mut conn, cgroup) = container_agent().await;
    let root = cgroup.0.clone();
    // /dev/shm is private to the container's mount namespace; the
    // hostname is the task id; CORRAL_SANDBOX is the task's variable.
    let marker = format!("/dev/shm/corral-probe-{}", uuid::Uuid::new_v4().simple());
    let probe = format!(
        "test -f {marker} && test \"$(hostname)\" = probe-ns && \
         echo $$ > \"$CORRAL_SANDBOX/probe.pid\" && exec sleep 2"
    );
    let mut liveness = check(Kind::Liveness, shell_probe(&probe));
    liveness.timeout_seconds = Some(10.0);
    liveness.interval_seconds = Some(30.0);
    liveness.consecutive_failures = Some(1);
    conn.send(run_checked(
        "probe-ns",
        &format!("echo hi > {marker}; exec sleep 1000"),
        vec![liveness],
    ));
    conn.expect_and_ack(FW, "probe-ns", TaskState::TaskRunning)
        .await;
    let init = agent.task_pid("probe-ns").await;
    let pid_file = agent.sandbox(FW, "probe-ns").join("probe.pid");
    // Written by the probe, which then sleeps 2 s: it is alive meanwhile.
    let probe_pid: u32 = eventually("the probe to write its pid", || async {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await;
    for ns in ["mnt", "uts", "ipc"] {
        assert_eq!(
            namespace(probe_pid, ns),
            namespace(init, ns),
            "the probe is in the container's {ns} namespace"
        );
        assert_ne!(namespace(probe_pid, ns), namespace(std::process::id(), ns));
    }
    let cgroups = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(
        cgroups(probe_pid),
        cgroups(init),
        "the probe is in the container's cgroups"
    );
    assert!(cgroups(probe_pid).contains(&root), "{}", cgroups(probe_pid));
    // The container's capability set, not the agent's.
    let status = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let caps = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("Cap") || l.starts_with("NoNewPrivs"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(caps(&status(probe_pid)), caps(&status(init)));

    let healthy = conn
        .expect_and_ack(FW, "probe-ns", TaskState::TaskRunning)
        .await;
    assert_eq!(healthy.healthy, Some(true), "{healthy:?}");
    assert!(
        !Path::new(&marker).exists(),
        "the marker exists only in the container's /dev/shm"
    );
    conn.send(kill(FW, "probe-ns", Some(0.0)));
    conn.expect_and_ack(FW, "probe-ns", TaskState::TaskKilling)
        .await;
    let killed = conn
        .expect_and_ack(FW, "probe-ns", TaskState::TaskKilled)
        .await;
    assert_eq!(killed.healthy, Some(true));
    agent.stop().await.unwrap();
    assert!(
        cgroup_leftovers(&root).is_empty(),
        "{:?}",
        cgroup_leftovers(&root)
    );
    assert!(
        processes_with("sleep 1000").iter().all(|p| *p != init),
        "the container's processes are gone"
    );
}

/// The container's teardown kills a probe still running in its cgroup;
/// that failure says nothing about the task, which exited on its own.
#[tokio::test]
async fn a_probe_killed_by_its_containers_end_does_not_make_a_finished_task_unhealthy() {
    let (_master, agent, mut conn, cgroup) = container_agent().await;
    let mut liveness = check(Kind::Liveness, shell_probe("exec sleep 30"));
    liveness.timeout_seconds = Some(60.0);
    liveness.consecutive_failures = Some(1);
    conn.send(run_checked("brief", "sleep 0.5; exit 0", vec![liveness]));
    conn.expect_and_ack(FW, "brief", TaskState::TaskRunning)
        .await;
    let finished = conn
        .expect_and_ack(FW, "brief", TaskState::TaskFinished)
        .await;
    assert_eq!(
        (finished.reason(), finished.exit_code, finished.healthy),
        (Reason::Unspecified, Some(0), None),
        "{finished:?}"
    );
    agent.stop().await.unwrap();
    assert!(cgroup_leftovers(&cgroup.0).is_empty());
}
