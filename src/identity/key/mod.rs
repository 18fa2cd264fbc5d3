//! [`PrivateKey`]: generating device keys and loading keys that users bring.
//!
//! Keys live in memory as aws-lc-rs key pairs with their PKCS#8 DER beside them, so the same
//! bytes serve rcgen (CSRs, certificates: [`PrivateKey`] is an rcgen [`SigningKey`]), rustls
//! (TLS) and the store. Loaded keys are rcgen [`KeyPair`]s; generated ECDSA keys are aws-lc-rs
//! [`EcdsaKeyPair`]s used as generated, serialised to PKCS#8 once and never parsed back
//! (rcgen's `KeyPair::generate_for` serialises and re-parses, re-validating the key, which
//! cost as much as generating it: the gateway makes one per device it provisions). Generation
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

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, EcdsaSigningAlgorithm, KeyPair as _, ECDSA_P256_SHA256_ASN1_SIGNING,
    ECDSA_P384_SHA384_ASN1_SIGNING,
};
use rcgen::{KeyPair, PublicKeyData, RsaKeySize, SignatureAlgorithm, SigningKey};

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
    pair: Arc<Pair>,
}

/// The key material behind a [`PrivateKey`].
enum Pair {
    /// Loaded or RSA: rcgen's key pair (which keeps its PKCS#8 DER).
    Rcgen(KeyPair),
    /// A generated ECDSA key: aws-lc-rs's key pair, its PKCS#8 DER (wiped on drop) and the
    /// rcgen algorithm it signs CSRs and certificates with.
    Ec {
        pair: EcdsaKeyPair,
        pkcs8: Secret,
        alg: &'static SignatureAlgorithm,
    },
}

impl Pair {
    fn pkcs8_der(&self) -> &[u8] {
        match self {
            Pair::Rcgen(pair) => pair.serialized_der(),
            Pair::Ec { pkcs8, .. } => pkcs8.expose(),
        }
    }
}

/// Generates an ECDSA key with aws-lc-rs and serialises it to PKCS#8 once (the same bytes
/// `EcdsaKeyPair::generate_pkcs8`, and so rcgen, would have written).
fn generate_ec(
    signing: &'static EcdsaSigningAlgorithm,
    alg: &'static SignatureAlgorithm,
) -> Result<Pair, String> {
    let pair = EcdsaKeyPair::generate(signing).map_err(|e| e.to_string())?;
    let pkcs8 = pair.to_pkcs8v1().map_err(|e| e.to_string())?;
    Ok(Pair::Ec {
        pkcs8: Secret::new(pkcs8.as_ref().to_vec()),
        pair,
        alg,
    })
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
        let rsa = |size| {
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, size)
                .map(Pair::Rcgen)
                .map_err(|e| e.to_string())
        };
        let generated = match kt {
            KeyType::EcdsaP256 => generate_ec(
                &ECDSA_P256_SHA256_ASN1_SIGNING,
                &rcgen::PKCS_ECDSA_P256_SHA256,
            ),
            KeyType::EcdsaP384 => generate_ec(
                &ECDSA_P384_SHA384_ASN1_SIGNING,
                &rcgen::PKCS_ECDSA_P384_SHA384,
            ),
            KeyType::Rsa2048 => rsa(RsaKeySize::_2048),
            KeyType::Rsa3072 => rsa(RsaKeySize::_3072),
        };
        let pair = generated.map_err(|reason| IdentityError::KeyGeneration {
            key_type: kt,
            reason,
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
        // rcgen's `serialize_pem` encoding: 64-column base64, LF line ends.
        let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
        let der = zeroize::Zeroizing::new(self.pair.pkcs8_der().to_vec());
        let block = pem::Pem::new("PRIVATE KEY", der.as_slice());
        Secret::from(pem::encode_config(&block, config))
    }

    /// The key as PKCS#8 DER.
    pub fn to_pkcs8_der(&self) -> Secret {
        Secret::new(self.pair.pkcs8_der().to_vec())
    }

    /// The public half as SubjectPublicKeyInfo DER (what certificates and CSRs carry).
    pub fn public_key_der(&self) -> Vec<u8> {
        self.subject_public_key_info()
    }

    /// Signs `msg` with this key, the way the certificate's algorithm expects: ECDSA P-256 with
    /// SHA-256 and P-384 with SHA-384 (ASN.1 DER signatures), RSA PKCS#1 v1.5 with SHA-256.
    /// Used for proofs of possession such as X.509 admission attestations.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, IdentityError> {
        SigningKey::sign(self, msg).map_err(|e| {
            IdentityError::signing(format!("signature with a {} key", self.key_type), e)
        })
    }
}

/// CSRs and certificates are signed with the key as it is held (no rcgen `KeyPair` made).
impl SigningKey for PrivateKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match &*self.pair {
            Pair::Rcgen(pair) => pair.sign(msg),
            Pair::Ec { pair, .. } => pair
                .sign(&SystemRandom::new(), msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| rcgen::Error::RingUnspecified),
        }
    }
}

impl PublicKeyData for PrivateKey {
    fn der_bytes(&self) -> &[u8] {
        match &*self.pair {
            Pair::Rcgen(pair) => pair.der_bytes(),
            Pair::Ec { pair, .. } => pair.public_key().as_ref(),
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match &*self.pair {
            Pair::Rcgen(pair) => pair.algorithm(),
            Pair::Ec { alg, .. } => alg,
        }
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
    fn a_generated_ec_key_is_stored_and_signs_as_an_rcgen_key_pair_would() {
        use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let der = key.to_pkcs8_der();
        // The same PKCS#8 and PEM bytes rcgen makes of that key (what devices and stores had).
        let rcgen_pair = KeyPair::try_from(der.expose()).unwrap();
        assert_eq!(rcgen_pair.serialized_der(), der.expose());
        assert_eq!(
            key.to_pkcs8_pem().expose_str().unwrap(),
            rcgen_pair.serialize_pem()
        );
        assert_eq!(key.public_key_der(), rcgen_pair.subject_public_key_info());
        assert_eq!(
            PublicKeyData::algorithm(&key),
            PublicKeyData::algorithm(&rcgen_pair)
        );
        // A CSR signed with the key held in memory verifies under the public key.
        let csr = crate::identity::create_csr("sensor-1", &key).unwrap();
        let info = crate::identity::parse_csr(&csr).unwrap();
        assert_eq!(info.public_key_der, key.public_key_der());
        let signature = key.sign(b"m").unwrap();
        assert!(
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, rcgen_pair.der_bytes())
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
