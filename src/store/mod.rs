//! The gateway's durable state: the only module that touches sled.
//!
//! Trees (DESIGN.md "Store"): `devices` (id -> [`DeviceRecord`]), `secrets` (id -> opaque, possibly
//! sealed key bytes), `tokens` (id -> [`OwnershipTokenRecord`]), `operations`,
//! `enrollment_groups`, `device_groups` (string key -> a record type owned by the admin layer,
//! see [`RecordTree`]), `outbox` (big-endian u64 sequence -> [`OutboxMessage`]) and `meta`
//! (schema version and small settings).
//!
//! Every mutating call returns only once the change is on disk. Durability uses group commit
//! ([`flusher`]): one thread flushes, and every writer waits for a flush that began after its
//! write, so N concurrent writers cost about one fsync. Changes spanning several trees go through
//! a [`Batch`], applied with one sled transaction and then made durable.
//!
//! Keeping sled behind this boundary lets us swap the engine (e.g. redb) without touching the
//! rest of the gateway if the kill -9 tests ever show corruption.

mod flusher;
mod records;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

use crate::device_id::DeviceId;
use flusher::GroupCommit;

pub use records::{
    DeviceRecord, DeviceState, ErrorInfo, OutboxDecodeError, OutboxMessage, OwnershipToken,
    OwnershipTokenRecord, ProvisionData, DEVICE_RECORD_VERSION, OUTBOX_MESSAGE_VERSION,
    TOKEN_RECORD_VERSION,
};

/// Schema version this build writes and the newest it can open.
pub const SCHEMA_VERSION: u32 = 1;
/// `meta` key holding the schema version (u32 big-endian); reserved.
pub const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Tuning for [`Store::open`] (config section `[store]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// sled page cache size in bytes (sled's own default is 1 GiB, too much for a gateway).
    pub cache_capacity: u64,
    /// sled's own periodic background flush; `None` = off (group commit flushes anyway).
    pub flush_interval_ms: Option<u64>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_capacity: 64 * 1024 * 1024,
            flush_interval_ms: None,
        }
    }
}

/// Everything that can go wrong in the store; each variant names the directory, tree or key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("state directory {dir}: cannot create it: {source}")]
    CreateDir {
        /// The state directory.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The state directory could not be inspected.
    #[error("state directory {dir}: cannot read its metadata: {source}")]
    DirMetadata {
        /// The state directory.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// sled refused to open the database.
    #[error("state directory {dir}: cannot open the database: {source}")]
    Open {
        /// The state directory.
        dir: PathBuf,
        /// Cause.
        source: sled::Error,
    },
    /// The database was written by a newer fleetgw.
    #[error(
        "state directory {dir}: schema version {found} was written by a newer fleetgw (this \
         build supports up to {supported}); upgrade fleetgw or use another gateway.state_dir"
    )]
    NewerSchema {
        /// The state directory.
        dir: PathBuf,
        /// Version found in `meta`.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// `meta/schema_version` is not a 4-byte big-endian number.
    #[error("state directory {dir}: meta key schema_version holds {len} bytes, expected 4")]
    BadSchemaVersion {
        /// The state directory.
        dir: PathBuf,
        /// Length of the stored value.
        len: usize,
    },
    /// The flusher thread could not be started.
    #[error("state directory {dir}: cannot start the flush thread: {source}")]
    FlusherThread {
        /// The state directory.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A sled read or write failed.
    #[error("store tree {tree}: {op} failed: {source}")]
    Sled {
        /// Tree name.
        tree: &'static str,
        /// What was attempted (`get`, `insert`, ...).
        op: &'static str,
        /// Cause.
        source: sled::Error,
    },
    /// A multi-tree transaction failed in sled itself.
    #[error("store transaction failed: {source}")]
    Transaction {
        /// Cause.
        source: sled::Error,
    },
    /// Flushing to disk failed: the change may not survive a power cut.
    #[error("state directory {dir}: flush to disk failed: {message}")]
    Flush {
        /// The state directory.
        dir: PathBuf,
        /// sled's message.
        message: String,
    },
    /// A stored record does not decode.
    #[error("store tree {tree}, key {key}: cannot decode the record: {source}")]
    Decode {
        /// Tree name.
        tree: &'static str,
        /// Key (lossy UTF-8).
        key: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// A record could not be encoded.
    #[error("store tree {tree}, key {key}: cannot encode the record: {source}")]
    Encode {
        /// Tree name.
        tree: &'static str,
        /// Key.
        key: String,
        /// Cause.
        source: serde_json::Error,
    },
    /// A stored record was written by a newer fleetgw.
    #[error("store tree {tree}, key {key}: record version {found} is newer than this build supports ({supported})")]
    NewerRecord {
        /// Tree name.
        tree: &'static str,
        /// Key.
        key: String,
        /// Stored version.
        found: u32,
        /// Version this build writes.
        supported: u32,
    },
    /// A stored outbox message does not decode.
    #[error("store tree outbox, sequence {seq}: {source}")]
    OutboxDecode {
        /// Sequence number.
        seq: u64,
        /// Cause.
        source: OutboxDecodeError,
    },
    /// A stored key is not what its tree expects (device id, 8-byte sequence).
    #[error("store tree {tree}, key {key}: {reason}")]
    BadKey {
        /// Tree name.
        tree: &'static str,
        /// Key (lossy UTF-8).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Compare-and-swap lost: the device changed since the caller read it.
    #[error("device {id}: etag {expected} does not match the stored etag {}", found.map_or("(no record)".to_string(), |f| f.to_string()))]
    Conflict {
        /// The device.
        id: DeviceId,
        /// The etag the caller expected.
        expected: u64,
        /// The stored etag, `None` when the device does not exist.
        found: Option<u64>,
    },
    /// The device does not exist.
    #[error("device {id}: not found")]
    DeviceNotFound {
        /// The device.
        id: DeviceId,
    },
    /// The `meta` key is reserved for the store itself.
    #[error("meta key {key} is reserved for the store")]
    ReservedMetaKey {
        /// The key.
        key: String,
    },
}

/// The trees whose record types belong to the layers above (admin operations, enrollment
/// groups, device groups); the store keeps them as versioned JSON under a string key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordTree {
    /// Long-running admin operations (`/operations/{id}`).
    Operations,
    /// Enrollment groups (`/enrollmentGroups/{id}`).
    EnrollmentGroups,
    /// Saved device filters (`/deviceGroups/{id}`).
    DeviceGroups,
}

impl RecordTree {
    /// The sled tree name.
    pub fn name(self) -> &'static str {
        match self {
            RecordTree::Operations => "operations",
            RecordTree::EnrollmentGroups => "enrollment_groups",
            RecordTree::DeviceGroups => "device_groups",
        }
    }
}

const DEVICES: &str = "devices";
const SECRETS: &str = "secrets";
const TOKENS: &str = "tokens";
const OUTBOX: &str = "outbox";
const META: &str = "meta";

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

/// Handle to the open store; cheap to clone, shareable between threads and tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    // Declared first so that it drops (joining the flusher thread) before the trees and `db`.
    commit: GroupCommit,
    db: sled::Db,
    devices: sled::Tree,
    secrets: sled::Tree,
    tokens: sled::Tree,
    operations: sled::Tree,
    enrollment_groups: sled::Tree,
    device_groups: sled::Tree,
    outbox: sled::Tree,
    meta: sled::Tree,
    /// Serialises read-modify-write of device records (etag bumps, CAS, batches): the update
    /// closures are `FnOnce`, so a lost optimistic race could not be retried.
    device_writes: Mutex<()>,
    outbox_len: AtomicU64,
    outbox_bytes: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed, mode 0700) the store in `dir`. Refuses a database whose schema
    /// version is newer than [`SCHEMA_VERSION`].
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        prepare_dir(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(opts.cache_capacity)
            .flush_every_ms(opts.flush_interval_ms)
            .open()
            .map_err(|source| StoreError::Open {
                dir: dir.to_owned(),
                source,
            })?;
        let tree = |name: &'static str| {
            db.open_tree(name).map_err(|source| StoreError::Sled {
                tree: name,
                op: "open_tree",
                source,
            })
        };
        let meta = tree(META)?;
        check_schema(dir, &meta)?;
        let outbox = tree(OUTBOX)?;
        let (mut len, mut bytes) = (0u64, 0u64);
        for entry in outbox.iter() {
            let (_, v) = entry.map_err(|source| StoreError::Sled {
                tree: OUTBOX,
                op: "scan",
                source,
            })?;
            len += 1;
            bytes += v.len() as u64;
        }
        let commit =
            GroupCommit::start(db.clone()).map_err(|source| StoreError::FlusherThread {
                dir: dir.to_owned(),
                source,
            })?;
        let inner = Inner {
            dir: dir.to_owned(),
            commit,
            devices: tree(DEVICES)?,
            secrets: tree(SECRETS)?,
            tokens: tree(TOKENS)?,
            operations: tree(RecordTree::Operations.name())?,
            enrollment_groups: tree(RecordTree::EnrollmentGroups.name())?,
            device_groups: tree(RecordTree::DeviceGroups.name())?,
            outbox,
            meta,
            db,
            device_writes: Mutex::new(()),
            outbox_len: AtomicU64::new(len),
            outbox_bytes: AtomicU64::new(bytes),
        };
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Resolves after a flush that began after this call has finished (group commit): every
    /// write made before the call is then on disk.
    pub async fn durable(&self) -> Result<(), StoreError> {
        self.inner
            .commit
            .durable()
            .await
            .map_err(|message| StoreError::Flush {
                dir: self.inner.dir.clone(),
                message,
            })
    }

    /// Blocking [`Store::durable`] for non-async contexts (shutdown, CLI tools). Do not call it
    /// on an async runtime thread.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.inner
            .commit
            .durable_blocking()
            .map_err(|message| StoreError::Flush {
                dir: self.inner.dir.clone(),
                message,
            })
    }

    /// Flushes (fsyncs) done by the group-commit thread since open, for metrics.
    pub fn flush_count(&self) -> u64 {
        self.inner.commit.flushes()
    }

    // ---- devices ----

    /// The device's record, if any.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        let raw = get(&self.inner.devices, DEVICES, id.as_str())?;
        raw.map(|v| decode_device(id.as_str(), &v)).transpose()
    }

    /// All device records in id order.
    pub fn devices(&self) -> impl Iterator<Item = Result<DeviceRecord, StoreError>> {
        self.inner.devices.iter().map(|entry| {
            let (k, v) = entry.map_err(|source| StoreError::Sled {
                tree: DEVICES,
                op: "scan",
                source,
            })?;
            decode_device(&String::from_utf8_lossy(&k), &v)
        })
    }

    /// Number of device records.
    pub fn device_count(&self) -> usize {
        self.inner.devices.len()
    }

    /// Writes `rec` (under `rec.id`), its etag becoming the stored etag + 1; durable on return.
    pub async fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.put_device_now(rec)?;
        self.durable().await
    }

    fn put_device_now(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        let key = rec.id.as_str();
        let _guard = self.device_lock();
        // Only the stored etag matters here: skip decoding the whole previous record.
        let found = get(&self.inner.devices, DEVICES, key)?
            .map(|v| stored_etag(key, &v))
            .transpose()?;
        let mut next = rec.clone();
        next.etag = found.unwrap_or(0) + 1;
        insert(
            &self.inner.devices,
            DEVICES,
            key,
            encode(DEVICES, key, &next)?,
        )
    }

    /// Compare-and-swap update: when `expected_etag` is given the stored etag must equal it
    /// (else [`StoreError::Conflict`]). `f` gets the current record and returns the new one
    /// (stored under `id`, etag bumped) or `None` to leave it unchanged. Returns the record as
    /// stored; [`StoreError::DeviceNotFound`] when `f` returns `None` and there is no record.
    pub async fn update_device(
        &self,
        id: &DeviceId,
        expected_etag: Option<u64>,
        f: impl FnOnce(Option<DeviceRecord>) -> Option<DeviceRecord>,
    ) -> Result<DeviceRecord, StoreError> {
        let (rec, changed) = self.update_device_now(id, expected_etag, f)?;
        if changed {
            self.durable().await?;
        }
        Ok(rec)
    }

    fn update_device_now(
        &self,
        id: &DeviceId,
        expected_etag: Option<u64>,
        f: impl FnOnce(Option<DeviceRecord>) -> Option<DeviceRecord>,
    ) -> Result<(DeviceRecord, bool), StoreError> {
        let _guard = self.device_lock();
        let current = self.device(id)?;
        let found = current.as_ref().map(|r| r.etag);
        if let Some(expected) = expected_etag {
            if found != Some(expected) {
                return Err(StoreError::Conflict {
                    id: id.clone(),
                    expected,
                    found,
                });
            }
        }
        match f(current.clone()) {
            None => current
                .map(|r| (r, false))
                .ok_or_else(|| StoreError::DeviceNotFound { id: id.clone() }),
            Some(mut next) => {
                next.id = id.clone();
                next.etag = found.unwrap_or(0) + 1;
                let bytes = encode(DEVICES, id.as_str(), &next)?;
                self.inner
                    .devices
                    .insert(id.as_str(), bytes)
                    .map_err(|source| StoreError::Sled {
                        tree: DEVICES,
                        op: "insert",
                        source,
                    })?;
                Ok((next, true))
            }
        }
    }

    /// Deletes a device with its secret and ownership token (one transaction); true if a
    /// record existed.
    pub async fn remove_device(&self, id: &DeviceId) -> Result<bool, StoreError> {
        let existed = self.device(id)?.is_some();
        let mut batch = Batch::new();
        batch.remove_device(id).remove_secret(id).remove_token(id);
        self.apply(batch).await?;
        Ok(existed)
    }

    fn device_lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic while holding it cannot leave anything inconsistent.
        self.inner
            .device_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    // ---- secrets ----

    /// Stores a device's secret (opaque, sealed by the caller when configured); durable on return.
    pub async fn put_secret(&self, id: &DeviceId, sealed: &[u8]) -> Result<(), StoreError> {
        insert(&self.inner.secrets, SECRETS, id.as_str(), sealed.to_vec())?;
        self.durable().await
    }

    /// A device's secret bytes, if stored.
    pub fn secret(&self, id: &DeviceId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(get(&self.inner.secrets, SECRETS, id.as_str())?.map(|v| v.to_vec()))
    }

    /// Deletes a device's secret; true if one existed. Durable on return.
    pub async fn remove_secret(&self, id: &DeviceId) -> Result<bool, StoreError> {
        let existed = remove(&self.inner.secrets, SECRETS, id.as_str())?;
        self.durable().await?;
        Ok(existed)
    }

    // ---- ownership tokens ----

    /// Stores an ownership token (key = `rec.device`); durable on return.
    pub async fn put_token(&self, rec: &OwnershipTokenRecord) -> Result<(), StoreError> {
        let key = rec.device.as_str();
        insert(&self.inner.tokens, TOKENS, key, encode(TOKENS, key, rec)?)?;
        self.durable().await
    }

    /// A device's ownership token, if stored.
    pub fn token(&self, id: &DeviceId) -> Result<Option<OwnershipTokenRecord>, StoreError> {
        get(&self.inner.tokens, TOKENS, id.as_str())?
            .map(|v| decode_token(id.as_str(), &v))
            .transpose()
    }

    /// All stored ownership tokens in device id order.
    pub fn tokens(&self) -> impl Iterator<Item = Result<OwnershipTokenRecord, StoreError>> {
        self.inner.tokens.iter().map(|entry| {
            let (k, v) = entry.map_err(|source| StoreError::Sled {
                tree: TOKENS,
                op: "scan",
                source,
            })?;
            decode_token(&String::from_utf8_lossy(&k), &v)
        })
    }

    /// Deletes a device's ownership token; true if one existed. Durable on return.
    pub async fn remove_token(&self, id: &DeviceId) -> Result<bool, StoreError> {
        let existed = remove(&self.inner.tokens, TOKENS, id.as_str())?;
        self.durable().await?;
        Ok(existed)
    }

    // ---- operations, enrollment groups, device groups ----

    fn record_tree(&self, tree: RecordTree) -> &sled::Tree {
        match tree {
            RecordTree::Operations => &self.inner.operations,
            RecordTree::EnrollmentGroups => &self.inner.enrollment_groups,
            RecordTree::DeviceGroups => &self.inner.device_groups,
        }
    }

    /// Stores a record under `key`; durable on return.
    pub async fn put_record<T: Serialize>(
        &self,
        tree: RecordTree,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = encode(tree.name(), key, value)?;
        insert(self.record_tree(tree), tree.name(), key, bytes)?;
        self.durable().await
    }

    /// The record under `key`, if any.
    pub fn record<T: DeserializeOwned>(
        &self,
        tree: RecordTree,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        get(self.record_tree(tree), tree.name(), key)?
            .map(|v| decode(tree.name(), key, &v))
            .transpose()
    }

    /// All records of `tree` as (key, record), in key order.
    pub fn records<T: DeserializeOwned>(
        &self,
        tree: RecordTree,
    ) -> impl Iterator<Item = Result<(String, T), StoreError>> {
        let name = tree.name();
        self.record_tree(tree).iter().map(move |entry| {
            let (k, v) = entry.map_err(|source| StoreError::Sled {
                tree: name,
                op: "scan",
                source,
            })?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let value = decode(name, &key, &v)?;
            Ok((key, value))
        })
    }

    /// Deletes the record under `key`; true if one existed. Durable on return.
    pub async fn remove_record(&self, tree: RecordTree, key: &str) -> Result<bool, StoreError> {
        let existed = remove(self.record_tree(tree), tree.name(), key)?;
        self.durable().await?;
        Ok(existed)
    }

    // ---- meta ----

    /// A `meta` value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(get(&self.inner.meta, META, key)?.map(|v| v.to_vec()))
    }

    /// Stores a `meta` value (the schema key is reserved); durable on return.
    pub async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        check_meta_key(key)?;
        insert(&self.inner.meta, META, key, value.to_vec())?;
        self.durable().await
    }

    /// The schema version stored in `meta`.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        read_schema(&self.inner.dir, &self.inner.meta)?.ok_or_else(|| {
            StoreError::BadSchemaVersion {
                dir: self.inner.dir.clone(),
                len: 0,
            }
        })
    }

    // ---- batches ----

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

    // ---- outbox ----

    /// Appends messages in order and returns their sequence numbers (increasing); durable on
    /// return.
    pub async fn outbox_append(&self, msgs: &[OutboxMessage]) -> Result<Vec<u64>, StoreError> {
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = sled::Batch::default();
        let mut seqs = Vec::with_capacity(msgs.len());
        let mut bytes = 0u64;
        for m in msgs {
            let seq = self
                .inner
                .db
                .generate_id()
                .map_err(|source| StoreError::Sled {
                    tree: OUTBOX,
                    op: "generate_id",
                    source,
                })?;
            let value = m.encode();
            bytes += value.len() as u64;
            batch.insert(&seq.to_be_bytes(), value);
            seqs.push(seq);
        }
        // Count first, so a concurrent remove of these entries can never drive the counters
        // below the true size.
        self.inner
            .outbox_len
            .fetch_add(msgs.len() as u64, Ordering::Relaxed);
        self.inner.outbox_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Err(source) = self.inner.outbox.apply_batch(batch) {
            self.inner
                .outbox_len
                .fetch_sub(msgs.len() as u64, Ordering::Relaxed);
            self.inner.outbox_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return Err(StoreError::Sled {
                tree: OUTBOX,
                op: "apply_batch",
                source,
            });
        }
        self.durable().await?;
        Ok(seqs)
    }

    /// Up to `limit` messages with sequence >= `from_seq`, in sequence order.
    pub fn outbox_scan(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxMessage)>, StoreError> {
        let mut out = Vec::new();
        for entry in self
            .inner
            .outbox
            .range(from_seq.to_be_bytes()..)
            .take(limit)
        {
            let (k, v) = entry.map_err(|source| StoreError::Sled {
                tree: OUTBOX,
                op: "scan",
                source,
            })?;
            let seq = <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::BadKey {
                    tree: OUTBOX,
                    key: String::from_utf8_lossy(&k).into_owned(),
                    reason: format!("sequence keys are 8 bytes, this one has {}", k.len()),
                })?;
            let msg = OutboxMessage::decode(&v)
                .map_err(|source| StoreError::OutboxDecode { seq, source })?;
            out.push((seq, msg));
        }
        Ok(out)
    }

    /// Removes the given sequence numbers (absent ones are ignored); returns how many were
    /// removed. Durable on return.
    pub async fn outbox_remove(&self, seqs: &[u64]) -> Result<usize, StoreError> {
        let mut removed = 0usize;
        for seq in seqs {
            let old = self
                .inner
                .outbox
                .remove(seq.to_be_bytes())
                .map_err(|source| StoreError::Sled {
                    tree: OUTBOX,
                    op: "remove",
                    source,
                })?;
            if let Some(old) = old {
                removed += 1;
                self.inner.outbox_len.fetch_sub(1, Ordering::Relaxed);
                self.inner
                    .outbox_bytes
                    .fetch_sub(old.len() as u64, Ordering::Relaxed);
            }
        }
        if removed > 0 {
            self.durable().await?;
        }
        Ok(removed)
    }

    /// Messages in the outbox.
    pub fn outbox_len(&self) -> u64 {
        self.inner.outbox_len.load(Ordering::Relaxed)
    }

    /// Stored bytes of the outbox messages (encoded values), for `telemetry.max_bytes`.
    pub fn outbox_bytes(&self) -> u64 {
        self.inner.outbox_bytes.load(Ordering::Relaxed)
    }
}

/// Measures durable device writes per second with `writers` concurrent tasks writing `total`
/// records in all to a store in `dir` (for `fleetgw bench` and the group-commit figure). Must
/// run inside a tokio runtime.
pub async fn bench_group_commit(
    dir: &Path,
    writers: usize,
    total: usize,
) -> Result<f64, StoreError> {
    let store = Store::open(dir, &StoreOptions::default())?;
    let writers = writers.max(1);
    let per_writer = total.div_ceil(writers);
    let flushes_before = store.flush_count();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..per_writer {
                let id =
                    DeviceId::parse(&format!("bench-{w}-{i}")).map_err(|e| StoreError::BadKey {
                        tree: DEVICES,
                        key: format!("bench-{w}-{i}"),
                        reason: e.to_string(),
                    })?;
                store.put_device(&DeviceRecord::new(id, "json", 0)).await?;
            }
            Ok::<_, StoreError>(())
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => result?,
            Err(e) => {
                return Err(StoreError::Flush {
                    dir: dir.to_owned(),
                    message: format!("benchmark writer task failed: {e}"),
                })
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let written = (per_writer * writers) as f64;
    tracing::info!(
        writers,
        written,
        flushes = store.flush_count() - flushes_before,
        elapsed_s = elapsed,
        "group commit benchmark"
    );
    Ok(written / elapsed.max(f64::EPSILON))
}

fn prepare_dir(dir: &Path) -> Result<(), StoreError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StoreError::CreateDir {
                dir: dir.to_owned(),
                source,
            })?;
    }
    let meta = fs::metadata(dir).map_err(|source| StoreError::DirMetadata {
        dir: dir.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode != 0o700 {
        // Secrets live here: group/other access is never intended. Tightening is best effort
        // (we may not own a directory an operator prepared), so failure is only a warning.
        match fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
            Ok(()) => {
                tracing::warn!(dir = %dir.display(), from = format!("{mode:o}"), "state directory mode tightened to 0700")
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), error = %e, "state directory is not 0700 and could not be changed; secrets may be readable by others")
            }
        }
    }
    Ok(())
}

fn read_schema(dir: &Path, meta: &sled::Tree) -> Result<Option<u32>, StoreError> {
    let raw = get(meta, META, SCHEMA_VERSION_KEY)?;
    raw.map(|v| {
        <[u8; 4]>::try_from(v.as_ref())
            .map(u32::from_be_bytes)
            .map_err(|_| StoreError::BadSchemaVersion {
                dir: dir.to_owned(),
                len: v.len(),
            })
    })
    .transpose()
}

fn check_schema(dir: &Path, meta: &sled::Tree) -> Result<(), StoreError> {
    match read_schema(dir, meta)? {
        Some(found) if found > SCHEMA_VERSION => Err(StoreError::NewerSchema {
            dir: dir.to_owned(),
            found,
            supported: SCHEMA_VERSION,
        }),
        // Older versions would be migrated here; version 1 is the first.
        Some(_) => Ok(()),
        None => {
            insert(
                meta,
                META,
                SCHEMA_VERSION_KEY,
                SCHEMA_VERSION.to_be_bytes().to_vec(),
            )?;
            meta.flush().map_err(|e| StoreError::Flush {
                dir: dir.to_owned(),
                message: e.to_string(),
            })?;
            Ok(())
        }
    }
}

fn check_meta_key(key: &str) -> Result<(), StoreError> {
    if key == SCHEMA_VERSION_KEY {
        return Err(StoreError::ReservedMetaKey {
            key: key.to_owned(),
        });
    }
    Ok(())
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

fn get(tree: &sled::Tree, name: &'static str, key: &str) -> Result<Option<sled::IVec>, StoreError> {
    tree.get(key).map_err(|source| StoreError::Sled {
        tree: name,
        op: "get",
        source,
    })
}

fn insert(
    tree: &sled::Tree,
    name: &'static str,
    key: &str,
    value: Vec<u8>,
) -> Result<(), StoreError> {
    tree.insert(key, value).map_err(|source| StoreError::Sled {
        tree: name,
        op: "insert",
        source,
    })?;
    Ok(())
}

fn remove(tree: &sled::Tree, name: &'static str, key: &str) -> Result<bool, StoreError> {
    tree.remove(key)
        .map(|old| old.is_some())
        .map_err(|source| StoreError::Sled {
            tree: name,
            op: "remove",
            source,
        })
}

fn encode<T: Serialize>(tree: &'static str, key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        tree,
        key: key.to_owned(),
        source,
    })
}

fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        tree,
        key: key.to_owned(),
        source,
    })
}

/// Decodes a record whose version (`version_of`) must not exceed what this build writes. The
/// version is only probed separately when decoding fails, so the common path decodes once.
fn decode_versioned<T: DeserializeOwned>(
    tree: &'static str,
    key: &str,
    bytes: &[u8],
    supported: u32,
    version_of: fn(&T) -> u32,
) -> Result<T, StoreError> {
    #[derive(serde::Deserialize)]
    struct Version {
        #[serde(default)]
        v: u32,
    }
    let newer = |found: u32| StoreError::NewerRecord {
        tree,
        key: key.to_owned(),
        found,
        supported,
    };
    match decode::<T>(tree, key, bytes) {
        Ok(rec) if version_of(&rec) > supported => Err(newer(version_of(&rec))),
        Ok(rec) => Ok(rec),
        Err(e) => match serde_json::from_slice::<Version>(bytes) {
            Ok(probe) if probe.v > supported => Err(newer(probe.v)),
            _ => Err(e),
        },
    }
}

fn decode_device(key: &str, bytes: &[u8]) -> Result<DeviceRecord, StoreError> {
    decode_versioned(DEVICES, key, bytes, DEVICE_RECORD_VERSION, |r| r.v)
}

/// The etag of a stored device record, decoding only the record's head (version and etag).
fn stored_etag(key: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    #[derive(serde::Deserialize)]
    struct Head {
        v: u32,
        etag: u64,
    }
    let head: Head = decode(DEVICES, key, bytes)?;
    if head.v > DEVICE_RECORD_VERSION {
        return Err(StoreError::NewerRecord {
            tree: DEVICES,
            key: key.to_owned(),
            found: head.v,
            supported: DEVICE_RECORD_VERSION,
        });
    }
    Ok(head.etag)
}

fn decode_token(key: &str, bytes: &[u8]) -> Result<OwnershipTokenRecord, StoreError> {
    decode_versioned(TOKENS, key, bytes, TOKEN_RECORD_VERSION, |r| r.v)
}

#[cfg(test)]
mod tests;
