//! One open sled database: its trees and its group-commit thread. The store holds the current
//! one behind an indirection so that a disk-full episode can replace it with a fresh one
//! (`space.rs`: sled's I/O errors are sticky); nothing outside the store sees the swap.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::batch::BatchTrees;
use super::chunk::{self, OutboxIndex};
use super::flusher::{FlushFaults, GroupCommit};
use super::outbox::sequence_key;
use super::space::Health;
use super::{
    broker_state, check_schema, quarantine, RecordTree, StoreError, StoreOptions, DEVICES, META,
    OUTBOX, SECRETS, TOKENS,
};

/// The trees and the commit thread of one open sled database.
pub(super) struct Engine {
    /// Which open this is (1 for the first); write tickets carry it.
    pub(super) generation: u64,
    // Declared first so that it drops (joining the flusher thread) before the trees and `db`.
    pub(super) commit: GroupCommit,
    pub(super) db: sled::Db,
    pub(super) devices: sled::Tree,
    pub(super) secrets: sled::Tree,
    pub(super) tokens: sled::Tree,
    pub(super) operations: sled::Tree,
    pub(super) enrollment_groups: sled::Tree,
    pub(super) device_groups: sled::Tree,
    pub(super) broker_retained: sled::Tree,
    pub(super) broker_sessions: sled::Tree,
    pub(super) outbox: sled::Tree,
    pub(super) meta: sled::Tree,
    pub(super) quarantine: sled::Tree,
}

/// What [`Engine::open`] needs besides the directory.
pub(super) struct OpenWith<'a> {
    pub(super) opts: &'a StoreOptions,
    pub(super) faults: FlushFaults,
    pub(super) health: Arc<Health>,
    pub(super) device_writes: Arc<Mutex<()>>,
    pub(super) generation: u64,
}

impl Engine {
    /// Opens sled in `dir` (already prepared), checks the schema and starts the flusher.
    pub(super) fn open(dir: &Path, with: OpenWith<'_>) -> Result<Engine, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(with.opts.cache_capacity)
            .flush_every_ms(with.opts.flush_interval_ms)
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
        let trees = BatchTrees {
            devices: tree(DEVICES)?,
            secrets: tree(SECRETS)?,
            tokens: tree(TOKENS)?,
            operations: tree(RecordTree::Operations.name())?,
            enrollment_groups: tree(RecordTree::EnrollmentGroups.name())?,
            device_groups: tree(RecordTree::DeviceGroups.name())?,
            meta: meta.clone(),
            device_writes: with.device_writes,
        };
        Ok(Engine {
            generation: with.generation,
            devices: trees.devices.clone(),
            secrets: trees.secrets.clone(),
            tokens: trees.tokens.clone(),
            operations: trees.operations.clone(),
            enrollment_groups: trees.enrollment_groups.clone(),
            device_groups: trees.device_groups.clone(),
            broker_retained: tree(broker_state::BROKER_RETAINED)?,
            broker_sessions: tree(broker_state::BROKER_SESSIONS)?,
            outbox: tree(OUTBOX)?,
            quarantine: tree(quarantine::QUARANTINE)?,
            meta,
            commit: GroupCommit::start(
                db.clone(),
                trees,
                dir.to_owned(),
                with.opts.min_commit_interval,
                with.faults,
                with.health,
            )
            .map_err(|source| StoreError::FlusherThread {
                dir: dir.to_owned(),
                source,
            })?,
            db,
        })
    }

    /// The outbox as found on disk: the index of its chunks (every message waiting), and the
    /// count and bytes of the entries that are not chunks under a sequence key (a key of
    /// the wrong length; each counts as one message until the first scan moves it to
    /// quarantine). A chunk whose header does not read is indexed as one message, so that the
    /// scan finds it and moves it.
    pub(super) fn read_outbox(&self) -> Result<(OutboxIndex, (u64, u64)), StoreError> {
        let mut index = OutboxIndex::default();
        let other = self.outbox_entries(|key, v| match chunk::members(v) {
            Ok(members) => index.add_found(key, members.into_iter().map(|(i, r)| (i, r.len()))),
            Err(_) => index.add_found(key, [(0, v.len())]),
        })?;
        Ok((index, other))
    }

    /// Calls `chunk` with every outbox entry under a sequence key (key, value); returns the
    /// count and bytes of the others (see [`Engine::read_outbox`]).
    pub(super) fn outbox_entries(
        &self,
        mut chunk: impl FnMut(u64, &[u8]),
    ) -> Result<(u64, u64), StoreError> {
        let (mut len, mut bytes) = (0u64, 0u64);
        for entry in self.outbox.iter() {
            let (k, v) = entry.map_err(|source| StoreError::Sled {
                tree: OUTBOX,
                op: "scan",
                source,
            })?;
            match sequence_key(&k) {
                Some(key) => chunk(key, &v),
                None => {
                    len += 1;
                    bytes += v.len() as u64;
                }
            }
        }
        Ok((len, bytes))
    }

    pub(super) fn record_tree(&self, tree: RecordTree) -> &sled::Tree {
        match tree {
            RecordTree::Operations => &self.operations,
            RecordTree::EnrollmentGroups => &self.enrollment_groups,
            RecordTree::DeviceGroups => &self.device_groups,
        }
    }
}
