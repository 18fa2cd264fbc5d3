//! Telling a public key's [`KeyType`] from its SubjectPublicKeyInfo: algorithm, curve and RSA
//! modulus size. Shared by key decoding, CSR checks and certificate inspection.

use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::identity::KeyType;

/// The [`KeyType`] of a SubjectPublicKeyInfo (DER), or a description of what it is instead.
pub(crate) fn key_type_of_spki_der(spki_der: &[u8]) -> Result<KeyType, String> {
    let (_, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| format!("(unparsable public key: {e})"))?;
    key_type_of_spki(&spki)
}

/// The [`KeyType`] of a parsed SubjectPublicKeyInfo, from its algorithm, curve and modulus size.
pub(crate) fn key_type_of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyType, String> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(KeyType::EcdsaP256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(KeyType::EcdsaP384),
            Some(c) => Err(format!("ECDSA on curve {c}")),
            None => Err("ECDSA with explicit or missing curve parameters".into()),
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let Some(bits) = rsa_bits_of_spki(spki) else {
            return Err("RSA (unparsable modulus)".into());
        };
        return match bits {
            2048 => Ok(KeyType::Rsa2048),
            3072 => Ok(KeyType::Rsa3072),
            other => Err(format!("RSA-{other}")),
        };
    }
    Err(format!("algorithm {alg}"))
}

/// The modulus size of an RSA SubjectPublicKeyInfo; `None` for other algorithms.
pub(crate) fn rsa_bits_of_spki(spki: &SubjectPublicKeyInfo<'_>) -> Option<usize> {
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) if spki.algorithm.algorithm == OID_PKCS1_RSAENCRYPTION => {
            Some(modulus_bits(rsa.modulus))
        }
        _ => None,
    }
}

fn modulus_bits(modulus: &[u8]) -> usize {
    let trimmed: &[u8] = match modulus.iter().position(|b| *b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    trimmed.len() * 8 - trimmed[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_modulus_bits() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0xff]), 9);
        assert_eq!(modulus_bits(&[0, 0]), 0);
    }
}
