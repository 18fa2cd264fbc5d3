//! rustls client and server configurations from PEM material.
//!
//! Every config is built with the aws-lc-rs provider passed explicitly (more than one rustls
//! provider may be compiled into the binary through dependencies) and offers TLS 1.3 and 1.2:
//! the Azure Python SDK and some device stacks speak only 1.2.
//!
//! The gateway builds one client config per device link (each presents its device's
//! certificate), so what is not the device's own is shared: one provider for the process, and
//! one server verifier (the parsed root store) per set of trusted CAs, instead of one of each
//! per device (issue 22, per-device memory).

use std::sync::{Arc, Mutex, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::cert::certificate_ders;
use super::{IdentityError, PrivateKey};

static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Server verifiers kept for reuse, one per trusted CA set.
const VERIFIERS_KEPT: usize = 8;

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}

/// The verifier of servers whose chain ends at a CA in `ca_pem`, shared by every client config
/// trusting the same PEM text (the last [`VERIFIERS_KEPT`] sets are kept).
fn server_verifier(ca_pem: &str) -> Result<Arc<WebPkiServerVerifier>, IdentityError> {
    static KEPT: Mutex<Vec<(String, Arc<WebPkiServerVerifier>)>> = Mutex::new(Vec::new());
    let mut kept = KEPT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, verifier)) = kept.iter().find(|(pem, _)| pem == ca_pem) {
        return Ok(verifier.clone());
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca_pem, "server CA")?),
        provider(),
    )
    .build()
    .map_err(|e| tls_error("server CA", e))?;
    if kept.len() == VERIFIERS_KEPT {
        kept.remove(0);
    }
    kept.push((ca_pem.to_string(), verifier.clone()));
    Ok(verifier)
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
        .with_webpki_verifier(server_verifier(ca_pem)?);
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

/// A server config presenting `cert_chain_pem` with `key` that asks for a client certificate
/// without requiring one, and accepts whichever chain the client presents once the client has
/// proved it holds the certificate's key (the handshake signature is verified). Whom that
/// certificate identifies is the caller's decision after the handshake ([`peer_chain_ders`]):
/// the embedded broker matches it against the certificate issued to a device, or checks the
/// chain to the configured device CAs, per device.
pub fn server_config_with_optional_client_cert(
    cert_chain_pem: &str,
    key: &PrivateKey,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| tls_error("server", e))?
        .with_client_cert_verifier(Arc::new(AnyClientCert(provider())))
        .with_single_cert(chain(cert_chain_pem, "server certificate")?, key_der(key))
        .map_err(|e| tls_error("server certificate", e))?;
    Ok(Arc::new(config))
}

/// Accepts any client certificate chain, but only with a valid handshake signature by its key.
#[derive(Debug)]
struct AnyClientCert(Arc<CryptoProvider>);

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The certificate chain a server-side TLS connection presented (DER, leaf first), if any.
pub fn peer_chain_ders(conn: &ServerConnection) -> Vec<Vec<u8>> {
    conn.peer_certificates()
        .map(|certs| certs.iter().map(|c| c.as_ref().to_vec()).collect())
        .unwrap_or_default()
}

/// The client certificate a server-side TLS connection presented (DER of the leaf), for policy
/// checks.
pub fn peer_leaf_der(conn: &ServerConnection) -> Option<Vec<u8>> {
    conn.peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Duration;

    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::timeout;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;
    use crate::identity::{CertificateAuthority, KeyType};

    const LIMIT: Duration = Duration::from_secs(10);

    struct Pki {
        ca: CertificateAuthority,
        server: Arc<ServerConfig>,
    }

    fn pki() -> Pki {
        let ca = CertificateAuthority::generate("Test Root").unwrap();
        let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (server_pem, server_key) = ca
            .issue_server("emulator", &["localhost"], &[localhost], 1)
            .unwrap();
        let server = server_config(&server_pem, &server_key, Some(ca.cert_pem())).unwrap();
        Pki { ca, server }
    }

    /// One TLS session on 127.0.0.1: the client says "ping", the server answers "pong".
    /// Returns the server's view (client leaf DER, protocol) or its handshake error, and
    /// what the client read.
    async fn session(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (
        Result<(Option<Vec<u8>>, Option<rustls::ProtocolVersion>), std::io::Error>,
        Option<Vec<u8>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_side = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
            let (_, conn) = tls.get_ref();
            let seen = (peer_leaf_der(conn), conn.protocol_version());
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"ping");
            tls.write_all(b"pong").await?;
            tls.shutdown().await?;
            Ok(seen)
        });
        let client_side = async {
            let tcp = TcpStream::connect(addr).await.ok()?;
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = TlsConnector::from(client).connect(name, tcp).await.ok()?;
            tls.write_all(b"ping").await.ok()?;
            let mut buf = Vec::new();
            tls.read_to_end(&mut buf).await.ok()?;
            Some(buf)
        };
        let client_read = timeout(LIMIT, client_side).await.unwrap();
        let server_result = timeout(LIMIT, server_side).await.unwrap().unwrap();
        (server_result, client_read)
    }

    #[tokio::test]
    async fn mutual_tls_handshake_presents_and_verifies_the_client_certificate() {
        let pki = pki();
        for kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
            let (client_pem, client_key) = pki.ca.issue_client("gw-01", kt, 1).unwrap();
            let client =
                client_config(pki.ca.cert_pem(), Some((&client_pem, &client_key))).unwrap();
            let (server, read) = session(pki.server.clone(), client).await;
            let (leaf, version) = server.unwrap();
            assert_eq!(read.as_deref(), Some(&b"pong"[..]), "{kt}");
            let expected = crate::identity::parse_certificates(&client_pem)
                .unwrap()
                .remove(0)
                .der;
            assert_eq!(leaf, Some(expected), "{kt}");
            assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
        }
    }

    /// Client configs trusting the same CAs share one verifier (and its parsed roots); a
    /// different CA set gets its own, and still refuses a server of the other CA.
    #[tokio::test]
    async fn client_configs_share_the_verifier_of_the_same_cas() {
        let pki = pki();
        let a = server_verifier(pki.ca.cert_pem()).unwrap();
        let b = server_verifier(pki.ca.cert_pem()).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "one verifier for one CA set");
        let other = CertificateAuthority::generate("Other Root").unwrap();
        let c = server_verifier(other.cert_pem()).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        let (pem, key) = pki.ca.issue_client("gw-02", KeyType::EcdsaP256, 1).unwrap();
        let trusting_other = client_config(other.cert_pem(), Some((&pem, &key))).unwrap();
        let (_, read) = session(pki.server.clone(), trusting_other).await;
        assert_eq!(read, None, "a server of another CA is not trusted");
        let trusting = client_config(pki.ca.cert_pem(), Some((&pem, &key))).unwrap();
        let (server, read) = session(pki.server.clone(), trusting).await;
        assert!(server.is_ok());
        assert_eq!(read.as_deref(), Some(&b"pong"[..]));
    }

    #[tokio::test]
    async fn tls12_only_clients_are_served() {
        let pki = pki();
        let (client_pem, client_key) = pki.ca.issue_client("py-sdk", KeyType::Rsa2048, 1).unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(pki.ca.cert_der().to_vec()))
            .unwrap();
        let tls12_client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain(&client_pem, "t").unwrap(), key_der(&client_key))
            .unwrap();
        let (server, read) = session(pki.server.clone(), Arc::new(tls12_client)).await;
        let (leaf, version) = server.unwrap();
        assert_eq!(read.as_deref(), Some(&b"pong"[..]));
        assert!(leaf.is_some());
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_2));
    }

    #[tokio::test]
    async fn untrusted_or_missing_client_certificates_are_refused() {
        let pki = pki();
        let stranger = CertificateAuthority::generate("Test Root").unwrap();
        let (pem, key) = stranger
            .issue_client("intruder", KeyType::EcdsaP256, 1)
            .unwrap();
        let untrusted = client_config(pki.ca.cert_pem(), Some((&pem, &key))).unwrap();
        let (server, read) = session(pki.server.clone(), untrusted).await;
        let err = server.unwrap_err().to_string();
        assert!(
            err.contains("UnknownIssuer") || err.contains("BadSignature"),
            "{err}"
        );
        assert_eq!(read, None, "the client must not get application data");

        let anonymous = client_config(pki.ca.cert_pem(), None).unwrap();
        let (server, read) = session(pki.server.clone(), anonymous).await;
        let err = server.unwrap_err().to_string();
        assert!(err.contains("peer sent no certificates"), "{err}");
        assert_eq!(read, None);
    }

    #[tokio::test]
    async fn server_without_client_ca_accepts_anonymous_clients() {
        let ca = CertificateAuthority::generate("Test Root").unwrap();
        let (pem, key) = ca.issue_server("admin", &["localhost"], &[], 1).unwrap();
        let server = server_config(&pem, &key, None).unwrap();
        let client = client_config(ca.cert_pem(), None).unwrap();
        let (server, read) = session(server, client).await;
        assert_eq!(server.unwrap().0, None);
        assert_eq!(read.as_deref(), Some(&b"pong"[..]));
    }

    #[test]
    fn bad_material_is_named() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let err = client_config("junk", None).unwrap_err().to_string();
        assert!(err.starts_with("server CA: no certificate found"), "{err}");
        let err = server_config("junk", &key, None).unwrap_err().to_string();
        assert!(
            err.starts_with("server certificate: no certificate found"),
            "{err}"
        );
        let ca = CertificateAuthority::generate("Root").unwrap();
        let (pem, _) = ca.issue_server("s", &["localhost"], &[], 1).unwrap();
        let err = server_config(&pem, &key, None).unwrap_err().to_string();
        assert!(err.starts_with("TLS server certificate: "), "{err}");
    }
}
