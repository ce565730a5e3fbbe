//! Capped exponential backoff with jitter for re-subscribing.
//!
//! Jitter keeps a fleet of frameworks that lost the same master from
//! re-subscribing in lockstep when it comes back ("equal jitter": each delay
//! is drawn from `[d/2, d]`, so it never collapses to zero).

use std::time::Duration;

use rand::Rng;

/// Smallest initial delay accepted, so a zero config cannot spin.
const MIN_INITIAL: Duration = Duration::from_millis(1);

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.max(MIN_INITIAL);
        let max = max.max(initial);
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The delay before the next attempt; doubles the following one up to
    /// the cap.
    pub(crate) fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let d = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        let half = d / 2;
        let spread = u64::try_from((d - half).as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(rng.random_range(0..=spread))
    }

    /// After a successful subscription.
    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_jitter_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(700));
        let nominal = [100, 200, 400, 700, 700, 700];
        for ms in nominal {
            let d = b.next_delay(&mut rng);
            let full = Duration::from_millis(ms);
            assert!(d >= full / 2 && d <= full, "{d:?} not in [{ms}/2, {ms}] ms");
        }
        b.reset();
        assert!(b.next_delay(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn zero_config_still_waits() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert!(b.next_delay(&mut rng) >= MIN_INITIAL / 2);
    }
}
