//! Persistent volumes end to end: a real master and agent, CreateVolume in
//! an Accept, pods that mount the volume one after another, DestroyVolume,
//! and what the master does with volumes when a framework goes or an agent
//! comes back. Needs root and /bin/busybox.

use corral_proto::pb::{self, TaskState};
use corral_tests::{Cluster, TestFramework, WAIT, metric_value, shell_task, wait_for};
use tonic::Code;

fn create(id: &str, disk_mib: f64) -> pb::Operation {
    pb::Operation {
        operation: Some(pb::operation::Operation::CreateVolume(pb::CreateVolume {
            volume_id: id.into(),
            disk_mib,
        })),
    }
}

/// A one-container pod (restart policy NEVER) that mounts the persistent
/// volume `volume` at /data and runs `command`.
fn pod(agent_id: &str, task_id: &str, volume: &str, command: &str) -> pb::Operation {
    let mut task = shell_task(task_id, command, 0.1, 32.0);
    task.agent_id = agent_id.to_string();
    task.container = Some(pb::ContainerInfo {
        volumes: vec![pb::Volume {
            pod_volume: "state".into(),
            container_path: "/data".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    pb::Operation {
        operation: Some(pb::operation::Operation::LaunchGroup(pb::LaunchGroup {
            task_group: Some(pb::TaskGroupInfo {
                tasks: vec![task],
                volumes: vec![pb::PodVolume {
                    name: "state".into(),
                    source: Some(pb::pod_volume::Source::Persistent(volume.into())),
                }],
                restart_policy: pb::PodRestartPolicy::Never as i32,
            }),
        })),
    }
}

/// Accepts `offer` with a create of `volume` and a pod that mounts it and
/// runs `command`.
async fn create_and_launch(
    fw: &mut TestFramework,
    offer: &pb::Offer,
    volume: &str,
    disk_mib: f64,
    task_id: &str,
    command: &str,
) {
    let operations = vec![
        create(volume, disk_mib),
        pod(&offer.agent_id, task_id, volume, command),
    ];
    fw.accept_operations(vec![offer.id.clone()], operations)
        .await
        .expect("accept");
}

/// Launches a pod mounting `volume` on `offer` and checks that the master
/// refuses it: TASK_ERROR with `expected` in the message.
async fn refused_pod(
    fw: &mut TestFramework,
    offer: &pb::Offer,
    task_id: &str,
    volume: &str,
    expected: &str,
) {
    let operations = vec![pod(&offer.agent_id, task_id, volume, "true")];
    fw.accept_operations(vec![offer.id.clone()], operations)
        .await
        .expect("accept");
    let refused = fw.wait_terminal(task_id).await;
    assert_eq!(refused.state(), TaskState::TaskError, "{refused:?}");
    assert!(refused.message.contains(expected), "{}", refused.message);
}

/// The next offer that `wanted` accepts; others are declined (so the agent's
/// resources come back in the next round).
async fn next_offer(fw: &mut TestFramework, wanted: impl Fn(&pb::Offer) -> bool) -> pb::Offer {
    for _ in 0..200 {
        for offer in fw.wait_offers().await {
            if wanted(&offer) {
                return offer;
            }
            fw.decline(vec![offer.id.clone()], Some(0.0))
                .await
                .expect("decline");
        }
    }
    panic!("no wanted offer in 200 rounds");
}

fn disk(offer: &pb::Offer) -> f64 {
    offer
        .resources
        .iter()
        .find(|r| r.name == "disk")
        .and_then(|r| match r.value {
            Some(pb::resource::Value::Scalar(v)) => Some(v),
            _ => None,
        })
        .unwrap_or(0.0)
}

/// Waits until the framework's outstanding offers (all from one agent)
/// hold `disk_mib` of disk together and, if given, list `volume`; returns
/// them. An agent's free resources can be spread over several offers.
async fn offers_holding(
    fw: &mut TestFramework,
    disk_mib: f64,
    volume: Option<&str>,
) -> Vec<pb::Offer> {
    offers_of(fw, None, disk_mib, volume).await
}

/// [`offers_holding`], from `agent` only when given (others are declined).
async fn offers_of(
    fw: &mut TestFramework,
    agent: Option<&str>,
    disk_mib: f64,
    volume: Option<&str>,
) -> Vec<pb::Offer> {
    let mut held: Vec<pb::Offer> = Vec::new();
    for _ in 0..200 {
        for offer in fw.wait_offers().await {
            if agent.is_none_or(|a| a == offer.agent_id) {
                held.push(offer);
            } else {
                let _ = fw.decline(vec![offer.id.clone()], Some(0.0)).await;
            }
        }
        held.retain(|o| !fw.rescinded.contains(&o.id));
        let total: f64 = held.iter().map(disk).sum();
        let listed = volume.is_none_or(|v| held.iter().any(|o| lists(o, v)));
        if total == disk_mib && listed {
            return held;
        }
    }
    panic!("the offers never held disk:{disk_mib} with volume {volume:?}");
}

fn ids(offers: &[pb::Offer]) -> Vec<String> {
    offers.iter().map(|o| o.id.clone()).collect()
}

fn lists(offer: &pb::Offer, volume: &str) -> bool {
    offer.volumes.iter().any(|v| v.id == volume)
}

fn finished(status: &pb::TaskStatus) {
    assert_eq!(status.state(), TaskState::TaskFinished, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_volume_keeps_its_data_from_one_pod_to_the_next_until_destroyed() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("volumes").await;
    let offer = fw.wait_offers().await.remove(0);
    assert_eq!(disk(&offer), 1024.0);
    // Create and mount in one call.
    create_and_launch(
        &mut fw,
        &offer,
        "data",
        64.0,
        "first",
        "echo one >> /data/log",
    )
    .await;
    finished(&fw.wait_terminal("first").await);

    // Free again: offers list it, and its disk stays out of them.
    let offers = offers_holding(&mut fw, 1024.0 - 64.0, Some("data")).await;
    let offer = offers.iter().find(|o| lists(o, "data")).unwrap();
    let listed = offer.volumes.iter().find(|v| v.id == "data").unwrap();
    assert_eq!(listed.agent_id, offer.agent_id);
    assert_eq!(listed.disk_mib, 64.0);
    // A second pod finds the first one's data.
    fw.accept_operations(
        ids(&offers),
        vec![pod(
            &offer.agent_id,
            "second",
            "data",
            "echo two >> /data/log; [ \"$(cat /data/log)\" = \"$(printf 'one\\ntwo')\" ]",
        )],
    )
    .await
    .expect("accept");
    finished(&fw.wait_terminal("second").await);
    let dir = cluster
        .agent_work_dir(0)
        .join("volumes")
        .join(&fw.id)
        .join("data");
    assert_eq!(
        std::fs::read_to_string(dir.join("log")).expect("the volume's file on the agent"),
        "one\ntwo\n"
    );

    let state = cluster.state().await;
    assert_eq!(state.volumes.len(), 1, "{:?}", state.volumes);
    assert_eq!(state.volumes[0].id, "data");
    assert_eq!(state.volumes[0].framework_id, fw.id);
    assert_eq!(state.volumes[0].in_use_by, None);
    assert_eq!(state.frameworks[0].used_resources.disk, 64.0);
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric_value(&metrics, "corral_master_persistent_volumes{state=\"free\"}"),
        Some(1.0)
    );

    // Destroy: the data goes, the disk comes back.
    fw.destroy_volume("data").await.expect("destroy");
    wait_for("the volume's directory removed", WAIT, || async {
        (!dir.exists()).then_some(())
    })
    .await;
    assert!(cluster.state().await.volumes.is_empty());
    let again = fw.destroy_volume("data").await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    offers_holding(&mut fw, 1024.0, None).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pod_at_a_time_mounts_a_persistent_volume_and_it_cannot_be_destroyed_in_use() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("volumes").await;
    let offer = fw.wait_offers().await.remove(0);
    create_and_launch(&mut fw, &offer, "db", 32.0, "server", "exec sleep 600").await;
    fw.wait_update("server", TaskState::TaskRunning).await;

    // In use: not listed in offers, a second pod is refused, no destroy.
    let offer = fw.wait_offers().await.remove(0);
    assert!(offer.volumes.is_empty(), "{:?}", offer.volumes);
    refused_pod(
        &mut fw,
        &offer,
        "intruder",
        "db",
        "task_group.volumes[0].persistent: persistent volume 'db' is in use by task server",
    )
    .await;
    let busy = fw.destroy_volume("db").await.unwrap_err();
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");
    assert!(busy.message().contains("in use by task server"), "{busy:?}");
    let state = cluster.state().await;
    assert_eq!(state.volumes[0].in_use_by.as_deref(), Some("server"));

    // Once the pod is gone it can go.
    fw.kill("server").await.expect("kill");
    fw.wait_update("server", TaskState::TaskKilled).await;
    fw.destroy_volume("db")
        .await
        .expect("destroy after the pod ended");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_create_fails_the_whole_accept_naming_the_field_and_leaves_the_offer() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("volumes").await;
    let offer = fw.wait_offers().await.remove(0);
    let cases: Vec<(Vec<pb::Operation>, &str)> = vec![
        (
            vec![create("", 1.0)],
            "operations[0].create_volume.volume_id: must not be empty",
        ),
        (
            vec![create("a/b", 1.0)],
            "operations[0].create_volume.volume_id: must not contain '/'",
        ),
        (
            vec![create("v", 0.0)],
            "operations[0].create_volume.disk_mib: must be finite and > 0",
        ),
        (
            vec![create("v", f64::NAN)],
            "operations[0].create_volume.disk_mib: must be finite and > 0",
        ),
        (
            vec![create("v", 4096.0)],
            "operations[0].create_volume.disk_mib: the call's volumes need disk:4096 but the offers have disk:1024",
        ),
        (
            vec![create("v", 1.0), create("v", 1.0)],
            "operations[1].create_volume.volume_id: 'v' is created twice in this call",
        ),
    ];
    for (operations, expected) in cases {
        let e = fw
            .accept_operations(vec![offer.id.clone()], operations)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(expected),
            "{} / {expected}",
            e.message()
        );
    }
    assert!(cluster.state().await.volumes.is_empty());

    // The offer is still good, and nothing happened.
    fw.accept_operations(vec![offer.id.clone()], vec![create("v", 8.0)])
        .await
        .expect("the same offer, a good create");
    let offer = next_offer(&mut fw, |o| lists(o, "v")).await;
    let taken = fw
        .accept_operations(vec![offer.id.clone()], vec![create("v", 8.0)])
        .await
        .unwrap_err();
    assert!(
        taken
            .message()
            .contains("operations[0].create_volume.volume_id: the framework already has a persistent volume 'v'"),
        "{taken:?}"
    );
    // A pod naming a volume the framework does not have is refused.
    refused_pod(
        &mut fw,
        &offer,
        "lost",
        "nope",
        "task_group.volumes[0].persistent: the framework has no persistent volume 'nope'",
    )
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_framework_s_volumes_are_destroyed_with_their_data() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("volumes").await;
    let offer = fw.wait_offers().await.remove(0);
    create_and_launch(&mut fw, &offer, "cache", 16.0, "writer", "echo x > /data/x").await;
    finished(&fw.wait_terminal("writer").await);
    let dir = cluster
        .agent_work_dir(0)
        .join("volumes")
        .join(&fw.id)
        .join("cache");
    assert!(dir.join("x").exists(), "the pod wrote into the volume");

    fw.teardown().await.expect("teardown");
    wait_for("the volume's directory removed", WAIT, || async {
        (!dir.exists()).then_some(())
    })
    .await;
    assert!(cluster.state().await.volumes.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_comes_back_brings_its_volumes_and_the_master_offers_them_again() {
    let mut cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("volumes").await;
    let offer = fw.wait_offers().await.remove(0);
    create_and_launch(
        &mut fw,
        &offer,
        "data",
        64.0,
        "first",
        "echo kept > /data/file",
    )
    .await;
    finished(&fw.wait_terminal("first").await);

    // The agent stops; a new one starts on the same work dir.
    let work_dir = cluster.agent_work_dir(0);
    cluster.agents.remove(0).stop().await;
    let mut config = cluster.agent_config("cpus:2;mem:2048;disk:1024;ports:[31000-31099]", "");
    config.work_dir = work_dir;
    cluster.add_agent_with(config).await;
    // Its checkpoint brings it back as the same agent (agent recovery).
    wait_for("the agent to register again", WAIT, || async {
        metric_value(
            &cluster.agent_metrics(0).await,
            "corral_agent_master_connections_total",
        )
        .filter(|n| *n >= 1.0)
    })
    .await;
    let state = cluster
        .wait_state("the agent connected again", |s| {
            s.agents.len() == 1 && s.agents[0].state == "connected"
        })
        .await;
    let agent = state.agents[0].id.clone();
    // Offers made before the restart may still be in flight, rescinded
    // behind them: a launch on one is dropped (INVALID_OFFERS), and then
    // the next offers are the agent's new ones.
    let mut ran = None;
    for attempt in 0..5 {
        let offers = offers_of(&mut fw, Some(&agent), 1024.0 - 64.0, Some("data")).await;
        let offer = offers.iter().find(|o| lists(o, "data")).unwrap();
        let listed = offer.volumes.iter().find(|v| v.id == "data").unwrap();
        assert_eq!(listed.agent_id, agent, "offered with the agent it is on");
        let task_id = format!("second-{attempt}");
        let check = "[ \"$(cat /data/file)\" = kept ]";
        let operations = vec![pod(&agent, &task_id, "data", check)];
        fw.accept_operations(ids(&offers), operations)
            .await
            .expect("accept");
        let status = fw.wait_terminal(&task_id).await;
        if status.reason() != pb::Reason::InvalidOffers {
            ran = Some(status);
            break;
        }
    }
    finished(&ran.expect("a launch on fresh offers within 5 tries"));
    cluster.shutdown().await;
}
