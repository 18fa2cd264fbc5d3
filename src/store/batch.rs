//! Multi-tree changes applied atomically: a [`Batch`] collects puts and removes over the
//! devices, secrets, tokens, record and meta trees; [`Store::apply`] runs them in one sled
//! transaction (so a crash leaves all or none of them) and then waits for durability.

use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use super::{
    check_meta_key, encode, stored_etag, DeviceRecord, OwnershipTokenRecord, RecordTree, Store,
    StoreError, DEVICES, TOKENS,
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
        rec: Box<DeviceRecord>,
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
            rec: Box::new(rec),
            expected_etag: None,
        });
        self
    }

    /// Writes a device record only if the stored etag is `expected_etag` (else the whole batch
    /// fails with [`StoreError::Conflict`]).
    pub fn put_device_if(&mut self, rec: DeviceRecord, expected_etag: u64) -> &mut Self {
        self.ops.push(Op::PutDevice {
            rec: Box::new(rec),
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
    /// Applies every change in `batch` atomically (one sled transaction over all trees), then
    /// waits until it is durable. A failed etag check aborts the whole batch.
    pub async fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.apply_now(&batch)?;
        self.durable().await
    }

    fn apply_now(&self, batch: &Batch) -> Result<(), StoreError> {
        let i = &self.inner;
        let _guard = self.device_lock();
        let result = (
            &i.devices,
            &i.secrets,
            &i.tokens,
            &i.operations,
            &i.enrollment_groups,
            &i.device_groups,
            &i.meta,
        )
            .transaction(|(devices, secrets, tokens, ops, enroll, groups, meta)| {
                for op in &batch.ops {
                    match op {
                        Op::PutDevice { rec, expected_etag } => {
                            tx_put_device(devices, rec, *expected_etag)?;
                        }
                        Op::RemoveDevice(id) => {
                            devices.remove(id.as_str())?;
                        }
                        Op::PutSecret(id, bytes) => {
                            secrets.insert(id.as_str(), bytes.as_slice())?;
                        }
                        Op::RemoveSecret(id) => {
                            secrets.remove(id.as_str())?;
                        }
                        Op::PutToken(rec) => {
                            let key = rec.device.as_str();
                            let bytes = encode(TOKENS, key, rec)
                                .map_err(ConflictableTransactionError::Abort)?;
                            tokens.insert(key, bytes)?;
                        }
                        Op::RemoveToken(id) => {
                            tokens.remove(id.as_str())?;
                        }
                        Op::PutRecord(tree, key, bytes) => {
                            let t = match tree {
                                RecordTree::Operations => ops,
                                RecordTree::EnrollmentGroups => enroll,
                                RecordTree::DeviceGroups => groups,
                            };
                            t.insert(key.as_str(), bytes.as_slice())?;
                        }
                        Op::RemoveRecord(tree, key) => {
                            let t = match tree {
                                RecordTree::Operations => ops,
                                RecordTree::EnrollmentGroups => enroll,
                                RecordTree::DeviceGroups => groups,
                            };
                            t.remove(key.as_str())?;
                        }
                        Op::PutMeta(key, value) => {
                            meta.insert(key.as_str(), value.as_slice())?;
                        }
                    }
                }
                Ok(())
            });
        result.map_err(|e| match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(source) => StoreError::Transaction { source },
        })
    }
}

fn tx_put_device(
    devices: &TransactionalTree,
    rec: &DeviceRecord,
    expected_etag: Option<u64>,
) -> Result<(), ConflictableTransactionError<StoreError>> {
    let key = rec.id.as_str();
    let found = match devices.get(key)? {
        Some(v) => Some(stored_etag(key, &v).map_err(ConflictableTransactionError::Abort)?),
        None => None,
    };
    if let Some(expected) = expected_etag {
        if found != Some(expected) {
            return Err(ConflictableTransactionError::Abort(StoreError::Conflict {
                id: rec.id.clone(),
                expected,
                found,
            }));
        }
    }
    let mut next = rec.clone();
    next.etag = found.unwrap_or(0) + 1;
    let bytes = encode(DEVICES, key, &next).map_err(ConflictableTransactionError::Abort)?;
    devices.insert(key, bytes)?;
    Ok(())
}
