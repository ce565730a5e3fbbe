//! Garbage collection of the sandboxes of finished tasks.
//!
//! A finished task's sandbox (its `stdout`/`stderr`, files it wrote) stays
//! for `--sandbox-gc-delay` after the framework acknowledged the task's end,
//! so users can read the logs, like Mesos' `--gc_delay`; and at most
//! `--sandbox-gc-max` finished sandboxes are kept, oldest removed first, like
//! Nomad's `gc_max_allocs`, so a batch workload of millions of short tasks
//! does not fill the disk (or the inode table) before the delay is up.
//!
//! The schedule is pure (time is an argument); the actor removes what
//! [`SandboxGc::take_due`] returns on the blocking pool.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

pub(crate) struct SandboxGc {
    delay: Duration,
    max: usize,
    /// Oldest first; times never decrease (one delay for all).
    queue: VecDeque<(Instant, PathBuf)>,
}

impl SandboxGc {
    pub(crate) fn new(delay: Duration, max: usize) -> Self {
        Self {
            delay,
            max,
            queue: VecDeque::new(),
        }
    }

    /// The task using `sandbox` is over: remove it after the delay.
    pub(crate) fn finished(&mut self, sandbox: PathBuf, now: Instant) {
        self.queue.push_back((now + self.delay, sandbox));
    }

    /// Sandboxes found at start (their tasks are gone), with how long ago
    /// each was last written: they keep what is left of their delay.
    pub(crate) fn adopt(&mut self, mut found: Vec<(PathBuf, Duration)>, now: Instant) {
        // Oldest first, so the queue stays ordered.
        found.sort_by_key(|(_, age)| std::cmp::Reverse(*age));
        let adopted = found.into_iter().map(|(path, age)| {
            let at = now + self.delay.saturating_sub(age);
            (at, path)
        });
        let mut merged: Vec<_> = adopted.chain(self.queue.drain(..)).collect();
        merged.sort_by_key(|(at, _)| *at);
        self.queue = merged.into();
    }

    pub(crate) fn retained(&self) -> usize {
        self.queue.len()
    }

    /// When [`take_due`](Self::take_due) next has work.
    pub(crate) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        if self.queue.len() > self.max {
            return Some(now);
        }
        self.queue.front().map(|(at, _)| *at)
    }

    /// Sandboxes to remove now: those past their delay, and the oldest
    /// beyond the count limit.
    pub(crate) fn take_due(&mut self, now: Instant) -> Vec<PathBuf> {
        let mut due = Vec::new();
        while let Some((at, _)) = self.queue.front() {
            if *at > now && self.queue.len() <= self.max {
                break;
            }
            if let Some((_, path)) = self.queue.pop_front() {
                due.push(path);
            }
        }
        due
    }
}

/// Removes sandboxes (blocking), and their framework directories once
/// empty. Errors are logged: a sandbox that cannot be removed now is not
/// worth stopping for.
pub(crate) fn remove(paths: &[PathBuf]) {
    for path in paths {
        match std::fs::remove_dir_all(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "cannot remove sandbox"),
        }
        // Fails while the framework has other sandboxes: that is fine.
        if let Some(parent) = path.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// Sandboxes under `<work_dir>/sandboxes/<framework>/<task>` and their age
/// (since last modified). At start no task runs yet (the agent does not
/// recover tasks), so all of them are finished tasks'.
pub(crate) fn find_sandboxes(work_dir: &Path) -> Vec<(PathBuf, Duration)> {
    let mut found = Vec::new();
    let Ok(frameworks) = std::fs::read_dir(work_dir.join("sandboxes")) else {
        return found;
    };
    for framework in frameworks.flatten() {
        let Ok(tasks) = std::fs::read_dir(framework.path()) else {
            continue;
        };
        for task in tasks.flatten() {
            let age = task
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            found.push((task.path(), age));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn sandboxes_go_after_the_delay() {
        let t0 = Instant::now();
        let mut gc = SandboxGc::new(Duration::from_secs(60), 100);
        gc.finished(p("/s/a"), t0);
        gc.finished(p("/s/b"), t0 + Duration::from_secs(10));
        assert_eq!(gc.next_deadline(t0), Some(t0 + Duration::from_secs(60)));
        assert!(gc.take_due(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(gc.take_due(t0 + Duration::from_secs(60)), [p("/s/a")]);
        assert_eq!(gc.take_due(t0 + Duration::from_secs(80)), [p("/s/b")]);
        assert_eq!(gc.next_deadline(t0), None);
    }

    #[test]
    fn the_oldest_go_early_beyond_the_count_limit() {
        let t0 = Instant::now();
        let mut gc = SandboxGc::new(Duration::from_secs(3600), 2);
        for name in ["/s/a", "/s/b", "/s/c"] {
            gc.finished(p(name), t0);
        }
        assert_eq!(gc.next_deadline(t0), Some(t0));
        assert_eq!(gc.take_due(t0), [p("/s/a")]);
        assert_eq!(gc.retained(), 2);
        assert_eq!(gc.next_deadline(t0), Some(t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn adopted_sandboxes_keep_what_is_left_of_their_delay() {
        let t0 = Instant::now();
        let mut gc = SandboxGc::new(Duration::from_secs(100), 10);
        gc.finished(p("/s/new"), t0);
        gc.adopt(
            vec![
                (p("/s/recent"), Duration::from_secs(30)),
                (p("/s/ancient"), Duration::from_secs(1000)),
            ],
            t0,
        );
        assert_eq!(gc.take_due(t0), [p("/s/ancient")]);
        assert_eq!(gc.take_due(t0 + Duration::from_secs(70)), [p("/s/recent")]);
        assert_eq!(gc.take_due(t0 + Duration::from_secs(100)), [p("/s/new")]);
    }

    #[test]
    fn remove_deletes_the_sandbox_and_an_empty_framework_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("sandboxes/fw1/t1");
        let b = dir.path().join("sandboxes/fw2/t1");
        let c = dir.path().join("sandboxes/fw2/t2");
        for s in [&a, &b, &c] {
            std::fs::create_dir_all(s).unwrap();
            std::fs::write(s.join("stdout"), "x").unwrap();
        }
        let found = find_sandboxes(dir.path());
        assert_eq!(found.len(), 3);
        remove(&[a.clone(), b.clone()]);
        assert!(!a.exists() && !dir.path().join("sandboxes/fw1").exists());
        assert!(!b.exists() && c.exists(), "fw2 still has t2");
    }
}
