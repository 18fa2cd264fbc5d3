//! The emulated AWS IoT registry: certificates (PENDING_ACTIVATION until RegisterThing, then
//! ACTIVE or INACTIVE as the template says) and things, kept in memory behind one mutex and persisted to `DIR/state.json`.
//!
//! Persistence is a whole-registry JSON snapshot written atomically (temp file, fsync, rename)
//! by one background task, at most once per [`SNAPSHOT_INTERVAL`], whenever something changed:
//! provisioning thousands of certificates per second costs one write per interval, not one per
//! certificate. A crash can lose the last interval of changes, which is acceptable for an
//! emulator; a clean shutdown always writes the final state. The gateway's `store` module is
//! not used: it is the gateway's durable state, not the cloud's.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use crate::emulator::EmulatorError;
use crate::identity::write_file_atomic;

/// Shortest time between two snapshots of the registry.
pub(crate) const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(500);

/// Version of the `state.json` layout.
const STATE_VERSION: u32 = 1;

/// Lifecycle status of a certificate, spelled as AWS spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CertificateStatus {
    /// Issued by CreateCertificateFromCsr / CreateKeysAndCertificate, not yet registered.
    PendingActivation,
    /// Activated by RegisterThing; devices may connect with it.
    Active,
    /// Registered by a template whose certificate resource says `Status: Inactive` (or has
    /// no certificate resource): kept, but devices may not connect with it.
    Inactive,
}

/// What a successful RegisterThing produced, kept on the certificate so that a repeated
/// request with the same ownership token returns the same answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// Template that provisioned the certificate.
    pub template_name: String,
    /// Thing the certificate is attached to.
    pub thing_name: String,
    /// The template's device configuration as returned to the device.
    pub device_configuration: BTreeMap<String, String>,
}

/// One certificate in the registry (the PEM is not kept: only its id, the SHA-256 of the DER,
/// is needed to recognise it on a TLS connection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRecord {
    /// SHA-256 of the certificate DER, lower-case hex (AWS's certificate id format).
    pub certificate_id: String,
    /// PENDING_ACTIVATION or ACTIVE.
    pub status: CertificateStatus,
    /// When it was issued, unix milliseconds.
    pub created_at_ms: u64,
    /// When its ownership token expires (and, if still pending, the certificate is deleted).
    pub token_expires_at_ms: u64,
    /// Set by RegisterThing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<Registration>,
}

/// One thing in the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThingRecord {
    /// The thing name (also the MQTT client id its devices must use).
    pub thing_name: String,
    /// Attributes from the template's AttributePayload.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Certificates attached to the thing.
    #[serde(default)]
    pub certificate_ids: BTreeSet<String>,
    /// The template that created it.
    pub template_name: String,
    /// When it was created, unix milliseconds.
    pub created_at_ms: u64,
}

/// What the registry says about a device connection's certificate and client id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceAccess {
    /// ACTIVE certificate attached to the thing named by the client id.
    Allowed,
    /// The certificate is not in the registry (never issued here, or deleted after its
    /// ownership token expired).
    UnknownCertificate,
    /// The certificate exists but is not ACTIVE.
    NotActive,
    /// The certificate is ACTIVE but not attached to a thing with this name.
    ClientIdNotThing,
}

/// Why RegisterThing could not record a registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegisterOutcome {
    /// The thing was created or updated and the certificate activated now.
    Registered(Registration),
    /// The certificate was already registered with this token: the earlier answer.
    AlreadyRegistered(Registration),
    /// The certificate no longer exists (its token expired and it was deleted).
    UnknownCertificate,
}

/// What a new registration should create.
#[derive(Clone, Debug)]
pub struct NewRegistration {
    /// Template name.
    pub template_name: String,
    /// Thing to create or update.
    pub thing_name: String,
    /// Thing attributes.
    pub attributes: BTreeMap<String, String>,
    /// Device configuration to return.
    pub device_configuration: BTreeMap<String, String>,
    /// Whether the template activates the certificate (Status Active) or leaves it INACTIVE.
    pub activate: bool,
}

#[derive(Default)]
struct Inner {
    certificates: HashMap<String, CertificateRecord>,
    things: BTreeMap<String, ThingRecord>,
    /// Pending certificates in token-expiry order (the TTL is fixed per run, so insertion order
    /// is expiry order; a restart re-sorts).
    expiry_queue: VecDeque<(u64, String)>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Snapshot {
    version: u32,
    certificates: Vec<CertificateRecord>,
    things: Vec<ThingRecord>,
}

/// The registry, shared by every connection task and the inspection API.
pub struct Registry {
    inner: Mutex<Inner>,
    path: PathBuf,
    dirty: AtomicBool,
    changed: Notify,
}

impl Registry {
    /// Opens the registry persisted at `path` (`DIR/state.json`), or an empty one if the file
    /// does not exist yet.
    pub fn open(path: &Path) -> Result<Arc<Self>, EmulatorError> {
        let mut inner = Inner::default();
        match std::fs::read(path) {
            Ok(bytes) => {
                let snapshot: Snapshot =
                    serde_json::from_slice(&bytes).map_err(|e| EmulatorError::Corrupt {
                        path: path.to_path_buf(),
                        reason: format!("not an emulator state file: {e}"),
                    })?;
                if snapshot.version > STATE_VERSION {
                    return Err(EmulatorError::Corrupt {
                        path: path.to_path_buf(),
                        reason: format!(
                            "state version {} is newer than this fleetgw supports ({STATE_VERSION})",
                            snapshot.version
                        ),
                    });
                }
                let mut pending: Vec<(u64, String)> = Vec::new();
                for cert in snapshot.certificates {
                    if cert.status == CertificateStatus::PendingActivation {
                        pending.push((cert.token_expires_at_ms, cert.certificate_id.clone()));
                    }
                    inner.certificates.insert(cert.certificate_id.clone(), cert);
                }
                pending.sort();
                inner.expiry_queue = pending.into();
                for thing in snapshot.things {
                    inner.things.insert(thing.thing_name.clone(), thing);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(EmulatorError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        Ok(Arc::new(Self {
            inner: Mutex::new(inner),
            path: path.to_path_buf(),
            dirty: AtomicBool::new(false),
            changed: Notify::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_dirty(&self) {
        if !self.dirty.swap(true, Ordering::AcqRel) {
            self.changed.notify_one();
        }
    }

    /// Records a newly issued PENDING_ACTIVATION certificate.
    pub fn add_pending(&self, certificate_id: &str, now_ms: u64, token_expires_at_ms: u64) {
        {
            let mut inner = self.lock();
            inner.certificates.insert(
                certificate_id.to_string(),
                CertificateRecord {
                    certificate_id: certificate_id.to_string(),
                    status: CertificateStatus::PendingActivation,
                    created_at_ms: now_ms,
                    token_expires_at_ms,
                    registration: None,
                },
            );
            inner
                .expiry_queue
                .push_back((token_expires_at_ms, certificate_id.to_string()));
        }
        self.mark_dirty();
    }

    /// Registers `certificate_id` as RegisterThing does: creates or updates the thing, attaches
    /// the certificate and activates it. A certificate that already has a registration returns
    /// it unchanged (idempotent RegisterThing).
    pub fn register(
        &self,
        certificate_id: &str,
        new: NewRegistration,
        now_ms: u64,
    ) -> RegisterOutcome {
        let outcome = {
            let mut inner = self.lock();
            let Inner {
                certificates,
                things,
                ..
            } = &mut *inner;
            let Some(cert) = certificates.get_mut(certificate_id) else {
                return RegisterOutcome::UnknownCertificate;
            };
            if let Some(done) = &cert.registration {
                return RegisterOutcome::AlreadyRegistered(done.clone());
            }
            let thing = things
                .entry(new.thing_name.clone())
                .or_insert_with(|| ThingRecord {
                    thing_name: new.thing_name.clone(),
                    attributes: BTreeMap::new(),
                    certificate_ids: BTreeSet::new(),
                    template_name: new.template_name.clone(),
                    created_at_ms: now_ms,
                });
            // AWS updates an existing thing's attributes from the template (merge).
            thing.attributes.extend(new.attributes);
            thing.certificate_ids.insert(certificate_id.to_string());
            cert.status = if new.activate {
                CertificateStatus::Active
            } else {
                CertificateStatus::Inactive
            };
            let registration = Registration {
                template_name: new.template_name,
                thing_name: new.thing_name,
                device_configuration: new.device_configuration,
            };
            cert.registration = Some(registration.clone());
            RegisterOutcome::Registered(registration)
        };
        self.mark_dirty();
        outcome
    }

    /// Whether a device connection presenting `certificate_id` may connect as `client_id`.
    pub fn device_access(&self, certificate_id: &str, client_id: &str) -> DeviceAccess {
        let inner = self.lock();
        let Some(cert) = inner.certificates.get(certificate_id) else {
            return DeviceAccess::UnknownCertificate;
        };
        if cert.status != CertificateStatus::Active {
            return DeviceAccess::NotActive;
        }
        match inner.things.get(client_id) {
            Some(thing) if thing.certificate_ids.contains(certificate_id) => DeviceAccess::Allowed,
            _ => DeviceAccess::ClientIdNotThing,
        }
    }

    /// Deletes PENDING_ACTIVATION certificates whose ownership token expired at or before
    /// `now_ms`, as AWS does; returns how many were deleted.
    pub fn sweep_expired(&self, now_ms: u64) -> usize {
        let mut deleted = 0;
        {
            let mut inner = self.lock();
            while let Some((expires, _)) = inner.expiry_queue.front() {
                if *expires > now_ms {
                    break;
                }
                let Some((_, id)) = inner.expiry_queue.pop_front() else {
                    break;
                };
                let pending = inner
                    .certificates
                    .get(&id)
                    .is_some_and(|c| c.status == CertificateStatus::PendingActivation);
                if pending {
                    inner.certificates.remove(&id);
                    deleted += 1;
                }
            }
        }
        if deleted > 0 {
            self.mark_dirty();
        }
        deleted
    }

    /// Every certificate, ordered by id.
    pub fn certificates(&self) -> Vec<CertificateRecord> {
        let mut all: Vec<_> = self.lock().certificates.values().cloned().collect();
        all.sort_by(|a, b| a.certificate_id.cmp(&b.certificate_id));
        all
    }

    /// Every thing, ordered by name.
    pub fn things(&self) -> Vec<ThingRecord> {
        self.lock().things.values().cloned().collect()
    }

    /// (certificates, things) counts.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.certificates.len(), inner.things.len())
    }

    /// Writes the registry to `state.json` now if anything changed since the last write.
    pub async fn persist_if_dirty(self: &Arc<Self>) -> Result<(), EmulatorError> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let snapshot = {
            let inner = self.lock();
            Snapshot {
                version: STATE_VERSION,
                certificates: inner.certificates.values().cloned().collect(),
                things: inner.things.values().cloned().collect(),
            }
        };
        let path = self.path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let bytes = serde_json::to_vec(&snapshot).map_err(|e| EmulatorError::Corrupt {
                path: path.clone(),
                reason: format!("cannot encode state: {e}"),
            })?;
            write_file_atomic(&path, &bytes, 0o600).map_err(|e| EmulatorError::Identity {
                what: format!("writing {}", path.display()),
                source: e,
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(EmulatorError::Corrupt {
                path: self.path.clone(),
                reason: format!("state writer task failed: {e}"),
            })
        });
        if result.is_err() {
            // Try again at the next interval rather than silently dropping the change.
            self.mark_dirty();
        }
        result
    }

    /// Background task: writes a snapshot at most every [`SNAPSHOT_INTERVAL`] while things
    /// change, and a final one when `shutdown` turns true.
    pub async fn run_persister(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = shutdown.changed() => break,
            }
            // Batch the changes of the next interval into this write.
            tokio::select! {
                _ = tokio::time::sleep(SNAPSHOT_INTERVAL) => {}
                _ = shutdown.changed() => break,
            }
            if let Err(e) = self.persist_if_dirty().await {
                tracing::error!(error = %e, "emulator state not saved");
            }
        }
        if let Err(e) = self.persist_if_dirty().await {
            tracing::error!(error = %e, "emulator state not saved at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_registration(thing: &str) -> NewRegistration {
        NewRegistration {
            template_name: "FleetTemplate".into(),
            thing_name: thing.into(),
            attributes: BTreeMap::from([("SerialNumber".into(), "s1".into())]),
            device_configuration: BTreeMap::from([("k".into(), "v".into())]),
            activate: true,
        }
    }

    #[tokio::test]
    async fn register_activates_once_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let reg = Registry::open(&path).unwrap();
        reg.add_pending("c1", 1, 10_000);
        assert_eq!(reg.device_access("c1", "t1"), DeviceAccess::NotActive);
        let first = reg.register("c1", new_registration("t1"), 2);
        let RegisterOutcome::Registered(first) = first else {
            panic!("{first:?}")
        };
        let again = reg.register("c1", new_registration("other"), 3);
        assert_eq!(again, RegisterOutcome::AlreadyRegistered(first.clone()));
        assert_eq!(reg.things().len(), 1);
        assert_eq!(reg.device_access("c1", "t1"), DeviceAccess::Allowed);
        assert_eq!(
            reg.device_access("c1", "t2"),
            DeviceAccess::ClientIdNotThing
        );
        assert_eq!(
            reg.device_access("c2", "t1"),
            DeviceAccess::UnknownCertificate
        );
        reg.persist_if_dirty().await.unwrap();

        let reopened = Registry::open(&path).unwrap();
        assert_eq!(reopened.certificates(), reg.certificates());
        assert_eq!(reopened.things(), reg.things());
        assert_eq!(reopened.device_access("c1", "t1"), DeviceAccess::Allowed);
    }

    #[test]
    fn expired_pending_certificates_are_deleted_but_active_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&dir.path().join("state.json")).unwrap();
        reg.add_pending("a", 0, 100);
        reg.add_pending("b", 0, 200);
        reg.add_pending("c", 0, 300);
        reg.add_pending("d", 0, 150);
        reg.register("b", new_registration("t"), 1);
        let inactive = NewRegistration {
            activate: false,
            ..new_registration("t")
        };
        reg.register("d", inactive, 1);
        assert_eq!(reg.device_access("d", "t"), DeviceAccess::NotActive);
        assert_eq!(reg.sweep_expired(99), 0);
        assert_eq!(reg.sweep_expired(250), 1);
        let kept: Vec<_> = reg
            .certificates()
            .into_iter()
            .map(|c| (c.certificate_id, c.status))
            .collect();
        assert_eq!(
            kept,
            [
                ("b".to_string(), CertificateStatus::Active),
                ("c".to_string(), CertificateStatus::PendingActivation),
                ("d".to_string(), CertificateStatus::Inactive)
            ]
        );
        assert_eq!(
            reg.register("a", new_registration("t"), 2),
            RegisterOutcome::UnknownCertificate
        );
    }

    #[test]
    fn a_corrupt_state_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"{not json").unwrap();
        let err = Registry::open(&path).err().unwrap().to_string();
        assert!(
            err.contains("state.json: not an emulator state file"),
            "{err}"
        );
    }
}
