//! Files in an emulator's DIR: the directory itself (0700), optional reads, and atomic writes
//! of public (0644) and secret (0600) files. Shared by the emulators.

use std::path::Path;

use crate::emulator::EmulatorError;
use crate::identity;

/// Creates `dir` (and parents) with mode 0700 unless it exists.
pub fn create_dir(dir: &Path) -> Result<(), EmulatorError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| EmulatorError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Reads `path`, `None` if it does not exist.
pub fn read_opt(path: &Path) -> Result<Option<String>, EmulatorError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(EmulatorError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `path` atomically with `mode`.
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), EmulatorError> {
    identity::write_file_atomic(path, bytes, mode).map_err(|source| EmulatorError::Identity {
        what: format!("writing {}", path.display()),
        source,
    })
}

/// Writes a secret atomically with mode 0600.
pub fn write_secret(path: &Path, secret: &identity::Secret) -> Result<(), EmulatorError> {
    write(path, secret.expose(), 0o600)
}
