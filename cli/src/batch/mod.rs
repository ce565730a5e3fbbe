//! `corral batch`: the batch framework as its own process (`serve`) and the
//! client commands that talk to its gRPC API (`corral.v1.Batch`): `submit`,
//! `list`, `status`, `wait`, `logs`, `cancel`, `delete`.
//!
//! Modules:
//! - `submit`: flags and job files → `pb::JobSpec` (pure) and the RPC.
//! - `show`: the `list` table and the `status` report (pure renderers).
//! - `wait`: polls a job until it ends, with a progress bar.
//! - `logs`: the output of a job's tasks, read from their agents.
//!
//! Every command prints its errors as `corral batch CMD: MESSAGE`;
//! [`CallError`] (shared with `corral service`) is the one place where a
//! gRPC status becomes that message.

mod logs;
mod show;
mod submit;
mod wait;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use corral_proto::pb;
use corral_proto::pb::batch_client::BatchClient;
use tonic::transport::Channel;

use crate::LogFormat;
pub(crate) use crate::framework_client::CallError;
use crate::framework_client::{self, Api};

/// Where the client commands look for the batch API by default: the port of
/// `corral batch serve` and `corral dev` on this host.
pub const DEFAULT_BATCH: &str = "127.0.0.1:5060";
const API: Api = Api {
    name: "batch",
    flag: "--batch",
    env: "CORRAL_BATCH",
    others: "a master or an agent",
};
/// `status` of a large array job lists every index and attempt: far more
/// than gRPC's default 4 MiB.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;

#[derive(Args)]
pub struct BatchArgs {
    #[command(subcommand)]
    command: BatchCommand,
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Run the batch framework: it registers with the master, schedules the
    /// submitted jobs and serves the batch API.
    Serve(crate::serve::BatchServeArgs),
    /// Submit a job from a TOML file, or from flags and a command after `--`;
    /// prints the job id last.
    Submit(Box<submit::SubmitArgs>),
    /// List the jobs.
    List(Target),
    /// Show a job: its state, task counts, failures and runs.
    Status(show::StatusArgs),
    /// Wait for a job to end, with a progress bar. Exit code 0 if it
    /// succeeded, 1 if it failed or was cancelled, 2 on --timeout.
    Wait(wait::WaitArgs),
    /// Show the stdout (or stderr) of a job's tasks.
    Logs(logs::BatchLogsArgs),
    /// Cancel a job: kill its running tasks and launch no more.
    Cancel(CancelArgs),
    /// Forget a finished job and its records (its name can be used again).
    Delete(CancelArgs),
}

impl BatchCommand {
    fn name(&self) -> &'static str {
        match self {
            Self::Serve(_) => "serve",
            Self::Submit(_) => "submit",
            Self::List(_) => "list",
            Self::Status(_) => "status",
            Self::Wait(_) => "wait",
            Self::Logs(_) => "logs",
            Self::Cancel(_) => "cancel",
            Self::Delete(_) => "delete",
        }
    }
}

/// The batch framework to talk to.
#[derive(Args, Clone)]
pub(crate) struct Target {
    /// Address of the batch framework's API (`corral batch serve` or `corral dev`).
    #[arg(long = "batch", value_name = "ADDR", default_value = DEFAULT_BATCH, env = "CORRAL_BATCH")]
    addr: String,
}

#[derive(Args)]
pub(crate) struct CancelArgs {
    /// Job id.
    job: String,
    #[command(flatten)]
    target: Target,
}

/// Runs one `corral batch` command and prints its error, if any, as
/// `corral batch CMD: MESSAGE`.
pub async fn batch(args: BatchArgs, log_format: LogFormat) -> ExitCode {
    let name = args.command.name();
    let result = match args.command {
        BatchCommand::Serve(args) => {
            crate::init_logging(log_format, "info");
            crate::serve::batch(args).await.map(|()| ExitCode::SUCCESS)
        }
        BatchCommand::Submit(args) => submit::submit(*args).await,
        BatchCommand::List(target) => show::list(target).await,
        BatchCommand::Status(args) => show::status(args).await,
        BatchCommand::Wait(args) => wait::wait(args).await,
        BatchCommand::Logs(args) => logs::logs(args).await,
        BatchCommand::Cancel(args) => cancel(args).await,
        BatchCommand::Delete(args) => delete(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corral batch {name}: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn cancel(args: CancelArgs) -> Result<ExitCode> {
    let mut client = Client::new(&args.target)?;
    client.cancel(&args.job).await?;
    println!("cancelled job {}", args.job);
    Ok(ExitCode::SUCCESS)
}

async fn delete(args: CancelArgs) -> Result<ExitCode> {
    let mut client = Client::new(&args.target)?;
    client.delete(&args.job).await?;
    println!("deleted job {}", args.job);
    Ok(ExitCode::SUCCESS)
}

/// The batch API client. Connects on first use, so an unreachable framework
/// surfaces as an `Unavailable` [`CallError`] like any other failed call.
pub(crate) struct Client {
    inner: BatchClient<Channel>,
    addr: String,
}

impl Client {
    pub(crate) fn new(target: &Target) -> Result<Self> {
        let addr = target.addr.clone();
        let inner = BatchClient::new(framework_client::channel(API, &addr)?)
            .max_decoding_message_size(MAX_MESSAGE);
        Ok(Self { inner, addr })
    }

    fn error(&self, status: tonic::Status) -> CallError {
        CallError::new(API, &self.addr, status)
    }

    pub(crate) async fn submit(&mut self, spec: pb::JobSpec) -> Result<String, CallError> {
        match self
            .inner
            .submit(pb::SubmitJobRequest { spec: Some(spec) })
            .await
        {
            Ok(r) => Ok(r.into_inner().job_id),
            Err(status) => Err(self.error(status)),
        }
    }

    pub(crate) async fn list(&mut self) -> Result<Vec<pb::JobSummary>, CallError> {
        match self.inner.list_jobs(pb::ListJobsRequest {}).await {
            Ok(r) => Ok(r.into_inner().jobs),
            Err(status) => Err(self.error(status)),
        }
    }

    pub(crate) async fn get(&mut self, job: &str) -> Result<pb::JobStatus, CallError> {
        self.get_job(job, false).await
    }

    /// The job without its per-index task lists (for pollers).
    pub(crate) async fn get_summary(&mut self, job: &str) -> Result<pb::JobStatus, CallError> {
        self.get_job(job, true).await
    }

    async fn get_job(&mut self, job: &str, summary_only: bool) -> Result<pb::JobStatus, CallError> {
        match self
            .inner
            .get_job(pb::GetJobRequest {
                job_id: job.to_string(),
                summary_only,
            })
            .await
        {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => Err(self.error(status)),
        }
    }

    pub(crate) async fn delete(&mut self, job: &str) -> Result<(), CallError> {
        match self
            .inner
            .delete_job(pb::DeleteJobRequest {
                job_id: job.to_string(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => Err(self.error(status)),
        }
    }

    pub(crate) async fn cancel(&mut self, job: &str) -> Result<(), CallError> {
        match self
            .inner
            .cancel_job(pb::CancelJobRequest {
                job_id: job.to_string(),
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(status) => Err(self.error(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_address_is_the_frameworks_default_port() {
        assert!(DEFAULT_BATCH.ends_with(&format!(":{}", corral_batch::DEFAULT_PORT)));
    }

    #[test]
    fn an_unreachable_framework_names_the_batch_flag_and_variable() {
        let status = tonic::Status::unavailable("tcp connect error");
        let text = CallError::new(API, DEFAULT_BATCH, status).to_string();
        assert!(text.contains("--batch / CORRAL_BATCH"), "{text}");
        assert!(text.contains("corral batch serve"), "{text}");
    }
}
