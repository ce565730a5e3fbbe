//! The batch framework's actor: the one owner of the jobs and the store.
//!
//! Everything arrives as a [`Command`] — API calls, and the master's events
//! forwarded by the SDK's [`corral_sdk::runtime::Forwarder`]. The loop handles every
//! command already queued, then makes the changes durable in **one** store
//! commit, and only then acts: replies to submissions, launches, kills and
//! acknowledgements of status updates. So the store never knows less than the
//! master (no launch it has not recorded, no acknowledged update it could
//! forget) and a burst of updates costs one fsync, not one each. While a
//! commit runs, new commands queue up and form the next group.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::task::now_seconds;
use corral_proto::{AgentId, FrameworkId, OfferId, TaskId, pb};
use corral_sdk::SchedulerClient;
use corral_sdk::runtime::SchedulerEvent;
use tokio::sync::{mpsc, oneshot};

use crate::jobs::{Effect, Jobs, JobsError};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Commands waiting for the actor; senders wait when it is full, which slows
/// the driver (and so the master's stream) instead of growing memory.
const QUEUE: usize = 4096;
/// Most commands handled before a commit, so replies are not held back
/// behind an endless stream of updates.
const MAX_GROUP: usize = 4096;
/// Decline filter when nothing is pending. Long, because REVIVE clears it
/// the moment new work arrives.
const IDLE_REFUSE_SECONDS: f64 = 3600.0;
/// Decline filter when pending tasks did not fit: short, so a changed agent
/// is offered again soon.
const BUSY_REFUSE_SECONDS: f64 = 1.0;
/// Longest sleep between ticks; retries and cron firings are also woken for
/// exactly.
const MAX_TICK: Duration = Duration::from_secs(1);

pub enum Command {
    Submit {
        spec: pb::JobSpec,
        reply: oneshot::Sender<Result<String, JobsError>>,
    },
    Cancel {
        name: String,
        reply: oneshot::Sender<Result<(), JobsError>>,
    },
    Delete {
        name: String,
        reply: oneshot::Sender<Result<(), JobsError>>,
    },
    List {
        reply: oneshot::Sender<Vec<pb::JobSummary>>,
    },
    Get {
        name: String,
        with_tasks: bool,
        reply: oneshot::Sender<Option<pb::JobStatus>>,
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
    launches: Vec<(OfferId, Vec<pb::TaskInfo>)>,
    declines: Vec<OfferId>,
    kills: Vec<Effect>,
    acks: Vec<pb::TaskStatus>,
    reconcile: Vec<Vec<(TaskId, Option<AgentId>)>>,
    save_framework_id: Option<FrameworkId>,
}

struct Actor {
    jobs: Jobs,
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
    /// For launch failures reported by the tasks that send launches; weak,
    /// so the actor still stops when every real handle is gone.
    myself: mpsc::WeakSender<Command>,
    /// Tasks whose launch call has not returned yet.
    in_flight: HashSet<String>,
    outbox: Outbox,
}

/// Starts the actor over a loaded store; returns its handle and the task
/// that ends with an error if the store fails (the framework must stop then:
/// acting on changes it cannot record would lose them).
pub fn spawn(
    jobs: Jobs,
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
    let actor = Actor {
        jobs,
        store,
        client,
        metrics,
        framework_id,
        suppressed: None,
        interest,
        myself: tx.downgrade(),
        in_flight: HashSet::new(),
        outbox: Outbox::default(),
    };
    (Handle { tx }, tokio::spawn(actor.run(rx)))
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) -> Result<(), StoreError> {
        loop {
            let wake = self
                .jobs
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
            let kills = self.jobs.tick(now_seconds());
            self.outbox.kills.extend(kills);
            self.commit().await?;
            self.act();
        }
    }

    fn handle(&mut self, command: Command) {
        let now = now_seconds();
        match command {
            Command::Submit { spec, reply } => {
                let result = self.jobs.submit(spec, now);
                if let Ok(name) = &result {
                    tracing::info!(job = %name, "job submitted");
                }
                self.outbox.replies.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
            Command::Cancel { name, reply } => {
                let result = self.jobs.cancel(&name, now).map(|kills| {
                    tracing::info!(job = %name, "job cancelled");
                    self.outbox.kills.extend(kills);
                });
                self.outbox.replies.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
            Command::Delete { name, reply } => {
                let result = self.jobs.delete(&name);
                if result.is_ok() {
                    tracing::info!(job = %name, "job deleted");
                }
                self.outbox.replies.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
            Command::List { reply } => {
                let list = self
                    .jobs
                    .names()
                    .filter_map(|n| self.jobs.summary(n))
                    .collect();
                let _ = reply.send(list);
            }
            Command::Get {
                name,
                with_tasks,
                reply,
            } => {
                let _ = reply.send(self.jobs.status(&name, with_tasks));
            }
            Command::Metrics { reply } => {
                let states: Vec<_> = self.jobs.job_states().into_iter().collect();
                let _ = reply.send(self.metrics.render(
                    &states,
                    self.jobs.totals(),
                    self.client.stale_epoch_rejected(),
                ));
            }
            Command::UseClient(client) => {
                self.client = client;
                self.suppressed = None;
            }
            Command::Event(SchedulerEvent::Subscribed(id)) => {
                tracing::info!(framework_id = %id, "subscribed");
                if self.framework_id.as_deref() != Some(id.as_str()) {
                    self.outbox.save_framework_id = Some(id);
                }
                // A new subscription starts unsuppressed; and the master may
                // have missed launches or updates while we were away.
                self.suppressed = None;
                // Only launches whose call has returned: the master may not
                // have processed one still in flight and would call it
                // unknown. Those are reconciled when their call returns.
                let tasks = self
                    .jobs
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
                let plan = self.jobs.place(&offers, now);
                let tasks: usize = plan.launches.iter().map(|(_, t)| t.len()).sum();
                self.metrics.launched(tasks);
                self.metrics.offers("used", plan.launches.len());
                self.metrics.offers("declined", plan.declines.len());
                self.outbox.launches.extend(plan.launches);
                self.outbox.declines.extend(plan.declines);
            }
            Command::Event(SchedulerEvent::Update(status)) => {
                let kills = self.jobs.update(&status, now);
                self.outbox.kills.extend(kills);
                for state in self.jobs.take_ended() {
                    self.metrics.attempt_ended(state);
                }
                if status.uuid.is_empty() {
                    // Master-generated: nothing to acknowledge.
                } else if crate::jobs::ends(status.state()) {
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
        }
    }

    fn launch_done(&mut self, task_ids: Vec<String>, failure: Option<LaunchFailure>, now: f64) {
        match failure {
            None => {}
            Some(LaunchFailure {
                refused: true,
                message,
            }) => {
                tracing::warn!(tasks = task_ids.len(), %message, "launch refused; tasks go back to pending");
                self.jobs.launch_failed(&task_ids, &message, now);
                for state in self.jobs.take_ended() {
                    self.metrics.attempt_ended(state);
                }
            }
            Some(LaunchFailure { message, .. }) => {
                // The master may or may not have the tasks: ask it. Unknown
                // ones come back TASK_UNKNOWN and are relaunched.
                tracing::warn!(tasks = task_ids.len(), %message, "launch outcome unknown; reconciling");
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
        let changes = self.jobs.take_changes();
        let id = self.outbox.save_framework_id.take();
        if changes.is_empty() && id.is_none() {
            return Ok(());
        }
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
            tracing::error!(error = %e, "cannot write the batch store; stopping");
        }
        result?;
        if let Some(id) = id {
            self.framework_id = Some(id.to_string());
        }
        Ok(())
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
                // never reached the master, relaunched by the core.
                if !tasks.is_empty()
                    && let Err(e) = client.reconcile(tasks).await
                {
                    tracing::warn!(error = %e, "reconciliation not sent");
                }
            });
        }
        for (offer_id, tasks) in outbox.launches {
            self.in_flight
                .extend(tasks.iter().map(|t| t.task_id.clone()));
            let client = self.client.clone();
            let myself = self.myself.clone();
            tokio::spawn(async move {
                let ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
                let failure = client
                    .launch(&[offer_id], tasks, None)
                    .await
                    .err()
                    .map(|e| LaunchFailure {
                        refused: e.certainly_refused(),
                        message: format!("launch not sent: {e}"),
                    });
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
            let refuse = if self.jobs.has_pending() {
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
        for Effect::Kill { task_id, agent_id } in outbox.kills {
            let client = self.client.clone();
            tokio::spawn(async move {
                if let Err(e) = client.kill(&task_id, agent_id.as_ref()).await {
                    tracing::warn!(%task_id, error = %e, "kill not sent");
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

    /// Suppresses offers while nothing is runnable and revives them when
    /// something is, so an idle batch framework costs the master nothing.
    fn offer_interest(&mut self) {
        if !self.client.is_subscribed() {
            return;
        }
        let want = self.jobs.has_pending();
        if self.suppressed == Some(!want) {
            return;
        }
        self.suppressed = Some(!want);
        let _ = self.interest.send((self.client.clone(), want));
    }
}
