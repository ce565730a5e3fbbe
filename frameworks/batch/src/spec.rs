//! Job specs: the TOML file users write, the wire form (`pb::JobSpec`) and the
//! validated [`Job`] the scheduler works with.
//!
//! Every check names the field it refuses (`job.cpus: must be finite and > 0`)
//! so a user can fix the spec from the message alone. Validation is the only
//! way to a [`Job`]: the store keeps the wire form and validates it again when
//! it loads, so a spec written by an older version cannot slip past new rules.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use corral_proto::{Amount, Resources, pb};
use corral_sdk::Constraint;
use corral_sdk::spec::MAX_SECONDS;
use serde::Deserialize;

pub use corral_sdk::spec::{MAX_NAME_LEN, parse_duration};

use crate::schedule::Schedule;

/// Largest array job: each index is a record in the store and a row in
/// `corral batch status`; bigger arrays are better split into several jobs.
pub const MAX_COUNT: u32 = 100_000;
/// Retry budget per index; more would hide a broken job for days.
pub const MAX_RETRIES: u32 = 100;
/// Default first retry delay, as Kubernetes Jobs (10 s) and Nomad (15 s)
/// are slower than a batch user waiting at a terminal wants.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// Default cap of the retry delay (Kubernetes' 6 minutes, rounded down).
pub const DEFAULT_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Most `after` dependencies and constraints per job.
const MAX_LIST: usize = 64;
/// Most environment variables per job.
const MAX_ENV: usize = 1024;

/// A spec refused at submission: the field and why.
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

/// What a cron firing does while an earlier run is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concurrency {
    Allow,
    Forbid,
    Replace,
}

/// A validated job spec.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub command: Command,
    pub image: Option<String>,
    pub env: BTreeMap<String, String>,
    /// Per task.
    pub resources: Resources,
    pub count: u32,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    pub deadline: Option<Duration>,
    pub priority: i32,
    pub after: Vec<String>,
    pub schedule: Option<Schedule>,
    pub concurrency: Concurrency,
    pub constraints: Vec<Constraint>,
    pub kill_grace: Option<Duration>,
    /// The wire form, normalized (name filled in, count ≥ 1): what the store
    /// keeps and `corral batch status` shows.
    pub spec: pb::JobSpec,
}

/// Checks a spec from the wire. `name` must already be filled in.
pub fn validate(spec: &pb::JobSpec) -> Result<Job, SpecError> {
    validate_name(&spec.name, "job.name")?;
    let image = (!spec.image.is_empty()).then(|| spec.image.clone());
    if let Some(image) = &image
        && (image.len() > 1024 || image.contains(char::is_whitespace))
    {
        return Err(SpecError::new(
            "job.image",
            "must be an image reference without spaces, at most 1024 bytes",
        ));
    }
    let command = match (spec.shell.is_empty(), spec.argv.is_empty()) {
        (false, false) => {
            return Err(SpecError::new(
                "job.command",
                "give either a shell command or an argv, not both",
            ));
        }
        (false, true) => Command::Shell(spec.shell.clone()),
        (true, false) => {
            if spec.argv[0].is_empty() {
                return Err(SpecError::new("job.argv[0]", "must not be empty"));
            }
            Command::Argv(spec.argv.clone())
        }
        (true, true) if image.is_some() => Command::Image,
        (true, true) => {
            return Err(SpecError::new(
                "job.command",
                "required (or an image whose entrypoint runs)",
            ));
        }
    };
    if spec.env.len() > MAX_ENV {
        return Err(SpecError::new(
            "job.env",
            format!("at most {MAX_ENV} variables"),
        ));
    }
    for key in spec.env.keys() {
        if key.is_empty() || key.contains(['=', '\0']) {
            return Err(SpecError::new(
                format!("job.env.{key}"),
                "names must be non-empty, without '=' or NUL",
            ));
        }
        if key.starts_with("CORRAL_") {
            return Err(SpecError::new(
                format!("job.env.{key}"),
                "CORRAL_* variables are set by Corral",
            ));
        }
    }
    let resources = Resources {
        cpus: positive_amount(spec.cpus, "job.cpus")?,
        mem: positive_amount(spec.mem_mib, "job.mem")?,
        disk: amount(spec.disk_mib, "job.disk")?,
        ..Resources::default()
    };
    let count = match spec.count {
        0 => 1,
        n if n > MAX_COUNT => {
            return Err(SpecError::new(
                "job.count",
                format!("must be at most {MAX_COUNT}"),
            ));
        }
        n => n,
    };
    if spec.retries > MAX_RETRIES {
        return Err(SpecError::new(
            "job.retries",
            format!("must be at most {MAX_RETRIES}"),
        ));
    }
    let retry_backoff = optional_seconds(spec.retry_backoff_seconds, "job.retry_backoff")?
        .unwrap_or(DEFAULT_RETRY_BACKOFF);
    let retry_backoff_max =
        optional_seconds(spec.retry_backoff_max_seconds, "job.retry_backoff_max")?
            .unwrap_or(DEFAULT_RETRY_BACKOFF_MAX)
            .max(retry_backoff);
    let deadline = optional_seconds(spec.deadline_seconds, "job.deadline")?;
    let kill_grace = optional_seconds(spec.kill_grace_period_seconds, "job.kill_grace_period")?;
    if spec.after.len() > MAX_LIST {
        return Err(SpecError::new(
            "job.after",
            format!("at most {MAX_LIST} jobs"),
        ));
    }
    for (i, dep) in spec.after.iter().enumerate() {
        validate_name(dep, &format!("job.after[{i}]"))?;
        if *dep == spec.name {
            return Err(SpecError::new(
                format!("job.after[{i}]"),
                "a job cannot wait for itself",
            ));
        }
    }
    let schedule = if spec.schedule.is_empty() {
        if !spec.timezone.is_empty() {
            return Err(SpecError::new("job.timezone", "only with a schedule"));
        }
        None
    } else {
        if !spec.after.is_empty() {
            return Err(SpecError::new(
                "job.after",
                "a scheduled job cannot also wait for other jobs",
            ));
        }
        Some(Schedule::parse(&spec.schedule, &spec.timezone)?)
    };
    let concurrency = match pb::ConcurrencyPolicy::try_from(spec.concurrency) {
        Ok(pb::ConcurrencyPolicy::Unspecified | pb::ConcurrencyPolicy::Allow) => Concurrency::Allow,
        Ok(pb::ConcurrencyPolicy::Forbid) => Concurrency::Forbid,
        Ok(pb::ConcurrencyPolicy::Replace) => Concurrency::Replace,
        Err(_) => {
            return Err(SpecError::new(
                "job.concurrency",
                format!("unknown policy {}", spec.concurrency),
            ));
        }
    };
    if spec.constraints.len() > MAX_LIST {
        return Err(SpecError::new(
            "job.constraints",
            format!("at most {MAX_LIST} constraints"),
        ));
    }
    let mut constraints = spec
        .constraints
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let field = format!("job.constraints[{i}]");
            let c =
                Constraint::from_str(text).map_err(|e| SpecError::new(&field, e.to_string()))?;
            // The batch scheduler places tasks one offer at a time and does
            // not track where a job's other tasks run.
            if c.depends_on_placements() {
                return Err(SpecError::new(
                    field,
                    format!("'{text}': unique and max_per are for services, not batch jobs"),
                ));
            }
            Ok(c)
        })
        .collect::<Result<Vec<_>, _>>()?;
    // An image needs a containerizing agent; `corral run --image` asks the
    // same. An explicit isolation constraint is left as the user wrote it.
    if image.is_some()
        && !constraints
            .iter()
            .any(|c| c.attribute == corral_sdk::constraint::ISOLATION_ATTRIBUTE)
    {
        constraints.push(Constraint::isolated());
    }
    let mut normalized = spec.clone();
    normalized.count = count;
    Ok(Job {
        name: spec.name.clone(),
        command,
        image,
        env: spec.env.clone().into_iter().collect(),
        resources,
        count,
        retries: spec.retries,
        retry_backoff,
        retry_backoff_max,
        deadline,
        priority: spec.priority,
        after: spec.after.clone(),
        schedule,
        concurrency,
        constraints,
        kill_grace,
        spec: normalized,
    })
}

/// Job names become part of task ids (`NAME.RUN.INDEX.ATTEMPT`), so they are
/// kept to a charset that is safe in ids, file names and metric labels.
pub fn validate_name(name: &str, field: &str) -> Result<(), SpecError> {
    corral_sdk::spec::check_name(name).map_err(|reason| SpecError::new(field, reason))
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

/// 0 means "not set"; anything else must be a sane positive duration.
fn optional_seconds(value: f64, field: &str) -> Result<Option<Duration>, SpecError> {
    if value == 0.0 {
        return Ok(None);
    }
    if !(value.is_finite() && value > 0.0) {
        return Err(SpecError::new(field, "must be finite and > 0"));
    }
    if value > MAX_SECONDS {
        return Err(SpecError::new(field, "must be at most one year"));
    }
    Ok(Some(Duration::from_secs_f64(value)))
}

/// The TOML job file, as users write it:
///
/// ```toml
/// name = "render"
/// command = "render --frame $CORRAL_TASK_INDEX"   # or ["render", "--all"]
/// image = "registry:5000/render:2"                # optional
/// count = 100
/// cpus = 0.5
/// mem = 512                                       # MiB
/// retries = 3
/// retry_backoff = "2s"
/// deadline = "10m"
/// priority = 10
/// after = ["prepare"]
/// constraints = ['zone == "a"']
/// [env]
/// QUALITY = "high"
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: Option<String>,
    command: Option<CommandField>,
    image: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cpus: Option<f64>,
    mem: Option<f64>,
    disk: Option<f64>,
    count: Option<i64>,
    retries: Option<i64>,
    retry_backoff: Option<DurationField>,
    retry_backoff_max: Option<DurationField>,
    deadline: Option<DurationField>,
    priority: Option<i32>,
    #[serde(default)]
    after: Vec<String>,
    schedule: Option<String>,
    timezone: Option<String>,
    concurrency: Option<String>,
    #[serde(default)]
    constraints: Vec<String>,
    kill_grace_period: Option<DurationField>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CommandField {
    Shell(String),
    Argv(Vec<String>),
}

/// `"1m30s"`-free on purpose: a number of seconds or `500ms`, `2s`, `1.5m`,
/// `1h`, `1d`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationField {
    Seconds(f64),
    Text(String),
}

/// Default task size when a job file or the CLI does not say: small enough to
/// pack many per core, as `corral run` does.
pub const DEFAULT_CPUS: f64 = 0.1;
pub const DEFAULT_MEM_MIB: f64 = 32.0;

/// Parses a TOML job file into the wire form. Structural problems (unknown
/// fields, wrong types) fail here; value checks happen in [`validate`] on
/// the server, so every client gets the same rules.
pub fn parse_toml(text: &str) -> Result<pb::JobSpec, SpecError> {
    let file: JobFile = toml::from_str(text).map_err(|e| {
        let reason = e.message().to_string();
        let field = e
            .span()
            .and_then(|span| key_at(text, span.start))
            .map(|key| format!("job.{key}"))
            .unwrap_or_else(|| "job".to_string());
        SpecError::new(field, reason)
    })?;
    let (shell, argv) = match file.command {
        Some(CommandField::Shell(s)) => (s, Vec::new()),
        Some(CommandField::Argv(v)) => (String::new(), v),
        None => (String::new(), Vec::new()),
    };
    let seconds = |d: Option<DurationField>, field: &str| -> Result<f64, SpecError> {
        match d {
            None => Ok(0.0),
            Some(DurationField::Seconds(s)) => Ok(s),
            Some(DurationField::Text(t)) => parse_duration(&t)
                .map(|d| d.as_secs_f64())
                .map_err(|reason| SpecError::new(format!("job.{field}"), reason)),
        }
    };
    let non_negative = |v: Option<i64>, field: &str| -> Result<u32, SpecError> {
        match v {
            None => Ok(0),
            Some(n) => u32::try_from(n)
                .map_err(|_| SpecError::new(format!("job.{field}"), "must be a whole number >= 0")),
        }
    };
    let count = match file.count {
        Some(0) => return Err(SpecError::new("job.count", "must be at least 1")),
        other => non_negative(other, "count")?,
    };
    let concurrency = match file.concurrency.as_deref() {
        None | Some("allow") => pb::ConcurrencyPolicy::Allow,
        Some("forbid") => pb::ConcurrencyPolicy::Forbid,
        Some("replace") => pb::ConcurrencyPolicy::Replace,
        Some(other) => {
            return Err(SpecError::new(
                "job.concurrency",
                format!("'{other}' is not one of allow, forbid, replace"),
            ));
        }
    };
    Ok(pb::JobSpec {
        name: file.name.unwrap_or_default(),
        shell,
        argv,
        image: file.image.unwrap_or_default(),
        env: file.env.into_iter().collect(),
        cpus: file.cpus.unwrap_or(DEFAULT_CPUS),
        mem_mib: file.mem.unwrap_or(DEFAULT_MEM_MIB),
        disk_mib: file.disk.unwrap_or(0.0),
        count,
        retries: non_negative(file.retries, "retries")?,
        retry_backoff_seconds: seconds(file.retry_backoff, "retry_backoff")?,
        retry_backoff_max_seconds: seconds(file.retry_backoff_max, "retry_backoff_max")?,
        deadline_seconds: seconds(file.deadline, "deadline")?,
        priority: file.priority.unwrap_or(0),
        after: file.after,
        schedule: file.schedule.unwrap_or_default(),
        timezone: file.timezone.unwrap_or_default(),
        concurrency: concurrency as i32,
        constraints: file.constraints,
        kill_grace_period_seconds: seconds(file.kill_grace_period, "kill_grace_period")?,
    })
}

/// The key on the line where a TOML error points, for the error's field.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split('=').next()?.trim();
    (!key.is_empty() && !key.starts_with('[') && key.len() < 64).then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml: &str) -> pb::JobSpec {
        parse_toml(toml).unwrap()
    }

    fn error(toml: &str) -> SpecError {
        match parse_toml(toml) {
            Err(e) => e,
            Ok(spec) => validate(&spec).expect_err("spec should be refused"),
        }
    }

    #[test]
    fn a_full_job_file_parses_and_validates() {
        let s = spec(
            r#"
            name = "render"
            command = "render --frame $CORRAL_TASK_INDEX"
            count = 100
            cpus = 0.5
            mem = 512
            retries = 3
            retry_backoff = "2s"
            deadline = "10m"
            priority = 10
            after = ["prepare"]
            constraints = ['zone == "a"']
            [env]
            QUALITY = "high"
            "#,
        );
        let job = validate(&s).unwrap();
        assert_eq!(job.count, 100);
        assert_eq!(
            job.command,
            Command::Shell("render --frame $CORRAL_TASK_INDEX".into())
        );
        assert_eq!(job.resources.cpus, Amount::from_milli(500));
        assert_eq!(job.retry_backoff, Duration::from_secs(2));
        assert_eq!(job.deadline, Some(Duration::from_secs(600)));
        assert_eq!(job.after, vec!["prepare"]);
        assert_eq!(job.constraints[0].value, "a");
        assert_eq!(job.env["QUALITY"], "high");
    }

    #[test]
    fn defaults_fill_in_what_a_short_file_leaves_out() {
        let job = validate(&spec("name = \"x\"\ncommand = [\"/bin/true\"]")).unwrap();
        assert_eq!(job.count, 1);
        assert_eq!(job.command, Command::Argv(vec!["/bin/true".into()]));
        assert_eq!(job.resources.mem, Amount::from_units(32));
        assert_eq!(job.retry_backoff, DEFAULT_RETRY_BACKOFF);
        assert_eq!(job.concurrency, Concurrency::Allow);
        assert!(job.schedule.is_none() && job.deadline.is_none());
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases = [
            ("name = \"x\"\ncommand = \"true\"\ncpus = -1", "job.cpus"),
            ("name = \"x\"\ncommand = \"true\"\ncpus = nan", "job.cpus"),
            ("name = \"x\"\ncommand = \"true\"\nmem = 0", "job.mem"),
            ("name = \"x\"\ncommand = \"true\"\ncount = 0", "job.count"),
            ("name = \"x\"\ncommand = \"true\"\ncount = -5", "job.count"),
            (
                "name = \"x\"\ncommand = \"true\"\ncount = 1000000",
                "job.count",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\nretries = 1000",
                "job.retries",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\nschedule = \"61 * * * *\"",
                "job.schedule",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\nschedule = \"* * * * *\"\ntimezone = \"Mars/Olympus\"",
                "job.timezone",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\ntimezone = \"UTC\"",
                "job.timezone",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\nconcurrency = \"sometimes\"",
                "job.concurrency",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\nafter = [\"x\"]",
                "job.after[0]",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\nafter = [\"a/b\"]",
                "job.after[0]",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\nconstraints = [\"zone\"]",
                "job.constraints[0]",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\nconstraints = [\"hostname unique\"]",
                "job.constraints[0]",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\ndeadline = \"soon\"",
                "job.deadline",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\ndeadline = -3",
                "job.deadline",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\ncolour = \"red\"",
                "job.colour",
            ),
            (
                "name = \"x\"\ncommand = \"true\"\ncpus = \"lots\"",
                "job.cpus",
            ),
            ("name = \"no spaces\"\ncommand = \"true\"", "job.name"),
            ("name = \"x\"", "job.command"),
            ("name = \"x\"\ncommand = [\"\"]", "job.argv[0]"),
            (
                "name = \"x\"\ncommand = \"true\"\n[env]\nCORRAL_TASK_INDEX = \"7\"",
                "job.env.CORRAL_TASK_INDEX",
            ),
        ];
        for (toml, field) in cases {
            let e = error(toml);
            assert_eq!(e.field, field, "{toml}: {e}");
            assert!(!e.reason.is_empty());
        }
    }

    #[test]
    fn an_image_job_may_omit_the_command() {
        let job = validate(&spec("name = \"x\"\nimage = \"busybox:1.35\"")).unwrap();
        assert_eq!(job.command, Command::Image);
        assert_eq!(job.image.as_deref(), Some("busybox:1.35"));
        // Only agents that run containers can run it.
        assert_eq!(job.constraints, vec![Constraint::isolated()]);
    }

    #[test]
    fn cron_jobs_take_a_policy_and_a_time_zone() {
        let job = validate(&spec(
            "name = \"x\"\ncommand = \"true\"\nschedule = \"*/5 * * * *\"\ntimezone = \"Europe/Berlin\"\nconcurrency = \"forbid\"",
        ))
        .unwrap();
        assert!(job.schedule.is_some());
        assert_eq!(job.concurrency, Concurrency::Forbid);
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
