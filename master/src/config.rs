//! Master configuration. Defaults follow Mesos where it has one.

use std::collections::HashMap;
use std::path::PathBuf;
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
/// Mesos `--agent_reregister_timeout` default: after a master restart, how
/// long a known agent has to come back before it is unreachable.
pub const DEFAULT_AGENT_REREGISTER_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long an agent stays unreachable before it is removed (its tasks
/// TASK_GONE). Longer than the 5 minutes Kubernetes waits before evicting
/// pods and the service framework waits before replacing an instance, so
/// frameworks decide first; Mesos never removes by default.
pub const DEFAULT_AGENT_REMOVAL_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// At most one removal per 10 s: Kubernetes' default node eviction rate
/// (0.1 nodes/s), so a flapping network does not empty the cluster at once.
pub const DEFAULT_AGENT_REMOVAL_RATE: RemovalRate = RemovalRate {
    count: 1,
    per: Duration::from_secs(10),
};
/// Above this share of unreachable agents the master stops removing: the
/// master is more likely the one cut off (Kubernetes stops evicting above
/// 55 % unhealthy nodes in a zone).
pub const DEFAULT_MAX_UNREACHABLE_PERCENT: u8 = 50;
/// Removed agents' ids are kept (and refused) for this long, then
/// forgotten (Mesos' `--registry_max_agent_age`, same default).
pub const DEFAULT_REGISTRY_MAX_AGENT_AGE: Duration = Duration::from_secs(14 * 24 * 3600);
/// At most this many removed agents' ids are kept; the oldest go first
/// (Mesos' `--registry_max_agent_count`, same default).
pub const DEFAULT_REGISTRY_MAX_AGENT_COUNT: usize = 100 * 1024;

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
    /// Where the embedded registry lives; `None` keeps the registry in
    /// memory only (a restarted master starts empty).
    pub work_dir: Option<PathBuf>,
    pub agent_reregister_timeout: Duration,
    pub agent_removal_timeout: Duration,
    pub agent_removal_rate: RemovalRate,
    pub max_unreachable_percent: u8,
    /// Removed agent ids older than this are forgotten.
    pub registry_max_agent_age: Duration,
    /// At most this many removed agent ids are kept.
    pub registry_max_agent_count: usize,
    /// Several masters on etcd (`--registry etcd://…`); `None`: a single
    /// master with the embedded store in `work_dir`.
    pub etcd: Option<EtcdConfig>,
    /// `host:port` other masters give clients to reach this one when it
    /// leads; defaults to the listening address.
    pub advertise_address: Option<String>,
}

/// Default TTL of the leader's etcd lease: a killed leader is replaced
/// within about this long. etcd raises a TTL below 1.5 × its election
/// timeout (1 s by default) to that minimum.
pub const DEFAULT_LEADER_LEASE_TTL: Duration = Duration::from_secs(2);

/// Where the masters meet: etcd endpoints and the key prefix they share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster (`/corral` by default); several Corral
    /// clusters can share one etcd under different prefixes.
    pub prefix: String,
    /// TTL of the leader's lease, whole seconds (etcd's unit), at least 1.
    pub lease_ttl: Duration,
}

impl EtcdConfig {
    /// Parses `etcd://h1:2379,h2:2379[/prefix]`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| format!("{url:?}: must start with etcd://"))?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((hosts, path)) => (hosts, format!("/{}", path.trim_end_matches('/'))),
            None => (rest, "/corral".to_string()),
        };
        if prefix == "/" {
            return Err(format!("{url:?}: the key prefix must not be empty"));
        }
        let endpoints = corral_proto::leader::parse_masters(hosts)
            .map_err(|e| format!("{url:?}: {}", e.replace("master", "endpoint")))?;
        Ok(Self {
            endpoints: endpoints
                .into_iter()
                .map(|h| {
                    if h.contains("://") {
                        h
                    } else {
                        format!("http://{h}")
                    }
                })
                .collect(),
            prefix,
            lease_ttl: DEFAULT_LEADER_LEASE_TTL,
        })
    }
}

/// `N/DURATION`: at most `count` agent removals per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovalRate {
    pub count: u32,
    pub per: Duration,
}

impl RemovalRate {
    /// The spacing between two removals.
    pub fn interval(&self) -> Duration {
        self.per / self.count.max(1)
    }

    /// Parses `1/10s`, `5/1m`; `parse_duration` reads the duration part.
    pub fn parse(
        text: &str,
        parse_duration: impl Fn(&str) -> Result<Duration, String>,
    ) -> Result<Self, String> {
        let (count, per) = text
            .split_once('/')
            .ok_or_else(|| format!("agent_removal_rate: '{text}' is not COUNT/DURATION"))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| format!("agent_removal_rate: '{count}' is not a whole number"))?;
        if count == 0 {
            return Err("agent_removal_rate: the count must be > 0".into());
        }
        let per = parse_duration(per.trim()).map_err(|e| format!("agent_removal_rate: {e}"))?;
        if per.is_zero() {
            return Err("agent_removal_rate: the duration must be > 0".into());
        }
        Ok(Self { count, per })
    }
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
            work_dir: None,
            agent_reregister_timeout: DEFAULT_AGENT_REREGISTER_TIMEOUT,
            agent_removal_timeout: DEFAULT_AGENT_REMOVAL_TIMEOUT,
            agent_removal_rate: DEFAULT_AGENT_REMOVAL_RATE,
            max_unreachable_percent: DEFAULT_MAX_UNREACHABLE_PERCENT,
            registry_max_agent_age: DEFAULT_REGISTRY_MAX_AGENT_AGE,
            registry_max_agent_count: DEFAULT_REGISTRY_MAX_AGENT_COUNT,
            etcd: None,
            advertise_address: None,
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
            agent_reregister_timeout: Duration::from_secs(60),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(text: &str) -> Result<Duration, String> {
        text.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .map(Duration::from_secs)
            .ok_or_else(|| format!("'{text}' is not a duration"))
    }

    #[test]
    fn removal_rate_parses_count_per_duration_and_names_the_flag_on_errors() {
        let r = RemovalRate::parse("2/10s", secs).unwrap();
        assert_eq!(r.count, 2);
        assert_eq!(r.interval(), Duration::from_secs(5));
        for bad in ["10s", "0/10s", "x/10s", "1/ten", "1/0s"] {
            let e = RemovalRate::parse(bad, secs).expect_err(bad);
            assert!(e.starts_with("agent_removal_rate: "), "{bad}: {e}");
        }
    }
}
