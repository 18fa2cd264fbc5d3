//! What a fleet run is to do, decided before any device connects: the options of a run
//! ([`FleetOptions`], with the telemetry phase in [`TelemetryPlan`]), what each device does
//! ([`DevicePlan`], which follows from its number alone, so runs are reproducible), how devices
//! attest ([`SimAttestation`]), and the provisioning request a device builds from its plan.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::admission::{sas, x509 as x509_attestation, Attestation};
use crate::clock;
use crate::device_id::{DeviceId, DeviceIdError};
use crate::downstream::contract::{self, PayloadFormat, ProvisionRequest};
use crate::downstream::TopicPrefix;
use crate::identity::{self, CertificateAuthority, IdentityError, KeyType, PrivateKey, Secret};

/// Largest packet a simulated device sends (the gateway's default `max_request_bytes`).
pub(super) const MAX_OUTGOING_PACKET: usize = 64 * 1024;
/// Validity of the SAS tokens devices present (the gateway caps it, default one year).
const SAS_TTL_SECS: i64 = 3600;
/// Validity of the X.509 attestation certificates the simulator issues to its devices.
const ATTESTATION_CERT_DAYS: u32 = 30;

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
    /// Check every this many devices' answers in full (1, the default, and 0: every device). A
    /// device's answer is always decoded and checked for its id, thing name, a parseable
    /// certificate and the key rules (a returned key exactly when the gateway made it, a
    /// certificate for the device's own key); the full check adds what costs CPU: parsing the
    /// returned private key and matching it to the certificate, and verifying the chain to
    /// [`Self::cloud_ca_pem`]. Devices 1, 1 + n, 1 + 2n, ... get it. `fleetgw bench
    /// provision` samples, so the fleet's verification does not take the CPU it measures.
    pub full_check_every: u32,
    /// Which cloud the gateway provisions into: decides what a valid answer holds.
    pub cloud: SimCloud,
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

/// The cloud behind the gateway, as `fleetgw simulate --cloud` names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SimCloud {
    /// AWS IoT: every answer carries a certificate (and a thing name).
    #[default]
    Aws,
    /// Azure DPS: every answer names the assigned hub with status `assigned`; a certificate
    /// only with X.509 attestation (symmetric-key devices get none).
    Azure,
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
            full_check_every: 1,
            cloud: SimCloud::Aws,
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
            full_check: n.saturating_sub(1) % self.full_check_every.max(1) == 0,
            format: if evenly_picked(self.cbor_share, k) {
                PayloadFormat::Cbor
            } else {
                PayloadFormat::Json
            },
            own_csr,
        })
    }

    /// Checks every option a run depends on, naming the option as spelled on the command line.
    pub(super) fn validate(&self) -> Result<(), SimError> {
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
    /// Its answer gets the full check ([`FleetOptions::full_check_every`]).
    pub full_check: bool,
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

/// Why a device's request could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub(super) struct PrepareError {
    /// What was being made: "device key", "CSR", "attestation signature", ...
    what: &'static str,
    /// The underlying identity error.
    #[source]
    source: IdentityError,
}

/// The request a device sends, and what it needs to check the answer.
pub(super) struct PreparedRequest {
    pub(super) payload: Vec<u8>,
    /// The device's own key when it sent a CSR.
    pub(super) own_key: Option<PrivateKey>,
}

/// Builds the request of the device of `plan`: its attestation, and its own key and CSR when
/// the plan says so.
pub(super) fn prepare_request(
    opts: &FleetOptions,
    plan: &DevicePlan,
) -> Result<PreparedRequest, PrepareError> {
    let prepare = |what: &'static str, source: IdentityError| PrepareError { what, source };
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
        payload: contract::encode(plan.format, &request),
        own_key,
    })
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
    fn the_full_check_samples_devices_1_then_every_nth() {
        let mut o = opts(25);
        assert!((1..=25).all(|n| o.plan(n).unwrap().full_check));
        o.full_check_every = 0;
        assert!((1..=25).all(|n| o.plan(n).unwrap().full_check));
        o.full_check_every = 10;
        let sampled: Vec<u32> = (1..=25)
            .filter(|&n| o.plan(n).unwrap().full_check)
            .collect();
        assert_eq!(sampled, [1, 11, 21]);
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
