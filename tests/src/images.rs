//! Test images built from the host's `busybox-static`, written as OCI
//! image-layout archives (what `corral image import` and `skopeo` read).

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Where Debian's busybox-static puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Fails with what to install when busybox-static is missing.
pub fn require_busybox() {
    let ok = std::fs::metadata(BUSYBOX).is_ok_and(|m| m.is_file());
    assert!(
        ok,
        "{BUSYBOX} is missing: apt-get install busybox-static (the container tests build their images from it)"
    );
}

/// One file of a layer.
pub enum Entry {
    File {
        path: String,
        data: Vec<u8>,
        mode: u32,
    },
    Dir {
        path: String,
        mode: u32,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn file(path: &str, data: &[u8]) -> Self {
        Entry::File {
            path: path.into(),
            data: data.to_vec(),
            mode: 0o644,
        }
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A layer tar from entries, written as given (no path checks: tests use it
/// to build hostile layers too).
pub fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::File { path, data, mode } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                set_path(&mut h, path);
                h.set_cksum();
                builder.append(&h, data.as_slice()).expect("tar file");
            }
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(*mode);
                set_path(&mut h, path);
                h.set_cksum();
                builder.append(&h, std::io::empty()).expect("tar dir");
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                set_path(&mut h, path);
                h.set_link_name_literal(target).expect("link name");
                h.set_cksum();
                builder.append(&h, std::io::empty()).expect("tar symlink");
            }
        }
    }
    builder.into_inner().expect("tar bytes")
}

/// Writes the name bytes as they are: `set_path` refuses `..`, and hostile
/// layers need exactly that.
fn set_path(h: &mut tar::Header, path: &str) {
    let name = &mut h.as_old_mut().name;
    let bytes = path.as_bytes();
    assert!(bytes.len() < name.len(), "test path too long: {path}");
    name.fill(0);
    name[..bytes.len()].copy_from_slice(bytes);
}

/// A base layer: busybox with a symlink per applet, and the usual dirs.
pub fn busybox_layer() -> Vec<u8> {
    require_busybox();
    let busybox = std::fs::read(BUSYBOX).expect("read busybox");
    let list = std::process::Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .expect("busybox --list");
    let mut entries = vec![
        Entry::Dir {
            path: "bin".into(),
            mode: 0o755,
        },
        Entry::File {
            path: "bin/busybox".into(),
            data: busybox,
            mode: 0o755,
        },
    ];
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            entries.push(Entry::Symlink {
                path: format!("bin/{applet}"),
                target: "busybox".into(),
            });
        }
    }
    for dir in ["dev", "proc", "sys", "mnt", "root", "etc", "var", "usr"] {
        entries.push(Entry::Dir {
            path: dir.into(),
            mode: 0o755,
        });
    }
    entries.push(Entry::Dir {
        path: "tmp".into(),
        mode: 0o1777,
    });
    entries.push(Entry::file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    ));
    entries.push(Entry::file("etc/group", b"root:x:0:\nnogroup:x:65534:\n"));
    layer(&entries)
}

/// What the image config says.
pub struct Config {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            entrypoint: Vec::new(),
            cmd: vec!["sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: String::new(),
        }
    }
}

/// Writes an OCI image-layout archive with `layers` (bottom first) to
/// `path`; `tag` becomes the `org.opencontainers.image.ref.name`.
pub fn write_oci_archive(path: &Path, layers: &[Vec<u8>], config: &Config, tag: &str) {
    let (archive, _) = oci_layout(layers, config, tag);
    std::fs::write(path, archive).expect("write OCI archive");
}

/// Writes an OCI image layout as a directory (what `skopeo copy oci:DIR`
/// reads).
pub fn write_oci_dir(dir: &Path, layers: &[Vec<u8>], config: &Config, tag: &str) {
    let (_, files) = oci_layout(layers, config, tag);
    for (name, data) in files {
        let p = dir.join(&name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, data).expect("write blob");
    }
}

fn oci_layout(layers: &[Vec<u8>], config: &Config, tag: &str) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for l in layers {
        let d = sha(l);
        diff_ids.push(format!("sha256:{d}"));
        layer_descs.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{d}"),
            "size": l.len(),
        }));
        files.push((format!("blobs/sha256/{d}"), l.clone()));
    }
    let mut cfg = serde_json::json!({
        "Env": config.env,
        "Cmd": config.cmd,
    });
    if !config.entrypoint.is_empty() {
        cfg["Entrypoint"] = serde_json::json!(config.entrypoint);
    }
    if !config.working_dir.is_empty() {
        cfg["WorkingDir"] = serde_json::json!(config.working_dir);
    }
    let config_blob = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("config json");
    let cd = sha(&config_blob);
    files.push((format!("blobs/sha256/{cd}"), config_blob.clone()));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{cd}"),
            "size": config_blob.len(),
        },
        "layers": layer_descs,
    }))
    .expect("manifest json");
    let md = sha(&manifest);
    files.push((format!("blobs/sha256/{md}"), manifest.clone()));
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{md}"),
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    }))
    .expect("index json");
    files.push(("index.json".into(), index));
    files.push((
        "oci-layout".into(),
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    ));

    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        builder
            .append_data(&mut h, name, data.as_slice())
            .expect("tar");
    }
    let mut out = builder.into_inner().expect("archive");
    out.flush().expect("flush");
    (out, files)
}
