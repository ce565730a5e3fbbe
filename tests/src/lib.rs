//! The in-process cluster harness for Corral's scenario tests.
//!
//! - [`Cluster`]: a master and N agents in this process, each on
//!   `127.0.0.1:0`, with short timeouts; agents reach the master through a
//!   [`Proxy`] so a test can cut and restore an agent's connection. The
//!   master keeps its registry in the cluster's temp dir, and
//!   [`Cluster::restart_master`] restarts it on the same address.
//! - [`TestFramework`]: a framework on the raw gRPC API, so tests control
//!   exactly what is sent (and what is not acknowledged).
//! - [`wait_for`]: the bounded poll every test uses instead of sleeping.
//! - [`batch::TestBatch`], [`service::TestService`]: the batch and service
//!   frameworks in-process, with their gRPC clients.

pub mod batch;
pub mod faults;
mod framework;
pub mod ha;
pub mod images;
pub mod netns;
pub mod process;
mod proxy;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_agent::AgentConfig;
use corral_master::MasterConfig;
use corral_master::state::StateSnapshot;
use corral_proto::Resources;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use framework::{TestFramework, shell_task};
pub use proxy::Proxy;

/// Default bound for [`wait_for`] in scenario tests: generous for a loaded
/// 2-core CI machine, still short enough that a hang fails fast.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `check` every 20 ms until it returns `Some`, or panics after
/// `timeout` naming `what` (the condition that never came true).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Master settings for tests: fast allocation and failure detection, but
/// not so fast that a loaded 2-core CI machine (a dozen clusters at once)
/// sees false partitions: agents give up on a silent master after 3
/// heartbeat intervals (1.5 s), the master on a silent agent after 3 s.
pub fn test_master_config() -> MasterConfig {
    MasterConfig {
        allocation_interval: Duration::from_millis(100),
        agent_heartbeat_interval: Duration::from_millis(500),
        agent_ping_timeout: Duration::from_secs(1),
        max_agent_ping_timeouts: 3,
        framework_heartbeat_interval: Duration::from_millis(500),
        ..MasterConfig::default()
    }
}

pub struct TestAgent {
    /// The agent's own API address.
    pub address: SocketAddr,
    pub work_dir: PathBuf,
    pub cgroup_root: String,
    /// The agent's pod network: its bridge and address range.
    pub pod_bridge: String,
    pub pod_cidr: corral_agent::network::PodCidr,
    /// Between this agent and the master; cut it to partition the agent.
    pub proxy: Proxy,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<Result<(), corral_agent::AgentError>>>,
}

impl Drop for TestAgent {
    /// A test that failed never called `stop`: still leave no (empty)
    /// cgroup subtree behind. The agent's containers are killed when the
    /// test's runtime drops the agent.
    fn drop(&mut self) {
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let _ = std::fs::remove_dir(h.path().join(&self.cgroup_root));
            }
        }
        // Nor pods' namespaces and veths, nor the bridge (on its own
        // runtime: this may run inside the test's).
        if Path::new("/sys/class/net").join(&self.pod_bridge).exists() {
            let config = corral_agent::network::PodNetworkConfig::for_work_dir(
                &self.work_dir,
                self.pod_bridge.clone(),
                self.pod_cidr,
            );
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    let net = corral_agent::network::PodNetwork::new(config).await.ok()?;
                    let _ = net.sweep(&Default::default()).await;
                    net.remove_bridge().await.ok()
                })
            })
            .join();
        }
    }
}

impl TestAgent {
    /// Waits for the agent to end on its own (e.g. the master told it to
    /// shut down) and returns how it ended.
    pub async fn wait_exit(&mut self) -> Result<(), corral_agent::AgentError> {
        let Some(task) = self.task.take() else {
            panic!("the agent was already stopped");
        };
        match tokio::time::timeout(WAIT, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("agent panicked: {e}"),
            Err(_) => panic!("agent did not exit within {WAIT:?}"),
        }
    }

    /// Whether the agent's task is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the agent (its tasks are killed) and waits for it.
    pub async fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            match tokio::time::timeout(WAIT, task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => panic!("agent failed: {e}"),
                Ok(Err(e)) => panic!("agent panicked: {e}"),
                Err(_) => panic!("agent did not stop within {WAIT:?}"),
            }
        }
        self.proxy.shutdown();
        assert_clean(&self.cgroup_root, &self.work_dir);
        assert!(
            !Path::new("/sys/class/net").join(&self.pod_bridge).exists(),
            "the agent left its pod bridge {} behind",
            self.pod_bridge
        );
    }
}

/// After an agent stopped: no cgroup, process or mount of it is left. Then
/// its (empty) cgroup subtree is removed.
pub fn assert_clean(cgroup_root: &str, work_dir: &std::path::Path) {
    let mut leftovers = Vec::new();
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let root = h.path().join(cgroup_root);
            let Ok(children) = std::fs::read_dir(&root) else {
                continue;
            };
            for c in children.flatten() {
                if c.path().is_dir() {
                    leftovers.push(c.path().display().to_string());
                }
            }
            if let Ok(procs) = std::fs::read_to_string(root.join("cgroup.procs"))
                && !procs.trim().is_empty()
            {
                leftovers.push(format!("processes in {}: {}", root.display(), procs.trim()));
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let wd = work_dir.display().to_string();
    for line in mounts.lines().filter(|l| l.contains(&wd)) {
        leftovers.push(format!("mount: {line}"));
    }
    assert!(
        leftovers.is_empty(),
        "the agent left behind:\n{}",
        leftovers.join("\n")
    );
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            let _ = std::fs::remove_dir(h.path().join(cgroup_root));
        }
    }
}

pub struct Cluster {
    pub master: SocketAddr,
    pub agents: Vec<TestAgent>,
    pub dir: tempfile::TempDir,
    /// The master's config; `work_dir` is set (the registry survives
    /// [`Cluster::restart_master`]).
    pub master_config: MasterConfig,
    stop: watch::Sender<bool>,
    master_task: Option<JoinHandle<Result<(), corral_master::MasterError>>>,
    http: reqwest::Client,
}

/// Config of agent `index` with its work dir in `dir`: fast status update
/// retries for tests, its own cgroup subtree and pod network. The master
/// is left empty.
pub fn agent_config_in(dir: &Path, index: usize, resources: &str, attributes: &str) -> AgentConfig {
    let mut config = AgentConfig::new(String::new(), dir.join(format!("agent{index}")));
    config.resources = Some(Resources::parse(resources).expect("resources"));
    config.attributes = corral_proto::attributes::parse(attributes).expect("attributes");
    config.hostname = format!("agent{index}");
    config.status_update_retry_initial = Duration::from_millis(300);
    config.status_update_retry_max = Duration::from_secs(2);
    config.reconnect_backoff_max = Duration::from_millis(300);
    config.default_kill_grace = Duration::from_secs(2);
    // Each agent its own cgroup subtree: agents sweep theirs for orphans
    // at start, and tests run in parallel.
    config.cgroup_root = format!(
        "corral-test-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    // Its own pod bridge and address range: tests run in parallel, and
    // each agent removes its bridge when it stops.
    static AGENTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    config.pod_bridge = format!("ct{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    config.pod_cidr = corral_agent::network::PodCidr::parse(&format!(
        "10.{}.{}.0/24",
        200 + std::process::id() % 50,
        n % 256
    ))
    .expect("pod cidr");
    config
}

/// A listener with SO_REUSEADDR, so a restarted master can take the same
/// port while the old one's connections are in TIME_WAIT (sockets accepted
/// from it inherit the option, which Linux requires of both sides).
pub(crate) fn bind_reusable(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn until(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

impl Cluster {
    /// A master with [`test_master_config`] and `agents` agents, each with
    /// `cpus:2;mem:2048;disk:1024;ports:[31000-31099]`.
    pub async fn start(agents: usize) -> Cluster {
        Self::start_with(test_master_config(), agents).await
    }

    pub async fn start_with(config: MasterConfig, agents: usize) -> Cluster {
        Self::start_at(config, agents, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// A master alone, listening on `ip` (an address of a test's own
    /// network, e.g. [`netns::Wire`]'s host end); agents come as processes.
    pub async fn start_on(config: MasterConfig, ip: std::net::IpAddr) -> Cluster {
        Self::start_at(config, 0, ip).await
    }

    async fn start_at(mut config: MasterConfig, agents: usize, ip: std::net::IpAddr) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        if config.work_dir.is_none() {
            config.work_dir = Some(dir.path().join("master"));
        }
        let listener = bind_reusable(SocketAddr::new(ip, 0)).expect("bind master");
        let master = listener.local_addr().expect("master address");
        let (stop, rx) = watch::channel(false);
        let master_task = tokio::spawn(corral_master::run(config.clone(), listener, until(rx)));
        let mut cluster = Cluster {
            master,
            agents: Vec::new(),
            dir,
            master_config: config,
            stop,
            master_task: Some(master_task),
            http: reqwest::Client::new(),
        };
        for _ in 0..agents {
            cluster
                .add_agent("cpus:2;mem:2048;disk:1024;ports:[31000-31099]", "")
                .await;
        }
        let n = agents;
        cluster
            .wait_state(&format!("{n} agents connected"), |s| {
                s.agents.iter().filter(|a| a.state == "connected").count() == n
            })
            .await;
        // And each agent knows it: a test that cuts an agent off before
        // its `Registered` arrived would see it register again as a new one.
        for i in 0..n {
            wait_for(&format!("agent {i} registered"), WAIT, || async {
                let text = cluster.agent_metrics(i).await;
                metric_value(&text, "corral_agent_master_connections_total").filter(|v| *v >= 1.0)
            })
            .await;
        }
        cluster
    }

    /// Config of the next agent: fast status update retries for tests.
    pub fn agent_config(&self, resources: &str, attributes: &str) -> AgentConfig {
        agent_config_in(self.dir.path(), self.agents.len(), resources, attributes)
    }

    /// Starts one more agent; returns its index.
    pub async fn add_agent(&mut self, resources: &str, attributes: &str) -> usize {
        let config = self.agent_config(resources, attributes);
        self.add_agent_with(config).await
    }

    pub async fn add_agent_with(&mut self, mut config: AgentConfig) -> usize {
        let proxy = Proxy::start(self.master).await;
        config.master = proxy.address.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind agent");
        let address = listener.local_addr().expect("agent address");
        config.advertise_address = Some(address.to_string());
        let work_dir = config.work_dir.clone();
        let cgroup_root = config.cgroup_root.clone();
        let (pod_bridge, pod_cidr) = (config.pod_bridge.clone(), config.pod_cidr);
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(corral_agent::run(config, listener, until(rx)));
        self.agents.push(TestAgent {
            address,
            work_dir,
            cgroup_root,
            pod_bridge,
            pod_cidr,
            proxy,
            stop,
            task: Some(task),
        });
        self.agents.len() - 1
    }

    /// The work dir of agent `index`.
    pub fn agent_work_dir(&self, index: usize) -> std::path::PathBuf {
        self.agents[index].work_dir.clone()
    }

    pub async fn state(&self) -> StateSnapshot {
        self.http
            .get(format!("http://{}/state", self.master))
            .send()
            .await
            .expect("GET /state")
            .json()
            .await
            .expect("/state is JSON")
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("http://{}/metrics", self.master))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("/metrics text")
    }

    /// Asserts the master's metrics, from one scrape: each name (with its
    /// labels) has the value given.
    pub async fn assert_metrics(&self, expected: &[(&str, f64)]) {
        let text = self.metrics().await;
        for (name, value) in expected {
            let found = metric_value(&text, name);
            assert_eq!(found, Some(*value), "{name} in:\n{text}");
        }
    }

    pub async fn agent_metrics(&self, index: usize) -> String {
        self.http
            .get(format!("http://{}/metrics", self.agents[index].address))
            .send()
            .await
            .expect("GET agent /metrics")
            .text()
            .await
            .expect("agent /metrics text")
    }

    /// Streams an image archive into agent `index`'s store as `name`.
    pub async fn try_import_image(
        &self,
        index: usize,
        archive: &std::path::Path,
        name: &str,
    ) -> Result<(), String> {
        use corral_proto::pb;
        let data = std::fs::read(archive).map_err(|e| e.to_string())?;
        let mut client = pb::images_client::ImagesClient::connect(format!(
            "http://{}",
            self.agents[index].address
        ))
        .await
        .map_err(|e| e.to_string())?;
        let chunks: Vec<pb::ImageChunk> = data
            .chunks(1024 * 1024)
            .enumerate()
            .map(|(i, c)| pb::ImageChunk {
                name: if i == 0 {
                    name.to_string()
                } else {
                    String::new()
                },
                data: c.to_vec(),
            })
            .collect();
        client
            .import_image(tokio_stream::iter(chunks))
            .await
            .map(|_| ())
            .map_err(|s| s.message().to_string())
    }

    pub async fn import_image(&self, index: usize, archive: &std::path::Path, name: &str) {
        if let Err(e) = self.try_import_image(index, archive, name).await {
            panic!("importing {} as {name}: {e}", archive.display());
        }
    }

    /// Waits until `/state` satisfies `check`.
    pub async fn wait_state(
        &self,
        what: &str,
        check: impl Fn(&StateSnapshot) -> bool,
    ) -> StateSnapshot {
        wait_for(what, WAIT, || async {
            let s = self.state().await;
            check(&s).then_some(s)
        })
        .await
    }

    /// A raw framework subscribed to this cluster's master.
    pub async fn framework(&self, name: &str) -> TestFramework {
        TestFramework::subscribe(self.master, name, "*").await
    }

    /// Stops the master (as a clean shutdown; the agents keep running and
    /// retry through their proxies) and waits until it has closed its
    /// registry.
    pub async fn stop_master(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.master_task.take() {
            match tokio::time::timeout(WAIT, t).await {
                Ok(Ok(Ok(()))) => {}
                other => panic!("master did not stop cleanly: {other:?}"),
            }
        }
    }

    /// Starts a master again on the same work dir, with `config` (use
    /// [`Cluster::master_config`] for the same one), on the same address
    /// when it can be bound again, else on a new port: then
    /// [`Cluster::master`] changes and every agent's proxy is pointed at
    /// it, so from the agents' side the master is where it was.
    ///
    /// Why a new port at all: tests run in parallel in one process, and an
    /// agent forking its zygote at that moment holds a copy of every open
    /// fd, the old master's listening socket included, until the zygote
    /// closes them (its first step); a new listener cannot share the port
    /// with it meanwhile.
    pub async fn start_master(&mut self, mut config: MasterConfig) {
        assert!(self.master_task.is_none(), "the master is running");
        if config.work_dir.is_none() {
            config.work_dir = self.master_config.work_dir.clone();
        }
        let listener = match bind_reusable(self.master) {
            Ok(l) => l,
            Err(e) => {
                let l = bind_reusable("127.0.0.1:0".parse().expect("address"))
                    .unwrap_or_else(|e2| panic!("bind master ({e}, then {e2})"));
                self.master = l.local_addr().expect("master address");
                for a in &self.agents {
                    a.proxy.retarget(self.master);
                }
                l
            }
        };
        let (stop, rx) = watch::channel(false);
        self.stop = stop;
        self.master_config = config.clone();
        self.master_task = Some(tokio::spawn(corral_master::run(
            config,
            listener,
            until(rx),
        )));
    }

    /// Stops the master and starts a new one on the same address and work
    /// dir, which recovers from the registry.
    pub async fn restart_master(&mut self) {
        self.stop_master().await;
        self.start_master(self.master_config.clone()).await;
    }

    /// Stops agents (killing their tasks) and the master.
    pub async fn shutdown(mut self) {
        for a in &mut self.agents {
            if a.task.is_some() {
                a.stop().await;
            }
        }
        self.stop_master().await;
    }
}

/// Finds a metric line `name{labels} value` and returns the value.
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok())?
    })
}

/// GET `http://ip:port/path` from the host; `None` until it answers 200.
pub async fn http_get(ip: &str, port: u16, path: &str) -> Option<String> {
    let response = reqwest::Client::new()
        .get(format!("http://{ip}:{port}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

/// An `emptyDir` pod volume.
pub fn empty_dir(name: &str) -> corral_proto::pb::PodVolume {
    use corral_proto::pb;
    pb::PodVolume {
        name: name.into(),
        source: Some(pb::pod_volume::Source::EmptyDir(pb::EmptyDirVolume {})),
    }
}

/// A shell task of a pod that mounts the pod volume `shared` at /data.
pub fn pod_task(id: &str, command: &str) -> corral_proto::pb::TaskInfo {
    use corral_proto::pb;
    let mut t = shell_task(id, command, 0.1, 32.0);
    t.container = Some(pb::ContainerInfo {
        volumes: vec![pb::Volume {
            pod_volume: "shared".into(),
            container_path: "/data".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    t
}
