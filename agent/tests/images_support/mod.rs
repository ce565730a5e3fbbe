//! Test support for the image store: layers and images built in the test
//! from `/bin/busybox` with the tar crate, written as OCI layouts and
//! `docker save` archives; a `docker-registry` process on 127.0.0.1 with
//! a guard that kills it; tool checks that fail loudly.

#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

pub const INSTALL_HINT: &str = "apt-get install busybox-static skopeo docker-registry";

/// Fails (never skips) when a tool the test needs is missing.
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found || Path::new(tool).exists(),
        "{tool} is missing: {INSTALL_HINT}"
    );
}

pub fn busybox() -> Vec<u8> {
    fs::read("/bin/busybox")
        .unwrap_or_else(|e| panic!("cannot read /bin/busybox ({e}): {INSTALL_HINT}"))
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Builds one layer tar. Paths go into the header bytes as given (the tar
/// crate's own path setters refuse `..` and absolute paths, which the
/// malicious layers need).
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
}

pub const MTIME: u64 = 1_600_000_000;

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Layer {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(size);
        let name = &mut h.as_ustar_mut().unwrap().name;
        assert!(path.len() < name.len(), "test path too long: {path}");
        name[..path.len()].copy_from_slice(path.as_bytes());
        h
    }

    fn link_header(kind: tar::EntryType, path: &str, target: &str) -> tar::Header {
        let mut h = Self::header(kind, path, 0o777, 0);
        let ln = &mut h.as_ustar_mut().unwrap().linkname;
        ln[..target.len()].copy_from_slice(target.as_bytes());
        h
    }

    fn push(mut self, mut h: tar::Header, data: &[u8]) -> Self {
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }

    pub fn dir(self, path: &str) -> Self {
        let h = Self::header(tar::EntryType::Directory, path, 0o755, 0);
        self.push(h, &[])
    }

    pub fn file(self, path: &str, data: &[u8], mode: u32) -> Self {
        let h = Self::header(tar::EntryType::Regular, path, mode, data.len() as u64);
        self.push(h, data)
    }

    /// A regular file with an owner (to check ownership is kept).
    pub fn owned_file(self, path: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, path, mode, data.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, data)
    }

    pub fn symlink(self, path: &str, target: &str) -> Self {
        let h = Self::link_header(tar::EntryType::Symlink, path, target);
        self.push(h, &[])
    }

    pub fn hardlink(self, path: &str, target: &str) -> Self {
        let h = Self::link_header(tar::EntryType::Link, path, target);
        self.push(h, &[])
    }

    pub fn device(self, path: &str, block: bool, major: u32, minor: u32) -> Self {
        let kind = if block {
            tar::EntryType::Block
        } else {
            tar::EntryType::Char
        };
        let mut h = Self::header(kind, path, 0o600, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.push(h, &[])
    }

    /// The uncompressed tar.
    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// The base layer: busybox with relative and absolute symlinks, a
/// hardlink, files the second layer whites out, an owned setuid file.
pub fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("bin/")
        .file("bin/busybox", &busybox(), 0o755)
        .symlink("bin/sh", "busybox")
        .symlink("bin/ls", "/bin/busybox")
        .hardlink("bin/busybox-hl", "bin/busybox")
        .dir("usr/")
        .dir("usr/bin/")
        .symlink("usr/bin/env", "../../bin/busybox")
        .dir("etc/")
        .file("etc/motd", b"base motd\n", 0o644)
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
        .dir("opt/")
        .dir("opt/data/")
        .file("opt/data/old.txt", b"old\n", 0o644)
        .owned_file("opt/suid", b"#!/bin/sh\n", 0o4755, 1000, 1001)
        .device("dev-null", false, 1, 3)
        .finish()
}

/// The second layer: a file, a whiteout of a base file, an opaque dir.
pub fn top_layer() -> Vec<u8> {
    Layer::new()
        .file("hello.txt", b"hello from layer 2\n", 0o644)
        .dir("etc/")
        .file("etc/.wh.motd", b"", 0o644)
        .dir("opt/")
        .dir("opt/data/")
        .file("opt/data/.wh..wh..opq", b"", 0o644)
        .file("opt/data/new.txt", b"new\n", 0o644)
        .finish()
}

/// An image: uncompressed layers, bottom first, and its config.
#[derive(Clone)]
pub struct TestImage {
    pub layers: Vec<Vec<u8>>,
    pub config: Vec<u8>,
}

pub const ENTRYPOINT: &[&str] = &["/bin/sh", "-c"];
pub const CMD: &[&str] = &["cat /hello.txt"];
pub const ENV: &[&str] = &["PATH=/bin:/usr/bin", "GREETING=hi there"];
pub const WORKDIR: &str = "/opt";
pub const USER: &str = "1000:1000";

impl TestImage {
    pub fn new(layers: Vec<Vec<u8>>) -> Self {
        Self::with_created(layers, "2024-05-01T12:00:00Z")
    }

    pub fn with_created(layers: Vec<Vec<u8>>, created: &str) -> Self {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let config = serde_json::json!({
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Entrypoint": ENTRYPOINT,
                "Cmd": CMD,
                "Env": ENV,
                "WorkingDir": WORKDIR,
                "User": USER,
            },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        TestImage {
            layers,
            config: serde_json::to_vec(&config).unwrap(),
        }
    }

    pub fn busybox() -> Self {
        Self::new(vec![base_layer(), top_layer()])
    }

    pub fn id(&self) -> String {
        sha256(&self.config)
    }

    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| sha256(l)).collect()
    }

    /// Writes an OCI image layout into `dir`; `gzip` compresses layers.
    /// Returns the manifest digest. `ref_name` goes on the index entry.
    pub fn write_oci_layout(&self, dir: &Path, gzip_layers: bool, ref_name: &str) -> String {
        let (desc, _) = self.write_oci_manifest(dir, gzip_layers, None);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [with_annotation(desc.clone(), ref_name)],
        });
        fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
        desc["digest"].as_str().unwrap().to_string()
    }

    /// Writes blobs and the image manifest; returns its descriptor.
    pub fn write_oci_manifest(
        &self,
        dir: &Path,
        gzip_layers: bool,
        platform: Option<(&str, &str)>,
    ) -> (serde_json::Value, Vec<u8>) {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let config_desc = write_blob(
            dir,
            &self.config,
            "application/vnd.oci.image.config.v1+json",
        );
        let layer_descs: Vec<serde_json::Value> = self
            .layers
            .iter()
            .map(|l| {
                if gzip_layers {
                    write_blob(dir, &gzip(l), "application/vnd.oci.image.layer.v1.tar+gzip")
                } else {
                    write_blob(dir, l, "application/vnd.oci.image.layer.v1.tar")
                }
            })
            .collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_desc,
            "layers": layer_descs,
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let mut desc = write_blob(dir, &bytes, "application/vnd.oci.image.manifest.v1+json");
        if let Some((os, arch)) = platform {
            desc["platform"] = serde_json::json!({"os": os, "architecture": arch});
        }
        (desc, bytes)
    }

    /// Writes a `docker save` archive. `classic`: `<id>.json` config and
    /// `<dir>/layer.tar` layers (the second layer's dir a symlink to test
    /// link resolution); otherwise the Docker ≥ 25 `blobs/sha256` layout.
    pub fn write_docker_save(
        &self,
        path: &Path,
        repo_tags: &[&str],
        classic: bool,
        gzip_all: bool,
    ) {
        let mut b = tar::Builder::new(Vec::new());
        let id_hex = hex_of(&self.id()).to_string();
        let (config_name, layer_names): (String, Vec<String>) = if classic {
            let names = self
                .layers
                .iter()
                .enumerate()
                .map(|(i, _)| format!("layer{i}dir/layer.tar"))
                .collect();
            (format!("{id_hex}.json"), names)
        } else {
            let names = self
                .layers
                .iter()
                .map(|l| format!("blobs/sha256/{}", hex_of(&sha256(l))))
                .collect();
            (format!("blobs/sha256/{id_hex}"), names)
        };
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": if repo_tags.is_empty() { serde_json::Value::Null } else { serde_json::json!(repo_tags) },
            "Layers": layer_names,
        }]);
        append(
            &mut b,
            "manifest.json",
            &serde_json::to_vec(&manifest).unwrap(),
        );
        append(&mut b, &config_name, &self.config);
        for (i, (name, data)) in layer_names.iter().zip(&self.layers).enumerate() {
            if classic && i == 1 {
                // Docker links a duplicate layer.tar to an earlier copy.
                append(&mut b, &format!("real{i}/layer.tar"), data);
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, format!("../real{i}/layer.tar"))
                    .unwrap();
            } else {
                append(&mut b, name, data);
            }
        }
        let bytes = b.into_inner().unwrap();
        fs::write(path, if gzip_all { gzip(&bytes) } else { bytes }).unwrap();
    }
}

pub fn with_annotation(mut desc: serde_json::Value, ref_name: &str) -> serde_json::Value {
    if !ref_name.is_empty() {
        desc["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": ref_name});
    }
    desc
}

fn append(b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(MTIME);
    b.append_data(&mut h, name, data).unwrap();
}

pub fn write_blob(dir: &Path, bytes: &[u8], media_type: &str) -> serde_json::Value {
    let d = sha256(bytes);
    fs::write(dir.join("blobs/sha256").join(hex_of(&d)), bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": d, "size": bytes.len()})
}

/// Tars a directory (an OCI layout) into an archive file.
pub fn tar_dir(dir: &Path, out: &Path, gzip_all: bool) {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    let bytes = b.into_inner().unwrap();
    fs::write(out, if gzip_all { gzip(&bytes) } else { bytes }).unwrap();
}

/// Every path under `root` with its kind and size: a store snapshot.
pub fn snapshot(root: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            out.push(format!(
                "{rel} {:?} {}",
                m.file_type(),
                if m.is_file() { m.len() } else { 0 }
            ));
            if m.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// A `docker-registry` on 127.0.0.1:<free port>, killed on drop.
pub struct Registry {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; with `htpasswd` (user, password) it requires
    /// basic auth.
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        require("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let auth = match htpasswd {
            Some((user, password)) => {
                let hash = bcrypt::hash(password, 5).unwrap();
                let path = dir.path().join("htpasswd");
                fs::write(&path, format!("{user}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: corral-test\n    path: {}\n",
                    path.display()
                )
            }
            None => String::new(),
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {addr}\n{auth}",
            dir.path().join("storage").display()
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).unwrap();
        let log = dir.path().join("registry.log");
        let out = fs::File::create(&log).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start docker-registry ({e}): {INSTALL_HINT}"));
        let mut reg = Registry {
            child,
            addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = reg.child.try_wait() {
                panic!(
                    "docker-registry exited with {status}: {}",
                    fs::read_to_string(&reg.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        reg
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Pushes an OCI layout dir's `tag` with skopeo to `repo:tag`.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<(&str, &str)>) {
        require("skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.arg("--insecure-policy")
            .arg("copy")
            .arg("--all")
            .arg("--dest-tls-verify=false");
        if let Some((u, p)) = creds {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr))
            .output()
            .unwrap_or_else(|e| panic!("cannot run skopeo ({e}): {INSTALL_HINT}"));
        assert!(
            out.status.success(),
            "skopeo copy failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
