//! The service framework against a real cluster (master, agents running
//! containers as root): replacement of failed and unhealthy instances,
//! rolling updates that keep the healthy minimum and roll back a broken
//! version, `hostname unique` placement, the README's Kubernetes Pod
//! manifest, persistent volumes that outlive pods (and the framework's
//! crash) and go with the service, and errors of the real API. Rollout rules in depth are tested
//! on the pure core in `frameworks/service/src/core/tests.rs`.

use std::path::Path;
use std::time::Duration;

use corral_proto::pb;
use corral_service::k8s::QUICKSTART_MANIFEST;
use corral_tests::images::{self, Config};
use corral_tests::service::{TestService, healthy, running};
use corral_tests::{Cluster, http_get, metric_value, wait_for};

const LONG: Duration = Duration::from_secs(60);

/// A task service whose instances run until the file `kill-<instance>`
/// appears in `dir`, then exit 3: a failure the test causes on purpose.
fn killable(name: &str, instances: u32, dir: &Path, extra: &str) -> String {
    format!(
        r#"
name = "{name}"
instances = {instances}
{extra}
[restart]
backoff = "0.2s"
factor = 1.15
max_backoff = "2s"

[task]
command = "while [ ! -e {dir}/kill-$CORRAL_INSTANCE ]; do sleep 0.1; done; exit 3"
cpus = 0.1
mem = 16
"#,
        dir = dir.display()
    )
}

fn numbers(status: &pb::ServiceStatus) -> Vec<u32> {
    running(status).iter().map(|i| i.number).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_instance_is_replaced_and_the_service_returns_to_3() {
    let cluster = Cluster::start(1).await;
    let service = TestService::start(&cluster, cluster.dir.path().join("service")).await;
    let dir = cluster.dir.path();
    let applied = service
        .apply_toml(&killable("web", 3, dir, ""))
        .await
        .expect("apply");
    assert_eq!(
        applied.outcome(),
        pb::apply_service_response::Outcome::Created
    );
    assert_eq!(applied.version, 1);
    let before = service
        .wait_status("web", "3 running", LONG, |s| running(s).len() == 3)
        .await;
    assert_eq!(before.instances_running, 3);
    let victim = numbers(&before)[0];
    std::fs::write(dir.join(format!("kill-{victim}")), b"").expect("signal file");

    let after = service
        .wait_status(
            "web",
            "3 running again, the failed one replaced",
            LONG,
            |s| {
                let n = numbers(s);
                n.len() == 3 && !n.contains(&victim) && s.instances.len() == 3
            },
        )
        .await;
    let new: Vec<u32> = numbers(&after)
        .into_iter()
        .filter(|n| !numbers(&before).contains(n))
        .collect();
    assert_eq!(new.len(), 1, "one new instance: {after:?}");
    assert!(new[0] > 3, "instance numbers are never reused: {after:?}");
    let metrics = service.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "corral_service_tasks_ended_total{state=\"TASK_FAILED\",reason=\"REASON_COMMAND_FAILED\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "corral_service_instances{state=\"healthy\"}"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "corral_service_instance_launches_total"),
        Some(4.0),
        "{metrics}"
    );
    // Complete again: offers are suppressed.
    wait_for("offers suppressed", LONG, || async {
        let state = cluster.state().await;
        let fw = state
            .frameworks
            .iter()
            .find(|f| f.name == "corral-service")?;
        (fw.suppressed && fw.offers == 0).then_some(())
    })
    .await;

    // Delete kills every instance, then the service is forgotten.
    service
        .client
        .clone()
        .delete(pb::DeleteServiceRequest { name: "web".into() })
        .await
        .expect("delete");
    wait_for("web forgotten", LONG, || async {
        (service.get("web").await.err()?.code() == tonic::Code::NotFound).then_some(())
    })
    .await;
    cluster
        .wait_state("no tasks left", |s| s.tasks.is_empty())
        .await;
    service.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_liveness_probe_gets_the_instance_replaced() {
    let cluster = Cluster::start(1).await;
    let service = TestService::start(&cluster, cluster.dir.path().join("service")).await;
    service
        .apply_toml(
            r#"
name = "sick"
instances = 1

[restart]
backoff = "0.2s"

[task]
command = "exec sleep 600"
cpus = 0.1
mem = 16

[[task.health_checks]]
kind = "liveness"
command = "test -f /tmp/never-there"
interval = "0.3s"
timeout = "1s"
consecutive_failures = 2
"#,
        )
        .await
        .expect("apply");
    let first = service
        .wait_status("sick", "an instance launched", LONG, |s| {
            !s.instances.is_empty()
        })
        .await;
    let first_task = first.instances[0].task_ids[0].clone();
    let first_number = first.instances[0].number;
    service
        .wait_status("sick", "the unhealthy instance replaced", LONG, |s| {
            s.instances.iter().any(|i| i.number > first_number)
        })
        .await;
    let state = cluster
        .wait_state("the first task ended", |s| {
            s.completed_tasks.iter().any(|t| t.id == first_task)
        })
        .await;
    let ended = state
        .completed_tasks
        .iter()
        .find(|t| t.id == first_task)
        .expect("ended task");
    assert_eq!(ended.state, "TASK_FAILED", "{ended:?}");
    assert!(ended.reason.contains("UNHEALTHY"), "{ended:?}");
    let metrics = service.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "corral_service_tasks_ended_total{state=\"TASK_FAILED\",reason=\"REASON_TASK_UNHEALTHY\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    service.stop().await;
    cluster.shutdown().await;
}

/// A 3-instance service with a readiness check; `env` makes the version.
fn rolling(version: &str, liveness: &str) -> String {
    format!(
        r#"
name = "roll"
instances = 3

[restart]
backoff = "0.2s"
max_backoff = "1s"

[update]
max_surge = 1
max_unavailable = 0
min_healthy_time = "0.5s"
progress_deadline = "60s"
auto_rollback = true

[task]
command = "exec sleep 600"
cpus = 0.1
mem = 16
env = {{ V = "{version}" }}

[[task.health_checks]]
kind = "readiness"
command = "true"
interval = "0.3s"
timeout = "1s"
{liveness}
"#
    )
}

/// Polls the service until `done` holds, asserting on every status that at
/// least 3 instances are running and healthy (none being killed).
async fn roll_until(
    service: &TestService,
    what: &str,
    done: impl Fn(&pb::ServiceStatus) -> bool,
) -> pb::ServiceStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut polls = 0u32;
    loop {
        let status = service.get("roll").await.expect("get");
        let ok = healthy(&status).len();
        assert!(ok >= 3, "{what}: only {ok} healthy instances: {status:?}");
        polls += 1;
        if done(&status) {
            assert!(polls > 1, "{what}: done at once, nothing observed");
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: timed out; last status {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_keeps_3_healthy_and_a_failing_version_is_rolled_back() {
    let cluster = Cluster::start(1).await;
    let service = TestService::start(&cluster, cluster.dir.path().join("service")).await;
    service
        .apply_toml(&rolling("1", ""))
        .await
        .expect("apply v1");
    service
        .wait_status("roll", "3 available on v1", LONG, |s| {
            // Available, not only healthy: a rollout first kills old
            // instances that are not available yet (they cost nothing).
            s.instances.len() == 3 && s.instances.iter().all(|i| i.available)
        })
        .await;

    let applied = service
        .apply_toml(&rolling("2", ""))
        .await
        .expect("apply v2");
    assert_eq!(
        applied.outcome(),
        pb::apply_service_response::Outcome::Updated
    );
    assert_eq!(applied.version, 2);
    let v2 = roll_until(&service, "rollout to v2", |s| {
        s.deployment.is_none()
            && s.instances.len() == 3
            && s.instances.iter().all(|i| i.version == 2)
    })
    .await;
    assert_eq!(v2.version, 2);
    assert_eq!(healthy(&v2).len(), 3, "{v2:?}");

    // v3 fails its liveness check: its instances die, the rollout fails
    // after 3 of them and v2 comes back — with 3 healthy throughout.
    let broken = "[[task.health_checks]]\nkind = \"liveness\"\ncommand = \"false\"\n\
                  interval = \"0.3s\"\ntimeout = \"1s\"\nconsecutive_failures = 1\n";
    let applied = service
        .apply_toml(&rolling("3", broken))
        .await
        .expect("apply v3");
    assert_eq!(applied.version, 3);
    let back = roll_until(&service, "rollback to v2", |s| {
        s.version == 2
            && s.deployment.is_none()
            && s.instances.len() == 3
            && s.instances.iter().all(|i| i.version == 2)
    })
    .await;
    assert!(
        back.message.starts_with("rolled back to version 2: "),
        "{}",
        back.message
    );
    let env = match back.spec.as_ref().and_then(|s| s.template.as_ref()) {
        Some(pb::service_spec::Template::Task(t)) => t.env.get("V").cloned(),
        _ => None,
    };
    assert_eq!(env.as_deref(), Some("2"));
    let metrics = service.metrics().await;
    for (outcome, n) in [("completed", 2.0), ("rolled_back", 1.0)] {
        assert_eq!(
            metric_value(
                &metrics,
                &format!("corral_service_rollouts_total{{outcome=\"{outcome}\"}}")
            ),
            Some(n),
            "{outcome}: {metrics}"
        );
    }
    service.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostname_unique_places_at_most_one_instance_per_agent() {
    let cluster = Cluster::start(2).await;
    let service = TestService::start(&cluster, cluster.dir.path().join("service")).await;
    service
        .apply_toml(
            r#"
name = "spread"
instances = 3
constraints = ["hostname unique"]

[task]
command = "exec sleep 600"
cpus = 0.1
mem = 16
"#,
        )
        .await
        .expect("apply");
    let status = service
        .wait_status("spread", "2 running, the third unplaceable", LONG, |s| {
            running(s).len() == 2 && !s.unplaced.is_empty()
        })
        .await;
    let mut hosts: Vec<&str> = status
        .instances
        .iter()
        .map(|i| i.hostname.as_str())
        .collect();
    hosts.sort_unstable();
    assert_eq!(hosts, ["agent0", "agent1"], "{status:?}");
    assert!(status.unplaced.contains("hostname"), "{}", status.unplaced);
    // It stays that way: no third instance appears on either agent. An
    // absence cannot be awaited; 2 s are 20 allocation rounds (offers the
    // declined filter of 1 s lets through again).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = service.get("spread").await.expect("get");
    assert_eq!(later.instances.len(), 2, "{later:?}");
    service.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_pod_manifest_runs_and_its_pod_ip_answers_http() {
    let cluster = Cluster::start(1).await;
    let archive = cluster.dir.path().join("busybox.tar");
    images::write_oci_archive(
        &archive,
        &[images::busybox_layer()],
        &Config::default(),
        "latest",
    );
    cluster.import_image(0, &archive, "busybox:latest").await;
    let service = TestService::start(&cluster, cluster.dir.path().join("service")).await;
    let applied = service
        .apply_manifest(QUICKSTART_MANIFEST)
        .await
        .expect("apply the quickstart manifest");
    assert_eq!(applied.name, "hello");
    let status = service
        .wait_status(
            "hello",
            "both containers running with a pod IP",
            LONG,
            |s| running(s).len() == 1 && !s.instances[0].pod_ip.is_empty(),
        )
        .await;
    let instance = &status.instances[0];
    assert_eq!(instance.task_ids.len(), 2, "{instance:?}");
    let page = wait_for("the pod IP answers HTTP", LONG, || {
        http_get(&instance.pod_ip, 8080, "/index.html")
    })
    .await;
    assert!(page.starts_with("hello from "), "{page}");
    let state = cluster.state().await;
    for id in &instance.task_ids {
        let task = state.tasks.iter().find(|t| &t.id == id).expect("task");
        assert_eq!(task.state, "TASK_RUNNING", "{task:?}");
    }
    // Delete it: its pod (netns, veth, volumes) goes with it.
    service
        .client
        .clone()
        .delete(pb::DeleteServiceRequest {
            name: "hello".into(),
        })
        .await
        .expect("delete");
    cluster
        .wait_state("pod tasks gone", |s| s.tasks.is_empty())
        .await;
    service.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_names_unsupported_manifest_fields_and_invalid_spec_fields() {
    let cluster = Cluster::start(1).await;
    let service = TestService::start(&cluster, cluster.dir.path().join("service")).await;
    let manifest = QUICKSTART_MANIFEST
        .replace("spec:\n", "spec:\n  hostNetwork: true\n  nodeSelector:\n    disk: ssd\n")
        .replace(
            "      image: busybox:latest\n      command: [\"/bin/httpd\"",
            "      image: busybox:latest\n      securityContext:\n        privileged: true\n      command: [\"/bin/httpd\"",
        );
    let e = service
        .apply_manifest(&manifest)
        .await
        .expect_err("unsupported fields must be refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    for field in [
        "spec.hostNetwork",
        "spec.nodeSelector",
        "spec.containers[0].securityContext",
    ] {
        assert!(
            e.message().contains(field),
            "{field} not named: {}",
            e.message()
        );
    }

    let e = service
        .apply_toml(
            "name = \"bad\"\ninstances = 1\n[task]\ncommand = \"true\"\ncpus = -1\nmem = 16\n",
        )
        .await
        .expect_err("negative cpus");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("service.task.cpus"), "{}", e.message());

    let e = service.get("nope").await.expect_err("unknown service");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = service
        .client
        .clone()
        .scale(pb::ScaleServiceRequest {
            name: "a/b".into(),
            instances: 1,
        })
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("name"), "{}", e.message());
    // Nothing was created.
    let list = service
        .client
        .clone()
        .list(pb::ListServicesRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(list.services.is_empty(), "{list:?}");
    service.stop().await;
    cluster.shutdown().await;
}

/// A one-instance pod service `diary` whose container appends
/// `hello-<instance>` to `/data/log` on its persistent volume `data`, then
/// runs until the file `kill-<instance>` appears in `dir` and exits 3; its
/// pod fails with it (restart policy Never), so the instance is replaced.
fn diary(dir: &Path) -> String {
    format!(
        r#"
name = "diary"
instances = 1

[restart]
backoff = "0.2s"

[pod]
restart_policy = "Never"

[[pod.containers]]
name = "writer"
command = ["/bin/sh", "-c", "echo hello-$CORRAL_INSTANCE >> /data/log; while [ ! -e {dir}/kill-$CORRAL_INSTANCE ]; do sleep 0.1; done; exit 3"]
cpus = 0.1
mem = 16
volume_mounts = [{{ name = "data", path = "/data" }}]

[[pod.volumes]]
name = "data"
persistent = {{ size = 64 }}
"#,
        dir = dir.display()
    )
}

/// The data directory of the service framework's volume `volume_id` on
/// agent 0 (`<work_dir>/volumes/<framework_id>/<volume_id>`).
async fn volume_dir(cluster: &Cluster, volume_id: &str) -> std::path::PathBuf {
    let state = cluster
        .wait_state("the service framework registered", |s| {
            s.frameworks.iter().any(|f| f.name == "corral-service")
        })
        .await;
    let framework = state
        .frameworks
        .iter()
        .find(|f| f.name == "corral-service")
        .expect("service framework");
    cluster
        .agent_work_dir(0)
        .join("volumes")
        .join(&framework.id)
        .join(volume_id)
}

/// Waits until `path` reads `want`; panics with what it read last.
async fn wait_file(path: &Path, want: &str) {
    let result = tokio::time::timeout(
        LONG + Duration::from_secs(1),
        wait_for(
            &format!("{} reads {want:?}", path.display()),
            LONG,
            || async { (std::fs::read_to_string(path).ok()? == want).then_some(()) },
        ),
    )
    .await;
    if result.is_err() {
        panic!(
            "{} never read {want:?}; it reads {:?}",
            path.display(),
            std::fs::read_to_string(path)
        );
    }
}

/// The running instance of `diary` once it is not `before` any more.
async fn running_after(service: &TestService, before: u32) -> pb::ServiceInstance {
    let status = service
        .wait_status(
            "diary",
            &format!("an instance after {before} running"),
            LONG,
            |s| running(s).iter().any(|i| i.number > before),
        )
        .await;
    running(&status)
        .into_iter()
        .find(|i| i.number > before)
        .cloned()
        .expect("running instance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_volumes_data_survives_the_pod_being_replaced() {
    let cluster = Cluster::start(1).await;
    let service = TestService::start(&cluster, cluster.dir.path().join("service")).await;
    let dir = cluster.dir.path();
    service.apply_toml(&diary(dir)).await.expect("apply");
    let first = running_after(&service, 0).await;
    assert_eq!(first.volumes, vec!["data-diary-0"], "{first:?}");
    let log = volume_dir(&cluster, "data-diary-0").await.join("log");
    wait_file(&log, &format!("hello-{}\n", first.number)).await;

    // The pod fails; its replacement mounts the same volume and finds the
    // first pod's line there.
    std::fs::write(dir.join(format!("kill-{}", first.number)), b"").expect("signal file");
    let second = running_after(&service, first.number).await;
    assert_eq!(second.volumes, first.volumes, "{second:?}");
    assert_eq!(second.agent_id, first.agent_id);
    wait_file(
        &log,
        &format!("hello-{}\nhello-{}\n", first.number, second.number),
    )
    .await;
    let state = cluster.state().await;
    assert_eq!(
        state.volumes.len(),
        1,
        "one volume, not one per pod: {:?}",
        state.volumes
    );
    service.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_volume_slots_survive_a_framework_crash() {
    let cluster = Cluster::start(1).await;
    let work_dir = cluster.dir.path().join("service");
    let service = TestService::start(&cluster, work_dir.clone()).await;
    let dir = cluster.dir.path();
    service.apply_toml(&diary(dir)).await.expect("apply");
    let first = running_after(&service, 0).await;
    let log = volume_dir(&cluster, "data-diary-0").await.join("log");
    wait_file(&log, &format!("hello-{}\n", first.number)).await;

    // SIGKILL-like: the framework's tasks vanish mid-flight; a new one
    // starts on the same store and finds its instance and slot.
    service.crash();
    let service = TestService::start(&cluster, work_dir).await;
    let status = service
        .wait_status("diary", "the instance reconciled as running", LONG, |s| {
            running(s).iter().any(|i| i.number == first.number)
        })
        .await;
    assert_eq!(status.instances.len(), 1, "nothing relaunched: {status:?}");
    assert_eq!(status.instances[0].volumes, vec!["data-diary-0"]);

    std::fs::write(dir.join(format!("kill-{}", first.number)), b"").expect("signal file");
    let second = running_after(&service, first.number).await;
    assert_eq!(second.volumes, vec!["data-diary-0"], "{second:?}");
    wait_file(
        &log,
        &format!("hello-{}\nhello-{}\n", first.number, second.number),
    )
    .await;
    service.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_persistent_service_removes_its_volume_directory() {
    let cluster = Cluster::start(1).await;
    let service = TestService::start(&cluster, cluster.dir.path().join("service")).await;
    service
        .apply_toml(&diary(cluster.dir.path()))
        .await
        .expect("apply");
    let first = running_after(&service, 0).await;
    let volume = volume_dir(&cluster, "data-diary-0").await;
    wait_file(&volume.join("log"), &format!("hello-{}\n", first.number)).await;

    service
        .client
        .clone()
        .delete(pb::DeleteServiceRequest {
            name: "diary".into(),
        })
        .await
        .expect("delete");
    // Forgotten only once its volume is destroyed.
    wait_for("diary forgotten", LONG, || async {
        (service.get("diary").await.err()?.code() == tonic::Code::NotFound).then_some(())
    })
    .await;
    let state = cluster.state().await;
    assert!(state.volumes.is_empty(), "{:?}", state.volumes);
    wait_for("the volume directory removed", LONG, || async {
        (!volume.exists()).then_some(())
    })
    .await;
    service.stop().await;
    cluster.shutdown().await;
}
