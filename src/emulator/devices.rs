//! The simulated downstream device fleet: thousands of MQTT devices that provision themselves
//! through a gateway exactly as real sensors would, and check what they get back.
//!
//! Used by `fleetgw simulate` (its own process), `fleetgw demo` (in-process, next to the AWS
//! emulator and the daemon), the integration tests and the benchmarks. Each device:
//!
//! 1. connects to the gateway's local broker (client id = device id, optional TLS and
//!    username/password, `{id}` in either is replaced by the device id so per-device broker
//!    credentials work),
//! 2. subscribes to `{p}/{id}/provision/{fmt}/+` (`/accepted` and `/rejected`; with
//!    `watch_status` also `{p}/{id}/status`) and waits for the SUBACK (the gateway answers only
//!    once, so subscribing late loses the answer),
//! 3. publishes its request (JSON or CBOR; the gateway generates the key, or the device sends
//!    its own CSR; attestation none, symmetric key or X.509),
//! 4. verifies the answer: the certificate parses, carries the device's own key or the returned
//!    private key, chains to the cloud CA when one is given, and a thing name is present.
//!
//! A connection lost before the answer is re-established with jittered exponential back-off
//! and the request is re-published after re-subscribing: the gateway answers a repeated request
//! with the stored result, so a daemon restart in the middle of a run (the crash tests) only
//! delays devices. A `/rejected` answer with status 429 or 5xx is retried the same way; any
//! other rejection fails the device with the gateway's `errorCode` and message.
//!
//! Scale: one tokio task per device drives that device's rumqttc event loop directly (no extra
//! task, no OS thread per device); `max_in_flight` bounds how many devices are between connect
//! and answer at once, and `rate` paces how many start per second. Everything about a device
//! (id, payload format, own CSR or not) follows from its index, so runs are reproducible.
//! Each device subscribes to one filter (`/accepted` and `/rejected` together), as a careful
//! device would; the status topic is opt-in.
//!
//! The per-device loop is a small stage machine (connecting, subscribing, waiting for the
//! answer, publishing telemetry) on one connection. With [`FleetOptions::telemetry`] set, a
//! provisioned device waits for its retained status to say `provisioned` (the gateway records
//! the delivery only after answering, and refuses telemetry until then), then publishes
//! `messages_per_device` QoS 1 messages on
//! `{p}/{id}/telemetry`, paced by `rate`, at most `window` unacknowledged, each carrying its
//! sequence number and send time (the payload of [`telemetry_check::payload`]), so the cloud
//! side can be checked for loss, duplication and order with [`telemetry_check`]. Messages not
//! acknowledged when the connection drops are published again after the reconnect (clean
//! session: the broker forgets them), so the gateway may see duplicates but never a gap.
//! The `max_in_flight` slot of a device is freed once it is provisioned, so telemetry does
//! not hold back provisioning of the rest of the fleet.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde::Serialize;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::admission::{sas, x509 as x509_attestation, Attestation};
use crate::backoff::Backoff;
use crate::clock;
use crate::device_id::{DeviceId, DeviceIdError};
use crate::downstream::contract::{
    self as wire, AcceptedResponse, PayloadFormat, ProvisionRequest, RejectedResponse, StatusReport,
};
use crate::downstream::TopicPrefix;
use crate::identity::{self, CertificateAuthority, IdentityError, KeyType, PrivateKey, Secret};

use super::telemetry_check;

/// Largest packet a simulated device accepts (certificate + private key answers are ~3 KiB;
/// RSA chains more).
const MAX_INCOMING_PACKET: usize = 256 * 1024;
/// Largest packet a simulated device sends (the gateway's default `max_request_bytes`).
const MAX_OUTGOING_PACKET: usize = 64 * 1024;
/// MQTT keep-alive of a simulated device.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Longest a single TCP/TLS/MQTT connect may take before it counts as a failed attempt.
const CONNECT_TIMEOUT_SECS: u64 = 10;
/// First and largest pause between reconnect (or retry) attempts.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a device waits for its DISCONNECT to be written when it is done.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Validity of the SAS tokens devices present (the gateway caps it, default one year).
const SAS_TTL_SECS: i64 = 3600;
/// Validity of the X.509 attestation certificates the simulator issues to its devices.
const ATTESTATION_CERT_DAYS: u32 = 30;
/// Histogram range in microseconds: 1 µs to 1 hour, 3 significant digits.
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

/// How simulated devices prove who they are; the gateway's `[admission] mode` decides which
/// one it accepts.
#[derive(Clone, Default)]
pub enum SimAttestation {
    /// `{"type":"none"}`: admitted in `open` mode (or after an operator approves).
    #[default]
    None,
    /// A DPS-style SAS token made with the device key derived from the group key.
    SymmetricKey {
        /// The raw (base64-decoded) group key, the same one the gateway is configured with.
        group_key: Secret,
        /// The DPS ID scope placed in the token's resource URI.
        id_scope: String,
    },
    /// A certificate issued to each device by this CA (which the gateway trusts) and a fresh
    /// signature over the device id and a timestamp.
    X509 {
        /// The device-attestation CA.
        ca: Arc<CertificateAuthority>,
    },
}

impl fmt::Debug for SimAttestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimAttestation::None => f.write_str("None"),
            SimAttestation::SymmetricKey { id_scope, .. } => f
                .debug_struct("SymmetricKey")
                .field("id_scope", id_scope)
                .finish_non_exhaustive(),
            SimAttestation::X509 { .. } => f.write_str("X509"),
        }
    }
}

/// Everything a fleet run needs.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    /// Broker host name or IP address.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// CA certificate(s) of the broker's TLS server certificate; `Some` connects with TLS.
    pub broker_ca_pem: Option<String>,
    /// MQTT username; `{id}` is replaced by the device id.
    pub username: Option<String>,
    /// MQTT password; `{id}` is replaced by the device id.
    pub password: Option<Secret>,
    /// Topic prefix of the device contract (`[downstream] topic_prefix` of the gateway).
    pub topic_prefix: String,
    /// How many devices.
    pub devices: u32,
    /// First part of every device id: `{id_prefix}-{run}-{n}`.
    pub id_prefix: String,
    /// Run label, the middle of every device id; a new label gives a new set of devices.
    /// Repeating a label re-requests the same devices and the gateway answers with the stored
    /// results; own-CSR devices make a fresh key every run, so on a repeat they fail the key
    /// check, as a real device that lost its key would.
    pub run: String,
    /// Devices started per second; 0 starts them as fast as `max_in_flight` allows.
    pub rate: f64,
    /// Most devices between connect and verified answer at once.
    pub max_in_flight: usize,
    /// Share of devices (0 to 1) that send CBOR instead of JSON.
    pub cbor_share: f64,
    /// Share of devices (0 to 1) that send their own CSR instead of letting the gateway
    /// generate the key.
    pub own_csr_share: f64,
    /// Key type of the devices that make their own CSR.
    pub csr_key_type: KeyType,
    /// How devices attest.
    pub attestation: SimAttestation,
    /// RegisterThing parameters sent with every request (the gateway merges its defaults under
    /// them).
    pub parameters: BTreeMap<String, String>,
    /// The cloud's CA certificate(s); when given, every issued certificate must chain to it.
    pub cloud_ca_pem: Option<String>,
    /// Per device, from its first connect attempt to the verified answer.
    pub timeout: Duration,
    /// Also subscribe to the retained `{p}/{id}/status`, so a device that times out reports
    /// the gateway's last word about it (e.g. `waitingApproval`). Costs broker work at scale.
    pub watch_status: bool,
    /// Send the request again when no answer came this long after the last send (`None`:
    /// never). A request published before the gateway subscribed is otherwise lost; the
    /// gateway answers repeats idempotently.
    pub resend_after: Option<Duration>,
    /// The telemetry phase after provisioning (`None`: devices disconnect once provisioned).
    pub telemetry: Option<TelemetryPlan>,
}

/// What each provisioned device publishes in the telemetry phase.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryPlan {
    /// Messages per device, sequence numbers 0 to `messages_per_device - 1`.
    pub messages_per_device: u32,
    /// Messages per second per device; 0 sends as fast as the window allows.
    pub rate: f64,
    /// Payload size in bytes (padded JSON; never smaller than the bare `{"seq","t"}`).
    pub payload_bytes: usize,
    /// Most unacknowledged QoS 1 publishes per device.
    pub window: u16,
    /// Devices that sent their own CSR publish too. With the gateway's `telemetry.identity =
    /// "device"` they cannot: the gateway holds no key to connect upstream as them, and
    /// refuses their telemetry with a notice.
    pub own_csr_devices: bool,
    /// Per device, from the start of its phase (status wait included) to the last PUBACK.
    pub timeout: Duration,
    /// Wait for the retained `{p}/{id}/status` to say `provisioned` before publishing. The
    /// gateway answers on `/accepted` before it records the device as delivered, and until
    /// then it refuses (and drops, with a notice) the device's telemetry; `false` publishes
    /// right after `/accepted`, which exposes that window.
    pub await_status: bool,
    /// Start the phase only once every device of the fleet is provisioned (or failed), so
    /// the provisioning and telemetry figures do not mix; devices stay connected meanwhile.
    /// `false`: each device starts as soon as it is provisioned.
    pub after_fleet: bool,
}

impl Default for TelemetryPlan {
    fn default() -> Self {
        Self {
            messages_per_device: 20,
            rate: 0.0,
            payload_bytes: 200,
            window: 10,
            own_csr_devices: false,
            timeout: Duration::from_secs(120),
            await_status: true,
            after_fleet: true,
        }
    }
}

impl TelemetryPlan {
    /// Whether the device of `plan` publishes telemetry under this plan.
    pub fn publishes(&self, plan: &DevicePlan) -> bool {
        self.messages_per_device > 0 && (self.own_csr_devices || !plan.own_csr)
    }
}

impl FleetOptions {
    /// Options for `devices` devices against the plain-MQTT broker at `host:port`, with the
    /// defaults of `fleetgw simulate`.
    pub fn new(host: impl Into<String>, port: u16, devices: u32) -> Self {
        Self {
            host: host.into(),
            port,
            broker_ca_pem: None,
            username: None,
            password: None,
            topic_prefix: "fleetgw".to_string(),
            devices,
            id_prefix: "sim".to_string(),
            run: default_run_label(),
            rate: 0.0,
            max_in_flight: 500,
            cbor_share: 0.0,
            own_csr_share: 0.0,
            csr_key_type: KeyType::EcdsaP256,
            attestation: SimAttestation::None,
            parameters: BTreeMap::new(),
            cloud_ca_pem: None,
            timeout: Duration::from_secs(60),
            resend_after: Some(Duration::from_secs(15)),
            watch_status: false,
            telemetry: None,
        }
    }

    /// The id of device `n` (1-based): `{id_prefix}-{run}-{n}`, canonical form.
    pub fn device_id(&self, n: u32) -> Result<DeviceId, SimError> {
        let raw = format!("{}-{}-{n}", self.id_prefix, self.run);
        DeviceId::parse(&raw).map_err(|source| SimError::DeviceId { id: raw, source })
    }

    /// What device `n` (1-based) does. CBOR and own-CSR devices are spread evenly over the
    /// fleet and independently of each other, so with both shares at 0.5 every combination
    /// occurs about equally often.
    pub fn plan(&self, n: u32) -> Result<DevicePlan, SimError> {
        let id = self.device_id(n)?;
        let k = u64::from(n.saturating_sub(1));
        let total = u64::from(self.devices);
        // The own-CSR pick walks the fleet evens-first, so it does not line up with the CBOR
        // pick (which alternates at share 0.5).
        let interleaved = if k % 2 == 0 {
            k / 2
        } else {
            total.div_ceil(2) + k / 2
        };
        let own_csr = evenly_picked(self.own_csr_share, interleaved);
        if own_csr {
            identity::check_common_name(id.as_str()).map_err(|e| SimError::InvalidOption {
                option: "own-csr-share",
                reason: format!(
                    "device {id} cannot make a CSR: {e}; use a shorter --id-prefix or --run"
                ),
            })?;
        }
        Ok(DevicePlan {
            n,
            id,
            format: if evenly_picked(self.cbor_share, k) {
                PayloadFormat::Cbor
            } else {
                PayloadFormat::Json
            },
            own_csr,
        })
    }

    fn validate(&self) -> Result<(), SimError> {
        let invalid = |option, reason: String| Err(SimError::InvalidOption { option, reason });
        if self.devices == 0 {
            return invalid("devices", "must be at least 1".into());
        }
        for (option, share) in [
            ("cbor-share", self.cbor_share),
            ("own-csr-share", self.own_csr_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return invalid(option, format!("{share} is not a share between 0 and 1"));
            }
        }
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return invalid(
                "rate",
                format!("{} is not a number of devices per second >= 0", self.rate),
            );
        }
        if self.max_in_flight == 0 {
            return invalid("max-in-flight", "must be at least 1".into());
        }
        if self.timeout.is_zero() {
            return invalid("timeout", "must be at least 1 second".into());
        }
        if self.resend_after.is_some_and(|d| d.is_zero()) {
            return invalid("resend-secs", "must be at least 1 second (or never)".into());
        }
        if let Err(e) = TopicPrefix::new(&self.topic_prefix) {
            return invalid("prefix", e.to_string());
        }
        if let Some(password) = &self.password {
            if password.expose_str().is_none() {
                return invalid("password", "is not UTF-8 text".into());
            }
        }
        if let SimAttestation::SymmetricKey { group_key, .. } = &self.attestation {
            if group_key.is_empty() {
                return invalid("group-key", "is empty".into());
            }
        }
        if let Some(t) = &self.telemetry {
            if !(t.rate.is_finite() && t.rate >= 0.0) {
                return invalid(
                    "message-rate",
                    format!("{} is not a number of messages per second >= 0", t.rate),
                );
            }
            if t.window == 0 {
                return invalid("message-window", "must be at least 1".into());
            }
            if t.payload_bytes > MAX_OUTGOING_PACKET - 1024 {
                return invalid(
                    "payload-bytes",
                    format!(
                        "{} is larger than a simulated device sends ({} bytes)",
                        t.payload_bytes,
                        MAX_OUTGOING_PACKET - 1024
                    ),
                );
            }
            if t.timeout.is_zero() {
                return invalid("telemetry-timeout", "must be at least 1 second".into());
            }
        }
        Ok(())
    }
}

/// A run label from the clock (hex Unix seconds), so that consecutive runs against the same
/// gateway provision new devices instead of re-reading stored results.
pub fn default_run_label() -> String {
    format!("{:x}", clock::unix_secs())
}

/// `true` for about `share` of consecutive positions, evenly spread: position `k` is picked
/// when `floor((k + 1) * share)` steps past `floor(k * share)`.
fn evenly_picked(share: f64, k: u64) -> bool {
    ((k + 1) as f64 * share).floor() > (k as f64 * share).floor()
}

/// What one simulated device does, derived from its number alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    /// 1-based device number.
    pub n: u32,
    /// Device id (MQTT client id, CSR common name).
    pub id: DeviceId,
    /// Request and answer encoding.
    pub format: PayloadFormat,
    /// The device sends its own CSR (else the gateway generates its key).
    pub own_csr: bool,
}

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
    /// [`telemetry_check::fetch_arrivals`]) against what every device published; devices are
    /// looked up by thing name.
    pub fn check(
        &self,
        arrivals: &BTreeMap<String, Vec<telemetry_check::Arrival>>,
    ) -> telemetry_check::TelemetryCheck {
        let mut check = telemetry_check::TelemetryCheck::new();
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

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// An option is out of range.
    #[error("--{option}: {reason}")]
    InvalidOption {
        /// The option, as spelled on the command line.
        option: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `--id-prefix` / `--run` make an invalid device id.
    #[error("device id {id:?} (from --id-prefix and --run): {source}")]
    DeviceId {
        /// The id that was built.
        id: String,
        /// Why it is invalid.
        #[source]
        source: DeviceIdError,
    },
    /// The broker CA cannot be used for TLS.
    #[error("broker CA: {0}")]
    BrokerTls(#[source] IdentityError),
}

/// Runs the fleet: starts every device (paced by `rate`, at most `max_in_flight` at once),
/// calls `progress` once per device as it finishes (on the caller's task, in finishing order),
/// and returns the totals once every device is provisioned or has given up.
pub async fn run_fleet(
    opts: FleetOptions,
    progress: impl Fn(FleetEvent),
) -> Result<FleetReport, SimError> {
    opts.validate()?;
    let plans = (1..=opts.devices)
        .map(|n| opts.plan(n))
        .collect::<Result<Vec<_>, _>>()?;
    let tls = opts
        .broker_ca_pem
        .as_deref()
        .map(|ca| identity::tls::client_config(ca, None))
        .transpose()
        .map_err(SimError::BrokerTls)?;
    let mut tally = Tally::new(&plans, opts.telemetry.as_ref());
    let prefix = TopicPrefix::new(&opts.topic_prefix).map_err(|e| SimError::InvalidOption {
        option: "prefix",
        reason: e.to_string(),
    })?;
    let after_fleet = opts.telemetry.as_ref().is_some_and(|t| t.after_fleet);
    let (gate, telemetry_gate) = watch::channel(!after_fleet);
    let shared = Arc::new(Fleet {
        opts,
        prefix,
        tls,
        telemetry_gate,
    });

    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut spawner = AbortOnDrop(tokio::spawn(start_devices(shared, plans, tx)));
    while let Some(report) = rx.recv().await {
        let event = match report {
            DeviceReport::Provisioning(outcome) => {
                let event = tally.record(outcome);
                if tally.provisioning_done() {
                    tally.provisioning_elapsed.get_or_insert(started.elapsed());
                    gate.send_replace(true);
                }
                event
            }
            DeviceReport::Telemetry(done) => Some(tally.record_telemetry(done)),
        };
        if let Some(event) = event {
            progress(event);
        }
    }
    // Every sender is gone: all device tasks ended. A task that panicked sent nothing.
    let join_error = (&mut spawner.0).await.err().map(|e| e.to_string());
    for event in tally.account_for_lost(join_error) {
        progress(event);
    }
    let elapsed = tally
        .provisioning_elapsed
        .unwrap_or_else(|| started.elapsed());
    Ok(tally.finish(elapsed))
}

/// Aborts the spawner (and with its JoinSet, every device task) when a run is dropped midway.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What device tasks share.
struct Fleet {
    opts: FleetOptions,
    prefix: TopicPrefix,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// `true` once devices may start their telemetry phase.
    telemetry_gate: watch::Receiver<bool>,
}

/// What a device task reports.
struct Outcome {
    plan: DevicePlan,
    result: Result<Provisioned, FailureReason>,
    connect: Option<Duration>,
    reconnects: u32,
    resent: u32,
}

struct Provisioned {
    latency: Duration,
    thing_name: String,
}

/// What a device task sends: its provisioning outcome, then (if it publishes) its telemetry.
enum DeviceReport {
    Provisioning(Outcome),
    Telemetry(TelemetryDone),
}

struct TelemetryDone {
    device: DeviceTelemetry,
    first_publish: Option<Instant>,
    last_ack: Option<Instant>,
}

async fn start_devices(
    fleet: Arc<Fleet>,
    plans: Vec<DevicePlan>,
    tx: mpsc::UnboundedSender<DeviceReport>,
) {
    let in_flight = Arc::new(Semaphore::new(fleet.opts.max_in_flight));
    let rate = fleet.opts.rate;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for (k, plan) in plans.into_iter().enumerate() {
        if rate > 0.0 {
            tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
        }
        // The semaphore is never closed, so acquiring only fails if it were.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let fleet = fleet.clone();
        let tx = tx.clone();
        tasks.spawn(async move { run_device(&fleet, plan, permit, &tx).await });
        // Reap finished tasks as we go so a 100k-device run does not keep 100k join results.
        while tasks.try_join_next().is_some() {}
    }
    drop(tx);
    while tasks.join_next().await.is_some() {}
}

/// Counts outcomes and builds the report.
struct Tally {
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
    provisioning_elapsed: Option<Duration>,
}

struct TelemetryTally {
    messages_per_device: u32,
    per_device: Vec<DeviceTelemetry>,
    first_publish: Option<Instant>,
    last_ack: Option<Instant>,
}

impl Tally {
    fn new(plans: &[DevicePlan], telemetry: Option<&TelemetryPlan>) -> Self {
        let histogram = || {
            Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3)
                .expect("constant histogram bounds are valid")
        };
        let count = |f: &dyn Fn(&DevicePlan) -> bool| plans.iter().filter(|p| f(p)).count() as u32;
        Self {
            plans: plans.iter().map(|p| (p.n, p.clone())).collect(),
            provisioned: 0,
            failures: Vec::new(),
            latency: histogram(),
            connect: histogram(),
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
    fn provisioning_done(&self) -> bool {
        self.plans.is_empty()
    }

    fn record_telemetry(&mut self, done: TelemetryDone) -> FleetEvent {
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
    fn record(&mut self, outcome: Outcome) -> Option<FleetEvent> {
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
    fn account_for_lost(&mut self, join_error: Option<String>) -> Vec<FleetEvent> {
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

    fn finish(mut self, elapsed: Duration) -> FleetReport {
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

/// The request a device sends, and what it needs to check the answer.
struct PreparedRequest {
    payload: Vec<u8>,
    /// The device's own key when it sent a CSR.
    own_key: Option<PrivateKey>,
}

fn prepare_request(
    opts: &FleetOptions,
    plan: &DevicePlan,
) -> Result<PreparedRequest, FailureReason> {
    let prepare = |what: &str, e: IdentityError| FailureReason::Prepare(format!("{what}: {e}"));
    let now = clock::unix_secs();
    let attestation = match &opts.attestation {
        SimAttestation::None => Attestation::None,
        SimAttestation::SymmetricKey {
            group_key,
            id_scope,
        } => {
            let device_key = sas::derive_device_key(group_key.expose(), plan.id.as_str());
            Attestation::SymmetricKey {
                sas: sas::generate_sas(
                    &sas::registration_resource_uri(id_scope, &plan.id),
                    &device_key,
                    now + SAS_TTL_SECS,
                    Some(sas::REGISTRATION_KEY_NAME),
                ),
            }
        }
        SimAttestation::X509 { ca } => {
            let (certificate_pem, key) = ca
                .issue_client(plan.id.as_str(), KeyType::EcdsaP256, ATTESTATION_CERT_DAYS)
                .map_err(|e| prepare("attestation certificate", e))?;
            let signature = x509_attestation::sign_attestation(&plan.id, now, &key)
                .map_err(|e| prepare("attestation signature", e))?;
            Attestation::X509 {
                certificate_pem,
                signature,
                timestamp: now,
            }
        }
    };
    let (csr, own_key) = if plan.own_csr {
        let key = PrivateKey::generate(opts.csr_key_type).map_err(|e| prepare("device key", e))?;
        let csr = identity::create_csr(plan.id.as_str(), &key).map_err(|e| prepare("CSR", e))?;
        (Some(csr), Some(key))
    } else {
        (None, None)
    };
    let request = ProvisionRequest {
        csr,
        attestation,
        parameters: opts.parameters.clone(),
        payload: None,
    };
    Ok(PreparedRequest {
        payload: wire::encode(plan.format, &request),
        own_key,
    })
}

/// The topics of one device.
struct DeviceTopics {
    request: String,
    accepted: String,
    rejected: String,
    status: String,
    watch_status: bool,
}

impl DeviceTopics {
    fn new(prefix: &TopicPrefix, plan: &DevicePlan, watch_status: bool) -> Self {
        Self {
            request: prefix.provision_request(&plan.id, plan.format),
            accepted: prefix.accepted(&plan.id, plan.format),
            rejected: prefix.rejected(&plan.id, plan.format),
            status: prefix.status(&plan.id),
            watch_status,
        }
    }

    /// `{request}/+` covers `/accepted` and `/rejected` in one filter.
    fn filters(&self) -> Vec<SubscribeFilter> {
        let mut filters = vec![SubscribeFilter::new(
            format!("{}/+", self.request),
            QoS::AtLeastOnce,
        )];
        if self.watch_status {
            filters.push(SubscribeFilter::new(self.status.clone(), QoS::AtLeastOnce));
        }
        filters
    }
}

fn mqtt_options(fleet: &Fleet, plan: &DevicePlan) -> MqttOptions {
    let opts = &fleet.opts;
    let mut mqtt = MqttOptions::new(plan.id.as_str(), opts.host.clone(), opts.port);
    mqtt.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_inflight(opts.telemetry.as_ref().map_or(4, |t| t.window.max(4)))
        .set_request_channel_capacity(channel_capacity(fleet));
    if let Some(username) = &opts.username {
        let password = opts
            .password
            .as_ref()
            .and_then(Secret::expose_str)
            .map(|p| p.replace("{id}", plan.id.as_str()))
            .unwrap_or_default();
        mqtt.set_credentials(username.replace("{id}", plan.id.as_str()), password);
    }
    if let Some(tls) = &fleet.tls {
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.clone(),
        )));
    }
    mqtt
}

/// One device, start to finish: provisioning (reported as soon as it ends, and the
/// in-flight slot freed), then the telemetry phase when the plan asks for it.
async fn run_device(
    fleet: &Fleet,
    plan: DevicePlan,
    permit: OwnedSemaphorePermit,
    tx: &mpsc::UnboundedSender<DeviceReport>,
) {
    let started = Instant::now();
    let deadline = started + fleet.opts.timeout;
    let mut device = DeviceRun {
        started,
        deadline,
        timeout: fleet.opts.timeout,
        resend_after: fleet.opts.resend_after,
        stage: Stage::Connecting,
        connect: None,
        first_request: None,
        last_request: None,
        last_status: None,
        last_error: None,
        reconnects: 0,
        resent: 0,
        backoff: Backoff::new(BACKOFF_FIRST, BACKOFF_MAX),
    };
    // Key generation and signing are CPU work of a few hundred microseconds: fine on the task.
    let request = match prepare_request(&fleet.opts, &plan) {
        Ok(request) => request,
        Err(reason) => {
            drop(permit);
            // The receiver only goes away when the run itself was dropped.
            let _ = tx.send(DeviceReport::Provisioning(Outcome {
                plan,
                result: Err(reason),
                connect: None,
                reconnects: 0,
                resent: 0,
            }));
            return;
        }
    };
    let (client, mut eventloop) =
        AsyncClient::new(mqtt_options(fleet, &plan), channel_capacity(fleet));
    eventloop
        .network_options
        .set_connection_timeout(CONNECT_TIMEOUT_SECS);
    // Small requests and answers: no Nagle delay on either.
    eventloop.network_options.set_tcp_nodelay(true);
    let topics = DeviceTopics::new(&fleet.prefix, &plan, fleet.opts.watch_status);
    let result = device
        .provision(fleet, &plan, &topics, &request, &client, &mut eventloop)
        .await;
    drop(permit);
    let provisioning_reconnects = device.reconnects;
    let telemetry = match (&result, &fleet.opts.telemetry) {
        (Ok(done), Some(t)) if t.publishes(&plan) => Some((done.thing_name.clone(), t)),
        _ => None,
    };
    let _ = tx.send(DeviceReport::Provisioning(Outcome {
        plan: plan.clone(),
        result,
        connect: device.connect,
        reconnects: provisioning_reconnects,
        resent: device.resent,
    }));
    if let Some((thing_name, t)) = telemetry {
        let mut publisher = Publisher::new(t, fleet.telemetry_gate.clone(), gate_wait(&fleet.opts));
        let error = match fleet.prefix.telemetry(&plan.id, None) {
            Ok(topic) => device
                .telemetry(&mut publisher, &topic, &topics, &client, &mut eventloop)
                .await
                .err(),
            Err(e) => Some(FailureReason::Prepare(format!("telemetry topic: {e}"))),
        };
        let _ = tx.send(DeviceReport::Telemetry(TelemetryDone {
            device: DeviceTelemetry {
                n: plan.n,
                id: plan.id,
                thing_name,
                published: publisher.next,
                acked: publisher.acked,
                reconnects: device.reconnects - provisioning_reconnects,
                error,
            },
            first_publish: publisher.first_publish,
            last_ack: publisher.last_ack,
        }));
    }
    close(&client, &mut eventloop).await;
}

/// The longest a provisioned device may wait for the rest of the fleet before its telemetry
/// phase starts: the provisioning budget of every wave of `max_in_flight` devices, plus the
/// pacing of the starts.
fn gate_wait(opts: &FleetOptions) -> Duration {
    let pacing = if opts.rate > 0.0 {
        Duration::from_secs_f64(f64::from(opts.devices) / opts.rate)
    } else {
        Duration::ZERO
    };
    let waves = (opts.devices as usize).div_ceil(opts.max_in_flight.max(1));
    opts.timeout
        .saturating_mul(u32::try_from(waves).unwrap_or(u32::MAX))
        + pacing
}

/// Request channel size: room for a full telemetry window plus the DISCONNECT.
fn channel_capacity(fleet: &Fleet) -> usize {
    let window = fleet
        .opts
        .telemetry
        .as_ref()
        .map_or(0, |t| usize::from(t.window));
    window.max(4) + 1
}

/// The telemetry state of one device: which sequence numbers are where.
struct Publisher<'a> {
    plan: &'a TelemetryPlan,
    /// Next new sequence number (= distinct sequence numbers published so far).
    next: u64,
    /// When the next new sequence number is due (pacing).
    next_due: Instant,
    /// Handed to the client, not yet written (no packet id yet), in order.
    queued: VecDeque<u64>,
    /// Written, waiting for the PUBACK, by packet id.
    in_flight: HashMap<u16, u64>,
    /// Unacknowledged when the connection dropped: published again first, in order.
    resend: VecDeque<u64>,
    acked: u64,
    connected: bool,
    /// The gateway has recorded the device as provisioned (or the plan does not wait).
    ready: bool,
    /// The fleet-wide start signal came (see [`TelemetryPlan::after_fleet`]).
    gate_open: bool,
    /// The fleet-wide start signal.
    gate: watch::Receiver<bool>,
    /// The longest to wait for it.
    gate_wait: Duration,
    first_publish: Option<Instant>,
    last_ack: Option<Instant>,
}

impl<'a> Publisher<'a> {
    fn new(plan: &'a TelemetryPlan, gate: watch::Receiver<bool>, gate_wait: Duration) -> Self {
        Self {
            plan,
            next: 0,
            next_due: Instant::now(),
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            resend: VecDeque::new(),
            acked: 0,
            // The provisioning connection is up when telemetry starts.
            connected: true,
            ready: !plan.await_status,
            gate_open: false,
            gate,
            gate_wait,
            first_publish: None,
            last_ack: None,
        }
    }

    fn total(&self) -> u64 {
        u64::from(self.plan.messages_per_device)
    }

    fn outstanding(&self) -> usize {
        self.queued.len() + self.in_flight.len()
    }

    /// Hands the client as many messages as the window, the pacing and the channel allow.
    fn fill(&mut self, client: &AsyncClient, topic: &str) {
        while self.connected
            && self.ready
            && self.gate_open
            && self.outstanding() < usize::from(self.plan.window)
        {
            let now = Instant::now();
            let seq = match self.resend.front() {
                Some(&seq) => seq,
                None if self.next < self.total() && now >= self.next_due => self.next,
                None => break,
            };
            let payload = telemetry_check::payload(seq, clock::unix_ms(), self.plan.payload_bytes);
            match client.try_publish(topic, QoS::AtLeastOnce, false, payload) {
                Ok(()) => {}
                // The channel holds a full window; the event loop drains it.
                Err(_) => break,
            }
            self.first_publish.get_or_insert(now);
            self.queued.push_back(seq);
            if self.resend.front() == Some(&seq) {
                self.resend.pop_front();
            } else {
                self.next += 1;
                if self.plan.rate > 0.0 {
                    self.next_due += Duration::from_secs_f64(1.0 / self.plan.rate);
                }
            }
        }
    }

    /// When pacing, the moment the next new message is due (if the loop must wake for it).
    fn wake_for_pacing(&self) -> Option<Instant> {
        (self.plan.rate > 0.0
            && self.connected
            && self.ready
            && self.gate_open
            && self.resend.is_empty()
            && self.next < self.total()
            && self.outstanding() < usize::from(self.plan.window))
        .then_some(self.next_due)
    }

    /// The connection dropped: what was not acknowledged is lost with the clean session, so
    /// it is published again (in order) after the reconnect.
    fn connection_lost(&mut self) {
        self.connected = false;
        let mut unacked: Vec<u64> = self
            .in_flight
            .drain()
            .map(|(_, seq)| seq)
            .chain(self.queued.drain(..))
            .chain(self.resend.drain(..))
            .collect();
        unacked.sort_unstable();
        unacked.dedup();
        self.resend = unacked.into();
    }
}

/// The state of one device's run.
struct DeviceRun {
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    resend_after: Option<Duration>,
    stage: Stage,
    connect: Option<Duration>,
    first_request: Option<Instant>,
    last_request: Option<Instant>,
    last_status: Option<String>,
    last_error: Option<String>,
    reconnects: u32,
    resent: u32,
    backoff: Backoff,
}

impl DeviceRun {
    async fn provision(
        &mut self,
        fleet: &Fleet,
        plan: &DevicePlan,
        topics: &DeviceTopics,
        request: &PreparedRequest,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
    ) -> Result<Provisioned, FailureReason> {
        loop {
            let wake = match (self.stage, self.resend_after, self.last_request) {
                (Stage::WaitingForAnswer, Some(every), Some(sent)) => {
                    (sent + every).min(self.deadline)
                }
                _ => self.deadline,
            };
            // Cancelling `poll` is safe here: it only ever waits (Pending) for incoming bytes,
            // which it reads into its buffer; the small writes to a local socket complete
            // without waiting.
            let event = match tokio::time::timeout_at(wake, eventloop.poll()).await {
                Err(_) if wake < self.deadline => {
                    self.send_request(client, topics, request)?;
                    continue;
                }
                Err(_) => return Err(self.timed_out()),
                Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                    return Err(FailureReason::ConnectionRefused(format!("{code:?}")))
                }
                Ok(Err(e)) => {
                    // Polling again reconnects; pause first so a down broker is not hammered.
                    self.last_error = Some(e.to_string());
                    self.reconnects += 1;
                    self.stage = Stage::Connecting;
                    self.pause().await?;
                    continue;
                }
                Ok(Ok(event)) => event,
            };
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    // Clean session: subscriptions never survive a reconnect, so subscribe on
                    // every CONNACK and (re)send the request only after the SUBACK.
                    client
                        .try_subscribe_many(topics.filters())
                        .map_err(|e| FailureReason::Prepare(format!("subscribe: {e}")))?;
                    self.stage = Stage::Subscribing;
                    self.backoff.reset();
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    if let Some(i) = ack
                        .return_codes
                        .iter()
                        .position(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        let topic = topics.filters().get(i).map(|f| f.path.clone());
                        return Err(FailureReason::SubscribeRefused {
                            topic: topic.unwrap_or_default(),
                        });
                    }
                    if self.stage == Stage::Subscribing {
                        self.connect.get_or_insert_with(|| self.started.elapsed());
                        self.send_request(client, topics, request)?;
                    }
                }
                Event::Incoming(Packet::Publish(publish)) => {
                    if publish.topic == topics.accepted {
                        let latency = self.first_request.map(|t| t.elapsed()).unwrap_or_default();
                        let thing_name = verify_answer(fleet, plan, request, &publish.payload)
                            .map_err(|reason| match reason {
                                FailureReason::InvalidAnswer { reason, .. } => {
                                    FailureReason::InvalidAnswer {
                                        topic: publish.topic.clone(),
                                        reason,
                                    }
                                }
                                other => other,
                            })?;
                        return Ok(Provisioned {
                            latency,
                            thing_name,
                        });
                    } else if publish.topic == topics.rejected {
                        let rejected: RejectedResponse =
                            wire::decode(plan.format, &publish.payload).map_err(|e| {
                                FailureReason::InvalidAnswer {
                                    topic: publish.topic.clone(),
                                    reason: e.to_string(),
                                }
                            })?;
                        if rejected.status_code == 429 || rejected.status_code >= 500 {
                            self.last_error = Some(format!(
                                "{} {}: {}",
                                rejected.status_code, rejected.error_code, rejected.error_message
                            ));
                            self.pause().await?;
                            self.send_request(client, topics, request)?;
                        } else {
                            return Err(FailureReason::Rejected {
                                status_code: rejected.status_code,
                                error_code: rejected.error_code,
                                error_message: rejected.error_message,
                            });
                        }
                    } else if publish.topic == topics.status {
                        self.last_status = Some(
                            wire::decode::<StatusReport>(PayloadFormat::Json, &publish.payload)
                                .map(|s| s.status.as_str().to_string())
                                .unwrap_or_else(|_| {
                                    String::from_utf8_lossy(&publish.payload).into_owned()
                                }),
                        );
                    }
                }
                _ => {}
            }
        }
    }

    /// The telemetry phase on the provisioning connection: publishes every message and waits
    /// for every PUBACK, reconnecting (and republishing what was unacknowledged) as needed.
    async fn telemetry(
        &mut self,
        publisher: &mut Publisher<'_>,
        topic: &str,
        topics: &DeviceTopics,
        client: &AsyncClient,
        eventloop: &mut EventLoop,
    ) -> Result<(), FailureReason> {
        self.stage = Stage::Telemetry;
        self.timeout = publisher.plan.timeout;
        // Until the fleet-wide start, the budget also covers the rest of the fleet's
        // provisioning; it starts afresh when the gate opens.
        let mut gate = publisher.gate.clone();
        publisher.gate_open = *gate.borrow_and_update();
        self.deadline = Instant::now()
            + publisher.plan.timeout
            + if publisher.gate_open {
                Duration::ZERO
            } else {
                publisher.gate_wait
            };
        self.backoff.reset();
        publisher.next_due = Instant::now();
        let subscribe_status = || {
            client
                .try_subscribe(topics.status.clone(), QoS::AtLeastOnce)
                .map_err(|e| FailureReason::Prepare(format!("subscribe: {e}")))
        };
        if !publisher.ready {
            subscribe_status()?;
        }
        while publisher.acked < publisher.total() {
            publisher.fill(client, topic);
            let wake = publisher
                .wake_for_pacing()
                .map_or(self.deadline, |due| due.min(self.deadline));
            let polled = tokio::select! {
                // A closed channel means the run is gone: nothing to wait for.
                _ = gate.wait_for(|open| *open), if !publisher.gate_open => {
                    publisher.gate_open = true;
                    publisher.next_due = Instant::now();
                    self.deadline = Instant::now() + publisher.plan.timeout;
                    continue;
                }
                polled = tokio::time::timeout_at(wake, eventloop.poll()) => polled,
            };
            let event = match polled {
                Err(_) if wake < self.deadline => continue,
                Err(_) => return Err(self.timed_out()),
                Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                    return Err(FailureReason::ConnectionRefused(format!("{code:?}")))
                }
                Ok(Err(e)) => {
                    self.last_error = Some(e.to_string());
                    self.reconnects += 1;
                    publisher.connection_lost();
                    self.pause().await?;
                    continue;
                }
                Ok(Ok(event)) => event,
            };
            match event {
                Event::Incoming(Packet::ConnAck(_)) => {
                    publisher.connected = true;
                    self.backoff.reset();
                    if !publisher.ready {
                        subscribe_status()?;
                    }
                }
                Event::Incoming(Packet::Publish(publish)) if publish.topic == topics.status => {
                    let Ok(report) =
                        wire::decode::<StatusReport>(PayloadFormat::Json, &publish.payload)
                    else {
                        continue;
                    };
                    let status = report.status.as_str();
                    self.last_status = Some(status.to_string());
                    match status {
                        "provisioned" if !publisher.ready => {
                            publisher.ready = true;
                            publisher.next_due = Instant::now();
                        }
                        "failed" | "blocked" => {
                            return Err(FailureReason::NotProvisioned(status.to_string()))
                        }
                        _ => {}
                    }
                }
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    if let Some(seq) = publisher.queued.pop_front() {
                        publisher.in_flight.insert(pkid, seq);
                    }
                }
                Event::Incoming(Packet::PubAck(ack))
                    if publisher.in_flight.remove(&ack.pkid).is_some() =>
                {
                    publisher.acked += 1;
                    publisher.last_ack = Some(Instant::now());
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn send_request(
        &mut self,
        client: &AsyncClient,
        topics: &DeviceTopics,
        request: &PreparedRequest,
    ) -> Result<(), FailureReason> {
        client
            .try_publish(
                topics.request.clone(),
                QoS::AtLeastOnce,
                false,
                request.payload.clone(),
            )
            .map_err(|e| FailureReason::Prepare(format!("publish: {e}")))?;
        let now = Instant::now();
        if self.first_request.is_some() {
            self.resent += 1;
        } else {
            self.first_request = Some(now);
        }
        self.last_request = Some(now);
        self.stage = Stage::WaitingForAnswer;
        Ok(())
    }

    /// Sleeps the current back-off (jittered, doubling up to a cap), or fails with a timeout
    /// when the deadline comes first.
    async fn pause(&mut self) -> Result<(), FailureReason> {
        let jittered = self.backoff.next_delay();
        if Instant::now() + jittered >= self.deadline {
            tokio::time::sleep_until(self.deadline).await;
            return Err(self.timed_out());
        }
        tokio::time::sleep(jittered).await;
        Ok(())
    }

    fn timed_out(&self) -> FailureReason {
        FailureReason::Timeout {
            timeout: self.timeout,
            stage: self.stage,
            last_status: self.last_status.clone(),
            last_error: self.last_error.clone(),
        }
    }
}

/// Checks an `/accepted` answer; returns the thing name.
fn verify_answer(
    fleet: &Fleet,
    plan: &DevicePlan,
    request: &PreparedRequest,
    payload: &[u8],
) -> Result<String, FailureReason> {
    let answer: AcceptedResponse =
        wire::decode(plan.format, payload).map_err(|e| FailureReason::InvalidAnswer {
            topic: String::new(),
            reason: e.to_string(),
        })?;
    if answer.device_id != plan.id {
        return Err(FailureReason::WrongDevice {
            got: answer.device_id.to_string(),
        });
    }
    if answer.thing_name.is_empty() {
        return Err(FailureReason::MissingThingName);
    }
    let certificate = |e: IdentityError| FailureReason::Certificate(e.to_string());
    identity::parse_certificates(&answer.certificate_pem).map_err(certificate)?;
    let matches = match (&request.own_key, &answer.private_key) {
        (Some(_), Some(_)) => return Err(FailureReason::UnexpectedPrivateKey),
        (None, None) => return Err(FailureReason::MissingPrivateKey),
        (Some(own), None) => identity::cert_matches_key(&answer.certificate_pem, own)
            .map_err(certificate)?
            .then_some(())
            .ok_or(FailureReason::KeyMismatch("the device's own key")),
        (None, Some(pem)) => {
            let key = PrivateKey::from_pem(pem).map_err(certificate)?;
            identity::cert_matches_key(&answer.certificate_pem, &key)
                .map_err(certificate)?
                .then_some(())
                .ok_or(FailureReason::KeyMismatch("the returned private key"))
        }
    };
    matches?;
    if let Some(ca) = &fleet.opts.cloud_ca_pem {
        identity::verify_chain(&answer.certificate_pem, ca, clock::unix_secs())
            .map_err(|e| FailureReason::Chain(e.to_string()))?;
    }
    Ok(answer.thing_name)
}

/// Sends DISCONNECT so the broker does not log a dropped connection per device.
async fn close(client: &AsyncClient, eventloop: &mut EventLoop) {
    if eventloop.network.is_none() || client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(devices: u32) -> FleetOptions {
        let mut o = FleetOptions::new("127.0.0.1", 1883, devices);
        o.run = "r1".into();
        o
    }

    #[test]
    fn device_ids_are_deterministic_and_canonical() {
        let mut o = opts(3);
        o.id_prefix = "Line-A".into();
        assert_eq!(o.device_id(1).unwrap().as_str(), "line-a-r1-1");
        assert_eq!(o.plan(3).unwrap().id.as_str(), "line-a-r1-3");
        assert_eq!(o.plan(2).unwrap(), o.plan(2).unwrap());
        o.run = "bad/run".into();
        let err = o.device_id(1).unwrap_err();
        assert!(err.to_string().contains("bad/run-1"), "{err}");
    }

    #[test]
    fn shares_give_exact_counts_and_every_combination() {
        for (devices, cbor, own) in [
            (1000, 0.5, 0.5),
            (1000, 0.3, 0.7),
            (7, 0.0, 1.0),
            (10, 1.0, 0.0),
        ] {
            let mut o = opts(devices);
            o.cbor_share = cbor;
            o.own_csr_share = own;
            let plans: Vec<_> = (1..=devices).map(|n| o.plan(n).unwrap()).collect();
            let cbor_count = plans
                .iter()
                .filter(|p| p.format == PayloadFormat::Cbor)
                .count();
            let own_count = plans.iter().filter(|p| p.own_csr).count();
            assert_eq!(
                cbor_count,
                (f64::from(devices) * cbor).floor() as usize,
                "{cbor}"
            );
            assert_eq!(
                own_count,
                (f64::from(devices) * own).floor() as usize,
                "{own}"
            );
        }
        let mut o = opts(1000);
        o.cbor_share = 0.5;
        o.own_csr_share = 0.5;
        let both = (1..=1000)
            .map(|n| o.plan(n).unwrap())
            .filter(|p| p.format == PayloadFormat::Cbor && p.own_csr)
            .count();
        assert_eq!(both, 250);
    }

    #[test]
    fn invalid_options_name_the_option() {
        type Breaker = fn(&mut FleetOptions);
        let cases: [(&str, Breaker); 6] = [
            ("--devices", |o| o.devices = 0),
            ("--cbor-share", |o| o.cbor_share = 1.5),
            ("--own-csr-share", |o| o.own_csr_share = -0.1),
            ("--rate", |o| o.rate = f64::NAN),
            ("--max-in-flight", |o| o.max_in_flight = 0),
            ("--prefix", |o| o.topic_prefix = "a/+/b".into()),
        ];
        for (option, break_it) in cases {
            let mut o = opts(10);
            break_it(&mut o);
            let err = o.validate().unwrap_err();
            assert!(err.to_string().starts_with(option), "{option}: {err}");
        }
        opts(10).validate().unwrap();
    }

    #[test]
    fn own_csr_ids_must_fit_a_common_name() {
        let mut o = opts(1);
        o.id_prefix = "x".repeat(60);
        o.plan(1).unwrap();
        o.own_csr_share = 1.0;
        let err = o.plan(1).unwrap_err();
        assert!(err.to_string().contains("common name"), "{err}");
    }
}
