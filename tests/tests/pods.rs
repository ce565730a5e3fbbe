//! Pods end to end: a real master and agent, LAUNCH_GROUP from a framework,
//! containers that share a network namespace (their own IP on the agent's
//! bridge) and volumes, the pod's restart policy, and cleanup of
//! namespaces, veths and the bridge. Needs root and /bin/busybox.

use corral_proto::pb::{self, TaskState};
use corral_tests::{Cluster, TestFramework, WAIT, empty_dir, http_get, pod_task, wait_for};

async fn launch_pod(
    fw: &mut TestFramework,
    policy: pb::PodRestartPolicy,
    tasks: Vec<pb::TaskInfo>,
) {
    let offer = fw.wait_offers().await.remove(0);
    let group = pb::TaskGroupInfo {
        tasks,
        volumes: vec![empty_dir("shared")],
        restart_policy: policy as i32,
    };
    fw.accept_group(vec![offer.id.clone()], &offer.agent_id, group)
        .await
        .expect("accept");
}

/// Pins, pod dirs and host veths the agent made for pods.
fn pod_leftovers(cluster: &Cluster) -> Vec<String> {
    let work = cluster.agent_work_dir(0);
    let mut left = Vec::new();
    for dir in ["netns", "pods"] {
        if let Ok(entries) = std::fs::read_dir(work.join(dir)) {
            left.extend(entries.flatten().map(|e| e.path().display().to_string()));
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_containers_share_localhost_and_a_volume_and_the_host_reaches_the_pod_ip() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("pods").await;
    launch_pod(
        &mut fw,
        pb::PodRestartPolicy::Never,
        vec![
            pod_task(
                "web",
                "echo hello > /data/index.html; exec busybox httpd -f -p 8080 -h /data",
            ),
            // Fetches from its neighbour over localhost, then leaves a file
            // in the shared volume for the web container to serve.
            pod_task(
                "client",
                "for i in $(seq 200); do busybox wget -q -O /data/fetched http://127.0.0.1:8080/index.html && break; sleep 0.05; done; \
                 echo from-client > /data/client.txt; exec sleep 600",
            ),
        ],
    )
    .await;
    let web = fw.wait_update("web", TaskState::TaskRunning).await;
    let client = fw.wait_update("client", TaskState::TaskRunning).await;
    let ip = web.pod.clone().expect("pod status").ip;
    let state = cluster.state().await;
    let shown: Vec<Option<String>> = state.tasks.iter().map(|t| t.pod_ip.clone()).collect();
    assert_eq!(shown, vec![Some(ip.clone()); 2], "/state shows the pod IP");
    assert_eq!(client.pod.expect("pod status").ip, ip, "one pod, one IP");
    assert!(ip.parse::<std::net::Ipv4Addr>().is_ok(), "pod ip {ip}");

    // From the host, at the pod's IP: what the client wrote into the shared
    // volume, and what it fetched from the web container over localhost.
    let written = wait_for("the client's file served at the pod IP", WAIT, || {
        http_get(&ip, 8080, "/client.txt")
    })
    .await;
    assert_eq!(written.trim(), "from-client");
    let fetched = http_get(&ip, 8080, "/fetched").await;
    assert_eq!(fetched.as_deref().map(str::trim), Some("hello"));

    // Killing one task kills the pod; then its network and volumes go.
    fw.kill("web").await.expect("kill");
    fw.wait_update("web", TaskState::TaskKilled).await;
    fw.wait_update("client", TaskState::TaskKilled).await;
    wait_for(
        "the pod's namespace, veth and volumes removed",
        WAIT,
        || async { pod_leftovers(&cluster).is_empty().then_some(()) },
    )
    .await;
    assert_eq!(http_get(&ip, 8080, "/client.txt").await, None);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_failure_restarts_a_failed_container_in_place_keeping_its_volume() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("restarts").await;
    launch_pod(
        &mut fw,
        pb::PodRestartPolicy::OnFailure,
        vec![
            // Fails the first time; runs once the volume remembers it.
            pod_task(
                "flaky",
                "if [ -f /data/once ]; then exec sleep 600; fi; touch /data/once; exit 3",
            ),
            pod_task("steady", "exec sleep 600"),
        ],
    )
    .await;
    let restarted = fw
        .until("flaky restarted", |f| {
            f.updates
                .iter()
                .find(|u| u.task_id == "flaky" && u.restart_count == 1)
                .cloned()
        })
        .await;
    assert_eq!(restarted.state(), TaskState::TaskRunning);
    assert!(
        restarted.message.contains("exited with status 3"),
        "{}",
        restarted.message
    );
    assert!(
        !fw.updates
            .iter()
            .any(|u| pb::TaskState::try_from(u.state).is_ok_and(corral_proto::task::is_terminal)),
        "nothing ended: {:?}",
        fw.updates
    );
    fw.kill("steady").await.expect("kill");
    fw.wait_update("flaky", TaskState::TaskKilled).await;
    fw.wait_update("steady", TaskState::TaskKilled).await;
    wait_for("the pod removed", WAIT, || async {
        pod_leftovers(&cluster).is_empty().then_some(())
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_fails_the_whole_pod_when_one_container_fails() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("never").await;
    launch_pod(
        &mut fw,
        pb::PodRestartPolicy::Never,
        vec![
            pod_task("good", "exec sleep 600"),
            pod_task("bad", "sleep 0.2; exit 2"),
        ],
    )
    .await;
    let bad = fw.wait_update("bad", TaskState::TaskFailed).await;
    assert_eq!(bad.exit_code, Some(2), "{bad:?}");
    let good = fw.wait_update("good", TaskState::TaskKilled).await;
    assert!(
        good.message.contains("another task of its pod failed"),
        "{}",
        good.message
    );
    wait_for("the pod removed", WAIT, || async {
        pod_leftovers(&cluster).is_empty().then_some(())
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_container_cannot_start_does_not_run_at_all() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("atomic").await;
    let mut broken = pod_task("broken", "unused");
    broken.command = Some(pb::CommandInfo {
        shell: false,
        value: "/bin/no-such-program".into(),
        ..Default::default()
    });
    launch_pod(
        &mut fw,
        pb::PodRestartPolicy::Always,
        vec![pod_task("fine", "exec sleep 600"), broken],
    )
    .await;
    let failed = fw.wait_update("broken", TaskState::TaskFailed).await;
    assert_eq!(failed.reason(), pb::Reason::ContainerLaunchFailed);
    assert!(
        failed.message.contains("no-such-program"),
        "{}",
        failed.message
    );
    let fine = fw.wait_terminal("fine").await;
    assert_eq!(fine.state(), TaskState::TaskKilled, "{fine:?}");
    wait_for("the pod removed", WAIT, || async {
        pod_leftovers(&cluster).is_empty().then_some(())
    })
    .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_by_its_liveness_check_restarts_by_the_pod_policy() {
    use pb::health_check::{Kind, Probe};
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("liveness").await;
    // Unhealthy on its first run, healthy once restarted.
    let mut task = pod_task(
        "app",
        "if [ -f /data/started ]; then touch /data/alive; fi; touch /data/started; exec sleep 600",
    );
    task.health_checks = vec![pb::HealthCheck {
        kind: Kind::Liveness as i32,
        probe: Some(Probe::Command(pb::CommandProbe {
            shell: true,
            value: "test -f /data/alive".into(),
            ..Default::default()
        })),
        interval_seconds: Some(0.2),
        consecutive_failures: Some(1),
        // Failures before the first pass count only after 2 s: a restarted
        // container gets that long to create the file, however slow the
        // machine (it restarted twice on a loaded CI run without it).
        grace_period_seconds: Some(2.0),
        ..Default::default()
    }];
    launch_pod(&mut fw, pb::PodRestartPolicy::Always, vec![task]).await;
    let healthy = fw
        .until("app healthy after one restart", |f| {
            f.updates
                .iter()
                .find(|u| u.task_id == "app" && u.healthy == Some(true))
                .cloned()
        })
        .await;
    assert_eq!(healthy.restart_count, 1, "{healthy:?}");
    let restarted = fw
        .updates
        .iter()
        .find(|u| u.task_id == "app" && u.restart_count == 1 && u.state() == TaskState::TaskRunning)
        .expect("a RUNNING update for the restart");
    assert!(
        restarted.message.contains("liveness probe failed"),
        "{}",
        restarted.message
    );
    assert!(
        !fw.updates.iter().any(|u| u.task_id == "app"
            && pb::TaskState::try_from(u.state).is_ok_and(corral_proto::task::is_terminal)),
        "the task never ended: {:?}",
        fw.updates
    );
    fw.kill("app").await.expect("kill");
    fw.wait_update("app", TaskState::TaskKilled).await;
    wait_for("the pod removed", WAIT, || async {
        pod_leftovers(&cluster).is_empty().then_some(())
    })
    .await;
    cluster.shutdown().await;
}
