//! The payloads of the device contract (docs/architecture.md, "Device contract"): what a device sends on
//! `{p}/{id}/provision/{fmt}` ([`ProvisionRequest`]) and what the gateway answers on `/accepted`
//! ([`AcceptedResponse`]), `/rejected` ([`RejectedResponse`]) and the retained `{p}/{id}/status`
//! ([`StatusReport`]).
//!
//! Field names are camelCase on the wire, unknown fields are ignored (devices may send more than
//! we read), and every type is encoded and decoded with the cloud payload codec
//! ([`crate::cloud::codec`], re-exported here as [`encode`] / [`decode`]): JSON or CBOR, named by
//! the last level of the request topic. Decoding errors name the field path
//! (`parameters.SerialNumber: invalid type: integer, expected a string`) so the device's operator
//! learns from `/rejected` what to fix ([`rejected_for`]). The status topic has no format level,
//! so status reports are always JSON.
//!
//! The attestation is the admission module's wire type ([`Attestation`], re-exported here): one
//! type for the request and for the decision, so the two cannot drift apart.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub use crate::admission::Attestation;
pub use crate::cloud::codec::{decode, encode, CodecError, PayloadFormat};
use crate::device_id::DeviceId;
use crate::store::DeviceState;

/// The `errorCode`s the downstream side answers with on `/rejected`.
pub mod error_code {
    /// The id in the topic breaks the device id rules.
    pub const INVALID_DEVICE_ID: &str = "InvalidDeviceId";
    /// The id in the topic is valid but not in lower case.
    pub const NON_CANONICAL_DEVICE_ID: &str = "NonCanonicalDeviceId";
    /// The request is not valid JSON/CBOR or does not have the request's shape.
    pub const INVALID_PAYLOAD: &str = "InvalidPayload";
    /// The request is larger than `[downstream] max_request_bytes`.
    pub const PAYLOAD_TOO_LARGE: &str = "PayloadTooLarge";
    /// The gateway's queue of provisioning requests is full (503); the device retries later.
    pub const GATEWAY_BUSY: &str = "GatewayBusy";
}

/// The `/rejected` answer for a payload that failed to decode: 413 `PayloadTooLarge` over the
/// codec's size limit, 400 `InvalidPayload` otherwise, with the codec's message (format, field
/// path and what is wrong).
pub fn rejected_for(error: &CodecError) -> RejectedResponse {
    let (status, code) = match error {
        CodecError::TooLarge { .. } => (413, error_code::PAYLOAD_TOO_LARGE),
        _ => (400, error_code::INVALID_PAYLOAD),
    };
    RejectedResponse::new(status, code, error.to_string())
}

/// A provisioning request: `{"csr"?, "attestation", "parameters"?, "payload"?}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionRequest {
    /// The device's own PEM CSR; absent, the gateway generates the key and returns it once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csr: Option<String>,
    /// How the device proves who it is.
    pub attestation: Attestation,
    /// RegisterThing parameters, merged over the configured defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub parameters: BTreeMap<String, String>,
    /// The DPS custom payload (any JSON value; from CBOR, anything JSON can represent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

impl ProvisionRequest {
    /// Decodes a request in the format named by its topic.
    pub fn decode(format: PayloadFormat, bytes: &[u8]) -> Result<Self, CodecError> {
        decode(format, bytes)
    }
}

/// The final result on `/accepted` (AWS): `{"deviceId", "certificateId", "certificatePem",
/// "privateKey"?, "thingName", "deviceConfiguration"}`.
///
/// `Debug` omits the private key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptedResponse {
    /// The provisioned device.
    pub device_id: DeviceId,
    /// The certificate's id (empty, and left out, for Azure symmetric-key devices, which have
    /// no certificate).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate_id: String,
    /// The device certificate (PEM; with Azure X.509, the chain up to the group CA).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub certificate_pem: String,
    /// PKCS#8 PEM private key, only when the gateway generated the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    /// The cloud's name for the device: the thing RegisterThing created (AWS), the IoT Hub
    /// device id (Azure).
    pub thing_name: String,
    /// The template's deviceConfiguration (AWS); the registration's `status` and
    /// `substatus` (Azure).
    #[serde(default)]
    pub device_configuration: BTreeMap<String, String>,
    /// The IoT Hub DPS assigned the device to (Azure only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
}

impl fmt::Debug for AcceptedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcceptedResponse")
            .field("device_id", &self.device_id)
            .field("certificate_id", &self.certificate_id)
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "[redacted]"),
            )
            .field("thing_name", &self.thing_name)
            .field("device_configuration", &self.device_configuration)
            .field("assigned_hub", &self.assigned_hub)
            .finish_non_exhaustive()
    }
}

/// A refusal on `/rejected`, shaped as AWS does: `{"statusCode", "errorCode", "errorMessage"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RejectedResponse {
    /// HTTP-like status: 400 bad request, 403 refused, 413 too large, 429 throttled, 5xx failed.
    pub status_code: u16,
    /// Machine-readable reason, e.g. `InvalidDeviceId`.
    pub error_code: String,
    /// What was wrong, for the device's operator.
    pub error_message: String,
}

impl RejectedResponse {
    /// A refusal with the given status, code and message.
    pub fn new(
        status_code: u16,
        error_code: impl Into<String>,
        error_message: impl Into<String>,
    ) -> Self {
        Self {
            status_code,
            error_code: error_code.into(),
            error_message: error_message.into(),
        }
    }
}

/// A device's state as shown on the retained `{p}/{id}/status` topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum DeviceStatus {
    /// Waiting for an operator's approval.
    WaitingApproval,
    /// Admitted; certificate and registration in progress.
    Provisioning,
    /// Done; the result was published on `/accepted`.
    Provisioned,
    /// Provisioning failed; `error` says why.
    Failed,
    /// An operator blocked the device.
    Blocked,
}

impl DeviceStatus {
    /// The status a device in `state` shows: the one mapping from the stored state machine to
    /// what devices (retained status topic), telemetry refusals and the admin API report.
    pub fn of(state: &DeviceState) -> Self {
        match state {
            DeviceState::WaitingApproval => DeviceStatus::WaitingApproval,
            DeviceState::Delivered => DeviceStatus::Provisioned,
            DeviceState::Failed { .. } => DeviceStatus::Failed,
            DeviceState::Blocked => DeviceStatus::Blocked,
            DeviceState::Requested
            | DeviceState::Approved
            | DeviceState::KeyReady { .. }
            | DeviceState::CertificateIssued { .. }
            | DeviceState::Registering { .. }
            | DeviceState::Registered { .. } => DeviceStatus::Provisioning,
        }
    }

    /// Every status, in the order of a device's life.
    pub const ALL: [DeviceStatus; 5] = [
        DeviceStatus::WaitingApproval,
        DeviceStatus::Provisioning,
        DeviceStatus::Provisioned,
        DeviceStatus::Failed,
        DeviceStatus::Blocked,
    ];

    /// The wire spelling (`waitingApproval`, `provisioning`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::WaitingApproval => "waitingApproval",
            DeviceStatus::Provisioning => "provisioning",
            DeviceStatus::Provisioned => "provisioned",
            DeviceStatus::Failed => "failed",
            DeviceStatus::Blocked => "blocked",
        }
    }
}

impl fmt::Display for DeviceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The retained status payload: `{"status", "updatedAt", "error"?}` (always JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// The current state.
    pub status: DeviceStatus,
    /// When the state last changed, in Unix milliseconds (the store's `updated_at_ms`).
    pub updated_at: u64,
    /// Why the device failed or was refused, with `status` = `failed` or `blocked`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RejectedResponse>,
}

impl StatusReport {
    /// A report without an error.
    pub fn new(status: DeviceStatus, updated_at_ms: u64) -> Self {
        Self {
            status,
            updated_at: updated_at_ms,
            error: None,
        }
    }

    /// The JSON bytes published on the status topic.
    pub fn to_json(&self) -> Vec<u8> {
        encode(PayloadFormat::Json, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cbor(value: &impl Serialize) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out).unwrap();
        out
    }

    #[test]
    fn decodes_a_full_request_from_json_and_cbor_alike() {
        let json = serde_json::json!({
            "csr": "-----BEGIN CERTIFICATE REQUEST-----\n...",
            "attestation": {"type": "symmetricKey", "sas": "SharedAccessSignature sr=a&sig=b&se=1"},
            "parameters": {"SerialNumber": "sn-1", "Site": "north"},
            "payload": {"model": "x1", "slots": [1, 2]},
            "firmware": "ignored: unknown fields are allowed"
        });
        let expected = ProvisionRequest {
            csr: Some("-----BEGIN CERTIFICATE REQUEST-----\n...".into()),
            attestation: Attestation::SymmetricKey {
                sas: "SharedAccessSignature sr=a&sig=b&se=1".into(),
            },
            parameters: BTreeMap::from([
                ("SerialNumber".into(), "sn-1".into()),
                ("Site".into(), "north".into()),
            ]),
            payload: Some(serde_json::json!({"model": "x1", "slots": [1, 2]})),
        };
        let from_json =
            ProvisionRequest::decode(PayloadFormat::Json, json.to_string().as_bytes()).unwrap();
        assert_eq!(from_json, expected);
        let from_cbor = ProvisionRequest::decode(PayloadFormat::Cbor, &cbor(&json)).unwrap();
        assert_eq!(from_cbor, expected);
    }

    #[test]
    fn minimal_request_has_empty_optionals_and_round_trips() {
        let req =
            ProvisionRequest::decode(PayloadFormat::Json, br#"{"attestation":{"type":"none"}}"#)
                .unwrap();
        assert_eq!(
            req,
            ProvisionRequest {
                csr: None,
                attestation: Attestation::None,
                parameters: BTreeMap::new(),
                payload: None
            }
        );
        assert_eq!(
            encode(PayloadFormat::Json, &req),
            br#"{"attestation":{"type":"none"}}"#
        );
        let back: ProvisionRequest =
            decode(PayloadFormat::Cbor, &encode(PayloadFormat::Cbor, &req)).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn x509_attestation_decodes_from_cbor() {
        let json = serde_json::json!({"attestation": {
            "type": "x509", "certificatePem": "PEM", "signature": "c2ln", "timestamp": 1_700_000_000
        }});
        let req = ProvisionRequest::decode(PayloadFormat::Cbor, &cbor(&json)).unwrap();
        assert_eq!(
            req.attestation,
            Attestation::X509 {
                certificate_pem: "PEM".into(),
                signature: "c2ln".into(),
                timestamp: 1_700_000_000
            }
        );
    }

    #[test]
    fn indefinite_length_cbor_is_accepted() {
        // {_ "attestation": {_ "type": "none"}} with indefinite-length maps (0xbf .. 0xff).
        let mut bytes = vec![0xbf, 0x6b];
        bytes.extend_from_slice(b"attestation");
        bytes.extend_from_slice(&[0xbf, 0x64]);
        bytes.extend_from_slice(b"type");
        bytes.push(0x64);
        bytes.extend_from_slice(b"none");
        bytes.extend_from_slice(&[0xff, 0xff]);
        let req = ProvisionRequest::decode(PayloadFormat::Cbor, &bytes).unwrap();
        assert_eq!(req.attestation, Attestation::None);
    }

    #[test]
    fn field_errors_name_the_path_in_both_formats() {
        let json = serde_json::json!({
            "attestation": {"type": "none"},
            "parameters": {"SerialNumber": 7}
        });
        for (format, bytes) in [
            (PayloadFormat::Json, json.to_string().into_bytes()),
            (PayloadFormat::Cbor, cbor(&json)),
        ] {
            let err = ProvisionRequest::decode(format, &bytes).unwrap_err();
            let CodecError::Invalid { path, message, .. } = &err else {
                panic!("{format}: {err:?}");
            };
            assert_eq!(path, "parameters.SerialNumber", "{format}");
            assert!(
                message.contains("invalid type: integer `7`, expected"),
                "{format}: {message}"
            );
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "invalid {format} payload: parameters.SerialNumber: "
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn missing_attestation_and_unknown_type_are_explained() {
        let err = ProvisionRequest::decode(PayloadFormat::Json, b"{}").unwrap_err();
        assert!(
            err.to_string().contains("missing field `attestation`"),
            "{err}"
        );
        let err = ProvisionRequest::decode(
            PayloadFormat::Json,
            br#"{"attestation":{"type":"password"}}"#,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("attestation") && text.contains("unknown variant `password`"),
            "{text}"
        );
        let err = ProvisionRequest::decode(
            PayloadFormat::Cbor,
            &cbor(&serde_json::json!({"attestation": {"type": "password"}})),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `password`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_payloads_are_refused_with_the_codec_reason() {
        let cases: [(PayloadFormat, &[u8]); 6] = [
            (PayloadFormat::Json, b""),
            (PayloadFormat::Json, b"{\"attestation\":"),
            (PayloadFormat::Json, b"not json"),
            (PayloadFormat::Json, br#"{"attestation":{"type":"none"}} x"#),
            (PayloadFormat::Cbor, b""),
            // A JSON text is not CBOR: '{' (0x7b) starts a 27-byte text string.
            (PayloadFormat::Cbor, b"{\"attestation\":{}}"),
        ];
        for (format, bytes) in cases {
            let err = ProvisionRequest::decode(format, bytes).unwrap_err();
            assert!(
                matches!(&err, CodecError::Invalid { .. }),
                "{format} {bytes:?}: {err:?}"
            );
            let rejected = rejected_for(&err);
            assert_eq!(
                (rejected.status_code, rejected.error_code.as_str()),
                (400, "InvalidPayload")
            );
            assert_eq!(rejected.error_message, err.to_string());
        }
        let mut two = cbor(&serde_json::json!({"attestation": {"type": "none"}}));
        two.extend_from_slice(&[0x01, 0x02]);
        assert_eq!(
            ProvisionRequest::decode(PayloadFormat::Cbor, &two).unwrap_err(),
            CodecError::TrailingBytes {
                format: PayloadFormat::Cbor,
                trailing: 2
            }
        );
    }

    #[test]
    fn decode_errors_become_rejections_naming_the_problem() {
        let err = ProvisionRequest::decode(PayloadFormat::Json, b"{}").unwrap_err();
        let rejected = rejected_for(&err);
        assert_eq!(rejected.status_code, 400);
        assert_eq!(rejected.error_code, "InvalidPayload");
        assert!(
            rejected
                .error_message
                .contains("missing field `attestation`"),
            "{}",
            rejected.error_message
        );

        let huge = vec![b' '; crate::cloud::codec::MAX_PAYLOAD_BYTES + 1];
        let err = ProvisionRequest::decode(PayloadFormat::Json, &huge).unwrap_err();
        let rejected = rejected_for(&err);
        assert_eq!(
            (rejected.status_code, rejected.error_code.as_str()),
            (413, "PayloadTooLarge")
        );
    }

    #[test]
    fn accepted_response_wire_shape_and_redacted_debug() {
        let accepted = AcceptedResponse {
            device_id: DeviceId::parse("sensor-1").unwrap(),
            certificate_id: "c0ffee".into(),
            certificate_pem: "CERT".into(),
            private_key: Some("-----BEGIN PRIVATE KEY-----secret".into()),
            thing_name: "sensor-1".into(),
            device_configuration: BTreeMap::from([("Fallback".into(), "no".into())]),
            assigned_hub: None,
        };
        assert_eq!(
            serde_json::to_value(&accepted).unwrap(),
            serde_json::json!({
                "deviceId": "sensor-1", "certificateId": "c0ffee", "certificatePem": "CERT",
                "privateKey": "-----BEGIN PRIVATE KEY-----secret", "thingName": "sensor-1",
                "deviceConfiguration": {"Fallback": "no"}
            })
        );
        let back: AcceptedResponse =
            decode(PayloadFormat::Cbor, &encode(PayloadFormat::Cbor, &accepted)).unwrap();
        assert_eq!(back, accepted);
        let debug = format!("{accepted:?}");
        assert!(
            !debug.contains("secret") && debug.contains("[redacted]"),
            "{debug}"
        );

        let own_csr = AcceptedResponse {
            private_key: None,
            ..accepted
        };
        let value = serde_json::to_value(&own_csr).unwrap();
        assert!(value.get("privateKey").is_none(), "{value}");
    }

    #[test]
    fn rejected_response_is_aws_shaped() {
        let r = RejectedResponse::new(400, error_code::INVALID_DEVICE_ID, "x");
        assert_eq!(
            String::from_utf8(encode(PayloadFormat::Json, &r)).unwrap(),
            r#"{"statusCode":400,"errorCode":"InvalidDeviceId","errorMessage":"x"}"#
        );
        let back: RejectedResponse =
            decode(PayloadFormat::Cbor, &encode(PayloadFormat::Cbor, &r)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn status_report_wire_shape() {
        let ok = StatusReport::new(DeviceStatus::Provisioned, 1_763_887_000_123);
        assert_eq!(
            String::from_utf8(ok.to_json()).unwrap(),
            r#"{"status":"provisioned","updatedAt":1763887000123}"#
        );
        let failed = StatusReport {
            status: DeviceStatus::Failed,
            updated_at: 5,
            error: Some(RejectedResponse::new(
                400,
                "InvalidCsr",
                "CSR signature does not verify",
            )),
        };
        let value: serde_json::Value = serde_json::from_slice(&failed.to_json()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"status": "failed", "updatedAt": 5, "error": {
                "statusCode": 400, "errorCode": "InvalidCsr",
                "errorMessage": "CSR signature does not verify"}})
        );
        for s in [
            DeviceStatus::WaitingApproval,
            DeviceStatus::Provisioning,
            DeviceStatus::Provisioned,
            DeviceStatus::Failed,
            DeviceStatus::Blocked,
        ] {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::from(s.as_str())
            );
        }
    }
}
