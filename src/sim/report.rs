//! What a fleet run found: the outcome of every device as it finishes ([`FleetEvent`]), why a
//! device failed ([`FailureReason`], with the [`Stage`] it ran out of time in), and the totals
//! ([`FleetReport`], with the telemetry phase in [`TelemetryReport`]), counted by the
//! `Tally` from what the device tasks send it. A telemetry report is checked against what the
//! cloud received with [`TelemetryReport::check`] (the check itself is [`super::arrival`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::device_id::DeviceId;
use crate::downstream::contract::PayloadFormat;

use super::arrival::{Arrival, TelemetryCheck};
use super::latency::{self, LatencySummary};
use super::plan::{DevicePlan, TelemetryPlan};

/// Where a device was when it ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Connecting to the broker.
    Connecting,
    /// Connected, waiting for the SUBACK.
    Subscribing,
    /// Request published, waiting for `/accepted` or `/rejected`.
    WaitingForAnswer,
    /// Provisioned, publishing telemetry and waiting for the PUBACKs.
    Telemetry,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Connecting => "connecting to the broker",
            Stage::Subscribing => "waiting for the SUBACK",
            Stage::WaitingForAnswer => "waiting for the gateway's answer",
            Stage::Telemetry => "publishing telemetry",
        })
    }
}

/// Why a device did not end up provisioned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FailureReason {
    /// Key, CSR or attestation could not be made.
    #[error("cannot build the request: {0}")]
    Prepare(String),
    /// The broker refused the MQTT connection (bad credentials, not authorised, ...).
    #[error("the broker refused the connection: {0}")]
    ConnectionRefused(String),
    /// The broker refused a subscription (ACL).
    #[error("the broker refused the subscription to {topic}")]
    SubscribeRefused {
        /// The refused filter.
        topic: String,
    },
    /// The gateway answered on `/rejected` with a permanent error.
    #[error("rejected by the gateway: {status_code} {error_code}: {error_message}")]
    Rejected {
        /// statusCode of the answer.
        status_code: u16,
        /// errorCode of the answer.
        error_code: String,
        /// errorMessage of the answer.
        error_message: String,
    },
    /// No answer before the device's deadline.
    #[error("no answer within {}s while {stage}{}{}", timeout.as_secs_f64(),
        last_status.as_ref().map(|s| format!("; last status {s:?}")).unwrap_or_default(),
        last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    Timeout {
        /// The device's time budget.
        timeout: Duration,
        /// Where it was.
        stage: Stage,
        /// The last value of its retained status topic, if any was received.
        last_status: Option<String>,
        /// The last connection error or transient rejection, if any.
        last_error: Option<String>,
    },
    /// The answer could not be decoded.
    #[error("the answer on {topic} is not a valid response: {reason}")]
    InvalidAnswer {
        /// Where it arrived.
        topic: String,
        /// The decoder's message.
        reason: String,
    },
    /// The answer names another device.
    #[error("the answer is for device {got:?}")]
    WrongDevice {
        /// The deviceId in the answer.
        got: String,
    },
    /// The answer has an empty thingName.
    #[error("the answer has no thingName")]
    MissingThingName,
    /// An Azure answer without the assigned hub or with a status other than `assigned`.
    #[error("the Azure answer is incomplete: {0}")]
    AzureAnswer(String),
    /// The device sent no CSR but got no private key.
    #[error("the device sent no CSR but the answer has no privateKey")]
    MissingPrivateKey,
    /// The device sent its own CSR but got a private key: the gateway made a key it must not.
    #[error("the device sent its own CSR but the answer carries a privateKey")]
    UnexpectedPrivateKey,
    /// The certificate or returned key does not parse.
    #[error("{0}")]
    Certificate(String),
    /// The certificate does not carry the expected public key.
    #[error("the certificate does not carry {0}")]
    KeyMismatch(&'static str),
    /// The certificate does not chain to the cloud CA.
    #[error("the certificate does not chain to the cloud CA: {0}")]
    Chain(String),
    /// The gateway's retained status says the device will not be provisioned.
    #[error("the gateway reports the device {0} instead of provisioned")]
    NotProvisioned(String),
    /// The device's task ended without reporting (a bug; counted so totals stay right).
    #[error("the device task ended without an outcome: {0}")]
    Lost(String),
}

/// A device that did not end up provisioned, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFailure {
    /// 1-based device number.
    pub n: u32,
    /// The device id.
    pub id: DeviceId,
    /// Why.
    pub reason: FailureReason,
}

impl fmt::Display for DeviceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.id, self.reason)
    }
}

/// Progress of a run, reported once per device as it finishes.
#[derive(Clone, Debug)]
pub enum FleetEvent {
    /// The device holds a verified certificate.
    Provisioned {
        /// The device.
        plan: DevicePlan,
        /// From its first request to the answer.
        latency: Duration,
        /// The thing the cloud registered.
        thing_name: String,
    },
    /// The device gave up.
    Failed(DeviceFailure),
    /// A provisioned device finished its telemetry phase (reported after `Provisioned`).
    Telemetry(DeviceTelemetry),
}

/// What one device did in the telemetry phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTelemetry {
    /// 1-based device number.
    pub n: u32,
    /// The device id.
    pub id: DeviceId,
    /// Its thing name: the MQTT client id its messages arrive under in the cloud with the
    /// gateway's `device` identity.
    pub thing_name: String,
    /// Distinct sequence numbers published (0 to `published - 1`).
    pub published: u64,
    /// Of those, acknowledged by the gateway (stored durably, for fleetgw).
    pub acked: u64,
    /// Connections re-established during the phase.
    pub reconnects: u32,
    /// Why the device stopped before every PUBACK came.
    pub error: Option<FailureReason>,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct FleetReport {
    /// Devices in the run.
    pub devices: u32,
    /// Devices holding a verified certificate.
    pub provisioned: u32,
    /// Devices that gave up.
    pub failed: u32,
    /// From the first device's start to the last device's provisioning outcome (a telemetry
    /// phase is timed separately).
    pub elapsed: Duration,
    /// Per provisioned device: from its first request to the answer.
    pub latency: LatencySummary,
    /// Per device that subscribed: from its first connect attempt to the SUBACK.
    pub connect: LatencySummary,
    /// Devices that sent JSON.
    pub json_devices: u32,
    /// Devices that sent CBOR.
    pub cbor_devices: u32,
    /// Devices that sent their own CSR.
    pub own_csr_devices: u32,
    /// Connections re-established after an error.
    pub reconnects: u64,
    /// Requests sent again (after a reconnect or a transient rejection).
    pub resent_requests: u64,
    /// Every failure, by device number.
    pub failures: Vec<DeviceFailure>,
    /// The telemetry phase (`None` when the run had none).
    pub telemetry: Option<TelemetryReport>,
}

/// The totals of the telemetry phase.
#[derive(Clone, Debug)]
pub struct TelemetryReport {
    /// Messages each device was to publish.
    pub messages_per_device: u32,
    /// Devices that published (provisioned and picked by [`TelemetryPlan::publishes`]).
    pub devices: u32,
    /// Distinct messages published.
    pub published: u64,
    /// Of those, acknowledged by the gateway.
    pub acked: u64,
    /// Connections re-established during the phase (unacknowledged messages were published
    /// again after each).
    pub reconnects: u64,
    /// From the first publish to the last PUBACK of the fleet.
    pub elapsed: Duration,
    /// Every device that published, by device number.
    pub per_device: Vec<DeviceTelemetry>,
}

impl TelemetryReport {
    /// Devices that stopped before every PUBACK came.
    pub fn incomplete(&self) -> impl Iterator<Item = &DeviceTelemetry> {
        self.per_device.iter().filter(|d| d.error.is_some())
    }

    /// Checks what the cloud received (arrivals per MQTT client id, see
    /// [`super::arrival::fetch_arrivals`]) against what every device published; devices are
    /// looked up by thing name.
    pub fn check(&self, arrivals: &BTreeMap<String, Vec<Arrival>>) -> TelemetryCheck {
        let mut check = TelemetryCheck::new();
        for device in &self.per_device {
            let got = arrivals
                .get(&device.thing_name)
                .map(Vec::as_slice)
                .unwrap_or_default();
            check.add_device(device.id.as_str(), got, 0..device.published);
        }
        check
    }

    /// Acknowledged messages per second of the phase, as the devices saw it.
    pub fn acked_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.acked as f64 / secs
        } else {
            0.0
        }
    }
}

impl FleetReport {
    /// Provisioned devices per second of wall time.
    pub fn devices_per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            f64::from(self.provisioned) / secs
        } else {
            0.0
        }
    }

    /// True when every device is provisioned.
    pub fn all_provisioned(&self) -> bool {
        self.failed == 0 && self.provisioned == self.devices
    }

    /// The machine-readable summary written by `--json`: `{"devices", "provisioned", "failed",
    /// "seconds", "devicesPerSecond", "p50Ms", "p99Ms"}` plus the detail (`latency`,
    /// `connect`, the format mix, reconnects and every failure with its reason).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "devices": self.devices,
            "provisioned": self.provisioned,
            "failed": self.failed,
            "seconds": self.elapsed.as_secs_f64(),
            "devicesPerSecond": self.devices_per_second(),
            "p50Ms": self.latency.p50_ms,
            "p99Ms": self.latency.p99_ms,
            "latency": self.latency,
            "connect": self.connect,
            "jsonDevices": self.json_devices,
            "cborDevices": self.cbor_devices,
            "ownCsrDevices": self.own_csr_devices,
            "reconnects": self.reconnects,
            "resentRequests": self.resent_requests,
            "failures": self.failures.iter().map(|f| serde_json::json!({
                "n": f.n,
                "deviceId": f.id.as_str(),
                "reason": f.reason.to_string(),
            })).collect::<Vec<_>>(),
            "telemetry": self.telemetry.as_ref().map(|t| serde_json::json!({
                "devices": t.devices,
                "messagesPerDevice": t.messages_per_device,
                "published": t.published,
                "acked": t.acked,
                "reconnects": t.reconnects,
                "seconds": t.elapsed.as_secs_f64(),
                "ackedPerSecond": t.acked_per_second(),
                "incomplete": t.incomplete().map(|d| serde_json::json!({
                    "n": d.n,
                    "deviceId": d.id.as_str(),
                    "published": d.published,
                    "acked": d.acked,
                    "reason": d.error.as_ref().map(ToString::to_string),
                })).collect::<Vec<_>>(),
            })),
        })
    }
}

/// What a device task reports.
pub(super) struct Outcome {
    pub(super) plan: DevicePlan,
    pub(super) result: Result<Provisioned, FailureReason>,
    pub(super) connect: Option<Duration>,
    pub(super) reconnects: u32,
    pub(super) resent: u32,
}

pub(super) struct Provisioned {
    pub(super) latency: Duration,
    pub(super) thing_name: String,
}

/// What a device task sends: its provisioning outcome, then (if it publishes) its telemetry.
pub(super) enum DeviceReport {
    Provisioning(Outcome),
    Telemetry(TelemetryDone),
}

pub(super) struct TelemetryDone {
    pub(super) device: DeviceTelemetry,
    pub(super) first_publish: Option<Instant>,
    pub(super) last_ack: Option<Instant>,
}

/// Counts outcomes and builds the report.
pub(super) struct Tally {
    plans: BTreeMap<u32, DevicePlan>,
    provisioned: u32,
    failures: Vec<DeviceFailure>,
    latency: Histogram<u64>,
    connect: Histogram<u64>,
    reconnects: u64,
    resent: u64,
    devices: u32,
    json: u32,
    cbor: u32,
    own_csr: u32,
    telemetry: Option<TelemetryTally>,
    /// From the start to the last provisioning outcome (telemetry may go on after it).
    pub(super) provisioning_elapsed: Option<Duration>,
}

struct TelemetryTally {
    messages_per_device: u32,
    per_device: Vec<DeviceTelemetry>,
    first_publish: Option<Instant>,
    last_ack: Option<Instant>,
}

impl Tally {
    pub(super) fn new(plans: &[DevicePlan], telemetry: Option<&TelemetryPlan>) -> Self {
        let count = |f: &dyn Fn(&DevicePlan) -> bool| plans.iter().filter(|p| f(p)).count() as u32;
        Self {
            plans: plans.iter().map(|p| (p.n, p.clone())).collect(),
            provisioned: 0,
            failures: Vec::new(),
            latency: latency::histogram(),
            connect: latency::histogram(),
            reconnects: 0,
            resent: 0,
            devices: plans.len() as u32,
            json: count(&|p| p.format == PayloadFormat::Json),
            cbor: count(&|p| p.format == PayloadFormat::Cbor),
            own_csr: count(&|p| p.own_csr),
            telemetry: telemetry.map(|t| TelemetryTally {
                messages_per_device: t.messages_per_device,
                per_device: Vec::new(),
                first_publish: None,
                last_ack: None,
            }),
            provisioning_elapsed: None,
        }
    }

    /// Every device has a provisioning outcome.
    pub(super) fn provisioning_done(&self) -> bool {
        self.plans.is_empty()
    }

    pub(super) fn record_telemetry(&mut self, done: TelemetryDone) -> FleetEvent {
        if let Some(t) = &mut self.telemetry {
            t.first_publish = match (t.first_publish, done.first_publish) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            t.last_ack = t.last_ack.max(done.last_ack);
            t.per_device.push(done.device.clone());
        }
        FleetEvent::Telemetry(done.device)
    }

    /// Records one outcome; `None` for a duplicate report of the same device (never expected).
    pub(super) fn record(&mut self, outcome: Outcome) -> Option<FleetEvent> {
        self.plans.remove(&outcome.plan.n)?;
        self.reconnects += u64::from(outcome.reconnects);
        self.resent += u64::from(outcome.resent);
        if let Some(connect) = outcome.connect {
            self.connect.saturating_record(micros(connect));
        }
        Some(match outcome.result {
            Ok(done) => {
                self.provisioned += 1;
                self.latency.saturating_record(micros(done.latency));
                FleetEvent::Provisioned {
                    plan: outcome.plan,
                    latency: done.latency,
                    thing_name: done.thing_name,
                }
            }
            Err(reason) => {
                let failure = DeviceFailure {
                    n: outcome.plan.n,
                    id: outcome.plan.id,
                    reason,
                };
                self.failures.push(failure.clone());
                FleetEvent::Failed(failure)
            }
        })
    }

    /// Fails every device that never reported (its task panicked or was aborted).
    pub(super) fn account_for_lost(&mut self, join_error: Option<String>) -> Vec<FleetEvent> {
        let why = join_error.unwrap_or_else(|| "the device task panicked".to_string());
        let lost: Vec<DevicePlan> = self.plans.values().cloned().collect();
        lost.into_iter()
            .filter_map(|plan| {
                self.record(Outcome {
                    plan,
                    result: Err(FailureReason::Lost(why.clone())),
                    connect: None,
                    reconnects: 0,
                    resent: 0,
                })
            })
            .collect()
    }

    pub(super) fn finish(mut self, elapsed: Duration) -> FleetReport {
        self.failures.sort_by_key(|f| f.n);
        FleetReport {
            devices: self.devices,
            provisioned: self.provisioned,
            failed: self.failures.len() as u32,
            elapsed,
            latency: LatencySummary::from_histogram(&self.latency),
            connect: LatencySummary::from_histogram(&self.connect),
            json_devices: self.json,
            cbor_devices: self.cbor,
            own_csr_devices: self.own_csr,
            reconnects: self.reconnects,
            resent_requests: self.resent,
            failures: self.failures,
            telemetry: self.telemetry.map(|mut t| {
                t.per_device.sort_by_key(|d| d.n);
                TelemetryReport {
                    messages_per_device: t.messages_per_device,
                    devices: t.per_device.len() as u32,
                    published: t.per_device.iter().map(|d| d.published).sum(),
                    acked: t.per_device.iter().map(|d| d.acked).sum(),
                    reconnects: t.per_device.iter().map(|d| u64::from(d.reconnects)).sum(),
                    elapsed: match (t.first_publish, t.last_ack) {
                        (Some(first), Some(last)) => last.saturating_duration_since(first),
                        _ => Duration::ZERO,
                    },
                    per_device: t.per_device,
                }
            }),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}
