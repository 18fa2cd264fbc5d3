//! The cloud side of provisioning: the [`Provider`] seam the engine talks to, and its
//! implementations (AWS IoT fleet provisioning in [`aws`]; the Azure DPS and IoT Hub clients in [`azure`],
//! library code not yet behind [`Provider`]; a scriptable
//! fake for tests in `fake`, with the `test-hooks` feature), plus the payload codecs
//! ([`codec`]) shared by the cloud clients and the emulators.
//!
//! The engine never sees MQTT topics or payload formats: it hands a CSR to
//! [`Provider::create_certificate`], persists the [`IssuedCertificate`] (with its ownership
//! token), then calls [`Provider::register`]. Errors come back as [`CloudError`], which tells the
//! engine whether to retry (transient), slow down (throttling), start again with a new
//! certificate (invalid ownership token) or give up (permanent rejection).

pub mod aws;
pub mod azure;
pub mod codec;
#[cfg(any(test, feature = "test-hooks"))]
pub mod fake;
pub mod rate;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use crate::device_id::DeviceId;
use crate::identity::Secret;

/// A boxed, sendable future: keeps [`Provider`] usable as `Arc<dyn Provider>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A certificate the cloud issued for a device's CSR.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// The cloud's certificate id.
    pub certificate_id: String,
    /// The issued certificate (PEM).
    pub certificate_pem: String,
    /// Bearer credential that lets RegisterThing activate this certificate (AWS).
    pub ownership_token: Secret,
    /// When the ownership token stops being accepted (unix milliseconds).
    pub expires_at_ms: u64,
}

/// The result of registering a device with the cloud.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The thing (cloud device) name chosen by the provisioning template.
    pub thing_name: String,
    /// Device configuration returned by the template.
    pub device_configuration: BTreeMap<String, String>,
}

/// The cloud operations the provisioning engine needs, independent of the vendor.
pub trait Provider: Send + Sync + 'static {
    /// Short provider name for logs ("aws").
    fn name(&self) -> &'static str;

    /// Exchanges a CSR for a certificate (and, on AWS, an ownership token).
    fn create_certificate<'a>(
        &'a self,
        device: &'a DeviceId,
        csr_pem: &'a str,
    ) -> BoxFuture<'a, Result<IssuedCertificate, CloudError>>;

    /// Registers the device with the issued certificate, activating it.
    fn register<'a>(
        &'a self,
        device: &'a DeviceId,
        issued: &'a IssuedCertificate,
        parameters: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Registration, CloudError>>;
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
