//! The service framework in-process against a test cluster, with a gRPC
//! client (the batch harness, for `corral-service`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use corral_proto::pb;
use corral_proto::pb::services_client::ServicesClient;
use corral_service::ServiceConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::{Cluster, wait_for};

pub struct TestService {
    pub address: SocketAddr,
    pub work_dir: PathBuf,
    pub client: ServicesClient<Channel>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), corral_service::ServiceError>>>,
}

impl TestService {
    /// Starts the framework with its store in `work_dir`. Like a process
    /// supervisor, tries again while a crashed predecessor still holds the
    /// store (its aborted tasks unwind asynchronously).
    pub async fn start(cluster: &Cluster, work_dir: PathBuf) -> TestService {
        let config = ServiceConfig::new(cluster.master.to_string(), work_dir);
        Self::start_with(config).await
    }

    /// Starts the framework with `config` (its store in `config.work_dir`).
    pub async fn start_with(config: ServiceConfig) -> TestService {
        let work_dir = config.work_dir.clone();
        let (address, stop, task) = wait_for("service framework started", crate::WAIT, || async {
            let listener = TcpListener::bind("127.0.0.1:0").await.ok()?;
            let address = listener.local_addr().ok()?;
            let (stop, mut rx) = watch::channel(false);
            let config = config.clone();
            let mut task = tokio::spawn(corral_service::run(config, listener, async move {
                let _ = rx.wait_for(|s| *s).await;
            }));
            // A run that fails at startup ends at once; one that serves does not.
            match tokio::time::timeout(Duration::from_millis(200), &mut task).await {
                Err(_) => Some((address, stop, task)),
                Ok(result) => {
                    tracing::debug!(?result, "service framework did not start; retrying");
                    None
                }
            }
        })
        .await;
        let client = wait_for("service API up", crate::WAIT, || async {
            ServicesClient::connect(format!("http://{address}"))
                .await
                .ok()
        })
        .await;
        TestService {
            address,
            work_dir,
            client,
            stop,
            task: Some(task),
        }
    }

    async fn apply(
        &self,
        source: pb::apply_service_request::Source,
    ) -> Result<pb::ApplyServiceResponse, tonic::Status> {
        self.client
            .clone()
            .apply(pb::ApplyServiceRequest {
                source: Some(source),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Applies a TOML service file.
    pub async fn apply_toml(&self, text: &str) -> Result<pb::ApplyServiceResponse, tonic::Status> {
        self.apply(pb::apply_service_request::Source::Toml(text.to_string()))
            .await
    }

    /// Applies a Kubernetes Pod manifest.
    pub async fn apply_manifest(
        &self,
        yaml: &str,
    ) -> Result<pb::ApplyServiceResponse, tonic::Status> {
        self.apply(pb::apply_service_request::Source::PodManifest(
            yaml.to_string(),
        ))
        .await
    }

    pub async fn get(&self, name: &str) -> Result<pb::ServiceStatus, tonic::Status> {
        self.client
            .clone()
            .get(pb::GetServiceRequest {
                name: name.to_string(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Polls the service's status until `check` accepts it; returns it.
    pub async fn wait_status(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&pb::ServiceStatus) -> bool,
    ) -> pb::ServiceStatus {
        let last = std::sync::Mutex::new(None);
        let result = tokio::time::timeout(
            timeout + Duration::from_secs(1),
            wait_for(&format!("{name}: {what}"), timeout, || async {
                let status = self.get(name).await.ok()?;
                let ok = check(&status);
                if let Ok(mut l) = last.lock() {
                    *l = Some(status.clone());
                }
                ok.then_some(status)
            }),
        )
        .await;
        match result {
            Ok(status) => status,
            Err(_) => panic!("{name}: {what}: timed out; last status: {last:?}"),
        }
    }

    /// `GET /metrics` of the framework.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.address))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("/metrics text")
    }

    /// Stops the framework without tearing it down (instances keep running).
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

/// Instances whose tasks all run (not being killed).
pub fn running(status: &pb::ServiceStatus) -> Vec<&pb::ServiceInstance> {
    status
        .instances
        .iter()
        .filter(|i| i.state() == pb::TaskState::TaskRunning)
        .collect()
}

/// Running instances that pass their checks.
pub fn healthy(status: &pb::ServiceStatus) -> Vec<&pb::ServiceInstance> {
    running(status).into_iter().filter(|i| i.healthy).collect()
}
