//! The JSON view served at `GET /state`.

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct StateView {
    /// Empty until the master has assigned one.
    pub(crate) agent_id: String,
    pub(crate) hostname: String,
    pub(crate) address: String,
    /// True while registered on an open stream.
    pub(crate) connected: bool,
    /// Total resources in the flag text form (`cpus:4;mem:8192;...`).
    pub(crate) resources: String,
    /// Attribute name → text or number.
    pub(crate) attributes: BTreeMap<String, serde_json::Value>,
    pub(crate) status_updates_pending: usize,
    pub(crate) tasks: Vec<TaskView>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct TaskView {
    pub(crate) framework_id: String,
    pub(crate) task_id: String,
    pub(crate) name: String,
    /// e.g. `TASK_RUNNING`.
    pub(crate) state: String,
    /// Process group id of the running command; absent once it exited.
    pub(crate) pid: Option<u32>,
    pub(crate) sandbox: String,
    pub(crate) exit_code: Option<i32>,
    pub(crate) signal: Option<i32>,
    /// Latest cgroup usage of the task's container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) usage: Option<UsageView>,
    /// The task's pod, and its address once its network is up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pod_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pod_ip: Option<String>,
    /// Times its container restarted in place (its pod's restart policy).
    pub(crate) restart_count: u32,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct UsageView {
    pub(crate) cpu_user_seconds: f64,
    pub(crate) cpu_system_seconds: f64,
    pub(crate) cpu_throttled_periods: u64,
    pub(crate) cpu_throttled_seconds: f64,
    pub(crate) mem_rss_bytes: u64,
    pub(crate) mem_cache_bytes: u64,
    pub(crate) mem_limit_bytes: u64,
    pub(crate) pids: u64,
}

impl From<&crate::containerizer::Usage> for UsageView {
    fn from(u: &crate::containerizer::Usage) -> Self {
        Self {
            cpu_user_seconds: u.cpu_user_seconds,
            cpu_system_seconds: u.cpu_system_seconds,
            cpu_throttled_periods: u.cpu_throttled_periods,
            cpu_throttled_seconds: u.cpu_throttled_seconds,
            mem_rss_bytes: u.mem_rss_bytes,
            mem_cache_bytes: u.mem_cache_bytes,
            mem_limit_bytes: u.mem_limit_bytes,
            pids: u.pids,
        }
    }
}
