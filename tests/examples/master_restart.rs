//! Master restart benchmark: how long until every agent is back after the
//! master restarts, with thousands of agents and their tasks in the
//! registry (issue 6: 2,000 agents × 50 tasks, all re-registered in ≤ 10 s).
//!
//! `master_restart CORRAL_BIN WORK_DIR [AGENTS] [TASKS_PER_AGENT]`: starts
//! `corral master` as a process, attaches AGENTS simulated agents (gRPC
//! streams speaking the agent protocol, each reporting TASKS_PER_AGENT
//! running tasks of one framework), waits until the master knows them all,
//! stops it (SIGTERM: its registry is committed), starts it again on the
//! same work dir, and times how long the simulated agents take to be back.
//! Like real agents, they notice the closed stream and retry every 100 ms
//! to 1 s (doubling, with jitter) until the master answers.
//!
//! Prints one line: `agents=A tasks=T recovered_s=R reregistered_s=X`,
//! where R is the time from the new master's start until it answers (its
//! registry read), and X until the last agent is registered again.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use corral_proto::pb;
use corral_proto::pb::agent_registry_client::AgentRegistryClient;
use tokio::sync::{Notify, mpsc};
use tonic::transport::{Channel, Endpoint};

const FRAMEWORK: &str = "bench-framework";
/// Agents per HTTP/2 connection (each agent is one stream on it).
const AGENTS_PER_CHANNEL: usize = 100;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(300);

fn register(index: usize, tasks: usize) -> pb::Register {
    let agent_id = format!("sim-agent-{index:05}");
    let framework = pb::FrameworkInfo {
        id: FRAMEWORK.into(),
        name: "bench".into(),
        user: "root".into(),
        role: "*".into(),
        failover_timeout_seconds: 3600.0,
        ..Default::default()
    };
    let resources =
        corral_proto::Resources::parse("cpus:64;mem:262144;disk:1048576").expect("resources");
    let task_resources = corral_proto::Resources::parse("cpus:0.1;mem:32").expect("task resources");
    pb::Register {
        info: Some(pb::AgentInfo {
            id: agent_id.clone(),
            hostname: format!("sim{index}"),
            address: "127.0.0.1:1".into(),
            resources: resources.to_proto(),
            ..Default::default()
        }),
        tasks: (0..tasks)
            .map(|t| pb::RunningTask {
                framework_id: FRAMEWORK.into(),
                task: Some(pb::TaskInfo {
                    task_id: format!("{agent_id}-task-{t}"),
                    name: "sleep".into(),
                    agent_id: agent_id.clone(),
                    resources: task_resources.to_proto(),
                    command: Some(pb::CommandInfo {
                        value: "sleep 3600".into(),
                        shell: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                state: pb::TaskState::TaskRunning as i32,
            })
            .collect(),
        frameworks: vec![framework],
        version: "bench".into(),
        ..Default::default()
    }
}

/// One simulated agent: attaches, re-registers whenever the stream ends,
/// heartbeats; counts each registration in `registered`.
async fn sim_agent(
    channel: Channel,
    register: pb::Register,
    registered: Arc<AtomicUsize>,
    changed: Arc<Notify>,
) {
    let mut backoff = RETRY_MIN;
    loop {
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
        let first = pb::AgentMessage {
            message: Some(pb::agent_message::Message::Register(register.clone())),
        };
        if tx.send(first).await.is_err() {
            return;
        }
        let mut client = AgentRegistryClient::new(channel.clone());
        let stream = client
            .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        if let Ok(response) = stream {
            let mut inbound = response.into_inner();
            let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    message = inbound.message() => match message {
                        Ok(Some(m)) => {
                            if let Some(pb::master_message::Message::Registered(_)) = m.message {
                                backoff = RETRY_MIN;
                                registered.fetch_add(1, Ordering::SeqCst);
                                changed.notify_one();
                            }
                        }
                        _ => break,
                    },
                    _ = heartbeat.tick() => {
                        let beat = pb::AgentMessage {
                            message: Some(pb::agent_message::Message::Heartbeat(pb::AgentHeartbeat {})),
                        };
                        if tx.send(beat).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        // Jitter, as real agents spread their retries.
        let jitter = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 50);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

fn start_master(bin: &str, work_dir: &str, addr: SocketAddr) -> Child {
    Command::new(bin)
        .args([
            "master",
            "--listen",
            &addr.to_string(),
            "--work-dir",
            work_dir,
        ])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start corral master")
}

async fn wait_until_answering(addr: SocketAddr) {
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(start.elapsed() < DEADLINE, "the master did not come up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for_count(what: &str, counter: &AtomicUsize, n: usize, changed: &Notify) {
    let start = Instant::now();
    while counter.load(Ordering::SeqCst) < n {
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: {} of {n} after {DEADLINE:?}",
            counter.load(Ordering::SeqCst)
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), changed.notified()).await;
    }
}

/// The master's view: (agents by state, tasks).
async fn state(addr: SocketAddr) -> (std::collections::BTreeMap<String, usize>, usize) {
    let s: corral_master::state::StateSnapshot = reqwest::get(format!("http://{addr}/state"))
        .await
        .expect("GET /state")
        .json()
        .await
        .expect("/state json");
    let mut agents = std::collections::BTreeMap::new();
    for a in &s.agents {
        *agents.entry(a.state.clone()).or_insert(0) += 1;
    }
    (agents, s.tasks.len())
}

fn stop(master: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(master.id()).expect("pid"));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = master.wait();
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: master_restart CORRAL_BIN WORK_DIR [AGENTS] [TASKS_PER_AGENT]";
    let bin = args.get(1).expect(usage).clone();
    let work_dir = args.get(2).expect(usage).clone();
    let agents: usize = args.get(3).map_or(2000, |s| s.parse().expect("AGENTS"));
    let tasks: usize = args
        .get(4)
        .map_or(50, |s| s.parse().expect("TASKS_PER_AGENT"));
    let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");

    let mut master = start_master(&bin, &work_dir, addr);
    wait_until_answering(addr).await;
    let registered = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(Notify::new());
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).expect("endpoint");
    for chunk_start in (0..agents).step_by(AGENTS_PER_CHANNEL) {
        // Lazily connected: it dials again after the master restarts.
        let channel = endpoint.connect_lazy();
        for i in chunk_start..(chunk_start + AGENTS_PER_CHANNEL).min(agents) {
            tokio::spawn(sim_agent(
                channel.clone(),
                register(i, tasks),
                registered.clone(),
                changed.clone(),
            ));
        }
    }
    let populate = Instant::now();
    wait_for_count("first registrations", &registered, agents, &changed).await;
    eprintln!(
        "{agents} agents with {} tasks registered in {:.2} s",
        agents * tasks,
        populate.elapsed().as_secs_f64()
    );

    let (_, known) = state(addr).await;
    assert_eq!(known, agents * tasks, "the master knows every task");
    stop(&mut master);
    let before = registered.load(Ordering::SeqCst);
    let restart = Instant::now();
    let mut master = start_master(&bin, &work_dir, addr);
    wait_until_answering(addr).await;
    let recovered = restart.elapsed();
    let (at_start, known) = state(addr).await;
    eprintln!("right after the restart: agents {at_start:?}, {known} tasks");
    assert_eq!(
        known,
        agents * tasks,
        "every task recovered from the registry"
    );
    wait_for_count("re-registrations", &registered, before + agents, &changed).await;
    let reregistered = restart.elapsed();
    let (after, known) = state(addr).await;
    assert_eq!(after.get("connected"), Some(&agents), "{after:?}");
    assert_eq!(known, agents * tasks);
    stop(&mut master);
    println!(
        "agents={agents} tasks={} recovered_s={:.2} reregistered_s={:.2}",
        agents * tasks,
        recovered.as_secs_f64(),
        reregistered.as_secs_f64()
    );
}
