//! Partitions: an agent cut off from the master is unreachable (its tasks
//! TASK_UNREACHABLE, still running) and RUNNING again after the heal;
//! agents unreachable for too long are removed (TASK_GONE), at a bounded
//! rate, and not at all while too many agents are unreachable at once.

use std::time::Duration;

use corral_master::MasterConfig;
use corral_master::config::RemovalRate;
use corral_proto::Resources;
use corral_proto::pb::{self, Reason, TaskState};
use corral_tests::{
    Cluster, TestFramework, WAIT, metric_value, shell_task, test_master_config, wait_for,
};

/// Launches one long-running task on agent `hostname`; returns its id.
async fn launch_on(fw: &mut TestFramework, hostname: &str, task_id: &str) -> String {
    let offer = fw
        .until(&format!("an offer from {hostname}"), |f| {
            let i = f.offers.iter().position(|o| o.hostname == hostname)?;
            f.offers.remove(i)
        })
        .await;
    fw.launch(
        &offer,
        vec![shell_task(task_id, "exec sleep 600", 0.1, 16.0)],
    )
    .await;
    fw.wait_update(task_id, TaskState::TaskRunning).await;
    offer.agent_id
}

/// A first registration of an agent at 127.0.0.1:1 (nothing listens there:
/// the master never calls it in these tests).
fn raw_register(hostname: &str) -> pb::Register {
    pb::Register {
        info: Some(pb::AgentInfo {
            hostname: hostname.into(),
            address: "127.0.0.1:1".into(),
            resources: Resources::parse("cpus:1;mem:256")
                .expect("resources")
                .to_proto(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Attaches to the master as a bare agent; returns the agent id it was
/// registered as, and the stream (dropping it disconnects).
async fn attach_raw(
    cluster: &Cluster,
    register: pb::Register,
) -> (String, tokio::sync::mpsc::Sender<pb::AgentMessage>) {
    let mut client = pb::agent_registry_client::AgentRegistryClient::connect(format!(
        "http://{}",
        cluster.master
    ))
    .await
    .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        message: Some(pb::agent_message::Message::Register(register)),
    })
    .await
    .expect("queue register");
    let mut inbound = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("attach")
        .into_inner();
    let first = inbound.message().await.expect("stream").expect("a message");
    let Some(pb::master_message::Message::Registered(r)) = first.message else {
        panic!("not Registered: {first:?}");
    };
    // The inbound half ends with this function: keep the outbound one open.
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    (r.agent_id, tx)
}

async fn metric(cluster: &Cluster, name: &str) -> f64 {
    let text = cluster.metrics().await;
    metric_value(&text, name).unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

/// Removal after `removal_timeout`, at most one per `interval`.
fn removal_config(removal_timeout: Duration, interval: Duration) -> MasterConfig {
    MasterConfig {
        agent_removal_timeout: removal_timeout,
        agent_removal_rate: RemovalRate {
            count: 1,
            per: interval,
        },
        max_unreachable_percent: 50,
        ..test_master_config()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_agent_is_unreachable_and_its_tasks_run_again_after_the_heal() {
    let cluster = Cluster::start(2).await;
    let mut fw = cluster.framework("partition").await;
    launch_on(&mut fw, "agent0", "survivor").await;

    cluster.agents[0].proxy.cut();
    let status = fw.wait_update("survivor", TaskState::TaskUnreachable).await;
    assert_eq!(status.reason(), Reason::AgentDisconnected);
    cluster
        .wait_state("agent0 unreachable", |s| {
            s.agents
                .iter()
                .any(|a| a.hostname == "agent0" && a.state == "unreachable")
        })
        .await;
    cluster
        .assert_metrics(&[
            (r#"corral_master_agents{state="unreachable"}"#, 1.0),
            (r#"corral_master_agents{state="connected"}"#, 1.0),
            (r#"corral_master_tasks{state="TASK_UNREACHABLE"}"#, 1.0),
        ])
        .await;

    cluster.agents[0].proxy.restore();
    fw.until("survivor RUNNING again after the heal", |f| {
        let last = f.updates.iter().rev().find(|u| u.task_id == "survivor")?;
        (last.state() == TaskState::TaskRunning).then_some(())
    })
    .await;
    cluster
        .wait_state("both agents connected", |s| {
            s.agents.iter().all(|a| a.state == "connected")
        })
        .await;
    cluster
        .assert_metrics(&[
            (r#"corral_master_agents{state="unreachable"}"#, 0.0),
            (r#"corral_master_agents{state="connected"}"#, 2.0),
            (r#"corral_master_tasks{state="TASK_RUNNING"}"#, 1.0),
            (r#"corral_master_tasks{state="TASK_UNREACHABLE"}"#, 0.0),
            (
                r#"corral_master_agent_removals_total{reason="unreachable"}"#,
                0.0,
            ),
        ])
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_agents_are_removed_one_per_interval_and_a_removed_agent_is_shut_down() {
    const INTERVAL: Duration = Duration::from_secs(3);
    let config = removal_config(Duration::from_millis(500), INTERVAL);
    let mut cluster = Cluster::start_with(config, 5).await;
    let mut fw = cluster.framework("removals").await;
    launch_on(&mut fw, "agent0", "on0").await;
    launch_on(&mut fw, "agent1", "on1").await;

    // 2 of 5 unreachable: under the 50 % limit.
    cluster.agents[0].proxy.cut();
    cluster.agents[1].proxy.cut();
    let removals = r#"corral_master_agent_removals_total{reason="unreachable"}"#;
    wait_for("the first removal", WAIT, || async {
        (metric(&cluster, removals).await >= 1.0).then_some(())
    })
    .await;
    let first = tokio::time::Instant::now();
    assert_eq!(
        metric(&cluster, removals).await,
        1.0,
        "the second removal waits for the rate limit"
    );
    wait_for("the second removal", WAIT, || async {
        (metric(&cluster, removals).await >= 2.0).then_some(())
    })
    .await;
    let spacing = first.elapsed();
    assert!(
        spacing >= INTERVAL.mul_f64(0.8),
        "two removals {spacing:?} apart; the rate allows one per {INTERVAL:?}"
    );
    cluster
        .assert_metrics(&[(r#"corral_master_agents{state="gone"}"#, 2.0)])
        .await;
    cluster
        .assert_metrics(&[("corral_master_agent_removal_halted", 0.0)])
        .await;
    for task in ["on0", "on1"] {
        let gone = fw.wait_update(task, TaskState::TaskGone).await;
        assert_eq!(gone.reason(), Reason::AgentRemoved, "{gone:?}");
    }
    let s = cluster.state().await;
    assert_eq!(s.agents.len(), 3);
    assert!(s.tasks.is_empty(), "{:?}", s.tasks);

    // A removed agent that comes back is told to shut down.
    cluster.agents[0].proxy.restore();
    match cluster.agents[0].wait_exit().await {
        Err(corral_agent::AgentError::RemovedByMaster { message }) => {
            assert!(message.contains("removed"), "{message}")
        }
        other => panic!("the removed agent was not shut down: {other:?}"),
    }
    assert_eq!(
        cluster.state().await.agents.len(),
        3,
        "it was not re-admitted"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_halts_while_more_than_the_limit_of_agents_is_unreachable() {
    let config = removal_config(Duration::from_millis(300), Duration::from_millis(100));
    let cluster = Cluster::start_with(config, 3).await;

    // 2 of 3 unreachable: above 50 %, the master is likelier the one cut off.
    cluster.agents[0].proxy.cut();
    cluster.agents[1].proxy.cut();
    wait_for("the removal-halted alert", WAIT, || async {
        (metric(&cluster, "corral_master_agent_removal_halted").await == 1.0).then_some(())
    })
    .await;
    // Absence can only be observed over a window: several removal timeouts
    // and agent ticks.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster
        .assert_metrics(&[(
            r#"corral_master_agent_removals_total{reason="unreachable"}"#,
            0.0,
        )])
        .await;
    assert_eq!(cluster.state().await.agents.len(), 3);

    // One heals: 1 of 3 is under the limit, removal resumes.
    cluster.agents[1].proxy.restore();
    wait_for("the remaining unreachable agent removed", WAIT, || async {
        let text = cluster.metrics().await;
        (metric_value(
            &text,
            r#"corral_master_agent_removals_total{reason="unreachable"}"#,
        ) == Some(1.0)
            && metric_value(&text, "corral_master_agent_removal_halted") == Some(0.0))
        .then_some(())
    })
    .await;
    let s = cluster.state().await;
    let left: Vec<_> = s
        .agents
        .iter()
        .map(|a| format!("{} {}", a.hostname, a.state))
        .collect();
    assert_eq!(left.len(), 2, "agent0 and only agent0 removed: {left:?}");
    assert!(!s.agents.iter().any(|a| a.hostname == "agent0"), "{left:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_registering_as_the_replacement_of_another_removes_it_at_once() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("replaced").await;
    let old = launch_on(&mut fw, "agent0", "old-task").await;
    cluster.agents[0].proxy.cut();
    fw.wait_update("old-task", TaskState::TaskUnreachable).await;

    // The same machine, restarted as a new agent (e.g. after a reboot).
    let mut register = raw_register("agent0-rebooted");
    register.replaces_agent_id = old.clone();
    let (_, stream) = attach_raw(&cluster, register).await;

    let gone = fw.wait_update("old-task", TaskState::TaskGone).await;
    assert_eq!(gone.reason(), Reason::AgentRemoved);
    assert!(gone.message.contains("replaced"), "{gone:?}");
    let s = cluster.state().await;
    assert_eq!(s.agents.len(), 1);
    assert_eq!(s.agents[0].hostname, "agent0-rebooted");
    cluster
        .assert_metrics(&[(
            r#"corral_master_agent_removals_total{reason="replaced"}"#,
            1.0,
        )])
        .await;
    drop(stream);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_agents_are_forgotten_beyond_the_registrys_count_and_age() {
    let config = MasterConfig {
        max_unreachable_percent: 100,
        registry_max_agent_count: 1,
        registry_max_agent_age: Duration::from_secs(3),
        ..removal_config(Duration::from_millis(300), Duration::from_millis(100))
    };
    let cluster = Cluster::start_with(config, 3).await;
    cluster.agents[0].proxy.cut();
    cluster.agents[1].proxy.cut();
    // Both are removed; only the newer of the two is remembered.
    let s = cluster
        .wait_state("two agents removed, one remembered", |s| {
            s.agents.len() == 1 && s.gone_agents == 1
        })
        .await;
    assert_eq!(s.agents[0].hostname, "agent2");
    cluster
        .assert_metrics(&[(
            r#"corral_master_agent_removals_total{reason="unreachable"}"#,
            2.0,
        )])
        .await;
    // And it is forgotten once it is older than the maximum age.
    cluster
        .wait_state("the removed agent forgotten", |s| s.gone_agents == 0)
        .await;
    cluster
        .assert_metrics(&[(r#"corral_master_agents{state="gone"}"#, 0.0)])
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_first_registration_keeps_the_agents_id() {
    let cluster = Cluster::start(0).await;
    // The agent registers; its `Registered` is lost with the stream, so it
    // registers again as it did the first time.
    let (first, stream) = attach_raw(&cluster, raw_register("retrying")).await;
    drop(stream);
    let (second, stream) = attach_raw(&cluster, raw_register("retrying")).await;
    assert_eq!(first, second, "the same agent, the same id");
    let s = cluster
        .wait_state("the agent connected", |s| {
            s.agents.iter().any(|a| a.state == "connected")
        })
        .await;
    assert_eq!(s.agents.len(), 1, "no phantom agent: {:?}", s.agents);
    // Another agent (another hostname at that address) is a new one.
    let (third, other) = attach_raw(&cluster, raw_register("other")).await;
    assert_ne!(third, first);
    drop((stream, other));
    cluster.shutdown().await;
}
