//! The service framework's Prometheus metrics. Names are constants here and
//! nowhere else: dashboards rely on them.
//!
//! Each framework instance owns its recorder (no global one), so tests can
//! run several in one process.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, with_local_recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use corral_proto::pb;

use crate::core::ServiceStatus;

pub const SERVICES: &str = "corral_service_services";
pub const INSTANCES: &str = "corral_service_instances";
pub const LAUNCHES_TOTAL: &str = "corral_service_instance_launches_total";
pub const TASKS_ENDED_TOTAL: &str = "corral_service_tasks_ended_total";
pub const ROLLOUTS_TOTAL: &str = "corral_service_rollouts_total";
pub const STORE_COMMIT_DURATION: &str = "corral_service_store_commit_duration_seconds";
pub const OFFERS_TOTAL: &str = "corral_service_offers_total";
pub const STALE_EPOCH_REJECTED_TOTAL: &str = "corral_service_stale_epoch_rejected_total";

/// Commits take a few milliseconds (one fsync); slower ones mean a slow disk.
const COMMIT_BUCKETS: [f64; 10] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Instance states, all exported (0 when empty) so no series vanishes.
const INSTANCE_STATES: [&str; 5] = ["staging", "running", "healthy", "killing", "other"];

/// How a rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutOutcome {
    /// Every instance runs the new version.
    Completed,
    /// Failed, and the previous version is being rolled out again.
    RolledBack,
    /// Failed without automatic rollback: stopped, keeping what runs.
    Failed,
}

impl RolloutOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
        }
    }
}

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
            describe_gauge!(SERVICES, "Services of the service framework.");
            describe_gauge!(
                INSTANCES,
                "Instances by state (staging = not yet running; healthy counts running instances that pass their checks, running the others)."
            );
            describe_counter!(
                STALE_EPOCH_REJECTED_TOTAL,
                "Events from a master refused because their leader epoch is lower than one already seen (a deposed leader)."
            );
            describe_counter!(
                LAUNCHES_TOTAL,
                "Instances launched (first launches, replacements, rollouts)."
            );
            describe_counter!(
                TASKS_ENDED_TOTAL,
                "Tasks of instances that ended, by final task state and reason: failures and kills that lead to replacements."
            );
            describe_counter!(
                ROLLOUTS_TOTAL,
                "Rollouts that ended, by outcome (completed, rolled_back, failed)."
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
        if n > 0 {
            self.with(|| metrics::counter!(LAUNCHES_TOTAL).increment(n as u64));
        }
    }

    pub fn task_ended(&self, state: pb::TaskState, reason: pb::Reason) {
        self.with(|| {
            metrics::counter!(
                TASKS_ENDED_TOTAL,
                "state" => state.as_str_name(),
                "reason" => reason.as_str_name()
            )
            .increment(1);
        });
    }

    pub fn rollout_ended(&self, outcome: RolloutOutcome) {
        self.with(|| metrics::counter!(ROLLOUTS_TOTAL, "outcome" => outcome.label()).increment(1));
    }

    pub fn offers(&self, outcome: &'static str, n: usize) {
        if n > 0 {
            self.with(|| metrics::counter!(OFFERS_TOTAL, "outcome" => outcome).increment(n as u64));
        }
    }

    pub fn commit(&self, seconds: f64) {
        self.with(|| metrics::histogram!(STORE_COMMIT_DURATION).record(seconds));
    }

    /// Sets the gauges from the current services and renders everything.
    pub fn render(&self, services: &[ServiceStatus], stale_epoch_rejected: u64) -> String {
        self.with(|| {
            metrics::counter!(STALE_EPOCH_REJECTED_TOTAL).absolute(stale_epoch_rejected);
        });
        let mut counts = [0u32; INSTANCE_STATES.len()];
        for i in services.iter().flat_map(|s| &s.instances) {
            let slot = match i.state {
                pb::TaskState::TaskStaging | pb::TaskState::TaskStarting => 0,
                pb::TaskState::TaskRunning if i.healthy => 2,
                pb::TaskState::TaskRunning => 1,
                pb::TaskState::TaskKilling => 3,
                _ => 4,
            };
            counts[slot] += 1;
        }
        self.with(|| {
            metrics::gauge!(SERVICES).set(services.len() as f64);
            for (state, n) in INSTANCE_STATES.iter().zip(counts) {
                metrics::gauge!(INSTANCES, "state" => *state).set(f64::from(n));
            }
        });
        self.handle.render()
    }
}
