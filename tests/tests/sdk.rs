//! The Rust SDK against a real master and agent.

use std::collections::HashMap;
use std::time::Duration;

use corral_proto::task::is_terminal;
use corral_sdk::pb::{self, TaskState};
use corral_sdk::{
    Driver, DriverConfig, FrameworkId, OfferResources, Resources, Scheduler, SchedulerClient,
    TaskBuilder, TaskId, async_trait,
};
use corral_tests::{Cluster, Proxy, WAIT, metric_value, wait_for};
use tokio::sync::mpsc;

/// Launches `wanted` tasks running `command`, reports every update.
struct Runner {
    wanted: usize,
    command: String,
    per_task: Resources,
    launched: usize,
    updates: mpsc::UnboundedSender<pb::TaskStatus>,
    subscriptions: mpsc::UnboundedSender<FrameworkId>,
}

#[async_trait]
impl Scheduler for Runner {
    async fn subscribed(&mut self, _client: &SchedulerClient, framework_id: &FrameworkId) {
        let _ = self.subscriptions.send(framework_id.clone());
    }

    async fn offers(&mut self, client: &SchedulerClient, offers: Vec<pb::Offer>) {
        for offer in offers {
            let Ok(mut left) = OfferResources::from_offer(&offer) else {
                continue;
            };
            let mut tasks = Vec::new();
            while self.launched + tasks.len() < self.wanted && left.try_take(&self.per_task) {
                let id = TaskId::generated(format!("task-{}", self.launched + tasks.len()));
                tasks.push(
                    TaskBuilder::new(id)
                        .shell(self.command.as_str())
                        .resources(&self.per_task)
                        .build_for(&offer),
                );
            }
            let ids = [left.offer_id().clone()];
            if tasks.is_empty() {
                let _ = client.decline(&ids, None).await;
                continue;
            }
            self.launched += tasks.len();
            client.launch(&ids, tasks, None).await.expect("launch");
            if self.launched == self.wanted {
                let _ = client.suppress().await;
            }
        }
    }

    async fn status_update(&mut self, _client: &SchedulerClient, status: &pb::TaskStatus) {
        let _ = self.updates.send(status.clone());
    }
}

fn runner(
    wanted: usize,
    command: &str,
) -> (
    Runner,
    mpsc::UnboundedReceiver<pb::TaskStatus>,
    mpsc::UnboundedReceiver<FrameworkId>,
) {
    let (utx, urx) = mpsc::unbounded_channel();
    let (stx, srx) = mpsc::unbounded_channel();
    let r = Runner {
        wanted,
        command: command.into(),
        per_task: Resources::parse("cpus:0.1;mem:32").expect("resources"),
        launched: 0,
        updates: utx,
        subscriptions: stx,
    };
    (r, urx, srx)
}

async fn next_update(rx: &mut mpsc::UnboundedReceiver<pb::TaskStatus>) -> pb::TaskStatus {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("an update in time")
        .expect("scheduler alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_framework_runs_its_tasks_to_completion_and_tears_down() {
    let cluster = Cluster::start(2).await;
    let (scheduler, mut updates, _subs) = runner(5, "echo done");
    let info = pb::FrameworkInfo {
        name: "sdk".into(),
        ..Default::default()
    };
    let (driver, client) = Driver::new(DriverConfig::new(cluster.master.to_string(), info));
    let run = tokio::spawn(driver.run(scheduler));
    let mut finished: HashMap<String, TaskState> = HashMap::new();
    while finished.len() < 5 {
        let u = next_update(&mut updates).await;
        if is_terminal(u.state()) {
            finished.insert(u.task_id.clone(), u.state());
        }
    }
    assert!(
        finished.values().all(|s| *s == TaskState::TaskFinished),
        "{finished:?}"
    );
    // The driver acknowledged everything: the master retires all tasks.
    cluster
        .wait_state("all tasks retired", |s| {
            s.tasks.is_empty() && s.completed_tasks.len() == 5
        })
        .await;
    client.teardown().await.expect("teardown");
    tokio::time::timeout(WAIT, run)
        .await
        .expect("run ends")
        .expect("no panic")
        .expect("run ok");
    cluster
        .wait_state("framework removed", |s| s.frameworks.is_empty())
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_resubscribes_with_the_same_id_after_losing_its_connection() {
    let cluster = Cluster::start(1).await;
    let proxy = Proxy::start(cluster.master).await;
    let (scheduler, mut updates, mut subs) = runner(1, "exec sleep 600");
    let info = pb::FrameworkInfo {
        name: "sdk-failover".into(),
        failover_timeout_seconds: 60.0,
        ..Default::default()
    };
    let mut config = DriverConfig::new(proxy.address.to_string(), info);
    config.reconnect_backoff_initial = Duration::from_millis(50);
    config.reconnect_backoff_max = Duration::from_millis(200);
    let (driver, client) = Driver::new(config);
    let run = tokio::spawn(driver.run(scheduler));
    let first = tokio::time::timeout(WAIT, subs.recv())
        .await
        .expect("subscribed")
        .expect("id");
    loop {
        if next_update(&mut updates).await.state() == TaskState::TaskRunning {
            break;
        }
    }
    proxy.cut();
    // While cut, the master sees the framework disconnected but keeps its task.
    cluster
        .wait_state("framework disconnected", |s| {
            s.frameworks[0].state == "disconnected"
        })
        .await;
    assert_eq!(cluster.state().await.tasks[0].state, "TASK_RUNNING");
    proxy.restore();
    let again = tokio::time::timeout(WAIT, subs.recv())
        .await
        .expect("re-subscribed")
        .expect("id");
    assert_eq!(again, first);
    // The reconciliation after re-subscribing reports the running task.
    loop {
        let u = next_update(&mut updates).await;
        if u.reason() == pb::Reason::Reconciliation {
            assert_eq!(u.state(), TaskState::TaskRunning);
            break;
        }
    }
    wait_for("kill works after failover", WAIT, || async {
        client
            .kill(&TaskId::generated("task-0".into()), None)
            .await
            .ok()
    })
    .await;
    loop {
        if next_update(&mut updates).await.state() == TaskState::TaskKilled {
            break;
        }
    }
    client.teardown().await.expect("teardown");
    tokio::time::timeout(WAIT, run)
        .await
        .expect("run ends")
        .expect("no panic")
        .expect("run ok");
    cluster.shutdown().await;
}

/// Is an agent update (master-generated ones carry no uuid and need no ack).
fn from_agent(status: &pb::TaskStatus) -> bool {
    !status.uuid.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_explicit_acks_an_update_is_redelivered_until_the_scheduler_acknowledges_it() {
    let cluster = Cluster::start(1).await;
    let (scheduler, mut updates, _subs) = runner(1, "echo done");
    let info = pb::FrameworkInfo {
        name: "sdk-explicit-acks".into(),
        ..Default::default()
    };
    let mut config = DriverConfig::new(cluster.master.to_string(), info);
    config.implicit_acknowledgements = false;
    let (driver, client) = Driver::new(config);
    let run = tokio::spawn(driver.run(scheduler));

    let first = loop {
        let u = next_update(&mut updates).await;
        if from_agent(&u) {
            break u;
        }
    };
    // Nobody acknowledged it: the agent resends it (the harness retries
    // after 300 ms, doubling up to 2 s) and the driver delivers the copy.
    let again = loop {
        let u = next_update(&mut updates).await;
        if from_agent(&u) {
            break u;
        }
    };
    assert_eq!(again.uuid, first.uuid, "the same update, delivered again");
    assert_eq!(again.task_id, first.task_id);
    // The task's later updates queue behind the unacknowledged one.
    let metrics = cluster.agent_metrics(0).await;
    let pending = metric_value(&metrics, "corral_agent_status_updates_pending");
    assert!(pending >= Some(1.0), "{metrics}");

    // Acknowledge each update as it comes: the task advances to its end.
    // Copies of an acknowledged update may still be on their way; those are
    // acknowledged again, as an idempotent scheduler does.
    let mut acked = vec![first.uuid.clone()];
    client.acknowledge(&first).await.expect("acknowledge");
    loop {
        let u = next_update(&mut updates).await;
        if !from_agent(&u) {
            continue;
        }
        client.acknowledge(&u).await.expect("acknowledge");
        if !acked.contains(&u.uuid) {
            acked.push(u.uuid.clone());
            if is_terminal(u.state()) {
                assert_eq!(u.state(), TaskState::TaskFinished);
                break;
            }
        }
    }
    assert!(acked.len() >= 2, "a task has more than one update");

    // Every update acknowledged: the agent stops resending, the master
    // retires the task.
    wait_for("agent drained its pending updates", WAIT, || async {
        let m = cluster.agent_metrics(0).await;
        (metric_value(&m, "corral_agent_status_updates_pending") == Some(0.0)).then_some(())
    })
    .await;
    cluster
        .wait_state("task retired", |s| {
            s.tasks.is_empty() && s.completed_tasks.len() == 1
        })
        .await;
    client.teardown().await.expect("teardown");
    tokio::time::timeout(WAIT, run)
        .await
        .expect("run ends")
        .expect("no panic")
        .expect("run ok");
    cluster.shutdown().await;
}
