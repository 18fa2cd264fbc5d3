//! Files in an emulator's DIR: the directory itself (0700, rid of a previous run's discovery
//! file at start), optional reads, atomic writes of public (0644) and secret (0600) files, and
//! the discovery files a started emulator leaves (`gateway.toml`, then `emulator.json`). Shared
//! by the emulators.

use std::path::{Path, PathBuf};

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

/// Creates DIR, canonicalises it and removes a previous run's `emulator.json` (its ports are
/// dead; its appearance must always mean "this run is listening").
pub fn prepare_dir(dir: &Path) -> Result<PathBuf, EmulatorError> {
    create_dir(dir)?;
    let dir = std::fs::canonicalize(dir).map_err(|source| EmulatorError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let discovery = dir.join("emulator.json");
    match std::fs::remove_file(&discovery) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(EmulatorError::Io {
                path: discovery,
                source,
            })
        }
    }
    Ok(dir)
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

/// Writes an emulator's discovery files in `dir`, both with `mode` (0600 when they hold keys, as
/// the Azure ones hold the enrollment group's): `gateway.toml` from `gateway_config`, then
/// `emulator.json` from `discovery`, last, since scripts treat its appearance as "ready,
/// everything written".
pub fn write_discovery(
    dir: &Path,
    gateway_config: Result<String, toml::ser::Error>,
    discovery: &serde_json::Value,
    mode: u32,
) -> Result<(), EmulatorError> {
    let discovery_path = dir.join("emulator.json");
    let mut json_bytes =
        serde_json::to_vec_pretty(discovery).map_err(|e| EmulatorError::Corrupt {
            path: discovery_path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
    json_bytes.push(b'\n');
    let config_path = dir.join("gateway.toml");
    let config = gateway_config.map_err(|e| EmulatorError::Corrupt {
        path: config_path.clone(),
        reason: format!("cannot encode: {e}"),
    })?;
    write(&config_path, config.as_bytes(), mode)?;
    write(&discovery_path, &json_bytes, mode)
}

/// What the `gateway.toml` of either emulator holds besides `[cloud]` (and the AWS one's
/// `[telemetry]`), in this order: the gateway's state directory and admin socket under the
/// emulator's `dir`, the device broker on 127.0.0.1:1883 and open admission.
pub fn gateway_toml_base(dir: &Path) -> toml::Table {
    let s = |v: String| toml::Value::String(v);
    let mut root = toml::Table::new();
    root.insert(
        "gateway".into(),
        toml_section(vec![(
            "state_dir",
            s(dir.join("gateway").display().to_string()),
        )]),
    );
    root.insert(
        "admin".into(),
        toml_section(vec![(
            "socket",
            s(dir.join("admin.sock").display().to_string()),
        )]),
    );
    root.insert(
        "downstream".into(),
        toml_section(vec![("listen", s("127.0.0.1:1883".into()))]),
    );
    root.insert(
        "admission".into(),
        toml_section(vec![("mode", s("open".into()))]),
    );
    root
}

/// A TOML table of `pairs`, for the `gateway.toml` the emulators write.
pub fn toml_section(pairs: Vec<(&str, toml::Value)>) -> toml::Value {
    toml::Value::Table(
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<toml::Table>(),
    )
}
