//! The batch framework against a real cluster (master, agent running
//! containers as root): array jobs, retries, deadlines, dependencies,
//! cancellation, suppression when idle, and restart from its store.
//! Scheduling rules in depth (packing, cron, concurrency policies) are tested
//! on the pure core in `frameworks/batch/src/jobs/tests.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use corral_proto::pb::{self, JobState, Reason, TaskState};
use corral_tests::batch::{TestBatch, runs_per_index};
use corral_tests::{Cluster, metric_value, wait_for};

fn job(name: &str, shell: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_string(),
        shell: shell.to_string(),
        cpus: 0.1,
        mem_mib: 32.0,
        ..Default::default()
    }
}

const LONG: Duration = Duration::from_secs(60);

fn state(status: &pb::JobStatus) -> JobState {
    status.summary.as_ref().expect("summary").state()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_task_array_job_runs_each_index_exactly_once() {
    let cluster = Cluster::start(1).await;
    let batch = TestBatch::start(&cluster, cluster.dir.path().join("batch")).await;
    let out = cluster.dir.path().join("indices");
    let id = batch
        .submit(pb::JobSpec {
            count: 50,
            ..job(
                "array",
                &format!("echo $CORRAL_TASK_INDEX >> {}", out.display()),
            )
        })
        .await
        .unwrap();
    assert_eq!(id, "array");
    let status = batch.wait_done("array", LONG).await;
    assert_eq!(state(&status), JobState::Succeeded, "{status:?}");
    let runs = runs_per_index(&out);
    assert_eq!(runs.len(), 50, "{runs:?}");
    assert!(runs.values().all(|&n| n == 1), "{runs:?}");
    let tasks = &status.runs[0].tasks;
    assert!(tasks.iter().all(|t| t.attempts.len() == 1));
    assert_eq!(status.summary.unwrap().counts.unwrap().succeeded, 50);

    // Idle now: offers are suppressed, so the master offers nothing.
    wait_for("offers suppressed", LONG, || async {
        let state = cluster.state().await;
        let fw = state.frameworks.iter().find(|f| f.name == "corral-batch")?;
        (fw.suppressed && fw.offers == 0).then_some(())
    })
    .await;
    batch.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_is_retried_with_backoff_and_the_job_fails_with_the_reason() {
    let cluster = Cluster::start(1).await;
    let batch = TestBatch::start(&cluster, cluster.dir.path().join("batch")).await;
    batch
        .submit(pb::JobSpec {
            retries: 2,
            retry_backoff_seconds: 0.3,
            ..job("flaky", "exit 3")
        })
        .await
        .unwrap();
    let status = batch.wait_done("flaky", LONG).await;
    assert_eq!(state(&status), JobState::Failed);
    assert_eq!(
        status.message,
        "index 0 failed after 3 attempts: TASK_FAILED (COMMAND_FAILED): command exited with status 3"
    );
    let attempts = &status.runs[0].tasks[0].attempts;
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|a| a.exit_code == Some(3)));
    // Backoff: 0.3 s before the 2nd attempt, 0.6 s before the 3rd.
    let gap = |i: usize| attempts[i].launched_at - attempts[i - 1].finished_at;
    assert!(gap(1) >= 0.29, "{}", gap(1));
    assert!(gap(2) >= 0.59, "{}", gap(2));
    batch.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_kills_an_attempt() {
    let cluster = Cluster::start(1).await;
    let batch = TestBatch::start(&cluster, cluster.dir.path().join("batch")).await;
    batch
        .submit(pb::JobSpec {
            deadline_seconds: 1.0,
            kill_grace_period_seconds: 0.5,
            ..job("slow", "sleep 60")
        })
        .await
        .unwrap();
    let status = batch.wait_done("slow", Duration::from_secs(30)).await;
    assert_eq!(state(&status), JobState::Failed);
    let attempt = &status.runs[0].tasks[0].attempts[0];
    assert_eq!(attempt.state(), TaskState::TaskFailed);
    assert_eq!(
        attempt.reason(),
        Reason::MaxCompletionTimeReached,
        "{attempt:?}"
    );
    assert!(attempt.finished_at - attempt.launched_at < 20.0);
    batch.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_orders_jobs_and_a_failed_dependency_fails_its_dependants() {
    let cluster = Cluster::start(1).await;
    let batch = TestBatch::start(&cluster, cluster.dir.path().join("batch")).await;
    batch.submit(job("first", "sleep 0.5")).await.unwrap();
    batch
        .submit(pb::JobSpec {
            after: vec!["first".into()],
            ..job("second", "true")
        })
        .await
        .unwrap();
    batch.submit(job("broken", "exit 1")).await.unwrap();
    batch
        .submit(pb::JobSpec {
            after: vec!["broken".into(), "first".into()],
            ..job("never", "true")
        })
        .await
        .unwrap();
    let first = batch.wait_done("first", LONG).await;
    let second = batch.wait_done("second", LONG).await;
    assert_eq!(state(&second), JobState::Succeeded);
    let first_end = first.runs[0].tasks[0].attempts[0].finished_at;
    let second_start = second.runs[0].tasks[0].attempts[0].launched_at;
    assert!(second_start >= first_end, "{second_start} < {first_end}");
    let never = batch.wait_done("never", LONG).await;
    assert_eq!(state(&never), JobState::Failed);
    assert_eq!(never.message, "dependency broken did not succeed");
    assert!(never.runs.is_empty(), "a failed dependant never runs");
    batch.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_rejected_with_field_errors() {
    let cluster = Cluster::start(1).await;
    let batch = TestBatch::start(&cluster, cluster.dir.path().join("batch")).await;
    batch.submit(job("exists", "true")).await.unwrap();
    let cases = [
        (
            pb::JobSpec {
                cpus: -1.0,
                ..job("a", "true")
            },
            "job.cpus: must be finite and > 0",
        ),
        (
            pb::JobSpec {
                after: vec!["ghost".into()],
                ..job("b", "true")
            },
            "job.after[0]: no job named ghost",
        ),
        (
            pb::JobSpec {
                schedule: "every day".into(),
                ..job("c", "true")
            },
            "job.schedule:",
        ),
        (
            pb::JobSpec {
                count: 1_000_000,
                ..job("d", "true")
            },
            "job.count:",
        ),
        (job("bad name", "true"), "job.name:"),
        (job("e", ""), "job.command:"),
    ];
    for (spec, want) in cases {
        let e = batch.submit(spec).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(want), "{} vs {want}", e.message());
    }
    let e = batch.submit(job("exists", "true")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists);
    let e = batch
        .client
        .clone()
        .get_job(pb::GetJobRequest {
            job_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    batch.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_running_tasks_and_an_ended_job_can_be_deleted() {
    let cluster = Cluster::start(1).await;
    let batch = TestBatch::start(&cluster, cluster.dir.path().join("batch")).await;
    batch
        .submit(pb::JobSpec {
            count: 3,
            kill_grace_period_seconds: 0.2,
            ..job("long", "sleep 60")
        })
        .await
        .unwrap();
    wait_for("3 tasks running", LONG, || async {
        let state = cluster.state().await;
        (state
            .tasks
            .iter()
            .filter(|t| t.state == "TASK_RUNNING")
            .count()
            == 3)
            .then_some(())
    })
    .await;
    batch
        .client
        .clone()
        .cancel_job(pb::CancelJobRequest {
            job_id: "long".into(),
        })
        .await
        .unwrap();
    let status = batch.wait_done("long", LONG).await;
    assert_eq!(state(&status), JobState::Cancelled);
    wait_for("all tasks killed", LONG, || async {
        let status = batch.get("long").await;
        (status.summary?.counts?.cancelled == 3).then_some(())
    })
    .await;
    // Ended, it can be deleted; its name is free again.
    batch
        .client
        .clone()
        .delete_job(pb::DeleteJobRequest {
            job_id: "long".into(),
        })
        .await
        .unwrap();
    batch.submit(job("long", "true")).await.unwrap();
    let e = batch
        .client
        .clone()
        .delete_job(pb::DeleteJobRequest {
            job_id: "long".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    batch.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_framework_finishes_the_job_without_duplicates() {
    let cluster = Cluster::start(1).await;
    let work_dir = cluster.dir.path().join("batch");
    let batch = TestBatch::start(&cluster, work_dir.clone()).await;
    let out = cluster.dir.path().join("indices");
    batch
        .submit(pb::JobSpec {
            count: 20,
            ..job(
                "resumable",
                &format!("sleep 0.3; echo $CORRAL_TASK_INDEX >> {}", out.display()),
            )
        })
        .await
        .unwrap();
    wait_for("some tasks done", LONG, || async {
        (runs_per_index(&out).len() >= 3).then_some(())
    })
    .await;
    // No shutdown path: the store has what was committed, nothing more.
    batch.crash();
    let batch = TestBatch::start(&cluster, work_dir).await;
    let status = batch.wait_done("resumable", LONG).await;
    assert_eq!(state(&status), JobState::Succeeded, "{status:?}");
    let runs = runs_per_index(&out);
    assert_eq!(runs.len(), 20, "{runs:?}");
    assert!(
        runs.values().all(|&n| n == 1),
        "an index ran twice: {runs:?}"
    );
    // Still one framework: the restart re-subscribed with the stored id.
    let state = cluster.state().await;
    assert_eq!(
        state
            .frameworks
            .iter()
            .filter(|f| f.name == "corral-batch")
            .count(),
        1
    );
    let metrics = cluster.metrics().await;
    assert_eq!(
        metric_value(&metrics, "corral_master_frameworks{state=\"connected\"}"),
        Some(1.0)
    );
    batch.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framework_removed_while_down_registers_anew_and_reruns_its_unfinished_tasks() {
    let cluster = Cluster::start(1).await;
    let mut config = corral_batch::BatchConfig::new(
        cluster.master.to_string(),
        cluster.dir.path().join("batch"),
    );
    config.failover_timeout = Duration::from_millis(500);
    let batch = TestBatch::start_with(config.clone()).await;
    let out = cluster.dir.path().join("indices");
    batch
        .submit(pb::JobSpec {
            count: 2,
            ..job(
                "outlived",
                &format!("sleep 1; echo $CORRAL_TASK_INDEX >> {}", out.display()),
            )
        })
        .await
        .unwrap();
    wait_for("2 tasks running", LONG, || async {
        let state = cluster.state().await;
        (state
            .tasks
            .iter()
            .filter(|t| t.state == "TASK_RUNNING")
            .count()
            == 2)
            .then_some(())
    })
    .await;
    batch.crash();
    // Past the failover timeout the master removes the framework and kills
    // its tasks.
    cluster
        .wait_state("framework removed, tasks killed", |s| {
            s.frameworks.is_empty() && s.tasks.is_empty()
        })
        .await;
    let batch = TestBatch::start_with(config).await;
    let status = batch.wait_done("outlived", LONG).await;
    assert_eq!(state(&status), JobState::Succeeded, "{status:?}");
    let runs = runs_per_index(&out);
    assert_eq!(runs, BTreeMap::from([(0, 1), (1, 1)]));
    for task in &status.runs[0].tasks {
        let states: Vec<TaskState> = task.attempts.iter().map(|a| a.state()).collect();
        assert_eq!(
            states,
            [TaskState::TaskUnknown, TaskState::TaskFinished],
            "{task:?}"
        );
    }
    batch.stop().await;
    cluster.shutdown().await;
}

/// The actor's timer drives cron firings: a per-second schedule fires on its
/// own, and `forbid` skips firings while a run is still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_job_fires_by_itself_and_forbid_skips_overlapping_firings() {
    let cluster = Cluster::start(1).await;
    let batch = TestBatch::start(&cluster, cluster.dir.path().join("batch")).await;
    batch
        .submit(pb::JobSpec {
            schedule: "* * * * * *".into(),
            concurrency: pb::ConcurrencyPolicy::Forbid as i32,
            ..job("ticker", "sleep 1.5")
        })
        .await
        .unwrap();
    let status = wait_for("two runs and a skipped firing", LONG, || async {
        let status = batch.get("ticker").await;
        let finished = status
            .runs
            .iter()
            .filter(|r| r.state() == JobState::Succeeded)
            .count();
        (finished >= 2 && status.skipped_runs >= 1).then_some(status)
    })
    .await;
    // Never two runs at once.
    let runs: Vec<_> = status.runs.iter().filter(|r| r.finished_at > 0.0).collect();
    for pair in runs.windows(2) {
        assert!(pair[1].started_at >= pair[0].finished_at, "{pair:?}");
    }
    batch
        .client
        .clone()
        .cancel_job(pb::CancelJobRequest {
            job_id: "ticker".into(),
        })
        .await
        .unwrap();
    let status = batch.wait_done("ticker", LONG).await;
    assert_eq!(state(&status), JobState::Cancelled);
    assert_eq!(status.summary.unwrap().next_run_at, 0.0);
    batch.stop().await;
    cluster.shutdown().await;
}
