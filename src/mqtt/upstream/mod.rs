//! The gateway's own MQTT client for the upstream telemetry links (`telemetry::link`) and the
//! AWS claim sessions (`cloud::aws::claim`): only what a publish-and-command link or a
//! request-and-answer session needs, in MQTT 3.1.1 or MQTT 5 chosen per connection.
//!
//! Why not rumqttc here: its `MqttState` keeps a 65,536-bit in-flight bitset and read/write
//! buffers sized for the largest packet, about 81-94 KB per connection with rustls's buffers,
//! and with 10,000 device links that is a gigabyte (issue 22). It also drops its pending
//! publishes on every new session and hides packet ids until it sends, which the links
//! worked around through `client_ext`. This client is small because the link owns the
//! semantics (window, order across reconnects, backoff):
//!
//! - [`connect`]: TCP, TLS ([`tls`]: the link's `rustls::ClientConfig` with its resumption
//!   cache if it has one, on rustls's unbuffered API so an idle link holds no TLS buffer),
//!   CONNECT (clean session, keep-alive, user name and password) and CONNACK within one
//!   timeout. A refused CONNACK is [`UpstreamError::Refused`] with its reason code. The server's
//!   Receive Maximum and Maximum Packet Size are kept in [`ConnAckInfo`]; we never send topic
//!   aliases, so any Topic Alias Maximum is honoured.
//! - [`Connection`]: encode PUBLISH (QoS 1, with MQTT 5 properties), PUBACK, SUBSCRIBE (QoS 0
//!   or 1; the SUBACK's codes are counted so the caller checks one per filter), PINGREQ and
//!   DISCONNECT into a small write buffer flushed with a timeout, only when the caller
//!   flushes (a claim session sends the PUBACK of one answer with its next request); decode
//!   the server's packets from a small read buffer into [`ServerEvent`]s, those already read
//!   without waiting ([`Connection::buffered_event`]). A publish whose encoding
//!   exceeds the server's Maximum Packet Size is not sent ([`Queued::TooLarge`]); the link
//!   drops it from the outbox, since no retry can make it fit. Keep-alive: a PINGREQ when
//!   nothing was sent for the keep-alive, and a PINGRESP missing for the keep-alive (at most
//!   30 s) ends the connection.
//! - [`Inflight`]: packet ids we allocate ourselves, in a map sized by the window.
//!
//! A hostile or broken server (refused CONNACK, garbage bytes, a packet over our limit, a
//! PUBACK or SUBACK for an id we never used, a topic alias we never allowed) ends the
//! connection with an error: never a panic, never a buffer larger than our packet limit.

mod codec;
mod connection;
mod inflight;
pub mod tls;

pub use codec::{is_transient_refusal, ConnAckInfo, ServerEvent, FAILURE};
pub use connection::{connect, ConnectOptions, Connection, Queued, Transport, READ_CHUNK};
pub use inflight::Inflight;

use std::time::Duration;

/// The protocol version of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (IoT Hub; AWS with `cloud.aws.mqtt_version = 3`).
    V4,
    /// MQTT 5 (AWS IoT Core by default): message properties travel upstream.
    #[default]
    V5,
}

/// Why an upstream connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Socket error.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS handshake or name error.
    #[error("TLS: {0}")]
    Tls(String),
    /// TCP, TLS and CONNACK did not complete in time.
    #[error("no CONNACK within {0:?}")]
    ConnectTimeout(Duration),
    /// The server refused the connection.
    #[error("connection refused by the server: {reason} (code {code:#04x})")]
    Refused {
        /// 3.1.1 return code or MQTT 5 reason code.
        code: u8,
        /// Its name.
        reason: String,
    },
    /// The server closed the connection.
    #[error("closed by the server")]
    Closed,
    /// The server sent DISCONNECT (MQTT 5).
    #[error("the server disconnected (reason code {0:#04x})")]
    Disconnected(u8),
    /// The server broke the protocol (malformed packet, unexpected packet or id).
    #[error("{0}")]
    Protocol(String),
    /// The server sent a packet larger than we accept.
    #[error("the server sent a packet of {size} bytes, over our {limit}-byte limit")]
    TooLarge {
        /// Size its fixed header announced.
        size: usize,
        /// Our limit.
        limit: usize,
    },
    /// No PINGRESP in time.
    #[error("no PINGRESP for {0:?} (keep-alive timeout)")]
    KeepAliveTimeout(Duration),
    /// The server did not take our bytes in time.
    #[error("write did not complete within {0:?}")]
    WriteTimeout(Duration),
    /// The server refused a message in a way worth retrying (PUBACK reason code).
    #[error("the server refused a message for now (PUBACK reason code {0:#04x}); it is sent again after a reconnect")]
    RetryLater(u8),
}

#[cfg(test)]
mod subscribe_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;
