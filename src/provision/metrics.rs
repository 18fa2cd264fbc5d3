//! What the engine measures for `/metrics`: cloud calls by API and result, throttling, and
//! the time from a device's request to the delivery of its result (an HDR histogram, so the
//! tail is exact at any rate without keeping every sample).

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::cloud::CloudError;

/// The engine's cloud-call and latency measurements.
#[derive(Debug)]
pub(crate) struct ProvisionMetrics {
    calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    latency_ms: Mutex<Histogram<u64>>,
}

impl Default for ProvisionMetrics {
    fn default() -> Self {
        ProvisionMetrics {
            calls: Mutex::new(BTreeMap::new()),
            // 1 ms .. 1 day, 3 significant digits: a few tens of KiB.
            latency_ms: Mutex::new(
                Histogram::new_with_bounds(1, 86_400_000, 3).expect("constant bounds are valid"),
            ),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ProvisionMetrics {
    /// Counts one call of `api` with its outcome.
    pub fn cloud_call<T>(&self, api: &'static str, result: &Result<T, CloudError>) {
        let outcome = match result {
            Ok(_) => "ok",
            Err(e) if e.is_throttling() => "throttled",
            Err(CloudError::Rejected { .. }) => "rejected",
            Err(CloudError::ShuttingDown { .. }) => return,
            Err(_) => "error",
        };
        *lock(&self.calls).entry((api, outcome)).or_default() += 1;
    }

    /// Records a delivery `ms` after the device's request.
    pub fn delivered(&self, ms: u64) {
        lock(&self.latency_ms).saturating_record(ms.max(1));
    }

    /// A snapshot.
    pub fn snapshot(&self) -> ProvisionMeasurements {
        ProvisionMeasurements {
            calls: lock(&self.calls)
                .iter()
                .map(|(&(api, outcome), &n)| (api, outcome, n))
                .collect(),
            latency_ms: lock(&self.latency_ms).clone(),
        }
    }
}

/// Cloud calls and latencies measured since start.
#[derive(Clone, Debug)]
pub struct ProvisionMeasurements {
    /// (API, outcome `ok|throttled|rejected|error`, count).
    pub calls: Vec<(&'static str, &'static str, u64)>,
    /// Request -> delivered, in milliseconds.
    pub latency_ms: Histogram<u64>,
}

impl ProvisionMeasurements {
    /// Throttling answers from the cloud.
    pub fn throttled(&self) -> u64 {
        self.calls
            .iter()
            .filter(|(_, o, _)| *o == "throttled")
            .map(|(_, _, n)| n)
            .sum()
    }
}
