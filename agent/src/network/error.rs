//! [`NetworkError`]: everything pod networking can fail with.

use std::path::PathBuf;

/// Why a pod network operation failed. Messages name the pod, link or path
/// concerned, so a log line or a task's failure message says what to look at.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// `--pod-cidr` (or a config) is not a usable IPv4 network.
    #[error("invalid pod cidr '{cidr}': {reason}")]
    InvalidCidr { cidr: String, reason: String },
    /// A link name (`--pod-bridge`) the kernel would refuse.
    #[error("invalid link name '{name}': {reason}")]
    InvalidLinkName { name: String, reason: String },
    /// A [`super::PodNetworkConfig`] field that cannot work.
    #[error("{field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("invalid pod id '{pod_id}': {reason}")]
    InvalidPodId { pod_id: String, reason: String },
    /// Every usable address of the pod network is taken.
    #[error("no free address left in pod cidr {cidr}")]
    Exhausted { cidr: String },
    #[error("pod {pod_id} already has a network (tear it down first)")]
    PodExists { pod_id: String },
    /// Another setup or teardown of the same pod is running.
    #[error("pod {pod_id}: another network setup or teardown is in progress")]
    PodBusy { pod_id: String },
    #[error("pod {pod_id} has no network")]
    UnknownPod { pod_id: String },
    /// Every candidate host-side veth name is taken by some other link.
    #[error("pod {pod_id}: no free host veth name (tried {tried})")]
    NoVethName { pod_id: String, tried: String },
    /// The bridge exists but is not what this agent would have made.
    #[error("bridge {bridge}: {reason}")]
    BridgeConflict { bridge: String, reason: String },
    #[error("bridge {bridge} is missing (ensure_bridge first)")]
    NoBridge { bridge: String },
    #[error("bridge {bridge} still has {count} pod(s); tear them down first")]
    PodsRemain { bridge: String, count: usize },
    /// A netlink request failed; `what` says which, `link` names the link.
    #[error("{what} {link}: {source}")]
    Netlink {
        what: &'static str,
        link: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// A link that must exist (`lo`, the pod's `eth0`) does not.
    #[error("link {link} is missing {context}")]
    MissingLink { link: String, context: &'static str },
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket{context}: {source}")]
    Socket {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A namespace or mount syscall failed.
    #[error("{what} {path}: {source}")]
    Sys {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A persisted allocation or pod record that cannot be parsed.
    #[error("corrupt pod network state {path}: {reason}")]
    CorruptState { path: PathBuf, reason: String },
    /// The pin of a pod's namespace is missing or not a network namespace.
    #[error("pod {pod_id}: {path} is not a pinned network namespace")]
    NotPinned { pod_id: String, path: PathBuf },
    /// A helper thread (namespace creation, in-namespace configuration)
    /// could not be started or died without an answer.
    #[error("pod network helper thread for {what}: {reason}")]
    Thread { what: String, reason: String },
}
