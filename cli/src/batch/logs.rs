//! `corral batch logs JOB [--index I] [--stderr] [--run N]`: the output of
//! the latest attempt of each index, read from the agent that ran it as
//! `corral logs TASK` does (the master says which agent and framework).

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_master::state::StateSnapshot;
use corral_proto::pb;
use tokio::io::AsyncWriteExt;

use super::{Client, Target};
use crate::DEFAULT_MASTER;
use crate::logs::{LogFile, agent_address, copy_file, find_task};
use crate::views::fetch_state;

#[derive(Args)]
pub(crate) struct BatchLogsArgs {
    /// Job id.
    job: String,
    /// Only this index of the array.
    #[arg(long, value_name = "I")]
    index: Option<u32>,
    /// Show stderr instead of stdout.
    #[arg(long)]
    stderr: bool,
    /// This run of a cron job (default: the latest).
    #[arg(long, value_name = "N")]
    run: Option<u32>,
    /// Framework id of the batch framework, when several frameworks have
    /// tasks with the same ids.
    #[arg(long)]
    framework: Option<String>,
    /// Master to ask where the tasks ran (HOST:PORT, or several separated
    /// by commas).
    #[arg(long, default_value = DEFAULT_MASTER, env = "CORRAL_MASTER")]
    master: String,
    #[command(flatten)]
    target: Target,
}

/// One index to show and its latest attempt (None: not launched yet).
pub(crate) struct Shown<'a> {
    index: u32,
    attempt: Option<&'a pb::Attempt>,
}

/// The indices to show of run `run` (default: the latest).
pub(crate) fn select(
    status: &pb::JobStatus,
    run: Option<u32>,
    index: Option<u32>,
) -> Result<Vec<Shown<'_>>> {
    let job = status
        .summary
        .as_ref()
        .map(|s| s.job_id.as_str())
        .unwrap_or_default();
    let chosen = match run {
        None => status
            .runs
            .last()
            .with_context(|| format!("job {job} has not started a run yet"))?,
        Some(n) => match status.runs.iter().find(|r| r.run == n) {
            Some(r) => r,
            None => {
                let kept: Vec<String> = status.runs.iter().map(|r| r.run.to_string()).collect();
                bail!(
                    "job {job} has no run {n} (runs kept: {})",
                    if kept.is_empty() {
                        "none".to_string()
                    } else {
                        kept.join(", ")
                    }
                );
            }
        },
    };
    let tasks: Vec<Shown<'_>> = chosen
        .tasks
        .iter()
        .filter(|t| index.is_none_or(|i| t.index == i))
        .map(|t| Shown {
            index: t.index,
            attempt: t.attempts.last(),
        })
        .collect();
    if let Some(i) = index {
        match tasks.first().map(|t| t.attempt) {
            None => bail!("job {job} has no index {i} in run {}", chosen.run),
            Some(None) => bail!(
                "index {i} of job {job} has not been launched yet (see `corral batch status {job}`)"
            ),
            Some(_) => {}
        }
    }
    Ok(tasks)
}

/// Where an attempt's sandbox is: its agent's address and the framework id.
fn locate<'a>(
    state: &'a StateSnapshot,
    attempt: &pb::Attempt,
    framework: Option<&str>,
) -> Result<(&'a str, String)> {
    let task = find_task(state, &attempt.task_id, framework)?;
    let framework_id = match (task, framework) {
        (Some(t), _) => t.framework_id.clone(),
        (None, Some(f)) => f.to_string(),
        (None, None) => bail!(
            "the master no longer knows task {} (give its framework with --framework)",
            attempt.task_id
        ),
    };
    Ok((agent_address(state, &attempt.agent_id)?, framework_id))
}

pub(crate) async fn logs(args: BatchLogsArgs) -> Result<ExitCode> {
    let mut client = Client::new(&args.target)?;
    let status = client.get(&args.job).await?;
    let tasks = select(&status, args.run, args.index)?;
    let state = fetch_state(&args.master).await?;
    let file = LogFile::new(args.stderr);
    let headers = tasks.len() > 1;
    // Once one task told us the framework id, it holds for the job's
    // other tasks, also those the master has forgotten.
    let mut framework = args.framework.clone();
    let mut failed = 0;
    let mut out = tokio::io::stdout();
    for (n, Shown { index, attempt }) in tasks.into_iter().enumerate() {
        if headers {
            let header = match attempt {
                Some(a) => format!("==> index {index} (task {}) <==", a.task_id),
                None => format!("==> index {index} (not launched yet) <=="),
            };
            let gap = if n == 0 { "" } else { "\n" };
            out.write_all(format!("{gap}{header}\n").as_bytes()).await?;
            out.flush().await?;
        }
        let Some(attempt) = attempt else { continue };
        let result = async {
            let (address, framework_id) = locate(&state, attempt, framework.as_deref())?;
            copy_file(
                address,
                &framework_id,
                &attempt.task_id,
                file,
                false,
                &mut out,
            )
            .await?;
            Ok::<_, anyhow::Error>(framework_id)
        }
        .await;
        let result = result.map(|framework_id| {
            framework.get_or_insert(framework_id);
        });
        if let Err(e) = result {
            // With one index that is the command's error; with several, the
            // others are still worth reading.
            if !headers {
                return Err(e.context(format!("index {index} (task {})", attempt.task_id)));
            }
            eprintln!(
                "corral batch logs: index {index} (task {}): {e:#}",
                attempt.task_id
            );
            failed += 1;
        }
    }
    if failed > 0 {
        bail!("could not read the {} of {failed} tasks", file.name());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(task: &str) -> pb::Attempt {
        pb::Attempt {
            task_id: task.into(),
            ..Default::default()
        }
    }

    fn run(n: u32, tasks: Vec<(u32, Vec<pb::Attempt>)>) -> pb::RunStatus {
        pb::RunStatus {
            run: n,
            tasks: tasks
                .into_iter()
                .map(|(index, attempts)| pb::IndexStatus {
                    index,
                    attempts,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn status() -> pb::JobStatus {
        pb::JobStatus {
            summary: Some(pb::JobSummary {
                job_id: "j".into(),
                ..Default::default()
            }),
            runs: vec![
                run(1, vec![(0, vec![attempt("j.1.0.0")])]),
                run(
                    2,
                    vec![
                        (0, vec![attempt("j.2.0.0"), attempt("j.2.0.1")]),
                        (1, vec![]),
                    ],
                ),
            ],
            ..Default::default()
        }
    }

    fn ids(tasks: &[Shown<'_>]) -> Vec<(u32, Option<String>)> {
        tasks
            .iter()
            .map(|t| (t.index, t.attempt.map(|a| a.task_id.clone())))
            .collect()
    }

    #[test]
    fn logs_read_the_latest_attempt_of_each_index_of_the_latest_run() {
        let s = status();
        let tasks = select(&s, None, None).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(ids(&tasks), [(0, Some("j.2.0.1".to_string())), (1, None)]);
        let tasks = select(&s, Some(1), Some(0)).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(ids(&tasks), [(0, Some("j.1.0.0".to_string()))]);
    }

    #[test]
    fn missing_runs_and_unlaunched_indices_are_explained() {
        let s = status();
        let e = select(&s, Some(7), None).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("job j has no run 7 (runs kept: 1, 2)"));
        let e = select(&s, None, Some(1)).err().map(|e| e.to_string());
        assert!(e.is_some_and(|e| e.contains("not been launched")));
        assert!(select(&s, None, Some(9)).is_err());
        let empty = pb::JobStatus::default();
        assert!(select(&empty, None, None).is_err());
    }
}
