//! The agent against a fake master: registration, launching, kills, status
//! update delivery, reconnects, the file API, metrics and shutdown.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use corral_agent::AgentError;
use corral_proto::pb::{
    self, Reason, TaskState, agent_client::AgentClient, master_message::Message,
};
use support::{
    FakeMaster, TestAgent, eventually, kill, live_group_members, run_command, run_shell, within,
};

const FW: &str = "fw-1";
const AGENT_ID: &str = "agent-1";

/// A master, an agent registered with it as `AGENT_ID`, and the stream.
async fn registered_agent_with(
    tweak: impl FnOnce(&mut corral_agent::AgentConfig),
) -> (FakeMaster, TestAgent, support::Conn) {
    let mut master = FakeMaster::start().await;
    let agent = TestAgent::start_with(master.addr, tweak).await;
    let conn = master.accept(AGENT_ID).await;
    (master, agent, conn)
}

/// Waits until no live process is left in the group (killed processes
/// take a moment to die).
async fn group_gone(pgid: u32) {
    eventually("the process group to be empty", || async {
        live_group_members(pgid).is_empty().then_some(())
    })
    .await;
}

async fn registered_agent() -> (FakeMaster, TestAgent, support::Conn) {
    registered_agent_with(|_| {}).await
}

#[tokio::test]
async fn first_registration_carries_an_empty_id_and_the_agent_info() {
    let mut master = FakeMaster::start().await;
    let agent = TestAgent::start_with(master.addr, |c| {
        c.resources = Some(corral_proto::Resources::parse("cpus:3;gpus:1").unwrap());
        c.attributes = corral_proto::attributes::parse("rack:r1").unwrap();
    })
    .await;
    let conn = master.next_conn().await;
    let info = conn.register.info.clone().unwrap();
    assert_eq!(info.id, "");
    assert_eq!(info.hostname, "test-host");
    assert_eq!(info.address, agent.addr.to_string());
    // The configured attribute, plus how the agent isolates tasks.
    assert_eq!(
        corral_proto::attributes::format(&info.attributes),
        "rack:r1;isolation:none"
    );
    let res = corral_proto::Resources::from_proto(&info.resources, "info.resources").unwrap();
    assert_eq!(res.cpus.to_string(), "3");
    assert_eq!(res.gpus.to_string(), "1");
    assert!(!res.mem.is_zero(), "mem is detected when not overridden");
    assert!(conn.register.tasks.is_empty());
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn task_runs_to_finished_and_its_stdout_lands_in_the_sandbox() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "t1", "echo hello; echo oops >&2"));
    let running = conn.expect_and_ack(FW, "t1", TaskState::TaskRunning).await;
    assert!(running.started_at.is_some());
    assert_eq!(running.source(), pb::Source::Agent);
    assert_eq!(running.agent_id, AGENT_ID);
    assert_eq!(running.framework_id, FW);
    assert_eq!(running.uuid.len(), 16);
    let finished = conn.expect_and_ack(FW, "t1", TaskState::TaskFinished).await;
    assert_eq!(finished.exit_code, Some(0));
    let sandbox = agent.sandbox(FW, "t1");
    assert_eq!(
        std::fs::read_to_string(sandbox.join("stdout")).unwrap(),
        "hello\n"
    );
    assert_eq!(
        std::fs::read_to_string(sandbox.join("stderr")).unwrap(),
        "oops\n"
    );
    // The acknowledged terminal update makes the agent forget the task.
    eventually("the task to be forgotten", || async {
        agent.state().await["tasks"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(sandbox.is_dir(), "the sandbox stays on disk");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn task_environment_has_the_corral_variables_and_task_values_win() {
    let (_master, agent, mut conn) = registered_agent().await;
    let mut environment = HashMap::new();
    environment.insert("GREETING".to_string(), "hi".to_string());
    environment.insert("CORRAL_AGENT_ID".to_string(), "overridden".to_string());
    conn.send(run_command(
        FW,
        "env",
        pb::CommandInfo {
            shell: false,
            value: "/usr/bin/env".to_string(),
            arguments: vec!["env".to_string()],
            environment,
        },
    ));
    conn.expect_and_ack(FW, "env", TaskState::TaskRunning).await;
    conn.expect_and_ack(FW, "env", TaskState::TaskFinished)
        .await;
    let sandbox = agent.sandbox(FW, "env");
    let out = std::fs::read_to_string(sandbox.join("stdout")).unwrap();
    let vars: HashMap<&str, &str> = out.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars["GREETING"], "hi");
    assert_eq!(vars["CORRAL_AGENT_ID"], "overridden");
    assert_eq!(vars["CORRAL_TASK_ID"], "env");
    assert_eq!(vars["CORRAL_FRAMEWORK_ID"], FW);
    assert_eq!(vars["CORRAL_SANDBOX"], sandbox.to_str().unwrap());
    assert_eq!(vars["HOME"], sandbox.to_str().unwrap());
    assert!(vars["PATH"].starts_with("/usr/local/sbin"));
    assert_eq!(
        vars.len(),
        7,
        "nothing leaks from the agent's environment: {out}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn failing_command_is_reported_failed_with_its_exit_code() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "bad", "exit 3"));
    conn.expect_and_ack(FW, "bad", TaskState::TaskRunning).await;
    let failed = conn.expect_and_ack(FW, "bad", TaskState::TaskFailed).await;
    assert_eq!(failed.reason(), Reason::CommandFailed);
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.message, "command exited with status 3");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn command_that_cannot_start_is_reported_as_launch_failure() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_command(
        FW,
        "nope",
        pb::CommandInfo {
            shell: false,
            value: "/nonexistent/program".to_string(),
            ..Default::default()
        },
    ));
    let failed = conn.expect_and_ack(FW, "nope", TaskState::TaskFailed).await;
    assert_eq!(failed.reason(), Reason::ContainerLaunchFailed);
    assert!(
        failed.message.contains("/nonexistent/program"),
        "{}",
        failed.message
    );
    assert!(
        failed.message.contains("No such file"),
        "{}",
        failed.message
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn kill_sends_sigterm_and_reports_killed() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "sleeper", "sleep 60"));
    conn.expect_and_ack(FW, "sleeper", TaskState::TaskRunning)
        .await;
    let pgid = agent.task_pid("sleeper").await;
    conn.send(kill(FW, "sleeper", Some(30.0)));
    conn.expect_and_ack(FW, "sleeper", TaskState::TaskKilling)
        .await;
    let killed = conn
        .expect_and_ack(FW, "sleeper", TaskState::TaskKilled)
        .await;
    assert_eq!(killed.signal, Some(libc::SIGTERM), "{killed:?}");
    group_gone(pgid).await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn kill_escalates_to_sigkill_when_sigterm_is_ignored() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "stubborn", "trap '' TERM; sleep 60"));
    conn.expect_and_ack(FW, "stubborn", TaskState::TaskRunning)
        .await;
    let pgid = agent.task_pid("stubborn").await;
    let started = tokio::time::Instant::now();
    conn.send(kill(FW, "stubborn", Some(0.3)));
    conn.expect_and_ack(FW, "stubborn", TaskState::TaskKilling)
        .await;
    let killed = conn
        .expect_and_ack(FW, "stubborn", TaskState::TaskKilled)
        .await;
    assert_eq!(killed.signal, Some(libc::SIGKILL), "{killed:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "SIGKILL only after the grace"
    );
    group_gone(pgid).await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn kill_of_an_unknown_task_is_reported_lost() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(kill(FW, "ghost", None));
    let lost = conn.expect_and_ack(FW, "ghost", TaskState::TaskLost).await;
    assert_eq!(lost.reason(), Reason::TaskUnknown);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_framework_kills_only_that_frameworks_tasks() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell("fw-a", "a", "sleep 60"));
    conn.expect_and_ack("fw-a", "a", TaskState::TaskRunning)
        .await;
    conn.send(run_shell("fw-b", "b", "sleep 60"));
    conn.expect_and_ack("fw-b", "b", TaskState::TaskRunning)
        .await;
    conn.send(Message::ShutdownFramework(pb::ShutdownFramework {
        framework_id: "fw-a".to_string(),
    }));
    conn.expect_and_ack("fw-a", "a", TaskState::TaskKilling)
        .await;
    conn.expect_and_ack("fw-a", "a", TaskState::TaskKilled)
        .await;
    let state = agent.state().await;
    let tasks = state["tasks"].as_array().unwrap();
    let b = tasks.iter().find(|t| t["task_id"] == "b").unwrap();
    assert_eq!(b["state"], "TASK_RUNNING");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn duplicate_run_task_is_ignored() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "once", "sleep 60"));
    conn.expect_and_ack(FW, "once", TaskState::TaskRunning)
        .await;
    let pid = agent.task_pid("once").await;
    conn.send(run_shell(FW, "once", "sleep 60"));
    // The kill's update comes next: nothing was sent for the duplicate.
    conn.send(kill(FW, "once", Some(0.0)));
    conn.expect_and_ack(FW, "once", TaskState::TaskKilling)
        .await;
    conn.expect_and_ack(FW, "once", TaskState::TaskKilled).await;
    group_gone(pid).await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn unacknowledged_update_is_resent_and_the_next_one_waits_for_the_ack() {
    let (_master, agent, mut conn) = registered_agent_with(|c| {
        c.status_update_retry_initial = Duration::from_millis(100);
    })
    .await;
    conn.send(run_shell(FW, "t", "true"));
    let first = conn.expect_update("t", TaskState::TaskRunning).await;
    // Not acknowledged: the same update (same uuid) comes again, and the
    // FINISHED behind it is held back.
    let again = conn.expect_update("t", TaskState::TaskRunning).await;
    assert_eq!(again.uuid, first.uuid);
    // A wrong uuid does not release it.
    conn.send(Message::Acknowledgement(pb::StatusAcknowledgement {
        framework_id: FW.to_string(),
        task_id: "t".to_string(),
        uuid: vec![0; 16],
    }));
    let third = conn.expect_update("t", TaskState::TaskRunning).await;
    assert_eq!(third.uuid, first.uuid);
    // The master hears at once that the task ended, so it can free the
    // resources while FINISHED waits (read between RUNNING retries).
    for _ in 0..20 {
        if !conn.task_ended.is_empty() {
            break;
        }
        let retry = conn.expect_update("t", TaskState::TaskRunning).await;
        assert_eq!(retry.uuid, first.uuid);
    }
    assert_eq!(
        conn.task_ended,
        vec![pb::TaskEnded {
            framework_id: FW.to_string(),
            task_id: "t".to_string(),
            state: TaskState::TaskFinished as i32,
        }]
    );
    conn.ack(FW, &first);
    // Retries of the old head may still be in flight; skip them.
    let finished = loop {
        let u = conn.next_update().await.status.unwrap();
        if u.uuid != first.uuid {
            break u;
        }
    };
    assert_eq!(finished.state(), TaskState::TaskFinished);
    conn.ack(FW, &finished);
    let (_, metrics) = agent.http_get("/metrics").await;
    assert!(
        metrics.contains("corral_agent_status_update_acks_ignored_total 1"),
        "{metrics}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn agent_reregisters_with_its_id_and_tasks_after_the_stream_drops() {
    let (mut master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "long", "sleep 60"));
    let running = conn.expect_update("long", TaskState::TaskRunning).await;
    // Not acknowledged before the drop: it must be resent after re-registering.
    conn.drop_stream();

    let conn2 = master.next_conn().await;
    let info = conn2.register.info.clone().unwrap();
    assert_eq!(info.id, AGENT_ID);
    assert_eq!(conn2.register.tasks.len(), 1);
    let task = &conn2.register.tasks[0];
    assert_eq!(task.framework_id, FW);
    assert_eq!(task.task.as_ref().unwrap().task_id, "long");
    assert_eq!(task.state(), TaskState::TaskRunning);
    assert_eq!(conn2.register.frameworks.len(), 1);
    assert_eq!(conn2.register.frameworks[0].id, FW);

    let mut conn2 = conn2;
    conn2.registered(AGENT_ID, 60.0);
    let resent = conn2
        .expect_and_ack(FW, "long", TaskState::TaskRunning)
        .await;
    assert_eq!(resent.uuid, running.uuid);
    let (_, metrics) = agent.http_get("/metrics").await;
    assert!(
        metrics.contains("corral_agent_master_connections_total 2"),
        "{metrics}"
    );
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn agent_heartbeats_and_reconnects_when_the_master_falls_silent() {
    let mut master = FakeMaster::start().await;
    let agent = TestAgent::start(master.addr).await;
    let mut conn = master.next_conn().await;
    // 100 ms interval and no MasterHeartbeat: gone after 3 silent intervals.
    conn.registered(AGENT_ID, 0.1);
    conn.expect_heartbeat().await;
    let conn2 = master.next_conn().await;
    assert_eq!(conn2.register.info.unwrap().id, AGENT_ID);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn read_file_with_follow_streams_output_and_ends_when_the_task_ends() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(
        FW,
        "talker",
        "for i in 1 2 3; do echo line$i; sleep 0.2; done",
    ));
    conn.expect_and_ack(FW, "talker", TaskState::TaskRunning)
        .await;
    let mut client = AgentClient::connect(format!("http://{}", agent.addr))
        .await
        .unwrap();
    let mut stream = client
        .read_file(pb::ReadFileRequest {
            framework_id: FW.to_string(),
            task_id: "talker".to_string(),
            file: "stdout".to_string(),
            offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    within("the followed file to end", async {
        while let Some(chunk) = stream.message().await.unwrap() {
            assert_eq!(chunk.offset, data.len() as u64);
            assert!(chunk.data.len() <= 64 * 1024);
            data.extend_from_slice(&chunk.data);
        }
    })
    .await;
    assert_eq!(String::from_utf8(data).unwrap(), "line1\nline2\nline3\n");
    conn.expect_and_ack(FW, "talker", TaskState::TaskFinished)
        .await;

    // Without follow, from an offset, after the task was forgotten.
    let mut rest = client
        .read_file(pb::ReadFileRequest {
            framework_id: FW.to_string(),
            task_id: "talker".to_string(),
            file: "stdout".to_string(),
            offset: 6,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let chunk = rest.message().await.unwrap().unwrap();
    assert_eq!(
        (chunk.offset, chunk.data.as_slice()),
        (6, &b"line2\nline3\n"[..])
    );
    assert!(rest.message().await.unwrap().is_none());
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn read_file_rejects_other_files_bad_ids_and_unknown_tasks() {
    let (_master, agent, _conn) = registered_agent().await;
    let mut client = AgentClient::connect(format!("http://{}", agent.addr))
        .await
        .unwrap();
    let req = |fw: &str, task: &str, file: &str| pb::ReadFileRequest {
        framework_id: fw.to_string(),
        task_id: task.to_string(),
        file: file.to_string(),
        offset: 0,
        follow: false,
    };
    for (r, code) in [
        (
            req(FW, "t", "../../../etc/passwd"),
            tonic::Code::InvalidArgument,
        ),
        (req(FW, "t", "stdin"), tonic::Code::InvalidArgument),
        (req("..", "t", "stdout"), tonic::Code::InvalidArgument),
        (req(FW, "a/b", "stdout"), tonic::Code::InvalidArgument),
        (req(FW, "", "stdout"), tonic::Code::InvalidArgument),
        (req(FW, "never-ran", "stdout"), tonic::Code::NotFound),
    ] {
        let err = client.read_file(r.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{r:?}: {err}");
    }
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn metrics_and_state_are_served_over_http_on_the_api_port() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "m", "sleep 60"));
    conn.expect_and_ack(FW, "m", TaskState::TaskRunning).await;
    let (code, body) = agent.http_get("/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "corral_agent_tasks{state=\"TASK_RUNNING\"} 1",
        "corral_agent_resources_total{resource=\"cpus\"}",
        "corral_agent_resources_total{resource=\"mem\"}",
        "corral_agent_status_updates_pending",
        "corral_agent_status_updates_sent_total",
        "corral_agent_status_update_acks_ignored_total",
        "corral_agent_master_connections_total 1",
    ] {
        assert!(body.contains(name), "{name} missing from:\n{body}");
    }
    let state = agent.state().await;
    assert_eq!(state["agent_id"], AGENT_ID);
    assert_eq!(state["hostname"], "test-host");
    assert_eq!(state["address"], agent.addr.to_string());
    assert!(
        state["resources"]
            .as_str()
            .unwrap()
            .contains("ports:[31000-32000]")
    );
    let task = &state["tasks"][0];
    assert_eq!(task["framework_id"], FW);
    assert_eq!(task["task_id"], "m");
    assert_eq!(task["state"], "TASK_RUNNING");
    assert!(task["pid"].as_u64().is_some());
    assert!(
        task["sandbox"]
            .as_str()
            .unwrap()
            .ends_with("sandboxes/fw-1/m")
    );
    assert!(task["exit_code"].is_null());
    let (code, _) = agent.http_get("/nope").await;
    assert_eq!(code, 404);
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_kills_every_task_and_leaves_no_process_behind() {
    let (_master, agent, mut conn) = registered_agent().await;
    // A background child in the group outlives the shell unless the whole
    // group is killed.
    conn.send(run_shell(FW, "tree", "sleep 60 & sleep 60"));
    conn.expect_and_ack(FW, "tree", TaskState::TaskRunning)
        .await;
    let pgid = agent.task_pid("tree").await;
    eventually("both sleeps to run", || async {
        (live_group_members(pgid).len() >= 2).then_some(())
    })
    .await;
    agent.stop().await.unwrap();
    group_gone(pgid).await;
}

#[tokio::test]
async fn a_task_that_exits_leaves_no_background_process_behind() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "bg", "sleep 60 & echo $$ > pgid"));
    conn.expect_and_ack(FW, "bg", TaskState::TaskRunning).await;
    conn.expect_and_ack(FW, "bg", TaskState::TaskFinished).await;
    let pgid: u32 = std::fs::read_to_string(agent.sandbox(FW, "bg").join("pgid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    group_gone(pgid).await;
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn master_shutdown_kills_all_tasks_and_run_returns_removed_error() {
    let (_master, mut agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "victim", "sleep 60"));
    conn.expect_and_ack(FW, "victim", TaskState::TaskRunning)
        .await;
    let pgid = agent.task_pid("victim").await;
    conn.send(Message::Shutdown(pb::Shutdown {
        message: "agent removed by operator".to_string(),
    }));
    let err = agent.join().await.unwrap_err();
    assert!(matches!(err, AgentError::RemovedByMaster { .. }), "{err}");
    assert!(
        err.to_string().contains("the master removed the agent"),
        "{err}"
    );
    group_gone(pgid).await;
}

#[tokio::test]
async fn dropping_the_run_future_kills_every_task() {
    let (_master, mut agent, mut conn) = registered_agent().await;
    conn.send(run_shell(FW, "orphan", "sleep 60 & sleep 60"));
    conn.expect_and_ack(FW, "orphan", TaskState::TaskRunning)
        .await;
    let pgid = agent.task_pid("orphan").await;
    agent.abort();
    group_gone(pgid).await;
}

#[tokio::test]
async fn read_file_does_not_follow_a_symlink_planted_by_the_task() {
    let (_master, agent, mut conn) = registered_agent().await;
    conn.send(run_shell(
        FW,
        "sneaky",
        "rm stderr; ln -s /etc/hostname stderr",
    ));
    conn.expect_and_ack(FW, "sneaky", TaskState::TaskRunning)
        .await;
    conn.expect_and_ack(FW, "sneaky", TaskState::TaskFinished)
        .await;
    let mut client = AgentClient::connect(format!("http://{}", agent.addr))
        .await
        .unwrap();
    let err = client
        .read_file(pb::ReadFileRequest {
            framework_id: FW.to_string(),
            task_id: "sneaky".to_string(),
            file: "stderr".to_string(),
            offset: 0,
            follow: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn output_is_rotated_at_the_size_limit_and_a_follower_sees_all_of_it() {
    let (_master, agent, mut conn) = registered_agent_with(|c| {
        c.log = corral_agent::logs::LogConfig {
            max_size: 1000,
            max_files: 3,
        };
    })
    .await;
    // 40 lines of 100 bytes, slowly enough that the follower is attached
    // before most rotations happen.
    conn.send(run_shell(
        FW,
        "chatty",
        "for i in $(seq 10 49); do printf '%099d\\n' $i; sleep 0.02; done",
    ));
    conn.expect_and_ack(FW, "chatty", TaskState::TaskRunning)
        .await;
    let mut client = AgentClient::connect(format!("http://{}", agent.addr))
        .await
        .unwrap();
    let mut stream = client
        .read_file(pb::ReadFileRequest {
            framework_id: FW.to_string(),
            task_id: "chatty".to_string(),
            file: "stdout".to_string(),
            offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    within("the followed file to end", async {
        while let Some(chunk) = stream.message().await.unwrap() {
            data.extend_from_slice(&chunk.data);
        }
    })
    .await;
    conn.expect_and_ack(FW, "chatty", TaskState::TaskFinished)
        .await;
    // The follower saw every line, in order, across the rotations.
    let text = String::from_utf8(data).unwrap();
    let lines: Vec<u32> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(lines, (10..50).collect::<Vec<_>>());
    // On disk: the live file and two rotations of at most 1000 bytes; the
    // oldest output is gone.
    let sandbox = agent.sandbox(FW, "chatty");
    for name in ["stdout", "stdout.1", "stdout.2"] {
        let len = std::fs::metadata(sandbox.join(name)).unwrap().len();
        assert!(len <= 1000, "{name} is {len} bytes");
    }
    assert!(!sandbox.join("stdout.3").exists());
    let live = std::fs::read_to_string(sandbox.join("stdout")).unwrap();
    assert!(live.ends_with(&format!("{:099}\n", 49)), "{live}");
    agent.stop().await.unwrap();
}
