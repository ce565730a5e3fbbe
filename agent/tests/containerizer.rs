//! The containerizer against the real kernel: namespaces, cgroup limits,
//! root filesystems, hardening, signals, cleanup. Needs root, cgroups and
//! /bin/busybox; fails (never skips) without them.
//!
//! Each test has its own cgroup root and temp dir, and `Env::finish`
//! checks that no process, cgroup (in any hierarchy) or mount is left;
//! `Env`'s `Drop` cleans up when a test fails half-way.

#![allow(clippy::unwrap_used)]

mod containerizer_support;

use std::path::Path;
use std::time::{Duration, Instant};

use containerizer_support::{Env, alive, eventually, wait};
use corral_agent::containerizer::{BindMount, ContainerError, RootFs};

const SH: &str = "/bin/sh";

#[tokio::test]
async fn pid_namespace_shows_only_the_container_and_pid_1_is_the_init() {
    let mut env = Env::new("pidns");
    // The test process (the "agent") must not be signalable from inside.
    let script = format!(
        "ps -o pid,comm; echo cmdline=$(cat /proc/1/cmdline); \
         echo ns=$(readlink /proc/self/ns/pid); echo self=$$; \
         if kill -0 {} 2>/dev/null; then echo agent=visible; else echo agent=invisible; fi",
        std::process::id()
    );
    let spec = env.spec("ps", &[SH, "-c", &script]);
    let (_, out) = env.run(spec).await;
    assert!(out.contains("agent=invisible\n"), "{out}");
    let rows: Vec<&str> = out
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("cmdline="))
        .collect();
    assert!(rows.len() <= 3, "only init, sh and ps: {out}");
    let init = rows
        .iter()
        .find(|r| r.split_whitespace().next() == Some("1"))
        .unwrap_or_else(|| panic!("no pid 1: {out}"));
    assert!(init.contains("corral-init"), "pid 1 is our init: {out}");
    assert!(out.contains("cmdline=corral-init"), "{out}");
    assert!(out.contains("self=2\n"), "the command is pid 2: {out}");
    let host_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    let line = out.lines().find(|l| l.starts_with("ns=")).unwrap();
    assert_ne!(line, format!("ns={}", host_ns.display()), "new pid ns");
    env.finish();
}

#[tokio::test]
async fn the_init_holds_only_stdio_and_its_socket_to_the_agent() {
    let mut env = Env::new("initfds");
    let spec = env.spec("fds", &["sleep", "1000"]);
    let c = env.cz.launch(&spec).unwrap();
    let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{}/fd", c.pid))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let target = std::fs::read_link(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().parse().unwrap(),
                target.to_string_lossy().into_owned(),
            )
        })
        .collect();
    fds.sort();
    let stdout = env.path("fds.stdout").display().to_string();
    let stderr = env.path("fds.stderr").display().to_string();
    assert_eq!(fds.len(), 4, "{fds:?}");
    assert_eq!(fds[0], (0, "/dev/null".to_string()));
    assert_eq!(fds[1], (1, stdout));
    assert_eq!(fds[2], (2, stderr));
    assert!(fds[3].1.starts_with("socket:"), "{fds:?}");
    // The init is not dumpable, and names itself.
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.pid)).unwrap();
    assert!(status.starts_with("Name:\tcorral-init\n"), "{status}");
    c.destroy().unwrap();
    env.finish();
}

/// A fresh network namespace, held by an fd only: the thread that made it
/// ends, and the namespace goes once the fd and its users are gone.
fn new_netns() -> std::os::fd::OwnedFd {
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::fs::File::open("/proc/thread-self/ns/net")
            .unwrap()
            .into()
    })
    .join()
    .unwrap()
}

#[tokio::test]
async fn containers_given_a_network_namespace_share_it_and_others_keep_the_hosts() {
    use std::os::unix::fs::MetadataExt;
    let mut env = Env::new("netns");
    let netns = new_netns();
    let inode = std::fs::File::from(netns.try_clone().unwrap())
        .metadata()
        .unwrap()
        .ino();
    let host = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_ne!(inode, host);
    let mut outs = Vec::new();
    for id in ["pod-a", "pod-b"] {
        let mut spec = env.spec(id, &["readlink", "/proc/self/ns/net"]);
        spec.netns = Some(netns.try_clone().unwrap());
        outs.push(env.run(spec).await.1);
    }
    assert_eq!(outs, vec![format!("net:[{inode}]\n"); 2]);
    let spec = env.spec("alone", &["readlink", "/proc/self/ns/net"]);
    let (_, out) = env.run(spec).await;
    assert_eq!(
        out,
        format!("net:[{host}]\n"),
        "no netns: the host's network"
    );
    env.finish();
}

#[tokio::test]
async fn hostname_is_the_containers_own() {
    let mut env = Env::new("uts");
    let spec = env.spec("hn", &["hostname"]);
    let (_, out) = env.run(spec).await;
    assert_eq!(out.trim(), "ctr-hn");
    assert_ne!(
        out.trim(),
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap()
            .trim()
    );
    env.finish();
}

#[tokio::test]
async fn hardening_no_new_privs_docker_caps_masks_and_read_only_proc() {
    let mut env = Env::new("harden");
    let script = r#"
        grep -E '^(NoNewPrivs|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' /proc/self/status
        if mount -t tmpfs none /mnt 2>/dev/null; then echo mount=allowed; else echo mount=denied; fi
        if echo x > /proc/sys/kernel/hostname 2>/dev/null; then echo procsys=writable; else echo procsys=readonly; fi
        if echo x > /proc/sysrq-trigger 2>/dev/null; then echo sysrq=writable; else echo sysrq=readonly; fi
        if mkdir /sys/corral 2>/dev/null; then echo sys=writable; else echo sys=readonly; fi
        if echo x > /proc/1/exe 2>/dev/null; then echo initexe=writable; else echo initexe=denied; fi
        if ls /proc/1/root/ >/dev/null 2>&1; then echo initroot=visible; else echo initroot=denied; fi
        if cat /proc/1/environ >/dev/null 2>&1; then echo initenv=visible; else echo initenv=denied; fi
        for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/latency_stats /proc/timer_stats; do
            [ -e $p ] && echo "file $p bytes=$(cat $p 2>/dev/null | wc -c)"
        done
        for d in /proc/acpi /proc/scsi /proc/asound /sys/firmware /sys/devices/virtual/powercap; do
            [ -d $d ] && echo "dir $d entries=$(ls -A $d | wc -l)"
        done
        echo fds=$(ls /proc/self/fd | tr '\n' ' ')
    "#;
    let spec = env.spec("h", &[SH, "-c", script]);
    let (_, out) = env.run(spec).await;
    let has = |line: &str| out.lines().any(|l| l.trim() == line);
    assert!(has("NoNewPrivs:\t1"), "{out}");
    assert!(has("CapEff:\t00000000a80425fb"), "{out}");
    assert!(has("CapPrm:\t00000000a80425fb"), "{out}");
    assert!(has("CapBnd:\t00000000a80425fb"), "{out}");
    assert!(has("CapAmb:\t0000000000000000"), "{out}");
    for expect in [
        "mount=denied",
        "procsys=readonly",
        "sysrq=readonly",
        "sys=readonly",
        "initexe=denied",
        "initroot=denied",
        "initenv=denied",
    ] {
        assert!(has(expect), "{expect}: {out}");
    }
    // These exist and are non-empty on the host; masked they read empty.
    assert!(out.contains("file /proc/timer_list bytes=0"), "{out}");
    assert!(out.contains("file /proc/keys bytes=0"), "{out}");
    assert!(out.contains("dir /sys/firmware entries=0"), "{out}");
    for line in out
        .lines()
        .filter(|l| l.starts_with("file ") || l.starts_with("dir "))
    {
        assert!(line.ends_with("=0"), "not masked: {line}");
    }
    // Only stdio (and ls's own directory fd) reach the command.
    let fds = out.lines().find(|l| l.starts_with("fds=")).unwrap();
    let fds: Vec<u32> = fds[4..]
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    assert!(fds.iter().all(|fd| *fd <= 3), "leaked fds: {fds:?}");
    env.finish();
}

#[tokio::test]
async fn oom_kill_is_reported_and_the_sibling_keeps_running() {
    let mut env = Env::new("oom");
    let sibling_spec = env.spec("sibling", &["sleep", "1000"]);
    let sibling = env.cz.launch(&sibling_spec).unwrap();
    let mut hog_spec = env.spec(
        "hog",
        // dd allocates its 64 MiB buffer and fills it: twice the limit.
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    hog_spec.mem_bytes = 32 << 20;
    let hog = env.cz.launch(&hog_spec).unwrap();
    let exit = wait(&hog).await;
    assert!(exit.oom_killed, "{exit:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    assert_eq!(exit.mem_limit_bytes, 32 << 20);
    hog.destroy().unwrap();

    assert!(alive(sibling.pid), "the sibling's init is alive");
    assert!(
        tokio::time::timeout(Duration::from_millis(1), sibling.wait())
            .await
            .is_err(),
        "the sibling is still running"
    );
    assert_eq!(sibling.usage().unwrap().pids, 2, "init + sleep");
    sibling.terminate().unwrap();
    let exit = wait(&sibling).await;
    assert_eq!(exit.signal, Some(libc::SIGTERM));
    assert!(!exit.oom_killed);
    sibling.destroy().unwrap();
    env.finish();
}

#[tokio::test]
async fn fork_bomb_stops_at_the_pids_limit_and_is_killable() {
    let mut env = Env::with_config("forkbomb", |c| c.pids_limit = 32);
    // The bomb runs in a background subshell; the command itself stays
    // alive as `sleep`.
    let spec = env.spec(
        "bomb",
        &[
            SH,
            "-c",
            "(b() { b | b & }; b) 2>/dev/null & exec sleep 1000",
        ],
    );
    let c = env.cz.launch(&spec).unwrap();
    // pids.events counts forks refused at pids.max.
    let hierarchy = if env.cz.cgroup_v2() {
        "/sys/fs/cgroup"
    } else {
        "/sys/fs/cgroup/pids"
    };
    let events = Path::new(hierarchy)
        .join(&env.cgroup_root)
        .join("bomb/pids.events");
    let mut max_seen = 0;
    eventually("the bomb to hit the pids limit", || {
        let pids = c.usage().unwrap().pids;
        max_seen = max_seen.max(pids);
        let refused = std::fs::read_to_string(&events)
            .unwrap()
            .trim()
            .strip_prefix("max ")
            .map_or(0, |n| n.parse::<u64>().unwrap());
        async move { (refused > 0).then_some(()) }
    })
    .await;
    assert!(max_seen <= 32, "never above pids.max: saw {max_seen}");
    c.kill().unwrap();
    let exit = wait(&c).await;
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit:?}");
    let pid = c.pid;
    c.destroy().unwrap();
    assert!(!alive(pid));
    env.finish();
}

#[tokio::test]
async fn cpu_quota_caps_a_busy_loop_at_half_a_core() {
    let mut env = Env::new("cpu");
    let mut spec = env.spec("spin", &[SH, "-c", "while :; do :; done"]);
    spec.cpus_milli = 500;
    let c = env.cz.launch(&spec).unwrap();
    let cpu = |c: &corral_agent::containerizer::Container| {
        let u = c.usage().unwrap();
        u.cpu_user_seconds + u.cpu_system_seconds
    };
    eventually("the loop to run", || {
        let used = cpu(&c);
        async move { (used > 0.05).then_some(()) }
    })
    .await;
    // A measurement window, not a wait for a condition: 2 s = 20 CFS
    // periods. The window is taken from before the first sample to after
    // the last, so a test thread preempted while sampling (other tests
    // run in parallel) can only lower the figure, never inflate it.
    let t0 = Instant::now();
    let u0 = cpu(&c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let u1 = cpu(&c);
    let t1 = Instant::now();
    let cores = (u1 - u0) / (t1 - t0).as_secs_f64();
    eprintln!("cpus=0.5 busy loop: {cores:.3} cores over {:?}", t1 - t0);
    let usage = c.usage().unwrap();
    assert!(cores <= 0.55, "used {cores:.3} cores with cpus=0.5");
    assert!(cores >= 0.2, "the loop barely ran: {cores:.3} cores");
    assert!(usage.cpu_throttled_periods > 0, "{usage:?}");
    assert!(usage.cpu_throttled_seconds > 0.0, "{usage:?}");
    assert_eq!(usage.mem_limit_bytes, 64 << 20);
    assert!(usage.mem_rss_bytes + usage.mem_cache_bytes > 0, "{usage:?}");
    c.kill().unwrap();
    wait(&c).await;
    c.destroy().unwrap();
    env.finish();
}

#[tokio::test]
async fn overlay_reads_the_lower_layer_and_writes_only_to_the_upper() {
    let mut env = Env::new("overlay");
    std::fs::write(env.rootfs.join("etc/lower-only"), "from-lower\n").unwrap();
    let rootfs = env.overlay();
    let RootFs::Overlay { upper, target, .. } = rootfs.clone() else {
        unreachable!()
    };
    let spec = env.spec_on(
        "ovl",
        &[
            SH,
            "-c",
            "cat /etc/lower-only && echo new > /new-file && echo changed > /etc/lower-only \
             && rm /bin/ls && cat /proc/self/mountinfo",
        ],
        rootfs,
    );
    let (_, out) = env.run(spec).await;
    assert!(out.starts_with("from-lower\n"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(" / / ") && l.contains("overlay")),
        "{out}"
    );
    // The lower layer is untouched; the writes are in the upper layer.
    assert_eq!(
        std::fs::read_to_string(env.rootfs.join("etc/lower-only")).unwrap(),
        "from-lower\n"
    );
    assert!(!env.rootfs.join("new-file").exists());
    assert!(env.rootfs.join("bin/ls").symlink_metadata().is_ok());
    assert_eq!(
        std::fs::read_to_string(upper.join("new-file")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/lower-only")).unwrap(),
        "changed\n"
    );
    // Nothing was ever mounted on the host: the target is still empty.
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);
    env.finish();
}

#[tokio::test]
async fn host_rootfs_runs_host_binaries_with_a_fresh_proc() {
    let env = Env::new("host");
    let spec = env.spec_on("true", &["/bin/true"], RootFs::Host);
    env.run(spec).await;
    let spec = env.spec_on(
        "procs",
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "echo n=$(ls /proc | grep -c '^[0-9]'); cat /proc/1/comm; hostname",
        ],
        RootFs::Host,
    );
    let (_, out) = env.run(spec).await;
    let n: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("n="))
        .unwrap()
        .parse()
        .unwrap();
    // init, sh, the $(...) subshell, ls, grep — the host has far more.
    let host = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    assert!(
        n <= 5 && host > 2 * n,
        "a fresh /proc for the new pid namespace: {out}"
    );
    assert!(out.contains("corral-init\nctr-procs"), "{out}");
    env.finish();
}

#[tokio::test]
async fn bind_mounts_are_read_only_or_writable_and_resolve_inside_the_root() {
    let mut env = Env::new("binds");
    let ro = env.path("ro-src");
    let rw = env.path("rw-src");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::write(ro.join("hello"), "hi\n").unwrap();
    let file = env.path("single.txt");
    std::fs::write(&file, "one file\n").unwrap();
    // An absolute symlink in the image: the target must resolve inside the
    // container root, never on the host.
    let escape = format!("/tmp/corral-escape-{}", std::process::id());
    std::os::unix::fs::symlink(format!("/../../..{escape}"), env.rootfs.join("data-link")).unwrap();
    let mut spec = env.spec(
        "binds",
        &[
            SH,
            "-c",
            "cat /ro/hello; cat /etc/conf/single.txt; \
             if echo x > /ro/new 2>/dev/null; then echo ro=writable; else echo ro=readonly; fi; \
             echo y > /data-link/new && echo rw=ok",
        ],
    );
    spec.mounts = vec![
        BindMount {
            source: ro.clone(),
            target: "/ro".into(),
            read_only: true,
        },
        BindMount {
            source: file,
            target: "/etc/conf/single.txt".into(),
            read_only: true,
        },
        BindMount {
            source: rw.clone(),
            target: "/data-link".into(),
            read_only: false,
        },
    ];
    let (_, out) = env.run(spec).await;
    assert_eq!(out, "hi\none file\nro=readonly\nrw=ok\n");
    assert!(!ro.join("new").exists());
    assert_eq!(std::fs::read_to_string(rw.join("new")).unwrap(), "y\n");
    assert!(!Path::new(&escape).exists(), "the symlink escaped the root");
    env.finish();
}

#[tokio::test]
async fn a_non_root_user_runs_without_capabilities() {
    let mut env = Env::new("user");
    let mut spec = env.spec(
        "u",
        &[
            SH,
            "-c",
            "id -u; id -g; id -G; grep -E '^Cap(Eff|Prm|Amb):' /proc/self/status; \
             if mount -t tmpfs none /mnt 2>/dev/null; then echo mount=allowed; else echo mount=denied; fi",
        ],
    );
    spec.user = Some((1000, 1000));
    spec.cwd = "/tmp".into();
    let (_, out) = env.run(spec).await;
    assert_eq!(
        out,
        "1000\n1000\n1000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
         CapAmb:\t0000000000000000\nmount=denied\n"
    );
    env.finish();
}

#[tokio::test]
async fn exec_and_cwd_failures_are_launch_errors_and_leave_nothing() {
    let mut env = Env::new("execfail");
    let spec = env.spec("nope1", &["/bin/nope"]);
    let err = env.cz.launch(&spec).unwrap_err();
    assert!(matches!(err, ContainerError::Exec { .. }), "{err:?}");
    assert!(
        err.to_string()
            .ends_with("exec /bin/nope: No such file or directory"),
        "{err}"
    );
    let spec = env.spec("nope2", &["nope", "arg"]);
    let err = env.cz.launch(&spec).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("exec nope: No such file or directory"),
        "{err}"
    );
    let spec = env.spec("noexec", &["/etc/passwd"]);
    let err = env.cz.launch(&spec).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("exec /etc/passwd: Permission denied"),
        "{err}"
    );
    let mut spec = env.spec("nocwd", &["/bin/true"]);
    spec.cwd = "/does/not/exist".into();
    let err = env.cz.launch(&spec).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("chdir /does/not/exist: No such file or directory"),
        "{err}"
    );
    // CVE-2024-21626: no inherited fd can serve as the working directory.
    for n in 3..12 {
        let mut spec = env.spec(&format!("fdcwd{n}"), &["/bin/true"]);
        spec.cwd = format!("/proc/self/fd/{n}").into();
        let err = env.cz.launch(&spec).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("chdir /proc/self/fd/") || msg.contains("outside the container root"),
            "{msg}"
        );
    }
    let mut spec = env.spec("badmount", &["/bin/true"]);
    spec.mounts.push(BindMount {
        source: "/does/not/exist".into(),
        target: "/x".into(),
        read_only: false,
    });
    let err = env.cz.launch(&spec).unwrap_err();
    assert!(matches!(err, ContainerError::InvalidSpec { .. }), "{err:?}");
    env.finish();
}

#[tokio::test]
async fn a_taken_id_is_refused_and_the_running_container_is_untouched() {
    let mut env = Env::new("dupid");
    let spec = env.spec("same", &["sleep", "1000"]);
    let c = env.cz.launch(&spec).unwrap();
    let spec2 = env.spec("same", &["/bin/true"]);
    let err = env.cz.launch(&spec2).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(alive(c.pid));
    assert_eq!(c.usage().unwrap().pids, 2);
    c.destroy().unwrap();
    env.finish();
}

#[tokio::test]
async fn terminate_forwards_sigterm_to_the_command() {
    let mut env = Env::new("term");
    let spec = env.spec("sleeper", &["sleep", "1000"]);
    let c = env.cz.launch(&spec).unwrap();
    c.terminate().unwrap();
    let exit = wait(&c).await;
    assert_eq!((exit.code, exit.signal), (None, Some(libc::SIGTERM)));
    c.destroy().unwrap();

    // A command that traps SIGTERM reports its own exit.
    let spec = env.spec(
        "trapper",
        &[
            SH,
            "-c",
            "trap 'exit 42' TERM; echo ready; sleep 1000 & wait",
        ],
    );
    let c = env.cz.launch(&spec).unwrap();
    eventually("the trap to be installed", || {
        let ready = env.stdout("trapper").contains("ready");
        async move { ready.then_some(()) }
    })
    .await;
    c.terminate().unwrap();
    let exit = wait(&c).await;
    assert_eq!((exit.code, exit.signal), (Some(42), None));
    // `wait` can be called again and says the same.
    assert_eq!(c.wait().await.unwrap(), exit);
    c.destroy().unwrap();
    env.finish();
}

#[tokio::test]
async fn kill_ends_a_command_that_ignores_sigterm_and_all_its_children() {
    let mut env = Env::new("kill");
    let spec = env.spec(
        "stubborn",
        &[
            SH,
            "-c",
            "trap '' TERM; sleep 1000 & sleep 1000 & echo ready; wait",
        ],
    );
    let c = env.cz.launch(&spec).unwrap();
    eventually("the children to start", || {
        let ok = env.stdout("stubborn").contains("ready") && c.usage().unwrap().pids == 4;
        async move { ok.then_some(()) }
    })
    .await;
    c.terminate().unwrap();
    c.kill().unwrap();
    let exit = wait(&c).await;
    assert_eq!(
        exit.signal,
        Some(libc::SIGKILL),
        "SIGTERM was ignored: {exit:?}"
    );
    c.destroy().unwrap();
    env.finish();
}

#[tokio::test]
async fn dropping_a_container_kills_it_and_removes_its_cgroup() {
    let mut env = Env::new("drop");
    let spec = env.spec("dropped", &["sleep", "1000"]);
    let c = env.cz.launch(&spec).unwrap();
    let pid = c.pid;
    assert!(alive(pid));
    drop(c);
    assert!(!alive(pid));
    assert!(env.cz.list().unwrap().is_empty());
    env.finish();
}

#[tokio::test]
async fn orphans_are_listed_and_destroyed() {
    let mut env = Env::new("orphans");
    let mut pids = vec![];
    for id in ["orphan-a", "orphan-b"] {
        let spec = env.spec(id, &[SH, "-c", "sleep 1000 & sleep 1000"]);
        let c = env.cz.launch(&spec).unwrap();
        pids.push(c.pid);
        // As if the agent had crashed: the handle is gone, the container
        // is not.
        std::mem::forget(c);
    }
    assert_eq!(env.cz.list().unwrap(), vec!["orphan-a", "orphan-b"]);
    for id in env.cz.list().unwrap() {
        env.cz.destroy(&id).unwrap();
    }
    assert!(env.cz.list().unwrap().is_empty());
    for pid in pids {
        assert!(!alive(pid), "init {pid} survived");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "init {pid} left as a zombie"
        );
    }
    env.finish();
}

/// Launches from several threads at once (the agent calls `launch` from
/// blocking threads of a multi-threaded runtime), waits on all, stops all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_containers_start_and_stop_concurrently() {
    let mut env = Env::new("many");
    let specs: Vec<_> = (0..24)
        .map(|i| env.spec(&format!("m{i}"), &[SH, "-c", "echo hi; exec sleep 1000"]))
        .collect();
    let launches = specs.into_iter().map(|spec| {
        let cz = env.cz.clone();
        tokio::task::spawn_blocking(move || cz.launch(&spec))
    });
    let running: Vec<_> = futures::future::join_all(launches)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().unwrap())
        .collect();
    // Started means exec'd: the shell may not have printed yet, and a
    // SIGTERM before its `echo` would (rightly) leave stdout empty.
    for c in &running {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while env.stdout(&c.id) != "hi\n" {
            assert!(
                std::time::Instant::now() < deadline,
                "{} printed {:?}",
                c.id,
                env.stdout(&c.id)
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(c.usage().unwrap().pids, 2, "{}", c.id);
    }
    for c in &running {
        c.terminate().unwrap();
    }
    let exits = futures::future::join_all(running.iter().map(wait)).await;
    for exit in exits {
        assert_eq!(exit.signal, Some(libc::SIGTERM));
    }
    for c in running {
        c.destroy().unwrap();
    }
    env.finish();
}

#[test]
fn a_bad_cgroup_root_is_refused() {
    containerizer_support::require_root();
    let err = corral_agent::containerizer::Containerizer::new(
        corral_agent::containerizer::IsolationConfig {
            cgroup_root: "../escape".into(),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("cgroup root"), "{err}");
}

/// Inits are cloned by the containerizer's zygote (a small single-threaded
/// process), not by the multi-threaded agent: the agent pays no
/// copy-on-write for them. The zygote ends with the containerizer.
#[tokio::test]
async fn inits_are_cloned_by_the_zygote_which_ends_with_the_containerizer() {
    let mut env = Env::new("zygote");
    let spec = env.spec("child", &["sleep", "1000"]);
    let c = env.cz.launch(&spec).unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", c.pid)).unwrap();
    let ppid: i32 = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .unwrap();
    assert_ne!(ppid, std::process::id() as i32, "the agent cloned the init");
    let comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).unwrap();
    assert_eq!(comm.trim(), "corral-zygote");
    c.kill().unwrap();
    let exit = wait(&c).await;
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    c.destroy().unwrap();
    env.finish();
    assert!(
        !std::path::Path::new(&format!("/proc/{ppid}")).exists(),
        "the zygote outlived its containerizer"
    );
}
