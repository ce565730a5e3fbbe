//! Persistent volumes on a real agent driven by a fake master: created and
//! destroyed by `MasterMessage`, reported in every registration, mounted by
//! pods (containers on the host root filesystem, so root and a pod network
//! are needed) one pod at a time, and kept across pods and agent restarts.
//!
//! Each agent has its own cgroup root, pod bridge and pod CIDR; the
//! [`Cleanup`] guard removes them (and any mount under the work dir) when a
//! test fails half-way. Needs root; fails, never skips, without it.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_agent::AgentConfig;
use corral_agent::network::{PodCidr, PodNetwork, PodNetworkConfig, mount_points};
use corral_proto::Resources;
use corral_proto::pb::{self, TaskState, master_message::Message};
use support::{Conn, FakeMaster, TestAgent, eventually, kill};

const FW: &str = "fw-1";
const AGENT_ID: &str = "agent-1";

fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the persistent volume tests need root (containers, pod network namespaces, \
         bind mounts): run them as root, e.g. `sudo -E cargo test -p corral-agent --test volumes`"
    );
}

/// What one test's agents make outside their work dir, removed on drop
/// whether the test passed or not (a clean stop has removed it already).
struct Cleanup {
    cgroup_root: String,
    bridge: String,
    cidr: PodCidr,
    work_dir: PathBuf,
}

impl Cleanup {
    fn new(work_dir: &Path) -> Cleanup {
        static AGENTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let unique = uuid::Uuid::new_v4().simple().to_string();
        Cleanup {
            cgroup_root: format!("corral-vol-{}", &unique[..12]),
            // "cp": not the "cv" of the agent's host veths.
            bridge: format!("cp{}", &unique[..10]),
            // Apart from the cluster tests' 10.200-249.x.0/24.
            cidr: PodCidr::parse(&format!(
                "10.{}.{}.0/24",
                150 + std::process::id() % 50,
                n % 256
            ))
            .unwrap(),
            work_dir: work_dir.to_path_buf(),
        }
    }

    /// Container isolation with this test's cgroup root, bridge and CIDR.
    fn configure(&self, c: &mut AgentConfig) {
        c.isolation = corral_agent::Isolation::Container;
        c.cgroup_root = self.cgroup_root.clone();
        c.pod_bridge = self.bridge.clone();
        c.pod_cidr = self.cidr;
        c.work_dir = self.work_dir.clone();
        c.default_kill_grace = Duration::from_secs(1);
    }

    fn cgroup_leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .map(|hs| {
                hs.flatten()
                    .map(|h| h.path().join(&self.cgroup_root))
                    .filter(|p| p.exists())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn mounts(&self) -> Vec<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        mount_points(&info)
            .filter(|p| p.starts_with(&self.work_dir))
            .collect()
    }

    /// After a clean stop: nothing of the agent is left outside its files.
    fn assert_clean(&self) {
        assert!(
            self.cgroup_leftovers().is_empty(),
            "cgroups left: {:?}",
            self.cgroup_leftovers()
        );
        assert!(self.mounts().is_empty(), "mounts left: {:?}", self.mounts());
        assert!(
            !Path::new("/sys/class/net").join(&self.bridge).exists(),
            "the agent left its pod bridge {} behind",
            self.bridge
        );
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Deepest first: pins before the dir they are in.
        for m in self.mounts().iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        if Path::new("/sys/class/net").join(&self.bridge).exists() {
            // On a runtime of its own: this may run inside the test's.
            let config =
                PodNetworkConfig::for_work_dir(&self.work_dir, self.bridge.clone(), self.cidr);
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let net = PodNetwork::new(config).await.ok()?;
                    let _ = net.sweep(&Default::default()).await;
                    net.remove_bridge().await.ok()
                })
            })
            .join();
        }
        for dir in self.cgroup_leftovers() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A container agent on `cleanup`'s work dir, registered with `master` as
/// [`AGENT_ID`], finished sandboxes removed at once.
async fn start_agent(master: &mut FakeMaster, cleanup: &Cleanup) -> (TestAgent, Conn) {
    require_root();
    let agent = TestAgent::start_with(master.addr, |c| {
        cleanup.configure(c);
        c.sandbox_gc_delay = Duration::ZERO;
    })
    .await;
    let conn = master.accept(AGENT_ID).await;
    (agent, conn)
}

fn volume(id: &str, disk_mib: f64) -> pb::PersistentVolume {
    pb::PersistentVolume {
        id: id.into(),
        framework_id: FW.into(),
        agent_id: AGENT_ID.into(),
        disk_mib,
    }
}

/// A pod of one shell task that mounts the persistent volume `volume_id`
/// (pod volume `data`) at `at`; restart policy `Never`.
fn pod(task_id: &str, volume_id: &str, at: &Path, read_only: bool, script: &str) -> Message {
    let task = pb::TaskInfo {
        task_id: task_id.into(),
        name: task_id.into(),
        agent_id: AGENT_ID.into(),
        resources: Resources::parse("cpus:0.1;mem:32").unwrap().to_proto(),
        command: Some(pb::CommandInfo {
            shell: true,
            value: script.into(),
            ..Default::default()
        }),
        kill_grace_period_seconds: Some(0.0),
        container: Some(pb::ContainerInfo {
            volumes: vec![pb::Volume {
                pod_volume: "data".into(),
                container_path: at.display().to_string(),
                read_only,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Message::RunTaskGroup(pb::RunTaskGroup {
        framework: Some(pb::FrameworkInfo {
            id: FW.into(),
            name: "test".into(),
            ..Default::default()
        }),
        task_group: Some(pb::TaskGroupInfo {
            tasks: vec![task],
            volumes: vec![pb::PodVolume {
                name: "data".into(),
                source: Some(pb::pod_volume::Source::Persistent(volume_id.into())),
            }],
            restart_policy: pb::PodRestartPolicy::Never as i32,
        }),
    })
}

/// What a one-task pod ended with: its final status, stdout and stderr.
struct Ended {
    status: pb::TaskStatus,
    stdout: String,
    stderr: String,
}

/// Runs a one-task pod to its end. The logs are read before the final
/// update is acknowledged: the agent drains them before it sends the
/// update, and removes the sandbox (gc delay zero) once it is acknowledged.
async fn run_pod_to_end(conn: &mut Conn, work_dir: &Path, task_id: &str, msg: Message) -> Ended {
    conn.send(msg);
    conn.expect_and_ack(FW, task_id, TaskState::TaskRunning)
        .await;
    let status = conn.next_update().await.status.unwrap();
    assert_eq!(status.task_id, task_id, "{status:?}");
    let sandbox = work_dir.join("sandboxes").join(FW).join(task_id);
    let read = |name: &str| std::fs::read_to_string(sandbox.join(name)).unwrap();
    let ended = Ended {
        stdout: read("stdout"),
        stderr: read("stderr"),
        status,
    };
    conn.ack(FW, &ended.status);
    ended
}

/// The agent's next registration, after the fake master drops the stream.
async fn reregister(master: &mut FakeMaster, conn: &mut Conn) -> Conn {
    conn.drop_stream();
    master.accept(AGENT_ID).await
}

fn ids(register: &pb::Register) -> Vec<(String, String, f64)> {
    register
        .volumes
        .iter()
        .map(|v| (v.framework_id.clone(), v.id.clone(), v.disk_mib))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_share_data_through_a_persistent_volume_one_at_a_time_until_it_is_destroyed() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let at = mnt.path().join("data");
    let cleanup = Cleanup::new(work.path());
    let mut master = FakeMaster::start().await;
    let (agent, mut conn) = start_agent(&mut master, &cleanup).await;
    assert!(conn.register.volumes.is_empty(), "{:?}", conn.register);

    conn.send(Message::CreateVolume(volume("db", 256.0)));
    let data = work.path().join("volumes").join(FW).join("db");
    let metrics = eventually("the volume gauges", || async {
        let (_, text) = agent.http_get("/metrics").await;
        text.contains("corral_agent_persistent_volumes 1")
            .then_some(text)
    })
    .await;
    assert!(
        metrics.contains("corral_agent_persistent_volume_disk_mib 256"),
        "{metrics}"
    );
    assert!(data.is_dir(), "the volume's data dir is {}", data.display());

    // The writer's pod ends; its pod dir goes, the volume's data stays.
    let end = run_pod_to_end(
        &mut conn,
        work.path(),
        "writer",
        pod(
            "writer",
            "db",
            &at,
            false,
            &format!("echo kept-across-pods > {}/greeting", at.display()),
        ),
    )
    .await;
    assert_eq!(
        (end.status.state(), end.status.exit_code),
        (TaskState::TaskFinished, Some(0)),
        "{:?}",
        end.status
    );
    assert_eq!(
        std::fs::read_to_string(data.join("greeting")).unwrap(),
        "kept-across-pods\n"
    );
    assert!(
        !at.join("greeting").exists(),
        "written through a bind mount of the volume, not into the host's {}",
        at.display()
    );
    eventually("the writer's pod dir removed", || async {
        std::fs::read_dir(work.path().join("pods"))
            .map_or(true, |mut d| d.next().is_none())
            .then_some(())
    })
    .await;
    assert!(
        data.join("greeting").is_file(),
        "pod teardown kept the volume's data"
    );

    // A second pod reads it back; its exit status checks the content too.
    let end = run_pod_to_end(
        &mut conn,
        work.path(),
        "reader",
        pod(
            "reader",
            "db",
            &at,
            false,
            &format!(
                "cat {0}/greeting; test \"$(cat {0}/greeting)\" = kept-across-pods",
                at.display()
            ),
        ),
    )
    .await;
    assert_eq!(
        (end.status.state(), end.status.exit_code),
        (TaskState::TaskFinished, Some(0)),
        "{:?}",
        end.status
    );
    assert_eq!(end.stdout, "kept-across-pods\n");

    // Read-only when the container's volume says so.
    let end = run_pod_to_end(
        &mut conn,
        work.path(),
        "ro",
        pod(
            "ro",
            "db",
            &at,
            true,
            &format!("cat {0}/greeting && touch {0}/not-allowed", at.display()),
        ),
    )
    .await;
    assert_eq!(
        end.status.state(),
        TaskState::TaskFailed,
        "{:?}",
        end.status
    );
    assert!(
        end.stderr.contains("Read-only file system"),
        "{}",
        end.stderr
    );
    assert!(
        !data.join("not-allowed").exists(),
        "a read-only mount was written"
    );

    // A volume that is not on this agent fails the pod, naming it.
    conn.send(pod("lost", "ghost", &at, false, "true"));
    let failed = conn.expect_and_ack(FW, "lost", TaskState::TaskFailed).await;
    assert_eq!(
        failed.reason(),
        pb::Reason::ContainerLaunchFailed,
        "{failed:?}"
    );
    assert!(
        failed.message.contains(
            "task_group.volumes[0] ('data'): persistent volume 'ghost' does not exist on this agent"
        ),
        "{}",
        failed.message
    );

    // One pod at a time: a second pod is refused while the first runs, and
    // so is a destroy.
    conn.send(pod("holder", "db", &at, false, "exec sleep 600"));
    conn.expect_and_ack(FW, "holder", TaskState::TaskRunning)
        .await;
    conn.send(pod("intruder", "db", &at, false, "true"));
    let refused = conn
        .expect_and_ack(FW, "intruder", TaskState::TaskFailed)
        .await;
    assert!(
        refused
            .message
            .contains("persistent volume 'db' is mounted by another pod on this agent"),
        "{}",
        refused.message
    );
    conn.send(Message::DestroyVolume(volume("db", 256.0)));
    // The registration's list comes from the volume thread after anything
    // sent to it before: a destroy that went through would show here.
    let mut conn = reregister(&mut master, &mut conn).await;
    assert_eq!(ids(&conn.register), vec![(FW.into(), "db".into(), 256.0)]);
    assert!(conn.register.volumes.iter().all(|v| v.agent_id == AGENT_ID));
    assert!(
        data.join("greeting").is_file(),
        "refused destroy kept the data"
    );

    conn.send(kill(FW, "holder", Some(0.0)));
    conn.expect_and_ack(FW, "holder", TaskState::TaskKilling)
        .await;
    conn.expect_and_ack(FW, "holder", TaskState::TaskKilled)
        .await;
    conn.send(Message::DestroyVolume(volume("db", 256.0)));
    eventually("the destroyed volume's dir removed", || async {
        (!data.exists()).then_some(())
    })
    .await;
    eventually("the volume gauges back at zero", || async {
        let (_, text) = agent.http_get("/metrics").await;
        text.contains("corral_agent_persistent_volumes 0")
            .then_some(())
    })
    .await;
    let conn = reregister(&mut master, &mut conn).await;
    assert!(
        conn.register.volumes.is_empty(),
        "{:?}",
        conn.register.volumes
    );

    agent.stop().await.unwrap();
    cleanup.assert_clean();
}

/// Everything the agent removes at start and stop (pod dirs and networks,
/// container dirs, finished sandboxes, orphan cgroups) leaves `volumes/`
/// alone: a restarted agent reports the volume and a pod reads its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_volume_survives_an_agent_restart_and_its_cleanups() {
    require_root();
    let work = tempfile::tempdir().unwrap();
    let mnt = tempfile::tempdir().unwrap();
    let at = mnt.path().join("data");
    let cleanup = Cleanup::new(work.path());
    let mut master = FakeMaster::start().await;
    let (agent, mut conn) = start_agent(&mut master, &cleanup).await;
    conn.send(Message::CreateVolume(volume("keep", 64.0)));
    let end = run_pod_to_end(
        &mut conn,
        work.path(),
        "writer",
        pod(
            "writer",
            "keep",
            &at,
            false,
            &format!("echo survived > {}/file", at.display()),
        ),
    )
    .await;
    assert_eq!(
        end.status.state(),
        TaskState::TaskFinished,
        "{:?}",
        end.status
    );
    // A pod still running when the agent stops: its teardown at stop must
    // not reach the volume either.
    conn.send(pod("running", "keep", &at, false, "exec sleep 600"));
    conn.expect_and_ack(FW, "running", TaskState::TaskRunning)
        .await;
    agent.stop().await.unwrap();
    cleanup.assert_clean();
    let data = work.path().join("volumes").join(FW).join("keep");
    assert_eq!(
        std::fs::read_to_string(data.join("file")).unwrap(),
        "survived\n"
    );

    // Its end was never acknowledged: the first agent kept its sandbox.
    let sandbox = work.path().join("sandboxes").join(FW).join("running");
    assert!(sandbox.is_dir());

    let (agent, mut conn) = start_agent(&mut master, &cleanup).await;
    assert_eq!(ids(&conn.register), vec![(FW.into(), "keep".into(), 64.0)]);
    // The restarted agent recovered that final update from its checkpoint
    // and resends it; acknowledged, the sandbox goes (no gc delay here).
    conn.expect_and_ack(FW, "running", TaskState::TaskKilled)
        .await;
    eventually("the earlier run's sandbox removed", || async {
        (!sandbox.exists()).then_some(())
    })
    .await;
    let end = run_pod_to_end(
        &mut conn,
        work.path(),
        "reader",
        pod(
            "reader",
            "keep",
            &at,
            false,
            &format!("cat {}/file", at.display()),
        ),
    )
    .await;
    assert_eq!(
        (end.status.state(), end.status.exit_code),
        (TaskState::TaskFinished, Some(0)),
        "{:?}",
        end.status
    );
    assert_eq!(end.stdout, "survived\n");
    agent.stop().await.unwrap();
    cleanup.assert_clean();
    assert!(data.join("file").is_file());
}

/// Volumes are disk, not containers: an agent without isolation creates,
/// reports and destroys them too (it only refuses pods). Needs no root.
#[tokio::test]
async fn an_agent_without_isolation_creates_reports_and_destroys_volumes() {
    let mut master = FakeMaster::start().await;
    let agent = TestAgent::start(master.addr).await;
    let mut conn = master.accept(AGENT_ID).await;
    conn.send(Message::CreateVolume(volume("a", 1.0)));
    conn.send(Message::CreateVolume(volume("b", 2.5)));
    // Invalid ones are ignored (and logged), never made.
    conn.send(Message::CreateVolume(volume("..", 1.0)));
    conn.send(Message::CreateVolume(volume("c", f64::NAN)));
    let mut conn = reregister(&mut master, &mut conn).await;
    assert_eq!(
        ids(&conn.register),
        vec![(FW.into(), "a".into(), 1.0), (FW.into(), "b".into(), 2.5)]
    );
    let data = agent.work_dir.path().join("volumes").join(FW);
    assert!(data.join("a").is_dir() && data.join("b").is_dir());
    assert!(!data.join("c").exists());
    // Twice: idempotent.
    conn.send(Message::DestroyVolume(volume("a", 1.0)));
    conn.send(Message::DestroyVolume(volume("a", 1.0)));
    let conn = reregister(&mut master, &mut conn).await;
    assert_eq!(ids(&conn.register), vec![(FW.into(), "b".into(), 2.5)]);
    assert!(!data.join("a").exists());
    agent.stop().await.unwrap();
}
