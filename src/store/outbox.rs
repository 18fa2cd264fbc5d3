//! The telemetry outbox: chunks of messages (see `chunk.rs`) keyed by a big-endian u64
//! sequence (so sled's key order is arrival order), with the index of the messages still
//! waiting, their count and their encoded bytes kept in memory for the `telemetry.max_bytes`
//! policy (rebuilt from disk when the store opens).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::chunk::{self, OutboxIndex};
use super::quarantine::is_damage;
use super::{OutboxMessage, Store, StoreError, WriteTicket, OUTBOX};

/// How long the deletion of a chunk may wait for a flush another writer asks for before it
/// starts one. Under load the intake's appends flush continuously and deletions ride on them;
/// idle, a deletion is durable after at most this long. An upstream link's window slots are
/// freed only then when their removal empties a chunk, so this bounds a busy link's rate (one
/// link with a window of 100 and 5 ms here delivered 10k msg/s, with 1 ms 18k msg/s).
const REMOVE_FLUSH_WITHIN: Duration = Duration::from_millis(1);

impl Store {
    /// Appends messages in order and returns their sequence numbers (increasing); durable on
    /// return.
    pub async fn outbox_append(&self, msgs: &[OutboxMessage]) -> Result<Vec<u64>, StoreError> {
        let (seqs, ticket) = self.outbox_insert(msgs)?;
        self.wait_durable(ticket).await?;
        Ok(seqs)
    }

    /// Appends messages in order and returns their sequence numbers (increasing) at once,
    /// with the ticket of their flush: they are visible to scans and removals now and durable
    /// once [`Store::wait_durable`] resolves. A crash before that loses them, so whoever
    /// sent them must not be acknowledged until then.
    ///
    /// The messages are stored in chunks (see `chunk.rs`): one sled insert for up to
    /// [`chunk::CHUNK_MAX`] of them.
    pub fn outbox_insert(
        &self,
        msgs: &[OutboxMessage],
    ) -> Result<(Vec<u64>, WriteTicket), StoreError> {
        if msgs.is_empty() {
            return Ok((Vec::new(), self.write_ticket()));
        }
        let gated = self.write_gate();
        let (_gate, eng) = gated?;
        let mut seqs = Vec::with_capacity(msgs.len());
        let mut written = Vec::new();
        let mut start = 0;
        // Plain inserts, not one `apply_batch`: a batch seals sled's log buffer, which wakes
        // all of sled's I/O threads, once per call. Nobody needs the chunks to be written
        // atomically: their devices are acknowledged only once all of them are durable, so a
        // crash that keeps a prefix costs duplicates, never a loss.
        let lens: Vec<usize> = msgs.iter().map(OutboxMessage::encoded_len).collect();
        for end in chunk::split(&lens) {
            let key = eng
                .db
                .generate_id()
                .map_err(|source| StoreError::Sled {
                    tree: OUTBOX,
                    op: "generate_id",
                    source,
                })
                .and_then(|id| {
                    chunk::chunk_key(id).ok_or_else(|| StoreError::BadKey {
                        tree: OUTBOX,
                        key: id.to_string(),
                        reason: "sled's ids have run out of room for chunk indexes".into(),
                    })
                });
            let key = match key {
                Ok(key) => key,
                Err(e) => {
                    let _ = self.outbox_take_back(&eng.outbox, &written);
                    return Err(self.noted(e));
                }
            };
            let lens = &lens[start..end];
            let value = chunk::encode(&msgs[start..end], lens);
            // Indexed and counted first, so a concurrent removal finds the messages and can
            // never drive the counters below the true size.
            self.outbox_indexed(|ix| ix.add(key, lens));
            let bytes = lens.iter().sum::<usize>() as u64;
            self.inner
                .outbox_len
                .fetch_add(lens.len() as u64, Ordering::Relaxed);
            self.inner.outbox_bytes.fetch_add(bytes, Ordering::Relaxed);
            if let Err(source) = eng.outbox.insert(key.to_be_bytes(), value) {
                written.push(key);
                // The caller retries the whole batch; take back what went in (if sled lets
                // us: what stays is sent twice, never lost).
                let _ = self.outbox_take_back(&eng.outbox, &written);
                return Err(self.noted(StoreError::Sled {
                    tree: OUTBOX,
                    op: "insert",
                    source,
                }));
            }
            written.push(key);
            seqs.extend((0..(end - start) as u64).map(|i| key + i));
            start = end;
        }
        Ok((seqs, self.write_ticket()))
    }

    /// Removes the chunks of a failed insert again (no flush of its own), adjusting the
    /// counters.
    fn outbox_take_back(&self, outbox: &sled::Tree, keys: &[u64]) -> Result<(), sled::Error> {
        for key in keys {
            if let Some((n, bytes)) = self.outbox_indexed(|ix| ix.forget(*key)) {
                self.outbox_uncount(n, bytes);
            }
            outbox.remove(key.to_be_bytes())?;
        }
        Ok(())
    }

    /// Takes messages and bytes off the outbox's counters, never below zero: an entry that
    /// was never counted (written into the tree behind the store's back) must not wrap them
    /// around and stop the intake for good.
    pub(super) fn outbox_uncount(&self, messages: u64, bytes: u64) {
        let sub = |v: u64| Some(v.saturating_sub(messages));
        let _ = self
            .inner
            .outbox_len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, sub);
        let sub = |v: u64| Some(v.saturating_sub(bytes));
        let _ = self
            .inner
            .outbox_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, sub);
    }

    /// Runs `f` on the outbox index (a short critical section, no I/O unless `f` does it).
    pub(super) fn outbox_indexed<T>(&self, f: impl FnOnce(&mut OutboxIndex) -> T) -> T {
        f(&mut self
            .inner
            .outbox_index
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
    }

    /// Up to `limit` messages with sequence >= `from_seq`, in sequence order. An entry that
    /// does not decode is moved to quarantine and skipped (it would stop every device's
    /// telemetry behind it otherwise); the page is still filled up to `limit`.
    pub fn outbox_scan(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, OutboxMessage)>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let eng = self.engine()?;
        let start = self
            .outbox_indexed(|ix| ix.chunk_of(from_seq))
            .unwrap_or(from_seq);
        for entry in eng.outbox.range(start.to_be_bytes()..) {
            let (k, v) = entry.map_err(|source| StoreError::Sled {
                tree: OUTBOX,
                op: "scan",
                source,
            })?;
            // A key of the wrong length fails to decode below and goes to quarantine.
            let key = sequence_key(&k);
            let waiting = match key {
                Some(key) => match self.outbox_indexed(|ix| ix.waiting_indexes(key)) {
                    Some(waiting) => waiting,
                    // Emptied, its deletion from sled still to come (or failed: then it is
                    // read again after a restart, a duplicate at worst).
                    None => continue,
                },
                None => Vec::new(),
            };
            let found = decode_entry(&k, &v, |key, index| {
                key + u64::from(index) >= from_seq && waiting.binary_search(&index).is_ok()
            });
            match found {
                Ok(found) => {
                    for m in found {
                        out.push(m);
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
                Err(e) if is_damage(&e) => {
                    if self.quarantine(OUTBOX, &eng.outbox, &k, &v, &e)?.is_some() {
                        // A chunk the index knows counts what it says; any other entry (a
                        // key of the wrong length) was counted as one message when opened.
                        let (n, bytes) = key
                            .and_then(|key| self.outbox_indexed(|ix| ix.forget(key)))
                            .unwrap_or((1, v.len() as u64));
                        self.outbox_uncount(n, bytes);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Removes the given sequence numbers (absent ones are ignored); returns how many were
    /// removed.
    ///
    /// A chunk is deleted from sled once none of its messages is left; that deletion is
    /// durable on return (the flush is shared with the next append's, or started after at
    /// most [`REMOVE_FLUSH_WITHIN`]). Messages of a chunk that still holds others are marked
    /// sent in memory only: a crash sends them once more (see `chunk.rs`). The counters drop
    /// only once the flush is done, so `outbox_len() == 0` means the outbox is durably empty.
    ///
    /// While the store is full (see `space.rs`) the deletions are kept in memory, applied at
    /// the reopen, and durable with the first flush after it; a crash before that sends the
    /// messages once more, a duplicate, never a loss.
    pub async fn outbox_remove(&self, seqs: &[u64]) -> Result<usize, StoreError> {
        if self.inner.health.is_full() {
            return Ok(self.outbox_remove_while_full(seqs));
        }
        let eng = self.engine()?;
        let removal = self.outbox_indexed(|ix| ix.remove(seqs));
        let mut failed = None;
        for key in &removal.emptied {
            if let Err(source) = eng.outbox.remove(key.to_be_bytes()) {
                failed = Some(StoreError::Sled {
                    tree: OUTBOX,
                    op: "remove",
                    source,
                });
                break;
            }
        }
        let compacted = match failed {
            None => self.outbox_compact(&eng.outbox),
            Some(_) => false,
        };
        let flushed = if !removal.emptied.is_empty() || compacted {
            eng.commit
                .durable_within(REMOVE_FLUSH_WITHIN)
                .await
                .map_err(|e| self.flush_error(e))
        } else {
            Ok(())
        };
        // Gone from the index either way; a failed flush leaves them on disk at worst, to be
        // sent once more after a restart.
        self.outbox_uncount(removal.messages, removal.bytes);
        if let Some(e) = failed {
            let e = self.noted(e);
            if e.is_full() {
                self.keep_removals(&removal.emptied);
            }
            return Err(e);
        }
        flushed
            .map(|()| removal.messages as usize)
            .inspect_err(|e| {
                if e.is_full() {
                    self.keep_removals(&removal.emptied);
                }
            })
    }

    /// Writes the chunks due for it again without their sent messages (see `chunk.rs`);
    /// true if any was. Best effort: a chunk left as it is only means more duplicates after a
    /// crash, so errors are logged, not returned.
    fn outbox_compact(&self, outbox: &sled::Tree) -> bool {
        let due = self.outbox_indexed(OutboxIndex::due_for_compaction);
        let mut any = false;
        for (key, keep) in due {
            // Under the index lock: a concurrent removal that empties the chunk must not find
            // it written back after its deletion.
            let done = self.outbox_indexed(|ix| {
                if !ix.knows(key) {
                    return Ok(false);
                }
                let Some(value) = outbox.get(key.to_be_bytes())? else {
                    return Ok(false);
                };
                let Ok(kept) = chunk::retain(&value, &keep) else {
                    // Damaged: the next scan moves it to quarantine.
                    return Ok(false);
                };
                outbox.insert(key.to_be_bytes(), kept)?;
                ix.compacted(key, &keep);
                Ok::<_, sled::Error>(true)
            });
            match done {
                Ok(done) => any |= done,
                Err(e) => {
                    tracing::warn!(chunk = key, "rewriting a partly sent outbox chunk: {e}");
                    break;
                }
            }
        }
        any
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

/// An outbox key as its sequence number (8 bytes, big-endian); `None` for a key of another
/// length.
pub(super) fn sequence_key(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

/// The messages of one outbox entry (its 8-byte big-endian key and its value, a chunk or a
/// single message of an earlier release) for which `wanted(key, index)` holds, with their
/// sequence numbers.
fn decode_entry(
    k: &[u8],
    v: &[u8],
    mut wanted: impl FnMut(u64, u8) -> bool,
) -> Result<Vec<(u64, OutboxMessage)>, StoreError> {
    let key = sequence_key(k).ok_or_else(|| StoreError::BadKey {
        tree: OUTBOX,
        key: String::from_utf8_lossy(k).into_owned(),
        reason: format!("sequence keys are 8 bytes, this one has {}", k.len()),
    })?;
    let members =
        chunk::members(v).map_err(|source| StoreError::OutboxDecode { seq: key, source })?;
    let mut out = Vec::new();
    for (index, range) in members {
        if !wanted(key, index) {
            continue;
        }
        let seq = key + u64::from(index);
        let msg = OutboxMessage::decode(&v[range])
            .map_err(|source| StoreError::OutboxDecode { seq, source })?;
        out.push((seq, msg));
    }
    Ok(out)
}
