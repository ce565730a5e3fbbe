use super::*;
use crate::spec::{parse_toml, validate};

const T0: f64 = 1_767_225_600.0; // 2026-01-01T00:00:00Z

fn service(toml: &str) -> Service {
    let spec = parse_toml(toml).unwrap_or_else(|e| panic!("{e}"));
    validate(&spec).unwrap_or_else(|e| panic!("{e}"))
}

/// A task service with a liveness check, `instances` copies, the rollout
/// settings given as TOML lines.
fn web(instances: u32, command: &str, update: &str) -> Service {
    service(&format!(
        "name = \"web\"\ninstances = {instances}\n[update]\nmin_healthy_time = \"10s\"\n{update}\n\
         [task]\ncommand = \"{command}\"\ncpus = 0.1\nmem = 32\nports = 1\n\
         [[task.health_checks]]\nkind = \"liveness\"\ntcp = {{ port = 80 }}\n"
    ))
}

fn status(task_id: &str, state: pb::TaskState) -> pb::TaskStatus {
    pb::TaskStatus {
        task_id: task_id.to_string(),
        state: state as i32,
        agent_id: "a1".to_string(),
        ..Default::default()
    }
}

fn healthy(task_id: &str) -> pb::TaskStatus {
    pb::TaskStatus {
        healthy: Some(true),
        ..status(task_id, pb::TaskState::TaskRunning)
    }
}

fn unhealthy_failure(task_id: &str) -> pb::TaskStatus {
    pb::TaskStatus {
        reason: pb::Reason::TaskUnhealthy as i32,
        message: "liveness probe failed 3 times".into(),
        healthy: Some(false),
        ..status(task_id, pb::TaskState::TaskFailed)
    }
}

fn task_ids(plan: &Plan) -> Vec<String> {
    plan.launches
        .iter()
        .flat_map(|(_, l)| match l {
            Launch::Tasks(ts) => ts.iter().map(|t| t.task_id.clone()).collect::<Vec<_>>(),
            Launch::Group(g) => g.tasks.iter().map(|t| t.task_id.clone()).collect(),
        })
        .collect()
}

/// A fake cluster: `agents` agents with big offers every round, tasks that
/// turn RUNNING (healthy unless `fails` says the version is broken) as soon
/// as they launch, and kills that end tasks KILLED at once.
struct Cluster {
    services: Services,
    now: f64,
    agents: Vec<String>,
    round: u32,
    /// Task ids the fake agents run.
    running: BTreeSet<String>,
    /// Versions whose tasks fail their liveness check once RUNNING.
    broken: BTreeSet<u32>,
}

use std::collections::BTreeSet;

impl Cluster {
    fn new(agents: usize) -> Self {
        Self {
            services: Services::new(),
            now: T0,
            agents: (1..=agents).map(|i| format!("a{i}")).collect(),
            round: 0,
            running: BTreeSet::new(),
            broken: BTreeSet::new(),
        }
    }

    fn offers(&mut self) -> Vec<pb::Offer> {
        self.round += 1;
        self.agents
            .iter()
            .map(|a| offer(&format!("o{}-{a}", self.round), a, 4.0, 4096.0))
            .collect()
    }

    fn apply(&mut self, s: Service) -> Applied {
        let (applied, kills) = self.services.apply(s, self.now).unwrap();
        self.kill(kills);
        applied
    }

    /// Ends killed tasks KILLED, feeding the updates back.
    fn kill(&mut self, kills: Vec<Kill>) {
        let mut queue = kills;
        for _ in 0..1000 {
            let Some(k) = queue.pop() else {
                return;
            };
            self.running.remove(k.task_id.as_str());
            let more = self.services.update(
                &status(k.task_id.as_str(), pb::TaskState::TaskKilled),
                self.now,
            );
            queue.extend(more);
        }
        panic!("kills did not settle");
    }

    /// One offer round: places, launches, reports RUNNING + healthy (or a
    /// liveness failure for broken versions). Returns the launched ids.
    fn round(&mut self) -> Vec<String> {
        let offers = self.offers();
        let plan = self.services.place(&offers, self.now);
        let ids = task_ids(&plan);
        for id in &ids {
            self.running.insert(id.clone());
            let kills = self.services.update(&healthy(id), self.now);
            self.kill(kills);
            let (_, version, _, _) = parse_task_id(id).unwrap();
            if self.broken.contains(&version) {
                self.running.remove(id);
                let kills = self.services.update(&unhealthy_failure(id), self.now);
                self.kill(kills);
            }
        }
        ids
    }

    fn advance(&mut self, seconds: f64) {
        self.now += seconds;
        let kills = self.services.tick(self.now);
        self.kill(kills);
    }

    fn status(&self) -> ServiceStatus {
        self.services.status("web", self.now).unwrap()
    }

    fn available(&self) -> u32 {
        self.status()
            .instances
            .iter()
            .filter(|i| i.available)
            .count() as u32
    }

    fn versions(&self) -> Vec<u32> {
        self.status()
            .instances
            .iter()
            .filter(|i| i.state != pb::TaskState::TaskKilling)
            .map(|i| i.version)
            .collect()
    }

    /// Rounds of 1 s until `done` holds, checking `invariant` after each.
    fn run_until(&mut self, mut done: impl FnMut(&Self) -> bool, mut invariant: impl FnMut(&Self)) {
        for _ in 0..2000 {
            if done(self) {
                return;
            }
            self.round();
            invariant(self);
            self.advance(1.0);
            invariant(self);
        }
        panic!("never converged: {:#?}", self.status());
    }
}

fn offer(id: &str, agent: &str, cpus: f64, mem: f64) -> pb::Offer {
    let mut resources = Resources::parse(&format!("cpus:{cpus};mem:{mem}"))
        .unwrap()
        .to_proto();
    resources.push(corral_proto::RangeSet::from_ranges([(31000, 31099)]).to_resource("ports"));
    pb::Offer {
        id: id.to_string(),
        agent_id: agent.to_string(),
        hostname: format!("{agent}.example"),
        resources,
        attributes: vec![pb::Attribute {
            name: "isolation".into(),
            value: Some(pb::attribute::Value::Text("container".into())),
        }],
        ..Default::default()
    }
}

/// Brings `web` to `n` available instances of version 1.
fn settled(agents: usize, s: Service) -> Cluster {
    let mut c = Cluster::new(agents);
    let n = s.instances;
    c.apply(s);
    c.run_until(|c| c.available() == n, |_| {});
    c
}

#[test]
fn three_instances_are_placed_and_a_failed_one_is_replaced_after_the_backoff() {
    let mut c = Cluster::new(2);
    c.apply(web(3, "serve", ""));
    let ids = c.round();
    assert_eq!(ids, vec!["web.1.1", "web.1.2", "web.1.3"]);
    assert!(!c.services.wants_offers());
    let killed = c
        .services
        .update(&status("web.1.2", pb::TaskState::TaskFailed), c.now);
    assert!(killed.is_empty());
    // Backoff: 1 s from the failure; no offers wanted meanwhile.
    assert!(!c.services.wants_offers());
    assert_eq!(c.services.next_wakeup(), Some(c.now + 1.0));
    assert!(c.round().is_empty(), "replaced before the backoff");
    c.advance(0.5);
    assert!(c.round().is_empty(), "replaced before the backoff");
    c.advance(0.5);
    assert_eq!(c.round(), vec!["web.1.4"]);
    let s = c.status();
    assert_eq!(s.instances.len(), 3);
    assert!(s.message.contains("instance web.1.2 failed: TASK_FAILED"));
}

#[test]
fn backoff_grows_by_the_factor_and_resets_once_a_replacement_is_healthy() {
    let mut c = Cluster::new(1);
    c.apply(web(1, "serve", ""));
    let mut delays = Vec::new();
    for _ in 0..3 {
        let ids = c.round();
        assert_eq!(ids.len(), 1);
        c.services.update(&unhealthy_failure(&ids[0]), c.now);
        let until = c.status().backoff_until.unwrap();
        delays.push(((until - c.now) * 10_000.0).round() / 10_000.0);
        c.now = until;
    }
    assert_eq!(delays, vec![1.0, 1.15, 1.3225]);
    // The next replacement stays healthy for min_healthy_time: reset.
    let ids = c.round();
    assert_eq!(ids.len(), 1);
    c.advance(10.0);
    assert_eq!(c.status().backoff_until, None);
    c.services.update(&unhealthy_failure(&ids[0]), c.now);
    let until = c.status().backoff_until.unwrap();
    assert_eq!(until - c.now, 1.0, "backoff starts over");
}

#[test]
fn a_liveness_failure_replaces_the_instance() {
    let mut c = settled(1, web(2, "serve", ""));
    let victim = c.status().instances[0].task_ids[0].clone();
    c.services.update(&unhealthy_failure(&victim), c.now);
    c.advance(1.0);
    let ids = c.round();
    assert_eq!(ids.len(), 1);
    assert!(!c.status().task_ids_contain(&victim));
    assert!(
        c.status()
            .message
            .contains("(TASK_UNHEALTHY): liveness probe failed 3 times")
    );
}

impl ServiceStatus {
    fn task_ids_contain(&self, id: &str) -> bool {
        self.instances
            .iter()
            .any(|i| i.task_ids.iter().any(|t| t == id))
    }
}

#[test]
fn hostname_unique_places_one_instance_per_agent_and_reports_the_rest() {
    let mut c = Cluster::new(2);
    let s = service(
        "name = \"web\"\ninstances = 3\nconstraints = [\"hostname unique\"]\n\
         [task]\ncommand = \"serve\"\ncpus = 0.1\nmem = 32\n",
    );
    c.apply(s);
    let offers = c.offers();
    let plan = c.services.place(&offers, c.now);
    assert_eq!(plan.launches.len(), 2);
    let agents: BTreeSet<String> = plan
        .launches
        .iter()
        .map(|(_, l)| match l {
            Launch::Tasks(t) => t[0].agent_id.clone(),
            Launch::Group(_) => panic!("pod"),
        })
        .collect();
    assert_eq!(agents.len(), 2);
    assert_eq!(plan.unplaceable.len(), 1);
    assert!(
        plan.unplaceable[0].1.contains("hostname unique"),
        "{:?}",
        plan.unplaceable
    );
    // Next round: both agents host one already; nothing more fits.
    let offers = c.offers();
    let plan = c.services.place(&offers, c.now);
    assert!(plan.launches.is_empty());
    assert_eq!(plan.declines.len(), 2);
}

#[test]
fn instances_pack_into_one_offer_with_ports_and_labels() {
    let mut c = Cluster::new(1);
    c.apply(web(3, "serve", ""));
    let offers = c.offers();
    let plan = c.services.place(&offers, c.now);
    assert_eq!(plan.launches.len(), 3);
    let Launch::Tasks(t) = &plan.launches[1].1 else {
        panic!("not a task");
    };
    let task = &t[0];
    let env = &task.command.as_ref().unwrap().environment;
    assert_eq!(env["PORT0"], "31001");
    assert_eq!(env["PORT"], "31001");
    assert_eq!(env[ENV_INSTANCE], "2");
    assert_eq!(task.labels[LABEL_SERVICE], "web");
    assert_eq!(task.labels[LABEL_VERSION], "1");
    assert_eq!(task.health_checks.len(), 1);
    let r = Resources::from_proto(&task.resources, "r").unwrap();
    assert_eq!(r.ports.count(), 1);
}

#[test]
fn scale_up_launches_and_scale_down_kills_unhealthy_then_newest_first() {
    let mut c = settled(1, web(2, "serve", ""));
    let kills = c.services.scale("web", 4, c.now).unwrap();
    assert!(kills.is_empty());
    let offers = c.offers();
    let plan = c.services.place(&offers, c.now);
    let ids = task_ids(&plan);
    assert_eq!(ids, vec!["web.1.3", "web.1.4"]);
    // web.1.3 becomes healthy, web.1.4 is still starting.
    c.services.update(&healthy("web.1.3"), c.now);
    let kills = c.services.scale("web", 2, c.now).unwrap();
    let killed: Vec<&str> = kills.iter().map(|k| k.task_id.as_str()).collect();
    assert_eq!(killed, vec!["web.1.4", "web.1.3"]);
    assert_eq!(c.status().version, 1, "a scale is not a new version");
}

/// Checks at every step that availability never drops below the minimum
/// and the total never exceeds the cap.
fn rollout_keeps_limits(update: &str, min_available: u32, cap: u32) {
    let mut c = settled(3, web(3, "serve", update));
    let applied = c.apply(web(3, "serve --v2", update));
    assert_eq!(applied, Applied::Updated { version: 2 });
    let check = |c: &Cluster| {
        assert!(
            c.available() >= min_available,
            "available {} < {min_available}: {:#?}",
            c.available(),
            c.status()
        );
        assert!(
            c.status().instances.len() as u32 <= cap,
            "{:#?}",
            c.status()
        );
    };
    c.run_until(
        |c| c.status().deployment.is_none() && c.versions() == vec![2, 2, 2],
        check,
    );
    assert_eq!(c.available(), 3);
    assert!(c.status().message.is_empty());
}

#[test]
fn rolling_update_with_surge_one_never_drops_below_the_minimum() {
    rollout_keeps_limits("max_surge = 1\nmax_unavailable = 0", 3, 4);
}

#[test]
fn rolling_update_with_one_unavailable_never_exceeds_the_count() {
    rollout_keeps_limits("max_surge = 0\nmax_unavailable = 1", 2, 3);
}

#[test]
fn a_failing_new_version_is_rolled_back_and_the_deployment_says_why() {
    let update = "auto_rollback = true";
    let mut c = settled(3, web(3, "serve", update));
    c.broken.insert(2);
    c.apply(web(3, "serve --broken", update));
    c.run_until(
        |c| c.status().deployment.is_none() && c.versions() == vec![1, 1, 1],
        |c| assert!(c.available() >= 3, "{:#?}", c.status()),
    );
    let s = c.status();
    assert_eq!(s.version, 1);
    assert!(
        s.message
            .starts_with("rolled back to version 1: instance web.2."),
        "{}",
        s.message
    );
    assert!(
        s.message
            .contains("failed: TASK_FAILED (TASK_UNHEALTHY): liveness probe failed 3 times"),
        "{}",
        s.message
    );
    // The healthy v1 instances were never touched.
    let numbers: Vec<u32> = s.instances.iter().map(|i| i.number).collect();
    assert_eq!(numbers, vec![1, 2, 3]);
}

#[test]
fn without_auto_rollback_a_failing_rollout_stops_and_keeps_what_runs() {
    let mut c = settled(3, web(3, "serve", ""));
    c.broken.insert(2);
    c.apply(web(3, "serve --broken", ""));
    for _ in 0..40 {
        c.round();
        c.advance(1.0);
    }
    let s = c.status();
    let d = s.deployment.clone().unwrap();
    assert!(d.failed, "{s:#?}");
    assert!(!d.rolling_back);
    assert!(s.message.starts_with("rollout failed: instance web.2."));
    assert_eq!(c.available(), 3, "v1 instances kept");
}

#[test]
fn a_rollout_without_progress_rolls_back_at_the_deadline() {
    let update = "auto_rollback = true\nprogress_deadline = \"60s\"";
    let mut c = settled(3, web(3, "serve", update));
    c.apply(web(3, "serve --v2", update));
    // No offers: nothing of v2 ever starts.
    c.advance(59.0);
    assert!(!c.status().deployment.unwrap().rolling_back);
    c.advance(1.0);
    let s = c.status();
    assert_eq!(s.version, 1);
    assert!(s.message.contains("no progress for 60s"), "{}", s.message);
    assert!(s.deployment.is_none(), "v1 is all there: done at once");
}

#[test]
fn a_pod_launches_as_a_group_with_ids_volumes_and_restart_policy() {
    let s = service(
        "name = \"shop\"\ninstances = 1\n[pod]\nrestart_policy = \"OnFailure\"\n\
         [[pod.containers]]\nname = \"web\"\nimage = \"nginx\"\ncpus = 0.2\nmem = 64\n\
         volume_mounts = [{ name = \"cache\", path = \"/cache\" }, { name = \"logs\", path = \"/logs\", read_only = true }]\n\
         [[pod.containers]]\nname = \"sidecar\"\ncommand = [\"/bin/tail\"]\nargs = [\"-f\", \"/logs/x\"]\n\
         [[pod.volumes]]\nname = \"cache\"\nempty_dir = {}\n\
         [[pod.volumes]]\nname = \"logs\"\nhost_path = \"/var/log/shop\"\n",
    );
    let mut services = Services::new();
    services.apply(s, T0).unwrap();
    let plan = services.place(&[offer("o1", "a1", 4.0, 4096.0)], T0);
    assert_eq!(plan.launches.len(), 1);
    let Launch::Group(g) = &plan.launches[0].1 else {
        panic!("not a group");
    };
    let ids: Vec<&str> = g.tasks.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, vec!["shop.1.1.web", "shop.1.1.sidecar"]);
    assert_eq!(g.restart_policy, pb::PodRestartPolicy::OnFailure as i32);
    assert_eq!(g.volumes.len(), 2);
    assert_eq!(
        g.volumes[1].source,
        Some(pb::pod_volume::Source::HostPath("/var/log/shop".into()))
    );
    let mounts = &g.tasks[0].container.as_ref().unwrap().volumes;
    assert_eq!(mounts[0].pod_volume, "cache");
    assert_eq!(mounts[1].container_path, "/logs");
    assert!(mounts[1].read_only);
    assert_eq!(g.tasks[0].container.as_ref().unwrap().image, "nginx");
    let sidecar = g.tasks[1].command.as_ref().unwrap();
    assert_eq!(sidecar.arguments, vec!["/bin/tail", "-f", "/logs/x"]);
    // One container fails: the rest of the pod is killed, then replaced.
    let kills = services.update(&status("shop.1.1.web", pb::TaskState::TaskFailed), T0);
    let killed: Vec<&str> = kills.iter().map(|k| k.task_id.as_str()).collect();
    assert_eq!(killed, vec!["shop.1.1.sidecar"]);
}

#[test]
fn persistent_volumes_are_reported_unplaceable() {
    let s = service(
        "name = \"db\"\ninstances = 1\n[pod]\n[[pod.containers]]\nname = \"pg\"\nimage = \"postgres\"\n\
         volume_mounts = [{ name = \"data\", path = \"/data\" }]\n\
         [[pod.volumes]]\nname = \"data\"\npersistent = { size = 1024 }\n",
    );
    let mut services = Services::new();
    services.apply(s, T0).unwrap();
    let plan = services.place(&[offer("o1", "a1", 4.0, 4096.0)], T0);
    assert!(plan.launches.is_empty());
    assert_eq!(
        plan.unplaceable,
        vec![("db".to_string(), PERSISTENT_UNSUPPORTED.to_string())]
    );
}

#[test]
fn updates_for_unknown_tasks_are_killed_but_final_ones_are_not() {
    let mut c = settled(1, web(1, "serve", ""));
    for id in ["other.1.1", "web.1.99", "web.7.1", "not-ours"] {
        let kills = c
            .services
            .update(&status(id, pb::TaskState::TaskRunning), c.now);
        assert_eq!(kills.len(), 1, "{id}");
        assert_eq!(kills[0].task_id.as_str(), id);
        assert_eq!(kills[0].agent_id.as_ref().unwrap().as_str(), "a1");
    }
    let kills = c
        .services
        .update(&status("web.1.99", pb::TaskState::TaskKilled), c.now);
    assert!(kills.is_empty());
}

#[test]
fn duplicate_updates_change_nothing() {
    let mut c = settled(1, web(2, "serve", ""));
    c.services.take_changes();
    let id = c.status().instances[0].task_ids[0].clone();
    assert!(c.services.update(&healthy(&id), c.now).is_empty());
    assert!(c.services.take_changes().is_empty());
    c.services.update(&unhealthy_failure(&id), c.now);
    let failures = c.status().backoff_until;
    c.services.take_changes();
    assert!(c.services.update(&unhealthy_failure(&id), c.now).is_empty());
    assert!(c.services.take_changes().is_empty());
    assert_eq!(c.status().backoff_until, failures, "not counted twice");
}

#[test]
fn task_unknown_relaunches_without_counting_a_failure() {
    let mut c = Cluster::new(1);
    c.apply(web(1, "serve", ""));
    let offers = c.offers();
    let plan = c.services.place(&offers, c.now);
    let id = task_ids(&plan).remove(0);
    let kills = c.services.update(
        &pb::TaskStatus {
            reason: pb::Reason::Reconciliation as i32,
            ..status(&id, pb::TaskState::TaskUnknown)
        },
        c.now,
    );
    assert!(kills.is_empty());
    assert_eq!(c.status().backoff_until, None);
    assert!(c.services.wants_offers());
    assert_eq!(c.round(), vec!["web.1.2"]);
}

#[test]
fn an_unreachable_instance_is_replaced_after_the_grace() {
    let mut c = settled(1, web(1, "serve", ""));
    let id = c.status().instances[0].task_ids[0].clone();
    c.services
        .update(&status(&id, pb::TaskState::TaskUnreachable), c.now);
    c.advance(UNREACHABLE_GRACE_SECONDS - 1.0);
    assert!(c.round().is_empty(), "waits for the agent");
    c.advance(1.0);
    c.advance(1.0);
    assert_eq!(c.round().len(), 1);
    // The old task comes back: it is a stray now.
    let kills = c.services.update(&healthy(&id), c.now);
    assert_eq!(kills.len(), 1);
}

#[test]
fn restore_keeps_running_instances_without_kills_or_launches() {
    let mut c = settled(2, web(3, "serve", ""));
    c.apply(web(3, "serve", "")); // unchanged
    let mut store: BTreeMap<String, StoredService> = BTreeMap::new();
    let mut versions: BTreeMap<(String, u32), pb::ServiceSpec> = BTreeMap::new();
    let mut instances: BTreeMap<(String, u32), Instance> = BTreeMap::new();
    let mut metas: BTreeMap<String, ServiceMeta> = BTreeMap::new();
    for change in c.services.take_changes() {
        match change {
            Change::Service(n, m) => match m {
                Some(m) => {
                    metas.insert(n, m);
                }
                None => {
                    metas.remove(&n);
                }
            },
            Change::Version(k, v) => match v {
                Some(v) => {
                    versions.insert(k, *v);
                }
                None => {
                    versions.remove(&k);
                }
            },
            Change::Instance(k, i) => match i {
                Some(i) => {
                    instances.insert(k, i);
                }
                None => {
                    instances.remove(&k);
                }
            },
        }
    }
    for (name, meta) in metas {
        store.insert(
            name.clone(),
            StoredService {
                meta,
                versions: versions
                    .iter()
                    .filter(|((n, _), _)| *n == name)
                    .map(|((_, v), s)| (*v, s.clone()))
                    .collect(),
                instances: instances
                    .iter()
                    .filter(|((n, _), _)| *n == name)
                    .map(|(_, i)| i.clone())
                    .collect(),
            },
        );
    }
    let mut restored = Services::new();
    let refused = restored.restore(store.into_values().collect(), c.now);
    assert!(refused.is_empty());
    assert_eq!(restored.launched().len(), 3);
    // Reconciliation answers RUNNING + healthy for each.
    for (id, _) in restored.launched() {
        assert!(restored.update(&healthy(id.as_str()), c.now).is_empty());
    }
    assert!(restored.tick(c.now + 30.0).is_empty());
    assert!(!restored.wants_offers());
    let plan = restored.place(&[offer("o9", "a1", 4.0, 4096.0)], c.now + 30.0);
    assert!(plan.launches.is_empty());
    let s = restored.status("web", c.now + 30.0).unwrap();
    assert_eq!(s.instances.iter().filter(|i| i.available).count(), 3);
}

#[test]
fn delete_kills_everything_and_forgets_the_service_once_tasks_ended() {
    let mut c = settled(1, web(2, "serve", ""));
    let kills = c.services.delete("web", c.now).unwrap();
    assert_eq!(kills.len(), 2);
    assert!(c.services.status("web", c.now).unwrap().deleting);
    assert_eq!(
        c.services.apply(web(2, "serve", ""), c.now).unwrap_err(),
        CoreError::Deleting("web".into())
    );
    let offers = c.offers();
    assert!(c.services.place(&offers, c.now).launches.is_empty());
    c.kill(kills);
    assert!(c.services.status("web", c.now).is_none());
    let changes = c.services.take_changes();
    assert!(
        changes
            .iter()
            .any(|ch| matches!(ch, Change::Service(n, None) if n == "web"))
    );
    assert_eq!(
        c.services.delete("web", c.now).unwrap_err(),
        CoreError::NotFound("web".into())
    );
}

#[test]
fn task_ids_parse_back() {
    assert_eq!(parse_task_id("web.2.7"), Some(("web", 2, 7, None)));
    assert_eq!(
        parse_task_id("shop.1.3.sidecar"),
        Some(("shop", 1, 3, Some("sidecar")))
    );
    assert_eq!(parse_task_id("web.x.7"), None);
    assert_eq!(parse_task_id("web.1.2.c.d"), None);
}
