//! The driver against a fake master over real gRPC on 127.0.0.1.

mod common;

use std::time::Duration;

use common::{
    Call, Events, FakeMaster, Journal, Recorder, Seen, WAIT, agent_update, header, master_update,
    next, test_config,
};
use corral_sdk::pb::{self, TaskState, event::Event};
use corral_sdk::{AgentId, Driver, DriverConfig, DriverError, OfferId, SchedulerClient, TaskId};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A running driver with a [`Recorder`] scheduler, connected to a fake master.
struct Harness {
    master: FakeMaster,
    client: SchedulerClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    run: JoinHandle<Result<(), DriverError>>,
    /// Opens the update gate once per message, when the recorder has one.
    gate: Option<mpsc::UnboundedSender<()>>,
}

struct Options {
    heartbeat_interval_seconds: f64,
    gated_updates: bool,
    stop_on_update: bool,
    configure: fn(&mut DriverConfig),
    before_run: fn(&FakeMaster),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            // Long enough that heartbeat loss never interferes, unless a test
            // is about it.
            heartbeat_interval_seconds: 60.0,
            gated_updates: false,
            stop_on_update: false,
            configure: |_| {},
            before_run: |_| {},
        }
    }
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with(Options::default()).await
    }

    async fn start_with(options: Options) -> Harness {
        let master = FakeMaster::start(options.heartbeat_interval_seconds).await;
        (options.before_run)(&master);
        let mut config = test_config(master.addr);
        (options.configure)(&mut config);
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (gate, update_gate) = if options.gated_updates {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let recorder = Recorder {
            seen: seen_tx,
            journal: master.journal.clone(),
            update_gate,
            stop_on_update: options.stop_on_update,
        };
        let (driver, client) = Driver::new(config);
        // Spawning also proves the `run` future is `Send`.
        let run = tokio::spawn(driver.run(recorder));
        Harness {
            master,
            client,
            seen,
            run,
            gate,
        }
    }

    /// Starts and completes the first subscription: `subscribed` seen and the
    /// implicit reconcile received.
    async fn subscribed() -> (Harness, Events) {
        Self::subscribed_with(Options::default()).await
    }

    async fn subscribed_with(options: Options) -> (Harness, Events) {
        let mut h = Self::start_with(options).await;
        let (_, events) = h.master.expect_subscribe().await;
        h.expect_subscribed("fw-1").await;
        h.master.expect_reconcile().await;
        (h, events)
    }

    async fn next_seen(&mut self) -> Seen {
        next(&mut self.seen, "a scheduler callback").await
    }

    async fn expect_subscribed(&mut self, framework_id: &str) {
        match self.next_seen().await {
            Seen::Subscribed(id) => assert_eq!(id.as_str(), framework_id),
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    async fn expect_update(&mut self) -> pb::TaskStatus {
        match self.next_seen().await {
            Seen::Update(status) => status,
            other => panic!("expected an update, got {other:?}"),
        }
    }

    async fn finish(self) -> (Result<(), DriverError>, FakeMaster) {
        let (result, master, _) = self.finish_with_seen().await;
        (result, master)
    }

    /// Waits for `run` to end; also returns the callbacks not consumed yet.
    async fn finish_with_seen(
        self,
    ) -> (
        Result<(), DriverError>,
        FakeMaster,
        mpsc::UnboundedReceiver<Seen>,
    ) {
        let result = tokio::time::timeout(WAIT, self.run)
            .await
            .expect("run ends in time")
            .expect("run does not panic");
        (result, self.master, self.seen)
    }

    fn journal(&self) -> Journal {
        self.master.journal.clone()
    }
}

fn task(id: &str) -> TaskId {
    TaskId::parse(id, "task_id").expect("valid task id")
}

#[tokio::test]
async fn subscribe_delivers_subscribed_then_sends_an_implicit_reconcile() {
    let mut h = Harness::start().await;
    assert!(matches!(
        h.client.revive().await,
        Err(DriverError::NotSubscribed)
    ));

    let (info, _events) = h.master.expect_subscribe().await;
    assert!(info.id.is_empty(), "first subscription asks for a new id");
    assert_eq!(info.name, "test");
    h.expect_subscribed("fw-1").await;
    let reconcile = h.master.expect_reconcile().await;
    assert!(reconcile.tasks.is_empty(), "implicit reconciliation");
    assert_eq!(reconcile.header, header("fw-1", "stream-1"));
    assert_eq!(
        h.journal().entries(),
        ["subscribe", "cb:subscribed", "reconcile"]
    );
    assert_eq!(
        h.client.framework_id().map(|id| id.to_string()).as_deref(),
        Some("fw-1")
    );
    assert!(h.client.is_subscribed());

    h.client.stop();
    let (result, _) = h.finish().await;
    result.expect("stop ends run with Ok");
}

#[tokio::test]
async fn agent_update_is_acknowledged_after_the_callback_returns() {
    let (mut h, events) = Harness::subscribed_with(Options {
        gated_updates: true,
        ..Default::default()
    })
    .await;

    events.send(agent_update("t1", TaskState::TaskRunning, 1));
    let status = h.expect_update().await;
    assert_eq!(status.task_id, "t1");
    // The callback is still running: no acknowledgement may be on its way.
    // (A negative check needs a window; a driver acking early does so at
    // once, well within it.)
    let early = tokio::time::timeout(Duration::from_millis(300), h.master.calls.recv()).await;
    assert!(early.is_err(), "acknowledged before the callback returned");

    h.gate.as_ref().expect("gate").send(()).expect("open gate");
    let ack = h.master.expect_ack().await;
    assert_eq!(ack.header, header("fw-1", "stream-1"));
    assert_eq!(ack.task_id, "t1");
    assert_eq!(ack.agent_id, "agent-1");
    assert_eq!(ack.uuid, vec![1; 16]);
    let journal = h.journal().entries();
    assert_eq!(journal[journal.len() - 2..], ["cb:update:t1", "ack:t1"]);
    h.client.stop();
}

#[tokio::test]
async fn duplicate_agent_update_is_acknowledged_again_but_not_delivered_twice() {
    let (mut h, events) = Harness::subscribed().await;

    events.send(agent_update("t1", TaskState::TaskRunning, 1));
    assert_eq!(h.expect_update().await.task_id, "t1");
    assert_eq!(h.master.expect_ack().await.uuid, vec![1; 16]);

    // The agent did not get the ack and resends; then a new update follows.
    events.send(agent_update("t1", TaskState::TaskRunning, 1));
    events.send(agent_update("t1", TaskState::TaskFinished, 2));
    // Both acks are in flight at once, so they may arrive in either order.
    let mut acked = vec![
        h.master.expect_ack().await.uuid,
        h.master.expect_ack().await.uuid,
    ];
    acked.sort();
    assert_eq!(acked, [vec![1; 16], vec![2; 16]], "re-acked, then acked");
    // Events are delivered in order, so the duplicate would have come first.
    let next = h.expect_update().await;
    assert_eq!(next.uuid, vec![2; 16], "duplicate was delivered again");
    assert_eq!(next.state(), TaskState::TaskFinished);
    h.client.stop();
}

#[tokio::test]
async fn master_update_is_delivered_but_not_acknowledged() {
    let (mut h, events) = Harness::subscribed().await;

    events.send(master_update("t0", TaskState::TaskLost));
    events.send(agent_update("t1", TaskState::TaskRunning, 7));
    let first = h.expect_update().await;
    assert_eq!((first.task_id.as_str(), first.uuid.len()), ("t0", 0));
    assert_eq!(h.expect_update().await.task_id, "t1");
    let ack = h.master.expect_ack().await;
    assert_eq!(ack.task_id, "t1");
    // An ack for t0 would have been queued before t1's, and `stop` waits
    // for every queued call to complete: it would show up here.
    h.client.stop();
    let (result, mut master) = h.finish().await;
    result.expect("stopped");
    assert_eq!(master.pending_calls(), Vec::<&str>::new());
}

#[tokio::test]
async fn acknowledgements_are_sent_concurrently_not_one_round_trip_each() {
    let (mut h, events) = Harness::subscribed().await;
    h.master.hold_acks();
    for i in 1..=5u8 {
        events.send(agent_update(&format!("t{i}"), TaskState::TaskRunning, i));
    }
    for _ in 1..=5 {
        h.expect_update().await;
    }
    // No ack has been answered, yet all five reached the master: a driver
    // sending one at a time would stall after the first.
    let mut acked: Vec<_> = Vec::new();
    for _ in 1..=5 {
        acked.push(h.master.expect_ack().await.uuid[0]);
    }
    acked.sort();
    assert_eq!(acked, [1, 2, 3, 4, 5]);
    h.master.release_acks();
    h.client.stop();
    let (result, mut master) = h.finish().await;
    result.expect("stopped");
    assert_eq!(master.pending_calls(), Vec::<&str>::new());
}

#[tokio::test]
async fn stop_waits_for_acknowledgements_in_flight() {
    let (mut h, events) = Harness::subscribed().await;
    h.master.hold_acks();
    events.send(agent_update("t1", TaskState::TaskRunning, 1));
    events.send(agent_update("t2", TaskState::TaskRunning, 2));
    h.expect_update().await;
    h.expect_update().await;
    h.master.expect_ack().await;
    h.master.expect_ack().await;
    h.client.stop();
    // `run` is flushing: it ends only once the held acks were answered.
    let early = tokio::time::timeout(Duration::from_millis(300), &mut h.run).await;
    assert!(early.is_err(), "run ended with acknowledgements in flight");
    h.master.release_acks();
    h.finish().await.0.expect("stopped");
}

/// Explicit acknowledgements (`implicit_acknowledgements = false`).
fn explicit_acks(config: &mut DriverConfig) {
    config.implicit_acknowledgements = false;
}

#[tokio::test]
async fn with_explicit_acks_the_driver_delivers_every_copy_and_acknowledges_nothing() {
    let (mut h, events) = Harness::subscribed_with(Options {
        configure: explicit_acks,
        ..Default::default()
    })
    .await;
    events.send(agent_update("t1", TaskState::TaskRunning, 1));
    // Not acknowledged yet, so the agent resends: the copy is delivered too.
    events.send(agent_update("t1", TaskState::TaskRunning, 1));
    events.send(master_update("t0", TaskState::TaskLost));
    let first = h.expect_update().await;
    let again = h.expect_update().await;
    assert_eq!(
        (first.uuid.clone(), again.uuid.clone()),
        (vec![1; 16], vec![1; 16])
    );
    assert_eq!(h.expect_update().await.task_id, "t0");
    assert_eq!(h.master.pending_calls(), Vec::<&str>::new(), "no ack yet");

    // The scheduler acknowledges (twice, as it saw two copies: harmless).
    h.client.acknowledge(&first).await.expect("acknowledge");
    h.client
        .acknowledge(&again)
        .await
        .expect("acknowledge again");
    for _ in 0..2 {
        let ack = h.master.expect_ack().await;
        assert_eq!(ack.header, header("fw-1", "stream-1"));
        assert_eq!(
            (ack.task_id.as_str(), ack.agent_id.as_str()),
            ("t1", "agent-1")
        );
        assert_eq!(ack.uuid, vec![1; 16]);
    }
    h.client.stop();
    let (result, mut master) = h.finish().await;
    result.expect("stopped");
    assert_eq!(
        master.pending_calls(),
        Vec::<&str>::new(),
        "the driver sent no ack of its own"
    );
}

#[tokio::test]
async fn concurrent_explicit_acknowledgements_do_not_wait_for_each_other() {
    let (mut h, _events) = Harness::subscribed_with(Options {
        configure: explicit_acks,
        ..Default::default()
    })
    .await;
    h.master.hold_acks();
    let acks: Vec<_> = (1..=20u8)
        .map(|i| {
            let client = h.client.clone();
            let status = pb::TaskStatus {
                task_id: format!("t{i}"),
                agent_id: "agent-1".into(),
                uuid: vec![i; 16],
                ..Default::default()
            };
            tokio::spawn(async move { client.acknowledge(&status).await })
        })
        .collect();
    // All twenty are at the master while none has been answered.
    let mut seen: Vec<_> = Vec::new();
    for _ in 0..20 {
        seen.push(h.master.expect_ack().await.uuid[0]);
    }
    seen.sort();
    assert_eq!(seen, (1..=20).collect::<Vec<u8>>());
    h.master.release_acks();
    for ack in acks {
        tokio::time::timeout(WAIT, ack)
            .await
            .expect("ack answered")
            .expect("no panic")
            .expect("ack ok");
    }
    h.client.stop();
    h.finish().await.0.expect("stopped");
}

#[tokio::test]
async fn explicit_acknowledge_of_a_master_update_sends_nothing() {
    let (h, _events) = Harness::subscribed().await;
    let status = pb::TaskStatus {
        task_id: "t0".into(),
        ..Default::default()
    };
    h.client.acknowledge(&status).await.expect("no-op");
    h.client.stop();
    let (result, mut master) = h.finish().await;
    result.expect("stopped");
    assert_eq!(master.pending_calls(), Vec::<&str>::new());
}

#[tokio::test]
async fn stream_loss_calls_disconnected_then_resubscribes_with_the_same_framework_id() {
    let (mut h, events) = Harness::subscribed().await;

    drop(events); // the master closes the stream
    match h.next_seen().await {
        Seen::Disconnected(revive) => assert!(
            matches!(revive, Err(DriverError::NotSubscribed)),
            "calls fail fast while disconnected: {revive:?}"
        ),
        other => panic!("expected disconnected, got {other:?}"),
    }
    assert!(!h.client.is_subscribed());

    let (info, events) = h.master.expect_subscribe().await;
    assert_eq!(info.id, "fw-1", "re-subscribes as the same framework");
    assert_eq!(info.name, "test");
    h.expect_subscribed("fw-1").await;
    let reconcile = h.master.expect_reconcile().await;
    assert_eq!(reconcile.header, header("fw-1", "stream-2"));
    assert!(reconcile.tasks.is_empty());

    // And once more through an error status instead of a clean end.
    events.fail(tonic::Status::unavailable("master shutting down"));
    assert!(matches!(h.next_seen().await, Seen::Disconnected(_)));
    let (info, _events) = h.master.expect_subscribe().await;
    assert_eq!(info.id, "fw-1");
    h.expect_subscribed("fw-1").await;
    assert_eq!(
        h.master.expect_reconcile().await.header,
        header("fw-1", "stream-3")
    );
    h.client.stop();
    h.finish().await.0.expect("stopped");
}

/// Real time with short intervals rather than `tokio::time::pause()`: with a
/// paused clock, tokio advances time to the next timer whenever the runtime
/// parks on I/O, even when that park finds the socket ready, so over real
/// loopback gRPC the heartbeat deadline fires before the heartbeat is read.
/// Margins are wide (a 1 s window against 100 ms heartbeats) so a loaded
/// machine does not make the test flaky.
#[tokio::test]
async fn missed_heartbeats_make_the_driver_resubscribe() {
    let (mut h, events) = Harness::subscribed_with(Options {
        heartbeat_interval_seconds: 0.25,
        configure: |c| c.missed_heartbeats_allowed = 4,
        ..Default::default()
    })
    .await;
    let window = Duration::from_secs(1);

    // Heartbeats keep the subscription alive for well over the window.
    let keepalive_until = tokio::time::Instant::now() + window * 5 / 2;
    while tokio::time::Instant::now() < keepalive_until {
        events.send(Event::Heartbeat(pb::Heartbeat {}));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let meanwhile = h.seen.try_recv();
    assert!(meanwhile.is_err(), "unexpected callback: {meanwhile:?}");

    // Now the master goes silent but keeps the stream open.
    events.send(Event::Heartbeat(pb::Heartbeat {}));
    let silent_since = tokio::time::Instant::now();
    assert!(matches!(h.next_seen().await, Seen::Disconnected(_)));
    let waited = silent_since.elapsed();
    assert!(
        waited >= window - Duration::from_millis(50),
        "gave up after {waited:?}, before 4 missed heartbeats"
    );
    let (info, _events) = h.master.expect_subscribe().await;
    assert_eq!(info.id, "fw-1");
    h.expect_subscribed("fw-1").await;
    assert_eq!(
        h.master.expect_reconcile().await.header,
        header("fw-1", "stream-2")
    );
    drop(events);
    h.client.stop();
    h.finish().await.0.expect("stopped");
}

#[tokio::test]
async fn error_event_stops_the_driver_with_an_error() {
    let (mut h, events) = Harness::subscribed().await;
    events.send(Event::Error(pb::Error {
        message: "framework fw-1 failed over to a newer subscription".into(),
    }));
    match h.next_seen().await {
        Seen::Error(message) => assert!(message.contains("failed over"), "{message}"),
        other => panic!("expected error, got {other:?}"),
    }
    let client = h.client.clone();
    let (result, mut master) = h.finish().await;
    match result {
        Err(DriverError::Terminated {
            framework_id,
            message,
        }) => {
            assert_eq!(framework_id, "fw-1");
            assert!(message.contains("failed over"));
        }
        other => panic!("expected Terminated, got {other:?}"),
    }
    assert_eq!(
        master.pending_calls(),
        Vec::<&str>::new(),
        "no re-subscribe"
    );
    assert!(matches!(
        client.revive().await,
        Err(DriverError::NotSubscribed)
    ));
}

#[tokio::test]
async fn stop_ends_run_without_tearing_down() {
    let (h, _events) = Harness::subscribed().await;
    let client = h.client.clone();
    h.client.stop();
    let (result, mut master) = h.finish().await;
    result.expect("stop ends run with Ok");
    assert_eq!(master.pending_calls(), Vec::<&str>::new(), "no teardown");
    assert!(matches!(
        client.suppress().await,
        Err(DriverError::NotSubscribed)
    ));
}

#[tokio::test]
async fn stop_from_a_callback_still_sends_the_queued_acknowledgement() {
    let (h, events) = Harness::subscribed_with(Options {
        stop_on_update: true,
        ..Default::default()
    })
    .await;
    events.send(agent_update("t1", TaskState::TaskFinished, 3));
    let (result, mut master) = h.finish().await;
    result.expect("stop ends run with Ok");
    let ack = master.expect_ack().await;
    assert_eq!((ack.task_id.as_str(), ack.uuid), ("t1", vec![3; 16]));
}

#[tokio::test]
async fn stop_while_reconnecting_ends_run() {
    let mut h = Harness::start_with(Options {
        before_run: |m| m.refuse_next_subscribe(tonic::Status::unavailable("not yet")),
        configure: |c| {
            // Long enough that the stop surely lands during the backoff.
            c.reconnect_backoff_initial = Duration::from_secs(3600);
            c.reconnect_backoff_max = Duration::from_secs(3600);
        },
        ..Default::default()
    })
    .await;
    h.master.expect_refused_subscribe().await;
    h.client.stop();
    h.finish().await.0.expect("stop ends run with Ok");
}

#[tokio::test]
async fn successful_teardown_ends_run_without_reporting_an_error() {
    let (mut h, _events) = Harness::subscribed().await;
    // The fake sends ERROR on the stream before answering the call.
    h.client.teardown().await.expect("teardown");
    match h.master.next_call().await {
        Call::Teardown(t) => assert_eq!(t.header, header("fw-1", "stream-1")),
        other => panic!("expected teardown, got {}", other.name()),
    }
    let (result, _, mut seen) = h.finish_with_seen().await;
    result.expect("teardown ends run with Ok");
    let unexpected = seen.try_recv();
    assert!(unexpected.is_err(), "unexpected callback: {unexpected:?}");
}

#[tokio::test]
async fn subscribe_refused_as_not_found_is_fatal() {
    let mut h = Harness::start_with(Options {
        before_run: |m| {
            m.refuse_next_subscribe(tonic::Status::not_found("framework fw-9 is unknown"))
        },
        configure: |c| c.framework.id = "fw-9".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(
        h.client.framework_id().map(|id| id.to_string()).as_deref(),
        Some("fw-9")
    );
    let info = h.master.expect_refused_subscribe().await;
    assert_eq!(info.id, "fw-9", "fails over to the configured id");
    assert!(matches!(h.next_seen().await, Seen::Error(m) if m.contains("unknown")));
    match h.finish().await.0 {
        Err(DriverError::FrameworkRemoved { framework_id, .. }) => {
            assert_eq!(framework_id, "fw-9")
        }
        other => panic!("expected FrameworkRemoved, got {other:?}"),
    }
}

#[tokio::test]
async fn transient_subscribe_refusals_are_retried() {
    let mut h = Harness::start_with(Options {
        before_run: |m| {
            m.refuse_next_subscribe(tonic::Status::unavailable("master is recovering"));
            m.refuse_next_subscribe(tonic::Status::permission_denied("not the leading master"));
        },
        ..Default::default()
    })
    .await;
    h.master.expect_refused_subscribe().await;
    h.master.expect_refused_subscribe().await;
    let (info, _events) = h.master.expect_subscribe().await;
    assert!(info.id.is_empty());
    h.expect_subscribed("fw-1").await;
    h.master.expect_reconcile().await;
    h.client.stop();
    h.finish().await.0.expect("stopped");
}

#[tokio::test]
async fn invalid_configuration_fails_run_at_once() {
    let mut config = test_config("127.0.0.1:1".parse().expect("addr"));
    config.framework.id = "bad/id".into();
    let (driver, client) = Driver::new(config);
    let recorder = Recorder {
        seen: mpsc::unbounded_channel().0,
        journal: Journal::default(),
        update_gate: None,
        stop_on_update: false,
    };
    assert!(client.framework_id().is_none());
    match driver.run(recorder).await {
        Err(DriverError::InvalidArgument(m)) => assert!(m.contains("framework_info.id"), "{m}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[tokio::test]
async fn offers_rescinds_and_failures_are_delivered_in_order() {
    let (mut h, events) = Harness::subscribed().await;
    let offer = pb::Offer {
        id: "o1".into(),
        agent_id: "agent-1".into(),
        ..Default::default()
    };
    events.send(Event::Offers(pb::Offers {
        offers: vec![offer.clone()],
    }));
    events.send(Event::Heartbeat(pb::Heartbeat {}));
    events.send(Event::Rescind(pb::Rescind {
        offer_id: "o1".into(),
    }));
    events.send(Event::Failure(pb::Failure {
        agent_id: "agent-1".into(),
    }));
    assert!(matches!(h.next_seen().await, Seen::Offers(o) if o == vec![offer]));
    assert!(matches!(h.next_seen().await, Seen::Rescinded(id) if id.as_str() == "o1"));
    assert!(matches!(h.next_seen().await, Seen::Failure(id) if id.as_str() == "agent-1"));
    h.client.stop();
}

#[tokio::test]
async fn calls_carry_the_current_stream_header() {
    let (mut h, _events) = Harness::subscribed().await;
    let c = h.client.clone();
    let offer = OfferId::parse("o1", "offer_id").expect("id");
    let agent = AgentId::parse("agent-1", "agent_id").expect("id");
    let filters = Some(pb::Filters {
        refuse_seconds: Some(30.0),
    });
    let h1 = header("fw-1", "stream-1");

    let info = pb::TaskInfo {
        task_id: "t1".into(),
        ..Default::default()
    };
    c.launch(std::slice::from_ref(&offer), vec![info.clone()], filters)
        .await
        .expect("launch");
    match h.master.next_call().await {
        Call::Accept(a) => {
            assert_eq!(a.header, h1);
            assert_eq!(a.offer_ids, ["o1"]);
            assert_eq!(a.filters, filters);
            let launch = pb::operation::Operation::Launch(pb::Launch { tasks: vec![info] });
            assert_eq!(
                a.operations,
                vec![pb::Operation {
                    operation: Some(launch)
                }]
            );
        }
        other => panic!("expected accept, got {}", other.name()),
    }

    let volume = corral_sdk::VolumeId::parse("data-web-0", "volume").unwrap();
    c.accept(
        std::slice::from_ref(&offer),
        vec![SchedulerClient::create_volume(&volume, 64.0)],
        None,
    )
    .await
    .expect("accept with a create");
    match h.master.next_call().await {
        Call::Accept(a) => {
            let create = pb::operation::Operation::CreateVolume(pb::CreateVolume {
                volume_id: "data-web-0".into(),
                disk_mib: 64.0,
            });
            assert_eq!(
                a.operations,
                vec![pb::Operation {
                    operation: Some(create)
                }]
            );
        }
        other => panic!("expected accept, got {}", other.name()),
    }
    c.destroy_volume(&volume).await.expect("destroy_volume");
    assert!(matches!(h.master.next_call().await,
        Call::DestroyVolume(d) if d.header == h1 && d.volume_id == "data-web-0"));

    c.decline(std::slice::from_ref(&offer), filters)
        .await
        .expect("decline");
    assert!(matches!(h.master.next_call().await,
        Call::Decline(d) if d.header == h1 && d.offer_ids == ["o1"] && d.filters == filters));

    c.revive().await.expect("revive");
    assert!(matches!(h.master.next_call().await, Call::Revive(r) if r.header == h1));
    c.suppress().await.expect("suppress");
    assert!(matches!(h.master.next_call().await, Call::Suppress(r) if r.header == h1));

    c.kill(&task("t1"), Some(&agent)).await.expect("kill");
    assert!(matches!(h.master.next_call().await,
        Call::Kill(k) if k.header == h1 && k.task_id == "t1" && k.agent_id == "agent-1"
            && k.kill_grace_period_seconds.is_none()));
    c.kill_with_grace(&task("t2"), None, Duration::from_millis(1500))
        .await
        .expect("kill");
    assert!(matches!(h.master.next_call().await,
        Call::Kill(k) if k.task_id == "t2" && k.agent_id.is_empty()
            && k.kill_grace_period_seconds == Some(1.5)));

    c.reconcile(vec![(task("t1"), Some(agent.clone())), (task("t2"), None)])
        .await
        .expect("reconcile");
    match h.master.next_call().await {
        Call::Reconcile(r) => {
            assert_eq!(r.header, h1);
            let tasks: Vec<_> = r
                .tasks
                .iter()
                .map(|t| (t.task_id.as_str(), t.agent_id.as_str()))
                .collect();
            assert_eq!(tasks, [("t1", "agent-1"), ("t2", "")]);
        }
        other => panic!("expected reconcile, got {}", other.name()),
    }

    let status = pb::TaskStatus {
        task_id: "t1".into(),
        agent_id: "agent-1".into(),
        uuid: vec![9; 16],
        ..Default::default()
    };
    c.acknowledge(&status).await.expect("acknowledge");
    let ack = h.master.expect_ack().await;
    assert_eq!((ack.header, ack.uuid), (h1, vec![9; 16]));
    h.client.stop();
}

#[tokio::test]
async fn master_refusal_keeps_its_code_and_message() {
    let (h, _events) = Harness::subscribed().await;
    h.master.fail_next(
        "accept",
        tonic::Status::invalid_argument(
            "operations[0].launch.tasks[0].resources.cpus: must be >= 0",
        ),
    );
    let offer = OfferId::parse("o1", "offer_id").expect("id");
    let err = h
        .client
        .launch(&[offer], Vec::new(), None)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    match &err {
        DriverError::Status { message, .. } => {
            assert_eq!(
                message,
                "operations[0].launch.tasks[0].resources.cpus: must be >= 0"
            )
        }
        other => panic!("expected Status, got {other:?}"),
    }
    assert!(err.to_string().contains("resources.cpus: must be >= 0"));
    h.client.stop();
}
