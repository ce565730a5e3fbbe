//! The driver: owns the subscription to the master and feeds the scheduler.
//!
//! One loop, on the task that awaits [`Driver::run`]: subscribe, call
//! `subscribed`, queue an implicit reconciliation, then hand each event to the
//! scheduler in order until the stream is lost, the master ends it, or the
//! framework stops. A lost stream (error, end, or no event for
//! `missed_heartbeats_allowed` heartbeat intervals) means `disconnected` and a
//! re-subscription with the same framework id after a jittered, capped
//! exponential backoff, forever, as the Mesos scheduler driver does.
//!
//! Acknowledgements and the implicit reconciliation go through a small
//! background queue polled inside `run`, so a slow master delays them, not
//! event delivery; up to [`MAX_CALLS_IN_FLIGHT`] of its calls are in flight
//! at once, so acknowledgement throughput is not one round trip per update.
//! A lost acknowledgement is harmless: the agent resends the update, and the
//! driver re-acknowledges it without delivering it again.
//!
//! With [`DriverConfig::implicit_acknowledgements`] off, the driver never
//! acknowledges agent updates and delivers every copy of one; the scheduler
//! acknowledges through [`SchedulerClient::acknowledge`] when it is ready.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use corral_proto::leader::{
    EpochFence, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT, MasterList, leader_hint,
};
use corral_proto::pb::{self, event::Event};
use corral_proto::{AgentId, FrameworkId, OfferId};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tonic::transport::Endpoint;

use crate::backoff::Backoff;
use crate::client::{CALL_TIMEOUT, Control, Grpc, SchedulerClient, Session};
use crate::error::DriverError;
use crate::recent::{RECENT_UUIDS, RecentUuids};
use crate::scheduler::Scheduler;

/// First re-subscribe delay: quick enough to ride out a master restart.
pub const DEFAULT_RECONNECT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Longest re-subscribe delay: a framework notices a returned master within this.
pub const DEFAULT_RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Heartbeats missed before the stream counts as lost (Mesos' scheduler
/// library uses 5 as well).
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 5;

/// TCP connect timeout towards the master.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connect + `Subscribe` + first event; past this the attempt is retried.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(15);
/// Cap on the heartbeat interval the master announces, so an absurd value
/// cannot disable loss detection or overflow the deadline arithmetic.
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);
/// How long `stop()` waits for queued acknowledgements: each normally takes
/// one round trip, and a stopping framework should not hang on a dead master.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Floor for the heartbeat interval, so a tiny value cannot make every
/// stream look lost at once.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
/// Background calls (acknowledgements, reconciliation) waiting to be sent; when
/// full, acknowledgements are dropped and the agents' retries cover them.
const BACKGROUND_QUEUE: usize = 1024;
/// Background calls sent concurrently. One at a time caps acknowledgements at
/// one per round trip (~1000/s at 1 ms), below what a busy batch framework
/// produces (hundreds of tasks per second, 2–3 updates each); 64 leaves
/// ample headroom while staying far below the HTTP/2 concurrent-stream limit
/// and the master's command queue.
const MAX_CALLS_IN_FLIGHT: usize = 64;

/// How to reach the master and who the framework is.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// `host:port` of the master (an `http://` URL is accepted too), or of
    /// several masters separated by commas: the driver finds the leader,
    /// follows it when it changes, and drops events of a deposed leader.
    pub master: String,
    /// Sent on every `Subscribe`. Set `id` to fail over to an existing
    /// framework; the driver fills it in itself when re-subscribing.
    pub framework: pb::FrameworkInfo,
    pub reconnect_backoff_initial: Duration,
    pub reconnect_backoff_max: Duration,
    /// Heartbeat intervals without any event before the stream counts as lost
    /// (0 is treated as 1).
    pub missed_heartbeats_allowed: u32,
    /// Whether the driver acknowledges agent status updates itself (default
    /// `true`); Mesos' scheduler driver calls this `implicitAcknowledgements`.
    ///
    /// `true`: each agent update is acknowledged once `status_update` has
    /// returned, and a re-sent copy of an update already delivered (same
    /// uuid, remembered for the last few thousand) is acknowledged again
    /// without being delivered twice.
    ///
    /// `false`: the driver never acknowledges agent updates. The scheduler
    /// calls [`SchedulerClient::acknowledge`] with the status once it has
    /// made the update durable, from any task and at any time (e.g. after a
    /// group commit to its store). Until then the agent resends the update
    /// with backoff and holds back the task's next update, and the driver
    /// delivers every copy, because the scheduler may not have acknowledged
    /// (or persisted) the first one yet, or may have crashed before it did.
    /// So `status_update` sees duplicates (same uuid), also of updates it
    /// already acknowledged when that acknowledgement was lost, and must
    /// treat them idempotently: persist once, acknowledge again. An
    /// acknowledgement that fails (e.g. [`DriverError::NotSubscribed`] while
    /// the driver re-subscribes) can simply be dropped: the agent resends.
    /// Master-generated updates (empty uuid) need no acknowledgement in
    /// either mode.
    pub implicit_acknowledgements: bool,
}

impl DriverConfig {
    /// A config with the default backoff and heartbeat tolerance, and
    /// implicit acknowledgements.
    pub fn new(master: impl Into<String>, framework: pb::FrameworkInfo) -> Self {
        Self {
            master: master.into(),
            framework,
            reconnect_backoff_initial: DEFAULT_RECONNECT_BACKOFF_INITIAL,
            reconnect_backoff_max: DEFAULT_RECONNECT_BACKOFF_MAX,
            missed_heartbeats_allowed: DEFAULT_MISSED_HEARTBEATS,
            implicit_acknowledgements: true,
        }
    }
}

/// Runs a [`Scheduler`] against the master; see the module docs.
#[derive(Debug)]
pub struct Driver {
    config: DriverConfig,
    client: SchedulerClient,
}

impl Driver {
    /// A driver and the client that calls through it. Nothing happens until
    /// [`run`](Driver::run).
    pub fn new(config: DriverConfig) -> (Driver, SchedulerClient) {
        // An invalid configured id is reported by `run`.
        let framework_id = FrameworkId::parse(&config.framework.id, "framework_info.id").ok();
        let client = SchedulerClient::new(framework_id);
        (
            Driver {
                config,
                client: client.clone(),
            },
            client,
        )
    }

    /// Subscribes and delivers events to `scheduler` until stopped.
    ///
    /// Returns `Ok` after [`SchedulerClient::stop`] or a successful
    /// [`SchedulerClient::teardown`]; `Err` when the configuration is invalid,
    /// the master removed the framework or refused it as invalid, or the
    /// master ended the subscription with an `Error` event (in the last
    /// cases `scheduler.error` is called first). Lost connections are never
    /// returned: the driver re-subscribes.
    pub async fn run<S: Scheduler>(self, mut scheduler: S) -> Result<(), DriverError> {
        let result = self.run_inner(&mut scheduler).await;
        self.client.set_session(None);
        result
    }

    async fn run_inner<S: Scheduler + ?Sized>(&self, scheduler: &mut S) -> Result<(), DriverError> {
        let masters = masters_for(&self.config.master)?;
        if !self.config.framework.id.is_empty() {
            FrameworkId::parse(&self.config.framework.id, "framework_info.id")
                .map_err(|e| DriverError::InvalidArgument(e.to_string()))?;
        }
        let (jobs_tx, jobs_rx) = mpsc::channel(BACKGROUND_QUEUE);
        let mut runner = Runner {
            config: &self.config,
            masters,
            fence: EpochFence::new(),
            client: self.client.clone(),
            control: self.client.shared.control.subscribe(),
            jobs: jobs_tx,
            recent: RecentUuids::new(RECENT_UUIDS),
        };
        let client = self.client.clone();
        let send = move |call| send_background(client.clone(), call);
        // Polled together in this task, so both end with `run`, no spawn.
        tokio::select! {
            result = runner.run(scheduler) => result,
            never = background(jobs_rx, MAX_CALLS_IN_FLIGHT, send) => match never {},
        }
    }
}

/// `host:port`, or several separated by commas, each checked.
fn masters_for(text: &str) -> Result<MasterList, DriverError> {
    let invalid = |reason: String| DriverError::InvalidMaster {
        address: text.to_string(),
        reason,
    };
    if text.trim().is_empty() {
        return Err(invalid("must not be empty".to_string()));
    }
    let masters = corral_proto::leader::parse_masters(text).map_err(invalid)?;
    for m in &masters {
        endpoint_for(m)?;
    }
    Ok(MasterList::new(masters))
}

/// `host:port` (or a URL) to a gRPC endpoint.
fn endpoint_for(master: &str) -> Result<Endpoint, DriverError> {
    let invalid = |reason: String| DriverError::InvalidMaster {
        address: master.to_string(),
        reason,
    };
    if master.trim().is_empty() {
        return Err(invalid("must not be empty".to_string()));
    }
    let uri = if master.contains("://") {
        master.to_string()
    } else {
        format!("http://{master}")
    };
    let endpoint = Endpoint::from_shared(uri).map_err(|e| invalid(e.to_string()))?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// Work for the background queue.
enum Job {
    Call(BackgroundCall),
    /// Answered when every call queued before it has completed.
    Flush(oneshot::Sender<()>),
}

/// Calls made off the event path.
enum BackgroundCall {
    Acknowledge {
        agent_id: String,
        task_id: String,
        uuid: Vec<u8>,
    },
    ImplicitReconcile,
}

/// Sends queued calls, up to `max_in_flight` at once, each on whatever
/// subscription is current when it is sent. Calls start in queue order but
/// may complete in any order.
///
/// Reordering is safe. Acknowledgements of one task never race each other:
/// the agent sends a task's next update only after the previous one was
/// acknowledged (see `agent/src/status_updates.rs`), so a task has at most
/// one acknowledgement queued or in flight, apart from re-acknowledgements
/// of the same uuid, which the agent ignores once the first one landed. The
/// implicit reconciliation asks for the master's current view, which no
/// acknowledgement changes.
async fn background<F, Fut>(
    mut jobs: mpsc::Receiver<Job>,
    max_in_flight: usize,
    send: F,
) -> Infallible
where
    F: Fn(BackgroundCall) -> Fut,
    Fut: Future<Output = ()>,
{
    let max_in_flight = max_in_flight.max(1);
    let mut in_flight = FuturesUnordered::new();
    loop {
        // While all slots are taken, calls wait in the (bounded) queue.
        tokio::select! {
            biased;
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
            job = jobs.recv(), if in_flight.len() < max_in_flight => match job {
                Some(Job::Call(call)) => in_flight.push(send(call)),
                Some(Job::Flush(done)) => {
                    // Each call is bounded by `CALL_TIMEOUT`, and `flush`
                    // stops waiting after `FLUSH_TIMEOUT` anyway.
                    while in_flight.next().await.is_some() {}
                    let _ = done.send(());
                }
                // The runner holds the sender; it is only dropped with `run`.
                None => return std::future::pending().await,
            },
        }
    }
}

/// Sends one background call; failures are logged, never retried.
async fn send_background(client: SchedulerClient, call: BackgroundCall) {
    match call {
        BackgroundCall::Acknowledge {
            agent_id,
            task_id,
            uuid,
        } => {
            if let Err(error) = client
                .acknowledge_parts(agent_id, task_id.clone(), uuid)
                .await
            {
                // The agent resends unacknowledged updates; the next copy
                // gets acknowledged.
                tracing::debug!(%task_id, %error, "acknowledgement not sent");
            }
        }
        BackgroundCall::ImplicitReconcile => {
            if let Err(error) = client.reconcile(Vec::new()).await {
                tracing::warn!(%error, "implicit reconciliation failed");
            }
        }
    }
}

/// A subscription that delivered its `Subscribed` event.
struct Subscription {
    grpc: Grpc,
    stream: tonic::Streaming<pb::Event>,
    framework_id: FrameworkId,
    stream_id: String,
    /// `None` when the master announced no usable heartbeat interval.
    loss_window: Option<Duration>,
}

/// Why a subscription attempt did not produce one.
enum AttemptError {
    /// Worth retrying after backoff.
    Transient(DriverError),
    /// A standby answered; try the leader it named (or the next master),
    /// at once unless [`MasterList::not_leader`] says to back off.
    NotLeader { error: DriverError, at_once: bool },
    /// Stop the driver: `(error for run, message for scheduler.error)`.
    Fatal(DriverError, String),
}

/// How a subscription ended.
enum SessionEnd {
    Stopped,
    Lost(String),
    Fatal(DriverError, String),
}

struct Runner<'a> {
    config: &'a DriverConfig,
    masters: MasterList,
    /// The highest leader epoch seen, per registry.
    fence: EpochFence,
    client: SchedulerClient,
    control: watch::Receiver<Control>,
    jobs: mpsc::Sender<Job>,
    recent: RecentUuids,
}

impl Runner<'_> {
    async fn run<S: Scheduler + ?Sized>(&mut self, scheduler: &mut S) -> Result<(), DriverError> {
        let mut backoff = Backoff::new(
            self.config.reconnect_backoff_initial,
            self.config.reconnect_backoff_max,
        );
        // The first attempt, and one right after a standby's answer, go
        // without backoff.
        let mut at_once = true;
        loop {
            if self.control_now().is_done() {
                return Ok(());
            }
            if !at_once {
                let delay = backoff.next_delay(&mut rand::rng());
                tracing::debug!(?delay, "re-subscribing after backoff");
                let mut control = self.control.clone();
                tokio::select! {
                    biased;
                    () = stopped(&mut control) => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            at_once = false;

            let mut control = self.control.clone();
            let attempt = tokio::select! {
                biased;
                () = stopped(&mut control) => return Ok(()),
                attempt = self.subscribe_once() => attempt,
            };
            let subscription = match attempt {
                Ok(subscription) => subscription,
                Err(AttemptError::NotLeader {
                    error,
                    at_once: now,
                }) => {
                    tracing::debug!(%error, "not the leader; trying the next master");
                    at_once = now;
                    continue;
                }
                Err(AttemptError::Transient(error)) => {
                    self.masters.reached();
                    tracing::warn!(master = %self.config.master, %error, "subscribe failed; will retry");
                    continue;
                }
                Err(AttemptError::Fatal(error, message)) => {
                    scheduler.error(&self.client, &message).await;
                    return Err(error);
                }
            };
            backoff.reset();
            match self.serve(scheduler, subscription).await {
                SessionEnd::Stopped => return Ok(()),
                SessionEnd::Lost(why) => {
                    tracing::warn!(reason = %why, "subscription lost; will re-subscribe");
                    scheduler.disconnected(&self.client).await;
                }
                SessionEnd::Fatal(error, message) => {
                    scheduler.error(&self.client, &message).await;
                    return Err(error);
                }
            }
        }
    }

    fn count_stale(&self) {
        self.client
            .shared
            .stale_epoch_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn control_now(&self) -> Control {
        *self.control.borrow()
    }

    async fn subscribe_once(&mut self) -> Result<Subscription, AttemptError> {
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.try_subscribe()).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::Transient(DriverError::Timeout {
                call: "subscribe",
                after: SUBSCRIBE_TIMEOUT,
            })),
        }
    }

    async fn try_subscribe(&mut self) -> Result<Subscription, AttemptError> {
        let mut info = self.config.framework.clone();
        let known_id = self.client.framework_id();
        if let Some(id) = &known_id {
            info.id = id.to_string();
        }
        let target = self.masters.next_target();
        let endpoint = endpoint_for(&target).map_err(AttemptError::Transient)?;
        let channel = endpoint.connect().await.map_err(|source| {
            AttemptError::Transient(DriverError::Transport {
                master: target.clone(),
                source,
            })
        })?;
        let mut grpc = Grpc::new(channel);
        let framework_id = info.id.clone();
        let response = grpc
            .subscribe(pb::SubscribeRequest {
                framework_info: Some(info),
            })
            .await
            .map_err(|status| {
                if status.code() == tonic::Code::Unavailable {
                    let at_once = self.masters.not_leader(leader_hint(&status));
                    return AttemptError::NotLeader {
                        error: DriverError::from_status(status),
                        at_once,
                    };
                }
                classify(status, &framework_id)
            })?;
        let mut stream = response.into_inner();
        let first = stream
            .message()
            .await
            .map_err(|status| classify(status, &framework_id))?;
        let epoch = first.as_ref().map_or(0, |e| e.epoch);
        let subscribed = match first.and_then(|e| e.event) {
            Some(Event::Subscribed(s)) => {
                if let Err(e) = self.fence.admit_leader(&s.registry_id, epoch) {
                    self.count_stale();
                    tracing::warn!(master = %target, "{e}; subscription refused");
                    return Err(AttemptError::Transient(DriverError::Protocol(
                        e.to_string(),
                    )));
                }
                s
            }
            Some(Event::Error(e)) => {
                return Err(AttemptError::Fatal(
                    DriverError::Terminated {
                        framework_id,
                        message: e.message.clone(),
                    },
                    e.message,
                ));
            }
            Some(other) => {
                return Err(AttemptError::Transient(DriverError::Protocol(format!(
                    "first event was {}, expected SUBSCRIBED",
                    event_name(&other)
                ))));
            }
            None => {
                return Err(AttemptError::Transient(DriverError::Protocol(
                    "stream ended before SUBSCRIBED".to_string(),
                )));
            }
        };
        let id = FrameworkId::parse(&subscribed.framework_id, "subscribed.framework_id")
            .map_err(|e| AttemptError::Transient(DriverError::Protocol(e.to_string())))?;
        if subscribed.stream_id.is_empty() {
            return Err(AttemptError::Transient(DriverError::Protocol(
                "subscribed.stream_id: must not be empty".to_string(),
            )));
        }
        if let Some(known) = known_id.filter(|known| *known != id) {
            tracing::error!(
                requested = %known, assigned = %id,
                "master assigned a different framework id on re-subscription"
            );
        }
        self.masters.connected(&target);
        Ok(Subscription {
            grpc,
            stream,
            framework_id: id,
            stream_id: subscribed.stream_id,
            loss_window: loss_window(
                subscribed.heartbeat_interval_seconds,
                self.config.missed_heartbeats_allowed,
            ),
        })
    }

    /// Delivers one subscription's events until it ends.
    async fn serve<S: Scheduler + ?Sized>(
        &mut self,
        scheduler: &mut S,
        subscription: Subscription,
    ) -> SessionEnd {
        let Subscription {
            grpc,
            mut stream,
            framework_id,
            stream_id,
            loss_window,
        } = subscription;
        tracing::info!(%framework_id, %stream_id, "subscribed");
        self.client.set_framework_id(framework_id.clone());
        self.client.set_session(Some(Session {
            grpc,
            header: pb::CallHeader {
                framework_id: framework_id.to_string(),
                stream_id,
            },
        }));
        scheduler.subscribed(&self.client, &framework_id).await;
        self.enqueue(BackgroundCall::ImplicitReconcile);

        let end = loop {
            // Measured from when the previous event was handled, so a slow
            // callback does not count against the master.
            let deadline = loss_window.map(|w| Instant::now() + w);
            let mut control = self.control.clone();
            let next = tokio::select! {
                biased;
                () = stopped(&mut control) => break SessionEnd::Stopped,
                next = next_event(&mut stream, deadline) => next,
            };
            let event = match next {
                Some(Ok(Some(event))) => event,
                Some(Ok(None)) => break SessionEnd::Lost("the master closed the stream".into()),
                Some(Err(status)) => match classify(status, framework_id.as_str()) {
                    AttemptError::Transient(error) | AttemptError::NotLeader { error, .. } => {
                        break SessionEnd::Lost(error.to_string());
                    }
                    AttemptError::Fatal(error, message) => break SessionEnd::Fatal(error, message),
                },
                None => {
                    break SessionEnd::Lost(format!(
                        "no event for {:?} ({} missed heartbeats)",
                        loss_window.unwrap_or_default(),
                        self.config.missed_heartbeats_allowed.max(1)
                    ));
                }
            };
            if let Err(e) = self.fence.admit(event.epoch) {
                self.count_stale();
                tracing::warn!("{e}; event dropped, looking for the leader");
                break SessionEnd::Lost(e.to_string());
            }
            if let Some(end) = self.dispatch(scheduler, event, &framework_id).await {
                break end;
            }
        };
        if matches!(end, SessionEnd::Stopped) && self.control_now() == Control::Stopped {
            self.flush().await;
        }
        self.client.set_session(None);
        // A teardown in flight explains the master ending the stream (with an
        // `Error` event or by closing it): not a failure once it succeeds.
        if !matches!(end, SessionEnd::Stopped) && self.settle_teardown().await {
            tracing::debug!("subscription ended by our teardown");
            return SessionEnd::Stopped;
        }
        end
    }

    /// Waits (bounded) for a teardown call in flight; true when it succeeded
    /// or the driver was stopped meanwhile.
    async fn settle_teardown(&mut self) -> bool {
        if self.control_now() == Control::TearingDown {
            let settled = self.control.wait_for(|c| *c != Control::TearingDown);
            let _ = tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), settled).await;
        }
        self.control_now().is_done()
    }

    /// Hands one event to the scheduler; `Some` ends the subscription.
    async fn dispatch<S: Scheduler + ?Sized>(
        &mut self,
        scheduler: &mut S,
        event: pb::Event,
        framework_id: &FrameworkId,
    ) -> Option<SessionEnd> {
        // An empty event carries nothing to deliver.
        let client = &self.client;
        match event.event? {
            Event::Subscribed(_) => {
                tracing::warn!("ignoring a second SUBSCRIBED on one stream");
            }
            Event::Offers(offers) => scheduler.offers(client, offers.offers).await,
            Event::Rescind(rescind) => {
                match OfferId::parse(&rescind.offer_id, "rescind.offer_id") {
                    Ok(offer_id) => scheduler.rescinded(client, &offer_id).await,
                    Err(error) => tracing::warn!(%error, "ignoring RESCIND"),
                }
            }
            Event::Update(update) => match update.status {
                Some(status) => self.update(scheduler, status).await,
                None => tracing::warn!("ignoring UPDATE without a status"),
            },
            Event::Failure(failure) => {
                match AgentId::parse(&failure.agent_id, "failure.agent_id") {
                    Ok(agent_id) => scheduler.failure(client, &agent_id).await,
                    Err(error) => tracing::warn!(%error, "ignoring FAILURE"),
                }
            }
            Event::Error(error) => {
                return Some(SessionEnd::Fatal(
                    DriverError::Terminated {
                        framework_id: framework_id.to_string(),
                        message: error.message.clone(),
                    },
                    error.message,
                ));
            }
            Event::Heartbeat(_) => {}
        }
        None
    }

    async fn update<S: Scheduler + ?Sized>(&mut self, scheduler: &mut S, status: pb::TaskStatus) {
        if status.uuid.is_empty() {
            // Master-generated: nothing to acknowledge, nothing to dedupe.
            scheduler.status_update(&self.client, &status).await;
            return;
        }
        if !self.config.implicit_acknowledgements {
            // The scheduler acknowledges. A copy of an update it has not
            // acknowledged yet (or whose acknowledgement was lost) must
            // reach it again, or the agent would resend it forever.
            scheduler.status_update(&self.client, &status).await;
            return;
        }
        if self.recent.contains(&status.uuid) {
            tracing::debug!(task_id = %status.task_id, "duplicate update; acknowledging again");
        } else {
            scheduler.status_update(&self.client, &status).await;
            self.recent.insert(status.uuid.clone());
        }
        self.enqueue(BackgroundCall::Acknowledge {
            agent_id: status.agent_id,
            task_id: status.task_id,
            uuid: status.uuid,
        });
    }

    /// Waits (bounded) until the background calls queued so far were sent,
    /// e.g. the acknowledgement of the update whose callback called `stop`.
    async fn flush(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.jobs.try_send(Job::Flush(done_tx)).is_ok() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, done_rx).await;
        }
    }

    fn enqueue(&self, call: BackgroundCall) {
        if self.jobs.try_send(Job::Call(call)).is_err() {
            tracing::warn!("background call queue full; dropping a call (agents resend updates)");
        }
    }
}

/// Resolves once the driver is asked to stop.
async fn stopped(control: &mut watch::Receiver<Control>) {
    // The sender lives in the client's shared state, which outlives `run`, so
    // an error here cannot happen; treat it as a stop all the same.
    let _ = control.wait_for(|c| c.is_done()).await;
}

/// The next stream item, or `None` when `deadline` passed first.
async fn next_event(
    stream: &mut tonic::Streaming<pb::Event>,
    deadline: Option<Instant>,
) -> Option<Result<Option<pb::Event>, tonic::Status>> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, stream.message())
            .await
            .ok(),
        None => Some(stream.message().await),
    }
}

/// No event for this long means the stream is lost. `None` when the master
/// announced no positive, finite interval (then only transport errors count).
fn loss_window(heartbeat_interval_seconds: f64, missed_allowed: u32) -> Option<Duration> {
    if !(heartbeat_interval_seconds.is_finite() && heartbeat_interval_seconds > 0.0) {
        tracing::warn!(
            heartbeat_interval_seconds,
            "master announced no usable heartbeat interval; heartbeat loss detection is off"
        );
        return None;
    }
    let interval = Duration::try_from_secs_f64(heartbeat_interval_seconds)
        .unwrap_or(MAX_HEARTBEAT_INTERVAL)
        .clamp(MIN_HEARTBEAT_INTERVAL, MAX_HEARTBEAT_INTERVAL);
    Some(interval.saturating_mul(missed_allowed.max(1)))
}

/// Sorts a refusal of the master into retry or give up.
///
/// Fatal: `NotFound` (the master does not know the framework id), and
/// `PermissionDenied`/`FailedPrecondition` saying the framework was removed
/// or torn down: re-subscribing cannot bring the framework back. Also
/// `InvalidArgument`: the same `FrameworkInfo` would be refused forever.
/// Everything else (unavailable master, leader change, ...) is retried.
fn classify(status: tonic::Status, framework_id: &str) -> AttemptError {
    let message = status.message().to_string();
    let lower = message.to_ascii_lowercase();
    let removed = match status.code() {
        tonic::Code::NotFound => true,
        tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition => {
            ["removed", "torn down", "teardown", "tore down"]
                .iter()
                .any(|w| lower.contains(w))
        }
        _ => false,
    };
    if removed {
        let error = DriverError::FrameworkRemoved {
            framework_id: framework_id.to_string(),
            message: message.clone(),
        };
        AttemptError::Fatal(error, message)
    } else if status.code() == tonic::Code::InvalidArgument {
        AttemptError::Fatal(DriverError::from_status(status), message)
    } else {
        AttemptError::Transient(DriverError::from_status(status))
    }
}

fn event_name(event: &Event) -> &'static str {
    match event {
        Event::Subscribed(_) => "SUBSCRIBED",
        Event::Offers(_) => "OFFERS",
        Event::Rescind(_) => "RESCIND",
        Event::Update(_) => "UPDATE",
        Event::Failure(_) => "FAILURE",
        Event::Error(_) => "ERROR",
        Event::Heartbeat(_) => "HEARTBEAT",
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A stand-in for the master: records the calls it is sent and holds
    /// each one until `release` is set.
    #[derive(Clone)]
    struct HeldCalls {
        started: Arc<Mutex<Vec<String>>>,
        finished: Arc<AtomicUsize>,
        in_flight: Arc<AtomicUsize>,
        most_in_flight: Arc<AtomicUsize>,
        release: watch::Sender<bool>,
    }

    impl HeldCalls {
        fn new() -> Self {
            Self {
                started: Arc::default(),
                finished: Arc::default(),
                in_flight: Arc::default(),
                most_in_flight: Arc::default(),
                release: watch::channel(false).0,
            }
        }

        fn send(&self) -> impl Fn(BackgroundCall) -> futures::future::BoxFuture<'static, ()> {
            let this = self.clone();
            move |call| {
                let this = this.clone();
                let mut release = this.release.subscribe();
                Box::pin(async move {
                    let name = match call {
                        BackgroundCall::Acknowledge { task_id, .. } => task_id,
                        BackgroundCall::ImplicitReconcile => "reconcile".to_string(),
                    };
                    this.started.lock().expect("lock").push(name);
                    let now = this.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    this.most_in_flight.fetch_max(now, Ordering::SeqCst);
                    let _ = release.wait_for(|r| *r).await;
                    this.in_flight.fetch_sub(1, Ordering::SeqCst);
                    this.finished.fetch_add(1, Ordering::SeqCst);
                })
            }
        }

        fn started(&self) -> Vec<String> {
            self.started.lock().expect("lock").clone()
        }
    }

    fn ack(task_id: &str) -> Job {
        Job::Call(BackgroundCall::Acknowledge {
            agent_id: "agent-1".into(),
            task_id: task_id.into(),
            uuid: vec![1; 16],
        })
    }

    /// Polls the background loop until it can make no more progress without
    /// outside help (a few polls, in case tokio's cooperative budget made it
    /// yield).
    async fn settle(mut background: std::pin::Pin<&mut impl Future<Output = Infallible>>) {
        for _ in 0..8 {
            assert!(futures::poll!(background.as_mut()).is_pending());
        }
    }

    #[tokio::test]
    async fn background_calls_run_concurrently_up_to_the_limit_in_queue_order() {
        let calls = HeldCalls::new();
        let (tx, rx) = mpsc::channel(100);
        for i in 0..10 {
            tx.try_send(ack(&format!("t{i}"))).expect("queued");
        }
        let mut background = pin!(background(rx, 4, calls.send()));
        settle(background.as_mut()).await;
        assert_eq!(calls.started(), ["t0", "t1", "t2", "t3"]);
        assert_eq!(calls.finished.load(Ordering::SeqCst), 0);

        calls.release.send_replace(true);
        settle(background.as_mut()).await;
        assert_eq!(calls.finished.load(Ordering::SeqCst), 10);
        let expected: Vec<String> = (0..10).map(|i| format!("t{i}")).collect();
        assert_eq!(calls.started(), expected);
        assert_eq!(calls.most_in_flight.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn flush_answers_once_every_call_queued_before_it_completed() {
        let calls = HeldCalls::new();
        let (tx, rx) = mpsc::channel(100);
        let (done_tx, mut done) = oneshot::channel();
        tx.try_send(ack("t0")).expect("queued");
        tx.try_send(Job::Call(BackgroundCall::ImplicitReconcile))
            .expect("queued");
        tx.try_send(Job::Flush(done_tx)).expect("queued");
        tx.try_send(ack("t1")).expect("queued");
        let mut background = pin!(background(rx, MAX_CALLS_IN_FLIGHT, calls.send()));
        settle(background.as_mut()).await;
        assert_eq!(calls.started(), ["t0", "reconcile"]);
        assert!(done.try_recv().is_err(), "flushed with calls in flight");

        calls.release.send_replace(true);
        settle(background.as_mut()).await;
        assert!(done.try_recv().is_ok(), "flush answered");
        assert_eq!(calls.started(), ["t0", "reconcile", "t1"]);
        assert_eq!(calls.finished.load(Ordering::SeqCst), 3);
    }

    fn is_fatal(code: tonic::Code, message: &str) -> bool {
        matches!(
            classify(tonic::Status::new(code, message), "fw"),
            AttemptError::Fatal(..)
        )
    }

    #[test]
    fn removal_and_invalid_requests_are_fatal_everything_else_is_retried() {
        use tonic::Code;
        assert!(is_fatal(Code::NotFound, "framework fw is unknown"));
        assert!(is_fatal(Code::PermissionDenied, "framework fw was removed"));
        assert!(is_fatal(
            Code::FailedPrecondition,
            "framework fw was Torn Down"
        ));
        assert!(is_fatal(Code::InvalidArgument, "framework_info.role: bad"));
        assert!(!is_fatal(Code::PermissionDenied, "not the leading master"));
        assert!(!is_fatal(Code::FailedPrecondition, "master is recovering"));
        assert!(!is_fatal(Code::Unavailable, "framework fw was removed"));
        assert!(!is_fatal(Code::Internal, "oops"));
    }

    #[test]
    fn loss_window_is_interval_times_allowed_misses() {
        assert_eq!(loss_window(2.0, 5), Some(Duration::from_secs(10)));
        assert_eq!(loss_window(0.5, 0), Some(Duration::from_millis(500)));
        assert_eq!(loss_window(0.0, 5), None);
        assert_eq!(loss_window(f64::NAN, 5), None);
        assert_eq!(loss_window(-1.0, 5), None);
        assert_eq!(loss_window(1e300, 2), Some(MAX_HEARTBEAT_INTERVAL * 2));
        assert_eq!(loss_window(1e-12, 1), Some(MIN_HEARTBEAT_INTERVAL));
    }

    #[test]
    fn master_address_becomes_an_http_endpoint() {
        assert!(endpoint_for("127.0.0.1:5050").is_ok());
        assert!(endpoint_for("http://master:5050").is_ok());
        assert!(matches!(
            endpoint_for(""),
            Err(DriverError::InvalidMaster { .. })
        ));
        assert!(matches!(
            endpoint_for("bad host:5050"),
            Err(DriverError::InvalidMaster { .. })
        ));
    }
}
