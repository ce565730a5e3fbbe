//! The fairness order: Dominant Resource Fairness over a set of clients.
//!
//! This is Corral's counterpart of Mesos `src/master/allocator/sorter/drf/`:
//! each client (a role, or a framework inside a role) has an allocation; its
//! *dominant share* is the largest fraction of the cluster total it holds over
//! any scalar, divided by the client's weight. Clients are kept ordered by
//! that weighted share, lowest first, ties broken by name (as Mesos does) and
//! then by id, so the order is a pure function of the state.
//!
//! The order lives in a `BTreeSet`, so an allocation moves one client in
//! O(log n) instead of re-sorting everyone; only a change of the cluster total
//! (which changes every share) costs a full O(n log n) rebuild.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::scalars::Scalars;

/// A client's position in the order. Comparing two keys is comparing two
/// clients' fairness, which the allocator also does directly when only a few
/// clients are candidates (see `pick` in `allocator`).
#[derive(Debug, Clone)]
pub(crate) struct Key {
    /// Dominant share divided by weight.
    share: f64,
    name: Arc<str>,
    id: u32,
}

impl Key {
    pub(crate) fn id(&self) -> u32 {
        self.id
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        // Shares are finite and non-negative (weights are validated > 0), so
        // `total_cmp` agrees with `<`; it just also makes `Ord` total.
        self.share
            .total_cmp(&other.share)
            .then_with(|| self.name.cmp(&other.name))
            .then_with(|| self.id.cmp(&other.id))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Key {}

#[derive(Debug, Clone)]
struct Client {
    allocation: Scalars,
    weight: f64,
    /// Always equal to the client's entry in `Sorter::order`.
    key: Key,
}

/// DRF order over clients identified by the caller's dense ids.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sorter {
    clients: HashMap<u32, Client>,
    order: BTreeSet<Key>,
    total: Scalars,
}

impl Sorter {
    pub(crate) fn new(total: Scalars) -> Self {
        Self {
            total,
            ..Self::default()
        }
    }

    /// Adds a client with nothing allocated and weight 1. Adding an existing
    /// id changes nothing and returns false.
    pub(crate) fn add(&mut self, id: u32, name: &str) -> bool {
        if self.clients.contains_key(&id) {
            return false;
        }
        let key = Key {
            share: 0.0,
            name: Arc::from(name),
            id,
        };
        self.order.insert(key.clone());
        self.clients.insert(
            id,
            Client {
                allocation: Scalars::default(),
                weight: 1.0,
                key,
            },
        );
        true
    }

    /// Removes a client and returns what it had allocated.
    pub(crate) fn remove(&mut self, id: u32) -> Option<Scalars> {
        let client = self.clients.remove(&id)?;
        self.order.remove(&client.key);
        Some(client.allocation)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Sets a client's weight; its share is divided by it. The caller
    /// guarantees `weight` is finite and > 0.
    pub(crate) fn set_weight(&mut self, id: u32, weight: f64) {
        let total = self.total;
        if let Some(client) = self.clients.get_mut(&id) {
            client.weight = weight;
            reposition(&mut self.order, client, &total);
        }
    }

    /// Records that `id` was given `amount` more.
    pub(crate) fn allocated(&mut self, id: u32, amount: &Scalars) {
        let total = self.total;
        if let Some(client) = self.clients.get_mut(&id) {
            client.allocation.add(amount);
            reposition(&mut self.order, client, &total);
        }
    }

    /// Records that `id` gave `amount` back.
    pub(crate) fn unallocated(&mut self, id: u32, amount: &Scalars) {
        let total = self.total;
        if let Some(client) = self.clients.get_mut(&id) {
            client.allocation.sub(amount);
            reposition(&mut self.order, client, &total);
        }
    }

    /// Changes the total shares are measured against. Every share changes, so
    /// this rebuilds the whole order: O(n log n).
    pub(crate) fn set_total(&mut self, total: Scalars) {
        if total == self.total {
            return;
        }
        self.total = total;
        self.order.clear();
        for client in self.clients.values_mut() {
            client.key.share = weighted_share(client, &total);
            self.order.insert(client.key.clone());
        }
    }

    pub(crate) fn allocation(&self, id: u32) -> Scalars {
        self.clients
            .get(&id)
            .map(|c| c.allocation)
            .unwrap_or_default()
    }

    /// The client's position in the order, for comparing two clients without
    /// walking the order.
    pub(crate) fn key(&self, id: u32) -> Option<&Key> {
        self.clients.get(&id).map(|c| &c.key)
    }

    /// Client ids, fairest first (lowest weighted dominant share).
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.order.iter().map(Key::id)
    }
}

fn weighted_share(client: &Client, total: &Scalars) -> f64 {
    client.allocation.dominant_share(total) / client.weight
}

fn reposition(order: &mut BTreeSet<Key>, client: &mut Client, total: &Scalars) {
    let share = weighted_share(client, total);
    if share.total_cmp(&client.key.share) == Ordering::Equal {
        return;
    }
    order.remove(&client.key);
    client.key.share = share;
    order.insert(client.key.clone());
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::Resources;
    use proptest::prelude::*;

    fn s(text: &str) -> Scalars {
        Scalars::of(&Resources::parse(text).unwrap())
    }

    fn order(sorter: &Sorter) -> Vec<u32> {
        sorter.iter().collect()
    }

    #[test]
    fn lowest_dominant_share_comes_first() {
        let mut sorter = Sorter::new(s("cpus:100;mem:1000"));
        sorter.add(0, "a");
        sorter.add(1, "b");
        sorter.add(2, "c");
        // a: max(10/100, 0) = 0.1; b: max(0, 200/1000) = 0.2; c: 0.
        sorter.allocated(0, &s("cpus:10"));
        sorter.allocated(1, &s("mem:200"));
        assert_eq!(order(&sorter), vec![2, 0, 1]);
        sorter.unallocated(1, &s("mem:200"));
        assert_eq!(order(&sorter), vec![1, 2, 0]);
    }

    #[test]
    fn ties_are_broken_by_name_not_by_insertion() {
        let mut sorter = Sorter::new(s("cpus:10"));
        sorter.add(0, "zeta");
        sorter.add(1, "alpha");
        sorter.add(2, "mid");
        assert_eq!(order(&sorter), vec![1, 2, 0]);
    }

    #[test]
    fn weight_divides_the_share() {
        let mut sorter = Sorter::new(s("cpus:10"));
        sorter.add(0, "a");
        sorter.add(1, "b");
        sorter.allocated(0, &s("cpus:4"));
        sorter.allocated(1, &s("cpus:3"));
        assert_eq!(order(&sorter), vec![1, 0]);
        // a: 0.4 / 2 = 0.2 < b: 0.3.
        sorter.set_weight(0, 2.0);
        assert_eq!(order(&sorter), vec![0, 1]);
    }

    #[test]
    fn a_new_total_reorders_clients() {
        let mut sorter = Sorter::new(s("cpus:10;mem:100"));
        sorter.add(0, "a");
        sorter.add(1, "b");
        sorter.allocated(0, &s("cpus:5")); // 0.5
        sorter.allocated(1, &s("mem:40")); // 0.4
        assert_eq!(order(&sorter), vec![1, 0]);
        sorter.set_total(s("cpus:100;mem:100")); // a: 0.05, b: 0.4
        assert_eq!(order(&sorter), vec![0, 1]);
    }

    #[test]
    fn scalars_with_zero_total_do_not_count() {
        let mut sorter = Sorter::new(s("cpus:10"));
        sorter.add(0, "a");
        sorter.add(1, "b");
        sorter.allocated(0, &s("gpus:1"));
        sorter.allocated(1, &s("cpus:1"));
        assert_eq!(order(&sorter), vec![0, 1]);
    }

    #[test]
    fn removing_a_client_returns_its_allocation() {
        let mut sorter = Sorter::new(s("cpus:10"));
        assert!(sorter.add(7, "a"));
        assert!(!sorter.add(7, "a"), "re-adding is a no-op");
        sorter.allocated(7, &s("cpus:2"));
        assert_eq!(sorter.remove(7), Some(s("cpus:2")));
        assert!(sorter.is_empty());
        assert_eq!(sorter.remove(7), None);
        assert_eq!(order(&sorter), Vec::<u32>::new());
    }

    #[test]
    fn unknown_clients_are_ignored() {
        let mut sorter = Sorter::new(s("cpus:10"));
        sorter.allocated(3, &s("cpus:1"));
        sorter.set_weight(3, 2.0);
        assert_eq!(sorter.allocation(3), Scalars::default());
        assert!(sorter.key(3).is_none());
        assert!(sorter.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u32),
        Remove(u32),
        Allocate(u32, u64),
        Unallocate(u32, u64),
        Weight(u32, u8),
        Total(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..8).prop_map(Op::Add),
            (0u32..8).prop_map(Op::Remove),
            (0u32..8, 0u64..5000).prop_map(|(i, m)| Op::Allocate(i, m)),
            (0u32..8, 0u64..5000).prop_map(|(i, m)| Op::Unallocate(i, m)),
            (0u32..8, 1u8..5).prop_map(|(i, w)| Op::Weight(i, w)),
            (1u64..50).prop_map(Op::Total),
        ]
    }

    proptest! {
        /// The incrementally maintained order equals sorting all clients from
        /// scratch by (weighted share, name).
        #[test]
        fn order_matches_a_full_sort(ops in prop::collection::vec(op(), 0..60)) {
            let mut total = Scalars::of(&Resources::parse("cpus:10;mem:10").unwrap());
            let mut sorter = Sorter::new(total);
            // Reference: id -> (cpus milli allocated, weight).
            let mut model: std::collections::BTreeMap<u32, (u64, f64)> = Default::default();
            for op in ops {
                match op {
                    Op::Add(i) => {
                        sorter.add(i, &format!("c{}", 7 - i));
                        model.entry(i).or_insert((0, 1.0));
                    }
                    Op::Remove(i) => {
                        sorter.remove(i);
                        model.remove(&i);
                    }
                    Op::Allocate(i, m) => {
                        let amount = Scalars::of(&Resources {
                            cpus: corral_proto::Amount::from_milli(m),
                            ..Default::default()
                        });
                        sorter.allocated(i, &amount);
                        if let Some(c) = model.get_mut(&i) { c.0 += m; }
                    }
                    Op::Unallocate(i, m) => {
                        let m = model.get(&i).map_or(0, |c| c.0.min(m));
                        let amount = Scalars::of(&Resources {
                            cpus: corral_proto::Amount::from_milli(m),
                            ..Default::default()
                        });
                        sorter.unallocated(i, &amount);
                        if let Some(c) = model.get_mut(&i) { c.0 -= m; }
                    }
                    Op::Weight(i, w) => {
                        sorter.set_weight(i, f64::from(w));
                        if let Some(c) = model.get_mut(&i) { c.1 = f64::from(w); }
                    }
                    Op::Total(units) => {
                        total = Scalars::of(&Resources::parse(&format!("cpus:{units};mem:10")).unwrap());
                        sorter.set_total(total);
                    }
                }
                let cpus = |m: u64| Resources { cpus: corral_proto::Amount::from_milli(m), ..Default::default() };
                let mut want: Vec<(f64, String, u32)> = model
                    .iter()
                    .map(|(&i, &(m, w))| {
                        let share = Scalars::of(&cpus(m)).dominant_share(&total) / w;
                        (share, format!("c{}", 7 - i), i)
                    })
                    .collect();
                want.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
                let want: Vec<u32> = want.into_iter().map(|(_, _, i)| i).collect();
                prop_assert_eq!(order(&sorter), want);
            }
        }
    }
}
