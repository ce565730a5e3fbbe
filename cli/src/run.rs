//! `corral run -- CMD...`: a one-task framework, like `mesos-execute`.
//! It subscribes, launches the command on the first offer that fits,
//! streams the task's stdout/stderr from the agent, and exits with the
//! task's exit code.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use clap::Args;
use corral_proto::task::{is_terminal, reason_name, state_name};
use corral_proto::{OfferId, Resources, TaskId, pb};
use corral_sdk::{Constraint, Driver, DriverConfig, Scheduler, SchedulerClient, TaskBuilder};
use tokio::sync::mpsc;

use crate::DEFAULT_MASTER;
use crate::logs::{LogFile, copy_file};

/// Long decline filter for offers we cannot use: we need one offer only.
const DECLINE_SECONDS: f64 = 60.0;
/// After this long without a fitting offer, say what we are waiting for.
const WAITING_HINT_AFTER: Duration = Duration::from_secs(5);
/// How long to keep draining the task's output after it ended.
const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct RunArgs {
    /// Master to submit to: HOST:PORT, or several separated by commas (the
    /// run follows the leader).
    #[arg(long, default_value = DEFAULT_MASTER, env = "CORRAL_MASTER")]
    master: String,
    /// CPUs for the task.
    #[arg(long, default_value_t = 0.1)]
    cpus: f64,
    /// Memory for the task, in MiB.
    #[arg(long, default_value_t = 32.0)]
    mem: f64,
    /// Disk for the task, in MiB.
    #[arg(long, default_value_t = 0.0)]
    disk: f64,
    /// Task name (the task id is NAME-<random>).
    #[arg(long, default_value = "corral-run")]
    name: String,
    /// Environment variable for the task (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Time between SIGTERM and SIGKILL when the task is killed (e.g. 3s).
    #[arg(long, value_parser = crate::serve::parse_duration)]
    kill_grace: Option<Duration>,
    /// Framework role.
    #[arg(long, default_value = "*")]
    role: String,
    /// Run in a root filesystem from this OCI image (imported or pulled by
    /// the agent); its Entrypoint/Cmd/Env/WorkingDir/User apply.
    #[arg(long)]
    image: Option<String>,
    /// Mount a host path: HOST:CONTAINER[:ro] (repeatable; the agent allows
    /// only paths under its --allowed-host-paths).
    #[arg(long = "volume", value_name = "HOST:CONTAINER[:ro]")]
    volumes: Vec<String>,
    /// Run as UID[:GID] inside the container.
    #[arg(long)]
    user: Option<String>,
    /// Only run on agents matching `ATTRIBUTE == VALUE` or `!=` (repeatable),
    /// e.g. "zone == a" or "isolation == container".
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// The command and its arguments (run directly, not through a shell;
    /// use `-- sh -c '...'` for shell syntax). With --image it may be left
    /// out to run the image's own command, and it replaces the image's Cmd.
    #[arg(last = true, num_args = 1..)]
    command: Vec<String>,
}

/// Parses `HOST:CONTAINER[:ro|:rw]`.
fn parse_volume(text: &str) -> Result<(String, String, bool)> {
    let parts: Vec<&str> = text.split(':').collect();
    let (host, container, read_only) = match parts.as_slice() {
        [h, c] => (*h, *c, false),
        [h, c, "ro"] => (*h, *c, true),
        [h, c, "rw"] => (*h, *c, false),
        _ => bail!("--volume: '{text}' is not HOST:CONTAINER[:ro]"),
    };
    if !host.starts_with('/') || !container.starts_with('/') {
        bail!("--volume: '{text}': both paths must be absolute");
    }
    Ok((host.to_string(), container.to_string(), read_only))
}

enum RunEvent {
    Launched { agent_address: String },
    Status(pb::TaskStatus),
    Error(String),
}

struct OneTask {
    task: Option<TaskBuilder>,
    needed: Resources,
    constraints: Vec<Constraint>,
    task_id: TaskId,
    events: mpsc::UnboundedSender<RunEvent>,
    largest: Option<Resources>,
    started: tokio::time::Instant,
    hinted: bool,
}

#[async_trait::async_trait]
impl Scheduler for OneTask {
    async fn offers(&mut self, client: &SchedulerClient, offers: Vec<pb::Offer>) {
        let mut decline: Vec<OfferId> = Vec::new();
        for offer in offers {
            let Ok(id) = OfferId::parse(&offer.id, "offer.id") else {
                continue;
            };
            let fits = Resources::from_proto(&offer.resources, "offer.resources")
                .map(|r| {
                    if self.largest.as_ref().is_none_or(|l| r.mem > l.mem) {
                        self.largest = Some(r.clone());
                    }
                    r.contains(&self.needed)
                })
                .unwrap_or(false);
            let fits = fits && corral_sdk::constraint::all_match(&self.constraints, &offer);
            if fits && self.task.is_some() {
                let Some(builder) = self.task.take() else {
                    continue;
                };
                let info = builder.build_for(&offer);
                let filters = pb::Filters {
                    refuse_seconds: Some(DECLINE_SECONDS),
                };
                match client.launch(&[id], vec![info], Some(filters)).await {
                    Ok(()) => {
                        let _ = self.events.send(RunEvent::Launched {
                            agent_address: offer.agent_address.clone(),
                        });
                        let _ = client.suppress().await;
                    }
                    Err(e) => {
                        let _ = self
                            .events
                            .send(RunEvent::Error(format!("launch failed: {e}")));
                    }
                }
            } else {
                decline.push(id);
            }
        }
        if !decline.is_empty() {
            let filters = pb::Filters {
                refuse_seconds: Some(DECLINE_SECONDS),
            };
            let _ = client.decline(&decline, Some(filters)).await;
        }
        if self.task.is_some() && !self.hinted && self.started.elapsed() > WAITING_HINT_AFTER {
            self.hinted = true;
            let largest = self
                .largest
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "none".into());
            let constraints = if self.constraints.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = self.constraints.iter().map(ToString::to_string).collect();
                format!(" on an agent with {}", list.join(", "))
            };
            eprintln!(
                "corral run: still waiting for an offer with {}{constraints} (largest offer so far: {largest})",
                self.needed
            );
        }
    }

    async fn status_update(&mut self, _client: &SchedulerClient, status: &pb::TaskStatus) {
        if status.task_id == self.task_id.as_str() {
            let _ = self.events.send(RunEvent::Status(status.clone()));
        }
    }

    async fn error(&mut self, _client: &SchedulerClient, message: &str) {
        let _ = self.events.send(RunEvent::Error(message.to_string()));
    }
}

pub(crate) fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|p| {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| anyhow!("--env: '{p}' is not K=V"))?;
            if k.is_empty() {
                bail!("--env: '{p}' has an empty name");
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Streams one sandbox file of the task to our stdout or stderr until the
/// agent ends the stream (task terminal and file drained).
async fn stream_file(
    agent_address: String,
    framework_id: String,
    task_id: String,
    file: LogFile,
) -> Result<()> {
    let mut out: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match file {
        LogFile::Stdout => Box::new(tokio::io::stdout()),
        LogFile::Stderr => Box::new(tokio::io::stderr()),
    };
    copy_file(
        &agent_address,
        &framework_id,
        &task_id,
        file,
        true,
        &mut out,
    )
    .await
}

fn exit_code_of(status: &pb::TaskStatus) -> u8 {
    match (status.state(), status.exit_code, status.signal) {
        (pb::TaskState::TaskFinished, _, _) => 0,
        (_, Some(code), _) if code != 0 => u8::try_from(code.clamp(1, 255)).unwrap_or(1),
        (_, _, Some(sig)) => u8::try_from((128 + sig).clamp(1, 255)).unwrap_or(1),
        _ => 1,
    }
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let needed = Resources::parse(&format!(
        "cpus:{};mem:{};disk:{}",
        args.cpus, args.mem, args.disk
    ))
    .map_err(|e| anyhow!("{e}"))?;
    if needed.cpus.is_zero() || needed.mem.is_zero() {
        bail!("--cpus and --mem must be > 0");
    }
    let suffix: String = uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(8)
        .collect();
    let task_id =
        TaskId::parse(&format!("{}-{suffix}", args.name), "--name").map_err(|e| anyhow!("{e}"))?;
    if args.command.is_empty() && args.image.is_none() {
        bail!("a command is required (after --), unless --image is given");
    }
    let mut constraints = args
        .constraints
        .iter()
        .map(|c| {
            c.parse::<Constraint>()
                .map_err(|e| anyhow!("--constraint: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut builder = TaskBuilder::new(task_id.clone())
        .name(&args.name)
        .cpus(args.cpus)
        .mem(args.mem);
    if !args.command.is_empty() {
        builder = builder.command(args.command.clone());
    }
    if let Some(image) = &args.image {
        // Images need an agent that runs containers.
        constraints.push(Constraint::isolated());
        builder = builder.image(image);
    }
    for v in &args.volumes {
        let (host, container, read_only) = parse_volume(v)?;
        builder = builder.volume(host, container, read_only);
    }
    if let Some(user) = &args.user {
        builder = builder.user(user);
    }
    if args.disk > 0.0 {
        builder = builder.disk(args.disk);
    }
    for (k, v) in parse_env(&args.env)? {
        builder = builder.env(&k, &v);
    }
    if let Some(grace) = args.kill_grace {
        builder = builder.kill_grace(grace);
    }

    let framework = pb::FrameworkInfo {
        name: format!("corral-run: {}", args.name),
        user: std::env::var("USER").unwrap_or_default(),
        role: args.role.clone(),
        // Like mesos-execute: if this process goes away, so does the task.
        failover_timeout_seconds: 0.0,
        hostname: hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        ..Default::default()
    };
    let (driver, client) = Driver::new(DriverConfig::new(args.master.clone(), framework));
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let scheduler = OneTask {
        task: Some(builder),
        needed,
        constraints,
        task_id: task_id.clone(),
        events: events_tx.clone(),
        largest: None,
        started: tokio::time::Instant::now(),
        hinted: false,
    };
    let driver_task = tokio::spawn(async move {
        if let Err(e) = driver.run(scheduler).await {
            let _ = events_tx.send(RunEvent::Error(e.to_string()));
        }
    });

    let mut agent_address = None;
    let mut streams: Vec<tokio::task::JoinHandle<Result<()>>> = Vec::new();
    let mut kill_sent = false;
    let final_status = loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = tokio::signal::ctrl_c(), if !kill_sent => {
                kill_sent = true;
                eprintln!("corral run: killing task {task_id} (Ctrl-C again to leave it)");
                if let Err(e) = client.kill(&task_id, None).await {
                    eprintln!("corral run: kill failed: {e}");
                }
                continue;
            }
            _ = tokio::signal::ctrl_c(), if kill_sent => {
                client.stop();
                return Ok(ExitCode::from(130));
            }
        };
        match event {
            None => bail!("the framework driver stopped"),
            Some(RunEvent::Error(e)) => {
                client.stop();
                bail!("{e}");
            }
            Some(RunEvent::Launched { agent_address: a }) => agent_address = Some(a),
            Some(RunEvent::Status(status)) => {
                let from_agent = status.source() == pb::Source::Agent;
                if from_agent
                    && streams.is_empty()
                    && let (Some(addr), Some(fid)) = (&agent_address, client.framework_id())
                {
                    for file in [LogFile::Stdout, LogFile::Stderr] {
                        streams.push(tokio::spawn(stream_file(
                            addr.clone(),
                            fid.to_string(),
                            task_id.to_string(),
                            file,
                        )));
                    }
                }
                if is_terminal(status.state()) {
                    break status;
                }
            }
        }
    };
    for s in streams {
        match tokio::time::timeout(LOG_DRAIN_TIMEOUT, s).await {
            Ok(Ok(Err(e))) => eprintln!("corral run: log stream: {e:#}"),
            Ok(_) => {}
            Err(_) => eprintln!("corral run: gave up waiting for the rest of the task's output"),
        }
    }
    let state = final_status.state();
    if state != pb::TaskState::TaskFinished {
        let reason = reason_name(final_status.reason());
        let mut line = format!("corral run: task {task_id} {}", state_name(state));
        if !reason.is_empty() {
            line.push_str(&format!(" ({reason})"));
        }
        if !final_status.message.is_empty() {
            line.push_str(&format!(": {}", final_status.message));
        }
        eprintln!("{line}");
    }
    if let Err(e) = client.teardown().await {
        tracing::debug!("teardown: {e}");
    }
    client.stop();
    let _ = tokio::time::timeout(Duration::from_secs(5), driver_task).await;
    Ok(ExitCode::from(exit_code_of(&final_status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_task() {
        let mut s = pb::TaskStatus {
            state: pb::TaskState::TaskFinished as i32,
            ..Default::default()
        };
        assert_eq!(exit_code_of(&s), 0);
        s.state = pb::TaskState::TaskFailed as i32;
        s.exit_code = Some(3);
        assert_eq!(exit_code_of(&s), 3);
        s.exit_code = None;
        s.signal = Some(9);
        assert_eq!(exit_code_of(&s), 137);
        s.signal = None;
        assert_eq!(exit_code_of(&s), 1);
    }

    #[test]
    fn volumes_parse_with_an_optional_mode() {
        assert_eq!(
            parse_volume("/a:/b").unwrap(),
            ("/a".into(), "/b".into(), false)
        );
        assert_eq!(
            parse_volume("/a:/b:ro").unwrap(),
            ("/a".into(), "/b".into(), true)
        );
        assert!(parse_volume("a:/b").is_err());
        assert!(parse_volume("/a").is_err());
        assert!(parse_volume("/a:/b:rx").is_err());
    }

    #[test]
    fn env_pairs_need_a_name() {
        assert!(parse_env(&["A=1".into()]).is_ok());
        assert!(parse_env(&["=1".into()]).is_err());
        assert!(parse_env(&["A".into()]).is_err());
    }
}
