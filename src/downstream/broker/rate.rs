//! The per-connection PUBLISH rate of the embedded broker (`max_inbound_per_second`): over
//! it, the connection is not read until the rate allows, so TCP flow control slows the client
//! down and a flood costs the broker nothing.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket over one connection's PUBLISH packets: `rate` per second, bursts of as many.
pub(super) struct InboundRate {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl InboundRate {
    pub(super) fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            rate,
            tokens: rate,
            last: Instant::now(),
        }
    }

    /// One PUBLISH read (the balance may go below zero: the packets are already here).
    pub(super) fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// How long to stop reading before the balance is back above zero, if it is below.
    pub(super) fn pause(&mut self) -> Option<Duration> {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbound_rate_allows_a_burst_then_pauses_for_the_deficit() {
        let mut rate = InboundRate::new(5);
        for _ in 0..5 {
            rate.take();
        }
        assert_eq!(rate.pause(), None, "a burst of `rate` packets is free");
        for _ in 0..5 {
            rate.take();
        }
        // Five packets over: about a second at 5 per second.
        let pause = rate.pause().expect("a pause");
        assert!(
            pause > Duration::from_millis(900) && pause <= Duration::from_secs(1),
            "{pause:?}"
        );
    }
}
