//! Pod networking: one Linux bridge per agent, and per pod a network
//! namespace with its own address on it, joined by a veth pair — the CNI
//! `bridge` + `host-local` setup, done over rtnetlink rather than by running
//! `ip`.
//!
//! ```text
//!  agent's namespace                        pod namespace (pinned at <netns_dir>/<pod id>)
//!  corral0 10.88.0.1/16 ── cv1a2b3c4d ═══veth═══ eth0 10.88.0.2/16, default via 10.88.0.1
//!                      └── cv5e6f7a8b ═══veth═══ eth0 10.88.0.3/16 (another pod)
//! ```
//!
//! Containers of a pod join its namespace with `setns(fd, CLONE_NEWNET)`
//! ([`PodNet::netns_fd`]), so they share `lo` and reach each other on
//! `localhost`; pods and the host reach each other through the bridge. There
//! is no NAT or forwarding: pods reach the host and each other, not the
//! outside world.
//!
//! [`PodNetwork`] owns all of it for one agent. Addresses come from
//! [`Ipam`] (next-fit over the [`PodCidr`], skipping network, gateway and
//! broadcast) and are persisted one file per address, as host-local does,
//! so a restarted agent hands out no address twice ([`PodNetwork::recover`],
//! [`PodNetwork::sweep`]).
//!
//! Submodules: `ipam` (pure), `store` (persisted state), `netns` (namespace
//! pins; the only place that enters namespaces), `link` (netlink requests).

mod error;
mod ipam;
mod link;
mod netns;
mod store;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rtnetlink::packet_route::link::InfoKind;
use tracing::{info, warn};

pub use error::NetworkError;
pub use ipam::{Ipam, PodCidr};
pub use link::host_veth_name;
pub use netns::mount_points;

use store::{PodRecord, Store};

/// Default `--pod-bridge`: short, and named after the product like
/// `docker0` and `cni0`, so `ip link` shows whose it is.
pub const DEFAULT_POD_BRIDGE: &str = "corral0";

/// Longest interface name the kernel accepts (`IFNAMSIZ` minus the NUL).
pub const MAX_LINK_NAME_LEN: usize = 15;

/// Host veth names tried per pod before giving up: each is a fresh 32-bit
/// hash, so needing more than one is already a one-in-billions collision.
const MAX_VETH_NAME_ATTEMPTS: u32 = 16;

/// Checks a link name the way the kernel's `dev_valid_name` does: 1 to 15
/// bytes, not `.` or `..`, no `/`, `:`, whitespace or control characters.
pub fn validate_link_name(name: &str) -> Result<(), NetworkError> {
    let reason = if name.is_empty() {
        Some("must not be empty".to_string())
    } else if name.len() > MAX_LINK_NAME_LEN {
        Some(format!("must be at most {MAX_LINK_NAME_LEN} bytes"))
    } else if name == "." || name == ".." {
        Some("must not be '.' or '..'".to_string())
    } else if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some("must not contain '/', ':', whitespace or control characters".to_string())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetworkError::InvalidLinkName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Pod ids name files (the pin, the record), so they follow the id rules
/// of `corral_proto::ids`.
pub(crate) fn validate_pod_id(pod_id: &str) -> Result<(), NetworkError> {
    corral_proto::ids::validate_id(pod_id, "pod_id").map_err(|e| NetworkError::InvalidPodId {
        pod_id: pod_id.to_string(),
        reason: e.reason.to_string(),
    })
}

/// Where and what: the bridge, the address space, and two dirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetworkConfig {
    /// The bridge's name (`--pod-bridge`).
    pub bridge: String,
    /// The pods' addresses (`--pod-cidr`); its first host address is the
    /// bridge's.
    pub cidr: PodCidr,
    /// Persisted allocations and pod records.
    pub state_dir: PathBuf,
    /// Where pod namespaces are pinned, one bind mount per pod. A dir of
    /// the agent's own (not /run/netns): it is made a private mount point
    /// on first use and unmounted by [`PodNetwork::remove_bridge`].
    pub netns_dir: PathBuf,
}

impl PodNetworkConfig {
    /// The agent's layout: state in `<work_dir>/network`, pins in
    /// `<work_dir>/netns`.
    pub fn for_work_dir(work_dir: &Path, bridge: impl Into<String>, cidr: PodCidr) -> Self {
        Self {
            bridge: bridge.into(),
            cidr,
            state_dir: work_dir.join("network"),
            netns_dir: work_dir.join("netns"),
        }
    }

    fn validate(&self) -> Result<(), NetworkError> {
        validate_link_name(&self.bridge)?;
        // Pins must not be mistaken for state files or the reverse: sweep
        // treats every file in the netns dir as a pod's pin.
        if self.netns_dir.starts_with(&self.state_dir)
            || self.state_dir.starts_with(&self.netns_dir)
        {
            return Err(NetworkError::InvalidConfig {
                field: "netns_dir",
                reason: format!(
                    "{} and the state dir {} must not contain each other",
                    self.netns_dir.display(),
                    self.state_dir.display()
                ),
            });
        }
        Ok(())
    }
}

/// One pod's network, as set up or recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNet {
    pub pod_id: String,
    /// The pod's address on `eth0`.
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// The bridge's address, the pod's default route.
    pub gateway: Ipv4Addr,
    /// The pin of the pod's network namespace (a bind mount of nsfs).
    pub netns_path: PathBuf,
    /// The host end of the pod's veth pair, on the bridge.
    pub host_veth: String,
}

impl PodNet {
    /// Opens the pod's network namespace: the fd a container's init passes
    /// to `setns(fd, CLONE_NEWNET)`. Close-on-exec; the caller hands it to
    /// the child explicitly. Errors if the pin is gone or not a namespace.
    pub fn netns_fd(&self) -> Result<OwnedFd, NetworkError> {
        netns::open_pinned(&self.pod_id, &self.netns_path)
    }
}

/// The pod network of one agent. Methods take `&self` and may run
/// concurrently for different pods; two operations on the same pod at once
/// are refused ([`NetworkError::PodBusy`]).
pub struct PodNetwork {
    config: PodNetworkConfig,
    /// A netlink socket in the namespace of the thread that called
    /// [`PodNetwork::new`] (the host's, for an agent).
    handle: rtnetlink::Handle,
    connection: tokio::task::JoinHandle<()>,
    store: Store,
    /// Never held across an `.await`.
    state: Mutex<State>,
    /// Tests make setup fail after a chosen step to check the undo.
    #[cfg(test)]
    fail_after: Mutex<Option<SetupStep>>,
}

/// The steps of [`PodNetwork::setup`] after the reservation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum SetupStep {
    Persisted,
    Pinned,
    VethCreated,
    Configured,
}

struct State {
    ipam: Ipam,
    /// Pods with a record: set up, being set up, or left from before a
    /// restart.
    pods: BTreeMap<String, PodRecord>,
    /// Pods with a setup or teardown in progress.
    busy: HashSet<String>,
    /// The netns dir is known to be our private mount point.
    netns_dir_ready: bool,
}

/// Marks a pod busy for as long as it lives.
struct Claim<'a> {
    network: &'a PodNetwork,
    pod_id: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.network.state().busy.remove(&self.pod_id);
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// Runs blocking file work (fsync, mounts) off the async threads.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, NetworkError> + Send + 'static,
) -> Result<T, NetworkError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NetworkError::Thread {
            what: what.to_string(),
            reason: e.to_string(),
        })?
}

impl PodNetwork {
    /// Reads back the persisted allocations and pod records (nothing is
    /// changed: see [`PodNetwork::recover`] and [`PodNetwork::sweep`]) and
    /// opens a netlink socket in the calling thread's network namespace.
    /// Must be called inside a tokio runtime, which drives the socket.
    pub async fn new(config: PodNetworkConfig) -> Result<Self, NetworkError> {
        config.validate()?;
        let root = config.state_dir.clone();
        let (store, loaded) =
            blocking("loading pod network state", move || Store::open(&root)).await?;
        let ipam = Ipam::rebuild(config.cidr, loaded.allocations, loaded.last_reserved);
        let pods = loaded
            .records
            .into_iter()
            .map(|r| (r.pod_id.clone(), r))
            .collect();
        let (handle, connection) = link::connect("")?;
        Ok(Self {
            config,
            handle,
            connection,
            store,
            state: Mutex::new(State {
                ipam,
                pods,
                busy: HashSet::new(),
                netns_dir_ready: false,
            }),
            #[cfg(test)]
            fail_after: Mutex::new(None),
        })
    }

    /// Passes in production; in tests, fails if told to fail after `step`.
    fn step_done(&self, step: SetupStep) -> Result<(), NetworkError> {
        #[cfg(test)]
        if *self
            .fail_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            == Some(step)
        {
            return Err(NetworkError::Thread {
                what: "setup".into(),
                reason: format!("injected failure after {step:?}"),
            });
        }
        let _ = step;
        Ok(())
    }

    pub fn config(&self) -> &PodNetworkConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change under the lock is a single insert, remove or
        // assignment, so a panic while it was held left nothing
        // half-done: carry on rather than fail every later call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claim(&self, pod_id: &str) -> Result<Claim<'_>, NetworkError> {
        if !self.state().busy.insert(pod_id.to_string()) {
            return Err(NetworkError::PodBusy {
                pod_id: pod_id.to_string(),
            });
        }
        Ok(Claim {
            network: self,
            pod_id: pod_id.to_string(),
        })
    }

    fn pin_path(&self, pod_id: &str) -> PathBuf {
        self.config.netns_dir.join(pod_id)
    }

    fn pod_net(&self, record: &PodRecord) -> PodNet {
        PodNet {
            pod_id: record.pod_id.clone(),
            ip: record.ip,
            prefix_len: self.config.cidr.prefix_len(),
            gateway: self.config.cidr.gateway(),
            netns_path: self.pin_path(&record.pod_id),
            host_veth: record.host_veth.clone(),
        }
    }

    /// Creates the bridge if missing, gives it the gateway address (the
    /// CIDR's first host address) and brings it up. Idempotent; a link of
    /// that name that is not a bridge, or a bridge with another IPv4
    /// address, is an error naming it.
    pub async fn ensure_bridge(&self) -> Result<(), NetworkError> {
        let cidr = self.config.cidr;
        link::ensure_bridge(
            &self.handle,
            &self.config.bridge,
            cidr.gateway(),
            cidr.prefix_len(),
        )
        .await?;
        Ok(())
    }

    /// Gives `pod_id` a network: an address, a namespace pinned at
    /// `<netns_dir>/<pod_id>`, a veth pair from the bridge to `eth0` in the
    /// namespace, `lo` and `eth0` up, a default route via the gateway. On
    /// failure everything done so far is undone.
    pub async fn setup(&self, pod_id: &str) -> Result<PodNet, NetworkError> {
        validate_pod_id(pod_id)?;
        let _claim = self.claim(pod_id)?;
        let exists = || NetworkError::PodExists {
            pod_id: pod_id.to_string(),
        };
        {
            let state = self.state();
            if state.pods.contains_key(pod_id) || !state.ipam.addresses_of(pod_id).is_empty() {
                return Err(exists());
            }
        }
        let pin = self.pin_path(pod_id);
        let prepare_dir = !self.state().netns_dir_ready;
        let dir = self.config.netns_dir.clone();
        let pin_probe = pin.clone();
        let pin_exists = blocking("preparing the netns dir", move || {
            if prepare_dir {
                netns::ensure_private_mount(&dir)?;
            }
            Ok(pin_probe.symlink_metadata().is_ok())
        })
        .await?;
        self.state().netns_dir_ready = true;
        if pin_exists {
            return Err(exists());
        }

        let record = self.reserve(pod_id).await?;
        match self.build(&record, &pin).await {
            Ok(net) => {
                info!(pod_id, ip = %net.ip, host_veth = %net.host_veth, "pod network set up");
                Ok(net)
            }
            Err(e) => {
                if let Err(undo) = self.teardown_claimed(pod_id).await {
                    warn!(pod_id, error = %undo, "cannot undo a failed pod network setup");
                }
                Err(e)
            }
        }
    }

    /// Picks a host veth name no link and no other pod uses, allocates an
    /// address, and records both in memory (so a failed setup knows what
    /// to undo and concurrent setups never pick the same name).
    async fn reserve(&self, pod_id: &str) -> Result<PodRecord, NetworkError> {
        let mut tried = Vec::new();
        for attempt in 0..MAX_VETH_NAME_ATTEMPTS {
            let name = link::host_veth_name(pod_id, attempt);
            tried.push(name.clone());
            let used_by_pod = |state: &State| state.pods.values().any(|r| r.host_veth == name);
            // Two steps: the state guard must be gone before the `.await`.
            let used = used_by_pod(&self.state());
            if used || link::by_name(&self.handle, &name).await?.is_some() {
                continue;
            }
            let mut state = self.state();
            if used_by_pod(&state) {
                continue;
            }
            let ip = state.ipam.allocate(pod_id)?;
            let record = PodRecord {
                pod_id: pod_id.to_string(),
                ip,
                host_veth: name,
            };
            state.pods.insert(pod_id.to_string(), record.clone());
            return Ok(record);
        }
        Err(NetworkError::NoVethName {
            pod_id: pod_id.to_string(),
            tried: tried.join(", "),
        })
    }

    async fn build(&self, record: &PodRecord, pin: &Path) -> Result<PodNet, NetworkError> {
        let pod_id = record.pod_id.clone();
        // The record is on disk before anything exists that it names, so
        // after a crash teardown finds all of it.
        let store = self.store.clone();
        let persisted = record.clone();
        let cursor = self.state().ipam.last_reserved();
        blocking("persisting the pod address", move || {
            store.write_allocation(persisted.ip, &persisted.pod_id)?;
            if let Some(cursor) = cursor {
                store.write_last_reserved(cursor)?;
            }
            store.write_record(&persisted)
        })
        .await?;
        self.step_done(SetupStep::Persisted)?;

        netns::create_pinned(pin.to_path_buf()).await?;
        self.step_done(SetupStep::Pinned)?;
        let bridge = &self.config.bridge;
        let bridge_link =
            link::by_name(&self.handle, bridge)
                .await?
                .ok_or_else(|| NetworkError::NoBridge {
                    bridge: bridge.clone(),
                })?;
        if bridge_link.kind != Some(InfoKind::Bridge) {
            return Err(NetworkError::BridgeConflict {
                bridge: bridge.clone(),
                reason: format!("is a {}, not a bridge", bridge_link.kind_name()),
            });
        }
        let netns_fd = netns::open_pinned(&pod_id, pin)?;
        link::create_veth(
            &self.handle,
            &record.host_veth,
            bridge_link.index,
            netns_fd.as_fd(),
        )
        .await?;
        self.step_done(SetupStep::VethCreated)?;

        let net = self.pod_net(record);
        let (ip, prefix_len, gateway) = (net.ip, net.prefix_len, net.gateway);
        netns::in_netns(pin, netns_fd, move || async move {
            let (handle, connection) = link::connect(" in the pod's namespace")?;
            let configured = link::configure_pod_side(&handle, ip, prefix_len, gateway).await;
            connection.abort();
            configured
        })
        .await?;
        self.step_done(SetupStep::Configured)?;
        Ok(net)
    }

    /// Removes a pod's network: its host veth (the pod's `eth0` goes with
    /// it), the pin (the namespace itself ends when nothing else holds
    /// it), its address and record. Idempotent: a pod torn down twice, set
    /// up halfway, or never known is fine.
    pub async fn teardown(&self, pod_id: &str) -> Result<(), NetworkError> {
        validate_pod_id(pod_id)?;
        let _claim = self.claim(pod_id)?;
        self.teardown_claimed(pod_id).await?;
        info!(pod_id, "pod network torn down");
        Ok(())
    }

    async fn teardown_claimed(&self, pod_id: &str) -> Result<(), NetworkError> {
        let record = self.state().pods.get(pod_id).cloned();
        if let Some(record) = &record {
            self.delete_host_veth(record).await?;
        }
        let pin = self.pin_path(pod_id);
        blocking("removing the namespace pin", move || {
            netns::remove_pin(&pin)
        })
        .await?;
        let ips = self.state().ipam.addresses_of(pod_id);
        let store = self.store.clone();
        let id = pod_id.to_string();
        blocking("releasing the pod address", move || {
            for ip in ips {
                store.remove_allocation(ip, &id)?;
            }
            store.remove_record(&id)
        })
        .await?;
        // Forgotten in memory only once the files are gone, so a failed
        // teardown can be retried.
        let mut state = self.state();
        state.ipam.release_pod(pod_id);
        state.pods.remove(pod_id);
        Ok(())
    }

    /// Deletes the host veth named in `record` if it is ours: a veth on
    /// our bridge (or on none, if the bridge went away). A link of another
    /// kind that took the name since is left alone.
    async fn delete_host_veth(&self, record: &PodRecord) -> Result<(), NetworkError> {
        let Some(veth) = link::by_name(&self.handle, &record.host_veth).await? else {
            return Ok(());
        };
        let bridge = link::by_name(&self.handle, &self.config.bridge)
            .await?
            .map(|b| b.index);
        let ours = veth.kind == Some(InfoKind::Veth)
            && (veth.controller.is_none() || veth.controller == bridge);
        if ours {
            link::delete(&self.handle, &record.host_veth).await?;
        } else {
            warn!(pod_id = %record.pod_id, link = %record.host_veth, kind = %veth.kind_name(),
                  "leaving a link that is not this pod's veth");
        }
        Ok(())
    }

    /// The pods whose network survived (an agent restart): record, address,
    /// pinned namespace and host veth on the bridge all present. The
    /// agent keeps those whose containers it re-adopts and passes the rest
    /// to [`PodNetwork::sweep`]. Until swept, a half-set-up pod's address
    /// stays taken.
    pub async fn recover(&self) -> Result<Vec<PodNet>, NetworkError> {
        let records: Vec<PodRecord> = self.state().pods.values().cloned().collect();
        let bridge = link::by_name(&self.handle, &self.config.bridge)
            .await?
            .filter(|b| b.kind == Some(InfoKind::Bridge))
            .map(|b| b.index);
        let mut live = Vec::new();
        for record in records {
            let owned = self.config.cidr.contains(record.ip)
                && self.state().ipam.owner(record.ip) == Some(record.pod_id.as_str());
            let pin = self.pin_path(&record.pod_id);
            let pinned = blocking("checking a namespace pin", move || {
                Ok(netns::is_pinned(&pin))
            })
            .await?;
            let attached = match link::by_name(&self.handle, &record.host_veth).await? {
                Some(veth) => {
                    veth.kind == Some(InfoKind::Veth)
                        && bridge.is_some()
                        && veth.controller == bridge
                }
                None => false,
            };
            if owned && pinned && attached {
                live.push(self.pod_net(&record));
            } else {
                warn!(pod_id = %record.pod_id, owned, pinned, attached,
                      "pod network incomplete after restart; sweep will remove it");
            }
        }
        Ok(live)
    }

    /// Tears down every pod this network knows of — by record, by address
    /// or by a pin in the netns dir — except those in `keep`. Returns the
    /// pods torn down. Tries them all; the first error is returned after.
    pub async fn sweep(&self, keep: &HashSet<String>) -> Result<Vec<String>, NetworkError> {
        let mut ids: BTreeSet<String> = {
            let state = self.state();
            state
                .pods
                .keys()
                .cloned()
                .chain(state.ipam.allocations().map(|(_, pod)| pod.to_string()))
                .collect()
        };
        let dir = self.config.netns_dir.clone();
        let pins = blocking("listing namespace pins", move || {
            match std::fs::read_dir(&dir) {
                Ok(entries) => Ok(entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(source) => Err(NetworkError::Io {
                    what: "cannot read",
                    path: dir,
                    source,
                }),
            }
        })
        .await?;
        let mut stray = Vec::new();
        for name in pins {
            match validate_pod_id(&name) {
                Ok(()) => {
                    ids.insert(name);
                }
                Err(_) => stray.push(self.config.netns_dir.join(name)),
            }
        }
        let mut swept = Vec::new();
        let mut first_error = None;
        for pod_id in ids.into_iter().filter(|id| !keep.contains(id)) {
            match self.teardown(&pod_id).await {
                Ok(()) => swept.push(pod_id),
                Err(e) => {
                    warn!(pod_id = %pod_id, error = %e, "cannot sweep pod network");
                    first_error.get_or_insert(e);
                }
            }
        }
        for pin in stray {
            if let Err(e) = blocking("removing a stray pin", move || netns::remove_pin(&pin)).await
            {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(swept),
        }
    }

    /// For agent shutdown with no pods left (and tests): deletes the bridge
    /// and releases the netns dir's mount. Refuses while any pod has a
    /// record or an address. A later [`PodNetwork::ensure_bridge`] and
    /// [`PodNetwork::setup`] make both again.
    pub async fn remove_bridge(&self) -> Result<(), NetworkError> {
        let remaining: BTreeSet<String> = {
            let state = self.state();
            state
                .pods
                .keys()
                .cloned()
                .chain(state.ipam.allocations().map(|(_, pod)| pod.to_string()))
                .collect()
        };
        let bridge = &self.config.bridge;
        if !remaining.is_empty() {
            return Err(NetworkError::PodsRemain {
                bridge: bridge.clone(),
                count: remaining.len(),
            });
        }
        match link::by_name(&self.handle, bridge).await? {
            None => {}
            Some(l) if l.kind == Some(InfoKind::Bridge) => {
                link::delete(&self.handle, bridge).await?;
            }
            Some(l) => {
                return Err(NetworkError::BridgeConflict {
                    bridge: bridge.clone(),
                    reason: format!("is a {}, not a bridge; left alone", l.kind_name()),
                });
            }
        }
        let dir = self.config.netns_dir.clone();
        blocking("releasing the netns dir", move || {
            netns::release_private_mount(&dir)
        })
        .await?;
        self.state().netns_dir_ready = false;
        info!(bridge = %bridge, "pod bridge removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_follow_the_kernel_rules() {
        for ok in ["corral0", "br-pods", "a", "x23456789012345"] {
            validate_link_name(ok).unwrap();
        }
        for bad in [
            "",
            "x234567890123456",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\u{7}",
        ] {
            let err = validate_link_name(bad).unwrap_err();
            assert!(
                matches!(&err, NetworkError::InvalidLinkName { name, .. } if name == bad),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn pod_ids_follow_the_id_rules() {
        validate_pod_id("web-1").unwrap();
        for bad in ["", ".", "..", "a/b", "a\nb"] {
            assert!(matches!(
                validate_pod_id(bad),
                Err(NetworkError::InvalidPodId { .. })
            ));
        }
        assert!(validate_pod_id(&"p".repeat(256)).is_err());
    }

    #[test]
    fn the_agent_layout_keeps_pins_and_state_apart() {
        let c = PodNetworkConfig::for_work_dir(
            Path::new("/var/lib/corral/agent"),
            "corral0",
            PodCidr::DEFAULT,
        );
        assert_eq!(c.state_dir, Path::new("/var/lib/corral/agent/network"));
        assert_eq!(c.netns_dir, Path::new("/var/lib/corral/agent/netns"));
        c.validate().unwrap();
        let nested = PodNetworkConfig {
            netns_dir: c.state_dir.join("netns"),
            ..c.clone()
        };
        assert!(nested.validate().is_err());
        let bad_bridge = PodNetworkConfig {
            bridge: "much-too-long-bridge".into(),
            ..c
        };
        assert!(matches!(
            bad_bridge.validate(),
            Err(NetworkError::InvalidLinkName { .. })
        ));
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn mounts_under(root: &Path) -> Vec<PathBuf> {
        let root = std::fs::canonicalize(root).unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        mount_points(&info)
            .filter(|p| p.starts_with(&root))
            .collect()
    }

    /// Runs `body` on a thread in a network namespace of its own (so the
    /// host's links are never touched) with a current-thread runtime.
    /// Fails, never skips, without root.
    fn in_private_netns<F, Fut>(body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        // /proc/self belongs to the effective uid.
        let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
        assert_eq!(
            euid, 0,
            "this test creates network namespaces and links: run it as root"
        );
        let joined = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET) for the test");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(body());
        })
        .join();
        if let Err(panic) = joined {
            std::panic::resume_unwind(panic);
        }
    }

    #[test]
    fn setup_failing_after_any_step_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let cidr = PodCidr::parse("10.201.0.0/24").unwrap();
        let config = PodNetworkConfig::for_work_dir(dir.path(), "ctunit0", cidr);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            in_private_netns(move || async move {
                let net = PodNetwork::new(config.clone()).await.unwrap();
                net.ensure_bridge().await.unwrap();
                let veth = host_veth_name("pod-x", 0);
                for step in [
                    SetupStep::Persisted,
                    SetupStep::Pinned,
                    SetupStep::VethCreated,
                    SetupStep::Configured,
                ] {
                    *net.fail_after.lock().unwrap() = Some(step);
                    let err = net.setup("pod-x").await.unwrap_err();
                    assert!(err.to_string().contains(&format!("{step:?}")), "{err}");
                    {
                        let state = net.state();
                        assert!(state.pods.is_empty(), "record left after {step:?}");
                        assert!(state.ipam.is_empty(), "address left after {step:?}");
                        assert!(state.busy.is_empty(), "claim left after {step:?}");
                    }
                    assert!(
                        link::by_name(&net.handle, &veth).await.unwrap().is_none(),
                        "veth left after {step:?}"
                    );
                    assert!(
                        names_in(&config.netns_dir).is_empty(),
                        "pin left after {step:?}"
                    );
                    assert_eq!(
                        names_in(&config.state_dir.join("ips")),
                        ["last_reserved_ip"],
                        "address file left after {step:?}"
                    );
                    assert!(names_in(&config.state_dir.join("pods")).is_empty());
                    assert!(names_in(&config.state_dir.join("tmp")).is_empty());
                    // Only the netns dir's own mount, no pin.
                    assert_eq!(
                        mounts_under(&config.netns_dir),
                        [fs_real(&config.netns_dir)]
                    );
                }
                *net.fail_after.lock().unwrap() = None;
                let pod = net.setup("pod-x").await.unwrap();
                assert_eq!(pod.host_veth, veth);
                net.teardown("pod-x").await.unwrap();
                net.remove_bridge().await.unwrap();
            });
        }));
        let left = mounts_under(dir.path());
        for m in left.iter().rev() {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        assert!(left.is_empty(), "mounts left: {left:?}");
    }

    fn fs_real(p: &Path) -> PathBuf {
        std::fs::canonicalize(p).unwrap()
    }

    /// The lead's launch code awaits these on the multi-threaded runtime.
    #[allow(dead_code)]
    fn futures_are_send(network: &PodNetwork, keep: &HashSet<String>) {
        fn send<T: Send>(_: T) {}
        send(network.ensure_bridge());
        send(network.setup("p"));
        send(network.teardown("p"));
        send(network.recover());
        send(network.sweep(keep));
        send(network.remove_bridge());
    }
}
