//! Leader failover benchmark (issue 6: from SIGKILL of the leader to the
//! first offer from the new one, goal ≤ 2 s; the Mesos paper reports 4–8 s).
//!
//! `leader_failover CORRAL_BIN WORK_DIR ROUNDS TTL_SECONDS ETCD_ELECTION_MS`:
//! starts one etcd member (`--election-timeout ETCD_ELECTION_MS`, heartbeat
//! a tenth of it), three `corral master --registry etcd://…
//! --leader-lease-ttl TTL_SECONDS` processes, two `corral agent
//! --isolation none` processes and, in this process, a framework on the
//! SDK given the master list ([`corral_tests::ha::start_framework`]), which
//! declines every offer for 100 ms so offers keep coming. Each round `kill -9`s the leader and measures until
//! a new master reports itself elected (`/metrics`, polled every 10 ms) and
//! until the framework's first offer after the kill; the killed master is
//! started again (as a standby) before the next round.
//!
//! Prints one line per round, then `rounds=N ttl_s=T
//! elected_median_s=… elected_max_s=… offer_median_s=… offer_max_s=…`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_tests::ha::{Etcd, leading_at, lock, start_framework};

const MASTERS: usize = 3;
const AGENTS: usize = 2;
const DEADLINE: Duration = Duration::from_secs(60);

fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

fn quiet(command: &mut Command) -> &mut Command {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
}

struct Master {
    address: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
}

impl Master {
    fn start(&mut self, bin: &str) {
        self.child = Some(
            quiet(Command::new(bin).args(&self.args))
                .spawn()
                .expect("start corral master"),
        );
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The leading master with an epoch above `above`, once there is one.
async fn wait_leader(masters: &[Master], above: u64) -> (usize, u64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        for (i, m) in masters.iter().enumerate() {
            if m.child.is_some()
                && let Some(epoch) = leading_at(m.address).await
                && epoch > above
            {
                return (i, epoch);
            }
        }
        assert!(Instant::now() < deadline, "no leader within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, bin, work, rounds, ttl, election_ms] = args.as_slice() else {
        eprintln!("usage: leader_failover CORRAL_BIN WORK_DIR ROUNDS TTL_SECONDS ETCD_ELECTION_MS");
        std::process::exit(2);
    };
    let rounds: usize = rounds.parse().expect("ROUNDS");
    let ttl: u64 = ttl.parse().expect("TTL_SECONDS");
    let election_ms: u64 = election_ms.parse().expect("ETCD_ELECTION_MS");
    let etcd = Etcd::start_with(election_ms).await;
    let registry = etcd.registry_url();
    let mut masters: Vec<Master> = (0..MASTERS)
        .map(|i| {
            let address = free_address();
            Master {
                address,
                args: [
                    "master",
                    "--registry",
                    &registry,
                    "--leader-lease-ttl",
                    &format!("{ttl}s"),
                    "--listen",
                    &address.to_string(),
                    "--advertise",
                    &address.to_string(),
                    "--work-dir",
                    &format!("{work}/master{i}"),
                ]
                .map(String::from)
                .to_vec(),
                child: None,
            }
        })
        .collect();
    for m in &mut masters {
        m.start(bin);
    }
    let list = masters
        .iter()
        .map(|m| m.address.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut agents: Vec<Child> = (0..AGENTS)
        .map(|i| {
            quiet(Command::new(bin).args([
                "agent",
                "--master",
                &list,
                "--listen",
                &free_address().to_string(),
                "--work-dir",
                &format!("{work}/agent{i}"),
                "--isolation",
                "none",
                "--resources",
                "cpus:2;mem:1024;disk:1024",
                "--hostname",
                &format!("bench-agent{i}"),
            ]))
            .spawn()
            .expect("start corral agent")
        })
        .collect();

    // Launches nothing: it declines every offer for 100 ms.
    let (client, seen, driver) = start_framework(list, 0);
    let offer_after = |t: Instant| lock(&seen).offers.iter().find(|o| **o > t).map(|o| *o - t);

    let (mut leader, mut epoch) = wait_leader(&masters, 0).await;
    let started = Instant::now();
    while offer_after(started - Duration::from_secs(3600)).is_none() {
        assert!(started.elapsed() < DEADLINE, "no first offer");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut elected, mut offered) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        // Steady state: offers flowing from the current leader.
        let settle = Instant::now();
        while offer_after(settle).is_none() {
            assert!(settle.elapsed() < DEADLINE, "offers stopped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let killed = Instant::now();
        masters[leader].kill9();
        let (next, next_epoch) = wait_leader(&masters, epoch).await;
        let to_elected = killed.elapsed();
        let to_offer = loop {
            if let Some(d) = offer_after(killed) {
                break d;
            }
            assert!(killed.elapsed() < DEADLINE, "no offer after the kill");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        println!(
            "round={round} epoch={epoch}->{next_epoch} elected_s={:.3} first_offer_s={:.3}",
            to_elected.as_secs_f64(),
            to_offer.as_secs_f64()
        );
        elected.push(to_elected.as_secs_f64());
        offered.push(to_offer.as_secs_f64());
        masters[leader].start(bin);
        (leader, epoch) = (next, next_epoch);
    }
    println!(
        "rounds={rounds} ttl_s={ttl} etcd_election_ms={election_ms} elected_median_s={:.3} elected_max_s={:.3} offer_median_s={:.3} offer_max_s={:.3}",
        median(elected.clone()),
        elected.iter().copied().fold(0.0, f64::max),
        median(offered.clone()),
        offered.iter().copied().fold(0.0, f64::max),
    );

    client.stop();
    let _ = tokio::time::timeout(Duration::from_secs(10), driver).await;
    for a in &mut agents {
        let pid = nix::unistd::Pid::from_raw(a.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = a.wait();
    }
    for m in &mut masters {
        m.kill9();
    }
    drop(etcd);
}
