//! The slices of the OCI image spec (and Docker's image manifest v2,
//! schema 2, which has the same shape) that the store reads: index,
//! manifest, descriptor, image config; plus media-type checks.

use std::collections::HashMap;

use serde::Deserialize;

use super::reference::is_sha256_digest;
use super::{ImageConfig, ImageError};

pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest, index or config blob read into memory.
pub(crate) const MAX_METADATA_BYTES: u64 = 16 * 1024 * 1024;

/// Annotation with the full reference (containerd, Docker ≥ 25).
pub(crate) const ANNOTATION_IMAGE_NAME: &str = "io.containerd.image.name";
/// OCI annotation: a tag, or a full reference.
pub(crate) const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// Just enough to tell an index from a manifest when `mediaType` is absent.
#[derive(Debug, Deserialize)]
pub(crate) struct Probe {
    #[serde(default, rename = "mediaType")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Option<serde_json::Value>,
}

impl Probe {
    pub fn is_index(&self) -> bool {
        matches!(self.media_type.as_deref(), Some(OCI_INDEX | DOCKER_LIST))
            || (self.media_type.is_none() && self.manifests.is_some())
    }
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<ContainerConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// An image config as the store needs it.
#[derive(Debug, Clone)]
pub(crate) struct ParsedConfig {
    pub config: ImageConfig,
    pub created: String,
    /// Uncompressed layer digests, bottom first.
    pub diff_ids: Vec<String>,
}

/// Parses and checks an image config blob (`what` names it in errors).
pub(crate) fn parse_config(bytes: &[u8], what: &str) -> Result<ParsedConfig, ImageError> {
    let bad = |reason: String| ImageError::BadArchive(format!("image config {what}: {reason}"));
    let file: ConfigFile = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    if file.rootfs.kind != "layers" {
        return Err(bad(format!(
            "rootfs type '{}' is not 'layers'",
            file.rootfs.kind
        )));
    }
    if let Some(d) = file.rootfs.diff_ids.iter().find(|d| !is_sha256_digest(d)) {
        return Err(bad(format!("diff_id '{d}' is not a sha256 digest")));
    }
    match file.os.as_deref() {
        None | Some("") | Some("linux") => {}
        Some(os) => {
            return Err(ImageError::Unsupported(format!(
                "image config {what} is for os '{os}', not linux"
            )));
        }
    }
    let c = file.config.unwrap_or_default();
    Ok(ParsedConfig {
        config: ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        },
        created: file.created.unwrap_or_default(),
        diff_ids: file.rootfs.diff_ids,
    })
}

/// Refuses layer media types the store cannot extract. Compression is
/// detected from the bytes; this only rules out what is not a tar layer.
pub(crate) fn check_layer_media_type(desc: &Descriptor) -> Result<(), ImageError> {
    let mt = desc.media_type.as_str();
    let ok = matches!(
        mt,
        "" | "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    if ok {
        return Ok(());
    }
    let why = if mt.contains("zstd") {
        "zstd layers are not supported"
    } else if mt.contains("foreign") || mt.contains("nondistributable") {
        "foreign (non-distributable) layers are not supported"
    } else {
        "not a tar layer"
    };
    Err(ImageError::Unsupported(format!(
        "layer {} has media type '{mt}': {why}",
        desc.digest
    )))
}

/// Checks a descriptor's digest before it becomes part of a path.
pub(crate) fn check_digest(desc: &Descriptor, what: &str) -> Result<(), ImageError> {
    if is_sha256_digest(&desc.digest) {
        Ok(())
    } else {
        Err(ImageError::Unsupported(format!(
            "{what} digest '{}': only sha256 digests are supported",
            desc.digest
        )))
    }
}

/// The linux/amd64 entry of an index (the agent's platform).
pub(crate) fn pick_platform(index: &Index) -> Option<&Descriptor> {
    index.manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_the_runtime_fields() {
        let d = format!("sha256:{}", "1".repeat(64));
        let json = format!(
            r#"{{"created":"2024-01-01T00:00:00Z","os":"linux","architecture":"amd64",
               "config":{{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["A=1"],
               "WorkingDir":"/w","User":"1000:1000"}},
               "rootfs":{{"type":"layers","diff_ids":["{d}"]}}}}"#
        );
        let p = parse_config(json.as_bytes(), "x").unwrap();
        assert_eq!(p.config.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(p.config.cmd, ["echo hi"]);
        assert_eq!(p.config.env, ["A=1"]);
        assert_eq!(p.config.working_dir, "/w");
        assert_eq!(p.config.user, "1000:1000");
        assert_eq!(p.diff_ids, [d]);
        assert_eq!(p.created, "2024-01-01T00:00:00Z");
    }

    #[test]
    fn config_with_null_fields_and_bad_diff_ids() {
        let ok =
            r#"{"config":{"Entrypoint":null,"Cmd":null},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert!(
            parse_config(ok.as_bytes(), "x")
                .unwrap()
                .config
                .cmd
                .is_empty()
        );
        let bad = r#"{"rootfs":{"type":"layers","diff_ids":["sha256:../../x"]}}"#;
        assert!(matches!(
            parse_config(bad.as_bytes(), "x"),
            Err(ImageError::BadArchive(_))
        ));
        let win = r#"{"os":"windows","rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert!(matches!(
            parse_config(win.as_bytes(), "x"),
            Err(ImageError::Unsupported(_))
        ));
    }
}
