//! Drives the real `corral` binary: `corral dev` as a cluster, `corral run`
//! as a framework, `corral agents/tasks` as the operator's view.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");
const WAIT: Duration = Duration::from_secs(30);

/// Kills the dev cluster even when the test fails.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn corral(master: &str, args: &[&str]) -> Output {
    Command::new(CORRAL)
        .args(args)
        .env("CORRAL_MASTER", master)
        .stdin(Stdio::null())
        .output()
        .expect("run corral")
}

fn start_dev(work_dir: &Path) -> (Dev, String) {
    let (mp, ap) = (free_port(), free_port());
    let child = Command::new(CORRAL)
        .args([
            "dev",
            "--master-port",
            &mp.to_string(),
            "--agent-port",
            &ap.to_string(),
        ])
        .arg("--work-dir")
        .arg(work_dir)
        .args(["--resources", "cpus:2;mem:1024"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start corral dev");
    let dev = Dev(child);
    let master = format!("127.0.0.1:{mp}");
    let deadline = Instant::now() + WAIT;
    loop {
        let out = corral(&master, &["agents", "--json"]);
        if out.status.success() {
            let agents: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("agents JSON");
            if agents
                .as_array()
                .is_some_and(|a| a.len() == 1 && a[0]["state"] == "connected")
            {
                return (dev, master);
            }
        }
        assert!(
            Instant::now() < deadline,
            "corral dev did not come up with one agent"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn corral_dev_runs_tasks_submitted_with_corral_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut dev, master) = start_dev(dir.path());

    let out = corral(&master, &["run", "--", "echo", "hello from corral"]);
    assert!(out.status.success(), "corral run failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from corral\n");

    let out = corral(
        &master,
        &[
            "run",
            "--env",
            "X=42",
            "--",
            "sh",
            "-c",
            "echo $X; echo err >&2; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("err\n"), "{stderr}");
    assert!(stderr.contains("TASK_FAILED"), "{stderr}");

    // A task that does not fit waits; one asking for absurd amounts is refused.
    let out = corral(&master, &["run", "--cpus", "NaN", "--", "true"]);
    assert!(!out.status.success());

    let out = corral(&master, &["tasks", "--all"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("TASK_FINISHED") && table.contains("TASK_FAILED"),
        "{table}"
    );

    // SIGTERM stops the whole cluster cleanly.
    let pid = dev.0.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = dev.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "corral dev did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "corral dev exited with {status}");
}
