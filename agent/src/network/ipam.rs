//! The pod network's address space ([`PodCidr`]) and the pure address
//! allocator ([`Ipam`]): no I/O; the persistence lives in `store`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::NetworkError;

/// Ranges a pod network must not overlap: routing pod traffic into them
/// would break the host (loopback, link-local) or cannot work at all
/// (multicast, reserved, "this network").
const FORBIDDEN: [(Ipv4Addr, u8, &str); 5] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8, "'this network' 0.0.0.0/8"),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback 127.0.0.0/8"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local 169.254.0.0/16",
    ),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast 224.0.0.0/4"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved 240.0.0.0/4"),
];

/// An IPv4 network for pods, e.g. `10.88.0.0/16`: its first host address
/// is the bridge's (the pods' gateway), the others up to the one before
/// broadcast go to pods. Validated on construction, so holding one means
/// it is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodCidr {
    network: Ipv4Addr,
    prefix_len: u8,
}

impl PodCidr {
    /// `10.88.0.0/16`, the default of podman's and containerd's CNI
    /// bridge: private (RFC 1918), rarely used by LANs, 65,533 pods.
    pub const DEFAULT: PodCidr = PodCidr {
        network: Ipv4Addr::new(10, 88, 0, 0),
        prefix_len: 16,
    };
    /// Longest prefix: a /30 leaves exactly one pod address (network,
    /// gateway and broadcast take the other three).
    pub const MAX_PREFIX_LEN: u8 = 30;
    /// Shortest prefix: anything larger than a /8 would swallow whole
    /// address classes (and a /0 the default route).
    pub const MIN_PREFIX_LEN: u8 = 8;

    /// Parses `A.B.C.D/N`. The error says what is wrong (IPv6, missing or
    /// out-of-range prefix, host bits set, a forbidden range).
    pub fn parse(text: &str) -> Result<Self, NetworkError> {
        let invalid = |reason: String| NetworkError::InvalidCidr {
            cidr: text.to_string(),
            reason,
        };
        let trimmed = text.trim();
        let Some((addr, prefix)) = trimmed.split_once('/') else {
            return Err(invalid(
                "missing the '/<prefix length>' (e.g. 10.88.0.0/16)".into(),
            ));
        };
        let network = match Ipv4Addr::from_str(addr) {
            Ok(a) => a,
            Err(_) if Ipv6Addr::from_str(addr).is_ok() => {
                return Err(invalid("only IPv4 pod networks are supported".into()));
            }
            Err(_) => return Err(invalid(format!("'{addr}' is not an IPv4 address"))),
        };
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| invalid(format!("'{prefix}' is not a prefix length (0-32)")))?;
        if prefix_len > Self::MAX_PREFIX_LEN {
            return Err(invalid(format!(
                "a /{prefix_len} leaves no address for pods (at most /{})",
                Self::MAX_PREFIX_LEN
            )));
        }
        if prefix_len < Self::MIN_PREFIX_LEN {
            return Err(invalid(format!(
                "a /{prefix_len} is too large (at least /{})",
                Self::MIN_PREFIX_LEN
            )));
        }
        let masked = Ipv4Addr::from(u32::from(network) & mask(prefix_len));
        if masked != network {
            return Err(invalid(format!(
                "host bits are set; the network is {masked}/{prefix_len}"
            )));
        }
        let cidr = PodCidr {
            network,
            prefix_len,
        };
        for (net, len, name) in FORBIDDEN {
            let other = PodCidr {
                network: net,
                prefix_len: len,
            };
            if cidr.overlaps(&other) {
                return Err(invalid(format!("overlaps {name}")));
            }
        }
        Ok(cidr)
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The bridge's address and the pods' default gateway: the first host
    /// address (as with docker0 and CNI's bridge plugin).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask(self.prefix_len))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix_len) == u32::from(self.network)
    }

    /// First and last address handed to pods.
    pub fn pod_range(&self) -> (Ipv4Addr, Ipv4Addr) {
        (
            Ipv4Addr::from(u32::from(self.network) + 2),
            Ipv4Addr::from(u32::from(self.broadcast()) - 1),
        )
    }

    /// How many pods fit.
    pub fn capacity(&self) -> u32 {
        let (first, last) = self.pod_range();
        u32::from(last) - u32::from(first) + 1
    }

    fn overlaps(&self, other: &PodCidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

impl Default for PodCidr {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl FromStr for PodCidr {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for PodCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

fn mask(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

/// Which pod owns which address, and where the next search starts.
///
/// Next-fit, like CNI's host-local plugin: the search starts after the
/// last address handed out and wraps around, so an address a pod just
/// released is not given to the next pod at once — a peer still holding a
/// connection or an ARP entry for it would otherwise reach the wrong pod.
/// Addresses outside the CIDR (persisted under an earlier `--pod-cidr`)
/// stay owned until released but are never handed out.
#[derive(Debug, Clone)]
pub struct Ipam {
    cidr: PodCidr,
    owners: BTreeMap<Ipv4Addr, String>,
    last_reserved: Option<Ipv4Addr>,
}

impl Ipam {
    pub fn new(cidr: PodCidr) -> Self {
        Self {
            cidr,
            owners: BTreeMap::new(),
            last_reserved: None,
        }
    }

    /// The allocator as it was: `allocations` are (address, pod id) pairs
    /// read back from disk, `last_reserved` the persisted next-fit cursor.
    pub fn rebuild(
        cidr: PodCidr,
        allocations: impl IntoIterator<Item = (Ipv4Addr, String)>,
        last_reserved: Option<Ipv4Addr>,
    ) -> Self {
        Self {
            cidr,
            owners: allocations.into_iter().collect(),
            last_reserved,
        }
    }

    pub fn cidr(&self) -> PodCidr {
        self.cidr
    }

    /// Hands the next free address after the cursor to `pod_id`.
    pub fn allocate(&mut self, pod_id: &str) -> Result<Ipv4Addr, NetworkError> {
        let (first, last) = self.cidr.pod_range();
        let (first, last) = (u32::from(first), u32::from(last));
        let taken = self
            .owners
            .range(Ipv4Addr::from(first)..=Ipv4Addr::from(last))
            .count();
        // `taken` is at most the capacity (a u32), so this cannot truncate.
        if taken as u64 >= u64::from(self.cidr.capacity()) {
            return Err(NetworkError::Exhausted {
                cidr: self.cidr.to_string(),
            });
        }
        let start = match self.last_reserved.map(u32::from) {
            Some(l) if (first..last).contains(&l) => l + 1,
            _ => first,
        };
        let mut candidate = start;
        // Bounded by the capacity; the check above guarantees a hit.
        for _ in 0..self.cidr.capacity() {
            let ip = Ipv4Addr::from(candidate);
            if let std::collections::btree_map::Entry::Vacant(free) = self.owners.entry(ip) {
                free.insert(pod_id.to_string());
                self.last_reserved = Some(ip);
                return Ok(ip);
            }
            candidate = if candidate >= last {
                first
            } else {
                candidate + 1
            };
        }
        Err(NetworkError::Exhausted {
            cidr: self.cidr.to_string(),
        })
    }

    /// Frees `ip`; returns its owner, if it had one. The cursor stays.
    pub fn release(&mut self, ip: Ipv4Addr) -> Option<String> {
        self.owners.remove(&ip)
    }

    /// Frees every address `pod_id` owns; returns them.
    pub fn release_pod(&mut self, pod_id: &str) -> Vec<Ipv4Addr> {
        let ips = self.addresses_of(pod_id);
        for ip in &ips {
            self.owners.remove(ip);
        }
        ips
    }

    pub fn owner(&self, ip: Ipv4Addr) -> Option<&str> {
        self.owners.get(&ip).map(String::as_str)
    }

    pub fn addresses_of(&self, pod_id: &str) -> Vec<Ipv4Addr> {
        self.owners
            .iter()
            .filter(|(_, owner)| owner.as_str() == pod_id)
            .map(|(ip, _)| *ip)
            .collect()
    }

    /// Every (address, owner), in address order.
    pub fn allocations(&self) -> impl Iterator<Item = (Ipv4Addr, &str)> {
        self.owners.iter().map(|(ip, pod)| (*ip, pod.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// The next-fit cursor, to persist with the allocations.
    pub fn last_reserved(&self) -> Option<Ipv4Addr> {
        self.last_reserved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> PodCidr {
        PodCidr::parse(text).unwrap()
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    #[test]
    fn default_cidr_is_10_88_0_0_16_with_gateway_dot_1() {
        let c = PodCidr::DEFAULT;
        assert_eq!(c, cidr("10.88.0.0/16"));
        assert_eq!(c.to_string(), "10.88.0.0/16");
        assert_eq!(c.gateway(), ip("10.88.0.1"));
        assert_eq!(c.broadcast(), ip("10.88.255.255"));
        assert_eq!(c.pod_range(), (ip("10.88.0.2"), ip("10.88.255.254")));
        assert_eq!(c.capacity(), 65_533);
        assert!(c.contains(ip("10.88.200.3")));
        assert!(!c.contains(ip("10.89.0.1")));
    }

    #[test]
    fn cidr_parse_errors_say_what_is_wrong() {
        let reason = |text: &str| match PodCidr::parse(text) {
            Err(NetworkError::InvalidCidr { cidr, reason }) => {
                assert_eq!(cidr, text);
                reason
            }
            other => panic!("{text}: expected InvalidCidr, got {other:?}"),
        };
        assert!(reason("10.88.0.0").contains("missing"));
        assert!(reason("fd00::/64").contains("IPv4"));
        assert!(reason("10.88.0/16").contains("not an IPv4 address"));
        assert!(reason("10.88.0.0/33").contains("prefix length"));
        assert!(reason("10.88.0.0/x").contains("prefix length"));
        assert!(reason("10.88.0.0/31").contains("at most /30"));
        assert!(reason("10.88.0.4/32").contains("at most /30"));
        assert!(reason("10.0.0.0/7").contains("at least /8"));
        assert!(reason("10.88.0.1/16").contains("10.88.0.0/16"));
        assert!(reason("127.0.0.0/8").contains("loopback"));
        assert!(reason("169.254.0.0/16").contains("link-local"));
        assert!(reason("224.1.0.0/16").contains("multicast"));
        assert!(reason("0.0.0.0/8").contains("this network"));
        assert!(reason("250.0.0.0/8").contains("reserved"));
        assert_eq!(cidr(" 192.168.7.0/24 ").to_string(), "192.168.7.0/24");
    }

    #[test]
    fn allocation_skips_network_gateway_and_broadcast() {
        let mut ipam = Ipam::new(cidr("192.168.5.0/29"));
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("p{i}")).unwrap())
            .collect();
        // .0 network, .1 gateway, .7 broadcast.
        assert_eq!(
            got,
            [
                "192.168.5.2",
                "192.168.5.3",
                "192.168.5.4",
                "192.168.5.5",
                "192.168.5.6"
            ]
            .map(ip)
        );
        assert!(matches!(
            ipam.allocate("p5"),
            Err(NetworkError::Exhausted { .. })
        ));
    }

    #[test]
    fn a_slash_30_holds_exactly_one_pod_and_exhaustion_names_the_cidr() {
        let mut ipam = Ipam::new(cidr("10.1.2.4/30"));
        assert_eq!(ipam.allocate("a").unwrap(), ip("10.1.2.6"));
        let err = ipam.allocate("b").unwrap_err();
        assert!(matches!(err, NetworkError::Exhausted { .. }));
        assert!(err.to_string().contains("10.1.2.4/30"), "{err}");
        assert_eq!(ipam.release(ip("10.1.2.6")).as_deref(), Some("a"));
        assert_eq!(ipam.allocate("b").unwrap(), ip("10.1.2.6"));
    }

    #[test]
    fn next_fit_does_not_reuse_a_just_released_address() {
        let mut ipam = Ipam::new(cidr("10.0.0.0/29"));
        let a = ipam.allocate("a").unwrap();
        let b = ipam.allocate("b").unwrap();
        assert_eq!((a, b), (ip("10.0.0.2"), ip("10.0.0.3")));
        ipam.release(a);
        // Not .2 again: the search continues after the last one handed out.
        assert_eq!(ipam.allocate("c").unwrap(), ip("10.0.0.4"));
        assert_eq!(ipam.release_pod("b"), vec![b]);
        assert_eq!(ipam.allocate("d").unwrap(), ip("10.0.0.5"));
        assert_eq!(ipam.allocate("e").unwrap(), ip("10.0.0.6"));
        // Wrapped around: the free ones are reused in address order.
        assert_eq!(ipam.allocate("f").unwrap(), a);
        assert_eq!(ipam.allocate("g").unwrap(), b);
        assert!(ipam.allocate("h").is_err());
    }

    #[test]
    fn rebuild_keeps_owners_and_the_cursor() {
        let c = cidr("10.0.0.0/28");
        let mut before = Ipam::new(c);
        for p in ["a", "b", "c", "d"] {
            before.allocate(p).unwrap();
        }
        before.release(ip("10.0.0.3"));
        let persisted: Vec<(Ipv4Addr, String)> = before
            .allocations()
            .map(|(i, p)| (i, p.to_string()))
            .collect();
        let mut after = Ipam::rebuild(c, persisted, before.last_reserved());
        assert_eq!(after.owner(ip("10.0.0.2")), Some("a"));
        assert_eq!(after.owner(ip("10.0.0.3")), None);
        assert_eq!(after.addresses_of("d"), vec![ip("10.0.0.5")]);
        // Next-fit survives the restart: .3 was freed but is not next.
        assert_eq!(after.allocate("e").unwrap(), ip("10.0.0.6"));
        // Without a cursor, still never an owned address.
        let mut fresh = Ipam::rebuild(
            c,
            after
                .allocations()
                .map(|(i, p)| (i, p.to_string()))
                .collect::<Vec<_>>(),
            None,
        );
        assert_eq!(fresh.allocate("f").unwrap(), ip("10.0.0.3"));
        assert_eq!(fresh.allocate("g").unwrap(), ip("10.0.0.7"));
    }

    #[test]
    fn addresses_outside_the_cidr_stay_owned_but_are_never_handed_out() {
        let c = cidr("10.0.0.0/30");
        let mut ipam = Ipam::rebuild(
            c,
            [(ip("10.9.0.2"), "old".to_string())],
            Some(ip("10.9.0.2")),
        );
        assert_eq!(ipam.allocate("new").unwrap(), ip("10.0.0.2"));
        assert_eq!(ipam.addresses_of("old"), vec![ip("10.9.0.2")]);
        assert!(ipam.allocate("more").is_err());
        assert_eq!(ipam.release_pod("old"), vec![ip("10.9.0.2")]);
    }
}
