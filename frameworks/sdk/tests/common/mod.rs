//! A fake master for driver tests: a real tonic `Scheduler` service on
//! `127.0.0.1:0` that records every call and lets the test push events into
//! each subscription's stream.
//!
//! - Every RPC arrives on `FakeMaster::calls` in arrival order.
//! - `Subscribe` answers `Subscribed{framework_id: <requested id or "fw-1">,
//!   stream_id: "stream-<n>"}` right away (unless a refusal is queued) and
//!   hands the test an [`Events`] sender; dropping it ends the stream.
//! - `Teardown` behaves like the master: it sends an `Error` event on the
//!   current stream and closes it *before* answering the call.
//! - A shared [`Journal`] records, in one order, what the fake saw and what
//!   the test scheduler did, to prove "callback returned before the ack".
#![allow(dead_code)] // each test binary uses a different part

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use corral_sdk::pb::scheduler_server::{Scheduler as SchedulerService, SchedulerServer};
use corral_sdk::pb::{self, event::Event};
use corral_sdk::{
    AgentId, DriverConfig, DriverError, FrameworkId, OfferId, Scheduler, SchedulerClient,
    async_trait,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};

/// Bound on every wait for something the test expects to happen.
pub const WAIT: Duration = Duration::from_secs(10);

/// Waits (bounded) for the next item of `rx`.
pub async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("channel closed while waiting for {what}"),
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

#[derive(Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    pub fn push(&self, entry: impl Into<String>) {
        self.0.lock().expect("journal lock").push(entry.into());
    }
    pub fn entries(&self) -> Vec<String> {
        self.0.lock().expect("journal lock").clone()
    }
}

type EventTx = mpsc::UnboundedSender<Result<pb::Event, Status>>;

/// The test's end of one subscription's stream.
pub struct Events {
    tx: EventTx,
    pub framework_id: String,
    pub stream_id: String,
}

impl Events {
    pub fn send(&self, event: Event) {
        // The driver may already have dropped the stream; tests then notice
        // through what the driver does next.
        let _ = self.tx.send(Ok(pb::Event {
            epoch: 0,
            event: Some(event),
        }));
    }

    /// Ends the stream with an error status.
    pub fn fail(self, status: Status) {
        let _ = self.tx.send(Err(status));
    }
}

pub enum Call {
    Subscribe {
        info: pb::FrameworkInfo,
        /// `None` when the subscription was refused.
        events: Option<Events>,
    },
    Accept(pb::AcceptRequest),
    Decline(pb::DeclineRequest),
    Revive(pb::ReviveRequest),
    Suppress(pb::SuppressRequest),
    Kill(pb::KillRequest),
    Acknowledge(pb::AcknowledgeRequest),
    Reconcile(pb::ReconcileRequest),
    Teardown(pb::TeardownRequest),
    DestroyVolume(pb::DestroyVolumeRequest),
}

impl Call {
    pub fn name(&self) -> &'static str {
        match self {
            Call::Subscribe { .. } => "subscribe",
            Call::Accept(_) => "accept",
            Call::Decline(_) => "decline",
            Call::Revive(_) => "revive",
            Call::Suppress(_) => "suppress",
            Call::Kill(_) => "kill",
            Call::Acknowledge(_) => "acknowledge",
            Call::Reconcile(_) => "reconcile",
            Call::Teardown(_) => "teardown",
            Call::DestroyVolume(_) => "destroy_volume",
        }
    }
}

#[derive(Default)]
struct Script {
    subscribe_refusals: VecDeque<Status>,
    call_failures: HashMap<&'static str, VecDeque<Status>>,
    subscriptions: u64,
    /// The newest stream, weakly: the test's `Events` alone keeps it open.
    current: Option<mpsc::WeakUnboundedSender<Result<pb::Event, Status>>>,
}

struct Service {
    calls: mpsc::UnboundedSender<Call>,
    script: Arc<Mutex<Script>>,
    journal: Journal,
    heartbeat_interval_seconds: f64,
    /// While true, `Acknowledge` calls are recorded on arrival but not
    /// answered, so a test sees how many are in flight at once.
    acks_held: tokio::sync::watch::Receiver<bool>,
}

impl Service {
    fn unary(&self, call: Call) -> Result<Response<pb::CallResponse>, Status> {
        let name = call.name();
        let failure = self
            .script
            .lock()
            .expect("script lock")
            .call_failures
            .get_mut(name)
            .and_then(VecDeque::pop_front);
        self.journal.push(match &call {
            Call::Acknowledge(a) => format!("ack:{}", a.task_id),
            other => other.name().to_string(),
        });
        let _ = self.calls.send(call);
        match failure {
            Some(status) => Err(status),
            None => Ok(Response::new(pb::CallResponse {})),
        }
    }
}

#[tonic::async_trait]
impl SchedulerService for Service {
    type SubscribeStream = UnboundedReceiverStream<Result<pb::Event, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let info = request.into_inner().framework_info.unwrap_or_default();
        self.journal.push("subscribe");
        let mut script = self.script.lock().expect("script lock");
        if let Some(status) = script.subscribe_refusals.pop_front() {
            let _ = self.calls.send(Call::Subscribe { info, events: None });
            return Err(status);
        }
        script.subscriptions += 1;
        let framework_id = if info.id.is_empty() {
            "fw-1".to_string()
        } else {
            info.id.clone()
        };
        let stream_id = format!("stream-{}", script.subscriptions);
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(Ok(pb::Event {
            epoch: 0,
            event: Some(Event::Subscribed(pb::Subscribed {
                registry_id: String::new(),
                framework_id: framework_id.clone(),
                stream_id: stream_id.clone(),
                heartbeat_interval_seconds: self.heartbeat_interval_seconds,
            })),
        }));
        script.current = Some(tx.downgrade());
        drop(script);
        let events = Events {
            tx,
            framework_id,
            stream_id,
        };
        let _ = self.calls.send(Call::Subscribe {
            info,
            events: Some(events),
        });
        Ok(Response::new(UnboundedReceiverStream::new(rx)))
    }

    async fn accept(
        &self,
        r: Request<pb::AcceptRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.unary(Call::Accept(r.into_inner()))
    }
    async fn decline(
        &self,
        r: Request<pb::DeclineRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.unary(Call::Decline(r.into_inner()))
    }
    async fn revive(
        &self,
        r: Request<pb::ReviveRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.unary(Call::Revive(r.into_inner()))
    }
    async fn suppress(
        &self,
        r: Request<pb::SuppressRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.unary(Call::Suppress(r.into_inner()))
    }
    async fn kill(
        &self,
        r: Request<pb::KillRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.unary(Call::Kill(r.into_inner()))
    }
    async fn acknowledge(
        &self,
        r: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        let mut held = self.acks_held.clone();
        let response = self.unary(Call::Acknowledge(r.into_inner()));
        let _ = held.wait_for(|held| !held).await;
        response
    }
    async fn reconcile(
        &self,
        r: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.unary(Call::Reconcile(r.into_inner()))
    }
    async fn teardown(
        &self,
        r: Request<pb::TeardownRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        // Like the master: the stream learns of the teardown before the call
        // returns, which is the race the driver must not report as an error.
        let current = self.script.lock().expect("script lock").current.take();
        if let Some(tx) = current.and_then(|weak| weak.upgrade()) {
            let _ = tx.send(Ok(pb::Event {
                epoch: 0,
                event: Some(Event::Error(pb::Error {
                    message: "framework was torn down".into(),
                })),
            }));
        }
        self.unary(Call::Teardown(r.into_inner()))
    }
    async fn destroy_volume(
        &self,
        r: Request<pb::DestroyVolumeRequest>,
    ) -> Result<Response<pb::CallResponse>, Status> {
        self.unary(Call::DestroyVolume(r.into_inner()))
    }
}

pub struct FakeMaster {
    pub addr: SocketAddr,
    pub calls: mpsc::UnboundedReceiver<Call>,
    pub journal: Journal,
    script: Arc<Mutex<Script>>,
    acks_held: tokio::sync::watch::Sender<bool>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl FakeMaster {
    pub async fn start(heartbeat_interval_seconds: f64) -> FakeMaster {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let script = Arc::new(Mutex::new(Script::default()));
        let journal = Journal::default();
        let (acks_held, acks_held_rx) = tokio::sync::watch::channel(false);
        let service = Service {
            calls: calls_tx,
            script: script.clone(),
            journal: journal.clone(),
            heartbeat_interval_seconds,
            acks_held: acks_held_rx,
        };
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(SchedulerServer::new(service))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = shutdown_rx.await;
                })
                .await;
        });
        FakeMaster {
            addr,
            calls,
            journal,
            script,
            acks_held,
            _shutdown: shutdown_tx,
        }
    }

    /// From now on `Acknowledge` calls arrive on `calls` but get no answer
    /// until [`Self::release_acks`].
    pub fn hold_acks(&self) {
        self.acks_held.send_replace(true);
    }

    /// Answers the held `Acknowledge` calls and stops holding new ones.
    pub fn release_acks(&self) {
        self.acks_held.send_replace(false);
    }

    /// The next `Subscribe` is answered with `status`.
    pub fn refuse_next_subscribe(&self, status: Status) {
        self.script
            .lock()
            .expect("script lock")
            .subscribe_refusals
            .push_back(status);
    }

    /// The next call named `call` (see [`Call::name`]) fails with `status`.
    pub fn fail_next(&self, call: &'static str, status: Status) {
        self.script
            .lock()
            .expect("script lock")
            .call_failures
            .entry(call)
            .or_default()
            .push_back(status);
    }

    pub async fn next_call(&mut self) -> Call {
        next(&mut self.calls, "a call to the fake master").await
    }

    pub async fn expect_subscribe(&mut self) -> (pb::FrameworkInfo, Events) {
        match self.next_call().await {
            Call::Subscribe {
                info,
                events: Some(events),
            } => (info, events),
            Call::Subscribe { events: None, .. } => panic!("expected an accepted subscribe"),
            other => panic!("expected subscribe, got {}", other.name()),
        }
    }

    pub async fn expect_refused_subscribe(&mut self) -> pb::FrameworkInfo {
        match self.next_call().await {
            Call::Subscribe { info, events: None } => info,
            other => panic!("expected a refused subscribe, got {}", other.name()),
        }
    }

    pub async fn expect_reconcile(&mut self) -> pb::ReconcileRequest {
        match self.next_call().await {
            Call::Reconcile(r) => r,
            other => panic!("expected reconcile, got {}", other.name()),
        }
    }

    pub async fn expect_ack(&mut self) -> pb::AcknowledgeRequest {
        match self.next_call().await {
            Call::Acknowledge(a) => a,
            other => panic!("expected acknowledge, got {}", other.name()),
        }
    }

    /// Calls that arrived and were not consumed yet (no waiting).
    pub fn pending_calls(&mut self) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok(call) = self.calls.try_recv() {
            out.push(call.name());
        }
        out
    }
}

pub fn header(framework_id: &str, stream_id: &str) -> Option<pb::CallHeader> {
    Some(pb::CallHeader {
        framework_id: framework_id.into(),
        stream_id: stream_id.into(),
    })
}

/// What the test scheduler saw, in order.
#[derive(Debug)]
pub enum Seen {
    Subscribed(FrameworkId),
    Offers(Vec<pb::Offer>),
    Rescinded(OfferId),
    Update(pb::TaskStatus),
    Failure(AgentId),
    Error(String),
    /// With the result of a `revive` attempted from inside the callback.
    Disconnected(Result<(), DriverError>),
}

/// A scheduler that reports every callback to the test.
pub struct Recorder {
    pub seen: mpsc::UnboundedSender<Seen>,
    pub journal: Journal,
    /// When set, `status_update` waits for one message per update before
    /// returning, so the test controls when the callback is done.
    pub update_gate: Option<mpsc::UnboundedReceiver<()>>,
    /// `status_update` calls `client.stop()` before returning.
    pub stop_on_update: bool,
}

#[async_trait]
impl Scheduler for Recorder {
    async fn subscribed(&mut self, _client: &SchedulerClient, framework_id: &FrameworkId) {
        self.journal.push("cb:subscribed");
        let _ = self.seen.send(Seen::Subscribed(framework_id.clone()));
    }

    async fn offers(&mut self, _client: &SchedulerClient, offers: Vec<pb::Offer>) {
        let _ = self.seen.send(Seen::Offers(offers));
    }

    async fn rescinded(&mut self, _client: &SchedulerClient, offer_id: &OfferId) {
        let _ = self.seen.send(Seen::Rescinded(offer_id.clone()));
    }

    async fn status_update(&mut self, client: &SchedulerClient, status: &pb::TaskStatus) {
        let _ = self.seen.send(Seen::Update(status.clone()));
        if let Some(gate) = &mut self.update_gate {
            let _ = tokio::time::timeout(WAIT, gate.recv()).await;
        }
        if self.stop_on_update {
            client.stop();
        }
        self.journal.push(format!("cb:update:{}", status.task_id));
    }

    async fn failure(&mut self, _client: &SchedulerClient, agent_id: &AgentId) {
        let _ = self.seen.send(Seen::Failure(agent_id.clone()));
    }

    async fn error(&mut self, _client: &SchedulerClient, message: &str) {
        let _ = self.seen.send(Seen::Error(message.to_string()));
    }

    async fn disconnected(&mut self, client: &SchedulerClient) {
        self.journal.push("cb:disconnected");
        let revive = client.revive().await;
        let _ = self.seen.send(Seen::Disconnected(revive));
    }
}

/// Config for tests: fast backoff, default heartbeat tolerance.
pub fn test_config(addr: SocketAddr) -> DriverConfig {
    DriverConfig {
        master: addr.to_string(),
        framework: pb::FrameworkInfo {
            name: "test".into(),
            user: "tester".into(),
            ..Default::default()
        },
        reconnect_backoff_initial: Duration::from_millis(10),
        reconnect_backoff_max: Duration::from_millis(50),
        missed_heartbeats_allowed: 5,
        implicit_acknowledgements: true,
    }
}

pub fn agent_update(task_id: &str, state: pb::TaskState, uuid: u8) -> Event {
    Event::Update(pb::Update {
        status: Some(pb::TaskStatus {
            task_id: task_id.into(),
            state: state as i32,
            source: pb::Source::Agent as i32,
            uuid: vec![uuid; 16],
            agent_id: "agent-1".into(),
            framework_id: "fw-1".into(),
            ..Default::default()
        }),
    })
}

pub fn master_update(task_id: &str, state: pb::TaskState) -> Event {
    Event::Update(pb::Update {
        status: Some(pb::TaskStatus {
            task_id: task_id.into(),
            state: state as i32,
            source: pb::Source::Master as i32,
            reason: pb::Reason::Reconciliation as i32,
            framework_id: "fw-1".into(),
            ..Default::default()
        }),
    })
}
