//! Jittered exponential back-off, the one delay policy of every loop that retries or
//! reconnects (claim sessions, provisioning retries, upstream links, the downstream session,
//! the simulated devices).
//!
//! Attempt n waits a random time in [d/2, d] with d = min(base * 2^n, max) ("equal jitter"):
//! a fleet that lost its broker at once does not come back at once, and never instantly.

use std::time::Duration;

/// Jittered exponential back-off with a cap.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A back-off starting at `base`, capped at `max` (a cap below `base` is raised to it).
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The ceiling d of retry number `attempt` (0-based), before jitter.
    pub fn ceiling_for(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(2u32.saturating_pow(attempt.min(31)))
            .min(self.max)
    }

    /// The delay before retry number `attempt` (0-based), jittered.
    pub fn delay_for(&self, attempt: u32) -> Duration {
        let half = self.ceiling_for(attempt) / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// The next delay; each call doubles the ceiling up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.delay_for(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_jittered_doubling_and_capped() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(800));
        for ceiling in [100, 200, 400, 800, 800, 800] {
            let d = b.next_delay();
            assert!(
                d >= ms(ceiling / 2) && d <= ms(ceiling),
                "{d:?} outside [{}, {ceiling}] ms",
                ceiling / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn huge_attempt_numbers_stay_at_the_cap() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        assert_eq!(b.ceiling_for(u32::MAX), Duration::from_secs(30));
        assert!(b.delay_for(1_000) >= Duration::from_secs(15));
    }

    #[test]
    fn a_cap_below_the_base_is_the_base() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.ceiling_for(5), Duration::from_secs(2));
    }
}
