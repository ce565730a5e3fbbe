//! The master's Prometheus metrics: names (dashboards rely on them, so they
//! are constants here and nowhere else), descriptions and rendering.
//!
//! Each master owns its recorder instead of installing a global one, so a
//! test process can run a master and several agents without their metrics
//! mixing.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, with_local_recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::state::StateSnapshot;

pub const AGENTS: &str = "corral_master_agents";
pub const FRAMEWORKS: &str = "corral_master_frameworks";
pub const RESOURCES_TOTAL: &str = "corral_master_resources_total";
pub const RESOURCES_USED: &str = "corral_master_resources_used";
pub const TASKS: &str = "corral_master_tasks";
pub const PERSISTENT_VOLUMES: &str = "corral_master_persistent_volumes";
pub const TASKS_TERMINAL_TOTAL: &str = "corral_master_tasks_terminal_total";
pub const OFFERS_TOTAL: &str = "corral_master_offers_total";
pub const ALLOCATION_DURATION: &str = "corral_master_allocation_duration_seconds";
pub const INVALID_CALLS_TOTAL: &str = "corral_master_invalid_calls_total";
pub const STATUS_UPDATES_TOTAL: &str = "corral_master_status_updates_total";
pub const AGENT_REMOVALS_TOTAL: &str = "corral_master_agent_removals_total";
pub const AGENT_REMOVAL_HALTED: &str = "corral_master_agent_removal_halted";
pub const REGISTRY_COMMIT_DURATION: &str = "corral_master_registry_commit_duration_seconds";
pub const REGISTRY_CHANGES_TOTAL: &str = "corral_master_registry_changes_total";
pub const ELECTED: &str = "corral_master_elected";
pub const LEADER_EPOCH: &str = "corral_master_leader_epoch";
pub const LEADERSHIP_LOST_TOTAL: &str = "corral_master_leadership_lost_total";

/// Why a leading master stopped leading (`corral_master_leadership_lost_total`).
pub const LEADERSHIP_LOST_REASONS: [&str; 3] = ["lease", "registry", "etcd"];

/// Agent states exported by `corral_master_agents`.
pub const AGENT_STATES: [&str; 5] = [
    "connected",
    "disconnected",
    "recovering",
    "unreachable",
    "gone",
];

/// A registry commit is one fsync: a millisecond to tens of them.
const COMMIT_BUCKETS: [f64; 10] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Allocation rounds take microseconds to tens of milliseconds.
const ALLOCATION_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// Non-terminal task states, all exported (as 0 when empty) so a dashboard
/// never sees a series vanish.
pub const LIVE_TASK_STATES: [&str; 6] = [
    "TASK_STAGING",
    "TASK_STARTING",
    "TASK_RUNNING",
    "TASK_KILLING",
    "TASK_UNREACHABLE",
    "TASK_UNKNOWN",
];

pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(ALLOCATION_DURATION.into()),
                &ALLOCATION_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(REGISTRY_COMMIT_DURATION.into()),
                    &COMMIT_BUCKETS,
                )
            })
            .map(PrometheusBuilder::build_recorder)
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        let m = Self { recorder, handle };
        m.with(|| {
            describe_gauge!(
                AGENTS,
                "Agents known to the master, by state (connected/recovering/unreachable/gone)."
            );
            describe_counter!(
                AGENT_REMOVALS_TOTAL,
                "Agents removed, by reason (unreachable: longer than the removal timeout; replaced: it registered again as a new agent)."
            );
            describe_gauge!(
                AGENT_REMOVAL_HALTED,
                "1 while removal of unreachable agents is halted because more than --max-unreachable-percent of agents are unreachable."
            );
            describe_histogram!(
                REGISTRY_COMMIT_DURATION,
                Unit::Seconds,
                "Time taken by one registry commit (one batch of changes, one fsync)."
            );
            describe_counter!(
                REGISTRY_CHANGES_TOTAL,
                "Records written to or deleted from the registry."
            );
            describe_gauge!(FRAMEWORKS, "Frameworks, by state (connected/disconnected).");
            describe_gauge!(
                RESOURCES_TOTAL,
                "Total resources of connected agents (cpus, mem MiB, disk MiB, gpus)."
            );
            describe_gauge!(
                RESOURCES_USED,
                "Resources used by tasks on connected agents."
            );
            describe_gauge!(TASKS, "Non-terminal tasks, by state.");
            describe_gauge!(
                PERSISTENT_VOLUMES,
                "Persistent volumes, by state (in_use: a live task mounts it; free)."
            );
            describe_counter!(
                TASKS_TERMINAL_TOTAL,
                "Tasks that reached a terminal state, by state and reason."
            );
            describe_counter!(
                OFFERS_TOTAL,
                "Offers, by outcome (sent/accepted/declined/rescinded)."
            );
            describe_histogram!(
                ALLOCATION_DURATION,
                Unit::Seconds,
                "Time taken by one allocation round."
            );
            describe_counter!(
                INVALID_CALLS_TOTAL,
                "Framework calls refused as invalid, by call."
            );
            describe_counter!(STATUS_UPDATES_TOTAL, "Status updates received from agents.");
            describe_gauge!(
                ELECTED,
                "1 while this master leads (a single master always does), 0 on a standby."
            );
            describe_gauge!(
                LEADER_EPOCH,
                "This master's epoch (fencing token) while it leads; 0 on a standby."
            );
            describe_counter!(
                LEADERSHIP_LOST_TOTAL,
                "Times this master stopped leading, by reason (lease: not renewed in time; registry: a write was fenced off; etcd: the etcd link failed)."
            );
        });
        m
    }

    /// Runs `f` with this master's recorder, so the `metrics` macros inside
    /// it record here. Never hold it across an `.await` (it is synchronous).
    pub fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        with_local_recorder(&self.recorder, f)
    }

    pub fn offers(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.with(|| metrics::counter!(OFFERS_TOTAL, "outcome" => outcome).increment(n));
        }
    }

    pub fn terminal(&self, state: &'static str, reason: &'static str) {
        self.with(|| {
            metrics::counter!(TASKS_TERMINAL_TOTAL, "state" => state, "reason" => reason)
                .increment(1)
        });
    }

    pub fn invalid_call(&self, call: &'static str) {
        self.with(|| metrics::counter!(INVALID_CALLS_TOTAL, "call" => call).increment(1));
    }

    pub fn status_update(&self) {
        self.with(|| metrics::counter!(STATUS_UPDATES_TOTAL).increment(1));
    }

    pub fn agent_removed(&self, reason: &'static str) {
        self.with(|| metrics::counter!(AGENT_REMOVALS_TOTAL, "reason" => reason).increment(1));
    }

    /// Called from the registry writer thread.
    pub fn registry_commit(&self, changes: usize, seconds: f64) {
        self.with(|| {
            metrics::histogram!(REGISTRY_COMMIT_DURATION).record(seconds);
            metrics::counter!(REGISTRY_CHANGES_TOTAL).increment(changes as u64);
        });
    }

    pub fn allocation(&self, seconds: f64) {
        self.with(|| metrics::histogram!(ALLOCATION_DURATION).record(seconds));
    }

    pub fn leadership_lost(&self, reason: &'static str) {
        self.with(|| metrics::counter!(LEADERSHIP_LOST_TOTAL, "reason" => reason).increment(1));
    }

    /// Sets the gauges from a state snapshot and renders the text format.
    pub fn render(&self, s: &StateSnapshot, elected: bool) -> String {
        self.with(|| {
            metrics::gauge!(ELECTED).set(f64::from(u8::from(elected)));
            metrics::gauge!(LEADER_EPOCH).set(s.epoch as f64);
            for reason in LEADERSHIP_LOST_REASONS {
                metrics::counter!(LEADERSHIP_LOST_TOTAL, "reason" => reason).increment(0);
            }
            for state in AGENT_STATES {
                let n = if state == "gone" {
                    s.gone_agents
                } else {
                    s.agents.iter().filter(|a| a.state == state).count()
                };
                metrics::gauge!(AGENTS, "state" => state).set(n as f64);
            }
            metrics::gauge!(AGENT_REMOVAL_HALTED).set(f64::from(u8::from(s.agent_removal_halted)));
            // Exported from the start, so an alert sees 0 before the first removal.
            for reason in ["unreachable", "replaced"] {
                metrics::counter!(AGENT_REMOVALS_TOTAL, "reason" => reason).increment(0);
            }
            for state in ["connected", "disconnected"] {
                let n = s.frameworks.iter().filter(|f| f.state == state).count();
                metrics::gauge!(FRAMEWORKS, "state" => state).set(n as f64);
            }
            let connected = s.agents.iter().filter(|a| a.state == "connected");
            let (mut total, mut used) = ([0.0; 4], [0.0; 4]);
            for a in connected {
                for (i, v) in a.resources.scalars().into_iter().enumerate() {
                    total[i] += v;
                }
                for (i, v) in a.used_resources.scalars().into_iter().enumerate() {
                    used[i] += v;
                }
            }
            for (i, name) in corral_proto::resources::SCALARS.iter().enumerate() {
                metrics::gauge!(RESOURCES_TOTAL, "resource" => *name).set(total[i]);
                metrics::gauge!(RESOURCES_USED, "resource" => *name).set(used[i]);
            }
            let in_use = s.volumes.iter().filter(|v| v.in_use_by.is_some()).count();
            metrics::gauge!(PERSISTENT_VOLUMES, "state" => "in_use").set(in_use as f64);
            metrics::gauge!(PERSISTENT_VOLUMES, "state" => "free")
                .set((s.volumes.len() - in_use) as f64);
            for state in LIVE_TASK_STATES {
                let n = s.tasks.iter().filter(|t| t.state == state).count();
                metrics::gauge!(TASKS, "state" => state).set(n as f64);
            }
        });
        self.handle.render()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
