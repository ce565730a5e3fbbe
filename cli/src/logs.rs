//! `corral logs TASK [-f] [--stderr]`: a task's output, streamed through
//! the agent that runs (or ran) it.

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_proto::pb;
use tokio::io::AsyncWriteExt;

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
    /// Master to ask where the task runs.
    #[arg(long, default_value = DEFAULT_MASTER, env = "CORRAL_MASTER")]
    master: String,
}

pub async fn logs(args: LogsArgs) -> Result<()> {
    let state = fetch_state(&args.master).await?;
    let mut found: Vec<_> = state
        .tasks
        .iter()
        .chain(state.completed_tasks.iter())
        .filter(|t| t.id == args.task)
        .filter(|t| args.framework.as_ref().is_none_or(|f| &t.framework_id == f))
        .collect();
    found.dedup_by(|a, b| a.framework_id == b.framework_id);
    let task = match found.as_slice() {
        [] => bail!(
            "no task '{}' known to the master at {}",
            args.task,
            args.master
        ),
        [one] => *one,
        many => bail!(
            "several frameworks have a task '{}': {}; pick one with --framework",
            args.task,
            many.iter()
                .map(|t| t.framework_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let agent = state
        .agents
        .iter()
        .find(|a| a.id == task.agent_id)
        .with_context(|| {
            format!(
                "agent {} of task {} is no longer known",
                task.agent_id, task.id
            )
        })?;
    let mut client = pb::agent_client::AgentClient::connect(format!("http://{}", agent.address))
        .await
        .with_context(|| format!("cannot reach agent {} at {}", agent.id, agent.address))?;
    let file = if args.stderr { "stderr" } else { "stdout" };
    let mut stream = client
        .read_file(pb::ReadFileRequest {
            framework_id: task.framework_id.clone(),
            task_id: task.id.clone(),
            file: file.to_string(),
            offset: 0,
            follow: args.follow,
        })
        .await
        .with_context(|| format!("reading the {file} of task {}", task.id))?
        .into_inner();
    let mut out = tokio::io::stdout();
    while let Some(chunk) = stream.message().await? {
        out.write_all(&chunk.data).await?;
        out.flush().await?;
    }
    Ok(())
}
