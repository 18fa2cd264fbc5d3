//! Who a DPS or IoT Hub client is: the enrollment groups, and the checks of a SAS token or a
//! TLS client certificate against them, shared by the MQTT and HTTPS front ends.
//!
//! - Symmetric key: the device key is `HMAC-SHA256(groupKey, registrationId)` (primary or
//!   secondary group key); the token is verified with [`crate::admission::sas::verify_sas`]
//!   over `sr` exactly as sent, and its resource URI must be this service's:
//!   `{idScope}/registrations/{registrationId}` at DPS, `{hubHost}/devices/{deviceId}` at the
//!   hub. `skn` is optional (the SDKs send none).
//! - X.509: the presented chain must lead to the X.509 group's CA and the leaf's CN must be the
//!   registration (device) id. The TLS layer has already checked the client holds the key.
//!
//! A device may use the hub only once DPS assigned it, and only with the attestation it
//! registered with.

use super::registry::{Attestation, Registry};
use crate::admission::sas::{self, SasError};
use crate::admission::x509;
use crate::clock;
use crate::device_id::DeviceId;

/// Longest-lived SAS token accepted: the SDKs default to one hour; a day leaves room.
const MAX_SAS_TTL_SECS: u64 = 24 * 3600;

/// The symmetric-key enrollment group.
pub struct SymmetricGroup {
    /// Group (enrollment id) name.
    pub name: String,
    /// Primary group key, raw bytes.
    pub primary: Vec<u8>,
    /// Secondary group key, raw bytes.
    pub secondary: Vec<u8>,
}

/// The X.509 enrollment group.
pub struct X509Group {
    /// Group (enrollment id) name.
    pub name: String,
    /// The group CA certificate (PEM) device certificates must chain to.
    pub ca_pem: String,
}

/// Both enrollment groups.
pub struct Groups {
    /// Symmetric key.
    pub symmetric: SymmetricGroup,
    /// X.509.
    pub x509: X509Group,
}

/// What a client presented.
#[derive(Clone, Debug)]
pub enum Credential {
    /// A SAS token (MQTT password, HTTP `Authorization` header).
    Sas(String),
    /// A TLS client certificate chain (PEM, leaf first).
    Certificate(String),
    /// Nothing.
    None,
}

impl Credential {
    /// The SAS token if one was sent, else the client certificate chain if any.
    pub fn from_parts(sas: Option<String>, chain_ders: &[Vec<u8>]) -> Self {
        match sas {
            Some(token) => Credential::Sas(token),
            None if chain_ders.is_empty() => Credential::None,
            None => Credential::Certificate(
                chain_ders
                    .iter()
                    .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
                    .collect(),
            ),
        }
    }
}

/// Why a credential was refused (the message a client sees).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No SAS token and no client certificate.
    #[error("no credential: send a SAS token or a client certificate")]
    Missing,
    /// The SAS token does not verify with the group key.
    #[error("{0}")]
    Sas(#[from] SasError),
    /// The SAS token is valid but for another service or device.
    #[error("SAS token resource URI {got:?} is not {expected:?}")]
    WrongService {
        /// What the token says.
        got: String,
        /// What this service expects.
        expected: String,
    },
    /// The certificate does not chain to the group CA or names another device.
    #[error("{0}")]
    Certificate(#[from] x509::X509Error),
    /// The id is not a valid registration id.
    #[error("invalid id {id:?}: {reason}")]
    BadId {
        /// The id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The hub does not know the device.
    #[error("device {0:?} is not registered with this hub; register it through DPS first")]
    NotRegistered(String),
    /// The device registered with the other attestation.
    #[error("device {device:?} registered with {registered:?} attestation and may not authenticate with {used:?}")]
    WrongAttestation {
        /// The device.
        device: String,
        /// How it registered.
        registered: Attestation,
        /// What it used now.
        used: Attestation,
    },
}

/// A client DPS admitted.
#[derive(Debug)]
pub struct Admitted {
    /// Which attestation it used.
    pub attestation: Attestation,
    /// Its enrollment group.
    pub group: String,
}

fn parse_id(id: &str) -> Result<DeviceId, AuthError> {
    DeviceId::parse(id).map_err(|e| AuthError::BadId {
        id: super::dps::short(id),
        reason: e.to_string(),
    })
}

/// Verifies `token` for `id` with the key derived from the primary, then the secondary key,
/// and checks its resource URI is `expected_uri` (the id part compared case-insensitively).
fn verify_group_sas(
    group: &SymmetricGroup,
    id: &str,
    token: &str,
    expected_prefix: &str,
) -> Result<(), AuthError> {
    let device = parse_id(id)?;
    let now = clock::unix_secs();
    let mut last = None;
    for group_key in [&group.primary, &group.secondary] {
        // DPS derives the device key from the registration id exactly as the device spells it.
        let key = sas::derive_device_key(group_key, id);
        match sas::verify_sas(token, &device, &key, now, MAX_SAS_TTL_SECS) {
            Ok(claims) => {
                let expected = format!("{expected_prefix}{id}");
                let (prefix, got_id) = claims
                    .resource_uri
                    .rsplit_once('/')
                    .unwrap_or(("", &claims.resource_uri));
                if format!("{prefix}/") != expected_prefix || !got_id.eq_ignore_ascii_case(id) {
                    return Err(AuthError::WrongService {
                        got: super::dps::short(&claims.resource_uri),
                        expected,
                    });
                }
                return Ok(());
            }
            Err(e @ SasError::BadSignature { .. }) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map(AuthError::Sas).unwrap_or(AuthError::Missing))
}

/// DPS: whether `credential` may register (or poll) `registration_id` in `id_scope`.
pub fn admit_registration(
    groups: &Groups,
    id_scope: &str,
    registration_id: &str,
    credential: &Credential,
) -> Result<Admitted, AuthError> {
    match credential {
        Credential::Sas(token) => {
            verify_group_sas(
                &groups.symmetric,
                registration_id,
                token,
                &format!("{id_scope}/registrations/"),
            )?;
            Ok(Admitted {
                attestation: Attestation::SymmetricKey,
                group: groups.symmetric.name.clone(),
            })
        }
        Credential::Certificate(chain) => {
            let id = parse_id(registration_id)?;
            x509::verify_device_certificate(&id, chain, &groups.x509.ca_pem, clock::unix_secs())?;
            Ok(Admitted {
                attestation: Attestation::X509,
                group: groups.x509.name.clone(),
            })
        }
        Credential::None => Err(AuthError::Missing),
    }
}

/// IoT Hub: whether `credential` may act as `device_id` on `hub_host`.
pub fn admit_device(
    groups: &Groups,
    registry: &Registry,
    hub_host: &str,
    device_id: &str,
    credential: &Credential,
) -> Result<(), AuthError> {
    parse_id(device_id)?;
    let registration = registry
        .get(device_id)
        .filter(|r| r.status == "assigned" && r.assigned_hub == hub_host)
        .ok_or_else(|| AuthError::NotRegistered(super::dps::short(device_id)))?;
    let used = match credential {
        Credential::Sas(_) => Attestation::SymmetricKey,
        Credential::Certificate(_) => Attestation::X509,
        Credential::None => return Err(AuthError::Missing),
    };
    if used != registration.attestation {
        return Err(AuthError::WrongAttestation {
            device: registration.device_id,
            registered: registration.attestation,
            used,
        });
    }
    match credential {
        Credential::Sas(token) => verify_group_sas(
            &groups.symmetric,
            &registration.device_id,
            token,
            &format!("{hub_host}/devices/"),
        ),
        Credential::Certificate(chain) => {
            let id = parse_id(&registration.device_id)?;
            x509::verify_device_certificate(&id, chain, &groups.x509.ca_pem, clock::unix_secs())?;
            Ok(())
        }
        Credential::None => Err(AuthError::Missing),
    }
}
