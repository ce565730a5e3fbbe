//! Property tests: random sequences of operations against the allocator and a
//! slow reference model that recomputes everything from scratch (shares from
//! summed `Resources`, filters as a flat list, DRF as a full minimum).
//!
//! After every operation the allocator must agree with the model on what is
//! free and who holds what, conserve resources, and have every cached
//! "blocked" set equal to one computed from scratch (so a missed
//! invalidation is caught even when it would not yet change an offer). For every allocation of a
//! round, in the order returned, the model checks that the agent was active
//! and gave exactly what was free (so nothing is handed out twice), and that
//! the framework is the one two-level DRF picks among the eligible,
//! unfiltered frameworks *at that moment* (with earlier allocations of the
//! same round already counted). After the round, no agent that some framework
//! could take may be left with free resources.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::{Allocation, Allocator};
use corral_proto::{AgentId, Amount, FrameworkId, RangeSet, Resources};
use proptest::prelude::*;

const AGENTS: usize = 4;
const FRAMEWORKS: usize = 5;
const ROLES: [&str; 3] = ["*", "r1", "r2"];

fn agent_id(i: usize) -> AgentId {
    AgentId::generated(format!("a{i}"))
}

fn framework_id(i: usize) -> FrameworkId {
    FrameworkId::generated(format!("f{i}"))
}

fn intersection(a: &Resources, b: &Resources) -> Resources {
    let mut ports = RangeSet::new();
    for &(lo, hi) in a.ports.ranges() {
        for p in lo..=hi {
            if b.ports.contains(&RangeSet::from_ranges([(p, p)])) {
                ports.insert(p, p);
            }
        }
    }
    Resources {
        cpus: a.cpus.min(b.cpus),
        mem: a.mem.min(b.mem),
        disk: a.disk.min(b.disk),
        gpus: a.gpus.min(b.gpus),
        ports,
    }
}

#[derive(Debug, Clone)]
enum Op {
    AddAgent(usize, Resources, Vec<(usize, Resources)>),
    RemoveAgent(usize),
    SetAgentActive(usize, bool),
    AddFramework(usize, usize),
    RemoveFramework(usize),
    SetFrameworkActive(usize, bool),
    SetWeight(usize, f64),
    AllocateUsed(usize, usize, Resources),
    /// Return everything the framework holds on the agent.
    RecoverWhole(usize, usize, Option<u64>),
    /// Return some resources (the allocator keeps only what is held).
    RecoverSome(usize, usize, Resources, Option<u64>),
    /// Decline every offer of the last round, with the given refuse millis.
    DeclineLast(Option<u64>),
    Suppress(usize),
    Revive(usize),
    Advance(u64),
    Allocate,
}

fn resources() -> impl Strategy<Value = Resources> {
    (
        0u64..=4000,
        0u64..=3,
        0u64..=2,
        prop::collection::vec((0u64..16, 0u64..4), 0..3),
    )
        .prop_map(|(cpus, mem, disk, ranges)| Resources {
            // Multiples of 500 milli-cpus so that containment happens often.
            cpus: Amount::from_milli(cpus / 500 * 500),
            mem: Amount::from_units(mem),
            disk: Amount::from_units(disk),
            gpus: Amount::ZERO,
            ports: RangeSet::from_ranges(ranges.into_iter().map(|(b, l)| (b, b + l))),
        })
}

fn refuse() -> impl Strategy<Value = Option<u64>> {
    prop_oneof![
        Just(None),
        Just(Some(0)),
        (1u64..5000).prop_map(Some),
        Just(Some(3_600_000)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let a = 0..AGENTS;
    let f = 0..FRAMEWORKS;
    prop_oneof![
        3 => (a.clone(), resources(), prop::collection::vec((f.clone(), resources()), 0..3))
            .prop_map(|(a, t, u)| Op::AddAgent(a, t, u)),
        1 => a.clone().prop_map(Op::RemoveAgent),
        1 => (a.clone(), any::<bool>()).prop_map(|(a, b)| Op::SetAgentActive(a, b)),
        3 => (f.clone(), 0..ROLES.len()).prop_map(|(f, r)| Op::AddFramework(f, r)),
        1 => f.clone().prop_map(Op::RemoveFramework),
        1 => (f.clone(), any::<bool>()).prop_map(|(f, b)| Op::SetFrameworkActive(f, b)),
        1 => (0..ROLES.len(), prop_oneof![Just(0.5), Just(1.0), Just(2.0), Just(3.0)])
            .prop_map(|(r, w)| Op::SetWeight(r, w)),
        1 => (f.clone(), a.clone(), resources()).prop_map(|(f, a, r)| Op::AllocateUsed(f, a, r)),
        2 => (f.clone(), a.clone(), refuse()).prop_map(|(f, a, d)| Op::RecoverWhole(f, a, d)),
        2 => (f.clone(), a.clone(), resources(), refuse())
            .prop_map(|(f, a, r, d)| Op::RecoverSome(f, a, r, d)),
        2 => refuse().prop_map(Op::DeclineLast),
        1 => f.clone().prop_map(Op::Suppress),
        1 => f.prop_map(Op::Revive),
        2 => (0u64..3000).prop_map(Op::Advance),
        4 => Just(Op::Allocate),
    ]
}

#[derive(Debug, Clone)]
struct MAgent {
    total: Resources,
    active: bool,
    held: BTreeMap<usize, Resources>,
}

impl MAgent {
    fn free(&self) -> Resources {
        let mut used = Resources::default();
        for r in self.held.values() {
            used.add(r);
        }
        self.total
            .checked_sub(&used)
            .expect("model: allocations exceed the agent total")
    }
}

#[derive(Debug, Clone)]
struct MFramework {
    role: &'static str,
    active: bool,
    suppressed: bool,
}

#[derive(Debug, Clone)]
struct MFilter {
    framework: usize,
    agent: usize,
    declined: Resources,
    expires: Duration,
}

#[derive(Debug, Default)]
struct Model {
    agents: BTreeMap<usize, MAgent>,
    frameworks: BTreeMap<usize, MFramework>,
    filters: Vec<MFilter>,
    weights: BTreeMap<&'static str, f64>,
}

impl Model {
    fn total(&self) -> Resources {
        let mut t = Resources::default();
        for a in self.agents.values() {
            t.add(&a.total);
        }
        t
    }

    fn framework_allocation(&self, f: usize) -> Resources {
        let mut sum = Resources::default();
        for a in self.agents.values() {
            if let Some(r) = a.held.get(&f) {
                sum.add(r);
            }
        }
        sum
    }

    fn framework_share(&self, f: usize) -> f64 {
        self.framework_allocation(f).dominant_share(&self.total())
    }

    fn role_weighted_share(&self, role: &str) -> f64 {
        let mut sum = Resources::default();
        for (&f, fw) in &self.frameworks {
            if fw.role == role {
                sum.add(&self.framework_allocation(f));
            }
        }
        sum.dominant_share(&self.total()) / self.weights.get(role).copied().unwrap_or(1.0)
    }

    fn ensure_framework(&mut self, f: usize) {
        self.frameworks.entry(f).or_insert(MFramework {
            role: "*",
            active: false,
            suppressed: false,
        });
    }

    fn hold(&mut self, f: usize, a: usize, r: &Resources) {
        let agent = self.agents.get_mut(&a).expect("hold on a known agent");
        let take = intersection(r, &agent.free());
        if !take.is_empty() {
            agent.held.entry(f).or_default().add(&take);
        }
    }

    fn filtered(&self, f: usize, a: usize, free: &Resources, now: Duration) -> bool {
        self.filters.iter().any(|x| {
            x.framework == f && x.agent == a && now < x.expires && x.declined.contains(free)
        })
    }

    /// The framework two-level DRF offers agent `a` to, if any.
    fn pick(&self, a: usize, now: Duration) -> Option<usize> {
        let free = self.agents[&a].free();
        self.frameworks
            .iter()
            .filter(|(f, fw)| fw.active && !fw.suppressed && !self.filtered(**f, a, &free, now))
            .map(|(&f, fw)| {
                let key = (
                    self.role_weighted_share(fw.role),
                    fw.role,
                    self.framework_share(f),
                    framework_id(f).to_string(),
                );
                (key, f)
            })
            .min_by(|x, y| {
                let (a, b) = (&x.0, &y.0);
                a.0.total_cmp(&b.0)
                    .then_with(|| a.1.cmp(b.1))
                    .then_with(|| a.2.total_cmp(&b.2))
                    .then_with(|| a.3.cmp(&b.3))
            })
            .map(|(_, f)| f)
    }
}

struct Harness {
    real: Allocator,
    model: Model,
    now: Duration,
    last_round: Vec<Allocation>,
}

impl Harness {
    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        let now = self.now;
        match op {
            Op::AddAgent(a, total, used) => {
                let used_ids = used
                    .iter()
                    .map(|(f, r)| (framework_id(*f), r.clone()))
                    .collect();
                self.real.add_agent(agent_id(a), total.clone(), used_ids);
                self.model.filters.retain(|x| x.agent != a);
                self.model.agents.insert(
                    a,
                    MAgent {
                        total,
                        active: true,
                        held: BTreeMap::new(),
                    },
                );
                for (f, r) in used {
                    self.model.ensure_framework(f);
                    self.model.hold(f, a, &r);
                }
            }
            Op::RemoveAgent(a) => {
                self.real.remove_agent(&agent_id(a));
                self.model.agents.remove(&a);
                self.model.filters.retain(|x| x.agent != a);
            }
            Op::SetAgentActive(a, active) => {
                self.real.set_agent_active(&agent_id(a), active);
                if let Some(agent) = self.model.agents.get_mut(&a) {
                    agent.active = active;
                }
            }
            Op::AddFramework(f, role) => {
                self.real.add_framework(framework_id(f), ROLES[role]);
                let fw = self.model.frameworks.entry(f).or_insert(MFramework {
                    role: ROLES[role],
                    active: true,
                    suppressed: false,
                });
                fw.role = ROLES[role];
                fw.active = true;
            }
            Op::RemoveFramework(f) => {
                self.real.remove_framework(&framework_id(f));
                self.model.frameworks.remove(&f);
                for agent in self.model.agents.values_mut() {
                    agent.held.remove(&f);
                }
                self.model.filters.retain(|x| x.framework != f);
            }
            Op::SetFrameworkActive(f, active) => {
                self.real.set_framework_active(&framework_id(f), active);
                if let Some(fw) = self.model.frameworks.get_mut(&f) {
                    fw.active = active;
                }
            }
            Op::SetWeight(role, weight) => {
                self.real.set_weight(ROLES[role], weight);
                self.model.weights.insert(ROLES[role], weight);
            }
            Op::AllocateUsed(f, a, r) => {
                self.real.allocate_used(&framework_id(f), &agent_id(a), &r);
                if self.model.agents.contains_key(&a) {
                    self.model.ensure_framework(f);
                    self.model.hold(f, a, &r);
                }
            }
            Op::RecoverWhole(f, a, refuse) => {
                let held = self
                    .model
                    .agents
                    .get(&a)
                    .and_then(|x| x.held.get(&f))
                    .cloned()
                    .unwrap_or_default();
                self.recover(f, a, held, refuse);
            }
            Op::RecoverSome(f, a, r, refuse) => self.recover(f, a, r, refuse),
            Op::DeclineLast(refuse) => {
                for offer in std::mem::take(&mut self.last_round) {
                    let f = parse_index(offer.framework_id.as_str());
                    let a = parse_index(offer.agent_id.as_str());
                    self.recover(f, a, offer.resources, refuse);
                }
            }
            Op::Suppress(f) => {
                self.real.suppress(&framework_id(f));
                if let Some(fw) = self.model.frameworks.get_mut(&f) {
                    fw.suppressed = true;
                }
            }
            Op::Revive(f) => {
                self.real.revive(&framework_id(f));
                if let Some(fw) = self.model.frameworks.get_mut(&f) {
                    fw.suppressed = false;
                    self.model.filters.retain(|x| x.framework != f);
                }
            }
            Op::Advance(ms) => self.now += Duration::from_millis(ms),
            Op::Allocate => {
                let offers = self.real.allocate(now);
                self.check_round(&offers)?;
                self.last_round = offers;
            }
        }
        self.check_state()
    }

    fn recover(&mut self, f: usize, a: usize, r: Resources, refuse: Option<u64>) {
        let now = self.now;
        self.real.recover(
            &framework_id(f),
            &agent_id(a),
            &r,
            refuse.map(Duration::from_millis),
            now,
        );
        if !self.model.frameworks.contains_key(&f) {
            return;
        }
        let Some(agent) = self.model.agents.get_mut(&a) else {
            return;
        };
        if let Some(held) = agent.held.get_mut(&f) {
            let back = intersection(&r, held);
            *held = held.checked_sub(&back).expect("back ⊆ held");
            if held.is_empty() {
                agent.held.remove(&f);
            }
        }
        if let Some(ms) = refuse.filter(|&ms| ms > 0) {
            self.model.filters.push(MFilter {
                framework: f,
                agent: a,
                declined: r,
                expires: now + Duration::from_millis(ms),
            });
        }
    }

    fn check_round(&mut self, offers: &[Allocation]) -> Result<(), TestCaseError> {
        let now = self.now;
        let mut seen = BTreeSet::new();
        for offer in offers {
            let f = parse_index(offer.framework_id.as_str());
            let a = parse_index(offer.agent_id.as_str());
            prop_assert!(seen.insert(a), "agent {a} offered twice in one round");
            let agent = self.model.agents.get(&a);
            prop_assert!(agent.is_some(), "unknown agent {a} offered");
            let agent = agent.expect("checked");
            prop_assert!(agent.active, "inactive agent {a} offered");
            let free = agent.free();
            prop_assert!(!free.is_empty());
            // Property 2: an allocation is exactly what was free, so it never
            // includes anything already held (ports included).
            prop_assert_eq!(
                &offer.resources,
                &free,
                "offer of a{} is not its free resources",
                a
            );
            // Property 3: the framework DRF picks among the eligible ones now.
            let want = self.model.pick(a, now);
            prop_assert_eq!(
                Some(f),
                want,
                "a{} went to f{} but DRF picks {:?}",
                a,
                f,
                want
            );
            self.model
                .agents
                .get_mut(&a)
                .expect("known agent")
                .held
                .entry(f)
                .or_default()
                .add(&free);
        }
        // No agent that someone could take was skipped.
        for (&a, agent) in &self.model.agents {
            if agent.active && !agent.free().is_empty() {
                prop_assert_eq!(self.model.pick(a, now), None, "a{} was skipped", a);
            }
        }
        Ok(())
    }

    /// Framework indices to check: the fixed pool and any the test added.
    fn framework_count(&self) -> usize {
        let added = self
            .model
            .frameworks
            .keys()
            .next_back()
            .map_or(0, |f| f + 1);
        added.max(FRAMEWORKS)
    }

    fn check_state(&self) -> Result<(), TestCaseError> {
        if let Err(why) = self.real.check_filter_caches(self.now) {
            return Err(TestCaseError::fail(why));
        }
        for a in 0..AGENTS {
            let id = agent_id(a);
            let Some(agent) = self.model.agents.get(&a) else {
                prop_assert_eq!(self.real.available(&id), None);
                continue;
            };
            prop_assert_eq!(self.real.available(&id), Some(agent.free()));
            // Property 1: free + held == total, with every port in exactly
            // one place (counts add up and the union is the total).
            let mut sum = self.real.available(&id).unwrap_or_default();
            let mut port_count = sum.ports.count();
            for f in 0..self.framework_count() {
                let held = self.real.allocated(&framework_id(f), &id);
                let want = agent.held.get(&f).cloned().unwrap_or_default();
                prop_assert_eq!(&held, &want, "f{} on a{}", f, a);
                port_count += held.ports.count();
                sum.add(&held);
            }
            prop_assert_eq!(&sum, &agent.total);
            prop_assert_eq!(
                port_count,
                agent.total.ports.count(),
                "a port is held twice on a{}",
                a
            );
        }
        for f in 0..self.framework_count() {
            let share = self.real.framework_share(&framework_id(f));
            let want = if self.model.frameworks.contains_key(&f) {
                self.model.framework_share(f)
            } else {
                0.0
            };
            prop_assert_eq!(share, want, "share of f{}", f);
        }
        Ok(())
    }
}

fn parse_index(id: &str) -> usize {
    id[1..].parse().expect("ids are a<n> / f<n>")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_operations_never_overallocate_never_double_allocate_and_follow_drf(
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut h = Harness {
            real: Allocator::with_seed(seed),
            model: Model::default(),
            now: Duration::ZERO,
            last_round: Vec::new(),
        };
        for op in ops {
            h.apply(op)?;
        }
    }
}

/// The filter shortcut (`eligible & !blocked`, and the direct pick among a
/// few candidates instead of a walk of the order) only kicks in with many
/// frameworks; this runs the same checks with 64 frameworks that have mostly
/// declined every agent, with expiries spread so that rounds see anywhere
/// from one candidate to all of them.
mod many_frameworks {
    use super::*;

    const MANY: usize = 64;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn drf_pick_is_exact_when_most_frameworks_declined(
            seed in any::<u64>(),
            open in prop::collection::vec(prop::collection::btree_set(0..MANY, 0..4), 3),
            // Spread expiries exercise recomputes on expiry; uniform long
            // ones keep each agent's cached blocked set alive across rounds.
            expiries in prop_oneof![
                prop::collection::vec(1u64..6000, MANY),
                Just(vec![3_600_000; MANY]),
            ],
            held in prop::collection::vec((0..MANY, 0usize..3, 0u64..3), 0..20),
            rounds in prop::collection::vec((0u64..2000, any::<bool>(), any::<prop::sample::Index>()), 1..8),
        ) {
            let mut h = Harness {
                real: Allocator::with_seed(seed),
                model: Model::default(),
                now: Duration::ZERO,
                last_round: Vec::new(),
            };
            let total = Resources::parse("cpus:4;mem:4;ports:[1-4]").unwrap();
            for a in 0..3 {
                h.apply(Op::AddAgent(a, total.clone(), Vec::new()))?;
            }
            for f in 0..MANY {
                h.apply(Op::AddFramework(f, f % ROLES.len()))?;
            }
            for &(f, a, units) in &held {
                let r = Resources { cpus: Amount::from_units(units), ..Default::default() };
                h.apply(Op::AllocateUsed(f, a, r))?;
            }
            // Everyone but `open` declines what is free now, as if offered.
            for (a, open) in open.iter().enumerate() {
                let free = h.model.agents[&a].free();
                for f in (0..MANY).filter(|f| !open.contains(f)) {
                    let ms = expiries[(f + a) % MANY];
                    h.apply(Op::RecoverSome(f, a, free.clone(), Some(ms)))?;
                }
            }
            for (advance, decline, task_ends) in rounds {
                h.apply(Op::Advance(advance))?;
                h.apply(Op::Allocate)?;
                if decline {
                    h.apply(Op::DeclineLast(Some(1500)))?;
                }
                // A task ends: more becomes free than some declined.
                if !held.is_empty() {
                    let (f, a, _) = held[task_ends.index(held.len())];
                    h.apply(Op::RecoverWhole(f, a, None))?;
                }
            }
        }
    }
}
