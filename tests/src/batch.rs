//! The batch framework in-process against a test cluster, with a gRPC client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use corral_batch::BatchConfig;
use corral_proto::pb;
use corral_proto::pb::batch_client::BatchClient;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::{Cluster, wait_for};

pub struct TestBatch {
    pub address: SocketAddr,
    pub work_dir: PathBuf,
    pub client: BatchClient<Channel>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), corral_batch::BatchError>>>,
}

impl TestBatch {
    /// Starts the framework with its store in `work_dir`. Like a process
    /// supervisor, tries again while a crashed predecessor still holds the
    /// store (its aborted tasks unwind asynchronously).
    pub async fn start(cluster: &Cluster, work_dir: PathBuf) -> TestBatch {
        let config = BatchConfig::new(cluster.master.to_string(), work_dir);
        Self::start_with(config).await
    }

    /// Starts the framework with `config` (its store in `config.work_dir`).
    pub async fn start_with(config: BatchConfig) -> TestBatch {
        let work_dir = config.work_dir.clone();
        let (address, stop, task) = wait_for("batch framework started", crate::WAIT, || async {
            let listener = TcpListener::bind("127.0.0.1:0").await.ok()?;
            let address = listener.local_addr().ok()?;
            let (stop, mut rx) = watch::channel(false);
            let config = config.clone();
            let mut task = tokio::spawn(corral_batch::run(config, listener, async move {
                let _ = rx.wait_for(|s| *s).await;
            }));
            // A run that fails at startup ends at once; one that serves does not.
            match tokio::time::timeout(Duration::from_millis(200), &mut task).await {
                Err(_) => Some((address, stop, task)),
                Ok(result) => {
                    tracing::debug!(?result, "batch framework did not start; retrying");
                    None
                }
            }
        })
        .await;
        let client = wait_for("batch API up", crate::WAIT, || async {
            BatchClient::connect(format!("http://{address}")).await.ok()
        })
        .await;
        TestBatch {
            address,
            work_dir,
            client,
            stop,
            task: Some(task),
        }
    }

    pub async fn submit(&self, spec: pb::JobSpec) -> Result<String, tonic::Status> {
        self.client
            .clone()
            .submit(pb::SubmitJobRequest { spec: Some(spec) })
            .await
            .map(|r| r.into_inner().job_id)
    }

    pub async fn get(&self, job: &str) -> pb::JobStatus {
        self.client
            .clone()
            .get_job(pb::GetJobRequest {
                job_id: job.to_string(),
                ..Default::default()
            })
            .await
            .expect("get job")
            .into_inner()
    }

    /// Waits until the job is in one of the final states and returns it.
    pub async fn wait_done(&self, job: &str, timeout: Duration) -> pb::JobStatus {
        let client = self.client.clone();
        wait_for(&format!("job {job} done"), timeout, || {
            let mut client = client.clone();
            async move {
                let status = client
                    .get_job(pb::GetJobRequest {
                        job_id: job.to_string(),
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner();
                let state = status.summary.as_ref()?.state();
                matches!(
                    state,
                    pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
                )
                .then_some(status)
            }
        })
        .await
    }

    /// Stops the framework without tearing it down (tasks keep running).
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(crate::WAIT, task).await;
        }
    }

    /// Drops the framework's tasks on the floor mid-flight, like SIGKILL:
    /// no shutdown path runs.
    pub fn crash(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// How often each index ran, for tasks that append `$CORRAL_TASK_INDEX` as
/// a line to the file at `path`.
pub fn runs_per_index(path: &Path) -> BTreeMap<u32, u32> {
    let mut runs = BTreeMap::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        if let Ok(i) = line.trim().parse() {
            *runs.entry(i).or_default() += 1;
        }
    }
    runs
}
