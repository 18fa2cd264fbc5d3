//! Per-device request rate limit (`downstream.device_rate_per_minute`): one token bucket per
//! device, so a device flooding its request topic is refused without slowing anyone else.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::cloud::rate::TokenBucket;
use crate::device_id::DeviceId;

/// Buckets are pruned when the map grows past this many devices.
const PRUNE_ABOVE: usize = 4096;

/// Token buckets keyed by device.
#[derive(Debug)]
pub struct DeviceRateLimit {
    per_second: f64,
    burst: f64,
    buckets: HashMap<DeviceId, TokenBucket>,
    prune_at: usize,
}

impl DeviceRateLimit {
    /// `per_minute` requests per minute per device, with a burst of a tenth of that (at least
    /// 3: a device may legitimately retry a couple of times after a reconnect).
    pub fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        DeviceRateLimit {
            per_second: per_minute / 60.0,
            burst: (per_minute / 10.0).max(3.0),
            buckets: HashMap::new(),
            prune_at: PRUNE_ABOVE,
        }
    }

    /// Changes the rate to `per_minute` (burst as in [`DeviceRateLimit::new`]), for the
    /// devices already tracked too.
    pub fn set_per_minute(&mut self, per_minute: u32, now: Instant) {
        let fresh = DeviceRateLimit::new(per_minute);
        self.per_second = fresh.per_second;
        self.burst = fresh.burst;
        for bucket in self.buckets.values_mut() {
            bucket.set_rate(fresh.per_second, fresh.burst, now);
        }
    }

    /// True when `device` may make one more request now (and counts it).
    pub fn allow(&mut self, device: &DeviceId, now: Instant) -> bool {
        if self.buckets.len() >= self.prune_at {
            // Devices whose bucket refilled completely are idle; forgetting them changes nothing.
            self.buckets.retain(|_, b| !b.is_full(now));
            self.prune_at = (self.buckets.len() * 2).max(PRUNE_ABOVE);
        }
        let (rate, burst) = (self.per_second, self.burst);
        self.buckets
            .entry(device.clone())
            .or_insert_with(|| TokenBucket::new(rate, burst, now))
            .try_take(now)
            .is_ok()
    }

    /// Devices currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flooding_device_is_limited_and_others_are_not() {
        let mut limit = DeviceRateLimit::new(30);
        let now = Instant::now();
        let flooder = DeviceId::parse("flood").unwrap();
        let allowed = (0..50).filter(|_| limit.allow(&flooder, now)).count();
        assert_eq!(allowed, 3);
        let quiet = DeviceId::parse("quiet").unwrap();
        assert!(limit.allow(&quiet, now));
        // 30/min = one every 2 s.
        assert!(limit.allow(&flooder, now + Duration::from_secs(2)));
        assert!(!limit.allow(&flooder, now + Duration::from_secs(2)));
    }

    #[test]
    fn idle_devices_are_pruned() {
        let mut limit = DeviceRateLimit::new(60);
        let now = Instant::now();
        for i in 0..PRUNE_ABOVE {
            let id = DeviceId::parse(&format!("d{i}")).unwrap();
            assert!(limit.allow(&id, now));
        }
        let later = now + Duration::from_secs(60);
        assert!(limit.allow(&DeviceId::parse("new").unwrap(), later));
        assert_eq!(limit.tracked(), 1);
    }
}
