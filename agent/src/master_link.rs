//! The link to the master: dial, open the `AgentRegistry.Attach` stream,
//! register, heartbeat, forward what the master sends to the actor, and
//! reconnect with capped exponential backoff (with jitter) when the stream
//! ends, errors, or the master falls silent for three heartbeat intervals.
//!
//! With several masters the link tries them in turn and goes straight to
//! the leader a standby names. It keeps the highest leader epoch seen and
//! drops any message with a lower one (counted in
//! `corral_agent_stale_epoch_rejected_total`), then looks for the leader
//! again: a deposed leader cannot command this agent.

use std::sync::Arc;
use std::time::Duration;

use corral_proto::AgentId;
use corral_proto::leader::{
    EpochFence, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT, MasterList, leader_hint,
};
use corral_proto::pb::{self, agent_registry_client::AgentRegistryClient, master_message::Message};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tracing::{debug, info, warn};

use crate::actor::Command;
use crate::config::RECONNECT_BACKOFF_INITIAL;

/// How long dialing the master may take before we back off and retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the master may take to answer `Register` with `Registered`.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(15);

/// Heartbeat interval used when the master's is unusable (zero, negative,
/// not finite); matches Mesos' 15 s agent ping timeout divided by 3 misses.
const FALLBACK_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Bounds on the master's heartbeat interval: below 10 ms heartbeats are
/// noise, above an hour a dead master would go unnoticed for too long.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
const MAX_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3600);

/// The master is presumed gone after this many silent heartbeat intervals.
const MISSED_HEARTBEATS: u32 = 3;

/// Shortest wait between two connection attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(10);

/// Outgoing messages buffered for the stream (updates, heartbeats).
const OUTBOUND_CAPACITY: usize = 1024;

/// What happens to one message on the stream (fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    /// Never sent (or never seen, for a message from the master).
    Drop,
    /// Held back this long, and everything after it with it (a stream
    /// does not reorder).
    Delay(Duration),
    /// Sent (or seen) twice in a row.
    Duplicate,
}

/// Decides the fate of each message between the agent and the master, in
/// fault-injection tests (Mesos' `DROP_MESSAGE` and `FUTURE_MESSAGE`
/// filters, for this stream). The link asks once per message, in order.
pub trait LinkFaults: Send + Sync + std::fmt::Debug {
    fn agent_to_master(&self, message: &pb::AgentMessage) -> Fault;
    fn master_to_agent(&self, message: &pb::MasterMessage) -> Fault;
}

/// Moves messages from `rx` to `tx`, applying `decide`; ends with either.
async fn relay<M: Clone>(
    mut rx: impl futures::Stream<Item = M> + Unpin,
    tx: mpsc::Sender<M>,
    decide: impl Fn(&M) -> Fault,
) {
    while let Some(m) = rx.next().await {
        let copies = match decide(&m) {
            Fault::Pass => 1,
            Fault::Drop => 0,
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                1
            }
            Fault::Duplicate => 2,
        };
        for _ in 0..copies {
            if tx.send(m.clone()).await.is_err() {
                return;
            }
        }
    }
}

/// Capped exponential backoff with full-range jitter in `[d/2, d]`, so many
/// agents that lost the same master do not all come back at once.
#[derive(Debug)]
pub(crate) struct Backoff {
    current: Duration,
    initial: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        // A zero cap from a config would make reconnecting a busy loop.
        let max = max.max(MIN_BACKOFF);
        let initial = initial.clamp(MIN_BACKOFF, max);
        Self {
            current: initial,
            initial,
            max,
        }
    }

    /// The next delay; `unit` in [0, 1] picks the jitter.
    pub(crate) fn next_delay(&mut self, unit: f64) -> Duration {
        let d = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        d.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

pub(crate) fn heartbeat_interval(seconds: f64) -> Duration {
    if seconds.is_finite() && seconds > 0.0 {
        Duration::from_secs_f64(seconds.min(MAX_HEARTBEAT_INTERVAL.as_secs_f64()))
            .max(MIN_HEARTBEAT_INTERVAL)
    } else {
        warn!(
            seconds,
            "unusable heartbeat interval from the master; using the fallback"
        );
        FALLBACK_HEARTBEAT_INTERVAL
    }
}

/// The endpoint for `host:port`; plain HTTP/2 for now.
pub(crate) fn endpoint(master: &str) -> Result<Endpoint, String> {
    Endpoint::from_shared(format!("http://{master}"))
        .map(|e| {
            e.connect_timeout(CONNECT_TIMEOUT)
                .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
        })
        .map_err(|e| e.to_string())
}

/// Parses `--master` (`host:port`, or several separated by commas) and
/// checks each address makes an endpoint.
pub(crate) fn masters(text: &str) -> Result<MasterList, String> {
    let masters = corral_proto::leader::parse_masters(text)?;
    for m in &masters {
        endpoint(m).map_err(|e| format!("{m}: {e}"))?;
    }
    Ok(MasterList::new(masters))
}

/// How one stream ended.
enum LinkEnd {
    /// The master sent `Shutdown`; do not come back.
    Shutdown,
    /// Lost; `registered` says whether it got as far as `Registered`.
    Lost { registered: bool, reason: String },
    /// A standby named the leader (or said none is elected yet).
    NotLeader { leader: Option<String> },
}

/// What the link shares across attempts.
pub(crate) struct Link {
    pub(crate) masters: MasterList,
    pub(crate) backoff_max: Duration,
    pub(crate) cmd_tx: mpsc::Sender<Command>,
    pub(crate) faults: Option<Arc<dyn LinkFaults>>,
    /// `corral_agent_stale_epoch_rejected_total`.
    pub(crate) stale_epoch_rejected: metrics::Counter,
}

/// Runs until the master sends `Shutdown` or the actor is gone.
pub(crate) async fn run(link: Link) {
    let Link {
        mut masters,
        backoff_max,
        cmd_tx,
        faults,
        stale_epoch_rejected,
    } = link;
    let mut backoff = Backoff::new(RECONNECT_BACKOFF_INITIAL, backoff_max);
    let mut fence = EpochFence::new();
    loop {
        let target = masters.next_target();
        let Ok(endpoint) = endpoint(&target) else {
            warn!(master = %target, "a standby named an unusable leader address; ignored");
            continue;
        };
        let attempt = Attempt {
            endpoint: &endpoint,
            cmd_tx: &cmd_tx,
            faults: faults.as_ref(),
            fence: &mut fence,
            stale_epoch_rejected: &stale_epoch_rejected,
        };
        match attempt.run().await {
            LinkEnd::Shutdown => return,
            LinkEnd::NotLeader { leader } => {
                debug!(master = %target, leader = ?leader, "not the leader");
                if masters.not_leader(leader) {
                    continue;
                }
            }
            LinkEnd::Lost { registered, reason } => {
                warn!(master = %target, reason = %reason, "lost the master");
                masters.reached();
                if registered {
                    masters.connected(&target);
                    backoff.reset();
                }
            }
        }
        if cmd_tx.send(Command::Disconnected).await.is_err() {
            return;
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        debug!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after backoff"
        );
        tokio::time::sleep(delay).await;
    }
}

fn lost(reason: impl Into<String>) -> LinkEnd {
    LinkEnd::Lost {
        registered: false,
        reason: reason.into(),
    }
}

/// One connection to one master.
struct Attempt<'a> {
    endpoint: &'a Endpoint,
    cmd_tx: &'a mpsc::Sender<Command>,
    faults: Option<&'a Arc<dyn LinkFaults>>,
    fence: &'a mut EpochFence,
    stale_epoch_rejected: &'a metrics::Counter,
}

impl Attempt<'_> {
    /// Refuses a message of a deposed leader, counting it. `registry_id`
    /// is given by `Registered`, which starts a leader's stream.
    fn stale(
        &mut self,
        registry_id: Option<&str>,
        epoch: u64,
        registered: bool,
    ) -> Option<LinkEnd> {
        let admitted = match registry_id {
            Some(id) => self.fence.admit_leader(id, epoch),
            None => self.fence.admit(epoch),
        };
        let e = admitted.err()?;
        self.stale_epoch_rejected.increment(1);
        warn!(master = %self.endpoint.uri(), "{e}; message dropped");
        Some(LinkEnd::Lost {
            registered,
            reason: e.to_string(),
        })
    }

    async fn run(mut self) -> LinkEnd {
        let (endpoint, cmd_tx, faults) = (self.endpoint, self.cmd_tx, self.faults);
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return lost(format!("cannot connect: {e}")),
        };
        let mut client = AgentRegistryClient::new(channel);

        let (reply_tx, reply_rx) = oneshot::channel();
        if cmd_tx
            .send(Command::Attaching { reply: reply_tx })
            .await
            .is_err()
        {
            return LinkEnd::Shutdown;
        }
        let Ok(register) = reply_rx.await else {
            return LinkEnd::Shutdown;
        };
        let tasks = register.tasks.len();
        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
        let first = pb::AgentMessage {
            message: Some(pb::agent_message::Message::Register(register)),
        };
        // A fresh channel always has room for the first message.
        if out_tx.try_send(first).is_err() {
            return lost("cannot queue Register");
        }
        let outbound = match faults {
            None => ReceiverStream::new(out_rx),
            Some(faults) => {
                let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
                let faults = faults.clone();
                tokio::spawn(relay(ReceiverStream::new(out_rx), tx, move |m| {
                    faults.agent_to_master(m)
                }));
                ReceiverStream::new(rx)
            }
        };
        let response =
            match tokio::time::timeout(REGISTRATION_TIMEOUT, client.attach(outbound)).await {
                Ok(Ok(r)) => r,
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                    return LinkEnd::NotLeader {
                        leader: leader_hint(&status),
                    };
                }
                Ok(Err(status)) => return lost(format!("attach failed: {status}")),
                Err(_) => return lost("attach timed out"),
            };
        debug!(tasks, "stream open; Register sent");
        let mut inbound: std::pin::Pin<
            Box<dyn futures::Stream<Item = Result<pb::MasterMessage, tonic::Status>> + Send>,
        > = match faults {
            None => Box::pin(response.into_inner()),
            Some(faults) => {
                let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
                let faults = faults.clone();
                tokio::spawn(relay(response.into_inner(), tx, move |m| match m {
                    Ok(m) => faults.master_to_agent(m),
                    Err(_) => Fault::Pass,
                }));
                Box::pin(ReceiverStream::new(rx))
            }
        };

        let mut registered = false;
        let mut interval: Option<Duration> = None;
        let mut ticker: Option<tokio::time::Interval> = None;
        let mut last_heard = Instant::now();
        loop {
            let silence = interval.map_or(REGISTRATION_TIMEOUT, |i| i * MISSED_HEARTBEATS);
            let tick = async {
                match ticker.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                msg = inbound.next() => {
                    let msg = match msg {
                        None => return LinkEnd::Lost { registered, reason: "the master closed the stream".into() },
                        Some(Err(status)) => return LinkEnd::Lost { registered, reason: format!("stream error: {status}") },
                        Some(Ok(m)) => m,
                    };
                    last_heard = Instant::now();
                    let registry_id = match &msg.message {
                        Some(Message::Registered(r)) => Some(r.registry_id.as_str()),
                        _ => None,
                    };
                    if let Some(end) = self.stale(registry_id, msg.epoch, registered) {
                        return end;
                    }
                    match msg.message {
                        Some(Message::Registered(r)) => {
                            let agent_id = match AgentId::parse(&r.agent_id, "registered.agent_id") {
                                Ok(id) => id,
                                Err(e) => return LinkEnd::Lost { registered, reason: format!("invalid Registered: {e}") },
                            };
                            let every = heartbeat_interval(r.heartbeat_interval_seconds);
                            interval = Some(every);
                            let mut t = tokio::time::interval_at(Instant::now() + every, every);
                            t.set_missed_tick_behavior(MissedTickBehavior::Delay);
                            ticker = Some(t);
                            registered = true;
                            info!(agent_id = %agent_id, heartbeat_ms = every.as_millis() as u64, "registered");
                            let cmd = Command::Registered { agent_id, outbound: out_tx.clone() };
                            if cmd_tx.send(cmd).await.is_err() {
                                return LinkEnd::Shutdown;
                            }
                        }
                        Some(Message::Heartbeat(_)) => {}
                        Some(Message::Shutdown(s)) => {
                            let _ = cmd_tx.send(Command::FromMaster(Box::new(Message::Shutdown(s)))).await;
                            return LinkEnd::Shutdown;
                        }
                        Some(other) => {
                            if !registered {
                                warn!("master message before Registered; ignored");
                                continue;
                            }
                            if cmd_tx.send(Command::FromMaster(Box::new(other))).await.is_err() {
                                return LinkEnd::Shutdown;
                            }
                        }
                        None => debug!("empty master message; ignored"),
                    }
                }
                () = tick => {
                    let hb = pb::AgentMessage { message: Some(pb::agent_message::Message::Heartbeat(pb::AgentHeartbeat {})) };
                    // Full means the master is not reading; the silence check decides.
                    let _ = out_tx.try_send(hb);
                }
                () = tokio::time::sleep_until(last_heard + silence) => {
                    return LinkEnd::Lost {
                        registered,
                        reason: format!("no message from the master for {} ms", silence.as_millis()),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let full: Vec<u128> = (0..5).map(|_| b.next_delay(1.0).as_millis()).collect();
        assert_eq!(full, vec![100, 200, 400, 700, 700]);
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    #[test]
    fn unusable_heartbeat_intervals_fall_back_and_extremes_are_clamped() {
        assert_eq!(heartbeat_interval(0.5), Duration::from_millis(500));
        assert_eq!(heartbeat_interval(0.0), FALLBACK_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(f64::NAN), FALLBACK_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(1e-9), MIN_HEARTBEAT_INTERVAL);
        assert_eq!(heartbeat_interval(1e12), MAX_HEARTBEAT_INTERVAL);
    }
}
