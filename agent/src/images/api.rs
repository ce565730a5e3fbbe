//! The `Images` gRPC service over an [`ImageStore`]. Handlers validate,
//! run the store's blocking work on `spawn_blocking`, and map
//! [`ImageError`] to `tonic::Status` in one place (`From` below).

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use corral_proto::pb::{self, images_server::ImagesServer};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use super::reference::ImageRef;
use super::{ImageError, ImageStore};

/// Default cap on one `ImportImage` upload: large ML/CUDA images are a few
/// GiB; more than this is more likely a mistake than an image.
pub const DEFAULT_MAX_IMPORT_BYTES: u64 = 16 * 1024 * 1024 * 1024;

/// The layers running containers use (diff_ids or layer dir paths, see
/// [`ImageStore::remove`]); asked on every remove.
pub type InUseFn = Arc<dyn Fn() -> HashSet<String> + Send + Sync>;

/// The `Images` service. Mount with [`ImagesApi::into_server`].
#[derive(Clone)]
pub struct ImagesApi {
    store: Arc<ImageStore>,
    in_use: InUseFn,
    max_import_bytes: u64,
}

impl ImagesApi {
    pub fn new(store: Arc<ImageStore>, in_use: InUseFn) -> Self {
        ImagesApi {
            store,
            in_use,
            max_import_bytes: DEFAULT_MAX_IMPORT_BYTES,
        }
    }

    /// Caps the size of one imported archive (as uploaded).
    pub fn with_max_import_bytes(mut self, limit: u64) -> Self {
        self.max_import_bytes = limit;
        self
    }

    pub fn into_server(self) -> ImagesServer<Self> {
        ImagesServer::new(self)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ImageStore) -> Result<T, ImageError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Status::internal(format!("image store task failed: {e}")))?
            .map_err(Status::from)
    }
}

/// The single mapping from store errors to gRPC statuses.
impl From<ImageError> for Status {
    fn from(e: ImageError) -> Self {
        let msg = e.to_string();
        match e {
            ImageError::InvalidReference { .. }
            | ImageError::BadArchive(_)
            | ImageError::BadLayer { .. } => Status::invalid_argument(msg),
            ImageError::NotFound(_) => Status::not_found(msg),
            ImageError::UnsafeEntry { .. }
            | ImageError::DigestMismatch { .. }
            | ImageError::Unsupported(_) => Status::failed_precondition(msg),
            ImageError::Unreachable { .. } | ImageError::Registry { .. } => {
                Status::unavailable(msg)
            }
            ImageError::Unauthorized { .. } => Status::unauthenticated(msg),
            ImageError::TooLarge { .. } => Status::resource_exhausted(msg),
            ImageError::Locked { .. } | ImageError::Io { .. } | ImageError::Internal(_) => {
                Status::internal(msg)
            }
        }
    }
}

/// Deletes an upload's temp file however the handler ends.
struct Upload(PathBuf);

impl Drop for Upload {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(path = %self.0.display(), error = %e, "cannot remove image upload");
        }
    }
}

#[tonic::async_trait]
impl pb::images_server::Images for ImagesApi {
    async fn import_image(
        &self,
        request: Request<Streaming<pb::ImageChunk>>,
    ) -> Result<Response<pb::ImportImageResponse>, Status> {
        let mut stream = request.into_inner();
        let upload = Upload(self.store.inner.tmp_path("upload"));
        let mut file = tokio::fs::File::create(&upload.0)
            .await
            .map_err(|e| Status::from(ImageError::io("create", &upload.0, e)))?;
        let mut name = String::new();
        let mut total: u64 = 0;
        let mut first = true;
        while let Some(chunk) = stream.message().await? {
            if first {
                if !chunk.name.is_empty() {
                    // Fail before the upload rather than after it.
                    ImageRef::parse(&chunk.name, "name")?;
                }
                name = chunk.name;
                first = false;
            } else if !chunk.name.is_empty() {
                return Err(Status::invalid_argument(
                    "name: only the first ImageChunk may carry a name",
                ));
            }
            total += chunk.data.len() as u64;
            if total > self.max_import_bytes {
                return Err(ImageError::TooLarge {
                    limit: self.max_import_bytes,
                }
                .into());
            }
            file.write_all(&chunk.data)
                .await
                .map_err(|e| Status::from(ImageError::io("write", &upload.0, e)))?;
        }
        file.flush()
            .await
            .map_err(|e| Status::from(ImageError::io("write", &upload.0, e)))?;
        drop(file);
        if total == 0 {
            return Err(Status::invalid_argument("data: the image archive is empty"));
        }
        info!(bytes = total, name = %name, "image archive received");
        let images = self
            .blocking(move |store| {
                let upload = upload;
                store.import(&upload.0, Some(name.as_str()).filter(|n| !n.is_empty()))
            })
            .await?;
        Ok(Response::new(pb::ImportImageResponse {
            images: images.into_iter().map(Into::into).collect(),
        }))
    }

    async fn pull_image(
        &self,
        request: Request<pb::PullImageRequest>,
    ) -> Result<Response<pb::ImageSummary>, Status> {
        let req = request.into_inner();
        if req.reference.is_empty() {
            return Err(Status::invalid_argument("reference: must not be empty"));
        }
        if req.username.is_empty() && !req.password.is_empty() {
            return Err(Status::invalid_argument(
                "username: required when a password is given",
            ));
        }
        let auth = (!req.username.is_empty()).then_some((req.username, req.password));
        let summary = self.store.pull(&req.reference, auth).await?;
        Ok(Response::new(summary.into()))
    }

    async fn list_images(
        &self,
        _request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let images = self.blocking(|store| store.list()).await?;
        Ok(Response::new(pb::ListImagesResponse {
            images: images.into_iter().map(Into::into).collect(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        let reference = request.into_inner().reference;
        if reference.is_empty() {
            return Err(Status::invalid_argument("reference: must not be empty"));
        }
        let in_use = (self.in_use)();
        let report = self
            .blocking(move |store| store.remove(&reference, &in_use))
            .await?;
        Ok(Response::new(report.into()))
    }
}
