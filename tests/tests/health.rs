//! Health checks through the whole cluster: a real master, a real agent
//! (as root, tasks in containers) and a framework. The probes and their
//! decisions are tested in depth in `agent/tests/health.rs`; this proves
//! the wiring: what the framework is told, and what the master shows.

use corral_proto::pb::{
    self, Reason, TaskState,
    health_check::{Kind, Probe},
};
use corral_tests::{Cluster, metric_value, shell_task};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_its_liveness_check_is_reported_unhealthy_to_the_framework_and_master() {
    corral_tests::images::require_busybox();
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("health").await;
    let offer = fw.wait_offers().await.remove(0);
    // Serves an empty directory: GET /health is a 404, every time.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut task = shell_task(
        "sick",
        &format!("mkdir -p www && exec /bin/busybox httpd -f -p 127.0.0.1:{port} -h www"),
        0.1,
        32.0,
    );
    task.health_checks = vec![pb::HealthCheck {
        kind: Kind::Liveness as i32,
        probe: Some(Probe::Http(pb::HttpProbe {
            scheme: "http".into(),
            port: u32::from(port),
            path: "/health".into(),
        })),
        delay_seconds: Some(0.2),
        interval_seconds: Some(0.2),
        timeout_seconds: Some(2.0),
        consecutive_failures: Some(2),
        ..Default::default()
    }];
    fw.launch(&offer, vec![task]).await;

    let message =
        format!("liveness probe failed 2 times: GET http://127.0.0.1:{port}/health: status 404");
    let unhealthy = fw
        .until("sick RUNNING with healthy = false", |f| {
            f.updates
                .iter()
                .find(|u| {
                    u.task_id == "sick"
                        && u.state() == TaskState::TaskRunning
                        && u.healthy == Some(false)
                })
                .cloned()
        })
        .await;
    assert_eq!(
        (unhealthy.reason(), unhealthy.message.as_str()),
        (Reason::TaskHealthCheckStatusUpdated, message.as_str())
    );
    let failed = fw.wait_terminal("sick").await;
    assert_eq!(
        (
            failed.state(),
            failed.reason(),
            failed.healthy,
            failed.message.as_str()
        ),
        (
            TaskState::TaskFailed,
            Reason::TaskUnhealthy,
            Some(false),
            message.as_str()
        ),
        "{failed:?}"
    );

    cluster
        .wait_state("the master to show the task failed unhealthy", |s| {
            s.tasks.iter().chain(&s.completed_tasks).any(|t| {
                t.id == "sick"
                    && t.state == "TASK_FAILED"
                    && t.reason == "TASK_UNHEALTHY"
                    && t.healthy == Some(false)
                    && t.message == message
            })
        })
        .await;
    let master = cluster.metrics().await;
    assert_eq!(
        metric_value(
            &master,
            r#"corral_master_tasks_terminal_total{state="TASK_FAILED",reason="TASK_UNHEALTHY"}"#
        ),
        Some(1.0),
        "{master}"
    );
    let agent = cluster.agent_metrics(0).await;
    assert_eq!(
        metric_value(&agent, "corral_agent_tasks_unhealthy_killed_total"),
        Some(1.0),
        "{agent}"
    );
    assert_eq!(
        metric_value(
            &agent,
            r#"corral_agent_health_checks_total{kind="liveness",result="failure"}"#
        ),
        Some(2.0),
        "{agent}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_an_unusable_health_check_gets_task_error_naming_the_field() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("health-validation").await;
    let offer = fw.wait_offers().await.remove(0);
    let mut task = shell_task("bad-check", "exec sleep 600", 0.1, 32.0);
    task.health_checks = vec![pb::HealthCheck {
        kind: Kind::Readiness as i32,
        probe: Some(Probe::Tcp(pb::TcpProbe { port: 8080 })),
        interval_seconds: Some(0.0),
        ..Default::default()
    }];
    fw.launch(&offer, vec![task]).await;
    let error = fw.wait_update("bad-check", TaskState::TaskError).await;
    assert_eq!(
        (error.reason(), error.message.as_str()),
        (
            Reason::TaskInvalid,
            "task.health_checks[0].interval_seconds: must be finite and > 0"
        )
    );
    cluster.shutdown().await;
}

/// A pod has its own network namespace and IP: HTTP probes go to the pod's
/// IP, command probes run in its network namespace (localhost is the pod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_of_a_pod_task_reach_it_at_the_pod_ip_and_inside_its_network() {
    corral_tests::images::require_busybox();
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("pod-health").await;
    let offer = fw.wait_offers().await.remove(0);
    let mut web = shell_task(
        "pod-web",
        "mkdir -p www && echo ok > www/health && exec busybox httpd -f -p 8080 -h www",
        0.1,
        32.0,
    );
    let timing = |kind: Kind, probe: Probe| pb::HealthCheck {
        kind: kind as i32,
        probe: Some(probe),
        interval_seconds: Some(0.2),
        timeout_seconds: Some(2.0),
        consecutive_failures: Some(25),
        ..Default::default()
    };
    web.health_checks = vec![
        timing(
            Kind::Readiness,
            Probe::Http(pb::HttpProbe {
                scheme: "http".into(),
                port: 8080,
                path: "/health".into(),
            }),
        ),
        // Port 8080 exists only in the pod's network namespace.
        timing(
            Kind::Liveness,
            Probe::Command(pb::CommandProbe {
                shell: true,
                value: "busybox wget -q -O /dev/null http://127.0.0.1:8080/health".into(),
                arguments: Vec::new(),
            }),
        ),
    ];
    let group = pb::TaskGroupInfo {
        tasks: vec![web],
        volumes: Vec::new(),
        restart_policy: pb::PodRestartPolicy::Never as i32,
    };
    fw.accept_group(vec![offer.id.clone()], &offer.agent_id, group)
        .await
        .expect("accept");
    let running = fw.wait_update("pod-web", TaskState::TaskRunning).await;
    assert_eq!(running.ready, Some(false), "{running:?}");
    let verdicts = fw
        .until("pod-web healthy and ready", |f| {
            let last = f.updates.iter().rev().find(|u| u.task_id == "pod-web")?;
            (last.healthy == Some(true) && last.ready == Some(true)).then(|| last.clone())
        })
        .await;
    assert_eq!(verdicts.reason(), Reason::TaskHealthCheckStatusUpdated);
    cluster
        .wait_state("the master to show the pod task healthy and ready", |s| {
            s.tasks
                .iter()
                .any(|t| t.id == "pod-web" && t.healthy == Some(true) && t.ready == Some(true))
        })
        .await;
    fw.kill("pod-web").await.expect("kill");
    let killed = fw.wait_update("pod-web", TaskState::TaskKilled).await;
    assert_eq!((killed.healthy, killed.ready), (Some(true), Some(true)));
    cluster.shutdown().await;
}
