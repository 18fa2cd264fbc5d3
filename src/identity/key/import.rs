//! Importing key files users bring, through openssl: the legacy and passphrase-protected
//! formats (`openssl genrsa -aes256`, encrypted PKCS#8 in PEM or DER, PKCS#12 bundles) that
//! aws-lc-rs does not read. The key is handed on to aws-lc-rs as PKCS#8 right away.

use std::cell::Cell;
use std::path::Path;

use super::PrivateKey;
use crate::identity::{IdentityError, KeyType, Secret};

impl PrivateKey {
    /// Loads a private key file in any format users commonly have:
    /// PKCS#8, SEC1 or PKCS#1 PEM, encrypted PEM (`openssl genrsa -aes256`, `openssl pkcs8 -v2`,
    /// `openssl genpkey -aes256`), unencrypted DER, or a PKCS#12 bundle (`.p12`/`.pfx`, key part).
    pub fn import_file(path: &Path, passphrase: Option<&Secret>) -> Result<Self, IdentityError> {
        let bytes = crate::identity::read_secret_file(path)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::test_util::openssl;

    /// The public key openssl derives from `key_file`, as SubjectPublicKeyInfo DER.
    fn openssl_public_der(dir: &Path, key_file: &str, pass: Option<&str>) -> Vec<u8> {
        let passin = pass.map(|p| format!("pass:{p}"));
        let mut args = vec!["pkey", "-in", key_file, "-pubout", "-outform", "DER"];
        if let Some(p) = &passin {
            args.extend(["-passin", p.as_str()]);
        }
        openssl(dir, &args).unwrap()
    }

    /// Imports `dir/file`, made private first (as an operator must) when it exists.
    fn import(dir: &Path, file: &str, pass: Option<&str>) -> Result<PrivateKey, IdentityError> {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o600));
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
}
