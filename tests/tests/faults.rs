//! Deterministic fault scenarios on the agent ⇄ master stream
//! ([`corral_tests::faults::FaultPlan`]): a dropped status update is
//! resent, a dropped acknowledgement makes the agent resend with the same
//! uuid, a duplicated update never shows the framework two uuids, and a
//! delayed kill still kills. Each rule's hit count is checked, so a
//! scenario that did not happen fails instead of passing by luck.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_agent::Fault;
use corral_proto::pb::TaskState;
use corral_tests::faults::{FaultPlan, is_ack, is_kill, is_update};
use corral_tests::{Cluster, TestFramework, shell_task};

/// A cluster whose one agent runs with `faults`, and a framework with task
/// `t` (`sleep`) launched on it.
async fn cluster_with(faults: &Arc<FaultPlan>) -> (Cluster, TestFramework) {
    let mut cluster = Cluster::start(0).await;
    let mut config = cluster.agent_config("cpus:2;mem:2048;disk:1024", "");
    config.link_faults = Some(faults.clone());
    cluster.add_agent_with(config).await;
    cluster
        .wait_state("the agent connected", |s| {
            s.agents.iter().any(|a| a.state == "connected")
        })
        .await;
    let mut fw = cluster.framework("faults").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(&offer, vec![shell_task("t", "exec sleep 600", 0.1, 16.0)])
        .await;
    (cluster, fw)
}

/// The uuids of the updates of `t` in `state` the framework received.
fn uuids(fw: &TestFramework, state: TaskState) -> HashSet<Vec<u8>> {
    fw.updates
        .iter()
        .filter(|u| u.task_id == "t" && u.state() == state)
        .map(|u| u.uuid.clone())
        .collect()
}

async fn kill_and_finish(cluster: Cluster, mut fw: TestFramework) {
    fw.kill("t").await.expect("kill");
    let end = fw.wait_terminal("t").await;
    assert_eq!(end.state(), TaskState::TaskKilled, "{end:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_status_update_is_resent_and_reaches_the_framework_once() {
    let faults = FaultPlan::new();
    faults.rule_to_master(1, Fault::Drop, |m| {
        is_update(m, "t", TaskState::TaskRunning)
    });
    let (cluster, mut fw) = cluster_with(&faults).await;
    fw.wait_update("t", TaskState::TaskRunning).await;
    assert_eq!(faults.hits(), [1], "the first RUNNING was dropped");
    assert_eq!(uuids(&fw, TaskState::TaskRunning).len(), 1);
    kill_and_finish(cluster, fw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_acknowledgement_makes_the_agent_resend_the_same_update() {
    let faults = FaultPlan::new();
    faults.rule_to_agent(1, Fault::Drop, |m| is_ack(m, "t"));
    let (cluster, mut fw) = cluster_with(&faults).await;
    fw.until("RUNNING twice: the agent resent it", |f| {
        (f.updates
            .iter()
            .filter(|u| u.task_id == "t" && u.state() == TaskState::TaskRunning)
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    assert_eq!(faults.hits(), [1], "the first acknowledgement was dropped");
    assert_eq!(
        uuids(&fw, TaskState::TaskRunning).len(),
        1,
        "a resent update keeps its uuid"
    );
    kill_and_finish(cluster, fw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicated_status_update_never_shows_the_framework_two_uuids() {
    let faults = FaultPlan::new();
    faults.rule_to_master(1, Fault::Duplicate, |m| {
        is_update(m, "t", TaskState::TaskRunning)
    });
    let (cluster, mut fw) = cluster_with(&faults).await;
    fw.wait_update("t", TaskState::TaskRunning).await;
    assert_eq!(faults.hits(), [1]);
    // Whatever the duplicate caused has arrived by the time the kill's
    // updates do (one stream, in order).
    fw.kill("t").await.expect("kill");
    let end = fw.wait_terminal("t").await;
    assert_eq!(end.state(), TaskState::TaskKilled, "{end:?}");
    assert_eq!(uuids(&fw, TaskState::TaskRunning).len(), 1);
    assert_eq!(uuids(&fw, TaskState::TaskKilled).len(), 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_kill_arrives_late_and_still_kills() {
    // Within the agent's silence limit (3 heartbeats of 500 ms, counted
    // from the heartbeat before the kill).
    const DELAY: Duration = Duration::from_millis(700);
    let faults = FaultPlan::new();
    faults.rule_to_agent(1, Fault::Delay(DELAY), |m| is_kill(m, "t"));
    let (cluster, mut fw) = cluster_with(&faults).await;
    fw.wait_update("t", TaskState::TaskRunning).await;
    let asked = Instant::now();
    fw.kill("t").await.expect("kill");
    let end = fw.wait_terminal("t").await;
    assert_eq!(end.state(), TaskState::TaskKilled, "{end:?}");
    assert!(
        asked.elapsed() >= DELAY,
        "killed after {:?}, before the kill could arrive",
        asked.elapsed()
    );
    assert_eq!(faults.hits(), [1]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_lost_with_a_broken_stream_is_sent_again_when_the_agent_returns() {
    // Held past the agent's silence limit: the agent gives up on the master
    // and reconnects, and the held kill dies with the old stream.
    let faults = FaultPlan::new();
    faults.rule_to_agent(1, Fault::Delay(Duration::from_secs(3)), |m| is_kill(m, "t"));
    let (cluster, mut fw) = cluster_with(&faults).await;
    fw.wait_update("t", TaskState::TaskRunning).await;
    fw.kill("t").await.expect("kill");
    let end = fw.wait_terminal("t").await;
    assert_eq!(end.state(), TaskState::TaskKilled, "{end:?}");
    assert_eq!(faults.hits(), [1]);
    let reconnects = corral_tests::metric_value(
        &cluster.agent_metrics(0).await,
        "corral_agent_master_connections_total",
    );
    assert!(
        reconnects.is_some_and(|n| n >= 2.0),
        "the agent re-registered: {reconnects:?}"
    );
    cluster.shutdown().await;
}
