//! `ImageStore::import`: load a `docker save` or OCI layout archive.
//!
//! Everything is checked and extracted under `tmp/` before anything is
//! committed, so a refused archive leaves the store unchanged.

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::Path;

use tracing::info;

use super::archive::{self, ArchiveImage};
use super::error::io_err;
use super::extract::extract_layer;
use super::reference::ImageRef;
use super::store::{ImageStore, StagedImage, StagedLayer};
use super::{ImageError, ImageSummary};

impl ImageStore {
    /// Loads a `docker save` archive (classic layout or the newer one with
    /// OCI blobs) or an OCI image-layout archive, plain tar or gzip.
    ///
    /// `name` tags the image: it is required when the archive names none
    /// (e.g. `skopeo copy … oci:DIR:latest` only records the tag), and
    /// replaces the archive's names for a single-image archive; it is
    /// refused for an archive with several images. Blocking.
    pub fn import(
        &self,
        archive: &Path,
        name: Option<&str>,
    ) -> Result<Vec<ImageSummary>, ImageError> {
        let name = name
            .filter(|n| !n.is_empty())
            .map(|n| ImageRef::parse(n, "name"))
            .transpose()?;
        let op = self.inner.op_dir("import")?;
        let members = archive::unpack(archive, &op.path.join("members"))?;
        let mut images = members.images()?;
        // One image can appear several times (several tags).
        let mut distinct: Vec<ArchiveImage> = Vec::new();
        for img in images.drain(..) {
            match distinct.iter_mut().find(|d| d.id == img.id) {
                Some(d) => d.names.extend(img.names),
                None => distinct.push(img),
            }
        }

        let refs = assign_references(&distinct, name.as_ref())?;
        let all: Vec<String> = distinct
            .iter()
            .flat_map(|i| i.config.diff_ids.iter().cloned())
            .collect();
        let (_pins, present) = self.inner.pin_present(&all);
        let mut done: HashSet<String> = present;
        let mut staged = Vec::new();
        for img in &distinct {
            for src in &img.layers {
                if !done.insert(src.diff_id.clone()) {
                    continue;
                }
                archive::verify_layer_file(src)?;
                let f = File::open(&src.path).map_err(io_err("open", &src.path))?;
                let dest = op.path.join(format!("layer-{}", staged.len()));
                staged.push(stage_layer(f, &dest, &src.label, &src.diff_id)?);
            }
        }
        let staged_images = distinct
            .into_iter()
            .zip(refs)
            .map(|(img, references)| StagedImage {
                id: img.id,
                config_bytes: img.config_bytes,
                config: img.config.config,
                created: img.config.created,
                diff_ids: img.config.diff_ids,
                digest: img.digest,
                references,
            })
            .collect();
        sync_fs(&op.path)?;
        let summaries = self.inner.commit(staged_images, staged)?;
        for s in &summaries {
            info!(image = %s.id, references = ?s.references, layers = s.layers, "image imported");
        }
        Ok(summaries)
    }
}

/// The canonical references for each image, by the rules of `import`.
fn assign_references(
    images: &[ArchiveImage],
    name: Option<&ImageRef>,
) -> Result<Vec<Vec<String>>, ImageError> {
    if let Some(n) = name {
        if images.len() != 1 {
            return Err(ImageError::InvalidReference {
                field: "name",
                value: n.canonical(),
                reason: format!(
                    "a name can only be given for an archive with one image; this one has {}",
                    images.len()
                ),
            });
        }
        return Ok(vec![vec![n.canonical()]]);
    }
    images
        .iter()
        .map(|img| {
            if img.names.is_empty() {
                return Err(ImageError::InvalidReference {
                    field: "name",
                    value: String::new(),
                    reason: format!("the archive does not name image {}; give a name", img.id),
                });
            }
            let mut refs: Vec<String> = img
                .names
                .iter()
                .map(|n| ImageRef::parse(n, "name").map(|r| r.canonical()))
                .collect::<Result<_, _>>()
                .map_err(|e| match e {
                    ImageError::InvalidReference { value, reason, .. } => {
                        ImageError::BadArchive(format!("archive names image '{value}': {reason}"))
                    }
                    other => other,
                })?;
            refs.sort();
            refs.dedup();
            Ok(refs)
        })
        .collect()
}

/// Extracts one layer blob into `dest` (created here) and checks its
/// diff_id. `label` names the layer in errors. Blocking.
pub(super) fn stage_layer(
    blob: File,
    dest: &Path,
    label: &str,
    diff_id: &str,
) -> Result<StagedLayer, ImageError> {
    fs::create_dir(dest).map_err(io_err("create", dest))?;
    let got = extract_layer(blob, dest, label)?;
    if got.diff_id != diff_id {
        return Err(ImageError::DigestMismatch {
            what: "layer diff_id",
            expected: diff_id.to_string(),
            actual: format!("{} (layer {label})", got.diff_id),
        });
    }
    Ok(StagedLayer {
        diff_id: diff_id.to_string(),
        dir: dest.to_path_buf(),
        size_bytes: got.size_bytes,
    })
}

/// One `syncfs` for all extracted files before their dirs are renamed into
/// the store: far cheaper than an fsync per file, with the same guarantee
/// that a committed layer's content is on disk.
pub(super) fn sync_fs(dir: &Path) -> Result<(), ImageError> {
    let d = File::open(dir).map_err(io_err("open", dir))?;
    nix::unistd::syncfs(&d).map_err(|e| ImageError::io("syncfs", dir, e.into()))
}
