//! Burst benchmark: N `sleep` containers launched through a real master and
//! agent (separate processes, started by `bench/burst.sh`), timed until all
//! are RUNNING, then torn down and timed until all are gone, with the
//! agent's RSS sampled while it holds them.
//!
//! `burst MASTER_ADDR AGENT_PID [N] [AGENT_ADDR]`; prints one `key=value` line.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use corral_proto::pb::TaskState;
use corral_proto::task::is_terminal;
use corral_tests::{TestFramework, shell_task};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let master = args
        .get(1)
        .expect("usage: burst MASTER_ADDR AGENT_PID [N]")
        .parse()
        .expect("address");
    let agent_pid: u32 = args.get(2).expect("agent pid").parse().expect("pid");
    let n: usize = args.get(3).map_or(1000, |s| s.parse().expect("N"));
    let deadline = Duration::from_secs(120);

    let mut fw = TestFramework::subscribe(master, "burst", "*").await;
    let rss_before = rss_kib(agent_pid);
    let start = Instant::now();
    let mut launched = 0usize;
    let mut running: HashSet<String> = HashSet::new();
    while running.len() < n {
        assert!(
            start.elapsed() < deadline,
            "only {} of {n} running after {deadline:?}",
            running.len()
        );
        fw.pump(Duration::from_millis(100)).await;
        for offer in fw.offers.drain(..).collect::<Vec<_>>() {
            let mut tasks = Vec::new();
            // 0.01 cpus and 8 MiB each: the agent is started with room for all.
            while launched < n && tasks.len() < 500 {
                let mut t = shell_task(&format!("sleep-{launched}"), "exec sleep 600", 0.01, 8.0);
                t.agent_id = offer.agent_id.clone();
                tasks.push(t);
                launched += 1;
            }
            fw.accept(vec![offer.id.clone()], tasks, Some(0.0))
                .await
                .expect("accept");
        }
        for u in fw.updates.drain(..) {
            match u.state() {
                TaskState::TaskRunning => {
                    running.insert(u.task_id);
                }
                s if is_terminal(s) => panic!("task {} ended: {:?} {}", u.task_id, s, u.message),
                _ => {}
            }
        }
    }
    let launch = start.elapsed();
    let rss_holding = rss_kib(agent_pid);

    let start = Instant::now();
    fw.teardown().await.expect("teardown");
    // The framework is gone, so watch the agent's own count of containers.
    let client = reqwest::Client::new();
    let agent_state = format!(
        "http://{}/state",
        args.get(4).map_or("127.0.0.1:5051", |s| s.as_str())
    );
    loop {
        assert!(
            start.elapsed() < deadline,
            "containers still alive after {deadline:?}"
        );
        let live = live_tasks(&client, &agent_state)
            .await
            .unwrap_or(usize::MAX);
        if live == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let destroy = start.elapsed();
    println!(
        "containers={n} all_running_s={:.2} all_destroyed_s={:.2} agent_rss_mib_before={:.1} agent_rss_mib_holding={:.1}",
        launch.as_secs_f64(),
        destroy.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_holding as f64 / 1024.0
    );
}

/// Counts the agent's tasks that still have a process.
async fn live_tasks(client: &reqwest::Client, url: &str) -> Option<usize> {
    let body = client.get(url).send().await.ok()?.text().await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(
        v["tasks"]
            .as_array()?
            .iter()
            .filter(|t| !t["pid"].is_null())
            .count(),
    )
}
