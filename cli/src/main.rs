//! `corral`: the one binary. Servers (`master`, `agent`, `dev`), a one-task
//! framework (`run`, like `mesos-execute`), the batch framework and its
//! client (`batch`), the service framework and its client (`service`) and
//! operator views of `/state` (`agents`, `frameworks`,
//! `tasks`).

mod batch;
mod framework_client;
mod image;
mod logs;
mod run;
mod serve;
mod service;
mod views;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Default master address, as in Mesos (port 5050).
pub const DEFAULT_MASTER: &str = "127.0.0.1:5050";

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "Corral: a two-level cluster resource manager"
)]
struct Cli {
    /// Log format of the servers' logs on stderr (filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CORRAL_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a master.
    Master(serve::MasterArgs),
    /// Run an agent that offers this machine's resources to a master.
    Agent(serve::AgentArgs),
    /// Run a whole single-node cluster (master, one agent, the batch and
    /// the service framework) in one process.
    Dev(serve::DevArgs),
    /// Run one task on the cluster, stream its output, exit with its exit code.
    Run(run::RunArgs),
    /// List the cluster's agents.
    Agents(views::ViewArgs),
    /// List the frameworks.
    Frameworks(views::ViewArgs),
    /// List tasks (add --all for completed ones).
    Tasks(views::TaskArgs),
    /// List persistent volumes: framework, agent, size, the task using it.
    Volumes(views::ViewArgs),
    /// Show a task's stdout (or --stderr), following it with -f.
    Logs(logs::LogsArgs),
    /// Manage the image store of an agent.
    Image(image::ImageArgs),
    /// Batch jobs: submit, list, status, wait, logs, cancel; `serve` runs
    /// the batch framework.
    Batch(batch::BatchArgs),
    /// Long-running services and pods: apply, list, status, scale, restart,
    /// delete; `serve` runs the service framework.
    Service(service::ServiceArgs),
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Agent(_) | Command::Dev(_)) {
        corral_agent::tune_allocator();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("corral: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // Servers log at info; client commands stay quiet unless RUST_LOG says.
    let result = runtime.block_on(async {
        match cli.command {
            Command::Master(args) => {
                init_logging(cli.log_format, "info");
                serve::master(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Agent(args) => {
                init_logging(cli.log_format, "info");
                serve::agent(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Dev(args) => {
                init_logging(cli.log_format, "info");
                serve::dev(args).await.map(|()| ExitCode::SUCCESS)
            }
            Command::Run(args) => {
                init_logging(cli.log_format, "warn");
                run::run(args).await
            }
            Command::Agents(args) => views::agents(args).await.map(|()| ExitCode::SUCCESS),
            Command::Frameworks(args) => views::frameworks(args).await.map(|()| ExitCode::SUCCESS),
            Command::Tasks(args) => views::tasks(args).await.map(|()| ExitCode::SUCCESS),
            Command::Volumes(args) => views::volumes(args).await.map(|()| ExitCode::SUCCESS),
            Command::Logs(args) => logs::logs(args).await.map(|()| ExitCode::SUCCESS),
            Command::Image(args) => image::image(args).await.map(|()| ExitCode::SUCCESS),
            // Prints its own errors, as `corral batch CMD: MESSAGE`.
            Command::Batch(args) => Ok(batch::batch(args, cli.log_format).await),
            // Prints its own errors, as `corral service CMD: MESSAGE`.
            Command::Service(args) => Ok(service::service(args, cli.log_format).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("corral: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
