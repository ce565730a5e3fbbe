//! A network namespace joined to the host by a veth pair, for partition
//! tests that cut the wire itself (the "cut its veth"), below TCP,
//! where a proxy would close connections politely. Made with iproute2's
//! `ip`; needs root.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// The namespace, its veth pair and a /30 between them.
pub struct Wire {
    pub name: String,
    /// The host's end, on the host.
    pub host_veth: String,
    pub host_ip: Ipv4Addr,
    /// The address inside the namespace.
    pub ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (install iproute2; needs root)"));
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Wire {
    /// A fresh namespace `cnpN` with `lo` up and a veth pair to the host.
    pub fn create() -> Wire {
        static WIRES: AtomicU32 = AtomicU32::new(0);
        let n = WIRES.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{:x}{n:x}", pid % 0x10000);
        let name = format!("cnp{tag}");
        let host_veth = format!("cvh{tag}");
        let ns_veth = format!("cvn{tag}");
        // 10.199.X.Y/30: X from the process, Y from the wire, so parallel
        // tests and test binaries do not collide.
        let third = u8::try_from(pid % 250).unwrap_or(0);
        let fourth = u8::try_from((n % 64) * 4).unwrap_or(0);
        let host_ip = Ipv4Addr::new(10, 199, third, fourth + 1);
        let ns_ip = Ipv4Addr::new(10, 199, third, fourth + 2);
        ip(&["netns", "add", &name]);
        let wire = Wire {
            name,
            host_veth,
            host_ip,
            ns_ip,
        };
        ip(&[
            "link",
            "add",
            &wire.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &ns_veth,
        ]);
        ip(&["link", "set", &ns_veth, "netns", &wire.name]);
        ip(&[
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &wire.host_veth,
        ]);
        ip(&["link", "set", &wire.host_veth, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", wire.name.as_str(), "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{ns_ip}/30"), "dev", &ns_veth]);
        inside(&["link", "set", &ns_veth, "up"]);
        inside(&["link", "set", "lo", "up"]);
        wire
    }

    /// What `setns` takes to enter the namespace.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Both directions stop: the host's end goes down.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_veth, "down"]);
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.host_veth, "up"]);
    }
}

impl Drop for Wire {
    /// Deleting the host's end deletes the pair.
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
