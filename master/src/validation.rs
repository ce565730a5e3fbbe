//! Validation of everything frameworks and agents send, as pure functions.
//!
//! Errors carry the dotted path of the offending field so the caller sees
//! `task.resources.cpus: must be finite and > 0`, never a bare "invalid".

use std::collections::{HashMap, HashSet};

use corral_proto::{AgentId, FrameworkId, IdError, ResourceError, Resources, TaskId, pb};

/// Longest name/hostname/role/label accepted, in bytes.
const MAX_TEXT: usize = 1024;
/// Longest command line accepted (Linux `ARG_MAX` is 2 MiB; keep well under).
const MAX_COMMAND: usize = 256 * 1024;
/// Most environment variables or labels on one task.
const MAX_ENTRIES: usize = 4096;
/// Most volumes on one task.
const MAX_VOLUMES: usize = 64;
/// Longest kill grace period, decline filter or max completion time
/// accepted: one year, like the cap Mesos applies to `refuse_seconds`.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<IdError> for FieldError {
    fn from(e: IdError) -> Self {
        Self::new(e.field, e.reason)
    }
}

impl From<ResourceError> for FieldError {
    fn from(e: ResourceError) -> Self {
        Self::new(e.field, e.reason)
    }
}

fn text(value: &str, field: &str, required: bool) -> Result<(), FieldError> {
    if required && value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > MAX_TEXT {
        return Err(FieldError::new(field, "must be at most 1024 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// A duration in seconds from the wire: finite, >= 0, at most a year.
pub fn seconds(value: f64, field: &str) -> Result<f64, FieldError> {
    if !value.is_finite() {
        return Err(FieldError::new(field, "must be finite"));
    }
    if value < 0.0 {
        return Err(FieldError::new(field, "must be >= 0"));
    }
    if value > MAX_SECONDS {
        return Err(FieldError::new(field, "must be at most one year"));
    }
    Ok(value)
}

/// Role names follow Mesos (`src/common/roles.cpp`): `*` or a name that is
/// not `.`/`..`, does not start with `-`, and has no `/`, space or control.
pub fn role(value: &str, field: &str) -> Result<(), FieldError> {
    if value == "*" {
        return Ok(());
    }
    text(value, field, true)?;
    if value == "." || value == ".." || value.starts_with('-') {
        return Err(FieldError::new(
            field,
            "must not be '.', '..' or start with '-'",
        ));
    }
    if value.contains(['/', ' ', '*']) {
        return Err(FieldError::new(
            field,
            "must not contain '/', '*' or spaces",
        ));
    }
    Ok(())
}

/// A validated `FrameworkInfo` from SUBSCRIBE.
#[derive(Debug, Clone)]
pub struct ValidFramework {
    pub id: Option<FrameworkId>,
    pub info: pb::FrameworkInfo,
    pub role: String,
    pub failover_timeout: std::time::Duration,
}

pub fn framework_info(info: &pb::FrameworkInfo) -> Result<ValidFramework, FieldError> {
    let id = if info.id.is_empty() {
        None
    } else {
        Some(FrameworkId::parse(&info.id, "framework_info.id")?)
    };
    text(&info.name, "framework_info.name", true)?;
    text(&info.user, "framework_info.user", false)?;
    text(&info.hostname, "framework_info.hostname", false)?;
    let role_name = if info.role.is_empty() {
        "*".to_string()
    } else {
        info.role.clone()
    };
    role(&role_name, "framework_info.role")?;
    let failover = seconds(
        info.failover_timeout_seconds,
        "framework_info.failover_timeout_seconds",
    )?;
    let mut info = info.clone();
    info.role = role_name.clone();
    Ok(ValidFramework {
        id,
        info,
        role: role_name,
        failover_timeout: std::time::Duration::from_secs_f64(failover),
    })
}

/// A validated `Register` from an agent.
#[derive(Debug, Clone)]
pub struct ValidAgent {
    pub id: Option<AgentId>,
    pub info: pb::AgentInfo,
    pub total: Resources,
}

pub fn agent_info(info: &pb::AgentInfo) -> Result<ValidAgent, FieldError> {
    let id = if info.id.is_empty() {
        None
    } else {
        Some(AgentId::parse(&info.id, "agent.id")?)
    };
    text(&info.hostname, "agent.hostname", true)?;
    text(&info.address, "agent.address", false)?;
    let total = Resources::from_proto(&info.resources, "agent.resources")?;
    for (i, a) in info.attributes.iter().enumerate() {
        text(&a.name, &format!("agent.attributes[{i}].name"), true)?;
        match &a.value {
            Some(pb::attribute::Value::Text(t)) => {
                text(t, &format!("agent.attributes.{}", a.name), false)?
            }
            Some(pb::attribute::Value::Scalar(s)) if s.is_finite() => {}
            _ => {
                return Err(FieldError::new(
                    format!("agent.attributes.{}", a.name),
                    "must be text or a finite number",
                ));
            }
        }
    }
    Ok(ValidAgent {
        id,
        info: info.clone(),
        total,
    })
}

/// Filters from DECLINE/ACCEPT: the refuse duration, or the default.
pub fn refuse_seconds(
    filters: Option<&pb::Filters>,
    default: std::time::Duration,
) -> Result<std::time::Duration, FieldError> {
    match filters.and_then(|f| f.refuse_seconds) {
        None => Ok(default),
        Some(s) => Ok(std::time::Duration::from_secs_f64(seconds(
            s,
            "filters.refuse_seconds",
        )?)),
    }
}

/// A task that passed validation, with its resources converted.
#[derive(Debug, Clone)]
pub struct ValidTask {
    pub id: TaskId,
    pub info: pb::TaskInfo,
    pub resources: Resources,
}

/// Checks one task of a LAUNCH on its own (not against offers or other
/// tasks; the master does that with its state). The `task_id` may be
/// invalid, in which case the error cannot be reported against the task.
pub fn task(info: &pb::TaskInfo) -> Result<ValidTask, FieldError> {
    let id = TaskId::parse(&info.task_id, "task.task_id")?;
    text(&info.name, "task.name", false)?;
    AgentId::parse(&info.agent_id, "task.agent_id")?;
    let resources = Resources::from_proto(&info.resources, "task.resources")?;
    if resources.cpus.is_zero() {
        return Err(FieldError::new(
            "task.resources.cpus",
            "must be finite and > 0",
        ));
    }
    if resources.mem.is_zero() {
        return Err(FieldError::new(
            "task.resources.mem",
            "must be finite and > 0",
        ));
    }
    let image = info.container.as_ref().is_some_and(|c| !c.image.is_empty());
    if let Some(container) = &info.container {
        container_info(container)?;
    }
    // An image task may leave the command to the image's Entrypoint/Cmd.
    let empty = pb::CommandInfo::default();
    let command = match info.command.as_ref() {
        Some(c) => c,
        None if image => &empty,
        None => return Err(FieldError::new("task.command", "is required")),
    };
    if command.value.is_empty() && !image {
        return Err(FieldError::new("task.command.value", "must not be empty"));
    }
    let size = command.value.len() + command.arguments.iter().map(String::len).sum::<usize>();
    if size > MAX_COMMAND {
        return Err(FieldError::new("task.command", "is longer than 256 KiB"));
    }
    if command
        .arguments
        .iter()
        .chain(std::iter::once(&command.value))
        .any(|a| a.contains('\0'))
    {
        return Err(FieldError::new(
            "task.command",
            "must not contain NUL bytes",
        ));
    }
    env_map(&command.environment, "task.command.environment")?;
    env_map(&info.labels, "task.labels")?;
    if let Some(grace) = info.kill_grace_period_seconds {
        seconds(grace, "task.kill_grace_period_seconds")?;
    }
    if let Some(max) = info.max_completion_time_seconds {
        max_completion_time(max)?;
    }
    health_checks(&info.health_checks)?;
    Ok(ValidTask {
        id,
        info: info.clone(),
        resources,
    })
}

/// Mesos' `max_completion_time`: a zero deadline would kill the task as
/// soon as it starts, so unlike other durations it must be > 0.
fn max_completion_time(value: f64) -> Result<(), FieldError> {
    const FIELD: &str = "task.max_completion_time_seconds";
    if !value.is_finite() || value <= 0.0 {
        return Err(FieldError::new(FIELD, "must be finite and > 0"));
    }
    seconds(value, FIELD).map(drop)
}

/// A task's health checks: at most one of each kind (an unspecified kind is
/// liveness), each with a probe, sane timing and thresholds, and ports and
/// paths the agent can use. Kubernetes' rules where it has them (periods
/// and timeouts > 0, thresholds >= 1, a success threshold of 1 for
/// liveness and startup probes).
fn health_checks(checks: &[pb::HealthCheck]) -> Result<(), FieldError> {
    use pb::health_check::Kind;
    let mut seen = HashSet::new();
    for (i, check) in checks.iter().enumerate() {
        let field = |name: &str| format!("task.health_checks[{i}].{name}");
        let kind = match Kind::try_from(check.kind) {
            Ok(Kind::Unspecified) => Kind::Liveness,
            Ok(kind) => kind,
            Err(_) => {
                return Err(FieldError::new(
                    field("kind"),
                    format!("unknown kind {}", check.kind),
                ));
            }
        };
        let kind_name = kind.as_str_name();
        if !seen.insert(kind) {
            return Err(FieldError::new(
                field("kind"),
                format!("a task has at most one {kind_name} check"),
            ));
        }
        match &check.probe {
            None => {
                return Err(FieldError::new(
                    field("probe"),
                    "is required: command, http or tcp",
                ));
            }
            Some(pb::health_check::Probe::Command(c)) => command_probe(c, &field("command"))?,
            Some(pb::health_check::Probe::Http(h)) => {
                if !h.scheme.is_empty() && h.scheme != "http" {
                    return Err(FieldError::new(
                        field("http.scheme"),
                        format!("must be http ('{}' is not supported)", h.scheme),
                    ));
                }
                port(h.port, &field("http.port"))?;
                if !h.path.is_empty() {
                    text(&h.path, &field("http.path"), true)?;
                    if !h.path.starts_with('/') || h.path.contains(char::is_whitespace) {
                        return Err(FieldError::new(
                            field("http.path"),
                            "must start with '/' and contain no spaces",
                        ));
                    }
                }
            }
            Some(pb::health_check::Probe::Tcp(t)) => port(t.port, &field("tcp.port"))?,
        }
        if let Some(delay) = check.delay_seconds {
            seconds(delay, &field("delay_seconds"))?;
        }
        if let Some(grace) = check.grace_period_seconds {
            seconds(grace, &field("grace_period_seconds"))?;
        }
        for (value, name) in [
            (check.interval_seconds, "interval_seconds"),
            (check.timeout_seconds, "timeout_seconds"),
        ] {
            if let Some(v) = value {
                // Zero would probe in a busy loop, or fail every probe.
                if !v.is_finite() || v <= 0.0 {
                    return Err(FieldError::new(field(name), "must be finite and > 0"));
                }
                seconds(v, &field(name))?;
            }
        }
        if check.consecutive_failures == Some(0) {
            return Err(FieldError::new(
                field("consecutive_failures"),
                "must be >= 1",
            ));
        }
        match check.consecutive_successes {
            Some(0) => {
                return Err(FieldError::new(
                    field("consecutive_successes"),
                    "must be >= 1",
                ));
            }
            Some(n) if n > 1 && kind != Kind::Readiness => {
                return Err(FieldError::new(
                    field("consecutive_successes"),
                    format!("must be 1 for a {kind_name} check"),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A command probe: the rules of the task's own command.
fn command_probe(c: &pb::CommandProbe, field: &str) -> Result<(), FieldError> {
    if c.value.is_empty() && (c.shell || c.arguments.is_empty()) {
        return Err(FieldError::new(
            format!("{field}.value"),
            "must not be empty",
        ));
    }
    let size = c.value.len() + c.arguments.iter().map(String::len).sum::<usize>();
    if size > MAX_COMMAND {
        return Err(FieldError::new(field, "is longer than 256 KiB"));
    }
    if c.arguments
        .iter()
        .chain(std::iter::once(&c.value))
        .any(|a| a.contains('\0'))
    {
        return Err(FieldError::new(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// A TCP port to probe: 1-65535 (0 is "any port" to the kernel).
fn port(value: u32, field: &str) -> Result<(), FieldError> {
    if value == 0 || value > u32::from(u16::MAX) {
        return Err(FieldError::new(field, "must be 1-65535"));
    }
    Ok(())
}

/// `UID[:GID]`, both decimal.
pub fn user(value: &str, field: &str) -> Result<(u32, Option<u32>), FieldError> {
    let parse = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| FieldError::new(field, "must be UID or UID:GID (numbers)"))
    };
    match value.split_once(':') {
        Some((u, g)) => Ok((parse(u)?, Some(parse(g)?))),
        None => Ok((parse(value)?, None)),
    }
}

fn container_info(c: &pb::ContainerInfo) -> Result<(), FieldError> {
    text(&c.image, "task.container.image", false)?;
    if c.image.contains(char::is_whitespace) {
        return Err(FieldError::new(
            "task.container.image",
            "must not contain spaces",
        ));
    }
    if !c.user.is_empty() {
        user(&c.user, "task.container.user")?;
    }
    if !c.working_dir.is_empty() {
        absolute_path(&c.working_dir, "task.container.working_dir")?;
    }
    if c.volumes.len() > MAX_VOLUMES {
        return Err(FieldError::new(
            "task.container.volumes",
            "at most 64 volumes",
        ));
    }
    for (i, v) in c.volumes.iter().enumerate() {
        if v.pod_volume.is_empty() {
            absolute_path(
                &v.host_path,
                &format!("task.container.volumes[{i}].host_path"),
            )?;
        } else if !v.host_path.is_empty() {
            return Err(FieldError::new(
                format!("task.container.volumes[{i}]"),
                "set host_path or pod_volume, not both",
            ));
        } else {
            volume_name(
                &v.pod_volume,
                &format!("task.container.volumes[{i}].pod_volume"),
            )?;
        }
        absolute_path(
            &v.container_path,
            &format!("task.container.volumes[{i}].container_path"),
        )?;
    }
    Ok(())
}

/// Most tasks in one pod (Kubernetes has no limit; a pod is one agent's).
const MAX_POD_TASKS: usize = 64;

/// Checks a LAUNCH_GROUP's pod on its own: every task as [`task`] does
/// (fields named `task_group.tasks[i].…`), unique task ids, unique volume
/// names, and every pod volume a task mounts defined. The master checks the
/// tasks against offers and its state, all or nothing.
pub fn task_group(group: &pb::TaskGroupInfo) -> Result<Vec<ValidTask>, FieldError> {
    if group.tasks.is_empty() {
        return Err(FieldError::new("task_group.tasks", "must not be empty"));
    }
    if group.tasks.len() > MAX_POD_TASKS {
        return Err(FieldError::new("task_group.tasks", "at most 64 tasks"));
    }
    let mut volumes = HashSet::new();
    for (i, v) in group.volumes.iter().enumerate() {
        let field = format!("task_group.volumes[{i}]");
        volume_name(&v.name, &format!("{field}.name"))?;
        if !volumes.insert(v.name.as_str()) {
            return Err(FieldError::new(
                format!("{field}.name"),
                format!("'{}' is defined twice", v.name),
            ));
        }
        match &v.source {
            Some(pb::pod_volume::Source::EmptyDir(_)) => {}
            Some(pb::pod_volume::Source::HostPath(path)) => {
                absolute_path(path, &format!("{field}.host_path"))?;
            }
            Some(pb::pod_volume::Source::Persistent(id)) => {
                corral_proto::VolumeId::parse(id, &format!("{field}.persistent"))?;
            }
            None => {
                return Err(FieldError::new(
                    field,
                    "needs a source: empty_dir, host_path or persistent",
                ));
            }
        }
    }
    let mut ids = HashSet::new();
    let mut valid = Vec::with_capacity(group.tasks.len());
    for (i, info) in group.tasks.iter().enumerate() {
        let prefix = format!("task_group.tasks[{i}]");
        let renamed = |e: FieldError| {
            let field = match e.field.strip_prefix("task") {
                Some(rest) => format!("{prefix}{rest}"),
                None => e.field,
            };
            FieldError::new(field, e.reason)
        };
        let v = task(info).map_err(renamed)?;
        if !ids.insert(v.id.clone()) {
            return Err(FieldError::new(
                format!("{prefix}.task_id"),
                format!("'{}' is used twice in the pod", v.id),
            ));
        }
        let mounts = info.container.iter().flat_map(|c| c.volumes.iter());
        for (j, m) in mounts.enumerate() {
            if !m.pod_volume.is_empty() && !volumes.contains(m.pod_volume.as_str()) {
                return Err(FieldError::new(
                    format!("{prefix}.container.volumes[{j}].pod_volume"),
                    format!("the pod has no volume named '{}'", m.pod_volume),
                ));
            }
        }
        valid.push(v);
    }
    Ok(valid)
}

/// Where a task outside a pod names a pod volume.
pub fn pod_volume_outside_a_pod(info: &pb::TaskInfo) -> Option<FieldError> {
    let volumes = info.container.iter().flat_map(|c| c.volumes.iter());
    volumes
        .enumerate()
        .find(|(_, v)| !v.pod_volume.is_empty())
        .map(|(i, _)| {
            FieldError::new(
                format!("task.container.volumes[{i}].pod_volume"),
                "only the tasks of a pod (LaunchGroup) can mount pod volumes",
            )
        })
}

/// A volume name as Kubernetes has it: a DNS label (lowercase letters,
/// digits and '-', at most 63, starting and ending alphanumeric).
fn volume_name(value: &str, field: &str) -> Result<(), FieldError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!(
                "'{value}' must be 1-63 lowercase letters, digits or '-', starting and ending with a letter or digit"
            ),
        ))
    }
}

/// An absolute path without `..` components.
fn absolute_path(value: &str, field: &str) -> Result<(), FieldError> {
    text(value, field, true)?;
    if !value.starts_with('/') {
        return Err(FieldError::new(field, "must be an absolute path"));
    }
    if value.split('/').any(|c| c == "..") {
        return Err(FieldError::new(field, "must not contain '..'"));
    }
    Ok(())
}

fn env_map(map: &HashMap<String, String>, field: &str) -> Result<(), FieldError> {
    if map.len() > MAX_ENTRIES {
        return Err(FieldError::new(field, "has more than 4096 entries"));
    }
    for (k, v) in map {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                "name must be non-empty without '=' or NUL",
            ));
        }
        if v.contains('\0') {
            return Err(FieldError::new(
                format!("{field}.{k}"),
                "must not contain NUL",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::pb::resource::Value;

    fn scalar(name: &str, v: f64) -> pb::Resource {
        pb::Resource {
            name: name.into(),
            value: Some(Value::Scalar(v)),
        }
    }

    fn good_task() -> pb::TaskInfo {
        pb::TaskInfo {
            task_id: "t1".into(),
            agent_id: "a1".into(),
            resources: vec![scalar("cpus", 0.5), scalar("mem", 64.0)],
            command: Some(pb::CommandInfo {
                shell: true,
                value: "true".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_good_task_passes() {
        let t = task(&good_task()).unwrap();
        assert_eq!(t.resources.to_string(), "cpus:0.5;mem:64");
    }

    #[test]
    fn invalid_amounts_are_errors_naming_the_field() {
        let cases = [
            (
                scalar("cpus", f64::NAN),
                "task.resources.cpus: must be finite",
            ),
            (
                scalar("cpus", f64::INFINITY),
                "task.resources.cpus: must be finite",
            ),
            (scalar("cpus", -1.0), "task.resources.cpus: must be >= 0"),
            (
                scalar("cpus", 0.0),
                "task.resources.cpus: must be finite and > 0",
            ),
            (
                scalar("mem", 0.0),
                "task.resources.mem: must be finite and > 0",
            ),
        ];
        for (bad, want) in cases {
            let mut t = good_task();
            let name = bad.name.clone();
            t.resources.retain(|r| r.name != name);
            t.resources.push(bad);
            let err = task(&t).unwrap_err().to_string();
            assert!(err.starts_with(want), "{err} should start with {want}");
        }
    }

    #[test]
    fn ids_commands_and_env_are_checked() {
        let mut t = good_task();
        t.task_id = "../x".into();
        assert_eq!(task(&t).unwrap_err().field, "task.task_id");
        let mut t = good_task();
        t.command = None;
        assert_eq!(task(&t).unwrap_err().field, "task.command");
        let mut t = good_task();
        if let Some(c) = t.command.as_mut() {
            c.environment.insert("A=B".into(), "x".into());
        }
        assert!(
            task(&t)
                .unwrap_err()
                .field
                .starts_with("task.command.environment")
        );
        let mut t = good_task();
        t.kill_grace_period_seconds = Some(f64::NAN);
        assert_eq!(
            task(&t).unwrap_err().field,
            "task.kill_grace_period_seconds"
        );
    }

    #[test]
    fn max_completion_time_must_be_finite_positive_and_at_most_a_year() {
        for bad in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut t = good_task();
            t.max_completion_time_seconds = Some(bad);
            assert_eq!(
                task(&t).unwrap_err().to_string(),
                "task.max_completion_time_seconds: must be finite and > 0",
                "{bad}"
            );
        }
        let mut t = good_task();
        t.max_completion_time_seconds = Some(MAX_SECONDS * 2.0);
        assert_eq!(
            task(&t).unwrap_err().to_string(),
            "task.max_completion_time_seconds: must be at most one year"
        );
        for good in [0.001, 1.0, MAX_SECONDS] {
            let mut t = good_task();
            t.max_completion_time_seconds = Some(good);
            let valid = task(&t).unwrap();
            assert_eq!(valid.info.max_completion_time_seconds, Some(good));
        }
        assert!(task(&good_task()).is_ok(), "the field is optional");
    }

    fn http_check(kind: pb::health_check::Kind) -> pb::HealthCheck {
        pb::HealthCheck {
            kind: kind as i32,
            probe: Some(pb::health_check::Probe::Http(pb::HttpProbe {
                scheme: "http".into(),
                port: 8080,
                path: "/health".into(),
            })),
            ..Default::default()
        }
    }

    /// The error for `good_task` with these checks.
    fn health_error(checks: Vec<pb::HealthCheck>) -> String {
        let mut t = good_task();
        t.health_checks = checks;
        task(&t).unwrap_err().to_string()
    }

    #[test]
    fn health_checks_of_each_kind_with_every_probe_pass() {
        use pb::health_check::{Kind, Probe};
        let mut t = good_task();
        let mut command = http_check(Kind::Startup);
        command.probe = Some(Probe::Command(pb::CommandProbe {
            shell: true,
            value: "test -f /ready".into(),
            ..Default::default()
        }));
        let mut tcp = http_check(Kind::Readiness);
        tcp.probe = Some(Probe::Tcp(pb::TcpProbe { port: 65535 }));
        tcp.consecutive_successes = Some(3);
        let mut liveness = http_check(Kind::Unspecified);
        liveness.delay_seconds = Some(0.0);
        liveness.interval_seconds = Some(0.1);
        liveness.timeout_seconds = Some(1.0);
        liveness.grace_period_seconds = Some(30.0);
        liveness.consecutive_failures = Some(1);
        liveness.consecutive_successes = Some(1);
        t.health_checks = vec![liveness, tcp, command];
        let valid = task(&t).unwrap();
        assert_eq!(valid.info.health_checks.len(), 3);
    }

    #[test]
    fn health_check_timings_must_be_finite_and_positive() {
        use pb::health_check::Kind;
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut c = http_check(Kind::Liveness);
            c.interval_seconds = Some(bad);
            assert_eq!(
                health_error(vec![c]),
                "task.health_checks[0].interval_seconds: must be finite and > 0",
                "{bad}"
            );
            let mut c = http_check(Kind::Liveness);
            c.timeout_seconds = Some(bad);
            assert_eq!(
                health_error(vec![c]),
                "task.health_checks[0].timeout_seconds: must be finite and > 0",
                "{bad}"
            );
        }
        let mut c = http_check(Kind::Liveness);
        c.interval_seconds = Some(MAX_SECONDS * 2.0);
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].interval_seconds: must be at most one year"
        );
        let mut c = http_check(Kind::Liveness);
        c.delay_seconds = Some(-1.0);
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].delay_seconds: must be >= 0"
        );
        let mut c = http_check(Kind::Liveness);
        c.grace_period_seconds = Some(f64::NAN);
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].grace_period_seconds: must be finite"
        );
    }

    #[test]
    fn health_check_thresholds_must_be_at_least_one_and_one_for_liveness_successes() {
        use pb::health_check::Kind;
        let mut c = http_check(Kind::Readiness);
        c.consecutive_failures = Some(0);
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].consecutive_failures: must be >= 1"
        );
        let mut c = http_check(Kind::Readiness);
        c.consecutive_successes = Some(0);
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].consecutive_successes: must be >= 1"
        );
        for kind in [Kind::Liveness, Kind::Unspecified, Kind::Startup] {
            let mut c = http_check(kind);
            c.consecutive_successes = Some(2);
            let err = health_error(vec![c]);
            assert!(
                err.starts_with("task.health_checks[0].consecutive_successes: must be 1 for a"),
                "{err}"
            );
        }
    }

    #[test]
    fn at_most_one_health_check_of_each_kind_and_unspecified_is_liveness() {
        use pb::health_check::Kind;
        assert_eq!(
            health_error(vec![http_check(Kind::Liveness), http_check(Kind::Liveness)]),
            "task.health_checks[1].kind: a task has at most one LIVENESS check"
        );
        assert_eq!(
            health_error(vec![
                http_check(Kind::Readiness),
                http_check(Kind::Liveness),
                http_check(Kind::Unspecified)
            ]),
            "task.health_checks[2].kind: a task has at most one LIVENESS check"
        );
        let mut c = http_check(Kind::Liveness);
        c.kind = 42;
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].kind: unknown kind 42"
        );
    }

    #[test]
    fn health_check_probes_are_required_and_checked() {
        use pb::health_check::{Kind, Probe};
        let mut c = http_check(Kind::Liveness);
        c.probe = None;
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].probe: is required: command, http or tcp"
        );
        for port in [0, 65536, u32::MAX] {
            let mut c = http_check(Kind::Liveness);
            c.probe = Some(Probe::Tcp(pb::TcpProbe { port }));
            assert_eq!(
                health_error(vec![c]),
                "task.health_checks[0].tcp.port: must be 1-65535",
                "{port}"
            );
            let mut c = http_check(Kind::Liveness);
            if let Some(Probe::Http(h)) = c.probe.as_mut() {
                h.port = port;
            }
            assert_eq!(
                health_error(vec![c]),
                "task.health_checks[0].http.port: must be 1-65535",
                "{port}"
            );
        }
        let mut c = http_check(Kind::Liveness);
        if let Some(Probe::Http(h)) = c.probe.as_mut() {
            h.scheme = "https".into();
        }
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].http.scheme: must be http ('https' is not supported)"
        );
        for path in ["health", "/a b", "/x\n"] {
            let mut c = http_check(Kind::Liveness);
            if let Some(Probe::Http(h)) = c.probe.as_mut() {
                h.path = path.into();
            }
            assert!(
                health_error(vec![c]).starts_with("task.health_checks[0].http.path: "),
                "{path:?}"
            );
        }
        let mut c = http_check(Kind::Liveness);
        c.probe = Some(Probe::Command(pb::CommandProbe {
            shell: true,
            ..Default::default()
        }));
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].command.value: must not be empty"
        );
        let mut c = http_check(Kind::Liveness);
        c.probe = Some(Probe::Command(pb::CommandProbe {
            shell: false,
            value: "/bin/true".into(),
            arguments: vec!["true\0".into()],
        }));
        assert_eq!(
            health_error(vec![c]),
            "task.health_checks[0].command: must not contain NUL bytes"
        );
    }

    #[test]
    fn image_tasks_may_omit_the_command_and_container_fields_are_checked() {
        let mut t = good_task();
        t.command = None;
        t.container = Some(pb::ContainerInfo {
            image: "busybox".into(),
            ..Default::default()
        });
        assert!(task(&t).is_ok());
        let mut c = t.container.clone().unwrap();
        c.volumes.push(pb::Volume {
            host_path: "relative".into(),
            container_path: "/data".into(),
            read_only: true,
            ..Default::default()
        });
        t.container = Some(c.clone());
        assert_eq!(
            task(&t).unwrap_err().field,
            "task.container.volumes[0].host_path"
        );
        c.volumes[0].host_path = "/srv/../etc".into();
        t.container = Some(c.clone());
        assert!(task(&t).unwrap_err().reason.contains(".."));
        c.volumes.clear();
        c.user = "root".into();
        t.container = Some(c);
        assert_eq!(task(&t).unwrap_err().field, "task.container.user");
        assert_eq!(user("1000:100", "u").unwrap(), (1000, Some(100)));
    }

    #[test]
    fn framework_info_defaults_role_and_checks_timeout() {
        let info = pb::FrameworkInfo {
            name: "f".into(),
            ..Default::default()
        };
        assert_eq!(framework_info(&info).unwrap().role, "*");
        let bad = pb::FrameworkInfo {
            name: "f".into(),
            failover_timeout_seconds: -1.0,
            ..Default::default()
        };
        assert_eq!(
            framework_info(&bad).unwrap_err().field,
            "framework_info.failover_timeout_seconds"
        );
        let bad = pb::FrameworkInfo::default();
        assert_eq!(
            framework_info(&bad).unwrap_err().field,
            "framework_info.name"
        );
        assert!(role("a/b", "r").is_err());
    }

    #[test]
    fn refuse_seconds_defaults_and_rejects_nan() {
        let d = std::time::Duration::from_secs(5);
        assert_eq!(refuse_seconds(None, d).unwrap(), d);
        let f = pb::Filters {
            refuse_seconds: Some(f64::NAN),
        };
        assert_eq!(
            refuse_seconds(Some(&f), d).unwrap_err().field,
            "filters.refuse_seconds"
        );
    }
}
