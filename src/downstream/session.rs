//! The gateway's own MQTT session to the downstream broker (embedded or external).
//!
//! One rumqttc (MQTT 3.1.1) connection with clean_session = false and manual acks. Its event
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
//! Acknowledgements. The consumer acks a message through its [`AckHandle`] once it has durably
//! handled it. PUBACKs go out in the order the messages arrived, whatever order the consumer
//! acks in: MQTT 3.1.1 §4.6 asks for it and some brokers disconnect a client that acks out of order.
//! So one slow message holds back the acks of later ones; consumers should ack as soon as the
//! message is persisted, not when the work it starts is finished. An ack that belongs to an
//! earlier connection is discarded (the broker redelivers that message), never sent on the new
//! connection where its packet id could name another message.
//!
//! The event loop writes the PUBACKs itself, straight into the connection before each poll,
//! rather than through rumqttc's request channel. rumqttc takes at most one request from that
//! channel per turn of its loop while one network read takes in up to 10 PUBLISHes, so under a
//! backlog acks fell ever further behind what the consumer had durably stored (a benchmark:
//! 15,000 messages read and stored, 1,600 PUBACKs sent). mosquitto resends every message it
//! has no PUBACK for when the session resumes, so a crash then duplicated the whole backlog
//! instead of at most the messages still on their way to the outbox. The channel carries one
//! ack at a time only to wake an idle event loop; the loop writes directly only while that
//! one is not pending, which keeps the PUBACKs in order.
//!
//! Read-ahead. The messages a crash of the gateway makes the broker deliver twice are those
//! the consumer has stored but whose PUBACK the broker has not yet processed. A broker that
//! holds to its in-flight window keeps them below that window, but mosquitto up to 2.0.12
//! (Debian 12 ships 2.0.11) does not once a queue has formed: each PUBACK it processes moves
//! up to a whole `max_inflight_messages` (or MQTT 5 Receive Maximum) of queued messages into
//! flight (`db__message_delete_outgoing`, fixed in 2.0.13), while it reads one packet per
//! connection per turn of its loop. Under load it sent the gateway 14,598 messages while it
//! processed 5,182 PUBACKs, and a SIGKILL then cost 5,000 to 15,000 copies of stored messages.
//! So the session bounds this itself: it hands a QoS 1 message to the consumer only while
//! fewer than `max_unconfirmed` are unconfirmed, and confirms acks with a PINGREQ written
//! after them (the broker answers a connection's packets in order, so its PINGRESP proves
//! every earlier PUBACK processed; rumqttc's keep-alive pings count the same way). Messages
//! beyond the bound are read (the PINGRESP is behind them) and held in memory, in arrival
//! order, up to `max_held_bytes`. Past that, every further message of the connection is left
//! with the broker: never acknowledged, so the broker keeps it in the session, exactly like a
//! message not yet read (and without an ack entry, so the held messages' acks still go out).
//! Once the held messages are handed over and acknowledged, the session disconnects cleanly
//! (the broker processes those PUBACKs first) and the reconnect gets the rest again. Pings
//! start only once half the bound is unconfirmed, so a broker within a smaller window never
//! sees one.
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
//!
//! Publishing. `publish_*` return once the broker has acknowledged the PUBLISH (QoS 1 PUBACK),
//! so the provisioning engine can record "response delivered". rumqttc 0.25 has no completion
//! handles; PUBACKs are matched to callers by following the packet ids rumqttc reports as it
//! sends (requests leave its channel in order; retransmissions reuse known ids).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, Packet,
    PubAck, PubRec, Publish, Request, Subscribe, SubscribeFilter, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{timeout, timeout_at, Instant};

pub use rumqttc::QoS;

use super::contract::{self, error_code, RejectedResponse, StatusReport};
use super::topics::{
    rejected_for_request_topic, DeviceTopic, PayloadFormat, TopicError, TopicPrefix,
};
use crate::backoff::Backoff;
use crate::device_id::DeviceId;
use crate::identity::Secret;

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

/// Settings of the gateway session.
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
    /// Capacity of the channel of inbound messages; keep it above the broker's in-flight
    /// window for this client, or a slow consumer stalls the event loop.
    pub inbound_capacity: usize,
    /// QoS 1 messages handed to the consumer whose PUBACK the broker has not yet been seen to
    /// process, at most (see "Read-ahead" in the module docs): the bound on the messages a
    /// crash of the gateway makes the broker deliver twice.
    pub max_unconfirmed: usize,
    /// Bytes (payload and topic) of messages the session holds back for the read-ahead, at
    /// most; beyond it they are left with the broker and fetched again by a reconnect (see
    /// "Read-ahead" in the module docs).
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
}

/// What [`AckHandle::ack`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// QoS 0: nothing to acknowledge.
    NotRequired,
    /// Recorded; the PUBACK goes out once every earlier message is acknowledged too.
    Accepted,
    /// The message came on a connection that has since dropped; the broker redelivers it.
    Stale,
}

/// Acknowledges one inbound message.
///
/// Dropping it without [`ack`](Self::ack) means "not handled": acks go out in order, so one
/// that never comes would block every later ack; instead the session reconnects (the broker
/// keeps the session) and the broker redelivers every unacknowledged message.
#[derive(Debug)]
pub struct AckHandle {
    slot: Option<AckSlot>,
}

#[derive(Debug)]
struct AckSlot {
    shared: Arc<Shared>,
    generation: u64,
    seq: u64,
}

impl AckHandle {
    /// Marks the message handled; the PUBACK is sent in arrival order.
    pub fn ack(mut self) -> AckOutcome {
        match self.slot.take() {
            None => AckOutcome::NotRequired,
            Some(slot) => slot.release(),
        }
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            slot.abandon();
        }
    }
}

impl AckSlot {
    fn release(self) -> AckOutcome {
        let mut inner = self.shared.lock();
        if inner.generation != self.generation {
            return AckOutcome::Stale;
        }
        if let Some(entry) = self
            .seq
            .checked_sub(inner.acks.head_seq)
            .and_then(|i| inner.acks.entries.get_mut(i as usize))
        {
            entry.done = true;
        }
        inner.wake_for_acks(&self.shared.client);
        AckOutcome::Accepted
    }

    fn abandon(self) {
        let mut inner = self.shared.lock();
        if inner.generation != self.generation || inner.closed || inner.redelivery_requested {
            return;
        }
        // A clean DISCONNECT keeps the broker-side session; the reconnect that follows gets
        // every unacknowledged message again.
        if self.shared.client.try_disconnect().is_ok() {
            inner.redelivery_requested = true;
            tracing::warn!(
                "downstream message dropped without ack; reconnecting so the broker redelivers it"
            );
        }
    }
}

#[derive(Debug)]
struct AckEntry {
    qos: QoS,
    pkid: u16,
    done: bool,
}

#[derive(Debug, Default)]
struct AckQueue {
    head_seq: u64,
    entries: VecDeque<AckEntry>,
    /// Acks handed to rumqttc's request channel and not yet written (at most one: the wake-up
    /// of an idle event loop). The event loop writes acks itself only while this is 0, so a
    /// direct write never overtakes an earlier ack still in the channel.
    in_channel: usize,
}

type Waiter = oneshot::Sender<Result<(), ()>>;

#[derive(Debug, Default)]
struct Confirms {
    /// Publishes queued on this connection, not yet given a packet id by rumqttc.
    queued: VecDeque<Waiter>,
    /// Publishes queued before the last disconnect (now in rumqttc's pending list, resent first).
    previous: VecDeque<Waiter>,
    /// Publishes sent, awaiting PUBACK.
    by_pkid: HashMap<u16, Waiter>,
    /// A publish rumqttc holds back because its packet id is still in flight.
    collided: Option<(u16, Waiter)>,
}

impl Confirms {
    fn next_unassigned(&mut self) -> Option<Waiter> {
        self.previous
            .pop_front()
            .or_else(|| self.queued.pop_front())
    }

    fn fail_all(&mut self) {
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

#[derive(Debug)]
struct Inner {
    /// Incremented on every disconnect; acks of older generations are stale.
    generation: u64,
    acks: AckQueue,
    confirms: Confirms,
    closed: bool,
    /// A DISCONNECT was queued to get unacknowledged messages redelivered.
    redelivery_requested: bool,
    /// `shutdown` got its DISCONNECT into rumqttc's request channel.
    disconnect_queued: bool,
}

impl Inner {
    /// Called by the consumer after an ack: if the queue's head is now acknowledged and no ack
    /// is in rumqttc's channel, sends the head through the channel to wake the event loop,
    /// which then writes the rest itself (see [`Driver::write_acks`]).
    fn wake_for_acks(&mut self, client: &AsyncClient) {
        if self.acks.in_channel == 0 {
            if let Some(front) = self.acks.entries.front().filter(|e| e.done) {
                let mut publish = Publish::new("", front.qos, Vec::new());
                publish.pkid = front.pkid;
                // Full request channel: the event loop is busy and writes it before its next poll.
                if client.try_ack(&publish).is_ok() {
                    self.acks.entries.pop_front();
                    self.acks.head_seq += 1;
                    self.acks.in_channel += 1;
                }
            }
        }
        self.queue_disconnect(client);
    }

    /// Takes the acknowledged prefix of the queue for the event loop to write, unless an ack
    /// is still in rumqttc's channel (it must go out first).
    fn take_done_acks(&mut self) -> Vec<(QoS, u16)> {
        let mut done = Vec::new();
        if self.acks.in_channel > 0 {
            return done;
        }
        while let Some(front) = self.acks.entries.front().filter(|e| e.done) {
            done.push((front.qos, front.pkid));
            self.acks.entries.pop_front();
            self.acks.head_seq += 1;
        }
        done
    }

    /// A shutdown that found the request channel full queues its DISCONNECT once there is
    /// room; without it the event loop would never learn to stop.
    fn queue_disconnect(&mut self, client: &AsyncClient) {
        if self.closed && !self.disconnect_queued {
            self.disconnect_queued = client.try_disconnect().is_ok();
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    client: AsyncClient,
    /// Signalled whenever rumqttc took a request from its channel (room for another).
    room: Notify,
    shutdown: Notify,
    status: watch::Sender<SessionStatus>,
    rejected_topics: AtomicU64,
    oversize_requests: AtomicU64,
    dropped_qos0: AtomicU64,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle to the running gateway session. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct DownstreamSession {
    shared: Arc<Shared>,
    prefix: TopicPrefix,
    max_packet_bytes: usize,
    publish_timeout: Duration,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl DownstreamSession {
    /// Starts the session task; it connects (and keeps reconnecting) in the background.
    /// Returns the session and the receiver of device messages.
    pub fn start(
        opts: SessionOptions,
    ) -> Result<(Self, mpsc::Receiver<DownstreamMessage>), SessionError> {
        let bad = |option, reason: &str| SessionError::InvalidOption {
            option,
            reason: reason.to_string(),
        };
        if opts.client_id.is_empty() {
            return Err(bad("client_id", "must not be empty"));
        }
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
        let mut network = eventloop.network_options();
        network.set_connection_timeout(opts.connect_timeout.as_secs().max(1));
        // Requests and answers are small and latency-bound: Nagle plus delayed ACKs would hold
        // each of them up to ~40 ms.
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);

        let (status, _) = watch::channel(SessionStatus::default());
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
            status,
            rejected_topics: AtomicU64::new(0),
            oversize_requests: AtomicU64::new(0),
            dropped_qos0: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(opts.inbound_capacity);
        let mut filters = Vec::new();
        if opts.inbound.provision {
            filters.push(opts.topic_prefix.provision_filter());
        }
        if opts.inbound.telemetry {
            filters.push(opts.topic_prefix.telemetry_filter());
        }
        let driver = Driver {
            shared: shared.clone(),
            eventloop,
            tx,
            prefix: opts.topic_prefix.clone(),
            filters,
            backoff: Backoff::new(opts.reconnect_min, opts.reconnect_max),
            max_packet_bytes: opts.max_packet_bytes,
            max_request_bytes: opts.max_request_bytes,
            gate: ReadAhead::new(opts.max_unconfirmed, opts.max_held_bytes),
            orphans: Vec::new(),
        };
        let task = tokio::spawn(driver.run());
        Ok((
            Self {
                shared,
                prefix: opts.topic_prefix,
                max_packet_bytes: opts.max_packet_bytes,
                publish_timeout: opts.publish_timeout,
                task: Mutex::new(Some(task)),
            },
            rx,
        ))
    }

    /// The topic prefix this session uses.
    pub fn prefix(&self) -> &TopicPrefix {
        &self.prefix
    }

    /// The current connection state.
    pub fn status(&self) -> SessionStatus {
        self.shared.status.borrow().clone()
    }

    /// A receiver that sees every change of [`status`](Self::status).
    pub fn watch_status(&self) -> watch::Receiver<SessionStatus> {
        self.shared.status.subscribe()
    }

    /// Waits until the session is connected and its subscriptions are granted.
    pub async fn wait_subscribed(&self, within: Duration) -> Result<(), SessionError> {
        let mut rx = self.shared.status.subscribe();
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

    /// Inbound messages whose topic broke the contract (acknowledged and not delivered).
    pub fn rejected_topics(&self) -> u64 {
        self.shared.rejected_topics.load(Ordering::Relaxed)
    }

    /// Provisioning requests refused for exceeding `max_request_bytes` (acknowledged, answered
    /// on `/rejected` and not delivered).
    pub fn oversize_requests(&self) -> u64 {
        self.shared.oversize_requests.load(Ordering::Relaxed)
    }

    /// QoS 0 messages dropped because the consumer channel was full.
    pub fn dropped_qos0(&self) -> u64 {
        self.shared.dropped_qos0.load(Ordering::Relaxed)
    }

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
        let topic = self.prefix.commands(id, subtopic)?;
        self.publish(topic, payload.into(), false).await
    }

    /// QoS 1 publish that returns once the broker acknowledged it.
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
        let deadline = Instant::now() + self.publish_timeout;
        let timed_out = |topic: String| SessionError::PublishTimeout {
            topic,
            waited: self.publish_timeout,
        };
        let confirmed = loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut inner = self.shared.lock();
                if inner.closed {
                    return Err(SessionError::Closed);
                }
                // Queued and registered under one lock so the order of waiters is the order
                // rumqttc takes requests from its channel.
                if self
                    .shared
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

    /// Sends DISCONNECT (if connected) and stops the session task, waiting at most `within`.
    pub async fn shutdown(&self, within: Duration) {
        {
            let mut inner = self.shared.lock();
            inner.closed = true;
            inner.confirms.fail_all();
            // Under the lock, so the event loop's next flush sees whether this got through.
            inner.disconnect_queued = self.shared.client.try_disconnect().is_ok();
        }
        self.shared.shutdown.notify_one();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut task) = task {
            if timeout(within, &mut task).await.is_err() {
                tracing::warn!("downstream session did not stop within {within:?}; aborting it");
                task.abort();
            }
        }
    }
}

impl Drop for DownstreamSession {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
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

/// Owns the event loop; runs in its own task.
struct Driver {
    shared: Arc<Shared>,
    eventloop: EventLoop,
    tx: mpsc::Sender<DownstreamMessage>,
    prefix: TopicPrefix,
    filters: Vec<String>,
    backoff: Backoff,
    max_packet_bytes: usize,
    max_request_bytes: usize,
    gate: ReadAhead,
    /// Messages of a lost connection that were read but not handed over (see
    /// [`Driver::on_connection_lost`]); settled by the next CONNACK.
    orphans: Vec<(Publish, AckHandle)>,
}

/// How far the session hands messages to the consumer ahead of the broker's confirmed
/// processing of their PUBACKs (see "Read-ahead" in the module docs). Counts are per
/// connection.
#[derive(Debug)]
struct ReadAhead {
    max_unconfirmed: usize,
    /// QoS 1 messages of this connection handed to the consumer (or settled by the session).
    delivered: u64,
    /// PUBACKs of this connection written to the broker.
    written: u64,
    /// PUBACKs the broker has certainly processed: those written before an answered PINGREQ.
    confirmed: u64,
    /// For each PINGREQ awaiting its PINGRESP, oldest first: `written` when it was sent.
    /// Ours and rumqttc's keep-alive pings alike; the broker answers them in order.
    pings: VecDeque<u64>,
    /// `written` when the last PINGREQ went out.
    last_ping_mark: u64,
    /// Messages read but not handed over yet, in arrival order (QoS 0 ones too, so a device's
    /// order is kept).
    held: VecDeque<(Publish, AckHandle)>,
    /// Payload and topic bytes in `held`.
    held_bytes: usize,
    /// Held bytes at most; what comes beyond is left with the broker.
    max_held_bytes: usize,
    /// `held` was full: every later message of this connection is left with the broker (its
    /// PUBACK would have to follow the missing ones), and once the held ones are stored and
    /// acknowledged the session reconnects so the broker sends them again.
    discarding: bool,
    /// Messages left with the broker on this connection.
    discarded: u64,
}

impl ReadAhead {
    fn new(max_unconfirmed: usize, max_held_bytes: usize) -> Self {
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
    fn reset(&mut self) -> VecDeque<(Publish, AckHandle)> {
        let held = std::mem::take(&mut self.held);
        *self = Self::new(self.max_unconfirmed, self.max_held_bytes);
        held
    }

    /// Whether `publish` is to be left with the broker: once `held` is full, it and every
    /// later message of the connection (the first one is always held, whatever its size).
    fn leave_with_broker(&mut self, publish: &Publish) -> bool {
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

    fn hold(&mut self, publish: Publish, ack: AckHandle) {
        self.held_bytes += publish.payload.len() + publish.topic.len();
        self.held.push_back((publish, ack));
    }

    /// The oldest held message, if it may go to the consumer now: QoS 0 always (it needs no
    /// ack), QoS 1 while fewer than `max_unconfirmed` are unconfirmed.
    fn release(&mut self) -> Option<(Publish, AckHandle)> {
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
    fn wants_ping(&self) -> bool {
        let window = self.max_unconfirmed as u64;
        let since = self.written - self.last_ping_mark;
        since > 0
            && self.delivered - self.confirmed >= window / 2
            && (self.pings.is_empty() || since >= (window / 4).max(1))
    }

    fn ping_sent(&mut self) {
        self.pings.push_back(self.written);
        self.last_ping_mark = self.written;
    }

    fn pong(&mut self) {
        if let Some(mark) = self.pings.pop_front() {
            self.confirmed = self.confirmed.max(mark);
        }
    }
}

impl Driver {
    async fn run(mut self) {
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
        self.shared.status.send_modify(|s| {
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
                self.eventloop
                    .pending
                    .push_front(Request::Subscribe(Subscribe::new_many(filters)));
                tracing::info!(
                    session_present = ack.session_present,
                    "downstream broker connected"
                );
                self.shared.status.send_modify(|s| {
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
                    self.shared.status.send_modify(|s| {
                        s.subscribed = true;
                    });
                } else {
                    let msg = format!(
                        "the downstream broker refused the subscription to {}; check its ACL for the gateway user",
                        refused.join(", ")
                    );
                    tracing::error!("{msg}");
                    self.shared.status.send_modify(|s| s.last_error = Some(msg));
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
    /// one request per turn: see the module docs), followed by a PINGREQ when the read-ahead
    /// needs a confirmation. A write error means the connection is gone: the next poll
    /// reports it, and the broker redelivers what was not acknowledged.
    async fn write_acks(&mut self) {
        let Some(network) = self.eventloop.network.as_mut() else {
            return;
        };
        let done = self.shared.lock().take_done_acks();
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
        let within = Duration::from_secs(self.eventloop.network_options.connection_timeout());
        match timeout(within, network.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "flushing PUBACKs to the downstream broker"),
            Err(_) => tracing::debug!("flushing PUBACKs to the downstream broker timed out"),
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
        let stale: Vec<Event> = self.eventloop.state.events.drain(..).collect();
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
            self.eventloop.clean();
            lost
        };
        self.shared.room.notify_waiters();
        self.shared.status.send_modify(|s| {
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
                AckHandle { slot: None }
            } else {
                AckHandle {
                    slot: Some(AckSlot {
                        shared: self.shared.clone(),
                        generation: lost_generation,
                        seq: 0,
                    }),
                }
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
            let message = DownstreamMessage {
                topic,
                payload: publish.payload,
                qos: publish.qos,
                dup: publish.dup,
                ack,
            };
            if self.tx.try_send(message).is_err() {
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
                self.shared.dropped_qos0.fetch_add(1, Ordering::Relaxed);
            }
            self.resume_left_messages();
            return true;
        }
        let ack = if publish.qos == QoS::AtMostOnce {
            AckHandle { slot: None }
        } else {
            let mut inner = self.shared.lock();
            let seq = inner.acks.head_seq + inner.acks.entries.len() as u64;
            inner.acks.entries.push_back(AckEntry {
                qos: publish.qos,
                pkid: publish.pkid,
                done: false,
            });
            AckHandle {
                slot: Some(AckSlot {
                    shared: self.shared.clone(),
                    generation: inner.generation,
                    seq,
                }),
            }
        };
        // Through the queue of held messages, so a device's order is kept whatever waits.
        self.gate.hold(publish, ack);
        self.release_held().await
    }

    /// Validates a device message and hands it to the consumer with `ack`. Returns false when
    /// the session should stop.
    async fn deliver(&mut self, publish: Publish, ack: AckHandle) -> bool {
        let topic = match DeviceTopic::parse(&self.prefix, &publish.topic) {
            Ok(topic) => topic,
            Err(error) => {
                self.reject_topic(&publish.topic, &error);
                ack.ack();
                return true;
            }
        };
        if let DeviceTopic::ProvisionRequest { device, format } = &topic {
            if publish.payload.len() > self.max_request_bytes {
                self.reject_oversize(device, *format, publish.payload.len());
                ack.ack();
                return true;
            }
        }
        let message = DownstreamMessage {
            topic,
            payload: publish.payload,
            qos: publish.qos,
            dup: publish.dup,
            ack,
        };
        match self.tx.try_send(message) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(message)) if message.qos == QoS::AtMostOnce => {
                self.shared.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("downstream consumer busy: QoS 0 message dropped");
            }
            Err(mpsc::error::TrySendError::Full(message)) => {
                // QoS 1 must not be dropped; this blocks the event loop (and keep-alive), which
                // only happens when inbound_capacity is below the broker's in-flight window.
                tracing::warn!("downstream consumer channel full; event loop waits for it");
                if let Err(mpsc::error::SendError(message)) = self.tx.send(message).await {
                    return self.consumer_gone(message);
                }
            }
            Err(mpsc::error::TrySendError::Closed(message)) => return self.consumer_gone(message),
        }
        true
    }

    fn consumer_gone(&self, message: DownstreamMessage) -> bool {
        // Left unacknowledged so the broker keeps it for the next session.
        if let Some(slot) = message.ack.into_slot() {
            drop(slot);
        }
        tracing::info!("downstream consumer gone; stopping the session");
        false
    }

    /// Answers a provisioning request whose id broke the rules, on the topic the device used.
    fn reject_topic(&self, topic: &str, error: &TopicError) {
        self.shared.rejected_topics.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, "downstream message refused");
        let Some((reply_topic, fmt)) = rejected_for_request_topic(&self.prefix, topic) else {
            return;
        };
        let code = match error {
            TopicError::NonCanonicalId { .. } => error_code::NON_CANONICAL_DEVICE_ID,
            _ => error_code::INVALID_DEVICE_ID,
        };
        let body = RejectedResponse::new(400, code, error.to_string());
        self.send_rejection(reply_topic, contract::encode(fmt, &body));
    }

    /// Answers a provisioning request larger than `max_request_bytes`.
    fn reject_oversize(&self, device: &DeviceId, fmt: PayloadFormat, size: usize) {
        self.shared
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
        self.send_rejection(
            self.prefix.rejected(device, fmt),
            contract::encode(fmt, &body),
        );
    }

    /// Queues a `/rejected` answer from inside the event loop, without waiting for its PUBACK
    /// (waiting here would stall the loop that receives that PUBACK).
    fn send_rejection(&self, reply_topic: String, payload: Vec<u8>) {
        if payload.len() + reply_topic.len() + 8 > self.max_packet_bytes {
            return;
        }
        let mut inner = self.shared.lock();
        // Registered like any publish so packet ids keep matching callers; nobody waits on it.
        if self
            .shared
            .client
            .try_publish(reply_topic, QoS::AtLeastOnce, false, payload)
            .is_ok()
        {
            let (tx, _) = oneshot::channel();
            inner.confirms.queued.push_back(tx);
        } else {
            tracing::warn!("downstream request channel full; rejection not sent");
        }
    }
}

impl AckHandle {
    fn into_slot(mut self) -> Option<AckSlot> {
        self.slot.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(gate: &mut ReadAhead, qos: QoS, payload: &str) {
        let publish = Publish::new("fleetgw/d/telemetry", qos, payload.as_bytes().to_vec());
        gate.hold(publish, AckHandle { slot: None });
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
                gate.hold(publish, AckHandle { slot: None });
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

    #[test]
    fn client_id_names_the_gateway() {
        assert_eq!(gateway_client_id("gw-01"), "fleetgw-gw-01");
    }
}
