//! [`AzureProvider`]: the [`Provider`] for Azure IoT Hub Device Provisioning Service.
//!
//! The registration id is the device id (fleetgw's ids already follow DPS's rules: lower-case
//! letters, digits and `-._:`). Each registration uses a connection of its own (DPS has no
//! correlation across registrations on one MQTT connection), at most
//! `cloud.azure.registrations` at once and `cloud.azure.tps` calls per second, halved while
//! DPS answers 429. An `assigning` answer goes back to the engine as
//! [`RegisterOutcome::Pending`], which persists the operation id before the first poll.
//!
//! Attestation decides where credentials come from:
//! - symmetric key: each device's key is `HMAC-SHA256(groupKey, registrationId)`; DPS and
//!   IoT Hub see SAS tokens signed with it. No key pair or certificate is made.
//! - X.509: the gateway holds the enrollment group's CA and signs each device's CSR (CN =
//!   registration id); DPS and IoT Hub authenticate the device by TLS with that certificate
//!   and the key the gateway generated.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::dps::{DpsClient, DpsConfig, RegistrationState, RegistrationStatus};
use super::hub::{MAX_MESSAGE_BYTES, MQTT_API_VERSION};
use super::{device_key_from_group, AzureError, DeviceCredential};
use crate::cloud::rate::AdaptiveRateLimiter;
use crate::cloud::{
    Api, BoxFuture, CertificateSource, CloudError, IssuedCertificate, Provider, RegisterInput,
    RegisterOutcome, Registration, TelemetryProfile, UpstreamAuth, UpstreamSpec, UpstreamTransport,
    Upstreams,
};
use crate::device_id::DeviceId;
use crate::identity::{self, CertificateAuthority, PrivateKey, Secret};
use crate::telemetry::{CommandFilter, TopicTemplate};

/// Days a gateway-issued device certificate is valid.
const DEVICE_CERT_DAYS: u32 = 365;

/// How devices attest to DPS.
#[derive(Clone)]
pub enum AzureAttestation {
    /// The symmetric-key enrollment group's key (raw bytes).
    SymmetricKey {
        /// The group key.
        group_key: Secret,
    },
    /// The X.509 enrollment group's CA, which signs each device's certificate.
    X509 {
        /// The group CA with its key.
        ca: Arc<CertificateAuthority>,
    },
}

impl AzureAttestation {
    /// IoT Hub's telemetry conventions for devices attesting this way (X.509 devices connect
    /// with their certificate, symmetric-key ones with SAS tokens).
    pub fn telemetry_profile(&self) -> TelemetryProfile {
        hub_profile(matches!(self, AzureAttestation::X509 { .. }))
    }
}

impl std::fmt::Debug for AzureAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AzureAttestation::SymmetricKey { .. } => f.write_str("SymmetricKey([redacted])"),
            AzureAttestation::X509 { .. } => f.write_str("X509"),
        }
    }
}

/// Settings of [`AzureProvider`].
#[derive(Clone, Debug)]
pub struct AzureProviderOptions {
    /// DPS endpoint, scope, transport, CA and timeouts.
    pub dps: DpsConfig,
    /// Symmetric key or X.509.
    pub attestation: AzureAttestation,
    /// MQTT or HTTPS to the assigned hub.
    pub hub_transport: UpstreamTransport,
    /// Where to reach the assigned hub instead of its host name.
    pub hub_connect: Option<SocketAddr>,
    /// Registrations in flight at most.
    pub registrations: usize,
    /// DPS calls per second.
    pub tps: f64,
    /// Lifetime of each SAS token.
    pub sas_ttl: Duration,
}

/// Azure DPS registration and IoT Hub telemetry settings for the engine.
#[derive(Debug)]
pub struct AzureProvider {
    client: DpsClient,
    attestation: AzureAttestation,
    ca_pem: Arc<str>,
    hub_transport: UpstreamTransport,
    hub_connect: Option<SocketAddr>,
    sas_ttl: Duration,
    registrations: usize,
    permits: Semaphore,
    rate: AdaptiveRateLimiter,
}

impl AzureProvider {
    /// A provider for `opts` (no connection is kept between calls).
    pub fn new(opts: AzureProviderOptions) -> Self {
        let registrations = opts.registrations.max(1);
        AzureProvider {
            ca_pem: Arc::from(opts.dps.ca_pem.as_str()),
            client: DpsClient::new(opts.dps),
            attestation: opts.attestation,
            hub_transport: opts.hub_transport,
            hub_connect: opts.hub_connect,
            sas_ttl: opts.sas_ttl,
            registrations,
            permits: Semaphore::new(registrations),
            rate: AdaptiveRateLimiter::new(opts.tps),
        }
    }

    /// The device's DPS credential for this call.
    fn credential(&self, input: &RegisterInput<'_>) -> Result<DeviceCredential, CloudError> {
        let local = |reason: String| CloudError::Rejected {
            api: "DpsRegister",
            status_code: 500,
            error_code: "GatewayError".into(),
            error_message: format!("device {}: {reason}", input.device),
        };
        match &self.attestation {
            AzureAttestation::SymmetricKey { group_key } => Ok(DeviceCredential::SymmetricKey {
                device_key: device_key_from_group(group_key.expose(), input.device.as_str()),
                sas_ttl: self.sas_ttl,
            }),
            AzureAttestation::X509 { .. } => {
                let chain_pem = input
                    .certificate
                    .map(|c| c.certificate_pem.clone())
                    .ok_or_else(|| {
                        local("no certificate issued for the X.509 registration".into())
                    })?;
                let pem = input
                    .key_pem
                    .and_then(|k| k.expose_str())
                    .ok_or_else(|| local("the device's key is not available".into()))?;
                let key = PrivateKey::from_pem(pem).map_err(|e| local(format!("its key: {e}")))?;
                Ok(DeviceCredential::X509 { chain_pem, key })
            }
        }
    }

    /// One DPS call (register or poll), paced and bounded.
    async fn call(
        &self,
        api: &'static str,
        input: RegisterInput<'_>,
        operation: Option<&str>,
    ) -> Result<RegisterOutcome, CloudError> {
        let credential = self.credential(&input)?;
        let Ok(_permit) = self.permits.acquire().await else {
            return Err(CloudError::ShuttingDown { api });
        };
        self.rate.acquire().await;
        let registration_id = input.device.as_str();
        let result = match operation {
            None => {
                let payload = (!input.parameters.is_empty())
                    .then(|| serde_json::to_value(input.parameters).unwrap_or_default());
                self.client
                    .register(registration_id, &credential, payload)
                    .await
            }
            Some(op) => self.client.poll(registration_id, &credential, op).await,
        };
        match result {
            Ok(status) => {
                self.rate.on_success().await;
                outcome(api, status)
            }
            Err(e) => {
                let e = cloud_error(api, e);
                if e.is_throttling() {
                    self.rate.on_throttled().await;
                }
                Err(e)
            }
        }
    }
}

/// Signs the device's CSR with the X.509 enrollment group's CA (chain: leaf, then the CA).
fn issue_with(
    ca: Option<&CertificateAuthority>,
    device: &DeviceId,
    csr_pem: &str,
) -> Result<IssuedCertificate, CloudError> {
    let Some(ca) = ca else {
        return Err(CloudError::Rejected {
            api: "IssueCertificate",
            status_code: 500,
            error_code: "GatewayError".into(),
            error_message: "symmetric-key attestation issues no certificates".into(),
        });
    };
    let bad_csr = |e: identity::IdentityError| CloudError::Rejected {
        api: "IssueCertificate",
        status_code: 400,
        error_code: "InvalidCSR".into(),
        error_message: format!("device {device}: {e}"),
    };
    // DPS takes the registration id from the certificate's CN.
    let csr = identity::parse_csr(csr_pem).map_err(bad_csr)?;
    if csr.common_name.as_deref() != Some(device.as_str()) {
        return Err(CloudError::Rejected {
            api: "IssueCertificate",
            status_code: 400,
            error_code: "InvalidCSR".into(),
            error_message: format!(
                "the CSR's common name {:?} is not the registration id {device:?}; DPS takes the registration id from the certificate",
                csr.common_name.unwrap_or_default()
            ),
        });
    }
    let leaf = ca
        .issue_from_csr(csr_pem, DEVICE_CERT_DAYS)
        .map_err(bad_csr)?;
    let id = identity::parse_certificates(&leaf)
        .ok()
        .and_then(|c| c.into_iter().next())
        .map(|c| c.fingerprint_sha256_hex)
        .unwrap_or_default();
    let mut chain = leaf;
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    chain.push_str(ca.cert_pem());
    Ok(IssuedCertificate {
        certificate_id: id,
        certificate_pem: chain,
        ownership_token: None,
        expires_at_ms: None,
    })
}

/// The engine's view of a DPS answer.
fn outcome(api: &'static str, status: RegistrationStatus) -> Result<RegisterOutcome, CloudError> {
    match status {
        RegistrationStatus::Assigned(state) => Ok(RegisterOutcome::Done(registration(state))),
        RegistrationStatus::Assigning {
            operation_id,
            retry_after,
        } => Ok(RegisterOutcome::Pending {
            operation: operation_id,
            retry_after,
        }),
        RegistrationStatus::NotAssigned { status, state } => {
            let code = state.as_ref().and_then(|s| s.error_code);
            let detail = state
                .as_ref()
                .and_then(|s| s.error_message.clone())
                .unwrap_or_default();
            Err(CloudError::Rejected {
                api,
                // failed / disabled / unassigned are DPS's final word on this registration.
                status_code: 400,
                error_code: code.map_or_else(|| format!("Registration{status}"), |c| c.to_string()),
                error_message: format!("DPS registration {status}: {detail}"),
            })
        }
    }
}

fn registration(state: RegistrationState) -> Registration {
    let mut extras = BTreeMap::from([("status".to_string(), state.status)]);
    if !state.substatus.is_empty() {
        extras.insert("substatus".into(), state.substatus);
    }
    Registration {
        cloud_id: state.device_id,
        endpoint: Some(state.assigned_hub),
        extras,
    }
}

/// Maps a DPS client error onto the engine's classes.
fn cloud_error(api: &'static str, e: AzureError) -> CloudError {
    match e {
        AzureError::Service {
            status,
            error_code,
            message,
            ..
        } => CloudError::from_response(api, status, error_code.to_string(), message),
        AzureError::Throttled { retry_after, .. } => CloudError::Throttled {
            api,
            retry_after: Some(retry_after),
            status_code: 429,
            error_code: "429001".into(),
            error_message: format!("DPS asked to retry after {retry_after:?}"),
        },
        // DPS refuses a bad SAS token or certificate at CONNECT: not going to change by itself.
        AzureError::Connect { ref reason, .. }
            if reason.contains("NotAuthorized") || reason.contains("BadUserNamePassword") =>
        {
            CloudError::Rejected {
                api,
                status_code: 401,
                error_code: "401002".into(),
                error_message: e.to_string(),
            }
        }
        AzureError::Connect { .. } => CloudError::Disconnected {
            api,
            reason: e.to_string(),
        },
        AzureError::Timeout { waited, .. } => CloudError::Timeout {
            api,
            after_ms: waited.as_millis() as u64,
        },
        AzureError::Tls(_) | AzureError::Protocol { .. } => CloudError::Protocol {
            api,
            reason: e.to_string(),
        },
    }
}

/// IoT Hub's telemetry conventions: `devices/{deviceId}/messages/events/` with the subtopic
/// as a message property, commands from `devices/{deviceId}/messages/devicebound/#`, 256 KB.
pub fn hub_profile(device_certificates: bool) -> TelemetryProfile {
    TelemetryProfile {
        topic: TopicTemplate::azure_events(),
        commands: Some(
            CommandFilter::parse("devices/{thingName}/messages/devicebound/#")
                .unwrap_or_else(|_| unreachable!("the IoT Hub commands filter parses")),
        ),
        max_payload_bytes: MAX_MESSAGE_BYTES,
        gateway_identity: false,
        device_certificates,
        // IoT Hub's MQTT is 3.1.1.
        mqtt_version: crate::mqtt::upstream::MqttVersion::V4,
    }
}

impl Upstreams for AzureProvider {
    fn upstream(
        &self,
        device: &DeviceId,
        cloud_id: &str,
        endpoint: Option<&str>,
    ) -> Result<UpstreamSpec, CloudError> {
        let hub = endpoint
            .filter(|h| !h.is_empty())
            .ok_or_else(|| CloudError::Protocol {
                api: "DpsRegister",
                reason: format!("device {device} has no assigned hub recorded"),
            })?;
        let auth = match &self.attestation {
            AzureAttestation::SymmetricKey { group_key } => UpstreamAuth::Sas {
                device_key: Secret::new(device_key_from_group(group_key.expose(), device.as_str())),
                resource: format!("{hub}/devices/{cloud_id}"),
                ttl: self.sas_ttl,
            },
            AzureAttestation::X509 { .. } => UpstreamAuth::DeviceCertificate,
        };
        Ok(UpstreamSpec {
            transport: self.hub_transport,
            host: hub.to_string(),
            port: match self.hub_transport {
                UpstreamTransport::Mqtt => 8883,
                UpstreamTransport::Https => 443,
            },
            connect: self.hub_connect,
            ca_pem: self.ca_pem.clone(),
            client_id: cloud_id.to_string(),
            username: Some(format!("{hub}/{cloud_id}/?api-version={MQTT_API_VERSION}")),
            auth,
        })
    }
}

impl Provider for AzureProvider {
    fn name(&self) -> &'static str {
        "azure"
    }

    fn certificate_source(&self) -> CertificateSource {
        match self.attestation {
            AzureAttestation::SymmetricKey { .. } => CertificateSource::None,
            AzureAttestation::X509 { .. } => CertificateSource::Gateway,
        }
    }

    fn needs_device_key(&self) -> bool {
        matches!(self.attestation, AzureAttestation::X509 { .. })
    }

    fn api_name(&self, api: Api) -> &'static str {
        match api {
            Api::CreateCertificate => "IssueCertificate",
            Api::Register => "DpsRegister",
            Api::Poll => "DpsOperationStatus",
        }
    }

    fn create_certificate<'a>(
        &'a self,
        device: &'a DeviceId,
        csr_pem: &'a str,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CloudError>> {
        Box::pin(async move {
            let (device, csr) = (device.clone(), csr_pem.to_string());
            let ca = match &self.attestation {
                AzureAttestation::X509 { ca } => Some(ca.clone()),
                AzureAttestation::SymmetricKey { .. } => None,
            };
            // Signing is CPU work: off the runtime threads.
            tokio::task::spawn_blocking(move || issue_with(ca.as_deref(), &device, &csr))
                .await
                .unwrap_or_else(|e| {
                    Err(CloudError::Protocol {
                        api: "IssueCertificate",
                        reason: format!("signing task: {e}"),
                    })
                })
        })
    }

    fn register<'a>(
        &'a self,
        input: RegisterInput<'a>,
    ) -> BoxFuture<'a, Result<RegisterOutcome, CloudError>> {
        Box::pin(self.call("DpsRegister", input, None))
    }

    fn poll<'a>(
        &'a self,
        input: RegisterInput<'a>,
        operation: &'a str,
    ) -> BoxFuture<'a, Result<RegisterOutcome, CloudError>> {
        Box::pin(self.call("DpsOperationStatus", input, Some(operation)))
    }

    fn telemetry_profile(&self) -> TelemetryProfile {
        self.attestation.telemetry_profile()
    }

    fn sessions(&self) -> (usize, usize) {
        // No DPS connection is kept: those in use are the registrations in flight.
        (
            self.registrations - self.permits.available_permits(),
            self.registrations,
        )
    }

    fn set_tps(&self, tps: f64) -> BoxFuture<'_, ()> {
        Box::pin(self.rate.set_max_rate(tps))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.permits.close();
        })
    }
}
