//! Pure checks and conversions of a [`ContainerSpec`]: validation, cgroup
//! limits, the executable search path. No syscalls.

use std::path::Path;

use super::ContainerSpec;

/// Longest container id: it is a cgroup directory name.
pub(crate) const MAX_ID_LEN: usize = 128;

/// Smallest memory limit accepted: below a few MiB even the init and a
/// shell are OOM-killed before they start, which reads as a runtime bug.
pub(crate) const MIN_MEM_BYTES: u64 = 4 << 20;

/// CFS period: 100 ms, the kernel's default and what Docker and Mesos use.
pub(crate) const CFS_PERIOD_US: u64 = 100_000;

/// The kernel refuses CFS quotas under 1 ms.
const MIN_CFS_QUOTA_US: u64 = 1_000;

/// `cpu.shares` bounds (kernel/sched: MIN_SHARES, MAX_SHARES).
const MIN_SHARES: u64 = 2;
const MAX_SHARES: u64 = 262_144;

/// Most PATH entries searched, so a hostile PATH cannot make the plan huge.
const MAX_PATH_ENTRIES: usize = 64;

/// PATH used for the executable lookup when `env` has none (Docker's).
pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Longest hostname (HOST_NAME_MAX).
const MAX_HOSTNAME_LEN: usize = 64;

/// Capabilities every container keeps: Docker's default set.
pub(crate) const DEFAULT_CAPS: [u32; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// [`DEFAULT_CAPS`] as a bit mask (`CapEff` in /proc/self/status).
pub(crate) fn default_cap_mask() -> u64 {
    DEFAULT_CAPS.iter().fold(0, |m, c| m | (1u64 << c))
}

/// Whether `id` is a valid container id: `[A-Za-z0-9._-]{1,128}`, not `.`
/// or `..` (it names a cgroup directory).
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The cgroup subtree: `/`-separated valid ids.
pub(crate) fn valid_cgroup_root(root: &str) -> bool {
    !root.is_empty() && root.split('/').all(valid_id)
}

fn no_nul(what: &str, s: &str) -> Result<(), String> {
    if s.contains('\0') {
        Err(format!("{what} contains a NUL byte"))
    } else {
        Ok(())
    }
}

/// Checks everything that does not need the filesystem.
pub(crate) fn validate(spec: &ContainerSpec) -> Result<(), String> {
    if !valid_id(&spec.id) {
        return Err(format!(
            "id must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9._-] and not '.' or '..'"
        ));
    }
    let Some(program) = spec.argv.first() else {
        return Err("argv is empty".into());
    };
    if program.is_empty() {
        return Err("argv[0] is empty".into());
    }
    for arg in &spec.argv {
        no_nul("argv", arg)?;
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') {
            return Err(format!(
                "environment variable name '{key}' is empty or contains '='"
            ));
        }
        no_nul("environment variable name", key)?;
        no_nul("environment variable value", value)?;
    }
    if !spec.cwd.is_absolute() {
        return Err(format!("cwd {} is not absolute", spec.cwd.display()));
    }
    no_nul("cwd", &spec.cwd.to_string_lossy())?;
    if spec.hostname.is_empty() || spec.hostname.len() > MAX_HOSTNAME_LEN {
        return Err(format!("hostname must be 1-{MAX_HOSTNAME_LEN} bytes"));
    }
    no_nul("hostname", &spec.hostname)?;
    if spec.cpus_milli == 0 {
        return Err("cpus_milli must be > 0".into());
    }
    if spec.mem_bytes < MIN_MEM_BYTES {
        return Err(format!(
            "mem_bytes {} is below the minimum {MIN_MEM_BYTES}",
            spec.mem_bytes
        ));
    }
    if i64::try_from(spec.mem_bytes).is_err() {
        return Err(format!("mem_bytes {} is too large", spec.mem_bytes));
    }
    for m in &spec.mounts {
        if !m.source.is_absolute() {
            return Err(format!(
                "mount source {} is not absolute",
                m.source.display()
            ));
        }
        if !m.target.is_absolute() || m.target == Path::new("/") {
            return Err(format!(
                "mount target {} must be an absolute path other than /",
                m.target.display()
            ));
        }
    }
    Ok(())
}

/// cgroup limits derived from a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// v1 `cpu.shares` (v2 converts it to `cpu.weight`).
    pub(crate) shares: u64,
    /// CFS quota per [`CFS_PERIOD_US`]; `None` without a hard limit.
    pub(crate) quota_us: Option<u64>,
    pub(crate) mem_bytes: u64,
    pub(crate) pids: u64,
}

/// `cpus * 1024` shares (at least 2) and `cpus * period` quota, as Mesos'
/// cgroups isolator computes them.
pub(crate) fn limits(cpus_milli: u64, mem_bytes: u64, hard_cpu: bool, pids: u64) -> Limits {
    let shares = (cpus_milli.saturating_mul(1024) / 1000).clamp(MIN_SHARES, MAX_SHARES);
    let quota_us =
        hard_cpu.then(|| (cpus_milli.saturating_mul(CFS_PERIOD_US) / 1000).max(MIN_CFS_QUOTA_US));
    Limits {
        shares,
        quota_us,
        mem_bytes,
        pids,
    }
}

/// cgroup v2 `cpu.weight` for v1 shares (the formula runc and Kubernetes
/// use: 2..262144 maps linearly onto 1..10000).
pub(crate) fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(MIN_SHARES, MAX_SHARES);
    1 + ((shares - 2) * 9999) / 262_142
}

/// Where to look for `program`: itself when it contains a `/`, else each
/// entry of `PATH` from `env` (the last `PATH` wins, as in a shell), or
/// [`DEFAULT_PATH`]. Empty entries are skipped.
pub(crate) fn exec_candidates(program: &str, env: &[(String, String)]) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .take(MAX_PATH_ENTRIES)
        .map(|dir| format!("{}/{program}", dir.trim_end_matches('/')))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::RootFs;
    use super::*;
    use std::os::fd::OwnedFd;

    fn devnull() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    fn spec() -> ContainerSpec {
        ContainerSpec {
            id: "task-1.a_b".into(),
            argv: vec!["/bin/true".into()],
            env: vec![("PATH".into(), "/bin".into())],
            cwd: "/".into(),
            rootfs: RootFs::Host,
            hostname: "h".into(),
            mounts: vec![],
            user: None,
            cpus_milli: 500,
            mem_bytes: 64 << 20,
            output: crate::containerizer::Output::Fds {
                stdout: devnull(),
                stderr: devnull(),
            },
            state_dir: None,
            netns: None,
        }
    }

    #[test]
    fn ids_are_cgroup_safe_names() {
        assert!(valid_id("a"));
        assert!(valid_id(&"x".repeat(128)));
        assert!(!valid_id(&"x".repeat(129)));
        for bad in ["", ".", "..", "a/b", "a b", "a\0", "é"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
        assert!(valid_cgroup_root("corral"));
        assert!(valid_cgroup_root("corral/agent-1"));
        assert!(!valid_cgroup_root("corral/../x"));
        assert!(!valid_cgroup_root("/corral"));
        assert!(!valid_cgroup_root(""));
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert_eq!(validate(&spec()), Ok(()));
        type Tweak = Box<dyn Fn(&mut ContainerSpec)>;
        let cases: Vec<(Tweak, &str)> = vec![
            (Box::new(|s| s.id = "a/b".into()), "id must be"),
            (Box::new(|s| s.argv.clear()), "argv is empty"),
            (Box::new(|s| s.argv = vec!["".into()]), "argv[0] is empty"),
            (
                Box::new(|s| s.argv.push("a\0b".into())),
                "argv contains a NUL",
            ),
            (
                Box::new(|s| s.env.push(("A=B".into(), "x".into()))),
                "contains '='",
            ),
            (
                Box::new(|s| s.env.push(("A".into(), "\0".into()))),
                "value contains a NUL",
            ),
            (
                Box::new(|s| s.cwd = "rel".into()),
                "cwd rel is not absolute",
            ),
            (
                Box::new(|s| s.hostname = "h".repeat(65)),
                "hostname must be",
            ),
            (Box::new(|s| s.cpus_milli = 0), "cpus_milli"),
            (Box::new(|s| s.mem_bytes = 1 << 20), "below the minimum"),
            (Box::new(|s| s.mem_bytes = u64::MAX), "too large"),
            (
                Box::new(|s| {
                    s.mounts.push(super::super::BindMount {
                        source: "/x".into(),
                        target: "/".into(),
                        read_only: false,
                    })
                }),
                "other than /",
            ),
        ];
        for (tweak, want) in cases {
            let mut s = spec();
            tweak(&mut s);
            let err = validate(&s).unwrap_err();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn limits_follow_mesos_cpu_and_memory_rules() {
        let l = limits(500, 64 << 20, true, 4096);
        assert_eq!(l.shares, 512);
        assert_eq!(l.quota_us, Some(50_000));
        assert_eq!(l.mem_bytes, 64 << 20);
        assert_eq!(limits(1, 1 << 30, true, 1).shares, 2, "min shares");
        assert_eq!(
            limits(1, 1 << 30, true, 1).quota_us,
            Some(1_000),
            "min quota"
        );
        assert_eq!(limits(2500, 1 << 30, true, 1).quota_us, Some(250_000));
        assert_eq!(limits(2500, 1 << 30, false, 1).quota_us, None);
        assert_eq!(limits(u64::MAX, 1, true, 1).shares, 262_144);
    }

    #[test]
    fn v2_weight_maps_the_share_range() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn docker_default_caps_mask() {
        assert_eq!(default_cap_mask(), 0xa804_25fb);
    }

    #[test]
    fn executable_lookup_uses_the_task_path() {
        assert_eq!(exec_candidates("/bin/x", &[]), vec!["/bin/x"]);
        assert_eq!(exec_candidates("./x", &[]), vec!["./x"]);
        let env = vec![
            ("PATH".to_string(), "/nope".to_string()),
            ("PATH".to_string(), "/a/::/b/".to_string()),
        ];
        assert_eq!(exec_candidates("sh", &env), vec!["/a/sh", "/b/sh"]);
        assert_eq!(exec_candidates("sh", &[]).len(), 6);
        assert_eq!(exec_candidates("sh", &[])[0], "/usr/local/sbin/sh");
    }
}
