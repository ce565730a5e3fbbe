//! A growable bit set over dense slot numbers.
//!
//! The allocator answers "which frameworks could take this agent?" as
//! `eligible & !blocked[agent]`, a word-wise AND over 64 frameworks at a time,
//! instead of asking every framework. Bits past the end read as unset, so sets
//! grow lazily as framework slots are handed out.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BitSet(Vec<u64>);

impl BitSet {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn get(&self, bit: u32) -> bool {
        let (word, mask) = locate(bit);
        self.0.get(word).is_some_and(|w| w & mask != 0)
    }

    pub(crate) fn set(&mut self, bit: u32, value: bool) {
        let (word, mask) = locate(bit);
        if value {
            if word >= self.0.len() {
                self.0.resize(word + 1, 0);
            }
            self.0[word] |= mask;
        } else if let Some(w) = self.0.get_mut(word) {
            *w &= !mask;
        }
    }

    /// Clears every bit, keeping the allocation for reuse.
    pub(crate) fn clear(&mut self) {
        self.0.iter_mut().for_each(|w| *w = 0);
    }

    /// Adds every member of `other`.
    pub(crate) fn union_with(&mut self, other: &BitSet) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }

    /// The word holding bits `64 * index ..`, zero past the end.
    pub(crate) fn word(&self, index: usize) -> u64 {
        self.0.get(index).copied().unwrap_or(0)
    }

    /// The members of `self & !other`, in increasing order.
    pub(crate) fn difference<'a>(&'a self, other: &'a BitSet) -> impl Iterator<Item = u32> + 'a {
        self.0.iter().enumerate().flat_map(move |(i, &w)| {
            let mut rest = w & !other.word(i);
            std::iter::from_fn(move || {
                if rest == 0 {
                    return None;
                }
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                // `i` < len of a Vec<u64> indexed by u32 bits, so this fits.
                Some(i as u32 * 64 + bit)
            })
        })
    }

    /// How many members `self & !other` has.
    pub(crate) fn difference_len(&self, other: &BitSet) -> u32 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, &w)| (w & !other.word(i)).count_ones())
            .sum()
    }
}

fn locate(bit: u32) -> (usize, u64) {
    ((bit / 64) as usize, 1u64 << (bit % 64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_past_the_end_read_as_unset() {
        let mut s = BitSet::new();
        assert!(!s.get(1000));
        s.set(1000, false);
        assert_eq!(s, BitSet::new());
        s.set(130, true);
        assert!(s.get(130));
        assert!(!s.get(129));
        assert_eq!(s.word(2), 1 << 2);
    }

    #[test]
    fn difference_lists_members_not_in_other() {
        let mut a = BitSet::new();
        let mut b = BitSet::new();
        for bit in [0, 5, 63, 64, 200] {
            a.set(bit, true);
        }
        b.set(5, true);
        b.set(200, true);
        assert_eq!(a.difference(&b).collect::<Vec<_>>(), vec![0, 63, 64]);
        assert_eq!(a.difference_len(&b), 3);
        let mut c = BitSet::new();
        c.union_with(&a);
        c.union_with(&b);
        assert_eq!(
            c.difference(&BitSet::new()).collect::<Vec<_>>(),
            vec![0, 5, 63, 64, 200]
        );
        a.clear();
        assert_eq!(a.difference_len(&b), 0);
    }
}
