//! Acknowledgements of inbound messages, sent in arrival order.
//!
//! The consumer acks a message through its [`AckHandle`] once it has durably handled it.
//! PUBACKs go out in the order the messages arrived, whatever order the consumer acks in: MQTT
//! 3.1.1 §4.6 asks for it and some brokers disconnect a client that acks out of order. So one
//! slow message holds back the acks of later ones; consumers should ack as soon as the message
//! is persisted, not when the work it starts is finished. An ack that belongs to an earlier
//! connection is discarded (the broker redelivers that message), never sent on the new
//! connection where its packet id could name another message.
//!
//! The event loop writes the PUBACKs itself, straight into the connection before each poll,
//! rather than through rumqttc's request channel. rumqttc takes at most one request from that
//! channel per turn of its loop while one network read takes in up to 10 PUBLISHes, so under a
//! backlog acks fell ever further behind what the consumer had durably stored (a benchmark:
//! 15,000 messages read and stored, 1,600 PUBACKs sent). mosquitto resends every message it
//! has no PUBACK for when the session resumes, so a crash then duplicated the whole backlog
//! instead of at most the messages still on their way to the outbox. The channel carries one
//! ack at a time only to wake an idle event loop; the loop writes directly only while that
//! one is not pending, which keeps the PUBACKs in order.

use std::collections::VecDeque;
use std::sync::Arc;

use rumqttc::{AsyncClient, Publish, QoS};

use super::shared::Shared;
use crate::downstream::broker::LocalClient;

/// What [`AckHandle::ack`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// QoS 0: nothing to acknowledge.
    NotRequired,
    /// Recorded; the PUBACK goes out once every earlier message is acknowledged too.
    Accepted,
    /// The message came on a connection that has since dropped; the broker redelivers it.
    Stale,
}

/// Acknowledges one inbound message.
///
/// Dropping it without [`ack`](Self::ack) means "not handled": acks go out in order, so one
/// that never comes would block every later ack; instead the session reconnects (the broker
/// keeps the session) and the broker redelivers every unacknowledged message.
#[derive(Debug)]
pub struct AckHandle {
    slot: Option<Slot>,
}

/// Where the acknowledgement goes.
#[derive(Debug)]
enum Slot {
    /// The ack queue of an MQTT connection.
    Mqtt(AckSlot),
    /// The in-process session's message `pkid`.
    InProcess(Arc<LocalClient>, u16),
}

/// A QoS 1 message's place in the ack queue of the connection that carried it.
#[derive(Debug)]
pub(super) struct AckSlot {
    pub(super) shared: Arc<Shared>,
    pub(super) generation: u64,
    pub(super) seq: u64,
}

impl AckHandle {
    /// The handle of a QoS 0 message: nothing to acknowledge.
    pub(crate) fn not_required() -> Self {
        Self { slot: None }
    }

    /// The handle of a QoS 1 message at `slot` of the ack queue.
    pub(super) fn in_queue(slot: AckSlot) -> Self {
        Self {
            slot: Some(Slot::Mqtt(slot)),
        }
    }

    /// The handle of the in-process session's QoS 1 message `pkid`.
    pub(super) fn in_process(client: Arc<LocalClient>, pkid: u16) -> Self {
        Self {
            slot: Some(Slot::InProcess(client, pkid)),
        }
    }

    /// Gives the handle up without acknowledging and without asking for redelivery: the
    /// broker keeps the message for the next session.
    pub(super) fn forget(mut self) {
        self.slot.take();
    }

    /// Marks the message handled; the PUBACK is sent in arrival order.
    pub fn ack(mut self) -> AckOutcome {
        match self.slot.take() {
            None => AckOutcome::NotRequired,
            Some(Slot::Mqtt(slot)) => slot.release(),
            Some(Slot::InProcess(client, pkid)) => {
                client.acknowledge(pkid);
                AckOutcome::Accepted
            }
        }
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        match self.slot.take() {
            None => {}
            Some(Slot::Mqtt(slot)) => slot.abandon(),
            // Not handled: the broker delivers it again.
            Some(Slot::InProcess(client, pkid)) => client.redeliver(pkid),
        }
    }
}

impl AckSlot {
    fn release(self) -> AckOutcome {
        let mut inner = self.shared.lock();
        if inner.generation != self.generation {
            return AckOutcome::Stale;
        }
        if let Some(entry) = self
            .seq
            .checked_sub(inner.acks.head_seq)
            .and_then(|i| inner.acks.entries.get_mut(i as usize))
        {
            entry.done = true;
        }
        inner.wake_for_acks(&self.shared.client);
        AckOutcome::Accepted
    }

    fn abandon(self) {
        let mut inner = self.shared.lock();
        if inner.generation != self.generation || inner.closed || inner.redelivery_requested {
            return;
        }
        // A clean DISCONNECT keeps the broker-side session; the reconnect that follows gets
        // every unacknowledged message again.
        if self.shared.client.try_disconnect().is_ok() {
            inner.redelivery_requested = true;
            tracing::warn!(
                "downstream message dropped without ack; reconnecting so the broker redelivers it"
            );
        }
    }
}

/// One QoS 1 message of the connection, in arrival order.
#[derive(Debug)]
pub(super) struct AckEntry {
    pub(super) qos: QoS,
    pub(super) pkid: u16,
    pub(super) done: bool,
}

/// The PUBACKs of the connection, in arrival order; only an acknowledged prefix goes out.
#[derive(Debug, Default)]
pub(super) struct AckQueue {
    pub(super) head_seq: u64,
    pub(super) entries: VecDeque<AckEntry>,
    /// Acks handed to rumqttc's request channel and not yet written (at most one: the wake-up
    /// of an idle event loop). The event loop writes acks itself only while this is 0, so a
    /// direct write never overtakes an earlier ack still in the channel.
    pub(super) in_channel: usize,
}

impl AckQueue {
    /// Called by the consumer after an ack: if the queue's head is now acknowledged and no ack
    /// is in rumqttc's channel, sends the head through the channel to wake the event loop,
    /// which then writes the rest itself (see `Driver::write_acks`).
    pub(super) fn wake(&mut self, client: &AsyncClient) {
        if self.in_channel == 0 {
            if let Some(front) = self.entries.front().filter(|e| e.done) {
                let mut publish = Publish::new("", front.qos, Vec::new());
                publish.pkid = front.pkid;
                // Full request channel: the event loop is busy and writes it before its next poll.
                if client.try_ack(&publish).is_ok() {
                    self.entries.pop_front();
                    self.head_seq += 1;
                    self.in_channel += 1;
                }
            }
        }
    }

    /// Takes the acknowledged prefix of the queue for the event loop to write, unless an ack
    /// is still in rumqttc's channel (it must go out first).
    pub(super) fn take_done(&mut self) -> Vec<(QoS, u16)> {
        let mut done = Vec::new();
        if self.in_channel > 0 {
            return done;
        }
        while let Some(front) = self.entries.front().filter(|e| e.done) {
            done.push((front.qos, front.pkid));
            self.entries.pop_front();
            self.head_seq += 1;
        }
        done
    }
}
