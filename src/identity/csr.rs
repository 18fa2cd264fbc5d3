//! Certificate signing requests: creating one for a device key (CN = device id) and reading
//! one a device sent, with its self-signature verified.

use rcgen::{CertificateParams, DistinguishedName, DnType};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;

use super::key::key_type_of_spki;
use super::{IdentityError, KeyType, PrivateKey};

/// X.509 `ub-common-name` (RFC 5280, appendix A.1).
pub const MAX_COMMON_NAME_LEN: usize = 64;

/// What a verified CSR asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrInfo {
    /// The subject common name, if the CSR has one.
    pub common_name: Option<String>,
    /// The key type, `None` when the key is not one fleetgw generates (e.g. RSA-4096).
    pub key_type: Option<KeyType>,
    /// The requested public key as SubjectPublicKeyInfo DER.
    pub public_key_der: Vec<u8>,
    /// The CSR re-encoded as a single PEM block.
    pub pem: String,
}

/// Checks `common_name` against the X.509 bounds (1 to 64 characters).
pub fn check_common_name(common_name: &str) -> Result<(), IdentityError> {
    let len = common_name.chars().count();
    if len == 0 {
        return Err(IdentityError::CommonNameEmpty);
    }
    if len > MAX_COMMON_NAME_LEN {
        return Err(IdentityError::CommonNameTooLong {
            common_name: common_name.to_string(),
            len,
        });
    }
    Ok(())
}

/// A PEM CSR with subject `CN=common_name`, signed by `key`.
pub fn create_csr(common_name: &str, key: &PrivateKey) -> Result<String, IdentityError> {
    check_common_name(common_name)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let what = || format!("CSR for {common_name:?}");
    let csr = params
        .serialize_request(key.key_pair())
        .map_err(|e| IdentityError::signing(what(), e))?;
    csr.pem().map_err(|e| IdentityError::signing(what(), e))
}

/// Parses a PEM CSR and verifies its self-signature.
///
/// A CSR whose signature does not verify is refused with [`IdentityError::CsrSignature`].
pub fn parse_csr(pem: &str) -> Result<CsrInfo, IdentityError> {
    let der = csr_der(pem)?;
    let (_, csr) = X509CertificationRequest::from_der(&der).map_err(|e| {
        IdentityError::malformed("CSR", format!("not a valid PKCS#10 request: {e}"))
    })?;
    match csr.verify_signature() {
        Ok(()) => {}
        Err(X509Error::SignatureUnsupportedAlgorithm) => {
            return Err(IdentityError::malformed(
                "CSR",
                format!(
                    "unsupported signature algorithm {}",
                    csr.signature_algorithm.algorithm
                ),
            ))
        }
        Err(_) => return Err(IdentityError::CsrSignature),
    }
    let info = &csr.certification_request_info;
    let common_name = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string);
    let spki = &info.subject_pki;
    Ok(CsrInfo {
        common_name,
        key_type: key_type_of_spki(spki).ok(),
        public_key_der: spki.raw.to_vec(),
        pem: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der.clone())),
    })
}

/// The DER of the first CSR block in `pem`.
pub(crate) fn csr_der(pem: &str) -> Result<Vec<u8>, IdentityError> {
    let blocks = pem::parse_many(pem)
        .map_err(|e| IdentityError::malformed("CSR", format!("bad PEM: {e}")))?;
    blocks
        .into_iter()
        .find(|b| matches!(b.tag(), "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"))
        .map(pem::Pem::into_contents)
        .ok_or_else(|| {
            IdentityError::malformed(
                "CSR",
                "not a PEM certificate request (no -----BEGIN CERTIFICATE REQUEST----- block)",
            )
        })
}
