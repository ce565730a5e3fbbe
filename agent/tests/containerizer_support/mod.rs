//! Helpers for the containerizer tests: a busybox rootfs, a per-test
//! containerizer with its own cgroup root and temp dir, and the checks that
//! nothing is left behind (processes, cgroups in any hierarchy, mounts) —
//! run by `Env::finish`, and the cleanup also by `Drop` when a test fails.

#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_agent::containerizer::{
    Container, ContainerExit, ContainerSpec, Containerizer, IsolationConfig, Output, RootFs,
};

/// How long any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// Fails (never skips) when the tests cannot run here.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the containerizer tests need root (cgroups, namespaces, mounts): \
         run them as root, e.g. `sudo -E cargo test -p corral-agent --test containerizer`"
    );
    assert!(
        Path::new("/bin/busybox").is_file(),
        "the containerizer tests need a static busybox at /bin/busybox: \
         `apt-get install -y busybox-static`"
    );
}

/// Copies /bin/busybox into `dir/rootfs` with one symlink per applet
/// (what `busybox --install -s` does), plus the usual empty directories.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root", "mnt",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list-full")
        .output()
        .unwrap();
    assert!(out.status.success(), "busybox --list-full failed");
    for applet in String::from_utf8(out.stdout).unwrap().lines() {
        let link = root.join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/tmp:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    root
}

/// One test's world: a temp dir, a busybox rootfs in it, and a
/// containerizer on a cgroup root of its own.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub cgroup_root: String,
    pub cz: Arc<Containerizer>,
    overlays: usize,
}

impl Env {
    pub fn new(test: &str) -> Env {
        Env::with_config(test, |_| {})
    }

    pub fn with_config(test: &str, tweak: impl FnOnce(&mut IsolationConfig)) -> Env {
        require_root();
        let cgroup_root = format!("corral-test-{}-{test}", std::process::id());
        let mut config = IsolationConfig {
            cgroup_root: cgroup_root.clone(),
            ..IsolationConfig::default()
        };
        tweak(&mut config);
        let cz = Containerizer::new(config).unwrap_or_else(|e| {
            panic!("the containerizer tests need working cgroups and namespaces: {e}")
        });
        let dir = tempfile::Builder::new()
            .prefix("corral-cz-test-")
            .tempdir()
            .unwrap();
        let rootfs = busybox_rootfs(dir.path());
        Env {
            dir,
            rootfs,
            cgroup_root,
            cz: Arc::new(cz),
            overlays: 0,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A fresh overlay over the busybox rootfs (fresh upper/work/target).
    pub fn overlay(&mut self) -> RootFs {
        self.overlays += 1;
        let base = self.path(&format!("ovl-{}", self.overlays));
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        RootFs::Overlay {
            lower: vec![self.rootfs.clone()],
            upper: base.join("upper"),
            work: base.join("work"),
            target: base.join("merged"),
        }
    }

    /// A spec over a fresh overlay; stdout/stderr go to files named after
    /// the id.
    pub fn spec(&mut self, id: &str, argv: &[&str]) -> ContainerSpec {
        let rootfs = self.overlay();
        self.spec_on(id, argv, rootfs)
    }

    pub fn spec_on(&self, id: &str, argv: &[&str], rootfs: RootFs) -> ContainerSpec {
        let out = |suffix: &str| -> OwnedFd {
            File::create(self.path(&format!("{id}.{suffix}")))
                .unwrap()
                .into()
        };
        ContainerSpec {
            id: id.to_string(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![
                ("PATH".into(), "/bin:/sbin:/usr/bin:/usr/sbin".into()),
                ("HOME".into(), "/root".into()),
            ],
            cwd: "/".into(),
            rootfs,
            hostname: format!("ctr-{id}"),
            mounts: vec![],
            user: None,
            cpus_milli: 1000,
            mem_bytes: 64 << 20,
            output: Output::Fds {
                stdout: out("stdout"),
                stderr: out("stderr"),
            },
            state_dir: None,
            netns: None,
        }
    }

    pub fn stdout(&self, id: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{id}.stdout"))).unwrap_or_default()
    }

    pub fn stderr(&self, id: &str) -> String {
        std::fs::read_to_string(self.path(&format!("{id}.stderr"))).unwrap_or_default()
    }

    /// Launches, waits (bounded), destroys; returns the exit and stdout.
    pub async fn run(&self, spec: ContainerSpec) -> (ContainerExit, String) {
        let id = spec.id.clone();
        let c = self
            .cz
            .launch(&spec)
            .unwrap_or_else(|e| panic!("launch {id}: {e}"));
        let exit = wait(&c).await;
        c.destroy().unwrap();
        let out = self.stdout(&id);
        assert!(
            exit.code == Some(0),
            "{id} failed: {exit:?}\nstdout:\n{out}\nstderr:\n{}",
            self.stderr(&id)
        );
        (exit, out)
    }

    /// Every container cgroup, the cgroup root, mounts and processes are
    /// gone. Call at the end of each test.
    pub fn finish(self) {
        assert_eq!(
            self.cz.list().unwrap(),
            Vec::<String>::new(),
            "containers left"
        );
        self.cz.remove_root().unwrap();
        assert_clean(&self.cgroup_root, self.dir.path());
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Also runs after `finish` (then there is nothing to do) and when a
        // test panicked: never leave processes or cgroups behind.
        for id in self.cz.list().unwrap_or_default() {
            let _ = self.cz.destroy(&id);
        }
        let _ = self.cz.remove_root();
    }
}

/// Mount points of every cgroup hierarchy (v1 and v2) on this host.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let point = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(point))
        })
        .collect()
}

/// No cgroup dir named `root` in any hierarchy, no mount under `dir`, no
/// process in a cgroup under `root`.
pub fn assert_clean(root: &str, dir: &Path) {
    let mounts = cgroup_mounts();
    assert!(!mounts.is_empty(), "no cgroup hierarchies found");
    for m in mounts {
        assert!(
            !m.join(root).exists(),
            "cgroup {} left behind",
            m.join(root).display()
        );
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.to_string_lossy();
    assert!(
        !mountinfo.contains(dir.as_ref()),
        "mounts left under {dir}:\n{mountinfo}"
    );
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Ok(cg) = std::fs::read_to_string(entry.path().join("cgroup")) {
            assert!(
                !cg.contains(&format!("/{root}/")),
                "process {} still in {root}: {cg}",
                name.to_string_lossy()
            );
        }
    }
}

pub async fn wait(c: &Container) -> ContainerExit {
    tokio::time::timeout(WAIT, c.wait())
        .await
        .unwrap_or_else(|_| panic!("{} did not end within {WAIT:?}", c.id))
        .unwrap()
}

/// Polls `f` until it returns `Some` (bounded by [`WAIT`]).
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Whether a host pid is alive (not a zombie, not gone).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}
