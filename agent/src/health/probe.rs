//! The probes (command, HTTP GET, TCP connect) and the loop that runs one
//! check's probe every interval and reports each result to the actor.
//!
//! HTTP and TCP probes connect from the agent's own network namespace to
//! [`ProbeTarget::host`] (127.0.0.1 while tasks share the host network).
//! Command probes run in the task's container ([`super::enter`]) or, for
//! a task without one, on the host in its sandbox. Time is tokio's, so a
//! paused clock drives the intervals.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::enter::{self, ContainerEntry};
use super::{CheckSpec, ProbeSpec};
use crate::actor::{Command, StreamKey};
use crate::task::{signal_group, signal_name};

/// How much of a command probe's output (stdout and stderr, in order) is
/// kept for the failure message: the end, where errors usually are.
const OUTPUT_TAIL: usize = 4096;
/// Longest HTTP response head read (status line and headers; the body is
/// never read): enough for any sane server, bounded for a hostile one.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// After a command probe's process exited, how long the rest of its
/// output may take to arrive (a process that escaped its group can hold
/// the pipe open forever).
const OUTPUT_DRAIN: Duration = Duration::from_millis(100);
/// How long reaping a SIGKILLed probe process may take before it is left
/// to tokio's orphan reaper.
const REAP_TIMEOUT: Duration = Duration::from_secs(1);

/// Where a task's probes go.
#[derive(Debug)]
pub(crate) struct ProbeTarget {
    /// The task's address for HTTP and TCP probes. 127.0.0.1 today (tasks
    /// use the host's network); a pod's own IP once pods have one.
    pub(crate) host: IpAddr,
    /// Where command probes run; `None` when the task has no command probe.
    pub(crate) exec: Option<ExecTarget>,
    /// A pidfd of the task's main process (the container's init, or the
    /// process group leader), taken before anyone could reap it; `None` if
    /// it could not be opened.
    pub(crate) main: Option<OwnedFd>,
}

impl ProbeTarget {
    /// Whether the task's main process has exited: a failure now says
    /// nothing about its health (its server went with it, or the
    /// container's teardown killed the probe), and the task's end is
    /// reported from its exit.
    fn task_exited(&self) -> bool {
        self.main
            .as_ref()
            .is_some_and(|fd| enter::exited(fd).unwrap_or(false))
    }
}

/// Where and how a command probe runs: like the task's command.
#[derive(Debug)]
pub(crate) enum ExecTarget {
    /// A plain process task (`--isolation=none`): on the host, in the
    /// sandbox, with the task's environment.
    Host {
        cwd: PathBuf,
        env: Vec<(String, String)>,
    },
    /// Inside the task's container: its namespaces, cgroups, root, working
    /// directory, user, capabilities and environment.
    Container(ContainerEntry),
    /// The container could not be prepared for probes (e.g. out of fds);
    /// every command probe fails with this.
    Unavailable(String),
}

/// How one probe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// Why, e.g. `GET http://127.0.0.1:8080/health: status 500`.
    Failure(String),
    /// It ran longer than the check's timeout and was abandoned (a command
    /// probe's process group is killed).
    Timeout(String),
}

impl Outcome {
    /// The metric label.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure(_) => "failure",
            Outcome::Timeout(_) => "timeout",
        }
    }

    pub(crate) fn as_result(&self) -> Result<(), &str> {
        match self {
            Outcome::Success => Ok(()),
            Outcome::Failure(e) | Outcome::Timeout(e) => Err(e),
        }
    }
}

/// One check's runner: the first probe at `first`, then one every
/// interval (counted from the start of the previous one, as Kubernetes'
/// prober ticks), each result sent to the actor. Runs until the monitor
/// aborts it (the task ended, was killed, or the check is done) or the
/// actor is gone; a probe in flight is dropped with it, which kills a
/// command probe's process group.
pub(super) async fn run(
    key: StreamKey,
    pid: u32,
    spec: CheckSpec,
    target: Arc<ProbeTarget>,
    first: Instant,
    tx: mpsc::Sender<Command>,
) {
    tokio::time::sleep_until(first).await;
    loop {
        let started = Instant::now();
        let outcome = probe(&spec.probe, &target, spec.timeout).await;
        if outcome != Outcome::Success && target.task_exited() {
            return;
        }
        let result = Command::HealthResult {
            key: key.clone(),
            pid,
            kind: spec.kind,
            outcome,
            duration: started.elapsed(),
        };
        if tx.send(result).await.is_err() {
            return;
        }
        tokio::time::sleep_until(started + spec.interval).await;
    }
}

/// Runs one probe with its timeout.
pub(crate) async fn probe(probe: &ProbeSpec, target: &ProbeTarget, timeout: Duration) -> Outcome {
    let what = describe(probe, target.host);
    let attempt = async {
        match probe {
            ProbeSpec::Http { port, path } => {
                http_get(SocketAddr::new(target.host, *port), path).await
            }
            ProbeSpec::Tcp { port } => TcpStream::connect(SocketAddr::new(target.host, *port))
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            ProbeSpec::Command { argv } => match &target.exec {
                Some(exec) => run_command(argv, exec).await,
                None => Err("no way to run commands for this task".to_string()),
            },
        }
    };
    // Dropping `attempt` at the timeout closes a connection, or kills a
    // command probe's process group (its guard).
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Outcome::Success,
        Ok(Err(e)) => Outcome::Failure(format!("{what}: {e}")),
        Err(_) => Outcome::Timeout(format!(
            "{what}: timed out after {}s",
            timeout.as_secs_f64()
        )),
    }
}

/// `GET http://127.0.0.1:8080/health`, `connect 127.0.0.1:5432`, `command`.
fn describe(probe: &ProbeSpec, host: IpAddr) -> String {
    match probe {
        ProbeSpec::Http { port, path } => {
            format!("GET http://{}{path}", SocketAddr::new(host, *port))
        }
        ProbeSpec::Tcp { port } => format!("connect {}", SocketAddr::new(host, *port)),
        ProbeSpec::Command { .. } => "command".to_string(),
    }
}

/// A minimal HTTP/1.1 GET on a fresh connection (`Connection: close`, as
/// Kubernetes' prober disables keep-alive): only the status matters, the
/// body is never read, redirects are not followed (a 3xx is a success, as
/// in Kubernetes and Mesos). Interim 1xx responses are skipped.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: corral-agent/{}\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut head: Vec<u8> = Vec::with_capacity(1024);
    // Bounded: every turn reads at least one byte into `head`, which may
    // not outgrow MAX_RESPONSE_HEAD.
    loop {
        if let Some(end) = find(&head, b"\r\n\r\n") {
            let status = status_code(&head[..end])?;
            if (100..200).contains(&status) {
                head.drain(..end + 4);
                continue;
            }
            return if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("status {status}"))
            };
        }
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(format!(
                "response head longer than {MAX_RESPONSE_HEAD} bytes"
            ));
        }
        let mut buf = [0u8; 1024];
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read the response: {e}"))?;
        if n == 0 {
            // A status line without headers is still an answer.
            if !head.is_empty() && find(&head, b"\r\n").is_some() {
                let status = status_code(&head)?;
                return if (200..400).contains(&status) {
                    Ok(())
                } else {
                    Err(format!("status {status}"))
                };
            }
            return Err("connection closed before a response".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The status code of a response head: `HTTP/1.1 200 OK`.
fn status_code(head: &[u8]) -> Result<u16, String> {
    let line_end = find(head, b"\r\n").unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]);
    let mut parts = line.split_whitespace();
    let code = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code,
        _ => return Err(format!("not an HTTP response: {:?}", truncate(&line, 80))),
    };
    code.parse::<u16>()
        .ok()
        .filter(|c| (100..1000).contains(c))
        .ok_or_else(|| format!("bad status code {:?}", truncate(code, 16)))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Runs a command probe to its end: spawns it in its own process group
/// (entering the container first, in the child), collects the end of its
/// output, waits for it to exit, then kills whatever it left in its group.
/// Dropped half-way (timeout, the runner aborted) the guard kills the
/// whole group.
async fn run_command(argv: &[String], exec: &ExecTarget) -> Result<(), String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "empty command".to_string())?;
    let (read, write) = crate::logs::pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    let write2 = write
        .try_clone()
        .map_err(|e| format!("cannot create a pipe: {e}"))?;
    let mut child = {
        // Scoped: the command holds the pipe's write ends, which must be
        // closed here for the output to reach end-of-file.
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .stderr(Stdio::from(write2))
            .process_group(0)
            // The guard below kills the whole group; this reaps.
            .kill_on_drop(true);
        match exec {
            ExecTarget::Host { cwd, env } => {
                command
                    .current_dir(cwd)
                    .envs(env.iter().map(|(k, v)| (k, v)));
            }
            ExecTarget::Container(entry) => {
                command.envs(entry.env().iter().map(|(k, v)| (k, v)));
                // Opened now, in the agent (files under /proc, the cgroup
                // files); used by the child between fork and exec.
                let prepared = entry.prepare().map_err(|e| e.to_string())?;
                // SAFETY: `enter` is async-signal-safe: it only makes raw
                // syscalls on fds and C strings prepared here, allocates
                // nothing and cannot panic (see enter::Prepared::enter).
                unsafe {
                    command.pre_exec(move || prepared.enter());
                }
            }
            ExecTarget::Unavailable(reason) => return Err(reason.clone()),
        }
        command
            .spawn()
            .map_err(|e| format!("cannot run {program}: {e}"))?
    };
    let pid = child
        .id()
        .ok_or_else(|| "the probe exited before its pid was known".to_string())?;
    // The child is not reaped before `child.wait()` below, so its pid (and
    // the group id) cannot be reused until then: the group kills are safe.
    let mut guard = GroupGuard(Some(pid));
    let exited = enter::watch_exit(pid).map_err(|e| format!("cannot watch the probe: {e}"))?;
    let output = pipe::Receiver::from_owned_fd(read)
        .map_err(|e| format!("cannot read the probe's output: {e}"))?;
    let mut tail = Tail::default();
    let mut eof = false;
    // Bounded by the probe's timeout (the caller's) and by the process's
    // exit: each turn either reads output or sees the exit.
    loop {
        tokio::select! {
            ready = exited.readable() => {
                // Readable once it exited; nothing to clear, we are done.
                let _exited = ready.map_err(|e| format!("cannot watch the probe: {e}"))?;
                break;
            }
            ready = output.readable(), if !eof => {
                ready.map_err(|e| format!("cannot read the probe's output: {e}"))?;
                eof = tail.read_from(&output);
            }
        }
    }
    // The leader exited (not reaped yet): kill what it left behind.
    guard.fire();
    let drain_until = Instant::now() + OUTPUT_DRAIN;
    while !eof {
        match tokio::time::timeout_at(drain_until, output.readable()).await {
            Ok(Ok(())) => eof = tail.read_from(&output),
            _ => break,
        }
    }
    let status = tokio::time::timeout(REAP_TIMEOUT, child.wait())
        .await
        .map_err(|_| "the probe's process could not be reaped".to_string())?
        .map_err(|e| format!("cannot wait for the probe: {e}"))?;
    drop(exited);
    let what = match (status.code(), status.signal()) {
        (Some(0), _) => return Ok(()),
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        (None, None) => format!("ended with {status}"),
    };
    let out = tail.text();
    if out.is_empty() {
        Err(what)
    } else {
        Err(format!("{what}: {out}"))
    }
}

/// SIGKILLs a probe's process group when fired or dropped while armed.
struct GroupGuard(Option<u32>);

impl GroupGuard {
    fn fire(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.fire();
    }
}

/// The last [`OUTPUT_TAIL`] bytes of a probe's output.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    /// Reads what the pipe has; true at end-of-file (or a read error,
    /// which ends the output just the same).
    fn read_from(&mut self, pipe: &pipe::Receiver) -> bool {
        let mut buf = [0u8; 4096];
        // Bounded: a pipe holds at most its buffer; WouldBlock ends it.
        loop {
            match pipe.try_read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    self.0.extend_from_slice(&buf[..n]);
                    if self.0.len() > OUTPUT_TAIL {
                        let cut = self.0.len() - OUTPUT_TAIL;
                        self.0.drain(..cut);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).trim().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use tokio::net::TcpListener;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn target(exec: Option<ExecTarget>) -> ProbeTarget {
        ProbeTarget {
            host: LOCALHOST,
            exec,
            main: None,
        }
    }

    /// Serves `response` to every connection, after reading the request
    /// head; returns the port.
    async fn serve(response: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 512];
                    while find(&head, b"\r\n\r\n").is_none() {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(response.as_bytes()).await;
                });
            }
        });
        port
    }

    async fn http(port: u16, path: &str) -> Outcome {
        let spec = ProbeSpec::Http {
            port,
            path: path.into(),
        };
        probe(&spec, &target(None), Duration::from_secs(5)).await
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_and_fail_otherwise_naming_the_url() {
        let ok = serve("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        assert_eq!(http(ok, "/health").await, Outcome::Success);
        let redirect = serve("HTTP/1.0 302 Found\r\nLocation: /elsewhere\r\n\r\n").await;
        assert_eq!(http(redirect, "/").await, Outcome::Success);
        let interim = serve("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(http(interim, "/").await, Outcome::Success);
        let broken = serve("HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        assert_eq!(
            http(broken, "/health").await,
            Outcome::Failure(format!("GET http://127.0.0.1:{broken}/health: status 500"))
        );
        let garbage = serve("SSH-2.0-OpenSSH\r\n\r\n").await;
        let Outcome::Failure(m) = http(garbage, "/").await else {
            panic!("garbage is a failure");
        };
        assert!(m.contains("not an HTTP response"), "{m}");
    }

    #[tokio::test]
    async fn http_and_tcp_probes_of_a_closed_port_fail() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let Outcome::Failure(m) = http(port, "/").await else {
            panic!("closed port");
        };
        assert!(
            m.starts_with(&format!("GET http://127.0.0.1:{port}/: ")),
            "{m}"
        );
        let tcp = probe(
            &ProbeSpec::Tcp { port },
            &target(None),
            Duration::from_secs(5),
        )
        .await;
        let Outcome::Failure(m) = tcp else {
            panic!("closed port");
        };
        assert!(m.starts_with(&format!("connect 127.0.0.1:{port}: ")), "{m}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let spec = ProbeSpec::Http {
            port,
            path: "/".into(),
        };
        let outcome = probe(&spec, &target(None), Duration::from_millis(200)).await;
        assert_eq!(
            outcome,
            Outcome::Timeout(format!(
                "GET http://127.0.0.1:{port}/: timed out after 0.2s"
            ))
        );
        assert_eq!(outcome.label(), "timeout");
        drop(listener);
    }

    fn host_exec(dir: &std::path::Path) -> ExecTarget {
        ExecTarget::Host {
            cwd: dir.to_path_buf(),
            env: vec![
                ("PATH".into(), crate::task::TASK_PATH.into()),
                ("GREETING".into(), "hi".into()),
            ],
        }
    }

    fn sh(script: &str) -> ProbeSpec {
        ProbeSpec::Command {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        }
    }

    #[tokio::test]
    async fn host_command_probes_run_in_the_sandbox_with_the_task_environment() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker"), "").unwrap();
        let t = target(Some(host_exec(dir.path())));
        let ok = sh("test -f marker && test \"$GREETING\" = hi && test -z \"$HOME\"");
        assert_eq!(
            probe(&ok, &t, Duration::from_secs(5)).await,
            Outcome::Success
        );
        let failing = sh("echo to-stdout; echo to-stderr >&2; exit 3");
        assert_eq!(
            probe(&failing, &t, Duration::from_secs(5)).await,
            Outcome::Failure("command: exited with status 3: to-stdout\nto-stderr".into())
        );
        let missing = ProbeSpec::Command {
            argv: vec!["/no/such/probe".into()],
        };
        let Outcome::Failure(m) = probe(&missing, &t, Duration::from_secs(5)).await else {
            panic!("a missing program fails");
        };
        assert!(m.starts_with("command: cannot run /no/such/probe: "), "{m}");
    }

    #[tokio::test]
    async fn only_the_end_of_a_long_output_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(Some(host_exec(dir.path())));
        let spec = sh("i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; exit 1");
        let Outcome::Failure(m) = probe(&spec, &t, Duration::from_secs(10)).await else {
            panic!("exit 1 fails");
        };
        assert!(m.ends_with("line-1999"), "{m}");
        assert!(!m.contains("line-0\n"), "the start is cut");
        assert!(m.len() <= OUTPUT_TAIL + 64, "{}", m.len());
    }

    /// Non-zombie processes whose command line contains `needle`.
    fn processes_with(needle: &str) -> Vec<u32> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(") ")
                .is_some_and(|(_, r)| r.starts_with('Z'));
            if !zombie
                && String::from_utf8_lossy(&cmdline)
                    .replace('\0', " ")
                    .contains(needle)
            {
                found.push(pid);
            }
        }
        found
    }

    async fn gone(needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes_with(needle).is_empty() {
            assert!(Instant::now() < deadline, "{needle} still running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_hanging_command_probe_is_killed_with_its_children_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(Some(host_exec(dir.path())));
        // A child of the shell, and the shell waiting for it.
        let spec = sh("sleep 1001.25; true");
        let started = Instant::now();
        let outcome = probe(&spec, &t, Duration::from_millis(300)).await;
        assert_eq!(
            outcome,
            Outcome::Timeout("command: timed out after 0.3s".into())
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        gone("sleep 1001.25").await;
    }

    #[tokio::test]
    async fn processes_a_finished_probe_left_behind_are_killed() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(Some(host_exec(dir.path())));
        // Backgrounded with its output elsewhere: the probe itself is done.
        let spec = sh("sleep 1002.5 >/dev/null 2>&1 & exit 0");
        assert_eq!(
            probe(&spec, &t, Duration::from_secs(5)).await,
            Outcome::Success
        );
        gone("sleep 1002.5").await;
    }
}
