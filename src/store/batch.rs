//! Multi-tree changes applied atomically: a [`Batch`] collects puts and removes over the
//! devices, secrets, tokens, record and meta trees; [`Store::apply`] hands it to the commit
//! thread, which applies it inside one sled transaction (so a crash leaves all or none of it)
//! together with the other batches waiting at that moment, then flushes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use super::{
    check_meta_key, encode, encode_device_with_etag, get, lock_device_writes, stored_etag,
    DeviceRecord, OwnershipTokenRecord, RecordTree, Store, StoreError, DEVICES, TOKENS,
};
use crate::device_id::DeviceId;

/// A set of changes over several trees, applied atomically by [`Store::apply`].
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<Op>,
}

#[derive(Debug)]
enum Op {
    PutDevice {
        rec: Arc<DeviceRecord>,
        expected_etag: Option<u64>,
    },
    RemoveDevice(DeviceId),
    PutSecret(DeviceId, Vec<u8>),
    RemoveSecret(DeviceId),
    PutToken(OwnershipTokenRecord),
    RemoveToken(DeviceId),
    PutRecord(RecordTree, String, Vec<u8>),
    RemoveRecord(RecordTree, String),
    PutMeta(String, Vec<u8>),
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Batch::default()
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when the batch changes nothing.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Writes a device record; its etag becomes the stored etag + 1.
    pub fn put_device(&mut self, rec: DeviceRecord) -> &mut Self {
        self.ops.push(Op::PutDevice {
            rec: Arc::new(rec),
            expected_etag: None,
        });
        self
    }

    /// Writes a device record only if the stored etag is `expected_etag` (else the whole batch
    /// fails with [`StoreError::Conflict`]).
    pub fn put_device_if(&mut self, rec: DeviceRecord, expected_etag: u64) -> &mut Self {
        self.put_shared_device_if(Arc::new(rec), expected_etag)
    }

    /// [`Batch::put_device_if`] for a record the caller keeps too (the provisioning steps
    /// carry the record they wrote to their next step): shared, not copied. The store sets
    /// the etag it writes, whatever `rec.etag` says.
    pub fn put_shared_device_if(
        &mut self,
        rec: Arc<DeviceRecord>,
        expected_etag: u64,
    ) -> &mut Self {
        self.ops.push(Op::PutDevice {
            rec,
            expected_etag: Some(expected_etag),
        });
        self
    }

    /// Deletes a device record.
    pub fn remove_device(&mut self, id: &DeviceId) -> &mut Self {
        self.ops.push(Op::RemoveDevice(id.clone()));
        self
    }

    /// Stores a device's secret (opaque bytes, sealed by the caller when configured).
    pub fn put_secret(&mut self, id: &DeviceId, sealed: &[u8]) -> &mut Self {
        self.ops.push(Op::PutSecret(id.clone(), sealed.to_vec()));
        self
    }

    /// Deletes a device's secret.
    pub fn remove_secret(&mut self, id: &DeviceId) -> &mut Self {
        self.ops.push(Op::RemoveSecret(id.clone()));
        self
    }

    /// Stores an ownership token record (key = its device).
    pub fn put_token(&mut self, rec: OwnershipTokenRecord) -> &mut Self {
        self.ops.push(Op::PutToken(rec));
        self
    }

    /// Deletes a device's ownership token.
    pub fn remove_token(&mut self, id: &DeviceId) -> &mut Self {
        self.ops.push(Op::RemoveToken(id.clone()));
        self
    }

    /// Stores a record in one of the [`RecordTree`]s.
    pub fn put_record<T: Serialize>(
        &mut self,
        tree: RecordTree,
        key: &str,
        value: &T,
    ) -> Result<&mut Self, StoreError> {
        let bytes = encode(tree.name(), key, value)?;
        self.ops.push(Op::PutRecord(tree, key.to_owned(), bytes));
        Ok(self)
    }

    /// Deletes a record from one of the [`RecordTree`]s.
    pub fn remove_record(&mut self, tree: RecordTree, key: &str) -> &mut Self {
        self.ops.push(Op::RemoveRecord(tree, key.to_owned()));
        self
    }

    /// Stores a `meta` value (not the reserved schema key).
    pub fn put_meta(&mut self, key: &str, value: &[u8]) -> Result<&mut Self, StoreError> {
        check_meta_key(key)?;
        self.ops.push(Op::PutMeta(key.to_owned(), value.to_vec()));
        Ok(self)
    }
}

impl Store {
    /// Applies every change in `batch` atomically, then waits until it is durable. A failed etag
    /// check fails the whole batch ([`StoreError::Conflict`]) and changes nothing.
    ///
    /// Batches are group-committed: the commit thread applies every batch waiting at that moment
    /// in one sled transaction, then flushes once. sled writes out its log buffer for every
    /// transaction, so one transaction per batch would cost a log write per batch; a group
    /// costs one for all of them.
    pub async fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut batch = batch;
        for op in &mut batch.ops {
            match op {
                // Copied only when its token is sealed: the caller's copy stays in clear.
                Op::PutDevice { rec, .. }
                    if self.sealer().is_some() && rec.state.has_ownership_token() =>
                {
                    self.seal_device(Arc::make_mut(rec));
                }
                Op::PutToken(rec) => self.seal_token_record(rec),
                _ => {}
            }
        }
        // Refused at once while full; queued before, the group's flush answers it.
        let eng = {
            let (_gate, eng) = self.write_gate()?;
            eng
        };
        eng.commit.apply(batch).await
    }

    /// The device's record as [`Store::device`] returns it, given `known`, the version a
    /// successful [`Store::apply`] of the caller wrote (unsealed, with the etag it got): while
    /// the stored etag is still `known.etag`, `known` itself, without decoding and unsealing
    /// the stored value again. Every write bumps the etag, so any other change is read back.
    pub fn device_since(&self, known: DeviceRecord) -> Result<Option<DeviceRecord>, StoreError> {
        let key = known.id.as_str();
        match get(&self.engine()?.devices, DEVICES, key)? {
            Some(v) => match stored_etag(key, &v) {
                Ok(etag) if etag == known.etag => Ok(Some(known)),
                _ => self.device_or_quarantine(key.as_bytes(), &v),
            },
            None => Ok(None),
        }
    }
}

/// A change prepared by the check phase of a group transaction.
struct Write {
    tree: usize,
    key: Vec<u8>,
    /// `None` removes the key.
    value: Option<Vec<u8>>,
}

/// Indexes into [`BatchTrees::all`].
const T_DEVICES: usize = 0;
const T_SECRETS: usize = 1;
const T_TOKENS: usize = 2;
const T_META: usize = 6;

fn record_tree_index(tree: RecordTree) -> usize {
    match tree {
        RecordTree::Operations => 3,
        RecordTree::EnrollmentGroups => 4,
        RecordTree::DeviceGroups => 5,
    }
}

/// The trees batches write to, held by the commit thread.
pub(crate) struct BatchTrees {
    pub(crate) devices: sled::Tree,
    pub(crate) secrets: sled::Tree,
    pub(crate) tokens: sled::Tree,
    pub(crate) operations: sled::Tree,
    pub(crate) enrollment_groups: sled::Tree,
    pub(crate) device_groups: sled::Tree,
    pub(crate) meta: sled::Tree,
    /// The store's lock for read-modify-write of device records.
    pub(crate) device_writes: Arc<Mutex<()>>,
}

impl BatchTrees {
    /// Applies `batches` in one sled transaction and returns one outcome per batch, in order.
    /// A batch whose etag check fails (or whose record does not encode) changes nothing and gets
    /// its error; the others are applied. A failure of sled itself fails them all.
    pub(crate) fn apply_group(&self, batches: &[&Batch]) -> Vec<Result<(), StoreError>> {
        let _guard = lock_device_writes(&self.device_writes);
        let result = (
            &self.devices,
            &self.secrets,
            &self.tokens,
            &self.operations,
            &self.enrollment_groups,
            &self.device_groups,
            &self.meta,
        )
            .transaction(|(devices, secrets, tokens, ops, enroll, groups, meta)| {
                let trees = [devices, secrets, tokens, ops, enroll, groups, meta];
                let mut outcomes = Vec::with_capacity(batches.len());
                for batch in batches {
                    // Check every condition and encode every value first, so that a batch is
                    // applied whole or not at all within the shared transaction.
                    match prepare(devices, batch)? {
                        Ok(writes) => {
                            for w in writes {
                                match w.value {
                                    Some(v) => trees[w.tree].insert(w.key, v)?,
                                    None => trees[w.tree].remove(w.key)?,
                                };
                            }
                            outcomes.push(Ok(()));
                        }
                        Err(e) => outcomes.push(Err(e)),
                    }
                }
                Ok::<_, ConflictableTransactionError<StoreError>>(outcomes)
            });
        match result {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let message = match e {
                    TransactionError::Abort(e) => e.to_string(),
                    TransactionError::Storage(e) => e.to_string(),
                };
                batches
                    .iter()
                    .map(|_| {
                        Err(StoreError::Transaction {
                            message: message.clone(),
                        })
                    })
                    .collect()
            }
        }
    }
}

/// The check phase for one batch: etag conditions evaluated in order (a batch that writes the
/// same device twice sees its own first write), values encoded. `Ok(Err(_))` is the batch's
/// own failure; `Err(_)` is sled's and aborts the transaction.
fn prepare(
    devices: &TransactionalTree,
    batch: &Batch,
) -> Result<Result<Vec<Write>, StoreError>, UnabortableTransactionError> {
    // Etags as the batch's earlier operations leave them.
    let mut etags: HashMap<&str, Option<u64>> = HashMap::new();
    let mut writes = Vec::with_capacity(batch.ops.len());
    for op in &batch.ops {
        let write = match op {
            Op::PutDevice { rec, expected_etag } => {
                let key = rec.id.as_str();
                let found = match etags.get(key) {
                    Some(etag) => *etag,
                    None => match devices.get(key)? {
                        Some(v) => match stored_etag(key, &v) {
                            Ok(etag) => Some(etag),
                            Err(e) => return Ok(Err(e)),
                        },
                        None => None,
                    },
                };
                if let Some(expected) = *expected_etag {
                    if found != Some(expected) {
                        return Ok(Err(StoreError::Conflict {
                            id: rec.id.clone(),
                            expected,
                            found,
                        }));
                    }
                }
                let etag = found.unwrap_or(0) + 1;
                etags.insert(key, Some(etag));
                match encode_device_with_etag(key, rec, etag) {
                    Ok(bytes) => Write {
                        tree: T_DEVICES,
                        key: key.as_bytes().to_vec(),
                        value: Some(bytes),
                    },
                    Err(e) => return Ok(Err(e)),
                }
            }
            Op::RemoveDevice(id) => {
                etags.insert(id.as_str(), None);
                Write {
                    tree: T_DEVICES,
                    key: id.as_str().as_bytes().to_vec(),
                    value: None,
                }
            }
            Op::PutSecret(id, bytes) => Write {
                tree: T_SECRETS,
                key: id.as_str().as_bytes().to_vec(),
                value: Some(bytes.clone()),
            },
            Op::RemoveSecret(id) => Write {
                tree: T_SECRETS,
                key: id.as_str().as_bytes().to_vec(),
                value: None,
            },
            Op::PutToken(rec) => {
                let key = rec.device.as_str();
                match encode(TOKENS, key, rec) {
                    Ok(bytes) => Write {
                        tree: T_TOKENS,
                        key: key.as_bytes().to_vec(),
                        value: Some(bytes),
                    },
                    Err(e) => return Ok(Err(e)),
                }
            }
            Op::RemoveToken(id) => Write {
                tree: T_TOKENS,
                key: id.as_str().as_bytes().to_vec(),
                value: None,
            },
            Op::PutRecord(tree, key, bytes) => Write {
                tree: record_tree_index(*tree),
                key: key.as_bytes().to_vec(),
                value: Some(bytes.clone()),
            },
            Op::RemoveRecord(tree, key) => Write {
                tree: record_tree_index(*tree),
                key: key.as_bytes().to_vec(),
                value: None,
            },
            Op::PutMeta(key, value) => Write {
                tree: T_META,
                key: key.as_bytes().to_vec(),
                value: Some(value.clone()),
            },
        };
        writes.push(write);
    }
    Ok(Ok(writes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    #[tokio::test]
    async fn device_since_reuses_the_committed_record_until_the_stored_etag_moves() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("state"), &StoreOptions::default()).unwrap();
        let d = DeviceId::parse("sensor-1").unwrap();
        store
            .put_device(&DeviceRecord::new(d.clone(), "json", 1))
            .await
            .unwrap();
        let mut batch = Batch::new();
        batch.put_device_if(DeviceRecord::new(d.clone(), "cbor", 2), 1);
        store.apply(batch).await.unwrap();

        // The caller's copy of what it wrote, with the etag the write got.
        let mut known = DeviceRecord::new(d.clone(), "cbor", 2);
        known.etag = 2;
        let mut marked = known.clone();
        marked.created_at_ms = 777; // never stored: shows the copy came back, not a read
        let got = store.device_since(marked).unwrap().unwrap();
        assert_eq!(got.created_at_ms, 777);
        assert_eq!(got.etag, 2);

        // Anyone else's write bumps the etag: the stored record comes back.
        let mut other = store.device(&d).unwrap().unwrap();
        other.created_at_ms = 5;
        store.put_device(&other).await.unwrap();
        let got = store.device_since(known.clone()).unwrap().unwrap();
        assert_eq!((got.created_at_ms, got.etag), (5, 3));

        // Removed meanwhile: gone.
        store.remove_device(&d).await.unwrap();
        assert!(store.device_since(known).unwrap().is_none());
    }
}
