//! The versioned records kept in the store's trees.
//!
//! Every record carries its own version `v` so that a later release can read (and migrate) what
//! an earlier one wrote; new fields are added with `#[serde(default)]`.
//!
//! Encoding: serde_json. Measured here on a 220-byte `DeviceRecord` round trip (debug build of
//! this crate): serde_json 71 µs / 223 bytes, ciborium 63 µs / 174 bytes; both are small next to
//! an fsync, published optimized-build comparisons (rust_serialization_benchmark) put serde_json
//! ahead of ciborium, and a JSON record can be read by a human when a field goes wrong. Outbox
//! messages, whose payloads are opaque bytes of any size, use a small length-prefixed binary
//! layout instead (see [`OutboxMessage::encode`]): JSON would turn bytes into number arrays.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::device_id::DeviceId;

/// Current version of [`DeviceRecord`].
pub const DEVICE_RECORD_VERSION: u32 = 1;
/// Current version of [`OwnershipTokenRecord`].
pub const TOKEN_RECORD_VERSION: u32 = 1;
/// Current version of the outbox message layout (2: with properties; a message without any is
/// still written as 1, which every release reads).
pub const OUTBOX_MESSAGE_VERSION: u8 = 2;

/// A cloud or gateway error kept with a device (shown by the admin API).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// HTTP-like status code (AWS `statusCode`, 4xx permanent, 5xx/429 transient).
    pub status_code: u16,
    /// Machine-readable code, e.g. `InvalidCSR` or `Throttling`.
    pub error_code: String,
    /// Human-readable explanation.
    pub error_message: String,
}

/// An AWS certificate ownership token: a bearer credential for RegisterThing, so its Debug
/// output is redacted. Serialized as a plain string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OwnershipToken(String);

impl OwnershipToken {
    /// Wraps a token received from the cloud.
    pub fn new(token: impl Into<String>) -> Self {
        OwnershipToken(token.into())
    }

    /// The token itself, for sending it back to the cloud.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for OwnershipToken {
    fn from(s: String) -> Self {
        OwnershipToken(s)
    }
}

impl From<&str> for OwnershipToken {
    fn from(s: &str) -> Self {
        OwnershipToken(s.to_owned())
    }
}

impl fmt::Debug for OwnershipToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a device is in the provisioning state machine (docs/architecture.md, "Provisioning state machine"). Every transition is
/// persisted before the engine acts on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "camelCase")]
pub enum DeviceState {
    /// A provisioning request was received and admitted for processing.
    Requested,
    /// Waiting for an operator to approve the device.
    WaitingApproval,
    /// Approved (by an operator or the admission policy); key/CSR not prepared yet.
    Approved,
    /// The CSR to send is ready: the device's own CSR, or one made from a gateway-generated
    /// key (the key itself lives in the `secrets` tree).
    KeyReady {
        /// The CSR the device sent, when it brought its own key.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        own_csr: Option<String>,
        /// The CSR that is sent to the cloud.
        csr: String,
    },
    /// A certificate was issued (by the cloud for AWS, by the gateway's enrollment-group CA
    /// for Azure X.509); the registration still has to be made.
    CertificateIssued {
        /// Certificate id (the cloud's, or the issued certificate's SHA-256 fingerprint).
        certificate_id: String,
        /// Issued certificate (PEM).
        certificate_pem: String,
        /// Ownership token for RegisterThing (AWS); `None` where the cloud uses none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ownership_token: Option<OwnershipToken>,
        /// When the token expires (unix milliseconds); past it the device goes back to
        /// KeyReady.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_expires_at_ms: Option<u64>,
    },
    /// The cloud took the registration and is still working on it (Azure DPS `assigning`):
    /// persisted before the first poll, so a restart polls this operation instead of
    /// registering again.
    Registering {
        /// The operation to poll.
        operation_id: String,
        /// The wait the cloud asked for before the next poll (milliseconds).
        #[serde(default)]
        retry_after_ms: u64,
    },
    /// The device exists in the cloud; the answer is not yet delivered to the device. Records
    /// written before Azure support say `thingRegistered` with `thing_name` and
    /// `device_configuration`; they read as this state.
    #[serde(alias = "thingRegistered")]
    Registered {
        /// The cloud's name for the device: the AWS thing name, the IoT Hub device id.
        #[serde(alias = "thing_name")]
        cloud_id: String,
        /// Where the device's telemetry goes when the cloud chose it (Azure `assignedHub`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// What the registration returned besides (AWS `deviceConfiguration`).
        #[serde(default, alias = "device_configuration")]
        extras: BTreeMap<String, String>,
    },
    /// The result was published to the device and acknowledged: provisioned.
    Delivered,
    /// The last attempt failed; retried at `next_attempt_at_ms` unless `None` (permanent).
    Failed {
        /// What went wrong.
        error: ErrorInfo,
        /// When to try again (unix milliseconds), `None` for a permanent failure.
        #[serde(default)]
        next_attempt_at_ms: Option<u64>,
    },
    /// Blocked by an operator: requests are refused.
    Blocked,
}

impl DeviceState {
    /// The ownership token this state carries, if any: the store seals it at rest.
    pub(crate) fn ownership_token_mut(&mut self) -> Option<&mut OwnershipToken> {
        match self {
            DeviceState::CertificateIssued {
                ownership_token, ..
            } => ownership_token.as_mut(),
            _ => None,
        }
    }

    /// Whether the state carries an ownership token (that the store seals at rest).
    pub(crate) fn has_ownership_token(&self) -> bool {
        matches!(
            self,
            DeviceState::CertificateIssued {
                ownership_token: Some(_),
                ..
            }
        )
    }

    /// The state's name as stored and shown (`"keyReady"`, `"delivered"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Requested => "requested",
            DeviceState::WaitingApproval => "waitingApproval",
            DeviceState::Approved => "approved",
            DeviceState::KeyReady { .. } => "keyReady",
            DeviceState::CertificateIssued { .. } => "certificateIssued",
            DeviceState::Registering { .. } => "registering",
            DeviceState::Registered { .. } => "registered",
            DeviceState::Delivered => "delivered",
            DeviceState::Failed { .. } => "failed",
            DeviceState::Blocked => "blocked",
        }
    }
}

/// One downstream device and its provisioning progress (tree `devices`, key = device id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Record layout version ([`DEVICE_RECORD_VERSION`] when written by this build).
    pub v: u32,
    /// Entity tag, bumped by the store on every write (admin `ETag`, compare-and-swap).
    /// Declared second so the JSON starts `{"v":1,"etag":7,`: the etag checks of every
    /// provisioning step read it there without scanning the record (`codec::stored_etag`).
    pub etag: u64,
    /// The device id (also the key).
    pub id: DeviceId,
    /// Provisioning state. Flattened, so the JSON reads `{"state":"keyReady","csr":..,"etag":..}`;
    /// variant fields must therefore not reuse a record field name.
    #[serde(flatten)]
    pub state: DeviceState,
    /// Creation time, unix milliseconds.
    pub created_at_ms: u64,
    /// Last update time, unix milliseconds.
    pub updated_at_ms: u64,
    /// Payload format the device speaks: `"json"` or `"cbor"`.
    pub format: String,
    /// Provisioning attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// The most recent error, kept after a retry succeeds for diagnosis.
    #[serde(default)]
    pub last_error: Option<ErrorInfo>,
    /// Disabled devices may not send telemetry.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// What the provisioning engine keeps besides the state: the request and the cloud's result.
    #[serde(default)]
    pub provision: ProvisionData,
    /// A name an operator gave the device (admin API `displayName`); absent in records
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// The provisioning request and result of a device, kept across states: the request's
/// parameters and CSR are needed again after a restart or an expired ownership token, the
/// result answers repeated requests and identifies the device upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionData {
    /// The gateway generated the device's key (kept in the `secrets` tree).
    #[serde(default)]
    pub gateway_key: bool,
    /// The CSR the device sent, when it brought its own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_csr: Option<String>,
    /// The CSR sent to the cloud (reused when a new certificate is needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    /// RegisterThing parameters: the request's over the configured defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// Cloud certificate id, once issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
    /// The issued certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
    /// The cloud's name for the device once registered: the AWS thing name, the IoT Hub
    /// device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_name: Option<String>,
    /// Where the device's telemetry goes when the cloud chose it (Azure `assignedHub`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// `deviceConfiguration` returned by the registration.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub device_configuration: BTreeMap<String, String>,
}

fn default_true() -> bool {
    true
}

impl DeviceRecord {
    /// A fresh record in state `Requested`, created and updated at `now_ms`.
    pub fn new(id: DeviceId, format: impl Into<String>, now_ms: u64) -> Self {
        DeviceRecord {
            v: DEVICE_RECORD_VERSION,
            id,
            state: DeviceState::Requested,
            etag: 0,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            format: format.into(),
            attempts: 0,
            last_error: None,
            enabled: true,
            provision: ProvisionData::default(),
            display_name: None,
        }
    }
}

/// An ownership token kept apart from the device record (tree `tokens`, key = device id), so
/// that a restart can resume RegisterThing and expired tokens can be found without decoding
/// every device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipTokenRecord {
    /// Record layout version.
    pub v: u32,
    /// The device the token belongs to.
    pub device: DeviceId,
    /// The certificate the token was issued with.
    pub certificate_id: String,
    /// The token.
    pub token: OwnershipToken,
    /// Expiry, unix milliseconds.
    pub expires_at_ms: u64,
}

/// One telemetry message waiting to go upstream (tree `outbox`, key = big-endian sequence).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMessage {
    /// The device that sent it.
    pub device: DeviceId,
    /// Sub-topic after `fleetgw/{id}/telemetry` (may be empty).
    pub topic: String,
    /// The payload, untouched.
    pub payload: Vec<u8>,
    /// QoS the device used (0 or 1).
    pub qos: u8,
    /// When the gateway accepted it, unix milliseconds (for `max_age`).
    pub enqueued_at_ms: u64,
    /// Name-value pairs that travel with the message where the cloud keeps them: the device's
    /// MQTT 5 user properties, and `$.ct` (content type), `$.cid` (correlation data, when
    /// UTF-8; other bytes base64 as `$.cidb64`) and `$.ce` (`utf-8` for a payload marked UTF-8).
    pub properties: Vec<(String, String)>,
}

/// Why an outbox value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutboxDecodeError {
    /// The value ends before a field it announces.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// Written by a newer release.
    #[error("layout version {0} is newer than this build understands ({OUTBOX_MESSAGE_VERSION})")]
    NewerVersion(u8),
    /// The topic is not UTF-8.
    #[error("topic is not UTF-8")]
    Topic,
    /// A property name or value is not UTF-8.
    #[error("a property is not UTF-8")]
    Property,
    /// The device id does not validate.
    #[error("device id: {0}")]
    Device(String),
}

impl OutboxMessage {
    /// Layout: version u8, enqueued_at_ms u64 BE, qos u8, id length u16 BE, id, topic length
    /// u32 BE, topic, [version 2: property count u16 BE, then per property name length u16 BE,
    /// name, value length u32 BE, value], payload (the rest). Fixed-width fields keep encoding
    /// free of allocation beyond the output buffer and avoid JSON's number-array blow-up of
    /// binary payloads.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode_into(&mut out);
        out
    }

    /// Exact length of [`OutboxMessage::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let props: usize = self
            .properties
            .iter()
            .take(usize::from(u16::MAX))
            .map(|(k, v)| 6 + k.len().min(usize::from(u16::MAX)) + v.len())
            .sum();
        let props = if self.properties.is_empty() {
            0
        } else {
            2 + props
        };
        1 + 8
            + 1
            + 2
            + self.device.as_str().len()
            + 4
            + self.topic.len()
            + props
            + self.payload.len()
    }

    /// Appends [`OutboxMessage::encode`]'s output to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let id = self.device.as_str().as_bytes();
        let topic = self.topic.as_bytes();
        // Properties are bounded by the MQTT packet (at most 65535 pairs, names under 64 KiB).
        let with_properties = !self.properties.is_empty();
        out.push(if with_properties { 2 } else { 1 });
        out.extend_from_slice(&self.enqueued_at_ms.to_be_bytes());
        out.push(self.qos);
        // Device ids are at most 128 bytes (DeviceId invariant), topics are bounded by MQTT.
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&(topic.len() as u32).to_be_bytes());
        out.extend_from_slice(topic);
        if with_properties {
            let n = self.properties.len().min(usize::from(u16::MAX));
            out.extend_from_slice(&(n as u16).to_be_bytes());
            for (k, v) in self.properties.iter().take(n) {
                let k = &k.as_bytes()[..k.len().min(usize::from(u16::MAX))];
                out.extend_from_slice(&(k.len() as u16).to_be_bytes());
                out.extend_from_slice(k);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v.as_bytes());
            }
        }
        out.extend_from_slice(&self.payload);
    }

    /// Reverse of [`OutboxMessage::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, OutboxDecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.take(1)?[0];
        if version > OUTBOX_MESSAGE_VERSION {
            return Err(OutboxDecodeError::NewerVersion(version));
        }
        let enqueued_at_ms = u64::from_be_bytes(fixed(r.take(8)?));
        let qos = r.take(1)?[0];
        let id_len = u16::from_be_bytes(fixed(r.take(2)?)) as usize;
        let id = std::str::from_utf8(r.take(id_len)?)
            .map_err(|_| OutboxDecodeError::Device("not UTF-8".into()))?;
        let device = DeviceId::parse(id).map_err(|e| OutboxDecodeError::Device(e.to_string()))?;
        let topic_len = u32::from_be_bytes(fixed(r.take(4)?)) as usize;
        let topic = std::str::from_utf8(r.take(topic_len)?)
            .map_err(|_| OutboxDecodeError::Topic)?
            .to_owned();
        let mut properties = Vec::new();
        if version >= 2 {
            let n = u16::from_be_bytes(fixed(r.take(2)?));
            for _ in 0..n {
                let k_len = u16::from_be_bytes(fixed(r.take(2)?)) as usize;
                let k =
                    std::str::from_utf8(r.take(k_len)?).map_err(|_| OutboxDecodeError::Property)?;
                let v_len = u32::from_be_bytes(fixed(r.take(4)?)) as usize;
                let v =
                    std::str::from_utf8(r.take(v_len)?).map_err(|_| OutboxDecodeError::Property)?;
                properties.push((k.to_owned(), v.to_owned()));
            }
        }
        let payload = bytes[r.pos..].to_vec();
        Ok(OutboxMessage {
            device,
            topic,
            payload,
            qos,
            enqueued_at_ms,
            properties,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OutboxDecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(OutboxDecodeError::Truncated(self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
}

fn fixed<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).unwrap()
    }

    #[test]
    fn device_record_json_shape_is_tagged_by_state() {
        let mut rec = DeviceRecord::new(id("Sensor-1"), "json", 5);
        rec.state = DeviceState::CertificateIssued {
            certificate_id: "c1".into(),
            certificate_pem: "PEM".into(),
            ownership_token: Some("tok".into()),
            token_expires_at_ms: Some(9),
        };
        let v: serde_json::Value = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["state"], "certificateIssued");
        assert_eq!(v["ownership_token"], "tok");
        assert_eq!(v["id"], "sensor-1");
        let back: DeviceRecord = serde_json::from_value(v).unwrap();
        assert_eq!(back, rec);
        assert!(
            !format!("{rec:?}").contains("tok\""),
            "token must be redacted in Debug"
        );
    }

    /// Records written before the provider-neutral states (AWS-only releases) keep reading:
    /// `thingRegistered` with `thing_name`/`device_configuration`, and `certificateIssued`
    /// with a plain token and expiry.
    #[test]
    fn records_written_by_the_aws_only_releases_still_read() {
        let registered = br#"{"v":1,"id":"sensor-1","state":"thingRegistered","thing_name":"thing-9","device_configuration":{"fw":"2"},"etag":4,"created_at_ms":1,"updated_at_ms":2,"format":"json","enabled":true,"attempts":0,"provision":{"gatewayKey":true,"csr":"CSR","certificateId":"c1","certificatePem":"PEM","thingName":"thing-9"}}"#;
        let rec: DeviceRecord = serde_json::from_slice(registered).unwrap();
        assert_eq!(
            rec.state,
            DeviceState::Registered {
                cloud_id: "thing-9".into(),
                endpoint: None,
                extras: BTreeMap::from([("fw".to_string(), "2".to_string())]),
            }
        );
        assert_eq!(rec.state.name(), "registered");
        assert_eq!(rec.provision.thing_name.as_deref(), Some("thing-9"));
        assert_eq!(rec.provision.endpoint, None);

        let issued = br#"{"v":1,"id":"sensor-2","state":"certificateIssued","certificate_id":"c2","certificate_pem":"PEM","ownership_token":"tok","token_expires_at_ms":99,"etag":1,"created_at_ms":1,"updated_at_ms":2,"format":"cbor","enabled":true,"attempts":0,"provision":{}}"#;
        let rec: DeviceRecord = serde_json::from_slice(issued).unwrap();
        match rec.state {
            DeviceState::CertificateIssued {
                ownership_token,
                token_expires_at_ms,
                ..
            } => {
                assert_eq!(ownership_token.as_ref().map(|t| t.expose()), Some("tok"));
                assert_eq!(token_expires_at_ms, Some(99));
            }
            other => panic!("expected certificateIssued, got {other:?}"),
        }
    }

    #[test]
    fn outbox_message_round_trips_and_rejects_truncation() {
        let m = OutboxMessage {
            device: id("d-1"),
            topic: "a/b".into(),
            payload: vec![0, 1, 2, 255],
            qos: 1,
            enqueued_at_ms: 77,
            properties: Vec::new(),
        };
        let bytes = m.encode();
        assert_eq!(
            bytes[0], 1,
            "a message without properties keeps the first layout"
        );
        assert_eq!(OutboxMessage::decode(&bytes).unwrap(), m);
        assert_eq!(bytes.len(), m.encoded_len());
        let with = OutboxMessage {
            properties: vec![
                ("$.ct".into(), "application/json".into()),
                ("site".into(), "north β".into()),
            ],
            ..m.clone()
        };
        let encoded = with.encode();
        assert_eq!(encoded[0], 2);
        assert_eq!(OutboxMessage::decode(&encoded).unwrap(), with);
        assert_eq!(encoded.len(), with.encoded_len());
        for cut in 1..encoded.len() - with.payload.len() {
            assert!(
                OutboxMessage::decode(&encoded[..cut]).is_err(),
                "truncated at {cut} must not decode"
            );
        }
        assert_eq!(
            OutboxMessage::decode(&bytes[..5]),
            Err(OutboxDecodeError::Truncated(1))
        );
        let mut newer = bytes.clone();
        newer[0] = OUTBOX_MESSAGE_VERSION + 1;
        assert_eq!(
            OutboxMessage::decode(&newer),
            Err(OutboxDecodeError::NewerVersion(3))
        );
    }
}
