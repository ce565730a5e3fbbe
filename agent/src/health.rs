//! Health checks run by the agent: startup, liveness and readiness checks
//! with command, HTTP and TCP probes (Kubernetes probe semantics, Mesos
//! reporting).
//!
//! - [`checks_from_proto`]: a task's `HealthCheck`s as [`CheckSpec`]s, with
//!   defaults filled in; the master validated them, but the agent never
//!   trusts the wire (a check it cannot use is skipped, and logged).
//! - [`Health`]: the pure decision logic — thresholds, the grace period,
//!   startup gating, what changed. "Now" and probe results come in as
//!   arguments; what to report or do comes out as [`Effects`].
//! - [`Monitor`]: one per running task with checks, owned by the actor:
//!   spawns a probe runner (a tokio task) per active check, feeds results
//!   into its [`Health`], starts liveness and readiness once startup passed,
//!   and aborts every runner when it is dropped or stopped.
//! - `probe`: the probes themselves (command in the task's container, HTTP
//!   GET, TCP connect) and the runner loop.
//! - `enter`: how a command probe gets into a container (namespaces,
//!   cgroups, root, credentials), the only `unsafe` here.
//!
//! A runner reports each result to the actor as `Command::HealthResult`;
//! the actor owns the task's state and turns [`Effects`] into status
//! updates (`healthy`/`ready`, reason `TASK_HEALTH_CHECK_STATUS_UPDATED`)
//! or a kill (`KillCause::Unhealthy`, which ends the task `TASK_FAILED`
//! with `REASON_TASK_UNHEALTHY`).

mod enter;
mod probe;

use std::sync::Arc;
use std::time::Duration;

use corral_proto::pb;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::actor::{AbortOnDrop, Command, StreamKey};

pub(crate) use enter::{ContainerEntry, pidfd_open};
pub(crate) use probe::{ExecTarget, Outcome, ProbeTarget};

/// `delay_seconds` when absent (Kubernetes `initialDelaySeconds`).
const DEFAULT_DELAY: Duration = Duration::ZERO;
/// `interval_seconds` when absent (Kubernetes `periodSeconds`).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// `timeout_seconds` when absent (Mesos' default; Kubernetes has 1 s,
/// which is tight for a command probe on a loaded machine).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// `consecutive_failures` when absent (Kubernetes `failureThreshold`).
const DEFAULT_FAILURES: u32 = 3;
/// `consecutive_successes` when absent (Kubernetes `successThreshold`).
const DEFAULT_SUCCESSES: u32 = 1;
/// Longest duration honoured (the master allows up to a year); keeps
/// `Instant + duration` from overflowing on absurd values.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 60 * 60);
/// Shortest interval honoured: a near-zero one from a bypassed master
/// would make a runner probe in a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// What a check decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    /// The metric label and the word in messages.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Kind::Startup => "startup",
            Kind::Liveness => "liveness",
            Kind::Readiness => "readiness",
        }
    }

    fn from_proto(kind: i32) -> Option<Self> {
        use pb::health_check::Kind as K;
        match K::try_from(kind).ok()? {
            K::Unspecified | K::Liveness => Some(Kind::Liveness),
            K::Readiness => Some(Kind::Readiness),
            K::Startup => Some(Kind::Startup),
        }
    }
}

/// What one probe does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeSpec {
    /// `argv[0]` is looked up in the task's `PATH`; exit 0 is a success.
    Command { argv: Vec<String> },
    /// `GET path` on the task's address; 200-399 is a success.
    Http { port: u16, path: String },
    /// A connection to the task's address that opens is a success.
    Tcp { port: u16 },
}

/// One health check of a task, defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckSpec {
    pub(crate) kind: Kind,
    pub(crate) probe: ProbeSpec,
    pub(crate) delay: Duration,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) grace: Duration,
    pub(crate) failures: u32,
    pub(crate) successes: u32,
}

/// Whether any check of the task has a command probe (which needs a way
/// into the task's container).
pub(crate) fn has_command_probe(checks: &[pb::HealthCheck]) -> bool {
    checks
        .iter()
        .any(|c| matches!(c.probe, Some(pb::health_check::Probe::Command(_))))
}

/// The task's checks the agent can run, and why it cannot run the others
/// (`health_checks[1]: ...`). The first check of each kind wins.
pub(crate) fn checks_from_proto(checks: &[pb::HealthCheck]) -> (Vec<CheckSpec>, Vec<String>) {
    let mut specs: Vec<CheckSpec> = Vec::new();
    let mut errors = Vec::new();
    for (i, check) in checks.iter().enumerate() {
        match check_from_proto(check) {
            Ok(spec) if specs.iter().any(|s| s.kind == spec.kind) => errors.push(format!(
                "health_checks[{i}]: a second {} check",
                spec.kind.label()
            )),
            Ok(spec) => specs.push(spec),
            Err(e) => errors.push(format!("health_checks[{i}].{e}")),
        }
    }
    (specs, errors)
}

fn check_from_proto(check: &pb::HealthCheck) -> Result<CheckSpec, String> {
    use pb::health_check::Probe;
    let kind =
        Kind::from_proto(check.kind).ok_or_else(|| format!("kind: unknown {}", check.kind))?;
    let probe = match &check.probe {
        None => return Err("probe: missing".into()),
        Some(Probe::Command(c)) => {
            let argv = if c.shell {
                vec!["/bin/sh".to_string(), "-c".to_string(), c.value.clone()]
            } else if !c.arguments.is_empty() {
                let mut argv = c.arguments.clone();
                // As in `CommandInfo`: `value` names the program when set,
                // `arguments` is the whole argv.
                if !c.value.is_empty() {
                    argv[0] = c.value.clone();
                }
                argv
            } else {
                vec![c.value.clone()]
            };
            if argv.first().is_none_or(String::is_empty) || (c.shell && c.value.is_empty()) {
                return Err("command.value: empty".into());
            }
            if argv.iter().any(|a| a.contains('\0')) {
                return Err("command: contains NUL".into());
            }
            ProbeSpec::Command { argv }
        }
        Some(Probe::Http(h)) => {
            if !h.scheme.is_empty() && h.scheme != "http" {
                return Err(format!("http.scheme: '{}' is not supported", h.scheme));
            }
            let path = if h.path.is_empty() { "/" } else { &h.path };
            // It goes into the request line verbatim: no room for spaces,
            // CR/LF or anything else that would split it.
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err("http.path: must start with '/', without spaces".into());
            }
            ProbeSpec::Http {
                port: port(h.port).ok_or("http.port: must be 1-65535")?,
                path: path.to_string(),
            }
        }
        Some(Probe::Tcp(t)) => ProbeSpec::Tcp {
            port: port(t.port).ok_or("tcp.port: must be 1-65535")?,
        },
    };
    let duration = |value: Option<f64>, default: Duration, name: &str, positive: bool| match value {
        None => Ok(default),
        Some(s) if s.is_finite() && (s > 0.0 || (!positive && s == 0.0)) => {
            Ok(Duration::from_secs_f64(s.min(MAX_DURATION.as_secs_f64())))
        }
        Some(s) => Err(format!("{name}: {s} is not a usable duration")),
    };
    let threshold = |value: Option<u32>, default: u32, name: &str| match value {
        None => Ok(default),
        Some(0) => Err(format!("{name}: must be >= 1")),
        Some(n) => Ok(n),
    };
    let successes = threshold(
        check.consecutive_successes,
        DEFAULT_SUCCESSES,
        "consecutive_successes",
    )?;
    Ok(CheckSpec {
        kind,
        probe,
        delay: duration(check.delay_seconds, DEFAULT_DELAY, "delay_seconds", false)?,
        interval: duration(
            check.interval_seconds,
            DEFAULT_INTERVAL,
            "interval_seconds",
            true,
        )?
        .max(MIN_INTERVAL),
        timeout: duration(
            check.timeout_seconds,
            DEFAULT_TIMEOUT,
            "timeout_seconds",
            true,
        )?,
        grace: duration(
            check.grace_period_seconds,
            Duration::ZERO,
            "grace_period_seconds",
            false,
        )?,
        failures: threshold(
            check.consecutive_failures,
            DEFAULT_FAILURES,
            "consecutive_failures",
        )?,
        // Kubernetes: liveness and startup probes pass on one success.
        successes: if kind == Kind::Readiness {
            successes
        } else {
            1
        },
    })
}

fn port(value: u32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// What one probe result changes; all empty: nothing to report or do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// `healthy` or `ready` changed: report it in a RUNNING update with
    /// this message.
    pub(crate) update: Option<String>,
    /// A liveness or startup check failed: kill the task, with this message.
    pub(crate) kill: Option<String>,
    /// The startup check passed: liveness and readiness probes start now.
    pub(crate) startup_passed: bool,
}

/// The running tally of one check.
#[derive(Debug, Clone)]
struct Track {
    failures_needed: u32,
    successes_needed: u32,
    grace: Duration,
    failures: u32,
    successes: u32,
    passed_once: bool,
}

/// The health of one task: the pure decisions, no I/O and no clock.
///
/// Follows Kubernetes for thresholds and startup gating, and Mesos for the
/// grace period: a failure within `grace` of the task's start is ignored
/// until the check has passed once (Mesos' `HealthChecker` stops ignoring
/// failures at the first success).
#[derive(Debug, Clone)]
pub(crate) struct Health {
    started: Instant,
    startup: Option<Track>,
    liveness: Option<Track>,
    readiness: Option<Track>,
    healthy: Option<bool>,
    ready: Option<bool>,
    /// A liveness or startup check decided the task's end: later results
    /// (already on their way) change nothing.
    failed: bool,
    /// Why, once `failed`: the message of the kill.
    failure: Option<String>,
}

impl Health {
    /// The health of a task that became RUNNING at `started`.
    pub(crate) fn new(specs: &[CheckSpec], started: Instant) -> Self {
        let track = |kind: Kind| {
            specs.iter().find(|s| s.kind == kind).map(|s| Track {
                failures_needed: s.failures.max(1),
                successes_needed: s.successes.max(1),
                grace: s.grace,
                failures: 0,
                successes: 0,
                passed_once: false,
            })
        };
        let readiness = track(Kind::Readiness);
        Self {
            started,
            startup: track(Kind::Startup),
            liveness: track(Kind::Liveness),
            // Not ready until its probe says so.
            ready: readiness.as_ref().map(|_| false),
            readiness,
            healthy: None,
            failed: false,
            failure: None,
        }
    }

    /// Why a liveness or startup check failed the task, once one did.
    pub(crate) fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The latest liveness verdict; `None` before the first one.
    pub(crate) fn healthy(&self) -> Option<bool> {
        self.healthy
    }

    /// The readiness verdict; `None` when the task has no readiness check.
    pub(crate) fn ready(&self) -> Option<bool> {
        self.ready
    }

    /// The checks whose probes run now: the startup check until it passed,
    /// then liveness and readiness; none once the task failed one.
    pub(crate) fn active(&self) -> Vec<Kind> {
        if self.failed {
            return Vec::new();
        }
        if self.startup.as_ref().is_some_and(|t| !t.passed_once) {
            return vec![Kind::Startup];
        }
        [
            (Kind::Liveness, self.liveness.is_some()),
            (Kind::Readiness, self.readiness.is_some()),
        ]
        .into_iter()
        .filter_map(|(k, present)| present.then_some(k))
        .collect()
    }

    /// Takes one probe result of `kind` (`Err` carries why it failed)
    /// at `now`, and says what changed.
    pub(crate) fn record(&mut self, kind: Kind, now: Instant, result: Result<(), &str>) -> Effects {
        // Results of a check that is not running (one already on its way
        // when startup passed or the task failed) are stale.
        if !self.active().contains(&kind) {
            return Effects::default();
        }
        let started = self.started;
        let Some(track) = (match kind {
            Kind::Startup => self.startup.as_mut(),
            Kind::Liveness => self.liveness.as_mut(),
            Kind::Readiness => self.readiness.as_mut(),
        }) else {
            return Effects::default();
        };
        let mut effects = Effects::default();
        match result {
            Ok(()) => {
                track.failures = 0;
                track.successes = track.successes.saturating_add(1);
                track.passed_once = true;
                let passed = track.successes >= track.successes_needed;
                match kind {
                    Kind::Startup => effects.startup_passed = true,
                    Kind::Liveness if self.healthy != Some(true) => {
                        self.healthy = Some(true);
                        effects.update = Some("liveness probe succeeded".into());
                    }
                    Kind::Readiness if passed && self.ready != Some(true) => {
                        self.ready = Some(true);
                        effects.update = Some(format!(
                            "readiness probe succeeded {} time{}",
                            track.successes,
                            if track.successes == 1 { "" } else { "s" }
                        ));
                    }
                    Kind::Liveness | Kind::Readiness => {}
                }
            }
            Err(error) => {
                if !track.passed_once && now < started + track.grace {
                    return effects;
                }
                track.successes = 0;
                track.failures = track.failures.saturating_add(1);
                if track.failures < track.failures_needed {
                    return effects;
                }
                let message = format!(
                    "{} probe failed {} time{}: {error}",
                    kind.label(),
                    track.failures,
                    if track.failures == 1 { "" } else { "s" }
                );
                match kind {
                    Kind::Startup | Kind::Liveness => {
                        self.failed = true;
                        self.healthy = Some(false);
                        self.failure = Some(message.clone());
                        effects.update = Some(message.clone());
                        effects.kill = Some(message);
                    }
                    Kind::Readiness if self.ready == Some(true) => {
                        self.ready = Some(false);
                        effects.update = Some(message);
                    }
                    Kind::Readiness => {}
                }
            }
        }
        effects
    }
}

/// The health checks of one running task: its [`Health`] and the probe
/// runners of its active checks. Dropping it aborts them (and with them
/// any probe still running: a command probe's process group is killed).
pub(crate) struct Monitor {
    key: StreamKey,
    pid: u32,
    health: Health,
    specs: Vec<CheckSpec>,
    target: Arc<ProbeTarget>,
    running_at: Instant,
    runners: Vec<(Kind, AbortOnDrop)>,
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("health", &self.health)
            .field(
                "running",
                &self.runners.iter().map(|r| r.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Monitor {
    /// Starts the probes of a task that is RUNNING now as `pid` (its init
    /// or process group); results come back to the actor on `tx`.
    pub(crate) fn start(
        key: StreamKey,
        pid: u32,
        specs: Vec<CheckSpec>,
        target: Arc<ProbeTarget>,
        tx: mpsc::Sender<Command>,
    ) -> Self {
        let running_at = Instant::now();
        let mut monitor = Self {
            key,
            pid,
            health: Health::new(&specs, running_at),
            specs,
            target,
            running_at,
            runners: Vec::new(),
            tx,
        };
        monitor.spawn_active();
        monitor
    }

    pub(crate) fn healthy(&self) -> Option<bool> {
        self.health.healthy()
    }

    pub(crate) fn ready(&self) -> Option<bool> {
        self.health.ready()
    }

    pub(crate) fn failure(&self) -> Option<&str> {
        self.health.failure()
    }

    /// Takes a runner's result; starts liveness and readiness when startup
    /// passed, stops every probe when the task failed a check.
    pub(crate) fn record(&mut self, kind: Kind, outcome: &Outcome) -> Effects {
        let effects = self
            .health
            .record(kind, Instant::now(), outcome.as_result());
        if effects.startup_passed || effects.kill.is_some() {
            let active = self.health.active();
            self.runners.retain(|(k, _)| active.contains(k));
            self.spawn_active();
        }
        effects
    }

    /// Stops every probe (the task is being killed or ended); the verdicts
    /// stay for the task's last updates.
    pub(crate) fn stop(&mut self) {
        self.runners.clear();
    }

    /// A runner for each active check that has none. A check's first probe
    /// runs its delay after the task started, or now if that is past
    /// (liveness after a slow startup check).
    fn spawn_active(&mut self) {
        let now = Instant::now();
        for kind in self.health.active() {
            if self.runners.iter().any(|(k, _)| *k == kind) {
                continue;
            }
            let Some(spec) = self.specs.iter().find(|s| s.kind == kind).cloned() else {
                continue;
            };
            let first = (self.running_at + spec.delay).max(now);
            let handle = tokio::spawn(probe::run(
                self.key.clone(),
                self.pid,
                spec,
                self.target.clone(),
                first,
                self.tx.clone(),
            ));
            self.runners
                .push((kind, AbortOnDrop(handle.abort_handle())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::health_check::Probe;

    fn spec(kind: Kind, failures: u32, successes: u32, grace: Duration) -> CheckSpec {
        CheckSpec {
            kind,
            probe: ProbeSpec::Tcp { port: 80 },
            delay: Duration::ZERO,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            grace,
            failures,
            successes,
        }
    }

    const FAIL: Result<(), &str> = Err("status 500");

    #[test]
    fn liveness_reports_healthy_on_the_first_success_and_only_once() {
        let t0 = Instant::now();
        let mut h = Health::new(&[spec(Kind::Liveness, 3, 1, Duration::ZERO)], t0);
        assert_eq!((h.healthy(), h.ready()), (None, None));
        let first = h.record(Kind::Liveness, t0, Ok(()));
        assert_eq!(first.update.as_deref(), Some("liveness probe succeeded"));
        assert_eq!(first.kill, None);
        assert_eq!(h.healthy(), Some(true));
        assert_eq!(h.record(Kind::Liveness, t0, Ok(())), Effects::default());
    }

    #[test]
    fn liveness_kills_after_exactly_the_consecutive_failure_threshold() {
        let t0 = Instant::now();
        let mut h = Health::new(&[spec(Kind::Liveness, 3, 1, Duration::ZERO)], t0);
        h.record(Kind::Liveness, t0, Ok(()));
        assert_eq!(h.record(Kind::Liveness, t0, FAIL), Effects::default());
        assert_eq!(h.record(Kind::Liveness, t0, FAIL), Effects::default());
        // A success in between resets the count.
        assert_eq!(h.record(Kind::Liveness, t0, Ok(())), Effects::default());
        assert_eq!(h.record(Kind::Liveness, t0, FAIL), Effects::default());
        assert_eq!(h.record(Kind::Liveness, t0, FAIL), Effects::default());
        assert_eq!(h.healthy(), Some(true));
        let third = h.record(Kind::Liveness, t0, FAIL);
        let message = "liveness probe failed 3 times: status 500";
        assert_eq!(third.update.as_deref(), Some(message));
        assert_eq!(third.kill.as_deref(), Some(message));
        assert_eq!(h.healthy(), Some(false));
        assert_eq!(h.failure(), Some(message));
        // Results already on their way change nothing.
        assert!(h.active().is_empty());
        assert_eq!(h.record(Kind::Liveness, t0, FAIL), Effects::default());
        assert_eq!(h.record(Kind::Liveness, t0, Ok(())), Effects::default());
        assert_eq!(h.healthy(), Some(false));
    }

    #[test]
    fn a_task_that_never_passed_liveness_is_killed_and_reported_unhealthy() {
        let t0 = Instant::now();
        let mut h = Health::new(&[spec(Kind::Liveness, 1, 1, Duration::ZERO)], t0);
        let e = h.record(Kind::Liveness, t0, Err("connection refused"));
        assert_eq!(
            e.kill.as_deref(),
            Some("liveness probe failed 1 time: connection refused")
        );
        assert_eq!(h.healthy(), Some(false));
    }

    #[test]
    fn failures_within_the_grace_period_do_not_count_until_the_first_success() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut h = Health::new(&[spec(Kind::Liveness, 2, 1, grace)], t0);
        for s in 0..10 {
            let now = t0 + Duration::from_secs(s);
            assert_eq!(h.record(Kind::Liveness, now, FAIL), Effects::default());
        }
        assert_eq!(h.healthy(), None);
        // The grace period is over: two failures count.
        let after = t0 + grace;
        assert_eq!(h.record(Kind::Liveness, after, FAIL), Effects::default());
        assert!(h.record(Kind::Liveness, after, FAIL).kill.is_some());

        // A first success ends the grace period early (Mesos).
        let mut h = Health::new(&[spec(Kind::Liveness, 2, 1, grace)], t0);
        h.record(Kind::Liveness, t0, Ok(()));
        let early = t0 + Duration::from_secs(1);
        assert_eq!(h.record(Kind::Liveness, early, FAIL), Effects::default());
        assert!(h.record(Kind::Liveness, early, FAIL).kill.is_some());
    }

    #[test]
    fn startup_gates_liveness_and_readiness_until_it_passes() {
        let t0 = Instant::now();
        let mut h = Health::new(
            &[
                spec(Kind::Liveness, 1, 1, Duration::ZERO),
                spec(Kind::Readiness, 1, 1, Duration::ZERO),
                spec(Kind::Startup, 5, 1, Duration::ZERO),
            ],
            t0,
        );
        assert_eq!(h.active(), [Kind::Startup]);
        assert_eq!((h.healthy(), h.ready()), (None, Some(false)));
        // Stray results of gated checks are ignored: a liveness failure
        // with a threshold of 1 would otherwise kill.
        assert_eq!(h.record(Kind::Liveness, t0, FAIL), Effects::default());
        assert_eq!(h.record(Kind::Readiness, t0, Ok(())), Effects::default());
        assert_eq!(h.record(Kind::Startup, t0, FAIL), Effects::default());
        let passed = h.record(Kind::Startup, t0, Ok(()));
        assert_eq!(
            passed,
            Effects {
                startup_passed: true,
                ..Effects::default()
            }
        );
        assert_eq!(h.active(), [Kind::Liveness, Kind::Readiness]);
        // Startup runs no more; a late result of it is ignored.
        assert_eq!(h.record(Kind::Startup, t0, FAIL), Effects::default());
        assert_eq!(
            h.record(Kind::Liveness, t0, Ok(())).update.as_deref(),
            Some("liveness probe succeeded")
        );
    }

    #[test]
    fn a_failing_startup_check_kills_like_liveness() {
        let t0 = Instant::now();
        let mut h = Health::new(
            &[
                spec(Kind::Startup, 2, 1, Duration::ZERO),
                spec(Kind::Liveness, 1, 1, Duration::ZERO),
            ],
            t0,
        );
        assert_eq!(h.record(Kind::Startup, t0, FAIL), Effects::default());
        let e = h.record(Kind::Startup, t0, FAIL);
        assert_eq!(
            e.kill.as_deref(),
            Some("startup probe failed 2 times: status 500")
        );
        assert_eq!(e.update, e.kill);
        assert_eq!(h.healthy(), Some(false));
        assert!(h.active().is_empty());
    }

    #[test]
    fn readiness_flaps_with_its_thresholds_and_never_kills() {
        let t0 = Instant::now();
        let mut h = Health::new(&[spec(Kind::Readiness, 2, 3, Duration::ZERO)], t0);
        assert_eq!(h.ready(), Some(false));
        // Failures while not ready change nothing.
        for _ in 0..5 {
            assert_eq!(h.record(Kind::Readiness, t0, FAIL), Effects::default());
        }
        assert_eq!(h.record(Kind::Readiness, t0, Ok(())), Effects::default());
        assert_eq!(h.record(Kind::Readiness, t0, Ok(())), Effects::default());
        let ready = h.record(Kind::Readiness, t0, Ok(()));
        assert_eq!(
            ready.update.as_deref(),
            Some("readiness probe succeeded 3 times")
        );
        assert_eq!(h.ready(), Some(true));
        assert_eq!(h.record(Kind::Readiness, t0, Ok(())), Effects::default());
        assert_eq!(h.record(Kind::Readiness, t0, FAIL), Effects::default());
        let unready = h.record(Kind::Readiness, t0, FAIL);
        assert_eq!(
            unready,
            Effects {
                update: Some("readiness probe failed 2 times: status 500".into()),
                ..Effects::default()
            }
        );
        assert_eq!(h.ready(), Some(false));
        assert_eq!(h.record(Kind::Readiness, t0, FAIL), Effects::default());
        // Back to ready: the success count starts over.
        assert_eq!(h.record(Kind::Readiness, t0, Ok(())), Effects::default());
        assert_eq!(h.record(Kind::Readiness, t0, FAIL), Effects::default());
        for _ in 0..2 {
            assert_eq!(h.record(Kind::Readiness, t0, Ok(())), Effects::default());
        }
        assert!(h.record(Kind::Readiness, t0, Ok(())).update.is_some());
        assert_eq!(h.healthy(), None, "readiness never sets healthy");
    }

    #[test]
    fn results_of_a_check_the_task_does_not_have_are_ignored() {
        let t0 = Instant::now();
        let mut h = Health::new(&[spec(Kind::Readiness, 1, 1, Duration::ZERO)], t0);
        assert_eq!(h.record(Kind::Liveness, t0, FAIL), Effects::default());
        assert_eq!(h.record(Kind::Startup, t0, FAIL), Effects::default());
        assert_eq!(h.healthy(), None);
    }

    fn http(kind: pb::health_check::Kind) -> pb::HealthCheck {
        pb::HealthCheck {
            kind: kind as i32,
            probe: Some(Probe::Http(pb::HttpProbe {
                scheme: String::new(),
                port: 8080,
                path: String::new(),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn checks_from_the_wire_get_defaults_and_bad_ones_are_skipped() {
        use pb::health_check::Kind as K;
        let mut readiness = http(K::Readiness);
        readiness.consecutive_successes = Some(4);
        readiness.interval_seconds = Some(0.000_001);
        let mut startup = http(K::Startup);
        startup.consecutive_successes = Some(4);
        startup.probe = Some(Probe::Command(pb::CommandProbe {
            shell: false,
            value: "/bin/check".into(),
            arguments: vec!["check".into(), "--fast".into()],
        }));
        let mut bad_interval = http(K::Liveness);
        bad_interval.interval_seconds = Some(f64::NAN);
        let mut bad_port = http(K::Liveness);
        bad_port.probe = Some(Probe::Tcp(pb::TcpProbe { port: 70000 }));
        let mut injected = http(K::Liveness);
        injected.probe = Some(Probe::Http(pb::HttpProbe {
            scheme: "http".into(),
            port: 80,
            path: "/x HTTP/1.1\r\nHost: evil".into(),
        }));
        let (specs, errors) = checks_from_proto(&[
            http(K::Unspecified),
            readiness,
            startup,
            http(K::Liveness),
            bad_interval,
            bad_port,
            injected,
        ]);
        assert_eq!(specs.len(), 3, "{specs:?}");
        let liveness = &specs[0];
        assert_eq!(liveness.kind, Kind::Liveness);
        assert_eq!(
            liveness.probe,
            ProbeSpec::Http {
                port: 8080,
                path: "/".into()
            }
        );
        assert_eq!(
            (liveness.delay, liveness.interval, liveness.timeout),
            (Duration::ZERO, DEFAULT_INTERVAL, DEFAULT_TIMEOUT)
        );
        assert_eq!((liveness.failures, liveness.successes), (3, 1));
        assert_eq!(specs[1].successes, 4);
        assert_eq!(specs[1].interval, MIN_INTERVAL);
        assert_eq!(specs[2].successes, 1, "startup passes on one success");
        assert_eq!(
            specs[2].probe,
            ProbeSpec::Command {
                argv: vec!["/bin/check".into(), "--fast".into()]
            }
        );
        assert_eq!(
            errors,
            [
                "health_checks[3]: a second liveness check",
                "health_checks[4].interval_seconds: NaN is not a usable duration",
                "health_checks[5].tcp.port: must be 1-65535",
                "health_checks[6].http.path: must start with '/', without spaces",
            ]
        );
    }

    #[test]
    fn shell_command_probes_run_through_sh() {
        let check = pb::HealthCheck {
            probe: Some(Probe::Command(pb::CommandProbe {
                shell: true,
                value: "exit 1".into(),
                arguments: Vec::new(),
            })),
            timeout_seconds: Some(1e300),
            ..Default::default()
        };
        let (specs, errors) = checks_from_proto(&[check]);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            specs[0].probe,
            ProbeSpec::Command {
                argv: vec!["/bin/sh".into(), "-c".into(), "exit 1".into()]
            }
        );
        assert_eq!(specs[0].timeout, MAX_DURATION, "capped");
    }
}
