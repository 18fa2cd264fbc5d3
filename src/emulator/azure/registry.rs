//! The devices the emulated DPS assigned to the emulated hub: what `GET /registrations`
//! lists and what the hub checks a connecting device against. Kept in `DIR/registrations.json`
//! (rewritten atomically on each assignment) so a restarted emulator still knows its devices.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::emulator::EmulatorError;
use crate::identity;

/// How a device proved its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Attestation {
    /// SAS token signed with the key derived from the symmetric-key group's key.
    SymmetricKey,
    /// Client certificate issued under the X.509 group's CA, CN = registration id.
    #[serde(rename = "x509")]
    X509,
}

/// One assigned device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// The registration id as the device sent it.
    pub registration_id: String,
    /// The device id at the hub (= registration id for enrollment groups).
    pub device_id: String,
    /// Host name of the hub it was assigned to.
    pub assigned_hub: String,
    /// `assigned`.
    pub status: String,
    /// `initialAssignment` on first assignment, `reprovisionedToInitialAssignment` after.
    pub substatus: String,
    /// How it attested.
    pub attestation: Attestation,
    /// The enrollment group it registered through.
    pub enrollment_group: String,
    /// First assignment, unix ms.
    pub created_ms: u64,
    /// Latest assignment, unix ms.
    pub updated_ms: u64,
    /// Changes with every assignment.
    pub etag: String,
}

/// Registrations by lower-case registration id (ids are case-insensitive).
pub struct Registry {
    path: PathBuf,
    devices: Mutex<BTreeMap<String, Registration>>,
}

impl Registry {
    /// Loads `path` if it exists.
    pub fn open(path: &Path) -> Result<Self, EmulatorError> {
        let devices = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| EmulatorError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("not a registrations file: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(EmulatorError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            devices: Mutex::new(devices),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Registration>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an assignment (keeping the first `created_ms` of a re-registration) and
    /// returns the stored record.
    pub fn assign(&self, mut registration: Registration) -> Registration {
        let key = registration.registration_id.to_ascii_lowercase();
        let mut devices = self.lock();
        if let Some(previous) = devices.get(&key) {
            registration.created_ms = previous.created_ms;
            registration.substatus = "reprovisionedToInitialAssignment".into();
        }
        registration.etag = super::dps::new_etag();
        devices.insert(key, registration.clone());
        // Written under the lock so that files never go back in time; the file is small.
        match serde_json::to_vec_pretty(&*devices) {
            Ok(bytes) => {
                if let Err(e) = identity::write_file_atomic(&self.path, &bytes, 0o644) {
                    tracing::warn!(path = %self.path.display(), error = %e, "emulator could not save registrations");
                }
            }
            Err(e) => tracing::warn!(error = %e, "emulator could not encode registrations"),
        }
        registration
    }

    /// The registration of `registration_id` (any case).
    pub fn get(&self, registration_id: &str) -> Option<Registration> {
        self.lock()
            .get(&registration_id.to_ascii_lowercase())
            .cloned()
    }

    /// Every registration, by id.
    pub fn all(&self) -> Vec<Registration> {
        self.lock().values().cloned().collect()
    }
}
