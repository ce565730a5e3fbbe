//! Links, addresses and routes over rtnetlink: the bridge, the veth pairs
//! and the inside of a pod's namespace. Each function talks to whichever
//! namespace the [`Handle`]'s socket was opened in.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo, LinkMessage,
};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest, Sha256};

use super::NetworkError;

/// The name of the pod's end of its veth pair, inside its namespace.
pub(crate) const POD_IFNAME: &str = "eth0";

fn netlink(what: &'static str, link: &str) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let link = link.to_string();
    move |source| NetworkError::Netlink { what, link, source }
}

/// The errno of a netlink error answer, positive (`ENODEV`, `EEXIST`).
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// What the tools need to know about an existing link.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    pub index: u32,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            kind: None,
            controller: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    link.kind = infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.clone()),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        link
    }

    pub fn kind_name(&self) -> String {
        self.kind
            .as_ref()
            .map_or_else(|| "device".to_string(), |k| k.to_string())
    }
}

/// The link called `name`, if there is one.
pub(crate) async fn by_name(handle: &Handle, name: &str) -> Result<Option<Link>, NetworkError> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(netlink("cannot look up link", name)(e)),
    }
}

/// The IPv4 addresses (with prefix lengths) on link `index`.
pub(crate) async fn ipv4_addresses(
    handle: &Handle,
    index: u32,
    name: &str,
) -> Result<Vec<(Ipv4Addr, u8)>, NetworkError> {
    let mut out = Vec::new();
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(netlink("cannot list addresses of", name))?
    {
        if msg.header.family != AddressFamily::Inet {
            continue;
        }
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the
        // same except on point-to-point links.
        let local = msg.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::address::AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
            _ => None,
        });
        let address = msg.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::address::AddressAttribute::Address(IpAddr::V4(ip)) => {
                Some(*ip)
            }
            _ => None,
        });
        if let Some(ip) = local.or(address) {
            out.push((ip, msg.header.prefix_len));
        }
    }
    Ok(out)
}

/// A fixed, locally administered MAC for the bridge, derived from its name.
/// Left to itself a bridge takes the lowest MAC of its ports, so it would
/// change as pods come and go and every pod's ARP entry for the gateway
/// would go stale; a MAC set at creation never changes.
fn bridge_mac(bridge: &str) -> Vec<u8> {
    let digest = Sha256::digest(format!("corral-bridge:{bridge}").as_bytes());
    let mut mac = vec![0x02];
    mac.extend_from_slice(&digest[..5]);
    mac
}

/// Creates the bridge if missing, makes sure its only IPv4 address is
/// `gateway/prefix_len`, and brings it up. Returns its index.
pub(crate) async fn ensure_bridge(
    handle: &Handle,
    bridge: &str,
    gateway: Ipv4Addr,
    prefix_len: u8,
) -> Result<u32, NetworkError> {
    let link = match by_name(handle, bridge).await? {
        Some(link) => link,
        None => {
            let created = handle
                .link()
                .add(LinkBridge::new(bridge).address(bridge_mac(bridge)).build())
                .execute()
                .await;
            match created {
                Ok(()) => {}
                // Created meanwhile by someone else: checked below.
                Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                Err(e) => return Err(netlink("cannot create bridge", bridge)(e)),
            }
            by_name(handle, bridge)
                .await?
                .ok_or_else(|| NetworkError::NoBridge {
                    bridge: bridge.to_string(),
                })?
        }
    };
    if link.kind != Some(InfoKind::Bridge) {
        return Err(NetworkError::BridgeConflict {
            bridge: bridge.to_string(),
            reason: format!(
                "the link exists and is a {}, not a bridge",
                link.kind_name()
            ),
        });
    }
    let addresses = ipv4_addresses(handle, link.index, bridge).await?;
    if addresses.is_empty() {
        handle
            .address()
            .add(link.index, IpAddr::V4(gateway), prefix_len)
            .execute()
            .await
            .map_err(netlink("cannot add the gateway address to", bridge))?;
    } else if addresses != [(gateway, prefix_len)] {
        let found: Vec<String> = addresses
            .iter()
            .map(|(ip, p)| format!("{ip}/{p}"))
            .collect();
        return Err(NetworkError::BridgeConflict {
            bridge: bridge.to_string(),
            reason: format!(
                "has address {}, expected only {gateway}/{prefix_len} (another --pod-cidr?)",
                found.join(", ")
            ),
        });
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(link.index).up().build())
        .execute()
        .await
        .map_err(netlink("cannot bring up", bridge))?;
    Ok(link.index)
}

/// Deletes link `name` if it exists; `Ok(false)` if it did not.
pub(crate) async fn delete(handle: &Handle, name: &str) -> Result<bool, NetworkError> {
    let Some(link) = by_name(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(link.index).execute().await {
        Ok(()) => Ok(true),
        // Gone meanwhile (its peer's namespace went away).
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(netlink("cannot delete link", name)(e)),
    }
}

/// The `attempt`-th candidate name for a pod's host-side veth: `cv` and 8
/// hex digits of a hash of the pod id, 10 bytes (the kernel allows 15).
/// Later attempts hash in the attempt number, for when another link
/// already has the name.
pub fn host_veth_name(pod_id: &str, attempt: u32) -> String {
    let mut hasher = Sha256::new();
    hasher.update(pod_id.as_bytes());
    if attempt > 0 {
        hasher.update(format!("\0{attempt}").as_bytes());
    }
    let digest = hasher.finalize();
    format!("cv{}", hex::encode(&digest[..4]))
}

/// Creates the veth pair in one request, as `ip link add HOST master
/// BRIDGE up type veth peer name eth0 netns POD` does: the host end on the
/// bridge and up, the pod end created directly inside the pod's namespace,
/// so no `eth0` ever appears on the host.
pub(crate) async fn create_veth(
    handle: &Handle,
    host: &str,
    bridge_index: u32,
    pod_netns: BorrowedFd<'_>,
) -> Result<(), NetworkError> {
    let peer = LinkUnspec::new_with_name(POD_IFNAME)
        .setns_by_fd(pod_netns.as_raw_fd())
        .build();
    let message = LinkVeth::new(host, POD_IFNAME)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .controller(bridge_index)
        .up()
        .build();
    handle
        .link()
        .add(message)
        .execute()
        .await
        .map_err(netlink("cannot create veth", host))
}

/// Inside a pod's namespace: `lo` and `eth0` up, `ip/prefix_len` on
/// `eth0`, default route via `gateway`.
pub(crate) async fn configure_pod_side(
    handle: &Handle,
    ip: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
) -> Result<(), NetworkError> {
    for name in ["lo", POD_IFNAME] {
        let link = by_name(handle, name)
            .await?
            .ok_or_else(|| NetworkError::MissingLink {
                link: name.to_string(),
                context: "in the pod's namespace",
            })?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(link.index).up().build())
            .execute()
            .await
            .map_err(netlink("cannot bring up", name))?;
        if name == POD_IFNAME {
            handle
                .address()
                .add(link.index, IpAddr::V4(ip), prefix_len)
                .execute()
                .await
                .map_err(netlink("cannot add the pod address to", name))?;
            // After the address: the gateway must be on a connected route.
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gateway)
                .output_interface(link.index)
                .build();
            handle
                .route()
                .add(route)
                .execute()
                .await
                .map_err(netlink("cannot add the default route via", name))?;
        }
    }
    Ok(())
}

/// Opens a netlink connection in the calling thread's namespace and drives
/// it on the current runtime; the task ends when the handle is dropped.
pub(crate) fn connect(
    context: &str,
) -> Result<(Handle, tokio::task::JoinHandle<()>), NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|source| NetworkError::Socket {
            context: context.to_string(),
            source,
        })?;
    Ok((handle, tokio::spawn(connection)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_ifnamsiz_and_differ_per_attempt() {
        let long = "p".repeat(255);
        let names: Vec<String> = (0..4).map(|a| host_veth_name(&long, a)).collect();
        for n in &names {
            assert_eq!(n.len(), 10, "{n}");
            assert!(n.starts_with("cv") && n[2..].chars().all(|c| c.is_ascii_hexdigit()));
        }
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(unique.len(), names.len());
        // Stable: the same pod gets the same name after a restart.
        assert_eq!(host_veth_name("web-1", 0), host_veth_name("web-1", 0));
        assert_ne!(host_veth_name("web-1", 0), host_veth_name("web-2", 0));
    }

    #[test]
    fn bridge_mac_is_stable_unicast_and_locally_administered() {
        let mac = bridge_mac("corral0");
        assert_eq!(mac.len(), 6);
        assert_eq!(mac[0] & 0x03, 0x02);
        assert_eq!(mac, bridge_mac("corral0"));
        assert_ne!(mac, bridge_mac("corral1"));
    }
}
