//! Image references, normalized like Docker: `busybox` is
//! `docker.io/library/busybox:latest`, `127.0.0.1:5000/busybox` keeps its
//! registry, and `name@sha256:…` pins a manifest digest. The store keeps
//! only the canonical form ([`ImageRef::canonical`]) and accepts all.
//!
//! The grammar and the Docker Hub rules are the distribution/reference
//! ones, as implemented by `oci_client::Reference` (oci-spec).

use super::ImageError;

/// A parsed, normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ImageRef {
    /// `docker.io`, `127.0.0.1:5000`, ...
    pub registry: String,
    /// `library/busybox`, `test/busybox`, ...
    pub repository: String,
    /// Absent when a digest is given (the digest wins, as in Docker).
    pub tag: Option<String>,
    /// Manifest digest, `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `value` (from the request field `field`, for the error).
    pub fn parse(value: &str, field: &'static str) -> Result<Self, ImageError> {
        let invalid = |reason: String| ImageError::InvalidReference {
            field,
            value: value.to_string(),
            reason,
        };
        if value.is_empty() {
            return Err(invalid("empty".into()));
        }
        if value.len() > 1024 {
            return Err(invalid("longer than 1024 bytes".into()));
        }
        let parsed = oci_client::Reference::try_from(value).map_err(|e| invalid(e.to_string()))?;
        // The grammar lets a host-like first component through in upper
        // case even when it ends up in the repository (`UPPER/case`).
        if parsed.repository().bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository names must be lowercase".into()));
        }
        let digest = parsed.digest().map(str::to_string);
        if let Some(d) = &digest
            && !is_sha256_digest(d)
        {
            return Err(invalid("only sha256 digests are supported".into()));
        }
        let tag = if digest.is_some() {
            None
        } else {
            Some(parsed.tag().unwrap_or("latest").to_string())
        };
        Ok(ImageRef {
            registry: parsed.registry().to_string(),
            repository: parsed.repository().to_string(),
            tag,
            digest,
        })
    }

    /// `registry/repository` (the name without tag or digest).
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The one form the store keeps: `registry/repository:tag` or
    /// `registry/repository@sha256:…`.
    pub fn canonical(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.name()),
            (None, Some(t)) => format!("{}:{t}", self.name()),
            (None, None) => format!("{}:latest", self.name()),
        }
    }
}

/// `sha256:` followed by exactly 64 lowercase hex digits. Everything the
/// store turns into a file name passes this check first.
pub(crate) fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && is_lower_hex(h))
}

pub(crate) fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The hex part of a checked `sha256:` digest.
pub(crate) fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// If `s` can only be an image id (`sha256:<hex prefix>`), or could be one
/// (12 to 64 hex digits, like Docker's short ids), the hex prefix to match
/// ids with, and whether a name is still possible.
pub(crate) fn id_prefix(s: &str) -> Option<(&str, bool)> {
    if let Some(h) = s.strip_prefix("sha256:") {
        if !h.is_empty() && h.len() <= 64 && is_lower_hex(h) {
            return Some((h, false));
        }
        return None;
    }
    if (12..=64).contains(&s.len()) && is_lower_hex(s) {
        return Some((s, true));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        ImageRef::parse(s, "reference").unwrap().canonical()
    }

    #[test]
    fn docker_hub_names_are_normalized() {
        assert_eq!(canon("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(canon("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(canon("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(
            canon("docker.io/library/busybox:latest"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(canon("index.docker.io/foo/bar"), "docker.io/foo/bar:latest");
        assert_eq!(canon("foo/bar:v1"), "docker.io/foo/bar:v1");
    }

    #[test]
    fn explicit_registries_are_kept() {
        assert_eq!(
            canon("127.0.0.1:5000/busybox"),
            "127.0.0.1:5000/busybox:latest"
        );
        assert_eq!(
            canon("localhost/test/busybox:x"),
            "localhost/test/busybox:x"
        );
        assert_eq!(canon("quay.io/a/b:c"), "quay.io/a/b:c");
    }

    #[test]
    fn digest_wins_over_tag() {
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            canon(&format!("busybox:1.36@{d}")),
            format!("docker.io/library/busybox@{d}")
        );
    }

    #[test]
    fn bad_references_are_refused_naming_the_field() {
        for bad in ["", "UPPER/case", "a b", "busybox@sha256:abc", "x@md5:00"] {
            let err = ImageRef::parse(bad, "name").unwrap_err();
            assert!(
                matches!(err, ImageError::InvalidReference { field: "name", .. }),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn id_prefixes() {
        assert_eq!(id_prefix("sha256:abc"), Some(("abc", false)));
        assert_eq!(id_prefix("0123456789ab"), Some(("0123456789ab", true)));
        assert_eq!(id_prefix("abc"), None);
        assert_eq!(id_prefix("busybox"), None);
        assert!(is_sha256_digest(&format!("sha256:{}", "0".repeat(64))));
        assert!(!is_sha256_digest(&format!("sha256:{}", "A".repeat(64))));
        assert!(!is_sha256_digest("sha256:../../etc"));
    }
}
