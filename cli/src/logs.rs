//! `corral logs TASK [-f] [--stderr]`: a task's output, streamed through
//! the agent that runs (or ran) it. [`find_task`], [`agent_address`] and
//! [`copy_file`] are shared with `corral run` and `corral batch logs`.

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_master::state::{StateSnapshot, TaskState};
use corral_proto::pb;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::DEFAULT_MASTER;
use crate::views::fetch_state;

#[derive(Args)]
pub struct LogsArgs {
    /// Task id.
    task: String,
    /// Keep streaming until the task ends.
    #[arg(short, long)]
    follow: bool,
    /// Show stderr instead of stdout.
    #[arg(long)]
    stderr: bool,
    /// Framework of the task, when several frameworks have a task with this id.
    #[arg(long)]
    framework: Option<String>,
    /// Master to ask where the task runs (HOST:PORT, or several separated
    /// by commas).
    #[arg(long, default_value = DEFAULT_MASTER, env = "CORRAL_MASTER")]
    master: String,
}

/// The sandbox file to read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LogFile {
    Stdout,
    Stderr,
}

impl LogFile {
    pub fn new(stderr: bool) -> Self {
        if stderr { Self::Stderr } else { Self::Stdout }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// The task `task_id` in the master's state (running or completed), of
/// `framework` when given. `Ok(None)` when the master does not know it
/// (any more); an error when several frameworks have a task with this id.
pub fn find_task<'a>(
    state: &'a StateSnapshot,
    task_id: &str,
    framework: Option<&str>,
) -> Result<Option<&'a TaskState>> {
    let mut found: Vec<&TaskState> = state
        .tasks
        .iter()
        .chain(state.completed_tasks.iter())
        .filter(|t| t.id == task_id)
        .filter(|t| framework.is_none_or(|f| t.framework_id == f))
        .collect();
    found.dedup_by(|a, b| a.framework_id == b.framework_id);
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        many => bail!(
            "several frameworks have a task '{task_id}': {}; pick one with --framework",
            many.iter()
                .map(|t| t.framework_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Where the agent `agent_id` serves its API, from the master's state.
pub fn agent_address<'a>(state: &'a StateSnapshot, agent_id: &str) -> Result<&'a str> {
    state
        .agents
        .iter()
        .find(|a| a.id == agent_id)
        .map(|a| a.address.as_str())
        .with_context(|| format!("agent {agent_id} is no longer known to the master"))
}

/// Copies one sandbox file of a task from its agent to `out`; with `follow`
/// until the agent ends the stream (task terminal and file drained).
pub async fn copy_file(
    agent_address: &str,
    framework_id: &str,
    task_id: &str,
    file: LogFile,
    follow: bool,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<()> {
    let mut client = pb::agent_client::AgentClient::connect(format!("http://{agent_address}"))
        .await
        .with_context(|| format!("cannot reach the agent at {agent_address}"))?;
    let mut stream = client
        .read_file(pb::ReadFileRequest {
            framework_id: framework_id.to_string(),
            task_id: task_id.to_string(),
            file: file.name().to_string(),
            offset: 0,
            follow,
        })
        .await
        .with_context(|| format!("reading the {} of task {task_id}", file.name()))?
        .into_inner();
    while let Some(chunk) = stream
        .message()
        .await
        .with_context(|| format!("reading the {} of task {task_id}", file.name()))?
    {
        out.write_all(&chunk.data).await?;
        out.flush().await?;
    }
    Ok(())
}

pub async fn logs(args: LogsArgs) -> Result<()> {
    let state = fetch_state(&args.master).await?;
    let task = find_task(&state, &args.task, args.framework.as_deref())?.with_context(|| {
        format!(
            "no task '{}' known to the master at {}",
            args.task, args.master
        )
    })?;
    let address = agent_address(&state, &task.agent_id)
        .with_context(|| format!("cannot read the logs of task {}", task.id))?;
    copy_file(
        address,
        &task.framework_id,
        &task.id,
        LogFile::new(args.stderr),
        args.follow,
        &mut tokio::io::stdout(),
    )
    .await
}
