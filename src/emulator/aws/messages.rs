//! What devices published to the emulated IoT Core: a log of the newest `--max-messages`
//! messages (behind `GET /messages`) and per-client counters that count everything (behind
//! `GET /stats`), plus the emulator-wide counters.
//!
//! Connection tasks record the messages of one network read under a single lock, so that
//! tens of thousands of QoS 1 messages per second cost a few thousand lock acquisitions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use serde::Serialize;

/// One device publish as received.
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    /// Arrival sequence number, from 1.
    pub seq: u64,
    /// MQTT client id of the publishing connection (the thing name).
    pub client_id: String,
    /// Topic published to.
    pub topic: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// QoS of the publish (0 or 1).
    pub qos: u8,
    /// Arrival time, unix milliseconds.
    pub received_at_ms: u64,
}

/// Counters for one client id.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClientStats {
    /// Messages received from this client.
    pub messages: u64,
    /// Payload bytes received from this client.
    pub bytes: u64,
}

#[derive(Default)]
struct Inner {
    log: VecDeque<ReceivedMessage>,
    next_seq: u64,
    per_client: HashMap<String, ClientStats>,
}

/// The bounded message log and its counters.
pub struct MessageLog {
    inner: Mutex<Inner>,
    capacity: usize,
}

/// A message about to be recorded (the log assigns the sequence number).
pub struct Incoming {
    /// Topic published to.
    pub topic: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// QoS 0 or 1.
    pub qos: u8,
}

impl MessageLog {
    /// A log keeping the newest `capacity` messages (0 keeps none, only counts).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the messages one connection received in one read, in order.
    pub fn record(&self, client_id: &str, batch: Vec<Incoming>, now_ms: u64) {
        if batch.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let Inner {
            log,
            next_seq,
            per_client,
        } = &mut *inner;
        let stats = match per_client.get_mut(client_id) {
            Some(stats) => stats,
            None => per_client.entry(client_id.to_string()).or_default(),
        };
        for msg in batch {
            stats.messages += 1;
            stats.bytes += msg.payload.len() as u64;
            *next_seq += 1;
            if self.capacity == 0 {
                continue;
            }
            if log.len() == self.capacity {
                log.pop_front();
            }
            log.push_back(ReceivedMessage {
                seq: *next_seq,
                client_id: client_id.to_string(),
                topic: msg.topic,
                payload: msg.payload,
                qos: msg.qos,
                received_at_ms: now_ms,
            });
        }
    }

    /// Logged messages with `seq > after`, optionally only from `client_id`, oldest first,
    /// at most `limit`.
    pub fn messages(
        &self,
        client_id: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Vec<ReceivedMessage> {
        let inner = self.lock();
        // Sequence numbers are dense in the log, so the first wanted index is computable.
        let first_seq = inner.log.front().map_or(0, |m| m.seq);
        let skip = after.saturating_sub(first_seq.saturating_sub(1));
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        inner
            .log
            .iter()
            .skip(skip)
            .filter(|m| client_id.is_none_or(|c| m.client_id == c))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Total messages received (including those no longer in the log) and the per-client
    /// counters.
    pub fn stats(&self) -> (u64, HashMap<String, ClientStats>) {
        let inner = self.lock();
        (inner.next_seq, inner.per_client.clone())
    }
}

/// Emulator-wide counters (lock-free; read by `GET /stats`).
#[derive(Default)]
pub struct Counters {
    /// TLS connections accepted in total.
    pub connections_total: AtomicU64,
    /// Connections currently open (past the TLS handshake).
    pub connections_open: AtomicU64,
    /// Connections refused (TLS failure, not authorized, outage).
    pub connections_refused: AtomicU64,
    /// Connections closed by the emulator for a policy or protocol violation.
    pub connections_closed_by_policy: AtomicU64,
    /// CreateCertificateFromCsr requests.
    pub create_from_csr: AtomicU64,
    /// CreateKeysAndCertificate requests.
    pub create_keys: AtomicU64,
    /// RegisterThing requests.
    pub register_thing: AtomicU64,
    /// Requests answered on `/accepted`.
    pub accepted: AtomicU64,
    /// Requests answered on `/rejected`.
    pub rejected: AtomicU64,
    /// Requests rejected with 429.
    pub throttled: AtomicU64,
    /// Responses dropped by the `dropResponses` fault.
    pub dropped_responses: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &'static [u8]) -> Incoming {
        Incoming {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: 1,
        }
    }

    #[test]
    fn keeps_the_newest_messages_and_counts_all() {
        let log = MessageLog::new(2);
        log.record("a", vec![msg("t/1", b"x"), msg("t/2", b"yy")], 5);
        log.record("b", vec![msg("t/3", b"zzz")], 6);
        let kept = log.messages(None, 0, 10);
        let topics: Vec<_> = kept.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["t/2", "t/3"]);
        assert_eq!(kept[0].seq, 2);
        let (total, per_client) = log.stats();
        assert_eq!(total, 3);
        assert_eq!(
            per_client["a"],
            ClientStats {
                messages: 2,
                bytes: 3
            }
        );
        assert_eq!(log.messages(None, 2, 10).len(), 1);
        assert_eq!(log.messages(Some("a"), 0, 10).len(), 1);
        assert_eq!(log.messages(None, 0, 1)[0].topic, "t/2");
    }
}
