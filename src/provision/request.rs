//! Checks a device's provisioning request before anything is stored: payload shape, the
//! device's own CSR (signature, CN = device id, allowed key type) and admission.
//!
//! Everything here is pure and cheap (one CSR signature check at most), so it runs in the
//! intake path; a refused request becomes a [`RejectedResponse`] for `/rejected` and leaves no
//! trace in the store.

use std::collections::BTreeMap;

use crate::admission::{Admission, Decision};
use crate::device_id::DeviceId;
use crate::downstream::contract::{self, ProvisionRequest, RejectedResponse};
use crate::downstream::PayloadFormat;
use crate::identity::{self, IdentityError, KeyType};

/// `errorCode`s the engine answers with on `/rejected` (besides the cloud's own codes).
pub mod error_code {
    /// The device's CSR is not a valid PKCS#10 request or its signature does not verify.
    pub const INVALID_CSR: &str = "InvalidCsr";
    /// The CSR's common name is not the device id of the request topic.
    pub const CSR_SUBJECT_MISMATCH: &str = "CsrSubjectMismatch";
    /// The CSR's key type is not in `provision.allowed_csr_key_types`.
    pub const KEY_TYPE_NOT_ALLOWED: &str = "KeyTypeNotAllowed";
    /// The device sent more requests than `downstream.device_rate_per_minute` allows.
    pub const TOO_MANY_REQUESTS: &str = "TooManyRequests";
    /// An operator blocked the device.
    pub const DEVICE_BLOCKED: &str = "DeviceBlocked";
    /// The request asks for a gateway-generated private key on a connection that may not
    /// receive one (plain TCP from another host, not authenticated).
    pub const PLAIN_KEY_DELIVERY_REFUSED: &str = "PlainKeyDeliveryRefused";
    /// The gateway could not record the request (store failure); the device may retry.
    pub const GATEWAY_UNAVAILABLE: &str = "GatewayUnavailable";
    pub use crate::downstream::contract::error_code::{INVALID_PAYLOAD, PAYLOAD_TOO_LARGE};
}

/// A request that passed every check: what the engine stores with the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmittedRequest {
    /// The device's own CSR (verified), or `None` when the gateway generates the key.
    pub own_csr: Option<String>,
    /// RegisterThing parameters: the request's over the configured defaults, `{id}` replaced.
    pub parameters: BTreeMap<String, String>,
    /// Whether the device may proceed now or waits for an operator.
    pub needs_approval: bool,
}

/// The limits and defaults [`check_request`] applies.
#[derive(Clone, Debug)]
pub struct RequestPolicy {
    /// Largest request payload accepted.
    pub max_request_bytes: usize,
    /// Key types accepted in a device's own CSR.
    pub allowed_csr_key_types: Vec<KeyType>,
    /// Default RegisterThing parameters (`{id}` is replaced by the device id).
    pub default_parameters: BTreeMap<String, String>,
}

/// Decodes and checks a provisioning request from `device`.
pub fn check_request(
    policy: &RequestPolicy,
    admission: &Admission,
    device: &DeviceId,
    format: PayloadFormat,
    payload: &[u8],
    now_unix: i64,
) -> Result<AdmittedRequest, RejectedResponse> {
    if payload.len() > policy.max_request_bytes {
        return Err(RejectedResponse::new(
            413,
            error_code::PAYLOAD_TOO_LARGE,
            format!(
                "the request is {} bytes; this gateway accepts at most {}",
                payload.len(),
                policy.max_request_bytes
            ),
        ));
    }
    let request =
        ProvisionRequest::decode(format, payload).map_err(|e| contract::rejected_for(&e))?;
    let own_csr = match &request.csr {
        Some(csr) => Some(check_csr(policy, device, csr)?),
        None => None,
    };
    let needs_approval = match admission.decide(device, &request.attestation, now_unix) {
        Decision::Admit => false,
        Decision::NeedsApproval => true,
        Decision::Reject {
            error_code,
            error_message,
        } => return Err(RejectedResponse::new(403, error_code, error_message)),
    };
    Ok(AdmittedRequest {
        own_csr,
        parameters: merge_parameters(&policy.default_parameters, &request.parameters, device),
        needs_approval,
    })
}

/// Verifies a device's own CSR; returns it normalised (re-encoded PEM).
fn check_csr(
    policy: &RequestPolicy,
    device: &DeviceId,
    csr: &str,
) -> Result<String, RejectedResponse> {
    let info = identity::parse_csr(csr).map_err(|e| {
        let message = match e {
            IdentityError::CsrSignature => {
                "csr: the signature does not verify (the request was altered or not signed by its key)".to_string()
            }
            other => format!("csr: {other}"),
        };
        RejectedResponse::new(400, error_code::INVALID_CSR, message)
    })?;
    match info.common_name.as_deref() {
        Some(cn) if cn == device.as_str() => {}
        Some(cn) => {
            return Err(RejectedResponse::new(
                400,
                error_code::CSR_SUBJECT_MISMATCH,
                format!(
                    "csr: the subject CN is {cn:?} but the request topic is for device {device:?}"
                ),
            ))
        }
        None => {
            return Err(RejectedResponse::new(
                400,
                error_code::CSR_SUBJECT_MISMATCH,
                format!("csr: the subject has no CN; it must be the device id {device:?}"),
            ))
        }
    }
    match info.key_type {
        Some(kt) if policy.allowed_csr_key_types.contains(&kt) => Ok(info.pem),
        found => {
            let allowed: Vec<String> = policy
                .allowed_csr_key_types
                .iter()
                .map(ToString::to_string)
                .collect();
            let found = found.map_or_else(|| "an unsupported key".to_string(), |k| k.to_string());
            Err(RejectedResponse::new(
                400,
                error_code::KEY_TYPE_NOT_ALLOWED,
                format!(
                    "csr: the key is {found}; this gateway accepts {}",
                    allowed.join(", ")
                ),
            ))
        }
    }
}

/// The request's parameters over the defaults, with `{id}` replaced by the device id in every
/// value.
pub fn merge_parameters(
    defaults: &BTreeMap<String, String>,
    requested: &BTreeMap<String, String>,
    device: &DeviceId,
) -> BTreeMap<String, String> {
    defaults
        .iter()
        .chain(requested.iter())
        .map(|(k, v)| (k.clone(), v.replace("{id}", device.as_str())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{AdmissionMode, AdmissionOptions};
    use crate::identity::PrivateKey;

    fn id(raw: &str) -> DeviceId {
        DeviceId::parse(raw).unwrap()
    }

    fn policy() -> RequestPolicy {
        RequestPolicy {
            max_request_bytes: 65536,
            allowed_csr_key_types: vec![KeyType::EcdsaP256, KeyType::EcdsaP384],
            default_parameters: BTreeMap::from([
                ("SerialNumber".into(), "{id}".into()),
                ("Site".into(), "lab".into()),
            ]),
        }
    }

    fn open() -> Admission {
        Admission::new(AdmissionOptions {
            mode: AdmissionMode::Open,
            ..Default::default()
        })
        .unwrap()
    }

    fn request(csr: Option<&str>) -> Vec<u8> {
        let mut v =
            serde_json::json!({"attestation": {"type": "none"}, "parameters": {"Site": "north"}});
        if let Some(csr) = csr {
            v["csr"] = csr.into();
        }
        v.to_string().into_bytes()
    }

    #[test]
    fn admits_a_gateway_key_request_with_merged_parameters() {
        let ok = check_request(
            &policy(),
            &open(),
            &id("dev-1"),
            PayloadFormat::Json,
            &request(None),
            0,
        )
        .unwrap();
        assert_eq!(ok.own_csr, None);
        assert!(!ok.needs_approval);
        assert_eq!(
            ok.parameters,
            BTreeMap::from([
                ("SerialNumber".to_string(), "dev-1".to_string()),
                ("Site".to_string(), "north".to_string())
            ])
        );
    }

    #[test]
    fn admits_an_own_csr_whose_cn_is_the_device() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let csr = identity::create_csr("dev-2", &key).unwrap();
        let ok = check_request(
            &policy(),
            &open(),
            &id("dev-2"),
            PayloadFormat::Json,
            &request(Some(&csr)),
            0,
        )
        .unwrap();
        let stored = ok.own_csr.unwrap();
        assert!(identity::parse_csr(&stored).is_ok());
    }

    #[test]
    fn refuses_bad_input_with_a_clear_code() {
        let p = policy();
        let adm = open();
        let dev = id("dev-3");
        let reject = |payload: &[u8]| {
            check_request(&p, &adm, &dev, PayloadFormat::Json, payload, 0).unwrap_err()
        };

        let e = reject(b"{not json");
        assert_eq!(
            (e.status_code, e.error_code.as_str()),
            (400, "InvalidPayload")
        );

        let e = reject(&vec![b' '; 70_000]);
        assert_eq!(
            (e.status_code, e.error_code.as_str()),
            (413, error_code::PAYLOAD_TOO_LARGE)
        );

        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let other = identity::create_csr("someone-else", &key).unwrap();
        let e = reject(&request(Some(&other)));
        assert_eq!(e.error_code, error_code::CSR_SUBJECT_MISMATCH);
        assert!(e.error_message.contains("someone-else") && e.error_message.contains("dev-3"));

        let rsa = PrivateKey::generate(KeyType::Rsa2048).unwrap();
        let rsa_csr = identity::create_csr("dev-3", &rsa).unwrap();
        let e = reject(&request(Some(&rsa_csr)));
        assert_eq!(e.error_code, error_code::KEY_TYPE_NOT_ALLOWED);
        assert!(e.error_message.contains("rsa-2048"), "{}", e.error_message);

        // Flip one bit in the signature (the last bytes of the DER): the signature must fail.
        let good = identity::create_csr("dev-3", &key).unwrap();
        let block = pem::parse(&good).unwrap();
        let mut der = block.contents().to_vec();
        let n = der.len();
        der[n - 3] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let e = reject(&request(Some(&tampered)));
        assert_eq!(e.error_code, error_code::INVALID_CSR);

        let e = reject(&request(Some(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )));
        assert_eq!(e.error_code, error_code::INVALID_CSR);
    }

    #[test]
    fn approval_mode_admits_for_waiting_and_attestation_modes_refuse() {
        let approve = Admission::new(AdmissionOptions::default()).unwrap();
        let ok = check_request(
            &policy(),
            &approve,
            &id("dev-4"),
            PayloadFormat::Json,
            &request(None),
            0,
        )
        .unwrap();
        assert!(ok.needs_approval);

        let sk = Admission::new(AdmissionOptions {
            mode: AdmissionMode::SymmetricKey,
            group_key: Some(crate::identity::Secret::new(vec![7u8; 32])),
            ..Default::default()
        })
        .unwrap();
        let e = check_request(
            &policy(),
            &sk,
            &id("dev-4"),
            PayloadFormat::Json,
            &request(None),
            0,
        )
        .unwrap_err();
        assert_eq!(
            (e.status_code, e.error_code.as_str()),
            (403, "AttestationRequired")
        );
    }
}
