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
//! - [`state`]: the `/state` JSON document (also read by the CLI).
//! - [`validation`]: pure checks of everything that comes in.

pub mod config;
mod grpc;
mod http;
mod master;
pub mod metrics;
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
}

/// Serves the master on `listener` (gRPC and HTTP on one port) until
/// `shutdown` resolves.
pub async fn run(
    config: MasterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let handle = master::spawn(config, metrics.clone());
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
    tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        .await?;
    Ok(())
}
