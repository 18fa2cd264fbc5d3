//! The broker's in-process client: the gateway's own session.
//!
//! The gateway reads device messages from, and publishes its answers into, the router
//! directly. No listener serves this session and no network client can reach it: its client
//! id is reserved when the broker starts ([`EmbeddedBrokerOptions::in_process_client`]), and a
//! CONNECT that names it is refused before any session is looked up. So nobody can take the
//! session over, read what devices send to the gateway, or acknowledge a device's message that
//! the gateway has not stored. It also saves every message an MQTT encode, a decode and a
//! loopback hop.
//!
//! The session keeps the router's semantics: the same in-flight window (the broker's
//! `ack_after_inflight`), the same queue and the same end-to-end acknowledgement, so a device's
//! PUBACK still waits until the gateway acknowledged its message (once the message is durable).
//! The gateway may acknowledge in any order: each message's guard completes its publisher's
//! wait, and the publisher's connection sends its PUBACKs in arrival order.
//!
//! [`EmbeddedBrokerOptions::in_process_client`]: super::EmbeddedBrokerOptions::in_process_client

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::router::{Delivery, Message, Router, Session};
use super::rules::Owner;
use crate::mqtt::props::MessageProperties;
use crate::mqtt::wire::SubscriptionRequest;

/// A message delivered to the in-process session.
#[derive(Clone, Debug)]
pub struct LocalDelivery {
    /// Packet id to acknowledge it with ([`LocalClient::acknowledge`]); 0 for QoS 0.
    pub pkid: u16,
    /// Topic name.
    pub topic: Arc<str>,
    /// Payload.
    pub payload: Bytes,
    /// 0 or 1.
    pub qos: u8,
    /// Set on retained messages replayed to a new subscription, never on live ones.
    pub retain: bool,
    /// Delivered before and not acknowledged.
    pub dup: bool,
    /// MQTT 5 properties the publisher sent.
    pub properties: Option<Arc<MessageProperties>>,
    /// When the broker read it from its publisher.
    pub published_at: Option<std::time::Instant>,
}

impl LocalDelivery {
    fn from_router(pkid: u16, d: Delivery) -> Self {
        Self {
            pkid,
            topic: d.message.topic.clone(),
            payload: d.message.payload.clone(),
            qos: d.qos,
            retain: d.retain,
            dup: d.dup,
            properties: d.message.properties.clone(),
            published_at: d.message.published_at,
        }
    }
}

/// The gateway's in-process session on the embedded broker (see the module docs).
pub struct LocalClient {
    router: Arc<Router>,
    session: Arc<Session>,
    number: u64,
    window: usize,
}

impl std::fmt::Debug for LocalClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalClient")
            .field("client_id", &self.client_id())
            .field("number", &self.number)
            .field("window", &self.window)
            .finish()
    }
}

impl LocalClient {
    /// Attaches the reserved in-process session: a kept one is resumed (its unacknowledged
    /// messages come again, marked DUP), and it is kept when [`detach`](Self::detach)ed, as an
    /// MQTT session with clean session 0 would be.
    pub(super) fn attach(router: Arc<Router>, client_id: &str) -> Self {
        let number = router.connection_number();
        let attached = router.connect(
            client_id,
            Owner::Gateway,
            number,
            false,
            Some(Duration::MAX),
        );
        let window = router.window(client_id);
        Self {
            router,
            session: attached.session,
            number,
            window,
        }
    }

    /// The session's client id.
    pub fn client_id(&self) -> &str {
        self.session.client_id()
    }

    /// Subscribes at QoS 1; returns the filters the broker refused (invalid ones).
    pub fn subscribe(&self, filters: &[String]) -> Vec<String> {
        let requests: Vec<SubscriptionRequest> = filters
            .iter()
            .map(|f| SubscriptionRequest::new(f.clone(), 1))
            .collect();
        let granted = self.router.subscribe(&self.session, &requests);
        filters
            .iter()
            .zip(granted)
            .filter(|(_, g)| g.is_err())
            .map(|(f, _)| f.clone())
            .collect()
    }

    /// Moves what the window allows into flight and appends it to `out`. False once another
    /// attachment of the session took over or the session was detached.
    pub fn take(&self, out: &mut Vec<LocalDelivery>) -> bool {
        let mut taken = Vec::new();
        if !self
            .session
            .take_sendable(self.number, self.window, &mut taken)
        {
            return false;
        }
        out.extend(
            taken
                .into_iter()
                .map(|(pkid, d)| LocalDelivery::from_router(pkid, d)),
        );
        true
    }

    /// Resolves when messages were queued for the session (or it was taken over).
    pub async fn woken(&self) {
        self.session.woken().await;
    }

    /// The gateway handled the message `pkid`: its window slot is free, and its publisher's
    /// PUBACK may go.
    pub fn acknowledge(&self, pkid: u16) {
        if self.session.acknowledge(pkid) {
            // Room in the window: the reader takes the next messages.
            self.session.wake_up();
        }
    }

    /// The gateway gave message `pkid` up without handling it: it is delivered again (DUP).
    pub fn redeliver(&self, pkid: u16) {
        if self.session.requeue(self.number, pkid) {
            self.session.wake_up();
        }
    }

    /// Publishes as the gateway at QoS 1 (`retain` stores it for later subscribers); the
    /// message is in its subscribers' queues when this returns.
    pub fn publish(&self, topic: &str, payload: Bytes, retain: bool) {
        self.router.publish(
            self.client_id(),
            Message::plain(Arc::from(topic), payload, 1, retain),
        );
    }

    /// [`LocalClient::publish`] with MQTT 5 properties (a cloud command's), for MQTT 5
    /// subscribers.
    pub fn publish_with(
        &self,
        topic: &str,
        payload: Bytes,
        retain: bool,
        properties: MessageProperties,
    ) {
        let mut message = Message::plain(Arc::from(topic), payload, 1, retain);
        message.properties = (!properties.is_empty()).then(|| Arc::new(properties));
        self.router.publish(self.client_id(), message);
    }

    /// Ends this attachment; the session and what waits in it stay for the next one.
    pub fn detach(&self) {
        self.router.disconnect(&self.session, self.number, None);
        // A reader waiting for messages sees that it is no longer attached.
        self.session.wake_up();
    }
}
