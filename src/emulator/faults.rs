//! Injected faults (`POST /faults`, cleared by `DELETE /faults`): an outage that drops every
//! connection and refuses new ones for a while, a different per-API rate limit, a delay before
//! each provisioning response and a probability of dropping responses altogether.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// A `POST /faults` body: every field is optional; the ones given replace the current ones.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRequest {
    /// Drop every connection now and refuse new ones for this many seconds.
    pub outage_seconds: Option<f64>,
    /// Requests per second allowed per provisioning API (0 = unlimited).
    pub tps: Option<f64>,
    /// Delay before each provisioning response, milliseconds.
    pub response_delay_ms: Option<u64>,
    /// Probability (0..=1) that a provisioning response is not sent.
    pub drop_responses: Option<f64>,
}

/// The faults currently in force, as `GET /faults` and `POST /faults` report them.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FaultView {
    /// Seconds left in the current outage (0 = none).
    pub outage_seconds_left: f64,
    /// Per-API rate limit from `--tps` or a fault (absent = unlimited).
    pub tps: Option<f64>,
    /// Delay before each provisioning response.
    pub response_delay_ms: u64,
    /// Probability of dropping a provisioning response.
    pub drop_responses: f64,
}

#[derive(Default)]
struct Inner {
    outage_until: Option<Instant>,
    response_delay: Duration,
    drop_responses: f64,
}

/// Fault state shared by the server and the API.
pub struct Faults {
    inner: Mutex<Inner>,
    /// Bumped at the start of each outage: every connection task watches it and closes.
    outage_epoch: watch::Sender<u64>,
}

/// Why a fault request was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FaultError {
    /// A field is out of its range.
    #[error("{field}: {reason}")]
    OutOfRange {
        /// The JSON field.
        field: &'static str,
        /// The allowed range.
        reason: &'static str,
    },
}

impl Default for Faults {
    fn default() -> Self {
        Self::new()
    }
}

impl Faults {
    /// No faults.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            outage_epoch: watch::Sender::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a request before anything is applied, so a bad request changes nothing.
    pub fn validate(req: &FaultRequest) -> Result<(), FaultError> {
        if let Some(s) = req.outage_seconds {
            if !(0.0..=86_400.0).contains(&s) {
                return Err(FaultError::OutOfRange {
                    field: "outageSeconds",
                    reason: "must be between 0 and 86400",
                });
            }
        }
        if let Some(tps) = req.tps {
            if !(tps.is_finite() && tps >= 0.0) {
                return Err(FaultError::OutOfRange {
                    field: "tps",
                    reason: "must be a number >= 0 (0 = unlimited)",
                });
            }
        }
        if let Some(ms) = req.response_delay_ms {
            if ms > 600_000 {
                return Err(FaultError::OutOfRange {
                    field: "responseDelayMs",
                    reason: "must be at most 600000",
                });
            }
        }
        if let Some(p) = req.drop_responses {
            if !(0.0..=1.0).contains(&p) {
                return Err(FaultError::OutOfRange {
                    field: "dropResponses",
                    reason: "must be between 0 and 1",
                });
            }
        }
        Ok(())
    }

    /// Applies the connection-level parts of a validated request (the rate limit is applied
    /// by the caller to the provisioning token buckets).
    pub fn apply(&self, req: &FaultRequest) {
        let mut inner = self.lock();
        if let Some(ms) = req.response_delay_ms {
            inner.response_delay = Duration::from_millis(ms);
        }
        if let Some(p) = req.drop_responses {
            inner.drop_responses = p;
        }
        if let Some(s) = req.outage_seconds {
            if s > 0.0 {
                inner.outage_until = Some(Instant::now() + Duration::from_secs_f64(s));
                drop(inner);
                self.outage_epoch.send_modify(|e| *e += 1);
            } else {
                inner.outage_until = None;
            }
        }
    }

    /// `POST /faults` of both emulators: `body` is a JSON [`FaultRequest`], checked, then
    /// applied; `set_tps` applies its rate limit to the emulator's provisioning buckets. `Err`
    /// says what is wrong with the request (nothing is applied then).
    pub fn post(&self, body: &[u8], set_tps: impl FnOnce(f64)) -> Result<(), String> {
        let req: FaultRequest =
            serde_json::from_slice(body).map_err(|e| format!("fault request: {e}"))?;
        Self::validate(&req).map_err(|e| format!("fault request: {e}"))?;
        if let Some(tps) = req.tps {
            set_tps(tps);
        }
        self.apply(&req);
        tracing::info!(?req, "emulator fault injected");
        Ok(())
    }

    /// The faults in force, with the provisioning rate limit `tps` (`GET /faults`).
    pub fn view_with(&self, tps: Option<f64>) -> FaultView {
        FaultView { tps, ..self.view() }
    }

    /// Clears every fault.
    pub fn clear(&self) {
        *self.lock() = Inner::default();
    }

    /// True while an outage is in force.
    pub fn in_outage(&self) -> bool {
        self.lock()
            .outage_until
            .is_some_and(|until| Instant::now() < until)
    }

    /// A receiver that changes when an outage starts.
    pub fn outage_watch(&self) -> watch::Receiver<u64> {
        self.outage_epoch.subscribe()
    }

    /// The delay before a provisioning response, and whether to drop it (drawn at random).
    pub fn response_plan(&self) -> (Duration, bool) {
        let inner = self.lock();
        let drop = inner.drop_responses > 0.0 && rand::random::<f64>() < inner.drop_responses;
        (inner.response_delay, drop)
    }

    /// The current faults for display (`tps` filled in by the caller).
    pub fn view(&self) -> FaultView {
        let inner = self.lock();
        let left = inner.outage_until.map_or(0.0, |u| {
            u.saturating_duration_since(Instant::now()).as_secs_f64()
        });
        FaultView {
            outage_seconds_left: left,
            tps: None,
            response_delay_ms: u64::try_from(inner.response_delay.as_millis()).unwrap_or(u64::MAX),
            drop_responses: inner.drop_responses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_starts_bumps_the_epoch_and_clears() {
        let faults = Faults::new();
        let rx = faults.outage_watch();
        assert!(!faults.in_outage());
        faults.apply(&FaultRequest {
            outage_seconds: Some(30.0),
            response_delay_ms: Some(5),
            ..Default::default()
        });
        assert!(faults.in_outage());
        assert!(rx.has_changed().unwrap());
        assert_eq!(faults.response_plan(), (Duration::from_millis(5), false));
        faults.clear();
        assert!(!faults.in_outage());
        assert_eq!(faults.response_plan(), (Duration::ZERO, false));
    }

    #[test]
    fn out_of_range_values_are_named() {
        let err = Faults::validate(&FaultRequest {
            drop_responses: Some(1.5),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "dropResponses: must be between 0 and 1");
    }
}
