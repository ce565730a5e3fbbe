//! The agent's configuration and its defaults.

use std::path::PathBuf;
use std::time::Duration;

use corral_proto::{Resources, pb};

use crate::network::{DEFAULT_POD_BRIDGE, PodCidr};

/// Longest wait between two attempts to reach the master: long enough not to
/// hammer a master that is down, short enough that an agent is back within
/// seconds of the master's return.
pub const DEFAULT_RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// First wait before (re)connecting after a failure; doubled on each failure
/// up to [`AgentConfig::reconnect_backoff_max`].
pub const RECONNECT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);

/// First retry interval of an unacknowledged status update (Mesos
/// `STATUS_UPDATE_RETRY_INTERVAL_MIN` is 10 s; we are more eager because a
/// retry is one small message on an open stream).
pub const DEFAULT_STATUS_UPDATE_RETRY_INITIAL: Duration = Duration::from_secs(1);

/// Cap of the doubling status update retry interval, so a framework that
/// comes back after a long outage gets its updates within a minute.
pub const DEFAULT_STATUS_UPDATE_RETRY_MAX: Duration = Duration::from_secs(60);

/// Time between SIGTERM and SIGKILL when a task is killed and neither the
/// task nor the kill names one (Mesos' default executor shutdown grace is 5 s;
/// the wire contract documents 3 s).
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(3);

/// Default `--cgroup-root`: the agent's subtree in every cgroup hierarchy.
pub const DEFAULT_CGROUP_ROOT: &str = "corral";
/// Default `--pids-limit` per container: far above what a service needs,
/// low enough that a fork bomb cannot exhaust the host's pid space.
pub const DEFAULT_PIDS_LIMIT: u64 = 4096;
/// How often container usage is sampled for `/metrics` and sent to the
/// master (Mesos' resource monitor samples on demand; 5 s keeps the cost of
/// thousands of containers small).
pub const DEFAULT_USAGE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a finished task's sandbox stays (Mesos `--gc_delay` is a week,
/// scaled down by disk pressure; a day keeps logs readable for a working day
/// without letting batch sandboxes pile up for a week).
pub const DEFAULT_SANDBOX_GC_DELAY: Duration = Duration::from_secs(24 * 3600);

/// Most finished-task sandboxes kept; older ones go early (Nomad keeps 50
/// allocations; sandboxes are small, and logs of recent failures matter).
pub const DEFAULT_SANDBOX_GC_MAX: usize = 10_000;

/// Where Linux says which boot this is; another id than the checkpoint's
/// means the machine rebooted and the agent's containers are gone.
pub const DEFAULT_BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// How the agent runs tasks (`--isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Every task is a container: cgroups, namespaces, optional image.
    Container,
    /// Plain processes in a sandbox, for hosts where the agent cannot
    /// create cgroups or namespaces; advertised as `isolation:none`.
    None,
}

impl Isolation {
    /// The value of the `isolation` attribute the agent advertises.
    pub fn attribute(self) -> &'static str {
        match self {
            Isolation::Container => "container",
            Isolation::None => "none",
        }
    }
}

/// Everything [`crate::run`] needs. Build with [`AgentConfig::new`] and
/// override fields as needed.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the master, or of several masters separated by
    /// commas (the agent finds and follows the leader).
    pub master: String,
    /// Root of the agent's files; sandboxes live in `<work_dir>/sandboxes/`.
    pub work_dir: PathBuf,
    /// Hostname advertised to the master (and in offers).
    pub hostname: String,
    /// `host:port` advertised as `AgentInfo.address`; `None` means the
    /// listener's local address.
    pub advertise_address: Option<String>,
    /// `None`: detect everything. `Some(r)`: detect, then replace each
    /// resource that `r` names (a non-zero scalar or non-empty `ports`);
    /// see [`crate::resources::merge_override`].
    pub resources: Option<Resources>,
    pub attributes: Vec<pb::Attribute>,
    /// Cap of the exponential backoff (from 100 ms, with jitter) between
    /// attempts to reach the master.
    pub reconnect_backoff_max: Duration,
    /// First retry interval of an unacknowledged status update.
    pub status_update_retry_initial: Duration,
    /// Cap of the doubling retry interval.
    pub status_update_retry_max: Duration,
    /// SIGTERM→SIGKILL grace when neither the task nor the kill sets one.
    pub default_kill_grace: Duration,
    pub isolation: Isolation,
    /// The agent's subtree in each cgroup hierarchy; containers found there
    /// at start that the agent has no record of are destroyed.
    pub cgroup_root: String,
    /// Cap cpu time with a CFS quota (not only weight it with shares).
    pub cpu_hard_limit: bool,
    pub pids_limit: u64,
    /// Host paths tasks may mount as volumes must be under one of these.
    pub allowed_host_paths: Vec<PathBuf>,
    /// Registries (`host:port`) that may be reached over plain http.
    pub insecure_registries: Vec<String>,
    /// Rotation of task stdout/stderr files.
    pub log: crate::logs::LogConfig,
    pub usage_interval: Duration,
    /// A finished task's sandbox is removed this long after its end was
    /// acknowledged.
    pub sandbox_gc_delay: Duration,
    /// At most this many finished tasks' sandboxes are kept.
    pub sandbox_gc_max: usize,
    /// Addresses of pods (`--pod-cidr`); the bridge takes the first host
    /// address, each pod one of the rest.
    pub pod_cidr: PodCidr,
    /// The agent's Linux bridge for pods (`--pod-bridge`).
    pub pod_bridge: String,
    /// `--strict`: an unreadable checkpoint file stops the agent (naming
    /// the file); `false` skips it and recovers the rest.
    pub strict: bool,
    /// The file holding the boot id ([`DEFAULT_BOOT_ID_PATH`]); tests point
    /// it elsewhere to play a reboot.
    pub boot_id_path: PathBuf,
    /// Fault injection on the stream to the master, for tests that drop,
    /// delay or duplicate chosen messages; `None` (always, outside tests).
    pub link_faults: Option<std::sync::Arc<dyn crate::master_link::LinkFaults>>,
}

impl AgentConfig {
    /// A config with the defaults above; the hostname is this machine's
    /// (falls back to `localhost` when it is not valid UTF-8).
    pub fn new(master: String, work_dir: PathBuf) -> Self {
        let hostname = hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".to_string());
        Self {
            master,
            work_dir,
            hostname,
            advertise_address: None,
            resources: None,
            attributes: Vec::new(),
            reconnect_backoff_max: DEFAULT_RECONNECT_BACKOFF_MAX,
            status_update_retry_initial: DEFAULT_STATUS_UPDATE_RETRY_INITIAL,
            status_update_retry_max: DEFAULT_STATUS_UPDATE_RETRY_MAX,
            default_kill_grace: DEFAULT_KILL_GRACE,
            isolation: Isolation::Container,
            cgroup_root: DEFAULT_CGROUP_ROOT.to_string(),
            cpu_hard_limit: true,
            pids_limit: DEFAULT_PIDS_LIMIT,
            allowed_host_paths: Vec::new(),
            insecure_registries: Vec::new(),
            log: crate::logs::LogConfig::default(),
            usage_interval: DEFAULT_USAGE_INTERVAL,
            sandbox_gc_delay: DEFAULT_SANDBOX_GC_DELAY,
            sandbox_gc_max: DEFAULT_SANDBOX_GC_MAX,
            pod_cidr: PodCidr::DEFAULT,
            pod_bridge: DEFAULT_POD_BRIDGE.to_string(),
            strict: true,
            boot_id_path: PathBuf::from(DEFAULT_BOOT_ID_PATH),
            link_faults: None,
        }
    }
}
