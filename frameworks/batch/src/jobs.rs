//! The pure core of the batch framework: jobs, their runs, the task slots of
//! each run and the attempts of each slot, and every transition between them.
//!
//! No I/O and no clock: offers and status updates come in with "now" (Unix
//! seconds), launches and kills come out as values, and every record that
//! changed is remembered until the actor takes it for the store
//! ([`Jobs::take_changes`]). The actor makes the changes durable before it
//! launches or acknowledges anything, so after a crash the store never knows
//! less than the master.
//!
//! Task ids are `JOB.RUN.INDEX.ATTEMPT` (job names cannot contain `.`), so an
//! update finds its slot without a lookup table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use corral_proto::task::is_terminal;
use corral_proto::{AgentId, OfferId, Resources, TaskId, pb};
use corral_sdk::constraint::all_match;
use serde::{Deserialize, Serialize};

use crate::spec::{self, Command, Concurrency, Job, SpecError};
use crate::store::StoredJob;

/// Finished runs of a cron job that stay visible; older ones are dropped
/// (Kubernetes CronJob keeps 3 successful and 1 failed by default).
pub const RUN_HISTORY: usize = 10;
/// Relaunches of a slot that do not count against `retries` (the task never
/// ran: dropped by the master, or unknown to it after a crash before the
/// launch reached it) before they do, so a launch that can never reach the
/// master does not loop forever.
const MAX_FREE_RELAUNCHES: u32 = 5;
/// Environment variables every task gets.
pub const ENV_INDEX: &str = "CORRAL_TASK_INDEX";
pub const ENV_COUNT: &str = "CORRAL_TASK_COUNT";
pub const ENV_JOB: &str = "CORRAL_JOB";
pub const ENV_RUN: &str = "CORRAL_RUN";

/// Why a call was refused; the API maps each to a gRPC code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobsError {
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error("job {0} already exists")]
    Exists(String),
    #[error("no job named {0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
}

/// Where a slot (one index of one run) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    /// Runnable, waiting for an offer.
    Pending,
    /// Waiting for its retry time (`retry_at`).
    Backoff,
    /// An attempt is launched (staging, starting, running, unreachable).
    Launched,
    Succeeded,
    /// Out of retries.
    Failed,
    Cancelled,
}

/// One launch of a slot's task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    pub task_id: String,
    pub agent_id: String,
    /// `pb::TaskState` as i32.
    pub state: i32,
    /// `pb::Reason` as i32.
    pub reason: i32,
    pub message: String,
    pub exit_code: Option<i32>,
    pub launched_at: f64,
    pub finished_at: f64,
    /// False for attempts that never ran (dropped, unknown to the master):
    /// they do not use up a retry.
    pub counted: bool,
}

/// One index of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    pub state: SlotState,
    pub attempts: Vec<Attempt>,
    pub retry_at: f64,
}

/// How a run ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Active,
    Succeeded,
    Failed,
    Cancelled,
}

/// The run's own record; its slots are stored one record each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub number: u32,
    pub state: RunState,
    pub started_at: f64,
    pub finished_at: f64,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Run {
    pub meta: RunMeta,
    pub slots: Vec<Slot>,
}

/// The job's own record (everything but the spec and the slots).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMeta {
    /// Submission order, for equal priorities.
    pub seq: u64,
    pub submitted_at: f64,
    /// Why the job failed or was cancelled.
    pub message: String,
    /// Cancelled by a user (cron jobs stop firing).
    pub cancelled: bool,
    /// Failed before any run (a dependency failed).
    pub failed: bool,
    pub runs: Vec<RunMeta>,
    pub next_run: u32,
    /// Cron jobs: the next firing (Unix seconds).
    pub next_fire: f64,
    pub skipped_runs: u32,
}

struct Entry {
    job: Job,
    meta: JobMeta,
    runs: BTreeMap<u32, Run>,
    /// Template of every task of the job (no id, agent or index yet).
    template: pb::TaskInfo,
    /// Why pending tasks were not placed in the last offer round; not stored.
    unplaced: Option<String>,
}

impl Entry {
    /// Numbers of the runs still active.
    fn active_runs(&self) -> Vec<u32> {
        self.runs
            .values()
            .filter(|r| r.meta.state == RunState::Active)
            .map(|r| r.meta.number)
            .collect()
    }
}

/// Pending slots in launch order: priority (high first), submission order,
/// run, index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PendingKey {
    neg_priority: i64,
    seq: u64,
    run: u32,
    index: u32,
}

/// A record that changed and must be written (None: deleted).
pub enum Change {
    Spec(String, Option<Box<pb::JobSpec>>),
    Job(String, Option<JobMeta>),
    Slot((String, u32, u32), Option<Slot>),
}

/// What the actor must do besides storing changes.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Kill {
        task_id: TaskId,
        agent_id: Option<AgentId>,
    },
}

/// Launches planned for offers, and the offers to decline.
#[derive(Debug, Default)]
pub struct Plan {
    pub launches: Vec<(OfferId, Vec<pb::TaskInfo>)>,
    pub declines: Vec<OfferId>,
}

/// Every job and its runs.
#[derive(Default)]
pub struct Jobs {
    entries: BTreeMap<String, Entry>,
    seq_to_name: HashMap<u64, String>,
    pending: BTreeSet<PendingKey>,
    /// Slots in backoff, by retry time (milliseconds), for `tick`.
    backoff: BTreeSet<(u64, u64, u32, u32)>,
    next_seq: u64,
    /// Scheduled jobs still firing: what `tick` and `next_wakeup` look at,
    /// so the actor's loop does not walk every job ever submitted.
    cron: BTreeSet<String>,
    changes: Vec<Change>,
    /// Final states of attempts that ended since the last `take_ended`.
    ended: Vec<pb::TaskState>,
}

/// Counts of a run's slots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub waiting: u32,
    pub pending: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub cancelled: u32,
}

fn seconds_to_datetime(seconds: f64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt((seconds * 1000.0) as i64)
        .single()
        .unwrap_or_default()
}

fn millis(seconds: f64) -> u64 {
    (seconds.max(0.0) * 1000.0) as u64
}

impl Jobs {
    pub fn new() -> Self {
        Self::default()
    }

    // ---- submission, cancellation --------------------------------------

    /// Validates and adds a job. `now` is wall-clock Unix seconds.
    pub fn submit(&mut self, mut spec: pb::JobSpec, now: f64) -> Result<String, JobsError> {
        if spec.name.is_empty() {
            spec.name = format!("job-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        }
        let job = spec::validate(&spec)?;
        if self.entries.contains_key(&job.name) {
            return Err(JobsError::Exists(job.name));
        }
        for (i, dep) in job.after.iter().enumerate() {
            match self.entries.get(dep) {
                None => {
                    return Err(SpecError::new(
                        format!("job.after[{i}]"),
                        format!("no job named {dep}"),
                    )
                    .into());
                }
                Some(e) if e.job.schedule.is_some() => {
                    return Err(SpecError::new(
                        format!("job.after[{i}]"),
                        format!("{dep} is a scheduled job; only one-shot jobs can be waited for"),
                    )
                    .into());
                }
                Some(_) => {}
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let name = job.name.clone();
        let meta = JobMeta {
            seq,
            submitted_at: now,
            message: String::new(),
            cancelled: false,
            failed: false,
            runs: Vec::new(),
            next_run: 1,
            next_fire: job
                .schedule
                .as_ref()
                .and_then(|s| s.next_after(seconds_to_datetime(now)))
                .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0),
            skipped_runs: 0,
        };
        self.changes
            .push(Change::Spec(name.clone(), Some(Box::new(job.spec.clone()))));
        self.insert(job, meta, BTreeMap::new());
        self.job_changed(&name);
        if self.entries[&name].job.schedule.is_none() {
            self.start_if_ready(&name, now);
        }
        Ok(name)
    }

    /// Cancels a job: no new launches, running tasks are killed, scheduled
    /// jobs stop firing, dependants fail.
    pub fn cancel(&mut self, name: &str, now: f64) -> Result<Vec<Effect>, JobsError> {
        let entry = self
            .entries
            .get_mut(name)
            .ok_or_else(|| JobsError::NotFound(name.to_string()))?;
        let finished = entry.job.schedule.is_none()
            && matches!(
                job_state(entry),
                pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
            );
        if entry.meta.cancelled || finished {
            return Ok(Vec::new());
        }
        entry.meta.cancelled = true;
        entry.meta.message = "cancelled".to_string();
        self.cron.remove(name);
        let active = entry.active_runs();
        let mut effects = Vec::new();
        for run in active {
            effects.extend(self.finish_run(name, run, RunState::Cancelled, "cancelled", now));
        }
        self.job_changed(name);
        if self.entries[name].job.schedule.is_none() && self.entries[name].runs.is_empty() {
            // Never started (waiting for dependencies).
            self.fail_dependants(name, now, &mut effects);
        }
        Ok(effects)
    }

    /// Forgets a finished job and all its records. Refused while it is
    /// active (cancel it first), while a task of it still runs, or while a
    /// job that has not started waits for it.
    pub fn delete(&mut self, name: &str) -> Result<(), JobsError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| JobsError::NotFound(name.to_string()))?;
        let state = job_state(entry);
        let ended = matches!(
            state,
            pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
        );
        if !ended {
            return Err(JobsError::Busy(format!(
                "job {name} is {}; cancel it first",
                crate::metrics::state_label(state)
            )));
        }
        if entry
            .runs
            .values()
            .any(|r| r.slots.iter().any(|s| s.state == SlotState::Launched))
        {
            return Err(JobsError::Busy(format!(
                "job {name} still has tasks being killed; try again shortly"
            )));
        }
        if let Some(waiting) = self.dependants(name).into_iter().find(|d| {
            matches!(
                self.entries.get(d).map(job_state),
                Some(pb::JobState::Waiting)
            )
        }) {
            return Err(JobsError::Busy(format!("job {waiting} waits for {name}")));
        }
        let entry = self.entries.remove(name).expect("checked above");
        self.cron.remove(name);
        self.seq_to_name.remove(&entry.meta.seq);
        for run in entry.runs.values() {
            for index in 0..run.slots.len() as u32 {
                self.changes.push(Change::Slot(
                    (name.to_string(), run.meta.number, index),
                    None,
                ));
            }
        }
        self.changes.push(Change::Job(name.to_string(), None));
        self.changes.push(Change::Spec(name.to_string(), None));
        Ok(())
    }

    // ---- offers ----------------------------------------------------------

    /// Packs pending tasks into `offers`: highest priority first, then
    /// submission order, each task into the first offer it fits. Offers that
    /// get nothing are declined. Jobs whose tasks fit nowhere are told why.
    pub fn place(&mut self, offers: &[pb::Offer], now: f64) -> Plan {
        struct Room<'a> {
            offer: &'a pb::Offer,
            id: OfferId,
            left: Resources,
            tasks: Vec<pb::TaskInfo>,
        }
        let mut unusable = Vec::new();
        let mut rooms: Vec<Room<'_>> = Vec::with_capacity(offers.len());
        for offer in offers {
            let Ok(id) = OfferId::parse(&offer.id, "offer.id") else {
                continue;
            };
            // An offer whose resources we cannot read is handed back rather
            // than held until the master rescinds it.
            match Resources::from_proto(&offer.resources, "offer.resources") {
                Ok(left) => rooms.push(Room {
                    offer,
                    id,
                    left,
                    tasks: Vec::new(),
                }),
                Err(e) => {
                    tracing::warn!(offer_id = %id, error = %e, "unreadable offer; declining it");
                    unusable.push(id);
                }
            }
        }
        let mut placed: Vec<PendingKey> = Vec::new();
        let mut cursor = self.pending.iter().next().copied();
        while let Some(key) = cursor {
            let Some(name) = self.seq_to_name.get(&key.seq) else {
                cursor = self.next_pending_after(key);
                continue;
            };
            let entry = &self.entries[name];
            let want = &entry.job.resources;
            let room = rooms
                .iter_mut()
                .find(|r| r.left.contains(want) && all_match(&entry.job.constraints, r.offer));
            match room {
                Some(room) => {
                    if let Some(left) = room.left.checked_sub(want) {
                        room.left = left;
                    }
                    room.tasks.push(Self::task_for(
                        entry,
                        key.run,
                        key.index,
                        &room.offer.agent_id,
                    ));
                    placed.push(key);
                    cursor = self.next_pending_after(key);
                }
                None => {
                    // Every other pending task of this run is the same size
                    // with the same constraints: skip the whole run.
                    let reason = unplaced_reason(&entry.job, offers);
                    let entry = self.entries.get_mut(name).expect("name from the index");
                    entry.unplaced = Some(reason);
                    cursor = self
                        .pending
                        .range(
                            PendingKey {
                                index: u32::MAX,
                                ..key
                            }..,
                        )
                        .find(|k| (k.seq, k.run) != (key.seq, key.run))
                        .copied();
                }
            }
            if rooms
                .iter()
                .all(|r| r.left.cpus.is_zero() || r.left.mem.is_zero())
            {
                break;
            }
        }
        for key in placed {
            let name = self.seq_to_name[&key.seq].clone();
            self.pending.remove(&key);
            let entry = self.entries.get_mut(&name).expect("pending job exists");
            entry.unplaced = None;
            let run = entry.runs.get_mut(&key.run).expect("pending run exists");
            let slot = &mut run.slots[key.index as usize];
            let number = slot.attempts.len() as u32 + 1;
            slot.state = SlotState::Launched;
            slot.attempts.push(Attempt {
                task_id: task_id(&name, key.run, key.index, number),
                agent_id: String::new(),
                state: pb::TaskState::TaskStaging as i32,
                reason: 0,
                message: String::new(),
                exit_code: None,
                launched_at: now,
                finished_at: 0.0,
                counted: true,
            });
            self.slot_changed(&name, key.run, key.index);
        }
        let mut plan = Plan {
            declines: unusable,
            ..Plan::default()
        };
        for mut room in rooms {
            if room.tasks.is_empty() {
                plan.declines.push(room.id);
                continue;
            }
            // The attempt's agent is known only now that the task is placed.
            for task in &mut room.tasks {
                let (name, run, index, _) = parse_task_id(&task.task_id).expect("our own id");
                if let Some(slot) = self.slot_mut(name, run, index)
                    && let Some(attempt) = slot.attempts.last_mut()
                {
                    attempt.agent_id = task.agent_id.clone();
                }
            }
            plan.launches
                .push((room.id, std::mem::take(&mut room.tasks)));
        }
        plan
    }

    fn next_pending_after(&self, key: PendingKey) -> Option<PendingKey> {
        self.pending
            .range((std::ops::Bound::Excluded(key), std::ops::Bound::Unbounded))
            .next()
            .copied()
    }

    fn task_for(entry: &Entry, run: u32, index: u32, agent_id: &str) -> pb::TaskInfo {
        let attempt = entry
            .runs
            .get(&run)
            .map_or(1, |r| r.slots[index as usize].attempts.len() as u32 + 1);
        let mut task = entry.template.clone();
        task.task_id = task_id(&entry.job.name, run, index, attempt);
        task.name = format!("{}[{index}]", entry.job.name);
        task.agent_id = agent_id.to_string();
        if let Some(command) = &mut task.command {
            command
                .environment
                .insert(ENV_INDEX.to_string(), index.to_string());
            command
                .environment
                .insert(ENV_RUN.to_string(), run.to_string());
        }
        task.labels.insert("index".to_string(), index.to_string());
        task.labels.insert("run".to_string(), run.to_string());
        task
    }

    /// Nothing is runnable now (offers can be suppressed).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The launch was never received by the master (the call failed): the
    /// attempts did not run and the slots go back to pending.
    pub fn launch_failed(&mut self, task_ids: &[String], message: &str, now: f64) {
        for id in task_ids {
            let status = pb::TaskStatus {
                task_id: id.clone(),
                state: pb::TaskState::TaskDropped as i32,
                message: message.to_string(),
                ..Default::default()
            };
            let _ = self.update(&status, now);
        }
    }

    // ---- status updates --------------------------------------------------

    /// Applies a status update. Returns kills to send (e.g. a task of a run
    /// that already ended). Idempotent: a repeated state changes nothing.
    pub fn update(&mut self, status: &pb::TaskStatus, now: f64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let state = pb::TaskState::try_from(status.state).unwrap_or(pb::TaskState::Unspecified);
        let Some((name, run, index, attempt_no)) = parse_task_id(&status.task_id) else {
            return effects;
        };
        let name = name.to_string();
        let kill_stray = |effects: &mut Vec<Effect>| {
            if !ends(state)
                && let Ok(task_id) = TaskId::parse(&status.task_id, "task_id")
            {
                effects.push(Effect::Kill {
                    task_id,
                    agent_id: AgentId::parse(&status.agent_id, "agent_id").ok(),
                });
            }
        };
        let Some(slot) = self.slot_mut(&name, run, index) else {
            // A run dropped from history, or a job this store never saw.
            kill_stray(&mut effects);
            return effects;
        };
        let current = slot.attempts.len() as u32;
        if attempt_no == 0 || attempt_no > current {
            kill_stray(&mut effects);
            return effects;
        }
        let slot_state = slot.state;
        let attempt = &mut slot.attempts[attempt_no as usize - 1];
        if ends(pb::TaskState::try_from(attempt.state).unwrap_or_default()) {
            // Already final: nothing can change it (a late or repeated copy).
            // But a task we counted as never launched that turns out to run
            // (a launch call that failed after all) must not run twice.
            kill_stray(&mut effects);
            return effects;
        }
        if attempt.state == status.state && attempt.message == status.message {
            return effects;
        }
        attempt.state = status.state;
        attempt.reason = status.reason;
        attempt.message.clone_from(&status.message);
        attempt.exit_code = status.exit_code.or(attempt.exit_code);
        if !status.agent_id.is_empty() {
            attempt.agent_id.clone_from(&status.agent_id);
        }
        let terminal = ends(state);
        let is_current = attempt_no == current;
        if !terminal || !is_current || slot_state != SlotState::Launched {
            if terminal {
                attempt.finished_at = now;
            }
            self.slot_changed(&name, run, index);
            return effects;
        }
        attempt.finished_at = now;
        let never_ran = matches!(
            state,
            pb::TaskState::TaskDropped | pb::TaskState::TaskUnknown
        );
        attempt.counted = !never_ran;
        let free_relaunches = slot.attempts.iter().filter(|a| !a.counted).count() as u32;
        let failures = slot.attempts.iter().filter(|a| a.counted).count() as u32;
        self.ended.push(state);
        let entry = &self.entries[&name];
        let run_active = entry.runs[&run].meta.state == RunState::Active;
        let retries = entry.job.retries;
        let backoff = retry_delay(&entry.job, failures);
        let slot = self.slot_mut(&name, run, index).expect("found above");
        if state == pb::TaskState::TaskFinished {
            slot.state = SlotState::Succeeded;
        } else if !run_active {
            slot.state = SlotState::Cancelled;
        } else if never_ran && free_relaunches <= MAX_FREE_RELAUNCHES {
            slot.state = SlotState::Pending;
        } else if failures <= retries {
            slot.state = SlotState::Backoff;
            slot.retry_at = now + backoff.as_secs_f64();
        } else {
            slot.state = SlotState::Failed;
        }
        let new_state = slot.state;
        let retry_at = slot.retry_at;
        self.slot_changed(&name, run, index);
        let seq = self.entries[&name].meta.seq;
        match new_state {
            SlotState::Pending => {
                self.pending.insert(self.pending_key(&name, run, index));
            }
            SlotState::Backoff => {
                self.backoff.insert((millis(retry_at), seq, run, index));
            }
            SlotState::Failed => {
                let reason = describe_failure(index, failures, status);
                effects.extend(self.finish_run(&name, run, RunState::Failed, &reason, now));
            }
            SlotState::Succeeded => {
                let done = self.entries[&name].runs[&run]
                    .slots
                    .iter()
                    .all(|s| s.state == SlotState::Succeeded);
                if done && run_active {
                    effects.extend(self.finish_run(&name, run, RunState::Succeeded, "", now));
                }
            }
            _ => {}
        }
        effects
    }

    /// Launched attempts whose state the master should confirm (after a
    /// restart or re-subscription).
    pub fn launched(&self) -> Vec<(TaskId, Option<AgentId>)> {
        let mut out = Vec::new();
        for entry in self.entries.values() {
            for run in entry.runs.values() {
                for slot in &run.slots {
                    if slot.state != SlotState::Launched {
                        continue;
                    }
                    if let Some(a) = slot.attempts.last()
                        && let Ok(id) = TaskId::parse(&a.task_id, "task_id")
                    {
                        out.push((id, AgentId::parse(&a.agent_id, "agent_id").ok()));
                    }
                }
            }
        }
        out
    }

    // ---- time ------------------------------------------------------------

    /// Moves slots whose backoff ended back to pending and fires cron jobs
    /// that are due. Returns kills (a `replace` firing cancels a run).
    pub fn tick(&mut self, now: f64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let due: Vec<_> = self
            .backoff
            .range(..(millis(now) + 1, 0, 0, 0))
            .copied()
            .collect();
        for item in due {
            self.backoff.remove(&item);
            let (_, seq, run, index) = item;
            let Some(name) = self.seq_to_name.get(&seq).cloned() else {
                continue;
            };
            let active = self.entries[&name]
                .runs
                .get(&run)
                .is_some_and(|r| r.meta.state == RunState::Active);
            let Some(slot) = self.slot_mut(&name, run, index) else {
                continue;
            };
            if slot.state != SlotState::Backoff || !active {
                continue;
            }
            slot.state = SlotState::Pending;
            self.slot_changed(&name, run, index);
            self.pending.insert(self.pending_key(&name, run, index));
        }
        let due: Vec<String> = self
            .cron
            .iter()
            .filter(|name| {
                let next = self.entries[*name].meta.next_fire;
                next > 0.0 && next <= now
            })
            .cloned()
            .collect();
        for name in due {
            effects.extend(self.fire(&name, now));
        }
        effects
    }

    /// When `tick` next has something to do (for the actor's timer).
    pub fn next_wakeup(&self) -> Option<f64> {
        let backoff = self.backoff.first().map(|(ms, ..)| *ms as f64 / 1000.0);
        let cron = self
            .cron
            .iter()
            .map(|name| self.entries[name].meta.next_fire)
            .filter(|next| *next > 0.0)
            .reduce(f64::min);
        match (backoff, cron) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// One cron firing: a new run, subject to the concurrency policy. Missed
    /// firings (the framework was down) collapse into this one, as a
    /// Kubernetes CronJob without `startingDeadlineSeconds` would.
    fn fire(&mut self, name: &str, now: f64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let entry = self.entries.get_mut(name).expect("due job exists");
        let schedule = entry.job.schedule.clone().expect("only cron jobs fire");
        entry.meta.next_fire = schedule
            .next_after(seconds_to_datetime(now))
            .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
        let active = entry.active_runs();
        match entry.job.concurrency {
            Concurrency::Forbid if !active.is_empty() => {
                entry.meta.skipped_runs += 1;
                tracing::info!(
                    job = name,
                    "cron firing skipped: a run is still active (forbid)"
                );
                self.job_changed(name);
                return effects;
            }
            Concurrency::Replace => {
                for run in active {
                    effects.extend(self.finish_run(
                        name,
                        run,
                        RunState::Cancelled,
                        "replaced by a newer run",
                        now,
                    ));
                }
            }
            _ => {}
        }
        self.start_run(name, now);
        effects
    }

    // ---- runs --------------------------------------------------------------

    /// Starts run 1 of a one-shot job once all its dependencies succeeded;
    /// fails it if one failed.
    fn start_if_ready(&mut self, name: &str, now: f64) {
        let entry = &self.entries[name];
        if entry.meta.cancelled || entry.meta.failed || !entry.runs.is_empty() {
            return;
        }
        let mut failed_dep = None;
        let mut all_done = true;
        for dep in &entry.job.after {
            match self.entries.get(dep).map(job_state) {
                Some(pb::JobState::Succeeded) => {}
                Some(pb::JobState::Failed | pb::JobState::Cancelled) | None => {
                    failed_dep = Some(dep.clone());
                    break;
                }
                Some(_) => all_done = false,
            }
        }
        if let Some(dep) = failed_dep {
            let mut effects = Vec::new();
            self.fail_before_run(
                name,
                &format!("dependency {dep} did not succeed"),
                now,
                &mut effects,
            );
            return;
        }
        if all_done {
            self.start_run(name, now);
        }
    }

    fn start_run(&mut self, name: &str, now: f64) {
        let entry = self.entries.get_mut(name).expect("job exists");
        let number = entry.meta.next_run;
        entry.meta.next_run += 1;
        let count = entry.job.count;
        let meta = RunMeta {
            number,
            state: RunState::Active,
            started_at: now,
            finished_at: 0.0,
            message: String::new(),
        };
        entry.runs.insert(
            number,
            Run {
                meta,
                slots: vec![
                    Slot {
                        state: SlotState::Pending,
                        attempts: Vec::new(),
                        retry_at: 0.0,
                    };
                    count as usize
                ],
            },
        );
        for index in 0..count {
            self.pending.insert(self.pending_key(name, number, index));
            self.slot_changed(name, number, index);
        }
        self.trim_history(name);
        self.job_changed(name);
    }

    /// Ends a run: unlaunched slots are cancelled, launched ones killed
    /// (their final updates mark them cancelled). A one-shot job's end
    /// starts or fails its dependants.
    fn finish_run(
        &mut self,
        name: &str,
        number: u32,
        state: RunState,
        message: &str,
        now: f64,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let seq = self.entries[name].meta.seq;
        let entry = self.entries.get_mut(name).expect("job exists");
        let Some(run) = entry.runs.get_mut(&number) else {
            return effects;
        };
        if run.meta.state != RunState::Active {
            return effects;
        }
        run.meta.state = state;
        run.meta.finished_at = now;
        run.meta.message = message.to_string();
        let mut changed = Vec::new();
        for (index, slot) in run.slots.iter_mut().enumerate() {
            let index = index as u32;
            match slot.state {
                SlotState::Pending | SlotState::Backoff => {
                    slot.state = SlotState::Cancelled;
                    changed.push(index);
                }
                SlotState::Launched => {
                    if let Some(a) = slot.attempts.last()
                        && let Ok(task_id) = TaskId::parse(&a.task_id, "task_id")
                    {
                        effects.push(Effect::Kill {
                            task_id,
                            agent_id: AgentId::parse(&a.agent_id, "agent_id").ok(),
                        });
                    }
                }
                _ => {}
            }
        }
        let priority = entry.job.priority;
        for index in changed {
            self.pending.remove(&PendingKey {
                neg_priority: -i64::from(priority),
                seq,
                run: number,
                index,
            });
            self.slot_changed(name, number, index);
        }
        if !message.is_empty()
            && state != RunState::Succeeded
            && self.entries[name].job.schedule.is_none()
        {
            self.entries.get_mut(name).expect("job exists").meta.message = message.to_string();
        }
        self.job_changed(name);
        if self.entries[name].job.schedule.is_none() {
            match state {
                RunState::Succeeded => self.start_dependants(name, now),
                _ => self.fail_dependants(name, now, &mut effects),
            }
        }
        self.trim_history(name);
        effects
    }

    fn dependants(&self, name: &str) -> Vec<String> {
        self.entries
            .iter()
            .filter(|(_, e)| e.job.after.iter().any(|d| d == name))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn start_dependants(&mut self, name: &str, now: f64) {
        for dependant in self.dependants(name) {
            self.start_if_ready(&dependant, now);
        }
    }

    fn fail_dependants(&mut self, name: &str, now: f64, effects: &mut Vec<Effect>) {
        for dependant in self.dependants(name) {
            let message = format!("dependency {name} did not succeed");
            self.fail_before_run(&dependant, &message, now, effects);
        }
    }

    /// Fails a job that has not started (and, transitively, its dependants).
    fn fail_before_run(&mut self, name: &str, message: &str, now: f64, effects: &mut Vec<Effect>) {
        let entry = self.entries.get_mut(name).expect("job exists");
        if !entry.runs.is_empty() || entry.meta.failed || entry.meta.cancelled {
            return;
        }
        entry.meta.failed = true;
        entry.meta.message = message.to_string();
        self.job_changed(name);
        self.fail_dependants(name, now, effects);
    }

    /// Drops the oldest finished runs of a cron job beyond the history limit.
    fn trim_history(&mut self, name: &str) {
        let entry = self.entries.get_mut(name).expect("job exists");
        let finished: Vec<u32> = entry
            .runs
            .values()
            .filter(|r| r.meta.state != RunState::Active)
            .map(|r| r.meta.number)
            .collect();
        if finished.len() <= RUN_HISTORY {
            return;
        }
        let drop: Vec<u32> = finished[..finished.len() - RUN_HISTORY].to_vec();
        let mut removed = Vec::new();
        for number in drop {
            if let Some(run) = entry.runs.remove(&number) {
                removed.push((number, run.slots.len() as u32));
            }
        }
        for (number, slots) in removed {
            for index in 0..slots {
                self.changes
                    .push(Change::Slot((name.to_string(), number, index), None));
            }
        }
        self.job_changed(name);
    }

    // ---- bookkeeping ---------------------------------------------------------

    fn insert(&mut self, job: Job, meta: JobMeta, runs: BTreeMap<u32, Run>) {
        let name = job.name.clone();
        self.next_seq = self.next_seq.max(meta.seq + 1);
        self.seq_to_name.insert(meta.seq, name.clone());
        let template = template(&job);
        if job.schedule.is_some() && !meta.cancelled {
            self.cron.insert(name.clone());
        }
        self.entries.insert(
            name,
            Entry {
                job,
                meta,
                runs,
                template,
                unplaced: None,
            },
        );
    }

    fn pending_key(&self, name: &str, run: u32, index: u32) -> PendingKey {
        let entry = &self.entries[name];
        PendingKey {
            neg_priority: -i64::from(entry.job.priority),
            seq: entry.meta.seq,
            run,
            index,
        }
    }

    fn slot_mut(&mut self, name: &str, run: u32, index: u32) -> Option<&mut Slot> {
        self.entries
            .get_mut(name)?
            .runs
            .get_mut(&run)?
            .slots
            .get_mut(index as usize)
    }

    fn slot_changed(&mut self, name: &str, run: u32, index: u32) {
        let slot = self.entries[name].runs[&run].slots[index as usize].clone();
        self.changes
            .push(Change::Slot((name.to_string(), run, index), Some(slot)));
    }

    fn job_changed(&mut self, name: &str) {
        let entry = self.entries.get_mut(name).expect("job exists");
        entry.meta.runs = entry.runs.values().map(|r| r.meta.clone()).collect();
        let meta = entry.meta.clone();
        self.changes.push(Change::Job(name.to_string(), Some(meta)));
    }

    /// Final states of the attempts that ended since the last call.
    pub fn take_ended(&mut self) -> Vec<pb::TaskState> {
        std::mem::take(&mut self.ended)
    }

    /// Records changed since the last call, oldest first (later ones win).
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Rebuilds the jobs from stored records. Specs that no longer validate
    /// are reported and skipped, never silently dropped.
    pub fn restore(&mut self, records: Vec<StoredJob>) -> Vec<(String, SpecError)> {
        let mut refused = Vec::new();
        for (spec, meta, slots) in records {
            let job = match spec::validate(&spec) {
                Ok(job) => job,
                Err(e) => {
                    refused.push((spec.name.clone(), e));
                    continue;
                }
            };
            let mut runs: BTreeMap<u32, Run> = meta
                .runs
                .iter()
                .map(|m| {
                    (
                        m.number,
                        Run {
                            meta: m.clone(),
                            slots: vec![
                                Slot {
                                    state: SlotState::Pending,
                                    attempts: Vec::new(),
                                    retry_at: 0.0,
                                };
                                job.count as usize
                            ],
                        },
                    )
                })
                .collect();
            for ((run, index), slot) in slots {
                if let Some(r) = runs.get_mut(&run)
                    && let Some(s) = r.slots.get_mut(index as usize)
                {
                    *s = slot;
                }
            }
            let name = job.name.clone();
            let seq = meta.seq;
            let priority = job.priority;
            self.insert(job, meta, runs);
            let entry = &self.entries[&name];
            for run in entry.runs.values() {
                for (index, slot) in run.slots.iter().enumerate() {
                    let key = PendingKey {
                        neg_priority: -i64::from(priority),
                        seq,
                        run: run.meta.number,
                        index: index as u32,
                    };
                    match slot.state {
                        SlotState::Pending if run.meta.state == RunState::Active => {
                            self.pending.insert(key);
                        }
                        SlotState::Backoff if run.meta.state == RunState::Active => {
                            self.backoff.insert((
                                millis(slot.retry_at),
                                seq,
                                run.meta.number,
                                index as u32,
                            ));
                        }
                        _ => {}
                    }
                }
            }
        }
        self.changes.clear();
        refused
    }

    // ---- views -----------------------------------------------------------------

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn summary(&self, name: &str) -> Option<pb::JobSummary> {
        self.entries.get(name).map(summary)
    }

    /// The job with its runs; `with_tasks: false` leaves out the per-index
    /// lists.
    pub fn status(&self, name: &str, with_tasks: bool) -> Option<pb::JobStatus> {
        let entry = self.entries.get(name)?;
        let message = match (&entry.unplaced, job_state(entry)) {
            (Some(why), pb::JobState::Pending | pb::JobState::Running) => why.clone(),
            _ => entry.meta.message.clone(),
        };
        Some(pb::JobStatus {
            summary: Some(summary(entry)),
            spec: Some(entry.job.spec.clone()),
            message,
            runs: entry
                .runs
                .values()
                .map(|r| run_status(r, with_tasks))
                .collect(),
            skipped_runs: entry.meta.skipped_runs,
        })
    }

    /// Counts of pending and launched tasks over all jobs (for metrics).
    pub fn totals(&self) -> Counts {
        let mut total = Counts::default();
        for entry in self.entries.values() {
            for run in entry.runs.values() {
                let c = counts(run);
                total.waiting += c.waiting;
                total.pending += c.pending;
                total.running += c.running;
                total.succeeded += c.succeeded;
                total.failed += c.failed;
                total.cancelled += c.cancelled;
            }
        }
        total
    }

    /// Jobs by state (for metrics).
    pub fn job_states(&self) -> BTreeMap<pb::JobState, usize> {
        let mut out = BTreeMap::new();
        for entry in self.entries.values() {
            *out.entry(job_state(entry)).or_default() += 1;
        }
        out
    }
}

/// The attempt is over: a terminal state, or TASK_UNKNOWN — the master does
/// not know the task (reconciliation after a launch that never reached it).
pub fn ends(state: pb::TaskState) -> bool {
    is_terminal(state) || state == pb::TaskState::TaskUnknown
}

fn task_id(name: &str, run: u32, index: u32, attempt: u32) -> String {
    format!("{name}.{run}.{index}.{attempt}")
}

/// `JOB.RUN.INDEX.ATTEMPT` → its parts; None for ids that are not ours.
pub fn parse_task_id(id: &str) -> Option<(&str, u32, u32, u32)> {
    let mut parts = id.split('.');
    let name = parts.next()?;
    let run = parts.next()?.parse().ok()?;
    let index = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    if parts.next().is_some() || name.is_empty() {
        return None;
    }
    Some((name, run, index, attempt))
}

/// Delay before retry number `failures` (1-based): the initial backoff,
/// doubling, capped.
fn retry_delay(job: &Job, failures: u32) -> Duration {
    let factor = 2f64.powi(failures.saturating_sub(1).min(30) as i32);
    let delay = job.retry_backoff.as_secs_f64() * factor;
    Duration::from_secs_f64(delay.min(job.retry_backoff_max.as_secs_f64()))
}

fn describe_failure(index: u32, attempts: u32, status: &pb::TaskStatus) -> String {
    let state = pb::TaskState::try_from(status.state)
        .map(|s| s.as_str_name())
        .unwrap_or("TASK_UNKNOWN");
    let reason = pb::Reason::try_from(status.reason)
        .map(corral_proto::task::reason_name)
        .unwrap_or("");
    let mut text = format!(
        "index {index} failed after {attempts} attempt{}: {state}",
        if attempts == 1 { "" } else { "s" }
    );
    if !reason.is_empty() {
        text.push_str(&format!(" ({reason})"));
    }
    if !status.message.is_empty() {
        text.push_str(&format!(": {}", status.message));
    }
    text
}

/// Why a task of `job` fits none of `offers`, in the terms of the largest
/// offer: "needs mem 4096, largest offer had 2048".
fn unplaced_reason(job: &Job, offers: &[pb::Offer]) -> String {
    let matching: Vec<Resources> = offers
        .iter()
        .filter(|o| all_match(&job.constraints, o))
        .filter_map(|o| Resources::from_proto(&o.resources, "offer.resources").ok())
        .collect();
    if matching.is_empty() {
        let constraints: Vec<String> = job.constraints.iter().map(ToString::to_string).collect();
        return format!(
            "no offered agent matches the constraints ({})",
            constraints.join(", ")
        );
    }
    let short = corral_sdk::shortfall(&job.resources, &matching);
    if short.is_empty() {
        "waiting for resources: offers went to higher-priority or earlier tasks".to_string()
    } else {
        short.join("; ")
    }
}

/// The TaskInfo every task of `job` starts from.
fn template(job: &Job) -> pb::TaskInfo {
    let mut env: std::collections::HashMap<String, String> = job.env.clone().into_iter().collect();
    env.insert(ENV_COUNT.to_string(), job.count.to_string());
    env.insert(ENV_JOB.to_string(), job.name.clone());
    let command = match &job.command {
        Command::Shell(script) => pb::CommandInfo {
            shell: true,
            value: script.clone(),
            arguments: Vec::new(),
            environment: env,
        },
        Command::Argv(argv) => pb::CommandInfo {
            shell: false,
            value: argv[0].clone(),
            arguments: argv.clone(),
            environment: env,
        },
        Command::Image => pb::CommandInfo {
            environment: env,
            ..Default::default()
        },
    };
    pb::TaskInfo {
        resources: job.resources.to_proto(),
        command: Some(command),
        kill_grace_period_seconds: job.kill_grace.map(|d| d.as_secs_f64()),
        labels: [("job".to_string(), job.name.clone())]
            .into_iter()
            .collect(),
        container: job.image.as_ref().map(|image| pb::ContainerInfo {
            image: image.clone(),
            ..Default::default()
        }),
        max_completion_time_seconds: job.deadline.map(|d| d.as_secs_f64()),
        ..Default::default()
    }
}

fn counts(run: &Run) -> Counts {
    let mut c = Counts::default();
    for slot in &run.slots {
        match slot.state {
            SlotState::Pending => c.pending += 1,
            SlotState::Backoff => c.waiting += 1,
            SlotState::Launched => c.running += 1,
            SlotState::Succeeded => c.succeeded += 1,
            SlotState::Failed => c.failed += 1,
            SlotState::Cancelled => c.cancelled += 1,
        }
    }
    c
}

fn counts_pb(c: Counts) -> pb::TaskCounts {
    pb::TaskCounts {
        waiting: c.waiting,
        pending: c.pending,
        running: c.running,
        succeeded: c.succeeded,
        failed: c.failed,
        cancelled: c.cancelled,
    }
}

fn run_state(run: &Run) -> pb::JobState {
    match run.meta.state {
        RunState::Succeeded => pb::JobState::Succeeded,
        RunState::Failed => pb::JobState::Failed,
        RunState::Cancelled => pb::JobState::Cancelled,
        RunState::Active => {
            if run.slots.iter().any(|s| s.state != SlotState::Pending) {
                pb::JobState::Running
            } else {
                pb::JobState::Pending
            }
        }
    }
}

fn job_state(entry: &Entry) -> pb::JobState {
    if entry.meta.failed {
        return pb::JobState::Failed;
    }
    let latest = entry.runs.values().next_back();
    if entry.job.schedule.is_some() {
        let active = entry
            .runs
            .values()
            .any(|r| r.meta.state == RunState::Active);
        return match (entry.meta.cancelled, active) {
            (true, false) => pb::JobState::Cancelled,
            (_, true) => pb::JobState::Running,
            (false, false) => pb::JobState::Scheduled,
        };
    }
    match latest {
        Some(run) => run_state(run),
        None if entry.meta.cancelled => pb::JobState::Cancelled,
        None => pb::JobState::Waiting,
    }
}

fn summary(entry: &Entry) -> pb::JobSummary {
    let latest = entry.runs.values().next_back();
    pb::JobSummary {
        job_id: entry.job.name.clone(),
        state: job_state(entry) as i32,
        counts: Some(counts_pb(latest.map(counts).unwrap_or_default())),
        count: entry.job.count,
        priority: entry.job.priority,
        submitted_at: entry.meta.submitted_at,
        schedule: entry.job.spec.schedule.clone(),
        next_run_at: if entry.meta.cancelled {
            0.0
        } else {
            entry.meta.next_fire
        },
        runs: entry.meta.next_run - 1,
    }
}

fn run_status(run: &Run, with_tasks: bool) -> pb::RunStatus {
    pb::RunStatus {
        run: run.meta.number,
        state: run_state(run) as i32,
        counts: Some(counts_pb(counts(run))),
        started_at: run.meta.started_at,
        finished_at: run.meta.finished_at,
        message: run.meta.message.clone(),
        tasks: run
            .slots
            .iter()
            .take(if with_tasks { usize::MAX } else { 0 })
            .enumerate()
            .map(|(index, slot)| pb::IndexStatus {
                index: index as u32,
                state: match slot.state {
                    SlotState::Pending => pb::JobState::Pending,
                    SlotState::Backoff => pb::JobState::Waiting,
                    SlotState::Launched => pb::JobState::Running,
                    SlotState::Succeeded => pb::JobState::Succeeded,
                    SlotState::Failed => pb::JobState::Failed,
                    SlotState::Cancelled => pb::JobState::Cancelled,
                } as i32,
                attempts: slot
                    .attempts
                    .iter()
                    .map(|a| pb::Attempt {
                        task_id: a.task_id.clone(),
                        agent_id: a.agent_id.clone(),
                        state: a.state,
                        reason: a.reason,
                        message: a.message.clone(),
                        exit_code: a.exit_code,
                        launched_at: a.launched_at,
                        finished_at: a.finished_at,
                    })
                    .collect(),
                retry_at: if slot.state == SlotState::Backoff {
                    slot.retry_at
                } else {
                    0.0
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;
