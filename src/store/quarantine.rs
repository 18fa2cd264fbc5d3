//! Quarantine: a stored value that does not decode (a damaged outbox entry, a device record
//! that is not JSON) is moved, bytes unchanged, to the `quarantine` tree under
//! `<tree>/<key>`, with an error log line and the `fleetgw_store_quarantined_total` metric,
//! so that it can be inspected later and never stalls the devices behind it: the telemetry
//! dispatcher would otherwise stop at the same outbox entry forever, and one bad record would
//! fail every device listing. Records written by a newer fleetgw are not garbage and are
//! never quarantined (their version error stands).
//!
//! The move is one sled transaction (the value is in exactly one of the two trees) and asks
//! for a flush without waiting for it: a crash before that flush leaves the value where it
//! was, to be quarantined again on the next read.

use std::sync::atomic::Ordering;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{decode_device, DeviceRecord, OutboxDecodeError, Store, StoreError, DEVICES};

/// Tree of the quarantined values: key `<tree>/<original key bytes>`, value the bytes as found.
pub(super) const QUARANTINE: &str = "quarantine";

/// Whether `e` says the value itself is damaged (and so belongs in quarantine).
pub(super) fn is_damage(e: &StoreError) -> bool {
    match e {
        StoreError::Decode { .. } | StoreError::BadKey { .. } => true,
        StoreError::OutboxDecode { source, .. } => {
            !matches!(source, OutboxDecodeError::NewerVersion(_))
        }
        _ => false,
    }
}

impl Store {
    /// Moves the value under `key` of the tree `name` (`tree`) to quarantine because of
    /// `why`, if it still is `found` (a writer may have replaced it meanwhile); returns the
    /// moved bytes.
    pub(super) fn quarantine(
        &self,
        name: &'static str,
        tree: &sled::Tree,
        key: &[u8],
        found: &[u8],
        why: &StoreError,
    ) -> Result<Option<sled::IVec>, StoreError> {
        let mut qkey = Vec::with_capacity(name.len() + 1 + key.len());
        qkey.extend_from_slice(name.as_bytes());
        qkey.push(b'/');
        qkey.extend_from_slice(key);
        let eng = self.engine()?;
        let moved = (tree, &eng.quarantine)
            .transaction(|(src, q)| {
                let old = src.get(key)?;
                match old {
                    Some(v) if v.as_ref() == found => {
                        src.remove(key)?;
                        q.insert(qkey.as_slice(), v.clone())?;
                        Ok::<_, ConflictableTransactionError<()>>(Some(v))
                    }
                    _ => Ok(None),
                }
            })
            .map_err(|e| StoreError::Transaction {
                message: match e {
                    TransactionError::Abort(()) => "quarantine aborted".into(),
                    TransactionError::Storage(e) => e.to_string(),
                },
            })?;
        if let Some(v) = &moved {
            self.inner.quarantined.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                tree = name,
                key = %String::from_utf8_lossy(key),
                bytes = v.len(),
                error = %why,
                "undecodable store value moved to the quarantine tree"
            );
            // Durable with the next flush; this one starts it without waiting.
            let _ = self.write_ticket();
        }
        Ok(moved)
    }

    /// The device record in `value` (stored under `key`); `None` when it does not decode and
    /// was moved to quarantine.
    pub(super) fn device_or_quarantine(
        &self,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<DeviceRecord>, StoreError> {
        match decode_device(&String::from_utf8_lossy(key), value) {
            Ok(rec) => self.open_device(rec).map(Some),
            Err(e) if is_damage(&e) => {
                self.quarantine(DEVICES, &self.engine()?.devices, key, value, &e)?;
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Values moved to quarantine since the store was opened (the metric
    /// `fleetgw_store_quarantined_total` counts this).
    pub fn quarantined(&self) -> u64 {
        self.inner.quarantined.load(Ordering::Relaxed)
    }

    /// Every quarantined value: (`<tree>/<key>` lossy UTF-8, bytes as found).
    pub fn quarantine_entries(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.engine()?
            .quarantine
            .iter()
            .map(|entry| {
                let (k, v) = entry.map_err(|source| StoreError::Sled {
                    tree: QUARANTINE,
                    op: "scan",
                    source,
                })?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }
}
