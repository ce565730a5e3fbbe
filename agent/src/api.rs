//! The agent's own API, gRPC and HTTP/1.1 on one port: the `Agent` gRPC
//! service (`ReadFile`), `GET /metrics` (Prometheus text) and `GET /state`
//! (JSON). Handlers validate, ask the actor, and map errors to
//! `tonic::Status` / HTTP status in [`ApiError`]'s conversions only.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use corral_proto::pb::{self, agent_server::AgentServer};
use corral_proto::{FrameworkId, TaskId};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::{Request, Response as GrpcResponse, Status};
use tracing::debug;

use crate::actor::{Command, FileTarget};
use crate::task::{SANDBOX_FILES, sandbox_path};

/// Largest chunk of a `ReadFile` stream (the contract's 64 KiB).
pub(crate) const MAX_CHUNK: usize = 64 * 1024;

/// How often a followed file is checked for new data. Log files have no
/// portable change notification that also covers NFS-like work dirs; Mesos'
/// `/files/read` is polled the same way by its clients.
const FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Chunks buffered per `ReadFile` stream before the reader waits.
const READ_FILE_BUFFER: usize = 4;

/// Why an API call failed; mapped to a status in one place each.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent is shutting down")]
    Unavailable,
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match &e {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            ApiError::NotFound(m) => Status::not_found(m.clone()),
            ApiError::PermissionDenied(m) => Status::permission_denied(m.clone()),
            ApiError::Io { .. } => Status::internal(e.to_string()),
            ApiError::Unavailable => Status::unavailable(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self {
            ApiError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            ApiError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        };
        (code, self.to_string()).into_response()
    }
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) cmd_tx: mpsc::Sender<Command>,
    pub(crate) work_dir: PathBuf,
    pub(crate) metrics: PrometheusHandle,
    /// Latest container usage, written by the actor.
    pub(crate) usage:
        std::sync::Arc<dashmap::DashMap<crate::actor::StreamKey, crate::containerizer::Usage>>,
}

impl Api {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.cmd_tx
            .send(make(tx))
            .await
            .map_err(|_| ApiError::Unavailable)?;
        rx.await.map_err(|_| ApiError::Unavailable)
    }
}

/// The gRPC services and the HTTP routes on one router.
pub(crate) fn routes(api: Api, images: crate::images::ImagesApi) -> Routes {
    let grpc = Routes::new(AgentServer::new(api.clone()))
        .add_service(images.into_server())
        .into_axum_router();
    let http = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/state", get(state))
        .with_state(api);
    Routes::from(grpc.merge(http).fallback(not_found))
}

/// gRPC callers of an unknown method get `UNIMPLEMENTED` (tonic's own
/// fallback); plain HTTP callers get a 404 instead of a gRPC-shaped 200.
async fn not_found(request: axum::extract::Request) -> Response {
    let is_grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        Status::unimplemented(format!("no method {}", request.uri().path()))
            .into_http::<axum::body::Body>()
    } else {
        (StatusCode::NOT_FOUND, "not found\n").into_response()
    }
}

async fn metrics(State(api): State<Api>) -> Response {
    let mut text = api.metrics.render();
    let usage: Vec<_> = api
        .usage
        .iter()
        .map(|e| (e.key().clone(), *e.value()))
        .collect();
    text.push_str(&crate::metrics::render_container_usage(&usage));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn state(State(api): State<Api>) -> Response {
    match api.ask(|reply| Command::State { reply }).await {
        Ok(view) => axum::Json(view).into_response(),
        Err(e) => e.into_response(),
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for Api {
    type ReadFileStream = ReceiverStream<Result<pb::FileChunk, Status>>;

    async fn read_file(
        &self,
        request: Request<pb::ReadFileRequest>,
    ) -> Result<GrpcResponse<Self::ReadFileStream>, Status> {
        let req = request.into_inner();
        let framework_id = FrameworkId::parse(&req.framework_id, "framework_id")
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let task_id = TaskId::parse(&req.task_id, "task_id")
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if !SANDBOX_FILES.contains(&req.file.as_str()) {
            return Err(ApiError::InvalidArgument(format!(
                "file: '{}' is not one of stdout, stderr",
                req.file
            ))
            .into());
        }
        let target = self
            .ask(|reply| Command::FileTarget {
                framework_id: framework_id.clone(),
                task_id: task_id.clone(),
                reply,
            })
            .await?;
        // A task the agent forgot (terminal and acknowledged) keeps its
        // sandbox on disk; its files are complete.
        let (sandbox, done) = match target {
            Some(FileTarget { sandbox, done }) => (sandbox, done),
            None => {
                let sandbox = sandbox_path(&self.work_dir, &framework_id, &task_id);
                let is_dir = tokio::fs::metadata(&sandbox)
                    .await
                    .is_ok_and(|m| m.is_dir());
                if !is_dir {
                    return Err(ApiError::NotFound(format!(
                        "task {task_id} of framework {framework_id} is unknown to this agent"
                    ))
                    .into());
                }
                (sandbox, watch::channel(true).1)
            }
        };
        let path = sandbox.join(&req.file);
        // O_NOFOLLOW: a task that replaces its `stdout` with a symlink must
        // not get the agent to serve whatever the link points at.
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .await;
        let file = file.map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ApiError::NotFound(format!("{} does not exist", path.display()))
            } else if source.raw_os_error() == Some(libc::ELOOP) {
                ApiError::PermissionDenied(format!("{} is a symlink; not served", path.display()))
            } else {
                ApiError::Io {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        let (tx, rx) = mpsc::channel(READ_FILE_BUFFER);
        tokio::spawn(stream_file(file, path, req.offset, req.follow, done, tx));
        Ok(GrpcResponse::new(ReceiverStream::new(rx)))
    }
}

/// Sends the file from `offset` in chunks of at most [`MAX_CHUNK`]. With
/// `follow`, waits for more until the task is terminal, then drains the
/// file and ends. Stops as soon as the client goes away.
async fn stream_file(
    mut file: tokio::fs::File,
    path: PathBuf,
    mut offset: u64,
    follow: bool,
    mut done: watch::Receiver<bool>,
    tx: mpsc::Sender<Result<pb::FileChunk, Status>>,
) {
    if let Err(source) = file.seek(SeekFrom::Start(offset)).await {
        let _ = tx.send(Err(io_status(&path, source))).await;
        return;
    }
    let mut buf = vec![0u8; MAX_CHUNK];
    // The actor dropped the flag's sender: the task is gone, nothing more comes.
    let mut flag_gone = false;
    loop {
        // Read the terminal flag before draining: whatever the task wrote
        // before it ended is then certainly read by the drain below.
        let finished = !follow || flag_gone || *done.borrow_and_update();
        if !drain(&mut file, &path, &mut offset, &mut buf, &tx).await {
            return;
        }
        // The log was rotated (`stdout` → `stdout.1`): the old file is
        // drained, go on with the new one from its start.
        if follow && let Some(new) = rotated(&file, &path).await {
            // What was written before the rename is still in the old file.
            if !drain(&mut file, &path, &mut offset, &mut buf, &tx).await {
                return;
            }
            file = new;
            offset = 0;
            continue;
        }
        if finished {
            return;
        }
        tokio::select! {
            changed = done.changed() => flag_gone = changed.is_err(),
            () = tokio::time::sleep(FOLLOW_POLL_INTERVAL) => {}
            () = tx.closed() => return,
        }
    }
}

/// Sends `file` from where it is to its end; false when the stream is over
/// (client gone, or a read error was sent).
async fn drain(
    file: &mut tokio::fs::File,
    path: &Path,
    offset: &mut u64,
    buf: &mut [u8],
    tx: &mpsc::Sender<Result<pb::FileChunk, Status>>,
) -> bool {
    loop {
        let n = match file.read(buf).await {
            Ok(0) => return true,
            Ok(n) => n,
            Err(source) => {
                let _ = tx.send(Err(io_status(path, source))).await;
                return false;
            }
        };
        let chunk = pb::FileChunk {
            offset: *offset,
            data: buf[..n].to_vec(),
        };
        *offset += n as u64;
        if tx.send(Ok(chunk)).await.is_err() {
            debug!(path = %path.display(), "ReadFile client went away");
            return false;
        }
    }
}

/// The file now at `path`, when it is no longer the one `file` reads.
async fn rotated(file: &tokio::fs::File, path: &Path) -> Option<tokio::fs::File> {
    use std::os::unix::fs::MetadataExt;
    let current = file.metadata().await.ok()?.ino();
    let at_path = tokio::fs::symlink_metadata(path).await.ok()?;
    if at_path.ino() == current || !at_path.is_file() {
        return None;
    }
    tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .await
        .ok()
}

fn io_status(path: &Path, source: std::io::Error) -> Status {
    ApiError::Io {
        path: path.to_path_buf(),
        source,
    }
    .into()
}
