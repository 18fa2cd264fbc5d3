//! AWS IoT Core: fleet provisioning over MQTT (CreateCertificateFromCsr, CreateKeysAndCertificate,
//! RegisterThing). The topic names live in [`topics`]; the payloads in [`crate::cloud::codec`].
//! [`AwsProvider`] is the engine's [`crate::cloud::Provider`] for AWS: a pool of claim sessions
//! ([`claim`]) paced per API.

pub mod claim;
mod provider;
pub mod topics;

pub use provider::{telemetry_profile, AwsProvider, AwsProviderOptions, OWNERSHIP_TOKEN_TTL};
