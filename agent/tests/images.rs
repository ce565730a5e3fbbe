//! The image store: import of OCI layouts and `docker save` archives built
//! here from `/bin/busybox`, safe extraction, whiteouts, list/remove/gc,
//! crash recovery, pulls from a real `docker-registry` on 127.0.0.1
//! (pushed with skopeo), and the `Images` gRPC service. Runs as root
//! (whiteouts are device nodes, opaque dirs use a trusted xattr).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod images_support;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

use corral_agent::images::{ImageError, ImageStore, ImagesApi, OPAQUE_XATTR, RemoveReport};
use corral_proto::pb::{self, images_client::ImagesClient};
use images_support::*;

fn store(dir: &Path) -> ImageStore {
    ImageStore::open(dir.join("images"), Vec::new()).unwrap()
}

fn none() -> HashSet<String> {
    HashSet::new()
}

fn oci_archive(
    tmp: &Path,
    img: &TestImage,
    gzip_layers: bool,
    ref_name: &str,
) -> std::path::PathBuf {
    let layout = tmp.join(format!("layout-{}", hex_of(&img.id())));
    img.write_oci_layout(&layout, gzip_layers, ref_name);
    let out = tmp.join(format!("oci-{}.tar", hex_of(&img.id())));
    tar_dir(&layout, &out, false);
    out
}

fn assert_whiteout(p: &Path) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        m.file_type().is_char_device(),
        "{} is not a char device",
        p.display()
    );
    assert_eq!(m.rdev(), 0, "{} is not 0/0", p.display());
}

#[test]
fn oci_layout_import_resolves_layers_bottom_first_with_overlay_whiteouts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let img = TestImage::busybox();
    let archive = oci_archive(tmp.path(), &img, true, "latest");

    let out = s.import(&archive, Some("test/busybox:oci")).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].id, img.id());
    assert_eq!(out[0].references, ["docker.io/test/busybox:oci"]);
    assert_eq!(out[0].layers, 2);
    assert!(out[0].digest.as_deref().unwrap().starts_with("sha256:"));
    assert_eq!(out[0].created, "2024-05-01T12:00:00Z");
    assert!(out[0].size_bytes > busybox().len() as u64);

    let r = s.resolve("test/busybox:oci").unwrap();
    assert_eq!(r.id, img.id());
    assert_eq!(r.layer_ids, img.diff_ids());
    let (base, top) = (&r.layers[0], &r.layers[1]);
    // Short layer paths for overlay's lowerdir: <root>/l/<12 hex>.
    for l in &r.layers {
        assert_eq!(l.parent().unwrap(), s.root().join("l"));
        assert_eq!(l.file_name().unwrap().len(), 12);
    }

    // Bottom layer: busybox, symlinks kept as written, hardlink, modes,
    // owners, setuid, mtimes, the allowed /dev/null-style node.
    assert_eq!(fs::read(base.join("bin/busybox")).unwrap(), busybox());
    assert_eq!(
        fs::metadata(base.join("bin/busybox")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(
        fs::read_link(base.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_link(base.join("bin/ls")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(
        fs::read_link(base.join("usr/bin/env")).unwrap(),
        Path::new("../../bin/busybox")
    );
    let hl = fs::metadata(base.join("bin/busybox-hl")).unwrap();
    assert_eq!(
        hl.ino(),
        fs::metadata(base.join("bin/busybox")).unwrap().ino()
    );
    let suid = fs::metadata(base.join("opt/suid")).unwrap();
    assert_eq!(
        suid.mode() & 0o7777,
        0o4755,
        "setuid kept (no_new_privs at run time)"
    );
    assert_eq!((suid.uid(), suid.gid()), (1000, 1001));
    assert_eq!(suid.mtime(), MTIME as i64);
    assert_eq!(
        fs::metadata(base.join("etc")).unwrap().mtime(),
        MTIME as i64
    );
    let null = fs::symlink_metadata(base.join("dev-null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));

    // Top layer: whiteouts converted to overlayfs' format.
    assert_eq!(
        fs::read_to_string(top.join("hello.txt")).unwrap(),
        "hello from layer 2\n"
    );
    assert_whiteout(&top.join("etc/motd"));
    assert!(!top.join("etc/.wh.motd").exists());
    assert_eq!(
        xattr::get(top.join("opt/data"), OPAQUE_XATTR)
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    assert!(!top.join("opt/data/.wh..wh..opq").exists());
    assert!(top.join("opt/data/new.txt").is_file());
    assert_eq!(
        xattr::get(base.join("opt/data"), OPAQUE_XATTR).unwrap(),
        None
    );

    // Config round trip.
    assert_eq!(r.config.entrypoint, ENTRYPOINT);
    assert_eq!(r.config.cmd, CMD);
    assert_eq!(r.config.env, ENV);
    assert_eq!(r.config.working_dir, WORKDIR);
    assert_eq!(r.config.user, USER);

    // Every spelling resolves to the same image.
    for spelling in [
        "docker.io/test/busybox:oci".to_string(),
        "index.docker.io/test/busybox:oci".to_string(),
        img.id(),
        hex_of(&img.id())[..12].to_string(),
        format!("test/busybox@{}", out[0].digest.clone().unwrap()),
    ] {
        assert_eq!(s.resolve(&spelling).unwrap().id, img.id(), "{spelling}");
    }
    assert!(matches!(
        s.resolve("test/busybox"),
        Err(ImageError::NotFound(_))
    ));
    assert!(matches!(
        s.resolve("Not A Reference"),
        Err(ImageError::InvalidReference {
            field: "reference",
            ..
        })
    ));
    // The import left nothing behind in tmp/.
    assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn docker_save_archives_import_in_classic_and_oci_blob_layouts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let img = TestImage::busybox();

    // Classic layout (plain layers, a symlinked layer.tar), gzip outside.
    let classic = tmp.path().join("classic.tar.gz");
    img.write_docker_save(&classic, &["busybox:classic", "busybox:other"], true, true);
    let out = s.import(&classic, None).unwrap();
    assert_eq!(
        out[0].references,
        [
            "docker.io/library/busybox:classic",
            "docker.io/library/busybox:other"
        ]
    );
    assert_eq!(out[0].id, img.id());
    assert_eq!(out[0].digest, None);

    // Docker >= 25 layout with blobs/sha256: same image, same layers.
    let newer = tmp.path().join("newer.tar");
    img.write_docker_save(&newer, &["127.0.0.1:5000/busybox:new"], false, false);
    let out = s.import(&newer, None).unwrap();
    assert_eq!(out[0].id, img.id());
    assert!(
        out[0]
            .references
            .contains(&"127.0.0.1:5000/busybox:new".to_string())
    );

    let a = s.resolve("busybox:classic").unwrap();
    let b = s.resolve("127.0.0.1:5000/busybox:new").unwrap();
    assert_eq!(a, b, "one image, layers extracted once");
    assert_whiteout(&a.layers[1].join("etc/motd"));
    assert_eq!(fs::read_dir(s.root().join("l")).unwrap().count(), 2);
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].references.len(), 3);
}

#[test]
fn import_name_is_required_when_the_archive_names_none_and_overrides_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let img = TestImage::busybox();
    // skopeo-style layout: ref.name is only a tag.
    let archive = oci_archive(tmp.path(), &img, false, "latest");
    let err = s.import(&archive, None).unwrap_err();
    assert!(
        matches!(err, ImageError::InvalidReference { field: "name", .. }),
        "{err}"
    );
    let err = s.import(&archive, Some("Bad Name")).unwrap_err();
    assert!(
        matches!(err, ImageError::InvalidReference { field: "name", .. }),
        "{err}"
    );
    assert!(s.list().unwrap().is_empty());

    // A full reference in ref.name names the image; `name` overrides it.
    let named = oci_archive(tmp.path(), &img, false, "example.com/team/app:v1");
    assert_eq!(
        s.import(&named, None).unwrap()[0].references,
        ["example.com/team/app:v1"]
    );
    let docker = tmp.path().join("d.tar");
    img.write_docker_save(&docker, &["busybox:tagged"], false, false);
    // (The image is the one imported above, so it keeps that reference.)
    let refs = s.import(&docker, Some("renamed")).unwrap()[0]
        .references
        .clone();
    assert_eq!(
        refs,
        [
            "docker.io/library/renamed:latest",
            "example.com/team/app:v1"
        ]
    );
    assert!(matches!(
        s.resolve("busybox:tagged"),
        Err(ImageError::NotFound(_))
    ));
}

#[test]
fn remove_and_gc_keep_layers_other_images_or_containers_use() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let base = base_layer();
    let l2 = top_layer();
    let l3 = Layer::new().file("three.txt", b"3333", 0o644).finish();
    let a = TestImage::new(vec![base.clone(), l2.clone()]);
    let b = TestImage::new(vec![base.clone(), l3.clone()]);
    let (pa, pb) = (tmp.path().join("a.tar"), tmp.path().join("b.tar"));
    a.write_docker_save(&pa, &["a:1", "a:2"], false, false);
    b.write_docker_save(&pb, &["b:1"], false, false);
    s.import(&pa, None).unwrap();
    s.import(&pb, None).unwrap();
    assert_eq!(
        fs::read_dir(s.root().join("l")).unwrap().count(),
        3,
        "base shared"
    );
    let ra = s.resolve("a:1").unwrap();
    let rb = s.resolve("b:1").unwrap();
    assert_eq!(ra.layers[0], rb.layers[0]);

    // Another reference is left: nothing is removed.
    assert_eq!(s.remove("a:1", &none()).unwrap(), RemoveReport::default());
    assert_eq!(s.resolve("a:2").unwrap().id, a.id());
    assert!(matches!(s.resolve("a:1"), Err(ImageError::NotFound(_))));

    // Last reference: image A goes, its own layer goes, the base stays.
    let r = s.remove("a:2", &none()).unwrap();
    assert_eq!(r.layers_removed, 1);
    assert_eq!(
        r.bytes_freed,
        (19 + 4) + a.config.len() as u64,
        "hello.txt + new.txt + config"
    );
    assert!(!ra.layers[1].exists());
    assert!(ra.layers[0].exists());
    assert!(matches!(s.resolve(&a.id()), Err(ImageError::NotFound(_))));

    // B removed while a container still runs on its base layer.
    let in_use: HashSet<String> = [b.diff_ids()[0].clone()].into();
    let r = s.remove(&b.id(), &in_use).unwrap();
    assert_eq!(r.layers_removed, 1);
    assert_eq!(r.bytes_freed, 4 + b.config.len() as u64);
    assert!(rb.layers[0].exists(), "in-use layer kept");
    assert!(s.list().unwrap().is_empty());

    // gc with the same in_use keeps it; once unused it is collected.
    assert_eq!(s.gc(&in_use).unwrap(), RemoveReport::default());
    // In-use layers may also be given as the dirs `resolve` returned.
    let by_path: HashSet<String> = [rb.layers[0].display().to_string()].into();
    assert_eq!(s.gc(&by_path).unwrap(), RemoveReport::default());
    let r = s.gc(&none()).unwrap();
    assert_eq!(r.layers_removed, 1);
    let base_files = busybox().len() as u64 + 10 + 30 + 4 + 10;
    assert_eq!(r.bytes_freed, base_files);
    assert!(!rb.layers[0].exists());
    assert_eq!(fs::read_dir(s.root().join("l")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(s.root().join("layers")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(s.root().join("images")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    assert!(matches!(
        s.remove("a:1", &none()),
        Err(ImageError::NotFound(_))
    ));
}

#[test]
fn unsafe_layers_are_refused_and_the_store_is_left_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    // Something already in the store, to see it untouched.
    let good = tmp.path().join("good.tar");
    TestImage::busybox().write_docker_save(&good, &["good"], false, false);
    s.import(&good, None).unwrap();
    let before = snapshot(s.root());
    let listed = s.list().unwrap();

    let victim = tmp.path().join("victim-dir");
    fs::create_dir(&victim).unwrap();
    let victim_s = victim.display().to_string();

    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "dotdot",
            Layer::new().file("../evil", b"x", 0o644).finish(),
            "../evil",
            "'..'",
        ),
        (
            "dotdot-inside",
            Layer::new()
                .dir("a/")
                .file("a/../../evil", b"x", 0o644)
                .finish(),
            "a/../../evil",
            "'..'",
        ),
        (
            "absolute",
            Layer::new().file("/tmp/evil-abs", b"x", 0o644).finish(),
            "/tmp/evil-abs",
            "absolute",
        ),
        (
            "hardlink-absolute",
            Layer::new().hardlink("passwd", "/etc/passwd").finish(),
            "passwd",
            "absolute",
        ),
        (
            "hardlink-dotdot",
            Layer::new().hardlink("x", "../../etc/passwd").finish(),
            "x",
            "'..'",
        ),
        (
            "hardlink-missing",
            Layer::new().hardlink("x", "not/here").finish(),
            "x",
            "does not exist in the layer",
        ),
        (
            "symlink-escape",
            Layer::new().dir("a/").symlink("a/up", "../../etc").finish(),
            "a/up",
            "escapes the layer root",
        ),
        (
            "symlink-parent",
            Layer::new()
                .symlink("x", &victim_s)
                .file("x/pwned", b"pwned", 0o644)
                .finish(),
            "x/pwned",
            "is a symlink",
        ),
        (
            "symlink-parent-dir",
            Layer::new().symlink("y", &victim_s).dir("y/sub/").finish(),
            "y/sub/",
            "is a symlink",
        ),
        (
            "hardlink-through-symlink",
            Layer::new()
                .symlink("x", "/etc")
                .hardlink("pw", "x/passwd")
                .finish(),
            "pw",
            "through a symlink",
        ),
        (
            "block-device",
            Layer::new().device("sda", true, 8, 0).finish(),
            "sda",
            "block device",
        ),
        (
            "char-device",
            Layer::new().device("mem", false, 1, 1).finish(),
            "mem",
            "not allowed",
        ),
    ];
    for (what, bad, entry, reason) in cases {
        // The bad layer sits on top of a good one, so the good one has
        // been extracted when the bad one fails.
        let img = TestImage::new(vec![base_layer(), bad.clone()]);
        let path = tmp.path().join(format!("{what}.tar"));
        img.write_docker_save(&path, &[&format!("bad:{what}")], false, false);
        let err = s.import(&path, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ImageError::UnsafeEntry { .. }),
            "{what}: {msg}"
        );
        assert!(
            msg.contains(&format!("blobs/sha256/{}", hex_of(&sha256(&bad))))
                || msg.contains(&sha256(&bad)),
            "{what}: names the layer: {msg}"
        );
        assert!(
            msg.contains(&format!("'{entry}'")),
            "{what}: names the entry: {msg}"
        );
        assert!(msg.contains(reason), "{what}: {msg}");
        assert_eq!(snapshot(s.root()), before, "{what}: store changed");
        assert_eq!(s.list().unwrap(), listed);
        assert_eq!(
            fs::read_dir(&victim).unwrap().count(),
            0,
            "{what}: wrote outside"
        );
    }
    assert!(!Path::new("/tmp/evil-abs").exists());
}

#[test]
fn tampered_blobs_and_wrong_diff_ids_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let img = TestImage::busybox();

    // OCI layout whose top layer blob was changed after the manifest.
    let layout = tmp.path().join("tampered");
    img.write_oci_layout(&layout, true, "example.com/t:1");
    let top = sha256(&gzip(&img.layers[1]));
    let blob = layout.join("blobs/sha256").join(hex_of(&top));
    let mut bytes = fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let archive = tmp.path().join("tampered.tar");
    tar_dir(&layout, &archive, false);
    let err = s.import(&archive, None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&top), "{err}");

    // Classic docker save: the layer is not the one the config's diff_id
    // names (only the diff_id can catch it there).
    let other = TestImage::new(vec![base_layer(), top_layer()]);
    let mut swapped = other.clone();
    swapped.layers[1] = Layer::new().file("evil.txt", b"swapped", 0o644).finish();
    swapped.config = other.config.clone();
    let path = tmp.path().join("swapped.tar");
    swapped.write_docker_save(&path, &["swapped"], true, false);
    let err = s.import(&path, None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&other.diff_ids()[1]), "{err}");

    assert!(s.list().unwrap().is_empty());
    assert_eq!(fs::read_dir(s.root().join("l")).unwrap().count(), 0);
    assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
}

#[test]
fn gzip_and_plain_layers_and_archives_give_the_same_image() {
    let tmp = tempfile::tempdir().unwrap();
    let img = TestImage::busybox();
    let mut ids = Vec::new();
    for (i, (gz_layers, gz_all)) in [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let dir = tmp.path().join(format!("s{i}"));
        let s = store(&dir);
        let layout = dir.join("layout");
        img.write_oci_layout(&layout, gz_layers, "x.io/y:z");
        let archive = dir.join("a.tar");
        tar_dir(&layout, &archive, gz_all);
        let out = s.import(&archive, None).unwrap();
        let r = s.resolve("x.io/y:z").unwrap();
        assert_eq!(r.layer_ids, img.diff_ids());
        assert_eq!(
            fs::read(r.layers[0].join("bin/busybox")).unwrap(),
            busybox()
        );
        ids.push((out[0].id.clone(), out[0].size_bytes));
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
}

#[test]
fn open_cleans_crash_leftovers_and_refuses_a_second_store() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let img = TestImage::busybox();
    let archive = tmp.path().join("a.tar");
    img.write_docker_save(&archive, &["kept"], false, false);
    {
        let s = ImageStore::open(root.clone(), Vec::new()).unwrap();
        s.import(&archive, None).unwrap();
        assert!(matches!(
            ImageStore::open(root.clone(), Vec::new()),
            Err(ImageError::Locked { .. })
        ));
    }
    // What a crash mid-import or mid-commit leaves: a half-extracted temp
    // dir, a layer dir renamed into l/ without its record, a record
    // without its dir, an image whose layer is gone, a stray ref.
    fs::create_dir_all(root.join("tmp/import-1-0/layer-0/bin")).unwrap();
    fs::write(root.join("tmp/write-1-3"), b"partial").unwrap();
    fs::create_dir_all(root.join("l/0123456789ab/etc")).unwrap();
    let ghost = "f".repeat(64);
    fs::write(
        root.join(format!("layers/{ghost}.json")),
        format!(r#"{{"diff_id":"sha256:{ghost}","dir":"ffffffffffff","size_bytes":1}}"#),
    )
    .unwrap();
    let orphan_img = "e".repeat(64);
    fs::write(
        root.join(format!("images/{orphan_img}.json")),
        format!(
            r#"{{"id":"sha256:{orphan_img}","layers":["sha256:{ghost}"],"digest":null,"created":"","config":{{"entrypoint":[],"cmd":[],"env":[],"working_dir":"","user":""}},"config_size":2}}"#
        ),
    )
    .unwrap();
    fs::write(root.join("blobs/sha256").join(&orphan_img), b"{}").unwrap();
    let refs = fs::read_to_string(root.join("refs.json")).unwrap();
    let refs = refs.replacen(
        "\"refs\": {",
        &format!("\"refs\": {{\n    \"docker.io/library/ghost:latest\": \"sha256:{orphan_img}\","),
        1,
    );
    fs::write(root.join("refs.json"), refs).unwrap();

    let s = ImageStore::open(root.clone(), Vec::new()).unwrap();
    assert_eq!(fs::read_dir(root.join("tmp")).unwrap().count(), 0);
    assert!(!root.join("l/0123456789ab").exists());
    assert!(!root.join(format!("layers/{ghost}.json")).exists());
    assert!(!root.join(format!("images/{orphan_img}.json")).exists());
    assert!(!root.join("blobs/sha256").join(&orphan_img).exists());
    let list = s.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].references, ["docker.io/library/kept:latest"]);
    let r = s.resolve("kept").unwrap();
    assert_eq!(
        fs::read(r.layers[0].join("bin/busybox")).unwrap(),
        busybox()
    );
}

#[test]
fn oci_index_import_picks_linux_amd64() {
    let tmp = tempfile::tempdir().unwrap();
    let s = store(tmp.path());
    let amd64 = TestImage::busybox();
    let arm64 = TestImage::with_created(vec![top_layer()], "2020-01-01T00:00:00Z");
    let layout = tmp.path().join("multi");
    write_multi_arch(&layout, &amd64, &arm64, "x.io/multi:1");
    let archive = tmp.path().join("multi.tar");
    tar_dir(&layout, &archive, true);
    let out = s.import(&archive, None).unwrap();
    assert_eq!(out[0].id, amd64.id());
}

/// An OCI layout whose index entry is an image index with an arm64 and an
/// amd64 manifest.
fn write_multi_arch(dir: &Path, amd64: &TestImage, arm64: &TestImage, ref_name: &str) {
    let (arm, _) = arm64.write_oci_manifest(dir, true, Some(("linux", "arm64")));
    let (amd, _) = amd64.write_oci_manifest(dir, true, Some(("linux", "amd64")));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm, amd],
    });
    let desc = write_blob(
        dir,
        &serde_json::to_vec(&index).unwrap(),
        "application/vnd.oci.image.index.v1+json",
    );
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [with_annotation(desc, ref_name)],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

// ---- registry ----------------------------------------------------------

/// Pushes the busybox test image as `test/busybox:latest`.
fn push_busybox(reg: &Registry, tmp: &Path, creds: Option<(&str, &str)>) -> TestImage {
    let img = TestImage::busybox();
    let layout = tmp.join("push-layout");
    img.write_oci_layout(&layout, true, "latest");
    reg.push(&layout, "latest", "test/busybox", creds);
    img
}

fn blob_gets(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("\"GET /v2/test/busybox/blobs/sha256:"))
        .count()
}

fn manifest_gets(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("\"GET /v2/test/busybox/manifests/"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_from_an_insecure_registry_downloads_once_for_concurrent_pulls() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    let img = push_busybox(&reg, tmp.path(), None);
    let s = Arc::new(ImageStore::open(tmp.path().join("images"), vec![reg.host()]).unwrap());
    let reference = format!("{}/test/busybox:latest", reg.host());
    let log_before = reg.log();

    // Eight tasks released together by a barrier: the first starts the
    // pull, the others join it (they find its entry in the in-flight map)
    // and all get its result.
    let n = 8;
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (s, r, b) = (Arc::clone(&s), reference.clone(), Arc::clone(&barrier));
        tasks.push(tokio::spawn(async move {
            b.wait().await;
            s.pull(&r, None).await
        }));
    }
    for t in tasks {
        let summary = t.await.unwrap().unwrap();
        assert_eq!(summary.id, img.id());
        assert_eq!(summary.references, [reference.as_str()]);
        assert!(summary.digest.is_some());
    }
    // One download: the store counted one pull, one manifest and three
    // blobs (config + 2 layers), and so did the registry's access log.
    let stats = s.pull_stats();
    assert_eq!(stats.pulls_started, 1, "{stats:?}");
    assert_eq!(stats.manifests_fetched, 1, "{stats:?}");
    assert_eq!(stats.blobs_fetched, 3, "{stats:?}");
    // The registry writes an access-log line after it sent the response,
    // so the last line may trail the client a little: wait for it.
    let deadline = std::time::Instant::now() + WAIT;
    let log = loop {
        let log = reg.log()[log_before.len()..].to_string();
        if blob_gets(&log) >= 3 || std::time::Instant::now() > deadline {
            break log;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(blob_gets(&log), 3, "registry log:\n{log}");
    assert_eq!(manifest_gets(&log), 1, "registry log:\n{log}");

    let r = s.resolve(&reference).unwrap();
    assert_eq!(
        fs::read_to_string(r.layers[1].join("hello.txt")).unwrap(),
        "hello from layer 2\n"
    );
    assert_whiteout(&r.layers[1].join("etc/motd"));
    assert_eq!(r.config.cmd, CMD);

    // A later pull of the same image fetches the manifest only.
    let again = s.pull(&reference, None).await.unwrap();
    assert_eq!(again.id, img.id());
    assert_eq!(s.pull_stats().blobs_fetched, 3);

    // By digest too, and unknown tags are NOT_FOUND.
    let by_digest = format!(
        "{}/test/busybox@{}",
        reg.host(),
        again.digest.clone().unwrap()
    );
    assert_eq!(s.pull(&by_digest, None).await.unwrap().id, img.id());
    let err = s
        .pull(&format!("{}/test/busybox:nope", reg.host()), None)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_resolves_a_manifest_list_to_linux_amd64() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    let amd64 = TestImage::busybox();
    let arm64 = TestImage::with_created(vec![top_layer()], "2020-01-01T00:00:00Z");
    let layout = tmp.path().join("multi");
    write_multi_arch(&layout, &amd64, &arm64, "latest");
    reg.push(&layout, "latest", "test/multi", None);
    let s = ImageStore::open(tmp.path().join("images"), vec![reg.host()]).unwrap();
    let out = s
        .pull(&format!("{}/test/multi", reg.host()), None)
        .await
        .unwrap();
    assert_eq!(out.id, amd64.id());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_uses_https_unless_the_registry_is_listed_insecure() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(None);
    push_busybox(&reg, tmp.path(), None);
    let s = ImageStore::open(tmp.path().join("images"), Vec::new()).unwrap();
    let err = s
        .pull(&format!("{}/test/busybox", reg.host()), None)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ImageError::Unreachable {
                scheme: "https",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("https") && msg.contains("insecure registries"),
        "{msg}"
    );
    assert!(s.list().unwrap().is_empty());

    // Nothing listens: unreachable over http too.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let s2 = ImageStore::open(tmp.path().join("images2"), vec![closed.clone()]).unwrap();
    let err = s2.pull(&format!("{closed}/x/y"), None).await.unwrap_err();
    assert!(
        matches!(err, ImageError::Unreachable { scheme: "http", .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_with_basic_auth_needs_the_right_credentials() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Some(("corral", "s3cret")));
    let img = push_busybox(&reg, tmp.path(), Some(("corral", "s3cret")));
    let s = ImageStore::open(tmp.path().join("images"), vec![reg.host()]).unwrap();
    let reference = format!("{}/test/busybox:latest", reg.host());

    let err = s.pull(&reference, None).await.unwrap_err();
    assert!(
        matches!(err, ImageError::Unauthorized { .. }),
        "missing: {err}"
    );
    let wrong = Some(("corral".to_string(), "wrong".to_string()));
    let err = s.pull(&reference, wrong).await.unwrap_err();
    assert!(
        matches!(err, ImageError::Unauthorized { .. }),
        "wrong: {err}"
    );
    assert!(s.list().unwrap().is_empty());

    let right = Some(("corral".to_string(), "s3cret".to_string()));
    let out = s.pull(&reference, right).await.unwrap();
    assert_eq!(out.id, img.id());
    assert!(
        s.resolve(&reference).unwrap().layers[0]
            .join("bin/busybox")
            .is_file()
    );
}

// ---- gRPC --------------------------------------------------------------

async fn serve(
    api: ImagesApi,
) -> (
    ImagesClient<tonic::transport::Channel>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(api.into_server())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let client = ImagesClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    (client, server)
}

fn chunks(bytes: &[u8], name: &str) -> Vec<pb::ImageChunk> {
    bytes
        .chunks(64 * 1024)
        .enumerate()
        .map(|(i, c)| pb::ImageChunk {
            name: if i == 0 {
                name.to_string()
            } else {
                String::new()
            },
            data: c.to_vec(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_import_streams_chunks_then_lists_and_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Arc::new(store(tmp.path()));
    let img = TestImage::busybox();
    let in_use = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let seen = Arc::clone(&in_use);
    let api = ImagesApi::new(
        Arc::clone(&s),
        Arc::new(move || seen.lock().unwrap().clone()),
    );
    let (mut client, server) = serve(api.clone()).await;

    let archive = oci_archive(tmp.path(), &img, true, "latest");
    let bytes = fs::read(&archive).unwrap();
    assert!(bytes.len() > 10 * 64 * 1024, "several chunks");
    let resp = client
        .import_image(tokio_stream::iter(chunks(&bytes, "grpc/busybox:1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.images.len(), 1);
    assert_eq!(resp.images[0].id, img.id());
    assert_eq!(resp.images[0].references, ["docker.io/grpc/busybox:1"]);

    let list = client
        .list_images(pb::ListImagesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.images.len(), 1);
    assert_eq!(list.images[0].layers, 2);

    // Errors map to statuses naming the field.
    let st = client
        .import_image(tokio_stream::iter(chunks(&bytes, "Bad Name")))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("name"), "{st:?}");
    let st = client
        .remove_image(pb::RemoveImageRequest {
            reference: "nope:1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::NotFound);
    let st = client
        .pull_image(pb::PullImageRequest {
            reference: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument);
    assert!(st.message().contains("reference"), "{st:?}");

    // The in-use callback protects a running container's layers.
    in_use.lock().unwrap().insert(img.diff_ids()[0].clone());
    let removed = client
        .remove_image(pb::RemoveImageRequest {
            reference: "grpc/busybox:1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.layers_removed, 1);
    assert!(removed.bytes_freed > 0);
    assert_eq!(fs::read_dir(s.root().join("l")).unwrap().count(), 1);
    let list = client
        .list_images(pb::ListImagesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(list.images.is_empty());
    server.abort();

    // A capped service refuses a larger upload and keeps nothing of it.
    let (mut small, server) = serve(api.with_max_import_bytes(100 * 1024)).await;
    let st = small
        .import_image(tokio_stream::iter(chunks(&bytes, "grpc/busybox:2")))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert_eq!(fs::read_dir(s.root().join("tmp")).unwrap().count(), 0);
    server.abort();
}
