//! The pure core of the service framework: services, their versions and
//! instances, and every transition between them (Marathon's apps, a
//! Kubernetes Deployment).
//!
//! No I/O and no clock: offers and status updates come in with "now" (Unix
//! seconds), launches and kills come out as values, and every record that
//! changed is remembered until the actor takes it for the store
//! ([`Services::take_changes`]), as the batch framework's core does.
//!
//! Model:
//! - A service has numbered *versions* (its spec as applied; a scale is not
//!   a new version) and a *target* version. Instances are numbered per
//!   service and a number is never reused.
//! - An instance is one task (`SERVICE.VERSION.INSTANCE`) or one pod, one
//!   task per container (`SERVICE.VERSION.INSTANCE.CONTAINER`).
//! - *Running*: every task RUNNING. *Healthy*: running, and every task with
//!   a liveness/startup check reports `healthy`, every task with a readiness
//!   check `ready`. *Available*: healthy for `min_healthy_time` in a row.
//! - Every call converges the instances on the spec: outside a rollout it
//!   replaces and scales; during one it follows Kubernetes' Deployment
//!   algorithm (at most `instances + max_surge` instances, counting those
//!   still being killed, and at least `instances - max_unavailable`
//!   available; old instances that are not available go first).
//! - A rollout fails after `min(instances, ROLLOUT_FAILURE_LIMIT)` failed
//!   new instances or `progress_deadline` without progress; with
//!   `auto_rollback` the previous version becomes the target again (rolled
//!   out the same way, its running instances kept), else the rollout stops
//!   and keeps what runs.
//! - Persistent volumes (Marathon's resident apps, a Kubernetes
//!   StatefulSet's volume claims): a service whose pod has persistent
//!   volumes keeps numbered *slots* (0, 1, ...), each one persistent volume
//!   per claim, named `CLAIM-SERVICE-SLOT`, on one agent. Every instance of
//!   it holds a slot. A new instance (first launch, replacement, rollout)
//!   takes a *free* slot first (one no instance that has not ended holds),
//!   and then runs only on that slot's agent, from an offer that lists the
//!   slot's volumes; only when no slot is free and there are fewer slots
//!   than wanted instances is a new slot made (constraints apply), its
//!   volumes created in the same ACCEPT as the pod. A slot's agent is fixed:
//!   while it does not offer, the instance waits and the status says for
//!   which agent. Scaling down keeps slots and their data, scaling up reuses
//!   them; deleting the service destroys the volumes once its instances
//!   ended ([`Services::take_destroys`]), then forgets it. The volumes of a
//!   service cannot change while it has slots (a StatefulSet's claims are
//!   immutable too): delete it to start over. The slot rules live in the
//!   `slots` submodule.
//! - Known limit: TASK_UNKNOWN relaunches are not capped (the batch core
//!   caps free relaunches); each needs a reconciliation and an offer, so it
//!   cannot spin hot.

use std::collections::{BTreeMap, BTreeSet};

use corral_proto::task::{is_terminal, reason_name};
use corral_proto::{AgentId, Amount, OfferId, Resources, TaskId, VolumeId, pb};
use corral_sdk::constraint::{Placement, all_admit};
use corral_sdk::{OfferResources, TaskBuilder, shortfall};
use serde::{Deserialize, Serialize};

use crate::spec::{
    self, Command, Container, HealthCheckKind, Pod, Service, SpecError, Task, Template,
    VolumeSource,
};

/// How long an UNREACHABLE instance is waited for before it is replaced
/// (Marathon's `unreachableStrategy.inactiveAfterSeconds` default). An
/// agent partition shorter than this costs nothing; after it, the instance
/// is forgotten (and killed, should its agent come back).
pub const UNREACHABLE_GRACE_SECONDS: f64 = 300.0;
/// Failed new-version instances that fail a rollout: `instances` of them,
/// but no more than this, so a big service does not burn through many
/// crash loops before giving up (Nomad counts each failed allocation; one
/// failure is too jumpy for flaky starts).
pub const ROLLOUT_FAILURE_LIMIT: u32 = 3;
/// Label keys every task of a service carries.
pub const LABEL_SERVICE: &str = "corral.service";
pub const LABEL_VERSION: &str = "corral.version";
pub const LABEL_INSTANCE: &str = "corral.instance";
/// Environment every task of a service gets.
pub const ENV_SERVICE: &str = "CORRAL_SERVICE";
pub const ENV_VERSION: &str = "CORRAL_SERVICE_VERSION";
pub const ENV_INSTANCE: &str = "CORRAL_INSTANCE";
/// First retry of a persistent volume destroy that failed, doubling up to
/// [`DESTROY_BACKOFF_MAX_SECONDS`]: the usual causes (the master still
/// counts a task as live, no subscription for a moment) clear within
/// seconds, and a long master outage should not be polled hot.
pub const DESTROY_BACKOFF_SECONDS: f64 = 1.0;
pub const DESTROY_BACKOFF_MAX_SECONDS: f64 = 60.0;

/// Why a call was refused; the API maps each to a gRPC code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    #[error(transparent)]
    Invalid(#[from] SpecError),
    #[error("no service named {0}")]
    NotFound(String),
    #[error("service {0} is being deleted; wait until its instances ended")]
    Deleting(String),
    #[error("service {name}: instances: must be at most {max}")]
    TooManyInstances { name: String, max: u32 },
}

/// What `apply` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created {
        version: u32,
    },
    /// A changed spec: a rollout to `version` started.
    Updated {
        version: u32,
    },
    /// Only `instances` changed.
    Scaled {
        instances: u32,
    },
    /// The same spec again: nothing to do.
    Unchanged,
}

/// A task to kill; `agent_id` when known, so the master can route it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    pub task_id: TaskId,
    pub agent_id: Option<AgentId>,
}

/// One launch: single tasks (LAUNCH) or a pod (LAUNCH_GROUP), the latter
/// after creating the persistent volumes in `create` (CREATE_VOLUME
/// operations before it in the same ACCEPT, so the pod can mount them).
#[derive(Debug, Clone, PartialEq)]
pub enum Launch {
    Tasks(Vec<pb::TaskInfo>),
    Group {
        create: Vec<NewVolume>,
        group: pb::TaskGroupInfo,
    },
}

impl Launch {
    pub fn task_ids(&self) -> Vec<String> {
        match self {
            Launch::Tasks(tasks) => tasks.iter().map(|t| t.task_id.clone()).collect(),
            Launch::Group { group, .. } => group.tasks.iter().map(|t| t.task_id.clone()).collect(),
        }
    }
}

/// A persistent volume to create with a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    pub id: VolumeId,
    /// MiB.
    pub size: Amount,
}

/// A persistent volume to destroy: its service is deleted and no instance
/// of it is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destroy {
    pub service: String,
    pub volume_id: VolumeId,
}

/// Launches planned for offers, the offers to decline, and why services
/// that want instances got none (service name, reason).
#[derive(Debug, Default)]
pub struct Plan {
    pub launches: Vec<(OfferId, Launch)>,
    pub declines: Vec<OfferId>,
    pub unplaceable: Vec<(String, String)>,
}

/// One task of an instance, as last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    /// `pb::TaskState` as i32 (STAGING until the first update).
    pub state: i32,
    /// `pb::Reason` as i32.
    pub reason: i32,
    pub message: String,
    pub healthy: Option<bool>,
    pub ready: Option<bool>,
    pub pod_ip: String,
    pub restart_count: u32,
}

impl TaskRecord {
    fn state(&self) -> pb::TaskState {
        pb::TaskState::try_from(self.state).unwrap_or(pb::TaskState::TaskUnknown)
    }

    /// The task will never run again (or never ran: UNKNOWN to the master).
    fn ended(&self) -> bool {
        ends(self.state())
    }
}

/// One instance: where it runs and its tasks. Stored one record each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub number: u32,
    pub version: u32,
    pub agent_id: String,
    pub hostname: String,
    /// The agent's attributes as `(name, text)`, for `unique`/`max_per`.
    pub attributes: Vec<(String, String)>,
    /// One per task: the task template, or the pod's containers in order.
    pub tasks: Vec<TaskRecord>,
    pub launched_at: f64,
    /// Since when it is healthy without a break; None: not healthy.
    pub healthy_since: Option<f64>,
    pub unreachable_since: Option<f64>,
    /// The framework killed it (or it failed and the rest of it is being
    /// killed): it no longer counts, and is forgotten once its tasks ended.
    pub killing: bool,
    /// The slot (persistent volumes) it holds; None without persistent
    /// volumes. Defaulted so records written before slots existed load.
    #[serde(default)]
    pub slot: Option<u32>,
}

impl Instance {
    fn running(&self) -> bool {
        self.tasks
            .iter()
            .all(|t| t.state() == pb::TaskState::TaskRunning)
    }

    fn all_ended(&self) -> bool {
        self.tasks.iter().all(TaskRecord::ended)
    }

    fn available(&self, now: f64, min_healthy: f64) -> bool {
        !self.killing && self.healthy_since.is_some_and(|s| now - s >= min_healthy)
    }

    fn placement_attributes(&self) -> Vec<pb::Attribute> {
        text_attributes(&self.attributes)
    }
}

fn text_attributes(attributes: &[(String, String)]) -> Vec<pb::Attribute> {
    attributes
        .iter()
        .map(|(name, text)| pb::Attribute {
            name: name.clone(),
            value: Some(pb::attribute::Value::Text(text.clone())),
        })
        .collect()
}

fn attributes_of(offer: &pb::Offer) -> Vec<(String, String)> {
    offer
        .attributes
        .iter()
        .map(|a| (a.name.clone(), corral_proto::attributes::value_text(a)))
        .collect()
}

/// A rollout in progress (or stopped after failing, without rollback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// The target before this rollout: where a rollback goes.
    pub from: u32,
    pub started_at: f64,
    /// Last time more new instances were available or fewer old ones left.
    pub last_progress: f64,
    /// Best `(new available, old left)` seen, to detect progress.
    pub best: (u32, u32),
    /// New-version instances that failed during this rollout.
    pub new_failures: u32,
    /// This rollout is an automatic rollback.
    pub rolling_back: bool,
    /// Failed without rollback: stays put, reported, until a new apply.
    pub failed: bool,
}

/// The service's own record (everything but versions and instances).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceMeta {
    pub name: String,
    /// Wanted instances (a scale changes this, not the version).
    pub instances: u32,
    pub target: u32,
    pub next_version: u32,
    pub next_instance: u32,
    /// Failures since the last reset; the restart backoff grows with them.
    pub failures: u32,
    pub last_failure_at: f64,
    /// No launches before this (restart backoff).
    pub backoff_until: f64,
    pub rollout: Option<Rollout>,
    /// The last rollout failure or rollback, for the status.
    pub message: String,
    pub deleting: bool,
}

/// A record that changed and must be written (None: deleted).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Service(String, Option<ServiceMeta>),
    Version((String, u32), Option<Box<pb::ServiceSpec>>),
    Instance((String, u32), Option<Instance>),
    Slot((String, u32), Option<Slot>),
}

/// What the store hands back to [`Services::restore`] for one service.
#[derive(Debug, Clone)]
pub struct StoredService {
    pub meta: ServiceMeta,
    pub versions: Vec<(u32, pb::ServiceSpec)>,
    pub instances: Vec<Instance>,
    pub slots: Vec<Slot>,
}

/// One instance, for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    /// `SERVICE.VERSION.INSTANCE`.
    pub id: String,
    pub number: u32,
    pub version: u32,
    pub agent_id: String,
    pub hostname: String,
    pub task_ids: Vec<String>,
    /// The least advanced task's state; KILLING while being killed.
    pub state: pb::TaskState,
    pub healthy: bool,
    pub ready: bool,
    pub available: bool,
    pub pod_ip: String,
    pub restart_count: u32,
    /// The ids of the persistent volumes it mounts (its slot's).
    pub volumes: Vec<String>,
}

/// A rollout's progress, for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentStatus {
    pub target_version: u32,
    pub from_version: u32,
    pub old_instances: u32,
    pub new_instances: u32,
    pub new_available: u32,
    pub available: u32,
    pub rolling_back: bool,
    pub failed: bool,
}

/// A service, for the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    /// The target version's spec, `instances` as currently wanted.
    pub spec: pb::ServiceSpec,
    pub version: u32,
    pub instances_wanted: u32,
    pub instances: Vec<InstanceStatus>,
    pub deployment: Option<DeploymentStatus>,
    /// Last rollout failure or rollback; why nothing was placed, if so.
    pub message: String,
    pub unplaced: Option<String>,
    pub backoff_until: Option<f64>,
    pub deleting: bool,
}

struct Entry {
    meta: ServiceMeta,
    versions: BTreeMap<u32, Service>,
    instances: BTreeMap<u32, Instance>,
    slots: BTreeMap<u32, Slot>,
    /// Volume destroys that failed, by volume id.
    destroys: BTreeMap<String, Retry>,
    /// Why wanted instances were not placed in the last offer round.
    unplaced: Option<String>,
}

impl Entry {
    fn new(meta: ServiceMeta, versions: BTreeMap<u32, Service>) -> Self {
        Self {
            meta,
            versions,
            instances: BTreeMap::new(),
            slots: BTreeMap::new(),
            destroys: BTreeMap::new(),
            unplaced: None,
        }
    }

    /// Where the service's instances run: what `unique`/`max_per` count.
    /// (Slots need not be added: a new slot is only made when none is
    /// free, so every slot's agent is counted through its instance.)
    fn placements(&self) -> Vec<(String, Vec<pb::Attribute>)> {
        self.instances
            .values()
            .map(|i| (i.hostname.clone(), i.placement_attributes()))
            .collect()
    }

    /// The service is deleted and no instance is left: its volumes go.
    fn destroying(&self) -> bool {
        self.meta.deleting && self.instances.is_empty()
    }

    fn target(&self) -> &Service {
        &self.versions[&self.meta.target]
    }

    fn min_healthy(&self, version: u32) -> f64 {
        self.versions
            .get(&version)
            .unwrap_or_else(|| self.target())
            .update
            .min_healthy_time
            .as_secs_f64()
    }

    fn available(&self, i: &Instance, now: f64) -> bool {
        i.available(now, self.min_healthy(i.version))
    }

    fn live(&self) -> impl Iterator<Item = &Instance> {
        self.instances.values().filter(|i| !i.killing)
    }

    /// Instances to launch now, and the numbers of instances to kill, by
    /// the rollout rules (see the module doc).
    fn plan(&self, now: f64) -> (u32, Vec<u32>) {
        if self.meta.deleting {
            return (0, Vec::new());
        }
        let want = self.meta.instances;
        let target = self.meta.target;
        let (new, old): (Vec<&Instance>, Vec<&Instance>) =
            self.live().partition(|i| i.version == target);
        let mut kills = self.surplus(&new, want, now);
        let new_count = len(&new) - len(&kills);
        if old.is_empty() {
            return (want.saturating_sub(new_count), kills);
        }
        if self.meta.rollout.as_ref().is_some_and(|r| r.failed) {
            // A failed rollout keeps what runs: losses are replaced (with
            // the target, the only version launched), nothing old is killed.
            let live = new_count + len(&old);
            return (want.saturating_sub(live), kills);
        }
        let (surge, unavailable) = self.target().update.limits(want);
        // Instances being killed still hold their resources: they count.
        let total = u32::try_from(self.instances.len()).unwrap_or(u32::MAX);
        let cap = want.saturating_add(surge);
        let launch = cap
            .saturating_sub(total)
            .min(want.saturating_sub(new_count));
        let min_available = want.saturating_sub(unavailable);
        let mut available = self
            .live()
            .filter(|i| !kills.contains(&i.number) && self.available(i, now))
            .count() as u32;
        // Not-yet-available old instances go first: killing them costs no
        // availability. Then the oldest available ones, while the minimum
        // holds.
        let mut candidates = old.clone();
        candidates.sort_by_key(|i| (self.available(i, now), i.version, i.number));
        for i in candidates {
            if !self.available(i, now) {
                kills.push(i.number);
            } else if available > min_available {
                available -= 1;
                kills.push(i.number);
            }
        }
        (launch, kills)
    }

    /// Target-version instances beyond `want`: not-yet-healthy first, then
    /// the newest (Marathon kills staged before running, then youngest).
    fn surplus(&self, new: &[&Instance], want: u32, now: f64) -> Vec<u32> {
        let extra = len(new).saturating_sub(want) as usize;
        let mut order: Vec<&&Instance> = new.iter().collect();
        order.sort_by_key(|i| {
            (
                i.healthy_since.is_some(),
                self.available(i, now),
                std::cmp::Reverse(i.number),
            )
        });
        order.iter().take(extra).map(|i| i.number).collect()
    }
}

fn len<T>(v: &[T]) -> u32 {
    u32::try_from(v.len()).unwrap_or(u32::MAX)
}

/// Every service and its instances.
#[derive(Default)]
pub struct Services {
    entries: BTreeMap<String, Entry>,
    changes: Vec<Change>,
    /// The latest "now" seen, so `wants_offers` can look at backoffs.
    now: f64,
}

impl Services {
    pub fn new() -> Self {
        Self::default()
    }

    // ---- specs -------------------------------------------------------------

    /// Creates a service, or updates it: a changed spec is a new version
    /// rolled out; only `instances` changed is a scale; the same spec again
    /// changes nothing.
    pub fn apply(&mut self, service: Service, now: f64) -> Result<(Applied, Vec<Kill>), CoreError> {
        self.now = self.now.max(now);
        let name = service.name.clone();
        let Some(entry) = self.entries.get(&name) else {
            self.create(service);
            return Ok((Applied::Created { version: 1 }, Vec::new()));
        };
        if entry.meta.deleting {
            return Err(CoreError::Deleting(name));
        }
        let same_spec = without_instances(&entry.target().spec) == without_instances(&service.spec);
        if same_spec && entry.meta.instances == service.instances {
            return Ok((Applied::Unchanged, Vec::new()));
        }
        if same_spec {
            let kills = self.scale(&name, service.instances, now)?;
            return Ok((
                Applied::Scaled {
                    instances: service.instances,
                },
                kills,
            ));
        }
        check_claims(entry, &service)?;
        let version = self.new_version(&name, service, now);
        Ok((Applied::Updated { version }, self.converge(&name, now)))
    }

    /// Sets the wanted instances (of the target version, also mid-rollout).
    pub fn scale(&mut self, name: &str, instances: u32, now: f64) -> Result<Vec<Kill>, CoreError> {
        self.now = self.now.max(now);
        if instances > spec::MAX_INSTANCES {
            return Err(CoreError::TooManyInstances {
                name: name.to_string(),
                max: spec::MAX_INSTANCES,
            });
        }
        let entry = self.live_entry(name)?;
        entry.meta.instances = instances;
        self.meta_changed(name);
        Ok(self.converge(name, now))
    }

    /// A rolling restart: a new version with the same spec.
    pub fn restart(&mut self, name: &str, now: f64) -> Result<(u32, Vec<Kill>), CoreError> {
        self.now = self.now.max(now);
        let service = self.live_entry(name)?.target().clone();
        let version = self.new_version(name, service, now);
        Ok((version, self.converge(name, now)))
    }

    /// Kills every instance; once all its tasks ended its persistent
    /// volumes are destroyed ([`Services::take_destroys`]), then the service
    /// is forgotten (at once when nothing runs and it has no volumes).
    pub fn delete(&mut self, name: &str, now: f64) -> Result<Vec<Kill>, CoreError> {
        self.now = self.now.max(now);
        let entry = self
            .entries
            .get_mut(name)
            .ok_or_else(|| CoreError::NotFound(name.to_string()))?;
        entry.meta.deleting = true;
        entry.meta.rollout = None;
        let numbers: Vec<u32> = entry.instances.keys().copied().collect();
        self.meta_changed(name);
        let mut kills = Vec::new();
        for n in numbers {
            kills.extend(self.kill_instance(name, n));
        }
        self.forget_if_drained(name);
        Ok(kills)
    }

    fn create(&mut self, service: Service) {
        let name = service.name.clone();
        let meta = ServiceMeta {
            name: name.clone(),
            instances: service.instances,
            target: 1,
            next_version: 2,
            next_instance: 1,
            failures: 0,
            last_failure_at: 0.0,
            backoff_until: 0.0,
            rollout: None,
            message: String::new(),
            deleting: false,
        };
        self.changes.push(Change::Version(
            (name.clone(), 1),
            Some(Box::new(service.spec.clone())),
        ));
        let entry = Entry::new(meta, BTreeMap::from([(1, service)]));
        self.entries.insert(name.clone(), entry);
        self.meta_changed(&name);
    }

    /// Adds `service` as the next version and starts rolling it out from
    /// the current target.
    fn new_version(&mut self, name: &str, service: Service, now: f64) -> u32 {
        let Some(entry) = self.entries.get_mut(name) else {
            return 0;
        };
        let version = entry.meta.next_version;
        entry.meta.next_version += 1;
        entry.meta.instances = service.instances;
        self.changes.push(Change::Version(
            (name.to_string(), version),
            Some(Box::new(service.spec.clone())),
        ));
        entry.versions.insert(version, service);
        let from = entry.meta.target;
        entry.meta.target = version;
        entry.meta.rollout = Some(Rollout {
            from,
            started_at: now,
            last_progress: now,
            best: (0, u32::MAX),
            new_failures: 0,
            rolling_back: false,
            failed: false,
        });
        self.meta_changed(name);
        version
    }

    fn live_entry(&mut self, name: &str) -> Result<&mut Entry, CoreError> {
        match self.entries.get_mut(name) {
            None => Err(CoreError::NotFound(name.to_string())),
            Some(e) if e.meta.deleting => Err(CoreError::Deleting(name.to_string())),
            Some(e) => Ok(e),
        }
    }

    // ---- offers --------------------------------------------------------------

    /// Places the instances services want now (backoff and rollout limits
    /// respected) into `offers`: services in name order, each instance into
    /// the first offer that fits and whose agent every constraint admits
    /// given where the service's instances run (including those placed in
    /// this call). Offers that get nothing are declined.
    pub fn place(&mut self, offers: &[pb::Offer], now: f64) -> Plan {
        self.now = self.now.max(now);
        let mut plan = Plan::default();
        let mut rooms: Vec<Room<'_>> = Vec::with_capacity(offers.len());
        for offer in offers {
            match OfferResources::from_offer(offer) {
                Ok(left) => rooms.push(Room {
                    offer,
                    left,
                    launches: Vec::new(),
                }),
                // An offer we cannot read is handed back, not held.
                Err(_) => {
                    if let Ok(id) = OfferId::parse(&offer.id, "offer.id") {
                        plan.declines.push(id);
                    }
                }
            }
        }
        self.note_listed_volumes(offers);
        let names: Vec<String> = self.entries.keys().cloned().collect();
        for name in names {
            let (want, _) = self.entries[&name].plan(now);
            let entry = &self.entries[&name];
            if want == 0 || now < entry.meta.backoff_until {
                continue;
            }
            let unplaced = self.place_service(&name, want, &mut rooms, now);
            if let Some(why) = &unplaced {
                plan.unplaceable.push((name.clone(), why.clone()));
            }
            if let Some(e) = self.entries.get_mut(&name) {
                e.unplaced = unplaced;
            }
        }
        for room in rooms {
            let id = room.left.offer_id().clone();
            if room.launches.is_empty() {
                plan.declines.push(id);
            } else {
                for launch in room.launches {
                    plan.launches.push((id.clone(), launch));
                }
            }
        }
        plan
    }

    /// Places up to `want` instances of `name`; the reason when some
    /// could not be.
    fn place_service(
        &mut self,
        name: &str,
        want: u32,
        rooms: &mut [Room<'_>],
        now: f64,
    ) -> Option<String> {
        let entry = &self.entries[name];
        let service = entry.target().clone();
        let need = template_resources(&service.template);
        let claims = claims(&service.template);
        if !claims.is_empty() {
            return self.place_persistent(name, want, &service, &claims, rooms, now);
        }
        let ports = match &service.template {
            Template::Task(t) => u64::from(t.ports),
            Template::Pod(_) => 0,
        };
        let mut placed = 0;
        for _ in 0..want {
            let placements = self.entries[name].placements();
            let refs: Vec<Placement<'_>> = placements
                .iter()
                .map(|(h, a)| Placement::new(h, a))
                .collect();
            let room = rooms.iter_mut().find(|r| {
                r.left.fits(&need)
                    && r.left.remaining().ports.count() >= ports
                    && all_admit(&service.constraints, r.offer, &refs)
            });
            let Some(room) = room else {
                break;
            };
            // Service, container names and numbers make valid ids; were one
            // invalid, the service is reported rather than a panic.
            let mut left = room.left.clone();
            left.try_take(&need);
            let host_ports = left.take_ports(ports).unwrap_or_default();
            let at = Placed {
                offer: room.offer,
                host_ports,
                slot: None,
                create: Vec::new(),
            };
            match self.launch_instance(name, &service, at, now) {
                Ok(launch) => {
                    room.left = left;
                    room.launches.push(launch);
                    placed += 1;
                }
                Err(e) => return Some(e.to_string()),
            }
        }
        (placed < want).then(|| {
            let offers: Vec<&pb::Offer> = rooms.iter().map(|r| r.offer).collect();
            let placements = self.entries[name].placements();
            format!(
                "{} instance(s) not placed: {}",
                want - placed,
                unplaced_reason(&placements, &service, &need, &offers)
            )
        })
    }

    /// Records a new instance of the target version on `at.offer`'s agent
    /// (on `at.slot`, if any) and builds its launch.
    fn launch_instance(
        &mut self,
        name: &str,
        service: &Service,
        at: Placed<'_>,
        now: f64,
    ) -> Result<Launch, LaunchError> {
        let Some(entry) = self.entries.get_mut(name) else {
            return Ok(Launch::Tasks(Vec::new()));
        };
        let number = entry.meta.next_instance;
        let version = entry.meta.target;
        let base = format!("{name}.{version}.{number}");
        let offer = at.offer;
        let launch = match &service.template {
            Template::Task(t) => Launch::Tasks(vec![task_info(
                TaskId::parse(&base, "task_id")?,
                service,
                (version, number),
                t,
                at.host_ports,
                offer,
            )]),
            Template::Pod(p) => {
                let volumes: BTreeMap<&str, &str> = at
                    .slot
                    .and_then(|k| entry.slots.get(&k))
                    .map(|slot| {
                        slot.volumes
                            .iter()
                            .map(|v| (v.claim.as_str(), v.id.as_str()))
                            .collect()
                    })
                    .unwrap_or_default();
                Launch::Group {
                    group: group_info(&base, service, (version, number), p, offer, &volumes)?,
                    create: at.create,
                }
            }
        };
        entry.meta.next_instance += 1;
        let instance = Instance {
            number,
            version,
            agent_id: offer.agent_id.clone(),
            hostname: offer.hostname.clone(),
            attributes: attributes_of(offer),
            tasks: launch
                .task_ids()
                .into_iter()
                .map(|id| TaskRecord {
                    id,
                    state: pb::TaskState::TaskStaging as i32,
                    reason: 0,
                    message: String::new(),
                    healthy: None,
                    ready: None,
                    pod_ip: String::new(),
                    restart_count: 0,
                })
                .collect(),
            launched_at: now,
            healthy_since: None,
            unreachable_since: None,
            killing: false,
            slot: at.slot,
        };
        entry.instances.insert(number, instance);
        self.meta_changed(name);
        self.instance_changed(name, number);
        Ok(launch)
    }

    /// The master refused launches (ACCEPT failed): the instances never
    /// ran. Counted as failures, so a launch the master always refuses
    /// backs off instead of looping.
    pub fn launch_failed(&mut self, task_ids: &[String], message: &str, now: f64) {
        self.now = self.now.max(now);
        for id in task_ids {
            let Some((name, _, number, _)) = parse_task_id(id) else {
                continue;
            };
            let name = name.to_string();
            let Some(instance) = self
                .entries
                .get_mut(&name)
                .and_then(|e| e.instances.remove(&number))
            else {
                continue;
            };
            self.changes
                .push(Change::Instance((name.clone(), number), None));
            if let Some(e) = self.entries.get_mut(&name) {
                e.meta.message = format!(
                    "launch of instance {name}.{}.{number} failed: {message}",
                    instance.version
                );
                // The master did nothing, so a slot never known to exist
                // does not: let the next launch pick its agent afresh.
                if let Some(k) = instance.slot
                    && e.slots.get(&k).is_some_and(|slot| !slot.created)
                {
                    e.slots.remove(&k);
                    self.changes.push(Change::Slot((name.clone(), k), None));
                }
            }
            self.record_failure(&name, now);
        }
    }

    // ---- status updates ------------------------------------------------------

    /// Applies a status update; returns the tasks to kill (strays, the rest
    /// of a failed pod, instances replaced by a rollout). Idempotent.
    pub fn update(&mut self, status: &pb::TaskStatus, now: f64) -> Vec<Kill> {
        self.now = self.now.max(now);
        let state = pb::TaskState::try_from(status.state).unwrap_or(pb::TaskState::TaskUnknown);
        let found = parse_task_id(&status.task_id).and_then(|(name, version, number, _)| {
            let e = self.entries.get(name)?;
            let i = e.instances.get(&number).filter(|i| i.version == version)?;
            let index = i.tasks.iter().position(|t| t.id == status.task_id)?;
            Some((name.to_string(), number, index))
        });
        let Some((name, number, index)) = found else {
            return stray_kill(status, state);
        };
        // The agent has the pod (it sent the update, or the task starts or
        // runs), so the master created the volumes it mounts.
        let reached_agent = !status.uuid.is_empty()
            || matches!(
                state,
                pb::TaskState::TaskStarting | pb::TaskState::TaskRunning
            );
        if reached_agent && let Some(k) = self.entries[&name].instances[&number].slot {
            self.slot_created(&name, k);
        }
        let changed = self.record_status(&name, number, index, status, now);
        let mut kills = Vec::new();
        let killing = self.entries[&name].instances[&number].killing;
        if killing && !ends(state) {
            // A task we are killing still reports: ask again (kills are
            // idempotent on the master), so strays never linger.
            kills.extend(kill_of(&status.task_id, &status.agent_id));
        }
        if !changed {
            return kills;
        }
        if ends(state) && !killing {
            kills.extend(self.instance_ended(&name, number, status, state, now));
        }
        self.forget_ended(&name, number);
        kills.extend(self.converge(&name, now));
        kills
    }

    /// Stores the update in the task record and recomputes health; false
    /// when it changed nothing (a duplicate).
    fn record_status(
        &mut self,
        name: &str,
        number: u32,
        index: usize,
        status: &pb::TaskStatus,
        now: f64,
    ) -> bool {
        let Some(entry) = self.entries.get_mut(name) else {
            return false;
        };
        let version = entry_version(entry, number);
        let checks = task_checks(
            &entry
                .versions
                .get(&version)
                .unwrap_or_else(|| entry.target())
                .template,
        );
        let Some(instance) = entry.instances.get_mut(&number) else {
            return false;
        };
        let task = &mut instance.tasks[index];
        let mut next = task.clone();
        next.state = status.state;
        next.reason = status.reason;
        next.message = status.message.clone();
        next.healthy = status.healthy.or(task.healthy);
        next.ready = status.ready.or(task.ready);
        if let Some(pod) = &status.pod
            && !pod.ip.is_empty()
        {
            next.pod_ip = pod.ip.clone();
        }
        next.restart_count = status.restart_count.max(task.restart_count);
        let state = next.state();
        let unreachable = match state {
            pb::TaskState::TaskUnreachable => instance.unreachable_since.or(Some(now)),
            _ => None,
        };
        if next == *task && unreachable == instance.unreachable_since {
            return false;
        }
        *task = next;
        instance.unreachable_since = unreachable;
        let healthy = instance.running()
            && instance
                .tasks
                .iter()
                .zip(&checks)
                .all(|(t, (live, ready))| {
                    (!live || t.healthy == Some(true)) && (!ready || t.ready == Some(true))
                });
        instance.healthy_since = match (healthy, instance.healthy_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(now),
            (false, _) => None,
        };
        self.instance_changed(name, number);
        true
    }

    /// A task of a live instance ended: the rest of the instance is
    /// killed, and unless the launch never happened (UNKNOWN) it counts as
    /// a failure.
    fn instance_ended(
        &mut self,
        name: &str,
        number: u32,
        status: &pb::TaskStatus,
        state: pb::TaskState,
        now: f64,
    ) -> Vec<Kill> {
        let version = self.entries[name].instances[&number].version;
        let kills = self.kill_instance(name, number);
        if state != pb::TaskState::TaskUnknown {
            let why = format!(
                "instance {name}.{version}.{number} failed: {}",
                describe(status, state)
            );
            if let Some(e) = self.entries.get_mut(name) {
                e.meta.message = why.clone();
            }
            self.record_failure(name, now);
            self.count_rollout_failure(name, version, &why, now);
        }
        kills
    }

    /// Bumps the restart backoff.
    fn record_failure(&mut self, name: &str, now: f64) {
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        entry.meta.failures = entry.meta.failures.saturating_add(1);
        entry.meta.last_failure_at = now;
        let delay = entry.target().restart.delay(entry.meta.failures);
        entry.meta.backoff_until = now + delay.as_secs_f64();
        self.meta_changed(name);
    }

    /// A new-version instance failed during a rollout: enough of them fail
    /// the rollout.
    fn count_rollout_failure(&mut self, name: &str, version: u32, why: &str, now: f64) {
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        let target = entry.meta.target;
        let limit = entry.meta.instances.clamp(1, ROLLOUT_FAILURE_LIMIT);
        let Some(rollout) = entry.meta.rollout.as_mut() else {
            return;
        };
        if version != target || rollout.failed {
            return;
        }
        rollout.new_failures += 1;
        if rollout.new_failures >= limit {
            self.fail_rollout(name, why, now);
        }
    }

    /// Rolls back to the previous target (auto_rollback, and not already a
    /// rollback), or stops the rollout as failed.
    fn fail_rollout(&mut self, name: &str, why: &str, now: f64) {
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        let auto = entry.target().update.auto_rollback;
        let Some(rollout) = entry.meta.rollout.as_mut() else {
            return;
        };
        if auto && !rollout.rolling_back && entry.versions.contains_key(&rollout.from) {
            let back_to = rollout.from;
            let failed = entry.meta.target;
            entry.meta.message = format!("rolled back to version {back_to}: {why}");
            entry.meta.target = back_to;
            *rollout = Rollout {
                from: failed,
                started_at: now,
                last_progress: now,
                best: (0, u32::MAX),
                new_failures: 0,
                rolling_back: true,
                failed: false,
            };
        } else {
            rollout.failed = true;
            entry.meta.message = format!("rollout failed: {why}");
        }
        self.meta_changed(name);
    }

    // ---- time ----------------------------------------------------------------

    /// Acts on time: unreachable instances past the grace are replaced,
    /// rollouts past their progress deadline fail, the backoff resets once
    /// a replacement is available; returns what to kill.
    pub fn tick(&mut self, now: f64) -> Vec<Kill> {
        self.now = self.now.max(now);
        let names: Vec<String> = self.entries.keys().cloned().collect();
        let mut kills = Vec::new();
        for name in names {
            kills.extend(self.expire_unreachable(&name, now));
            self.check_deadline(&name, now);
            kills.extend(self.converge(&name, now));
        }
        kills
    }

    fn expire_unreachable(&mut self, name: &str, now: f64) -> Vec<Kill> {
        let lost: Vec<(u32, u32)> = self.entries[name]
            .live()
            .filter(|i| {
                i.unreachable_since
                    .is_some_and(|s| now - s >= UNREACHABLE_GRACE_SECONDS)
            })
            .map(|i| (i.number, i.version))
            .collect();
        let mut kills = Vec::new();
        for (number, version) in lost {
            // Forgotten at once: it may never report again. Should its agent
            // come back, its updates are a stray's and get it killed.
            kills.extend(self.kill_instance(name, number));
            if let Some(e) = self.entries.get_mut(name) {
                e.instances.remove(&number);
                e.meta.message = format!(
                    "instance {name}.{version}.{number} unreachable for over {UNREACHABLE_GRACE_SECONDS}s"
                );
            }
            self.changes
                .push(Change::Instance((name.to_string(), number), None));
            let why = format!("instance {name}.{version}.{number} unreachable");
            self.record_failure(name, now);
            self.count_rollout_failure(name, version, &why, now);
        }
        kills
    }

    fn check_deadline(&mut self, name: &str, now: f64) {
        let entry = &self.entries[name];
        let deadline = entry.target().update.progress_deadline.as_secs_f64();
        let Some(r) = &entry.meta.rollout else {
            return;
        };
        if !r.failed && now - r.last_progress >= deadline {
            let why = format!("no progress for {deadline}s");
            self.fail_rollout(name, &why, now);
        }
    }

    /// The earliest time `tick` (or `place`) has something to do.
    pub fn next_wakeup(&self) -> Option<f64> {
        let mut times = Vec::new();
        for e in self.entries.values() {
            if e.meta.backoff_until > self.now {
                times.push(e.meta.backoff_until);
            }
            if let Some(r) = &e.meta.rollout
                && !r.failed
            {
                times.push(r.last_progress + e.target().update.progress_deadline.as_secs_f64());
            }
            for i in e.live() {
                if let Some(since) = i.healthy_since {
                    let at = since + e.min_healthy(i.version);
                    if at > self.now {
                        times.push(at);
                    }
                }
                if let Some(since) = i.unreachable_since {
                    times.push(since + UNREACHABLE_GRACE_SECONDS);
                }
            }
            if e.destroying() {
                times.extend(
                    e.destroys
                        .values()
                        .filter(|r| !r.in_flight)
                        .map(|r| r.next_at.max(self.now)),
                );
            }
        }
        times.into_iter().reduce(f64::min)
    }

    /// True when some service wants an instance launched and is not
    /// backing off (as of the latest "now" seen): the actor REVIVEs then,
    /// SUPPRESSes otherwise, and revisits at `next_wakeup`.
    pub fn wants_offers(&self) -> bool {
        self.entries
            .values()
            .any(|e| self.now >= e.meta.backoff_until && e.plan(self.now).0 > 0)
    }

    // ---- persistent volumes --------------------------------------------------

    /// Every task not known to have ended, for reconciliation.
    pub fn launched(&self) -> Vec<(TaskId, Option<AgentId>)> {
        self.entries
            .values()
            .flat_map(|e| e.instances.values())
            .flat_map(|i| {
                i.tasks.iter().filter(|t| !t.ended()).filter_map(|t| {
                    let id = TaskId::parse(&t.id, "task_id").ok()?;
                    Some((id, AgentId::parse(&i.agent_id, "agent_id").ok()))
                })
            })
            .collect()
    }

    // ---- convergence ---------------------------------------------------------

    /// Kills what the rollout or a scale-down wants gone, tracks rollout
    /// progress and completion, resets the backoff, drops unused versions.
    fn converge(&mut self, name: &str, now: f64) -> Vec<Kill> {
        let Some(entry) = self.entries.get(name) else {
            return Vec::new();
        };
        let (_, doomed) = entry.plan(now);
        let mut kills = Vec::new();
        for number in doomed {
            kills.extend(self.kill_instance(name, number));
            self.forget_ended(name, number);
        }
        self.reset_backoff(name, now);
        self.track_rollout(name, now);
        self.drop_unused_versions(name);
        kills
    }

    /// A replacement launched after the last failure stayed healthy for
    /// `min_healthy_time`: the crash loop is over.
    fn reset_backoff(&mut self, name: &str, now: f64) {
        let Some(entry) = self.entries.get(name) else {
            return;
        };
        if entry.meta.failures == 0 {
            return;
        }
        let recovered = entry
            .live()
            .any(|i| i.launched_at >= entry.meta.last_failure_at && entry.available(i, now));
        if recovered {
            if let Some(e) = self.entries.get_mut(name) {
                e.meta.failures = 0;
                e.meta.backoff_until = 0.0;
            }
            self.meta_changed(name);
        }
    }

    fn track_rollout(&mut self, name: &str, now: f64) {
        let Some(entry) = self.entries.get(name) else {
            return;
        };
        let Some(rollout) = &entry.meta.rollout else {
            return;
        };
        let target = entry.meta.target;
        let new_available = entry
            .live()
            .filter(|i| i.version == target && entry.available(i, now))
            .count() as u32;
        let old_left = entry
            .instances
            .values()
            .filter(|i| i.version != target)
            .count() as u32;
        let done = old_left == 0 && new_available == entry.meta.instances && {
            entry.live().filter(|i| i.version == target).count() as u32 == entry.meta.instances
        };
        let progressed = new_available > rollout.best.0 || old_left < rollout.best.1;
        let rolling_back = rollout.rolling_back;
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        if done {
            entry.meta.rollout = None;
            if !rolling_back {
                entry.meta.message.clear();
            }
        } else if progressed && let Some(r) = entry.meta.rollout.as_mut() {
            r.best = (r.best.0.max(new_available), r.best.1.min(old_left));
            r.last_progress = now;
        } else {
            return;
        }
        self.meta_changed(name);
    }

    /// Versions no instance runs and no rollout can return to.
    fn drop_unused_versions(&mut self, name: &str) {
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        let keep = |v: u32| {
            v == entry.meta.target
                || entry.meta.rollout.as_ref().is_some_and(|r| r.from == v)
                || entry.instances.values().any(|i| i.version == v)
        };
        let unused: Vec<u32> = entry
            .versions
            .keys()
            .copied()
            .filter(|v| !keep(*v))
            .collect();
        for v in unused {
            entry.versions.remove(&v);
            self.changes
                .push(Change::Version((name.to_string(), v), None));
        }
    }

    /// Marks an instance killed and returns kills for its running tasks.
    fn kill_instance(&mut self, name: &str, number: u32) -> Vec<Kill> {
        let Some(instance) = self
            .entries
            .get_mut(name)
            .and_then(|e| e.instances.get_mut(&number))
        else {
            return Vec::new();
        };
        let was_killing = instance.killing;
        instance.killing = true;
        let kills = instance
            .tasks
            .iter()
            .filter(|t| !t.ended())
            .filter_map(|t| kill_of(&t.id, &instance.agent_id))
            .collect();
        if !was_killing {
            self.instance_changed(name, number);
        }
        kills
    }

    /// Forgets an instance whose tasks all ended (a killed or failed one),
    /// and a deleted service once it has none.
    fn forget_ended(&mut self, name: &str, number: u32) {
        let Some(entry) = self.entries.get_mut(name) else {
            return;
        };
        if entry
            .instances
            .get(&number)
            .is_some_and(|i| i.killing && i.all_ended())
        {
            entry.instances.remove(&number);
            self.changes
                .push(Change::Instance((name.to_string(), number), None));
        }
        self.forget_if_drained(name);
    }

    fn forget_if_drained(&mut self, name: &str) {
        let drained = self
            .entries
            .get(name)
            .is_some_and(|e| e.destroying() && e.slots.is_empty());
        if !drained {
            return;
        }
        if let Some(entry) = self.entries.remove(name) {
            for v in entry.versions.keys() {
                self.changes
                    .push(Change::Version((name.to_string(), *v), None));
            }
            self.changes.push(Change::Service(name.to_string(), None));
        }
    }

    // ---- records -------------------------------------------------------------

    fn meta_changed(&mut self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            self.changes
                .push(Change::Service(name.to_string(), Some(e.meta.clone())));
        }
    }

    fn instance_changed(&mut self, name: &str, number: u32) {
        if let Some(i) = self
            .entries
            .get(name)
            .and_then(|e| e.instances.get(&number))
        {
            self.changes.push(Change::Instance(
                (name.to_string(), number),
                Some(i.clone()),
            ));
        }
    }

    /// Records changed since the last call, oldest first (later ones win).
    pub fn take_changes(&mut self) -> Vec<Change> {
        std::mem::take(&mut self.changes)
    }

    /// Rebuilds services from stored records, instances as last known (the
    /// actor then reconciles them). Services whose target spec no longer
    /// validates are reported and skipped, never silently dropped; an
    /// instance of a version that does not validate is kept, killed.
    pub fn restore(&mut self, records: Vec<StoredService>, now: f64) -> Vec<(String, SpecError)> {
        self.now = self.now.max(now);
        let mut refused = Vec::new();
        for record in records {
            let name = record.meta.name.clone();
            let mut versions = BTreeMap::new();
            let mut error = None;
            for (number, wire) in &record.versions {
                match spec::validate(wire) {
                    Ok(s) => {
                        versions.insert(*number, s);
                    }
                    Err(e) => error = Some(e),
                }
            }
            if !versions.contains_key(&record.meta.target) {
                let e = error.unwrap_or_else(|| {
                    SpecError::new(
                        "service",
                        format!("target version {} missing", record.meta.target),
                    )
                });
                refused.push((name, e));
                continue;
            }
            let instances = record
                .instances
                .into_iter()
                .map(|mut i| {
                    if !versions.contains_key(&i.version) {
                        i.killing = true;
                    }
                    (i.number, i)
                })
                .collect();
            let mut entry = Entry::new(record.meta, versions);
            entry.instances = instances;
            entry.slots = record.slots.into_iter().map(|s| (s.number, s)).collect();
            self.entries.insert(name, entry);
        }
        self.changes.clear();
        refused
    }

    // ---- views ---------------------------------------------------------------

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The target version's validated spec.
    pub fn get(&self, name: &str) -> Option<&Service> {
        self.entries.get(name).map(Entry::target)
    }

    pub fn list(&self, now: f64) -> Vec<ServiceStatus> {
        self.entries
            .keys()
            .filter_map(|n| self.status(n, now))
            .collect()
    }

    pub fn status(&self, name: &str, now: f64) -> Option<ServiceStatus> {
        let e = self.entries.get(name)?;
        let mut spec = e.target().spec.clone();
        spec.instances = e.meta.instances;
        let instances = e
            .instances
            .values()
            .map(|i| instance_status(name, e, i, now))
            .collect();
        Some(ServiceStatus {
            name: name.to_string(),
            spec,
            version: e.meta.target,
            instances_wanted: e.meta.instances,
            instances,
            deployment: e.meta.rollout.as_ref().map(|r| deployment(e, r, now)),
            message: e.meta.message.clone(),
            unplaced: e.unplaced.clone(),
            backoff_until: (e.meta.backoff_until > now).then_some(e.meta.backoff_until),
            deleting: e.meta.deleting,
        })
    }
}

fn entry_version(entry: &Entry, number: u32) -> u32 {
    entry
        .instances
        .get(&number)
        .map_or(entry.meta.target, |i| i.version)
}

/// One offer being packed.
struct Room<'a> {
    offer: &'a pb::Offer,
    left: OfferResources,
    launches: Vec<Launch>,
}

/// Where a new instance goes: the offer, its host ports, its slot and the
/// slot's volumes to create with it.
struct Placed<'a> {
    offer: &'a pb::Offer,
    host_ports: corral_proto::RangeSet,
    slot: Option<u32>,
    create: Vec<NewVolume>,
}

/// A slot chosen for an instance: the room (index), what to create, and
/// what the room has left after it.
struct Choice {
    room: usize,
    slot: u32,
    create: Vec<NewVolume>,
    left: OfferResources,
}

/// Why an instance's launch could not be built; reported as the service's
/// unplaced reason rather than a panic.
#[derive(Debug, thiserror::Error)]
enum LaunchError {
    #[error("cannot build task ids: {0}")]
    Id(#[from] corral_proto::IdError),
    #[error("pod volume {volume}: no persistent volume for claim '{claim}' in the instance's slot")]
    NoVolume { volume: String, claim: String },
}

/// The task is over, or never ran (UNKNOWN to the master after a
/// reconciliation).
fn ends(state: pb::TaskState) -> bool {
    is_terminal(state) || state == pb::TaskState::TaskUnknown
}

/// None for an id that is not a valid task id (nothing could be killed).
fn kill_of(task_id: &str, agent_id: &str) -> Option<Kill> {
    Some(Kill {
        task_id: TaskId::parse(task_id, "task_id").ok()?,
        agent_id: AgentId::parse(agent_id, "agent_id").ok(),
    })
}

/// An update for a task the core does not track: kill it, unless it is
/// over already (so a duplicate of a final update does nothing).
fn stray_kill(status: &pb::TaskStatus, state: pb::TaskState) -> Vec<Kill> {
    if ends(state) {
        return Vec::new();
    }
    kill_of(&status.task_id, &status.agent_id)
        .into_iter()
        .collect()
}

/// `SERVICE.VERSION.INSTANCE[.CONTAINER]` → its parts; None for ids that
/// are not ours. Service names cannot contain `.`.
pub fn parse_task_id(id: &str) -> Option<(&str, u32, u32, Option<&str>)> {
    let mut parts = id.split('.');
    let name = parts.next().filter(|n| !n.is_empty())?;
    let version = parts.next()?.parse().ok()?;
    let number = parts.next()?.parse().ok()?;
    let container = parts.next();
    if parts.next().is_some() || container == Some("") {
        return None;
    }
    Some((name, version, number, container))
}

/// `STATE (REASON): message`.
fn describe(status: &pb::TaskStatus, state: pb::TaskState) -> String {
    let mut text = state.as_str_name().to_string();
    let reason = pb::Reason::try_from(status.reason)
        .map(reason_name)
        .unwrap_or("");
    if !reason.is_empty() {
        text.push_str(&format!(" ({reason})"));
    }
    if !status.message.is_empty() {
        text.push_str(&format!(": {}", status.message));
    }
    text
}

/// The spec with `instances` zeroed: two specs that differ only there are
/// a scale, not a new version.
fn without_instances(spec: &pb::ServiceSpec) -> pb::ServiceSpec {
    pb::ServiceSpec {
        instances: 0,
        ..spec.clone()
    }
}

/// Per task of an instance: (has a liveness or startup check, has a
/// readiness check).
fn task_checks(template: &Template) -> Vec<(bool, bool)> {
    let of = |checks: &[spec::HealthCheck]| {
        (
            checks
                .iter()
                .any(|c| matches!(c.kind, HealthCheckKind::Liveness | HealthCheckKind::Startup)),
            checks.iter().any(|c| c.kind == HealthCheckKind::Readiness),
        )
    };
    match template {
        Template::Task(t) => vec![of(&t.health_checks)],
        Template::Pod(p) => p.containers.iter().map(|c| of(&c.health_checks)).collect(),
    }
}

/// What one instance takes from an offer (host ports apart).
fn template_resources(template: &Template) -> Resources {
    match template {
        Template::Task(t) => t.resources.clone(),
        Template::Pod(p) => p.resources(),
    }
}

/// A task of an instance being built: its builder and its full
/// environment (kept apart because the builder attaches env only to a
/// command, and image tasks have none of their own).
struct Draft {
    builder: TaskBuilder,
    env: BTreeMap<String, String>,
}

impl Draft {
    /// Every task of `service`: its id, the service's labels plus
    /// `corral.service`/`corral.version`/`corral.instance`, the template's
    /// env plus CORRAL_SERVICE, CORRAL_SERVICE_VERSION, CORRAL_INSTANCE.
    fn new(
        task_id: TaskId,
        service: &Service,
        version: u32,
        number: u32,
        env: &BTreeMap<String, String>,
    ) -> Self {
        let mut b = TaskBuilder::new(task_id);
        for (k, v) in &service.labels {
            b = b.label(k.clone(), v.clone());
        }
        b = b
            .label(LABEL_SERVICE, service.name.clone())
            .label(LABEL_VERSION, version.to_string())
            .label(LABEL_INSTANCE, number.to_string());
        if let Some(grace) = service.kill_grace {
            b = b.kill_grace(grace);
        }
        let mut env = env.clone();
        env.insert(ENV_SERVICE.into(), service.name.clone());
        env.insert(ENV_VERSION.into(), version.to_string());
        env.insert(ENV_INSTANCE.into(), number.to_string());
        Self { builder: b, env }
    }

    fn build(self, offer: &pb::Offer) -> pb::TaskInfo {
        let mut info = self.builder.build_for(offer);
        let command = info.command.get_or_insert_with(Default::default);
        command.environment = self.env.into_iter().collect();
        info
    }
}

/// The TaskInfo of a task template's instance, host ports as PORT0.. and
/// PORT (Marathon's names).
fn task_info(
    task_id: TaskId,
    service: &Service,
    (version, number): (u32, u32),
    t: &Task,
    host_ports: corral_proto::RangeSet,
    offer: &pb::Offer,
) -> pb::TaskInfo {
    let mut d = Draft::new(task_id, service, version, number, &t.env);
    let ports: Vec<u64> = host_ports
        .ranges()
        .iter()
        .flat_map(|&(lo, hi)| lo..=hi)
        .collect();
    for (i, p) in ports.iter().enumerate() {
        d.env.insert(format!("PORT{i}"), p.to_string());
    }
    if let Some(first) = ports.first() {
        d.env.insert("PORT".into(), first.to_string());
    }
    let mut resources = t.resources.clone();
    resources.ports = host_ports;
    let mut b = d.builder.resources(&resources);
    b = match &t.command {
        Command::Shell(s) => b.shell(s.clone()),
        Command::Argv(argv) => b.command(argv.clone()),
        // The image's Entrypoint/Cmd: `build` adds a command carrying only
        // the environment.
        Command::Image => b,
    };
    if let Some(image) = &t.image {
        b = b.image(image.clone());
    }
    for c in &t.health_checks {
        b = b.health_check(c.to_proto());
    }
    d.builder = b;
    d.build(offer)
}

/// The LAUNCH_GROUP of a pod instance: one task per container, ids
/// `BASE.CONTAINER`.
fn group_info(
    base: &str,
    service: &Service,
    (version, number): (u32, u32),
    pod: &Pod,
    offer: &pb::Offer,
    persistent: &BTreeMap<&str, &str>,
) -> Result<pb::TaskGroupInfo, LaunchError> {
    let tasks = pod
        .containers
        .iter()
        .map(|c| {
            let id = TaskId::parse(&format!("{base}.{}", c.name), "task_id")?;
            Ok(container_info(id, service, (version, number), c, offer))
        })
        .collect::<Result<Vec<_>, corral_proto::IdError>>()?;
    let volumes = pod
        .volumes
        .iter()
        .map(|v| {
            let source = match &v.source {
                VolumeSource::EmptyDir => pb::pod_volume::Source::EmptyDir(pb::EmptyDirVolume {}),
                VolumeSource::HostPath(p) => pb::pod_volume::Source::HostPath(p.clone()),
                VolumeSource::Persistent { claim, .. } => {
                    let id =
                        persistent
                            .get(claim.as_str())
                            .ok_or_else(|| LaunchError::NoVolume {
                                volume: v.name.clone(),
                                claim: claim.clone(),
                            })?;
                    pb::pod_volume::Source::Persistent((*id).to_string())
                }
            };
            Ok(pb::PodVolume {
                name: v.name.clone(),
                source: Some(source),
            })
        })
        .collect::<Result<Vec<_>, LaunchError>>()?;
    Ok(pb::TaskGroupInfo {
        tasks,
        volumes,
        restart_policy: pod.restart_policy.to_proto() as i32,
    })
}

/// One container's task: Kubernetes' `command` replaces the Entrypoint,
/// `args` the Cmd.
fn container_info(
    task_id: TaskId,
    service: &Service,
    (version, number): (u32, u32),
    c: &Container,
    offer: &pb::Offer,
) -> pb::TaskInfo {
    let mut d = Draft::new(task_id, service, version, number, &c.env);
    let mut b = d.builder.name(c.name.clone()).resources(&c.resources);
    let argv: Vec<String> = c.command.iter().chain(&c.args).cloned().collect();
    if !argv.is_empty() {
        b = b.command(argv);
    }
    if let Some(image) = &c.image {
        b = b.image(image.clone());
        if !c.command.is_empty() {
            b = b.entrypoint_override();
        }
    }
    for m in &c.volume_mounts {
        b = b.pod_volume(m.volume.clone(), m.path.clone(), m.read_only);
    }
    for h in &c.health_checks {
        b = b.health_check(h.to_proto());
    }
    d.builder = b;
    d.build(offer)
}

/// Why an instance found no offer: constraints (given `placements`, where
/// the service runs), or the largest matching offer's shortfall.
fn unplaced_reason(
    placements: &[(String, Vec<pb::Attribute>)],
    service: &Service,
    need: &Resources,
    offers: &[&pb::Offer],
) -> String {
    let refs: Vec<Placement<'_>> = placements
        .iter()
        .map(|(h, a)| Placement::new(h, a))
        .collect();
    let admitted: Vec<Resources> = offers
        .iter()
        .filter(|o| all_admit(&service.constraints, o, &refs))
        .filter_map(|o| Resources::from_proto(&o.resources, "offer.resources").ok())
        .collect();
    if admitted.is_empty() {
        let constraints: Vec<String> = service
            .constraints
            .iter()
            .map(ToString::to_string)
            .collect();
        return format!(
            "no offered agent satisfies the constraints ({}) given where the service's instances run",
            constraints.join(", ")
        );
    }
    let short = shortfall(need, &admitted);
    if short.is_empty() {
        "the offers are used up (or lack ports)".to_string()
    } else {
        short.join("; ")
    }
}

fn instance_status(name: &str, e: &Entry, i: &Instance, now: f64) -> InstanceStatus {
    let rank = |s: pb::TaskState| match s {
        pb::TaskState::TaskStaging => 0,
        pb::TaskState::TaskStarting => 1,
        pb::TaskState::TaskUnreachable => 2,
        pb::TaskState::TaskRunning => 4,
        _ => 3,
    };
    let state = if i.killing {
        pb::TaskState::TaskKilling
    } else {
        i.tasks
            .iter()
            .map(TaskRecord::state)
            .min_by_key(|s| rank(*s))
            .unwrap_or(pb::TaskState::TaskStaging)
    };
    let checks = task_checks(
        &e.versions
            .get(&i.version)
            .unwrap_or_else(|| e.target())
            .template,
    );
    InstanceStatus {
        id: format!("{name}.{}.{}", i.version, i.number),
        number: i.number,
        version: i.version,
        agent_id: i.agent_id.clone(),
        hostname: i.hostname.clone(),
        task_ids: i.tasks.iter().map(|t| t.id.clone()).collect(),
        state,
        healthy: i.healthy_since.is_some(),
        ready: i.running()
            && i.tasks
                .iter()
                .zip(&checks)
                .all(|(t, (_, ready))| !ready || t.ready == Some(true)),
        available: e.available(i, now),
        pod_ip: i
            .tasks
            .iter()
            .map(|t| t.pod_ip.clone())
            .find(|ip| !ip.is_empty())
            .unwrap_or_default(),
        restart_count: i.tasks.iter().map(|t| t.restart_count).sum(),
        volumes: i
            .slot
            .and_then(|k| e.slots.get(&k))
            .map(|slot| slot.volumes.iter().map(|v| v.id.clone()).collect())
            .unwrap_or_default(),
    }
}

fn deployment(e: &Entry, r: &Rollout, now: f64) -> DeploymentStatus {
    let target = e.meta.target;
    let count = |f: &dyn Fn(&Instance) -> bool| e.live().filter(|i| f(i)).count() as u32;
    DeploymentStatus {
        target_version: target,
        from_version: r.from,
        old_instances: count(&|i| i.version != target),
        new_instances: count(&|i| i.version == target),
        new_available: count(&|i| i.version == target && e.available(i, now)),
        available: count(&|i| e.available(i, now)),
        rolling_back: r.rolling_back,
        failed: r.failed,
    }
}

mod slots;

use slots::{Retry, check_claims, claims};
pub use slots::{Slot, SlotVolume};

#[cfg(test)]
mod tests;
