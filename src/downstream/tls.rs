//! The two rustls configurations downstream needs, kept in one place so they can be swapped for
//! the `identity::tls` helpers once those exist: a client config that trusts a given CA (the
//! gateway session to an external `mqtts://` broker) and a server config for the embedded
//! broker's TLS listener. Both use the aws-lc-rs provider passed explicitly, TLS 1.2 and 1.3.

use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::identity::Secret;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no CERTIFICATE block found in the PEM text")]
    NoCertificate { what: &'static str },
    #[error("{what}: invalid PEM: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}: certificate is not usable as a trust anchor: {source}")]
    TrustAnchor {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("{what}: {source}")]
    Config {
        what: &'static str,
        #[source]
        source: rustls::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

fn certificates(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// Client config trusting exactly the CA certificates in `ca_pem` (no client certificate).
pub fn client_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    const WHAT: &str = "downstream broker CA";
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca_pem, WHAT)? {
        roots
            .add(cert)
            .map_err(|source| TlsError::TrustAnchor { what: WHAT, source })?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Config { what: WHAT, source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Server config presenting `cert_chain_pem` (leaf first) with `key_pem`; no client certificates.
pub fn server_config(
    cert_chain_pem: &str,
    key_pem: &Secret,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    const WHAT: &str = "embedded broker TLS certificate";
    const KEY: &str = "embedded broker TLS key";
    let chain = certificates(cert_chain_pem, WHAT)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.expose())
        .map_err(|source| TlsError::Pem { what: KEY, source })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|source| TlsError::Config { what: WHAT, source })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Config { what: KEY, source })?;
    Ok(Arc::new(config))
}
