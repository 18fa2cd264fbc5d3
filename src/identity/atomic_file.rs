//! [`write_file_atomic`]: how key files, CSRs and exported secrets reach the disk.
//!
//! A reader (or a power cut) sees either the old file or the complete new one, never a
//! partial write, and a private key is never readable by others, not even for an instant:
//! the temporary file is created with its final mode, in the target's directory so the
//! rename stays on one filesystem.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::IdentityError;

/// Temp file in the same dir created with `mode`, write, fsync, rename over `path`, fsync the
/// directory. The final file has exactly `mode` (the umask can only have narrowed it while the
/// file was a temporary).
pub fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let file_name = path
        .file_name()
        .ok_or_else(|| IdentityError::malformed(path.display().to_string(), "not a file path"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut suffix = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut suffix);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = dir.join(tmp_name);

    let result = write_and_rename(&tmp, path, bytes, mode);
    if result.is_err() {
        // Best effort: the temporary is ours and useless now; the original error matters more.
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IdentityError::io(&dir, e))
}

/// Errors name the target `path`, not the temporary: that is the file the user asked for.
fn write_and_rename(tmp: &Path, path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let err = |e: std::io::Error| IdentityError::io(path, e);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(err)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_with_the_requested_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("dev.key");
        write_file_atomic(&key, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
        assert_eq!(mode(&key), 0o600);

        let csr = dir.path().join("dev.csr");
        write_file_atomic(&csr, b"public", 0o644).unwrap();
        assert_eq!(mode(&csr), 0o644);
        assert_eq!(entries(dir.path()), ["dev.csr", "dev.key"]);
    }

    #[test]
    fn replaces_an_existing_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, "old and much longer content").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_file_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(entries(dir.path()), ["state.json"]);
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no-such-dir").join("x.key");
        let err = write_file_atomic(&path, b"x", 0o600)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&format!("{}: ", path.display())), "{err}");
        assert!(err.contains("No such file"), "{err}");
        // Renaming over a directory fails; the temporary is cleaned up.
        let target = dir.path().join("taken");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), "x").unwrap();
        assert!(write_file_atomic(&target, b"x", 0o600).is_err());
        assert_eq!(entries(dir.path()), ["taken"]);
    }
}
