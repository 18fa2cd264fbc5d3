//! [`PrivateKey`]: generating device keys and loading keys that users bring.
//!
//! Keys live in memory as an rcgen [`KeyPair`] over aws-lc-rs, always built from PKCS#8 DER,
//! so the same bytes serve rcgen (CSRs, certificates), rustls (TLS) and the store. Generation
//! and the common unencrypted PEM forms go through aws-lc-rs only; openssl is used solely by
//! [`PrivateKey::import_file`] for the legacy and passphrase-protected formats users have on disk
//! (`openssl genrsa -aes256`, encrypted PKCS#8, PKCS#12).

use std::cell::Cell;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{
    EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING,
};
use rcgen::{KeyPair, PublicKeyData, RsaKeySize};
use rustls_pki_types::PrivatePkcs8KeyDer;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::{IdentityError, KeyType, Secret};

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
            pair: Arc::new(pair),
        })
    }

    /// Loads a private key file in any format users commonly have:
    /// PKCS#8, SEC1 or PKCS#1 PEM, encrypted PEM (`openssl genrsa -aes256`, `openssl pkcs8 -v2`,
    /// `openssl genpkey -aes256`), unencrypted DER, or a PKCS#12 bundle (`.p12`/`.pfx`, key part).
    pub fn import_file(path: &Path, passphrase: Option<&Secret>) -> Result<Self, IdentityError> {
        let bytes = std::fs::read(path).map_err(|e| IdentityError::io(path, e))?;
        let input = path.display().to_string();
        let pkey = if looks_like_pem(&bytes) {
            openssl_pem_key(path, &bytes, passphrase)?
        } else {
            openssl_binary_key(path, &bytes, passphrase)?
        };
        // Checked here because aws-lc-rs refuses e.g. RSA-1024 with a generic parse error.
        openssl_key_type(&pkey).map_err(|detail| IdentityError::UnsupportedKey {
            input: input.clone(),
            detail,
        })?;
        let pkcs8 = zeroize::Zeroizing::new(pkey.private_key_to_pkcs8().map_err(|e| {
            IdentityError::KeyFile {
                path: path.to_path_buf(),
                reason: format!("cannot convert the key to PKCS#8: {e}"),
            }
        })?);
        Self::from_pkcs8_der(&pkcs8, &input)
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

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// Reads a PEM key with openssl. The passphrase callback records whether openssl asked for a
/// passphrase: that is how an encrypted key without a configured passphrase, and a wrong
/// passphrase, are told apart from a file that holds no key at all. Passing a callback also
/// keeps openssl from prompting on the terminal.
fn openssl_pem_key(
    path: &Path,
    bytes: &[u8],
    passphrase: Option<&Secret>,
) -> Result<openssl::pkey::PKey<openssl::pkey::Private>, IdentityError> {
    let asked = Cell::new(false);
    let result = openssl::pkey::PKey::private_key_from_pem_callback(bytes, |buf| {
        asked.set(true);
        let pass = passphrase
            .map(Secret::expose)
            .ok_or_else(openssl::error::ErrorStack::get)?;
        if pass.len() > buf.len() {
            return Err(openssl::error::ErrorStack::get());
        }
        buf[..pass.len()].copy_from_slice(pass);
        Ok(pass.len())
    });
    match result {
        Ok(pkey) => Ok(pkey),
        Err(_) if asked.get() && passphrase.is_none() => Err(IdentityError::PassphraseRequired {
            path: path.to_path_buf(),
        }),
        Err(_) if asked.get() => Err(IdentityError::WrongPassphrase {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(IdentityError::KeyFile {
            path: path.to_path_buf(),
            reason: format!(
                "no readable private key in this PEM file ({})",
                first_openssl_reason(&e)
            ),
        }),
    }
}

/// Reads a PKCS#12 bundle or an unencrypted DER key with openssl.
fn openssl_binary_key(
    path: &Path,
    bytes: &[u8],
    passphrase: Option<&Secret>,
) -> Result<openssl::pkey::PKey<openssl::pkey::Private>, IdentityError> {
    if let Ok(p12) = openssl::pkcs12::Pkcs12::from_der(bytes) {
        let pass = match passphrase {
            None => "",
            Some(secret) => secret
                .expose_str()
                .filter(|s| !s.contains('\0'))
                .ok_or_else(|| IdentityError::KeyFile {
                    path: path.to_path_buf(),
                    reason: "a PKCS#12 passphrase must be UTF-8 text without NUL bytes".into(),
                })?,
        };
        let parsed = p12.parse2(pass).map_err(|_| match passphrase {
            None => IdentityError::PassphraseRequired {
                path: path.to_path_buf(),
            },
            Some(_) => IdentityError::WrongPassphrase {
                path: path.to_path_buf(),
            },
        })?;
        return parsed.pkey.ok_or_else(|| IdentityError::KeyFile {
            path: path.to_path_buf(),
            reason: "the PKCS#12 bundle holds no private key".into(),
        });
    }
    if let Ok(pkey) = openssl::pkey::PKey::private_key_from_der(bytes) {
        return Ok(pkey);
    }
    // Encrypted PKCS#8 in DER (`openssl pkcs8 -topk8 -outform DER`).
    if let Some(pass) = passphrase {
        if let Ok(pkey) =
            openssl::pkey::PKey::private_key_from_pkcs8_passphrase(bytes, pass.expose())
        {
            return Ok(pkey);
        }
    }
    let reason = match passphrase {
        None => "not a PEM private key, a DER private key or a PKCS#12 bundle",
        Some(_) => "not a PEM private key, a DER private key (plain or encrypted PKCS#8) or a PKCS#12 bundle, or the passphrase is wrong",
    };
    Err(IdentityError::KeyFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    })
}

/// The [`KeyType`] of a key openssl loaded, or a description of what it is instead.
fn openssl_key_type(pkey: &openssl::pkey::PKey<openssl::pkey::Private>) -> Result<KeyType, String> {
    use openssl::nid::Nid;
    use openssl::pkey::Id;
    match pkey.id() {
        Id::RSA => match pkey.bits() {
            2048 => Ok(KeyType::Rsa2048),
            3072 => Ok(KeyType::Rsa3072),
            bits => Err(format!("RSA-{bits}")),
        },
        Id::EC => {
            let curve = pkey.ec_key().ok().and_then(|ec| ec.group().curve_name());
            match curve {
                Some(Nid::X9_62_PRIME256V1) => Ok(KeyType::EcdsaP256),
                Some(Nid::SECP384R1) => Ok(KeyType::EcdsaP384),
                Some(nid) => Err(format!(
                    "ECDSA on curve {}",
                    nid.short_name().unwrap_or("unknown")
                )),
                None => Err("ECDSA with explicit curve parameters".into()),
            }
        }
        Id::ED25519 => Err("Ed25519".into()),
        Id::ED448 => Err("Ed448".into()),
        Id::DSA => Err("DSA".into()),
        Id::RSA_PSS => Err("RSA-PSS".into()),
        _ => Err("of an algorithm fleetgw does not know".into()),
    }
}

fn first_openssl_reason(e: &openssl::error::ErrorStack) -> String {
    e.errors()
        .first()
        .and_then(|err| err.reason().map(str::to_string))
        .unwrap_or_else(|| "no key found".to_string())
}

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

/// Reads a passphrase from `file` (one trailing newline removed) or, when no file is given,
/// from the systemd credential `credential` (`$CREDENTIALS_DIRECTORY/<credential>`).
/// `Ok(None)` when neither is configured.
pub fn read_passphrase(
    file: Option<&Path>,
    credential: Option<&str>,
) -> Result<Option<Secret>, IdentityError> {
    let path = match (file, credential) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(name)) => credential_path(name)?,
        (None, None) => return Ok(None),
    };
    let mut bytes = std::fs::read(&path).map_err(|e| IdentityError::io(&path, e))?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    Ok(Some(Secret::new(bytes)))
}

/// `$CREDENTIALS_DIRECTORY/<name>`, as systemd's `LoadCredential=`/`SetCredential=` provide.
pub(crate) fn credential_path(name: &str) -> Result<PathBuf, IdentityError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(IdentityError::Credential {
            name: name.to_string(),
            reason: "not a valid credential name (a file name, no '/')".into(),
        });
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| IdentityError::Credential {
        name: name.to_string(),
        reason: "$CREDENTIALS_DIRECTORY is not set (is the service started by systemd with LoadCredential=?)".into(),
    })?;
    Ok(PathBuf::from(dir).join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_util::openssl;

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

    /// The public key openssl derives from `key_file`, as SubjectPublicKeyInfo DER.
    fn openssl_public_der(dir: &Path, key_file: &str, pass: Option<&str>) -> Vec<u8> {
        let passin = pass.map(|p| format!("pass:{p}"));
        let mut args = vec!["pkey", "-in", key_file, "-pubout", "-outform", "DER"];
        if let Some(p) = &passin {
            args.extend(["-passin", p.as_str()]);
        }
        openssl(dir, &args).unwrap()
    }

    fn import(dir: &Path, file: &str, pass: Option<&str>) -> Result<PrivateKey, IdentityError> {
        let secret = pass.map(Secret::from);
        PrivateKey::import_file(&dir.join(file), secret.as_ref())
    }

    #[test]
    fn imports_unencrypted_pkcs8_sec1_and_pkcs1_files_made_by_openssl() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases: [(&str, &[&str], KeyType, &str); 3] = [
            (
                "pkcs8.pem",
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    "pkcs8.pem",
                ],
                KeyType::EcdsaP256,
                "-----BEGIN PRIVATE KEY-----",
            ),
            (
                "sec1.pem",
                &[
                    "ecparam",
                    "-name",
                    "secp384r1",
                    "-genkey",
                    "-noout",
                    "-out",
                    "sec1.pem",
                ],
                KeyType::EcdsaP384,
                "-----BEGIN EC PRIVATE KEY-----",
            ),
            (
                "pkcs1.pem",
                &["genrsa", "-traditional", "-out", "pkcs1.pem", "2048"],
                KeyType::Rsa2048,
                "-----BEGIN RSA PRIVATE KEY-----",
            ),
        ];
        for (file, args, kt, header) in cases {
            if openssl(d, args).is_none() {
                return;
            }
            let text = std::fs::read_to_string(d.join(file)).unwrap();
            assert!(text.starts_with(header), "{file}: {text}");
            let key = import(d, file, None).unwrap();
            assert_eq!(key.key_type(), kt, "{file}");
            assert_eq!(
                key.public_key_der(),
                openssl_public_der(d, file, None),
                "{file}"
            );
            // The same text parses without openssl too.
            let direct = PrivateKey::from_pem(&text).unwrap();
            assert_eq!(direct.public_key_der(), key.public_key_der(), "{file}");
        }
    }

    #[test]
    fn imports_passphrase_protected_files_and_names_a_missing_or_wrong_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let cases: [(&str, &[&str], &str, KeyType); 3] = [
            (
                "rsa-enc.pem",
                &[
                    "genrsa",
                    "-aes256",
                    "-passout",
                    "pass:secret",
                    "-out",
                    "rsa-enc.pem",
                    "2048",
                ],
                "secret",
                KeyType::Rsa2048,
            ),
            (
                "rsa-legacy-enc.pem",
                &[
                    "genrsa",
                    "-traditional",
                    "-aes256",
                    "-passout",
                    "pass:secret",
                    "-out",
                    "rsa-legacy-enc.pem",
                    "2048",
                ],
                "secret",
                KeyType::Rsa2048,
            ),
            (
                "ec-enc.pem",
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-aes256",
                    "-pass",
                    "pass:x",
                    "-out",
                    "ec-enc.pem",
                ],
                "x",
                KeyType::EcdsaP256,
            ),
        ];
        for (file, args, pass, kt) in cases {
            if openssl(d, args).is_none() {
                return;
            }
            let text = std::fs::read_to_string(d.join(file)).unwrap();
            assert!(
                text.contains("ENCRYPTED"),
                "{file} is not encrypted: {text}"
            );

            let key = import(d, file, Some(pass)).unwrap();
            assert_eq!(key.key_type(), kt, "{file}");
            assert_eq!(
                key.public_key_der(),
                openssl_public_der(d, file, Some(pass)),
                "{file}"
            );

            let path = d.join(file);
            match import(d, file, None) {
                Err(IdentityError::PassphraseRequired { path: p }) => assert_eq!(p, path),
                other => panic!("{file} without passphrase: {other:?}"),
            }
            let err = import(d, file, Some("wrong")).unwrap_err();
            assert!(
                matches!(err, IdentityError::WrongPassphrase { .. }),
                "{file}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "{}: wrong passphrase (or the encrypted key is corrupt)",
                    path.display()
                )
            );
        }
    }

    #[test]
    fn imports_der_keys_plain_and_encrypted() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let steps: [&[&str]; 3] = [
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-384",
                "-out",
                "k.pem",
            ],
            &[
                "pkcs8", "-topk8", "-nocrypt", "-in", "k.pem", "-outform", "DER", "-out", "k.der",
            ],
            &[
                "pkcs8",
                "-topk8",
                "-v2",
                "aes-256-cbc",
                "-passout",
                "pass:pw",
                "-in",
                "k.pem",
                "-outform",
                "DER",
                "-out",
                "k-enc.der",
            ],
        ];
        for args in steps {
            if openssl(d, args).is_none() {
                return;
            }
        }
        let reference = import(d, "k.pem", None).unwrap();
        for (file, pass) in [("k.der", None), ("k-enc.der", Some("pw"))] {
            let key = import(d, file, pass).unwrap();
            assert_eq!(key.key_type(), KeyType::EcdsaP384, "{file}");
            assert_eq!(key.public_key_der(), reference.public_key_der(), "{file}");
        }
        assert!(import(d, "k-enc.der", Some("wrong")).is_err());
    }

    #[test]
    fn imports_the_key_of_a_pkcs12_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let made = openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "claim.key",
                "-subj",
                "/CN=claim",
                "-days",
                "1",
                "-out",
                "claim.pem",
            ],
        );
        if made.is_none() {
            return;
        }
        openssl(
            d,
            &[
                "pkcs12",
                "-export",
                "-inkey",
                "claim.key",
                "-in",
                "claim.pem",
                "-passout",
                "pass:p12pass",
                "-out",
                "claim.p12",
            ],
        )
        .unwrap();

        let key = import(d, "claim.p12", Some("p12pass")).unwrap();
        assert_eq!(key.key_type(), KeyType::Rsa2048);
        let cert_pem = std::fs::read_to_string(d.join("claim.pem")).unwrap();
        assert!(crate::identity::cert_matches_key(&cert_pem, &key).unwrap());

        let err = import(d, "claim.p12", Some("nope")).unwrap_err();
        assert!(
            matches!(err, IdentityError::WrongPassphrase { .. }),
            "{err:?}"
        );
        let err = import(d, "claim.p12", None).unwrap_err();
        assert!(
            matches!(err, IdentityError::PassphraseRequired { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_unsupported_keys_and_files_without_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        if openssl(d, &["genrsa", "-out", "small.pem", "1024"]).is_none() {
            return;
        }
        let err = import(d, "small.pem", None).unwrap_err().to_string();
        assert!(err.contains("unsupported key RSA-1024"), "{err}");

        std::fs::write(d.join("garbage.bin"), [0xde, 0xad, 0xbe, 0xef]).unwrap();
        let err = import(d, "garbage.bin", None).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: not a PEM private key, a DER private key or a PKCS#12 bundle",
                d.join("garbage.bin").display()
            )
        );

        std::fs::write(
            d.join("cert-only.pem"),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = import(d, "cert-only.pem", None).unwrap_err().to_string();
        assert!(err.contains("no readable private key"), "{err}");

        let err = import(d, "missing.pem", None).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: ", d.join("missing.pem").display())),
            "{err}"
        );
    }

    #[test]
    fn reads_passphrases_from_a_file_or_a_systemd_credential() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pass");
        std::fs::write(&file, "s3cret \n").unwrap();
        let pass = read_passphrase(Some(&file), None).unwrap().unwrap();
        assert_eq!(pass.expose(), b"s3cret ");
        std::fs::write(&file, "crlf\r\n").unwrap();
        assert_eq!(
            read_passphrase(Some(&file), None)
                .unwrap()
                .unwrap()
                .expose(),
            b"crlf"
        );
        assert!(read_passphrase(None, None).unwrap().is_none());

        // The only test in this crate that touches CREDENTIALS_DIRECTORY.
        std::fs::write(dir.path().join("claim-pass"), "from-systemd\n").unwrap();
        std::env::set_var("CREDENTIALS_DIRECTORY", dir.path());
        let pass = read_passphrase(None, Some("claim-pass")).unwrap().unwrap();
        assert_eq!(pass.expose(), b"from-systemd");
        let err = read_passphrase(None, Some("../etc"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("systemd credential \"../etc\": not a valid"),
            "{err}"
        );

        std::fs::write(dir.path().join("seal"), [7u8; 32]).unwrap();
        let sealer = crate::identity::Sealer::from_credential("seal").unwrap();
        let direct = crate::identity::Sealer::from_key_bytes(&[7u8; 32]).unwrap();
        assert_eq!(direct.open(&sealer.seal(b"x")).unwrap().expose(), b"x");

        std::env::remove_var("CREDENTIALS_DIRECTORY");
        let err = read_passphrase(None, Some("claim-pass"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("$CREDENTIALS_DIRECTORY is not set"), "{err}");
    }

    #[test]
    fn counts_modulus_bits() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0xff]), 9);
        assert_eq!(modulus_bits(&[0, 0]), 0);
    }
}
