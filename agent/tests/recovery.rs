//! Agent recovery against a fake master: the checkpoint under
//! `<work_dir>/meta/`, a restart on the same work dir (after a simulated
//! crash: the `run` future dropped, nothing of the actor's shutdown runs),
//! the same agent id, unacknowledged updates resent in order with their
//! uuids, corrupt checkpoints with and without `--strict`, a reboot (another
//! boot id), and the status update metrics.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use corral_agent::{AgentConfig, AgentError};
use corral_proto::pb::{self, Reason, TaskState, master_message::Message};
use support::{FakeMaster, eventually, http_get, kill, live_group_members, run_shell, within};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const FW: &str = "fw-1";
const AGENT_ID: &str = "agent-1";

/// An in-process agent on a work dir that outlives it.
struct Node {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<Result<(), AgentError>>>,
}

/// A work dir and a boot id file that tests can rewrite (a reboot).
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new() -> Self {
        let m = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        m.set_boot_id("boot-a");
        m
    }

    fn work_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    fn boot_id_path(&self) -> PathBuf {
        self.dir.path().join("boot_id")
    }

    fn set_boot_id(&self, id: &str) {
        std::fs::write(self.boot_id_path(), format!("{id}\n")).unwrap();
    }

    fn journal(&self) -> PathBuf {
        self.work_dir().join("meta").join("journal")
    }

    /// The task's checkpoint as the agent wrote it, if it is there.
    fn task_checkpoint(&self, task_id: &str) -> Option<pb::TaskCheckpoint> {
        corral_agent::read_checkpoint(&self.work_dir())
            .ok()?
            .tasks
            .into_iter()
            .find(|t| {
                t.framework.as_ref().is_some_and(|f| f.id == FW)
                    && t.task.as_ref().is_some_and(|t| t.task_id == task_id)
            })
    }

    /// Waits until the task's checkpoint holds `n` unacknowledged updates.
    async fn checkpointed_updates(&self, task_id: &str, n: usize) -> Vec<pb::StatusUpdate> {
        eventually(
            &format!("{n} checkpointed updates of {task_id}"),
            || async {
                self.task_checkpoint(task_id)
                    .filter(|t| t.updates.len() == n)
                    .map(|t| t.updates)
            },
        )
        .await
    }

    async fn start(&self, master: SocketAddr, tweak: impl FnOnce(&mut AgentConfig)) -> Node {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = AgentConfig::new(master.to_string(), self.work_dir());
        config.reconnect_backoff_max = Duration::from_millis(200);
        config.hostname = "test-host".to_string();
        // About the agent's own recovery: plain processes, which a crash of
        // an in-process agent takes down with it (containers that outlive
        // the agent are tested in containerizer tests).
        config.isolation = corral_agent::Isolation::None;
        config.boot_id_path = self.boot_id_path();
        tweak(&mut config);
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(corral_agent::run(config, listener, async {
            let _ = rx.await;
        }));
        Node {
            addr,
            shutdown: Some(tx),
            join: Some(join),
        }
    }
}

impl Node {
    /// A crash as far as the checkpoint can tell: the `run` future is
    /// dropped mid-flight, so the actor never writes anything more.
    async fn crash(mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
            let _ = join.await;
        }
    }

    async fn join(mut self) -> Result<(), AgentError> {
        let join = self.join.take().unwrap();
        within("the agent to stop", join).await.unwrap()
    }

    async fn stop(mut self) -> Result<(), AgentError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join().await
    }

    async fn metrics(&self) -> String {
        http_get(self.addr, "/metrics").await.1
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

async fn group_gone(pgid: u32) {
    eventually("the process group to be empty", || async {
        live_group_members(pgid).is_empty().then_some(())
    })
    .await;
}

fn pid_of(checkpoint: &pb::TaskCheckpoint) -> u32 {
    checkpoint.container.as_ref().expect("container").pid
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

#[tokio::test]
async fn a_restarted_agent_comes_back_with_its_id_and_resends_unacknowledged_updates_in_order() {
    let machine = Machine::new();
    let mut master = FakeMaster::start().await;
    let node = machine
        .start(master.addr, |c| {
            c.status_update_retry_initial = Duration::from_secs(60);
        })
        .await;
    let mut conn = master.accept(AGENT_ID).await;
    conn.send(run_shell(FW, "t", "sleep 60"));
    let running = conn.expect_update("t", TaskState::TaskRunning).await;
    // Not acknowledged: KILLING and KILLED queue up behind RUNNING.
    conn.send(kill(FW, "t", Some(0.0)));
    let queued = machine.checkpointed_updates("t", 3).await;
    let states: Vec<_> = queued
        .iter()
        .map(|u| u.status.as_ref().unwrap().state())
        .collect();
    assert_eq!(
        states,
        [
            TaskState::TaskRunning,
            TaskState::TaskKilling,
            TaskState::TaskKilled
        ]
    );
    assert_eq!(queued[0].status.as_ref().unwrap().uuid, running.uuid);
    node.crash().await;

    let node = machine.start(master.addr, |_| {}).await;
    let conn2 = master.next_conn().await;
    let info = conn2.register.info.clone().unwrap();
    assert_eq!(info.id, AGENT_ID, "the same agent comes back");
    assert_eq!(conn2.register.replaces_agent_id, "");
    assert_eq!(conn2.register.tasks.len(), 1);
    assert_eq!(conn2.register.tasks[0].state(), TaskState::TaskKilled);
    assert_eq!(conn2.register.frameworks[0].id, FW);
    let mut conn2 = conn2;
    conn2.registered(AGENT_ID, 60.0);
    // Every unacknowledged update once more, in order, with its uuid; and
    // nothing else (the task had ended before the crash).
    for want in &queued {
        let want = want.status.as_ref().unwrap();
        let got = conn2.expect_and_ack(FW, "t", want.state()).await;
        assert_eq!(got.uuid, want.uuid);
    }
    eventually("the task's checkpoint to be removed", || async {
        machine.task_checkpoint("t").is_none().then_some(())
    })
    .await;
    let text = node.metrics().await;
    assert_eq!(metric(&text, "corral_agent_tasks_recovered_total"), 1.0);
    assert_eq!(metric(&text, "corral_agent_status_updates_pending"), 0.0);
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_task_running_when_the_agent_crashed_is_reported_failed_after_the_restart() {
    let machine = Machine::new();
    let mut master = FakeMaster::start().await;
    let node = machine.start(master.addr, |_| {}).await;
    let mut conn = master.accept(AGENT_ID).await;
    conn.send(run_shell(FW, "t", "sleep 60"));
    conn.expect_and_ack(FW, "t", TaskState::TaskRunning).await;
    // The acknowledgement is checkpointed too (lazily): wait for it, so
    // RUNNING is not resent.
    machine.checkpointed_updates("t", 0).await;
    let pgid = pid_of(&machine.task_checkpoint("t").unwrap());
    node.crash().await;
    group_gone(pgid).await;

    let node = machine.start(master.addr, |_| {}).await;
    let mut conn2 = master.next_conn().await;
    assert_eq!(conn2.register.info.as_ref().unwrap().id, AGENT_ID);
    conn2.registered(AGENT_ID, 60.0);
    let failed = conn2.expect_and_ack(FW, "t", TaskState::TaskFailed).await;
    assert_eq!(failed.reason(), Reason::AgentRestarted);
    assert!(failed.message.contains("restarted"), "{}", failed.message);
    assert_eq!(failed.agent_id, AGENT_ID);
    // Killing it now is a kill of a task the agent no longer has.
    eventually("the task to be forgotten", || async {
        machine.task_checkpoint("t").is_none().then_some(())
    })
    .await;
    conn2.send(kill(FW, "t", None));
    conn2.expect_and_ack(FW, "t", TaskState::TaskLost).await;
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_corrupt_task_checkpoint_stops_a_strict_agent_and_a_lenient_one_recovers_the_rest() {
    let machine = Machine::new();
    let mut master = FakeMaster::start().await;
    let node = machine.start(master.addr, |_| {}).await;
    let mut conn = master.accept(AGENT_ID).await;
    for t in ["task-a", "task-b"] {
        conn.send(run_shell(FW, t, "sleep 60"));
        conn.expect_and_ack(FW, t, TaskState::TaskRunning).await;
        machine.checkpointed_updates(t, 0).await;
    }
    node.crash().await;
    // Damage task-a's latest record: the last place its id is written.
    let journal = machine.journal();
    let mut bytes = std::fs::read(&journal).unwrap();
    let at = bytes
        .windows(6)
        .rposition(|w| w == b"task-a")
        .expect("task-a in the journal");
    bytes[at] ^= 0x5a;
    std::fs::write(&journal, bytes).unwrap();

    let strict = machine.start(master.addr, |_| {}).await;
    let err = strict.join().await.unwrap_err();
    assert!(matches!(err, AgentError::Checkpoint(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains(&journal.display().to_string()), "{text}");
    assert!(text.contains("corrupt"), "{text}");
    assert!(text.contains("record at byte"), "{text}");

    let lenient = machine.start(master.addr, |c| c.strict = false).await;
    let mut conn2 = master.next_conn().await;
    assert_eq!(conn2.register.info.as_ref().unwrap().id, AGENT_ID);
    let tasks: Vec<_> = conn2
        .register
        .tasks
        .iter()
        .map(|t| t.task.as_ref().unwrap().task_id.clone())
        .collect();
    assert_eq!(
        tasks,
        ["task-b"],
        "the task the damaged record was about is skipped, the rest recovered"
    );
    conn2.registered(AGENT_ID, 60.0);
    let failed = conn2
        .expect_and_ack(FW, "task-b", TaskState::TaskFailed)
        .await;
    assert_eq!(failed.reason(), Reason::AgentRestarted);
    assert_eq!(
        std::fs::read_dir(machine.work_dir().join("meta/corrupt"))
            .unwrap()
            .count(),
        1,
        "a copy of the damaged journal is kept"
    );
    corral_agent::read_checkpoint(&machine.work_dir())
        .expect("the journal is whole again: the lenient agent rewrote it");
    lenient.stop().await.unwrap();
}

#[tokio::test]
async fn a_reboot_makes_a_new_agent_that_names_the_one_it_replaces() {
    let machine = Machine::new();
    let mut master = FakeMaster::start().await;
    let node = machine.start(master.addr, |_| {}).await;
    let mut conn = master.accept(AGENT_ID).await;
    conn.send(run_shell(FW, "t", "sleep 60"));
    conn.expect_update("t", TaskState::TaskRunning).await;
    machine.checkpointed_updates("t", 1).await;
    node.crash().await;
    machine.set_boot_id("boot-b");

    let node = machine.start(master.addr, |_| {}).await;
    let conn2 = master.next_conn().await;
    assert_eq!(conn2.register.info.as_ref().unwrap().id, "", "a new agent");
    assert_eq!(conn2.register.replaces_agent_id, AGENT_ID);
    assert!(
        conn2.register.tasks.is_empty(),
        "{:?}",
        conn2.register.tasks
    );
    assert!(machine.task_checkpoint("t").is_none());
    conn2.registered("agent-2", 60.0);
    // Registered once, it no longer names the old agent.
    eventually("the new agent id to be checkpointed", || async {
        let agent = corral_agent::read_checkpoint(&machine.work_dir())
            .ok()?
            .agent?;
        (agent.agent_id == "agent-2" && agent.boot_id == "boot-b").then_some(())
    })
    .await;
    let mut conn2 = conn2;
    conn2.drop_stream();
    let conn3 = master.next_conn().await;
    assert_eq!(conn3.register.info.as_ref().unwrap().id, "agent-2");
    assert_eq!(conn3.register.replaces_agent_id, "");
    node.stop().await.unwrap();
}

#[tokio::test]
async fn a_clean_stop_checkpoints_the_final_updates_it_could_not_deliver() {
    let machine = Machine::new();
    let mut master = FakeMaster::start().await;
    let node = machine.start(master.addr, |_| {}).await;
    let mut conn = master.accept(AGENT_ID).await;
    conn.send(run_shell(FW, "t", "sleep 60"));
    conn.expect_and_ack(FW, "t", TaskState::TaskRunning).await;
    conn.drop_stream();
    // The agent attaches again and is never answered: the stop kills the
    // task, and its KILLED update waits in the checkpoint for the next run.
    let _unanswered = master.next_conn().await;
    node.stop().await.unwrap();
    let left = machine.task_checkpoint("t").unwrap();
    assert_eq!(left.state(), TaskState::TaskKilled);
    let node = machine.start(master.addr, |_| {}).await;
    let mut conn2 = master.next_conn().await;
    assert_eq!(conn2.register.tasks[0].state(), TaskState::TaskKilled);
    conn2.registered(AGENT_ID, 60.0);
    let killed = conn2.expect_and_ack(FW, "t", TaskState::TaskKilled).await;
    assert_eq!(
        killed.uuid,
        left.updates.last().unwrap().status.as_ref().unwrap().uuid
    );
    node.stop().await.unwrap();
}

#[tokio::test]
async fn duplicate_and_unknown_acks_are_counted_and_the_oldest_pending_update_has_an_age() {
    let machine = Machine::new();
    let mut master = FakeMaster::start().await;
    let node = machine
        .start(master.addr, |c| {
            c.status_update_retry_initial = Duration::from_secs(60);
        })
        .await;
    let mut conn = master.accept(AGENT_ID).await;
    conn.send(run_shell(FW, "t", "sleep 60"));
    let running = conn.expect_update("t", TaskState::TaskRunning).await;
    let aged = eventually("the oldest pending update to age", || async {
        let v = metric(
            &node.metrics().await,
            "corral_agent_status_update_oldest_pending_seconds",
        );
        (v > 0.05).then_some(v)
    })
    .await;
    assert!(aged < 30.0, "{aged}");
    conn.ack(FW, &running);
    conn.ack(FW, &running); // a duplicate
    conn.send(Message::Acknowledgement(pb::StatusAcknowledgement {
        framework_id: FW.into(),
        task_id: "never-ran".into(),
        uuid: vec![7; 16],
    }));
    eventually("both ignored acks to be counted", || async {
        let text = node.metrics().await;
        (metric(&text, "corral_agent_status_update_acks_ignored_total") == 2.0
            && metric(&text, "corral_agent_status_update_oldest_pending_seconds") == 0.0)
            .then_some(())
    })
    .await;
    node.stop().await.unwrap();
}
