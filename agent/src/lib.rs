//! The Corral agent: reports what a machine has to the master and runs the
//! tasks the master sends it.
//!
//! Every task runs as a container (`containerizer`: cgroups, namespaces, a
//! root filesystem from an image or the host's) with its own sandbox. The
//! agent checkpoints its id, its tasks and their unacknowledged status
//! updates, and a restarted agent comes back as the same agent.
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
//!   sent once checkpointed, retries with capped backoff,
//!   acknowledgements).
//! - `checkpoint`: the checkpoint under `<work_dir>/meta/` (atomic files,
//!   written in batches on their own thread) and recovery from it.
//! - `api`: the `Agent` gRPC service (`ReadFile`) plus `GET /metrics` and
//!   `GET /state`, all on the agent's one port.
//! - `metrics`: metric names and a per-agent Prometheus recorder.
//! - `state`: the `/state` JSON view.
//! - `gc`: garbage collection of finished tasks' sandboxes.
//! - `health`: health checks (startup, liveness, readiness; command, HTTP
//!   and TCP probes) the agent runs against its tasks.
//! - `network`: pod networking: the agent's bridge, a network namespace
//!   per pod with a veth and its own address (netlink), persisted IPAM.
//! - `pod`: pods' restart policy and backoff, and where their volumes live.
//! - `volumes`: persistent volumes on the agent's disk (`CreateVolume`,
//!   `DestroyVolume`), which outlive the pods that mount them; their own
//!   thread runs every operation in order.

mod actor;
mod api;
mod checkpoint;
mod config;
pub mod containerizer;
mod error;
mod gc;
mod health;
pub mod images;
mod launch;
pub mod logs;
mod master_link;
pub mod metrics;
pub mod network;
mod pod;
pub mod resources;
mod state;
mod status_updates;
mod task;
mod volumes;

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{Instrument, info, warn};

pub use checkpoint::{CheckpointContents, CheckpointError, read_checkpoint};
pub use config::{
    AgentConfig, DEFAULT_BOOT_ID_PATH, DEFAULT_CGROUP_ROOT, DEFAULT_KILL_GRACE, DEFAULT_PIDS_LIMIT,
    DEFAULT_RECONNECT_BACKOFF_MAX, DEFAULT_SANDBOX_GC_DELAY, DEFAULT_SANDBOX_GC_MAX,
    DEFAULT_STATUS_UPDATE_RETRY_INITIAL, DEFAULT_STATUS_UPDATE_RETRY_MAX, DEFAULT_USAGE_INTERVAL,
    Isolation, RECONNECT_BACKOFF_INITIAL,
};
pub use error::AgentError;
pub use master_link::{Fault, LinkFaults};
pub use resources::{detect_resources, merge_override};
pub use volumes::VolumeError;

use crate::actor::{AbortOnDrop, Actor, COMMAND_CHANNEL_CAPACITY, Command, Identity};

/// How long open API connections (a followed `ReadFile`, HTTP keep-alive)
/// may delay the end of [`run`] after the agent has stopped.
const SERVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long volume operations the master sent before the stop (a create's
/// fsyncs, a destroy's rename; never the deletion of data) may delay the
/// end of [`run`], so an agent started right after on the same work dir
/// finds them done.
const VOLUMES_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the checkpoint writer may take to write what the agent queued
/// before it stopped (the final updates of the tasks it killed), so the
/// next start finds them.
const CHECKPOINT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs an agent: serves its API on `listener`, registers with the master
/// and runs tasks until `shutdown` resolves. Then every task's process
/// group is SIGKILLed and waited for, and `run` returns `Ok`.
///
/// At start it recovers its checkpoint (`<work_dir>/meta/`): the same boot
/// and checkpoint format bring it back under its old agent id with its
/// tasks and their unacknowledged updates; otherwise it registers as a new
/// agent that replaces the old one.
///
/// Returns an error when the agent cannot start (work dir, detection,
/// master address, an unreadable checkpoint file with `strict`), when its
/// API server fails, or when the master sends `Shutdown`
/// ([`AgentError::RemovedByMaster`], after all tasks are killed; the
/// checkpoint is removed, so the next start is a new agent).
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
    if config.isolation == Isolation::Container {
        let real = std::fs::canonicalize(&config.work_dir).unwrap_or(config.work_dir.clone());
        if let Some(mount) = hidden_from_containers(&real) {
            return Err(AgentError::WorkDirHiddenFromContainers {
                path: config.work_dir.clone(),
                mount,
            });
        }
    }
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
    let masters =
        master_link::masters(&config.master).map_err(|reason| AgentError::InvalidMaster {
            master: config.master.clone(),
            reason,
        })?;

    let span = tracing::info_span!("agent", address = %address);
    info!(parent: &span, master = %config.master, resources = %resources,
          work_dir = %config.work_dir.display(), "agent starting");

    // First: it takes the work dir's lock, so no other agent runs on it.
    let layout = checkpoint::Layout::new(&config.work_dir);
    let recovered = {
        let (layout, boot_id_path, strict) =
            (layout.clone(), config.boot_id_path.clone(), config.strict);
        tokio::task::spawn_blocking(move || {
            let recovered = checkpoint::recover(&layout, &boot_id_path, strict)?;
            kill_leftover_processes(&recovered.tasks);
            Ok::<_, CheckpointError>(recovered)
        })
        .await
        .map_err(|e| AgentError::Internal {
            what: "checkpoint recovery",
            reason: e.to_string(),
        })??
    };
    match (&recovered.agent_id, &recovered.replaces_agent_id) {
        (Some(id), _) => info!(parent: &span, agent_id = %id, tasks = recovered.tasks.len(),
                               skipped = recovered.skipped.len(), "recovering as the checkpointed agent"),
        (None, Some(old)) => info!(parent: &span, replaces_agent_id = %old,
                                   "registering as a new agent that replaces the checkpointed one"),
        (None, None) => {}
    }

    // Before any sweep below: none of them touches `volumes/` or
    // `volume-meta/`, and the store's own repair needs no running task.
    let volumes_dir = config.work_dir.clone();
    let (volume_store, volume_trash) =
        tokio::task::spawn_blocking(move || volumes::VolumeStore::open(&volumes_dir))
            .await
            .map_err(|e| AgentError::Internal {
                what: "volume store",
                reason: e.to_string(),
            })??;

    let images = std::sync::Arc::new(images::ImageStore::open(
        config.work_dir.join("images"),
        config.insecure_registries.clone(),
    )?);
    // Layers of running containers, by container: written by the actor,
    // read by the image API so garbage collection never removes them.
    let layers_in_use: std::sync::Arc<dashmap::DashMap<String, Vec<String>>> = Default::default();
    let in_use_view = layers_in_use.clone();
    let images_api = images::ImagesApi::new(
        images.clone(),
        std::sync::Arc::new(move || in_use_view.iter().flat_map(|e| e.value().clone()).collect()),
    );

    // Pods need a bridge (CAP_NET_ADMIN, the bridge and veth drivers); an
    // agent that cannot make one still runs tasks, and refuses pods saying
    // why. First of all: which recorded pods kept their network decides
    // which pod containers are re-adopted and which are orphans.
    let (network, pods_unavailable, recovered_pods) = match config.isolation {
        Isolation::None => (
            None,
            Some("this agent runs with --isolation=none".to_string()),
            Vec::new(),
        ),
        Isolation::Container => {
            let wanted = actor::pods_to_recover(&recovered.tasks, &recovered.pods);
            match start_pod_network(&config, wanted).await {
                Ok((net, pods)) => (Some(std::sync::Arc::new(net)), None, pods),
                Err(e) => {
                    warn!(parent: &span, error = %e, "no pod network: pods will be refused");
                    (
                        None,
                        Some(format!("this agent has no pod network: {e}")),
                        Vec::new(),
                    )
                }
            }
        }
    };
    let pod_ids: std::collections::HashSet<String> = recovered_pods
        .iter()
        .map(|(p, _)| p.pod_id.clone())
        .collect();
    let containerizer = match config.isolation {
        Isolation::None => None,
        Isolation::Container => {
            let known = actor::readoptable_containers(&recovered.tasks, true, &pod_ids);
            Some(std::sync::Arc::new(
                start_containerizer(&config, known).await?,
            ))
        }
    };
    let pod_network = network.clone();
    let mut attributes = config.attributes.clone();
    if !attributes.iter().any(|a| a.name == "isolation") {
        attributes.push(corral_proto::pb::Attribute {
            name: "isolation".into(),
            value: Some(corral_proto::pb::attribute::Value::Text(
                config.isolation.attribute().into(),
            )),
        });
    }
    raise_fd_limit();
    let usage: std::sync::Arc<dashmap::DashMap<actor::StreamKey, containerizer::Usage>> =
        Default::default();
    let cgroups = containerizer.clone();
    let launcher = launch::Launcher {
        isolation: config.isolation,
        containerizer,
        images: images.clone(),
        work_dir: config.work_dir.clone(),
        allowed_host_paths: config.allowed_host_paths.clone(),
        log: config.log,
        layers_in_use,
        launch_slots: std::sync::Arc::new(tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()) * 2,
        )),
        network,
        pods_unavailable,
    };

    let metrics = metrics::AgentMetrics::new(&resources);
    let stale_epoch_rejected = metrics.stale_epoch_rejected.clone();
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let durable_tx = cmd_tx.clone();
    let (checkpointer, writer_stopped) = checkpoint::Checkpointer::start(
        layout.clone(),
        recovered.lock,
        recovered.live,
        metrics.checkpoint_writer(),
        // The writer is a plain thread: blocking_send never runs on the
        // runtime, and fails at once once the actor is gone.
        move |seq| {
            let _ = durable_tx.blocking_send(Command::Checkpointed { seq });
        },
    )?;
    let (volumes, volumes_stopped) = volumes::Volumes::start(
        volume_store,
        volume_trash,
        metrics.volume_gauges(),
        span.clone(),
    )?;
    let api = api::Api {
        cmd_tx: cmd_tx.clone(),
        work_dir: config.work_dir.clone(),
        metrics: metrics.handle(),
        usage: usage.clone(),
    };
    let identity = Identity {
        hostname: config.hostname.clone(),
        address,
        resources,
        attributes,
        work_dir: config.work_dir.clone(),
        boot_id: recovered.boot_id,
    };
    let mut actor = Actor::new(
        identity,
        &config,
        metrics,
        cmd_tx.clone(),
        launcher,
        usage,
        volumes,
        checkpointer,
    );
    actor.recover(
        recovered.agent_id,
        recovered.replaces_agent_id,
        recovered.tasks,
        recovered_pods,
    );
    // Other tasks of an earlier run are gone (orphans were swept): their
    // sandboxes wait out the rest of their delay. Recovered tasks keep
    // theirs until their end is acknowledged.
    let work_dir = config.work_dir.clone();
    let live = actor.live_sandboxes();
    let mut found = tokio::task::spawn_blocking(move || gc::find_sandboxes(&work_dir))
        .await
        .unwrap_or_default();
    found.retain(|(path, _)| !live.contains(path));
    actor.adopt_sandboxes(found);

    let mut actor_task = tokio::spawn(actor.run(cmd_rx).instrument(span.clone()));
    let _actor_guard = AbortOnDrop(actor_task.abort_handle());
    let link_task = tokio::spawn(
        master_link::run(master_link::Link {
            masters,
            backoff_max: config.reconnect_backoff_max,
            cmd_tx: cmd_tx.clone(),
            faults: config.link_faults.clone(),
            stale_epoch_rejected,
        })
        .instrument(span.clone()),
    );
    let _link_guard = AbortOnDrop(link_task.abort_handle());
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_routes(api::routes(api, images_api))
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
    // The actor (and with it every handle but those of in-flight API
    // calls) is gone: the volume thread finishes what it was sent.
    if !volumes_stopped.wait(VOLUMES_DRAIN_TIMEOUT).await {
        warn!(parent: &span, "persistent volume operations still running");
    }
    // The actor is gone: the writer writes what it queued and lets go of
    // the work dir.
    if !writer_stopped.wait(CHECKPOINT_DRAIN_TIMEOUT).await {
        warn!(parent: &span, "checkpoint writes still running");
    }
    if let Err(AgentError::RemovedByMaster { .. }) = &result
        && let Err(e) = checkpoint::forget(&layout)
    {
        warn!(parent: &span, error = %e, "cannot remove the checkpoint");
    }
    // Every container is gone: leave no empty cgroup subtree behind either.
    if let Some(c) = cgroups
        && let Err(e) = c.remove_root()
    {
        warn!(parent: &span, error = %e, "cannot remove the cgroup subtree");
    }
    // Every pod is gone too: so is the bridge.
    if let Some(network) = pod_network
        && let Err(e) = network.remove_bridge().await
    {
        warn!(parent: &span, error = %e, "cannot remove the pod bridge");
    }
    info!(parent: &span, ok = result.is_ok(), "agent stopped");
    result
}

/// The pod network, with the pods of an earlier run that are `wanted`
/// (recorded, with containers to re-adopt) and whose network is whole:
/// their namespaces reopened. Everything else pods of an earlier run left
/// is swept: namespaces, veths, addresses and directories.
async fn start_pod_network(
    config: &AgentConfig,
    wanted: Vec<corral_proto::pb::PodCheckpoint>,
) -> Result<
    (
        network::PodNetwork,
        Vec<(corral_proto::pb::PodCheckpoint, launch::PodLaunch)>,
    ),
    AgentError,
> {
    let net_config = network::PodNetworkConfig::for_work_dir(
        &config.work_dir,
        config.pod_bridge.clone(),
        config.pod_cidr,
    );
    let net = network::PodNetwork::new(net_config)
        .await
        .map_err(|e| AgentError::Isolation(format!("pod network: {e}")))?;
    let mut pods = Vec::new();
    if !wanted.is_empty() {
        let whole = match net.recover().await {
            Ok(whole) => whole,
            Err(e) => {
                warn!(error = %e, "cannot read the pod networks of an earlier run");
                Vec::new()
            }
        };
        for record in wanted {
            if !whole.iter().any(|w| w.pod_id == record.pod_id) {
                warn!(pod_id = %record.pod_id, "a recorded pod's network is gone; its tasks end");
                continue;
            }
            match launch::recover_pod(Some(&net), &record) {
                Ok(launch) => pods.push((record, launch)),
                Err(e) => warn!(pod_id = %record.pod_id, error = %e, "cannot recover a pod"),
            }
        }
    }
    let keep: std::collections::HashSet<String> =
        pods.iter().map(|(p, _)| p.pod_id.clone()).collect();
    match net.sweep(&keep).await {
        Ok(swept) if !swept.is_empty() => {
            warn!(
                pods = swept.len(),
                "removed the networks of pods of an earlier run"
            );
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot sweep old pod networks"),
    }
    net.ensure_bridge()
        .await
        .map_err(|e| AgentError::Isolation(format!("pod network: {e}")))?;
    // The directories (emptyDir volumes) of pods not recovered.
    let dirs = config.work_dir.join("pods");
    if let Ok(entries) = std::fs::read_dir(&dirs) {
        for entry in entries.flatten() {
            if keep.contains(entry.file_name().to_string_lossy().as_ref()) {
                continue;
            }
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                warn!(path = %entry.path().display(), error = %e, "cannot remove an old pod dir");
            }
        }
    }
    Ok((net, pods))
}

/// The containerizer, after sweeping orphans: containers in our cgroup
/// subtree and container dirs that no recovered task names (`known`, the
/// ones the actor re-adopts) are killed and removed.
async fn start_containerizer(
    config: &AgentConfig,
    known: std::collections::HashSet<String>,
) -> Result<containerizer::Containerizer, AgentError> {
    let isolation = containerizer::IsolationConfig {
        cgroup_root: config.cgroup_root.clone(),
        cpu_hard_limit: config.cpu_hard_limit,
        pids_limit: config.pids_limit,
    };
    let work_dir = config.work_dir.clone();
    tokio::task::spawn_blocking(move || {
        let c = containerizer::Containerizer::new(isolation)
            .map_err(|e| AgentError::Isolation(e.to_string()))?;
        let removed = launch::destroy_orphans(Some(&c), &work_dir, &known);
        if !removed.cgroups.is_empty() || !removed.dirs.is_empty() {
            warn!(
                containers = removed.cgroups.len(),
                dirs = removed.dirs.len(),
                "removed containers of an earlier run that no checkpoint names"
            );
        }
        Ok(c)
    })
    .await
    .map_err(|e| AgentError::Internal {
        what: "containerizer start",
        reason: e.to_string(),
    })?
}

/// Plain-process tasks of an earlier run that had not ended: their
/// processes outlive a `kill -9` of the agent but cannot be waited for by
/// this one, so they end (their containers, if any, go with the orphan
/// sweep). Never two copies of a task: the agent reports them ended.
fn kill_leftover_processes(tasks: &[corral_proto::pb::TaskCheckpoint]) {
    for t in tasks {
        if corral_proto::task::is_terminal(t.state()) {
            continue;
        }
        if let Some(c) = &t.container
            && c.container_id.is_empty()
            && c.pid > 0
            && task::kill_leftover_group(c.pid, c.start_ticks)
        {
            let task_id = t.task.as_ref().map_or("", |i| i.task_id.as_str());
            warn!(
                task_id,
                pgid = c.pid,
                "killed a task's process left by an earlier run"
            );
        }
    }
}

/// Limits glibc's malloc to two arenas. By default glibc gives up to eight
/// per core, one per thread that allocates; an agent's worker and blocking
/// threads each keep freed memory in their own arena. Measured with
/// `bench/burst.sh 1000`: 32.2 MiB RSS holding 1,000 containers by default,
/// 29.6 MiB with two arenas. Call before the runtime starts its threads.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator setting; called before
    // other threads exist, as glibc recommends.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Every container holds a few fds in the agent (pidfd, log pipes, a
/// socket): lift the soft limit to the hard one so thousands fit.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
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

/// The mount a container puts over `path`, if it does: every container gets
/// its own /dev, /proc and /sys, so a work dir there hides its sandboxes
/// from the containers that run in them.
fn hidden_from_containers(path: &std::path::Path) -> Option<&'static str> {
    ["/dev", "/proc", "/sys"]
        .into_iter()
        .find(|mount| path.starts_with(mount))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn work_dirs_under_a_containers_own_mounts_are_refused() {
        assert_eq!(
            hidden_from_containers(Path::new("/dev/shm/corral")),
            Some("/dev")
        );
        assert_eq!(hidden_from_containers(Path::new("/proc/x")), Some("/proc"));
        assert_eq!(hidden_from_containers(Path::new("/sys/fs/x")), Some("/sys"));
        assert_eq!(
            hidden_from_containers(Path::new("/var/lib/corral/agent")),
            None
        );
        assert_eq!(hidden_from_containers(Path::new("/devices")), None);
        let err = AgentError::WorkDirHiddenFromContainers {
            path: "/dev/shm/a".into(),
            mount: "/dev",
        };
        assert!(
            err.to_string().starts_with("--work-dir /dev/shm/a: "),
            "{err}"
        );
    }
}
