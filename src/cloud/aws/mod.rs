//! AWS IoT Core: fleet provisioning over MQTT (CreateCertificateFromCsr, CreateKeysAndCertificate,
//! RegisterThing). The topic names live in [`topics`]; the payloads in [`crate::cloud::codec`].

pub mod topics;
