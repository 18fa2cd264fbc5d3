//! Which cloud the gateway talks to: the [`Provider`] built from `[cloud]` (AWS fleet
//! provisioning by claim, or Azure DPS with IoT Hub), and the telemetry options that follow
//! from it. Options are read and checked before the store opens, so a broken key file or
//! certificate is a config error at start; the provider itself starts later.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::run::{gateway_credentials, read_group_key, read_text, RunError};
use crate::cloud::aws::claim::ClaimOptions;
use crate::cloud::aws::{self, AwsProvider, AwsProviderOptions, OWNERSHIP_TOKEN_TTL};
use crate::cloud::azure::dps::{DpsConfig, DpsTransport};
use crate::cloud::azure::{AzureAttestation, AzureProvider, AzureProviderOptions, Endpoint};
use crate::cloud::{Provider, TelemetryProfile, UpstreamTransport};
use crate::config::{self, CloudProvider, Config, TelemetryIdentity};
use crate::identity::{self, CertificateAuthority, PrivateKey};
use crate::telemetry::{MqttVersion, TelemetryOptions, UpstreamEndpoint};

/// The provider to start, with its options checked.
pub(super) enum ProviderPlan {
    /// AWS IoT fleet provisioning.
    Aws(AwsProviderOptions),
    /// Azure DPS and IoT Hub.
    Azure(AzureProviderOptions),
}

impl ProviderPlan {
    /// Reads and checks the `[cloud]` section's files and keys.
    pub(super) fn from_config(cfg: &Config) -> Result<Self, RunError> {
        Ok(match cfg.cloud.provider {
            CloudProvider::Aws => ProviderPlan::Aws(aws_options(cfg)?),
            CloudProvider::Azure => ProviderPlan::Azure(azure_options(cfg)?),
        })
    }

    /// The provider's telemetry conventions.
    pub(super) fn profile(&self) -> TelemetryProfile {
        match self {
            ProviderPlan::Aws(o) => o.telemetry.clone(),
            ProviderPlan::Azure(o) => o.attestation.telemetry_profile(),
        }
    }

    /// Starts it (AWS claim sessions connect in the background; Azure keeps no connection).
    pub(super) fn start(self) -> Arc<dyn Provider> {
        match self {
            ProviderPlan::Aws(o) => Arc::new(AwsProvider::start(o)),
            ProviderPlan::Azure(o) => Arc::new(AzureProvider::new(o)),
        }
    }
}

/// `host:port` (port 8883 when absent; IPv6 in brackets).
pub(super) fn split_endpoint(endpoint: &str) -> Result<(String, u16), RunError> {
    let bad = |reason: &str| RunError::Config {
        key: "cloud.aws.endpoint",
        reason: format!("{endpoint:?}: {reason}"),
    };
    if let Ok(addr) = endpoint.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (
            h,
            p.parse::<u16>()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
        ),
        _ => (endpoint, 8883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad("expected host:port"));
    }
    Ok((host.to_string(), port))
}

/// Telemetry options for `profile`: `[telemetry]` with the provider's topics and limits, and
/// the endpoint of the gateway identity's one link (AWS only).
pub(super) fn telemetry_options(
    cfg: &Config,
    profile: TelemetryProfile,
) -> Result<TelemetryOptions, RunError> {
    let endpoint = match cfg.cloud.provider {
        CloudProvider::Aws => {
            let aws = &cfg.cloud.aws;
            let (host, port) = split_endpoint(&aws.endpoint)?;
            UpstreamEndpoint {
                host,
                port,
                ca_pem: read_text(&aws.ca)?,
            }
        }
        // Every Azure device has its own link to its assigned hub (no gateway identity).
        CloudProvider::Azure => UpstreamEndpoint {
            host: String::new(),
            port: 8883,
            ca_pem: String::new(),
        },
    };
    let mut opts = TelemetryOptions::from_config(&cfg.telemetry, endpoint, profile)?;
    if opts.identity == TelemetryIdentity::Gateway {
        opts.gateway = Some(gateway_credentials(cfg)?);
    }
    match cfg.cloud.provider {
        CloudProvider::Aws => {
            opts.keep_alive = Duration::from_secs(cfg.cloud.aws.keep_alive_secs.max(1));
            if cfg.cloud.aws.mqtt_version == 3 {
                opts.mqtt_version = MqttVersion::V4;
            }
        }
        CloudProvider::Azure => {
            opts.keep_alive = Duration::from_secs(cfg.cloud.azure.keep_alive_secs.max(1));
        }
    }
    Ok(opts)
}

fn aws_options(cfg: &Config) -> Result<AwsProviderOptions, RunError> {
    let aws = &cfg.cloud.aws;
    let (host, port) = split_endpoint(&aws.endpoint)?;
    let (upstream_host, upstream_port) = (host.clone(), port);
    let ca_pem = read_text(&aws.ca)?;
    let cert_pem = read_text(&aws.claim_cert)?;
    let passphrase = identity::read_passphrase(
        aws.claim_key_passphrase_file.as_deref(),
        aws.claim_key_passphrase_credential.as_deref(),
    )
    .map_err(|source| RunError::Identity {
        key: "cloud.aws.claim_key_passphrase_file",
        source,
    })?;
    let key = PrivateKey::import_file(&aws.claim_key, passphrase.as_ref()).map_err(|source| {
        RunError::Identity {
            key: "cloud.aws.claim_key",
            source,
        }
    })?;
    let tls = identity::tls::client_config(&ca_pem, Some((&cert_pem, &key))).map_err(|source| {
        RunError::Identity {
            key: "cloud.aws.claim_cert",
            source,
        }
    })?;
    let request_timeout = Duration::from_millis(cfg.provision.request_timeout_ms.max(100));
    Ok(AwsProviderOptions {
        claim: ClaimOptions {
            host,
            port,
            tls,
            client_id_prefix: format!("fleetgw-{}-claim", cfg.gateway.id),
            sessions: aws.sessions.max(1) as usize,
            template: aws.template.clone(),
            format: aws.format,
            keep_alive: Duration::from_secs(aws.keep_alive_secs),
            request_timeout,
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            queue_timeout: request_timeout.max(Duration::from_secs(10)),
            // AWS IoT allows 128 KiB; certificates are a few KiB.
            max_packet_bytes: 256 * 1024,
        },
        tps: f64::from(aws.tps.max(1)),
        token_ttl: OWNERSHIP_TOKEN_TTL,
        upstream: UpstreamEndpoint {
            host: upstream_host,
            port: upstream_port,
            ca_pem: ca_pem.clone(),
        },
        telemetry: aws::telemetry_profile(&cfg.telemetry)?,
    })
}

/// `[cloud.azure]`: DPS endpoint and scope, the enrollment group's key or CA, the hub
/// transport.
fn azure_options(cfg: &Config) -> Result<AzureProviderOptions, RunError> {
    let az = &cfg.cloud.azure;
    let id_scope = az.id_scope.clone().ok_or_else(|| RunError::Config {
        key: "cloud.azure.id_scope",
        reason: "needed with cloud.provider = \"azure\"".into(),
    })?;
    let ca_path = az.ca.as_ref().ok_or_else(|| RunError::Config {
        key: "cloud.azure.ca",
        reason: "needed with cloud.provider = \"azure\" (e.g. /etc/ssl/certs/ca-certificates.crt)"
            .into(),
    })?;
    let ca_pem = read_text(ca_path)?;
    identity::parse_certificates(&ca_pem).map_err(|e| RunError::Config {
        key: "cloud.azure.ca",
        reason: format!("{}: {e}", ca_path.display()),
    })?;
    let endpoint = dps_endpoint(&az.dps_endpoint)?;
    let attestation = match az.attestation {
        config::AzureAttestation::SymmetricKey => {
            let group_key = read_group_key(
                az.group_key.as_ref(),
                az.group_key_file.as_deref(),
                "cloud.azure.group_key",
            )?
            .ok_or_else(|| RunError::Config {
                key: "cloud.azure.attestation",
                reason:
                    "\"symmetric-key\" needs cloud.azure.group_key or cloud.azure.group_key_file"
                        .into(),
            })?;
            AzureAttestation::SymmetricKey { group_key }
        }
        config::AzureAttestation::X509 => {
            let (Some(cert_path), Some(key_path)) = (&az.group_ca_cert, &az.group_ca_key) else {
                return Err(RunError::Config {
                    key: "cloud.azure.attestation",
                    reason: "\"x509\" needs cloud.azure.group_ca_cert and cloud.azure.group_ca_key"
                        .into(),
                });
            };
            let cert_pem = read_text(cert_path)?;
            let passphrase = identity::read_passphrase(
                az.group_ca_key_passphrase_file.as_deref(),
                az.group_ca_key_passphrase_credential.as_deref(),
            )
            .map_err(|source| RunError::Identity {
                key: "cloud.azure.group_ca_key_passphrase_file",
                source,
            })?;
            let key = PrivateKey::import_file(key_path, passphrase.as_ref()).map_err(|source| {
                RunError::Identity {
                    key: "cloud.azure.group_ca_key",
                    source,
                }
            })?;
            let ca = CertificateAuthority::from_pem(
                &cert_pem,
                key.to_pkcs8_pem().expose_str().unwrap_or_default(),
            )
            .map_err(|e| RunError::Config {
                key: "cloud.azure.group_ca_cert",
                reason: format!("{} with {}: {e}", cert_path.display(), key_path.display()),
            })?;
            AzureAttestation::X509 { ca: Arc::new(ca) }
        }
    };
    let transport = |t: config::AzureTransport| match t {
        config::AzureTransport::Mqtt => DpsTransport::Mqtt,
        config::AzureTransport::Https => DpsTransport::Https,
    };
    let request_timeout = Duration::from_millis(cfg.provision.request_timeout_ms.max(100));
    Ok(AzureProviderOptions {
        dps: DpsConfig {
            endpoint,
            id_scope,
            ca_pem,
            transport: transport(az.transport),
            request_timeout,
            // The engine polls; each DpsClient call is one request.
            max_polls: 1,
            max_throttled: 0,
        },
        attestation,
        hub_transport: match az.hub_transport {
            config::AzureTransport::Mqtt => UpstreamTransport::Mqtt,
            config::AzureTransport::Https => UpstreamTransport::Https,
        },
        hub_connect: az.hub_connect,
        registrations: az.registrations.max(1) as usize,
        tps: f64::from(az.tps.max(1)),
        sas_ttl: Duration::from_secs(az.sas_ttl_secs),
    })
}

/// `cloud.azure.dps_endpoint`: a host name (the service ports), or `IP:PORT` to connect to.
fn dps_endpoint(text: &str) -> Result<Endpoint, RunError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Endpoint {
            host: addr.ip().to_string(),
            connect: Some(addr),
        });
    }
    if text.is_empty() || text.contains([':', '/', ' ']) {
        return Err(RunError::Config {
            key: "cloud.azure.dps_endpoint",
            reason: format!(
                "{text:?} is neither a host name (global.azure-devices-provisioning.net) nor IP:PORT"
            ),
        });
    }
    Ok(Endpoint {
        host: text.to_string(),
        connect: None,
    })
}
