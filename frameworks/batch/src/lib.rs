//! `corral-batch`: the batch framework — jobs that run to completion, array
//! jobs, retries with backoff, deadlines, dependencies and cron schedules.
//!
//! It is a framework like any other: it subscribes to the master through the
//! SDK's [`Driver`](corral_sdk::Driver), packs pending tasks into offers,
//! suppresses offers when idle, and keeps its jobs and its framework id in an
//! embedded store (redb) in its work dir so a restart loses nothing. Its own
//! API is gRPC (`corral.v1.Batch`), plus `/metrics` on the same port.
//!
//! Modules:
//! - [`spec`]: the TOML job file, the wire spec and its validation.
//! - [`schedule`]: cron expressions in a time zone.
//! - `jobs`: the pure core — jobs, runs, task attempts and every transition
//!   (offers in, launches out; updates in, retries/kills out); "now" is an
//!   argument.
//! - `store`: the redb store of jobs, task slots and the framework id.
//! - `actor`: owns the core and the store, talks to the master, commits in
//!   groups and acknowledges updates only once they are durable.
//! - `api`: the gRPC service; `metrics`: Prometheus names and rendering.

mod actor;
mod api;
mod jobs;
mod metrics;
pub mod schedule;
pub mod spec;
mod store;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corral_proto::pb;
use corral_sdk::runtime::{self, AbortOnDrop, FrameworkIdentity};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;

/// Default port of `corral batch serve` (the master is 5050, agents 5051).
pub const DEFAULT_PORT: u16 = 5060;
/// How long the master keeps the framework's tasks while it is away: a week,
/// as Marathon does, so a batch service down over a weekend loses nothing.
pub const DEFAULT_FAILOVER_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// How to run the batch framework.
#[derive(Debug, Clone)]
pub struct BatchConfig {
    /// Master address, `HOST:PORT`.
    pub master: String,
    /// Where the store lives (`<work_dir>/batch.redb`).
    pub work_dir: PathBuf,
    /// Framework name shown by the master.
    pub name: String,
    /// Role the framework's share is accounted under.
    pub role: String,
    pub failover_timeout: Duration,
}

impl BatchConfig {
    pub fn new(master: impl Into<String>, work_dir: impl Into<PathBuf>) -> Self {
        Self {
            master: master.into(),
            work_dir: work_dir.into(),
            name: "corral-batch".to_string(),
            role: "*".to_string(),
            failover_timeout: DEFAULT_FAILOVER_TIMEOUT,
        }
    }

    /// Who the framework subscribes as.
    pub fn identity(&self) -> FrameworkIdentity {
        FrameworkIdentity {
            master: self.master.clone(),
            name: self.name.clone(),
            role: self.role.clone(),
            failover_timeout: self.failover_timeout,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("batch server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("framework driver stopped: {0}")]
    Driver(#[from] corral_sdk::DriverError),
    #[error("batch framework failed: {0}")]
    Internal(String),
}

/// Largest API message: the status of a 100,000-task array job.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Runs the batch framework: serves its API on `listener` and schedules its
/// jobs on the master, until `shutdown` resolves. The framework is not torn
/// down on shutdown: its tasks keep running and a restarted framework (same
/// work dir, so the same framework id) takes them over.
pub async fn run(
    config: BatchConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BatchError> {
    let dir = config.work_dir.clone();
    let (store, framework_id, stored) = tokio::task::spawn_blocking(move || {
        let store = store::Store::open(&dir)?;
        let id = store.framework_id()?;
        let jobs = store.load()?;
        Ok::<_, store::StoreError>((store, id, jobs))
    })
    .await
    .map_err(|e| BatchError::Internal(e.to_string()))??;
    let mut jobs = jobs::Jobs::new();
    for (name, error) in jobs.restore(stored) {
        tracing::error!(job = %name, %error, "stored job no longer validates; left out (its records stay in the store)");
    }
    tracing::info!(
        store = %store.path().display(),
        framework_id = framework_id.as_deref().unwrap_or("(new)"),
        "batch framework starting"
    );
    let metrics = Arc::new(metrics::Metrics::new());
    let identity = config.identity();
    let (driver, client) = identity.driver(framework_id.as_deref());
    let (handle, actor) = actor::spawn(jobs, Arc::new(store), framework_id, client, metrics);
    let api = pb::batch_server::BatchServer::new(api::BatchApi {
        actor: handle.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = Routes::new(api)
        .into_axum_router()
        .merge(api::http_router(handle.clone()));
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown);
    // Dropping `run` (e.g. an aborted test) must stop these too. Leaving
    // without a teardown is deliberate: the master keeps the tasks for the
    // failover timeout, for the next instance.
    let events = handle.sender();
    let mut driver = AbortOnDrop(tokio::spawn(async move {
        runtime::drive(&identity, driver, events, |client| {
            let handle = handle.clone();
            async move { handle.use_client(client).await }
        })
        .await
        .map_err(BatchError::Driver)
    }));
    let mut actor = AbortOnDrop(actor);
    tokio::select! {
        served = server => served.map_err(BatchError::from),
        driven = &mut driver.0 => match driven {
            Ok(result) => result,
            Err(e) => Err(BatchError::Internal(e.to_string())),
        },
        acted = &mut actor.0 => match acted {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BatchError::Store(e)),
            Err(e) => Err(BatchError::Internal(e.to_string())),
        },
    }
}
