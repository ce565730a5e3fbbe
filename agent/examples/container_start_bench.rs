//! Container start latency: the agent's containerizer against `crun run`
//! and `runc run` on the same busybox rootfs, interleaved.
//!
//! Usage (root; release build):
//!   container_start_bench <rootfs> <iterations> [work-dir]
//!
//! One iteration = create + run `/bin/true` to exit + destroy, timed from
//! the first step to the last:
//! - ours: mkdir fresh upper/work/merged dirs, `Containerizer::launch` with
//!   `RootFs::Overlay` (the rootfs as the single lower layer), `wait`,
//!   `destroy`, remove the dirs;
//! - crun / runc: `<runtime> run --bundle B <id>` until it exits (it
//!   creates, starts, waits and deletes the container), stdio to /dev/null.
//!
//! The OCI bundle is `runc spec`'s default config (same hardening: masked
//! and read-only paths, /dev, /proc, /sys, readonly root bind) with
//! `/bin/true`, no terminal, the same limits as ours (64 MiB memory, 1 cpu
//! of shares and CFS quota, 4096 pids) and — like ours — host network (the
//! network namespace is removed: its creation would cost crun and runc
//! about a millisecond that we do not pay).
//!
//! crun refuses this hybrid cgroup host while `/sys/fs/cgroup/unified`
//! (cgroup2, hugetlb only) is mounted, so run the whole bench inside one
//! private mount namespace without it (the unshare cost is paid once, not
//! per run): `bench/container-start.sh` does
//! `unshare -m sh -c 'umount /sys/fs/cgroup/unified; exec container_start_bench ...'`.
//! All three runtimes run in that same namespace.
//!
//! Ours also runs a second time with upper/work on tmpfs (/dev/shm): not
//! part of the summary, it separates the runtime's cost from the disk's
//! metadata latency (mkdir, overlay's work dir checks, rm).
//!
//! `CONTAINER_START_BENCH_OUTPUT=sandbox` runs ours the way the agent
//! does: the init pumps the output into a sandbox dir and records the exit
//! status in a state dir (both made and removed inside the timed region);
//! by default stdout/stderr are /dev/null fds.
//!
//! Prints a table, then the medians as the last line:
//! `container_start_median_ms=X crun_median_ms=Y runc_median_ms=Z ratio_vs_crun=R`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_agent::containerizer::{ContainerSpec, Containerizer, IsolationConfig, Output, RootFs};

const WARMUP: usize = 10;
const CGROUP_ROOT: &str = "corral-bench";
/// cgroup parent of the crun/runc containers (runs are sequential, so
/// they can share it; runc leaves it behind, it is removed at the end).
const OCI_CGROUP_PARENT: &str = "corral-bench-oci";
const MEM_BYTES: u64 = 64 << 20;

fn main() {
    if let Err(e) = run() {
        eprintln!("container_start_bench: {e}");
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, String>;

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (rootfs, n) = match args.as_slice() {
        [_, rootfs, n] | [_, rootfs, n, _] => (
            std::fs::canonicalize(rootfs).map_err(|e| format!("rootfs {rootfs}: {e}"))?,
            n.parse::<usize>()
                .map_err(|e| format!("iterations {n}: {e}"))?,
        ),
        _ => return Err("usage: container_start_bench <rootfs> <iterations> [work-dir]".into()),
    };
    let work = match args.get(3) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("corral-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    if unified_has_controllers() && have("crun") {
        eprintln!(
            "warning: /sys/fs/cgroup/unified has controllers; crun will refuse this hybrid host \
             (run inside `unshare -m` with it unmounted, as bench/container-start.sh does)"
        );
    }

    let cz = Containerizer::new(IsolationConfig {
        cgroup_root: CGROUP_ROOT.into(),
        ..IsolationConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let bundle = work.join("bundle");
    write_bundle(&bundle, &rootfs)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;

    // CONTAINER_START_BENCH_RUNTIMES=crun,runc (default) picks the OCI
    // runtimes to compare with; empty = ours only (for profiling).
    let wanted =
        std::env::var("CONTAINER_START_BENCH_RUNTIMES").unwrap_or_else(|_| "crun,runc".into());
    let runtimes: Vec<&str> = ["crun", "runc"]
        .into_iter()
        .filter(|r| wanted.split(',').any(|w| w == *r) && have(r))
        .collect();
    // Ours twice: upper/work next to the rootfs (the headline: like an
    // agent's work dir on disk), and on tmpfs (/dev/shm), which shows the
    // runtime's own cost without the disk's metadata latency.
    let shm = Path::new("/dev/shm").join(format!("corral-bench-{}", std::process::id()));
    let mut ours_dirs = vec![("corral containerizer", work.clone())];
    if std::fs::create_dir_all(&shm).is_ok() {
        ours_dirs.push(("  same, upper on tmpfs", shm.clone()));
    }
    let sandbox_output = std::env::var("CONTAINER_START_BENCH_OUTPUT").as_deref() == Ok("sandbox");
    let slots = ours_dirs.len() + runtimes.len();
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); slots];
    let mut phases: Vec<Vec<[Duration; 5]>> = vec![Vec::with_capacity(n); ours_dirs.len()];
    let mut fails = vec![0usize; slots];
    for i in 0..WARMUP + n {
        // Rotate the order so no runtime always runs right after another.
        for k in 0..slots {
            let which = (k + i) % slots;
            let result = match ours_dirs.get(which) {
                Some((_, dir)) => run_ours(
                    &cz,
                    &rt,
                    &rootfs,
                    dir,
                    i,
                    sandbox_output,
                    &mut phases[which],
                ),
                None => run_oci(runtimes[which - ours_dirs.len()], &bundle, i),
            };
            match result {
                Ok(t) if i >= WARMUP => samples[which].push(t),
                Ok(_) => {}
                Err(e) => {
                    fails[which] += 1;
                    if fails[which] == 1 {
                        eprintln!("run {which} failed: {e}");
                    }
                }
            }
        }
    }
    cz.remove_root().map_err(|e| e.to_string())?;
    remove_oci_cgroups();
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&shm);

    println!(
        "{:<28} {:>5} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "runtime", "n", "median", "p10", "p90", "mean", "fails"
    );
    let mut medians = vec![];
    let phase_names = ["mkdir dirs", "launch", "wait", "destroy", "rm dirs"];
    for (which, (name, _)) in ours_dirs.iter().enumerate() {
        let stats = Stats::of(&mut samples[which]);
        stats.print(name, fails[which]);
        medians.push(stats.median);
        // Where our time goes (medians of each phase, ms).
        let measured = phases[which].get(WARMUP..).unwrap_or(&[]);
        let parts: Vec<String> = phase_names
            .iter()
            .enumerate()
            .map(|(k, name)| {
                let mut col: Vec<Duration> = measured.iter().map(|p| p[k]).collect();
                let st = Stats::of(&mut col);
                format!("{name} {:.3} (p90 {:.3})", st.median, st.p90)
            })
            .collect();
        println!("    by phase, ms: {}", parts.join(", "));
    }
    let mut oci_medians = vec![];
    for (k, r) in runtimes.iter().enumerate() {
        let which = ours_dirs.len() + k;
        let stats = Stats::of(&mut samples[which]);
        stats.print(&format!("{r} run"), fails[which]);
        oci_medians.push((*r, stats.median));
    }
    let median_of = |name: &str| {
        oci_medians
            .iter()
            .find(|(r, _)| *r == name)
            .map_or(f64::NAN, |(_, m)| *m)
    };
    let (ours, crun, runc) = (medians[0], median_of("crun"), median_of("runc"));
    println!(
        "container_start_median_ms={ours:.3} crun_median_ms={crun:.3} runc_median_ms={runc:.3} ratio_vs_crun={:.3}",
        ours / crun
    );
    Ok(())
}

fn run_ours(
    cz: &Containerizer,
    rt: &tokio::runtime::Runtime,
    rootfs: &Path,
    work: &Path,
    i: usize,
    sandbox_output: bool,
    phases: &mut Vec<[Duration; 5]>,
) -> Result<Duration> {
    // The three dirs an overlay container needs (and, as the agent runs
    // it, a sandbox and a state dir).
    let [upper, workdir, merged, sandbox, state] =
        ["upper", "work", "merged", "sandbox", "state"].map(|d| work.join(format!("{d}-{i}")));
    let dirs: &[&PathBuf] = if sandbox_output {
        &[&upper, &workdir, &merged, &sandbox, &state]
    } else {
        &[&upper, &workdir, &merged]
    };
    let null = || -> Result<std::os::fd::OwnedFd> {
        Ok(File::create("/dev/null").map_err(|e| e.to_string())?.into())
    };
    let (stdout, stderr) = (null()?, null()?);
    let start = Instant::now();
    for d in dirs {
        std::fs::create_dir(d).map_err(|e| e.to_string())?;
    }
    let spec = ContainerSpec {
        id: format!("b{i}"),
        argv: vec!["/bin/true".into()],
        env: vec![("PATH".into(), "/bin:/usr/bin".into())],
        cwd: "/".into(),
        rootfs: RootFs::Overlay {
            lower: vec![rootfs.to_path_buf()],
            upper: upper.clone(),
            work: workdir.clone(),
            target: merged.clone(),
        },
        hostname: "bench".into(),
        mounts: vec![],
        user: None,
        cpus_milli: 1000,
        mem_bytes: MEM_BYTES,
        output: if sandbox_output {
            Output::Sandbox {
                dir: sandbox.clone(),
                logs: corral_agent::logs::LogConfig::default(),
            }
        } else {
            Output::Fds { stdout, stderr }
        },
        state_dir: sandbox_output.then(|| state.clone()),
        netns: None,
    };
    let t_launch = Instant::now();
    let c = cz.launch(&spec).map_err(|e| e.to_string())?;
    let t_wait = Instant::now();
    let exit = rt.block_on(c.wait()).map_err(|e| e.to_string())?;
    let t_destroy = Instant::now();
    c.destroy().map_err(|e| e.to_string())?;
    let t_rm = Instant::now();
    for d in dirs {
        std::fs::remove_dir_all(d).map_err(|e| e.to_string())?;
    }
    let elapsed = start.elapsed();
    phases.push([
        t_launch - start,
        t_wait - t_launch,
        t_destroy - t_wait,
        t_rm - t_destroy,
        start.elapsed() - (t_rm - start),
    ]);
    if exit.code != Some(0) {
        return Err(format!("/bin/true ended with {exit:?}"));
    }
    Ok(elapsed)
}

fn run_oci(runtime: &str, bundle: &Path, i: usize) -> Result<Duration> {
    let start = Instant::now();
    let out = Command::new(runtime)
        .arg("run")
        .arg("--bundle")
        .arg(bundle)
        .arg(format!("bench-{runtime}-{i}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("spawn {runtime}: {e}"))?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(elapsed)
}

/// `runc spec`'s defaults, patched (see the module doc).
fn write_bundle(bundle: &Path, rootfs: &Path) -> Result<()> {
    std::fs::create_dir_all(bundle).map_err(|e| e.to_string())?;
    let config = bundle.join("config.json");
    let _ = std::fs::remove_file(&config);
    let status = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(bundle)
        .status()
        .map_err(|e| format!("runc spec: {e}"))?;
    if !status.success() {
        return Err(format!("runc spec: {status}"));
    }
    let text = std::fs::read_to_string(&config).map_err(|e| e.to_string())?;
    let mut c: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    c["process"]["terminal"] = false.into();
    c["process"]["args"] = serde_json::json!(["/bin/true"]);
    c["root"]["path"] = rootfs.display().to_string().into();
    if let Some(ns) = c["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    c["linux"]["resources"]["memory"] =
        serde_json::json!({ "limit": MEM_BYTES, "swap": MEM_BYTES });
    c["linux"]["resources"]["cpu"] =
        serde_json::json!({ "shares": 1024, "quota": 100_000, "period": 100_000 });
    c["linux"]["resources"]["pids"] = serde_json::json!({ "limit": 4096 });
    c["linux"]["cgroupsPath"] = format!("/{OCI_CGROUP_PARENT}/ctr").into();
    std::fs::write(&config, c.to_string()).map_err(|e| e.to_string())?;
    Ok(())
}

fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn unified_has_controllers() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|s| !s.trim().is_empty())
}

fn remove_oci_cgroups() {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let dir = h.path().join(OCI_CGROUP_PARENT);
        let _ = std::fs::remove_dir(dir.join("ctr"));
        let _ = std::fs::remove_dir(&dir);
    }
}

struct Stats {
    n: usize,
    median: f64,
    p10: f64,
    p90: f64,
    mean: f64,
}

impl Stats {
    fn of(samples: &mut [Duration]) -> Stats {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| {
            if samples.is_empty() {
                return f64::NAN;
            }
            let i = ((samples.len() - 1) as f64 * q).round() as usize;
            ms(samples[i])
        };
        let n = samples.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            ms(samples[n / 2])
        } else {
            (ms(samples[n / 2 - 1]) + ms(samples[n / 2])) / 2.0
        };
        Stats {
            n,
            median,
            p10: at(0.1),
            p90: at(0.9),
            mean: samples.iter().map(|d| ms(*d)).sum::<f64>() / n.max(1) as f64,
        }
    }

    fn print(&self, name: &str, fails: usize) {
        println!(
            "{name:<28} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {fails:>6}",
            self.n, self.median, self.p10, self.p90, self.mean
        );
    }
}
