//! The one dispatch point for device messages: routes each [`DownstreamMessage`] of the
//! gateway session by its [`DeviceTopic`] to the provisioning queue (the provisioning engine)
//! or the telemetry queue (the telemetry pipeline).
//!
//! The two queues are bounded, each with its own backpressure, so neither consumer can stall
//! the other:
//! - telemetry keeps flow control: the dispatch waits for room in the telemetry queue, the
//!   session's channel fills behind it and the broker holds the devices' messages (and, with
//!   the embedded broker, their PUBACKs) until the pipeline catches up;
//! - a provisioning request that finds its queue full is not waited for (that would hold the
//!   telemetry behind it): it is answered on its `/rejected` topic with 503 `GatewayBusy`,
//!   which devices retry like any 429/5xx, acknowledged, and counted
//!   ([`DownstreamSession::busy_requests`]).
//!
//! Acks still leave in arrival order (the session orders them), so each consumer acks once it
//! has persisted a message, whichever queue it came through.

use std::sync::Arc;

use tokio::sync::mpsc::{self, error::TrySendError};

use super::{DeviceTopic, DownstreamMessage, DownstreamSession};

/// The consumers' ends of the two queues.
#[derive(Debug)]
pub struct InboundQueues {
    /// Provisioning requests, for the provisioning engine.
    pub provisioning: mpsc::Receiver<DownstreamMessage>,
    /// Telemetry, for the telemetry pipeline.
    pub telemetry: mpsc::Receiver<DownstreamMessage>,
}

/// Starts routing the session's messages (`inbound`) into two queues of `capacity` messages
/// each. The routing task ends when `inbound` does.
pub fn dispatch_inbound(
    session: Arc<DownstreamSession>,
    inbound: mpsc::Receiver<DownstreamMessage>,
    capacity: usize,
) -> InboundQueues {
    let (provisioning, provisioning_rx) = mpsc::channel(capacity.max(1));
    let (telemetry, telemetry_rx) = mpsc::channel(capacity.max(1));
    let router = Router {
        session,
        provisioning,
        telemetry,
        busy: false,
    };
    tokio::spawn(router.run(inbound));
    InboundQueues {
        provisioning: provisioning_rx,
        telemetry: telemetry_rx,
    }
}

struct Router {
    session: Arc<DownstreamSession>,
    provisioning: mpsc::Sender<DownstreamMessage>,
    telemetry: mpsc::Sender<DownstreamMessage>,
    /// The provisioning queue was full at the last request (one warning per episode).
    busy: bool,
}

impl Router {
    async fn run(mut self, mut inbound: mpsc::Receiver<DownstreamMessage>) {
        while let Some(message) = inbound.recv().await {
            self.route(message).await;
        }
    }

    async fn route(&mut self, message: DownstreamMessage) {
        // A consumer that has stopped drops the message unacknowledged: the broker keeps it
        // for the next run.
        let DeviceTopic::ProvisionRequest { device, format } = &message.topic else {
            if let Err(mpsc::error::SendError(message)) = self.telemetry.send(message).await {
                drop(message);
            }
            return;
        };
        let (device, format) = (device.clone(), *format);
        match self.provisioning.try_send(message) {
            Ok(()) => self.busy = false,
            Err(TrySendError::Full(message)) => {
                if !self.busy {
                    tracing::warn!(
                        capacity = self.provisioning.max_capacity(),
                        "provisioning queue full: refusing further requests with 503 GatewayBusy until the engine catches up"
                    );
                }
                self.busy = true;
                tracing::debug!(%device, "provisioning request refused: queue full");
                self.session.refuse_busy(&device, format);
                message.ack.ack();
            }
            Err(TrySendError::Closed(message)) => drop(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::device_id::DeviceId;
    use crate::downstream::{AckHandle, PayloadFormat, QoS};

    fn message(topic: DeviceTopic) -> DownstreamMessage {
        DownstreamMessage {
            topic,
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtMostOnce,
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

    async fn recv(rx: &mut mpsc::Receiver<DownstreamMessage>) -> DownstreamMessage {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a message in time")
            .expect("queue open")
    }

    #[tokio::test]
    async fn a_full_provisioning_queue_does_not_hold_back_telemetry() {
        let session = DownstreamSession::unconnected_for_tests();
        let (tx, inbound) = mpsc::channel(16);
        let mut queues = dispatch_inbound(session.clone(), inbound, 1);
        // The engine does not read: the first request fills its queue.
        for m in [
            request("a"),
            request("b"),
            telemetry("a"),
            request("c"),
            telemetry("b"),
            telemetry("c"),
        ] {
            tx.send(m).await.expect("dispatch running");
        }
        for id in ["a", "b", "c"] {
            let m = recv(&mut queues.telemetry).await;
            assert!(
                matches!(&m.topic, DeviceTopic::Telemetry { device, .. } if device.as_str() == id),
                "{:?}",
                m.topic
            );
        }
        assert_eq!(session.busy_requests(), 2, "requests b and c were refused");
        let queued = recv(&mut queues.provisioning).await;
        assert!(
            matches!(&queued.topic, DeviceTopic::ProvisionRequest { device, .. } if device.as_str() == "a")
        );
        assert!(queues.provisioning.try_recv().is_err(), "only a was queued");

        // Room again: the next request is queued, not refused.
        tx.send(request("d")).await.expect("dispatch running");
        let queued = recv(&mut queues.provisioning).await;
        assert!(
            matches!(&queued.topic, DeviceTopic::ProvisionRequest { device, .. } if device.as_str() == "d")
        );
        assert_eq!(session.busy_requests(), 2);
        session.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_stopped_consumer_leaves_the_other_queue_running() {
        let session = DownstreamSession::unconnected_for_tests();
        let (tx, inbound) = mpsc::channel(16);
        let queues = dispatch_inbound(session.clone(), inbound, 4);
        let InboundQueues {
            provisioning,
            telemetry: mut telemetry_rx,
        } = queues;
        drop(provisioning);
        tx.send(request("a")).await.expect("dispatch running");
        tx.send(telemetry("a")).await.expect("dispatch running");
        let m = recv(&mut telemetry_rx).await;
        assert!(matches!(m.topic, DeviceTopic::Telemetry { .. }));
        assert_eq!(
            session.busy_requests(),
            0,
            "a stopped engine is not a busy one"
        );
        session.shutdown(Duration::from_secs(1)).await;
    }
}
