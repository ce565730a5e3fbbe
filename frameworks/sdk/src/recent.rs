//! A bounded memory of status update uuids already delivered.
//!
//! Agents resend an update until it is acknowledged (at-least-once), so the
//! same uuid can arrive again, typically after a lost acknowledgement or a
//! re-subscription. Remembering the most recent uuids lets the driver
//! re-acknowledge such a duplicate without delivering it twice. The bound
//! keeps memory flat; a duplicate older than the memory is delivered again,
//! which idempotent schedulers tolerate anyway.

use std::collections::{HashSet, VecDeque};

/// Uuids remembered; far more than the updates in flight between an agent's
/// retries, at ~16 bytes each.
pub(crate) const RECENT_UUIDS: usize = 4096;

#[derive(Debug)]
pub(crate) struct RecentUuids {
    capacity: usize,
    set: HashSet<Vec<u8>>,
    order: VecDeque<Vec<u8>>,
}

impl RecentUuids {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            set: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn contains(&self, uuid: &[u8]) -> bool {
        self.set.contains(uuid)
    }

    /// Remembers `uuid`, forgetting the oldest one when full.
    pub(crate) fn insert(&mut self, uuid: Vec<u8>) {
        if self.set.contains(&uuid) {
            return;
        }
        if self.order.len() == self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.set.insert(uuid.clone());
        self.order.push_back(uuid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_when_full() {
        let mut r = RecentUuids::new(2);
        r.insert(vec![1]);
        r.insert(vec![2]);
        r.insert(vec![2]);
        assert!(r.contains(&[1]) && r.contains(&[2]));
        r.insert(vec![3]);
        assert!(!r.contains(&[1]));
        assert!(r.contains(&[2]) && r.contains(&[3]));
        assert_eq!(r.order.len(), 2);
    }
}
