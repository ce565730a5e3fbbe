//! The service framework's actor: the one owner of the services and the
//! store (the batch framework's actor, around the service core).
//!
//! Everything arrives as a [`Command`] — API calls, and the master's events
//! forwarded by the SDK's [`corral_sdk::runtime::Forwarder`]. The loop handles every
//! command already queued, lets the core act on time, then makes the changes
//! durable in **one** store commit, and only then acts: replies to API
//! calls, launches, kills, volume destroys and acknowledgements of final
//! status updates. So the store never knows less than the master (no launch
//! it has not recorded, no acknowledged end of a task it could forget) and a
//! burst of updates costs one fsync, not one each. While a commit runs, new commands
//! queue up and form the next group.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::task::{is_terminal, now_seconds};
use corral_proto::{AgentId, FrameworkId, OfferId, TaskId, VolumeId, pb};
use corral_sdk::runtime::SchedulerEvent;
use corral_sdk::{DriverError, SchedulerClient};
use tokio::sync::{mpsc, oneshot};

use crate::core::{Applied, Change, CoreError, Destroy, Kill, Launch, ServiceStatus, Services};
use crate::metrics::{Metrics, RolloutOutcome};
use crate::spec::Service;
use crate::store::{Store, StoreError};

/// Commands waiting for the actor; senders wait when it is full, which slows
/// the driver (and so the master's stream) instead of growing memory.
const QUEUE: usize = 4096;
/// Most commands handled before a commit, so replies are not held back
/// behind an endless stream of updates.
const MAX_GROUP: usize = 4096;
/// Decline filter when no service wants an instance. Long, because REVIVE
/// clears it the moment one does.
const IDLE_REFUSE_SECONDS: f64 = 3600.0;
/// Decline filter when wanted instances did not fit (or a constraint ruled
/// the agent out): short, so a changed agent is offered again soon.
const BUSY_REFUSE_SECONDS: f64 = 1.0;
/// Longest sleep between ticks; backoffs, health timers and deadlines are
/// also woken for exactly.
const MAX_TICK: Duration = Duration::from_secs(1);

/// What `Apply` did, and the target version after it.
pub type ApplyReply = Result<(Applied, u32), CoreError>;

pub enum Command {
    Apply {
        service: Box<Service>,
        reply: oneshot::Sender<ApplyReply>,
    },
    Scale {
        name: String,
        instances: u32,
        reply: oneshot::Sender<Result<(), CoreError>>,
    },
    Restart {
        name: String,
        reply: oneshot::Sender<Result<u32, CoreError>>,
    },
    Delete {
        name: String,
        reply: oneshot::Sender<Result<(), CoreError>>,
    },
    List {
        reply: oneshot::Sender<Vec<ServiceStatus>>,
    },
    Get {
        name: String,
        reply: oneshot::Sender<Option<ServiceStatus>>,
    },
    Metrics {
        reply: oneshot::Sender<String>,
    },
    /// The client of a new driver (at start, and after the master removed
    /// the framework and it registered anew).
    UseClient(SchedulerClient),
    /// From the driver ([`corral_sdk::runtime::Forwarder`]).
    Event(SchedulerEvent),
    /// A launch call returned. On failure, `refused`: the master certainly
    /// did not take the tasks (never sent, or answered with an error);
    /// otherwise (e.g. a timeout) it may have, and reconciliation tells.
    LaunchDone {
        task_ids: Vec<String>,
        failure: Option<LaunchFailure>,
    },
    /// A persistent volume destroy returned: Ok when the volume is gone
    /// (destroyed, or unknown to the master), else why it failed.
    DestroyDone {
        service: String,
        volume_id: VolumeId,
        result: Result<(), String>,
    },
}

pub struct LaunchFailure {
    refused: bool,
    message: String,
}

/// A cloneable handle to the actor.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    /// Sends a command built around a reply channel and waits for the reply;
    /// None if the actor has stopped.
    pub async fn request<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    async fn send(&self, command: Command) {
        let _ = self.tx.send(command).await;
    }

    pub async fn use_client(&self, client: SchedulerClient) {
        self.send(Command::UseClient(client)).await;
    }

    /// Where scheduler events go ([`corral_sdk::runtime::drive`]).
    pub fn sender(&self) -> mpsc::Sender<Command> {
        self.tx.clone()
    }
}

impl From<SchedulerEvent> for Command {
    fn from(event: SchedulerEvent) -> Self {
        Command::Event(event)
    }
}

/// What to do once the current group is durable.
#[derive(Default)]
struct Outbox {
    replies: Vec<Box<dyn FnOnce() + Send>>,
    launches: Vec<(OfferId, Launch)>,
    declines: Vec<OfferId>,
    kills: Vec<Kill>,
    destroys: Vec<Destroy>,
    acks: Vec<pb::TaskStatus>,
    reconcile: Vec<Vec<(TaskId, Option<AgentId>)>>,
    save_framework_id: Option<FrameworkId>,
}

/// The parts of a service's rollout the metrics follow: (rolling back,
/// failed).
type RolloutView = (bool, bool);

struct Actor {
    services: Services,
    store: Arc<Store>,
    client: SchedulerClient,
    metrics: Arc<Metrics>,
    /// The framework id the store holds.
    framework_id: Option<String>,
    /// Whether we asked the master to stop offers (None: unknown, e.g.
    /// after a new subscription).
    suppressed: Option<bool>,
    /// Suppress (false) / revive (true) calls, sent in order by one task.
    interest: mpsc::UnboundedSender<(SchedulerClient, bool)>,
    /// For launch results reported by the tasks that send launches; weak,
    /// so the actor still stops when every real handle is gone.
    myself: mpsc::WeakSender<Command>,
    /// Tasks whose launch call has not returned yet.
    in_flight: HashSet<String>,
    /// Each service's rollout as last committed, to count how rollouts end.
    rollouts: HashMap<String, RolloutView>,
    outbox: Outbox,
}

/// Starts the actor over restored services; returns its handle and the
/// task that ends with an error if the store fails (the framework must stop
/// then: acting on changes it cannot record would lose them).
pub fn spawn(
    services: Services,
    store: Arc<Store>,
    framework_id: Option<String>,
    client: SchedulerClient,
    metrics: Arc<Metrics>,
) -> (Handle, tokio::task::JoinHandle<Result<(), StoreError>>) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let (interest, mut interest_rx) = mpsc::unbounded_channel::<(SchedulerClient, bool)>();
    tokio::spawn(async move {
        while let Some((client, want)) = interest_rx.recv().await {
            let result = if want {
                client.revive().await
            } else {
                client.suppress().await
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, revive = want, "offer interest not sent");
            }
        }
    });
    let rollouts = services
        .list(now_seconds())
        .into_iter()
        .filter_map(|s| Some((s.name, s.deployment.map(|d| (d.rolling_back, d.failed))?)))
        .collect();
    let actor = Actor {
        services,
        store,
        client,
        metrics,
        framework_id,
        suppressed: None,
        interest,
        myself: tx.downgrade(),
        in_flight: HashSet::new(),
        rollouts,
        outbox: Outbox::default(),
    };
    (Handle { tx }, tokio::spawn(actor.run(rx)))
}

/// The plan's launches grouped by offer, in the order the offers first
/// appear (the core may put several instances, or pods, into one offer).
fn by_offer(launches: Vec<(OfferId, Launch)>) -> Vec<(OfferId, Vec<Launch>)> {
    let mut grouped: Vec<(OfferId, Vec<Launch>)> = Vec::new();
    for (offer_id, launch) in launches {
        match grouped.iter_mut().find(|(id, _)| *id == offer_id) {
            Some((_, list)) => list.push(launch),
            None => grouped.push((offer_id, vec![launch])),
        }
    }
    grouped
}

/// LAUNCH for single tasks; for a pod, CREATE_VOLUME for each persistent
/// volume to create, then LAUNCH_GROUP (the master creates before it
/// launches).
fn operations(launch: Launch) -> Vec<pb::Operation> {
    match launch {
        Launch::Tasks(tasks) => vec![pb::Operation {
            operation: Some(pb::operation::Operation::Launch(pb::Launch { tasks })),
        }],
        Launch::Group { create, group } => {
            let mut ops: Vec<pb::Operation> = create
                .iter()
                .map(|v| SchedulerClient::create_volume(&v.id, v.size.as_f64()))
                .collect();
            ops.push(pb::Operation {
                operation: Some(pb::operation::Operation::LaunchGroup(pb::LaunchGroup {
                    task_group: Some(group),
                })),
            });
            ops
        }
    }
}

/// Done for a destroy: the master destroyed the volume, or has no such
/// volume (destroyed before a crash made us forget that we asked).
fn destroyed(result: Result<(), DriverError>) -> Result<(), String> {
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

fn reply_later<T: Send + 'static>(outbox: &mut Outbox, reply: oneshot::Sender<T>, value: T) {
    outbox.replies.push(Box::new(move || {
        let _ = reply.send(value);
    }));
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), StoreError> {
        loop {
            let wake = self
                .services
                .next_wakeup()
                .map(|at| Duration::from_secs_f64((at - now_seconds()).max(0.0)))
                .unwrap_or(MAX_TICK)
                .min(MAX_TICK);
            let first = tokio::select! {
                command = rx.recv() => match command {
                    Some(command) => Some(command),
                    None => return Ok(()),
                },
                () = tokio::time::sleep(wake) => None,
            };
            if let Some(command) = first {
                self.handle(command);
                for _ in 1..MAX_GROUP {
                    match rx.try_recv() {
                        Ok(command) => self.handle(command),
                        Err(_) => break,
                    }
                }
            }
            let now = now_seconds();
            let kills = self.services.tick(now);
            self.outbox.kills.extend(kills);
            let destroys = self.services.take_destroys(now);
            self.outbox.destroys.extend(destroys);
            self.commit().await?;
            self.act();
        }
    }

    fn handle(&mut self, command: Command) {
        let now = now_seconds();
        match command {
            Command::Apply { service, reply } => {
                let name = service.name.clone();
                let result = self.services.apply(*service, now).map(|(applied, kills)| {
                    tracing::info!(service = %name, ?applied, "service applied");
                    self.outbox.kills.extend(kills);
                    let version = self.services.status(&name, now).map_or(0, |s| s.version);
                    (applied, version)
                });
                reply_later(&mut self.outbox, reply, result);
            }
            Command::Scale {
                name,
                instances,
                reply,
            } => {
                let result = self.services.scale(&name, instances, now).map(|kills| {
                    tracing::info!(service = %name, instances, "service scaled");
                    self.outbox.kills.extend(kills);
                });
                reply_later(&mut self.outbox, reply, result);
            }
            Command::Restart { name, reply } => {
                let result = self.services.restart(&name, now).map(|(version, kills)| {
                    tracing::info!(service = %name, version, "rolling restart");
                    self.outbox.kills.extend(kills);
                    version
                });
                reply_later(&mut self.outbox, reply, result);
            }
            Command::Delete { name, reply } => {
                let result = self.services.delete(&name, now).map(|kills| {
                    tracing::info!(service = %name, "service deleted; killing its instances");
                    self.outbox.kills.extend(kills);
                });
                reply_later(&mut self.outbox, reply, result);
            }
            Command::List { reply } => {
                let _ = reply.send(self.services.list(now));
            }
            Command::Get { name, reply } => {
                let _ = reply.send(self.services.status(&name, now));
            }
            Command::Metrics { reply } => {
                let _ = reply.send(
                    self.metrics
                        .render(&self.services.list(now), self.client.stale_epoch_rejected()),
                );
            }
            Command::UseClient(client) => {
                self.client = client;
                self.suppressed = None;
            }
            Command::Event(SchedulerEvent::Subscribed(id)) => {
                tracing::info!(framework_id = %id, "subscribed");
                if self.framework_id.as_deref() != Some(id.as_str()) {
                    if self.framework_id.is_some() {
                        // Registered anew: the master removed the old
                        // framework and destroyed its volumes with it.
                        tracing::warn!(framework_id = %id, "registered as a new framework; the old one's persistent volumes are gone");
                        self.services.forget_volumes();
                    }
                    self.outbox.save_framework_id = Some(id);
                }
                // A new subscription starts unsuppressed; and the master may
                // have missed launches or updates while we were away.
                self.suppressed = None;
                // Only launches whose call has returned: the master may not
                // have processed one still in flight and would call it
                // unknown. Those are reconciled when their call returns.
                let tasks = self
                    .services
                    .launched()
                    .into_iter()
                    .filter(|(id, _)| !self.in_flight.contains(id.as_str()))
                    .collect();
                self.outbox.reconcile.push(tasks);
            }
            Command::Event(SchedulerEvent::Disconnected) => {
                tracing::warn!("disconnected from the master; the driver re-subscribes");
            }
            Command::Event(SchedulerEvent::Offers(offers)) => {
                let plan = self.services.place(&offers, now);
                let instances: usize = plan
                    .launches
                    .iter()
                    .map(|(_, launch)| match launch {
                        Launch::Tasks(tasks) => tasks.len(),
                        Launch::Group { .. } => 1,
                    })
                    .sum();
                for (service, why) in &plan.unplaceable {
                    tracing::debug!(%service, %why, "wanted instances not placed");
                }
                self.metrics.launched(instances);
                self.metrics.offers("used", plan.launches.len());
                self.metrics.offers("declined", plan.declines.len());
                self.outbox.launches.extend(plan.launches);
                self.outbox.declines.extend(plan.declines);
            }
            Command::Event(SchedulerEvent::Update(status)) => {
                let state = status.state();
                let kills = self.services.update(&status, now);
                self.outbox.kills.extend(kills);
                if status.uuid.is_empty() {
                    // Master-generated (reconciliation): nothing to
                    // acknowledge, and not a new ending to count.
                } else if is_terminal(state) {
                    // Counted per agent update: a lost acknowledgement
                    // (resent by the agent) can count one ending twice.
                    self.metrics.task_ended(state, status.reason());
                    self.outbox.acks.push(status);
                } else {
                    // Losing a non-final state is harmless (reconciliation
                    // restores it), so it need not wait for the commit; and
                    // the agent holds the task's final update back until
                    // this one is acknowledged.
                    self.acknowledge(status);
                }
            }
            Command::LaunchDone { task_ids, failure } => {
                for id in &task_ids {
                    self.in_flight.remove(id);
                }
                self.launch_done(task_ids, failure, now);
            }
            Command::DestroyDone {
                service,
                volume_id,
                result,
            } => {
                match &result {
                    Ok(()) => {
                        tracing::info!(%service, %volume_id, "persistent volume destroyed");
                    }
                    Err(e) => {
                        tracing::warn!(%service, %volume_id, error = %e, "persistent volume not destroyed; retrying");
                    }
                }
                self.services
                    .destroy_done(&service, volume_id.as_str(), result, now);
            }
        }
    }

    fn launch_done(&mut self, task_ids: Vec<String>, failure: Option<LaunchFailure>, now: f64) {
        match failure {
            None => {}
            Some(LaunchFailure {
                refused: true,
                message,
            }) => {
                tracing::warn!(tasks = ?task_ids, %message, "launch refused; the instance is replaced after its backoff");
                self.services.launch_failed(&task_ids, &message, now);
            }
            Some(LaunchFailure { message, .. }) => {
                // The master may or may not have the tasks: ask it. Unknown
                // ones come back TASK_UNKNOWN and are replaced.
                tracing::warn!(tasks = ?task_ids, %message, "launch outcome unknown; reconciling");
                let tasks = task_ids
                    .iter()
                    .filter_map(|id| TaskId::parse(id, "task_id").ok())
                    .map(|id| (id, None))
                    .collect();
                self.outbox.reconcile.push(tasks);
            }
        }
    }

    /// Makes every change so far durable (one transaction), on the blocking
    /// pool: an fsync must not stall the runtime.
    async fn commit(&mut self) -> Result<(), StoreError> {
        let changes = self.services.take_changes();
        let id = self.outbox.save_framework_id.take();
        if changes.is_empty() && id.is_none() {
            return Ok(());
        }
        self.count_rollouts(&changes);
        let store = self.store.clone();
        let id_text = id.as_ref().map(ToString::to_string);
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            if let Some(id) = &id_text {
                store.save_framework_id(id)?;
            }
            store.apply(changes)
        })
        .await
        .unwrap_or_else(|e| {
            Err(StoreError {
                path: self.store.path().to_path_buf(),
                message: format!("commit task failed: {e}"),
            })
        });
        self.metrics.commit(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot write the service store; stopping");
        }
        result?;
        if let Some(id) = id {
            self.framework_id = Some(id.to_string());
        }
        Ok(())
    }

    /// Counts rollouts that ended, from the service records about to be
    /// written: the records are the one place every rollout change passes.
    fn count_rollouts(&mut self, changes: &[Change]) {
        for change in changes {
            let Change::Service(name, meta) = change else {
                continue;
            };
            let now = meta
                .as_ref()
                .filter(|m| !m.deleting)
                .and_then(|m| m.rollout.as_ref())
                .map(|r| (r.rolling_back, r.failed));
            let before = match now {
                Some(view) => self.rollouts.insert(name.clone(), view),
                None => self.rollouts.remove(name),
            };
            let deleted = meta.as_ref().is_none_or(|m| m.deleting);
            let outcome = match (before, now) {
                (Some((_, false)), None) if !deleted => Some(RolloutOutcome::Completed),
                (Some((false, false)), Some((true, false))) => Some(RolloutOutcome::RolledBack),
                (Some((_, false)), Some((_, true))) => Some(RolloutOutcome::Failed),
                _ => None,
            };
            if let Some(outcome) = outcome {
                tracing::info!(service = %name, ?outcome, "rollout ended");
                self.metrics.rollout_ended(outcome);
            }
        }
    }

    /// Everything that waited for durability.
    fn act(&mut self) {
        let outbox = std::mem::take(&mut self.outbox);
        for reply in outbox.replies {
            reply();
        }
        for tasks in outbox.reconcile {
            let client = self.client.clone();
            tokio::spawn(async move {
                // Unknown tasks come back as TASK_UNKNOWN: launches that
                // never reached the master, replaced by the core.
                if !tasks.is_empty()
                    && let Err(e) = client.reconcile(tasks).await
                {
                    tracing::warn!(error = %e, "reconciliation not sent");
                }
            });
        }
        for (offer_id, launches) in by_offer(outbox.launches) {
            let ids: Vec<String> = launches.iter().flat_map(Launch::task_ids).collect();
            self.in_flight.extend(ids.iter().cloned());
            let operations = launches.into_iter().flat_map(operations).collect();
            let client = self.client.clone();
            let myself = self.myself.clone();
            tokio::spawn(async move {
                // One ACCEPT per offer: the master consumes an offer with
                // its first ACCEPT, so a second one would be refused.
                let failure = client
                    .accept(std::slice::from_ref(&offer_id), operations, None)
                    .await
                    .err()
                    .map(|e| LaunchFailure {
                        refused: e.certainly_refused(),
                        message: format!("launch not sent: {e}"),
                    });
                if failure.as_ref().is_some_and(|f| f.refused) {
                    // A refused ACCEPT (e.g. a volume create the master
                    // would not do) leaves the offer outstanding: hand it
                    // back rather than hold the agent's resources.
                    let filters = pb::Filters {
                        refuse_seconds: Some(BUSY_REFUSE_SECONDS),
                    };
                    let _ = client.decline(&[offer_id], Some(filters)).await;
                }
                if let Some(tx) = myself.upgrade() {
                    let _ = tx
                        .send(Command::LaunchDone {
                            task_ids: ids,
                            failure,
                        })
                        .await;
                }
            });
        }
        if !outbox.declines.is_empty() {
            let refuse = if self.services.wants_offers() {
                BUSY_REFUSE_SECONDS
            } else {
                IDLE_REFUSE_SECONDS
            };
            let client = self.client.clone();
            let declines = outbox.declines;
            tokio::spawn(async move {
                let filters = pb::Filters {
                    refuse_seconds: Some(refuse),
                };
                let _ = client.decline(&declines, Some(filters)).await;
            });
        }
        for Kill { task_id, agent_id } in outbox.kills {
            let client = self.client.clone();
            tokio::spawn(async move {
                if let Err(e) = client.kill(&task_id, agent_id.as_ref()).await {
                    tracing::warn!(%task_id, error = %e, "kill not sent");
                }
            });
        }
        for Destroy { service, volume_id } in outbox.destroys {
            let client = self.client.clone();
            let myself = self.myself.clone();
            tokio::spawn(async move {
                let result = destroyed(client.destroy_volume(&volume_id).await);
                if let Some(tx) = myself.upgrade() {
                    let _ = tx
                        .send(Command::DestroyDone {
                            service,
                            volume_id,
                            result,
                        })
                        .await;
                }
            });
        }
        for status in outbox.acks {
            self.acknowledge(status);
        }
        self.offer_interest();
    }

    fn acknowledge(&self, status: pb::TaskStatus) {
        let client = self.client.clone();
        tokio::spawn(async move {
            // A lost acknowledgement is resent by the agent's retry.
            let _ = client.acknowledge(&status).await;
        });
    }

    /// Suppresses offers while no service wants an instance launched and
    /// revives them when one does, so a steady service framework costs the
    /// master nothing.
    fn offer_interest(&mut self) {
        if !self.client.is_subscribed() {
            return;
        }
        let want = self.services.wants_offers();
        if self.suppressed == Some(!want) {
            return;
        }
        self.suppressed = Some(!want);
        let _ = self.interest.send((self.client.clone(), want));
    }
}
