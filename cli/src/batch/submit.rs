//! `corral batch submit`: a job from a TOML file or from flags and a
//! command. Values are checked by the framework, not here, so every client
//! gets the same rules and the same messages (`job.cpus: must be …`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use corral_batch::spec::{parse_duration, parse_toml};
use corral_proto::pb;

use super::{Client, Target};

#[derive(Args)]
pub(crate) struct SubmitArgs {
    /// A TOML job file (`-`: standard input). Flags given with it override
    /// the file's values (--env, --after and --constraint add to them).
    #[arg(value_name = "JOB.TOML", conflicts_with = "command")]
    file: Option<PathBuf>,
    #[command(flatten)]
    flags: JobFlags,
    /// The command and its arguments, run directly (use `-- sh -c '...'` for
    /// shell syntax). With --image it may be left out to run the image's own
    /// command.
    #[arg(last = true, num_args = 1.., value_name = "CMD")]
    command: Vec<String>,
    #[command(flatten)]
    target: Target,
}

/// The job, as flags. Those not given keep the value of the file, or the
/// default a job file would get.
#[derive(Args, Default)]
pub(crate) struct JobFlags {
    /// Job name, which is also its id (default: made up by the framework).
    #[arg(long)]
    name: Option<String>,
    /// Number of tasks; each gets CORRAL_TASK_INDEX (0-based) and
    /// CORRAL_TASK_COUNT in its environment [default: 1].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    count: Option<u32>,
    /// CPUs per task [default: 0.1].
    #[arg(long, allow_negative_numbers = true)]
    cpus: Option<f64>,
    /// Memory per task, in MiB [default: 32].
    #[arg(long, allow_negative_numbers = true, value_name = "MIB")]
    mem: Option<f64>,
    /// Disk per task, in MiB.
    #[arg(long, allow_negative_numbers = true, value_name = "MIB")]
    disk: Option<f64>,
    /// Run in a root filesystem from this OCI image.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Environment variable for every task (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Failed attempts of one task that are retried.
    #[arg(long)]
    retries: Option<u32>,
    /// First retry delay, doubling after each failure (e.g. 500ms, 2s) [default: 1s].
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    retry_backoff: Option<Duration>,
    /// Longest retry delay [default: 5m].
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    retry_backoff_max: Option<Duration>,
    /// Longest time one attempt may run before it is killed (e.g. 10m).
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    deadline: Option<Duration>,
    /// Higher runs first; equal priorities run in submission order.
    #[arg(long, allow_negative_numbers = true, value_name = "P")]
    priority: Option<i32>,
    /// Start only once this job has succeeded (repeatable).
    #[arg(long = "after", value_name = "JOB")]
    after: Vec<String>,
    /// Run on a cron schedule: `min hour day-of-month month day-of-week`.
    #[arg(long, value_name = "CRON")]
    schedule: Option<String>,
    /// IANA time zone of --schedule [default: UTC].
    #[arg(long, value_name = "TZ")]
    timezone: Option<String>,
    /// What a scheduled firing does while the previous run is still active.
    #[arg(long, value_enum)]
    concurrency: Option<ConcurrencyArg>,
    /// Only run on agents matching `ATTRIBUTE == VALUE` or `!=` (repeatable).
    #[arg(long = "constraint", value_name = "EXPR")]
    constraints: Vec<String>,
    /// Time between SIGTERM and SIGKILL when a task is killed [default: 3s].
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    kill_grace: Option<Duration>,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub(crate) enum ConcurrencyArg {
    /// Start another run.
    Allow,
    /// Skip the firing.
    Forbid,
    /// Cancel the active run and start a new one.
    Replace,
}

impl From<ConcurrencyArg> for pb::ConcurrencyPolicy {
    fn from(arg: ConcurrencyArg) -> Self {
        match arg {
            ConcurrencyArg::Allow => Self::Allow,
            ConcurrencyArg::Forbid => Self::Forbid,
            ConcurrencyArg::Replace => Self::Replace,
        }
    }
}

/// Builds the spec: the job file's text (if any), then the flags on top, then
/// the command. Without a file, the flags start from what an empty job file
/// gives, so both ways share one set of defaults.
pub(crate) fn job_spec(
    file: Option<&str>,
    flags: &JobFlags,
    command: &[String],
) -> Result<pb::JobSpec> {
    if file.is_none() && command.is_empty() && flags.image.is_none() {
        bail!(
            "give a job file or a command after `--` \
             (e.g. `corral batch submit --count 3 -- sh -c 'echo $CORRAL_TASK_INDEX'`)"
        );
    }
    let mut spec = parse_toml(file.unwrap_or(""))?;
    if !command.is_empty() {
        spec.shell.clear();
        spec.argv = command.to_vec();
    }
    let f = flags;
    if let Some(v) = &f.name {
        spec.name = v.clone();
    }
    if let Some(v) = f.count {
        spec.count = v;
    }
    if let Some(v) = f.cpus {
        spec.cpus = v;
    }
    if let Some(v) = f.mem {
        spec.mem_mib = v;
    }
    if let Some(v) = f.disk {
        spec.disk_mib = v;
    }
    if let Some(v) = &f.image {
        spec.image = v.clone();
    }
    spec.env.extend(crate::run::parse_env(&f.env)?);
    if let Some(v) = f.retries {
        spec.retries = v;
    }
    if let Some(v) = f.retry_backoff {
        spec.retry_backoff_seconds = v.as_secs_f64();
    }
    if let Some(v) = f.retry_backoff_max {
        spec.retry_backoff_max_seconds = v.as_secs_f64();
    }
    if let Some(v) = f.deadline {
        spec.deadline_seconds = v.as_secs_f64();
    }
    if let Some(v) = f.priority {
        spec.priority = v;
    }
    spec.after.extend(f.after.iter().cloned());
    if let Some(v) = &f.schedule {
        spec.schedule = v.clone();
    }
    if let Some(v) = &f.timezone {
        spec.timezone = v.clone();
    }
    if let Some(v) = f.concurrency {
        spec.concurrency = pb::ConcurrencyPolicy::from(v) as i32;
    }
    spec.constraints.extend(f.constraints.iter().cloned());
    if let Some(v) = f.kill_grace {
        spec.kill_grace_period_seconds = v.as_secs_f64();
    }
    Ok(spec)
}

fn read_file(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the job from standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

pub(crate) async fn submit(args: SubmitArgs) -> Result<ExitCode> {
    let text = args.file.as_deref().map(read_file).transpose()?;
    let spec = job_spec(text.as_deref(), &args.flags, &args.command);
    let spec = match &args.file {
        Some(path) => spec.with_context(|| path.display().to_string())?,
        None => spec?,
    };
    let mut client = Client::new(&args.target)?;
    let id = client.submit(spec).await?;
    println!("submitted job {id}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use corral_batch::spec::{DEFAULT_CPUS, DEFAULT_MEM_MIB};

    /// `corral batch submit ARGS...` as the binary would parse it.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        submit: SubmitArgs,
    }

    fn parse(args: &[&str]) -> SubmitArgs {
        match Cli::try_parse_from(std::iter::once("submit").chain(args.iter().copied())) {
            Ok(cli) => cli.submit,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn spec(args: &[&str], file: Option<&str>) -> pb::JobSpec {
        let a = parse(args);
        job_spec(file, &a.flags, &a.command).unwrap_or_else(|e| panic!("{args:?}: {e:#}"))
    }

    #[test]
    fn flags_and_a_command_make_an_array_job() {
        let s = spec(
            &[
                "--name",
                "render",
                "--count",
                "100",
                "--cpus",
                "0.5",
                "--mem",
                "512",
                "--disk",
                "100",
                "--image",
                "busybox:1.35",
                "--env",
                "A=1",
                "--env",
                "B=x=y",
                "--retries",
                "3",
                "--retry-backoff",
                "2s",
                "--deadline",
                "10m",
                "--priority",
                "-5",
                "--after",
                "prep",
                "--after",
                "fetch",
                "--constraint",
                "zone == a",
                "--kill-grace",
                "500ms",
                "--",
                "sh",
                "-c",
                "echo $CORRAL_TASK_INDEX",
            ],
            None,
        );
        assert_eq!(s.name, "render");
        assert_eq!(s.argv, ["sh", "-c", "echo $CORRAL_TASK_INDEX"]);
        assert!(s.shell.is_empty());
        assert_eq!(
            (s.count, s.cpus, s.mem_mib, s.disk_mib),
            (100, 0.5, 512.0, 100.0)
        );
        assert_eq!(s.image, "busybox:1.35");
        assert_eq!(s.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(s.env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(s.retries, 3);
        assert_eq!(s.retry_backoff_seconds, 2.0);
        assert_eq!(s.deadline_seconds, 600.0);
        assert_eq!(s.priority, -5);
        assert_eq!(s.after, ["prep", "fetch"]);
        assert_eq!(s.constraints, ["zone == a"]);
        assert_eq!(s.kill_grace_period_seconds, 0.5);
    }

    #[test]
    fn flags_not_given_take_the_job_file_defaults() {
        let s = spec(&["--", "true"], None);
        assert_eq!(s, {
            let mut d = parse_toml("").unwrap_or_default();
            d.argv = vec!["true".into()];
            d
        });
        assert_eq!((s.cpus, s.mem_mib), (DEFAULT_CPUS, DEFAULT_MEM_MIB));
        assert_eq!(s.count, 0, "the framework reads 0 as 1");
        assert_eq!(s.concurrency, pb::ConcurrencyPolicy::Allow as i32);
        assert!(s.name.is_empty(), "the framework makes a name up");
    }

    #[test]
    fn cron_flags_set_schedule_zone_and_policy() {
        let s = spec(
            &[
                "--schedule",
                "*/5 * * * *",
                "--timezone",
                "Europe/Berlin",
                "--concurrency",
                "forbid",
                "--",
                "date",
            ],
            None,
        );
        assert_eq!(s.schedule, "*/5 * * * *");
        assert_eq!(s.timezone, "Europe/Berlin");
        assert_eq!(s.concurrency, pb::ConcurrencyPolicy::Forbid as i32);
        let s = spec(&["--concurrency", "replace", "--", "date"], None);
        assert_eq!(s.concurrency, pb::ConcurrencyPolicy::Replace as i32);
    }

    #[test]
    fn values_are_left_for_the_framework_to_judge() {
        // Negative numbers are values, not flags; the framework names the field.
        let s = spec(&["--cpus", "-1", "--mem", "-2", "--", "true"], None);
        assert_eq!((s.cpus, s.mem_mib), (-1.0, -2.0));
    }

    #[test]
    fn a_job_file_is_read_and_flags_override_it() {
        let file = r#"
            name = "render"
            command = "render --frame $CORRAL_TASK_INDEX"
            count = 10
            cpus = 2
            retries = 1
            deadline = "1m"
            after = ["prep"]
            constraints = ["zone == a"]
            [env]
            QUALITY = "high"
            MODE = "fast"
        "#;
        let s = spec(&["job.toml"], Some(file));
        assert_eq!(s.name, "render");
        assert_eq!(s.shell, "render --frame $CORRAL_TASK_INDEX");
        assert!(s.argv.is_empty());
        assert_eq!((s.count, s.cpus, s.mem_mib), (10, 2.0, DEFAULT_MEM_MIB));
        assert_eq!(s.deadline_seconds, 60.0);

        let s = spec(
            &[
                "job.toml",
                "--name",
                "render-2",
                "--count",
                "3",
                "--env",
                "MODE=slow",
                "--after",
                "fetch",
                "--constraint",
                "rack != r1",
            ],
            Some(file),
        );
        assert_eq!((s.name.as_str(), s.count, s.cpus), ("render-2", 3, 2.0));
        assert_eq!(s.env.get("MODE").map(String::as_str), Some("slow"));
        assert_eq!(s.env.get("QUALITY").map(String::as_str), Some("high"));
        assert_eq!(s.after, ["prep", "fetch"]);
        assert_eq!(s.constraints, ["zone == a", "rack != r1"]);
        assert_eq!(s.shell, "render --frame $CORRAL_TASK_INDEX");
    }

    #[test]
    fn job_file_errors_name_the_field() {
        let a = parse(&["job.toml"]);
        let e = job_spec(
            Some("command = \"true\"\ncolour = \"red\""),
            &a.flags,
            &a.command,
        )
        .err()
        .map(|e| format!("{e:#}"));
        assert!(
            e.as_deref().is_some_and(|e| e.starts_with("job.colour: ")),
            "{e:?}"
        );
    }

    #[test]
    fn a_file_and_a_command_do_not_mix_and_one_is_needed() {
        let args = ["submit", "job.toml", "--", "true"];
        assert!(Cli::try_parse_from(args).is_err());
        let a = parse(&["--count", "3"]);
        let e = job_spec(None, &a.flags, &a.command)
            .err()
            .map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("give a job file or a command")));
        // An image may bring its own command.
        let s = spec(&["--image", "busybox:1.35"], None);
        assert!(s.argv.is_empty() && s.shell.is_empty());
    }

    #[test]
    fn bad_flags_are_refused_while_parsing() {
        for args in [
            &["submit", "--count", "0", "--", "true"][..],
            &["submit", "--concurrency", "sometimes", "--", "true"],
            &["submit", "--deadline", "soon", "--", "true"],
            &["submit", "--retries", "-1", "--", "true"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
        let a = parse(&["--env", "NOPE", "--", "true"]);
        assert!(job_spec(None, &a.flags, &a.command).is_err());
    }
}

#[cfg(test)]
mod readme {
    /// The README's job file example is one the framework accepts.
    #[test]
    fn the_readme_job_file_is_valid() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\nname = ")
            .map(|i| i + "```toml\n".len())
            .unwrap_or_else(|| panic!("no job file example in README.md"));
        let end = start + readme[start..].find("```").unwrap_or(0);
        let spec = corral_batch::spec::parse_toml(&readme[start..end])
            .unwrap_or_else(|e| panic!("README job file: {e}"));
        if let Err(e) = corral_batch::spec::validate(&spec) {
            panic!("README job file: {e}");
        }
        assert_eq!((spec.name.as_str(), spec.count), ("render", 100));
    }
}
