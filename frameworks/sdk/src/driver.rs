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
//! event delivery. A lost acknowledgement is harmless: the agent resends the
//! update, and the driver re-acknowledges it without delivering it again.

use std::convert::Infallible;
use std::time::Duration;

use corral_proto::pb::{self, event::Event};
use corral_proto::{AgentId, FrameworkId, OfferId};
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

/// How to reach the master and who the framework is.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// `host:port` of the master (an `http://` URL is accepted too).
    pub master: String,
    /// Sent on every `Subscribe`. Set `id` to fail over to an existing
    /// framework; the driver fills it in itself when re-subscribing.
    pub framework: pb::FrameworkInfo,
    pub reconnect_backoff_initial: Duration,
    pub reconnect_backoff_max: Duration,
    /// Heartbeat intervals without any event before the stream counts as lost
    /// (0 is treated as 1).
    pub missed_heartbeats_allowed: u32,
}

impl DriverConfig {
    /// A config with the default backoff and heartbeat tolerance.
    pub fn new(master: impl Into<String>, framework: pb::FrameworkInfo) -> Self {
        Self {
            master: master.into(),
            framework,
            reconnect_backoff_initial: DEFAULT_RECONNECT_BACKOFF_INITIAL,
            reconnect_backoff_max: DEFAULT_RECONNECT_BACKOFF_MAX,
            missed_heartbeats_allowed: DEFAULT_MISSED_HEARTBEATS,
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
        let endpoint = endpoint_for(&self.config.master)?;
        if !self.config.framework.id.is_empty() {
            FrameworkId::parse(&self.config.framework.id, "framework_info.id")
                .map_err(|e| DriverError::InvalidArgument(e.to_string()))?;
        }
        let (jobs_tx, jobs_rx) = mpsc::channel(BACKGROUND_QUEUE);
        let mut runner = Runner {
            config: &self.config,
            endpoint,
            client: self.client.clone(),
            control: self.client.shared.control.subscribe(),
            jobs: jobs_tx,
            recent: RecentUuids::new(RECENT_UUIDS),
        };
        // Polled together in this task, so both end with `run`, no spawn.
        tokio::select! {
            result = runner.run(scheduler) => result,
            never = background(self.client.clone(), jobs_rx) => match never {},
        }
    }
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
    Ok(endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
}

/// Calls made off the event path.
enum Job {
    Acknowledge {
        agent_id: String,
        task_id: String,
        uuid: Vec<u8>,
    },
    ImplicitReconcile,
    /// Answered when every job queued before it was handled.
    Flush(oneshot::Sender<()>),
}

/// Sends queued calls one at a time, in queue order, on whatever
/// subscription is current when each is sent.
async fn background(client: SchedulerClient, mut jobs: mpsc::Receiver<Job>) -> Infallible {
    loop {
        let Some(job) = jobs.recv().await else {
            // The runner holds the sender; it is only dropped with `run`.
            return std::future::pending().await;
        };
        match job {
            Job::Acknowledge {
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
            Job::ImplicitReconcile => {
                if let Err(error) = client.reconcile(Vec::new()).await {
                    tracing::warn!(%error, "implicit reconciliation failed");
                }
            }
            Job::Flush(done) => {
                let _ = done.send(());
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
    endpoint: Endpoint,
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
        let mut first_attempt = true;
        loop {
            if self.control_now().is_done() {
                return Ok(());
            }
            if !first_attempt {
                let delay = backoff.next_delay(&mut rand::rng());
                tracing::debug!(?delay, "re-subscribing after backoff");
                let mut control = self.control.clone();
                tokio::select! {
                    biased;
                    () = stopped(&mut control) => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            first_attempt = false;

            let mut control = self.control.clone();
            let attempt = tokio::select! {
                biased;
                () = stopped(&mut control) => return Ok(()),
                attempt = self.subscribe_once() => attempt,
            };
            let subscription = match attempt {
                Ok(subscription) => subscription,
                Err(AttemptError::Transient(error)) => {
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

    fn control_now(&self) -> Control {
        *self.control.borrow()
    }

    async fn subscribe_once(&self) -> Result<Subscription, AttemptError> {
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.try_subscribe()).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::Transient(DriverError::Timeout {
                call: "subscribe",
                after: SUBSCRIBE_TIMEOUT,
            })),
        }
    }

    async fn try_subscribe(&self) -> Result<Subscription, AttemptError> {
        let mut info = self.config.framework.clone();
        let known_id = self.client.framework_id();
        if let Some(id) = &known_id {
            info.id = id.to_string();
        }
        let channel = self.endpoint.connect().await.map_err(|source| {
            AttemptError::Transient(DriverError::Transport {
                master: self.config.master.clone(),
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
            .map_err(|status| classify(status, &framework_id))?;
        let mut stream = response.into_inner();
        let first = stream
            .message()
            .await
            .map_err(|status| classify(status, &framework_id))?;
        let subscribed = match first.and_then(|e| e.event) {
            Some(Event::Subscribed(s)) => s,
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
        self.enqueue(Job::ImplicitReconcile);

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
                    AttemptError::Transient(error) => break SessionEnd::Lost(error.to_string()),
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
        if self.recent.contains(&status.uuid) {
            tracing::debug!(task_id = %status.task_id, "duplicate update; acknowledging again");
        } else {
            scheduler.status_update(&self.client, &status).await;
            self.recent.insert(status.uuid.clone());
        }
        self.enqueue(Job::Acknowledge {
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

    fn enqueue(&self, job: Job) {
        if self.jobs.try_send(job).is_err() {
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
    use super::*;

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
