//! Reading certificates (x509-parser): their facts ([`CertInfo`]), whether they belong to a key
//! or CSR, and whether a chain leads to a trusted CA.
//!
//! Chain verification is deliberately small: signature of every link, validity at the given
//! time and the CA flag on every issuer. It is what admission (X.509 enrollment groups) and the
//! emulators need; TLS connections use rustls' full webpki verification instead.

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::x509::{SubjectPublicKeyInfo, X509Name};

use super::key::key_type_of_spki;
use super::{csr, IdentityError, KeyType, PrivateKey};

/// Longest chain (leaf + intermediates) accepted; deeper chains are refused, not walked.
const MAX_CHAIN_LEN: usize = 8;

/// The facts about one certificate that the rest of fleetgw uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject common name, if any.
    pub subject_cn: Option<String>,
    /// Issuer common name, if any.
    pub issuer_cn: Option<String>,
    /// Serial number as lower-case hex of its DER bytes.
    pub serial_hex: String,
    /// Start of validity, unix seconds.
    pub not_before: i64,
    /// End of validity, unix seconds.
    pub not_after: i64,
    /// SubjectPublicKeyInfo DER.
    pub public_key_der: Vec<u8>,
    /// The key type, `None` when the key is not one fleetgw generates (e.g. RSA-4096).
    pub key_type: Option<KeyType>,
    /// basicConstraints CA=true.
    pub is_ca: bool,
    /// SHA-256 of the DER, lower-case hex (what AWS uses as certificate id).
    pub fingerprint_sha256_hex: String,
    /// The certificate DER.
    pub der: Vec<u8>,
}

/// Every `CERTIFICATE` block of `pem`, in order, parsed; no certificate at all is an error.
pub fn parse_certificates(pem: &str) -> Result<Vec<CertInfo>, IdentityError> {
    let ders = certificate_ders(pem, "certificates")?;
    ders.into_iter()
        .enumerate()
        .map(|(i, der)| {
            let input = format!("certificate {}", i + 1);
            let cert = parse_der(&der, &input)?;
            Ok(cert_info(&cert, &der))
        })
        .collect()
}

/// True when the first certificate in `cert_pem` carries `key`'s public key.
pub fn cert_matches_key(cert_pem: &str, key: &PrivateKey) -> Result<bool, IdentityError> {
    let der = first_certificate_der(cert_pem, "certificate")?;
    let cert = parse_der(&der, "certificate")?;
    Ok(spki_equal(cert.public_key(), &key.public_key_der()))
}

/// True when the first certificate in `cert_pem` carries the public key the CSR asks for. The
/// CSR's signature is not verified again: it is one the gateway made or already verified.
pub fn cert_matches_csr(cert_pem: &str, csr_pem: &str) -> Result<bool, IdentityError> {
    let csr_key = csr::csr_public_key_der(csr_pem)?;
    let der = first_certificate_der(cert_pem, "certificate")?;
    let cert = parse_der(&der, "certificate")?;
    Ok(spki_equal(cert.public_key(), &csr_key))
}

/// Verifies that the leaf (first certificate of `chain_pem`), through the intermediates that
/// follow it, chains to one of the CA certificates in `trusted_ca_pem`: every signature
/// verifies, every certificate is valid at `now_unix`, and every issuer is a CA.
///
/// The chain may end with the trusted root itself. Errors name the failing link.
pub fn verify_chain(
    chain_pem: &str,
    trusted_ca_pem: &str,
    now_unix: i64,
) -> Result<(), IdentityError> {
    let chain_ders = certificate_ders(chain_pem, "chain")?;
    if chain_ders.len() > MAX_CHAIN_LEN {
        return Err(IdentityError::malformed(
            "chain",
            format!(
                "{} certificates; at most {MAX_CHAIN_LEN} are accepted",
                chain_ders.len()
            ),
        ));
    }
    let trusted_ders = certificate_ders(trusted_ca_pem, "trusted CAs")?;
    let chain = chain_ders
        .iter()
        .enumerate()
        .map(|(i, der)| parse_der(der, &format!("certificate {} in chain", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;
    let trusted = trusted_ders
        .iter()
        .enumerate()
        .map(|(i, der)| parse_der(der, &format!("trusted CA {}", i + 1)))
        .collect::<Result<Vec<_>, _>>()?;

    for (i, cert) in chain.iter().enumerate() {
        let link = format!("certificate {} in chain ({})", i + 1, cert.subject());
        check_validity(cert, now_unix, &link)?;
        if i > 0 {
            check_issuer(cert, &link, i - 1)?;
        }

        // A trusted CA that issued this certificate ends the walk successfully.
        let issuing_ca = trusted.iter().enumerate().find(|(_, ca)| {
            ca.subject().as_raw() == cert.issuer().as_raw()
                && cert.verify_signature(Some(ca.public_key())).is_ok()
        });
        if let Some((j, ca)) = issuing_ca {
            let ca_link = format!("trusted CA {} ({})", j + 1, ca.subject());
            check_validity(ca, now_unix, &ca_link)?;
            // The CA certificates under the trusted one: chain[1..=i].
            check_issuer(ca, &ca_link, i)?;
            return Ok(());
        }

        let Some(next) = chain.get(i + 1) else {
            return Err(IdentityError::Chain {
                link,
                reason: format!(
                    "not signed by any trusted CA (issuer {}; trusted: {})",
                    cert.issuer(),
                    names(&trusted)
                ),
            });
        };
        if cert.verify_signature(Some(next.public_key())).is_err() {
            return Err(IdentityError::Chain {
                link,
                reason: format!(
                    "not signed by certificate {} in chain ({}) nor by any trusted CA ({})",
                    i + 2,
                    next.subject(),
                    names(&trusted)
                ),
            });
        }
    }
    // The loop either returns Ok at a trusted CA or an error at the last certificate.
    Err(IdentityError::malformed("chain", "empty"))
}

fn names(certs: &[X509Certificate<'_>]) -> String {
    certs
        .iter()
        .map(|c| c.subject().to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks that `cert` may issue certificates with `cas_below` CA certificates under it:
/// basicConstraints CA=true, keyCertSign if it has a key usage, and its path length constraint.
fn check_issuer(
    cert: &X509Certificate<'_>,
    link: &str,
    cas_below: usize,
) -> Result<(), IdentityError> {
    let refuse = |reason: String| {
        Err(IdentityError::Chain {
            link: link.to_string(),
            reason,
        })
    };
    let constraints =
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => bc.value,
            Ok(_) => return refuse(
                "is not a CA (basicConstraints CA=true missing), so it cannot issue certificates"
                    .into(),
            ),
            Err(e) => return refuse(format!("unreadable basicConstraints: {e}")),
        };
    match cert.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            return refuse(
                "its keyUsage does not allow signing certificates (keyCertSign missing)".into(),
            )
        }
        Ok(_) => {}
        Err(e) => return refuse(format!("unreadable keyUsage: {e}")),
    }
    if let Some(max) = constraints.path_len_constraint {
        if cas_below > max as usize {
            return refuse(format!(
                "its path length constraint allows {max} intermediate CA(s) below it, the chain has {cas_below}"
            ));
        }
    }
    Ok(())
}

fn check_validity(cert: &X509Certificate<'_>, now: i64, link: &str) -> Result<(), IdentityError> {
    let validity = cert.validity();
    let (from, to) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    if now < from {
        return Err(IdentityError::Chain {
            link: link.to_string(),
            reason: format!("not valid yet (valid from {})", validity.not_before),
        });
    }
    if now > to {
        return Err(IdentityError::Chain {
            link: link.to_string(),
            reason: format!("expired (valid until {})", validity.not_after),
        });
    }
    Ok(())
}

/// Builds a [`CertInfo`] from a parsed certificate and its DER.
pub(crate) fn cert_info(cert: &X509Certificate<'_>, der: &[u8]) -> CertInfo {
    CertInfo {
        subject_cn: common_name(cert.subject()),
        issuer_cn: common_name(cert.issuer()),
        serial_hex: hex::encode(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        public_key_der: cert.public_key().raw.to_vec(),
        key_type: key_type_of_spki(cert.public_key()).ok(),
        is_ca: cert.is_ca(),
        fingerprint_sha256_hex: hex::encode(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref(),
        ),
        der: der.to_vec(),
    }
}

pub(crate) fn common_name(name: &X509Name<'_>) -> Option<String> {
    name.iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// Same key: same algorithm (with curve) and same key bits, regardless of DER details.
pub(crate) fn spki_equal(cert_spki: &SubjectPublicKeyInfo<'_>, other_der: &[u8]) -> bool {
    match SubjectPublicKeyInfo::from_der(other_der) {
        Ok((_, other)) => {
            cert_spki.algorithm.algorithm == other.algorithm.algorithm
                && cert_spki.algorithm.parameters == other.algorithm.parameters
                && cert_spki.subject_public_key.data == other.subject_public_key.data
        }
        Err(_) => false,
    }
}

pub(crate) fn parse_der<'a>(
    der: &'a [u8],
    input: &str,
) -> Result<X509Certificate<'a>, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| {
        IdentityError::malformed(input, format!("not a valid X.509 certificate: {e}"))
    })?;
    if !rest.is_empty() {
        return Err(IdentityError::malformed(
            input,
            "trailing bytes after the certificate",
        ));
    }
    Ok(cert)
}

/// DER of every `CERTIFICATE` block in `pem`, in order; none is an error naming `input`.
pub(crate) fn certificate_ders(pem: &str, input: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    if let Some(blocks) = super::pem_plain::plain_blocks(pem) {
        let ders: Vec<Vec<u8>> = blocks
            .into_iter()
            .filter(|(label, _)| *label == "CERTIFICATE")
            .map(|(_, der)| der)
            .collect();
        if !ders.is_empty() {
            return Ok(ders);
        }
    }
    let blocks = pem::parse_many(pem)
        .map_err(|e| IdentityError::malformed(input, format!("bad PEM: {e}")))?;
    let ders: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if ders.is_empty() {
        return Err(IdentityError::malformed(
            input,
            "no certificate found (no -----BEGIN CERTIFICATE----- block)",
        ));
    }
    Ok(ders)
}

/// PEM text of one block with `\n` line endings (the `pem` crate defaults to `\r\n`).
pub(crate) fn to_pem(tag: &str, der: Vec<u8>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(tag, der), config)
}

pub(crate) fn first_certificate_der(pem: &str, input: &str) -> Result<Vec<u8>, IdentityError> {
    let mut ders = certificate_ders(pem, input)?;
    Ok(ders.swap_remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock;
    use crate::identity::ca::test_support::{issue_client_with_validity, non_ca_issuer};
    use crate::identity::{create_csr, CertificateAuthority};

    /// The message `verify_chain` refuses `chain` with; panics if the chain verifies.
    fn chain_error(chain: &str, trusted_ca_pem: &str, now_unix: i64) -> String {
        verify_chain(chain, trusted_ca_pem, now_unix)
            .unwrap_err()
            .to_string()
    }

    const DAY: i64 = 86_400;

    #[test]
    fn parses_every_certificate_in_order() {
        let ca = CertificateAuthority::generate("Fleet Root").unwrap();
        let (leaf, key) = ca.issue_client("sensor-1", KeyType::EcdsaP256, 30).unwrap();
        let both = format!("{leaf}{}", ca.cert_pem());
        let infos = parse_certificates(&both).unwrap();
        assert_eq!(infos.len(), 2);

        let (l, r) = (&infos[0], &infos[1]);
        assert_eq!(l.subject_cn.as_deref(), Some("sensor-1"));
        assert_eq!(l.issuer_cn.as_deref(), Some("Fleet Root"));
        assert!(!l.is_ca);
        assert_eq!(l.public_key_der, key.public_key_der());
        let now = clock::unix_secs();
        assert!(
            (l.not_before - now).abs() < 120,
            "not_before {}",
            l.not_before
        );
        assert!(
            (l.not_after - (now + 30 * DAY)).abs() < 120,
            "not_after {}",
            l.not_after
        );
        assert_eq!(l.serial_hex.len(), 32);
        assert_eq!(l.fingerprint_sha256_hex.len(), 64);
        assert_eq!(l.der, first_certificate_der(&leaf, "t").unwrap());

        assert_eq!(r.subject_cn.as_deref(), Some("Fleet Root"));
        assert!(r.is_ca);
        assert_ne!(l.fingerprint_sha256_hex, r.fingerprint_sha256_hex);
        assert_ne!(l.serial_hex, r.serial_hex);
    }

    #[test]
    fn fingerprint_matches_openssl() {
        let ca = CertificateAuthority::generate("Fleet Root").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        let Some(out) = crate::identity::test_util::openssl(
            dir.path(),
            &["x509", "-in", "ca.pem", "-noout", "-fingerprint", "-sha256"],
        ) else {
            return;
        };
        let out = String::from_utf8(out).unwrap();
        let theirs = out
            .trim()
            .rsplit('=')
            .next()
            .unwrap()
            .replace(':', "")
            .to_lowercase();
        let ours = &parse_certificates(ca.cert_pem()).unwrap()[0];
        assert_eq!(ours.fingerprint_sha256_hex, theirs);
    }

    #[test]
    fn no_certificate_is_an_error() {
        let err = parse_certificates("nothing here").unwrap_err().to_string();
        assert_eq!(
            err,
            "certificates: no certificate found (no -----BEGIN CERTIFICATE----- block)"
        );
        let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let err = parse_certificates(bad).unwrap_err().to_string();
        assert!(
            err.starts_with("certificate 1: not a valid X.509 certificate"),
            "{err}"
        );
    }

    #[test]
    fn detects_key_and_csr_mismatches() {
        let ca = CertificateAuthority::generate("Fleet Root").unwrap();
        for kt in KeyType::ALL {
            let (cert, key) = ca.issue_client("dev", kt, 1).unwrap();
            assert_eq!(parse_certificates(&cert).unwrap()[0].key_type, Some(kt));
            let other = PrivateKey::generate(kt).unwrap();
            assert!(cert_matches_key(&cert, &key).unwrap(), "{kt}");
            assert!(!cert_matches_key(&cert, &other).unwrap(), "{kt}");
            assert!(
                cert_matches_csr(&cert, &create_csr("dev", &key).unwrap()).unwrap(),
                "{kt}"
            );
            assert!(
                !cert_matches_csr(&cert, &create_csr("dev", &other).unwrap()).unwrap(),
                "{kt}"
            );
        }
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        assert!(cert_matches_key("junk", &key).is_err());
    }

    #[test]
    fn chain_leaf_intermediate_root_verifies() {
        let root = CertificateAuthority::generate("Root").unwrap();
        let inter = root.issue_intermediate("Intermediate").unwrap();
        let (leaf, _) = inter
            .issue_client("sensor-1", KeyType::EcdsaP256, 30)
            .unwrap();
        let now = clock::unix_secs();

        let chain = format!("{leaf}{}", inter.cert_pem());
        verify_chain(&chain, root.cert_pem(), now).unwrap();
        // Also when the chain carries the root itself, and among several trusted CAs.
        verify_chain(&format!("{chain}{}", root.cert_pem()), root.cert_pem(), now).unwrap();
        let other = CertificateAuthority::generate("Other").unwrap();
        verify_chain(
            &chain,
            &format!("{}{}", other.cert_pem(), root.cert_pem()),
            now,
        )
        .unwrap();
        // A leaf issued by a trusted intermediate needs no more.
        verify_chain(&leaf, inter.cert_pem(), now).unwrap();
    }

    #[test]
    fn chain_failures_name_the_failing_link() {
        let root = CertificateAuthority::generate("Root").unwrap();
        let inter = root.issue_intermediate("Intermediate").unwrap();
        let (leaf, _) = inter
            .issue_client("sensor-1", KeyType::EcdsaP256, 30)
            .unwrap();
        let now = clock::unix_secs();

        // Intermediate missing.
        let err = chain_error(&leaf, root.cert_pem(), now);
        assert!(
            err.starts_with("certificate 1 in chain (CN=sensor-1): not signed by any trusted CA (issuer CN=Intermediate; trusted: CN=Root)"),
            "{err}"
        );

        // Wrong CA.
        let stranger = CertificateAuthority::generate("Root").unwrap();
        let chain = format!("{leaf}{}", inter.cert_pem());
        let err = chain_error(&chain, stranger.cert_pem(), now);
        assert!(
            err.starts_with(
                "certificate 2 in chain (CN=Intermediate): not signed by any trusted CA"
            ),
            "{err}"
        );

        // Wrong intermediate in the middle (same name, other key).
        let impostor = stranger.issue_intermediate("Intermediate").unwrap();
        let chain = format!("{leaf}{}", impostor.cert_pem());
        let err = chain_error(&chain, root.cert_pem(), now);
        assert!(err.starts_with("certificate 1 in chain (CN=sensor-1): not signed by certificate 2 in chain (CN=Intermediate)"), "{err}");

        // Expired at the given time: the leaf lives 30 days.
        let chain = format!("{leaf}{}", inter.cert_pem());
        let err = chain_error(&chain, root.cert_pem(), now + 31 * DAY);
        assert!(
            err.starts_with("certificate 1 in chain (CN=sensor-1): expired (valid until"),
            "{err}"
        );
        let err = chain_error(&chain, root.cert_pem(), now - DAY);
        assert!(
            err.starts_with("certificate 1 in chain (CN=sensor-1): not valid yet"),
            "{err}"
        );

        // Trusted CA itself expired: intermediates are capped at their issuer's expiry, so
        // one day past the root's 10 years fails at the intermediate first or the root.
        let err = chain_error(&chain, root.cert_pem(), now + 3651 * DAY);
        assert!(err.contains("expired"), "{err}");
    }

    #[test]
    fn an_expired_certificate_is_refused_at_the_current_time() {
        let root = CertificateAuthority::generate("Root").unwrap();
        let now = clock::unix_secs();
        let (old, _) =
            issue_client_with_validity(&root, "old-device", now - 20 * DAY, now - 10 * DAY);
        let info = &parse_certificates(&old).unwrap()[0];
        assert_eq!(info.not_after, now - 10 * DAY);
        let err = chain_error(&old, root.cert_pem(), now);
        assert!(
            err.starts_with("certificate 1 in chain (CN=old-device): expired"),
            "{err}"
        );
    }

    #[test]
    fn path_length_constraints_are_enforced() {
        let root = CertificateAuthority::generate("Root").unwrap();
        // issue_intermediate gives pathLen 0: this second-level CA should not exist.
        let inter = root.issue_intermediate("Intermediate").unwrap();
        let sub = inter.issue_intermediate("Sub").unwrap();
        let (leaf, _) = sub.issue_client("dev", KeyType::EcdsaP256, 1).unwrap();
        let chain = format!("{leaf}{}{}", sub.cert_pem(), inter.cert_pem());
        let err = chain_error(&chain, root.cert_pem(), clock::unix_secs());
        assert_eq!(
            err,
            "certificate 3 in chain (CN=Intermediate): its path length constraint allows 0 intermediate CA(s) below it, the chain has 1"
        );
        // The same constraint on a trusted intermediate.
        let chain = format!("{leaf}{}", sub.cert_pem());
        let err = chain_error(&chain, inter.cert_pem(), clock::unix_secs());
        assert!(
            err.starts_with("trusted CA 1 (CN=Intermediate): its path length constraint"),
            "{err}"
        );
        // The unconstrained root may have any depth below it.
        verify_chain(
            &format!("{leaf}{}", sub.cert_pem()),
            sub.cert_pem(),
            clock::unix_secs(),
        )
        .unwrap();
    }

    #[test]
    fn an_end_entity_cannot_act_as_an_intermediate() {
        let root = CertificateAuthority::generate("Root").unwrap();
        let device = non_ca_issuer(&root, "device-1");
        let (forged, _) = device
            .issue_client("victim", KeyType::EcdsaP256, 30)
            .unwrap();
        let chain = format!("{forged}{}", device.cert_pem());
        let err = chain_error(&chain, root.cert_pem(), clock::unix_secs());
        assert!(
            err.starts_with("certificate 2 in chain (CN=device-1): is not a CA (basicConstraints CA=true missing)"),
            "{err}"
        );
        // And a device certificate given as "trusted CA" does not make it one.
        let err = chain_error(&forged, device.cert_pem(), clock::unix_secs());
        assert!(
            err.starts_with("trusted CA 1 (CN=device-1): is not a CA"),
            "{err}"
        );
    }
}
