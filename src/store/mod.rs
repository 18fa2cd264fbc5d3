//! The gateway's durable state: the only module that touches sled.
//!
//! Trees (docs/architecture.md, "Store"): `devices` (id -> [`DeviceRecord`]), `secrets` (id -> opaque, possibly
//! sealed key bytes), `tokens` (id -> [`OwnershipTokenRecord`]), `operations`,
//! `enrollment_groups`, `device_groups` (string key -> a record type owned by the admin layer,
//! see [`RecordTree`]), `broker_retained` and `broker_sessions` (the embedded broker's state,
//! [`broker_state`]), `outbox` (big-endian u64 sequence -> a chunk of [`OutboxMessage`]s, `chunk.rs`) and `meta`
//! (schema version and small settings).
//!
//! Every mutating call returns only once the change is on disk. Durability uses group commit
//! ([`flusher`]): one thread flushes, and every writer waits for a flush that began after its
//! write, so N concurrent writers cost about one fsync. Changes spanning several trees go through
//! a [`Batch`]; the same thread applies every batch waiting at that moment in one sled
//! transaction, then flushes.
//!
//! Keeping sled behind this boundary lets us swap the engine (e.g. redb) without touching the
//! rest of the gateway if the kill -9 tests ever show corruption.

mod batch;
pub mod broker_state;
mod chunk;
mod codec;
mod durability;
mod engine;
mod error;
mod flusher;
mod outbox;
mod quarantine;
mod records;
mod reopen;
mod space;
mod token_seal;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::device_id::DeviceId;
use engine::Engine;
use flusher::FlushFaults;
use space::Health;

pub use batch::Batch;
use codec::{
    decode, decode_device, decode_token, encode, encode_device_with_etag, get, insert, remove,
    stored_etag,
};
pub use error::StoreError;
pub use flusher::BLOB_THRESHOLD;
#[cfg(feature = "test-hooks")]
pub use flusher::{FAIL_FLUSH_FILE_ENV, STALL_FLUSH_FILE_ENV};
pub use records::{
    DeviceRecord, DeviceState, ErrorInfo, OutboxDecodeError, OutboxMessage, OwnershipToken,
    OwnershipTokenRecord, ProvisionData, DEVICE_RECORD_VERSION, OUTBOX_MESSAGE_VERSION,
    TOKEN_RECORD_VERSION,
};
pub use space::{FullSince, StoreHealth};

/// Schema version this build writes and the newest it can open.
pub const SCHEMA_VERSION: u32 = 1;
/// `meta` key holding the schema version (u32 big-endian); reserved.
pub const SCHEMA_VERSION_KEY: &str = "schema_version";

/// Default for [`StoreOptions::min_commit_interval`], in microseconds.
pub const DEFAULT_MIN_COMMIT_INTERVAL_US: u64 = 2000;

/// Writes made before [`Store::write_ticket`] was called, being flushed; see
/// [`Store::wait_durable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "writes are durable only once `Store::wait_durable` resolves"]
pub struct WriteTicket {
    /// The open database ([`engine::Engine::generation`]) the writes went to.
    generation: u64,
    ticket: u64,
}

/// Tuning for [`Store::open`] (config section `[store]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// sled page cache size in bytes (sled's own default is 1 GiB, too much for a gateway).
    pub cache_capacity: u64,
    /// sled's own periodic background flush; `None` = off (group commit flushes anyway).
    pub flush_interval_ms: Option<u64>,
    /// Shortest time between the starts of two group commits under load (config
    /// `store.min_commit_interval_us`): longer batches more writes into one fsync, shorter
    /// answers a lone write sooner. A write after a quiet spell is flushed at once.
    pub min_commit_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cache_capacity: 64 * 1024 * 1024,
            flush_interval_ms: None,
            min_commit_interval: Duration::from_micros(DEFAULT_MIN_COMMIT_INTERVAL_US),
        }
    }
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

/// Handle to the open store; cheap to clone, shareable between threads and tasks.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    opts: StoreOptions,
    faults: FlushFaults,
    /// The open sled database; `None` only while a reopen is under way (`reopen.rs`).
    engine: RwLock<Option<Arc<Engine>>>,
    /// Held shared by every write for its synchronous part, exclusively by a reopen while it
    /// copies the outbox and swaps the database: no write can fall between the two.
    write_gate: RwLock<()>,
    health: Arc<Health>,
    /// Outbox chunks deleted while the store was full (their keys), deleted again at the next
    /// reopen.
    pending_removals: Mutex<Vec<u64>>,
    /// The thread that reopens the store once space is back (`reopen.rs`).
    recovery: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Seals ownership tokens at rest once set ([`Store::seal_tokens_with`]).
    sealer: std::sync::OnceLock<Arc<crate::identity::Sealer>>,
    /// Values moved to `quarantine` since open (metric).
    quarantined: AtomicU64,
    /// Serialises read-modify-write of device records (etag bumps, CAS, batches): the update
    /// closures are `FnOnce`, so a lost optimistic race could not be retried.
    device_writes: Arc<Mutex<()>>,
    /// Which outbox messages still wait for the cloud (`chunk.rs`); the counters below follow it.
    outbox_index: Mutex<chunk::OutboxIndex>,
    outbox_len: AtomicU64,
    outbox_bytes: AtomicU64,
    /// Flushes and synced blobs of the databases a reopen replaced (metrics).
    flushes_before: AtomicU64,
    blobs_before: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.health.close();
        let handle = self
            .recovery
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // The recovery thread itself may drop the last handle; it must not join itself.
        if let Some(h) = handle.filter(|h| h.thread().id() != std::thread::current().id()) {
            if h.join().is_err() {
                tracing::error!("the store recovery thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

/// Takes the lock serialising device-record writes (see `Inner::device_writes`). The guarded
/// data is `()`: a panic while holding it cannot leave anything inconsistent.
fn lock_device_writes(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens (creating if needed, mode 0700) the store in `dir`. Refuses a database whose schema
    /// version is newer than [`SCHEMA_VERSION`].
    pub fn open(dir: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        Self::open_with(dir, opts, FlushFaults::from_env())
    }

    /// [`Store::open`] whose flushes fail while `fault_file` exists (the crate's own tests).
    #[cfg(test)]
    pub(crate) fn open_failing_while(
        dir: &Path,
        opts: &StoreOptions,
        fault_file: &Path,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, opts, FlushFaults::while_exists(fault_file))
    }

    /// [`Store::open`] whose flushes wait while `file` exists (the crate's own tests of a
    /// stalled disk).
    #[cfg(test)]
    pub(crate) fn open_stalled_while(
        dir: &Path,
        opts: &StoreOptions,
        file: &Path,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, opts, FlushFaults::stalled_while_exists(file))
    }

    /// [`Store::open`] whose flushes find no space while `file` exists (the crate's own
    /// tests of the disk-full recovery).
    #[cfg(test)]
    pub(crate) fn open_no_space_while(
        dir: &Path,
        opts: &StoreOptions,
        file: &Path,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, opts, FlushFaults::no_space_while_exists(file))
    }

    fn open_with(dir: &Path, opts: &StoreOptions, faults: FlushFaults) -> Result<Self, StoreError> {
        prepare_dir(dir)?;
        let health = Arc::new(Health::new(dir));
        let device_writes = Arc::new(Mutex::new(()));
        let engine = Engine::open(
            dir,
            engine::OpenWith {
                opts,
                faults: faults.clone(),
                health: Arc::clone(&health),
                device_writes: Arc::clone(&device_writes),
                generation: 1,
            },
        )?;
        let (index, (other_len, other_bytes)) = engine.read_outbox()?;
        let (len, bytes) = index.totals();
        let (len, bytes) = (len + other_len, bytes + other_bytes);
        let inner = Inner {
            dir: dir.to_owned(),
            opts: opts.clone(),
            faults,
            engine: RwLock::new(Some(Arc::new(engine))),
            write_gate: RwLock::new(()),
            health,
            pending_removals: Mutex::new(Vec::new()),
            recovery: Mutex::new(None),
            quarantined: AtomicU64::new(0),
            sealer: std::sync::OnceLock::new(),
            device_writes,
            outbox_index: Mutex::new(index),
            outbox_len: AtomicU64::new(len),
            outbox_bytes: AtomicU64::new(bytes),
            flushes_before: AtomicU64::new(0),
            blobs_before: AtomicU64::new(0),
        };
        let store = Store {
            inner: Arc::new(inner),
        };
        store.start_recovery()?;
        Ok(store)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    // ---- devices ----

    /// The device's record, if any.
    /// An undecodable record is moved to quarantine and reads as absent.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        match get(&self.engine()?.devices, DEVICES, id.as_str())? {
            Some(v) => self.device_or_quarantine(id.as_str().as_bytes(), &v),
            None => Ok(None),
        }
    }

    /// All device records in id order; undecodable ones are moved to quarantine and skipped.
    pub fn devices(&self) -> impl Iterator<Item = Result<DeviceRecord, StoreError>> {
        let store = self.clone();
        scan_entries(
            self.engine().map(|e| e.devices.iter()),
            DEVICES,
            move |k, v| store.device_or_quarantine(&k, &v),
        )
        .filter_map(Result::transpose)
    }

    /// Device records in id order, starting after `after` (from the first when `None`): the
    /// admin API's keyset paging reads one page without scanning the devices before it.
    pub fn devices_after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = Result<DeviceRecord, StoreError>> {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let store = self.clone();
        scan_entries(
            self.engine()
                .map(|e| e.devices.range::<Vec<u8>, _>((start, Bound::Unbounded))),
            DEVICES,
            move |k, v| store.device_or_quarantine(&k, &v),
        )
        .filter_map(Result::transpose)
    }

    /// Number of device records.
    pub fn device_count(&self) -> usize {
        self.engine().map_or(0, |e| e.devices.len())
    }

    /// Writes `rec` (under `rec.id`), its etag becoming the stored etag + 1; durable on return.
    pub async fn put_device(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        self.put_device_now(rec).map_err(|e| self.noted(e))?;
        self.durable().await
    }

    fn put_device_now(&self, rec: &DeviceRecord) -> Result<(), StoreError> {
        let key = rec.id.as_str();
        let (_gate, eng) = self.write_gate()?;
        let _guard = self.device_lock();
        // Only the stored etag matters here: skip decoding the whole previous record.
        let found = match get(&eng.devices, DEVICES, key)? {
            Some(v) => match stored_etag(key, &v) {
                Ok(etag) => Some(etag),
                Err(e) if quarantine::is_damage(&e) => {
                    self.quarantine(DEVICES, &eng.devices, key.as_bytes(), &v, &e)?;
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let mut next = rec.clone();
        next.etag = found.unwrap_or(0) + 1;
        self.seal_device(&mut next);
        insert(&eng.devices, DEVICES, key, encode(DEVICES, key, &next)?)
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
        let (rec, changed) = self
            .update_device_now(id, expected_etag, f)
            .map_err(|e| self.noted(e))?;
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
        let (_gate, eng) = self.write_gate()?;
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
                let mut stored = next.clone();
                self.seal_device(&mut stored);
                let bytes = encode(DEVICES, id.as_str(), &stored)?;
                eng.devices
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
        lock_device_writes(&self.inner.device_writes)
    }

    // ---- secrets ----

    /// Stores a device's secret (opaque, sealed by the caller when configured); durable on return.
    pub async fn put_secret(&self, id: &DeviceId, sealed: &[u8]) -> Result<(), StoreError> {
        {
            let (_gate, eng) = self.write_gate()?;
            insert(&eng.secrets, SECRETS, id.as_str(), sealed.to_vec())
        }
        .map_err(|e| self.noted(e))?;
        self.durable().await
    }

    /// A device's secret bytes, if stored.
    pub fn secret(&self, id: &DeviceId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(get(&self.engine()?.secrets, SECRETS, id.as_str())?.map(|v| v.to_vec()))
    }

    /// Deletes a device's secret; true if one existed. Durable on return.
    pub async fn remove_secret(&self, id: &DeviceId) -> Result<bool, StoreError> {
        let existed = {
            let (_gate, eng) = self.write_gate()?;
            remove(&eng.secrets, SECRETS, id.as_str())
        }
        .map_err(|e| self.noted(e))?;
        self.durable().await?;
        Ok(existed)
    }

    // ---- ownership tokens ----

    /// Stores an ownership token (key = `rec.device`); durable on return.
    pub async fn put_token(&self, rec: &OwnershipTokenRecord) -> Result<(), StoreError> {
        let key = rec.device.as_str();
        let mut stored = rec.clone();
        self.seal_token_record(&mut stored);
        let bytes = encode(TOKENS, key, &stored)?;
        {
            let (_gate, eng) = self.write_gate()?;
            insert(&eng.tokens, TOKENS, key, bytes)
        }
        .map_err(|e| self.noted(e))?;
        self.durable().await
    }

    /// A device's ownership token, if stored.
    pub fn token(&self, id: &DeviceId) -> Result<Option<OwnershipTokenRecord>, StoreError> {
        get(&self.engine()?.tokens, TOKENS, id.as_str())?
            .map(|v| self.open_token_record(decode_token(id.as_str(), &v)?))
            .transpose()
    }

    /// All stored ownership tokens in device id order.
    pub fn tokens(&self) -> impl Iterator<Item = Result<OwnershipTokenRecord, StoreError>> {
        let store = self.clone();
        scan_entries(
            self.engine().map(|e| e.tokens.iter()),
            TOKENS,
            move |k, v| store.open_token_record(decode_token(&String::from_utf8_lossy(&k), &v)?),
        )
    }

    /// Deletes a device's ownership token; true if one existed. Durable on return.
    pub async fn remove_token(&self, id: &DeviceId) -> Result<bool, StoreError> {
        let existed = {
            let (_gate, eng) = self.write_gate()?;
            remove(&eng.tokens, TOKENS, id.as_str())
        }
        .map_err(|e| self.noted(e))?;
        self.durable().await?;
        Ok(existed)
    }

    // ---- operations, enrollment groups, device groups ----

    /// Stores a record under `key`; durable on return.
    pub async fn put_record<T: Serialize>(
        &self,
        tree: RecordTree,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = encode(tree.name(), key, value)?;
        {
            let (_gate, eng) = self.write_gate()?;
            insert(eng.record_tree(tree), tree.name(), key, bytes)
        }
        .map_err(|e| self.noted(e))?;
        self.durable().await
    }

    /// The record under `key`, if any.
    pub fn record<T: DeserializeOwned>(
        &self,
        tree: RecordTree,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        get(self.engine()?.record_tree(tree), tree.name(), key)?
            .map(|v| decode(tree.name(), key, &v))
            .transpose()
    }

    /// All records of `tree` as (key, record), in key order.
    pub fn records<T: DeserializeOwned>(
        &self,
        tree: RecordTree,
    ) -> impl Iterator<Item = Result<(String, T), StoreError>> {
        let name = tree.name();
        scan_entries(
            self.engine().map(|e| e.record_tree(tree).iter()),
            name,
            move |k, v| {
                let key = String::from_utf8_lossy(&k).into_owned();
                let value = decode(name, &key, &v)?;
                Ok((key, value))
            },
        )
    }

    /// Deletes the record under `key`; true if one existed. Durable on return.
    pub async fn remove_record(&self, tree: RecordTree, key: &str) -> Result<bool, StoreError> {
        let existed = {
            let (_gate, eng) = self.write_gate()?;
            remove(eng.record_tree(tree), tree.name(), key)
        }
        .map_err(|e| self.noted(e))?;
        self.durable().await?;
        Ok(existed)
    }

    // ---- meta ----

    /// A `meta` value.
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(get(&self.engine()?.meta, META, key)?.map(|v| v.to_vec()))
    }

    /// Stores a `meta` value (the schema key is reserved); durable on return.
    pub async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        check_meta_key(key)?;
        {
            let (_gate, eng) = self.write_gate()?;
            insert(&eng.meta, META, key, value.to_vec())
        }
        .map_err(|e| self.noted(e))?;
        self.durable().await
    }

    /// The schema version stored in `meta`.
    pub fn schema_version(&self) -> Result<u32, StoreError> {
        read_schema(&self.inner.dir, &self.engine()?.meta)?.ok_or_else(|| {
            StoreError::BadSchemaVersion {
                dir: self.inner.dir.clone(),
                len: 0,
            }
        })
    }
}

/// Measures durable device writes per second with `writers` concurrent tasks writing `total`
/// records in all (rounded up to a multiple of `writers`) to a store in `dir`, for the
/// group-commit figure. Must run inside a tokio runtime. A measuring aid, not part of the
/// gateway: built for the crate's tests and with the `test-hooks` feature only.
#[cfg(any(test, feature = "test-hooks"))]
pub async fn bench_group_commit(
    dir: &Path,
    writers: usize,
    total: usize,
) -> Result<f64, StoreError> {
    let store = Store::open(dir, &StoreOptions::default())?;
    let writers = writers.max(1);
    let per_writer = total.div_ceil(writers);
    let flushes_before = store.flush_count();
    let started = std::time::Instant::now();
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
            // Writers are never cancelled, so a join error is a panic: pass it on unchanged.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
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

/// Every entry `scan` (a tree's or a range's iterator) yields, in key order, through `each`; a
/// failed read as the store's error naming `name`; when there is no open database (a reopen
/// under way), that error once instead.
pub(super) fn scan_entries<T>(
    scan: Result<sled::Iter, StoreError>,
    name: &'static str,
    mut each: impl FnMut(sled::IVec, sled::IVec) -> Result<T, StoreError>,
) -> impl Iterator<Item = Result<T, StoreError>> {
    let (iter, failed) = match scan {
        Ok(iter) => (Some(iter), None),
        Err(e) => (None, Some(Err(e))),
    };
    iter.into_iter()
        .flatten()
        .map(move |entry| {
            let (k, v) = entry.map_err(|source| StoreError::Sled {
                tree: name,
                op: "scan",
                source,
            })?;
            each(k, v)
        })
        .chain(failed)
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

#[cfg(test)]
mod corrupt_tests;
#[cfg(test)]
mod integrity_tests;
#[cfg(test)]
mod space_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod token_seal_tests;
