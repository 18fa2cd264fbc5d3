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
    tmp_name.push(format!(".tmp-{}", super::cert::hex(&suffix)));
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

fn write_and_rename(tmp: &Path, path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(|e| IdentityError::io(tmp, e))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| IdentityError::io(tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| IdentityError::io(tmp, e))?;
    file.sync_all().map_err(|e| IdentityError::io(tmp, e))?;
    drop(file);
    std::fs::rename(tmp, path).map_err(|e| IdentityError::io(path, e))
}
