//! The gateway's own session on the downstream broker: in-process with the embedded broker
//! (`in_process`, `DownstreamSession::start_in_process`), an MQTT connection to an external
//! one ([`DownstreamSession::start`]). Consumers see the same handle, messages and acks either
//! way.
//!
//! The MQTT session is one rumqttc (MQTT 3.1.1) connection with clean_session = false and manual acks. Its event
//! loop is polled continuously in one task, which
//! - resubscribes on every CONNACK (a broker that lost the session forgets subscriptions),
//! - reconnects with jittered exponential backoff and a cap (rumqttc itself retries at once),
//! - parses each inbound PUBLISH with [`DeviceTopic::parse`] and hands it to the consumer on a
//!   bounded channel as a [`DownstreamMessage`]; topics that break the contract never reach the
//!   consumer: they are acknowledged, logged, and a provisioning request with a bad id gets a
//!   `/rejected` answer on the topic the device used; so does a provisioning request larger than
//!   `max_request_bytes` (413 `PayloadTooLarge`), which keeps the consumer's input bounded well
//!   below the packet limit that telemetry needs.
//!
//! This file holds the public face: options, status, errors, and [`DownstreamSession`], which
//! starts the session and reads its state. The rest, one concern per file:
//! - `ack`: [`AckHandle`] and the queue that sends PUBACKs in arrival order;
//! - `read_ahead`: how far messages are handed over ahead of the broker's confirmed processing
//!   of their PUBACKs (the bound on duplicates after a crash);
//! - `driver`: the task that polls the event loop, writes acks, and settles what a lost
//!   connection leaves behind (redelivery and duplicates);
//! - `publish`: the gateway's own QoS 1 publishes and how their PUBACKs find the caller;
//! - `shared`: the bookkeeping the handle, the acks and the driver share under one lock;
//! - `screen`: the checks a device message passes before the consumer sees it (both kinds);
//! - `in_process`: the session on the embedded broker, without MQTT in between.
//!
//! Where the session reaches into rumqttc's event loop, it goes through
//! [`crate::mqtt::client_ext`], which names each assumption about rumqttc's internals.

mod ack;
mod driver;
mod in_process;
mod publish;
mod read_ahead;
mod screen;
mod shared;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, MqttOptions, TlsConfiguration, Transport};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::timeout;

pub use rumqttc::QoS;

pub use ack::{AckHandle, AckOutcome};

use super::topics::{DeviceTopic, TopicError, TopicPrefix};
use crate::backoff::Backoff;
use crate::downstream::broker::LocalClient;
use crate::downstream::inbound::Sink;
use crate::identity::Secret;
use crate::mqtt::client_ext;
use crate::mqtt::props::MessageProperties;
use ack::AckQueue;
use driver::Driver;
use in_process::{InProcess, Reader};
use publish::Confirms;
use read_ahead::ReadAhead;
use screen::Screen;
use shared::{Common, Inner, Shared};

/// Default of [`SessionOptions::max_request_bytes`] (`[downstream] max_request_bytes`).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Default of [`SessionOptions::max_unconfirmed`]: mosquitto's `max_inflight_messages` in the
/// recommended configuration, so a broker that honours its own window never meets this one.
pub const DEFAULT_MAX_UNCONFIRMED: usize = 1000;

/// Default of [`SessionOptions::max_held_bytes`].
pub const DEFAULT_MAX_HELD_BYTES: usize = 64 << 20;

/// Where and how the session connects.
#[derive(Clone)]
pub struct BrokerEndpoint {
    /// Host name or IP address (also the TLS server name).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS client config; `None` for plain MQTT.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// MQTT username.
    pub username: Option<String>,
    /// MQTT password (sent only with a username).
    pub password: Option<Secret>,
}

impl std::fmt::Debug for BrokerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerEndpoint")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// Which device messages the session subscribes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// `{p}/+/provision/+`
    pub provision: bool,
    /// `{p}/+/telemetry/#`
    pub telemetry: bool,
}

impl Default for Inbound {
    fn default() -> Self {
        Self {
            provision: true,
            telemetry: true,
        }
    }
}

/// Settings of the gateway session. The in-process session (on the embedded broker, started
/// by [`Downstream::start`](crate::downstream::Downstream::start)) uses the prefix,
/// subscriptions, packet and request limits and the inbound capacity; the rest concerns the
/// MQTT connection.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// MQTT client id; see [`gateway_client_id`].
    pub client_id: String,
    /// The broker.
    pub endpoint: BrokerEndpoint,
    /// Topic prefix of the device contract.
    pub topic_prefix: TopicPrefix,
    /// Subscriptions.
    pub inbound: Inbound,
    /// Largest MQTT packet sent or accepted; keep it >= the broker's own limit, or an oversize
    /// device message makes rumqttc drop the connection and the broker redeliver it forever.
    pub max_packet_bytes: usize,
    /// Largest provisioning request payload handed to the consumer; a larger one is answered on
    /// `/rejected` (413 `PayloadTooLarge`), acknowledged and counted.
    pub max_request_bytes: usize,
    /// MQTT keep-alive interval.
    pub keep_alive: Duration,
    /// Capacity of the queue of inbound messages (of each queue, when routed: see
    /// [`Downstream::start_routed`](crate::downstream::Downstream::start_routed)); keep it
    /// above the broker's in-flight window for this client, or a slow consumer stalls the
    /// event loop.
    pub inbound_capacity: usize,
    /// QoS 1 messages handed to the consumer whose PUBACK the broker has not yet been seen to
    /// process, at most (see `session/read_ahead.rs`): the bound on the messages a crash of the
    /// gateway makes the broker deliver twice.
    pub max_unconfirmed: usize,
    /// Bytes (payload and topic) of messages the session holds back for the read-ahead, at
    /// most; beyond it they are left with the broker and fetched again by a reconnect (see
    /// `session/read_ahead.rs`).
    pub max_held_bytes: usize,
    /// QoS 1 publishes of the gateway in flight at once.
    pub outgoing_inflight: u16,
    /// First reconnect delay (jittered, doubled per failure).
    pub reconnect_min: Duration,
    /// Upper bound of the reconnect delay.
    pub reconnect_max: Duration,
    /// TCP + TLS + CONNACK limit for one connection attempt (whole seconds, at least 1).
    pub connect_timeout: Duration,
    /// How long a publish waits for the broker's PUBACK.
    pub publish_timeout: Duration,
}

impl SessionOptions {
    /// Defaults for everything but the client id, broker and prefix.
    pub fn new(client_id: String, endpoint: BrokerEndpoint, topic_prefix: TopicPrefix) -> Self {
        Self {
            client_id,
            endpoint,
            topic_prefix,
            inbound: Inbound::default(),
            max_packet_bytes: 256 * 1024,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            keep_alive: Duration::from_secs(30),
            inbound_capacity: 1024,
            max_unconfirmed: DEFAULT_MAX_UNCONFIRMED,
            max_held_bytes: DEFAULT_MAX_HELD_BYTES,
            outgoing_inflight: 100,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// The client id of the gateway's downstream session: `fleetgw-{gateway id}`.
pub fn gateway_client_id(gateway_id: &str) -> String {
    format!("fleetgw-{gateway_id}")
}

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("downstream session option {option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Topic(#[from] TopicError),
    #[error("publish to {topic:?}: no PUBACK from the downstream broker within {waited:?}")]
    PublishTimeout { topic: String, waited: Duration },
    #[error("publish to {topic:?}: the connection to the downstream broker was lost and the broker did not resume the session; publish again")]
    PublishLost { topic: String },
    #[error("publish to {topic:?}: payload of {size} bytes exceeds max_packet_bytes {max}")]
    PayloadTooLarge {
        topic: String,
        size: usize,
        max: usize,
    },
    #[error("downstream session is shut down")]
    Closed,
    #[error("downstream session not subscribed within {waited:?}: {state}")]
    NotReady { waited: Duration, state: String },
}

/// Connection state, observable through [`DownstreamSession::status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionStatus {
    /// A CONNACK was received and the connection has not failed since.
    pub connected: bool,
    /// Every subscription of this connection was granted.
    pub subscribed: bool,
    /// CONNACKs received so far (1 after the first connection).
    pub connections: u64,
    /// The last connection or subscription error, if any.
    pub last_error: Option<String>,
}

/// A device message for the consumer. Call [`AckHandle::ack`] once it is durably handled.
#[derive(Debug)]
pub struct DownstreamMessage {
    /// The validated device topic.
    pub topic: DeviceTopic,
    /// The payload as published.
    pub payload: Bytes,
    /// QoS the message was delivered with (at most the subscription's QoS 1).
    pub qos: QoS,
    /// The broker's DUP flag (set by the embedded broker and mosquitto on redelivery; not
    /// every broker sets it, so do not rely on it).
    pub dup: bool,
    /// Acknowledges the message to the broker.
    pub ack: AckHandle,
    /// MQTT 5 properties the device sent (embedded broker only: the session with an external
    /// broker speaks MQTT 3.1.1).
    pub properties: Option<Arc<MessageProperties>>,
    /// When the gateway got it: the embedded broker's read of the device's PUBLISH, or the
    /// session's read from an external broker (the start of the telemetry forward delay).
    pub received_at: Option<std::time::Instant>,
}

impl DownstreamMessage {
    /// The consumer's queue closed with this message undelivered: it is left
    /// unacknowledged, so the broker keeps it for the next session. Returns whether the
    /// session goes on: false when `last`, no consumer being left.
    pub(super) fn consumer_gone(self, last: bool) -> bool {
        self.ack.forget();
        if last {
            tracing::info!("downstream consumer gone; stopping the session");
        }
        !last
    }

    /// The message of `publish`, whose topic parsed as `topic`, acknowledged through `ack`.
    pub(super) fn new(topic: DeviceTopic, publish: rumqttc::Publish, ack: AckHandle) -> Self {
        Self {
            topic,
            payload: publish.payload,
            qos: publish.qos,
            dup: publish.dup,
            ack,
            properties: None,
            received_at: Some(std::time::Instant::now()),
        }
    }
}

/// Handle to the running gateway session. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct DownstreamSession {
    link: Link,
    common: Arc<Common>,
    prefix: TopicPrefix,
    max_packet_bytes: usize,
    publish_timeout: Duration,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// How the session reaches the broker.
#[derive(Debug)]
enum Link {
    /// An MQTT connection (rumqttc) to an external broker.
    Mqtt(Arc<Shared>),
    /// In-process on the embedded broker.
    InProcess(Arc<InProcess>),
}

/// Checks the options both kinds of session use.
fn validate(opts: &SessionOptions) -> Result<(), SessionError> {
    let bad = |option, reason: &str| SessionError::InvalidOption {
        option,
        reason: reason.to_string(),
    };
    if !opts.inbound.provision && !opts.inbound.telemetry {
        return Err(bad("inbound", "subscribe to provision, telemetry or both"));
    }
    if opts.max_packet_bytes < 1024 {
        return Err(bad("max_packet_bytes", "must be at least 1024"));
    }
    if opts.max_request_bytes == 0 || opts.max_request_bytes > opts.max_packet_bytes {
        return Err(bad(
            "max_request_bytes",
            "must be between 1 and max_packet_bytes",
        ));
    }
    if opts.inbound_capacity == 0 {
        return Err(bad("inbound_capacity", "must be at least 1"));
    }
    Ok(())
}

/// The filters the session subscribes to.
fn filters(opts: &SessionOptions) -> Vec<String> {
    let mut filters = Vec::new();
    if opts.inbound.provision {
        filters.push(opts.topic_prefix.provision_filter());
    }
    if opts.inbound.telemetry {
        filters.push(opts.topic_prefix.telemetry_filter());
    }
    filters
}

impl DownstreamSession {
    /// Starts the gateway's session in-process on the embedded broker, through `client`
    /// (from [`EmbeddedBroker::attach_local`](crate::downstream::EmbeddedBroker::attach_local)),
    /// handing device messages to `sink`: subscribed when this returns. [`Downstream`] starts
    /// it.
    ///
    /// [`Downstream`]: crate::downstream::Downstream
    pub(crate) fn start_in_process(
        opts: &SessionOptions,
        client: LocalClient,
        sink: Sink,
    ) -> Result<Self, SessionError> {
        validate(opts)?;
        let common = Common::new();
        let refused = client.subscribe(&filters(opts));
        let client = Arc::new(client);
        common.status.send_modify(|s| {
            s.connected = true;
            s.subscribed = refused.is_empty();
            s.connections = 1;
            if !refused.is_empty() {
                s.last_error = Some(format!(
                    "the embedded broker refused the subscription to {}",
                    refused.join(", ")
                ));
            }
        });
        let link = Arc::new(InProcess {
            client,
            closed: AtomicBool::new(false),
            shutdown: Notify::new(),
        });
        let reader = Reader {
            link: link.clone(),
            screen: Screen {
                prefix: opts.topic_prefix.clone(),
                max_request_bytes: opts.max_request_bytes,
                common: common.clone(),
            },
            sink,
        };
        let task = tokio::spawn(reader.run());
        Ok(Self {
            link: Link::InProcess(link),
            common,
            prefix: opts.topic_prefix.clone(),
            max_packet_bytes: opts.max_packet_bytes,
            publish_timeout: opts.publish_timeout,
            task: Mutex::new(Some(task)),
        })
    }

    /// Starts the MQTT session task; it connects (and keeps reconnecting) in the background.
    /// Returns the session and the receiver of device messages.
    pub fn start(
        opts: SessionOptions,
    ) -> Result<(Self, mpsc::Receiver<DownstreamMessage>), SessionError> {
        let (sink, rx) = Sink::one(opts.inbound_capacity);
        Ok((Self::start_into(opts, sink)?, rx))
    }

    /// [`start`](Self::start), handing device messages to `sink`.
    pub(crate) fn start_into(opts: SessionOptions, sink: Sink) -> Result<Self, SessionError> {
        let bad = |option, reason: &str| SessionError::InvalidOption {
            option,
            reason: reason.to_string(),
        };
        validate(&opts)?;
        if opts.client_id.is_empty() {
            return Err(bad("client_id", "must not be empty"));
        }
        if opts.inbound_capacity == 0 || opts.outgoing_inflight == 0 || opts.max_unconfirmed == 0 {
            return Err(bad(
                "inbound_capacity/outgoing_inflight/max_unconfirmed",
                "must be at least 1",
            ));
        }
        if opts.reconnect_min.is_zero() || opts.reconnect_max < opts.reconnect_min {
            return Err(bad(
                "reconnect_min/reconnect_max",
                "need 0 < reconnect_min <= reconnect_max",
            ));
        }
        let mut mqtt = MqttOptions::new(
            opts.client_id.clone(),
            opts.endpoint.host.clone(),
            opts.endpoint.port,
        );
        mqtt.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(opts.keep_alive)
            .set_max_packet_size(opts.max_packet_bytes, opts.max_packet_bytes)
            .set_inflight(opts.outgoing_inflight)
            // Acks and publishes share this channel; room for a full in-flight window of both.
            .set_request_channel_capacity(
                opts.inbound_capacity + usize::from(opts.outgoing_inflight),
            );
        if let Some(user) = &opts.endpoint.username {
            let password = match &opts.endpoint.password {
                None => String::new(),
                Some(p) => p
                    .expose_str()
                    .ok_or_else(|| bad("password", "must be UTF-8 text"))?
                    .to_string(),
            };
            mqtt.set_credentials(user.clone(), password);
        }
        if let Some(tls) = &opts.endpoint.tls {
            mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        let (client, mut eventloop) = AsyncClient::new(mqtt, 16);
        client_ext::set_connect_timeout(&mut eventloop, opts.connect_timeout);
        // Requests and answers are small and latency-bound: Nagle plus delayed ACKs would hold
        // each of them up to ~40 ms.
        client_ext::set_tcp_nodelay(&mut eventloop);

        let common = Common::new();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                generation: 0,
                acks: AckQueue::default(),
                confirms: Confirms::default(),
                closed: false,
                redelivery_requested: false,
                disconnect_queued: false,
            }),
            client,
            room: Notify::new(),
            shutdown: Notify::new(),
            common: common.clone(),
        });
        let driver = Driver {
            shared: shared.clone(),
            eventloop,
            sink,
            prefix: opts.topic_prefix.clone(),
            screen: Screen {
                prefix: opts.topic_prefix.clone(),
                max_request_bytes: opts.max_request_bytes,
                common: common.clone(),
            },
            filters: filters(&opts),
            backoff: Backoff::new(opts.reconnect_min, opts.reconnect_max),
            max_packet_bytes: opts.max_packet_bytes,
            gate: ReadAhead::new(opts.max_unconfirmed, opts.max_held_bytes),
            orphans: Vec::new(),
        };
        let task = tokio::spawn(driver.run());
        Ok(Self {
            link: Link::Mqtt(shared),
            common,
            prefix: opts.topic_prefix,
            max_packet_bytes: opts.max_packet_bytes,
            publish_timeout: opts.publish_timeout,
            task: Mutex::new(Some(task)),
        })
    }

    /// The topic prefix this session uses.
    pub fn prefix(&self) -> &TopicPrefix {
        &self.prefix
    }

    /// The current connection state.
    pub fn status(&self) -> SessionStatus {
        self.common.status.borrow().clone()
    }

    /// A receiver that sees every change of [`status`](Self::status).
    pub fn watch_status(&self) -> watch::Receiver<SessionStatus> {
        self.common.status.subscribe()
    }

    /// Waits until the session is connected and its subscriptions are granted.
    pub async fn wait_subscribed(&self, within: Duration) -> Result<(), SessionError> {
        let mut rx = self.common.status.subscribe();
        let outcome = timeout(within, rx.wait_for(|s| s.connected && s.subscribed))
            .await
            .map(|r| r.is_ok());
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => Err(SessionError::Closed),
            Err(_) => Err(SessionError::NotReady {
                waited: within,
                state: describe(&self.status()),
            }),
        }
    }

    /// Retained copies of device requests or telemetry that the broker replayed on
    /// subscribing (acknowledged and not delivered: the live message was handled when it was
    /// published).
    pub fn retained_replays(&self) -> u64 {
        self.common.retained_replays.load(Ordering::Relaxed)
    }

    /// Inbound messages whose topic broke the contract (acknowledged and not delivered).
    pub fn rejected_topics(&self) -> u64 {
        self.common.rejected_topics.load(Ordering::Relaxed)
    }

    /// Provisioning requests refused for exceeding `max_request_bytes` (acknowledged, answered
    /// on `/rejected` and not delivered).
    pub fn oversize_requests(&self) -> u64 {
        self.common.oversize_requests.load(Ordering::Relaxed)
    }

    /// QoS 0 messages dropped because the consumer channel was full.
    pub fn dropped_qos0(&self) -> u64 {
        self.common.dropped_qos0.load(Ordering::Relaxed)
    }

    /// Provisioning requests refused because the provisioning queue was full (acknowledged,
    /// answered on `/rejected` with 503 `GatewayBusy` and not delivered; see
    /// [`Downstream::start_routed`](crate::downstream::Downstream::start_routed)).
    pub fn busy_requests(&self) -> u64 {
        self.common.busy_requests.load(Ordering::Relaxed)
    }

    /// Sends DISCONNECT (if connected) and stops the session task, waiting at most `within`.
    /// The broker keeps what the gateway has not acknowledged for the next session.
    pub async fn shutdown(&self, within: Duration) {
        match &self.link {
            Link::Mqtt(shared) => {
                {
                    let mut inner = shared.lock();
                    inner.closed = true;
                    inner.confirms.fail_all();
                    // Under the lock, so the event loop's next flush sees whether this got
                    // through.
                    inner.disconnect_queued = shared.client.try_disconnect().is_ok();
                }
                shared.shutdown.notify_one();
            }
            Link::InProcess(link) => link.close(),
        }
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task {
            if timeout(within, &mut task).await.is_err() {
                tracing::warn!("downstream session did not stop within {within:?}; aborting it");
                task.abort();
            }
        }
        if let Link::InProcess(link) = &self.link {
            link.client.detach();
            self.common.status.send_modify(|s| {
                s.connected = false;
                s.subscribed = false;
            });
        }
    }
}

impl Drop for DownstreamSession {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        if let Link::InProcess(link) = &self.link {
            link.close();
            link.client.detach();
        }
    }
}

fn describe(s: &SessionStatus) -> String {
    let state = match (s.connected, s.subscribed) {
        (false, _) => "not connected",
        (true, false) => "connected, subscriptions not granted",
        (true, true) => "connected and subscribed",
    };
    match &s.last_error {
        Some(e) => format!("{state}; last error: {e}"),
        None => state.to_string(),
    }
}

#[cfg(test)]
impl DownstreamSession {
    /// A session whose broker never answers (nothing listens on port 9, and it waits a
    /// minute between attempts), for unit tests of the session's consumers: it queues what
    /// they publish and counts what they refuse.
    pub(crate) fn unconnected_for_tests() -> Arc<Self> {
        let endpoint = BrokerEndpoint {
            host: "127.0.0.1".into(),
            port: 9,
            tls: None,
            username: None,
            password: None,
        };
        let mut opts = SessionOptions::new("fleetgw-test".into(), endpoint, Default::default());
        opts.reconnect_min = Duration::from_secs(60);
        opts.reconnect_max = Duration::from_secs(60);
        let (session, _inbound) = Self::start(opts).expect("the session starts");
        Arc::new(session)
    }

    /// A session that was shut down: every publish fails at once.
    pub(crate) async fn closed_for_tests() -> Arc<Self> {
        let session = Self::unconnected_for_tests();
        session.shutdown(Duration::from_millis(100)).await;
        session
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_names_the_gateway() {
        assert_eq!(gateway_client_id("gw-01"), "fleetgw-gw-01");
    }
}
