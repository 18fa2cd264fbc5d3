//! X.509 admission: a device proves its identity with a certificate chained to a trusted CA and
//! a fresh signature made with the certificate's key.
//!
//! The attestation (docs/architecture.md, "Device contract") carries the device's certificate chain (leaf
//! first, then intermediates; the trusted root may be included), a timestamp in unix seconds and
//! `base64(sign(leafKey, "{id}\n{timestamp}"))`, where `{id}` is the canonical (lower-case)
//! device id. The signature is ECDSA with ASN.1 DER encoding (P-256 with SHA-256, P-384 with
//! SHA-384) or RSA PKCS#1 v1.5 with SHA-256 (2048 to 8192 bits), chosen by the leaf's key.
//!
//! Checks, in order: the chain verifies to the configured CA bundle at `now` (signatures,
//! validity, CA flags: [`crate::identity::verify_chain`]); the leaf is not a CA and its subject
//! CN equals the device id (case-insensitively, as registration ids are); the timestamp is
//! within `±window` of `now`; the signature verifies. The window bounds how long a captured
//! attestation can be replayed; identical attestations inside the window are deliberately
//! accepted, because an MQTT QoS 1 redelivery or a device retry resends the same request.

use aws_lc_rs::signature::{
    ParsedPublicKey, VerificationAlgorithm, ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1,
    RSA_PKCS1_2048_8192_SHA256,
};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::device_id::DeviceId;
use crate::identity::{self, IdentityError, PrivateKey};

/// Default for how far the attestation timestamp may be from the gateway clock (config
/// `admission.x509_window_secs`).
pub const DEFAULT_WINDOW_SECS: u64 = 300;

/// Algorithms a leaf key may use; its public key parses for at most one of them.
const ALGORITHMS: [&dyn VerificationAlgorithm; 3] = [
    &ECDSA_P256_SHA256_ASN1,
    &ECDSA_P384_SHA384_ASN1,
    &RSA_PKCS1_2048_8192_SHA256,
];

/// Why an X.509 attestation does not admit a device; [`X509Error::error_code`] is what the
/// device sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    /// The certificate PEM cannot be read.
    #[error("attestation certificate: {reason}")]
    InvalidCertificate {
        /// What is wrong with it.
        reason: String,
    },

    /// The chain does not lead to a trusted CA (or a link is expired, not yet valid, not a CA).
    #[error("attestation certificate is not trusted: {reason}")]
    Untrusted {
        /// Which link failed and why.
        reason: String,
    },

    /// The leaf is a CA certificate, which never identifies a device.
    #[error("attestation certificate {subject:?} is a CA certificate; a device presents its own end-entity certificate first")]
    LeafIsCa {
        /// The leaf's subject CN.
        subject: String,
    },

    /// The leaf's subject CN is not the device id.
    #[error("attestation certificate CN {common_name:?} does not match device id {device_id:?}")]
    CommonNameMismatch {
        /// The leaf's CN (`"<none>"` when absent).
        common_name: String,
        /// The requesting device.
        device_id: String,
    },

    /// The timestamp is older than the window allows: a stale or replayed attestation.
    #[error("attestation timestamp {timestamp} is {age} s old, outside the {window} s window; sign a fresh timestamp (and check the device clock)")]
    Expired {
        /// The attestation's timestamp.
        timestamp: i64,
        /// Seconds before the gateway's now.
        age: i64,
        /// The configured window.
        window: u64,
    },

    /// The timestamp is further in the future than the window allows.
    #[error("attestation timestamp {timestamp} is {ahead} s ahead of the gateway clock, outside the {window} s window; check the device clock")]
    InFuture {
        /// The attestation's timestamp.
        timestamp: i64,
        /// Seconds after the gateway's now.
        ahead: i64,
        /// The configured window.
        window: u64,
    },

    /// The leaf key is not one the signature can be checked with.
    #[error("attestation certificate {subject:?} has a key that is not ECDSA P-256/P-384 or RSA 2048-8192 bits")]
    UnsupportedKey {
        /// The leaf's subject CN.
        subject: String,
    },

    /// The signature is not base64 or does not verify with the leaf's key.
    #[error("attestation signature {reason}")]
    BadSignature {
        /// What is wrong.
        reason: String,
    },
}

impl X509Error {
    /// The `errorCode` a rejected device receives.
    pub fn error_code(&self) -> &'static str {
        match self {
            X509Error::InvalidCertificate { .. } | X509Error::LeafIsCa { .. } => {
                "InvalidCertificate"
            }
            X509Error::Untrusted { .. } => "UntrustedCertificate",
            X509Error::CommonNameMismatch { .. } => "CommonNameMismatch",
            X509Error::Expired { .. } => "AttestationExpired",
            X509Error::InFuture { .. } => "AttestationNotYetValid",
            X509Error::UnsupportedKey { .. } => "UnsupportedCertificateKey",
            X509Error::BadSignature { .. } => "InvalidSignature",
        }
    }
}

/// The bytes an attestation signs: `"{id}\n{timestamp}"`.
pub fn attestation_message(id: &DeviceId, timestamp: i64) -> String {
    format!("{}\n{timestamp}", id.as_str())
}

/// Signs an attestation for `id` at `timestamp` (unix seconds) with the device's `key`:
/// the base64 `signature` field a device sends. Fails only if the crypto backend fails.
pub fn sign_attestation(
    id: &DeviceId,
    timestamp: i64,
    key: &PrivateKey,
) -> Result<String, IdentityError> {
    let signature = key.sign(attestation_message(id, timestamp).as_bytes())?;
    Ok(BASE64.encode(signature))
}

/// Verifies an X.509 attestation of `id` against the PEM bundle `trusted_ca_pem` at `now_unix`,
/// allowing the timestamp to be `window_secs` away from now. See the module comment.
pub fn verify_attestation(
    id: &DeviceId,
    certificate_pem: &str,
    signature_b64: &str,
    timestamp: i64,
    trusted_ca_pem: &str,
    now_unix: i64,
    window_secs: u64,
) -> Result<(), X509Error> {
    let leaf = verify_device_certificate(id, certificate_pem, trusted_ca_pem, now_unix)?;
    verify_signature_of(id, &leaf, signature_b64, timestamp, now_unix, window_secs)
}

/// Checks that `certificate_pem` (leaf first) chains to `trusted_ca_pem`, is valid at
/// `now_unix`, and names `id` (CN) in a leaf that is not a CA; returns the leaf.
pub fn verify_device_certificate(
    id: &DeviceId,
    certificate_pem: &str,
    trusted_ca_pem: &str,
    now_unix: i64,
) -> Result<identity::CertInfo, X509Error> {
    identity::verify_chain(certificate_pem, trusted_ca_pem, now_unix).map_err(|e| match e {
        IdentityError::Chain { .. } => X509Error::Untrusted {
            reason: e.to_string(),
        },
        other => X509Error::InvalidCertificate {
            reason: other.to_string(),
        },
    })?;
    let certs = identity::parse_certificates(certificate_pem).map_err(|e| {
        X509Error::InvalidCertificate {
            reason: e.to_string(),
        }
    })?;
    let Some(leaf) = certs.first() else {
        return Err(X509Error::InvalidCertificate {
            reason: "no certificate".into(),
        });
    };
    let subject = leaf.subject_cn.clone().unwrap_or_else(|| "<none>".into());
    if leaf.is_ca {
        return Err(X509Error::LeafIsCa { subject });
    }
    if !leaf
        .subject_cn
        .as_deref()
        .is_some_and(|cn| cn.eq_ignore_ascii_case(id.as_str()))
    {
        return Err(X509Error::CommonNameMismatch {
            common_name: subject,
            device_id: id.as_str().to_string(),
        });
    }
    Ok(leaf.clone())
}

/// Checks the attestation signature by `leaf`'s key over the id and `timestamp`, within
/// `window_secs` of `now_unix`.
fn verify_signature_of(
    id: &DeviceId,
    leaf: &identity::CertInfo,
    signature_b64: &str,
    timestamp: i64,
    now_unix: i64,
    window_secs: u64,
) -> Result<(), X509Error> {
    let subject = leaf.subject_cn.clone().unwrap_or_else(|| "<none>".into());
    let window = i64::try_from(window_secs).unwrap_or(i64::MAX);
    let offset = timestamp.saturating_sub(now_unix);
    if offset < -window {
        return Err(X509Error::Expired {
            timestamp,
            age: offset.saturating_neg(),
            window: window_secs,
        });
    }
    if offset > window {
        return Err(X509Error::InFuture {
            timestamp,
            ahead: offset,
            window: window_secs,
        });
    }

    let signature = BASE64
        .decode(signature_b64.trim().as_bytes())
        .map_err(|e| X509Error::BadSignature {
            reason: format!("is not base64: {e}"),
        })?;
    let public_key = ALGORITHMS
        .iter()
        .find_map(|alg| ParsedPublicKey::new(*alg, &leaf.public_key_der).ok())
        .ok_or_else(|| X509Error::UnsupportedKey {
            subject: subject.clone(),
        })?;
    public_key
        .verify_sig(attestation_message(id, timestamp).as_bytes(), &signature)
        .map_err(|_| X509Error::BadSignature {
            reason: format!(
                "does not verify with the key of certificate {subject:?} over \"{}\\n{timestamp}\" (wrong key, id or timestamp)",
                id.as_str()
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock;
    use crate::identity::{CertificateAuthority, KeyType};

    fn id(raw: &str) -> DeviceId {
        DeviceId::parse(raw).unwrap()
    }

    /// Root -> intermediate -> leaf for `cn`; returns (root PEM, chain PEM, leaf key).
    fn chain_for(cn: &str, kt: KeyType) -> (String, String, PrivateKey) {
        let root = CertificateAuthority::generate("Fleet Root").unwrap();
        let intermediate = root.issue_intermediate("Fleet Devices").unwrap();
        let (leaf_pem, key) = intermediate.issue_client(cn, kt, 30).unwrap();
        let chain = format!("{leaf_pem}{}", intermediate.cert_pem());
        (root.cert_pem().to_string(), chain, key)
    }

    fn verify(
        device: &str,
        chain: &str,
        signature: &str,
        timestamp: i64,
        trusted: &str,
        now: i64,
    ) -> Result<(), X509Error> {
        verify_attestation(&id(device), chain, signature, timestamp, trusted, now, 300)
    }

    #[test]
    fn admits_a_chained_certificate_with_a_fresh_signature_for_each_key_type() {
        let now = clock::unix_secs();
        for kt in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa2048] {
            let (root, chain, key) = chain_for("sensor-7", kt);
            let signature = sign_attestation(&id("sensor-7"), now - 20, &key).unwrap();
            assert_eq!(
                verify("sensor-7", &chain, &signature, now - 20, &root, now),
                Ok(()),
                "{kt}"
            );
            // CN match is case-insensitive, like registration ids.
            assert_eq!(
                verify("Sensor-7", &chain, &signature, now - 20, &root, now),
                Ok(()),
                "{kt}"
            );
        }
    }

    #[test]
    fn the_signed_message_is_the_canonical_id_newline_timestamp() {
        assert_eq!(
            attestation_message(&id("Sensor-7"), 1_700_000_000),
            "sensor-7\n1700000000"
        );
        // An independently made signature (aws-lc-rs directly) over that message verifies.
        let now = clock::unix_secs();
        let (root, chain, key) = chain_for("sensor-7", KeyType::EcdsaP256);
        let pkcs8 = key.to_pkcs8_der();
        let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8.expose(),
        )
        .unwrap();
        let message = format!("sensor-7\n{now}");
        let signature = pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), message.as_bytes())
            .unwrap();
        let signature = BASE64.encode(signature.as_ref());
        assert_eq!(
            verify("sensor-7", &chain, &signature, now, &root, now),
            Ok(())
        );
    }

    #[test]
    fn rejects_a_chain_to_an_untrusted_ca() {
        let now = clock::unix_secs();
        let (_, chain, key) = chain_for("sensor-7", KeyType::EcdsaP256);
        let stranger = CertificateAuthority::generate("Someone Else").unwrap();
        let signature = sign_attestation(&id("sensor-7"), now, &key).unwrap();
        let err = verify(
            "sensor-7",
            &chain,
            &signature,
            now,
            stranger.cert_pem(),
            now,
        )
        .unwrap_err();
        assert_eq!(err.error_code(), "UntrustedCertificate");
        let message = err.to_string();
        assert!(
            message.starts_with("attestation certificate is not trusted: ")
                && message.contains("not signed by any trusted CA")
                && message.contains("Someone Else"),
            "{message}"
        );

        // Valid chain, but the certificates have expired by `now`.
        let (root, chain, key) = chain_for("sensor-7", KeyType::EcdsaP256);
        let later = now + 40 * 86_400;
        let signature = sign_attestation(&id("sensor-7"), later, &key).unwrap();
        let err = verify("sensor-7", &chain, &signature, later, &root, later).unwrap_err();
        assert_eq!(err.error_code(), "UntrustedCertificate", "{err}");
    }

    #[test]
    fn rejects_a_certificate_for_another_device() {
        let now = clock::unix_secs();
        let (root, chain, key) = chain_for("sensor-7", KeyType::EcdsaP256);
        // Signed correctly for sensor-8 with sensor-7's key: the CN still decides.
        let signature = sign_attestation(&id("sensor-8"), now, &key).unwrap();
        let err = verify("sensor-8", &chain, &signature, now, &root, now).unwrap_err();
        assert_eq!(
            err,
            X509Error::CommonNameMismatch {
                common_name: "sensor-7".into(),
                device_id: "sensor-8".into()
            }
        );
        assert_eq!(err.error_code(), "CommonNameMismatch");
    }

    #[test]
    fn rejects_timestamps_outside_the_window() {
        let now = clock::unix_secs();
        let (root, chain, key) = chain_for("sensor-7", KeyType::EcdsaP256);
        let old = now - 301;
        let replayed = sign_attestation(&id("sensor-7"), old, &key).unwrap();
        let err = verify("sensor-7", &chain, &replayed, old, &root, now).unwrap_err();
        assert_eq!(
            err,
            X509Error::Expired {
                timestamp: old,
                age: 301,
                window: 300
            }
        );
        assert_eq!(err.error_code(), "AttestationExpired");
        // The same attestation was fine while it was fresh: exactly at the window edge.
        assert_eq!(
            verify("sensor-7", &chain, &replayed, old, &root, old + 300),
            Ok(())
        );

        let future = now + 301;
        let ahead = sign_attestation(&id("sensor-7"), future, &key).unwrap();
        let err = verify("sensor-7", &chain, &ahead, future, &root, now).unwrap_err();
        assert_eq!(err.error_code(), "AttestationNotYetValid");
        assert!(err.to_string().contains("301 s ahead"), "{err}");

        // Extreme timestamps do not overflow.
        let err = verify("sensor-7", &chain, &ahead, i64::MIN, &root, now).unwrap_err();
        assert_eq!(err.error_code(), "AttestationExpired");
        let err = verify("sensor-7", &chain, &ahead, i64::MAX, &root, now).unwrap_err();
        assert_eq!(err.error_code(), "AttestationNotYetValid");
    }

    #[test]
    fn rejects_bad_signatures() {
        let now = clock::unix_secs();
        let (root, chain, key) = chain_for("sensor-7", KeyType::EcdsaP256);

        // Signed over another timestamp than the one sent.
        let signature = sign_attestation(&id("sensor-7"), now - 1, &key).unwrap();
        let err = verify("sensor-7", &chain, &signature, now, &root, now).unwrap_err();
        assert_eq!(err.error_code(), "InvalidSignature");
        assert!(err.to_string().contains("does not verify"), "{err}");

        // Signed by a different key than the certificate's.
        let other = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let signature = sign_attestation(&id("sensor-7"), now, &other).unwrap();
        let err = verify("sensor-7", &chain, &signature, now, &root, now).unwrap_err();
        assert_eq!(err.error_code(), "InvalidSignature");

        let err = verify("sensor-7", &chain, "not base64!", now, &root, now).unwrap_err();
        assert_eq!(err.error_code(), "InvalidSignature");
        assert!(err
            .to_string()
            .starts_with("attestation signature is not base64"));
    }

    #[test]
    fn rejects_unreadable_certificates_and_ca_leaves() {
        let now = clock::unix_secs();
        let (root, _, key) = chain_for("sensor-7", KeyType::EcdsaP256);
        let signature = sign_attestation(&id("sensor-7"), now, &key).unwrap();
        let err = verify("sensor-7", "garbage", &signature, now, &root, now).unwrap_err();
        assert_eq!(err.error_code(), "InvalidCertificate", "{err}");

        let ca = CertificateAuthority::generate("Root").unwrap();
        let sub = ca.issue_intermediate("sensor-7").unwrap();
        let signature = sign_attestation(&id("sensor-7"), now, sub.key()).unwrap();
        let err = verify(
            "sensor-7",
            sub.cert_pem(),
            &signature,
            now,
            ca.cert_pem(),
            now,
        )
        .unwrap_err();
        assert_eq!(
            err,
            X509Error::LeafIsCa {
                subject: "sensor-7".into()
            }
        );
    }
}
