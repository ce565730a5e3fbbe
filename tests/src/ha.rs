//! Several masters on etcd, for the high-availability tests: an etcd
//! server of its own per test (Debian's `etcd-server`, on loopback ports),
//! and masters as child processes ([`crate::process`]) that a test can
//! `kill -9`, pause (SIGSTOP) and resume.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use corral_sdk::pb;
use corral_sdk::{
    Driver, DriverConfig, FrameworkId, OfferResources, Resources, Scheduler, SchedulerClient,
    TaskBuilder, TaskId, async_trait,
};
use tokio::task::JoinHandle;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::{WAIT, metric_value, wait_for};

/// One etcd member on loopback ports, its data in a temp dir; killed (and
/// its data removed) when dropped.
pub struct Etcd {
    /// `127.0.0.1:PORT` for clients.
    pub endpoint: String,
    child: Child,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Etcd {
    /// Starts etcd with a 50 ms heartbeat and a 500 ms election timeout, so
    /// it accepts lease TTLs of 1 s (it raises a TTL below 1.5 × the
    /// election timeout), and waits until it serves. Panics, saying what
    /// to install, when `etcd` is missing.
    pub async fn start() -> Etcd {
        Self::start_with(500).await
    }

    /// The same with an election timeout of `election_ms` (heartbeat a
    /// tenth of it); etcd's own default is 1000.
    pub async fn start_with(election_ms: u64) -> Etcd {
        let binary = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "etcd not found: install Debian's etcd-server \
                     (apt-get install etcd-server; .ci/run does)"
                )
            });
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new(binary)
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg(format!("--heartbeat-interval={}", election_ms / 10))
            .arg(format!("--election-timeout={election_ms}"))
            .args(["--logger=zap", "--log-level=warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        let etcd = Etcd {
            endpoint: format!("127.0.0.1:{client}"),
            child,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let health = format!("{client_url}/health");
        wait_for("etcd serving", WAIT, || async {
            let body = http.get(&health).send().await.ok()?.text().await.ok()?;
            body.contains("\"health\":\"true\"").then_some(())
        })
        .await;
        etcd
    }

    /// `--registry` for masters on this etcd.
    pub fn registry_url(&self) -> String {
        format!("etcd://{}/corral", self.endpoint)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Set in a re-executed child: the JSON of its [`MasterSpec`].
pub const CHILD_MASTER_ENV: &str = "CORRAL_TEST_CHILD_MASTER";

/// What a child master runs as; the same spec restarts the same master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MasterSpec {
    pub address: SocketAddr,
    /// `etcd://…` of [`Etcd::registry_url`].
    pub registry: String,
    pub lease_ttl: Duration,
}

impl MasterSpec {
    /// A master on a port of its own, with a 1 s leader lease.
    pub fn new(etcd: &Etcd) -> Self {
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        Self {
            address,
            registry: etcd.registry_url(),
            lease_ttl: Duration::from_secs(1),
        }
    }

    fn config(&self) -> corral_master::MasterConfig {
        let mut config = crate::test_master_config();
        let mut etcd = corral_master::EtcdConfig::parse(&self.registry).expect("etcd url");
        etcd.lease_ttl = self.lease_ttl;
        config.etcd = Some(etcd);
        config.advertise_address = Some(self.address.to_string());
        config
    }
}

/// Runs the master of [`CHILD_MASTER_ENV`], if it is set.
pub(crate) fn child_master_main() {
    let Ok(spec) = std::env::var(CHILD_MASTER_ENV) else {
        return;
    };
    let spec: MasterSpec = serde_json::from_str(&spec).expect("child master spec");
    crate::process::run_child("master", |stop| async move {
        let listener = crate::bind_reusable(spec.address).expect("bind the master's address");
        corral_master::run(spec.config(), listener, stop)
            .await
            .map_err(|e| e.to_string())
    });
}

/// A child master process.
pub struct MasterProcess {
    pub spec: MasterSpec,
    child: Option<Child>,
}

impl MasterProcess {
    /// Starts the master of `spec` in this test binary, re-executed to run
    /// only the test named `entry` (which calls
    /// [`crate::process::child_main`]).
    pub fn spawn(entry: &str, spec: &MasterSpec) -> Self {
        let child = crate::process::spawn_child(entry, CHILD_MASTER_ENV, spec);
        Self {
            spec: spec.clone(),
            child: Some(child),
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.spec.address
    }

    fn pid(&self) -> Option<Pid> {
        let child = self.child.as_ref()?;
        Some(Pid::from_raw(i32::try_from(child.id()).ok()?))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9`, and waits for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process freezes, its sockets stay open.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
        }
    }

    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            kill(pid, Signal::SIGCONT).expect("SIGCONT");
        }
    }

    /// SIGTERM (after SIGCONT, in case it is paused), then waits; asserts
    /// it stopped cleanly.
    pub fn stop(&mut self) {
        let status = crate::process::terminate(&mut self.child, true);
        assert!(
            status.is_some_and(|s| s.success()),
            "the child master did not stop cleanly: {status:?}"
        );
    }

    /// This master's `/metrics`, if it answers (see [`metrics_at`]).
    pub async fn metrics(&self) -> Option<String> {
        metrics_at(self.spec.address).await
    }

    /// `Some(epoch)` while this master says it leads.
    pub async fn leading(&self) -> Option<u64> {
        leading_at(self.spec.address).await
    }
}

/// The `/metrics` of the master at `address`, if it answers within 500 ms
/// (a paused master accepts connections but never answers).
pub async fn metrics_at(address: SocketAddr) -> Option<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .ok()?;
    let url = format!("http://{address}/metrics");
    http.get(url).send().await.ok()?.text().await.ok()
}

/// `Some(epoch)` while the master at `address` says it leads.
pub async fn leading_at(address: SocketAddr) -> Option<u64> {
    let text = metrics_at(address).await?;
    if metric_value(&text, "corral_master_elected")? != 1.0 {
        return None;
    }
    // Whole numbers: the epoch is an etcd revision.
    metric_value(&text, "corral_master_leader_epoch").map(|e| e as u64)
}

impl Drop for MasterProcess {
    fn drop(&mut self) {
        crate::process::terminate(&mut self.child, true);
    }
}

/// Waits until exactly one of the running `masters` leads; its index and
/// epoch.
pub async fn wait_for_leader(masters: &[MasterProcess], above_epoch: u64) -> (usize, u64) {
    wait_for(
        &format!("one master leading with an epoch above {above_epoch}"),
        WAIT,
        || async {
            let mut leaders = Vec::new();
            for (i, m) in masters.iter().enumerate() {
                if !m.is_running() {
                    continue;
                }
                if let Some(epoch) = m.leading().await {
                    leaders.push((i, epoch));
                }
            }
            match leaders.as_slice() {
                [(i, epoch)] if *epoch > above_epoch => Some((*i, *epoch)),
                _ => None,
            }
        },
    )
    .await
}

/// `h1:p1,h2:p2,…` of `masters`, for `--master`.
pub fn master_list(masters: &[MasterProcess]) -> String {
    masters
        .iter()
        .map(|m| m.address().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// What the framework of [`start_framework`] saw, shared with the test.
#[derive(Default)]
pub struct Seen {
    pub subscriptions: Vec<FrameworkId>,
    /// When each batch of offers arrived.
    pub offers: Vec<Instant>,
    pub updates: Vec<pb::TaskStatus>,
}

/// Launches `wanted` long tasks, then keeps declining offers for 100 ms,
/// so offers keep coming (the test watches for them).
struct Recorder {
    wanted: usize,
    launched: usize,
    per_task: Resources,
    seen: Arc<Mutex<Seen>>,
}

#[async_trait]
impl Scheduler for Recorder {
    async fn subscribed(&mut self, _client: &SchedulerClient, framework_id: &FrameworkId) {
        lock(&self.seen).subscriptions.push(framework_id.clone());
    }

    async fn offers(&mut self, client: &SchedulerClient, offers: Vec<pb::Offer>) {
        lock(&self.seen).offers.push(Instant::now());
        for offer in offers {
            let Ok(mut left) = OfferResources::from_offer(&offer) else {
                continue;
            };
            let mut tasks = Vec::new();
            while self.launched + tasks.len() < self.wanted && left.try_take(&self.per_task) {
                let id = TaskId::generated(format!("ha-{}", self.launched + tasks.len()));
                tasks.push(
                    TaskBuilder::new(id)
                        .shell("sleep 300")
                        .resources(&self.per_task)
                        .build_for(&offer),
                );
            }
            let ids = [left.offer_id().clone()];
            let soon = Some(pb::Filters {
                refuse_seconds: Some(0.1),
            });
            if tasks.is_empty() {
                let _ = client.decline(&ids, soon).await;
            } else {
                self.launched += tasks.len();
                let _ = client.launch(&ids, tasks, soon).await;
            }
        }
    }

    async fn status_update(&mut self, _client: &SchedulerClient, status: &pb::TaskStatus) {
        lock(&self.seen).updates.push(status.clone());
    }
}

pub fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A framework on the SDK driver, given `master` (one address or a
/// list): it launches `wanted` long tasks, declines the rest of every
/// offer for 100 ms (so offers keep coming), and notes what it sees.
pub fn start_framework(
    master: String,
    wanted: usize,
) -> (SchedulerClient, Arc<Mutex<Seen>>, JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let info = pb::FrameworkInfo {
        name: "ha-test".into(),
        failover_timeout_seconds: 300.0,
        ..Default::default()
    };
    let mut config = DriverConfig::new(master, info);
    config.reconnect_backoff_initial = Duration::from_millis(50);
    config.reconnect_backoff_max = Duration::from_millis(300);
    let (driver, client) = Driver::new(config);
    let recorder = Recorder {
        wanted,
        launched: 0,
        per_task: Resources::parse("cpus:0.1;mem:16").expect("resources"),
        seen: seen.clone(),
    };
    let task = tokio::spawn(async move {
        let _ = driver.run(recorder).await;
    });
    (client, seen, task)
}
