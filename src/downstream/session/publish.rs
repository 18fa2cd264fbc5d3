//! The gateway's own publishes to devices. `publish_*` return once the broker has acknowledged
//! the PUBLISH (QoS 1 PUBACK), so the provisioning engine can record "response delivered".
//! rumqttc 0.25 has no completion handles; PUBACKs are matched to callers by following the
//! packet ids rumqttc reports as it sends (requests leave its channel in order; retransmissions
//! reuse known ids).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::{timeout_at, Instant};

use super::shared::Shared;
use super::{DownstreamSession, Link, QoS, SessionError};
use crate::device_id::DeviceId;
use crate::downstream::contract::{self, RejectedResponse, StatusReport};
use crate::downstream::topics::PayloadFormat;
use crate::mqtt::props::MessageProperties;

/// Told the outcome of one publish: `Ok` on its PUBACK, `Err` when it was lost.
pub(super) type Waiter = oneshot::Sender<Result<(), ()>>;

/// Callers waiting for the PUBACK of their publish, matched by packet id.
#[derive(Debug, Default)]
pub(super) struct Confirms {
    /// Publishes queued on this connection, not yet given a packet id by rumqttc.
    pub(super) queued: VecDeque<Waiter>,
    /// Publishes queued before the last disconnect (now in rumqttc's pending list, resent first).
    pub(super) previous: VecDeque<Waiter>,
    /// Publishes sent, awaiting PUBACK.
    pub(super) by_pkid: HashMap<u16, Waiter>,
    /// A publish rumqttc holds back because its packet id is still in flight.
    pub(super) collided: Option<(u16, Waiter)>,
}

impl Confirms {
    pub(super) fn next_unassigned(&mut self) -> Option<Waiter> {
        self.previous
            .pop_front()
            .or_else(|| self.queued.pop_front())
    }

    pub(super) fn fail_all(&mut self) {
        let waiters = self
            .previous
            .drain(..)
            .chain(self.queued.drain(..))
            .chain(self.by_pkid.drain().map(|(_, w)| w))
            .chain(self.collided.take().map(|(_, w)| w));
        for w in waiters {
            let _ = w.send(Err(()));
        }
    }
}

impl DownstreamSession {
    /// Publishes the final provisioning result to `{p}/{id}/provision/{fmt}/accepted`.
    pub async fn publish_accepted(
        &self,
        id: &DeviceId,
        fmt: PayloadFormat,
        payload: impl Into<Bytes>,
    ) -> Result<(), SessionError> {
        self.publish(self.prefix.accepted(id, fmt), payload.into(), false)
            .await
    }

    /// Publishes a refusal to `{p}/{id}/provision/{fmt}/rejected`.
    pub async fn publish_rejected(
        &self,
        id: &DeviceId,
        fmt: PayloadFormat,
        payload: impl Into<Bytes>,
    ) -> Result<(), SessionError> {
        self.publish(self.prefix.rejected(id, fmt), payload.into(), false)
            .await
    }

    /// Publishes a refusal built from `rejected`, encoded in `fmt`.
    pub async fn reject(
        &self,
        id: &DeviceId,
        fmt: PayloadFormat,
        rejected: &RejectedResponse,
    ) -> Result<(), SessionError> {
        self.publish_rejected(id, fmt, contract::encode(fmt, rejected))
            .await
    }

    /// Publishes the device's state retained to `{p}/{id}/status` (JSON, see [`StatusReport`]).
    pub async fn publish_status(
        &self,
        id: &DeviceId,
        report: &StatusReport,
    ) -> Result<(), SessionError> {
        self.publish(self.prefix.status(id), Bytes::from(report.to_json()), true)
            .await
    }

    /// Removes the retained status of a device (an empty retained publish).
    pub async fn clear_status(&self, id: &DeviceId) -> Result<(), SessionError> {
        self.publish(self.prefix.status(id), Bytes::new(), true)
            .await
    }

    /// Forwards a cloud-to-device message to `{p}/{id}/commands[/{subtopic}]`.
    pub async fn publish_command(
        &self,
        id: &DeviceId,
        subtopic: Option<&str>,
        payload: impl Into<Bytes>,
    ) -> Result<(), SessionError> {
        self.publish_command_with(id, subtopic, payload, None).await
    }

    /// Forwards a cloud-to-device message with the MQTT 5 properties it came with. The
    /// embedded broker hands them to MQTT 5 subscribers; an external broker is reached over
    /// MQTT 3.1.1 (rumqttc), which cannot carry them.
    pub async fn publish_command_with(
        &self,
        id: &DeviceId,
        subtopic: Option<&str>,
        payload: impl Into<Bytes>,
        properties: Option<MessageProperties>,
    ) -> Result<(), SessionError> {
        let topic = self.prefix.commands(id, subtopic)?;
        let payload = payload.into();
        match (&self.link, properties) {
            (Link::InProcess(link), Some(properties)) => {
                if payload.len() + topic.len() + properties.cost() + 8 > self.max_packet_bytes {
                    return Err(SessionError::PayloadTooLarge {
                        size: payload.len(),
                        max: self.max_packet_bytes,
                        topic,
                    });
                }
                if link.is_closed() {
                    return Err(SessionError::Closed);
                }
                link.client.publish_with(&topic, payload, false, properties);
                Ok(())
            }
            _ => self.publish(topic, payload, false).await,
        }
    }

    /// QoS 1 publish that returns once the broker acknowledged it (in-process: once it is in
    /// its subscribers' queues).
    async fn publish(
        &self,
        topic: String,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), SessionError> {
        // Topic, header and length bytes count against the packet limit too.
        if payload.len() + topic.len() + 8 > self.max_packet_bytes {
            return Err(SessionError::PayloadTooLarge {
                size: payload.len(),
                max: self.max_packet_bytes,
                topic,
            });
        }
        match &self.link {
            Link::Mqtt(shared) => self.publish_mqtt(shared, topic, payload, retain).await,
            Link::InProcess(link) => {
                if link.is_closed() {
                    return Err(SessionError::Closed);
                }
                link.client.publish(&topic, payload, retain);
                Ok(())
            }
        }
    }

    /// Publishes through rumqttc and waits for the PUBACK.
    async fn publish_mqtt(
        &self,
        shared: &Shared,
        topic: String,
        payload: Bytes,
        retain: bool,
    ) -> Result<(), SessionError> {
        let deadline = Instant::now() + self.publish_timeout;
        let timed_out = |topic: String| SessionError::PublishTimeout {
            topic,
            waited: self.publish_timeout,
        };
        let confirmed = loop {
            let room = shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut inner = shared.lock();
                if inner.closed {
                    return Err(SessionError::Closed);
                }
                // Queued and registered under one lock so the order of waiters is the order
                // rumqttc takes requests from its channel.
                if shared
                    .client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload.to_vec())
                    .is_ok()
                {
                    let (tx, rx) = oneshot::channel();
                    inner.confirms.queued.push_back(tx);
                    break rx;
                }
            }
            if timeout_at(deadline, room).await.is_err() {
                return Err(timed_out(topic));
            }
        };
        match timeout_at(deadline, confirmed).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(()))) => Err(SessionError::PublishLost { topic }),
            Ok(Err(_)) => Err(SessionError::Closed),
            Err(_) => Err(timed_out(topic)),
        }
    }
}
