//! Durability and health of the store: write tickets and waiting for them, the flush
//! counters, the fatal flush failure (fsyncgate) and the disk-full state, plus the access to
//! the open database that every operation goes through (`Inner::engine`, swapped by a reopen,
//! see `reopen.rs`) and the gate every write passes (refused while the store is full).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLockReadGuard};

use super::engine::Engine;
use super::flusher::FlushError;
use super::{space, Store, StoreError, StoreHealth, WriteTicket};

impl Store {
    /// The open database; an error while a reopen is under way (`reopen.rs`).
    pub(super) fn engine(&self) -> Result<Arc<Engine>, StoreError> {
        self.inner
            .engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Full {
                dir: self.inner.dir.clone(),
                message: "the store is being reopened".into(),
            })
    }

    /// Admits a write: refused at once with [`StoreError::Full`] while the store is full. The
    /// guard must be held for the write's synchronous part (never across an await).
    pub(super) fn write_gate(&self) -> Result<(RwLockReadGuard<'_, ()>, Arc<Engine>), StoreError> {
        let gate = self
            .inner
            .write_gate
            .read()
            .unwrap_or_else(|p| p.into_inner());
        self.inner.health.refuse()?;
        Ok((gate, self.engine()?))
    }

    /// Passes on a write's error, noting "no space" from sled (its error is sticky): a flush
    /// is started so that the flusher tells it from a failed fsync and the store goes full.
    pub(super) fn noted(&self, e: StoreError) -> StoreError {
        let no_space = match &e {
            StoreError::Sled { source, .. } => space::sled_no_space(source),
            StoreError::Transaction { message } => {
                message.contains("os error 28")
                    || message.contains("os error 27")
                    || message.contains("os error 122")
            }
            _ => false,
        };
        if no_space {
            if let Ok(eng) = self.engine() {
                let _ = eng.commit.ticket();
            }
            return StoreError::Full {
                dir: self.inner.dir.clone(),
                message: e.to_string(),
            };
        }
        e
    }

    pub(super) fn flush_error(&self, e: FlushError) -> StoreError {
        let dir = self.inner.dir.clone();
        match e {
            FlushError::Full(message) => StoreError::Full { dir, message },
            FlushError::Failed(message) => StoreError::Flush { dir, message },
        }
    }

    /// Resolves after a flush that began after this call has finished (group commit): every
    /// write made before the call is then on disk. [`StoreError::Full`] while the store is
    /// full (the write may be lost when the store reopens: write it again later).
    pub async fn durable(&self) -> Result<(), StoreError> {
        let eng = self.engine()?;
        self.inner.health.refuse()?;
        eng.commit.durable().await.map_err(|e| self.flush_error(e))
    }

    /// A ticket for every write made so far, with their flush started; [`Store::wait_durable`]
    /// resolves once they are on disk. Lets a writer go on while the flush runs.
    pub fn write_ticket(&self) -> WriteTicket {
        match self.engine() {
            Ok(eng) if !self.inner.health.is_full() => WriteTicket {
                generation: eng.generation,
                ticket: eng.commit.ticket(),
            },
            // Full or reopening: nothing is flushed now; `wait_durable` says so.
            _ => WriteTicket {
                generation: 0,
                ticket: 0,
            },
        }
    }

    /// Resolves once the writes `ticket` covers are on disk. After a failed flush the store
    /// reports nothing durable any more ([`Store::fatal_error`]). [`StoreError::Full`] while
    /// the store is full, or when it was reopened since the ticket was taken: outbox entries
    /// survive a reopen (see `space.rs`), so a new ticket taken once the store is writable
    /// again covers them.
    pub async fn wait_durable(&self, ticket: WriteTicket) -> Result<(), StoreError> {
        let eng = self.engine()?;
        if eng.generation != ticket.generation {
            self.inner.health.refuse()?;
            return Err(StoreError::Full {
                dir: self.inner.dir.clone(),
                message: "the store was reopened after a disk-full episode since these writes; take a new ticket".into(),
            });
        }
        if self.inner.health.is_full() {
            return match eng.commit.outcome(ticket.ticket) {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => Err(self.flush_error(e)),
                None => self.inner.health.refuse(),
            };
        }
        eng.commit
            .wait(ticket.ticket)
            .await
            .map_err(|e| self.flush_error(e))
    }

    /// Blocking [`Store::durable`] for non-async contexts (shutdown, CLI tools). Do not call it
    /// on an async runtime thread.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        let eng = self.engine()?;
        self.inner.health.refuse()?;
        eng.commit
            .durable_blocking()
            .map_err(|e| self.flush_error(e))
    }

    /// Flushes (fsyncs) done by the group-commit thread since open, for metrics.
    pub fn flush_count(&self) -> u64 {
        self.inner.flushes_before.load(Relaxed) + self.engine().map_or(0, |e| e.commit.flushes())
    }

    /// Blob files (`blobs/`, sled's out-of-log pages) fsynced since open.
    pub fn blobs_synced(&self) -> u64 {
        self.inner.blobs_before.load(Relaxed) + self.engine().map_or(0, |e| e.commit.blobs_synced())
    }

    /// The flush failure that stopped the store, if one happened: from then on no write is
    /// reported durable (see `flusher`), and the daemon must exit so that recovery replays.
    pub fn fatal_error(&self) -> Option<String> {
        self.inner.health.fatal_error()
    }

    /// Resolves with the message of the flush failure that stopped the store; pending while
    /// the store is healthy.
    pub async fn failed(&self) -> String {
        self.inner.health.failed().await
    }

    /// Whether the store is full, since when, and the episodes and reopens so far (`GET
    /// /health`, `GET /status`, the metrics).
    pub fn health(&self) -> StoreHealth {
        self.inner.health.snapshot()
    }
}
