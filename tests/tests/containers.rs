//! Tasks as isolated containers, through the whole cluster: a real master,
//! a real agent (as root, with cgroups and namespaces) and a framework.
//! Container internals are tested in depth in `agent/tests/containerizer.rs`;
//! these prove the wiring: status reasons, images, volumes, cleanup.

use corral_proto::pb::{self, Reason, TaskState};
use corral_tests::images::{self, Config, Entry};
use corral_tests::{Cluster, TestFramework, shell_task};

fn sandbox_file(cluster: &Cluster, fw: &TestFramework, task: &str, file: &str) -> String {
    let path = cluster.agents[0]
        .work_dir
        .join("sandboxes")
        .join(&fw.id)
        .join(task)
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_default()
}

fn image_task(id: &str, image: &str, command: &str) -> pb::TaskInfo {
    let mut t = shell_task(id, command, 0.1, 32.0);
    t.container = Some(pb::ContainerInfo {
        image: image.into(),
        ..Default::default()
    });
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_rootfs_task_runs_isolated_and_hardened() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("isolated").await;
    let offer = fw.wait_offers().await.remove(0);
    let script = "echo pid1=$(cat /proc/1/comm); \
                  echo procs=$(ls /proc | grep -c '^[0-9]'); \
                  echo hostname=$(hostname); \
                  grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; \
                  if echo x > /proc/sys/kernel/hostname 2>/dev/null; then echo procsys=writable; else echo procsys=readonly; fi; \
                  if mount -t tmpfs none /mnt 2>/dev/null; then echo mount=allowed; else echo mount=denied; fi";
    fw.launch(&offer, vec![shell_task("probe", script, 0.1, 32.0)])
        .await;
    let done = fw.wait_terminal("probe").await;
    assert_eq!(done.state(), TaskState::TaskFinished, "{done:?}");
    let out = sandbox_file(&cluster, &fw, "probe", "stdout");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert!(!out.contains(&format!("hostname={}", host.trim())), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("CapEff:\t00000000a80425fb"), "{out}");
    assert!(out.contains("procsys=readonly"), "{out}");
    assert!(out.contains("mount=denied"), "{out}");
    // Only the shell, its command substitutions and the init: a handful, not the host's hundreds.
    let procs: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|n| n.parse().ok())
        .expect("procs line");
    assert!(procs <= 6, "the container sees {procs} processes:\n{out}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_over_its_memory_limit_fails_with_container_limitation_memory() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("oom").await;
    let offer = fw.wait_offers().await.remove(0);
    // `tail` must hold a whole "line" of 128 MiB of zeros: twice the limit and more.
    fw.launch(
        &offer,
        vec![
            shell_task(
                "hog",
                "head -c 128m /dev/zero | tail > /dev/null",
                0.1,
                64.0,
            ),
            shell_task("sibling", "exec sleep 600", 0.1, 32.0),
        ],
    )
    .await;
    fw.wait_update("sibling", TaskState::TaskRunning).await;
    let failed = fw.wait_update("hog", TaskState::TaskFailed).await;
    assert_eq!(
        failed.reason(),
        Reason::ContainerLimitationMemory,
        "{failed:?}"
    );
    assert!(
        failed.message.contains("64"),
        "the message gives the limit: {}",
        failed.message
    );
    let s = cluster.state().await;
    let sibling = s.tasks.iter().find(|t| t.id == "sibling").expect("sibling");
    assert_eq!(sibling.state, "TASK_RUNNING", "the sibling was not touched");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_task_sees_the_image_and_cannot_change_it() {
    let cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("image.tar");
    let extra = images::layer(&[
        Entry::Dir {
            path: "data".into(),
            mode: 0o755,
        },
        Entry::file("data/only-in-image", b"from the image\n"),
    ]);
    images::write_oci_archive(
        &archive,
        &[images::busybox_layer(), extra],
        &Config::default(),
        "v1",
    );
    cluster.import_image(0, &archive, "test/busybox:v1").await;

    let mut fw = cluster.framework("images").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![image_task(
            "reader",
            "test/busybox:v1",
            "cat /data/only-in-image; echo changed > /data/only-in-image; cat /data/only-in-image; \
             echo sandbox=$CORRAL_SANDBOX; ls /mnt/sandbox",
        )],
    )
    .await;
    let done = fw.wait_terminal("reader").await;
    assert_eq!(done.state(), TaskState::TaskFinished, "{done:?}");
    let out = sandbox_file(&cluster, &fw, "reader", "stdout");
    assert!(out.starts_with("from the image\nchanged\n"), "{out}");
    assert!(out.contains("sandbox=/mnt/sandbox"), "{out}");
    assert!(out.contains("stdout"), "the sandbox is mounted: {out}");

    // A second container of the same image still sees the original file.
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![image_task(
            "again",
            "test/busybox:v1",
            "cat /data/only-in-image",
        )],
    )
    .await;
    assert_eq!(
        fw.wait_terminal("again").await.state(),
        TaskState::TaskFinished
    );
    assert_eq!(
        sandbox_file(&cluster, &fw, "again", "stdout"),
        "from the image\n"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_image_or_a_hostile_layer_fails_the_task_and_the_agent_stays_up() {
    let cluster = Cluster::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let archive = dir.path().join("evil.tar");
    let evil = images::layer(&[Entry::file("../../escaped", b"gotcha")]);
    images::write_oci_archive(
        &archive,
        &[images::busybox_layer(), evil],
        &Config::default(),
        "evil",
    );
    let err = cluster
        .try_import_image(0, &archive, "test/evil:1")
        .await
        .expect_err("a ../ layer is refused");
    assert!(err.contains(".."), "{err}");

    let mut fw = cluster.framework("unknown-image").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(&offer, vec![image_task("nope", "test/evil:1", "true")])
        .await;
    let failed = fw.wait_terminal("nope").await;
    assert_eq!(failed.state(), TaskState::TaskFailed, "{failed:?}");
    assert_eq!(failed.reason(), Reason::ContainerLaunchFailed);
    assert!(failed.message.contains("test/evil"), "{}", failed.message);
    // The agent keeps working.
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(&offer, vec![shell_task("fine", "true", 0.1, 32.0)])
        .await;
    assert_eq!(
        fw.wait_terminal("fine").await.state(),
        TaskState::TaskFinished
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_mounted_only_under_allowed_host_paths() {
    let dir = tempfile::tempdir().expect("temp dir");
    let allowed = dir.path().join("allowed");
    std::fs::create_dir_all(&allowed).expect("mkdir");
    std::fs::write(allowed.join("input"), "shared\n").expect("write");
    let mut cluster = Cluster::start(0).await;
    let mut config = cluster.agent_config("cpus:2;mem:2048", "");
    config.allowed_host_paths = vec![allowed.clone()];
    cluster.add_agent_with(config).await;
    cluster
        .wait_state("agent up", |s| s.agents.len() == 1)
        .await;

    let mut fw = cluster.framework("volumes").await;
    let offer = fw.wait_offers().await.remove(0);
    let volume = |host: &std::path::Path, ro| pb::Volume {
        host_path: host.display().to_string(),
        container_path: "/data".into(),
        read_only: ro,
        ..Default::default()
    };
    let mut ro = shell_task(
        "ro",
        "cat /data/input; if echo x > /data/new 2>/dev/null; then echo writable; else echo readonly; fi",
        0.1,
        32.0,
    );
    ro.container = Some(pb::ContainerInfo {
        volumes: vec![volume(&allowed, true)],
        ..Default::default()
    });
    let mut denied = shell_task("denied", "true", 0.1, 32.0);
    denied.container = Some(pb::ContainerInfo {
        volumes: vec![volume(dir.path(), false)],
        ..Default::default()
    });
    fw.launch(&offer, vec![ro, denied]).await;
    assert_eq!(
        fw.wait_terminal("ro").await.state(),
        TaskState::TaskFinished
    );
    assert_eq!(
        sandbox_file(&cluster, &fw, "ro", "stdout"),
        "shared\nreadonly\n"
    );
    let failed = fw.wait_terminal("denied").await;
    assert_eq!(failed.state(), TaskState::TaskFailed, "{failed:?}");
    assert!(failed.message.contains("allowed"), "{}", failed.message);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_its_max_completion_time_fails_and_one_within_it_finishes() {
    use corral_sdk::{TaskBuilder, TaskId};
    use std::time::Duration;
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("deadlines").await;
    let offer = fw.wait_offers().await.remove(0);
    let task_id = |id: &str| TaskId::parse(id, "task_id").expect("task id");
    let long = TaskBuilder::new(task_id("long"))
        .shell("exec sleep 60")
        .cpus(0.1)
        .mem(32.0)
        .max_completion_time(Duration::from_secs(1))
        .build_for(&offer);
    let quick = TaskBuilder::new(task_id("quick"))
        .shell("echo done")
        .cpus(0.1)
        .mem(32.0)
        .max_completion_time(Duration::from_secs(60))
        .build_for(&offer);
    let mut zero = shell_task("zero", "true", 0.1, 32.0);
    zero.max_completion_time_seconds = Some(0.0);
    fw.launch(&offer, vec![long, quick, zero]).await;

    let rejected = fw.wait_update("zero", TaskState::TaskError).await;
    assert_eq!(rejected.reason(), Reason::TaskInvalid, "{rejected:?}");
    assert_eq!(
        rejected.message,
        "task.max_completion_time_seconds: must be finite and > 0"
    );

    let finished = fw.wait_terminal("quick").await;
    assert_eq!(finished.state(), TaskState::TaskFinished, "{finished:?}");
    assert_eq!(finished.exit_code, Some(0));

    let running = fw.wait_update("long", TaskState::TaskRunning).await;
    let failed = fw.wait_terminal("long").await;
    assert_eq!(failed.state(), TaskState::TaskFailed, "{failed:?}");
    assert_eq!(failed.reason(), Reason::MaxCompletionTimeReached);
    assert_eq!(failed.message, "max completion time of 1s reached");
    assert_eq!(failed.signal, Some(15), "SIGTERM was enough: {failed:?}");
    // Agent clock: the deadline, not `sleep 60`, ended it.
    let ran = failed.timestamp - running.started_at.expect("started_at");
    assert!((1.0..30.0).contains(&ran), "ran for {ran} s");
    let killing = fw.wait_update("long", TaskState::TaskKilling).await;
    assert_eq!(killing.reason(), Reason::MaxCompletionTimeReached);

    let s = cluster
        .wait_state("long completed", |s| {
            s.completed_tasks.iter().any(|t| t.id == "long")
        })
        .await;
    let long = s.completed_tasks.iter().find(|t| t.id == "long");
    assert_eq!(long.map(|t| t.state.as_str()), Some("TASK_FAILED"));
    let metrics = cluster.metrics().await;
    assert_eq!(
        corral_tests::metric_value(
            &metrics,
            r#"corral_master_tasks_terminal_total{state="TASK_FAILED",reason="MAX_COMPLETION_TIME_REACHED"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_usage_reaches_agent_metrics_and_master_state() {
    let cluster = Cluster::start(1).await;
    let mut fw = cluster.framework("usage").await;
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(
        &offer,
        vec![shell_task("busy", "while true; do :; done", 0.2, 32.0)],
    )
    .await;
    fw.wait_update("busy", TaskState::TaskRunning).await;
    let s = cluster
        .wait_state("usage in /state", |s| {
            s.tasks.iter().any(|t| {
                t.usage
                    .as_ref()
                    .is_some_and(|u| u.cpu_user_seconds + u.cpu_system_seconds > 0.0)
            })
        })
        .await;
    let usage = s.tasks[0].usage.clone().expect("usage");
    assert_eq!(usage.mem_limit_bytes, 32 * 1024 * 1024);
    let m = cluster.agent_metrics(0).await;
    let line = format!(
        "corral_agent_container_cpu_user_seconds{{framework=\"{}\",task=\"busy\"}}",
        fw.id
    );
    assert!(
        m.lines().any(|l| l.starts_with(&line)),
        "{line} missing from:\n{m}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_destroys_orphan_containers_in_its_cgroup_subtree_at_start() {
    use corral_agent::containerizer::{ContainerSpec, Containerizer, IsolationConfig, RootFs};
    use std::os::fd::OwnedFd;
    let mut cluster = Cluster::start(0).await;
    let config = cluster.agent_config("cpus:1;mem:512", "");
    // A container nobody knows about, in the subtree the agent will use
    // (as if an earlier agent died without cleaning up).
    let containerizer = Containerizer::new(IsolationConfig {
        cgroup_root: config.cgroup_root.clone(),
        cpu_hard_limit: true,
        pids_limit: 64,
    })
    .expect("containerizer (run the tests as root)");
    let null = || OwnedFd::from(std::fs::File::create("/dev/null").expect("/dev/null"));
    let orphan = containerizer
        .launch(&ContainerSpec {
            id: "orphan".into(),
            argv: vec!["sleep".into(), "600".into()],
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/".into(),
            rootfs: RootFs::Host,
            hostname: "orphan".into(),
            mounts: Vec::new(),
            user: None,
            cpus_milli: 100,
            mem_bytes: 32 << 20,
            output: corral_agent::containerizer::Output::Fds {
                stdout: null(),
                stderr: null(),
            },
            state_dir: None,
            netns: None,
        })
        .expect("launch the orphan");
    let pid = orphan.pid;
    std::mem::forget(orphan);
    assert_eq!(
        containerizer.list().expect("list"),
        vec!["orphan".to_string()]
    );

    cluster.add_agent_with(config).await;
    cluster
        .wait_state("agent up", |s| s.agents.len() == 1)
        .await;
    corral_tests::wait_for("the orphan destroyed", corral_tests::WAIT, || async {
        containerizer
            .list()
            .ok()
            .filter(|l| l.is_empty())
            .map(|_| ())
    })
    .await;
    // Its init is gone (only a zombie of ours could remain: reap it).
    corral_tests::wait_for("the orphan's init gone", corral_tests::WAIT, || async {
        // /proc/<pid> disappears once the init is reaped.
        let _ = nix::sys::wait::waitpid(
            nix::unistd::Pid::from_raw(pid as i32),
            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
        );
        (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    })
    .await;
    cluster.shutdown().await;
}

/// A cluster with one agent whose sandbox GC keeps `max` sandboxes for `delay`.
async fn gc_cluster(delay: std::time::Duration, max: usize) -> Cluster {
    let mut cluster = Cluster::start_with(corral_tests::test_master_config(), 0).await;
    let mut config = cluster.agent_config("cpus:2;mem:2048", "");
    config.sandbox_gc_delay = delay;
    config.sandbox_gc_max = max;
    cluster.add_agent_with(config).await;
    cluster
        .wait_state("agent connected", |s| s.agents.len() == 1)
        .await;
    cluster
}

async fn run_to_end(fw: &mut TestFramework, task: &str) {
    let offer = fw.wait_offers().await.remove(0);
    fw.launch(&offer, vec![shell_task(task, "echo hi", 0.1, 32.0)])
        .await;
    fw.wait_terminal(task).await;
}

fn sandbox_of(cluster: &Cluster, fw: &TestFramework, task: &str) -> std::path::PathBuf {
    cluster.agents[0]
        .work_dir
        .join("sandboxes")
        .join(&fw.id)
        .join(task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_sandbox_is_removed_after_the_gc_delay() {
    let cluster = gc_cluster(std::time::Duration::from_millis(300), 100).await;
    let mut fw = cluster.framework("gc-delay").await;
    run_to_end(&mut fw, "t").await;
    let path = sandbox_of(&cluster, &fw, "t");
    corral_tests::wait_for("sandbox removed", corral_tests::WAIT, || async {
        (!path.exists()).then_some(())
    })
    .await;
    let m = cluster.agent_metrics(0).await;
    assert_eq!(
        corral_tests::metric_value(&m, "corral_agent_sandboxes_removed_total"),
        Some(1.0)
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_gc_limit_the_oldest_sandbox_goes_first() {
    let cluster = gc_cluster(std::time::Duration::from_secs(3600), 1).await;
    let mut fw = cluster.framework("gc-max").await;
    run_to_end(&mut fw, "older").await;
    run_to_end(&mut fw, "newer").await;
    let older = sandbox_of(&cluster, &fw, "older");
    corral_tests::wait_for("older sandbox removed", corral_tests::WAIT, || async {
        (!older.exists()).then_some(())
    })
    .await;
    // Well within the delay, the newer one stays, with its log.
    let newer = sandbox_of(&cluster, &fw, "newer");
    assert_eq!(
        std::fs::read_to_string(newer.join("stdout")).unwrap_or_default(),
        "hi\n"
    );
    let m = cluster.agent_metrics(0).await;
    assert_eq!(
        corral_tests::metric_value(&m, "corral_agent_sandboxes_retained"),
        Some(1.0)
    );
    cluster.shutdown().await;
}
