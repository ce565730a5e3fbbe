//! Agents (and masters, [`crate::ha`]) as real processes, for tests that
//! `kill -9` them: the test binary re-executes itself, and its entry point
//! (a `#[test]` that does nothing unless [`CHILD_ENV`] or
//! [`crate::ha::CHILD_MASTER_ENV`] is set) runs [`child_main`].
//!
//! A child stops cleanly (an agent kills its tasks) on SIGTERM, when the
//! test process that started it is gone, or after [`CHILD_LIFETIME`]; so a
//! failed test leaves no agent and, once that agent stopped, no container.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_agent::AgentConfig;
use corral_proto::Resources;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::{Cluster, WAIT, bind_reusable};

/// Set in a re-executed child: the JSON of its [`AgentSpec`].
pub const CHILD_ENV: &str = "CORRAL_TEST_CHILD_AGENT";
/// How long a child agent runs at most.
pub const CHILD_LIFETIME: Duration = Duration::from_secs(300);
/// How often a child checks that its parent is still there.
const PARENT_POLL: Duration = Duration::from_millis(500);

/// What a child agent runs as; the same spec restarts the same agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentSpec {
    pub master: String,
    /// The agent's API, the same across restarts.
    pub address: SocketAddr,
    pub work_dir: PathBuf,
    pub cgroup_root: String,
    pub pod_bridge: String,
    pub pod_cidr: String,
    pub resources: String,
    pub hostname: String,
    /// A network namespace (a path under /var/run/netns) the agent enters
    /// before anything else; `None`: the host's.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

impl AgentSpec {
    /// Agent `index` of `cluster`, connecting straight to its master (no
    /// proxy), with [`Cluster::agent_config`]'s test settings.
    pub fn new(cluster: &Cluster, resources: &str) -> Self {
        Self::from_config(
            cluster.agent_config(resources, ""),
            cluster.master.to_string(),
            resources,
        )
    }

    /// Agent `index` with its work dir in `dir`, registering with `master`
    /// (one `host:port`, or several separated by commas).
    pub fn in_dir(dir: &Path, index: usize, master: String, resources: &str) -> Self {
        Self::from_config(
            crate::agent_config_in(dir, index, resources, ""),
            master,
            resources,
        )
    }

    fn from_config(config: AgentConfig, master: String, resources: &str) -> Self {
        // A port for the agent's API that stays its own across restarts.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        Self {
            master,
            address,
            work_dir: config.work_dir,
            cgroup_root: config.cgroup_root,
            pod_bridge: config.pod_bridge,
            pod_cidr: config.pod_cidr.to_string(),
            resources: resources.to_string(),
            hostname: config.hostname,
            netns: None,
        }
    }

    fn config(&self) -> AgentConfig {
        let mut config = AgentConfig::new(self.master.clone(), self.work_dir.clone());
        config.resources = Some(Resources::parse(&self.resources).expect("resources"));
        config.hostname = self.hostname.clone();
        config.advertise_address = Some(self.address.to_string());
        config.status_update_retry_initial = Duration::from_millis(300);
        config.status_update_retry_max = Duration::from_secs(2);
        config.reconnect_backoff_max = Duration::from_millis(300);
        config.default_kill_grace = Duration::from_secs(2);
        config.cgroup_root = self.cgroup_root.clone();
        config.pod_bridge = self.pod_bridge.clone();
        config.pod_cidr = corral_agent::network::PodCidr::parse(&self.pod_cidr).expect("pod cidr");
        config
    }
}

/// Runs the child this process was re-executed as, if any; returns at
/// once in the test process itself.
pub fn child_main() {
    child_agent_main();
    crate::ha::child_master_main();
}

fn child_agent_main() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let spec: AgentSpec = serde_json::from_str(&spec).expect("child agent spec");
    if let Some(netns) = &spec.netns {
        // This thread's network namespace; the runtime's threads, made
        // from it, inherit it.
        let ns = std::fs::File::open(netns).expect("open the agent's netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("enter the agent's netns");
    }
    run_child("agent", |stop| async move {
        let listener = bind_reusable(spec.address).expect("bind the agent's address");
        corral_agent::run(spec.config(), listener, stop)
            .await
            .map_err(|e| e.to_string())
    });
}

/// Runs `serve` on a runtime of its own until SIGTERM, the parent's exit,
/// or [`CHILD_LIFETIME`]; exits the process with 1 if it fails.
pub(crate) fn run_child<F, Fut>(what: &str, serve: F)
where
    F: FnOnce(std::pin::Pin<Box<dyn Future<Output = ()> + Send>>) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async {
        let parent = std::os::unix::process::parent_id();
        let stop = async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            let orphaned = async {
                while std::os::unix::process::parent_id() == parent {
                    tokio::time::sleep(PARENT_POLL).await;
                }
            };
            tokio::select! {
                _ = term.recv() => {}
                () = orphaned => {}
                () = tokio::time::sleep(CHILD_LIFETIME) => {}
            }
        };
        serve(Box::pin(stop)).await
    });
    if let Err(e) = result {
        eprintln!("child {what} failed: {e}");
        std::process::exit(1);
    }
}

/// Re-executes this test binary to run only the test `entry`, with `spec`
/// as JSON in `env`.
pub(crate) fn spawn_child(entry: &str, env: &str, spec: &impl Serialize) -> Child {
    let exe = std::env::current_exe().expect("the test binary");
    Command::new(exe)
        .args([entry, "--exact", "--nocapture", "--test-threads", "1"])
        .env(env, serde_json::to_string(spec).expect("spec"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the child")
}

/// SIGTERM (preceded by SIGCONT with `resume`, for a paused child), then
/// up to [`WAIT`] for it to exit; kills it after that.
pub(crate) fn terminate(
    child: &mut Option<Child>,
    resume: bool,
) -> Option<std::process::ExitStatus> {
    let mut child = child.take()?;
    let pid = Pid::from_raw(i32::try_from(child.id()).ok()?);
    let _ = kill(pid, Signal::SIGTERM);
    if resume {
        let _ = kill(pid, Signal::SIGCONT);
    }
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A child agent process.
pub struct AgentProcess {
    pub spec: AgentSpec,
    child: Option<Child>,
}

impl AgentProcess {
    /// Starts the agent of `spec` in this test binary, re-executed to run
    /// only the test named `entry` (which calls [`child_main`]).
    pub fn spawn(entry: &str, spec: &AgentSpec) -> Self {
        let child = spawn_child(entry, CHILD_ENV, spec);
        Self {
            spec: spec.clone(),
            child: Some(child),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `kill -9`, and waits for the process to be gone. Its containers
    /// stay.
    pub fn kill9(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM: the agent kills its tasks and stops. Waits up to
    /// [`WAIT`], then checks that nothing of it is left.
    pub fn stop(&mut self) {
        let status = self.terminate();
        assert!(
            status.is_some_and(|s| s.success()),
            "the child agent did not stop cleanly: {status:?}"
        );
        crate::assert_clean(&self.spec.cgroup_root, &self.spec.work_dir);
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        terminate(&mut self.child, false)
    }

    /// The agent's `/metrics`, if it answers.
    pub async fn metrics(&self) -> Option<String> {
        let url = format!("http://{}/metrics", self.spec.address);
        reqwest::get(url).await.ok()?.text().await.ok()
    }

    pub fn work_dir(&self) -> &Path {
        &self.spec.work_dir
    }
}

impl Drop for AgentProcess {
    /// A failed test: stop the agent cleanly, so its containers go too.
    fn drop(&mut self) {
        self.terminate();
    }
}
