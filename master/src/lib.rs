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
//! - [`etcd`]: several masters: leader election on an etcd lease and the
//!   registry in etcd, fenced by the leader's epoch.
//! - `leader`: who serves calls: this master's actor while it leads, else
//!   an UNAVAILABLE answer naming the leader.
//! - [`state`]: the `/state` JSON document (also read by the CLI).
//! - [`validation`]: pure checks of everything that comes in.

pub mod config;
pub mod etcd;
mod grpc;
mod http;
mod leader;
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
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;

pub use config::{EtcdConfig, MasterConfig};

use leader::{Leadership, Role};

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
/// `shutdown` resolves: alone with its embedded registry, or, with
/// `config.etcd`, as one of several masters of which the elected one leads.
pub async fn run(
    config: MasterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MasterError> {
    let metrics = Arc::new(metrics::Metrics::new());
    let advertise = match &config.advertise_address {
        Some(a) => a.clone(),
        None => listener
            .local_addr()
            .map_err(|e| MasterError::Actor(format!("listener address: {e}")))?
            .to_string(),
    };
    let (role_tx, role_rx) = watch::channel(Role::Standby { leader: None });
    let role_tx = Arc::new(role_tx);
    let leadership = Leadership::new(role_rx);
    let scheduler = pb::scheduler_server::SchedulerServer::new(grpc::SchedulerApi {
        leadership: leadership.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let agents = pb::agent_registry_server::AgentRegistryServer::new(grpc::AgentRegistryApi {
        leadership: leadership.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let router = Routes::new(scheduler)
        .add_service(agents)
        .into_axum_router()
        .merge(http::router(leadership, metrics.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        on_signal.send_replace(true);
    });
    // The server stops once leading has ended: by then every stream is
    // closed, so the graceful shutdown does not wait on them.
    let (led_tx, led_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .add_routes(Routes::from(router))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = led_rx.await;
        });
    let lead = async {
        let led = match config.etcd.clone() {
            None => lead_alone(config, metrics, &role_tx, stop_rx).await,
            Some(etcd) => {
                etcd::lead(config, etcd, advertise, metrics, role_tx.clone(), stop_rx).await
            }
        };
        let _ = led_tx.send(());
        led
    };
    tokio::pin!(serve);
    tokio::pin!(lead);
    tokio::select! {
        led = &mut lead => {
            let served = serve.await;
            led?;
            served?;
        }
        served = &mut serve => {
            stop_tx.send_replace(true);
            let led = lead.await;
            served?;
            led?;
        }
    }
    Ok(())
}

/// The single master: leads from start to `stop` with the embedded
/// registry (or none, without a work dir).
async fn lead_alone(
    config: MasterConfig,
    metrics: Arc<metrics::Metrics>,
    role: &watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), MasterError> {
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
    let fence = recovered
        .as_ref()
        .map_or_else(registry::Fence::ephemeral, |(r, _)| r.fence());
    let (handle, mut actor) = master::spawn(config, metrics, recovered)?;
    role.send_replace(Role::Leading {
        master: handle.clone(),
        fence,
    });
    let ended = tokio::select! {
        // The actor ends on its own only when the registry failed.
        ended = &mut actor => {
            role.send_replace(Role::Standby { leader: None });
            ended
        }
        () = leader::until_stopped(&mut stop) => leader::step_down(role, &handle, actor).await,
    };
    // The actor has closed the registry once its task ended, so a new
    // master can open it as soon as this returns.
    match ended {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(MasterError::Actor(e.to_string())),
    }
}
