//! Reading the passphrase of an imported key file, from a file or a systemd credential
//! (`LoadCredential=`), and locating systemd credentials for the rest of the module.

use std::path::{Path, PathBuf};

use crate::identity::{IdentityError, Secret};

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
    let mut bytes = std::mem::take(&mut *crate::identity::read_secret_file(&path)?);
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
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn write_private(path: &Path, content: impl AsRef<[u8]>) {
        std::fs::write(path, content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn reads_passphrases_from_a_file_or_a_systemd_credential() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pass");
        write_private(&file, "s3cret \n");
        let pass = read_passphrase(Some(&file), None).unwrap().unwrap();
        assert_eq!(pass.expose(), b"s3cret ");
        write_private(&file, "crlf\r\n");
        assert_eq!(
            read_passphrase(Some(&file), None)
                .unwrap()
                .unwrap()
                .expose(),
            b"crlf"
        );
        assert!(read_passphrase(None, None).unwrap().is_none());

        // The only test in this crate that touches CREDENTIALS_DIRECTORY.
        write_private(&dir.path().join("claim-pass"), "from-systemd\n");
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

        write_private(&dir.path().join("seal"), [7u8; 32]);
        let sealer = crate::identity::Sealer::from_credential("seal").unwrap();
        let direct = crate::identity::Sealer::from_key_bytes(&[7u8; 32]).unwrap();
        let kind = crate::identity::SealedRecord::DeviceKey;
        let blob = sealer.seal(kind, "d", b"x");
        assert_eq!(direct.open(kind, "d", &blob).unwrap().expose(), b"x");

        std::env::remove_var("CREDENTIALS_DIRECTORY");
        let err = read_passphrase(None, Some("claim-pass"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("$CREDENTIALS_DIRECTORY is not set"), "{err}");
    }
}
