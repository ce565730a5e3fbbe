//! `corral master`, `corral agent`, `corral batch serve`, `corral service
//! serve` and `corral dev`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use corral_agent::AgentConfig;
use corral_batch::BatchConfig;
use corral_master::MasterConfig;
use corral_proto::{Resources, attributes};
use corral_service::ServiceConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::DEFAULT_MASTER;

#[derive(Args)]
pub struct MasterArgs {
    /// Address to serve gRPC and HTTP (/metrics, /state) on.
    #[arg(long, default_value = "0.0.0.0:5050", env = "CORRAL_MASTER_LISTEN")]
    listen: SocketAddr,
    /// The master's registry (agents, frameworks, tasks) lives here, so a
    /// restarted master recovers them.
    #[arg(
        long,
        default_value = "/var/lib/corral/master",
        env = "CORRAL_MASTER_WORK_DIR"
    )]
    work_dir: PathBuf,
    /// HOST:PORT other masters give clients to reach this one when it
    /// leads (with etcd; default: the listen address, or this host's name
    /// when listening on all interfaces).
    #[arg(long, env = "CORRAL_MASTER_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    tuning: MasterTuning,
}

#[derive(Args)]
struct MasterTuning {
    /// Time between periodic allocation rounds (e.g. 1s, 500ms).
    #[arg(long, value_parser = parse_duration, env = "CORRAL_ALLOCATION_INTERVAL")]
    allocation_interval: Option<Duration>,
    /// Rescind offers not answered within this time (default: never).
    #[arg(long, value_parser = parse_duration, env = "CORRAL_OFFER_TIMEOUT")]
    offer_timeout: Option<Duration>,
    /// With --max-agent-ping-timeouts: how long an agent may stay silent
    /// before it is unreachable (default 15s × 5, as in Mesos).
    #[arg(long, value_parser = parse_duration, env = "CORRAL_AGENT_PING_TIMEOUT")]
    agent_ping_timeout: Option<Duration>,
    #[arg(long, env = "CORRAL_MAX_AGENT_PING_TIMEOUTS")]
    max_agent_ping_timeouts: Option<u32>,
    /// How often frameworks get a heartbeat event (default 15s).
    #[arg(long, value_parser = parse_duration, env = "CORRAL_FRAMEWORK_HEARTBEAT_INTERVAL")]
    framework_heartbeat_interval: Option<Duration>,
    /// Role weights for fair sharing, e.g. "analytics=2,batch=0.5".
    #[arg(long, default_value = "", env = "CORRAL_WEIGHTS")]
    weights: String,
    /// After a master restart, how long known agents have to re-register
    /// before they are unreachable (default 10m, as in Mesos).
    #[arg(long, value_parser = parse_duration, env = "CORRAL_AGENT_REREGISTER_TIMEOUT")]
    agent_reregister_timeout: Option<Duration>,
    /// How long an agent stays unreachable before it is removed and its
    /// tasks become TASK_GONE (default 15m).
    #[arg(long, value_parser = parse_duration, env = "CORRAL_AGENT_REMOVAL_TIMEOUT")]
    agent_removal_timeout: Option<Duration>,
    /// Where the master's registry lives: `embedded` (a file in the work
    /// dir; the default), `in-memory` (nothing survives a restart), or
    /// `etcd://h1:2379,h2:2379[/prefix]` (several masters elect a leader on
    /// etcd and keep the registry there).
    #[arg(long, default_value = "embedded", env = "CORRAL_MASTER_REGISTRY")]
    registry: String,
    /// With etcd: the TTL of the leader's lease, whole seconds (default 2s).
    /// A killed leader is replaced within about this long.
    #[arg(long, value_parser = parse_duration, env = "CORRAL_LEADER_LEASE_TTL")]
    leader_lease_ttl: Option<Duration>,
    /// At most this many removals per duration, e.g. "1/10s" (the default).
    #[arg(long, env = "CORRAL_AGENT_REMOVAL_RATE")]
    agent_removal_rate: Option<String>,
    /// No agent is removed while more than this percentage of agents is
    /// unreachable at once (default 50).
    #[arg(long, env = "CORRAL_MAX_UNREACHABLE_PERCENT")]
    max_unreachable_percent: Option<u8>,
    /// Removed agents' ids are refused for this long, then forgotten
    /// (default 14d, as in Mesos).
    #[arg(long, value_parser = parse_duration, env = "CORRAL_REGISTRY_MAX_AGENT_AGE")]
    registry_max_agent_age: Option<Duration>,
    /// At most this many removed agents' ids are kept, the newest
    /// (default 102400, as in Mesos).
    #[arg(long, env = "CORRAL_REGISTRY_MAX_AGENT_COUNT")]
    registry_max_agent_count: Option<usize>,
}

impl MasterTuning {
    /// `work_dir`: where the embedded registry lives.
    fn apply(&self, mut config: MasterConfig, work_dir: &std::path::Path) -> Result<MasterConfig> {
        if let Some(d) = self.allocation_interval {
            if d.is_zero() {
                bail!("--allocation-interval: must be > 0");
            }
            config.allocation_interval = d;
        }
        config.offer_timeout = self.offer_timeout.or(config.offer_timeout);
        if let Some(d) = self.agent_ping_timeout {
            if d.is_zero() {
                bail!("--agent-ping-timeout: must be > 0");
            }
            config.agent_ping_timeout = d;
        }
        if let Some(n) = self.max_agent_ping_timeouts {
            if n == 0 {
                bail!("--max-agent-ping-timeouts: must be > 0");
            }
            config.max_agent_ping_timeouts = n;
        }
        if let Some(d) = self.framework_heartbeat_interval {
            if d.is_zero() {
                bail!("--framework-heartbeat-interval: must be > 0");
            }
            config.framework_heartbeat_interval = d;
        }
        config.weights = MasterConfig::parse_weights(&self.weights).map_err(anyhow::Error::msg)?;
        config.work_dir = match self.registry.as_str() {
            "embedded" => Some(work_dir.to_path_buf()),
            "in-memory" => None,
            url if url.starts_with("etcd://") => {
                let mut etcd = corral_master::EtcdConfig::parse(url)
                    .map_err(|e| anyhow::anyhow!("--registry: {e}"))?;
                if let Some(ttl) = self.leader_lease_ttl {
                    if ttl.as_secs() < 1 || ttl.subsec_nanos() != 0 {
                        bail!(
                            "--leader-lease-ttl: must be whole seconds, at least 1s (etcd's unit)"
                        );
                    }
                    etcd.lease_ttl = ttl;
                }
                config.etcd = Some(etcd);
                None
            }
            other => bail!(
                "--registry: '{other}' is not one of embedded, in-memory, etcd://HOST:PORT[,HOST:PORT...]"
            ),
        };
        if self.leader_lease_ttl.is_some() && config.etcd.is_none() {
            bail!("--leader-lease-ttl: only with --registry etcd://...");
        }
        if let Some(d) = self.agent_reregister_timeout {
            if d.is_zero() {
                bail!("--agent-reregister-timeout: must be > 0");
            }
            config.agent_reregister_timeout = d;
        }
        if let Some(d) = self.agent_removal_timeout {
            if d.is_zero() {
                bail!("--agent-removal-timeout: must be > 0");
            }
            config.agent_removal_timeout = d;
        }
        if let Some(rate) = &self.agent_removal_rate {
            config.agent_removal_rate =
                corral_master::config::RemovalRate::parse(rate, parse_duration).map_err(|e| {
                    let detail = e.strip_prefix("agent_removal_rate: ").unwrap_or(&e);
                    anyhow::anyhow!("--agent-removal-rate: {detail}")
                })?;
        }
        if let Some(d) = self.registry_max_agent_age {
            if d.is_zero() {
                bail!("--registry-max-agent-age: must be > 0");
            }
            config.registry_max_agent_age = d;
        }
        if let Some(n) = self.registry_max_agent_count {
            config.registry_max_agent_count = n;
        }
        if let Some(p) = self.max_unreachable_percent {
            if p > 100 {
                bail!("--max-unreachable-percent: must be at most 100");
            }
            config.max_unreachable_percent = p;
        }
        Ok(config)
    }
}

#[derive(Args)]
pub struct AgentArgs {
    /// Master to register with: HOST:PORT, or several separated by commas
    /// (the agent follows the leader).
    #[arg(long, default_value = DEFAULT_MASTER, env = "CORRAL_MASTER")]
    master: String,
    /// Address to serve the agent API and /metrics on.
    #[arg(long, default_value = "0.0.0.0:5051", env = "CORRAL_AGENT_LISTEN")]
    listen: SocketAddr,
    /// HOST:PORT the master and frameworks use to reach this agent
    /// (default: the listen address, or this host's name when listening on
    /// all interfaces).
    #[arg(long, env = "CORRAL_AGENT_ADVERTISE")]
    advertise: Option<String>,
    /// Sandboxes and agent state live here.
    #[arg(long, default_value = "/var/lib/corral/agent", env = "CORRAL_WORK_DIR")]
    work_dir: PathBuf,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Args)]
struct NodeArgs {
    /// Override detected resources, per name, e.g.
    /// "cpus:4;mem:8192;disk:10000;ports:[31000-32000]".
    #[arg(long, env = "CORRAL_RESOURCES")]
    resources: Option<String>,
    /// Attributes offered with the resources, e.g. "rack:r1;zone:a".
    #[arg(long, default_value = "", env = "CORRAL_ATTRIBUTES")]
    attributes: String,
    /// Hostname to advertise (default: this machine's).
    #[arg(long, env = "CORRAL_HOSTNAME")]
    hostname: Option<String>,
    /// How tasks run: `container` (cgroups + namespaces; needs root) or
    /// `none` (plain processes, advertised as the attribute isolation:none).
    #[arg(long, value_enum, default_value_t = IsolationArg::Container, env = "CORRAL_ISOLATION")]
    isolation: IsolationArg,
    /// The agent's subtree in every cgroup hierarchy.
    #[arg(long, default_value = corral_agent::DEFAULT_CGROUP_ROOT, env = "CORRAL_CGROUP_ROOT")]
    cgroup_root: String,
    /// Cap each container's cpu time at its cpus (CFS quota), not only weight it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "CORRAL_CPU_HARD_LIMIT")]
    cpu_hard_limit: bool,
    /// Most processes per container.
    #[arg(long, default_value_t = corral_agent::DEFAULT_PIDS_LIMIT, env = "CORRAL_PIDS_LIMIT")]
    pids_limit: u64,
    /// Comma-separated host path prefixes tasks may mount as volumes.
    #[arg(long, value_delimiter = ',', env = "CORRAL_ALLOWED_HOST_PATHS")]
    allowed_host_paths: Vec<PathBuf>,
    /// Registry HOST:PORT that may be reached over plain http (repeatable).
    #[arg(
        long = "insecure-registry",
        value_delimiter = ',',
        env = "CORRAL_INSECURE_REGISTRIES"
    )]
    insecure_registries: Vec<String>,
    /// Rotate a task's stdout/stderr when it reaches this size (e.g. 10M, 512K).
    #[arg(long, default_value = "10M", value_parser = parse_size, env = "CORRAL_LOG_MAX_SIZE")]
    log_max_size: u64,
    /// Files kept per stream, the live one included.
    #[arg(long, default_value_t = corral_agent::logs::DEFAULT_LOG_MAX_FILES,
          value_parser = clap::value_parser!(u32).range(1..), env = "CORRAL_LOG_MAX_FILES")]
    log_max_files: u32,
    /// How long a finished task's sandbox (its logs and files) is kept
    /// after the framework acknowledged its end.
    #[arg(long, value_parser = parse_duration, env = "CORRAL_SANDBOX_GC_DELAY")]
    sandbox_gc_delay: Option<Duration>,
    /// Most finished tasks' sandboxes kept; the oldest go first.
    #[arg(long, default_value_t = corral_agent::DEFAULT_SANDBOX_GC_MAX, env = "CORRAL_SANDBOX_GC_MAX")]
    sandbox_gc_max: usize,
    /// IPv4 network for pods (/8 to /30): the bridge takes the first
    /// address, each pod one of the rest.
    #[arg(long, default_value_t = corral_agent::network::PodCidr::DEFAULT.to_string(),
          env = "CORRAL_POD_CIDR")]
    pod_cidr: String,
    /// Linux bridge the agent attaches pods to (created if missing).
    #[arg(long, default_value = corral_agent::network::DEFAULT_POD_BRIDGE, env = "CORRAL_POD_BRIDGE")]
    pod_bridge: String,
    /// Refuse to start when a checkpoint file (under WORK_DIR/meta) cannot
    /// be read, naming it; `--strict=false` skips it and recovers the rest.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "CORRAL_STRICT")]
    strict: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum IsolationArg {
    Container,
    None,
}

/// Parses `10M`, `512K`, `1G` or a number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1024),
        Some((i, 'M' | 'm')) => (&t[..i], 1024 * 1024),
        Some((i, 'G' | 'g')) => (&t[..i], 1024 * 1024 * 1024),
        _ => (t, 1),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 10M, 512K or 1048576"))?;
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("'{text}' must be > 0 and fit in 64 bits")),
        Some(v) => Ok(v),
    }
}

impl NodeArgs {
    fn agent_config(&self, master: String, work_dir: PathBuf) -> Result<AgentConfig> {
        let mut config = AgentConfig::new(master, work_dir);
        if let Some(text) = &self.resources {
            config.resources =
                Some(Resources::parse(text).map_err(|e| anyhow::anyhow!("--resources: {e}"))?);
        }
        config.attributes = attributes::parse(&self.attributes)
            .map_err(|e| anyhow::anyhow!("--attributes: {e}"))?;
        if let Some(h) = &self.hostname {
            config.hostname = h.clone();
        }
        config.isolation = match self.isolation {
            IsolationArg::Container => corral_agent::Isolation::Container,
            IsolationArg::None => corral_agent::Isolation::None,
        };
        config.cgroup_root = self.cgroup_root.clone();
        config.cpu_hard_limit = self.cpu_hard_limit;
        if self.pids_limit == 0 {
            bail!("--pids-limit: must be > 0");
        }
        config.pids_limit = self.pids_limit;
        for p in &self.allowed_host_paths {
            if !p.is_absolute() {
                bail!(
                    "--allowed-host-paths: '{}' is not an absolute path",
                    p.display()
                );
            }
        }
        config.allowed_host_paths = self.allowed_host_paths.clone();
        config.insecure_registries = self.insecure_registries.clone();
        config.log = corral_agent::logs::LogConfig {
            max_size: self.log_max_size,
            max_files: self.log_max_files,
        };
        if let Some(delay) = self.sandbox_gc_delay {
            config.sandbox_gc_delay = delay;
        }
        config.sandbox_gc_max = self.sandbox_gc_max;
        config.pod_cidr = corral_agent::network::PodCidr::parse(&self.pod_cidr)
            .map_err(|e| anyhow::anyhow!("--pod-cidr: {e}"))?;
        corral_agent::network::validate_link_name(&self.pod_bridge)
            .map_err(|e| anyhow::anyhow!("--pod-bridge: {e}"))?;
        config.pod_bridge = self.pod_bridge.clone();
        config.strict = self.strict;
        Ok(config)
    }
}

#[derive(Args)]
pub struct BatchServeArgs {
    /// Master to register with: HOST:PORT, or several separated by commas
    /// (the framework follows the leader).
    #[arg(long, env = "CORRAL_MASTER")]
    master: String,
    /// Address to serve the batch API and /metrics on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], corral_batch::DEFAULT_PORT)),
          env = "CORRAL_BATCH_LISTEN")]
    listen: SocketAddr,
    /// The job store lives here.
    #[arg(
        long,
        default_value = "/var/lib/corral/batch",
        env = "CORRAL_BATCH_WORK_DIR"
    )]
    work_dir: PathBuf,
    /// How long the master keeps the framework's tasks while it is away
    /// (e.g. 1h, 7d) [default: 7d].
    #[arg(long, value_parser = corral_batch::spec::parse_duration, env = "CORRAL_BATCH_FAILOVER_TIMEOUT")]
    failover_timeout: Option<Duration>,
    /// Role the framework's share is accounted under [default: *].
    #[arg(long, env = "CORRAL_BATCH_ROLE")]
    role: Option<String>,
    /// Framework name shown by the master [default: corral-batch].
    #[arg(long, env = "CORRAL_BATCH_NAME")]
    name: Option<String>,
}

impl BatchServeArgs {
    fn config(&self) -> BatchConfig {
        let mut config = BatchConfig::new(self.master.clone(), self.work_dir.clone());
        if let Some(t) = self.failover_timeout {
            config.failover_timeout = t;
        }
        if let Some(role) = &self.role {
            config.role = role.clone();
        }
        if let Some(name) = &self.name {
            config.name = name.clone();
        }
        config
    }
}

#[derive(Args)]
pub struct ServiceServeArgs {
    /// Master to register with: HOST:PORT, or several separated by commas
    /// (the framework follows the leader).
    #[arg(long, env = "CORRAL_MASTER")]
    master: String,
    /// Address to serve the service API and /metrics on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], corral_service::DEFAULT_PORT)),
          env = "CORRAL_SERVICE_LISTEN")]
    listen: SocketAddr,
    /// The service store lives here.
    #[arg(
        long,
        default_value = "/var/lib/corral/service",
        env = "CORRAL_SERVICE_WORK_DIR"
    )]
    work_dir: PathBuf,
    /// How long the master keeps the framework's instances while it is
    /// away (e.g. 1h, 7d) [default: 7d].
    #[arg(long, value_parser = parse_duration, env = "CORRAL_SERVICE_FAILOVER_TIMEOUT")]
    failover_timeout: Option<Duration>,
    /// Role the framework's share is accounted under [default: *].
    #[arg(long, env = "CORRAL_SERVICE_ROLE")]
    role: Option<String>,
    /// Framework name shown by the master [default: corral-service].
    #[arg(long, env = "CORRAL_SERVICE_NAME")]
    name: Option<String>,
}

impl ServiceServeArgs {
    fn config(&self) -> Result<ServiceConfig> {
        let mut config = ServiceConfig::new(self.master.clone(), self.work_dir.clone());
        if let Some(t) = self.failover_timeout {
            if t.is_zero() {
                bail!("--failover-timeout: must be > 0");
            }
            config.failover_timeout = t;
        }
        if let Some(role) = &self.role {
            if role.is_empty() {
                bail!("--role: must not be empty");
            }
            config.role = role.clone();
        }
        if let Some(name) = &self.name {
            if name.is_empty() {
                bail!("--name: must not be empty");
            }
            config.name = name.clone();
        }
        Ok(config)
    }
}

#[derive(Args)]
pub struct DevArgs {
    /// Port of the master (gRPC, /metrics, /state) on 127.0.0.1.
    #[arg(long, default_value_t = 5050)]
    master_port: u16,
    /// Port of the agent on 127.0.0.1.
    #[arg(long, default_value_t = 5051)]
    agent_port: u16,
    /// Port of the batch framework's API on 127.0.0.1.
    #[arg(long, default_value_t = corral_batch::DEFAULT_PORT)]
    batch_port: u16,
    /// Port of the service framework's API on 127.0.0.1.
    #[arg(long, default_value_t = corral_service::DEFAULT_PORT)]
    service_port: u16,
    /// Sandboxes and state of the dev cluster.
    #[arg(long, env = "CORRAL_WORK_DIR")]
    work_dir: Option<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    tuning: MasterTuning,
}

/// Parses `500ms`, `2s`, `1.5m`, `1h`, `1d`, or a bare number of seconds:
/// the same durations job files take.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    corral_batch::spec::parse_duration(text)
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: cannot listen on {addr}"))
}

pub async fn master(args: MasterArgs) -> Result<()> {
    let mut config = args.tuning.apply(MasterConfig::default(), &args.work_dir)?;
    config.advertise_address = Some(match &args.advertise {
        Some(a) => a.clone(),
        None if args.listen.ip().is_unspecified() => {
            let host = hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".to_string());
            format!("{host}:{}", args.listen.port())
        }
        None => args.listen.to_string(),
    });
    let listener = bind(args.listen, "master").await?;
    tracing::info!(address = %args.listen, "master listening");
    corral_master::run(config, listener, crate::shutdown_signal()).await?;
    Ok(())
}

pub async fn agent(args: AgentArgs) -> Result<()> {
    let mut config = args
        .node
        .agent_config(args.master.clone(), args.work_dir.clone())?;
    config.advertise_address = Some(match &args.advertise {
        Some(a) => a.clone(),
        None if args.listen.ip().is_unspecified() => {
            format!("{}:{}", config.hostname, args.listen.port())
        }
        None => args.listen.to_string(),
    });
    let listener = bind(args.listen, "agent").await?;
    tracing::info!(address = %args.listen, master = %args.master, "agent listening");
    corral_agent::run(config, listener, crate::shutdown_signal()).await?;
    Ok(())
}

pub async fn batch(args: BatchServeArgs) -> Result<()> {
    let config = args.config();
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("cannot create {}", config.work_dir.display()))?;
    let listener = bind(args.listen, "batch framework").await?;
    tracing::info!(address = %args.listen, master = %args.master, "batch framework listening");
    corral_batch::run(config, listener, crate::shutdown_signal()).await?;
    Ok(())
}

pub async fn service(args: ServiceServeArgs) -> Result<()> {
    let config = args.config()?;
    std::fs::create_dir_all(&config.work_dir)
        .with_context(|| format!("cannot create {}", config.work_dir.display()))?;
    let listener = bind(args.listen, "service framework").await?;
    tracing::info!(address = %args.listen, master = %args.master, "service framework listening");
    corral_service::run(config, listener, crate::shutdown_signal()).await?;
    Ok(())
}

pub async fn dev(args: DevArgs) -> Result<()> {
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("corral-dev"));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    let master_addr = SocketAddr::from(([127, 0, 0, 1], args.master_port));
    let agent_addr = SocketAddr::from(([127, 0, 0, 1], args.agent_port));
    let batch_addr = SocketAddr::from(([127, 0, 0, 1], args.batch_port));
    let service_addr = SocketAddr::from(([127, 0, 0, 1], args.service_port));
    let config = args
        .tuning
        .apply(MasterConfig::dev(), &work_dir.join("master"))?;
    let master_listener = bind(master_addr, "master").await?;
    let agent_listener = bind(agent_addr, "agent").await?;
    let batch_listener = bind(batch_addr, "batch framework").await?;
    let service_listener = bind(service_addr, "service framework").await?;
    let batch_config = BatchConfig::new(master_addr.to_string(), work_dir.join("batch"));
    std::fs::create_dir_all(&batch_config.work_dir)
        .with_context(|| format!("cannot create {}", batch_config.work_dir.display()))?;
    let service_config = ServiceConfig::new(master_addr.to_string(), work_dir.join("service"));
    std::fs::create_dir_all(&service_config.work_dir)
        .with_context(|| format!("cannot create {}", service_config.work_dir.display()))?;
    let mut agent_config = args
        .node
        .agent_config(master_addr.to_string(), work_dir.join("agent"))?;
    agent_config.advertise_address = Some(agent_addr.to_string());

    // One signal stops them all.
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let master = tokio::spawn(corral_master::run(
        config,
        master_listener,
        wait(stop_rx.clone()),
    ));
    let mut agent = tokio::spawn(corral_agent::run(
        agent_config,
        agent_listener,
        wait(stop_rx.clone()),
    ));
    // After the master, which it registers with (its driver retries until
    // the master answers).
    let mut batch = tokio::spawn(corral_batch::run(
        batch_config,
        batch_listener,
        wait(stop_rx.clone()),
    ));
    let mut services = tokio::spawn(corral_service::run(
        service_config,
        service_listener,
        wait(stop_rx),
    ));
    eprintln!(
        "corral dev: master on http://{master_addr} (see /state, /metrics), agent on {agent_addr}, \
         batch framework on {batch_addr}, service framework on {service_addr}, work dir {}",
        work_dir.display()
    );
    eprintln!(
        "corral dev: try `corral run -- echo hello` or `corral batch submit --count 3 -- sh -c 'echo $CORRAL_TASK_INDEX'` \
         or `corral service apply -f web.toml`; \
         Ctrl-C stops the cluster"
    );
    tokio::select! {
        _ = crate::shutdown_signal() => {}
        r = &mut agent => {
            let _ = stop_tx.send(true);
            r.context("agent task panicked")??;
            bail!("the agent stopped unexpectedly");
        }
        r = &mut batch => {
            let _ = stop_tx.send(true);
            r.context("batch framework task panicked")??;
            bail!("the batch framework stopped unexpectedly");
        }
        r = &mut services => {
            let _ = stop_tx.send(true);
            r.context("service framework task panicked")??;
            bail!("the service framework stopped unexpectedly");
        }
    }
    let _ = stop_tx.send(true);
    agent.await.context("agent task panicked")??;
    batch.await.context("batch framework task panicked")??;
    services
        .await
        .context("service framework task panicked")??;
    master.await.context("master task panicked")??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("10M"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("512k"), Ok(512 * 1024));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("0").is_err());
        assert!(parse_size("ten").is_err());
    }

    #[derive(clap::Parser)]
    struct NodeCli {
        #[command(flatten)]
        node: NodeArgs,
    }

    fn node_config(args: &[&str]) -> Result<AgentConfig> {
        use clap::Parser;
        let cli = NodeCli::try_parse_from(std::iter::once("corral").chain(args.iter().copied()))?;
        cli.node
            .agent_config("127.0.0.1:5050".into(), "/var/lib/corral/agent".into())
    }

    #[test]
    fn pod_network_flags_default_and_errors_name_the_flag() {
        let config = node_config(&[]).unwrap();
        assert_eq!(config.pod_cidr.to_string(), "10.88.0.0/16");
        assert_eq!(config.pod_bridge, "corral0");
        let config =
            node_config(&["--pod-cidr", "172.30.0.0/24", "--pod-bridge", "pods0"]).unwrap();
        assert_eq!(config.pod_cidr.to_string(), "172.30.0.0/24");
        assert_eq!(config.pod_bridge, "pods0");
        for (args, flag) in [
            (["--pod-cidr", "fd00::/64"], "--pod-cidr: "),
            (["--pod-cidr", "10.88.0.0/31"], "--pod-cidr: "),
            (["--pod-cidr", "10.88.0.0"], "--pod-cidr: "),
            (["--pod-bridge", "a-bridge-name-too-long"], "--pod-bridge: "),
            (["--pod-bridge", "br/0"], "--pod-bridge: "),
        ] {
            let err = node_config(&args).unwrap_err().to_string();
            assert!(err.starts_with(flag), "{args:?}: {err}");
        }
    }

    #[test]
    fn strict_recovery_is_the_default_and_can_be_turned_off() {
        assert!(node_config(&[]).unwrap().strict);
        assert!(!node_config(&["--strict=false"]).unwrap().strict);
        assert!(node_config(&["--strict", "true"]).unwrap().strict);
        assert!(node_config(&["--strict=maybe"]).is_err());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("2 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
