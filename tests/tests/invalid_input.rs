//! Every invalid input gets its error, names the field, and changes no
//! state; a framework can never touch another framework's tasks.

use corral_proto::pb::{self, Reason, TaskState};
use corral_tests::{Cluster, TestFramework, shell_task};
use tonic::Code;

fn scalar(name: &str, v: f64) -> pb::Resource {
    pb::Resource {
        name: name.into(),
        value: Some(pb::resource::Value::Scalar(v)),
    }
}

/// What an invalid call must leave untouched.
async fn fingerprint(cluster: &Cluster) -> (Vec<(String, String)>, Vec<String>) {
    let s = cluster.state().await;
    let tasks = s
        .tasks
        .iter()
        .map(|t| (t.id.clone(), t.state.clone()))
        .collect();
    let used = s
        .agents
        .iter()
        .map(|a| format!("{:?}", (a.used_resources.cpus, a.used_resources.mem)))
        .collect();
    (tasks, used)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tasks_get_task_error_naming_the_field_and_change_nothing() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("validator").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![shell_task("keep", "exec sleep 600", 0.5, 64.0)],
    )
    .await;
    fw.wait_update("keep", TaskState::TaskRunning).await;
    let before = fingerprint(&cluster).await;

    let cases: Vec<(&str, Vec<pb::Resource>, &str)> = vec![
        (
            "neg",
            vec![scalar("cpus", -1.0), scalar("mem", 32.0)],
            "task.resources.cpus: must be >= 0",
        ),
        (
            "zero-cpus",
            vec![scalar("cpus", 0.0), scalar("mem", 32.0)],
            "task.resources.cpus: must be finite and > 0",
        ),
        (
            "zero-mem",
            vec![scalar("cpus", 0.1), scalar("mem", 0.0)],
            "task.resources.mem: must be finite and > 0",
        ),
        (
            "nan",
            vec![scalar("cpus", f64::NAN), scalar("mem", 32.0)],
            "task.resources.cpus: must be finite",
        ),
        (
            "inf",
            vec![scalar("cpus", 0.1), scalar("mem", f64::INFINITY)],
            "task.resources.mem: must be finite",
        ),
        (
            "huge",
            vec![scalar("cpus", 64.0), scalar("mem", 32.0)],
            "task.resources: cpus:64;mem:32 exceed",
        ),
        (
            "dup",
            vec![scalar("cpus", 0.1), scalar("mem", 32.0)],
            "task.task_id: 'keep' is already in use",
        ),
    ];
    for (id, resources, want) in cases {
        let offer = fw.wait_offers().await.remove(0);
        let task_id = if id == "dup" { "keep" } else { id };
        let mut task = shell_task(task_id, "true", 0.1, 32.0);
        task.resources = resources;
        task.agent_id = offer.agent_id.clone();
        fw.updates.clear();
        fw.accept(vec![offer.id.clone()], vec![task], Some(0.0))
            .await
            .expect("accept");
        let error = fw.wait_update(task_id, TaskState::TaskError).await;
        assert_eq!(error.reason(), Reason::TaskInvalid, "{id}");
        assert!(
            error.message.starts_with(want),
            "{id}: '{}' should start with '{want}'",
            error.message
        );
        assert_eq!(
            fingerprint(&cluster).await,
            before,
            "{id} changed the master's state"
        );
    }

    // Unknown ids in ids are refused on entry.
    let mut bad = shell_task("../etc", "true", 0.1, 32.0);
    let offer = fw.wait_offers().await.remove(0);
    bad.agent_id = offer.agent_id.clone();
    fw.accept(vec![offer.id.clone()], vec![bad], Some(0.0))
        .await
        .expect("accept");
    let error = fw.wait_update("../etc", TaskState::TaskError).await;
    assert!(
        error
            .message
            .starts_with("task.task_id: must not contain '/'"),
        "{}",
        error.message
    );

    // A bad filter is refused as a whole call.
    let offer = fw.wait_offers().await.remove(0);
    let err = fw
        .decline(vec![offer.id.clone()], Some(f64::NAN))
        .await
        .expect_err("NaN filter");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("filters.refuse_seconds"),
        "{}",
        err.message()
    );
    assert_eq!(fingerprint(&cluster).await, before);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_offers_drop_the_tasks_with_invalid_offers() {
    let cluster = Cluster::start(1).await;
    let mut a = cluster.framework("a").await;
    let offer = a.wait_offers().await.remove(0);

    // Unknown offer.
    let mut t = shell_task("x1", "true", 0.1, 32.0);
    t.agent_id = offer.agent_id.clone();
    a.accept(vec!["no-such-offer".into()], vec![t], None)
        .await
        .expect("accept");
    let dropped = a.wait_update("x1", TaskState::TaskDropped).await;
    assert_eq!(dropped.reason(), Reason::InvalidOffers);
    assert!(dropped.message.contains("unknown"), "{}", dropped.message);

    // Already used offer: the first accept consumes it.
    a.launch(&offer, vec![shell_task("ok", "exec sleep 600", 0.1, 32.0)])
        .await;
    let mut t = shell_task("x2", "true", 0.1, 32.0);
    t.agent_id = offer.agent_id.clone();
    a.accept(vec![offer.id.clone()], vec![t], None)
        .await
        .expect("accept");
    assert_eq!(
        a.wait_update("x2", TaskState::TaskDropped).await.reason(),
        Reason::InvalidOffers
    );
    a.wait_update("ok", TaskState::TaskRunning).await;
    let before = fingerprint(&cluster).await;

    // Another framework's offer.
    let mut b = cluster.framework("b").await;
    a.suppress().await.expect("suppress");
    let stolen = b.until("an offer for b", |f| f.offers.pop_front()).await;
    let mut t = shell_task("x3", "true", 0.1, 32.0);
    t.agent_id = stolen.agent_id.clone();
    a.accept(vec![stolen.id.clone()], vec![t], None)
        .await
        .expect("accept");
    let dropped = a.wait_update("x3", TaskState::TaskDropped).await;
    assert!(
        dropped.message.contains("another framework"),
        "{}",
        dropped.message
    );
    // b's offer is untouched by a's attempt: b can still use it.
    b.launch(&stolen, vec![shell_task("b1", "exec sleep 600", 0.1, 32.0)])
        .await;
    b.wait_update("b1", TaskState::TaskRunning).await;
    assert_eq!(fingerprint(&cluster).await.0.len(), before.0.len() + 1);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framework_cannot_kill_acknowledge_or_reconcile_another_frameworks_tasks() {
    let cluster = Cluster::start(1).await;
    let mut owner = cluster.framework("owner").await;
    owner.auto_ack = false;
    let offer = owner.wait_offers().await.remove(0);
    owner
        .launch(
            &offer,
            vec![shell_task("mine", "exec sleep 600", 0.1, 32.0)],
        )
        .await;
    let running = owner.wait_update("mine", TaskState::TaskRunning).await;
    owner.suppress().await.expect("suppress");

    let mut other = TestFramework::subscribe(cluster.master, "other", "*").await;
    other.kill("mine").await.expect("kill call is accepted");
    let unknown = other.wait_update("mine", TaskState::TaskUnknown).await;
    assert_eq!(unknown.reason(), Reason::TaskUnknown);
    other
        .reconcile(vec![("mine".into(), String::new())])
        .await
        .expect("reconcile");
    other
        .until("a second TASK_UNKNOWN", |f| {
            (f.updates
                .iter()
                .filter(|u| u.task_id == "mine" && u.state() == TaskState::TaskUnknown)
                .count()
                == 2)
                .then_some(())
        })
        .await;
    assert!(
        other
            .updates
            .iter()
            .all(|u| u.state() == TaskState::TaskUnknown),
        "other saw the real state"
    );
    // Acknowledging the owner's update from another framework does nothing:
    // the agent keeps resending it to the owner.
    other
        .acknowledge(&running)
        .await
        .expect("ack call is accepted");
    owner.updates.clear();
    let resent = owner.wait_update("mine", TaskState::TaskRunning).await;
    assert_eq!(resent.uuid, running.uuid);
    let s = cluster.state().await;
    assert_eq!(s.tasks[0].state, "TASK_RUNNING");

    // Calls with another framework's id but a stale stream id are refused.
    let mut forged = other.header().expect("header");
    forged.framework_id = owner.id.clone();
    let err = other
        .client
        .kill(pb::KillRequest {
            header: Some(forged),
            task_id: "mine".into(),
            ..Default::default()
        })
        .await
        .expect_err("forged header");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(cluster.state().await.tasks[0].state, "TASK_RUNNING");
    cluster.shutdown().await;
}

/// A pod launches all or nothing: one problem anywhere in it fails every
/// one of its tasks with TASK_ERROR naming the field, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_pod_fails_all_its_tasks_naming_the_field_and_changes_nothing() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("pods").await;
    let before = fingerprint(&cluster).await;
    let mount = |volume: &str| pb::Volume {
        pod_volume: volume.into(),
        container_path: "/data".into(),
        ..Default::default()
    };
    let with_mount = |id: &str, volume: &str| {
        let mut t = shell_task(id, "true", 0.1, 32.0);
        t.container = Some(pb::ContainerInfo {
            volumes: vec![mount(volume)],
            ..Default::default()
        });
        t
    };
    let empty_dir = |name: &str| pb::PodVolume {
        name: name.into(),
        source: Some(pb::pod_volume::Source::EmptyDir(pb::EmptyDirVolume {})),
    };
    let cases: Vec<(&str, pb::TaskGroupInfo, &str)> = vec![
        (
            "unknown-volume",
            pb::TaskGroupInfo {
                tasks: vec![
                    shell_task("a1", "true", 0.1, 32.0),
                    with_mount("a2", "cache"),
                ],
                volumes: vec![empty_dir("data")],
                ..Default::default()
            },
            "task_group.tasks[1].container.volumes[0].pod_volume: the pod has no volume named 'cache'",
        ),
        (
            "bad-resources",
            pb::TaskGroupInfo {
                tasks: vec![
                    shell_task("b1", "true", 0.1, 32.0),
                    shell_task("b2", "true", 0.0, 32.0),
                ],
                ..Default::default()
            },
            "task_group.tasks[1].resources.cpus: must be finite and > 0",
        ),
        (
            "too-big",
            pb::TaskGroupInfo {
                tasks: vec![
                    shell_task("c1", "true", 1.5, 32.0),
                    shell_task("c2", "true", 1.5, 32.0),
                ],
                ..Default::default()
            },
            "task_group: the pod's resources cpus:3;mem:64 exceed",
        ),
        (
            "duplicate-id",
            pb::TaskGroupInfo {
                tasks: vec![
                    shell_task("d1", "true", 0.1, 32.0),
                    shell_task("d1", "true", 0.1, 32.0),
                ],
                ..Default::default()
            },
            "task_group.tasks[1].task_id: 'd1' is used twice in the pod",
        ),
        (
            "bad-volume-name",
            pb::TaskGroupInfo {
                tasks: vec![shell_task("e1", "true", 0.1, 32.0)],
                volumes: vec![empty_dir("Data_1")],
                ..Default::default()
            },
            "task_group.volumes[0].name: 'Data_1' must be 1-63 lowercase",
        ),
    ];
    for (case, group, want) in cases {
        let offer = fw.wait_offers().await.remove(0);
        let ids: Vec<String> = group.tasks.iter().map(|t| t.task_id.clone()).collect();
        fw.updates.clear();
        fw.accept_group(vec![offer.id.clone()], &offer.agent_id, group)
            .await
            .expect("accept");
        for id in &ids {
            let error = fw.wait_update(id, TaskState::TaskError).await;
            assert_eq!(error.reason(), Reason::TaskInvalid, "{case}");
            assert!(
                error.message.starts_with(want),
                "{case}: '{}' should start with '{want}'",
                error.message
            );
        }
        assert_eq!(
            fingerprint(&cluster).await,
            before,
            "{case} changed the master's state"
        );
    }
    // A pod volume outside a pod is refused too.
    let offer = fw.wait_offers().await.remove(0);
    let mut lone = with_mount("lone", "data");
    lone.agent_id = offer.agent_id.clone();
    fw.accept(vec![offer.id.clone()], vec![lone], Some(0.0))
        .await
        .expect("accept");
    let error = fw.wait_update("lone", TaskState::TaskError).await;
    assert!(
        error.message.starts_with(
            "task.container.volumes[0].pod_volume: only the tasks of a pod (LaunchGroup) can mount pod volumes"
        ),
        "{}",
        error.message
    );
    cluster.shutdown().await;
}
