//! The store's error type: every variant names the state directory, tree, key or device
//! involved and says what went wrong.

use std::path::PathBuf;

use super::OutboxDecodeError;
use crate::device_id::DeviceId;

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
    /// A multi-tree transaction failed in sled itself (every batch of its group commit gets
    /// this error; none of them was applied).
    #[error("store transaction failed: {message}")]
    Transaction {
        /// sled's message.
        message: String,
    },
    /// Flushing to disk failed: the change may not survive a power cut.
    #[error("state directory {dir}: flush to disk failed: {message}")]
    Flush {
        /// The state directory.
        dir: PathBuf,
        /// sled's message.
        message: String,
    },
    /// The disk (or the quota, or the process's file size limit) has no room: the store
    /// refuses writes and acknowledges nothing new until space returns, then reopens by itself
    /// (`space.rs`). Not fatal, unlike [`StoreError::Flush`]: retry later.
    #[error(
        "state directory {dir}: store full, writes are refused until space returns: {message}"
    )]
    Full {
        /// The state directory.
        dir: PathBuf,
        /// The error that began the episode (or why this write is not durable).
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
    /// A sealed ownership token cannot be opened (no sealing key, a different key, or a blob
    /// of another device).
    #[error("store tree {tree}, key {key}: cannot open the sealed ownership token: {reason}")]
    Unseal {
        /// Tree name.
        tree: &'static str,
        /// Key (the device id).
        key: String,
        /// Why.
        reason: String,
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

impl StoreError {
    /// Whether this is [`StoreError::Full`]: the write was refused or not made durable because
    /// the disk is full; it may be retried once the store is writable again.
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full { .. })
    }
}
