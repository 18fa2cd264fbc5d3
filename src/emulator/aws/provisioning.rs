//! The fleet provisioning MQTT API (seed 002): CreateCertificateFromCsr,
//! CreateKeysAndCertificate and RegisterThing, in JSON and CBOR.
//!
//! [`Provisioning::handle`] turns one request publish into one response publish (topic and
//! payload); the connection task writes it on the requesting connection only. Errors are
//! answered on `/rejected` with `{"statusCode","errorCode","errorMessage"}`:
//!
//! | case | status | errorCode |
//! |---|---|---|
//! | payload not decodable / wrong field types | 400 | `InvalidPayload` |
//! | CSR malformed, bad signature or unsupported key | 400 | `InvalidCsr` |
//! | ownership token empty, forged, for a deleted certificate or expired | 400 | `InvalidCertificateOwnershipToken` |
//! | template parameter missing or thing name invalid | 400 | `InvalidParameters` |
//! | pre-provisioning hook denial | 403 | `AccessDenied` |
//! | unknown template | 404 | `ResourceNotFound` |
//! | per-API token bucket empty (`--tps`) | 429 | `Throttling` |
//!
//! Ownership tokens are self-contained: the certificate id and expiry, authenticated with an
//! HMAC keyed from the CA key. They survive an emulator restart (like the CA) without a token
//! table, and a token can be redeemed on any connection.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::{digest, hmac};
use base64::Engine;

use super::counters::Counters;
use super::state::{NewRegistration, RegisterOutcome, Registry};
use super::templates::{EvalError, TemplateSet};
use crate::clock;
use crate::cloud::aws::topics::{self, ProvisioningTopic};
use crate::cloud::codec::{
    self, CreateCertificateFromCsrRequest, CreateCertificateFromCsrResponse,
    CreateKeysAndCertificateResponse, ErrorResponse, PayloadFormat, RegisterThingRequest,
    RegisterThingResponse,
};
use crate::identity::{CertificateAuthority, KeyType};

/// Validity of certificates issued to devices (capped by the CA's own expiry).
const DEVICE_CERT_VALIDITY_DAYS: u32 = 3650;
/// Subject CN of certificates made by CreateKeysAndCertificate (what AWS puts there).
const GENERATED_CERT_CN: &str = "AWS IoT Certificate";
const TOKEN_VERSION: &[u8; 2] = b"v1";
/// version (2) + certificate id hex (64) + expiry ms (8).
const TOKEN_BODY_LEN: usize = 2 + 64 + 8;

/// One response to publish on the requesting connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `<request topic>/accepted` or `/rejected`.
    pub topic: String,
    /// Encoded in the request's format.
    pub payload: Vec<u8>,
    /// True for `/accepted`.
    pub accepted: bool,
}

/// The three provisioning APIs, each with its own token bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    CreateCertificateFromCsr = 0,
    CreateKeysAndCertificate = 1,
    RegisterThing = 2,
}

/// A rejection before it is encoded.
struct Rejection {
    status: u16,
    code: &'static str,
    message: String,
}

impl Rejection {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_token(message: impl Into<String>) -> Self {
        Self::new(400, "InvalidCertificateOwnershipToken", message)
    }
}

/// A token bucket refilled at `rate` per second, holding at most max(rate, 1) tokens.
struct TokenBucket {
    state: Mutex<BucketState>,
}

struct BucketState {
    rate: Option<f64>,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: Option<f64>) -> Self {
        Self {
            state: Mutex::new(BucketState {
                rate,
                tokens: rate.map_or(0.0, |r| r.max(1.0)),
                last: Instant::now(),
            }),
        }
    }

    fn try_take(&self) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rate) = s.rate else { return true };
        let now = Instant::now();
        let capacity = rate.max(1.0);
        s.tokens = (s.tokens + now.duration_since(s.last).as_secs_f64() * rate).min(capacity);
        s.last = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn set_rate(&self, rate: Option<f64>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.rate = rate;
        s.tokens = rate.map_or(0.0, |r| r.max(1.0));
        s.last = Instant::now();
    }

    fn rate(&self) -> Option<f64> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).rate
    }
}

/// Issues and checks certificate ownership tokens.
struct OwnershipTokens {
    key: hmac::Key,
    ttl: Duration,
}

/// Why an ownership token was not accepted.
#[derive(Debug, PartialEq, Eq)]
enum TokenError {
    Empty,
    Invalid,
    Expired,
}

impl OwnershipTokens {
    fn new(ca: &CertificateAuthority, ttl: Duration) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"fleetgw-emulator-ownership-token-v1");
        ctx.update(ca.key().to_pkcs8_der().expose());
        let key = hmac::Key::new(hmac::HMAC_SHA256, ctx.finish().as_ref());
        Self { key, ttl }
    }

    /// A token for `certificate_id` (64 hex chars) and its expiry, unix ms.
    fn issue(&self, certificate_id: &str, now_ms: u64) -> (String, u64) {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let expires = now_ms.saturating_add(ttl_ms);
        let mut body = Vec::with_capacity(TOKEN_BODY_LEN + 32);
        body.extend_from_slice(TOKEN_VERSION);
        body.extend_from_slice(certificate_id.as_bytes());
        body.extend_from_slice(&expires.to_be_bytes());
        let tag = hmac::sign(&self.key, &body);
        body.extend_from_slice(tag.as_ref());
        (
            base64::engine::general_purpose::STANDARD.encode(body),
            expires,
        )
    }

    /// The certificate id a token was issued for, if it is authentic and not expired.
    fn verify(&self, token: &str, now_ms: u64) -> Result<String, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(token)
            .map_err(|_| TokenError::Invalid)?;
        if raw.len() != TOKEN_BODY_LEN + 32 || &raw[..2] != TOKEN_VERSION {
            return Err(TokenError::Invalid);
        }
        let (body, tag) = raw.split_at(TOKEN_BODY_LEN);
        hmac::verify(&self.key, body, tag).map_err(|_| TokenError::Invalid)?;
        let certificate_id = std::str::from_utf8(&body[2..66]).map_err(|_| TokenError::Invalid)?;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&body[66..]);
        if u64::from_be_bytes(expiry) <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(certificate_id.to_string())
    }
}

/// The provisioning service: CA, templates, registry, tokens and rate limits.
pub struct Provisioning {
    ca: CertificateAuthority,
    templates: TemplateSet,
    registry: Arc<Registry>,
    tokens: OwnershipTokens,
    buckets: [TokenBucket; 3],
    counters: Arc<Counters>,
}

impl Provisioning {
    /// A service issuing with `ca`, registering into `registry`; `tps` limits each API
    /// (None = unlimited), tokens live `token_ttl`.
    pub fn new(
        ca: CertificateAuthority,
        templates: TemplateSet,
        registry: Arc<Registry>,
        token_ttl: Duration,
        tps: Option<f64>,
        counters: Arc<Counters>,
    ) -> Self {
        let tokens = OwnershipTokens::new(&ca, token_ttl);
        Self {
            ca,
            templates,
            registry,
            tokens,
            buckets: [
                TokenBucket::new(tps),
                TokenBucket::new(tps),
                TokenBucket::new(tps),
            ],
            counters,
        }
    }

    /// Changes the per-API rate limit (None or 0 = unlimited).
    pub fn set_tps(&self, tps: Option<f64>) {
        let tps = tps.filter(|t| *t > 0.0);
        for bucket in &self.buckets {
            bucket.set_rate(tps);
        }
    }

    /// The per-API rate limit in force.
    pub fn tps(&self) -> Option<f64> {
        self.buckets[0].rate()
    }

    /// Answers one request published on `request_topic` (already parsed as `request`).
    pub fn handle(
        &self,
        request: &ProvisioningTopic,
        request_topic: &str,
        payload: &[u8],
    ) -> Reply {
        let now_ms = clock::unix_ms();
        let (api, fmt) = match request {
            ProvisioningTopic::CreateFromCsr(fmt) => (Api::CreateCertificateFromCsr, *fmt),
            ProvisioningTopic::CreateKeys(fmt) => (Api::CreateKeysAndCertificate, *fmt),
            ProvisioningTopic::RegisterThing { fmt, .. } => (Api::RegisterThing, *fmt),
        };
        Counters::bump(match api {
            Api::CreateCertificateFromCsr => &self.counters.create_from_csr,
            Api::CreateKeysAndCertificate => &self.counters.create_keys,
            Api::RegisterThing => &self.counters.register_thing,
        });
        let result = if !self.buckets[api as usize].try_take() {
            Counters::bump(&self.counters.throttled);
            Err(Rejection::new(429, "Throttling", "Rate exceeded"))
        } else {
            match request {
                ProvisioningTopic::CreateFromCsr(_) => self.create_from_csr(fmt, payload, now_ms),
                ProvisioningTopic::CreateKeys(_) => self.create_keys(fmt, payload, now_ms),
                ProvisioningTopic::RegisterThing { template, .. } => {
                    self.register_thing(template, fmt, payload, now_ms)
                }
            }
        };
        match result {
            Ok(payload) => {
                Counters::bump(&self.counters.accepted);
                Reply {
                    topic: topics::accepted(request_topic),
                    payload,
                    accepted: true,
                }
            }
            Err(r) => {
                Counters::bump(&self.counters.rejected);
                let body = ErrorResponse {
                    status_code: r.status,
                    error_code: r.code.to_string(),
                    error_message: r.message,
                };
                Reply {
                    topic: topics::rejected(request_topic),
                    payload: codec::encode(fmt, &body),
                    accepted: false,
                }
            }
        }
    }

    fn create_from_csr(
        &self,
        fmt: PayloadFormat,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Vec<u8>, Rejection> {
        let req: CreateCertificateFromCsrRequest = codec::decode(fmt, payload)
            .map_err(|e| Rejection::new(400, "InvalidPayload", e.to_string()))?;
        let certificate_pem = self
            .ca
            .issue_from_csr(&req.certificate_signing_request, DEVICE_CERT_VALIDITY_DAYS)
            .map_err(|e| Rejection::new(400, "InvalidCsr", e.to_string()))?;
        let certificate_id = certificate_id(&certificate_pem)?;
        let (token, expires) = self.tokens.issue(&certificate_id, now_ms);
        self.registry.add_pending(&certificate_id, now_ms, expires);
        Ok(codec::encode(
            fmt,
            &CreateCertificateFromCsrResponse {
                certificate_ownership_token: token,
                certificate_id,
                certificate_pem,
            },
        ))
    }

    fn create_keys(
        &self,
        fmt: PayloadFormat,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Vec<u8>, Rejection> {
        codec::decode_create_keys_request(fmt, payload)
            .map_err(|e| Rejection::new(400, "InvalidPayload", e.to_string()))?;
        // ECDSA P-256 rather than AWS's RSA-2048: clients treat the key as opaque PEM, and an
        // RSA key generation per request would make the emulator the benchmark's bottleneck.
        let (certificate_pem, key) = self
            .ca
            .issue_client(
                GENERATED_CERT_CN,
                KeyType::EcdsaP256,
                DEVICE_CERT_VALIDITY_DAYS,
            )
            .map_err(|e| Rejection::new(500, "InternalFailure", e.to_string()))?;
        let certificate_id = certificate_id(&certificate_pem)?;
        let (token, expires) = self.tokens.issue(&certificate_id, now_ms);
        let private_key = key
            .to_pkcs8_pem()
            .expose_str()
            .map(str::to_string)
            .ok_or_else(|| Rejection::new(500, "InternalFailure", "private key is not UTF-8"))?;
        self.registry.add_pending(&certificate_id, now_ms, expires);
        Ok(codec::encode(
            fmt,
            &CreateKeysAndCertificateResponse {
                certificate_id,
                certificate_pem,
                private_key,
                certificate_ownership_token: token,
            },
        ))
    }

    fn register_thing(
        &self,
        template_name: &str,
        fmt: PayloadFormat,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Vec<u8>, Rejection> {
        let req: RegisterThingRequest = codec::decode(fmt, payload)
            .map_err(|e| Rejection::new(400, "InvalidPayload", e.to_string()))?;
        let template = self.templates.get(template_name).ok_or_else(|| {
            Rejection::new(
                404,
                "ResourceNotFound",
                format!("Template {template_name} not found"),
            )
        })?;
        let certificate_id = self
            .tokens
            .verify(&req.certificate_ownership_token, now_ms)
            .map_err(|e| match e {
                TokenError::Empty => {
                    Rejection::bad_token("Certificate ownership token cannot be empty.")
                }
                TokenError::Invalid => {
                    Rejection::bad_token("Certificate ownership token is invalid.")
                }
                TokenError::Expired => {
                    Rejection::bad_token("Certificate ownership token has expired.")
                }
            })?;
        let evaluated = template
            .evaluate(&req.parameters, &certificate_id)
            .map_err(|e| match e {
                EvalError::Denied { .. } => Rejection::new(403, "AccessDenied", e.to_string()),
                EvalError::MissingParameter(_) | EvalError::InvalidThingName(_) => {
                    Rejection::new(400, "InvalidParameters", e.to_string())
                }
            })?;
        let outcome = self.registry.register(
            &certificate_id,
            NewRegistration {
                template_name: template_name.to_string(),
                thing_name: evaluated.thing_name,
                attributes: evaluated.attributes,
                device_configuration: evaluated.device_configuration,
                activate: evaluated.activate,
            },
            now_ms,
        );
        let registration =
            match outcome {
                RegisterOutcome::Registered(r) | RegisterOutcome::AlreadyRegistered(r) => r,
                RegisterOutcome::UnknownCertificate => return Err(Rejection::bad_token(
                    "Certificate ownership token refers to a certificate that no longer exists.",
                )),
            };
        Ok(codec::encode(
            fmt,
            &RegisterThingResponse {
                device_configuration: registration.device_configuration,
                thing_name: registration.thing_name,
            },
        ))
    }
}

/// SHA-256 of the certificate DER, lower-case hex.
fn certificate_id(cert_pem: &str) -> Result<String, Rejection> {
    let parsed = pem::parse(cert_pem)
        .map_err(|e| Rejection::new(500, "InternalFailure", format!("issued certificate: {e}")))?;
    Ok(fingerprint_hex(parsed.contents()))
}

/// SHA-256 of `der`, lower-case hex: AWS's certificate id.
pub fn fingerprint_hex(der: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_reject_forgery_and_expiry() {
        let ca = CertificateAuthority::generate("t").unwrap();
        let tokens = OwnershipTokens::new(&ca, Duration::from_secs(10));
        let id = "ab".repeat(32);
        let (token, expires) = tokens.issue(&id, 1_000);
        assert_eq!(expires, 11_000);
        assert_eq!(tokens.verify(&token, 5_000), Ok(id.clone()));
        assert_eq!(tokens.verify(&token, 11_000), Err(TokenError::Expired));
        assert_eq!(tokens.verify("", 0), Err(TokenError::Empty));
        assert_eq!(tokens.verify("bm9wZQ==", 0), Err(TokenError::Invalid));
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(&token)
            .unwrap();
        raw[10] ^= 1;
        let forged = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(tokens.verify(&forged, 5_000), Err(TokenError::Invalid));
        let other = OwnershipTokens::new(
            &CertificateAuthority::generate("t").unwrap(),
            Duration::from_secs(10),
        );
        assert_eq!(other.verify(&token, 5_000), Err(TokenError::Invalid));
    }

    #[test]
    fn bucket_allows_its_rate_and_refuses_beyond() {
        let bucket = TokenBucket::new(Some(1.0));
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        bucket.set_rate(None);
        assert!((0..100).all(|_| bucket.try_take()));
    }
}
