//! `ImageStore::pull`: fetch an image from an OCI Distribution registry
//! with `oci-client`.
//!
//! - https by default; plain http only for `insecure_registries`
//!   (`host:port`, exactly as in the reference), like Docker's
//!   `--insecure-registry`;
//! - anonymous or basic auth (oci-client also follows bearer-token
//!   challenges with those credentials, as Docker Hub needs). A fresh
//!   client per pull: oci-client caches the first credentials it sees per
//!   registry, which must not leak from one caller into another's pull;
//! - an index / manifest list is resolved to linux/amd64;
//! - every blob is verified: the config and each compressed layer against
//!   its descriptor digest (and size) while downloading, each layer's
//!   uncompressed stream against the config's diff_id while extracting;
//! - layers the store has are not downloaded; an image the store has only
//!   gains the reference;
//! - concurrent pulls of one reference (with the same credentials) share
//!   one download: the first caller spawns the pull as a task and leaves a
//!   shared handle to its result in `Inflight`; later callers await that
//!   handle. The task runs to completion even if its callers go away, so a
//!   retry finds the layers in the store.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::{BoxFuture, FutureExt, Shared};
use oci_client::Client;
use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info};

use super::error::io_err;
use super::import::{stage_layer, sync_fs};
use super::reference::{ImageRef, is_sha256_digest};
use super::spec::{self, Descriptor, MAX_METADATA_BYTES};
use super::store::{ImageStore, Inner, StagedImage};
use super::{ImageError, ImageSummary, PullStats};

/// Connecting to a registry (TCP + TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest silence while reading a response; large layers may take long in
/// total, so there is no overall deadline.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

type SharedPull = Shared<BoxFuture<'static, Result<ImageSummary, ImageError>>>;

/// Pulls in progress, by reference and credentials.
#[derive(Default)]
pub(super) struct Inflight(Mutex<HashMap<String, SharedPull>>);

impl Inflight {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, SharedPull>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Takes a finished pull out of `Inflight`.
struct Leave {
    inner: Arc<Inner>,
    key: String,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.inner.inflight.map().remove(&self.key);
    }
}

/// Registry traffic since the store was opened.
#[derive(Default)]
pub(super) struct PullCounters {
    pulls: AtomicU64,
    manifests: AtomicU64,
    blobs: AtomicU64,
    bytes: AtomicU64,
}

impl PullCounters {
    pub fn snapshot(&self) -> PullStats {
        PullStats {
            pulls_started: self.pulls.load(Ordering::Relaxed),
            manifests_fetched: self.manifests.load(Ordering::Relaxed),
            blobs_fetched: self.blobs.load(Ordering::Relaxed),
            bytes_fetched: self.bytes.load(Ordering::Relaxed),
        }
    }
}

impl ImageStore {
    /// Pulls `reference` from its registry (see the module docs for the
    /// rules) and tags it with the canonical reference. `auth` is
    /// `(username, password)` for basic auth; `None` pulls anonymously.
    pub async fn pull(
        &self,
        reference: &str,
        auth: Option<(String, String)>,
    ) -> Result<ImageSummary, ImageError> {
        let r = ImageRef::parse(reference, "reference")?;
        let auth = auth.filter(|(u, _)| !u.is_empty());
        let key = {
            let mut k = r.canonical();
            if let Some((u, p)) = &auth {
                k.push_str(&format!("\n{u}\n{}", hex::encode(Sha256::digest(p))));
            }
            k
        };
        let shared = {
            let mut map = self.inner.inflight.map();
            match map.get(&key) {
                Some(f) => {
                    debug!(reference = %r.canonical(), "joining a pull in progress");
                    f.clone()
                }
                None => {
                    let inner = Arc::clone(&self.inner);
                    let k = key.clone();
                    // The map lock is held until the entry is in, so the
                    // task's removal below cannot run before the insert.
                    let task = tokio::spawn(async move {
                        // Removes the entry even if the pull panics, so a
                        // later pull starts afresh.
                        let _leave = Leave {
                            inner: Arc::clone(&inner),
                            key: k,
                        };
                        pull_once(&inner, &r, auth).await
                    });
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(ImageError::Internal(format!("pull task failed: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(key, f.clone());
                    f
                }
            }
        };
        shared.await
    }
}

/// Names the registry and scheme in errors.
struct Remote {
    registry: String,
    scheme: &'static str,
}

impl Remote {
    fn error(&self, e: OciDistributionError) -> ImageError {
        let registry = self.registry.clone();
        match e {
            OciDistributionError::RequestError(e) => self.unreachable(e.to_string_chain()),
            OciDistributionError::IoError(e) => self.io(e),
            OciDistributionError::AuthenticationFailure(reason) => {
                ImageError::Unauthorized { registry, reason }
            }
            OciDistributionError::UnauthorizedError { url } => ImageError::Unauthorized {
                registry,
                reason: format!("{url}: 401 Unauthorized (missing or wrong credentials)"),
            },
            OciDistributionError::RegistryError { envelope, url } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let reason = format!("{url}: {envelope}");
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    ImageError::NotFound(reason)
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    ImageError::Unauthorized { registry, reason }
                } else {
                    ImageError::Registry { registry, reason }
                }
            }
            OciDistributionError::ServerError { code: 404, url, .. } => {
                ImageError::NotFound(format!("{url}: 404"))
            }
            OciDistributionError::ImageManifestNotFoundError(m) => ImageError::NotFound(m),
            OciDistributionError::DigestError(DigestError::VerificationError {
                expected,
                actual,
            }) => ImageError::DigestMismatch {
                what: "manifest",
                expected,
                actual,
            },
            OciDistributionError::UnsupportedMediaTypeError(m)
            | OciDistributionError::IncompatibleLayerMediaTypeError(m) => {
                ImageError::Unsupported(format!("media type {m}"))
            }
            OciDistributionError::UnsupportedSchemaVersionError(v) => {
                ImageError::Unsupported(format!("manifest schema version {v}"))
            }
            other => ImageError::Registry {
                registry,
                reason: other.to_string(),
            },
        }
    }

    fn unreachable(&self, reason: String) -> ImageError {
        let hint = if self.scheme == "https" {
            "; if the registry only serves plain http, list it in the agent's insecure registries"
        } else {
            ""
        };
        ImageError::Unreachable {
            registry: self.registry.clone(),
            scheme: self.scheme,
            reason: format!("{reason}{hint}"),
        }
    }

    /// Stream errors: oci-client reports a digest mismatch as an io error.
    fn io(&self, e: std::io::Error) -> ImageError {
        if let Some(DigestError::VerificationError { expected, actual }) =
            e.get_ref().and_then(|i| i.downcast_ref::<DigestError>())
        {
            return ImageError::DigestMismatch {
                what: "blob",
                expected: expected.clone(),
                actual: actual.clone(),
            };
        }
        self.unreachable(e.to_string_chain())
    }
}

/// `Display` of an error and its sources (reqwest hides the cause).
trait ErrorChain {
    fn to_string_chain(&self) -> String;
}

impl<E: std::error::Error> ErrorChain for E {
    fn to_string_chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur = self.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }
}

async fn pull_once(
    inner: &Arc<Inner>,
    r: &ImageRef,
    auth: Option<(String, String)>,
) -> Result<ImageSummary, ImageError> {
    let canonical = r.canonical();
    let remote = Remote {
        registry: r.registry.clone(),
        scheme: if inner.insecure_registries.contains(&r.registry) {
            "http"
        } else {
            "https"
        },
    };
    let client = Client::try_from(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(inner.insecure_registries.clone()),
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        connect_timeout: Some(CONNECT_TIMEOUT),
        read_timeout: Some(READ_TIMEOUT),
        ..ClientConfig::default()
    })
    .map_err(|e| ImageError::Internal(format!("cannot build a registry client: {e}")))?;
    let oref: oci_client::Reference =
        canonical
            .parse()
            .map_err(|e: oci_client::ParseError| ImageError::InvalidReference {
                field: "reference",
                value: canonical.clone(),
                reason: e.to_string(),
            })?;
    let auth = match auth {
        Some((u, p)) => RegistryAuth::Basic(u, p),
        None => RegistryAuth::Anonymous,
    };
    inner.counters.pulls.fetch_add(1, Ordering::Relaxed);
    info!(reference = %canonical, scheme = remote.scheme, "pulling image");

    let (manifest, manifest_digest) = client
        .pull_image_manifest(&oref, &auth)
        .await
        .map_err(|e| remote.error(e))?;
    inner.counters.manifests.fetch_add(1, Ordering::Relaxed);
    let config_desc = descriptor(&manifest.config);
    spec::check_digest(&config_desc, "image config")?;
    let layer_descs: Vec<Descriptor> = manifest.layers.iter().map(descriptor).collect();
    for l in &layer_descs {
        spec::check_digest(l, "layer")?;
        spec::check_layer_media_type(l)?;
    }
    let id = config_desc.digest.clone();
    let digest = Some(manifest_digest).filter(|d| is_sha256_digest(d));

    // Already here (pulled under another name, or imported): tag only.
    if let Some(s) = add_references(inner, &id, &canonical, digest.clone()).await? {
        info!(reference = %canonical, image = %id, "image already present");
        return Ok(s);
    }

    let config_bytes = fetch_small(&client, &oref, &manifest.config, &remote).await?;
    inner.counters.blobs.fetch_add(1, Ordering::Relaxed);
    let config = spec::parse_config(&config_bytes, &id)?;
    if config.diff_ids.len() != layer_descs.len() {
        return Err(ImageError::Registry {
            registry: remote.registry.clone(),
            reason: format!(
                "manifest of {canonical} lists {} layers, its config {}",
                layer_descs.len(),
                config.diff_ids.len()
            ),
        });
    }

    let (_pins, present) = inner.pin_present(&config.diff_ids);
    let op = inner.op_dir("pull")?;
    let mut done: HashSet<String> = present;
    let mut staged = Vec::new();
    for ((desc, oci_desc), diff_id) in layer_descs
        .iter()
        .zip(&manifest.layers)
        .zip(&config.diff_ids)
    {
        if !done.insert(diff_id.clone()) {
            continue;
        }
        let n = staged.len();
        let blob = op.path.join(format!("blob-{n}"));
        download(inner, &client, &oref, oci_desc, desc, &blob, &remote).await?;
        let dest = op.path.join(format!("layer-{n}"));
        let (label, diff) = (desc.digest.clone(), diff_id.clone());
        let layer = blocking(move || {
            let f = std::fs::File::open(&blob).map_err(io_err("open", &blob))?;
            let staged = stage_layer(f, &dest, &label, &diff);
            // The compressed blob is only needed until it is extracted.
            let _ = std::fs::remove_file(&blob);
            staged
        })
        .await?;
        staged.push(layer);
    }
    let image = StagedImage {
        id: id.clone(),
        config_bytes,
        config: config.config,
        created: config.created,
        diff_ids: config.diff_ids,
        digest,
        references: vec![canonical.clone()],
    };
    let sync_path = op.path.clone();
    let inner2 = Arc::clone(inner);
    let mut summaries = blocking(move || {
        sync_fs(&sync_path)?;
        inner2.commit(vec![image], staged)
    })
    .await?;
    drop(op);
    info!(reference = %canonical, image = %id, "image pulled");
    summaries
        .pop()
        .ok_or_else(|| ImageError::Internal("commit returned no image".into()))
}

/// Tags an image the store already has in full; `None` if it has not.
async fn add_references(
    inner: &Arc<Inner>,
    id: &str,
    canonical: &str,
    digest: Option<String>,
) -> Result<Option<ImageSummary>, ImageError> {
    let inner = Arc::clone(inner);
    let (id, canonical) = (id.to_string(), canonical.to_string());
    blocking(move || inner.tag_existing(&id, &canonical, digest)).await
}

fn descriptor(d: &OciDescriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: None,
        platform: None,
    }
}

/// A small blob (the config) into memory, digest-checked by us too.
async fn fetch_small(
    client: &Client,
    oref: &oci_client::Reference,
    desc: &OciDescriptor,
    remote: &Remote,
) -> Result<Vec<u8>, ImageError> {
    if u64::try_from(desc.size).unwrap_or(0) > MAX_METADATA_BYTES {
        return Err(ImageError::Unsupported(format!(
            "config {} is larger than {MAX_METADATA_BYTES} bytes",
            desc.digest
        )));
    }
    let mut stream = client
        .pull_blob_stream(oref, desc)
        .await
        .map_err(|e| remote.error(e))?;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| remote.io(e))?;
        out.extend_from_slice(&chunk);
        if out.len() as u64 > MAX_METADATA_BYTES {
            return Err(ImageError::Unsupported(format!(
                "config {} is larger than {MAX_METADATA_BYTES} bytes",
                desc.digest
            )));
        }
    }
    let actual = super::archive::sha256(&out);
    if actual != desc.digest {
        return Err(ImageError::DigestMismatch {
            what: "image config",
            expected: desc.digest.clone(),
            actual,
        });
    }
    Ok(out)
}

/// A layer blob to `path`, hashed on the way; digest and size checked.
async fn download(
    inner: &Inner,
    client: &Client,
    oref: &oci_client::Reference,
    oci_desc: &OciDescriptor,
    desc: &Descriptor,
    path: &Path,
    remote: &Remote,
) -> Result<(), ImageError> {
    let mut stream = client
        .pull_blob_stream(oref, oci_desc)
        .await
        .map_err(|e| remote.error(e))?;
    inner.counters.blobs.fetch_add(1, Ordering::Relaxed);
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(io_err("create", path))?;
    let mut hasher = Sha256::new();
    let mut n: u64 = 0;
    let expected_size = u64::try_from(desc.size).ok().filter(|s| *s > 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| remote.io(e))?;
        n += chunk.len() as u64;
        if expected_size.is_some_and(|s| n > s) {
            return Err(ImageError::Registry {
                registry: remote.registry.clone(),
                reason: format!("layer {} is larger than its descriptor says", desc.digest),
            });
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(io_err("write", path))?;
        inner
            .counters
            .bytes
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
    }
    file.flush().await.map_err(io_err("write", path))?;
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if actual != desc.digest {
        return Err(ImageError::DigestMismatch {
            what: "layer",
            expected: desc.digest.clone(),
            actual,
        });
    }
    if expected_size.is_some_and(|s| s != n) {
        return Err(ImageError::Registry {
            registry: remote.registry.clone(),
            reason: format!(
                "layer {} is {n} bytes, its descriptor says {}",
                desc.digest, desc.size
            ),
        });
    }
    debug!(layer = %desc.digest, bytes = n, "layer downloaded");
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Internal(format!("blocking task failed: {e}")))?
}
