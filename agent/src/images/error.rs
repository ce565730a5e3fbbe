//! [`ImageError`]: why an image store operation failed.
//!
//! `Clone` because concurrent pulls of one reference share one result
//! (see `pull.rs`); I/O errors are kept behind an `Arc` for that.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why an image store operation failed. Mapped to a `tonic::Status` in
/// exactly one place (`api.rs`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ImageError {
    /// A reference or name that does not parse, or is ambiguous.
    #[error("invalid {field} '{value}': {reason}")]
    InvalidReference {
        /// The request field it came from (`reference`, `name`).
        field: &'static str,
        value: String,
        reason: String,
    },
    /// No image in the store (or in the registry) answers to the reference.
    #[error("image '{0}' not found")]
    NotFound(String),
    /// An import archive that is not a `docker save` or OCI layout archive,
    /// or whose metadata is inconsistent.
    #[error("invalid image archive: {0}")]
    BadArchive(String),
    /// A layer entry that extraction refuses (path escapes, symlinked
    /// parents, devices, ...). Nothing of the import or pull is kept.
    #[error("layer {layer}: entry '{entry}' refused: {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },
    /// A layer that is not a valid tar stream.
    #[error("layer {layer}: {reason}")]
    BadLayer { layer: String, reason: String },
    /// Content whose digest is not the one it was announced with.
    #[error("{what} {expected}: digest mismatch, the content hashes to {actual}")]
    DigestMismatch {
        what: &'static str,
        expected: String,
        actual: String,
    },
    /// Valid content the store cannot use (zstd layers, foreign layers,
    /// other operating systems, unknown media types).
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// The registry could not be reached (connection, TLS, timeouts).
    #[error("cannot reach registry {registry} over {scheme}: {reason}")]
    Unreachable {
        registry: String,
        scheme: &'static str,
        reason: String,
    },
    /// The registry refused the (missing or wrong) credentials.
    #[error("registry {registry} refused access: {reason}")]
    Unauthorized { registry: String, reason: String },
    /// Any other registry protocol error.
    #[error("registry {registry}: {reason}")]
    Registry { registry: String, reason: String },
    /// An import archive larger than the configured limit.
    #[error("image archive exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    /// Another `ImageStore` holds the store's lock file.
    #[error("image store {} is in use by another image store", path.display())]
    Locked { path: PathBuf },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// A bug or a lost task (a panicked extraction thread, ...).
    #[error("image store internal error: {0}")]
    Internal(String),
}

impl ImageError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            op,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }
}

/// `.map_err(io_err("read", &path))`.
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |e| ImageError::io(op, path, e)
}
