//! `corral service serve` killed with SIGKILL while a 3-instance service
//! runs, and started again: it re-subscribes with the framework id from its
//! store, reconciles, and keeps the running instances (same task ids, no new
//! instances); it still replaces one that fails afterwards. The master and
//! agent run in-process (the test harness); the CLI client commands run
//! against the restarted process.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use corral_proto::pb;
use corral_proto::pb::services_client::ServicesClient;
use corral_tests::{Cluster, wait_for};

const CORRAL: &str = env!("CARGO_BIN_EXE_corral");
const WAIT: Duration = Duration::from_secs(60);

/// The framework process; killed (and reaped) also when the test fails.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(master: &str, port: u16, work_dir: &Path) -> Serve {
    let child = Command::new(CORRAL)
        .args(["service", "serve", "--master", master, "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--work-dir")
        .arg(work_dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start corral service serve");
    Serve(child)
}

/// Runs `corral service ARGS --service 127.0.0.1:PORT`; (exit code, stdout,
/// stderr).
fn cli(port: u16, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(CORRAL)
        .arg("service")
        .args(args)
        .arg("--service")
        .arg(format!("127.0.0.1:{port}"))
        .output()
        .expect("run corral service");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn connect(port: u16) -> ServicesClient<tonic::transport::Channel> {
    wait_for("service API up", WAIT, || async {
        ServicesClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .ok()
    })
    .await
}

async fn get(client: &ServicesClient<tonic::transport::Channel>) -> Option<pb::ServiceStatus> {
    client
        .clone()
        .get(pb::GetServiceRequest { name: "web".into() })
        .await
        .ok()
        .map(tonic::Response::into_inner)
}

fn running_tasks(status: &pb::ServiceStatus) -> BTreeSet<String> {
    status
        .instances
        .iter()
        .filter(|i| i.state() == pb::TaskState::TaskRunning)
        .flat_map(|i| i.task_ids.iter().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_service_framework_keeps_its_instances_and_still_replaces_failed_ones() {
    let cluster = Cluster::start(1).await;
    let master = cluster.master.to_string();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let work_dir = cluster.dir.path().join("service");
    let dir = cluster.dir.path();
    let file = dir.join("web.toml");
    std::fs::write(
        &file,
        format!(
            r#"
name = "web"
instances = 3

[restart]
backoff = "0.2s"

[task]
command = "while [ ! -e {dir}/kill-$CORRAL_INSTANCE ]; do sleep 0.1; done; exit 3"
cpus = 0.1
mem = 16
"#,
            dir = dir.display()
        ),
    )
    .expect("write service file");

    let mut first = serve(&master, port, &work_dir);
    let client = connect(port).await;
    let (code, out, err) = cli(port, &["apply", "-f", file.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("created service web"), "{out}");
    let before = wait_for("3 instances running", WAIT, || async {
        let status = get(&client).await?;
        (running_tasks(&status).len() == 3).then_some(status)
    })
    .await;
    let tasks = running_tasks(&before);
    first.0.kill().expect("SIGKILL the framework");
    first.0.wait().expect("reap it");

    let _second = serve(&master, port, &work_dir);
    let client = connect(port).await;
    // Re-subscribed with its stored id: the master sees one connected
    // framework, the same one.
    cluster
        .wait_state("the framework re-subscribed", |s| {
            let fws: Vec<_> = s
                .frameworks
                .iter()
                .filter(|f| f.name == "corral-service")
                .collect();
            fws.len() == 1 && fws[0].state == "connected"
        })
        .await;
    let after = wait_for("the service is back with its 3 instances", WAIT, || async {
        let status = get(&client).await?;
        (running_tasks(&status).len() == 3).then_some(status)
    })
    .await;
    assert_eq!(
        running_tasks(&after),
        tasks,
        "healthy instances were restarted"
    );
    assert_eq!(after.instances.len(), 3, "{after:?}");
    // And it stays so after reconciliation has answered (a few allocation
    // rounds): nothing relaunched.
    let state = cluster
        .wait_state("the master runs exactly the same 3 tasks", |s| {
            let ids: BTreeSet<String> = s.tasks.iter().map(|t| t.id.clone()).collect();
            ids == tasks && s.tasks.iter().all(|t| t.state == "TASK_RUNNING")
        })
        .await;
    assert!(
        state.completed_tasks.is_empty(),
        "{:?}",
        state.completed_tasks
    );

    // A failure after the restart is still replaced.
    let victim = after.instances[0].number;
    std::fs::write(dir.join(format!("kill-{victim}")), b"").expect("signal file");
    let replaced = wait_for("the failed instance replaced", WAIT, || async {
        let status = get(&client).await?;
        let ok = running_tasks(&status).len() == 3
            && status.instances.len() == 3
            && status.instances.iter().all(|i| i.number != victim);
        ok.then_some(status)
    })
    .await;
    let new: Vec<_> = running_tasks(&replaced)
        .difference(&tasks)
        .cloned()
        .collect();
    assert_eq!(new.len(), 1, "{replaced:?}");

    // The CLI's views of the restarted framework.
    let (code, out, err) = cli(port, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("web") && out.contains("3/3/3"), "{out}");
    let (code, out, err) = cli(port, &["status", "web"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("deployment: stable"), "{out}");
    assert_eq!(out.matches("RUNNING").count(), 3, "{out}");
    let (code, _, err) = cli(port, &["status", "nope"]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("corral service status: no service named nope"),
        "{err}"
    );
    let (code, out, err) = cli(port, &["delete", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    cluster
        .wait_state("every instance killed", |s| s.tasks.is_empty())
        .await;
    cluster.shutdown().await;
}
