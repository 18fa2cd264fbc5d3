//! Pacing of cloud calls: a token bucket per cloud API whose rate adapts to throttling (AIMD).
//! Retries and reconnects wait with [`crate::backoff::Backoff`].
//!
//! The cloud enforces a per-API transactions-per-second quota; going over it earns 429s that
//! cost a round trip each. [`AdaptiveRateLimiter`] starts at the configured rate, cuts it by
//! 15 % on a throttling answer (once per cool-down, since the answers to calls already in
//! flight report the same overload) and grows it back while calls succeed, by 5 % of the
//! configured rate per second (at least two calls per second per second), so a cut is made
//! good within about three seconds. The gentle cut keeps the sawtooth narrow: a gateway
//! configured above its real quota settles at roughly 90-95 % of it rather than the 75 % of a
//! halving scheme.
//!
//! A lone throttling answer does not cut the rate; it only empties the burst. Configured at
//! exactly the cloud's quota, both buckets refill at the same rate, but the cloud's stops
//! filling at its capacity while one of our calls is still on its way, so after an idle spell
//! our full bucket can hold a token or two the cloud's no longer has: one 429 at the start of
//! a burst, and never again once both are empty. Cutting the rate for that cost the whole run
//! (at 200/s a 15 % cut took 15 s to grow back at two calls per second per second: 93 % of
//! the quota over 2,000 devices). A second 429 within [`STRIKE_WINDOW`] is a real overload
//! and cuts as before.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A classic token bucket: `rate` tokens per second, holding at most `capacity`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` per second, holding at most `capacity` (>= 1).
    pub fn new(rate: f64, capacity: f64, now: Instant) -> Self {
        let capacity = capacity.max(1.0);
        TokenBucket {
            rate: rate.max(f64::MIN_POSITIVE),
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Takes one token if available; otherwise says how long until one is.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Drops every token earned so far: the next call waits a full interval.
    pub fn empty(&mut self, now: Instant) {
        self.refill(now);
        self.tokens = self.tokens.min(0.0);
    }

    /// True when the bucket is full at `now` (an idle client; its entry can be dropped).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }

    /// The current refill rate (tokens per second).
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Changes the refill rate and capacity, keeping the tokens already earned.
    pub fn set_rate(&mut self, rate: f64, capacity: f64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(f64::MIN_POSITIVE);
        self.capacity = capacity.max(1.0);
        self.tokens = self.tokens.min(self.capacity);
    }
}

/// The lowest rate AIMD backs off to, in calls per second.
const MIN_RATE: f64 = 0.5;
/// Factor applied to the rate on throttling.
const DECREASE: f64 = 0.85;
/// Rate growth per second of successful calls, as a share of the configured rate...
const INCREASE_SHARE_PER_SECOND: f64 = 0.05;
/// ...and at least this many calls per second.
const MIN_INCREASE_PER_SECOND: f64 = 2.0;
/// Throttling answers within this time after a cut are the same overload: one cut only.
const COOL_DOWN: Duration = Duration::from_millis(250);
/// A throttling answer with none other this long before it only empties the burst; one
/// within it cuts the rate.
const STRIKE_WINDOW: Duration = Duration::from_secs(2);

/// A token bucket for one cloud API whose rate follows AIMD: cut on throttling, grown
/// additively on success, never above the configured maximum.
#[derive(Debug)]
pub struct AdaptiveRateLimiter {
    /// The configured ceiling, as `f64` bits (changed on a config reload).
    max_rate: std::sync::atomic::AtomicU64,
    bucket: Mutex<TokenBucket>,
    /// The last throttling answer reacted to (a cut or an emptied burst).
    last_cut: Mutex<Option<Instant>>,
}

impl AdaptiveRateLimiter {
    /// A limiter allowing `max_rate` calls per second (burst: one second's worth).
    pub fn new(max_rate: f64) -> Self {
        let max_rate = max_rate.max(MIN_RATE);
        AdaptiveRateLimiter {
            max_rate: std::sync::atomic::AtomicU64::new(max_rate.to_bits()),
            bucket: Mutex::new(TokenBucket::new(max_rate, max_rate, Instant::now())),
            last_cut: Mutex::new(None),
        }
    }

    /// Waits until a call may be made and takes its token.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut bucket = self.bucket.lock().await;
                match bucket.try_take(Instant::now()) {
                    Ok(()) => return,
                    Err(wait) => wait,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The cloud throttled a call: empty the burst, and cut the rate unless this is the first
    /// throttling answer in [`STRIKE_WINDOW`] (see the module documentation).
    pub async fn on_throttled(&self) {
        self.throttled_at(Instant::now()).await;
    }

    async fn throttled_at(&self, now: Instant) {
        let repeated = {
            let mut last = self.last_cut.lock().await;
            let since = last.map(|t| now.saturating_duration_since(t));
            if since.is_some_and(|s| s < COOL_DOWN) {
                return;
            }
            *last = Some(now);
            since.is_some_and(|s| s < STRIKE_WINDOW)
        };
        let mut bucket = self.bucket.lock().await;
        if !repeated {
            bucket.empty(now);
            return;
        }
        let rate = (bucket.rate() * DECREASE).max(MIN_RATE);
        // A burst right after a 429 would only earn more 429s.
        bucket.set_rate(rate, 1.0, now);
    }

    /// A call succeeded: grow the rate by `increase / rate`, i.e. by `increase` calls/s for
    /// every second of calls at the current rate, where `increase` is
    /// [`INCREASE_SHARE_PER_SECOND`] of the configured rate (at least
    /// [`MIN_INCREASE_PER_SECOND`]).
    pub async fn on_success(&self) {
        let mut bucket = self.bucket.lock().await;
        let current = bucket.rate();
        let max_rate = self.max_rate();
        if current < max_rate {
            let increase = (max_rate * INCREASE_SHARE_PER_SECOND).max(MIN_INCREASE_PER_SECOND);
            let rate = (current + increase / current).min(max_rate);
            bucket.set_rate(rate, rate, Instant::now());
        }
    }

    /// The configured ceiling in calls per second.
    pub fn max_rate(&self) -> f64 {
        f64::from_bits(self.max_rate.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sets a new ceiling (`cloud.aws.tps` on reload): the rate becomes `max_rate` at once,
    /// with one second's burst; throttling cuts it again as before.
    pub async fn set_max_rate(&self, max_rate: f64) {
        let max_rate = max_rate.max(MIN_RATE);
        self.max_rate
            .store(max_rate.to_bits(), std::sync::atomic::Ordering::Relaxed);
        self.bucket
            .lock()
            .await
            .set_rate(max_rate, max_rate, Instant::now());
    }

    /// The current rate in calls per second.
    pub async fn rate(&self) -> f64 {
        self.bucket.lock().await.rate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!(b.try_take(t0).is_ok());
        assert!(b.try_take(t0).is_ok());
        assert!(b.try_take(t0).is_ok());
        let wait = b.try_take(t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(90) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        assert!(b.try_take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.try_take(t0 + Duration::from_millis(100)).is_err());
        assert!(b.is_full(t0 + Duration::from_secs(10)));
    }

    #[test]
    fn bucket_rate_change_keeps_earned_tokens_within_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100.0, 100.0, t0);
        b.set_rate(5.0, 1.0, t0);
        assert!(b.try_take(t0).is_ok());
        assert!(b.try_take(t0).is_err());
        assert_eq!(b.rate(), 5.0);
    }

    #[tokio::test]
    async fn limiter_paces_calls_at_the_rate() {
        let limiter = AdaptiveRateLimiter::new(100.0);
        let start = Instant::now();
        for _ in 0..140 {
            limiter.acquire().await;
        }
        // 100 from the burst, 40 more at 100/s: 400 ms (upper bound generous for a busy box).
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(380) && elapsed <= Duration::from_millis(1500),
            "{elapsed:?}"
        );
    }

    #[tokio::test]
    async fn aimd_cuts_on_throttling_once_per_overload_and_recovers_additively() {
        let limiter = AdaptiveRateLimiter::new(40.0);
        let t0 = Instant::now();
        // A lone 429 only empties the burst.
        limiter.throttled_at(t0).await;
        assert_eq!(limiter.rate().await, 40.0);
        // Answers to calls already in flight report the same overload: nothing more.
        limiter.throttled_at(t0 + COOL_DOWN / 2).await;
        assert_eq!(limiter.rate().await, 40.0);
        // Another one within the strike window is an overload: cut.
        limiter.throttled_at(t0 + COOL_DOWN).await;
        assert_eq!(limiter.rate().await, 34.0);
        limiter.throttled_at(t0 + COOL_DOWN + COOL_DOWN / 2).await;
        assert_eq!(limiter.rate().await, 34.0);
        limiter.throttled_at(t0 + COOL_DOWN * 2).await;
        let r = limiter.rate().await;
        assert!((r - 28.9).abs() < 1e-9, "{r}");
        // 40/s configured: 5 % of it is 2 calls/s per second, the floor of the growth.
        for _ in 0..29 {
            limiter.on_success().await;
        }
        let r = limiter.rate().await;
        assert!(r > 30.8 && r < 31.0, "{r}");
        for _ in 0..10_000 {
            limiter.on_success().await;
        }
        assert_eq!(limiter.rate().await, 40.0);
    }

    #[tokio::test]
    async fn a_lone_throttling_answer_empties_the_burst_without_cutting_the_rate() {
        let limiter = AdaptiveRateLimiter::new(200.0);
        let t0 = Instant::now();
        limiter.throttled_at(t0).await;
        assert_eq!(limiter.rate().await, 200.0);
        // The burst of 200 is gone: the next token is one interval (5 ms) away.
        let wait = limiter.bucket.lock().await.try_take(t0).unwrap_err();
        assert!(wait > Duration::from_millis(4), "{wait:?}");
        // Refilled at the full rate: 100 calls half a second later.
        let half = t0 + Duration::from_millis(500);
        let mut bucket = limiter.bucket.lock().await;
        for i in 0..100 {
            assert!(bucket.try_take(half).is_ok(), "call {i}");
        }
        assert!(bucket.try_take(half).is_err());
        drop(bucket);
        // Another lone one, longer than the strike window later: still no cut.
        limiter.throttled_at(t0 + STRIKE_WINDOW * 2).await;
        assert_eq!(limiter.rate().await, 200.0);
    }

    #[tokio::test]
    async fn a_cut_grows_back_by_five_percent_of_the_configured_rate_per_second() {
        let limiter = AdaptiveRateLimiter::new(200.0);
        let t0 = Instant::now();
        limiter.throttled_at(t0).await;
        limiter.throttled_at(t0 + COOL_DOWN).await;
        assert_eq!(limiter.rate().await, 170.0);
        // About one second of calls at ~175/s grows the rate by ~10 calls/s.
        for _ in 0..175 {
            limiter.on_success().await;
        }
        let r = limiter.rate().await;
        assert!(r > 179.0 && r < 181.0, "{r}");
        // Back at the ceiling after about three seconds of calls.
        for _ in 0..400 {
            limiter.on_success().await;
        }
        assert_eq!(limiter.rate().await, 200.0);
    }

    #[tokio::test]
    async fn aimd_never_goes_below_the_floor() {
        let limiter = AdaptiveRateLimiter::new(1.0);
        let t0 = Instant::now();
        for i in 0..7 {
            limiter.throttled_at(t0 + COOL_DOWN * i).await;
        }
        assert_eq!(limiter.rate().await, MIN_RATE);
    }
}
