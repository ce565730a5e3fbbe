//! The offer cycle end to end: a real master, real agents running real
//! processes, and frameworks on the gRPC API.

use std::time::Duration;

use corral_proto::pb::{Reason, TaskState};
use corral_tests::{Cluster, WAIT, metric_value, shell_task, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_runs_to_finished_and_stdout_lands_in_sandbox() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("hello").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![shell_task(
            "t1",
            "echo hello from $CORRAL_TASK_ID",
            0.1,
            32.0,
        )],
    )
    .await;
    fw.wait_update("t1", TaskState::TaskRunning).await;
    let done = fw.wait_update("t1", TaskState::TaskFinished).await;
    assert_eq!(done.exit_code, Some(0));
    let stdout = cluster.agents[0]
        .work_dir
        .join("sandboxes")
        .join(&fw.id)
        .join("t1")
        .join("stdout");
    let text = std::fs::read_to_string(&stdout).expect("stdout file in the sandbox");
    assert_eq!(text, "hello from t1\n");
    // Acknowledged terminal tasks leave the live set and show as completed.
    let s = cluster
        .wait_state("t1 completed", |s| {
            s.tasks.is_empty() && s.completed_tasks.iter().any(|t| t.id == "t1")
        })
        .await;
    assert_eq!(s.completed_tasks[0].state, "TASK_FINISHED");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_is_task_failed_with_its_exit_code() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("fail").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![shell_task("bad", "echo oops >&2; exit 3", 0.1, 32.0)],
    )
    .await;
    let failed = fw.wait_update("bad", TaskState::TaskFailed).await;
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.reason(), Reason::CommandFailed);
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            r#"corral_master_tasks_terminal_total{state="TASK_FAILED",reason="COMMAND_FAILED"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_task_with_sigterm_and_escalates_to_sigkill() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("killer").await;
    let offer = fw.wait_offers().await.remove(0);
    let mut stubborn = shell_task(
        "stubborn",
        "trap '' TERM; echo ready; while true; do sleep 1; done",
        0.1,
        32.0,
    );
    stubborn.kill_grace_period_seconds = Some(0.5);
    fw.launch(
        &offer,
        vec![shell_task("polite", "exec sleep 600", 0.1, 32.0), stubborn],
    )
    .await;
    fw.wait_update("polite", TaskState::TaskRunning).await;
    fw.wait_update("stubborn", TaskState::TaskRunning).await;
    // Let the trap be installed before killing (it prints when ready).
    let ready = cluster.agents[0]
        .work_dir
        .join("sandboxes")
        .join(&fw.id)
        .join("stubborn")
        .join("stdout");
    wait_for("stubborn task ready", WAIT, || async {
        std::fs::read_to_string(&ready)
            .ok()
            .filter(|s| s.contains("ready"))
    })
    .await;

    fw.kill("polite").await.expect("kill polite");
    let killed = fw.wait_update("polite", TaskState::TaskKilled).await;
    assert_eq!(killed.signal, Some(libc_sigterm()), "{killed:?}");

    fw.kill("stubborn").await.expect("kill stubborn");
    let killed = fw.wait_update("stubborn", TaskState::TaskKilled).await;
    assert_eq!(
        killed.signal,
        Some(9),
        "SIGTERM was ignored, so SIGKILL: {killed:?}"
    );
    assert!(
        fw.updates
            .iter()
            .any(|u| u.task_id == "stubborn" && u.state() == TaskState::TaskKilling)
    );
    cluster.shutdown().await;
}

fn libc_sigterm() -> i32 {
    15
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_frameworks_with_equal_weight_converge_to_equal_dominant_shares() {
    // Both frameworks are there before any resources are, so neither gets
    // a head start.
    let mut cluster = Cluster::start(0).await;
    let mut a = cluster.framework("a").await;
    let mut b = cluster.framework("b").await;
    // Tasks take exactly half of every scalar of an agent. Offered
    // resources count toward a framework's share (as in Mesos), so an agent
    // whose leftovers were all mem or disk would make whoever holds that
    // leftover offer look richer than its tasks; here leftovers are always
    // one more task's worth (or only ports, which DRF does not count).
    for _ in 0..2 {
        cluster.add_agent("cpus:2;mem:512;disk:2", "").await;
    }
    // Each framework takes one task (1 cpu, 256 MiB) per offer and gives the
    // rest back without a filter, so every round DRF decides who is next.
    let mut launched = [0usize; 2];
    for round in 0..200 {
        if launched.iter().sum::<usize>() == 4 {
            break;
        }
        for (i, fw) in [&mut a, &mut b].into_iter().enumerate() {
            fw.pump(Duration::from_millis(50)).await;
            // An offer rescinded under us (e.g. a slow CI machine) drops the
            // task: it did not take a share.
            let lost = fw
                .updates
                .drain(..)
                .filter(|u| {
                    u.state() == TaskState::TaskDropped || u.state() == TaskState::TaskError
                })
                .count();
            launched[i] -= lost;
            let offers: Vec<_> = fw.offers.drain(..).collect();
            for offer in offers {
                let fits = offer.resources.iter().any(|r| {
                    r.name == "cpus"
                        && matches!(r.value, Some(corral_proto::pb::resource::Value::Scalar(c)) if c >= 1.0)
                });
                if fits {
                    let id = format!("{}-{round}-{}", ["a", "b"][i], launched[i]);
                    let mut task = shell_task(&id, "exec sleep 600", 1.0, 256.0);
                    task.resources.push(corral_proto::pb::Resource {
                        name: "disk".into(),
                        value: Some(corral_proto::pb::resource::Value::Scalar(1.0)),
                    });
                    task.agent_id = offer.agent_id.clone();
                    fw.accept(vec![offer.id.clone()], vec![task], Some(0.0))
                        .await
                        .expect("accept");
                    launched[i] += 1;
                } else {
                    fw.decline(vec![offer.id.clone()], Some(0.0))
                        .await
                        .expect("decline");
                }
            }
        }
    }
    assert_eq!(launched, [2, 2], "the 4 cpus were split evenly");
    let s = cluster
        .wait_state("4 tasks running", |s| {
            s.tasks.iter().filter(|t| t.state == "TASK_RUNNING").count() == 4
        })
        .await;
    let shares: Vec<f64> = s.frameworks.iter().map(|f| f.used_resources.cpus).collect();
    assert_eq!(shares, vec![2.0, 2.0]);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_filters_and_suppress_stop_offers_and_revive_restores_them() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("picky").await;
    let offers = fw.wait_offers().await;
    fw.decline(offers.iter().map(|o| o.id.clone()).collect(), Some(3600.0))
        .await
        .expect("decline");
    // Allocation runs every 100 ms: 1 s is ten rounds without an offer.
    assert!(
        fw.no_offers_for(Duration::from_secs(1)).await,
        "a declined agent was offered again"
    );
    fw.revive().await.expect("revive");
    let offers = fw.wait_offers().await;
    assert_eq!(offers.len(), 1);

    fw.suppress().await.expect("suppress");
    fw.decline(offers.iter().map(|o| o.id.clone()).collect(), Some(0.0))
        .await
        .expect("decline");
    assert!(
        fw.no_offers_for(Duration::from_secs(1)).await,
        "a suppressed framework got offers"
    );
    let s = cluster.state().await;
    assert!(s.frameworks[0].suppressed);
    fw.revive().await.expect("revive");
    let offers: Vec<String> = fw.wait_offers().await.into_iter().map(|o| o.id).collect();

    // The default filter (5 s) also holds.
    fw.decline(offers, None).await.expect("decline");
    assert!(
        fw.no_offers_for(Duration::from_secs(1)).await,
        "the default 5 s filter did not hold"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_acknowledgement_makes_the_agent_resend_the_update() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("forgetful").await;
    fw.auto_ack = false;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(&offer, vec![shell_task("t", "exec sleep 600", 0.1, 32.0)])
        .await;
    let first = fw.wait_update("t", TaskState::TaskRunning).await;
    // Not acknowledged: the same update (same uuid) arrives again.
    let again = fw
        .until("the RUNNING update resent", |f| {
            let n = f
                .updates
                .iter()
                .filter(|u| u.task_id == "t" && u.uuid == first.uuid)
                .count();
            (n >= 2).then_some(n)
        })
        .await;
    assert!(again >= 2);
    let metrics = cluster.agent_metrics(0).await;
    assert_eq!(
        metric_value(&metrics, "corral_agent_status_updates_pending"),
        Some(1.0),
        "{metrics}"
    );
    // Once acknowledged, the agent has nothing pending.
    fw.acknowledge(&first).await.expect("ack");
    wait_for("agent drained its pending updates", WAIT, || async {
        let m = cluster.agent_metrics(0).await;
        (metric_value(&m, "corral_agent_status_updates_pending") == Some(0.0)).then_some(())
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_turns_unreachable_and_its_tasks_come_back_running() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("partitioned").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(&offer, vec![shell_task("t", "exec sleep 600", 0.1, 32.0)])
        .await;
    fw.wait_update("t", TaskState::TaskRunning).await;

    cluster.agents[0].proxy.cut();
    let unreachable = fw.wait_update("t", TaskState::TaskUnreachable).await;
    assert_eq!(unreachable.reason(), Reason::AgentDisconnected);
    let s = cluster
        .wait_state("agent unreachable", |s| s.agents[0].state == "unreachable")
        .await;
    assert_eq!(s.tasks[0].state, "TASK_UNREACHABLE");
    let m = cluster.metrics().await;
    assert_eq!(
        metric_value(&m, r#"corral_master_agents{state="unreachable"}"#),
        Some(1.0),
        "{m}"
    );

    fw.updates.clear();
    cluster.agents[0].proxy.restore();
    let back = fw.wait_update("t", TaskState::TaskRunning).await;
    assert_eq!(back.reason(), Reason::AgentReregistered);
    let s = cluster
        .wait_state("agent connected again", |s| {
            s.agents[0].state == "connected"
        })
        .await;
    assert_eq!(s.tasks[0].state, "TASK_RUNNING");
    assert_eq!(
        s.agents.len(),
        1,
        "the agent came back with its id, not as a new agent"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_reconciliation_returns_every_non_terminal_task() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("reconciler").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![
            shell_task("r1", "exec sleep 600", 0.1, 32.0),
            shell_task("r2", "exec sleep 600", 0.1, 32.0),
            shell_task("done", "true", 0.1, 32.0),
        ],
    )
    .await;
    fw.wait_update("r1", TaskState::TaskRunning).await;
    fw.wait_update("r2", TaskState::TaskRunning).await;
    fw.wait_update("done", TaskState::TaskFinished).await;
    cluster
        .wait_state("done retired", |s| s.tasks.len() == 2)
        .await;
    fw.updates.clear();
    fw.reconcile(vec![]).await.expect("reconcile");
    let mut got = fw
        .until("two reconciliation updates", |f| {
            let r: Vec<String> = f
                .updates
                .iter()
                .filter(|u| u.reason() == Reason::Reconciliation)
                .map(|u| format!("{}:{}", u.task_id, u.state().as_str_name()))
                .collect();
            (r.len() >= 2).then_some(r)
        })
        .await;
    got.sort();
    assert_eq!(got, vec!["r1:TASK_RUNNING", "r2:TASK_RUNNING"]);
    // Explicit reconciliation of an unknown task answers TASK_UNKNOWN.
    fw.reconcile(vec![("nope".into(), String::new())])
        .await
        .expect("reconcile");
    let unknown = fw.wait_update("nope", TaskState::TaskUnknown).await;
    assert_eq!(unknown.reason(), Reason::Reconciliation);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_misses_heartbeats_turns_unreachable_and_comes_back() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("silence").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(&offer, vec![shell_task("t", "exec sleep 600", 0.1, 32.0)])
        .await;
    fw.wait_update("t", TaskState::TaskRunning).await;
    // Silence, not a reset: only the heartbeat check can notice.
    cluster.agents[0].proxy.stall();
    let unreachable = fw.wait_update("t", TaskState::TaskUnreachable).await;
    assert!(
        unreachable.message.contains("missed its heartbeats"),
        "{}",
        unreachable.message
    );
    fw.updates.clear();
    cluster.agents[0].proxy.restore();
    fw.wait_update("t", TaskState::TaskRunning).await;
    cluster
        .wait_state("agent connected again", |s| {
            s.agents[0].state == "connected"
        })
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_offers_are_rescinded_after_the_offer_timeout() {
    let config = corral_master::MasterConfig {
        offer_timeout: Some(Duration::from_millis(300)),
        ..corral_tests::test_master_config()
    };
    let cluster = Cluster::start_with(config, 1).await;
    let mut fw = cluster.framework("slow").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.until("the offer rescinded", |f| {
        f.rescinded.contains(&offer.id).then_some(())
    })
    .await;
    // Its resources come back in a new offer.
    let again = fw.wait_offers().await;
    assert_ne!(again[0].id, offer.id);
    let m = cluster.metrics().await;
    assert!(
        metric_value(&m, r#"corral_master_offers_total{outcome="rescinded"}"#).unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_kills_the_frameworks_tasks_and_refuses_its_id() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("short-lived").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(&offer, vec![shell_task("t", "exec sleep 600", 0.1, 32.0)])
        .await;
    fw.wait_update("t", TaskState::TaskRunning).await;
    fw.teardown().await.expect("teardown");
    let s = cluster
        .wait_state("framework gone, task killed", |s| {
            s.frameworks.is_empty() && s.tasks.is_empty() && s.agents[0].used_resources.cpus == 0.0
        })
        .await;
    assert_eq!(s.completed_tasks[0].state, "TASK_KILLED");
    assert_eq!(s.completed_tasks[0].reason, "FRAMEWORK_REMOVED");
    // The process is gone too: the agent reports no live task.
    wait_for("agent has no task", WAIT, || async {
        let m = cluster.agent_metrics(0).await;
        (metric_value(&m, r#"corral_agent_tasks{state="TASK_RUNNING"}"#).unwrap_or(0.0) == 0.0)
            .then_some(())
    })
    .await;
    let info = corral_proto::pb::FrameworkInfo {
        id: fw.id.clone(),
        name: "again".into(),
        ..Default::default()
    };
    let err = corral_tests::TestFramework::subscribe_with(cluster.master, info)
        .await
        .err()
        .expect("a removed framework id is refused");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscription_with_the_same_id_takes_over_the_framework() {
    let cluster = Cluster::start(1).await;
    let info = corral_proto::pb::FrameworkInfo {
        name: "failover".into(),
        failover_timeout_seconds: 60.0,
        ..Default::default()
    };
    let mut first = corral_tests::TestFramework::subscribe_with(cluster.master, info.clone())
        .await
        .expect("subscribe");
    let offer = first.wait_offers().await.remove(0);
    first
        .launch(&offer, vec![shell_task("t", "exec sleep 600", 0.1, 32.0)])
        .await;
    first.wait_update("t", TaskState::TaskRunning).await;

    let mut second = corral_tests::TestFramework::subscribe_with(
        cluster.master,
        corral_proto::pb::FrameworkInfo {
            id: first.id.clone(),
            ..info
        },
    )
    .await
    .expect("re-subscribe");
    assert_eq!(second.id, first.id);
    first
        .until("the old stream told it was replaced", |f| {
            f.errors
                .iter()
                .any(|e| e.contains("failed over"))
                .then_some(())
        })
        .await;
    // The old stream id no longer works; the new one owns the task.
    assert_eq!(
        first.kill("t").await.expect_err("stale stream").code(),
        tonic::Code::FailedPrecondition
    );
    second.reconcile(vec![]).await.expect("reconcile");
    second.wait_update("t", TaskState::TaskRunning).await;
    second.kill("t").await.expect("kill");
    second.wait_update("t", TaskState::TaskKilled).await;
    cluster.shutdown().await;
}

fn offered_cpus<'a>(offers: impl IntoIterator<Item = &'a corral_proto::pb::Offer>) -> f64 {
    use corral_proto::pb::resource::Value;
    offers
        .into_iter()
        .flat_map(|o| &o.resources)
        .filter(|r| r.name == "cpus")
        .map(|r| match r.value {
            Some(Value::Scalar(v)) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_behind_an_unacknowledged_update_frees_its_resources_at_once() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("slow-to-ack").await;
    fw.auto_ack = false;
    let offer = fw.wait_offers().await.remove(0);
    // All the agent's cpus: cpus offered again means the task's came back.
    fw.launch(&offer, vec![shell_task("t", "true", 2.0, 2048.0)])
        .await;
    let running = fw.wait_update("t", TaskState::TaskRunning).await;
    // RUNNING is not acknowledged, so FINISHED waits on the agent; the
    // agent's TaskEnded notice frees the resources anyway.
    let offers = fw
        .until("the task's cpus offered again", |f| {
            (offered_cpus(&f.offers) > 0.0).then(|| f.offers.drain(..).collect::<Vec<_>>())
        })
        .await;
    assert_eq!(offered_cpus(&offers), 2.0);
    assert!(
        !fw.updates
            .iter()
            .any(|u| u.state() == TaskState::TaskFinished),
        "FINISHED went out before RUNNING was acknowledged: {:?}",
        fw.updates
    );
    let state = cluster.state().await;
    let t = state.tasks.iter().find(|t| t.id == "t").expect("task t");
    assert_eq!(
        t.state, "TASK_RUNNING",
        "the state changes with the update only"
    );
    assert_eq!(
        state.agents[0].used_resources.cpus, 0.0,
        "not held by the ended task"
    );
    assert_eq!(state.agents[0].offered_resources.cpus, 2.0);
    // Acknowledged: FINISHED follows, and nothing is freed twice.
    fw.acknowledge(&running).await.expect("ack");
    let finished = fw.wait_update("t", TaskState::TaskFinished).await;
    fw.acknowledge(&finished).await.expect("ack");
    fw.decline(offers.iter().map(|o| o.id.clone()).collect(), Some(0.0))
        .await
        .expect("decline");
    let again = fw
        .until("cpus offered after the decline", |f| {
            (offered_cpus(&f.offers) > 0.0).then(|| f.offers.drain(..).collect::<Vec<_>>())
        })
        .await;
    assert_eq!(offered_cpus(&again), 2.0, "offered once, not twice");
    cluster
        .wait_state("t retired", |s| s.tasks.is_empty())
        .await;
    cluster.shutdown().await;
}
