//! Admission: who may be provisioned.
//!
//! The provisioning engine asks [`Admission::decide`] about every request, with the device id
//! from the topic and the request's [`Attestation`], before anything is generated or sent to the
//! cloud. The configured [`AdmissionMode`] answers:
//!
//! - `approve` (the packaged default): every new device waits for an operator,
//!   [`Decision::NeedsApproval`]; the engine records it as waiting and the admin API approves.
//! - `open`: every request is admitted (labs, the demo).
//! - `symmetric-key`: the device presents a DPS-style SAS token made with its key derived from
//!   the configured group key ([`sas`]).
//! - `x509`: the device presents a certificate chained to a configured CA and a fresh signature
//!   over its id and a timestamp ([`x509`]).
//!
//! A refused device gets [`Decision::Reject`] with an `errorCode` and a message that says what
//! was wrong; the engine publishes it on `/rejected` and stores nothing. Deciding is pure
//! computation over the request and the options, so it is safe to call from any task.

pub mod sas;
mod shared;
pub mod x509;

pub use shared::SharedAdmission;

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::device_id::DeviceId;
use crate::identity::{self, Secret};

/// Shortest group key accepted, in bytes (DPS requires 16 to 64).
pub const MIN_GROUP_KEY_LEN: usize = 16;

/// How the gateway decides whether a device may be provisioned (config `admission.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdmissionMode {
    /// Every new device needs an operator's approval.
    #[default]
    Approve,
    /// Every request is admitted.
    Open,
    /// Devices prove themselves with a SAS token derived from a group key.
    SymmetricKey,
    /// Devices prove themselves with a certificate chained to a trusted CA.
    X509,
}

impl AdmissionMode {
    /// Every mode, in config spelling order.
    pub const ALL: [AdmissionMode; 4] = [
        AdmissionMode::Approve,
        AdmissionMode::Open,
        AdmissionMode::SymmetricKey,
        AdmissionMode::X509,
    ];

    /// The config spelling: `approve`, `open`, `symmetric-key`, `x509`.
    pub fn as_str(self) -> &'static str {
        match self {
            AdmissionMode::Approve => "approve",
            AdmissionMode::Open => "open",
            AdmissionMode::SymmetricKey => "symmetric-key",
            AdmissionMode::X509 => "x509",
        }
    }
}

impl fmt::Display for AdmissionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AdmissionMode {
    type Err = AdmissionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| AdmissionError::UnknownMode(s.to_string()))
    }
}

/// How a device proves who it is, as sent in the provision request's `attestation` field
/// (`{"type":"none"}`, `{"type":"symmetricKey","sas":..}`,
/// `{"type":"x509","certificatePem":..,"signature":..,"timestamp":..}`).
///
/// `Debug` hides the SAS token and the signature: both are usable credentials for a while.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Attestation {
    /// No proof; admitted only in `open` mode or after approval.
    #[default]
    None,
    /// A DPS-style SAS token (`SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`).
    SymmetricKey {
        /// The token.
        sas: String,
    },
    /// A certificate chain and a signature over `"{id}\n{timestamp}"` with the leaf's key.
    X509 {
        /// Leaf certificate first, then intermediates, PEM.
        certificate_pem: String,
        /// base64 of the signature.
        signature: String,
        /// Unix seconds the signature was made at.
        timestamp: i64,
    },
}

impl Attestation {
    /// The wire name of the attestation type: `none`, `symmetricKey` or `x509`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Attestation::None => "none",
            Attestation::SymmetricKey { .. } => "symmetricKey",
            Attestation::X509 { .. } => "x509",
        }
    }
}

impl fmt::Debug for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Attestation::None => f.write_str("None"),
            Attestation::SymmetricKey { .. } => f
                .debug_struct("SymmetricKey")
                .field("sas", &"[redacted]")
                .finish(),
            Attestation::X509 { timestamp, .. } => f
                .debug_struct("X509")
                .field("timestamp", timestamp)
                .finish_non_exhaustive(),
        }
    }
}

/// The outcome of [`Admission::decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Provision the device.
    Admit,
    /// Keep the device waiting until an operator approves it.
    NeedsApproval,
    /// Refuse the request; the device receives these on `/rejected`.
    Reject {
        /// Machine-readable reason, e.g. `InvalidSasToken`.
        error_code: String,
        /// What was wrong, for the device's operator.
        error_message: String,
    },
}

impl Decision {
    fn reject(error_code: &str, error_message: impl Into<String>) -> Self {
        Decision::Reject {
            error_code: error_code.to_string(),
            error_message: error_message.into(),
        }
    }
}

/// What [`Admission`] needs, already read from the config and files by the caller.
#[derive(Clone, Debug)]
pub struct AdmissionOptions {
    /// The mode (config `admission.mode`).
    pub mode: AdmissionMode,
    /// The raw (base64-decoded) group key; required for `symmetric-key`.
    /// [`decode_group_key`] turns the configured base64 text into it.
    pub group_key: Option<Secret>,
    /// PEM bundle of the CA certificates devices chain to; required for `x509`.
    pub trusted_ca_pem: Option<String>,
    /// How far an X.509 attestation timestamp may be from now (`admission.x509_window_secs`).
    pub x509_window_secs: u64,
    /// Longest remaining validity accepted for a SAS token.
    pub sas_max_ttl_secs: u64,
    /// Group keys and CAs of enrollment groups made through the admin API, consulted after
    /// the configured ones; shared, so changes take effect without a restart.
    pub enrollments: EnrollmentSet,
}

/// The enrollment groups' credentials admission consults besides the config's: the keys of
/// enabled symmetric-key groups and the verified CA certificates of enabled x509 groups. One
/// set is shared by every [`Admission`] of the gateway and replaced whole by the admin API.
#[derive(Clone, Debug, Default)]
pub struct EnrollmentSet(std::sync::Arc<std::sync::RwLock<Enrolled>>);

#[derive(Debug, Default)]
struct Enrolled {
    group_keys: Vec<Secret>,
    trusted_ca_pems: Vec<String>,
}

impl EnrollmentSet {
    /// Replaces the set.
    pub fn replace(&self, group_keys: Vec<Secret>, trusted_ca_pems: Vec<String>) {
        let mut e = self.0.write().unwrap_or_else(|p| p.into_inner());
        *e = Enrolled {
            group_keys,
            trusted_ca_pems,
        };
    }

    fn group_keys(&self) -> Vec<Secret> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .group_keys
            .clone()
    }

    fn trusted_ca_pems(&self) -> Vec<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .trusted_ca_pems
            .clone()
    }
}

impl Default for AdmissionOptions {
    fn default() -> Self {
        Self {
            mode: AdmissionMode::default(),
            group_key: None,
            trusted_ca_pem: None,
            x509_window_secs: x509::DEFAULT_WINDOW_SECS,
            sas_max_ttl_secs: sas::DEFAULT_MAX_TTL_SECS,
            enrollments: EnrollmentSet::default(),
        }
    }
}

/// Why admission cannot be set up with the given options.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// `admission.mode` is not one of the known modes.
    #[error(
        "admission.mode {0:?} is unknown; use \"approve\", \"open\", \"symmetric-key\" or \"x509\""
    )]
    UnknownMode(String),

    /// `symmetric-key` mode without a group key.
    #[error("admission.mode = \"symmetric-key\" needs a group key: set admission.group_key or admission.group_key_file")]
    MissingGroupKey,

    /// The configured group key text is not base64.
    #[error("{source_name}: the group key is not valid base64 ({reason})")]
    GroupKeyEncoding {
        /// Where the key came from (`admission.group_key` or a file path).
        source_name: String,
        /// The decoder's message (never the key).
        reason: String,
    },

    /// The group key is too short to be a real secret.
    #[error("{source_name}: the group key is {len} bytes after base64 decoding; at least {MIN_GROUP_KEY_LEN} are required")]
    GroupKeyTooShort {
        /// Where the key came from.
        source_name: String,
        /// Its decoded length.
        len: usize,
    },

    /// `x509` mode without trusted CAs.
    #[error("admission.mode = \"x509\" needs admission.trusted_ca: a PEM bundle of the CA certificates devices chain to")]
    MissingTrustedCa,

    /// The trusted CA bundle cannot be used.
    #[error("admission.trusted_ca: {reason}")]
    TrustedCa {
        /// What is wrong with the bundle.
        reason: String,
    },

    /// The X.509 window is zero.
    #[error("admission.x509_window_secs must be at least 1")]
    ZeroWindow,
}

/// Decodes the configured base64 group key text (surrounding whitespace and a trailing newline
/// from a key file are ignored); `source_name` names it in errors.
pub fn decode_group_key(text: &Secret, source_name: &str) -> Result<Secret, AdmissionError> {
    let encoding_error = |reason: String| AdmissionError::GroupKeyEncoding {
        source_name: source_name.to_string(),
        reason,
    };
    let text =
        std::str::from_utf8(text.expose()).map_err(|_| encoding_error("it is not text".into()))?;
    let raw = BASE64
        .decode(text.trim().as_bytes())
        .map_err(|e| encoding_error(e.to_string()))?;
    if raw.len() < MIN_GROUP_KEY_LEN {
        return Err(AdmissionError::GroupKeyTooShort {
            source_name: source_name.to_string(),
            len: raw.len(),
        });
    }
    Ok(Secret::new(raw))
}

/// Decides, per request, whether a device may be provisioned. Cheap to share (`Send + Sync`).
#[derive(Debug)]
pub struct Admission {
    mode: AdmissionMode,
    group_key: Option<Secret>,
    trusted_ca_pem: Option<String>,
    x509_window_secs: u64,
    sas_max_ttl_secs: u64,
    enrollments: EnrollmentSet,
}

impl Admission {
    /// Checks that the options fit the mode (a group key for `symmetric-key`, a bundle of CA
    /// certificates for `x509`) and builds the decider.
    pub fn new(opts: AdmissionOptions) -> Result<Self, AdmissionError> {
        match opts.mode {
            AdmissionMode::SymmetricKey => match &opts.group_key {
                None => return Err(AdmissionError::MissingGroupKey),
                Some(key) if key.len() < MIN_GROUP_KEY_LEN => {
                    return Err(AdmissionError::GroupKeyTooShort {
                        source_name: "admission.group_key".into(),
                        len: key.len(),
                    })
                }
                Some(_) => {}
            },
            AdmissionMode::X509 => {
                let pem = opts
                    .trusted_ca_pem
                    .as_deref()
                    .ok_or(AdmissionError::MissingTrustedCa)?;
                check_trusted_bundle(pem)?;
                if opts.x509_window_secs == 0 {
                    return Err(AdmissionError::ZeroWindow);
                }
            }
            AdmissionMode::Approve | AdmissionMode::Open => {}
        }
        Ok(Self {
            mode: opts.mode,
            group_key: opts.group_key,
            trusted_ca_pem: opts.trusted_ca_pem,
            x509_window_secs: opts.x509_window_secs,
            sas_max_ttl_secs: opts.sas_max_ttl_secs,
            enrollments: opts.enrollments,
        })
    }

    /// The configured group key, then the enrollment groups' keys.
    fn group_keys(&self) -> Vec<Secret> {
        self.group_key
            .iter()
            .cloned()
            .chain(self.enrollments.group_keys())
            .collect()
    }

    /// The configured CA bundle, then the enrollment groups' verified CAs.
    fn trusted_bundles(&self) -> Vec<String> {
        self.trusted_ca_pem
            .iter()
            .cloned()
            .chain(self.enrollments.trusted_ca_pems())
            .collect()
    }

    /// The configured mode.
    pub fn mode(&self) -> AdmissionMode {
        self.mode
    }

    /// Checks a device's MQTT CONNECT credentials (`[downstream] auth = "device"`): in
    /// `symmetric-key` mode the user name is the device id and the password a SAS token for
    /// it, made with the key derived from the group key (the same form as the request's
    /// attestation); in `x509` mode the TLS client certificate chain (`client_chain_pem`,
    /// leaf first) chains to `trusted_ca` and names the device (CN). `Err` says what is
    /// wrong; `approve` and `open` have no credentials of their own.
    pub fn authenticate_connect(
        &self,
        id: &DeviceId,
        username: Option<&str>,
        password: Option<&[u8]>,
        client_chain_pem: Option<&str>,
        now_unix: i64,
    ) -> Result<(), String> {
        match self.mode {
            AdmissionMode::SymmetricKey => {}
            AdmissionMode::X509 => {
                let chain = client_chain_pem.ok_or(
                    "connect to the TLS listener with a client certificate chaining to the \
                     gateway's trusted CA, CN = the device id",
                )?;
                let mut first_error = Err("the gateway has no trusted CAs".to_string());
                for (i, trusted) in self.trusted_bundles().iter().enumerate() {
                    match x509::verify_device_certificate(id, chain, trusted, now_unix) {
                        Ok(_) => return Ok(()),
                        Err(e) if i == 0 => first_error = Err(e.to_string()),
                        Err(_) => {}
                    }
                }
                return first_error;
            }
            AdmissionMode::Approve | AdmissionMode::Open => {
                return Err(format!(
                    "admission mode {} has no device credentials",
                    self.mode
                ))
            }
        }
        if username != Some(id.as_str()) {
            return Err(format!(
                "the user name must be the device id {:?}",
                id.as_str()
            ));
        }
        let token = password
            .and_then(|p| std::str::from_utf8(p).ok())
            .ok_or("the password must be the device's SAS token")?;
        let mut first_error = Err("the gateway has no group key".to_string());
        for (i, group_key) in self.group_keys().iter().enumerate() {
            let device_key = sas::derive_device_key(group_key.expose(), id.as_str());
            match sas::verify_sas(token, id, &device_key, now_unix, self.sas_max_ttl_secs) {
                Ok(_) => return Ok(()),
                Err(e) if i == 0 => first_error = Err(e.to_string()),
                Err(_) => {}
            }
        }
        first_error
    }

    /// Decides about a request from `id` carrying `att`, at `now_unix` (seconds).
    ///
    /// In `approve` mode the answer is always [`Decision::NeedsApproval`]: whether this device
    /// was already approved is the engine's state, not admission's.
    pub fn decide(&self, id: &DeviceId, att: &Attestation, now_unix: i64) -> Decision {
        match self.mode {
            AdmissionMode::Approve => Decision::NeedsApproval,
            AdmissionMode::Open => Decision::Admit,
            AdmissionMode::SymmetricKey => self.decide_symmetric_key(id, att, now_unix),
            AdmissionMode::X509 => self.decide_x509(id, att, now_unix),
        }
    }

    fn decide_symmetric_key(&self, id: &DeviceId, att: &Attestation, now_unix: i64) -> Decision {
        let Attestation::SymmetricKey { sas } = att else {
            return attestation_required(self.mode, "symmetricKey", att);
        };
        // `new` refuses this mode without a group key; kept as a refusal, not a panic. The
        // configured key's verdict is the one reported when no key admits.
        let mut verdict =
            Decision::reject("AdmissionMisconfigured", "the gateway has no group key");
        for (i, group_key) in self.group_keys().iter().enumerate() {
            let device_key = sas::derive_device_key(group_key.expose(), id.as_str());
            match sas::verify_sas(sas, id, &device_key, now_unix, self.sas_max_ttl_secs) {
                Ok(_) => return Decision::Admit,
                Err(e) if i == 0 => verdict = Decision::reject(e.error_code(), e.to_string()),
                Err(_) => {}
            }
        }
        verdict
    }

    fn decide_x509(&self, id: &DeviceId, att: &Attestation, now_unix: i64) -> Decision {
        let Attestation::X509 {
            certificate_pem,
            signature,
            timestamp,
        } = att
        else {
            return attestation_required(self.mode, "x509", att);
        };
        let mut verdict =
            Decision::reject("AdmissionMisconfigured", "the gateway has no trusted CAs");
        for (i, trusted) in self.trusted_bundles().iter().enumerate() {
            match x509::verify_attestation(
                id,
                certificate_pem,
                signature,
                *timestamp,
                trusted,
                now_unix,
                self.x509_window_secs,
            ) {
                Ok(()) => return Decision::Admit,
                Err(e) if i == 0 => verdict = Decision::reject(e.error_code(), e.to_string()),
                Err(_) => {}
            }
        }
        verdict
    }
}

fn attestation_required(mode: AdmissionMode, expected: &str, got: &Attestation) -> Decision {
    Decision::reject(
        "AttestationRequired",
        format!(
            "this gateway admits devices with a {expected} attestation (admission mode {mode}); the request has type {}",
            got.type_name()
        ),
    )
}

/// Every block must be a CA certificate: a device certificate in the bundle would be a
/// misconfiguration that silently admits nothing.
fn check_trusted_bundle(pem: &str) -> Result<(), AdmissionError> {
    let certs = identity::parse_certificates(pem).map_err(|e| AdmissionError::TrustedCa {
        reason: e.to_string(),
    })?;
    for (i, cert) in certs.iter().enumerate() {
        if !cert.is_ca {
            return Err(AdmissionError::TrustedCa {
                reason: format!(
                    "certificate {} (CN={}) is not a CA certificate (basicConstraints CA=true missing)",
                    i + 1,
                    cert.subject_cn.as_deref().unwrap_or("<none>")
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock;
    use crate::identity::{CertificateAuthority, KeyType};

    const GROUP_KEY_B64: &str = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVowMTIzNDU2Nzg5YWJjZGVmZ2hpamts";

    fn id(raw: &str) -> DeviceId {
        DeviceId::parse(raw).unwrap()
    }

    fn group_key() -> Secret {
        decode_group_key(&Secret::from(GROUP_KEY_B64), "admission.group_key").unwrap()
    }

    fn admission(mode: AdmissionMode) -> Admission {
        Admission::new(AdmissionOptions {
            mode,
            ..AdmissionOptions::default()
        })
        .unwrap()
    }

    fn sas_token(device: &str, expiry: i64) -> Attestation {
        let key = sas::derive_device_key(group_key().expose(), device);
        let uri = sas::registration_resource_uri("0ne00ABC123", &id(device));
        Attestation::SymmetricKey {
            sas: sas::generate_sas(&uri, &key, expiry, Some(sas::REGISTRATION_KEY_NAME)),
        }
    }

    fn rejection(decision: Decision) -> (String, String) {
        match decision {
            Decision::Reject {
                error_code,
                error_message,
            } => (error_code, error_message),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn open_mode_admits_any_request() {
        let open = admission(AdmissionMode::Open);
        assert_eq!(open.mode(), AdmissionMode::Open);
        assert_eq!(
            open.decide(&id("sensor-1"), &Attestation::None, 0),
            Decision::Admit
        );
        let sas = sas_token("sensor-1", 10);
        assert_eq!(open.decide(&id("sensor-1"), &sas, 1_000), Decision::Admit);
    }

    #[test]
    fn approve_mode_holds_every_device_for_approval() {
        let approve = admission(AdmissionMode::default());
        assert_eq!(approve.mode(), AdmissionMode::Approve);
        for att in [Attestation::None, sas_token("sensor-1", 2_000)] {
            assert_eq!(
                approve.decide(&id("sensor-1"), &att, 1_000),
                Decision::NeedsApproval
            );
        }
    }

    #[test]
    fn symmetric_key_mode_admits_a_valid_sas_and_explains_refusals() {
        let decider = Admission::new(AdmissionOptions {
            mode: AdmissionMode::SymmetricKey,
            group_key: Some(group_key()),
            ..AdmissionOptions::default()
        })
        .unwrap();
        let now = 1_800_000_000;
        assert_eq!(
            decider.decide(&id("sensor-1"), &sas_token("sensor-1", now + 3600), now),
            Decision::Admit
        );
        // The device id from the topic is canonical; a token for "Sensor-1" is the same device.
        assert_eq!(
            decider.decide(&id("SENSOR-1"), &sas_token("sensor-1", now + 3600), now),
            Decision::Admit
        );

        let (code, message) =
            rejection(decider.decide(&id("sensor-2"), &sas_token("sensor-1", now + 60), now));
        assert_eq!(code, "InvalidSasToken");
        assert!(message.contains("not for device \"sensor-2\""), "{message}");

        let (code, message) =
            rejection(decider.decide(&id("sensor-1"), &sas_token("sensor-1", now - 1), now));
        assert_eq!(code, "SasTokenExpired");
        assert!(message.contains("expired"), "{message}");

        let (code, message) = rejection(decider.decide(
            &id("sensor-1"),
            &sas_token("sensor-1", now + 2 * sas::DEFAULT_MAX_TTL_SECS as i64),
            now,
        ));
        assert_eq!(code, "InvalidSasToken");
        assert!(message.contains("shorter-lived"), "{message}");

        // A token made with a key derived from another group key.
        let foreign_key = sas::derive_device_key(b"0123456789abcdef-other", "sensor-1");
        let foreign = Attestation::SymmetricKey {
            sas: sas::generate_sas("scope/registrations/sensor-1", &foreign_key, now + 60, None),
        };
        let (code, _) = rejection(decider.decide(&id("sensor-1"), &foreign, now));
        assert_eq!(code, "InvalidSignature");

        let (code, message) = rejection(decider.decide(&id("sensor-1"), &Attestation::None, now));
        assert_eq!(code, "AttestationRequired");
        assert_eq!(
            message,
            "this gateway admits devices with a symmetricKey attestation (admission mode symmetric-key); the request has type none"
        );
    }

    #[test]
    fn x509_mode_admits_a_chained_certificate_and_explains_refusals() {
        let root = CertificateAuthority::generate("Fleet Root").unwrap();
        let (cert, key) = root
            .issue_client("sensor-9", KeyType::EcdsaP256, 30)
            .unwrap();
        let decider = Admission::new(AdmissionOptions {
            mode: AdmissionMode::X509,
            trusted_ca_pem: Some(root.cert_pem().to_string()),
            ..AdmissionOptions::default()
        })
        .unwrap();
        let now = clock::unix_secs();
        let attest = |timestamp: i64| Attestation::X509 {
            certificate_pem: cert.clone(),
            signature: x509::sign_attestation(&id("sensor-9"), timestamp, &key).unwrap(),
            timestamp,
        };
        assert_eq!(
            decider.decide(&id("sensor-9"), &attest(now), now),
            Decision::Admit
        );

        let (code, message) = rejection(decider.decide(&id("sensor-9"), &attest(now - 3600), now));
        assert_eq!(code, "AttestationExpired");
        assert!(message.contains("3600 s old"), "{message}");

        let (code, _) = rejection(decider.decide(&id("sensor-8"), &attest(now), now));
        assert_eq!(code, "CommonNameMismatch");

        let stranger = CertificateAuthority::generate("Stranger").unwrap();
        let (foreign_cert, foreign_key) = stranger
            .issue_client("sensor-9", KeyType::EcdsaP256, 30)
            .unwrap();
        let foreign = Attestation::X509 {
            certificate_pem: foreign_cert,
            signature: x509::sign_attestation(&id("sensor-9"), now, &foreign_key).unwrap(),
            timestamp: now,
        };
        let (code, _) = rejection(decider.decide(&id("sensor-9"), &foreign, now));
        assert_eq!(code, "UntrustedCertificate");

        let (code, message) =
            rejection(decider.decide(&id("sensor-9"), &sas_token("sensor-9", now + 60), now));
        assert_eq!(code, "AttestationRequired");
        assert!(message.contains("has type symmetricKey"), "{message}");
    }

    #[test]
    fn new_refuses_options_that_do_not_fit_the_mode() {
        let err = Admission::new(AdmissionOptions {
            mode: AdmissionMode::SymmetricKey,
            ..AdmissionOptions::default()
        })
        .unwrap_err();
        assert!(matches!(err, AdmissionError::MissingGroupKey), "{err}");

        let err = Admission::new(AdmissionOptions {
            mode: AdmissionMode::SymmetricKey,
            group_key: Some(Secret::from("short")),
            ..AdmissionOptions::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "admission.group_key: the group key is 5 bytes after base64 decoding; at least 16 are required"
        );

        let err = Admission::new(AdmissionOptions {
            mode: AdmissionMode::X509,
            ..AdmissionOptions::default()
        })
        .unwrap_err();
        assert!(matches!(err, AdmissionError::MissingTrustedCa), "{err}");

        let root = CertificateAuthority::generate("Fleet Root").unwrap();
        let (leaf, _) = root
            .issue_client("sensor-1", KeyType::EcdsaP256, 1)
            .unwrap();
        let err = Admission::new(AdmissionOptions {
            mode: AdmissionMode::X509,
            trusted_ca_pem: Some(format!("{}{leaf}", root.cert_pem())),
            ..AdmissionOptions::default()
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "admission.trusted_ca: certificate 2 (CN=sensor-1) is not a CA certificate (basicConstraints CA=true missing)"
        );

        let err = Admission::new(AdmissionOptions {
            mode: AdmissionMode::X509,
            trusted_ca_pem: Some("no pem here".into()),
            ..AdmissionOptions::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().starts_with("admission.trusted_ca: "),
            "{err}"
        );

        let err = Admission::new(AdmissionOptions {
            mode: AdmissionMode::X509,
            trusted_ca_pem: Some(root.cert_pem().to_string()),
            x509_window_secs: 0,
            ..AdmissionOptions::default()
        })
        .unwrap_err();
        assert!(matches!(err, AdmissionError::ZeroWindow), "{err}");
    }

    #[test]
    fn decodes_group_keys_and_names_the_source_on_error() {
        let key = decode_group_key(&Secret::from(format!("{GROUP_KEY_B64}\n")), "k").unwrap();
        assert_eq!(
            key.expose(),
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijkl"
        );
        let err = decode_group_key(&Secret::from("not*base64"), "/etc/fleetgw/group.key")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/fleetgw/group.key: the group key is not valid base64"),
            "{err}"
        );
        let err = decode_group_key(&Secret::from("c2hvcnQ="), "admission.group_key")
            .unwrap_err()
            .to_string();
        assert!(err.contains("is 5 bytes"), "{err}");
    }

    #[test]
    fn modes_parse_and_print_in_config_spelling() {
        for mode in AdmissionMode::ALL {
            assert_eq!(mode.as_str().parse::<AdmissionMode>().unwrap(), mode);
            assert_eq!(serde_json::to_string(&mode).unwrap(), format!("\"{mode}\""));
        }
        assert_eq!(
            "x509".parse::<AdmissionMode>().unwrap(),
            AdmissionMode::X509
        );
        assert_eq!(
            "symmetric-key".parse::<AdmissionMode>().unwrap(),
            AdmissionMode::SymmetricKey
        );
        let err = "sas".parse::<AdmissionMode>().unwrap_err().to_string();
        assert_eq!(
            err,
            "admission.mode \"sas\" is unknown; use \"approve\", \"open\", \"symmetric-key\" or \"x509\""
        );
    }

    #[test]
    fn attestations_use_the_device_contract_wire_format() {
        let none: Attestation = serde_json::from_str(r#"{"type":"none"}"#).unwrap();
        assert_eq!(none, Attestation::None);
        assert_eq!(serde_json::to_string(&none).unwrap(), r#"{"type":"none"}"#);

        let sas: Attestation =
            serde_json::from_str(r#"{"type":"symmetricKey","sas":"SharedAccessSignature sr=a"}"#)
                .unwrap();
        assert_eq!(
            sas,
            Attestation::SymmetricKey {
                sas: "SharedAccessSignature sr=a".into()
            }
        );

        let x509: Attestation = serde_json::from_str(
            r#"{"type":"x509","certificatePem":"PEM","signature":"c2ln","timestamp":1700000000}"#,
        )
        .unwrap();
        assert_eq!(
            x509,
            Attestation::X509 {
                certificate_pem: "PEM".into(),
                signature: "c2ln".into(),
                timestamp: 1_700_000_000
            }
        );
        assert_eq!(
            serde_json::to_value(&x509).unwrap(),
            serde_json::json!({"type":"x509","certificatePem":"PEM","signature":"c2ln","timestamp":1700000000})
        );

        // CBOR (the other payload format) round-trips too.
        let mut cbor = Vec::new();
        ciborium::into_writer(&x509, &mut cbor).unwrap();
        let back: Attestation = ciborium::from_reader(cbor.as_slice()).unwrap();
        assert_eq!(back, x509);

        let err = serde_json::from_str::<Attestation>(r#"{"type":"password"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `password`"), "{err}");

        // Credentials stay out of logs.
        let debug = format!("{sas:?} {x509:?}");
        assert!(
            !debug.contains("SharedAccessSignature") && !debug.contains("c2ln"),
            "{debug}"
        );
        assert_eq!(Attestation::default(), Attestation::None);
    }

    #[test]
    fn admission_can_be_shared_across_tasks() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<Admission>();
        send_sync::<Attestation>();
    }
}
