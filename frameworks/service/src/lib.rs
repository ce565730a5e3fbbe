//! `corral-service`: the service framework — keeps N instances of a task or
//! a pod running, with health checks, restart backoff, placement constraints
//! and rolling updates (what Marathon was to Mesos).
//!
//! It is a framework like any other, built like the batch framework: it
//! subscribes to the master through the SDK's
//! [`Driver`](corral_sdk::Driver), places wanted instances into offers,
//! suppresses offers when every service is complete, and keeps its
//! services, versions, instances and framework id in an embedded store
//! (redb) in its work dir, so a restart (even SIGKILL) picks its instances
//! up again without restarting healthy ones. Its own API is gRPC
//! (`corral.v1.Services`), plus `/metrics` on the same port.
//!
//! Modules:
//! - [`core`]: services, versions and instances ([`core::Services`]):
//!   placement on offers, replacement with restart backoff, scaling, rolling
//!   updates with surge/unavailable limits, automatic rollback, persistent
//!   volume slots (created with the launch, reused on their agent, destroyed
//!   with the service), records for a store and restore. "Now" is always an
//!   argument.
//! - [`spec`]: the TOML service file ([`spec::parse_toml`]), validation of
//!   the wire spec into a [`spec::Service`] with errors that name the field.
//! - [`k8s`]: Kubernetes Pod manifests (`apiVersion: v1`, `kind: Pod`) into
//!   a one-instance pod service ([`k8s::parse_pod_manifest`]); unsupported
//!   fields are listed, never ignored.
//! - [`quantity`]: Kubernetes resource quantities (`500m`, `128Mi`) as exact
//!   amounts.
//! - `store`: the redb store of services, versions, instances, persistent
//!   volume slots and the framework id.
//! - `actor`: owns the core and the store, talks to the master, commits in
//!   groups and acts (launches, kills, volume destroys, acknowledgements)
//!   only once the changes are durable.
//! - `api`: the gRPC service; `metrics`: Prometheus names and rendering.

mod actor;
mod api;
pub mod core;
pub mod k8s;
mod metrics;
pub mod quantity;
pub mod spec;
mod store;

pub use k8s::{ManifestError, parse_pod_manifest};
pub use spec::{Service, SpecError, parse_toml, validate};

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use corral_proto::pb;
use corral_sdk::runtime::{self, AbortOnDrop, FrameworkIdentity};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;

/// Default port of `corral service serve` (the batch framework is 5060).
pub const DEFAULT_PORT: u16 = 5070;
/// How long the master keeps the framework's instances while it is away: a
/// week, as Marathon does, so services outlive a weekend without their
/// framework.
pub const DEFAULT_FAILOVER_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Largest API message: the status of a 10,000-instance service.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How to run the service framework.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Master address, `HOST:PORT`.
    pub master: String,
    /// Where the store lives (`<work_dir>/service.redb`).
    pub work_dir: PathBuf,
    /// Framework name shown by the master.
    pub name: String,
    /// Role the framework's share is accounted under.
    pub role: String,
    pub failover_timeout: Duration,
}

impl ServiceConfig {
    pub fn new(master: impl Into<String>, work_dir: impl Into<PathBuf>) -> Self {
        Self {
            master: master.into(),
            work_dir: work_dir.into(),
            name: "corral-service".to_string(),
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
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("service framework server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("framework driver stopped: {0}")]
    Driver(#[from] corral_sdk::DriverError),
    #[error("service framework failed: {0}")]
    Internal(String),
}

/// Runs the service framework: serves its API on `listener` and keeps its
/// services running on the master, until `shutdown` resolves. The framework
/// is not torn down on shutdown: its instances keep running and a restarted
/// framework (same work dir, so the same framework id) takes them over.
pub async fn run(
    config: ServiceConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    let dir = config.work_dir.clone();
    let (store, framework_id, stored) = tokio::task::spawn_blocking(move || {
        let store = store::Store::open(&dir)?;
        let id = store.framework_id()?;
        let services = store.load()?;
        Ok::<_, store::StoreError>((store, id, services))
    })
    .await
    .map_err(|e| ServiceError::Internal(e.to_string()))??;
    let mut services = core::Services::new();
    let now = corral_proto::task::now_seconds();
    for (name, error) in services.restore(stored, now) {
        tracing::error!(service = %name, %error, "stored service no longer validates; left out (its records stay in the store)");
    }
    tracing::info!(
        store = %store.path().display(),
        framework_id = framework_id.as_deref().unwrap_or("(new)"),
        services = services.names().count(),
        "service framework starting"
    );
    let metrics = Arc::new(metrics::Metrics::new());
    let identity = config.identity();
    let (driver, client) = identity.driver(framework_id.as_deref());
    let (handle, actor) = actor::spawn(services, Arc::new(store), framework_id, client, metrics);
    let api = pb::services_server::ServicesServer::new(api::ServicesApi {
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
    // without a teardown is deliberate: the master keeps the instances for
    // the failover timeout, for the next framework process.
    let events = handle.sender();
    let mut driver = AbortOnDrop(tokio::spawn(async move {
        runtime::drive(&identity, driver, events, |client| {
            let handle = handle.clone();
            async move { handle.use_client(client).await }
        })
        .await
        .map_err(ServiceError::Driver)
    }));
    let mut actor = AbortOnDrop(actor);
    tokio::select! {
        served = server => served.map_err(ServiceError::from),
        driven = &mut driver.0 => match driven {
            Ok(result) => result,
            Err(e) => Err(ServiceError::Internal(e.to_string())),
        },
        acted = &mut actor.0 => match acted {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServiceError::Store(e)),
            Err(e) => Err(ServiceError::Internal(e.to_string())),
        },
    }
}
