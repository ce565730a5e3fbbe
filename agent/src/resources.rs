//! Resource detection: what this machine offers, minus what the host keeps.
//!
//! Follows Mesos (`src/slave/containerizer/containerizer.cpp`,
//! `Containerizer::resources`): memory and disk keep back
//! `min(1 GiB, total / 2)` and `min(5 GiB, total / 2)` for the host, cpus are
//! all the cpus we may run on, ports default to `[31000-32000]`.

use std::path::Path;

use corral_proto::{Amount, RangeSet, Resources};

use crate::error::AgentError;

/// Where the kernel reports memory (proc(5)).
const MEMINFO_PATH: &str = "/proc/meminfo";

/// Memory kept back for the host and the agent itself, at most (Mesos).
const MEM_RESERVATION_MAX_MIB: u64 = 1024;

/// Disk kept back for the host's own files, at most (Mesos).
const DISK_RESERVATION_MAX_MIB: u64 = 5 * 1024;

/// The port range offered when `--resources` names none (Mesos default).
pub const DEFAULT_PORTS: (u64, u64) = (31_000, 32_000);

const MIB: u64 = 1024 * 1024;

/// Detects cpus (scheduler affinity), memory (`/proc/meminfo` MemTotal),
/// disk (the filesystem of `work_dir`) and the default ports, each minus the
/// host's reservation. `work_dir` must exist.
pub fn detect_resources(work_dir: &Path) -> Result<Resources, AgentError> {
    // available_parallelism honours sched_getaffinity(2) (and a cgroup quota).
    let cpus = std::thread::available_parallelism()
        .map_err(AgentError::Cpus)?
        .get() as u64;

    let meminfo =
        std::fs::read_to_string(MEMINFO_PATH).map_err(|source| AgentError::ReadMeminfo {
            path: MEMINFO_PATH.into(),
            source,
        })?;
    let mem_total =
        parse_meminfo_total_mib(&meminfo).map_err(|reason| AgentError::ParseMeminfo {
            path: MEMINFO_PATH.into(),
            reason,
        })?;

    let stat = nix::sys::statvfs::statvfs(work_dir).map_err(|source| AgentError::Statvfs {
        path: work_dir.to_path_buf(),
        source,
    })?;
    // Total size of the filesystem, like Mesos' `fs::size`, not what is free.
    // fsblkcnt_t and c_ulong are u64 on 64-bit Linux and at most that elsewhere.
    let disk_total_bytes = (stat.blocks() as u64).saturating_mul(stat.fragment_size() as u64);

    Ok(Resources {
        cpus: Amount::from_units(cpus),
        mem: Amount::from_units(mem_after_reservation(mem_total)),
        disk: Amount::from_units(disk_after_reservation(disk_total_bytes / MIB)),
        gpus: Amount::ZERO,
        ports: RangeSet::from_ranges([DEFAULT_PORTS]),
    })
}

/// `MemTotal` of a `/proc/meminfo` text, in whole MiB.
pub(crate) fn parse_meminfo_total_mib(text: &str) -> Result<u64, String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .ok_or_else(|| "no MemTotal line".to_string())?;
    let mut fields = line.split_whitespace();
    let value = fields
        .next()
        .ok_or_else(|| "MemTotal has no value".to_string())?;
    let kib: u64 = value
        .parse()
        .map_err(|_| format!("MemTotal value '{value}' is not a number"))?;
    // The kernel always prints "kB" (meaning KiB); anything else is not a
    // format we understand.
    match fields.next() {
        Some("kB") => Ok(kib / 1024),
        other => Err(format!("MemTotal unit is {other:?}, expected \"kB\"")),
    }
}

/// Memory offered out of `total_mib`.
pub(crate) fn mem_after_reservation(total_mib: u64) -> u64 {
    total_mib - MEM_RESERVATION_MAX_MIB.min(total_mib / 2)
}

/// Disk offered out of `total_mib`.
pub(crate) fn disk_after_reservation(total_mib: u64) -> u64 {
    total_mib - DISK_RESERVATION_MAX_MIB.min(total_mib / 2)
}

/// Applies `--resources` per name: each scalar the override gives as
/// non-zero, and `ports` when it gives any range, replace the detected
/// value; everything else stays detected. A parsed [`Resources`] cannot tell
/// `cpus:0` from "cpus not given", so a zero in the override keeps detection.
pub fn merge_override(detected: Resources, over: &Resources) -> Resources {
    let pick = |d: Amount, o: Amount| if o.is_zero() { d } else { o };
    Resources {
        cpus: pick(detected.cpus, over.cpus),
        mem: pick(detected.mem, over.mem),
        disk: pick(detected.disk, over.disk),
        gpus: pick(detected.gpus, over.gpus),
        ports: if over.ports.is_empty() {
            detected.ports
        } else {
            over.ports.clone()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree:        20000000 kB\n";

    #[test]
    fn meminfo_total_is_read_in_mib() {
        assert_eq!(parse_meminfo_total_mib(MEMINFO), Ok(24_000));
    }

    #[test]
    fn meminfo_without_total_or_with_garbage_is_an_error() {
        assert!(parse_meminfo_total_mib("MemFree: 1 kB\n").is_err());
        assert!(parse_meminfo_total_mib("MemTotal: lots kB\n").is_err());
        assert!(parse_meminfo_total_mib("MemTotal: 1024 MB\n").is_err());
        assert!(parse_meminfo_total_mib("MemTotal:\n").is_err());
    }

    #[test]
    fn host_reservation_is_at_most_one_gib_or_half_of_small_memory() {
        assert_eq!(mem_after_reservation(24_000), 24_000 - 1024);
        assert_eq!(mem_after_reservation(1500), 750);
        assert_eq!(mem_after_reservation(0), 0);
    }

    #[test]
    fn disk_reservation_is_at_most_five_gib_or_half_of_small_disks() {
        assert_eq!(disk_after_reservation(100_000), 100_000 - 5120);
        assert_eq!(disk_after_reservation(8000), 4000);
    }

    #[test]
    fn override_replaces_only_the_resources_it_names() {
        let detected = Resources::parse("cpus:8;mem:16000;disk:90000;ports:[31000-32000]").unwrap();
        let over = Resources::parse("cpus:2;gpus:1").unwrap();
        let merged = merge_override(detected, &over);
        assert_eq!(
            merged,
            Resources::parse("cpus:2;mem:16000;disk:90000;gpus:1;ports:[31000-32000]").unwrap()
        );
    }

    #[test]
    fn override_ports_replace_the_default_range() {
        let detected = Resources::parse("cpus:1;ports:[31000-32000]").unwrap();
        let over = Resources::parse("ports:[5000-5001]").unwrap();
        assert_eq!(
            merge_override(detected, &over),
            Resources::parse("cpus:1;ports:[5000-5001]").unwrap()
        );
    }

    #[test]
    fn detection_on_this_machine_finds_cpus_memory_disk_and_ports() {
        let dir = tempfile::tempdir().unwrap();
        let r = detect_resources(dir.path()).unwrap();
        assert!(!r.cpus.is_zero());
        assert!(!r.mem.is_zero());
        assert!(!r.disk.is_zero());
        assert_eq!(r.ports, RangeSet::from_ranges([DEFAULT_PORTS]));
    }
}
