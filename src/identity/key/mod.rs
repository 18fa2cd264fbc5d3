//! [`PrivateKey`]: generating device keys and loading keys that users bring.
//!
//! Keys live in memory as an rcgen [`KeyPair`] over aws-lc-rs, always built from PKCS#8 DER,
//! so the same bytes serve rcgen (CSRs, certificates), rustls (TLS) and the store. Generation
//! and the common unencrypted PEM forms go through aws-lc-rs only; openssl is used solely by
//! [`PrivateKey::import_file`] for the legacy and passphrase-protected formats users have on disk
//! (`openssl genrsa -aes256`, encrypted PKCS#8, PKCS#12).
//!
//! The type and its generation live here; `decode` reads unencrypted PEM and PKCS#8 DER,
//! `import` reads key files through openssl, `spki` tells a public key's [`KeyType`], and
//! `passphrase` reads the passphrases that protect imported key files.

mod decode;
mod import;
mod passphrase;
mod spki;

use std::fmt;
use std::sync::Arc;

use rcgen::{KeyPair, PublicKeyData, RsaKeySize};

use super::{IdentityError, KeyType, Secret};

pub(crate) use passphrase::credential_path;
pub use passphrase::read_passphrase;
pub(crate) use spki::{key_type_of_spki, rsa_bits_of_spki};

/// A private key of one of the [`KeyType`]s; cheap to clone (shared, immutable).
///
/// `Debug` prints the key type only, never key material.
#[derive(Clone)]
pub struct PrivateKey {
    key_type: KeyType,
    pair: Arc<KeyPair>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// Generates a fresh key of type `kt` with the aws-lc-rs backend.
    pub fn generate(kt: KeyType) -> Result<Self, IdentityError> {
        let generated = match kt {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
            }
            KeyType::Rsa3072 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)
            }
        };
        let pair = generated.map_err(|e| IdentityError::KeyGeneration {
            key_type: kt,
            reason: e.to_string(),
        })?;
        // Used as generated: parsing its PKCS#8 back would try every algorithm in turn and
        // derive the public key again, which cost as much as generating it.
        Ok(Self {
            key_type: kt,
            pair: Arc::new(pair),
        })
    }

    /// The key's algorithm and size.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn to_pkcs8_pem(&self) -> Secret {
        Secret::from(self.pair.serialize_pem())
    }

    /// The key as PKCS#8 DER.
    pub fn to_pkcs8_der(&self) -> Secret {
        Secret::new(self.pair.serialize_der())
    }

    /// The public half as SubjectPublicKeyInfo DER (what certificates and CSRs carry).
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pair.subject_public_key_info()
    }

    /// Signs `msg` with this key, the way the certificate's algorithm expects: ECDSA P-256 with
    /// SHA-256 and P-384 with SHA-384 (ASN.1 DER signatures), RSA PKCS#1 v1.5 with SHA-256.
    /// Used for proofs of possession such as X.509 admission attestations.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, IdentityError> {
        use rcgen::SigningKey;
        self.pair.sign(msg).map_err(|e| {
            IdentityError::signing(format!("signature with a {} key", self.key_type), e)
        })
    }

    /// The rcgen key pair, for signing CSRs and certificates inside this module.
    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.pair
    }
}

#[cfg(test)]
mod tests {
    use super::spki::key_type_of_spki_der;
    use super::*;

    #[test]
    fn generates_every_key_type_and_round_trips_through_pkcs8_pem() {
        for kt in KeyType::ALL {
            let key = PrivateKey::generate(kt).unwrap();
            assert_eq!(key.key_type(), kt);
            assert_eq!(key_type_of_spki_der(&key.public_key_der()), Ok(kt));
            assert_eq!(
                format!("{key:?}"),
                format!("PrivateKey {{ key_type: {kt:?}, .. }}")
            );

            let pem = key.to_pkcs8_pem();
            let pem = pem.expose_str().unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{kt}");
            let again = PrivateKey::from_pem(pem).unwrap();
            assert_eq!(again.key_type(), kt);
            assert_eq!(again.public_key_der(), key.public_key_der());
        }
    }

    #[test]
    fn signatures_verify_with_the_public_key_and_the_expected_algorithm() {
        use aws_lc_rs::signature::{
            UnparsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1,
            ECDSA_P384_SHA384_ASN1, RSA_PKCS1_2048_8192_SHA256,
        };
        let cases: [(KeyType, &'static dyn VerificationAlgorithm); 3] = [
            (KeyType::EcdsaP256, &ECDSA_P256_SHA256_ASN1),
            (KeyType::EcdsaP384, &ECDSA_P384_SHA384_ASN1),
            (KeyType::Rsa2048, &RSA_PKCS1_2048_8192_SHA256),
        ];
        for (kt, alg) in cases {
            let key = PrivateKey::generate(kt).unwrap();
            let signature = key.sign(b"sensor-1\n1700000000").unwrap();
            let public = UnparsedPublicKey::new(alg, key.public_key_der());
            assert!(
                public.verify(b"sensor-1\n1700000000", &signature).is_ok(),
                "{kt}: signature does not verify"
            );
            assert!(
                public.verify(b"sensor-2\n1700000000", &signature).is_err(),
                "{kt}: signature verifies for another message"
            );
        }
        // A key loaded from PEM signs the same way as a generated one.
        let key = PrivateKey::generate(KeyType::EcdsaP384).unwrap();
        let loaded = PrivateKey::from_pem(key.to_pkcs8_pem().expose_str().unwrap()).unwrap();
        let signature = loaded.sign(b"m").unwrap();
        assert!(
            UnparsedPublicKey::new(&ECDSA_P384_SHA384_ASN1, key.public_key_der())
                .verify(b"m", &signature)
                .is_ok()
        );
    }

    #[test]
    fn two_generated_keys_differ() {
        let a = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let b = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        assert_ne!(a.public_key_der(), b.public_key_der());
    }
}
