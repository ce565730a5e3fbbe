//! The status update manager: at-least-once, per-task ordered delivery of
//! task status updates to the master (and through it to the framework).
//!
//! Follows Mesos' `TaskStatusUpdateManager` (`src/slave/task_status_update_manager.cpp`):
//! every task has a FIFO of updates; only its head is in flight and is
//! resent with a doubling interval until the framework acknowledges it by
//! uuid; then the next update becomes the head. Once a terminal update is
//! acknowledged the task's stream is gone.
//!
//! Every update is checkpointed before it is sent: it comes in with the
//! sequence number of the checkpoint write that holds it, and is not handed
//! out until [`StatusUpdateManager::mark_durable`] says that write is done.
//! After a restart the agent restores the checkpointed updates (same uuids,
//! same order) and resends them.
//!
//! [`StatusUpdateManager`] is pure: time comes in as an argument and the
//! updates to send come out as return values, so it is tested without tokio.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use corral_proto::pb;
use corral_proto::task::is_terminal;

/// Shortest retry interval honoured: a zero interval from a config would
/// make the actor resend in a busy loop.
const MIN_RETRY_INTERVAL: Duration = Duration::from_millis(10);

/// `(framework_id, task_id)`: one stream of updates.
pub(crate) type StreamKey = (String, String);

/// Builds an agent-generated update around `status`: fresh random uuid
/// (16 bytes), `SOURCE_AGENT`, the ids, and `timestamp` (seconds since the
/// epoch).
pub(crate) fn new_update(
    agent_id: &str,
    framework_id: &str,
    mut status: pb::TaskStatus,
    timestamp: f64,
) -> pb::StatusUpdate {
    status.uuid = uuid::Uuid::new_v4().as_bytes().to_vec();
    status.source = pb::Source::Agent as i32;
    status.agent_id = agent_id.to_string();
    status.framework_id = framework_id.to_string();
    status.timestamp = timestamp;
    pb::StatusUpdate {
        framework_id: framework_id.to_string(),
        status: Some(status),
    }
}

/// What an acknowledgement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckOutcome {
    /// It matched no head (unknown task, old or wrong uuid); counted.
    Ignored,
    /// The head was released. `task_done` is true when it was terminal and
    /// nothing else is queued: the task can be forgotten.
    Accepted { task_done: bool },
}

#[derive(Debug)]
struct Retry {
    next_at: Instant,
    interval: Duration,
}

/// The retry interval after `previous` (`None`: the first send):
/// `initial`, then doubling, capped at `max` (issue 6: 1 s doubling to 60 s).
pub(crate) fn next_interval(
    previous: Option<Duration>,
    initial: Duration,
    max: Duration,
) -> Duration {
    match previous {
        None => initial,
        Some(p) => p.saturating_mul(2).min(max),
    }
}

#[derive(Debug)]
struct Queued {
    update: pb::StatusUpdate,
    /// The checkpoint write that holds it; sent once that is durable.
    seq: u64,
    /// When it was queued (for a restored one: when it was first made).
    since: Instant,
}

#[derive(Debug, Default)]
struct TaskStream {
    queue: VecDeque<Queued>,
    /// Set once the head has been sent; cleared when the head changes.
    retry: Option<Retry>,
}

#[derive(Debug)]
pub(crate) struct StatusUpdateManager {
    /// Ordered so that the updates of one call come out in a stable order.
    streams: BTreeMap<StreamKey, TaskStream>,
    retry_initial: Duration,
    retry_max: Duration,
    acks_ignored: u64,
    /// Every checkpoint write up to this sequence number is durable.
    durable: u64,
}

fn key_of(update: &pb::StatusUpdate) -> StreamKey {
    let task_id = update
        .status
        .as_ref()
        .map(|s| s.task_id.clone())
        .unwrap_or_default();
    (update.framework_id.clone(), task_id)
}

fn uuid_of(update: &pb::StatusUpdate) -> &[u8] {
    update.status.as_ref().map_or(&[], |s| s.uuid.as_slice())
}

fn is_terminal_update(update: &pb::StatusUpdate) -> bool {
    update
        .status
        .as_ref()
        .is_some_and(|s| is_terminal(s.state()))
}

impl StatusUpdateManager {
    pub(crate) fn new(retry_initial: Duration, retry_max: Duration) -> Self {
        let retry_initial = retry_initial.max(MIN_RETRY_INTERVAL);
        Self {
            streams: BTreeMap::new(),
            retry_initial,
            retry_max: retry_max.max(retry_initial),
            acks_ignored: 0,
            durable: 0,
        }
    }

    /// Queues `update` behind the task's earlier ones. It goes out with the
    /// next [`Self::due`] once it is the head and checkpoint write `seq` is
    /// durable (0: at once). A final update that must wait behind an
    /// unacknowledged one comes back as a [`pb::TaskEnded`] notice to send
    /// now, so the master frees the task's resources without waiting for
    /// that acknowledgement.
    pub(crate) fn push(
        &mut self,
        update: pb::StatusUpdate,
        seq: u64,
        now: Instant,
    ) -> Option<pb::TaskEnded> {
        let (framework_id, task_id) = key_of(&update);
        let state = update.status.as_ref().map(pb::TaskStatus::state);
        let stream = self
            .streams
            .entry((framework_id.clone(), task_id.clone()))
            .or_default();
        stream.queue.push_back(Queued {
            update,
            seq,
            since: now,
        });
        match state {
            Some(state) if is_terminal(state) && stream.queue.len() > 1 => Some(pb::TaskEnded {
                framework_id,
                task_id,
                state: state as i32,
            }),
            _ => None,
        }
    }

    /// An update restored from the checkpoint after a restart, `age` old:
    /// already durable, queued behind the task's other restored ones.
    pub(crate) fn restore(&mut self, update: pb::StatusUpdate, age: Duration, now: Instant) {
        let key = key_of(&update);
        let since = now.checked_sub(age).unwrap_or(now);
        self.streams
            .entry(key)
            .or_default()
            .queue
            .push_back(Queued {
                update,
                seq: 0,
                since,
            });
    }

    /// Checkpoint writes up to `seq` are durable: their updates may go out.
    pub(crate) fn mark_durable(&mut self, seq: u64) {
        self.durable = self.durable.max(seq);
    }

    /// The task's unacknowledged updates, oldest first (for its checkpoint).
    pub(crate) fn queued(&self, key: &StreamKey) -> impl Iterator<Item = &pb::StatusUpdate> {
        self.streams
            .get(key)
            .into_iter()
            .flat_map(|s| s.queue.iter().map(|q| &q.update))
    }

    /// The heads that must be sent now: durable, and never sent or their
    /// retry is due. Each one returned is marked sent at `now`, with the
    /// retry interval starting at `retry_initial` and doubling up to
    /// `retry_max`.
    pub(crate) fn due(&mut self, now: Instant) -> Vec<pb::StatusUpdate> {
        let (initial, max) = (self.retry_initial, self.retry_max);
        let mut out = Vec::new();
        for stream in self.streams.values_mut() {
            let Some(head) = stream.queue.front() else {
                continue;
            };
            if head.seq > self.durable {
                continue;
            }
            let interval = match &stream.retry {
                None => next_interval(None, initial, max),
                Some(r) if r.next_at <= now => next_interval(Some(r.interval), initial, max),
                Some(_) => continue,
            };
            stream.retry = Some(Retry {
                next_at: now + interval,
                interval,
            });
            out.push(head.update.clone());
        }
        out
    }

    /// Every head, to be sent right away: the agent has (re)registered, so
    /// whatever was in flight on the old stream may be lost. The retry
    /// interval starts again at `retry_initial`.
    pub(crate) fn resend_all(&mut self, now: Instant) -> Vec<pb::StatusUpdate> {
        for stream in self.streams.values_mut() {
            stream.retry = None;
        }
        self.due(now)
    }

    /// Releases the head of the task's stream when `uuid` is the head's.
    pub(crate) fn acknowledge(
        &mut self,
        framework_id: &str,
        task_id: &str,
        uuid: &[u8],
    ) -> AckOutcome {
        let key = (framework_id.to_string(), task_id.to_string());
        let Some(stream) = self.streams.get_mut(&key) else {
            self.acks_ignored += 1;
            return AckOutcome::Ignored;
        };
        let matches = stream
            .queue
            .front()
            .is_some_and(|h| uuid_of(&h.update) == uuid);
        if !matches {
            self.acks_ignored += 1;
            return AckOutcome::Ignored;
        }
        let acked = stream.queue.pop_front();
        stream.retry = None;
        let task_done =
            acked.is_some_and(|q| is_terminal_update(&q.update)) && stream.queue.is_empty();
        if stream.queue.is_empty() {
            self.streams.remove(&key);
        }
        AckOutcome::Accepted { task_done }
    }

    /// When the earliest in-flight head must be resent, if any is in flight.
    /// Heads never sent are not included: callers call [`Self::due`] right
    /// after [`Self::push`] and [`Self::acknowledge`].
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.streams
            .values()
            .filter_map(|s| s.retry.as_ref().map(|r| r.next_at))
            .min()
    }

    /// Updates not yet acknowledged, over all tasks.
    pub(crate) fn pending(&self) -> usize {
        self.streams.values().map(|s| s.queue.len()).sum()
    }

    /// How long the oldest unacknowledged update has waited.
    pub(crate) fn oldest_pending(&self, now: Instant) -> Option<Duration> {
        self.streams
            .values()
            .filter_map(|s| s.queue.front())
            .map(|q| now.saturating_duration_since(q.since))
            .max()
    }

    /// Acknowledgements that matched no head so far.
    pub(crate) fn acks_ignored(&self) -> u64 {
        self.acks_ignored
    }

    /// True while the task has unacknowledged updates.
    #[cfg(test)]
    pub(crate) fn has_pending(&self, framework_id: &str, task_id: &str) -> bool {
        self.streams
            .contains_key(&(framework_id.to_string(), task_id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::TaskState;

    const INITIAL: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(8);

    fn update(fw: &str, task: &str, state: TaskState, uuid: u8) -> pb::StatusUpdate {
        pb::StatusUpdate {
            framework_id: fw.to_string(),
            status: Some(pb::TaskStatus {
                task_id: task.to_string(),
                state: state as i32,
                uuid: vec![uuid; 16],
                ..Default::default()
            }),
        }
    }

    fn uuids(updates: &[pb::StatusUpdate]) -> Vec<u8> {
        updates.iter().map(|u| uuid_of(u)[0]).collect()
    }

    fn manager() -> StatusUpdateManager {
        StatusUpdateManager::new(INITIAL, MAX)
    }

    /// Pushes an update that needs no checkpoint write (sequence 0).
    fn push_now(m: &mut StatusUpdateManager, update: pb::StatusUpdate) -> Option<pb::TaskEnded> {
        m.push(update, 0, Instant::now())
    }

    #[test]
    fn a_final_update_queued_behind_an_unacknowledged_one_gives_a_notice() {
        let mut m = manager();
        assert_eq!(
            m.push(
                update("f", "a", TaskState::TaskRunning, 1),
                0,
                Instant::now()
            ),
            None
        );
        let notice = push_now(&mut m, update("f", "a", TaskState::TaskFinished, 2));
        assert_eq!(
            notice,
            Some(pb::TaskEnded {
                framework_id: "f".into(),
                task_id: "a".into(),
                state: TaskState::TaskFinished as i32,
            })
        );
        // Alone in its stream, a final update needs no notice: it goes out now.
        assert_eq!(
            m.push(
                update("f", "b", TaskState::TaskFailed, 3),
                0,
                Instant::now()
            ),
            None
        );
        // The notice does not change what is sent, nor its order.
        assert_eq!(uuids(&m.due(Instant::now())), vec![1, 3]);
    }

    #[test]
    fn only_the_head_of_each_task_is_in_flight() {
        let mut m = manager();
        let t0 = Instant::now();
        push_now(&mut m, update("f", "a", TaskState::TaskRunning, 1));
        push_now(&mut m, update("f", "a", TaskState::TaskFinished, 2));
        push_now(&mut m, update("f", "b", TaskState::TaskRunning, 3));
        assert_eq!(uuids(&m.due(t0)), vec![1, 3]);
        assert!(m.due(t0).is_empty(), "nothing new until an ack or a retry");
        assert_eq!(m.pending(), 3);
    }

    #[test]
    fn acknowledging_the_head_releases_the_next_update_in_order() {
        let mut m = manager();
        let t0 = Instant::now();
        push_now(&mut m, update("f", "a", TaskState::TaskRunning, 1));
        push_now(&mut m, update("f", "a", TaskState::TaskKilling, 2));
        push_now(&mut m, update("f", "a", TaskState::TaskKilled, 3));
        assert_eq!(uuids(&m.due(t0)), vec![1]);
        assert_eq!(
            m.acknowledge("f", "a", &[1; 16]),
            AckOutcome::Accepted { task_done: false }
        );
        assert_eq!(uuids(&m.due(t0)), vec![2]);
        assert_eq!(
            m.acknowledge("f", "a", &[2; 16]),
            AckOutcome::Accepted { task_done: false }
        );
        assert_eq!(uuids(&m.due(t0)), vec![3]);
        assert_eq!(
            m.acknowledge("f", "a", &[3; 16]),
            AckOutcome::Accepted { task_done: true }
        );
        assert_eq!(m.pending(), 0);
        assert!(!m.has_pending("f", "a"));
    }

    #[test]
    fn acks_with_a_wrong_uuid_or_for_unknown_tasks_are_ignored_and_counted() {
        let mut m = manager();
        let t0 = Instant::now();
        push_now(&mut m, update("f", "a", TaskState::TaskRunning, 1));
        push_now(&mut m, update("f", "a", TaskState::TaskFinished, 2));
        m.due(t0);
        // The second update's uuid is not the head's: no skipping ahead.
        assert_eq!(m.acknowledge("f", "a", &[2; 16]), AckOutcome::Ignored);
        assert_eq!(m.acknowledge("f", "zzz", &[1; 16]), AckOutcome::Ignored);
        assert_eq!(m.acknowledge("g", "a", &[1; 16]), AckOutcome::Ignored);
        assert_eq!(m.acks_ignored(), 3);
        assert_eq!(m.pending(), 2);
        // A duplicate ack of a released head is ignored too.
        m.acknowledge("f", "a", &[1; 16]);
        assert_eq!(m.acknowledge("f", "a", &[1; 16]), AckOutcome::Ignored);
        assert_eq!(m.acks_ignored(), 4);
    }

    #[test]
    fn unacknowledged_head_is_resent_with_doubling_backoff_up_to_the_cap() {
        let mut m = manager();
        let t0 = Instant::now();
        push_now(&mut m, update("f", "a", TaskState::TaskRunning, 1));
        assert_eq!(uuids(&m.due(t0)), vec![1]);
        let mut now = t0;
        let mut intervals = Vec::new();
        for _ in 0..6 {
            let next = m.next_retry().unwrap();
            intervals.push(next - now);
            assert!(m.due(next - Duration::from_millis(1)).is_empty());
            assert_eq!(uuids(&m.due(next)), vec![1]);
            now = next;
        }
        let secs: Vec<u64> = intervals.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn reregistration_resends_every_head_immediately_with_backoff_reset() {
        let mut m = manager();
        let t0 = Instant::now();
        push_now(&mut m, update("f", "a", TaskState::TaskRunning, 1));
        push_now(&mut m, update("f", "a", TaskState::TaskFinished, 2));
        push_now(&mut m, update("g", "b", TaskState::TaskRunning, 3));
        m.due(t0);
        let later = t0 + Duration::from_secs(3);
        m.due(later); // both retried once: interval now 2 s
        let t1 = later + Duration::from_millis(10);
        assert_eq!(uuids(&m.resend_all(t1)), vec![1, 3]);
        assert_eq!(m.next_retry(), Some(t1 + INITIAL));
    }

    #[test]
    fn a_terminal_ack_with_more_queued_does_not_forget_the_task() {
        let mut m = manager();
        let t0 = Instant::now();
        m.push(update("f", "a", TaskState::TaskLost, 1), 0, Instant::now());
        m.push(update("f", "a", TaskState::TaskLost, 2), 0, Instant::now());
        m.due(t0);
        assert_eq!(
            m.acknowledge("f", "a", &[1; 16]),
            AckOutcome::Accepted { task_done: false }
        );
        assert!(m.has_pending("f", "a"));
    }

    #[test]
    fn a_zero_retry_interval_is_raised_to_the_minimum() {
        let mut m = StatusUpdateManager::new(Duration::ZERO, Duration::ZERO);
        let t0 = Instant::now();
        push_now(&mut m, update("f", "a", TaskState::TaskRunning, 1));
        m.due(t0);
        assert_eq!(m.next_retry(), Some(t0 + MIN_RETRY_INTERVAL));
    }

    #[test]
    fn new_update_has_a_fresh_uuid_and_agent_source() {
        let status = pb::TaskStatus {
            task_id: "t".into(),
            state: TaskState::TaskRunning as i32,
            ..Default::default()
        };
        let a = new_update("agent-1", "fw", status.clone(), 12.5);
        let b = new_update("agent-1", "fw", status, 12.5);
        let (sa, sb) = (a.status.unwrap(), b.status.unwrap());
        assert_eq!(sa.uuid.len(), 16);
        assert_ne!(sa.uuid, sb.uuid);
        assert_eq!(sa.source(), pb::Source::Agent);
        assert_eq!(sa.agent_id, "agent-1");
        assert_eq!(sa.framework_id, "fw");
        assert_eq!(a.framework_id, "fw");
        assert_eq!(sa.timestamp, 12.5);
    }

    #[test]
    fn the_default_retry_schedule_doubles_from_one_second_to_a_minute() {
        let (initial, max) = (
            crate::config::DEFAULT_STATUS_UPDATE_RETRY_INITIAL,
            crate::config::DEFAULT_STATUS_UPDATE_RETRY_MAX,
        );
        let mut previous = None;
        let mut secs = Vec::new();
        for _ in 0..9 {
            let next = next_interval(previous, initial, max);
            secs.push(next.as_secs());
            previous = Some(next);
        }
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn an_update_goes_out_only_once_its_checkpoint_write_is_durable() {
        let mut m = manager();
        let t0 = Instant::now();
        m.push(update("f", "a", TaskState::TaskRunning, 1), 5, t0);
        m.push(update("f", "b", TaskState::TaskRunning, 2), 6, t0);
        assert!(m.due(t0).is_empty(), "nothing is durable yet");
        assert_eq!(m.next_retry(), None, "no retry timer for unsent updates");
        m.mark_durable(5);
        assert_eq!(uuids(&m.due(t0)), vec![1]);
        // A late report of an older write does not move it back.
        m.mark_durable(3);
        assert!(m.due(t0).is_empty());
        m.mark_durable(6);
        assert_eq!(uuids(&m.due(t0)), vec![2]);
    }

    #[test]
    fn restored_updates_keep_their_order_uuids_and_age() {
        let mut m = manager();
        let t0 = Instant::now() + Duration::from_secs(100);
        m.restore(
            update("f", "a", TaskState::TaskRunning, 1),
            Duration::from_secs(30),
            t0,
        );
        m.restore(
            update("f", "a", TaskState::TaskFailed, 2),
            Duration::from_secs(10),
            t0,
        );
        let key = ("f".to_string(), "a".to_string());
        assert_eq!(
            m.queued(&key).map(|u| uuid_of(u)[0]).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(m.oldest_pending(t0), Some(Duration::from_secs(30)));
        assert_eq!(uuids(&m.resend_all(t0)), vec![1]);
        m.acknowledge("f", "a", &[1; 16]);
        assert_eq!(uuids(&m.due(t0)), vec![2]);
        assert_eq!(m.oldest_pending(t0), Some(Duration::from_secs(10)));
        m.acknowledge("f", "a", &[2; 16]);
        assert_eq!(m.oldest_pending(t0), None);
    }
}
