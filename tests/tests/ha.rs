//! High availability: three masters on etcd, one elected on a lease; a
//! killed leader is replaced and the new one serves offers; a paused
//! leader steps down when it resumes, without acting; and a master with an
//! older epoch is refused by agents and frameworks (the fence).
//!
//! Masters and agents run as child processes (this test binary
//! re-executed, [`corral_tests::process`]); the framework (the SDK driver)
//! runs in the test process and is given the list of masters, as agents
//! are. Needs Debian's `etcd-server`, root and cgroups; fails (never skips)
//! without them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_master::state::StateSnapshot;
use corral_proto::task::is_terminal;
use corral_sdk::SchedulerClient;
use corral_sdk::pb;
use corral_tests::ha::{
    Etcd, MasterProcess, MasterSpec, Seen, lock, master_list, start_framework, wait_for_leader,
};
use corral_tests::process::{AgentProcess, AgentSpec, child_main};
use corral_tests::{Cluster, Proxy, WAIT, metric_value, wait_for};
use tokio::task::JoinHandle;

const CHILD_ENTRY: &str = "child_entry_point_runs_only_when_re_executed";
const MASTERS: usize = 3;
const AGENTS: usize = 2;
const TASKS: usize = 4;

/// Runs only in a re-executed child.
#[test]
fn child_entry_point_runs_only_when_re_executed() {
    child_main();
}

/// The leader's `/state`, asked of `master` (a standby redirects).
async fn state_via(master: &MasterProcess) -> Option<StateSnapshot> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .ok()?;
    let url = format!("http://{}/state", master.address());
    http.get(url).send().await.ok()?.json().await.ok()
}

fn running(state: &StateSnapshot) -> usize {
    state
        .tasks
        .iter()
        .filter(|t| t.state == "TASK_RUNNING")
        .count()
}

/// Waits until the leader `masters[leader]` has every agent connected,
/// every task running and the framework connected.
async fn wait_for_cluster(masters: &[MasterProcess], leader: usize, what: &str) -> StateSnapshot {
    wait_for(what, WAIT, || async {
        let s = state_via(&masters[leader]).await?;
        let agents = s.agents.iter().filter(|a| a.state == "connected").count();
        let frameworks = s
            .frameworks
            .iter()
            .filter(|f| f.state == "connected")
            .count();
        (agents == AGENTS && running(&s) == TASKS && frameworks == 1).then_some(s)
    })
    .await
}

/// No task ended. (A new leader's reconciliation may report a task's
/// state from its registry, which can lag the old leader's last few
/// milliseconds, STAGING for RUNNING, with reason AGENT_RECOVERING until
/// the agent is back; that is not an end.)
fn assert_no_task_ended(seen: &Mutex<Seen>) {
    let seen = lock(seen);
    let ended: Vec<_> = seen
        .updates
        .iter()
        .filter(|u| is_terminal(u.state()))
        .map(|u| {
            (
                u.task_id.clone(),
                u.state().as_str_name(),
                u.message.clone(),
            )
        })
        .collect();
    assert!(ended.is_empty(), "tasks ended: {ended:?}");
}

async fn agent_counter(agent: &AgentProcess, name: &str) -> f64 {
    let text = agent.metrics().await.expect("agent metrics");
    metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Three masters on one etcd, two agents, the framework with its tasks
/// running.
struct Ha {
    _etcd: Etcd,
    masters: Vec<MasterProcess>,
    agents: Vec<AgentProcess>,
    client: SchedulerClient,
    seen: Arc<Mutex<Seen>>,
    driver: JoinHandle<()>,
    leader: usize,
    epoch: u64,
    _dir: tempfile::TempDir,
}

impl Ha {
    async fn start() -> Ha {
        let etcd = Etcd::start().await;
        let masters: Vec<MasterProcess> = (0..MASTERS)
            .map(|_| MasterProcess::spawn(CHILD_ENTRY, &MasterSpec::new(&etcd)))
            .collect();
        let (leader, epoch) = wait_for_leader(&masters, 0).await;
        let list = master_list(&masters);
        let dir = tempfile::tempdir().expect("temp dir");
        let agents: Vec<AgentProcess> = (0..AGENTS)
            .map(|i| {
                let spec = AgentSpec::in_dir(
                    dir.path(),
                    i,
                    list.clone(),
                    "cpus:2;mem:1024;disk:1024;ports:[31000-31099]",
                );
                AgentProcess::spawn(CHILD_ENTRY, &spec)
            })
            .collect();
        let (client, seen, driver) = start_framework(list, TASKS);
        wait_for_cluster(&masters, leader, "the tasks running on the first leader").await;
        Ha {
            _etcd: etcd,
            masters,
            agents,
            client,
            seen,
            driver,
            leader,
            epoch,
            _dir: dir,
        }
    }

    async fn stop(mut self) {
        self.client.stop();
        let _ = tokio::time::timeout(WAIT, self.driver).await;
        for agent in &mut self.agents {
            agent.stop();
        }
        for master in &mut self.masters {
            if master.is_running() {
                master.stop();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_the_new_one_serves_offers() {
    let mut ha = Ha::start().await;
    let framework_id = lock(&ha.seen).subscriptions[0].clone();

    let killed = Instant::now();
    ha.masters[ha.leader].kill9();
    let (leader, epoch) = wait_for_leader(&ha.masters, ha.epoch).await;
    assert_ne!(leader, ha.leader);
    let elected = killed.elapsed();
    let offered = wait_for("an offer from the new leader", WAIT, || async {
        let seen = lock(&ha.seen);
        seen.offers
            .iter()
            .find(|t| **t > killed)
            .map(|t| *t - killed)
    })
    .await;
    eprintln!(
        "leader killed: a new leader (epoch {} → {epoch}) in {elected:?}, its first offer after {offered:?}",
        ha.epoch
    );

    let state = wait_for_cluster(&ha.masters, leader, "everything back on the new leader").await;
    assert_eq!(state.epoch, epoch, "the leader's /state names its epoch");
    assert_eq!(state.frameworks.len(), 1);
    assert_eq!(state.frameworks[0].id, framework_id.to_string());
    assert_no_task_ended(&ha.seen);
    {
        let seen = lock(&ha.seen);
        assert!(
            seen.subscriptions.iter().all(|id| *id == framework_id),
            "the framework kept its id: {:?}",
            seen.subscriptions
        );
    }

    // The killed master comes back as a standby: it names the leader.
    let spec = ha.masters[ha.leader].spec.clone();
    ha.masters[ha.leader] = MasterProcess::spawn(CHILD_ENTRY, &spec);
    let back = &ha.masters[ha.leader];
    wait_for(
        "the restarted master serving as a standby",
        WAIT,
        || async {
            let text = back.metrics().await?;
            (metric_value(&text, "corral_master_elected")? == 0.0).then_some(())
        },
    )
    .await;
    let redirected = wait_for("the standby redirecting /state", WAIT, || async {
        state_via(back).await.filter(|s| s.epoch == epoch)
    })
    .await;
    assert_eq!(running(&redirected), TASKS);
    ha.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_steps_down_when_it_resumes_without_acting() {
    let ha = Ha::start().await;
    let old = ha.leader;
    let mut connections = Vec::new();
    for agent in &ha.agents {
        connections.push(agent_counter(agent, "corral_agent_master_connections_total").await);
    }

    // Paused for longer than its 1 s lease: a standby takes over, and
    // agents and the framework follow it.
    ha.masters[old].pause();
    let (leader, epoch) = wait_for_leader(&ha.masters, ha.epoch).await;
    assert_ne!(leader, old);
    wait_for_cluster(&ha.masters, leader, "everything on the new leader").await;
    let mut moved = Vec::new();
    for agent in &ha.agents {
        moved.push(agent_counter(agent, "corral_agent_master_connections_total").await);
    }
    for (before, after) in connections.iter().zip(&moved) {
        assert!(after > before, "every agent registered with the new leader");
    }

    // Resumed, the old leader finds its lease gone and steps down.
    ha.masters[old].resume();
    let old_master = &ha.masters[old];
    wait_for("the resumed master stepping down", WAIT, || async {
        let text = old_master.metrics().await?;
        let lost = metric_value(
            &text,
            "corral_master_leadership_lost_total{reason=\"lease\"}",
        )?;
        (metric_value(&text, "corral_master_elected")? == 0.0 && lost >= 1.0).then_some(())
    })
    .await;

    // It changed nothing: the new leader still leads with the same epoch,
    // every task still runs, no agent had to register again, and no task
    // ended.
    assert_eq!(wait_for_leader(&ha.masters, 0).await, (leader, epoch));
    let state = wait_for_cluster(&ha.masters, leader, "everything still on the new leader").await;
    assert_eq!(state.epoch, epoch);
    for (agent, before) in ha.agents.iter().zip(&moved) {
        let now = agent_counter(agent, "corral_agent_master_connections_total").await;
        assert_eq!(now, *before, "an agent registered again after the resume");
    }
    assert_no_task_ended(&ha.seen);
    ha.stop().await;
}

/// Copies the master's registry dir (the master is stopped).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the registry dir") {
        let entry = entry.expect("dir entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// A master on a stale copy of the registry (restored from a backup, or a
/// deposed leader) has a lower epoch than the one agents and frameworks
/// last saw: they refuse it, count it, and wait for the real leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_with_an_older_epoch_is_refused_by_agents_and_frameworks() {
    let mut cluster = Cluster::start(1).await;
    let proxy = Proxy::start(cluster.master).await;
    let (client, seen, driver) = start_framework(proxy.address.to_string(), 0);
    wait_for("subscribed", WAIT, || async {
        (!lock(&seen).subscriptions.is_empty()).then_some(())
    })
    .await;
    let real = cluster.master_config.clone();
    let real_dir = real.work_dir.clone().expect("a work dir");
    let stale_dir = cluster.dir.path().join("master-backup");

    // The backup holds epoch 1; the real registry goes on to epoch 3.
    cluster.stop_master().await;
    copy_dir(&real_dir, &stale_dir);
    for epoch in [2, 3] {
        cluster.start_master(real.clone()).await;
        proxy.retarget(cluster.master);
        let n = epoch - 1;
        wait_for(
            &format!("the framework subscribed to epoch {epoch}"),
            WAIT,
            || async { (lock(&seen).subscriptions.len() > n).then_some(()) },
        )
        .await;
        wait_for(&format!("the agent on epoch {epoch}"), WAIT, || async {
            let s = cluster.state().await;
            (s.epoch == epoch as u64 && s.agents.iter().any(|a| a.state == "connected"))
                .then_some(())
        })
        .await;
        cluster.stop_master().await;
    }

    // The master of the backup opens it at epoch 2: refused by both.
    let mut stale = real.clone();
    stale.work_dir = Some(stale_dir);
    cluster.start_master(stale).await;
    proxy.retarget(cluster.master);
    let subscriptions = lock(&seen).subscriptions.len();
    wait_for("the agent refusing the stale master", WAIT, || async {
        let text = cluster.agent_metrics(0).await;
        metric_value(&text, "corral_agent_stale_epoch_rejected_total").filter(|n| *n >= 1.0)
    })
    .await;
    wait_for("the framework refusing the stale master", WAIT, || async {
        (client.stale_epoch_rejected() >= 1).then_some(())
    })
    .await;
    assert_eq!(
        lock(&seen).subscriptions.len(),
        subscriptions,
        "the scheduler was never told it subscribed to the stale master"
    );
    cluster.stop_master().await;

    // The real registry again (epoch 4): both come back.
    cluster.start_master(real).await;
    proxy.retarget(cluster.master);
    wait_for("the framework back on the real master", WAIT, || async {
        (lock(&seen).subscriptions.len() > subscriptions).then_some(())
    })
    .await;
    wait_for("the agent back on the real master", WAIT, || async {
        let s = cluster.state().await;
        (s.epoch == 4 && s.agents.iter().any(|a| a.state == "connected")).then_some(())
    })
    .await;
    assert!(
        lock(&seen).updates.iter().all(|u| !is_terminal(u.state())),
        "no task ended"
    );
    client.stop();
    let _ = tokio::time::timeout(WAIT, driver).await;
    proxy.shutdown();
    cluster.shutdown().await;
}

/// The registry in etcd: a batch larger than etcd's transaction limits is
/// split and lands whole, a load pages through more keys than one page,
/// every kind of record round-trips, a deposed leader's write is refused,
/// and a corrupt record is named by its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_registry_splits_large_batches_and_fences_a_deposed_leader() {
    use corral_master::etcd::{EtcdRegistry, connect};
    use corral_master::registry::{
        AgentPhase, AgentRecord, Change, FrameworkRecord, RegistryError, TaskRecord, VolumeRecord,
    };

    let etcd = Etcd::start().await;
    let config = corral_master::EtcdConfig::parse(&etcd.registry_url()).expect("url");
    let mut client = connect(&config).await.expect("connect to etcd");
    let election = format!("{}/leader", config.prefix);
    let lease = client.lease_grant(30, None).await.expect("lease").id();
    let won = client
        .campaign(election.clone(), "test", lease)
        .await
        .expect("campaign");
    let key = won.leader().expect("a leader key").clone();
    let registry = EtcdRegistry::open(client.clone(), config.clone(), &key)
        .await
        .expect("open");
    let fence = corral_master::registry::Registry::fence(&registry);
    assert_eq!(fence.epoch, u64::try_from(key.rev()).expect("revision"));

    const TASKS: usize = 2_500;
    let task = |i: usize| TaskRecord {
        agent_id: "a1".into(),
        info: Some(pb::TaskInfo {
            task_id: format!("t{i}"),
            name: "x".repeat(200),
            ..Default::default()
        }),
        status: None,
    };
    let mut changes: Vec<Change> = (0..TASKS)
        .map(|i| Change::Task(("f1".into(), format!("t{i}")), Some(Box::new(task(i)))))
        .collect();
    changes.push(Change::Agent(
        "a1".into(),
        Some(AgentRecord {
            info: Some(pb::AgentInfo {
                id: "a1".into(),
                hostname: "h".into(),
                ..Default::default()
            }),
            phase: AgentPhase::Admitted as u32,
            since: 0.0,
            registered_at: 1.0,
        }),
    ));
    changes.push(Change::Framework(
        "f1".into(),
        Some(FrameworkRecord {
            info: Some(pb::FrameworkInfo {
                id: "f1".into(),
                failover_timeout_seconds: 60.0,
                ..Default::default()
            }),
            disconnected_at: Some(5.0),
            registered_at: 2.0,
        }),
    ));
    changes.push(Change::RemovedFramework("f0".into(), 7.5));
    changes.push(Change::Volume(
        ("f1".into(), "v1".into()),
        Some(VolumeRecord {
            agent_id: "a1".into(),
            disk_mib: 64.0,
        }),
    ));
    registry.apply_async(&changes).await.expect("a large batch");
    registry
        .apply_async(&[Change::Task(("f1".into(), "t0".into()), None)])
        .await
        .expect("a delete");
    let stored = registry.load_async().await.expect("load");
    assert_eq!(stored.tasks.len(), TASKS - 1);
    assert!(
        stored
            .tasks
            .iter()
            .all(|((f, t), _)| f == "f1" && t != "t0")
    );
    let t7 = stored
        .tasks
        .iter()
        .find(|((_, t), _)| t == "t7")
        .expect("t7");
    assert_eq!(t7.1, task(7));
    assert_eq!(stored.agents.len(), 1);
    assert_eq!(stored.frameworks[0].1.disconnected_at, Some(5.0));
    assert_eq!(stored.removed_frameworks, vec![("f0".to_string(), 7.5)]);
    assert_eq!(stored.volumes[0].1.disk_mib, 64.0);

    // Reopened by the same leader: the same registry id.
    let again = EtcdRegistry::open(client.clone(), config.clone(), &key)
        .await
        .expect("reopen");
    assert_eq!(
        corral_master::registry::Registry::fence(&again).registry_id,
        fence.registry_id
    );

    // Deposed (its key is gone): every write is refused.
    client
        .resign(Some(etcd_client::ResignOptions::new().with_leader(key)))
        .await
        .expect("resign");
    let refused = registry
        .apply_async(&[Change::RemovedFramework("f9".into(), 1.0)])
        .await
        .expect_err("a deposed leader's write");
    assert!(
        matches!(refused, RegistryError::Deposed { .. }),
        "{refused}"
    );
    assert!(
        refused.to_string().contains("no longer the leader"),
        "{refused}"
    );

    // A corrupt record is named by its key.
    client
        .put(
            format!("{}/registry/tasks/f1/bad", config.prefix),
            vec![0xff, 0xff, 0xff],
            None,
        )
        .await
        .expect("put");
    let lease = client.lease_grant(30, None).await.expect("lease").id();
    let won = client
        .campaign(election, "test", lease)
        .await
        .expect("campaign again");
    let next = EtcdRegistry::open(client, config, won.leader().expect("a leader key"))
        .await
        .expect("open");
    assert!(corral_master::registry::Registry::fence(&next).epoch > fence.epoch);
    let e = next.load_async().await.expect_err("a corrupt record");
    assert!(e.to_string().contains("tasks/f1/bad"), "{e}");
}
