//! Certificate signing requests: creating one for a device key (CN = device id) and reading
//! one a device sent, with its self-signature verified.

use rcgen::{CertificateParams, DistinguishedName, DnType};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::prelude::FromDer;

use super::cert::{common_name, to_pem};
use super::key::{key_type_of_spki, rsa_bits_of_spki};
use super::{IdentityError, KeyType, PrivateKey};

/// Smallest RSA key accepted in a CSR.
pub const MIN_RSA_BITS: usize = 2048;

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
        .serialize_request(key)
        .map_err(|e| IdentityError::signing(what(), e))?;
    csr.pem().map_err(|e| IdentityError::signing(what(), e))
}

/// Decodes a PKCS#10 request (no signature check).
fn decode_csr(der: &[u8]) -> Result<X509CertificationRequest<'_>, IdentityError> {
    X509CertificationRequest::from_der(der)
        .map(|(_, csr)| csr)
        .map_err(|e| IdentityError::malformed("CSR", format!("not a valid PKCS#10 request: {e}")))
}

/// The DER SubjectPublicKeyInfo of a PEM CSR, without verifying its signature: for CSRs the
/// gateway made or has already verified, where a second ECDSA/RSA verification would only cost.
pub(crate) fn csr_public_key_der(pem: &str) -> Result<Vec<u8>, IdentityError> {
    let der = csr_der(pem)?;
    let csr = decode_csr(&der)?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// Parses a PEM CSR and verifies its self-signature.
///
/// A CSR whose signature does not verify is refused with [`IdentityError::CsrSignature`].
pub fn parse_csr(pem: &str) -> Result<CsrInfo, IdentityError> {
    let der = csr_der(pem)?;
    let csr = verified_csr(&der)?;
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    Ok(CsrInfo {
        common_name: common_name(&info.subject),
        key_type: key_type_of_spki(spki).ok(),
        public_key_der: spki.raw.to_vec(),
        pem: to_pem("CERTIFICATE REQUEST", der.clone()),
    })
}

/// Decodes a PKCS#10 request in DER and verifies its self-signature (what [`parse_csr`] does,
/// for a caller that needs the decoded request itself: the CA issuing from it).
pub(crate) fn verified_csr(der: &[u8]) -> Result<X509CertificationRequest<'_>, IdentityError> {
    let csr = decode_csr(der)?;
    let spki = &csr.certification_request_info.subject_pki;
    if let Some(bits) = rsa_bits_of_spki(spki).filter(|b| *b < MIN_RSA_BITS) {
        // aws-lc-rs cannot even verify these, and clouds refuse them (AWS IoT: RSA-2048+).
        return Err(IdentityError::UnsupportedKey {
            input: "CSR".into(),
            detail: format!("RSA-{bits} (too weak: at least {MIN_RSA_BITS} bits)"),
        });
    }
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
    Ok(csr)
}

/// The DER of the first CSR block in `pem`.
pub(crate) fn csr_der(pem: &str) -> Result<Vec<u8>, IdentityError> {
    let is_csr = |label: &str| matches!(label, "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST");
    if let Some(blocks) = super::pem_plain::plain_blocks(pem) {
        if let Some((_, der)) = blocks.into_iter().find(|(label, _)| is_csr(label)) {
            return Ok(der);
        }
    }
    let blocks = pem::parse_many(pem)
        .map_err(|e| IdentityError::malformed("CSR", format!("bad PEM: {e}")))?;
    blocks
        .into_iter()
        .find(|b| is_csr(b.tag()))
        .map(pem::Pem::into_contents)
        .ok_or_else(|| {
            IdentityError::malformed(
                "CSR",
                "not a PEM certificate request (no -----BEGIN CERTIFICATE REQUEST----- block)",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_round_trips_for_every_key_type() {
        for kt in KeyType::ALL {
            let key = PrivateKey::generate(kt).unwrap();
            let pem = create_csr("sensor-1", &key).unwrap();
            assert!(
                pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
                "{kt}"
            );
            let info = parse_csr(&pem).unwrap();
            assert_eq!(info.common_name.as_deref(), Some("sensor-1"), "{kt}");
            assert_eq!(info.key_type, Some(kt));
            assert_eq!(info.public_key_der, key.public_key_der(), "{kt}");
            assert_eq!(csr_der(&info.pem).unwrap(), csr_der(&pem).unwrap());
            assert!(!info.pem.contains('\r') && !pem.contains('\r'));
        }
    }

    #[test]
    fn common_name_is_bounded_by_x509() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let at_limit = "a".repeat(64);
        let info = parse_csr(&create_csr(&at_limit, &key).unwrap()).unwrap();
        assert_eq!(info.common_name.as_deref(), Some(at_limit.as_str()));

        let too_long = "a".repeat(65);
        let err = create_csr(&too_long, &key).unwrap_err();
        assert!(
            matches!(err, IdentityError::CommonNameTooLong { len: 65, .. }),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .ends_with("is 65 characters long; X.509 allows at most 64"));
        assert!(matches!(
            create_csr("", &key),
            Err(IdentityError::CommonNameEmpty)
        ));
    }

    fn tampered(pem: &str, change: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut der = csr_der(pem).unwrap();
        change(&mut der);
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
    }

    #[test]
    fn altered_csrs_are_refused() {
        for kt in [KeyType::EcdsaP256, KeyType::Rsa2048] {
            let key = PrivateKey::generate(kt).unwrap();
            let pem = create_csr("sensor-1", &key).unwrap();

            // A flipped bit in the signature itself.
            let bad_sig = tampered(&pem, |der| *der.last_mut().unwrap() ^= 0x01);
            let err = parse_csr(&bad_sig).unwrap_err();
            assert!(matches!(err, IdentityError::CsrSignature), "{kt}: {err:?}");
            assert_eq!(
                err.to_string(),
                "CSR: signature does not verify (the request was altered or not signed by its key)"
            );

            // The subject changed after signing: someone asking for another device's name.
            let other_subject = tampered(&pem, |der| {
                let at = der.windows(8).position(|w| w == b"sensor-1").unwrap();
                der[at + 7] = b'2';
            });
            assert!(matches!(
                parse_csr(&other_subject),
                Err(IdentityError::CsrSignature)
            ));
        }
    }

    #[test]
    fn garbage_is_refused_with_a_message_naming_the_csr() {
        let err = parse_csr("garbage").unwrap_err().to_string();
        assert_eq!(
            err,
            "CSR: not a PEM certificate request (no -----BEGIN CERTIFICATE REQUEST----- block)"
        );
        let err = parse_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("CSR: not a valid PKCS#10 request"), "{err}");
    }

    #[test]
    fn openssl_made_csrs_parse() {
        let dir = tempfile::tempdir().unwrap();
        let Some(pem) = crate::identity::test_util::openssl_csr(
            dir.path(),
            &["ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
            "/O=Acme/CN=plc-7",
            "r.csr",
        ) else {
            return;
        };
        let info = parse_csr(&pem).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("plc-7"));
        assert_eq!(info.key_type, Some(KeyType::EcdsaP384));
        let key = PrivateKey::import_file(&dir.path().join("k.pem"), None).unwrap();
        assert_eq!(info.public_key_der, key.public_key_der());
    }
}
