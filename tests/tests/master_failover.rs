//! The durable master: a restarted master recovers its registry, agents
//! re-register with their running tasks, frameworks take over with their
//! ids, and failover timeouts keep running across the restart (MESOS-4659).

use std::collections::HashSet;
use std::time::Duration;

use corral_proto::pb::{self, Reason, TaskState};
use corral_tests::{
    Cluster, TestFramework, WAIT, metric_value, shell_task, test_master_config, wait_for,
};

/// A framework that keeps its tasks for `failover` seconds when it is away.
fn framework_info(name: &str, id: &str, failover: f64) -> pb::FrameworkInfo {
    pb::FrameworkInfo {
        id: id.into(),
        name: name.into(),
        role: "*".into(),
        failover_timeout_seconds: failover,
        ..Default::default()
    }
}

/// Subscribes with `info`, retrying while the master is (re)starting.
async fn subscribe(cluster: &Cluster, info: pb::FrameworkInfo) -> TestFramework {
    let master = cluster.master;
    wait_for("the master to accept the subscription", WAIT, || {
        let info = info.clone();
        async move { TestFramework::subscribe_with(master, info).await.ok() }
    })
    .await
}

/// Launches `per_agent` long-running tasks on every agent; returns the task
/// ids by agent id once all of them run.
async fn launch_everywhere(
    fw: &mut TestFramework,
    agents: usize,
    per_agent: usize,
) -> Vec<(String, Vec<String>)> {
    let mut placed: Vec<(String, Vec<String>)> = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..agents * 20 {
        if placed.len() == agents {
            break;
        }
        for offer in fw.wait_offers().await {
            if !seen.insert(offer.agent_id.clone()) {
                fw.decline(vec![offer.id.clone()], Some(0.0))
                    .await
                    .expect("decline");
                continue;
            }
            let ids: Vec<String> = (0..per_agent)
                .map(|i| format!("t-{}-{i}", placed.len()))
                .collect();
            let tasks = ids
                .iter()
                .map(|id| shell_task(id, "exec sleep 600", 0.1, 16.0))
                .collect();
            fw.launch(&offer, tasks).await;
            placed.push((offer.agent_id.clone(), ids));
        }
    }
    assert_eq!(placed.len(), agents, "offers from every agent");
    for (_, ids) in &placed {
        for id in ids {
            fw.wait_update(id, TaskState::TaskRunning).await;
        }
    }
    placed
}

/// The id of the agent with `hostname`, and the tasks placed there.
async fn tasks_of(
    cluster: &Cluster,
    placed: &[(String, Vec<String>)],
    hostname: &str,
) -> (String, Vec<String>) {
    let s = cluster.state().await;
    let id = s
        .agents
        .iter()
        .find(|a| a.hostname == hostname)
        .unwrap_or_else(|| panic!("no agent {hostname}"))
        .id
        .clone();
    let tasks = placed
        .iter()
        .find(|(a, _)| a == &id)
        .map(|(_, t)| t.clone())
        .unwrap_or_default();
    (id, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_restart_keeps_every_task_and_reports_recovering_agents_until_they_return() {
    // The issue's size: 20 agents with 10 tasks each.
    const AGENTS: usize = 20;
    const PER_AGENT: usize = 10;
    let mut cluster = Cluster::start(AGENTS).await;
    let mut fw = subscribe(&cluster, framework_info("keeper", "", 300.0)).await;
    let placed = launch_everywhere(&mut fw, AGENTS, PER_AGENT).await;
    let (cut_agent, cut_tasks) = tasks_of(&cluster, &placed, "agent0").await;
    assert_eq!(cut_tasks.len(), PER_AGENT);
    let fid = fw.id.clone();
    drop(fw);

    // Agent 0 cannot reach the new master until the test lets it: its tasks
    // are what reconciliation must report as recovering, not lost.
    cluster.stop_master().await;
    cluster.agents[0].proxy.cut();
    let mut config = cluster.master_config.clone();
    config.agent_reregister_timeout = Duration::from_secs(600);
    cluster.start_master(config).await;

    let mut fw = subscribe(&cluster, framework_info("keeper", &fid, 300.0)).await;
    assert_eq!(fw.id, fid, "the framework kept its id");
    let s = cluster
        .wait_state("all agents but one back, 1 recovering", |s| {
            s.agents.iter().filter(|a| a.state == "connected").count() == AGENTS - 1
                && s.agents.iter().filter(|a| a.state == "recovering").count() == 1
        })
        .await;
    assert_eq!(
        s.tasks.len(),
        AGENTS * PER_AGENT,
        "every task was recovered"
    );
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric_value(&metrics, r#"corral_master_agents{state="recovering"}"#),
        Some(1.0),
        "{metrics}"
    );

    fw.updates.clear();
    fw.reconcile(Vec::new()).await.expect("reconcile");
    let statuses = fw
        .until("a reconciliation update for every task", |f| {
            (f.updates.len() >= AGENTS * PER_AGENT).then(|| f.updates.clone())
        })
        .await;
    for status in &statuses {
        assert_eq!(status.state(), TaskState::TaskRunning, "{status:?}");
        if cut_tasks.contains(&status.task_id) {
            assert_eq!(status.reason(), Reason::AgentRecovering, "{status:?}");
            assert!(
                status.message.contains(&cut_agent) && status.message.contains("re-registered"),
                "{status:?}"
            );
        } else {
            assert_eq!(status.reason(), Reason::Reconciliation, "{status:?}");
        }
    }

    cluster.agents[0].proxy.restore();
    let s = cluster
        .wait_state("every agent back", |s| {
            s.agents.iter().filter(|a| a.state == "connected").count() == AGENTS
        })
        .await;
    assert_eq!(s.agents.len(), AGENTS, "no agent registered as new");
    assert!(
        s.tasks.iter().all(|t| t.state == "TASK_RUNNING"),
        "{:?}",
        s.tasks
    );
    assert_eq!(s.tasks.len(), AGENTS * PER_AGENT);
    assert!(s.completed_tasks.is_empty(), "{:?}", s.completed_tasks);
    assert!(
        !fw.updates
            .iter()
            .any(|u| corral_proto::task::is_terminal(u.state())),
        "no task ended: {:?}",
        fw.updates
    );
    // The framework still controls its tasks through the new master.
    let victim = placed
        .iter()
        .flat_map(|(_, t)| t)
        .find(|t| !cut_tasks.contains(t))
        .expect("a task on another agent");
    fw.kill(victim).await.expect("kill");
    fw.wait_update(victim, TaskState::TaskKilled).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_misses_the_reregister_timeout_becomes_unreachable_and_returns_running() {
    let mut cluster = Cluster::start(2).await;
    let mut fw = subscribe(&cluster, framework_info("late", "", 300.0)).await;
    let placed = launch_everywhere(&mut fw, 2, 1).await;
    let (_, late) = tasks_of(&cluster, &placed, "agent0").await;
    let fid = fw.id.clone();
    drop(fw);

    cluster.stop_master().await;
    cluster.agents[0].proxy.cut();
    let mut config = cluster.master_config.clone();
    config.agent_reregister_timeout = Duration::from_secs(1);
    cluster.start_master(config).await;
    let mut fw = subscribe(&cluster, framework_info("late", &fid, 300.0)).await;

    let late_task = late[0].clone();
    let s = cluster
        .wait_state("agent 0 unreachable after the re-register timeout", |s| {
            s.agents.iter().any(|a| a.state == "unreachable")
                && s.tasks
                    .iter()
                    .any(|t| t.id == late_task && t.state == "TASK_UNREACHABLE")
        })
        .await;
    assert_eq!(s.agents.len(), 2);
    cluster.agents[0].proxy.restore();
    cluster
        .wait_state("agent 0 back with its task running", |s| {
            s.agents.iter().all(|a| a.state == "connected")
                && s.tasks.iter().all(|t| t.state == "TASK_RUNNING")
                && s.tasks.len() == 2
        })
        .await;
    fw.wait_update(&late_task, TaskState::TaskRunning).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_failover_within_the_timeout_keeps_tasks_and_after_it_kills_them() {
    let cluster = Cluster::start(1).await;
    let mut first = subscribe(&cluster, framework_info("fo", "", 2.0)).await;
    let offer = first.wait_offers().await.remove(0);
    first
        .launch(
            &offer,
            vec![shell_task("kept", "exec sleep 600", 0.1, 16.0)],
        )
        .await;
    first.wait_update("kept", TaskState::TaskRunning).await;
    let fid = first.id.clone();

    // A second instance takes over while the first is still connected.
    let mut second = subscribe(&cluster, framework_info("fo", &fid, 2.0)).await;
    first
        .until("the old instance is told it was replaced", |f| {
            f.errors.iter().find(|e| e.contains("failed over")).cloned()
        })
        .await;
    second
        .reconcile(vec![("kept".into(), String::new())])
        .await
        .expect("reconcile");
    let status = second.wait_update("kept", TaskState::TaskRunning).await;
    assert_eq!(status.reason(), Reason::Reconciliation);
    drop(first);

    // Gone for longer than its failover timeout: its tasks are killed and
    // its id refused.
    drop(second);
    let s = cluster
        .wait_state("the framework removed after its failover timeout", |s| {
            s.frameworks.is_empty() && s.tasks.is_empty()
        })
        .await;
    let done = s
        .completed_tasks
        .iter()
        .find(|t| t.id == "kept")
        .expect("kept completed");
    assert_eq!(done.state, "TASK_KILLED");
    assert_eq!(done.reason, "FRAMEWORK_REMOVED");
    let refused = TestFramework::subscribe_with(cluster.master, framework_info("fo", &fid, 2.0))
        .await
        .err()
        .expect("a removed framework id is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failover_timeout_keeps_running_across_a_master_restart() {
    const FAILOVER: Duration = Duration::from_secs(6);
    let mut cluster = Cluster::start(1).await;
    let mut fw = subscribe(
        &cluster,
        framework_info("leaver", "", FAILOVER.as_secs_f64()),
    )
    .await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![shell_task("orphan", "exec sleep 600", 0.1, 16.0)],
    )
    .await;
    fw.wait_update("orphan", TaskState::TaskRunning).await;
    let fid = fw.id.clone();
    drop(fw);
    cluster
        .wait_state("the framework disconnected", |s| {
            s.frameworks.iter().all(|f| f.state == "disconnected")
        })
        .await;
    let disconnected = tokio::time::Instant::now();

    // Part of the timeout passes before the restart. Only the passage of
    // time matters here, so this is a plain sleep.
    tokio::time::sleep(FAILOVER / 2).await;
    cluster.restart_master().await;
    cluster
        .wait_state("the agent back with the orphan task", |s| {
            s.agents.iter().all(|a| a.state == "connected") && s.tasks.len() == 1
        })
        .await;
    // Had the restart reset the timer, the task would live until
    // FAILOVER / 2 + FAILOVER after the disconnection.
    let s = wait_for("the orphan task killed", WAIT, || async {
        let s = cluster.state().await;
        s.completed_tasks
            .iter()
            .any(|t| t.id == "orphan")
            .then_some(s)
    })
    .await;
    let elapsed = disconnected.elapsed();
    assert!(
        elapsed < FAILOVER + FAILOVER / 3,
        "killed {elapsed:?} after the disconnection; the timeout is {FAILOVER:?}"
    );
    let done = s.completed_tasks.iter().find(|t| t.id == "orphan").unwrap();
    assert_eq!(done.reason, "FRAMEWORK_REMOVED");

    // The removal itself survives another restart.
    cluster.restart_master().await;
    let refused = wait_for("the restarted master to answer", WAIT, || {
        let info = framework_info("leaver", &fid, 6.0);
        let master = cluster.master;
        async move {
            match TestFramework::subscribe_with(master, info).await {
                Err(e) if e.code() == tonic::Code::FailedPrecondition => Some(e),
                Err(e) if e.code() == tonic::Code::Unavailable => None,
                Err(e) => panic!("unexpected refusal: {e}"),
                Ok(_) => panic!("the removed framework id was accepted after a restart"),
            }
        }
    })
    .await;
    assert!(refused.message().contains("removed"), "{refused}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_without_agents_back_yet_does_not_offer_their_resources() {
    let mut cluster = Cluster::start(1).await;
    cluster.stop_master().await;
    cluster.agents[0].proxy.cut();
    let mut config = test_master_config();
    config.agent_reregister_timeout = Duration::from_secs(600);
    cluster.start_master(config).await;
    let mut fw = subscribe(&cluster, framework_info("eager", "", 0.0)).await;
    assert!(
        fw.no_offers_for(Duration::from_millis(800)).await,
        "an agent that has not re-registered is not offered"
    );
    cluster.agents[0].proxy.restore();
    let offer = fw.wait_offers().await.remove(0);
    assert_eq!(offer.hostname, "agent0");
    cluster.shutdown().await;
}
