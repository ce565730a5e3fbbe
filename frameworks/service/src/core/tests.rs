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
        .flat_map(|(_, l)| l.task_ids())
        .collect()
}

/// One launch the fake master took: its tasks, the agent, the volumes it
/// created and the persistent volumes its pod mounts.
#[derive(Debug, Clone)]
struct Launched {
    tasks: Vec<String>,
    agent: String,
    created: Vec<String>,
    mounts: Vec<String>,
}

/// A fake cluster: `agents` agents with big offers every round, tasks that
/// turn RUNNING (healthy unless `fails` says the version is broken) as soon
/// as they launch, and kills that end tasks KILLED at once. Its master
/// keeps persistent volumes as the real one does: created by a launch,
/// offered on their agent while no running task mounts them, and a launch
/// that creates a taken id or mounts a volume elsewhere or in use panics.
struct Cluster {
    services: Services,
    now: f64,
    agents: Vec<String>,
    /// Agents that send no offers (gone, or partitioned).
    silent: BTreeSet<String>,
    round: u32,
    /// Task ids the fake agents run.
    running: BTreeSet<String>,
    /// Versions whose tasks fail their liveness check once RUNNING.
    broken: BTreeSet<u32>,
    /// Persistent volume id → its agent.
    volumes: BTreeMap<String, String>,
    /// Persistent volume id → the task that mounted it last.
    mounts: BTreeMap<String, String>,
    launched: Vec<Launched>,
}

use std::collections::BTreeSet;

impl Cluster {
    fn new(agents: usize) -> Self {
        Self {
            services: Services::new(),
            now: T0,
            agents: (1..=agents).map(|i| format!("a{i}")).collect(),
            silent: BTreeSet::new(),
            round: 0,
            running: BTreeSet::new(),
            broken: BTreeSet::new(),
            volumes: BTreeMap::new(),
            mounts: BTreeMap::new(),
            launched: Vec::new(),
        }
    }

    fn offers(&mut self) -> Vec<pb::Offer> {
        self.round += 1;
        self.agents
            .iter()
            .filter(|a| !self.silent.contains(*a))
            .map(|a| {
                let mut o = offer(&format!("o{}-{a}", self.round), a, 4.0, 4096.0);
                o.volumes = self
                    .volumes
                    .iter()
                    .filter(|(id, agent)| {
                        *agent == a
                            && !self
                                .mounts
                                .get(*id)
                                .is_some_and(|t| self.running.contains(t))
                    })
                    .map(|(id, agent)| pb::PersistentVolume {
                        id: id.clone(),
                        framework_id: "fw".into(),
                        agent_id: agent.clone(),
                        disk_mib: 1024.0,
                    })
                    .collect();
                o
            })
            .collect()
    }

    /// What the master does with a plan's launches (volumes first).
    fn take(&mut self, offers: &[pb::Offer], plan: &Plan) {
        for (offer_id, launch) in &plan.launches {
            let agent = offers
                .iter()
                .find(|o| o.id == offer_id.as_str())
                .map(|o| o.agent_id.clone())
                .expect("a launch on an offer of this round");
            let Launch::Group { create, group } = launch else {
                continue;
            };
            let mut created = Vec::new();
            for v in create {
                let id = v.id.to_string();
                assert!(!self.volumes.contains_key(&id), "{id} created twice");
                self.volumes.insert(id.clone(), agent.clone());
                created.push(id);
            }
            let mut mounts = Vec::new();
            for v in &group.volumes {
                let Some(pb::pod_volume::Source::Persistent(id)) = &v.source else {
                    continue;
                };
                assert_eq!(self.volumes.get(id), Some(&agent), "{id} is elsewhere");
                assert!(
                    !self
                        .mounts
                        .get(id)
                        .is_some_and(|t| self.running.contains(t)),
                    "{id} is in use"
                );
                self.mounts
                    .insert(id.clone(), group.tasks[0].task_id.clone());
                mounts.push(id.clone());
            }
            self.launched.push(Launched {
                tasks: launch.task_ids(),
                agent,
                created,
                mounts,
            });
        }
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
        self.take(&offers, &plan);
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
    let mut resources = Resources::parse(&format!("cpus:{cpus};mem:{mem};disk:8192"))
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
            Launch::Group { .. } => panic!("pod"),
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
    let Launch::Group { group: g, create } = &plan.launches[0].1 else {
        panic!("not a group");
    };
    assert!(create.is_empty());
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

/// What a store holds after `changes`, as `Store::load` hands it back.
fn stored(changes: Vec<Change>) -> Vec<StoredService> {
    let mut store: BTreeMap<String, StoredService> = BTreeMap::new();
    let mut versions: BTreeMap<(String, u32), pb::ServiceSpec> = BTreeMap::new();
    let mut instances: BTreeMap<(String, u32), Instance> = BTreeMap::new();
    let mut slots: BTreeMap<(String, u32), Slot> = BTreeMap::new();
    let mut metas: BTreeMap<String, ServiceMeta> = BTreeMap::new();
    for change in changes {
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
            Change::Slot(k, slot) => match slot {
                Some(slot) => {
                    slots.insert(k, slot);
                }
                None => {
                    slots.remove(&k);
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
                slots: slots
                    .iter()
                    .filter(|((n, _), _)| *n == name)
                    .map(|(_, slot)| slot.clone())
                    .collect(),
            },
        );
    }
    store.into_values().collect()
}

#[test]
fn restore_keeps_running_instances_without_kills_or_launches() {
    let mut c = settled(2, web(3, "serve", ""));
    c.apply(web(3, "serve", "")); // unchanged
    let store = stored(c.services.take_changes());
    let mut restored = Services::new();
    let refused = restored.restore(store, c.now);
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

// ---- persistent volumes -------------------------------------------------------

/// A pod service `web` whose container mounts the persistent volume
/// `data` (claim `data`, 1024 MiB); `extra` are more top-level lines,
/// `command` makes the version.
fn stateful(instances: u32, command: &str, extra: &str) -> Service {
    stateful_sized(instances, command, extra, 1024)
}

fn stateful_sized(instances: u32, command: &str, extra: &str, size: u32) -> Service {
    service(&format!(
        "name = \"web\"\ninstances = {instances}\n{extra}\n\
         [update]\nmin_healthy_time = \"10s\"\n\
         [pod]\n[[pod.containers]]\nname = \"db\"\ncommand = [\"{command}\"]\ncpus = 0.1\nmem = 32\n\
         volume_mounts = [{{ name = \"data\", path = \"/data\" }}]\n\
         [[pod.volumes]]\nname = \"data\"\npersistent = {{ size = {size} }}\n"
    ))
}

/// The instance's volumes and agent, by instance number.
fn volumes_by_instance(c: &Cluster) -> BTreeMap<u32, (Vec<String>, String)> {
    c.status()
        .instances
        .iter()
        .filter(|i| i.state != pb::TaskState::TaskKilling)
        .map(|i| (i.number, (i.volumes.clone(), i.agent_id.clone())))
        .collect()
}

fn slots_of(changes: &[Change]) -> BTreeMap<u32, Option<Slot>> {
    changes
        .iter()
        .filter_map(|ch| match ch {
            Change::Slot((_, k), slot) => Some((*k, slot.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn the_first_placement_creates_the_volumes_then_launches_in_one_accept() {
    let mut services = Services::new();
    services.apply(stateful(1, "serve", ""), T0).unwrap();
    let offers = [offer("o1", "a1", 4.0, 4096.0)];
    let plan = services.place(&offers, T0);
    assert_eq!(plan.launches.len(), 1, "{:?}", plan.unplaceable);
    let (offer_id, launch) = &plan.launches[0];
    assert_eq!(offer_id.as_str(), "o1");
    let Launch::Group { create, group } = launch else {
        panic!("not a group: {launch:?}");
    };
    assert_eq!(
        create,
        &vec![NewVolume {
            id: VolumeId::parse("data-web-0", "id").unwrap(),
            size: Amount::from_units(1024),
        }]
    );
    assert_eq!(
        group.volumes,
        vec![pb::PodVolume {
            name: "data".into(),
            source: Some(pb::pod_volume::Source::Persistent("data-web-0".into())),
        }]
    );
    let web = services.status("web", T0).unwrap();
    assert_eq!(web.instances[0].volumes, vec!["data-web-0"]);
    assert!(web.unplaced.is_none());
    let slots = slots_of(&services.take_changes());
    let slot = slots[&0].clone().expect("slot 0 recorded");
    assert_eq!(slot.agent_id, "a1");
    assert_eq!(slot.hostname, "a1.example");
    assert!(!slot.created, "not known to exist until the agent has it");
    // The agent reports the pod: the volumes exist.
    services.update(
        &pb::TaskStatus {
            uuid: vec![1],
            ..status("web.1.1.db", pb::TaskState::TaskRunning)
        },
        T0,
    );
    assert!(
        slots_of(&services.take_changes())[&0]
            .as_ref()
            .unwrap()
            .created
    );
}

#[test]
fn a_new_slot_needs_the_volumes_disk_on_top_of_the_pod() {
    let mut services = Services::new();
    services.apply(stateful(1, "serve", ""), T0).unwrap();
    let mut small = offer("o1", "a1", 4.0, 4096.0);
    small.resources = Resources::parse("cpus:4;mem:4096;disk:512")
        .unwrap()
        .to_proto();
    let plan = services.place(&[small], T0);
    assert!(plan.launches.is_empty());
    assert_eq!(
        plan.unplaceable,
        vec![(
            "web".to_string(),
            "1 instance(s) not placed: needs disk 1024, largest offer had 512".to_string()
        )]
    );
}

#[test]
fn a_failed_instance_is_replaced_on_its_agent_with_its_volumes_and_no_create() {
    let mut c = Cluster::new(3);
    c.apply(stateful(1, "serve", ""));
    c.round();
    let first = c.launched[0].clone();
    assert_eq!(first.created, vec!["data-web-0"]);
    assert_eq!(first.mounts, vec!["data-web-0"]);
    // Its agent offers last, so "first offer that fits" would pick another.
    c.agents.sort_by_key(|a| *a == first.agent);
    c.services
        .update(&status(&first.tasks[0], pb::TaskState::TaskFailed), c.now);
    c.running.remove(&first.tasks[0]);
    c.advance(1.0);
    let ids = c.round();
    assert_eq!(ids.len(), 1);
    let second = c.launched[1].clone();
    assert_eq!(second.agent, first.agent, "the slot's agent");
    assert!(second.created.is_empty(), "{second:?}");
    assert_eq!(second.mounts, vec!["data-web-0"]);
    assert_eq!(
        volumes_by_instance(&c)[&2],
        (vec!["data-web-0".to_string()], first.agent.clone())
    );
}

#[test]
fn an_offer_from_another_agent_is_not_used_and_the_status_says_which_agent_is_awaited() {
    let mut c = Cluster::new(2);
    c.apply(stateful(1, "serve", ""));
    c.round();
    let first = c.launched[0].clone();
    let other = c
        .agents
        .iter()
        .find(|a| **a != first.agent)
        .unwrap()
        .clone();
    c.services
        .update(&status(&first.tasks[0], pb::TaskState::TaskFailed), c.now);
    c.running.remove(&first.tasks[0]);
    c.advance(1.0);
    c.silent.insert(first.agent.clone());
    let offers = c.offers();
    let plan = c.services.place(&offers, c.now);
    assert!(plan.launches.is_empty(), "{:?}", plan.launches);
    assert_eq!(plan.declines.len(), 1);
    let why = format!(
        "1 instance(s) not placed: waiting for agent {0} ({0}.example), which holds its persistent volumes",
        first.agent
    );
    assert_eq!(plan.unplaceable, vec![("web".to_string(), why.clone())]);
    assert_eq!(c.status().unplaced.as_deref(), Some(why.as_str()));
    assert!(c.services.wants_offers(), "still wants its agent's offer");
    // Many rounds without the agent: no slot appears elsewhere.
    for _ in 0..5 {
        assert!(c.round().is_empty());
        c.advance(1.0);
    }
    assert!(c.launched.iter().all(|l| l.agent != other));
    // The agent is back.
    c.silent.clear();
    assert_eq!(c.round().len(), 1);
    assert_eq!(c.launched.last().unwrap().agent, first.agent);
    assert!(c.status().unplaced.is_none());
}

#[test]
fn an_offer_of_the_slots_agent_without_its_volumes_is_not_used() {
    let mut c = Cluster::new(1);
    c.apply(stateful(1, "serve", ""));
    c.round();
    let first = c.launched[0].clone();
    // The agent reported the pod: the slot is known to exist.
    c.services.update(
        &pb::TaskStatus {
            uuid: vec![1],
            ..status(&first.tasks[0], pb::TaskState::TaskFailed)
        },
        c.now,
    );
    c.advance(1.0);
    // The master still counts the volume as in use (its task has not
    // ended there yet): the offer does not list it.
    let mut offers = c.offers();
    offers[0].volumes.clear();
    let plan = c.services.place(&offers, c.now);
    assert!(plan.launches.is_empty());
    assert!(
        plan.unplaceable[0]
            .1
            .contains("offered without the persistent volumes data-web-0"),
        "{:?}",
        plan.unplaceable
    );
}

#[test]
fn a_rollout_reuses_the_slots_on_their_agents() {
    let mut c = Cluster::new(3);
    c.apply(stateful(2, "serve", ""));
    c.run_until(|c| c.available() == 2, |_| {});
    let before: BTreeSet<(Vec<String>, String)> = volumes_by_instance(&c).into_values().collect();
    assert_eq!(before.len(), 2);
    let launched = c.launched.len();
    assert_eq!(
        c.apply(stateful(2, "serve --v2", "")),
        Applied::Updated { version: 2 }
    );
    c.run_until(
        |c| c.status().deployment.is_none() && c.versions() == vec![2, 2],
        |c| {
            assert!(
                c.status().instances.len() <= 2,
                "no surge: {:#?}",
                c.status()
            )
        },
    );
    let after: BTreeSet<(Vec<String>, String)> = volumes_by_instance(&c).into_values().collect();
    assert_eq!(after, before, "same volumes on the same agents");
    let new = &c.launched[launched..];
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|l| l.created.is_empty()), "{new:?}");
}

#[test]
fn scale_down_keeps_the_slots_and_scale_up_reuses_them() {
    let mut c = Cluster::new(3);
    c.apply(stateful(3, "serve", ""));
    c.run_until(|c| c.available() == 3, |_| {});
    let all: BTreeSet<String> = c.volumes.keys().cloned().collect();
    assert_eq!(
        all,
        BTreeSet::from([
            "data-web-0".into(),
            "data-web-1".into(),
            "data-web-2".into()
        ])
    );
    c.services.take_changes();
    let kills = c.services.scale("web", 1, c.now).unwrap();
    assert_eq!(kills.len(), 2);
    c.kill(kills);
    assert_eq!(c.status().instances.len(), 1);
    assert!(
        slots_of(&c.services.take_changes())
            .values()
            .all(Option::is_some),
        "no slot forgotten"
    );
    let launched = c.launched.len();
    c.services.scale("web", 3, c.now).unwrap();
    c.run_until(|c| c.available() == 3, |_| {});
    let new = &c.launched[launched..];
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|l| l.created.is_empty()), "{new:?}");
    let used: BTreeSet<String> = volumes_by_instance(&c)
        .into_values()
        .flat_map(|(v, _)| v)
        .collect();
    assert_eq!(used, all, "the kept slots, no new ones");
    assert_eq!(c.volumes.len(), 3);
}

#[test]
fn delete_destroys_the_volumes_with_retries_then_forgets_the_service() {
    let mut c = Cluster::new(2);
    c.apply(stateful(2, "serve", ""));
    c.run_until(|c| c.available() == 2, |_| {});
    let kills = c.services.delete("web", c.now).unwrap();
    assert!(
        c.services.take_destroys(c.now).is_empty(),
        "nothing is destroyed while instances run"
    );
    c.kill(kills);
    let s = c.status();
    assert!(s.deleting && s.instances.is_empty());
    let destroys = c.services.take_destroys(c.now);
    let ids: Vec<&str> = destroys.iter().map(|d| d.volume_id.as_str()).collect();
    assert_eq!(ids, vec!["data-web-0", "data-web-1"]);
    assert!(destroys.iter().all(|d| d.service == "web"));
    assert!(
        c.services.take_destroys(c.now).is_empty(),
        "in flight: not asked twice"
    );
    c.services.take_changes();
    c.services.destroy_done("web", "data-web-0", Ok(()), c.now);
    c.services.destroy_done(
        "web",
        "data-web-1",
        Err("master answered FailedPrecondition: in use".into()),
        c.now,
    );
    assert_eq!(slots_of(&c.services.take_changes()).get(&0), Some(&None));
    let s = c.status();
    assert!(
        s.message.starts_with(
            "destroying persistent volume data-web-1 failed: master answered FailedPrecondition"
        ),
        "{}",
        s.message
    );
    assert_eq!(c.services.next_wakeup(), Some(c.now + 1.0));
    assert!(c.services.take_destroys(c.now + 0.5).is_empty(), "backoff");
    let retry = c.services.take_destroys(c.now + 1.0);
    assert_eq!(retry.len(), 1);
    assert_eq!(retry[0].volume_id.as_str(), "data-web-1");
    c.services
        .destroy_done("web", "data-web-1", Ok(()), c.now + 1.0);
    assert!(c.services.status("web", c.now).is_none(), "forgotten");
    let changes = c.services.take_changes();
    assert_eq!(slots_of(&changes).get(&1), Some(&None));
    assert!(
        changes
            .iter()
            .any(|ch| matches!(ch, Change::Service(n, None) if n == "web"))
    );
}

#[test]
fn a_new_slot_respects_hostname_unique() {
    let mut c = Cluster::new(1);
    c.apply(stateful(2, "serve", "constraints = [\"hostname unique\"]"));
    c.round();
    assert_eq!(c.launched.len(), 1);
    assert!(
        c.status()
            .unplaced
            .is_some_and(|u| u.contains("hostname unique")),
        "{:?}",
        c.status().unplaced
    );
    c.agents.push("a2".into());
    c.round();
    assert_eq!(c.launched.len(), 2);
    assert_eq!(c.launched[1].agent, "a2");
    assert_eq!(c.launched[1].created, vec!["data-web-1"]);
}

#[test]
fn scaling_up_waits_for_a_free_slots_agent_rather_than_making_a_new_slot() {
    let mut c = Cluster::new(2);
    c.apply(stateful(2, "serve", ""));
    c.run_until(|c| c.available() == 2, |_| {});
    let kills = c.services.scale("web", 1, c.now).unwrap();
    c.kill(kills);
    let kept = volumes_by_instance(&c);
    let freed = c
        .launched
        .iter()
        .find(|l| !kept.values().any(|(v, _)| *v == l.mounts))
        .unwrap()
        .clone();
    // The freed slot's agent is away; the other one has room to spare.
    c.silent.insert(freed.agent.clone());
    c.services.scale("web", 2, c.now).unwrap();
    for _ in 0..3 {
        assert!(c.round().is_empty());
        c.advance(1.0);
    }
    assert!(
        c.status()
            .unplaced
            .is_some_and(|u| u.contains(&format!("waiting for agent {}", freed.agent))),
        "{:?}",
        c.status().unplaced
    );
    assert_eq!(c.volumes.len(), 2, "no third slot");
    c.silent.clear();
    assert_eq!(c.round().len(), 1);
    let last = c.launched.last().unwrap();
    assert_eq!((&last.agent, &last.mounts), (&freed.agent, &freed.mounts));
}

#[test]
fn a_refused_launch_forgets_a_slot_never_created() {
    let mut services = Services::new();
    services.apply(stateful(1, "serve", ""), T0).unwrap();
    let plan = services.place(&[offer("o1", "a1", 4.0, 4096.0)], T0);
    let ids = task_ids(&plan);
    services.take_changes();
    services.launch_failed(&ids, "master answered InvalidArgument", T0);
    assert_eq!(slots_of(&services.take_changes()).get(&0), Some(&None));
    // After the backoff the next try may go to another agent.
    let plan = services.place(&[offer("o2", "a2", 4.0, 4096.0)], T0 + 1.0);
    let Launch::Group { create, .. } = &plan.launches[0].1 else {
        panic!("not a group");
    };
    assert_eq!(create[0].id.as_str(), "data-web-0");
}

#[test]
fn a_slot_not_known_created_adopts_volumes_its_offer_lists() {
    let mut services = Services::new();
    services.apply(stateful(1, "serve", ""), T0).unwrap();
    let plan = services.place(&[offer("o1", "a1", 4.0, 4096.0)], T0);
    let ids = task_ids(&plan);
    // The master dropped the launch (its offer was gone); the volume may or
    // may not exist: the offer tells.
    services.update(&status(&ids[0], pb::TaskState::TaskDropped), T0);
    let mut again = offer("o2", "a1", 4.0, 4096.0);
    again.volumes = vec![pb::PersistentVolume {
        id: "data-web-0".into(),
        agent_id: "a1".into(),
        disk_mib: 1024.0,
        ..Default::default()
    }];
    let plan = services.place(&[again], T0 + 1.0);
    let Launch::Group { create, .. } = &plan.launches[0].1 else {
        panic!("not a group");
    };
    assert!(create.is_empty(), "listed, so it exists: {create:?}");
    // Not listed: created (again) with the launch.
    let ids = task_ids(&plan);
    services.update(&status(&ids[0], pb::TaskState::TaskDropped), T0 + 1.0);
    services.take_changes();
    let plan = services.place(&[offer("o3", "a1", 4.0, 4096.0)], T0 + 3.0);
    assert!(
        plan.launches.is_empty(),
        "a listed volume made the slot known"
    );
    assert!(
        plan.unplaceable[0].1.contains("offered without"),
        "{:?}",
        plan.unplaceable
    );
}

#[test]
fn the_claimed_volumes_cannot_change_while_the_service_has_slots() {
    let mut c = Cluster::new(1);
    c.apply(stateful(1, "serve", ""));
    c.round();
    let bigger = stateful_sized(1, "serve", "", 2048);
    let e = c.services.apply(bigger, c.now).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "service.pod.volumes: the persistent volumes cannot change while the service has them (data (1024 MiB))"
        ),
        "{e}"
    );
    // A new version with the same volumes is fine.
    assert_eq!(
        c.apply(stateful(1, "serve --v2", "")),
        Applied::Updated { version: 2 }
    );
}

#[test]
fn volume_ids_another_service_holds_are_not_created_twice() {
    let mut services = Services::new();
    // `data-web` of service `x` and `data` of service `web-x` are both
    // `data-web-x-0`.
    let first = service(
        "name = \"x\"\n[pod]\n[[pod.containers]]\nname = \"db\"\ncommand = [\"serve\"]\n\
         volume_mounts = [{ name = \"data-web\", path = \"/data\" }]\n\
         [[pod.volumes]]\nname = \"data-web\"\npersistent = { size = 10 }\n",
    );
    let second = service(
        "name = \"web-x\"\n[pod]\n[[pod.containers]]\nname = \"db\"\ncommand = [\"serve\"]\n\
         volume_mounts = [{ name = \"data\", path = \"/data\" }]\n\
         [[pod.volumes]]\nname = \"data\"\npersistent = { size = 10 }\n",
    );
    services.apply(first, T0).unwrap();
    services.apply(second, T0).unwrap();
    let plan = services.place(&[offer("o1", "a1", 4.0, 4096.0)], T0);
    assert_eq!(plan.launches.len(), 1);
    assert_eq!(
        plan.unplaceable,
        vec![(
            "x".to_string(),
            "1 instance(s) not placed: persistent volume id data-web-x-0 is taken by service web-x; rename the claim or the service".to_string()
        )]
    );
}

#[test]
fn a_restored_framework_keeps_its_slots() {
    let mut c = Cluster::new(2);
    c.apply(stateful(2, "serve", ""));
    c.run_until(|c| c.available() == 2, |_| {});
    let before = volumes_by_instance(&c);
    let mut restored = Services::new();
    assert!(
        restored
            .restore(stored(c.services.take_changes()), c.now)
            .is_empty()
    );
    c.services = restored;
    assert_eq!(volumes_by_instance(&c), before);
    // An instance fails after the restart: its slot is reused.
    let (number, (volumes, agent)) = before.iter().next().unwrap();
    let task = format!("web.1.{number}.db");
    c.services
        .update(&status(&task, pb::TaskState::TaskFailed), c.now);
    c.running.remove(&task);
    c.advance(1.0);
    let launched = c.launched.len();
    c.round();
    let new = &c.launched[launched..];
    assert_eq!(new.len(), 1);
    assert_eq!(&new[0].mounts, volumes);
    assert_eq!(&new[0].agent, agent);
    assert!(new[0].created.is_empty());
}

#[test]
fn a_framework_registered_anew_forgets_its_slots() {
    let mut c = Cluster::new(1);
    c.apply(stateful(1, "serve", ""));
    c.round();
    c.services.take_changes();
    c.services.forget_volumes();
    let changes = c.services.take_changes();
    assert_eq!(slots_of(&changes).get(&0), Some(&None));
    assert!(c.status().instances[0].volumes.is_empty());
}
