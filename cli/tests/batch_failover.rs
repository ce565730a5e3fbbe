//! `corral batch serve` killed with SIGKILL mid-job and started again: it
//! re-subscribes with the framework id from its store, reconciles, and
//! finishes the job; finished tasks do not run again, running ones are not
//! duplicated. The master and agent run in-process (the test harness).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corral_proto::pb;
use corral_proto::pb::batch_client::BatchClient;
use corral_tests::batch::runs_per_index;
use corral_tests::{Cluster, wait_for};

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");
const WAIT: Duration = Duration::from_secs(60);

/// The framework process; killed (and reaped) also when the test fails.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(master: &str, port: u16, work_dir: &Path) -> Serve {
    let child = Command::new(CORRAL)
        .args(["batch", "serve", "--master", master, "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--work-dir")
        .arg(work_dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start corral batch serve");
    Serve(child)
}

async fn connect(port: u16) -> BatchClient<tonic::transport::Channel> {
    wait_for("batch API up", WAIT, || async {
        BatchClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_batch_framework_finishes_its_job_without_duplicates() {
    let cluster = Cluster::start(1).await;
    let master = cluster.master.to_string();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let work_dir = cluster.dir.path().join("batch");
    let out = cluster.dir.path().join("indices");

    let mut first = serve(&master, port, &work_dir);
    let mut client = connect(port).await;
    client
        .submit(pb::SubmitJobRequest {
            spec: Some(pb::JobSpec {
                name: "resumable".into(),
                shell: format!("sleep 0.5; echo $CORRAL_TASK_INDEX >> {}", out.display()),
                cpus: 0.1,
                mem_mib: 32.0,
                count: 40,
                ..Default::default()
            }),
        })
        .await
        .expect("submit");
    wait_for("some tasks finished", WAIT, || async {
        (runs_per_index(&out).len() >= 5).then_some(())
    })
    .await;
    first.0.kill().expect("SIGKILL the framework");
    first.0.wait().expect("reap it");
    let done_before = runs_per_index(&out).len();
    assert!(done_before < 40, "the job finished before the kill");

    let _second = serve(&master, port, &work_dir);
    let mut client = connect(port).await;
    let status = wait_for("job succeeded after the restart", WAIT, || {
        let mut client = client.clone();
        async move {
            let status = client
                .get_job(pb::GetJobRequest {
                    job_id: "resumable".into(),
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            (status.summary.as_ref()?.state() == pb::JobState::Succeeded).then_some(status)
        }
    })
    .await;
    let runs = runs_per_index(&out);
    assert_eq!(runs.len(), 40, "{runs:?}");
    assert!(
        runs.values().all(|&n| n == 1),
        "an index ran twice: {runs:?}"
    );
    // Launches the store had recorded but the master never received (the
    // kill came between the commit and the call) come back from
    // reconciliation as TASK_UNKNOWN and are relaunched; nothing ran twice.
    for task in &status.runs[0].tasks {
        let (finished, others): (Vec<_>, Vec<_>) = task
            .attempts
            .iter()
            .partition(|a| a.state() == pb::TaskState::TaskFinished);
        assert_eq!(finished.len(), 1, "{task:?}");
        assert!(
            others
                .iter()
                .all(|a| a.state() == pb::TaskState::TaskUnknown),
            "{task:?}"
        );
    }
    // One framework, re-subscribed with its stored id.
    let state = cluster.state().await;
    let frameworks: Vec<_> = state
        .frameworks
        .iter()
        .filter(|f| f.name == "corral-batch")
        .collect();
    assert_eq!(frameworks.len(), 1, "{frameworks:?}");
    assert_eq!(frameworks[0].state, "connected");
    let list = client
        .list_jobs(pb::ListJobsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.jobs.len(), 1);
    cluster.shutdown().await;
}
