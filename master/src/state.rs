//! The `/state` document: what the master knows, as JSON. The CLI reads the
//! same types back (`corral agents`, `corral tasks`), so they are public and
//! `Deserialize`.

use std::collections::BTreeMap;

use corral_proto::Resources;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub version: String,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub timestamp: f64,
    pub agents: Vec<AgentState>,
    pub frameworks: Vec<FrameworkState>,
    /// Tasks the master tracks: non-terminal ones, and terminal ones whose
    /// last update the framework has not acknowledged yet.
    pub tasks: Vec<TaskState>,
    /// The most recent tasks that ended and were acknowledged (bounded).
    pub completed_tasks: Vec<TaskState>,
    /// Persistent volumes, by framework and id.
    #[serde(default)]
    pub volumes: Vec<VolumeState>,
    /// Agents removed for good (not in `agents`).
    #[serde(default)]
    pub gone_agents: usize,
    /// Removal of unreachable agents is halted: too many are unreachable.
    #[serde(default)]
    pub agent_removal_halted: bool,
    /// The leading master's epoch (fencing token) in its registry.
    #[serde(default)]
    pub epoch: u64,
    #[serde(default)]
    pub registry_id: String,
}

/// A persistent volume. Its disk counts in its agent's and framework's
/// `used_resources` until it is destroyed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeState {
    pub id: String,
    pub framework_id: String,
    pub agent_id: String,
    pub disk_mib: f64,
    /// A live task that mounts it (one of its pod's tasks), if one does.
    pub in_use_by: Option<String>,
}

/// Resources as JSON: scalars as numbers, ports in the text range form.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourcesJson {
    pub cpus: f64,
    pub mem: f64,
    pub disk: f64,
    pub gpus: f64,
    pub ports: String,
}

impl ResourcesJson {
    pub fn scalars(&self) -> [f64; 4] {
        [self.cpus, self.mem, self.disk, self.gpus]
    }
}

impl From<&Resources> for ResourcesJson {
    fn from(r: &Resources) -> Self {
        Self {
            cpus: r.cpus.as_f64(),
            mem: r.mem.as_f64(),
            disk: r.disk.as_f64(),
            gpus: r.gpus.as_f64(),
            ports: if r.ports.is_empty() {
                String::new()
            } else {
                r.ports.to_string()
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    pub id: String,
    pub hostname: String,
    pub address: String,
    /// `connected`; `disconnected` (its stream closed: no offers, tasks
    /// untouched, until it re-registers or is unreachable); `unreachable`;
    /// or `recovering` (after a master restart, not back yet).
    pub state: String,
    pub resources: ResourcesJson,
    /// Held by live tasks (not by outstanding offers: those are
    /// `offered_resources`).
    pub used_resources: ResourcesJson,
    pub offered_resources: ResourcesJson,
    pub attributes: BTreeMap<String, String>,
    pub registered_at: f64,
    pub tasks: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FrameworkState {
    pub id: String,
    pub name: String,
    pub user: String,
    pub role: String,
    pub hostname: String,
    /// `connected` or `disconnected`.
    pub state: String,
    pub suppressed: bool,
    pub failover_timeout_seconds: f64,
    pub registered_at: f64,
    pub dominant_share: f64,
    pub used_resources: ResourcesJson,
    pub offered_resources: ResourcesJson,
    pub tasks: usize,
    pub offers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskState {
    pub id: String,
    pub name: String,
    pub framework_id: String,
    pub agent_id: String,
    /// e.g. `TASK_RUNNING`.
    pub state: String,
    /// e.g. `INVALID_OFFERS`; empty when there is none.
    pub reason: String,
    pub message: String,
    pub resources: ResourcesJson,
    pub exit_code: Option<i32>,
    pub updated_at: f64,
    /// Latest container usage reported by the agent (isolated tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageJson>,
    /// Latest liveness verdict of the task's health checks, once there is
    /// one (tasks with a liveness or startup check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
    /// Latest readiness verdict (tasks with a readiness check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// The address of the task's pod (tasks launched in a pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// Times the agent restarted the task's container in its pod.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restart_count: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A container's usage as sampled by its agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageJson {
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub cpu_throttled_periods: u64,
    pub cpu_throttled_seconds: f64,
    pub mem_rss_bytes: u64,
    pub mem_cache_bytes: u64,
    pub mem_limit_bytes: u64,
    pub pids: u64,
    pub timestamp: f64,
}

impl From<&corral_proto::pb::ContainerUsage> for UsageJson {
    fn from(u: &corral_proto::pb::ContainerUsage) -> Self {
        Self {
            cpu_user_seconds: u.cpu_user_seconds,
            cpu_system_seconds: u.cpu_system_seconds,
            cpu_throttled_periods: u.cpu_throttled_periods,
            cpu_throttled_seconds: u.cpu_throttled_seconds,
            mem_rss_bytes: u.mem_rss_bytes,
            mem_cache_bytes: u.mem_cache_bytes,
            mem_limit_bytes: u.mem_limit_bytes,
            pids: u.pids,
            timestamp: u.timestamp,
        }
    }
}
