//! Building `TaskInfo`s.

use std::collections::HashMap;
use std::time::Duration;

use corral_proto::pb::{self, resource::Value};
use corral_proto::{RangeSet, ResourceError, Resources, TaskId};

/// Builds a [`pb::TaskInfo`] for one offer:
///
/// ```
/// # use corral_sdk::{pb, TaskBuilder, TaskId};
/// # let offer = pb::Offer { agent_id: "agent-1".into(), ..Default::default() };
/// let task = TaskBuilder::new(TaskId::parse("hello-0", "task_id").unwrap())
///     .shell("echo hello from $CORRAL_TASK_ID")
///     .cpus(0.1)
///     .mem(32.0)
///     .build_for(&offer);
/// assert_eq!(task.agent_id, "agent-1");
/// ```
///
/// Amounts are passed on as given; the master validates them (and answers
/// `INVALID_ARGUMENT` naming the field). Use [`TaskBuilder::try_resources`] to get
/// them as exact [`Resources`], e.g. to carve them out of an offer with
/// [`OfferResources`](crate::OfferResources).
#[derive(Debug, Clone)]
pub struct TaskBuilder {
    task_id: TaskId,
    name: Option<String>,
    command: Option<pb::CommandInfo>,
    environment: HashMap<String, String>,
    /// cpus, mem, disk, gpus; `None` leaves the resource out.
    scalars: [Option<f64>; 4],
    ports: RangeSet,
    kill_grace: Option<Duration>,
    max_completion_time: Option<Duration>,
    labels: HashMap<String, String>,
    container: Option<pb::ContainerInfo>,
    health_checks: Vec<pb::HealthCheck>,
}

const CPUS: usize = 0;
const MEM: usize = 1;
const DISK: usize = 2;
const GPUS: usize = 3;
const SCALAR_NAMES: [&str; 4] = ["cpus", "mem", "disk", "gpus"];

impl TaskBuilder {
    pub fn new(task_id: TaskId) -> Self {
        Self {
            task_id,
            name: None,
            command: None,
            environment: HashMap::new(),
            scalars: [None; 4],
            ports: RangeSet::new(),
            kill_grace: None,
            max_completion_time: None,
            labels: HashMap::new(),
            container: None,
            health_checks: Vec::new(),
        }
    }

    /// Display name; defaults to the task id.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Runs `script` through `/bin/sh -c`.
    pub fn shell(mut self, script: impl Into<String>) -> Self {
        self.command = Some(pb::CommandInfo {
            shell: true,
            value: script.into(),
            ..Default::default()
        });
        self
    }

    /// Runs `argv[0]` with `argv` as its full argument vector (no shell).
    pub fn command<I, A>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<String>,
    {
        let arguments: Vec<String> = argv.into_iter().map(Into::into).collect();
        self.command = Some(pb::CommandInfo {
            shell: false,
            value: arguments.first().cloned().unwrap_or_default(),
            arguments,
            ..Default::default()
        });
        self
    }

    /// Sets an environment variable of the command (in addition to the ones
    /// the agent sets, such as `CORRAL_TASK_ID`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.environment.insert(key.into(), value.into());
        self
    }

    pub fn cpus(mut self, cpus: f64) -> Self {
        self.scalars[CPUS] = Some(cpus);
        self
    }

    /// MiB.
    pub fn mem(mut self, mib: f64) -> Self {
        self.scalars[MEM] = Some(mib);
        self
    }

    /// MiB.
    pub fn disk(mut self, mib: f64) -> Self {
        self.scalars[DISK] = Some(mib);
        self
    }

    pub fn gpus(mut self, gpus: f64) -> Self {
        self.scalars[GPUS] = Some(gpus);
        self
    }

    /// Ports the task may bind, e.g. from [`OfferResources::take_ports`](crate::OfferResources::take_ports).
    pub fn ports(mut self, ports: RangeSet) -> Self {
        self.ports = ports;
        self
    }

    /// Sets every resource from exact amounts (replacing earlier calls).
    pub fn resources(mut self, resources: &Resources) -> Self {
        for (i, (_, amount)) in resources.scalars().iter().enumerate() {
            self.scalars[i] = (!amount.is_zero()).then(|| amount.as_f64());
        }
        self.ports = resources.ports.clone();
        self
    }

    /// Time between SIGTERM and SIGKILL when the task is killed.
    pub fn kill_grace(mut self, grace: Duration) -> Self {
        self.kill_grace = Some(grace);
        self
    }

    /// Longest time the task may run, counted from its start on the agent
    /// (Mesos' `max_completion_time`). When it elapses the agent kills the
    /// task (SIGTERM, then SIGKILL after the kill grace period) and reports
    /// `TASK_FAILED` with `REASON_MAX_COMPLETION_TIME_REACHED`. The master
    /// refuses zero and anything over a year.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use corral_sdk::{pb, TaskBuilder, TaskId};
    /// let task = TaskBuilder::new(TaskId::parse("nightly", "task_id").unwrap())
    ///     .shell("./report")
    ///     .max_completion_time(Duration::from_secs(2 * 3600))
    ///     .build_for(&pb::Offer::default());
    /// assert_eq!(task.max_completion_time_seconds, Some(7200.0));
    /// ```
    pub fn max_completion_time(mut self, max: Duration) -> Self {
        self.max_completion_time = Some(max);
        self
    }

    /// Adds a health check the agent runs once the task is RUNNING: a
    /// command (in the task's container), an HTTP GET or a TCP connect,
    /// as a liveness, readiness or startup check (at most one of each).
    /// Verdict changes arrive as `TASK_RUNNING` updates with `healthy` /
    /// `ready` set and reason `TASK_HEALTH_CHECK_STATUS_UPDATED`; a failed
    /// liveness or startup check makes the agent kill the task, which then
    /// ends `TASK_FAILED` with `REASON_TASK_UNHEALTHY`. The master refuses
    /// bad settings (zero interval, port 0, a second liveness check, ...).
    ///
    /// ```
    /// # use corral_sdk::{pb, TaskBuilder, TaskId};
    /// use pb::health_check::{Kind, Probe};
    /// let task = TaskBuilder::new(TaskId::parse("web-0", "task_id").unwrap())
    ///     .shell("exec ./serve --port 8080")
    ///     .health_check(pb::HealthCheck {
    ///         kind: Kind::Liveness as i32,
    ///         probe: Some(Probe::Http(pb::HttpProbe {
    ///             port: 8080,
    ///             path: "/health".into(),
    ///             ..Default::default()
    ///         })),
    ///         interval_seconds: Some(5.0),
    ///         consecutive_failures: Some(3),
    ///         ..Default::default()
    ///     })
    ///     .build_for(&pb::Offer::default());
    /// assert_eq!(task.health_checks.len(), 1);
    /// ```
    pub fn health_check(mut self, check: pb::HealthCheck) -> Self {
        self.health_checks.push(check);
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn task_id(&self) -> &TaskId {
        &self.task_id
    }

    /// The task's resources as exact amounts; fails on amounts the master
    /// would refuse (negative, NaN, infinite, absurd).
    pub fn try_resources(&self) -> Result<Resources, ResourceError> {
        Resources::from_proto(&self.resource_list(), "task.resources")
    }

    fn resource_list(&self) -> Vec<pb::Resource> {
        let mut list: Vec<pb::Resource> = SCALAR_NAMES
            .iter()
            .zip(self.scalars)
            .filter_map(|(name, value)| {
                value.map(|v| pb::Resource {
                    name: (*name).to_string(),
                    value: Some(Value::Scalar(v)),
                })
            })
            .collect();
        if !self.ports.is_empty() {
            list.push(self.ports.to_resource("ports"));
        }
        list
    }

    /// The task, placed on `offer`'s agent. Without `shell`/`command` the
    /// task has no command and the master refuses it.
    pub fn build_for(&self, offer: &pb::Offer) -> pb::TaskInfo {
        let command = self.command.clone().map(|mut c| {
            c.environment.extend(self.environment.clone());
            c
        });
        pb::TaskInfo {
            task_id: self.task_id.to_string(),
            name: self
                .name
                .clone()
                .unwrap_or_else(|| self.task_id.to_string()),
            agent_id: offer.agent_id.clone(),
            resources: self.resource_list(),
            command,
            kill_grace_period_seconds: self.kill_grace.map(|d| d.as_secs_f64()),
            labels: self.labels.clone(),
            container: self.container.clone(),
            max_completion_time_seconds: self.max_completion_time.map(|d| d.as_secs_f64()),
            health_checks: self.health_checks.clone(),
        }
    }

    fn container_mut(&mut self) -> &mut pb::ContainerInfo {
        self.container.get_or_insert_with(Default::default)
    }

    /// Runs the task in a root filesystem from this OCI image
    /// (`busybox`, `registry:5000/app:v2`); its Entrypoint/Cmd/Env/
    /// WorkingDir/User apply unless the task sets them.
    pub fn image(mut self, reference: impl Into<String>) -> Self {
        self.container_mut().image = reference.into();
        self
    }

    /// Mounts `host_path` at `container_path` (the agent allows only host
    /// paths under its `--allowed-host-paths`).
    pub fn volume(
        mut self,
        host_path: impl Into<String>,
        container_path: impl Into<String>,
        read_only: bool,
    ) -> Self {
        self.container_mut().volumes.push(pb::Volume {
            host_path: host_path.into(),
            container_path: container_path.into(),
            read_only,
            ..Default::default()
        });
        self
    }

    /// Mounts the volume `name` of the task's pod at `container_path`
    /// (only for tasks launched in a pod with `launch_group`).
    pub fn pod_volume(
        mut self,
        name: impl Into<String>,
        container_path: impl Into<String>,
        read_only: bool,
    ) -> Self {
        self.container_mut().volumes.push(pb::Volume {
            pod_volume: name.into(),
            container_path: container_path.into(),
            read_only,
            ..Default::default()
        });
        self
    }

    /// Runs as `UID[:GID]` instead of the image's user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.container_mut().user = user.into();
        self
    }

    /// Makes the command replace the image's Entrypoint, not just its Cmd.
    pub fn entrypoint_override(mut self) -> Self {
        self.container_mut().entrypoint_override = true;
        self
    }
}
