//! Master configuration. Defaults follow Mesos where it has one.

use std::collections::HashMap;
use std::time::Duration;

/// The master sends `MasterHeartbeat` and asks agents to heartbeat this often.
pub const DEFAULT_AGENT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Mesos `--agent_ping_timeout` default.
pub const DEFAULT_AGENT_PING_TIMEOUT: Duration = Duration::from_secs(15);
/// Mesos `--max_agent_ping_timeouts` default.
pub const DEFAULT_MAX_AGENT_PING_TIMEOUTS: u32 = 5;
/// Mesos `--allocation_interval` default.
pub const DEFAULT_ALLOCATION_INTERVAL: Duration = Duration::from_secs(1);
/// Mesos scheduler API heartbeat (`DEFAULT_HEARTBEAT_INTERVAL`).
pub const DEFAULT_FRAMEWORK_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// Mesos `Filters.refuse_seconds` default.
pub const DEFAULT_REFUSE: Duration = Duration::from_secs(5);
/// Completed tasks kept for `/state` (Mesos `--max_completed_tasks_per_framework`
/// is per framework; one global bound is enough to keep memory flat).
pub const DEFAULT_MAX_COMPLETED_TASKS: usize = 1000;
/// Events buffered per framework stream before the master gives up on a
/// scheduler that does not read and drops its connection (it re-subscribes
/// and reconciles).
pub const FRAMEWORK_EVENT_BUFFER: usize = 8192;
/// Messages buffered per agent stream, for the same reason.
pub const AGENT_MESSAGE_BUFFER: usize = 8192;

#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub agent_heartbeat_interval: Duration,
    /// An agent is unreachable after `agent_ping_timeout × max_agent_ping_timeouts`
    /// without any message from it (or at once when its stream breaks).
    pub agent_ping_timeout: Duration,
    pub max_agent_ping_timeouts: u32,
    pub framework_heartbeat_interval: Duration,
    pub allocation_interval: Duration,
    /// Rescind offers not answered within this time; `None` (default) never.
    pub offer_timeout: Option<Duration>,
    pub default_refuse: Duration,
    /// Role weights for DRF; roles not listed weigh 1.
    pub weights: HashMap<String, f64>,
    pub max_completed_tasks: usize,
}

impl Default for MasterConfig {
    fn default() -> Self {
        Self {
            agent_heartbeat_interval: DEFAULT_AGENT_HEARTBEAT_INTERVAL,
            agent_ping_timeout: DEFAULT_AGENT_PING_TIMEOUT,
            max_agent_ping_timeouts: DEFAULT_MAX_AGENT_PING_TIMEOUTS,
            framework_heartbeat_interval: DEFAULT_FRAMEWORK_HEARTBEAT_INTERVAL,
            allocation_interval: DEFAULT_ALLOCATION_INTERVAL,
            offer_timeout: None,
            default_refuse: DEFAULT_REFUSE,
            weights: HashMap::new(),
            max_completed_tasks: DEFAULT_MAX_COMPLETED_TASKS,
        }
    }
}

impl MasterConfig {
    /// Short timeouts for `corral dev` and tests: a lost agent shows within
    /// seconds instead of Mesos's 75 s.
    pub fn dev() -> Self {
        Self {
            agent_heartbeat_interval: Duration::from_millis(500),
            agent_ping_timeout: Duration::from_secs(1),
            max_agent_ping_timeouts: 3,
            framework_heartbeat_interval: Duration::from_secs(2),
            ..Self::default()
        }
    }

    pub fn agent_unreachable_after(&self) -> Duration {
        self.agent_ping_timeout * self.max_agent_ping_timeouts
    }

    /// Parses `--weights "role=2,other=0.5"`.
    pub fn parse_weights(text: &str) -> Result<HashMap<String, f64>, String> {
        let mut out = HashMap::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (role, w) = part
                .split_once('=')
                .ok_or_else(|| format!("weights: '{part}' is not ROLE=WEIGHT"))?;
            crate::validation::role(role.trim(), "weights.role").map_err(|e| e.to_string())?;
            let w: f64 = w
                .trim()
                .parse()
                .map_err(|_| format!("weights.{role}: '{w}' is not a number"))?;
            if !w.is_finite() || w <= 0.0 {
                return Err(format!("weights.{role}: must be finite and > 0"));
            }
            out.insert(role.trim().to_string(), w);
        }
        Ok(out)
    }
}
