//! What devices sent to an emulated cloud: a log of the newest `--max-messages` messages
//! (behind `GET /messages`) and per-client counters that count everything (behind
//! `GET /stats`). Shared by the emulators; each one chooses what it keeps of a message (the
//! AWS emulator a topic and QoS, the Azure one a device id, transport and properties) through
//! the type parameter.
//!
//! Connection tasks record the messages of one network read under a single lock, so that
//! tens of thousands of QoS 1 messages per second cost a few thousand lock acquisitions.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

/// What an emulator keeps of one message; the log only needs its payload size for counters.
pub trait LoggedMessage: Clone {
    /// Payload bytes, for the per-client byte counter.
    fn payload_len(&self) -> usize;
}

/// One message as received.
#[derive(Clone, Debug)]
pub struct ReceivedMessage<M> {
    /// Arrival sequence number, from 1.
    pub seq: u64,
    /// Client id of the sender (the MQTT client id; the device id over HTTPS).
    pub client_id: String,
    /// Arrival time, unix microseconds.
    pub received_at_us: u64,
    /// What the emulator keeps of the message.
    pub message: M,
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

struct Inner<M> {
    log: VecDeque<ReceivedMessage<M>>,
    next_seq: u64,
    per_client: HashMap<String, ClientStats>,
}

/// The bounded message log and its counters.
pub struct MessageLog<M> {
    inner: Mutex<Inner<M>>,
    capacity: usize,
}

impl<M: LoggedMessage> MessageLog<M> {
    /// A log keeping the newest `capacity` messages (0 keeps none, only counts).
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                log: VecDeque::new(),
                next_seq: 0,
                per_client: HashMap::new(),
            }),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<M>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the messages one client sent in one read, in order; returns the sequence
    /// number of the last one (0 for an empty batch). `now_us`: the arrival time, unix
    /// microseconds.
    pub fn record(&self, client_id: &str, batch: Vec<M>, now_us: u64) -> u64 {
        let mut inner = self.lock();
        let Inner {
            log,
            next_seq,
            per_client,
        } = &mut *inner;
        if batch.is_empty() {
            return 0;
        }
        let stats = match per_client.get_mut(client_id) {
            Some(stats) => stats,
            None => per_client.entry(client_id.to_string()).or_default(),
        };
        for message in batch {
            stats.messages += 1;
            stats.bytes += message.payload_len() as u64;
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
                received_at_us: now_us,
                message,
            });
        }
        *next_seq
    }

    /// Logged messages with `seq > after`, optionally only from `client_id`, oldest first,
    /// at most `limit`.
    pub fn messages(
        &self,
        client_id: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Vec<ReceivedMessage<M>> {
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
    /// counters by client id, in order: the `messages` and `clients` of both emulators'
    /// `GET /stats`.
    pub fn stats(&self) -> (u64, BTreeMap<String, ClientStats>) {
        let inner = self.lock();
        let per_client = inner
            .per_client
            .iter()
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        (inner.next_seq, per_client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug)]
    struct Msg(&'static str, &'static [u8]);

    impl LoggedMessage for Msg {
        fn payload_len(&self) -> usize {
            self.1.len()
        }
    }

    #[test]
    fn keeps_the_newest_messages_and_counts_all() {
        let log = MessageLog::new(2);
        assert_eq!(
            log.record("a", vec![Msg("t/1", b"x"), Msg("t/2", b"yy")], 5),
            2
        );
        log.record("b", vec![Msg("t/3", b"zzz")], 6);
        let kept = log.messages(None, 0, 10);
        let topics: Vec<_> = kept.iter().map(|m| m.message.0).collect();
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
        assert_eq!(log.messages(None, 0, 1)[0].message.0, "t/2");
    }
}
