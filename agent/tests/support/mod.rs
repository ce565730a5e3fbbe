//! Test support: a fake master driven by the test, an in-process agent, a
//! bounded poll helper, and small HTTP and process helpers.

#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use corral_agent::{AgentConfig, AgentError};
use corral_proto::pb::{
    self, TaskState,
    agent_registry_server::{AgentRegistry, AgentRegistryServer},
    master_message::Message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every 20 ms until it returns `Some`, for at most [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits `fut` for at most [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

type ToAgent = mpsc::UnboundedSender<Result<pb::MasterMessage, Status>>;

/// One `Attach` stream as the fake master sees it.
pub struct Conn {
    pub register: pb::Register,
    to_agent: Option<ToAgent>,
    from_agent: mpsc::UnboundedReceiver<pb::AgentMessage>,
    /// `TaskEnded` notices seen so far, in order.
    pub task_ended: Vec<pb::TaskEnded>,
}

impl Conn {
    pub fn send(&self, msg: Message) {
        let to = self.to_agent.as_ref().expect("stream still open");
        to.send(Ok(pb::MasterMessage {
            epoch: 0,
            message: Some(msg),
        }))
        .expect("agent stream open");
    }

    /// Answers the registration. A long heartbeat interval keeps the agent
    /// from dropping a master that sends no heartbeats of its own.
    pub fn registered(&self, agent_id: &str, heartbeat_interval_seconds: f64) {
        self.send(Message::Registered(pb::Registered {
            registry_id: String::new(),
            agent_id: agent_id.to_string(),
            heartbeat_interval_seconds,
        }));
    }

    /// The next status update; heartbeats are skipped.
    pub async fn next_update(&mut self) -> pb::StatusUpdate {
        loop {
            let msg = within("a message from the agent", self.from_agent.recv())
                .await
                .expect("agent stream ended");
            match msg.message {
                Some(pb::agent_message::Message::StatusUpdate(u)) => return u,
                Some(pb::agent_message::Message::Heartbeat(_)) => continue,
                Some(pb::agent_message::Message::TaskEnded(e)) => self.task_ended.push(e),
                other => panic!("unexpected agent message {other:?}"),
            }
        }
    }

    /// The next update, which must be for `task_id` in `state`.
    pub async fn expect_update(&mut self, task_id: &str, state: TaskState) -> pb::TaskStatus {
        let u = self.next_update().await;
        let s = u.status.clone().expect("status");
        assert_eq!(
            (s.task_id.as_str(), s.state()),
            (task_id, state),
            "unexpected update {u:?}"
        );
        s
    }

    /// The next update, acknowledged; must be for `task_id` in `state`.
    pub async fn expect_and_ack(
        &mut self,
        fw: &str,
        task_id: &str,
        state: TaskState,
    ) -> pb::TaskStatus {
        let s = self.expect_update(task_id, state).await;
        self.ack(fw, &s);
        s
    }

    pub fn ack(&self, fw: &str, status: &pb::TaskStatus) {
        self.send(Message::Acknowledgement(pb::StatusAcknowledgement {
            framework_id: fw.to_string(),
            task_id: status.task_id.clone(),
            uuid: status.uuid.clone(),
        }));
    }

    /// Waits until the agent sends a heartbeat.
    pub async fn expect_heartbeat(&mut self) {
        loop {
            let msg = within("a heartbeat", self.from_agent.recv())
                .await
                .expect("agent stream ended");
            if let Some(pb::agent_message::Message::Heartbeat(_)) = msg.message {
                return;
            }
        }
    }

    /// Ends the stream from the master's side.
    pub fn drop_stream(&mut self) {
        self.to_agent = None;
    }
}

struct Registry {
    conns: mpsc::UnboundedSender<Conn>,
}

#[tonic::async_trait]
impl AgentRegistry for Registry {
    type AttachStream = UnboundedReceiverStream<Result<pb::MasterMessage, Status>>;

    async fn attach(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty stream"))?;
        let Some(pb::agent_message::Message::Register(register)) = first.message else {
            return Err(Status::invalid_argument("first message must be Register"));
        };
        let (to_tx, to_rx) = mpsc::unbounded_channel();
        let (from_tx, from_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                if from_tx.send(m).is_err() {
                    break;
                }
            }
        });
        let _ = self.conns.send(Conn {
            register,
            to_agent: Some(to_tx),
            from_agent: from_rx,
            task_ended: Vec::new(),
        });
        Ok(Response::new(UnboundedReceiverStream::new(to_rx)))
    }
}

/// A tonic `AgentRegistry` on 127.0.0.1:0 that hands each stream to the test.
pub struct FakeMaster {
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<Conn>,
    server: JoinHandle<()>,
}

impl FakeMaster {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(AgentRegistryServer::new(Registry { conns: tx }))
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        Self {
            addr,
            conns: rx,
            server,
        }
    }

    /// The next stream an agent opens.
    pub async fn next_conn(&mut self) -> Conn {
        within("an agent to attach", self.conns.recv())
            .await
            .expect("fake master stopped")
    }

    /// The next stream, answered with `Registered{agent_id}`.
    pub async fn accept(&mut self, agent_id: &str) -> Conn {
        let conn = self.next_conn().await;
        conn.registered(agent_id, 60.0);
        conn
    }
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// An agent running in-process with its own temp work dir.
pub struct TestAgent {
    pub addr: SocketAddr,
    pub work_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<Result<(), AgentError>>>,
}

impl TestAgent {
    pub async fn start(master: SocketAddr) -> Self {
        Self::start_with(master, |_| {}).await
    }

    pub async fn start_with(master: SocketAddr, tweak: impl FnOnce(&mut AgentConfig)) -> Self {
        let work_dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = AgentConfig::new(master.to_string(), work_dir.path().to_path_buf());
        config.reconnect_backoff_max = Duration::from_millis(200);
        config.hostname = "test-host".to_string();
        // These tests are about the agent's protocol; they run tasks as plain
        // processes (--isolation=none). Containers are tested in
        // containerizer.rs and, through the whole cluster, in tests/.
        config.isolation = corral_agent::Isolation::None;
        tweak(&mut config);
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(corral_agent::run(config, listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            work_dir,
            shutdown: Some(tx),
            join: Some(join),
        }
    }

    /// Resolves the shutdown future and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.join().await
    }

    /// Drops the `run` future without resolving its shutdown future.
    pub fn abort(&mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }

    /// Waits for `run` to return on its own.
    pub async fn join(&mut self) -> Result<(), AgentError> {
        let join = self.join.take().expect("agent already joined");
        within("the agent to stop", join)
            .await
            .expect("agent task panicked")
    }

    pub fn sandbox(&self, fw: &str, task: &str) -> std::path::PathBuf {
        self.work_dir.path().join("sandboxes").join(fw).join(task)
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }

    pub async fn state(&self) -> serde_json::Value {
        let (code, body) = self.http_get("/state").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// The pid (= process group) of a running task, from `/state`.
    pub async fn task_pid(&self, task_id: &str) -> u32 {
        let state = self.state().await;
        let task = state["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task_id"] == task_id)
            .unwrap_or_else(|| panic!("task {task_id} not in {state}"));
        u32::try_from(task["pid"].as_u64().expect("running task has a pid")).unwrap()
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // On a failing test: ask the agent to kill its tasks. When the
        // runtime goes away first, dropping the agent's tasks SIGKILLs every
        // process group anyway.
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A minimal HTTP/1.1 GET; returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = within("an HTTP connection", TcpStream::connect(addr))
        .await
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    within("an HTTP response", s.read_to_end(&mut raw))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    (code, body.to_string())
}

/// Non-zombie processes in process group `pgid`, from /proc.
pub fn live_group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after "comm)" are: state ppid pgrp ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            out.push(pid);
        }
    }
    out
}

/// A `RunTask` of `sh -c script`.
pub fn run_shell(fw: &str, task_id: &str, script: &str) -> Message {
    run_command(
        fw,
        task_id,
        pb::CommandInfo {
            shell: true,
            value: script.to_string(),
            ..Default::default()
        },
    )
}

pub fn run_command(fw: &str, task_id: &str, command: pb::CommandInfo) -> Message {
    Message::RunTask(pb::RunTask {
        framework: Some(pb::FrameworkInfo {
            id: fw.to_string(),
            name: "test".to_string(),
            ..Default::default()
        }),
        task: Some(pb::TaskInfo {
            task_id: task_id.to_string(),
            name: task_id.to_string(),
            command: Some(command),
            ..Default::default()
        }),
    })
}

pub fn kill(fw: &str, task_id: &str, grace: Option<f64>) -> Message {
    Message::KillTask(pb::KillTask {
        framework_id: fw.to_string(),
        task_id: task_id.to_string(),
        kill_grace_period_seconds: grace,
    })
}
