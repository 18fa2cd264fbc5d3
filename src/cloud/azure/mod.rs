//! Azure client side: DPS registration over MQTT and HTTPS ([`dps`]) and IoT Hub telemetry over
//! MQTT and HTTPS ([`hub`]), with symmetric key (SAS tokens from a key derived from the
//! enrollment group key) or X.509 attestation ([`DeviceCredential`]); [`AzureProvider`] puts
//! them behind the engine's [`crate::cloud::Provider`].
//!
//! Endpoints are named by host (what goes into SAS tokens, usernames and TLS server names) and
//! optionally reached at another socket address (`connect`), so the same code talks to
//! `global.azure-devices-provisioning.net:8883` and to the emulator on 127.0.0.2:8883.

pub mod dps;
pub mod hub;
mod link;
mod provider;

pub use provider::{hub_profile, AzureAttestation, AzureProvider, AzureProviderOptions};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::admission::sas;
use crate::clock;
use crate::identity::{self, PrivateKey};

/// Default lifetime of the SAS tokens this client makes (the SDKs use one hour).
pub const DEFAULT_SAS_TTL: Duration = Duration::from_secs(3600);

/// How a device proves its identity to DPS and IoT Hub.
#[derive(Clone)]
pub enum DeviceCredential {
    /// Symmetric key: the raw device key (derive it with [`device_key_from_group`]).
    SymmetricKey {
        /// Raw device key bytes.
        device_key: Vec<u8>,
        /// Lifetime of each SAS token made from it.
        sas_ttl: Duration,
    },
    /// X.509: the certificate chain (leaf first, CN = registration id) and its key.
    X509 {
        /// PEM chain, leaf first.
        chain_pem: String,
        /// The leaf's key.
        key: PrivateKey,
    },
}

impl std::fmt::Debug for DeviceCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceCredential::SymmetricKey { sas_ttl, .. } => f
                .debug_struct("SymmetricKey")
                .field("device_key", &"[redacted]")
                .field("sas_ttl", sas_ttl)
                .finish(),
            DeviceCredential::X509 { .. } => f.write_str("X509 { .. }"),
        }
    }
}

/// The device key DPS derives for `registration_id` from a symmetric-key enrollment group's
/// key: `HMAC-SHA256(groupKey, registrationId)`, over the id exactly as the device spells it.
pub fn device_key_from_group(group_key: &[u8], registration_id: &str) -> Vec<u8> {
    sas::derive_device_key(group_key, registration_id)
}

impl DeviceCredential {
    /// A SAS token for `resource_uri`, valid for the configured lifetime (none for X.509).
    fn sas(&self, resource_uri: &str) -> Option<String> {
        match self {
            DeviceCredential::SymmetricKey {
                device_key,
                sas_ttl,
            } => {
                let expiry =
                    clock::unix_secs() + i64::try_from(sas_ttl.as_secs()).unwrap_or(i64::MAX / 2);
                Some(sas::generate_sas(resource_uri, device_key, expiry, None))
            }
            DeviceCredential::X509 { .. } => None,
        }
    }

    /// TLS trusting `ca_pem`, presenting the certificate for X.509.
    fn tls(&self, ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, identity::IdentityError> {
        match self {
            DeviceCredential::SymmetricKey { .. } => identity::tls::client_config(ca_pem, None),
            DeviceCredential::X509 { chain_pem, key } => {
                identity::tls::client_config(ca_pem, Some((chain_pem, key)))
            }
        }
    }
}

/// A service endpoint: the host name it is known by and where to connect.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Host name (or IP) used in SAS resource URIs, usernames and as the TLS server name.
    pub host: String,
    /// Where to connect (defaults to `host` at the service port when `None`). Over MQTT the
    /// TLS server name is then this address's IP (rumqttc names the server by the address it
    /// connects to), so the service certificate must carry it as an iPAddress SAN, as the
    /// emulator's does; over HTTPS the server name stays `host`.
    pub connect: Option<SocketAddr>,
}

impl Endpoint {
    /// `host:port` or the explicit connect address, as a string tokio can resolve.
    fn address(&self, default_port: u16) -> String {
        match self.connect {
            Some(addr) => addr.to_string(),
            None => format!("{}:{default_port}", self.host),
        }
    }
}

/// Why an Azure call failed.
#[derive(Debug, thiserror::Error)]
pub enum AzureError {
    /// TLS configuration could not be built from the CA or credential.
    #[error("TLS setup: {0}")]
    Tls(#[from] identity::IdentityError),
    /// The connection failed or was refused (CONNACK, TLS, socket).
    #[error("{service}: cannot connect to {address}: {reason}")]
    Connect {
        /// "DPS" or "IoT Hub".
        service: &'static str,
        /// The address.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The service answered with an error status.
    #[error("{service} answered {status} (errorCode {error_code}): {message}")]
    Service {
        /// "DPS" or "IoT Hub".
        service: &'static str,
        /// HTTP status (or the MQTT response topic's status).
        status: u16,
        /// The `errorCode` field, 0 when absent.
        error_code: u64,
        /// The `message` field or the body.
        message: String,
    },
    /// Throttled (429): retry after this long.
    #[error("{service} throttled the request; retry after {retry_after:?}")]
    Throttled {
        /// "DPS" or "IoT Hub".
        service: &'static str,
        /// From `retry-after`.
        retry_after: Duration,
    },
    /// No answer in time.
    #[error("{service}: no answer within {waited:?} to {what}")]
    Timeout {
        /// "DPS" or "IoT Hub".
        service: &'static str,
        /// The request.
        what: String,
        /// How long it waited.
        waited: Duration,
    },
    /// The answer was not what the protocol says.
    #[error("{service}: unexpected answer: {reason}")]
    Protocol {
        /// "DPS" or "IoT Hub".
        service: &'static str,
        /// What was wrong.
        reason: String,
    },
}
