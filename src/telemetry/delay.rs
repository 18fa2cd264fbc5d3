//! How long a message spends in the gateway: from the embedded broker reading the device's
//! PUBLISH (with an external broker: the gateway session reading it from that broker) to the
//! link writing it upstream (`fleetgw_telemetry_forward_delay_seconds` on `/metrics`). The
//! broker, the intake with its outbox insert, the dispatcher and the link are all inside.
//! Device-to-cloud latency minus this is the time on the devices' side and on the cloud's;
//! `fleetgw bench telemetry` reads it before and after each phase to say where a latency tail
//! comes from.
//!
//! Fixed buckets of atomic counters: recording costs one clock read and two atomic adds on the
//! link's hot path, and never allocates. Messages loaded from the outbox after a restart (or
//! when more is stored than memory holds) are not counted: their wait was the outage's, not
//! the gateway's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Its name on `/metrics`.
pub const FORWARD_DELAY_METRIC: &str = "fleetgw_telemetry_forward_delay_seconds";

/// Upper bounds of the buckets, microseconds: a step of a millisecond or less up to 5 ms, where
/// the benchmark's latency target lies, so a p99 read from them is no more than a millisecond
/// above the true one there.
pub const BOUNDS_US: [u64; 18] = [
    100, 250, 500, 750, 1_000, 1_500, 2_000, 3_000, 4_000, 5_000, 10_000, 20_000, 50_000, 100_000,
    250_000, 1_000_000, 5_000_000, 30_000_000,
];

/// Counts of forwarded messages by delay.
#[derive(Debug, Default)]
pub(crate) struct DelayHistogram {
    /// `buckets[i]`: delays up to `BOUNDS_US[i]` and above the previous bound; the last one
    /// counts everything above the largest bound.
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl DelayHistogram {
    /// Counts one message that waited `delay`.
    pub fn record(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> DelaySnapshot {
        DelaySnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A copy of a [`DelayHistogram`]'s counts (not cumulative: one count per bucket, the last
/// above every bound).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DelaySnapshot {
    /// Per bucket of [`BOUNDS_US`], then the overflow.
    pub buckets: Vec<u64>,
    /// Sum of all delays, microseconds.
    pub sum_us: u64,
}

impl DelaySnapshot {
    /// Messages counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The upper bound (microseconds) of the bucket holding quantile `q` (0..=1), or `None`
    /// when nothing was counted or it lies above the largest bound.
    pub fn quantile_bound_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return BOUNDS_US.get(i).copied();
            }
        }
        None
    }

    /// What was counted after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &DelaySnapshot) -> DelaySnapshot {
        DelaySnapshot {
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
        }
    }

    /// Reads the histogram named `name` back from Prometheus text (cumulative `_bucket` lines
    /// with `le` in seconds, as `/metrics` renders it).
    pub fn from_prometheus(text: &str, name: &str) -> Option<DelaySnapshot> {
        let bucket = format!("{name}_bucket{{le=\"");
        let sum = format!("{name}_sum ");
        let mut cumulative = Vec::with_capacity(BOUNDS_US.len() + 1);
        let mut sum_us = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket) {
                let (_, value) = rest.split_once("} ")?;
                cumulative.push(value.trim().parse::<u64>().ok()?);
            } else if let Some(value) = line.strip_prefix(&sum) {
                let secs: f64 = value.trim().parse().ok()?;
                sum_us = (secs * 1e6).round() as u64;
            }
        }
        if cumulative.len() != BOUNDS_US.len() + 1 {
            return None;
        }
        let mut previous = 0;
        let buckets = cumulative
            .into_iter()
            .map(|c| {
                let n = c.saturating_sub(previous);
                previous = c;
                n
            })
            .collect();
        Some(DelaySnapshot { buckets, sum_us })
    }

    /// The bounded buckets as Prometheus writes them: (upper bound in seconds, messages at or
    /// below it); the `+Inf` bucket is [`count`](Self::count).
    pub fn cumulative_seconds(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        BOUNDS_US
            .iter()
            .enumerate()
            .scan(0, move |seen, (i, bound)| {
                *seen += self.buckets.get(i).copied().unwrap_or(0);
                Some((*bound as f64 / 1e6, *seen))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_land_in_the_bucket_of_their_upper_bound() {
        let h = DelayHistogram::default();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(101));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count(), 4);
        assert_eq!(s.buckets[0], 1, "100 us is within the first bound");
        assert_eq!(s.buckets[1], 1, "101 us is above it");
        assert_eq!(s.buckets[BOUNDS_US.len()], 1, "60 s is above every bound");
        assert_eq!(s.quantile_bound_us(0.5), Some(250));
        assert_eq!(
            s.quantile_bound_us(0.75),
            Some(3_000),
            "3 ms is told from 4 and 5"
        );
        assert_eq!(s.quantile_bound_us(1.0), None, "the largest is unbounded");
        assert_eq!(DelaySnapshot::default().quantile_bound_us(0.5), None);
    }

    #[test]
    fn prometheus_text_reads_back_to_the_same_counts_and_differences_are_per_phase() {
        let h = DelayHistogram::default();
        for us in [50, 700, 700, 9_000] {
            h.record(Duration::from_micros(us));
        }
        let before = h.snapshot();
        h.record(Duration::from_millis(40));
        let after = h.snapshot();
        let mut text = String::from("other_metric 1\n");
        for (le, n) in after.cumulative_seconds() {
            text.push_str(&format!("x_seconds_bucket{{le=\"{le}\"}} {n}\n"));
        }
        text.push_str(&format!(
            "x_seconds_bucket{{le=\"+Inf\"}} {}\n",
            after.count()
        ));
        text.push_str(&format!("x_seconds_sum {}\n", after.sum_us as f64 / 1e6));
        let read = DelaySnapshot::from_prometheus(&text, "x_seconds").expect("parses");
        assert_eq!(read, after);
        let phase = read.since(&before);
        assert_eq!(phase.count(), 1);
        assert_eq!(phase.quantile_bound_us(0.99), Some(50_000));
        assert_eq!(phase.sum_us, 40_000);
        assert!(DelaySnapshot::from_prometheus("nothing here", "x_seconds").is_none());
    }
}
