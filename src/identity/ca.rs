//! [`CertificateAuthority`]: a CA certificate and its key that issues certificates the way a
//! cloud does. The emulators issue device and claim certificates with it, `fleetgw demo`
//! creates its throw-away PKI with it, and tests build chains with it.
//!
//! Issuing from a CSR never trusts what the CSR asks for beyond subject and public key: rcgen's
//! `CertificateSigningRequestParams::signed_by` would copy the requested CA flag, key usages and
//! (default, 1975-4096) validity, so the issuer builds the certificate parameters itself.

use std::net::IpAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use x509_parser::time::ASN1Time;

use super::cert::{common_name, first_certificate_der, parse_der, spki_equal, to_pem};
use super::csr::{check_common_name, csr_der, verified_csr};
use super::{IdentityError, KeyType, PrivateKey, Secret};
use crate::clock;

const DAY: i64 = 86_400;
/// Validity of generated CA and intermediate certificates.
const CA_VALIDITY_DAYS: i64 = 3_650;
/// Issued certificates start this many seconds in the past so that a device whose clock is a
/// little behind does not reject a brand-new certificate as "not yet valid".
const BACKDATE_SECS: i64 = 60;

/// A CA certificate with its private key, able to issue client, server and intermediate
/// certificates.
#[derive(Clone)]
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    not_after: i64,
    key: PrivateKey,
    /// The CA as rcgen's issuer, made once: it parses the CA certificate, which cost a parse
    /// per certificate signed (the emulator signs one per device provisioned).
    issuer: Arc<Issuer<'static, PrivateKey>>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("not_after", &self.not_after)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed root CA (ECDSA P-256, valid 10 years from now).
    pub fn generate(common_name: &str) -> Result<Self, IdentityError> {
        check_common_name(common_name)?;
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let now = clock::unix_secs();
        let params = ca_params(
            common_name,
            now - BACKDATE_SECS,
            now + CA_VALIDITY_DAYS * DAY,
        )?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::signing(format!("CA certificate {common_name:?}"), e))?;
        Self::assemble(cert.der().to_vec(), key)
    }

    /// Loads an existing CA from its PEM certificate and PEM private key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let key = PrivateKey::from_pem_named(key_pem, "CA key")?;
        let der = first_certificate_der(cert_pem, "CA certificate")?;
        let cert = parse_der(&der, "CA certificate")?;
        if !cert.is_ca() {
            return Err(IdentityError::malformed(
                "CA certificate",
                "is not a CA certificate (basicConstraints CA=true missing)",
            ));
        }
        if !spki_equal(cert.public_key(), &key.public_key_der()) {
            return Err(IdentityError::KeyMismatch {
                input: "CA certificate and CA key".into(),
            });
        }
        Self::assemble(der, key)
    }

    fn assemble(cert_der: Vec<u8>, key: PrivateKey) -> Result<Self, IdentityError> {
        let not_after = parse_der(&cert_der, "CA certificate")?
            .validity()
            .not_after
            .timestamp();
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.as_slice()), key.clone())
                .map_err(|e| IdentityError::malformed("CA certificate", e))?;
        Ok(Self {
            cert_pem: to_pem("CERTIFICATE", cert_der.clone()),
            cert_der,
            not_after,
            key,
            issuer: Arc::new(issuer),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> Secret {
        self.key.to_pkcs8_pem()
    }

    /// The CA private key.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// Signs a device CSR the way a cloud does: the ISSUER sets validity (given days), key usage
    /// (digitalSignature), EKU clientAuth, not-a-CA, random serial, subject from the CSR.
    ///
    /// The CSR signature is verified first ([`IdentityError::CsrSignature`] if it does not).
    pub fn issue_from_csr(
        &self,
        csr_pem: &str,
        validity_days: u32,
    ) -> Result<String, IdentityError> {
        // Decoded and verified once; the certificate takes subject and key from it.
        let der = csr_der(csr_pem)?;
        let csr = verified_csr(&der)?;
        let info = &csr.certification_request_info;
        let subject = copy_subject(&info.subject)?;
        let public_key =
            rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw).map_err(|e| {
                IdentityError::malformed("CSR", format!("public key cannot be certified: {e}"))
            })?;
        let mut params = self.leaf_params(subject, validity_days)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let what = format!(
            "certificate for CSR {:?}",
            common_name(&info.subject).unwrap_or_default()
        );
        self.sign(&params, &public_key, &what)
    }

    /// Key + client certificate for `common_name` (claim certificates, gateway certificates,
    /// tests).
    pub fn issue_client(
        &self,
        common_name: &str,
        kt: KeyType,
        validity_days: u32,
    ) -> Result<(String, PrivateKey), IdentityError> {
        check_common_name(common_name)?;
        let key = PrivateKey::generate(kt)?;
        let mut params = self.leaf_params(cn_only(common_name), validity_days)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let pem = self.sign(
            &params,
            &key,
            &format!("client certificate {common_name:?}"),
        )?;
        Ok((pem, key))
    }

    /// Server certificate with the given DNS names and IP addresses as SANs, serverAuth EKU.
    pub fn issue_server(
        &self,
        common_name: &str,
        dns: &[&str],
        ips: &[IpAddr],
        validity_days: u32,
    ) -> Result<(String, PrivateKey), IdentityError> {
        check_common_name(common_name)?;
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let mut params = self.leaf_params(cn_only(common_name), validity_days)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        for name in dns {
            let ia5 = (*name)
                .try_into()
                .map_err(|e| IdentityError::malformed(format!("DNS name {name:?}"), e))?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let pem = self.sign(
            &params,
            &key,
            &format!("server certificate {common_name:?}"),
        )?;
        Ok((pem, key))
    }

    /// Intermediate CA signed by this CA (for chain tests / X.509 enrollment groups).
    /// Its certificate PEM holds only itself; append [`Self::cert_pem`] to present a chain.
    pub fn issue_intermediate(
        &self,
        common_name: &str,
    ) -> Result<CertificateAuthority, IdentityError> {
        check_common_name(common_name)?;
        let now = clock::unix_secs();
        self.check_not_expired(now)?;
        let key = PrivateKey::generate(KeyType::EcdsaP256)?;
        let not_after = (now + CA_VALIDITY_DAYS * DAY).min(self.not_after);
        let mut params = ca_params(common_name, now - BACKDATE_SECS, not_after)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.use_authority_key_identifier_extension = true;
        let pem = self.sign(&params, &key, &format!("intermediate CA {common_name:?}"))?;
        let der = first_certificate_der(&pem, "intermediate CA")?;
        Self::assemble(der, key)
    }

    /// Parameters every end-entity certificate shares: not a CA, digitalSignature, random
    /// serial, validity from now for `validity_days` (never beyond this CA's own expiry).
    fn leaf_params(
        &self,
        subject: DistinguishedName,
        validity_days: u32,
    ) -> Result<CertificateParams, IdentityError> {
        if validity_days == 0 {
            return Err(IdentityError::malformed(
                "certificate validity",
                "must be at least 1 day",
            ));
        }
        let now = clock::unix_secs();
        self.check_not_expired(now)?;
        let not_after = (now + i64::from(validity_days) * DAY).min(self.not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, now - BACKDATE_SECS, not_after)?;
        Ok(params)
    }

    /// An expired CA would only issue certificates that are born expired.
    fn check_not_expired(&self, now: i64) -> Result<(), IdentityError> {
        if self.not_after <= now {
            return Err(IdentityError::malformed(
                "CA certificate",
                format!(
                    "expired {} s ago; it cannot issue certificates",
                    now - self.not_after
                ),
            ));
        }
        Ok(())
    }

    fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
        what: &str,
    ) -> Result<String, IdentityError> {
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(|e| IdentityError::signing(what, e))?;
        Ok(cert.pem())
    }
}

fn ca_params(
    common_name: &str,
    not_before: i64,
    not_after: i64,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = cn_only(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    set_validity(&mut params, not_before, not_after)?;
    Ok(params)
}

fn cn_only(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The CSR subject, attribute by attribute, as UTF-8 strings.
fn copy_subject(
    name: &x509_parser::x509::X509Name<'_>,
) -> Result<DistinguishedName, IdentityError> {
    let mut dn = DistinguishedName::new();
    for attr in name.iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .map(|i| i.collect())
            .ok_or_else(|| {
                IdentityError::malformed("CSR", "subject attribute with an oversized OID")
            })?;
        let value = attr.as_str().map_err(|_| {
            IdentityError::malformed(
                "CSR",
                format!("subject attribute {} is not a string", attr.attr_type()),
            )
        })?;
        dn.push(
            DnType::from_oid(&oid),
            DnValue::Utf8String(value.to_string()),
        );
    }
    Ok(dn)
}

fn set_validity(
    params: &mut CertificateParams,
    not_before: i64,
    not_after: i64,
) -> Result<(), IdentityError> {
    let time = |t: i64| {
        ASN1Time::from_timestamp(t)
            .map(|t| t.to_datetime())
            .map_err(|e| IdentityError::malformed("certificate validity", e))
    };
    params.not_before = time(not_before)?;
    params.not_after = time(not_after)?;
    Ok(())
}

/// 16 random bytes, positive and of fixed length when DER-encoded.
fn random_serial() -> Result<SerialNumber, IdentityError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| IdentityError::signing("certificate serial number", "system random failed"))?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Certificates with arbitrary validity, for expiry tests.
    use super::*;

    /// A client certificate for `common_name` valid only in `[not_before, not_after]`.
    pub(crate) fn issue_client_with_validity(
        ca: &CertificateAuthority,
        common_name: &str,
        not_before: i64,
        not_after: i64,
    ) -> (String, PrivateKey) {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let mut params = ca.leaf_params(cn_only(common_name), 1).unwrap();
        set_validity(&mut params, not_before, not_after).unwrap();
        let pem = ca.sign(&params, &key, "test").unwrap();
        (pem, key)
    }

    /// A "CA" whose certificate is an end-entity (CA=false) certificate issued by `ca`:
    /// what an attacker holding a device certificate would try to issue with.
    pub(crate) fn non_ca_issuer(
        ca: &CertificateAuthority,
        common_name: &str,
    ) -> CertificateAuthority {
        let (pem, key) = ca
            .issue_client(common_name, KeyType::EcdsaP256, 30)
            .unwrap();
        let der = first_certificate_der(&pem, "test").unwrap();
        CertificateAuthority::assemble(der, key).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_util::openssl_csr;
    use crate::identity::{cert_matches_csr, create_csr, parse_certificates, verify_chain};
    use x509_parser::certificate::X509Certificate;
    use x509_parser::prelude::FromDer;

    fn parsed(pem: &str) -> (Vec<u8>, i64) {
        let der = first_certificate_der(pem, "t").unwrap();
        (der, clock::unix_secs())
    }

    #[test]
    fn generated_ca_is_a_ten_year_p256_root() {
        let ca = CertificateAuthority::generate("Fleet Root").unwrap();
        let (der, now) = parsed(ca.cert_pem());
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(cert.is_ca());
        assert!(!ca.cert_pem().contains('\r'));
        assert_eq!(cert.subject().to_string(), "CN=Fleet Root");
        assert_eq!(cert.issuer().to_string(), "CN=Fleet Root");
        cert.verify_signature(None).unwrap();
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let days = (cert.validity().not_after.timestamp() - now) / DAY;
        assert!((3649..=3650).contains(&days), "{days} days");
        assert_eq!(ca.key().key_type(), KeyType::EcdsaP256);
    }

    #[test]
    fn issuing_from_a_csr_ignores_what_the_csr_asks_for() {
        let ca = CertificateAuthority::generate("Fleet Root").unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP384).unwrap();
        // A greedy CSR: wants to be a CA, sign certificates and act as a TLS server.
        let mut wants = CertificateParams::default();
        wants.distinguished_name = cn_only("sensor-1");
        wants.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        wants.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        wants.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = wants.serialize_request(&key).unwrap().pem().unwrap();

        let cert_pem = ca.issue_from_csr(&csr, 30).unwrap();
        let (der, now) = parsed(&cert_pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(cert.subject().to_string(), "CN=sensor-1");
        assert_eq!(cert.issuer().to_string(), "CN=Fleet Root");
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!((cert.validity().not_before.timestamp() - now).abs() <= BACKDATE_SECS + 5);
        assert!((cert.validity().not_after.timestamp() - (now + 30 * DAY)).abs() <= 5);
        cert.verify_signature(Some(
            X509Certificate::from_der(ca.cert_der())
                .unwrap()
                .1
                .public_key(),
        ))
        .unwrap();

        assert!(cert_matches_csr(&cert_pem, &csr).unwrap());
        verify_chain(&cert_pem, ca.cert_pem(), now).unwrap();

        // Each issuance has its own random serial.
        let again = ca.issue_from_csr(&csr, 30).unwrap();
        let serials: Vec<String> = [&cert_pem, &again]
            .iter()
            .map(|p| parse_certificates(p).unwrap()[0].serial_hex.clone())
            .collect();
        assert_ne!(serials[0], serials[1]);
    }

    #[test]
    fn validity_never_exceeds_the_issuer() {
        let root = CertificateAuthority::generate("Root").unwrap();
        let (cert, _) = root
            .issue_client("long", KeyType::EcdsaP256, 100_000)
            .unwrap();
        let info = &parse_certificates(&cert).unwrap()[0];
        assert_eq!(info.not_after, root.not_after);
        assert!(root.issue_client("zero", KeyType::EcdsaP256, 0).is_err());
    }

    #[test]
    fn an_expired_ca_issues_nothing() {
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let now = clock::unix_secs();
        let params = ca_params("Old Root", now - 20 * DAY, now - DAY).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let old = CertificateAuthority::assemble(cert.der().to_vec(), key).unwrap();
        let err = old
            .issue_client("dev", KeyType::EcdsaP256, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("CA certificate: expired")
                && err.ends_with("it cannot issue certificates"),
            "{err}"
        );
        assert!(old.issue_intermediate("I").is_err());
    }

    #[test]
    fn tampered_csrs_are_not_issued() {
        let ca = CertificateAuthority::generate("Root").unwrap();
        let key = PrivateKey::generate(KeyType::EcdsaP256).unwrap();
        let csr = create_csr("sensor-1", &key).unwrap();
        let mut der = csr_der(&csr).unwrap();
        *der.last_mut().unwrap() ^= 0x01;
        let bad = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        assert!(matches!(
            ca.issue_from_csr(&bad, 30),
            Err(IdentityError::CsrSignature)
        ));
    }

    #[test]
    fn issues_openssl_csrs_and_openssl_verifies_the_result() {
        let ca = CertificateAuthority::generate("Fleet Root").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let Some(csr) = openssl_csr(d, &["rsa:2048"], "/O=Acme/CN=plc-7", "r.csr") else {
            return;
        };
        let cert = ca.issue_from_csr(&csr, 7).unwrap();
        std::fs::write(d.join("cert.pem"), &cert).unwrap();
        std::fs::write(d.join("ca.pem"), ca.cert_pem()).unwrap();
        let out = crate::identity::test_util::openssl(
            d,
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslclient",
                "cert.pem",
            ],
        )
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap().trim(), "cert.pem: OK");
        let (der, _) = parsed(&cert);
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(parsed.subject().to_string(), "O=Acme, CN=plc-7");
    }

    #[test]
    fn weak_rsa_csrs_are_refused_and_large_ones_issued() {
        let ca = CertificateAuthority::generate("Root").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let Some(weak) = openssl_csr(d, &["rsa:1024"], "/CN=dev", "weak.csr") else {
            return;
        };
        let Some(big) = openssl_csr(d, &["rsa:4096"], "/CN=dev", "big.csr") else {
            return;
        };
        let err = ca.issue_from_csr(&weak, 1).unwrap_err().to_string();
        assert!(
            err.starts_with("CSR: unsupported key RSA-1024 (too weak"),
            "{err}"
        );
        let cert = ca.issue_from_csr(&big, 1).unwrap();
        assert!(cert_matches_csr(&cert, &big).unwrap());
    }

    #[test]
    fn from_pem_round_trips_and_refuses_mismatches() {
        let ca = CertificateAuthority::generate("Root").unwrap();
        let key_pem = ca.key_pem();
        let loaded =
            CertificateAuthority::from_pem(ca.cert_pem(), key_pem.expose_str().unwrap()).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        let (leaf, _) = loaded.issue_client("dev", KeyType::Rsa2048, 1).unwrap();
        verify_chain(&leaf, ca.cert_pem(), clock::unix_secs()).unwrap();

        let other = CertificateAuthority::generate("Root").unwrap();
        let err =
            CertificateAuthority::from_pem(ca.cert_pem(), other.key_pem().expose_str().unwrap())
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "CA certificate and CA key: the private key does not match the certificate's public key"
        );

        let (client_pem, client_key) = ca.issue_client("dev", KeyType::EcdsaP256, 1).unwrap();
        let err = CertificateAuthority::from_pem(
            &client_pem,
            client_key.to_pkcs8_pem().expose_str().unwrap(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("CA certificate: is not a CA certificate"),
            "{err}"
        );
        let err = CertificateAuthority::from_pem(ca.cert_pem(), "nope").unwrap_err();
        assert!(err.to_string().starts_with("CA key: "), "{err}");
    }

    #[test]
    fn server_certificates_carry_sans_and_server_auth() {
        let ca = CertificateAuthority::generate("Root").unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let (pem, key) = ca
            .issue_server("emulator", &["localhost", "iot.example"], &[ip], 30)
            .unwrap();
        let (der, _) = parsed(&pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            names,
            [
                "DNSName(localhost)",
                "DNSName(iot.example)",
                "IPAddress(7f:00:00:01)"
            ]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(crate::identity::cert_matches_key(&pem, &key).unwrap());
        let err = ca
            .issue_server("x", &["bad name ü"], &[], 1)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("DNS name \"bad name ü\""), "{err}");
    }
}
