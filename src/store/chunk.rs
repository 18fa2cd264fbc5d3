//! Outbox chunks: the outbox stores several messages of one intake batch under one key, and
//! keeps in memory which of them are still waiting for the cloud.
//!
//! One sled insert and one sled delete per message (page-cache work and a log reservation
//! each) bounded the gateway's telemetry rate: 50 devices with their own cloud connections
//! went from 59-65k to 78-97k msg/s on the same 2-core box when they became one per chunk,
//! and a build without any outbox writes reached 116-136k. A chunk holds up to [`CHUNK_MAX`] messages and about [`CHUNK_BYTES`]; a
//! message larger than that has a chunk of its own. The limit keeps a whole tree node of
//! chunks (up to 17 entries) well below sled's blob threshold, so chunks stay in sled's log.
//!
//! Keys and sequence numbers. A chunk's key is `id << 8` for a fresh `generate_id()`; its
//! messages are `key + index` (index < 256), so the sequence order is still arrival order.
//! Values written by earlier releases (one message per key, key = sequence) read as chunks of
//! one message at index 0, and sort before every chunk written since (sled's ids only grow).
//!
//! Deletion. The cloud acknowledges the messages of a chunk one by one, from different
//! devices' links. [`OutboxIndex`] marks them sent in memory; the chunk is deleted from sled
//! when none is left. A crash before that sends the chunk's sent messages once more:
//! duplicates, never a loss. Healthy links empty a chunk within milliseconds. So that a device
//! whose link is down cannot pin the messages of every device that shared its chunks, a chunk
//! older than [`COMPACT_AFTER`] whose sent messages are at least as many as its waiting ones
//! is written again with only the waiting ones. After a crash the gateway so sends again, on
//! top of the upstream windows in flight, the messages acknowledged in the last
//! [`COMPACT_AFTER`] or so that shared a chunk with waiting ones, and from older chunks never
//! more than it still had to send anyway.
//!
//! Layout of a chunk value: tag [`CHUNK_TAG`] u8, member count u8, per member its index u8
//! and length u32 BE, then the members' [`OutboxMessage`] encodings one after the other. The
//! tag is above every message layout version, so an earlier release refuses a chunk as
//! "written by a newer release" instead of misreading it.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::{Duration, Instant};

use super::{OutboxDecodeError, OutboxMessage};

/// First byte of a chunk value.
pub(super) const CHUNK_TAG: u8 = 0xC1;
/// Messages per chunk at most (their index is a byte).
pub(super) const CHUNK_MAX: usize = 255;
/// Encoded bytes of a chunk's messages at most, unless one message alone is larger.
pub(super) const CHUNK_BYTES: usize = 4096;
/// Bits of a sequence number that hold the index in its chunk.
pub(super) const INDEX_BITS: u32 = 8;
/// Age after which a chunk with as many sent messages as waiting ones is written again without
/// the sent ones.
pub(super) const COMPACT_AFTER: Duration = Duration::from_millis(250);

/// The chunk key of a fresh id.
pub(super) fn chunk_key(id: u64) -> Option<u64> {
    id.checked_mul(1 << INDEX_BITS)
}

/// How a batch whose messages encode to `lens` bytes each splits into chunks: the end of
/// each chunk, in order.
pub(super) fn split(lens: &[usize]) -> Vec<usize> {
    let mut ends = Vec::new();
    let (mut n, mut bytes) = (0usize, 0usize);
    for (i, len) in lens.iter().enumerate() {
        if n > 0 && (n == CHUNK_MAX || bytes + len > CHUNK_BYTES) {
            ends.push(i);
            (n, bytes) = (0, 0);
        }
        n += 1;
        bytes += len;
    }
    if n > 0 {
        ends.push(lens.len());
    }
    ends
}

/// A chunk's header for its members (index, encoded length), with room for their encodings.
fn header(members: &[(u8, usize)]) -> Vec<u8> {
    let body: usize = members.iter().map(|(_, len)| len).sum();
    let mut out = Vec::with_capacity(2 + 5 * members.len() + body);
    out.push(CHUNK_TAG);
    out.push(members.len() as u8);
    for (index, len) in members {
        out.push(*index);
        out.extend_from_slice(&(*len as u32).to_be_bytes());
    }
    out
}

/// Encodes `msgs`, whose encodings are `lens` bytes long, as one chunk at indexes 0, 1, ...
pub(super) fn encode(msgs: &[OutboxMessage], lens: &[usize]) -> Vec<u8> {
    debug_assert!(!msgs.is_empty() && msgs.len() <= CHUNK_MAX && msgs.len() == lens.len());
    let members: Vec<(u8, usize)> = lens
        .iter()
        .enumerate()
        .map(|(i, len)| (i as u8, *len))
        .collect();
    let mut out = header(&members);
    for m in msgs {
        m.encode_into(&mut out);
    }
    out
}

/// The same chunk with only the members at `keep` (indexes, in order).
pub(super) fn retain(value: &[u8], keep: &[u8]) -> Result<Vec<u8>, OutboxDecodeError> {
    let kept: Vec<(u8, Range<usize>)> = members(value)?
        .into_iter()
        .filter(|(index, _)| keep.contains(index))
        .collect();
    let heads: Vec<(u8, usize)> = kept.iter().map(|(index, r)| (*index, r.len())).collect();
    let mut out = header(&heads);
    for (_, r) in kept {
        out.extend_from_slice(&value[r]);
    }
    Ok(out)
}

/// The members of a stored value: (index, byte range of its message encoding). A value of an
/// earlier release (one message) is one member at index 0.
pub(super) fn members(value: &[u8]) -> Result<Vec<(u8, Range<usize>)>, OutboxDecodeError> {
    if value.first() != Some(&CHUNK_TAG) {
        return Ok(vec![(0, 0..value.len())]);
    }
    let n = *value.get(1).ok_or(OutboxDecodeError::Truncated(1))? as usize;
    if n == 0 {
        // Never written: a chunk is deleted, not emptied.
        return Err(OutboxDecodeError::Truncated(2));
    }
    let mut pos = 2 + 5 * n;
    if value.len() < pos {
        return Err(OutboxDecodeError::Truncated(value.len()));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let h = &value[2 + 5 * i..2 + 5 * (i + 1)];
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        let end = pos
            .checked_add(len)
            .filter(|end| *end <= value.len())
            .ok_or(OutboxDecodeError::Truncated(value.len()))?;
        out.push((h[0], pos..end));
        pos = end;
    }
    Ok(out)
}

/// One message of a chunk, as the index knows it.
#[derive(Debug, Clone, Copy)]
struct Member {
    index: u8,
    len: u32,
    waiting: bool,
}

#[derive(Debug)]
struct Chunk {
    written: Instant,
    /// Sorted by index.
    members: Vec<Member>,
    /// How many members wait (kept, not counted: deletions are the remover's hot path).
    waiting: usize,
}

impl Chunk {
    fn new(mut members: Vec<Member>) -> Self {
        members.sort_by_key(|m| m.index);
        let waiting = members.iter().filter(|m| m.waiting).count();
        Chunk {
            written: Instant::now(),
            members,
            waiting,
        }
    }

    fn member(&mut self, index: u8) -> Option<&mut Member> {
        let at = self
            .members
            .binary_search_by_key(&index, |m| m.index)
            .ok()?;
        Some(&mut self.members[at])
    }

    fn waiting_members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.waiting)
    }

    /// The waiting members' count and encoded bytes.
    fn waiting_totals(&self) -> (u64, u64) {
        self.waiting_members()
            .fold((0, 0), |(n, b), m| (n + 1, b + u64::from(m.len)))
    }
}

/// What a deletion did to the index.
#[derive(Debug, Default)]
pub(super) struct Removal {
    /// Messages that were waiting and are not any more.
    pub messages: u64,
    /// Their encoded bytes.
    pub bytes: u64,
    /// Chunks with no waiting message left: delete them from sled.
    pub emptied: Vec<u64>,
}

/// Which outbox messages are waiting, by chunk; the source of the outbox's counters.
#[derive(Debug)]
pub(super) struct OutboxIndex {
    chunks: BTreeMap<u64, Chunk>,
    /// Chunks with both sent and waiting messages.
    partial: BTreeSet<u64>,
    compact_after: Duration,
    last_sweep: Instant,
}

impl Default for OutboxIndex {
    fn default() -> Self {
        Self {
            chunks: BTreeMap::new(),
            partial: BTreeSet::new(),
            compact_after: COMPACT_AFTER,
            last_sweep: Instant::now(),
        }
    }
}

impl OutboxIndex {
    /// Adds a stored chunk whose members (at indexes 0.., encoded lengths `lens`) all wait.
    pub fn add(&mut self, key: u64, lens: &[usize]) {
        self.add_found(key, lens.iter().enumerate().map(|(i, len)| (i as u8, *len)));
    }

    /// Adds a chunk whose `members` (index, encoded length) all wait.
    pub fn add_found(&mut self, key: u64, members: impl IntoIterator<Item = (u8, usize)>) {
        let members = members
            .into_iter()
            .map(|(index, len)| Member {
                index,
                len: len as u32,
                waiting: true,
            })
            .collect();
        self.chunks.insert(key, Chunk::new(members));
    }

    /// Forgets a chunk (its insert failed, or it went to quarantine); returns its waiting
    /// messages and their bytes.
    pub fn forget(&mut self, key: u64) -> Option<(u64, u64)> {
        self.partial.remove(&key);
        Some(self.chunks.remove(&key)?.waiting_totals())
    }

    /// The key of the chunk that holds `seq`, if it is known: where a scan from `seq` starts.
    pub fn chunk_of(&self, seq: u64) -> Option<u64> {
        self.chunks.range(..=seq).next_back().map(|(k, _)| *k)
    }

    /// The indexes of chunk `key`'s waiting messages, in order; `None` if the index does not
    /// know the chunk (emptied, or never indexed).
    pub fn waiting_indexes(&self, key: u64) -> Option<Vec<u8>> {
        let c = self.chunks.get(&key)?;
        Some(c.waiting_members().map(|m| m.index).collect())
    }

    /// Whether the index knows chunk `key`.
    pub fn knows(&self, key: u64) -> bool {
        self.chunks.contains_key(&key)
    }

    /// Marks the messages `seqs` sent (unknown and already sent ones are ignored).
    pub fn remove(&mut self, seqs: &[u64]) -> Removal {
        let mut out = Removal::default();
        for &seq in seqs {
            let Some((&key, chunk)) = self.chunks.range_mut(..=seq).next_back() else {
                continue;
            };
            let Ok(index) = u8::try_from(seq - key) else {
                continue;
            };
            let Some(m) = chunk.member(index).filter(|m| m.waiting) else {
                continue;
            };
            m.waiting = false;
            out.messages += 1;
            out.bytes += u64::from(m.len);
            chunk.waiting -= 1;
            if chunk.waiting == 0 {
                self.chunks.remove(&key);
                self.partial.remove(&key);
                out.emptied.push(key);
            } else {
                self.partial.insert(key);
            }
        }
        out
    }

    /// Partly sent chunks due to be written again without their sent messages (module docs),
    /// with the indexes to keep; looked for at most four times per `compact_after`.
    pub fn due_for_compaction(&mut self) -> Vec<(u64, Vec<u8>)> {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < self.compact_after / 4 {
            return Vec::new();
        }
        self.last_sweep = now;
        self.partial
            .iter()
            .filter_map(|key| {
                let c = self.chunks.get(key)?;
                let due = now.duration_since(c.written) >= self.compact_after
                    && c.members.len() - c.waiting >= c.waiting;
                due.then(|| (*key, c.waiting_members().map(|m| m.index).collect()))
            })
            .collect()
    }

    /// Chunk `key` was written again with only the members `kept`.
    pub fn compacted(&mut self, key: u64, kept: &[u8]) {
        if let Some(c) = self.chunks.get_mut(&key) {
            c.members.retain(|m| kept.contains(&m.index));
            // A kept message may have been sent since `kept` was taken.
            if c.waiting == c.members.len() {
                self.partial.remove(&key);
            }
        }
    }

    /// Waiting messages and their bytes, over all chunks.
    pub fn totals(&self) -> (u64, u64) {
        self.chunks
            .values()
            .map(Chunk::waiting_totals)
            .fold((0, 0), |(n, b), (cn, cb)| (n + cn, b + cb))
    }

    #[cfg(test)]
    pub fn set_compact_after(&mut self, after: Duration) {
        self.compact_after = after;
        self.last_sweep = Instant::now() - after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_id::DeviceId;

    fn msg(payload: &[u8]) -> OutboxMessage {
        OutboxMessage {
            device: DeviceId::parse("chunk-dev").unwrap(),
            topic: "t".into(),
            payload: payload.to_vec(),
            qos: 1,
            enqueued_at_ms: 7,
            properties: vec![("k".into(), "v".into())],
        }
    }

    fn lens(msgs: &[OutboxMessage]) -> Vec<usize> {
        msgs.iter().map(OutboxMessage::encoded_len).collect()
    }

    fn encoded(msgs: &[OutboxMessage]) -> Vec<u8> {
        encode(msgs, &lens(msgs))
    }

    #[test]
    fn a_chunk_round_trips_and_keeps_members_by_index() {
        let msgs: Vec<_> = (0..5u8).map(|i| msg(&[i; 3])).collect();
        let lens = lens(&msgs);
        let value = encode(&msgs, &lens);
        let found = members(&value).unwrap();
        assert_eq!(found.len(), 5);
        for ((index, r), (m, len)) in found.iter().zip(msgs.iter().zip(&lens)) {
            assert_eq!(r.len(), *len);
            assert_eq!(&OutboxMessage::decode(&value[r.clone()]).unwrap(), m);
            assert_eq!(u64::from(*index), u64::from(m.payload[0]));
        }
        let kept = retain(&value, &[1, 4]).unwrap();
        let found = members(&kept).unwrap();
        let got: Vec<(u8, OutboxMessage)> = found
            .iter()
            .map(|(i, r)| (*i, OutboxMessage::decode(&kept[r.clone()]).unwrap()))
            .collect();
        assert_eq!(got, [(1, msgs[1].clone()), (4, msgs[4].clone())]);
    }

    #[test]
    fn an_earlier_single_message_value_is_one_member() {
        let m = msg(b"old");
        let value = m.encode();
        assert_eq!(members(&value).unwrap(), [(0, 0..value.len())]);
    }

    #[test]
    fn truncated_chunks_are_refused() {
        let value = encoded(&[msg(b"a"), msg(b"b")]);
        for cut in 1..value.len() {
            assert!(members(&value[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn damaged_chunks_never_read_out_of_bounds() {
        let value = encoded(&[msg(b"a"), msg(b"bb"), msg(b"ccc")]);
        for pos in 0..value.len() {
            for byte in [0u8, 1, 2, 0x7f, 0xC1, 0xff] {
                let mut bad = value.clone();
                bad[pos] = byte;
                if let Ok(found) = members(&bad) {
                    for (_, r) in found {
                        assert!(r.end <= bad.len() && r.start <= r.end, "{pos}: {r:?}");
                        let _ = OutboxMessage::decode(&bad[r]);
                    }
                }
            }
        }
    }

    #[test]
    fn batches_split_by_count_and_bytes() {
        let small: Vec<_> = (0..600).map(|_| msg(b"x")).collect();
        let per_chunk = CHUNK_BYTES / small[0].encoded_len();
        let ends = split(&lens(&small));
        assert_eq!(ends[0], per_chunk, "as many as fit in {CHUNK_BYTES} bytes");
        assert_eq!(ends.len(), 600usize.div_ceil(per_chunk));
        assert_eq!(ends.last(), Some(&600));
        let big = msg(&vec![0; CHUNK_BYTES]);
        let mixed = vec![msg(b"a"), big.clone(), msg(b"b"), msg(b"c"), big];
        assert_eq!(
            split(&lens(&mixed)),
            [1, 2, 4, 5],
            "a large message is alone in its chunk"
        );
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn the_index_empties_chunks_and_counts_what_waits() {
        let mut ix = OutboxIndex::default();
        ix.add(256, &[10, 20, 30]);
        ix.add(512, &[5]);
        assert_eq!(ix.totals(), (4, 65));
        let r = ix.remove(&[257, 257, 9999, 100]);
        assert_eq!(
            (r.messages, r.bytes),
            (1, 20),
            "repeats and unknown seqs are ignored"
        );
        assert!(r.emptied.is_empty());
        assert_eq!(ix.waiting_indexes(256), Some(vec![0, 2]));
        let r = ix.remove(&[256, 258, 512]);
        assert_eq!((r.messages, r.bytes, r.emptied), (3, 45, vec![256, 512]));
        assert_eq!(ix.totals(), (0, 0));
    }

    #[test]
    fn only_old_chunks_with_more_sent_than_waiting_are_compacted() {
        let mut ix = OutboxIndex::default();
        ix.add(256, &[1, 1, 1, 1]);
        ix.add(512, &[1, 1, 1, 1]);
        ix.remove(&[256, 257, 512]);
        assert!(ix.due_for_compaction().is_empty(), "too young");
        ix.set_compact_after(Duration::ZERO);
        assert_eq!(ix.due_for_compaction(), [(256, vec![2, 3])]);
        ix.compacted(256, &[2, 3]);
        assert_eq!(ix.totals(), (5, 5));
        assert!(
            ix.due_for_compaction().is_empty(),
            "nothing sent left in 256"
        );
    }
}
