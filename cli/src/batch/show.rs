//! `corral batch list` and `corral batch status`: pure renderers over the
//! API's answers ("now" is an argument), and the two thin commands.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Args;
use corral_proto::pb;
use corral_proto::task::{is_terminal, reason_name, state_name};

use super::{Client, Target};
use crate::views::{fmt_num, render_table};

/// Failed indices `status` lists before it summarizes the rest (`--all`
/// lists them all): a broken 10 000-task job should not flood the terminal.
const FAILURES_SHOWN: usize = 20;
/// Runs of a cron job `status` lists, latest last.
const RUNS_SHOWN: usize = 10;

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// Job id.
    job: String,
    /// List every failed index, not only the first ones.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    target: Target,
}

pub(crate) async fn list(target: Target) -> Result<ExitCode> {
    let mut client = Client::new(&target)?;
    let jobs = client.list().await?;
    print!("{}", render_list(&jobs, now()));
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn status(args: StatusArgs) -> Result<ExitCode> {
    let mut client = Client::new(&args.target)?;
    let status = client.get(&args.job).await?;
    print!("{}", render_status(&status, now(), args.all));
    Ok(ExitCode::SUCCESS)
}

/// Seconds since the Unix epoch, as the API's timestamps.
pub(crate) fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// `RUNNING`, not `JOB_STATE_RUNNING`.
pub(crate) fn job_state_name(state: i32) -> &'static str {
    pb::JobState::try_from(state)
        .unwrap_or(pb::JobState::Unspecified)
        .as_str_name()
        .trim_start_matches("JOB_STATE_")
}

/// A job's array size: 0 on the wire means 1.
pub(crate) fn total(summary: &pb::JobSummary) -> u32 {
    summary.count.max(1)
}

/// `3m`, `2h5m`, `4d`: two units while the first is small, as kubectl's AGE.
pub(crate) fn fmt_span(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (d, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match s {
        0..60 => format!("{s}s"),
        60..600 => format!("{m}m{}s", s % 60),
        600..3600 => format!("{m}m"),
        3600..36_000 => format!("{}h{m}m", s / 3600),
        36_000..86_400 => format!("{}h", s / 3600),
        _ if d < 10 => format!("{d}d{h}h"),
        _ => format!("{d}d"),
    }
}

/// `2024-05-01 12:00:00 UTC` (the proleptic Gregorian calendar, from
/// Howard Hinnant's `civil_from_days`).
pub(crate) fn fmt_utc(seconds: f64) -> String {
    let secs = seconds.floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `in 3m` or `3m ago`.
fn relative(at: f64, now: f64) -> String {
    if at >= now {
        format!("in {}", fmt_span(at - now))
    } else {
        format!("{} ago", fmt_span(now - at))
    }
}

/// The non-zero counts, `1 running, 2 succeeded`, or `nothing started`.
pub(crate) fn fmt_counts(c: &pb::TaskCounts) -> String {
    let parts: Vec<String> = [
        (c.waiting, "waiting"),
        (c.pending, "pending"),
        (c.running, "running"),
        (c.succeeded, "succeeded"),
        (c.failed, "failed"),
        (c.cancelled, "cancelled"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if parts.is_empty() {
        "nothing started".to_string()
    } else {
        parts.join(", ")
    }
}

/// An argv as a shell would need it typed.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn render_list(jobs: &[pb::JobSummary], now: f64) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_string();
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let counts = j.counts.unwrap_or_default();
            let schedule = if j.schedule.is_empty() {
                "-".to_string()
            } else if j.next_run_at > 0.0 {
                format!("{} ({})", j.schedule, relative(j.next_run_at, now))
            } else {
                j.schedule.clone()
            };
            vec![
                j.job_id.clone(),
                job_state_name(j.state).to_string(),
                format!("{}/{}", counts.succeeded, total(j)),
                counts.running.to_string(),
                counts.failed.to_string(),
                j.priority.to_string(),
                schedule,
                fmt_span(now - j.submitted_at),
            ]
        })
        .collect();
    render_table(
        &[
            "ID",
            "STATE",
            "TASKS",
            "RUNNING",
            "FAILED",
            "PRIORITY",
            "SCHEDULE/NEXT RUN",
            "AGE",
        ],
        &rows,
    )
}

/// An index whose latest attempt did not succeed, or that failed without one
/// (a dependency failed).
fn is_failure(index: &pb::IndexStatus) -> bool {
    let failed_attempt = index
        .attempts
        .last()
        .is_some_and(|a| is_terminal(a.state()) && a.state() != pb::TaskState::TaskFinished);
    failed_attempt || index.state() == pb::JobState::Failed
}

fn failure_row(index: &pb::IndexStatus, now: f64) -> Vec<String> {
    let last = index.attempts.last();
    let outcome = match index.state() {
        pb::JobState::Failed => "failed".to_string(),
        pb::JobState::Cancelled => "cancelled".to_string(),
        _ if index.retry_at > 0.0 => format!("retry {}", relative(index.retry_at, now)),
        _ => "retrying".to_string(),
    };
    vec![
        index.index.to_string(),
        index.attempts.len().to_string(),
        outcome,
        last.map(|a| state_name(a.state()).to_string())
            .unwrap_or_else(|| "-".into()),
        last.map(|a| reason_name(a.reason()).to_string())
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| "-".into()),
        last.and_then(|a| a.exit_code)
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into()),
        last.map(|a| a.message.clone()).unwrap_or_default(),
    ]
}

pub(crate) fn render_status(status: &pb::JobStatus, now: f64, all: bool) -> String {
    let summary = status.summary.clone().unwrap_or_default();
    let spec = status.spec.clone().unwrap_or_default();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<11}{value}");
    };
    line("job:", summary.job_id.clone());
    line("state:", job_state_name(summary.state).to_string());
    if !status.message.is_empty() {
        line("message:", status.message.clone());
    }
    let command = if !spec.shell.is_empty() {
        format!("sh -c {}", shell_words(std::slice::from_ref(&spec.shell)))
    } else if !spec.argv.is_empty() {
        shell_words(&spec.argv)
    } else {
        "(the image's)".to_string()
    };
    line("command:", command);
    if !spec.image.is_empty() {
        line("image:", spec.image.clone());
    }
    let mut resources = format!(
        "{} × cpus {}, mem {} MiB",
        total(&summary),
        fmt_num(spec.cpus),
        fmt_num(spec.mem_mib)
    );
    if spec.disk_mib > 0.0 {
        let _ = write!(resources, ", disk {} MiB", fmt_num(spec.disk_mib));
    }
    line("tasks:", resources);
    let mut policy = format!("priority {}, retries {}", summary.priority, spec.retries);
    if spec.deadline_seconds > 0.0 {
        let _ = write!(policy, ", deadline {}", fmt_span(spec.deadline_seconds));
    }
    line("policy:", policy);
    if !spec.after.is_empty() {
        line("after:", spec.after.join(", "));
    }
    if !spec.constraints.is_empty() {
        line("constraints:", spec.constraints.join(", "));
    }
    line(
        "submitted:",
        format!(
            "{} ({})",
            fmt_utc(summary.submitted_at),
            relative(summary.submitted_at, now)
        ),
    );
    if !spec.schedule.is_empty() {
        let zone = if spec.timezone.is_empty() {
            "UTC"
        } else {
            &spec.timezone
        };
        let mut text = format!("{} ({zone})", spec.schedule);
        if summary.next_run_at > 0.0 {
            let _ = write!(
                text,
                ", next run {} ({})",
                fmt_utc(summary.next_run_at),
                relative(summary.next_run_at, now)
            );
        }
        let _ = write!(text, "; runs {}", summary.runs);
        if status.skipped_runs > 0 {
            let _ = write!(
                text,
                ", skipped {} (concurrency forbid)",
                status.skipped_runs
            );
        }
        line("schedule:", text);
    }
    let latest = status.runs.last();
    match latest {
        Some(run) => {
            let counts = run.counts.unwrap_or_default();
            line(
                &format!("run {}:", run.run),
                format!("{} ({})", job_state_name(run.state), fmt_counts(&counts)),
            );
            if !run.message.is_empty() && run.message != status.message {
                line("", run.message.clone());
            }
        }
        None => line("counts:", fmt_counts(&summary.counts.unwrap_or_default())),
    }

    if let Some(run) = latest {
        let failures: Vec<&pb::IndexStatus> = run.tasks.iter().filter(|i| is_failure(i)).collect();
        if !failures.is_empty() {
            let shown = if all {
                failures.len()
            } else {
                failures.len().min(FAILURES_SHOWN)
            };
            let rows: Vec<Vec<String>> = failures[..shown]
                .iter()
                .map(|i| failure_row(i, now))
                .collect();
            let _ = writeln!(out, "\nfailures (run {}):", run.run);
            out.push_str(&render_table(
                &[
                    "INDEX", "ATTEMPTS", "OUTCOME", "LAST", "REASON", "EXIT", "MESSAGE",
                ],
                &rows,
            ));
            if shown < failures.len() {
                let _ = writeln!(
                    out,
                    "… and {} more (--all lists them)",
                    failures.len() - shown
                );
            }
        }
    }

    if !spec.schedule.is_empty() || status.runs.len() > 1 {
        let skip = status.runs.len().saturating_sub(RUNS_SHOWN);
        let rows: Vec<Vec<String>> = status.runs[skip..]
            .iter()
            .map(|r| {
                let counts = r.counts.unwrap_or_default();
                vec![
                    r.run.to_string(),
                    job_state_name(r.state).to_string(),
                    if r.started_at > 0.0 {
                        fmt_utc(r.started_at)
                    } else {
                        "-".into()
                    },
                    if r.finished_at > r.started_at && r.started_at > 0.0 {
                        fmt_span(r.finished_at - r.started_at)
                    } else {
                        "-".into()
                    },
                    fmt_counts(&counts),
                    r.message.clone(),
                ]
            })
            .collect();
        let _ = writeln!(out, "\nruns:");
        if rows.is_empty() {
            out.push_str("none yet\n");
        } else {
            out.push_str(&render_table(
                &["RUN", "STATE", "STARTED", "TOOK", "TASKS", "MESSAGE"],
                &rows,
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: f64 = 1_714_564_800.0; // 2024-05-01 12:00:00 UTC

    fn attempt(state: pb::TaskState, exit: Option<i32>, message: &str) -> pb::Attempt {
        pb::Attempt {
            task_id: "t".into(),
            agent_id: "a".into(),
            state: state as i32,
            reason: pb::Reason::Unspecified as i32,
            message: message.into(),
            exit_code: exit,
            launched_at: NOW - 10.0,
            finished_at: NOW - 5.0,
        }
    }

    fn index(i: u32, state: pb::JobState, attempts: Vec<pb::Attempt>) -> pb::IndexStatus {
        pb::IndexStatus {
            index: i,
            state: state as i32,
            attempts,
            retry_at: 0.0,
        }
    }

    fn failed_job() -> pb::JobStatus {
        let counts = pb::TaskCounts {
            succeeded: 1,
            failed: 1,
            running: 1,
            ..Default::default()
        };
        pb::JobStatus {
            summary: Some(pb::JobSummary {
                job_id: "render".into(),
                state: pb::JobState::Failed as i32,
                counts: Some(counts),
                count: 3,
                submitted_at: NOW - 120.0,
                ..Default::default()
            }),
            spec: Some(pb::JobSpec {
                name: "render".into(),
                argv: vec!["sh".into(), "-c".into(), "exit $X".into()],
                cpus: 0.5,
                mem_mib: 64.0,
                count: 3,
                retries: 1,
                ..Default::default()
            }),
            message: "index 2 failed after 2 attempts".into(),
            runs: vec![pb::RunStatus {
                run: 1,
                state: pb::JobState::Failed as i32,
                counts: Some(counts),
                started_at: NOW - 100.0,
                tasks: vec![
                    index(
                        0,
                        pb::JobState::Succeeded,
                        vec![attempt(pb::TaskState::TaskFinished, Some(0), "")],
                    ),
                    index(
                        1,
                        pb::JobState::Running,
                        vec![attempt(pb::TaskState::TaskRunning, None, "")],
                    ),
                    index(
                        2,
                        pb::JobState::Failed,
                        vec![
                            attempt(pb::TaskState::TaskFailed, Some(3), "first"),
                            attempt(
                                pb::TaskState::TaskFailed,
                                Some(3),
                                "Command exited with status 3",
                            ),
                        ],
                    ),
                ],
                ..Default::default()
            }],
            skipped_runs: 0,
        }
    }

    #[test]
    fn spans_use_two_units_while_small() {
        assert_eq!(fmt_span(5.0), "5s");
        assert_eq!(fmt_span(125.0), "2m5s");
        assert_eq!(fmt_span(1800.0), "30m");
        assert_eq!(fmt_span(3900.0), "1h5m");
        assert_eq!(fmt_span(2.0 * 86_400.0 + 7200.0), "2d2h");
        assert_eq!(fmt_span(30.0 * 86_400.0), "30d");
        assert_eq!(fmt_span(-3.0), "0s");
    }

    #[test]
    fn timestamps_print_as_utc_dates() {
        assert_eq!(fmt_utc(0.0), "1970-01-01 00:00:00 UTC");
        assert_eq!(fmt_utc(NOW), "2024-05-01 12:00:00 UTC");
        assert_eq!(fmt_utc(951_825_599.0), "2000-02-29 11:59:59 UTC");
    }

    #[test]
    fn counts_show_only_what_is_there() {
        let c = pb::TaskCounts {
            running: 2,
            succeeded: 1,
            ..Default::default()
        };
        assert_eq!(fmt_counts(&c), "2 running, 1 succeeded");
        assert_eq!(fmt_counts(&pb::TaskCounts::default()), "nothing started");
    }

    #[test]
    fn argv_is_quoted_as_a_shell_would_need_it() {
        let argv = ["sh", "-c", "echo $X; it's"].map(String::from);
        assert_eq!(shell_words(&argv), r"sh -c 'echo $X; it'\''s'");
    }

    #[test]
    fn the_list_shows_done_of_total_and_the_next_cron_run() {
        let jobs = vec![
            failed_job().summary.unwrap_or_default(),
            pb::JobSummary {
                job_id: "nightly".into(),
                state: pb::JobState::Scheduled as i32,
                count: 0,
                schedule: "0 3 * * *".into(),
                next_run_at: NOW + 180.0,
                submitted_at: NOW - 2.0 * 86_400.0,
                ..Default::default()
            },
        ];
        let table = render_list(&jobs, NOW);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID "), "{table}");
        assert!(lines[0].contains("SCHEDULE/NEXT RUN"), "{table}");
        let words: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            words,
            ["render", "FAILED", "1/3", "1", "1", "0", "-", "2m0s"]
        );
        assert!(lines[2].contains("0 3 * * * (in 3m0s)"), "{table}");
        assert!(lines[2].contains("0/1"), "{table}");
        assert_eq!(render_list(&[], NOW), "no jobs\n");
    }

    #[test]
    fn status_lists_counts_and_each_failure_with_its_reason() {
        let text = render_status(&failed_job(), NOW, false);
        assert!(text.contains("state:     FAILED"), "{text}");
        assert!(
            text.contains("message:   index 2 failed after 2 attempts"),
            "{text}"
        );
        assert!(text.contains("command:   sh -c 'exit $X'"), "{text}");
        assert!(
            text.contains("run 1:     FAILED (1 running, 1 succeeded, 1 failed)"),
            "{text}"
        );
        let failure = text
            .lines()
            .find(|l| l.starts_with("2 "))
            .unwrap_or_else(|| panic!("no row for index 2 in\n{text}"));
        let words: Vec<&str> = failure.split_whitespace().collect();
        assert_eq!(
            words[..6],
            ["2", "2", "failed", "TASK_FAILED", "-", "3"],
            "{failure}"
        );
        assert!(
            failure.ends_with("Command exited with status 3"),
            "{failure}"
        );
        // Succeeded and running indices are not failures; one run needs no run table.
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("0 ") || l.starts_with("1 ")),
            "{text}"
        );
        assert!(!text.contains("runs:"), "{text}");
    }

    #[test]
    fn status_of_a_big_failure_shows_the_first_ones_unless_all() {
        let mut status = failed_job();
        let failed = || {
            index(
                0,
                pb::JobState::Failed,
                vec![attempt(pb::TaskState::TaskFailed, Some(1), "")],
            )
        };
        status.runs[0].tasks = (0..50)
            .map(|i| pb::IndexStatus {
                index: i,
                ..failed()
            })
            .collect();
        let text = render_status(&status, NOW, false);
        assert!(text.contains("… and 30 more"), "{text}");
        let text = render_status(&status, NOW, true);
        assert!(text.lines().any(|l| l.starts_with("49 ")), "{text}");
    }

    #[test]
    fn status_of_a_cron_job_shows_its_next_run_and_skipped_runs() {
        let mut status = failed_job();
        if let Some(s) = status.spec.as_mut() {
            s.schedule = "*/5 * * * *".into();
            s.timezone = "Europe/Berlin".into();
        }
        if let Some(s) = status.summary.as_mut() {
            s.state = pb::JobState::Scheduled as i32;
            s.next_run_at = NOW + 60.0;
            s.runs = 4;
        }
        status.skipped_runs = 2;
        let text = render_status(&status, NOW, false);
        assert!(
            text.contains(
                "schedule:  */5 * * * * (Europe/Berlin), next run 2024-05-01 12:01:00 UTC (in 1m0s); runs 4, skipped 2 (concurrency forbid)"
            ),
            "{text}"
        );
        assert!(text.contains("\nruns:\nRUN"), "{text}");
    }
}
