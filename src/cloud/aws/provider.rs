//! [`AwsProvider`]: the [`Provider`] for AWS IoT fleet provisioning by claim.
//!
//! CreateCertificateFromCsr and RegisterThing go through the [`ClaimPool`], each API paced by
//! its own [`AdaptiveRateLimiter`] (config `cloud.aws.tps`, halved on throttling). Payloads are
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
use crate::cloud::{BoxFuture, CloudError, IssuedCertificate, Provider, Registration};
use crate::device_id::DeviceId;
use crate::identity::{self, Secret};

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
}

/// AWS IoT fleet provisioning through a pool of claim sessions.
#[derive(Debug)]
pub struct AwsProvider {
    pool: ClaimPool,
    create_rate: AdaptiveRateLimiter,
    register_rate: AdaptiveRateLimiter,
    format: PayloadFormat,
    token_ttl: Duration,
}

impl AwsProvider {
    /// Starts the claim sessions (they connect in the background).
    pub fn start(opts: AwsProviderOptions) -> Self {
        let format = opts.claim.format;
        AwsProvider {
            pool: ClaimPool::start(opts.claim),
            create_rate: AdaptiveRateLimiter::new(opts.tps),
            register_rate: AdaptiveRateLimiter::new(opts.tps),
            format,
            token_ttl: opts.token_ttl,
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
            ownership_token: Secret::from(resp.certificate_ownership_token),
            expires_at_ms: clock::unix_ms().saturating_add(self.token_ttl.as_millis() as u64),
        })
    }

    async fn register_thing(
        &self,
        issued: &IssuedCertificate,
        parameters: &BTreeMap<String, String>,
    ) -> Result<Registration, CloudError> {
        let api = ClaimApi::RegisterThing;
        let token = issued
            .ownership_token
            .expose_str()
            .ok_or_else(|| CloudError::Protocol {
                api: api.name(),
                reason: "the stored ownership token is not text".into(),
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
        Ok(Registration {
            thing_name: resp.thing_name,
            device_configuration: resp.device_configuration,
        })
    }
}

impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
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
        _device: &'a DeviceId,
        issued: &'a IssuedCertificate,
        parameters: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Registration, CloudError>> {
        Box::pin(self.register_thing(issued, parameters))
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
