//! Pods (task groups, Mesos LAUNCH_GROUP): the tasks of one pod run as
//! containers that share a network namespace (the pod's own IP on the
//! agent's bridge) and the pod's volumes, each with its own cgroup limits.
//!
//! This module is the pure part the actor uses: the pod's restart policy
//! (what happens when one of its containers ends), the restart backoff,
//! and where the pod's volumes live on the agent (`emptyDir`s in the pod's
//! dir, host paths, the framework's persistent volumes). Time comes in as
//! an argument.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use corral_proto::{FrameworkId, VolumeId, pb};

/// First restart delay of a container (Marathon's backoff; Kubernetes
/// starts at 10 s).
pub(crate) const RESTART_INITIAL: Duration = Duration::from_secs(1);
/// Longest restart delay (Kubernetes' CrashLoopBackOff cap).
pub(crate) const RESTART_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long starts its backoff over (Kubernetes).
pub(crate) const RESTART_RESET_AFTER: Duration = Duration::from_secs(600);

/// The pod's restart policy (`pb::PodRestartPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    Always,
    OnFailure,
    Never,
}

impl Policy {
    pub(crate) fn to_proto(self) -> pb::PodRestartPolicy {
        match self {
            Policy::Always => pb::PodRestartPolicy::Always,
            Policy::OnFailure => pb::PodRestartPolicy::OnFailure,
            Policy::Never => pb::PodRestartPolicy::Never,
        }
    }

    pub(crate) fn from_proto(value: i32) -> Policy {
        match pb::PodRestartPolicy::try_from(value) {
            Ok(pb::PodRestartPolicy::OnFailure) => Policy::OnFailure,
            Ok(pb::PodRestartPolicy::Never) => Policy::Never,
            _ => Policy::Always,
        }
    }
}

/// What to do when a container of a pod has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Start the task's container again at `at`: same task (it stays
    /// RUNNING), same pod network and volumes.
    Restart { at: Instant },
    /// The task ends with the container's exit; the rest of the pod runs on.
    End,
    /// The task ends and the pod's other tasks are killed: the pod fails as
    /// a unit (Mesos' default executor; `Never`).
    EndAndKillPod,
}

/// One container's restarts.
#[derive(Debug, Clone)]
pub(crate) struct Restarts {
    pub(crate) count: u32,
    delay: Duration,
    started_at: Instant,
}

impl Restarts {
    pub(crate) fn new(started_at: Instant) -> Restarts {
        Restarts {
            count: 0,
            delay: Duration::ZERO,
            started_at,
        }
    }

    /// The container (re)started at `now`.
    pub(crate) fn started(&mut self, now: Instant) {
        self.started_at = now;
    }

    /// The delay before the next restart: doubling from [`RESTART_INITIAL`]
    /// to [`RESTART_MAX`], from the start again after a long run.
    fn next_delay(&mut self, now: Instant) -> Duration {
        let ran = now.saturating_duration_since(self.started_at);
        self.delay = if self.delay.is_zero() || ran >= RESTART_RESET_AFTER {
            RESTART_INITIAL
        } else {
            self.delay.saturating_mul(2).min(RESTART_MAX)
        };
        self.count += 1;
        self.delay
    }
}

/// Decides what follows a container's end. `succeeded`: it exited 0.
/// `stopping`: the task or the pod is being killed (by the framework, the
/// agent, or the pod failing), so nothing restarts.
pub(crate) fn on_exit(
    policy: Policy,
    restarts: &mut Restarts,
    succeeded: bool,
    stopping: bool,
    now: Instant,
) -> Verdict {
    if stopping {
        return Verdict::End;
    }
    let restart = match policy {
        Policy::Always => true,
        Policy::OnFailure => !succeeded,
        Policy::Never => false,
    };
    if restart {
        let delay = restarts.next_delay(now);
        Verdict::Restart { at: now + delay }
    } else if succeeded || policy == Policy::OnFailure {
        Verdict::End
    } else {
        Verdict::EndAndKillPod
    }
}

/// The pod's directory on the agent: its `emptyDir` volumes live here and
/// go with the pod.
pub(crate) fn pod_dir(work_dir: &Path, pod_id: &str) -> PathBuf {
    work_dir.join("pods").join(pod_id)
}

/// Where a pod volume comes from on the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VolumeSource {
    /// Made with the pod, removed with it (under the pod dir).
    EmptyDir(PathBuf),
    /// An allowed directory of the host.
    HostPath(PathBuf),
    /// One of the framework's persistent volumes: its data dir, which was
    /// there before the pod and stays after it.
    Persistent { id: VolumeId, path: PathBuf },
}

impl VolumeSource {
    /// The directory the pod's containers bind-mount.
    pub(crate) fn path(&self) -> &Path {
        match self {
            VolumeSource::EmptyDir(p) | VolumeSource::HostPath(p) => p,
            VolumeSource::Persistent { path, .. } => path,
        }
    }
}

/// The host directory behind a pod volume, or why there is none. Host
/// paths must be under one of `allowed` (the agent's
/// `--allowed-host-paths`); a persistent volume is the data dir of
/// `framework_id`'s volume of that id on this agent (whether it exists is
/// the volume thread's to say, in order with creates and destroys).
pub(crate) fn volume_source(
    work_dir: &Path,
    pod_dir: &Path,
    framework_id: &FrameworkId,
    volume: &pb::PodVolume,
    allowed: &[PathBuf],
) -> Result<VolumeSource, String> {
    match &volume.source {
        Some(pb::pod_volume::Source::EmptyDir(_)) => Ok(VolumeSource::EmptyDir(
            pod_dir.join("volumes").join(&volume.name),
        )),
        Some(pb::pod_volume::Source::HostPath(path)) => {
            let path = Path::new(path);
            if allowed.iter().any(|prefix| path.starts_with(prefix)) {
                Ok(VolumeSource::HostPath(path.to_path_buf()))
            } else {
                Err(format!(
                    "host path {} is not under the agent's --allowed-host-paths",
                    path.display()
                ))
            }
        }
        Some(pb::pod_volume::Source::Persistent(id)) => {
            let id = VolumeId::parse(id, "persistent").map_err(|e| e.to_string())?;
            let path = crate::volumes::data_dir(work_dir, framework_id, &id);
            Ok(VolumeSource::Persistent { id, path })
        }
        None => Err("has no source".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn always_restarts_with_a_doubling_capped_delay_that_resets_after_a_long_run() {
        let t0 = Instant::now();
        let mut r = Restarts::new(t0);
        let mut now = t0;
        let mut delays = Vec::new();
        for _ in 0..11 {
            match on_exit(Policy::Always, &mut r, true, false, now) {
                Verdict::Restart { at } => {
                    delays.push((at - now).as_secs());
                    now = at;
                    r.started(now);
                }
                other => panic!("expected a restart, got {other:?}"),
            }
        }
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(r.count, 11);
        // Ten minutes of running: the next delay is the first one again.
        now += RESTART_RESET_AFTER;
        assert_eq!(
            on_exit(Policy::Always, &mut r, false, false, now),
            Verdict::Restart { at: now + secs(1) }
        );
    }

    #[test]
    fn on_failure_restarts_failures_and_ends_successes() {
        let now = Instant::now();
        let mut r = Restarts::new(now);
        assert_eq!(
            on_exit(Policy::OnFailure, &mut r, false, false, now),
            Verdict::Restart { at: now + secs(1) }
        );
        assert_eq!(
            on_exit(Policy::OnFailure, &mut r, true, false, now),
            Verdict::End
        );
    }

    #[test]
    fn never_ends_a_success_alone_and_fails_the_pod_on_a_failure() {
        let now = Instant::now();
        let mut r = Restarts::new(now);
        assert_eq!(
            on_exit(Policy::Never, &mut r, true, false, now),
            Verdict::End
        );
        assert_eq!(
            on_exit(Policy::Never, &mut r, false, false, now),
            Verdict::EndAndKillPod
        );
        assert_eq!(r.count, 0);
    }

    #[test]
    fn nothing_restarts_while_the_task_or_pod_is_being_killed() {
        let now = Instant::now();
        for policy in [Policy::Always, Policy::OnFailure, Policy::Never] {
            let mut r = Restarts::new(now);
            assert_eq!(on_exit(policy, &mut r, false, true, now), Verdict::End);
        }
    }

    #[test]
    fn the_policy_defaults_to_always() {
        assert_eq!(Policy::from_proto(0), Policy::Always);
        assert_eq!(Policy::from_proto(99), Policy::Always);
        assert_eq!(
            Policy::from_proto(pb::PodRestartPolicy::Never as i32),
            Policy::Never
        );
    }

    #[test]
    fn volumes_are_pod_dirs_or_allowed_host_paths() {
        let work = Path::new("/w");
        let pod = Path::new("/w/pods/p1");
        let fw = FrameworkId::parse("fw-1", "framework_id").unwrap();
        let allowed = vec![PathBuf::from("/srv")];
        let empty = pb::PodVolume {
            name: "cache".into(),
            source: Some(pb::pod_volume::Source::EmptyDir(pb::EmptyDirVolume {})),
        };
        assert_eq!(
            volume_source(work, pod, &fw, &empty, &allowed),
            Ok(VolumeSource::EmptyDir(PathBuf::from(
                "/w/pods/p1/volumes/cache"
            )))
        );
        let host = |p: &str| pb::PodVolume {
            name: "h".into(),
            source: Some(pb::pod_volume::Source::HostPath(p.into())),
        };
        assert_eq!(
            volume_source(work, pod, &fw, &host("/srv/data"), &allowed),
            Ok(VolumeSource::HostPath(PathBuf::from("/srv/data")))
        );
        let refused = volume_source(work, pod, &fw, &host("/srvx/data"), &allowed).unwrap_err();
        assert!(refused.contains("--allowed-host-paths"), "{refused}");
    }

    #[test]
    fn a_persistent_volume_is_the_frameworks_data_dir_outside_the_pod_dir() {
        let work = Path::new("/w");
        let pod = Path::new("/w/pods/p1");
        let fw = FrameworkId::parse("fw-1", "framework_id").unwrap();
        let persistent = |id: &str| pb::PodVolume {
            name: "data".into(),
            source: Some(pb::pod_volume::Source::Persistent(id.into())),
        };
        let source = volume_source(work, pod, &fw, &persistent("db-0"), &[]).unwrap();
        assert_eq!(source.path(), Path::new("/w/volumes/fw-1/db-0"));
        assert_eq!(
            source,
            VolumeSource::Persistent {
                id: VolumeId::parse("db-0", "id").unwrap(),
                path: PathBuf::from("/w/volumes/fw-1/db-0"),
            }
        );
        assert!(
            !source.path().starts_with(pod),
            "tearing the pod down must not reach the volume"
        );
        // The id names a directory: it must not climb out of the framework's.
        for bad in ["..", "../fw-2/db", ""] {
            let err = volume_source(work, pod, &fw, &persistent(bad), &[]).unwrap_err();
            assert!(err.starts_with("persistent: "), "{bad}: {err}");
        }
    }
}
