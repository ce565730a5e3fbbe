//! The agent's configuration and its defaults.

use std::path::PathBuf;
use std::time::Duration;

use corral_proto::{Resources, pb};

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

/// Everything [`crate::run`] needs. Build with [`AgentConfig::new`] and
/// override fields as needed.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the master.
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
        }
    }
}
