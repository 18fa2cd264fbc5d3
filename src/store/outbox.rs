//! The telemetry outbox: messages keyed by a big-endian u64 sequence (so sled's key order is
//! arrival order), with the message count and stored bytes kept in memory for the
//! `telemetry.max_bytes` policy (rebuilt from disk when the store opens).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::quarantine::is_damage;
use super::{OutboxMessage, Store, StoreError, WriteTicket, OUTBOX};

/// How long a deletion may wait for a flush another writer asks for before it starts one.
/// Under load the intake's appends flush continuously and deletions ride on them; idle, a
/// deletion is durable after at most this long. An upstream link's window slot is freed only
/// then, so this bounds a busy link's rate (one link with a window of 100 and 5 ms here
/// delivered 10k msg/s, with 1 ms 18k msg/s).
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
        for _ in msgs {
            let seq = eng.db.generate_id().map_err(|source| {
                self.noted(StoreError::Sled {
                    tree: OUTBOX,
                    op: "generate_id",
                    source,
                })
            })?;
            seqs.push(seq);
        }
        // Plain inserts, not one `apply_batch`: a batch seals sled's log buffer, which wakes
        // all of sled's I/O threads, once per call (about 5% of the CPU at 18k msg/s). Nobody
        // needs the batch to be atomic: its devices are acknowledged only once all of it is
        // durable, so a crash that keeps a prefix costs duplicates, never a loss.
        for (i, (seq, m)) in seqs.iter().zip(msgs).enumerate() {
            let value = m.encode();
            let len = value.len() as u64;
            // Count first, so a concurrent remove of this entry can never drive the counters
            // below the true size.
            self.inner.outbox_len.fetch_add(1, Ordering::Relaxed);
            self.inner.outbox_bytes.fetch_add(len, Ordering::Relaxed);
            if let Err(source) = eng.outbox.insert(seq.to_be_bytes(), value) {
                self.inner.outbox_len.fetch_sub(1, Ordering::Relaxed);
                self.inner.outbox_bytes.fetch_sub(len, Ordering::Relaxed);
                // The caller retries the whole batch; take back what went in (if sled lets
                // us: what stays is sent twice, never lost).
                let _ = self.outbox_take_back(&eng.outbox, &seqs[..i]);
                return Err(self.noted(StoreError::Sled {
                    tree: OUTBOX,
                    op: "insert",
                    source,
                }));
            }
        }
        Ok((seqs, self.write_ticket()))
    }

    /// Removes entries of a failed insert again (no flush of its own), adjusting the counters.
    fn outbox_take_back(&self, outbox: &sled::Tree, seqs: &[u64]) -> Result<(), sled::Error> {
        for seq in seqs {
            if let Some(old) = outbox.remove(seq.to_be_bytes())? {
                self.inner.outbox_len.fetch_sub(1, Ordering::Relaxed);
                self.inner
                    .outbox_bytes
                    .fetch_sub(old.len() as u64, Ordering::Relaxed);
            }
        }
        Ok(())
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
        for entry in eng.outbox.range(from_seq.to_be_bytes()..) {
            let (k, v) = entry.map_err(|source| StoreError::Sled {
                tree: OUTBOX,
                op: "scan",
                source,
            })?;
            match decode_entry(&k, &v) {
                Ok(found) => out.push(found),
                Err(e) if is_damage(&e) => {
                    if self.quarantine(OUTBOX, &eng.outbox, &k, &v, &e)?.is_some() {
                        self.inner.outbox_len.fetch_sub(1, Ordering::Relaxed);
                        self.inner
                            .outbox_bytes
                            .fetch_sub(v.len() as u64, Ordering::Relaxed);
                    }
                }
                Err(e) => return Err(e),
            }
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    /// Removes the given sequence numbers (absent ones are ignored); returns how many were
    /// removed. Durable on return; the flush is shared with the next append's, or started
    /// after at most [`REMOVE_FLUSH_WITHIN`]. The counters drop only once the flush is done,
    /// so `outbox_len() == 0` means the outbox is durably empty.
    ///
    /// While the store is full (see `space.rs`) the deletions are kept in memory, applied at
    /// the reopen, and durable with the first flush after it; a crash before that sends the
    /// messages once more, a duplicate, never a loss.
    pub async fn outbox_remove(&self, seqs: &[u64]) -> Result<usize, StoreError> {
        if self.inner.health.is_full() {
            return Ok(self.outbox_remove_while_full(seqs));
        }
        let eng = self.engine()?;
        let mut removed = 0usize;
        let mut bytes = 0u64;
        let mut failed = None;
        for seq in seqs {
            match eng.outbox.remove(seq.to_be_bytes()) {
                Ok(Some(old)) => {
                    removed += 1;
                    bytes += old.len() as u64;
                }
                Ok(None) => {}
                Err(source) => {
                    failed = Some(StoreError::Sled {
                        tree: OUTBOX,
                        op: "remove",
                        source,
                    });
                    break;
                }
            }
        }
        let flushed = if removed > 0 {
            eng.commit
                .durable_within(REMOVE_FLUSH_WITHIN)
                .await
                .map_err(|e| self.flush_error(e))
        } else {
            Ok(())
        };
        // Gone from the tree either way; a failed flush leaves them on disk at worst, to be
        // sent once more after a restart.
        self.inner
            .outbox_len
            .fetch_sub(removed as u64, Ordering::Relaxed);
        self.inner.outbox_bytes.fetch_sub(bytes, Ordering::Relaxed);
        if let Some(e) = failed {
            let e = self.noted(e);
            if e.is_full() {
                self.keep_removals(seqs);
            }
            return Err(e);
        }
        flushed.map(|()| removed).inspect_err(|e| {
            if e.is_full() {
                self.keep_removals(seqs);
            }
        })
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

/// One outbox entry: its 8-byte big-endian sequence key and its message.
fn decode_entry(k: &[u8], v: &[u8]) -> Result<(u64, OutboxMessage), StoreError> {
    let seq = <[u8; 8]>::try_from(k)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::BadKey {
            tree: OUTBOX,
            key: String::from_utf8_lossy(k).into_owned(),
            reason: format!("sequence keys are 8 bytes, this one has {}", k.len()),
        })?;
    let msg =
        OutboxMessage::decode(v).map_err(|source| StoreError::OutboxDecode { seq, source })?;
    Ok((seq, msg))
}
