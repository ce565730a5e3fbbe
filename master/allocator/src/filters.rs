//! Decline filters, stored per agent.
//!
//! Mesos semantics (`RefusedOfferFilter` in `hierarchical.cpp`): when a
//! framework declines resources on an agent with `refuse_seconds > 0`, it is
//! not offered that agent again while what is available there is *contained
//! in* what it declined, until the filter expires. A framework may hold
//! several filters for one agent; any live one that matches blocks it.
//!
//! The allocator asks "which frameworks are blocked on this agent right now?"
//! for every agent on every round. With 2,000 frameworks that have all
//! declined 2,000 agents (the Mesos `DeclineOffers` benchmark) asking every
//! filter would be millions of checks per round, so the answer is built from
//! caches, each invalidated only by what can change it:
//!
//! - Filters are grouped by the declined resources (usually every framework
//!   declined the same full offer), and each group keeps a bit set of the
//!   frameworks it blocks and the earliest expiry among them (`mask`,
//!   `mask_until`). Installing a filter updates these in O(1); only time
//!   passing `mask_until` makes the group walk its members again.
//! - The agent keeps the union of the masks of the groups whose declined
//!   resources contain its free resources (`blocked`), rebuilt with one
//!   `contains` and one word-wise OR per group when its free resources or its
//!   filters change, or when the earliest of those groups expires.
//!
//! Removing a framework's filters (revive, framework removal) must not cost a
//! pass over every filter either: it bumps the framework's epoch, which makes
//! its older filters dead, and clears its bit in each mask. Dead, expired and
//! duplicate filters are dropped lazily, when a group is next walked, and by
//! a compaction when an agent accumulates far more filters than frameworks.

use std::collections::HashMap;

use corral_proto::Resources;

use crate::bitset::BitSet;

/// An agent may hold this many filters beyond twice the framework count
/// before they are compacted on insertion, so memory stays bounded when a
/// framework keeps declining an agent whose groups never expire.
const COMPACT_SLACK: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Member {
    framework: u32,
    /// The framework slot's filter epoch when the filter was installed; the
    /// filter is dead once the slot's epoch has moved on.
    epoch: u32,
    /// Nanoseconds since the master's epoch; live while `now < expires`.
    expires: u64,
}

#[derive(Debug, Clone)]
struct Group {
    declined: Resources,
    members: Vec<Member>,
    /// Frameworks with a live member (may still include ones whose member
    /// expired at or after `mask_until`; the group is walked again then).
    mask: BitSet,
    /// Earliest expiry among the members in `mask`.
    mask_until: u64,
}

impl Group {
    /// Drops dead, expired and duplicate members and rebuilds the mask.
    fn rebuild(&mut self, now: u64, epochs: &[u32], scratch: &mut Scratch) {
        let stamp = scratch.next_stamp(epochs.len());
        self.mask.clear();
        self.mask_until = u64::MAX;
        let members = &mut self.members;
        let mut kept = 0;
        for i in 0..members.len() {
            let m = members[i];
            let live = m.expires > now && epochs.get(m.framework as usize) == Some(&m.epoch);
            if !live {
                continue;
            }
            let seen = &mut scratch.seen[m.framework as usize];
            if seen.0 == stamp {
                // Same framework, same declined resources: the later expiry
                // is the one that decides.
                let first = &mut members[seen.1 as usize];
                first.expires = first.expires.max(m.expires);
                continue;
            }
            // `kept` ≤ `i` < len of a Vec; groups hold < u32::MAX members
            // because compaction keeps them near the framework count.
            *seen = (stamp, kept as u32);
            members[kept] = m;
            kept += 1;
        }
        members.truncate(kept);
        for m in members.iter() {
            self.mask.set(m.framework, true);
            self.mask_until = self.mask_until.min(m.expires);
        }
    }
}

/// Reusable scratch space for deduplication, owned by the allocator so that
/// each agent does not carry a framework-sized buffer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scratch {
    /// Per framework slot: (stamp, index of its member in the current group).
    seen: Vec<(u32, u32)>,
    stamp: u32,
}

impl Scratch {
    fn next_stamp(&mut self, frameworks: usize) -> u32 {
        if self.seen.len() < frameworks {
            self.seen.resize(frameworks, (0, 0));
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // Wrapped: old stamps could collide with new ones.
            self.seen.iter_mut().for_each(|s| *s = (0, 0));
            self.stamp = 1;
        }
        self.stamp
    }
}

#[derive(Debug, Clone)]
pub(crate) struct AgentFilters {
    groups: Vec<Group>,
    /// Declined resources → index in `groups`.
    index: HashMap<Resources, u32>,
    /// Members over all groups, dead ones included until dropped.
    len: usize,
    /// Compact when `len` exceeds this (and the framework-based floor).
    compact_at: usize,
    blocked: BitSet,
    /// Earliest `mask_until` among the groups that went into `blocked`.
    recheck_at: u64,
    /// The agent's free resources or its filters changed since `blocked` was
    /// computed.
    stale: bool,
}

impl Default for AgentFilters {
    fn default() -> Self {
        Self {
            groups: Vec::new(),
            index: HashMap::new(),
            len: 0,
            compact_at: 0,
            blocked: BitSet::new(),
            recheck_at: u64::MAX,
            stale: false,
        }
    }
}

impl AgentFilters {
    /// Installs a filter: `framework` declined `declined` until `expires`.
    /// O(1) amortized: compaction runs only after the filter count doubled.
    pub(crate) fn add(
        &mut self,
        framework: u32,
        declined: &Resources,
        expires: u64,
        now: u64,
        epochs: &[u32],
        scratch: &mut Scratch,
    ) {
        let Some(&epoch) = epochs.get(framework as usize) else {
            return;
        };
        let member = Member {
            framework,
            epoch,
            expires,
        };
        let group = match self.index.get(declined) {
            Some(&i) => &mut self.groups[i as usize],
            None => {
                // One group per distinct declined set; compaction drops empty
                // ones, so there are far fewer than u32::MAX.
                self.index
                    .insert(declined.clone(), self.groups.len() as u32);
                self.groups.push(Group {
                    declined: declined.clone(),
                    members: Vec::new(),
                    mask: BitSet::new(),
                    mask_until: u64::MAX,
                });
                let last = self.groups.len() - 1;
                &mut self.groups[last]
            }
        };
        group.members.push(member);
        // An already expired filter also lowers `mask_until` to ≤ now, so the
        // group is walked (and the filter dropped) on the next check.
        group.mask.set(framework, true);
        group.mask_until = group.mask_until.min(expires);
        self.len += 1;
        self.stale = true;
        if self.len > self.compact_at.max(2 * epochs.len() + COMPACT_SLACK) {
            self.compact(now, epochs, scratch);
        }
    }

    /// The agent's free resources changed.
    pub(crate) fn invalidate(&mut self) {
        self.stale = true;
    }

    /// `framework`'s filters just died (its epoch was bumped): O(groups).
    pub(crate) fn unblock(&mut self, framework: u32) {
        self.blocked.set(framework, false);
        for group in &mut self.groups {
            group.mask.set(framework, false);
        }
    }

    /// Stored filters, including dead ones not yet dropped.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The frameworks blocked on this agent at `now` given its `free`
    /// resources. O(1) while nothing changed; otherwise one `contains` and one
    /// OR per group, plus a walk of any group whose earliest filter expired.
    pub(crate) fn blocked(
        &mut self,
        free: &Resources,
        now: u64,
        epochs: &[u32],
        scratch: &mut Scratch,
    ) -> &BitSet {
        if self.stale || now >= self.recheck_at {
            self.recompute(free, now, epochs, scratch);
        }
        &self.blocked
    }

    /// Test hook: if the cached blocked set is considered valid at `now`, it
    /// must equal one computed from scratch (every group walked).
    #[cfg(test)]
    pub(crate) fn cache_is_coherent(&self, free: &Resources, now: u64, epochs: &[u32]) -> bool {
        if self.stale || now >= self.recheck_at {
            return true;
        }
        let mut fresh = self.clone();
        let mut scratch = Scratch::default();
        fresh.compact(now, epochs, &mut scratch);
        fresh.recompute(free, now, epochs, &mut scratch);
        fresh.blocked.difference_len(&self.blocked) == 0
            && self.blocked.difference_len(&fresh.blocked) == 0
    }

    fn recompute(&mut self, free: &Resources, now: u64, epochs: &[u32], scratch: &mut Scratch) {
        self.blocked.clear();
        self.recheck_at = u64::MAX;
        let mut emptied = false;
        for group in &mut self.groups {
            if now >= group.mask_until {
                self.len -= group.members.len();
                group.rebuild(now, epochs, scratch);
                self.len += group.members.len();
                emptied |= group.members.is_empty();
            }
            if !group.members.is_empty() && group.declined.contains(free) {
                self.blocked.union_with(&group.mask);
                self.recheck_at = self.recheck_at.min(group.mask_until);
            }
        }
        if emptied {
            self.drop_empty_groups();
        }
        self.stale = false;
    }

    /// Walks every group: drops dead, expired and duplicate filters.
    fn compact(&mut self, now: u64, epochs: &[u32], scratch: &mut Scratch) {
        self.len = 0;
        for group in &mut self.groups {
            group.rebuild(now, epochs, scratch);
            self.len += group.members.len();
        }
        self.drop_empty_groups();
        // Next compaction only after the count doubles: amortized O(1) per
        // insertion even when many distinct filters are all live.
        self.compact_at = 2 * self.len;
        self.stale = true;
    }

    fn drop_empty_groups(&mut self) {
        self.groups.retain(|g| !g.members.is_empty());
        self.index = self
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.declined.clone(), i as u32))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(text: &str) -> Resources {
        Resources::parse(text).unwrap()
    }

    fn blocked(f: &mut AgentFilters, free: &str, now: u64, epochs: &[u32]) -> Vec<u32> {
        let mut scratch = Scratch::default();
        let set = f.blocked(&r(free), now, epochs, &mut scratch);
        (0..epochs.len() as u32).filter(|&i| set.get(i)).collect()
    }

    fn add(f: &mut AgentFilters, framework: u32, declined: &str, expires: u64, epochs: &[u32]) {
        f.add(
            framework,
            &r(declined),
            expires,
            0,
            epochs,
            &mut Scratch::default(),
        );
    }

    #[test]
    fn filter_blocks_only_while_free_is_contained_in_declined() {
        let mut f = AgentFilters::default();
        add(&mut f, 0, "cpus:4;mem:100;ports:[1-10]", 100, &[0]);
        assert_eq!(
            blocked(&mut f, "cpus:4;mem:100;ports:[1-10]", 0, &[0]),
            vec![0]
        );
        f.invalidate();
        assert_eq!(blocked(&mut f, "cpus:2;ports:[3-4]", 0, &[0]), vec![0]);
        f.invalidate();
        assert!(blocked(&mut f, "cpus:5", 0, &[0]).is_empty());
        f.invalidate();
        assert!(blocked(&mut f, "cpus:1;ports:[11-11]", 0, &[0]).is_empty());
    }

    #[test]
    fn filter_expires_at_its_deadline_and_is_dropped() {
        let mut f = AgentFilters::default();
        add(&mut f, 0, "cpus:4", 100, &[0]);
        assert_eq!(blocked(&mut f, "cpus:4", 99, &[0]), vec![0]);
        assert!(blocked(&mut f, "cpus:4", 100, &[0]).is_empty());
        assert_eq!(f.len(), 0);
    }

    #[test]
    fn a_bumped_epoch_kills_older_filters() {
        let mut f = AgentFilters::default();
        add(&mut f, 0, "cpus:4", 100, &[0, 0]);
        add(&mut f, 1, "cpus:4", 100, &[0, 0]);
        assert_eq!(blocked(&mut f, "cpus:4", 0, &[0, 0]), vec![0, 1]);
        f.unblock(0);
        assert_eq!(blocked(&mut f, "cpus:4", 0, &[1, 0]), vec![1]);
        // Neither a recompute nor the group's next walk resurrects it.
        f.invalidate();
        assert_eq!(blocked(&mut f, "cpus:4", 0, &[1, 0]), vec![1]);
        f.compact(0, &[1, 0], &mut Scratch::default());
        assert_eq!(blocked(&mut f, "cpus:4", 0, &[1, 0]), vec![1]);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn any_live_filter_of_a_framework_blocks_it() {
        let mut f = AgentFilters::default();
        add(&mut f, 0, "cpus:1", 50, &[0]);
        add(&mut f, 0, "cpus:8", 10, &[0]);
        assert_eq!(blocked(&mut f, "cpus:1", 0, &[0]), vec![0]);
        // The wider filter expires first; the narrow one still covers cpus:1.
        assert_eq!(blocked(&mut f, "cpus:1", 10, &[0]), vec![0]);
        assert!(blocked(&mut f, "cpus:1", 50, &[0]).is_empty());
    }

    #[test]
    fn duplicate_filters_merge_keeping_the_later_expiry() {
        let mut f = AgentFilters::default();
        for expires in [30, 90, 60] {
            add(&mut f, 0, "cpus:4", expires, &[0]);
        }
        assert_eq!(f.len(), 3);
        assert_eq!(blocked(&mut f, "cpus:4", 0, &[0]), vec![0]);
        // The group is walked when its earliest member expires.
        assert_eq!(blocked(&mut f, "cpus:4", 30, &[0]), vec![0]);
        assert_eq!(f.len(), 1);
        assert_eq!(blocked(&mut f, "cpus:4", 89, &[0]), vec![0]);
        assert!(blocked(&mut f, "cpus:4", 90, &[0]).is_empty());
    }

    #[test]
    fn repeated_declines_are_compacted() {
        let mut f = AgentFilters::default();
        let epochs = [0; 2];
        for i in 0..1000 {
            add(&mut f, i % 2, "cpus:4", 1_000 + u64::from(i), &epochs);
        }
        assert!(f.len() <= 2 * epochs.len() + COMPACT_SLACK, "{}", f.len());
        assert_eq!(blocked(&mut f, "cpus:4", 1_997, &epochs), vec![0, 1]);
        assert_eq!(blocked(&mut f, "cpus:4", 1_999, &epochs), Vec::<u32>::new());
    }

    #[test]
    fn an_already_expired_filter_never_blocks() {
        let mut f = AgentFilters::default();
        f.add(0, &r("cpus:4"), 5, 10, &[0], &mut Scratch::default());
        assert!(blocked(&mut f, "cpus:4", 10, &[0]).is_empty());
    }
}
