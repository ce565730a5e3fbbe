//! The agent's content-addressed image store, `<work-dir>/images`: import
//! (`docker save` and OCI layout archives), pull (OCI Distribution
//! registries), resolve to bottom-first layer dirs for overlayfs, list,
//! remove and garbage-collect. Internal; public for tests and the lead's
//! wiring.
//!
//! Modules:
//! - `store`: [`ImageStore`], the on-disk layout, commits, remove, gc and
//!   crash recovery (the layout is documented there);
//! - `import`: [`ImageStore::import`];
//! - `pull`: [`ImageStore::pull`] with oci-client, de-duplicated;
//! - `archive`: reading `docker save` / OCI layout archives;
//! - `extract`: safe extraction of untrusted layers and whiteout
//!   conversion (the rules are documented there);
//! - `spec`: the OCI/Docker JSON shapes the store reads;
//! - `reference`: Docker-style reference normalization;
//! - `api`: the `Images` gRPC service, [`ImagesApi`];
//! - `error`: [`ImageError`].

mod api;
mod archive;
mod error;
mod extract;
mod import;
mod pull;
mod reference;
mod spec;
mod store;

use std::path::PathBuf;

use corral_proto::pb;
use serde::{Deserialize, Serialize};

pub use api::{DEFAULT_MAX_IMPORT_BYTES, ImagesApi, InUseFn};
pub use error::ImageError;
pub use extract::OPAQUE_XATTR;
pub use store::ImageStore;

/// What a container needs from an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Config digest, `sha256:…`: the image's identity.
    pub id: String,
    /// Extracted layer dirs, BOTTOM first (overlayfs wants `lowerdir`
    /// top first: reverse). A layer repeated in the image appears once, at
    /// its topmost position.
    pub layers: Vec<PathBuf>,
    /// The layers' diff_ids, same order: what `in_use` sets contain.
    pub layer_ids: Vec<String>,
    pub config: ImageConfig,
}

/// The runtime part of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE`.
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// One image as listed; mirrors `pb::ImageSummary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// Config digest.
    pub id: String,
    /// Canonical references (`docker.io/library/busybox:latest`), sorted.
    pub references: Vec<String>,
    /// Manifest digest, when known (pulled images, OCI layout imports).
    pub digest: Option<String>,
    /// Extracted size of its distinct layers plus its config.
    pub size_bytes: u64,
    /// Layer count as in the image config.
    pub layers: u32,
    /// The config's `created`, RFC 3339, or empty.
    pub created: String,
}

impl From<ImageSummary> for pb::ImageSummary {
    fn from(s: ImageSummary) -> Self {
        pb::ImageSummary {
            id: s.id,
            references: s.references,
            digest: s.digest.unwrap_or_default(),
            size_bytes: s.size_bytes,
            layers: s.layers,
            created: s.created,
        }
    }
}

/// What a remove or gc freed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoveReport {
    pub layers_removed: u32,
    /// Extracted bytes of the removed layers plus removed configs.
    pub bytes_freed: u64,
}

impl From<RemoveReport> for pb::RemoveImageResponse {
    fn from(r: RemoveReport) -> Self {
        pb::RemoveImageResponse {
            layers_removed: r.layers_removed,
            bytes_freed: r.bytes_freed,
        }
    }
}

/// Registry traffic since the store was opened (tests, metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Pulls that went to a registry (joined duplicates not counted).
    pub pulls_started: u64,
    pub manifests_fetched: u64,
    /// Config and layer blobs downloaded.
    pub blobs_fetched: u64,
    pub bytes_fetched: u64,
}
