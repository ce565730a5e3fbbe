//! Service specs: the TOML service file users write, the wire form
//! (`pb::ServiceSpec`) and the validated [`Service`] the framework works with.
//!
//! Every check names the field it refuses (`service.task.cpus: must be
//! finite and > 0`, `service.pod.containers[1].name: duplicate container
//! name 'web'`) so a user can fix the spec from the message alone. Fields
//! are named as in the TOML file (`service.restart.max_backoff`, not
//! `max_backoff_seconds`), as the batch framework does. Validation is the
//! only way to a [`Service`]; a store keeping the wire form validates it
//! again when it loads, so a spec written by an older version cannot slip
//! past new rules.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use corral_proto::{Amount, Resources, pb};
use corral_sdk::Constraint;
use corral_sdk::constraint::ISOLATION_ATTRIBUTE;
use corral_sdk::spec::MAX_SECONDS;
use serde::Deserialize;

pub use corral_sdk::spec::{MAX_NAME_LEN, parse_duration};

/// Most instances of one service: each is a task (or a pod of tasks) the
/// framework tracks and reconciles.
pub const MAX_INSTANCES: u32 = 10_000;
/// Marathon's defaults for replacing failed instances (backoffSeconds,
/// backoffFactor, maxLaunchDelaySeconds): fast first retry, slow growth.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_FACTOR: f64 = 1.15;
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A factor beyond this reaches any cap within two failures: a typo.
const MAX_BACKOFF_FACTOR: f64 = 100.0;
/// Default rollout: one extra instance at a time and none below the
/// wanted count (Marathon's upgrade defaults), so a rollout never lowers
/// capacity.
pub const DEFAULT_MAX_SURGE: Scale = Scale::Count(1);
pub const DEFAULT_MAX_UNAVAILABLE: Scale = Scale::Count(0);
/// Nomad's `min_healthy_time` default: a new instance must stay healthy a
/// little while before the rollout moves on, so a crash loop is caught.
pub const DEFAULT_MIN_HEALTHY_TIME: Duration = Duration::from_secs(10);
/// Kubernetes' `progressDeadlineSeconds` default (Nomad's is the same).
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
/// Health check defaults of `corral.v1.HealthCheck` (common.proto), applied
/// here so the framework works with explicit values.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_CHECK_FAILURES: u32 = 3;
/// Default task or container size when a service file does not say: the
/// batch framework's and `corral run`'s.
pub const DEFAULT_CPUS: f64 = 0.1;
pub const DEFAULT_MEM_MIB: f64 = 32.0;
/// Most constraints per service.
const MAX_CONSTRAINTS: usize = 64;
/// Most environment variables per task or container.
const MAX_ENV: usize = 1024;
/// Most labels per service.
const MAX_LABELS: usize = 64;
/// Most containers per pod (Mesos and Kubernetes have no hard limit; a pod
/// with more is better split into services).
pub const MAX_CONTAINERS: usize = 32;
/// Most volumes per pod, and volume mounts per container.
const MAX_VOLUMES: usize = 64;
/// Most host ports per task, and container ports per container.
const MAX_PORTS: usize = 64;
/// Longest command (shell text plus every argument), the master's limit.
const MAX_COMMAND: usize = 256 * 1024;
/// Longest image reference.
const MAX_IMAGE_LEN: usize = 1024;
/// Longest path of a mount or host directory (Linux' PATH_MAX).
const MAX_PATH_LEN: usize = 4096;

/// A spec refused: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

impl SpecError {
    pub(crate) fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A validated service spec.
#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub instances: u32,
    /// `None`: the agent's default.
    pub kill_grace: Option<Duration>,
    /// As written, plus `isolation == container` when the template needs
    /// containers (an image, or a pod) and the spec did not constrain
    /// isolation itself.
    pub constraints: Vec<Constraint>,
    pub restart: Backoff,
    pub update: Update,
    pub template: Template,
    pub labels: BTreeMap<String, String>,
    /// The wire form as submitted: what a store keeps and a status shows.
    pub spec: pb::ServiceSpec,
}

/// The delay before replacing a failed instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    /// >= 1.
    pub factor: f64,
    /// >= `initial`.
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1: `initial`, then
    /// multiplied by `factor` each time, capped at `max`); 0 failures: none.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        // powi saturates to infinity rather than overflowing; the cap below
        // turns that into `max`.
        let exponent = i32::try_from(failures - 1).unwrap_or(i32::MAX);
        let seconds = self.initial.as_secs_f64() * self.factor.powi(exponent);
        if !seconds.is_finite() || seconds >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(seconds)
        }
    }
}

/// A count of instances, or a percentage of the wanted count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Count(u32),
    /// 0..=100.
    Percent(u32),
}

impl Scale {
    fn is_zero(self) -> bool {
        matches!(self, Scale::Count(0) | Scale::Percent(0))
    }

    /// The number of instances this is for a service of `instances`.
    fn of(self, instances: u32, round_up: bool) -> u32 {
        match self {
            Scale::Count(n) => n,
            Scale::Percent(p) => {
                let scaled = u64::from(instances) * u64::from(p);
                let n = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }
}

/// How a rollout replaces instances.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    pub max_surge: Scale,
    pub max_unavailable: Scale,
    pub min_healthy_time: Duration,
    pub progress_deadline: Duration,
    pub auto_rollback: bool,
}

impl Update {
    /// `(max_surge, max_unavailable)` in instances for a service of
    /// `instances`. Percentages round as Kubernetes' Deployment does (surge
    /// up, unavailable down), and when both come out 0 (say 25% of 1
    /// unavailable, 0 surge) one instance may be unavailable, as Kubernetes'
    /// `ResolveFenceposts` does, so the rollout can move at all.
    pub fn limits(&self, instances: u32) -> (u32, u32) {
        let surge = self.max_surge.of(instances, true);
        let unavailable = self.max_unavailable.of(instances, false);
        if surge == 0 && unavailable == 0 {
            (0, 1)
        } else {
            (surge, unavailable)
        }
    }
}

/// What one instance is.
#[derive(Debug, Clone, PartialEq)]
pub enum Template {
    Task(Task),
    Pod(Pod),
}

/// What a task runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `/bin/sh -c SCRIPT`.
    Shell(String),
    /// argv, argv[0] the executable.
    Argv(Vec<String>),
    /// The image's Entrypoint/Cmd.
    Image,
}

/// One task per instance, on the agent's network.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub command: Command,
    pub image: Option<String>,
    pub env: BTreeMap<String, String>,
    /// cpus, mem, disk; host ports are `ports`, taken from the offer.
    pub resources: Resources,
    /// Host ports to take from the offer (PORT0, PORT1…).
    pub ports: u32,
    pub health_checks: Vec<HealthCheck>,
}

/// What the agent does when a pod's container ends (Kubernetes'
/// `restartPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn to_proto(self) -> pb::PodRestartPolicy {
        match self {
            RestartPolicy::Always => pb::PodRestartPolicy::Always,
            RestartPolicy::OnFailure => pb::PodRestartPolicy::OnFailure,
            RestartPolicy::Never => pb::PodRestartPolicy::Never,
        }
    }
}

/// One pod per instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Pod {
    pub restart_policy: RestartPolicy,
    /// At least one; names unique.
    pub containers: Vec<Container>,
    /// Names unique; every volume mount names one of them.
    pub volumes: Vec<PodVolume>,
}

impl Pod {
    /// What the pod's containers need together (persistent volumes are
    /// reserved apart from this).
    pub fn resources(&self) -> Resources {
        let mut total = Resources::default();
        for c in &self.containers {
            total.add(&c.resources);
        }
        total
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Container {
    pub name: String,
    pub image: Option<String>,
    /// Replaces the image's Entrypoint when not empty.
    pub command: Vec<String>,
    /// Replaces the image's Cmd when not empty.
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// cpus and mem.
    pub resources: Resources,
    /// Ports the container listens on in the pod's network; unique in the pod.
    pub ports: Vec<u16>,
    pub volume_mounts: Vec<VolumeMount>,
    pub health_checks: Vec<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// The name of one of the pod's volumes.
    pub volume: String,
    /// Absolute path in the container.
    pub path: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodVolume {
    pub name: String,
    pub source: VolumeSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A fresh directory per pod.
    EmptyDir,
    /// An absolute directory of the agent host.
    HostPath(String),
    /// Disk reserved on the agent that outlives the pod; `claim` (the pod
    /// volume's name unless the spec says otherwise) names it: each
    /// instance slot has its own volume `CLAIM-SERVICE-SLOT` (see
    /// [`crate::core`]).
    Persistent { claim: String, size: Amount },
}

/// A validated health check, every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub probe: Probe,
    pub delay: Duration,
    pub interval: Duration,
    pub timeout: Duration,
    pub grace_period: Duration,
    pub consecutive_failures: u32,
    pub consecutive_successes: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthCheckKind {
    Liveness,
    Readiness,
    Startup,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Exit 0 is a success.
    Command(ProbeCommand),
    /// `GET http://<address>:port/path`; 200-399 is a success.
    Http { port: u16, path: String },
    /// A connection that opens is a success.
    Tcp { port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCommand {
    Shell(String),
    Argv(Vec<String>),
}

impl HealthCheck {
    /// The wire form with every value explicit, for a launched task.
    pub fn to_proto(&self) -> pb::HealthCheck {
        use pb::health_check::{Kind, Probe as P};
        let kind = match self.kind {
            HealthCheckKind::Liveness => Kind::Liveness,
            HealthCheckKind::Readiness => Kind::Readiness,
            HealthCheckKind::Startup => Kind::Startup,
        };
        let probe = match &self.probe {
            Probe::Command(ProbeCommand::Shell(s)) => P::Command(pb::CommandProbe {
                shell: true,
                value: s.clone(),
                arguments: Vec::new(),
            }),
            Probe::Command(ProbeCommand::Argv(argv)) => P::Command(pb::CommandProbe {
                shell: false,
                value: argv.first().cloned().unwrap_or_default(),
                arguments: argv.clone(),
            }),
            Probe::Http { port, path } => P::Http(pb::HttpProbe {
                scheme: "http".into(),
                port: u32::from(*port),
                path: path.clone(),
            }),
            Probe::Tcp { port } => P::Tcp(pb::TcpProbe {
                port: u32::from(*port),
            }),
        };
        pb::HealthCheck {
            kind: kind as i32,
            probe: Some(probe),
            delay_seconds: Some(self.delay.as_secs_f64()),
            interval_seconds: Some(self.interval.as_secs_f64()),
            timeout_seconds: Some(self.timeout.as_secs_f64()),
            grace_period_seconds: Some(self.grace_period.as_secs_f64()),
            consecutive_failures: Some(self.consecutive_failures),
            consecutive_successes: Some(self.consecutive_successes),
        }
    }
}

/// Checks a spec from the wire.
pub fn validate(spec: &pb::ServiceSpec) -> Result<Service, SpecError> {
    validate_name(&spec.name, "service.name")?;
    if spec.instances > MAX_INSTANCES {
        return Err(SpecError::new(
            "service.instances",
            format!("must be at most {MAX_INSTANCES}"),
        ));
    }
    let kill_grace = spec
        .kill_grace_period_seconds
        .map(|s| seconds(s, "service.kill_grace_period"))
        .transpose()?;
    let restart = restart_backoff(spec.restart.as_ref())?;
    let template = match &spec.template {
        None => {
            return Err(SpecError::new(
                "service.template",
                "required: a [task] or a [pod]",
            ));
        }
        Some(pb::service_spec::Template::Task(t)) => Template::Task(task(t)?),
        Some(pb::service_spec::Template::Pod(p)) => Template::Pod(pod(p)?),
    };
    let persistent = match &template {
        Template::Pod(p) => p
            .volumes
            .iter()
            .any(|v| matches!(v.source, VolumeSource::Persistent { .. })),
        Template::Task(_) => false,
    };
    let update = update_strategy(spec.update.as_ref(), persistent)?;
    labels(&spec.labels)?;
    if spec.constraints.len() > MAX_CONSTRAINTS {
        return Err(SpecError::new(
            "service.constraints",
            format!("at most {MAX_CONSTRAINTS} constraints"),
        ));
    }
    let mut constraints = spec
        .constraints
        .iter()
        .enumerate()
        .map(|(i, text)| {
            Constraint::from_str(text)
                .map_err(|e| SpecError::new(format!("service.constraints[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Images and pods (own network namespace, shared volumes) need an agent
    // that runs containers, as `corral run --image` asks. An explicit
    // isolation constraint is left as the user wrote it.
    let needs_containers = match &template {
        Template::Task(t) => t.image.is_some(),
        Template::Pod(_) => true,
    };
    if needs_containers
        && !constraints
            .iter()
            .any(|c| c.attribute == ISOLATION_ATTRIBUTE)
    {
        constraints.push(Constraint::isolated());
    }
    Ok(Service {
        name: spec.name.clone(),
        instances: spec.instances,
        kill_grace,
        constraints,
        restart,
        update,
        template,
        labels: spec.labels.clone().into_iter().collect(),
        spec: spec.clone(),
    })
}

fn restart_backoff(restart: Option<&pb::RestartBackoff>) -> Result<Backoff, SpecError> {
    let Some(r) = restart else {
        return Ok(Backoff {
            initial: DEFAULT_BACKOFF,
            factor: DEFAULT_BACKOFF_FACTOR,
            max: DEFAULT_MAX_BACKOFF,
        });
    };
    let initial = r
        .backoff_seconds
        .map(|s| seconds(s, "service.restart.backoff"))
        .transpose()?
        .unwrap_or(DEFAULT_BACKOFF);
    let factor = match r.factor {
        None => DEFAULT_BACKOFF_FACTOR,
        Some(f) if !f.is_finite() || f < 1.0 => {
            return Err(SpecError::new("service.restart.factor", "must be >= 1"));
        }
        Some(f) if f > MAX_BACKOFF_FACTOR => {
            return Err(SpecError::new(
                "service.restart.factor",
                format!("must be at most {MAX_BACKOFF_FACTOR}"),
            ));
        }
        Some(f) => f,
    };
    let max = match r.max_backoff_seconds {
        Some(s) => {
            let max = seconds(s, "service.restart.max_backoff")?;
            if max < initial {
                return Err(SpecError::new(
                    "service.restart.max_backoff",
                    format!("must be >= backoff ({}s)", initial.as_secs_f64()),
                ));
            }
            max
        }
        // A first delay above the default cap raises the cap, rather than
        // refusing a spec that only set `backoff`.
        None => DEFAULT_MAX_BACKOFF.max(initial),
    };
    Ok(Backoff {
        initial,
        factor,
        max,
    })
}

/// `persistent`: the pod has persistent volumes. An instance's replacement
/// must then reuse its volume on its agent, so the old instance stops
/// before the new one starts: no surge, and by default one unavailable
/// (Marathon requires `maximumOverCapacity = 0` of such apps too).
fn update_strategy(
    update: Option<&pb::UpdateStrategy>,
    persistent: bool,
) -> Result<Update, SpecError> {
    let (default_surge, default_unavailable) = if persistent {
        (Scale::Count(0), Scale::Count(1))
    } else {
        (DEFAULT_MAX_SURGE, DEFAULT_MAX_UNAVAILABLE)
    };
    let Some(u) = update else {
        return Ok(Update {
            max_surge: default_surge,
            max_unavailable: default_unavailable,
            min_healthy_time: DEFAULT_MIN_HEALTHY_TIME,
            progress_deadline: DEFAULT_PROGRESS_DEADLINE,
            auto_rollback: false,
        });
    };
    let max_surge =
        scale(u.max_surge.as_ref(), "service.update.max_surge")?.unwrap_or(default_surge);
    let max_unavailable = scale(u.max_unavailable.as_ref(), "service.update.max_unavailable")?
        .unwrap_or(default_unavailable);
    if persistent && !max_surge.is_zero() {
        return Err(SpecError::new(
            "service.update.max_surge",
            "must be 0 with persistent volumes: a replacement reuses the volume of the \
             instance it replaces, so that one stops first",
        ));
    }
    if max_surge.is_zero() && max_unavailable.is_zero() {
        return Err(SpecError::new(
            "service.update.max_surge",
            "max_surge and max_unavailable cannot both be 0",
        ));
    }
    let min_healthy_time = u
        .min_healthy_time_seconds
        .map(|s| seconds(s, "service.update.min_healthy_time"))
        .transpose()?
        .unwrap_or(DEFAULT_MIN_HEALTHY_TIME);
    let progress_deadline = u
        .progress_deadline_seconds
        .map(|s| seconds(s, "service.update.progress_deadline"))
        .transpose()?
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE);
    // As Kubernetes requires progressDeadlineSeconds > minReadySeconds: a
    // deadline within the healthy time would fail every rollout.
    if progress_deadline <= min_healthy_time {
        return Err(SpecError::new(
            "service.update.progress_deadline",
            format!(
                "must be longer than min_healthy_time ({}s)",
                min_healthy_time.as_secs_f64()
            ),
        ));
    }
    Ok(Update {
        max_surge,
        max_unavailable,
        min_healthy_time,
        progress_deadline,
        auto_rollback: u.auto_rollback,
    })
}

fn scale(value: Option<&pb::IntOrPercent>, field: &str) -> Result<Option<Scale>, SpecError> {
    use pb::int_or_percent::Value;
    match value.map(|v| v.value) {
        None => Ok(None),
        Some(None) => Err(SpecError::new(field, "give a count or a percent")),
        Some(Some(Value::Count(n))) if n > MAX_INSTANCES => Err(SpecError::new(
            field,
            format!("must be at most {MAX_INSTANCES}"),
        )),
        Some(Some(Value::Count(n))) => Ok(Some(Scale::Count(n))),
        // Above 100% would mean more than double the service during a
        // rollout, or unavailable instances that do not exist.
        Some(Some(Value::Percent(p))) if p > 100 => {
            Err(SpecError::new(field, "a percentage must be 0% to 100%"))
        }
        Some(Some(Value::Percent(p))) => Ok(Some(Scale::Percent(p))),
    }
}

fn task(t: &pb::TaskTemplate) -> Result<Task, SpecError> {
    let image = image(&t.image, "service.task.image")?;
    let command = match (t.shell.is_empty(), t.argv.is_empty()) {
        (false, false) => {
            return Err(SpecError::new(
                "service.task.command",
                "give either a shell command or args, not both",
            ));
        }
        (false, true) => Command::Shell(t.shell.clone()),
        (true, false) => {
            if t.argv[0].is_empty() {
                return Err(SpecError::new("service.task.args[0]", "must not be empty"));
            }
            Command::Argv(t.argv.clone())
        }
        (true, true) if image.is_some() => Command::Image,
        (true, true) => {
            return Err(SpecError::new(
                "service.task.command",
                "required (or an image whose entrypoint runs)",
            ));
        }
    };
    command_text(
        std::iter::once(&t.shell).chain(&t.argv),
        "service.task.command",
    )?;
    if t.ports as usize > MAX_PORTS {
        return Err(SpecError::new(
            "service.task.ports",
            format!("at most {MAX_PORTS} ports"),
        ));
    }
    env(&t.env, "service.task.env")?;
    // The framework sets PORT (= PORT0) and PORT0.. for the offered ports.
    if let Some(key) = t.env.keys().find(|k| {
        t.ports > 0
            && (*k == "PORT"
                || k.strip_prefix("PORT")
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|n| n < t.ports))
    }) {
        return Err(SpecError::new(
            format!("service.task.env.{key}"),
            "PORT and PORT0.. are set by Corral to the task's ports",
        ));
    }
    let resources = Resources {
        cpus: positive_amount(t.cpus, "service.task.cpus")?,
        mem: positive_amount(t.mem_mib, "service.task.mem")?,
        disk: amount(t.disk_mib, "service.task.disk")?,
        ..Resources::default()
    };
    Ok(Task {
        command,
        image,
        env: t.env.clone().into_iter().collect(),
        resources,
        ports: t.ports,
        health_checks: health_checks(&t.health_checks, "service.task.health_checks")?,
    })
}

fn pod(p: &pb::PodTemplate) -> Result<Pod, SpecError> {
    let restart_policy = match pb::PodRestartPolicy::try_from(p.restart_policy) {
        Ok(pb::PodRestartPolicy::Unspecified | pb::PodRestartPolicy::Always) => {
            RestartPolicy::Always
        }
        Ok(pb::PodRestartPolicy::OnFailure) => RestartPolicy::OnFailure,
        Ok(pb::PodRestartPolicy::Never) => RestartPolicy::Never,
        Err(_) => {
            return Err(SpecError::new(
                "service.pod.restart_policy",
                format!("unknown policy {}", p.restart_policy),
            ));
        }
    };
    if p.containers.is_empty() {
        return Err(SpecError::new(
            "service.pod.containers",
            "a pod needs at least one container",
        ));
    }
    if p.containers.len() > MAX_CONTAINERS {
        return Err(SpecError::new(
            "service.pod.containers",
            format!("at most {MAX_CONTAINERS} containers"),
        ));
    }
    if p.volumes.len() > MAX_VOLUMES {
        return Err(SpecError::new(
            "service.pod.volumes",
            format!("at most {MAX_VOLUMES} volumes"),
        ));
    }
    let mut volumes: Vec<PodVolume> = Vec::with_capacity(p.volumes.len());
    let mut claims = HashSet::new();
    for (i, v) in p.volumes.iter().enumerate() {
        let field = format!("service.pod.volumes[{i}]");
        validate_name(&v.name, &format!("{field}.name"))?;
        if volumes.iter().any(|seen| seen.name == v.name) {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!("duplicate volume name '{}'", v.name),
            ));
        }
        let source = match &v.source {
            None => {
                return Err(SpecError::new(
                    format!("{field}.source"),
                    "required: one of empty_dir, host_path, persistent",
                ));
            }
            Some(pb::pod_volume_template::Source::EmptyDir(_)) => VolumeSource::EmptyDir,
            Some(pb::pod_volume_template::Source::HostPath(path)) => {
                absolute_path(path, &format!("{field}.host_path"))?;
                VolumeSource::HostPath(path.clone())
            }
            Some(pb::pod_volume_template::Source::Persistent(pv)) => {
                let claim = if pv.claim.is_empty() {
                    v.name.clone()
                } else {
                    validate_name(&pv.claim, &format!("{field}.persistent.claim"))?;
                    pv.claim.clone()
                };
                // Two pod volumes on one persistent volume would be one
                // directory under two names, with two sizes.
                if !claims.insert(claim.clone()) {
                    return Err(SpecError::new(
                        format!("{field}.persistent.claim"),
                        format!("persistent volume '{claim}' is used twice"),
                    ));
                }
                let size = positive_amount(pv.size_mib, &format!("{field}.persistent.size"))?;
                VolumeSource::Persistent { claim, size }
            }
        };
        volumes.push(PodVolume {
            name: v.name.clone(),
            source,
        });
    }
    let mut containers: Vec<Container> = Vec::with_capacity(p.containers.len());
    // Containers share the pod's network namespace: one listener per port.
    let mut port_owner: HashMap<u16, String> = HashMap::new();
    for (i, c) in p.containers.iter().enumerate() {
        let field = format!("service.pod.containers[{i}]");
        let container = container(c, &field, &volumes)?;
        if containers.iter().any(|seen| seen.name == container.name) {
            return Err(SpecError::new(
                format!("{field}.name"),
                format!("duplicate container name '{}'", container.name),
            ));
        }
        for (j, port) in container.ports.iter().enumerate() {
            if let Some(owner) = port_owner.insert(*port, container.name.clone()) {
                return Err(SpecError::new(
                    format!("{field}.ports[{j}]"),
                    format!("port {port} is already declared by container '{owner}'"),
                ));
            }
        }
        containers.push(container);
    }
    Ok(Pod {
        restart_policy,
        containers,
        volumes,
    })
}

fn container(
    c: &pb::ContainerTemplate,
    field: &str,
    volumes: &[PodVolume],
) -> Result<Container, SpecError> {
    validate_name(&c.name, &format!("{field}.name"))?;
    let image = image(&c.image, &format!("{field}.image"))?;
    if image.is_none() && c.command.is_empty() {
        return Err(SpecError::new(
            format!("{field}.command"),
            "required without an image",
        ));
    }
    if c.command.first().is_some_and(String::is_empty) {
        return Err(SpecError::new(
            format!("{field}.command[0]"),
            "must not be empty",
        ));
    }
    command_text(c.command.iter().chain(&c.args), &format!("{field}.command"))?;
    env(&c.env, &format!("{field}.env"))?;
    let resources = Resources {
        cpus: positive_amount(c.cpus, &format!("{field}.cpus"))?,
        mem: positive_amount(c.mem_mib, &format!("{field}.mem"))?,
        ..Resources::default()
    };
    if c.ports.len() > MAX_PORTS {
        return Err(SpecError::new(
            format!("{field}.ports"),
            format!("at most {MAX_PORTS} ports"),
        ));
    }
    let mut ports: Vec<u16> = Vec::with_capacity(c.ports.len());
    for (j, p) in c.ports.iter().enumerate() {
        let port = port(*p, &format!("{field}.ports[{j}]"))?;
        if ports.contains(&port) {
            return Err(SpecError::new(
                format!("{field}.ports[{j}]"),
                format!("duplicate port {port}"),
            ));
        }
        ports.push(port);
    }
    if c.volume_mounts.len() > MAX_VOLUMES {
        return Err(SpecError::new(
            format!("{field}.volume_mounts"),
            format!("at most {MAX_VOLUMES} volume mounts"),
        ));
    }
    let mut volume_mounts: Vec<VolumeMount> = Vec::with_capacity(c.volume_mounts.len());
    for (j, m) in c.volume_mounts.iter().enumerate() {
        let mount_field = format!("{field}.volume_mounts[{j}]");
        if !volumes.iter().any(|v| v.name == m.name) {
            return Err(SpecError::new(
                format!("{mount_field}.name"),
                format!("no volume named '{}'", m.name),
            ));
        }
        absolute_path(&m.path, &format!("{mount_field}.path"))?;
        if m.path.trim_end_matches('/').is_empty() {
            return Err(SpecError::new(
                format!("{mount_field}.path"),
                "cannot mount over the container's root",
            ));
        }
        let path = m.path.trim_end_matches('/').to_string();
        if volume_mounts.iter().any(|seen| seen.path == path) {
            return Err(SpecError::new(
                format!("{mount_field}.path"),
                format!("'{path}' is mounted twice"),
            ));
        }
        volume_mounts.push(VolumeMount {
            volume: m.name.clone(),
            path,
            read_only: m.read_only,
        });
    }
    Ok(Container {
        name: c.name.clone(),
        image,
        command: c.command.clone(),
        args: c.args.clone(),
        env: c.env.clone().into_iter().collect(),
        resources,
        ports,
        volume_mounts,
        health_checks: health_checks(&c.health_checks, &format!("{field}.health_checks"))?,
    })
}

/// The rules the master applies to a task's checks (at most one of each
/// kind, Kubernetes' thresholds), checked here so a service that passes
/// validation also launches; plus the defaults of common.proto filled in.
fn health_checks(checks: &[pb::HealthCheck], field: &str) -> Result<Vec<HealthCheck>, SpecError> {
    use pb::health_check::{Kind, Probe as P};
    let mut out: Vec<HealthCheck> = Vec::with_capacity(checks.len());
    for (i, check) in checks.iter().enumerate() {
        let field = |name: &str| format!("{field}[{i}].{name}");
        let kind = match Kind::try_from(check.kind) {
            Ok(Kind::Unspecified | Kind::Liveness) => HealthCheckKind::Liveness,
            Ok(Kind::Readiness) => HealthCheckKind::Readiness,
            Ok(Kind::Startup) => HealthCheckKind::Startup,
            Err(_) => {
                return Err(SpecError::new(
                    field("kind"),
                    format!("unknown kind {}", check.kind),
                ));
            }
        };
        let kind_name = match kind {
            HealthCheckKind::Liveness => "liveness",
            HealthCheckKind::Readiness => "readiness",
            HealthCheckKind::Startup => "startup",
        };
        if out.iter().any(|c| c.kind == kind) {
            return Err(SpecError::new(
                field("kind"),
                format!("at most one {kind_name} check"),
            ));
        }
        let probe = match &check.probe {
            None => {
                return Err(SpecError::new(
                    field("probe"),
                    "required: one of command, http, tcp",
                ));
            }
            Some(P::Command(c)) => {
                let command = if c.shell {
                    if c.value.is_empty() {
                        return Err(SpecError::new(field("command"), "must not be empty"));
                    }
                    ProbeCommand::Shell(c.value.clone())
                } else {
                    // `value` is the executable, `arguments` the whole argv
                    // (CommandInfo's convention); an argv alone is enough.
                    let mut argv = c.arguments.clone();
                    if argv.is_empty() && !c.value.is_empty() {
                        argv.push(c.value.clone());
                    }
                    if argv.first().is_none_or(String::is_empty) {
                        return Err(SpecError::new(field("command"), "must not be empty"));
                    }
                    ProbeCommand::Argv(argv)
                };
                command_text(
                    std::iter::once(&c.value).chain(&c.arguments),
                    &field("command"),
                )?;
                Probe::Command(command)
            }
            Some(P::Http(h)) => {
                if !h.scheme.is_empty() && h.scheme != "http" {
                    return Err(SpecError::new(
                        field("http.scheme"),
                        format!("must be http ('{}' is not supported)", h.scheme),
                    ));
                }
                let port = port(h.port, &field("http.port"))?;
                let path = if h.path.is_empty() {
                    "/".to_string()
                } else {
                    h.path.clone()
                };
                if !path.starts_with('/')
                    || path.contains(char::is_whitespace)
                    || path.contains(char::is_control)
                    || path.len() > MAX_PATH_LEN
                {
                    return Err(SpecError::new(
                        field("http.path"),
                        "must start with '/' and contain no spaces or control characters",
                    ));
                }
                Probe::Http { port, path }
            }
            Some(P::Tcp(t)) => Probe::Tcp {
                port: port(t.port, &field("tcp.port"))?,
            },
        };
        let optional = |value: Option<f64>, name: &str, default: Duration| {
            value
                .map(|s| seconds(s, &field(name)))
                .transpose()
                .map(|d| d.unwrap_or(default))
        };
        let delay = optional(check.delay_seconds, "delay", Duration::ZERO)?;
        let grace_period = optional(check.grace_period_seconds, "grace_period", Duration::ZERO)?;
        let interval = optional(check.interval_seconds, "interval", DEFAULT_CHECK_INTERVAL)?;
        let timeout = optional(check.timeout_seconds, "timeout", DEFAULT_CHECK_TIMEOUT)?;
        // Zero would probe in a busy loop, or fail every probe.
        for (value, name) in [(interval, "interval"), (timeout, "timeout")] {
            if value.is_zero() {
                return Err(SpecError::new(field(name), "must be finite and > 0"));
            }
        }
        let consecutive_failures = match check.consecutive_failures {
            None => DEFAULT_CHECK_FAILURES,
            Some(0) => {
                return Err(SpecError::new(
                    field("consecutive_failures"),
                    "must be >= 1",
                ));
            }
            Some(n) => n,
        };
        let consecutive_successes = match check.consecutive_successes {
            None => 1,
            Some(0) => {
                return Err(SpecError::new(
                    field("consecutive_successes"),
                    "must be >= 1",
                ));
            }
            Some(n) if n > 1 && kind != HealthCheckKind::Readiness => {
                return Err(SpecError::new(
                    field("consecutive_successes"),
                    format!("must be 1 for a {kind_name} check"),
                ));
            }
            Some(n) => n,
        };
        out.push(HealthCheck {
            kind,
            probe,
            delay,
            interval,
            timeout,
            grace_period,
            consecutive_failures,
            consecutive_successes,
        });
    }
    Ok(out)
}

/// Service, container and volume names become parts of task ids, file
/// names and metric labels, so they keep to a charset that is safe in all
/// three (the batch framework's rule for job names).
pub fn validate_name(name: &str, field: &str) -> Result<(), SpecError> {
    corral_sdk::spec::check_name(name).map_err(|reason| SpecError::new(field, reason))
}

fn image(image: &str, field: &str) -> Result<Option<String>, SpecError> {
    if image.is_empty() {
        return Ok(None);
    }
    if image.len() > MAX_IMAGE_LEN || image.contains(char::is_whitespace) || image.contains('\0') {
        return Err(SpecError::new(
            field,
            format!("must be an image reference without spaces, at most {MAX_IMAGE_LEN} bytes"),
        ));
    }
    Ok(Some(image.to_string()))
}

fn command_text<'a>(parts: impl Iterator<Item = &'a String>, field: &str) -> Result<(), SpecError> {
    let mut size = 0usize;
    for part in parts {
        if part.contains('\0') {
            return Err(SpecError::new(field, "must not contain NUL bytes"));
        }
        size += part.len();
    }
    if size > MAX_COMMAND {
        return Err(SpecError::new(field, "is longer than 256 KiB"));
    }
    Ok(())
}

fn env(env: &HashMap<String, String>, field: &str) -> Result<(), SpecError> {
    if env.len() > MAX_ENV {
        return Err(SpecError::new(
            field,
            format!("at most {MAX_ENV} variables"),
        ));
    }
    // Sorted, so the error names the same variable every time.
    let mut keys: Vec<&String> = env.keys().collect();
    keys.sort();
    for key in keys {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(SpecError::new(
                format!("{field}.{key}"),
                "names must be non-empty, without '=' or NUL",
            ));
        }
        if key.starts_with("CORRAL_") {
            return Err(SpecError::new(
                format!("{field}.{key}"),
                "CORRAL_* variables are set by Corral",
            ));
        }
        if env[key].contains('\0') {
            return Err(SpecError::new(
                format!("{field}.{key}"),
                "values must not contain NUL",
            ));
        }
    }
    Ok(())
}

/// Labels follow Kubernetes' syntax (`app.kubernetes.io/name: web`), so a
/// manifest's labels carry over and every label is safe as a metric label
/// value: keys are `[prefix/]name`, names and values at most 63 characters
/// of `[A-Za-z0-9._-]` starting and ending alphanumeric (values may be
/// empty), prefixes a DNS subdomain.
fn labels(labels: &HashMap<String, String>) -> Result<(), SpecError> {
    if labels.len() > MAX_LABELS {
        return Err(SpecError::new(
            "service.labels",
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    let segment = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for key in keys {
        let field = format!("service.labels.{key}");
        let (prefix, name) = match key.rsplit_once('/') {
            Some((prefix, name)) => (Some(prefix), name),
            None => (None, key.as_str()),
        };
        let prefix_ok = prefix.is_none_or(|p| {
            p.len() <= 253
                && p.split('.').all(|part| {
                    segment(part)
                        && part
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                })
        });
        if !prefix_ok || !segment(name) {
            return Err(SpecError::new(
                field,
                "keys are [DNS-subdomain/]name, the name 1 to 63 of [A-Za-z0-9._-], \
                 starting and ending with a letter or digit",
            ));
        }
        let value = &labels[key];
        if !value.is_empty() && !segment(value) {
            return Err(SpecError::new(
                field,
                format!(
                    "'{value}': values are at most 63 of [A-Za-z0-9._-], starting and \
                     ending with a letter or digit"
                ),
            ));
        }
    }
    Ok(())
}

fn absolute_path(path: &str, field: &str) -> Result<(), SpecError> {
    if !path.starts_with('/') {
        return Err(SpecError::new(field, format!("'{path}' must be absolute")));
    }
    if path.len() > MAX_PATH_LEN || path.contains('\0') {
        return Err(SpecError::new(
            field,
            format!("must be at most {MAX_PATH_LEN} bytes, without NUL"),
        ));
    }
    // `..` could climb out of wherever the agent roots the path.
    if path.split('/').any(|part| part == "..") {
        return Err(SpecError::new(
            field,
            format!("'{path}' must not contain '..'"),
        ));
    }
    Ok(())
}

fn port(value: u32, field: &str) -> Result<u16, SpecError> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(SpecError::new(field, "must be 1-65535")),
    }
}

fn amount(value: f64, field: &str) -> Result<Amount, SpecError> {
    Amount::from_f64(value, field).map_err(|e| SpecError::new(e.field, e.reason))
}

fn positive_amount(value: f64, field: &str) -> Result<Amount, SpecError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(SpecError::new(field, "must be finite and > 0"));
    }
    let amount = amount(value, field)?;
    if amount.is_zero() {
        return Err(SpecError::new(field, "must be at least 0.001"));
    }
    Ok(amount)
}

/// A wire duration: finite, >= 0, at most a year.
fn seconds(value: f64, field: &str) -> Result<Duration, SpecError> {
    if !value.is_finite() {
        return Err(SpecError::new(field, "must be finite"));
    }
    if value < 0.0 {
        return Err(SpecError::new(field, "must be >= 0"));
    }
    if value > MAX_SECONDS {
        return Err(SpecError::new(field, "must be at most one year"));
    }
    Ok(Duration::from_secs_f64(value))
}

// ---------------------------------------------------------------------------
// The TOML service file.

/// The TOML service file, as users write it (see the crate's README
/// section for a full example).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    name: Option<String>,
    instances: Option<i64>,
    kill_grace_period: Option<DurationField>,
    #[serde(default)]
    constraints: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    restart: Option<RestartFile>,
    update: Option<UpdateFile>,
    task: Option<TaskFile>,
    pod: Option<PodFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartFile {
    backoff: Option<DurationField>,
    factor: Option<f64>,
    max_backoff: Option<DurationField>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateFile {
    max_surge: Option<ScaleField>,
    max_unavailable: Option<ScaleField>,
    min_healthy_time: Option<DurationField>,
    progress_deadline: Option<DurationField>,
    auto_rollback: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    /// Shell text only: an argv is `args`, so `command` means one thing.
    command: Option<String>,
    args: Option<Vec<String>>,
    image: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cpus: Option<f64>,
    mem: Option<f64>,
    disk: Option<f64>,
    ports: Option<i64>,
    #[serde(default)]
    health_checks: Vec<HealthCheckFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodFile {
    restart_policy: Option<String>,
    #[serde(default)]
    containers: Vec<ContainerFile>,
    #[serde(default)]
    volumes: Vec<VolumeFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerFile {
    name: Option<String>,
    image: Option<String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cpus: Option<f64>,
    mem: Option<f64>,
    #[serde(default)]
    ports: Vec<i64>,
    #[serde(default)]
    volume_mounts: Vec<VolumeMountFile>,
    #[serde(default)]
    health_checks: Vec<HealthCheckFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeMountFile {
    name: String,
    path: String,
    #[serde(default)]
    read_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeFile {
    name: Option<String>,
    empty_dir: Option<EmptyDirFile>,
    host_path: Option<String>,
    persistent: Option<PersistentFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyDirFile {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PersistentFile {
    /// MiB.
    size: f64,
    claim: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckFile {
    kind: Option<String>,
    http: Option<HttpFile>,
    tcp: Option<TcpFile>,
    command: Option<CommandField>,
    delay: Option<DurationField>,
    interval: Option<DurationField>,
    timeout: Option<DurationField>,
    grace_period: Option<DurationField>,
    consecutive_failures: Option<i64>,
    consecutive_successes: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpFile {
    port: i64,
    path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TcpFile {
    port: i64,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CommandField {
    Shell(String),
    Argv(Vec<String>),
}

/// A number of seconds or `500ms`, `2s`, `1.5m`, `1h`, `1d`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationField {
    Seconds(f64),
    Text(String),
}

/// `1` or `"25%"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ScaleField {
    Count(i64),
    Text(String),
}

/// Parses a TOML service file into the wire form. Structural problems
/// (unknown fields, wrong types, unknown names of kinds and policies) fail
/// here; value checks happen in [`validate`], so every client gets the same
/// rules.
pub fn parse_toml(text: &str) -> Result<pb::ServiceSpec, SpecError> {
    let file: ServiceFile = toml::from_str(text).map_err(|e| {
        let reason = e.message().to_string();
        let field = e
            .span()
            .map(|span| toml_path_at(text, span.start))
            .unwrap_or_else(|| "service".to_string());
        SpecError::new(field, reason)
    })?;
    let template = match (file.task, file.pod) {
        (Some(_), Some(_)) => {
            return Err(SpecError::new(
                "service.template",
                "give either [task] or [pod], not both",
            ));
        }
        (Some(t), None) => Some(pb::service_spec::Template::Task(task_file(t)?)),
        (None, Some(p)) => Some(pb::service_spec::Template::Pod(pod_file(p)?)),
        (None, None) => None,
    };
    let restart = file
        .restart
        .map(|r| -> Result<_, SpecError> {
            Ok(pb::RestartBackoff {
                backoff_seconds: seconds_field(r.backoff, "service.restart.backoff")?,
                factor: r.factor,
                max_backoff_seconds: seconds_field(r.max_backoff, "service.restart.max_backoff")?,
            })
        })
        .transpose()?;
    let update = file
        .update
        .map(|u| -> Result<_, SpecError> {
            Ok(pb::UpdateStrategy {
                max_surge: scale_field(u.max_surge, "service.update.max_surge")?,
                max_unavailable: scale_field(u.max_unavailable, "service.update.max_unavailable")?,
                min_healthy_time_seconds: seconds_field(
                    u.min_healthy_time,
                    "service.update.min_healthy_time",
                )?,
                progress_deadline_seconds: seconds_field(
                    u.progress_deadline,
                    "service.update.progress_deadline",
                )?,
                auto_rollback: u.auto_rollback.unwrap_or(false),
            })
        })
        .transpose()?;
    Ok(pb::ServiceSpec {
        name: file.name.unwrap_or_default(),
        instances: match file.instances {
            // Marathon's default: one instance.
            None => 1,
            Some(n) => whole(n, "service.instances")?,
        },
        kill_grace_period_seconds: seconds_field(
            file.kill_grace_period,
            "service.kill_grace_period",
        )?,
        constraints: file.constraints,
        restart,
        update,
        template,
        labels: file.labels.into_iter().collect(),
    })
}

fn task_file(t: TaskFile) -> Result<pb::TaskTemplate, SpecError> {
    Ok(pb::TaskTemplate {
        shell: t.command.unwrap_or_default(),
        argv: t.args.unwrap_or_default(),
        image: t.image.unwrap_or_default(),
        env: t.env.into_iter().collect(),
        cpus: t.cpus.unwrap_or(DEFAULT_CPUS),
        mem_mib: t.mem.unwrap_or(DEFAULT_MEM_MIB),
        disk_mib: t.disk.unwrap_or(0.0),
        ports: t
            .ports
            .map(|n| whole(n, "service.task.ports"))
            .transpose()?
            .unwrap_or(0),
        health_checks: health_check_files(t.health_checks, "service.task.health_checks")?,
    })
}

fn pod_file(p: PodFile) -> Result<pb::PodTemplate, SpecError> {
    let restart_policy = match p.restart_policy.as_deref() {
        None | Some("Always") => pb::PodRestartPolicy::Always,
        Some("OnFailure") => pb::PodRestartPolicy::OnFailure,
        Some("Never") => pb::PodRestartPolicy::Never,
        Some(other) => {
            return Err(SpecError::new(
                "service.pod.restart_policy",
                format!("'{other}' is not one of Always, OnFailure, Never"),
            ));
        }
    };
    let containers = p
        .containers
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let field = format!("service.pod.containers[{i}]");
            Ok(pb::ContainerTemplate {
                name: c.name.unwrap_or_default(),
                image: c.image.unwrap_or_default(),
                command: c.command,
                args: c.args,
                env: c.env.into_iter().collect(),
                cpus: c.cpus.unwrap_or(DEFAULT_CPUS),
                mem_mib: c.mem.unwrap_or(DEFAULT_MEM_MIB),
                ports: c
                    .ports
                    .into_iter()
                    .enumerate()
                    .map(|(j, p)| whole(p, &format!("{field}.ports[{j}]")))
                    .collect::<Result<_, _>>()?,
                volume_mounts: c
                    .volume_mounts
                    .into_iter()
                    .map(|m| pb::VolumeMount {
                        name: m.name,
                        path: m.path,
                        read_only: m.read_only,
                    })
                    .collect(),
                health_checks: health_check_files(
                    c.health_checks,
                    &format!("{field}.health_checks"),
                )?,
            })
        })
        .collect::<Result<_, SpecError>>()?;
    let volumes = p
        .volumes
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            use pb::pod_volume_template::Source;
            let field = format!("service.pod.volumes[{i}]");
            let mut sources = Vec::new();
            if v.empty_dir.is_some() {
                sources.push(Source::EmptyDir(pb::EmptyDirVolume {}));
            }
            if let Some(path) = v.host_path {
                sources.push(Source::HostPath(path));
            }
            if let Some(pv) = v.persistent {
                sources.push(Source::Persistent(pb::PersistentVolumeTemplate {
                    size_mib: pv.size,
                    claim: pv.claim.unwrap_or_default(),
                }));
            }
            if sources.len() > 1 {
                return Err(SpecError::new(
                    format!("{field}.source"),
                    "give exactly one of empty_dir, host_path, persistent",
                ));
            }
            Ok(pb::PodVolumeTemplate {
                name: v.name.unwrap_or_default(),
                source: sources.pop(),
            })
        })
        .collect::<Result<_, SpecError>>()?;
    Ok(pb::PodTemplate {
        restart_policy: restart_policy as i32,
        containers,
        volumes,
    })
}

fn health_check_files(
    checks: Vec<HealthCheckFile>,
    field: &str,
) -> Result<Vec<pb::HealthCheck>, SpecError> {
    use pb::health_check::{Kind, Probe as P};
    checks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let field = |name: &str| format!("{field}[{i}].{name}");
            let kind = match c.kind.as_deref() {
                None | Some("liveness") => Kind::Liveness,
                Some("readiness") => Kind::Readiness,
                Some("startup") => Kind::Startup,
                Some(other) => {
                    return Err(SpecError::new(
                        field("kind"),
                        format!("'{other}' is not one of liveness, readiness, startup"),
                    ));
                }
            };
            let mut probes = Vec::new();
            if let Some(h) = c.http {
                probes.push(P::Http(pb::HttpProbe {
                    scheme: String::new(),
                    port: probe_port(h.port, &field("http.port"))?,
                    path: h.path.unwrap_or_default(),
                }));
            }
            if let Some(t) = c.tcp {
                probes.push(P::Tcp(pb::TcpProbe {
                    port: probe_port(t.port, &field("tcp.port"))?,
                }));
            }
            match c.command {
                Some(CommandField::Shell(s)) => probes.push(P::Command(pb::CommandProbe {
                    shell: true,
                    value: s,
                    arguments: Vec::new(),
                })),
                Some(CommandField::Argv(argv)) => probes.push(P::Command(pb::CommandProbe {
                    shell: false,
                    value: argv.first().cloned().unwrap_or_default(),
                    arguments: argv,
                })),
                None => {}
            }
            if probes.len() > 1 {
                return Err(SpecError::new(
                    field("probe"),
                    "give exactly one of http, tcp, command",
                ));
            }
            let count = |v: Option<i64>, name: &str| v.map(|n| whole(n, &field(name))).transpose();
            Ok(pb::HealthCheck {
                kind: kind as i32,
                probe: probes.pop(),
                delay_seconds: seconds_field(c.delay, &field("delay"))?,
                interval_seconds: seconds_field(c.interval, &field("interval"))?,
                timeout_seconds: seconds_field(c.timeout, &field("timeout"))?,
                grace_period_seconds: seconds_field(c.grace_period, &field("grace_period"))?,
                consecutive_failures: count(c.consecutive_failures, "consecutive_failures")?,
                consecutive_successes: count(c.consecutive_successes, "consecutive_successes")?,
            })
        })
        .collect()
}

/// A port as written; out-of-range values fail in [`validate`] with the
/// same message as the wire form, negative ones here.
fn probe_port(n: i64, field: &str) -> Result<u32, SpecError> {
    u32::try_from(n).map_err(|_| SpecError::new(field, "must be 1-65535"))
}

fn whole(n: i64, field: &str) -> Result<u32, SpecError> {
    u32::try_from(n).map_err(|_| SpecError::new(field, "must be a whole number >= 0"))
}

fn seconds_field(d: Option<DurationField>, field: &str) -> Result<Option<f64>, SpecError> {
    match d {
        None => Ok(None),
        Some(DurationField::Seconds(s)) => Ok(Some(s)),
        Some(DurationField::Text(t)) => parse_duration(&t)
            .map(|d| Some(d.as_secs_f64()))
            .map_err(|reason| SpecError::new(field, reason)),
    }
}

fn scale_field(s: Option<ScaleField>, field: &str) -> Result<Option<pb::IntOrPercent>, SpecError> {
    use pb::int_or_percent::Value;
    let value =
        match s {
            None => return Ok(None),
            Some(ScaleField::Count(n)) => Value::Count(u32::try_from(n).map_err(|_| {
                SpecError::new(field, "must be a whole number >= 0 or a percentage")
            })?),
            Some(ScaleField::Text(t)) => Value::Percent(
                t.trim()
                    .strip_suffix('%')
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .ok_or_else(|| {
                        SpecError::new(
                            field,
                            format!("'{t}' is not a count or a percentage like \"25%\""),
                        )
                    })?,
            ),
        };
    Ok(Some(pb::IntOrPercent { value: Some(value) }))
}

/// The dotted path of the key a TOML error points at, for the error's
/// field: the table header above it (with array-of-tables indices, so the
/// second `[[pod.containers]]` is `pod.containers[1]`) plus the key on the
/// line. Headers with quoted keys are taken literally; the path only has to
/// lead a human to the line.
fn toml_path_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    // How many tables each array-of-tables path has had so far, keyed by
    // the resolved path (parents' indices included).
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut table = String::new();
    let resolve = |parts: &[&str], counts: &HashMap<String, usize>| -> String {
        let mut path = String::new();
        for part in parts {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(part.trim());
            if let Some(n) = counts.get(&path) {
                path = format!("{path}[{}]", n.saturating_sub(1));
            }
        }
        path
    };
    // Every line up to and including the one the error points at: a
    // header on that line is the table the error is about.
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    for line in text[..line_end].lines() {
        let trimmed = line.trim();
        if let Some(inner) = trimmed
            .strip_prefix("[[")
            .and_then(|l| l.split("]]").next())
        {
            let parts: Vec<&str> = inner.split('.').collect();
            let (last, parents) = parts.split_last().unwrap_or((&"", &[]));
            let parent = resolve(parents, &counts);
            let key = if parent.is_empty() {
                last.trim().to_string()
            } else {
                format!("{parent}.{}", last.trim())
            };
            let n = counts.entry(key.clone()).or_insert(0);
            *n += 1;
            table = format!("{key}[{}]", *n - 1);
        } else if let Some(inner) = trimmed.strip_prefix('[').and_then(|l| l.split(']').next()) {
            let parts: Vec<&str> = inner.split('.').collect();
            table = resolve(&parts, &counts);
        }
    }
    let line = text[line_start..].lines().next().unwrap_or("");
    let key =
        line.split('=').next().map(str::trim).filter(|k| {
            !k.is_empty() && !k.starts_with('[') && !k.starts_with('#') && k.len() < 64
        });
    let mut path = String::from("service");
    for part in [Some(table.as_str()), key].into_iter().flatten() {
        if !part.is_empty() {
            path.push('.');
            path.push_str(part);
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_sdk::constraint::Operator;

    /// The task service of the README, every field set.
    const TASK_SERVICE: &str = r#"
name = "web"
instances = 3
kill_grace_period = "30s"
constraints = ["hostname unique", "zone == a", "rack like r-[12]", "zone max_per 2"]

[labels]
app = "web"
"app.kubernetes.io/part-of" = "shop"

[restart]
backoff = "1s"
factor = 1.15
max_backoff = "300s"

[update]
max_surge = 1
max_unavailable = 0
min_healthy_time = "10s"
progress_deadline = "600s"
auto_rollback = true

[task]
command = "exec busybox httpd -f -p 8080"
image = "busybox:latest"
cpus = 0.1
mem = 64
disk = 0
env = { GREETING = "hi" }
ports = 1

[[task.health_checks]]
kind = "liveness"
http = { port = 8080, path = "/" }
interval = "2s"
timeout = "1s"
delay = "0s"
grace_period = "10s"
consecutive_failures = 3

[[task.health_checks]]
kind = "readiness"
tcp = { port = 8080 }
consecutive_successes = 2
"#;

    /// The pod service of the README: two containers sharing volumes.
    const POD_SERVICE: &str = r#"
name = "web-pod"
instances = 4

[update]
max_surge = "25%"
max_unavailable = "50%"

[pod]
restart_policy = "OnFailure"

[[pod.containers]]
name = "web"
image = "busybox:latest"
command = ["/bin/httpd"]
args = ["-f", "-p", "8080"]
env = { A = "b" }
cpus = 0.1
mem = 32
ports = [8080]
volume_mounts = [{ name = "data", path = "/data", read_only = false }]
health_checks = [
  { kind = "liveness", http = { port = 8080, path = "/index.html" } },
  { kind = "startup", command = "test -f /data/index.html", interval = "1s" },
]

[[pod.containers]]
name = "writer"
image = "busybox:latest"
command = ["/bin/sh", "-c", "while true; do date > /data/index.html; sleep 5; done"]
cpus = 0.05
mem = 16
volume_mounts = [
  { name = "data", path = "/data/" },
  { name = "host", path = "/host", read_only = true },
]

[[pod.containers.health_checks]]
kind = "liveness"
command = ["/bin/test", "-f", "/data/index.html"]

[[pod.volumes]]
name = "data"
empty_dir = {}

[[pod.volumes]]
name = "host"
host_path = "/srv/x"
"#;

    const TASK_BASE: &str = "name = \"x\"\n[task]\ncommand = \"true\"\n";

    fn service(toml: &str) -> Service {
        let spec = parse_toml(toml).unwrap_or_else(|e| panic!("{e}"));
        validate(&spec).unwrap_or_else(|e| panic!("{e}"))
    }

    fn error(toml: &str) -> SpecError {
        match parse_toml(toml) {
            Err(e) => e,
            Ok(spec) => validate(&spec).expect_err("spec should be refused"),
        }
    }

    fn pod_of(s: &Service) -> &Pod {
        match &s.template {
            Template::Pod(p) => p,
            Template::Task(_) => panic!("not a pod"),
        }
    }

    #[test]
    fn the_task_example_maps_field_by_field() {
        let spec = parse_toml(TASK_SERVICE).unwrap();
        // The wire form carries exactly what the file says.
        assert_eq!(spec.name, "web");
        assert_eq!(spec.instances, 3);
        assert_eq!(spec.kill_grace_period_seconds, Some(30.0));
        assert_eq!(spec.constraints.len(), 4);
        assert_eq!(spec.labels["app.kubernetes.io/part-of"], "shop");
        let restart = spec.restart.unwrap();
        assert_eq!(restart.backoff_seconds, Some(1.0));
        assert_eq!(restart.factor, Some(1.15));
        assert_eq!(restart.max_backoff_seconds, Some(300.0));
        let update = spec.update.unwrap();
        assert_eq!(
            update.max_surge.unwrap().value,
            Some(pb::int_or_percent::Value::Count(1))
        );
        assert_eq!(update.min_healthy_time_seconds, Some(10.0));
        assert!(update.auto_rollback);
        let Some(pb::service_spec::Template::Task(t)) = &spec.template else {
            panic!("not a task");
        };
        assert_eq!(t.shell, "exec busybox httpd -f -p 8080");
        assert_eq!(t.mem_mib, 64.0);
        assert_eq!(t.health_checks.len(), 2);
        // It survives the wire, and validation keeps it as given.
        let decoded = <pb::ServiceSpec as prost::Message>::decode(
            prost::Message::encode_to_vec(&spec).as_slice(),
        )
        .unwrap();
        assert_eq!(decoded, spec);
        let s = validate(&decoded).unwrap();
        assert_eq!(s.spec, spec);

        assert_eq!(s.name, "web");
        assert_eq!(s.instances, 3);
        assert_eq!(s.kill_grace, Some(Duration::from_secs(30)));
        assert_eq!(s.labels["app"], "web");
        assert_eq!(
            s.restart,
            Backoff {
                initial: Duration::from_secs(1),
                factor: 1.15,
                max: Duration::from_secs(300),
            }
        );
        assert_eq!(
            s.update,
            Update {
                max_surge: Scale::Count(1),
                max_unavailable: Scale::Count(0),
                min_healthy_time: Duration::from_secs(10),
                progress_deadline: Duration::from_secs(600),
                auto_rollback: true,
            }
        );
        let ops: Vec<_> = s.constraints.iter().map(|c| c.to_string()).collect();
        assert_eq!(
            ops,
            [
                "hostname unique",
                "zone == a",
                "rack like r-[12]",
                "zone max_per 2",
                // An image needs a containerizing agent.
                "isolation == container",
            ]
        );
        assert_eq!(s.constraints[3].operator, Operator::MaxPer(2));
        let Template::Task(task) = &s.template else {
            panic!("not a task");
        };
        assert_eq!(
            task.command,
            Command::Shell("exec busybox httpd -f -p 8080".into())
        );
        assert_eq!(task.image.as_deref(), Some("busybox:latest"));
        assert_eq!(task.env["GREETING"], "hi");
        assert_eq!(task.resources.cpus, Amount::from_milli(100));
        assert_eq!(task.resources.mem, Amount::from_units(64));
        assert_eq!(task.resources.disk, Amount::ZERO);
        assert_eq!(task.ports, 1);
        assert_eq!(
            task.health_checks[0],
            HealthCheck {
                kind: HealthCheckKind::Liveness,
                probe: Probe::Http {
                    port: 8080,
                    path: "/".into()
                },
                delay: Duration::ZERO,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(1),
                grace_period: Duration::from_secs(10),
                consecutive_failures: 3,
                consecutive_successes: 1,
            }
        );
        assert_eq!(task.health_checks[1].kind, HealthCheckKind::Readiness);
        assert_eq!(task.health_checks[1].probe, Probe::Tcp { port: 8080 });
        assert_eq!(task.health_checks[1].consecutive_successes, 2);
        // Defaults of common.proto where the file says nothing.
        assert_eq!(task.health_checks[1].interval, DEFAULT_CHECK_INTERVAL);
        assert_eq!(task.health_checks[1].timeout, DEFAULT_CHECK_TIMEOUT);
        assert_eq!(
            task.health_checks[1].consecutive_failures,
            DEFAULT_CHECK_FAILURES
        );
    }

    #[test]
    fn the_pod_example_maps_field_by_field() {
        let s = service(POD_SERVICE);
        assert_eq!(s.instances, 4);
        assert_eq!(s.update.max_surge, Scale::Percent(25));
        assert_eq!(s.update.max_unavailable, Scale::Percent(50));
        // A pod always needs containers (its own network namespace).
        assert_eq!(s.constraints, vec![Constraint::isolated()]);
        let pod = pod_of(&s);
        assert_eq!(pod.restart_policy, RestartPolicy::OnFailure);
        assert_eq!(
            pod.volumes,
            vec![
                PodVolume {
                    name: "data".into(),
                    source: VolumeSource::EmptyDir,
                },
                PodVolume {
                    name: "host".into(),
                    source: VolumeSource::HostPath("/srv/x".into()),
                },
            ]
        );
        let web = &pod.containers[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.image.as_deref(), Some("busybox:latest"));
        assert_eq!(web.command, ["/bin/httpd"]);
        assert_eq!(web.args, ["-f", "-p", "8080"]);
        assert_eq!(web.env["A"], "b");
        assert_eq!(web.resources.cpus, Amount::from_milli(100));
        assert_eq!(web.resources.mem, Amount::from_units(32));
        assert_eq!(web.ports, [8080]);
        assert_eq!(
            web.volume_mounts,
            [VolumeMount {
                volume: "data".into(),
                path: "/data".into(),
                read_only: false,
            }]
        );
        assert_eq!(
            web.health_checks[0].probe,
            Probe::Http {
                port: 8080,
                path: "/index.html".into()
            }
        );
        assert_eq!(web.health_checks[1].kind, HealthCheckKind::Startup);
        assert_eq!(
            web.health_checks[1].probe,
            Probe::Command(ProbeCommand::Shell("test -f /data/index.html".into()))
        );
        assert_eq!(web.health_checks[1].interval, Duration::from_secs(1));
        let writer = &pod.containers[1];
        // A trailing slash is the same mount point.
        assert_eq!(writer.volume_mounts[0].path, "/data");
        assert!(writer.volume_mounts[1].read_only);
        assert_eq!(
            writer.health_checks[0].probe,
            Probe::Command(ProbeCommand::Argv(vec![
                "/bin/test".into(),
                "-f".into(),
                "/data/index.html".into()
            ]))
        );
        assert_eq!(
            pod.resources().cpus,
            Amount::from_milli(150),
            "the pod needs what its containers need together"
        );
        assert_eq!(pod.resources().mem, Amount::from_units(48));
        // 25% of 4 up is 1 surge, 50% of 4 down is 2 unavailable.
        assert_eq!(s.update.limits(s.instances), (1, 2));
    }

    #[test]
    fn defaults_fill_in_what_a_short_file_leaves_out() {
        let s = service("name = \"x\"\n[task]\nargs = [\"/bin/sleep\", \"1000\"]");
        assert_eq!(s.instances, 1);
        assert_eq!(s.kill_grace, None);
        assert_eq!(
            s.restart,
            Backoff {
                initial: DEFAULT_BACKOFF,
                factor: DEFAULT_BACKOFF_FACTOR,
                max: DEFAULT_MAX_BACKOFF,
            }
        );
        assert_eq!(s.update.max_surge, DEFAULT_MAX_SURGE);
        assert_eq!(s.update.max_unavailable, DEFAULT_MAX_UNAVAILABLE);
        assert_eq!(s.update.min_healthy_time, DEFAULT_MIN_HEALTHY_TIME);
        assert_eq!(s.update.progress_deadline, DEFAULT_PROGRESS_DEADLINE);
        assert!(!s.update.auto_rollback);
        // No image: the host filesystem, so no isolation constraint.
        assert!(s.constraints.is_empty());
        let Template::Task(t) = &s.template else {
            panic!("not a task");
        };
        assert_eq!(
            t.command,
            Command::Argv(vec!["/bin/sleep".into(), "1000".into()])
        );
        assert_eq!(t.resources.cpus, Amount::from_milli(100));
        assert_eq!(t.resources.mem, Amount::from_units(32));
        // Zero instances is a service kept with nothing running.
        assert_eq!(service(&format!("instances = 0\n{TASK_BASE}")).instances, 0);
        // An image alone runs its entrypoint.
        let s = service("name = \"x\"\n[task]\nimage = \"busybox\"");
        let Template::Task(t) = &s.template else {
            panic!("not a task");
        };
        assert_eq!(t.command, Command::Image);
        // Only agents that run containers.
        assert_eq!(s.constraints, vec![Constraint::isolated()]);
        // An explicit isolation constraint is kept as written.
        let s = service(&format!(
            "constraints = [\"isolation == none\"]\n{TASK_BASE}image = \"busybox\"\n"
        ));
        assert_eq!(s.constraints.len(), 1);
    }

    #[test]
    fn the_documented_errors_read_as_documented() {
        let pod = |volumes: &str, containers: &str| {
            format!("name = \"p\"\n[pod]\n{volumes}\n{containers}")
        };
        for (toml, message) in [
            (
                pod(
                    "",
                    "[[pod.containers]]\nname = \"web\"\ncommand = [\"a\"]\n\
                     [[pod.containers]]\nname = \"web\"\ncommand = [\"b\"]",
                ),
                "service.pod.containers[1].name: duplicate container name 'web'",
            ),
            (
                format!("{TASK_BASE}[update]\nmax_surge = 0\nmax_unavailable = \"0%\""),
                "service.update.max_surge: max_surge and max_unavailable cannot both be 0",
            ),
            (
                pod(
                    "[[pod.volumes]]\nname = \"data\"\nempty_dir = {}",
                    "[[pod.containers]]\nname = \"web\"\ncommand = [\"a\"]\n\
                     volume_mounts = [{ name = \"cache\", path = \"/cache\" }]",
                ),
                "service.pod.containers[0].volume_mounts[0].name: no volume named 'cache'",
            ),
            (
                "name = \"x\"\n[task]\ncommand = \"true\"\ncpus = 0".to_string(),
                "service.task.cpus: must be finite and > 0",
            ),
            (
                format!("{TASK_BASE}[restart]\nfactor = 0.5"),
                "service.restart.factor: must be >= 1",
            ),
        ] {
            assert_eq!(error(&toml).to_string(), message, "{toml}");
        }
    }

    #[test]
    fn bad_specs_name_the_field() {
        let task = |extra: &str| format!("{TASK_BASE}{extra}");
        let top = |extra: &str| format!("{extra}\n{TASK_BASE}");
        let pod = |body: &str| {
            format!(
                "name = \"p\"\n[pod]\n{body}\n[[pod.volumes]]\nname = \"data\"\nempty_dir = {{}}\n"
            )
        };
        let web = "[[pod.containers]]\nname = \"web\"\ncommand = [\"/bin/web\"]\n";
        let check = "[[task.health_checks]]\n";
        let cases: Vec<(String, &str)> = vec![
            (top("instances = -1"), "service.instances"),
            (top("instances = 20000"), "service.instances"),
            (top("colour = \"red\""), "service.colour"),
            (top("kill_grace_period = -1"), "service.kill_grace_period"),
            (
                top("kill_grace_period = \"soon\""),
                "service.kill_grace_period",
            ),
            (top("constraints = [\"zone\"]"), "service.constraints[0]"),
            (
                top("constraints = [\"zone == a\", \"rack like r-[\"]"),
                "service.constraints[1]",
            ),
            (
                top("constraints = [\"zone max_per 0\"]"),
                "service.constraints[0]",
            ),
            (
                "name = \"no spaces\"\n[task]\ncommand = \"true\"".into(),
                "service.name",
            ),
            ("[task]\ncommand = \"true\"".into(), "service.name"),
            ("name = \"x\"".into(), "service.template"),
            (
                format!("{TASK_BASE}[pod]\nrestart_policy = \"Always\""),
                "service.template",
            ),
            (
                format!("{TASK_BASE}[labels]\n\"bad key\" = \"x\""),
                "service.labels.bad key",
            ),
            (
                format!("{TASK_BASE}[labels]\napp = \"-web\""),
                "service.labels.app",
            ),
            (task("cpus = -1"), "service.task.cpus"),
            (task("cpus = nan"), "service.task.cpus"),
            (task("cpus = \"lots\""), "service.task.cpus"),
            (task("mem = 0"), "service.task.mem"),
            (task("disk = -5"), "service.task.disk"),
            (task("args = [\"/bin/true\"]"), "service.task.command"),
            (
                "name = \"x\"\n[task]\ncpus = 1".into(),
                "service.task.command",
            ),
            (
                "name = \"x\"\n[task]\nargs = [\"\"]".into(),
                "service.task.args[0]",
            ),
            (task("image = \"bad image\""), "service.task.image"),
            (
                task("env = { CORRAL_TASK = \"1\" }"),
                "service.task.env.CORRAL_TASK",
            ),
            (
                task("ports = 2\nenv = { PORT1 = \"80\" }"),
                "service.task.env.PORT1",
            ),
            (task("ports = -1"), "service.task.ports"),
            (task("ports = 65"), "service.task.ports"),
            (task("colour = \"red\""), "service.task.colour"),
            (
                format!("{TASK_BASE}[restart]\nbackoff = \"soon\""),
                "service.restart.backoff",
            ),
            (
                format!("{TASK_BASE}[restart]\nbackoff = \"10s\"\nmax_backoff = \"5s\""),
                "service.restart.max_backoff",
            ),
            (
                format!("{TASK_BASE}[restart]\nfactor = 1000"),
                "service.restart.factor",
            ),
            (
                format!("{TASK_BASE}[update]\nmax_surge = \"150%\""),
                "service.update.max_surge",
            ),
            (
                format!("{TASK_BASE}[update]\nmax_unavailable = \"lots\""),
                "service.update.max_unavailable",
            ),
            (
                format!("{TASK_BASE}[update]\nmax_unavailable = -1"),
                "service.update.max_unavailable",
            ),
            (
                format!("{TASK_BASE}[update]\nprogress_deadline = \"5s\""),
                "service.update.progress_deadline",
            ),
            (
                format!("{TASK_BASE}[update]\nmin_healthy_time = -1"),
                "service.update.min_healthy_time",
            ),
            (
                task(&format!(
                    "{check}kind = \"sometimes\"\ntcp = {{ port = 80 }}"
                )),
                "service.task.health_checks[0].kind",
            ),
            (
                task(&format!("{check}kind = \"liveness\"")),
                "service.task.health_checks[0].probe",
            ),
            (
                task(&format!("{check}tcp = {{ port = 80 }}\ncommand = \"true\"")),
                "service.task.health_checks[0].probe",
            ),
            (
                task(&format!("{check}tcp = {{ port = 80 }}\ninterval = 0")),
                "service.task.health_checks[0].interval",
            ),
            (
                task(&format!("{check}http = {{ port = 70000 }}")),
                "service.task.health_checks[0].http.port",
            ),
            (
                task(&format!("{check}http = {{ port = 80, path = \"index\" }}")),
                "service.task.health_checks[0].http.path",
            ),
            (
                task(&format!(
                    "{check}tcp = {{ port = 80 }}\n{check}tcp = {{ port = 81 }}"
                )),
                "service.task.health_checks[1].kind",
            ),
            (
                task(&format!(
                    "{check}tcp = {{ port = 80 }}\nconsecutive_successes = 2"
                )),
                "service.task.health_checks[0].consecutive_successes",
            ),
            (
                task(&format!(
                    "{check}tcp = {{ port = 80 }}\nconsecutive_failures = 0"
                )),
                "service.task.health_checks[0].consecutive_failures",
            ),
            (
                task(&format!("{check}tcp = {{ port = 80 }}\ncolour = 1")),
                "service.task.health_checks[0].colour",
            ),
            (pod(""), "service.pod.containers"),
            (
                pod(&format!("restart_policy = \"Sometimes\"\n{web}")),
                "service.pod.restart_policy",
            ),
            (
                pod(&format!(
                    "{web}[[pod.containers]]\nname = \"b\"\ncolour = 1"
                )),
                "service.pod.containers[1].colour",
            ),
            (
                pod(&format!(
                    "{web}[[pod.containers.health_checks]]\ntcp = {{ port = 80 }}\n\
                     [[pod.containers.health_checks]]\ntcp = {{ port = 80 }}\ncolour = 1"
                )),
                "service.pod.containers[0].health_checks[1].colour",
            ),
            (
                pod("[[pod.containers]]\nname = \"a/b\"\ncommand = [\"x\"]"),
                "service.pod.containers[0].name",
            ),
            (
                pod("[[pod.containers]]\nname = \"web\""),
                "service.pod.containers[0].command",
            ),
            (
                pod(&format!("{web}cpus = 0")),
                "service.pod.containers[0].cpus",
            ),
            (
                pod(&format!("{web}ports = [0]")),
                "service.pod.containers[0].ports[0]",
            ),
            (
                pod(&format!("{web}ports = [80, 80]")),
                "service.pod.containers[0].ports[1]",
            ),
            (
                pod(&format!(
                    "{web}ports = [80]\n[[pod.containers]]\nname = \"b\"\ncommand = [\"x\"]\nports = [80]"
                )),
                "service.pod.containers[1].ports[0]",
            ),
            (
                pod(&format!(
                    "{web}volume_mounts = [{{ name = \"data\", path = \"data\" }}]"
                )),
                "service.pod.containers[0].volume_mounts[0].path",
            ),
            (
                pod(&format!(
                    "{web}volume_mounts = [{{ name = \"data\", path = \"/\" }}]"
                )),
                "service.pod.containers[0].volume_mounts[0].path",
            ),
            (
                pod(&format!(
                    "{web}volume_mounts = [{{ name = \"data\", path = \"/d\" }}, \
                     {{ name = \"data\", path = \"/d/\" }}]"
                )),
                "service.pod.containers[0].volume_mounts[1].path",
            ),
            (
                pod(&format!("{web}env = {{ CORRAL_X = \"1\" }}")),
                "service.pod.containers[0].env.CORRAL_X",
            ),
            (
                pod(&format!(
                    "{web}[[pod.volumes]]\nname = \"data\"\nempty_dir = {{}}"
                )),
                "service.pod.volumes[1].name",
            ),
            (
                pod(&format!("{web}[[pod.volumes]]\nname = \"v\"")),
                "service.pod.volumes[0].source",
            ),
            (
                pod(&format!(
                    "{web}[[pod.volumes]]\nname = \"v\"\nempty_dir = {{}}\nhost_path = \"/x\""
                )),
                "service.pod.volumes[0].source",
            ),
            (
                pod(&format!(
                    "{web}[[pod.volumes]]\nname = \"v\"\nhost_path = \"/srv/../etc\""
                )),
                "service.pod.volumes[0].host_path",
            ),
            (
                pod(&format!(
                    "{web}[[pod.volumes]]\nname = \"v\"\npersistent = {{ size = 0 }}"
                )),
                "service.pod.volumes[0].persistent.size",
            ),
            (
                pod(&format!(
                    "{web}[[pod.volumes]]\nname = \"v\"\npersistent = {{ size = 10 }}\n\
                     [[pod.volumes]]\nname = \"w\"\npersistent = {{ size = 10, claim = \"v\" }}"
                )),
                "service.pod.volumes[1].persistent.claim",
            ),
            (
                format!(
                    "{}[update]\nmax_surge = 1\n",
                    pod(&format!(
                        "{web}[[pod.volumes]]\nname = \"v\"\npersistent = {{ size = 10 }}"
                    ))
                ),
                "service.update.max_surge",
            ),
        ];
        assert!(cases.len() >= 20);
        let wrong: Vec<String> = cases
            .iter()
            .filter_map(|(toml, field)| {
                let e = error(toml);
                (e.field != *field || e.reason.is_empty())
                    .then(|| format!("{toml}\n=> {e} (expected {field})"))
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    }

    #[test]
    fn backoff_grows_by_the_factor_up_to_the_cap() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            factor: 2.0,
            max: Duration::from_secs(10),
        };
        assert_eq!(b.delay(0), Duration::ZERO);
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
        assert_eq!(b.delay(4), Duration::from_secs(8));
        assert_eq!(b.delay(5), Duration::from_secs(10));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
        // A first backoff above the default cap raises the cap.
        let s = service(&format!("{TASK_BASE}[restart]\nbackoff = \"10m\""));
        assert_eq!(s.restart.max, Duration::from_secs(600));
    }

    #[test]
    fn update_limits_round_percentages_like_kubernetes() {
        let update = |surge, unavailable| Update {
            max_surge: surge,
            max_unavailable: unavailable,
            min_healthy_time: DEFAULT_MIN_HEALTHY_TIME,
            progress_deadline: DEFAULT_PROGRESS_DEADLINE,
            auto_rollback: false,
        };
        let pct = update(Scale::Percent(25), Scale::Percent(25));
        assert_eq!(pct.limits(10), (3, 2), "surge rounds up, unavailable down");
        assert_eq!(pct.limits(4), (1, 1));
        // Both rounding to nothing would stall: one may be unavailable.
        let tiny = update(Scale::Percent(0), Scale::Percent(25));
        assert_eq!(tiny.limits(1), (0, 1));
        assert_eq!(
            update(Scale::Count(2), Scale::Count(0)).limits(1),
            (2, 0),
            "counts are taken as they are"
        );
    }

    #[test]
    fn persistent_volumes_replace_instances_in_place() {
        let s = service(
            "name = \"db\"\n[pod]\n[[pod.containers]]\nname = \"pg\"\nimage = \"postgres\"\n\
             volume_mounts = [{ name = \"data\", path = \"/var/lib/postgresql\" }]\n\
             [[pod.volumes]]\nname = \"data\"\npersistent = { size = 2048 }",
        );
        assert_eq!(s.update.max_surge, Scale::Count(0));
        assert_eq!(s.update.max_unavailable, Scale::Count(1));
        assert_eq!(
            pod_of(&s).volumes[0].source,
            VolumeSource::Persistent {
                claim: "data".into(),
                size: Amount::from_units(2048),
            }
        );
    }

    #[test]
    fn health_checks_convert_to_the_wire_with_every_value_explicit() {
        let s = service(TASK_SERVICE);
        let Template::Task(t) = &s.template else {
            panic!("not a task");
        };
        let wire = t.health_checks[0].to_proto();
        assert_eq!(wire.kind, pb::health_check::Kind::Liveness as i32);
        assert_eq!(wire.interval_seconds, Some(2.0));
        assert_eq!(wire.timeout_seconds, Some(1.0));
        assert_eq!(wire.grace_period_seconds, Some(10.0));
        assert_eq!(wire.consecutive_failures, Some(3));
        assert_eq!(wire.consecutive_successes, Some(1));
        // What to_proto writes validates back to the same check.
        let again = health_checks(&[wire], "x").unwrap();
        assert_eq!(again[0], t.health_checks[0]);
        let argv = HealthCheck {
            probe: Probe::Command(ProbeCommand::Argv(vec!["/bin/true".into()])),
            ..t.health_checks[0].clone()
        };
        assert_eq!(health_checks(&[argv.to_proto()], "x").unwrap()[0], argv);
    }

    #[test]
    fn toml_paths_follow_tables_and_arrays_of_tables() {
        let text = "a = 1\n[x]\nb = 2\n[[y.z]]\nc = 3\n[[y.z]]\nd = 4\n[[y.z.w]]\ne = 5\n";
        let at = |needle: &str| toml_path_at(text, text.find(needle).unwrap());
        assert_eq!(at("a ="), "service.a");
        assert_eq!(at("b ="), "service.x.b");
        assert_eq!(at("c ="), "service.y.z[0].c");
        assert_eq!(at("d ="), "service.y.z[1].d");
        assert_eq!(at("e ="), "service.y.z[1].w[0].e");
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("1e30").is_err());
    }
}
