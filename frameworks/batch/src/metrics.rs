//! The batch framework's Prometheus metrics. Names are constants here and
//! nowhere else: dashboards rely on them.
//!
//! Each framework instance owns its recorder (no global one), so tests can
//! run several in one process.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, with_local_recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use corral_proto::pb;

use crate::jobs::Counts;

pub const JOBS: &str = "corral_batch_jobs";
pub const TASKS: &str = "corral_batch_tasks";
pub const LAUNCHES_TOTAL: &str = "corral_batch_task_launches_total";
pub const ATTEMPTS_ENDED_TOTAL: &str = "corral_batch_task_attempts_ended_total";
pub const STORE_COMMIT_DURATION: &str = "corral_batch_store_commit_duration_seconds";
pub const OFFERS_TOTAL: &str = "corral_batch_offers_total";
pub const STALE_EPOCH_REJECTED_TOTAL: &str = "corral_batch_stale_epoch_rejected_total";

/// Commits take a few milliseconds (one fsync); slower ones mean a slow disk.
const COMMIT_BUCKETS: [f64; 10] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Job states, all exported (0 when empty) so no series vanishes.
const JOB_STATES: [pb::JobState; 7] = [
    pb::JobState::Waiting,
    pb::JobState::Pending,
    pb::JobState::Running,
    pb::JobState::Succeeded,
    pb::JobState::Failed,
    pb::JobState::Cancelled,
    pb::JobState::Scheduled,
];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(STORE_COMMIT_DURATION.into()), &COMMIT_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let m = Self { recorder, handle };
        m.with(|| {
            describe_gauge!(JOBS, "Jobs of the batch framework by state.");
            describe_gauge!(
                TASKS,
                "Tasks of active and recent runs by state (waiting = in retry backoff)."
            );
            describe_counter!(
                STALE_EPOCH_REJECTED_TOTAL,
                "Events from a master refused because their leader epoch is lower than one already seen (a deposed leader)."
            );
            describe_counter!(LAUNCHES_TOTAL, "Task attempts launched.");
            describe_counter!(
                ATTEMPTS_ENDED_TOTAL,
                "Task attempts that ended, by final task state."
            );
            describe_histogram!(
                STORE_COMMIT_DURATION,
                Unit::Seconds,
                "Time to make one group of changes durable in the store."
            );
            describe_counter!(
                OFFERS_TOTAL,
                "Offers received, by outcome (used, declined)."
            );
        });
        m
    }

    fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        with_local_recorder(&self.recorder, f)
    }

    pub fn launched(&self, n: usize) {
        self.with(|| metrics::counter!(LAUNCHES_TOTAL).increment(n as u64));
    }

    pub fn attempt_ended(&self, state: pb::TaskState) {
        self.with(|| {
            metrics::counter!(ATTEMPTS_ENDED_TOTAL, "state" => state.as_str_name()).increment(1);
        });
    }

    pub fn offers(&self, outcome: &'static str, n: usize) {
        if n > 0 {
            self.with(|| metrics::counter!(OFFERS_TOTAL, "outcome" => outcome).increment(n as u64));
        }
    }

    pub fn commit(&self, seconds: f64) {
        self.with(|| metrics::histogram!(STORE_COMMIT_DURATION).record(seconds));
    }

    /// Sets the gauges from the current jobs and renders everything.
    pub fn render(
        &self,
        jobs: &[(pb::JobState, usize)],
        tasks: Counts,
        stale_epoch_rejected: u64,
    ) -> String {
        self.with(|| {
            metrics::counter!(STALE_EPOCH_REJECTED_TOTAL).absolute(stale_epoch_rejected);
            for state in JOB_STATES {
                let n = jobs
                    .iter()
                    .find(|(s, _)| *s == state)
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!(JOBS, "state" => state_label(state)).set(n as f64);
            }
            for (state, n) in [
                ("waiting", tasks.waiting),
                ("pending", tasks.pending),
                ("running", tasks.running),
            ] {
                metrics::gauge!(TASKS, "state" => state).set(f64::from(n));
            }
        });
        self.handle.render()
    }
}

/// `running` for `JOB_STATE_RUNNING`: the label value and the CLI's word.
pub fn state_label(state: pb::JobState) -> &'static str {
    match state {
        pb::JobState::Unspecified => "unknown",
        pb::JobState::Waiting => "waiting",
        pb::JobState::Pending => "pending",
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Scheduled => "scheduled",
    }
}
