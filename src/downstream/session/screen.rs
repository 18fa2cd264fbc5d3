//! What an inbound device message must pass before the consumer sees it, the same for the
//! MQTT session and the in-process one: a topic of the device contract, not a retained
//! replay, and a provisioning request within `max_request_bytes`. What fails is counted,
//! logged, answered on the device's `/rejected` topic where it is a request, and acknowledged
//! by the caller. The same goes for a request its consumer's queue refused as busy
//! ([`Screen::settle`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::shared::Common;
use crate::device_id::DeviceId;
use crate::downstream::contract::{self, error_code, RejectedResponse};
use crate::downstream::inbound::Refusal;
use crate::downstream::topics::{
    rejected_for_request_topic, DeviceTopic, PayloadFormat, TopicError, TopicPrefix,
};

/// The checks, with what they need.
#[derive(Debug)]
pub(super) struct Screen {
    pub(super) prefix: TopicPrefix,
    pub(super) max_request_bytes: usize,
    pub(super) common: Arc<Common>,
}

impl Screen {
    /// The message's device topic when the consumer should get it; `None` when it was
    /// refused (answered through `reply(topic, payload)` where the device waits for one) or
    /// ignored. Either way the caller acknowledges a refused message.
    pub(super) fn check(
        &self,
        topic: &str,
        retain: bool,
        payload_len: usize,
        reply: impl Fn(String, Vec<u8>),
    ) -> Option<DeviceTopic> {
        let parsed = match DeviceTopic::parse(&self.prefix, topic) {
            Ok(parsed) => parsed,
            Err(error) => {
                self.reject_topic(topic, &error, reply);
                return None;
            }
        };
        // A broker sets the retain flag only on what it replays to a new subscription (MQTT
        // 3.1.1 §3.3.1.3), never on a live message: a device's retained request or telemetry
        // reaches the gateway again on every resubscription (each reconnect), and must not be
        // provisioned or sent upstream again. Brokers that let devices retain (mosquitto) do
        // this; the embedded broker stores nothing a device retains.
        if retain {
            let total = self.common.retained_replays.fetch_add(1, Ordering::Relaxed) + 1;
            if total.is_power_of_two() {
                tracing::info!(
                    topic = %crate::downstream::broker::rules::truncated(topic),
                    replays_total = total,
                    "retained device message replayed by the broker ignored (counted; logged at powers of two)"
                );
            }
            return None;
        }
        if let DeviceTopic::ProvisionRequest { device, format } = &parsed {
            if payload_len > self.max_request_bytes {
                self.reject_oversize(device, *format, payload_len, reply);
                return None;
            }
        }
        Some(parsed)
    }

    /// Answers a provisioning request whose id broke the rules, on the topic the device used.
    fn reject_topic(&self, topic: &str, error: &TopicError, reply: impl Fn(String, Vec<u8>)) {
        self.common.rejected_topics.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, "downstream message refused");
        let Some((reply_topic, fmt)) = rejected_for_request_topic(&self.prefix, topic) else {
            return;
        };
        let code = match error {
            TopicError::NonCanonicalId { .. } => error_code::NON_CANONICAL_DEVICE_ID,
            _ => error_code::INVALID_DEVICE_ID,
        };
        let body = RejectedResponse::new(400, code, error.to_string());
        reply(reply_topic, contract::encode(fmt, &body));
    }

    /// Answers a provisioning request larger than `max_request_bytes`.
    fn reject_oversize(
        &self,
        device: &DeviceId,
        fmt: PayloadFormat,
        size: usize,
        reply: impl Fn(String, Vec<u8>),
    ) {
        self.common
            .oversize_requests
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%device, size, max = self.max_request_bytes, "provisioning request too large");
        let body = RejectedResponse::new(
            413,
            error_code::PAYLOAD_TOO_LARGE,
            format!(
                "provisioning request of {size} bytes exceeds the gateway's limit of {} bytes (downstream.max_request_bytes)",
                self.max_request_bytes
            ),
        );
        reply(
            self.prefix.rejected(device, fmt),
            contract::encode(fmt, &body),
        );
    }

    /// Settles a message its consumer's queue refused ([`Refusal`]): a provisioning request
    /// refused as busy is answered on its `/rejected` topic with a retryable 503
    /// `GatewayBusy` (through `reply`, without waiting for the broker), counted and
    /// acknowledged; a message whose consumer stopped stays unacknowledged with the broker.
    /// Returns false when the session should stop (no consumer is left).
    pub(super) fn settle(&self, refusal: Refusal, reply: impl Fn(String, Vec<u8>)) -> bool {
        match refusal {
            Refusal::Busy(message) => {
                if let DeviceTopic::ProvisionRequest { device, format } = &message.topic {
                    self.common.busy_requests.fetch_add(1, Ordering::Relaxed);
                    let body = RejectedResponse::new(
                        503,
                        error_code::GATEWAY_BUSY,
                        "the gateway has more provisioning requests queued than it takes at once; retry later",
                    );
                    reply(
                        self.prefix.rejected(device, *format),
                        contract::encode(*format, &body),
                    );
                }
                message.ack.ack();
                true
            }
            Refusal::Gone { message, last } => message.consumer_gone(last),
        }
    }
}
