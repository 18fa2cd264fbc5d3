//! The cloud side of provisioning: the [`Provider`] seam the engine and telemetry talk to, and
//! its implementations (AWS IoT fleet provisioning in [`aws`]; Azure DPS and IoT Hub in
//! [`azure`]; a scriptable fake for tests in `fake`, with the `test-hooks` feature), plus the
//! payload codecs ([`codec`]) shared by the cloud clients and the emulators.
//!
//! The engine never sees MQTT topics or payload formats. Where the provider wants a
//! certificate ([`Provider::certificate_source`]) it hands a CSR to
//! [`Provider::create_certificate`] and persists the [`IssuedCertificate`] (with its ownership
//! token on AWS); then it calls [`Provider::register`]. A registration the cloud finishes later
//! (Azure DPS `assigning`) comes back as [`RegisterOutcome::Pending`]: the engine persists the
//! operation before it calls [`Provider::poll`], so a restart polls instead of registering
//! twice. Telemetry asks [`Provider::upstream`] how a registered device connects upstream.
//! Errors come back as [`CloudError`], which tells the engine whether to retry (transient),
//! slow down (throttling), start again with a new certificate (invalid ownership token) or
//! give up (permanent rejection).

pub mod aws;
pub mod azure;
pub mod codec;
#[cfg(any(test, feature = "test-hooks"))]
pub mod fake;
pub mod rate;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::device_id::DeviceId;
use crate::identity::Secret;
use crate::telemetry::{CommandFilter, TopicTemplate};

/// A boxed, sendable future: keeps [`Provider`] usable as `Arc<dyn Provider>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A certificate issued for a device's CSR.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// The certificate's id (the cloud's, or the SHA-256 fingerprint of one the gateway
    /// issued).
    pub certificate_id: String,
    /// The issued certificate (PEM); for a gateway-issued one, the chain up to the enrollment
    /// group's CA.
    pub certificate_pem: String,
    /// Bearer credential that lets RegisterThing activate this certificate (AWS only).
    pub ownership_token: Option<Secret>,
    /// When the ownership token stops being accepted (unix milliseconds).
    pub expires_at_ms: Option<u64>,
}

/// Where a registered device's certificate comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateSource {
    /// The cloud signs the device's CSR (AWS CreateCertificateFromCsr).
    Cloud,
    /// The gateway signs it with the enrollment group's CA (Azure DPS X.509 group).
    Gateway,
    /// No certificate: the device proves itself with a key derived from a group key (Azure
    /// DPS symmetric key), so no key pair or CSR is made.
    None,
}

/// The result of registering a device with the cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The cloud's name for the device: the AWS thing name, the IoT Hub device id.
    pub cloud_id: String,
    /// Where its telemetry goes when the cloud chose it (the assigned IoT Hub's host name).
    pub endpoint: Option<String>,
    /// What else the registration returned (AWS `deviceConfiguration`; DPS `substatus`).
    pub extras: BTreeMap<String, String>,
}

/// Where a registration stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// Registered.
    Done(Registration),
    /// The cloud is still working on it: poll `operation` after `retry_after`.
    Pending {
        /// The cloud's operation id.
        operation: String,
        /// The wait the cloud asked for.
        retry_after: Duration,
    },
}

/// What a registration call gets to know about the device.
#[derive(Clone, Copy, Debug)]
pub struct RegisterInput<'a> {
    /// The device.
    pub device: &'a DeviceId,
    /// Its certificate, when the provider wanted one.
    pub certificate: Option<&'a IssuedCertificate>,
    /// Its private key (PEM) when the gateway holds it and the provider asked for it
    /// ([`Provider::needs_device_key`]).
    pub key_pem: Option<&'a Secret>,
    /// RegisterThing parameters / DPS payload.
    pub parameters: &'a BTreeMap<String, String>,
}

/// How a registered device connects upstream for telemetry: the provider's answer for one
/// device.
#[derive(Clone, Debug)]
pub struct UpstreamSpec {
    /// MQTT or HTTPS.
    pub transport: UpstreamTransport,
    /// Host name the endpoint is known by: the TLS server name, and the host in SAS tokens
    /// and usernames.
    pub host: String,
    /// Port at `host`.
    pub port: u16,
    /// Where to connect instead of `host:port` (a test or private-network address).
    pub connect: Option<SocketAddr>,
    /// CA certificates (PEM) the endpoint's certificate chains to.
    pub ca_pem: Arc<str>,
    /// MQTT client id.
    pub client_id: String,
    /// MQTT username, if the cloud wants one.
    pub username: Option<String>,
    /// How the device proves itself.
    pub auth: UpstreamAuth,
}

/// MQTT or HTTPS upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamTransport {
    /// One MQTT connection per device (QoS 1, in-flight window).
    Mqtt,
    /// HTTPS POST per message (IoT Hub).
    Https,
}

/// A device's upstream credential.
#[derive(Clone)]
pub enum UpstreamAuth {
    /// TLS client certificate: the one in the device record, with the key in the `secrets`
    /// tree.
    DeviceCertificate,
    /// SAS tokens signed with `device_key` for `resource` (`{hub}/devices/{id}`), each valid
    /// for `ttl`: the MQTT password, or the HTTPS `Authorization` header.
    Sas {
        /// Raw device key.
        device_key: Secret,
        /// The resource URI the tokens are for.
        resource: String,
        /// Lifetime of each token; a link reconnects with a new one before it expires.
        ttl: Duration,
    },
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAuth::DeviceCertificate => f.write_str("DeviceCertificate"),
            UpstreamAuth::Sas { resource, ttl, .. } => f
                .debug_struct("Sas")
                .field("resource", resource)
                .field("ttl", ttl)
                .finish_non_exhaustive(),
        }
    }
}

/// The provider's telemetry conventions, the same for every device.
#[derive(Clone, Debug)]
pub struct TelemetryProfile {
    /// Topic every device message goes to (rendered with the cloud id).
    pub topic: TopicTemplate,
    /// Filter carrying cloud-to-device messages (`None`: not forwarded).
    pub commands: Option<CommandFilter>,
    /// Largest payload the cloud takes.
    pub max_payload_bytes: usize,
    /// Whether one connection may carry every device (`telemetry.identity = "gateway"`).
    pub gateway_identity: bool,
    /// Whether devices connect with their certificate, so the gateway must hold their key
    /// (false for SAS tokens made from a derived key).
    pub device_certificates: bool,
    /// The protocol of the cloud's MQTT telemetry connections: MQTT 5 (AWS IoT Core, message
    /// properties travel with the publish) or 3.1.1 (IoT Hub, properties ride in the topic).
    pub mqtt_version: crate::mqtt::upstream::MqttVersion,
}

/// The provider calls the engine makes, for logs and metrics labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// [`Provider::create_certificate`].
    CreateCertificate,
    /// [`Provider::register`].
    Register,
    /// [`Provider::poll`].
    Poll,
}

impl Api {
    /// The call's AWS name (the fake provider's, too); [`Provider::api_name`] gives each
    /// provider's own.
    pub fn name(self) -> &'static str {
        match self {
            Api::CreateCertificate => "CreateCertificateFromCsr",
            Api::Register => "RegisterThing",
            Api::Poll => "GetOperationStatus",
        }
    }
}

/// How registered devices connect upstream: the part of a provider telemetry needs.
pub trait Upstreams: Send + Sync + std::fmt::Debug + 'static {
    /// How the registered device `cloud_id` (at `endpoint`, when the cloud chose one)
    /// connects upstream.
    fn upstream(
        &self,
        device: &DeviceId,
        cloud_id: &str,
        endpoint: Option<&str>,
    ) -> Result<UpstreamSpec, CloudError>;
}

/// The cloud operations the provisioning engine and telemetry need, independent of the
/// vendor.
pub trait Provider: Upstreams {
    /// Short provider name for logs ("aws", "azure").
    fn name(&self) -> &'static str;

    /// Where a device's certificate comes from.
    fn certificate_source(&self) -> CertificateSource;

    /// The cloud's name for a call ("RegisterThing"), as the metrics label it.
    fn api_name(&self, api: Api) -> &'static str;

    /// True when registering (and polling) must present the device's own key, which the
    /// engine then unseals for the call (Azure X.509: DPS authenticates the device by TLS).
    fn needs_device_key(&self) -> bool {
        false
    }

    /// Issues a certificate for the CSR (and, on AWS, an ownership token).
    fn create_certificate<'a>(
        &'a self,
        device: &'a DeviceId,
        csr_pem: &'a str,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CloudError>>;

    /// Registers the device, activating its certificate where there is one.
    fn register<'a>(
        &'a self,
        input: RegisterInput<'a>,
    ) -> BoxFuture<'a, Result<RegisterOutcome, CloudError>>;

    /// Asks where a pending registration stands.
    fn poll<'a>(
        &'a self,
        input: RegisterInput<'a>,
        operation: &'a str,
    ) -> BoxFuture<'a, Result<RegisterOutcome, CloudError>>;

    /// The provider's topic conventions and limits.
    fn telemetry_profile(&self) -> TelemetryProfile;

    /// Cloud sessions connected now and configured (admin `/status`, the systemd status line).
    fn sessions(&self) -> (usize, usize);

    /// Changes the calls per second allowed (config reload).
    fn set_tps(&self, tps: f64) -> BoxFuture<'_, ()>;

    /// Finishes the calls in flight and closes the connections.
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// The AWS error code for an unknown, expired or already-consumed ownership token.
pub const INVALID_OWNERSHIP_TOKEN: &str = "InvalidCertificateOwnershipToken";

/// Why a cloud call did not succeed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloudError {
    /// The cloud answered with an error (`/rejected` on AWS). Permanent for 4xx, transient
    /// for 5xx.
    #[error("{api} rejected ({status_code} {error_code}): {error_message}")]
    Rejected {
        /// Which call ("CreateCertificateFromCsr", "RegisterThing").
        api: &'static str,
        /// HTTP-like status code.
        status_code: u16,
        /// The cloud's error code.
        error_code: String,
        /// The cloud's explanation.
        error_message: String,
    },
    /// The cloud refused the call because of its rate limit (429 / throttling).
    #[error("{api} throttled ({status_code} {error_code}): {error_message}")]
    Throttled {
        /// Which call.
        api: &'static str,
        /// How long the cloud asked us to wait (`Retry-After`), when it said.
        retry_after: Option<Duration>,
        /// HTTP-like status code (429).
        status_code: u16,
        /// The cloud's error code.
        error_code: String,
        /// The cloud's explanation.
        error_message: String,
    },
    /// No answer within the request timeout.
    #[error("{api}: no response within {after_ms} ms")]
    Timeout {
        /// Which call.
        api: &'static str,
        /// The timeout that expired.
        after_ms: u64,
    },
    /// The connection to the cloud failed or dropped before the answer came.
    #[error("{api}: connection to the cloud lost: {reason}")]
    Disconnected {
        /// Which call.
        api: &'static str,
        /// What happened to the connection.
        reason: String,
    },
    /// The cloud's answer could not be understood, or does not fit the request.
    #[error("{api}: unusable response: {reason}")]
    Protocol {
        /// Which call.
        api: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The provider is shutting down and takes no more calls.
    #[error("{api}: the cloud client is shutting down")]
    ShuttingDown {
        /// Which call.
        api: &'static str,
    },
}

impl CloudError {
    /// Builds the error for a cloud error response, classifying throttling.
    pub fn from_response(
        api: &'static str,
        status_code: u16,
        error_code: String,
        error_message: String,
    ) -> Self {
        let throttling = status_code == 429
            || error_code.eq_ignore_ascii_case("Throttling")
            || error_code.eq_ignore_ascii_case("ThrottlingException")
            || error_code.eq_ignore_ascii_case("TooManyRequests");
        if throttling {
            CloudError::Throttled {
                api,
                retry_after: None,
                status_code,
                error_code,
                error_message,
            }
        } else {
            CloudError::Rejected {
                api,
                status_code,
                error_code,
                error_message,
            }
        }
    }

    /// True when trying the same call again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            CloudError::Rejected { status_code, .. } => *status_code >= 500,
            CloudError::Throttled { .. }
            | CloudError::Timeout { .. }
            | CloudError::Disconnected { .. }
            | CloudError::Protocol { .. }
            | CloudError::ShuttingDown { .. } => true,
        }
    }

    /// True when the cloud asked us to slow down.
    pub fn is_throttling(&self) -> bool {
        matches!(self, CloudError::Throttled { .. })
    }

    /// True when the ownership token was refused: the device needs a new certificate.
    pub fn is_token_invalid(&self) -> bool {
        matches!(self, CloudError::Rejected { error_code, .. } if error_code == INVALID_OWNERSHIP_TOKEN)
    }

    /// `(statusCode, errorCode, errorMessage)` as kept with the device and shown to it.
    pub fn to_parts(&self) -> (u16, String, String) {
        match self {
            CloudError::Rejected {
                status_code,
                error_code,
                error_message,
                ..
            }
            | CloudError::Throttled {
                status_code,
                error_code,
                error_message,
                ..
            } => (*status_code, error_code.clone(), error_message.clone()),
            CloudError::Timeout { .. } => (504, "CloudTimeout".into(), self.to_string()),
            CloudError::Disconnected { .. } | CloudError::ShuttingDown { .. } => {
                (503, "CloudUnavailable".into(), self.to_string())
            }
            CloudError::Protocol { .. } => (502, "CloudProtocolError".into(), self.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(status: u16, code: &str) -> CloudError {
        CloudError::from_response("RegisterThing", status, code.into(), "m".into())
    }

    #[test]
    fn classifies_cloud_errors() {
        let bad_csr = rejected(400, "InvalidCSR");
        assert!(!bad_csr.is_transient());
        assert!(!bad_csr.is_throttling());
        assert!(!bad_csr.is_token_invalid());

        let throttled = rejected(429, "Throttling");
        assert!(matches!(throttled, CloudError::Throttled { .. }));
        assert!(throttled.is_transient() && throttled.is_throttling());

        let by_code = rejected(400, "ThrottlingException");
        assert!(by_code.is_throttling());

        let token = rejected(400, INVALID_OWNERSHIP_TOKEN);
        assert!(token.is_token_invalid() && !token.is_transient());

        assert!(rejected(503, "ServiceUnavailable").is_transient());
        let timeout = CloudError::Timeout {
            api: "RegisterThing",
            after_ms: 10,
        };
        assert!(timeout.is_transient() && !timeout.is_throttling());
        assert_eq!(timeout.to_parts().1, "CloudTimeout");
        assert_eq!(
            bad_csr.to_parts(),
            (400, "InvalidCSR".to_string(), "m".to_string())
        );
    }

    #[test]
    fn messages_name_the_call() {
        let e = rejected(404, "ResourceNotFound");
        assert_eq!(
            e.to_string(),
            "RegisterThing rejected (404 ResourceNotFound): m"
        );
    }
}
