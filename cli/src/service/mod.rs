//! `corral service`: the service framework as its own process (`serve`) and
//! the client commands that talk to its gRPC API (`corral.v1.Services`):
//! `apply`, `list`, `status`, `scale`, `restart`, `delete`.
//!
//! Modules:
//! - `show`: the `list` table and the `status` report (pure renderers).
//!
//! Files are sent as text and parsed by the framework, so every client gets
//! the same rules and the same error messages (naming the field). Every
//! command prints its errors as `corral service CMD: MESSAGE`; [`CallError`]
//! (shared with `corral batch`) is the one place where a gRPC status
//! becomes that message.

mod show;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use corral_proto::pb;
use corral_proto::pb::apply_service_request::Source;
use corral_proto::pb::services_client::ServicesClient;
use tonic::transport::Channel;

use crate::LogFormat;
use crate::framework_client::{self, Api, CallError};

/// Where the client commands look for the service API by default: the port
/// of `corral service serve` and `corral dev` on this host.
pub const DEFAULT_SERVICE: &str = "127.0.0.1:5070";
const API: Api = Api {
    name: "service",
    flag: "--service",
    env: "CORRAL_SERVICE",
    others: "a master, an agent or the batch framework",
};
/// The status of a 10 000-instance service is larger than gRPC's default
/// 4 MiB.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Largest service file read: the framework refuses larger manifests
/// anyway, and a mistaken `-f /dev/zero` must not eat memory.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Args)]
pub struct ServiceArgs {
    #[command(subcommand)]
    command: ServiceCommand,
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Run the service framework: it registers with the master, keeps the
    /// applied services running and serves the service API.
    Serve(crate::serve::ServiceServeArgs),
    /// Create or update a service from a TOML service file or a Kubernetes
    /// Pod manifest (YAML, `kind: Pod`).
    Apply(ApplyArgs),
    /// List the services: instances running/healthy/wanted, version,
    /// deployment state.
    List(Target),
    /// Show a service: its instances, health, pod IPs and deployment
    /// progress.
    Status(NameArgs),
    /// Set the number of instances.
    Scale(ScaleArgs),
    /// Replace every instance, a few at a time (the update strategy's
    /// limits), with the same spec.
    Restart(NameArgs),
    /// Kill every instance and forget the service.
    Delete(NameArgs),
}

impl ServiceCommand {
    fn name(&self) -> &'static str {
        match self {
            Self::Serve(_) => "serve",
            Self::Apply(_) => "apply",
            Self::List(_) => "list",
            Self::Status(_) => "status",
            Self::Scale(_) => "scale",
            Self::Restart(_) => "restart",
            Self::Delete(_) => "delete",
        }
    }
}

/// The service framework to talk to.
#[derive(Args, Clone)]
pub(crate) struct Target {
    /// Address of the service framework's API (`corral service serve` or
    /// `corral dev`).
    #[arg(long = "service", value_name = "ADDR", default_value = DEFAULT_SERVICE, env = "CORRAL_SERVICE")]
    addr: String,
}

#[derive(Args)]
pub(crate) struct ApplyArgs {
    /// The service file: TOML, or a Kubernetes Pod manifest (`.yaml`/`.yml`,
    /// or any file with `apiVersion:` and `kind:` at the top level); `-`
    /// reads stdin.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
pub(crate) struct NameArgs {
    /// Service name.
    name: String,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
pub(crate) struct ScaleArgs {
    /// Service name.
    name: String,
    /// Wanted instances.
    instances: u32,
    #[command(flatten)]
    target: Target,
}

/// Runs one `corral service` command and prints its error, if any, as
/// `corral service CMD: MESSAGE`.
pub async fn service(args: ServiceArgs, log_format: LogFormat) -> ExitCode {
    let name = args.command.name();
    let result = match args.command {
        ServiceCommand::Serve(args) => {
            crate::init_logging(log_format, "info");
            crate::serve::service(args).await
        }
        ServiceCommand::Apply(args) => apply(args).await,
        ServiceCommand::List(target) => show::list(target).await,
        ServiceCommand::Status(args) => show::status(args).await,
        ServiceCommand::Scale(args) => scale(args).await,
        ServiceCommand::Restart(args) => restart(args).await,
        ServiceCommand::Delete(args) => delete(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("corral service {name}: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn read_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    let shown = path.display();
    if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .context("-f: cannot read stdin")?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("-f: cannot open {shown}"))?
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("-f: cannot read {shown} as UTF-8 text"))?;
    }
    if text.len() as u64 > MAX_FILE_BYTES {
        bail!("-f: {shown} is larger than {MAX_FILE_BYTES} bytes");
    }
    Ok(text)
}

/// TOML service file or Kubernetes manifest: by extension, else by content
/// (a manifest has top-level `apiVersion:` and `kind:`; neither is a key of
/// the service file, whose keys are snake_case).
fn source(path: &Path, text: String) -> Source {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let manifest = match ext.as_deref() {
        Some("yaml" | "yml") => true,
        Some("toml") => false,
        _ => {
            let top = |key: &str| text.lines().any(|l| l.starts_with(key));
            top("apiVersion:") && top("kind:")
        }
    };
    if manifest {
        Source::PodManifest(text)
    } else {
        Source::Toml(text)
    }
}

async fn apply(args: ApplyArgs) -> Result<()> {
    let text = read_file(&args.file)?;
    let mut client = Client::new(&args.target)?;
    let applied = client.apply(source(&args.file, text)).await?;
    use pb::apply_service_response::Outcome;
    let name = &applied.name;
    let version = applied.version;
    match applied.outcome() {
        Outcome::Created => println!("created service {name} (version {version})"),
        Outcome::Updated => println!("updated service {name}: rolling out version {version}"),
        Outcome::Scaled => println!("scaled service {name} to {} instances", applied.instances),
        Outcome::Unchanged | Outcome::Unspecified => {
            println!("service {name} unchanged (version {version})");
        }
    }
    Ok(())
}

async fn scale(args: ScaleArgs) -> Result<()> {
    let mut client = Client::new(&args.target)?;
    client.scale(&args.name, args.instances).await?;
    println!(
        "scaled service {} to {} instances",
        args.name, args.instances
    );
    Ok(())
}

async fn restart(args: NameArgs) -> Result<()> {
    let mut client = Client::new(&args.target)?;
    let version = client.restart(&args.name).await?;
    println!(
        "restarting service {}: rolling out version {version}",
        args.name
    );
    Ok(())
}

async fn delete(args: NameArgs) -> Result<()> {
    let mut client = Client::new(&args.target)?;
    client.delete(&args.name).await?;
    println!(
        "deleting service {}: its instances are being killed",
        args.name
    );
    Ok(())
}

/// The service API client. Connects on first use, so an unreachable
/// framework surfaces as an `Unavailable` [`CallError`] like any other
/// failed call.
pub(crate) struct Client {
    inner: ServicesClient<Channel>,
    addr: String,
}

impl Client {
    pub(crate) fn new(target: &Target) -> Result<Self> {
        let addr = target.addr.clone();
        let inner = ServicesClient::new(framework_client::channel(API, &addr)?)
            .max_decoding_message_size(MAX_MESSAGE);
        Ok(Self { inner, addr })
    }

    fn error(&self, status: tonic::Status) -> CallError {
        CallError::new(API, &self.addr, status)
    }

    async fn apply(&mut self, source: Source) -> Result<pb::ApplyServiceResponse, CallError> {
        let request = pb::ApplyServiceRequest {
            source: Some(source),
        };
        match self.inner.apply(request).await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => Err(self.error(status)),
        }
    }

    pub(crate) async fn list(&mut self) -> Result<Vec<pb::ServiceStatus>, CallError> {
        match self.inner.list(pb::ListServicesRequest {}).await {
            Ok(r) => Ok(r.into_inner().services),
            Err(status) => Err(self.error(status)),
        }
    }

    pub(crate) async fn get(&mut self, name: &str) -> Result<pb::ServiceStatus, CallError> {
        let request = pb::GetServiceRequest {
            name: name.to_string(),
        };
        match self.inner.get(request).await {
            Ok(r) => Ok(r.into_inner()),
            Err(status) => Err(self.error(status)),
        }
    }

    async fn scale(&mut self, name: &str, instances: u32) -> Result<(), CallError> {
        let request = pb::ScaleServiceRequest {
            name: name.to_string(),
            instances,
        };
        match self.inner.scale(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(self.error(status)),
        }
    }

    async fn restart(&mut self, name: &str) -> Result<u32, CallError> {
        let request = pb::RestartServiceRequest {
            name: name.to_string(),
        };
        match self.inner.restart(request).await {
            Ok(r) => Ok(r.into_inner().version),
            Err(status) => Err(self.error(status)),
        }
    }

    async fn delete(&mut self, name: &str) -> Result<(), CallError> {
        let request = pb::DeleteServiceRequest {
            name: name.to_string(),
        };
        match self.inner.delete(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(self.error(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(code: tonic::Code, text: &str) -> String {
        CallError::new(API, DEFAULT_SERVICE, tonic::Status::new(code, text)).to_string()
    }

    #[test]
    fn the_default_address_is_the_frameworks_default_port() {
        assert!(DEFAULT_SERVICE.ends_with(&format!(":{}", corral_service::DEFAULT_PORT)));
    }

    #[test]
    fn refusals_read_as_the_frameworks_own_message() {
        assert_eq!(
            message(
                tonic::Code::InvalidArgument,
                "service.task.cpus: must be finite and > 0"
            ),
            "service.task.cpus: must be finite and > 0"
        );
        assert_eq!(
            message(tonic::Code::NotFound, "no service named x"),
            "no service named x"
        );
    }

    #[test]
    fn an_unreachable_framework_says_where_it_was_looked_for() {
        let text = message(tonic::Code::Unavailable, "tcp connect error");
        assert!(text.contains("127.0.0.1:5070"), "{text}");
        assert!(text.contains("--service / CORRAL_SERVICE"), "{text}");
        let text = message(tonic::Code::Unimplemented, "");
        assert!(text.contains("or the batch framework"), "{text}");
    }

    #[test]
    fn manifests_are_told_from_service_files_by_extension_then_content() {
        let manifest = corral_service::k8s::QUICKSTART_MANIFEST.to_string();
        let toml = "name = \"web\"\ninstances = 1\n".to_string();
        let is_manifest = |path: &str, text: &str| {
            matches!(
                source(Path::new(path), text.to_string()),
                Source::PodManifest(_)
            )
        };
        assert!(is_manifest("pod.yaml", &toml));
        assert!(is_manifest("pod.YML", &toml));
        assert!(!is_manifest("web.toml", &manifest));
        assert!(is_manifest("-", &manifest));
        assert!(is_manifest("pod.txt", &manifest));
        assert!(!is_manifest("-", &toml));
    }
}
