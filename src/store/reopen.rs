//! The store's recovery from a full disk (see `space.rs` for why): a thread that, once the
//! store is full, probes for space every 1 s backing off to 5 s; once there is room it
//! reopens sled (dropping the writes that never reached the disk and sled's sticky error) and
//! flushes; the first successful flush makes the store writable again. Until then reads are
//! served by the old database: reopening at once would leave nothing to read from when sled's
//! own recovery needs to write (it does, at the end of its log) and cannot.
//!
//! The reopen is the seam: [`Engine`] (the sled database, its trees and its flusher) sits
//! behind `Inner::engine` and is swapped whole, so nothing outside the store holds a sled
//! handle across it. The outbox is carried over as the gateway knew it: its entries are
//! handed to the dispatcher as soon as they are inserted, and the intake acknowledges their
//! devices once a flush (after the reopen, a new one) covers them.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::engine::{Engine, OpenWith};
use super::flusher::FlushError;
use super::space::{self, Health, PROBE_MAX, PROBE_MIN};
use super::{Inner, Store, StoreError, OUTBOX};

/// How long a reopen waits for the old database's last users (a scan under way) to let go
/// of sled's file lock before it gives up until the next probe.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Generations of reopened databases (the first open of a store is 1): unique, so that a
/// write ticket of a replaced database is never taken for one of its successor.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(2);

/// The outbox of a database being replaced, as the gateway knew it: (key, value) in order.
type Carried = Vec<(sled::IVec, sled::IVec)>;

impl Store {
    /// Starts the recovery thread (it holds the store weakly and ends when it is dropped).
    pub(super) fn start_recovery(&self) -> Result<(), StoreError> {
        let weak = Arc::downgrade(&self.inner);
        let health = Arc::clone(&self.inner.health);
        let handle = std::thread::Builder::new()
            .name("fleetgw-store-recover".into())
            .spawn(move || recover(weak, health))
            .map_err(|source| StoreError::FlusherThread {
                dir: self.inner.dir.clone(),
                source,
            })?;
        *self
            .inner
            .recovery
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Outbox deletions while the store is full: made in memory where sled still takes them,
    /// and kept for the reopen either way. Returns how many entries were there.
    pub(super) fn outbox_remove_while_full(&self, seqs: &[u64]) -> usize {
        let removal = self.outbox_indexed(|ix| ix.remove(seqs));
        if let Ok(eng) = self.engine() {
            for key in &removal.emptied {
                let _ = eng.outbox.remove(key.to_be_bytes());
            }
        }
        self.outbox_uncount(removal.messages, removal.bytes);
        self.keep_removals(&removal.emptied);
        removal.messages as usize
    }

    /// Remembers outbox chunk deletions that are not durable yet, for the next reopen.
    pub(super) fn keep_removals(&self, keys: &[u64]) {
        self.inner
            .pending_removals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(keys);
    }

    /// Replaces the database with a fresh one opened from what is on disk, carrying the
    /// outbox over (`carried` keeps it while no reopen has succeeded yet).
    fn reopen(&self, carried: &mut Option<Carried>) -> Result<(), StoreError> {
        let inner = &self.inner;
        let old = {
            let _gate = inner.write_gate.write().unwrap_or_else(|p| p.into_inner());
            let old = inner
                .engine
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let (Some(old), None) = (&old, &carried) {
                let entries =
                    old.outbox
                        .iter()
                        .collect::<Result<Carried, _>>()
                        .map_err(|source| StoreError::Sled {
                            tree: OUTBOX,
                            op: "scan",
                            source,
                        })?;
                *carried = Some(entries);
            }
            old
        };
        if let Some(old) = old {
            inner
                .flushes_before
                .fetch_add(old.commit.flushes(), Relaxed);
            inner
                .blobs_before
                .fetch_add(old.commit.blobs_synced(), Relaxed);
            // Joins its flusher; sled skips its final flush (its error is set).
            drop(old);
        }
        let generation = NEXT_GENERATION.fetch_add(1, Relaxed);
        let started = Instant::now();
        let engine = loop {
            let opened = Engine::open(
                &inner.dir,
                OpenWith {
                    opts: &inner.opts,
                    faults: inner.faults.clone(),
                    health: Arc::clone(&inner.health),
                    device_writes: Arc::clone(&inner.device_writes),
                    generation,
                },
            );
            match opened {
                Ok(engine) => break engine,
                // A scan of the old database may still hold sled's file lock for a moment.
                Err(_) if started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        };
        let _gate = inner.write_gate.write().unwrap_or_else(|p| p.into_inner());
        let removals = std::mem::take(
            &mut *inner
                .pending_removals
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let carry = carried.as_deref().unwrap_or_default();
        if let Err(e) = carry_outbox(&engine.outbox, carry, &removals) {
            // Keep what is not applied yet for the next reopen.
            self.keep_removals(&removals);
            *inner.engine.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(engine));
            return Err(e);
        }
        // The index is the gateway's view and carries over with the outbox; entries that are
        // no chunk under a sequence key are counted again from the new database.
        let (other_len, other_bytes) = engine.outbox_entries(|_, _| {})?;
        let (len, bytes) = self.outbox_indexed(|ix| ix.totals());
        let (len, bytes) = (len + other_len, bytes + other_bytes);
        inner.outbox_len.store(len, Relaxed);
        inner.outbox_bytes.store(bytes, Relaxed);
        *inner.engine.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(engine));
        *carried = None;
        inner.health.reopened();
        tracing::info!(
            dir = %inner.dir.display(),
            outbox_messages = len,
            "store reopened from what is on disk (disk-full recovery); the outbox carried over"
        );
        Ok(())
    }
}

/// Makes the new database's outbox what the gateway knew (`carried`), less the chunks whose
/// keys are `removals`: the entries sled kept on disk but the gateway had deleted go, the ones
/// it had inserted but that never reached the disk come back (same keys, so the dispatcher's
/// deletions match).
fn carry_outbox(
    outbox: &sled::Tree,
    carried: &[(sled::IVec, sled::IVec)],
    removals: &[u64],
) -> Result<(), StoreError> {
    let err = |op: &'static str| {
        move |source| StoreError::Sled {
            tree: OUTBOX,
            op,
            source,
        }
    };
    let keep: std::collections::HashSet<&[u8]> = carried.iter().map(|(k, _)| k.as_ref()).collect();
    for entry in outbox.iter() {
        let (k, _) = entry.map_err(err("scan"))?;
        if !keep.contains(k.as_ref()) {
            outbox.remove(k).map_err(err("remove"))?;
        }
    }
    for (k, v) in carried {
        if outbox.get(k).map_err(err("get"))?.as_ref() != Some(v) {
            outbox.insert(k, v.clone()).map_err(err("insert"))?;
        }
    }
    for key in removals {
        outbox.remove(key.to_be_bytes()).map_err(err("remove"))?;
    }
    Ok(())
}

/// The recovery thread's loop (module docs).
fn recover(weak: Weak<Inner>, health: Arc<Health>) {
    let mut carried: Option<Carried> = None;
    while health.wait_full() {
        let mut wait = PROBE_MIN;
        loop {
            if !health.sleep(wait) {
                return;
            }
            wait = (wait * 2).min(PROBE_MAX);
            // The store's handle is taken only for a step, so that dropping the store is
            // never held up by this thread.
            let Some(inner) = weak.upgrade() else { return };
            let store = Store { inner };
            if let Err(why) = space::probe(store.dir()) {
                tracing::debug!(dir = %store.dir().display(), "store still full: {why}");
                continue;
            }
            if health.reopen_wanted() || store.engine().is_err() {
                if let Err(e) = store.reopen(&mut carried) {
                    tracing::warn!(dir = %store.dir().display(), "store reopen failed, retrying: {e}");
                    continue;
                }
            }
            let Ok(eng) = store.engine() else { continue };
            match eng.commit.durable_blocking() {
                Ok(()) => {
                    health.recovered();
                    break;
                }
                // The flusher reported it: reopen and probe again.
                Err(FlushError::Full(_)) => continue,
                // Fatal (fsyncgate): the daemon exits; nothing more to do here.
                Err(FlushError::Failed(_)) => return,
            }
        }
    }
}
