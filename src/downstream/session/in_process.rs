//! The gateway session on the embedded broker: in-process, through the broker's
//! [`LocalClient`] (see `broker/local.rs` for why no network client can reach it).
//!
//! One task takes what the broker's window allows and hands each message, screened as the
//! MQTT session screens them (`screen`), to the consumer. An ack frees the message's window
//! slot and completes its publisher's end-to-end wait directly; there are no PUBACKs to order,
//! no read-ahead to bound and no reconnects to settle: the broker's session state and this
//! task live and die with the same process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Notify;

use super::ack::AckHandle;
use super::screen::Screen;
use super::{DownstreamMessage, QoS};
use crate::downstream::broker::{LocalClient, LocalDelivery};
use crate::downstream::inbound::{NotTaken, Sink};

/// The in-process link, shared by the session handle, its ack handles and the reader.
#[derive(Debug)]
pub(super) struct InProcess {
    pub(super) client: Arc<LocalClient>,
    pub(super) closed: AtomicBool,
    pub(super) shutdown: Notify,
}

impl InProcess {
    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Stops the reader and detaches from the broker; what is unacknowledged stays in the
    /// broker's session for the next attachment.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.shutdown.notify_one();
    }
}

/// The task that hands the broker's deliveries to the consumer.
pub(super) struct Reader {
    pub(super) link: Arc<InProcess>,
    pub(super) screen: Screen,
    pub(super) sink: Sink,
}

impl Reader {
    pub(super) async fn run(mut self) {
        let mut batch = Vec::new();
        'reading: loop {
            if self.link.is_closed() || !self.link.client.take(&mut batch) {
                break;
            }
            if batch.is_empty() {
                tokio::select! {
                    _ = self.link.client.woken() => continue,
                    _ = self.link.shutdown.notified() => break,
                }
            }
            for delivery in batch.drain(..) {
                if !self.deliver(delivery).await {
                    break 'reading;
                }
            }
        }
        // Deliveries taken but not handed over stay in flight in the broker's session, which
        // the next attachment resumes (DUP set).
    }

    /// Screens one delivery and hands it over. Returns false when the reader should stop.
    async fn deliver(&mut self, d: LocalDelivery) -> bool {
        let client = &self.link.client;
        let ack = if d.qos == 0 {
            AckHandle::not_required()
        } else {
            AckHandle::in_process(client.clone(), d.pkid)
        };
        let reply = |topic: String, payload: Vec<u8>| {
            client.publish(&topic, Bytes::from(payload), false);
        };
        let Some(topic) = self
            .screen
            .check(&d.topic, d.retain, d.payload.len(), reply)
        else {
            ack.ack();
            return true;
        };
        let qos = if d.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let message = DownstreamMessage {
            topic,
            payload: d.payload,
            qos,
            dup: d.dup,
            ack,
            properties: d.properties,
            received_at: d.published_at,
        };
        let refusal = match self.sink.try_send(message) {
            Ok(()) => return true,
            Err(NotTaken::Full(message)) if message.qos == QoS::AtMostOnce => {
                self.screen
                    .common
                    .dropped_qos0
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!("downstream consumer busy: QoS 0 message dropped");
                return true;
            }
            // QoS 1 waits for room: the broker's window holds the rest back.
            Err(NotTaken::Full(message)) => tokio::select! {
                sent = self.sink.send(message) => match sent {
                    Ok(()) => return true,
                    Err(refusal) => refusal,
                },
                _ = self.link.shutdown.notified() => return false,
            },
            Err(NotTaken::Refused(refusal)) => refusal,
        };
        self.screen.settle(refusal, reply)
    }
}
