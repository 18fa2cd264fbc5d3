//! Latency percentiles of a run: the one histogram shape (microsecond samples, 1 µs to 1 hour,
//! 3 significant digits) behind provisioning and connect latency in the fleet report and
//! device-to-cloud latency in the arrival check, and its summary in milliseconds.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Histogram range in microseconds: 1 µs to 1 hour, 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

/// An empty histogram of microsecond samples.
pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("constant histogram bounds are valid")
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl LatencySummary {
    /// The summary of a histogram of microsecond samples.
    pub(crate) fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}
