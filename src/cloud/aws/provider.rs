//! [`AwsProvider`]: the [`Provider`] for AWS IoT fleet provisioning by claim.
//!
//! CreateCertificateFromCsr and RegisterThing go through the [`ClaimPool`], each API paced by
//! its own [`AdaptiveRateLimiter`] (config `cloud.aws.tps`, cut on repeated throttling). Payloads are
//! encoded with [`crate::cloud::codec`] in the configured format. An issued certificate is
//! checked against the CSR it answers before it is handed to the engine: a response that does
//! not fit its request is a protocol error, never a certificate for the wrong device.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::clock;
use crate::cloud::codec::{
    self, CreateCertificateFromCsrRequest, CreateCertificateFromCsrResponse, ErrorResponse,
    PayloadFormat, RegisterThingRequest, RegisterThingResponse,
};
use crate::cloud::rate::AdaptiveRateLimiter;
use crate::cloud::{
    Api, BoxFuture, CertificateSource, CloudError, IssuedCertificate, Provider, RegisterInput,
    RegisterOutcome, Registration, TelemetryProfile, UpstreamSpec, Upstreams,
};
use crate::config::TelemetrySection;
use crate::device_id::DeviceId;
use crate::identity::{self, Secret};
use crate::telemetry::{
    CommandFilter, TelemetryError, TopicTemplate, UpstreamEndpoint, AWS_MAX_PAYLOAD_BYTES,
};

use super::claim::{ClaimApi, ClaimOptions, ClaimPool, ClaimResponse, ResponseCheck};

/// How long AWS accepts an ownership token (1 hour), less a margin for clocks and the
/// RegisterThing round trip.
pub const OWNERSHIP_TOKEN_TTL: Duration = Duration::from_secs(55 * 60);

/// Settings of [`AwsProvider`].
#[derive(Clone, Debug)]
pub struct AwsProviderOptions {
    /// The claim session pool.
    pub claim: ClaimOptions,
    /// Calls per second allowed per API (config `cloud.aws.tps`).
    pub tps: f64,
    /// How long an ownership token is trusted to stay valid.
    pub token_ttl: Duration,
    /// Where registered devices send telemetry.
    pub upstream: UpstreamEndpoint,
    /// The `[telemetry]` topics.
    pub telemetry: TelemetryProfile,
}

/// The `[telemetry]` topic and commands templates with AWS IoT Core's 128 KiB payload limit.
pub fn telemetry_profile(section: &TelemetrySection) -> Result<TelemetryProfile, TelemetryError> {
    let topic = TopicTemplate::parse(&section.topic)?;
    let commands = if section.commands_topic.is_empty() {
        None
    } else {
        Some(CommandFilter::parse(&section.commands_topic)?)
    };
    Ok(TelemetryProfile {
        topic,
        commands,
        max_payload_bytes: AWS_MAX_PAYLOAD_BYTES,
        gateway_identity: true,
        device_certificates: true,
        // `cloud.aws.mqtt_version = 3` turns it down to 3.1.1 (see `cli::cloud`).
        mqtt_version: crate::mqtt::upstream::MqttVersion::V5,
    })
}

/// AWS IoT fleet provisioning through a pool of claim sessions.
#[derive(Debug)]
pub struct AwsProvider {
    pool: ClaimPool,
    create_rate: AdaptiveRateLimiter,
    register_rate: AdaptiveRateLimiter,
    format: PayloadFormat,
    token_ttl: Duration,
    upstream: UpstreamEndpoint,
    telemetry: TelemetryProfile,
    sessions: usize,
}

impl AwsProvider {
    /// Starts the claim sessions (they connect in the background).
    pub fn start(opts: AwsProviderOptions) -> Self {
        let format = opts.claim.format;
        let sessions = opts.claim.sessions.max(1);
        AwsProvider {
            pool: ClaimPool::start(opts.claim),
            create_rate: AdaptiveRateLimiter::new(opts.tps),
            register_rate: AdaptiveRateLimiter::new(opts.tps),
            format,
            token_ttl: opts.token_ttl,
            upstream: opts.upstream,
            telemetry: opts.telemetry,
            sessions,
        }
    }

    /// Claim sessions currently connected.
    pub fn connected_sessions(&self) -> usize {
        self.pool.connected_sessions()
    }

    /// Changes the calls per second allowed per provisioning API (`cloud.aws.tps`).
    pub async fn set_tps(&self, tps: f64) {
        self.create_rate.set_max_rate(tps).await;
        self.register_rate.set_max_rate(tps).await;
    }

    /// Finishes the requests in flight and closes the claim connections.
    pub async fn shutdown(&self) {
        self.pool.shutdown().await;
    }

    async fn call(
        &self,
        api: ClaimApi,
        limiter: &AdaptiveRateLimiter,
        payload: Vec<u8>,
        check: Option<ResponseCheck>,
    ) -> Result<bytes::Bytes, CloudError> {
        limiter.acquire().await;
        match self.pool.call(api, payload, check).await? {
            ClaimResponse::Accepted(body) => {
                limiter.on_success().await;
                Ok(body)
            }
            ClaimResponse::Rejected(body) => {
                let err = match codec::decode::<ErrorResponse>(self.format, &body) {
                    Ok(e) => CloudError::from_response(
                        api.name(),
                        e.status_code,
                        e.error_code,
                        e.error_message,
                    ),
                    Err(e) => CloudError::Protocol {
                        api: api.name(),
                        reason: format!("rejected response: {e}"),
                    },
                };
                if err.is_throttling() {
                    limiter.on_throttled().await;
                }
                Err(err)
            }
        }
    }

    async fn create(
        &self,
        device: &DeviceId,
        csr_pem: &str,
    ) -> Result<IssuedCertificate, CloudError> {
        let api = ClaimApi::CreateCertificateFromCsr;
        let payload = codec::encode(
            self.format,
            &CreateCertificateFromCsrRequest {
                certificate_signing_request: csr_pem.to_string(),
            },
        );
        let check = certificate_fits_csr(self.format, device.clone(), csr_pem.to_string());
        let body = self
            .call(api, &self.create_rate, payload, Some(check))
            .await?;
        let resp: CreateCertificateFromCsrResponse =
            codec::decode(self.format, &body).map_err(|e| CloudError::Protocol {
                api: api.name(),
                reason: format!("accepted response: {e}"),
            })?;
        Ok(IssuedCertificate {
            certificate_id: resp.certificate_id,
            certificate_pem: resp.certificate_pem,
            ownership_token: Some(Secret::from(resp.certificate_ownership_token)),
            expires_at_ms: Some(clock::unix_ms().saturating_add(self.token_ttl.as_millis() as u64)),
        })
    }

    async fn register_thing(
        &self,
        issued: Option<&IssuedCertificate>,
        parameters: &BTreeMap<String, String>,
    ) -> Result<RegisterOutcome, CloudError> {
        let api = ClaimApi::RegisterThing;
        let token = issued
            .and_then(|i| i.ownership_token.as_ref())
            .and_then(|t| t.expose_str())
            .ok_or_else(|| CloudError::Protocol {
                api: api.name(),
                reason: "no ownership token (text) stored for RegisterThing".into(),
            })?;
        let payload = codec::encode(
            self.format,
            &RegisterThingRequest {
                certificate_ownership_token: token.to_string(),
                parameters: parameters.clone(),
            },
        );
        let body = self.call(api, &self.register_rate, payload, None).await?;
        let resp: RegisterThingResponse =
            codec::decode(self.format, &body).map_err(|e| CloudError::Protocol {
                api: api.name(),
                reason: format!("accepted response: {e}"),
            })?;
        Ok(RegisterOutcome::Done(Registration {
            cloud_id: resp.thing_name,
            endpoint: None,
            extras: resp.device_configuration,
        }))
    }
}

impl Upstreams for AwsProvider {
    fn upstream(
        &self,
        device: &DeviceId,
        cloud_id: &str,
        endpoint: Option<&str>,
    ) -> Result<UpstreamSpec, CloudError> {
        self.upstream.upstream(device, cloud_id, endpoint)
    }
}

impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn certificate_source(&self) -> CertificateSource {
        CertificateSource::Cloud
    }

    fn api_name(&self, api: Api) -> &'static str {
        api.name()
    }

    fn create_certificate<'a>(
        &'a self,
        device: &'a DeviceId,
        csr_pem: &'a str,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CloudError>> {
        Box::pin(self.create(device, csr_pem))
    }

    fn register<'a>(
        &'a self,
        input: RegisterInput<'a>,
    ) -> BoxFuture<'a, Result<RegisterOutcome, CloudError>> {
        Box::pin(self.register_thing(input.certificate, input.parameters))
    }

    fn poll<'a>(
        &'a self,
        _input: RegisterInput<'a>,
        operation: &'a str,
    ) -> BoxFuture<'a, Result<RegisterOutcome, CloudError>> {
        // RegisterThing answers at once; a stored operation cannot come from AWS.
        Box::pin(async move {
            Err(CloudError::Rejected {
                api: "RegisterThing",
                status_code: 404,
                error_code: "ResourceNotFound".into(),
                error_message: format!("AWS has no pending registrations (operation {operation})"),
            })
        })
    }

    fn telemetry_profile(&self) -> TelemetryProfile {
        self.telemetry.clone()
    }

    fn sessions(&self) -> (usize, usize) {
        (self.pool.connected_sessions(), self.sessions)
    }

    fn set_tps(&self, tps: f64) -> BoxFuture<'_, ()> {
        Box::pin(AwsProvider::set_tps(self, tps))
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(AwsProvider::shutdown(self))
    }
}

/// The check that an accepted CreateCertificateFromCsr answer is for this CSR: a response that
/// does not fit its request is never a certificate for the wrong device.
fn certificate_fits_csr(format: PayloadFormat, device: DeviceId, csr_pem: String) -> ResponseCheck {
    Box::new(move |body: &[u8]| {
        let resp: CreateCertificateFromCsrResponse =
            codec::decode(format, body).map_err(|e| format!("accepted response: {e}"))?;
        match identity::cert_matches_csr(&resp.certificate_pem, &csr_pem) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "certificate {} does not carry the public key of device {device}'s CSR",
                resp.certificate_id
            )),
            Err(e) => Err(format!("certificate {}: {e}", resp.certificate_id)),
        }
    })
}
