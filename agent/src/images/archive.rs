//! Reading import archives: `docker save` (classic `<id>/layer.tar` and the
//! Docker ≥ 25 layout with `blobs/sha256/…`) and OCI image layouts, as a
//! plain or gzip tar.
//!
//! The outer archive is untrusted too, but its member names never become
//! host paths: regular files are copied to numbered files in the
//! operation's temp dir and looked up through a map from normalized archive
//! path; symlinks and hardlinks inside it (`docker save` links duplicate
//! layers) are resolved lexically within that map.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::Deserialize;

use super::ImageError;
use super::error::io_err;
use super::extract::file_digest;
use super::reference::{digest_hex, is_lower_hex, is_sha256_digest};
use super::spec::{
    self, ANNOTATION_IMAGE_NAME, ANNOTATION_REF_NAME, Descriptor, Index, MAX_METADATA_BYTES,
    Manifest, ParsedConfig, Probe,
};

/// How deep symlinks inside an archive are followed.
const MAX_LINK_DEPTH: usize = 16;

enum Node {
    File { path: PathBuf },
    Link(String),
}

/// The members of an unpacked archive.
pub(super) struct Unpacked {
    nodes: HashMap<String, Node>,
}

/// A layer of an archive image, not yet verified or extracted.
#[derive(Debug, Clone)]
pub(super) struct LayerSource {
    /// The member's file on disk.
    pub path: PathBuf,
    /// Digest the file must have (blob name or descriptor), when known.
    pub digest: Option<String>,
    pub diff_id: String,
    /// Names the layer in errors: its blob digest, else its diff_id.
    pub label: String,
}

/// One image found in an archive, config verified and parsed.
pub(super) struct ArchiveImage {
    pub id: String,
    pub config_bytes: Vec<u8>,
    pub config: ParsedConfig,
    pub layers: Vec<LayerSource>,
    /// References the archive gives (not yet normalized).
    pub names: Vec<String>,
    /// Manifest digest (OCI layouts).
    pub digest: Option<String>,
}

/// Copies the members of `archive` into `into` (created here).
pub(super) fn unpack(archive: &Path, into: &Path) -> Result<Unpacked, ImageError> {
    fs::create_dir(into).map_err(io_err("create", into))?;
    let f = File::open(archive).map_err(io_err("open", archive))?;
    let mut buffered = BufReader::with_capacity(256 * 1024, f);
    let head = buffered.fill_buf().map_err(io_err("read", archive))?;
    if head.is_empty() {
        return Err(ImageError::BadArchive("the archive is empty".into()));
    }
    let reader: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let bad = |e: io::Error| ImageError::BadArchive(format!("not a (gzip) tar archive: {e}"));
    let mut tar = tar::Archive::new(reader);
    let mut nodes = HashMap::new();
    for (n, entry) in tar.entries().map_err(bad)?.enumerate() {
        let mut entry = entry.map_err(bad)?;
        let raw = entry.path().map_err(bad)?.into_owned();
        let Some(name) = normalize(&raw, "") else {
            return Err(ImageError::BadArchive(format!(
                "member '{}' has an absolute or '..' path",
                raw.display()
            )));
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let path = into.join(format!("m{n}"));
                let mut out = File::create(&path).map_err(io_err("create", &path))?;
                io::copy(&mut entry, &mut out).map_err(|e| {
                    ImageError::BadArchive(format!("cannot read member '{name}': {e}"))
                })?;
                nodes.insert(name, Node::File { path });
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name().map_err(bad)?.unwrap_or_default();
                let dir = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                if let Some(t) = normalize(&target, dir) {
                    nodes.insert(name, Node::Link(t));
                }
            }
            tar::EntryType::Link => {
                let target = entry.link_name().map_err(bad)?.unwrap_or_default();
                if let Some(t) = normalize(&target, "") {
                    nodes.insert(name, Node::Link(t));
                }
            }
            _ => {}
        }
    }
    Ok(Unpacked { nodes })
}

/// A member path as `a/b/c`; `..` may climb within `base` (for symlink
/// targets) but never above the archive root.
fn normalize(path: &Path, base: &str) -> Option<String> {
    let mut out: Vec<String> = if path.is_absolute() || base.is_empty() {
        Vec::new()
    } else {
        base.split('/').map(str::to_string).collect()
    };
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                if base.is_empty() && !path.is_absolute() {
                    return None; // member names must not use `..`
                }
                out.pop()?;
            }
            Component::Normal(n) => out.push(n.to_str()?.to_string()),
        }
    }
    if base.is_empty() && path.is_absolute() {
        return None;
    }
    Some(out.join("/"))
}

impl Unpacked {
    fn has(&self, name: &str) -> bool {
        self.file(name).is_some()
    }

    /// The file behind archive path `name`, following links.
    fn file(&self, name: &str) -> Option<&Path> {
        let mut cur = name.trim_start_matches("./").to_string();
        for _ in 0..MAX_LINK_DEPTH {
            match self.nodes.get(&cur)? {
                Node::File { path } => return Some(path),
                Node::Link(t) => cur = t.clone(),
            }
        }
        None
    }

    fn need(&self, name: &str) -> Result<&Path, ImageError> {
        self.file(name)
            .ok_or_else(|| ImageError::BadArchive(format!("member '{name}' is missing")))
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let path = self.need(name)?;
        let len = fs::metadata(path).map_err(io_err("stat", path))?.len();
        if len > MAX_METADATA_BYTES {
            return Err(ImageError::BadArchive(format!(
                "member '{name}' is larger than {MAX_METADATA_BYTES} bytes"
            )));
        }
        fs::read(path).map_err(io_err("read", path))
    }

    /// A content-addressed blob of an OCI layout, digest and size checked.
    fn read_blob(&self, desc: &Descriptor, what: &'static str) -> Result<Vec<u8>, ImageError> {
        spec::check_digest(desc, what)?;
        let bytes = self.read_small(&blob_path(&desc.digest))?;
        let actual = sha256(&bytes);
        if actual != desc.digest {
            return Err(ImageError::DigestMismatch {
                what,
                expected: desc.digest.clone(),
                actual,
            });
        }
        check_size(desc, bytes.len() as u64, what)?;
        Ok(bytes)
    }

    /// Reads every image of the archive.
    pub fn images(&self) -> Result<Vec<ArchiveImage>, ImageError> {
        if self.has("manifest.json") {
            self.docker_images()
        } else if self.has("index.json") {
            self.oci_images()
        } else {
            Err(ImageError::BadArchive(
                "neither manifest.json (docker save) nor index.json (OCI image layout) found"
                    .into(),
            ))
        }
    }

    fn docker_images(&self) -> Result<Vec<ArchiveImage>, ImageError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            #[serde(default)]
            layers: Vec<String>,
        }
        let bytes = self.read_small("manifest.json")?;
        let entries: Vec<Entry> = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::BadArchive(format!("manifest.json: {e}")))?;
        if entries.is_empty() {
            return Err(ImageError::BadArchive(
                "manifest.json lists no image".into(),
            ));
        }
        let mut out = Vec::new();
        for e in entries {
            let config_bytes = self.read_small(&e.config)?;
            let id = sha256(&config_bytes);
            if let Some(named) = digest_in_name(&e.config)
                && named != id
            {
                return Err(ImageError::DigestMismatch {
                    what: "image config",
                    expected: named,
                    actual: id,
                });
            }
            let config = spec::parse_config(&config_bytes, &id)?;
            if config.diff_ids.len() != e.layers.len() {
                return Err(ImageError::BadArchive(format!(
                    "image {id}: manifest.json lists {} layers, its config {}",
                    e.layers.len(),
                    config.diff_ids.len()
                )));
            }
            let mut layers = Vec::new();
            for (member, diff_id) in e.layers.iter().zip(&config.diff_ids) {
                let digest = digest_in_name(member).filter(|_| member.contains("blobs/"));
                layers.push(LayerSource {
                    path: self.need(member)?.to_path_buf(),
                    label: digest.clone().unwrap_or_else(|| diff_id.clone()),
                    digest,
                    diff_id: diff_id.clone(),
                });
            }
            out.push(ArchiveImage {
                id,
                config_bytes,
                config,
                layers,
                names: e.repo_tags.unwrap_or_default(),
                digest: None,
            });
        }
        Ok(out)
    }

    fn oci_images(&self) -> Result<Vec<ArchiveImage>, ImageError> {
        if !self.has("oci-layout") {
            return Err(ImageError::BadArchive(
                "index.json without oci-layout: not an OCI image layout".into(),
            ));
        }
        let bytes = self.read_small("index.json")?;
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::BadArchive(format!("index.json: {e}")))?;
        if index.manifests.is_empty() {
            return Err(ImageError::BadArchive("index.json lists no image".into()));
        }
        let mut out = Vec::new();
        for desc in &index.manifests {
            let names = desc_names(desc);
            let (mdesc, mbytes) = self.resolve_manifest(desc, 0)?;
            let manifest: Manifest = serde_json::from_slice(&mbytes)
                .map_err(|e| ImageError::BadArchive(format!("manifest {}: {e}", mdesc.digest)))?;
            let config_bytes = self.read_blob(&manifest.config, "image config")?;
            let id = manifest.config.digest.clone();
            let config = spec::parse_config(&config_bytes, &id)?;
            if config.diff_ids.len() != manifest.layers.len() {
                return Err(ImageError::BadArchive(format!(
                    "manifest {}: {} layers, its config {}",
                    mdesc.digest,
                    manifest.layers.len(),
                    config.diff_ids.len()
                )));
            }
            let mut layers = Vec::new();
            for (l, diff_id) in manifest.layers.iter().zip(&config.diff_ids) {
                spec::check_digest(l, "layer")?;
                spec::check_layer_media_type(l)?;
                layers.push(LayerSource {
                    path: self.need(&blob_path(&l.digest))?.to_path_buf(),
                    digest: Some(l.digest.clone()),
                    diff_id: diff_id.clone(),
                    label: l.digest.clone(),
                });
            }
            out.push(ArchiveImage {
                id,
                config_bytes,
                config,
                layers,
                names,
                digest: Some(mdesc.digest.clone()),
            });
        }
        Ok(out)
    }

    /// Follows nested indexes to the linux/amd64 image manifest.
    fn resolve_manifest(
        &self,
        desc: &Descriptor,
        depth: usize,
    ) -> Result<(Descriptor, Vec<u8>), ImageError> {
        let bytes = self.read_blob(desc, "manifest")?;
        let probe: Probe = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::BadArchive(format!("manifest {}: {e}", desc.digest)))?;
        if !probe.is_index() {
            return Ok((desc.clone(), bytes));
        }
        if depth > 4 {
            return Err(ImageError::BadArchive("indexes nested too deep".into()));
        }
        let index: Index = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::BadArchive(format!("index {}: {e}", desc.digest)))?;
        let chosen = spec::pick_platform(&index).ok_or_else(|| {
            ImageError::Unsupported(format!("index {} has no linux/amd64 image", desc.digest))
        })?;
        self.resolve_manifest(chosen, depth + 1)
    }
}

/// Full references an index entry names: containerd's image name, or an
/// OCI `ref.name` that is more than a bare tag.
fn desc_names(desc: &Descriptor) -> Vec<String> {
    let Some(a) = &desc.annotations else {
        return Vec::new();
    };
    if let Some(n) = a.get(ANNOTATION_IMAGE_NAME) {
        return vec![n.clone()];
    }
    match a.get(ANNOTATION_REF_NAME) {
        Some(n) if n.contains('/') || n.contains(':') => vec![n.clone()],
        _ => Vec::new(),
    }
}

fn blob_path(digest: &str) -> String {
    format!("blobs/sha256/{}", digest_hex(digest))
}

/// The digest a member's name encodes: `blobs/sha256/<hex>` or
/// `<hex>.json` (classic docker save config).
fn digest_in_name(member: &str) -> Option<String> {
    let base = member.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    let d = format!("sha256:{hex}");
    (is_sha256_digest(&d) && is_lower_hex(hex)).then_some(d)
}

fn check_size(desc: &Descriptor, actual: u64, what: &str) -> Result<(), ImageError> {
    if desc.size > 0 && u64::try_from(desc.size).ok() != Some(actual) {
        return Err(ImageError::BadArchive(format!(
            "{what} {}: size {actual} instead of {}",
            desc.digest, desc.size
        )));
    }
    Ok(())
}

pub(super) fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Checks a layer file against its compressed digest, when one is known.
pub(super) fn verify_layer_file(src: &LayerSource) -> Result<(), ImageError> {
    let Some(expected) = &src.digest else {
        return Ok(());
    };
    let (actual, _) = file_digest(&src.path)?;
    if &actual != expected {
        return Err(ImageError::DigestMismatch {
            what: "layer",
            expected: expected.clone(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_paths_normalize_and_links_resolve_lexically() {
        assert_eq!(normalize(Path::new("./a/b"), "").as_deref(), Some("a/b"));
        assert_eq!(normalize(Path::new("../x"), ""), None);
        assert_eq!(normalize(Path::new("/x"), ""), None);
        assert_eq!(
            normalize(Path::new("../abc/layer.tar"), "def").as_deref(),
            Some("abc/layer.tar")
        );
        assert_eq!(normalize(Path::new("../../x"), "a"), None);
        assert_eq!(
            normalize(Path::new("/blobs/x"), "a").as_deref(),
            Some("blobs/x")
        );
    }

    #[test]
    fn digests_in_member_names() {
        let hex = "ab".repeat(32);
        assert_eq!(
            digest_in_name(&format!("blobs/sha256/{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(
            digest_in_name(&format!("{hex}.json")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(digest_in_name("abc/layer.tar"), None);
    }
}
