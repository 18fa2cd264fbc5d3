//! The state the session handle, the ack handles and the event loop task share: one lock
//! over the ack queue, the publish confirmations and the connection generation, and the
//! rumqttc client; and [`Common`], the status and counters every kind of session keeps.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use rumqttc::{AsyncClient, QoS};
use tokio::sync::{oneshot, watch, Notify};

use super::ack::AckQueue;
use super::publish::Confirms;
use super::SessionStatus;

/// The session's bookkeeping, behind one lock.
#[derive(Debug)]
pub(super) struct Inner {
    /// Incremented on every disconnect; acks of older generations are stale.
    pub(super) generation: u64,
    pub(super) acks: AckQueue,
    pub(super) confirms: Confirms,
    pub(super) closed: bool,
    /// A DISCONNECT was queued to get unacknowledged messages redelivered.
    pub(super) redelivery_requested: bool,
    /// `shutdown` got its DISCONNECT into rumqttc's request channel.
    pub(super) disconnect_queued: bool,
}

impl Inner {
    /// After an ack of the consumer: wakes the event loop for the acks now due (see
    /// `AckQueue::wake`), and queues a DISCONNECT that was waiting for room.
    pub(super) fn wake_for_acks(&mut self, client: &AsyncClient) {
        self.acks.wake(client);
        self.queue_disconnect(client);
    }

    /// A shutdown that found the request channel full queues its DISCONNECT once there is
    /// room; without it the event loop would never learn to stop.
    pub(super) fn queue_disconnect(&mut self, client: &AsyncClient) {
        if self.closed && !self.disconnect_queued {
            self.disconnect_queued = client.try_disconnect().is_ok();
        }
    }
}

/// The status and counters of a session, MQTT or in-process.
#[derive(Debug)]
pub(super) struct Common {
    pub(super) status: watch::Sender<SessionStatus>,
    pub(super) rejected_topics: AtomicU64,
    pub(super) oversize_requests: AtomicU64,
    pub(super) dropped_qos0: AtomicU64,
    pub(super) busy_requests: AtomicU64,
    pub(super) retained_replays: AtomicU64,
}

impl Common {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            status: watch::channel(SessionStatus::default()).0,
            rejected_topics: AtomicU64::new(0),
            oversize_requests: AtomicU64::new(0),
            dropped_qos0: AtomicU64::new(0),
            busy_requests: AtomicU64::new(0),
            retained_replays: AtomicU64::new(0),
        })
    }
}

/// What the MQTT session's handle, its ack handles and its event loop task share.
pub(super) struct Shared {
    pub(super) inner: Mutex<Inner>,
    pub(super) client: AsyncClient,
    /// Signalled whenever rumqttc took a request from its channel (room for another).
    pub(super) room: Notify,
    pub(super) shutdown: Notify,
    pub(super) common: Arc<Common>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a `/rejected` answer without waiting for its PUBACK: the event loop cannot wait
    /// (it receives that PUBACK), and it also routes the telemetry that waits behind it
    /// (`inbound.rs`). Returns false when it was not sent: too large, or rumqttc's request channel full.
    pub(super) fn queue_rejection(
        &self,
        reply_topic: String,
        payload: Vec<u8>,
        max_packet_bytes: usize,
    ) -> bool {
        if payload.len() + reply_topic.len() + 8 > max_packet_bytes {
            return false;
        }
        let mut inner = self.lock();
        // Registered like any publish so packet ids keep matching callers; nobody waits on it.
        if self
            .client
            .try_publish(reply_topic, QoS::AtLeastOnce, false, payload)
            .is_ok()
        {
            let (tx, _) = oneshot::channel();
            inner.confirms.queued.push_back(tx);
            true
        } else {
            tracing::warn!("downstream request channel full; rejection not sent");
            false
        }
    }
}
