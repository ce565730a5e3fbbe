//! Pod networking against the real kernel (root): bridge, per-pod network
//! namespaces, veths, addresses, routes, persisted IPAM.
//!
//! Every test runs in a network namespace of its own (see [`isolated`]), so
//! the host's links are never touched and tests run in parallel; each also
//! has its own bridge name, CIDR and temp dirs. Afterwards nothing may stay
//! mounted under the test's dir, whether the test passed or not.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use corral_agent::network::{
    NetworkError, PodCidr, PodNet, PodNetwork, PodNetworkConfig, host_veth_name, mount_points,
};
use futures::TryStreamExt;
use nix::mount::{MntFlags, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
use rtnetlink::{Handle, LinkBridge, LinkVeth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

/// Bound on every connection attempt and read: a broken route fails the
/// test quickly instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Fails (never skips) when the tests cannot run here.
fn require_root() {
    // /proc/self belongs to the effective uid.
    let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    assert_eq!(
        euid, 0,
        "the pod network tests need root (network namespaces, links, mounts): \
         run them as root, e.g. `sudo -E cargo test -p corral-agent --test network`"
    );
}

fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let root = std::fs::canonicalize(root).unwrap();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mount_points(&info)
        .filter(|p| p.starts_with(&root))
        .collect()
}

/// Runs `body` with a config of its own (bridge `bridge`, `cidr`, dirs in a
/// fresh temp dir) on a thread that first moves into a new network
/// namespace — the test's "host" — with a current-thread runtime: the
/// `PodNetwork` made there opens its netlink socket in that namespace, so
/// bridges and veths live and die with the thread. Pins are mounts in the
/// real mount namespace, though: whatever happened, everything mounted under
/// the temp dir is unmounted afterwards, and a passing test must have left
/// nothing.
fn isolated<F, Fut>(bridge: &str, cidr: &str, body: F)
where
    F: FnOnce(PodNetworkConfig) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    require_root();
    let dir = tempfile::Builder::new()
        .prefix(&format!("corral-net-{bridge}-"))
        .tempdir()
        .unwrap();
    let config = PodNetworkConfig::for_work_dir(dir.path(), bridge, PodCidr::parse(cidr).unwrap());
    let joined = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) for the test");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body(config));
    })
    .join();
    let left = mounts_under(dir.path());
    // Deepest first: pins before the netns dir they are in.
    for m in left.iter().rev() {
        let _ = umount2(m, MntFlags::MNT_DETACH);
    }
    if let Err(panic) = joined {
        std::panic::resume_unwind(panic);
    }
    assert!(left.is_empty(), "mounts left behind: {left:?}");
}

/// Runs `f` on a thread inside the namespace `netns`: sockets it creates
/// belong to that namespace.
fn in_netns<T: Send>(netns: OwnedFd, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns into the pod namespace");
            f()
        })
        .join()
        .unwrap()
    })
}

/// A TCP server in `pod`'s namespace on `ip` that answers every connection
/// with `reply`. Stops when the returned handle is aborted (or the
/// runtime ends).
async fn serve_in(
    pod: &PodNet,
    ip: Ipv4Addr,
    reply: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = in_netns(pod.netns_fd().unwrap(), move || {
        std::net::TcpListener::bind((ip, 0)).unwrap()
    });
    serve(listener, reply)
}

fn serve(
    listener: std::net::TcpListener,
    reply: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.write_all(reply.as_bytes()).await;
        }
    });
    (addr, task)
}

/// Connects with a socket made in `from`'s namespace (the test's own when
/// `None`) and returns what the server says.
async fn fetch(from: Option<&PodNet>, addr: SocketAddr) -> std::io::Result<String> {
    let socket = match from {
        Some(pod) => in_netns(pod.netns_fd().unwrap(), TcpSocket::new_v4)?,
        None => TcpSocket::new_v4()?,
    };
    let exchange = async {
        let mut stream = socket.connect(addr).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok(text)
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other(format!("timed out reaching {addr}"))))
}

fn connect() -> Handle {
    let (connection, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(connection);
    handle
}

/// Names of the links in the namespace `handle` talks to, sorted.
async fn link_names(handle: &Handle) -> Vec<String> {
    let mut names: Vec<String> = handle
        .link()
        .get()
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| {
            m.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n),
                _ => None,
            })
        })
        .collect();
    names.sort();
    names
}

/// Names of the links inside `pod`'s namespace.
fn pod_link_names(pod: &PodNet) -> Vec<String> {
    in_netns(pod.netns_fd().unwrap(), || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async { link_names(&connect()).await })
    })
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// The hardware address of link `name`.
async fn link_mac(handle: &Handle, name: &str) -> Vec<u8> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .unwrap()
        .unwrap();
    link.attributes
        .into_iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(mac),
            _ => None,
        })
        .unwrap()
}

/// (index, IFF_UP, IPv4 addresses with prefix) of link `name`.
async fn link_state(handle: &Handle, name: &str) -> Option<(u32, bool, Vec<(Ipv4Addr, u8)>)> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .ok()
        .flatten()?;
    let index = link.header.index;
    let up = link.header.flags.contains(LinkFlags::Up);
    let addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| {
            let prefix = m.header.prefix_len;
            m.attributes.into_iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip)) => Some((ip, prefix)),
                _ => None,
            })
        })
        .collect();
    Some((index, up, addrs))
}

fn files_in(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut v: Vec<String> = entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

/// Persisted state of `config`: the address files (without the cursor)
/// and the pod records.
fn persisted(config: &PodNetworkConfig) -> (Vec<String>, Vec<String>) {
    let ips = files_in(&config.state_dir.join("ips"))
        .into_iter()
        .filter(|f| f != "last_reserved_ip")
        .collect();
    (ips, files_in(&config.state_dir.join("pods")))
}

fn ip(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
}

#[test]
fn pods_reach_each_other_and_the_host_and_their_own_loopback() {
    isolated("ctbr-reach", "10.90.0.0/16", |config| async move {
        let host = connect();
        let net = PodNetwork::new(config.clone()).await.unwrap();
        net.ensure_bridge().await.unwrap();
        let bridge_mac = link_mac(&host, "ctbr-reach").await;
        // Set up concurrently: distinct addresses and veths all the same.
        let (a, b) = tokio::join!(net.setup("pod-a"), net.setup("pod-b"));
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut ips = [a.ip, b.ip];
        ips.sort();
        assert_eq!(ips, [ip("10.90.0.2"), ip("10.90.0.3")]);
        assert_ne!(a.host_veth, b.host_veth);
        assert_eq!((a.gateway, a.prefix_len), (ip("10.90.0.1"), 16));
        assert_eq!(a.netns_path, config.netns_dir.join("pod-a"));

        let (a_addr, a_server) = serve_in(&a, a.ip, "hello from a").await;
        let (a_lo, a_lo_server) = serve_in(&a, Ipv4Addr::LOCALHOST, "a on localhost").await;
        assert_eq!(
            fetch(Some(&b), a_addr).await.unwrap(),
            "hello from a",
            "pod b -> pod a"
        );
        assert_eq!(
            fetch(None, a_addr).await.unwrap(),
            "hello from a",
            "host -> pod a"
        );
        assert_eq!(
            fetch(Some(&a), a_lo).await.unwrap(),
            "a on localhost",
            "pod a -> its lo"
        );
        assert!(
            fetch(Some(&b), a_lo).await.is_err(),
            "pod b's localhost must not be pod a's"
        );

        // The default route: an address of the host outside the pod network
        // is reached through the gateway. (A bridge holds the address: this
        // kernel may have no dummy driver.)
        host.link()
            .add(LinkBridge::new("probe0").build())
            .execute()
            .await
            .unwrap();
        let (probe_index, _, _) = link_state(&host, "probe0").await.unwrap();
        host.address()
            .add(probe_index, IpAddr::V4(ip("192.0.2.1")), 32)
            .execute()
            .await
            .unwrap();
        let probe = std::net::TcpListener::bind((ip("192.0.2.1"), 0)).unwrap();
        let (probe_addr, probe_server) = serve(probe, "host beyond the bridge");
        assert_eq!(
            fetch(Some(&a), probe_addr).await.unwrap(),
            "host beyond the bridge",
            "pod a -> host address via the default route"
        );

        // Exactly the expected links, up and addressed, on both sides.
        assert_eq!(
            link_names(&host).await,
            sorted(&["lo", "ctbr-reach", &a.host_veth, &b.host_veth, "probe0"])
        );
        let (_, up, addrs) = link_state(&host, "ctbr-reach").await.unwrap();
        assert!(up);
        assert_eq!(addrs, [(ip("10.90.0.1"), 16)]);
        assert!(
            link_state(&host, &a.host_veth).await.unwrap().1,
            "host veth up"
        );
        assert_eq!(
            link_mac(&host, "ctbr-reach").await,
            bridge_mac,
            "the bridge keeps its MAC as ports join"
        );
        assert_eq!(pod_link_names(&a), sorted(&["lo", "eth0"]));
        assert_eq!(pod_link_names(&b), sorted(&["lo", "eth0"]));

        for task in [a_server, a_lo_server, probe_server] {
            task.abort();
        }
        net.teardown("pod-a").await.unwrap();
        net.teardown("pod-b").await.unwrap();
        net.remove_bridge().await.unwrap();
        assert_eq!(link_names(&host).await, sorted(&["lo", "probe0"]));
        assert_eq!(persisted(&config), (vec![], vec![]));
    });
}

#[test]
fn teardown_removes_veth_pin_and_address_and_may_repeat() {
    // A /29: pods get .2 to .6, so reuse after wrap-around shows quickly.
    isolated("ctbr-down", "10.91.0.0/29", |config| async move {
        let host = connect();
        let net = PodNetwork::new(config.clone()).await.unwrap();
        net.ensure_bridge().await.unwrap();
        let a = net.setup("pod-a").await.unwrap();
        assert_eq!(a.ip, ip("10.91.0.2"));
        assert_eq!(
            persisted(&config),
            (vec!["10.91.0.2".into()], vec!["pod-a".into()])
        );
        // A launch may still hold the namespace open: teardown must not mind.
        let held = a.netns_fd().unwrap();

        net.teardown("pod-a").await.unwrap();
        assert!(
            link_state(&host, &a.host_veth).await.is_none(),
            "host veth gone"
        );
        assert!(!a.netns_path.exists(), "pin file gone");
        assert!(
            !mounts_under(&config.netns_dir).contains(
                &std::fs::canonicalize(&config.netns_dir)
                    .unwrap()
                    .join("pod-a")
            ),
            "pin unmounted"
        );
        assert_eq!(persisted(&config), (vec![], vec![]));
        assert!(matches!(a.netns_fd(), Err(NetworkError::NotPinned { .. })));
        drop(held);
        net.teardown("pod-a").await.unwrap();
        net.teardown("never-set-up").await.unwrap();

        // Free again, but not at once: next-fit moves on first.
        let ips: Vec<Ipv4Addr> = {
            let mut v = Vec::new();
            for p in ["pod-b", "pod-c", "pod-d", "pod-e", "pod-f"] {
                v.push(net.setup(p).await.unwrap().ip);
            }
            v
        };
        assert_eq!(
            ips,
            [
                "10.91.0.3",
                "10.91.0.4",
                "10.91.0.5",
                "10.91.0.6",
                "10.91.0.2"
            ]
            .map(ip)
        );
        assert!(matches!(
            net.setup("pod-g").await,
            Err(NetworkError::Exhausted { .. })
        ));
        for p in ["pod-b", "pod-c", "pod-d", "pod-e", "pod-f"] {
            net.teardown(p).await.unwrap();
        }
        net.remove_bridge().await.unwrap();
        assert_eq!(link_names(&host).await, sorted(&["lo"]));
        assert_eq!(persisted(&config), (vec![], vec![]));
    });
}

#[test]
fn failed_setups_leave_nothing_behind() {
    isolated("ctbr-fail", "10.92.0.0/24", |config| async move {
        let host = connect();
        let net = PodNetwork::new(config.clone()).await.unwrap();
        let nothing_left = |host: Handle, config: PodNetworkConfig, extra: Vec<&'static str>| async move {
            let mut expected = vec!["lo"];
            expected.extend(extra);
            assert_eq!(link_names(&host).await, sorted(&expected));
            assert!(files_in(&config.netns_dir).is_empty(), "pins left");
            assert_eq!(persisted(&config), (vec![], vec![]));
            let real_dir = std::fs::canonicalize(&config.netns_dir).ok();
            for m in mounts_under(config.state_dir.parent().unwrap()) {
                assert_eq!(Some(&m), real_dir.as_ref(), "unexpected mount {m:?}");
            }
        };

        // Invalid pod ids are refused before anything is made.
        for bad in ["", "..", "a/b", &"p".repeat(256)] {
            assert!(matches!(
                net.setup(bad).await,
                Err(NetworkError::InvalidPodId { .. })
            ));
        }
        nothing_left(host.clone(), config.clone(), vec![]).await;

        // No bridge: fails after the address and the namespace were made.
        let err = net.setup("pod-a").await.unwrap_err();
        assert!(matches!(err, NetworkError::NoBridge { .. }), "{err}");
        assert!(err.to_string().contains("ctbr-fail"), "{err}");
        nothing_left(host.clone(), config.clone(), vec![]).await;

        // A link that is not a bridge holds the bridge's name.
        host.link()
            .add(LinkVeth::new("ctbr-fail", "ctbr-fail-peer").build())
            .execute()
            .await
            .unwrap();
        let err = net.ensure_bridge().await.unwrap_err();
        assert!(matches!(err, NetworkError::BridgeConflict { .. }), "{err}");
        assert!(err.to_string().contains("ctbr-fail"), "{err}");
        let err = net.setup("pod-a").await.unwrap_err();
        assert!(matches!(err, NetworkError::BridgeConflict { .. }), "{err}");
        nothing_left(
            host.clone(),
            config.clone(),
            vec!["ctbr-fail", "ctbr-fail-peer"],
        )
        .await;
        let (dummy, _, _) = link_state(&host, "ctbr-fail").await.unwrap();
        host.link().del(dummy).execute().await.unwrap();

        // A foreign link holding the pod's first veth name is left alone
        // and the pod gets the next name.
        net.ensure_bridge().await.unwrap();
        let taken = host_veth_name("pod-a", 0);
        host.link()
            .add(LinkBridge::new(&taken).build())
            .execute()
            .await
            .unwrap();
        let a = net.setup("pod-a").await.unwrap();
        assert_eq!(a.host_veth, host_veth_name("pod-a", 1));
        // A second setup of a live pod is refused and leaves it working.
        assert!(matches!(
            net.setup("pod-a").await,
            Err(NetworkError::PodExists { .. })
        ));
        let (addr, server) = serve_in(&a, a.ip, "still here").await;
        assert_eq!(fetch(None, addr).await.unwrap(), "still here");
        server.abort();
        // Two setups of one pod at once: one wins, the other is refused.
        let (x, y) = tokio::join!(net.setup("pod-z"), net.setup("pod-z"));
        assert_eq!([&x, &y].iter().filter(|r| r.is_ok()).count(), 1);
        let refused = x.as_ref().err().or(y.as_ref().err());
        assert!(
            matches!(
                refused,
                Some(NetworkError::PodBusy { .. } | NetworkError::PodExists { .. })
            ),
            "{refused:?}"
        );
        net.teardown("pod-z").await.unwrap();
        net.teardown("pod-a").await.unwrap();
        assert!(
            link_state(&host, &taken).await.is_some(),
            "foreign link kept"
        );
        let (foreign, _, _) = link_state(&host, &taken).await.unwrap();
        host.link().del(foreign).execute().await.unwrap();

        net.remove_bridge().await.unwrap();
        nothing_left(host.clone(), config.clone(), vec![]).await;
    });
}

#[test]
fn a_restarted_network_recovers_live_pods_and_sweeps_the_rest() {
    isolated("ctbr-restart", "10.93.0.0/24", |config| async move {
        let host = connect();
        let first = PodNetwork::new(config.clone()).await.unwrap();
        first.ensure_bridge().await.unwrap();
        let mut before = Vec::new();
        for p in ["pod-a", "pod-b", "pod-c", "pod-d"] {
            before.push(first.setup(p).await.unwrap());
        }
        // The agent dies; pod-d's veth disappears meanwhile.
        drop(first);
        let (d_veth, _, _) = link_state(&host, &before[3].host_veth).await.unwrap();
        host.link().del(d_veth).execute().await.unwrap();

        let second = PodNetwork::new(config.clone()).await.unwrap();
        second.ensure_bridge().await.unwrap();
        let recovered = second.recover().await.unwrap();
        assert_eq!(
            recovered,
            before[..3].to_vec(),
            "a, b, c are live; d is not"
        );
        // Recovered pods still work.
        let (addr, server) = serve_in(&recovered[0], recovered[0].ip, "a survived").await;
        assert_eq!(fetch(None, addr).await.unwrap(), "a survived");
        server.abort();

        // No address is handed out twice, not even the broken pod's.
        let e = second.setup("pod-e").await.unwrap();
        assert!(before.iter().all(|p| p.ip != e.ip), "{} reused", e.ip);
        assert_eq!(
            e.ip,
            ip("10.93.0.6"),
            "next-fit continues after the last one"
        );

        let keep: HashSet<String> = ["pod-a", "pod-e"].map(String::from).into();
        let swept = second.sweep(&keep).await.unwrap();
        assert_eq!(swept, ["pod-b", "pod-c", "pod-d"]);
        assert_eq!(
            link_names(&host).await,
            sorted(&["lo", "ctbr-restart", &before[0].host_veth, &e.host_veth])
        );
        assert_eq!(files_in(&config.netns_dir), ["pod-a", "pod-e"]);
        assert_eq!(
            persisted(&config),
            (
                vec!["10.93.0.2".into(), "10.93.0.6".into()],
                vec!["pod-a".into(), "pod-e".into()]
            )
        );
        assert_eq!(second.sweep(&keep).await.unwrap(), Vec::<String>::new());

        assert!(matches!(
            second.remove_bridge().await,
            Err(NetworkError::PodsRemain { count: 2, .. })
        ));
        second.sweep(&HashSet::new()).await.unwrap();
        second.remove_bridge().await.unwrap();
        assert_eq!(link_names(&host).await, sorted(&["lo"]));
        assert_eq!(persisted(&config), (vec![], vec![]));
    });
}

#[test]
fn ensure_bridge_is_idempotent_and_remove_bridge_removes_it() {
    isolated("ctbr-idem", "10.94.0.0/16", |config| async move {
        let host = connect();
        let net = PodNetwork::new(config.clone()).await.unwrap();
        net.ensure_bridge().await.unwrap();
        let first = link_state(&host, "ctbr-idem").await.unwrap();
        net.ensure_bridge().await.unwrap();
        assert_eq!(
            link_state(&host, "ctbr-idem").await.unwrap(),
            first,
            "unchanged"
        );
        let (_, up, addrs) = first;
        assert!(up);
        assert_eq!(addrs, [(ip("10.94.0.1"), 16)]);

        net.remove_bridge().await.unwrap();
        assert!(link_state(&host, "ctbr-idem").await.is_none());
        net.remove_bridge().await.unwrap();
        assert_eq!(link_names(&host).await, sorted(&["lo"]));

        // A bridge made by someone else with another address is refused,
        // named, and left as it was.
        host.link()
            .add(LinkBridge::new("ctbr-idem").build())
            .execute()
            .await
            .unwrap();
        let (index, _, _) = link_state(&host, "ctbr-idem").await.unwrap();
        host.address()
            .add(index, IpAddr::V4(ip("10.99.0.1")), 24)
            .execute()
            .await
            .unwrap();
        let err = net.ensure_bridge().await.unwrap_err();
        assert!(matches!(err, NetworkError::BridgeConflict { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("ctbr-idem") && text.contains("10.99.0.1/24"),
            "{text}"
        );
        assert_eq!(
            link_state(&host, "ctbr-idem").await.unwrap().2,
            [(ip("10.99.0.1"), 24)]
        );
        host.link().del(index).execute().await.unwrap();
        assert_eq!(link_names(&host).await, sorted(&["lo"]));
    });
}

#[test]
fn teardown_releases_the_pin_copied_into_a_container_mount_namespace() {
    isolated("ctbr-copy", "10.95.0.0/24", |config| async move {
        let net = PodNetwork::new(config.clone()).await.unwrap();
        net.ensure_bridge().await.unwrap();
        let a = net.setup("pod-a").await.unwrap();
        let pin = std::fs::canonicalize(&a.netns_path).unwrap();

        // A "container": a thread in a new mount namespace made rprivate,
        // as the containerizer does. It gets its own copy of the pin.
        let (torn_down_tx, torn_down_rx) = std::sync::mpsc::channel::<()>();
        let (seen_tx, seen_rx) = std::sync::mpsc::channel::<bool>();
        let container = std::thread::spawn(move || {
            use nix::mount::{MsFlags, mount};
            let has_pin = |pin: &Path| {
                let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
                mount_points(&info).any(|p| p == pin)
            };
            unshare(CloneFlags::CLONE_NEWNS).expect("unshare(CLONE_NEWNS)");
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            seen_tx.send(has_pin(&pin)).unwrap();
            torn_down_rx.recv_timeout(IO_TIMEOUT).unwrap();
            seen_tx.send(has_pin(&pin)).unwrap();
        });
        assert!(
            seen_rx.recv_timeout(IO_TIMEOUT).unwrap(),
            "the container's mount namespace has a copy of the pin"
        );
        net.teardown("pod-a").await.unwrap();
        torn_down_tx.send(()).unwrap();
        assert!(
            !seen_rx.recv_timeout(IO_TIMEOUT).unwrap(),
            "unlinking the pin detached the container's copy"
        );
        container.join().unwrap();
        net.remove_bridge().await.unwrap();
    });
}
