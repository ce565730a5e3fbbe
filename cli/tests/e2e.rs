//! Drives the real `corral` binary: `corral dev` as a cluster, `corral run`
//! and `corral batch` as frameworks, `corral agents/tasks` as the
//! operator's view.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");
const WAIT: Duration = Duration::from_secs(30);

/// Kills the dev cluster even when the test fails, and removes its cgroup
/// subtree (empty once the agent stopped).
struct Dev {
    child: Child,
    cgroup_root: String,
    agent: String,
    batch: String,
    service: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let _ = std::fs::remove_dir(h.path().join(&self.cgroup_root));
            }
        }
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

fn start_dev(work_dir: &Path, extra: &[&str]) -> (Dev, String) {
    let (mp, ap, bp, sp) = (free_port(), free_port(), free_port(), free_port());
    let cgroup_root = format!("corral-e2e-{ap}");
    // Its own pod bridge and range: tests run several `corral dev` at once,
    // and each removes its bridge when it stops.
    let pod_bridge = format!("ce{ap}");
    let pod_cidr = format!("10.{}.{}.0/24", 240 + ap % 10, (ap / 10) % 256);
    let child = Command::new(CORRAL)
        .args([
            "dev",
            "--master-port",
            &mp.to_string(),
            "--agent-port",
            &ap.to_string(),
            "--batch-port",
            &bp.to_string(),
            "--service-port",
            &sp.to_string(),
        ])
        .arg("--work-dir")
        .arg(work_dir)
        .args([
            "--resources",
            "cpus:2;mem:1024",
            "--cgroup-root",
            &cgroup_root,
            "--pod-bridge",
            &pod_bridge,
            "--pod-cidr",
            &pod_cidr,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start corral dev");
    let dev = Dev {
        child,
        cgroup_root,
        agent: format!("127.0.0.1:{ap}"),
        batch: format!("127.0.0.1:{bp}"),
        service: format!("127.0.0.1:{sp}"),
    };
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

/// `corral batch ARGS...` against the dev cluster's batch framework.
fn batch(dev: &Dev, master: &str, args: &[&str]) -> Output {
    Command::new(CORRAL)
        .arg("batch")
        .args(args)
        .env("CORRAL_MASTER", master)
        .env("CORRAL_BATCH", &dev.batch)
        .stdin(Stdio::null())
        .output()
        .expect("run corral batch")
}

/// `corral service ARGS...` against the dev cluster's service framework.
fn service(dev: &Dev, args: &[&str]) -> Output {
    Command::new(CORRAL)
        .arg("service")
        .args(args)
        .env("CORRAL_SERVICE", &dev.service)
        .stdin(Stdio::null())
        .output()
        .expect("run corral service")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn corral_dev_runs_tasks_submitted_with_corral_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut dev, master) = start_dev(dir.path(), &[]);

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

    // Its output stays readable through the agent.
    let out = corral(
        &master,
        &[
            "run",
            "--name",
            "logged",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let out = corral(&master, &["tasks", "--all", "--json"]);
    let tasks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("tasks JSON");
    let id = tasks
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "logged"))
        .and_then(|t| t["id"].as_str())
        .expect("the logged task")
        .to_string();
    let out = corral(&master, &["logs", &id]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n", "{out:?}");
    let out = corral(&master, &["logs", &id, "--stderr"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "err\n", "{out:?}");

    let out = corral(&master, &["tasks", "--all"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("TASK_FINISHED") && table.contains("TASK_FAILED"),
        "{table}"
    );

    // SIGTERM stops the whole cluster cleanly.
    let pid = dev.child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = dev.child.try_wait().expect("wait") {
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

/// A docker-registry on loopback, killed on drop (then its storage dir goes).
struct Registry {
    child: Child,
    _storage: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry() -> (Registry, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        ),
    )
    .expect("registry config");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry is missing: apt-get install docker-registry");
    let registry = Registry {
        child,
        _storage: dir,
    };
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "docker-registry did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    (registry, addr)
}

#[test]
fn corral_runs_images_imported_into_the_agent_and_pulled_from_a_registry() {
    use corral_tests::images::{self, Config, Entry};
    let dir = tempfile::tempdir().expect("temp dir");
    let extra = images::layer(&[
        Entry::Dir {
            path: "data".into(),
            mode: 0o755,
        },
        Entry::file("data/hello", b"hello from the image\n"),
    ]);
    let layers = [images::busybox_layer(), extra];
    let config = Config::default();

    // Pushed to a registry on loopback with skopeo, from an OCI layout.
    let (_registry, registry) = start_registry();
    let layout = dir.path().join("layout");
    images::write_oci_dir(&layout, &layers, &config, "v1");
    let pushed = Command::new("skopeo")
        .args(["copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{registry}/test/hello:v1"))
        .output()
        .expect("skopeo is missing: apt-get install skopeo");
    assert!(
        pushed.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&pushed.stderr)
    );

    let (dev, master) = start_dev(
        &dir.path().join("cluster"),
        &["--insecure-registry", &registry],
    );

    // Imported from an archive.
    let archive = dir.path().join("hello.tar");
    images::write_oci_archive(&archive, &layers, &config, "v1");
    let out = Command::new(CORRAL)
        .args([
            "image",
            "import",
            "--agent",
            &dev.agent,
            "--name",
            "local/hello:v1",
        ])
        .arg(&archive)
        .output()
        .expect("corral image import");
    assert!(out.status.success(), "import: {out:?}");
    let out = Command::new(CORRAL)
        .args(["image", "ls", "--agent", &dev.agent])
        .output()
        .expect("ls");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("local/hello:v1"),
        "{out:?}"
    );
    let out = corral(
        &master,
        &[
            "run",
            "--image",
            "local/hello:v1",
            "--",
            "cat",
            "/data/hello",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the image\n"
    );

    // Pulled by the agent on first use.
    let reference = format!("{registry}/test/hello:v1");
    let out = corral(
        &master,
        &[
            "run",
            "--image",
            &reference,
            "--",
            "sh",
            "-c",
            "cat /data/hello; id -u",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the image\n0\n"
    );
    let out = corral(
        &master,
        &[
            "run", "--image", &reference, "--user", "65534", "--", "id", "-u",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n", "{out:?}");

    let out = Command::new(CORRAL)
        .args(["image", "rm", "--agent", &dev.agent, "local/hello:v1"])
        .output()
        .expect("rm");
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn corral_batch_runs_an_array_job_on_corral_dev_and_reports_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (dev, master) = start_dev(dir.path(), &[]);
    let deadline = Instant::now() + WAIT;
    while !batch(&dev, &master, &["list"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the batch framework did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // An array job from flags: its id is the last word printed.
    let out = batch(
        &dev,
        &master,
        &[
            "submit",
            "--name",
            "echo3",
            "--count",
            "3",
            "--",
            "sh",
            "-c",
            "echo index $CORRAL_TASK_INDEX",
        ],
    );
    assert!(out.status.success(), "submit: {out:?}");
    let stdout = text(&out.stdout);
    let id = stdout
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().last())
        .expect("a job id")
        .to_string();
    assert_eq!(id, "echo3", "{stdout}");

    let out = batch(&dev, &master, &["wait", &id, "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(0), "wait: {out:?}");

    let out = batch(&dev, &master, &["status", &id]);
    assert!(out.status.success(), "status: {out:?}");
    let status = text(&out.stdout);
    assert!(status.contains("SUCCEEDED"), "{status}");
    assert!(status.contains("3 succeeded"), "{status}");
    assert!(!status.contains("failures"), "{status}");

    let out = batch(&dev, &master, &["logs", &id, "--index", "1"]);
    assert!(out.status.success(), "logs: {out:?}");
    assert_eq!(text(&out.stdout), "index 1\n");
    let out = batch(&dev, &master, &["logs", &id]);
    let logs = text(&out.stdout);
    assert!(out.status.success(), "logs: {out:?}");
    for i in 0..3 {
        assert!(
            logs.contains(&format!("==> index {i} (task "))
                && logs.contains(&format!("index {i}\n")),
            "{logs}"
        );
    }

    let out = batch(&dev, &master, &["list"]);
    let list = text(&out.stdout);
    assert!(
        list.lines()
            .any(|l| l.starts_with("echo3 ") && l.contains("SUCCEEDED") && l.contains("3/3")),
        "{list}"
    );

    // The framework refuses what makes no sense and names the field.
    let out = batch(&dev, &master, &["submit", "--cpus", "-1", "--", "true"]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("corral batch submit: "), "{stderr}");
    assert!(stderr.contains("job.cpus"), "{stderr}");

    // A job file; a task that keeps failing fails the job, with its exit code.
    let file = dir.path().join("fail.toml");
    std::fs::write(
        &file,
        "name = \"fail\"\ncommand = \"exit 3\"\ncount = 2\nretries = 1\nretry_backoff = \"100ms\"\n",
    )
    .expect("job file");
    let out = batch(&dev, &master, &["submit", &file.to_string_lossy()]);
    assert!(out.status.success(), "submit file: {out:?}");
    let out = batch(&dev, &master, &["wait", "fail", "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(1), "wait: {out:?}");
    assert!(text(&out.stderr).contains("job fail failed"), "{out:?}");
    let out = batch(&dev, &master, &["status", "fail"]);
    let status = text(&out.stdout);
    assert!(
        status.contains("FAILED") && status.contains("failures"),
        "{status}"
    );
    // The index that ran out of retries first fails the job; the other is
    // cancelled with it.
    let row = status
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.get(2) == Some(&"failed"))
        .unwrap_or_else(|| panic!("no failed index:\n{status}"));
    let cells = &row;
    assert_eq!(cells[1..4], ["2", "failed", "TASK_FAILED"], "{row:?}");
    assert!(cells.contains(&"3"), "exit code 3 in {row:?}");

    // A cancelled job ends the wait unsuccessfully.
    let out = batch(
        &dev,
        &master,
        &["submit", "--name", "sleepy", "--", "sleep", "600"],
    );
    assert!(out.status.success(), "{out:?}");
    let out = batch(&dev, &master, &["cancel", "sleepy"]);
    assert!(out.status.success(), "cancel: {out:?}");
    let out = batch(&dev, &master, &["wait", "sleepy", "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(1), "wait: {out:?}");

    let out = batch(&dev, &master, &["status", "no-such-job"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        text(&out.stderr).starts_with("corral batch status: "),
        "{out:?}"
    );
    drop(dev);
}

#[test]
fn corral_service_applies_lists_scales_and_deletes_a_service_on_corral_dev() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (dev, master) = start_dev(dir.path(), &[]);
    let deadline = Instant::now() + WAIT;
    while !service(&dev, &["list"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "the service framework did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let file = dir.path().join("web.toml");
    std::fs::write(
        &file,
        "name = \"web\"\ninstances = 2\n[task]\ncommand = \"exec sleep 600\"\ncpus = 0.1\nmem = 16\n",
    )
    .expect("service file");
    let out = service(&dev, &["apply", "-f", &file.to_string_lossy()]);
    assert!(out.status.success(), "apply: {out:?}");
    assert_eq!(text(&out.stdout), "created service web (version 1)\n");

    // `list` shows running/healthy/wanted; wait for 2/2/2.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = service(&dev, &["list"]);
        let list = text(&out.stdout);
        if list
            .lines()
            .any(|l| l.starts_with("web ") && l.contains("2/2/2") && l.contains("stable"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web never ran 2 instances: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = service(&dev, &["status", "web"]);
    assert!(out.status.success(), "status: {out:?}");
    let status = text(&out.stdout);
    assert_eq!(status.matches("RUNNING").count(), 2, "{status}");
    let out = corral(&master, &["tasks"]);
    assert!(text(&out.stdout).contains("web.1.1"), "{out:?}");

    let out = service(&dev, &["scale", "web", "1"]);
    assert!(out.status.success(), "scale: {out:?}");
    let out = service(&dev, &["restart", "web"]);
    assert!(out.status.success(), "restart: {out:?}");
    assert!(
        text(&out.stdout).contains("rolling out version 2"),
        "{out:?}"
    );

    // Errors name the field, exit 1, `corral service CMD: ...`.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\ninstances = 1\n[task]\ncommand = \"true\"\ncpus = -1\nmem = 16\n",
    )
    .expect("bad file");
    let out = service(&dev, &["apply", "-f", &bad.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("corral service apply: "), "{stderr}");
    assert!(stderr.contains("service.task.cpus"), "{stderr}");

    let out = service(&dev, &["delete", "web"]);
    assert!(out.status.success(), "delete: {out:?}");
    let deadline = Instant::now() + WAIT;
    while service(&dev, &["status", "web"]).status.success() {
        assert!(Instant::now() < deadline, "web was never forgotten");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = service(&dev, &["status", "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("corral service status: no service named web"),
        "{out:?}"
    );
    drop(dev);
}
