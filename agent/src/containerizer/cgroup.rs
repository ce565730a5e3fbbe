//! Container cgroups through cgroups-rs, one code path for v1 and v2.
//!
//! The hierarchy comes from cgroups-rs' auto-detection (v2 when
//! `/sys/fs/cgroup` is cgroup2, else the v1 mounts from mountinfo); what
//! differs between versions is data (which controllers, which file names,
//! which values), not control flow — except killing: v2 writes
//! `cgroup.kill`, v1 freezes, SIGKILLs every pid, thaws.
//!
//! The hierarchy is a factory argument, so unit tests run the same code on
//! a temp dir laid out like v1 or v2 (youki's libcgroups style).
//!
//! v2 is untested on real hardware here (this host is v1 hybrid): it is
//! written against the kernel's cgroup-v2.rst and exercised only on a fake
//! directory tree.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cgroups_rs::FreezerState;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::error::{Error as CgError, ErrorKind as CgErrorKind};
use cgroups_rs::fs::freezer::FreezerController;
use cgroups_rs::fs::hierarchies::{self, V1, V2};
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Cgroup, Controller, Hierarchy, MaxValue};
use nix::errno::Errno;

use super::ContainerError;
use super::spec::{self, CFS_PERIOD_US, Limits};

/// Builds a fresh hierarchy handle (cgroups-rs hands out boxed trait
/// objects and `Cgroup` owns one).
pub(crate) type MakeHierarchy = Arc<dyn Fn() -> Box<dyn Hierarchy> + Send + Sync>;

/// The v1 hierarchies a container lives in. cpuset, devices, blkio &co are
/// not used, so their directories are never created.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];
/// The v2 controllers that must be enabled for the subtree.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// How long a v1 freeze may take before we kill anyway.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(1);

/// What to tell an operator when cgroups are not usable.
pub(crate) const HINT: &str = "run the agent as root or start it with --isolation=none";

/// The reason behind a cgroups-rs error, e.g. "permission denied" or
/// "unable to write to a control group file cpu.shares, value 512: invalid argument".
pub(crate) fn reason(e: &CgError) -> String {
    use std::error::Error as _;
    let io = e
        .source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .map(|io| {
            io.raw_os_error().map_or_else(
                || io.to_string(),
                |n| Errno::from_raw(n).desc().to_lowercase(),
            )
        });
    match (e.kind(), io) {
        (CgErrorKind::FsError, Some(io)) => io,
        (kind, Some(io)) => format!("{kind}: {io}"),
        (kind, None) => kind.to_string(),
    }
}

/// The containerizer's cgroup subtree in every hierarchy it uses.
pub(crate) struct Cgroups {
    make: MakeHierarchy,
    v2: bool,
    root: String,
    /// v1 `memory.memsw.*` / v2 `memory.swap.max` exist (swap accounting).
    swap_limit: bool,
}

impl std::fmt::Debug for Cgroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cgroups")
            .field("v2", &self.v2)
            .field("root", &self.root)
            .field("swap_limit", &self.swap_limit)
            .finish()
    }
}

impl Cgroups {
    /// The host's hierarchy (cgroups-rs auto-detection), checked and with
    /// `root` created.
    pub(crate) fn detect(root: &str) -> Result<Cgroups, ContainerError> {
        let v2 = hierarchies::auto().v2();
        let make: MakeHierarchy = if v2 {
            let h = V2::new();
            Arc::new(move || Box::new(h.clone()))
        } else {
            // V1::new parses mountinfo; do it once and clone the result.
            let h = V1::new();
            Arc::new(move || Box::new(h.clone()))
        };
        Cgroups::with_hierarchy(make, v2, root)
    }

    /// Checks the needed controllers exist and creates `root` in each.
    pub(crate) fn with_hierarchy(
        make: MakeHierarchy,
        v2: bool,
        root: &str,
    ) -> Result<Cgroups, ContainerError> {
        let mut cgroups = Cgroups {
            make,
            v2,
            root: root.to_string(),
            swap_limit: false,
        };
        let available: BTreeSet<String> = Cgroup::load((cgroups.make)(), "")
            .subsystems()
            .iter()
            .map(|s| s.controller_name())
            .collect();
        let needed: &[&str] = if v2 { &V2_CONTROLLERS } else { &V1_CONTROLLERS };
        let missing: Vec<&str> = needed
            .iter()
            .copied()
            .filter(|c| !available.contains(*c))
            .collect();
        if !missing.is_empty() {
            let version = if v2 { "v2" } else { "v1" };
            return Err(ContainerError::Unavailable {
                reason: format!(
                    "cgroup {version} controller(s) {} not available (have: {})",
                    missing.join(", "),
                    available.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
                hint: "mount them, or start the agent with --isolation=none",
            });
        }

        let cg = cgroups.load(root);
        if v2 {
            cg.create()
                .map_err(|e| unavailable_create(&cgroups.dir_of(&cg), &e))?;
            cgroups.enable_v2_controllers(&cgroups.dir_of(&cg))?;
        } else {
            for sub in cg.subsystems() {
                let ctl = sub.to_controller();
                ctl.create()
                    .map_err(|e| unavailable_create(&ctl.path().display().to_string(), &e))?;
            }
        }
        let swap_file = if v2 {
            "memory.swap.max"
        } else {
            "memory.memsw.limit_in_bytes"
        };
        cgroups.swap_limit = cg
            .controller_of::<MemController>()
            .is_some_and(|m| m.path().join(swap_file).exists());
        Ok(cgroups)
    }

    /// v2: our leaves need cpu, memory and pids; cgroups-rs enables them
    /// on the ancestors of a cgroup it creates, but ignores failures.
    fn enable_v2_controllers(&self, dir: &str) -> Result<(), ContainerError> {
        let file = Path::new(dir).join("cgroup.subtree_control");
        let enabled = |text: &str| -> BTreeSet<String> {
            text.split_whitespace()
                .map(|c| c.trim_start_matches('+').to_string())
                .collect()
        };
        let current = std::fs::read_to_string(&file).unwrap_or_default();
        if V2_CONTROLLERS
            .iter()
            .all(|c| enabled(&current).contains(*c))
        {
            return Ok(());
        }
        let want = V2_CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        let result = std::fs::write(&file, &want);
        let now = std::fs::read_to_string(&file).unwrap_or_default();
        if V2_CONTROLLERS.iter().all(|c| enabled(&now).contains(*c)) {
            return Ok(());
        }
        Err(ContainerError::Unavailable {
            reason: format!(
                "cannot enable controllers {} in {}: {}",
                V2_CONTROLLERS.join(","),
                file.display(),
                result
                    .err()
                    .map_or_else(|| "not enabled".to_string(), |e| e.to_string())
            ),
            hint: "give the agent a delegated cgroup subtree (systemd Delegate=yes) or start it with --isolation=none",
        })
    }

    pub(crate) fn is_v2(&self) -> bool {
        self.v2
    }

    fn load(&self, path: &str) -> Cgroup {
        if self.v2 {
            Cgroup::load((self.make)(), path)
        } else {
            Cgroup::load_with_specified_controllers(
                (self.make)(),
                path,
                V1_CONTROLLERS.map(String::from).to_vec(),
            )
        }
    }

    /// The first controller directory of `cg`, for messages.
    fn dir_of(&self, cg: &Cgroup) -> String {
        cg.subsystems().first().map_or_else(
            || cg.path().to_string(),
            |s| s.to_controller().path().display().to_string(),
        )
    }

    fn leaf_path(&self, id: &str) -> String {
        format!("{}/{id}", self.root)
    }

    /// Handle on an existing (or partly removed) container cgroup.
    pub(crate) fn leaf(&self, id: &str) -> Leaf {
        Leaf {
            cg: self.load(&self.leaf_path(id)),
            id: id.to_string(),
            v2: self.v2,
        }
    }

    /// Creates the container's cgroup with its limits. A cgroup that already
    /// exists is an error: it belongs to a live or orphaned container.
    pub(crate) fn create(&self, leaf: &Leaf, limits: &Limits) -> Result<(), ContainerError> {
        // Claim the id with one mkdir (atomic: of two launches with the same
        // id one fails here); cgroups-rs then creates the other directories.
        if let Some(sub) = leaf.cg.subsystems().first() {
            let dir = sub.to_controller().path();
            if let Err(e) = std::fs::create_dir(dir) {
                return Err(leaf.error(
                    "create",
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        "it already exists (a container with this id is running or orphaned; destroy it first)".into()
                    } else {
                        e.raw_os_error().map_or_else(
                            || e.to_string(),
                            |n| Errno::from_raw(n).desc().to_lowercase(),
                        )
                    },
                ));
            }
        }
        if let Err(e) = leaf.cg.create() {
            let err = leaf.error("create", reason(&e));
            let _ = leaf.delete();
            return Err(err);
        }
        if let Err(err) = leaf.apply(limits, self.swap_limit) {
            let _ = leaf.delete();
            return Err(err);
        }
        Ok(())
    }

    /// Ids of the container cgroups under the root, in any hierarchy.
    pub(crate) fn list(&self) -> Result<Vec<String>, ContainerError> {
        let mut ids = BTreeSet::new();
        for sub in self.load(&self.root).subsystems() {
            let dir = sub.to_controller().path();
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(ContainerError::Read {
                        id: String::new(),
                        path: dir.display().to_string(),
                        source,
                    });
                }
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir())
                    && let Some(name) = entry.file_name().to_str()
                    && spec::valid_id(name)
                {
                    ids.insert(name.to_string());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// Removes the (empty) root of the subtree in every hierarchy.
    pub(crate) fn remove_root(&self) -> Result<(), ContainerError> {
        let cg = self.load(&self.root);
        for sub in cg.subsystems() {
            let dir = sub.to_controller().path();
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ContainerError::Cgroup {
                        id: String::new(),
                        op: "remove",
                        path: dir.display().to_string(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn unavailable_create(path: &str, e: &CgError) -> ContainerError {
    ContainerError::Unavailable {
        reason: format!("cannot create cgroup {path}: {}", reason(e)),
        hint: HINT,
    }
}

/// What [`Leaf::usage`] reads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct RawUsage {
    pub(crate) user_ns: u64,
    pub(crate) system_ns: u64,
    pub(crate) throttled_periods: u64,
    pub(crate) throttled_ns: u64,
    pub(crate) rss: u64,
    pub(crate) cache: u64,
    pub(crate) limit: u64,
    pub(crate) pids: u64,
}

/// Splits the scheduler's exact CPU time `total` in the user:system ratio
/// of the tick-sampled counters. The kernel's user/system figures
/// (cpuacct.usage_user/_sys, cpuacct.stat, v2 user_usec/system_usec) are
/// sampled at each tick and drift from the real runtime by several
/// percent for a throttled busy loop; their sum cannot be used to check a
/// CFS quota.
pub(crate) fn split_cpu(total: u64, user: u64, system: u64) -> (u64, u64) {
    let sampled = u128::from(user) + u128::from(system);
    if sampled == 0 {
        return (total, 0);
    }
    let user_share = (u128::from(total) * u128::from(user) / sampled) as u64;
    (user_share, total - user_share.min(total))
}

/// `key value` lines (cpu.stat, memory.stat, memory.events, oom_control).
pub(crate) fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut it = line.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// One container's cgroup (a directory per v1 hierarchy, one on v2).
#[derive(Debug)]
pub(crate) struct Leaf {
    cg: Cgroup,
    id: String,
    v2: bool,
}

impl Leaf {
    fn error(&self, op: &'static str, reason: String) -> ContainerError {
        ContainerError::Cgroup {
            id: self.id.clone(),
            op,
            path: self.cg.path().to_string(),
            reason,
        }
    }

    fn controller<'a, T>(&'a self) -> Result<&'a T, ContainerError>
    where
        &'a T: From<&'a cgroups_rs::fs::Subsystem>,
        T: Controller + cgroups_rs::fs::ControllIdentifier,
    {
        self.cg.controller_of::<T>().ok_or_else(|| {
            self.error(
                "use",
                format!("controller {:?} missing", T::controller_type()),
            )
        })
    }

    fn apply(&self, limits: &Limits, swap_limit: bool) -> Result<(), ContainerError> {
        let cfg = |e: CgError| self.error("configure", reason(&e));
        let cpu: &CpuController = self.controller()?;
        let shares = if self.v2 {
            spec::shares_to_weight(limits.shares)
        } else {
            limits.shares
        };
        cpu.set_shares(shares).map_err(cfg)?;
        if let Some(quota) = limits.quota_us {
            cpu.set_cfs_quota_and_period(Some(quota as i64), Some(CFS_PERIOD_US))
                .map_err(cfg)?;
        }
        let mem: &MemController = self.controller()?;
        // Validated to fit in i64.
        let bytes = limits.mem_bytes as i64;
        mem.set_limit(bytes).map_err(cfg)?;
        if swap_limit {
            // No swap beyond the memory limit: v1 memsw is memory+swap,
            // v2 swap.max is swap alone.
            mem.set_memswap_limit(if self.v2 { 0 } else { bytes })
                .map_err(cfg)?;
        }
        let pids: &PidController = self.controller()?;
        pids.set_pid_max(MaxValue::Value(limits.pids as i64))
            .map_err(cfg)?;
        Ok(())
    }

    /// The files the (single-threaded) init writes "0" to, to move itself
    /// into the cgroup before it starts the command.
    ///
    /// v1: `tasks` of each hierarchy. Writing "0" there moves only the
    /// calling thread, and for that the kernel skips write-locking
    /// `cgroup_threadgroup_rwsem`; `cgroup.procs` takes that percpu rwsem,
    /// whose writer waits for an RCU grace period once the lock has been
    /// idle (measured here: ~8 ms instead of ~0.1 ms). For a one-thread
    /// process the two are the same move.
    /// v2: `cgroup.procs` (`cgroup.threads` only works in threaded
    /// subtrees), which can pay that grace period; CLONE_INTO_CGROUP would
    /// avoid it.
    pub(crate) fn join_files(&self) -> Vec<PathBuf> {
        if self.v2 {
            self.cg
                .subsystems()
                .first()
                .map(|s| s.to_controller().path().join("cgroup.procs"))
                .into_iter()
                .collect()
        } else {
            self.cg
                .subsystems()
                .iter()
                .map(|s| s.to_controller().path().join("tasks"))
                .collect()
        }
    }

    /// Pids in the cgroup (from one hierarchy: they all hold the same
    /// processes). Empty when the cgroup is gone.
    pub(crate) fn procs(&self) -> Vec<u64> {
        let sub = if self.v2 {
            self.cg.subsystems().first()
        } else {
            self.cg
                .subsystems()
                .iter()
                .find(|s| s.controller_name() == "freezer")
        };
        sub.map(|s| {
            s.to_controller()
                .procs()
                .into_iter()
                .map(|p| p.pid)
                .collect()
        })
        .unwrap_or_default()
    }

    /// SIGKILLs every process in the cgroup. v2: `cgroup.kill` (Linux
    /// 5.14). v1 (or v2 without it): freeze, SIGKILL each pid, thaw — frozen
    /// processes can neither fork nor exit, so the list is complete and no
    /// pid is reused under us. Does not wait for the processes to be gone.
    pub(crate) fn kill_all(&self) -> Result<(), ContainerError> {
        if self.v2 {
            match self.cg.kill() {
                Ok(()) => return Ok(()),
                Err(e) if *e.kind() == CgErrorKind::InvalidOperation => {}
                Err(e) => return Err(self.error("kill", reason(&e))),
            }
        }
        if self.procs().is_empty() {
            return Ok(());
        }
        let freezer: &FreezerController = self.controller()?;
        freezer
            .freeze()
            .map_err(|e| self.error("freeze", reason(&e)))?;
        let started = Instant::now();
        let mut pause = Duration::from_micros(50);
        while !matches!(freezer.state(), Ok(FreezerState::Frozen))
            && started.elapsed() < FREEZE_TIMEOUT
        {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        for pid in self.procs() {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // ESRCH: already gone.
                let _ = super::sys::kill(pid, libc::SIGKILL);
            }
        }
        freezer.thaw().map_err(|e| self.error("thaw", reason(&e)))
    }

    /// OOM kills the kernel did in this cgroup (v1 `memory.oom_control`,
    /// v2 `memory.events`: `oom_kill`). Not `failcnt`: it stays 0 when
    /// memsw equals the limit.
    pub(crate) fn oom_kills(&self) -> Result<u64, ContainerError> {
        let mem: &MemController = self.controller()?;
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let text = self.read(mem.path(), file)?;
        Ok(flat_keyed(&text, "oom_kill").unwrap_or(0))
    }

    fn read(&self, dir: &Path, file: &str) -> Result<String, ContainerError> {
        let path: PathBuf = dir.join(file);
        std::fs::read_to_string(&path).map_err(|source| ContainerError::Read {
            id: self.id.clone(),
            path: path.display().to_string(),
            source,
        })
    }

    fn read_u64(&self, dir: &Path, file: &str) -> Result<u64, ContainerError> {
        let text = self.read(dir, file)?;
        let text = text.trim();
        if text == "max" {
            return Ok(u64::MAX);
        }
        text.parse().map_err(|_| ContainerError::Read {
            id: self.id.clone(),
            path: dir.join(file).display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a number: {text:?}"),
            ),
        })
    }

    /// A handful of small cgroup files, no process walking.
    pub(crate) fn usage(&self) -> Result<RawUsage, ContainerError> {
        let cpu: &CpuController = self.controller()?;
        let mem: &MemController = self.controller()?;
        let pids: &PidController = self.controller()?;
        let cpu_stat = self.read(cpu.path(), "cpu.stat")?;
        let mem_stat = self.read(mem.path(), "memory.stat")?;
        let mut u = RawUsage {
            pids: self.read_u64(pids.path(), "pids.current")?,
            ..RawUsage::default()
        };
        if self.v2 {
            let us = |k| flat_keyed(&cpu_stat, k).unwrap_or(0).saturating_mul(1000);
            (u.user_ns, u.system_ns) =
                split_cpu(us("usage_usec"), us("user_usec"), us("system_usec"));
            u.throttled_ns = us("throttled_usec");
            u.throttled_periods = flat_keyed(&cpu_stat, "nr_throttled").unwrap_or(0);
            u.rss = flat_keyed(&mem_stat, "anon").unwrap_or(0);
            u.cache = flat_keyed(&mem_stat, "file").unwrap_or(0);
            u.limit = self.read_u64(mem.path(), "memory.max")?;
        } else {
            let acct: &CpuAcctController = self.controller()?;
            let total = self.read_u64(acct.path(), "cpuacct.usage")?;
            let stat = self.read(acct.path(), "cpuacct.stat")?;
            let ticks = |k| flat_keyed(&stat, k).unwrap_or(0);
            (u.user_ns, u.system_ns) = split_cpu(total, ticks("user"), ticks("system"));
            u.throttled_ns = flat_keyed(&cpu_stat, "throttled_time").unwrap_or(0);
            u.throttled_periods = flat_keyed(&cpu_stat, "nr_throttled").unwrap_or(0);
            u.rss = flat_keyed(&mem_stat, "rss").unwrap_or(0);
            u.cache = flat_keyed(&mem_stat, "cache").unwrap_or(0);
            u.limit = self.read_u64(mem.path(), "memory.limit_in_bytes")?;
        }
        Ok(u)
    }

    /// Removes the cgroup from every hierarchy (it must be empty).
    pub(crate) fn delete(&self) -> Result<(), ContainerError> {
        self.cg
            .delete()
            .map_err(|e| self.error("remove", reason(&e)))?;
        if self.cg.exists() {
            return Err(self.error("remove", "directory still present".into()));
        }
        Ok(())
    }

    /// The cgroup's directories (one per hierarchy).
    pub(crate) fn dirs(&self) -> Vec<PathBuf> {
        self.cg
            .subsystems()
            .iter()
            .map(|s| s.to_controller().path().to_path_buf())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cgroups_rs::fs::Subsystem;
    use cgroups_rs::fs::devices::DevicesController;

    /// A cgroup hierarchy on a plain directory: v1 = one subdirectory per
    /// controller (plus `devices`, which must stay untouched), v2 = one tree.
    #[derive(Debug, Clone)]
    struct DirHierarchy {
        dir: PathBuf,
        v2: bool,
    }

    impl Hierarchy for DirHierarchy {
        fn v2(&self) -> bool {
            self.v2
        }
        fn subsystems(&self) -> Vec<Subsystem> {
            let d = &self.dir;
            if self.v2 {
                let r = PathBuf::new();
                vec![
                    Subsystem::Cpu(CpuController::new(d.clone(), r.clone(), true)),
                    Subsystem::Mem(MemController::new(d.clone(), r.clone(), true)),
                    Subsystem::Pid(PidController::new(d.clone(), r.clone(), true)),
                    Subsystem::Freezer(FreezerController::new(d.clone(), r, true)),
                ]
            } else {
                let r = PathBuf::from("/");
                vec![
                    Subsystem::Cpu(CpuController::new(d.join("cpu"), r.clone(), false)),
                    Subsystem::CpuAcct(CpuAcctController::new(d.join("cpuacct"), r.clone())),
                    Subsystem::Mem(MemController::new(d.join("memory"), r.clone(), false)),
                    Subsystem::Pid(PidController::new(d.join("pids"), r.clone(), false)),
                    Subsystem::Freezer(FreezerController::new(d.join("freezer"), r.clone(), false)),
                    Subsystem::Devices(DevicesController::new(d.join("devices"), r)),
                ]
            }
        }
        fn root(&self) -> PathBuf {
            self.dir.clone()
        }
        fn root_control_group(&self) -> Cgroup {
            Cgroup::load(Box::new(self.clone()), "")
        }
        fn parent_control_group(&self, path: &str) -> Cgroup {
            let parent = Path::new(path).parent().unwrap_or(Path::new(""));
            Cgroup::load(Box::new(self.clone()), parent)
        }
    }

    fn fake(dir: &Path, v2: bool) -> MakeHierarchy {
        let h = DirHierarchy {
            dir: dir.to_path_buf(),
            v2,
        };
        Arc::new(move || Box::new(h.clone()))
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_string()
    }

    #[test]
    fn v1_leaf_gets_limits_in_its_own_hierarchies_only() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let cgroups = Cgroups::with_hierarchy(fake(d, false), false, "corral-t").unwrap();
        assert!(d.join("memory/corral-t").is_dir());
        let leaf = cgroups.leaf("c1");
        cgroups
            .create(&leaf, &spec::limits(500, 64 << 20, true, 32))
            .unwrap();
        assert_eq!(read(d.join("cpu/corral-t/c1/cpu.shares")), "512");
        assert_eq!(read(d.join("cpu/corral-t/c1/cpu.cfs_quota_us")), "50000");
        assert_eq!(read(d.join("cpu/corral-t/c1/cpu.cfs_period_us")), "100000");
        assert_eq!(
            read(d.join("memory/corral-t/c1/memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
        assert!(
            !d.join("memory/corral-t/c1/memory.memsw.limit_in_bytes")
                .exists(),
            "no memsw without swap accounting"
        );
        assert_eq!(read(d.join("pids/corral-t/c1/pids.max")), "32");
        assert!(d.join("cpuacct/corral-t/c1").is_dir());
        assert!(d.join("freezer/corral-t/c1").is_dir());
        assert!(
            !d.join("devices/corral-t").exists(),
            "unused hierarchies untouched"
        );
        assert_eq!(leaf.dirs().len(), 5);

        let mut joins = leaf.join_files();
        joins.sort();
        let mut want: Vec<PathBuf> = V1_CONTROLLERS
            .iter()
            .map(|c| d.join(c).join("corral-t/c1/tasks"))
            .collect();
        want.sort();
        assert_eq!(joins, want);
        std::fs::write(d.join("freezer/corral-t/c1/cgroup.procs"), "4242\n").unwrap();
        assert_eq!(leaf.procs(), vec![4242]);
        assert_eq!(cgroups.list().unwrap(), vec!["c1".to_string()]);

        let err = cgroups
            .create(&cgroups.leaf("c1"), &spec::limits(500, 64 << 20, true, 32))
            .unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }

    #[test]
    fn v1_usage_and_oom_are_read_from_cgroup_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let cgroups = Cgroups::with_hierarchy(fake(d, false), false, "r").unwrap();
        let leaf = cgroups.leaf("c");
        cgroups
            .create(&leaf, &spec::limits(1000, 64 << 20, false, 8))
            .unwrap();
        let w = |p: &str, s: &str| std::fs::write(d.join(p), s).unwrap();
        w("cpuacct/r/c/cpuacct.usage", "2000000000\n");
        w("cpuacct/r/c/cpuacct.stat", "user 150\nsystem 50\n");
        w(
            "cpu/r/c/cpu.stat",
            "nr_periods 10\nnr_throttled 4\nthrottled_time 250000000\n",
        );
        w(
            "memory/r/c/memory.stat",
            "cache 4096\nrss 8192\nrss_huge 0\n",
        );
        w("pids/r/c/pids.current", "3\n");
        w(
            "memory/r/c/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        let u = leaf.usage().unwrap();
        assert_eq!(
            u,
            RawUsage {
                user_ns: 1_500_000_000,
                system_ns: 500_000_000,
                throttled_periods: 4,
                throttled_ns: 250_000_000,
                rss: 8192,
                cache: 4096,
                limit: 64 << 20,
                pids: 3,
            }
        );
        assert_eq!(leaf.oom_kills().unwrap(), 2);
    }

    #[test]
    fn v2_leaf_uses_one_directory_weight_and_memory_max() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let cgroups = Cgroups::with_hierarchy(fake(d, true), true, "corral").unwrap();
        assert!(cgroups.is_v2());
        let sc = read(d.join("corral/cgroup.subtree_control"));
        for c in V2_CONTROLLERS {
            assert!(sc.contains(c), "{sc}");
        }
        // Without a hard cpu limit: cgroups-rs reads cpu.max before writing
        // it, which the kernel provides but a plain directory does not.
        let leaf = cgroups.leaf("c2");
        cgroups
            .create(&leaf, &spec::limits(1000, 32 << 20, false, 64))
            .unwrap();
        assert_eq!(leaf.dirs().len(), 4);
        assert!(leaf.dirs().iter().all(|p| p == &d.join("corral/c2")));
        assert_eq!(read(d.join("corral/c2/cpu.weight")), "39");
        assert_eq!(
            read(d.join("corral/c2/memory.max")),
            (32u64 << 20).to_string()
        );
        assert_eq!(read(d.join("corral/c2/pids.max")), "64");
        assert_eq!(leaf.join_files(), vec![d.join("corral/c2/cgroup.procs")]);
        std::fs::write(
            d.join("corral/c2/memory.events"),
            "low 0\nhigh 0\nmax 9\noom 2\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(leaf.oom_kills().unwrap(), 1);
        std::fs::write(
            d.join("corral/c2/cpu.stat"),
            "usage_usec 3000\nuser_usec 2000\nsystem_usec 1000\nnr_periods 5\nnr_throttled 2\nthrottled_usec 700\n",
        )
        .unwrap();
        std::fs::write(d.join("corral/c2/memory.stat"), "anon 100\nfile 200\n").unwrap();
        std::fs::write(d.join("corral/c2/pids.current"), "2").unwrap();
        let u = leaf.usage().unwrap();
        assert_eq!((u.user_ns, u.system_ns), (2_000_000, 1_000_000));
        assert_eq!((u.throttled_periods, u.throttled_ns), (2, 700_000));
        assert_eq!((u.rss, u.cache, u.limit, u.pids), (100, 200, 32 << 20, 2));
    }

    #[test]
    fn exact_cpu_time_is_split_by_the_sampled_ratio() {
        assert_eq!(split_cpu(1000, 3, 1), (750, 250));
        assert_eq!(split_cpu(1000, 0, 0), (1000, 0));
        assert_eq!(split_cpu(u64::MAX, u64::MAX, 0), (u64::MAX, 0));
    }

    #[test]
    fn flat_keyed_files_parse() {
        let text = "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n";
        assert_eq!(flat_keyed(text, "oom_kill"), Some(1));
        assert_eq!(flat_keyed(text, "oom"), Some(1));
        assert_eq!(flat_keyed(text, "nope"), None);
    }

    #[test]
    fn missing_controllers_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        #[derive(Debug, Clone)]
        struct NoPids(PathBuf);
        impl Hierarchy for NoPids {
            fn v2(&self) -> bool {
                false
            }
            fn subsystems(&self) -> Vec<Subsystem> {
                let r = PathBuf::from("/");
                vec![Subsystem::Cpu(CpuController::new(
                    self.0.join("cpu"),
                    r,
                    false,
                ))]
            }
            fn root(&self) -> PathBuf {
                self.0.clone()
            }
            fn root_control_group(&self) -> Cgroup {
                Cgroup::load(Box::new(self.clone()), "")
            }
            fn parent_control_group(&self, _: &str) -> Cgroup {
                Cgroup::load(Box::new(self.clone()), "")
            }
        }
        let h = NoPids(tmp.path().to_path_buf());
        let err =
            Cgroups::with_hierarchy(Arc::new(move || Box::new(h.clone())), false, "x").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("cpuacct, memory, pids, freezer not available"),
            "{msg}"
        );
    }
}
