//! The scalar part of [`Resources`], as plain integers.
//!
//! Fair shares only look at scalars (ports have no meaningful "fraction of the
//! cluster"), and the sorter adds and subtracts them on every allocation. Doing
//! that on full `Resources` would also merge port ranges (a heap allocation per
//! step) for nothing, so shares are kept on this `Copy` type instead.

use corral_proto::Resources;

/// cpus, mem, disk, gpus in thousandths (the same fixed point as `Amount`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Scalars([u64; 4]);

impl Scalars {
    pub(crate) fn of(resources: &Resources) -> Self {
        Self([
            resources.cpus.milli(),
            resources.mem.milli(),
            resources.disk.milli(),
            resources.gpus.milli(),
        ])
    }

    pub(crate) fn add(&mut self, other: &Scalars) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    /// Saturating: the callers only subtract what they added earlier, so a
    /// clamp can only hide a bug, never create resources.
    pub(crate) fn sub(&mut self, other: &Scalars) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            debug_assert!(*a >= b, "scalar accounting went negative");
            *a = a.saturating_sub(b);
        }
    }

    /// The DRF dominant share. Computed with exactly the same float operations
    /// as `Resources::dominant_share` so that both give bit-identical results
    /// (the property tests compare this allocator with a slow reference built
    /// on `Resources`).
    pub(crate) fn dominant_share(&self, total: &Scalars) -> f64 {
        self.0
            .iter()
            .zip(total.0.iter())
            .filter(|(_, t)| **t != 0)
            .map(|(a, t)| *a as f64 / *t as f64)
            .fold(0.0, f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dominant_share_matches_resources_dominant_share() {
        let total = Resources::parse("cpus:24;mem:4096;disk:4096;gpus:0").unwrap();
        let used = Resources::parse("cpus:1.5;mem:1000;disk:7").unwrap();
        assert_eq!(
            Scalars::of(&used).dominant_share(&Scalars::of(&total)),
            used.dominant_share(&total)
        );
    }

    #[test]
    fn add_then_sub_is_identity() {
        let a = Scalars::of(&Resources::parse("cpus:2;mem:3").unwrap());
        let b = Scalars::of(&Resources::parse("cpus:0.5;gpus:1").unwrap());
        let mut s = a;
        s.add(&b);
        s.sub(&b);
        assert_eq!(s, a);
    }
}
