//! The agent's Prometheus metrics.
//!
//! Several agents and a master share one process in tests and in
//! `corral dev`, so no global recorder is installed: each agent builds its
//! own [`PrometheusRecorder`] and registers its handles on that instance
//! through the [`metrics::Recorder`] trait; `/metrics` renders that recorder.

use std::collections::HashMap;

use corral_proto::Resources;
use corral_proto::pb::TaskState;
use corral_proto::task::state_name;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Gauge, label `state`: tasks the agent holds per non-terminal state.
pub const TASKS: &str = "corral_agent_tasks";
/// Gauge, label `resource`: total of each scalar resource the agent offers.
pub const RESOURCES_TOTAL: &str = "corral_agent_resources_total";
/// Gauge: status updates not yet acknowledged.
pub const STATUS_UPDATES_PENDING: &str = "corral_agent_status_updates_pending";
/// Counter: status updates sent to the master, retries included.
pub const STATUS_UPDATES_SENT_TOTAL: &str = "corral_agent_status_updates_sent_total";
/// Counter: acknowledgements that matched no pending update.
pub const STATUS_UPDATE_ACKS_IGNORED_TOTAL: &str = "corral_agent_status_update_acks_ignored_total";
/// Gauge: seconds the oldest unacknowledged status update has waited (0
/// when none waits).
pub const STATUS_UPDATE_OLDEST_PENDING_SECONDS: &str =
    "corral_agent_status_update_oldest_pending_seconds";
/// Histogram: how long one batch of checkpoint writes took (temp files,
/// fdatasync, renames, directory fsyncs).
pub const CHECKPOINT_BATCH_DURATION: &str = "corral_agent_checkpoint_batch_duration_seconds";
/// Counter: checkpoint files that could not be written or removed.
pub const CHECKPOINT_ERRORS_TOTAL: &str = "corral_agent_checkpoint_errors_total";
/// Counter: tasks read back from the checkpoint when the agent started.
pub const TASKS_RECOVERED_TOTAL: &str = "corral_agent_tasks_recovered_total";
/// Counter: successful registrations with the master (first and re-).
pub const MASTER_CONNECTIONS_TOTAL: &str = "corral_agent_master_connections_total";
pub const STALE_EPOCH_REJECTED_TOTAL: &str = "corral_agent_stale_epoch_rejected_total";
/// Gauge: sandboxes of finished tasks waiting for the garbage collector.
pub const SANDBOXES_RETAINED: &str = "corral_agent_sandboxes_retained";
/// Counter: sandboxes of finished tasks removed by the garbage collector.
pub const SANDBOXES_REMOVED_TOTAL: &str = "corral_agent_sandboxes_removed_total";
/// Counter, labels `kind` (startup/liveness/readiness) and `result`
/// (success/failure/timeout): health check probes run.
pub const HEALTH_CHECKS_TOTAL: &str = "corral_agent_health_checks_total";
/// Histogram, label `kind`: how long health check probes took.
pub const HEALTH_CHECK_DURATION: &str = "corral_agent_health_check_duration_seconds";
/// Gauge: tasks whose latest liveness (or startup) verdict is unhealthy.
pub const TASKS_UNHEALTHY: &str = "corral_agent_tasks_unhealthy";
/// Counter: tasks the agent killed because a liveness or startup check
/// failed.
pub const TASKS_UNHEALTHY_KILLED_TOTAL: &str = "corral_agent_tasks_unhealthy_killed_total";

/// Gauge: persistent volumes on the agent's disk.
pub const PERSISTENT_VOLUMES: &str = "corral_agent_persistent_volumes";
/// Gauge: disk (MiB) the agent's persistent volumes reserve in total.
pub const PERSISTENT_VOLUME_DISK_MIB: &str = "corral_agent_persistent_volume_disk_mib";

/// The `kind` label values of the health check metrics.
pub(crate) const HEALTH_CHECK_KINDS: [&str; 3] = ["startup", "liveness", "readiness"];
/// The `result` label values of [`HEALTH_CHECKS_TOTAL`].
pub(crate) const HEALTH_CHECK_RESULTS: [&str; 3] = ["success", "failure", "timeout"];
/// Probes take from a millisecond (a TCP connect on loopback) to their
/// timeout (5 s by default; a few more for long custom ones).
const HEALTH_CHECK_BUCKETS: [f64; 12] = [
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];
/// A batch is one fdatasync per file and one fsync per directory: from
/// 100 µs (page cache, idle disk) to seconds (a saturated disk).
const CHECKPOINT_BUCKETS: [f64; 12] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// The states a task can be in while the agent runs it; one `TASKS` series
/// each, so a state that drops to zero shows 0 instead of vanishing.
pub(crate) const LIVE_STATES: [TaskState; 4] = [
    TaskState::TaskStaging,
    TaskState::TaskStarting,
    TaskState::TaskRunning,
    TaskState::TaskKilling,
];

const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// One agent's recorder and the handles the actor updates.
pub(crate) struct AgentMetrics {
    handle: PrometheusHandle,
    tasks: HashMap<TaskState, Gauge>,
    pub(crate) status_updates_pending: Gauge,
    pub(crate) status_updates_sent: Counter,
    pub(crate) acks_ignored: Counter,
    pub(crate) oldest_pending: Gauge,
    checkpoint_batch_duration: Histogram,
    checkpoint_errors: Counter,
    pub(crate) tasks_recovered: Counter,
    pub(crate) master_connections: Counter,
    pub(crate) stale_epoch_rejected: Counter,
    pub(crate) sandboxes_removed: Counter,
    pub(crate) sandboxes_retained: Gauge,
    health_checks: HashMap<(&'static str, &'static str), Counter>,
    health_check_durations: HashMap<&'static str, Histogram>,
    pub(crate) tasks_unhealthy: Gauge,
    pub(crate) tasks_unhealthy_killed: Counter,
    persistent_volumes: Gauge,
    persistent_volume_disk_mib: Gauge,
}

impl AgentMetrics {
    pub(crate) fn new(total: &Resources) -> Self {
        // Real buckets, not the exporter's default summary, so durations
        // aggregate across agents.
        let recorder: PrometheusRecorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(HEALTH_CHECK_DURATION.into()),
                &HEALTH_CHECK_BUCKETS,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(CHECKPOINT_BATCH_DURATION.into()),
                    &CHECKPOINT_BUCKETS,
                )
            })
            .map_or_else(
                |_| PrometheusBuilder::new().build_recorder(),
                PrometheusBuilder::build_recorder,
            );
        describe(&recorder);
        let gauge = |name: &'static str, labels: Vec<Label>| {
            recorder.register_gauge(&Key::from_parts(name, labels), &METADATA)
        };
        let counter =
            |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &METADATA);
        let tasks = LIVE_STATES
            .iter()
            .map(|&s| {
                let g = gauge(TASKS, vec![Label::new("state", state_name(s))]);
                g.set(0.0);
                (s, g)
            })
            .collect();
        for (name, amount) in total.scalars() {
            gauge(RESOURCES_TOTAL, vec![Label::new("resource", name)]).set(amount.as_f64());
        }
        let status_updates_pending = gauge(STATUS_UPDATES_PENDING, Vec::new());
        status_updates_pending.set(0.0);
        let mut health_checks = HashMap::new();
        let mut health_check_durations = HashMap::new();
        for kind in HEALTH_CHECK_KINDS {
            for result in HEALTH_CHECK_RESULTS {
                let labels = vec![Label::new("kind", kind), Label::new("result", result)];
                let c = recorder
                    .register_counter(&Key::from_parts(HEALTH_CHECKS_TOTAL, labels), &METADATA);
                c.increment(0);
                health_checks.insert((kind, result), c);
            }
            let key = Key::from_parts(HEALTH_CHECK_DURATION, vec![Label::new("kind", kind)]);
            health_check_durations.insert(kind, recorder.register_histogram(&key, &METADATA));
        }
        let metrics = Self {
            handle: recorder.handle(),
            tasks,
            status_updates_pending,
            status_updates_sent: counter(STATUS_UPDATES_SENT_TOTAL),
            acks_ignored: counter(STATUS_UPDATE_ACKS_IGNORED_TOTAL),
            oldest_pending: gauge(STATUS_UPDATE_OLDEST_PENDING_SECONDS, Vec::new()),
            checkpoint_batch_duration: recorder
                .register_histogram(&Key::from_static_name(CHECKPOINT_BATCH_DURATION), &METADATA),
            checkpoint_errors: counter(CHECKPOINT_ERRORS_TOTAL),
            tasks_recovered: counter(TASKS_RECOVERED_TOTAL),
            master_connections: counter(MASTER_CONNECTIONS_TOTAL),
            stale_epoch_rejected: counter(STALE_EPOCH_REJECTED_TOTAL),
            sandboxes_removed: counter(SANDBOXES_REMOVED_TOTAL),
            sandboxes_retained: gauge(SANDBOXES_RETAINED, Vec::new()),
            health_checks,
            health_check_durations,
            tasks_unhealthy: gauge(TASKS_UNHEALTHY, Vec::new()),
            tasks_unhealthy_killed: counter(TASKS_UNHEALTHY_KILLED_TOTAL),
            persistent_volumes: gauge(PERSISTENT_VOLUMES, Vec::new()),
            persistent_volume_disk_mib: gauge(PERSISTENT_VOLUME_DISK_MIB, Vec::new()),
        };
        metrics.persistent_volumes.set(0.0);
        metrics.persistent_volume_disk_mib.set(0.0);
        metrics.sandboxes_retained.set(0.0);
        metrics.tasks_unhealthy.set(0.0);
        metrics.tasks_unhealthy_killed.increment(0);
        // Counters only appear in the output once touched; show them at 0.
        metrics.status_updates_sent.increment(0);
        metrics.acks_ignored.increment(0);
        metrics.oldest_pending.set(0.0);
        metrics.checkpoint_errors.increment(0);
        metrics.tasks_recovered.increment(0);
        metrics.master_connections.increment(0);
        metrics.stale_epoch_rejected.increment(0);
        metrics.sandboxes_removed.increment(0);
        metrics
    }

    /// The renderer for `/metrics`; cheap to clone.
    pub(crate) fn handle(&self) -> PrometheusHandle {
        self.handle.clone()
    }

    /// Counts one health check probe of `kind` that ended with `result`
    /// (labels from [`HEALTH_CHECK_KINDS`], [`HEALTH_CHECK_RESULTS`]) and
    /// records how long it took.
    pub(crate) fn health_check(&self, kind: &'static str, result: &'static str, seconds: f64) {
        if let Some(c) = self.health_checks.get(&(kind, result)) {
            c.increment(1);
        }
        if let Some(h) = self.health_check_durations.get(kind) {
            h.record(seconds);
        }
    }

    /// The persistent volume gauges, for the volume thread that owns the
    /// volumes (`volumes::Volumes`) to keep current.
    pub(crate) fn volume_gauges(&self) -> crate::volumes::VolumeGauges {
        crate::volumes::VolumeGauges {
            count: self.persistent_volumes.clone(),
            disk_mib: self.persistent_volume_disk_mib.clone(),
        }
    }

    /// The checkpoint writer's handles (it runs on its own thread).
    pub(crate) fn checkpoint_writer(&self) -> crate::checkpoint::WriterMetrics {
        crate::checkpoint::WriterMetrics {
            batch_duration: self.checkpoint_batch_duration.clone(),
            errors: self.checkpoint_errors.clone(),
        }
    }

    /// Sets the per-state task gauges from the actor's counts.
    pub(crate) fn set_task_counts(&self, counts: &HashMap<TaskState, usize>) {
        for (state, gauge) in &self.tasks {
            gauge.set(counts.get(state).copied().unwrap_or(0) as f64);
        }
    }
}

fn describe(recorder: &PrometheusRecorder) {
    let gauges = [
        (TASKS, "Tasks the agent holds, by non-terminal state."),
        (
            RESOURCES_TOTAL,
            "Total of each scalar resource the agent offers (cpus, mem and disk in MiB, gpus).",
        ),
        (
            STATUS_UPDATES_PENDING,
            "Task status updates waiting for acknowledgement.",
        ),
        (
            STATUS_UPDATE_OLDEST_PENDING_SECONDS,
            "Seconds the oldest unacknowledged task status update has waited (0 when none waits).",
        ),
        (
            SANDBOXES_RETAINED,
            "Sandboxes of finished tasks kept until --sandbox-gc-delay (at most --sandbox-gc-max).",
        ),
        (
            TASKS_UNHEALTHY,
            "Tasks whose latest liveness (or startup) health check verdict is unhealthy.",
        ),
        (
            PERSISTENT_VOLUMES,
            "Persistent volumes on the agent's disk, mounted or not.",
        ),
        (
            PERSISTENT_VOLUME_DISK_MIB,
            "Disk in MiB that the agent's persistent volumes reserve in total.",
        ),
    ];
    for (name, help) in gauges {
        recorder.describe_gauge(name.into(), None, help.into());
    }
    let counters = [
        (
            STATUS_UPDATES_SENT_TOTAL,
            "Task status updates sent to the master, retries included.",
        ),
        (
            STATUS_UPDATE_ACKS_IGNORED_TOTAL,
            "Status update acknowledgements that matched no pending update.",
        ),
        (
            MASTER_CONNECTIONS_TOTAL,
            "Successful (re)registrations with the master.",
        ),
        (
            STALE_EPOCH_REJECTED_TOTAL,
            "Messages from a master refused because their leader epoch is lower than one already seen (a deposed leader).",
        ),
        (
            CHECKPOINT_ERRORS_TOTAL,
            "Checkpoint files that could not be written or removed.",
        ),
        (
            TASKS_RECOVERED_TOTAL,
            "Tasks read back from the checkpoint when the agent started.",
        ),
        (
            SANDBOXES_REMOVED_TOTAL,
            "Sandboxes of finished tasks removed after --sandbox-gc-delay or beyond --sandbox-gc-max.",
        ),
        (
            HEALTH_CHECKS_TOTAL,
            "Health check probes run, by check kind and result (success, failure, timeout).",
        ),
        (
            TASKS_UNHEALTHY_KILLED_TOTAL,
            "Tasks killed because a liveness or startup health check failed.",
        ),
    ];
    for (name, help) in counters {
        recorder.describe_counter(name.into(), None, help.into());
    }
    recorder.describe_histogram(
        CHECKPOINT_BATCH_DURATION.into(),
        Some(metrics::Unit::Seconds),
        "How long one batch of checkpoint writes took (temp files, fdatasync, renames, directory fsyncs).".into(),
    );
    recorder.describe_histogram(
        HEALTH_CHECK_DURATION.into(),
        Some(metrics::Unit::Seconds),
        "How long health check probes took, by check kind.".into(),
    );
}

/// Per-container usage series, `corral_agent_container_*{framework,task}`.
/// Rendered from the latest samples at scrape time, so a container that is
/// gone has no series (the recorder would keep them forever).
pub const CONTAINER_METRICS: [(&str, &str, &str); 8] = [
    (
        "corral_agent_container_cpu_user_seconds",
        "counter",
        "CPU time in user mode.",
    ),
    (
        "corral_agent_container_cpu_system_seconds",
        "counter",
        "CPU time in kernel mode.",
    ),
    (
        "corral_agent_container_cpu_throttled_periods",
        "counter",
        "CFS periods in which the container was throttled.",
    ),
    (
        "corral_agent_container_cpu_throttled_seconds",
        "counter",
        "Time the container was throttled.",
    ),
    (
        "corral_agent_container_memory_rss_bytes",
        "gauge",
        "Anonymous memory (RSS) of the container.",
    ),
    (
        "corral_agent_container_memory_cache_bytes",
        "gauge",
        "Page cache charged to the container.",
    ),
    (
        "corral_agent_container_memory_limit_bytes",
        "gauge",
        "Memory limit of the container.",
    ),
    (
        "corral_agent_container_pids",
        "gauge",
        "Processes in the container.",
    ),
];

pub(crate) fn render_container_usage(
    samples: &[((String, String), crate::containerizer::Usage)],
) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, (name, kind, help)) in CONTAINER_METRICS.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for ((framework, task), u) in samples {
            let v = match i {
                0 => u.cpu_user_seconds,
                1 => u.cpu_system_seconds,
                2 => u.cpu_throttled_periods as f64,
                3 => u.cpu_throttled_seconds,
                4 => u.mem_rss_bytes as f64,
                5 => u.mem_cache_bytes as f64,
                6 => u.mem_limit_bytes as f64,
                _ => u.pids as f64,
            };
            // Ids are validated (no quotes, backslashes or newlines).
            let _ = writeln!(
                out,
                "{name}{{framework=\"{framework}\",task=\"{task}\"}} {v}"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_is_rendered_from_the_start() {
        let total = Resources::parse("cpus:2;mem:1024").unwrap();
        let m = AgentMetrics::new(&total);
        let text = m.handle().render();
        for name in [
            TASKS,
            RESOURCES_TOTAL,
            STATUS_UPDATES_PENDING,
            STATUS_UPDATES_SENT_TOTAL,
            STATUS_UPDATE_ACKS_IGNORED_TOTAL,
            MASTER_CONNECTIONS_TOTAL,
            STALE_EPOCH_REJECTED_TOTAL,
            STATUS_UPDATE_OLDEST_PENDING_SECONDS,
            CHECKPOINT_ERRORS_TOTAL,
            TASKS_RECOVERED_TOTAL,
            PERSISTENT_VOLUMES,
            PERSISTENT_VOLUME_DISK_MIB,
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
        assert!(text.contains("corral_agent_persistent_volumes 0"), "{text}");
        assert!(text.contains("corral_agent_tasks{state=\"TASK_RUNNING\"} 0"));
        assert!(text.contains("corral_agent_resources_total{resource=\"cpus\"} 2"));
    }

    #[test]
    fn health_check_metrics_are_labelled_by_kind_and_result_with_real_buckets() {
        let m = AgentMetrics::new(&Resources::parse("cpus:1").unwrap());
        let before = m.handle().render();
        assert!(
            before.contains(
                "corral_agent_health_checks_total{kind=\"readiness\",result=\"timeout\"} 0"
            ),
            "{before}"
        );
        assert!(
            before.contains("corral_agent_tasks_unhealthy 0"),
            "{before}"
        );
        assert!(before.contains("corral_agent_tasks_unhealthy_killed_total 0"));
        m.health_check("liveness", "failure", 0.02);
        m.health_check("liveness", "failure", 0.2);
        let text = m.handle().render();
        assert!(
            text.contains(
                "corral_agent_health_checks_total{kind=\"liveness\",result=\"failure\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "corral_agent_health_check_duration_seconds_bucket{kind=\"liveness\",le=\"0.025\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("corral_agent_health_check_duration_seconds_count{kind=\"liveness\"} 2")
        );
    }

    #[test]
    fn the_volume_gauges_are_the_ones_rendered() {
        let m = AgentMetrics::new(&Resources::parse("cpus:1").unwrap());
        let g = m.volume_gauges();
        g.count.set(3.0);
        g.disk_mib.set(1536.5);
        let text = m.handle().render();
        assert!(text.contains("corral_agent_persistent_volumes 3"), "{text}");
        assert!(
            text.contains("corral_agent_persistent_volume_disk_mib 1536.5"),
            "{text}"
        );
        assert!(text.contains("# HELP corral_agent_persistent_volume_disk_mib"));
    }

    #[test]
    fn two_agents_in_one_process_have_separate_metrics() {
        let a = AgentMetrics::new(&Resources::parse("cpus:1").unwrap());
        let b = AgentMetrics::new(&Resources::parse("cpus:7").unwrap());
        a.master_connections.increment(3);
        assert!(
            a.handle()
                .render()
                .contains("corral_agent_master_connections_total 3")
        );
        assert!(
            b.handle()
                .render()
                .contains("corral_agent_master_connections_total 0")
        );
        assert!(b.handle().render().contains("resource=\"cpus\"} 7"));
    }
}
