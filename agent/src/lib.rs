//! The Corral agent: reports what a machine has to the master and runs the
//! tasks the master sends it.
//!
//! For now a task is a plain child process in its own process group and
//! sandbox directory; cgroups, namespaces, checkpointing and recovery come
//! in later issues.
//!
//! Entry points: [`run`] (serve until a shutdown future resolves, mini-redis
//! style, so tests run agents in-process on `127.0.0.1:0`),
//! [`AgentConfig`], and [`detect_resources`].
//!
//! Modules:
//! - `config`: [`AgentConfig`] and its defaults.
//! - `error`: [`AgentError`].
//! - `resources`: resource detection and the per-name `--resources` merge.
//! - `actor`: the one task that owns the agent's state and handles
//!   `Command`s (launch, kill, exits, acks, timers).
//! - `master_link`: dial, register, heartbeat, reconnect with backoff.
//! - `task`: sandbox, launch, process-group signals, waiting.
//! - `status_updates`: the pure status update manager (per-task FIFO,
//!   retries with capped backoff, acknowledgements).
//! - `api`: the `Agent` gRPC service (`ReadFile`) plus `GET /metrics` and
//!   `GET /state`, all on the agent's one port.
//! - `metrics`: metric names and a per-agent Prometheus recorder.
//! - `state`: the `/state` JSON view.

mod actor;
mod api;
mod config;
pub mod containerizer;
mod error;
pub mod images;
pub mod logs;
mod master_link;
pub mod metrics;
pub mod resources;
mod state;
mod status_updates;
mod task;

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{Instrument, info, warn};

pub use config::{
    AgentConfig, DEFAULT_KILL_GRACE, DEFAULT_RECONNECT_BACKOFF_MAX,
    DEFAULT_STATUS_UPDATE_RETRY_INITIAL, DEFAULT_STATUS_UPDATE_RETRY_MAX,
    RECONNECT_BACKOFF_INITIAL,
};
pub use error::AgentError;
pub use resources::{detect_resources, merge_override};

use crate::actor::{AbortOnDrop, Actor, COMMAND_CHANNEL_CAPACITY, Command, Identity};

/// How long open API connections (a followed `ReadFile`, HTTP keep-alive)
/// may delay the end of [`run`] after the agent has stopped.
const SERVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs an agent: serves its API on `listener`, registers with the master
/// and runs tasks until `shutdown` resolves. Then every task's process
/// group is SIGKILLed and waited for, and `run` returns `Ok`.
///
/// Returns an error when the agent cannot start (work dir, detection,
/// master address), when its API server fails, or when the master sends
/// `Shutdown` ([`AgentError::RemovedByMaster`], after all tasks are killed).
/// Dropping the future also kills every task.
pub async fn run(
    config: AgentConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(&config.work_dir).map_err(|source| AgentError::WorkDir {
        path: config.work_dir.clone(),
        source,
    })?;
    let detected = detect_resources(&config.work_dir)?;
    let resources = match &config.resources {
        Some(over) => merge_override(detected, over),
        None => detected,
    };
    let local = listener.local_addr().map_err(AgentError::ListenerAddress)?;
    let address = config
        .advertise_address
        .clone()
        .unwrap_or_else(|| local.to_string());
    let endpoint =
        master_link::endpoint(&config.master).map_err(|reason| AgentError::InvalidMaster {
            master: config.master.clone(),
            reason,
        })?;

    let span = tracing::info_span!("agent", address = %address);
    info!(parent: &span, master = %config.master, resources = %resources,
          work_dir = %config.work_dir.display(), "agent starting");

    let metrics = metrics::AgentMetrics::new(&resources);
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let api = api::Api {
        cmd_tx: cmd_tx.clone(),
        work_dir: config.work_dir.clone(),
        metrics: metrics.handle(),
    };
    let identity = Identity {
        hostname: config.hostname.clone(),
        address,
        resources,
        attributes: config.attributes.clone(),
        work_dir: config.work_dir.clone(),
    };
    let actor = Actor::new(identity, &config, metrics, cmd_tx.clone());

    let mut actor_task = tokio::spawn(actor.run(cmd_rx).instrument(span.clone()));
    let _actor_guard = AbortOnDrop(actor_task.abort_handle());
    let link_task = tokio::spawn(
        master_link::run(endpoint, config.reconnect_backoff_max, cmd_tx.clone())
            .instrument(span.clone()),
    );
    let _link_guard = AbortOnDrop(link_task.abort_handle());
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(api::routes(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = server_stopped.await;
        });
    let mut server_task = tokio::spawn(server.instrument(span.clone()));
    let _server_guard = AbortOnDrop(server_task.abort_handle());

    let mut shutdown = std::pin::pin!(shutdown);
    let (result, server_done) = tokio::select! {
        () = &mut shutdown => {
            info!(parent: &span, "shutdown requested; killing all tasks");
            (stop_actor(&cmd_tx, &mut actor_task).await, false)
        }
        joined = &mut actor_task => (flatten("actor", joined), false),
        joined = &mut server_task => {
            let err = match flatten("api server", joined.map(|r| r.map_err(AgentError::from))) {
                Ok(()) => AgentError::Internal { what: "api server", reason: "stopped".into() },
                Err(e) => e,
            };
            warn!(parent: &span, error = %err, "api server failed; killing all tasks");
            let _ = stop_actor(&cmd_tx, &mut actor_task).await;
            (Err(err), true)
        }
    };
    link_task.abort();
    let _ = stop_server.send(());
    if !server_done
        && tokio::time::timeout(SERVER_DRAIN_TIMEOUT, &mut server_task)
            .await
            .is_err()
    {
        warn!(parent: &span, "api connections still open; closing them");
    }
    info!(parent: &span, ok = result.is_ok(), "agent stopped");
    result
}

async fn stop_actor(
    cmd_tx: &mpsc::Sender<Command>,
    actor_task: &mut JoinHandle<Result<(), AgentError>>,
) -> Result<(), AgentError> {
    // If the actor is already gone, its result is in the join handle.
    let _ = cmd_tx.send(Command::Shutdown).await;
    flatten("actor", actor_task.await)
}

fn flatten(
    what: &'static str,
    joined: Result<Result<(), AgentError>, tokio::task::JoinError>,
) -> Result<(), AgentError> {
    joined.map_err(|e| AgentError::Internal {
        what,
        reason: e.to_string(),
    })?
}
