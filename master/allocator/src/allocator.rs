//! The allocator: who gets which agent's free resources.
//!
//! A simplified Mesos hierarchical allocator (`src/master/allocator/mesos/
//! hierarchical.cpp`). One round visits every active agent with free
//! resources, in a seeded shuffled order, and offers *all* of them to the
//! first framework in two-level DRF order (roles by weighted share, then
//! frameworks inside the role by share) that is active, not suppressed and
//! not filtered for that agent. The allocation counts toward the framework's
//! and role's shares at once, so the next agent may go to someone else.
//!
//! Shares are measured against the total of **all registered agents,
//! reachable or not**. This follows Mesos (its sorters drop an agent from the
//! total only when it is removed, not when it is deactivated) and keeps
//! numerator and denominator consistent: resources a framework holds on an
//! unreachable agent still count toward its share, so they must count toward
//! the total too, or shares could exceed 1 and every agent flap would reorder
//! the whole cluster.
//!
//! Cost of a round, for A agents and F frameworks: O(A · F/64) to find agents
//! that have any candidate framework (a word-wise `eligible & !blocked`),
//! plus, per allocation, O(log F) sorter updates and a pick that is either a
//! walk of the DRF order up to the first candidate or, when candidates are
//! few, a direct minimum over them (so a mostly-filtered cluster never walks
//! F frameworks per agent). Filters cost nothing per round unless an agent's
//! free resources or filters changed or a filter expired (see `filters`).

use std::collections::HashMap;
use std::time::Duration;

use corral_proto::{AgentId, FrameworkId, Resources};

use crate::bitset::BitSet;
use crate::filters::{AgentFilters, Scratch};
use crate::scalars::Scalars;
use crate::slots::Slots;
use crate::sorter::{Key, Sorter};

/// The role a framework has when none is known, as in Mesos.
pub const DEFAULT_ROLE: &str = "*";

/// Seed for [`Allocator::new`]; any constant works, it only has to be fixed so
/// rounds are reproducible.
const DEFAULT_SEED: u64 = 0x636f_7272_616c_2121;

/// When at most 1/`DIRECT_PICK_RATIO` of the frameworks could take an agent,
/// compare those candidates' keys directly instead of walking the DRF order
/// from the start (which would mostly skip filtered frameworks).
const DIRECT_PICK_RATIO: usize = 16;

/// One offer's worth: all the free resources of `agent_id` for `framework_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub framework_id: FrameworkId,
    pub agent_id: AgentId,
    pub resources: Resources,
}

#[derive(Debug, Clone)]
struct AgentState {
    total: Resources,
    free: Resources,
    active: bool,
    /// Framework slot → resources it holds here (never empty entries).
    allocations: HashMap<u32, Resources>,
    filters: AgentFilters,
}

#[derive(Debug, Clone)]
struct FrameworkState {
    role: u32,
    active: bool,
    suppressed: bool,
}

#[derive(Debug, Clone)]
struct RoleState {
    /// The role's frameworks, fairest first.
    frameworks: Sorter,
}

/// The pure allocator. All state changes are method calls; time is an
/// argument; offers are return values.
#[derive(Debug, Clone)]
pub struct Allocator {
    agents: Slots<AgentId, AgentState>,
    /// Live agent slots, shuffled in place at the start of each round.
    agent_order: Vec<u32>,
    frameworks: Slots<FrameworkId, FrameworkState>,
    /// Per framework slot, bumped on revive and removal: filters carry the
    /// epoch they were installed in and die when it moves on. Never shrinks,
    /// so a reused slot cannot inherit its previous owner's filters.
    filter_epochs: Vec<u32>,
    /// Framework slots that are active and not suppressed.
    eligible: BitSet,
    roles: Slots<String, RoleState>,
    /// Roles, fairest first by weighted share.
    role_sorter: Sorter,
    /// Role weights set so far, also for roles that have no framework yet.
    weights: HashMap<String, f64>,
    /// Sum of all registered agents' scalars.
    total: Scalars,
    /// `total` changed since the sorters were last told.
    total_changed: bool,
    rng: SplitMix64,
    scratch: Scratch,
}

impl Default for Allocator {
    fn default() -> Self {
        Self::new()
    }
}

impl Allocator {
    pub fn new() -> Self {
        Self::with_seed(DEFAULT_SEED)
    }

    /// An allocator whose agent visiting order derives from `seed`.
    pub fn with_seed(seed: u64) -> Self {
        Self {
            agents: Slots::default(),
            agent_order: Vec::new(),
            frameworks: Slots::default(),
            filter_epochs: Vec::new(),
            eligible: BitSet::new(),
            roles: Slots::default(),
            role_sorter: Sorter::new(Scalars::default()),
            weights: HashMap::new(),
            total: Scalars::default(),
            total_changed: false,
            rng: SplitMix64(seed),
            scratch: Scratch::default(),
        }
    }

    /// Registers an agent with `total` resources, `used` of which are already
    /// held by frameworks' tasks (re-registration). Frameworks in `used` that
    /// are unknown are added inactive in the default role, as Mesos does for
    /// frameworks known only from a re-registering agent; `add_framework`
    /// later sets their role and activates them. Re-adding an existing agent
    /// replaces it (its allocations and filters are dropped first).
    pub fn add_agent(
        &mut self,
        agent: AgentId,
        total: Resources,
        used: Vec<(FrameworkId, Resources)>,
    ) {
        self.remove_agent(&agent);
        self.total.add(&Scalars::of(&total));
        self.total_changed = true;
        let slot = self.agents.insert(
            agent,
            AgentState {
                free: total.clone(),
                total,
                active: true,
                allocations: HashMap::new(),
                filters: AgentFilters::default(),
            },
        );
        self.agent_order.push(slot);
        for (framework, resources) in used {
            let f = self.framework_or_implicit(framework);
            self.hold(f, slot, &resources);
        }
    }

    /// Forgets an agent; what frameworks held there stops counting.
    pub fn remove_agent(&mut self, agent: &AgentId) {
        let Some(slot) = self.agents.find(agent) else {
            return;
        };
        let Some((_, state)) = self.agents.remove(slot) else {
            return;
        };
        for (f, resources) in &state.allocations {
            self.account_unallocated(*f, &Scalars::of(resources));
        }
        self.total.sub(&Scalars::of(&state.total));
        self.total_changed = true;
        self.agent_order.retain(|&a| a != slot);
    }

    /// Inactive (unreachable) agents are never offered but keep their
    /// allocations and still count toward the total.
    pub fn set_agent_active(&mut self, agent: &AgentId, active: bool) {
        if let Some(state) = self.agents.find(agent).and_then(|a| self.agents.get_mut(a)) {
            state.active = active;
        }
    }

    /// Adds an active framework in `role` ("*" when it has none). Re-adding a
    /// known framework keeps its allocations, filters and suppression, moves
    /// it to `role` and marks it active.
    pub fn add_framework(&mut self, framework: FrameworkId, role: &str) {
        let f = match self.frameworks.find(&framework) {
            Some(f) => {
                self.move_to_role(f, role);
                f
            }
            None => self.insert_framework(framework, role),
        };
        if let Some(state) = self.frameworks.get_mut(f) {
            state.active = true;
        }
        self.update_eligible(f);
    }

    /// Drops the framework: its allocations on every agent become free and
    /// its filters die.
    pub fn remove_framework(&mut self, framework: &FrameworkId) {
        let Some(f) = self.frameworks.find(framework) else {
            return;
        };
        for agent in self.agents.values_mut() {
            if let Some(held) = agent.allocations.remove(&f) {
                agent.free.add(&held);
                agent.filters.invalidate();
            }
        }
        self.kill_filters(f);
        if let Some((_, state)) = self.frameworks.remove(f) {
            self.leave_role(f, state.role);
        }
        self.eligible.set(f, false);
    }

    /// Disconnected frameworks get no offers but keep their allocations.
    pub fn set_framework_active(&mut self, framework: &FrameworkId, active: bool) {
        if let Some(f) = self.frameworks.find(framework) {
            if let Some(state) = self.frameworks.get_mut(f) {
                state.active = active;
            }
            self.update_eligible(f);
        }
    }

    /// Sets a role's weight (default 1): its share is divided by it, so a
    /// role of weight 2 is offered as if it held half of what it does. The
    /// caller validates; a non-finite or non-positive weight is ignored.
    pub fn set_weight(&mut self, role: &str, weight: f64) {
        if !(weight.is_finite() && weight > 0.0) {
            return;
        }
        self.weights.insert(role.to_string(), weight);
        if let Some(r) = self.roles.find(role) {
            self.role_sorter.set_weight(r, weight);
        }
    }

    /// Marks `resources` on `agent` as held by `framework` (e.g. a task a
    /// re-registering agent reported). Only what is free is taken, so nothing
    /// is ever held twice. An unknown framework is added as in `add_agent`;
    /// an unknown agent makes this a no-op.
    pub fn allocate_used(
        &mut self,
        framework: &FrameworkId,
        agent: &AgentId,
        resources: &Resources,
    ) {
        let Some(a) = self.agents.find(agent) else {
            return;
        };
        let f = self.framework_or_implicit(framework.clone());
        self.hold(f, a, resources);
    }

    /// Gives resources back: a decline, the unused part of an accepted offer,
    /// an ended task, a rescinded offer. Only what the framework holds there
    /// is returned. With `refuse` > 0, installs a decline filter: `framework`
    /// is not offered `agent` while what is free there is contained in
    /// `resources`, until `now + refuse` (Mesos `refuse_seconds`). The filter
    /// is installed even if nothing was held, as Mesos does.
    pub fn recover(
        &mut self,
        framework: &FrameworkId,
        agent: &AgentId,
        resources: &Resources,
        refuse: Option<Duration>,
        now: Duration,
    ) {
        let (Some(f), Some(a)) = (self.frameworks.find(framework), self.agents.find(agent)) else {
            return;
        };
        let Some(state) = self.agents.get_mut(a) else {
            return;
        };
        let mut returned = Scalars::default();
        if let Some(held) = state.allocations.get_mut(&f) {
            let back = intersection(resources, held);
            if !back.is_empty() {
                held.saturating_sub(&back);
                if held.is_empty() {
                    state.allocations.remove(&f);
                }
                state.free.add(&back);
                state.filters.invalidate();
                returned = Scalars::of(&back);
            }
        }
        if let Some(refuse) = refuse.filter(|r| !r.is_zero()) {
            state.filters.add(
                f,
                resources,
                nanos(now.saturating_add(refuse)),
                nanos(now),
                &self.filter_epochs,
                &mut self.scratch,
            );
        }
        if returned != Scalars::default() {
            self.account_unallocated(f, &returned);
        }
    }

    /// The framework gets no offers until `revive`.
    pub fn suppress(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.frameworks.find(framework) {
            if let Some(state) = self.frameworks.get_mut(f) {
                state.suppressed = true;
            }
            self.update_eligible(f);
        }
    }

    /// Un-suppresses the framework and clears all of its filters.
    pub fn revive(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.frameworks.find(framework) {
            if let Some(state) = self.frameworks.get_mut(f) {
                state.suppressed = false;
            }
            self.kill_filters(f);
            self.update_eligible(f);
        }
    }

    /// One allocation round at `now` (time since the master's epoch; must not
    /// go backwards). Returns at most one allocation per agent.
    pub fn allocate(&mut self, now: Duration) -> Vec<Allocation> {
        if self.total_changed {
            self.role_sorter.set_total(self.total);
            for role in self.roles.values_mut() {
                role.frameworks.set_total(self.total);
            }
            self.total_changed = false;
        }
        self.rng.shuffle(&mut self.agent_order);
        let now = nanos(now);
        let mut out = Vec::new();
        for i in 0..self.agent_order.len() {
            let a = self.agent_order[i];
            let Some((agent_id, agent)) = self.agents.entry_mut(a) else {
                continue;
            };
            if !agent.active || agent.free.is_empty() {
                continue;
            }
            let blocked =
                agent
                    .filters
                    .blocked(&agent.free, now, &self.filter_epochs, &mut self.scratch);
            let Some(f) = pick(
                &self.eligible,
                blocked,
                &self.frameworks,
                &self.roles,
                &self.role_sorter,
            ) else {
                continue;
            };
            let resources = std::mem::take(&mut agent.free);
            agent.filters.invalidate();
            agent
                .allocations
                .entry(f)
                .and_modify(|held| held.add(&resources))
                .or_insert_with(|| resources.clone());
            let agent_id = agent_id.clone();
            self.account_allocated(f, &Scalars::of(&resources));
            if let Some(framework_id) = self.frameworks.key(f) {
                out.push(Allocation {
                    framework_id: framework_id.clone(),
                    agent_id,
                    resources,
                });
            }
        }
        out
    }

    /// The framework's dominant share of all registered agents (unweighted);
    /// 0 for an unknown framework.
    pub fn framework_share(&self, framework: &FrameworkId) -> f64 {
        self.frameworks
            .find(framework)
            .and_then(|f| {
                let role = self.roles.get(self.frameworks.get(f)?.role)?;
                Some(role.frameworks.allocation(f).dominant_share(&self.total))
            })
            .unwrap_or(0.0)
    }

    /// The role's dominant share (unweighted); 0 for a role with no framework.
    pub fn role_share(&self, role: &str) -> f64 {
        self.roles
            .find(role)
            .map(|r| self.role_sorter.allocation(r).dominant_share(&self.total))
            .unwrap_or(0.0)
    }

    /// Free resources on the agent, reachable or not.
    pub fn available(&self, agent: &AgentId) -> Option<Resources> {
        let a = self.agents.find(agent)?;
        self.agents.get(a).map(|s| s.free.clone())
    }

    /// What `framework` holds on `agent` (empty if nothing or unknown).
    pub fn allocated(&self, framework: &FrameworkId, agent: &AgentId) -> Resources {
        let (Some(f), Some(a)) = (self.frameworks.find(framework), self.agents.find(agent)) else {
            return Resources::default();
        };
        self.agents
            .get(a)
            .and_then(|s| s.allocations.get(&f))
            .cloned()
            .unwrap_or_default()
    }

    /// Test hook: every agent's cached blocked set agrees with its filters.
    #[cfg(test)]
    pub(crate) fn check_filter_caches(&self, now: Duration) -> Result<(), String> {
        for slot in self.agent_order.iter().copied() {
            if let (Some(id), Some(agent)) = (self.agents.key(slot), self.agents.get(slot))
                && !agent
                    .filters
                    .cache_is_coherent(&agent.free, nanos(now), &self.filter_epochs)
            {
                return Err(format!("stale blocked set on agent {id}"));
            }
        }
        Ok(())
    }

    fn insert_framework(&mut self, framework: FrameworkId, role: &str) -> u32 {
        let r = self.role_or_new(role);
        let name = framework.as_str().to_string();
        let f = self.frameworks.insert(
            framework,
            FrameworkState {
                role: r,
                active: false,
                suppressed: false,
            },
        );
        if self.filter_epochs.len() <= f as usize {
            self.filter_epochs.resize(f as usize + 1, 0);
        }
        if let Some(role) = self.roles.get_mut(r) {
            role.frameworks.add(f, &name);
        }
        self.update_eligible(f);
        f
    }

    fn framework_or_implicit(&mut self, framework: FrameworkId) -> u32 {
        match self.frameworks.find(&framework) {
            Some(f) => f,
            None => self.insert_framework(framework, DEFAULT_ROLE),
        }
    }

    fn role_or_new(&mut self, role: &str) -> u32 {
        if let Some(r) = self.roles.find(role) {
            return r;
        }
        let r = self.roles.insert(
            role.to_string(),
            RoleState {
                frameworks: Sorter::new(self.total),
            },
        );
        self.role_sorter.add(r, role);
        if let Some(&weight) = self.weights.get(role) {
            self.role_sorter.set_weight(r, weight);
        }
        r
    }

    fn move_to_role(&mut self, f: u32, role: &str) {
        let Some(old) = self.frameworks.get(f).map(|s| s.role) else {
            return;
        };
        if self.roles.key(old).map(String::as_str) == Some(role) {
            return;
        }
        let new = self.role_or_new(role);
        let allocation = self
            .roles
            .get(old)
            .map(|r| r.frameworks.allocation(f))
            .unwrap_or_default();
        self.leave_role(f, old);
        if let (Some(name), Some(state)) = (
            self.frameworks.key(f).map(|id| id.as_str().to_string()),
            self.roles.get_mut(new),
        ) {
            state.frameworks.add(f, &name);
            state.frameworks.allocated(f, &allocation);
        }
        self.role_sorter.allocated(new, &allocation);
        if let Some(state) = self.frameworks.get_mut(f) {
            state.role = new;
        }
    }

    /// Takes `f` out of role `r`'s accounting, dropping the role once empty.
    fn leave_role(&mut self, f: u32, r: u32) {
        let Some(role) = self.roles.get_mut(r) else {
            return;
        };
        if let Some(allocation) = role.frameworks.remove(f) {
            self.role_sorter.unallocated(r, &allocation);
        }
        if role.frameworks.is_empty() {
            self.roles.remove(r);
            self.role_sorter.remove(r);
        }
    }

    /// Moves what is free of `resources` on agent `a` to framework `f`.
    fn hold(&mut self, f: u32, a: u32, resources: &Resources) {
        let Some(agent) = self.agents.get_mut(a) else {
            return;
        };
        let taken = intersection(resources, &agent.free);
        if taken.is_empty() {
            return;
        }
        agent.free.saturating_sub(&taken);
        agent.filters.invalidate();
        let amount = Scalars::of(&taken);
        agent
            .allocations
            .entry(f)
            .and_modify(|held| held.add(&taken))
            .or_insert(taken);
        self.account_allocated(f, &amount);
    }

    fn account_allocated(&mut self, f: u32, amount: &Scalars) {
        let Some(r) = self.frameworks.get(f).map(|s| s.role) else {
            return;
        };
        if let Some(role) = self.roles.get_mut(r) {
            role.frameworks.allocated(f, amount);
        }
        self.role_sorter.allocated(r, amount);
    }

    fn account_unallocated(&mut self, f: u32, amount: &Scalars) {
        let Some(r) = self.frameworks.get(f).map(|s| s.role) else {
            return;
        };
        if let Some(role) = self.roles.get_mut(r) {
            role.frameworks.unallocated(f, amount);
        }
        self.role_sorter.unallocated(r, amount);
    }

    /// Kills every filter of framework slot `f`: O(agents), one bit each.
    fn kill_filters(&mut self, f: u32) {
        if let Some(epoch) = self.filter_epochs.get_mut(f as usize) {
            // Wrapping is harmless unless an agent keeps a filter through
            // exactly 2^32 revives without ever being recomputed.
            *epoch = epoch.wrapping_add(1);
        }
        for agent in self.agents.values_mut() {
            agent.filters.unblock(f);
        }
    }

    fn update_eligible(&mut self, f: u32) {
        let eligible = self
            .frameworks
            .get(f)
            .is_some_and(|s| s.active && !s.suppressed);
        self.eligible.set(f, eligible);
    }
}

/// The fairest framework that is eligible and not blocked, if any.
fn pick(
    eligible: &BitSet,
    blocked: &BitSet,
    frameworks: &Slots<FrameworkId, FrameworkState>,
    roles: &Slots<String, RoleState>,
    role_sorter: &Sorter,
) -> Option<u32> {
    let candidates = eligible.difference_len(blocked) as usize;
    if candidates == 0 {
        return None;
    }
    if candidates * DIRECT_PICK_RATIO <= frameworks.len() {
        // Few candidates: the first one the walk below would reach is the one
        // with the smallest (role key, framework key), since role keys are
        // unique and the walk visits roles, then their frameworks, in key
        // order.
        let key = |f: u32| -> Option<(&Key, &Key)> {
            let r = frameworks.get(f)?.role;
            Some((role_sorter.key(r)?, roles.get(r)?.frameworks.key(f)?))
        };
        return eligible
            .difference(blocked)
            .filter_map(|f| Some((key(f)?, f)))
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, f)| f);
    }
    role_sorter
        .iter()
        .filter_map(|r| roles.get(r))
        .flat_map(|role| role.frameworks.iter())
        .find(|&f| eligible.get(f) && !blocked.get(f))
}

/// What `a` and `b` have in common.
fn intersection(a: &Resources, b: &Resources) -> Resources {
    let mut outside = a.ports.clone();
    outside.remove(&b.ports);
    let mut ports = a.ports.clone();
    ports.remove(&outside);
    Resources {
        cpus: a.cpus.min(b.cpus),
        mem: a.mem.min(b.mem),
        disk: a.disk.min(b.disk),
        gpus: a.gpus.min(b.gpus),
        ports,
    }
}

/// Nanoseconds, saturating: a deadline 584 years out is "never".
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator, enough to
/// shuffle agents without an unseeded or external RNG.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fisher–Yates. Mesos shuffles agents each round for the same reason:
    /// a fixed order would always serve the same agents first.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            // i + 1 ≤ len fits in u64; the result is ≤ i so fits in usize.
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(text: &str) -> Resources {
        Resources::parse(text).unwrap()
    }

    fn agent(name: &str) -> AgentId {
        AgentId::parse(name, "agent").unwrap()
    }

    fn fw(name: &str) -> FrameworkId {
        FrameworkId::parse(name, "framework").unwrap()
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The frameworks offered something in one round, sorted (which agent
    /// each gets depends on the shuffle; who is served does not).
    fn served(a: &mut Allocator, now: Duration) -> Vec<String> {
        let mut out: Vec<_> = a
            .allocate(now)
            .into_iter()
            .map(|x| x.framework_id.to_string())
            .collect();
        out.sort();
        out
    }

    /// One agent `a1` with `cpus:4;mem:100;ports:[1-10]` and the given
    /// frameworks, all in role "*".
    fn one_agent(frameworks: &[&str]) -> Allocator {
        let mut a = Allocator::new();
        a.add_agent(agent("a1"), r(A1), vec![]);
        for f in frameworks {
            a.add_framework(fw(f), "*");
        }
        a
    }

    const A1: &str = "cpus:4;mem:100;ports:[1-10]";

    /// `n` identical agents `a0..` of `cpus:10;mem:100`.
    fn agents(n: usize) -> Allocator {
        let mut a = Allocator::new();
        for i in 0..n {
            a.add_agent(agent(&format!("a{i}")), r("cpus:10;mem:100"), vec![]);
        }
        a
    }

    #[test]
    fn an_agent_is_offered_whole_to_one_framework() {
        let mut a = one_agent(&["f1", "f2"]);
        let offers = a.allocate(secs(0));
        assert_eq!(
            offers,
            vec![Allocation {
                framework_id: fw("f1"),
                agent_id: agent("a1"),
                resources: r(A1),
            }]
        );
        assert_eq!(a.available(&agent("a1")), Some(Resources::default()));
        assert_eq!(a.allocated(&fw("f1"), &agent("a1")), r(A1));
        assert_eq!(a.allocated(&fw("f2"), &agent("a1")), Resources::default());
    }

    #[test]
    fn allocated_resources_stay_allocated_until_recovered() {
        let mut a = one_agent(&["f1", "f2"]);
        assert_eq!(a.allocate(secs(0)).len(), 1);
        assert!(a.allocate(secs(1)).is_empty());
        a.recover(
            &fw("f1"),
            &agent("a1"),
            &r("cpus:1;ports:[2-3]"),
            None,
            secs(1),
        );
        assert_eq!(a.available(&agent("a1")), Some(r("cpus:1;ports:[2-3]")));
        assert_eq!(
            a.allocated(&fw("f1"), &agent("a1")),
            r("cpus:3;mem:100;ports:[1-1,4-10]")
        );
        // f1 holds 3/4 of the cpus, f2 nothing: f2 is fairer.
        let offers = a.allocate(secs(2));
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].framework_id, fw("f2"));
        assert_eq!(offers[0].resources, r("cpus:1;ports:[2-3]"));
    }

    #[test]
    fn recover_returns_only_what_the_framework_holds() {
        let mut a = one_agent(&["f1", "f2"]);
        a.allocate_used(&fw("f1"), &agent("a1"), &r("cpus:1;ports:[1-2]"));
        // f2 holds nothing there; f1 holds less than it returns.
        a.recover(&fw("f2"), &agent("a1"), &r("cpus:1"), None, secs(0));
        a.recover(
            &fw("f1"),
            &agent("a1"),
            &r("cpus:4;ports:[1-5]"),
            None,
            secs(0),
        );
        assert_eq!(a.available(&agent("a1")), Some(r(A1)));
        assert_eq!(a.framework_share(&fw("f1")), 0.0);
    }

    #[test]
    fn the_framework_with_the_lowest_share_is_offered_first() {
        let mut a = agents(2);
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:1"));
        a.allocate_used(&fw("f2"), &agent("a1"), &r("mem:50"));
        for f in ["f1", "f2", "f3"] {
            a.add_framework(fw(f), "*");
        }
        assert_eq!(a.framework_share(&fw("f1")), 0.05);
        assert_eq!(a.framework_share(&fw("f2")), 0.25);
        // f3 (share 0) takes the first agent visited and then holds about
        // half the cluster; f1 (0.05) is fairer than f2 (0.25) for the second.
        assert_eq!(served(&mut a, secs(0)), vec!["f1", "f3"]);
    }

    #[test]
    fn an_allocation_counts_toward_the_share_within_the_round() {
        let mut a = agents(4);
        for f in ["f1", "f2"] {
            a.add_framework(fw(f), "*");
        }
        assert_eq!(served(&mut a, secs(0)), vec!["f1", "f1", "f2", "f2"]);
        assert_eq!(a.framework_share(&fw("f1")), 0.5);
        assert_eq!(a.framework_share(&fw("f2")), 0.5);
    }

    #[test]
    fn ties_are_broken_by_framework_id() {
        let mut a = one_agent(&["zz", "aa", "mm"]);
        assert_eq!(served(&mut a, secs(0)), vec!["aa"]);
    }

    #[test]
    fn decline_filter_blocks_the_agent_until_it_expires() {
        let mut a = one_agent(&["f1"]);
        assert_eq!(served(&mut a, secs(0)), vec!["f1"]);
        a.recover(&fw("f1"), &agent("a1"), &r(A1), Some(secs(5)), secs(0));
        assert!(a.allocate(secs(1)).is_empty());
        assert!(a.allocate(secs(4)).is_empty());
        // Mesos: the filter lasts until now + refuse_seconds.
        assert_eq!(served(&mut a, secs(5)), vec!["f1"]);
    }

    #[test]
    fn decline_filter_passes_the_agent_to_the_next_framework() {
        let mut a = one_agent(&["f1", "f2"]);
        assert_eq!(served(&mut a, secs(0)), vec!["f1"]);
        a.recover(&fw("f1"), &agent("a1"), &r(A1), Some(secs(5)), secs(0));
        assert_eq!(served(&mut a, secs(1)), vec!["f2"]);
    }

    #[test]
    fn decline_filter_stops_blocking_when_more_becomes_free() {
        let mut a = one_agent(&["f1", "f2"]);
        a.allocate_used(&fw("f2"), &agent("a1"), &r("cpus:2"));
        a.suppress(&fw("f2"));
        assert_eq!(served(&mut a, secs(0)), vec!["f1"]);
        a.recover(
            &fw("f1"),
            &agent("a1"),
            &r("cpus:2;mem:100;ports:[1-10]"),
            Some(secs(60)),
            secs(0),
        );
        assert!(a.allocate(secs(1)).is_empty());
        // A task of f2 ends: what is free (cpus:4…) is no longer contained in
        // what f1 declined (cpus:2…), so f1 sees the agent again.
        a.recover(&fw("f2"), &agent("a1"), &r("cpus:2"), None, secs(2));
        assert_eq!(served(&mut a, secs(2)), vec!["f1"]);
    }

    #[test]
    fn decline_filter_starts_blocking_when_less_becomes_free() {
        let mut a = one_agent(&["f1", "f2"]);
        a.recover(
            &fw("f1"),
            &agent("a1"),
            &r("cpus:2"),
            Some(secs(60)),
            secs(0),
        );
        a.set_framework_active(&fw("f1"), false);
        a.suppress(&fw("f2"));
        // Nobody eligible; the agent's blocked set is computed (f1 is not
        // blocked: cpus:4… is not contained in cpus:2).
        assert!(a.allocate(secs(1)).is_empty());
        a.allocate_used(&fw("f2"), &agent("a1"), &r("cpus:2;mem:100;ports:[1-10]"));
        a.set_framework_active(&fw("f1"), true);
        // Now only cpus:2 is free, which f1 declined.
        assert!(a.allocate(secs(2)).is_empty());
    }

    #[test]
    fn removing_a_framework_can_unblock_others_on_its_agents() {
        let mut a = one_agent(&["f1", "f2"]);
        a.allocate_used(&fw("f2"), &agent("a1"), &r("cpus:2"));
        a.recover(
            &fw("f1"),
            &agent("a1"),
            &r("cpus:2;mem:100;ports:[1-10]"),
            Some(secs(60)),
            secs(0),
        );
        a.suppress(&fw("f2"));
        assert!(a.allocate(secs(1)).is_empty());
        a.remove_framework(&fw("f2"));
        assert_eq!(served(&mut a, secs(2)), vec!["f1"]);
    }

    #[test]
    fn zero_refuse_installs_no_filter() {
        let mut a = one_agent(&["f1"]);
        a.allocate(secs(0));
        a.recover(
            &fw("f1"),
            &agent("a1"),
            &r(A1),
            Some(Duration::ZERO),
            secs(0),
        );
        assert_eq!(served(&mut a, secs(0)), vec!["f1"]);
    }

    #[test]
    fn revive_clears_all_filters_of_the_framework() {
        let mut a = agents(2);
        a.add_framework(fw("f1"), "*");
        a.add_framework(fw("f2"), "*");
        a.allocate(secs(0));
        for (f, ag) in [("f1", "a0"), ("f1", "a1"), ("f2", "a0"), ("f2", "a1")] {
            a.recover(
                &fw(f),
                &agent(ag),
                &r("cpus:10;mem:100"),
                Some(secs(3600)),
                secs(0),
            );
        }
        assert!(a.allocate(secs(1)).is_empty());
        a.revive(&fw("f2"));
        assert_eq!(served(&mut a, secs(1)), vec!["f2", "f2"]);
    }

    #[test]
    fn suppress_stops_offers_until_revive() {
        let mut a = one_agent(&["f1"]);
        a.suppress(&fw("f1"));
        assert!(a.allocate(secs(0)).is_empty());
        a.revive(&fw("f1"));
        assert_eq!(served(&mut a, secs(0)), vec!["f1"]);
    }

    #[test]
    fn a_suppressed_framework_is_skipped_for_the_next_fairest() {
        let mut a = one_agent(&["f1", "f2"]);
        a.suppress(&fw("f1"));
        assert_eq!(served(&mut a, secs(0)), vec!["f2"]);
    }

    #[test]
    fn an_inactive_agent_is_not_offered_but_keeps_its_accounting() {
        let mut a = agents(2);
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:5"));
        a.add_framework(fw("f1"), "*");
        a.set_agent_active(&agent("a0"), false);
        let offers = a.allocate(secs(0));
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].agent_id, agent("a1"));
        assert_eq!(a.allocated(&fw("f1"), &agent("a0")), r("cpus:5"));
        assert_eq!(a.available(&agent("a0")), Some(r("cpus:5;mem:100")));
        a.set_agent_active(&agent("a0"), true);
        let offers = a.allocate(secs(1));
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].agent_id, agent("a0"));
    }

    #[test]
    fn shares_are_measured_against_all_registered_agents() {
        let mut a = agents(2);
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:5"));
        a.set_agent_active(&agent("a1"), false);
        assert_eq!(a.framework_share(&fw("f1")), 0.25);
        a.remove_agent(&agent("a1"));
        assert_eq!(a.framework_share(&fw("f1")), 0.5);
    }

    #[test]
    fn an_inactive_framework_gets_no_offers_but_keeps_its_allocations() {
        let mut a = agents(2);
        a.add_framework(fw("f1"), "*");
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:10;mem:100"));
        a.set_framework_active(&fw("f1"), false);
        assert!(a.allocate(secs(0)).is_empty());
        assert_eq!(a.allocated(&fw("f1"), &agent("a0")), r("cpus:10;mem:100"));
        assert_eq!(a.framework_share(&fw("f1")), 0.5);
        a.set_framework_active(&fw("f1"), true);
        assert_eq!(served(&mut a, secs(1)), vec!["f1"]);
    }

    #[test]
    fn roles_are_ordered_before_their_frameworks() {
        let mut a = agents(4);
        // Role r1: f1 holds a quarter of the cluster, f2 nothing.
        // Role r2: f3 holds an eighth. r2 is fairer than r1, so f3 is offered
        // before f2 even though f2's own share is lower.
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:10"));
        a.allocate_used(&fw("f3"), &agent("a1"), &r("cpus:5"));
        a.add_framework(fw("f1"), "r1");
        a.add_framework(fw("f2"), "r1");
        a.add_framework(fw("f3"), "r2");
        a.set_framework_active(&fw("f1"), false);
        let first = a.allocate(secs(0));
        // The first allocation goes to f3 whichever agent comes first.
        assert_eq!(first[0].framework_id, fw("f3"));
        assert_eq!(a.role_share("r2"), a.framework_share(&fw("f3")));
    }

    #[test]
    fn a_higher_weight_changes_the_order_of_roles() {
        let mut a = agents(2);
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:6"));
        a.allocate_used(&fw("f2"), &agent("a1"), &r("cpus:4"));
        a.add_framework(fw("f1"), "heavy");
        a.add_framework(fw("f2"), "light");
        // Unweighted: light (0.2) before heavy (0.3).
        let offers = a.clone().allocate(secs(0));
        assert_eq!(offers[0].framework_id, fw("f2"));
        // heavy weight 2: 0.3 / 2 = 0.15 < 0.2.
        a.set_weight("heavy", 2.0);
        let offers = a.allocate(secs(0));
        assert_eq!(offers[0].framework_id, fw("f1"));
    }

    #[test]
    fn a_weight_set_before_the_role_exists_applies_to_it() {
        let mut a = agents(2);
        a.set_weight("heavy", 2.0);
        a.set_weight("heavy", f64::NAN); // ignored
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:6"));
        a.allocate_used(&fw("f2"), &agent("a1"), &r("cpus:4"));
        a.add_framework(fw("f1"), "heavy");
        a.add_framework(fw("f2"), "light");
        assert_eq!(a.allocate(secs(0))[0].framework_id, fw("f1"));
    }

    #[test]
    fn remove_framework_frees_its_allocations_and_filters() {
        let mut a = agents(2);
        a.add_framework(fw("f1"), "*");
        a.allocate(secs(0));
        a.recover(
            &fw("f1"),
            &agent("a0"),
            &r("cpus:10;mem:100"),
            Some(secs(3600)),
            secs(0),
        );
        assert!(a.allocate(secs(1)).is_empty());
        a.remove_framework(&fw("f1"));
        assert_eq!(a.available(&agent("a0")), Some(r("cpus:10;mem:100")));
        assert_eq!(a.available(&agent("a1")), Some(r("cpus:10;mem:100")));
        assert_eq!(a.framework_share(&fw("f1")), 0.0);
        assert_eq!(a.role_share("*"), 0.0);
        // A new framework reusing the slot inherits no filter; the old id
        // coming back is a new framework too.
        a.add_framework(fw("f1"), "*");
        assert_eq!(served(&mut a, secs(1)), vec!["f1", "f1"]);
    }

    #[test]
    fn remove_agent_drops_what_frameworks_held_there() {
        let mut a = agents(2);
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:10"));
        a.remove_agent(&agent("a0"));
        assert_eq!(a.framework_share(&fw("f1")), 0.0);
        assert_eq!(a.available(&agent("a0")), None);
        a.remove_agent(&agent("a0")); // unknown: no-op
    }

    #[test]
    fn re_adding_an_agent_replaces_it() {
        let mut a = agents(1);
        a.add_framework(fw("f1"), "*");
        a.allocate(secs(0));
        a.recover(
            &fw("f1"),
            &agent("a0"),
            &r("cpus:10;mem:100"),
            Some(secs(3600)),
            secs(0),
        );
        a.add_agent(
            agent("a0"),
            r("cpus:8;mem:50"),
            vec![(fw("f1"), r("cpus:2"))],
        );
        assert_eq!(a.allocated(&fw("f1"), &agent("a0")), r("cpus:2"));
        assert_eq!(a.available(&agent("a0")), Some(r("cpus:6;mem:50")));
        assert_eq!(a.framework_share(&fw("f1")), 0.25);
        // The old agent's filter is gone with it.
        assert_eq!(served(&mut a, secs(1)), vec!["f1"]);
    }

    #[test]
    fn re_adding_a_framework_keeps_its_allocations_and_may_change_role() {
        let mut a = agents(2);
        a.add_framework(fw("f1"), "r1");
        a.allocate_used(&fw("f1"), &agent("a0"), &r("cpus:5"));
        a.set_framework_active(&fw("f1"), false);
        a.add_framework(fw("f1"), "r2");
        assert_eq!(a.allocated(&fw("f1"), &agent("a0")), r("cpus:5"));
        assert_eq!(a.role_share("r1"), 0.0);
        assert_eq!(a.role_share("r2"), 0.25);
        // Re-adding activates it.
        assert_eq!(served(&mut a, secs(0)), vec!["f1", "f1"]);
    }

    #[test]
    fn resources_of_an_unknown_framework_are_held_for_it() {
        let mut a = agents(1);
        a.add_agent(
            agent("a0"),
            r("cpus:10;mem:100"),
            vec![(fw("ghost"), r("cpus:4"))],
        );
        a.add_framework(fw("f1"), "*");
        // The ghost is inactive: never offered, but its cpus are not free.
        let offers = a.allocate(secs(0));
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].framework_id, fw("f1"));
        assert_eq!(offers[0].resources, r("cpus:6;mem:100"));
        assert_eq!(a.allocated(&fw("ghost"), &agent("a0")), r("cpus:4"));
        // It re-subscribes later and keeps them.
        a.add_framework(fw("ghost"), "*");
        assert_eq!(a.framework_share(&fw("ghost")), 0.4);
    }

    #[test]
    fn allocate_used_takes_only_what_is_free() {
        let mut a = one_agent(&["f1", "f2"]);
        a.allocate_used(&fw("f1"), &agent("a1"), &r("cpus:3;ports:[1-5]"));
        a.allocate_used(&fw("f2"), &agent("a1"), &r("cpus:3;mem:10;ports:[4-8]"));
        assert_eq!(
            a.allocated(&fw("f2"), &agent("a1")),
            r("cpus:1;mem:10;ports:[6-8]")
        );
        assert_eq!(a.available(&agent("a1")), Some(r("mem:90;ports:[9-10]")));
        a.allocate_used(&fw("f1"), &agent("nope"), &r("cpus:1"));
        assert_eq!(a.allocated(&fw("f1"), &agent("nope")), Resources::default());
    }

    #[test]
    fn agent_order_rotates_between_rounds() {
        let mut a = agents(8);
        a.add_framework(fw("f1"), "*");
        let mut firsts = std::collections::BTreeSet::new();
        for round in 0..20 {
            let offers = a.allocate(secs(round));
            firsts.insert(offers[0].agent_id.clone());
            for o in offers {
                a.recover(
                    &o.framework_id,
                    &o.agent_id,
                    &o.resources,
                    None,
                    secs(round),
                );
            }
        }
        assert!(firsts.len() > 1, "always the same agent first: {firsts:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_rounds() {
        let run = || {
            let mut a = Allocator::with_seed(7);
            for i in 0..16 {
                a.add_agent(agent(&format!("a{i}")), r("cpus:1"), vec![]);
            }
            for f in ["f1", "f2", "f3"] {
                a.add_framework(fw(f), "*");
            }
            a.allocate(secs(0))
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn a_few_unfiltered_frameworks_are_found_among_many_filtered() {
        // Exercises the direct pick: 40 frameworks, all but two filtered.
        let mut a = agents(1);
        for i in 0..40 {
            a.add_framework(fw(&format!("f{i:02}")), "*");
        }
        for i in 0..40 {
            if i != 17 && i != 33 {
                let f = fw(&format!("f{i:02}"));
                a.recover(
                    &f,
                    &agent("a0"),
                    &r("cpus:10;mem:100"),
                    Some(secs(60)),
                    secs(0),
                );
            }
        }
        a.allocate_used(&fw("f17"), &agent("a0"), &r("cpus:1"));
        a.recover(&fw("f17"), &agent("a0"), &r("cpus:1"), None, secs(0));
        a.allocate_used(&fw("f33"), &agent("a0"), &r("cpus:1"));
        // f33 now holds cpus:1; f17 nothing: f17 is fairer.
        assert_eq!(served(&mut a, secs(1)), vec!["f17"]);
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let mut a = one_agent(&["f1"]);
        a.set_agent_active(&agent("x"), false);
        a.set_framework_active(&fw("x"), false);
        a.remove_framework(&fw("x"));
        a.suppress(&fw("x"));
        a.revive(&fw("x"));
        a.recover(&fw("x"), &agent("a1"), &r("cpus:1"), Some(secs(1)), secs(0));
        a.recover(&fw("f1"), &agent("x"), &r("cpus:1"), Some(secs(1)), secs(0));
        assert_eq!(a.framework_share(&fw("x")), 0.0);
        assert_eq!(a.available(&agent("x")), None);
        assert_eq!(served(&mut a, secs(0)), vec!["f1"]);
    }
}
