//! The calls a framework makes to the master.
//!
//! A [`SchedulerClient`] reads the driver's current subscription (a gRPC
//! channel plus the `CallHeader` of the live stream) and sends one unary call
//! on it. The driver is the only writer of that state; the client only reads
//! it, under a short std mutex never held across an `.await`.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use corral_proto::pb::{self, scheduler_client::SchedulerClient as GrpcClient};
use corral_proto::{AgentId, FrameworkId, OfferId, TaskId, VolumeId};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::error::DriverError;

pub(crate) type Grpc = GrpcClient<Channel>;

/// How long one unary call may take: long enough for a loaded master, short
/// enough that a black-holed connection does not hang a scheduler forever.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// What the framework asked the driver to do, watched by the run loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    Running,
    /// A `Teardown` call is in flight: the master may end the stream before
    /// the call returns, and that is not a failure.
    TearingDown,
    /// `stop()`: `run` sends the acknowledgements still queued (bounded)
    /// and returns `Ok`.
    Stopped,
    /// A teardown succeeded: the framework is gone, `run` returns `Ok`.
    TornDown,
}

impl Control {
    /// True when `run` should end.
    pub(crate) fn is_done(self) -> bool {
        matches!(self, Control::Stopped | Control::TornDown)
    }
}

/// The live subscription: where to send calls and how to identify them.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) grpc: Grpc,
    pub(crate) header: pb::CallHeader,
}

pub(crate) struct Shared {
    /// Events refused for their old leader epoch (from a deposed leader).
    pub(crate) stale_epoch_rejected: std::sync::atomic::AtomicU64,
    session: Mutex<Option<Session>>,
    /// Survives lost subscriptions: re-subscribing reuses it.
    framework_id: Mutex<Option<FrameworkId>>,
    pub(crate) control: watch::Sender<Control>,
}

/// Lock a mutex whose data stays consistent even if a holder panicked (each
/// critical section is a single assignment or clone).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A handle for calling the master; cheap to clone, usable from any task.
///
/// Calls go to the driver's current subscription and fail fast with
/// [`DriverError::NotSubscribed`] while there is none.
#[derive(Clone)]
pub struct SchedulerClient {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for SchedulerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedulerClient")
            .field("framework_id", &self.framework_id())
            .field("subscribed", &self.is_subscribed())
            .finish()
    }
}

impl SchedulerClient {
    pub(crate) fn new(framework_id: Option<FrameworkId>) -> Self {
        let (control, _) = watch::channel(Control::Running);
        Self {
            shared: Arc::new(Shared {
                stale_epoch_rejected: std::sync::atomic::AtomicU64::new(0),
                session: Mutex::new(None),
                framework_id: Mutex::new(framework_id),
                control,
            }),
        }
    }

    pub(crate) fn set_session(&self, session: Option<Session>) {
        *lock(&self.shared.session) = session;
    }

    pub(crate) fn set_framework_id(&self, id: FrameworkId) {
        *lock(&self.shared.framework_id) = Some(id);
    }

    fn session(&self) -> Result<Session, DriverError> {
        lock(&self.shared.session)
            .clone()
            .ok_or(DriverError::NotSubscribed)
    }

    /// The framework id, once the master assigned one (or the one configured
    /// in `DriverConfig::framework.id` for a failover).
    pub fn framework_id(&self) -> Option<FrameworkId> {
        lock(&self.shared.framework_id).clone()
    }

    /// How many events the driver refused because their leader epoch was
    /// lower than one it had seen: messages of a deposed leader. Frameworks
    /// export it as `corral_<framework>_stale_epoch_rejected_total`.
    pub fn stale_epoch_rejected(&self) -> u64 {
        self.shared
            .stale_epoch_rejected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True while the driver holds a live subscription.
    pub fn is_subscribed(&self) -> bool {
        lock(&self.shared.session).is_some()
    }

    /// Launches `tasks` on the resources of `offer_ids` (all from one agent).
    /// `filters` apply to what the tasks leave unused.
    pub async fn launch(
        &self,
        offer_ids: &[OfferId],
        tasks: Vec<pb::TaskInfo>,
        filters: Option<pb::Filters>,
    ) -> Result<(), DriverError> {
        let launch = pb::Operation {
            operation: Some(pb::operation::Operation::Launch(pb::Launch { tasks })),
        };
        self.accept(offer_ids, vec![launch], filters).await
    }

    /// Launches a pod (Mesos LAUNCH_GROUP): every task of `group` on the
    /// offers' agent, sharing a network namespace and the group's volumes,
    /// or none of them (each then gets TASK_ERROR naming the problem).
    pub async fn launch_group(
        &self,
        offer_ids: &[OfferId],
        group: pb::TaskGroupInfo,
        filters: Option<pb::Filters>,
    ) -> Result<(), DriverError> {
        let launch = pb::Operation {
            operation: Some(pb::operation::Operation::LaunchGroup(pb::LaunchGroup {
                task_group: Some(group),
            })),
        };
        self.accept(offer_ids, vec![launch], filters).await
    }

    /// The operation that reserves `disk_mib` of the accepted offers' disk
    /// as the persistent volume `id` on their agent; put it before the
    /// `LaunchGroup` that mounts it (`PodVolume.persistent`) in one
    /// [`accept`](Self::accept).
    pub fn create_volume(id: &VolumeId, disk_mib: f64) -> pb::Operation {
        pb::Operation {
            operation: Some(pb::operation::Operation::CreateVolume(pb::CreateVolume {
                volume_id: id.to_string(),
                disk_mib,
            })),
        }
    }

    /// Deletes the persistent volume `id` and its data, and frees its disk.
    /// Fails with `NOT_FOUND` for a volume the framework does not have and
    /// `FAILED_PRECONDITION` while a live task mounts it.
    pub async fn destroy_volume(&self, id: &VolumeId) -> Result<(), DriverError> {
        let volume_id = id.to_string();
        self.unary("destroy_volume", |mut grpc, header| async move {
            grpc.destroy_volume(pb::DestroyVolumeRequest {
                header: Some(header),
                volume_id,
            })
            .await
        })
        .await
    }

    /// Accepts offers with the given operations (`Launch`, `LaunchGroup`,
    /// `CreateVolume`), applied in order.
    pub async fn accept(
        &self,
        offer_ids: &[OfferId],
        operations: Vec<pb::Operation>,
        filters: Option<pb::Filters>,
    ) -> Result<(), DriverError> {
        let offer_ids = strings(offer_ids);
        self.unary("accept", |mut grpc, header| async move {
            grpc.accept(pb::AcceptRequest {
                header: Some(header),
                offer_ids,
                operations,
                filters,
            })
            .await
        })
        .await
    }

    /// Declines offers; `filters.refuse_seconds` keeps the agents' resources
    /// away from this framework for that long (master default: 5 s).
    pub async fn decline(
        &self,
        offer_ids: &[OfferId],
        filters: Option<pb::Filters>,
    ) -> Result<(), DriverError> {
        let offer_ids = strings(offer_ids);
        self.unary("decline", |mut grpc, header| async move {
            grpc.decline(pb::DeclineRequest {
                header: Some(header),
                offer_ids,
                filters,
            })
            .await
        })
        .await
    }

    /// Clears all decline filters and resumes offers after `suppress`.
    pub async fn revive(&self) -> Result<(), DriverError> {
        self.unary("revive", |mut grpc, header| async move {
            grpc.revive(pb::ReviveRequest {
                header: Some(header),
            })
            .await
        })
        .await
    }

    /// Stops offers until `revive`.
    pub async fn suppress(&self) -> Result<(), DriverError> {
        self.unary("suppress", |mut grpc, header| async move {
            grpc.suppress(pb::SuppressRequest {
                header: Some(header),
            })
            .await
        })
        .await
    }

    /// Kills a task with its own kill grace period.
    pub async fn kill(
        &self,
        task_id: &TaskId,
        agent_id: Option<&AgentId>,
    ) -> Result<(), DriverError> {
        self.kill_request(task_id, agent_id, None).await
    }

    /// Kills a task, overriding its kill grace period (SIGTERM → SIGKILL).
    pub async fn kill_with_grace(
        &self,
        task_id: &TaskId,
        agent_id: Option<&AgentId>,
        grace: Duration,
    ) -> Result<(), DriverError> {
        self.kill_request(task_id, agent_id, Some(grace.as_secs_f64()))
            .await
    }

    async fn kill_request(
        &self,
        task_id: &TaskId,
        agent_id: Option<&AgentId>,
        kill_grace_period_seconds: Option<f64>,
    ) -> Result<(), DriverError> {
        let task_id = task_id.to_string();
        let agent_id = agent_id.map(AgentId::to_string).unwrap_or_default();
        self.unary("kill", |mut grpc, header| async move {
            grpc.kill(pb::KillRequest {
                header: Some(header),
                task_id,
                agent_id,
                kill_grace_period_seconds,
            })
            .await
        })
        .await
    }

    /// Asks for the latest state of the listed tasks (explicit
    /// reconciliation; unknown tasks come back as `TASK_UNKNOWN`), or of all
    /// non-terminal tasks when `tasks` is empty (implicit). The answers arrive
    /// as status updates.
    pub async fn reconcile(
        &self,
        tasks: Vec<(TaskId, Option<AgentId>)>,
    ) -> Result<(), DriverError> {
        let tasks = tasks
            .into_iter()
            .map(|(task_id, agent_id)| pb::ReconcileTask {
                task_id: task_id.to_string(),
                agent_id: agent_id.map(|a| a.to_string()).unwrap_or_default(),
            })
            .collect();
        self.unary("reconcile", |mut grpc, header| async move {
            grpc.reconcile(pb::ReconcileRequest {
                header: Some(header),
                tasks,
            })
            .await
        })
        .await
    }

    /// Acknowledges an agent status update, so the agent stops resending it
    /// and sends the task's next one. Needed only with
    /// [`DriverConfig::implicit_acknowledgements`] off; otherwise the driver
    /// does it after `status_update` returns. A master-generated update
    /// (empty uuid) needs no acknowledgement: this returns `Ok` without a
    /// call.
    ///
    /// Cheap to call from many tasks at once: calls share one HTTP/2
    /// connection and do not wait for each other. A failed acknowledgement
    /// (e.g. [`DriverError::NotSubscribed`] during a re-subscription) needs no
    /// retry: the agent resends the update, and the driver delivers it again.
    ///
    /// [`DriverConfig::implicit_acknowledgements`]: crate::DriverConfig::implicit_acknowledgements
    pub async fn acknowledge(&self, status: &pb::TaskStatus) -> Result<(), DriverError> {
        if status.uuid.is_empty() {
            return Ok(());
        }
        self.acknowledge_parts(
            status.agent_id.clone(),
            status.task_id.clone(),
            status.uuid.clone(),
        )
        .await
    }

    pub(crate) async fn acknowledge_parts(
        &self,
        agent_id: String,
        task_id: String,
        uuid: Vec<u8>,
    ) -> Result<(), DriverError> {
        self.unary("acknowledge", |mut grpc, header| async move {
            grpc.acknowledge(pb::AcknowledgeRequest {
                header: Some(header),
                agent_id,
                task_id,
                uuid,
            })
            .await
        })
        .await
    }

    /// Kills all of the framework's tasks and removes the framework. On
    /// success the driver stops and `run` returns `Ok`; the master ending the
    /// stream meanwhile is expected and not reported as an error.
    pub async fn teardown(&self) -> Result<(), DriverError> {
        let control = &self.shared.control;
        control.send_if_modified(|c| {
            let running = *c == Control::Running;
            if running {
                *c = Control::TearingDown;
            }
            running
        });
        let result = self
            .unary("teardown", |mut grpc, header| async move {
                grpc.teardown(pb::TeardownRequest {
                    header: Some(header),
                })
                .await
            })
            .await;
        control.send_if_modified(|c| {
            let tearing_down = *c == Control::TearingDown;
            if tearing_down {
                *c = if result.is_ok() {
                    Control::TornDown
                } else {
                    Control::Running
                };
            }
            tearing_down
        });
        result
    }

    /// Ends `run` (with `Ok`) without tearing the framework down: its tasks
    /// keep running and a new driver with the same framework id can take over
    /// within the framework's failover timeout. Acknowledgements the driver
    /// still has queued are sent first (for at most a couple of seconds), so
    /// updates already delivered are not delivered again to the next
    /// instance. With explicit acknowledgements, finish your own
    /// `acknowledge` calls before stopping: once `run` returned they fail with
    /// [`DriverError::NotSubscribed`] (and the agent resends those updates to
    /// the next instance).
    pub fn stop(&self) {
        self.shared.control.send_if_modified(|c| {
            let was_done = c.is_done();
            if !was_done {
                *c = Control::Stopped;
            }
            !was_done
        });
    }

    /// Sends one unary call on the current subscription. `send` gets an owned
    /// gRPC client (clones share one connection) and the call header.
    ///
    /// The session lock is held only to clone the session, never across the
    /// call, so concurrent calls (e.g. many acknowledgements) proceed in
    /// parallel, multiplexed as HTTP/2 streams on the one connection.
    async fn unary<F, Fut>(&self, call: &'static str, send: F) -> Result<(), DriverError>
    where
        F: FnOnce(Grpc, pb::CallHeader) -> Fut,
        Fut: Future<Output = Result<tonic::Response<pb::CallResponse>, tonic::Status>>,
    {
        let Session { grpc, header } = self.session()?;
        tracing::debug!(call, stream_id = %header.stream_id, "calling master");
        match tokio::time::timeout(CALL_TIMEOUT, send(grpc, header)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(DriverError::from_status(status)),
            Err(_) => Err(DriverError::Timeout {
                call,
                after: CALL_TIMEOUT,
            }),
        }
    }
}

fn strings(ids: &[OfferId]) -> Vec<String> {
    ids.iter().map(OfferId::to_string).collect()
}
