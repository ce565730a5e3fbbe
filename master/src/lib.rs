//! The Corral master: admits agents, subscribes frameworks, offers resources
//! through the allocator, and tracks every task.
//!
//! Modules:
//! - [`config`]: `MasterConfig` and its defaults.
//! - `master`: the actor that owns all state (agents, frameworks, offers,
//!   tasks, the allocator) and handles every [`Command`](master::Command).
//! - `grpc`: the `Scheduler` (framework API) and `AgentRegistry` (agent
//!   stream) services; they translate requests into commands.
//! - `http`: `GET /metrics` and `GET /state` on the same port.
//! - [`metrics`]: metric names and rendering.
//! - [`registry`]: what survives a restart (agents, frameworks, tasks,
//!   volumes) behind the `Registry` trait; the embedded redb store.
//! - [`state`]: the `/state` JSON document (also read by the CLI).
//! - [`validation`]: pure checks of everything that comes in.

pub mod config;
mod grpc;
mod http;
mod master;
pub mod metrics;
pub mod registry;
pub mod state;
pub mod validation;
mod volumes;

use std::future::Future;
use std::sync::Arc;

use corral_proto::pb;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;

pub use config::MasterConfig;

/// Largest gRPC message accepted: a re-registering agent with thousands of
/// tasks, or an ACCEPT with thousands of tasks, stays well under this.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("master server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error("master actor failed: {0}")]
    Actor(String),
}

/// Serves the master on `listener` (gRPC and HTTP on one port) until
/// `shutdown` resolves.
pub async fn run(
    config: MasterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let recovered = match config.work_dir.clone() {
        // Opening and reading the store blocks (file I/O).
        Some(dir) => Some(
            tokio::task::spawn_blocking(move || {
                let registry = registry::EmbeddedRegistry::open(&dir)?;
                tracing::info!(path = %registry.path().display(), "opened the registry");
                let stored = registry::Registry::load(&registry)?;
                Ok::<_, registry::RegistryError>((
                    Box::new(registry) as Box<dyn registry::Registry>,
                    stored,
                ))
            })
            .await
            .map_err(|e| MasterError::Actor(e.to_string()))??,
        ),
        None => None,
    };
    let (handle, mut actor) = master::spawn(config, metrics.clone(), recovered)?;
    let scheduler = pb::scheduler_server::SchedulerServer::new(grpc::SchedulerApi {
        master: handle.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let agents = pb::agent_registry_server::AgentRegistryServer::new(grpc::AgentRegistryApi {
        master: handle.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = Routes::new(scheduler)
        .add_service(agents)
        .into_axum_router()
        .merge(http::router(handle.clone(), metrics));
    let stop = async move {
        shutdown.await;
        // Close every stream first, or graceful shutdown waits on them.
        let _ = handle
            .request(|reply| master::Command::Shutdown { reply })
            .await;
    };
    let serve = tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop);
    tokio::pin!(serve);
    let ended = tokio::select! {
        served = &mut serve => {
            served?;
            (&mut actor).await
        }
        // The actor ends on its own only when the registry failed; then the
        // server goes down with it.
        ended = &mut actor => {
            if matches!(ended, Ok(Ok(()))) {
                serve.await?;
            }
            ended
        }
    };
    // The actor has closed the registry once its task ended, so a new
    // master can open it as soon as this returns.
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(MasterError::Actor(e.to_string())),
    }
}
