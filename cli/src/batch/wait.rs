//! `corral batch wait JOB`: polls the job until it ends, drawing a progress
//! bar on stderr (plain lines, one per change, when stderr is not a
//! terminal). Exit code 0 if the job succeeded, 1 if it failed or was
//! cancelled, 2 if `--timeout` passed first.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use corral_batch::spec::parse_duration;
use corral_proto::pb;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::time::Instant;

use super::show::{fmt_span, job_state_name, total};
use super::{Client, Target};

/// Time between polls of a small job: quick enough to feel live.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Polls of a huge job are spaced to 4× the time the last answer took (its
/// status lists every index), but never further apart than this.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(2);
/// How long the framework may stay unreachable (a restart, a failover)
/// before `wait` gives up.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(30);
/// Exit code when --timeout passes, distinct from a failed job's 1.
const TIMEOUT_EXIT: u8 = 2;

#[derive(Args)]
pub(crate) struct WaitArgs {
    /// Job id.
    job: String,
    /// Give up after this long (e.g. 90s, 10m, 2h); exit code 2.
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    timeout: Option<Duration>,
    #[command(flatten)]
    target: Target,
}

/// What a poll tells the user.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Not over yet.
    Running,
    Succeeded,
    /// Failed or cancelled, with why.
    Ended(String),
    /// A cron job never ends; waiting for one is a mistake.
    Scheduled(String),
}

/// Decides from one answer whether waiting goes on.
pub(crate) fn outcome(status: &pb::JobStatus) -> Outcome {
    let summary = status.summary.clone().unwrap_or_default();
    let schedule = status
        .spec
        .as_ref()
        .map(|s| s.schedule.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or(&summary.schedule);
    let why = |what: &str| {
        if status.message.is_empty() {
            format!("job {} {what}", summary.job_id)
        } else {
            format!("job {} {what}: {}", summary.job_id, status.message)
        }
    };
    match summary.state() {
        pb::JobState::Succeeded => Outcome::Succeeded,
        pb::JobState::Failed => Outcome::Ended(why("failed")),
        pb::JobState::Cancelled => Outcome::Ended(why("was cancelled")),
        _ if !schedule.is_empty() => Outcome::Scheduled(format!(
            "job {} runs on a schedule ({schedule}) and never ends, so there is nothing to \
             wait for; see `corral batch status {}`",
            summary.job_id, summary.job_id
        )),
        _ => Outcome::Running,
    }
}

/// The progress text after `done/total`: `2 running, 1 failed`, plus what
/// holds the job up.
pub(crate) fn progress_message(status: &pb::JobStatus) -> String {
    let summary = status.summary.clone().unwrap_or_default();
    let c = summary.counts.unwrap_or_default();
    let mut text = format!("{} running, {} failed", c.running, c.failed);
    if c.pending > 0 {
        text.push_str(&format!(", {} pending", c.pending));
    }
    if c.waiting > 0 {
        text.push_str(&format!(", {} waiting", c.waiting));
    }
    match summary.state() {
        pb::JobState::Running => {}
        state => text.push_str(&format!(" [{}]", job_state_name(state as i32))),
    }
    if !status.message.is_empty() {
        text.push_str(&format!(": {}", status.message));
    }
    text
}

/// The bar on a terminal, plain lines otherwise.
struct Progress {
    job: String,
    bar: Option<ProgressBar>,
    last_line: String,
}

impl Progress {
    fn new(job: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = ProgressStyle::with_template(
                "{spinner} {prefix} [{elapsed}] [{bar:30}] {pos}/{len} done, {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::stderr())
                .with_style(style)
                .with_prefix(job.to_string());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Self {
            job: job.to_string(),
            bar,
            last_line: String::new(),
        }
    }

    fn show(&mut self, done: u64, total: u64, message: String) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(message);
            }
            None => {
                let line = format!("{}: {done}/{total} done, {message}", self.job);
                if line != self.last_line {
                    eprintln!("{line}");
                    self.last_line = line;
                }
            }
        }
    }

    fn update(&mut self, status: &pb::JobStatus) {
        let summary = status.summary.clone().unwrap_or_default();
        let done = summary.counts.as_ref().map_or(0, |c| c.succeeded);
        self.show(
            u64::from(done),
            u64::from(total(&summary)),
            progress_message(status),
        );
    }

    /// The final counts, without the state and message that the closing
    /// line gives.
    fn finish(&mut self, status: &pb::JobStatus) {
        let summary = status.summary.clone().unwrap_or_default();
        let c = summary.counts.unwrap_or_default();
        self.show(
            u64::from(c.succeeded),
            u64::from(total(&summary)),
            format!("{} running, {} failed", c.running, c.failed),
        );
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    fn note(&mut self, message: String) {
        match &self.bar {
            Some(bar) => bar.set_message(message),
            None => {
                if message != self.last_line {
                    eprintln!("{}: {message}", self.job);
                    self.last_line = message;
                }
            }
        }
    }

    /// Leaves the last state on screen.
    fn stop(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }
}

pub(crate) async fn wait(args: WaitArgs) -> Result<ExitCode> {
    let mut client = Client::new(&args.target)?;
    let started = Instant::now();
    let deadline = args.timeout.map(|t| started + t);
    let mut progress = Progress::new(&args.job);
    let mut unreachable_since: Option<Instant> = None;
    let mut last_state = String::from("unknown");
    loop {
        let asked = Instant::now();
        match client.get_summary(&args.job).await {
            Ok(status) => {
                unreachable_since = None;
                last_state =
                    job_state_name(status.summary.as_ref().map_or(0, |s| s.state)).to_string();
                match outcome(&status) {
                    Outcome::Running => progress.update(&status),
                    Outcome::Succeeded => {
                        progress.finish(&status);
                        eprintln!(
                            "job {} succeeded in {}",
                            args.job,
                            fmt_span(started.elapsed().as_secs_f64())
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    Outcome::Ended(why) => {
                        progress.finish(&status);
                        eprintln!("corral batch wait: {why}");
                        return Ok(ExitCode::from(1));
                    }
                    Outcome::Scheduled(why) => {
                        progress.stop();
                        bail!("{why}");
                    }
                }
            }
            Err(e) if e.is_unavailable() => {
                let since = *unreachable_since.get_or_insert(asked);
                if since.elapsed() > UNREACHABLE_GRACE {
                    progress.stop();
                    return Err(e.into());
                }
                progress.note("batch framework unreachable, retrying".to_string());
            }
            Err(e) => {
                progress.stop();
                return Err(e.into());
            }
        }
        let mut pause = (asked.elapsed() * 4).clamp(POLL_INTERVAL, MAX_POLL_INTERVAL);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                progress.stop();
                eprintln!(
                    "corral batch wait: timed out after {}; job {} is {last_state}",
                    fmt_span(started.elapsed().as_secs_f64()),
                    args.job
                );
                return Ok(ExitCode::from(TIMEOUT_EXIT));
            }
            pause = pause.min(left);
        }
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: pb::JobState, message: &str, schedule: &str) -> pb::JobStatus {
        pb::JobStatus {
            summary: Some(pb::JobSummary {
                job_id: "j".into(),
                state: state as i32,
                count: 3,
                counts: Some(pb::TaskCounts {
                    running: 2,
                    pending: 1,
                    ..Default::default()
                }),
                schedule: schedule.into(),
                ..Default::default()
            }),
            spec: Some(pb::JobSpec {
                schedule: schedule.into(),
                ..Default::default()
            }),
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_succeeded_job_ends_the_wait_successfully() {
        assert_eq!(
            outcome(&job(pb::JobState::Succeeded, "", "")),
            Outcome::Succeeded
        );
        assert_eq!(
            outcome(&job(pb::JobState::Running, "", "")),
            Outcome::Running
        );
        assert_eq!(
            outcome(&job(pb::JobState::Waiting, "", "")),
            Outcome::Running
        );
        assert_eq!(
            outcome(&job(pb::JobState::Failed, "index 1 failed", "")),
            Outcome::Ended("job j failed: index 1 failed".into())
        );
        assert_eq!(
            outcome(&job(pb::JobState::Cancelled, "", "")),
            Outcome::Ended("job j was cancelled".into())
        );
    }

    #[test]
    fn waiting_for_a_cron_job_is_refused() {
        for state in [pb::JobState::Scheduled, pb::JobState::Running] {
            match outcome(&job(state, "", "*/5 * * * *")) {
                Outcome::Scheduled(why) => assert!(why.contains("schedule"), "{why}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn progress_says_what_holds_the_job_up() {
        assert_eq!(
            progress_message(&job(pb::JobState::Running, "", "")),
            "2 running, 0 failed, 1 pending"
        );
        assert_eq!(
            progress_message(&job(
                pb::JobState::Pending,
                "needs mem 4096, largest offer had 2048",
                ""
            )),
            "2 running, 0 failed, 1 pending [PENDING]: needs mem 4096, largest offer had 2048"
        );
    }
}
