//! Dense `u32` slots for string-keyed entities.
//!
//! Agents, frameworks and roles are looked up by id once per call, then
//! addressed by slot: a `Vec` index, a bit in a `BitSet`, a small `HashMap`
//! key. Freed slots are reused (last freed, first reused) so the vectors stay
//! as small as the live population.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug, Clone)]
pub(crate) struct Slots<K, T> {
    items: Vec<Option<(K, T)>>,
    index: HashMap<K, u32>,
    free: Vec<u32>,
}

impl<K, T> Default for Slots<K, T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            index: HashMap::new(),
            free: Vec::new(),
        }
    }
}

impl<K: Hash + Eq + Clone, T> Slots<K, T> {
    pub(crate) fn find<Q>(&self, key: &Q) -> Option<u32>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.index.get(key).copied()
    }

    /// Stores `value` under a key that must not be present yet.
    pub(crate) fn insert(&mut self, key: K, value: T) -> u32 {
        debug_assert!(!self.index.contains_key(&key));
        let slot = match self.free.pop() {
            Some(slot) => {
                self.items[slot as usize] = Some((key.clone(), value));
                slot
            }
            None => {
                // More than 4 billion live agents or frameworks is not a
                // cluster this allocator is meant for.
                let slot = u32::try_from(self.items.len()).unwrap_or(u32::MAX);
                self.items.push(Some((key.clone(), value)));
                slot
            }
        };
        self.index.insert(key, slot);
        slot
    }

    pub(crate) fn remove(&mut self, slot: u32) -> Option<(K, T)> {
        let entry = self.items.get_mut(slot as usize)?.take()?;
        self.index.remove(&entry.0);
        self.free.push(slot);
        Some(entry)
    }

    pub(crate) fn get(&self, slot: u32) -> Option<&T> {
        self.items.get(slot as usize)?.as_ref().map(|(_, v)| v)
    }

    pub(crate) fn get_mut(&mut self, slot: u32) -> Option<&mut T> {
        self.items.get_mut(slot as usize)?.as_mut().map(|(_, v)| v)
    }

    pub(crate) fn key(&self, slot: u32) -> Option<&K> {
        self.items.get(slot as usize)?.as_ref().map(|(k, _)| k)
    }

    /// Key and value together, for callers that need both while mutating.
    pub(crate) fn entry_mut(&mut self, slot: u32) -> Option<(&K, &mut T)> {
        self.items
            .get_mut(slot as usize)?
            .as_mut()
            .map(|(k, v)| (&*k, v))
    }

    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.items
            .iter_mut()
            .filter_map(|e| e.as_mut().map(|(_, v)| v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_slots_are_reused() {
        let mut s: Slots<String, u8> = Slots::default();
        let a = s.insert("a".into(), 1);
        let b = s.insert("b".into(), 2);
        assert_eq!((a, b), (0, 1));
        assert_eq!(s.remove(a), Some(("a".into(), 1)));
        assert_eq!(s.find("a"), None);
        assert_eq!(s.remove(a), None);
        let c = s.insert("c".into(), 3);
        assert_eq!(c, a);
        assert_eq!(s.get(c), Some(&3));
        assert_eq!(s.key(b).map(String::as_str), Some("b"));
        assert_eq!(s.len(), 2);
    }
}
