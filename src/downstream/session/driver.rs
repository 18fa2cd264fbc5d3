//! The task that owns rumqttc's event loop: polls it, writes the PUBACKs, resubscribes on
//! every CONNACK, reconnects with backoff, validates inbound messages and hands them to the
//! consumer through the read-ahead, and settles what a lost connection leaves behind.
//!
//! Redelivery and duplicates. Each message belongs to the connection that carried it. When a
//! connection drops, the broker resends everything the gateway had not acknowledged (some
//! brokers, rumqttd among them, with new packet ids and DUP=0, so `dup` cannot tell a copy from
//! a new message), and the consumer may see those messages twice: at most `max_unconfirmed`
//! (or the broker's in-flight window, if smaller) per lost connection, the price of QoS 1.
//! Messages read but not handed over when the connection drops (held by the read-ahead, or
//! read in the same read that ended with the loss) wait for the next CONNACK: a broker that
//! resumed the session resends them all (MQTT 3.1.1 §4.4), so they are dropped; one that did
//! not will never send them again, so the consumer gets them then, with stale acks. Left in
//! rumqttc's event buffer they would surface after the next CONNACK and be acknowledged there
//! under their old packet ids: a broker that renumbers redeliveries takes that as an
//! out-of-order ack and drops the connection again (rumqttd did, in a storm that appended one
//! device's backlog to the outbox thousands of times), or as the ack of a message the gateway
//! has not stored.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rumqttc::{
    ConnectionError, Event, EventLoop, Incoming, Outgoing, Packet, PubAck, PubRec, Publish,
    Request, Subscribe, SubscribeFilter, SubscribeReasonCode,
};

use super::ack::{AckEntry, AckHandle, AckQueue, AckSlot};
use super::read_ahead::ReadAhead;
use super::screen::Screen;
use super::shared::Shared;
use super::{DownstreamMessage, QoS};
use crate::backoff::Backoff;
use crate::downstream::inbound::{NotTaken, Sink};
use crate::downstream::topics::{DeviceTopic, TopicPrefix};
use crate::mqtt::client_ext;

/// Owns the event loop; runs in its own task.
pub(super) struct Driver {
    pub(super) shared: Arc<Shared>,
    pub(super) eventloop: EventLoop,
    pub(super) sink: Sink,
    pub(super) prefix: TopicPrefix,
    pub(super) screen: Screen,
    pub(super) filters: Vec<String>,
    pub(super) backoff: Backoff,
    pub(super) max_packet_bytes: usize,
    pub(super) gate: ReadAhead,
    /// Messages of a lost connection that were read but not handed over (see
    /// `Driver::on_connection_lost`); settled by the next CONNACK.
    pub(super) orphans: Vec<(Publish, AckHandle)>,
}

impl Driver {
    pub(super) async fn run(mut self) {
        loop {
            self.write_acks().await;
            self.resume_left_messages();
            match self.eventloop.poll().await {
                Ok(Event::Incoming(incoming)) => {
                    if !self.on_incoming(incoming).await {
                        break;
                    }
                }
                Ok(Event::Outgoing(outgoing)) => {
                    if self.on_outgoing(outgoing) {
                        break;
                    }
                }
                Err(e) => {
                    if self.shared.lock().closed {
                        break;
                    }
                    if !self.on_connection_lost(&e).await {
                        break;
                    }
                    let delay = self.backoff.next_delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "downstream broker connection lost");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shared.shutdown.notified() => break,
                    }
                }
            }
        }
        self.settle_on_exit();
        let mut inner = self.shared.lock();
        inner.closed = true;
        inner.confirms.fail_all();
        drop(inner);
        self.shared.room.notify_waiters();
        self.shared.common.status.send_modify(|s| {
            s.connected = false;
            s.subscribed = false;
        });
    }

    /// Returns false when the session should stop.
    async fn on_incoming(&mut self, incoming: Incoming) -> bool {
        match incoming {
            Incoming::ConnAck(ack) => {
                self.backoff.reset();
                if !self.settle_orphans(ack.session_present).await {
                    return false;
                }
                if !ack.session_present {
                    // rumqttc dropped its pending publishes: their callers learn it now.
                    let mut inner = self.shared.lock();
                    let c = &mut inner.confirms;
                    let lost = c
                        .previous
                        .drain(..)
                        .chain(c.by_pkid.drain().map(|(_, w)| w))
                        .chain(c.collided.take().map(|(_, w)| w));
                    for w in lost {
                        let _ = w.send(Err(()));
                    }
                }
                let filters = self
                    .filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                // Ahead of everything else, including retransmissions of the last session.
                client_ext::send_first(
                    &mut self.eventloop,
                    Request::Subscribe(Subscribe::new_many(filters)),
                );
                tracing::info!(
                    session_present = ack.session_present,
                    "downstream broker connected"
                );
                self.shared.common.status.send_modify(|s| {
                    s.connected = true;
                    s.subscribed = false;
                    s.connections += 1;
                });
            }
            Incoming::SubAck(ack) => {
                let refused: Vec<&str> = ack
                    .return_codes
                    .iter()
                    .zip(&self.filters)
                    .filter(|(code, _)| matches!(code, SubscribeReasonCode::Failure))
                    .map(|(_, f)| f.as_str())
                    .collect();
                if refused.is_empty() {
                    self.shared.common.status.send_modify(|s| {
                        s.subscribed = true;
                    });
                } else {
                    let msg = format!(
                        "the downstream broker refused the subscription to {}; check its ACL for the gateway user",
                        refused.join(", ")
                    );
                    tracing::error!("{msg}");
                    self.shared
                        .common
                        .status
                        .send_modify(|s| s.last_error = Some(msg));
                }
            }
            Incoming::Publish(publish) => return self.on_publish(publish).await,
            Incoming::PingResp => {
                self.gate.pong();
                if !self.release_held().await {
                    return false;
                }
            }
            Incoming::PubAck(ack) => {
                if let Some(w) = self.shared.lock().confirms.by_pkid.remove(&ack.pkid) {
                    let _ = w.send(Ok(()));
                }
            }
            _ => {}
        }
        self.flush();
        true
    }

    /// Returns true when the session should stop (DISCONNECT sent by `shutdown`).
    fn on_outgoing(&mut self, outgoing: Outgoing) -> bool {
        let closed = {
            let mut inner = self.shared.lock();
            let c = &mut inner.confirms;
            match outgoing {
                // A known id is a retransmission after reconnect: its waiter is registered.
                Outgoing::Publish(pkid) if pkid != 0 && !c.by_pkid.contains_key(&pkid) => {
                    let waiter = match c.collided.take() {
                        Some((id, w)) if id == pkid => Some(w),
                        other => {
                            c.collided = other;
                            c.next_unassigned()
                        }
                    };
                    match waiter {
                        Some(w) => {
                            c.by_pkid.insert(pkid, w);
                        }
                        None => tracing::debug!(pkid, "publish without a waiting caller"),
                    }
                }
                Outgoing::AwaitAck(pkid) => {
                    if let Some(w) = c.next_unassigned() {
                        c.collided = Some((pkid, w));
                    }
                }
                // The wake-up ack went out: the loop may write the next ones itself.
                Outgoing::PubAck(_) | Outgoing::PubRec(_) => {
                    inner.acks.in_channel = inner.acks.in_channel.saturating_sub(1);
                    self.gate.written += 1;
                }
                // rumqttc's keep-alive ping: its answer confirms the acks written before it.
                // rumqttc reports it from the poll that wrote it, before any further ack.
                Outgoing::PingReq => self.gate.ping_sent(),
                _ => {}
            }
            inner.queue_disconnect(&self.shared.client);
            inner.closed
        };
        self.shared.room.notify_waiters();
        // A DISCONNECT without shutdown asked for redelivery: the broker closes the
        // connection, the next poll fails and the session reconnects.
        closed && matches!(outgoing, Outgoing::Disconnect)
    }

    fn flush(&self) {
        self.shared.lock().queue_disconnect(&self.shared.client);
        self.shared.room.notify_waiters();
    }

    /// Writes the PUBACKs of every message the consumer has acknowledged, in arrival order,
    /// straight into the connection (not through rumqttc's request channel, which it drains
    /// one request per turn: see `ack`), followed by a PINGREQ when the read-ahead
    /// needs a confirmation. A write error means the connection is gone: the next poll
    /// reports it, and the broker redelivers what was not acknowledged.
    async fn write_acks(&mut self) {
        let Some(mut network) = client_ext::direct_writer(&mut self.eventloop) else {
            return;
        };
        let done = self.shared.lock().acks.take_done();
        for (qos, pkid) in &done {
            let packet = match qos {
                QoS::ExactlyOnce => Packet::PubRec(PubRec::new(*pkid)),
                _ => Packet::PubAck(PubAck::new(*pkid)),
            };
            if let Err(e) = network.write(packet).await {
                tracing::debug!(error = %e, "writing PUBACKs to the downstream broker");
                return;
            }
            self.gate.written += 1;
        }
        let ping = self.gate.wants_ping();
        if ping {
            if let Err(e) = network.write(Packet::PingReq).await {
                tracing::debug!(error = %e, "writing a PINGREQ to the downstream broker");
                return;
            }
            self.gate.ping_sent();
        }
        if done.is_empty() && !ping {
            return;
        }
        if let Err(e) = network.flush().await {
            tracing::debug!(error = %e, "flushing PUBACKs to the downstream broker");
        }
    }

    /// Closes the books of a lost connection. Returns false when the session should stop.
    async fn on_connection_lost(&mut self, error: &ConnectionError) -> bool {
        // rumqttc parses a whole batch of packets per read and keeps them in `state.events`;
        // when the same read ends in an error (the broker closed the stream right behind them),
        // it hands them out only after the next CONNACK, as if they came on the new connection.
        // A PUBLISH of the old connection would then be acknowledged there with its old packet
        // id: a broker that renumbered its redeliveries (rumqttd) takes that as an out-of-order
        // ack and drops the connection again, with another window of messages unread, and every
        // round hands the same messages to the consumer once more (a redelivery storm: 15,841
        // duplicates of one device in a benchmark); another broker could take it as the ack of
        // a different message. So they are settled here, as belonging to the old connection.
        let stale: Vec<Event> = client_ext::take_buffered_events(&mut self.eventloop);
        let mut stale_publishes = Vec::new();
        for event in stale {
            match event {
                // Packet ids rumqttc assigned before the loss: pair them as usual.
                Event::Outgoing(outgoing) => {
                    self.on_outgoing(outgoing);
                }
                // The broker did confirm these publishes of the gateway.
                Event::Incoming(Incoming::PubAck(ack)) => {
                    if let Some(w) = self.shared.lock().confirms.by_pkid.remove(&ack.pkid) {
                        let _ = w.send(Ok(()));
                    }
                }
                Event::Incoming(Incoming::Publish(publish)) => stale_publishes.push(publish),
                // CONNACK, SUBACK and PINGRESP of a dead connection say nothing about the next.
                Event::Incoming(_) => {}
            }
        }
        let held = self.gate.reset();
        let lost_generation = {
            let mut inner = self.shared.lock();
            let lost = inner.generation;
            inner.generation += 1;
            inner.redelivery_requested = false;
            inner.acks = AckQueue::default();
            let queued: Vec<_> = inner.confirms.queued.drain(..).collect();
            inner.confirms.previous.extend(queued);
            // poll() already moved the request channel into rumqttc's pending list and dropped
            // its PUBACKs; an ack or publish that slipped into the channel after that, but
            // before the generation changed above, is moved (or dropped) here, under the lock.
            client_ext::move_requests_to_pending(&mut self.eventloop);
            lost
        };
        self.shared.room.notify_waiters();
        self.shared.common.status.send_modify(|s| {
            s.connected = false;
            s.subscribed = false;
            s.last_error = Some(error.to_string());
        });
        // Read but never acknowledged: messages the read-ahead held back, and those of the
        // read that ended with the loss (whose acks are stale now). Whether the consumer gets
        // them depends on the next CONNACK (see `settle_orphans`). Held ones come first: they
        // arrived earlier.
        self.orphans.extend(held);
        for publish in stale_publishes {
            let ack = if publish.qos == QoS::AtMostOnce {
                AckHandle::not_required()
            } else {
                AckHandle::in_queue(AckSlot {
                    shared: self.shared.clone(),
                    generation: lost_generation,
                    seq: 0,
                })
            };
            self.orphans.push((publish, ack));
        }
        true
    }

    /// Decides, on a CONNACK, about the messages read on the lost connection but never handed
    /// over. A broker that resumed the session resends every one of them (MQTT 3.1.1 §4.4), so
    /// they are dropped: handing them over as well would store each twice. A broker that did
    /// not keep the session will never send them again, so the consumer gets them now (their
    /// acks are stale: the PUBACK is never sent). Returns false when the session should stop.
    async fn settle_orphans(&mut self, session_present: bool) -> bool {
        if self.orphans.is_empty() {
            return true;
        }
        let orphans = std::mem::take(&mut self.orphans);
        if session_present {
            tracing::debug!(
                messages = orphans.len(),
                "downstream messages read but not handed over before the connection was lost; the broker resends them"
            );
            return true;
        }
        tracing::info!(
            messages = orphans.len(),
            "the downstream broker did not keep the session: handing over the messages read before the connection was lost"
        );
        for (publish, ack) in orphans {
            if !self.deliver(publish, ack).await {
                return false;
            }
        }
        true
    }

    /// The session stops. Messages held back on a live connection stay with the broker (the
    /// session survives a DISCONNECT and they come again on the next start). Those of a lost
    /// connection without a CONNACK since go to the consumer if it has room, as they would
    /// have had the broker not kept the session: nobody can tell any more. Never waits: the
    /// consumer may be stopping too.
    fn settle_on_exit(&mut self) {
        self.gate.reset();
        for (publish, ack) in std::mem::take(&mut self.orphans) {
            let Ok(topic) = DeviceTopic::parse(&self.prefix, &publish.topic) else {
                continue;
            };
            if self
                .sink
                .try_send(DownstreamMessage::new(topic, publish, ack))
                .is_err()
            {
                tracing::debug!(
                    "downstream session stopping: messages of the lost connection left to the broker"
                );
                break;
            }
        }
    }

    /// After messages were left with the broker: once every held message is handed over and
    /// its PUBACK written, disconnects cleanly (the broker keeps the session and processes the
    /// PUBACKs before the DISCONNECT), and the reconnect gets the left messages again.
    fn resume_left_messages(&mut self) {
        if !self.gate.discarding || !self.gate.held.is_empty() {
            return;
        }
        let mut inner = self.shared.lock();
        if !inner.acks.entries.is_empty()
            || inner.acks.in_channel > 0
            || inner.redelivery_requested
            || inner.closed
        {
            return;
        }
        if self.shared.client.try_disconnect().is_ok() {
            inner.redelivery_requested = true;
            tracing::info!(
                messages = self.gate.discarded,
                "downstream: held messages stored; reconnecting for the messages left with the broker"
            );
        }
    }

    /// Hands held messages to the consumer, in arrival order, as far as the read-ahead allows.
    /// Returns false when the session should stop.
    async fn release_held(&mut self) -> bool {
        while let Some((publish, ack)) = self.gate.release() {
            if !self.deliver(publish, ack).await {
                return false;
            }
        }
        true
    }

    /// Returns false when the session should stop.
    async fn on_publish(&mut self, publish: Publish) -> bool {
        if self.gate.leave_with_broker(&publish) {
            // Never acknowledged, so the broker keeps it; no ack entry either, so the acks of
            // the held messages still go out.
            if publish.qos == QoS::AtMostOnce {
                self.shared
                    .common
                    .dropped_qos0
                    .fetch_add(1, Ordering::Relaxed);
            }
            self.resume_left_messages();
            return true;
        }
        let ack = if publish.qos == QoS::AtMostOnce {
            AckHandle::not_required()
        } else {
            let mut inner = self.shared.lock();
            let seq = inner.acks.head_seq + inner.acks.entries.len() as u64;
            inner.acks.entries.push_back(AckEntry {
                qos: publish.qos,
                pkid: publish.pkid,
                done: false,
            });
            AckHandle::in_queue(AckSlot {
                shared: self.shared.clone(),
                generation: inner.generation,
                seq,
            })
        };
        // Through the queue of held messages, so a device's order is kept whatever waits.
        self.gate.hold(publish, ack);
        self.release_held().await
    }

    /// Validates a device message and hands it to the consumer with `ack`. Returns false when
    /// the session should stop.
    async fn deliver(&mut self, publish: Publish, ack: AckHandle) -> bool {
        let shared = &self.shared;
        let max_packet_bytes = self.max_packet_bytes;
        // From inside the event loop a `/rejected` answer is queued without waiting for its
        // PUBACK (waiting here would stall the loop that receives that PUBACK).
        let reply = |topic: String, payload: Vec<u8>| {
            shared.queue_rejection(topic, payload, max_packet_bytes);
        };
        let Some(topic) =
            self.screen
                .check(&publish.topic, publish.retain, publish.payload.len(), reply)
        else {
            ack.ack();
            return true;
        };
        let refusal = match self
            .sink
            .try_send(DownstreamMessage::new(topic, publish, ack))
        {
            Ok(()) => return true,
            Err(NotTaken::Full(message)) if message.qos == QoS::AtMostOnce => {
                self.shared
                    .common
                    .dropped_qos0
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("downstream consumer busy: QoS 0 message dropped");
                return true;
            }
            Err(NotTaken::Full(message)) => {
                // QoS 1 must not be dropped; this blocks the event loop (and keep-alive), which
                // only happens when inbound_capacity is below the broker's in-flight window.
                tracing::warn!("downstream consumer queue full; event loop waits for it");
                match self.sink.send(message).await {
                    Ok(()) => return true,
                    Err(refusal) => refusal,
                }
            }
            Err(NotTaken::Refused(refusal)) => refusal,
        };
        self.screen.settle(refusal, reply)
    }
}
