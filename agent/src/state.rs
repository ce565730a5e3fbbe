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
}
