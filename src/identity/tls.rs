//! rustls client and server configurations from PEM material.
//!
//! Every config is built with the aws-lc-rs provider passed explicitly (more than one rustls
//! provider may be compiled into the binary through dependencies) and offers TLS 1.3 and 1.2:
//! the Azure Python SDK and some device stacks speak only 1.2.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::cert::certificate_ders;
use super::{IdentityError, PrivateKey};

static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls_error(input: &str, e: impl ToString) -> IdentityError {
    IdentityError::Tls {
        input: input.to_string(),
        reason: e.to_string(),
    }
}

fn roots(ca_pem: &str, input: &str) -> Result<RootCertStore, IdentityError> {
    let mut store = RootCertStore::empty();
    for (i, der) in certificate_ders(ca_pem, input)?.into_iter().enumerate() {
        store
            .add(CertificateDer::from(der))
            .map_err(|e| tls_error(&format!("{input} certificate {}", i + 1), e))?;
    }
    Ok(store)
}

fn chain(chain_pem: &str, input: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    Ok(certificate_ders(chain_pem, input)?
        .into_iter()
        .map(CertificateDer::from)
        .collect())
}

fn key_der(key: &PrivateKey) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        key.to_pkcs8_der().expose().to_vec(),
    ))
}

/// A client config trusting the CAs in `ca_pem`; with `client = Some((chain_pem, key))` it
/// presents that certificate chain for mutual TLS.
pub fn client_config(
    ca_pem: &str,
    client: Option<(&str, &PrivateKey)>,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| tls_error("client", e))?
        .with_root_certificates(roots(ca_pem, "server CA")?);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((chain_pem, key)) => builder
            .with_client_auth_cert(chain(chain_pem, "client certificate")?, key_der(key))
            .map_err(|e| tls_error("client certificate", e))?,
    };
    Ok(Arc::new(config))
}

/// A server config presenting `cert_chain_pem` (leaf first) with `key`. With
/// `client_ca_pem = Some(..)` a client certificate is REQUIRED and must chain to those CAs.
pub fn server_config(
    cert_chain_pem: &str,
    key: &PrivateKey,
    client_ca_pem: Option<&str>,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| tls_error("server", e))?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca_pem) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca_pem, "client CA")?),
                provider(),
            )
            .build()
            .map_err(|e| tls_error("client CA", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain(cert_chain_pem, "server certificate")?, key_der(key))
        .map_err(|e| tls_error("server certificate", e))?;
    Ok(Arc::new(config))
}

/// The client certificate a server-side TLS connection presented (DER of the leaf), for policy
/// checks.
pub fn peer_leaf_der(conn: &ServerConnection) -> Option<Vec<u8>> {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.as_ref().to_vec())
}
