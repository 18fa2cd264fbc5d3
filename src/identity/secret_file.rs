//! [`read_secret_file`] and [`check_secret_file`]: the permission rule for key and credential
//! files the daemon reads (private keys, passphrase files, the sealing key, group key files,
//! password files).
//!
//! A secret that other local users can read is already leaked, so the daemon refuses it
//! rather than use it, as ssh does for `~/.ssh/id_*`. The rule is simple on purpose:
//! - no permission bit at all for "other";
//! - group bits only when the file's group is the daemon's own effective (primary) group,
//!   so `root:fleetgw 0640` works for a package that installs keys as root for the service;
//! - the owner is not checked: a file the daemon cannot read fails on read anyway.
//!
//! [`read_secret_file`] checks the already opened file (`fstat`), so a file swapped between
//! the check and the read cannot slip through.

use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

use zeroize::Zeroizing;

use super::IdentityError;

/// Reads a secret file after checking its permissions (see the module doc).
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
    let mut file = File::open(path).map_err(|e| IdentityError::io(path, e))?;
    let meta = file.metadata().map_err(|e| IdentityError::io(path, e))?;
    check_mode(path, meta.mode(), meta.gid(), effective_gid())?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes)
        .map_err(|e| IdentityError::io(path, e))?;
    Ok(bytes)
}

/// Checks the permissions of the secret file at `path` (following symlinks) without reading it.
pub fn check_secret_file(path: &Path) -> Result<(), IdentityError> {
    let meta = std::fs::metadata(path).map_err(|e| IdentityError::io(path, e))?;
    check_mode(path, meta.mode(), meta.gid(), effective_gid())
}

fn effective_gid() -> u32 {
    // SAFETY: getegid has no preconditions and cannot fail (POSIX).
    unsafe { libc::getegid() }
}

fn check_mode(path: &Path, mode: u32, file_gid: u32, own_gid: u32) -> Result<(), IdentityError> {
    let perms = mode & 0o777;
    let reason = if perms & 0o007 != 0 {
        "is accessible by other users"
    } else if perms & 0o070 != 0 && file_gid != own_gid {
        "is accessible by its group, which is not the daemon's own group"
    } else {
        return Ok(());
    };
    Err(IdentityError::InsecurePermissions {
        path: path.to_path_buf(),
        reason: format!(
            "{reason} (mode {perms:04o}); a key or credential file must be private: \
             chmod 600 it, or chmod 640 with the daemon's group"
        ),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn file_with_mode(dir: &Path, mode: u32) -> std::path::PathBuf {
        let path = dir.join(format!("secret-{mode:o}"));
        std::fs::write(&path, b"s3cret").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn private_modes_are_read_and_shared_modes_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // Files we create get our effective group, so group bits pass there.
        for mode in [0o600, 0o400, 0o640, 0o660, 0o700] {
            let path = file_with_mode(dir.path(), mode);
            assert_eq!(&read_secret_file(&path).unwrap()[..], b"s3cret", "{mode:o}");
            check_secret_file(&path).unwrap();
        }
        for mode in [0o644, 0o604, 0o602, 0o601, 0o666, 0o777] {
            let path = file_with_mode(dir.path(), mode);
            let err = read_secret_file(&path).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "{}: is accessible by other users (mode {mode:04o}); a key or credential \
                     file must be private: chmod 600 it, or chmod 640 with the daemon's group",
                    path.display()
                )
            );
            assert!(check_secret_file(&path).is_err(), "{mode:o}");
        }
    }

    #[test]
    fn group_bits_are_allowed_only_for_the_daemons_own_group() {
        let path = Path::new("/etc/fleetgw/claim.key");
        check_mode(path, 0o100640, 990, 990).unwrap();
        check_mode(path, 0o100600, 0, 990).unwrap();
        for mode in [0o640, 0o620, 0o610] {
            let err = check_mode(path, mode, 0, 990).unwrap_err().to_string();
            assert!(
                err.starts_with(
                    "/etc/fleetgw/claim.key: is accessible by its group, which is not the daemon's own group"
                ),
                "{err}"
            );
        }
        // The file type bits and setuid/sticky bits play no part.
        check_mode(path, 0o104600, 0, 990).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = read_secret_file(&missing).unwrap_err().to_string();
        assert!(err.starts_with(&missing.display().to_string()), "{err}");
    }
}
