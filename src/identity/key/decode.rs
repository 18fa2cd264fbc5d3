//! Decoding unencrypted private keys (PEM in its PKCS#8, SEC1 and PKCS#1 forms, and PKCS#8 DER)
//! with aws-lc-rs alone: the path for keys fleetgw wrote itself and for keys given inline.

use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{
    EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
};
use rcgen::{KeyPair, PublicKeyData};
use rustls_pki_types::PrivatePkcs8KeyDer;

use super::spki::key_type_of_spki_der;
use super::PrivateKey;
use crate::identity::IdentityError;

impl PrivateKey {
    /// Parses an unencrypted PEM private key: PKCS#8 (`PRIVATE KEY`), SEC1 (`EC PRIVATE KEY`)
    /// or PKCS#1 (`RSA PRIVATE KEY`). Other PEM blocks in the text (certificates) are skipped.
    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        Self::from_pem_named(pem, "private key")
    }

    /// [`PrivateKey::from_pem`] with the input named in errors (a file path, "claim key").
    pub fn from_pem_named(pem: &str, input: &str) -> Result<Self, IdentityError> {
        let blocks = pem::parse_many(pem).map_err(|e| IdentityError::malformed(input, e))?;
        let mut seen = Vec::new();
        for block in &blocks {
            let encrypted = block
                .headers()
                .get("Proc-Type")
                .is_some_and(|v| v.contains("ENCRYPTED"));
            match block.tag() {
                "ENCRYPTED PRIVATE KEY" => return Err(encrypted_pem_error(input)),
                "PRIVATE KEY" | "EC PRIVATE KEY" | "RSA PRIVATE KEY" if encrypted => {
                    return Err(encrypted_pem_error(input))
                }
                "PRIVATE KEY" => return Self::from_pkcs8_der(block.contents(), input),
                "EC PRIVATE KEY" => {
                    let pkcs8 = sec1_to_pkcs8(block.contents()).ok_or_else(|| {
                        IdentityError::malformed(
                            input,
                            "EC PRIVATE KEY is not a valid P-256 or P-384 SEC1 key",
                        )
                    })?;
                    return Self::from_pkcs8_der(&pkcs8, input);
                }
                "RSA PRIVATE KEY" => {
                    let rsa = RsaKeyPair::from_der(block.contents()).map_err(|e| {
                        IdentityError::malformed(input, format!("RSA PRIVATE KEY: {e}"))
                    })?;
                    let pkcs8 =
                        AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&rsa).map_err(|e| {
                            IdentityError::malformed(input, format!("RSA PRIVATE KEY: {e}"))
                        })?;
                    return Self::from_pkcs8_der(pkcs8.as_ref(), input);
                }
                other => seen.push(other.to_string()),
            }
        }
        let reason = if blocks.is_empty() {
            "not a PEM private key (no -----BEGIN ... PRIVATE KEY----- block)".to_string()
        } else {
            format!(
                "no private key block found (found only: {})",
                seen.join(", ")
            )
        };
        Err(IdentityError::malformed(input, reason))
    }

    /// Builds a key from PKCS#8 `PrivateKeyInfo` DER; `input` names the source in errors.
    pub fn from_pkcs8_der(der: &[u8], input: &str) -> Result<Self, IdentityError> {
        let pkcs8 = PrivatePkcs8KeyDer::from(der);
        let pair = KeyPair::try_from(&pkcs8).map_err(|e| {
            IdentityError::malformed(input, format!("not a usable PKCS#8 private key: {e}"))
        })?;
        let spki = pair.subject_public_key_info();
        let key_type =
            key_type_of_spki_der(&spki).map_err(|detail| IdentityError::UnsupportedKey {
                input: input.to_string(),
                detail,
            })?;
        Ok(Self {
            key_type,
            pair: Arc::new(super::Pair::Rcgen(pair)),
        })
    }
}

fn encrypted_pem_error(input: &str) -> IdentityError {
    IdentityError::malformed(
        input,
        "the private key is encrypted; import it from a file with a passphrase",
    )
}

/// SEC1 `ECPrivateKey` -> PKCS#8, trying the two curves fleetgw supports.
fn sec1_to_pkcs8(der: &[u8]) -> Option<Vec<u8>> {
    [
        &ECDSA_P256_SHA256_ASN1_SIGNING,
        &ECDSA_P384_SHA384_ASN1_SIGNING,
    ]
    .into_iter()
    .find_map(|alg| EcdsaKeyPair::from_private_key_der(alg, der).ok())
    .and_then(|pair| pair.to_pkcs8v1().ok())
    .map(|doc| doc.as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_pem_refuses_garbage_encrypted_and_keyless_pem() {
        let err = PrivateKey::from_pem("hello").unwrap_err().to_string();
        assert_eq!(
            err,
            "private key: not a PEM private key (no -----BEGIN ... PRIVATE KEY----- block)"
        );

        let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = PrivateKey::from_pem_named(cert, "claim.key")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "claim.key: no private key block found (found only: CERTIFICATE)"
        );

        let enc =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let err = PrivateKey::from_pem(enc).unwrap_err().to_string();
        assert!(err.contains("encrypted"), "{err}");

        let junk = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let err = PrivateKey::from_pem(junk).unwrap_err().to_string();
        assert!(
            err.starts_with("private key: not a usable PKCS#8 private key"),
            "{err}"
        );
    }
}
