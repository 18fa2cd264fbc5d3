//! Read-ahead: how far the session hands messages to the consumer ahead of the broker's
//! confirmed processing of their PUBACKs.
//!
//! The messages a crash of the gateway makes the broker deliver twice are those the consumer
//! has stored but whose PUBACK the broker has not yet processed. A broker that holds to its
//! in-flight window keeps them below that window, but mosquitto up to 2.0.12 (Debian 12 ships
//! 2.0.11) does not once a queue has formed: each PUBACK it processes moves up to a whole
//! `max_inflight_messages` (or MQTT 5 Receive Maximum) of queued messages into flight
//! (`db__message_delete_outgoing`, fixed in 2.0.13), while it reads one packet per connection
//! per turn of its loop. Under load it sent the gateway 14,598 messages while it processed
//! 5,182 PUBACKs, and a SIGKILL then cost 5,000 to 15,000 copies of stored messages. So the
//! session bounds this itself: it hands a QoS 1 message to the consumer only while fewer than
//! `max_unconfirmed` are unconfirmed, and confirms acks with a PINGREQ written after them (the
//! broker answers a connection's packets in order, so its PINGRESP proves every earlier PUBACK
//! processed; rumqttc's keep-alive pings count the same way). Messages beyond the bound are
//! read (the PINGRESP is behind them) and held in memory, in arrival order, up to
//! `max_held_bytes`. Past that, every further message of the connection is left with the
//! broker: never acknowledged, so the broker keeps it in the session, exactly like a message
//! not yet read (and without an ack entry, so the held messages' acks still go out). Once the
//! held messages are handed over and acknowledged, the session disconnects cleanly (the broker
//! processes those PUBACKs first) and the reconnect gets the rest again. Pings start only once
//! half the bound is unconfirmed, so a broker within a smaller window never sees one.

use std::collections::VecDeque;

use rumqttc::{Publish, QoS};

use super::ack::AckHandle;

/// How far the session hands messages to the consumer ahead of the broker's confirmed
/// processing of their PUBACKs (see the module docs). Counts are per
/// connection.
#[derive(Debug)]
pub(super) struct ReadAhead {
    max_unconfirmed: usize,
    /// QoS 1 messages of this connection handed to the consumer (or settled by the session).
    pub(super) delivered: u64,
    /// PUBACKs of this connection written to the broker.
    pub(super) written: u64,
    /// PUBACKs the broker has certainly processed: those written before an answered PINGREQ.
    pub(super) confirmed: u64,
    /// For each PINGREQ awaiting its PINGRESP, oldest first: `written` when it was sent.
    /// Ours and rumqttc's keep-alive pings alike; the broker answers them in order.
    pings: VecDeque<u64>,
    /// `written` when the last PINGREQ went out.
    last_ping_mark: u64,
    /// Messages read but not handed over yet, in arrival order (QoS 0 ones too, so a device's
    /// order is kept).
    pub(super) held: VecDeque<(Publish, AckHandle)>,
    /// Payload and topic bytes in `held`.
    pub(super) held_bytes: usize,
    /// Held bytes at most; what comes beyond is left with the broker.
    max_held_bytes: usize,
    /// `held` was full: every later message of this connection is left with the broker (its
    /// PUBACK would have to follow the missing ones), and once the held ones are stored and
    /// acknowledged the session reconnects so the broker sends them again.
    pub(super) discarding: bool,
    /// Messages left with the broker on this connection.
    pub(super) discarded: u64,
}

impl ReadAhead {
    pub(super) fn new(max_unconfirmed: usize, max_held_bytes: usize) -> Self {
        Self {
            max_unconfirmed,
            delivered: 0,
            written: 0,
            confirmed: 0,
            pings: VecDeque::new(),
            last_ping_mark: 0,
            held: VecDeque::new(),
            held_bytes: 0,
            max_held_bytes,
            discarding: false,
            discarded: 0,
        }
    }

    /// A new connection: nothing delivered or written on it yet. Returns the held messages.
    pub(super) fn reset(&mut self) -> VecDeque<(Publish, AckHandle)> {
        let held = std::mem::take(&mut self.held);
        *self = Self::new(self.max_unconfirmed, self.max_held_bytes);
        held
    }

    /// Whether `publish` is to be left with the broker: once `held` is full, it and every
    /// later message of the connection (the first one is always held, whatever its size).
    pub(super) fn leave_with_broker(&mut self, publish: &Publish) -> bool {
        let size = publish.payload.len() + publish.topic.len();
        if !self.discarding && !self.held.is_empty() && self.held_bytes + size > self.max_held_bytes
        {
            self.discarding = true;
            tracing::warn!(
                held_bytes = self.held_bytes,
                unconfirmed = self.delivered - self.confirmed,
                "the downstream broker sends far more than its in-flight window without processing the gateway's acks (mosquitto before 2.0.13 does); leaving further messages with it and reconnecting once the held ones are stored"
            );
        }
        if self.discarding {
            self.discarded += 1;
        }
        self.discarding
    }

    pub(super) fn hold(&mut self, publish: Publish, ack: AckHandle) {
        self.held_bytes += publish.payload.len() + publish.topic.len();
        self.held.push_back((publish, ack));
    }

    /// The oldest held message, if it may go to the consumer now: QoS 0 always (it needs no
    /// ack), QoS 1 while fewer than `max_unconfirmed` are unconfirmed.
    pub(super) fn release(&mut self) -> Option<(Publish, AckHandle)> {
        let qos = self.held.front()?.0.qos;
        if qos != QoS::AtMostOnce && self.delivered - self.confirmed >= self.max_unconfirmed as u64
        {
            return None;
        }
        let (publish, ack) = self.held.pop_front()?;
        self.held_bytes -= publish.payload.len() + publish.topic.len();
        if qos != QoS::AtMostOnce {
            self.delivered += 1;
        }
        Some((publish, ack))
    }

    /// Whether to follow the PUBACKs just written with a PINGREQ: only once half the
    /// read-ahead is unconfirmed (a broker within a smaller window never needs one), then when
    /// no ping is on its way or a quarter of the read-ahead was acked since the last one (so
    /// the broker has acks to process while an answer travels).
    pub(super) fn wants_ping(&self) -> bool {
        let window = self.max_unconfirmed as u64;
        let since = self.written - self.last_ping_mark;
        since > 0
            && self.delivered - self.confirmed >= window / 2
            && (self.pings.is_empty() || since >= (window / 4).max(1))
    }

    pub(super) fn ping_sent(&mut self) {
        self.pings.push_back(self.written);
        self.last_ping_mark = self.written;
    }

    pub(super) fn pong(&mut self) {
        if let Some(mark) = self.pings.pop_front() {
            self.confirmed = self.confirmed.max(mark);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(gate: &mut ReadAhead, qos: QoS, payload: &str) {
        let publish = Publish::new("fleetgw/d/telemetry", qos, payload.as_bytes().to_vec());
        gate.hold(publish, AckHandle::not_required());
    }

    fn released(gate: &mut ReadAhead) -> Vec<String> {
        std::iter::from_fn(|| gate.release())
            .map(|(p, _)| String::from_utf8(p.payload.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn read_ahead_holds_qos1_beyond_the_bound_until_a_ping_confirms_acks() {
        let mut gate = ReadAhead::new(2, 1 << 20);
        for m in ["a", "b", "c"] {
            held(&mut gate, QoS::AtLeastOnce, m);
        }
        // A QoS 0 message behind a held one waits too: a device's order is kept.
        held(&mut gate, QoS::AtMostOnce, "d0");
        assert_eq!(released(&mut gate), ["a", "b"]);
        assert!(
            !gate.wants_ping(),
            "nothing acked yet: a ping would confirm nothing"
        );
        gate.written = 2;
        assert!(gate.wants_ping());
        gate.ping_sent();
        assert!(!gate.wants_ping(), "one ping for the same acks");
        assert!(
            released(&mut gate).is_empty(),
            "unconfirmed until the PINGRESP"
        );
        gate.pong();
        assert_eq!(gate.confirmed, 2);
        assert_eq!(released(&mut gate), ["c", "d0"]);
        assert_eq!(gate.held_bytes, 0);
    }

    #[test]
    fn pings_are_answered_in_order_and_confirm_what_was_written_before_each() {
        let mut gate = ReadAhead::new(8, 1 << 20);
        gate.delivered = 8;
        gate.written = 3;
        gate.ping_sent();
        gate.written = 8;
        gate.ping_sent();
        gate.pong();
        assert_eq!(gate.confirmed, 3);
        gate.pong();
        assert_eq!(gate.confirmed, 8);
        gate.pong(); // an answer without a recorded ping confirms nothing more
        assert_eq!(gate.confirmed, 8);
    }

    #[test]
    fn no_pings_while_well_within_the_bound() {
        let mut gate = ReadAhead::new(1000, 1 << 20);
        gate.delivered = 100;
        gate.written = 100;
        assert!(
            !gate.wants_ping(),
            "a broker with a window of 100 never needs one"
        );
        gate.delivered = 500;
        assert!(gate.wants_ping());
    }

    #[test]
    fn once_held_messages_fill_the_cap_later_ones_are_left_with_the_broker() {
        let topic = "fleetgw/d/telemetry";
        let mut gate = ReadAhead::new(1, 2 * (topic.len() + 1));
        let mut left = Vec::new();
        for m in ["a", "b", "c", "d"] {
            let publish = Publish::new(topic, QoS::AtLeastOnce, m.as_bytes().to_vec());
            if gate.leave_with_broker(&publish) {
                left.push(m);
            } else {
                gate.hold(publish, AckHandle::not_required());
            }
            let _ = gate.release();
        }
        // "a" goes to the consumer, "b" and "c" fill the cap, "d" stays with the broker.
        assert_eq!(left, ["d"]);
        assert!(gate.discarding);
        assert_eq!(gate.held.len(), 2);
        // Everything after a left message is left too: its PUBACK would overtake.
        let small = Publish::new(topic, QoS::AtLeastOnce, Vec::new());
        gate.held.clear();
        gate.held_bytes = 0;
        assert!(gate.leave_with_broker(&small));
        assert_eq!(gate.discarded, 2);
        gate.reset();
        assert!(!gate.discarding && gate.discarded == 0 && gate.delivered == 0);
    }
}
