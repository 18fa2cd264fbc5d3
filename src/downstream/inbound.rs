//! The one dispatch point for device messages: where the gateway session hands each
//! [`DownstreamMessage`], either one queue for one consumer or, routed by its [`DeviceTopic`],
//! the provisioning queue (the provisioning engine) or the telemetry queue (the telemetry
//! pipeline).
//!
//! The session's own task routes each message as it reads it (the in-process reader or the
//! MQTT event loop); there is no routing task and no queue in between, so a message takes one
//! hand-over from the session to its consumer.
//!
//! The two queues are bounded, each with its own backpressure, so neither consumer can stall
//! the other:
//! - telemetry keeps flow control: the session waits for room in the telemetry queue and the
//!   broker holds the devices' messages (and, with the embedded broker, their PUBACKs) until
//!   the pipeline catches up;
//! - a provisioning request that finds its queue full is not waited for (that would hold the
//!   telemetry behind it): it is answered on its `/rejected` topic with 503 `GatewayBusy`,
//!   which devices retry like any 429/5xx, acknowledged, and counted
//!   ([`DownstreamSession::busy_requests`](super::DownstreamSession::busy_requests));
//! - a consumer that stopped leaves its messages unacknowledged with the broker (they come
//!   again on the next run) while the other queue goes on; the session stops once no consumer
//!   is left.
//!
//! Acks still leave in arrival order (the session orders them), so each consumer acks once it
//! has persisted a message, whichever queue it came through.

use tokio::sync::mpsc::{self, error::TrySendError};

use super::{DeviceTopic, DownstreamMessage};

/// The consumers' ends of the two queues.
#[derive(Debug)]
pub struct InboundQueues {
    /// Provisioning requests, for the provisioning engine.
    pub provisioning: mpsc::Receiver<DownstreamMessage>,
    /// Telemetry, for the telemetry pipeline.
    pub telemetry: mpsc::Receiver<DownstreamMessage>,
}

/// Where the gateway session hands device messages; owned by the session's task.
///
/// Like an mpsc sender's, its errors give the message back by value: a move, not an
/// allocation, on the path every device message takes.
#[derive(Debug)]
pub(crate) enum Sink {
    /// Every message to one consumer.
    One(mpsc::Sender<DownstreamMessage>),
    /// Provisioning requests and telemetry to their own queues.
    Routed(Routes),
}

#[derive(Debug)]
pub(crate) struct Routes {
    provisioning: mpsc::Sender<DownstreamMessage>,
    telemetry: mpsc::Sender<DownstreamMessage>,
    /// The provisioning queue was full at the last request (one warning per episode).
    busy: bool,
}

/// A message the sink did not take.
#[derive(Debug)]
pub(crate) enum NotTaken {
    /// Its queue is full: QoS 1 waits for room ([`Sink::send`]), QoS 0 may be dropped.
    Full(DownstreamMessage),
    /// Not taken whatever the wait.
    Refused(Refusal),
}

/// Why the sink refused a message.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// A provisioning request that found its queue full: the session answers it with 503
    /// `GatewayBusy` and acknowledges it.
    Busy(DownstreamMessage),
    /// Its consumer stopped: the message stays unacknowledged with the broker. `last` when no
    /// consumer is left, and the session stops.
    Gone {
        /// The message.
        message: DownstreamMessage,
        /// No consumer is left.
        last: bool,
    },
}

impl Sink {
    /// One queue of `capacity` messages for every device message.
    pub(crate) fn one(capacity: usize) -> (Self, mpsc::Receiver<DownstreamMessage>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self::One(tx), rx)
    }

    /// A provisioning queue and a telemetry queue of `capacity` messages each.
    pub(crate) fn routed(capacity: usize) -> (Self, InboundQueues) {
        let (provisioning, provisioning_rx) = mpsc::channel(capacity.max(1));
        let (telemetry, telemetry_rx) = mpsc::channel(capacity.max(1));
        let routes = Routes {
            provisioning,
            telemetry,
            busy: false,
        };
        let queues = InboundQueues {
            provisioning: provisioning_rx,
            telemetry: telemetry_rx,
        };
        (Self::Routed(routes), queues)
    }

    /// Hands `message` to its queue if that has room.
    #[allow(clippy::result_large_err)]
    pub(crate) fn try_send(&mut self, message: DownstreamMessage) -> Result<(), NotTaken> {
        match self {
            Self::One(tx) => tx.try_send(message).map_err(|e| match e {
                TrySendError::Full(message) => NotTaken::Full(message),
                TrySendError::Closed(message) => NotTaken::Refused(Refusal::Gone {
                    message,
                    last: true,
                }),
            }),
            Self::Routed(routes) => routes.try_send(message),
        }
    }

    /// Waits for room in `message`'s queue (for what [`try_send`](Self::try_send) found
    /// full). Cancel-safe: dropped while waiting, the message is dropped with it.
    #[allow(clippy::result_large_err)]
    pub(crate) async fn send(&mut self, message: DownstreamMessage) -> Result<(), Refusal> {
        let (tx, other) = match self {
            Self::One(tx) => (&*tx, None),
            Self::Routed(routes) => match message.topic {
                // Never waited for: refused as busy when full.
                DeviceTopic::ProvisionRequest { .. } => {
                    return match routes.try_send(message) {
                        Ok(()) => Ok(()),
                        Err(NotTaken::Full(message)) => Err(Refusal::Busy(message)),
                        Err(NotTaken::Refused(refusal)) => Err(refusal),
                    }
                }
                _ => (&routes.telemetry, Some(&routes.provisioning)),
            },
        };
        tx.send(message)
            .await
            .map_err(|mpsc::error::SendError(message)| Refusal::Gone {
                message,
                last: other.is_none_or(|o| o.is_closed()),
            })
    }
}

impl Routes {
    #[allow(clippy::result_large_err)]
    fn try_send(&mut self, message: DownstreamMessage) -> Result<(), NotTaken> {
        if !matches!(message.topic, DeviceTopic::ProvisionRequest { .. }) {
            return self.telemetry.try_send(message).map_err(|e| match e {
                TrySendError::Full(message) => NotTaken::Full(message),
                TrySendError::Closed(message) => NotTaken::Refused(Refusal::Gone {
                    message,
                    last: self.provisioning.is_closed(),
                }),
            });
        }
        match self.provisioning.try_send(message) {
            Ok(()) => {
                self.busy = false;
                Ok(())
            }
            Err(TrySendError::Full(message)) => {
                if !self.busy {
                    tracing::warn!(
                        capacity = self.provisioning.max_capacity(),
                        "provisioning queue full: refusing further requests with 503 GatewayBusy until the engine catches up"
                    );
                }
                self.busy = true;
                if let DeviceTopic::ProvisionRequest { device, .. } = &message.topic {
                    tracing::debug!(%device, "provisioning request refused: queue full");
                }
                Err(NotTaken::Refused(Refusal::Busy(message)))
            }
            Err(TrySendError::Closed(message)) => Err(NotTaken::Refused(Refusal::Gone {
                message,
                last: self.telemetry.is_closed(),
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::device_id::DeviceId;
    use crate::downstream::{AckHandle, PayloadFormat, QoS};

    fn message(topic: DeviceTopic) -> DownstreamMessage {
        DownstreamMessage {
            topic,
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtLeastOnce,
            dup: false,
            ack: AckHandle::not_required(),
            properties: None,
            received_at: None,
        }
    }

    fn request(id: &str) -> DownstreamMessage {
        message(DeviceTopic::ProvisionRequest {
            device: DeviceId::parse(id).expect("device id"),
            format: PayloadFormat::Json,
        })
    }

    fn telemetry(id: &str) -> DownstreamMessage {
        message(DeviceTopic::Telemetry {
            device: DeviceId::parse(id).expect("device id"),
            subtopic: None,
        })
    }

    fn device(m: &DownstreamMessage) -> &str {
        let (DeviceTopic::ProvisionRequest { device, .. } | DeviceTopic::Telemetry { device, .. }) =
            &m.topic;
        device.as_str()
    }

    #[test]
    fn a_full_provisioning_queue_refuses_requests_and_lets_telemetry_through() {
        let (mut sink, mut queues) = Sink::routed(1);
        // The engine does not read: the first request fills its queue.
        assert!(sink.try_send(request("a")).is_ok());
        for id in ["b", "c"] {
            match sink.try_send(request(id)) {
                Err(NotTaken::Refused(Refusal::Busy(m))) => assert_eq!(device(&m), id),
                other => panic!("request {id}: {other:?}"),
            }
            let t = telemetry(id);
            assert!(sink.try_send(t).is_ok(), "telemetry of {id} is taken");
            let got = queues.telemetry.try_recv().expect("telemetry queued");
            assert_eq!(device(&got), id);
        }
        let queued = queues.provisioning.try_recv().expect("request a queued");
        assert_eq!(device(&queued), "a");
        assert!(queues.provisioning.try_recv().is_err(), "only a was queued");

        // Room again: the next request is queued, not refused.
        assert!(sink.try_send(request("d")).is_ok());
        let queued = queues.provisioning.try_recv().expect("request d queued");
        assert_eq!(device(&queued), "d");
    }

    #[tokio::test]
    async fn telemetry_waits_for_room_and_a_request_never_does() {
        let (mut sink, mut queues) = Sink::routed(1);
        assert!(sink.try_send(telemetry("a")).is_ok());
        let Err(NotTaken::Full(b)) = sink.try_send(telemetry("b")) else {
            panic!("the telemetry queue is full");
        };
        assert!(sink.try_send(request("r")).is_ok());
        let Err(Refusal::Busy(_)) = sink.send(request("s")).await else {
            panic!("a request finding its queue full is refused, not waited for");
        };
        // The consumer takes one: the waiting message gets its room.
        let (sent, first) = tokio::join!(sink.send(b), queues.telemetry.recv());
        assert!(sent.is_ok());
        assert_eq!(device(&first.expect("a")), "a");
        assert_eq!(device(&queues.telemetry.recv().await.expect("b")), "b");
    }

    #[tokio::test]
    async fn a_stopped_consumer_leaves_the_other_queue_running() {
        let (mut sink, queues) = Sink::routed(4);
        let InboundQueues {
            provisioning,
            telemetry: mut telemetry_rx,
        } = queues;
        drop(provisioning);
        match sink.try_send(request("a")) {
            Err(NotTaken::Refused(Refusal::Gone { message, last })) => {
                assert_eq!(device(&message), "a");
                assert!(!last, "telemetry still runs");
            }
            other => panic!("{other:?}"),
        }
        assert!(sink.try_send(telemetry("a")).is_ok());
        assert_eq!(device(&telemetry_rx.recv().await.expect("queued")), "a");

        drop(telemetry_rx);
        let Err(Refusal::Gone { last: true, .. }) = sink.send(telemetry("b")).await else {
            panic!("no consumer is left");
        };
    }

    #[test]
    fn one_queue_takes_every_kind_in_order() {
        let (mut sink, mut rx) = Sink::one(4);
        for m in [request("a"), telemetry("a"), request("b")] {
            assert!(sink.try_send(m).is_ok());
        }
        let order: Vec<(bool, String)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|m| {
                let request = matches!(m.topic, DeviceTopic::ProvisionRequest { .. });
                (request, device(&m).to_string())
            })
            .collect();
        let expected = [(true, "a"), (false, "a"), (true, "b")].map(|(r, d)| (r, d.to_string()));
        assert_eq!(order, expected);
        drop(rx);
        let Err(NotTaken::Refused(Refusal::Gone { last: true, .. })) =
            sink.try_send(telemetry("c"))
        else {
            panic!("the consumer is gone");
        };
    }
}
