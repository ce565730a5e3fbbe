//! A partition below TCP: the agent runs in a network namespace of its own
//! whose veth to the host is cut ([`corral_tests::netns::Wire`]). The agent
//! becomes unreachable after the ping timeouts, its tasks TASK_UNREACHABLE
//! while they keep running; a task that ends during the partition is
//! reported after the heal, and the others are RUNNING again. The agent
//! is a process (this test binary re-executed) that enters the namespace
//! before it starts. Needs root, cgroups and iproute2.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use corral_proto::pb::{Reason, TaskState};
use corral_tests::netns::Wire;
use corral_tests::process::{AgentProcess, AgentSpec, child_main};
use corral_tests::{Cluster, WAIT, shell_task, test_master_config, wait_for};

const CHILD_ENTRY: &str = "child_entry_point_runs_only_when_re_executed";

/// Runs only in a re-executed child.
#[test]
fn child_entry_point_runs_only_when_re_executed() {
    child_main();
}

fn task_state(agent: &AgentProcess, task_id: &str) -> Option<TaskState> {
    let contents = corral_agent::read_checkpoint(agent.work_dir()).ok()?;
    contents
        .tasks
        .iter()
        .find(|t| t.task.as_ref().is_some_and(|i| i.task_id == task_id))
        .map(|t| t.state())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_the_agents_veth_makes_it_unreachable_and_the_heal_brings_it_back() {
    let wire = Wire::create();
    let config = test_master_config();
    let unreachable_after = config.agent_unreachable_after();
    let cluster = Cluster::start_on(config, IpAddr::V4(wire.host_ip)).await;
    let mut spec = AgentSpec::new(&cluster, "cpus:2;mem:1024;disk:1024;ports:[31000-31099]");
    spec.address = SocketAddr::new(IpAddr::V4(wire.ns_ip), 5051);
    spec.netns = Some(wire.path());
    let mut agent = AgentProcess::spawn(CHILD_ENTRY, &spec);
    let mut fw = cluster.framework("wire").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![
            shell_task("survivor", "exec sleep 600", 0.1, 16.0),
            shell_task("short", "exec sleep 6", 0.1, 16.0),
        ],
    )
    .await;
    fw.wait_update("survivor", TaskState::TaskRunning).await;
    fw.wait_update("short", TaskState::TaskRunning).await;

    wire.cut();
    let cut = Instant::now();
    let status = fw.wait_update("survivor", TaskState::TaskUnreachable).await;
    let took = cut.elapsed();
    assert_eq!(status.reason(), Reason::AgentDisconnected);
    assert!(
        took < unreachable_after + Duration::from_secs(2),
        "unreachable after {took:?} (ping timeouts: {unreachable_after:?})"
    );
    cluster
        .assert_metrics(&[
            (r#"corral_master_agents{state="unreachable"}"#, 1.0),
            (r#"corral_master_tasks{state="TASK_UNREACHABLE"}"#, 2.0),
        ])
        .await;
    // On the other side of the cut the tasks run on; one ends.
    wait_for(
        "the short task to finish during the partition",
        WAIT,
        || async { (task_state(&agent, "short")? == TaskState::TaskFinished).then_some(()) },
    )
    .await;
    assert_eq!(task_state(&agent, "survivor"), Some(TaskState::TaskRunning));

    wire.heal();
    fw.until("survivor RUNNING again after the heal", |f| {
        let last = f.updates.iter().rev().find(|u| u.task_id == "survivor")?;
        (last.state() == TaskState::TaskRunning).then_some(())
    })
    .await;
    fw.wait_update("short", TaskState::TaskFinished).await;
    cluster
        .wait_state("the agent connected again", |s| {
            s.agents.iter().all(|a| a.state == "connected")
        })
        .await;
    cluster
        .assert_metrics(&[
            (r#"corral_master_agents{state="unreachable"}"#, 0.0),
            (r#"corral_master_tasks{state="TASK_RUNNING"}"#, 1.0),
            (r#"corral_master_tasks{state="TASK_UNREACHABLE"}"#, 0.0),
        ])
        .await;
    agent.stop();
    cluster.shutdown().await;
}
