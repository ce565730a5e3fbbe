//! `kill -9` of a real agent process, ten times in a row, while 20
//! container tasks run: the containers outlive every crash, each restarted
//! agent re-adopts them (same pids, memory limits still set), re-registers
//! with the same id, and the framework sees no FAILED or LOST update; a
//! kill from the scheduler still works afterwards. A pod is re-adopted the
//! same way, with its network namespace and volume.
//!
//! The agent is this test binary re-executed ([`corral_tests::process`]);
//! the master and the framework run in the test process. Needs root and
//! cgroups; fails (never skips) without them.

use std::collections::BTreeMap;
use std::time::Duration;

use corral_proto::pb::{self, TaskState};
use corral_tests::process::{AgentProcess, AgentSpec, child_main};
use corral_tests::{
    Cluster, WAIT, empty_dir, http_get, metric_value, pod_task, shell_task, wait_for,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const CHILD_ENTRY: &str = "child_agent_entry_point_runs_only_when_re_executed";
const TASKS: usize = 20;
const CRASHES: usize = 10;
const TASK_MEM_MIB: f64 = 16.0;

/// Runs only in the re-executed child.
#[test]
fn child_agent_entry_point_runs_only_when_re_executed() {
    child_main();
}

/// A task's container as the agent checkpointed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Container {
    id: String,
    pid: u32,
}

fn checkpointed_containers(agent: &AgentProcess) -> BTreeMap<String, Container> {
    let contents = corral_agent::read_checkpoint(agent.work_dir()).expect("the agent's checkpoint");
    contents
        .tasks
        .into_iter()
        .filter_map(|t| {
            let c = t.container?;
            Some((
                t.task?.task_id,
                Container {
                    id: c.container_id,
                    pid: c.pid,
                },
            ))
        })
        .collect()
}

/// Running (a zombie is not: a killed container's init that was
/// reparented away from the agent waits for its new parent to reap it).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command, which is in parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// The container's memory limit, from its cgroup (v1 here, v2 elsewhere).
fn memory_limit(cgroup_root: &str, container_id: &str) -> u64 {
    let v1 = format!("/sys/fs/cgroup/memory/{cgroup_root}/{container_id}/memory.limit_in_bytes");
    let v2 = format!("/sys/fs/cgroup/{cgroup_root}/{container_id}/memory.max");
    let text = std::fs::read_to_string(&v1)
        .or_else(|_| std::fs::read_to_string(&v2))
        .unwrap_or_else(|e| panic!("no memory limit for {container_id} ({v1}, {v2}): {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_ten_times_keeps_its_tasks_running_on_the_same_pids() {
    let cluster = Cluster::start(0).await;
    let spec = AgentSpec::new(&cluster, "cpus:4;mem:4096;disk:1024;ports:[31000-31099]");
    let mut agent = AgentProcess::spawn(CHILD_ENTRY, &spec);
    let mut fw = cluster.framework("crash").await;
    let offer = fw.wait_offers().await.remove(0);
    let tasks = (0..TASKS)
        .map(|i| shell_task(&format!("t{i}"), "exec sleep 600", 0.1, TASK_MEM_MIB))
        .collect();
    fw.launch(&offer, tasks).await;
    for i in 0..TASKS {
        fw.wait_update(&format!("t{i}"), TaskState::TaskRunning)
            .await;
    }
    let before = checkpointed_containers(&agent);
    assert_eq!(before.len(), TASKS, "{before:?}");
    let limit = (TASK_MEM_MIB as u64) << 20;
    for c in before.values() {
        assert!(!c.id.is_empty() && alive(c.pid), "{c:?}");
        assert_eq!(memory_limit(&spec.cgroup_root, &c.id), limit);
    }
    let agent_id = offer.agent_id.clone();

    for crash in 1..=CRASHES {
        agent.kill9();
        for c in before.values() {
            assert!(alive(c.pid), "crash {crash}: {c:?} died with the agent");
        }
        agent = AgentProcess::spawn(CHILD_ENTRY, &spec);
        // Back: all tasks recovered and re-registered with the master.
        wait_for(
            &format!("the agent to recover after crash {crash}"),
            WAIT,
            || async {
                let text = agent.metrics().await?;
                let recovered = metric_value(&text, "corral_agent_tasks_recovered_total")?;
                let registered = metric_value(&text, "corral_agent_master_connections_total")?;
                let running = metric_value(&text, r#"corral_agent_tasks{state="TASK_RUNNING"}"#)?;
                (recovered == TASKS as f64 && registered >= 1.0 && running == TASKS as f64)
                    .then_some(())
            },
        )
        .await;
        assert_eq!(
            checkpointed_containers(&agent),
            before,
            "crash {crash}: the same containers, pids and all"
        );
        for c in before.values() {
            assert!(alive(c.pid), "crash {crash}: {c:?}");
            assert_eq!(memory_limit(&spec.cgroup_root, &c.id), limit);
        }
        let state = cluster.state().await;
        let ids: Vec<_> = state.agents.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(
            ids,
            [agent_id.as_str()],
            "crash {crash}: one agent, the same id"
        );
    }

    // Whatever was in flight has arrived; none of it is a failure.
    fw.pump(Duration::from_millis(500)).await;
    let bad: Vec<_> = fw
        .updates
        .iter()
        .filter(|u| u.state() != TaskState::TaskRunning)
        .map(|u| format!("{} {:?} {}", u.task_id, u.state(), u.message))
        .collect();
    assert!(bad.is_empty(), "updates other than RUNNING: {bad:?}");

    fw.kill("t0").await.expect("kill");
    let killed = fw.wait_terminal("t0").await;
    assert_eq!(killed.state(), TaskState::TaskKilled, "{killed:?}");
    wait_for("t0's container to be gone", WAIT, || async {
        (!alive(before["t0"].pid)).then_some(())
    })
    .await;
    tokio::task::block_in_place(|| agent.stop());
    for c in before.values() {
        assert!(!alive(c.pid), "{c:?} outlived the agent's clean stop");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_adopted_tasks_max_completion_time_counts_from_its_start() {
    const MAX: Duration = Duration::from_secs(5);
    const BEFORE_CRASH: Duration = Duration::from_millis(2500);
    let cluster = Cluster::start(0).await;
    let spec = AgentSpec::new(&cluster, "cpus:2;mem:2048;disk:1024");
    let mut agent = AgentProcess::spawn(CHILD_ENTRY, &spec);
    let mut fw = cluster.framework("deadline").await;
    let offer = fw.wait_offers().await.remove(0);
    let mut task = shell_task("bounded", "exec sleep 600", 0.1, TASK_MEM_MIB);
    task.max_completion_time_seconds = Some(MAX.as_secs_f64());
    fw.launch(&offer, vec![task]).await;
    fw.wait_update("bounded", TaskState::TaskRunning).await;
    let started = std::time::Instant::now();
    // The scenario is the time the task has run when the agent dies.
    tokio::time::sleep(BEFORE_CRASH).await;
    agent.kill9();
    agent = AgentProcess::spawn(CHILD_ENTRY, &spec);
    let end = fw.wait_terminal("bounded").await;
    let after = started.elapsed();
    assert_eq!(end.state(), TaskState::TaskFailed, "{end:?}");
    assert_eq!(
        end.reason(),
        corral_proto::pb::Reason::MaxCompletionTimeReached,
        "{end:?}"
    );
    // From the restart it would be BEFORE_CRASH + MAX = 7.5 s.
    assert!(
        after < MAX + Duration::from_millis(1500),
        "ended {after:?} after it started running: the deadline restarted with the agent"
    );
    tokio::task::block_in_place(|| agent.stop());
    cluster.shutdown().await;
}

/// The pod's web container's `/note`, from the host.
async fn pod_note(ip: &str) -> Option<String> {
    Some(http_get(ip, 8080, "/note").await?.trim().to_string())
}

/// A pod survives `kill -9` of its agent: its containers, network
/// namespace and volume stay; the restarted agent re-adopts them into the
/// recorded pod (same pids, same IP, still serving), restarts a container
/// by the pod's policy in the same network and volume, and removes the
/// pod's network once the pod is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_is_re_adopted_with_its_network_and_volume_after_an_agent_crash() {
    let cluster = Cluster::start(0).await;
    let spec = AgentSpec::new(&cluster, "cpus:2;mem:1024;disk:1024;ports:[31000-31099]");
    let mut agent = AgentProcess::spawn(CHILD_ENTRY, &spec);
    let mut fw = cluster.framework("pod-crash").await;
    let offer = fw.wait_offers().await.remove(0);
    let group = pb::TaskGroupInfo {
        tasks: vec![
            pod_task("web", "exec busybox httpd -f -p 8080 -h /data"),
            pod_task("writer", "echo before > /data/note; exec sleep 600"),
        ],
        volumes: vec![empty_dir("shared")],
        restart_policy: pb::PodRestartPolicy::Always as i32,
    };
    fw.accept_group(vec![offer.id.clone()], &offer.agent_id, group)
        .await
        .expect("accept");
    let web = fw.wait_update("web", TaskState::TaskRunning).await;
    fw.wait_update("writer", TaskState::TaskRunning).await;
    let ip = web.pod.expect("the pod's status").ip;
    let served = wait_for("the pod serving", WAIT, || pod_note(&ip)).await;
    assert_eq!(served, "before");
    let before = checkpointed_containers(&agent);
    assert_eq!(before.len(), 2, "{before:?}");

    agent.kill9();
    for c in before.values() {
        assert!(alive(c.pid), "{c:?} died with the agent");
    }
    assert_eq!(
        pod_note(&ip).await.as_deref(),
        Some("before"),
        "the pod's network outlives the agent"
    );
    agent = AgentProcess::spawn(CHILD_ENTRY, &spec);
    wait_for("the agent to re-adopt the pod", WAIT, || async {
        let text = agent.metrics().await?;
        let recovered = metric_value(&text, "corral_agent_tasks_recovered_total")?;
        let registered = metric_value(&text, "corral_agent_master_connections_total")?;
        let running = metric_value(&text, r#"corral_agent_tasks{state="TASK_RUNNING"}"#)?;
        (recovered == 2.0 && registered >= 1.0 && running == 2.0).then_some(())
    })
    .await;
    assert_eq!(
        checkpointed_containers(&agent),
        before,
        "the same containers"
    );
    assert_eq!(pod_note(&ip).await.as_deref(), Some("before"));
    let recorded = corral_agent::read_checkpoint(agent.work_dir()).expect("checkpoint");
    assert_eq!(recorded.pods.len(), 1, "{:?}", recorded.pods);
    assert_eq!(recorded.pods[0].ip, ip);

    // Its policy still applies: the web container, killed, starts again in
    // the same network namespace with the same volume.
    let web_pid = before["web"].pid;
    kill(Pid::from_raw(web_pid as i32), Signal::SIGKILL).expect("kill the web container");
    fw.until("web restarted", |f| {
        f.updates
            .iter()
            .find(|u| u.task_id == "web" && u.restart_count >= 1)
            .cloned()
    })
    .await;
    let again = wait_for("the restarted web container serving", WAIT, || {
        pod_note(&ip)
    })
    .await;
    assert_eq!(again, "before", "same IP, same volume");
    let after = checkpointed_containers(&agent);
    assert_ne!(after["web"].pid, web_pid, "a new container");
    assert_eq!(after["writer"], before["writer"]);
    let ended: Vec<_> = fw
        .updates
        .iter()
        .filter(|u| u.state() != TaskState::TaskRunning)
        .map(|u| (u.task_id.clone(), u.state().as_str_name()))
        .collect();
    assert!(ended.is_empty(), "only RUNNING so far: {ended:?}");

    // Killed, the pod ends as a unit and its network goes.
    fw.kill("writer").await.expect("kill");
    fw.wait_update("writer", TaskState::TaskKilled).await;
    fw.wait_terminal("web").await;
    let work = agent.work_dir().to_path_buf();
    wait_for("the pod's namespace and dir removed", WAIT, || async {
        let left: usize = ["netns", "pods"]
            .iter()
            .filter_map(|d| std::fs::read_dir(work.join(d)).ok())
            .map(|entries| entries.count())
            .sum();
        (left == 0).then_some(())
    })
    .await;
    assert_eq!(pod_note(&ip).await, None);
    agent.stop();
}
