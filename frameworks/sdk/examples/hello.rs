//! A complete framework: runs N `echo` tasks, prints their status updates,
//! and tears itself down when all of them have ended.
//!
//! ```text
//! cargo run -p corral-sdk --example hello -- --master 127.0.0.1:5050 --tasks 3
//! ```
//!
//! Exits 0 when every task FINISHED, 1 otherwise.

use std::collections::HashSet;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use corral_proto::task::{is_terminal, reason_name, state_name};
use corral_sdk::pb::{self, TaskState};
use corral_sdk::{
    Driver, DriverConfig, FrameworkId, OfferResources, Resources, Scheduler, SchedulerClient,
    TaskBuilder, TaskId, async_trait,
};

#[derive(Parser)]
struct Args {
    /// Master address, host:port.
    #[arg(long, default_value = "127.0.0.1:5050")]
    master: String,
    /// How many tasks to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    tasks: u32,
}

/// Keeps what we do not use away from us for a while: once the tasks are
/// launched we want no more offers.
const NOT_NEEDED: pb::Filters = pb::Filters {
    refuse_seconds: Some(60.0),
};

struct Hello {
    wanted: usize,
    per_task: Resources,
    launched: HashSet<String>,
    finished: HashSet<String>,
    failed: HashSet<String>,
}

#[async_trait]
impl Scheduler for Hello {
    async fn subscribed(&mut self, _client: &SchedulerClient, framework_id: &FrameworkId) {
        println!("subscribed as framework {framework_id}");
    }

    async fn offers(&mut self, client: &SchedulerClient, offers: Vec<pb::Offer>) {
        for offer in offers {
            let Ok(mut left) = OfferResources::from_offer(&offer) else {
                continue; // not a valid offer; nothing we can do with it
            };
            // Carve as many tasks out of the offer as fit and are still wanted.
            let mut tasks = Vec::new();
            while self.launched.len() + tasks.len() < self.wanted && left.try_take(&self.per_task) {
                let id = format!("hello-{}", self.launched.len() + tasks.len());
                let task = TaskBuilder::new(TaskId::generated(id))
                    .shell("echo hello from $CORRAL_TASK_ID")
                    .resources(&self.per_task);
                tasks.push(task.build_for(&offer));
            }
            let offer_ids = [left.offer_id().clone()];
            if tasks.is_empty() {
                let _ = client.decline(&offer_ids, Some(NOT_NEEDED)).await;
                continue;
            }
            let ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
            // The filter applies to what the tasks leave of the offer.
            match client.launch(&offer_ids, tasks, Some(NOT_NEEDED)).await {
                Ok(()) => self.launched.extend(ids),
                Err(e) => eprintln!("launch on agent {} failed: {e}", left.agent_id()),
            }
            if self.launched.len() == self.wanted {
                let _ = client.suppress().await;
            }
        }
    }

    async fn status_update(&mut self, client: &SchedulerClient, status: &pb::TaskStatus) {
        let state = status.state();
        println!(
            "{:<10} {:<14} {} {}",
            status.task_id,
            state_name(state),
            reason_name(status.reason()),
            status.message
        );
        if !self.launched.contains(&status.task_id) || !is_terminal(state) {
            return;
        }
        let id = status.task_id.clone();
        if state == TaskState::TaskFinished {
            self.finished.insert(id);
        } else {
            self.failed.insert(id);
        }
        if self.finished.len() + self.failed.len() == self.wanted {
            // All done: remove the framework. `run` returns once this succeeds.
            if let Err(e) = client.teardown().await {
                eprintln!("teardown failed: {e}");
                client.stop();
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let args = Args::parse();

    let framework = pb::FrameworkInfo {
        name: "hello".into(),
        user: std::env::var("USER").unwrap_or_default(),
        ..Default::default()
    };
    let (driver, _client) = Driver::new(DriverConfig::new(args.master, framework));
    let mut hello = Hello {
        wanted: args.tasks as usize,
        per_task: Resources::parse("cpus:0.1;mem:32")?,
        launched: HashSet::new(),
        finished: HashSet::new(),
        failed: HashSet::new(),
    };
    driver
        .run(&mut hello)
        .await
        .context("framework stopped with an error")?;

    println!(
        "{} finished, {} failed",
        hello.finished.len(),
        hello.failed.len()
    );
    Ok(
        if hello.failed.is_empty() && hello.finished.len() == hello.wanted {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}
